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

Rollback (`rollback(edit_id)`): the undo log keeps, per edit, its rows' values before and after it.
A row no later live edit touched is restored exactly (bit for bit) to its value before the edit; a row
a later edit also changed gets that edit's own change subtracted (later edits keep theirs), and the
later edits' undo records are shifted by the same amount, so the log reads as if the rolled-back edit
had never happened.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_edit.editors.base import Editor, HeldRouting, LedgerEntry
from lightning_edit.editors.gates import (
    GATES,
    UNITS,
    AlwaysOn,
    ARDSwitch,
    DeltaGate,
    LatentView,
    OverlapGate,
    ScopeGate,
    ard_per_token,
    embedding_bag_delta,
)
from lightning_edit.models import hidden_of, with_hidden
from lightning_edit.world import world_of

STATE_FORMAT = "lightning_edit.microedit/1"
SAE_SUBDIR = "sae"


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
    overlap_tau: float = 0.5
    """The overlap gate's threshold: admit iff some edit's row mask has Jaccard overlap >= this with
    the active latents (meant for mask_tokens="last", where M is one token's k latents). Not in the paper."""
    tau_quantile: float = 0.99
    """Quantile used by "calibrate". Not in the paper."""
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
    keep_undo_log: bool = True
    """Keep each edit's rows before/after it (needed for rollback; 2 |M| d floats per edit)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"editor.{name} is {getattr(self, name)!r}; expected {expected}")

        if self.mask_tokens not in ("all", "last"):
            raise bad("mask_tokens", '"all" or "last"')
        if self.gate not in GATES:
            raise bad("gate", f"one of {', '.join(GATES)}")
        if isinstance(self.alpha, str) and self.alpha != "auto":
            raise bad("alpha", 'a positive number or "auto"')
        if not isinstance(self.alpha, str) and not self.alpha > 0:
            raise bad("alpha", 'a positive number or "auto"')
        for name in ("tau", "delta_tau"):
            if isinstance(getattr(self, name), str) and getattr(self, name) != "calibrate":
                raise bad(name, 'a number or "calibrate"')
        if self.gate_unit is not None and self.gate_unit not in UNITS:
            raise bad("gate_unit", f"one of {', '.join(UNITS)} or null")
        if not 0.0 <= self.tau_quantile <= 1.0:
            raise bad("tau_quantile", "a number in [0, 1]")
        for name in ("stage1_max_steps", "stage2_max_steps", "calib_samples"):
            if getattr(self, name) < 0:
                raise bad(name, "an integer >= 0")
        if not self.lr > 0:
            raise bad("lr", "a positive number")

    @property
    def effective_gate(self) -> str:
        return self.gate if self.use_switch else "none"

    @classmethod
    def from_mapping(cls, data: Any) -> "MicroEditConfig":
        """From a dict / DictConfig (the job's `editor:` section); unknown keys are an error."""
        if isinstance(data, cls):
            return data
        if data is None:
            return cls()
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(data, DictConfig):
                data = OmegaConf.to_container(data, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        data = {k: v for k, v in dict(data).items() if k != "method"}  # the job's editor.method
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown MicroEdit option(s) {unknown}; valid: {', '.join(sorted(names))}")
        return cls(**dict(data))


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once layer l's output is in hand."""


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


@dataclass
class DefaultSAE:
    """What `build_component` returns when `component.path` is null: the embedded world's default
    SAE at `hookpoint`, trained (or found) with the editor's `default_sae_overrides`."""

    hookpoint: str

    def resolve(self, model: nn.Module, adapter, overrides: Sequence[str]) -> nn.Module:
        world = world_of(model)
        if world is None:
            name = getattr(getattr(model, "config", None), "_name_or_path", None)
            raise ValueError(
                f"component.path is not set and model {name!r} is not an embedded world: give MicroEdit "
                f"a top-k SAE (sparsify or SAELens folder) trained on its hookpoint {self.hookpoint!r}, "
                "e.g. with train_sae.py")
        sae = default_sae(world, self.hookpoint, overrides, device=next(model.parameters()).device)
        return _checked(sae, self.hookpoint, model, adapter)


@dataclass
class _Undo:
    rows: Tensor  # [m] long
    before: Tensor  # [m, d]
    after: Tensor  # [m, d]
    live: bool = True


class MicroEdit(HeldRouting, Editor):
    """MicroEdit behind the `Editor` interface. `component` is the TopKSparseCoder (SAE) at the
    hookpoint; the LM and the SAE encoder are never changed, only `component.W_dec` rows."""

    name = "microedit"
    config_class = MicroEditConfig
    supports_batch = False
    supports_rollback = True

    def __init__(self, model: nn.Module, tokenizer, adapter, cfg: Any, component: nn.Module | None = None):
        cfg = MicroEditConfig.from_mapping(cfg)
        if isinstance(component, DefaultSAE):  # no component.path: the world's default, built now
            component = component.resolve(model, adapter, cfg.default_sae_overrides)
        super().__init__(model, tokenizer, adapter, cfg, component)
        if component is None:
            raise ValueError("MicroEdit needs its SAE as `component` (see MicroEdit.build_component)")
        hookpoint = cfg.hookpoint or getattr(component, "hookpoint", None)
        if hookpoint is None:
            raise ValueError("MicroEdit: no hookpoint (set editor.hookpoint, or build the SAE with "
                             "MicroEdit.build_component, which records component.hookpoint)")
        cfg.hookpoint = hookpoint
        self.sae = component
        self.hookpoint = hookpoint
        adapter.module(self.hookpoint)  # fails early, naming valid hookpoints
        self.sae.requires_grad_(False)
        self.alpha: float | None = None if cfg.alpha == "auto" else float(cfg.alpha)
        self.taus: dict[str, float | None] = {
            "ard": None if cfg.tau == "calibrate" else float(cfg.tau),
            "delta": None if cfg.delta_tau == "calibrate" else float(cfg.delta_tau),
            "overlap": float(cfg.overlap_tau),
            "none": 0.0,
        }
        """Each gate's threshold, calibrated ones filled in by `prepare`."""
        self.reference_corpus: list[str] | None = None
        """Lines used by `prepare()` when the engine passes no corpus (from_config sets the world's)."""
        self.reference_ard: Tensor | None = None
        """ARD of each reference line with the unedited SAE (what tau is calibrated on)."""
        n, d = self.sae.W_dec.shape
        self._changed = torch.zeros(n, dtype=torch.bool, device=self.sae.W_dec.device)
        self._changed_rows = torch.zeros(0, dtype=torch.long, device=self.sae.W_dec.device)
        self._base_rows = self.sae.W_dec.new_zeros(0, d)
        """Rows any edit ever changed, and their values in the base SAE (for `delta`, state, export)."""
        self._undo: dict[int, _Undo] = {}
        self._masks: dict[int, Tensor] = {}  # edit id -> row mask M (live edits), for `overlap`
        self._special_ids = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])),
                                         dtype=torch.long)
        self._inside_apply = False
        self._output_example: Any = None
        self._eval_cache: dict[str, Any] = {}
        self._batch: dict[str, Tensor | None] = {}
        self._held: Tensor | None = None
        self._hold = False

    # --- building ---------------------------------------------------------------------------

    @classmethod
    def build_component(cls, component_cfg: dict[str, Any], model: nn.Module, tokenizer, adapter) -> Any:
        """The SAE from `component` (`path`, `hookpoint`): a sparsify / SAELens folder or a root of
        hookpoint folders. With no path, a `DefaultSAE` request that `__init__` resolves to the
        embedded world's default SAE (found in its cache or trained there first, said on stderr)
        with the editor's `default_sae_overrides`. The engine calls this (editors/state.py)."""
        hookpoint = component_cfg.get("hookpoint") or "layers.2"
        path = component_cfg.get("path")
        if not path:
            return DefaultSAE(hookpoint)
        sae = load_sae(path, hookpoint, device=next(model.parameters()).device)
        return _checked(sae, hookpoint, model, adapter)

    @classmethod
    def from_config(cls, cfg: Any, model: nn.Module, tokenizer, adapter) -> "MicroEdit":
        """Convenience outside the engine: from a job config (`component`, `editor` sections)."""
        editor_cfg = {k: v for k, v in (_section(cfg, "editor") or {}).items() if k != "method"}
        editor_cfg = MicroEditConfig.from_mapping(editor_cfg)
        component = cls.build_component(_section(cfg, "component") or {}, model, tokenizer, adapter)
        editor = cls(model, tokenizer, adapter, editor_cfg, component)
        world = world_of(model)
        if world is not None:
            editor.reference_corpus = world.corpus_path.read_text().splitlines()
        return editor

    # --- calibration ------------------------------------------------------------------------

    def prepare(self, corpus: list[str] | None = None) -> None:
        """alpha="auto" and tau="calibrate" from a reference corpus, with the unedited SAE."""
        corpus = corpus if corpus is not None else self.reference_corpus
        calibrated = [g for g, key in (("ard", "tau"), ("delta", "delta_tau"))
                       if getattr(self.cfg, key) == "calibrate"]
        need = self.cfg.alpha == "auto" or calibrated
        if not corpus:
            return
        lines = _spread([c for c in corpus if c.strip()], self.cfg.calib_samples)
        stats = self.scope_statistics(lines, gates=("ard",), base=True, alpha=1.0)
        if self.cfg.alpha == "auto":
            self.alpha = float(stats["z_sq"].sum() / stats["n_tokens"].sum())
        self.reference_ard = stats["ard"] / self.alpha
        for gate in calibrated:
            self.taus[gate] = float(torch.quantile(self.reference_ard, self.cfg.tau_quantile))
        if need:
            q = torch.quantile(self.reference_ard, torch.tensor([0.01, 0.5, 0.99]))
            _say(f"calibrated on {len(lines)} reference lines: alpha={self.alpha:.4g}, "
                 f"unedited ARD p1/p50/p99 = {q[0]:.3g}/{q[1]:.3g}/{q[2]:.3g}; gate "
                 f"{self.cfg.effective_gate}, tau={self.tau}")

    @property
    def tau(self) -> float | None:
        """The threshold of the configured gate."""
        return self.taus[self.cfg.effective_gate]

    def _alpha_or_fallback(self, z: Tensor, valid: Tensor) -> float:
        if self.alpha is None:  # alpha="auto" without prepare(): the first edit prompt's mean ||z||^2
            self.alpha = float(z[valid].float().pow(2).sum(-1).mean())
            _say(f"alpha='auto' with no reference corpus: alpha={self.alpha:.4g} from the first edit prompt")
        return self.alpha

    # --- editing ------------------------------------------------------------------------------

    def apply(self, records: list) -> list[LedgerEntry]:
        entries = []
        for record in records:
            entries.append(self._edit_one(record, len(self.ledger)))
            self.ledger.append(entries[-1])
        return entries

    def _encode_prompt_target(self, prompt: str, target: str) -> tuple[Tensor, int]:
        from lightning_edit.metrics import target_positions

        ids, start = target_positions(self.tokenizer, prompt, target)
        return torch.tensor([ids], dtype=torch.long, device=self.device), start

    def _not_special(self, input_ids: Tensor) -> Tensor:
        if not self.cfg.exclude_special_tokens or self._special_ids.numel() == 0:
            return torch.ones_like(input_ids, dtype=torch.bool)
        return ~torch.isin(input_ids, self._special_ids.to(input_ids.device))

    def _edit_one(self, record, edit_id: int) -> LedgerEntry:
        cfg, sae = self.cfg, self.sae
        start_time = time.perf_counter()
        self._inside_apply = True
        try:
            input_ids, start = self._encode_prompt_target(record.prompt, record.target_new)
            z = self._capture(input_ids, None)[0].to(sae.dtype)  # [L, d]
            with torch.no_grad():
                acts, idx = sae.encode(z)  # [L, k]: fixed for the whole edit (encoder and LM frozen)
            real = self._not_special(input_ids[0])
            prompt_pos = real[:start].nonzero().squeeze(1)
            if prompt_pos.numel() == 0:
                raise ValueError(f"edit {edit_id}: prompt {record.prompt!r} has no non-special token")
            alpha = self._alpha_or_fallback(z[prompt_pos], torch.ones(len(prompt_pos), dtype=torch.bool))

            # Eq. 13: the row mask M, and U = every row the edit input reads (M is a subset).
            if cfg.use_topk_mask:
                mask_pos = prompt_pos if cfg.mask_tokens == "all" else prompt_pos[-1:]
                sel_idx, sel_act = idx[mask_pos], acts[mask_pos]
                rows = sel_idx[sel_act > 0].unique()
            else:
                rows = idx[acts > 0].unique()
            used = torch.cat([idx.flatten(), rows]).unique()  # sorted
            local_idx = torch.searchsorted(used, idx)
            local_rows = torch.searchsorted(used, rows)
            W_used = sae.W_dec.detach()[used].clone()
            before = sae.W_dec.detach()[rows].clone()
            param = before.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([param], lr=cfg.lr)  # fresh per edit: Eq. 14 on M only
            target = input_ids[0, start:]

            def reconstruct() -> Tensor:  # Eq. 8 with the masked rows as they are now, [L, d]
                W = W_used.index_copy(0, local_rows, param)
                return F.embedding_bag(local_idx, W, per_sample_weights=acts, mode="sum") + sae.b_dec

            def rec_loss(z_hat: Tensor) -> Tensor:  # Eq. 11 over the edit prompt's tokens
                return ard_per_token(z[prompt_pos], z_hat[prompt_pos], alpha).mean()

            with torch.no_grad():
                ard_before = float(rec_loss(reconstruct()))
            steps1 = 0
            if cfg.use_stage1:  # stage 1: distance regularisation (no LM forward needed)
                for steps1 in range(cfg.stage1_max_steps + 1):
                    loss = rec_loss(reconstruct())
                    if loss.item() <= cfg.stage1_stop or steps1 == cfg.stage1_max_steps:
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()

            holder: dict[str, Tensor] = {}
            nll_before = nll_after = math.nan
            steps2 = 0
            with self._substituting(holder):
                for steps2 in range(cfg.stage2_max_steps + 1):
                    holder["z_hat"] = z_hat = reconstruct()
                    logits = self.model(input_ids=input_ids, use_cache=False).logits[0, start - 1:-1]
                    nll = F.cross_entropy(logits.float(), target, reduction="none")  # [n_target]
                    nll_after = nll.mean().item()
                    if steps2 == 0:
                        nll_before = nll_after
                    if nll.max().item() < cfg.stop_nll or steps2 == cfg.stage2_max_steps:
                        break
                    loss = cfg.rec_weight * rec_loss(z_hat) + nll.mean()  # Eq. 10 + Eq. 11
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            after = param.detach().clone()
            with torch.no_grad():
                ard_after = float(rec_loss(reconstruct()))
                self._write_rows(rows, before, after, edit_id)
        finally:
            self._inside_apply = False
        seconds = time.perf_counter() - start_time
        return LedgerEntry(
            edit_id=edit_id,
            case_id=getattr(record, "case_id", None),
            prompt=record.prompt,
            target=record.target_new,
            changed={"W_dec": rows.tolist()},
            delta_norm=float((after - before).float().norm()),
            steps=steps1 + steps2,
            seconds=seconds,
            metrics_before={"target_nll": nll_before, "ard": ard_before},
            metrics_after={"target_nll": nll_after, "ard": ard_after},
            extra={"stage1_steps": steps1, "stage2_steps": steps2, "rows": int(rows.numel()),
                   "reached_stop": bool(nll_after < cfg.stop_nll) if len(target) == 1 else None},
        )

    @torch.no_grad()
    def _write_rows(self, rows: Tensor, before: Tensor, after: Tensor, edit_id: int) -> None:
        """Write an edit's rows into W_dec (only those rows), and log base values and undo data."""
        new = rows[~self._changed[rows]]
        if new.numel():
            self._base_rows = torch.cat([self._base_rows, self.sae.W_dec.detach()[new].clone()])
            self._changed_rows = torch.cat([self._changed_rows, new])
            self._changed[new] = True
        self.sae.W_dec.data.index_copy_(0, rows, after.to(self.sae.W_dec.dtype))
        if self.cfg.keep_undo_log:
            self._undo[edit_id] = _Undo(rows.clone(), before, after)
        self._masks[edit_id] = rows.clone()
        self._eval_cache.clear()

    # --- rollback ------------------------------------------------------------------------------

    @torch.no_grad()
    def rollback(self, edit_id: int) -> None:
        """Undo edit `edit_id` (see the module doc for what happens to rows later edits touched)."""
        undo = self._undo.get(edit_id)
        if undo is None:
            raise KeyError(f"edit {edit_id} has no undo record (keep_undo_log=False, or no such edit; "
                           f"edits with one: {sorted(self._undo)[:10]}...)")
        if not undo.live:
            raise ValueError(f"edit {edit_id} was already rolled back")
        W = self.sae.W_dec.data
        delta = undo.after - undo.before  # [m, d]
        shared = torch.zeros(len(undo.rows), dtype=torch.bool, device=W.device)
        for later_id, later in self._undo.items():
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
        self._masks.pop(edit_id, None)
        self._eval_cache.clear()
        for entry in self.ledger:
            if entry.edit_id == edit_id:
                entry.extra["rolled_back"] = True
                entry.extra["rollback_exact_rows"] = int(exact.sum())

    # --- inference ---------------------------------------------------------------------------

    def make_gate(self, name: str | None = None, tau: float | None = None, unit: str | None = None) -> ScopeGate:
        """The scope gate `name` (default: the config's), with this editor's alpha and its tau."""
        name = name or self.cfg.effective_gate
        if name not in GATES:
            raise ValueError(f"unknown gate {name!r}; choices: {', '.join(GATES)}")
        unit = unit or self.cfg.gate_unit or ("sequence" if name == "ard" else "token")
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
            return DeltaGate(tau, alpha, unit)
        if name == "overlap":
            return OverlapGate(tau, self._mask_matrix, unit)
        raise ValueError(f"unknown gate {name!r}; choices: {', '.join(GATES)}")

    def _mask_matrix(self) -> Tensor | None:
        """[E, n] bool: one row per live edit, its row mask M."""
        if "masks" not in self._eval_cache:
            n = self.sae.W_dec.shape[0]
            masks = torch.zeros(len(self._masks), n, dtype=torch.bool, device=self.sae.W_dec.device)
            for i, rows in enumerate(self._masks.values()):
                masks[i, rows] = True
            self._eval_cache["masks"] = masks
        return self._eval_cache["masks"]

    def _delta_table(self) -> tuple[Tensor, Tensor]:
        """(slot [n], rows [C+1, d]): W_dec - W_dec_0 on changed rows, a zero row for the rest."""
        if "delta" not in self._eval_cache:
            W = self.sae.W_dec.detach()
            n, d = W.shape
            c = len(self._changed_rows)
            slot = torch.full((n,), c, dtype=torch.long, device=W.device)
            slot[self._changed_rows] = torch.arange(c, device=W.device)
            rows = torch.cat([W[self._changed_rows] - self._base_rows, W.new_zeros(1, d)])
            self._eval_cache["delta"] = (slot, rows)
        return self._eval_cache["delta"]

    def _view(self, hidden: Tensor, valid: Tensor) -> LatentView:
        sae = self.sae
        z = hidden.to(sae.dtype)
        acts, idx = sae.encode(z)
        z_hat = sae.decode(acts, idx)
        edit_delta = None
        if len(self._changed_rows):
            def edit_delta() -> Tensor:
                slot, rows = self._delta_table()
                return embedding_bag_delta(idx, acts, slot, rows)
        return LatentView(z=z, acts=acts, idx=idx, z_hat=z_hat, valid=valid, edit_delta=edit_delta)

    def _valid_for(self, hidden: Tensor) -> Tensor:
        """[B, S] real tokens of the current forward, from the ids / mask the model was called with."""
        valid = self._attended(hidden)
        ids = self._batch.get("input_ids")
        if ids is not None and ids.shape == hidden.shape[:2]:
            valid = valid & self._not_special(ids.to(hidden.device))
        return valid

    def _gate_hook(self, gate: ScopeGate):
        def hook(module, args, output):
            if self._inside_apply:
                return None
            hidden = hidden_of(output)
            with torch.no_grad():
                view = self._view(hidden, self._valid_for(hidden))
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
        """Layer l's output for a batch, [B, S, d], without running the layers above it."""
        got: dict[str, Tensor] = {}

        def grab(module, args, output):
            got["z"] = hidden_of(output).detach()
            self._output_example = output  # the layer's output structure (tensor or tuple)
            raise _Stop

        with torch.no_grad(), self.adapter.hooks({self.hookpoint: grab}):
            try:
                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _Stop:
                pass
        return got["z"]

    @contextlib.contextmanager
    def _substituting(self, holder: dict[str, Tensor]) -> Iterator[None]:
        """Forward passes in which layer l outputs `holder["z_hat"]` (stage 2 of an edit).

        When the hookpoint is a whole decoder layer, the layers up to l are not run at all: the LM is
        frozen and z is cached, so layers < l pass their input through and layer l emits z_hat
        (a stage-2 step then costs the layers above l only). Other hookpoints use a forward hook.
        """
        example = self._output_example
        index = next((i for i in range(self.adapter.num_layers)
                      if self.adapter.layer_name(i) == self.hookpoint), None)
        if index is None:
            def substitute(module, args, output):
                return with_hidden(output, holder["z_hat"][None].to(hidden_of(output).dtype))

            with self.adapter.hooks({self.hookpoint: substitute}):
                yield
            return
        layers = self.adapter.layers
        originals = [layers[i] for i in range(index + 1)]
        try:
            for i in range(index):
                layers[i] = _PassThrough(example)
            layers[index] = _Emit(example, holder)
            yield
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer

    @contextlib.contextmanager
    def base_decoder(self) -> Iterator[None]:
        """Temporarily put the unedited values back into every changed row (for before/after stats)."""
        W = self.sae.W_dec.data
        saved = W[self._changed_rows].clone()
        W.index_copy_(0, self._changed_rows, self._base_rows)
        self._eval_cache.clear()
        try:
            yield
        finally:
            W.index_copy_(0, self._changed_rows, saved)
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
        ctx = self.base_decoder() if base else contextlib.nullcontext()
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "right"
        try:
            with ctx:
                for first in range(0, len(texts), batch_size):
                    batch = tok(list(texts[first:first + batch_size]), return_tensors="pt",
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
        finally:
            tok.padding_side = side
        return {k: torch.cat(v).cpu() for k, v in out.items()}

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The edited rows (and their base values), alpha, tau, the reference ARD, the undo log and
        the ledger. Tensors are on CPU; everything else is JSON-ready."""
        W = self.sae.W_dec.detach()
        undo_ids = sorted(self._undo)
        return {
            "format": STATE_FORMAT,
            "hookpoint": self.hookpoint,
            "config": asdict(self.cfg),
            "alpha": self.alpha,
            "taus": dict(self.taus),
            "shape": list(W.shape),
            "changed_rows": self._changed_rows.cpu().clone(),
            "base_rows": self._base_rows.cpu().clone(),
            "rows": W[self._changed_rows].cpu().clone(),
            "reference_ard": None if self.reference_ard is None else self.reference_ard.clone(),
            "masks": {str(i): m.cpu().clone() for i, m in self._masks.items()},
            "undo": {str(i): {"rows": self._undo[i].rows.cpu().clone(), "before": self._undo[i].before.cpu().clone(),
                              "after": self._undo[i].after.cpu().clone(), "live": self._undo[i].live}
                     for i in undo_ids},
            "ledger": self.ledger_state(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` onto an editor over the *base* SAE (checked row by row)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a MicroEdit state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        if state["hookpoint"] != self.hookpoint:
            raise ValueError(f"MicroEdit state is for hookpoint {state['hookpoint']!r}, this editor's is {self.hookpoint!r}")
        W = self.sae.W_dec.data
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
        self._changed = torch.zeros(W.shape[0], dtype=torch.bool, device=dev)
        self._changed[changed] = True
        self._changed_rows, self._base_rows = changed.clone(), base.clone()
        self.alpha = state["alpha"]
        # Calibrated thresholds come from the state; fixed ones from this editor's config.
        for gate, key in (("ard", "tau"), ("delta", "delta_tau")):
            if getattr(self.cfg, key) == "calibrate":
                self.taus[gate] = state["taus"].get(gate)
        ref = state.get("reference_ard")
        self.reference_ard = None if ref is None else ref.clone()
        self._masks = {int(i): m.to(dev).long() for i, m in state["masks"].items()}
        self._undo = {int(i): _Undo(u["rows"].to(dev).long(), u["before"].to(dev, W.dtype),
                                    u["after"].to(dev, W.dtype), bool(u["live"]))
                      for i, u in state["undo"].items()}
        self.load_ledger(state["ledger"])
        self._eval_cache.clear()

    def export_sae(self, path: str | Path) -> Path:
        """Write the edited SAE as a sparsify checkpoint: `<path>/<hookpoint>/{cfg.json, sae.safetensors}`."""
        from lightning_edit.sparse import save_sparse_coders

        return save_sparse_coders({self.hookpoint: self.sae}, path)

    def export_state(self, directory: str | Path) -> Path:
        """Called by `save_edit_state`: the edited SAE beside the state, as a sparsify checkpoint
        (`<directory>/sae/<hookpoint>/`) that sparsify-reading tools load as is."""
        return self.export_sae(Path(directory) / SAE_SUBDIR)


# --- SAE loading -------------------------------------------------------------------------------


def load_sae(path: str | Path, hookpoint: str, device: torch.device | str | None = None) -> nn.Module:
    """A coder folder (sparsify or SAELens), or a root holding `<hookpoint>/` folders."""
    from lightning_edit.sparse import load_sparse_coder

    path = Path(path)
    if (path / hookpoint).is_dir():
        path = path / hookpoint
    sae = load_sparse_coder(path, device=device)
    if getattr(sae, "is_transcoder", False):
        raise ValueError(f"{path}: MicroEdit needs an SAE on the residual stream, got a transcoder")
    return sae


def default_sae(world, hookpoint: str, overrides: Sequence[str] = (),
                device: torch.device | str | None = None) -> nn.Module:
    """The world's default SAE at `hookpoint`: configs/sae.yaml's recipe with `overrides` (SAE-job
    `key=value`s), cached in `<world.root>/sae/<hookpoint>-k<k>[-<overrides>]/`; trained there by the
    SAE job on first use (said on stderr)."""
    from filelock import FileLock

    from lightning_edit.config import load_config
    from lightning_edit.jobs import sparse as sae_job

    overrides = list(overrides)
    base = load_config(sae_job.SCHEMA, overrides, default_config=sae_job.DEFAULT_CONFIG)
    tag = "".join(f"-{o.split('.')[-1]}" for o in overrides if not o.startswith("coder.k="))
    folder = Path(world.root) / "sae" / f"{hookpoint}-k{base.coder.k}{tag}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / hookpoint / "cfg.json").is_file():
            _say(f"no SAE given (component.path): training the default SAE for {world.root.name} at "
                 f"{hookpoint} (k={base.coder.k}) into {folder} ...")
            start = time.perf_counter()
            overrides = [*overrides, f"model.name={_world_name(world)}",
                         f"hookpoints=[{hookpoint}]", f"export_dir={folder}",
                         f"output_dir={folder.with_name(folder.name + '.run')}", "logger=csv",
                         "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]
            cfg = load_config(sae_job.SCHEMA, overrides, default_config=sae_job.DEFAULT_CONFIG)
            sae_job.train(cfg, job="sae")
            _say(f"default SAE trained in {time.perf_counter() - start:.0f} s")
        else:
            _say(f"using the default SAE in {folder / hookpoint}")
    return load_sae(folder, hookpoint, device=device)


def _checked(sae: nn.Module, hookpoint: str, model: nn.Module, adapter) -> nn.Module:
    from lightning_edit.sparse import check_width

    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    check_width(sae, adapter.hidden_size, hookpoint, f"model {name!r}")
    sae.hookpoint = hookpoint  # read by __init__ when editor.hookpoint is unset
    return sae


def _world_name(world) -> str:
    """`toyworld` from a world folder named `toyworld-seed0-v1`."""
    return world.root.name.split("-seed")[0]




def _section(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(value, DictConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def _spread(items: list, n: int) -> list:
    """n items evenly spaced through `items` (all when n >= len): deterministic, covers the corpus."""
    if n <= 0 or n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def _say(message: str) -> None:
    print(f"[lightning-edit microedit] {message}", file=sys.stderr, flush=True)
