"""`run edit`: a lifelong stream of knowledge edits applied through one editor.

config -> `build_edit_run` (validate editor config, read + validate every edit record, load model,
resolve the component, build editor, editor.prepare(corpus)) -> Trainer.fit(EditModule, EditStream)
-> results table (printed, JSON, CSV, markdown, PNG) and the edit state (`<output_dir>/edit_state`,
reloadable with `jobs.edit_run.load_edited`). Everything that can be wrong in the config or the data
fails before the model is loaded; every record is checked against the model's tokenizer and context
before the first edit (`jobs.validate`), and nothing is written before all of that has passed.
Crash safety: checkpoints are written atomically (`callbacks.safety`), an edit that fails saves one
first, and the final save writes `edit_state/` before `results.*` (results.json last).
"""

from __future__ import annotations

import shutil
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
from lightning_edit.errors import EditStepError, UserError, blame

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
    strict: bool = False
    """Duplicate records, conflicting ones (a prompt edited to two targets) and subjects absent from
    their prompt are errors instead of warnings with counts."""
    truncate: bool = False
    """A prompt (or paraphrase, locality prompt) that does not fit the model's context with its answer
    keeps its last tokens that fit, counted in the results' meta, instead of being an error."""


@dataclass
class EvalConfig:
    checkpoints: list[int] | None = None
    """Edit counts T (1..the stream's length) at which every edit so far is scored (final-state
    protocol); the stream's end is always scored too. None = 1, 10, 100, ... below T, and T."""
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
    """Resume from this checkpoint, or `last` for `<output_dir>/checkpoints/last.ckpt` (none there
    yet: the stream starts from its beginning, said on stderr): every edit is applied exactly once,
    as if the run had not stopped."""


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
    on_nonfinite: str = "stop"
    """An edit that writes NaN or Inf is refused and rolled back (ledger status "failed"); then
    `stop` ends the run (exit 1, checkpoint saved) or `skip` goes on (the count is in the results)."""


SCHEMA = EditJobConfig


