"""Locating tools shared by the editors: activations, attribution, corpus statistics, value solving.

Pure torch; no Lightning. Every model access goes through `ModelAdapter`.
"""

from .activations import (
    SITES,
    Site,
    activations,
    capture,
    context_keys,
    dense_latents,
    replace_at,
    resolve_site,
    run_until_captured,
)
from .attribution import TargetObjective, input_x_gradient, integrated_gradients, patched_objective
from .positions import resolve_position, subject_last_token, subject_span
from .statistics import (
    MomentStats,
    StatsCache,
    StatsKey,
    StatsMismatchError,
    compute_moments,
    editing_second_moment,
    evenly_spaced,
    read_corpus,
    second_moment,
)
from .value_solver import ValueResult, ValueSolverConfig, compute_value

__all__ = [
    "SITES", "MomentStats", "Site", "StatsCache", "StatsKey", "StatsMismatchError", "TargetObjective",
    "ValueResult", "ValueSolverConfig", "activations", "capture", "compute_moments", "compute_value",
    "context_keys", "dense_latents", "editing_second_moment", "evenly_spaced", "input_x_gradient",
    "integrated_gradients", "patched_objective", "read_corpus", "replace_at", "resolve_position", "resolve_site",
    "run_until_captured", "second_moment", "subject_last_token", "subject_span",
]
