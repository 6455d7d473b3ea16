"""`run sae` (and, with other defaults, `run transcoder`): train top-k sparse coders with Lightning.

The flow: token batches (datamodules/tokens.py) -> frozen LM with hooks on every hookpoint ->
one TopKSparseCoder per hookpoint (modules/sparse_coder_module.py) -> Lightning checkpoints for
resume -> an export in the sparsify layout (a folder per hookpoint), reloaded and width-checked
against the model, and a final table per hookpoint. `trainer:` goes to lightning.Trainer as it is,
so `trainer.devices=8` (DDP, one frozen LM per rank) needs no code.

This module is imported by `--help`: heavy imports stay inside `train`.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_edit.config import ConfigError, RunConfig
from lightning_edit.errors import UserError
from lightning_edit.constants import CHECKPOINTS_DIR, EXPORT_DIR, LAST_CHECKPOINT, SUMMARY_JSON, SUMMARY_MD

SUMMARY = "train top-k sparse autoencoders on residual streams"
DEFAULT_CONFIG = "sae.yaml"


@dataclass
class CoderSection:
    """SparseCoderConfig fields shared by every coder (widths come from the model)."""

    k: int = 32
    """Active latents per token."""
    expansion_factor: int = 16
    """num_latents = expansion_factor * d_in when num_latents is 0."""
    num_latents: int = 0
    auxk: bool = True
    """AuxK loss on dead latents (Gao et al. 2024, B.1)."""
    k_aux: int | None = None
    """Dead latents used by AuxK; None = d_in // 2."""
    dead_after_tokens: int = 10_000_000
    """A latent is dead after this many tokens without firing."""
    multi_topk: bool = False
    """Add the FVU of the top-4k reconstruction / 8 to the loss."""
    skip_connection: bool = False
    """Transcoders: a linear skip path W_skip (zero init)."""
    activation: str = "topk"
    """topk, or relu (transcoders only)."""


@dataclass
class SparseDataSection:
    """The token stream (datamodules/tokens.py)."""

    path: str | None = None
    """.txt/.jsonl/.parquet file, a folder of them, a `datasets` save_to_disk folder, or a Hugging
    Face dataset name; None = the embedded world's corpus (model.name must then be a world)."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.parquet/HF records."""
    txt_documents: str = "lines"
    """.txt files: `lines` (a document per non-empty line) or `file` (the whole file is one)."""
    hf_name: str | None = None
    """Hugging Face dataset config name."""
    split: str = "train"
    streaming: bool = False
    """Stream local files through `datasets` instead of tokenising them all up front."""
    context_length: int = 64
    packing: bool | str | None = "auto"
    """Concatenate documents (EOS between) into full rows: true, false, or auto (pack only when one
    document per row would truncate more than 10% of the corpus's tokens; said in one log line)."""
    batch_size: int = 32
    """Sequences per step per device."""
    val_batch_size: int | None = None
    num_workers: int = 0
    shuffle_buffer: int = 4
    """Consecutive batches whose tokens are mixed in each step (1 = no shuffling)."""
    val_sequences: int = 256
    """Held-out sequences for validation (spliced-in CE, FVU)."""
    max_tokens: int | None = None
    """Stop after this many training tokens (over all ranks); None = trainer.max_steps decides."""
    activation_cache: str | None = None
    """A folder for the LM's activations at every hookpoint, computed once (sharded over ranks)
    and reused by later epochs and runs; keyed by model, training rows, hookpoints and mode.
    None = run the LM on every batch."""


@dataclass
class OptimSection:
    lr: float | None = None
    """Adam learning rate; None = 2e-4 / sqrt(num_latents / 2**14) per coder."""
    auxk_alpha: float = 0.03125
    """Weight of the AuxK loss (1/32)."""
    lr_warmup_steps: int = 0


