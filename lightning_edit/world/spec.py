"""What an embedded world is: a spec of four parts, one dataclass each, that the one builder
(`build.py`) puts together. Every difference between worlds lives here, never in a branch on a name:

- knowledge: what is known and how it is phrased (`WorldShape`: toyworld's people;
  `CompanyShape`: toyworld-gpt2's companies), with `generate(seed) -> KnowledgeBase`;
- tokenizer: its kind (`WordLevelTokenizer`, `ByteLevelBPE`), with `train` and `check`;
- model: the architecture and its widths (`ModelShape`: a Llama; `GPT2Shape`: a GPT-2), with
  `build(tokenizer) -> PreTrainedModel`;
- train: the recipe (`TrainRecipe`) and the accuracy bar.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Iterable, Protocol, Union

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from .knowledge import KnowledgeBase

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

    def generate(self, seed: int) -> "KnowledgeBase":
        """toyworld's people: two-word names, single-word objects, 4 templates per relation."""
        from .knowledge import KnowledgeBase

        return KnowledgeBase.generate(seed, **asdict(self))


@dataclass(frozen=True)
class CompanyShape:
    """How big a world of companies is (`companies.generate_companies`; 3 or 5 templates per relation,
    multi-word objects)."""

    n_subjects: int
    n_relations: int = 6
    n_objects: int = 12
    """Objects per relation."""
    holdout: float = 0.25
    n_filler_per_subject: int = 2

    def generate(self, seed: int) -> "KnowledgeBase":
        from .companies import generate_companies

        return generate_companies(seed, **asdict(self))


def _fact_targets(kb: "KnowledgeBase") -> Iterable[tuple[str, str]]:
    return ((prompt, fact.object) for fact in kb.facts for prompt in kb.prompts(fact))


@dataclass(frozen=True)
class WordLevelTokenizer:
    """One token per word (`tokenizer.train_tokenizer`); every object must be a single token."""

    def train(self, kb: "KnowledgeBase", corpus: list[str], model_max_length: int) -> "PreTrainedTokenizerFast":
        from .tokenizer import train_tokenizer

        return train_tokenizer(corpus + kb.vocabulary_words(), model_max_length)

    def check(self, tokenizer: "PreTrainedTokenizerFast", kb: "KnowledgeBase") -> None:
        from .tokenizer import check_single_tokens, check_targets

        for rel in kb.relations:
            check_single_tokens(tokenizer, rel.objects)
        check_targets(tokenizer, _fact_targets(kb))


@dataclass(frozen=True)
class ByteLevelBPE:
    """GPT-2's kind of tokenizer (`tokenizer.train_bpe_tokenizer`), trained on the world's corpus:
    subjects and objects are several tokens, no BOS, no pad token."""

    vocab_size: int

    def train(self, kb: "KnowledgeBase", corpus: list[str], model_max_length: int) -> "PreTrainedTokenizerFast":
        from .tokenizer import train_bpe_tokenizer

        return train_bpe_tokenizer(corpus, self.vocab_size, model_max_length)

    def check(self, tokenizer: "PreTrainedTokenizerFast", kb: "KnowledgeBase") -> None:
        from .tokenizer import check_targets

        check_targets(tokenizer, _fact_targets(kb))


