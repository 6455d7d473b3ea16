"""The sparse-coder trainer's data: corpus sources, the packing rule, sharding of packed rows, the
activation cache, the error contract of the job, and the flags on a meaningless ce_loss_score."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.tokens import (
    CorpusError,
    TokenDataModule,
    encode_documents,
    make_batch,
    packing_rule,
    read_documents,
    tokenize_rows,
)
from lightning_edit.cli import run_job
from lightning_edit.jobs.sparse import markdown_table
from lightning_edit.sparse import ce_loss_score, load_sparse_coders
from lightning_edit.sparse.activation_cache import ActivationCache
from modules.sparse_coder_module import SparseCoderModule, training_positions

DOCS = ["the cat sat on the mat", "a dog ran", "birds fly south in winter", "rain"]


def _world_lines(world, n: int | None = None) -> list[str]:
    lines = [line for line in world.corpus_path.read_text().splitlines() if line.strip()]
    return lines if n is None else lines[:n]


def _corpus_files(root: Path) -> dict[str, Path]:
    """One small real file of every kind, each holding DOCS (the text under another name in each)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    (root / "lines.txt").write_text("\n".join(DOCS[:2]) + "\n\n" + "\n".join(DOCS[2:]) + "\n")
    (root / "whole.txt").write_text("\n".join(DOCS) + "\n")
    (root / "docs.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    pq.write_table(pa.table({"content": DOCS, "n": list(range(4))}), root / "docs.parquet")
    ds = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(4))})
    ds.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(root / "saved_dict"))
    return {k: root / k for k in ("lines.txt", "whole.txt", "docs.jsonl", "docs.parquet", "saved", "saved_dict")}


# --- sources ---------------------------------------------------------------------------------------


def test_every_source_kind_reads_the_same_documents(tmp_path):
    files = _corpus_files(tmp_path)
    assert read_documents(files["lines.txt"]) == DOCS  # a document per non-empty line
    assert read_documents(files["whole.txt"], txt_documents="file") == ["\n".join(DOCS) + "\n"]
    assert read_documents(files["docs.jsonl"], text_field="body") == DOCS
    assert read_documents(files["docs.parquet"], text_field="content") == DOCS
    assert read_documents(files["saved"]) == DOCS
    assert read_documents(files["saved_dict"], split="validation") == DOCS


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("missing.jsonl", {}, r"data\.path '.*missing\.jsonl' does not exist"),
        ("docs.jsonl", {"text_field": "text"}, r"docs\.jsonl:1: no field 'text' \(data\.text_field\); fields: \['body', 'id'\]"),
        ("docs.parquet", {"text_field": "body"}, r"docs\.parquet: no column 'body' \(data\.text_field\); columns: \['content', 'n'\]"),
        ("docs.parquet", {"text_field": "n"}, r"column 'n' holds int64, expected text"),
        ("saved", {"text_field": "body"}, r"saved: no column 'body' \(data\.text_field\); columns: \['text', 'n'\]"),
        ("saved_dict", {"split": "train"}, r"saved_dict: no split 'train' \(data\.split\); splits: \['validation'\]"),
        ("docs.jsonl", {"text_field": "id"}, r"docs\.jsonl:1: field 'id' holds int, expected text"),
    ],
)
def test_source_mistakes_are_one_line_naming_the_field(tmp_path, name, kwargs, message):
    _corpus_files(tmp_path)
    with pytest.raises(CorpusError, match=message) as err:
        read_documents(tmp_path / name, **kwargs)
    assert "\n" not in str(err.value)


def test_empty_corpus_is_an_error(tmp_path, small_world):
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    dm = TokenDataModule(small_world.load_tokenizer(), path=str(tmp_path / "blank.txt"))
    with pytest.raises(CorpusError, match=r"blank\.txt: no documents \(the corpus is empty\)"):
        dm.setup()


# --- packing ---------------------------------------------------------------------------------------


