"""The worlds' tokenizers, trained locally with `tokenizers` on the world's own text and wrapped for
transformers as `PreTrainedTokenizerFast`.

- Word level (`toyworld`): words are split on whitespace and punctuation (`Whitespace`
  pre-tokenizer), so `prompt + " " + target` ends in the target's own tokens; the post-processor puts
  <bos> in front of every sequence, as Llama's tokenizer does, and nothing at the end (teacher-forced
  metrics append targets after the prompt). Every object is one token.
- Byte-level BPE (`toyworld-gpt2`), GPT-2's scheme: GPT-2's pre-tokenizer regex on bytes, no prefix
  space, so a word after a space is a different token ("Ġword") from the same word at the start of a
  text, and `prompt + " " + target` still ends in the target's own tokens (the space belongs to the
  target's first token); words and objects are split into several tokens. One special token,
  <|endoftext|>, is BOS, EOS and UNK at once; nothing is added to a text and there is no pad token
  (GPT-2's tokenizer has none: `load_model` pads with EOS).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
"""In id order: <pad>=0, <bos>=1, <eos>=2, <unk>=3."""
ENDOFTEXT = "<|endoftext|>"
"""The byte-level BPE's only special token (id 0), as in GPT-2."""


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


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE of `vocab_size` tokens (the 256 bytes and <|endoftext|> included)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT,
        model_max_length=model_max_length, padding_side="right")


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """`save_pretrained`, naming the class `PreTrainedTokenizerFast` so transformers 4.x loads it too."""
    tokenizer.save_pretrained(directory)
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def check_targets(tokenizer: PreTrainedTokenizerFast, prompts_and_targets: Iterable[tuple[str, str]]) -> None:
    """Every target must be well defined after its prompt: `prompt + " " + target` tokenises to the
    prompt's tokens followed by the target's own, with no unknown token; say which is not."""
    for prompt, target in prompts_and_targets:
        alone = tokenizer(prompt)["input_ids"]
        full = tokenizer(f"{prompt} {target}")["input_ids"]
        own = tokenizer(f" {target}", add_special_tokens=False)["input_ids"]
        if full != alone + own or tokenizer.unk_token_id in full:
            raise ValueError(f"target {target!r} after prompt {prompt!r} tokenises to {full}, expected the "
                             f"prompt's {alone} followed by the target's own {own}")


def check_single_tokens(tokenizer: PreTrainedTokenizerFast, words: Iterable[str]) -> None:
    """Objects must be exactly one known token each; say which is not."""
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ValueError(f"object '{word}' tokenises to {ids}, expected one known token")
