"""Evaluation: metrics (returns, normalised score, success, coherency, entropy)."""

from diffalign.eval.metrics import (
    D4RL_REF_SCORES,
    candidate_entropy,
    coherency_planner,
    coherency_policy,
    normalized_score,
    reference_scores,
    return_stats,
    success_rate,
)

__all__ = [
    "D4RL_REF_SCORES",
    "candidate_entropy",
    "coherency_planner",
    "coherency_policy",
    "normalized_score",
    "reference_scores",
    "return_stats",
    "success_rate",
]