def test_packing_rule_from_document_lengths():
    short = np.full(1000, 12)  # one sentence per line, context 64: nothing truncated
    pack, note = packing_rule(short, 64)
    assert not pack and "not packing" in note and "median" in note and "0.0%" in note
    long = np.full(100, 400)  # every document longer than the context: most tokens would be cut
    pack, note = packing_rule(long, 64)
    assert pack and "84.0%" in note
    # The rule is about the share of tokens lost: 5% of documents 10x the context is > 10% of tokens.
    mixed = np.concatenate([np.full(95, 20), np.full(5, 640)])
    assert packing_rule(mixed, 64)[0] and not packing_rule(mixed, 1024)[0]


def test_world_corpus_is_not_packed_by_default_and_a_whole_file_is(small_world, tmp_path):
    tokenizer = small_world.load_tokenizer()
    dm = TokenDataModule(tokenizer, path=str(small_world.corpus_path), context_length=64, val_sequences=8)
    dm.setup()
    assert dm.packing is False and dm.packing_note.startswith("data.packing=auto: not packing")
    assert (dm.train_lengths < 64).all()  # one sentence per row
    one_doc = tmp_path / "book.txt"
    one_doc.write_text(small_world.corpus_path.read_text())
    dm = TokenDataModule(tokenizer, path=str(one_doc), txt_documents="file", context_length=64, val_sequences=8)
    dm.setup()
    assert dm.packing is True and "data.packing=auto: packing" in dm.packing_note
    assert (dm.train_lengths == 64).all()
    forced = TokenDataModule(tokenizer, path=str(small_world.corpus_path), packing=True, val_sequences=8)
    forced.setup()
    assert forced.packing is True and forced.packing_note is None
    with pytest.raises(CorpusError, match="data.packing must be true, false or auto, got 'sometimes'"):
        TokenDataModule(tokenizer, packing="sometimes")


def test_packed_rows_sharded_over_two_ranks_are_disjoint_and_cover_the_corpus(small_world, tmp_path):
    """A packed .jsonl corpus, 2 ranks x 2 workers over one epoch: every training row goes to exactly
    one (rank, worker), and the rows hold the corpus's tokens, EOS-separated, in order."""
    tokenizer = small_world.load_tokenizer()
    docs = _world_lines(small_world, 600)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    dm = TokenDataModule(tokenizer, path=str(tmp_path / "c.jsonl"), packing=True, context_length=16,
                         batch_size=4, val_sequences=10, seed=5)
    dm.setup()
    n_rows, batch, ranks, workers = len(dm.train_ids), 4, 2, 2
    steps = n_rows // (batch * ranks)
    seen = {}
    for rank in range(ranks):
        dataset = dm.train_dataset(rank=rank, world_size=ranks, stop=steps)
        for worker in range(workers):
            seen[rank, worker] = torch.cat([dataset.batch(s)["rows"] for s in dataset.steps(worker, workers)]).tolist()
    everything = [r for rows in seen.values() for r in rows]
    assert len(everything) == len(set(everything)) == steps * batch * ranks
    assert n_rows - len(set(everything)) < batch * ranks  # only the epoch's last partial step is left
    assert all(seen[key] for key in seen)  # every (rank, worker) got rows
    # Train + validation rows are exactly the packed corpus: BOS + 15 tokens of the EOS-joined stream.
    ids, _ = tokenize_rows(docs, tokenizer, 16, packing=True)
    table = torch.cat([dm.train_ids, dm.val_ids])
    as_set = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert as_set(table) == as_set(ids)
    flat, offsets = encode_documents(docs, tokenizer)
    stream = np.insert(flat, offsets[1:], tokenizer.eos_token_id)
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    assert np.array_equal(ids[:, 1:].reshape(-1).numpy(), stream[: ids.shape[0] * 15])


# --- activation cache ------------------------------------------------------------------------------


def _fake_rows(n_rows=10, width=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, width + 1, (n_rows,), generator=g)
    ids = torch.randint(5, 50, (n_rows, width), generator=g, dtype=torch.int64).to(torch.int32)
    ids[:, 0] = 1  # BOS
    return ids, lengths


def _fake_compute(ids, lengths, calls):
    """Activations that encode (row, position), so a wrong gather shows."""
    def compute(start, stop):
        calls.append((start, stop))
        xs, counts = [], []
        for r in range(start, stop):
            mask = training_positions(ids[r : r + 1], (torch.arange(ids.shape[1]) < lengths[r]).unsqueeze(0), 1)[0]
            pos = mask.nonzero().squeeze(1)
            xs.append(torch.stack([torch.full_like(pos, r), pos], dim=1).float())
            counts.append(len(pos))
        x = torch.cat(xs)
        return {"h": (x, None), "g": (x * 2, x + 1)}, torch.tensor(counts)
    return compute


