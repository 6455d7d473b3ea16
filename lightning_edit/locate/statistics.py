"""Second-moment statistics C = E[k k^T] of a layer's activations over a corpus, cached on disk.

ROME, MEMIT, AlphaEdit, TCPE and PNKE's preservation term all need C for the keys k at a layer (ROME's
`layer_stats`, "mom2"). It is computed once per (model, layer, site, corpus, sample count) in batches
under a progress bar, accumulated in float64, and stored as safetensors plus a JSON sidecar that holds
the full key. A cached file is used only when its sidecar matches the request field for field;
otherwise loading raises `StatsMismatchError`, naming the file and the field (`recompute=True`
overwrites it).

Memory: C is d x d per layer. For the FFN hidden neurons d = d_ff, e.g. 14336^2 * 4 bytes = 822 MB in
float32 on Llama-3-8B (411 MB in bfloat16), and the float64 accumulator needs twice the float32 size
on the model's device while it is computed. `dtype` chooses the stored and returned precision;
`accumulate_dtype=torch.float32` halves the accumulator where float64 does not fit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lightning_edit.locate.activations import (
    Site,
    SiteSpec,
    capture,
    resolve_site,
    run_until_captured,
    site_reader,
)
from lightning_edit.models import ModelAdapter, eval_mode, model_device, resident_parameters
from lightning_edit.tokens import encode_prompt, pad_id, right_padded

CACHE_ENV = "LIGHTNING_EDIT_CACHE"
FORMAT_VERSION = 1
STATS_SITES = ("down_proj_input", "mlp_input", "coder_latents")

Corpus = Union[str, Path, Sequence[str]]


class StatsMismatchError(ValueError):
    """A cached statistics file exists for the request's name but was computed for something else."""


@dataclass
class MomentStats:
    """Second moment, mean and token count of a site's vectors over a corpus."""

    second_moment: torch.Tensor
    """E[k k^T], [d, d]."""
    mean: torch.Tensor
    """E[k], [d]."""
    count: int
    """Token positions averaged over (BOS, EOS and padding excluded)."""


@dataclass(frozen=True)
class StatsKey:
    """Everything a cached C depends on; the sidecar stores it and a load compares it field by field."""

    model: str
    """The model's name_or_path ("" for a model built in memory)."""
    weights: str
    """blake2b of layer l's parameters feeding the site (the MLP's for its input, all but the down
    projection's for the neurons), so editing the MLP's output weights keeps the cache valid. Layers
    below l are not hashed: statistics are meant for the unedited model."""
    layer: int
    site: str
    """Site name (`coder_latents:<coder site>` for a coder)."""
    hookpoint: str
    coder: str
    """blake2b of the coder's encoder parameters (and b_dec), "" without a coder."""
    corpus: str
    """The corpus file's absolute path, or "<texts>" for an in-memory list."""
    corpus_size: int
    """Bytes of the corpus file (characters of the joined texts for a list)."""
    corpus_version: str
    """The file's mtime in ns, or the sha256 of the texts for a list."""
    n_samples: int
    """Texts requested (-1: all)."""
    max_length: int
    """Tokens per text at most (longer texts are truncated)."""


