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
