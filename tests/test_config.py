"""Config merge order, overrides and every kind of config error."""

from dataclasses import dataclass, field

import pytest
from omegaconf import OmegaConf

from lightning_edit.config import ConfigError, RunConfig, find_config_file, load_config, save_config


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    names: list[str] = field(default_factory=lambda: ["a"])


@dataclass
class Job(RunConfig):
    inner: Inner = field(default_factory=Inner)


@pytest.fixture
def configs_dir(tmp_path, monkeypatch):
    root = tmp_path / "configs"
    root.mkdir()
    (root / "job.yaml").write_text("inner:\n  lr: 0.5\n  steps: 20\nmodel:\n  name: from-file\n")
    (root / "sub").mkdir()
    (root / "sub" / "other.yaml").write_text("seed: 7\n")
    monkeypatch.setenv("LIGHTNING_EDIT_CONFIGS", str(root))
    return root


def test_defaults_then_file_then_overrides(configs_dir):
    cfg = load_config(Job, [])
    assert cfg.inner.lr == 1e-3 and cfg.model.name == "toyworld"
    cfg = load_config(Job, ["config=job.yaml"])
    assert cfg.inner.lr == 0.5 and cfg.inner.steps == 20 and cfg.model.name == "from-file"
    cfg = load_config(Job, ["config=job.yaml", "inner.steps=99", "model.name=meta-llama/Meta-Llama-3-8B"])
    assert cfg.inner.lr == 0.5 and cfg.inner.steps == 99 and cfg.model.name == "meta-llama/Meta-Llama-3-8B"
    # An override wins even when it comes before config= on the command line.
    cfg = load_config(Job, ["inner.steps=5", "config=job.yaml"])
    assert cfg.inner.steps == 5


def test_default_config_and_name_without_suffix(configs_dir):
    assert load_config(Job, [], default_config="job.yaml").inner.lr == 0.5
    assert load_config(Job, ["config=job"]).inner.lr == 0.5
    assert load_config(Job, ["config=sub/other.yaml"]).seed == 7
    path = configs_dir / "job.yaml"
    assert find_config_file(str(path)) == path


def test_trainer_section_is_free_form_and_typed_values_convert(configs_dir):
    cfg = load_config(Job, ["trainer.devices=8", "trainer.strategy=ddp", "inner.names=[x,y]", "inner.lr=2"])
    assert OmegaConf.to_container(cfg.trainer) == {"devices": 8, "strategy": "ddp"}
    assert list(cfg.inner.names) == ["x", "y"] and cfg.inner.lr == 2.0


def test_unknown_key_names_key_and_choices(configs_dir):
    with pytest.raises(ConfigError) as err:
        load_config(Job, ["inner.stepz=3"])
    assert "inner.stepz" in str(err.value) and "steps" in str(err.value) and "lr" in str(err.value)
    (configs_dir / "bad.yaml").write_text("modle:\n  name: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(Job, ["config=bad.yaml"])
    assert "bad.yaml" in str(err.value) and "modle" in str(err.value) and "model" in str(err.value)


def test_wrong_type_names_key(configs_dir):
    with pytest.raises(ConfigError) as err:
        load_config(Job, ["inner.steps=many"])
    assert "inner.steps" in str(err.value) and "many" in str(err.value)


def test_missing_file_lists_available(configs_dir):
    with pytest.raises(ConfigError) as err:
        load_config(Job, ["config=nope.yaml"])
    msg = str(err.value)
    assert "nope.yaml" in msg and "job.yaml" in msg and "sub/other.yaml" in msg


def test_bad_yaml_and_bad_argument(configs_dir):
    (configs_dir / "broken.yaml").write_text("inner: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(Job, ["config=broken.yaml"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Job, ["trainer.devices"])


def test_unknown_trainer_option_and_logger_choice(configs_dir):
    with pytest.raises(ConfigError) as err:
        load_config(Job, ["trainer.devicez=2"])
    assert "devicez" in str(err.value) and "devices" in str(err.value)
    with pytest.raises(ConfigError, match="wandb\\+csv"):
        load_config(Job, ["logger=tensorboardx"])


def test_saved_config_round_trips(configs_dir, tmp_path):
    cfg = load_config(Job, ["config=job.yaml", "trainer.devices=2"])
    path = save_config(cfg, tmp_path / "run")
    again = OmegaConf.merge(OmegaConf.structured(Job), OmegaConf.load(path))
    assert again == cfg
