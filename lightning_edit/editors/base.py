"""The one interface every editing method implements, what it is built over, and the edit ledger.

An editor owns everything a method changes (weights, codebooks, side memories, switches) as state
of its own object, never as module globals. It is built over an `EditorContext` the job layer
resolved (the model, its tokenizer and adapter, the loaded sparse component the class asked for
through `component_request`) and its validated config; nothing is set on it from outside. The
harness only calls the methods below, so adding a method means adding one file here (registered in
`registry.py`, or by a third party with `register_editor`) and one YAML in configs/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, ContextManager, Iterator, Mapping, Sequence, Union

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn

from lightning_edit.data.records import EditRequest, edit_requests
from lightning_edit.models import model_device, parse_layer
from lightning_edit.sparse.resolve import KIND_NAMES
from lightning_edit.tokens import padding_side


Layer = Union[int, str]
"""A layer in an editor's config: an index (negative counts from the last layer) or a percentage of
the model's depth ("50%"), resolved by `ModelAdapter.resolve_layer`; states record the index."""

@dataclass
class LedgerEntry:
    """What one edit did: enough to audit it, plot it and roll it back."""

    edit_id: int
    """Position in the stream (0-based)."""
    case_id: Any
    prompt: str
    target: str
    changed: dict[str, list[int]] = field(default_factory=dict)
    """Parameter name -> indices of the rows (or columns) this edit changed."""
    delta_norm: float = 0.0
    """Frobenius norm of the change this edit made to the edited parameters."""
    steps: int = 0
    """Optimisation steps (0 for closed-form methods)."""
    seconds: float = 0.0
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    status: str = "applied"
    """"applied", or "failed": the edit was refused (it wrote NaN or Inf) and rolled back."""
    landed: bool | None = None
    """Whether every target token was the argmax (teacher forced) on the model as edited right after
    this edit (`Editor.mark_landed`, called by the harness); None where nobody checked."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LedgerEntry":
        return cls(**data)

    @classmethod
    def for_record(cls, edit_id: int, record: Any, **fields: Any) -> "LedgerEntry":
        """The entry of edit `edit_id`, of `record` (an `EditRequest`: its case id, prompt and new target)."""
        return cls(edit_id=edit_id, case_id=record.case_id, prompt=record.prompt, target=record.target_new, **fields)


@dataclass
class EditorContext:
    """What an editor is built over, resolved by the job layer before the editor exists."""

    model: nn.Module
    tokenizer: Any
    adapter: Any
    """The model's `ModelAdapter` (every model access goes through it)."""
    model_name: str | None = None
    """The base model as the job named it (`model.name`), recorded in the edit state."""
    component: nn.Module | None = None
    """The loaded sparse component (SAE or transcoder, its `hookpoint` set) the class asked for
    through `component_request`; None for methods without one."""
    component_cfg: dict[str, Any] | None = None
    """The job's `component:` section (path, hookpoint), recorded in the edit state."""
    base_fingerprint: str | None = None
    """`editors.state.base_fingerprint` of the model before any edit: which base the edits apply to."""
    world: Any = None
    """The embedded world the model comes from (its knowledge base), or None for any other model."""


@dataclass(frozen=True)
class ComponentRequest:
    """The sparse component an editor needs: what the job layer loads (or trains) before building it."""

    kind: str
    """"sae" (reads and replaces a residual stream) or "transcoder" (an MLP's input -> output)."""
    hookpoint: str
    who: str
    """The method, as error messages name it."""
    trains_default: bool = True
    """Without `component.path`, an embedded world's default component is found or trained."""
    default_overrides: tuple[str, ...] = ()
    """SAE / transcoder job `key=value`s for that default."""


