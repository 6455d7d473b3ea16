"""lm-eval on local files (lightning_edit.downstream.lm_eval_tasks) with the test world's in-memory model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_edit.downstream import DownstreamSuite, render_local_tasks


def _mmlu_accuracy(model, tokenizer, path: Path) -> float:
    """Accuracy of the MMLU template (configs/downstream/mmlu_local.yaml) by hand: for each row, the letter
    " A".." D" whose tokens (the end of context + continuation, encoded whole) are most likely."""
    right = []
    for row in map(json.loads, path.read_text().splitlines()):
        context = ("The following are multiple choice questions (with answers) about world facts.\n\n"
                   + row["question"].strip() + "".join(f"\n{l}. {c}" for l, c in zip("ABCD", row["choices"]))
                   + "\nAnswer:")
        scores = []
        for letter in "ABCD":
            whole = tokenizer(context + " " + letter, add_special_tokens=False)["input_ids"]
            n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logp[j - 1, whole[j]]) for j in range(n_ctx, len(whole))))
        right.append(max(range(4), key=scores.__getitem__) == row["answer"])
    return sum(right) / len(right)


def write_local_data(world, root: Path) -> Path:
    """MMLU-format questions made of the world's facts, GSM8K-format problems and a BBH file."""
    mc = [json.loads(line) for line in (world.mc_dir / "toyworld_mc.jsonl").read_text().splitlines()[:4]]
    (root / "mmlu").mkdir(parents=True)
    (root / "mmlu" / "test.jsonl").write_text("".join(
        json.dumps({"question": r["question"], "subject": "world_facts", "choices": r["choices"],
                    "answer": r["answer"]}) + "\n" for r in mc))
    (root / "gsm8k").mkdir()
    problems = [("Tom has 3 apples and buys 2 more. How many apples does he have?",
                 "Tom has 3 + 2 = <<3+2=5>>5 apples.\n#### 5"),
                ("A box holds 4 pens. How many pens are in 2 boxes?", "2 * 4 = <<2*4=8>>8\n#### 8"),
                ("Sam reads 10 pages a day for 3 days. How many pages?", "10 * 3 = 30\n#### 30")]
    (root / "gsm8k" / "test.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                                       for q, a in problems))
    (root / "bbh").mkdir()
    (root / "bbh" / "boolean_expressions.json").write_text(json.dumps(
        {"canary": "x", "examples": [{"input": "not ( True ) and ( True ) is", "target": "False"},
                                     {"input": "True and not not ( not False ) is", "target": "True"}]}))
    return root


def test_local_task_yamls_render_only_for_present_files(small_world, tmp_path):
    root = write_local_data(small_world, tmp_path / "data")
    rendered = render_local_tasks(root, tmp_path / "yamls")
    assert rendered == {"mmlu": ["mmlu_local"], "gsm8k": ["gsm8k_local"], "bbh": ["bbh_local_boolean_expressions"]}
    import yaml

    mmlu = yaml.safe_load((tmp_path / "yamls" / "mmlu_local.yaml").read_text())
    assert mmlu["dataset_kwargs"]["data_files"] == {"test": str((root / "mmlu" / "test.jsonl").resolve())}
    assert "fewshot_split" not in mmlu  # no dev file
    bbh = yaml.safe_load((tmp_path / "yamls" / "bbh_local_boolean_expressions.yaml").read_text())
    assert bbh["dataset_kwargs"]["field"] == "examples"


def test_lm_eval_multiple_choice_and_generation_from_local_files(small_world, model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    root = write_local_data(small_world, tmp_path / "data")
    suite = DownstreamSuite(["mmlu", "gsm8k", "toyworld_mc"], limit=4, world_mc_dir=small_world.mc_dir, data_dir=root,
                            max_gen_toks=8, work_dir=tmp_path / "work")
    assert [t.source for t in suite.tasks] == ["local", "local", "world"]
    scores = suite.evaluate(model, tokenizer, state="base")
    assert scores["mmlu"].metric == "acc,none" and scores["mmlu"].n == 4
    # lm-eval's accuracy equals ours from the log-likelihood of each letter after the rendered question.
    assert scores["mmlu"].score == pytest.approx(_mmlu_accuracy(model, tokenizer, root / "mmlu" / "test.jsonl"))
    assert scores["gsm8k"].metric == "exact_match,strict-match" and scores["gsm8k"].n == 3
    assert "exact_match,flexible-extract" in scores["gsm8k"].metrics
    assert scores["toyworld_mc"].score >= 0.75  # the world's model knows its facts
    assert all(s.seconds > 0 and not s.cached for s in scores.values())
