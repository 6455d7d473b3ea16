"""Fixtures of the editor tests: the small world's model, records it does not know yet, and the first
records of its CounterFact stream."""

from __future__ import annotations

import pytest

from datamodules.edits import EditStream
from lightning_edit.data import read_edits
from lightning_edit.metrics import teacher_forced
from lightning_edit.models import load_model


@pytest.fixture(scope="module")
def world_model(small_world):
    model, tokenizer = load_model(str(small_world.model_dir))
    return model, tokenizer


@pytest.fixture(scope="module")
def records_to_flip(small_world, world_model):
    """Counterfactual records whose target the unedited model does not predict yet."""
    model, tokenizer = world_model
    recs = read_edits(small_world.counterfact_path)[:40]
    scores = teacher_forced(model, tokenizer, [r.prompt for r in recs], [r.target_new for r in recs])
    return [r for r, s in zip(recs, scores) if not s.exact][:8]


@pytest.fixture(scope="module")
def stream_records(small_world):
    """The first 10 records of the small world's CounterFact stream (order seed 0)."""
    stream = EditStream(small_world.counterfact_path, limit=10, order_seed=0)
    stream.setup("fit")
    return stream.records

