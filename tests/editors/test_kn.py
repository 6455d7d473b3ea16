"""KN (knowledge neurons, Dai et al. 2022; lightning_edit/editors/kn.py) on the test-size world:
the refinement rule, probability Integrated Gradients, the update rule on the located value slots,
the skip-action, rollback and the edit state."""

from __future__ import annotations

import torch

from lightning_edit.data import EditRecord
from lightning_edit.editors.base import EditorContext
from lightning_edit.editors.kn import KNConfig, KnowledgeNeurons, probability_ig, refine
from lightning_edit.locate.attribution import TargetObjective
from lightning_edit.models import ModelAdapter, load_model
from lightning_edit.tokens import target_positions


def test_refine_keeps_shared_neurons_and_moves_the_share():
    a, b, c, d = (0, 1), (0, 2), (1, 3), (1, 4)
    coarse = [{a, b, c}, {a, b}, {a, b, d}, {a, c}]
    # shared by more than 70% of 4 prompts: a (4/4), b (3/4)
    assert refine(coarse, share=0.7, step=0.05, lo=2, hi=5) == {a, b}
    # at most 1 wanted: p rises until only a is left
    assert refine(coarse, share=0.7, step=0.05, lo=1, hi=1) == {a}
    # at least 3 wanted: p falls until c (2/4) joins
    assert refine(coarse, share=0.7, step=0.05, lo=3, hi=5) == {a, b, c}
    # counts a 5, b 4, c 2, d 2: no share keeps exactly 3, so {a, b, c, d} is cut by score
    five = [{a, b, c, d}, {a, b, c, d}, {a, b}, {a, b}, {a}]
    assert refine(five, share=0.9, step=0.05, lo=3, hi=3, score={a: 4.0, b: 3.0, c: 1.0, d: 2.0}) == {a, b, d}
    assert refine([{a, d}], share=0.7, step=0.05, lo=2, hi=5) == {a, d}  # one prompt: its coarse set


def test_probability_ig_is_complete(small_world):
    model, tok = load_model(str(small_world.model_dir))
    adapter = ModelAdapter(model)
    fact = small_world.kb.facts[0]
    prompt = small_world.kb.prompts(fact)[0]
    f = TargetObjective(model, tok, adapter, 0, prompt, fact.object, objective="logprob")
    a = f.activation()
    with torch.no_grad():
        gap = float(f(a[None]).exp() - f(torch.zeros_like(a)[None]).exp())
    # completeness: the attributions add up to P(target | a) - P(target | 0), the Riemann sum's error
    # (Dai et al.'s right rule, k/m) shrinking as the steps grow
    coarse, fine = (float(probability_ig(f, steps=m).sum()) - gap for m in (8, 256))
    assert abs(fine) < abs(coarse)
    assert abs(fine) <= 0.02 * max(abs(gap), 0.1)


