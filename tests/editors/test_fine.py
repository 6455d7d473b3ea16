"""FiNE on the test-size world: only its chosen columns change, the contribution score, the state reloads."""

from __future__ import annotations

import torch

from datamodules.edits import EditStream
from lightning_edit.editors.fine import FiNE, contributions
from lightning_edit.editors.state import save_edit_state
from lightning_edit.jobs.edit_run import load_edited, new_editor
from lightning_edit.metrics import teacher_forced

from tests.helpers import fresh, yaml_editor


def records(world, n: int):
    stream = EditStream(world.counterfact_path, limit=n)
    stream.setup("fit")
    return stream.records


def test_fine_changes_only_its_columns_and_round_trips(small_world, tmp_path):
    model, tokenizer, adapter = fresh(small_world)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = new_editor("fine", yaml_editor("fine"), model, tokenizer, adapter, model_name=str(small_world.model_dir))
    assert isinstance(editor, FiNE)
    record = records(small_world, 1)[0]
    assert not teacher_forced(model, tokenizer, [record.prompt], [record.target_new])[0].exact
    (entry,) = editor.apply([record])
    assert teacher_forced(model, tokenizer, [record.prompt], [record.target_new])[0].exact
    assert entry.metrics_after["target_argmax"] == 1.0 and entry.steps > 0

    chosen = entry.extra["neurons"]
    assert len(chosen) == editor.cfg.num_neurons
    assert all(layer < adapter.num_layers - editor.cfg.skip_last_layers for layer, _, _ in chosen)
    after = model.state_dict()
    prefix = adapter.base_model_prefix + "." if adapter.base_model_prefix else ""
    edited = {prefix + adapter.down_proj_name(layer) + ".weight" for layer, _, _ in chosen}
    for name in before:
        if name not in edited:
            assert torch.equal(before[name], after[name]), name  # bit-identical
    for name in edited:
        layer = next(l for l, _, _ in chosen if prefix + adapter.down_proj_name(l) + ".weight" == name)
        cols = sorted(n for l, n, _ in chosen if l == layer)
        moved = (before[name] != after[name]).any(dim=0).nonzero().flatten().tolist()  # [d_model, d_ff]
        assert moved == cols
        assert entry.changed[adapter.down_proj_name(layer) + ".weight"] == cols

    save_edit_state(editor, tmp_path / "state")
    reloaded, _, _ = load_edited(tmp_path / "state")
    ids = tokenizer([record.prompt + " " + record.target_new], return_tensors="pt")["input_ids"]
    with torch.no_grad(), editor.edited() as m1, reloaded.edited() as m2:
        assert torch.equal(m1(input_ids=ids).logits, m2(input_ids=ids).logits)


def test_fine_contribution_is_activation_times_logit_of_column():
    acts = torch.tensor([1.0, -2.0, 0.5])
    down = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])  # [d_model 2, d_ff 3]
    row = torch.tensor([3.0, -1.0])  # W_U[t]
    assert contributions(acts, down, row).tolist() == [3.0, 2.0, 2.5]
