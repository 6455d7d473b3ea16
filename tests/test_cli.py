"""The command line: help at every level, dispatch to jobs, the `lightning` hand-over."""

import subprocess
import sys

import pytest

from lightning_edit import cli
from lightning_edit.jobs import JOBS


def _run(*args):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["run", "edit", "--help"],
                                  ["run", "sae", "--help"], ["run", "transcoder", "--help"]])
def test_help_at_every_level(argv, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    if argv[0] == "run" and len(argv) == 3:
        # A job's help lists its config keys and defaults.
        assert "Config keys and their defaults" in out and "model:" in out and "trainer:" in out


def test_dispatch_reaches_the_job_with_parsed_config(monkeypatch):
    seen = {}
    module = cli.job_module("edit")
    monkeypatch.setattr(module, "run", lambda cfg: seen.setdefault("cfg", cfg) and 0)
    assert cli.main(["run", "edit", "data.limit=7", "model.name=some/model"]) == 0
    assert seen["cfg"].data.limit == 7 and seen["cfg"].model.name == "some/model"


def test_config_error_exits_2_with_message(capsys):
    assert cli.main(["run", "edit", "data.limti=3"]) == 2
    err = capsys.readouterr().err
    assert "data.limti" in err and "limit" in err


def test_lightning_routes_run_to_us_and_the_rest_to_sdk(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "main", lambda argv, prog: calls.append((list(argv), prog)) or 0)
    assert cli.lightning_main(["run", "edit", "data.limit=1"]) == 0
    assert calls == [(["run", "edit", "data.limit=1"], "lightning")]

    # Without lightning-sdk another command is refused with what is available.
    monkeypatch.setattr(cli, "_sdk_available", lambda: False)
    assert cli.lightning_main(["login"]) == 2
    err = capsys.readouterr().err
    assert "login" in err and "lightning-sdk" in err and "run" in err

    # With it, the command is handed to the SDK's CLI with argv unchanged.
    execs = []
    monkeypatch.setattr(cli, "_sdk_available", lambda: True)
    monkeypatch.setattr(cli.os, "execv", lambda exe, args: execs.append(args))
    cli.lightning_main(["studio", "list", "--x=1"])
    assert execs and execs[0][1:] == ["-m", cli.SDK_ENTRYPOINT, "studio", "list", "--x=1"]


def test_console_scripts_and_module_entry_are_installed():
    for argv in (["lightning", "run", "--help"], ["lightning-edit", "run", "--help"],
                 [sys.executable, "-m", "lightning_edit", "run", "--help"]):
        done = _run(*argv)
        assert done.returncode == 0, done.stderr
        for job in JOBS:
            assert job in done.stdout


def test_world_command_knows_every_world_and_rejects_others(monkeypatch, capsys):
    from lightning_edit import world

    built = []

    class Built:
        root, accuracy = "/cache/worlds/x", {"accuracy": 1.0}

    def build_world(name, seed, force):
        built.append(name)
        return Built()

    monkeypatch.setattr(world, "build_world", build_world)
    assert cli.main(["world", "--name", "toyworld-gpt2"]) == 0 and built == ["toyworld-gpt2"]
    with pytest.raises(SystemExit) as done:
        cli.main(["world", "--name", "toyworld-large"])
    assert done.value.code == 2 and "toyworld-gpt2-small" in capsys.readouterr().err
