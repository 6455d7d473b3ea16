"""`run edit`: a lifelong stream of knowledge edits applied through one editor.

config -> `build_edit_run` (validate editor config, read + validate every edit record, load model,
resolve the component, build editor, editor.prepare(corpus)) -> Trainer.fit(EditModule, EditStream)
-> results table (printed, JSON, CSV, markdown, PNG) and the edit state (`<output_dir>/edit_state`,
reloadable with `jobs.edit_run.load_edited`). Everything that can be wrong in the config or the data
fails before the model is loaded.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_edit.callbacks.config import CallbacksConfig
from lightning_edit.code.job import CodeBenchConfig
from lightning_edit.config import RunConfig, save_config
from lightning_edit.constants import CHECKPOINTS_DIR, EDIT_STATE_DIR, LAST_CHECKPOINT

SUMMARY = "apply a lifelong stream of knowledge edits (MicroEdit, TCPE, PNKE, MENT, FiNE, baselines)"
DEFAULT_CONFIG = "microedit.yaml"


@dataclass
class ComponentConfig:
    """The sparse component an editor works through (ignored by editors that need none)."""

    path: str | None = None
    """A sparsify- or SAELens-layout checkpoint; None = find or train the default one for the world."""
    hookpoint: str = "layers.2"


@dataclass
class EditDataConfig:
    """The edit stream."""

    path: str | None = None
    """Edit file (ZsRE, CounterFact, EasyEdit/KnowEdit JSON, SelfCheckGPT); None = the embedded
    world's CounterFact export (only when model.name is an embedded world)."""
    format: str = "auto"
    order_seed: int = 0
    """Seeds the order of the stream (a permutation of the file's records)."""
    batch_size: int = 1
    """Records per edit step; > 1 only for editors that support batches."""
    limit: int | None = 100
    """T: how many edits to apply (the first T of the seeded order); None = the whole file."""
    corpus: str | None = None
    """Text file (one passage a line) handed to `editor.prepare` for statistics and calibration;
    None = the embedded world's corpus, or nothing for other models."""


@dataclass
class EvalConfig:
    checkpoints: list[int] = field(default_factory=lambda: [1, 10, 100, 1000])
    """Edit counts T at which every edit so far is scored (final-state protocol); the stream's
    end is always scored too."""
    immediate: bool = True
    """Also score each edit right after it is applied (immediate protocol)."""
    batch_size: int = 32
    """Prompts per forward pass when scoring."""


@dataclass
class CheckpointConfig:
    """Lightning checkpoints mid-stream (they hold the edit state, not the model's weights)."""

    every_n_edits: int = 100
    """Save after every this many edits (rounded to whole steps); `trainer.enable_checkpointing=false` turns saving off."""
    save_last: bool = True
    """Keep `<output_dir>/checkpoints/last.ckpt` current."""
    resume: str | None = None
    """Resume from this checkpoint, or `last` for `<output_dir>/checkpoints/last.ckpt`: every edit
    is applied exactly once, as if the run had not stopped."""


