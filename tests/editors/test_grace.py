"""GRACE on the test-size world: an edit flips its target, out-of-scope inputs pass through, the
codebook expands and splits, the state reloads."""

from __future__ import annotations

import pytest
import torch

from lightning_edit.editors.grace import Grace, GraceConfig
from lightning_edit.tokens import join_prompt_target

from tests.helpers import editor_for, logits_of, reloaded_state_reproduces, right


# eps is size-dependent: on the small world's last layer an edit's rephrases sit within 0.56 of its key
# (90% quantile) and its neighbours beyond 0.73 (10% quantile).
GRACE = {"layer": -1, "eps": 0.5, "val_init": "warm", "stop_nll": 0.05}


def test_grace_edit_flips_target_and_leaves_the_rest(small_world, world_model, records_to_flip, tmp_path):
    model, tokenizer = world_model
    record = records_to_flip[0]
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    outside = [join_prompt_target(p.prompt, p.answer) for p in record.locality]
    base_logits = [logits_of(model, tokenizer, t) for t in outside]
    editor = editor_for("grace", GRACE, small_world, world_model)
    assert isinstance(editor, Grace) and editor.cfg.n_iter == GraceConfig().n_iter == 100
    (entry,) = editor.apply([record])
    assert entry.extra["action"] == "add" and entry.metrics_after["target_argmax"] == 1.0
    with editor.edited() as m:
        assert right(m, tokenizer, record)
        # Out of scope: inputs whose keys fall in no ball come out bit for bit unedited.
        passed = 0
        for text, base in zip(outside, base_logits):
            key_far = _grace_misses(editor, tokenizer, text)
            if key_far:
                assert torch.equal(logits_of(m, tokenizer, text), base)
                passed += 1
        assert passed >= len(outside) // 2
    # Outside `edited()` the model is the base model: GRACE never writes a weight.
    assert not right(model, tokenizer, record)
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())

    # Saving and reloading the codebook reproduces the edited predictions.
    reloaded_state_reproduces(editor, tmp_path / "grace", record)


def _grace_misses(editor: Grace, tokenizer, text: str) -> bool:
    """True when no token of `text` has its key inside a codebook ball."""
    got = {}
    with torch.no_grad(), editor.adapter.hooks({editor.hookpoint: lambda m, a, o: got.__setitem__("x", a[0])}):
        editor.model(input_ids=tokenizer([text], return_tensors="pt")["input_ids"])
    dist, nearest = torch.cdist(got["x"][0].float(), editor.keys).min(dim=1)
    return bool((dist > editor.epsilons[nearest]).all())


def test_grace_codebook_expands_for_same_label_and_splits_on_conflict(small_world, world_model, records_to_flip):
    editor = editor_for("grace", {**GRACE, "eps": 1e6}, small_world, world_model)  # every key in reach
    first, second = records_to_flip[0], records_to_flip[1]
    editor.apply([first])
    same = type(first)(prompt=second.prompt, target_new=first.target_new, subject=second.subject)
    (entry,) = editor.apply([same])
    assert entry.extra["action"] == "expand" and editor.keys.shape[0] == 1
    other = next(r for r in records_to_flip if r.target_new != first.target_new)
    (entry,) = editor.apply([other])
    assert entry.extra["action"] == "split" and editor.keys.shape[0] == 2
    d = torch.cdist(editor.keys[:1], editor.keys[1:]).item()
    assert editor.epsilons[1].item() == pytest.approx(d / 2, rel=1e-5)
    assert editor.epsilons[0].item() < d / 2  # the two balls no longer overlap
