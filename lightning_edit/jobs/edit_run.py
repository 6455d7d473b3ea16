"""Everything an edit run is made of, built once from the edit job's config: the stream, the model,
its tokenizer and adapter, the embedded world (if any), the reference corpus and the prepared editor.

`build_edit_run(cfg)` serves `run edit`, `calibrate` and the bench scripts, so they all edit the
same records with the same editor. `new_editor` builds an editor over a loaded model (resolving,
or training, the sparse component its class asks for first); `load_edited` rebuilds a saved edit
state onto a fresh copy of its base model.

Order of work (kept so that runs are reproducible): the stream is read and validated before the
model is loaded; the component is resolved after the model and before the editor; `prepare` runs
last, on the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_edit.constants import CODER_CFG, COMPONENT_EXPORT_DIR, EDITOR_JSON
from lightning_edit.editors.base import Editor, EditorContext
from lightning_edit.errors import UserError, blame, describe
from lightning_edit.jobs.validate import (NONFINITE_CHOICES, check_checkpoints, default_checkpoints, say_warnings,
                                          validate_records)
from lightning_edit.editors.registry import build_editor, editor_class
from lightning_edit.editors.state import base_fingerprint, load_edit_state, read_edit_state
from lightning_edit.jobs.components import resolve_component
from lightning_edit.models import ModelAdapter, load_model, max_positions
from lightning_edit.world import world_for


@dataclass
class EditRun:
    """The parts of one edit run (`build_edit_run`)."""

    cfg: DictConfig
    """The edit job's config."""
    stream: Any
    """The `EditStream`, set up: `stream.records` is the ordered, limited stream."""
    model: nn.Module
    tokenizer: Any
    adapter: ModelAdapter
    world: Any
    """The embedded world `model.name` names, or None."""
    corpus: list[str] | None
    """Reference corpus lines (data.corpus, else the world's): what the callbacks draw from."""
    editor: Editor
    """The editor of `editor.method`, prepared on `editor_corpus`."""
    validation: Any = None
    """The stream's `ValidationReport` (duplicates, conflicts, absent subjects, truncations)."""
    editor_corpus: list[str] | None = None
    """`corpus` less every line that holds a prompt the locality evaluation scores
    (`callbacks.scored_locality_prompts`): the lines `editor.prepare` gets."""

    @property
    def method(self) -> str:
        return self.cfg.editor.method

    def new_editor(self, model: nn.Module | None = None) -> Editor:
        """Another editor like `editor` (component reloaded, prepared on the same corpus) over `model`
        (default: this run's model), e.g. over a fresh copy of the base model per record."""
        model = model if model is not None else self.model
        editor = new_editor(self.method, _container(self.cfg.editor), model, self.tokenizer, ModelAdapter(model),
                            _container(self.cfg.component), self.cfg.model.name, world=self.world)
        editor.prepare(self.editor_corpus)
        return editor