class StatsCache:
    """Statistics files under `root` (default `$LIGHTNING_EDIT_CACHE/stats`, else
    `~/.cache/lightning_edit/stats`; never the working directory)."""

    def __init__(self, root: str | Path | None = None):
        if root is None:
            base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lightning_edit"
            root = Path(base).expanduser() / "stats"
        self.root = Path(root).expanduser().resolve()

    def path_for(self, key: StatsKey) -> Path:
        """The safetensors file for a key; its sidecar is the same path with `.json`.

        The name holds the model, layer, site, corpus and sample count (with short hashes of the full
        model and corpus paths); the weights, coder and corpus version live only in the sidecar, so a
        changed model or corpus finds the old file and is told so instead of silently recomputing.
        """
        model_dir = f"{_slug('_'.join(Path(key.model).parts[-2:]) or 'in-memory')}-{_short(key.model)}"
        corpus = f"{_slug(Path(key.corpus).stem)}-{_short(key.corpus)}"
        name = (f"layer{key.layer}-{_slug(key.site)}-{corpus}-n{key.n_samples}"
                f"-len{key.max_length}.safetensors")
        return self.root / model_dir / name

    def load(self, key: StatsKey, dim: int | None = None) -> MomentStats | None:
        """The cached statistics for `key`, None when there are none; raises `StatsMismatchError`
        when the sidecar's key (or the tensor shape, against `dim`) differs from the request."""
        path = self.path_for(key)
        sidecar = path.with_suffix(".json")
        if not path.exists() and not sidecar.exists():
            return None
        if not sidecar.exists():
            raise StatsMismatchError(f"cached statistics {path} have no sidecar {sidecar.name}: cannot tell what "
                                     "they were computed for; pass recompute=True to overwrite")
        if not path.exists():
            raise StatsMismatchError(f"sidecar {sidecar} has no statistics file {path.name}; "
                                     "pass recompute=True to recompute")
        try:
            meta = json.loads(sidecar.read_text())
        except json.JSONDecodeError as err:
            raise StatsMismatchError(f"sidecar {sidecar} is not valid JSON ({err}); pass recompute=True "
                                     "to overwrite") from None
        stored = meta.get("key", {})
        for name, wanted in asdict(key).items():
            if stored.get(name) != wanted:
                raise StatsMismatchError(
                    f"cached statistics {path} do not match the request: field {name!r} is "
                    f"{stored.get(name)!r} in {sidecar.name}, requested {wanted!r}; pass recompute=True "
                    "to overwrite (or point StatsCache at another root)")
        tensors = load_file(str(path))
        c = tensors.get("second_moment")
        if c is None or c.ndim != 2 or c.shape[0] != c.shape[1] or (dim is not None and c.shape[0] != dim):
            shape = None if c is None else list(c.shape)
            raise StatsMismatchError(f"cached statistics {path}: field 'shape' is {shape}, expected "
                                     f"[{dim}, {dim}]; pass recompute=True to overwrite")
        return MomentStats(c, tensors["mean"], int(meta["count"]))

    def save(self, key: StatsKey, stats: MomentStats) -> Path:
        """Write the tensors and the sidecar (each atomically: a reader never sees half a file)."""
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"second_moment": stats.second_moment.contiguous().cpu(), "mean": stats.mean.contiguous().cpu()}
        with _atomic(path) as tmp:
            save_file(tensors, tmp, metadata={"format": str(FORMAT_VERSION), "count": str(stats.count)})
        meta = {"format": FORMAT_VERSION, "key": asdict(key), "count": stats.count,
                "shape": list(stats.second_moment.shape),
                "dtype": str(stats.second_moment.dtype).removeprefix("torch.")}
        with _atomic(path.with_suffix(".json")) as tmp:
            Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")
        return path


@contextmanager
def _atomic(path: Path) -> Iterator[str]:
    """A temporary path next to `path`, renamed onto it when the block succeeds (removed if not)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "x"


def _short(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def tensor_hash(tensors: Sequence[torch.Tensor]) -> str:
    """blake2b over the raw bytes of the tensors, in order (dtype and shape included)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no extra copy
    return h.hexdigest()


def evenly_spaced(items: Sequence[Any], n: int) -> list[Any]:
    """n items evenly spaced through `items` (all when n <= 0 or n >= len): deterministic, covers the corpus."""
    if n <= 0 or n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def read_corpus(corpus: Corpus) -> tuple[list[str], str, int, str]:
    """(texts, identity, size, version) of a corpus: a .txt file (one text per line), a .jsonl file
    (a "text" field per line), or a sequence of strings."""
    if isinstance(corpus, (str, Path)):
        path = Path(corpus).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist")
        lines = path.read_text(encoding="utf-8").splitlines()
        if path.suffix == ".jsonl":
            texts = []
            for n, line in enumerate(lines, 1):
                if line.strip():
                    row = json.loads(line)
                    if "text" not in row:
                        raise ValueError(f"{path}, line {n}: no 'text' field (keys: {sorted(row)})")
                    texts.append(row["text"])
        else:
            texts = [line for line in lines if line.strip()]
        stat = path.stat()
        return texts, str(path), stat.st_size, str(stat.st_mtime_ns)
    texts = list(corpus)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("corpus must be a file path or a sequence of strings")
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    return texts, f"<texts:{digest[:16]}>", sum(len(t) for t in texts), digest


