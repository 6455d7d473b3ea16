"""GRACE (Hartvigsen et al., NeurIPS 2023): a discrete key-value codebook adapter at one layer.

The adapter wraps layer l's MLP down projection (EasyEdit's `mlp.down_proj`). Its codebook holds
entries (key k_i [d_ff], value v_i [d_model], radius eps_i, label y_i):
    key of a token    = the down projection's input at that token (the FFN hidden activation)
    lookup (Eq. 1)    = i* = argmin_i ||h - k_i||_2; if ||h - k_i*|| <= eps_i* the down projection's
                        output at that token is replaced by v_i*, else it is left as computed.
Editing one record (Algorithm 1): the query is the key at the prompt's last token;
    - empty codebook, or no key within eps_init + eps_i* of it: add (query, v, eps_init, y);
    - nearest key within reach with the same label: expand its radius to cover the query
      ("coverage": eps_i* = d; "moving_average": also move k_i* halfway to the query);
    - nearest key within reach with another label: add the query, and split the two balls
      (eps_i* = d/2 - 1e-5, eps_new = d/2);
then the chosen entry's value is trained (Adam, `n_iter` steps) so the target tokens are predicted,
teacher forced, with the codebook active. "cold" values start uniform in [0, 1), "warm" ones from the
layer's output at the query.

Choices made here (also at the config fields):
- Lookup is per token at every position ("replace_last" applied to each position): under teacher
  forcing the prompt's last token is the position that predicts the target, and in generation each
  new token is the last one, which is GRACE's replace_last at every decoding step. No prompt/target
  boundary has to be passed in at inference. "replace_after" replaces, from the first matching
  position on, every later position of the sequence by that entry's value (GRACE's replace_all,
  made causal); `generate` runs it without the KV cache so it stays exact.
- Labels are compared as target strings (GRACE compares the mean of the label token ids).
- A query at distance 0 from an existing key with another label (the same prompt edited again)
  takes that entry over instead of splitting both radii to nothing.
- Optional early stop (`stop_nll`): once every target token is the argmax and the mean target NLL
  is at most `stop_nll`. The GRACE code always runs `n_iter` steps (its `reg: early_stop` is unused),
  which is the default.

`edited()` installs the adapter as a forward hook for the duration of the block; outside it the model
is the base model, bit for bit (the weights are never touched).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_edit.editors.base import Editor, LedgerEntry, greedy_generate
from lightning_edit.models import eval_mode, freeze
from lightning_edit.tokens import target_positions

VAL_INITS = ("cold", "warm")
REPLACEMENTS = ("replace_last", "replace_after")
EPS_EXPANDS = ("coverage", "moving_average")


@dataclass
class GraceConfig:
    """GRACE hyperparameters; defaults are the paper's (GRACE repo config/editor/grace.yaml and
    EasyEdit's hparams/GRACE)."""

    layer: int = -1
    """Layer whose MLP down projection carries the codebook; negative counts from the last layer
    (EasyEdit: layer 27 of Llama-2-7B's 32, i.e. about 85% of the depth)."""
    eps: float = 1.0
    """Initial radius eps_init of a new entry (paper Sec. 3, `eps`). Distances are in the units of the
    FFN hidden activation, so this is size-dependent: set it per model in the YAML."""
    edit_lr: float = 1.0
    """Adam learning rate on the value (paper `edit_lr`)."""
    n_iter: int = 100
    """Value-training steps at most (GRACE repo `n_iter` 100; EasyEdit's Llama configs use 50)."""
    val_init: str = "cold"
    """"cold": a new value starts uniform in [0, 1) (paper default); "warm": from the layer's output
    at the query token."""
    replacement: str = "replace_last"
    """"replace_last" (EasyEdit default): the value replaces the output at each matching token;
    "replace_after": at the first matching token and every later one (GRACE's replace_all, causal)."""
    eps_expand: str = "coverage"
    """Radius expansion for a same-label query (paper Alg. 1): "coverage" or "moving_average"."""
    stop_nll: float | None = None
    """Stop training the value once every target token is the argmax and the mean target NLL is at
    most this; None = always run `n_iter` steps (the GRACE code)."""
    seed: int = 0
    """Seeds the cold value initialisation (one generator owned by the editor)."""

    def __post_init__(self) -> None:
        for name, value, choices in (("val_init", self.val_init, VAL_INITS),
                                     ("replacement", self.replacement, REPLACEMENTS),
                                     ("eps_expand", self.eps_expand, EPS_EXPANDS)):
            if value not in choices:
                raise ValueError(f"editor.{name} is {value!r}; expected one of {', '.join(choices)}")
        if self.eps <= 0:
            raise ValueError(f"editor.eps is {self.eps}; expected a positive radius")
        if self.n_iter < 1:
            raise ValueError(f"editor.n_iter is {self.n_iter}; expected >= 1")


