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
from typing import Any, ContextManager, Iterator, Sequence

import torch
from torch import Tensor, nn


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
    def resolve_layer(self, value: int, key: str = "editor.layer", verb: str = "is") -> int:
        """`value` as a layer index in 0..n-1 (negative counts from the last layer); a ValueError
        naming `key` when the model has no such layer."""
        n = self.adapter.num_layers
        if not -n <= value < n:
            raise ValueError(f"{key} {verb} {value}; the model has {n} layers (0..{n - 1}, or -1..-{n})")
        return value % n

    def ledger_state(self) -> list[dict[str, Any]]:
        return [entry.to_dict() for entry in self.ledger]

    def load_ledger(self, entries: list[dict[str, Any]]) -> None:
        self.ledger = [LedgerEntry.from_dict(e) for e in entries]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@torch.no_grad()
def greedy_generate(edited: ContextManager[nn.Module], tokenizer, prompts: Sequence[str], max_new_tokens: int,
                    device: torch.device | str, **kwargs) -> list[str]:
    """Greedy continuations of `prompts` by the model `edited` yields (entered after tokenising):
    left padded (the tokenizer's padding side is restored), `do_sample=False` and the tokenizer's
    pad token unless `kwargs` say otherwise; only the new tokens are decoded, special tokens skipped.

    For a plain model pass `contextlib.nullcontext(model)`.
    """
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # continue at the right end
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    finally:
        tokenizer.padding_side = side
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    with edited as model:
        out = model.generate(**batch, max_new_tokens=max_new_tokens, **kwargs)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


class HeldRouting:
    """For an `Editor` whose hook decides per sequence whether the edit applies (a router, a scope
    gate): what the model was called with, and the decision held from the prompt while generating.

    The subclass's `edited(..., hold=False)` enters `self._routing(hooks, hold)`; its hook reads
    `self._batch` (the current forward's `input_ids` and `attention_mask`, or {}), and while
    `self._hold` keeps its decision in `self._held` (reset to None on entry and exit).
    """

    _batch: dict[str, Tensor | None]
    _hold: bool
    _held: Any

    def _capture_inputs(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        self._batch = {"input_ids": ids, "attention_mask": kwargs.get("attention_mask")}

    def _attended(self, x: Tensor) -> Tensor:
        """[B, S] bool for the current forward's activations `x` [B, S, ...]: the positions its
        attention mask marks as real tokens (all of them when it had none, or one of another shape)."""
        B, S = x.shape[:2]
        mask = self._batch.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[0] == B and mask.shape[1] >= S:
            return mask[:, -S:].to(x.device).bool()
        return torch.ones(B, S, dtype=torch.bool, device=x.device)

    @contextlib.contextmanager
    def _routing(self, hooks: dict[str, Any], hold: bool) -> Iterator[nn.Module]:
        """The model with `hooks` installed (adapter hookpoint -> forward hook) and its inputs
        captured; `hold`: for cached generation, keep each sequence's decision from its prompt."""
        handle = self.model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True)
        self._hold, self._held = hold, None
        try:
            with self.adapter.hooks(hooks):
                yield self.model
        finally:
            handle.remove()
            self._batch, self._hold, self._held = {}, False, None

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 8, **kwargs) -> list[str]:
        """Greedy continuations by the model under `edited(hold=True)`: a per-sequence decision
        (routing, a sequence gate) is taken on each prompt and held for the tokens generated after it."""
        return greedy_generate(self.edited(hold=True), self.tokenizer, prompts, max_new_tokens, self.device,
                               **kwargs)
