"""`LocalityEval` always finishes (issue 12 section 4): held-out prompts come from the corpus, else the
dataset's own neighbourhood prompts, else the world's fact prompts; with none, the run says "Loc
unavailable" (console and results) and still completes."""

from __future__ import annotations

import dataclasses
import json
import shutil
from types import SimpleNamespace

import pytest

from datamodules.edits import EditStream
from lightning_edit.callbacks.locality import LocalityEval
from lightning_edit.config import load_config
from lightning_edit.data import write_edits
from lightning_edit.jobs import edit as edit_job
from lightning_edit.models import load_model


@pytest.fixture(scope="module")
def stream_records(small_world):
    stream = EditStream(small_world.counterfact_path, limit=3, order_seed=0)
    stream.setup("fit")
    return stream.records


def _without_locality(records):
    return [dataclasses.replace(r, locality=[]) for r in records]


def _setup(callback: LocalityEval, records, model, tokenizer) -> None:
    trainer = SimpleNamespace(datamodule=SimpleNamespace(records=records))
    module = SimpleNamespace(editor=SimpleNamespace(ledger=[], model=model, tokenizer=tokenizer))
    callback.setup(trainer, module, "fit")


def test_prompts_fall_back_from_corpus_to_neighbourhood_to_world_prompts(small_world, stream_records):
    records = stream_records
    world_model = load_model(str(small_world.model_dir))
    subjects = [r.subject for r in records]
    about_edits = [f"{s} is mentioned here." for s in subjects]  # every corpus line names an edited subject
    neighbours = [p.prompt for r in records for p in r.locality if not any(s in p.prompt for s in subjects)]
    assert neighbours
    world_prompts = [p for fact in small_world.kb.facts for p in small_world.kb.prompts(fact)]

    loc = LocalityEval([1], candidates=about_edits, n_prompts=5, world_prompts=world_prompts)
    _setup(loc, records, *world_model)
    assert loc.source == "dataset neighbourhood prompts" and loc.unavailable is None
    assert set(loc.reference.prompts) <= set(neighbours) and len(loc.reference.prompts) == min(5, len(set(neighbours)))

    no_locality = _without_locality(records)
    loc = LocalityEval([1], candidates=about_edits, n_prompts=5, world_prompts=world_prompts)
    _setup(loc, no_locality, *world_model)
    assert loc.source == "world fact prompts" and len(loc.reference.prompts) == 5
    assert not any(s in p for p in loc.reference.prompts for s in subjects)

    loc = LocalityEval([1], candidates=about_edits, n_prompts=5)
    _setup(loc, no_locality, *world_model)
    assert loc.reference is None and loc.unavailable.startswith("Loc unavailable")


def test_a_run_with_no_locality_prompts_anywhere_says_loc_unavailable(small_world, stream_records, tmp_path,
                                                                     capsys):
    # Not an embedded world (a copy of its model elsewhere), no corpus, records without locality prompts.
    model_dir = shutil.copytree(small_world.model_dir, tmp_path / "plain_model")
    data = write_edits(_without_locality(stream_records[:2]), tmp_path / "edits.json")
    cfg = load_config(edit_job.SCHEMA, [
        "config=baselines/ft.yaml", f"model.name={model_dir}", f"data.path={data}", f"output_dir={tmp_path / 'out'}",
        "logger=csv", "threads=1", "trainer.enable_progress_bar=false", "data.limit=2", "eval.checkpoints=[2]",
        "callbacks.examples.enabled=false", "callbacks.plots.enabled=false"])
    assert edit_job.run(cfg) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    notes = results["meta"]["notes"]
    assert len(notes) == 2 and all(n.startswith("Loc unavailable") for n in notes)
    assert results["rows"][-1]["T"] == 2 and results["rows"][-1]["final-state"]["rel"] == 1.0
    for note in notes:
        assert note in out and note in (tmp_path / "out" / "results.md").read_text()
