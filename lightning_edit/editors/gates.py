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

``SubjectOverlapGate`` (MicroEdit's ``subject_gate`` switch) widens ``overlap``: a position whose
overlap with an edit's key passes a lower threshold is admitted too when one of that edit's subject
keys was matched at or before it (a causal look-back, carried across cached generation steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

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
    past: int = 0
    """Positions of these sequences that earlier forwards already saw (cached generation: the
    prompt and the tokens generated so far); 0 for a forward over whole sequences."""
    input_ids: Tensor | None = None
    """The forward's token ids, [B, S] (None when the model was called without them)."""
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



class StickyGate(ScopeGate):
    """A token gate made sticky: once a position of a sequence is admitted, every later real
    position of it is admitted too (MicroEdit's `gate_sticky`). The answer's later tokens then read
    the edited reconstruction as the position that asked the question did: a causal counterpart of
    the paper's sequence switch, which substitutes a whole admitted input and what is generated from
    it. With a KV cache, a forward over new tokens (`view.past` > 0) continues the decisions of the
    forward before it on the same sequences; any other forward starts afresh."""

    def __init__(self, inner: ScopeGate):
        if inner.unit != "token":
            raise ValueError("a sticky gate needs a token gate (unit='token')")
        super().__init__(inner.tau, inner.unit)
        self.inner, self.name, self.admits_high = inner, inner.name, inner.admits_high
        self._on: Tensor | None = None  # [B]: some position so far was admitted
        self._len = 0

    def statistic(self, view: LatentView) -> Tensor:
        return self.inner.statistic(view)

    def admit(self, view: LatentView) -> Tensor:
        admit = self.inner.admit(view) & view.valid
        run = admit.to(torch.uint8).cummax(1).values.bool()
        if self._on is not None and view.past > 0 and view.past == self._len and self._on.shape[0] == admit.shape[0]:
            run = run | self._on[:, None].to(run.device)
        self._on, self._len = run[:, -1].clone(), view.past + run.shape[1]
        return run & view.valid


class SubjectOverlapGate(OverlapGate):
    """The overlap gate, plus a clause that uses each edit's subject keys (MicroEdit: the active
    latents at the subject's last token in its prompt, and in the subject alone): position t is also
    admitted for edit e when its own overlap with e's key is >= `low_tau` and some position s <= t
    of the same sequence has overlap >= `subject_tau` with one of e's subject keys. A rephrase keeps the subject and changes the template (its
    last token overlaps e's key only partly); a neighbourhood prompt keeps the template and changes
    the subject (no position matches e's subject key), so the lower threshold only applies where
    the subject is in the input.

    Causal: the look-back is a running max over positions. With a KV cache, a forward over new
    tokens (`view.past` > 0) continues the running max the gate kept from the forward before it on
    the same sequences; any other forward starts afresh.
    """

    def __init__(self, tau: float, edit_masks: Callable[[], Tensor | None],
                 subject_masks: Callable[[], Sequence[Tensor] | None], low_tau: float, subject_tau: float,
                 unit: str = "token", subject_tokens: Callable[[], "SubjectTokens | None"] | None = None):
        super().__init__(tau, edit_masks, unit)
        self.subject_masks = subject_masks  # -> [E, n] bool matrices, rows aligned with edit_masks (empty row: no key)
        self.subject_tokens = subject_tokens  # -> the subjects' token sequences (subject_key="tokens"), or None
        self.low_tau = float(low_tau)
        self.subject_tau = float(subject_tau)
        self._seen: Tensor | None = None  # [B, E] running max of the subject overlap so far
        self._seen_len = 0

    def reset(self) -> None:
        self._seen, self._seen_len = None, 0

    def subject_seen(self, view: LatentView, subjects: Sequence[Tensor]) -> Tensor:
        """[B, S, E]: max over positions s <= t (real tokens only, earlier cached forwards included)
        and over each edit's subject keys of their overlap with position s."""
        found = self.subject_tokens() if self.subject_tokens is not None else None
        if found is not None and view.input_ids is not None:  # the subject's tokens end here: 1, else 0
            now = found.hits(view.input_ids, len(subjects[0])).to(view.z.dtype)
        else:
            active = view.acts > 0
            now = torch.stack([jaccard(view.idx, active, m) for m in subjects]).amax(0)
        now = now.masked_fill(~view.valid[..., None], 0.0)
        B, E = now.shape[0], now.shape[-1]
        carried = self._seen is not None and view.past > 0 and view.past == self._seen_len \
            and self._seen.shape == (B, E)
        if carried:
            now = torch.cat([self._seen[:, None].to(now), now], 1)
        run = now.cummax(1).values[:, 1:] if carried else now.cummax(1).values
        self._seen, self._seen_len = run[:, -1].clone(), view.past + run.shape[1]
        return run

    def admit(self, view: LatentView) -> Tensor:
        masks, subjects = self.edit_masks(), self.subject_masks()
        if masks is None or masks.shape[0] == 0:
            self.reset()
            return torch.zeros(view.valid.shape, dtype=torch.bool, device=view.z.device)
        last = jaccard(view.idx, view.acts > 0, masks)  # [B, S, E]
        admit = last.amax(-1) >= self.tau
        if subjects and all(m.shape[0] == masks.shape[0] for m in subjects):
            both = (last >= self.low_tau) & (self.subject_seen(view, subjects) >= self.subject_tau)
            admit = admit | both.any(-1)
        if self.unit == "sequence":
            admit = (admit & view.valid).any(-1, keepdim=True).expand_as(view.valid)
        return admit


class SubjectTokens:
    """Each live edit's subject as token sequences (MicroEdit's `subject_key="tokens"`): where a
    sequence of them ends in an input, that edit's subject has been read (an exact match on ids,
    whatever the position: a model with absolute positions gives the same subject different latents
    at different places)."""

    def __init__(self, patterns: Sequence[Sequence[tuple[int, ...]]]):
        self.by_pattern: dict[tuple[int, ...], list[int]] = {}
        for edit, seqs in enumerate(patterns):
            for seq in seqs:
                if seq:
                    self.by_pattern.setdefault(tuple(seq), []).append(edit)
        self.lengths = sorted({len(p) for p in self.by_pattern})

    def hits(self, input_ids: Tensor, n_edits: int) -> Tensor:
        """[B, S, E] bool: an edit's subject tokens end at position s."""
        B, S = input_ids.shape
        out = torch.zeros(B, S, n_edits, dtype=torch.bool)
        rows = input_ids.tolist()
        for b, ids in enumerate(rows):
            for n in self.lengths:
                for end in range(n - 1, S):
                    edits = self.by_pattern.get(tuple(ids[end - n + 1:end + 1]))
                    if edits:
                        out[b, end, edits] = True
        return out.to(input_ids.device)


def jaccard(idx: Tensor, active: Tensor, masks: Tensor, chunk: int = 256) -> Tensor:
    """|A_s & M_e| / |A_s | M_e| for every position s and edit e, [B, S, E].

    idx, active: [B, S, k] (a latent counts when selected with a positive activation);
    masks: [E, n] bool. Chunked over edits so memory stays [chunk, B*S, k].
    """
    lead = idx.shape[:-1]
    flat_idx = idx.reshape(-1, idx.shape[-1])
    flat_active = active.reshape(-1, idx.shape[-1])
    size_a = flat_active.sum(-1).float()  # [N]
    sizes_m = masks.sum(-1).float()  # [E]
    out = []
    for start in range(0, masks.shape[0], chunk):
        block = masks[start:start + chunk]  # [c, n]
        inter = (block[:, flat_idx] & flat_active).sum(-1).float()  # [c, N]
        union = size_a[None] + sizes_m[start:start + chunk, None] - inter
        out.append((inter / union.clamp_min(1.0)).T)
    if not out:
        return torch.zeros(*lead, 0, device=idx.device)
    return torch.cat(out, -1).reshape(*lead, masks.shape[0])


def max_jaccard(idx: Tensor, active: Tensor, masks: Tensor, chunk: int = 256) -> Tensor:
    """max_e |A_s & M_e| / |A_s | M_e| for every position s, [B, S] (0 with no edit)."""
    if masks.shape[0] == 0:
        return torch.zeros(idx.shape[:-1], device=idx.device)
    return jaccard(idx, active, masks, chunk).amax(-1)


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


class OverlapNull:
    """The null distribution of the overlap gate's statistic, kept as a histogram of Jaccard
    overlaps between each live edit's key and inputs that are *not* about that edit's subject but
    look like its prompt: the last prompt token of every other live edit whose subject differs,
    and every position of the reference lines that do not mention the subject and hold the same
    token as the key's position (the hard negatives: all reference positions would make a null
    of easy ones, measured: tau 0.15 instead of 0.23, a third of unedited neighbours admitted).
    `tau(E, alpha)` is the smallest threshold at which such an input passes any of E keys with
    probability <= alpha (union bound: the 1 - alpha/E quantile), a family-wise false-admission
    rate. Built only from what an editor may see: the reference corpus and the edit requests.
    """

    BINS = 4096

    def __init__(self, n_latents: int):
        self.n = n_latents
        self.ref_idx: Tensor | None = None  # [P, k] latent ids of each reference position
        self.ref_active: Tensor | None = None  # [P, k] selected with a positive activation
        self.ref_line: Tensor | None = None  # [P] index into ref_lines
        self.ref_token: Tensor | None = None  # [P] the token at each reference position
        self.ref_lines: list[str] = []
        self.hist = torch.zeros(self.BINS, dtype=torch.float64)

    def set_reference(self, idx: Tensor, active: Tensor, line: Tensor, token: Tensor, lines: list[str]) -> None:
        self.ref_idx, self.ref_active, self.ref_line = idx.cpu(), active.cpu(), line.cpu()
        self.ref_token, self.ref_lines = token.cpu(), list(lines)

    @property
    def count(self) -> int:
        return int(self.hist.sum())

    def _add(self, values: Tensor, sign: float = 1.0) -> None:
        if values.numel():
            bins = (values.double() * self.BINS).long().clamp(0, self.BINS - 1)
            self.hist += sign * torch.bincount(bins, minlength=self.BINS).double()

    def overlaps(self, key: Tensor, token: int, subject: str, others: Tensor | None,
                 other_subjects: list[str]) -> Tensor:
        """Jaccard of `key` (row ids, read at a position holding `token`) with the reference
        positions holding the same token off its subject, and with the keys in `others` ([E, n]
        bool) whose subject differs."""
        key = key.cpu()
        out = []
        if self.ref_idx is not None and len(self.ref_idx):
            in_key = torch.zeros(self.n, dtype=torch.bool)
            in_key[key] = True
            off = torch.tensor([subject not in line for line in self.ref_lines], dtype=torch.bool)
            keep = off[self.ref_line] & (self.ref_token == token)
            inter = (in_key[self.ref_idx[keep]] & self.ref_active[keep]).sum(-1).float()
            size = self.ref_active[keep].sum(-1).float()
            out.append(inter / (size + len(key) - inter).clamp_min(1.0))
        if others is not None and others.shape[0]:
            differ = torch.tensor([o != subject for o in other_subjects], dtype=torch.bool)
            others = others.cpu()[differ]
            inter = others[:, key].sum(-1).float()
            out.append(inter / (others.sum(-1).float() + len(key) - inter).clamp_min(1.0))
        return torch.cat(out) if out else torch.zeros(0)

    def add(self, key: Tensor, token: int, subject: str, others: Tensor | None, other_subjects: list[str]) -> None:
        """Count a new edit's null overlaps (with the reference and with the earlier keys)."""
        self._add(self.overlaps(key, token, subject, others, other_subjects))

    def rebuild(self, keys: list[Tensor], tokens: list[int], subjects: list[str]) -> None:
        """Recount from scratch (after a rollback or a restored state)."""
        self.hist.zero_()
        masks = torch.zeros(len(keys), self.n, dtype=torch.bool)
        for i, key in enumerate(keys):
            masks[i, key.cpu()] = True
        for i, key in enumerate(keys):
            self.add(key, tokens[i], subjects[i], masks[:i], subjects[:i])

    def tau(self, n_edits: int, alpha: float) -> float | None:
        """Smallest bin edge t with P(null >= t) <= alpha / n_edits; None with no null counted."""
        total = float(self.hist.sum())
        if total == 0:
            return None
        tail = self.hist.flip(0).cumsum(0).flip(0) / total  # tail[b] = P(null in bins >= b)
        ok = (tail <= alpha / max(1, n_edits)).nonzero()
        if ok.numel() == 0:  # even exact matches are common in the null: admit only exact keys
            return 1.0
        return float(ok[0, 0]) / self.BINS
