"""A word-level tokenizer for the world, trained locally with `tokenizers` and wrapped for transformers.

Words are split on whitespace and punctuation (`Whitespace` pre-tokenizer), so `prompt + " " + target`
ends in the target's own tokens; the post-processor puts <bos> in front of every sequence, as Llama's
tokenizer does, and nothing at the end (teacher-forced metrics append targets after the prompt).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
"""In id order: <pad>=0, <bos>=1, <eos>=2, <unk>=3."""


def train_tokenizer(texts: Iterable[str], model_max_length: int) -> PreTrainedTokenizerFast:
    """WordLevel vocabulary of every word in `texts` (sorted by the trainer: frequency, then text)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=model_max_length, padding_side="right")


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """`save_pretrained`, naming the class `PreTrainedTokenizerFast` so transformers 4.x loads it too."""
    tokenizer.save_pretrained(directory)
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def check_single_tokens(tokenizer: PreTrainedTokenizerFast, words: Iterable[str]) -> None:
    """Objects must be exactly one known token each; say which is not."""
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ValueError(f"object '{word}' tokenises to {ids}, expected one known token")
