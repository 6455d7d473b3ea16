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


def test_fine_changes_only_its_columns_and_round_trips(small_world, small_corpus, tmp_path):
    model, tokenizer, adapter = fresh(small_world)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = new_editor("fine", yaml_editor("fine"), model, tokenizer, adapter, model_name=str(small_world.model_dir))
    editor.prepare(small_corpus)  # the shipped config derives its lr from the model here
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


def test_fine_lr_from_the_residual_scale(small_world, small_corpus):
    """`lr: null`: lr_scale x the median RMS of the final norm's input at the last token of corpus lines,
    set in prepare and recorded in the config; an edit before prepare is refused."""
    import pytest

    from lightning_edit.data import read_edits
    from lightning_edit.editors.state import _settings
    from lightning_edit.tokens import encode_prompt

    model, tokenizer, adapter = fresh(small_world)
    params = {**yaml_editor("fine"), "lr": None, "lr_scale": 0.01, "lr_samples": 30}
    editor = new_editor("fine", params, model, tokenizer, adapter)
    with pytest.raises(ValueError, match="prepare"):
        editor.apply(read_edits(small_world.counterfact_path)[:1])
    editor.prepare(small_corpus)
    order = torch.randperm(len(small_corpus), generator=torch.Generator().manual_seed(0)).tolist()[:30]
    rms = []
    for i in order:
        seen = []
        handle = adapter.final_norm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        with torch.no_grad():
            model(input_ids=torch.tensor([encode_prompt(tokenizer, small_corpus[i])]))
        handle.remove()
        rms.append(seen[0][0, -1].pow(2).mean().sqrt())
    expected = 0.01 * torch.stack(rms).median().item()
    assert editor.cfg.lr == pytest.approx(expected, rel=1e-5) and _settings(editor)["config"]["lr"] == editor.cfg.lr
