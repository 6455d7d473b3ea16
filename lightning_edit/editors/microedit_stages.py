"""MicroEdit's machinery, as named pieces: the decoder rows one edit optimises (Eq. 8, 13, 14), its
two stages (Eq. 11; Eq. 10 + 11), the pass-through splice stage 2 runs in, and the log of edited
decoder rows (base values, undo records, rollback). `microedit.py` puts them together.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_edit.models import hidden_of, with_hidden


# --- one edit: the rows it may change, and the two stages ---------------------------------------------


def row_mask(acts: Tensor, idx: Tensor, prompt_pos: Tensor, use_topk_mask: bool, mask_tokens: str) -> Tensor:
    """Eq. 13's M: the latents active (top-k, positive) on the edit prompt's tokens ("all") or its
    last token ("last"), sorted; without the top-k mask (ablation) every row prompt + target reads."""
    if use_topk_mask:
        mask_pos = prompt_pos if mask_tokens == "all" else prompt_pos[-1:]
        sel_idx, sel_act = idx[mask_pos], acts[mask_pos]
        return sel_idx[sel_act > 0].unique()
    return idx[acts > 0].unique()


class MaskedDecoder:
    """The decoder rows an edit reads, with its masked rows M as the one trainable tensor `param`.

    Eq. 14 is run on a copy of M's rows only (a fresh Adam per edit, written back afterwards), so rows
    outside M stay bit-identical and a step costs O(|rows read| d), not O(n d). `others` are the codes
    (acts, idx) of further inputs read through the same rows (earlier edits replayed under
    conflict="resolve"): row 0 of `reconstruct_batch` is the edit's own input, the others follow.
    """

    def __init__(self, W_dec: Tensor, b_dec: Tensor, acts: Tensor, idx: Tensor, rows: Tensor,
                 others: Sequence[tuple[Tensor, Tensor]] = ()):
        codes = [(acts, idx)] + list(others)
        used = torch.cat([i.flatten() for _, i in codes] + [rows]).unique()  # sorted: every row read, M included
        k = idx.shape[-1]
        self.n_in, self.batch = idx.shape[0], len(codes)
        self.length = max(i.shape[0] for _, i in codes)
        batch_idx = torch.zeros(self.batch, self.length, k, dtype=torch.long, device=idx.device)
        batch_acts = acts.new_zeros(self.batch, self.length, k)  # padding positions read nothing
        for b, (a, i) in enumerate(codes):
            batch_idx[b, :len(i)], batch_acts[b, :len(i)] = i, a
        self.b_dec = b_dec
        self.local_idx = torch.searchsorted(used, batch_idx).view(-1, k)
        self.flat_acts = batch_acts.view(-1, k)
        self.local_rows = torch.searchsorted(used, rows)
        self.W_used = W_dec.detach()[used].clone()
        self.before = W_dec.detach()[rows].clone()
        self.param = self.before.clone().requires_grad_(True)

    def _decode(self, W: Tensor, n: int) -> Tensor:
        return F.embedding_bag(self.local_idx[:n], W, per_sample_weights=self.flat_acts[:n], mode="sum") + self.b_dec

    def reconstruct(self) -> Tensor:
        """Eq. 8 with the masked rows as they are now: z_hat per token of the edit's input, [L, d]."""
        return self._decode(self.W_used.index_copy(0, self.local_rows, self.param), self.n_in)

    def reconstruct_batch(self) -> Tensor:
        """z_hat for the edit's input and every replayed one, right-padded, [B, L, d]."""
        W = self.W_used.index_copy(0, self.local_rows, self.param)
        return self._decode(W, self.batch * self.length).view(self.batch, self.length, -1)

    def reconstruct_views(self, keep: Tensor) -> Tensor:
        """z_hat of the edit's input with only the rows `keep[v]` ([V, |M|] bool) edited, the others at
        their values before the edit, [V, L, d] (robust views)."""
        out = [self._decode(self.W_used.index_copy(0, self.local_rows, torch.where(k[:, None], self.param,
                                                                                   self.before)), self.n_in)
               for k in keep]
        return torch.stack(out)


@dataclass
class Replay:
    """An edit's own input as the editor saw it (prompt + target ids, the fixed top-k code): what
    conflict="resolve" replays when a later edit trains rows it reads."""

    input_ids: Tensor  # [L]
    start: int  # first target position
    idx: Tensor  # [L, k]
    acts: Tensor  # [L, k]
    z: Tensor | None = None  # [L, d]: layer l's output (stage2_splice="gated")
    splice: Tensor | None = None  # [L] bool: positions stage 2 gives z_hat (None: every one)