def _weights_hash(adapter: ModelAdapter, layer: int, hooked: Site) -> str:
    """Hash of layer l's parameters that can change the vectors read at `hooked`: a site at the MLP's
    input leaves the MLP out (a spliced-in transcoder included), one at the down projection's input
    leaves the down projection out, so edits of those weights keep the cache valid."""
    skip: list[nn.Module] = []
    if hooked == resolve_site(adapter, layer, "mlp_input"):
        skip = [adapter.mlp(layer)]
    else:
        try:
            if hooked == resolve_site(adapter, layer, "down_proj_input"):
                skip = [adapter.down_proj(layer)]
        except ValueError:  # the MLP has no down projection of its own (e.g. a transcoder replaces it)
            pass
    skipped = {id(p) for module in skip for p in module.parameters()}
    module = adapter.layer(layer)  # offloaded weights hashed by their values, as resident ones
    return tensor_hash([value for p, value in zip(module.parameters(), resident_parameters(module))
                        if id(p) not in skipped])


def _coder_hash(coder: nn.Module | None) -> str:
    if coder is None:
        return ""
    params = [p for _, p in sorted(coder.encoder.named_parameters())] if hasattr(coder, "encoder") else []
    if getattr(coder, "b_dec", None) is not None:
        params.append(coder.b_dec)
    return tensor_hash(params or list(coder.parameters()))


def stats_key(model: nn.Module, adapter: ModelAdapter, layer: int, corpus_id: tuple[str, int, str], *,
              site: str, hooked: Site, coder: nn.Module | None, n_samples: int | None,
              max_length: int) -> StatsKey:
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "") or "")
    return StatsKey(model=name, weights=_weights_hash(adapter, layer, hooked), layer=layer,
                    site=site, hookpoint=hooked.hookpoint, coder=_coder_hash(coder), corpus=corpus_id[0],
                    corpus_size=corpus_id[1], corpus_version=corpus_id[2],
                    n_samples=-1 if n_samples is None else int(n_samples), max_length=int(max_length))


def _site_dim(adapter: ModelAdapter, layer: int, site: str, coder: nn.Module | None) -> int | None:
    """The expected width of a statistics site (None when it cannot be told without a forward)."""
    try:
        if site == "down_proj_input":
            return adapter.intermediate_size(layer)
        if site == "mlp_input":
            return adapter.hidden_size
        return getattr(coder, "num_latents", None) or coder.W_dec.shape[0]
    except (ValueError, AttributeError):
        return None


@torch.no_grad()
def compute_moments(model: nn.Module, tok: Any, adapter: ModelAdapter, layer: int, texts: Sequence[str], *,
                    site: str = "down_proj_input", coder: nn.Module | None = None,
                    coder_site: SiteSpec = "mlp_input", batch_size: int = 8, max_length: int = 256,
                    accumulate_dtype: torch.dtype = torch.float64, progress: bool = True) -> MomentStats:
    """E[k k^T], E[k] and the count over every real token of `texts` (no cache). BOS, EOS and padding
    positions are left out: BOS activations are outliers that say nothing about the corpus."""
    if site not in STATS_SITES:
        raise ValueError(f"unknown statistics site {site!r}; expected one of {STATS_SITES}")
    hooked, transform = site_reader(adapter, layer, site, coder, coder_site)
    device = model_device(model)
    specials = torch.tensor(sorted({i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
                                    if i is not None}), dtype=torch.long, device=device)
    sequences = [encode_prompt(tok, t)[:max_length] for t in texts]
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # less padding per batch
    mom2 = total = None
    count = 0
    batches = range(0, len(order), batch_size)
    with eval_mode(model):
        for first in tqdm(batches, desc=f"second moment: layer {layer} {site}", disable=not progress,
                          unit="batch"):
            ids, mask = right_padded([sequences[i] for i in order[first:first + batch_size]], pad_id(tok), device)
            with capture(adapter, hooked, stop=True) as seen:
                run_until_captured(model, input_ids=ids, attention_mask=mask)
            keep = mask.bool() & ~torch.isin(ids, specials)
            k = transform(seen[0][keep]).to(accumulate_dtype)  # [n_tokens, d]
            if mom2 is None:
                mom2 = torch.zeros(k.shape[1], k.shape[1], dtype=accumulate_dtype, device=k.device)
                total = torch.zeros(k.shape[1], dtype=accumulate_dtype, device=k.device)
            mom2.addmm_(k.T, k)
            total += k.sum(dim=0)
            count += k.shape[0]
    if not count:
        raise ValueError(f"no token positions to average over ({len(texts)} texts, all empty or special)")
    return MomentStats(mom2 / count, total / count, count)


