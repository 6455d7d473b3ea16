"""MicroEdit's scope gates (lightning_edit.editors.gates)."""

from __future__ import annotations

import pytest
import torch

from lightning_edit.editors.gates import max_jaccard


def test_max_jaccard():
    idx = torch.tensor([[[0, 1, 2], [3, 4, 5]]])
    active = torch.ones_like(idx, dtype=torch.bool)
    masks = torch.zeros(2, 8, dtype=torch.bool)
    masks[0, [0, 1, 2]] = True
    masks[1, [5, 6]] = True
    assert max_jaccard(idx, active, masks).tolist() == [[1.0, pytest.approx(0.25)]]
