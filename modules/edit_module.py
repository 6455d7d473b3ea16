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
- `edit/seconds_per_edit` and `edit/steps` at every step;
- `edit/landed`: the share of edits so far whose target was the argmax (every target token, teacher
  forced) right after the edit (`LedgerEntry.landed`, set here after each `apply`); results rows
  carry it as `landed` (and `landed_n`, `edits`).

Every edit is checked before the stream goes on (`check_edit`): the parameters its ledger entry
says it changed, and the edited model's logits on its prompt, must be finite. An edit that wrote
NaN or Inf is refused: rolled back (`Editor.rollback` where the method has it, else the editor's
state from before the edit is restored), its ledger entry marked `status="failed"`, and then the
stream goes on (`on_nonfinite="skip"`) or stops with an `EditStepError` (`"stop"`). An exception
inside `apply` is undone the same way and raised as an `EditStepError` naming the record's place in
its file; the stream position is not advanced, so a checkpoint saved then resumes at that record.
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
from lightning_edit.errors import EditStepError, describe
from lightning_edit.jobs.validate import NONFINITE_CHOICES, record_place
from lightning_edit.tokens import encode, pad_id, right_padded
from lightning_edit.metrics import EditScorer
from lightning_edit.results import FINAL, IMMEDIATE, landed_share

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
                 immediate: bool = True, on_nonfinite: str = "stop"):
        super().__init__()
        if on_nonfinite not in NONFINITE_CHOICES:
            raise ValueError(f"on_nonfinite is {on_nonfinite!r}; expected one of {', '.join(NONFINITE_CHOICES)}")
        self.on_nonfinite = on_nonfinite
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
        self.failed_edits = 0
        """Edits refused for writing NaN or Inf (rolled back, ledger status "failed")."""

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
        before = len(self.editor.ledger)
        snapshot = None if self.editor.supports_rollback else _detached(self.editor.state_dict())
        start = time.perf_counter()  # s/edit times the edit alone, not the guard around it
        try:
            entries = self.editor.apply(batch)
        except Exception as exc:
            self._undo(before, snapshot)
            self._not_applied()
            raise EditStepError(f"{_places(batch)}: editing failed at stream position {len(self.edited_records)} "
                                f"({type(exc).__name__}: {describe(exc)})") from exc
        seconds = time.perf_counter() - start
        problem = self.check_edit(batch, entries)
        if problem is not None:
            failed = self.editor.ledger[before:] or entries
            self._undo(before, snapshot, failed)
            self.failed_edits += len(batch)
            self.print(f"refused: {_places(batch)}: {problem}; the edit is rolled back (ledger status 'failed')")
            if self.on_nonfinite == "stop":
                self._not_applied()
                raise EditStepError(f"{_places(batch)}: {problem}; the edit was refused and rolled back "
                                    "(on_nonfinite=stop; on_nonfinite=skip records it as failed and goes on)")
        if problem is None:
            self.editor.mark_landed(entries, self.scorer.batch_size)
        else:
            for entry in self.editor.ledger[before:]:
                entry.landed = False
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

    # Guarding each edit ---------------------------------------------------------------------

    @torch.no_grad()
    def check_edit(self, batch: list[EditRecord], entries: Sequence[Any]) -> str | None:
        """Why the edit just applied cannot stand (NaN or Inf in what it wrote), or None."""
        params = dict(self.editor.model.named_parameters())
        for entry in entries:
            if isinstance(entry.delta_norm, float) and not math.isfinite(entry.delta_norm):
                return f"the edit's delta norm is {entry.delta_norm}"
            for name in entry.changed:
                tensor = params.get(name)
                if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    return f"the edited parameter '{name}' holds NaN or Inf"
        tokenizer = self.editor.tokenizer
        ids, mask = right_padded([encode(tokenizer, r.prompt) for r in batch], pad_id(tokenizer), self.editor.device)
        with self.editor.edited() as model:
            logits = model(input_ids=ids, attention_mask=mask).logits
        if not bool(torch.isfinite(logits[mask.bool()]).all()):
            return "the edited model's logits on the edit prompt hold NaN or Inf"
        return None

    def _undo(self, before: int, snapshot: dict[str, Any] | None, failed: Sequence[Any] = ()) -> None:
        """Take back what the step's edit wrote; keep `failed` entries in the ledger marked failed."""
        added = self.editor.ledger[before:]
        if snapshot is not None:
            self.editor.load_state_dict(snapshot)
        else:
            for entry in reversed(added):
                self.editor.rollback(entry.edit_id)
            del self.editor.ledger[before:]
        for entry in failed:
            entry.status = "failed"
            self.editor.ledger.append(entry)

    def _not_applied(self) -> None:
        """The batch in progress does not count as streamed: a checkpoint saved now resumes at it."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and getattr(datamodule, "batches_done", 0) > 0:
            datamodule.batches_done -= 1

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
               "seconds_per_edit": sum(self.edit_seconds) / len(self.edit_seconds), **landed_share(self.editor.ledger)}
        self.rows.append(row)
        metrics = {f"edit/{k}": v for k, v in final.items()}
        metrics.update({f"edit_immediate/{k}": v for k, v in (immediate or {}).items()})
        metrics["edit/mean_seconds_per_edit"] = row["seconds_per_edit"]
        if row.get("landed") is not None:
            metrics["edit/landed"] = row["landed"]
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
            "failed_edits": self.failed_edits,
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
        self.failed_edits = int(state.get("failed_edits", 0))


def _places(batch: Sequence[EditRecord]) -> str:
    return "; ".join(record_place(r) for r in batch)


def _detached(obj: Any) -> Any:
    """A copy of a state dict that later in-place edits cannot change (tensors cloned)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_detached(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_detached(v) for v in obj)
    return obj
