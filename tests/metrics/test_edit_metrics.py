"""Edit metrics (lightning_edit.metrics.edit_metrics) on a tiny random Llama with a word-level tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaForCausalLM

from lightning_edit.data import EditRecord, LocalityPair
from lightning_edit.metrics import (
    EditScorer,
    loc_score,
    locality_predictions,
    perplexity,
    rel_gen_scores,
    teacher_forced,
)

from tests.helpers import make_model, make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(len(tok))


def rigged(tok, word: str) -> LlamaForCausalLM:
    """A model whose head always predicts `word`: zero weights, a bias on that token."""
    m = make_model(len(tok))
    head = torch.nn.Linear(m.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.convert_tokens_to_ids(word)] = 10.0
    m.lm_head = head
    return m


def fact(prompt, target, rephrases=(), locality=()):
    return EditRecord(prompt=prompt, target_new=target, rephrase_prompts=list(rephrases), locality=list(locality))


def test_rigged_model_token_accuracy(tok):
    m = rigged(tok, "x")
    scores = teacher_forced(m, tok, ["the capital of", "a b", "a b"], ["x x x", "y z", "x y"])
    assert scores[0].token_acc == 1.0 and scores[0].exact
    assert scores[0].argmax_ids == [tok.convert_tokens_to_ids("x")] * 3
    assert scores[0].target_ids == tok.convert_tokens_to_ids(["x", "x", "x"])
    assert scores[1].token_acc == 0.0 and not scores[1].exact
    assert scores[2].token_acc == 0.5 and not scores[2].exact
    assert scores[0].nll < scores[1].nll


def test_batching_matches_single(model, tok):
    prompts = ["the capital of france is", "who wrote", "a", "what color is the sky", "b c d e x y z"]
    targets = ["paris", "hamlet shakespeare", "b c d e", "blue", "city river"]
    one = teacher_forced(model, tok, prompts, targets, batch_size=1)
    batched = teacher_forced(model, tok, prompts, targets, batch_size=4)
    for s1, s4 in zip(one, batched, strict=True):
        assert s1.argmax_ids == s4.argmax_ids and s1.target_ids == s4.target_ids
        assert s1.token_acc == s4.token_acc
        assert math.isclose(s1.nll, s4.nll, rel_tol=1e-4, abs_tol=1e-5)


def test_eval_mode_restored_and_no_grad(model, tok):
    model.train()
    teacher_forced(model, tok, ["the capital of"], ["paris"])
    assert model.training
    model.eval()


def test_rel_gen_scores(tok):
    m = rigged(tok, "x")
    records = [
        fact("the capital of france is", "x", rephrases=["what city", "france capital"]),
        fact("who wrote hamlet", "shakespeare", rephrases=["hamlet"]),
        fact("a b", "x y"),
    ]
    out = rel_gen_scores(m, tok, records, batch_size=2)
    assert out["rel"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert out["rel_em"] == pytest.approx(1 / 3)
    # Gen averages per record first: record 0 -> 1.0, record 1 -> 0.0.
    assert out["gen"] == pytest.approx(0.5) and out["gen_em"] == pytest.approx(0.5)
    assert out["n"] == 3 and out["n_gen"] == 2


def test_loc_score_pooling_and_checks():
    base = [[[1, 2, 3], [4]], [], [[5, 6]]]
    edited = [[[1, 9, 3], [4]], [], [[0, 0]]]
    # Record 0: 3 of 4 positions agree; record 1 has none and is skipped; record 2: 0 of 2.
    assert loc_score(edited, base) == pytest.approx((0.75 + 0.0) / 2)
    assert loc_score(base, base) == 1.0
    assert math.isnan(loc_score([[]], [[]]))
    with pytest.raises(ValueError):
        loc_score([[[1]]], [[[1, 2]]])


def test_locality_answerless_pair_uses_last_position(model, tok):
    records = [fact("a", "b", locality=[LocalityPair("the capital of france is", "paris city"),
                                        LocalityPair("who wrote hamlet", None)])]
    (preds,) = locality_predictions(model, tok, records)
    assert len(preds[0]) == 2 and len(preds[1]) == 1


def test_edit_scorer_loc_same_model_then_changed(tok):
    m = make_model(len(tok), seed=1)
    loc = [LocalityPair("the capital of france is", "paris"), LocalityPair("who wrote hamlet", "shakespeare a b"),
           LocalityPair("what color is the sky", "blue green red"), LocalityPair("the river", None)]
    records = [fact("a b", "c", rephrases=["a"], locality=loc[:2]), fact("x y", "z", locality=loc[2:])]
    scorer = EditScorer(tok, base_model=m, records=records, batch_size=3)
    same = scorer.score(m, records)
    assert same["loc"] == 1.0 and same["n"] == 2 and same["n_loc"] == 2
    assert set(same) >= {"rel", "gen", "loc", "rel_em", "gen_em", "n"} and "rel_ppl" not in same

    # A resumed scorer keeps the unedited baseline.
    resumed = EditScorer(tok)
    resumed.load_state_dict(scorer.state_dict())
    with torch.no_grad():
        m.lm_head.weight.add_(torch.randn_like(m.lm_head.weight) * 5)
    changed = resumed.score(m, records)
    # The cached baseline is the unedited model's: Loc equals the agreement counted against a fresh copy.
    base = locality_predictions(make_model(len(tok), seed=1), tok, records)
    now = locality_predictions(m, tok, records)
    assert changed["loc"] == pytest.approx(loc_score(now, base)) and changed["loc"] < 1.0
    # Immediate scoring of one record works from the same cache.
    assert resumed.score(m, records[:1])["loc"] == pytest.approx(loc_score(now[:1], base[:1]))

    with pytest.raises(KeyError, match="prepare"):
        EditScorer(tok).score(m, records)


def test_perplexity_and_hallucination_scoring(tok):
    m = rigged(tok, "x")
    ppl = perplexity(m, tok, ["a b c", "a b c"], ["x x x", "y z y"])
    assert all(math.isfinite(p) for p in ppl) and ppl[0] < ppl[1]
    assert ppl[0] == pytest.approx(1.0, abs=1e-2)
    halluc = EditRecord(prompt="a b c", target_new="x x", kind="hallucination",
                        locality=[LocalityPair("the sky", "blue")])
    records = [halluc, fact("who", "x")]
    scorer = EditScorer(tok, base_model=m, records=records)
    out = scorer.score(m, records)
    assert out["rel_ppl"] == pytest.approx(1.0, abs=1e-2) and out["n_hallucination"] == 1
    assert out["rel"] == 1.0 and out["loc"] == 1.0 and math.isnan(out["gen"])


def test_empty_target_rejected(tok, model):
    with pytest.raises(ValueError, match="adds no tokens"):
        teacher_forced(model, tok, ["the capital of"], [""])


def test_edit_scorer_leaves_out_locality_prompts_an_edit_rewrites(tok):
    m = make_model(len(tok), seed=2)
    first = fact("a b", "c", locality=[LocalityPair("x y", "z"), LocalityPair("the river", "blue")])
    later = fact("x y", "paris")  # a later edit rewrites the first record's neighbour
    scorer = EditScorer(tok, base_model=m, records=[first, later])
    with torch.no_grad():
        m.lm_head.weight.add_(torch.randn_like(m.lm_head.weight) * 5)
    alone = scorer.score(m, [first])
    assert alone["n_loc_excluded"] == 0
    both = scorer.score(m, [first, later])
    assert both["n_loc_excluded"] == 1 and both["n_loc"] == 1
    river_only = fact("a b", "c", locality=[LocalityPair("the river", "blue")])
    assert both["loc"] == scorer.score(m, [river_only])["loc"]  # Loc scored on the kept pair alone
    # Immediate protocol: the record alone, against everything edited so far.
    assert scorer.score(m, [first], edited=[first, later])["n_loc_excluded"] == 1
