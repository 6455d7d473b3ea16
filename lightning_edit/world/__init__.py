"""The embedded worlds: a synthetic knowledge base, a tokenizer and a tiny LM trained on it with
Lightning, plus ZsRE / CounterFact / corpus / multiple-choice exports.

- `toyworld` (default; `toyworld-small` for tests): people, a word-level tokenizer, a tiny Llama.
- `toyworld-gpt2` (`toyworld-gpt2-small`): companies, multi-token objects, a byte-level BPE, a tiny
  GPT-2 of another width and depth.
  `toyworld-gpt2-large`: the same with 1,200 facts (a 1,000-edit stream).
- `codeworld` (`codeworld-small`): Java -> D programs and a tiny code LM with controlled systematic
  mistakes, for the code benchmarks (built by `lightning_edit.code.world`, cached the same way).

A world is a `WorldSpec` (spec.py); one builder builds every spec. `model.name=toyworld` resolves
here (`resolve_model_path`) so the framework runs offline through the same code path as for a real
HF model and real data. Worlds are built on first use and cached.
"""

from .build import (
    CACHE_ENV,
    CODE_WORLDS,
    WORLD_NAMES,
    World,
    WorldBuildError,
    build_cached,
    build_world,
    cache_root,
    load_world,
    resolve_model_path,
    world_dir,
    world_for,
)
from .knowledge import ESSENCE_TEMPLATE, Fact, KnowledgeBase, Relation
from .spec import (
    FORMAT_VERSION,
    SPECS,
    ByteLevelBPE,
    CompanyShape,
    GPT2Shape,
    ModelShape,
    TrainRecipe,
    WordLevelTokenizer,
    WorldShape,
    WorldSpec,
)

__all__ = [
    "CACHE_ENV", "CODE_WORLDS", "ESSENCE_TEMPLATE", "FORMAT_VERSION", "SPECS", "WORLD_NAMES", "ByteLevelBPE",
    "CompanyShape", "Fact", "GPT2Shape", "KnowledgeBase", "ModelShape", "Relation", "TrainRecipe", "WordLevelTokenizer",
    "World", "WorldBuildError", "WorldShape", "WorldSpec",
    "build_cached", "build_world", "cache_root", "load_world", "resolve_model_path", "world_dir", "world_for",
]
