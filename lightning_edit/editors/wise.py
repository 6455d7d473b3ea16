"""WISE (Wang et al., NeurIPS 2024): a side memory for one layer's FFN value matrix, with routing.

Main memory W_v = layer l's MLP down projection ([d_model, d_ff]) stays as it is; the side memory is a
copy W_v' = W_v + D that edits train, and a router picks, per input, which one the layer uses:
    activation score   Delta_act(x) = mean over x's tokens of ||a(x) (W_v' - W_v)^T||_2       (Eq. 3)
                       (a(x) = the down projection's input, the FFN activation, at each token)
    routing            use W_v' when Delta_act(x) > eps = act_ratio * min over edits of
                       Delta_act(x_e) (calibrated while editing), else W_v                    (Eq. 4)
    margin loss        L_a = ReLU(Delta_act(x_i) - alpha) + ReLU(beta - Delta_act(x_e))
                             + ReLU(gamma - (Delta_act(x_e) - Delta_act(x_i)))                  (Eq. 5)
                       x_e: the edit, x_i: an irrelevant input
    edit loss          L = -log P(y_e | x_e) (target tokens only) + L_a, SGD on D            (Eq. 6)
    knowledge sharding a random gradient mask M (ratio rho = 0.2), fresh for each shard of
                       `save_freq` edits: D <- D - lr * (M * grad)                              (Eq. 7)
    knowledge merging  every `merge_freq` edits the saved shards are merged into one side memory
                       with TIES (trim to `densities`, elect the sign, disjoint mean)           (Eq. 8)
This is WISE-Merge (EasyEdit's `retrieve: False`), not WISE-Retrieve.

Choices made here (also at the config fields):
- The side memory is held as the change D = W_v' - W_v ([d_model, d_ff], the [out, in] layout for
  Linear and Conv1D alike) and applied as out + a D^T on top of the unchanged module, so the main
  memory is never copied or changed and a bias (GPT-2) stays where it is.
- Sequential editing: the current shard's D carries on from edit to edit (it is reset only when a
  shard is saved), saved shards stay routable until they are merged, and merged memories are kept:
  every earlier edit stays in some memory. (EasyEdit's text WISE can rebuild its side memory per
  call, FINDINGS.md.) Inference routes among the merged side memory, saved shards awaiting a merge
  and the current shard: the one with the largest activation score, if it exceeds the threshold.
  EasyEdit's WISE-Merge only ever routes between the merged memory and the current shard, and merges
  pending shards as a side effect of the next evaluation call; we do no work at evaluation time.
- Irrelevant inputs x_i are lines of the corpus handed to `prepare` (the world's corpus by default),
  `n_irrelevant` per edit, drawn by the editor's own generator, never a line naming the edit's
  subject. EasyEdit takes them from a separate locality file; using the stream's own locality
  prompts would train on what Loc measures.
- Delta_act averages the per-token norms over the real tokens of each sequence (attention mask);
  EasyEdit averages over padded positions too, and applies the MLP's activation function to both
  outputs before the difference, which the paper's Eq. 3 does not: we follow the paper.
- Weight decay (EasyEdit: SGD weight_decay 1e-5 on the whole copied matrix, which slowly shrinks
  every weight) acts on D, i.e. towards the main memory, and so only on the masked entries.
- The norm constraint clamps every entry of D to [-norm_constraint, norm_constraint] (EasyEdit).
- Early stop (EasyEdit's EarlyStopMeter): when the loss changed by at most 1e-4 and is at most 0.02.
- The edit's calibration score Delta_act(x_e) is measured after its last step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_edit.editors.base import Editor, HeldRouting, Layer, LedgerEntry
from lightning_edit.locate.positions import subject_span, token_ending_at
from lightning_edit.models import eval_mode, freeze
from lightning_edit.tokens import encode_prompt, pad_id, target_positions

MERGE_ALGS = ("ties", "linear")
ACT_SCOPES = ("sequence", "subject")


@dataclass
class WiseConfig:
    """WISE hyperparameters; defaults are the paper's (EasyEdit hparams/WISE/llama-7b.yaml)."""

    layer: Layer = -1
    """Layer whose MLP down projection gets the side memory; negative counts from the last layer
    (paper: layer 27 of Llama-2-7B's 32, about 85% of the depth)."""
    mask_ratio: float = 0.2
    """rho: fraction of D's entries a shard may change (random gradient mask, Eq. 7)."""
    edit_lr: float = 1.0
    """SGD learning rate on D (paper `edit_lr`)."""
    n_iter: int = 70
    """Optimisation steps per edit at most (paper `n_iter`)."""
    weight_decay: float = 1e-5
    """SGD weight decay, on D (towards the main memory)."""
    norm_constraint: float | None = 1.0
    """Clamp each entry of D to this magnitude after every step; None = unconstrained."""
    alpha: float = 5.0
    """Eq. 5: irrelevant inputs' activation score is pushed below alpha (act_margin[0]), in units of
    `act_margin_unit`. The score is a norm of the layer's MLP output change: size-dependent."""
    beta: float = 20.0
    """Eq. 5: the edit's activation score is pushed above beta (act_margin[1])."""
    gamma: float = 10.0
    """Eq. 5: the edit's score exceeds each irrelevant input's by at least gamma (act_margin[2])."""
    act_margin_unit: float | None = 1.0
    """alpha, beta and gamma are multiples of this (the paper: 1.0, absolute). None: from the model, in
    `prepare(corpus)`: the median per-token norm of the layer's MLP output (down projection, no
    bias) over `unit_samples` corpus lines; the value found is recorded here (editor.json)."""
    unit_samples: int = 200
    """With `act_margin_unit: null`, corpus lines (a seeded sample) whose tokens give the unit."""
    act_ratio: float = 0.88
    """Routing threshold = act_ratio * the smallest edit activation score seen while editing (Eq. 4)."""
    save_freq: int = 500
    """A shard (and its mask) is closed every this many edits (paper, for T = 1000)."""
    merge_freq: int = 1000
    """Saved shards are merged into the side memory every this many edits (a multiple of save_freq)."""
    merge_alg: str = "ties"
    """"ties" (paper: TIES-merge, EasyEdit GTA('magnitude', 'sum', normalize)) or "linear" (the
    weighted mean of the shards' changes)."""
    densities: float = 0.53
    """TIES trim: each shard keeps this fraction of all its entries, by magnitude."""
    weights: float = 1.0
    """Total weight of the shards in the first merge (each gets weights / n); later merges weigh the
    new shards 0.4 / n each and the existing side memory 0.6 (EasyEdit)."""
    context_templates: list[str] = field(default_factory=lambda: ["{}"])
    """Prefixes of the edit prompt for the edit loss ("{}" = the prompt itself). EasyEdit adds 10
    model-generated prefixes; a small world LM has no use for them (locate/value_solver.py)."""
    n_irrelevant: int = 1
    """Irrelevant corpus lines x_i per edit (paper: one)."""
    act_scope: str = "sequence"
    """Which tokens of the edit carry its activation score in Eq. 5: "sequence" (all, the paper) or
    "subject" (EasyEdit's factual editing: the subject's tokens are in scope and the edit prompt's
    other tokens are out of scope, with the irrelevant lines)."""
    early_stop: bool = True
    """Stop when the loss changed by at most 1e-4 and is at most 0.02 (EasyEdit's EarlyStopMeter)."""
    seed: int = 0
    """Seeds the gradient masks and the choice of irrelevant lines (a generator owned by the editor)."""

    def __post_init__(self) -> None:
        if not 0 < self.mask_ratio <= 1:
            raise ValueError(f"editor.mask_ratio is {self.mask_ratio}; expected a fraction in (0, 1]")
        if self.save_freq < 1 or self.merge_freq < 1 or self.merge_freq % self.save_freq:
            raise ValueError(f"editor.merge_freq ({self.merge_freq}) must be a positive multiple of "
                             f"editor.save_freq ({self.save_freq})")
        if self.merge_alg not in MERGE_ALGS:
            raise ValueError(f"editor.merge_alg is {self.merge_alg!r}; expected one of {', '.join(MERGE_ALGS)}")
        if not self.context_templates or any("{}" not in t for t in self.context_templates):
            raise ValueError(f"editor.context_templates is {self.context_templates!r}; each must hold '{{}}'")
        if self.act_scope not in ACT_SCOPES:
            raise ValueError(f"editor.act_scope is {self.act_scope!r}; expected one of {', '.join(ACT_SCOPES)}")
        if self.n_irrelevant < 1:
            raise ValueError(f"editor.n_irrelevant is {self.n_irrelevant}; expected >= 1")
        if (self.act_margin_unit is not None and self.act_margin_unit <= 0) or self.unit_samples < 1:
            raise ValueError(f"editor.act_margin_unit must be > 0 (or null: from the model) and unit_samples >= 1 "
                             f"(got {self.act_margin_unit}, {self.unit_samples})")


