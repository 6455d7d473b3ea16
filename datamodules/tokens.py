"""The activation stream's input: text -> token rows -> one batch per training step, sharded.

Sources: a local ``.txt`` (a document per line, or ``txt_documents="file"``: the whole file),
``.jsonl`` (a ``text_field`` per record) or ``.parquet`` (a ``text_field`` column), a folder of
such files, a Hugging Face ``datasets`` folder written by ``save_to_disk`` (a ``Dataset`` or a
``DatasetDict``, whose ``split`` is read), a Hugging Face dataset name (streamed with
``datasets``), or, by default, the embedded world's corpus. A wrong path, field, column or split,
or a corpus with no text, is a ``CorpusError`` naming it (the jobs print it and exit 2).

Order and sharding. Rows form one infinite stream: epoch ``e`` is a permutation of the rows seeded by
``(seed, e)``. Training step ``t`` on rank ``r`` of ``R`` takes global batch ``g = t * R + r``, the
stream positions ``[g * B, (g + 1) * B)``; dataloader worker ``w`` of ``W`` produces the steps
``t = start + w + i * W`` (the DataLoader reads its workers round-robin, so batches arrive in step
order). Every (rank, worker) pair thus sees disjoint rows, together all of them, and a batch's
contents depend only on (seed, step, rank): resuming at step ``t`` (``start = trainer.global_step``)
replays the stream exactly, whatever the number of workers.

Rows. With packing the documents are concatenated with EOS between them and cut into
``context_length`` chunks (BOS first when the tokenizer has one), as sparsify does; without it each
document is one row with the tokenizer's own special tokens, truncated and right-padded. Batches
are trimmed to their longest row. ``packing="auto"`` (the default) decides from the corpus
(``packing_rule``) and says why in ``packing_note``. Token ids are held as int32.
"""

from __future__ import annotations

import itertools
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

from lightning_edit.config import ConfigError
from lightning_edit.tokens import pad_id

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TXT_DOCUMENTS = ("lines", "file")
PACKING_CHOICES = (True, False, "auto")


class CorpusError(ConfigError):
    """The training text cannot be used: a missing path, field, column or split, or no text."""


# --- reading documents ---------------------------------------------------------------------------


def _read_file(path: Path, text_field: str, txt_documents: str = "lines") -> list[str]:
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        if txt_documents == "file":
            return [text] if text.strip() else []
        return [line for line in text.splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise CorpusError(
                        f"{path}:{lineno}: no field '{text_field}' (data.text_field); fields: {fields}"
                    )
                if not isinstance(record[text_field], str):
                    raise CorpusError(
                        f"{path}:{lineno}: field '{text_field}' holds {type(record[text_field]).__name__}, "
                        "expected text"
                    )
                docs.append(record[text_field])
        return docs
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise CorpusError(f"{path}: not a readable parquet file ({exc})") from None
        if text_field not in schema.names:
            raise CorpusError(f"{path}: no column '{text_field}' (data.text_field); columns: {schema.names}")
        kind = schema.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise CorpusError(f"{path}: column '{text_field}' holds {kind}, expected text (string)")
        column = pq.read_table(path, columns=[text_field]).column(text_field)
        return [t for t in column.to_pylist() if t is not None]
    raise CorpusError(f"{path}: unsupported file type '{path.suffix}'; expected one of {TEXT_SUFFIXES}")


def is_saved_dataset(path: str | Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    path = Path(path)
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def _import_datasets(why: str):
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{why} needs the `datasets` package (pip install datasets)") from None
    return datasets


def load_saved_dataset(path: str | Path, text_field: str, split: str = "train"):
    """The ``split`` of a ``save_to_disk`` folder, checked to hold a text column ``text_field``."""
    datasets = _import_datasets(f"data.path {path} (a save_to_disk folder)")
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise CorpusError(f"{path}: cannot read this save_to_disk folder ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise CorpusError(f"{path}: no split '{split}' (data.split); splits: {sorted(ds)}")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise CorpusError(f"{path}: no column '{text_field}' (data.text_field); columns: {ds.column_names}")
    feature = ds.features[text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise CorpusError(f"{path}: column '{text_field}' holds {feature}, expected text (string)")
    return ds


def read_documents(
    path: str | Path, text_field: str = "text", txt_documents: str = "lines", split: str = "train"
) -> list[str]:
    """Documents from a local file, a ``save_to_disk`` folder, or every supported file in a folder
    (sorted, recursive)."""
    if txt_documents not in TXT_DOCUMENTS:
        raise CorpusError(f"data.txt_documents must be one of {TXT_DOCUMENTS}, got {txt_documents!r}")
    path = Path(path)
    if is_saved_dataset(path):
        ds = load_saved_dataset(path, text_field, split)
        return [t for t in ds[text_field] if t is not None]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise CorpusError(
                f"{path}: folder has no {', '.join(TEXT_SUFFIXES)} files and is not a save_to_disk folder"
            )
        return [doc for f in files for doc in _read_file(f, text_field, txt_documents)]
    if not path.is_file():
        raise CorpusError(f"data.path '{path}' does not exist")
    return _read_file(path, text_field, txt_documents)


def is_local_path(path: str) -> bool:
    """A path that exists, or one that is written like a file path (so a typo is not a hub lookup)."""
    p = Path(path)
    return p.exists() or p.suffix in TEXT_SUFFIXES or path.startswith((".", "/", "~"))


# --- tokenising into rows ------------------------------------------------------------------------


def _special_ids(tokenizer) -> tuple[int | None, int | None, int]:
    return tokenizer.bos_token_id, tokenizer.eos_token_id, pad_id(tokenizer)


def special_template(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the ids the tokenizer adds around a document with ``add_special_tokens``
    (BOS for Llama, nothing for GPT-2), found by encoding a probe both ways."""
    probe = "hello world"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for i in range(len(with_special) - len(bare) + 1):
        if with_special[i : i + len(bare)] == bare:
            return with_special[:i], with_special[i + len(bare) :]
    return [], []  # a template that rewrites the text itself: add nothing


def encode_documents(docs: list[str], tokenizer, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> (flat ids int32, offsets [n_docs + 1] int64), no special tokens; empty
    documents (no tokens) are dropped. A progress bar shows on corpora of 100k+ documents."""
    from tqdm.auto import tqdm

    flats, lengths = [], []
    for i in tqdm(range(0, len(docs), chunk), desc="tokenizing", unit="chunk", disable=len(docs) < 100_000):
        ids = tokenizer(docs[i : i + chunk], add_special_tokens=False)["input_ids"]
        ids = [x for x in ids if x]
        lengths.append(np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids)))
        flats.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32))
    lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(lengths_all) + 1, dtype=np.int64)
    np.cumsum(lengths_all, out=offsets[1:])
    flat = np.concatenate(flats) if flats else np.zeros(0, dtype=np.int32)
    return flat, offsets


