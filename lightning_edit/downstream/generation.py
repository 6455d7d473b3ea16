"""Greedy generation from an in-memory model, one prompt at a time, with stop sequences (HumanEval
completions, the before/after examples table)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lightning_edit.models import eval_mode, max_positions, model_device
from lightning_edit.tokens import pad_id


def greedy_complete(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int,
                    stops: Sequence[str] = ()) -> str:
    """Greedy continuation of `prompt` (decoded new text), stopped early once a stop sequence shows.

    When prompt + `max_new_tokens` exceed the model's context, the new tokens are capped at half the
    context and the prompt keeps its last tokens.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    device = model_device(model)
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    limit = max_positions(model)
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

    pad = pad_id(tokenizer)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    with eval_mode(model), torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                             stopping_criteria=StoppingCriteriaList([_Stop()]) if stops else None)
    return tokenizer.decode(out[0, start:], skip_special_tokens=True)