class Editor(ABC):
    """Applies knowledge edits to a model; subclasses implement one method each.

    Lifecycle: `Editor(ctx, cfg)` (validates `cfg`, checks the component, then the subclass's
    `setup()`) -> optional `prepare(corpus)` (statistics, calibration) -> `apply(requests)` per step
    -> evaluation inside `edited()`.

    `apply` sees `EditRequest`s only (prompt, subject, target_new, training paraphrases, case id):
    every subclass's `apply` is wrapped so that whatever it is called with (`EditRecord`s from a
    stream, requests) reaches it as requests, and the prompts an edit is scored on (rephrases,
    locality) never do.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("apply")
        if own is not None and not getattr(own, "_takes_requests", False):
            @functools.wraps(own)
            def apply(self, records: list) -> list[LedgerEntry]:
                return own(self, edit_requests(records))

            apply._takes_requests = True  # type: ignore[attr-defined]
            cls.apply = apply

    name: ClassVar[str] = "editor"
    config_class: ClassVar[type | None] = None
    """The method's hyperparameters as a dataclass (paper defaults); the YAML's `editor:` section
    is merged over it, so an unknown key is an error."""
    component_kind: ClassVar[str | None] = None
    """"sae" or "transcoder" for a method that edits through a sparse component, else None."""
    default_hookpoint: ClassVar[str | None] = None
    """Where that component sits when `component.hookpoint` is not set."""
    supports_batch: ClassVar[bool] = False
    supports_rollback: ClassVar[bool] = False

    def __init__(self, ctx: EditorContext, cfg: Any = None):
        self.ctx = ctx
        self.model = ctx.model
        self.tokenizer = ctx.tokenizer
        self.adapter = ctx.adapter
        self.component = ctx.component
        self.cfg = self.make_config(cfg)
        self.ledger: list[LedgerEntry] = []
        self._check_component()
        self.setup()

    def setup(self) -> None:
        """The method's own construction (layers, buffers, hooks to be), after the common checks.
        `self.cfg` is validated and `self.component` is the component `component_request` asked for."""

    # Construction: config and component ------------------------------------------------------

    @classmethod
    def make_config(cls, params: Mapping[str, Any] | Any) -> Any:
        """`config_class` with `params` (a mapping, e.g. the job's `editor:` section, `method` ignored)
        merged over its defaults; an instance is taken as it is. An unknown key or a wrong type is a
        ValueError naming `editor.<key>` and the valid keys."""
        if cls.config_class is not None and isinstance(params, cls.config_class):
            return params
        params = {k: v for k, v in dict(params or {}).items() if k != "method"}
        if cls.config_class is None or not dataclasses.is_dataclass(cls.config_class):
            if params:
                raise ValueError(f"editor '{cls.name}' takes no hyperparameters; got {sorted(params)}")
            return None
        try:
            merged = OmegaConf.merge(OmegaConf.structured(cls.config_class), params)
        except OmegaConfBaseException as exc:
            valid = ", ".join(f.name for f in dataclasses.fields(cls.config_class))
            key = getattr(exc, "full_key", None) or "?"
            raise ValueError(f"editor.{key}: {str(exc).splitlines()[0]} (editor '{cls.name}' keys: {valid})") from exc
        cfg = OmegaConf.to_object(merged)
        for key in ("layer", "layers"):  # the notation is checked here, the depth once there is a model
            value = getattr(cfg, key, None)
            if isinstance(value, list):
                for i, item in enumerate(value):
                    parse_layer(item, f"editor.{key}[{i}]")
            elif value is not None:
                parse_layer(value, f"editor.{key}")
        for f in dataclasses.fields(cfg):  # a NaN hyperparameter makes every edit NaN
            value = getattr(cfg, f.name)
            if isinstance(value, float) and value != value:
                raise ValueError(f"editor.{f.name} is nan (expected a number; editor '{cls.name}')")
        return cfg

    @classmethod
    def component_request(cls, cfg: Any, component_cfg: Mapping[str, Any], adapter: Any) -> ComponentRequest | None:
        """The component this method needs under config `cfg` (None: none): `component_kind` at
        `component.hookpoint`, else `default_hookpoint`. Methods whose need depends on their config
        override this."""
        if cls.component_kind is None:
            return None
        return ComponentRequest(cls.component_kind, component_cfg.get("hookpoint") or cls.default_hookpoint,
                                cls.__name__)

    def _check_component(self) -> None:
        request = self.component_request(self.cfg, self.ctx.component_cfg or {}, self.adapter)
        if request is None:
            return
        kind = "transcoder" if getattr(self.component, "is_transcoder", False) else "sae"
        if self.component is None or kind != request.kind:
            got = "none" if self.component is None else KIND_NAMES[kind]
            raise ValueError(f"{request.who} needs {KIND_NAMES[request.kind]} (top-k) as its component (got {got}); "
                             "the job loads component.path, or the embedded world's default")

    # The interface --------------------------------------------------------------------------

    def prepare(self, corpus: list[str] | None = None) -> None:
        """One-off work before the first edit (statistics, calibration). Default: nothing."""

    @abstractmethod
    def apply(self, records: list[EditRequest]) -> list[LedgerEntry]:
        """Apply one edit (or a batch where `supports_batch`), append to and return ledger entries.
        `records` arrive as `EditRequest`s (see the class docstring)."""

    @contextlib.contextmanager
    def edited(self) -> Iterator[nn.Module]:
        """The model as edited now (hooks, switches, spliced components active) for evaluation.

        Methods that edit weights in place need nothing more than the model itself.
        """
        yield self.model

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to reproduce the edited model from the base model (tensors + ledger)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` onto an editor built over a fresh copy of the base model."""

    def mark_landed(self, entries: Sequence[LedgerEntry], batch_size: int = 32) -> list[bool]:
        """Set each entry's `landed`: its target is the argmax at every target token (teacher forced)
        on the model as edited now. The harness calls it right after `apply`."""
        from lightning_edit.metrics import teacher_forced

        if not entries:
            return []
        with self.edited() as model:
            scores = teacher_forced(model, self.tokenizer, [e.prompt for e in entries], [e.target for e in entries],
                                    batch_size)
        for entry, score in zip(entries, scores):
            entry.landed = bool(score.exact)
        return [entry.landed for entry in entries]

    # Optional hooks, one signature each ------------------------------------------------------

    def rollback(self, edit_id: int) -> None:
        """Undo edit `edit_id` (methods with `supports_rollback`)."""
        raise NotImplementedError(f"{self.name} does not support rolling back an edit")

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 8, **kwargs) -> list[str]:
        """Greedy continuations of `prompts` by the edited model (`greedy_generate` inside `edited()`);
        a method whose edit is decided per sequence (a router, a scope gate) holds that decision."""
        return greedy_generate(self.edited(), self.tokenizer, prompts, max_new_tokens, self.device, **kwargs)

    def export_component(self, directory: Path) -> Path | None:
        """Write the edited sparse component for other tools (sparsify layout, `<directory>/<hookpoint>/`)
        and return the folder; None (the default) for methods with nothing to export."""
        return None

    # Helpers shared by subclasses -------------------------------------------------------------
    def resolve_layer(self, value: Layer, key: str = "editor.layer") -> int:
        """`value` (an index, negative from the last layer, or a percentage of depth "50%") as a layer
        index in 0..n-1 (`ModelAdapter.resolve_layer`); a ValueError naming `key` when the model has
        no such layer."""
        return self.adapter.resolve_layer(value, key)

    def resolve_layers(self, values: Sequence[Layer] | None, key: str = "editor.layers") -> list[int]:
        """`values` (each as in `resolve_layer`; None = every layer) as sorted, distinct layer indices."""
        values = range(self.adapter.num_layers) if values is None else values
        return sorted(set(self.adapter.resolve_layers(list(values), key)))

    def check_state_for(self, state: dict[str, Any], key: str, mine: Any, what: str) -> None:
        """A ValueError when a saved edit state was made for another `key` (its hookpoint, its edited
        parameter) than this editor's `mine`; `what` says what sits there (e.g. "transcoder")."""
        if state.get(key) != mine:
            raise ValueError(f"{self.name} edit state is for {key} {state.get(key)!r}, this editor's ({what}) is "
                             f"{mine!r}")

    def ledger_state(self) -> list[dict[str, Any]]:
        return [entry.to_dict() for entry in self.ledger]

    def load_ledger(self, entries: list[dict[str, Any]]) -> None:
        self.ledger = [LedgerEntry.from_dict(e) for e in entries]

    @property
    def device(self) -> torch.device:
        """Where input ids go: the model's first parameter's device (its embeddings')."""
        return model_device(self.model)

    def device_of(self, layer: int) -> torch.device:
        """The device layer `layer` computes on: what its statistics, side tensors and hooks follow (the
        model's own device unless `model.device_map` splits it)."""
        return self.adapter.layer_device(layer)


