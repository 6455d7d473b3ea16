"""The lifelong edit engine end to end on the test-size world, with FT-M as the editor.

EditStream (seeded order, limit, batches, bad data stops the run), EditModule + `run edit` (results
files under both protocols), kill-and-resume equals an uninterrupted run, and the saved edit state
reloads onto a fresh model with the same predictions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datamodules.edits import EditStream
from lightning_edit.config import load_config
from lightning_edit.data import EditDataError, read_edits
from lightning_edit.editors.ft import FineTune, FTConfig
from lightning_edit.editors.state import save_edit_state
from lightning_edit.jobs.edit_run import load_edited, new_editor
from lightning_edit.jobs import edit as edit_job
from lightning_edit.metrics import EditScorer, teacher_forced
from lightning_edit.models import ModelAdapter, load_model
from lightning_edit.world import resolve_model_path


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on shared cores: more threads only slow them down (FINDINGS.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def edit_cfg(world, output_dir: Path, *overrides: str):
    """The FT-M baseline config on the small world (its CounterFact export by default), CSV
    logging, quiet trainer."""
    assert resolve_model_path("toyworld-small") == world.model_dir  # the name means the fixture's world
    return load_config(edit_job.SCHEMA, [
        "config=baselines/ft.yaml",
        "model.name=toyworld-small",
        f"output_dir={output_dir}",
        "logger=csv",
        "threads=1",
        "trainer.enable_progress_bar=false",
        *overrides,
    ])


def ledger_ids(output_dir: Path) -> list[int]:
    return [e["edit_id"] for e in json.loads((output_dir / "edit_state" / "ledger.json").read_text())]


@pytest.fixture(scope="module")
def short_run(small_world, tmp_path_factory):
    """T=5 with checkpoints at 1 and 5."""
    out = tmp_path_factory.mktemp("edit-run")
    cfg = edit_cfg(small_world, out, "data.limit=5", "eval.checkpoints=[1,5]")
    assert edit_job.run(cfg) == 0
    return out


def test_stream_is_seeded_limited_and_batched(small_world):
    path = small_world.counterfact_path
    full = read_edits(path)

    def stream(**kwargs) -> EditStream:
        s = EditStream(path, **kwargs)
        s.setup("fit")
        return s

    a, b = stream(order_seed=3, limit=7), stream(order_seed=3, limit=7)
    assert [r.case_id for r in a.records] == [r.case_id for r in b.records]
    assert a.num_edits == 7
    other = stream(order_seed=4, limit=7)
    assert [r.case_id for r in other.records] != [r.case_id for r in a.records]
    longer = stream(order_seed=3, limit=12)  # a larger T extends the same order
    assert [r.case_id for r in longer.records[:7]] == [r.case_id for r in a.records]
    assert sorted(r.case_id for r in stream(order_seed=3, limit=None).records) == [r.case_id for r in full]

    batched = stream(order_seed=3, limit=7, batch_size=3)
    batches = list(batched.train_dataloader())
    assert [len(x) for x in batches] == [3, 3, 1]
    assert [r.case_id for x in batches for r in x] == [r.case_id for r in a.records]
    assert all(isinstance(x, list) for x in batches)

    # Resuming the loader after two batches yields exactly the rest, in order.
    loader = batched.train_dataloader()
    loader.load_state_dict({"batches_done": 2})
    assert [[r.case_id for r in x] for x in loader] == [[r.case_id for r in batches[2]]]
    assert len(loader) == 3  # Lightning counts on from the restored progress


def test_malformed_record_stops_before_any_edit(small_world, tmp_path, monkeypatch):
    records = json.loads(small_world.counterfact_path.read_text())[:4]
    del records[2]["requested_rewrite"]["target_new"]
    bad = tmp_path / "bad_counterfact.json"
    bad.write_text(json.dumps(records))
    calls = []
    monkeypatch.setattr(FineTune, "apply", lambda self, batch: calls.append(batch))
    monkeypatch.setattr("lightning_edit.models.load_model", lambda *a, **k: calls.append("load_model"))
    cfg = edit_cfg(small_world, tmp_path / "out", f"data.path={bad}")
    with pytest.raises(EditDataError) as info:
        edit_job.run(cfg)
    message = str(info.value)
    assert str(bad) in message and "record 2" in message and "target_new" in message
    assert calls == []
    assert not (tmp_path / "out" / "edit_state").exists()


def test_short_run_writes_results_under_both_protocols(short_run):
    for name in ("results.json", "results.csv", "results.md", "results.png", "config.yaml"):
        assert (short_run / name).is_file(), name
    rows = json.loads((short_run / "results.json").read_text())["rows"]
    assert [row["T"] for row in rows] == [1, 5]
    for row in rows:
        assert set(row["final-state"]) >= {"rel", "gen", "loc", "rel_em", "gen_em"}
        assert set(row["immediate"]) >= {"rel", "gen", "loc"}
    assert rows[0]["final-state"]["rel"] == 1.0  # FT-M flips its first edit
    table = (short_run / "results.md").read_text()
    assert "Rel (final-state)" in table and "Rel (immediate)" in table
    header = (short_run / "results.csv").read_text().splitlines()[0]
    assert "final-state/rel" in header and "immediate/rel" in header
    logged = (short_run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "edit/rel" in logged and "edit_immediate/rel" in logged
    assert ledger_ids(short_run) == [0, 1, 2, 3, 4]


def test_kill_and_resume_equals_uninterrupted(small_world, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("data.limit=6", "eval.checkpoints=[1,6]", "checkpoint.every_n_edits=1")
    assert edit_job.run(edit_cfg(small_world, straight, *common)) == 0
    # "Killed" after 3 edits: the last checkpoint holds the state after edit 3.
    assert edit_job.run(edit_cfg(small_world, resumed, *common, "trainer.max_steps=3")) == 0
    assert ledger_ids(resumed) == [0, 1, 2]
    assert edit_job.run(edit_cfg(small_world, resumed, *common, "checkpoint.resume=last")) == 0

    assert ledger_ids(resumed) == [0, 1, 2, 3, 4, 5]
    assert (resumed / "csv" / "metrics.csv").is_file()  # the first part's log is kept
    assert list((resumed / "csv").glob("resumed-*/metrics.csv"))
    a = load_file(str(straight / "edit_state" / "tensors.safetensors"))
    b = load_file(str(resumed / "edit_state" / "tensors.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ledger_a = json.loads((straight / "edit_state" / "ledger.json").read_text())
    ledger_b = json.loads((resumed / "edit_state" / "ledger.json").read_text())
    assert [(e["case_id"], e["steps"], e["delta_norm"]) for e in ledger_a] == \
           [(e["case_id"], e["steps"], e["delta_norm"]) for e in ledger_b]
    final = lambda out: json.loads((out / "results.json").read_text())["rows"][-1]  # noqa: E731
    assert final(straight)["T"] == final(resumed)["T"] == 6
    assert final(straight)["final-state"] == final(resumed)["final-state"]


def test_saved_edit_state_reloads_onto_a_fresh_model(short_run, small_world):
    editor, model, tokenizer = load_edited(short_run / "edit_state")  # base model named in the state
    assert [e.edit_id for e in editor.ledger] == [0, 1, 2, 3, 4]
    stream = EditStream(small_world.counterfact_path, limit=5)
    stream.setup("fit")
    base, _ = load_model(str(small_world.model_dir))
    scorer = EditScorer(tokenizer, base, stream.records)
    with editor.edited() as m:
        scores = scorer.score(m, stream.records)
    expected = json.loads((short_run / "results.json").read_text())["rows"][-1]["final-state"]
    assert scores == expected
    # The edits are really there: the base model does not give the targets.
    assert scorer.score(base, stream.records)["rel"] < scores["rel"]


def test_single_ft_edit_makes_target_argmax_and_round_trips(small_world, tmp_path):
    model, tokenizer = load_model(str(small_world.model_dir))
    stream = EditStream(small_world.counterfact_path, limit=1)
    stream.setup("fit")
    record = stream.records[0]
    before = teacher_forced(model, tokenizer, [record.prompt], [record.target_new])[0]
    assert not before.exact
    editor = new_editor("ft", {}, model, tokenizer, ModelAdapter(model), model_name=str(small_world.model_dir))
    assert isinstance(editor, FineTune) and editor.cfg == FTConfig()  # FT-M's (EasyEdit) defaults
    (entry,) = editor.apply([record])
    after = teacher_forced(model, tokenizer, [record.prompt], [record.target_new])[0]
    assert after.exact and entry.metrics_after["target_argmax"] == 1.0 and entry.steps > 0
    assert entry.changed and entry.delta_norm > 0

    save_edit_state(editor, tmp_path / "state")
    reloaded, fresh, _ = load_edited(tmp_path / "state")
    ids = tokenizer([record.prompt + " " + record.target_new], return_tensors="pt")["input_ids"]
    with torch.no_grad(), editor.edited() as m1, reloaded.edited() as m2:
        assert torch.equal(m1(input_ids=ids).logits, m2(input_ids=ids).logits)
    assert fresh is not model
    # Edits made on another base model (e.g. a rebuilt world) are refused.
    settings = json.loads((tmp_path / "state" / "editor.json").read_text())
    (tmp_path / "state" / "editor.json").write_text(json.dumps({**settings, "base_fingerprint": "0" * 16}))
    with pytest.raises(ValueError, match="different base model"):
        load_edited(tmp_path / "state")
    # Asking the reloaded edited model: its greedy continuation is the new target.
    (text,) = reloaded.generate([record.prompt], max_new_tokens=1)
    assert text.strip() == record.target_new