def second_moment(model: nn.Module, tok: Any, adapter: ModelAdapter, layer: int, corpus: Corpus,
                  n_samples: int | None = None, *, site: str = "down_proj_input", coder: nn.Module | None = None,
                  coder_site: SiteSpec = "mlp_input", batch_size: int = 8, max_length: int = 256,
                  dtype: torch.dtype = torch.float32, accumulate_dtype: torch.dtype = torch.float64,
                  cache: StatsCache | str | Path | bool | None = None, recompute: bool = False,
                  return_stats: bool = False, progress: bool = True) -> torch.Tensor | MomentStats:
    """C = E[k k^T] [d, d] of the site's vectors at `layer` over the first `n_samples` texts of
    `corpus` (None: all), loaded from the cache when a matching file exists, else computed and saved.

    `site`: "down_proj_input" (FFN hidden neurons, d = d_ff; ROME's keys), "mlp_input" (d = d_model) or
    "coder_latents" (a coder's dense latents of `coder_site`, d = n_latents). `corpus`: a .txt / .jsonl
    path or a list of texts. `cache`: a `StatsCache`, a root directory, None (the default root) or
    False (no cache). With `return_stats=True` returns `MomentStats(second_moment, mean, count)`.
    Tensors come back on the CPU in `dtype` (see the module docstring for the memory they take).
    """
    texts, *corpus_id = read_corpus(corpus)
    if n_samples is not None:
        if n_samples < 1:
            raise ValueError(f"n_samples is {n_samples} (expected >= 1, or None for all)")
        texts = texts[:n_samples]
    hooked, _ = site_reader(adapter, layer, site, coder, coder_site)
    site_name = f"coder_latents:{hooked.hookpoint}:{hooked.io}" if site == "coder_latents" else site
    if cache is False:
        store = None
    else:
        store = cache if isinstance(cache, StatsCache) else StatsCache(None if cache in (None, True) else cache)
    key = stats_key(model, adapter, layer, tuple(corpus_id), site=site_name, hooked=hooked,
                    coder=coder, n_samples=n_samples, max_length=max_length) if store else None
    stats = store.load(key, _site_dim(adapter, layer, site, coder)) if store and not recompute else None
    if stats is None:
        stats = compute_moments(model, tok, adapter, layer, texts, site=site, coder=coder, coder_site=coder_site,
                                batch_size=batch_size, max_length=max_length,
                                accumulate_dtype=accumulate_dtype, progress=progress)
        stats = MomentStats(stats.second_moment.to(dtype).cpu(), stats.mean.to(dtype).cpu(), stats.count)
        if store:
            store.save(key, stats)
    else:
        stats = MomentStats(stats.second_moment.to(dtype), stats.mean.to(dtype), stats.count)
    return stats if return_stats else stats.second_moment


def editing_second_moment(model: nn.Module, tok: Any, adapter: ModelAdapter, layer: int, corpus: Corpus,
                          n_samples: int | None, batch_size: int, who: str) -> torch.Tensor:
    """E[k k^T] of the down projection's inputs at `layer` for an editor (ROME, MEMIT, AlphaEdit): from
    the cache when it holds them for these weights; a cached file made for other weights (e.g. a
    rebuilt model) is recomputed over, since this model is the one being edited."""
    kwargs = dict(site="down_proj_input", batch_size=batch_size)
    try:
        return second_moment(model, tok, adapter, layer, corpus, n_samples, **kwargs)
    except StatsMismatchError as err:
        print(f"[{who}] {err.args[0].split(';')[0]}: recomputing", file=sys.stderr)
        return second_moment(model, tok, adapter, layer, corpus, n_samples, recompute=True, **kwargs)
