"""Every registered editor runs a short stream on a bfloat16 model (issue 14 §2): its YAML, two edits on
the small world, on CPU. The edits must be finite and move the targets' NLL down, the model's weights
must stay bfloat16 and the edited model's logits finite."""

from __future__ import annotations

import pytest
import torch

from lightning_edit.editors import EDITORS
from lightning_edit.metrics import teacher_forced
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


def test_alphaedit_keeps_its_statistics_in_float32_when_asked(small_world, small_corpus, stream_records):
    from lightning_edit.jobs.edit_run import new_editor
    from lightning_edit.models import ModelAdapter

    model, tokenizer = load_model(str(small_world.model_dir))
    params = {"layers": [0, 1], "position": "last", "context_templates": ["{}"], "v_steps": 20,
              "stats_dtype": "float32"}
    editor = new_editor("alphaedit", params, model, tokenizer, ModelAdapter(model), {}, "toyworld-small")
    editor.prepare(small_corpus[:200])
    record = stream_records[0]
    before = teacher_forced(model, tokenizer, [record.prompt], [record.target_new])[0].nll
    editor.apply([record])
    stored = [*editor.projections.values(), *editor.key_cache.values()]
    assert stored and all(t.dtype == torch.float32 for t in stored)
    assert any(t.abs().sum() > 0 for t in editor.key_cache.values())  # the edit's keys joined K_p K_p^T
    assert teacher_forced(model, tokenizer, [record.prompt], [record.target_new])[0].nll < before - 0.1
    with pytest.raises(ValueError, match="editor.stats_dtype"):
        new_editor("alphaedit", {**params, "stats_dtype": "float16"}, model, tokenizer, ModelAdapter(model), {},
                   "toyworld-small")
