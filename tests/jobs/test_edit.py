"""`run edit` end to end on the test-size world (lightning_edit.jobs.edit, EditModule): bad data stops
the run before any edit, results under both protocols, kill-and-resume equals an uninterrupted run,
the saved edit state reloads; every method's YAML runs a short stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datamodules.edits import EditStream
from lightning_edit.config import load_config
from lightning_edit.data import EditDataError
from lightning_edit.editors.ft import FineTune
from lightning_edit.jobs import edit as edit_job
from lightning_edit.jobs.edit_run import load_edited, new_editor
from lightning_edit.metrics import EditScorer, teacher_forced
from lightning_edit.models import ModelAdapter, load_model
from lightning_edit.world import resolve_model_path

from tests.helpers import HOOKPOINT, yaml_editor


def edit_cfg(world, output_dir: Path, *overrides: str):
    """The FT-M baseline config on the small world (its CounterFact export by default), CSV
    logging, quiet trainer."""
    assert resolve_model_path("toyworld-small") == world.model_dir  # the name means the fixture's world
    return load_config(edit_job.SCHEMA, [
        "config=baselines/ft.yaml",
        "model.name=toyworld-small",
        f"output_dir={output_dir}",
        "logger=csv",
        "threads=1",
        "trainer.enable_progress_bar=false",
        *overrides,
    ])


def ledger_ids(output_dir: Path) -> list[int]:
    return [e["edit_id"] for e in json.loads((output_dir / "edit_state" / "ledger.json").read_text())]


@pytest.fixture(scope="module")
def short_run(small_world, tmp_path_factory):
    """T=5 with checkpoints at 1 and 5."""
    out = tmp_path_factory.mktemp("edit-run")
    cfg = edit_cfg(small_world, out, "data.limit=5", "eval.checkpoints=[1,5]")
    assert edit_job.run(cfg) == 0
    return out


def test_malformed_record_stops_before_any_edit(small_world, tmp_path, monkeypatch):
    records = json.loads(small_world.counterfact_path.read_text())[:4]
    del records[2]["requested_rewrite"]["target_new"]
    bad = tmp_path / "bad_counterfact.json"
    bad.write_text(json.dumps(records))
    calls = []
    monkeypatch.setattr(FineTune, "apply", lambda self, batch: calls.append(batch))
    monkeypatch.setattr("lightning_edit.models.load_model", lambda *a, **k: calls.append("load_model"))
    cfg = edit_cfg(small_world, tmp_path / "out", f"data.path={bad}")
    with pytest.raises(EditDataError) as info:
        edit_job.run(cfg)
    message = str(info.value)
    assert str(bad) in message and "record 2" in message and "target_new" in message
    assert calls == []
    assert not (tmp_path / "out" / "edit_state").exists()


def test_short_run_writes_results_under_both_protocols(short_run):
    for name in ("results.json", "results.csv", "results.md", "results.png", "config.yaml"):
        assert (short_run / name).is_file(), name
    rows = json.loads((short_run / "results.json").read_text())["rows"]
    assert [row["T"] for row in rows] == [1, 5]
    for row in rows:
        assert set(row["final-state"]) >= {"rel", "gen", "loc", "rel_em", "gen_em"}
        assert set(row["immediate"]) >= {"rel", "gen", "loc"}
    assert rows[0]["final-state"]["rel"] == 1.0  # FT-M flips its first edit
    table = (short_run / "results.md").read_text()
    assert "Rel (final-state)" in table and "Rel (immediate)" in table
    header = (short_run / "results.csv").read_text().splitlines()[0]
    assert "final-state/rel" in header and "immediate/rel" in header
    logged = (short_run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "edit/rel" in logged and "edit_immediate/rel" in logged
    assert ledger_ids(short_run) == [0, 1, 2, 3, 4]


def csv_series(run_dir, column):
    """(step, value) of `column` in a run's csv/metrics.csv, where it is set."""
    import csv

    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        return [(int(float(r["step"])), float(r[column])) for r in csv.DictReader(f) if r.get(column)]


def test_every_row_and_ledger_entry_says_whether_the_edits_landed(short_run, small_world):
    ledger = json.loads((short_run / "edit_state" / "ledger.json").read_text())
    rows = json.loads((short_run / "results.json").read_text())["rows"]
    # Re-check each edit the way `landed` is defined: after edit i the model (edits 0..i applied,
    # reloaded from nothing but the ledger's records) gives every target token as the argmax.
    stream = EditStream(small_world.counterfact_path, limit=5, order_seed=0)
    stream.setup("fit")
    model, tokenizer = load_model(str(small_world.model_dir))
    editor = new_editor("ft", yaml_editor("ft"), model, tokenizer, ModelAdapter(model))
    expected = []
    for record in stream.records:
        editor.apply([record])
        expected.append(teacher_forced(model, tokenizer, [record.prompt], [record.target_new])[0].exact)
    assert [e["landed"] for e in ledger] == expected
    for row in rows:
        assert row["edits"] == row["T"] and row["landed_n"] == sum(expected[:row["T"]])
        assert row["landed"] == pytest.approx(sum(expected[:row["T"]]) / row["T"])
    table = (short_run / "results.md").read_text()
    assert "| landed | s/edit |" in table
    assert ("WARNING" in table) == (rows[-1]["landed"] < 0.9)


