"""Importance score of SPEC §4, as one tensor expression over many patterns."""

from __future__ import annotations

import torch

__all__ = ["importance_factors", "importance_scores", "IMPORTANCE_WEIGHTS"]

#: weights of the five factors (usage, quality, recency, success, fisher); they sum to 1.
IMPORTANCE_WEIGHTS = (0.25, 0.25, 0.15, 0.20, 0.15)


def importance_factors(
    usage_count: torch.Tensor,
    success_count: torch.Tensor,
    avg_quality: torch.Tensor,
    age_secs: torch.Tensor,
    max_age_secs: float,
    fisher_mean: torch.Tensor | None = None,
    has_fisher: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The five ``[N]`` float64 factors (usage, quality, recency, success, fisher) before weighting.

    Arguments as :func:`importance_scores`.
    """
    u = usage_count.to(torch.float64)
    usage = torch.clamp(torch.log1p(u) / 10.0, max=1.0)
    quality = avg_quality.to(torch.float64)
    recency = torch.exp(-age_secs.to(torch.float64) / float(max_age_secs))
    success = torch.where(u > 0, success_count.to(torch.float64) / u.clamp(min=1.0), torch.zeros_like(u))
    fisher = torch.full_like(u, 0.5)
    if fisher_mean is not None:
        f = torch.clamp(fisher_mean.to(torch.float64), max=1.0)
        fisher = f if has_fisher is None else torch.where(has_fisher, f, fisher)
    return usage, quality, recency, success, fisher


def importance_scores(
    usage_count: torch.Tensor,
    success_count: torch.Tensor,
    avg_quality: torch.Tensor,
    age_secs: torch.Tensor,
    max_age_secs: float,
    fisher_mean: torch.Tensor | None = None,
    has_fisher: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance of N patterns at once.

    Args:
        usage_count: ``[N]`` integer usage counts.
        success_count: ``[N]`` integer success counts.
        avg_quality: ``[N]`` average quality in [0, 1].
        age_secs: ``[N]`` seconds since each pattern was last accessed.
        max_age_secs: the recency time constant (``exp(-age / max_age)``).
        fisher_mean: ``[N]`` mean of each pattern's Fisher diagonal (ignored where ``has_fisher`` is False).
        has_fisher: ``[N]`` bool, which patterns have Fisher information (the others score 0.5 there).

    Returns:
        ``[N]`` float64 scores: 0.25·usage + 0.25·quality + 0.15·recency + 0.20·success + 0.15·fisher, with
        usage = min(ln(usage_count + 1) / 10, 1), success = success / usage (0 when unused).
    """
    usage, quality, recency, success, fisher = importance_factors(
        usage_count, success_count, avg_quality, age_secs, max_age_secs, fisher_mean, has_fisher
    )
    w_u, w_q, w_r, w_s, w_f = IMPORTANCE_WEIGHTS
    return w_u * usage + w_q * quality + w_r * recency + w_s * success + w_f * fisher
