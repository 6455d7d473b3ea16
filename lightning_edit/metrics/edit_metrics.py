"""Rel / Gen / Loc edit metrics, teacher forced (METHODS.md section 3).

- Rel: token accuracy of `target_new` given `prompt` (input = prompt + " " + target; the argmax at
  each target position against the target token), and exact match (every target token right).
- Gen: the same on each rephrase, averaged per record, then over records.
- Loc: on each locality prompt + answer, the fraction of answer positions where the edited model's
  argmax equals the unedited model's, pooled per record, then averaged over records. A pair with no
  answer compares the argmax at the prompt's last position only. A locality prompt that is itself
  the prompt or a rephrase of an edit made so far is not scored: that edit is meant to change it
  (in a long stream of a small world, later edits rewrite earlier records' neighbours).
- Hallucination records: Rel is the perplexity of `target_new` given `prompt` (lower is better).

`model` is any Hugging Face causal LM (called as `model(input_ids=, attention_mask=).logits`),
`tokenizer` any HF tokenizer; tokenisation is `lightning_edit.tokens`'s. Pure torch; no Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence, TypeVar

import torch

from lightning_edit.data.records import EditRecord, LocalityPair
from lightning_edit.models import eval_mode, model_device
from lightning_edit.tokens import encode, pad_id, right_padded, target_positions

T = TypeVar("T")


@dataclass
class TokenScore:
    """Teacher-forced score of one target given one prompt."""

    token_acc: float
    """Fraction of target positions whose argmax is the target token."""
    exact: bool
    """All target tokens right."""
    nll: float
    """Mean negative log-likelihood of the target tokens (nats); exp(nll) is the perplexity."""
    argmax_ids: list[int]
    """The model's argmax at each target position (what Loc compares)."""
    target_ids: list[int]
    """The target tokens themselves."""


# Batched forward -----------------------------------------------------------------------------


def _forward_at(
    model: torch.nn.Module,
    tokenizer: Any,
    sequences: Sequence[list[int]],
    positions: Sequence[Sequence[int]],
    reduce: Callable[[int, torch.Tensor], T],
    batch_size: int,
) -> list[T]:
    """Run right-padded batches and hand `reduce(i, logits)` the float32 logits `[len(positions[i]),
    vocab]` of sequence i at its requested positions; returns the reductions in input order.

    Sequences are batched by length (less padding); right padding leaves every real token's
    position and causal context unchanged, so batching does not change any result.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size} (expected >= 1)")
    device = model_device(model)
    pad = pad_id(tokenizer)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out: list[Any] = [None] * len(sequences)
    with eval_mode(model), torch.no_grad():
        for first in range(0, len(order), batch_size):
            chunk = order[first:first + batch_size]
            ids, mask = right_padded([sequences[i] for i in chunk], pad, device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for row, i in enumerate(chunk):
                at = torch.as_tensor(list(positions[i]), dtype=torch.long, device=logits.device)
                out[i] = reduce(i, logits[row].index_select(0, at).float())
    return out


# Scores ----------------------------------------------------------------------------------------


def teacher_forced(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
) -> list[TokenScore]:
    """Score each target given its prompt by teacher forcing (input = prompt + " " + target)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    encoded = [target_positions(tokenizer, p, t) for p, t in zip(prompts, targets)]
    sequences = [ids for ids, _ in encoded]
    # The token at position j is predicted by the logits at j - 1.
    positions = [range(start - 1, len(ids) - 1) for ids, start in encoded]

    def reduce(i: int, logits: torch.Tensor) -> TokenScore:
        ids, start = encoded[i]
        target = torch.tensor(ids[start:], dtype=torch.long, device=logits.device)
        argmax = logits.argmax(dim=-1)
        nll = -torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).mean()
        right = argmax == target
        return TokenScore(
            token_acc=right.float().mean().item(),
            exact=bool(right.all()),
            nll=nll.item(),
            argmax_ids=argmax.tolist(),
            target_ids=ids[start:],
        )

    return _forward_at(model, tokenizer, sequences, positions, reduce, batch_size)


