"""ROME, MEMIT and AlphaEdit: one edit flips its target and the edit state reloads."""

from __future__ import annotations

import pytest
import torch

from lightning_edit.editors.state import save_edit_state
from lightning_edit.jobs.edit_run import load_edited, new_editor
from lightning_edit.locate.value_solver import GENERIC_ESSENCE
from lightning_edit.models import ModelAdapter, load_model

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


def test_model_derived_rules_essence_and_per_dimension_weights(gpt2_world):
    """The rules that replace toyworld-sized constants: the world's own essence prompt, MEMIT's lambda and
    AlphaEdit's l2 per key dimension, FT's lr from the weight's RMS."""
    model, tok = load_model(str(gpt2_world.model_dir))
    adapter = ModelAdapter(model)
    assert adapter.num_layers == 3
    build = lambda method, cfg: new_editor(method, cfg, model, tok, adapter, model_name=str(gpt2_world.model_dir))  # noqa: E731
    rome = build("rome", {"layer": "100%"})
    essences = {r.essence for r in gpt2_world.kb.relations}
    assert rome.solver.essence_templates == tuple(essences) and GENERIC_ESSENCE not in essences

    memit = build("memit", {"layers": ["0%", "20%", "40%"], "mom2_update_weight_per_dim": 0.9})
    assert memit.layers == [0, 1]
    d_ff = adapter.intermediate_size(0)
    assert memit.update_weight(0) == pytest.approx(0.9 * d_ff)
    assert build("memit", {"layers": [0], "mom2_update_weight": 7.0}).update_weight(0) == 7.0

    alpha = build("alphaedit", {"layers": [1], "l2_weight_per_dim": 1e-3})
    torch.manual_seed(0)
    keys, residual = torch.randn(d_ff, 2, dtype=torch.float64), torch.randn(adapter.hidden_size, 2, dtype=torch.float64)
    alpha.projections[1] = torch.eye(d_ff, dtype=torch.float64)  # no preserved keys: the ridge closed form
    expected = residual @ keys.T @ torch.linalg.inv(keys @ keys.T + 1e-3 * d_ff * torch.eye(d_ff, dtype=torch.float64))
    torch.testing.assert_close(alpha.update(1, keys, residual), expected)

    ft = build("ft", {"lr_scale": 0.28})
    rms = adapter.down_proj_weight(2).pow(2).mean().sqrt().item()
    assert ft.lr == pytest.approx(0.28 * rms) and build("ft", {"lr": 1e-3}).lr == 1e-3