@dataclass
class SparseJobConfig(RunConfig):
    mode: str = "sae"
    """sae: reconstruct a hookpoint's output; transcoder: map a module's input to its output."""
    hookpoints: list[str] = field(default_factory=lambda: ["layers.2"])
    """Module names or patterns relative to the base model: layers.2, layers.*, layers.*.mlp."""
    coder: CoderSection = field(default_factory=CoderSection)
    data: SparseDataSection = field(default_factory=SparseDataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint_every: int = 100
    """Save a Lightning checkpoint (and last.ckpt) every this many steps."""
    resume: str | None = None
    """A Lightning checkpoint to continue from, or `last` (output_dir's, else the newest run's)."""
    export_dir: str | None = None
    """Where the trained coders go (sparsify layout); None = <output_dir>/export."""
    threads: int | None = None
    """torch CPU threads per process; None = cores / processes on this machine."""
    dump_rank_weights: bool = False
    """Debug: every rank writes <output_dir>/ranks/rank<k>.safetensors at the end (DDP checks)."""


SCHEMA = SparseJobConfig


def run(cfg: DictConfig) -> int:
    return train(cfg, job="sae")


# --- the run ---------------------------------------------------------------------------------------


TRAINER_DEFAULTS: dict[str, Any] = {
    "num_sanity_val_steps": 0,  # coders are untrained before the first step
    "check_val_every_n_epoch": None,  # the token stream is one endless epoch: validate by steps
    "log_every_n_steps": 10,
}


def _resume_path(cfg: DictConfig, job: str) -> tuple[str | None, str | None]:
    """(checkpoint path, output dir to continue in) for `resume`; the checkpoint is checked to load
    with ``weights_only=True`` (tensors and plain values, no code unpickled) before anything runs."""
    if not cfg.resume:
        return None, cfg.output_dir
    if cfg.resume != "last":
        path = Path(cfg.resume)
        if not path.is_file():
            raise ConfigError(f"resume: checkpoint '{path}' does not exist")
        return _checked_checkpoint(path), cfg.output_dir
    if cfg.output_dir:
        path = Path(cfg.output_dir) / CHECKPOINTS_DIR / LAST_CHECKPOINT
        if not path.is_file():  # killed before its first checkpoint: nothing to resume, start over
            print(f"resume=last: no checkpoint at {path} yet; training starts from its first step", file=sys.stderr)
            return None, cfg.output_dir
        return _checked_checkpoint(path), cfg.output_dir
    candidates = sorted(Path("runs", job).glob(f"*/{CHECKPOINTS_DIR}/{LAST_CHECKPOINT}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        print(f"resume=last: no runs/{job}/*/checkpoints/last.ckpt yet; training starts from its first step in a "
              "new run folder", file=sys.stderr)
        return None, cfg.output_dir
    return _checked_checkpoint(candidates[-1]), str(candidates[-1].parents[1])


def _checked_checkpoint(path: Path) -> str:
    from lightning_edit.runtime import peek_checkpoint

    peek_checkpoint(path, "resume")
    return str(path)


def _world_corpus(model_name: str) -> Path | None:
    from lightning_edit.world import WORLD_NAMES, load_world

    return load_world(model_name).corpus_path if model_name in WORLD_NAMES else None


def _processes_per_node(trainer_cfg: dict[str, Any]) -> int:
    """How many training processes this machine runs (devices as an int; 1 when unknown)."""
    devices = trainer_cfg.get("devices", 1)
    return devices if isinstance(devices, int) and devices > 0 else 1


def train(cfg: DictConfig, job: str) -> int:
    """Run the job; a config or corpus problem found only now (a bad resume path, a missing file or
    field, an empty corpus) exits with status 2 before anything is written."""
    try:
        return _train(cfg, job)
    except UserError as exc:  # ConfigError and CorpusError are ones
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _train(cfg: DictConfig, job: str) -> int:
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.utilities import rank_zero_only

    from datamodules.tokens import TokenDataModule
    from lightning_edit.config import save_config
    from lightning_edit.errors import blame
    from lightning_edit.loggers import build_loggers
    from lightning_edit.runtime import resolve_output_dir, seed_everything, set_cpu_threads
    from lightning_edit.models import ModelAdapter, load_model
    from modules.sparse_coder_module import SparseCoderModule

    trainer_cfg = {**TRAINER_DEFAULTS, **OmegaConf.to_container(cfg.trainer, resolve=True)}
    if trainer_cfg.get("max_steps", -1) in (-1, None) and not cfg.data.max_tokens:
        raise ConfigError("set trainer.max_steps or data.max_tokens: the token stream never ends")
    owned = sorted({"logger", "callbacks", "default_root_dir"} & set(trainer_cfg))
    if owned:
        raise ConfigError(
            f"trainer.{owned[0]} is set by the job (use the top-level `logger`, `output_dir` and "
            "`checkpoint_every` keys)"
        )
    if trainer_cfg.get("accumulate_grad_batches", 1) != 1:
        raise ConfigError("trainer.accumulate_grad_batches is not supported: raise data.batch_size instead")
    if trainer_cfg.get("max_steps", -1) not in (-1, None):
        trainer_cfg.setdefault("val_check_interval", trainer_cfg["max_steps"])
    ckpt_path, output_dir = _resume_path(cfg, job)
    output_dir = resolve_output_dir(output_dir, job)
    rank0 = rank_zero_only.rank == 0
    set_cpu_threads(cfg.threads, _processes_per_node(trainer_cfg))
    seed_everything(cfg.seed)

    # The corpus is read and tokenised before anything is written: a wrong file, field or an empty
    # corpus ends here (CorpusError, exit 2) with no run folder.
    with blame(f"model.name={cfg.model.name}"):
        model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype, device="cpu")
    try:  # depth-relative names and patterns -> this model's modules, as the saved config records them
        cfg.hookpoints = ModelAdapter(model).resolve_hookpoints(list(cfg.hookpoints))
    except ValueError as exc:
        raise ConfigError(f"hookpoints: {exc}") from None
    data = OmegaConf.to_container(cfg.data, resolve=True)
    max_tokens = data.pop("max_tokens")
    shuffle_buffer = data.pop("shuffle_buffer")
    activation_cache = data.pop("activation_cache")
    world_corpus = _world_corpus(cfg.model.name) if data["path"] is None else None
    datamodule = TokenDataModule(tokenizer, world_corpus=world_corpus, seed=cfg.seed, **data)
    datamodule.setup()
    if rank0:
        if datamodule.packing_note:
            print(datamodule.packing_note, file=sys.stderr, flush=True)
        save_config(cfg, output_dir)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")
    # Checkpoints hold the state after step N, which is what resume at global_step N expects.
    warnings.filterwarnings("ignore", message=r".*no pre-optimization state was saved.*")
    if ckpt_path:
        warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")

    module = SparseCoderModule(
        model,
        list(cfg.hookpoints),
        mode=cfg.mode,
        coder=OmegaConf.to_container(cfg.coder, resolve=True),
        lr=cfg.optim.lr,
        auxk_alpha=cfg.optim.auxk_alpha,
        lr_warmup_steps=cfg.optim.lr_warmup_steps,
        shuffle_buffer=shuffle_buffer,
        seed=cfg.seed,
        max_tokens=max_tokens,
        bos_token_id=tokenizer.bos_token_id,
        dump_rank_weights_to=str(output_dir / "ranks") if cfg.dump_rank_weights else None,
        activation_cache=activation_cache,
    )

    checkpoints = output_dir / CHECKPOINTS_DIR
    callbacks = [
        ModelCheckpoint(
            dirpath=checkpoints,
            filename="step{step}",
            auto_insert_metric_name=False,
            every_n_train_steps=cfg.checkpoint_every,
            save_top_k=1,
            save_last=True,
        )
    ]
    if trainer_cfg.get("enable_progress_bar", True):
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    trainer = Trainer(
        **trainer_cfg,
        logger=build_loggers(cfg, output_dir, job) or False,
        callbacks=callbacks,
        default_root_dir=str(output_dir),
    )
    # weights_only: a checkpoint is read without unpickling code (tensors and plain values only).
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if module.last_val_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.save_checkpoint(checkpoints / LAST_CHECKPOINT, weights_only=False)  # the final state, for resume=last
    if not trainer.is_global_zero:
        return 0

    export_dir = Path(cfg.export_dir) if cfg.export_dir else output_dir / EXPORT_DIR
    export_and_check(module, ModelAdapter(model), export_dir)
    rows = summary_rows(module, export_dir, packing=datamodule.packing)
    table = markdown_table(rows)
    (output_dir / SUMMARY_MD).write_text(table + "\n")
    (output_dir / SUMMARY_JSON).write_text(json.dumps(rows, indent=2) + "\n")
    sys.stdout.write("\n" + table + "\n\n")
    sys.stdout.write(f"run folder: {output_dir}\n")
    sys.stdout.flush()
    return 0


def export_and_check(module, adapter, export_dir: Path) -> None:
    """Write every coder in the sparsify layout, read it back and check its widths on the model."""
    import torch

    from lightning_edit.sparse import check_width, load_sparse_coders, save_sparse_coders

    coders = {hp: c for hp, c in module.coders_by_hookpoint().items()}
    save_sparse_coders(coders, export_dir)
    loaded = load_sparse_coders(export_dir)
    model_desc = f"{type(adapter.model).__name__} ({getattr(adapter.model.config, '_name_or_path', '')})"
    for hp, coder in coders.items():
        if hp not in loaded:
            raise RuntimeError(f"{export_dir}: export of {hp!r} did not load back (found {sorted(loaded)})")
        d_in, d_out = adapter.hookpoint_io_dims(hp)
        check_width(loaded[hp], d_in, hp, model_desc, expected_d_out=d_out)
        for name, tensor in coder.state_dict().items():
            if not torch.equal(tensor.cpu(), loaded[hp].state_dict()[name].cpu()):
                raise RuntimeError(f"{export_dir}/{hp}: {name} changed on the export round trip")


def summary_rows(module, export_dir: Path, packing: bool | None = None) -> list[dict[str, Any]]:
    tokens, seconds = int(module.tokens_seen), int(module.train_microseconds) / 1e6
    rate = tokens / seconds if seconds > 0 else 0.0
    rows = []
    for hp in module.hookpoints:
        metrics = module.final_metrics.get(hp, {})
        rows.append({
            "hookpoint": hp,
            "mode": module.mode,
            "fvu": metrics.get("fvu"),
            "l0": metrics.get("l0"),
            "dead_frac": float(module.tracker(hp).dead_mask.float().mean()),
            "ce_clean": metrics.get("ce_clean"),
            "ce_spliced": metrics.get("ce_spliced"),
            "ce_zero": metrics.get("ce_zero"),
            "ce_loss_score": metrics.get("ce_loss_score"),
            "ce_uniform": metrics.get("ce_uniform"),
            "ce_loss_score_meaningful": metrics.get("ce_loss_score_meaningful"),
            "ce_loss_score_note": metrics.get("ce_loss_score_note"),
            "num_latents": module.coder(hp).num_latents,
            "k": module.coder(hp).cfg.k,
            "packing": packing,
            "tokens_seen": tokens,
            "tokens_per_s": rate,
            "activation_cache": module.cache_note,
            "steps": module.global_step,
            "files": str(export_dir / hp),
        })
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The summary table; a ce_loss_score that means nothing is marked (!) and explained below."""
    def fmt(value: Any, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [
        "| hookpoint | FVU | L0 | dead | ce_loss_score | CE clean / spliced / zero | tokens seen | tokens/s | files |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for r in rows:
        ce = " / ".join(fmt(r[k], ".3f") for k in ("ce_clean", "ce_spliced", "ce_zero"))
        score = fmt(r["ce_loss_score"], ".3f")
        if r.get("ce_loss_score_meaningful") is False:
            score += " (!)"
            notes.append(f"(!) {r['hookpoint']}: ce_loss_score is not meaningful: {r['ce_loss_score_note']}")
        lines.append(
            f"| {r['hookpoint']} | {fmt(r['fvu'], '.4f')} | {fmt(r['l0'], '.1f')} | "
            f"{r['dead_frac']:.1%} | {score} | {ce} | {r['tokens_seen']:,} | "
            f"{r['tokens_per_s']:,.0f} | {r['files']} |"
        )
    return "\n".join(lines + ([""] + notes if notes else []))
