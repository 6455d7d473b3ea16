"""Token positions (lightning_edit.locate.positions): the subject's last token."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from lightning_edit.locate import subject_last_token

from tests.locate.helpers import CORPUS


def test_subject_last_token(tok):
    prompt = "who wrote x y z lives in"
    ids = tok(prompt).input_ids
    i = subject_last_token(tok, prompt, "x y z")
    assert tok.convert_ids_to_tokens(ids)[i] == "z" and i == 5
    assert subject_last_token(tok, prompt, "X Y Z") == 5  # case-insensitive fallback
    assert subject_last_token(tok, prompt, "paris") == len(ids) - 1  # not in the prompt
    assert subject_last_token(tok, prompt, None) == len(ids) - 1


def test_subject_last_token_byte_level_bpe():
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 20, vocab_size=300, min_frequency=1, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    prompt = "The capital of Franceland is"
    ids = tok(prompt).input_ids
    i = subject_last_token(tok, prompt, "Franceland")
    assert tok.decode(ids[:i + 1]) == "The capital of Franceland"
