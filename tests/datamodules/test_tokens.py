"""The token stream for sparse-coder training (datamodules/tokens.py): shards, deterministic rows and
shuffles, documents from files and folders (every source kind, one-line CorpusErrors), streaming, the
data.packing=auto rule and packed rows sharded over ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from datamodules.tokens import (
    CorpusError,
    StepBatches,
    TokenDataModule,
    encode_documents,
    packing_rule,
    read_documents,
    tokenize_rows,
)
from modules.sparse_coder_module import TokenShuffle

from tests.helpers import DOCS, corpus_files


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
    with pytest.raises(CorpusError, match="does not exist"):
        read_documents(tmp_path / "missing.txt")


def test_streamed_dataset_follows_the_same_step_schedule(small_world, tmp_path):
    """A `datasets` stream (here over a local .jsonl) holds out validation rows and resumes at any step."""
    corpus = tmp_path / "corpus.jsonl"
    lines = small_world.corpus_path.read_text().splitlines()[:300]
    corpus.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    dm = TokenDataModule(small_world.load_tokenizer(), path=str(corpus), streaming=True, packing=True,
                         context_length=16, batch_size=4, val_sequences=8)
    dm.setup()
    assert dm.packing and dm.val_ids.shape == (8, 16)
    run = list(dm.train_dataset(rank=1, world_size=2, start=3, stop=6))
    resumed = list(dm.train_dataset(rank=1, world_size=2, start=4, stop=6))
    assert [b["step"] for b in run] == [3, 4, 5]
    assert torch.equal(run[1]["input_ids"], resumed[0]["input_ids"])
    other_rank = list(dm.train_dataset(rank=0, world_size=2, start=3, stop=4))
    assert not torch.equal(other_rank[0]["input_ids"], run[0]["input_ids"])


# --- sources ---------------------------------------------------------------------------------------


def test_every_source_kind_reads_the_same_documents(tmp_path):
    files = corpus_files(tmp_path)
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
    corpus_files(tmp_path)
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


def test_packed_rows_sharded_over_two_ranks_are_disjoint_and_cover_the_corpus(small_world, small_corpus, tmp_path):
    """A packed .jsonl corpus, 2 ranks x 2 workers over one epoch: every training row goes to exactly
    one (rank, worker), and the rows hold the corpus's tokens, EOS-separated, in order."""
    tokenizer = small_world.load_tokenizer()
    docs = small_corpus[:600]
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
