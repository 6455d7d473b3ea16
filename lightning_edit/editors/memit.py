"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"): a batch of edits written into the
MLP down projections of several layers at once, by least squares against the corpus keys.

For a batch of n edits and edited layers l_1 < ... < l_L (Algorithm 1), with W_l the down projection
as [d_model, d_ff]:
    z_i     = the residual stream after l_L at edit i's key position that predicts its target
              (value solver, Eq. 16: `locate.compute_value(..., value_site="layer_output")`)
    for each layer l_j in order:
      K     = [d_ff, n] the down projection inputs at the key positions (mean over the contexts)
      R     = (z - h^{l_L}) / (L - j + 1)        the residual left at l_L, spread over the remaining
                                                  layers (h^{l_L} recomputed after the earlier layers'
                                                  updates of this batch)
      W_l  += R K^T (lambda C_l + K K^T)^-1       (Eq. 14; C_l = E[k k^T] over a corpus, `second_moment`,
                                                  lambda = mom2_update_weight)
The solve runs in float64 as the reference code's. A stream applies each batch over the weights the
earlier batches left; the C_l are the base model's (computed once in `prepare`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_edit.editors.base import Editor, Layer, LedgerEntry
from lightning_edit.locate import activations, compute_value, context_keys, editing_second_moment
from lightning_edit.locate.value_solver import ValueSolverFields
from lightning_edit.metrics import teacher_forced


@dataclass
class MultiLayerConfig(ValueSolverFields):
    """What MEMIT and AlphaEdit share: the edited layers, the corpus statistics and the value solver at
    the last edited layer's output. Defaults are MEMIT's GPT-J settings (`hparams/MEMIT/EleutherAI_gpt-j-6B.json`
    of the reference code); each method's config overrides those its paper sets otherwise."""

    layers: list[Layer] = field(default_factory=lambda: [3, 4, 5, 6, 7, 8])
    """The edited layers, in increasing order (GPT-J: 3-8 of 28, the causal-tracing peak, Sec. 4.1);
    negative counts from the last layer. Size-dependent: set it per model."""
    mom2_n_samples: int | None = 100000
    """Corpus texts each C_l is estimated from (MEMIT, AlphaEdit: 100,000 Wikipedia texts); None = all."""
    stats_batch_size: int = 32
    """Texts per forward pass while C_l is estimated (speed only; not in the paper)."""
    stats_dtype: str = "float64"
    """How the per-layer d_ff x d_ff statistics are kept between edits (MEMIT's C_l; AlphaEdit's P_l and
    K_p K_p^T): "float64" (the reference code's) or "float32", half the memory (1.6 -> 0.8 GB per
    matrix at d_ff 14336). Accumulation and the solve run in float64 either way."""
    v_steps: int = 25
    """Value-solver steps at most (`v_num_grad_steps`; MEMIT's and AlphaEdit's 25)."""
    clamp_norm_factor: float = 0.75
    """||delta|| <= clamp_norm_factor * ||h||, h the residual stream at the last edited layer l_L
    (`clamp_norm_factor`)."""


STATS_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class MEMITConfig(MultiLayerConfig):
    """MEMIT's hyperparameters; defaults are the paper's GPT-J settings (`hparams/MEMIT/EleutherAI_gpt-j-6B.json`
    of the reference code). Size-dependent values for the embedded world are in configs/baselines/memit.yaml."""

    mom2_update_weight: float = 15000.0
    """lambda, the weight of the corpus keys' second moment against the new keys (Eq. 14's C_0 = lambda
    E[k k^T]). Size-dependent: E[k^T C^-1 k] = d_ff, so keeping lambda / d_ff is keeping the balance."""
    mom2_update_weight_per_dim: float | None = None
    """lambda per key dimension: lambda = this * d_ff of the edited layer; overrides `mom2_update_weight`
    when set. A new key k gets the share s / (1 + s) of its residual, s = k^T C^-1 k / lambda, and
    k^T C^-1 k grows with d_ff (= d_ff on average over the corpus keys; measured on the edit prompts'
    keys: 1,360-1,900 at toyworld's d_ff 512, 1,030-1,710 at toyworld-gpt2's 768). GPT-J's 15000 / 16384
    = 0.92."""