@dataclass
class EditJobConfig(RunConfig):
    component: ComponentConfig = field(default_factory=ComponentConfig)
    editor: dict[str, Any] = field(default_factory=lambda: {"method": "microedit"})
    """`method` plus that method's hyperparameters, checked against the method's own dataclass
    (`Editor.config_class`) before any edit, so a typo is still an error."""
    data: EditDataConfig = field(default_factory=EditDataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    """Downstream tasks, held-out locality, examples table, plots and progress bar at checkpoints T."""
    threads: int | None = None
    """torch CPU threads; None = the machine's cores (tiny models on shared cores: set 1)."""
    code: CodeBenchConfig = field(default_factory=CodeBenchConfig)
    """`code.benchmark=kecode|ment` runs a code benchmark on a code world (lightning_edit/code/job.py)."""


SCHEMA = EditJobConfig


def _trainer(cfg: DictConfig, output_dir: Path, batch_size: int, world: Any, corpus: list[str] | None):
    """lightning.Trainer from `cfg.trainer` as is, over defaults for an edit stream."""
    from lightning import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_edit.callbacks import build_callbacks
    from lightning_edit.loggers import build_loggers

    # log_every_n_steps: the module logs straight to the loggers (step = T), this only quiets a warning.
    kwargs: dict[str, Any] = {"max_epochs": 1, "enable_model_summary": False, "log_every_n_steps": 1,
                              "default_root_dir": str(output_dir)}
    kwargs.update(OmegaConf.to_container(cfg.trainer, resolve=True))
    if kwargs["max_epochs"] != 1:  # a second pass would apply every edit again
        raise ValueError(f"trainer.max_epochs is {kwargs['max_epochs']}; an edit stream is one epoch "
                         "(use data.limit for T, trainer.max_steps to stop early)")
    kwargs.setdefault("logger", build_loggers(cfg, output_dir, "edit") or False)
    callbacks = list(kwargs.pop("callbacks", None) or [])
    callbacks += build_callbacks(cfg.callbacks, checkpoints=cfg.eval.checkpoints, world=world,
                                 corpus=corpus, output_dir=output_dir,
                                 progress_bar=kwargs.get("enable_progress_bar", True))
    if kwargs.get("enable_checkpointing", True):
        callbacks.append(ModelCheckpoint(
            dirpath=output_dir / CHECKPOINTS_DIR,
            filename="edits-{step}",
            every_n_train_steps=max(1, cfg.checkpoint.every_n_edits // batch_size),
            save_last=cfg.checkpoint.save_last,
            save_top_k=1,
        ))
    return Trainer(callbacks=callbacks, **kwargs)


def run(cfg: DictConfig) -> int:
    from lightning_edit.editors.state import save_edit_state
    from lightning_edit.jobs.edit_run import build_edit_run, check_edit_config
    from lightning_edit.metrics import EditScorer
    from lightning_edit.results import markdown_table, save_results
    from lightning_edit.runtime import resolve_output_dir, seed_everything, set_cpu_threads
    from modules.edit_module import EditModule

    # Lightning asks manual-optimisation users to checkpoint the state before optimizer.step();
    # for an edit stream the state after the edit is exactly what a checkpoint must hold.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    seed_everything(cfg.seed)
    set_cpu_threads(cfg.threads)
    output_dir = resolve_output_dir(cfg.output_dir, "edit")

    # Everything checkable without the model fails here, before any work.
    try:
        check_edit_config(cfg)
    except (KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    if cfg.code.benchmark is not None:  # KECode / MENT on a code world, not a fact stream
        from lightning_edit.code import job as code_job

        return code_job.run(cfg, output_dir)
    run = build_edit_run(cfg)  # the stream is read and validated before the model is loaded
    save_config(cfg, output_dir)
    editor, stream = run.editor, run.stream

    module = EditModule(editor, EditScorer(run.tokenizer, batch_size=cfg.eval.batch_size),
                        checkpoints=cfg.eval.checkpoints, immediate=cfg.eval.immediate)
    ckpt_path = cfg.checkpoint.resume
    if ckpt_path == "last":
        ckpt_path = str(output_dir / CHECKPOINTS_DIR / LAST_CHECKPOINT)
    if ckpt_path:
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"checkpoint.resume: no checkpoint at {ckpt_path}")
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")  # ours
    trainer = _trainer(cfg, output_dir, cfg.data.batch_size, run.world, run.corpus)
    trainer.fit(module, datamodule=stream, ckpt_path=ckpt_path, weights_only=True)

    if trainer.is_global_zero:
        method = run.method
        title = f"{method} on {cfg.model.name}: {stream.num_edits} edits from {Path(stream.path).name}"
        meta = {"method": method, "model": cfg.model.name, "data": str(stream.path),
                "order_seed": cfg.data.order_seed, "edits": len(editor.ledger), "output_dir": str(output_dir)}
        save_results(module.rows, output_dir, meta=meta, title=title)
        save_edit_state(editor, output_dir / EDIT_STATE_DIR)
        print(markdown_table(module.rows, title))
        print(f"results, plot and edit state in {output_dir}")
    return 0
