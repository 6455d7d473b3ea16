"""The error contract (issue 13): bad inputs end as one line and exit 2 with nothing written; an edit
that writes NaN is refused and rolled back; a failed edit or a killed final save loses nothing.

The table of bad inputs is `bench/bad_inputs.py`'s corpus, run through the CLI in this process
(`cli.main`); the cases that load a component or a state folder share one valid edit state.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench import bad_inputs
from lightning_edit.cli import main
from lightning_edit.config import load_config
from lightning_edit.errors import EditStepError, UserError
from lightning_edit.jobs import edit as edit_job

CASES = bad_inputs.cases()
TABLE = [c for c in CASES if not c.slow]


@pytest.fixture(scope="module")
def valid_state(straight, monkeypatch_module):
    """The uninterrupted run's edit state, spoiled by the state-folder cases."""
    monkeypatch_module.setitem(bad_inputs.STATE, "dir", straight / "edit_state")
    return straight / "edit_state"


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_table_is_broad():
    areas = {c.area for c in TABLE}
    assert len(TABLE) >= 40 and {"data", "record", "config", "model", "component", "state", "output",
                                 "resume"} <= areas


@pytest.mark.parametrize("case", TABLE, ids=[c.name for c in TABLE])
def test_bad_input_is_one_line_exit_2(case, small_world, valid_state, tmp_path):
    outcome = bad_inputs.run_case(case, tmp_path / "case")
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("error:")]
    assert outcome.rc == 2, outcome.stderr[-2000:]
    assert "Traceback" not in outcome.stderr
    assert len(errors) == 1 and case.names(tmp_path / "case") in errors[0], outcome.stderr[-2000:]
    assert not outcome.wrote  # no output folder for a run that fails validation


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    args = ["run", "edit", *bad_inputs.FT, *bad_inputs.BASE, "data.limit=0", f"output_dir={tmp_path / 'out'}"]
    with pytest.raises(UserError, match="data.limit"):
        main(["--debug", *args])
    monkeypatch.setenv("LIGHTNING_EDIT_DEBUG", "1")
    with pytest.raises(UserError, match="data.limit"):
        main(args)
    monkeypatch.delenv("LIGHTNING_EDIT_DEBUG")
    assert main(args) == 2 and "error: data.limit is 0" in capsys.readouterr().err


# Edit-time failures ----------------------------------------------------------------------------


def edit_cfg(out: Path, *overrides: str):
    return load_config(edit_job.SCHEMA, ["config=baselines/ft.yaml", "model.name=toyworld-small",
                                         f"output_dir={out}", "logger=csv", "threads=1",
                                         "trainer.enable_progress_bar=false", "callbacks.locality.enabled=false",
                                         "callbacks.examples.enabled=false", "callbacks.plots.enabled=false",
                                         "data.limit=3", *overrides])


def poison_edit_of(monkeypatch, record_position: int, how: str) -> list[str]:
    """FT-M's apply, spoiled at the `record_position`-th call: `how` = "nan" writes NaN into the
    edited weight, "raise" fails half-way (after writing NaN). Returns the prompts edited."""
    from lightning_edit.editors.ft import FineTune

    original, prompts = FineTune.apply, []

    def apply(self, records):
        prompts.append(records[0].prompt)
        if len(prompts) - 1 != record_position:
            return original(self, records)
        if how == "raise":
            with torch.no_grad():
                self.weight.view(-1)[0] = math.nan  # a partial write the undo must take back
            raise RuntimeError("solver diverged")
        entries = original(self, records)
        with torch.no_grad():
            self.weight.view(-1)[:5] = math.nan
        return entries

    monkeypatch.setattr(FineTune, "apply", apply)
    return prompts


def ledger(out: Path) -> list[dict]:
    return json.loads((out / "edit_state" / "ledger.json").read_text())


