"""The sizes of embedded world: knowledge base, model and training recipe, one dataclass each."""

from __future__ import annotations

from dataclasses import dataclass, field

FORMAT_VERSION = 1
"""Bumped when a built world's layout or contents change; part of the cache folder name."""


@dataclass(frozen=True)
class WorldShape:
    """How big the knowledge base is."""

    n_subjects: int
    n_relations: int
    n_objects: int
    """Objects per relation (the vocabulary counterfactual targets are drawn from)."""
    n_templates: int = 4
    """Paraphrase templates per relation."""
    holdout: float = 0.25
    """Probability that a (fact, template) pair is held out of training (one template always kept)."""
    n_filler_per_subject: int = 2


@dataclass(frozen=True)
class ModelShape:
    """The tiny Llama (`LlamaConfig` fields)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 256


@dataclass(frozen=True)
class TrainRecipe:
    """How the LM learns its world (FINDINGS: sentence loss + object-token term, AdamW, warmup)."""

    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    batch_size: int = 128
    warmup_steps: int = 100
    """Linear warmup, then constant."""
    grad_clip: float = 1.0
    object_loss_weight: float = 1.0
    """Weight of the extra cross-entropy on the object token, added to the sentence LM loss."""
    min_epochs: int = 4
    """No accuracy check (and so no cooldown or stop) before this many epochs."""
    check_from_train_accuracy: float = 0.9
    """Run the full accuracy check after an epoch only once the running object accuracy on training
    batches reaches this (the check costs ~40% of an epoch on the default world)."""
    cooldown_from_accuracy: float = 0.95
    """Once object accuracy over all facts and templates reaches this, decay the lr to zero ..."""
    cooldown_epochs: int = 2
    """... over this many epochs, then stop (if the bar still holds)."""
    max_epochs: int = 60
    """Budget: if the bar is not held by then, the build fails."""
    required_accuracy: float = 0.95
    """The bar the built model must pass over all facts and all templates."""
    num_threads: int | None = 1
    """torch threads while building; None = min(2, cpu count). One by default: on 2 shared cores a
    second thread made steps 3.6x (default world) to 26x (small world) slower under contention, and a
    fixed count keeps float reductions, so weights, identical from build to build."""


@dataclass(frozen=True)
class WorldSpec:
    world: WorldShape
    model: ModelShape
    train: TrainRecipe = field(default_factory=TrainRecipe)


SPECS: dict[str, WorldSpec] = {
    "toyworld": WorldSpec(
        world=WorldShape(n_subjects=300, n_relations=6, n_objects=16),
        model=ModelShape(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
    ),
    "toyworld-small": WorldSpec(
        world=WorldShape(n_subjects=100, n_relations=5, n_objects=12),
        model=ModelShape(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
        train=TrainRecipe(warmup_steps=30),
    ),
}