def test_activation_cache_builds_once_per_shard_and_reads_rows_in_order(tmp_path):
    ids, lengths = _fake_rows()
    key = {"model": "m1", "corpus": "c.txt", "rows": "r1", "hookpoints": ["h", "g"], "mode": "sae"}
    calls: list = []
    cache = ActivationCache(tmp_path, key, n_rows=10, shard_rows=3)
    assert cache.missing_shards() == [0, 1, 2, 3]
    cache.write_manifest({"h": (2, None), "g": (2, 2)}, torch.float32)
    # Two ranks build disjoint shards (rank r: shards i % 2 == r), together all of them.
    assert cache.build(_fake_compute(ids, lengths, calls), rank=1, world_size=2) == 2
    assert calls == [(3, 6), (9, 10)] and cache.missing_shards() == [0, 2]
    assert cache.build(_fake_compute(ids, lengths, calls), rank=0, world_size=2) == 2
    assert cache.missing_shards() == []
    rows = torch.tensor([7, 0, 9, 3, 3])
    acts, n = cache.read(rows)
    expected = torch.cat([_fake_compute(ids, lengths, [])(r, r + 1)[0]["h"][0] for r in rows.tolist()])
    assert n == len(expected) and torch.equal(acts["h"][0], expected) and acts["h"][1] is None
    assert torch.equal(acts["g"][0], expected * 2) and torch.equal(acts["g"][1], expected + 1)
    # The same key again: nothing to compute; read back through its folder alone.
    again = ActivationCache(tmp_path, key, n_rows=10, shard_rows=3)
    calls.clear()
    assert again.build(_fake_compute(ids, lengths, calls)) == 0 and calls == []
    assert torch.equal(ActivationCache.from_dir(cache.dir).read(rows)[0]["h"][0], expected)
    # An interrupted build leaves whole shards only; the next build computes just the missing one.
    import shutil

    shutil.rmtree(cache.shard_dir(2))
    assert again.build(_fake_compute(ids, lengths, calls)) == 1 and calls == [(6, 9)]
    # Another model or other hookpoints: another folder, the old one reported and not read.
    for change in ({"model": "m2"}, {"hookpoints": ["h"]}):
        other = ActivationCache(tmp_path, {**key, **change}, n_rows=10, shard_rows=3)
        assert other.dir != cache.dir and other.missing_shards() == [0, 1, 2, 3]
        (reported,) = other.other_caches()
        assert str(cache.dir) in reported and next(iter(change)) in reported


def test_bfloat16_activations_round_trip(tmp_path):
    cache = ActivationCache(tmp_path, {"hookpoints": ["h"]}, n_rows=2, shard_rows=2)
    cache.write_manifest({"h": (3, None)}, torch.bfloat16)
    x = torch.randn(5, 3).to(torch.bfloat16)
    cache.build(lambda a, b: ({"h": (x, None)}, torch.tensor([2, 3])))
    got, n = cache.read(torch.tensor([1, 0]))
    assert n == 5 and got["h"][0].dtype == torch.bfloat16 and torch.equal(got["h"][0], torch.cat([x[2:], x[:2]]))


def _job(world, out: Path, *extra: str) -> list[str]:
    return [f"model.name={world.model_dir}", "data.batch_size=16", "data.val_sequences=32",
            "data.shuffle_buffer=2", "coder.expansion_factor=8", "coder.k=16", "coder.dead_after_tokens=2000",
            "logger=csv", "threads=1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1", f"output_dir={out}", *extra]


