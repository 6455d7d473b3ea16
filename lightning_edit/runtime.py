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
