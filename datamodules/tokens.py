"""The activation stream's input: text -> token rows -> one batch per training step, sharded.

Sources: a local ``.txt`` (a document per line), ``.jsonl`` or ``.parquet`` (a ``text_field``), a
folder of such files, a Hugging Face dataset name (streamed with ``datasets``), or, by default, the
embedded world's corpus.

Order and sharding. Rows form one infinite stream: epoch ``e`` is a permutation of the rows seeded by
``(seed, e)``. Training step ``t`` on rank ``r`` of ``R`` takes global batch ``g = t * R + r``, the
stream positions ``[g * B, (g + 1) * B)``; dataloader worker ``w`` of ``W`` produces the steps
``t = start + w + i * W`` (the DataLoader reads its workers round-robin, so batches arrive in step
order). Every (rank, worker) pair thus sees disjoint rows, together all of them, and a batch's
contents depend only on (seed, step, rank): resuming at step ``t`` (``start = trainer.global_step``)
replays the stream exactly, whatever the number of workers.

Rows. With ``packing`` the documents are concatenated with EOS between them and cut into
``context_length`` chunks (BOS first when the tokenizer has one), as sparsify does; without it each
document is one row, truncated and right-padded (the world's tiny LM was trained on single
sentences, so its corpus is not packed). Batches are trimmed to their longest row.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lightning_edit.tokens import pad_id

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


# --- reading documents ---------------------------------------------------------------------------


def _read_file(path: Path, text_field: str) -> list[str]:
    if path.suffix == ".txt":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if text_field not in record:
                    raise ValueError(
                        f"{path}:{lineno}: no field '{text_field}' (data.text_field); "
                        f"fields: {sorted(record)}"
                    )
                docs.append(str(record[text_field]))
        return docs
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise ValueError(
                f"{path}: no column '{text_field}' (data.text_field); columns: {table.column_names}"
            )
        return [str(t) for t in table.column(text_field).to_pylist() if t is not None]
    raise ValueError(f"{path}: unsupported file type '{path.suffix}'; expected one of {TEXT_SUFFIXES}")


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents from a local file, or from every supported file in a folder (sorted, recursive)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"{path}: folder has no {', '.join(TEXT_SUFFIXES)} files")
        return [doc for f in files for doc in _read_file(f, text_field)]
    if not path.is_file():
        raise FileNotFoundError(f"data.path '{path}' does not exist")
    return _read_file(path, text_field)


def is_local_path(path: str) -> bool:
    """A path that exists, or one that is written like a file path (so a typo is not a hub lookup)."""
    p = Path(path)
    return p.exists() or p.suffix in TEXT_SUFFIXES or path.startswith((".", "/", "~"))


# --- tokenising into rows ------------------------------------------------------------------------


def _special_ids(tokenizer) -> tuple[int | None, int | None, int]:
    return tokenizer.bos_token_id, tokenizer.eos_token_id, pad_id(tokenizer)


def tokenize_rows(
    docs: list[str], tokenizer, context_length: int, packing: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents -> (input_ids [N, L] long, lengths [N] long), rows right-padded with the pad id."""
    if context_length < 2:
        raise ValueError(f"data.context_length must be >= 2, got {context_length}")
    bos, eos, pad = _special_ids(tokenizer)
    if packing:
        encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
        sep = [eos] if eos is not None else []
        flat = [t for ids in encoded for t in (*ids, *sep)]
        prefix = [bos] if bos is not None else []
        body = context_length - len(prefix)
        n = len(flat) // body  # the last partial chunk is dropped
        if n == 0:
            raise ValueError(
                f"corpus has {len(flat)} tokens, fewer than one row of data.context_length={context_length}"
            )
        chunks = torch.tensor(flat[: n * body], dtype=torch.long).view(n, body)
        if prefix:
            chunks = torch.cat([torch.full((n, 1), bos, dtype=torch.long), chunks], dim=1)
        return chunks, torch.full((n,), context_length, dtype=torch.long)
    encoded = tokenizer(docs, add_special_tokens=True)["input_ids"]
    truncated = sum(len(ids) > context_length for ids in encoded)
    if truncated:
        warnings.warn(
            f"{truncated} of {len(encoded)} documents are longer than data.context_length="
            f"{context_length} tokens and were truncated (packing is off)",
            stacklevel=2,
        )
    encoded = [ids[:context_length] for ids in encoded if ids]
    width = max(len(ids) for ids in encoded)
    rows = torch.full((len(encoded), width), pad, dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids in encoded], dtype=torch.long)
    for i, ids in enumerate(encoded):
        rows[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return rows, lengths


def make_batch(ids: torch.Tensor, lengths: torch.Tensor, **extra: Any) -> dict[str, Any]:
    """Rows -> {input_ids, attention_mask} trimmed to the longest row, plus ``extra`` entries."""
    width = int(lengths.max())
    ids = ids[:, :width]
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    return {"input_ids": ids, "attention_mask": mask.long(), **extra}


def _permutation(n: int, *entropy: int) -> torch.Tensor:
    """A permutation of range(n) that depends only on ``entropy`` (non-negative ints)."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence(list(entropy)).generate_state(1)[0]))
    return torch.randperm(n, generator=generator)


SPLIT, EPOCH = 0, 1  # permutation purposes: the train/val split, an epoch's order


# --- datasets ------------------------------------------------------------------------------------


class StepBatches(IterableDataset):
    """In-memory rows -> the batches of steps ``start, start+1, ...`` of one rank (see module doc).

    Each batch is ``{input_ids, attention_mask, step, rows}``; ``rows`` are the indices of its rows in
    the table (for tests and debugging). ``stop`` = None runs forever.
    """

    def __init__(
        self,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        stop: int | None = None,
    ):
        if len(ids) == 0:
            raise ValueError("no training rows")
        self.ids, self.lengths = ids, lengths
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start, self.stop = start, stop
        self._perms: dict[int, torch.Tensor] = {}

    def _rows_at(self, positions: torch.Tensor) -> torch.Tensor:
        n = len(self.ids)
        out = torch.empty_like(positions)
        epochs = positions // n
        for epoch in epochs.unique().tolist():
            if epoch not in self._perms:
                self._perms = {epoch: _permutation(n, self.seed, EPOCH, epoch)}  # keep only one epoch
            sel = epochs == epoch
            out[sel] = self._perms[epoch][positions[sel] % n]
        return out

    def batch(self, step: int) -> dict[str, Any]:
        g = step * self.world_size + self.rank
        positions = torch.arange(g * self.batch_size, (g + 1) * self.batch_size)
        rows = self._rows_at(positions)
        return make_batch(self.ids[rows], self.lengths[rows], step=step, rows=rows)

    def steps(self, worker_id: int = 0, num_workers: int = 1) -> Iterator[int]:
        step = self.start + worker_id
        while self.stop is None or step < self.stop:
            yield step
            step += num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        for step in self.steps(worker_id, num_workers):
            yield self.batch(step)


class StreamedStepBatches(IterableDataset):
    """Like ``StepBatches`` over a streamed (Hugging Face) dataset: rows arrive in stream order.

    Each worker reads the stream from its start and keeps its own steps' rows, so tokenisation is
    repeated ``W * R`` times and resuming at step t re-reads the first ``t * R * B`` rows; the order
    of every epoch is the dataset's buffered shuffle seeded by ``(seed, epoch)``.
    """

    def __init__(
        self,
        dataset,
        tokenizer,
        text_field: str,
        context_length: int,
        packing: bool,
        batch_size: int,
        seed: int,
        shuffle_buffer_docs: int = 10_000,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        stop: int | None = None,
    ):
        self.dataset, self.tokenizer, self.text_field = dataset, tokenizer, text_field
        self.context_length, self.packing = context_length, packing
        self.batch_size, self.seed, self.shuffle_buffer_docs = batch_size, seed, shuffle_buffer_docs
        self.rank, self.world_size, self.start, self.stop = rank, world_size, start, stop

    def _rows(self) -> Iterator[tuple[torch.Tensor, int]]:
        epoch = 0
        while True:
            ds = self.dataset.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer_docs)
            ds.set_epoch(epoch)
            docs: list[str] = []
            rows = 0
            for record in ds:
                docs.append(str(record[self.text_field]))
                if len(docs) == 256:
                    for row in self._tokenize(docs):
                        rows += 1
                        yield row
                    docs = []
            for row in self._tokenize(docs):
                rows += 1
                yield row
            if rows == 0:
                raise ValueError("the streamed dataset gives no rows (empty, or too short to pack one row)")
            epoch += 1

    def _tokenize(self, docs: list[str]) -> Iterator[tuple[torch.Tensor, int]]:
        if not docs:
            return
        try:
            ids, lengths = tokenize_rows(docs, self.tokenizer, self.context_length, self.packing)
        except ValueError:  # too few tokens in this group to fill a packed row
            return
        for row, length in zip(ids, lengths.tolist()):
            yield row, length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        wanted = StepBatches.steps(self, worker_id, num_workers)  # same step schedule
        step = next(wanted, None)
        position, rows, lengths = 0, [], []
        for row, length in self._rows():
            if step is None:
                return
            g = step * self.world_size + self.rank
            if g * self.batch_size <= position < (g + 1) * self.batch_size:
                rows.append(row)
                lengths.append(length)
                if len(rows) == self.batch_size:
                    width = max(len(r) for r in rows)
                    ids = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])
                    yield make_batch(ids, torch.tensor(lengths), step=step)
                    rows, lengths, step = [], [], next(wanted, None)
            position += 1


class HeldOutBatches(IterableDataset):
    """Validation rows, this rank's share (``rows[rank::world_size]``), in fixed batches."""

    def __init__(self, ids: torch.Tensor, lengths: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1):
        self.ids, self.lengths = ids[rank::world_size], lengths[rank::world_size]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.ids) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(0, len(self.ids), self.batch_size):
            yield make_batch(self.ids[i : i + self.batch_size], self.lengths[i : i + self.batch_size])