def test_sae_job_with_activation_cache(small_world, tmp_path, capsys):
    """The first run builds the cache, the second reuses it (no LM forward for training) and trains
    the same coder bit for bit; the cached activations are the LM's."""
    cache_root = tmp_path / "acts"
    common = [f"data.path={small_world.corpus_path}", "hookpoints=[layers.0,layers.1]",
              "trainer.max_steps=15", f"data.activation_cache={cache_root}"]
    assert run_job("sae", _job(small_world, tmp_path / "a", *common)) == 0
    err = capsys.readouterr().err
    assert "data.packing=auto: not packing" in err and "activation cache: computing" in err
    assert run_job("sae", _job(small_world, tmp_path / "b", *common)) == 0
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
    assert run_job("sae", _job(small_world, tmp_path / "c", *common[:1], "hookpoints=[layers.1]",
                               "trainer.max_steps=2", f"data.activation_cache={cache_root}")) == 0
    err = capsys.readouterr().err
    assert f"{folder} was built for another hookpoints" in err and len(list(cache_root.glob("*/manifest.json"))) == 2


# --- the job's error contract ----------------------------------------------------------------------


def test_corpus_mistakes_exit_2_and_write_nothing(small_world, tmp_path, capsys):
    _corpus_files(tmp_path / "data")
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
        assert run_job("sae", _job(small_world, out, override, "trainer.max_steps=2")) == 2
        err = capsys.readouterr().err.strip().splitlines()  # (transformers' weight-loading bar aside)
        errors = [line for line in err if line.startswith("error: ")]
        assert errors == err[-1:] and message in errors[0] and "Traceback" not in "".join(err), err
        assert not out.exists()


# --- ce_loss_score flags ---------------------------------------------------------------------------


def test_ce_loss_score_flags():
    fine = ce_loss_score(1.1, 1.2, 9.0, vocab_size=500)
    assert fine.meaningful and fine.note is None and fine.score == pytest.approx(7.8 / 7.9)
    above_uniform = ce_loss_score(7.0, 7.2, 9.0, vocab_size=500)  # ln 500 = 6.21
    assert not above_uniform.meaningful and "above the uniform entropy ln(500) = 6.215" in above_uniform.note
    better_than_clean = ce_loss_score(2.0, 1.9, 4.0, vocab_size=500)  # score 1.05
    assert not better_than_clean.meaningful and "ce_loss_score 1.050 > 1.02" in better_than_clean.note
    assert ce_loss_score(2.0, 1.97, 4.0, vocab_size=500).meaningful  # 1.015: within noise
    flat = ce_loss_score(2.0, 2.1, 2.0, vocab_size=500)
    assert not flat.meaningful and math.isnan(flat.score) and "does not raise the CE" in flat.note
    row = {"hookpoint": "layers.3", "fvu": 0.1, "l0": 32.0, "dead_frac": 0.0, "ce_clean": 2.0,
           "ce_spliced": 1.9, "ce_zero": 4.0, "ce_loss_score": better_than_clean.score,
           "ce_loss_score_meaningful": False, "ce_loss_score_note": better_than_clean.note,
           "tokens_seen": 10, "tokens_per_s": 1.0, "files": "x"}
    table = markdown_table([row, {**row, "hookpoint": "layers.4", "ce_loss_score_meaningful": True}])
    assert "| layers.3 | 0.1000 | 32.0 | 0.0% | 1.050 (!) |" in table and "| 1.050 |" in table
    assert table.splitlines()[-1] == f"(!) layers.3: ce_loss_score is not meaningful: {better_than_clean.note}"


def test_job_flags_a_score_on_text_the_model_does_not_fit(small_world, tmp_path, capsys):
    """Random words from the world's vocabulary: the LM's clean CE is above uniform, and the printed
    table, the logged metrics and summary.json all say the score means nothing."""
    rng = random.Random(0)
    words = sorted(set(small_world.corpus_path.read_text().split()))
    (tmp_path / "noise.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)))
    out = tmp_path / "run"
    assert run_job("sae", _job(small_world, out, f"data.path={tmp_path / 'noise.txt'}", "hookpoints=[layers.0]",
                               "trainer.max_steps=10")) == 0
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
    rc = run_job("sae", _job(small_world, out, f"data.path={small_world.corpus_path}", "trainer.max_steps=2",
                             f"resume={tmp_path / 'bad.ckpt'}"))
    captured = capsys.readouterr()
    assert rc == 2 and not out.exists() and "payload ran" not in captured.out + captured.err
    (line,) = [x for x in captured.err.splitlines() if x.startswith("error: ")]
    assert "does not load as a checkpoint with weights_only=True" in line and "Unsupported global" in line
