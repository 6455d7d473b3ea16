"""GPU paths (issue 14 §2-3), run by bench/gpu_check.sh: every editor's short stream in bfloat16 on
CUDA, and on a model whose layers compute on two devices (embeddings and layer 0 on the GPU, layer 1
and the head on the CPU, hidden states moved between them by accelerate's hooks, as a multi-GPU
device map places them). Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

from lightning_edit.editors import EDITORS
from lightning_edit.models import ModelAdapter, load_model

from tests.helpers import short_stream

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("method", sorted(EDITORS))
def test_bf16_stream_on_cuda(method, small_world, small_sae, small_transcoder, small_corpus, stream_records,
                             stats_dir):
    model, tokenizer = load_model(str(small_world.model_dir), dtype="bfloat16", device="cuda")
    editor, before, after = short_stream(method, model, tokenizer, stream_records[:2], small_corpus[:200],
                                         small_sae, small_transcoder, stats_dir)
    assert editor.device.type == "cuda"
    assert after < before - 0.1, (method, before, after)


def split_over_cuda_and_cpu(model):
    """Embeddings and layer 0 compute on cuda:0, layer 1, the final norm and the head on the CPU."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    adapter = ModelAdapter(model)
    model.to("cuda:0")
    for module in (model.get_input_embeddings(), adapter.layer(0)):
        add_hook_to_module(module, AlignDevicesHook(execution_device=torch.device("cuda:0")))
    for module in (adapter.layer(1), adapter.final_norm, model.get_output_embeddings()):
        module.to("cpu")
        add_hook_to_module(module, AlignDevicesHook(execution_device=torch.device("cpu")))
    return model


@pytest.mark.parametrize("method", sorted(EDITORS))
def test_stream_on_a_model_split_over_two_devices(method, small_world, small_sae, small_transcoder, small_corpus,
                                                   stream_records, stats_dir):
    model, tokenizer = load_model(str(small_world.model_dir))
    model = split_over_cuda_and_cpu(model)
    adapter = ModelAdapter(model)
    assert adapter.layer_device(0).type == "cuda" and adapter.layer_device(1).type == "cpu"
    _, before, after = short_stream(method, model, tokenizer, stream_records[:2], small_corpus[:200], small_sae,
                                    small_transcoder, stats_dir)
    assert after < before - 0.1, (method, before, after)
