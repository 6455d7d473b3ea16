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


def test_grace_eps_from_the_models_key_distances(small_world, world_model, records_to_flip, small_corpus):
    """`eps: null`: eps_scale x the median distance from a corpus line's key (its last token at the
    codebook's layer) to the nearest other line's, computed in prepare and recorded in the config;
    an edit before prepare is refused."""
    from lightning_edit.editors.state import _settings
    from lightning_edit.locate import activations

    model, tokenizer = world_model
    params = {**GRACE, "eps": None, "eps_scale": 1.3, "eps_samples": 60}
    unprepared = editor_for("grace", params, small_world, world_model)
    with pytest.raises(ValueError, match="prepare"):
        unprepared.apply([records_to_flip[0]])
    editor = editor_for("grace", params, small_world, world_model, small_corpus)
    order = torch.randperm(len(small_corpus), generator=torch.Generator().manual_seed(0)).tolist()
    keys = activations(model, tokenizer, editor.adapter, editor.layer, [small_corpus[i] for i in order[:60]])
    dist = torch.cdist(keys.double(), keys.double())
    dist.fill_diagonal_(float("inf"))
    nearest = dist.min(dim=1).values
    expected = 1.3 * nearest[nearest > 0].median().item()
    assert editor.cfg.eps == pytest.approx(expected, rel=1e-4) and _settings(editor)["config"]["eps"] == editor.cfg.eps
    (entry,) = editor.apply([records_to_flip[0]])
    assert entry.extra["epsilon"] == pytest.approx(editor.cfg.eps)  # a new ball gets the derived radius
    doubled = editor_for("grace", {**params, "eps_scale": 2.6}, small_world, world_model, small_corpus)
    assert doubled.cfg.eps == pytest.approx(2 * editor.cfg.eps, rel=1e-5)
