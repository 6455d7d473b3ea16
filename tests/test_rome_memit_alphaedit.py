"""ROME, MEMIT and AlphaEdit on the test-size world: one edit flips its target and its saved edit state
reloads to the same predictions (each method); MEMIT edits a batch at once; AlphaEdit's update lies in
the null space of the preserved keys; AlphaEdit keeps its earlier edits through a stream run by the
edit job (and its key cache travels with the edit state).
"""

from __future__ import annotations

import json

import pytest
import torch

from datamodules.edits import EditStream
from lightning_edit.config import load_config
from lightning_edit.editors.state import save_edit_state
from lightning_edit.jobs.edit_run import load_edited, new_editor
from lightning_edit.jobs import edit as edit_job
from lightning_edit.locate import second_moment
from lightning_edit.metrics import teacher_forced
from lightning_edit.models import ModelAdapter, load_model

# The YAMLs' world settings, scaled to the test world (2 layers, d_ff 256): lambda and l2 keep the
# papers' values per key dimension (15000 * 256 / 16384, 10 * 256 / 14336).
WORLD = {"position": "last", "context_templates": ["{}"]}
SMALL = {
    "rome": {**WORLD, "layer": 1},
    "memit": {**WORLD, "layers": [0, 1], "mom2_update_weight": 234.0, "clamp_norm_factor": 1.5},
    "alphaedit": {**WORLD, "layers": [0, 1], "l2_weight": 0.18, "clamp_norm_factor": 1.5},
}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on shared cores: more threads only slow them down (FINDINGS.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(small_world) -> list[str]:
    return [line for line in small_world.corpus_path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def records(small_world):
    stream = EditStream(small_world.counterfact_path, limit=10, order_seed=0)
    stream.setup("fit")
    return stream.records


def prepared(method: str, world, corpus: list[str]):
    """(editor, model, tokenizer): a fresh copy of the world's model under a prepared editor."""
    model, tok = load_model(str(world.model_dir))
    editor = new_editor(method, SMALL[method], model, tok, ModelAdapter(model), model_name=str(world.model_dir))
    editor.prepare(corpus)
    return editor, model, tok


def exact(model, tok, records) -> list[bool]:
    return [s.exact for s in teacher_forced(model, tok, [r.prompt for r in records], [r.target_new for r in records])]


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_one_edit_flips_its_target_and_the_state_reloads(method, small_world, corpus, records, tmp_path):
    editor, model, tok = prepared(method, small_world, corpus)
    record = records[0]
    assert exact(model, tok, [record]) == [False]
    (entry,) = editor.apply([record])
    assert exact(model, tok, [record]) == [True]
    assert entry.metrics_after["target_argmax"] == 1.0 and entry.delta_norm > 0 and entry.changed
    assert entry.metrics_after["target_nll"] < entry.metrics_before["target_nll"]

    save_edit_state(editor, tmp_path / "state")
    reloaded, fresh, _ = load_edited(tmp_path / "state")
    assert fresh is not model and [e.edit_id for e in reloaded.ledger] == [0]
    prompts = [f"{record.prompt} {record.target_new}", *record.rephrase_prompts]
    ids = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad(), editor.edited() as m1, reloaded.edited() as m2:
        assert torch.equal(m1(**ids).logits, m2(**ids).logits)
    base, _ = load_model(str(small_world.model_dir))
    with torch.no_grad():
        assert not torch.equal(base(**ids).logits, m2(**ids).logits)


def test_memit_edits_a_batch_at_once(small_world, corpus, records):
    editor, model, tok = prepared("memit", small_world, corpus)
    batch = records[1:4]
    assert not any(exact(model, tok, batch))
    entries = editor.apply(batch)
    assert [e.edit_id for e in entries] == [0, 1, 2]
    assert all(e.extra["batch_size"] == 3 for e in entries)
    assert all(exact(model, tok, batch))


def test_alphaedit_update_is_orthogonal_to_the_preserved_keys(small_world, corpus, records):
    editor, model, tok = prepared("alphaedit", small_world, corpus)
    adapter = editor.adapter
    before = {layer: adapter.down_proj_weight(layer).detach().double().clone() for layer in editor.layers}
    editor.apply([records[0]])
    assert exact(model, tok, [records[0]]) == [True]
    for layer in editor.layers:
        c = second_moment(model, tok, adapter, layer, corpus, editor.cfg.mom2_n_samples).double()
        eigenvalues, eigenvectors = torch.linalg.eigh(c)
        preserved = eigenvectors[:, eigenvalues >= editor.cfg.nullspace_threshold]   # spans the corpus keys
        p = editor.projections[layer]
        assert 0 < editor.null_dims[layer] < c.shape[0]
        torch.testing.assert_close(p @ p, p, atol=1e-10, rtol=0)                      # a projector
        assert (p @ preserved).norm() < 1e-8

        # The float64 update: Delta P == Delta, Delta K0 == 0 for K0 in the preserved subspace.
        keys = torch.randn(c.shape[0], 3, dtype=torch.float64)
        residual = torch.randn(adapter.hidden_size, 3, dtype=torch.float64)
        delta = editor.update(layer, keys, residual)
        torch.testing.assert_close(delta @ p, delta, atol=1e-9 * delta.norm().item(), rtol=0)
        assert (delta @ preserved).norm() <= 1e-9 * delta.norm()

        # The applied edit, within float32 rounding of the stored weight.
        applied = adapter.down_proj_weight(layer).detach().double() - before[layer]
        assert applied.norm() > 0
        assert (applied @ preserved).norm() <= 1e-4 * applied.norm()


def test_alphaedit_stream_keeps_earlier_edits(small_world, records, tmp_path):
    """T = 10 through the edit job: the first edit is still right after the nine later ones, and the
    reloaded edit state carries the key cache K_p K_p^T of all ten."""
    params = SMALL["alphaedit"]
    out = tmp_path / "run"
    cfg = load_config(edit_job.SCHEMA, [
        "config=baselines/alphaedit.yaml", "model.name=toyworld-small", f"output_dir={out}", "logger=csv",
        "threads=1", "trainer.enable_progress_bar=false", "data.limit=10", "eval.checkpoints=[1,10]",
        f"editor.layers={params['layers']}", f"editor.l2_weight={params['l2_weight']}",
        f"editor.clamp_norm_factor={params['clamp_norm_factor']}",
    ])
    assert edit_job.run(cfg) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [row["T"] for row in rows] == [1, 10]
    assert rows[-1]["final-state"]["rel"] >= 0.9
    assert (out / "csv" / "metrics.csv").is_file()

    editor, model, tok = load_edited(out / "edit_state")
    assert [e.case_id for e in editor.ledger] == [r.case_id for r in records]
    with editor.edited() as m:
        assert exact(m, tok, records[:1]) == [True]   # the earliest edit survived the later ones
    for layer in editor.layers:
        cache = editor.key_cache[layer]
        assert torch.allclose(cache, cache.T) and cache.trace() > 0
        assert int(torch.linalg.matrix_rank(cache)) == len(records)   # one key per edit, all ten kept