def solved_edit_fields(result: Any, after: Any) -> dict[str, Any]:
    """The ledger fields of a closed-form edit whose value came from `locate.compute_value`: the solver's
    steps and its target NLL before, the teacher-forced score after the edit (`metrics.TokenScore`), and
    whether the solver met its NLL goal (`value_goal_met`, 1.0 or 0.0)."""
    return {"steps": len(result.losses) - 1, "metrics_before": {"target_nll": result.losses[0]["nll"]},
            "metrics_after": {"target_nll": after.nll, "target_argmax": float(after.exact),
                              "value_nll": result.final_nll, "value_goal_met": float(result.goal_met)}}


@torch.no_grad()
def greedy_generate(edited: ContextManager[nn.Module], tokenizer, prompts: Sequence[str], max_new_tokens: int,
                    device: torch.device | str, **kwargs) -> list[str]:
    """Greedy continuations of `prompts` by the model `edited` yields (entered after tokenising):
    left padded (the tokenizer's padding side is restored), `do_sample=False` and the tokenizer's
    pad token unless `kwargs` say otherwise; only the new tokens are decoded, special tokens skipped.

    For a plain model pass `contextlib.nullcontext(model)`.
    """
    with padding_side(tokenizer, "left"):  # continue at the right end
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    with edited as model:
        out = model.generate(**batch, max_new_tokens=max_new_tokens, **kwargs)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


