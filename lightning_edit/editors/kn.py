"""KN: knowledge neurons (Dai et al., ACL 2022, "Knowledge Neurons in Pretrained Transformers"), the
baseline of MENT's paper (seeds/001, III-B), adapted to next-token prediction as MENT's authors did.

For one edit (prompt, target):

- **Prompts.** The edit prompt and its parallel data (the request's `training_paraphrases`, at most `parallel`):
  prompts that express the same knowledge (Dai et al. use PARAREL's paraphrases; MENT retrieves
  similar data from the corpus whose ground truth is the same target, 10 of them).
- **Attribution** (Dai et al. Eq. 3-4): Integrated Gradients of the model's *probability* of one
  target token at the last position before it (the prompt's last for the first token) with respect to every FFN hidden neuron
  (the down projection's input) of every searched layer, at that position: baseline 0, path
  `alpha * a`, `steps` Riemann points alpha = k/m, k = 1..m (m = 20, the paper's; MENT also runs
  m = 1), `Attr(a_i) = a_i * mean_k dP/da_i(k/m * a)`. Each layer is integrated on its own, the
  others as the model computes them (Dai et al. integrate one FFN's neurons at a time).
- **Refining** (Dai et al. 3.3): per prompt, the coarse set is the neurons with attribution above
  `threshold` x the prompt's largest attribution (t = 0.2); the knowledge neurons are those in the
  coarse sets of more than a share `p` of the prompts (p = 0.7), with p moved by 0.05 until their
  number is within [min_neurons, max_neurons] = [2, 5]; when the prompts allow no share in that band
  (four prompts give only five distinct counts), the smallest larger set is cut to the 5 with the
  largest summed attribution (ours).
- **Edit** (Dai et al. 5.2, "updating facts"): each knowledge neuron's value slot (its down_proj
  column) becomes `w_i + sign(a_i) (-lambda1 * e(old) + lambda2 * e(new))`, lambda1 = 1, lambda2 = 8,
  with `old` the model's current prediction and `new` the target. The sign of the neuron's activation
  a_i at the edit position is our adaptation: Dai et al.'s BERT neurons (GELU) that carry a fact fire
  positively, but a SwiGLU neuron can carry it with a negative activation, and then the paper's
  update would push the output away from the new target. `e` is the token's word embedding: in an untied
  model, the *output* embedding (the unembedding row, the direction that raises that token's logit)
  by default, `embedding: input` for the input one. `rule: enhance` instead doubles the knowledge
  neurons' activations (Dai et al. 4.2 and the knowledge-neurons library's `enhance_knowledge`, which
  MENT's authors describe: "it always doubles the activations"), here as doubling their value slots,
  which is the same function for every input.
- **Targets of several tokens** (ours; Dai et al.'s facts are one [MASK] token): each target token
  that is not yet the argmax after the edit prompt and the target tokens before it (teacher forced,
  token ids, on the model as the earlier tokens' updates left it) gets its own knowledge neurons,
  attributed at that position for that token over the edit prompt's and the parallel prompts'
  prefixes, and its own update (`old` = the model's prediction there), as MENT patches token by token.
  Further sweeps (`sweeps`) re-edit the tokens a later update demoted. Editing the first token only
  landed 27 of 50 single edits on toyworld-gpt2, whose objects are mostly several tokens.
- **Skip-action** (MENT's adaptation, III-E): if any target token is not the argmax after the edit, the
  edit is a skip-action: reverted (`revert_on_skip`) and costed at `quota + 1` neurons (quota 10).

The ledger carries MENT's cost measures with the same keys as MENT's editor (`neuron_cost`,
`patched_neurons`, `skip`, `target_argmax`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_edit.editors.base import Editor, Layer, LedgerEntry
from lightning_edit.locate.attribution import TargetObjective
from lightning_edit.models import freeze
from lightning_edit.tokens import encode_prompt, target_positions

RULES = ("update", "enhance")
EMBEDDINGS = ("output", "input")


@dataclass
class KNConfig:
    """KN's hyperparameters; defaults are Dai et al.'s (and MENT's adaptation, III-F)."""

    steps: int = 20
    """m: Riemann steps of Integrated Gradients (Dai et al. 20; MENT's fast variant: 1)."""
    threshold: float = 0.2
    """t: a prompt's coarse neurons have attribution > t x its largest attribution."""
    share: float = 0.7
    """p: knowledge neurons are in more than this share of the prompts' coarse sets."""
    share_step: float = 0.05
    """p moves by this until the number of knowledge neurons is within [min_neurons, max_neurons]."""
    min_neurons: int = 2
    max_neurons: int = 5
    parallel: int = 10
    """Parallel prompts used besides the edit prompt (MENT: 10)."""
    layers: list[Layer] | None = None
    """FFN layers searched (negative counts from the end); None = all (Dai et al. search every layer)."""
    rule: str = "update"
    """"update": w_i - lambda1 e(old) + lambda2 e(new) (Dai et al. 5.2); "enhance": double the activations."""
    lambda1: float = 1.0
    lambda2: float = 8.0
    lambda_retries: int = 0
    """Per target token, when the update leaves the token short of the argmax, it is undone and made
    again with lambda1 and lambda2 times `lambda_growth`, at most this many times (0 = Dai et al.: one
    update). The update a token needs grows with the logit gap the model holds and shrinks with the
    knowledge neurons' activations, and neither is known before the edit: the search finds it per
    token, on the same located neurons (one forward per attempt). Measured: with `sweeps` 4 it lands
    no more single edits on toyworld-gpt2 (50/50 at 0 and at 4), and in a 100-edit toyworld stream its
    x16 updates cut the final mean from .108 to .033; kn.yaml keeps 0."""
    lambda_growth: float = 2.0
    """Factor on lambda1 and lambda2 between two attempts (with `lambda_retries` > 0)."""
    sweeps: int = 4
    """Passes over the target tokens (ours): a later token's update can demote an earlier one (its
    knowledge neurons fire there too), and one update may fall short; each further pass re-edits the
    tokens that are not the argmax, and a pass that leaves every token the argmax ends the edit.
    Single edits on toyworld-gpt2 (50): 1 pass landed 44, 2 landed 46, 4 landed 50."""
    embedding: str = "output"
    """Word embedding of the update rule: "output" (unembedding rows) or "input" (input embeddings)."""
    quota: int = 10
    """MENT's quota: a skip-action costs quota + 1 neurons."""
    revert_on_skip: bool = True
    batch_size: int | None = None
    """IG points per forward pass (None: all `steps` at once)."""

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"editor.rule is {self.rule!r}; expected one of {RULES}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"editor.embedding is {self.embedding!r}; expected one of {EMBEDDINGS}")
        if self.steps < 1 or not 0 < self.threshold <= 1 or not 0 <= self.share <= 1:
            raise ValueError(f"editor.steps >= 1, 0 < threshold <= 1, 0 <= share <= 1 (got {self.steps}, "
                             f"{self.threshold}, {self.share})")
        if self.lambda_retries < 0 or self.lambda_growth <= 1 or self.sweeps < 1:
            raise ValueError(f"editor.lambda_retries must be >= 0, lambda_growth > 1 and sweeps >= 1 (got "
                             f"{self.lambda_retries}, {self.lambda_growth}, {self.sweeps})")
        if not 1 <= self.min_neurons <= self.max_neurons:
            raise ValueError(f"editor.min_neurons / max_neurons: need 1 <= min <= max (got {self.min_neurons}, "
                             f"{self.max_neurons})")


def probability_ig(objective: TargetObjective, steps: int, batch_size: int | None = None) -> Tensor:
    """Integrated Gradients of P(target) (Dai et al. Eq. 3-4): `a * mean_k dP/da(k/m * a)`, [d]."""
    a = objective.activation()
    alphas = torch.arange(1, steps + 1, dtype=torch.float32, device=a.device) / steps
    total = torch.zeros_like(a)
    chunk = batch_size or steps
    with torch.enable_grad():
        for first in range(0, steps, chunk):
            points = (alphas[first:first + chunk, None] * a[None]).requires_grad_(True)
            (grads,) = torch.autograd.grad(objective(points).exp().sum(), points)  # logprob -> probability
            total += grads.sum(dim=0)
    return a * total / steps


def refine(coarse: list[set[tuple[int, int]]], share: float, step: float, lo: int, hi: int,
           score: dict[tuple[int, int], float] | None = None) -> set[tuple[int, int]]:
    """Neurons in more than `share` of the coarse sets (Dai et al. 3.3), `share` moved by `step` towards
    a count in [lo, hi]: raised while there are more than `hi`, lowered while there are fewer than `lo`.
    When no share gives a count in the band (few prompts allow few distinct counts), the smallest set
    above it is cut to the `hi` neurons with the largest `score` (summed attribution)."""
    counts: dict[tuple[int, int], int] = {}
    for s in coarse:
        for n in s:
            counts[n] = counts.get(n, 0) + 1
    total = len(coarse)

    def kept(p: float) -> set[tuple[int, int]]:
        return {n for n, c in counts.items() if c > p * total or (total == 1 and c == 1)}

    p = share
    chosen = kept(p)
    direction = 1 if len(chosen) > hi else -1 if len(chosen) < lo else 0
    above = chosen if len(chosen) > hi else None
    while direction and 0 <= p + direction * step <= 1 + 1e-9:
        p = round(p + direction * step, 10)
        chosen = kept(p)
        if len(chosen) > hi:
            above = chosen
        if (direction > 0 and len(chosen) <= hi) or (direction < 0 and len(chosen) >= lo):
            break
    if len(chosen) < lo and above is not None:  # stepped over the band: cut the last larger set
        rank = sorted(above, key=lambda n: -(score or {}).get(n, 0.0))
        chosen = set(rank[:hi])
    elif len(chosen) > hi:
        rank = sorted(chosen, key=lambda n: -(score or {}).get(n, 0.0))
        chosen = set(rank[:hi])
    return chosen


class KnowledgeNeurons(Editor):
    """KN over the FFN down projections; the weights are edited in place."""

    name = "kn"
    config_class = KNConfig
    supports_rollback = True

    def setup(self) -> None:
        cfg = self.cfg
        self.layers = self.resolve_layers(cfg.layers)
        cfg.layers = list(self.layers)  # states record the absolute layers
        self.changes: list[tuple[int, int, int, Tensor]] = []
        """(edit id, layer, neuron, the vector added to the column)."""
        freeze(self.model)

    def column(self, layer: int, neuron: int) -> Tensor:
        return self.adapter.down_proj_weight(layer)[:, neuron]

    def _embedding(self, token: int) -> Tensor:
        table = self.adapter.unembedding_weight if self.cfg.embedding == "output" else self.adapter.embeddings.weight
        return table[token].detach().float()

    @torch.no_grad()
    def _next(self, prompt: str) -> Tensor:
        """Next-token logits after `prompt`, [V] float32."""
        ids = torch.tensor(encode_prompt(self.tokenizer, prompt), device=self.device)[None]
        return self.model(input_ids=ids, use_cache=False).logits[0, -1].float()

    def attributions(self, prefix: list[int], token: int) -> dict[int, tuple[Tensor, Tensor]]:
        """Per layer, (the probability-IG attribution, the activation) of every FFN hidden neuron at
        the last position of the token ids `prefix`, for the next token `token`."""
        out = {}
        for layer in self.layers:
            f = TargetObjective.on_ids(self.model, self.adapter, layer, prefix + [token], len(prefix),
                                       objective="logprob")
            out[layer] = (probability_ig(f, self.cfg.steps, self.cfg.batch_size).cpu(), f.activation().cpu())
        return out

    def locate(self, prefixes: list[list[int]], token: int) -> tuple[list[tuple[int, int]], dict[tuple[int, int], float], dict]:
        """The knowledge neurons (layer, neuron) of `token` after the prefixes (the edit prompt's first),
        strongest summed attribution first, and the sign of each one's activation on the edit prompt."""
        cfg = self.cfg
        coarse, summed, signs = [], {}, {}
        for i, prefix in enumerate(prefixes):
            found = self.attributions(prefix, token)
            top = max(float(a.max()) for a, _ in found.values())
            cut = cfg.threshold * top
            coarse.append({(l, int(n)) for l, (a, _) in found.items() for n in (a > cut).nonzero().flatten().tolist()}
                          if top > 0 else set())
            for l, (a, act) in found.items():
                summed[l] = summed.get(l, 0) + a
                if i == 0:
                    signs[l] = torch.where(act < 0, -1.0, 1.0)
        score = {(l, n): float(summed[l][n]) for s in coarse for l, n in s}
        chosen = refine(coarse, cfg.share, cfg.share_step, cfg.min_neurons, cfg.max_neurons, score)
        order = sorted(chosen, key=lambda n: -score[n])
        return order, {n: float(signs[n[0]][n[1]]) for n in order}, {"coarse_sizes": [len(c) for c in coarse]}

    def _token_steps(self, prompts: list[str], target: str) -> list[tuple[int, list[list[int]]]]:
        """Per target token of the edit prompt's teacher-forced ids, (the token, its prefixes): the
        edit prompt's (first) and each parallel prompt's whose joint tokenisation has the same target
        tokens up to this one."""
        ids, start = target_positions(self.tokenizer, prompts[0], target)
        steps = [(ids[j], [ids[:j]]) for j in range(start, len(ids))]
        for prompt in prompts[1:]:
            other, first = target_positions(self.tokenizer, prompt, target)
            for k, (token, prefixes) in enumerate(steps):
                if first + k >= len(other) or other[first:first + k + 1] != ids[start:start + k + 1]:
                    break
                prefixes.append(other[:first + k])
        return steps

    def _edit_token(self, token: int, prefixes: list[list[int]], edit_id: int,
                    saved: dict[tuple[int, int], Tensor]) -> dict:
        """Locate `token`'s knowledge neurons over `prefixes` and update their value slots (Dai et al.
        5.2) with `old` the model's current prediction after the edit prompt's prefix; while the token
        is not the argmax there and `lambda_retries` are left, undo and update at `lambda_growth` x
        the lambdas (the last attempt stays)."""
        cfg = self.cfg
        old = int(self._next_ids(prefixes[0]).argmax())
        neurons, signs, info = self.locate(prefixes, token)
        start = {}
        with torch.no_grad():
            for l, n in neurons:
                col = self.column(l, n)
                saved.setdefault((l, n), col.detach().clone())
                start[(l, n)] = col.detach().clone()
        for attempt in range(cfg.lambda_retries + 1):
            scale = cfg.lambda_growth ** attempt
            added = []
            with torch.no_grad():
                for l, n in neurons:
                    col = self.column(l, n)
                    col.copy_(start[(l, n)])
                    if cfg.rule == "update":  # Dai et al. 5.2, signed by the neuron's activation (see the doc)
                        delta = signs[(l, n)] * scale * (-cfg.lambda1 * self._embedding(old)
                                                         + cfg.lambda2 * self._embedding(token))
                    else:  # enhance: doubling the activation == doubling the value slot (x scale)
                        delta = scale * start[(l, n)].float()
                    col.add_(delta.to(col.dtype))
                    added.append((edit_id, l, n, delta.cpu()))
            if int(self._next_ids(prefixes[0]).argmax()) == token:
                break
        return {"token": token, "old_token": old, "neurons": [[l, n] for l, n in neurons],
                "signs": [signs[n] for n in neurons], "lambda_scale": scale, "prompts": len(prefixes), **info,
                "added": added}

    @torch.no_grad()
    def _next_ids(self, prefix: list[int]) -> Tensor:
        """Next-token logits after the token ids `prefix`, [V] float32."""
        ids = torch.tensor(prefix, dtype=torch.long, device=self.device)[None]
        return self.model(input_ids=ids, use_cache=False).logits[0, -1].float()

    def apply(self, records: list) -> list[LedgerEntry]:
        """Dai et al.'s edit is for one token (BERT's [MASK]); a target of several tokens is edited
        token by token, as MENT's authors patch one (III-D): for each target token that is not yet the
        argmax after the edit prompt and the target tokens before it (teacher forced, on the model as
        the earlier tokens' updates left it), its knowledge neurons are located over the edit prompt's
        and the parallel prompts' prefixes and their value slots updated. A later token's update can
        demote an earlier token, so further sweeps re-edit the tokens that are no longer the argmax;
        the edit resolves when every target token is the argmax on the final model."""
        if len(records) != 1:
            raise ValueError(f"KN edits one record at a time (got {len(records)}); set data.batch_size=1")
        (record,) = records
        cfg = self.cfg
        edit_id = len(self.ledger)
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            prompts = [record.prompt] + list(record.training_paraphrases)[:cfg.parallel]
            steps = self._token_steps(prompts, record.target_new)
            target = steps[0][0]
            before = self._next(record.prompt)
            saved: dict[tuple[int, int], Tensor] = {}
            tokens, added = [], []
            for _sweep in range(cfg.sweeps):
                for token, prefixes in steps:
                    if int(self._next_ids(prefixes[0]).argmax()) == token:
                        continue
                    out = self._edit_token(token, prefixes, edit_id, saved)
                    added += out.pop("added")
                    tokens.append(out)
                resolved = all(int(self._next_ids(prefixes[0]).argmax()) == token for token, prefixes in steps)
                if resolved:
                    break
            after = self._next(record.prompt)
            if not resolved and cfg.revert_on_skip:
                with torch.no_grad():
                    for (l, n), col in saved.items():
                        self.column(l, n).copy_(col)
                added = []
                after = self._next(record.prompt)
            self.changes += added
        finally:
            self.model.train(was_training)
        seconds = time.perf_counter() - start
        lp_before, lp_after = torch.log_softmax(before, -1), torch.log_softmax(after, -1)
        changed: dict[str, set[int]] = {}
        for _, l, n, _ in added:
            changed.setdefault(self.adapter.down_proj_name(l) + ".weight", set()).add(n)
        patched = sum(len(t["neurons"]) for t in tokens)
        entry = LedgerEntry.for_record(
            edit_id, record, changed={k: sorted(v) for k, v in changed.items()},
            delta_norm=float(torch.stack([d for *_, d in added]).norm()) if added else 0.0,
            steps=patched, seconds=seconds,
            metrics_before={"target_prob": float(lp_before[target].exp()),
                            "target_rank": float((lp_before > lp_before[target]).sum())},
            metrics_after={"target_argmax": float(resolved), "target_prob": float(lp_after[target].exp()),
                           "neuron_cost": float(patched if resolved else cfg.quota + 1),
                           "patched_neurons": float(len(added)), "skip": float(not resolved)},
            extra={"tokens": tokens, "target_tokens": len(steps)})
        self.ledger.append(entry)
        return [entry]

    def state_dict(self) -> dict[str, Any]:
        d = self.adapter.hidden_size
        return {"changes": {"edit_id": [c[0] for c in self.changes], "layer": [c[1] for c in self.changes],
                            "neuron": [c[2] for c in self.changes],
                            "vectors": torch.stack([c[3] for c in self.changes]) if self.changes else torch.zeros(0, d)},
                "ledger": self.ledger_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.changes:
            raise ValueError("KN.load_state_dict: this editor has edits already; build it over a fresh base model")
        saved = state["changes"]
        vectors = saved["vectors"]
        if len(vectors) != len(saved["layer"]) or (len(vectors) and vectors.shape[1] != self.adapter.hidden_size):
            raise ValueError(f"KN edit state: {len(saved['layer'])} changes but vectors of shape {tuple(vectors.shape)}")
        with torch.no_grad():
            for edit_id, l, n, v in zip(saved["edit_id"], saved["layer"], saved["neuron"], vectors):
                col = self.column(int(l), int(n))
                col.add_(v.to(col.device, col.dtype))
                self.changes.append((int(edit_id), int(l), int(n), v.clone()))
        self.load_ledger(state["ledger"])

    def rollback(self, edit_id: int) -> None:
        """Subtract edit `edit_id`'s changes (later edits keep theirs)."""
        mine = [c for c in self.changes if c[0] == edit_id]
        if not mine and not any(e.edit_id == edit_id for e in self.ledger):
            raise KeyError(f"no edit {edit_id} in the ledger")
        with torch.no_grad():
            for _, l, n, v in reversed(mine):
                col = self.column(l, n)
                col.sub_(v.to(col.device, col.dtype))
        self.changes = [c for c in self.changes if c[0] != edit_id]
