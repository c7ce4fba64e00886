"""Consolidation (SPEC §4): importance, Fisher information, pattern consolidation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ._util import check_unit

__all__ = ["ConsolidationConfig"]


@dataclass
class ConsolidationConfig:
    """Defaults of SPEC §4."""

    #: base EWC strength λ
    lambda_: float = 2000.0
    #: lower clamp of the adapted λ
    min_lambda: float = 100.0
    #: upper clamp of the adapted λ
    max_lambda: float = 15000.0
    #: EMA decay of the Fisher information
    fisher_decay: float = 0.999
    #: usage from which a pattern counts as established (λ adaptation, pruning)
    min_usage_for_importance: int = 3
    #: avg_quality under which low-importance patterns are pruned
    min_quality_threshold: float = 0.3
    #: cosine above which patterns of one category merge
    merge_similarity_threshold: float = 0.85
    #: recency time constant of the importance score (7 days)
    max_unused_age_secs: int = 7 * 86_400
    #: adapt λ to the number of established patterns
    auto_adapt_lambda: bool = True

    def validate(self) -> None:
        if not 0 < self.min_lambda <= self.max_lambda:
            raise ValueError("min_lambda must be > 0 and <= max_lambda")
        if self.lambda_ < 0:
            raise ValueError(f"lambda_ must be >= 0, got {self.lambda_}")
        check_unit(self.fisher_decay, "fisher_decay")
        check_unit(self.min_quality_threshold, "min_quality_threshold")
        if not -1.0 <= float(self.merge_similarity_threshold) <= 1.0:
            raise ValueError("merge_similarity_threshold must be within [-1, 1]")
        if self.max_unused_age_secs <= 0:
            raise ValueError("max_unused_age_secs must be > 0")
        if self.min_usage_for_importance < 0:
            raise ValueError("min_usage_for_importance must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConsolidationConfig:
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.validate()
        return cfg
