"""Building, caching and opening embedded worlds.

A world is built once per (name, seed, format version) into
`$LIGHTNING_EDIT_CACHE/worlds/<name>-seed<seed>-v<version>/` (default cache `~/.cache/lightning_edit`):
under a file lock, into a temporary sibling folder that is renamed into place when complete, so
concurrent first uses build it once and nobody ever sees half a world.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from lightning_edit.constants import WORLD_ACCURACY, WORLD_COUNTERFACT, WORLD_CORPUS, WORLD_JSON, WORLD_MC_DIR, WORLD_ZSRE

from .knowledge import KnowledgeBase
from .spec import FORMAT_VERSION, SPECS, WorldSpec

CODE_WORLDS: tuple[str, ...] = ("codeworld", "codeworld-small")
"""The embedded code worlds (lightning_edit/code/world.py: Java->D programs, a code LM, KECode and MENT exports)."""
WORLD_NAMES: tuple[str, ...] = tuple(SPECS) + CODE_WORLDS
CACHE_ENV = "LIGHTNING_EDIT_CACHE"


class WorldBuildError(RuntimeError):
    """The world could not be built (most often: the model did not learn its facts well enough)."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $LIGHTNING_EDIT_CACHE, else ~/.cache/lightning_edit."""
    root = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lightning_edit"
    return Path(root).expanduser()


def _spec(name: str) -> WorldSpec:
    if name not in SPECS:
        raise ValueError(f"unknown embedded world '{name}'; choices: {', '.join(WORLD_NAMES)}")
    return SPECS[name]


def world_dir(name: str, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """Where world `name` built from `seed` lives (whether or not it is built yet)."""
    _spec(name)
    return cache_root(cache_dir) / "worlds" / f"{name}-seed{seed}-v{FORMAT_VERSION}"


def _is_built(root: Path) -> bool:
    return (root / WORLD_ACCURACY).is_file()  # written last; the folder only appears when complete


@dataclass
class WorldFolder:
    """What every built world folder holds (fact worlds and code worlds): `model/`, `data/`, a corpus."""

    root: Path

    @property
    def name(self) -> str:
        """The world's name (`toyworld` for a folder `toyworld-seed0-v1`)."""
        return self.root.name.split("-seed")[0]

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def corpus_path(self) -> Path:
        return self.data_dir / WORLD_CORPUS

    def load_model(self, **kwargs):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.model_dir, **kwargs)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)


@dataclass
class World(WorldFolder):
    """A built world on disk: the HF model folder, the knowledge base, the exports, the accuracy."""

    kb: KnowledgeBase
    accuracy: dict

    @classmethod
    def open(cls, root: str | Path) -> "World":
        root = Path(root)
        if not _is_built(root):
            raise FileNotFoundError(f"{root} is not a built world (no accuracy.json)")
        kb = KnowledgeBase.from_json(json.loads((root / WORLD_JSON).read_text()))
        return cls(root=root, kb=kb, accuracy=json.loads((root / WORLD_ACCURACY).read_text()))

    @property
    def zsre_path(self) -> Path:
        return self.data_dir / WORLD_ZSRE

    @property
    def counterfact_path(self) -> Path:
        return self.data_dir / WORLD_COUNTERFACT

    @property
    def mc_dir(self) -> Path:
        return self.data_dir / WORLD_MC_DIR


def _say(message: str) -> None:
    print(f"[lightning-edit world] {message}", file=sys.stderr, flush=True)


def _build_into(out: Path, final: Path, name: str, seed: int, progress: bool) -> dict:
    """Everything a world holds, written under `out` (which will be renamed to `final`)."""
    # Heavy imports only when a world is really built; opening a cached one stays cheap.
    from .export import corpus_sentences, export_datasets
    from .tokenizer import save_tokenizer
    from .train import object_accuracy, train_world_model

    spec = _spec(name)
    start = time.perf_counter()
    kb = spec.world.generate(seed)
    (out / WORLD_JSON).write_text(json.dumps(kb.to_json(), indent=1, ensure_ascii=False) + "\n")
    export_datasets(kb, out / "data", seed, final_data_dir=final / "data")

    tokenizer = spec.tokenizer.train(kb, corpus_sentences(kb, seed), model_max_length=spec.model.max_length)
    spec.tokenizer.check(tokenizer, kb)

    n_prompts = sum(len(kb.prompts(f)) for f in kb.facts)
    _say(f"training the {name} model ({len(kb.facts)} facts, {n_prompts} fact prompts) ...")
    result = train_world_model(kb, tokenizer, spec.model, spec.train, seed, log_dir=out / "logs", progress=progress)
    acc = object_accuracy(result.model, tokenizer, kb)
    if acc["accuracy"] < spec.train.required_accuracy:
        raise WorldBuildError(
            f"world '{name}' (seed {seed}): the model knows {acc['accuracy']:.1%} of its facts over all "
            f"templates after {result.epochs} epochs (max_epochs {spec.train.max_epochs}); "
            f"required {spec.train.required_accuracy:.0%}. Per relation: {acc['per_relation']}")

    result.model.save_pretrained(out / "model")
    save_tokenizer(tokenizer, out / "model")
    for path in (out / "model").iterdir():
        path.chmod(0o644)  # the weights file is written private; a cache may be shared
    n_params = sum(p.numel() for p in result.model.parameters())
    record = {
        **acc,
        "name": name,
        "seed": seed,
        "format_version": FORMAT_VERSION,
        "build_seconds": round(time.perf_counter() - start, 2),
        "train_seconds": round(result.seconds, 2),
        "epochs": result.epochs,
        "steps": result.steps,
        "threads": result.threads,
        "history": result.history,
        "sizes": {
            "n_subjects": len(kb.subjects),
            "n_relations": len(kb.relations),
            "n_facts": len(kb.facts),
            "n_templates": {r.name: len(r.templates) for r in kb.relations},
            "n_objects_per_relation": {r.name: len(r.objects) for r in kb.relations},
            "vocab_size": len(tokenizer),
            "n_params": n_params,
            "tokens": token_lengths(tokenizer, kb),
        },
        "architecture": type(result.model).__name__,
        "tokenizer": {"kind": type(spec.tokenizer).__name__, **asdict(spec.tokenizer)},
        "model": asdict(spec.model),
        "train": asdict(spec.train),
    }
    (out / WORLD_ACCURACY).write_text(json.dumps(record, indent=1) + "\n")
    return record