def stage1(decoder: MaskedDecoder, optimizer: torch.optim.Optimizer, rec_loss: Callable[[Tensor], Tensor],
           max_steps: int, stop: float) -> int:
    """Distance regularisation (no LM forward): Adam on L_rec = ARD(x_e) (Eq. 11) until it is <= `stop`
    or `max_steps` steps are taken. Returns the steps taken."""
    steps = 0
    for steps in range(max_steps + 1):
        loss = rec_loss(decoder.reconstruct())
        if loss.item() <= stop or steps == max_steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps


def stage2(model: nn.Module, input_ids: Tensor, start: int, decoder: MaskedDecoder,
           optimizer: torch.optim.Optimizer, rec_loss: Callable[[Tensor], Tensor], rec_weight: float,
           max_steps: int, stop_nll: float, holder: dict[str, Tensor], replay: Sequence[Replay] = (),
           pad_id: int = 0, views: int = 0, keep_share: float = 1.0, seed: int = 0,
           lazy_replay: bool = False, active_set: bool = False, log_hinge: bool = False,
           stats: dict[str, Any] | None = None,
           pass_through: tuple[Tensor, Tensor] | None = None) -> tuple[int, float, float]:
    """Adam on rec_weight L_rec + L_edit (Eq. 10 + 11) with z_hat substituted at layer l (run inside
    `substituting(..., holder)`), until every target token's NLL is below `stop_nll` or `max_steps`.
    Returns (steps, mean target NLL before, after).

    replay (conflict="resolve"): earlier edits read through `decoder`'s rows, in the same batch
    (`decoder` built with their codes as `others`); each one's worst target-token NLL may not end
    above its limit (the margin, or where this edit found it if above) under a hinge, and the stage
    is done only when all of them are back under it. lazy_replay: the replayed inputs join the batch
    only at the first step (their limits), once the edit itself is done (a check), and from the
    first check that finds one of them broken on (the joint hinge steps); otherwise at every step.
    active_set (with lazy_replay): the joint steps carry only the replayed edits some check found
    broken (the others have a zero hinge, so no gradient), and every replayed edit is checked again
    whenever the edit and those are done; the stage ends only after a check that finds none broken.
    log_hinge: the hinge on log NLL (relu(log nll - log limit)) instead of NLL: the NLL's gradient
    shrinks with the NLL itself, so near a margin of 0.01 the plain hinge barely pulls against L_rec.
    views (robust views): the edit's input is also trained in `views` copies in which only a random
    share `keep_share` of M carries the edit.
    pass_through: (z [B, L, d], splice [B, L] bool) for the edit's input and the replayed ones:
    positions outside `splice` get z instead of z_hat (stage2_splice="gated": as the gate will
    route them); L_rec is taken on z_hat all the same.
    stats: filled with "replay_joint_steps" (steps that carried replayed inputs), "replay_checks",
    "replay_broken" (replayed edits above their limit at the end) and "replay_forwards" (replayed
    inputs run).
    """
    target = input_ids[0, start:]
    n_in = input_ids.shape[1]
    batch_ids = torch.full((decoder.batch, decoder.length), pad_id, dtype=torch.long, device=input_ids.device)
    for b, ids in enumerate([input_ids[0]] + [r.input_ids for r in replay]):
        batch_ids[b, :len(ids)] = ids
    gen = torch.Generator().manual_seed(seed)
    n_rows = len(decoder.local_rows)
    nll_before = nll_after = math.nan
    replay_limit = None
    everyone = list(range(1, decoder.batch))
    active: list[int] = [] if (lazy_replay and active_set) else everyone  # replayed rows of the joint steps
    joint = not lazy_replay
    check = bool(replay)  # the first step measures the replayed edits' limits
    counts = {"replay_joint_steps": 0, "replay_checks": 0, "replay_broken": 0, "replay_forwards": 0}
    steps = 0
    for steps in range(max_steps + 1):
        with_replay = bool(replay) and (joint or check)
        sel = [0] + (everyone if check or not active_set else active) if with_replay else [0]
        z_rec = decoder.reconstruct_batch()
        z_hat_b = z_rec if pass_through is None else torch.where(pass_through[1][..., None], z_rec,
                                                                 pass_through[0].to(z_rec.dtype))
        z_hat_b = z_hat_b[:1] if len(sel) == 1 else z_hat_b[sel]
        ids = batch_ids[sel]
        if with_replay:
            counts["replay_forwards"] += len(sel) - 1
            counts["replay_checks" if check else "replay_joint_steps"] += 1
        if views:
            keep = (torch.rand(views, n_rows, generator=gen) < keep_share).to(z_hat_b.device)
            z_hat_v = decoder.reconstruct_views(keep)
            if pass_through is not None:
                z_hat_v = torch.where(pass_through[1][0, :n_in, None], z_hat_v, pass_through[0][0, :n_in].to(z_hat_v.dtype))
            z_hat_v = F.pad(z_hat_v, (0, 0, 0, decoder.length - n_in))
            holder["z_hat"] = torch.cat([z_hat_b, z_hat_v])
            ids = torch.cat([ids, batch_ids[:1].expand(views, -1)])
        else:
            holder["z_hat"] = z_hat_b
        logits = model(input_ids=ids, use_cache=False).logits
        nll = F.cross_entropy(logits[0, start - 1:n_in - 1].float(), target, reduction="none")  # [n_target]
        nll_after = nll.mean().item()
        if steps == 0:
            nll_before = nll_after
        done = nll.max().item() < stop_nll
        loss = rec_weight * rec_loss(z_rec[0, :n_in]) + nll.mean()  # Eq. 10 + Eq. 11
        n_b = len(sel)
        if views:  # the partial views: the target at the margin too
            view_nll = F.cross_entropy(logits[n_b:, start - 1:n_in - 1].float().flatten(0, 1),
                                       target.repeat(views), reduction="none")
            done = done and view_nll.max().item() < stop_nll
            loss = loss + view_nll.mean()
        if with_replay:  # earlier edits: each one's worst target token may not end above its limit
            chosen = [replay[b - 1] for b in sel[1:]]
            old = torch.stack([F.cross_entropy(logits[j, r.start - 1:len(r.input_ids) - 1].float(),
                                               r.input_ids[r.start:], reduction="none").max()
                               for j, r in enumerate(chosen, 1)])
            if replay_limit is None:
                replay_limit = old.detach().clamp_min(stop_nll)
            limit = replay_limit[torch.tensor(sel[1:], device=old.device) - 1]
            over = old.detach() > limit
            broken = bool(over.any())
            if active_set and broken:
                active = sorted(set(active) | {sel[1 + j] for j in over.nonzero().flatten().tolist()})
            counts["replay_broken"] = int(over.sum()) if check or not active_set else counts["replay_broken"]
            joint = joint or (broken and steps > 0)
            done = done and not broken
            if log_hinge:  # in log NLL: a relative excess, whose pull does not vanish as the NLL nears 0
                loss = loss + F.relu(old.clamp_min(1e-12).log() - limit.log()).sum()
            else:
                loss = loss + F.relu(old - limit).sum()  # a hinge: only what broke
        elif replay and done:  # lazy: the edit is done; check the replayed edits before stopping
            check = True
            if steps < max_steps:
                continue
        if with_replay and active_set and done and not check:  # the active ones are fine: check all
            check = True
            if steps < max_steps:
                continue
        check = False
        if done or steps == max_steps:
            if with_replay and active_set and done:
                counts["replay_broken"] = 0
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if stats is not None:
        stats.update(counts)
    return steps, nll_before, nll_after