class HeldRouting:
    """For an `Editor` whose hook decides per sequence whether the edit applies (a router, a scope
    gate): what the model was called with, and the decision held from the prompt while generating.

    The subclass's `edited(..., hold=False)` enters `self._routing(hooks, hold)`; its hook reads
    `self._batch` (the current forward's `input_ids` and `attention_mask`, or {}), and while
    `self._hold` keeps its decision in `self._held` (reset to None on entry and exit).
    """

    _batch: dict[str, Tensor | None]
    _hold: bool
    _held: Any

    def _capture_inputs(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        self._batch = {"input_ids": ids, "attention_mask": kwargs.get("attention_mask")}

    def _attended(self, x: Tensor) -> Tensor:
        """[B, S] bool for the current forward's activations `x` [B, S, ...]: the positions its
        attention mask marks as real tokens (all of them when it had none, or one of another shape)."""
        B, S = x.shape[:2]
        mask = self._batch.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[0] == B and mask.shape[1] >= S:
            return mask[:, -S:].to(x.device).bool()
        return torch.ones(B, S, dtype=torch.bool, device=x.device)

    @contextlib.contextmanager
    def _routing(self, hooks: dict[str, Any], hold: bool) -> Iterator[nn.Module]:
        """The model with `hooks` installed (adapter hookpoint -> forward hook) and its inputs
        captured; `hold`: for cached generation, keep each sequence's decision from its prompt."""
        handle = self.model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True)
        self._hold, self._held = hold, None
        try:
            with self.adapter.hooks(hooks):
                yield self.model
        finally:
            handle.remove()
            self._batch, self._hold, self._held = {}, False, None

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 8, **kwargs) -> list[str]:
        """Greedy continuations by the model under `edited(hold=True)`: a per-sequence decision
        (routing, a sequence gate) is taken on each prompt and held for the tokens generated after it."""
        return greedy_generate(self.edited(hold=True), self.tokenizer, prompts, max_new_tokens, self.device,
                               **kwargs)
