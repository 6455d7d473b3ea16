"""What the callbacks share: the edit count T, when a checkpoint is crossed, logging with step = T,
the folder plots and tables go to (beside the CSV log), and evaluating at checkpoints of T."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from lightning import Callback


def edit_count(pl_module: Any) -> int:
    """T: edits applied so far (EditModule's records; else the editor's ledger)."""
    records = getattr(pl_module, "edited_records", None)
    if records is not None:
        return len(records)
    return len(pl_module.editor.ledger)


def stream_length(trainer: Any, pl_module: Any) -> int | None:
    """How many edits the stream holds, when known."""
    length = getattr(pl_module, "stream_length", None)
    if length is not None:
        return length
    records = getattr(getattr(trainer, "datamodule", None), "records", None)
    return len(records) if records is not None else None


def stream_records(trainer: Any) -> list:
    """The stream's records (EditStream after setup), or [] when there is no such datamodule."""
    return list(getattr(getattr(trainer, "datamodule", None), "records", None) or [])


def crossed(at: Sequence[int], t: int, batch: int) -> bool:
    """True when the step that brought the count to `t` (`batch` records) passed a T in `at`."""
    return any(t - batch < c <= t for c in at)


def log_metrics(trainer: Any, metrics: dict[str, Any], step: int) -> dict[str, float]:
    """Straight to every logger with step = T (Lightning's own step counts batches, not edits); the
    numbers logged (booleans and NaN left out) are returned."""
    clean = {k: float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))}
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=step)
    return clean


def run_dir(trainer: Any) -> Path:
    """Where plots and tables go: the CSV logger's folder (beside metrics.csv), else the run's root."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            return Path(logger.log_dir)
    return Path(trainer.default_root_dir)


def wandb_loggers(trainer: Any) -> list:
    from lightning.pytorch.loggers import WandbLogger

    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class CheckpointEval(Callback):
    """A callback that evaluates the edited model when T reaches each of `at` (and the stream's end
    with `at_end`, also when a run stops early), once per T. Subclasses set `at`, `at_end` and
    `history` (rows with a "T") and define `evaluate(trainer, pl_module)`."""

    at: list[int]
    at_end: bool
    history: list[dict[str, Any]]

    @property
    def done(self) -> set[int]:
        return {int(row["T"]) for row in self.history}

    def evaluate(self, trainer, pl_module) -> Any:
        raise NotImplementedError

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        t = edit_count(pl_module)
        end = self.at_end and t == stream_length(trainer, pl_module)
        if (crossed(self.at, t, len(batch)) or end) and t not in self.done:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        # A run stopped early (max_steps) still gets its last state scored.
        t = edit_count(pl_module)
        if trainer.is_global_zero and self.at_end and t > 0 and t not in self.done:
            self.evaluate(trainer, pl_module)
