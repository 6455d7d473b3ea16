"""Locality on held-out text: how far the edited model's next-token distributions drift from the
unedited model's on prompts the edits have nothing to do with.

`capture_reference` runs the unedited model once over the prompts and keeps, at every position, its
argmax token and its log-probabilities; `compare` runs the model as edited now and reports
- agreement: the fraction of positions whose argmax token is unchanged;
- kl: the mean over positions of KL(unedited || edited) of the next-token distribution.

For a large vocabulary the reference keeps each position's top-k log-probabilities plus the rest of
the mass as one bin, k chosen so the reference fits `max_elements` numbers; KL over those k + 1 bins
is a lower bound of the full KL (and equal to it when k is the whole vocabulary, the default for
small models). The unedited model scored against its own reference gives agreement 1 and KL 0 exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from lightning_edit.models import eval_mode, max_positions, model_device
from lightning_edit.tokens import pad_id, right_padded


def held_out_prompts(lines: Sequence[str], exclude: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """Up to `n` distinct non-empty lines, in a seeded order, that mention none of `exclude` (the
    stream's subjects: their facts are what the edits change)."""
    exclude = [s for s in dict.fromkeys(exclude) if s]
    candidates = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    random.Random(f"locality:{seed}").shuffle(candidates)
    chosen = []
    for line in candidates:
        if not any(s in line for s in exclude):
            chosen.append(line)
            if len(chosen) == n:
                break
    return chosen


def _encode(tokenizer: Any, prompts: Sequence[str], context: int | None) -> list[list[int]]:
    out = []
    for prompt in prompts:
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if context is not None:
            ids = ids[:context]
        if not ids:
            raise ValueError(f"locality prompt {prompt!r} has no tokens")
        out.append(ids)
    return out


def next_token_logprobs(model: torch.nn.Module, tokenizer: Any, sequences: Sequence[list[int]],
                        batch_size: int = 32) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, float32 log-probs `[len(sequences[index]), vocab]` on the model's device) per
    sequence: the next-token distribution after every prefix. Right padding leaves every real
    token's position and causal context as they are, so batching changes nothing."""
    device = model_device(model)
    pad = pad_id(tokenizer)
    with eval_mode(model), torch.no_grad():
        for first in range(0, len(sequences), batch_size):
            chunk = sequences[first:first + batch_size]
            ids, mask = right_padded(chunk, pad, device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for row, seq in enumerate(chunk):
                yield first + row, F.log_softmax(logits[row, :len(seq)].float(), dim=-1)


@dataclass
class LocalityReference:
    """The unedited model's predictions on the held-out prompts (CPU tensors, one per prompt)."""

    prompts: list[str]
    sequences: list[list[int]]
    argmax: list[torch.Tensor] = field(default_factory=list)
    """`[positions]` argmax token ids."""
    logp: list[torch.Tensor] = field(default_factory=list)
    """`[positions, k]` log-probabilities (k = vocab, or the top k)."""
    index: list[torch.Tensor] | None = None
    """`[positions, k]` token ids of `logp` when only the top k are kept; None = the whole vocab."""

    @property
    def n_positions(self) -> int:
        return sum(len(s) for s in self.sequences)

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "sequences": self.sequences, "argmax": self.argmax, "logp": self.logp,
                "index": self.index}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "LocalityReference":
        return cls(**state)


def capture_reference(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], batch_size: int = 32,
                      topk: int | None = None, max_elements: int = 1 << 26) -> LocalityReference:
    """Score `prompts` on the (unedited) model. topk: keep only the top k log-probs per position;
    None = the whole vocabulary if positions x vocab <= max_elements, else as many as fit."""
    if not prompts:
        raise ValueError("no locality prompts to capture")
    sequences = _encode(tokenizer, prompts, max_positions(model))
    ref = LocalityReference(list(prompts), sequences)
    positions = ref.n_positions
    k = topk
    for i, logp in next_token_logprobs(model, tokenizer, sequences, batch_size):
        vocab = logp.shape[-1]
        if k is None:
            k = vocab if positions * vocab <= max_elements else max(1, max_elements // positions)
        ref.argmax.append(logp.argmax(-1).cpu())
        if k >= vocab:
            ref.logp.append(logp.cpu())
        else:
            values, index = logp.topk(k, dim=-1)
            ref.logp.append(values.cpu())
            ref.index = ref.index if ref.index is not None else []
            ref.index.append(index.cpu())
    return ref


def _binned_kl(ref_logp: torch.Tensor, new_logp: torch.Tensor, tail: bool) -> torch.Tensor:
    """KL(p || q) per position over the kept bins (plus one bin for the rest of the mass when
    `tail`, i.e. when only the top k are kept), in float64. `[positions]`."""
    p_log, q_log = ref_logp.double(), new_logp.double()
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    if not tail:
        return kl
    p_tail = (1 - p_log.exp().sum(-1)).clamp_min(0)
    q_tail = (1 - q_log.exp().sum(-1)).clamp_min(1e-300)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-300).log() - q_tail.log()), torch.zeros_like(p_tail))
    return kl + tail


def compare(reference: LocalityReference, model: torch.nn.Module, tokenizer: Any,
            batch_size: int = 32) -> dict[str, float]:
    """agreement, kl (mean over positions) and positions, of `model` as it is now vs the reference."""
    agree = 0
    kl_total = 0.0
    for i, logp in next_token_logprobs(model, tokenizer, reference.sequences, batch_size):
        logp = logp.cpu()
        agree += int((logp.argmax(-1) == reference.argmax[i]).sum())
        if reference.index is not None:
            logp = logp.gather(-1, reference.index[i])
        kl_total += float(_binned_kl(reference.logp[i], logp, tail=reference.index is not None).clamp_min(0).sum())
    n = reference.n_positions
    return {"agreement": agree / n, "kl": kl_total / n, "positions": float(n)}
