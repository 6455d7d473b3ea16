"""Train top-k transcoders: `python train_transcoder.py [config=FILE] [key=value ...]`
(defaults: configs/transcoder.yaml)."""

import sys

from lightning_edit.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("transcoder", sys.argv[1:]))
