"""`run generate`: ask an edited model questions (greedy continuations of prompts).

    lightning run generate state=runs/edit/<stamp> prompt="At home Viahand Guba keeps a pet"

Rebuilds the editor from a saved edit state onto a fresh copy of its base model
(`lightning_edit.jobs.edit_run.load_edited`), then continues each prompt with the edits applied
(scope switches included) and, for comparison, with the base model.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

from omegaconf import DictConfig

SUMMARY = "continue prompts with an edited model (from a run's saved edit state)"
DEFAULT_CONFIG = "generate.yaml"


@dataclass
class GenerateConfig:
    state: str = "???"
    """An edit state folder, or the run folder holding `edit_state/`."""
    prompt: str | None = None
    prompts: list[str] = field(default_factory=list)
    """Prompts to continue (`prompt` adds one)."""
    max_new_tokens: int = 8
    model: str | None = None
    """Base model; None = the one recorded in the edit state."""
    device: str = "cpu"
    compare: bool = True
    """Also show the unedited model's continuation."""


SCHEMA = GenerateConfig


def run(cfg: DictConfig) -> int:
    from omegaconf import OmegaConf

    from lightning_edit.editors.base import greedy_generate
    from lightning_edit.editors.state import find_edit_state
    from lightning_edit.jobs.edit_run import load_edited
    from lightning_edit.models import load_model

    if OmegaConf.is_missing(cfg, "state"):
        print("error: give state=<run folder or its edit_state folder>", file=sys.stderr)
        return 2
    state = find_edit_state(cfg.state)
    prompts = list(cfg.prompts) + ([cfg.prompt] if cfg.prompt else [])
    if not prompts:
        print("error: give prompt=... or prompts=[...]", file=sys.stderr)
        return 2
    try:
        editor, _, tokenizer = load_edited(state, cfg.model, device=cfg.device)
    except (FileNotFoundError, ValueError) as exc:  # no edit state there, another base model
        print(f"error: {exc}", file=sys.stderr)
        return 2
    edited = editor.generate(prompts, max_new_tokens=cfg.max_new_tokens)
    base = None
    if cfg.compare:  # a second, untouched copy of the base model
        base_model, _ = load_model(editor.ctx.model_name, device=cfg.device)
        base = greedy_generate(contextlib.nullcontext(base_model), tokenizer, prompts, cfg.max_new_tokens,
                               cfg.device)
    print(f"edited model: {editor.name} with {len(editor.ledger)} edits ({state})")
    for i, prompt in enumerate(prompts):
        print(f"> {prompt}\n  edited: {edited[i].strip()}")
        if base is not None:
            print(f"  base:   {base[i].strip()}")
    return 0