def _trainer(cfg: DictConfig, output_dir: Path, batch_size: int, world: Any, corpus: list[str] | None,
             checkpoints: list[int], resumed_at: int | None):
    """lightning.Trainer from `cfg.trainer` as is, over defaults for an edit stream."""
    from lightning import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_edit.callbacks import build_callbacks
    from lightning_edit.callbacks.safety import AtomicCheckpointIO, SaveOnEditFailure
    from lightning_edit.loggers import build_loggers

    # log_every_n_steps: the module logs straight to the loggers (step = T), this only quiets a warning.
    kwargs: dict[str, Any] = {"max_epochs": 1, "enable_model_summary": False, "log_every_n_steps": 1,
                              "default_root_dir": str(output_dir)}
    kwargs.update(OmegaConf.to_container(cfg.trainer, resolve=True))
    if kwargs["max_epochs"] != 1:  # a second pass would apply every edit again
        raise UserError(f"trainer.max_epochs is {kwargs['max_epochs']}; an edit stream is one epoch "
                        "(use data.limit for T, trainer.max_steps to stop early)")
    kwargs.setdefault("logger", build_loggers(cfg, output_dir, "edit", resume_step=resumed_at) or False)
    callbacks = list(kwargs.pop("callbacks", None) or [])
    callbacks += build_callbacks(cfg.callbacks, checkpoints=checkpoints, world=world,
                                 corpus=corpus, output_dir=output_dir,
                                 progress_bar=kwargs.get("enable_progress_bar", True))
    saving = kwargs.get("enable_checkpointing", True)
    if saving:
        callbacks.append(ModelCheckpoint(
            dirpath=output_dir / CHECKPOINTS_DIR,
            filename="edits-{step}",
            every_n_train_steps=max(1, cfg.checkpoint.every_n_edits // batch_size),
            save_last=cfg.checkpoint.save_last,
            save_top_k=1,
        ))
        callbacks.append(SaveOnEditFailure(output_dir / CHECKPOINTS_DIR / LAST_CHECKPOINT))
    plugins = list(kwargs.pop("plugins", None) or [])
    if saving and not any(isinstance(p, AtomicCheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return Trainer(callbacks=callbacks, plugins=plugins or None, **kwargs)


def _resume_from(cfg: DictConfig, output_dir: Path) -> tuple[str | None, int | None]:
    """(checkpoint to resume from, edits it holds) for `checkpoint.resume`: `last` without a
    checkpoint starts from the beginning (said on stderr); a given path must exist and load with
    weights_only=True (tensors and plain values, no code unpickled)."""
    from lightning_edit.runtime import peek_checkpoint

    resume = cfg.checkpoint.resume
    if not resume:
        return None, None
    path = output_dir / CHECKPOINTS_DIR / LAST_CHECKPOINT if resume == "last" else Path(resume)
    if not path.is_file():
        if resume == "last":
            print(f"checkpoint.resume=last: no checkpoint at {path} yet; the stream starts from its first edit",
                  file=sys.stderr, flush=True)
            return None, 0  # a killed run's metrics.csv starts over with it
        raise UserError(f"checkpoint.resume={resume}: no such file (expected a .ckpt saved by `run edit`, or "
                        "`last`)")
    state = peek_checkpoint(path, f"checkpoint.resume={resume}")
    edit = state.get("edit") if isinstance(state, dict) else None
    if not isinstance(edit, dict) or not isinstance(edit.get("records"), list):
        raise UserError(f"checkpoint.resume={resume}: {path} is not an edit-stream checkpoint (no 'edit' entry; "
                        "expected a .ckpt saved by `run edit`)")
    return str(path), len(edit["records"])


def _meta(cfg: DictConfig, run: Any, module: Any, output_dir: Path, checkpoints: list[int]) -> dict[str, Any]:
    ledger = run.editor.ledger
    return {"method": run.method, "model": cfg.model.name, "data": str(run.stream.path),
            "order_seed": cfg.data.order_seed, "edits": len(ledger),
            "failed_edits": sum(1 for e in ledger if getattr(e, "status", "applied") == "failed"),
            "checkpoints": checkpoints, "validation": run.validation.to_dict() if run.validation else None,
            "output_dir": str(output_dir)}


def run(cfg: DictConfig) -> int:
    from lightning_edit.jobs.edit_run import check_edit_config
    from lightning_edit.runtime import check_output_dir, resolve_output_dir, seed_everything, set_cpu_threads

    # Lightning asks manual-optimisation users to checkpoint the state before optimizer.step();
    # for an edit stream the state after the edit is exactly what a checkpoint must hold.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    seed_everything(cfg.seed)
    set_cpu_threads(cfg.threads)

    # Everything about the inputs is checked before anything is written (UserError: one line, exit 2):
    # config, output folder, checkpoint to resume, the stream (every record against the model's
    # tokenizer and context), the model, the component, the editor's own options, the corpus.
    check_edit_config(cfg)
    output_dir = check_output_dir(resolve_output_dir(cfg.output_dir, "edit"))
    if cfg.code.benchmark is not None:  # KECode / MENT on a code world, not a fact stream
        from lightning_edit.code import job as code_job

        return code_job.run(cfg, output_dir)
    existed = output_dir.exists()
    try:
        return _run(cfg, output_dir)
    except UserError:
        if not existed and output_dir.exists():  # a late check failed: leave no folder behind
            shutil.rmtree(output_dir, ignore_errors=True)
        raise


def _run(cfg: DictConfig, output_dir: Path) -> int:
    from lightning_edit.callbacks.safety import SaveOnEditFailure
    from lightning_edit.editors.state import save_edit_state
    from lightning_edit.jobs.edit_run import build_edit_run, eval_points
    from lightning_edit.metrics import EditScorer
    from lightning_edit.results import loc_unavailable, markdown_table, save_results
    from lightning_edit.runtime import remove_stale_temps
    from modules.edit_module import EditModule

    ckpt_path, resumed_at = _resume_from(cfg, output_dir)
    run = build_edit_run(cfg)
    stream, editor = run.stream, run.editor
    checkpoints = eval_points(cfg, stream.num_edits)
    module = EditModule(editor, EditScorer(run.tokenizer, batch_size=cfg.eval.batch_size),
                        checkpoints=checkpoints, immediate=cfg.eval.immediate, on_nonfinite=cfg.on_nonfinite)
    if ckpt_path:
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")  # ours
    if resumed_at is not None:  # metrics.csv: its rows up to the checkpoint are put back (or none: a restart)
        warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    with blame("trainer / callbacks config"):
        trainer = _trainer(cfg, output_dir, cfg.data.batch_size, run.world, run.corpus, checkpoints, resumed_at)

    # From here on the run writes into output_dir.
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(output_dir)
        save_config(cfg, output_dir)
    try:
        trainer.fit(module, datamodule=stream, ckpt_path=ckpt_path, weights_only=True)
    except EditStepError as exc:
        saver = next((c for c in trainer.callbacks if isinstance(c, SaveOnEditFailure)), None)
        done = len(module.edited_records)
        if saver is not None and saver.saved is not None:
            where = (f"the {done} edits before it are saved in {saver.saved}: fix the record and rerun with "
                     "checkpoint.resume=last")
        else:
            where = f"nothing was saved (trainer.enable_checkpointing=false); {done} edits were done"
        raise EditStepError(f"{exc}; {where}") from exc

    if trainer.is_global_zero:
        title = f"{run.method} on {cfg.model.name}: {stream.num_edits} edits from {Path(stream.path).name}"
        meta = _meta(cfg, run, module, output_dir, checkpoints)
        meta["notes"] = [note for note in [*(getattr(c, "unavailable", None) for c in trainer.callbacks),
                                           loc_unavailable(module.rows)] if note]
        if meta["failed_edits"]:
            title += f" ({meta['failed_edits']} refused: NaN/Inf, rolled back and scored as not applied)"
        # edit_state/ first, results.* last (results.json the very last): a folder holding
        # results.json is a finished run; each is written atomically.
        save_edit_state(editor, output_dir / EDIT_STATE_DIR)
        save_results(module.rows, output_dir, meta=meta, title=title)
        print(markdown_table(module.rows, title, run.method, meta["notes"]))
        print(f"results, plot and edit state in {output_dir}")
    return 0
