"""GRACE's codebook over a stream that adds, expands, splits and conflicts: afterwards the lookup
routes every edit's own prompt to the entry that holds its value, and its target is the argmax.
Uses the editor tests' shared fixtures."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lightning_edit.data import EditRecord, read_edits
from lightning_edit.editors.grace import Grace
from lightning_edit.editors.state import save_edit_state
from lightning_edit.jobs.edit_run import load_edited, new_editor as build_editor
from lightning_edit.metrics import teacher_forced
from lightning_edit.tokens import target_positions
from lightning_edit.models import ModelAdapter

# eps is size-dependent: on the small world's last layer an edit's rephrases sit within 0.56 of its key
# (90% quantile) and its neighbours beyond 0.73 (10% quantile), so rephrases are covered or expand a
# ball and neighbours with another target split one.
GRACE = {"layer": -1, "eps": 0.5, "val_init": "warm", "stop_nll": 0.05}



def new_editor(world, world_model, **params) -> Grace:
    model, tokenizer = world_model
    editor = build_editor("grace", {**GRACE, **params}, model, tokenizer, ModelAdapter(model),
                          model_name=str(world.model_dir))
    assert isinstance(editor, Grace)
    return editor


def conflict_stream(records: list[EditRecord], n: int) -> list[EditRecord]:
    """For each of the first `n` records: the edit, its rephrases with the same target (nearby keys:
    covered or expanded), then two of its neighbours with another target of the same relation
    (nearby keys, different label: splits that shrink the balls the rephrases expanded)."""
    stream = []
    for record in records[:n]:
        stream.append(record)
        stream += [EditRecord(prompt=p, target_new=record.target_new, subject=record.subject)
                   for p in record.rephrase_prompts]
        relation = record.extra.get("relation_id")
        for pair in record.locality[:2]:
            other = next(r.target_new for r in records if r.extra.get("relation_id") == relation
                         and r.target_new not in (record.target_new, pair.answer))
            stream.append(EditRecord(prompt=pair.prompt, target_new=other))
    return stream


def value_at_query(editor: Grace, record: EditRecord) -> torch.Tensor:
    """The codebook layer's output at the prompt's last token with the codebook active (batch of one,
    the sequence the edit was trained on)."""
    ids, start = target_positions(editor.tokenizer, record.prompt, record.target_new)
    got = {}
    with editor.edited() as model, torch.no_grad(), \
            editor.adapter.hooks({editor.hookpoint: lambda m, a, o: got.__setitem__("out", o[0, start - 1])}):
        model(input_ids=torch.tensor([ids]), use_cache=False)
    return got["out"]


@pytest.mark.parametrize("params", [{}, {"replacement": "replace_after", "eps_expand": "moving_average"}],
                         ids=["replace_last", "replace_after-moving_average"])
def test_every_edit_routes_to_its_entry_after_splits_conflicts_and_expansion(small_world, world_model, params):
    records = read_edits(small_world.counterfact_path)
    stream = conflict_stream(records, 3)
    # Stop once the target is the argmax with a loose NLL: routing, not value quality, is under test.
    editor = new_editor(small_world, world_model, stop_nll=0.5, n_iter=50, **params)
    grown = False
    for record in stream:
        (entry,) = editor.apply([record])
        grown |= entry.extra["action"] == "expand" and editor.epsilons.max().item() > GRACE["eps"]
    actions = Counter(e.extra["action"] for e in editor.ledger)
    # The stream exercises every codebook rule.
    assert actions["add"] >= 1 and actions["split"] >= 2 and grown, actions

    for edit_id, record in enumerate(stream):
        # The lookup at inference puts the value of an entry that serves this edit, with its target.
        out = value_at_query(editor, record)
        serving = [i for i, edits in enumerate(editor.entry_edits) if edit_id in edits]
        assert len(serving) == 1, (edit_id, serving)
        (i,) = serving
        assert editor.labels[i] == record.target_new
        assert torch.equal(out, editor.values[i].to(out.dtype)), (edit_id, record.prompt, editor.ledger[edit_id].extra)
    with editor.edited() as model:
        scores = teacher_forced(model, editor.tokenizer, [r.prompt for r in stream],
                                [r.target_new for r in stream], batch_size=1)
    assert [s.exact for s in scores] == [True] * len(stream)
    # A split took a ball away from earlier edits and the codebook was repaired; nothing was lost.
    assert sum(e.extra["repairs"] for e in editor.ledger) >= 1
    assert not editor.unrouted and not [e for e in editor.ledger if "failed" in e.extra]


def test_a_ball_that_takes_an_earlier_edits_key_is_split_off_it(small_world, world_model):
    """Keys on one line (eps 1): edits at 0 and 0.9 share entry A; an edit of another target at 1.6
    splits A (radii 0.8), and its new ball is nearer to 0.9 than A's key, so it takes that key. The
    repair gives 0.9 its own entry (split off the new one) holding A's value."""
    editor = new_editor(small_world, world_model, eps=1.0)
    d_ff, d_model = editor.keys.shape[1], editor.values.shape[1]
    axis = torch.zeros(d_ff)
    axis[0] = 1.0
    value_a, value_b = torch.full((d_model,), 1.0), torch.full((d_model,), 2.0)
    assert editor._admit(0.0 * axis[None], value_a, "x")[0] == "add"
    assert editor._admit(0.9 * axis[None], value_b, "x")[0] == "expand"  # covered by A
    assert editor.entry_edits == [[0, 1]]
    action, dropped, repairs = editor._admit(1.6 * axis[None], value_b, "y")
    assert (action, dropped, repairs) == ("split", {}, 1)
    assert editor.entry_edits == [[0], [2], [1]]  # A, the new "y" entry, 0.9's own entry
    assert editor.labels == ["x", "y", "x"] and torch.equal(editor.values[2], value_a)
    assert editor.epsilons.tolist() == pytest.approx([0.8 - 1e-5, 0.35 - 1e-5, 0.35])
    routed = editor._route(torch.stack([0.0 * axis, 0.9 * axis, 1.6 * axis])[None])[0].tolist()
    assert routed == [0, 2, 1]


