"""MicroEdit on the test-size world: masked rows, gates, rollback, state round trip, generation."""

from __future__ import annotations

import pytest
import torch

from lightning_edit.data import read_edits
from lightning_edit.editors.microedit import MicroEdit, MicroEditConfig
from lightning_edit.metrics import last_token_argmax
from lightning_edit.sparse import load_sparse_coder

from tests.helpers import make_microedit


@pytest.fixture(scope="module")
def records(small_world):
    return read_edits(small_world.counterfact_path)[:6]


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(ValueError, match="editor.lrr.*editor 'microedit' keys"):
        MicroEdit.make_config({"lrr": 1.0})
    with pytest.raises(ValueError, match="editor.gate"):
        MicroEditConfig(gate="sometimes")
    with pytest.raises(ValueError, match="editor.alpha"):
        MicroEditConfig(alpha="big")
    assert MicroEditConfig(use_switch=False, gate="ard").effective_gate == "none"


def test_mask_leaves_other_rows_bit_identical(small_world, small_sae, records):
    editor = make_microedit(small_world, small_sae)
    W = editor.sae.W_dec.detach()
    base = W.clone()
    changed = torch.zeros(len(W), dtype=torch.bool)
    for record in records[:3]:  # several edits: nothing from an earlier edit's optimiser leaks
        entry = editor.apply([record])[0]
        rows = torch.tensor(entry.changed["W_dec"])
        assert 0 < len(rows) <= editor.sae.cfg.k
        changed[rows] = True
        assert torch.equal(W[~changed], base[~changed])
    assert not torch.equal(W[changed], base[changed])
    for name, tensor in editor.sae.state_dict().items():  # encoder and b_dec frozen
        if name != "W_dec":
            assert torch.equal(tensor, load_sparse_coder(small_sae[0]).state_dict()[name]), name


def test_all_rows_ablation_masks_nothing(small_world, small_sae, records):
    editor = make_microedit(small_world, small_sae, use_topk_mask=False, mask_tokens="all")
    last = make_microedit(small_world, small_sae)
    entry = editor.apply([records[0]])[0]
    assert len(entry.changed["W_dec"]) > len(last.apply([records[0]])[0].changed["W_dec"])


def test_single_edit_makes_target_the_argmax(small_world, small_sae, records):
    editor = make_microedit(small_world, small_sae, gate="none")
    record = records[0]
    target_id = editor.tokenizer(" " + record.target_new, add_special_tokens=False)["input_ids"][0]
    assert last_token_argmax(editor.model, editor.tokenizer, [record.prompt])[0] != target_id
    entry = editor.apply([record])[0]
    assert entry.metrics_after["target_nll"] < entry.metrics_before["target_nll"]
    with editor.edited() as model:
        assert last_token_argmax(model, editor.tokenizer, [record.prompt])[0] == target_id
    # Outside `edited()` the model is the base model: nothing was written into the LM.
    assert last_token_argmax(editor.model, editor.tokenizer, [record.prompt])[0] != target_id