def ties_merge(deltas: list[Tensor], density: float, weights: list[float]) -> Tensor:
    """TIES-merge of parameter changes (Yadav et al. 2023, as EasyEdit's GTA('magnitude', 'sum',
    normalize=True)): trim each change to its top `density` of entries by magnitude, elect the sign
    by the weighted sum, average the weighted changes that agree with it. Returns the merged change."""
    trimmed = []
    for delta in deltas:
        k = int(density * delta.numel())
        if density >= 1 or k >= delta.numel():
            trimmed.append(delta)
            continue
        keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
        keep[delta.abs().flatten().topk(max(k, 1)).indices] = True
        trimmed.append(delta * keep.view_as(delta))
    stacked = torch.stack(trimmed)  # [n, d_model, d_ff]
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, 1, 1)
    weighted = stacked * w
    majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (weighted.sign() == majority).to(stacked.dtype)
    divisor = (w * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    return (weighted * agree).sum(dim=0) / divisor


def linear_merge(deltas: list[Tensor], weights: list[float]) -> Tensor:
    """The weighted mean of the changes."""
    w = torch.tensor(weights, dtype=deltas[0].dtype, device=deltas[0].device).view(-1, 1, 1)
    return (torch.stack(deltas) * w).sum(dim=0) / w.sum()


class Wise(HeldRouting, Editor):
    """WISE-Merge side memory at `adapter.down_proj(layer)`; the base weights are never changed."""

    name = "wise"
    config_class = WiseConfig

    def setup(self) -> None:
        cfg, adapter = self.cfg, self.adapter
        self.layer = self.resolve_layer(cfg.layer)
        cfg.layer = self.layer  # states record the absolute layer
        self.shape = tuple(adapter.down_proj_weight(self.layer).shape)  # [d_model, d_ff]
        self.hookpoint = adapter.down_proj_name(self.layer)  # the router adds the side memory's output here
        self.side: Tensor | None = None
        """The merged side memory's change D (None until the first merge)."""
        self.shards: list[Tensor] = []
        """Saved shards awaiting the next merge."""
        self.current: Tensor | None = None
        """The shard being edited (None between shards)."""
        self.mask: Tensor | None = None
        """The current shard's gradient mask, bool [d_model, d_ff]."""
        self.min_act = float("inf")
        """Smallest activation score of an edit seen while editing (calibrates the threshold)."""
        self.merges = 0
        self.corpus: list[str] | None = None
        self._generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self._batch: dict[str, Tensor | None] = {}
        self._hold: bool = False
        self._held: tuple[Tensor, Tensor] | None = None  # (routed, memory) per sequence, while generating
        freeze(self.model)

    def prepare(self, corpus: list[str] | None = None) -> None:
        """Keep the corpus: WISE draws its irrelevant inputs x_i from it."""
        lines = [line.strip() for line in (corpus or []) if line.strip()]
        if not lines:
            raise ValueError("WISE needs irrelevant inputs for its margin loss: prepare(corpus) with a text "
                             "corpus (the job's data.corpus; the embedded worlds have one)")
        self.corpus = lines
        if self.cfg.act_margin_unit is None:
            self.cfg.act_margin_unit = self._output_norm(lines)

    def _output_norm(self, lines: list[str]) -> float:
        """The median per-token norm of the layer's MLP output (a W^T, no bias) over a seeded sample of
        `lines`: the scale of Eq. 5's activation scores, which are norms of a change of that output.
        Measured: 4.19 at toyworld's layer 1 (the fitted alpha 5 is 1.2 of it), 4.41 at toyworld-gpt2's
        layer 1; from 3.2 to 8.7 across the two worlds' layers."""
        from lightning_edit.locate import activations

        order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(self.cfg.seed)).tolist()
        sample = [lines[i] for i in order[:self.cfg.unit_samples]]
        weight = self.adapter.down_proj_weight(self.layer).detach().float()
        with torch.no_grad():
            acts = torch.cat(activations(self.model, self.tokenizer, self.adapter, self.layer, sample,
                                         position="all"))
            return float((acts.to(weight.device) @ weight.T).norm(dim=-1).median())

    # --- memories and routing ---------------------------------------------------------------------

    def memories(self) -> list[Tensor]:
        """Every side memory an input can be routed to: merged, saved shards, the current shard."""
        return [d for d in (self.side, *self.shards, self.current) if d is not None]

    @property
    def threshold(self) -> float:
        return self.cfg.act_ratio * self.min_act

    def _valid(self, x: Tensor) -> Tensor:
        """[B, S] real tokens of the current forward (from the attention mask it was called with)."""
        return self._attended(x)

    @staticmethod
    def _score(change: Tensor, valid: Tensor) -> Tensor:
        """Eq. 3 per sequence: mean over real tokens of ||a D^T||, from change = a D^T [B, S, d_model]."""
        norms = change.float().norm(dim=-1) * valid
        return norms.sum(dim=1) / valid.sum(dim=1).clamp(min=1)

    def _route_hook(self, module, args, output):
        memories = self.memories()
        if not memories:
            return None
        x = args[0]
        with torch.no_grad():
            valid = self._valid(x)
            changes = [F.linear(x, d.to(x.dtype)) for d in memories]  # each [B, S, d_model]
            scores = torch.stack([self._score(c, valid) for c in changes], dim=1)  # [B, n_memories]
            best, which = scores.max(dim=1)
            routed = best > self.threshold  # Eq. 4: the side memory only where its score is high
            if self._hold:  # generation: decide on the prompt, keep the decision for new tokens
                if x.shape[1] > 1 or self._held is None or self._held[0].shape[0] != x.shape[0]:
                    self._held = (routed.clone(), which.clone())
                routed, which = self._held
            if not routed.any():
                return None
            change = torch.stack(changes, dim=1)[torch.arange(x.shape[0], device=x.device), which]
            return output + change * routed.view(-1, 1, 1).to(change.dtype)

    def edited(self, hold: bool = False) -> ContextManager[nn.Module]:
        """The model with the router at the layer's down projection; `hold` keeps each sequence's
        routing decision from its prompt for the tokens generated after it (cached generation,
        `generate`: each prompt is routed once, on the prompt)."""
        return self._routing({self.hookpoint: self._route_hook}, hold)

    @torch.no_grad()
    def activation_scores(self, texts: Sequence[str]) -> Tensor:
        """Eq. 3 of each text (as the router scores it) under each memory: [len(texts), n_memories]."""
        memories = self.memories()
        if not memories:
            return torch.zeros(len(texts), 0)
        got: list[Tensor] = []

        def grab(module, args, output):
            x = args[0]
            valid = self._valid(x)
            got.append(torch.stack([self._score(F.linear(x, d.to(x.dtype)), valid) for d in memories], dim=1))

        with eval_mode(self.model):
            for text in texts:
                ids = torch.tensor([encode_prompt(self.tokenizer, text)], device=self.device)
                with self.adapter.hooks({self.hookpoint: grab}):
                    self.model(input_ids=ids, use_cache=False)
        return torch.cat(got).cpu()

    # --- editing ----------------------------------------------------------------------------------

    def _irrelevant(self, record) -> list[str]:
        if self.corpus is None:
            raise RuntimeError("WISE.apply before prepare(corpus): the margin loss needs irrelevant inputs")
        subject = (record.subject or "").strip().lower()
        picked: list[str] = []
        for _ in range(100 * self.cfg.n_irrelevant):
            line = self.corpus[int(torch.randint(len(self.corpus), (1,), generator=self._generator))]
            if not subject or subject not in line.lower():
                picked.append(line)
            if len(picked) == self.cfg.n_irrelevant:
                return picked
        raise ValueError(f"record {record.case_id!r}: no corpus line without its subject {record.subject!r}")

    def _batch_for(self, record) -> "_EditBatch":
        """One edit row per context template, then the irrelevant rows, right padded."""
        rows, labels, scopes = [], [], []
        for template in self.cfg.context_templates:
            prompt = template.format(record.prompt)
            ids, start = target_positions(self.tokenizer, prompt, record.target_new)
            rows.append(ids)
            labels.append([-100] * (start - 1) + ids[start:])  # logits at j-1 predict token j
            scopes.append(_subject_tokens(self.tokenizer, prompt, record.subject)
                          if self.cfg.act_scope == "subject" else None)
        n_edit = len(rows)
        for line in self._irrelevant(record):
            ids = encode_prompt(self.tokenizer, line)
            rows.append(ids)
            labels.append([-100] * (len(ids) - 1))
        width = max(len(r) for r in rows)
        pad = pad_id(self.tokenizer)
        ids_t = torch.full((len(rows), width), pad, dtype=torch.long)
        valid = torch.zeros((len(rows), width), dtype=torch.bool)
        labels_t = torch.full((len(rows), width - 1), -100, dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, labels)):
            ids_t[i, :len(r)] = torch.tensor(r)
            valid[i, :len(r)] = True
            labels_t[i, :len(lab)] = torch.tensor(lab)
        in_scope = valid[:n_edit].clone()
        for i, tokens in enumerate(scopes):
            if tokens:  # EasyEdit's factual editing: the subject's tokens are in scope, the rest not
                in_scope[i] = False
                in_scope[i, tokens] = True
        out_edit = valid[:n_edit] & ~in_scope
        device = self.device
        return _EditBatch(ids_t.to(device), valid.to(device), labels_t.to(device), n_edit,
                          in_scope.to(device), out_edit.to(device))

    def _new_shard(self) -> None:
        device = self.device_of(self.layer)  # the side memory follows its layer
        self.current = torch.zeros(self.shape, device=device)
        self.mask = torch.rand(self.shape, generator=self._generator).to(device) < self.cfg.mask_ratio

    def _margin_loss(self, edit_scores: Tensor, irrelevant_scores: Tensor) -> Tensor:
        """Eq. 5 (each hinge averaged over its violated terms, as EasyEdit does)."""
        cfg = self.cfg

        def hinge_mean(t: Tensor) -> Tensor:
            t = t[t > 0]
            return t.mean() if t.numel() else edit_scores.new_zeros(())

        if cfg.act_margin_unit is None:
            raise ValueError("WISE: editor.act_margin_unit is null (from the model) but prepare(corpus) was not "
                             "called before the first edit")
        unit = cfg.act_margin_unit
        gap = irrelevant_scores.view(-1, 1) - edit_scores.view(1, -1) + cfg.gamma * unit
        return (hinge_mean(gap) + hinge_mean(irrelevant_scores - cfg.alpha * unit)
                + hinge_mean(cfg.beta * unit - edit_scores))

    def apply(self, records: list) -> list[LedgerEntry]:
        return [self._edit_one(record) for record in records]

    def _edit_one(self, record) -> LedgerEntry:
        cfg = self.cfg
        start_time = time.perf_counter()
        edit_id = len(self.ledger)
        if self.current is None:  # a new shard, with a fresh random mask (knowledge sharding)
            self._new_shard()
        batch = self._batch_for(record)
        n_edit = batch.n_edit
        before = self.current.clone()
        delta = self.current.clone().requires_grad_(True)
        optimizer = torch.optim.SGD([delta], lr=cfg.edit_lr, weight_decay=cfg.weight_decay)
        got: dict[str, Tensor] = {}

        def side_forward(module, args, output):  # training: every row through the shard (W_v + D)
            change = F.linear(args[0], delta.to(args[0].dtype))
            got["norms"] = change.float().norm(dim=-1)  # [B, L]
            return output + change

        def forward() -> tuple[Tensor, bool, Tensor, Tensor, Tensor]:
            """(target NLL, all target tokens right, edit scores in scope [n_e], out-of-scope scores,
            edit scores over whole sequences [n_e] (what the router sees))."""
            logits = self.model(input_ids=batch.ids, attention_mask=batch.valid.long(),
                                use_cache=False).logits[:n_edit, :-1].float()
            lab = batch.labels[:n_edit]
            on = lab != -100
            nll = F.cross_entropy(logits[on], lab[on])
            right = bool((logits[on].argmax(-1) == lab[on]).all())
            norms = got["norms"]
            edit_in = _masked_mean(norms[:n_edit], batch.in_scope)
            out = [_masked_mean(norms[n_edit:], batch.valid[n_edit:])]
            has_out = batch.out_edit.any(dim=1)
            if has_out.any():
                out.insert(0, _masked_mean(norms[:n_edit][has_out], batch.out_edit[has_out]))
            whole = _masked_mean(norms[:n_edit], batch.valid[:n_edit])
            return nll, right, edit_in, torch.cat(out), whole

        steps, last_loss, stopped = 0, None, False
        with eval_mode(self.model):
            with self.adapter.hooks({self.hookpoint: side_forward}):
                with torch.no_grad():
                    nll_before, right_before, *_ = forward()
                for steps in range(cfg.n_iter):
                    nll, _, edit_in, out_scope, _ = forward()
                    loss = nll + self._margin_loss(edit_in, out_scope)  # Eq. 6
                    if cfg.early_stop and last_loss is not None and abs(loss.item() - last_loss) <= 1e-4 \
                            and loss.item() <= 0.02:
                        stopped = True
                        break
                    last_loss = loss.item()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    delta.grad.mul_(self.mask)  # Eq. 7: only this shard's entries learn
                    optimizer.step()
                    with torch.no_grad():
                        if cfg.norm_constraint is not None:
                            delta.clamp_(-cfg.norm_constraint, cfg.norm_constraint)
                else:
                    steps = cfg.n_iter
                with torch.no_grad():
                    nll_after, right_after, edit_in, out_scope, whole = forward()
        self.current = delta.detach()
        edit_act = float(whole.min())
        self.min_act = min(self.min_act, edit_act)  # calibrates the routing threshold (Eq. 4)

        count = edit_id + 1
        merged = False
        if count % cfg.save_freq == 0:  # close the shard: saved, and a new mask for the next one
            self.shards.append(self.current)
            self.current, self.mask = None, None
        if count % cfg.merge_freq == 0 and self.shards:
            self._merge()
            merged = True
        change = (delta.detach() - before)
        entry = LedgerEntry.for_record(
            edit_id, record,
            changed={f"{self.hookpoint}.side_memory": (change != 0).any(dim=1).nonzero().flatten().tolist()},
            delta_norm=float(change.norm()),
            steps=steps,
            seconds=time.perf_counter() - start_time,
            metrics_before={"target_nll": nll_before.item(), "target_argmax": float(right_before)},
            metrics_after={"target_nll": nll_after.item(), "target_argmax": float(right_after),
                           "edit_act": edit_act, "out_of_scope_act": float(out_scope.max())},
            extra={"threshold": self.threshold, "early_stop": stopped, "merged": merged,
                   "memories": len(self.memories()), "params_changed": int((change != 0).sum())},
        )
        self.ledger.append(entry)
        return entry

    def _merge(self) -> None:
        """Merge the saved shards into the side memory (Eq. 8; EasyEdit's merge_weight)."""
        cfg = self.cfg
        deltas = list(self.shards)
        if self.side is None:
            weights = [cfg.weights / len(deltas)] * len(deltas)
        else:
            weights = [0.4 / len(deltas)] * len(deltas) + [0.6]
            deltas.append(self.side)
        if cfg.merge_alg == "ties":
            self.side = ties_merge(deltas, cfg.densities, weights)
        else:
            self.side = linear_merge(deltas, weights)
        self.shards = []
        self.merges += 1

    # --- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu().clone()

        return {
            "hookpoint": self.hookpoint,
            "side": cpu(self.side),
            "shards": [cpu(s) for s in self.shards],
            "current": cpu(self.current),
            "mask": cpu(self.mask),
            "min_act": None if self.min_act == float("inf") else self.min_act,
            "merges": self.merges,
            "generator": self._generator.get_state(),
            "ledger": self.ledger_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_for(state, "hookpoint", self.hookpoint, "side memory (editor.layer)")
        device = self.device_of(self.layer)

        def load(name: str, t: Tensor | None, dtype=torch.float32) -> Tensor | None:
            if t is None:
                return None
            if tuple(t.shape) != self.shape:
                raise ValueError(f"WISE edit state: {name} has shape {list(t.shape)}, this layer's down "
                                 f"projection {list(self.shape)}")
            return t.to(device, dtype).clone()

        self.side = load("side", state["side"])
        self.shards = [load(f"shards/{i}", s) for i, s in enumerate(state["shards"])]
        self.current = load("current", state["current"])
        self.mask = load("mask", state["mask"], torch.bool)
        self.min_act = float("inf") if state["min_act"] is None else float(state["min_act"])
        self.merges = int(state["merges"])
        self._generator.set_state(state["generator"].to(torch.uint8))
        self.load_ledger(state["ledger"])


@dataclass
class _EditBatch:
    ids: Tensor
    """[B, L] edit rows (one per context template) then irrelevant rows, right padded."""
    valid: Tensor
    """[B, L] real tokens."""
    labels: Tensor
    """[B, L-1] target token ids where the logits at j predict a target token, else -100."""
    n_edit: int
    in_scope: Tensor
    """[n_edit, L] tokens whose activation score Eq. 5 pushes up (all, or the subject's)."""
    out_edit: Tensor
    """[n_edit, L] tokens of the edit rows pushed down with the irrelevant rows (the non-subject ones)."""


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per-row mean of `values` [B, L] over `mask` [B, L]."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def _subject_tokens(tok: Any, prompt: str, subject: str | None) -> list[int]:
    """Indices (in `encode_prompt(tok, prompt)`) of the tokens covering the subject, [] when the
    prompt has no subject."""
    span = subject_span(prompt, subject)
    if span is None:
        return []
    last = token_ending_at(tok, prompt, span[1])
    if span[0] > 0:
        first = token_ending_at(tok, prompt, span[0]) + 1  # after the last token starting before it
    else:  # the subject opens the prompt: it starts after the leading special tokens (BOS)
        first = len(encode_prompt(tok, prompt)) - len(tok(prompt, add_special_tokens=False)["input_ids"])
    return list(range(max(first, 0), last + 1))
