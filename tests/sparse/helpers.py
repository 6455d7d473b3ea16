"""Tiny coders and batches for the sparse tests."""

from __future__ import annotations

import torch

from lightning_edit.sparse import SparseCoderConfig, TopKSparseCoder


D_IN, N_LATENTS, K = 16, 64, 4


def make_sae(**overrides) -> TopKSparseCoder:
    torch.manual_seed(0)
    return TopKSparseCoder(SparseCoderConfig(d_in=D_IN, num_latents=N_LATENTS, k=K, **overrides))


def make_transcoder(**overrides) -> TopKSparseCoder:
    torch.manual_seed(0)
    cfg = SparseCoderConfig(
        d_in=D_IN, d_out=12, num_latents=N_LATENTS, k=K, mode="transcoder", **overrides
    )
    return TopKSparseCoder(cfg)


def batch(n=64, d=D_IN, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 2 + 0.5


def _trained_like(coder: TopKSparseCoder) -> TopKSparseCoder:
    with torch.no_grad():
        for p in coder.parameters():
            p.normal_()
    return coder


def _assert_same(a: TopKSparseCoder, b: TopKSparseCoder):
    assert a.cfg == b.cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
