"""Editing methods behind one interface (`Editor`); looked up by name, imported on demand."""

from __future__ import annotations

import importlib

from lightning_edit.editors.base import Editor, LedgerEntry

EDITORS: dict[str, str] = {
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
}


def editor_class(method: str) -> type[Editor]:
    if method not in EDITORS:
        raise KeyError(f"unknown editing method '{method}'; choices: {', '.join(sorted(EDITORS))}")
    module_name, cls_name = EDITORS[method].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


__all__ = ["EDITORS", "Editor", "LedgerEntry", "editor_class"]
