"""Greedy generation from an in-memory model, one prompt at a time, with stop sequences (HumanEval
completions, the before/after examples table)."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def _max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def greedy_complete(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int,
                    stops: Sequence[str] = ()) -> str:
    """Greedy continuation of `prompt` (decoded new text), stopped early once a stop sequence shows.

    When prompt + `max_new_tokens` exceed the model's context, the new tokens are capped at half the
    context and the prompt keeps its last tokens.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    device = next(model.parameters()).device
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    limit = _max_positions(model)
    new_tokens = max_new_tokens
    if limit is not None and len(ids) + new_tokens > limit:
        new_tokens = min(new_tokens, limit // 2)
        ids = ids[-(limit - new_tokens):]
    start = len(ids)

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            text = tokenizer.decode(input_ids[0, start:], skip_special_tokens=True)
            done = any(s in text for s in stops)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                                 stopping_criteria=StoppingCriteriaList([_Stop()]) if stops else None)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, start:], skip_special_tokens=True)
