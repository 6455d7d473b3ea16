"""lm-evaluation-harness on an in-memory (edited) model, and the local-file variants of its tasks.

`evaluate_lm_eval` wraps the model object itself in lm-eval's `HFLM` (no reload, so hooks, switches
and spliced components of `editor.edited()` are live) and runs `lm_eval.simple_evaluate`.

Local tasks: the YAML templates in `configs/downstream/` (`mmlu_local`, `gsm8k_local`,
`commonsense_qa_local`, `bbh_local`) name their data files relative to a data dir, without an
extension; `render_local_tasks` writes, into a folder lm-eval can include, a concrete YAML for every
template whose files exist (`.jsonl`, `.json` or `.parquet`, or hub-style `test-00000-of-00001.parquet`
shards), with absolute paths, so the datasets load with no network.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import yaml

from lightning_edit.errors import UserError
from lightning_edit.config import repo_configs_dir
from lightning_edit.models import eval_mode, max_positions, model_device
from lightning_edit.world import cache_root

DATA_ENV = "LIGHTNING_EDIT_DATA"
"""Environment variable naming the downstream data dir (overridden by `downstream.data_dir`)."""
LOCAL_TEMPLATES = {"mmlu": "mmlu_local", "gsm8k": "gsm8k_local", "commonsense_qa": "commonsense_qa_local",
                   "bbh": "bbh_local"}
"""Our task name -> its template in configs/downstream/."""
FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
"""Data file extension -> the `datasets` builder that reads it."""
METRIC_PREFERENCE = ("acc,none", "exact_match,strict-match", "exact_match,none", "acc_norm,none",
                     "exact_match,flexible-extract")
"""Which reported metric is a task's headline score, first present wins."""


class DownstreamDataError(UserError, FileNotFoundError):
    """A task's data cannot be found or read; the message says which files go where."""


def data_dir(configured: str | Path | None = None) -> Path:
    """The downstream data dir: `configured`, else $LIGHTNING_EDIT_DATA, else <cache>/downstream
    (the cache is $LIGHTNING_EDIT_CACHE or ~/.cache/lightning_edit)."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return cache_root() / "downstream"


def templates_dir() -> Path:
    """`configs/downstream` of the repo (or $LIGHTNING_EDIT_CONFIGS/downstream)."""
    here = repo_configs_dir() / "downstream"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "configs" / "downstream"


def _template(name: str) -> dict[str, Any]:
    path = templates_dir() / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval task template {path} is missing (expected in configs/downstream/)")
    return yaml.safe_load(path.read_text())


def find_data_file(root: Path, stem: str) -> Path | None:
    """`root/stem` as given, or with a known extension, or as hub-style shards (`stem-*.parquet`)."""
    base = root / stem
    if base.is_file() and base.suffix in FILE_SUFFIXES:
        return base
    for suffix in FILE_SUFFIXES:
        candidate = base.with_name(base.name + suffix)
        if candidate.is_file():
            return candidate
    shards = sorted(base.parent.glob(base.name + "-*.parquet")) if base.parent.is_dir() else []
    return shards[0] if len(shards) == 1 else (base.parent / (base.name + "-*.parquet") if shards else None)


def _render(config: dict[str, Any], root: Path, name: str) -> dict[str, Any] | None:
    """The template with absolute data files, optional splits dropped; None without the test split."""
    config = dict(config)
    kwargs = dict(config.get("dataset_kwargs") or {})
    wanted = dict(kwargs.get("data_files") or {})
    test_split = config.get("test_split", "test")
    found = {split: find_data_file(root, stem) for split, stem in wanted.items()}
    if found.get(test_split) is None:
        return None
    files = {split: path for split, path in found.items() if path is not None}
    builders = {FILE_SUFFIXES[Path(str(p).replace("-*", "")).suffix] for p in files.values()}
    if len(builders) > 1:
        raise DownstreamDataError(f"task {name}: mixed file types in {root} ({', '.join(map(str, files.values()))}); "
                                  "use one format (.jsonl/.json or .parquet) for all splits")
    config["dataset_path"] = builders.pop()
    kwargs["data_files"] = {split: str(path.resolve() if "*" not in str(path) else path)
                            for split, path in files.items()}
    test_file = files[test_split]
    if test_file.suffix == ".json" and _is_examples_object(test_file):
        kwargs["field"] = "examples"  # BBH's own release: {"examples": [...]}
    config["dataset_kwargs"] = kwargs
    if config.get("fewshot_split") and config["fewshot_split"] not in files:
        config.pop("fewshot_split")
        config.pop("fewshot_config", None)
    config["task"] = name
    return config


def _is_examples_object(path: Path) -> bool:
    with path.open() as f:
        head = f.read(4096).lstrip()
    return head.startswith("{") and '"examples"' in head


def render_local_tasks(root: str | Path, out_dir: str | Path) -> dict[str, list[str]]:
    """Write a concrete lm-eval YAML into `out_dir` for every local task whose data is under `root`.

    Returns our task name -> the lm-eval task names rendered for it (`{"mmlu": ["mmlu_local"],
    "bbh": ["bbh_local_boolean_expressions", ...]}`); tasks without data are left out.
    """
    root, out_dir = Path(root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rendered: dict[str, list[str]] = {}
    for ours, template_name in LOCAL_TEMPLATES.items():
        template = _template(template_name)
        if "{subtask}" in str(template.get("task", "")):
            subtasks = sorted({p.name.split(".")[0] for p in (root / ours).glob("*")
                               if p.suffix in FILE_SUFFIXES}) if (root / ours).is_dir() else []
            variants = [(s, yaml.safe_load(yaml.safe_dump(template).replace("{subtask}", s))) for s in subtasks]
        else:
            variants = [(None, template)]
        for _, config in variants:
            config = _render(config, root, config["task"])
            if config is None:
                continue
            (out_dir / f"{config['task']}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            rendered.setdefault(ours, []).append(config["task"])
    return rendered


def missing_data_message(task: str, root: Path) -> str:
    """Where to put the files for `task` (for errors when neither hub nor local data is there)."""
    template = _template(LOCAL_TEMPLATES[task])
    files = (template.get("dataset_kwargs") or {}).get("data_files") or {}
    required = template.get("test_split", "test")
    where = ", ".join(f"{root / stem}.jsonl" + ("" if split == required else " (optional)")
                      for split, stem in files.items())
    return (f"downstream task '{task}': no local data under {root} ({where}; .json/.parquet also work; "
            f"fields as in configs/downstream/{LOCAL_TEMPLATES[task]}.yaml). Set ${DATA_ENV} or "
            f"callbacks.downstream.data_dir to the folder that holds them.")


# Running lm-eval ---------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_lm_eval(enabled: bool = True) -> Iterator[None]:
    """Silence lm-eval's and datasets' logging and progress bars for the duration.

    Progress bars go to stderr, which is captured and replayed only if the evaluation fails.
    """
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets", "transformers", "evaluate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue()[-4000:])
        raise
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def make_task_manager(include_paths: Sequence[str | Path] = (), include_defaults: bool = True):
    """lm-eval's TaskManager over our folders (and lm-eval's own tasks when `include_defaults`)."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths]
    return TaskManager(include_path=paths or None, include_defaults=include_defaults)


