"""Greedy Java -> D translation by a causal LM, statement by statement (`format.py`), batched.

`translate(generate, programs)` feeds every program's Java line k (after the D the model wrote for
lines 0..k-1) to `generate` in batches and keeps what comes back up to the first `<j>`; programs
advance in lockstep, so one call per line index serves the whole batch. `generate` is any
`prompts -> continuations` function: `model_generate(model, tokenizer)` for a plain model, or an
editor's (`editor_generate`), so the edited model (hooks, spliced components, gates) translates.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Sequence

import torch

from .format import D, JAVA, Line, java_lines, prompt
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


Check = Callable[[Sequence[Program], Sequence[list[Line]]], list[bool]]
"""(programs, their D lines) -> per program, whether the model would write exactly those lines again."""


@torch.no_grad()
def still_greedy(edited: Callable[[], ContextManager], tokenizer, programs: Sequence[Program],
                 d_lines: Sequence[list[Line]], batch_size: int = 32,
                 max_line_tokens: int = MAX_LINE_TOKENS) -> list[bool]:
    """Per program, whether greedy translation by the model `edited()` yields would write exactly
    `d_lines` again: one teacher-forced forward over the whole interleaved transcript, every written
    token the argmax after its context, and after each line not cut at `max_line_tokens` a stop token
    (`<j>` / `<eos>`) the argmax. That is exactly the condition under which `translate` reproduces
    the lines, so a program that passes needs no new generation (only ties closer than the float
    error of a batched forward could differ). A transcript that does not re-tokenise to one id per
    token is reported False (it is then translated again)."""
    stops = set(_stop_ids(tokenizer))
    javas = [java_lines(p) for p in programs]
    encoded = []
    for java, lines in zip(javas, d_lines):
        text = " ".join(" ".join([JAVA, *java[i], D, *lines[i]]) for i in range(len(java)))
        ids = tokenizer(text)["input_ids"]
        offset = len(ids) - len(text.split())  # the <bos> the tokenizer adds
        encoded.append((ids, offset if offset in (0, 1) and len(lines) == len(java) else None))
    ok = [False] * len(programs)
    order = sorted(range(len(programs)), key=lambda i: len(encoded[i][0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for first in range(0, len(order), batch_size):
        batch = [i for i in order[first:first + batch_size] if encoded[i][1] is not None]
        if not batch:
            continue
        width = max(len(encoded[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            seq = encoded[i][0]
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        with edited() as model:
            device = next(model.parameters()).device
            argmax = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.argmax(-1).cpu()
        for row, i in enumerate(batch):
            seq, pos = encoded[i][0], encoded[i][1]
            good = True
            for java, line in zip(javas[i], d_lines[i]):
                pos += len(java) + 2  # <j> java <d>
                for j in range(len(line)):  # each written token the argmax after its context
                    good &= int(argmax[row, pos + j - 1]) == seq[pos + j]
                if len(line) < max_line_tokens:  # then a stop
                    good &= int(argmax[row, pos + len(line) - 1]) in stops
                pos += len(line)
                if not good:
                    break
            ok[i] = bool(good)
    return ok


def greedy_check(edited: Callable[[], ContextManager], tokenizer, batch_size: int = 32) -> Check:
    """`still_greedy` over the model `edited()` yields, as a `Check` for `KECodeHarness.run`."""
    return lambda programs, d_lines: still_greedy(edited, tokenizer, programs, d_lines, batch_size)


def editor_check(editor, batch_size: int = 32) -> Check | None:
    """`greedy_check` over the edited model where a teacher-forced forward computes what generation
    does (a causal function of each position's context); None for methods that decide per sequence
    (a router or gate holding its decision from the prompt, or their own `generate`): their programs
    are always translated again."""
    from lightning_edit.editors.base import Editor, HeldRouting

    if isinstance(editor, HeldRouting) or type(editor).generate is not Editor.generate:
        return None
    return greedy_check(editor.edited, editor.tokenizer, batch_size)
