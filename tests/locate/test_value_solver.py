"""ROME's value solver (lightning_edit.locate.value_solver)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_edit.data import EditRecord
from lightning_edit.locate import activations, compute_value
from lightning_edit.locate.value_solver import GENERIC_ESSENCE, essence_templates
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


def test_value_solver_learning_rate_is_relative_to_h_and_backs_off(llama, tok):
    adapter = ModelAdapter(llama)
    record = EditRecord(prompt="the capital of x y z is", target_new="paris rome", subject="x y z")
    rule = compute_value(llama, tok, adapter, 0, record, steps=3, lr_scale=0.3, nll_threshold=0.0)
    h = rule.original
    assert rule.lr == pytest.approx(0.3 * h.norm().item() / h.numel() ** 0.5, rel=1e-5)
    assert rule.losses[0]["lr"] == pytest.approx(rule.lr)
    assert compute_value(llama, tok, adapter, 0, record, steps=2, lr=0.123).lr == 0.123  # absolute: as given
    # An overshooting rate: every rise of the loss halves the rate of the next step.
    wild = compute_value(llama, tok, adapter, 0, record, steps=12, lr=50.0, nll_threshold=0.0)
    rows = wild.losses
    rises = [i for i in range(1, len(rows) - 1) if rows[i]["total"] > rows[i - 1]["total"]]
    assert rises
    for i in range(1, len(rows)):
        assert rows[i]["lr"] == pytest.approx(rows[i - 1]["lr"] * (0.5 if i - 1 in rises else 1.0))


def test_value_solver_grows_its_budget_relaxes_penalties_and_reports_the_goal(trained, tok):
    adapter = ModelAdapter(trained)
    record = EditRecord(prompt=f"the capital of {SUBJECTS[0]} is", target_new=CAPITALS[2], subject=SUBJECTS[0])
    # A norm penalty far too strong for the goal: within the first budget the NLL stalls above it.
    strong = dict(position="last", context_templates=("{}",), weight_decay=8.0, decay="relative_sq",
                  nll_threshold=0.05, steps=10)
    held = compute_value(trained, tok, adapter, 0, record, **strong)
    assert len(held.losses) == 10 and not held.goal_met
    assert held.final_nll == min(row["nll"] for row in held.losses) >= 0.05
    assert all(row["penalty"] == 1.0 for row in held.losses)
    grown = compute_value(trained, tok, adapter, 0, record, **strong, max_steps=200)
    assert len(grown.losses) > 10 and min(row["penalty"] for row in grown.losses) < 1.0
    assert grown.goal_met and grown.final_nll == grown.losses[-1]["nll"] < 0.05
    assert next_token_with_delta(trained, tok, adapter, 0, record.prompt, grown.position, grown.delta) == CAPITALS[2]


def test_essence_prompts_are_the_worlds():
    relation = SimpleNamespace(essence="{subject} is known as a")
    world = SimpleNamespace(kb=SimpleNamespace(relations=[relation, relation]))
    assert essence_templates(world) == ("{subject} is known as a",)
    assert essence_templates(None) == (GENERIC_ESSENCE,) == ("{subject} is a",)
