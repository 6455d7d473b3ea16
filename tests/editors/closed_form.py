"""Shared by the ROME, MEMIT and AlphaEdit tests: the YAMLs' world settings scaled to the test world."""

from __future__ import annotations

from lightning_edit.jobs.edit_run import new_editor
from lightning_edit.metrics import teacher_forced
from lightning_edit.models import ModelAdapter, load_model


# The YAMLs' world settings, scaled to the test world (2 layers, d_ff 256): lambda and l2 keep the
# papers' values per key dimension (15000 * 256 / 16384, 10 * 256 / 14336).
WORLD = {"position": "last", "context_templates": ["{}"]}


SMALL = {
    "rome": {**WORLD, "layer": 1},
    "memit": {**WORLD, "layers": [0, 1], "mom2_update_weight": 234.0, "clamp_norm_factor": 1.5},
    "alphaedit": {**WORLD, "layers": [0, 1], "l2_weight": 0.18, "clamp_norm_factor": 1.5},
}


def prepared(method: str, world, corpus: list[str]):
    """(editor, model, tokenizer): a fresh copy of the world's model under a prepared editor."""
    model, tok = load_model(str(world.model_dir))
    editor = new_editor(method, SMALL[method], model, tok, ModelAdapter(model), model_name=str(world.model_dir))
    editor.prepare(corpus)
    return editor, model, tok


def exact(model, tok, records) -> list[bool]:
    return [s.exact for s in teacher_forced(model, tok, [r.prompt for r in records], [r.target_new for r in records])]
