"""One way to load the sparse component an editor works through: an SAE or a transcoder at a
hookpoint, from a checkpoint folder, checked against the model.

`path` is a coder folder (sparsify or SAELens layout) or a root holding `<hookpoint>/` folders.
The loaded coder records its `hookpoint`. Pure torch: the model is reached through an adapter
(`hidden_size`, `hookpoint_io_dims`), never imported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .coder import TopKSparseCoder
from .formats import check_width, load_sparse_coder

KINDS = ("sae", "transcoder")
KIND_NAMES = {"sae": "an SAE", "transcoder": "a transcoder"}


def coder_folder(path: str | Path, hookpoint: str) -> Path:
    """`path/<hookpoint>` when `path` is a root of hookpoint folders, else `path` itself."""
    path = Path(path)
    return path / hookpoint if (path / hookpoint).is_dir() else path


def load_component(path: str | Path, hookpoint: str, kind: str, adapter: Any, *,
                   device: torch.device | str | None = None, who: str = "the editor",
                   model_desc: str = "the model") -> TopKSparseCoder:
    """The `kind` coder ("sae": reads and replaces a residual stream; "transcoder": an MLP's input ->
    output) at `hookpoint`, width-checked against the model behind `adapter`; a ValueError naming the
    folder when it is the other kind, a `SparseCoderFormatError` when its width is another model's."""
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; expected one of {', '.join(KINDS)}")
    folder = coder_folder(path, hookpoint)
    coder = load_sparse_coder(folder, device=device)
    got = "transcoder" if coder.is_transcoder else "sae"
    if got != kind:
        raise ValueError(f"{folder}: {who} needs {KIND_NAMES[kind]}, got {KIND_NAMES[got]}")
    if kind == "transcoder":
        d_in, d_out = adapter.hookpoint_io_dims(hookpoint)
        check_width(coder, d_in, hookpoint, model_desc, expected_d_out=d_out)
    else:
        check_width(coder, adapter.hidden_size, hookpoint, model_desc)
    coder.hookpoint = hookpoint
    return coder
