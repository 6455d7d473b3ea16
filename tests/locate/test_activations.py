"""Activations at sites and positions (lightning_edit.locate.activations), coder latents."""

from __future__ import annotations

import torch

from lightning_edit.locate import activations
from lightning_edit.models import ModelAdapter

from tests.locate.helpers import FakeCoder, PROMPTS, manual_ffn_hidden


def test_activations_equal_manual_mlp(arch_model, tok):
    arch, model = arch_model
    adapter = ModelAdapter(model)
    layer = 1
    manual = [manual_ffn_hidden(arch, model, tok, p, layer) for p in PROMPTS]
    last = activations(model, tok, adapter, layer, PROMPTS, position="last", batch_size=3)
    assert last.shape == (len(PROMPTS), 64)
    torch.testing.assert_close(last, torch.stack([m[-1] for m in manual]), atol=1e-5, rtol=1e-5)
    everything = activations(model, tok, adapter, layer, PROMPTS, position="all", batch_size=2)
    for got, want in zip(everything, manual):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    subj = activations(model, tok, adapter, layer, PROMPTS, position="subject_last",
                       subjects=["france", None, "x y z", "sky"])
    index = [4, -1, 3, 1]
    torch.testing.assert_close(subj, torch.stack([m[i] for m, i in zip(manual, index)]), atol=1e-5, rtol=1e-5)


def test_coder_latents(llama, tok):
    adapter = ModelAdapter(llama)
    torch.manual_seed(1)
    coder = FakeCoder(32, 48, 4)
    x = activations(llama, tok, adapter, 0, PROMPTS, site="mlp_input")
    z = activations(llama, tok, adapter, 0, PROMPTS, site="coder_latents", coder=coder)
    acts, idx = coder.encode(x)
    want = torch.zeros(len(PROMPTS), 48).scatter(-1, idx, acts)
    torch.testing.assert_close(z, want.detach())
    assert ((z != 0).sum(-1) <= 4).all()
