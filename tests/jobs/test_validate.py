"""Validation of a stream's records against the model's tokenizer and context (`jobs.validate`)."""

from __future__ import annotations

import pytest

from lightning_edit.data import EditRecord, LocalityPair
from lightning_edit.errors import UserError
from lightning_edit.jobs.validate import check_checkpoints, default_checkpoints, validate_records


@pytest.fixture(scope="module")
def tokenizer(small_world):
    from lightning_edit.models import load_model

    return load_model("toyworld-small")[1]


def record(i, prompt="At home Viahand Guba keeps a pet", target="parrot", subject="Viahand Guba", **more):
    return EditRecord(prompt=prompt, target_new=target, subject=subject, location=f"edits.json: record {i}", **more)


def test_duplicates_conflicts_and_absent_subjects_are_counted(tokenizer):
    records = [record(0), record(1), record(2, target="ferret"), record(3, subject="Dodial Hireith"), record(4)]
    report = validate_records(records, tokenizer, 256)
    assert (report.duplicates, report.conflicts, report.subject_absent, report.truncated) == (2, 1, 1, 0)
    assert report.examples["duplicates"].startswith("edits.json: record 1 (same as edits.json: record 0)")
    assert report.examples["conflicts"].startswith("edits.json: record 2")
    text = " ".join(report.warnings())
    assert "2 of 5 records repeat" in text and "1 of 5 records ask for another target" in text
    with pytest.raises(UserError, match="data.strict=true: 2 of 3 records repeat"):
        validate_records([record(0), record(1), record(4)], tokenizer, 256, strict=True)


def test_too_long_is_an_error_or_truncated_when_asked(tokenizer):
    long = "At home " + " ".join(["Viahand Guba"] * 200) + " keeps a pet"
    with pytest.raises(UserError, match=r"edits.json: record 0: field 'prompt' with its answer is \d+ tokens, longer "
                                        r"than the model's context of 64"):
        validate_records([record(0, prompt=long)], tokenizer, 64)
    recs = [record(0, prompt=long, locality=[LocalityPair(long, "ferret")])]
    report = validate_records(recs, tokenizer, 64, truncate=True)
    assert report.truncated == 1
    from lightning_edit.tokens import encode, join_prompt_target

    assert len(encode(tokenizer, join_prompt_target(recs[0].prompt, "parrot"))) <= 64
    assert recs[0].prompt.endswith("keeps a pet") and len(encode(tokenizer, recs[0].locality[0].prompt)) < 64


def test_unknown_tokens_name_the_field(tokenizer):
    with pytest.raises(UserError, match="record 0: field 'subject'"):
        validate_records([record(0, subject="Qqqzz")], tokenizer, 256)
    with pytest.raises(UserError, match="record 0: field 'prompt'"):
        validate_records([record(0, prompt="Qqqzz keeps a pet", subject=None)], tokenizer, 256)


def test_checkpoints_in_range():
    assert default_checkpoints(250) == [1, 10, 100, 250] and default_checkpoints(1) == [1]
    assert check_checkpoints([10, 1, 10], 10) == [1, 10]
    with pytest.raises(UserError, match=r"eval.checkpoints: 0, 11 outside 1..10"):
        check_checkpoints([0, 5, 11], 10)
    assert check_checkpoints([0], 5, key="callbacks.locality.at", lowest=0) == [0]
