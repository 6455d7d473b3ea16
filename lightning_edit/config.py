"""Configuration: YAML files merged over structured (dataclass) defaults, then `key=value` overrides.

Merge order, last wins: the job's dataclass defaults < the YAML file picked by `config=NAME` <
command-line `key=value` overrides. Because the defaults are dataclasses, an unknown key or a value
of the wrong type is an error that names the key and the valid choices, not a silent no-op.
The `trainer:` section is handed to `lightning.Trainer` as it is; its keys are checked against the
Trainer's signature so a typo there fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from lightning_edit.constants import RUN_CONFIG
from lightning_edit.errors import UserError


class ConfigError(UserError):
    """A config file, key or value that cannot be used; the message says which and what is valid."""


LOGGER_CHOICES = ("wandb+csv", "wandb", "csv", "none")


@dataclass
class ModelConfig:
    """Which causal LM to load, and how."""

    name: str = "toyworld"
    """HF hub id, local HF directory, or an embedded world name (`toyworld`, `toyworld-small`,
    `toyworld-gpt2`, `toyworld-gpt2-small`, `toyworld-gpt2-large`, `toyworld-mlp2048`, ...)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    device: str = "auto"
    """Where editing runs: `auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:1`..."""
    device_map: Any = None
    """Split the model over devices through accelerate (then `device` is not used): `auto`,
    `balanced`, `balanced_low_0`, `sequential` or {module name: device}, e.g.
    `{model.embed_tokens: 0, model.layers.0: 0, model.layers.1: 1, model.norm: 1, lm_head: 1}`.
    Every editor works on each layer's own device; offloaded layers ("cpu" beside GPUs, "disk") run
    but cannot be edited."""


@dataclass
class WandbConfig:
    """Weights & Biases settings; offline unless an API key is configured and WANDB_MODE allows."""

    project: str = "lightning-edit"
    entity: str | None = None
    mode: str | None = None
    """`online`, `offline` or `disabled`; None = offline when no API key is configured."""
    tags: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    """Sections every job shares."""

    seed: int = 0
    """Seeds torch, numpy and python before anything is built."""
    output_dir: str | None = None
    """Where the run writes (config, checkpoints, exports, tables); None = runs/<job>/<timestamp>."""
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    """Passed to lightning.Trainer as it is (accelerator, devices, strategy, num_nodes, precision...)."""
    logger: str = "wandb+csv"
    """One of wandb+csv, wandb, csv, none."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


def repo_configs_dir() -> Path:
    """The `configs/` folder: $LIGHTNING_EDIT_CONFIGS, else ./configs, else the one beside the package."""
    env = os.environ.get("LIGHTNING_EDIT_CONFIGS")
    if env:
        return Path(env)
    here = Path.cwd() / "configs"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[1] / "configs"


def available_configs(configs_dir: Path | None = None) -> list[str]:
    root = configs_dir or repo_configs_dir()
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))


def find_config_file(name: str, configs_dir: Path | None = None) -> Path:
    """`name` as a path, else `configs/<name>` (with `.yaml` added when missing)."""
    root = configs_dir or repo_configs_dir()
    candidates = [Path(name)]
    if not name.endswith((".yaml", ".yml")):
        candidates.append(Path(name + ".yaml"))
    candidates += [root / c for c in list(candidates)]
    for path in candidates:
        if path.is_file():
            return path
    choices = ", ".join(available_configs(root)) or "(none)"
    raise ConfigError(f"config file '{name}' not found (looked in . and {root}); available: {choices}")


def _valid_keys(schema: type, dotted: str) -> list[str]:
    """Field names at the level of `dotted` in the dataclass schema (for error messages)."""
    node: Any = schema
    for part in dotted.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return []
        node = fields[part].type
        if isinstance(node, str):  # postponed annotations: resolve through the default value
            default = fields[part].default_factory() if fields[part].default_factory is not dataclasses.MISSING else None
            node = type(default) if default is not None else None
    return sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else []


def _explain(exc: OmegaConfBaseException, schema: type, origin: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        valid = _valid_keys(schema, key)
        hint = f"; valid keys here: {', '.join(valid)}" if valid else ""
        return ConfigError(f"{origin}: unknown config key '{key}'{hint}")
    if isinstance(exc, ValidationError):
        msg = str(exc).splitlines()[0]
        return ConfigError(f"{origin}: bad value for '{key}': {msg}")
    return ConfigError(f"{origin}: {str(exc).splitlines()[0]} (key '{key}')")


def parse_overrides(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split `config=NAME` from the `key=value` overrides; anything else is an error."""
    config_name, overrides = None, []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument '{arg}' is not of the form key=value (e.g. trainer.devices=2)")
        key, value = arg.split("=", 1)
        if key == "config":
            config_name = value
        else:
            overrides.append(arg)
    return config_name, overrides


def check_trainer_keys(trainer: dict[str, Any]) -> None:
    """Fail early (before a model is loaded) on a Trainer option that does not exist."""
    from lightning import Trainer

    valid = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(trainer) - valid)
    if unknown:
        raise ConfigError(
            f"unknown trainer option(s) {', '.join(repr(k) for k in unknown)}; "
            f"valid: {', '.join(sorted(valid))}"
        )


def load_config(schema: type, argv: Sequence[str] = (), default_config: str | None = None) -> DictConfig:
    """Build the job config: dataclass defaults < YAML (`config=` or `default_config`) < overrides."""
    config_name, overrides = parse_overrides(argv)
    config_name = config_name or default_config
    cfg = OmegaConf.structured(schema)
    if config_name:
        path = find_config_file(config_name)
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax errors and the like
            raise ConfigError(f"{path}: cannot parse YAML: {exc}") from exc
        try:
            cfg = OmegaConf.merge(cfg, file_cfg)
        except OmegaConfBaseException as exc:
            raise _explain(exc, schema, str(path)) from exc
    for item in overrides:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _explain(exc, schema, f"override '{item}'") from exc
        except Exception as exc:  # noqa: BLE001 - the value does not parse (YAML syntax)
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"override '{item}': the value does not parse as YAML ({first})") from exc
    if "logger" in cfg and cfg.logger not in LOGGER_CHOICES:
        raise ConfigError(f"bad value for 'logger': '{cfg.logger}'; choices: {', '.join(LOGGER_CHOICES)}")
    if "trainer" in cfg:
        check_trainer_keys(OmegaConf.to_container(cfg.trainer))
    return cfg


def save_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    """Write the resolved config beside the run's outputs, so the run can be reproduced."""
    path = Path(output_dir) / RUN_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def describe(schema: type) -> str:
    """The defaults of a job config as YAML, for `--help`."""
    return OmegaConf.to_yaml(OmegaConf.structured(schema))
