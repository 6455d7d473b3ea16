"""MicroEdit (seeds/004): lifelong editing through the decoder rows of a top-k SAE.

A pretrained top-k SAE sits on the residual output of layer l. For edit t (Algorithm 1):
    z      = f_{<=l}(x_e)                      the layer's output on prompt + target, cached once
    h      = TopK(W_enc (z - b_dec) + b_enc)   Eq. 7, encoder frozen: the code is fixed for the edit
    z_hat  = sum_{i in I_k} h_i W_dec[i] + b_dec                                          Eq. 8
    M      = union of the active latents over the edit prompt's tokens (or its last token)  Eq. 13
    stage 1: minimise L_rec = ARD(x_e) = sum_s ||z_hat_s - z_s||^2 / (alpha S)             Eq. 11
    stage 2: minimise L_rec + L_edit, L_edit = -log P(y_e | z_hat substituted at layer l)  Eq. 10
    W_dec <- W_dec - lr * Adam(M * grad)                                                   Eq. 14
At inference (Algorithm 2) a scope gate decides, per input, whether layer l's output is replaced by
z_hat (`gates.py`: the paper's ARD switch, Eq. 12, and our alternatives).

Choices the paper leaves open, made here (each also documented at its config field):
- Eq. 14 is implemented by optimising a *copy of the masked rows only* with a fresh Adam per edit
  and writing them back: rows outside M stay bit-identical (no momentum or weight decay from
  earlier edits can reach them), and a step costs O(|active rows| d), not O(n d).
- Special tokens (BOS) are left out of the mask and of ARD: every input shares the BOS position,
  so editing its latents would edit every input.
- "Active" latents are those selected by top-k with a positive activation.
- Stage 1 stops when ARD(x_e) <= `stage1_stop`, stage 2 when every target token's NLL is below
  `stop_nll` (the margin criterion), each within its step budget.
- Gate statistics over a sequence average over its real tokens (padding and special tokens out).

Rollback (`rollback(edit_id)`) and the edited-row log: `microedit_stages.EditedRows`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from lightning_edit.editors.base import ComponentRequest, Editor, HeldRouting, LedgerEntry
from lightning_edit.editors.gates import (
    GATES,
    UNITS,
    AlwaysOn,
    ARDSwitch,
    DeltaGate,
    LatentView,
    OverlapGate,
    OverlapNull,
    ScopeGate,
    StickyGate,
    SubjectOverlapGate,
    SubjectTokens,
    ard_per_token,
    embedding_bag_delta,
    jaccard,
)
from lightning_edit.editors.microedit_stages import (
    EditedRows,
    MaskedDecoder,
    Replay,
    row_mask,
    stage1,
    stage2,
    substituting,
)
from lightning_edit.locate import Site, capture, evenly_spaced, run_until_captured
from lightning_edit.locate.positions import subject_last_token, subject_span
from lightning_edit.models import hidden_of, with_hidden
from lightning_edit.sparse import save_sparse_coders
from lightning_edit.tokens import encode_prompt, padding_side, target_positions

STATE_FORMAT = "lightning_edit.microedit/1"
CONFLICTS = ("share", "own", "resolve")


@dataclass
class MicroEditConfig:
    """MicroEdit's hyperparameters. Defaults are the paper's (App. C.1) where it gives one; the
    others are marked "not in the paper". configs/microedit.yaml holds the values for the embedded
    world and says why they differ."""

    hookpoint: str | None = None
    """Residual output the SAE reads and replaces (layer l), e.g. "layers.2"; None = the component's
    hookpoint (`component.hookpoint`). Paper: layer 30 of Llama-3-8B, 24 of Mistral-7B."""
    mask_tokens: str = "all"
    """Eq. 13's I_k: the union of active latents over "all" the edit prompt's tokens (paper) or the
    "last" prompt token only."""
    use_topk_mask: bool = True
    """Ablation "- TopK activation" (Table 4) when False: no row mask; every decoder row that gets
    a gradient (i.e. is active on some token of prompt + target) is updated."""
    lr: float = 5e-5
    """Adam learning rate on the masked decoder rows (paper: 5e-5, batch 1)."""
    alpha: float | str = 600.0
    """ARD scale (Eq. 11); paper: 600 for Llama-3-8B. "auto" = mean ||z||^2 per token over the
    reference corpus, which makes ARD a relative squared error for any model."""
    stage1_max_steps: int = 50
    """Step budget of stage 1 (distance regularisation on ARD). Not in the paper."""
    stage1_stop: float = 1e-3
    """Stage 1 stops once ARD(x_e) <= this. Not in the paper."""
    stage2_max_steps: int = 100
    """Step budget of stage 2 (ARD + L_edit). Not in the paper."""
    stop_nll: float = 0.5
    """Stage 2 stops once every target token's NLL < this (the margin criterion). Not in the paper."""
    rec_weight: float = 1.0
    """Weight of L_rec in stage 2 (Eq. 10 / Alg. 1 add them with weight 1)."""
    gate: str = "ard"
    """Scope gate at inference: "ard" (the paper's switch, Eq. 12), "delta" (ARD against the pre-edit
    decoder), "overlap" (Jaccard of active latents with an edit's rows) or "none" (always substitute)."""
    gate_unit: str | None = None
    """"sequence": one decision per input from its statistic over its tokens (Alg. 2);
    "token": a decision per position (causal: cached generation and teacher forcing agree);
    None = the gate's own: "sequence" for "ard" (as in the paper), "token" for "delta"/"overlap"."""
    tau: float | str = 0.5
    """The ARD switch's threshold (admit iff ARD <= tau); paper (alpha=600): 0.5 for T < 100, 0.55
    for T >= 100. "calibrate" = the `tau_quantile` quantile of ARD over the reference corpus with
    the unedited SAE."""
    delta_tau: float | str = "calibrate"
    """The delta gate's threshold (admit iff ||z_hat - z_hat_0||^2 / alpha >= delta_tau);
    "calibrate" = the same quantile of unedited ARD: the edit must move the reconstruction by more
    than the SAE's own error. Not in the paper."""
    overlap_tau: float | str = "calibrate"
    """The overlap gate's threshold: admit iff some edit's key (its row mask M; meant for
    mask_tokens="last", where M is one token's k latents) has Jaccard overlap >= this with a
    position's active latents. "calibrate" = the smallest tau at which an input about another
    subject passes any of the E live edits' keys with probability <= `overlap_alpha` (a family-wise
    rate, union bound: the 1 - alpha/E quantile of the null overlaps), the null being every pair of
    an edit's key with the last prompt token of another live edit whose subject differs, and with
    every position of the reference lines that do not mention the edit's subject and hold the same
    token as the key's position (`gates.OverlapNull`). Not in the paper."""
    overlap_alpha: float = 0.05
    """overlap_tau="calibrate" (and the subject gate's calibrated thresholds): the family-wise
    false-admission rate. Not in the paper."""
    subject_gate: bool = False
    """With gate="overlap": each edit also keeps subject keys, the active latents at the subject's
    last token in its prompt and in the subject alone (the record's `subject`); a position is then
    also admitted for an edit when its own overlap with the edit's key is >= `subject_low_tau` and
    some position at or before it (the gate looks back; cached generation keeps the running max)
    overlaps one of the edit's subject keys by >= `subject_tau` (`gates.SubjectOverlapGate`). A
    rephrase keeps the subject and changes the template; a neighbourhood prompt keeps the template
    and changes the subject. Not in the paper."""
    subject_key: str = "latents"
    """subject_gate: how the gate sees that an edit's subject was read: "latents" (the subject keys'
    overlap >= subject_tau) or "tokens" (ours: the subject's own token ids occur in the input, as
    they tokenize at the start of a text and after a space; exact, and blind to position, where a
    model with learned absolute positions gives one subject different latents at different places).
    Not in the paper."""
    subject_tau: float | str = "calibrate"
    """subject_gate: Jaccard threshold on the subject keys; "calibrate" = the family-wise rule of
    overlap_tau="calibrate" over the live subject keys and their own null (reference positions off
    the subject holding the key's token, other edits' subject keys of other subjects). Not in the paper."""
    subject_low_tau: float | str = "half"
    """subject_gate: the lower threshold on the last-token overlap once the edit's subject is seen;
    "half" = half the overlap gate's tau (fixed or calibrated); "calibrate" = the 1 - overlap_alpha
    quantile of the last-token null for one key (the subject already picked the edit, so no union
    bound over the E keys; measured too permissive: 0.03 on toyworld, where inputs about an edited
    subject's other facts then pass, Loc .93 -> .84 at T = 1000). Not in the paper."""
    tau_quantile: float = 0.99
    """Quantile used by "calibrate". Not in the paper."""
    tau_schedule: list[list[float]] | None = None
    """The ARD switch's tau by the number of edits made so far, as [[from_T, tau], ...]: the paper
    (App. C.1) uses 0.5 for T < 100 and 0.55 for T >= 100, i.e. [[0, 0.5], [100, 0.55]]; the
    last entry whose from_T <= T applies. None = `tau` at every T."""
    use_switch: bool = True
    """Ablation "- Shunting Mechanism" (Table 4) when False: the gate is "none"."""
    use_stage1: bool = True
    """Ablation "- Distance Regularization" (Table 4) when False: stage 2 only."""
    calib_samples: int = 512
    """Reference-corpus lines used for alpha="auto" and tau="calibrate". Not in the paper."""
    exclude_special_tokens: bool = True
    """Keep special tokens (BOS) out of the row mask and of ARD. Not in the paper (see module doc)."""
    default_sae_overrides: list[str] = field(default_factory=list)
    """SAE-job `key=value` overrides (configs/sae.yaml's keys, e.g. "coder.expansion_factor=64") for
    the SAE trained when `component.path` is null on an embedded world. Not in the paper."""
    conflict: str = "share"
    """What an edit does with decoder rows that earlier live edits' keys also use:
    "share" (the paper's Algorithm 1: train them, which moves the earlier edits' reconstructions);
    "resolve" (ours: train them, with the earlier edits that share the most rows replayed in the
    same stage-2 batch under a hinge that keeps each one's target NLL at most where this edit found
    it, or at the margin `stop_nll`; an earlier edit of the same subject whose key is in this one's
    scope is superseded instead: the latest edit of a fact wins); "own" (ours: leave rows a live
    edit trained as it left them and train only the free ones: earlier edits' prompts keep their
    reconstruction exactly, but later edits get fewer rows that their rephrases share). Not in the paper."""
    resolve_max: int = 32
    """conflict="resolve": at most this many earlier edits (those sharing the most rows) replayed per edit."""
    resolve_lazy: bool = True
    """conflict="resolve": the replayed edits join stage 2's batch at its first step (their limits),
    when the edit itself is done (a check), and at every step after a check found one broken;
    False = at every step (a batch of 1 + `resolve_max` forwards each step). Not in the paper."""
    resolve_active: bool = True
    """conflict="resolve" with resolve_lazy: the joint steps carry only the replayed edits a check
    found above their limit (an active set: the others have a zero hinge and give no gradient), and
    all of them are checked again whenever those and the edit are done. False = every replayed edit
    at every joint step. Not in the paper."""
    resolve_hinge: str = "log"
    """conflict="resolve": the hinge that keeps a replayed edit under its limit, on its worst target
    NLL ("nll") or on its log ("log": a relative excess; the NLL's own gradient vanishes near a
    small margin, where it loses to L_rec and the stage runs to its step cap). Not in the paper."""
    robust_views: int = 0
    """Stage 2 also trains this many views of the edit prompt in which only a random share
    `robust_keep` of the edit's rows carry the edit (the others keep their values from before it):
    an admitted rephrase activates only part of the edit's rows, and should flip as well.
    0 = off (the paper). Not in the paper."""
    robust_keep: float | str = "gate"
    """Share of the edit's rows kept in each robust view; "gate" = the overlap gate's least admitted
    share, 2 tau / (1 + tau) (a position with Jaccard tau against a key of its own size holds that
    share of the key), or 0.5 with another gate. Not in the paper."""
    gate_sticky: bool = False
    """With a token gate: once a position is admitted, the later positions of the same sequence are
    too (`gates.StickyGate`), so a multi-token answer's later tokens read the edited reconstruction
    (the paper's sequence switch does this for a whole admitted input). Not in the paper."""
    stage2_splice: str = "all"
    """Where stage 2 substitutes the reconstruction z_hat for the residual z in the edit's own input
    (and in replayed ones): "all" positions (Algorithm 1) or "gated" (ours, with gate="overlap"):
    only the positions the gate will admit once the edit is live (the key's position, positions
    whose overlap with the key passes the gate's tau, and, with subject_gate, those from the key's
    position on that pass subject_low_tau), z elsewhere, as at inference. With "all", the target's
    later tokens are trained on z_hat at positions the gate then leaves at z, so a multi-token edit
    can end below the margin in training and not land. Not in the paper."""
    keep_undo_log: bool = True
    """Keep each edit's rows before/after it (needed for rollback; 2 |M| d floats per edit)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"editor.{name} is {getattr(self, name)!r}; expected {expected}")

        if self.conflict not in CONFLICTS:
            raise bad("conflict", f"one of {', '.join(CONFLICTS)}")
        if self.resolve_hinge not in ("nll", "log"):
            raise bad("resolve_hinge", '"nll" or "log"')
        if self.mask_tokens not in ("all", "last"):
            raise bad("mask_tokens", '"all" or "last"')
        if self.gate not in GATES:
            raise bad("gate", f"one of {', '.join(GATES)}")
        if isinstance(self.alpha, str) and self.alpha != "auto":
            raise bad("alpha", 'a positive number or "auto"')
        if not isinstance(self.alpha, str) and not self.alpha > 0:
            raise bad("alpha", 'a positive number or "auto"')
        for name in ("tau", "delta_tau", "overlap_tau", "subject_tau"):
            if isinstance(getattr(self, name), str) and getattr(self, name) != "calibrate":
                raise bad(name, 'a number or "calibrate"')
        if isinstance(self.subject_low_tau, str) and self.subject_low_tau not in ("half", "calibrate"):
            raise bad("subject_low_tau", 'a number, "half" or "calibrate"')
        if self.gate_unit is not None and self.gate_unit not in UNITS:
            raise bad("gate_unit", f"one of {', '.join(UNITS)} or null")
        if self.stage2_splice not in ("all", "gated"):
            raise bad("stage2_splice", '"all" or "gated"')
        if self.subject_key not in ("latents", "tokens"):
            raise bad("subject_key", '"latents" or "tokens"')
        if self.robust_views < 0:
            raise bad("robust_views", "an integer >= 0")
        if self.robust_keep != "gate" and (isinstance(self.robust_keep, str) or not 0 < self.robust_keep <= 1):
            raise bad("robust_keep", 'a number in (0, 1] or "gate"')
        if not 0.0 < self.overlap_alpha < 1.0:
            raise bad("overlap_alpha", "a number in (0, 1)")
        if self.resolve_max < 0:
            raise bad("resolve_max", "an integer >= 0")
        if not 0.0 <= self.tau_quantile <= 1.0:
            raise bad("tau_quantile", "a number in [0, 1]")
        for name in ("stage1_max_steps", "stage2_max_steps", "calib_samples"):
            if getattr(self, name) < 0:
                raise bad(name, "an integer >= 0")
        if not self.lr > 0:
            raise bad("lr", "a positive number")
        if self.tau_schedule is not None:
            try:
                froms = [float(p[0]) for p in self.tau_schedule]
                ok = bool(froms) and all(len(p) == 2 and float(p[1]) > 0 for p in self.tau_schedule)
                ok = ok and froms[0] >= 0 and froms == sorted(froms)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise bad("tau_schedule", "a list of [from_T, tau] pairs with from_T >= 0 ascending, or null")

    @property
    def effective_gate(self) -> str:
        return self.gate if self.use_switch else "none"


class MicroEdit(HeldRouting, Editor):
    """MicroEdit behind the `Editor` interface. `component` is the TopKSparseCoder (SAE) at the
    hookpoint; the LM and the SAE encoder are never changed, only `component.W_dec` rows."""

    name = "microedit"
    config_class = MicroEditConfig
    component_kind = "sae"
    default_hookpoint = "layers.2"
    supports_batch = False
    supports_rollback = True

    @classmethod
    def component_request(cls, cfg: MicroEditConfig, component_cfg, adapter) -> ComponentRequest:
        """The SAE at `component.hookpoint`; without `component.path` on an embedded world, its default
        SAE trained with `editor.default_sae_overrides`."""
        request = super().component_request(cfg, component_cfg, adapter)
        return dataclasses.replace(request, default_overrides=tuple(cfg.default_sae_overrides))

    def setup(self) -> None:
        cfg, sae = self.cfg, self.component
        hookpoint = cfg.hookpoint or getattr(sae, "hookpoint", None)
        if hookpoint is None:
            raise ValueError("MicroEdit: no hookpoint (set editor.hookpoint, or component.hookpoint for the job "
                             "to record on the SAE it loads)")
        hookpoint = self.adapter.resolve_hookpoint(hookpoint, "editor.hookpoint")
        cfg.hookpoint = hookpoint
        self.sae = sae
        self.hookpoint = hookpoint
        self.adapter.module(self.hookpoint)  # fails early, naming valid hookpoints
        self.sae.requires_grad_(False)
        self.alpha: float | None = None if cfg.alpha == "auto" else float(cfg.alpha)
        self.taus: dict[str, float | None] = {
            "ard": None if cfg.tau == "calibrate" else float(cfg.tau),
            "delta": None if cfg.delta_tau == "calibrate" else float(cfg.delta_tau),
            "overlap": None if cfg.overlap_tau == "calibrate" else float(cfg.overlap_tau),
            "none": 0.0,
        }
        """Each gate's threshold, calibrated ones filled in by `prepare`."""
        self.reference_ard: Tensor | None = None
        """ARD of each reference line with the unedited SAE (what tau is calibrated on)."""
        self.rows = EditedRows(self.sae.W_dec, cfg.keep_undo_log)
        """The decoder rows the edits changed, their base values, masks and undo records."""
        self._subjects: dict[int, str] = {}  # edit id -> its subject (its prompt when it has none)
        self._key_tokens: dict[int, int] = {}  # edit id -> the token at its key position (last prompt token)
        self._null = OverlapNull(self.sae.W_dec.shape[0])
        """Null overlaps of the live keys, for overlap_tau="calibrate"."""
        self._null_stale = False
        self._said_no_null = False
        self._subject_keys: dict[int, list[tuple[Tensor, int]]] = {}
        """edit id -> (row ids, token) of its subject keys (subject_gate): in the prompt, and alone."""
        self._subject_ids: dict[str, list[tuple[int, ...]]] = {}  # subject -> its token ids (subject_key="tokens")
        self._subject_null = OverlapNull(self.sae.W_dec.shape[0])
        """Null overlaps of the live subject keys, for subject_tau="calibrate"."""
        self._replays: dict[int, Replay] = {}  # edit id -> its input (conflict="resolve"); rebuilt from the ledger
        self._special_ids = torch.tensor(sorted(set(getattr(self.tokenizer, "all_special_ids", []) or [])),
                                         dtype=torch.long)
        self._inside_apply = False
        self._output_example: Any = None
        self._eval_cache: dict[str, Any] = {}
        self._batch: dict[str, Tensor | None] = {}
        self._held: Tensor | None = None
        self._hold = False

    # --- calibration ------------------------------------------------------------------------

    def prepare(self, corpus: list[str] | None = None) -> None:
        """alpha="auto" and tau="calibrate" from a reference corpus, with the unedited SAE."""
        calibrated = [g for g, key in (("ard", "tau"), ("delta", "delta_tau"))
                      if getattr(self.cfg, key) == "calibrate"]
        need = self.cfg.alpha == "auto" or calibrated
        if not corpus:
            return
        lines = evenly_spaced([c for c in corpus if c.strip()], self.cfg.calib_samples)
        stats = self.scope_statistics(lines, gates=("ard",), base=True, alpha=1.0)
        if self.cfg.alpha == "auto":
            self.alpha = float(stats["z_sq"].sum() / stats["n_tokens"].sum())
        if self.cfg.overlap_tau == "calibrate" or self.cfg.subject_gate:
            codes = self._reference_codes(lines)
            self._null.set_reference(*codes, lines)
            self._subject_null.set_reference(*codes, lines)
            self._null_stale = True
        self.reference_ard = stats["ard"] / self.alpha
        for gate in calibrated:
            self.taus[gate] = float(torch.quantile(self.reference_ard, self.cfg.tau_quantile))
        if need:
            q = torch.quantile(self.reference_ard, torch.tensor([0.01, 0.5, 0.99]))
            gate = self.cfg.effective_gate
            tau = ("per edit count (overlap_tau=calibrate)" if gate == "overlap" and self.taus["overlap"] is None
                   else self.tau)
            _say(f"calibrated on {len(lines)} reference lines: alpha={self.alpha:.4g}, "
                 f"unedited ARD p1/p50/p99 = {q[0]:.3g}/{q[1]:.3g}/{q[2]:.3g}; gate {gate}, tau={tau}")

    @torch.no_grad()
    def _reference_codes(self, lines: Sequence[str], batch_size: int = 64) -> tuple[Tensor, ...]:
        """(idx [P, k], active [P, k], line [P], token [P]) of every real position of `lines` (the
        encoder is frozen: edits never change these)."""
        out: list[list[Tensor]] = [[], [], [], []]
        with padding_side(self.tokenizer, "right"):
            for first in range(0, len(lines), batch_size):
                batch = self.tokenizer(list(lines[first:first + batch_size]), return_tensors="pt",
                                       padding=True).to(self.device)
                hidden = self._capture(batch["input_ids"], batch["attention_mask"])
                acts, idx = self.sae.encode(hidden.to(self.sae.dtype))
                valid = batch["attention_mask"].bool() & self._not_special(batch["input_ids"])
                rows, cols = valid.nonzero(as_tuple=True)
                out[0].append(idx[rows, cols])
                out[1].append(acts[rows, cols] > 0)
                out[2].append(rows + first)
                out[3].append(batch["input_ids"][rows, cols])
        return tuple(torch.cat(o) for o in out)

    def overlap_tau(self) -> float:
        """The overlap gate's threshold now: fixed, or calibrated (`overlap_tau="calibrate"`) from
        the null overlaps of the live edits' keys (see `OverlapNull`)."""
        if self.taus["overlap"] is not None:
            return self.taus["overlap"]
        masks = self.rows.masks
        if not masks:  # no live edit: nothing to admit
            return 1.0
        self._refresh_nulls()
        tau = self._null.tau(len(masks), self.cfg.overlap_alpha)
        if tau is None:  # no reference corpus and no second edit yet: nothing to calibrate on
            if not self._said_no_null:
                _say("overlap_tau='calibrate' has no null overlaps yet (no reference corpus, one edit): "
                     "admitting exact key matches only until there are")
                self._said_no_null = True
            return 1.0
        return tau

    def _refresh_nulls(self) -> None:
        """Recount the null overlaps of the live keys (and subject keys) after a reference corpus was
        set, a rollback or a restored state."""
        if not self._null_stale:
            return
        masks = self.rows.masks
        live = list(masks)
        self._null.rebuild([masks[i] for i in live], [self._key_tokens.get(i, -1) for i in live],
                           [self._subjects.get(i, str(i)) for i in live])
        if self.cfg.subject_gate:
            pairs = [(key, token, self._subjects.get(i, str(i))) for i in live for key, token in self._subject_keys_of(i)]
            if pairs:
                self._subject_null.rebuild(*map(list, zip(*pairs)))
            else:
                self._subject_null.hist.zero_()
        self._null_stale = False

    def subject_taus(self) -> tuple[float, float]:
        """(subject_tau, subject_low_tau) now: fixed, or calibrated (see their config fields); 1.0
        (admit exact matches only) while there is no null to calibrate on."""
        cfg = self.cfg
        self._refresh_nulls()
        if cfg.subject_tau == "calibrate":
            n_keys = sum(len(keys) for keys in self._subject_keys.values())
            subject = self._subject_null.tau(n_keys, cfg.overlap_alpha) if n_keys else None
        else:
            subject = float(cfg.subject_tau)
        if cfg.subject_low_tau == "half":
            low = self.overlap_tau() / 2
        elif cfg.subject_low_tau == "calibrate":
            low = self._null.tau(1, cfg.overlap_alpha) if self.rows.masks else None
        else:
            low = float(cfg.subject_low_tau)
        return (1.0 if subject is None else subject), (1.0 if low is None else low)

    def _subject_matrices(self) -> list[Tensor] | None:
        """The subject keys as [E, n] bool matrices aligned with `_mask_matrix`'s rows: one per kind
        (in the prompt, alone); an edit without that key has an empty row."""
        if "subject_masks" not in self._eval_cache:
            ids = list(self.rows.masks)
            out = [torch.zeros(len(ids), self.sae.W_dec.shape[0], dtype=torch.bool, device=self.device)
                   for _ in range(2)]
            for row, edit_id in enumerate(ids):
                for kind, (key, _) in enumerate(self._subject_keys_of(edit_id)[:2]):
                    out[kind][row, key] = True
            self._eval_cache["subject_masks"] = out
        return self._eval_cache["subject_masks"]

    def _subject_keys_of(self, edit_id: int) -> list[tuple[Tensor, int]]:
        """An edit's subject keys, computed from the ledger when missing (a state saved without them)."""
        if edit_id not in self._subject_keys:
            entry = next(e for e in self.ledger if e.edit_id == edit_id)
            self._subject_keys[edit_id] = self._subject_codes(entry.prompt, self._subjects.get(edit_id))
        return self._subject_keys[edit_id]

    @torch.no_grad()
    def _subject_codes(self, prompt: str, subject: str | None) -> list[tuple[Tensor, int]]:
        """(active latents, token) at the subject's last token of `prompt`, and of the subject alone;
        [] when the prompt does not contain the subject (the edit keeps its last-token key only)."""
        if subject_span(prompt, subject) is None:
            return []
        out = []
        for text, pos in ((prompt, subject_last_token(self.tokenizer, prompt, subject)),
                          (subject.strip(), None)):
            ids = torch.tensor([encode_prompt(self.tokenizer, text)], dtype=torch.long, device=self.device)
            pos = ids.shape[1] - 1 if pos is None else pos
            acts, idx = self.sae.encode(self._capture(ids, None)[0].to(self.sae.dtype))
            out.append((idx[pos][acts[pos] > 0].unique(), int(ids[0, pos])))
        return out

    def _add_subject_null(self, edit_id: int, subject: str) -> None:
        """Count an edit's subject keys' null overlaps (before they join the live ones)."""
        masks = self._subject_matrices()
        others = torch.cat(masks) if masks else None
        other_subjects = [self._subjects.get(i, str(i)) for i in self.rows.masks] * len(masks or [])
        for key, token in self._subject_keys_of(edit_id):
            self._subject_null.add(key, token, subject, others, other_subjects)

    def _robust_keep(self) -> float:
        if self.cfg.robust_keep != "gate":
            return float(self.cfg.robust_keep)
        if self.cfg.effective_gate != "overlap":
            return 0.5
        tau = self.overlap_tau() if self.rows.masks else 0.5
        return 2 * tau / (1 + tau)

    @property
    def tau(self) -> float | None:
        """The threshold of the configured gate (the ARD switch's by the schedule, if one is set)."""
        gate = self.cfg.effective_gate
        if gate == "overlap":
            return self.overlap_tau()
        if gate == "ard" and self.cfg.tau_schedule:
            return scheduled_tau(self.cfg.tau_schedule, len(self.ledger))
        return self.taus[gate]

    def _alpha_or_fallback(self, z: Tensor) -> float:
        if self.alpha is None:  # alpha="auto" without prepare(): the first edit prompt's mean ||z||^2
            self.alpha = float(z.float().pow(2).sum(-1).mean())
            _say(f"alpha='auto' with no reference corpus: alpha={self.alpha:.4g} from the first edit prompt")
        return self.alpha

    # --- editing ------------------------------------------------------------------------------

    def apply(self, records: list) -> list[LedgerEntry]:
        entries = []
        for record in records:
            entries.append(self._edit_one(record, len(self.ledger)))
            self.ledger.append(entries[-1])
        return entries

    def _not_special(self, input_ids: Tensor) -> Tensor:
        if not self.cfg.exclude_special_tokens or self._special_ids.numel() == 0:
            return torch.ones_like(input_ids, dtype=torch.bool)
        return ~torch.isin(input_ids, self._special_ids.to(input_ids.device))

    def _edit_one(self, record, edit_id: int) -> LedgerEntry:
        """Algorithm 1 for one record: the row mask M, stage 1, stage 2, and M's rows written back."""
        cfg, sae = self.cfg, self.sae
        start_time = time.perf_counter()
        self._inside_apply = True
        try:
            ids, start = target_positions(self.tokenizer, record.prompt, record.target_new)
            input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
            z = self._capture(input_ids, None)[0].to(sae.dtype)  # [L, d]
            with torch.no_grad():
                acts, idx = sae.encode(z)  # [L, k]: fixed for the whole edit (encoder and LM frozen)
            prompt_pos = self._not_special(input_ids[0])[:start].nonzero().squeeze(1)
            if prompt_pos.numel() == 0:
                raise ValueError(f"edit {edit_id}: prompt {record.prompt!r} has no non-special token")
            alpha = self._alpha_or_fallback(z[prompt_pos])
            key = row_mask(acts, idx, prompt_pos, cfg.use_topk_mask, cfg.mask_tokens)  # Eq. 13
            rows = key[self.rows.owner[key] < 0] if cfg.conflict == "own" else key
            # conflict="resolve": earlier live edits whose key shares rows with M are solved again
            # with this one (their inputs replayed in the same stage-2 batch); an earlier edit of the
            # same fact is superseded instead.
            subject = getattr(record, "subject", None) or record.prompt
            superseded = self._superseded(key, subject) if cfg.conflict == "resolve" else []
            replay = self._replay_batch(rows, set(superseded)) if cfg.conflict == "resolve" else []
            splice = self._splice_mask(acts, idx, key, input_ids[0], prompt_pos[-1])
            pass_through = None
            if splice is not None:
                pass_through = self._pass_through(z, splice, replay)
            decoder = MaskedDecoder(sae.W_dec, sae.b_dec, acts, idx, rows, [(r.acts, r.idx) for r in replay])
            optimizer = torch.optim.Adam([decoder.param], lr=cfg.lr)  # fresh per edit: Eq. 14 on M only

            def rec_loss(z_hat: Tensor) -> Tensor:  # Eq. 11 over the edit prompt's tokens
                return ard_per_token(z[prompt_pos], z_hat[prompt_pos], alpha).mean()

            with torch.no_grad():
                ard_before = float(rec_loss(decoder.reconstruct()))
            steps1 = stage1(decoder, optimizer, rec_loss, cfg.stage1_max_steps, cfg.stage1_stop) \
                if cfg.use_stage1 else 0
            holder: dict[str, Tensor] = {}
            replay_stats: dict[str, Any] = {}
            with substituting(self.adapter, self.hookpoint, self._output_example, holder):
                views = cfg.robust_views if rows.numel() > 1 else 0
                steps2, nll_before, nll_after = stage2(
                    self.model, input_ids, start, decoder, optimizer, rec_loss, cfg.rec_weight,
                    cfg.stage2_max_steps, cfg.stop_nll, holder, replay=replay, pad_id=self._pad_id(),
                    views=views, keep_share=self._robust_keep() if views else 1.0, seed=edit_id,
                    lazy_replay=cfg.resolve_lazy, active_set=cfg.resolve_active,
                    log_hinge=cfg.resolve_hinge == "log", stats=replay_stats, pass_through=pass_through)
            before, after = decoder.before, decoder.param.detach().clone()
            with torch.no_grad():
                ard_after = float(rec_loss(decoder.reconstruct()))
                key_token = int(input_ids[0, prompt_pos[-1]])
                if cfg.subject_gate:
                    self._subject_keys[edit_id] = self._subject_codes(record.prompt, getattr(record, "subject", None))
                if not self._null_stale:  # count the new key's null overlaps before it joins the keys
                    self._null.add(key, key_token, subject, self._mask_matrix(),
                                   [self._subjects.get(i, str(i)) for i in self.rows.masks])
                    if cfg.subject_gate:
                        self._add_subject_null(edit_id, subject)
                self.rows.write(rows, before, after, edit_id, key)
                self._subjects[edit_id], self._key_tokens[edit_id] = subject, key_token
                if cfg.conflict == "resolve":
                    self._replays[edit_id] = Replay(input_ids[0], start, idx, acts,
                                                    z=None if splice is None else z, splice=splice)
                self._eval_cache.clear()
        finally:
            self._inside_apply = False
        return LedgerEntry.for_record(
            edit_id, record,
            changed={"W_dec": rows.tolist()},
            delta_norm=float((after - before).float().norm()),
            steps=steps1 + steps2,
            seconds=time.perf_counter() - start_time,
            metrics_before={"target_nll": nll_before, "ard": ard_before},
            metrics_after={"target_nll": nll_after, "ard": ard_after},
            extra={"stage1_steps": steps1, "stage2_steps": steps2, "rows": int(rows.numel()),
                   "rows_owned_by_earlier_edits": int(key.numel() - rows.numel()),
                   "replayed_edits": len(replay), "superseded_edits": superseded,
                   **replay_stats,
                   "reached_stop": bool(nll_after < cfg.stop_nll) if len(ids) - start == 1 else None},
        )

    def _pad_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))

    def _superseded(self, key: Tensor, subject: str) -> list[int]:
        """Earlier live edits this one rewrites: same subject, and keys in each other's scope
        (Jaccard >= the overlap gate's tau; the same key when another gate is used). They are not
        replayed: the latest edit of a fact wins."""
        if not self.rows.masks:
            return []
        ids = list(self.rows.masks)
        masks = self._mask_matrix()
        inter = masks[:, key].sum(1).float()
        jaccard = inter / (masks.sum(1).float() + len(key) - inter).clamp_min(1.0)
        tau = self.overlap_tau() if self.cfg.effective_gate == "overlap" else 1.0
        return [ids[i] for i in (jaccard >= tau).nonzero().flatten().tolist()
                if self._subjects.get(ids[i]) == subject]

    def _replay_batch(self, rows: Tensor, skip: set[int]) -> list[Replay]:
        """The earlier live edits whose key shares rows with `rows` (but those in `skip`), most
        shared first, at most `resolve_max`, with their inputs (re-encoded from the ledger when not
        cached, e.g. after load_state_dict: the LM and the encoder are frozen, so the code is the same)."""
        if not self.rows.masks or rows.numel() == 0 or self.cfg.resolve_max == 0:
            return []
        ids = list(self.rows.masks)
        shared = self._mask_matrix()[:, rows].sum(1)
        for i, other in enumerate(ids):
            if other in skip:
                shared[i] = 0
        order = torch.argsort(shared, descending=True, stable=True)[: self.cfg.resolve_max]
        out = []
        for i in order.tolist():
            if shared[i] == 0:
                break
            other = ids[i]
            if other not in self._replays:
                entry = next(e for e in self.ledger if e.edit_id == other)
                ids_o, start_o = target_positions(self.tokenizer, entry.prompt, entry.target)
                ids_o = torch.tensor([ids_o], dtype=torch.long, device=self.device)
                z_o = self._capture(ids_o, None)[0].to(self.sae.dtype)
                with torch.no_grad():
                    acts_o, idx_o = self.sae.encode(z_o)
                key_o = self.rows.masks[other]
                pos_o = self._not_special(ids_o[0])[:start_o].nonzero().squeeze(1)[-1]
                self._replays[other] = Replay(ids_o[0], start_o, idx_o, acts_o, z=z_o,
                                              splice=self._splice_mask(acts_o, idx_o, key_o, ids_o[0], pos_o))
            out.append(self._replays[other])
        return out

    def _splice_mask(self, acts: Tensor, idx: Tensor, key: Tensor, input_ids: Tensor, key_pos: Tensor | int
                     ) -> Tensor | None:
        """stage2_splice="gated": [L] bool, the positions of an edit's input (prompt + target, codes
        `acts`, `idx`) that the overlap gate will admit through the edit's own key (its position,
        overlap >= the gate's tau, and with subject_gate overlap >= subject_low_tau from the key's
        position on, where the subject has been read); None = every position ("all", other gates)."""
        cfg = self.cfg
        if cfg.stage2_splice != "gated" or cfg.effective_gate != "overlap":
            return None
        key_mask = torch.zeros(1, self.sae.W_dec.shape[0], dtype=torch.bool, device=idx.device)
        key_mask[0, key] = True
        overlap = jaccard(idx[None], acts[None] > 0, key_mask)[0, :, 0]  # [L]
        admit = overlap >= self.overlap_tau()
        if cfg.subject_gate:
            later = torch.arange(len(overlap), device=overlap.device) >= int(key_pos)
            admit |= later & (overlap >= self.subject_taus()[1])
        admit[int(key_pos)] = True
        real = self._not_special(input_ids)
        if cfg.gate_sticky:
            admit = (admit & real).to(torch.uint8).cummax(0).values.bool()
        return admit & real

    @staticmethod
    def _pass_through(z: Tensor, splice: Tensor, replay: Sequence[Replay]) -> tuple[Tensor, Tensor]:
        """(z, splice) of the edit's input and each replayed one, right-padded: [B, L, d], [B, L]."""
        items = [(z, splice)] + [(r.z, r.splice) for r in replay]
        length = max(len(s) for _, s in items)
        zs = z.new_zeros(len(items), length, z.shape[-1])
        masks = torch.zeros(len(items), length, dtype=torch.bool, device=z.device)
        for b, (z_b, s_b) in enumerate(items):
            zs[b, :len(s_b)] = z_b
            masks[b, :len(s_b)] = s_b
        return zs, masks

    def rollback(self, edit_id: int) -> None:
        """Undo edit `edit_id` (`EditedRows.rollback` says what happens to rows later edits touched)."""
        exact = self.rows.rollback(edit_id)
        for table in (self._replays, self._subjects, self._key_tokens, self._subject_keys):
            table.pop(edit_id, None)
        self._null_stale = True
        self._eval_cache.clear()
        for entry in self.ledger:
            if entry.edit_id == edit_id:
                entry.extra["rolled_back"] = True
                entry.extra["rollback_exact_rows"] = exact

    # --- inference ---------------------------------------------------------------------------

    def make_gate(self, name: str | None = None, tau: float | None = None, unit: str | None = None) -> ScopeGate:
        """The scope gate `name` (default: the config's), with this editor's alpha and its tau."""
        name = name or self.cfg.effective_gate
        if name not in GATES:
            raise ValueError(f"unknown gate {name!r}; choices: {', '.join(GATES)}")
        unit = unit or self.cfg.gate_unit or ("sequence" if name == "ard" else "token")
        if tau is None and name == "overlap":
            tau = self.overlap_tau()
        if tau is None and name == "ard" and self.cfg.tau_schedule:
            tau = scheduled_tau(self.cfg.tau_schedule, len(self.ledger))
        tau = self.taus[name] if tau is None else tau
        if name == "none":
            return AlwaysOn(unit=unit)
        if tau is None:
            raise ValueError(f"MicroEdit: the {name} gate's tau is 'calibrate' but prepare() has not "
                             "calibrated it (no reference corpus)")
        alpha = self.alpha if self.alpha is not None else 1.0
        if name == "ard":
            return ARDSwitch(tau, alpha, unit)
        if name == "delta":
            return self._sticky(DeltaGate(tau, alpha, unit))
        if self.cfg.subject_gate:
            self._subject_matrices()  # filled now: computing a missing key runs the model, not allowed inside its hook
            subject_tau, low_tau = self.subject_taus()
            tokens = self._subject_token_table if self.cfg.subject_key == "tokens" else None
            return self._sticky(SubjectOverlapGate(tau, self._mask_matrix, self._subject_matrices, low_tau,
                                                   subject_tau, unit, tokens))
        return self._sticky(OverlapGate(tau, self._mask_matrix, unit))

    def _sticky(self, gate: ScopeGate) -> ScopeGate:
        return StickyGate(gate) if self.cfg.gate_sticky and gate.unit == "token" else gate

    def _subject_token_table(self) -> SubjectTokens:
        """The live edits' subjects as token ids (subject_key="tokens"), rows as in `_mask_matrix`:
        the subject at the start of a text and after a space; none for an edit without a subject."""
        if "subject_tokens" not in self._eval_cache:
            prompts = {e.edit_id: e.prompt for e in self.ledger}
            patterns = []
            for edit_id in self.rows.masks:
                subject = self._subjects.get(edit_id)
                if not subject or not subject.strip() or subject == prompts.get(edit_id):  # no subject: its prompt
                    patterns.append([])
                    continue
                if subject not in self._subject_ids:  # tokenised once per subject, not at every rebuild
                    self._subject_ids[subject] = [tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                                                  for text in (subject.strip(), " " + subject.strip())]
                patterns.append(self._subject_ids[subject])
            self._eval_cache["subject_tokens"] = SubjectTokens(patterns)
        return self._eval_cache["subject_tokens"]

    def _mask_matrix(self) -> Tensor | None:
        if "masks" not in self._eval_cache:
            self._eval_cache["masks"] = self.rows.mask_matrix()
        return self._eval_cache["masks"]

    def _view(self, hidden: Tensor, valid: Tensor, past: int = 0) -> LatentView:
        sae = self.sae
        z = hidden.to(sae.dtype)
        acts, idx = sae.encode(z)
        z_hat = sae.decode(acts, idx)
        edit_delta = functools.partial(self._edit_delta, idx, acts) if len(self.rows.changed_rows) else None
        ids = self._batch.get("input_ids")
        ids = ids.to(hidden.device) if ids is not None and ids.shape == hidden.shape[:2] else None
        return LatentView(z=z, acts=acts, idx=idx, z_hat=z_hat, valid=valid, past=past, edit_delta=edit_delta,
                          input_ids=ids)

    def _edit_delta(self, idx: Tensor, acts: Tensor) -> Tensor:
        """The edits' share of the reconstruction (what the delta gate measures), [..., d]."""
        if "delta" not in self._eval_cache:
            self._eval_cache["delta"] = self.rows.delta_table()
        slot, rows = self._eval_cache["delta"]
        return embedding_bag_delta(idx, acts, slot, rows)

    def _valid_for(self, hidden: Tensor) -> Tensor:
        """[B, S] real tokens of the current forward, from the ids / mask the model was called with."""
        valid = self._attended(hidden)
        ids = self._batch.get("input_ids")
        if ids is not None and ids.shape == hidden.shape[:2]:
            valid = valid & self._not_special(ids.to(hidden.device))
        return valid

    def _past_length(self, hidden: Tensor) -> int:
        """Positions before this forward's (a KV-cached generation step): the attention mask covers
        them and the new tokens; 0 for a forward over whole sequences."""
        mask = self._batch.get("attention_mask")
        if mask is None or mask.dim() != 2 or mask.shape[0] != hidden.shape[0]:
            return 0
        return max(0, mask.shape[1] - hidden.shape[1])

    def _gate_hook(self, gate: ScopeGate):
        def hook(module, args, output):
            if self._inside_apply:
                return None
            hidden = hidden_of(output)
            with torch.no_grad():
                view = self._view(hidden, self._valid_for(hidden), self._past_length(hidden))
                admit = gate.admit(view)
                if self._hold and gate.unit == "sequence":  # generation: decide on the prompt, then hold
                    if self._held is None or self._held.shape[0] != admit.shape[0] or hidden.shape[1] > 1:
                        self._held = admit[:, -1].clone()
                    admit = self._held[:, None].expand_as(admit)
                if not admit.any():
                    return None
                new = torch.where(admit[..., None], view.z_hat.to(hidden.dtype), hidden)
            return with_hidden(output, new)

        return hook

    @contextlib.contextmanager
    def edited(self, gate: str | ScopeGate | None = None, hold: bool = False) -> Iterator[nn.Module]:
        """The model with the edited SAE spliced in at the hookpoint under the scope gate.

        gate: override the config's gate (a name or a ScopeGate). hold: for cached generation with
        a sequence gate, decide on the prompt and keep that decision for the generated tokens.
        """
        gate = gate if isinstance(gate, ScopeGate) else self.make_gate(gate)
        with self._routing({self.hookpoint: self._gate_hook(gate)}, hold) as model:
            yield model

    # --- statistics for gates and diagnostics ---------------------------------------------------

    def _capture(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Layer l's output for a batch, [B, S, d], without running the layers above it; its output
        structure is kept as the example stage 2's splice reproduces."""
        with torch.no_grad(), capture(self.adapter, Site(self.hookpoint, "output"), stop=True, raw=True) as seen:
            run_until_captured(self.model, input_ids=input_ids, attention_mask=attention_mask)
        self._output_example = seen[0]
        return hidden_of(seen[0]).detach()

    @contextlib.contextmanager
    def base_decoder(self) -> Iterator[None]:
        """Temporarily put the unedited values back into every changed row (for before/after stats)."""
        with self.rows.base_values():
            self._eval_cache.clear()
            try:
                yield
            finally:
                self._eval_cache.clear()

    @torch.no_grad()
    def scope_statistics(self, texts: Sequence[str], gates: Sequence[str] = ("ard", "delta", "overlap"),
                         base: bool = False, alpha: float | None = None,
                         batch_size: int = 64) -> dict[str, Tensor]:
        """Per text: each gate's sequence statistic (and its value at the last real token, key
        `<gate>_last`), plus z_sq and n_tokens. base=True measures with the unedited decoder."""
        alpha = alpha if alpha is not None else (self.alpha or 1.0)
        gate_objs = {name: self.make_gate(name, tau=0.0) for name in gates}
        if base and "overlap" in gate_objs:  # before editing there are no edit masks to overlap with
            gate_objs["overlap"] = OverlapGate(0.0, lambda: None, gate_objs["overlap"].unit)
        for g in gate_objs.values():
            if hasattr(g, "alpha"):
                g.alpha = alpha
        out: dict[str, list[Tensor]] = {}
        with (self.base_decoder() if base else contextlib.nullcontext()), padding_side(self.tokenizer, "right"):
            for first in range(0, len(texts), batch_size):
                batch = self.tokenizer(list(texts[first:first + batch_size]), return_tensors="pt",
                                       padding=True).to(self.device)
                hidden = self._capture(batch["input_ids"], batch["attention_mask"])
                valid = batch["attention_mask"].bool() & self._not_special(batch["input_ids"])
                view = self._view(hidden, valid)
                last = valid.long().cumsum(1).argmax(1)  # index of the last real token
                rows = torch.arange(len(last), device=last.device)
                for name, g in gate_objs.items():
                    per_token = g.statistic(view)
                    out.setdefault(name, []).append(g.aggregate(per_token, valid))
                    out.setdefault(f"{name}_last", []).append(per_token[rows, last])
                out.setdefault("z_sq", []).append((view.z.float().pow(2).sum(-1) * valid).sum(-1))
                out.setdefault("n_tokens", []).append(valid.sum(-1).float())
        return {k: torch.cat(v).cpu() for k, v in out.items()}

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The edited rows (and their base values), alpha, tau, the reference ARD, the undo log and
        the ledger. Tensors are on CPU; everything else is JSON-ready."""
        rows = self.rows.state_dict()
        return {
            "format": STATE_FORMAT,
            "hookpoint": self.hookpoint,
            "config": asdict(self.cfg),
            "alpha": self.alpha,
            "taus": dict(self.taus),
            **{key: rows[key] for key in ("shape", "changed_rows", "base_rows", "rows")},
            "reference_ard": None if self.reference_ard is None else self.reference_ard.clone(),
            "masks": rows["masks"],
            "owner": rows["owner"],
            "subjects": {str(i): v for i, v in self._subjects.items()},
            "key_tokens": {str(i): v for i, v in self._key_tokens.items()},
            "subject_keys": {str(i): [[key.tolist(), token] for key, token in keys]
                             for i, keys in self._subject_keys.items()},
            "undo": rows["undo"],
            "ledger": self.ledger_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` onto an editor over the *base* SAE (checked row by row)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a MicroEdit state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        self.check_state_for(state, "hookpoint", self.hookpoint, "SAE")
        self.rows.load_state_dict(state)
        self.alpha = state["alpha"]
        # Calibrated thresholds come from the state; fixed ones from this editor's config.
        for gate, key in (("ard", "tau"), ("delta", "delta_tau")):
            if getattr(self.cfg, key) == "calibrate":
                self.taus[gate] = state["taus"].get(gate)
        ref = state.get("reference_ard")
        self.reference_ard = None if ref is None else ref.clone()
        self._subjects = {int(i): v for i, v in (state.get("subjects") or {}).items()}
        self._key_tokens = {int(i): int(v) for i, v in (state.get("key_tokens") or {}).items()}
        self._subject_keys = {int(i): [(torch.tensor(key, dtype=torch.long, device=self.device), int(token))
                                       for key, token in keys]
                              for i, keys in (state.get("subject_keys") or {}).items()}
        self._replays.clear()
        self._null_stale = True
        self.load_ledger(state["ledger"])
        self._eval_cache.clear()

    def export_component(self, directory: Path) -> Path:
        """The edited SAE as a sparsify checkpoint: `<directory>/<hookpoint>/{cfg.json, sae.safetensors}`."""
        return save_sparse_coders({self.hookpoint: self.sae}, directory)


def scheduled_tau(schedule: Sequence[Sequence[float]], edits: int) -> float:
    """The tau of the last [from_T, tau] entry with from_T <= edits (the first entry's below it)."""
    tau = float(schedule[0][1])
    for from_t, value in schedule:
        if edits >= from_t:
            tau = float(value)
    return tau


def _say(message: str) -> None:
    print(f"[lightning-edit microedit] {message}", file=sys.stderr, flush=True)
