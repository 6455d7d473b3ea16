"""Saving and loading an editor's edit state (safetensors + JSON, no pickle).

An edit state folder holds:
- `editor.json`: the method, its validated hyperparameters, the base model and component it was
  built over (enough to rebuild the same editor on a fresh copy of the base model);
- `state.json`: `editor.state_dict()` with every tensor replaced by `{"__tensor__": key}`;
- `tensors.safetensors`: those tensors;
- `ledger.json`: the edit ledger (also reachable through `state.json`), for people to read;
- `sae/<hookpoint>/`: for editors that export their component (`Editor.export_component`), the
  edited component in sparsify layout (for other tools; reloading goes through `state.json`).

Rebuilding a saved state onto a fresh base model (`load_edited`) needs the model and the component
resolved, so it lives with the job layer (`lightning_edit.jobs.edit_run`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from lightning_edit.constants import (
    COMPONENT_EXPORT_DIR,
    EDIT_STATE_DIR,
    EDITOR_JSON,
    LEDGER_JSON,
    STATE_JSON,
    TENSORS_FILE,
)
from lightning_edit.editors.base import Editor
from lightning_edit.errors import UserError, blame, check_finite
from lightning_edit.models import offloaded_value

FORMAT_VERSION = 1
TENSOR_KEY = "__tensor__"


def base_fingerprint(model: torch.nn.Module, values_per_tensor: int = 256) -> str:
    """A cheap hash of a model's weights (names, shapes, the first values of each tensor), to tell
    whether an edit state is being loaded onto the base model it was made on."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.state_dict().items():
            digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
            if param.device.type == "meta":  # offloaded by a device map: its values wait in accelerate's hook
                param = offloaded_value(model, name)
            digest.update(param.detach().flatten()[:values_per_tensor].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def find_edit_state(path: str | Path) -> Path:
    """An edit state folder from itself or from the run folder holding it (`<run>/edit_state`)."""
    path = Path(path)
    return path / EDIT_STATE_DIR if (path / EDIT_STATE_DIR).is_dir() else path


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
    cfg, ctx = editor.cfg, editor.ctx
    return {
        "format_version": FORMAT_VERSION,
        "method": editor.name,
        "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None,
        "model": ctx.model_name or getattr(editor.model, "name_or_path", None),
        "component": ctx.component_cfg,
        "base_fingerprint": ctx.base_fingerprint,
        "model_dtype": str(next(editor.model.parameters()).dtype).removeprefix("torch."),
        "edits": len(editor.ledger),
    }


def save_edit_state(editor: Editor, directory: str | Path) -> Path:
    """Write `editor.state_dict()`, its settings and its exported component to `directory`, atomically:
    everything goes to a temporary folder beside it first, which then replaces `directory`."""
    from lightning_edit.runtime import atomic_folder

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors(editor.state_dict(), "", tensors)

    def write(folder: Path) -> None:
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / TENSORS_FILE))
        (folder / STATE_JSON).write_text(json.dumps(skeleton) + "\n")
        (folder / LEDGER_JSON).write_text(json.dumps(editor.ledger_state(), indent=1) + "\n")
        editor.export_component(folder / COMPONENT_EXPORT_DIR)
        (folder / EDITOR_JSON).write_text(json.dumps(_settings(editor), indent=1) + "\n")

    return atomic_folder(directory, write)


def read_edit_state(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings from editor.json, the state dict with its tensors) of an edit state folder."""
    directory = Path(directory)
    missing = [n for n in (EDITOR_JSON, STATE_JSON, TENSORS_FILE) if not (directory / n).is_file()]
    if missing:
        raise UserError(f"{directory}: not an edit state folder (missing {', '.join(missing)}; expected a run's "
                        f"{EDIT_STATE_DIR}/ or the run folder holding it)")
    with blame(str(directory / EDITOR_JSON)):
        settings = json.loads((directory / EDITOR_JSON).read_text())
        if not isinstance(settings, dict) or "method" not in settings:
            raise ValueError("expected a JSON object with 'method', 'config', 'model'")
    if settings.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{directory}/{EDITOR_JSON}: format_version {settings.get('format_version')!r} "
                        f"(this version reads {FORMAT_VERSION})")
    with blame(str(directory / TENSORS_FILE)):
        tensors = load_file(str(directory / TENSORS_FILE))
    check_finite(tensors, str(directory / TENSORS_FILE))
    with blame(str(directory / STATE_JSON)):
        state = _join_tensors(json.loads((directory / STATE_JSON).read_text()), tensors)
    return settings, state


def load_edit_state(editor: Editor, directory: str | Path) -> Editor:
    """Restore a saved edit state onto `editor` (built over a fresh copy of the same base model)."""
    settings, state = read_edit_state(directory)
    if settings["method"] != editor.name:
        raise ValueError(f"{directory}: edit state of method '{settings['method']}', editor is '{editor.name}'")
    editor.load_state_dict(state)
    return editor