def numeric_metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of one task's lm-eval result (stderr and labels dropped)."""
    out = {}
    for key, value in task_results.items():
        if "_stderr" in key or key in ("alias", "name", "sample_len") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            out[key] = float(value)
    return out


def primary_metric(metrics: dict[str, float]) -> tuple[str, float]:
    """(name, value) of the headline metric: the first of METRIC_PREFERENCE present, else the first."""
    for name in METRIC_PREFERENCE:
        if name in metrics:
            return name, metrics[name]
    if not metrics:
        raise ValueError("lm-eval reported no numeric metric for the task")
    name = next(iter(metrics))
    return name, metrics[name]


def evaluate_lm_eval(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str], limit: int | float | None = None,
                     include_path: str | Path | Sequence[str | Path] | None = None, *, batch_size: int = 16,
                     device: str | None = None, num_fewshot: int | None = None, max_gen_toks: int | None = None,
                     task_manager: Any = None, quiet: bool = True) -> dict[str, dict[str, Any]]:
    """Run lm-eval `tasks` on the in-memory `model` and return {task: {metric: value, "n": examples}}.

    The model is evaluated as it is now: call this inside `editor.edited()` for an edited model.
    include_path: folder(s) of task YAMLs (ignored when a `task_manager` is given).
    max_gen_toks: cap on generated tokens for generation tasks; None = the task's own, but never more
    than half the model's context (a 256-token toy model would otherwise get no prompt at all).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if task_manager is None:
        paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
        task_manager = make_task_manager(paths)
    context = max_positions(model)
    gen_kwargs: dict[str, Any] = {}
    if max_gen_toks is not None:
        gen_kwargs["max_gen_toks"] = max_gen_toks
    elif context is not None and context < 2 * 256:  # 256 = lm-eval's default max_gen_toks
        gen_kwargs["max_gen_toks"] = context // 2
    with quiet_lm_eval(quiet), eval_mode(model):  # HFLM switches the model to eval; its flag comes back after
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  device=device or str(model_device(model)), max_length=context)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager, limit=limit,
                                      num_fewshot=num_fewshot, gen_kwargs=gen_kwargs or None,
                                      bootstrap_iters=0, log_samples=False)
    results = {}
    for section in ("results", "groups"):
        for task, values in (out.get(section) or {}).items():
            metrics: dict[str, Any] = numeric_metrics(values)
            n = (out.get("n-samples") or {}).get(task, {})
            metrics["n"] = n.get("effective") if isinstance(n, dict) else None
            results.setdefault(task, metrics)
    return results
