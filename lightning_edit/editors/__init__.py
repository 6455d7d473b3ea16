"""Editing methods behind one interface (`Editor`), built over an `EditorContext`; looked up by name
in `registry.py` (built-ins imported on demand, third parties add theirs with `register_editor`)."""

from __future__ import annotations

from lightning_edit.editors.base import ComponentRequest, Editor, EditorContext, LedgerEntry
from lightning_edit.editors.registry import EDITORS, build_editor, editor_class, editor_config, register_editor

__all__ = ["EDITORS", "ComponentRequest", "Editor", "EditorContext", "LedgerEntry", "build_editor", "editor_class",
           "editor_config", "register_editor"]
