"""FiNE (seeds/002, Pan et al., ICLR 2025): fine-grained neuron-level knowledge editing.

Locate, then learn, only a handful of FFN neurons' down-projection columns:

- Contribution (FiNE's neuron localisation): for every FFN hidden neuron i of layer l,
  `c = a_{l,i} * (W_U w_{l,i})_t`: its activation at the prompt's last token times the logit its
  down_proj column w_{l,i} writes for token t straight through the unembedding W_U [vocab, d_model].
  The `num_neurons` (k = 5) largest contributions over all layers except the last
  `skip_last_layers` are chosen (FiNE keeps the final layers frozen to protect the model's language
  ability).
- Update: a delta on exactly those columns, learnt with Adam, minimising
      NLL(target | prompt)                                     (teacher forced, mean over target tokens)
    + kl_factor * KL(P_base || P_edit)                         (next-token distributions on the
                                                                prompt's own positions before its last,
                                                                and at the last token of `kl_templates`)
    + l2_factor * sum ||delta||^2                              (keeps the change small)
  until every target token has probability >= `early_stop_prob` or `max_steps` are spent. The deltas
  live outside the model during training (a hook adds `a[..., idx] @ delta^T` to the down
  projection's output), then are added to the columns: every other weight stays bit-identical.

The seeds hold FiNE's abstract only; METHODS.md section 2 specifies the method. Where neither gives a
value the default is marked "ours". Choices made here:
- t is the edit's new target's first token (METHODS.md: "W_U[:, target token]");
  `locate_token: prediction` locates on the model's current prediction instead (the fact being
  replaced, as FiNE's released code does when it scores the original output).
- FiNE's repetition-penalty term (its `beta`) is left out: our targets are single facts, not
  generated passages.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_edit.editors.base import Editor, LedgerEntry
from lightning_edit.locate import activations
from lightning_edit.models import eval_mode, freeze
from lightning_edit.tokens import encode_prompt, pad_id, right_padded, target_positions

LOCATE_TOKENS = ("target", "prediction")


@dataclass
class FiNEConfig:
    """FiNE's hyperparameters (see the module doc for where each comes from)."""

    num_neurons: int = 5
    """k: neurons edited per fact (FiNE's `neuron_num`; METHODS.md: 5)."""
    skip_last_layers: int = 2
    """The last layers whose neurons are never chosen (FiNE's `last_layer`; value ours)."""
    locate_token: str = "target"
    """Token t of the contribution score: "target" (the new target's first token, METHODS.md) or
    "prediction" (the model's current next token, the fact being replaced)."""
    lr: float | None = 5e-4
    """Adam learning rate on the column deltas (EasyEdit-style fine-tuning default; size dependent).
    None: from the model, in `prepare(corpus)`: `lr_scale` x the median per-entry RMS of the residual
    stream entering the final norm at the last token of corpus lines (Adam moves each delta entry by
    about lr per step, and a delta is written into that stream); recorded here (editor.json)."""
    lr_scale: float = 9.2e-3
    """With `lr: null`, lr as a fraction of that RMS."""
    lr_samples: int = 200
    """With `lr: null`, corpus lines (a seeded sample) the RMS is measured on."""
    max_steps: int = 50
    """Optimisation steps per edit at most (FiNE's `epochs`; value ours)."""
    kl_factor: float = 1.0
    """Weight of the KL term (FiNE's `alpha`; value ours)."""
    l2_factor: float = 1e-3
    """Weight of sum ||delta||^2 (FiNE's `gamma`, the norm loss; value ours)."""
    early_stop_prob: float = 0.9
    """Stop once every target token has at least this probability (FiNE's `early_stop_prob`; value ours)."""
    kl_templates: list[str] = field(default_factory=lambda: ["{} is a"])
    """Prompts (subject filled in) whose next-token distribution the KL term keeps; ROME's essence
    prompt. Records without a subject use the prompt's own positions only."""

    def __post_init__(self) -> None:
        if self.locate_token not in LOCATE_TOKENS:
            raise ValueError(f"editor.locate_token is {self.locate_token!r}; expected one of {LOCATE_TOKENS}")
        if (self.lr is not None and self.lr <= 0) or self.lr_scale <= 0 or self.lr_samples < 1:
            raise ValueError(f"editor.lr (or null: from the model), lr_scale and lr_samples must be positive "
                             f"(got {self.lr}, {self.lr_scale}, {self.lr_samples})")
        if self.num_neurons < 1 or self.skip_last_layers < 0 or self.max_steps < 0:
            raise ValueError(f"editor.num_neurons must be >= 1, skip_last_layers and max_steps >= 0 "
                             f"(got {self.num_neurons}, {self.skip_last_layers}, {self.max_steps})")


