"""The one interface every editing method implements, and the edit ledger.

An editor owns everything a method changes (weights, codebooks, side memories, switches) as state
of its own object, never as module globals. The harness only calls the methods below, so adding a
method means adding one file here and one YAML in configs/.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn


@dataclass
class LedgerEntry:
    """What one edit did: enough to audit it, plot it and roll it back."""

    edit_id: int
    """Position in the stream (0-based)."""
    case_id: Any
    prompt: str
    target: str
    changed: dict[str, list[int]] = field(default_factory=dict)
    """Parameter name -> indices of the rows (or columns) this edit changed."""
    delta_norm: float = 0.0
    """Frobenius norm of the change this edit made to the edited parameters."""
    steps: int = 0
    """Optimisation steps (0 for closed-form methods)."""
    seconds: float = 0.0
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LedgerEntry":
        return cls(**data)


class Editor(ABC):
    """Applies knowledge edits to a model; subclasses implement one method each.

    Lifecycle: `__init__(model, tokenizer, adapter, cfg, component)` -> optional `prepare(corpus)`
    (statistics, calibration) -> `apply(records)` per step -> evaluation inside `edited()`.
    """

    name: str = "editor"
    config_class: type = object
    """The method's hyperparameters as a dataclass (paper defaults); the YAML's `editor:` section
    is merged over it, so an unknown key is an error."""
    supports_batch: bool = False
    supports_rollback: bool = False

    def __init__(self, model: nn.Module, tokenizer, adapter, cfg: Any, component: nn.Module | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.cfg = cfg
        self.component = component
        self.ledger: list[LedgerEntry] = []

    def prepare(self, corpus: list[str] | None = None) -> None:
        """One-off work before the first edit (statistics, calibration). Default: nothing."""

    @abstractmethod
    def apply(self, records: list) -> list[LedgerEntry]:
        """Apply one edit (or a batch where `supports_batch`), append to and return ledger entries."""

    @contextlib.contextmanager
    def edited(self) -> Iterator[nn.Module]:
        """The model as edited now (hooks, switches, spliced components active) for evaluation.

        Methods that edit weights in place need nothing more than the model itself.
        """
        yield self.model

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to reproduce the edited model from the base model (tensors + ledger)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` onto an editor built over a fresh copy of the base model."""

    def rollback(self, edit_id: int) -> None:
        raise NotImplementedError(f"{self.name} does not support rolling back an edit")

    # Helpers shared by subclasses -------------------------------------------------------------
    def ledger_state(self) -> list[dict[str, Any]]:
        return [entry.to_dict() for entry in self.ledger]

    def load_ledger(self, entries: list[dict[str, Any]]) -> None:
        self.ledger = [LedgerEntry.from_dict(e) for e in entries]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device
