"""`model.device_map` (issue 14 §3) on CPU: maps are checked, an explicit map loads through accelerate
(here with a layer offloaded to disk, the one split torch allows on a CPU-only machine), an offloaded
layer runs but refuses edits, and every editor runs a stream on a model split into two shards by
accelerate's hooks. Real placement over several GPUs is not verifiable here (README: GPU paths)."""

from __future__ import annotations

import pytest
import torch

from lightning_edit.config import load_config
from lightning_edit.editors import EDITORS
from lightning_edit.jobs.edit import SCHEMA
from lightning_edit.jobs.edit_run import _container, new_editor
from lightning_edit.metrics import teacher_forced
from lightning_edit.models import ModelAdapter, load_model, offloaded_modules

from tests.helpers import short_stream

pytest.importorskip("accelerate")

SHARDS = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
          "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("device_map, message", [
    ("everywhere", "not a strategy"),
    ({"model.layers.0": 1.5}, "not module name -> device"),
    ({}, "non-empty"),
])
def test_bad_device_maps_are_named(small_world, device_map, message):
    with pytest.raises(ValueError, match=message):
        load_model(str(small_world.model_dir), device_map=device_map)


def test_device_map_is_a_model_config_key():
    cfg = load_config(SCHEMA, ["model.device_map={model.layers.0: 0, lm_head: cpu}"])
    assert _container(cfg.model.device_map) == {"model.layers.0": 0, "lm_head": "cpu"}
    assert load_config(SCHEMA, ["model.device_map=auto"]).model.device_map == "auto"


def test_offloaded_layer_runs_but_refuses_edits(small_world, small_corpus, stream_records, stats_dir):
    plain, tokenizer = load_model(str(small_world.model_dir))
    model, _ = load_model(str(small_world.model_dir), device_map={**SHARDS, "model.layers.1": "disk"})
    assert model.hf_device_map["model.layers.1"] == "disk"
    assert any(name.startswith("model.layers.1.") for name in offloaded_modules(model))
    ids = tokenizer([r.prompt for r in stream_records[:3]], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, plain(**ids).logits)  # the offloaded layer really runs
    adapter = ModelAdapter(model)
    assert adapter.layer_device(1) == torch.device("cpu")  # its execution device, not meta
    with pytest.raises(ValueError, match=r"layer 1.*offloaded by model.device_map"):
        adapter.down_proj_weight(1)
    # ROME at the resident layer 0 edits through the offloaded layer 1.
    record = stream_records[0]
    editor = new_editor("rome", {"layer": 0, "position": "last", "context_templates": ["{}"], "v_steps": 20},
                        model, tokenizer, adapter, {}, "toyworld-small")
    editor.prepare(small_corpus[:100])
    before = teacher_forced(model, tokenizer, [record.prompt], [record.target_new])[0].nll
    editor.apply([record])
    assert teacher_forced(model, tokenizer, [record.prompt], [record.target_new])[0].nll < before - 0.1
    # ROME at the offloaded layer says so instead of losing the edit.
    editor = new_editor("rome", {"layer": 1, "position": "last", "context_templates": ["{}"], "v_steps": 2},
                        model, tokenizer, adapter, {}, "toyworld-small")
    editor.prepare(small_corpus[:100])
    with pytest.raises(ValueError, match="offloaded"):
        editor.apply([stream_records[1]])


@pytest.mark.parametrize("method", sorted(EDITORS))
def test_every_editor_runs_on_accelerate_shards(method, small_world, small_sae, small_transcoder, small_corpus,
                                                 stream_records, stats_dir):
    from accelerate import dispatch_model

    model, tokenizer = load_model(str(small_world.model_dir), device_map=SHARDS)
    # Both shards are CPU, so accelerate adds no hooks by itself: force them, as a multi-GPU map would.
    model = dispatch_model(model, device_map=SHARDS, main_device="cpu", force_hooks=True)
    assert hasattr(model.model.layers[1], "_hf_hook") and not offloaded_modules(model)
    _, before, after = short_stream(method, model, tokenizer, stream_records[:2], small_corpus[:200], small_sae,
                                    small_transcoder, stats_dir)
    assert after < before - 0.1, (method, before, after)
