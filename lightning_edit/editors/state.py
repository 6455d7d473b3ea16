"""Building an editor from config, and saving / loading its edit state (safetensors + JSON, no pickle).

An edit state folder holds:
- `editor.json`: the method, its validated hyperparameters, the base model and component it was
  built over (enough to rebuild the same editor on a fresh copy of the base model);
- `state.json`: `editor.state_dict()` with every tensor replaced by `{"__tensor__": key}`;
- `tensors.safetensors`: those tensors;
- `ledger.json`: the edit ledger (also reachable through `state.json`), for people to read;
- `sae/<hookpoint>/`: for editors with an `export_sae` method, the edited component in sparsify
  layout (for other tools; reloading goes through `state.json`).

`load_edited(state_dir)` gives back (editor, model, tokenizer) with the edits applied; use the model
inside `editor.edited()` (hooks, switches and spliced components are active only there).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_file, save_file

from lightning_edit.editors import editor_class
from lightning_edit.editors.base import Editor, greedy_generate

FORMAT_VERSION = 1
TENSOR_KEY = "__tensor__"


def editor_config(method: str, params: Mapping[str, Any]) -> Any:
    """The method's config dataclass with `params` merged over its defaults; an unknown key or a
    wrong type is a `ValueError` naming `editor.<key>` and the valid keys."""
    cls = editor_class(method).config_class
    params = {k: v for k, v in dict(params).items() if k != "method"}
    if not dataclasses.is_dataclass(cls):
        if params:
            raise ValueError(f"editor '{method}' takes no hyperparameters; got {sorted(params)}")
        return None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), params)
    except OmegaConfBaseException as exc:
        valid = ", ".join(f.name for f in dataclasses.fields(cls))
        key = getattr(exc, "full_key", None) or "?"
        raise ValueError(f"editor.{key}: {str(exc).splitlines()[0]} (editor '{method}' keys: {valid})") from exc
    return OmegaConf.to_object(merged)


def build_editor(method: str, params: Mapping[str, Any], model, tokenizer, adapter,
                 component_cfg: Mapping[str, Any] | None = None, model_name: str | None = None) -> Editor:
    """Build editor `method` over `model` with its validated config.

    An editor that needs more than its config (a sparse component to load, find or train) builds
    itself through a classmethod `from_config(cfg, model, tokenizer, adapter)`, handed the job
    config's `editor`, `component` and `model` sections; the others are `cls(model, tokenizer,
    adapter, config)`.
    """
    cls = editor_class(method)
    cfg = editor_config(method, params)
    from_config = getattr(cls, "from_config", None)
    if from_config is not None:
        job_cfg = {"editor": {**dict(params), "method": method}, "component": dict(component_cfg or {}),
                   "model": {"name": model_name}}
        editor = from_config(job_cfg, model, tokenizer, adapter)
    else:
        editor = cls(model, tokenizer, adapter, cfg)
    editor.component_cfg = dict(component_cfg) if component_cfg is not None else None  # for save_edit_state
    editor.model_name = model_name
    editor.base_fingerprint = base_fingerprint(model)  # before any edit: which base the edits apply to
    return editor


def base_fingerprint(model: torch.nn.Module, values_per_tensor: int = 256) -> str:
    """A cheap hash of a model's weights (names, shapes, the first values of each tensor), to tell
    whether an edit state is being loaded onto the base model it was made on."""
    import hashlib

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.state_dict().items():
            digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
            digest.update(param.detach().flatten()[:values_per_tensor].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# Edit state I/O ----------------------------------------------------------------------------------


def _split_tensors(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of `obj` with tensors moved to `tensors` under their path in the structure."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {TENSOR_KEY: path}
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise TypeError(f"edit state key {key!r} at {path or '/'} is not a string or an integer")
            key = str(key)  # JSON object keys are strings; editors read integer ids back with int()
            out[key] = _split_tensors(value, f"{path}/{key}" if path else key, tensors)
        return out
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"edit state value at {path or '/'} is a {type(obj).__name__}; expected tensors, "
                    "dicts, lists and JSON scalars")


def _join_tensors(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {TENSOR_KEY}:
            return tensors[obj[TENSOR_KEY]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def _settings(editor: Editor) -> dict[str, Any]:
    cfg = editor.cfg
    return {
        "format_version": FORMAT_VERSION,
        "method": editor.name,
        "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None,
        "model": getattr(editor, "model_name", None) or getattr(editor.model, "name_or_path", None),
        "component": getattr(editor, "component_cfg", None),
        "base_fingerprint": getattr(editor, "base_fingerprint", None),
        "model_dtype": str(next(editor.model.parameters()).dtype).removeprefix("torch."),
        "edits": len(editor.ledger),
    }


def save_edit_state(editor: Editor, directory: str | Path, **settings: Any) -> Path:
    """Write `editor.state_dict()` and its settings to `directory` (see the module docstring).

    Extra `settings` (e.g. `model=`, `component=`) override what is read off the editor.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors(editor.state_dict(), "", tensors)
    save_file(tensors, str(directory / "tensors.safetensors"))
    (directory / "state.json").write_text(json.dumps(skeleton) + "\n")
    (directory / "ledger.json").write_text(json.dumps(editor.ledger_state(), indent=1) + "\n")
    (directory / "editor.json").write_text(json.dumps({**_settings(editor), **settings}, indent=1) + "\n")
    # A method with a sparse component also exports it as edited, in sparsify layout, for other tools.
    export_sae = getattr(editor, "export_sae", None)
    if export_sae is not None:
        export_sae(directory / "sae")
    return directory


def read_edit_state(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings from editor.json, the state dict with its tensors) of an edit state folder."""
    directory = Path(directory)
    missing = [n for n in ("editor.json", "state.json", "tensors.safetensors") if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not an edit state folder (missing {', '.join(missing)})")
    settings = json.loads((directory / "editor.json").read_text())
    if settings.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}/editor.json: format_version {settings.get('format_version')!r} "
                         f"(this version reads {FORMAT_VERSION})")
    tensors = load_file(str(directory / "tensors.safetensors"))
    state = _join_tensors(json.loads((directory / "state.json").read_text()), tensors)
    return settings, state


def load_edit_state(editor: Editor, directory: str | Path) -> Editor:
    """Restore a saved edit state onto `editor` (built over a fresh copy of the same base model)."""
    settings, state = read_edit_state(directory)
    if settings["method"] != editor.name:
        raise ValueError(f"{directory}: edit state of method '{settings['method']}', editor is '{editor.name}'")
    editor.load_state_dict(state)
    return editor


def load_edited(state_dir: str | Path, model_name: str | None = None, dtype: str = "float32",
                device: str = "cpu", check_base: bool = True):
    """Rebuild the saved editor onto a fresh copy of its base model: (editor, model, tokenizer).

    model_name: the base model (default: the one recorded in editor.json). check_base: refuse a
    base model whose weights differ from the one the edits were made on (e.g. a rebuilt world).
    """
    from lightning_edit.models import ModelAdapter, load_model

    settings, _ = read_edit_state(state_dir)
    model_name = model_name or settings.get("model")
    if not model_name:
        raise ValueError(f"{state_dir}/editor.json records no base model; pass model_name")
    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    adapter = ModelAdapter(model)
    component = dict(settings.get("component") or {})
    exported = Path(state_dir) / "sae"
    if exported.is_dir():  # the state's own copy of its component: no dependence on the original path
        component["path"] = str(exported)
        folders = [p.name for p in exported.iterdir() if (p / "cfg.json").is_file()]
        if len(folders) == 1:
            component["hookpoint"] = component.get("hookpoint") or folders[0]
    editor = build_editor(settings["method"], settings.get("config") or {}, model, tokenizer, adapter,
                          component or settings.get("component"), model_name)
    saved = settings.get("base_fingerprint")
    same_dtype = settings.get("model_dtype") == dtype  # a fingerprint only compares like with like
    if check_base and saved and same_dtype and saved != editor.base_fingerprint:
        raise ValueError(f"{state_dir}: the edits were made on a different base model than {model_name!r} "
                         f"loads now (weights fingerprint {saved} vs {editor.base_fingerprint}); "
                         "pass check_base=False to load them anyway")
    load_edit_state(editor, state_dir)
    return editor, model, tokenizer


def generate(editor: Editor, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy continuations of `prompts` by the edited model (the editor's own `generate` when it
    has one, e.g. to hold a scope switch's decision over the generated tokens)."""
    own = getattr(editor, "generate", None)
    if own is not None:
        return own(prompts, max_new_tokens=max_new_tokens)
    return greedy_generate(editor.edited(), editor.tokenizer, prompts, max_new_tokens, editor.device)
