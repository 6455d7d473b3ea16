"""MEMIT: a batch of edits at once."""

from __future__ import annotations



from tests.editors.closed_form import exact, prepared




def test_memit_edits_a_batch_at_once(small_world, small_corpus, stream_records):
    editor, model, tok = prepared("memit", small_world, small_corpus)
    batch = stream_records[1:4]
    assert not any(exact(model, tok, batch))
    entries = editor.apply(batch)
    assert [e.edit_id for e in entries] == [0, 1, 2]
    assert all(e.extra["batch_size"] == 3 for e in entries)
    assert all(exact(model, tok, batch))