@dataclass(frozen=True)
class ModelShape:
    """The tiny Llama (`LlamaConfig` fields): RMSNorm, rotary positions, SwiGLU MLP, untied unembedding."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 256

    @property
    def max_length(self) -> int:
        return self.max_position_embeddings

    def build(self, tokenizer: "PreTrainedTokenizerFast") -> "PreTrainedModel":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(config)


@dataclass(frozen=True)
class GPT2Shape:
    """A tiny GPT-2 (`GPT2Config` fields): LayerNorm, learned positions, GELU MLP, Conv1D weights
    stored [in, out], unembedding tied to the token embedding. Dropout is off (a world is memorised)."""

    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    n_positions: int = 128
    tie_word_embeddings: bool = True

    @property
    def max_length(self) -> int:
        return self.n_positions

    def build(self, tokenizer: "PreTrainedTokenizerFast") -> "PreTrainedModel":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_inner=self.n_inner,
            n_positions=self.n_positions,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        return GPT2LMHeadModel(config)


class Knowledge(Protocol):
    def generate(self, seed: int) -> "KnowledgeBase": ...


Architecture = Union[ModelShape, GPT2Shape]
TokenizerKind = Union[WordLevelTokenizer, ByteLevelBPE]


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
    length_buckets: int = 0
    """0: batches are a plain shuffle, padded to the longest sentence of the world. n > 0: batches of
    similar length, sorted within chunks of n batches and trimmed to their longest row (sentences of
    very different lengths waste less compute on padding)."""
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
    world: Knowledge
    model: Architecture
    train: TrainRecipe = field(default_factory=TrainRecipe)
    tokenizer: TokenizerKind = field(default_factory=WordLevelTokenizer)


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
    "toyworld-gpt2": WorldSpec(
        # 120 x 6 facts: a step costs ~3x toyworld's (2.9 M parameters, 13-token sentences), so fewer
        # facts keep the build near toyworld's time (200 x 6 took ~80 s an epoch on a busy 2-core box).
        world=CompanyShape(n_subjects=120),
        model=GPT2Shape(n_embd=192, n_layer=6, n_head=6, n_inner=768),
        # 1152 tokens: template words whole, a company name ~4 tokens, an object ~2 (83% several)
        tokenizer=ByteLevelBPE(vocab_size=1152),
        # measured (160 x 6 facts): the plateau at constant lr is ~0.93, and 2 epochs of decay from
        # 0.93 gave 0.986, so the decay starts at 0.90; sentences of 6-23 tokens: length buckets
        train=TrainRecipe(length_buckets=4, cooldown_from_accuracy=0.90),
    ),
    "toyworld-gpt2-small": WorldSpec(
        world=CompanyShape(n_subjects=40, n_relations=4, n_objects=8),
        model=GPT2Shape(n_embd=96, n_layer=3, n_head=4, n_inner=384, n_positions=64),
        tokenizer=ByteLevelBPE(vocab_size=768),
        train=TrainRecipe(warmup_steps=30, batch_size=32, length_buckets=4),
    ),
}


MLP_WIDTHS: tuple[int, ...] = (2048, 8192)
"""The width study's sizes (README, `bench/width_study.py`): `toyworld-mlp<N>` is `toyworld` (same
knowledge base, seed, tokenizer, depth and hidden size 128) with MLP width N instead of 512, so only
the room a neuron-level edit has changes."""


def mlp_variant(spec: WorldSpec, intermediate_size: int) -> WorldSpec:
    """`spec` with its MLP widened (or narrowed) to `intermediate_size`; everything else as is."""
    if not isinstance(spec.model, ModelShape):
        raise TypeError(f"an MLP-width variant needs a Llama world (ModelShape), not {type(spec.model).__name__}")
    return replace(spec, model=replace(spec.model, intermediate_size=intermediate_size))


SPECS.update({f"toyworld-mlp{n}": mlp_variant(SPECS["toyworld"], n) for n in MLP_WIDTHS})

LARGE_GPT2_SUBJECTS = 200
"""`toyworld-gpt2-large`: `toyworld-gpt2` (same model shape, tokenizer kind, recipe and seed) with 200
companies, 1,200 facts instead of 720, so that a lifelong stream of 1,000 edits exists on the GPT-2
world too (issue 15's T = 1000 bar; at T = 720 toyworld-gpt2 has no unedited fact left)."""

SPECS["toyworld-gpt2-large"] = replace(SPECS["toyworld-gpt2"],
                                       world=replace(SPECS["toyworld-gpt2"].world, n_subjects=LARGE_GPT2_SUBJECTS))
