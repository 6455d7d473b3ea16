"""bench/other_facts.py on a real (tiny) MicroEdit run: the share of the edited subjects' other facts
that keep their answers, and how it falls when the same edit state is rescored without a gate."""

from __future__ import annotations

import json

from lightning_edit.config import load_config
from lightning_edit.jobs import edit as edit_job

from tests.helpers import load_bench


def test_other_facts_of_edited_subjects_and_a_rescored_gate(small_world, tmp_path, capsys):
    run_dir = tmp_path / "microedit"
    cfg = load_config(edit_job.SCHEMA, [
        "config=microedit.yaml", "model.name=toyworld-small", f"output_dir={run_dir}", "logger=csv", "threads=1",
        "trainer.enable_progress_bar=false", "data.limit=8", "eval.checkpoints=[8]",
        "callbacks.locality.enabled=false", "callbacks.examples.enabled=false", "callbacks.plots.enabled=false"])
    assert edit_job.run(cfg) == 0
    bench = load_bench("other_facts")
    capsys.readouterr()
    assert bench.main(["--run", str(run_dir)]) == 0
    shipped = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shipped["edits"] == 8 and 1 <= shipped["subjects"] <= 8 and shipped["prompts"] > 0
    # the same edits without a scope gate (every position spliced): the other facts change
    assert bench.main(["--run", str(run_dir), "--set", "gate=none"]) == 0
    loose = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert loose["prompts"] == shipped["prompts"] and loose["kept"] < shipped["kept"]
    # a user's mistakes: one line, exit 2
    assert bench.main(["--run", str(tmp_path / "nowhere")]) == 2
    assert "config.yaml not found" in capsys.readouterr().err
    assert bench.main(["--run", str(run_dir), "--set", "no_such_field=1"]) == 2
    assert "no_such_field" in capsys.readouterr().err
