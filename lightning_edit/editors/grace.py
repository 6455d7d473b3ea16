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
then the value of the entry that serves the query is trained (Adam, `n_iter` steps) so the target
tokens are predicted, teacher forced, with the codebook active. "cold" values start uniform in
[0, 1), "warm" ones from the layer's output at the query.

Routing (what the paper leaves implicit, made exact here):
- One lookup, `_route`, decides for every key: the hook at inference, the rule at edit time and the
  check of earlier edits all call it. Distances are computed pair by pair (`torch.cdist` without its
  matrix-product shortcut, whose value for one row depends on the rest of the batch), so the
  decision for a key is bit for bit the same alone, in a training sequence or in an eval batch.
- The editor keeps every edit's key and the entry serving it. After a codebook change (a split
  shrinks a ball that covered earlier queries, a new ball is nearer to an earlier query than its
  own key, a key moves) it checks every edit with the same lookup and re-places each edit whose
  key no longer reaches an entry with its target, by the same rules: covered by (or expanding) an
  entry with its label, which then serves it, else a new entry (added, or split off its nearest
  key) holding the value that served it. The same prompt edited again with another target (a key
  at distance 0) supersedes the earlier edit. An edit that cannot be routed is never trained
  blindly: its ledger entry says `failed` and why, and `unrouted` lists it with the reason.

Choices made here (also at the config fields):
- Lookup is per token at every position ("replace_last" applied to each position): under teacher
  forcing the prompt's last token is the position that predicts the target, and in generation each
  new token is the last one, which is GRACE's replace_last at every decoding step. No prompt/target
  boundary has to be passed in at inference. "replace_after" replaces, from the first matching
  position on, every later position of the sequence by that entry's value (GRACE's replace_all,
  made causal); `generate` runs it without the KV cache so it stays exact. Under it an edit's
  earlier prompt tokens are part of its route: a ball of another target that catches one of them
  is shrunk just enough to let it pass.
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

from lightning_edit.editors.base import Editor, Layer, LedgerEntry, greedy_generate
from lightning_edit.locate import activations
from lightning_edit.models import eval_mode, freeze
from lightning_edit.tokens import target_positions

VAL_INITS = ("cold", "warm")
REPLACEMENTS = ("replace_last", "replace_after")
EPS_EXPANDS = ("coverage", "moving_average")
SPLIT_GAP = 1e-5
"""The split leaves the older ball this much short of half the distance (GRACE code, Alg. 1)."""


@dataclass
class GraceConfig:
    """GRACE hyperparameters; defaults are the paper's (GRACE repo config/editor/grace.yaml and
    EasyEdit's hparams/GRACE)."""

    layer: Layer = -1
    """Layer whose MLP down projection carries the codebook; negative counts from the last layer
    (EasyEdit: layer 27 of Llama-2-7B's 32, i.e. about 85% of the depth)."""
    eps: float | None = 1.0
    """Initial radius eps_init of a new entry (paper Sec. 3, `eps`). Distances are in the units of the
    FFN hidden activation, so this is size-dependent. None: from the model, in `prepare(corpus)`:
    `eps_scale` x the median distance from a corpus line's key (at its last token) to the nearest
    other line's key; the value found is recorded as `eps` (editor.json)."""
    eps_scale: float = 1.3
    """With `eps: null`, eps as a multiple of the corpus keys' median nearest-neighbour distance."""
    eps_samples: int = 400
    """With `eps: null`, corpus lines (a seeded sample) whose keys give that distance."""
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
        if self.eps is not None and self.eps <= 0:
            raise ValueError(f"editor.eps is {self.eps}; expected a positive radius (or null: from the model)")
        if self.eps_scale <= 0 or self.eps_samples < 2:
            raise ValueError(f"editor.eps_scale must be > 0 and eps_samples >= 2 (got {self.eps_scale}, "
                             f"{self.eps_samples})")
        if self.n_iter < 1:
            raise ValueError(f"editor.n_iter is {self.n_iter}; expected >= 1")


