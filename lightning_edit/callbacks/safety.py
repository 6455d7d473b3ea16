"""Crash safety for the edit stream: atomic checkpoint files, and a checkpoint saved when an edit fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_edit.errors import EditStepError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, written through a temporary file in the same folder and a
    rename: a run killed while saving leaves the previous checkpoint whole (and a `.<name>.tmp-<pid>`
    file that the next run in the folder removes)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        import io

        import torch

        from lightning_edit.runtime import atomic_write

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buffer.getvalue())


class SaveOnEditFailure(Callback):
    """When an edit fails (`EditStepError`: an exception inside `apply`, or a refused NaN edit under
    on_nonfinite=stop), save everything done before it to `last.ckpt`, so that a fixed file resumes
    with `checkpoint.resume=last` at the record that failed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.saved: Path | None = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, EditStepError):
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the edit state, not model weights
        self.saved = self.path
