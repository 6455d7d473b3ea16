"""Stream retention of the five seed methods (issue 12 section 5): after 10 edits of the test world's
stream, the edits that landed still hold at the level each method reaches now, so a regression shows.
Each threshold sits a little below the share measured on this world and says what was measured."""

from __future__ import annotations

import pytest

from lightning_edit.metrics import teacher_forced

from tests.helpers import small_world_editor

N_EDITS = 10

RETAINED = {
    # method: (least edits landed of 10, least share of the landed ones still holding after all 10)
    "microedit": (9, 0.7),  # measured 10 landed, 8 of them hold (0.8)
    "tcpe": (9, 0.9),  # measured 10 landed, 10 hold (1.0)
    "pnke": (9, 0.9),  # measured 10 landed, 10 hold (1.0)
    "ment": (7, 0.4),  # measured 8 landed (2 skip-actions), 4 of them hold (0.5)
    "fine": (9, 0.7),  # measured 10 landed, 8 hold (0.8)
}
"""Measured 2026-12-02 on toyworld-small, the stream's first 10 edits, each method's YAML with
tests.helpers.SMALL_WORLD_EDITORS over it."""


@pytest.mark.parametrize("method", sorted(RETAINED))
def test_earlier_edits_hold_after_later_ones(method, small_world, small_corpus, stats_dir, small_sae, small_transcoder,
                                             stream_records):
    editor = small_world_editor(method, small_world, small_corpus, stats_dir,
                                {"sae": small_sae, "transcoder": small_transcoder})
    records = list(stream_records[:N_EDITS])
    for record in records:
        editor.mark_landed(editor.apply([record]))
    landed = [r for r, e in zip(records, editor.ledger) if e.landed]
    with editor.edited() as model:
        held = [s.exact for s in teacher_forced(model, editor.tokenizer, [r.prompt for r in landed],
                                                [r.target_new for r in landed])]
    least_landed, least_held = RETAINED[method]
    assert len(landed) >= least_landed
    assert sum(held) / len(landed) >= least_held
