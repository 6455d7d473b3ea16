"""SAELens 6 checkpoints: every forward option of a top-k SAE folded exactly, the rest refused.

The reference below is SAELens 6's inference forward written out from its source, so these tests
need no SAELens install; `bench/saelens_check.py` checks against SAELens itself where it is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightning_edit.sparse import SparseCoderFormatError, load_sparse_coder, saelens_hook_name

D, N, K = 12, 48, 5


def saelens_reference(t: dict[str, torch.Tensor], x: torch.Tensor, k: int, apply_b_dec_to_input: bool = True,
                      rescale_acts_by_decoder_norm: bool = False, scale: float | None = None):
    """(latent acts [.., n] dense, reconstruction) as SAELens 6 computes them, in float64.

    sae_lens/saes/sae.py `SAE.process_sae_in`: sae_in = x - b_dec * apply_b_dec_to_input.
    sae_lens/saes/topk_sae.py `TopKSAE.encode`: hidden_pre = sae_in @ W_enc + b_enc, times
    W_dec.norm(dim=-1) when rescale_acts_by_decoder_norm; `TopK.forward`: topk(k) then relu,
    scattered into zeros. `act_times_W_dec` / `TopKSAE.decode`: (acts / W_dec.norm) @ W_dec + b_dec.
    sae_lens/training/sae_trainer.py `fit` + activation_scaler.py: a scaled SAE sees x * s and its
    output is read / s; `fit` then folds s (`fold_activation_norm_scaling_factor`), after which
    SAELens' own model gives the latent acts / s too.
    """
    W_enc, b_enc, W_dec, b_dec = (t[n].double() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    x = x.double() * (scale if scale is not None else 1.0)
    sae_in = x - b_dec * apply_b_dec_to_input
    hidden_pre = sae_in @ W_enc + b_enc
    norms = W_dec.norm(dim=-1).clamp(min=1e-8)
    if rescale_acts_by_decoder_norm:
        hidden_pre = hidden_pre * norms
    values, indices = torch.topk(hidden_pre, k=k, dim=-1, sorted=False)
    acts = torch.zeros_like(hidden_pre).scatter_(-1, indices, values.relu())
    decoded_acts = acts / norms if rescale_acts_by_decoder_norm else acts
    out = decoded_acts @ W_dec + b_dec
    s = scale if scale is not None else 1.0
    return acts / s, out / s


def write_saelens(folder: Path, *, seed: int = 0, cfg_extra: dict | None = None,
                  scaler: float | None | str = "absent") -> dict[str, torch.Tensor]:
    """A top-k SAE in SAELens 6's layout (cfg.json as its TopKTrainingSAEConfig.to_dict writes it),
    with decoder rows far from unit norm (one nearly dead) and a non-zero b_dec."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(N, D, generator=g) * torch.linspace(0.05, 3.0, N).unsqueeze(1)
    W_dec[7] *= 1e-4
    tensors = {
        "W_enc": torch.randn(D, N, generator=g) * 0.5,
        "b_enc": torch.randn(N, generator=g) * 0.1,
        "W_dec": W_dec,
        "b_dec": torch.randn(D, generator=g),
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    cfg = {
        "d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12",
                     "model_name": "tiny", "hook_name": "blocks.1.hook_resid_post",
                     "hook_head_index": None, "context_size": 64, "prepend_bos": True},
        "decoder_init_norm": 0.1, "k": K, "use_sparse_activations": False,
        "aux_loss_coefficient": 1.0, "rescale_acts_by_decoder_norm": True, "architecture": "topk",
        **(cfg_extra or {}),
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    if scaler != "absent":
        (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": scaler}))
    return tensors


def inputs(n=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * 1.5


def assert_matches(folder: Path, tensors, **options):
    coder = load_sparse_coder(folder)
    x = inputs()
    ref_acts, ref_out = saelens_reference(tensors, x, K, **options)
    acts, indices = coder.encode(x)
    dense = torch.zeros(x.shape[0], N, dtype=torch.float64).scatter_(-1, indices, acts.double())
    torch.testing.assert_close(dense, ref_acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(coder.reconstruct(x).double(), ref_out, rtol=1e-5, atol=1e-5)
    return coder


def test_rescale_acts_by_decoder_norm_is_folded_exactly(tmp_path):
    tensors = write_saelens(tmp_path)
    norms = tensors["W_dec"].norm(dim=-1)
    assert norms.min() < 1e-3 and norms.max() > 2.5  # far from the unit-norm case
    coder = assert_matches(tmp_path, tensors, rescale_acts_by_decoder_norm=True)
    # Folded: unit decoder rows, so our decoder-norm constraint holds and training can continue.
    torch.testing.assert_close(coder.W_dec.norm(dim=-1), torch.ones(N), rtol=0, atol=1e-5)
    assert coder.cfg.normalize_decoder and coder.cfg.k == K and coder.num_latents == N
    assert saelens_hook_name(tmp_path) == "blocks.1.hook_resid_post"
    # Read without the fold, the same file gives other latents and a worse reconstruction: the flag
    # matters, and ignoring it would not be caught by shapes alone.
    _, ignored = saelens_reference(tensors, inputs(), K, rescale_acts_by_decoder_norm=False)
    assert not torch.allclose(coder.reconstruct(inputs()).double(), ignored, atol=1e-2)


def test_without_rescale_the_raw_decoder_is_kept(tmp_path):
    tensors = write_saelens(tmp_path, cfg_extra={"rescale_acts_by_decoder_norm": False})
    coder = assert_matches(tmp_path, tensors, rescale_acts_by_decoder_norm=False)
    assert torch.equal(coder.W_dec, tensors["W_dec"])
    assert not coder.cfg.normalize_decoder  # its rows are not unit norm: no constraint to apply


def test_apply_b_dec_to_input_false(tmp_path):
    tensors = write_saelens(tmp_path, cfg_extra={"apply_b_dec_to_input": False})
    assert_matches(tmp_path, tensors, apply_b_dec_to_input=False, rescale_acts_by_decoder_norm=True)


def test_expected_average_scale_from_the_checkpoint_scaler(tmp_path):
    tensors = write_saelens(tmp_path, cfg_extra={"normalize_activations": "expected_average_only_in"},
                            scaler=3.7)
    assert_matches(tmp_path, tensors, rescale_acts_by_decoder_norm=True, scale=3.7)
    # A null factor: the trainer never scaled.
    write_saelens(tmp_path / "null", cfg_extra={"normalize_activations": "expected_average_only_in"},
                  scaler=None)
    assert_matches(tmp_path / "null", tensors, rescale_acts_by_decoder_norm=True)


def test_bfloat16_file_folds_in_float64(tmp_path):
    tensors = write_saelens(tmp_path)
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(tmp_path / "sae_weights.safetensors"))
    coder = load_sparse_coder(tmp_path)
    assert coder.dtype == torch.bfloat16
    torch.testing.assert_close(coder.W_dec.float().norm(dim=-1), torch.ones(N), rtol=0, atol=1e-2)


@pytest.mark.parametrize(
    "cfg_extra, scaler, message",
    [
        ({"architecture": "jumprelu"}, "absent", r"architecture 'jumprelu' is a JumpReLU SAE .*top-k SAEs only"),
        ({"architecture": "batchtopk"}, "absent", r"'batchtopk' is a BatchTopK SAE"),
        ({"architecture": "standard", "activation_fn": "relu"}, "absent", r"'standard' with activation_fn 'relu' is a ReLU SAE"),
        ({"normalize_activations": "layer_norm"}, "absent", r"'normalize_activations'='layer_norm' is not supported"),
        ({"normalize_activations": "constant_norm_rescale"}, "absent", r"normalises every input at run time"),
        ({"normalize_activations": "expected_average_only_in"}, "absent", r"no activation_scaler\.json"),
        ({"normalize_activations": "expected_average_only_in"}, -2.0, r"'scaling_factor' must be a positive number"),
        ({"reshape_activations": "hook_z"}, "absent", r"'reshape_activations'='hook_z'.*attention"),
        ({"metadata": {"hook_name": "blocks.0.attn.hook_z", "hook_head_index": 3,
                       "sae_lens_version": "6.1.0"}}, "absent", r"'hook_head_index'=3"),
        ({"rescale_acts_by_decoder_norm": "yes"}, "absent", r"'rescale_acts_by_decoder_norm' must be true or false"),
    ],
)
def test_unsupported_options_are_one_clear_line(tmp_path, cfg_extra, scaler, message):
    write_saelens(tmp_path, cfg_extra=cfg_extra, scaler=scaler)
    with pytest.raises(SparseCoderFormatError, match=message) as err:
        load_sparse_coder(tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)