def contributions(acts: Tensor, down: Tensor, unembed_row: Tensor) -> Tensor:
    """FiNE's contribution of each neuron to token t: a_i * (W_U w_i)_t -> [d_ff].

    acts [d_ff] (the neurons' activations), down [d_model, d_ff] (down projection), unembed_row
    [d_model] (W_U's row of token t)."""
    return acts * (unembed_row @ down)


class FiNE(Editor):
    """FiNE over the FFN down projections; the chosen columns are edited in place."""

    name = "fine"
    config_class = FiNEConfig
    supports_rollback = True

    def setup(self) -> None:
        cfg = self.cfg
        n = self.adapter.num_layers
        if cfg.skip_last_layers >= n:
            raise ValueError(f"editor.skip_last_layers is {cfg.skip_last_layers}; the model has only {n} layers")
        self.layers = list(range(n - cfg.skip_last_layers))
        self.deltas: list[dict[str, Any]] = []
        """Per edit: {"edit_id", "layer", "neuron", "vector" [d_model]} for each changed column, in order."""
        freeze(self.model)

    def prepare(self, corpus: list[str] | None = None) -> None:
        """With `lr: null`, the learning rate from the model: `lr_scale` x the median RMS of the final
        norm's input at the last token of a seeded sample of corpus lines. Measured: 1.09 on toyworld
        (lr 1.0e-2, the value fitted there: 1 of 30 single edits flipped at 5e-4, 30 of 30 at 1e-2),
        1.37 on toyworld-gpt2 (lr 1.26e-2)."""
        if self.cfg.lr is not None:
            return
        lines = [line.strip() for line in (corpus or []) if line.strip()]
        if not lines:
            raise ValueError("FiNE with editor.lr null needs a corpus (prepare(corpus), the job's data.corpus) to "
                             "measure the residual scale the learning rate is derived from; or set editor.lr")
        order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(0)).tolist()
        rms = []
        seen: list[Tensor] = []
        handle = self.adapter.final_norm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            with torch.no_grad(), eval_mode(self.model):
                for i in order[:self.cfg.lr_samples]:
                    seen.clear()
                    ids = torch.tensor([encode_prompt(self.tokenizer, lines[i])], device=self.device)
                    self.model(input_ids=ids, use_cache=False)
                    rms.append(seen[-1][0, -1].float().pow(2).mean().sqrt())
        finally:
            handle.remove()
        self.cfg.lr = float(self.cfg.lr_scale * torch.stack(rms).median())

    # Locate ----------------------------------------------------------------------------------

    @torch.no_grad()
    def locate(self, prompt: str, token: int) -> list[tuple[int, int, float]]:
        """The k neurons (layer, neuron, contribution) with the largest contribution to `token`."""
        row = self.adapter.unembedding_weight[token].detach().float()
        scores = []
        for layer in self.layers:
            acts = activations(self.model, self.tokenizer, self.adapter, layer, [prompt])[0].to(row.device)
            down = self.adapter.down_proj_weight(layer).detach().float()
            scores.append(contributions(acts, down, row))
        flat = torch.cat(scores)
        width = [len(s) for s in scores]
        top = torch.topk(flat, min(self.cfg.num_neurons, len(flat))).indices.tolist()
        out = []
        for i in top:
            layer = 0
            while i >= width[layer]:
                i -= width[layer]
                layer += 1
            out.append((self.layers[layer], i, float(scores[layer][i])))
        return out

    # Update ----------------------------------------------------------------------------------

    @contextmanager
    def _delta_hooks(self, groups: dict[int, tuple[Tensor, Tensor]]) -> Iterator[None]:
        """Within the block, each layer's down projection output gains a[..., idx] @ delta^T."""

        def hook(idx: Tensor, delta: Tensor):
            def add(module, args, output):
                return output + args[0][..., idx] @ delta.T.to(output.dtype)
            return add

        fns = {self.adapter.down_proj_name(layer): hook(idx, delta) for layer, (idx, delta) in groups.items()}
        with self.adapter.hooks(fns, kind="forward"):
            yield

    def _kl_inputs(self, record) -> list[list[int]]:
        """Token ids of the sequences whose next-token distributions the KL term keeps."""
        prompts = [t.format(record.subject) for t in self.cfg.kl_templates if record.subject]
        return [encode_prompt(self.tokenizer, p) for p in prompts]

    def _forward(self, ids: Tensor, start: int, kl_ids: Tensor | None,
                 kl_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(log-probabilities at the target positions [n_target, V], at the KL positions [n_kl, V]).

        The KL positions are the edit prompt's own positions before its last (read off the same
        forward: the model is causal) and the last real token of each KL prompt."""
        logprobs = torch.log_softmax(self.model(input_ids=ids, use_cache=False).logits[0].float(), -1)
        kl = [logprobs[:start - 1]]
        if kl_ids is not None:
            logits = self.model(input_ids=kl_ids, attention_mask=kl_mask, use_cache=False).logits.float()
            last = kl_mask.sum(dim=1) - 1
            kl.append(torch.log_softmax(logits[torch.arange(len(last)), last], -1))
        return logprobs[start - 1:-1], torch.cat(kl)

    def apply(self, records: list) -> list[LedgerEntry]:
        if len(records) != 1:
            raise ValueError(f"FiNE edits one record at a time (got {len(records)}); set data.batch_size=1")
        record = records[0]
        cfg = self.cfg
        edit_id = len(self.ledger)
        start_time = time.perf_counter()
        device = self.device
        ids, start = target_positions(self.tokenizer, record.prompt, record.target_new)
        ids_t = torch.tensor([ids], dtype=torch.long, device=device)
        targets = ids_t[0, start:]
        kl_seqs = self._kl_inputs(record)
        kl_ids, kl_mask = right_padded(kl_seqs, pad_id(self.tokenizer), device) if kl_seqs else (None, None)

        with eval_mode(self.model):
            with torch.no_grad():
                base_logprobs, base_kl = self._forward(ids_t, start, kl_ids, kl_mask)  # [n_target, V], [n_kl, V]
            token = int(targets[0]) if cfg.locate_token == "target" else int(base_logprobs[0].argmax())
            chosen = self.locate(record.prompt, token)
            groups: dict[int, tuple[Tensor, Tensor]] = {}
            for layer in sorted({layer for layer, _, _ in chosen}):
                at = self.device_of(layer)  # each layer's deltas on that layer's device
                idx = torch.tensor([n for l, n, _ in chosen if l == layer], dtype=torch.long, device=at)
                groups[layer] = (idx, torch.zeros(self.adapter.hidden_size, len(idx), device=at,
                                                  requires_grad=True))
            params = [delta for _, delta in groups.values()]
            if cfg.lr is None:
                raise ValueError("FiNE: editor.lr is null (from the model) but prepare(corpus) was not called "
                                 "before the first edit")
            optimizer = torch.optim.Adam(params, lr=cfg.lr)
            before = self._target_stats(base_logprobs, targets)
            steps, stats = 0, before
            with self._delta_hooks(groups), torch.enable_grad():
                while True:
                    logprobs, kl_logprobs = self._forward(ids_t, start, kl_ids, kl_mask)
                    stats = self._target_stats(logprobs.detach(), targets)
                    if steps >= cfg.max_steps or stats["min_prob"] >= cfg.early_stop_prob:
                        break
                    nll = -logprobs.gather(1, targets[:, None]).mean()
                    kl = torch.zeros((), device=device)
                    if len(base_kl):  # KL(P_base || P_edit), averaged over the KL positions
                        kl = F.kl_div(kl_logprobs, base_kl, log_target=True, reduction="batchmean")
                    l2 = sum(delta.pow(2).sum() for delta in params)
                    loss = nll + cfg.kl_factor * kl + cfg.l2_factor * l2
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    steps += 1
            with torch.no_grad():
                for layer, (idx, delta) in groups.items():
                    for j, neuron in enumerate(idx.tolist()):
                        vector = delta[:, j].detach().clone()
                        self._add(layer, neuron, vector)
                        self.deltas.append({"edit_id": edit_id, "layer": layer, "neuron": neuron,
                                            "vector": vector.cpu()})
        changed: dict[str, list[int]] = {}
        for layer, (idx, _) in groups.items():
            changed[self.adapter.down_proj_name(layer) + ".weight"] = sorted(idx.tolist())
        entry = LedgerEntry.for_record(
            edit_id, record,
            changed=changed,
            delta_norm=float(torch.cat([d.detach().flatten() for d in params]).norm()),
            steps=steps,
            seconds=time.perf_counter() - start_time,
            metrics_before=before,
            metrics_after=stats,
            extra={"neurons": [[l, n, c] for l, n, c in chosen], "located_token": token},
        )
        self.ledger.append(entry)
        return [entry]

    @staticmethod
    def _target_stats(logprobs: Tensor, targets: Tensor) -> dict[str, float]:
        picked = logprobs.gather(1, targets[:, None]).flatten()
        return {"target_nll": float(-picked.mean()), "min_prob": float(picked.min().exp()),
                "target_argmax": float((logprobs.argmax(-1) == targets).all())}

    # Weights, state, rollback ------------------------------------------------------------------

    @torch.no_grad()
    def _add(self, layer: int, neuron: int, vector: Tensor, sign: float = 1.0) -> None:
        col = self.adapter.down_proj_weight(layer)[:, neuron]
        col.add_(sign * vector.to(col.device, col.dtype))

    def state_dict(self) -> dict[str, Any]:
        d = self.adapter.hidden_size
        return {
            "deltas": {
                "edit_id": [x["edit_id"] for x in self.deltas],
                "layer": [x["layer"] for x in self.deltas],
                "neuron": [x["neuron"] for x in self.deltas],
                "vectors": torch.stack([x["vector"] for x in self.deltas]) if self.deltas else torch.zeros(0, d),
            },
            "ledger": self.ledger_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-add the saved column deltas, in order, onto the base model this editor was built over."""
        if self.deltas:
            raise ValueError("FiNE.load_state_dict: this editor has edits already; build it over a fresh base model")
        saved = state["deltas"]
        vectors = saved["vectors"]
        if len(vectors) != len(saved["layer"]) or (len(vectors) and vectors.shape[1] != self.adapter.hidden_size):
            raise ValueError(f"FiNE edit state: {len(saved['layer'])} column deltas but vectors of shape "
                             f"{tuple(vectors.shape)} (expected [n, {self.adapter.hidden_size}])")
        for edit_id, layer, neuron, vector in zip(saved["edit_id"], saved["layer"], saved["neuron"], vectors):
            self._add(int(layer), int(neuron), vector)
            self.deltas.append({"edit_id": int(edit_id), "layer": int(layer), "neuron": int(neuron),
                                "vector": vector.clone()})
        self.load_ledger(state["ledger"])

    def rollback(self, edit_id: int) -> None:
        """Subtract edit `edit_id`'s column deltas (later edits keep theirs)."""
        if not any(e.edit_id == edit_id for e in self.ledger):
            raise KeyError(f"no edit {edit_id} in the ledger")
        for x in reversed([x for x in self.deltas if x["edit_id"] == edit_id]):
            self._add(x["layer"], x["neuron"], x["vector"], sign=-1.0)
        self.deltas = [x for x in self.deltas if x["edit_id"] != edit_id]
