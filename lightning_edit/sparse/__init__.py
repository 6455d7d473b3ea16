"""Sparse components: top-k SAEs and transcoders, and their checkpoint formats (pure torch)."""

from .coder import DeadLatentTracker, ForwardOutput, TopKSparseCoder, default_lr
from .config import SparseCoderConfig
from .scores import CEScore, ce_loss_score
from .splice import TranscoderMLP
from .formats import (
    SparseCoderFormatError,
    check_width,
    detect_layout,
    load_saelens,
    load_sparse_coder,
    load_sparse_coders,
    load_sparsify,
    saelens_hook_name,
    save_saelens,
    save_sparse_coders,
    save_sparsify,
)

__all__ = [
    "CEScore",
    "ce_loss_score",
    "DeadLatentTracker",
    "ForwardOutput",
    "SparseCoderConfig",
    "SparseCoderFormatError",
    "TopKSparseCoder",
    "TranscoderMLP",
    "check_width",
    "default_lr",
    "detect_layout",
    "load_saelens",
    "load_sparse_coder",
    "load_sparse_coders",
    "load_sparsify",
    "saelens_hook_name",
    "save_saelens",
    "save_sparse_coders",
    "save_sparsify",
]
