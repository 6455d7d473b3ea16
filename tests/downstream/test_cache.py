"""Downstream scores cached per model state, task and limit (lightning_edit.downstream.cache)."""

from __future__ import annotations

import copy

import torch

from lightning_edit.downstream import DownstreamSuite, editor_fingerprint, state_fingerprint, suite as suite_mod
from lightning_edit.editors.base import EditorContext

from tests.helpers import InvertingEditor


def test_results_are_cached_per_model_state_task_and_limit(small_world, model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    calls = []
    real = suite_mod.evaluate_lm_eval
    monkeypatch.setattr(suite_mod, "evaluate_lm_eval", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    suite = DownstreamSuite(["toyworld_mc"], limit=8, world_mc_dir=small_world.mc_dir)
    editor = InvertingEditor(EditorContext(model, tokenizer, adapter=None))
    state = editor_fingerprint(editor)
    first = suite.evaluate(model, tokenizer, state)["toyworld_mc"]
    again = suite.evaluate(model, tokenizer, editor_fingerprint(editor))["toyworld_mc"]
    assert len(calls) == 1 and again.cached and again.score == first.score
    suite.limits["toyworld_mc"] = 4  # another limit is another result
    suite.evaluate(model, tokenizer, state)
    assert len(calls) == 2
    # Another model state (a changed weight, or an edit held in a hook) is re-evaluated.
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.lm_head.weight[3, 5] += 1e-3
    assert state_fingerprint(perturbed) != state_fingerprint(model)
    editor.apply([type("R", (), {"case_id": 0, "prompt": "p", "target_new": "t"})()])
    assert editor_fingerprint(editor) != state
