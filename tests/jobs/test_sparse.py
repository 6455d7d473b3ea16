"""The `sae` / `transcoder` jobs (lightning_edit.jobs.sparse) end to end on the small world: export and
report, two hookpoints and transcoders, exact resume, two-process CPU DDP."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from datamodules.tokens import TokenDataModule
from lightning_edit.cli import run_job
from lightning_edit.sparse import load_sparse_coders
from modules.sparse_coder_module import training_positions

from tests.helpers import sparse_job_overrides


REPO = Path(__file__).resolve().parents[2]


def _train_log(out: Path, key: str) -> list[float]:
    with open(out / "csv" / "metrics.csv") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def _checkpoint_coders(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("coders.")}


def test_sae_job_trains_exports_and_reports(small_world, tmp_path, capsys):
    out = tmp_path / "sae"
    rc = run_job("sae", sparse_job_overrides(small_world, out, "hookpoints=[layers.1]", "trainer.max_steps=40",
                                   "checkpoint_every=20"))
    assert rc == 0
    fvu = _train_log(out, "sae/layers.1/fvu")
    assert len(fvu) >= 30 and sum(fvu[-5:]) / 5 < 0.5 * sum(fvu[:3]) / 3
    assert (out / "config.yaml").is_file() and "layers.1" in (out / "config.yaml").read_text()
    printed = capsys.readouterr().out
    assert "| layers.1 |" in printed and "ce_loss_score" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary[0]["hookpoint"] == "layers.1" and summary[0]["fvu"] < 0.5
    assert (out / "summary.md").read_text().strip() in printed
    # The export is the trained state, bit for bit, and loads back.
    loaded = load_sparse_coders(out / "export")
    trained = _checkpoint_coders(out / "checkpoints" / "last.ckpt")
    assert set(loaded) == {"layers.1"}
    for name, tensor in loaded["layers.1"].state_dict().items():
        assert torch.equal(tensor, trained[f"coders.layers/1.{name}"]), name


def test_two_hookpoints_and_transcoders_report_ce_loss_score(small_world, tmp_path):
    out = tmp_path / "tc"
    rc = run_job("transcoder", sparse_job_overrides(small_world, out, "hookpoints=[layers.*.mlp]",
                                          "trainer.max_steps=25"))
    assert rc == 0
    rows = {r["hookpoint"]: r for r in json.loads((out / "summary.json").read_text())}
    assert set(rows) == {"layers.0.mlp", "layers.1.mlp"}
    for row in rows.values():
        assert row["mode"] == "transcoder" and row["fvu"] < 1.0
        assert row["ce_zero"] > row["ce_clean"] and 0.0 < row["ce_loss_score"] <= 1.0 + 1e-6
    assert set(load_sparse_coders(out / "export")) == set(rows)


def test_resume_continues_exactly(small_world, tmp_path):
    """N steps in one go == N/2 steps, then resume from last.ckpt to N (same weights, bit-exact)."""
    common = ["hookpoints=[layers.0]", "checkpoint_every=5", "data.shuffle_buffer=3",
              "coder.dead_after_tokens=300"]
    full, half = tmp_path / "full", tmp_path / "half"
    assert run_job("sae", sparse_job_overrides(small_world, full, *common, "trainer.max_steps=10")) == 0
    assert run_job("sae", sparse_job_overrides(small_world, half, *common, "trainer.max_steps=5")) == 0
    at_half = _checkpoint_coders(half / "checkpoints" / "last.ckpt")
    assert run_job("sae", sparse_job_overrides(small_world, half, *common, "trainer.max_steps=10",
                                     "resume=last")) == 0
    assert json.loads((half / "summary.json").read_text())[0]["steps"] == 10
    assert not torch.equal(at_half["coders.layers/0.W_dec"],
                           _checkpoint_coders(half / "checkpoints" / "last.ckpt")["coders.layers/0.W_dec"])
    assert (half / "csv" / "metrics.csv").is_file()  # the first part's log is kept
    a = _checkpoint_coders(full / "checkpoints" / "last.ckpt")
    b = _checkpoint_coders(half / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    first = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert int(first["tokens_seen"]) > 0 and bool(first["initialized"])


def test_two_process_cpu_ddp_keeps_replicas_identical(small_world, tmp_path):
    out = tmp_path / "ddp"
    args = sparse_job_overrides(small_world, out, "hookpoints=[layers.1]", "trainer.max_steps=12",
                      "trainer.devices=2", "trainer.strategy=ddp", "dump_rank_weights=true")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_RANK", None)
    result = subprocess.run([sys.executable, str(REPO / "train_sae.py"), *args], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (load_file(out / "ranks" / f"rank{r}.safetensors") for r in range(2))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        if key != "train_microseconds":  # each rank's own wall clock
            assert torch.equal(rank0[key], rank1[key]), key
    # Both ranks trained on different data but hold the same coder, which is the export.
    exported = load_sparse_coders(out / "export")["layers.1"].state_dict()
    for name, tensor in exported.items():
        assert torch.equal(tensor, rank0[f"coders.layers/1.{name}"])
    # Tokens are counted over both ranks: every training position of both ranks' 12 batches.
    summary = json.loads((out / "summary.json").read_text())[0]
    dm = TokenDataModule(small_world.load_tokenizer(), path=str(small_world.corpus_path), packing=False,
                         batch_size=16, val_sequences=32, seed=0)
    dm.setup()
    expected = 0
    for rank in range(2):
        dataset = dm.train_dataset(rank=rank, world_size=2)
        for step in range(12):
            batch = dataset.batch(step)
            expected += int(training_positions(batch["input_ids"], batch["attention_mask"], dm.tokenizer.bos_token_id).sum())
    assert summary["steps"] == 12 and summary["tokens_seen"] == expected
    assert "| layers.1 |" in result.stdout
