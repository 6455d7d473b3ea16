"""The embedded default world: a synthetic knowledge base, a word-level tokenizer and a tiny Llama
trained on it with Lightning, plus ZsRE / CounterFact / corpus / multiple-choice exports.

`model.name=toyworld` resolves here (`resolve_model_path`) so the framework runs offline through the
same code path as for a real HF model and real data. Worlds are built on first use and cached.
"""

from .build import (
    CACHE_ENV,
    WORLD_NAMES,
    World,
    WorldBuildError,
    build_world,
    cache_root,
    load_world,
    resolve_model_path,
    world_dir,
    world_of,
)
from .knowledge import ESSENCE_TEMPLATE, Fact, KnowledgeBase, Relation
from .spec import FORMAT_VERSION, SPECS, ModelShape, TrainRecipe, WorldShape, WorldSpec

__all__ = [
    "CACHE_ENV", "ESSENCE_TEMPLATE", "FORMAT_VERSION", "SPECS", "WORLD_NAMES", "Fact", "KnowledgeBase",
    "ModelShape", "Relation", "TrainRecipe", "World", "WorldBuildError", "WorldShape", "WorldSpec",
    "build_world", "cache_root", "load_world", "resolve_model_path", "world_dir", "world_of",
]
