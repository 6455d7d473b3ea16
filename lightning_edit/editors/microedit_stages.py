"""MicroEdit's machinery, as named pieces: the decoder rows one edit optimises (Eq. 8, 13, 14), its
two stages (Eq. 11; Eq. 10 + 11), the pass-through splice stage 2 runs in, and the log of edited
decoder rows (base values, undo records, rollback). `microedit.py` puts them together.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

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
    outside M stay bit-identical and a step costs O(|rows read| d), not O(n d).
    """

    def __init__(self, W_dec: Tensor, b_dec: Tensor, acts: Tensor, idx: Tensor, rows: Tensor):
        used = torch.cat([idx.flatten(), rows]).unique()  # sorted: every row the edit input reads, M included
        self.acts, self.b_dec = acts, b_dec
        self.local_idx = torch.searchsorted(used, idx)
        self.local_rows = torch.searchsorted(used, rows)
        self.W_used = W_dec.detach()[used].clone()
        self.before = W_dec.detach()[rows].clone()
        self.param = self.before.clone().requires_grad_(True)

    def reconstruct(self) -> Tensor:
        """Eq. 8 with the masked rows as they are now: z_hat per token, [L, d]."""
        W = self.W_used.index_copy(0, self.local_rows, self.param)
        return F.embedding_bag(self.local_idx, W, per_sample_weights=self.acts, mode="sum") + self.b_dec


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
           max_steps: int, stop_nll: float, holder: dict[str, Tensor]) -> tuple[int, float, float]:
    """Adam on rec_weight L_rec + L_edit (Eq. 10 + 11) with z_hat substituted at layer l (run inside
    `substituting(..., holder)`), until every target token's NLL is below `stop_nll` or `max_steps`.
    Returns (steps, mean target NLL before, after)."""
    target = input_ids[0, start:]
    nll_before = nll_after = math.nan
    steps = 0
    for steps in range(max_steps + 1):
        holder["z_hat"] = z_hat = decoder.reconstruct()
        logits = model(input_ids=input_ids, use_cache=False).logits[0, start - 1:-1]
        nll = F.cross_entropy(logits.float(), target, reduction="none")  # [n_target]
        nll_after = nll.mean().item()
        if steps == 0:
            nll_before = nll_after
        if nll.max().item() < stop_nll or steps == max_steps:
            break
        loss = rec_weight * rec_loss(z_hat) + nll.mean()  # Eq. 10 + Eq. 11
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
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
        return with_hidden(self.example, self.holder["z_hat"][None].to(hidden_states.dtype))


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
            return with_hidden(output, holder["z_hat"][None].to(hidden_of(output).dtype))

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
        """Edit id -> its row mask M (live edits), for the overlap gate."""

    @torch.no_grad()
    def write(self, rows: Tensor, before: Tensor, after: Tensor, edit_id: int) -> None:
        """Write an edit's rows into W_dec (only those rows), and log base values and undo data."""
        new = rows[~self.changed[rows]]
        if new.numel():
            self.base_rows = torch.cat([self.base_rows, self.W_dec.detach()[new].clone()])
            self.changed_rows = torch.cat([self.changed_rows, new])
            self.changed[new] = True
        self.W_dec.data.index_copy_(0, rows, after.to(self.W_dec.dtype))
        if self.keep_undo_log:
            self.undo[edit_id] = _Undo(rows.clone(), before, after)
        self.masks[edit_id] = rows.clone()

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
        self.undo = {int(i): _Undo(u["rows"].to(dev).long(), u["before"].to(dev, W.dtype),
                                   u["after"].to(dev, W.dtype), bool(u["live"]))
                     for i, u in state["undo"].items()}
