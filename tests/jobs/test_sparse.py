"""The `sae` / `transcoder` jobs (lightning_edit.jobs.sparse) end to end on the small world: export and
report, two hookpoints and transcoders, exact resume, two-process CPU DDP with an activation cache, the
cache built and reused, corpus mistakes (exit 2), the flag on a meaningless ce_loss_score and the
weights-only resume."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datamodules.tokens import TokenDataModule, make_batch
from lightning_edit.cli import run_job
from lightning_edit.jobs.sparse import markdown_table
from lightning_edit.sparse import ce_loss_score, load_sparse_coders
from lightning_edit.sparse.activation_cache import ActivationCache
from modules.sparse_coder_module import SparseCoderModule, training_positions

from tests.helpers import corpus_files, sparse_job_overrides


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
    """Two real processes (gloo), the LM's activations cached on disk: each rank computes its
    shards of the cache, both train from all of it."""
    out = tmp_path / "ddp"
    args = sparse_job_overrides(small_world, out, "hookpoints=[layers.1]", "trainer.max_steps=12",
                                "trainer.devices=2", "trainer.strategy=ddp", "dump_rank_weights=true",
                                f"data.activation_cache={tmp_path / 'acts'}")
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
    assert summary["activation_cache"].startswith("built")
    (manifest,) = (tmp_path / "acts").glob("*/manifest.json")
    assert len(list(manifest.parent.glob("shard-*/offsets.npy"))) == -(-json.loads(manifest.read_text())["n_rows"] // 1024)
    assert "| layers.1 |" in result.stdout


def test_sae_job_with_activation_cache(small_world, tmp_path, capsys):
    """The first run builds the cache, the second reuses it (no LM forward for training) and trains
    the same coder bit for bit; the cached activations are the LM's."""
    cache_root = tmp_path / "acts"
    common = ["data.packing=auto", "hookpoints=[layers.0,layers.1]",
              "trainer.max_steps=15", f"data.activation_cache={cache_root}"]
    assert run_job("sae", sparse_job_overrides(small_world, tmp_path / "a", *common)) == 0
    err = capsys.readouterr().err
    assert "data.packing=auto: not packing" in err and "activation cache: computing" in err
    assert run_job("sae", sparse_job_overrides(small_world, tmp_path / "b", *common)) == 0
    err = capsys.readouterr().err
    assert "activation cache: reused" in err and "computing" not in err
    a, b = (load_sparse_coders(tmp_path / run / "export") for run in ("a", "b"))
    for hp in ("layers.0", "layers.1"):
        for name, tensor in a[hp].state_dict().items():
            assert torch.equal(tensor, b[hp].state_dict()[name]), (hp, name)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary[0]["activation_cache"].startswith("reused") and summary[0]["packing"] is False
    # The cache holds what the LM gives for those rows.
    (folder,) = [p.parent for p in cache_root.glob("*/manifest.json")]
    cache = ActivationCache.from_dir(folder)
    tokenizer = small_world.load_tokenizer()
    dm = TokenDataModule(tokenizer, path=str(small_world.corpus_path), batch_size=16, val_sequences=32)
    dm.setup()
    module = SparseCoderModule(small_world.load_model(), ["layers.0", "layers.1"], coder={"expansion_factor": 2, "k": 4},
                               bos_token_id=tokenizer.bos_token_id)
    rows = torch.tensor([5, 0, 17, 3])
    direct, n = module.collect_activations(make_batch(dm.train_ids[rows], dm.train_lengths[rows]))
    cached, m = cache.read(rows)
    assert n == m > 0
    for hp in direct:
        torch.testing.assert_close(cached[hp][0], direct[hp][0], rtol=1e-5, atol=1e-5)
    # Other hookpoints: another cache folder; the first one is reported and left alone.
    assert run_job("sae", sparse_job_overrides(small_world, tmp_path / "c", *common[:1], "hookpoints=[layers.1]",
                                               "trainer.max_steps=2", f"data.activation_cache={cache_root}")) == 0
    err = capsys.readouterr().err
    assert f"{folder} was built for another hookpoints" in err and len(list(cache_root.glob("*/manifest.json"))) == 2


