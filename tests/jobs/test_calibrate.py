"""`lightning calibrate` (lightning_edit.jobs.calibrate): on a saved edit state or the run folder holding it,
or on records edited first through `build_edit_run`; errors are one line and exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_edit.data import read_edits

from tests.helpers import make_microedit


@pytest.fixture(scope="module")
def records(small_world):
    return read_edits(small_world.counterfact_path)[:6]


def test_calibrate_command_on_a_saved_state(small_world, small_sae, records, tmp_path, capsys):
    from lightning_edit.cli import lightning_main, main
    from lightning_edit.editors.state import save_edit_state

    editor = make_microedit(small_world, small_sae, gate="overlap", overlap_tau=0.4)
    for record in records[:2]:
        editor.apply([record])
    save_edit_state(editor, tmp_path / "state")
    out = tmp_path / "calib"
    assert main(["calibrate", f"state={tmp_path / 'state'}", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if ln.startswith("use it with:"))
    tau = float(line.split("editor.overlap_tau=")[1])
    assert {"report.json", "summary.md", "ard_diagnostics.png"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["edits"] == 2 and report["summary"]["overlap"]["current_tau"] == 0.4
    after = report["values"]["overlap"]["after"]
    assert len(after["edit"]) == 2 and len(after["reference"]) == min(256, len(small_world.corpus_path.read_text().splitlines()))
    # The printed tau is the report's proposal (6 significant digits), and it does its job on the saved
    # state: both edit prompts (with targets) admitted, no reference line admitted (both measured).
    assert tau == pytest.approx(report["summary"]["overlap"]["proposed_tau"], rel=1e-5)
    assert min(after["edit"]) >= tau and sum(v >= tau for v in after["reference"]) == 0
    assert main(["calibrate", "oops"]) == 2
    assert main(["calibrate", f"state={tmp_path / 'missing'}", f"out={tmp_path / 'none'}"]) == 2
    assert "not an edit state folder" in capsys.readouterr().err and not (tmp_path / "none").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit):  # `lightning calibrate --help` is ours, not lightning-sdk's
        lightning_main(["calibrate", "--help"])
    assert "propose" in capsys.readouterr().out


FAST_RUN = {"lr": 5e-3, "stage1_max_steps": 10, "stage2_max_steps": 150, "stop_nll": 0.1, "calib_samples": 128}
"""MicroEdit's small-budget settings for the test world (as tests.helpers.FAST), as `editor.*` overrides."""


@pytest.fixture(scope="module")
def microedit_run(small_world, small_sae, tmp_path_factory):
    """A finished `run edit` of MicroEdit (small SAE, 3 edits): the run folder it printed."""
    from lightning_edit.config import load_config
    from lightning_edit.jobs import edit as edit_job

    out = tmp_path_factory.mktemp("microedit-run")
    folder, hookpoint = small_sae
    cfg = load_config(edit_job.SCHEMA, [
        "config=microedit.yaml", "model.name=toyworld-small", f"component.path={folder}",
        f"component.hookpoint={hookpoint}", *[f"editor.{k}={v}" for k, v in FAST_RUN.items()],
        "data.limit=3", "eval.checkpoints=[3]", "logger=csv", "threads=1", "trainer.enable_progress_bar=false",
        "callbacks.locality.enabled=false", "callbacks.examples.enabled=false", f"output_dir={out}"])
    assert edit_job.run(cfg) == 0
    return out


def test_calibrate_takes_the_run_folder_run_edit_prints(microedit_run, tmp_path, capsys):
    from lightning_edit.cli import main

    out = tmp_path / "calib"
    assert main(["calibrate", f"state={microedit_run}", f"out={out}", "n_reference=32"]) == 0  # the run folder
    report = json.loads((out / "report.json").read_text())
    assert report["edits"] == 3 and set(report["summary"]) == {"ard", "delta", "overlap"}
    assert len(report["values"]["overlap"]["after"]["edit"]) == 3  # the ledger's records, found in the world's file
    assert "use it with: editor.gate=overlap editor.overlap_tau=" in capsys.readouterr().out
    assert main(["run", "calibrate", f"state={microedit_run / 'edit_state'}", f"out={tmp_path / 'again'}",
                 "n_reference=32"]) == 0
    assert json.loads((tmp_path / "again" / "report.json").read_text())["summary"] == report["summary"]


def test_calibrate_edits_first_through_the_edit_run(small_world, small_sae, tmp_path, capsys):
    """Without a state: `build_edit_run` on the edit config, T records of its stream applied."""
    from lightning_edit.cli import main

    folder, hookpoint = small_sae
    out = tmp_path / "calib"
    overrides = [f"component.path={folder}", f"component.hookpoint={hookpoint}"]
    argv = ["calibrate", "world=toyworld-small", "T=2", "editor.gate=delta", f"out={out}", "n_reference=32",
            "edit_overrides=[" + ",".join(f"'{o}'" for o in overrides) + "]",
            *[f"editor.{k}={v}" for k, v in FAST_RUN.items()]]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["edits"] == 2 and len(report["values"]["delta"]["after"]["edit"]) == 2
    assert "use it with: editor.gate=delta editor.delta_tau=" in capsys.readouterr().out
    assert main(["calibrate", "world=toyworld-small", "T=2", "editor.gatee=ard", f"out={tmp_path / 'no'}",
                 "edit_overrides=[" + ",".join(f"'{o}'" for o in overrides) + "]"]) == 2
    assert "editor.gatee" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_calibrate_refuses_another_method_and_its_help_examples_parse(tmp_path, capsys):
    from lightning_edit.cli import main
    from lightning_edit.config import load_config
    from lightning_edit.jobs import calibrate

    from safetensors.torch import save_file

    state = tmp_path / "edit_state"  # a ROME edit state, as far as calibrate reads it before loading a model
    state.mkdir()
    save_file({"x": torch.zeros(1)}, str(state / "tensors.safetensors"))
    (state / "state.json").write_text("{}")
    (state / "editor.json").write_text(json.dumps({"format_version": 1, "method": "rome"}))
    assert main(["calibrate", f"state={tmp_path}", f"out={tmp_path / 'out'}"]) == 2
    assert "calibrate measures MicroEdit's scope gates; this is a 'rome' editor" in capsys.readouterr().err
    examples = [line.split("lightning calibrate ", 1)[1].split("  (")[0].split()
                for line in calibrate.EXAMPLES.splitlines() if "lightning calibrate " in line]
    assert len(examples) == 3
    for argv in examples:  # every key of every --help example is a key of the job's schema
        load_config(calibrate.SCHEMA, [a.replace("<stamp>", "x").replace("<", "").replace(">", "") for a in argv])
