"""The code benchmarks' commands: a user's mistake is one line and exit 2, nothing written; the
configs compose."""

import pytest

from lightning_edit import cli
from lightning_edit.config import load_config
from lightning_edit.jobs import edit as edit_job


@pytest.mark.parametrize("name", ["code/kecode_tcpe.yaml", "code/ment.yaml", "code/ment_kn.yaml",
                                  "code/kecode_rome.yaml", "code/kecode_memit.yaml", "code/kecode_ment.yaml",
                                  "code/kecode_pnke.yaml", "code/kecode_microedit.yaml", "code/kecode_kn.yaml", "baselines/kn.yaml"])
def test_every_code_config_composes(name):
    from lightning_edit.code.job import check
    from lightning_edit.editors import editor_config

    cfg = load_config(edit_job.SCHEMA, [f"config={name}"])
    editor_config(cfg.editor.method, dict(cfg.editor))
    if cfg.code.benchmark is not None:
        assert check(cfg) is None


def test_not_a_code_world_is_one_line_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", "edit", "config=code/ment.yaml", "model.name=toyworld-small", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a code world" in err[0] and "codeworld" in err[0]
    assert not out.exists()


def test_no_compiler_is_one_line_and_nothing_written(code_world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("LDC2", raising=False)
    assert cli.main(["run", "edit", "config=code/kecode_tcpe.yaml", "model.name=codeworld-small",
                     f"output_dir={out}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "ldc2" in err[0] and "apt-get install -y ldc" in err[0]
    assert not out.exists()


def test_a_bad_benchmark_value_is_one_line(tmp_path, capsys):
    assert cli.main(["run", "edit", "config=code/ment.yaml", "code.benchmark=kecod", f"output_dir={tmp_path / 'r'}"]) == 2
    assert "code.benchmark" in capsys.readouterr().err


def test_the_ment_command_runs_end_to_end(code_world, tmp_path):
    """`run edit config=code/ment.yaml` on the test world, a few patch sets and probes: every measure
    written, finite, and within its range."""
    import json
    import math

    out = tmp_path / "ment"
    probes, seen = [], set()
    for sample in json.loads(code_world.ment_probe_path.read_text()):  # 2 subtypes x 2 prompts, one target each
        subtypes = {s for s, _ in seen}
        if (sample["subtype"], sample["prompt_id"]) not in seen and (sample["subtype"] in subtypes or len(subtypes) < 2) \
                and sum(s == sample["subtype"] for s, _ in seen) < 2:
            seen.add((sample["subtype"], sample["prompt_id"]))
            probes.append(sample)
    (tmp_path / "probes.json").write_text(json.dumps(probes))
    assert cli.main(["run", "edit", "config=code/ment.yaml", "model.name=codeworld-small", "logger=csv",
                     "code.patch_sets=12", f"code.probe_path={tmp_path / 'probes.json'}", f"output_dir={out}"]) == 0
    result = json.loads((out / "results.json").read_text())
    patch = result["patch"]["summary"]
    for key in ("em", "bm", "lm", "bleu", "rouge"):
        for when in ("before", "after"):
            assert 0.0 <= patch[f"{when}_{key}"] <= 1.0, (when, key)
    errors = [p for p in json.loads(code_world.ment_patch_path.read_text())[:12] if p["error"] is not None]
    assert patch["errors"] == len(errors) > 0
    assert 0.0 <= patch["skip_rate"] <= 1.0 and 1.0 <= patch["neuron_cost"] <= 11.0
    probe = result["probe"]["summary"]
    assert all(not math.isnan(probe[k]) and probe[k] >= 0 for k in ("g_mae_rank", "g_mae_prob", "s_mae_rank",
                                                                      "s_mae_prob"))
    assert (out / "results.md").is_file() and (out / "results.png").is_file()
