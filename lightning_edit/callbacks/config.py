"""The `callbacks:` section of an edit run: one dataclass per callback, plain values only, so
`callbacks.downstream.enabled=true` on the command line is all it takes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DownstreamConfig:
    """`DownstreamEval`: general-ability tasks on the model as edited at T (and at T = 0)."""

    enabled: bool = False
    tasks: list[str] = field(default_factory=lambda: ["toyworld_mc"])
    """Task names: toyworld_mc, mmlu, gsm8k, commonsense_qa, bbh, humaneval, or any lm-eval task
    (see `lightning_edit.downstream` for the data each needs)."""
    at: list[int] | None = None
    """Edit counts T to evaluate at (T = 0, the baseline, always); None = the run's eval.checkpoints."""
    at_end: bool = True
    """Also evaluate at the stream's last edit."""
    limit: int | None = 200
    """Examples per task (the file's first rows); None = all."""
    limits: dict[str, int] = field(default_factory=dict)
    """Per-task overrides of `limit`, e.g. {humaneval: 20}."""
    allow_code_execution: bool = False
    """Run model-written code (HumanEval). Off by default: the harness is not a security sandbox."""
    data_dir: str | None = None
    """Local task files (mmlu/, gsm8k/, commonsense_qa/, bbh/); None = $LIGHTNING_EDIT_DATA, else
    ~/.cache/lightning_edit/downstream."""
    include_path: str | None = None
    """A folder of extra lm-eval task YAMLs."""
    batch_size: int = 16
    """lm-eval batch size."""
    num_fewshot: int | None = None
    """Few-shot examples for every lm-eval task (from its train/dev file when present); None = each task's own (0 for the local ones)."""
    max_gen_toks: int | None = None
    """Cap on generated tokens in generation tasks; None = the task's own, at most half the model's context."""
    humaneval_timeout: float = 3.0
    """Seconds each HumanEval program may run."""
    humaneval_max_new_tokens: int = 256
    cache_file: bool = True
    """Keep scores per (model state, task, limit) in <output_dir>/downstream_cache.json as well as in memory."""


@dataclass
class LocalityConfig:
    """`LocalityEval`: drift on held-out prompts vs the unedited model (argmax agreement and KL)."""

    enabled: bool = True
    prompts_path: str | None = None
    """Text file, one prompt a line; None = the world's corpus (or data.corpus), lines that mention
    no subject of the stream."""
    n_prompts: int = 200
    seed: int = 0
    """Seeds which lines are sampled."""
    at: list[int] | None = None
    """Edit counts T to evaluate at (T = 0 always); None = the run's eval.checkpoints."""
    at_end: bool = True
    batch_size: int = 32
    topk: int | None = None
    """Keep this many reference log-probs per position; None = the whole vocabulary when
    prompts' positions x vocab fit `max_reference_elements`, else as many as fit (KL is then a lower bound)."""
    max_reference_elements: int = 67_108_864
    """Budget for the unedited model's stored log-probs (numbers, float32)."""


@dataclass
class ExamplesConfig:
    """`ExamplesTable`: example prompts with their generations before the first edit and at the end."""

    enabled: bool = True
    n_edits: int = 8
    """Edit prompts from the start of the stream (and their first paraphrase)."""
    n_locality: int = 4
    """Locality prompts of those records."""
    max_new_tokens: int = 8


@dataclass
class PlotsConfig:
    """`DashboardPlots`: PNGs of Rel/Gen/Loc, locality and downstream scores against T."""

    enabled: bool = True


@dataclass
class ProgressConfig:
    """`EditProgressBar`: T, seconds per edit and the last Rel/Loc on the progress bar."""

    enabled: bool = True
    refresh_rate: int = 1


@dataclass
class CallbacksConfig:
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    locality: LocalityConfig = field(default_factory=LocalityConfig)
    examples: ExamplesConfig = field(default_factory=ExamplesConfig)
    plots: PlotsConfig = field(default_factory=PlotsConfig)
    progress: ProgressConfig = field(default_factory=ProgressConfig)