def _check_edit(world, fact_index: int, new: str | None = None, **overrides) -> dict:
    """One KN edit on the world's fact: the located value slots, and nothing else, moved by the update
    rule per target token; every target token is the argmax after it; rollback and reload."""
    model, tok = load_model(str(world.model_dir))
    adapter = ModelAdapter(model)
    kb = world.kb
    fact = kb.facts[fact_index]
    rel = kb.relation(fact.relation)
    new = new or next(o for o in rel.objects if o != fact.object)
    prompts = kb.prompts(fact)
    record = EditRecord(prompt=prompts[0], target_new=new, rephrase_prompts=prompts[1:], case_id=0)
    before = {l: adapter.down_proj_weight(l).detach().clone() for l in range(adapter.num_layers)}
    editor = KnowledgeNeurons(EditorContext(model, tok, adapter), KNConfig(**{"steps": 8, "lambda2": 64.0, **overrides}))
    entry = editor.apply([record])[0]
    tokens = entry.extra["tokens"]
    ids, start = target_positions(tok, prompts[0], new)
    assert entry.extra["target_tokens"] == len(ids) - start
    assert all(1 <= len(t["neurons"]) <= 5 for t in tokens)
    assert {t["token"] for t in tokens} <= set(ids[start:])
    changed = {(l, n) for l in range(adapter.num_layers)
               for n in (adapter.down_proj_weight(l) - before[l]).abs().sum(0).nonzero().flatten().tolist()}
    if entry.metrics_after["skip"]:
        assert not changed and entry.metrics_after["neuron_cost"] == 11  # reverted, costed quota + 1
        return {"entry": entry, "ids": ids, "start": start}
    assert changed == {tuple(n) for t in tokens for n in t["neurons"]}  # only the knowledge neurons moved
    assert entry.metrics_after["target_argmax"] == 1.0
    with torch.no_grad():  # every target token is the argmax, teacher forced
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    assert logits[start - 1:-1].argmax(-1).tolist() == ids[start:]
    expected: dict[tuple[int, int], torch.Tensor] = {}
    for t in tokens:
        for (l, n), sign in zip(t["neurons"], t["signs"]):
            lam = editor.cfg.lambda2 * t["lambda_scale"]
            step = sign * t["lambda_scale"] * editor.cfg.lambda1 * (-adapter.unembedding_weight[t["old_token"]]) \
                + sign * lam * adapter.unembedding_weight[t["token"]]
            expected[(l, n)] = expected.get((l, n), 0) + step
    for (l, n), delta in expected.items():
        assert torch.allclose(adapter.down_proj_weight(l)[:, n] - before[l][:, n], delta, atol=1e-4)
    state = editor.state_dict()
    editor.rollback(entry.edit_id)
    for layer in range(adapter.num_layers):
        assert torch.allclose(adapter.down_proj_weight(layer), before[layer], atol=1e-5)
    fresh, _ = load_model(str(world.model_dir))
    again = KnowledgeNeurons(EditorContext(fresh, tok, ModelAdapter(fresh)), KNConfig())
    again.load_state_dict(state)
    for (l, n), delta in expected.items():
        assert torch.allclose(ModelAdapter(fresh).down_proj_weight(l)[:, n], before[l][:, n] + delta, atol=1e-4)
    return {"entry": entry, "ids": ids, "start": start}


def test_one_edit_updates_its_value_slots_and_rolls_back(small_world):
    out = _check_edit(small_world, 3)
    assert out["entry"].metrics_after["skip"] == 0.0


def test_targets_of_several_tokens_are_edited_token_by_token(gpt2_world):
    """On the byte-level BPE world, objects of several tokens: each token not yet the argmax gets its
    own knowledge neurons and update (editing only the first token, as before, lands none of these
    whose later tokens are not already the argmax). With the shipped passes (sweeps 4) most land;
    every landed one has every target token the argmax (`_check_edit`)."""
    kb = gpt2_world.kb
    _, tok = load_model(str(gpt2_world.model_dir))
    outs = []
    for i, fact in enumerate(kb.facts[:8]):
        prompt = kb.prompts(fact)[0]
        new = next(o for o in kb.relation(fact.relation).objects if o != fact.object)
        ids, start = target_positions(tok, prompt, new)
        if len(ids) - start >= 2:
            outs.append(_check_edit(gpt2_world, i, new, lambda2=8.0))  # kn.yaml's
    landed = [o["entry"] for o in outs if not o["entry"].metrics_after["skip"]]
    assert len(outs) >= 4 and len(landed) >= len(outs) / 2
    assert any(len({t["token"] for t in e.extra["tokens"]}) >= 2 for e in landed)  # more than the first token


def test_lambda_search_grows_the_update_until_the_token_flips(small_world):
    """`lambda_retries`: an update too small to flip the token (lambdas 0.01 and 0.05) is undone and made again at
    `lambda_growth` x the lambdas; the update that stays is the last attempt's (checked column by
    column in `_check_edit`), and the token is the argmax."""
    out = _check_edit(small_world, 3, lambda1=0.01, lambda2=0.05, lambda_retries=10)
    (token,) = out["entry"].extra["tokens"]
    assert out["entry"].metrics_after["skip"] == 0.0
    assert token["lambda_scale"] in {2.0 ** k for k in range(1, 11)}
