"""bench/compare_methods.py: the `landed` column and a note naming what the ledger says did not happen,
collected from a real (tiny) run of the edit job whose edits all fail, which also warns."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_edit.config import load_config
from lightning_edit.jobs import edit as edit_job

from tests.helpers import load_bench


def _bench():
    return load_bench("compare_methods")


def test_ledger_note_counts_skipped_rolled_back_and_unlanded_edits():
    bench = _bench()
    ledger = [{"landed": True, "extra": {}}, {"landed": False, "extra": {"skip": True}},
              {"landed": False, "extra": {"skip": True}}, {"landed": True, "extra": {"rolled_back": True}},
              {"landed": None, "extra": {}}]
    assert bench.ledger_note(ledger) == "skipped 2/5; rolled back 1/5; not landed 2/5"
    assert bench.ledger_note([{"landed": True, "extra": {"skip": False}}]) == ""


def test_a_stream_whose_edits_do_not_land_warns_and_its_table_row_says_so(small_world, tmp_path, capsys):
    # One barely scaled MENT patch cannot close a fact's logit gap: every edit is a skip-action.
    run_dir = tmp_path / "runs" / "ment"
    cfg = load_config(edit_job.SCHEMA, [
        "config=ment.yaml", "model.name=toyworld-small", f"output_dir={run_dir}", "logger=csv", "threads=1",
        "trainer.enable_progress_bar=false", "data.limit=2", "eval.checkpoints=[2]", "editor.quota=1",
        "editor.patch_scale=1.0", "callbacks.locality.enabled=false", "callbacks.examples.enabled=false",
        "callbacks.plots.enabled=false"])
    assert edit_job.run(cfg) == 0
    row = json.loads((run_dir / "results.json").read_text())["rows"][-1]
    assert (row["landed"], row["landed_n"], row["edits"]) == (0.0, 0, 2)
    warning = "WARNING: ment landed only 0% of its edits (0/2"
    assert warning in (run_dir / "results.md").read_text()
    assert warning in capsys.readouterr().out

    out = tmp_path / "table.md"
    assert _bench().main(["--methods", "ment", "--model", "toyworld-small", "--limit", "2", "--checkpoints", "2",
                          "--runs-dir", str(tmp_path / "runs"), "--out", str(out), "--reuse"]) == 0
    (run,) = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert run["status"] == "ok" and run["landed"] == 0.0
    assert run["note"].startswith("skipped 2/2; not landed 2/2")
    header, _, line = out.read_text().splitlines()[-3:]
    names = [c.strip() for c in header.strip("|").split("|")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[names.index("landed")] == "0.000" and cells[names.index("note")].startswith("skipped 2/2")
