"""The jobs the command line runs: each is a config schema, a default config file and a run function.

A job module exposes `SCHEMA` (a dataclass), `DEFAULT_CONFIG` (a file in configs/), `SUMMARY` (one
line for help), optionally `EXAMPLES` (command lines for `--help`), and `run(cfg) -> int`. The CLI imports a job only when it is asked for, so `--help`
stays fast and a job's heavy imports (torch, transformers) are paid only by that job.
"""

from __future__ import annotations

import importlib
from types import ModuleType

JOBS: dict[str, str] = {
    "edit": "lightning_edit.jobs.edit",
    "sae": "lightning_edit.jobs.sparse",
    "transcoder": "lightning_edit.jobs.transcoder",
    "generate": "lightning_edit.jobs.generate",
    "calibrate": "lightning_edit.jobs.calibrate",
}


def job_module(name: str) -> ModuleType:
    if name not in JOBS:
        raise KeyError(f"unknown job '{name}'; choices: {', '.join(JOBS)}")
    return importlib.import_module(JOBS[name])
