"""The component an editor asks for, found before it is built (lightning_edit.jobs.components)."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from lightning_edit.editors import ComponentRequest
from lightning_edit.jobs.components import default_component, resolve_component
from lightning_edit.models import ModelAdapter, load_model


@pytest.fixture(scope="module")
def model(small_world):
    return load_model(str(small_world.model_dir))[0]


def test_no_request_no_component(model):
    assert resolve_component(None, {"path": "/nowhere"}, model, ModelAdapter(model), None, "m") is None


def test_a_missing_path_off_an_embedded_world_names_what_to_train(model):
    adapter = ModelAdapter(model)
    with pytest.raises(ValueError, match=r"component.path is not set and model .* is not an embedded world: give "
                                         r"MicroEdit a top-k sae .* \(train_sae.py hookpoints=\[layers.0\]\)"):
        resolve_component(ComponentRequest("sae", "layers.0", "MicroEdit"), {}, model, adapter, None, "m")
    with pytest.raises(ValueError, match=r"PNKE: set component.path to a transcoder trained on 'layers.0.mlp' "
                                         r"\(train_transcoder.py hookpoints=\[layers.0.mlp\]\)"):
        resolve_component(ComponentRequest("transcoder", "layers.0.mlp", "PNKE", trains_default=False), {}, model,
                          adapter, SimpleNamespace(root="unused"), "m")


def test_the_world_default_is_found_in_its_cache_named_by_its_recipe(small_sae, model, tmp_path):
    folder, hookpoint = small_sae
    world = SimpleNamespace(root=tmp_path, name="toyworld-small")
    cached = tmp_path / "sae" / f"{hookpoint}-k32-expansion_factor=64"  # configs/sae.yaml's k, the override's tag
    shutil.copytree(folder, cached / hookpoint)
    assert default_component(world, "sae", hookpoint, ["coder.expansion_factor=64"]) == cached  # no training
    request = ComponentRequest("sae", hookpoint, "MicroEdit", default_overrides=("coder.expansion_factor=64",))
    sae = resolve_component(request, {"path": None}, model, ModelAdapter(model), world, "toyworld-small")
    assert sae.hookpoint == hookpoint and sae.W_dec.shape[0] == 512
