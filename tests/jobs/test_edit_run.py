"""An edit run's parts, built once (lightning_edit.jobs.edit_run): what `run edit`, `calibrate` and the
bench scripts share."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_edit.config import load_config
from lightning_edit.editors.state import base_fingerprint
from lightning_edit.errors import UserError
from lightning_edit.jobs import edit as edit_job
from lightning_edit.jobs.edit_run import build_edit_run, check_edit_config, read_corpus
from lightning_edit.world import world_for


def ft_config(*overrides: str):
    return load_config(edit_job.SCHEMA, ["config=baselines/ft.yaml", "model.name=toyworld-small", "data.limit=4",
                                         *overrides])


def test_build_edit_run_gives_the_stream_model_corpus_and_a_prepared_editor(small_world, small_corpus):
    run = build_edit_run(ft_config())
    assert run.method == "ft" and len(run.stream.records) == 4 and run.stream.path == small_world.counterfact_path
    assert run.world.root == small_world.root and run.corpus == small_corpus
    assert run.editor.model is run.model and run.editor.ledger == []
    assert run.editor.ctx.model_name == "toyworld-small"
    assert run.editor.ctx.base_fingerprint == base_fingerprint(run.model)
    # Another editor over a fresh copy edits that copy only.
    before = copy.deepcopy(run.model.state_dict())
    fresh = run.new_editor(copy.deepcopy(run.model))
    fresh.apply([run.stream.records[0]])
    assert len(fresh.ledger) == 1 and run.editor.ledger == []
    assert all(torch.equal(t, before[k]) for k, t in run.model.state_dict().items())


def test_the_editor_is_never_prepared_on_a_prompt_locality_scores(small_world, small_corpus, tmp_path):
    """The locality callback scores corpus lines that mention no subject of the stream; the editor's
    corpus (statistics, preserve samples) holds none of them, and nothing else is taken away."""
    from lightning_edit.callbacks import build_callbacks
    from lightning_edit.callbacks.locality import LocalityEval

    class Trainer:  # what `LocalityEval.setup` reads: the stream's records
        datamodule = None

    run = build_edit_run(ft_config("data.limit=10"))
    loc = next(c for c in build_callbacks(run.cfg.callbacks, checkpoints=[10], world=run.world, corpus=run.corpus)
               if isinstance(c, LocalityEval))
    scored = loc.held_out(run.stream.records)
    assert loc.source == "corpus" and len(scored) == run.cfg.callbacks.locality.n_prompts
    kept = set(run.editor_corpus)
    assert not any(p in line for p in scored for line in kept)
    assert len(run.corpus) - len(run.editor_corpus) == sum(any(p in line for p in scored) for line in run.corpus)
    # A prompts file: its prompts, and only the lines holding them, leave the editor's corpus.
    (tmp_path / "loc.txt").write_text(f"{small_corpus[0]}\n{small_corpus[5]}\n")
    run = build_edit_run(ft_config("data.limit=2", f"callbacks.locality.prompts_path={tmp_path / 'loc.txt'}"))
    assert run.editor_corpus == [line for line in small_corpus if small_corpus[0] not in line
                                 and small_corpus[5] not in line]
    assert len(run.editor_corpus) < len(small_corpus)


def test_the_config_is_checked_before_anything_is_loaded():
    with pytest.raises(UserError, match="unknown editing method 'nope'"):  # one line, exit 2 at the CLI
        check_edit_config(ft_config("editor.method=nope"))
    with pytest.raises(ValueError, match=r"editor\.lrr"):
        check_edit_config(ft_config("editor.lrr=1"))
    with pytest.raises(ValueError, match="editor 'rome' edits one record at a time; data.batch_size must be 1"):
        check_edit_config(load_config(edit_job.SCHEMA, ["config=baselines/rome.yaml", "data.batch_size=2"]))
    assert check_edit_config(ft_config("data.batch_size=2")).name == "ft"  # FT-M edits batches


def test_the_world_and_corpus_come_from_the_model_name(small_world, small_corpus, tmp_path):
    assert world_for("toyworld-small").root == small_world.root
    assert world_for(str(small_world.model_dir)).root == small_world.root  # model.name=<world>/model
    assert world_for("meta-llama/Meta-Llama-3-8B") is None and world_for(None) is None
    assert read_corpus(None, small_world) == small_corpus and read_corpus(None, None) is None
    (tmp_path / "c.txt").write_text("one\n\n two \n")
    assert read_corpus(tmp_path / "c.txt", small_world) == ["one", " two "]  # data.corpus wins; blank lines go


def test_depth_relative_layers_and_hookpoints_are_recorded_resolved(small_world, small_transcoder):
    """`editor.layer=100%` and `component.hookpoint=layers.0%.mlp` resolve against the model's depth
    (the small world has 2 layers); the editor, its config and its saved settings hold the absolute
    values, and a layer the model does not have is an error naming the key."""
    from lightning_edit.editors.state import _settings
    from lightning_edit.jobs.edit_run import new_editor
    from lightning_edit.models import ModelAdapter, load_model

    model, tokenizer = load_model(str(small_world.model_dir))
    adapter = ModelAdapter(model)
    ft = new_editor("ft", {"layer": "100%"}, model, tokenizer, adapter, model_name="toyworld-small")
    assert ft.layer == 1 and ft.cfg.layer == 1 and _settings(ft)["config"]["layer"] == 1
    tcpe = new_editor("tcpe", {}, model, tokenizer, adapter,
                      {"path": str(small_transcoder[0]), "hookpoint": "layers.0%.mlp"}, "toyworld-small")
    assert tcpe.hookpoint == tcpe.component.hookpoint == "layers.0.mlp" and tcpe.layer == 0
    assert _settings(tcpe)["component"]["hookpoint"] == "layers.0.mlp"
    with pytest.raises(ValueError, match=r"editor\.layer is -3; the model has 2 layers"):
        new_editor("ft", {"layer": -3}, model, tokenizer, adapter, model_name="toyworld-small")
    with pytest.raises(ValueError, match=r"editor\.layers\[1\] is '150%'"):
        new_editor("memit", {"layers": [0, "150%"]}, model, tokenizer, adapter, model_name="toyworld-small")