def test_kill_and_resume_equals_uninterrupted(small_world, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("data.limit=6", "eval.checkpoints=[1,6]", "checkpoint.every_n_edits=1")
    assert edit_job.run(edit_cfg(small_world, straight, *common)) == 0
    # "Killed" after 3 edits: the last checkpoint holds the state after edit 3.
    assert edit_job.run(edit_cfg(small_world, resumed, *common, "trainer.max_steps=3")) == 0
    assert ledger_ids(resumed) == [0, 1, 2]
    assert edit_job.run(edit_cfg(small_world, resumed, *common, "checkpoint.resume=last")) == 0

    assert ledger_ids(resumed) == [0, 1, 2, 3, 4, 5]
    # metrics.csv continues across the resume: the same steps and scores as the uninterrupted run's.
    assert not list((resumed / "csv").glob("resumed-*"))
    # (plus the T=3 row the stopped first part scored at its end)
    assert set(csv_series(straight, "edit/rel")) <= set(csv_series(resumed, "edit/rel"))
    assert [t for t, _ in csv_series(resumed, "edit/seconds_per_edit")] == [1, 2, 3, 4, 5, 6]
    a = load_file(str(straight / "edit_state" / "tensors.safetensors"))
    b = load_file(str(resumed / "edit_state" / "tensors.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ledger_a = json.loads((straight / "edit_state" / "ledger.json").read_text())
    ledger_b = json.loads((resumed / "edit_state" / "ledger.json").read_text())
    assert [(e["case_id"], e["steps"], e["delta_norm"]) for e in ledger_a] == \
           [(e["case_id"], e["steps"], e["delta_norm"]) for e in ledger_b]
    final = lambda out: json.loads((out / "results.json").read_text())["rows"][-1]  # noqa: E731
    assert final(straight)["T"] == final(resumed)["T"] == 6
    assert final(straight)["final-state"] == final(resumed)["final-state"]


def test_saved_edit_state_reloads_onto_a_fresh_model(short_run, small_world):
    editor, model, tokenizer = load_edited(short_run / "edit_state")  # base model named in the state
    assert [e.edit_id for e in editor.ledger] == [0, 1, 2, 3, 4]
    stream = EditStream(small_world.counterfact_path, limit=5)
    stream.setup("fit")
    base, _ = load_model(str(small_world.model_dir))
    scorer = EditScorer(tokenizer, base, stream.records)
    with editor.edited() as m:
        scores = scorer.score(m, stream.records)
    expected = json.loads((short_run / "results.json").read_text())["rows"][-1]["final-state"]
    assert scores == expected
    # The edits are really there: the base model does not give the targets.
    assert scorer.score(base, stream.records)["rel"] < scores["rel"]


@pytest.mark.parametrize("method, overrides", [
    ("grace", []),
    ("wise", ["editor.layer=0", "editor.n_iter=20", "editor.save_freq=2", "editor.merge_freq=4"]),
])
def test_baseline_configs_run_a_short_stream(small_world, tmp_path, method, overrides):
    cfg = load_config(edit_job.SCHEMA, [
        f"config=baselines/{method}.yaml", "model.name=toyworld-small", f"output_dir={tmp_path}",
        "logger=csv", "threads=1", "trainer.enable_progress_bar=false", "data.limit=4",
        "eval.checkpoints=[4]", *overrides,
    ])
    assert edit_job.run(cfg) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["method"] == method and results["meta"]["edits"] == 4
    row = results["rows"][-1]
    # Each of the 4 edits landed and all 4 still hold at the end (measured for both; their Loc on this
    # world, GRACE 0.11 and WISE 0.0 final-state, is left to the rules that set eps and the router).
    assert row["landed"] == 1.0 and row["final-state"]["rel"] == 1.0 and row["final-state"]["n"] == 4
    assert len(json.loads((tmp_path / "edit_state" / "ledger.json").read_text())) == 4
    assert (Path(tmp_path) / "edit_state" / "tensors.safetensors").is_file()




def test_edit_job_runs_both_methods(small_world, small_transcoder, stats_dir, tmp_path):
    for method in ("tcpe", "pnke"):
        out = tmp_path / method
        overrides = [f"config={method}.yaml", "model.name=toyworld-small", f"output_dir={out}", "logger=csv",
                     "threads=1", "trainer.enable_progress_bar=false", "data.limit=3", "eval.checkpoints=[3]",
                     f"component.path={small_transcoder[0]}", f"component.hookpoint={HOOKPOINT}",
                     "editor.v_lr=0.1", f"editor.stats_dir={stats_dir}", "callbacks.locality.enabled=false",
                     "callbacks.examples.enabled=false"]
        if method == "pnke":
            overrides += ["editor.layer=0", "editor.preserve_corpus_samples=200"]
        cfg = load_config(edit_job.SCHEMA, overrides)
        assert edit_job.run(cfg) == 0, method
        assert (out / "results.json").is_file() and (out / "edit_state" / "state.json").is_file()
        row = json.loads((out / "results.json").read_text())["rows"][-1]
        # Measured: every edit landed and holds (Rel 1.0); final-state Loc 0.96 (TCPE), 0.35 (PNKE, with
        # the value solver's relative rule; 0.86 before it).
        assert row["landed"] == 1.0 and row["final-state"]["rel"] == 1.0, method
        assert row["final-state"]["loc"] >= {"tcpe": 0.85, "pnke": 0.3}[method], method
