"""Attribution (lightning_edit.locate.attribution): Input x Gradient, Integrated Gradients."""

from __future__ import annotations

import pytest
import torch

from lightning_edit.locate import Site, activations, input_x_gradient, integrated_gradients, patched_objective
from lightning_edit.models import ModelAdapter

from tests.locate.helpers import make_llama


def test_input_x_gradient_matches_finite_differences(tok):
    model = make_llama(len(tok)).double()
    adapter = ModelAdapter(model)
    prompt, target, layer = "the capital of france is", "paris", 0
    signed = input_x_gradient(model, tok, adapter, layer, prompt, target, signed=True)
    a = activations(model, tok, adapter, layer, [prompt])[0].double()
    eps = 1e-3  # Llama's RMSNorm computes in float32 even in a float64 model: not smaller
    for m in [0, 7, 31, 63]:
        bump = torch.zeros_like(a)
        bump[m] = eps
        up, down = patched_objective(model, tok, adapter, layer, prompt, target, torch.stack([a + bump, a - bump]),
                                     objective="logit")
        fd = a[m] * (up - down) / (2 * eps)
        assert signed[m].item() == pytest.approx(fd.item(), rel=1e-3, abs=1e-7)
    absolute = input_x_gradient(model, tok, adapter, layer, prompt, target)
    torch.testing.assert_close(absolute, signed.abs())


def test_integrated_gradients_completeness(trained, tok):
    adapter = ModelAdapter(trained)
    prompt, target, layer = "the capital of x y is", "city", 1
    attr = integrated_gradients(trained, tok, adapter, layer, prompt, target, steps=50)
    a = activations(trained, tok, adapter, layer, [prompt])
    full, base = patched_objective(trained, tok, adapter, layer, prompt, target, torch.cat([a, torch.zeros_like(a)]))
    gap = (full - base).item()
    assert abs(gap) > 0.1  # the check means something
    assert attr.sum().item() == pytest.approx(gap, rel=1e-2, abs=1e-3)
    chunked = integrated_gradients(trained, tok, adapter, layer, prompt, target, steps=50, batch_size=7)
    torch.testing.assert_close(chunked, attr, atol=1e-5, rtol=1e-4)


def test_attribution_at_subject_position_and_output_site(llama, tok):
    adapter = ModelAdapter(llama)
    prompt, subject, target = "x y z lives in", "x y z", "london"
    site = Site(adapter.mlp_name(0), "output")
    where = dict(site=site, position="subject_last", subject=subject)
    attr = integrated_gradients(llama, tok, adapter, 0, prompt, target, steps=64, **where)
    assert attr.shape == (32,)
    # The activation attributed is the MLP output at the subject's last token ("z": index 3 after BOS),
    # not at the prompt's last token.
    captured = {}
    handle = adapter.mlp(0).register_forward_hook(lambda m, args, out: captured.setdefault("out", out.detach()))
    with torch.no_grad():
        llama(input_ids=tok(prompt, return_tensors="pt")["input_ids"])
    handle.remove()
    a = activations(llama, tok, adapter, 0, [prompt], **{"site": site, "position": "subject_last",
                                                          "subjects": [subject]})
    torch.testing.assert_close(a[0], captured["out"][0, 3])
    assert not torch.allclose(a[0], captured["out"][0, -1])
    # Completeness there: the attributions sum to f(a) - f(0) with that vector patched.
    full, base = patched_objective(llama, tok, adapter, 0, prompt, target, torch.cat([a, torch.zeros_like(a)]),
                                   **where)
    gap = (full - base).item()
    assert abs(gap) > 5e-4  # the check means something (measured -1.25e-3 on this random model)
    assert attr.sum().item() == pytest.approx(gap, rel=1e-3, abs=1e-7)  # measured |difference| 9e-8
