"""Run plumbing shared by the Lightning jobs: the run folder, seeding, CPU threads and loggers.

W&B never prompts: it runs online only when an API key is configured (``WANDB_API_KEY`` or a netrc
entry for the W&B host) and neither ``WANDB_MODE`` nor ``wandb.mode`` says otherwise; offline runs
land in ``<output_dir>/wandb`` and can be uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import netrc
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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


def wandb_api_key_configured(host: str | None = None) -> bool:
    """True when W&B could log in without asking: WANDB_API_KEY, or a netrc entry for the host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = host or urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        path = os.environ.get("NETRC") or None
        auth = netrc.netrc(path).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def wandb_mode(configured: str | None) -> str:
    """The W&B mode to use: the config's, else WANDB_MODE, else online only with an API key."""
    mode = configured or os.environ.get("WANDB_MODE")
    if mode in ("disabled", "dryrun"):
        return "disabled" if mode == "disabled" else "offline"
    if mode == "offline":
        return "offline"
    return "online" if wandb_api_key_configured() else "offline"


def build_loggers(cfg: Any, output_dir: Path, job: str) -> list:
    """Lightning loggers for ``cfg.logger`` (wandb+csv, wandb, csv, none); files under output_dir.

    CSV goes to ``<output_dir>/csv/metrics.csv``; a run resumed in the same folder writes
    ``csv/resumed-<timestamp>/metrics.csv`` instead of overwriting the first part.
    """
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    kinds = {"wandb+csv": ("wandb", "csv"), "wandb": ("wandb",), "csv": ("csv",), "none": ()}[cfg.logger]
    loggers: list = []
    if "wandb" in kinds:
        mode = wandb_mode(cfg.wandb.mode)
        if mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            loggers.append(
                WandbLogger(
                    project=cfg.wandb.project,
                    entity=cfg.wandb.entity,
                    name=f"{job}-{output_dir.name}",
                    save_dir=str(output_dir),
                    offline=mode == "offline",
                    tags=list(cfg.wandb.tags) or None,
                    job_type=job,
                    log_model=False,
                    settings={"console": "off"},  # our own stdout (the final table) stays ours
                )
            )
    if "csv" in kinds:
        first = not (output_dir / "csv" / "metrics.csv").exists()
        version = "" if first else f"resumed-{time.strftime('%Y%m%d-%H%M%S')}"
        loggers.append(CSVLogger(save_dir=str(output_dir), name="csv", version=version))
    return loggers

