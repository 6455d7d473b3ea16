"""AlphaEdit: the update is orthogonal to the preserved keys; a stream keeps earlier edits."""

from __future__ import annotations

import json

import torch

from lightning_edit.config import load_config
from lightning_edit.jobs import edit as edit_job
from lightning_edit.jobs.edit_run import load_edited
from lightning_edit.locate import second_moment

from tests.editors.closed_form import SMALL, exact, prepared




def test_alphaedit_update_is_orthogonal_to_the_preserved_keys(small_world, small_corpus, stream_records):
    editor, model, tok = prepared("alphaedit", small_world, small_corpus)
    adapter = editor.adapter
    before = {layer: adapter.down_proj_weight(layer).detach().double().clone() for layer in editor.layers}
    editor.apply([stream_records[0]])
    assert exact(model, tok, [stream_records[0]]) == [True]
    for layer in editor.layers:
        c = second_moment(model, tok, adapter, layer, small_corpus, editor.cfg.mom2_n_samples).double()
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


def test_alphaedit_stream_keeps_earlier_edits(small_world, stream_records, tmp_path):
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
    assert [e.case_id for e in editor.ledger] == [r.case_id for r in stream_records]
    with editor.edited() as m:
        assert exact(m, tok, stream_records[:1]) == [True]   # the earliest edit survived the later ones
    for layer in editor.layers:
        cache = editor.key_cache[layer]
        assert torch.allclose(cache, cache.T) and cache.trace() > 0
        assert int(torch.linalg.matrix_rank(cache)) == len(stream_records)   # one key per edit, all ten kept
