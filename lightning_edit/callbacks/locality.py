"""`LocalityEval`: drift on held-out prompts, against the model before its first edit.

The reference is captured in `setup`, before a checkpoint is restored, from the base model itself
(`editor.model` outside `editor.edited()`, as the stream's Loc is), so the numbers count everything
the method changes on unrelated inputs, a spliced component's reconstruction error included; it is
saved in the callback's checkpoint state. Logged with step = T at T = 0 and each checkpoint:
`locality/agreement` (argmax tokens unchanged), `locality/kl` (mean KL(unedited || edited) of the
next-token distributions over all positions), `locality/seconds`.

Where the prompts come from, first that yields any: `prompts` as given; corpus lines (`candidates`)
that mention no subject of the stream; the dataset's own neighbourhood prompts (the stream records'
locality prompts) that mention none; the embedded world's fact prompts (`world_prompts`) that mention
none. `source` names the one used. When none yields a prompt, `unavailable` says why, the run goes on
without this evaluation and its results say "Loc unavailable".
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from lightning.pytorch.utilities import rank_zero_warn

from lightning_edit.downstream import LocalityReference, capture_reference, compare, held_out_prompts

from .common import CheckpointEval, edit_count, log_metrics, stream_records


class LocalityEval(CheckpointEval):
    """prompts: the held-out prompts as given; else `n_prompts` (seeded) that mention no subject of
    the stream, from `candidates` (corpus lines), else the stream's locality prompts, else
    `world_prompts` (module docstring)."""

    def __init__(self, at: Sequence[int], at_end: bool = True, prompts: Sequence[str] | None = None,
                 candidates: Sequence[str] | None = None, n_prompts: int = 200, seed: int = 0,
                 batch_size: int = 32, topk: int | None = None, max_reference_elements: int = 1 << 26,
                 world_prompts: Sequence[str] | None = None):
        self.at = sorted({int(t) for t in at if int(t) > 0})
        self.at_end = at_end
        self.prompts = list(prompts) if prompts is not None else None
        self.candidates = list(candidates) if candidates is not None else None
        self.world_prompts = list(world_prompts) if world_prompts is not None else None
        self.source: str | None = "prompts_path" if prompts is not None else None
        self.unavailable: str | None = None
        """Why there are no held-out prompts (then nothing is evaluated), or None."""
        self.n_prompts = n_prompts
        self.seed = seed
        self.batch_size = batch_size
        self.topk = topk
        self.max_reference_elements = max_reference_elements
        self.reference: LocalityReference | None = None
        self.history: list[dict[str, float]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.reference is not None:
            return
        editor = pl_module.editor
        if editor.ledger:
            rank_zero_warn("LocalityEval: the editor has edits already, so the unedited reference cannot be "
                           "captured; it is expected from the checkpoint being resumed")
            return
        prompts = self.prompts if self.prompts is not None else self.held_out(stream_records(trainer))
        if not prompts:
            self.unavailable = ("Loc unavailable: no held-out locality prompts (no corpus line, dataset "
                                "neighbourhood prompt or world fact prompt mentions no subject of the stream; "
                                "set callbacks.locality.prompts_path)")
            rank_zero_warn(f"LocalityEval: {self.unavailable}")
            return
        self.reference = capture_reference(editor.model, editor.tokenizer, prompts, self.batch_size, self.topk,
                                           self.max_reference_elements)

    def held_out(self, records: Sequence[Any]) -> list[str]:
        """The first source (corpus lines, the dataset's neighbourhood prompts, the world's fact prompts)
        that holds prompts mentioning no subject of the stream: `n_prompts` of them, seeded."""
        subjects = [r.subject for r in records if r.subject]
        sources = (("corpus", self.candidates), ("dataset neighbourhood prompts",
                                                  [p.prompt for r in records for p in r.locality]),
                   ("world fact prompts", self.world_prompts))
        for name, lines in sources:
            prompts = held_out_prompts(lines or [], subjects, self.n_prompts, self.seed)
            if prompts:
                self.source = name
                return prompts
        return []

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and edit_count(pl_module) == 0 and 0 not in self.done:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer, pl_module) -> dict[str, float] | None:
        if self.reference is None:
            if self.unavailable is None:
                rank_zero_warn("LocalityEval: no unedited reference (see the warning at setup); nothing logged")
            return None
        t = edit_count(pl_module)
        editor = pl_module.editor
        start = time.perf_counter()
        with editor.edited() as model:
            scores = compare(self.reference, model, editor.tokenizer, self.batch_size)
        scores["seconds"] = time.perf_counter() - start
        self.history.append({"T": t, **scores})
        log_metrics(trainer, {f"locality/{k}": v for k, v in scores.items()}, step=t)
        return scores

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference.state_dict() if self.reference is not None else None,
                "history": [dict(r) for r in self.history], "source": self.source, "unavailable": self.unavailable}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ref = state_dict.get("reference")
        self.reference = LocalityReference.from_state_dict(ref) if ref is not None else self.reference
        self.history = [dict(r) for r in state_dict.get("history", [])]
        self.source = state_dict.get("source", self.source)
        self.unavailable = state_dict.get("unavailable", self.unavailable)
