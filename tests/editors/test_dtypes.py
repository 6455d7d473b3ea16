"""Every registered editor runs a short stream on a bfloat16 model (issue 14 §2): its YAML, two edits on
the small world, on CPU. The edits must be finite and move the targets' NLL down, the model's weights
must stay bfloat16 and the edited model's logits finite."""

from __future__ import annotations

import pytest
import torch

from lightning_edit.editors import EDITORS
from lightning_edit.models import load_model

from tests.helpers import SHORT_STREAM, short_stream


def test_every_method_has_a_short_stream():
    assert sorted(SHORT_STREAM) == sorted(EDITORS)


@pytest.mark.parametrize("method", sorted(EDITORS))
def test_bf16_stream(method, small_world, small_sae, small_transcoder, small_corpus, stream_records, stats_dir):
    model, tokenizer = load_model(str(small_world.model_dir), dtype="bfloat16")
    _, before, after = short_stream(method, model, tokenizer, stream_records[:2], small_corpus[:200], small_sae,
                                    small_transcoder, stats_dir)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters()), method
    assert after < before - 0.1, (method, before, after)
