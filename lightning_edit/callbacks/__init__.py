"""Lightning callbacks for edit runs: downstream tasks, held-out locality, examples table, plots and
the progress bar, switched on from the `callbacks:` section of the config (`CallbacksConfig`).

The edit job adds `callbacks: CallbacksConfig` to its schema and passes
`build_callbacks(cfg.callbacks, checkpoints=cfg.eval.checkpoints, world=cfg.model.name, ...)` to the
Trainer. Importing this package is cheap (the config only); the callbacks import Lightning when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .config import (
    CallbacksConfig,
    DownstreamConfig,
    ExamplesConfig,
    LocalityConfig,
    PlotsConfig,
    ProgressConfig,
)

_LAZY = {
    "DownstreamEval": ".downstream",
    "LocalityEval": ".locality",
    "ExamplesTable": ".examples",
    "DashboardPlots": ".plots",
    "EditProgressBar": ".progress",
}

__all__ = ["CallbacksConfig", "DownstreamConfig", "ExamplesConfig", "LocalityConfig", "PlotsConfig",
           "ProgressConfig", "build_callbacks", "build_downstream_suite", "scored_locality_prompts", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _as_config(cfg: Any) -> CallbacksConfig:
    """A CallbacksConfig from itself, None (defaults), or an OmegaConf node / dict (checked keys)."""
    if isinstance(cfg, CallbacksConfig):
        return cfg
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(CallbacksConfig), cfg if cfg is not None else {})
    return OmegaConf.to_object(merged)


def _world(world: Any):
    """A World from itself, an embedded world name, or None (any other model name)."""
    if world is None or not isinstance(world, str):
        return world
    from lightning_edit.world import WORLD_NAMES, load_world

    return load_world(world) if world in WORLD_NAMES else None


def build_downstream_suite(cfg: DownstreamConfig, world: Any = None, output_dir: str | Path | None = None):
    """The DownstreamSuite a DownstreamConfig describes (tasks resolved and checked now)."""
    from lightning_edit.downstream import DownstreamSuite, ResultCache

    world = _world(world)
    cache_path = Path(output_dir) / "downstream_cache.json" if output_dir is not None and cfg.cache_file else None
    suite = DownstreamSuite(
        cfg.tasks, limit=cfg.limit, limits=cfg.limits, world_mc_dir=world.mc_dir if world is not None else None,
        data_dir=cfg.data_dir, include_paths=[cfg.include_path] if cfg.include_path else [],
        allow_code_execution=cfg.allow_code_execution, batch_size=cfg.batch_size, num_fewshot=cfg.num_fewshot,
        max_gen_toks=cfg.max_gen_toks, humaneval_timeout=cfg.humaneval_timeout,
        humaneval_max_new_tokens=cfg.humaneval_max_new_tokens,
        work_dir=Path(output_dir) / "downstream_tasks" if output_dir is not None else None,
        cache=ResultCache(cache_path))
    suite.check_tasks()
    return suite


def _locality_sources(loc: Any, world: Any, corpus: Sequence[str] | None) -> dict[str, list[str] | None]:
    """Where `LocalityEval` draws its prompts from (its module docstring): `prompts` from
    `prompts_path`, else `candidates` (the world's corpus, else `corpus`), and the world's fact prompts."""
    prompts = candidates = None
    if loc.prompts_path:
        prompts = [line.strip() for line in Path(loc.prompts_path).read_text().splitlines() if line.strip()]
    elif world is not None:
        candidates = world.corpus_path.read_text().splitlines()
    elif corpus:
        candidates = list(corpus)
    world_prompts = [p for fact in world.kb.facts for p in world.kb.prompts(fact)] if world is not None else None
    return {"prompts": prompts, "candidates": candidates, "world_prompts": world_prompts}


def scored_locality_prompts(cfg: Any, world: Any, corpus: Sequence[str] | None, records: Sequence[Any]) -> list[str]:
    """The prompts the locality callback of `cfg` (a CallbacksConfig or its node) will score for a
    stream of `records` (the same sources and seeded choice), [] when it is off: the edit job keeps
    them, and every corpus line containing one, out of the corpus an editor is prepared on."""
    cfg = _as_config(cfg)
    if not cfg.locality.enabled:
        return []
    from .locality import LocalityEval

    loc = cfg.locality
    evaluation = LocalityEval([], **_locality_sources(loc, _world(world), corpus), n_prompts=loc.n_prompts,
                              seed=loc.seed)
    return evaluation.prompts if evaluation.prompts is not None else evaluation.held_out(records)


def build_callbacks(cfg: Any, *, checkpoints: Sequence[int], world: Any = None,
                    corpus: Sequence[str] | None = None, output_dir: str | Path | None = None,
                    progress_bar: bool = True) -> list:
    """The callbacks `cfg` (a CallbacksConfig, its OmegaConf node, a dict or None) switches on.

    checkpoints: the run's eval.checkpoints (the default `at` of downstream and locality).
    world: the embedded World or its name (`toyworld_mc`, default locality prompts, the fact prompts
    locality falls back on); None otherwise.
    corpus: lines to sample locality prompts from when there is no world (e.g. data.corpus); without
    either, locality uses the stream's own neighbourhood prompts, or says it is unavailable.
    output_dir: where the downstream cache and rendered task YAMLs go (a temp dir when None).
    progress_bar: False when the Trainer has `enable_progress_bar=False` (Lightning refuses a bar then).
    Everything that can be wrong (a HumanEval task without allow_code_execution, missing world task
    files) raises here, before the first edit.
    """
    cfg = _as_config(cfg)
    world = _world(world)
    callbacks: list = []
    if cfg.progress.enabled and progress_bar:
        from .progress import EditProgressBar

        callbacks.append(EditProgressBar(refresh_rate=cfg.progress.refresh_rate))
    if cfg.locality.enabled:
        from .locality import LocalityEval

        loc = cfg.locality
        callbacks.append(LocalityEval(loc.at if loc.at is not None else checkpoints, loc.at_end,
                                      **_locality_sources(loc, world, corpus), n_prompts=loc.n_prompts,
                                      seed=loc.seed, batch_size=loc.batch_size, topk=loc.topk,
                                      max_reference_elements=loc.max_reference_elements))
    if cfg.downstream.enabled:
        from .downstream import DownstreamEval

        ds = cfg.downstream
        callbacks.append(DownstreamEval(build_downstream_suite(ds, world, output_dir),
                                        ds.at if ds.at is not None else checkpoints, ds.at_end))
    if cfg.examples.enabled:
        from .examples import ExamplesTable

        ex = cfg.examples
        callbacks.append(ExamplesTable(ex.n_edits, ex.n_locality, ex.max_new_tokens))
    if cfg.plots.enabled:
        from .plots import DashboardPlots

        callbacks.append(DashboardPlots())
    return callbacks
