"""Tokenisation shared by metrics, locating and editors: one way to encode a prompt, find a
target's positions, pick the pad id and pad a batch.

A prompt is encoded with the tokenizer's leading special tokens (BOS) and nothing appended at the
end, so a token index found in a prompt is the same index in `target_positions`'s ids of
`prompt + " " + target`. Pure Python + torch; any Hugging Face tokenizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch


def join_prompt_target(prompt: str, target: str) -> str:
    """`prompt + " " + target`, without doubling a space either side already has."""
    if not prompt or not target or prompt[-1].isspace() or target[0].isspace():
        return prompt + target
    return prompt + " " + target


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids with the tokenizer's leading special tokens (BOS) but none appended at the end
    (an EOS after the prompt would sit between prompt and target)."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not plain or len(plain) >= len(ids):
        return ids
    for start in range(len(ids) - len(plain) + 1):
        if ids[start:start + len(plain)] == plain:
            return ids[:start + len(plain)]
    return ids


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """`encode(tokenizer, text)`, refusing a text that has no tokens."""
    ids = encode(tokenizer, text)
    if not ids:
        raise ValueError(f"text {text!r} has no tokens")
    return ids


def target_positions(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], int]:
    """(ids of prompt + " " + target, index of the first target token).

    The target tokens are those of the joint tokenisation beyond the prompt's own tokenisation;
    where a tokenizer merges across the boundary, the target starts where the two disagree.
    """
    full = encode(tokenizer, join_prompt_target(prompt, target))
    alone = encode(tokenizer, prompt)
    start = 0
    while start < min(len(full), len(alone)) and full[start] == alone[start]:
        start += 1
    if start == 0:
        raise ValueError(f"prompt {prompt!r} has no tokens to condition on (and no BOS token is added)")
    if start >= len(full):
        raise ValueError(f"target {target!r} adds no tokens after prompt {prompt!r}")
    return full, start


def pad_id(tokenizer: Any) -> int:
    """The id used for padding: the pad token, else EOS, else 0 (padding is masked out anyway)."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def right_padded(sequences: Sequence[list[int]], pad: int,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, T], padded on the right: every real token keeps its position
    and its causal context, so batching changes no activation."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids.to(device), mask.to(device)


@contextlib.contextmanager
def padding_side(tokenizer: Any, side: str) -> Iterator[Any]:
    """The tokenizer padding on `side` ("left" to continue sequences at their right end, "right" to
    keep every token's position) for the block; its own side is restored after."""
    saved, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = saved