def test_routing_does_not_depend_on_the_rest_of_the_batch(small_world, world_model):
    """An entry expanded to exactly cover a key (radius = the distance the editor measured) still
    covers it when that key is looked up among many other rows (inference batches)."""
    editor = new_editor(small_world, world_model)
    d_ff, d_model = editor.keys.shape[1], editor.values.shape[1]
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(40, d_ff, generator=gen)
    for i, key in enumerate(base):  # 40 far-apart entries, one label each
        editor._place(key, torch.randn(d_model, generator=gen), f"t{i}")
    misses = 0
    for i in range(20):
        step = torch.randn(d_ff, generator=gen)
        query = base[i] + 0.75 * step / step.norm()  # beyond eps (0.5) but within reach: expand
        entry, action = editor._place(query, torch.zeros(d_model), f"t{i}")
        assert (entry, action) == (i, "expand")
        rows = torch.randn(1, 64, d_ff, generator=gen)
        rows[0, 17] = query
        out = editor._lookup(rows, torch.zeros(1, 64, d_model), editor.values)
        misses += not torch.equal(out[0, 17], editor.values[i])
    assert misses == 0


def test_the_same_prompt_edited_again_supersedes_and_says_so(small_world, world_model, tmp_path):
    records = read_edits(small_world.counterfact_path)
    first = records[0]
    again = EditRecord(prompt=first.prompt, target_new=records[1].target_new)
    editor = new_editor(small_world, world_model)
    editor.apply([first, again])
    last = editor.ledger[-1]
    assert last.extra["action"] == "replace" and last.extra["superseded"] == [0]
    assert editor.entry_edits == [[1]]
    assert value_at_query(editor, again).equal(editor.values[0])
    # The saved state holds the routing (keys of every edit), so a reloaded editor keeps checking it.
    save_edit_state(editor, tmp_path / "grace")
    reloaded, _, _ = load_edited(tmp_path / "grace")
    assert reloaded.entry_edits == editor.entry_edits
    assert torch.equal(reloaded.edit_keys, editor.edit_keys)
