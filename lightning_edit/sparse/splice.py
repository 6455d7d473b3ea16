"""A transcoder spliced in place of an MLP (TCPE, PNKE on transcoder latents, attribution tests)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class TranscoderMLP(nn.Module):
    """A transcoder with an MLP's call signature: `forward(x) -> z W_dec + b_dec (+ x W_skip^T)`.

    The dense latent code passes through the identity module `latents`, so `Site("<mlp>.latents",
    "output")` reads (or, in attribution, replaces) z [B, T, n] while the transcoder is spliced in.
    """

    def __init__(self, coder: nn.Module):
        super().__init__()
        self.coder = coder
        self.latents = nn.Identity()

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        coder = self.coder
        x = hidden_states.to(coder.dtype)
        acts, indices = coder.encode(x)  # [B, T, k]
        z = self.latents(acts.new_zeros(*acts.shape[:-1], coder.num_latents).scatter(-1, indices, acts))
        out = z @ coder.W_dec + coder.b_dec  # dense decode, [B, T, d]: differentiable in z
        if coder.W_skip is not None:
            out = out + x @ coder.W_skip.mT
        return out.to(hidden_states.dtype)
