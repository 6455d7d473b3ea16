"""The editing methods by name: look one up, validate its config, build it.

Built-in methods are registered as "module:Class" and imported when first asked for, so listing
them (the CLI's --help, the bench scripts) loads no method's code. A third party adds its own with
`register_editor("mymethod", MyEditor)` (or a "package.module:Class" string) without editing this
file; a name already taken is an error, never a silent replacement.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from lightning_edit.editors.base import Editor, EditorContext

EDITORS: dict[str, str | type[Editor]] = {}
"""Method name -> its Editor class, or "module:Class" until first used."""


def register_editor(name: str, editor: str | type[Editor]) -> None:
    """Make method `name` available to `editor.method=name`; a ValueError when `name` is taken."""
    if name in EDITORS:
        raise ValueError(f"editing method '{name}' is already registered ({_spelled(EDITORS[name])}); "
                         "pick another name")
    if not isinstance(editor, str) and not (isinstance(editor, type) and issubclass(editor, Editor)):
        raise TypeError(f"register_editor('{name}', ...): expected an Editor subclass or 'module:Class', "
                        f"got {editor!r}")
    EDITORS[name] = editor


def editor_class(method: str) -> type[Editor]:
    """The Editor class registered as `method`; a KeyError listing the choices when there is none."""
    if method not in EDITORS:
        raise KeyError(f"unknown editing method '{method}'; choices: {', '.join(sorted(EDITORS))}")
    entry = EDITORS[method]
    if isinstance(entry, str):
        module_name, cls_name = entry.split(":")
        entry = EDITORS[method] = getattr(importlib.import_module(module_name), cls_name)
    return entry


def editor_config(method: str, params: Mapping[str, Any]) -> Any:
    """Method `method`'s config dataclass with `params` (the job's `editor:` section) merged over its
    defaults; an unknown key or a wrong value is a ValueError naming `editor.<key>`."""
    return editor_class(method).make_config(params)


def build_editor(method: str, params: Mapping[str, Any] | Any, ctx: EditorContext) -> Editor:
    """Editor `method` over `ctx` (model, tokenizer, adapter, loaded component) with its validated config."""
    return editor_class(method)(ctx, params)


def _spelled(entry: str | type) -> str:
    return entry if isinstance(entry, str) else f"{entry.__module__}:{entry.__qualname__}"


for _name, _path in {
    "microedit": "lightning_edit.editors.microedit:MicroEdit",
    "ft": "lightning_edit.editors.ft:FineTune",
    "ment": "lightning_edit.editors.ment:MENT",
    "fine": "lightning_edit.editors.fine:FiNE",
    "grace": "lightning_edit.editors.grace:Grace",
    "wise": "lightning_edit.editors.wise:Wise",
    "rome": "lightning_edit.editors.rome:ROME",
    "tcpe": "lightning_edit.editors.tcpe:TCPE",
    "pnke": "lightning_edit.editors.pnke:PNKE",
    "memit": "lightning_edit.editors.memit:MEMIT",
    "alphaedit": "lightning_edit.editors.alphaedit:AlphaEdit",
    "kn": "lightning_edit.editors.kn:KnowledgeNeurons",
}.items():
    register_editor(_name, _path)
