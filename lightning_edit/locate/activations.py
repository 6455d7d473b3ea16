"""Activations of FFN neurons or sparse-component latents over prompts, at chosen token positions.

A *site* names a vector inside layer l (resolved through the `ModelAdapter`, never by model name):

- "down_proj_input": the FFN hidden neurons, i.e. the input of the down projection, [d_ff];
- "mlp_input": the input of the MLP (the normed residual stream), [d_model];
- "mlp_output": the output of the MLP, [d_model];
- "layer_output": the residual stream after layer l, [d_model];
- "coder_latents": a sparse coder's dense latent code of the activation at `coder_site`, [n_latents];
- or an explicit `Site(hookpoint, "input" | "output")` for anything else (e.g. the latent module of a
  spliced-in transcoder).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn

from lightning_edit.locate.positions import Position, per_prompt, resolve_position
from lightning_edit.models import ModelAdapter, eval_mode, hidden_of, model_device, with_hidden
from lightning_edit.tokens import encode_prompt, pad_id, right_padded

SITES = ("down_proj_input", "mlp_input", "mlp_output", "layer_output", "coder_latents")


@dataclass(frozen=True)
class Site:
    """A vector read at a hookpoint: the first positional input or the (first) output of a module."""

    hookpoint: str
    """Module name relative to `ModelAdapter.base_model`, e.g. "layers.3.mlp.down_proj"."""
    io: str = "input"
    """"input" (forward-pre hook on args[0]) or "output" (forward hook on the output's hidden state)."""

    def __post_init__(self) -> None:
        if self.io not in ("input", "output"):
            raise ValueError(f"Site.io is {self.io!r} (expected 'input' or 'output')")


SiteSpec = Union[str, Site]


def resolve_site(adapter: ModelAdapter, layer: int, site: SiteSpec) -> Site:
    """The hookpoint and side of a named site at `layer` (an explicit `Site` is returned as is)."""
    if isinstance(site, Site):
        return site
    if site == "down_proj_input":
        return Site(adapter.down_proj_name(layer), "input")
    if site == "mlp_input":
        return Site(adapter.mlp_name(layer), "input")
    if site == "mlp_output":
        return Site(adapter.mlp_name(layer), "output")
    if site == "layer_output":
        return Site(adapter.layer_name(layer), "output")
    if site == "coder_latents":
        raise ValueError("site 'coder_latents' is read through a coder's encode; it has no hookpoint of its own")
    raise ValueError(f"unknown site {site!r}; expected one of {SITES} or a Site(hookpoint, io)")


class StopForward(Exception):
    """Raised from a capture hook to skip the rest of the forward once the site has been read."""


@contextmanager
def capture(adapter: ModelAdapter, site: Site, stop: bool = False, raw: bool = False) -> Iterator[list[Any]]:
    """Record the site's tensor [B, T, d] on every forward inside the block (appended to the yielded
    list, detached unless grad is enabled). With `stop=True` the forward is cut short right after the
    site (wrap the call in `run_until_captured`). `raw=True` (an output site) records the module's
    output as it is, a tensor or a tuple, for callers that need its structure (`hidden_of` reads it)."""
    seen: list[Any] = []

    def record(x: Any) -> None:
        seen.append(x if raw or torch.is_grad_enabled() else x.detach())
        if stop:
            raise StopForward

    if site.io == "input":
        fns = {site.hookpoint: lambda module, args: record(args[0])}
        kind = "forward_pre"
    else:
        fns = {site.hookpoint: lambda module, args, output: record(output if raw else hidden_of(output))}
        kind = "forward"
    with adapter.hooks(fns, kind=kind):
        yield seen


def run_until_captured(model: nn.Module, **inputs: Any) -> None:
    """Run `model(**inputs)`, treating a `StopForward` from a capture hook as the normal end."""
    try:
        model(**inputs, use_cache=False)
    except StopForward:
        pass


@contextmanager
def replace_at(adapter: ModelAdapter, site: Site, positions: torch.Tensor, values: torch.Tensor) -> Iterator[None]:
    """Within the block, the site's vector at token `positions` [B] of each row is `values` [B, d]
    (rows of a batch may use different positions). Differentiable in `values`."""

    def patched(x: torch.Tensor) -> torch.Tensor:
        onehot = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
        onehot[torch.arange(x.shape[0], device=x.device), positions.to(x.device)] = 1
        onehot = onehot.unsqueeze(-1)  # [B, T, 1]
        return x * (1 - onehot) + values.to(x.dtype).unsqueeze(1) * onehot

    if site.io == "input":
        fns = {site.hookpoint: lambda module, args: (patched(args[0]), *args[1:])}
        kind = "forward_pre"
    else:
        fns = {site.hookpoint: lambda module, args, output: with_hidden(output, patched(hidden_of(output)))}
        kind = "forward"
    with adapter.hooks(fns, kind=kind):
        yield


def dense_latents(coder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A sparse coder's dense latent code of x [..., d_in] -> [..., n_latents] (zeros off the top-k)."""
    acts, indices = coder.encode(x)
    n = getattr(coder, "num_latents", None) or coder.W_dec.shape[0]
    dense = acts.new_zeros(*acts.shape[:-1], n)
    return dense.scatter(-1, indices, acts)


def site_reader(adapter: ModelAdapter, layer: int, site: SiteSpec, coder: nn.Module | None,
                        coder_site: SiteSpec):
    """(the Site to hook, the function mapping its tensor to the requested vectors): the identity, or
    the coder's dense latents for "coder_latents" (read at `coder_site`)."""
    if site == "coder_latents":
        if coder is None:
            raise ValueError("site 'coder_latents' needs a coder (an object with encode(x) -> (acts, indices))")
        hooked = resolve_site(adapter, layer, coder_site)
        return hooked, lambda x: dense_latents(coder, x)
    return resolve_site(adapter, layer, site), lambda x: x


@torch.no_grad()
def activations(
    model: nn.Module,
    tok: Any,
    adapter: ModelAdapter,
    layer: int,
    prompts: Sequence[str],
    *,
    position: Position | Sequence[Position] = "last",
    subjects: str | Sequence[str | None] | None = None,
    site: SiteSpec = "down_proj_input",
    coder: nn.Module | None = None,
    coder_site: SiteSpec = "mlp_input",
    batch_size: int = 16,
) -> torch.Tensor | list[torch.Tensor]:
    """The site's vectors for each prompt at the chosen position, float32 on the CPU.

    Returns [n_prompts, d] for a single-token position rule ("last", "subject_last", an int), and a
    list of [n_tokens_i, d] (every real token, BOS included when the tokenizer adds one) for "all".
    `position` and `subjects` are one value for all prompts or one per prompt. Prompts are run in
    right-padded batches; the forward stops right after the site.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size} (expected >= 1)")
    prompts = list(prompts)
    positions = per_prompt(position, len(prompts), "positions")
    subject_list = per_prompt(subjects, len(prompts), "subjects")
    hooked, transform = site_reader(adapter, layer, site, coder, coder_site)
    sequences = [encode_prompt(tok, p) for p in prompts]
    wanted = [resolve_position(tok, p, pos, s) for p, pos, s in zip(prompts, positions, subject_list)]
    device = model_device(model)
    out: list[torch.Tensor] = []
    with eval_mode(model):
        for first in range(0, len(prompts), batch_size):
            rows = range(first, min(first + batch_size, len(prompts)))
            ids, mask = right_padded([sequences[i] for i in rows], pad_id(tok), device)
            with capture(adapter, hooked, stop=True) as seen:
                run_until_captured(model, input_ids=ids, attention_mask=mask)
            x = seen[0]  # [B, T, d_site]
            for row, i in enumerate(rows):
                at = torch.as_tensor(wanted[i], dtype=torch.long, device=x.device)
                out.append(transform(x[row].index_select(0, at)).float().cpu())
    if any(p == "all" for p in positions):
        return out
    return torch.cat(out, dim=0) if out else torch.empty(0)


def context_keys(model: nn.Module, tok: Any, adapter: ModelAdapter, layer: int, records: Sequence[Any],
                 templates: Sequence[str], position: str) -> torch.Tensor:
    """[d_ff, n] float64: each record's down projection input at `layer` at its key position, averaged
    over the context templates ("{}" = the prompt; MEMIT's compute_ks)."""
    texts = [t.replace("{}", r.prompt, 1) for r in records for t in templates]
    subjects = [r.subject for r in records for _ in templates]
    k = activations(model, tok, adapter, layer, texts, position=position, subjects=subjects, site="down_proj_input")
    return k.view(len(records), len(templates), -1).mean(1).T.double()
