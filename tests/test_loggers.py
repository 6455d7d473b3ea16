"""Loggers and the run folder (lightning_edit.loggers, lightning_edit.runtime)."""

from __future__ import annotations



def test_wandb_is_offline_without_a_key_and_ranks_share_the_run_folder(tmp_path, monkeypatch):
    from lightning_edit.loggers import wandb_mode
    from lightning_edit.runtime import RUN_DIR_ENV, resolve_output_dir

    (tmp_path / "netrc").write_text("machine example.com login x password y\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode(None) == "online" and wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(None) == "offline"
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password secret\n")
    assert wandb_mode(None) == "online"

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    parent = resolve_output_dir(None, "sae", root=tmp_path / "runs")
    assert parent.parent == tmp_path / "runs" / "sae"
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP child started by Lightning's launcher
    assert resolve_output_dir(None, "sae", root=tmp_path / "runs").resolve() == parent.resolve()
