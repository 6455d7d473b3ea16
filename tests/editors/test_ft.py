"""FT-M on the test-size world: one edit makes its target the argmax; the state round trips."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules.edits import EditStream
from lightning_edit.editors.ft import FTConfig, FineTune
from lightning_edit.editors.state import save_edit_state
from lightning_edit.jobs.edit_run import load_edited, new_editor
from lightning_edit.metrics import teacher_forced
from lightning_edit.models import ModelAdapter, load_model


def test_single_ft_edit_makes_target_argmax_and_round_trips(small_world, tmp_path):
    model, tokenizer = load_model(str(small_world.model_dir))
    stream = EditStream(small_world.counterfact_path, limit=1)
    stream.setup("fit")
    record = stream.records[0]
    before = teacher_forced(model, tokenizer, [record.prompt], [record.target_new])[0]
    assert not before.exact
    editor = new_editor("ft", {}, model, tokenizer, ModelAdapter(model), model_name=str(small_world.model_dir))
    # FT-M's (EasyEdit) defaults, its layer -1 recorded as the small world's last layer
    assert isinstance(editor, FineTune) and editor.cfg == FTConfig(layer=1) and FTConfig().layer == -1
    (entry,) = editor.apply([record])
    after = teacher_forced(model, tokenizer, [record.prompt], [record.target_new])[0]
    assert after.exact and entry.metrics_after["target_argmax"] == 1.0 and entry.steps > 0
    assert entry.changed and entry.delta_norm > 0

    save_edit_state(editor, tmp_path / "state")
    reloaded, fresh, _ = load_edited(tmp_path / "state")
    ids = tokenizer([record.prompt + " " + record.target_new], return_tensors="pt")["input_ids"]
    with torch.no_grad(), editor.edited() as m1, reloaded.edited() as m2:
        assert torch.equal(m1(input_ids=ids).logits, m2(input_ids=ids).logits)
    assert fresh is not model
    # Edits made on another base model (e.g. a rebuilt world) are refused.
    settings = json.loads((tmp_path / "state" / "editor.json").read_text())
    (tmp_path / "state" / "editor.json").write_text(json.dumps({**settings, "base_fingerprint": "0" * 16}))
    with pytest.raises(ValueError, match="different base model"):
        load_edited(tmp_path / "state")
    # Asking the reloaded edited model: its greedy continuation is the new target.
    (text,) = reloaded.generate([record.prompt], max_new_tokens=1)
    assert text.strip() == record.target_new