def test_corpus_mistakes_exit_2_and_write_nothing(small_world, tmp_path, capsys):
    corpus_files(tmp_path / "data")
    (tmp_path / "data" / "blank.txt").write_text("\n\n")
    capsys.readouterr()  # datasets' save_to_disk progress
    cases = {
        "data.path=" + str(tmp_path / "data" / "nope.txt"): "does not exist",
        "data.path=" + str(tmp_path / "data" / "docs.jsonl"): "no field 'text' (data.text_field)",
        "data.path=" + str(tmp_path / "data" / "docs.parquet"): "no column 'text' (data.text_field)",
        "data.path=" + str(tmp_path / "data" / "blank.txt"): "no documents (the corpus is empty)",
    }
    for override, message in cases.items():
        out = tmp_path / "run"
        assert run_job("sae", sparse_job_overrides(small_world, out, override, "trainer.max_steps=2")) == 2
        err = capsys.readouterr().err.strip().splitlines()  # (transformers' weight-loading bar aside)
        errors = [line for line in err if line.startswith("error: ")]
        assert errors == err[-1:] and message in errors[0] and "Traceback" not in "".join(err), err
        assert not out.exists()


def test_summary_table_marks_a_meaningless_ce_loss_score():
    flagged = ce_loss_score(2.0, 1.9, 4.0, vocab_size=500)  # score 1.05: better than the clean LM
    row = {"hookpoint": "layers.3", "fvu": 0.1, "l0": 32.0, "dead_frac": 0.0, "ce_clean": 2.0,
           "ce_spliced": 1.9, "ce_zero": 4.0, "ce_loss_score": flagged.score,
           "ce_loss_score_meaningful": False, "ce_loss_score_note": flagged.note,
           "tokens_seen": 10, "tokens_per_s": 1.0, "files": "x"}
    table = markdown_table([row, {**row, "hookpoint": "layers.4", "ce_loss_score_meaningful": True}])
    assert "| layers.3 | 0.1000 | 32.0 | 0.0% | 1.050 (!) |" in table and "| 1.050 |" in table
    assert table.splitlines()[-1] == f"(!) layers.3: ce_loss_score is not meaningful: {flagged.note}"


def test_job_flags_a_score_on_text_the_model_does_not_fit(small_world, tmp_path, capsys):
    """Random words from the world's vocabulary: the LM's clean CE is above uniform, and the printed
    table, the logged metrics and summary.json all say the score means nothing."""
    rng = random.Random(0)
    words = sorted(set(small_world.corpus_path.read_text().split()))
    (tmp_path / "noise.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)))
    out = tmp_path / "run"
    assert run_job("sae", sparse_job_overrides(small_world, out, f"data.path={tmp_path / 'noise.txt'}",
                                               "hookpoints=[layers.0]", "trainer.max_steps=10")) == 0
    printed = capsys.readouterr().out
    (row,) = json.loads((out / "summary.json").read_text())
    assert row["ce_clean"] > row["ce_uniform"] == pytest.approx(math.log(small_world.load_model().config.vocab_size))
    assert row["ce_loss_score_meaningful"] is False and "above the uniform entropy" in row["ce_loss_score_note"]
    assert " (!) |" in printed and "(!) layers.0: ce_loss_score is not meaningful: clean CE" in printed
    with open(out / "csv" / "metrics.csv") as f:
        logged = [float(r["val/layers.0/ce_loss_score_meaningful"]) for r in csv.DictReader(f)
                  if r.get("val/layers.0/ce_loss_score_meaningful")]
    assert logged and logged[-1] == 0.0


class _Payload:
    """Pickles as a call to print: what a weights-only load must refuse to run."""

    def __reduce__(self):
        return (print, ("payload ran",))


def test_resume_refuses_a_checkpoint_that_needs_unpickling(small_world, tmp_path, capsys):
    torch.save({"state_dict": {}, "extra": _Payload()}, tmp_path / "bad.ckpt")
    out = tmp_path / "run"
    rc = run_job("sae", sparse_job_overrides(small_world, out, "trainer.max_steps=2", f"resume={tmp_path / 'bad.ckpt'}"))
    captured = capsys.readouterr()
    assert rc == 2 and not out.exists() and "payload ran" not in captured.out + captured.err
    (line,) = [x for x in captured.err.splitlines() if x.startswith("error: ")]
    assert "does not load as a checkpoint with weights_only=True" in line and "Unsupported global" in line
