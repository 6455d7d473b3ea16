"""Every YAML in configs/ composes against its schema without loading a model, so a typo in any of
them (a key, a value of the wrong type, an editor option) fails here rather than in a run.

- job configs (`sae.yaml`, `transcoder.yaml`, `generate.yaml`, `calibrate.yaml`, and every file with an
  `editor.method`, i.e. an edit config) go through the job's config loader and schema, as the CLI
  loads them; an edit config's `editor:` section also through its method's config dataclass;
- `downstream/*.yaml` are lm-eval task templates: their keys must be lm-eval `TaskConfig` fields and
  each must be a template `lightning_edit.downstream` renders.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_edit.config import ConfigError, load_config
from lightning_edit.editors import editor_class
from lightning_edit.jobs import job_module

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
JOB_FILES = {"sae.yaml": "sae", "transcoder.yaml": "transcoder", "generate.yaml": "generate",
             "calibrate.yaml": "calibrate"}


def job_of(path: Path) -> str | None:
    """The job whose schema `path` is written against; None for an lm-eval task template."""
    if path.parent.name == "downstream":
        return None
    if path.name in JOB_FILES:
        return JOB_FILES[path.name]
    if OmegaConf.select(OmegaConf.load(path), "editor.method") is not None:
        return "edit"
    raise AssertionError(f"{path.relative_to(CONFIGS.parent)}: no job claims this config (add it to JOB_FILES)")


def compose(path: Path) -> None:
    """Load `path` as the CLI does for its job (a ConfigError / ValueError on any bad key or value)."""
    job = job_of(path)
    module = job_module(job)
    cfg = load_config(module.SCHEMA, [f"config={path}"])
    if job == "edit":
        params = OmegaConf.to_container(cfg.editor, resolve=True)
        editor_class(params["method"]).make_config(params)


JOB_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "downstream")
TASK_TEMPLATES = sorted((CONFIGS / "downstream").glob("*.yaml"))


def test_every_config_is_checked():
    assert len(JOB_CONFIGS) + len(TASK_TEMPLATES) == len(list(CONFIGS.rglob("*.yaml"))) >= 15
    assert {job_of(p) for p in JOB_CONFIGS} == {"edit", "sae", "transcoder", "generate", "calibrate"}


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_job_config_composes_against_its_schema(path):
    compose(path)


@pytest.mark.parametrize("path", TASK_TEMPLATES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_downstream_template_is_an_lm_eval_task(path):
    from lm_eval.api.task import TaskConfig

    from lightning_edit.downstream.lm_eval_tasks import LOCAL_TEMPLATES

    template = OmegaConf.to_container(OmegaConf.load(path))
    fields = {f.name for f in dataclasses.fields(TaskConfig)}
    assert set(template) <= fields, f"not lm-eval TaskConfig keys: {sorted(set(template) - fields)}"
    assert path.stem in LOCAL_TEMPLATES.values() and template["task"].startswith(path.stem.split("_local")[0])


@pytest.mark.parametrize("typo, message", [
    ("editor:\n  method: tcpe\n  v_lrr: 0.5\n", "editor.v_lrr"),  # an editor option
    ("editor:\n  method: tcpe\ndata:\n  limt: 3\n", "data.limt"),  # a job key
    ("editor:\n  method: microedit\n  gate: sometimes\n", "editor.gate"),  # a value the method refuses
    ("editor:\n  method: pnke\n  layer: one\n", "editor.layer"),  # a value of the wrong type
])
def test_a_typo_in_a_config_fails(tmp_path, typo, message):
    path = tmp_path / "typo.yaml"
    path.write_text(typo)
    with pytest.raises((ConfigError, ValueError), match=message.replace(".", r"\.")):
        compose(path)


# The layers every shipped config resolves to: on the default world's depth (4) exactly the ones
# measured and commented in the configs, and on toyworld-gpt2's (6, GPT-2 names).
SHIPPED_LAYERS = {
    "sae.yaml": ("hookpoints", ["layers.2"], ["h.4"]),
    "transcoder.yaml": ("hookpoints", ["layers.0.mlp"], ["h.0.mlp"]),
    "microedit.yaml": ("component.hookpoint", "layers.2", "h.4"),
    "tcpe.yaml": ("component.hookpoint", "layers.1.mlp", "h.1.mlp"),
    "pnke.yaml": ("editor.layer", 1, 1),
    "baselines/rome.yaml": ("editor.layer", 0, 0),
    "baselines/memit.yaml": ("editor.layers", [0, 1, 2], [0, 1, 2, 3]),
    "baselines/alphaedit.yaml": ("editor.layers", [0, 1, 2], [0, 1, 2, 3]),
    "baselines/wise.yaml": ("editor.layer", 1, 1),
    "baselines/grace.yaml": ("editor.layer", 3, 5),
    "baselines/ft.yaml": ("editor.layer", 3, 5),
}


def _adapter(arch: str, n_layers: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from lightning_edit.models import ModelAdapter

    torch.manual_seed(0)
    if arch == "llama":
        return ModelAdapter(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=n_layers, num_attention_heads=2)))
    return ModelAdapter(GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_inner=32, n_layer=n_layers,
                                                   n_head=2, n_positions=16)))


@pytest.mark.parametrize("name", sorted(SHIPPED_LAYERS))
def test_shipped_layers_resolve_by_depth(name):
    key, on_four, on_six = SHIPPED_LAYERS[name]
    value = OmegaConf.to_container(OmegaConf.load(CONFIGS / name), resolve=True)
    for part in key.split("."):
        value = value[part]
    for adapter, expected in ((_adapter("llama", 4), on_four), (_adapter("gpt2", 6), on_six)):
        if key == "hookpoints":
            got = adapter.resolve_hookpoints(value)
        elif key.endswith("hookpoint"):
            got = adapter.resolve_hookpoint(value)
        elif key.endswith("layers"):
            got = sorted(set(adapter.resolve_layers(value)))  # MEMIT and AlphaEdit edit each layer once
        else:
            got = adapter.resolve_layer(value)
        assert got == expected, f"{name} {key}={value!r} on {adapter.num_layers} layers"
    if name == "pnke.yaml":  # its transcoder must sit at the edited layer's MLP
        adapter = _adapter("llama", 4)
        hookpoint = OmegaConf.load(CONFIGS / name).component.hookpoint
        assert adapter.resolve_hookpoint(hookpoint) == adapter.mlp_name(adapter.resolve_layer(value))
