"""Reading and writing sparse coder checkpoints: the sparsify and SAELens layouts.

sparsify (EleutherAI):  DIR/<hookpoint>/cfg.json        config + d_in
                        DIR/<hookpoint>/sae.safetensors encoder.weight [n, d_in], encoder.bias [n],
                                                        W_dec [n, d_out], b_dec [d_out], W_skip?
SAELens:                DIR/cfg.json                    architecture, d_in, d_sae, k, metadata
                        DIR/sae_weights.safetensors     W_enc [d_in, n], b_enc [n],
                                                        W_dec [n, d_in], b_dec [d_in]

SAELens 6 options that change the forward (``rescale_acts_by_decoder_norm``, which its top-k
trainer writes by default; ``apply_b_dec_to_input``: false; ``normalize_activations``:
"expected_average_only_in" with the checkpoint's ``activation_scaler.json``) are folded into the
weights exactly; run-time input normalisation, hook_z / per-head SAEs and non-top-k architectures
(JumpReLU, BatchTopK, standard ReLU, gated) are refused in one line.

Only JSON and safetensors are read: nothing is unpickled. Every error is a
``SparseCoderFormatError`` naming the file and the field or tensor that is wrong.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_edit.constants import CODER_CFG, SAELENS_SCALER, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS
from lightning_edit.errors import UserError, blame, check_finite

from .coder import TopKSparseCoder
from .config import SparseCoderConfig

# safetensors dtype codes we load; anything else (int8, float8, ...) is refused by name.
SUPPORTED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# The key under which save_saelens keeps our full config, so the round trip is exact.
SAELENS_EXTRA_KEY = "lightning_edit"
SAELENS_FORMAT_VERSION = "6.0.0"


class SparseCoderFormatError(UserError):
    """A checkpoint on disk does not match what its layout promises."""


# --- sparsify layout ----------------------------------------------------------------------------


def save_sparsify(coder: TopKSparseCoder, path: str | Path) -> Path:
    """Write ``cfg.json`` and ``sae.safetensors`` for one hookpoint into the folder ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        **coder.cfg.to_dict(),
        "transcode": coder.is_transcoder,  # sparsify's name for mode="transcoder"
    }
    _write_json(path / CODER_CFG, cfg)
    tensors = {name: t.detach().contiguous().cpu() for name, t in coder.state_dict().items()}
    save_file(tensors, str(path / SPARSIFY_WEIGHTS))
    return path


def save_sparse_coders(coders: dict[str, TopKSparseCoder], root: str | Path) -> Path:
    """Write one sparsify folder per hookpoint: ``root/<hookpoint>/`` (dots kept, as sparsify)."""
    root = Path(root)
    for hookpoint, coder in coders.items():
        save_sparsify(coder, root / hookpoint)
    return root


