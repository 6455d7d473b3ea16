"""Second moments and their cache (lightning_edit.locate.statistics)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightning_edit.locate import StatsCache, StatsMismatchError, activations, second_moment
from lightning_edit.models import ModelAdapter

from tests.locate.helpers import CORPUS, CountForwards, FakeCoder, TranscoderMLP


def test_second_moment_equals_direct(arch_model, tok):
    _, model = arch_model
    adapter = ModelAdapter(model)
    stats = second_moment(model, tok, adapter, 1, CORPUS, batch_size=4, cache=False, return_stats=True,
                          progress=False, dtype=torch.float64)
    rows = torch.cat([a[1:] for a in activations(model, tok, adapter, 1, CORPUS, position="all")]).double()
    assert stats.count == rows.shape[0] == sum(len(t.split()) for t in CORPUS)  # BOS excluded
    torch.testing.assert_close(stats.second_moment, rows.T @ rows / rows.shape[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats.mean, rows.mean(0), atol=1e-6, rtol=1e-5)


def test_second_moment_cache(llama, tok, tmp_path):
    adapter = ModelAdapter(llama)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    counter = CountForwards(llama)
    first = second_moment(llama, tok, adapter, 0, corpus, n_samples=5, batch_size=2, progress=False)
    assert counter.n == 3 and first.shape == (64, 64)
    files = sorted((tmp_path / "cache" / "stats").rglob("*"))
    assert [f.suffix for f in files if f.is_file()] == [".json", ".safetensors"]

    again = second_moment(llama, tok, adapter, 0, corpus, n_samples=5, batch_size=2, progress=False)
    assert counter.n == 3 and torch.equal(again, first)  # a hit: no forward at all

    # Editing the layer's own down projection leaves its keys, hence the cache, valid.
    with torch.no_grad():
        adapter.down_proj_weight(0)[:, 3] += 1.0
    assert torch.equal(second_moment(llama, tok, adapter, 0, corpus, n_samples=5, progress=False), first)
    assert counter.n == 3

    # A weight feeding the keys changed: the old file is rejected, naming itself and the field.
    gate = next(p for n, p in adapter.layer(0).named_parameters() if "mlp" in n and "down" not in n)
    with torch.no_grad():
        gate.mul_(1.5)
    with pytest.raises(StatsMismatchError, match=r"layer0-down_proj_input.*'weights'"):
        second_moment(llama, tok, adapter, 0, corpus, n_samples=5, progress=False)
    fresh = second_moment(llama, tok, adapter, 0, corpus, n_samples=5, progress=False, recompute=True)
    assert not torch.equal(fresh, first)
    assert torch.equal(second_moment(llama, tok, adapter, 0, corpus, n_samples=5, progress=False), fresh)

    # The corpus file changed on disk.
    os.utime(corpus, ns=(1, 1))
    with pytest.raises(StatsMismatchError, match=r"'corpus_version'"):
        second_moment(llama, tok, adapter, 0, corpus, n_samples=5, progress=False)
    counter.handle.remove()


def test_second_moment_cache_rejects_edited_sidecar_and_bad_shape(llama, tok, tmp_path):
    adapter = ModelAdapter(llama)
    cache = StatsCache(tmp_path / "stats")
    second_moment(llama, tok, adapter, 1, CORPUS, cache=cache, progress=False)
    [sidecar] = list((tmp_path / "stats").rglob("*.json"))
    tensors = sidecar.with_suffix(".safetensors")
    meta = json.loads(sidecar.read_text())
    meta["key"]["max_length"] = 7
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(StatsMismatchError) as err:
        second_moment(llama, tok, adapter, 1, CORPUS, cache=cache, progress=False)
    assert str(tensors) in str(err.value) and "'max_length'" in str(err.value)

    second_moment(llama, tok, adapter, 1, CORPUS, cache=cache, progress=False, recompute=True)
    save_file({"second_moment": torch.zeros(3, 3), "mean": torch.zeros(3)}, str(tensors))
    with pytest.raises(StatsMismatchError, match=r"'shape'"):
        second_moment(llama, tok, adapter, 1, CORPUS, cache=cache, progress=False)
    tensors.unlink()
    with pytest.raises(StatsMismatchError, match="has no statistics file"):
        second_moment(llama, tok, adapter, 1, CORPUS, cache=cache, progress=False)


def test_second_moment_of_coder_latents_and_storage_dtype(llama, tok):
    adapter = ModelAdapter(llama)
    torch.manual_seed(2)
    coder = FakeCoder(32, 48, 4)
    c = second_moment(llama, tok, adapter, 0, CORPUS, site="coder_latents", coder=coder, dtype=torch.bfloat16,
                      progress=False)
    assert c.shape == (48, 48) and c.dtype == torch.bfloat16
    z = torch.cat([a[1:] for a in activations(llama, tok, adapter, 0, CORPUS, position="all",
                                              site="coder_latents", coder=coder)])
    torch.testing.assert_close(c.float(), (z.T @ z / z.shape[0]).bfloat16().float())
    assert Path(os.environ["LIGHTNING_EDIT_CACHE"], "stats").is_dir()


def test_coder_statistics_survive_decoder_edits(llama, tok):
    adapter = ModelAdapter(llama)
    torch.manual_seed(3)
    coder = FakeCoder(32, 48, 4)
    counter = CountForwards(llama)
    with adapter.swap(adapter.mlp_name(1), TranscoderMLP(coder)):
        first = second_moment(llama, tok, adapter, 1, CORPUS, site="coder_latents", coder=coder, progress=False)
        with torch.no_grad():
            coder.W_dec.mul_(2.0)  # TCPE edits decoder columns: the latents, hence C, are unchanged
        assert torch.equal(second_moment(llama, tok, adapter, 1, CORPUS, site="coder_latents", coder=coder,
                                         progress=False), first)
        assert counter.n == 1
        with torch.no_grad():
            coder.encoder.weight.mul_(2.0)
        with pytest.raises(StatsMismatchError, match="'coder'"):
            second_moment(llama, tok, adapter, 1, CORPUS, site="coder_latents", coder=coder, progress=False)
    counter.handle.remove()


def test_two_in_memory_corpora_get_their_own_cache_files(llama, tok, tmp_path):
    adapter = ModelAdapter(llama)
    store = StatsCache(tmp_path)
    full = second_moment(llama, tok, adapter, 0, CORPUS, cache=store, progress=False)
    part = second_moment(llama, tok, adapter, 0, CORPUS[:2], cache=store, progress=False)  # no mismatch error
    assert not torch.equal(full, part)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2
    assert torch.equal(second_moment(llama, tok, adapter, 0, CORPUS[:2], cache=store, progress=False), part)
