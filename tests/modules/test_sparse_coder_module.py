"""SparseCoderModule (modules/sparse_coder_module.py): training positions, one forward for every hookpoint."""

from __future__ import annotations

import torch

from modules.sparse_coder_module import SparseCoderModule, training_positions


def test_training_positions_drop_bos_and_padding():
    ids = torch.tensor([[1, 5, 6, 7, 0, 0], [1, 8, 9, 1, 4, 2]])
    attention = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    mask = training_positions(ids, attention, bos_token_id=1)
    assert mask.tolist() == [
        [False, True, True, True, False, False],
        [False, True, True, False, True, True],
    ]
    assert training_positions(ids, None, bos_token_id=None).all()


def test_one_forward_feeds_every_hookpoint(small_world):
    model = small_world.load_model()
    tokenizer = small_world.load_tokenizer()
    module = SparseCoderModule(model, ["layers.*"], coder={"expansion_factor": 2, "k": 4},
                               bos_token_id=tokenizer.bos_token_id)
    assert module.hookpoints == ["layers.0", "layers.1"]
    calls = []
    handle = model.register_forward_pre_hook(lambda *a, **k: calls.append(1))
    batch = tokenizer(["alpha beta", "gamma"], return_tensors="pt", padding=True)
    acts, n = module.collect_activations(dict(batch))
    handle.remove()
    assert len(calls) == 1 and set(acts) == {"layers.0", "layers.1"}
    assert n == int(batch["attention_mask"].sum()) - 2  # BOS of each row dropped
    assert all(x.shape == (n, 64) for x, _ in acts.values())
    # The LM is not part of the module: not in its state dict, not among its parameters.
    assert all(k.startswith(("coders.", "trackers.", "initialized", "tokens_seen", "train_micro"))
               for k in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == sum(
        p.numel() for p in module.coders.parameters())