def last_token_argmax(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str],
                      batch_size: int = 32) -> list[int]:
    """The model's argmax next token after each prompt."""
    sequences = [encode(tokenizer, p) for p in prompts]
    for p, ids in zip(prompts, sequences):
        if not ids:
            raise ValueError(f"prompt {p!r} has no tokens")
    positions = [[len(ids) - 1] for ids in sequences]
    return _forward_at(model, tokenizer, sequences, positions,
                       lambda _, logits: int(logits[0].argmax()), batch_size)


def perplexity(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], texts: Sequence[str],
               batch_size: int = 32) -> list[float]:
    """Perplexity of each text given its prompt: exp(mean NLL of the text's tokens)."""
    return [math.exp(s.nll) for s in teacher_forced(model, tokenizer, prompts, texts, batch_size)]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def rel_gen_scores(model: torch.nn.Module, tokenizer: Any, records: Sequence[EditRecord],
                   batch_size: int = 32) -> dict[str, float]:
    """Rel on each record's prompt and Gen on its rephrases (per record, then over records).

    Returns rel, rel_em, gen, gen_em (NaN when no record has a rephrase), n, n_gen.
    """
    rel = teacher_forced(model, tokenizer, [r.prompt for r in records],
                         [r.target_new for r in records], batch_size)
    owners = [i for i, r in enumerate(records) for _ in r.rephrase_prompts]
    gen = teacher_forced(model, tokenizer, [p for r in records for p in r.rephrase_prompts],
                         [r.target_new for r in records for _ in r.rephrase_prompts], batch_size)
    per_record: dict[int, list[TokenScore]] = {}
    for i, score in zip(owners, gen):
        per_record.setdefault(i, []).append(score)
    return {
        "rel": _mean([s.token_acc for s in rel]),
        "rel_em": _mean([float(s.exact) for s in rel]),
        "gen": _mean([_mean([s.token_acc for s in ss]) for ss in per_record.values()]),
        "gen_em": _mean([_mean([float(s.exact) for s in ss]) for ss in per_record.values()]),
        "n": len(records),
        "n_gen": len(per_record),
    }


def pair_predictions(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[LocalityPair],
                     batch_size: int = 32) -> list[list[int]]:
    """Argmax ids at each pair's answer positions, or at the prompt's last position when the
    pair has no answer."""
    answered = [i for i, p in enumerate(pairs) if p.answer is not None]
    bare = [i for i, p in enumerate(pairs) if p.answer is None]
    out: list[list[int]] = [[] for _ in pairs]
    scores = teacher_forced(model, tokenizer, [pairs[i].prompt for i in answered],
                            [pairs[i].answer for i in answered], batch_size)
    for i, score in zip(answered, scores):
        out[i] = score.argmax_ids
    tokens = last_token_argmax(model, tokenizer, [pairs[i].prompt for i in bare], batch_size)
    for i, token in zip(bare, tokens):
        out[i] = [token]
    return out


def locality_predictions(model: torch.nn.Module, tokenizer: Any, records: Sequence[EditRecord],
                         batch_size: int = 32) -> list[list[list[int]]]:
    """Per record, per locality pair: the argmax ids at the pair's answer positions."""
    flat = pair_predictions(model, tokenizer, [p for r in records for p in r.locality], batch_size)
    out, at = [], 0
    for r in records:
        out.append(flat[at:at + len(r.locality)])
        at += len(r.locality)
    return out


def loc_score(pred_edited: Sequence[Sequence[Sequence[int]]],
              pred_base: Sequence[Sequence[Sequence[int]]]) -> float:
    """Fraction of answer positions where edited and unedited argmax agree, pooled over a record's
    pairs, then averaged over the records that have locality pairs (NaN when none has)."""
    if len(pred_edited) != len(pred_base):
        raise ValueError(f"{len(pred_edited)} edited records but {len(pred_base)} base records")
    per_record = []
    for r, (edited, base) in enumerate(zip(pred_edited, pred_base)):
        if len(edited) != len(base):
            raise ValueError(f"record {r}: {len(edited)} edited pairs but {len(base)} base pairs")
        agree = total = 0
        for e, b in zip(edited, base):
            if len(e) != len(b):
                raise ValueError(f"record {r}: predictions of {len(e)} and {len(b)} positions differ in length")
            agree += sum(int(x == y) for x, y in zip(e, b))
            total += len(e)
        if total:
            per_record.append(agree / total)
    return _mean(per_record)


