"""EditStream (datamodules/edits.py): seeded order, limit, batches."""

from __future__ import annotations

from datamodules.edits import EditStream
from lightning_edit.data import read_edits


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
