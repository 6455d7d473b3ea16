"""PNKE (Precise Neuron-Level Knowledge Editing, seeds/003): causal neurons from activation and
Integrated Gradients, an entropy-guided critical subset, and an update of only those neurons' output
weights.

Neurons are the FFN hidden neurons of one layer (`site: ffn`: the down projection's input, output
weights = the down projection's columns) or the latents of a top-k transcoder spliced in for that
layer's MLP (`site: transcoder`: output weights = the transcoder's decoder rows). For one edit:
    P_sem     the prompt, its training paraphrases, then prompts of PNKE's own: the relation's templates
              with the subject (an embedded world's relation whose template gives the prompt), else
              the prompt after short contexts from corpus lines that mention no subject edited (m = 10)
    N_bg      mean |act| over P_sem > its 75th percentile over the layer, and std < the 25th (Eq. 2)
    N_trig    |act| on P_spec > 90th percentile and |IG| > 90th percentile (Eq. 3); IG with a zero
              baseline and 20 steps on log P(answer), `locate.integrated_gradients`
    N_causal  N_bg | N_trig (Eq. 4)
    s         0.5 minmax(|act|) + 0.5 minmax(|IG|) over N_causal (Eq. 5)
    q         clip(85 + 10 (log|N_causal| - H(s / sum s)), 0, 100); tau = percentile(s, q);
              N_critical = {s > tau} (Eq. 6-7, Alg. 4)
    update    Eq. 10 (`update: ridge`): with V1 = ROME's value at the key position
              (`locate.compute_value`) and h1, h0 the critical activations on the edit and on preserve
              samples (a corpus sample, and per edit corpus lines that mention no subject edited so
              far), the closed form of
              min_D ||D h1 - (V1 - W h1)||^2 + lambda mean_h0 ||D h0||^2 on the critical columns;
              or Eq. 9 (`update: gradient`): Adam on the output weights with the gradient masked to
              the critical columns, loss = target NLL + the same preservation term.
Activations of a gated FFN's hidden neurons take either sign, so "high activation" compares
magnitudes (the paper's thresholds assume non-negative activations); the std test uses the signed
activations. Everything outside the critical columns stays bit-identical.

PNKE sees an edit's `EditRequest` only (prompt, subject, target, training paraphrases): the prompts
Gen and Loc are scored on never reach P_sem or the preserve samples. IG attributes the fact being
replaced as the model states it now (its argmax answer to the prompt), which needs no dataset field.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from lightning_edit.data.corpus import UnrelatedLines
from lightning_edit.editors.base import ComponentRequest, Editor, Layer, LedgerEntry
from lightning_edit.locate import (
    Site,
    activations,
    compute_value,
    integrated_gradients,
    second_moment,
)
from lightning_edit.locate.value_solver import ValueResult, ValueSolverFields
from lightning_edit.metrics import teacher_forced
from lightning_edit.models import eval_mode, freeze
from lightning_edit.sparse.splice import TranscoderMLP
from lightning_edit.tokens import target_positions

SITES = ("ffn", "transcoder")
_CONTEXT_WORDS = 5
"""Words of a corpus line that make one P_sem context where no relation template gives the prompt."""
UPDATES = ("ridge", "gradient")


@dataclass
class PNKEConfig(ValueSolverFields):
    """PNKE's hyperparameters: the paper's (App. B, Alg. 4) where it gives them; ROME's for the value
    solver. Size-dependent values for the embedded world are in configs/pnke.yaml."""

    layer: Layer = 5
    """The edited layer (negative counts from the last). The paper does not name it; 5 is ROME's and
    AlphaEdit's Llama-3-8B choice. Size-dependent."""
    site: str = "ffn"
    """"ffn": the FFN hidden neurons; "transcoder": the latents of a transcoder spliced in for the
    layer's MLP (`component.path`, its hookpoint the layer's MLP)."""
    position: str = "subject_last"
    """Token where activations, attributions and the value are taken: "subject_last" (ROME's key
    position, the paper's Eq. 10 "ROME-like") or "last" (the prompt's)."""
    m_sem: int = 10
    """|P_sem|, semantically similar prompts (App. B.1: m = 10)."""
    bg_act_percentile: float = 75.0
    """theta_bg_act: percentile of the layer's mean activations over P_sem (App. B.2)."""
    bg_std_percentile: float = 25.0
    """epsilon_stable: percentile of the layer's activation stds over P_sem (App. B.2)."""
    trig_act_percentile: float = 90.0
    """theta_trig_act: percentile of the layer's activations on P_spec (App. B.3.3)."""
    attr_percentile: float = 90.0
    """theta_attr: percentile of the layer's IG attributions (App. B.3.3)."""
    ig_steps: int = 20
    """Integrated Gradients path points (zero baseline, App. B.3.2)."""
    attribution_target: str = "ground_truth"
    """Whose log-probability IG attributes: "ground_truth" (the fact being replaced, as the model
    answers the prompt before the edit: its argmax token) or "target_new". The paper says "K_target"."""
    alpha: float = 0.5
    """Balance of activation and attribution in the importance score (Eq. 5, App. B.4.1)."""
    q_base: float = 85.0
    """Base percentile of the entropy threshold (Eq. 6, App. B.4.2)."""
    gamma: float = 10.0
    """Entropy adjustment factor (Eq. 6, App. B.4.2)."""
    update: str = "ridge"
    """"ridge": Eq. 10's closed form (the paper's main strategy, App. B.6.3); "gradient": Eq. 9."""
    preserve_weight: float = 1.0
    """lambda of Eq. 1 / 10 on the mean squared change of preserved outputs. Not given in the paper."""
    preserve_prompts: int = 10
    """Per edit, this many corpus lines that mention no subject edited so far (every token) join the
    preserve samples (METHODS.md's "unrelated prompts", from PNKE's own corpus, never the prompts Loc
    is scored on); 0 = none."""
    preserve_corpus_samples: int | None = 1000
    """Corpus texts whose every token is a preserve sample ("a small sample of the reference corpus";
    their second moment is cached); None = all, 0 = none."""
    edits_weight: float = 0.0
    """Weight of the earlier edits as retained knowledge in Eq. 10 (ridge update): each earlier edit's
    key h1' must keep mapping to its value V1'. 0 = off, as in the paper, whose retained set is
    unedited knowledge only; > 0 keeps a stream's edits from overwriting each other on shared neurons."""
    ridge: float = 1e-6
    """Tikhonov term (times the mean diagonal) keeping the Eq. 10 solve well posed. Not in the paper."""
    lr: float = 5e-3
    """Adam learning rate of the gradient variant (Eq. 9). Not given in the paper."""
    max_steps: int = 100
    """Adam steps at most per edit (gradient variant)."""
    stop_nll: float = 5e-2
    """The gradient variant stops once the target NLL is below this (and every target token is the argmax)."""
    stats_dir: str | None = None
    """Root of the statistics cache; None = the shared default (`locate.StatsCache`)."""
    stats_batch_size: int = 32
    """Texts per forward pass for the corpus statistics (speed only)."""

    def __post_init__(self) -> None:
        for name, allowed in (("site", SITES), ("update", UPDATES),
                              ("attribution_target", ("ground_truth", "target_new")),
                              ("position", ("subject_last", "last"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"editor.{name} is {getattr(self, name)!r} (expected one of {', '.join(allowed)})")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"editor.alpha is {self.alpha} (expected a number in [0, 1])")
        if self.m_sem < 1 or self.ig_steps < 1:
            raise ValueError("editor.m_sem and editor.ig_steps must be >= 1")
        if self.preserve_prompts < 0:
            raise ValueError(f"editor.preserve_prompts is {self.preserve_prompts} (expected >= 0)")


def entropy_threshold(scores: Tensor, q_base: float = 85.0, gamma: float = 10.0) -> tuple[Tensor, float, float, float]:
    """Alg. 4 on importance scores s [n] >= 0: (mask of s > tau, tau, q, H).

    p = s / sum s, H = -sum p log p (0 log 0 = 0), q = clip(q_base + gamma (log n - H), 0, 100),
    tau = the q-th percentile of s (linear interpolation, as numpy). Lower entropy -> higher q -> fewer
    neurons. When no score exceeds tau (q = 100, or all scores equal) the highest-scoring neurons are
    kept, so an edit never has an empty critical set.
    """
    s = scores.double().clamp_min(0)
    n = s.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool), 0.0, 100.0, 0.0
    p = s / s.sum() if s.sum() > 0 else torch.full_like(s, 1.0 / n)
    entropy = float(-(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum())
    q = min(100.0, max(0.0, q_base + gamma * (math.log(n) - entropy)))
    tau = float(torch.quantile(s, q / 100.0))
    mask = s > tau
    if not mask.any():
        mask = s >= s.max()
    return mask, tau, q, entropy


def _minmax(x: Tensor) -> Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.ones_like(x)


class PNKE(Editor):
    """PNKE at one layer: only the output weights of each edit's critical neurons change."""

    name = "pnke"
    config_class = PNKEConfig
    supports_batch = False

    @classmethod
    def component_request(cls, cfg: PNKEConfig, component_cfg, adapter) -> ComponentRequest | None:
        """With `editor.site=transcoder`, a transcoder for the edited layer's MLP from `component.path`
        (no default is trained for PNKE; TCPE's cache under `<world>/transcoder/` holds one)."""
        if cfg.site != "transcoder":
            return None
        return ComponentRequest("transcoder", adapter.mlp_name(adapter.resolve_layer(cfg.layer, "editor.layer")),
                                "PNKE (editor.site=transcoder)", trains_default=False)

    def setup(self) -> None:
        cfg, adapter, component = self.cfg, self.adapter, self.component
        self.layer = self.resolve_layer(cfg.layer)
        cfg.layer = self.layer  # states record the absolute layer
        freeze(self.model)
        self.coder = None
        self.splice = None
        if cfg.site == "transcoder":
            hookpoint = component.hookpoint or adapter.mlp_name(self.layer)
            if hookpoint != adapter.mlp_name(self.layer):
                raise ValueError(f"component.hookpoint is {hookpoint!r} but editor.layer {cfg.layer} is the MLP "
                                 f"{adapter.mlp_name(self.layer)!r}: the transcoder must replace that MLP")
            self.coder = component
            self.coder.requires_grad_(False)
            self.splice = TranscoderMLP(self.coder)
            self.site: Any = Site(f"{adapter.mlp_name(self.layer)}.latents", "output")
            self.param_name = f"{adapter.mlp_name(self.layer)}.W_dec"
        else:
            self.site = "down_proj_input"
            self.param_name = adapter.down_proj_name(self.layer) + ".weight"
        self.solver = cfg.value_solver(value_site="mlp_output", key_site=None, world=self.ctx.world)
        world = self.ctx.world
        self.relation_templates: list[list[str]] = \
            [list(r.templates) for r in world.kb.relations] if world is not None else []
        """Each relation's cloze templates with "{subject}", to fill P_sem up (an embedded world's)."""
        self.corpus_lines = UnrelatedLines()
        """The reference corpus (`prepare`) in a seeded order: PNKE's own source of preserve samples
        and, without a world, of P_sem's contexts."""
        self.subjects: set[str] = set()
        """Every subject edited so far: corpus lines that mention one are no preserve samples."""
        self.corpus_moment: Tensor | None = None
        """E[h h^T] [n, n] of the neurons over the corpus sample (float64), from `prepare`."""
        self._base_cols: dict[int, Tensor] = {}
        """Neuron -> its output-weight column [d] in the unedited model, for every neuron an edit changed."""
        self._edit_keys: list[Tensor] = []
        self._edit_values: list[Tensor] = []
        """Every ridge edit's key h1 [n] and value V1 [d] (float64), the retained edits of `edits_weight`."""

    # --- the edited model and its neurons ---------------------------------------------------

    @contextlib.contextmanager
    def edited(self) -> Iterator[nn.Module]:
        """The model as edited (weights in place; the transcoder spliced in for site=transcoder)."""
        if self.splice is None:
            yield self.model
        else:
            with self.adapter.swap(self.adapter.mlp_name(self.layer), self.splice):
                yield self.model

    def _param(self) -> nn.Parameter:
        return self.coder.W_dec if self.coder is not None else self.adapter.down_proj(self.layer).weight

    def out_weight(self) -> Tensor:
        """The neurons' output weights as [d_model, n] (neuron m = column m), aliasing the parameter."""
        return self.coder.W_dec.T if self.coder is not None else self.adapter.down_proj_weight(self.layer)

    def _acts(self, prompts: list[str], subjects: list[str | None], position: str | None = None) -> Tensor:
        with self.edited():
            return activations(self.model, self.tokenizer, self.adapter, self.layer, prompts,
                               position=position or self.cfg.position, subjects=subjects, site=self.site)

    def prepare(self, corpus: list[str] | None = None) -> None:
        """E[h h^T] of the neurons over the corpus sample (cached): the corpus part of the preserve term;
        the corpus lines kept (seeded order) for the per-edit preserve samples and P_sem's contexts."""
        self.corpus_lines = UnrelatedLines(corpus, "pnke:corpus")
        n = self.cfg.preserve_corpus_samples
        if n == 0 or (self.cfg.update == "ridge" and self.cfg.preserve_weight == 0):
            return
        if not corpus:
            raise ValueError("PNKE's preserve term needs a corpus sample (editor.preserve_corpus_samples > 0): set "
                             "data.corpus to a text file, one passage a line, or preserve_corpus_samples=0")
        site = dict(site="coder_latents", coder=self.coder, coder_site="mlp_input") if self.coder is not None \
            else dict(site="down_proj_input")
        c = second_moment(self.model, self.tokenizer, self.adapter, self.layer, corpus, n, **site,
                          batch_size=self.cfg.stats_batch_size, cache=self.cfg.stats_dir, dtype=torch.float64)
        self.corpus_moment = c.to(self.device_of(self.layer))

    def semantic_prompts(self, record) -> list[str]:
        """P_sem, at most m_sem: the prompt, its training paraphrases, then the templates of the
        embedded world's relation one of whose templates gives the prompt, with the subject; without
        such a relation, the prompt after short contexts (a corpus line's first words)."""
        prompts = [record.prompt, *record.training_paraphrases]
        subject = record.subject
        relation = next((ts for ts in self.relation_templates if subject
                         and any(t.replace("{subject}", subject) == record.prompt for t in ts)), None)
        if relation is not None:
            prompts += [t.replace("{subject}", subject) for t in relation]
        else:
            want = self.cfg.m_sem - len(dict.fromkeys(prompts))
            for line in self.corpus_lines.draw(want, len(self.ledger) * want, sorted(self.subjects)):
                context = " ".join(line.split()[:_CONTEXT_WORDS]).rstrip(".")
                prompts.append(f"{context}. {record.prompt}")
        return list(dict.fromkeys(prompts))[:self.cfg.m_sem]

    def current_answer(self, record) -> str:
        """The fact being replaced, as the model states it now: its argmax token after the prompt
        (the new target when that token decodes to nothing)."""
        with self.edited():
            score = teacher_forced(self.model, self.tokenizer, [record.prompt], [record.target_new])[0]
        answer = self.tokenizer.decode([score.argmax_ids[0]], skip_special_tokens=True).strip()
        return answer or record.target_new

    def locate(self, record) -> dict[str, Any]:
        """N_bg, N_trig, N_causal, the scores and N_critical for one record (Eq. 2-7)."""
        cfg = self.cfg
        sem = self.semantic_prompts(record)
        a_sem = self._acts(sem, [record.subject] * len(sem))  # [m, n]
        mean_abs = a_sem.mean(0).abs()
        std = a_sem.std(0, unbiased=False)  # [n]; all 0 for a single prompt (then N_bg is empty)
        n_bg = (mean_abs > torch.quantile(mean_abs, cfg.bg_act_percentile / 100)) & \
               (std < torch.quantile(std, cfg.bg_std_percentile / 100))  # Eq. 2
        act = a_sem[0].abs()  # |Act(n, P_spec)|: P_sem's first prompt is the edit prompt
        answer = self.current_answer(record) if cfg.attribution_target == "ground_truth" else record.target_new
        with self.edited():
            attr = integrated_gradients(self.model, self.tokenizer, self.adapter, self.layer, record.prompt, answer,
                                        steps=cfg.ig_steps, site=self.site, position=cfg.position,
                                        subject=record.subject, objective="logprob").cpu().abs()
        strong = act > torch.quantile(act, cfg.trig_act_percentile / 100)
        n_trig = strong & (attr > torch.quantile(attr, cfg.attr_percentile / 100))  # Eq. 3
        causal = n_bg | n_trig  # Eq. 4
        if not causal.any():  # nothing passes both tests: fall back on the strongly active neurons
            causal = strong if strong.any() else act >= act.max()
        ids = causal.nonzero().flatten()
        scores = cfg.alpha * _minmax(act[ids]) + (1 - cfg.alpha) * _minmax(attr[ids])  # Eq. 5
        mask, tau, q, entropy = entropy_threshold(scores, cfg.q_base, cfg.gamma)  # Eq. 6-7
        return {"bg": n_bg.nonzero().flatten(), "trig": n_trig.nonzero().flatten(), "causal": ids,
                "scores": scores, "critical": ids[mask], "tau": tau, "q": q, "entropy": entropy,
                "p_sem": len(sem)}

    def _preserve_moment(self, record, neurons: Tensor) -> Tensor:
        """mean h0 h0^T over the preserve samples, restricted to `neurons`: [c, c] float64."""
        c = len(neurons)
        moment = torch.zeros(c, c, dtype=torch.float64, device=self.device_of(self.layer))
        if self.corpus_moment is not None:
            moment += self.corpus_moment[neurons][:, neurons]
        n = self.cfg.preserve_prompts
        prompts = self.corpus_lines.draw(n, len(self.ledger) * n, sorted(self.subjects))
        if prompts:
            rows = self._acts(prompts, [None] * len(prompts), position="all")
            h0 = torch.cat([r[1:] if len(r) > 1 else r for r in rows])[:, neurons.cpu()]  # BOS left out
            h0 = h0.to(self.device_of(self.layer), torch.float64)
            moment += h0.T @ h0 / len(h0)
        return moment

    # --- editing ----------------------------------------------------------------------------

    def apply(self, records: list) -> list[LedgerEntry]:
        if len(records) != 1:
            raise ValueError(f"PNKE edits one record at a time; got {len(records)} (set data.batch_size=1)")
        (record,) = records
        start = time.perf_counter()
        if record.subject:
            self.subjects.add(record.subject)
        with self.edited():
            before_edit = teacher_forced(self.model, self.tokenizer, [record.prompt], [record.target_new])[0]
        found = self.locate(record)
        neurons = found["critical"].to(self.device_of(self.layer))
        preserve = self._preserve_moment(record, neurons)
        w = self.out_weight()
        before = w[:, neurons].detach().clone()
        with torch.no_grad():
            for m, col in zip(neurons.tolist(), before.T):
                self._base_cols.setdefault(m, col.clone())
        if self.cfg.update == "ridge":
            steps, value = self._ridge_update(record, neurons, preserve)
            value_metrics = {"value_nll": value.final_nll, "value_goal_met": float(value.goal_met)}
        else:
            steps, value_metrics = self._gradient_update(record, neurons, preserve), {}
        delta = w[:, neurons].detach() - before
        seconds = time.perf_counter() - start
        with self.edited():
            after = teacher_forced(self.model, self.tokenizer, [record.prompt], [record.target_new])[0]
        entry = LedgerEntry.for_record(
            len(self.ledger), record,
            changed={self.param_name: neurons.tolist()},
            delta_norm=float(delta.norm()),
            steps=steps,
            seconds=seconds,
            metrics_before={"target_nll": before_edit.nll, "target_argmax": float(before_edit.exact)},
            metrics_after={"target_nll": after.nll, "target_argmax": float(after.exact),
                           **value_metrics},
            extra={"layer": self.layer, "n_bg": len(found["bg"]), "n_trig": len(found["trig"]),
                   "n_causal": len(found["causal"]), "n_critical": len(neurons), "entropy": found["entropy"],
                   "q": found["q"], "p_sem": found["p_sem"], "update": self.cfg.update},
        )
        self.ledger.append(entry)
        return [entry]

    def _ridge_update(self, record, neurons: Tensor, preserve: Tensor) -> tuple[int, ValueResult]:
        """Eq. 10 on the critical columns: D = r h1^T (h1 h1^T + lambda P + eps I)^-1, r = V1 - W h1 (plus,
        with `edits_weight`, the earlier edits' keys and values in both factors)."""
        with self.edited():
            result = compute_value(self.model, self.tokenizer, self.adapter, self.layer, record, self.solver)
            h = self._acts([record.prompt], [record.subject])[0]
        h_full = h.to(self.device_of(self.layer), torch.float64)  # [n]
        h1 = h_full[neurons]  # [c]
        residual = result.delta.double()  # V1' - W h1: the change the MLP output needs at the key, [d]
        a = torch.outer(h1, h1) + self.cfg.preserve_weight * preserve  # [c, c]
        b = torch.outer(residual, h1)  # [d, c]
        target = self.out_weight().detach().double() @ h_full + residual  # what W h1 should become, [d]
        if self.cfg.edits_weight > 0 and self._edit_keys:
            keys = torch.stack(self._edit_keys)  # [t, n]: earlier edits' keys, and what they must still give
            w = self.out_weight().detach().double()
            kept = torch.stack(self._edit_values) - keys @ w.T  # [t, d]: V1' - W h1' now (0 while kept)
            a = a + self.cfg.edits_weight * keys[:, neurons].T @ keys[:, neurons]
            b = b + self.cfg.edits_weight * kept.T @ keys[:, neurons]
        eps = self.cfg.ridge * a.diagonal().mean().clamp_min(1e-12)
        a = a + eps * torch.eye(len(h1), dtype=a.dtype, device=a.device)
        d = torch.linalg.solve(a, b.T).T  # D = B A^-1 (A symmetric): Eq. 10's normal equations, [d, c]
        with torch.no_grad():
            w = self.out_weight()
            w[:, neurons] += d.to(w.dtype)
        if self.cfg.edits_weight > 0:
            self._edit_keys.append(h_full)
            self._edit_values.append(target)
        return len(result.losses) - 1, result

    def _gradient_update(self, record, neurons: Tensor, preserve: Tensor) -> int:
        """Eq. 9: Adam on the output weights, gradient masked to the critical columns; loss = target NLL
        (teacher forced) + lambda mean_h0 ||D h0||^2."""
        param = self._param()
        transposed = self.out_weight().stride() != param.stride()  # the [d_model, n] view is param.T
        mask = torch.zeros_like(param)
        (mask.T if transposed else mask)[:, neurons] = 1.0
        base = self.out_weight()[:, neurons].detach().clone()
        ids, start = target_positions(self.tokenizer, record.prompt, record.target_new)
        ids_t = torch.tensor([ids], dtype=torch.long, device=self.device)
        targets = ids_t[0, start:]
        optimizer = torch.optim.Adam([param], lr=self.cfg.lr)
        steps = 0
        param.requires_grad_(True)
        try:
            with self.edited() as model, eval_mode(model):
                while True:
                    logits = model(input_ids=ids_t, use_cache=False).logits[0, start - 1:-1].float()
                    nll = nn.functional.cross_entropy(logits, targets)
                    done = nll.item() < self.cfg.stop_nll and bool((logits.argmax(-1) == targets).all())
                    if done or steps >= self.cfg.max_steps:
                        break
                    d = (self.out_weight()[:, neurons] - base).double()  # taken after requires_grad: tracked
                    keep = (d @ preserve * d).sum()  # tr(D P D^T) = mean_h0 ||D h0||^2
                    loss = nll + self.cfg.preserve_weight * keep.float()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    param.grad.mul_(mask)  # Eq. 9: Delta = Delta * M (Adam keeps masked entries at 0)
                    optimizer.step()
                    steps += 1
        finally:
            param.requires_grad_(False)
            param.grad = None
        return steps

    # --- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The changed neurons' output columns (ids, current and base values) and the ledger."""
        cols = sorted(self._base_cols)
        w = self.out_weight().detach()
        index = torch.tensor(cols, dtype=torch.long)
        empty = w.new_zeros(0, w.shape[0])
        return {
            "tensors": {"neurons": index, "values": w[:, index.to(w.device)].T.clone() if cols else empty,
                        "base_values": torch.stack([self._base_cols[m] for m in cols]) if cols else empty},
            "edit_keys": torch.stack(self._edit_keys).cpu() if self._edit_keys else None,
            "edit_values": torch.stack(self._edit_values).cpu() if self._edit_values else None,
            "param": self.param_name,
            "subjects": sorted(self.subjects),
            "ledger": self.ledger_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_for(state, "param", self.param_name, "edited parameter")
        tensors = state["tensors"]
        neurons = tensors["neurons"].long()
        w = self.out_weight()
        values = tensors["values"].to(w.device, w.dtype)
        base = tensors["base_values"].to(w.device, w.dtype)
        if values.shape != (len(neurons), w.shape[0]):
            raise ValueError(f"PNKE edit state: values {tuple(values.shape)} for {len(neurons)} neurons of "
                             f"width {w.shape[0]}")
        idx = neurons.to(w.device)
        if not torch.equal(w.detach()[:, idx].T, base):
            raise ValueError(f"PNKE edit state: {self.param_name} differs from the weights the edits were made on")
        with torch.no_grad():
            w[:, idx] = values.T
        self._base_cols = {int(m): b.clone() for m, b in zip(neurons.tolist(), base)}
        keys, values = state.get("edit_keys"), state.get("edit_values")
        self._edit_keys = [k.to(self.device_of(self.layer), torch.float64) for k in keys] if keys is not None else []
        self._edit_values = [v.to(self.device_of(self.layer), torch.float64) for v in values] if values is not None else []
        self.subjects = set(state.get("subjects") or [])
        self.load_ledger(state["ledger"])