class Grace(Editor):
    """GRACE codebook at `adapter.down_proj(layer)`; the base weights are never changed."""

    name = "grace"
    config_class = GraceConfig

    def setup(self) -> None:
        self.layer = self.resolve_layer(self.cfg.layer)
        self.cfg.layer = self.layer  # states record the absolute layer
        self.hookpoint = self.adapter.down_proj_name(self.layer)  # the codebook replaces this module's output
        cfg, adapter = self.cfg, self.adapter
        d_ff, d_model = adapter.intermediate_size(self.layer), adapter.hidden_size
        device = self.device_of(self.layer)  # the codebook follows its layer
        # The codebook, one row per entry.
        self.keys = torch.zeros(0, d_ff, device=device)  # [n, d_ff]
        self.values = torch.zeros(0, d_model, device=device)  # [n, d_model]
        self.epsilons = torch.zeros(0, device=device)  # [n]
        self.labels: list[str] = []
        # Every edit's route: the keys it is looked up at (its query; under "replace_after" the
        # prompt's earlier tokens too, query last), its target and the entry serving it (-1: none).
        self.edit_keys = torch.zeros(0, d_ff, device=device)  # [rows, d_ff]
        self.edit_spans: list[int] = []  # rows of edit_keys per edit
        self.edit_labels: list[str] = []
        self.edit_entry: list[int] = []
        self.unrouted: dict[int, str] = {}  # edit id -> why no entry serves it
        # Nearest entry of each row of edit_keys, kept up to date as the codebook changes.
        self._row_dist = torch.zeros(0, device=device)
        self._row_nearest = torch.zeros(0, dtype=torch.long, device=device)
        self._touched: dict[int, set[str]] = {}  # entry -> what the current edit changed in it
        self._generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        freeze(self.model)

    def prepare(self, corpus: list[str] | None = None) -> None:
        """With `eps: null`, the initial radius from the model: `eps_scale` x the median distance from a
        corpus line's key to its nearest other line's key. Measured (FFN input at the last layer,
        400 lines): median 0.75 on toyworld, 2.04 on toyworld-gpt2, where an edit's rephrases lie at
        a median 0.79 / 2.21 from it and its neighbours' 10% quantile at 1.55 / 4.04: 1.3 x puts eps
        between the two on both (toyworld's fitted 1.0 is 1.33 x)."""
        if self.cfg.eps is not None:
            return
        lines = [line.strip() for line in (corpus or []) if line.strip()]
        if len(lines) < 2:
            raise ValueError("GRACE with editor.eps null needs a corpus (prepare(corpus), the job's data.corpus) "
                             "to measure the key distances eps is derived from; or set editor.eps")
        order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(self.cfg.seed)).tolist()
        sample = [lines[i] for i in order[:self.cfg.eps_samples]]
        with torch.no_grad():
            keys = activations(self.model, self.tokenizer, self.adapter, self.layer, sample).to(self.device)
        dist = self._distances(keys, keys)
        dist.fill_diagonal_(float("inf"))
        nearest = dist.min(dim=1).values
        nearest = nearest[nearest > 0]  # a line repeated verbatim is not a neighbour
        if not len(nearest):
            raise ValueError("GRACE: every sampled corpus line has the same key; set editor.eps")
        self.cfg.eps = float(self.cfg.eps_scale * nearest.median())

    # --- the lookup -------------------------------------------------------------------------------

    def _distances(self, rows: Tensor, keys: Tensor) -> Tensor:
        """||row - key||_2 [N, n], each pair computed on its own (no batch-dependent shortcut)."""
        return torch.cdist(rows.float(), keys.float(), compute_mode="donot_use_mm_for_euclid_dist")

    def _nearest(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(distance, index) of each row's nearest key [N], or (inf, -1) with an empty codebook."""
        if self.keys.shape[0] == 0:
            return (rows.new_full(rows.shape[:1], float("inf")),
                    torch.full(rows.shape[:1], -1, dtype=torch.long, device=rows.device))
        return self._distances(rows, self.keys).min(dim=1)

    def _hits(self, dist: Tensor, nearest: Tensor) -> Tensor:
        """GRACE Eq. 1: the nearest entry when the key is inside its ball, else -1."""
        inside = dist <= self.epsilons[nearest.clamp(min=0)]
        return torch.where(inside & (nearest >= 0), nearest, -1)

    def _spread(self, hits: Tensor) -> Tensor:
        """[B, S] entry whose value each position takes: its own hit under "replace_last"; the first
        hit of the sequence from there on under "replace_after"."""
        if self.cfg.replacement == "replace_last":
            return hits
        hit = hits >= 0
        first = hit.float().argmax(dim=1, keepdim=True)  # [B, 1]
        return torch.where(hit.long().cumsum(dim=1) > 0, hits.gather(1, first).expand_as(hits), -1)

    def _route(self, keys: Tensor) -> Tensor:
        """[B, S] entry each position of `keys` [B, S, d_ff] uses (-1: the layer's own output)."""
        B, S, _ = keys.shape
        return self._spread(self._hits(*self._nearest(keys.reshape(B * S, -1))).view(B, S))

    def _lookup(self, keys: Tensor, out: Tensor, values: Tensor) -> Tensor:
        """Replace `out` [B, S, d_model] where `keys` [B, S, d_ff] are routed to an entry."""
        if self.keys.shape[0] == 0:
            return out
        entry = self._route(keys)
        if not (entry >= 0).any():
            return out
        return torch.where(entry[..., None] >= 0, values[entry.clamp(min=0)].to(out.dtype), out)

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

    @property
    def entry_edits(self) -> list[list[int]]:
        """The edit ids each entry serves."""
        served: list[list[int]] = [[] for _ in self.labels]
        for edit_id, entry in enumerate(self.edit_entry):
            if entry >= 0:
                served[entry].append(edit_id)
        return served

    # --- the codebook -----------------------------------------------------------------------------

    def _touch(self, entry: int, what: str) -> None:
        self._touched.setdefault(entry, set()).add(what)

    def _add_entry(self, key: Tensor, value: Tensor, eps: float, label: str) -> int:
        index = self.keys.shape[0]
        self.keys = torch.cat([self.keys, key[None].to(self.keys)])
        self.values = torch.cat([self.values, value[None].to(self.values)])
        self.epsilons = torch.cat([self.epsilons, self.epsilons.new_tensor([eps])])
        self.labels.append(label)
        if self.edit_keys.shape[0]:  # the new key is the nearest of the rows it is strictly closer to
            dist = self._distances(self.edit_keys, self.keys[index:])[:, 0]
            closer = dist < self._row_dist  # ties keep the lower index, as min() does
            self._row_dist = torch.where(closer, dist, self._row_dist)
            self._row_nearest = torch.where(closer, index, self._row_nearest)
        self._touch(index, "new")
        return index

    def _move_key(self, entry: int, key: Tensor) -> None:
        self.keys[entry] = key
        if self.edit_keys.shape[0]:
            was = self._row_nearest == entry  # rows whose nearest moved away: look again
            if was.any():
                dist, nearest = self._nearest(self.edit_keys[was])
                self._row_dist[was], self._row_nearest[was] = dist, nearest
            dist = self._distances(self.edit_keys, self.keys[entry:entry + 1])[:, 0]
            closer = (dist < self._row_dist) | ((dist == self._row_dist) & (entry < self._row_nearest))
            self._row_dist = torch.where(closer, dist, self._row_dist)
            self._row_nearest = torch.where(closer, entry, self._row_nearest)
        self._touch(entry, "key")

    def _set_radius(self, entry: int, eps: float) -> None:
        self.epsilons[entry] = eps
        self._touch(entry, "radius")

    def _rule(self, query: Tensor, label: str) -> tuple[str, int, float]:
        """Algorithm 1's case for `query` [d_ff] with `label`: (action, nearest entry, distance)."""
        dist, nearest = (t.item() for t in self._nearest(query[None]))
        if nearest < 0 or dist > self.cfg.eps + self.epsilons[nearest].item():
            return "add", nearest, dist
        if self.labels[nearest] != label:
            return ("replace" if dist == 0.0 else "split"), nearest, dist
        return "expand", nearest, dist

    def _place(self, query: Tensor, value: Tensor, label: str) -> tuple[int, str]:
        """Update the codebook for `query` (Algorithm 1); returns (entry whose ball now holds the
        query, action). `value` initialises a new entry (or the one taken over)."""
        action, nearest, dist = self._rule(query, label)
        if action == "add":
            return self._add_entry(query, value, self.cfg.eps, label), action
        if action == "replace":  # the same key again with a new label: the entry is taken over
            self.labels[nearest] = label
            self.values[nearest] = value.to(self.values)
            self._touch(nearest, "value")
            return nearest, action
        if action == "split":  # conflict: a new entry, and both balls stop short of each other
            index = self._add_entry(query, value, dist / 2, label)
            self._set_radius(nearest, max(dist / 2 - SPLIT_GAP, 0.0))
            return index, action
        if dist > self.epsilons[nearest].item():  # same label: grow the ball to cover the query
            if self.cfg.eps_expand == "moving_average":
                self._move_key(nearest, 0.5 * self.keys[nearest] + 0.5 * query)
            self._set_radius(nearest, dist)
        return nearest, action

    # --- routes of the edits ----------------------------------------------------------------------

    def _add_route(self, rows: Tensor, label: str) -> int:
        """Record a new edit looked up at `rows` [P, d_ff] (its query last); returns its id."""
        dist, nearest = self._nearest(rows)
        self.edit_keys = torch.cat([self.edit_keys, rows.to(self.edit_keys)])
        self._row_dist = torch.cat([self._row_dist, dist])
        self._row_nearest = torch.cat([self._row_nearest, nearest])
        self.edit_spans.append(rows.shape[0])
        self.edit_labels.append(label)
        self.edit_entry.append(-1)
        return len(self.edit_entry) - 1

    def _edit_hits(self) -> Tensor:
        """[edits, max span] entry each edit's rows hit (-1: none or padding), as `_route` sees them."""
        spans = torch.tensor(self.edit_spans, device=self.edit_keys.device)
        hits = torch.full((len(self.edit_spans), int(spans.max())), -1, dtype=torch.long, device=spans.device)
        offsets = torch.cumsum(spans, 0) - spans
        edit = torch.repeat_interleave(torch.arange(len(spans), device=spans.device), spans)
        position = torch.arange(len(edit), device=spans.device) - offsets[edit]
        hits[edit, position] = self._hits(self._row_dist, self._row_nearest)
        return hits

    def _misrouted(self) -> list[int]:
        """Edits with an entry whose own query is not routed to an entry with their target."""
        if not self.edit_entry:
            return []
        routes = self._spread(self._edit_hits())
        last = torch.tensor(self.edit_spans, device=routes.device) - 1
        routed = routes.gather(1, last[:, None])[:, 0].tolist()
        return [e for e, (entry, got) in enumerate(zip(self.edit_entry, routed))
                if entry >= 0 and (got < 0 or self.labels[got] != self.edit_labels[e] or got != entry)]

    def _reroute(self, edit_id: int, served_by: Tensor) -> str | None:
        """Make `edit_id`'s query reach an entry with its target again; the reason it cannot, or None."""
        label = self.edit_labels[edit_id]
        start = sum(self.edit_spans[:edit_id])
        span = self.edit_spans[edit_id]
        hits = self._edit_hits()[edit_id, :span]
        routed = int(self._spread(hits[None])[0, -1])
        if routed >= 0 and self.labels[routed] == label:  # covered by an entry with its target
            self.edit_entry[edit_id] = routed
            return None
        first = int((hits >= 0).float().argmax()) if (hits >= 0).any() else span - 1
        if first < span - 1:  # replace_after: an earlier token falls in a ball of another target
            dist = float(self._row_dist[start + first])
            blocking = int(hits[first])
            if dist <= SPLIT_GAP:
                return (f"token {first} of its prompt is entry {blocking}'s key ({self.labels[blocking]!r}); "
                        "under replace_after that entry's value is used from there on")
            self._set_radius(blocking, dist - SPLIT_GAP)
            return None
        action, nearest, _ = self._rule(self.edit_keys[start + span - 1], label)
        if action == "replace":
            return f"superseded: its prompt's key is entry {nearest}'s key, now {self.labels[nearest]!r}"
        entry, _ = self._place(self.edit_keys[start + span - 1], served_by, label)
        self.edit_entry[edit_id] = entry
        return None

    def _settle(self, values_before: Tensor) -> tuple[dict[int, str], int]:
        """Re-route edits until every edit with an entry is routed to it: ({edit id: reason} of those
        that cannot be, their entry cleared; how many repairs it took)."""
        dropped: dict[int, str] = {}
        for repairs in range(4 * len(self.edit_entry) + 8):  # each round re-places or drops one edit
            wrong = self._misrouted()
            if not wrong:
                return dropped, repairs
            edit_id = wrong[0]
            entry = self.edit_entry[edit_id]
            served_by = values_before[entry] if entry < values_before.shape[0] else self.values[entry]
            reason = self._reroute(edit_id, served_by.clone())
            if reason is not None:
                dropped[edit_id] = reason
                self.edit_entry[edit_id] = -1
        for edit_id in self._misrouted():
            dropped[edit_id] = "no codebook repair routed its query to an entry with its target"
            self.edit_entry[edit_id] = -1
        return dropped, repairs + 1

    def _admit(self, rows: Tensor, value: Tensor, label: str) -> tuple[str, dict[int, str], int]:
        """A new edit looked up at `rows` [P, d_ff] (its query last) with target `label`: place its
        query (Algorithm 1, `value` for a new entry), then settle every route. Returns (action,
        {edit id: reason} of edits no entry serves now, repairs)."""
        values_before = self.values.clone()
        edit_id = self._add_route(rows, label)
        self.edit_entry[edit_id], action = self._place(rows[-1], value, label)
        return (action, *self._settle(values_before))

    # --- editing ----------------------------------------------------------------------------------

    def _query(self, ids: Tensor, position: int) -> tuple[Tensor, Tensor]:
        """(keys [position + 1, d_ff] up to `position` of `ids` [1, L], layer output [d_model] at
        `position`), codebook active."""
        got: dict[str, Tensor] = {}

        def grab(module, args, output):
            got["keys"] = args[0][0, :position + 1].detach().float().clone()
            got["out"] = output[0, position].detach().float().clone()

        with torch.no_grad(), self.adapter.hooks({self.hookpoint: grab}):
            self.model(input_ids=ids, use_cache=False)
        return got["keys"], got["out"]

    def _init_value(self, out: Tensor) -> Tensor:
        if self.cfg.val_init == "warm":
            return out.clone()
        return torch.rand(out.shape, generator=self._generator).to(out)

    def apply(self, records: list) -> list[LedgerEntry]:
        return [self._edit_one(record) for record in records]

    def _target_loss(self, ids: Tensor, start: int, values: Tensor) -> tuple[Tensor, bool]:
        """(mean NLL of the target tokens ids[start:], all of them the argmax) with the codebook
        `values` active."""
        with self.adapter.hooks({self.hookpoint: self._hook(lambda: values)}):
            logits = self.model(input_ids=ids, use_cache=False).logits[0, start - 1:-1].float()
        labels = ids[0, start:]
        return F.cross_entropy(logits, labels), bool((logits.argmax(-1) == labels).all())

    def _train(self, entry: int, ids: Tensor, start: int) -> tuple[Tensor | None, int, dict, str | None]:
        """Train `entry`'s value on the teacher-forced record (Adam, `n_iter` steps at most): (value,
        steps, {nll/argmax before and after}, why it could not be trained or None)."""
        cfg = self.cfg
        value = self.values[entry].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([value], lr=cfg.edit_lr)
        steps, before = 0, None
        while True:
            values = torch.cat([self.values[:entry], value[None], self.values[entry + 1:]])
            loss, right = self._target_loss(ids, start, values)
            before = before or (loss.item(), right)
            if not loss.requires_grad:  # cannot happen once routed; never train blindly
                return None, steps, {}, f"the lookup did not use entry {entry} at the query"
            if steps >= cfg.n_iter or (cfg.stop_nll is not None and right and loss.item() <= cfg.stop_nll):
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        return value.detach(), steps, {"before": before, "after": (loss.item(), right)}, None

    def _edit_one(self, record) -> LedgerEntry:
        start_time = time.perf_counter()
        edit_id = len(self.ledger)
        if len(self.edit_entry) != edit_id:
            raise RuntimeError(f"GRACE holds routes of {len(self.edit_entry)} edits but a ledger of {edit_id}")
        if self.cfg.eps is None:
            raise ValueError("GRACE: editor.eps is null (derived from the model's keys) but prepare(corpus) was "
                             "not called before the first edit")
        ids_list, start = target_positions(self.tokenizer, record.prompt, record.target_new)
        ids = torch.tensor([ids_list], dtype=torch.long, device=self.device)

        self._touched = {}
        value, steps, scores = None, 0, {}
        with eval_mode(self.model):
            keys, out = self._query(ids, start - 1)  # the query: the prompt's last token
            rows = keys[-1:] if self.cfg.replacement == "replace_last" else keys
            action, dropped, repairs = self._admit(rows, self._init_value(out), record.target_new)
            failed = dropped.pop(edit_id, None)
            self.unrouted.update(dropped)
            if failed is None:
                entry = self.edit_entry[edit_id]
                value, steps, scores, failed = self._train(entry, ids, start)
            if failed is None:
                self.values[entry] = value
                self._touch(entry, "value")
            else:
                self.edit_entry[edit_id] = -1
                self.unrouted[edit_id] = failed
                served = set(self.edit_entry)
                for new in (e for e, what in self._touched.items() if "new" in what and e not in served):
                    self._set_radius(new, -1.0)  # an entry made for this edit alone catches nothing
                with torch.no_grad():
                    loss, right = self._target_loss(ids, start, self.values)
                scores = {"before": (loss.item(), right), "after": (loss.item(), right)}
        entry = self.edit_entry[edit_id]
        d_ff, d_model = self.keys.shape[1], self.values.shape[1]
        size = {"new": d_ff + 1 + d_model, "key": d_ff, "radius": 1, "value": d_model}
        extra = {"action": action, "entry": entry, "entries": int(self.keys.shape[0]),
                 "epsilon": float(self.epsilons[entry]) if entry >= 0 else None,
                 # numbers this edit set: new entries (key, radius, value), moved keys, radii, values
                 "params_changed": sum(size["new"] if "new" in what else sum(size[w] for w in what)
                                       for what in self._touched.values()),
                 "repairs": repairs,  # edits re-placed because this edit's change moved their route
                 "unrouted": len(self.unrouted)}
        superseded = sorted(e for e, why in dropped.items() if why.startswith("superseded"))
        if superseded:
            extra["superseded"] = superseded
        lost = {e: why for e, why in dropped.items() if e not in superseded}
        if lost:
            extra["lost"] = lost
        if failed is not None:
            extra["failed"] = failed
        entry_record = LedgerEntry.for_record(
            edit_id, record,
            changed={f"{self.hookpoint}.codebook": sorted(self._touched)},
            delta_norm=float(value.norm()) if value is not None else 0.0,
            steps=steps,
            seconds=time.perf_counter() - start_time,
            metrics_before={"target_nll": scores["before"][0], "target_argmax": float(scores["before"][1])},
            metrics_after={"target_nll": scores["after"][0], "target_argmax": float(scores["after"][1])},
            extra=extra,
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
            "edit_keys": self.edit_keys.detach().cpu().clone(),
            "edit_spans": list(self.edit_spans),
            "edit_labels": list(self.edit_labels),
            "edit_entry": list(self.edit_entry),
            "unrouted": [[e, why] for e, why in self.unrouted.items()],
            "generator": self._generator.get_state(),
            "ledger": self.ledger_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_for(state, "hookpoint", self.hookpoint, "codebook (editor.layer)")
        missing = [k for k in ("edit_keys", "edit_spans", "edit_labels", "edit_entry", "unrouted") if k not in state]
        if missing:
            raise ValueError(f"GRACE edit state lacks {', '.join(missing)} (the routes of its edits; saved by an "
                             "older version): re-run the edits")
        keys, values = state["keys"], state["values"]
        if keys.shape[1:] != self.keys.shape[1:] or values.shape[1:] != self.values.shape[1:]:
            raise ValueError(f"GRACE edit state has keys {list(keys.shape)} and values {list(values.shape)}; "
                             f"this layer takes [n, {self.keys.shape[1]}] and [n, {self.values.shape[1]}]")
        device = self.device_of(self.layer)
        self.keys = keys.to(device, torch.float32).clone()
        self.values = values.to(device, torch.float32).clone()
        self.epsilons = state["epsilons"].to(device, torch.float32).clone()
        self.labels = list(state["labels"])
        self.edit_keys = state["edit_keys"].to(device, torch.float32).clone().reshape(-1, self.keys.shape[1])
        self.edit_spans = [int(n) for n in state["edit_spans"]]
        self.edit_labels = list(state["edit_labels"])
        self.edit_entry = [int(e) for e in state["edit_entry"]]
        self.unrouted = {int(e): str(why) for e, why in state["unrouted"]}
        self._row_dist, self._row_nearest = self._nearest(self.edit_keys)
        self._generator.set_state(state["generator"].to(torch.uint8))
        self.load_ledger(state["ledger"])