def token_lengths(tokenizer, kb: KnowledgeBase) -> dict:
    """Mean and max tokens per subject and per object (after a space, as they follow a prompt)."""
    def stats(texts: list[str]) -> dict:
        lengths = [len(tokenizer(" " + t, add_special_tokens=False)["input_ids"]) for t in texts]
        return {"mean": round(sum(lengths) / len(lengths), 2), "max": max(lengths),
                "multi_token_share": round(sum(n > 1 for n in lengths) / len(lengths), 3)}

    return {"subject": stats(kb.subjects), "object": stats([f.object for f in kb.facts])}


def build_cached(root: Path, build: Callable[[Path], dict], is_built: Callable[[Path], bool], label: str,
                 force: bool = False) -> dict | None:
    """Build folder `root` once, whoever asks: under a file lock, `build(tmp)` writes into a temporary
    sibling folder that is renamed to `root` when complete, so concurrent first uses build it once and
    nobody ever sees half of it. Returns build's record, or None when `root` was built already
    (force: rebuild it anyway). Shared by every embedded world (toyworld, codeworld)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say(f"another process is building {label} in {root}; waiting for it ...")
        lock.acquire()
    try:
        if is_built(root) and not force:
            return None
        for stale in root.parent.glob(f".{root.name}.build-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.build-", dir=root.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache may be shared
        try:
            _say(f"building {label} in {root}")
            record = build(tmp)
            if root.exists():  # force: move the old one aside, then swap in the new one
                old = root.with_name(f".{root.name}.old-{os.getpid()}")
                os.rename(root, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.release()
    return record


def build_world(name: str = "toyworld", seed: int = 0, cache_dir: str | Path | None = None,
                force: bool = False, progress: bool = True) -> World:
    """Build world `name` from `seed` into the cache (or reuse it), and open it.

    force: rebuild even if it is cached. Safe to call from several processes at once.
    """
    if name in CODE_WORLDS:
        from lightning_edit.code.world import build_code_world

        return build_code_world(name, seed, cache_dir, force=force, progress=progress)
    root = world_dir(name, seed, cache_dir)
    record = build_cached(root, lambda tmp: _build_into(tmp, root, name, seed, progress), _is_built,
                          f"world '{name}' (seed {seed})", force=force)
    if record is not None:
        _say(f"world '{name}' built in {record['build_seconds']:.0f} s: the model knows "
             f"{record['accuracy']:.1%} of {record['n_prompts']} fact prompts "
             f"(held-out paraphrases {record['held_out_pairs']:.1%})")
    return World.open(root)


def load_world(name: str = "toyworld", seed: int = 0, cache_dir: str | Path | None = None) -> World:
    """Open world `name`, building it on first use."""
    if name in CODE_WORLDS:
        from lightning_edit.code.world import load_code_world

        return load_code_world(name, seed, cache_dir)
    root = world_dir(name, seed, cache_dir)
    if _is_built(root):
        return World.open(root)
    return build_world(name, seed, cache_dir)


def resolve_model_path(name: str, seed: int = 0, cache_dir: str | Path | None = None) -> Path | None:
    """An embedded world's name -> its HF model folder (built on first use); any other name -> None."""
    if name not in WORLD_NAMES:
        return None
    if name not in CODE_WORLDS and not _is_built(world_dir(name, seed, cache_dir)):
        _say(f"'{name}' is an embedded world; building it on first use (cached in {world_dir(name, seed, cache_dir)})")
    return load_world(name, seed, cache_dir).model_dir


def world_for(model_name: str | Path | None) -> "World | None":
    """The embedded world a `model.name` means: a world name (built on first use), or the model folder
    of a built world (`<world.root>/model`, a fact world or a code world); None for any other model."""
    if not model_name:
        return None
    if str(model_name) in WORLD_NAMES:
        return load_world(str(model_name))
    root = Path(model_name).parent
    if (root / "codeworld.json").is_file():
        from lightning_edit.code.world import CodeWorld

        try:
            return CodeWorld.open(root)
        except FileNotFoundError:
            return None
    return World.open(root) if _is_built(root) and (root / WORLD_JSON).is_file() else None

