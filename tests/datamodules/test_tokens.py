"""The token stream for sparse-coder training (datamodules/tokens.py): shards, deterministic rows and
shuffles, documents from files and folders, streaming."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules.tokens import StepBatches, TokenDataModule, tokenize_rows
from modules.sparse_coder_module import TokenShuffle


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
