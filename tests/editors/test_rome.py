"""ROME, MEMIT and AlphaEdit: one edit flips its target and the edit state reloads."""

from __future__ import annotations

import pytest
import torch

from lightning_edit.editors.state import save_edit_state
from lightning_edit.jobs.edit_run import load_edited
from lightning_edit.models import load_model

from tests.editors.closed_form import exact, prepared




@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_one_edit_flips_its_target_and_the_state_reloads(method, small_world, small_corpus, stream_records, tmp_path):
    editor, model, tok = prepared(method, small_world, small_corpus)
    record = stream_records[0]
    assert exact(model, tok, [record]) == [False]
    (entry,) = editor.apply([record])
    assert exact(model, tok, [record]) == [True]
    assert entry.metrics_after["target_argmax"] == 1.0 and entry.delta_norm > 0 and entry.changed
    assert entry.metrics_after["target_nll"] < entry.metrics_before["target_nll"]

    save_edit_state(editor, tmp_path / "state")
    reloaded, fresh, _ = load_edited(tmp_path / "state")
    assert fresh is not model and [e.edit_id for e in reloaded.ledger] == [0]
    prompts = [f"{record.prompt} {record.target_new}", *record.rephrase_prompts]
    ids = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad(), editor.edited() as m1, reloaded.edited() as m2:
        assert torch.equal(m1(**ids).logits, m2(**ids).logits)
    base, _ = load_model(str(small_world.model_dir))
    with torch.no_grad():
        assert not torch.equal(base(**ids).logits, m2(**ids).logits)
