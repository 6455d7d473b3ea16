"""Scope gates for MicroEdit: which inputs (or positions) get the edited SAE's output at layer l.

MicroEdit substitutes the SAE reconstruction ``z_hat`` for the residual ``z`` at layer l only for
inputs the gate admits; everything else passes through bit for bit. Every gate computes one
statistic per position from a ``LatentView`` (what the SAE saw and produced for this forward) and
admits either per position (``unit="token"``, causal: the decision for position s only uses tokens
<= s, so teacher-forced scoring and cached generation agree) or per sequence (``unit="sequence"``:
the statistic aggregated over the sequence's real tokens, one decision broadcast to every position,
as in the paper's Algorithm 2).

Gates:
- ``ard``     the paper's switch (Eq. 12, Alg. 2): admit iff ARD <= tau, ARD (Eq. 11) =
              ||z_hat - z||^2 / alpha averaged over the input's tokens.
- ``delta``   ours: ARD measured against the *pre-edit* decoder, ||z_hat - z_hat_0||^2 / alpha, i.e.
              how far the edits moved this input's reconstruction; admit iff >= tau. An input that
              uses no edited decoder row scores exactly 0 and always passes through.
- ``overlap`` ours: the largest Jaccard overlap between the input's active latents at a position and
              any one edit's row mask; admit iff >= tau.
- ``none``    always substitute (the paper's "- Shunting Mechanism" ablation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

GATES = ("ard", "delta", "overlap", "none")
UNITS = ("sequence", "token")


@dataclass
class LatentView:
    """The SAE's view of one forward at layer l. Shapes: B sequences, S positions, k latents, d width."""

    z: Tensor
    """The layer's output, [B, S, d] (float32)."""
    acts: Tensor
    """Top-k activations, [B, S, k]."""
    idx: Tensor
    """Top-k latent indices, [B, S, k] (long)."""
    z_hat: Tensor
    """Reconstruction with the decoder as edited now, [B, S, d]."""
    valid: Tensor
    """Real (non-padding, non-special) tokens, [B, S] bool: sequence statistics average over these."""
    edit_delta: Callable[[], Tensor] | None = None
    """Lazily: z_hat - z_hat_0 (the edits' contribution), [B, S, d]; None when nothing is edited."""
    _cache: dict = field(default_factory=dict)

    def delta(self) -> Tensor:
        if "delta" not in self._cache:
            self._cache["delta"] = (
                torch.zeros_like(self.z_hat) if self.edit_delta is None else self.edit_delta()
            )
        return self._cache["delta"]


def ard_per_token(z: Tensor, z_hat: Tensor, alpha: float) -> Tensor:
    """||z_hat_s - z_s||^2 / alpha per position, [..., S] (Eq. 11 before the mean over tokens)."""
    return (z_hat.float() - z.float()).pow(2).sum(-1) / alpha


def sequence_mean(per_token: Tensor, valid: Tensor) -> Tensor:
    """Mean of a [B, S] statistic over each sequence's valid positions, [B] (0 where none is valid)."""
    weights = valid.to(per_token.dtype)
    return (per_token * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)


def sequence_max(per_token: Tensor, valid: Tensor) -> Tensor:
    return per_token.masked_fill(~valid, float("-inf")).amax(-1).clamp_min(0.0)


def ard(z: Tensor, z_hat: Tensor, alpha: float, valid: Tensor | None = None) -> Tensor:
    """Eq. 11: ARD of each sequence, sum_s ||z_hat_s - z_s||^2 / (alpha * S), [B] (or a scalar for
    an unbatched [S, d] input). ``valid`` [B, S] restricts the S tokens averaged over."""
    per_token = ard_per_token(z, z_hat, alpha)
    if valid is None:
        return per_token.mean(-1)
    return sequence_mean(per_token, valid)


class ScopeGate:
    """A statistic per position and a threshold; ``admit`` turns them into substitution decisions."""

    name = "gate"
    admits_high = True
    """True: admit when the statistic >= tau; False: admit when <= tau."""
    aggregate = staticmethod(sequence_mean)

    def __init__(self, tau: float, unit: str = "sequence"):
        if unit not in UNITS:
            raise ValueError(f"gate unit {unit!r}; expected one of {UNITS}")
        self.tau = float(tau)
        self.unit = unit

    def statistic(self, view: LatentView) -> Tensor:  # [B, S]
        raise NotImplementedError

    def sequence_statistic(self, view: LatentView) -> Tensor:  # [B]
        return self.aggregate(self.statistic(view), view.valid)

    def admit(self, view: LatentView) -> Tensor:
        """[B, S] bool: positions that get z_hat. Sequence gates broadcast one decision per row."""
        if self.unit == "sequence":
            stat = self.sequence_statistic(view)[:, None].expand(view.valid.shape)
        else:
            stat = self.statistic(view)
        return stat >= self.tau if self.admits_high else stat <= self.tau


