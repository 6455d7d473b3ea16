"""The on-disk activation cache (lightning_edit/sparse/activation_cache.py): shards built once each and
split over ranks, rows read back in order, one folder per key, bfloat16 kept."""

from __future__ import annotations

import shutil

import torch

from lightning_edit.sparse.activation_cache import ActivationCache
from modules.sparse_coder_module import training_positions


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
