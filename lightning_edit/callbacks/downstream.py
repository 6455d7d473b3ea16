"""`DownstreamEval`: general-ability tasks on the model as edited at chosen T, against T = 0.

Logged with step = T: `downstream/<task>` (the task's headline score), `downstream/<task>_delta`
(change from the T = 0 baseline) and `downstream/<task>_seconds` (what that evaluation cost now; 0
for a cached score). Scores are cached per (model state, task, limit), the state being a fingerprint
of the edited model's parameters and the editor's ledger length.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from lightning.pytorch.utilities import rank_zero_warn

from lightning_edit.downstream import DownstreamSuite, TaskScore, editor_fingerprint

from .common import CheckpointEval, edit_count, log_metrics


class DownstreamEval(CheckpointEval):
    """Evaluate `suite` before the first edit (the baseline) and when T reaches each of `at`
    (and the stream's end with `at_end`), inside `pl_module.editor.edited()`."""

    def __init__(self, suite: DownstreamSuite, at: Sequence[int], at_end: bool = True):
        self.suite = suite
        self.at = sorted({int(t) for t in at if int(t) > 0})
        self.at_end = at_end
        self.baseline: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        """One row per evaluation: {"T": t, "<task>": score, "<task>_seconds": s, ...}."""

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        t = edit_count(pl_module)
        if t == 0 and 0 not in self.done:
            self.evaluate(trainer, pl_module)
        elif not self.baseline:
            rank_zero_warn(f"DownstreamEval: the run starts at T={t} with no T=0 baseline in its checkpoint; "
                           "downstream/<task>_delta will not be logged")

    def evaluate(self, trainer, pl_module) -> dict[str, TaskScore]:
        """Score every task on the model as edited now; log and keep the row."""
        t = edit_count(pl_module)
        editor = pl_module.editor
        start = time.perf_counter()
        with editor.edited() as model:
            state = editor_fingerprint(editor, model)
            scores = self.suite.evaluate(model, editor.tokenizer, state)
        seconds = time.perf_counter() - start
        if t == 0:
            self.baseline = {task: s.score for task, s in scores.items()}
        row: dict[str, Any] = {"T": t}
        metrics: dict[str, float] = {}
        for task, s in scores.items():
            row[task] = s.score
            row[f"{task}_seconds"] = 0.0 if s.cached else s.seconds
            metrics[f"downstream/{task}"] = s.score
            metrics[f"downstream/{task}_seconds"] = row[f"{task}_seconds"]
            if task in self.baseline:
                row[f"{task}_delta"] = s.score - self.baseline[task]
                metrics[f"downstream/{task}_delta"] = row[f"{task}_delta"]
        metrics["downstream/seconds"] = seconds
        self.history.append(row)
        log_metrics(trainer, metrics, step=t)
        pl_module.print(f"T={t}: downstream " + ", ".join(
            f"{task} {s.score:.3f}"
            + (f" ({row[f'{task}_delta']:+.3f})" if t > 0 and f"{task}_delta" in row else "")
            + (" cached" if s.cached else f" {s.seconds:.1f}s") for task, s in scores.items()))
        return scores

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": dict(self.baseline), "history": [dict(r) for r in self.history],
                "cache": self.suite.cache.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline = dict(state_dict.get("baseline", {}))
        self.history = [dict(r) for r in state_dict.get("history", [])]
        self.suite.cache.load_state_dict(state_dict.get("cache", {}))
