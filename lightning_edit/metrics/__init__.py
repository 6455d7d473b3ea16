"""Edit metrics: teacher-forced Rel / Gen, Loc against the unedited model, perplexity."""

from .edit_metrics import (
    EditScorer,
    TokenScore,
    join_prompt_target,
    last_token_argmax,
    loc_score,
    locality_predictions,
    pair_predictions,
    perplexity,
    rel_gen_scores,
    target_positions,
    teacher_forced,
)

__all__ = [
    "EditScorer",
    "TokenScore",
    "join_prompt_target",
    "last_token_argmax",
    "loc_score",
    "locality_predictions",
    "pair_predictions",
    "perplexity",
    "rel_gen_scores",
    "target_positions",
    "teacher_forced",
]