def test_gate_passes_out_of_scope_input_unchanged(small_world, small_sae, records):
    editor = make_microedit(small_world, small_sae, gate="delta", delta_tau=1e-9)
    editor.apply([records[0]])
    edited_rows = torch.tensor(editor.ledger[0].changed["W_dec"])
    lines = small_world.corpus_path.read_text().splitlines()[:200]
    stats = editor.scope_statistics(lines, gates=("delta",))
    untouched = [line for line, d in zip(lines, stats["delta"]) if d == 0]
    assert untouched, "every corpus line reads an edited row"
    batch = editor.tokenizer(untouched[:16], return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = editor.model(**batch, output_hidden_states=True)
        with editor.edited() as model:
            gated = model(**batch, output_hidden_states=True)
    for h_plain, h_gated in zip(plain.hidden_states, gated.hidden_states):
        assert torch.equal(h_plain, h_gated)
    assert torch.equal(plain.logits, gated.logits)
    # The paper's switch with a tau nothing passes also leaves every input alone, in scope or not.
    batch = editor.tokenizer([records[0].prompt] + untouched[:3], return_tensors="pt", padding=True)
    with torch.no_grad(), editor.edited(gate=editor.make_gate("ard", tau=-1.0)) as model:
        assert torch.equal(model(**batch).logits, editor.model(**batch).logits)
    assert len(edited_rows) > 0


def test_edited_prompt_is_admitted_by_gates(small_world, small_sae, records):
    editor = make_microedit(small_world, small_sae, gate="delta")
    editor.apply([records[0]])
    stats = editor.scope_statistics([records[0].prompt], gates=("delta", "overlap"))
    assert stats["delta_last"][0] > editor.tau
    assert stats["overlap_last"][0] == pytest.approx(1.0)  # mask "last": the last token's latents are M


def test_rollback_restores_decoder_exactly(small_world, small_sae, records):
    editor = make_microedit(small_world, small_sae)
    W = editor.sae.W_dec.detach()
    snapshots = [W.clone()]
    for record in records[:3]:
        editor.apply([record])
        snapshots.append(W.clone())
    editor.rollback(2)  # the last edit: exact
    assert torch.equal(W, snapshots[2])
    editor.rollback(1)
    assert torch.equal(W, snapshots[1])
    editor.rollback(0)
    assert torch.equal(W, snapshots[0])
    with pytest.raises(ValueError, match="already rolled back"):
        editor.rollback(0)
    assert editor.ledger[0].extra["rolled_back"]


def test_rollback_of_an_earlier_edit_keeps_later_ones(small_world, small_sae, records):
    editor = make_microedit(small_world, small_sae)
    W = editor.sae.W_dec.detach()
    base = W.clone()
    first, second = records[0], records[0]  # the same prompt twice: the two edits share every row
    editor.apply([first])
    after_first = W.clone()
    editor.apply([second])
    after_second = W.clone()
    rows = torch.tensor(editor.ledger[0].changed["W_dec"])
    editor.rollback(0)
    # Shared rows keep the second edit's own change; everything else is back to base exactly.
    expected = after_second[rows] - (after_first[rows] - base[rows])
    assert torch.allclose(W[rows], expected, atol=1e-6)
    editor.rollback(1)  # now the last live edit on those rows: back to base
    assert torch.allclose(W, base, atol=1e-6)
    others = torch.ones(len(W), dtype=torch.bool)
    others[rows] = False
    assert torch.equal(W[others], base[others])


def test_state_round_trip_onto_fresh_model(small_world, small_sae, records, tmp_path):
    from lightning_edit.editors.state import load_edit_state, save_edit_state

    editor = make_microedit(small_world, small_sae, gate="overlap", overlap_tau=0.4)
    for record in records[:3]:
        editor.apply([record])
    prompts = [r.prompt for r in records] + [p.prompt for r in records for p in r.locality[:2]]
    batch = editor.tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad(), editor.edited() as model:
        expected = model(**batch).logits
    save_edit_state(editor, tmp_path / "state")
    assert (tmp_path / "state" / "sae" / small_sae[1] / "sae.safetensors").is_file()
    exported = load_sparse_coder(tmp_path / "state" / "sae" / small_sae[1])
    assert torch.equal(exported.W_dec, editor.sae.W_dec)

    fresh = make_microedit(small_world, small_sae, gate="overlap", overlap_tau=0.4)
    load_edit_state(fresh, tmp_path / "state")
    assert fresh.taus == editor.taus and fresh.alpha == editor.alpha
    assert len(fresh.ledger) == 3
    with torch.no_grad(), fresh.edited() as model:
        assert torch.equal(model(**batch).logits, expected)
    fresh.rollback(2)  # the undo log survives the round trip
    assert len(fresh.rows.masks) == 2
    with pytest.raises(ValueError, match="another SAE"):
        other = make_microedit(small_world, small_sae)
        other.sae.W_dec.data.add_(1.0)
        load_edit_state(other, tmp_path / "state")


def test_generate_with_the_switch(small_world, small_sae, records):
    editor = make_microedit(small_world, small_sae, gate="none")
    editor.apply([records[0]])
    out = editor.generate([records[0].prompt], max_new_tokens=1)
    assert out[0].strip() == records[0].target_new
