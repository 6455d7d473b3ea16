"""Tokenisation (lightning_edit.tokens): target positions of prompt + target."""

from __future__ import annotations

import pytest

from lightning_edit.tokens import target_positions

from tests.helpers import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_target_positions_are_the_targets(tok):
    ids, start = target_positions(tok, "the capital of france is", "paris city")
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "the", "capital", "of", "france", "is", "paris", "city"]
    assert start == 6 and tok.convert_ids_to_tokens(ids[start:]) == ["paris", "city"]


def test_target_positions_with_eos_appending_tokenizer():
    eos_tok = make_tokenizer(eos_at_end=True)
    ids, start = target_positions(eos_tok, "who wrote hamlet", "shakespeare")
    # The prompt's own <eos> must not be taken as part of the joint sequence's prefix or target.
    assert eos_tok.convert_ids_to_tokens(ids) == ["<bos>", "who", "wrote", "hamlet", "shakespeare"]
    assert eos_tok.convert_ids_to_tokens(ids[start:]) == ["shakespeare"]