# data.packing=auto packs when one document per row would truncate more than this share of the
# corpus's tokens. Measured: the embedded worlds' corpora (one fact sentence per line) are 9 tokens
# at the median and 11 at the 90th percentile with BOS (toyworld; toyworld-small 9 / 10), 13 / 16
# with GPT-2's byte-level BPE and no BOS (toyworld-gpt2), so at context 64 nothing is truncated and
# they stay one sentence per row, which is what their LMs were trained on (packed, their clean CE
# rises from 1.01 to 2.52 on toyworld-small and from 0.45 to 2.48 on toyworld-gpt2; FINDINGS.md saw
# worse than uniform on another world); a whole-file .txt truncates ~100% and is packed. Below 10%, one document per row loses little text and never puts
# unrelated documents in one context; above it, packing is what keeps the corpus.
PACKING_TRUNCATION_LIMIT = 0.10


def packing_rule(doc_lengths: np.ndarray, context_length: int) -> tuple[bool, str]:
    """(pack?, one line saying why) from the corpus's document lengths in tokens (one row each)."""
    doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
    truncated = float(np.clip(doc_lengths - context_length, 0, None).sum() / max(doc_lengths.sum(), 1))
    p50, p90 = np.percentile(doc_lengths, [50, 90])
    pack = truncated > PACKING_TRUNCATION_LIMIT
    facts = (f"documents are {p50:.0f} tokens at the median and {p90:.0f} at the 90th percentile "
             f"(context {context_length}); one per row would truncate {truncated:.1%} of their tokens")
    if pack:
        return True, f"data.packing=auto: packing, {facts} (data.packing=false keeps one document per row)"
    return False, (f"data.packing=auto: not packing, {facts}, so each stays an independent row as a model "
                   "trained on single documents sees it (data.packing=true packs them)")


def resolve_packing(packing: Any) -> bool | str:
    """``packing`` as True, False or "auto" (None, the old default, reads as "auto")."""
    if packing is None:
        return "auto"
    if packing in PACKING_CHOICES and not (isinstance(packing, int) and not isinstance(packing, bool)):
        return packing
    raise CorpusError(f"data.packing must be true, false or auto, got {packing!r}")


