"""Edit metrics: teacher-forced Rel / Gen, Loc against the unedited model, perplexity; the scope-gate
statistics of `calibrate` are in `metrics.gates`."""

from .edit_metrics import (
    EditScorer,
    TokenScore,
    last_token_argmax,
    loc_score,
    locality_predictions,
    pair_predictions,
    perplexity,
    rel_gen_scores,
    teacher_forced,
)

__all__ = [
    "EditScorer",
    "TokenScore",
    "last_token_argmax",
    "loc_score",
    "locality_predictions",
    "pair_predictions",
    "perplexity",
    "rel_gen_scores",
    "teacher_forced",
]
