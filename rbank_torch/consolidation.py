"""Consolidation (SPEC §4): importance, Fisher information, pattern consolidation, k-means extraction.

Everything that touches many patterns is one tensor expression: the importance of every pattern, the
Fisher information of every pattern (one ``[N, D]`` table on the consolidator's device, updated in
batches), the pairs of similar patterns (:func:`rbank_torch.kernels.pairs.pairs_above`, never an
``N × N`` matrix) and the leader scan over them (:func:`rbank_torch.kernels.pairs.leader_scan`).
"""

from __future__ import annotations

import time
import uuid as _uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._util import (
    as_embedding,
    as_embedding_batch,
    check_finite_number,
    check_unit,
    dt_to_us,
    next_id,
    utcnow,
)
from .importance import IMPORTANCE_WEIGHTS, importance_factors, importance_scores
from .patterns import Pattern, PatternCategory, PatternMetadata

if TYPE_CHECKING:
    from .store import PatternStore

__all__ = [
    "ClusterPattern",
    "ConsolidationConfig",
    "ConsolidationResult",
    "ConsolidationStats",
    "ConsolidatorStats",
    "FisherInformation",
    "ImportanceScore",
    "PatternConsolidator",
    "cluster_patterns",
]


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
        """Raise ``ValueError`` naming the first field that is not a finite number in its range."""
        lam = check_finite_number(self.lambda_, "lambda_")
        lo = check_finite_number(self.min_lambda, "min_lambda")
        hi = check_finite_number(self.max_lambda, "max_lambda")
        if not 0 < lo <= hi:
            raise ValueError(f"min_lambda must be > 0 and <= max_lambda, got {lo} and {hi}")
        if lam < 0:
            raise ValueError(f"lambda_ must be >= 0, got {lam}")
        check_unit(self.fisher_decay, "fisher_decay")
        check_unit(self.min_quality_threshold, "min_quality_threshold")
        thr = check_finite_number(self.merge_similarity_threshold, "merge_similarity_threshold")
        if not -1.0 <= thr <= 1.0:
            raise ValueError(f"merge_similarity_threshold must be within [-1, 1], got {thr}")
        if check_finite_number(self.max_unused_age_secs, "max_unused_age_secs") <= 0:
            raise ValueError(f"max_unused_age_secs must be > 0, got {self.max_unused_age_secs}")
        usage = check_finite_number(self.min_usage_for_importance, "min_usage_for_importance")
        if usage < 0 or usage != int(usage):
            raise ValueError(f"min_usage_for_importance must be an integer >= 0, got {self.min_usage_for_importance}")
        if not isinstance(self.auto_adapt_lambda, (bool, int)):
            raise ValueError(f"auto_adapt_lambda must be a bool, got {self.auto_adapt_lambda!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConsolidationConfig:
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.validate()
        return cfg


def _store_columns(
    store: PatternStore, rows: torch.Tensor, now_us: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The importance inputs of ``rows`` (caller holds the store lock), on the CPU:
    ``(ids, usage, success, avg_quality, age_secs)``, each ``[N]``."""
    age = ((now_us - store._last[rows].cpu()).double() / 1e6).clamp(min=0.0)
    return store._ids[rows].cpu(), store._usage[rows].cpu(), store._success[rows].cpu(), store._avgq[rows].cpu(), age


def _as_id(value: Any, field: str) -> int:
    """A pattern id as int; ``ValueError`` naming ``field`` for anything that is not an integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{field} must hold integer pattern ids, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------------------
# Fisher information of one pattern
# ----------------------------------------------------------------------------------------------------------
def _check_weight(w: Any, name: str) -> float:
    return check_unit(w, name)


class FisherInformation:
    """Diagonal Fisher information of one pattern (or one parameter tensor), SPEC §4.

    Attributes:
        diagonal: ``[D]`` Fisher diagonal (ones when new).
        ema_grad_squared: ``[D]`` exponential moving average of squared gradients (zeros when new).
        sample_count: number of gradients folded in.
    """

    def __init__(
        self, dim: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.diagonal = torch.ones(dim, device=device, dtype=dtype)
        self.ema_grad_squared = torch.zeros(dim, device=device, dtype=dtype)
        self.sample_count = 0

    @property
    def dim(self) -> int:
        return int(self.diagonal.numel())

    def __repr__(self) -> str:
        return f"FisherInformation(dim={self.dim}, sample_count={self.sample_count})"

    def _grad(self, gradient: Any) -> torch.Tensor:
        g = torch.as_tensor(gradient, device=self.diagonal.device)
        if g.dim() != 1 or g.numel() != self.dim:
            raise ValueError(f"gradient must have length {self.dim}, got shape {tuple(g.shape)}")
        if not g.is_floating_point():
            g = g.to(self.diagonal.dtype)
        if not bool(torch.isfinite(g).all()):
            raise ValueError("gradient must hold finite values (found NaN or inf)")
        return g.to(self.diagonal.dtype)

    def update(self, gradient: Any, decay: float) -> None:
        """Fold one gradient in: ``ema ← decay·ema + (1−decay)·g²``, ``diagonal ← ema``, count + 1.

        Args:
            gradient: ``[D]`` gradient; a wrong length or a non-finite value raises ``ValueError`` and
                changes nothing.
            decay: EMA decay in [0, 1].
        """
        d = check_unit(decay, "decay")
        g = self._grad(gradient)
        self.ema_grad_squared.mul_(d).addcmul_(g, g, value=1.0 - d)
        self.diagonal.copy_(self.ema_grad_squared)
        self.sample_count += 1

    def importance(self, index: int) -> float:
        """Fisher value of one coordinate."""
        if not -self.dim <= int(index) < self.dim:
            raise IndexError(f"index must be within [0, {self.dim}), got {index}")
        return float(self.diagonal[int(index)])

    def total_importance(self) -> float:
        """Sum of the diagonal."""
        return float(self.diagonal.double().sum())

    def merge(self, other: FisherInformation, self_weight: float) -> None:
        """Weighted mean with ``other`` (diagonal, EMA and sample count), in place.

        ``self_weight`` in [0, 1] weighs this one, ``1 − self_weight`` the other; the merged sample count
        is the weighted mean truncated to an integer.
        """
        w = _check_weight(self_weight, "self_weight")
        if other.dim != self.dim:
            raise ValueError(f"cannot merge Fisher information of dim {other.dim} into dim {self.dim}")
        o_diag = other.diagonal.to(self.diagonal.device, self.diagonal.dtype)
        o_ema = other.ema_grad_squared.to(self.diagonal.device, self.diagonal.dtype)
        self.diagonal.mul_(w).add_(o_diag, alpha=1.0 - w)
        self.ema_grad_squared.mul_(w).add_(o_ema, alpha=1.0 - w)
        # truncated like an integer cast of the weighted mean (the tiny slack absorbs float rounding, so an
        # exact integer mean such as 0.5·2 + 0.5·4 stays 3)
        self.sample_count = int(w * self.sample_count + (1.0 - w) * other.sample_count + 1e-9)


# ----------------------------------------------------------------------------------------------------------
# Importance
# ----------------------------------------------------------------------------------------------------------
_FACTORS = ("usage", "quality", "recency", "success", "fisher")


@dataclass
class ImportanceScore:
    """Importance of one pattern (SPEC §4).

    ``score = 0.25·usage + 0.25·quality + 0.15·recency + 0.20·success + 0.15·fisher`` with
    usage = min(ln(usage_count + 1)/10, 1), quality = avg_quality, recency = exp(−age/max_unused_age)
    (age since last_accessed), success = success rate, fisher = min(mean Fisher diagonal, 1) or 0.5
    without Fisher information. ``factors`` holds the five terms before weighting.
    """

    pattern_id: int
    score: float
    factors: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def _columns(patterns: Sequence[Pattern], now: datetime | None) -> tuple[torch.Tensor, ...]:
        now_us = dt_to_us(now or utcnow())
        usage = torch.tensor([p.usage_count for p in patterns], dtype=torch.int64)
        success = torch.tensor([p.success_count for p in patterns], dtype=torch.int64)
        quality = torch.tensor([p.avg_quality for p in patterns], dtype=torch.float64)
        age = torch.tensor([(now_us - dt_to_us(p.last_accessed)) / 1e6 for p in patterns], dtype=torch.float64)
        return usage, success, quality, age.clamp(min=0.0)

    @classmethod
    def scores_tensor(
        cls,
        patterns: Sequence[Pattern],
        fisher_mean: torch.Tensor | None = None,
        has_fisher: torch.Tensor | None = None,
        max_age_secs: float = 7 * 86_400,
        now: datetime | None = None,
    ) -> torch.Tensor:
        """``[N]`` float64 importance of many patterns at once (one tensor expression).

        Args:
            patterns: N patterns.
            fisher_mean: optional ``[N]`` mean Fisher diagonal per pattern.
            has_fisher: optional ``[N]`` bool, which patterns have Fisher information.
            max_age_secs: recency time constant.
            now: the time ages are measured at (default: now).
        """
        if not check_finite_number(max_age_secs, "max_age_secs") > 0:
            raise ValueError(f"max_age_secs must be > 0, got {max_age_secs!r}")
        usage, success, quality, age = cls._columns(patterns, now)
        return importance_scores(usage, success, quality, age, float(max_age_secs), fisher_mean, has_fisher)

    @classmethod
    def compute(
        cls,
        pattern: Pattern,
        fisher: FisherInformation | None = None,
        max_age_secs: float = 7 * 86_400,
        now: datetime | None = None,
    ) -> ImportanceScore:
        """Importance of one pattern, with its factors."""
        return cls.compute_batch([pattern], [fisher], max_age_secs=max_age_secs, now=now)[0]

    @classmethod
    def compute_batch(
        cls,
        patterns: Sequence[Pattern],
        fishers: Sequence[FisherInformation | None] | None = None,
        max_age_secs: float = 7 * 86_400,
        now: datetime | None = None,
    ) -> list[ImportanceScore]:
        """Importance of many patterns at once (tensor maths), with their factors."""
        if not check_finite_number(max_age_secs, "max_age_secs") > 0:
            raise ValueError(f"max_age_secs must be > 0, got {max_age_secs!r}")
        n = len(patterns)
        if fishers is not None and len(fishers) != n:
            raise ValueError(f"fishers must have one entry per pattern ({n}), got {len(fishers)}")
        usage, success, quality, age = cls._columns(patterns, now)
        fisher_mean = has_fisher = None
        if fishers is not None:
            has_fisher = torch.tensor([f is not None for f in fishers], dtype=torch.bool)
            fisher_mean = torch.tensor(
                [0.0 if f is None else float(f.diagonal.double().mean()) for f in fishers], dtype=torch.float64
            )
        terms = torch.stack(
            importance_factors(usage, success, quality, age, float(max_age_secs), fisher_mean, has_fisher), dim=1
        )  # [N, 5]
        scores = terms @ torch.tensor(IMPORTANCE_WEIGHTS, dtype=torch.float64)
        t = terms.tolist()
        s = scores.tolist()
        return [ImportanceScore(p.id, s[i], dict(zip(_FACTORS, t[i]))) for i, p in enumerate(patterns)]


# ----------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ConsolidationStats:
    merged_count: int = 0
    pruned_count: int = 0
    avg_pruned_importance: float = 0.0
    avg_kept_importance: float = 0.0
    processing_time_ms: float = 0.0


@dataclass
class ConsolidationResult:
    """What one consolidation did (SPEC §4).

    ``merge_map`` maps every absorbed pattern id to the id of the leader it was folded into.
    ``patterns_after = patterns_before − pruned − merged``; ``importance_preserved`` is the sum of the
    importance of the kept patterns (scores taken before the merge).
    """

    merged_pattern_ids: list[int] = field(default_factory=list)
    pruned_pattern_ids: list[int] = field(default_factory=list)
    merge_map: dict[int, int] = field(default_factory=dict)
    patterns_before: int = 0
    patterns_after: int = 0
    importance_preserved: float = 0.0
    timestamp: datetime = field(default_factory=utcnow)
    lambda_used: float = 0.0
    stats: ConsolidationStats = field(default_factory=ConsolidationStats)


@dataclass
class ConsolidatorStats:
    fisher_entries: int = 0
    current_lambda: float = 0.0
    consolidation_count: int = 0
    total_consolidated: int = 0


# ----------------------------------------------------------------------------------------------------------
# The consolidator
# ----------------------------------------------------------------------------------------------------------
_FISHER_EPS = 1e-8
_CONSOLIDATOR_FORMAT = 1


class PatternConsolidator:
    """Importance, Fisher information and consolidation of pattern sets (SPEC §4).

    The Fisher information of all patterns lives in one table on ``device``: ``[N, D]`` diagonal and EMA
    tensors plus ``[N]`` sample counts, one row per pattern id that has received a gradient.

    Args:
        config: a :class:`ConsolidationConfig` (defaults when omitted).
        device: where the Fisher table lives (the store's device).
    """

    def __init__(self, config: ConsolidationConfig | None = None, *, device: torch.device | str = "cpu") -> None:
        cfg = ConsolidationConfig(**asdict(config)) if config is not None else ConsolidationConfig()
        cfg.validate()
        self.config = cfg
        self.device = torch.device(device)
        self._lambda = self._clamp(cfg.lambda_)
        self._row: dict[int, int] = {}
        self._ids: list[int] = []
        self._dim: int | None = None
        self._diag = torch.empty(0, 0, device=self.device)
        self._ema = torch.empty(0, 0, device=self.device)
        self._count = torch.empty(0, dtype=torch.int64, device=self.device)
        self._consolidations = 0
        self._total_consolidated = 0

    # ------------------------------------------------------------------ lambda
    def _clamp(self, v: float) -> float:
        return min(max(float(v), self.config.min_lambda), self.config.max_lambda)

    @property
    def lambda_(self) -> float:
        """Current EWC strength λ (within [min_lambda, max_lambda])."""
        return self._lambda

    def set_lambda(self, value: float) -> float:
        """Set λ, clamped to [min_lambda, max_lambda]; returns the value set."""
        v = check_finite_number(value, "lambda")
        self._lambda = self._clamp(v)
        return self._lambda

    def adapt_lambda(self, patterns: Sequence[Pattern] | int) -> float:
        """With ``auto_adapt_lambda``: λ = clamp(base·(1 + 0.1·#established), min, max), where established
        patterns have usage ≥ min_usage_for_importance. ``patterns`` may also be that count. Returns λ."""
        if not self.config.auto_adapt_lambda:
            return self._lambda
        if isinstance(patterns, int):
            n = patterns
        else:
            n = sum(1 for p in patterns if p.usage_count >= self.config.min_usage_for_importance)
        self._lambda = self._clamp(self.config.lambda_ * (1.0 + 0.1 * n))
        return self._lambda

    # ------------------------------------------------------------------ Fisher table
    @property
    def fisher_entries(self) -> int:
        return len(self._ids)

    def _ensure_dim(self, dim: int) -> None:
        if self._dim is None:
            self._dim = dim
            self._diag = torch.empty(0, dim, device=self.device)
            self._ema = torch.empty(0, dim, device=self.device)
        elif dim != self._dim:
            raise ValueError(f"gradient must have length {self._dim} (the Fisher table's dim), got {dim}")

    def _rows_for(self, ids: Sequence[int]) -> torch.Tensor:
        """Rows of ``ids`` in the table, appending new rows (diagonal ones, EMA zeros) for unknown ids."""
        new = [i for i in dict.fromkeys(ids) if i not in self._row]
        if new:
            assert self._dim is not None
            k = len(new)
            for j, pid in enumerate(new):
                self._row[pid] = len(self._ids) + j
            self._ids.extend(new)
            self._diag = torch.cat([self._diag, torch.ones(k, self._dim, device=self.device)])
            self._ema = torch.cat([self._ema, torch.zeros(k, self._dim, device=self.device)])
            self._count = torch.cat([self._count, torch.zeros(k, dtype=torch.int64, device=self.device)])
        return torch.tensor([self._row[i] for i in ids], dtype=torch.int64, device=self.device)

    def update_fisher(self, pattern_id: int | Sequence[int] | torch.Tensor, gradient: Any) -> None:
        """Fold gradients into Fisher information (SPEC ``FisherInformation.update`` with ``fisher_decay``).

        ``update_fisher(id, g)`` takes one id and a ``[D]`` gradient; ``update_fisher(ids, G)`` takes ``[B]``
        ids and ``[B, D]`` gradients (the same as :meth:`update_fisher_batch`). A wrong shape or a
        non-finite value raises ``ValueError``; nothing changes then.
        """
        if isinstance(pattern_id, torch.Tensor) and pattern_id.dim() == 0:
            pattern_id = int(pattern_id)
        if isinstance(pattern_id, (torch.Tensor, list, tuple, np.ndarray)):
            self.update_fisher_batch(pattern_id, gradient)
            return
        g = as_embedding(gradient, "gradient", dim=self._dim)
        self.update_fisher_batch([_as_id(pattern_id, "pattern_id")], g[None, :])

    def update_fisher_batch(self, pattern_ids: Sequence[int] | torch.Tensor, gradients: Any) -> None:
        """Fold ``B`` gradients into the Fisher information of ``B`` patterns at once.

        Args:
            pattern_ids: ``[B]`` pattern ids; an id may repeat (its gradients are folded in order).
            gradients: ``[B, D]`` gradients.

        Raises:
            ValueError: wrong shape, non-finite values or a length that differs from the table's; nothing
                changes then.
        """
        if isinstance(pattern_ids, (torch.Tensor, np.ndarray)):
            if pattern_ids.ndim != 1:
                raise ValueError(f"pattern_ids must be 1-D [B], got shape {tuple(pattern_ids.shape)}")
            pattern_ids = pattern_ids.tolist()
        ids = [_as_id(i, "pattern_ids") for i in pattern_ids]
        if not ids:
            return
        G = as_embedding_batch(gradients, "gradients", dim=self._dim)
        if G.shape[0] != len(ids):
            raise ValueError(f"gradients must have one row per id ({len(ids)}), got {G.shape[0]}")
        self._ensure_dim(int(G.shape[1]))
        G = G.to(self.device, torch.float32)
        d = float(self.config.fisher_decay)
        rows = self._rows_for(ids)
        # repeated ids: fold their gradients in order, one occurrence per round
        remaining = torch.arange(len(ids), device=self.device)
        while remaining.numel():
            r = rows[remaining]
            # first occurrence of each row among the remaining positions
            uniq, inv = torch.unique(r, return_inverse=True)
            first = torch.full((uniq.numel(),), remaining.numel(), dtype=torch.int64, device=self.device)
            first.scatter_reduce_(0, inv, torch.arange(remaining.numel(), device=self.device), reduce="amin")
            take = remaining[first]
            rr = rows[take]
            g = G[take]
            self._ema[rr] = self._ema[rr] * d + (1.0 - d) * g * g
            self._diag[rr] = self._ema[rr]
            self._count[rr] += 1
            keep = torch.ones(remaining.numel(), dtype=torch.bool, device=self.device)
            keep[first] = False
            remaining = remaining[keep]

    def fisher(self, pattern_id: int) -> FisherInformation | None:
        """A copy of one pattern's Fisher information, or None when it has none."""
        row = self._row.get(int(pattern_id))
        if row is None:
            return None
        assert self._dim is not None
        f = FisherInformation(self._dim, device=self.device)
        f.diagonal.copy_(self._diag[row])
        f.ema_grad_squared.copy_(self._ema[row])
        f.sample_count = int(self._count[row])
        return f

    def set_fisher(self, pattern_id: int, info: FisherInformation) -> None:
        """Store ``info`` as a pattern's Fisher information (a copy)."""
        self._ensure_dim(info.dim)
        row = int(self._rows_for([int(pattern_id)])[0])
        self._diag[row] = info.diagonal.to(self.device, torch.float32)
        self._ema[row] = info.ema_grad_squared.to(self.device, torch.float32)
        self._count[row] = int(info.sample_count)

    def remove_fisher(self, pattern_ids: Iterable[int]) -> int:
        """Drop the Fisher information of these patterns; returns how many had some."""
        drop = {int(i) for i in pattern_ids} & self._row.keys()
        if not drop:
            return 0
        keep = [k for k, pid in enumerate(self._ids) if pid not in drop]
        idx = torch.tensor(keep, dtype=torch.int64, device=self.device)
        self._diag, self._ema, self._count = self._diag[idx], self._ema[idx], self._count[idx]
        self._ids = [self._ids[k] for k in keep]
        self._row = {pid: r for r, pid in enumerate(self._ids)}
        return len(drop)

    def fisher_means(self, pattern_ids: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([N] float64 mean Fisher diagonal, [N] bool has Fisher)`` for many ids (zeros where none).

        The lookup is one sort + ``searchsorted`` over the table's ids (no per-id Python work).
        """
        ids = torch.as_tensor(pattern_ids, dtype=torch.int64).reshape(-1).cpu()
        n = int(ids.numel())
        means = torch.zeros(n, dtype=torch.float64)
        if not self._ids or n == 0:
            return means, torch.zeros(n, dtype=torch.bool)
        key, order = torch.sort(torch.tensor(self._ids, dtype=torch.int64))  # table ids, sorted
        pos = torch.searchsorted(key, ids).clamp_(max=key.numel() - 1)
        has = key[pos] == ids
        if bool(has.any()):
            rows = order[pos[has]]
            means[has] = self._diag[rows.to(self.device)].double().mean(dim=1).cpu()
        return means, has

    def apply_constraint(self, pattern_id: int, gradient: Any) -> torch.Tensor:
        """EWC-constrained gradient ``g_i / (1 + λ·F_i)`` where ``F_i > 1e-8`` (``[D]``, a new tensor);
        ``g`` unchanged (copied) when the pattern has no Fisher information."""
        g = as_embedding(gradient, "gradient", dim=self._dim).to(torch.float32)
        row = self._row.get(int(pattern_id))
        if row is None:
            return g.clone()
        f = self._diag[row].to(g.device)
        return torch.where(f > _FISHER_EPS, g / (1.0 + self._lambda * f), g)

    def regularization_loss(self, pattern_id: int, current: Any, optimal: Any) -> float:
        """``λ/2 · Σ F_i (c_i − o_i)²`` (0 without Fisher information), computed in float64."""
        c = as_embedding(current, "current", dim=self._dim).double()
        o = as_embedding(optimal, "optimal", dim=int(c.numel())).double()
        row = self._row.get(int(pattern_id))
        if row is None:
            return 0.0
        f = self._diag[row].double().to(c.device)
        return float(self._lambda / 2.0 * (f * (c - o) ** 2).sum())

    def consolidate_fisher(self) -> None:
        """With ≥ 2 entries, replace them all by their mean (sample counts summed) under id 0."""
        if len(self._ids) < 2:
            return
        diag = self._diag.mean(dim=0, keepdim=True)
        ema = self._ema.mean(dim=0, keepdim=True)
        count = self._count.sum().reshape(1)
        self._diag, self._ema, self._count = diag, ema, count
        self._ids = [0]
        self._row = {0: 0}

    def stats(self) -> ConsolidatorStats:
        return ConsolidatorStats(
            fisher_entries=len(self._ids),
            current_lambda=self._lambda,
            consolidation_count=self._consolidations,
            total_consolidated=self._total_consolidated,
        )

    # ------------------------------------------------------------------ importance
    def importance_scores(self, patterns: Sequence[Pattern], now: datetime | None = None) -> list[ImportanceScore]:
        """Importance of every pattern, using this consolidator's Fisher information."""
        return ImportanceScore.compute_batch(
            patterns, [self.fisher(p.id) for p in patterns], self.config.max_unused_age_secs, now
        )

    def store_importance(self, store: PatternStore, now: datetime | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Importance (SPEC §4) of every live pattern of ``store`` in one tensor expression, with this
        consolidator's Fisher information; no Pattern objects are built.

        Returns:
            ``(ids [N] int64, scores [N] float64)`` in ascending id order, on the CPU.
        """
        now_us = dt_to_us(now if now is not None else utcnow())
        with store._lock:
            store._flush()
            cols = _store_columns(store, store._live_rows_by_id(), now_us)
        return cols[0], self._scores(*cols)

    def _scores(self, ids: Sequence[int] | torch.Tensor, usage, success, quality, age_secs) -> torch.Tensor:
        fm, has = self.fisher_means(ids)
        return importance_scores(
            usage.cpu(), success.cpu(), quality.cpu(), age_secs.cpu(), float(self.config.max_unused_age_secs), fm, has
        )

    # ------------------------------------------------------------------ pattern lists
    def prune_low_quality(self, patterns: Sequence[Pattern]) -> list[int]:
        """Ids with avg_quality < min_quality_threshold **and** usage < min_usage_for_importance."""
        c = self.config
        return [p.id for p in patterns if p.avg_quality < c.min_quality_threshold and p.usage_count < c.min_usage_for_importance]

    def merge_patterns(self, patterns: Sequence[Pattern]) -> Pattern:
        """Fold the patterns, in order, into a copy of the first (``Pattern.merge``)."""
        if not patterns:
            raise ValueError("patterns must not be empty")
        out = _copy_pattern(patterns[0])
        for p in patterns[1:]:
            out.merge(p)
        return out

    def _decide(
        self, ids: Sequence[int] | torch.Tensor, usage: torch.Tensor, success: torch.Tensor, quality: torch.Tensor,
        age_secs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Adapt λ, score every pattern and mark the pruned ones (rows in ascending id).

        Returns ``(scores [N] float64, pruned [N] bool, λ)``.
        """
        c = self.config
        lam = self.adapt_lambda(int((usage >= c.min_usage_for_importance).sum()))
        scores = self._scores(ids, usage, success, quality, age_secs)
        pruned = (scores < 0.2) & (quality.cpu().double() < c.min_quality_threshold)
        return scores, pruned, lam

    def _result(
        self,
        ids: list[int],
        scores: torch.Tensor,
        pruned: torch.Tensor,
        leader: torch.Tensor,
        lam: float,
        t0: float,
    ) -> ConsolidationResult:
        n = len(ids)
        pos = torch.arange(n)
        absorbed = (leader != pos) if n else torch.zeros(0, dtype=torch.bool)
        kept = ~absorbed & ~pruned
        lead_l = leader.tolist()
        merge_map = {ids[p]: ids[lead_l[p]] for p in torch.nonzero(absorbed).flatten().tolist()}
        pruned_ids = [ids[p] for p in torch.nonzero(pruned).flatten().tolist()]
        s_kept = scores[kept]
        s_pruned = scores[pruned]
        self._consolidations += 1
        self._total_consolidated += len(merge_map) + len(pruned_ids)
        return ConsolidationResult(
            merged_pattern_ids=list(merge_map),
            pruned_pattern_ids=pruned_ids,
            merge_map=merge_map,
            patterns_before=n,
            patterns_after=n - len(pruned_ids) - len(merge_map),
            importance_preserved=float(s_kept.sum()),
            timestamp=utcnow(),
            lambda_used=lam,
            stats=ConsolidationStats(
                merged_count=len(merge_map),
                pruned_count=len(pruned_ids),
                avg_pruned_importance=float(s_pruned.mean()) if s_pruned.numel() else 0.0,
                avg_kept_importance=float(s_kept.mean()) if s_kept.numel() else 0.0,
                processing_time_ms=(time.perf_counter() - t0) * 1000.0,
            ),
        )

    def consolidate_patterns(self, patterns: Sequence[Pattern], now: datetime | None = None) -> ConsolidationResult:
        """Decide what a consolidation of ``patterns`` does, without changing them (SPEC §4).

        Pruned: importance < 0.2 **and** avg_quality < min_quality_threshold. Merged: the leader scan of
        ``merge_similar`` in ascending id, only within one category, with merge_similarity_threshold,
        pruned patterns excluded. All embeddings must have one length.
        """
        t0 = time.perf_counter()
        pats = sorted(patterns, key=lambda p: p.id)
        if len({p.id for p in pats}) != len(pats):
            raise ValueError("patterns must have distinct ids")
        n = len(pats)
        if n:
            dims = {int(p.embedding.numel()) for p in pats}
            if len(dims) != 1:
                raise ValueError(f"patterns must have embeddings of one length, got lengths {sorted(dims)}")
            emb = torch.stack([p.embedding.reshape(-1).to(self.device, torch.float32) for p in pats])
        else:
            emb = torch.empty(0, 1, device=self.device)
        codes: dict[str, int] = {}
        cats = torch.tensor([codes.setdefault(p.category.name, len(codes)) for p in pats], dtype=torch.int64)
        usage, success, quality, age = ImportanceScore._columns(pats, now)
        ids = [p.id for p in pats]
        scores, pruned, lam = self._decide(ids, usage, success, quality, age)
        leader = torch.empty(0, dtype=torch.int64)
        if n:
            from .kernels.pairs import leader_scan, pairs_above

            pairs = pairs_above(emb, float(self.config.merge_similarity_threshold), cats.to(emb.device))
            leader = leader_scan(n, pairs.cpu(), ~pruned).cpu()
        return self._result(ids, scores, pruned, leader, lam, t0)

    def consolidate_store(self, store: PatternStore, *, group: Any = None, distributed: bool = False) -> ConsolidationResult:
        """Consolidate a :class:`~rbank_torch.store.PatternStore` in place: decide as
        :meth:`consolidate_patterns` on its columns, fold every absorbed pattern into its leader
        (statistics, lessons, actions, embeddings, as ``Pattern.merge``), remove the pruned ones, and
        fold the Fisher information of absorbed patterns into their leaders (usage-weighted).

        Args:
            store: the store to consolidate.
            group, distributed: with ``distributed=True`` (or a ``group``), every rank of the process group
                calls this on its copy of the same store and consolidator: the pair search is split across
                the ranks (:func:`rbank_torch.distributed.leaders_distributed`), rank 0's pruning decision is
                broadcast, and every rank applies the identical result (equal to the one-process run).
        """
        if distributed or group is not None:
            return self._consolidate_store_distributed(store, group)
        t0 = time.perf_counter()
        with store._mutating():
            store._flush()
            rows = store._live_rows_by_id()
            cols = _store_columns(store, rows, dt_to_us(utcnow()))
            scores, pruned, lam = self._decide(*cols)
            leader = store._leaders(float(self.config.merge_similarity_threshold), True, ~pruned, rows=rows)[1]
            return self._apply_store(store, rows, cols[0], cols[1], scores, pruned, leader, lam, t0)

    def _consolidate_store_distributed(self, store: PatternStore, group: Any) -> ConsolidationResult:
        from . import distributed as D

        t0 = time.perf_counter()
        w = D.world_info(group)
        with store._mutating():
            store._flush()
            rows = store._live_rows_by_id()
            now_us = int(D._broadcast_tensor(w, torch.tensor([dt_to_us(utcnow())]), (1,), torch.int64, 0,
                                             "consolidation clock")[0])
            cols = _store_columns(store, rows, now_us)
            ids, usage = cols[0], cols[1]
            D._check_same(w, "consolidation inputs", n=int(ids.numel()), ids=D._fingerprint(ids.tolist()),
                          dim=int(store._emb.shape[1]))
            scores, pruned, lam = self._decide(*cols)
            pruned = D._broadcast_tensor(w, pruned, (int(ids.numel()),), torch.bool, 0, "consolidation pruning")
            leader = D.leaders_distributed(
                store._emb[rows], float(self.config.merge_similarity_threshold),
                store._cat[rows].to(torch.int64), ~pruned, group=group,
            )
            return self._apply_store(store, rows, ids, usage, scores, pruned, leader, lam, t0)

    def _apply_store(
        self, store: PatternStore, rows: torch.Tensor, ids: torch.Tensor, usage: torch.Tensor, scores: torch.Tensor,
        pruned: torch.Tensor, leader: torch.Tensor, lam: float, t0: float,
    ) -> ConsolidationResult:
        """Fold, prune and move Fisher information as decided (the caller holds ``store._mutating()``)."""
        id_list = ids.tolist()
        result = self._result(id_list, scores, pruned, leader, lam, t0)
        # Fisher information follows the merge (before the fold changes the usage counts)
        if result.merge_map and self._ids:
            u_of = dict(zip(id_list, usage.tolist()))
            running: dict[int, int] = {}
            for src, dst in result.merge_map.items():
                fs = self.fisher(src)
                if fs is None:
                    continue
                fd = self.fisher(dst)
                ud = running.get(dst, u_of[dst])
                us = u_of[src]
                if fd is None:
                    self.set_fisher(dst, fs)
                elif ud + us > 0:
                    fd.merge(fs, ud / (ud + us))
                    self.set_fisher(dst, fd)
                running[dst] = ud + us
        store._fold(rows, leader)
        if result.pruned_pattern_ids:
            store.remove_patterns(result.pruned_pattern_ids)
        self.remove_fisher(result.pruned_pattern_ids + result.merged_pattern_ids)
        result.stats.processing_time_ms = (time.perf_counter() - t0) * 1000.0
        return result

    # ------------------------------------------------------------------ snapshots
    def state_tensors(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON metadata of the Fisher table, λ and the counters (for the bank snapshot)."""
        t = {
            f"{prefix}fisher_ids": torch.tensor(self._ids, dtype=torch.int64),
            f"{prefix}fisher_diag": self._diag.detach().cpu().contiguous(),
            f"{prefix}fisher_ema": self._ema.detach().cpu().contiguous(),
            f"{prefix}fisher_count": self._count.detach().cpu().contiguous(),
        }
        meta = {
            "format": _CONSOLIDATOR_FORMAT,
            "dim": self._dim,
            "lambda": self._lambda,
            "consolidation_count": self._consolidations,
            "total_consolidated": self._total_consolidated,
        }
        return t, meta

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = "") -> None:
        """Restore what :meth:`state_tensors` wrote; raises ``ValueError`` on inconsistent shapes."""
        if int(meta.get("format", 0)) != _CONSOLIDATOR_FORMAT:
            raise ValueError(f"unsupported consolidator state format {meta.get('format')!r}")
        try:
            ids = tensors[f"{prefix}fisher_ids"]
            diag = tensors[f"{prefix}fisher_diag"]
            ema = tensors[f"{prefix}fisher_ema"]
            count = tensors[f"{prefix}fisher_count"]
        except KeyError as e:
            raise ValueError(f"consolidator state lacks tensor {e.args[0]!r}") from None
        dim = meta.get("dim")
        n = int(ids.numel())
        if ids.dtype != torch.int64 or count.dtype != torch.int64 or ids.dim() != 1 or count.shape != (n,):
            raise ValueError("consolidator state: fisher_ids / fisher_count must be int64 [N]")
        if n and (dim is None or diag.shape != (n, int(dim)) or ema.shape != (n, int(dim))):
            raise ValueError(f"consolidator state: fisher tensors must be [{n}, {dim}]")
        if diag.dtype != torch.float32 or ema.dtype != torch.float32:
            raise ValueError("consolidator state: fisher tensors must be float32")
        lam = check_finite_number(meta.get("lambda", self.config.lambda_), "lambda")
        self._dim = None if dim is None else int(dim)
        self._ids = ids.tolist()
        if len(set(self._ids)) != n:
            raise ValueError("consolidator state: fisher_ids must be distinct")
        self._row = {pid: r for r, pid in enumerate(self._ids)}
        D = self._dim or 0
        self._diag = diag.reshape(n, D).to(self.device)
        self._ema = ema.reshape(n, D).to(self.device)
        self._count = count.to(self.device)
        self._lambda = self._clamp(lam)
        self._consolidations = int(meta.get("consolidation_count", 0))
        self._total_consolidated = int(meta.get("total_consolidated", 0))


def _copy_pattern(p: Pattern) -> Pattern:
    import copy

    q = copy.deepcopy(p)
    q.embedding = p.embedding.clone()
    return q


# ----------------------------------------------------------------------------------------------------------
# Pattern extraction by clustering
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ClusterPattern:
    """One cluster found by :func:`cluster_patterns`.

    Attributes:
        pattern: the centroid as a :class:`Pattern` (embedding = centroid, usage_count = size,
            avg_quality = confidence = mean quality, source_trajectories = member ids, source "cluster").
        size: number of members.
        mean_quality: mean quality of the members.
        member_ids: ids of the members, ascending.
    """

    pattern: Pattern
    size: int
    mean_quality: float
    member_ids: list[int]

    @property
    def centroid(self) -> torch.Tensor:
        """``[D]`` cluster centre."""
        return self.pattern.embedding


def cluster_patterns(
    embeddings: Any,
    k: int,
    quality: Any = None,
    *,
    ids: Sequence[int] | torch.Tensor | None = None,
    category: PatternCategory | str = "general",
    seed: int = 0,
    iters: int = 50,
    spherical: bool = True,
    device: torch.device | str | None = None,
    distributed: bool = False,
    group: Any = None,
) -> list[ClusterPattern]:
    """Learn ``k`` centroid patterns from embeddings by k-means (k-means++ seeding, deterministic for a seed).

    The k-means is :func:`rbank_torch.distributed.kmeans_exact` (exact centroid sums), so a sharded run
    (``distributed=True`` under ``torchrun``: each rank passes its rows, rank order = row order) returns the
    same clusters, centroids and members, bit for bit, as this function on all the rows in one process.

    Args:
        embeddings: ``[N, D]`` embeddings (e.g. trajectory query embeddings).
        k: number of clusters, ``1 <= k <= N``.
        quality: optional ``[N]`` qualities in [0, 1] (default 1.0 each).
        ids: optional ``[N]`` member ids (default ``0..N-1``).
        category: category of the centroid patterns.
        seed: seed of k-means++ seeding.
        iters: maximum Lloyd iterations.
        spherical: cosine k-means on unit rows (the default, matching cosine search).
        device: where to cluster (default: the embeddings' device).
        distributed, group: rows sharded across the ranks of ``group`` (default group with
            ``distributed=True``); ``quality`` and ``ids`` are this rank's too. Every rank gets the result.

    Returns:
        One :class:`ClusterPattern` per non-empty cluster, largest first (ties: lower cluster index).
    """
    from . import distributed as D

    X = as_embedding_batch(embeddings, "embeddings")
    if device is not None:
        X = X.to(device)
    X = X.to(torch.float32)
    n = int(X.shape[0])
    sharded = distributed or group is not None
    if not sharded and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max(n, 1) or n == 0):
        raise ValueError(f"k must be an int within [1, N={n}], got {k!r}")
    if quality is None:
        q = torch.ones(n, dtype=torch.float64)
    else:
        q = torch.as_tensor(quality, dtype=torch.float64).reshape(-1).cpu()
        if q.numel() != n:
            raise ValueError(f"quality must have one value per embedding ({n}), got {q.numel()}")
        if not bool(torch.isfinite(q).all()) or bool((q < 0).any()) or bool((q > 1).any()):
            raise ValueError("quality must hold finite values within [0, 1]")
    if ids is None:
        id_t = torch.arange(n, dtype=torch.int64)
    else:
        id_t = torch.as_tensor(ids.tolist() if isinstance(ids, torch.Tensor) else list(ids), dtype=torch.int64)
        if id_t.numel() != n:
            raise ValueError(f"ids must have one value per embedding ({n}), got {id_t.numel()}")
    cat = PatternCategory.parse(category)
    if sharded:
        res = D.kmeans_distributed(X, k, iters=iters, seed=seed, spherical=spherical, group=group)
        w = D.world_info(group)
        if ids is None:  # default ids are global row numbers: offset by the rows of lower ranks
            counts = D._all_gather_i64(w, [n], "cluster row counts")[:, 0]
            id_t = id_t + int(counts[: w.rank].sum())
        blob = D._pack({"a": res.assignments.cpu(), "i": id_t, "q": q}, None)
        parts = [D._unpack(b, f"cluster members of rank {r}")[0]
                 for r, b in enumerate(D._exchange(w, [blob] * w.world_size, "cluster members"))]
        assign = torch.cat([t["a"] for t in parts])
        id_t = torch.cat([t["i"] for t in parts])
        q = torch.cat([t["q"] for t in parts])
    else:
        res = D.kmeans_exact(X, k, iters=iters, seed=seed, spherical=spherical)
        assign = res.assignments.cpu()
    sizes = torch.bincount(assign, minlength=k)
    qsum = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, q)
    order = sorted(range(k), key=lambda c: (-int(sizes[c]), c))
    by_cluster = torch.argsort(assign, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    out: list[ClusterPattern] = []
    now = utcnow()
    for c in order:
        m = int(sizes[c])
        if m == 0:
            continue
        members = sorted(id_t[by_cluster[int(starts[c]) : int(starts[c]) + m]].tolist())
        mq = float(qsum[c]) / m
        mq = min(max(mq, 0.0), 1.0)
        pat = Pattern(
            id=next_id(),
            uuid=str(_uuid.uuid4()),
            embedding=res.centroids[c].detach().clone(),
            category=cat,
            confidence=mq,
            usage_count=m,
            success_count=0,
            avg_quality=mq,
            source_trajectories=members,
            created_at=now,
            last_accessed=now,
            metadata=PatternMetadata(source="cluster", attributes={"cluster_size": str(m)}),
        )
        out.append(ClusterPattern(pat, m, mq, members))
    return out

