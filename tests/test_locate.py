"""Locating tools on tiny random Llama and GPT-2 models with a word-level tokenizer (no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lightning_edit.data import EditRecord
from lightning_edit.locate import (
    Site,
    dense_latents,
    StatsCache,
    StatsMismatchError,
    activations,
    compute_value,
    input_x_gradient,
    integrated_gradients,
    patched_objective,
    second_moment,
    subject_last_token,
)
from lightning_edit.models import ModelAdapter

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


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def arch_model(request, tok):
    build = make_llama if request.param == "llama" else make_gpt2
    return request.param, build(len(tok))


@pytest.fixture(scope="module")
def llama(tok) -> LlamaForCausalLM:
    return make_llama(len(tok))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on shared cores: one thread is much faster than two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Cache under tmp_path/cache and an empty cwd that must stay empty."""
    monkeypatch.setenv("LIGHTNING_EDIT_CACHE", str(tmp_path / "cache"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert not list(cwd.iterdir()), f"files written to the working directory: {list(cwd.iterdir())}"


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


@pytest.fixture(scope="module")
def trained(arch_model, tok):
    arch, _ = arch_model
    return train_on_facts((make_llama if arch == "llama" else make_gpt2)(len(tok), seed=3), tok)


# --- positions -----------------------------------------------------------------------------------


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


# --- activations ---------------------------------------------------------------------------------


def test_activations_equal_manual_mlp(arch_model, tok):
    arch, model = arch_model
    adapter = ModelAdapter(model)
    layer = 1
    manual = [manual_ffn_hidden(arch, model, tok, p, layer) for p in PROMPTS]
    last = activations(model, tok, adapter, layer, PROMPTS, position="last", batch_size=3)
    assert last.shape == (len(PROMPTS), 64)
    torch.testing.assert_close(last, torch.stack([m[-1] for m in manual]), atol=1e-5, rtol=1e-5)
    everything = activations(model, tok, adapter, layer, PROMPTS, position="all", batch_size=2)
    for got, want in zip(everything, manual):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    subj = activations(model, tok, adapter, layer, PROMPTS, position="subject_last",
                       subjects=["france", None, "x y z", "sky"])
    index = [4, -1, 3, 1]
    torch.testing.assert_close(subj, torch.stack([m[i] for m, i in zip(manual, index)]), atol=1e-5, rtol=1e-5)


class FakeCoder(nn.Module):
    """The coder interface the locators need: encode(x) -> (top_acts, top_indices), W_dec [n, d]."""

    def __init__(self, d_in: int, n: int, k: int):
        super().__init__()
        self.encoder, self.k = nn.Linear(d_in, n), k
        self.W_dec = nn.Parameter(torch.randn(n, d_in))

    def encode(self, x):
        acts, idx = self.encoder(x).topk(self.k, dim=-1)
        return acts.relu(), idx


def test_coder_latents(llama, tok):
    adapter = ModelAdapter(llama)
    torch.manual_seed(1)
    coder = FakeCoder(32, 48, 4)
    x = activations(llama, tok, adapter, 0, PROMPTS, site="mlp_input")
    z = activations(llama, tok, adapter, 0, PROMPTS, site="coder_latents", coder=coder)
    acts, idx = coder.encode(x)
    want = torch.zeros(len(PROMPTS), 48).scatter(-1, idx, acts)
    torch.testing.assert_close(z, want.detach())
    assert ((z != 0).sum(-1) <= 4).all()


# --- attribution ---------------------------------------------------------------------------------


def test_input_x_gradient_matches_finite_differences(tok):
    model = make_llama(len(tok)).double()
    adapter = ModelAdapter(model)
    prompt, target, layer = "the capital of france is", "paris", 0
    signed = input_x_gradient(model, tok, adapter, layer, prompt, target, signed=True)
    a = activations(model, tok, adapter, layer, [prompt])[0].double()
    eps = 1e-3  # Llama's RMSNorm computes in float32 even in a float64 model: not smaller
    for m in [0, 7, 31, 63]:
        bump = torch.zeros_like(a)
        bump[m] = eps
        up, down = patched_objective(model, tok, adapter, layer, prompt, target, torch.stack([a + bump, a - bump]),
                                     objective="logit")
        fd = a[m] * (up - down) / (2 * eps)
        assert signed[m].item() == pytest.approx(fd.item(), rel=1e-3, abs=1e-7)
    absolute = input_x_gradient(model, tok, adapter, layer, prompt, target)
    torch.testing.assert_close(absolute, signed.abs())


def test_integrated_gradients_completeness(trained, tok):
    adapter = ModelAdapter(trained)
    prompt, target, layer = "the capital of x y is", "city", 1
    attr = integrated_gradients(trained, tok, adapter, layer, prompt, target, steps=50)
    a = activations(trained, tok, adapter, layer, [prompt])
    full, base = patched_objective(trained, tok, adapter, layer, prompt, target, torch.cat([a, torch.zeros_like(a)]))
    gap = (full - base).item()
    assert abs(gap) > 0.1  # the check means something
    assert attr.sum().item() == pytest.approx(gap, rel=1e-2, abs=1e-3)
    chunked = integrated_gradients(trained, tok, adapter, layer, prompt, target, steps=50, batch_size=7)
    torch.testing.assert_close(chunked, attr, atol=1e-5, rtol=1e-4)


def test_attribution_at_subject_position_and_output_site(llama, tok):
    adapter = ModelAdapter(llama)
    prompt = "x y z lives in"
    attr = integrated_gradients(llama, tok, adapter, 0, prompt, "london", steps=8, position="subject_last",
                                subject="x y z", site=Site(adapter.mlp_name(0), "output"))
    assert attr.shape == (32,) and attr.abs().sum() > 0


# --- value solver --------------------------------------------------------------------------------


def next_token_with_delta(model, tok, adapter, layer, prompt, position, delta) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids

    def add(module, args, output):
        output = output.clone()
        output[0, position] += delta
        return output

    with torch.no_grad(), adapter.hooks({adapter.mlp_name(layer): add}):
        return tok.convert_ids_to_tokens(int(model(ids).logits[0, -1].argmax()))


def test_value_solver_makes_target_the_argmax(trained, tok):
    adapter = ModelAdapter(trained)
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    for subject, new in zip(SUBJECTS[:2], CAPITALS[2:]):
        record = EditRecord(prompt=f"the capital of {subject} is", target_new=new, subject=subject)
        zero = next_token_with_delta(trained, tok, adapter, 0, record.prompt, -1, 0.0)
        assert zero != new  # the model knows the old fact
        result = compute_value(trained, tok, adapter, 0, record, position="last", context_templates=("{}",))
        assert result.position == 6
        assert result.final_nll < 0.3 * result.losses[0]["nll"]
        assert result.delta.norm() <= 4.0 * result.original.norm() * (1 + 1e-5)
        torch.testing.assert_close(result.value, result.original + result.delta)
        assert next_token_with_delta(trained, tok, adapter, 0, record.prompt, result.position, result.delta) == new
    for name, tensor in trained.state_dict().items():  # the solve never writes into the model
        assert torch.equal(tensor, before[name]), name
    assert all(p.grad is None for p in trained.parameters())


def test_value_solver_at_subject_clamp_and_fallback(llama, tok):
    adapter = ModelAdapter(llama)
    record = EditRecord(prompt="the capital of x y z is", target_new="paris rome", subject="x y z")
    result = compute_value(llama, tok, adapter, 0, record, steps=6, clamp_norm_factor=0.1, nll_threshold=0.0)
    assert result.position == 6 and len(result.losses) == 6
    assert result.delta.norm() <= 0.1 * result.original.norm() * (1 + 1e-5)
    assert result.losses[-1]["nll"] < result.losses[0]["nll"]
    key = activations(llama, tok, adapter, 0, [record.prompt], position="subject_last", subjects=[record.subject])
    torch.testing.assert_close(result.key, key[0], atol=1e-5, rtol=1e-5)
    assert result.context_keys.shape == (4, 64)
    mlp_out = activations(llama, tok, adapter, 0, [record.prompt], position=6, site="mlp_output")
    torch.testing.assert_close(result.original, mlp_out[0], atol=1e-5, rtol=1e-5)
    # MEMIT's site: the residual stream after the layer; no key.
    memit = compute_value(llama, tok, adapter, 0, record, steps=2, value_site="layer_output", key_site=None)
    layer_out = activations(llama, tok, adapter, 0, [record.prompt], position=6, site="layer_output")
    torch.testing.assert_close(memit.original, layer_out[0], atol=1e-5, rtol=1e-5)
    assert memit.key is None and memit.context_keys is None
    # Without a subject: the key is the prompt's last token and there is no KL term.
    plain = compute_value(llama, tok, adapter, 1, EditRecord(prompt="who wrote hamlet", target_new="paris"), steps=2)
    assert plain.position == 3 and all(row["kl"] == 0 for row in plain.losses)


# --- second moment and its cache -----------------------------------------------------------------


def test_second_moment_equals_direct(arch_model, tok):
    _, model = arch_model
    adapter = ModelAdapter(model)
    stats = second_moment(model, tok, adapter, 1, CORPUS, batch_size=4, cache=False, return_stats=True,
                          progress=False, dtype=torch.float64)
    rows = torch.cat([a[1:] for a in activations(model, tok, adapter, 1, CORPUS, position="all")]).double()
    assert stats.count == rows.shape[0] == sum(len(t.split()) for t in CORPUS)  # BOS excluded
    torch.testing.assert_close(stats.second_moment, rows.T @ rows / rows.shape[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats.mean, rows.mean(0), atol=1e-6, rtol=1e-5)


class CountForwards:
    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, *args):
        self.n += 1


def test_second_moment_cache(llama, tok, tmp_path):
    adapter = ModelAdapter(llama)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    counter = CountForwards(llama)
    first = second_moment(llama, tok, adapter, 0, corpus, n_samples=5, batch_size=2, progress=False)
    assert counter.n == 3 and first.shape == (64, 64)
    files = sorted((tmp_path / "cache" / "stats").rglob("*"))
    assert [f.suffix for f in files if f.is_file()] == [".json", ".safetensors"]

    again = second_moment(llama, tok, adapter, 0, corpus, n_samples=5, batch_size=2, progress=False)
    assert counter.n == 3 and torch.equal(again, first)  # a hit: no forward at all

    # Editing the layer's own down projection leaves its keys, hence the cache, valid.
    with torch.no_grad():
        adapter.down_proj_weight(0)[:, 3] += 1.0
    assert torch.equal(second_moment(llama, tok, adapter, 0, corpus, n_samples=5, progress=False), first)
    assert counter.n == 3

    # A weight feeding the keys changed: the old file is rejected, naming itself and the field.
    gate = next(p for n, p in adapter.layer(0).named_parameters() if "mlp" in n and "down" not in n)
    with torch.no_grad():
        gate.mul_(1.5)
    with pytest.raises(StatsMismatchError, match=r"layer0-down_proj_input.*'weights'"):
        second_moment(llama, tok, adapter, 0, corpus, n_samples=5, progress=False)
    fresh = second_moment(llama, tok, adapter, 0, corpus, n_samples=5, progress=False, recompute=True)
    assert not torch.equal(fresh, first)
    assert torch.equal(second_moment(llama, tok, adapter, 0, corpus, n_samples=5, progress=False), fresh)

    # The corpus file changed on disk.
    os.utime(corpus, ns=(1, 1))
    with pytest.raises(StatsMismatchError, match=r"'corpus_version'"):
        second_moment(llama, tok, adapter, 0, corpus, n_samples=5, progress=False)
    counter.handle.remove()


def test_second_moment_cache_rejects_edited_sidecar_and_bad_shape(llama, tok, tmp_path):
    adapter = ModelAdapter(llama)
    cache = StatsCache(tmp_path / "stats")
    second_moment(llama, tok, adapter, 1, CORPUS, cache=cache, progress=False)
    [sidecar] = list((tmp_path / "stats").rglob("*.json"))
    tensors = sidecar.with_suffix(".safetensors")
    meta = json.loads(sidecar.read_text())
    meta["key"]["max_length"] = 7
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(StatsMismatchError) as err:
        second_moment(llama, tok, adapter, 1, CORPUS, cache=cache, progress=False)
    assert str(tensors) in str(err.value) and "'max_length'" in str(err.value)

    second_moment(llama, tok, adapter, 1, CORPUS, cache=cache, progress=False, recompute=True)
    save_file({"second_moment": torch.zeros(3, 3), "mean": torch.zeros(3)}, str(tensors))
    with pytest.raises(StatsMismatchError, match=r"'shape'"):
        second_moment(llama, tok, adapter, 1, CORPUS, cache=cache, progress=False)
    tensors.unlink()
    with pytest.raises(StatsMismatchError, match="has no statistics file"):
        second_moment(llama, tok, adapter, 1, CORPUS, cache=cache, progress=False)


def test_second_moment_of_coder_latents_and_storage_dtype(llama, tok):
    adapter = ModelAdapter(llama)
    torch.manual_seed(2)
    coder = FakeCoder(32, 48, 4)
    c = second_moment(llama, tok, adapter, 0, CORPUS, site="coder_latents", coder=coder, dtype=torch.bfloat16,
                      progress=False)
    assert c.shape == (48, 48) and c.dtype == torch.bfloat16
    z = torch.cat([a[1:] for a in activations(llama, tok, adapter, 0, CORPUS, position="all",
                                              site="coder_latents", coder=coder)])
    torch.testing.assert_close(c.float(), (z.T @ z / z.shape[0]).bfloat16().float())
    assert Path(os.environ["LIGHTNING_EDIT_CACHE"], "stats").is_dir()


class TranscoderMLP(nn.Module):
    """A coder spliced in for an MLP, as TCPE does: output = dense latents @ W_dec."""

    def __init__(self, coder: FakeCoder):
        super().__init__()
        self.coder = coder

    def forward(self, x):
        return dense_latents(self.coder, x) @ self.coder.W_dec


def test_coder_statistics_survive_decoder_edits(llama, tok):
    adapter = ModelAdapter(llama)
    torch.manual_seed(3)
    coder = FakeCoder(32, 48, 4)
    counter = CountForwards(llama)
    with adapter.swap(adapter.mlp_name(1), TranscoderMLP(coder)):
        first = second_moment(llama, tok, adapter, 1, CORPUS, site="coder_latents", coder=coder, progress=False)
        with torch.no_grad():
            coder.W_dec.mul_(2.0)  # TCPE edits decoder columns: the latents, hence C, are unchanged
        assert torch.equal(second_moment(llama, tok, adapter, 1, CORPUS, site="coder_latents", coder=coder,
                                         progress=False), first)
        assert counter.n == 1
        with torch.no_grad():
            coder.encoder.weight.mul_(2.0)
        with pytest.raises(StatsMismatchError, match="'coder'"):
            second_moment(llama, tok, adapter, 1, CORPUS, site="coder_latents", coder=coder, progress=False)
    counter.handle.remove()


def test_two_in_memory_corpora_get_their_own_cache_files(llama, tok, tmp_path):
    adapter = ModelAdapter(llama)
    store = StatsCache(tmp_path)
    full = second_moment(llama, tok, adapter, 0, CORPUS, cache=store, progress=False)
    part = second_moment(llama, tok, adapter, 0, CORPUS[:2], cache=store, progress=False)  # no mismatch error
    assert not torch.equal(full, part)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2
    assert torch.equal(second_moment(llama, tok, adapter, 0, CORPUS[:2], cache=store, progress=False), part)