# --- the datamodule ------------------------------------------------------------------------------


class TokenDataModule(LightningDataModule):
    """Token batches for the sparse-coder trainer: one batch per rank per step, exactly resumable.

    ``path`` None = the embedded world's corpus (``world_corpus``). ``val_sequences`` rows are held
    out of training (the first rows of a permutation seeded by ``seed``; for a streamed dataset, the
    first rows of the unshuffled stream, whose documents training then skips).
    """

    def __init__(
        self,
        tokenizer,
        path: str | None = None,
        world_corpus: str | Path | None = None,
        text_field: str = "text",
        hf_name: str | None = None,
        split: str = "train",
        streaming: bool = False,
        context_length: int = 64,
        packing: bool | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        val_sequences: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.path, self.world_corpus = path, world_corpus
        self.text_field, self.hf_name, self.split, self.streaming = text_field, hf_name, split, streaming
        self.context_length = context_length
        # Packing defaults to off for the world's corpus (its LM saw single sentences), on otherwise.
        self.packing = packing if packing is not None else path is not None
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.val_sequences = val_sequences
        self.num_workers, self.seed, self.pin_memory = num_workers, seed, pin_memory
        self.train_ids = self.train_lengths = self.val_ids = self.val_lengths = None
        self.stream = None  # a streamed datasets.IterableDataset, when the source is one

    # -- building rows --

    def _source_description(self) -> str:
        return self.path or f"world corpus {self.world_corpus}"

    def setup(self, stage: str | None = None) -> None:
        if self.train_ids is not None or self.stream is not None:
            return
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if self.path is None:
            if self.world_corpus is None:
                raise ValueError(
                    "data.path is not set and the model is not an embedded world: give data.path "
                    "(a .txt/.jsonl/.parquet file, a folder of them, or a Hugging Face dataset name)"
                )
            self._setup_rows(read_documents(self.world_corpus, self.text_field))
        elif is_local_path(self.path) and not self.streaming:
            self._setup_rows(read_documents(self.path, self.text_field))
        else:
            self._setup_stream()

    def _setup_rows(self, docs: list[str]) -> None:
        if not docs:
            raise ValueError(f"{self._source_description()}: no documents")
        ids, lengths = tokenize_rows(docs, self.tokenizer, self.context_length, self.packing)
        n_val = min(self.val_sequences, len(ids) // 2)
        order = _permutation(len(ids), self.seed, SPLIT)
        val, train = order[:n_val].sort().values, order[n_val:].sort().values
        self.val_ids, self.val_lengths = ids[val], lengths[val]
        self.train_ids, self.train_lengths = ids[train], lengths[train]

    def _setup_stream(self) -> None:
        source = self._load_stream()
        val_rows, docs_used, buffer = [], 0, []
        for record in source:
            if len(val_rows) >= self.val_sequences:
                break
            if self.text_field not in record:
                raise ValueError(
                    f"{self.path}: records have no field '{self.text_field}' (data.text_field); "
                    f"fields: {sorted(record)}"
                )
            buffer.append(str(record[self.text_field]))
            docs_used += 1
            try:
                ids, lengths = tokenize_rows(buffer, self.tokenizer, self.context_length, self.packing)
            except ValueError:
                continue
            val_rows += list(zip(ids, lengths.tolist()))
            buffer = []
        val_rows = val_rows[: self.val_sequences]
        if val_rows:
            width = max(len(r) for r, _ in val_rows)
            self.val_ids = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r, _ in val_rows])
            self.val_lengths = torch.tensor([n for _, n in val_rows])
        self.stream = source.skip(docs_used)

    def _load_stream(self):
        try:
            import datasets
        except ImportError as exc:
            raise ImportError("streaming a dataset needs the `datasets` package (pip install datasets)") from exc
        path = self.path
        kwargs: dict[str, Any] = {"split": self.split, "streaming": True}
        if is_local_path(path):  # a local file or folder, streamed through a datasets builder
            p = Path(path)
            files = (
                sorted(str(f) for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES) if p.is_dir() else [str(p)]
            )
            if not files:
                raise ValueError(f"{p}: no {', '.join(TEXT_SUFFIXES)} files")
            builder = {".txt": "text", ".jsonl": "json", ".parquet": "parquet"}[Path(files[0]).suffix]
            path, kwargs = builder, {"data_files": {"train": files}, "split": "train", "streaming": True}
        elif self.hf_name:
            kwargs["name"] = self.hf_name
        try:
            return datasets.load_dataset(path, **kwargs)
        except (ConnectionError, OSError, FileNotFoundError) as exc:
            offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
            raise RuntimeError(
                f"cannot stream dataset '{self.path}' (split '{self.split}')"
                f"{' in offline mode' if offline else ''}: {exc}. Without network access, point "
                "data.path at local .txt/.jsonl/.parquet files."
            ) from exc

    # -- loaders --

    def train_dataset(self, start: int = 0, rank: int = 0, world_size: int = 1, stop: int | None = None):
        """The batches of steps ``start..stop`` (forever when None) for one rank."""
        self.setup()
        if self.stream is not None:
            return StreamedStepBatches(
                self.stream, self.tokenizer, self.text_field, self.context_length, self.packing,
                self.batch_size, self.seed, rank=rank, world_size=world_size, start=start, stop=stop,
            )
        return StepBatches(
            self.train_ids, self.train_lengths, self.batch_size, self.seed, rank, world_size, start, stop
        )

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        start = trainer.global_step if trainer is not None else 0  # exact resume (module doc)
        rank, world_size = self._rank()
        return DataLoader(
            self.train_dataset(start, rank, world_size),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )

    def replay_batches(self, start: int, stop: int) -> Iterator[dict[str, Any]]:
        """The batches of steps ``[start, stop)`` of this rank again, in the calling process."""
        rank, world_size = self._rank()
        yield from iter(self.train_dataset(max(0, start), rank, world_size, stop=stop))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        if self.val_ids is None or len(self.val_ids) == 0:
            return DataLoader([], batch_size=None)
        rank, world_size = self._rank()
        return DataLoader(
            HeldOutBatches(self.val_ids, self.val_lengths, self.val_batch_size, rank, world_size),
            batch_size=None,
            pin_memory=self.pin_memory,
        )

    # Nothing to checkpoint: the position in the stream is trainer.global_step.
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "batch_size": self.batch_size, "context_length": self.context_length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        changed = {k: (state[k], mine[k]) for k in mine if k in state and state[k] != mine[k]}
        if changed:
            warnings.warn(
                "resuming with different data settings (checkpoint, now): "
                + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
                + "; the token stream will not continue exactly",
                stacklevel=2,
            )
