"""FT-M: fine-tune one layer's MLP down projection on the target tokens only (masked loss).

The constrained fine-tuning baseline of the lifelong-editing papers (EasyEdit's FT-M, as used by
WISE and MicroEdit): the loss is the cross-entropy of the target tokens given the prompt (prompt
positions masked out), Adam on a single weight matrix, a step budget, and an early stop once every
target token is the argmax. Defaults follow EasyEdit's FT-M hyperparameters (lr 5e-4, 25 steps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_edit.editors.base import Editor, Layer, LedgerEntry
from lightning_edit.models import eval_mode, freeze
from lightning_edit.tokens import target_positions


@dataclass
class FTConfig:
    """FT-M hyperparameters."""

    layer: Layer = -1
    """Layer whose MLP down projection is fine-tuned; negative counts from the last layer
    (EasyEdit fine-tunes layer 21 of Llama-2-7B's 32)."""
    lr: float = 5e-4
    """Adam learning rate (EasyEdit FT-M), used when `lr_scale` is None."""
    lr_scale: float | None = None
    """The learning rate as a fraction of the edited weight's RMS entry: lr = lr_scale * RMS(W). Adam
    moves every entry by about lr per step whatever the weights' scale, so an absolute lr is
    size-dependent; this keeps the relative change per step. None = the absolute `lr`."""
    max_steps: int = 25
    """Optimisation steps per edit at most (EasyEdit FT-M `num_steps`)."""
    weight_decay: float = 0.0
    norm_constraint: float | None = None
    """Keep every weight within this distance of its pre-edit value (EasyEdit's `norm_constraint`);
    None = unconstrained."""
    stop_at_argmax: bool = True
    """Stop as soon as every target token of every record in the batch is the argmax."""


class FineTune(Editor):
    """FT-M over `adapter.down_proj(layer)`; the weight is edited in place, so `edited()` is the model."""

    name = "ft"
    config_class = FTConfig
    supports_batch = True

    def setup(self) -> None:
        self.layer = self.resolve_layer(self.cfg.layer)
        self.cfg.layer = self.layer  # states record the absolute layer
        self.param_name = self.adapter.down_proj_name(self.layer) + ".weight"
        """Name of the edited parameter relative to the adapter's base model (a hookpoint + .weight)."""
        freeze(self.model)  # only the edited weight ever gets a gradient
        rms = float(self.weight.detach().float().pow(2).mean().sqrt())
        self.lr = self.cfg.lr if self.cfg.lr_scale is None else self.cfg.lr_scale * rms
        """Adam's learning rate: `lr`, or `lr_scale` times the base weight's RMS entry (fixed at setup)."""

    @property
    def weight(self) -> nn.Parameter:
        return self.adapter.down_proj(self.layer).weight

    def _encode(self, record) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids [1, L], target ids at positions [start-1, L-1) as a [L-1] label row, -100 elsewhere)."""
        ids, start = target_positions(self.tokenizer, record.prompt, record.target_new)
        ids_t = torch.tensor([ids], dtype=torch.long, device=self.device)
        labels = torch.full((len(ids) - 1,), -100, dtype=torch.long, device=self.device)
        labels[start - 1:] = ids_t[0, start:]  # logits at j-1 predict token j: only target positions count
        return ids_t, labels

    def _loss(self, encoded: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, bool]:
        """Mean target-token cross-entropy over the batch, and whether every target token is the argmax."""
        losses, all_right = [], True
        for ids, labels in encoded:
            logits = self.model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # [L-1, vocab]
            mask = labels != -100
            losses.append(nn.functional.cross_entropy(logits[mask], labels[mask]))
            all_right &= bool((logits[mask].argmax(-1) == labels[mask]).all())
        return torch.stack(losses).mean(), all_right

    def apply(self, records: list) -> list[LedgerEntry]:
        cfg = self.cfg
        start_time = time.perf_counter()
        weight = self.weight
        before = weight.detach().clone()
        encoded = [self._encode(r) for r in records]
        optimizer = torch.optim.Adam([weight], lr=self.lr, weight_decay=cfg.weight_decay)
        weight.requires_grad_(True)
        steps, loss_before, right_before = 0, None, None
        try:
            with eval_mode(self.model):  # no dropout: an edit is a deterministic function of the state
                while True:
                    loss, all_right = self._loss(encoded)
                    if loss_before is None:
                        loss_before, right_before = loss.item(), all_right
                    if steps >= cfg.max_steps or (cfg.stop_at_argmax and all_right):
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    steps += 1
                    if cfg.norm_constraint is not None:
                        with torch.no_grad():
                            weight.copy_(torch.clamp(weight, before - cfg.norm_constraint,
                                                     before + cfg.norm_constraint))
        finally:
            weight.requires_grad_(False)
            weight.grad = None
        delta = weight.detach() - before
        # Rows of the [d_model, d_ff] view (output features) that moved; Conv1D stores the transpose.
        delta_out_in = delta.T if delta.shape != self.adapter.down_proj_weight(self.layer).shape else delta
        changed_rows = (delta_out_in != 0).any(dim=1).nonzero().flatten().tolist()
        seconds = time.perf_counter() - start_time
        entries = []
        for record in records:
            entry = LedgerEntry.for_record(
                len(self.ledger), record,
                changed={self.param_name: changed_rows},
                delta_norm=float(delta.norm()),
                steps=steps,
                seconds=seconds / len(records),
                metrics_before={"target_nll": loss_before, "target_argmax": float(right_before)},
                metrics_after={"target_nll": loss.item(), "target_argmax": float(all_right)},
                extra={"batch_size": len(records), "lr": self.lr},
            )
            self.ledger.append(entry)
            entries.append(entry)
        return entries

    def state_dict(self) -> dict[str, Any]:
        return {
            "tensors": {self.param_name: self.weight.detach().clone()},
            "ledger": self.ledger_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tensors = state["tensors"]
        if set(tensors) != {self.param_name}:
            raise ValueError(f"FT-M edit state holds {sorted(tensors)}; this editor edits {self.param_name!r}")
        with torch.no_grad():
            self.weight.copy_(tensors[self.param_name])
        self.load_ledger(state["ledger"])