# --- the splice stage 2 runs in ---------------------------------------------------------------------


class _PassThrough(nn.Module):
    """Stands in for a decoder layer below l during stage 2: returns its input, in the layer's
    output structure."""

    def __init__(self, example: Any):
        super().__init__()
        self.example = example

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Any:
        return with_hidden(self.example, hidden_states)


class _Emit(nn.Module):
    """Stands in for layer l during stage 2: returns the current reconstruction z_hat."""

    def __init__(self, example: Any, holder: dict[str, Tensor]):
        super().__init__()
        self.example, self.holder = example, holder

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Any:
        return with_hidden(self.example, _batched(self.holder["z_hat"]).to(hidden_states.dtype))


def _batched(z_hat: Tensor) -> Tensor:
    return z_hat if z_hat.dim() == 3 else z_hat[None]


@contextlib.contextmanager
def substituting(adapter: Any, hookpoint: str, example: Any, holder: dict[str, Tensor]) -> Iterator[None]:
    """Forward passes in which `hookpoint` outputs `holder["z_hat"]` (stage 2 of an edit).

    When the hookpoint is a whole decoder layer, the layers up to l are not run at all: the LM is
    frozen and z is cached, so layers < l pass their input through and layer l emits z_hat (a
    stage-2 step then costs the layers above l only). `example` is one output of layer l (its
    structure: a tensor or a tuple). Other hookpoints use a forward hook.
    """
    index = next((i for i in range(adapter.num_layers) if adapter.layer_name(i) == hookpoint), None)
    if index is None:
        def substitute(module, args, output):
            return with_hidden(output, _batched(holder["z_hat"]).to(hidden_of(output).dtype))

        with adapter.hooks({hookpoint: substitute}):
            yield
        return
    layers = adapter.layers
    originals = [layers[i] for i in range(index + 1)]
    try:
        for i in range(index):
            layers[i] = _PassThrough(example)
        layers[index] = _Emit(example, holder)
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


