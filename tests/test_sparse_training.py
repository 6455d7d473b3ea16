"""Training sparse coders end to end on the small world: the token stream, the Lightning module,
the `sae` / `transcoder` jobs, two-process CPU DDP and exact resume."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datamodules.tokens import StepBatches, TokenDataModule, tokenize_rows
from lightning_edit.cli import run_job
from lightning_edit.sparse import load_sparse_coders
from modules.sparse_coder_module import SparseCoderModule, TokenShuffle, training_positions

REPO = Path(__file__).resolve().parents[1]


def _overrides(world, out: Path, *extra: str) -> list[str]:
    """A tiny, quick run on the small world (2 layers, hidden 64)."""
    return [
        f"model.name={world.model_dir}",
        f"data.path={world.corpus_path}",
        "data.packing=false",
        "data.batch_size=16",
        "data.val_sequences=32",
        "data.shuffle_buffer=2",
        "coder.expansion_factor=8",
        "coder.k=16",
        "coder.dead_after_tokens=2000",
        "logger=csv",
        "threads=1",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1",
        f"output_dir={out}",
        *extra,
    ]


def _train_log(out: Path, key: str) -> list[float]:
    with open(out / "csv" / "metrics.csv") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def _checkpoint_coders(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("coders.")}


# --- unit pieces -----------------------------------------------------------------------------------


def test_training_positions_drop_bos_and_padding():
    ids = torch.tensor([[1, 5, 6, 7, 0, 0], [1, 8, 9, 1, 4, 2]])
    attention = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    mask = training_positions(ids, attention, bos_token_id=1)
    assert mask.tolist() == [
        [False, True, True, True, False, False],
        [False, True, True, False, True, True],
    ]
    assert training_positions(ids, None, bos_token_id=None).all()


def test_shards_disjoint_and_cover_every_row(small_world):
    """Two ranks x two workers: each row of an epoch goes to exactly one (rank, worker)."""
    tokenizer = small_world.load_tokenizer()
    dm = TokenDataModule(tokenizer, path=str(small_world.corpus_path), packing=False, batch_size=8,
                         val_sequences=16, seed=3)
    dm.setup()
    n_rows = len(dm.train_ids)
    steps_per_epoch = n_rows // (8 * 2)
    seen: dict[tuple[int, int], list[int]] = {}
    for rank in range(2):
        dataset = dm.train_dataset(rank=rank, world_size=2, stop=steps_per_epoch)
        for worker in range(2):
            rows = [dataset.batch(s)["rows"] for s in dataset.steps(worker, 2)]
            seen[rank, worker] = torch.cat(rows).tolist()
    everything = [r for rows in seen.values() for r in rows]
    assert len(everything) == len(set(everything)) == steps_per_epoch * 16
    assert len(set(everything)) >= n_rows - 16  # all but the epoch's last partial batches
    # A real DataLoader with two workers yields the steps in order, whatever the worker count.
    loader = dm.train_dataloader()
    dataset = dm.train_dataset(rank=1, world_size=2, start=5, stop=11)
    from torch.utils.data import DataLoader

    batches = list(DataLoader(dataset, batch_size=None, num_workers=2))
    assert [b["step"] for b in batches] == list(range(5, 11))
    for b in batches:
        assert torch.equal(b["rows"], dataset.batch(b["step"])["rows"])
    assert loader.batch_size is None
    # Validation rows are held out of the training rows.
    assert len(dm.val_ids) == 16 and n_rows + 16 == len(small_world.corpus_path.read_text().split("\n")) - 1


def test_rows_and_shuffle_are_deterministic(small_world):
    tokenizer = small_world.load_tokenizer()
    docs = small_world.corpus_path.read_text().splitlines()[:50]
    ids, lengths = tokenize_rows(docs, tokenizer, context_length=16, packing=True)
    assert (lengths == 16).all() and (ids[:, 0] == tokenizer.bos_token_id).all()
    assert (ids == tokenizer.eos_token_id).any()  # documents separated by EOS
    a = StepBatches(ids, lengths, 4, seed=0)
    assert torch.equal(a.batch(7)["input_ids"], StepBatches(ids, lengths, 4, seed=0).batch(7)["input_ids"])
    # Each batch's tokens are spread over K steps, exactly once.
    shuffle = TokenShuffle(3, seed=0)
    for step in range(4):
        x = torch.arange(10.0).unsqueeze(1) + 100 * step
        shuffle.add(step, {"h": (x, None)})
    got = torch.cat([shuffle.pop(s)["h"][0] for s in range(4)]).flatten().tolist()
    assert len(got) == len(set(got)) and {v for v in got if v < 200} == set(range(10)) | set(range(100, 110))


def test_one_forward_feeds_every_hookpoint(small_world):
    model = small_world.load_model()
    tokenizer = small_world.load_tokenizer()
    module = SparseCoderModule(model, ["layers.*"], coder={"expansion_factor": 2, "k": 4},
                               bos_token_id=tokenizer.bos_token_id)
    assert module.hookpoints == ["layers.0", "layers.1"]
    calls = []
    handle = model.register_forward_pre_hook(lambda *a, **k: calls.append(1))
    batch = tokenizer(["alpha beta", "gamma"], return_tensors="pt", padding=True)
    acts, n = module.collect_activations(dict(batch))
    handle.remove()
    assert len(calls) == 1 and set(acts) == {"layers.0", "layers.1"}
    assert n == int(batch["attention_mask"].sum()) - 2  # BOS of each row dropped
    assert all(x.shape == (n, 64) for x, _ in acts.values())
    # The LM is not part of the module: not in its state dict, not among its parameters.
    assert all(k.startswith(("coders.", "trackers.", "initialized", "tokens_seen", "train_micro"))
               for k in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == sum(
        p.numel() for p in module.coders.parameters())


# --- jobs ------------------------------------------------------------------------------------------


def test_sae_job_trains_exports_and_reports(small_world, tmp_path, capsys):
    out = tmp_path / "sae"
    rc = run_job("sae", _overrides(small_world, out, "hookpoints=[layers.1]", "trainer.max_steps=40",
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
    rc = run_job("transcoder", _overrides(small_world, out, "hookpoints=[layers.*.mlp]",
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
    assert run_job("sae", _overrides(small_world, full, *common, "trainer.max_steps=10")) == 0
    assert run_job("sae", _overrides(small_world, half, *common, "trainer.max_steps=5")) == 0
    at_half = _checkpoint_coders(half / "checkpoints" / "last.ckpt")
    assert run_job("sae", _overrides(small_world, half, *common, "trainer.max_steps=10",
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
    args = _overrides(small_world, out, "hookpoints=[layers.1]", "trainer.max_steps=12",
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


def test_documents_from_txt_jsonl_parquet_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datamodules.tokens import read_documents

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "d" / "b.jsonl").write_text('{"body": "three"}\n{"body": "four"}\n')
    pq.write_table(pa.table({"body": ["five"]}), tmp_path / "d" / "c.parquet")
    assert read_documents(tmp_path / "d" / "a.txt") == ["one", "two"]
    assert read_documents(tmp_path / "d", text_field="body") == ["one", "two", "three", "four", "five"]
    with pytest.raises(ValueError, match="b.jsonl:1: no field 'text'"):
        read_documents(tmp_path / "d" / "b.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_documents(tmp_path / "missing.txt")


def test_streamed_dataset_follows_the_same_step_schedule(small_world, tmp_path):
    """A `datasets` stream (here over a local .jsonl) holds out validation rows and resumes at any step."""
    corpus = tmp_path / "corpus.jsonl"
    lines = small_world.corpus_path.read_text().splitlines()[:300]
    corpus.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    dm = TokenDataModule(small_world.load_tokenizer(), path=str(corpus), streaming=True,
                         context_length=16, batch_size=4, val_sequences=8)
    dm.setup()
    assert dm.packing and dm.val_ids.shape == (8, 16)
    run = list(dm.train_dataset(rank=1, world_size=2, start=3, stop=6))
    resumed = list(dm.train_dataset(rank=1, world_size=2, start=4, stop=6))
    assert [b["step"] for b in run] == [3, 4, 5]
    assert torch.equal(run[1]["input_ids"], resumed[0]["input_ids"])
    other_rank = list(dm.train_dataset(rank=0, world_size=2, start=3, stop=4))
    assert not torch.equal(other_rank[0]["input_ids"], run[0]["input_ids"])


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
