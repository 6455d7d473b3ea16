"""Which model state a score belongs to, and a cache of scores per (model state, task, limit).

A downstream task can take minutes on a real model, and a stream often asks for the same state
twice (a checkpoint T that is also the stream's end, a resumed run, two callbacks). The model state
is a fingerprint of every parameter and buffer the edited model (and the editor's component) holds,
plus whatever the caller adds (the editor's ledger length covers hooks and switches that live
outside the parameters), so a cached score is reused only for the very same weights.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from lightning_edit.editors.base import Editor


def _tensor_summary(tensor: torch.Tensor) -> list[float]:
    """Sum, L2 norm and row-/column-position-weighted sums, in float64 without a float64 copy.

    One pass over the tensor; any realistic edit (a row, a rank-one update, a single weight) changes
    at least one of these. The position weights catch moved values that keep sum and norm.
    """
    t = tensor.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    if not t.is_floating_point():
        t = t.to(torch.float64 if t.numel() < 1 << 20 else torch.float32)
    if t.numel() == 0:
        return [0.0]
    out = [t.sum(dtype=torch.float64).item(), torch.linalg.vector_norm(t, dtype=torch.float64).item()]
    if t.dim() >= 1:
        flat = t.reshape(t.shape[0], -1)
        rows = flat.sum(1, dtype=torch.float64)  # [rows]
        cols = flat.sum(0, dtype=torch.float64)  # [cols]
        out.append((rows * torch.arange(1, rows.numel() + 1, dtype=torch.float64, device=rows.device)).sum().item())
        out.append((cols * torch.arange(1, cols.numel() + 1, dtype=torch.float64, device=cols.device)).sum().item())
    return out


def state_fingerprint(*modules: nn.Module | None, extra: Iterable[Any] = ()) -> str:
    """A short hex digest of every parameter and buffer of `modules` (None skipped) and `extra`.

    Parameters shared between modules (a component spliced into the model) count once.
    """
    digest = hashlib.sha256()
    seen: set[int] = set()
    for index, module in enumerate(modules):
        if module is None:
            continue
        named = list(module.named_parameters(remove_duplicate=True)) + list(module.named_buffers())
        for name, tensor in named:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            digest.update(f"{index}:{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(struct.pack(f"<{len(s := _tensor_summary(tensor))}d", *s))
    digest.update(json.dumps(list(extra), default=str).encode())
    return digest.hexdigest()[:16]


def editor_fingerprint(editor: Editor, model: nn.Module | None = None) -> str:
    """The state of `editor` as edited now: the model it yields (`model`, default `editor.model`),
    its component, and its ledger length (hooks and side memories live outside the parameters)."""
    model = model if model is not None else editor.model
    return state_fingerprint(model, editor.component, extra=(editor.name, len(editor.ledger)))


@dataclass
class TaskScore:
    """One task's result on one model state."""

    task: str
    score: float
    """The task's headline metric (accuracy, exact match, pass@1), in [0, 1]."""
    metric: str
    """Which metric `score` is, as lm-eval names it (`acc,none`, `exact_match,strict-match`, `pass@1`)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Every numeric metric the task reported (per subtask for a group of files, e.g. BBH)."""
    n: int | None = None
    """Examples scored."""
    seconds: float = 0.0
    """Wall time of the evaluation that produced it (not of a cache hit)."""
    cached: bool = False
    """True when this result came from the cache rather than a fresh evaluation."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResultCache:
    """Task scores keyed by (model state, task, limit); optionally mirrored to a JSON file.

    path: a JSON file read at start (if present) and rewritten after every `put`, so a resumed run
    reuses the scores of states it has already evaluated.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self._scores: dict[str, TaskScore] = {}
        self.hits = 0
        self.misses = 0
        if self.path is not None and self.path.is_file():
            for key, value in json.loads(self.path.read_text()).items():
                self._scores[key] = TaskScore(**value)

    @staticmethod
    def key(state: str, task: str, limit: int | float | None) -> str:
        return json.dumps([state, task, limit])

    def get(self, state: str, task: str, limit: int | float | None) -> TaskScore | None:
        found = self._scores.get(self.key(state, task, limit))
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        return TaskScore(**{**asdict(found), "cached": True})

    def put(self, state: str, score: TaskScore, limit: int | float | None) -> None:
        self._scores[self.key(state, score.task, limit)] = score
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({k: v.to_dict() for k, v in self._scores.items()}, indent=1) + "\n")

    def __len__(self) -> int:
        return len(self._scores)

    def state_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() for k, v in self._scores.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._scores.update({k: TaskScore(**v) for k, v in state.items()})
