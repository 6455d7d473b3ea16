"""The code benchmarks' measures against hand-computed values (lightning_edit/code/metrics.py, MENT's
probe MAE in lightning_edit/editors/ment.py)."""

import math

import pytest
import torch

from lightning_edit.code.metrics import (CharMetrics, Outcome, broad_match, exact_match, generation_scores,
                                         kecode_scores, longest_match)
from lightning_edit.editors.ment import ProbeStats, probe_mae


def test_token_metrics():
    gen, ref = "a b c d".split(), "a b x d e".split()
    assert exact_match(gen, ref) == 0.0
    assert broad_match(gen, ref) == pytest.approx(3 / 5)  # positions 0, 1, 3 agree
    assert longest_match(gen, ref) == pytest.approx(2 / 5)  # "a b"
    assert (exact_match(ref, ref), broad_match(ref, ref), longest_match(ref, ref)) == (1.0, 1.0, 1.0)
    assert broad_match(["a"], ["a", "b"]) == 0.5 and longest_match(["z", "b", "c"], ["a", "b", "c"]) == pytest.approx(2 / 3)


def test_character_bleu_and_rouge():
    char = CharMetrics()
    # 1- to 4-gram matches 7/8, 6/7, 5/6, 4/5, add-one smoothed above 1-grams: 7/8, 7/8, 6/7, 5/6;
    # geometric mean, same length so no brevity penalty
    assert char.bleu("abcdefgx", "abcdefgh") == pytest.approx((7 / 8 * 7 / 8 * 6 / 7 * 5 / 6) ** 0.25, abs=1e-5)
    assert char.bleu("}", "}") == 1.0 and char.bleu("", "x") == 0.0
    # all n-grams right but one character short: brevity penalty exp(1 - 8/7)
    assert char.bleu("abcdefg", "abcdefgh") == pytest.approx(math.exp(1 - 8 / 7), abs=1e-5)
    assert char.rouge("abxd", "abcd") == pytest.approx(0.75)  # LCS 3 of 4 both ways
    assert char.rouge("ab", "abcd") == pytest.approx(2 * 1 * 0.5 / 1.5)  # P 1, R 1/2
    scores = generation_scores([["int", "n", "=", "0", ";"]], [["int", "n", "=", "0", ";"]], char)
    assert scores == pytest.approx({"em": 1.0, "bm": 1.0, "lm": 1.0, "bleu": 1.0, "rouge": 1.0})


def test_probe_mae_rank_and_probability():
    after = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1]]).log()
    before = ProbeStats(ranks=torch.tensor([0, 0]), probs=torch.tensor([0.9, 0.8]))
    out = probe_mae(before, after, target=1, cap=10)
    assert out["mae_rank"] == pytest.approx((1 + 0) / 2)  # the target is 2nd, then 1st
    assert out["mae_prob"] == pytest.approx((0.6 + 0.2) / 2)
    many = torch.arange(20, 0, -1).float().log_softmax(0)[None]  # token 19 is ranked 19th: capped at 10
    assert probe_mae(ProbeStats(torch.tensor([0]), torch.tensor([0.0])), many, target=19, cap=10)["mae_rank"] == 10


def _o(cluster, compiled=False, passed=False, rate=0.0):
    return Outcome(cluster=cluster, compiled=compiled, passed=passed, test_pass_rate=rate)


def test_kecode_scores():
    before = {0: _o("c0"), 1: _o("c0"), 2: _o("c0"), 3: _o("c0"), 4: _o("c1"), 5: _o("c1"),
              6: _o(None, True, True, 1.0), 7: _o(None, True, False, 0.5)}
    after = {0: _o(None, True, True, 1.0),      # fixed and passes
             1: _o(None, True, False, 0.5),     # compiles, half its tests
             2: _o("c1"),                       # drifted to another cluster
             3: _o("c0"),                       # unchanged
             4: _o("c1"), 5: _o(None, True, True, 1.0),  # other clusters: one unchanged, one changed
             6: _o(None, True, False, 0.0),     # a passing program broken
             7: _o(None, True, False, 0.5)}
    s = kecode_scores("c0", before, after, heldout=list(range(8)))
    assert s["generalization"] == pytest.approx(3 / 4)
    assert s["drift"] == pytest.approx(1 / 4)
    assert s["specificity"] == pytest.approx(1 / 2)
    assert s["reliability"] == pytest.approx((1.0 + 0.5) / 2)
    assert s["compile_rate"] == pytest.approx(2 / 4) and s["fixed"] == pytest.approx(1 / 4)
    assert s["broken"] == 1 and s["broken_rate"] == 1.0
    assert (s["n_target"], s["n_other"], s["n_passing"]) == (4, 2, 1)
    # the edited samples are never scored
    assert kecode_scores("c0", before, after, heldout=[0, 1, 2, 4, 5, 6, 7])["generalization"] == 1.0
    assert math.isnan(kecode_scores("c0", before, after, heldout=[4, 5])["generalization"])