class AlwaysOn(ScopeGate):
    """No switch: every position gets z_hat (Table 4, "- Shunting Mechanism")."""

    name = "none"

    def __init__(self, tau: float = 0.0, unit: str = "sequence"):
        super().__init__(0.0, unit)

    def statistic(self, view: LatentView) -> Tensor:
        return torch.ones(view.valid.shape, device=view.z.device)

    def admit(self, view: LatentView) -> Tensor:
        return torch.ones(view.valid.shape, dtype=torch.bool, device=view.z.device)


class ARDSwitch(ScopeGate):
    """The paper's switch (Eq. 12, Alg. 2): substitute iff ARD(x) <= tau."""

    name = "ard"
    admits_high = False

    def __init__(self, tau: float, alpha: float, unit: str = "sequence"):
        super().__init__(tau, unit)
        self.alpha = float(alpha)

    def statistic(self, view: LatentView) -> Tensor:
        return ard_per_token(view.z, view.z_hat, self.alpha)


class DeltaGate(ScopeGate):
    """ARD against the pre-edit decoder: ||z_hat - z_hat_0||^2 / alpha; substitute iff >= tau.

    Inputs that touch no edited row score 0 and keep z exactly, however many edits accumulate.
    """

    name = "delta"

    def __init__(self, tau: float, alpha: float, unit: str = "token"):
        super().__init__(tau, unit)
        self.alpha = float(alpha)

    def statistic(self, view: LatentView) -> Tensor:
        return view.delta().float().pow(2).sum(-1) / self.alpha


class OverlapGate(ScopeGate):
    """Max over edits of the Jaccard overlap between a position's active latents and that edit's
    row mask; substitute iff >= tau. Sequence unit: the max over the sequence's positions."""

    name = "overlap"
    aggregate = staticmethod(sequence_max)

    def __init__(self, tau: float, edit_masks: Callable[[], Tensor | None], unit: str = "token"):
        super().__init__(tau, unit)
        self.edit_masks = edit_masks  # -> [E, n] bool (one row per live edit) or None

    def statistic(self, view: LatentView) -> Tensor:
        masks = self.edit_masks()
        if masks is None or masks.shape[0] == 0:
            return torch.zeros(view.valid.shape, device=view.z.device)
        return max_jaccard(view.idx, view.acts > 0, masks)


def max_jaccard(idx: Tensor, active: Tensor, masks: Tensor, chunk: int = 256) -> Tensor:
    """max_e |A_s & M_e| / |A_s | M_e| for every position s, [B, S].

    idx, active: [B, S, k] (a latent counts when selected with a positive activation);
    masks: [E, n] bool. Chunked over edits so memory stays [chunk, B*S, k].
    """
    lead = idx.shape[:-1]
    flat_idx = idx.reshape(-1, idx.shape[-1])
    flat_active = active.reshape(-1, idx.shape[-1])
    size_a = flat_active.sum(-1).float()  # [N]
    best = torch.zeros(flat_idx.shape[0], device=idx.device)
    sizes_m = masks.sum(-1).float()  # [E]
    for start in range(0, masks.shape[0], chunk):
        block = masks[start:start + chunk]  # [c, n]
        hits = block[:, flat_idx] & flat_active  # [c, N, k]
        inter = hits.sum(-1).float()  # [c, N]
        union = size_a[None] + sizes_m[start:start + chunk, None] - inter
        best = torch.maximum(best, (inter / union.clamp_min(1.0)).amax(0))
    return best.reshape(lead)


def embedding_bag_delta(idx: Tensor, acts: Tensor, slot: Tensor, delta_rows: Tensor) -> Tensor:
    """sum_j acts_j * delta_rows[slot[idx_j]], [..., d]: the edits' share of a reconstruction.

    slot: [n] long, the row's position in ``delta_rows`` or ``len(delta_rows) - 1`` (a zero row)
    for rows no edit changed.
    """
    lead, k = idx.shape[:-1], idx.shape[-1]
    local = slot[idx.reshape(-1, k)]
    out = F.embedding_bag(local, delta_rows, per_sample_weights=acts.reshape(-1, k).to(delta_rows.dtype),
                          mode="sum")
    return out.reshape(*lead, delta_rows.shape[-1])
