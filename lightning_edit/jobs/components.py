"""The sparse component an editor asks for, found before the editor is built.

An editor class says what it needs (`Editor.component_request`: an SAE or a transcoder at a
hookpoint). With `component.path` set, that checkpoint is loaded (`sparse.resolve.load_component`).
Without one, on an embedded world, the world's default component is found in its cache
(`<world.root>/<kind>/<hookpoint>-k<k>[-<overrides>]/`) or trained there first by the SAE /
transcoder job, once, said on stderr; on any other model it is an error naming what to train.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from lightning_edit.config import load_config
from lightning_edit.constants import CODER_CFG
from lightning_edit.editors.base import ComponentRequest
from lightning_edit.models import model_device
from lightning_edit.sparse.resolve import KIND_NAMES, load_component

TRAIN_SCRIPTS = {"sae": "train_sae.py", "transcoder": "train_transcoder.py"}


def resolve_component(request: ComponentRequest | None, component_cfg: Mapping[str, Any], model: nn.Module,
                      adapter: Any, world: Any, model_name: str | None) -> nn.Module | None:
    """The loaded component `request` asks for (None when it asks for none): from `component.path`,
    else the embedded `world`'s default (found or trained now) where the editor accepts one."""
    if request is None:
        return None
    path = component_cfg.get("path")
    hookpoint = adapter.resolve_hookpoint(request.hookpoint, "component.hookpoint")  # this model's module name
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or model_name
    if not path:
        script = f"{TRAIN_SCRIPTS[request.kind]} hookpoints=[{hookpoint}]"
        if not request.trains_default:
            raise ValueError(f"{request.who}: set component.path to {KIND_NAMES[request.kind]} trained on "
                             f"{hookpoint!r} ({script})")
        if world is None:
            raise ValueError(f"component.path is not set and model {name!r} is not an embedded world: give "
                             f"{request.who} a top-k {request.kind} (sparsify or SAELens folder) trained on "
                             f"{hookpoint!r} ({script})")
        path = default_component(world, request.kind, hookpoint, request.default_overrides)
    return load_component(path, hookpoint, request.kind, adapter, device=_device_at(adapter, model, hookpoint),
                          who=request.who, model_desc=f"model {name!r}")


def _device_at(adapter: Any, model: nn.Module, hookpoint: str):
    """The device of the module at `hookpoint` (a component follows the module it attaches to, its own
    under a device map); the model's for a name it does not have (load_component says what is wrong)."""
    try:
        return adapter.hookpoint_device(hookpoint)
    except ValueError:
        return model_device(model)


def default_component(world: Any, kind: str, hookpoint: str, overrides: tuple[str, ...] | list[str] = ()) -> Path:
    """The folder of the world's default `kind` coder at `hookpoint`: the job's default config
    (configs/sae.yaml or configs/transcoder.yaml) with `overrides` (that job's `key=value`s), cached
    in `<world.root>/<kind>/<hookpoint>-k<k>[-<overrides>]/`; trained there on first use."""
    from filelock import FileLock

    from lightning_edit.jobs import sparse as sae_job
    from lightning_edit.jobs import transcoder as transcoder_job

    job = {"sae": sae_job, "transcoder": transcoder_job}[kind]
    overrides = list(overrides)
    base = load_config(job.SCHEMA, overrides, default_config=job.DEFAULT_CONFIG)
    tag = "".join(f"-{o.split('.')[-1]}" for o in overrides if not o.startswith("coder.k="))
    folder = Path(world.root) / kind / f"{hookpoint}-k{base.coder.k}{tag}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / hookpoint / CODER_CFG).is_file():
            _say(f"using the default {kind} in {folder / hookpoint}")
            return folder
        _say(f"no {kind} given (component.path): training the default {kind} for {world.root.name} at "
             f"{hookpoint} (k={base.coder.k}) into {folder} ...")
        start = time.perf_counter()
        if kind == "sae":  # the SAE job reads the world's corpus from its name
            data = [f"model.name={world.name}"]
        else:
            data = [f"model.name={world.model_dir}", f"data.path={world.corpus_path}", "data.packing=false"]
        overrides += [*data, f"hookpoints=[{hookpoint}]", f"export_dir={folder}",
                      f"output_dir={folder.with_name(folder.name + '.run')}", "logger=csv",
                      "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
                      *getattr(world, "sparse_overrides", ())]  # e.g. a code world's longer context
        cfg = load_config(job.SCHEMA, overrides, default_config=job.DEFAULT_CONFIG)
        if sae_job.train(cfg, job=kind) != 0:
            raise RuntimeError(f"training the default {kind} into {folder} failed (see above)")
        _say(f"default {kind} trained in {time.perf_counter() - start:.0f} s")
    return folder


def _say(message: str) -> None:
    print(f"[lightning-edit components] {message}", file=sys.stderr, flush=True)
