"""ce_loss_score and its flags (lightning_edit/sparse/scores.py): a score is marked not meaningful when
the clean CE is above the uniform entropy, the score exceeds 1.02 or zero-ablation does not hurt."""

from __future__ import annotations

import math

import pytest

from lightning_edit.sparse import ce_loss_score


def test_ce_loss_score_flags():
    fine = ce_loss_score(1.1, 1.2, 9.0, vocab_size=500)
    assert fine.meaningful and fine.note is None and fine.score == pytest.approx(7.8 / 7.9)
    above_uniform = ce_loss_score(7.0, 7.2, 9.0, vocab_size=500)  # ln 500 = 6.21
    assert not above_uniform.meaningful and "above the uniform entropy ln(500) = 6.215" in above_uniform.note
    better_than_clean = ce_loss_score(2.0, 1.9, 4.0, vocab_size=500)  # score 1.05
    assert not better_than_clean.meaningful and "ce_loss_score 1.050 > 1.02" in better_than_clean.note
    assert ce_loss_score(2.0, 1.97, 4.0, vocab_size=500).meaningful  # 1.015: within noise
    flat = ce_loss_score(2.0, 2.1, 2.0, vocab_size=500)
    assert not flat.meaningful and math.isnan(flat.score) and "does not raise the CE" in flat.note