class EditScorer:
    """Rel / Gen / Loc for a set of records, against locality predictions of the unedited model.

    Call `prepare(unedited_model, records)` before the first edit (or pass both to the
    constructor): it caches the unedited model's argmax on every locality pair. The cache is keyed
    by the pair's text (prompt, answer), so records sharing a pair share the entry and ids from
    different files cannot collide; `state_dict` / `load_state_dict` carry it across a resume,
    when the model at hand is already edited.

    `score(model, records)` serves both protocols: all records so far (final state) or the one
    just edited (immediate).
    """

    def __init__(self, tokenizer: Any, base_model: torch.nn.Module | None = None,
                 records: Sequence[EditRecord] = (), batch_size: int = 32):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._base: dict[tuple[str, str | None], list[int]] = {}
        if base_model is not None:
            self.prepare(base_model, records)

    def prepare(self, base_model: torch.nn.Module, records: Sequence[EditRecord]) -> None:
        """Cache the unedited model's locality predictions for records not cached yet."""
        missing = list({(p.prompt, p.answer): p for r in records for p in r.locality
                        if (p.prompt, p.answer) not in self._base}.values())
        predictions = pair_predictions(base_model, self.tokenizer, missing, self.batch_size)
        for pair, ids in zip(missing, predictions):
            self._base[(pair.prompt, pair.answer)] = ids

    def base_predictions(self, record: EditRecord) -> list[list[int]]:
        """The cached unedited predictions for a record's locality pairs."""
        out = []
        for pair in record.locality:
            key = (pair.prompt, pair.answer)
            if key not in self._base:
                raise KeyError(
                    f"no unedited locality prediction for record {record.case_id!r} of {record.source}, "
                    f"pair {pair.prompt!r}: call EditScorer.prepare(unedited_model, records) before editing")
            out.append(self._base[key])
        return out

    def score(self, model: torch.nn.Module, records: Sequence[EditRecord],
              edited: Sequence[EditRecord] | None = None) -> dict[str, float]:
        """rel, rel_em, gen, gen_em over fact records; loc over all; n; and rel_ppl (mean
        perplexity of the corrected text, lower is better) when hallucination records are present.
        A metric with no record to measure it is NaN.

        `edited`: every record edited so far (default `records`, the final-state protocol);
        locality pairs whose prompt one of them rewrites are left out of Loc and counted in
        `n_loc_excluded`."""
        rewritten = {p for r in (records if edited is None else edited) for p in (r.prompt, *r.rephrase_prompts)}
        kept = [replace(r, locality=[p for p in r.locality if p.prompt not in rewritten]) for r in records]
        base = [self.base_predictions(r) for r in kept]
        facts = [r for r in records if r.kind == "fact"]
        hallucinations = [r for r in records if r.kind == "hallucination"]
        out = rel_gen_scores(model, self.tokenizer, facts, self.batch_size)
        out["n"] = len(records)
        predicted = locality_predictions(model, self.tokenizer, kept, self.batch_size)
        out["loc"] = loc_score(predicted, base)
        out["n_loc"] = sum(1 for r in kept if r.locality)
        out["n_loc_excluded"] = sum(len(r.locality) for r in records) - sum(len(r.locality) for r in kept)
        if hallucinations:
            ppl = perplexity(model, self.tokenizer, [r.prompt for r in hallucinations],
                             [r.target_new for r in hallucinations], self.batch_size)
            out["rel_ppl"] = _mean(ppl)
            out["n_hallucination"] = len(hallucinations)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"base": [[prompt, answer, ids] for (prompt, answer), ids in self._base.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._base = {(prompt, answer): list(ids) for prompt, answer, ids in state["base"]}
