"""Editors never see evaluation data (issue 12 section 2): every method, given the same stream with
every scoring prompt (rephrases, locality prompts and answers) and every dataset extra replaced,
makes bit-identical edits, since `Editor.apply` receives `EditRequest`s only."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_edit.data import EditRecord, EditRequest, LocalityPair
from lightning_edit.editors import EDITORS
from lightning_edit.editors.base import Editor

from tests.helpers import small_world_editor

N_EDITS = 2


def _tensors(node, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a (nested) editor state, by path; the ledger (it holds timings) left out."""
    if isinstance(node, torch.Tensor):
        return {prefix: node.detach().cpu()}
    if isinstance(node, dict):
        return {k: v for key, value in node.items() if key != "ledger"
                for k, v in _tensors(value, f"{prefix}.{key}").items()}
    if isinstance(node, (list, tuple)):
        return {k: v for i, value in enumerate(node) for k, v in _tensors(value, f"{prefix}[{i}]").items()}
    return {}


def _edited(editor: Editor, records: list[EditRecord]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    for record in records:
        editor.apply([record])
    with editor.edited() as model:
        weights = {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {**weights, **_tensors(editor.state_dict(), "state")}


def _blinded(record: EditRecord, other: EditRecord) -> EditRecord:
    """`record` with the scoring prompts, ground truth and extras of another record (of another subject)."""
    return dataclasses.replace(
        record, rephrase_prompts=[*other.rephrase_prompts, "An unrelated rephrase"],
        locality=[LocalityPair(p.prompt, "x") for p in other.locality] + [LocalityPair("Nothing to see", None)],
        ground_truth=other.ground_truth, extra={"relation_id": "none"}, kind="fact")


def test_an_edit_request_carries_nothing_scored(stream_records):
    record = stream_records[0]
    request = EditRequest.of(record)
    assert (request.prompt, request.target_new, request.subject, request.case_id) == \
        (record.prompt, record.target_new, record.subject, record.case_id)
    fields = {f.name for f in dataclasses.fields(request)}
    assert fields == {"prompt", "target_new", "subject", "training_paraphrases", "case_id"}
    assert record.rephrase_prompts and record.locality  # the record has them; the request cannot


@pytest.mark.parametrize("method", sorted(EDITORS))
def test_scoring_prompts_never_change_an_edit(method, small_world, small_corpus, stats_dir, small_sae,
                                              small_transcoder, stream_records):
    components = {"sae": small_sae, "transcoder": small_transcoder}
    records = list(stream_records[:N_EDITS])
    others = list(stream_records[-N_EDITS:])
    assert all(r.subject != o.subject for r in records for o in others)

    plain = small_world_editor(method, small_world, small_corpus, stats_dir, components)
    blind = small_world_editor(method, small_world, small_corpus, stats_dir, components)
    a = _edited(plain, records)
    b = _edited(blind, [_blinded(r, o) for r, o in zip(records, others)])
    assert len(plain.ledger) == len(blind.ledger) == N_EDITS
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
