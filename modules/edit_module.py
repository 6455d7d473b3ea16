"""`EditModule`: one training step = one edit (or batch) through an `Editor`, manual optimisation.

The module owns no weights of its own: the editor holds the model and everything the method
changes, so a Lightning checkpoint carries `editor.state_dict()` (plus the scorer's cache of the
unedited model's locality predictions and the results so far) instead of the model's weights.
Restoring one onto an editor built over a fresh base model reproduces the edited state exactly; the
resumable `EditStream` then continues with the first edit not yet applied.

Metrics (METHODS.md section 3), logged with step = T (edits so far):
- `edit/rel`, `edit/gen`, `edit/loc`, `edit/rel_em`, `edit/gen_em`: final-state protocol, every
  edit so far scored on the model as it is at checkpoint T (`eval.checkpoints`, and the stream's end);
- `edit_immediate/*`: immediate protocol, the mean over edits so far of each edit's score taken
  right after it was applied;
- `edit/seconds_per_edit` and `edit/steps` at every step.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch
from lightning import LightningModule

from lightning_edit.callbacks.common import crossed, log_metrics
from lightning_edit.data import EditRecord
from lightning_edit.editors.base import Editor
from lightning_edit.metrics import EditScorer
from lightning_edit.results import FINAL, IMMEDIATE

IMMEDIATE_WEIGHTS = {"rel": "n", "rel_em": "n", "gen": "n_gen", "gen_em": "n_gen", "loc": "n_loc",
                     "rel_ppl": "n_hallucination"}
"""How many records each immediate metric averages over (the weight when pooling steps)."""


class _EditCounter(torch.optim.Optimizer):
    """A no-op optimizer stepped once per edit step.

    Under manual optimisation Lightning counts `global_step` (max_steps, checkpoint intervals) in
    optimizer steps; the editors run their own optimisation inside `apply`.
    """

    def __init__(self) -> None:
        super().__init__([torch.zeros(())], {})

    def step(self, closure=None):  # noqa: D102 - nothing to update
        return closure() if closure is not None else None


def _pool(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """Record-weighted mean of per-step score dicts, skipping NaN (metric absent in that step)."""
    out = {}
    for metric, weight_key in IMMEDIATE_WEIGHTS.items():
        total = weight = 0.0
        for s in scores:
            value, w = s.get(metric), s.get(weight_key, s.get("n", 1))
            if value is None or w is None or (isinstance(value, float) and math.isnan(value)) or not w:
                continue
            total += value * w
            weight += w
        if weight:
            out[metric] = total / weight
    return out


class EditModule(LightningModule):
    """Applies a stream of edits through `editor`, scores them with `scorer`, keeps the results rows.

    checkpoints: edit counts T at which the final-state evaluation runs (also at the stream's end).
    immediate: also score each step's records right after they are applied.
    """

    def __init__(self, editor: Editor, scorer: EditScorer, checkpoints: Sequence[int] = (1, 10, 100, 1000),
                 immediate: bool = True):
        super().__init__()
        self.automatic_optimization = False
        self.editor = editor  # a plain object, not a submodule: the model's weights are not ours to save
        self.scorer = scorer
        self.checkpoints = sorted({int(t) for t in checkpoints})
        self.immediate = immediate
        self.edited_records: list[EditRecord] = []
        self.edit_seconds: list[float] = []
        self.immediate_scores: list[dict[str, float]] = []
        self.rows: list[dict[str, Any]] = []
        self.stream_length: int | None = None

    # Lightning plumbing ------------------------------------------------------------------------

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _EditCounter()

    def setup(self, stage: str) -> None:
        """Cache the unedited model's locality predictions over the whole stream, before any edit
        (setup runs before a checkpoint is restored, so the model here is the base model)."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        records = getattr(datamodule, "records", None)
        if records is None:
            raise RuntimeError("EditModule needs an EditStream datamodule (trainer.fit(module, datamodule=stream))")
        self.stream_length = len(records)
        if self.editor.ledger:
            raise RuntimeError("EditModule.setup: the editor has edits already; the scorer needs the unedited model")
        # The base model itself, outside `edited()`: Loc counts whatever the method changes on
        # unrelated inputs, a spliced component's reconstruction error included.
        self.scorer.prepare(self.editor.model, records)

    def on_train_epoch_start(self) -> None:
        if self.current_epoch > 0:
            raise RuntimeError("an edit stream is one epoch: a second would apply every edit again")

    def training_step(self, batch: list[EditRecord], batch_idx: int) -> None:
        if len(batch) > 1 and not self.editor.supports_batch:
            raise ValueError(f"editor '{self.editor.name}' edits one record at a time; set data.batch_size=1")
        start = time.perf_counter()
        entries = self.editor.apply(batch)
        seconds = time.perf_counter() - start
        self.optimizers().step()
        self.edited_records.extend(batch)
        self.edit_seconds.extend([seconds / len(batch)] * len(batch))
        t = len(self.edited_records)
        metrics = {"edit/seconds_per_edit": seconds / len(batch),
                   "edit/steps": sum(e.steps for e in entries) / max(1, len(entries))}
        if self.immediate:
            with self.editor.edited() as model:
                scores = self.scorer.score(model, batch, edited=self.edited_records)
            self.immediate_scores.append(scores)
            metrics.update({f"edit_step_immediate/{k}": v for k, v in scores.items() if k in IMMEDIATE_WEIGHTS})
        self._log(metrics, t)
        if crossed(self.checkpoints, t, len(batch)) or t == self.stream_length:
            self.evaluate()

    def on_train_end(self) -> None:
        # A run stopped early (max_steps, a limit) still reports where it ended.
        if self.edited_records and (not self.rows or self.rows[-1]["T"] != len(self.edited_records)):
            self.evaluate()

    # Evaluation ------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Final-state scores of every edit so far, beside the pooled immediate scores; logs and
        keeps the row."""
        t = len(self.edited_records)
        with self.editor.edited() as model:
            final = self.scorer.score(model, self.edited_records)
        immediate = _pool(self.immediate_scores) if self.immediate_scores else None
        row = {"T": t, FINAL: final, IMMEDIATE: immediate,
               "seconds_per_edit": sum(self.edit_seconds) / len(self.edit_seconds)}
        self.rows.append(row)
        metrics = {f"edit/{k}": v for k, v in final.items()}
        metrics.update({f"edit_immediate/{k}": v for k, v in (immediate or {}).items()})
        metrics["edit/mean_seconds_per_edit"] = row["seconds_per_edit"]
        self._log(metrics, t)
        return row

    def _log(self, metrics: dict[str, float], step: int) -> None:
        """Straight to the loggers with step = T (`callbacks.common.log_metrics`); a line at checkpoints."""
        clean = log_metrics(self.trainer, metrics, step)
        if "edit/rel" in clean:
            self.print(f"T={step}: " + ", ".join(f"{k.split('/')[-1]} {clean[k]:.3f}" for k in
                                                 ("edit/rel", "edit/gen", "edit/loc") if k in clean))

    # Checkpoints: the edit state instead of the model's weights ---------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["edit"] = {
            "method": self.editor.name,
            "base_fingerprint": self.editor.ctx.base_fingerprint,
            "editor": self.editor.state_dict(),
            "scorer": self.scorer.state_dict(),
            "records": [r.to_dict() for r in self.edited_records],
            "edit_seconds": list(self.edit_seconds),
            "immediate_scores": [dict(s) for s in self.immediate_scores],
            "rows": [dict(r) for r in self.rows],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("edit")
        if state is None:
            raise ValueError("not an edit-stream checkpoint (no 'edit' entry)")
        if state["method"] != self.editor.name:
            raise ValueError(f"checkpoint of method '{state['method']}' cannot resume editor '{self.editor.name}'")
        saved, now = state.get("base_fingerprint"), self.editor.ctx.base_fingerprint
        if saved and now and saved != now:
            raise ValueError(f"the checkpoint's edits were made on another base model (weights fingerprint "
                             f"{saved}, this model's {now})")
        self.editor.load_state_dict(state["editor"])
        self.scorer.load_state_dict(state["scorer"])
        self.edited_records = [EditRecord.from_dict(r) for r in state["records"]]
        self.edit_seconds = list(state["edit_seconds"])
        self.immediate_scores = list(state["immediate_scores"])
        self.rows = list(state["rows"])
