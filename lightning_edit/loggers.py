"""Lightning loggers for the jobs (W&B and CSV); the run folder, seeding and threads are in `runtime.py`.

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

