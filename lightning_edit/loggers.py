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


def build_loggers(cfg: Any, output_dir: Path, job: str, resume_step: int | None = None) -> list:
    """Lightning loggers for ``cfg.logger`` (wandb+csv, wandb, csv, none); files under output_dir.

    CSV goes to ``<output_dir>/csv/metrics.csv``. `resume_step`: the run resumes in the same folder
    from a checkpoint taken after that step: the file keeps its rows up to that step and goes on
    (rows logged after the checkpoint, before the run stopped, are logged again by the resumed run).
    Without it, a run in a folder that has a metrics.csv writes ``csv/resumed-<timestamp>/metrics.csv``.
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
        version = "" if first or resume_step is not None else f"resumed-{time.strftime('%Y%m%d-%H%M%S')}"
        logger = CSVLogger(save_dir=str(output_dir), name="csv", version=version)
        if resume_step is not None:
            earlier = _csv_rows_until(output_dir / "csv" / "metrics.csv", resume_step)
            if earlier:
                writer = logger.experiment  # creating it removes the old file: its rows go back first
                writer.metrics.extend(earlier)
        loggers.append(logger)
    return loggers


def _csv_rows_until(path: Path, step: int) -> list[dict[str, Any]]:
    """The rows of a metrics.csv logged at steps <= `step` (empty cells dropped)."""
    import csv

    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        try:
            at = int(float(row.get("step") or "nan"))
        except ValueError:
            continue
        if at <= step:
            out.append({k: v for k, v in row.items() if v not in ("", None)})
    return out
