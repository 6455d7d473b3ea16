"""The code benchmarks' measures: MENT's token and character metrics (seeds/001, III-E) and KECode's
cluster metrics (seeds/000; METHODS.md section 3).

MENT, per data pair (a generation and its ground truth, both as token lists):
- EM: the generation equals the ground truth;
- BM: the share of ground-truth positions where the generation has the same token;
- LM: the longest run of consecutive tokens the two share (longest common substring, in tokens),
  over the ground truth's length;
- BLEU and ROUGE at character level (the paper's "character-level metrics"): sentence BLEU-4
  (torchmetrics `SacreBLEUScore`, `tokenize="char"`, add-one smoothing of the 2- to 4-gram
  precisions, Lin & Och 2004, so that a line shorter than four characters is not scored 0) and ROUGE-L
  F1 (torchmetrics `ROUGEScore` over characters), on the code with the spaces between tokens removed,
  averaged over pairs.
MAE of rank and probability over probe sets: `lightning_edit.editors.ment.probe_mae`.

KECode, for one edited cluster (`kecode_scores`), over held-out samples only (never the ones whose
correction knowledge was edited in):
- Generalization: share of the target cluster's samples whose first error is no longer in the
  target cluster (corrected, or now failing for another reason);
- Cluster Drift: share of the target cluster's samples whose first error is now in *another*
  cluster (the error changed instead of going away);
- Specificity: share of the other clusters' samples whose cluster is unchanged;
- Reliability: over the target cluster's samples that compile after the edit, the mean share of
  their unit tests that pass (a correction that compiles but computes the wrong thing scores 0);
- broken: programs that passed all their tests before the edit and do not after (what no paper
  reports); fixed: target-cluster samples that pass all their tests after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


# --- MENT: token level -------------------------------------------------------------------------------


def exact_match(gen: Sequence[str], ref: Sequence[str]) -> float:
    return float(list(gen) == list(ref))


def broad_match(gen: Sequence[str], ref: Sequence[str]) -> float:
    """Share of ground-truth positions where the generation has the same token."""
    if not ref:
        return float(not gen)
    return sum(g == r for g, r in zip(gen, ref)) / len(ref)


def longest_match(gen: Sequence[str], ref: Sequence[str]) -> float:
    """Longest common run of consecutive tokens, over the ground truth's length."""
    if not ref:
        return float(not gen)
    best = 0
    prev = [0] * (len(ref) + 1)
    for g in gen:
        cur = [0] * (len(ref) + 1)
        for j, r in enumerate(ref, 1):
            if g == r:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best / len(ref)


def compact(tokens: Sequence[str]) -> str:
    """The code as characters: tokens concatenated without the spaces between them."""
    return "".join(tokens)


class CharMetrics:
    """Sentence-level character BLEU-4 and ROUGE-L F1 (torchmetrics), averaged over pairs."""

    def __init__(self):
        from torchmetrics.text import ROUGEScore, SacreBLEUScore

        self._bleu = SacreBLEUScore(n_gram=4, tokenize="char", smooth=True)
        self._rouge = ROUGEScore(rouge_keys="rougeL", tokenizer=_CharTokenizer(), normalizer=lambda s: s,
                                 accumulate="best")

    def bleu(self, gen: str, ref: str) -> float:
        if not gen or not ref or gen == ref:  # identical lines score 1 even below four characters
            return float(gen == ref)
        return float(self._bleu([gen], [[ref]]))

    def rouge(self, gen: str, ref: str) -> float:
        if not gen or not ref:
            return float(gen == ref)
        return float(self._rouge(gen, ref)["rougeL_fmeasure"])


class _CharTokenizer:
    """ROUGE over characters (torchmetrics splits words by default, dropping operators)."""

    def __call__(self, text: str) -> list[str]:
        return [c for c in text if not c.isspace()]


def generation_scores(gens: Sequence[Sequence[str]], refs: Sequence[Sequence[str]],
                      char: CharMetrics | None = None) -> dict[str, float]:
    """Mean EM, BM, LM, BLEU and ROUGE over pairs."""
    char = char or CharMetrics()
    rows = [(exact_match(g, r), broad_match(g, r), longest_match(g, r), char.bleu(compact(g), compact(r)),
             char.rouge(compact(g), compact(r))) for g, r in zip(gens, refs)]
    if not rows:
        return {k: math.nan for k in ("em", "bm", "lm", "bleu", "rouge")}
    cols = list(zip(*rows))
    return {k: sum(c) / len(c) for k, c in zip(("em", "bm", "lm", "bleu", "rouge"), cols)}


# --- KECode -----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One sample's translation as compiled and tested."""

    cluster: str | None
    """Its first error's cluster; None when it compiles."""
    compiled: bool
    passed: bool
    """Compiled and passed every unit test."""
    test_pass_rate: float


def kecode_scores(target: str, before: dict[int, Outcome], after: dict[int, Outcome],
                  heldout: Sequence[int]) -> dict[str, float]:
    """The KECode measures for an edit of cluster `target`, over the `heldout` sample ids (see the
    module doc). NaN where a measure has no samples to average."""
    in_target = [i for i in heldout if before[i].cluster == target]
    others = [i for i in heldout if before[i].cluster is not None and before[i].cluster != target]
    passing = [i for i in heldout if before[i].passed]

    def share(ids, pred) -> float:
        return sum(pred(i) for i in ids) / len(ids) if ids else math.nan

    compiling = [i for i in in_target if after[i].compiled]
    return {
        "generalization": share(in_target, lambda i: after[i].cluster != target),
        "drift": share(in_target, lambda i: after[i].cluster is not None and after[i].cluster != target),
        "specificity": share(others, lambda i: after[i].cluster == before[i].cluster),
        "reliability": (sum(after[i].test_pass_rate for i in compiling) / len(compiling)) if compiling else math.nan,
        "compile_rate": share(in_target, lambda i: after[i].compiled),
        "fixed": share(in_target, lambda i: after[i].passed),
        "broken": float(sum(not after[i].passed for i in passing)),
        "broken_rate": share(passing, lambda i: not after[i].passed),
        "n_target": float(len(in_target)),
        "n_other": float(len(others)),
        "n_passing": float(len(passing)),
    }


def overall_rates(outcomes: dict[int, Outcome], ids: Sequence[int]) -> dict[str, float]:
    """Compile rate, all-tests pass rate and mean test pass rate over `ids`."""
    ids = list(ids)
    if not ids:
        return {"compile_rate": math.nan, "pass_rate": math.nan, "test_pass_rate": math.nan}
    return {"compile_rate": sum(outcomes[i].compiled for i in ids) / len(ids),
            "pass_rate": sum(outcomes[i].passed for i in ids) / len(ids),
            "test_pass_rate": sum(outcomes[i].test_pass_rate for i in ids) / len(ids)}