# --- the log of edited rows -------------------------------------------------------------------------


@dataclass
class _Undo:
    rows: Tensor  # [m] long
    before: Tensor  # [m, d]
    after: Tensor  # [m, d]
    live: bool = True


class EditedRows:
    """Which decoder rows the edits changed, their base values, each live edit's row mask and undo record.

    Rollback: a row no later live edit touched is restored exactly (bit for bit) to its value before
    the edit; a row a later edit also changed gets that edit's own change subtracted (later edits keep
    theirs), and the later edits' undo records are shifted by the same amount, so the log reads as if
    the rolled-back edit had never happened.
    """

    def __init__(self, W_dec: Tensor, keep_undo_log: bool = True):
        n, d = W_dec.shape
        self.W_dec = W_dec
        self.keep_undo_log = keep_undo_log
        self.changed = torch.zeros(n, dtype=torch.bool, device=W_dec.device)
        self.changed_rows = torch.zeros(0, dtype=torch.long, device=W_dec.device)
        self.base_rows = W_dec.new_zeros(0, d)
        """Rows any edit ever changed, and their values in the base decoder (for `delta`, state, export)."""
        self.undo: dict[int, _Undo] = {}
        self.masks: dict[int, Tensor] = {}
        """Edit id -> its key (the row mask M before ownership; live edits), for the overlap gate."""
        self.owner = torch.full((n,), -1, dtype=torch.long, device=W_dec.device)
        """The live edit that trained each row last (-1: none); with conflict="own" nobody else may."""

    @torch.no_grad()
    def write(self, rows: Tensor, before: Tensor, after: Tensor, edit_id: int, key: Tensor | None = None) -> None:
        """Write an edit's rows into W_dec (only those rows), and log base values and undo data.
        `key`: the edit's full row mask when it trained only part of it (conflict="own"); default `rows`."""
        new = rows[~self.changed[rows]]
        if new.numel():
            self.base_rows = torch.cat([self.base_rows, self.W_dec.detach()[new].clone()])
            self.changed_rows = torch.cat([self.changed_rows, new])
            self.changed[new] = True
        self.W_dec.data.index_copy_(0, rows, after.to(self.W_dec.dtype))
        if self.keep_undo_log:
            self.undo[edit_id] = _Undo(rows.clone(), before, after)
        self.masks[edit_id] = (rows if key is None else key).clone()
        self.owner[rows] = edit_id

    @torch.no_grad()
    def rollback(self, edit_id: int) -> int:
        """Undo edit `edit_id`; returns how many of its rows were restored exactly."""
        undo = self.undo.get(edit_id)
        if undo is None:
            raise KeyError(f"edit {edit_id} has no undo record (keep_undo_log=False, or no such edit; "
                           f"edits with one: {sorted(self.undo)[:10]}...)")
        if not undo.live:
            raise ValueError(f"edit {edit_id} was already rolled back")
        W = self.W_dec.data
        delta = undo.after - undo.before  # [m, d]
        shared = torch.zeros(len(undo.rows), dtype=torch.bool, device=W.device)
        for later_id, later in self.undo.items():
            if later_id <= edit_id or not later.live:
                continue
            hit = torch.isin(undo.rows, later.rows)
            if not hit.any():
                continue
            shared |= hit
            # Shift the later edit's record by our change on the rows it shares with us.
            pos = torch.searchsorted(undo.rows, later.rows)  # undo.rows is sorted (unique())
            pos = pos.clamp_max(len(undo.rows) - 1)
            theirs = undo.rows[pos] == later.rows
            later.before[theirs] -= delta[pos[theirs]]
            later.after[theirs] -= delta[pos[theirs]]
        exact = ~shared
        W.index_copy_(0, undo.rows[exact], undo.before[exact].to(W.dtype))
        if shared.any():
            W.index_add_(0, undo.rows[shared], -delta[shared].to(W.dtype))
        undo.live = False
        self.masks.pop(edit_id, None)
        self.owner[undo.rows[self.owner[undo.rows] == edit_id]] = -1
        return int(exact.sum())

    @contextlib.contextmanager
    def base_values(self) -> Iterator[None]:
        """Temporarily put the unedited values back into every changed row."""
        W = self.W_dec.data
        saved = W[self.changed_rows].clone()
        W.index_copy_(0, self.changed_rows, self.base_rows)
        try:
            yield
        finally:
            W.index_copy_(0, self.changed_rows, saved)

    def mask_matrix(self) -> Tensor:
        """[E, n] bool: one row per live edit, its row mask M."""
        n = self.W_dec.shape[0]
        masks = torch.zeros(len(self.masks), n, dtype=torch.bool, device=self.W_dec.device)
        for i, rows in enumerate(self.masks.values()):
            masks[i, rows] = True
        return masks

    def delta_table(self) -> tuple[Tensor, Tensor]:
        """(slot [n], rows [C+1, d]): W_dec - W_dec_0 on changed rows, a zero row for the rest."""
        W = self.W_dec.detach()
        n, d = W.shape
        c = len(self.changed_rows)
        slot = torch.full((n,), c, dtype=torch.long, device=W.device)
        slot[self.changed_rows] = torch.arange(c, device=W.device)
        rows = torch.cat([W[self.changed_rows] - self.base_rows, W.new_zeros(1, d)])
        return slot, rows

    def state_dict(self) -> dict[str, Any]:
        """The changed rows (ids, base and current values), the live masks and the undo log, on CPU."""
        W = self.W_dec.detach()
        return {
            "shape": list(W.shape),
            "changed_rows": self.changed_rows.cpu().clone(),
            "base_rows": self.base_rows.cpu().clone(),
            "rows": W[self.changed_rows].cpu().clone(),
            "masks": {str(i): m.cpu().clone() for i, m in self.masks.items()},
            "owner": self.owner.cpu().clone(),
            "undo": {str(i): {"rows": self.undo[i].rows.cpu().clone(), "before": self.undo[i].before.cpu().clone(),
                              "after": self.undo[i].after.cpu().clone(), "live": self.undo[i].live}
                     for i in sorted(self.undo)},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` onto the *base* decoder (checked row by row)."""
        W = self.W_dec.data
        if list(W.shape) != list(state["shape"]):
            raise ValueError(f"MicroEdit state has W_dec of shape {state['shape']}, this SAE {list(W.shape)}")
        dev = W.device
        changed = state["changed_rows"].to(dev).long()
        base = state["base_rows"].to(dev, W.dtype)
        current = W[changed]
        if not torch.equal(current, base) and not torch.equal(current, state["rows"].to(dev, W.dtype)):
            worst = (current - base).abs().max().item()
            raise ValueError("MicroEdit state was made on another SAE: the rows it changed do not hold "
                             f"their base values here (max difference {worst:.3g})")
        W.index_copy_(0, changed, state["rows"].to(dev, W.dtype))
        self.changed = torch.zeros(W.shape[0], dtype=torch.bool, device=dev)
        self.changed[changed] = True
        self.changed_rows, self.base_rows = changed.clone(), base.clone()
        self.masks = {int(i): m.to(dev).long() for i, m in state["masks"].items()}
        owner = state.get("owner")
        self.owner = (torch.full((W.shape[0],), -1, dtype=torch.long, device=dev) if owner is None
                      else owner.to(dev).long().clone())
        self.undo = {int(i): _Undo(u["rows"].to(dev).long(), u["before"].to(dev, W.dtype),
                                   u["after"].to(dev, W.dtype), bool(u["live"]))
                     for i, u in state["undo"].items()}
