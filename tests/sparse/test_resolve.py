"""Loading an editor's component (lightning_edit.sparse.resolve): kind and width checked, hookpoint recorded."""

from __future__ import annotations

import pytest

from lightning_edit.models import ModelAdapter, load_model
from lightning_edit.sparse import SparseCoderFormatError
from lightning_edit.sparse.resolve import coder_folder, load_component


@pytest.fixture(scope="module")
def adapter(small_world):
    return ModelAdapter(load_model(str(small_world.model_dir))[0])


def test_a_component_loads_from_its_folder_or_a_root_of_hookpoints(small_sae, adapter):
    folder, hookpoint = small_sae
    assert coder_folder(folder.parent, hookpoint) == folder and coder_folder(folder, hookpoint) == folder
    for path in (folder, folder.parent):
        sae = load_component(path, hookpoint, "sae", adapter)
        assert sae.hookpoint == hookpoint and not sae.is_transcoder


def test_the_other_kind_or_another_width_is_refused(small_sae, small_transcoder, adapter):
    with pytest.raises(ValueError, match="MicroEdit needs an SAE, got a transcoder"):
        load_component(small_transcoder[0], small_transcoder[1], "sae", adapter, who="MicroEdit")
    with pytest.raises(ValueError, match="TCPE needs a transcoder, got an SAE"):
        load_component(small_sae[0], small_transcoder[1], "transcoder", adapter, who="TCPE")
    with pytest.raises(SparseCoderFormatError, match="hookpoint 'layers.0.mlp' has d_out=.*the model has width"):
        load_component(small_transcoder[0], "layers.0.mlp", "transcoder", _Narrow(adapter))  # another model's width
    with pytest.raises(ValueError, match="unknown component kind 'dense'"):
        load_component(small_sae[0], small_sae[1], "dense", adapter)


class _Narrow:
    """An adapter whose MLP output is one unit narrower than the small world's."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.hidden_size = adapter.hidden_size

    def hookpoint_io_dims(self, hookpoint):
        d_in, d_out = self.adapter.hookpoint_io_dims(hookpoint)
        return d_in, d_out - 1