def same_state(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "edit_state" / "tensors.safetensors")), load_file(str(b / "edit_state" / "tensors.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def straight(small_world, tmp_path_factory):
    """The uninterrupted 3-edit FT-M run the interrupted ones are compared with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert edit_job.run(edit_cfg(out)) == 0
    return out


def test_nan_edit_is_refused_rolled_back_and_skipped(small_world, straight, tmp_path, monkeypatch, capsys):
    poison_edit_of(monkeypatch, 1, "nan")
    out = tmp_path / "run"
    assert edit_job.run(edit_cfg(out, "on_nonfinite=skip")) == 0
    entries = ledger(out)
    assert [e["status"] for e in entries] == ["applied", "failed", "applied"]
    weights = load_file(str(out / "edit_state" / "tensors.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())  # rolled back: nothing NaN is kept
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["failed_edits"] == 1
    assert "refused" in (out / "results.md").read_text()
    assert all(not math.isnan(v) for v in results["rows"][-1]["final-state"].values() if isinstance(v, float))
    assert "refused:" in capsys.readouterr().out


def test_nan_edit_stops_the_stream_by_default(small_world, tmp_path, monkeypatch):
    poison_edit_of(monkeypatch, 2, "nan")
    out = tmp_path / "run"
    with pytest.raises(EditStepError, match=r"counterfact.json: record \d+.*NaN.*rolled back.*resume=last"):
        edit_job.run(edit_cfg(out))
    assert not (out / "results.json").exists() and not (out / "edit_state").exists()
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(saved["edit"]["records"]) == 2  # the edits before the refused one


def test_unk_target_fails_before_any_edit(small_world, tmp_path, capsys):
    data = bad_inputs.write(tmp_path, "edits.json", [bad_inputs.easy(), bad_inputs.easy(target="zzqx")])
    out = tmp_path / "run"
    args = ["run", "edit", *bad_inputs.FT, *bad_inputs.BASE, f"data.path={data}", f"output_dir={out}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "edits.json: record 1: field 'target_new'" in err and "<unk>" in err
    assert not out.exists()


def test_nan_component_fails_on_load(small_world, small_sae, tmp_path, capsys):
    from lightning_edit.sparse import load_sparse_coder, save_sparsify

    folder, hookpoint = small_sae
    coder = load_sparse_coder(folder)
    with torch.no_grad():
        coder.W_dec.view(-1)[7] = math.nan
    spoiled = save_sparsify(coder, tmp_path / "sae" / hookpoint)
    out = tmp_path / "run"
    args = ["run", "edit", *bad_inputs.MICRO, *bad_inputs.BASE, f"component.path={spoiled}",
            f"component.hookpoint={hookpoint}", f"output_dir={out}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "sae.safetensors: tensor 'W_dec' holds 1 NaN" in err and not out.exists()


# Crash safety ----------------------------------------------------------------------------------


def test_failed_edit_before_first_checkpoint_resumes(small_world, straight, tmp_path, monkeypatch):
    """An exception at the third edit (no checkpoint yet: every_n_edits=100) saves the two edits
    before it and names the record's place in its file; the fixed run resumes to the same state."""
    prompts = poison_edit_of(monkeypatch, 2, "raise")
    out = tmp_path / "run"
    with pytest.raises(EditStepError, match=r"counterfact.json: record \d+: editing failed.*solver diverged.*"
                                             r"the 2 edits before it are saved in .*last.ckpt"):
        edit_job.run(edit_cfg(out))
    assert not (out / "results.json").exists()
    monkeypatch.undo()  # the "fixed file"
    assert edit_job.run(edit_cfg(out, "checkpoint.resume=last")) == 0
    assert [e["prompt"] for e in ledger(out)] == [e["prompt"] for e in ledger(straight)]
    assert prompts[:2] == [e["prompt"] for e in ledger(straight)[:2]]
    assert same_state(out, straight)


def test_kill_before_first_checkpoint_then_resume_last_starts_over(small_world, straight, tmp_path, monkeypatch,
                                                                    capsys):
    """Killed (KeyboardInterrupt: no handler of ours runs) at the second edit, before any checkpoint
    (every_n_edits=100): `checkpoint.resume=last` starts the stream over, says so, and ends where the
    uninterrupted run ends; the killed part's metrics.csv rows are not kept."""
    from lightning_edit.editors.ft import FineTune

    original, calls = FineTune.apply, []

    def apply(self, records):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, records)

    monkeypatch.setattr(FineTune, "apply", apply)
    out = tmp_path / "run"
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        edit_job.run(edit_cfg(out))
    assert not (out / "checkpoints" / "last.ckpt").exists() and not (out / "results.json").exists()
    monkeypatch.undo()
    assert edit_job.run(edit_cfg(out, "checkpoint.resume=last")) == 0
    assert "no checkpoint at" in capsys.readouterr().err
    assert same_state(out, straight)
    with (out / "csv" / "metrics.csv").open() as f:
        steps = [int(float(row["step"])) for row in csv.DictReader(f) if row.get("edit/seconds_per_edit")]
    assert steps == [1, 2, 3] and not list((out / "csv").glob("resumed-*"))


def test_resume_last_without_checkpoint_starts_fresh(small_world, straight, tmp_path, capsys):
    out = tmp_path / "run"
    assert edit_job.run(edit_cfg(out, "checkpoint.resume=last")) == 0
    assert "no checkpoint at" in capsys.readouterr().err
    assert same_state(out, straight)


def test_kill_during_final_save_leaves_no_finished_looking_folder(small_world, straight, tmp_path, monkeypatch):
    """Killed while writing results (after edit_state/): no results.json; the resumed run (from the
    checkpoint at the stream's end) writes the whole folder, and leftover temp files are removed."""
    from lightning_edit import results as results_module
    from lightning_edit import runtime

    real = runtime.atomic_write

    def dying(path, data):
        if Path(path).name == "results.json":
            Path(runtime.temp_path(path)).write_text("{\"rows\": [")  # what a kill mid-write leaves
            raise KeyboardInterrupt("killed")
        return real(path, data)

    monkeypatch.setattr(runtime, "atomic_write", dying)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        edit_job.run(edit_cfg(out, "checkpoint.every_n_edits=3"))
    assert (out / "edit_state").is_dir() and not (out / "results.json").exists()
    assert list(out.glob(".results.json.tmp-*"))
    monkeypatch.setattr(runtime, "atomic_write", real)
    assert edit_job.run(edit_cfg(out, "checkpoint.every_n_edits=3", "checkpoint.resume=last")) == 0
    assert results_module.load_results(out / "results.json")[-1]["T"] == 3
    assert not list(out.glob(".*.tmp-*")) and not list((out / "checkpoints").glob(".*.tmp-*"))
    assert same_state(out, straight)