class MEMIT(Editor):
    """MEMIT over `adapter.down_proj(l)` for l in `layers`; weights are edited in place.

    `apply` is the batch loop of the module docstring; a method that keeps it and changes the closed form
    (AlphaEdit) overrides `prepare` and `check_prepared`, `update`, `after_update` and `ledger_extra`."""

    name = "memit"
    label = "MEMIT"
    """The method's name in messages."""
    config_class = MEMITConfig
    supports_batch = True

    def setup(self) -> None:
        cfg, adapter = self.cfg, self.adapter
        if not cfg.layers:
            raise ValueError("editor.layers is empty; expected a non-empty list of layers")
        self.layers = self.resolve_layers(cfg.layers)
        cfg.layers = list(self.layers)  # states record the absolute layers
        if cfg.stats_dtype not in STATS_DTYPES:
            raise ValueError(f"editor.stats_dtype is {cfg.stats_dtype!r}; expected one of {sorted(STATS_DTYPES)}")
        self.stats_dtype = STATS_DTYPES[cfg.stats_dtype]
        self.param_names = [adapter.down_proj_name(layer) + ".weight" for layer in self.layers]
        """Names of the edited parameters relative to the adapter's base model, one per layer."""
        self.solver = cfg.value_solver(value_site="layer_output", key_site=None, world=self.ctx.world)
        self.second_moments: dict[int, torch.Tensor] = {}
        """layer -> C_l = E[k k^T] [d_ff, d_ff] of the base model (`stats_dtype`, on layer l's device)."""

    def prepare(self, corpus: list[str] | None = None) -> None:
        """Estimate every C_l over `corpus` with the unedited model (read from the statistics cache when there)."""
        if not corpus:
            raise ValueError(f"{self.label} needs a corpus for its second-moment statistics: set data.corpus to a "
                             "text file, one passage a line")
        for layer in self.layers:
            c = editing_second_moment(self.model, self.tokenizer, self.adapter, layer, corpus, self.cfg.mom2_n_samples,
                               self.cfg.stats_batch_size, self.name)
            self.second_moments[layer] = c.to(device=self.adapter.layer_device(layer), dtype=self.stats_dtype)

    def check_prepared(self) -> None:
        """Raise unless `prepare` has built what `update` needs."""
        if not self.second_moments:
            raise RuntimeError(f"{self.label}: call prepare(corpus) before the first edit (it estimates "
                               "C_l = E[k k^T])")

    def weight(self, layer: int) -> nn.Parameter:
        return self.adapter.down_proj(layer).weight

    # --- the update ---------------------------------------------------------------------------

    def _keys(self, layer: int, records: list) -> torch.Tensor:
        """[d_ff, n]: each record's down projection input at `layer`, averaged over the context templates."""
        return context_keys(self.model, self.tokenizer, self.adapter, layer, records, self.cfg.context_templates,
                     self.cfg.position).to(self.adapter.layer_device(layer))

    def _outputs(self, records: list) -> torch.Tensor:
        """[d_model, n]: the residual stream after the last edited layer at each record's key position."""
        last = self.layers[-1]
        h = activations(self.model, self.tokenizer, self.adapter, last, [r.prompt for r in records],
                        position=self.cfg.position, subjects=[r.subject for r in records], site="layer_output")
        return h.T.double().to(self.adapter.layer_device(last))

    def update_weight(self, layer: int) -> float:
        """lambda at `layer`: `mom2_update_weight_per_dim` * d_ff, else `mom2_update_weight`."""
        per_dim = self.cfg.mom2_update_weight_per_dim
        return self.cfg.mom2_update_weight if per_dim is None else per_dim * self.adapter.intermediate_size(layer)

    def update(self, layer: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Delta_l = R K^T (lambda C_l + K K^T)^-1, [d_model, d_ff] (float64; Eq. 14), computed as
        R (solve(lambda C_l + K K^T, K))^T."""
        gram = self.update_weight(layer) * self.second_moments[layer].double() + keys @ keys.T
        return residual @ torch.linalg.solve(gram, keys).T

    def after_update(self, records: list) -> None:
        """Called once a batch's update is written to every layer (timed with the edit). Default: nothing."""

    def ledger_extra(self, records: list, norms: dict[str, float]) -> dict[str, Any]:
        """`LedgerEntry.extra` of each entry of the batch `records`."""
        return {"batch_size": len(records), "layers": self.layers, "delta_norm_per_layer": norms}

    def apply(self, records: list) -> list[LedgerEntry]:
        self.check_prepared()
        start = time.perf_counter()
        last = self.layers[-1]
        values = [compute_value(self.model, self.tokenizer, self.adapter, last, r, self.solver) for r in records]
        targets = torch.stack([v.value for v in values], dim=1).double()   # z, [d_model, n]
        norms: dict[str, float] = {}
        changed: dict[str, list[int]] = {}
        for j, layer in enumerate(self.layers):
            keys = self._keys(layer, records)                                # K, [d_ff, n]
            residual = ((targets.to(keys.device) - self._outputs(records).to(keys.device))
                        / (len(self.layers) - j))                           # R, [d_model, n]
            update = self.update(layer, keys, residual)                     # [d_model, d_ff]
            with torch.no_grad():
                w = self.adapter.down_proj_weight(layer)
                w.add_(update.to(w.device, w.dtype))
            name = self.param_names[j]
            norms[name] = float(update.norm())
            changed[name] = (update != 0).any(dim=1).nonzero().flatten().tolist()
        self.after_update(records)
        seconds = time.perf_counter() - start
        after = teacher_forced(self.model, self.tokenizer, [r.prompt for r in records],
                               [r.target_new for r in records])
        entries = []
        for record, value, score in zip(records, values, after):
            entry = LedgerEntry.for_record(
                len(self.ledger), record,
                changed=changed,
                delta_norm=sum(x * x for x in norms.values()) ** 0.5,
                steps=len(value.losses) - 1,
                seconds=seconds / len(records),
                metrics_before={"target_nll": value.losses[0]["nll"]},
                metrics_after={"target_nll": score.nll, "target_argmax": float(score.exact),
                               "value_nll": value.final_nll, "value_goal_met": float(value.goal_met)},
                extra=self.ledger_extra(records, norms),
            )
            self.ledger.append(entry)
            entries.append(entry)
        return entries

    # --- edit state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        tensors = {name: self.weight(layer).detach().clone() for name, layer in zip(self.param_names, self.layers)}
        return {"tensors": tensors, "ledger": self.ledger_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tensors = state["tensors"]
        if set(tensors) != set(self.param_names):
            raise ValueError(f"{self.label} edit state holds {sorted(tensors)}; this editor edits {self.param_names}")
        with torch.no_grad():
            for name, layer in zip(self.param_names, self.layers):
                self.weight(layer).copy_(tensors[name])
        self.load_ledger(state["ledger"])
