"""AlphaEdit (Fang et al. 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for Language
Models"): MEMIT's multi-layer update, projected onto the null space of the preserved keys.

Preserved knowledge = the keys K_0 of a corpus at each edited layer l (down projection inputs,
summarised by C_l = E[k k^T], `locate.second_moment`). Then (Sec. 3):
    P_l     = U_hat U_hat^T, U_hat the eigenvectors of C_l whose eigenvalue is below
              `nullspace_threshold` (Sec. 3.1; C_l is symmetric PSD, so its SVD is its eigendecomposition):
              Delta P_l K_0 ~ 0 for any Delta, so the preserved keys' outputs stay put
    K_p     = the keys of every earlier edit in the stream, kept as the running sum K_p K_p^T
              (`key_cache`, owned by this object and saved with the edit state)
    z_i, K, R exactly as MEMIT (value solver at the last edited layer's output, keys at each layer,
              residual spread over the remaining layers)
    Delta_l = R K^T P (K_p K_p^T P + K K^T P + l2_weight I)^-1      (Sec. 3.2's closed form)
computed as the reference code does, Delta^T = solve(P (K K^T + K_p K_p^T) + l2 I, P K R^T): the
solution satisfies Delta P = Delta exactly (multiply the system by I - P). After a batch, every layer's
K_p K_p^T grows by the batch's keys, re-read from the edited model.

Memory: P_l and K_p K_p^T are d_ff x d_ff float64 per edited layer on the model's device (2 MB each on
the embedded world; 1.6 GB each for Llama3-8B's d_ff 14336). The projection is rebuilt from the cached
statistics by `prepare`, never saved; nothing is written to the working directory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_edit.editors.base import Editor, LedgerEntry
from lightning_edit.locate import ValueSolverConfig, activations, compute_value, context_keys, editing_second_moment
from lightning_edit.metrics import teacher_forced


@dataclass
class AlphaEditConfig:
    """AlphaEdit's hyperparameters; defaults are the released Llama3-8B settings
    (`hparams/AlphaEdit/Llama3-8B.json` of the reference code). Size-dependent values for the embedded
    world are in configs/baselines/alphaedit.yaml."""

    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    """The edited layers, in increasing order (Llama3-8B: 4-8 of 32, as MEMIT); negative counts from
    the last layer. Size-dependent: set it per model."""
    position: str = "subject_last"
    """Key position: "subject_last" (the subject's last token) or "last" (the prompt's)."""
    nullspace_threshold: float = 2e-2
    """Eigenvalues of C_l below this span the null space P_l projects onto (Sec. 3.1; the released
    configs use 2e-2). Size-dependent: it is absolute in the units of E[k k^T]."""
    l2_weight: float = 10.0
    """Weight of the identity term of the closed form (the paper writes I; the released code's `L2`).
    Size-dependent: it competes with k^T P k, which scales with the keys' norm."""
    mom2_n_samples: int | None = 100000
    """Corpus texts each C_l is estimated from (100,000 Wikipedia texts); None = all."""
    stats_batch_size: int = 32
    """Texts per forward pass while C_l is estimated (speed only; not in the paper)."""
    v_steps: int = 25
    """Value-solver steps at most (`v_num_grad_steps`)."""
    v_lr: float = 0.1
    """Value-solver Adam learning rate (`v_lr`); size-dependent (see `ValueSolverConfig.lr`)."""
    v_weight_decay: float = 0.5
    """Weight of the norm penalty on the value delta (`v_weight_decay`)."""
    v_decay: str = "rome"
    """Penalty form: "rome" = ||delta|| / ||h||^2 as the reference code, "relative_sq" = ||delta||^2 / ||h||^2."""
    clamp_norm_factor: float = 0.75
    """||delta|| <= clamp_norm_factor * ||h||, h the residual stream at the last edited layer."""
    kl_factor: float = 0.0625
    """Weight of the KL term that keeps "{subject} is a" (essence drift)."""
    nll_threshold: float = 5e-2
    """The value solver stops once the target NLL is below this (the reference code's 5e-2)."""
    context_templates: list[str] = field(default_factory=lambda: list(ValueSolverConfig.context_templates))
    """Prefixes the keys are averaged over and the value must work in ("{}" = the prompt itself; the
    reference code samples short continuations, fixed prefixes keep the edit deterministic)."""


class AlphaEdit(Editor):
    """AlphaEdit over `adapter.down_proj(l)` for l in `layers`; weights are edited in place."""

    name = "alphaedit"
    config_class = AlphaEditConfig
    supports_batch = True

    def __init__(self, model: nn.Module, tokenizer, adapter, cfg: AlphaEditConfig, component: nn.Module | None = None):
        super().__init__(model, tokenizer, adapter, cfg)
        n = adapter.num_layers
        bad = [layer for layer in cfg.layers if not -n <= layer < n]
        if not cfg.layers or bad:
            raise ValueError(f"editor.layers is {cfg.layers}; expected a non-empty list of layers of a model "
                             f"with {n} (0..{n - 1}, or -1..-{n})")
        self.layers = sorted({layer % n for layer in cfg.layers})
        self.param_names = [adapter.down_proj_name(layer) + ".weight" for layer in self.layers]
        """Names of the edited parameters relative to the adapter's base model, one per layer."""
        self.solver = ValueSolverConfig(
            steps=cfg.v_steps, lr=cfg.v_lr, weight_decay=cfg.v_weight_decay, decay=cfg.v_decay,
            clamp_norm_factor=cfg.clamp_norm_factor, kl_factor=cfg.kl_factor, nll_threshold=cfg.nll_threshold,
            context_templates=tuple(cfg.context_templates), position=cfg.position,
            value_site="layer_output", key_site=None)
        self.projections: dict[int, torch.Tensor] = {}
        """layer -> P_l [d_ff, d_ff] (float64, on the model's device), from `prepare`."""
        self.null_dims: dict[int, int] = {}
        """layer -> rank of P_l (how many directions the preserved keys leave free)."""
        self.key_cache: dict[int, torch.Tensor] = {
            layer: torch.zeros(adapter.intermediate_size(layer), adapter.intermediate_size(layer),
                               dtype=torch.float64, device=self.device)
            for layer in self.layers}
        """layer -> K_p K_p^T [d_ff, d_ff], the keys of every edit so far (saved with the edit state)."""

    def prepare(self, corpus: list[str] | None = None) -> None:
        """P_l from the unedited model's C_l over `corpus` (C_l read from the statistics cache when there)."""
        if not corpus:
            raise ValueError("AlphaEdit needs a corpus for the preserved keys' statistics: set data.corpus to "
                             "a text file, one passage a line")
        for layer in self.layers:
            c = editing_second_moment(self.model, self.tokenizer, self.adapter, layer, corpus, self.cfg.mom2_n_samples,
                               self.cfg.stats_batch_size, self.name).double()
            eigenvalues, eigenvectors = torch.linalg.eigh(c)
            free = eigenvectors[:, eigenvalues < self.cfg.nullspace_threshold]   # U_hat, [d_ff, r]
            self.projections[layer] = (free @ free.T).to(self.device)             # P = U_hat U_hat^T
            self.null_dims[layer] = free.shape[1]
        if not any(self.null_dims.values()):
            raise ValueError(f"AlphaEdit: no eigenvalue of C_l falls below editor.nullspace_threshold="
                             f"{self.cfg.nullspace_threshold} at layers {self.layers}: every update would be zero")

    def weight(self, layer: int) -> nn.Parameter:
        return self.adapter.down_proj(layer).weight

    # --- the update ---------------------------------------------------------------------------

    def _keys(self, layer: int, records: list) -> torch.Tensor:
        """[d_ff, n]: each record's down projection input at `layer`, averaged over the context templates."""
        return context_keys(self.model, self.tokenizer, self.adapter, layer, records, self.cfg.context_templates,
                     self.cfg.position).to(self.device)

    def _outputs(self, records: list) -> torch.Tensor:
        """[d_model, n]: the residual stream after the last edited layer at each record's key position."""
        last = self.layers[-1]
        h = activations(self.model, self.tokenizer, self.adapter, last, [r.prompt for r in records],
                        position=self.cfg.position, subjects=[r.subject for r in records], site="layer_output")
        return h.T.double().to(self.device)

    def update(self, layer: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Delta_l = R K^T P (K_p K_p^T P + K K^T P + l2 I)^-1, [d_model, d_ff] (float64)."""
        p = self.projections[layer]
        lhs = p @ (keys @ keys.T + self.key_cache[layer])
        lhs.diagonal().add_(self.cfg.l2_weight)
        return torch.linalg.solve(lhs, p @ keys @ residual.T).T

    def apply(self, records: list) -> list[LedgerEntry]:
        if not self.projections:
            raise RuntimeError("AlphaEdit: call prepare(corpus) before the first edit (it builds the null-space "
                               "projections from C_l = E[k k^T])")
        start = time.perf_counter()
        last = self.layers[-1]
        values = [compute_value(self.model, self.tokenizer, self.adapter, last, r, self.solver) for r in records]
        targets = torch.stack([v.value for v in values], dim=1).double()   # z, [d_model, n]
        norms: dict[str, float] = {}
        changed: dict[str, list[int]] = {}
        for j, layer in enumerate(self.layers):
            keys = self._keys(layer, records)                                          # K, [d_ff, n]
            residual = (targets - self._outputs(records)) / (len(self.layers) - j)   # R, [d_model, n]
            update = self.update(layer, keys, residual)
            with torch.no_grad():
                w = self.adapter.down_proj_weight(layer)
                w.add_(update.to(w.dtype))
            name = self.param_names[j]
            norms[name] = float(update.norm())
            changed[name] = (update != 0).any(dim=1).nonzero().flatten().tolist()
        for layer in self.layers:  # the batch joins K_p, its keys read from the edited model
            keys = self._keys(layer, records)
            self.key_cache[layer] += keys @ keys.T
        seconds = time.perf_counter() - start
        after = teacher_forced(self.model, self.tokenizer, [r.prompt for r in records],
                               [r.target_new for r in records])
        entries = []
        for record, value, score in zip(records, values, after):
            entry = LedgerEntry(
                edit_id=len(self.ledger),
                case_id=record.case_id,
                prompt=record.prompt,
                target=record.target_new,
                changed=changed,
                delta_norm=sum(x * x for x in norms.values()) ** 0.5,
                steps=len(value.losses) - 1,
                seconds=seconds / len(records),
                metrics_before={"target_nll": value.losses[0]["nll"]},
                metrics_after={"target_nll": score.nll, "target_argmax": float(score.exact),
                               "value_nll": value.final_nll},
                extra={"batch_size": len(records), "layers": self.layers, "delta_norm_per_layer": norms,
                       "null_dims": {str(k): v for k, v in self.null_dims.items()}},
            )
            self.ledger.append(entry)
            entries.append(entry)
        return entries

    # --- edit state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        tensors = {name: self.weight(layer).detach().clone() for name, layer in zip(self.param_names, self.layers)}
        cache = {str(layer): self.key_cache[layer].detach().clone() for layer in self.layers}
        return {"tensors": tensors, "key_cache": cache, "ledger": self.ledger_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tensors, cache = state["tensors"], state["key_cache"]
        if set(tensors) != set(self.param_names):
            raise ValueError(f"AlphaEdit edit state holds {sorted(tensors)}; this editor edits {self.param_names}")
        if set(cache) != {str(layer) for layer in self.layers}:
            raise ValueError(f"AlphaEdit edit state's key_cache is for layers {sorted(cache)}; this editor edits "
                             f"layers {self.layers}")
        with torch.no_grad():
            for name, layer in zip(self.param_names, self.layers):
                self.weight(layer).copy_(tensors[name])
        self.key_cache = {layer: cache[str(layer)].to(device=self.device, dtype=torch.float64).clone()
                          for layer in self.layers}
        self.load_ledger(state["ledger"])