def load_sparsify(
    path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> TopKSparseCoder:
    """Read a sparsify folder (``cfg.json`` + ``sae.safetensors``)."""
    path = Path(path)
    cfg_path, weights_path = path / CODER_CFG, path / SPARSIFY_WEIGHTS
    _require(cfg_path, "sparsify", "the coder's config (d_in, num_latents or expansion_factor, k)")
    _require(weights_path, "sparsify", "encoder.weight, encoder.bias, W_dec, b_dec")
    cfg = _sparsify_config(_read_json(cfg_path), cfg_path)

    n, d_in, d_out = cfg.resolved_num_latents, cfg.d_in, cfg.resolved_d_out
    expected = {
        "encoder.weight": (n, d_in),
        "encoder.bias": (n,),
        "W_dec": (n, d_out),
        "b_dec": (d_out,),
    }
    if cfg.skip_connection:
        expected["W_skip"] = (d_out, d_in)
    tensors = _read_tensors(weights_path, expected, cfg_path)
    return _build(cfg, tensors, device, dtype, source=path)


def _sparsify_config(raw: dict[str, Any], cfg_path: Path) -> SparseCoderConfig:
    raw = dict(raw)
    if "d_in" not in raw:
        raise SparseCoderFormatError(f"{cfg_path}: missing field 'd_in' (the input width)")
    transcode = raw.pop("transcode", None)
    if "mode" not in raw:
        raw["mode"] = "transcoder" if transcode else "sae"
    elif transcode is not None and bool(transcode) != (raw["mode"] == "transcoder"):
        raise SparseCoderFormatError(
            f"{cfg_path}: 'transcode'={transcode} contradicts 'mode'={raw['mode']!r}"
        )
    if raw.get("activation", "topk") not in ("topk", "relu"):
        raise SparseCoderFormatError(
            f"{cfg_path}: activation {raw['activation']!r} is not supported (expected 'topk', "
            "or 'relu' for a transcoder)"
        )
    for flag in ("embed_skip", "gram_lookup"):  # sparsify options we do not implement
        if raw.get(flag):
            raise SparseCoderFormatError(f"{cfg_path}: sparsify option '{flag}' is not supported")
    if raw["mode"] == "transcoder":
        # sparsify writes normalize_decoder=True for transcoders too, but never applies it.
        raw["normalize_decoder"] = False
    try:
        return SparseCoderConfig.from_dict(raw, drop_extra_fields=True)
    except (TypeError, ValueError) as err:
        raise SparseCoderFormatError(f"{cfg_path}: invalid config: {err}") from err


# --- SAELens layout -----------------------------------------------------------------------------


def save_saelens(coder: TopKSparseCoder, path: str | Path, hook_name: str) -> Path:
    """Write a SAELens (v6 layout) ``topk`` SAE: ``cfg.json`` + ``sae_weights.safetensors``.

    Our full config is kept under ``cfg.json["lightning_edit"]`` (SAELens ignores unknown keys)
    so that loading gives back the same config.
    """
    if coder.is_transcoder:
        raise SparseCoderFormatError(
            "save_saelens: the SAELens layout is written for top-k SAEs only; "
            "save transcoders with save_sparsify"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architecture": "topk",
        "d_in": coder.d_in,
        "d_sae": coder.num_latents,
        "k": coder.cfg.k,
        "dtype": str(coder.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"hook_name": hook_name, "sae_lens_version": SAELENS_FORMAT_VERSION},
        SAELENS_EXTRA_KEY: coder.cfg.to_dict(),
    }
    _write_json(path / CODER_CFG, cfg)
    tensors = {
        "W_enc": coder.encoder.weight.detach().mT.contiguous().cpu(),
        "b_enc": coder.encoder.bias.detach().contiguous().cpu(),
        "W_dec": coder.W_dec.detach().contiguous().cpu(),
        "b_dec": coder.b_dec.detach().contiguous().cpu(),
    }
    save_file(tensors, str(path / SAELENS_WEIGHTS))
    return path


def saelens_hook_name(path: str | Path) -> str | None:
    """The ``hook_name`` of a SAELens folder (``metadata.hook_name`` or top-level)."""
    cfg_path = Path(path) / CODER_CFG
    _require(cfg_path, "SAELens", "architecture, d_in, d_sae, k, hook_name")
    raw = _read_json(cfg_path)
    meta = raw.get("metadata") or raw.get("meta") or {}
    return meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")


def load_saelens(
    path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> TopKSparseCoder:
    """Read a SAELens folder holding a top-k SAE (``architecture`` "topk", or a pre-6.0
    "standard" SAE with ``activation_fn`` "topk").

    SAELens 6's options that change the forward are folded into the weights so that our plain
    top-k forward computes exactly what SAELens' ``TopKSAE.encode`` / ``decode`` compute
    (``_fold_saelens`` says how); options that cannot be folded are refused by name.
    """
    path = Path(path)
    cfg_path, weights_path = path / CODER_CFG, path / SAELENS_WEIGHTS
    _require(cfg_path, "SAELens", "architecture, d_in, d_sae, k, hook_name")
    _require(weights_path, "SAELens", "W_enc, b_enc, W_dec, b_dec")
    raw = _read_json(cfg_path)
    cfg, forward = _saelens_config(raw, cfg_path)

    n, d = cfg.resolved_num_latents, cfg.d_in
    expected = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
    tensors = _read_tensors(weights_path, expected, cfg_path)
    scale = _saelens_activation_scale(raw, path) if forward["normalize_activations"] else None
    tensors = _fold_saelens(tensors, forward["apply_b_dec_to_input"],
                            forward["rescale_acts_by_decoder_norm"], scale)
    if SAELENS_EXTRA_KEY not in raw:
        # SAELens keeps no decoder-norm constraint of its own; after the folds the rows are unit
        # norm exactly when the file was written with (or folded from) rescale_acts_by_decoder_norm.
        norms = tensors["W_dec"].double().norm(dim=1)
        cfg.normalize_decoder = bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-3))
    return _build(cfg, tensors, device, dtype, source=path)