class Grace(Editor):
    """GRACE codebook at `adapter.down_proj(layer)`; the base weights are never changed."""

    name = "grace"
    config_class = GraceConfig

    def setup(self) -> None:
        self.layer = self.resolve_layer(self.cfg.layer)
        self.hookpoint = self.adapter.down_proj_name(self.layer)  # the codebook replaces this module's output
        cfg, adapter = self.cfg, self.adapter
        d_ff, d_model = adapter.intermediate_size(self.layer), adapter.hidden_size
        device = self.device
        # The codebook, one row per entry.
        self.keys = torch.zeros(0, d_ff, device=device)  # [n, d_ff]
        self.values = torch.zeros(0, d_model, device=device)  # [n, d_model]
        self.epsilons = torch.zeros(0, device=device)  # [n]
        self.labels: list[str] = []
        self.entry_edits: list[list[int]] = []  # edit ids each entry serves
        self._generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        freeze(self.model)

    # --- the adapter ------------------------------------------------------------------------------

    def _lookup(self, query: Tensor, out: Tensor, values: Tensor) -> Tensor:
        """Replace `out` [B, S, d_model] where the query [B, S, d_ff] falls in an entry's ball."""
        if self.keys.shape[0] == 0:
            return out
        B, S, _ = query.shape
        dists = torch.cdist(query.reshape(B * S, -1).float(), self.keys.float())  # [B*S, n]
        dist, nearest = dists.min(dim=1)
        hit = (dist <= self.epsilons[nearest]).view(B, S)  # GRACE Eq. 1: inside the nearest key's ball
        if not hit.any():
            return out
        nearest = nearest.view(B, S)
        if self.cfg.replacement == "replace_after":
            # From the first hit on, every position takes the first hit's value.
            after = hit.long().cumsum(dim=1) > 0
            first = hit.float().argmax(dim=1)  # [B]
            nearest = nearest.gather(1, first[:, None]).expand(B, S)
            hit = after
        replaced = values[nearest].to(out.dtype)  # [B, S, d_model]
        return torch.where(hit[..., None], replaced, out)

    def _hook(self, values_fn):
        def hook(module, args, output):
            return self._lookup(args[0], output, values_fn())
        return hook

    @contextlib.contextmanager
    def edited(self) -> Iterator[nn.Module]:
        with self.adapter.hooks({self.hookpoint: self._hook(lambda: self.values)}):
            yield self.model

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 8, **kwargs) -> list[str]:
        """Greedy continuations with the codebook active (no KV cache under "replace_after")."""
        if self.cfg.replacement == "replace_after":
            kwargs.setdefault("use_cache", False)
        return greedy_generate(self.edited(), self.tokenizer, prompts, max_new_tokens, self.device, **kwargs)

    # --- editing ----------------------------------------------------------------------------------

    def _query(self, ids: Tensor, position: int) -> tuple[Tensor, Tensor]:
        """(key [d_ff], layer output [d_model]) at `position` of `ids` [1, L], codebook active."""
        got: dict[str, Tensor] = {}

        def grab(module, args, output):
            got["key"] = args[0][0, position].detach().float().clone()
            got["out"] = output[0, position].detach().float().clone()

        with torch.no_grad(), self.adapter.hooks({self.hookpoint: grab}):
            self.model(input_ids=ids, use_cache=False)
        return got["key"], got["out"]

    def _add(self, key: Tensor, value: Tensor, label: str, edit_id: int) -> int:
        self.keys = torch.cat([self.keys, key[None]])
        self.values = torch.cat([self.values, value[None].to(self.values)])
        self.epsilons = torch.cat([self.epsilons, self.epsilons.new_tensor([self.cfg.eps])])
        self.labels.append(label)
        self.entry_edits.append([edit_id])
        return self.keys.shape[0] - 1

    def _place(self, query: Tensor, init_value: Tensor, label: str, edit_id: int) -> tuple[int, str]:
        """Update the codebook for a new query (Algorithm 1); returns (entry to train, action)."""
        cfg = self.cfg
        if self.keys.shape[0] == 0:
            return self._add(query, init_value, label, edit_id), "add"
        dists = torch.cdist(query[None], self.keys)[0]
        dist, nearest = (t.item() for t in dists.min(dim=0))
        if dist > cfg.eps + self.epsilons[nearest].item():  # no ball within reach: a new entry
            return self._add(query, init_value, label, edit_id), "add"
        if self.labels[nearest] != label:
            if dist == 0.0:  # the same key again with a new label: the entry is taken over
                self.labels[nearest] = label
                self.values[nearest] = init_value.to(self.values)
                self.entry_edits[nearest].append(edit_id)
                return nearest, "replace"
            index = self._add(query, init_value, label, edit_id)  # conflict: split both balls
            self.epsilons[nearest] = dist / 2 - 1e-5
            self.epsilons[index] = dist / 2
            return index, "split"
        if dist > self.epsilons[nearest].item():  # same label: grow the ball to cover the query
            if cfg.eps_expand == "moving_average":
                self.keys[nearest] = 0.5 * self.keys[nearest] + 0.5 * query
            self.epsilons[nearest] = dist
        self.entry_edits[nearest].append(edit_id)
        return nearest, "expand"

    def _init_value(self, out: Tensor) -> Tensor:
        if self.cfg.val_init == "warm":
            return out.clone()
        return torch.rand(out.shape, generator=self._generator).to(out)

    def apply(self, records: list) -> list[LedgerEntry]:
        return [self._edit_one(record) for record in records]

    def _edit_one(self, record) -> LedgerEntry:
        cfg = self.cfg
        start_time = time.perf_counter()
        edit_id = len(self.ledger)
        ids_list, start = target_positions(self.tokenizer, record.prompt, record.target_new)
        ids = torch.tensor([ids_list], dtype=torch.long, device=self.device)
        labels = ids[0, start:]  # the target tokens, predicted by the logits at start-1 .. L-2
        position = start - 1  # the prompt's last token: the query

        with eval_mode(self.model):
            query, out = self._query(ids, position)
            entry, action = self._place(query, self._init_value(out), record.target_new, edit_id)
            value = self.values[entry].clone().requires_grad_(True)
            optimizer = torch.optim.Adam([value], lr=cfg.edit_lr)

            def values_now() -> Tensor:  # the codebook with the entry being trained swapped in
                return torch.cat([self.values[:entry], value[None], self.values[entry + 1:]])

            steps, nll_before, right_before = 0, None, None
            with self.adapter.hooks({self.hookpoint: self._hook(values_now)}):
                while True:
                    logits = self.model(input_ids=ids, use_cache=False).logits[0, start - 1:-1].float()
                    loss = F.cross_entropy(logits, labels)
                    right = bool((logits.argmax(-1) == labels).all())
                    if nll_before is None:
                        nll_before, right_before = loss.item(), right
                    done = cfg.stop_nll is not None and right and loss.item() <= cfg.stop_nll
                    if steps >= cfg.n_iter or done:
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    steps += 1
            with torch.no_grad():
                self.values[entry] = value.detach()
        entry_record = LedgerEntry.for_record(
            edit_id, record,
            changed={f"{self.hookpoint}.codebook": [entry]},
            delta_norm=float(value.detach().norm()),
            steps=steps,
            seconds=time.perf_counter() - start_time,
            metrics_before={"target_nll": nll_before, "target_argmax": float(right_before)},
            metrics_after={"target_nll": loss.item(), "target_argmax": float(right)},
            extra={"action": action, "entry": entry, "entries": int(self.keys.shape[0]),
                   "epsilon": float(self.epsilons[entry]),
                   # numbers this edit set: the value, plus a new key and radius or the radii it moved
                   "params_changed": self.values.shape[1] + {"add": self.keys.shape[1] + 1,
                                                             "split": self.keys.shape[1] + 2}.get(action, 1)},
        )
        self.ledger.append(entry_record)
        return entry_record

    # --- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "hookpoint": self.hookpoint,
            "keys": self.keys.detach().cpu().clone(),
            "values": self.values.detach().cpu().clone(),
            "epsilons": self.epsilons.detach().cpu().clone(),
            "labels": list(self.labels),
            "entry_edits": [list(e) for e in self.entry_edits],
            "generator": self._generator.get_state(),
            "ledger": self.ledger_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_for(state, "hookpoint", self.hookpoint, "codebook (editor.layer)")
        keys, values = state["keys"], state["values"]
        if keys.shape[1:] != self.keys.shape[1:] or values.shape[1:] != self.values.shape[1:]:
            raise ValueError(f"GRACE edit state has keys {list(keys.shape)} and values {list(values.shape)}; "
                             f"this layer takes [n, {self.keys.shape[1]}] and [n, {self.values.shape[1]}]")
        device = self.device
        self.keys = keys.to(device, torch.float32).clone()
        self.values = values.to(device, torch.float32).clone()
        self.epsilons = state["epsilons"].to(device, torch.float32).clone()
        self.labels = list(state["labels"])
        self.entry_edits = [[int(i) for i in e] for e in state["entry_edits"]]
        self._generator.set_state(state["generator"].to(torch.uint8))
        self.load_ledger(state["ledger"])
