"""An on-disk cache of a frozen LM's activations, for multi-epoch or repeated sparse-coder training.

The LM forward is most of a sparse-coder step on a real model, and it gives the same activations
every epoch. With a cache, every training row's activations at every hookpoint are computed once
and later epochs, resumed runs and other runs on the same rows (a sweep over k or widths) read them
from memory-mapped numpy files instead of running the LM.

Layout::

    <root>/<key>/manifest.json                  what the key was made of, shard size, widths, dtype
    <root>/<key>/shard-00012/offsets.npy        [rows + 1] int64: row i's tokens are [o[i], o[i+1])
    <root>/<key>/shard-00012/<hookpoint>.x.npy  [tokens, d_in]: the coder's input
    <root>/<key>/shard-00012/<hookpoint>.y.npy  [tokens, d_out]: a transcoder's target

``key`` hashes the model's weights fingerprint, the training rows (which the corpus, tokenizer,
context length, packing and split all shape), the hookpoints, the mode, the BOS id and the dtype:
change any of them and the cache is another folder (an older one is reported as not used, never
read). Shard ``i`` holds the training rows ``[i * shard_rows, (i + 1) * shard_rows)``, only their
training positions (no BOS, no padding), in row order; rank ``r`` of ``R`` computes the shards
``i % R == r``, each written into a temporary folder and renamed into place, so an interrupted build
leaves whole shards only and the next run computes the rest. Shards do not depend on the number of
ranks, so a cache built on 8 GPUs serves a run on 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_edit.constants import ACTIVATION_MANIFEST, ACTIVATION_OFFSETS

FORMAT_VERSION = 1
SHARD_ROWS = 1024

Acts = dict[str, tuple[torch.Tensor, torch.Tensor | None]]
"""Per hookpoint: (coder input [tokens, d_in], target [tokens, d_out] or None for an SAE)."""


def _file_name(hookpoint: str, part: str) -> str:
    return f"{hookpoint}.{part}.npy"


class ActivationCache:
    """The cache folder for one key. ``build`` fills the missing shards of one rank; ``read`` gathers
    the activations of training rows in the order given."""

    def __init__(self, root: str | Path, key_parts: dict[str, Any], n_rows: int, shard_rows: int = SHARD_ROWS):
        if n_rows < 1:
            raise ValueError("an activation cache needs at least one training row")
        self.root = Path(root)
        self.key_parts = {"format": FORMAT_VERSION, **key_parts}
        self.key = hashlib.sha256(json.dumps(self.key_parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.dir = self.root / self.key
        self.n_rows, self.shard_rows = n_rows, shard_rows
        self.n_shards = -(-n_rows // shard_rows)
        self.hookpoints: list[str] = list(key_parts.get("hookpoints", []))
        self._shards: list[dict[str, np.ndarray]] | None = None
        self._dtype: torch.dtype | None = None

    @classmethod
    def from_dir(cls, folder: str | Path) -> "ActivationCache":
        """The cache in ``folder`` (a ``<root>/<key>`` folder with its manifest), to read it."""
        folder = Path(folder)
        manifest = json.loads((folder / ACTIVATION_MANIFEST).read_text())
        cache = cls(folder.parent, manifest["key_parts"], manifest["n_rows"], manifest["shard_rows"])
        if cache.dir.resolve() != folder.resolve():
            raise ValueError(f"{folder}: its manifest hashes to key {cache.key}, not the folder's name")
        return cache

    # --- what is there ---------------------------------------------------------------------------

    def shard_dir(self, index: int) -> Path:
        return self.dir / f"shard-{index:05d}"

    def missing_shards(self) -> list[int]:
        return [i for i in range(self.n_shards) if not (self.shard_dir(i) / ACTIVATION_OFFSETS).is_file()]

    def other_caches(self) -> list[str]:
        """One line per other cache under ``root`` built for the same corpus source, naming what
        differs (the model, the rows, the hookpoints, ...): they are not used."""
        lines = []
        if not self.root.is_dir():
            return lines
        for manifest in sorted(self.root.glob(f"*/{ACTIVATION_MANIFEST}")):
            if manifest.parent == self.dir:
                continue
            try:
                theirs = json.loads(manifest.read_text()).get("key_parts", {})
            except (OSError, json.JSONDecodeError):
                continue
            if theirs.get("corpus") != self.key_parts.get("corpus"):
                continue
            changed = sorted(k for k in set(theirs) | set(self.key_parts) if theirs.get(k) != self.key_parts.get(k))
            lines.append(f"{manifest.parent} was built for another {', '.join(changed)}: not used")
        return lines

    # --- building --------------------------------------------------------------------------------

    def write_manifest(self, widths: dict[str, tuple[int, int | None]], dtype: torch.dtype) -> None:
        """Rank 0, before building: what the cache holds (written atomically)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = {
            "key_parts": self.key_parts,
            "n_rows": self.n_rows,
            "shard_rows": self.shard_rows,
            "widths": {hp: list(w) for hp, w in widths.items()},
            "dtype": str(dtype).removeprefix("torch."),
        }
        tmp = self.dir / f".{ACTIVATION_MANIFEST}.{os.getpid()}"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, self.dir / ACTIVATION_MANIFEST)

    def build(
        self,
        compute: Callable[[int, int], tuple[Acts, torch.Tensor]],
        rank: int = 0,
        world_size: int = 1,
        progress: bool = False,
    ) -> int:
        """Compute and write this rank's missing shards; returns how many it wrote.

        ``compute(start, stop)`` gives the activations of training rows ``[start, stop)`` in row
        order and the number of training positions of each row (long ``[stop - start]``).
        """
        from tqdm.auto import tqdm

        mine = [i for i in self.missing_shards() if i % world_size == rank]
        for index in tqdm(mine, desc="activation cache", unit="shard", disable=not progress or not mine):
            start = index * self.shard_rows
            stop = min(start + self.shard_rows, self.n_rows)
            acts, counts = compute(start, stop)
            offsets = np.zeros(stop - start + 1, dtype=np.int64)
            np.cumsum(counts.cpu().numpy(), out=offsets[1:])
            tmp = self.dir / f".tmp-shard-{index:05d}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for hp, (x, y) in acts.items():
                if x.shape[0] != offsets[-1]:
                    raise RuntimeError(f"activation cache: {hp} gave {x.shape[0]} tokens for rows "
                                       f"[{start}, {stop}), whose training positions are {offsets[-1]}")
                for part, tensor in (("x", x), ("y", y)):
                    if tensor is not None:
                        np.save(tmp / _file_name(hp, part), _to_numpy(tensor))
            np.save(tmp / ACTIVATION_OFFSETS, offsets)  # last: its presence marks a whole shard
            try:
                os.rename(tmp, self.shard_dir(index))
            except OSError:  # another process wrote the same shard first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
        return len(mine)

    # --- reading ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Memory-map every shard (all must be there)."""
        missing = self.missing_shards()
        if missing:
            raise RuntimeError(f"activation cache {self.dir}: shards {missing[:5]} are missing")
        manifest = json.loads((self.dir / ACTIVATION_MANIFEST).read_text())
        self._dtype = getattr(torch, manifest["dtype"])
        self._shards = []
        for i in range(self.n_shards):
            folder = self.shard_dir(i)
            arrays = {"offsets": np.load(folder / ACTIVATION_OFFSETS)}
            for hp in self.hookpoints:
                for part in ("x", "y"):
                    path = folder / _file_name(hp, part)
                    if path.is_file():
                        arrays[f"{hp}.{part}"] = np.load(path, mmap_mode="r")
            self._shards.append(arrays)

    def read(self, rows: torch.Tensor, device: torch.device | str = "cpu") -> tuple[Acts, int]:
        """The activations of training ``rows`` (in that order, each row's positions in order) and
        their token count: what one LM forward over those rows would give."""
        if self._shards is None:
            self.open()
        pieces: list[tuple[dict[str, np.ndarray], int, int]] = []
        for row in rows.tolist():
            shard = self._shards[row // self.shard_rows]
            local = row % self.shard_rows
            pieces.append((shard, int(shard["offsets"][local]), int(shard["offsets"][local + 1])))
        acts: Acts = {}
        for hp in self.hookpoints:
            parts = []
            for part in ("x", "y"):
                name = f"{hp}.{part}"
                if name not in pieces[0][0]:
                    parts.append(None)
                    continue
                array = np.concatenate([shard[name][a:b] for shard, a, b in pieces])
                parts.append(_from_numpy(array, self._dtype).to(device))
            acts[hp] = (parts[0], parts[1])
        return acts, sum(b - a for _, a, b in pieces)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """numpy has no bfloat16: such activations are stored as their int16 bit patterns."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy()


def _from_numpy(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def cache_bytes(n_tokens: int, widths: dict[str, tuple[int, int | None]], dtype: torch.dtype) -> int:
    """Bytes the cache takes for ``n_tokens`` training positions."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return n_tokens * itemsize * sum(d_in + (d_out or 0) for d_in, d_out in widths.values())