def rows_from_encoded(
    flat: np.ndarray, offsets: np.ndarray, tokenizer, context_length: int, packing: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded documents -> (input_ids [N, L] int32, lengths [N] long), right-padded with the pad id."""
    if context_length < 2:
        raise CorpusError(f"data.context_length must be >= 2, got {context_length}")
    bos, eos, pad = _special_ids(tokenizer)
    n_docs = len(offsets) - 1
    if n_docs == 0:
        raise CorpusError("the corpus has no documents with text")
    if packing:
        # Documents joined with EOS after each, cut into rows of `body` tokens, BOS put first.
        joined = np.insert(flat, offsets[1:], eos) if eos is not None else flat
        prefix = 1 if bos is not None else 0
        body = context_length - prefix
        n = len(joined) // body  # the last partial chunk is dropped
        if n == 0:
            raise CorpusError(
                f"the corpus has {len(joined)} tokens, fewer than one row of data.context_length={context_length}"
            )
        chunks = torch.from_numpy(np.ascontiguousarray(joined[: n * body]).reshape(n, body))
        if prefix:
            chunks = torch.cat([torch.full((n, 1), bos, dtype=torch.int32), chunks], dim=1)
        return chunks, torch.full((n,), context_length, dtype=torch.long)
    head, tail = special_template(tokenizer)
    doc_lengths = np.diff(offsets) + len(head) + len(tail)
    truncated = int((doc_lengths > context_length).sum())
    if truncated:
        warnings.warn(
            f"{truncated} of {n_docs} documents are longer than data.context_length="
            f"{context_length} tokens and were truncated (packing is off)",
            stacklevel=2,
        )
    lengths = np.minimum(doc_lengths, context_length)
    rows = np.full((n_docs, int(lengths.max())), pad, dtype=np.int32)
    head_arr, tail_arr = np.asarray(head, dtype=np.int32), np.asarray(tail, dtype=np.int32)
    for i in range(n_docs):
        row = np.concatenate([head_arr, flat[offsets[i] : offsets[i + 1]], tail_arr])[:context_length]
        rows[i, : len(row)] = row
    return torch.from_numpy(rows), torch.from_numpy(lengths)


def tokenize_rows(
    docs: list[str], tokenizer, context_length: int, packing: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents -> (input_ids [N, L] int32, lengths [N] long), rows right-padded with the pad id."""
    flat, offsets = encode_documents(docs, tokenizer)
    return rows_from_encoded(flat, offsets, tokenizer, context_length, packing)


def make_batch(ids: torch.Tensor, lengths: torch.Tensor, **extra: Any) -> dict[str, Any]:
    """Rows -> {input_ids, attention_mask} trimmed to the longest row, plus ``extra`` entries."""
    width = int(lengths.max())
    ids = ids[:, :width].long()
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
    first rows of the unshuffled stream, whose documents training then skips). ``packing``: True,
    False or "auto" (``packing_rule`` on the corpus, or on a stream's first documents); after
    ``setup`` it is the decision and ``packing_note`` the line that explains an automatic one.
    """

    PACKING_SAMPLE_DOCS = 2048  # documents of a stream that decide data.packing=auto

    def __init__(
        self,
        tokenizer,
        path: str | None = None,
        world_corpus: str | Path | None = None,
        text_field: str = "text",
        txt_documents: str = "lines",
        hf_name: str | None = None,
        split: str = "train",
        streaming: bool = False,
        context_length: int = 64,
        packing: bool | str | None = "auto",
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
        if txt_documents not in TXT_DOCUMENTS:
            raise CorpusError(f"data.txt_documents must be one of {TXT_DOCUMENTS}, got {txt_documents!r}")
        self.text_field, self.txt_documents = text_field, txt_documents
        self.hf_name, self.split, self.streaming = hf_name, split, streaming
        self.context_length = context_length
        self.packing = resolve_packing(packing)
        self.packing_note: str | None = None
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.val_sequences = val_sequences
        self.num_workers, self.seed, self.pin_memory = num_workers, seed, pin_memory
        self.train_ids = self.train_lengths = self.val_ids = self.val_lengths = None
        self.stream = None  # a streamed datasets.IterableDataset, when the source is one

    # -- building rows --

    def source_description(self) -> str:
        return self.path or f"world corpus {self.world_corpus}"

    def setup(self, stage: str | None = None) -> None:
        """Read, tokenise and split the corpus (once); a user's mistake is a ``CorpusError``."""
        if self.train_ids is not None or self.stream is not None:
            return
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if self.path is None:
            if self.world_corpus is None:
                raise CorpusError(
                    "data.path is not set and the model is not an embedded world: give data.path "
                    "(a .txt/.jsonl/.parquet file, a folder of them, a save_to_disk folder, or a "
                    "Hugging Face dataset name)"
                )
            self._setup_rows(read_documents(self.world_corpus, self.text_field))
        elif (is_local_path(self.path) or is_saved_dataset(self.path)) and not self.streaming:
            self._setup_rows(read_documents(self.path, self.text_field, self.txt_documents, self.split))
        else:
            self._setup_stream()

    def _decide_packing(self, doc_lengths: np.ndarray) -> bool:
        if self.packing == "auto":
            self.packing, self.packing_note = packing_rule(doc_lengths, self.context_length)
        return self.packing

    def _setup_rows(self, docs: list[str]) -> None:
        if not docs:
            raise CorpusError(f"{self.source_description()}: no documents (the corpus is empty)")
        flat, offsets = encode_documents(docs, self.tokenizer)
        if len(offsets) == 1:
            raise CorpusError(f"{self.source_description()}: no document has any text to tokenise")
        head, tail = special_template(self.tokenizer)
        self._decide_packing(np.diff(offsets) + len(head) + len(tail))
        ids, lengths = rows_from_encoded(flat, offsets, self.tokenizer, self.context_length, self.packing)
        n_val = min(self.val_sequences, len(ids) // 2)
        order = _permutation(len(ids), self.seed, SPLIT)
        val, train = order[:n_val].sort().values, order[n_val:].sort().values
        self.val_ids, self.val_lengths = ids[val], lengths[val]
        self.train_ids, self.train_lengths = ids[train], lengths[train]

    def _check_record(self, record: dict) -> str:
        if self.text_field not in record:
            raise CorpusError(
                f"{self.path}: records have no field '{self.text_field}' (data.text_field); "
                f"fields: {sorted(record)}"
            )
        return str(record[self.text_field])

    def _setup_stream(self) -> None:
        source = self._load_stream()
        if self.packing == "auto":
            sample = [self._check_record(r) for r in source.take(self.PACKING_SAMPLE_DOCS)]
            _, offsets = encode_documents(sample, self.tokenizer)
            if len(offsets) == 1:
                raise CorpusError(f"{self.path}: the stream's first documents have no text")
            head, tail = special_template(self.tokenizer)
            self._decide_packing(np.diff(offsets) + len(head) + len(tail))
        val_rows, docs_used, buffer = [], 0, []
        for record in source:
            if len(val_rows) >= self.val_sequences:
                break
            buffer.append(self._check_record(record))
            docs_used += 1
            try:
                ids, lengths = tokenize_rows(buffer, self.tokenizer, self.context_length, self.packing)
            except CorpusError:
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
        path = self.path
        datasets = _import_datasets(f"streaming data.path {path}")
        if is_saved_dataset(path):
            return load_saved_dataset(path, self.text_field, self.split).to_iterable_dataset()
        kwargs: dict[str, Any] = {"split": self.split, "streaming": True}
        if is_local_path(path):  # a local file or folder, streamed through a datasets builder
            p = Path(path)
            if not p.exists():
                raise CorpusError(f"data.path '{p}' does not exist")
            files = (
                sorted(str(f) for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES) if p.is_dir() else [str(p)]
            )
            if not files:
                raise CorpusError(f"{p}: no {', '.join(TEXT_SUFFIXES)} files")
            builder = {".txt": "text", ".jsonl": "json", ".parquet": "parquet"}[Path(files[0]).suffix]
            path, kwargs = builder, {"data_files": {"train": files}, "split": "train", "streaming": True}
            if builder == "text" and self.txt_documents == "file":
                kwargs["sample_by"] = "document"
        elif self.hf_name:
            kwargs["name"] = self.hf_name
        try:
            return datasets.load_dataset(path, **kwargs)
        except (ConnectionError, OSError, FileNotFoundError) as exc:
            offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
            raise CorpusError(
                f"cannot stream dataset '{self.path}' (split '{self.split}')"
                f"{' in offline mode' if offline else ''}: {exc}. Without network access, point "
                "data.path at local .txt/.jsonl/.parquet files or a save_to_disk folder."
            ) from exc

    def rows_fingerprint(self) -> str:
        """A hash of the training rows (corpus, tokenizer, context, packing and split all shape
        them): the corpus part of the activation cache's key."""
        import hashlib

        self.setup()
        if self.train_ids is None:
            raise CorpusError("data.activation_cache needs a local corpus (not data.streaming)")
        digest = hashlib.sha256()
        for tensor in (self.train_ids, self.train_lengths):
            digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

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
        return {"seed": self.seed, "batch_size": self.batch_size, "context_length": self.context_length,
                "packing": self.packing}

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
