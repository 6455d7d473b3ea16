"""Scope-gate separation statistics (lightning_edit.metrics.gates): AUROC and a proposed tau."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_edit.data import read_edits

from tests.helpers import make_microedit


@pytest.fixture(scope="module")
def records(small_world):
    return read_edits(small_world.counterfact_path)[:6]


def test_diagnostics_auroc_and_proposed_tau(small_world, small_sae, records, tmp_path):
    from lightning_edit.jobs.calibrate import save_report
    from lightning_edit.metrics.gates import propose_tau, scope_report

    editor = make_microedit(small_world, small_sae)
    for record in records[:3]:
        editor.apply([record])
    corpus = small_world.corpus_path.read_text().splitlines()
    report = scope_report(editor, records[:3], corpus, n_reference=64)
    for gate, summary in report["summary"].items():
        assert 0.0 <= summary["auroc_in_vs_out"] <= 1.0, gate
        assert math.isfinite(summary["proposed_tau"]), gate
    save_report(report, tmp_path / "diag")
    assert (tmp_path / "diag" / "ard_diagnostics.png").stat().st_size > 0
    tau = propose_tau(None, report["values"]["ard"]["before"]["reference"], admits_high=False)
    assert math.isfinite(tau)
    # A gate that separates perfectly gets a tau between the groups.
    assert propose_tau(torch.tensor([0.5, 0.6]), torch.tensor([0.1, 0.2]), admits_high=True) == 0.5
