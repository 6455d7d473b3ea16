"""ROME's value solver (lightning_edit.locate.value_solver)."""

from __future__ import annotations

import torch

from lightning_edit.data import EditRecord
from lightning_edit.locate import activations, compute_value
from lightning_edit.models import ModelAdapter

from tests.locate.helpers import CAPITALS, SUBJECTS, next_token_with_delta


def test_value_solver_makes_target_the_argmax(trained, tok):
    adapter = ModelAdapter(trained)
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    for subject, new in zip(SUBJECTS[:2], CAPITALS[2:]):
        record = EditRecord(prompt=f"the capital of {subject} is", target_new=new, subject=subject)
        zero = next_token_with_delta(trained, tok, adapter, 0, record.prompt, -1, 0.0)
        assert zero != new  # the model knows the old fact
        result = compute_value(trained, tok, adapter, 0, record, position="last", context_templates=("{}",))
        assert result.position == 6
        assert result.final_nll < 0.3 * result.losses[0]["nll"]
        assert result.delta.norm() <= 4.0 * result.original.norm() * (1 + 1e-5)
        torch.testing.assert_close(result.value, result.original + result.delta)
        assert next_token_with_delta(trained, tok, adapter, 0, record.prompt, result.position, result.delta) == new
    for name, tensor in trained.state_dict().items():  # the solve never writes into the model
        assert torch.equal(tensor, before[name]), name
    assert all(p.grad is None for p in trained.parameters())


def test_value_solver_at_subject_clamp_and_fallback(llama, tok):
    adapter = ModelAdapter(llama)
    record = EditRecord(prompt="the capital of x y z is", target_new="paris rome", subject="x y z")
    result = compute_value(llama, tok, adapter, 0, record, steps=6, clamp_norm_factor=0.1, nll_threshold=0.0)
    assert result.position == 6 and len(result.losses) == 6
    assert result.delta.norm() <= 0.1 * result.original.norm() * (1 + 1e-5)
    assert result.losses[-1]["nll"] < result.losses[0]["nll"]
    key = activations(llama, tok, adapter, 0, [record.prompt], position="subject_last", subjects=[record.subject])
    torch.testing.assert_close(result.key, key[0], atol=1e-5, rtol=1e-5)
    assert result.context_keys.shape == (4, 64)
    mlp_out = activations(llama, tok, adapter, 0, [record.prompt], position=6, site="mlp_output")
    torch.testing.assert_close(result.original, mlp_out[0], atol=1e-5, rtol=1e-5)
    # MEMIT's site: the residual stream after the layer; no key.
    memit = compute_value(llama, tok, adapter, 0, record, steps=2, value_site="layer_output", key_site=None)
    layer_out = activations(llama, tok, adapter, 0, [record.prompt], position=6, site="layer_output")
    torch.testing.assert_close(memit.original, layer_out[0], atol=1e-5, rtol=1e-5)
    assert memit.key is None and memit.context_keys is None
    # Without a subject: the key is the prompt's last token and there is no KL term.
    plain = compute_value(llama, tok, adapter, 1, EditRecord(prompt="who wrote hamlet", target_new="paris"), steps=2)
    assert plain.position == 3 and all(row["kl"] == 0 for row in plain.losses)