# SAELens architectures other than top-k, and why we cannot load them (a one-line refusal).
SAELENS_OTHER_ARCHITECTURES = {
    "jumprelu": "a JumpReLU SAE (per-latent thresholds, a variable number of active latents)",
    "batchtopk": "a BatchTopK SAE (top-k over the batch; SAELens runs it as JumpReLU at inference)",
    "matryoshka_batchtopk": "a Matryoshka BatchTopK SAE (JumpReLU at inference)",
    "standard": "a ReLU SAE trained with an L1 penalty (no top-k)",
    "gated": "a gated SAE",
    "transcoder": "a SAELens ReLU transcoder",
    "skip_transcoder": "a SAELens skip transcoder",
    "jumprelu_transcoder": "a SAELens JumpReLU transcoder",
}


def _saelens_config(raw: dict[str, Any], cfg_path: Path) -> tuple[SparseCoderConfig, dict[str, Any]]:
    """(our config, the SAELens forward options to fold) from a SAELens ``cfg.json``."""
    architecture = raw.get("architecture", "standard")  # pre-6.0 files may omit it
    activation = raw.get("activation_fn") or raw.get("activation_fn_str")
    if not (architecture == "topk" or (architecture == "standard" and activation == "topk")):
        what = SAELENS_OTHER_ARCHITECTURES.get(architecture, "an unknown SAELens architecture")
        raise SparseCoderFormatError(
            f"{cfg_path}: architecture {architecture!r}"
            + (f" with activation_fn {activation!r}" if activation else "")
            + f" is {what}; lightning-edit loads top-k SAEs only (architecture 'topk', or "
            "'standard' with activation_fn 'topk')"
        )
    for field in ("d_in", "d_sae"):
        if not isinstance(raw.get(field), int):
            raise SparseCoderFormatError(
                f"{cfg_path}: field '{field}' must be an int, got {raw.get(field)!r}"
            )
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    if not isinstance(k, int):
        raise SparseCoderFormatError(
            f"{cfg_path}: a topk SAE needs an int 'k' (or 'activation_fn_kwargs': {{'k': ...}}), "
            f"got {k!r}"
        )
    forward = _saelens_forward_options(raw, cfg_path)

    ours = raw.get(SAELENS_EXTRA_KEY)
    try:
        if ours is not None:
            cfg = SparseCoderConfig.from_dict(ours)
        else:
            cfg = SparseCoderConfig(d_in=raw["d_in"], num_latents=raw["d_sae"], k=k, mode="sae")
    except (TypeError, ValueError) as err:
        raise SparseCoderFormatError(f"{cfg_path}: invalid config: {err}") from err
    mismatch = {
        "d_in": (cfg.d_in, raw["d_in"]),
        "d_sae": (cfg.resolved_num_latents, raw["d_sae"]),
        "k": (cfg.k, k),
    }
    for field, (ours_value, theirs) in mismatch.items():
        if ours_value != theirs:
            raise SparseCoderFormatError(
                f"{cfg_path}: '{SAELENS_EXTRA_KEY}' says {field}={ours_value} "
                f"but '{field}'={theirs}"
            )
    if cfg.mode != "sae":
        raise SparseCoderFormatError(f"{cfg_path}: the SAELens layout holds SAEs only")
    return cfg, forward


