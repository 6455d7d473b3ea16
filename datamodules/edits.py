"""`EditStream`: the lifelong edit stream as a LightningDataModule (METHODS.md section 3).

Records are read and validated in full at `setup` (a malformed record stops the run before any
edit), put in a seeded order, cut to the first T, and served in batches (lists of `EditRecord`) in
that order: the DataLoader never shuffles. The loader is resumable: its state is the number of
batches the training loop has taken, so a run restored from a mid-stream checkpoint continues with
the next unapplied edit.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import Any, Iterator

from lightning import LightningDataModule
from torch.utils.data import DataLoader, Sampler

from lightning_edit.data import EditRecord, read_edits
from lightning_edit.errors import UserError, blame


def default_edit_path(model_name: str) -> Path:
    """The embedded world's CounterFact export for a world model name; any other model has none."""
    from lightning_edit.world import WORLD_NAMES, load_world

    if model_name not in WORLD_NAMES:
        raise UserError(
            f"data.path is not set and model.name={model_name!r} is not an embedded world "
            f"({', '.join(WORLD_NAMES)}), so there are no default edits: set data.path to a ZsRE, "
            "CounterFact, EasyEdit/KnowEdit or SelfCheckGPT file"
        )
    return load_world(model_name).counterfact_path


def stream_order(n: int, seed: int) -> list[int]:
    """The seeded permutation of record indices 0..n-1 the stream follows."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _as_list(batch: list[EditRecord]) -> list[EditRecord]:
    """Collate: a batch is the list of records itself (nothing to stack)."""
    return batch


class _StreamBatches(Sampler[list[int]]):
    """Consecutive batches of stream positions, from batch `start` on.

    `len` is the whole stream's batch count even after a resume: Lightning restores how many
    batches of the epoch are done and counts on from there.
    """

    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size, self.start = n, batch_size, 0

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start, len(self)):
            yield list(range(b * self.batch_size, min((b + 1) * self.batch_size, self.n)))

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)


class _StreamLoader(DataLoader):
    """A DataLoader with Lightning's `state_dict` / `load_state_dict` (resumable loader) protocol.

    The state is the number of batches handed to `training_step` (counted by `EditStream`), not the
    number fetched: Lightning prefetches one batch ahead of the step it checkpoints after.
    """

    def __init__(self, stream: "EditStream", **kwargs: Any):
        super().__init__(**kwargs)
        self._stream = stream

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": self._stream.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.start = self._stream.batches_done = int(state["batches_done"])


class EditStream(LightningDataModule):
    """A seeded, limited, batched stream of edit records.

    path: edit file (format by `format`, or detected); None = the embedded world's CounterFact
    export when `model_name` is a world. order_seed: seeds the permutation. limit: T, the number of
    edits (None = all). batch_size: records per step (>1 only for editors with `supports_batch`).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        format: str = "auto",
        order_seed: int = 0,
        batch_size: int = 1,
        limit: int | None = None,
        model_name: str | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise UserError(f"data.batch_size is {batch_size} (expected >= 1)")
        if limit is not None and limit < 1:
            raise UserError(f"data.limit is {limit} (expected >= 1, or null for the whole file)")
        self.path = Path(path) if path is not None else None
        self.model_name = model_name
        self.format = format
        self.order_seed = order_seed
        self.batch_size = batch_size
        self.limit = limit
        self.records: list[EditRecord] | None = None
        """The stream, in order, after `setup`."""
        self.batches_done = 0

    def setup(self, stage: str | None = None) -> None:
        """Read and validate the whole file (raises `EditDataError` naming file, record, field)."""
        if self.records is not None:
            return
        if self.path is None:
            if self.model_name is None:
                raise ValueError("data.path is not set and no model name was given to find default edits")
            self.path = default_edit_path(self.model_name)
        with blame(f"data.path={self.path}"):  # missing, a folder, unreadable: the file's fault
            records = read_edits(self.path, format=self.format)
        if not records:
            raise UserError(f"{self.path}: no edit records")
        order = stream_order(len(records), self.order_seed)
        self.records = [records[i] for i in order[: self.limit]]

    @property
    def num_edits(self) -> int:
        """T: how many edits the stream holds (after `setup`)."""
        return len(self._records())

    def _records(self) -> list[EditRecord]:
        if self.records is None:
            raise RuntimeError("EditStream.setup() has not run yet")
        return self.records

    def train_dataloader(self) -> DataLoader:
        records = self._records()
        return _StreamLoader(
            self,
            dataset=records,
            batch_sampler=_StreamBatches(len(records), self.batch_size),
            collate_fn=_as_list,
            num_workers=0,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called once per batch right before its training step (after any prefetch).
        self.batches_done += 1
        return batch

    def fingerprint(self, n: int | None = None) -> str:
        """A hash of the first n records of the ordered stream (all by default)."""
        digest = hashlib.sha256()
        for record in self._records()[:n]:
            digest.update(json.dumps([record.case_id, record.prompt, record.target_new]).encode())
        return digest.hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        applied = min(self.batches_done * self.batch_size, self.num_edits) if self.records is not None else 0
        return {
            "path": str(self.path),
            "order_seed": self.order_seed,
            "batch_size": self.batch_size,
            "applied": applied,
            "fingerprint": self.fingerprint(applied) if self.records is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check that a resumed run streams the records already applied in the same order and
        batches (a longer stream with the same prefix, e.g. a larger T, is fine)."""
        applied = int(state.get("applied", 0))
        problems = []
        if state.get("batch_size") != self.batch_size:
            problems.append(f"batch_size: checkpoint {state.get('batch_size')}, now {self.batch_size}")
        if applied > self.num_edits:
            problems.append(f"the checkpoint applied {applied} edits, this stream holds {self.num_edits}")
        elif state.get("fingerprint") != self.fingerprint(applied):
            problems.append(f"the first {applied} records differ")
        if problems:
            raise UserError(
                f"cannot resume: the checkpoint's edit stream ({state.get('path')}, order_seed="
                f"{state.get('order_seed')}) differs from this run's ({self.path}, order_seed="
                f"{self.order_seed}): {'; '.join(problems)}"
            )
