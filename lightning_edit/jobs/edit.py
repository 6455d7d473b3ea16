"""`run edit`: a lifelong stream of knowledge edits applied through one editor."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from lightning_edit.config import RunConfig

SUMMARY = "apply a lifelong stream of knowledge edits (MicroEdit, TCPE, PNKE, MENT, FiNE, baselines)"
DEFAULT_CONFIG = "microedit.yaml"


@dataclass
class ComponentConfig:
    """The sparse component an editor works through."""

    path: str | None = None
    """A sparsify- or SAELens-layout checkpoint; None = find or train the default one for the world."""
    hookpoint: str = "layers.2"


@dataclass
class EditDataConfig:
    """The edit stream."""

    path: str | None = None
    """Edit file (ZsRE, CounterFact, EasyEdit/KnowEdit JSON, SelfCheckGPT); None = the world's edits."""
    format: str = "auto"
    order_seed: int = 0
    batch_size: int = 1
    limit: int | None = 100
    """T: how many edits to apply."""


@dataclass
class EvalConfig:
    checkpoints: list[int] = field(default_factory=lambda: [1, 10, 100, 1000])
    """Edit counts T at which every edit so far is scored (final-state protocol)."""
    immediate: bool = True
    """Also score each edit right after it is applied (immediate protocol)."""


@dataclass
class EditJobConfig(RunConfig):
    component: ComponentConfig = field(default_factory=ComponentConfig)
    editor: dict[str, Any] = field(default_factory=lambda: {"method": "microedit"})
    """`method` plus that method's hyperparameters, checked against the method's own dataclass
    (`Editor.config_class`) before any edit, so a typo is still an error."""
    data: EditDataConfig = field(default_factory=EditDataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SCHEMA = EditJobConfig


def run(cfg: DictConfig) -> int:
    print(
        "lightning-edit: `run edit` is not available yet (the lifelong editing engine lands with "
        "its own issue); the config was parsed and is valid.",
        file=sys.stderr,
    )
    return 3
