"""TCPE (TransCoder-based Precise Editing, seeds/000): ROME's closed-form update on a transcoder's
decoder, restricted to the decoder rows of the key's active latents.

The MLP at layer l is replaced by a trained top-k transcoder (reads the MLP's input, predicts its
output: y = z W_dec + b_dec, z the sparse latent code). For edit j (poster, "Approach"):
    k*_j = z at the subject's last token of the prompt                     [n]   (the key)
    S_j  = the active latents of k*_j, optionally the `lim` largest           (the support)
    v*_j = the layer's MLP output there that predicts the new target       [d]   (ROME's value,
           `locate.compute_value` with the delta added to the transcoder's output)
    C    = E[z z^T] of the transcoder latents over a corpus                [n, n] (cached,
           `locate.second_moment`, site "coder_latents")
    Delta = (v* - W k*) (C^-1 k*)^T / (k*^T C^-1 k*),  W = W_dec^T       [d, n] (ROME, Eq. 2)
    W'[:, m] = W[:, m] + Delta[:, m]  for m in S_j only                           (TCPE Eq. 1)
Since k* is zero off S_j, the restricted update still maps k* exactly to v* (without a `lim` cap).

The splice: the transcoder replaces the MLP only inside `edited()` (and while an edit is computed),
through `adapter.swap`; outside, `self.model` is the unedited base LM and the edits live in the
editor's own copy of the transcoder (`self.coder.W_dec`). "The base model" for Loc is therefore the
LM with the unedited transcoder spliced in. The job layer loads the transcoder (`component.path`),
or with no path on an embedded world finds the world's default (configs/transcoder.yaml's coder)
under `<world.root>/transcoder/<hookpoint>-k<k>/` or trains it there first (`jobs/components.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from lightning_edit.editors.base import ComponentRequest, Editor, LedgerEntry, solved_edit_fields
from lightning_edit.locate import Site, activations, compute_value, second_moment
from lightning_edit.locate.value_solver import ValueSolverFields
from lightning_edit.metrics import teacher_forced
from lightning_edit.sparse.splice import TranscoderMLP


@dataclass
class TCPEConfig(ValueSolverFields):
    """TCPE's hyperparameters. The poster gives Eq. 1 and defers the rest to ROME, so the value solver
    and statistics defaults are ROME's (GPT-2 XL, `hparams/ROME/gpt2-xl.json`); size-dependent values
    for the embedded world are in configs/tcpe.yaml. The edited layer is the transcoder's hookpoint
    (`component.hookpoint`, an MLP such as `layers.2.mlp`)."""

    lim: int | None = None
    """Keep only the `lim` largest active latents of k* in S_j (the poster's optional cap); None = all."""
    lim_rescale: bool = True
    """When `lim` drops active latents, divide by u_S . k*_S instead of u . k* (u = C^-1 k*), so W' k* = v*
    still holds. The poster does not say; without it a cap leaves the edit short (0/30 edits flipped
    at lim 8 on toyworld)."""
    mom2_n_samples: int | None = 100000
    """Corpus texts C = E[z z^T] is estimated from (ROME: 100,000 Wikipedia texts); None = all."""
    mom2_ridge: float = 1e-6
    """C + mom2_ridge * mean(diag C) * I before inverting: a top-k code leaves latents that never fire
    on the corpus with zero rows in C. Not in the paper (ROME's dense keys need none)."""
    stats_dir: str | None = None
    """Root of the statistics cache; None = the shared default (`locate.StatsCache`)."""
    stats_batch_size: int = 32
    """Texts per forward pass while C is estimated (speed only)."""
    clamp_retries: int = 0
    """An edit whose target is not the argmax after the update is reverted and solved again with
    `clamp_growth` x the value solver's norm ball (`clamp_norm_factor`), at most this many times
    (0 = ROME's single solve). ROME bounds ||delta|| by 4 ||h||, h the MLP output at the key; how much
    the residual stream must move to flip a fact is not a multiple of that layer's output, so the ball
    a fact needs is found per edit (see `TCPE.apply`)."""
    clamp_growth: float = 2.0
    """Factor on `clamp_norm_factor` between two solves (with `clamp_retries` > 0)."""

    def __post_init__(self) -> None:
        if self.clamp_retries < 0 or self.clamp_growth <= 1:
            raise ValueError(f"editor.clamp_retries must be >= 0 and clamp_growth > 1 "
                             f"(got {self.clamp_retries}, {self.clamp_growth})")


class TCPE(Editor):
    """TCPE over a transcoder spliced in at an MLP; only `coder.W_dec` rows of S_j change."""

    name = "tcpe"
    config_class = TCPEConfig
    supports_batch = False
    component_kind = "transcoder"
    default_hookpoint = "layers.2.mlp"

    @classmethod
    def component_request(cls, cfg: TCPEConfig, component_cfg, adapter) -> ComponentRequest:
        """The transcoder at `component.hookpoint`, an MLP (checked before anything is loaded or trained)."""
        request = super().component_request(cfg, component_cfg, adapter)
        _mlp_layer(adapter, adapter.resolve_hookpoint(request.hookpoint, "component.hookpoint"))
        return request

    def setup(self) -> None:
        hookpoint = self.component.hookpoint
        self.layer = _mlp_layer(self.adapter, hookpoint)
        self.hookpoint = hookpoint
        self.coder = self.component
        self.coder.requires_grad_(False)
        self.splice = TranscoderMLP(self.coder)
        self.latent_site = Site(f"{hookpoint}.latents", "output")
        self.solver = self.cfg.value_solver(value_site="mlp_output", key_site=None)
        self.c_inv: Tensor | None = None
        """(C + ridge)^-1 [n, n] float64 on the transcoder's device, from `prepare`."""
        self._base_rows: dict[int, Tensor] = {}
        """Decoder row -> its value in the unedited transcoder, for every row an edit changed."""

    # --- statistics -------------------------------------------------------------------------

    def prepare(self, corpus: list[str] | None = None) -> None:
        """C = E[z z^T] of the unedited transcoder's latents over `corpus` (cached), inverted once."""
        if not corpus:
            raise ValueError("TCPE needs a corpus for C = E[z z^T] of the transcoder latents: set data.corpus "
                             "to a text file, one passage a line")
        c = second_moment(self.model, self.tokenizer, self.adapter, self.layer, corpus, self.cfg.mom2_n_samples,
                          site="coder_latents", coder=self.coder, coder_site="mlp_input",
                          batch_size=self.cfg.stats_batch_size, cache=self.cfg.stats_dir, dtype=torch.float64)
        c = c.to(self.coder.W_dec.device)  # the transcoder follows its MLP's device
        ridge = self.cfg.mom2_ridge * c.diagonal().mean().clamp_min(1e-12)
        self.c_inv = torch.linalg.inv(c + ridge * torch.eye(len(c), dtype=c.dtype, device=c.device))

    # --- editing ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def edited(self) -> Iterator[nn.Module]:
        """The LM with the (edited) transcoder in place of the MLP at `hookpoint`."""
        with self.adapter.swap(self.hookpoint, self.splice):
            yield self.model

    def key(self, prompt: str, subject: str | None) -> Tensor:
        """k*: the transcoder's dense latent code at the key position, [n] float32."""
        with self.edited():
            return activations(self.model, self.tokenizer, self.adapter, self.layer, [prompt],
                               position=self.cfg.position, subjects=[subject], site=self.latent_site)[0]

    def support(self, key: Tensor) -> Tensor:
        """S_j: the active latents of k* (the `lim` largest by magnitude when capped), sorted [|S|]."""
        active = key.nonzero().flatten()
        if self.cfg.lim is not None and len(active) > self.cfg.lim:
            active = active[key[active].abs().topk(self.cfg.lim).indices]
        return active.sort().values

    def apply(self, records: list) -> list[LedgerEntry]:
        if len(records) != 1:
            raise ValueError(f"TCPE edits one record at a time; got {len(records)} (set data.batch_size=1)")
        (record,) = records
        if self.c_inv is None:
            raise RuntimeError("TCPE: call prepare(corpus) before the first edit (it estimates C = E[z z^T])")
        start = time.perf_counter()
        at = self.coder.W_dec.device
        key = self.key(record.prompt, record.subject).to(at, torch.float64)  # k*, [n]
        rows = self.support(key).to(at)  # S_j
        u = self.c_inv @ key  # C^-1 k*, [n]
        denominator = u[rows] @ key[rows] if self.cfg.lim_rescale else u @ key  # equal without a cap
        w_dec = self.coder.W_dec  # [n, d]: decoder row m = column m of W = W_dec^T
        saved = w_dec[rows].detach().clone()
        # The norm ball grows per edit until the target is the argmax (`clamp_retries`). Measured on
        # toyworld-gpt2 (layer 1 of 6, ||h|| 1.6-3.5): the value solver's delta sat on ROME's bound
        # (||delta|| = 4.00 ||h||) in every edit that did not land (4 of 30, NLL 0.4-0.6 after 100
        # steps); at 16 ||h|| their NLL fell to 0.1-0.6. On toyworld the edits that land at 4 ||h||
        # are solved once, as before.
        clamps = []
        for attempt in range(self.cfg.clamp_retries + 1):
            clamps.append(self.cfg.clamp_norm_factor * self.cfg.clamp_growth ** attempt)
            solver = dataclasses.replace(self.solver, clamp_norm_factor=clamps[-1])
            with torch.no_grad():
                w_dec[rows] = saved  # each solve starts from the transcoder as it was before this edit
            with self.edited():
                result = compute_value(self.model, self.tokenizer, self.adapter, self.layer, record, solver)
            residual = result.delta.double()  # v* - (W k* + b): h is the transcoder's output at the key
            update = torch.outer(u[rows], residual) / denominator  # Delta^T restricted to S_j: [|S|, d] (Eq. 1)
            with torch.no_grad():
                w_dec[rows] = saved + update.to(w_dec.dtype)
            with self.edited():
                after = teacher_forced(self.model, self.tokenizer, [record.prompt], [record.target_new])[0]
            if after.exact:
                break
        # The last solve is kept, landed or not (the ledger says which).
        for m, base in zip(rows.tolist(), saved):
            self._base_rows.setdefault(m, base)
        seconds = time.perf_counter() - start
        entry = LedgerEntry.for_record(
            len(self.ledger), record,
            changed={f"{self.hookpoint}.W_dec": rows.tolist()},
            delta_norm=float(update.norm()),
            seconds=seconds,
            **solved_edit_fields(result, after),
            extra={"layer": self.layer, "position": result.position, "active": int((key != 0).sum()),
                   "support": len(rows), "clamp_norm_factor": clamps},
        )
        self.ledger.append(entry)
        return [entry]

    # --- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The changed decoder rows (ids and current values) and the ledger; the transcoder itself is
        rebuilt from the component config."""
        rows = sorted(self._base_rows)
        w_dec = self.coder.W_dec.detach()
        index = torch.tensor(rows, dtype=torch.long)
        return {
            "tensors": {"rows": index, "values": w_dec[index.to(w_dec.device)].clone(),
                        "base_values": torch.stack([self._base_rows[m] for m in rows]) if rows
                        else w_dec.new_zeros(0, w_dec.shape[1])},
            "hookpoint": self.hookpoint,
            "ledger": self.ledger_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_for(state, "hookpoint", self.hookpoint, "transcoder")
        tensors = state["tensors"]
        rows, values = tensors["rows"].long(), tensors["values"]
        w_dec = self.coder.W_dec
        if values.shape != (len(rows), w_dec.shape[1]):
            raise ValueError(f"TCPE edit state: values {tuple(values.shape)} for {len(rows)} rows of width "
                             f"{w_dec.shape[1]}")
        base = tensors["base_values"].to(w_dec.device, w_dec.dtype)
        if not torch.equal(w_dec.detach()[rows.to(w_dec.device)], base):
            raise ValueError("TCPE edit state: the transcoder's decoder rows differ from those the edits were "
                             "made on (another transcoder?)")
        with torch.no_grad():
            w_dec[rows.to(w_dec.device)] = values.to(w_dec.device, w_dec.dtype)
        self._base_rows = {int(m): b.clone() for m, b in zip(rows.tolist(), base)}
        self.load_ledger(state["ledger"])


# --- helpers ---------------------------------------------------------------------------------------


def _mlp_layer(adapter, hookpoint: str | None) -> int:
    """The layer whose MLP is `hookpoint`, or a ValueError listing the MLP hookpoints."""
    for i in range(adapter.num_layers):
        if adapter.mlp_name(i) == hookpoint:
            return i
    names = [adapter.mlp_name(i) for i in range(adapter.num_layers)]
    raise ValueError(f"component.hookpoint is {hookpoint!r}; a transcoder replaces an MLP: one of {names}")