def _saelens_forward_options(raw: dict[str, Any], cfg_path: Path) -> dict[str, Any]:
    """The cfg.json options that change SAELens' forward: folded ones returned, others refused.

    Read from SAELens 6 (``sae_lens/saes/sae.py`` ``SAEConfig`` and ``process_sae_in``,
    ``saes/topk_sae.py`` ``TopKSAEConfig``): a missing key takes the inference config's default
    (``apply_b_dec_to_input`` True, ``rescale_acts_by_decoder_norm`` False, no normalisation),
    as ``SAE.load_from_disk`` does.
    """
    def refuse(field: str, value: Any, why: str) -> None:
        raise SparseCoderFormatError(f"{cfg_path}: '{field}'={value!r} is not supported ({why})")

    meta = raw.get("metadata") or {}
    normalize = raw.get("normalize_activations")
    if normalize is True:  # pre-6.0 boolean, read by SAELens as "expected_average_only_in"
        normalize = "expected_average_only_in"
    if normalize in (None, False, "none"):
        normalize = None
    elif normalize != "expected_average_only_in":
        refuse("normalize_activations", normalize,
               "it normalises every input at run time; lightning-edit folds only the constant "
               "'expected_average_only_in' factor")
    if raw.get("reshape_activations", "none") not in (None, "none"):
        refuse("reshape_activations", raw["reshape_activations"],
               "an SAE on attention heads' hook_z; lightning-edit hooks module outputs")
    head = raw.get("hook_head_index", meta.get("hook_head_index"))
    if head is not None:
        refuse("hook_head_index", head, "an SAE on one attention head; lightning-edit hooks whole modules")
    if raw.get("finetuning_scaling_factor"):
        refuse("finetuning_scaling_factor", raw["finetuning_scaling_factor"],
               "a pre-6.0 per-latent output scale")
    options = {"normalize_activations": normalize}
    for field, default in (("apply_b_dec_to_input", True), ("rescale_acts_by_decoder_norm", False)):
        value = raw.get(field, default)
        if not isinstance(value, bool):
            raise SparseCoderFormatError(f"{cfg_path}: '{field}' must be true or false, got {value!r}")
        options[field] = value
    return options


def _saelens_activation_scale(raw: dict[str, Any], path: Path) -> float | None:
    """The input scale of an 'expected_average_only_in' SAE, from SAELens' activation_scaler.json.

    SAELens' trainer multiplies every input by this factor and folds it into the weights at the
    end of training (``sae_trainer.py`` ``fit``), writing ``normalize_activations: "none"``; a
    file that still says "expected_average_only_in" is a mid-training checkpoint, whose factor
    sits beside it (``None`` there: the trainer never scaled).
    """
    scaler = path / SAELENS_SCALER
    if not scaler.is_file():
        raise SparseCoderFormatError(
            f"{path / CODER_CFG}: 'normalize_activations'='expected_average_only_in' but no "
            f"{SAELENS_SCALER} beside it: the input scaling factor is unknown (load the "
            "final inference export, where SAELens has folded it, or add the checkpoint's scaler file)"
        )
    factor = _read_json(scaler).get("scaling_factor")
    if factor is not None and not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise SparseCoderFormatError(
            f"{scaler}: 'scaling_factor' must be a positive number or null, got {factor!r}"
        )
    return None if factor is None else float(factor)


