"""Sparse coder checkpoints (lightning_edit.sparse.formats): sparsify and SAELens layouts, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_edit.sparse import SparseCoderConfig, SparseCoderFormatError, TopKSparseCoder, check_width
from lightning_edit.sparse.formats import (load_saelens, load_sparse_coder, load_sparse_coders, load_sparsify,
                                           saelens_hook_name, save_saelens, save_sparse_coders, save_sparsify)

from tests.sparse.helpers import D_IN, K, N_LATENTS, _assert_same, _trained_like, batch, make_sae, make_transcoder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsify_round_trip_is_bit_exact(tmp_path, dtype):
    for coder in (make_sae(multi_topk=True), make_transcoder(skip_connection=True)):
        coder = _trained_like(coder).to(dtype)
        save_sparsify(coder, tmp_path / coder.cfg.mode)
        cfg = json.loads((tmp_path / coder.cfg.mode / "cfg.json").read_text())
        assert cfg["d_in"] == D_IN and cfg["transcode"] == coder.is_transcoder
        assert {"num_latents", "k", "expansion_factor", "multi_topk", "skip_connection"} <= set(cfg)
        names = set(load_file(str(tmp_path / coder.cfg.mode / "sae.safetensors")))
        assert {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} <= names
        _assert_same(coder, load_sparse_coder(tmp_path / coder.cfg.mode))


def test_saelens_round_trip_is_bit_exact(tmp_path):
    sae = _trained_like(make_sae())
    save_saelens(sae, tmp_path, hook_name="blocks.2.hook_resid_post")
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert tensors["W_enc"].shape == (D_IN, N_LATENTS)
    assert tensors["W_dec"].shape == (N_LATENTS, D_IN)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_sae"] == N_LATENTS and cfg["k"] == K
    assert saelens_hook_name(tmp_path) == "blocks.2.hook_resid_post"
    _assert_same(sae, load_sparse_coder(tmp_path))


def test_saelens_file_written_by_saelens_loads(tmp_path):
    """A pre-6.0 style file without our extra key: 'standard' + activation_fn 'topk'."""
    sae = _trained_like(make_sae())
    save_saelens(sae, tmp_path, hook_name="h")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["lightning_edit"], cfg["k"], cfg["metadata"]
    cfg.update(architecture="standard", activation_fn_str="topk", activation_fn_kwargs={"k": K},
               hook_name="blocks.0.hook_resid_pre")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_saelens(tmp_path)
    assert loaded.cfg.k == K and loaded.num_latents == N_LATENTS
    torch.testing.assert_close(loaded.encoder.weight, sae.encoder.weight, rtol=0, atol=0)
    assert saelens_hook_name(tmp_path) == "blocks.0.hook_resid_pre"


def test_cfg_json_as_sparsify_writes_it(tmp_path):
    """sparsify's own field set: no 'mode', 'transcode' flag, normalize_decoder always true."""
    tc_sq = TopKSparseCoder(SparseCoderConfig(d_in=D_IN, num_latents=N_LATENTS, k=K,
                                              mode="transcoder"))  # d_out = d_in, as in sparsify
    save_sparsify(_trained_like(tc_sq), tmp_path)
    sparsify_cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
                    "num_latents": N_LATENTS, "k": K, "multi_topk": False,
                    "skip_connection": False, "embed_skip": False, "transcode": True, "d_in": D_IN}
    (tmp_path / "cfg.json").write_text(json.dumps(sparsify_cfg))
    loaded = load_sparse_coder(tmp_path)
    assert loaded.is_transcoder and loaded.cfg.normalize_decoder is False
    torch.testing.assert_close(loaded.W_dec, tc_sq.W_dec, rtol=0, atol=0)


def test_load_sparse_coders_over_hookpoints(tmp_path):
    coders = {
        "layers.2": _trained_like(make_sae()),
        "layers.10.mlp": _trained_like(make_transcoder()),
    }
    save_sparse_coders(coders, tmp_path)
    assert (tmp_path / "layers.2" / "cfg.json").exists()
    loaded = load_sparse_coders(tmp_path)
    assert list(loaded) == ["layers.2", "layers.10.mlp"]
    for hookpoint, coder in coders.items():
        _assert_same(coder, loaded[hookpoint])
        assert loaded[hookpoint].source_path == tmp_path / hookpoint


def test_loaded_coder_trains(tmp_path):
    save_sparsify(make_sae(), tmp_path)
    assert load_sparsify(tmp_path, dtype=torch.bfloat16).W_dec.dtype == torch.bfloat16
    sae = load_sparsify(tmp_path, device="cpu")
    assert sae.W_dec.dtype == torch.float32
    assert all(p.requires_grad for p in sae.parameters())
    sae(batch()).fvu.backward()
    assert sae.W_dec.grad is not None


def test_missing_cfg_json_names_the_file(tmp_path):
    save_sparsify(make_sae(), tmp_path)
    (tmp_path / "cfg.json").unlink()
    with pytest.raises(SparseCoderFormatError, match=r"cfg\.json.*sparsify"):
        load_sparse_coder(tmp_path)


def test_missing_weights_names_the_file(tmp_path):
    save_sparsify(make_sae(), tmp_path / "a")
    (tmp_path / "a" / "sae.safetensors").unlink()
    with pytest.raises(SparseCoderFormatError, match=r"sae\.safetensors"):
        load_sparse_coder(tmp_path / "a")
    save_saelens(make_sae(), tmp_path / "b", hook_name="h")
    (tmp_path / "b" / "sae_weights.safetensors").unlink()
    with pytest.raises(SparseCoderFormatError, match=r"sae_weights\.safetensors.*SAELens"):
        load_sparse_coder(tmp_path / "b")
    with pytest.raises(SparseCoderFormatError, match="no sparse coder found"):
        load_sparse_coder(tmp_path / "b" / "..")


def test_unknown_architecture(tmp_path):
    save_saelens(make_sae(), tmp_path, hook_name="h")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["architecture"] = "jumprelu"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SparseCoderFormatError, match=r"cfg\.json: architecture 'jumprelu'"):
        load_sparse_coder(tmp_path)


def test_int8_tensor_is_refused_by_name(tmp_path):
    save_sparsify(make_sae(), tmp_path)
    path = str(tmp_path / "sae.safetensors")
    tensors = load_file(path)
    tensors["W_dec"] = tensors["W_dec"].to(torch.int8)
    save_file(tensors, path)
    match = r"sae\.safetensors: tensor 'W_dec' has dtype I8"
    with pytest.raises(SparseCoderFormatError, match=match):
        load_sparse_coder(tmp_path)


def test_shape_mismatching_cfg(tmp_path):
    save_sparsify(make_sae(), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["num_latents"] = 2 * N_LATENTS
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    match = r"sae\.safetensors: tensor 'encoder.weight' has shape \[64, 16\]"
    with pytest.raises(SparseCoderFormatError, match=match):
        load_sparse_coder(tmp_path)


def test_width_mismatch_names_hookpoint_and_file(tmp_path):
    save_sparsify(make_sae(), tmp_path / "layers.3")
    coder = load_sparse_coders(tmp_path)["layers.3"]
    check_width(coder, D_IN, "layers.3", "tiny-llama")
    with pytest.raises(SparseCoderFormatError, match=r"layers\.3.*d_in=16.*tiny-llama.*width 32"):
        check_width(coder, 32, "layers.3", "tiny-llama")
