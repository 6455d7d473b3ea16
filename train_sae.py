"""Train top-k SAEs: `python train_sae.py [config=FILE] [key=value ...]` (defaults: configs/sae.yaml)."""

import sys

from lightning_edit.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("sae", sys.argv[1:]))
