"""Run plumbing shared by the jobs: the run folder, seeding and CPU threads."""

from __future__ import annotations

import os
import time
from pathlib import Path

RUN_DIR_ENV = "LIGHTNING_EDIT_RUN_DIR"
"""Set by the launching process so that DDP ranks re-executing the script share its run folder."""


def resolve_output_dir(output_dir: str | None, job: str, root: str | Path = "runs") -> Path:
    """``output_dir``, or ``<root>/<job>/<YYYYmmdd-HHMMSS>`` (unique; shared with DDP child ranks).

    Lightning's DDP launcher re-executes the script in each child rank a moment later, so a fresh
    timestamp there could differ from rank 0's: children (``LOCAL_RANK`` set by the launcher) take
    the folder the parent put in ``$LIGHTNING_EDIT_RUN_DIR``. Launchers that start every rank on
    their own (torchrun, SLURM across nodes) should pass ``output_dir`` explicitly.
    """
    if output_dir:
        path = Path(output_dir)
    elif os.environ.get(RUN_DIR_ENV) and os.environ.get("LOCAL_RANK") not in (None, "0"):
        path = Path(os.environ[RUN_DIR_ENV])
    else:
        base = Path(root) / job / time.strftime("%Y%m%d-%H%M%S")
        path, n = base, 1
        while path.exists():  # two runs started within the same second
            path, n = base.with_name(f"{base.name}-{n}"), n + 1
    os.environ[RUN_DIR_ENV] = str(path.resolve())
    return path


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (and dataloader workers) from the config, never at import."""
    from lightning.pytorch import seed_everything as _seed

    _seed(seed, workers=True, verbose=False)


def set_cpu_threads(threads: int | None, processes_per_node: int = 1) -> int:
    """Limit torch's intra-op threads so that processes on one machine do not oversubscribe it.

    None = the machine's cores divided by the processes started on it (at least 1). Tiny models
    on contended cores run many times slower with too many threads (FINDINGS.md).
    """
    import torch

    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // max(1, processes_per_node))
    torch.set_num_threads(threads)
    return threads


TEMP_MARK = ".tmp-"
"""Infix of the temporary files and folders the atomic writers below leave only when killed."""


def temp_path(path: str | Path) -> Path:
    """A temporary name beside `path`, in the same folder (so a rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename: `path` is
    either absent, the old file, or the whole new one; the temporary file is removed on failure."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_folder(path: str | Path, write) -> Path:
    """`write(tmp_folder)` fills a temporary folder beside `path`, which then replaces `path`
    (an old `path` is moved aside first and removed after); the temporary folder is removed on failure."""
    import shutil

    path = Path(path)
    tmp, old = temp_path(path), path.with_name(f".{path.name}{TEMP_MARK}old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove what killed atomic writes left in `folder` (and its checkpoints/): `.<name>.tmp-<pid>`."""
    import shutil

    removed = []
    for parent in (Path(folder), Path(folder) / "checkpoints"):
        if not parent.is_dir():
            continue
        for item in parent.iterdir():
            if item.name.startswith(".") and TEMP_MARK in item.name:
                shutil.rmtree(item) if item.is_dir() else item.unlink(missing_ok=True)
                removed.append(item)
    return removed


def check_output_dir(path: str | Path, key: str = "output_dir") -> Path:
    """`path` usable as a run folder (absent, or a folder), in a writable place; else a UserError
    naming `key`. Leaves nothing behind (writability is probed with a folder made and removed)."""
    from lightning_edit.errors import UserError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{key}={path}: is a file (expected a folder for the run's outputs, or a path to create)")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{key}={path}: {probe} is a file (expected a folder for the run's outputs)")
    import tempfile

    try:  # the only sure test of writability (root, read-only mounts, /proc): make and remove a folder
        os.rmdir(tempfile.mkdtemp(prefix=".lightning-edit-probe-", dir=probe))
    except OSError as exc:
        raise UserError(f"{key}={path}: cannot create folders in {probe} ({exc.strerror or exc}; expected a "
                        "folder this user can write)") from None
    return path


def peek_checkpoint(path: str | Path, key: str) -> dict:
    """The structure of a checkpoint file, loaded with ``weights_only=True`` (tensors and plain
    values, no code unpickled; mmap, so tensors are not read); a UserError naming `key` and the file
    when it does not load that way (not a checkpoint, truncated, or a pickle of code)."""
    import pickle

    import torch

    from lightning_edit.errors import UserError

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        # torch's weights-only refusal names the offending global on a later line: show that one.
        reason = next((line for line in lines if "Unsupported global" in line), lines[0])
        raise UserError(f"{key}: {path} does not load as a checkpoint with weights_only=True (tensors and plain "
                        f"values only): {reason}") from None