def check_edit_config(cfg: DictConfig) -> type[Editor]:
    """The editor class of `cfg.editor.method`, its section and the batch size checked without a model;
    a UserError naming what is wrong (unknown method, bad key or value)."""
    params = _container(cfg.editor)
    with blame("editor"):
        cls = editor_class(params.get("method"))
        cls.make_config(params)
    if cfg.data.batch_size > 1 and not cls.supports_batch:
        raise UserError(f"editor '{cls.name}' edits one record at a time; data.batch_size must be 1 "
                        f"(got {cfg.data.batch_size})")
    for key in ("eval.batch_size", "checkpoint.every_n_edits"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            raise UserError(f"{key} is {value} (expected >= 1)")
    choice = cfg.get("on_nonfinite", "stop")
    if choice not in NONFINITE_CHOICES:
        raise UserError(f"on_nonfinite: {choice!r} (expected one of {', '.join(NONFINITE_CHOICES)})")
    return cls


def build_edit_run(cfg: DictConfig) -> EditRun:
    """Check the config, read and validate the stream, load the model, validate every record against
    its tokenizer and context, build and prepare the editor. Every problem with an input is a
    UserError naming it, raised before anything is written."""
    from datamodules.edits import EditStream

    check_edit_config(cfg)
    stream = EditStream(cfg.data.path, cfg.data.format, cfg.data.order_seed, cfg.data.batch_size,
                        cfg.data.limit, model_name=cfg.model.name)
    stream.setup("fit")  # reads and validates every record: EditDataError names file, record, field
    eval_points(cfg, stream.num_edits)  # T values in range, before the model is loaded
    device = resolve_device(cfg.model.device)
    with blame(f"model.name={cfg.model.name}"):
        model, tokenizer = load_model(cfg.model.name, cfg.model.dtype, device,
                                      device_map=_container_or_value(cfg.model.get("device_map")))
    data = cfg.data
    report = validate_records(stream.records, tokenizer, max_positions(model), strict=bool(data.get("strict", False)),
                              truncate=bool(data.get("truncate", False)))
    say_warnings(report)
    adapter = ModelAdapter(model)
    world = world_for(cfg.model.name)
    editor = new_editor(cfg.editor.method, _container(cfg.editor), model, tokenizer, adapter,
                        _container(cfg.component), cfg.model.name, world=world)
    with blame(f"data.corpus={cfg.data.corpus}"):
        corpus = read_corpus(cfg.data.corpus, world)
    editor_corpus = editor_lines(cfg, world, corpus, stream.records)
    editor.prepare(editor_corpus)
    return EditRun(cfg, stream, model, tokenizer, adapter, world, corpus, editor, report, editor_corpus)


def editor_lines(cfg: DictConfig, world: Any, corpus: list[str] | None, records: Any) -> list[str] | None:
    """The corpus an editor is prepared on: `corpus` less the lines holding a locality prompt this run
    scores (an editor never sees what it is scored on; its statistics and preserve samples come from
    the rest)."""
    from lightning_edit.callbacks import scored_locality_prompts
    from lightning_edit.data.corpus import without_scored

    with blame("callbacks.locality"):
        scored = scored_locality_prompts(cfg.get("callbacks"), world, corpus, records)
    return without_scored(corpus, scored)


def eval_points(cfg: DictConfig, stream_length: int) -> list[int]:
    """The run's checkpoints T (`eval.checkpoints`, else 1, 10, 100, ... and T), every T list of the
    config checked to lie in the stream (a UserError naming the key otherwise)."""
    section = cfg.get("eval")
    given = section.get("checkpoints") if section is not None else None
    points = check_checkpoints(given, stream_length) if given is not None else default_checkpoints(stream_length)
    callbacks = cfg.get("callbacks")
    for name in ("downstream", "locality"):
        sub = callbacks.get(name) if callbacks is not None else None
        if sub is not None and sub.get("at") is not None:
            check_checkpoints(sub.at, stream_length, key=f"callbacks.{name}.at", lowest=0)
    return points


def new_editor(method: str, params: Mapping[str, Any], model: nn.Module, tokenizer: Any, adapter: ModelAdapter,
               component_cfg: Mapping[str, Any] | None = None, model_name: str | None = None,
               world: Any = None) -> Editor:
    """Editor `method` over `model`: the component its class asks for is loaded from `component_cfg`
    (or the world's default found or trained) first, and the base weights fingerprinted before any edit.
    `world`: the embedded world of `model_name` (found from the name when not given)."""
    cls = editor_class(method)
    cfg = cls.make_config(params)
    component_cfg = dict(component_cfg or {})
    world = world if world is not None else world_for(model_name)
    request = cls.component_request(cfg, component_cfg, adapter)
    if request is not None and component_cfg.get("hookpoint"):  # depth-relative -> this model's name, as recorded
        with blame("component.hookpoint"):
            component_cfg["hookpoint"] = adapter.resolve_hookpoint(component_cfg["hookpoint"], "component.hookpoint")
    if component_cfg.get("path"):  # a file the user gave: whatever fails reading it is its fault
        with blame(f"component.path={component_cfg['path']}"):
            component = resolve_component(request, component_cfg, model, adapter, world, model_name)
    else:
        component = resolve_component(request, component_cfg, model, adapter, world, model_name)
    ctx = EditorContext(model=model, tokenizer=tokenizer, adapter=adapter, model_name=model_name,
                        component=component, component_cfg=component_cfg, base_fingerprint=base_fingerprint(model),
                        world=world)
    try:
        return build_editor(method, cfg, ctx)
    except (ValueError, KeyError) as exc:  # a layer, hookpoint or option this model does not have
        raise UserError(f"editor '{method}': {describe(exc)}") from exc


def load_edited(state_dir: str | Path, model_name: str | None = None, dtype: str = "float32",
                device: str = "cpu", check_base: bool = True):
    """Rebuild the saved editor onto a fresh copy of its base model: (editor, model, tokenizer).

    model_name: the base model (default: the one recorded in editor.json). check_base: refuse a
    base model whose weights differ from the one the edits were made on (e.g. a rebuilt world).
    Use the model inside `editor.edited()` (hooks, switches and spliced components are active only there).
    """
    settings, _ = read_edit_state(state_dir)
    with blame(f"{Path(state_dir) / EDITOR_JSON}"):
        editor_class(settings.get("method"))
    model_name = model_name or settings.get("model")
    if not model_name:
        raise UserError(f"{state_dir}/editor.json records no base model; pass model_name")
    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    adapter = ModelAdapter(model)
    component = dict(settings.get("component") or {})
    exported = Path(state_dir) / COMPONENT_EXPORT_DIR
    if exported.is_dir():  # the state's own copy of its component: no dependence on the original path
        component["path"] = str(exported)
        folders = [p.name for p in exported.iterdir() if (p / CODER_CFG).is_file()]
        if len(folders) == 1:
            component["hookpoint"] = component.get("hookpoint") or folders[0]
    editor = new_editor(settings["method"], settings.get("config") or {}, model, tokenizer, adapter,
                        component or settings.get("component"), model_name)
    saved = settings.get("base_fingerprint")
    same_dtype = settings.get("model_dtype") == dtype  # a fingerprint only compares like with like
    if check_base and saved and same_dtype and saved != editor.ctx.base_fingerprint:
        raise ValueError(f"{state_dir}: the edits were made on a different base model than {model_name!r} "
                         f"loads now (weights fingerprint {saved} vs {editor.ctx.base_fingerprint}); "
                         "pass check_base=False to load them anyway")
    load_edit_state(editor, state_dir)
    return editor, model, tokenizer


def read_corpus(path: str | Path | None, world: Any = None) -> list[str] | None:
    """The non-empty lines of `path` (data.corpus), else of the world's corpus; None without either."""
    if path:
        path = Path(path)
    elif world is not None:
        path = world.corpus_path
    else:
        return None
    return [line for line in path.read_text().splitlines() if line.strip()]


def resolve_device(device: str) -> str:
    """`auto` -> cuda when available, else cpu; anything else as it is."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"model.device={device!r}: {describe(exc)} (expected auto, cpu, cuda, cuda:N, mps)") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"model.device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                        "(expected auto or cpu here)")
    if parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"model.device={device!r}: MPS is not available here (expected auto or cpu)")
    return device


def _container_or_value(node: Any) -> Any:
    """A config node as plain Python (a mapping as a dict, a scalar as it is)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _container(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
