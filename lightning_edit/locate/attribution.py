"""Attribution of a target to the neurons at one site and one token position.

Both methods treat the site's vector `a` at the chosen position of the prompt as the input of a
function `f(a)`; every other activation (other positions, other layers' inputs) is left as the model
computes it. `f` is either the target's logit at the prompt's last position (MENT) or the
teacher-forced log-probability of the whole target (PNKE, knowledge neurons).

- Input x Gradient (MENT, section III-B): `a * df/da`, absolute value by default.
- Integrated Gradients (PNKE Eq. 4): zero baseline, path `alpha * a`,
  attribution `a * mean_alpha df/da(alpha * a)`; by completeness the attributions sum to about
  `f(a) - f(0)`, closer as `steps` grows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_edit.locate.activations import (
    Site,
    SiteSpec,
    capture,
    replace_at,
    resolve_site,
    run_until_captured,
)
from lightning_edit.locate.positions import Position, resolve_position
from lightning_edit.models import ModelAdapter, eval_mode, model_device
from lightning_edit.tokens import target_positions

OBJECTIVES = ("logit", "logprob")
RULES = ("midpoint", "right")


class TargetObjective:
    """One prompt and target, tokenised once: evaluates f for a batch of replacement vectors.

    The model input is `prompt + " " + target` (teacher forced); the site is read and replaced at the
    chosen position of the prompt (the target tokens that follow see the replaced vector through
    attention, as they do in the model).
    """

    def __init__(self, model: nn.Module, tok: Any, adapter: ModelAdapter, layer: int, prompt: str,
                 target: str, *, site: SiteSpec = "down_proj_input", position: Position = "last",
                 subject: str | None = None, objective: str = "logit"):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
        if position == "all":
            raise ValueError("attribution needs a single position, not 'all'")
        self.model, self.adapter, self.objective = model, adapter, objective
        self.site: Site = resolve_site(adapter, layer, site)
        ids, self.start = target_positions(tok, prompt, target)
        self.position = resolve_position(tok, prompt, position, subject)[0]
        device = model_device(model)
        self.ids = torch.tensor(ids, dtype=torch.long, device=device)  # [T]
        self.target_ids = self.ids[self.start:]  # [n_target]

    @classmethod
    def on_ids(cls, model: nn.Module, adapter: ModelAdapter, layer: int, ids: list[int], start: int, *,
               site: SiteSpec = "down_proj_input", objective: str = "logit") -> "TargetObjective":
        """The objective on token ids already split: `ids[:start]` the condition, `ids[start:]` the
        target, the site read and replaced at the condition's last position. For a target token after
        earlier target tokens (their ids in the condition): re-tokenising decoded text does not give
        those ids back for a byte-level BPE whose words carry their leading space."""
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
        if not 0 < start < len(ids):
            raise ValueError(f"start is {start} for {len(ids)} ids (expected a condition and a target)")
        self = cls.__new__(cls)
        self.model, self.adapter, self.objective = model, adapter, objective
        self.site = resolve_site(adapter, layer, site)
        self.start, self.position = start, start - 1
        self.ids = torch.tensor(ids, dtype=torch.long, device=model_device(model))
        self.target_ids = self.ids[start:]
        return self

    def activation(self) -> torch.Tensor:
        """The site's original vector at the position, [d] (float32)."""
        with torch.no_grad(), eval_mode(self.model), capture(self.adapter, self.site, stop=True) as seen:
            run_until_captured(self.model, input_ids=self.ids[None])
        return seen[0][0, self.position].float()

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """f with the site's vector at the position replaced by each row of `values` [B, d] -> [B]."""
        batch = values.shape[0]
        ids = self.ids[None].expand(batch, -1)
        positions = torch.full((batch,), self.position, dtype=torch.long)
        with eval_mode(self.model), replace_at(self.adapter, self.site, positions, values):
            logits = self.model(input_ids=ids, use_cache=False).logits.float()  # [B, T, V]
        if self.objective == "logit":
            return logits[:, self.start - 1, self.target_ids[0]]
        # Token j is predicted at position j - 1.
        logprobs = torch.log_softmax(logits[:, self.start - 1:-1], dim=-1)  # [B, n_target, V]
        picked = logprobs.gather(2, self.target_ids[None, :, None].expand(batch, -1, 1))
        return picked.squeeze(-1).sum(dim=1)


def input_x_gradient(model: nn.Module, tok: Any, adapter: ModelAdapter, layer: int, prompt: str,
                     target: str, *, site: SiteSpec = "down_proj_input", position: Position = "last",
                     subject: str | None = None, objective: str = "logit",
                     signed: bool = False) -> torch.Tensor:
    """`|a * df/da|` (or signed) for the site's neurons at the position, [d] float32.

    MENT's locating score is the default: f = the logit of the target's first token at the prompt's
    last position, over the FFN hidden neurons (the down projection's input).
    """
    f = TargetObjective(model, tok, adapter, layer, prompt, target, site=site, position=position,
                        subject=subject, objective=objective)
    a = f.activation()
    with torch.enable_grad():
        point = a.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(f(point[None]).sum(), point)
    score = a * grad
    return score if signed else score.abs()


def integrated_gradients(model: nn.Module, tok: Any, adapter: ModelAdapter, layer: int, prompt: str,
                         target: str, *, steps: int = 20, site: SiteSpec = "down_proj_input",
                         position: Position = "last", subject: str | None = None,
                         objective: str = "logprob", rule: str = "midpoint",
                         batch_size: int | None = None) -> torch.Tensor:
    """Integrated Gradients with a zero baseline (PNKE Eq. 4), signed, [d] float32.

    `a * mean_k df/da(alpha_k * a)` over `steps` points: alpha_k = (k + 0.5) / steps ("midpoint",
    the default: second-order accurate) or k / steps for k = 1..steps ("right", Dai et al.'s
    knowledge-neuron rule). All points run as one batch unless `batch_size` caps it.
    """
    if steps < 1:
        raise ValueError(f"steps is {steps} (expected >= 1)")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
    f = TargetObjective(model, tok, adapter, layer, prompt, target, site=site, position=position,
                        subject=subject, objective=objective)
    a = f.activation()
    k = torch.arange(steps, dtype=torch.float32, device=a.device)
    alphas = (k + 0.5) / steps if rule == "midpoint" else (k + 1) / steps
    chunk = batch_size or steps
    total = torch.zeros_like(a)
    with torch.enable_grad():
        for first in range(0, steps, chunk):
            points = (alphas[first:first + chunk, None] * a[None]).requires_grad_(True)  # [b, d]
            # Rows of a batch do not interact, so the gradient of the sum is each row's gradient.
            (grads,) = torch.autograd.grad(f(points).sum(), points)
            total += grads.sum(dim=0)
    return a * total / steps


def patched_objective(model: nn.Module, tok: Any, adapter: ModelAdapter, layer: int, prompt: str,
                      target: str, values: torch.Tensor, *, site: SiteSpec = "down_proj_input",
                      position: Position = "last", subject: str | None = None,
                      objective: str = "logprob") -> torch.Tensor:
    """f with the site's vector at the position replaced by each row of `values` [B, d] -> [B]
    (no grad); e.g. `values = zeros` gives f at the Integrated Gradients baseline."""
    f = TargetObjective(model, tok, adapter, layer, prompt, target, site=site, position=position,
                        subject=subject, objective=objective)
    with torch.no_grad():
        return f(values.to(model_device(model)))
