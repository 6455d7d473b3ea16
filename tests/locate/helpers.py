"""Tiny models, a word-level tokenizer and stand-ins for the locate tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lightning_edit.locate import dense_latents


WORDS = ("the capital of france is paris rome berlin madrid who wrote hamlet shakespeare a b c d e "
         "x y z city river mountain plays sings music lives in london tokyo language speaks english "
         "french german sky blue green red color what was born It quiet morning . The weather mild "
         "that day Everyone gathered for meeting").split()


PROMPTS = ["the capital of france is", "who wrote hamlet", "x y z lives in london and speaks", "sky"]


CORPUS = ["the capital of france is paris .", "who wrote hamlet ? shakespeare", "x y z lives in tokyo",
          "the sky is blue", "a b c d e", "london is a city . paris is a city . rome is a city"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(WORDS + ["?", "and"])))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()


def make_gpt2(vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=vocab, n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=1, eos_token_id=2)).eval()


def manual_ffn_hidden(arch: str, model: nn.Module, tok, prompt: str, layer: int) -> torch.Tensor:
    """The FFN hidden neurons [T, d_ff] recomputed by hand from the MLP's input."""
    ids = tok(prompt, return_tensors="pt").input_ids
    mlp = model.model.layers[layer].mlp if arch == "llama" else model.transformer.h[layer].mlp
    seen = []
    handle = mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(ids)
        handle.remove()
        x = seen[0][0]
        if arch == "llama":
            return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        return mlp.act(mlp.c_fc(x))


SUBJECTS = ["x y", "a b", "c d", "e z"]


CAPITALS = ["paris", "rome", "berlin", "madrid"]


def train_on_facts(model: nn.Module, tok, steps: int = 150) -> nn.Module:
    """A few full-batch Adam steps on "the capital of {s} is {o}": enough to know the facts."""
    texts = [f"the capital of {s} is {o}" for s, o in zip(SUBJECTS, CAPITALS)] + [f"{s} is a city" for s in SUBJECTS]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


class FakeCoder(nn.Module):
    """The coder interface the locators need: encode(x) -> (top_acts, top_indices), W_dec [n, d]."""

    def __init__(self, d_in: int, n: int, k: int):
        super().__init__()
        self.encoder, self.k = nn.Linear(d_in, n), k
        self.W_dec = nn.Parameter(torch.randn(n, d_in))

    def encode(self, x):
        acts, idx = self.encoder(x).topk(self.k, dim=-1)
        return acts.relu(), idx


def next_token_with_delta(model, tok, adapter, layer, prompt, position, delta) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids

    def add(module, args, output):
        output = output.clone()
        output[0, position] += delta
        return output

    with torch.no_grad(), adapter.hooks({adapter.mlp_name(layer): add}):
        return tok.convert_ids_to_tokens(int(model(ids).logits[0, -1].argmax()))


class CountForwards:
    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, *args):
        self.n += 1


class TranscoderMLP(nn.Module):
    """A coder spliced in for an MLP, as TCPE does: output = dense latents @ W_dec."""

    def __init__(self, coder: FakeCoder):
        super().__init__()
        self.coder = coder

    def forward(self, x):
        return dense_latents(self.coder, x) @ self.coder.W_dec
