"""Held-out locality (lightning_edit.downstream.locality): exact on the unedited model, moves with a weight."""

from __future__ import annotations

import copy

import torch

from lightning_edit.downstream import capture_reference, compare, held_out_prompts


def test_locality_is_exact_on_the_unedited_model_and_moves_when_a_weight_does(small_world, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    lines = small_world.corpus_path.read_text().splitlines()
    prompts = held_out_prompts(lines, exclude=["nobody at all"], n=24, seed=1)
    assert len(prompts) == 24 and held_out_prompts(lines, [], 24, seed=1) == prompts
    subject = small_world.kb.facts[0].subject
    assert not any(subject in p for p in held_out_prompts(lines, [subject], 500))
    for topk in (None, 5):  # whole vocabulary (exact KL) and top-k + tail bin
        ref = capture_reference(model, tokenizer, prompts, batch_size=7, topk=topk)
        same = compare(ref, model, tokenizer, batch_size=7)
        assert same["agreement"] == 1.0 and same["kl"] == 0.0
        perturbed = copy.deepcopy(model)
        with torch.no_grad():
            perturbed.model.layers[0].mlp.down_proj.weight.add_(0.5 * torch.randn_like(
                perturbed.model.layers[0].mlp.down_proj.weight, generator=torch.Generator().manual_seed(0)))
        moved = compare(ref, perturbed, tokenizer, batch_size=7)
        assert moved["agreement"] < 1.0 and moved["kl"] > 0.0
