"""Token positions: where a prompt's key sits (the subject's last token, or the prompt's last token).

Prompts are tokenised by `tokens.encode_prompt`, as the edit metrics tokenise them (leading special
tokens such as BOS, nothing appended at the end), so an index found here is the same index in
`tokens.target_positions`'s ids of `prompt + " " + target`.
"""

from __future__ import annotations

from typing import Any, Union

from lightning_edit.tokens import encode_prompt

Position = Union[str, int]
"""A position rule: "last" (the prompt's last token), "subject_last" (the subject's last token,
falling back to "last"), "all" (every real token), or an int index into the prompt's tokens
(negative counts from the end)."""

POSITION_RULES = ("last", "subject_last", "all")


def subject_span(prompt: str, subject: str | None) -> tuple[int, int] | None:
    """Character span [start, end) of the first occurrence of `subject` in `prompt` (case-sensitive
    first, then case-insensitive), or None when there is no subject or it does not occur."""
    if not subject or not subject.strip():
        return None
    subject = subject.strip()
    start = prompt.find(subject)
    if start < 0:
        start = prompt.lower().find(subject.lower())
    if start < 0:
        return None
    return start, start + len(subject)


def token_ending_at(tok: Any, text: str, char_end: int) -> int:
    """Index (in `encode_prompt(tok, text)`) of the last token that starts before character `char_end`.

    Fast tokenizers answer from their offsets; otherwise the prefix `text[:char_end]` is tokenised
    and its length counted (ROME's approach; exact when the tokenisation of the prefix is a prefix of
    the tokenisation of the text).
    """
    ids = encode_prompt(tok, text)
    if getattr(tok, "is_fast", False):
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True,
                  return_special_tokens_mask=True)
        last = None
        for i, ((start, end), special) in enumerate(zip(enc["offset_mapping"], enc["special_tokens_mask"])):
            if i >= len(ids):
                break
            if not special and end > start and start < char_end:
                last = i
        if last is not None:
            return last
    prefix = encode_prompt(tok, text[:char_end].rstrip())
    return min(len(prefix), len(ids)) - 1


def subject_last_token(tok: Any, prompt: str, subject: str | None) -> int:
    """Token index of the subject's last token in `prompt`; the prompt's last token when there is no
    subject or it does not occur in the prompt (the key position of ROME-style methods)."""
    span = subject_span(prompt, subject)
    if span is None:
        return len(encode_prompt(tok, prompt)) - 1
    return token_ending_at(tok, prompt, span[1])


def resolve_position(tok: Any, prompt: str, position: Position, subject: str | None = None) -> list[int]:
    """The non-negative token indices of `prompt` that `position` names (one, or all for "all")."""
    n = len(encode_prompt(tok, prompt))
    if isinstance(position, bool) or not isinstance(position, (int, str)):
        raise TypeError(f"position must be one of {POSITION_RULES} or an int, got {position!r}")
    if isinstance(position, int):
        index = position + n if position < 0 else position
        if not 0 <= index < n:
            raise IndexError(f"position {position} is outside prompt {prompt!r} ({n} tokens)")
        return [index]
    if position == "last":
        return [n - 1]
    if position == "subject_last":
        return [subject_last_token(tok, prompt, subject)]
    if position == "all":
        return list(range(n))
    raise ValueError(f"unknown position rule {position!r}; expected one of {POSITION_RULES} or an int")


def per_prompt(value: Any, n: int, what: str) -> list[Any]:
    """Broadcast a scalar (or None) to n prompts, or check that a sequence has one entry per prompt."""
    if value is None or isinstance(value, (str, int)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{len(values)} {what} for {n} prompts (expected one per prompt or a single value)")
    return values
