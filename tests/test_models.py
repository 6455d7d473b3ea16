"""ModelAdapter and load_model on tiny random models of four architectures (no network)."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.pytorch_utils import Conv1D

import lightning_edit.models as models_module
from lightning_edit.models import ModelAdapter, hidden_of, load_model, with_hidden

VOCAB, HIDDEN, D_FF, LAYERS = 100, 32, 64, 3
SPECIAL = {"bos_token_id": 1, "eos_token_id": 2}


def _llama() -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=D_FF, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **SPECIAL))


def _gpt2() -> nn.Module:
    # GPT-2's d_ff is fixed at 4 * n_embd unless n_inner is set.
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_inner=D_FF, n_layer=LAYERS, n_head=4, n_positions=64, **SPECIAL))


def _qwen2() -> nn.Module:
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=D_FF, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **SPECIAL))


def _neox() -> nn.Module:
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=D_FF, num_hidden_layers=LAYERS,
        num_attention_heads=4, max_position_embeddings=64, **SPECIAL))


# arch -> (builder, base_model_prefix, layers_name, MLP child name, final norm type)
ARCHS = {
    "llama": (_llama, "model", "layers", "mlp", "LlamaRMSNorm"),
    "gpt2": (_gpt2, "transformer", "h", "mlp", "LayerNorm"),
    "qwen2": (_qwen2, "model", "layers", "mlp", "Qwen2RMSNorm"),
    "neox": (_neox, "gpt_neox", "layers", "mlp", "LayerNorm"),
}
INPUT_IDS = torch.tensor([[3, 14, 15, 92, 65, 35]])


@pytest.fixture(params=list(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def adapter(arch: str) -> ModelAdapter:
    torch.manual_seed(0)
    return ModelAdapter(ARCHS[arch][0]().eval())


def logits(adapter: ModelAdapter) -> torch.Tensor:
    with torch.no_grad():
        return adapter.model(INPUT_IDS).logits


def test_structure(arch: str, adapter: ModelAdapter) -> None:
    _, prefix, layers_name, mlp_child, norm_type = ARCHS[arch]
    assert adapter.base_model_prefix == prefix
    assert adapter.base_model is adapter.model.get_submodule(prefix)
    assert adapter.layers_name == layers_name
    assert adapter.num_layers == LAYERS and len(adapter.layers) == LAYERS
    assert adapter.hidden_size == HIDDEN
    for i in range(LAYERS):
        assert adapter.layer(i) is adapter.layers[i]
        assert adapter.mlp_name(i) == f"{layers_name}.{i}.{mlp_child}"
        assert adapter.mlp(i) is getattr(adapter.layer(i), mlp_child)
        assert adapter.intermediate_size(i) == D_FF
        assert isinstance(adapter.down_proj(i), Conv1D if arch == "gpt2" else nn.Linear)
        assert adapter.down_proj_weight(i).shape == (HIDDEN, D_FF)
    assert type(adapter.final_norm).__name__ == norm_type
    assert adapter.embeddings is adapter.model.get_input_embeddings()
    assert adapter.unembedding is adapter.model.get_output_embeddings()
    assert adapter.unembedding_weight.shape == (VOCAB, HIDDEN)


def test_down_proj_weight_aliases_parameter(adapter: ModelAdapter) -> None:
    before = logits(adapter)
    weight = adapter.down_proj_weight(1)
    with torch.no_grad():
        weight[:, 5] += 1.0
    param = adapter.down_proj(1).weight
    # Column 5 of [d_model, d_ff] is neuron 5's output direction, whatever the storage layout.
    assert weight.data_ptr() == param.data_ptr()
    assert not torch.allclose(logits(adapter), before)


def test_attention_as_wide_as_mlp_is_not_the_mlp() -> None:
    # heads * head_dim == d_ff: o_proj and down_proj both map d_ff -> hidden.
    model = GemmaForCausalLM(GemmaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=D_FF, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=D_FF // 4, **SPECIAL))
    adapter = ModelAdapter(model)
    assert adapter.down_proj_name(0) == "layers.0.mlp.down_proj"
    assert adapter.down_proj_weight(1).shape == (HIDDEN, D_FF)


def test_resolve_hookpoints(adapter: ModelAdapter) -> None:
    layers = adapter.layers_name
    assert adapter.resolve_hookpoints(f"{layers}.*") == [f"{layers}.{i}" for i in range(LAYERS)]
    assert adapter.resolve_hookpoints(f"{layers}.*.mlp") == [adapter.mlp_name(i) for i in range(LAYERS)]
    assert adapter.resolve_hookpoints([f"{layers}.2", f"{layers}.0"]) == [f"{layers}.0", f"{layers}.2"]
    with pytest.raises(ValueError, match=r"'nope\.\*'.*e\.g\."):
        adapter.resolve_hookpoints(["nope.*"])
    with pytest.raises(ValueError, match="no module 'nope'"):
        adapter.module("nope")
    assert adapter.hookpoint_io_dims(adapter.mlp_name(0)) == (HIDDEN, HIDDEN)
    assert adapter.hookpoint_io_dims(f"{layers}.1") == (HIDDEN, HIDDEN)
    assert adapter.hookpoint_io_dims(adapter.down_proj_name(0)) == (D_FF, HIDDEN)


def test_depth_relative_notation(adapter: ModelAdapter) -> None:
    """`layers.<layer>` names the decoder layers whatever the model calls them; <layer> is an index,
    negative from the last, or a percentage of depth (nearest layer, 0% the first, 100% the last)."""
    layers, last = adapter.layers_name, LAYERS - 1
    assert adapter.resolve_hookpoint("layers.-1") == f"{layers}.{last}"
    assert adapter.resolve_hookpoint("layers.0.mlp") == adapter.mlp_name(0)
    assert adapter.resolve_hookpoint("layers.50%.mlp") == adapter.mlp_name(1)  # 0.5 * 2 = 1
    assert adapter.resolve_hookpoint("layers.100%") == f"{layers}.{last}"
    assert adapter.resolve_hookpoint("layers.12.5%") == f"{layers}.0"  # 0.125 * 2 = 0.25 -> 0
    assert adapter.resolve_hookpoint(f"{layers}.-3.mlp") == adapter.mlp_name(0)
    assert adapter.resolve_hookpoint(adapter.down_proj_name(1)) == adapter.down_proj_name(1)
    assert adapter.resolve_hookpoints(["layers.*.mlp"]) == [adapter.mlp_name(i) for i in range(LAYERS)]
    assert adapter.resolve_hookpoints(["layers.-1", "layers.0%"]) == [f"{layers}.0", f"{layers}.{last}"]
    assert adapter.resolve_layers([0, -1, "25%", "75%", "-2", "1"]) == [0, last, 1, 2, 1, 1]  # 75%: 1.5 -> 2
    for bad, message in [("layers.3", "has 3 layers"), ("layers.101%", r"0%\.\.100%"),
                         ("layers.x", "percentage of depth"), ("layers.1.nope", "no module")]:
        with pytest.raises(ValueError, match=message):
            adapter.resolve_hookpoint(bad)
    with pytest.raises(ValueError, match=r"editor\.layer is True"):
        adapter.resolve_layer(True, "editor.layer")


def test_hooks_change_logits_and_are_removed(adapter: ModelAdapter) -> None:
    before = logits(adapter)
    hookpoint = f"{adapter.layers_name}.1"

    def zero(module, args, output):
        return with_hidden(output, torch.zeros_like(hidden_of(output)))

    with adapter.hooks({hookpoint: zero}):
        assert not torch.allclose(logits(adapter), before)
    assert torch.allclose(logits(adapter), before)
    assert not adapter.module(hookpoint)._forward_hooks

    with pytest.raises(RuntimeError, match="boom"), adapter.hooks({adapter.mlp_name(0): zero}):
        raise RuntimeError("boom")
    assert not adapter.mlp(0)._forward_hooks

    def zero_input(module, args):
        return (torch.zeros_like(args[0]), *args[1:])

    with adapter.hooks({adapter.mlp_name(0): zero_input}, kind="forward_pre"):
        assert not torch.allclose(logits(adapter), before)
    assert not adapter.mlp(0)._forward_pre_hooks
    with pytest.raises(ValueError, match="'backward'"), adapter.hooks({}, kind="backward"):
        pass


class Zero(nn.Module):
    """An MLP replacement that writes nothing to the residual stream."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_swap_changes_output_and_restores(adapter: ModelAdapter) -> None:
    before, original = logits(adapter), adapter.mlp(1)
    with adapter.swap(adapter.mlp_name(1), Zero()) as swapped_out:
        assert swapped_out is original and isinstance(adapter.mlp(1), Zero)
        assert not torch.allclose(logits(adapter), before)
    assert adapter.mlp(1) is original and torch.allclose(logits(adapter), before)
    with pytest.raises(RuntimeError, match="boom"), adapter.swap(adapter.mlp_name(1), Zero()):
        raise RuntimeError("boom")
    assert adapter.mlp(1) is original


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_load_model_round_trip(adapter: ModelAdapter, tmp_path: Path) -> None:
    adapter.model.save_pretrained(tmp_path)
    _tokenizer().save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    assert not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    ids = tokenizer("w5 w17 w42", return_tensors="pt").input_ids
    assert ids.tolist() == [[5, 17, 42]]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, adapter.model(ids).logits, atol=1e-5)
    assert ModelAdapter(model).mlp_name(0) == adapter.mlp_name(0)

    half, _ = load_model(str(tmp_path), dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_load_model_resolves_world_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _llama().save_pretrained(tmp_path)
    _tokenizer().save_pretrained(tmp_path)
    monkeypatch.setattr(models_module, "resolve_model_path", lambda name: tmp_path if name == "toyworld" else None)
    model, _ = load_model("toyworld")
    assert ModelAdapter(model).num_layers == LAYERS


def test_load_model_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(OSError, match=f"could not load model '{missing}'"):
        load_model(missing)
    with pytest.raises(ValueError, match=r"'float8'.*bfloat16"):
        load_model(missing, dtype="float8")
    with pytest.raises(OSError, match="could not load model .* has no config.json"):
        load_model(str(tmp_path))  # exists, but holds no checkpoint
    # Offline mode makes the hub miss immediate instead of a minute of retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="could not load model 'no-such-org/no-such-model': not a local"):
        load_model("no-such-org/no-such-model")
