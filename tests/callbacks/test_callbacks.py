"""The dashboard callbacks in an edit stream: downstream / locality at T = 0 and each checkpoint, the
examples table and the plots, to CSV and to an offline W&B run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lightning_edit.callbacks import CallbacksConfig, build_callbacks
from lightning_edit.editors.base import EditorContext
from lightning_edit.models import load_model

from tests.helpers import InvertingEditor


def test_callbacks_config_is_an_override_section():
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(CallbacksConfig),
                          OmegaConf.from_dotlist(["downstream.enabled=true", "downstream.limits={toyworld_mc: 5}"]))
    assert cfg.downstream.enabled and cfg.downstream.limits == {"toyworld_mc": 5}
    assert cfg.downstream.tasks == ["toyworld_mc"] and cfg.downstream.allow_code_execution is False
    with pytest.raises(Exception):
        OmegaConf.merge(OmegaConf.structured(CallbacksConfig), OmegaConf.from_dotlist(["downstream.enabeld=true"]))


def test_edit_stream_logs_downstream_locality_table_and_plots(small_world, tmp_path, monkeypatch):
    from lightning import Trainer
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from datamodules.edits import EditStream
    from lightning_edit.metrics import EditScorer
    from modules.edit_module import EditModule

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    model, tokenizer = load_model(str(small_world.model_dir))
    editor = InvertingEditor(EditorContext(model, tokenizer, adapter=None))
    cfg = {"downstream": {"enabled": True, "limit": 12}, "locality": {"n_prompts": 16},
           "examples": {"n_edits": 2, "n_locality": 2, "max_new_tokens": 3}}
    callbacks = build_callbacks(cfg, checkpoints=[1, 3], world=small_world, output_dir=tmp_path)
    assert [type(c).__name__ for c in callbacks] == ["EditProgressBar", "LocalityEval", "DownstreamEval",
                                                     "ExamplesTable", "DashboardPlots"]
    csv_logger = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    wandb_logger = WandbLogger(project="lightning-edit-test", save_dir=str(tmp_path), offline=True,
                               settings={"console": "off"})
    trainer = Trainer(max_epochs=1, logger=[csv_logger, wandb_logger], callbacks=callbacks, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=str(tmp_path))
    stream = EditStream(small_world.counterfact_path, limit=3)
    module = EditModule(editor, EditScorer(tokenizer), checkpoints=[1, 3], immediate=False)
    trainer.fit(module, datamodule=stream)
    run_dir = Path(wandb_logger.experiment.dir).parent
    wandb_logger.experiment.finish()

    with (tmp_path / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))

    def at(name: str) -> dict[int, float]:
        return {int(r["step"]): float(r[name]) for r in rows if r.get(name)}

    downstream, delta = at("downstream/toyworld_mc"), at("downstream/toyworld_mc_delta")
    assert sorted(downstream) == [0, 1, 3]
    assert downstream[0] >= 0.75 and downstream[1] < downstream[0] - 0.5  # the hook-held edit is seen
    assert delta[0] == 0.0 and delta[1] == pytest.approx(downstream[1] - downstream[0])
    assert at("downstream/toyworld_mc_seconds")[0] > 0
    agreement, kl = at("locality/agreement"), at("locality/kl")
    assert agreement[0] == 1.0 and kl[0] == 0.0
    assert agreement[3] < 1.0 and kl[3] > 0.0
    assert sorted(at("edit/rel")) == [1, 3]

    folder = tmp_path / "csv"
    for name in ("edit_metrics.png", "locality.png", "downstream.png", "examples.csv", "examples.md"):
        assert (folder / name).stat().st_size > 0, name
    with (folder / "examples.csv").open() as f:
        examples = list(csv.DictReader(f))
    assert {e["kind"] for e in examples} >= {"edit", "locality"}
    assert any(e["changed"] == "True" for e in examples)
    assert json.loads((tmp_path / "downstream_cache.json").read_text())  # scores kept per state

    # The offline W&B run holds the table and the plots as media files.
    media = [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()]
    assert any("media/table/examples" in m for m in media), media
    assert any("media/images/plots/downstream" in m for m in media), media
    assert (run_dir / [m for m in media if m.endswith(".wandb")][0]).stat().st_size > 0
