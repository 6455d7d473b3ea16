"""`run transcoder`: the sparse-coder job (jobs/sparse.py) with transcoder defaults.

A transcoder reads an MLP's input (the post-norm hidden state) and predicts its output, so its
hookpoints are MLP modules (`layers.2.mlp`, `layers.*.mlp`); everything else is the SAE job's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig

from lightning_edit.jobs.sparse import SparseJobConfig, train

SUMMARY = "train top-k transcoders that replace MLPs"
DEFAULT_CONFIG = "transcoder.yaml"


@dataclass
class TranscoderJobConfig(SparseJobConfig):
    mode: str = "transcoder"
    hookpoints: list[str] = field(default_factory=lambda: ["layers.0.mlp"])


SCHEMA = TranscoderJobConfig


def run(cfg: DictConfig) -> int:
    return train(cfg, job="transcoder")
