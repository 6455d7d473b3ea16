"""Scope-gate separation statistics (lightning_edit.metrics.gates): AUROC and a proposed tau."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_edit.data import read_edits

from lightning_edit.metrics.gates import ADMITS_HIGH

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
        after = report["values"][gate]["after"]
        sign = 1.0 if ADMITS_HIGH[gate] else -1.0
        s_in = torch.cat([after["edit"], after["rephrase"]]).double() * sign
        s_out = torch.cat([after["locality"], after["reference"]]).double() * sign
        # AUROC = P(in-scope more admissible than out-of-scope), ties count half: by hand over all pairs.
        pairs = (s_in[:, None] > s_out[None, :]).double() + 0.5 * (s_in[:, None] == s_out[None, :]).double()
        assert summary["auroc_in_vs_out"] == pytest.approx(float(pairs.mean())), gate
        # The proposed tau maximises TPR - FPR over every observed value (Youden's J).
        def youden(t):
            return float((s_in >= t).double().mean() - (s_out >= t).double().mean())
        best = max(youden(t) for t in torch.cat([s_in, s_out]).tolist())
        assert youden(sign * summary["proposed_tau"]) == pytest.approx(best), gate
        shares = summary["admitted_at_proposed_tau"]
        assert shares["edit"] == float((after["edit"].double() * sign >= sign * summary["proposed_tau"]).double().mean())
    # The shipped gate (overlap) separates edited from unrelated text after three edits: measured AUROC
    # 0.993 in vs out and 1.0 edit prompts vs locality prompts; its proposed tau admits every edit prompt
    # and no reference line (ARD measured 0.13 and delta 0.90 here: not asserted, they are not the default).
    overlap = report["summary"]["overlap"]
    assert overlap["auroc_in_vs_out"] >= 0.95 and overlap["auroc_edit_vs_locality"] >= 0.95
    assert overlap["admitted_at_proposed_tau"]["edit"] == 1.0
    assert overlap["admitted_at_proposed_tau"]["reference"] <= 0.05
    save_report(report, tmp_path / "diag")
    assert (tmp_path / "diag" / "ard_diagnostics.png").stat().st_size > 0
    tau = propose_tau(None, report["values"]["ard"]["before"]["reference"], admits_high=False)
    assert math.isfinite(tau)
    # A gate that separates perfectly gets a tau between the groups.
    assert propose_tau(torch.tensor([0.5, 0.6]), torch.tensor([0.1, 0.2]), admits_high=True) == 0.5