def _fold_saelens(
    tensors: dict[str, torch.Tensor],
    apply_b_dec_to_input: bool,
    rescale_acts_by_decoder_norm: bool,
    activation_scale: float | None,
) -> dict[str, torch.Tensor]:
    """SAELens tensors -> ours, with every forward option folded in (float64, then the file's dtype).

    SAELens 6 ``TopKSAE`` (``sae_lens/saes/topk_sae.py``), with ``a = apply_b_dec_to_input``,
    ``n = ||W_dec||`` per latent (``get_W_dec_norm``: clamped at 1e-8) when rescaling, else 1:
        encode: acts = TopK(ReLU(((x - a * b_dec) @ W_enc + b_enc) * n))
        decode: x_hat = (acts / n) @ W_dec + b_dec
    Folding n (``_fold_norm_topk``): W_enc * n, b_enc * n, W_dec / n gives the same acts and
    x_hat with the plain forward. An input scale s (the trainer feeds s * x and its outputs are
    read / s) folds as SAELens' ``fold_activation_norm_scaling_factor``: W_enc * s, W_dec / s,
    b_dec / s, before the norm fold, the order SAELens' trainer and ``save_inference_model``
    apply them. Our encoder always subtracts b_dec, so with a = False its bias gains b_dec @ W_enc.
    """
    file_dtype = tensors["W_enc"].dtype
    W_enc, b_enc, W_dec, b_dec = (tensors[k].double() for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if activation_scale is not None:
        W_enc, W_dec, b_dec = W_enc * activation_scale, W_dec / activation_scale, b_dec / activation_scale
    if rescale_acts_by_decoder_norm:
        norms = W_dec.norm(dim=-1).clamp(min=1e-8)  # [n]
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms.unsqueeze(1)
    if not apply_b_dec_to_input:
        b_enc = b_enc + b_dec @ W_enc
    folded = {"encoder.weight": W_enc.mT, "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    return {k: v.to(file_dtype).contiguous() for k, v in folded.items()}


# --- any layout ---------------------------------------------------------------------------------


def detect_layout(path: str | Path) -> str:
    """"sparsify" or "saelens", from the files in the folder ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise SparseCoderFormatError(f"{path}: not a directory (expected a sparse coder folder)")
    if (path / SPARSIFY_WEIGHTS).exists():
        return "sparsify"
    if (path / SAELENS_WEIGHTS).exists():
        return "saelens"
    cfg_path = path / CODER_CFG
    if cfg_path.exists():
        raw = _read_json(cfg_path)
        saelens = "d_sae" in raw or "architecture" in raw
        layout = "SAELens" if saelens else "sparsify"
        weights = SAELENS_WEIGHTS if saelens else SPARSIFY_WEIGHTS
        raise SparseCoderFormatError(
            f"{path / weights}: missing weights file; {cfg_path} looks like the {layout} layout, "
            f"which keeps its tensors in {weights}"
        )
    raise SparseCoderFormatError(
        f"{path}: no sparse coder found; expected {CODER_CFG} + {SPARSIFY_WEIGHTS} (sparsify) "
        f"or {CODER_CFG} + {SAELENS_WEIGHTS} (SAELens)"
    )


def load_sparse_coder(
    path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> TopKSparseCoder:
    """Load one coder from a folder (or a file inside it), detecting the layout."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    layout = detect_layout(path)
    weights = path / (SPARSIFY_WEIGHTS if layout == "sparsify" else SAELENS_WEIGHTS)
    with blame(str(weights)):  # a truncated or foreign file, wrong shapes, unreadable
        coder = load_sparsify(path, device, dtype) if layout == "sparsify" else load_saelens(path, device, dtype)
    # NaN or Inf anywhere in the weights makes every edit through it meaningless: refuse it here.
    check_finite(coder.state_dict(), str(weights))
    return coder


def load_sparse_coders(
    root: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> dict[str, TopKSparseCoder]:
    """Load every coder under ``root``; keys are hookpoints, the folder paths relative to
    ``root`` with "/" read as "." (sparsify names folders like the hookpoint: ``layers.2.mlp``)."""
    root = Path(root)
    if not root.is_dir():
        raise SparseCoderFormatError(f"{root}: not a directory (expected one folder per hookpoint)")
    if (root / CODER_CFG).exists():
        raise SparseCoderFormatError(
            f"{root / CODER_CFG}: {root} is a single coder, not a folder of hookpoints; "
            "use load_sparse_coder"
        )
    folders = {p.parent for p in root.rglob(CODER_CFG)}
    folders |= {p.parent for p in root.rglob(SPARSIFY_WEIGHTS)}
    folders |= {p.parent for p in root.rglob(SAELENS_WEIGHTS)}
    if not folders:
        raise SparseCoderFormatError(
            f"{root}: no sparse coders found; expected {root}/<hookpoint>/{CODER_CFG} with "
            f"{SPARSIFY_WEIGHTS} or {SAELENS_WEIGHTS}"
        )
    coders = {".".join(f.relative_to(root).parts): f for f in folders}
    return {
        hookpoint: load_sparse_coder(coders[hookpoint], device, dtype)
        for hookpoint in sorted(coders, key=_natural_key)
    }


def check_width(
    coder: TopKSparseCoder,
    expected_d_in: int,
    hookpoint: str,
    model_desc: str,
    expected_d_out: int | None = None,
) -> None:
    """Raise when the coder's width differs from the model's hidden size at ``hookpoint``."""
    source = getattr(coder, "source_path", None)
    where = f"{source}: " if source is not None else ""
    for name, ours, theirs in (
        ("d_in", coder.d_in, expected_d_in),
        ("d_out", coder.d_out, expected_d_out),
    ):
        if theirs is not None and ours != theirs:
            raise SparseCoderFormatError(
                f"{where}sparse coder for hookpoint {hookpoint!r} has {name}={ours}, but "
                f"{model_desc} has width {theirs} there; was it trained on another model or "
                "hookpoint?"
            )


# --- helpers ------------------------------------------------------------------------------------


def _require(path: Path, layout: str, holds: str) -> None:
    if not path.exists():
        raise SparseCoderFormatError(
            f"{path}: missing file {path.name!r} in {path.parent} "
            f"({layout} layout; it holds {holds})"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SparseCoderFormatError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise SparseCoderFormatError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _read_tensors(
    path: Path, expected: dict[str, tuple[int, ...]], cfg_path: Path
) -> dict[str, torch.Tensor]:
    """Check names, dtypes and shapes from the safetensors header, then read the tensors."""
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        raise SparseCoderFormatError(f"{path}: not a readable safetensors file: {err}") from err
    with handle as f:
        names = set(f.keys())
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        if missing:
            raise SparseCoderFormatError(
                f"{path}: missing tensor(s) {missing}; found {sorted(names)}"
            )
        if extra:
            raise SparseCoderFormatError(
                f"{path}: unexpected tensor(s) {extra} (per {cfg_path.name}, expected "
                f"{sorted(expected)})"
            )
        for name, shape in expected.items():
            info = f.get_slice(name)
            if info.get_dtype() not in SUPPORTED_DTYPES:
                raise SparseCoderFormatError(
                    f"{path}: tensor {name!r} has dtype {info.get_dtype()}; supported are "
                    f"float32, bfloat16 and float16"
                )
            if tuple(info.get_shape()) != shape:
                raise SparseCoderFormatError(
                    f"{path}: tensor {name!r} has shape {list(info.get_shape())} but "
                    f"{cfg_path.name} implies {list(shape)}"
                )
        return {name: f.get_tensor(name) for name in expected}


def _build(
    cfg: SparseCoderConfig,
    tensors: dict[str, torch.Tensor],
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    source: Path,
) -> TopKSparseCoder:
    # Built on the meta device so no random init is spent on weights about to be replaced.
    file_dtype = tensors["encoder.weight"].dtype
    coder = TopKSparseCoder(cfg, device="meta", dtype=file_dtype)
    coder.load_state_dict({k: v.to(file_dtype) for k, v in tensors.items()}, assign=True)
    coder.source_path = source
    if device is not None or dtype is not None:
        coder.to(device=device, dtype=dtype)
    return coder


def _natural_key(name: str) -> list[Any]:
    """"layers.10" sorts after "layers.2"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
