"""Greedy Java -> D translation by a causal LM, statement by statement (`format.py`), batched.

`translate(generate, programs)` feeds every program's Java line k (after the D the model wrote for
lines 0..k-1) to `generate` in batches and keeps what comes back up to the first `<j>`; programs
advance in lockstep, so one call per line index serves the whole batch. `generate` is any
`prompts -> continuations` function: `model_generate(model, tokenizer)` for a plain model, or an
editor's (`editor_generate`), so the edited model (hooks, spliced components, gates) translates.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from .format import JAVA, Line, java_lines, prompt
from .programs import Program

Generate = Callable[[list[str], int], list[str]]

MAX_LINE_TOKENS = 32
"""Longest D line the model may write (the longest reference line is ~25 tokens)."""


def model_generate(model, tokenizer, stop_ids: Sequence[int] | None = None) -> Generate:
    """Greedy continuations from a plain model (left padded, stopping at `<j>` or `<eos>`)."""
    from lightning_edit.editors.base import greedy_generate

    stops = list(stop_ids) if stop_ids is not None else _stop_ids(tokenizer)
    device = next(model.parameters()).device

    def generate(prompts: list[str], max_new_tokens: int) -> list[str]:
        return greedy_generate(contextlib.nullcontext(model), tokenizer, prompts, max_new_tokens, device,
                               eos_token_id=stops)
    return generate


def editor_generate(editor) -> Generate:
    """Greedy continuations from the model as `editor` has edited it (its own `generate` where it has
    one: routed methods hold their per-prompt decision while generating)."""
    from lightning_edit.editors.base import greedy_generate

    stops = _stop_ids(editor.tokenizer)

    def generate(prompts: list[str], max_new_tokens: int) -> list[str]:
        own = getattr(editor, "generate", None)
        if own is not None:
            return own(prompts, max_new_tokens=max_new_tokens, eos_token_id=stops)
        return greedy_generate(editor.edited(), editor.tokenizer, prompts, max_new_tokens, editor.device,
                               eos_token_id=stops)
    return generate


def _stop_ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(JAVA), tokenizer.eos_token_id]


def first_line(text: str) -> Line:
    """The tokens of a continuation up to the first `<j>` (special tokens already dropped)."""
    out = []
    for tok in text.split():
        if tok == JAVA:
            break
        out.append(tok)
    return out


@torch.no_grad()
def translate(generate: Generate, programs: Sequence[Program], batch_size: int = 64,
              max_line_tokens: int = MAX_LINE_TOKENS, progress: bool = False) -> list[list[Line]]:
    """Per program, the D lines the model writes for its Java lines."""
    javas = [java_lines(p) for p in programs]
    out: list[list[Line]] = [[] for _ in programs]
    order = sorted(range(len(programs)), key=lambda i: len(javas[i]))  # similar lengths share a batch
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(javas[i]) for i in order), desc="translating", unit="line", leave=False)
    for batch in batches:
        for k in range(max(len(javas[i]) for i in batch)):
            live = [i for i in batch if k < len(javas[i])]
            texts = generate([prompt(javas[i], out[i], k) for i in live], max_line_tokens)
            for i, text in zip(live, texts):
                out[i].append(first_line(text))
            if bar is not None:
                bar.update(len(live))
    if bar is not None:
        bar.close()
    return out
