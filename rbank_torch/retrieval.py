"""Agent-memory retrieval on columns (SPEC §7, DESIGN "Agent memory on columns").

* :class:`FilterSpec`: the filters of ``ReasoningBank.search`` (``where``, ``category``, ``outcome``,
  ``tags``, ``since``/``until``, ``min_quality``), validated once and compiled to one boolean mask over
  the store's columns, on the store's device.
* :class:`RetrievalScoring`: similarity, recency, quality and usage weights; a tensor expression per row.
* :func:`mmr_select`: maximal marginal relevance, batched, with the candidates' cosines from one GEMM.

Nothing here loops over patterns in Python except the tag lists of a ``tags`` filter (rows per tag are
kept by the store, so a filter costs the matching rows, not the store).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch

from ._util import dt_to_us, utcnow
from .patterns import OUTCOMES, PatternCategory

__all__ = ["RetrievalScoring", "FilterSpec", "AttributeColumn", "mmr_select", "value_key"]

_RANGE_OPS = ("$gte", "$gt", "$lte", "$lt")


def value_key(v: Any) -> tuple[str, Any]:
    """Typed key of an attribute value: ``1`` and ``1.0`` are one number; ``True``, ``1`` and ``"1"`` differ."""
    if isinstance(v, bool):
        return ("b", v)
    if isinstance(v, (int, float)):
        return ("n", float(v))
    return ("s", v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class AttributeColumn:
    """One metadata attribute, dictionary-encoded: ``codes`` ``[cap]`` int32 (−1 = absent), ``num`` ``[cap]``
    float64 (the value of numbers, NaN otherwise) and the table of distinct values (``values[code]``;
    ``index`` maps :func:`value_key` of a value to its code)."""

    __slots__ = ("codes", "num", "values", "index")

    def __init__(self, cap: int, device: torch.device) -> None:
        self.codes = torch.full((cap,), -1, dtype=torch.int32, device=device)
        self.num = torch.full((cap,), math.nan, dtype=torch.float64, device=device)
        self.values: list[Any] = []
        self.index: dict[tuple[str, Any], int] = {}

    def code(self, v: Any) -> int:
        """Code of ``v`` (a new one when unseen)."""
        key = value_key(v)
        c = self.index.get(key)
        if c is None:
            c = len(self.values)
            self.index[key] = c
            self.values.append(v)
        return c

    def grow(self, new_cap: int, n: int) -> None:
        codes = torch.full((new_cap,), -1, dtype=torch.int32, device=self.codes.device)
        num = torch.full((new_cap,), math.nan, dtype=torch.float64, device=self.codes.device)
        codes[:n] = self.codes[:n]
        num[:n] = self.num[:n]
        self.codes, self.num = codes, num

    @staticmethod
    def number(v: Any) -> float:
        return float(v) if _is_number(v) else math.nan


@dataclass(frozen=True)
class RetrievalScoring:
    """How ``ReasoningBank.search`` ranks (SPEC §7)::

        score = similarity·cos + recency·2^(−age/half_life_secs) + quality·avg_quality
                + usage·log1p(usage_count)/log1p(max usage_count of the live patterns)

    ``age`` is the time since the pattern was created (the field ``since``/``until`` bound). The default
    ``RetrievalScoring()`` ranks by similarity alone.
    """

    similarity: float = 1.0
    recency: float = 0.0
    half_life_secs: float = 7 * 86_400.0
    quality: float = 0.0
    usage: float = 0.0

    def __post_init__(self) -> None:
        for name in ("similarity", "recency", "quality", "usage", "half_life_secs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"RetrievalScoring.{name} must be a finite number, got {v!r}")
        if self.half_life_secs <= 0:
            raise ValueError(f"RetrievalScoring.half_life_secs must be > 0, got {self.half_life_secs!r}")

    @property
    def is_plain(self) -> bool:
        """Ranks by similarity alone (the score is the similarity)."""
        return self.similarity == 1.0 and self.recency == 0.0 and self.quality == 0.0 and self.usage == 0.0

    def row_bias(self, created_us: torch.Tensor, avg_quality: torch.Tensor, usage: torch.Tensor,
                 max_usage: int) -> torch.Tensor:
        """The part of the score that does not depend on the query, ``[n]`` float32 (same rows as the inputs)."""
        out = torch.zeros(created_us.shape, dtype=torch.float64, device=created_us.device)
        if self.recency:
            age = (dt_to_us(utcnow()) - created_us).double().clamp(min=0) / 1e6
            out += self.recency * torch.exp2(-age / self.half_life_secs)
        if self.quality:
            out += self.quality * avg_quality
        if self.usage and max_usage > 0:
            out += self.usage * torch.log1p(usage.double()) / math.log1p(max_usage)
        return out.float()


def _as_list(v: Any) -> list[Any]:
    if isinstance(v, (list, tuple, set, frozenset)):
        return list(v)
    return [v]


def _time_us(v: Any, name: str) -> int:
    if isinstance(v, datetime):
        if v.tzinfo is None:
            raise ValueError(f"{name} must be a timezone-aware datetime (or a POSIX timestamp), got a naive one")
        return dt_to_us(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return int(round(float(v) * 1e6))
    raise ValueError(f"{name} must be a timezone-aware datetime or a POSIX timestamp in seconds, got {v!r}")


@dataclass
class FilterSpec:
    """Validated filters (ANDed). Build with :meth:`parse`; :meth:`mask` compiles them over the columns."""

    where: list[tuple[str, str, Any]]  # (attribute, op, operand): op "eq", "in" (list), "$gte", …
    categories: list[str] | None
    outcomes: list[int] | None
    tags: list[str]
    since_us: int | None
    until_us: int | None
    min_quality: float | None

    @property
    def empty(self) -> bool:
        return (not self.where and self.categories is None and self.outcomes is None and not self.tags
                and self.since_us is None and self.until_us is None and self.min_quality is None)

    @classmethod
    def parse(cls, where: Any = None, category: Any = None, outcome: Any = None, tags: Any = None,
              since: Any = None, until: Any = None, min_quality: Any = None) -> FilterSpec:
        """Validate the filters of SPEC §7; bad input raises ``ValueError`` naming the filter."""
        conds: list[tuple[str, str, Any]] = []
        if where is not None:
            if not isinstance(where, dict):
                raise ValueError(f"where must be a dict of attribute → value or operator dict, got {type(where).__name__}")
            for key, cond in where.items():
                if not isinstance(key, str) or not key:
                    raise ValueError(f"where: attribute names must be non-empty strings, got {key!r}")
                if isinstance(cond, dict):
                    if not cond:
                        raise ValueError(f"where[{key!r}]: an operator dict needs at least one operator")
                    for op, operand in cond.items():
                        if op == "$in":
                            if not isinstance(operand, (list, tuple, set, frozenset)):
                                raise ValueError(f"where[{key!r}]['$in'] must be a list of values, got {operand!r}")
                            vals = list(operand)
                            for v in vals:
                                _check_value(v, f"where[{key!r}]['$in']")
                            conds.append((key, "in", vals))
                        elif op in _RANGE_OPS:
                            if not _is_number(operand) or not math.isfinite(float(operand)):
                                raise ValueError(f"where[{key!r}][{op!r}] must be a finite number, got {operand!r}")
                            conds.append((key, op, float(operand)))
                        elif op == "$eq":
                            _check_value(operand, f"where[{key!r}]['$eq']")
                            conds.append((key, "eq", operand))
                        else:
                            raise ValueError(f"where[{key!r}]: unknown operator {op!r}: expected one of "
                                             f"{['$eq', '$in', *_RANGE_OPS]}")
                else:
                    _check_value(cond, f"where[{key!r}]")
                    conds.append((key, "eq", cond))
        cats = None
        if category is not None:
            cats = [PatternCategory.parse(c).name for c in _as_list(category)]
        outs = None
        if outcome is not None:
            outs = []
            for o in _as_list(outcome):
                if o not in OUTCOMES:
                    raise ValueError(f"outcome must be one of {list(OUTCOMES)} (or a list of them), got {o!r}")
                outs.append(OUTCOMES.index(o))
        tag_l: list[str] = []
        if tags is not None:
            for t in _as_list(tags):
                if not isinstance(t, str):
                    raise ValueError(f"tags must be strings, got {t!r}")
                tag_l.append(t)
        since_us = None if since is None else _time_us(since, "since")
        until_us = None if until is None else _time_us(until, "until")
        mq = None
        if min_quality is not None:
            if not _is_number(min_quality) or not math.isfinite(float(min_quality)):
                raise ValueError(f"min_quality must be a finite number, got {min_quality!r}")
            mq = float(min_quality)
        return cls(conds, cats, outs, tag_l, since_us, until_us, mq)

    def mask(self, n: int, alive: torch.Tensor, category: torch.Tensor, category_codes: dict[str, int],
             outcome: torch.Tensor, created_us: torch.Tensor, avg_quality: torch.Tensor,
             attrs: dict[str, AttributeColumn], tag_rows: dict[str, list[int]]) -> torch.Tensor | None:
        """``[n]`` bool: live rows matching every filter (None when there is no filter)."""
        if self.empty:
            return None
        dev = alive.device
        m = alive[:n].clone()
        if self.categories is not None:
            codes = [category_codes[c] for c in self.categories if c in category_codes]
            if not codes:
                return torch.zeros(n, dtype=torch.bool, device=dev)
            m &= _isin(category[:n], codes)
        if self.outcomes is not None:
            m &= _isin(outcome[:n], self.outcomes)
        if self.since_us is not None:
            m &= created_us[:n] >= self.since_us
        if self.until_us is not None:
            m &= created_us[:n] <= self.until_us
        if self.min_quality is not None:
            m &= avg_quality[:n] >= self.min_quality
        for key, op, operand in self.where:
            col = attrs.get(key)
            if col is None:
                return torch.zeros(n, dtype=torch.bool, device=dev)
            if op == "eq" or op == "in":
                vals = [operand] if op == "eq" else operand
                codes = [c for c in (col.index.get(value_key(v)) for v in vals) if c is not None]
                if not codes:
                    return torch.zeros(n, dtype=torch.bool, device=dev)
                m &= _isin(col.codes[:n], codes)
            else:
                num = col.num[:n]  # NaN (absent or not a number) fails every comparison
                if op == "$gte":
                    m &= num >= operand
                elif op == "$gt":
                    m &= num > operand
                elif op == "$lte":
                    m &= num <= operand
                else:
                    m &= num < operand
        for t in self.tags:
            rows = tag_rows.get(t)
            if not rows:
                return torch.zeros(n, dtype=torch.bool, device=dev)
            has = torch.zeros(n, dtype=torch.bool, device=dev)
            idx = torch.tensor(rows, dtype=torch.int64, device=dev)
            has[idx[idx < n]] = True
            m &= has
        return m


def _check_value(v: Any, name: str) -> None:
    if isinstance(v, (str, bool)):
        return
    if _is_number(v) and math.isfinite(float(v)):
        return
    raise ValueError(f"{name} must be a str, int, float or bool, got {v!r}")


def _isin(col: torch.Tensor, codes: Sequence[int]) -> torch.Tensor:
    if len(codes) == 1:
        return col == codes[0]
    return torch.isin(col, torch.tensor(list(codes), dtype=col.dtype, device=col.device))


def mmr_select(scores: torch.Tensor, unit_emb: torch.Tensor, lam: float, k: int) -> torch.Tensor:
    """Maximal marginal relevance, batched (SPEC §7).

    Args:
        scores: ``[B, P]`` candidate scores (−inf marks an empty slot).
        unit_emb: ``[B, P, D]`` the candidates' unit-length embeddings (their cosines come from one GEMM).
        lam: λ in (0, 1]: each pick maximises λ·score − (1−λ)·(max cosine to the already picked).
        k: picks per query.

    Returns:
        ``[B, k']`` positions into the candidates in pick order (k' = min(k, P)); −1 where a query ran out
        of candidates.
    """
    B, P = scores.shape
    kk = min(k, P)
    out = torch.full((B, kk), -1, dtype=torch.int64, device=scores.device)
    if kk == 0:
        return out
    sim = torch.bmm(unit_emb.float(), unit_emb.float().transpose(1, 2))  # [B, P, P]
    s = scores.float()
    valid = torch.isfinite(s)
    max_sim = torch.zeros_like(s)
    picked = torch.zeros_like(valid)
    rows = torch.arange(B, device=scores.device)
    for i in range(kk):
        val = lam * s - (1.0 - lam) * max_sim
        val = val.masked_fill(~valid | picked, float("-inf"))
        j = torch.argmax(val, dim=1)  # first maximum: the better-scored candidate wins a tie
        ok = torch.isfinite(val[rows, j])
        out[:, i] = torch.where(ok, j, torch.full_like(j, -1))
        picked[rows, j] |= ok
        max_sim = torch.maximum(max_sim, sim[rows, j])
    return out
