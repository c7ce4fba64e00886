"""Memory distillation (SPEC §5): key lessons from many trajectories, compressed trajectories.

:class:`MemoryDistiller` consumes trajectories in chunks (:meth:`MemoryDistiller.add`) and keeps only a
columnar table of the distinct lesson texts seen so far plus the compressed trajectories, then
:meth:`MemoryDistiller.finish` orders, deduplicates (:func:`rbank_torch.dedup.greedy_dedup`) and
truncates the lessons. :meth:`MemoryDistiller.extract_key_lessons` is the one-shot form; any chunking
gives the same result, and partial states of several shards merge into the same result as one pass.

Exactness: the statistics of a lesson are kept as integer sums (importance in tenths, successes,
quality in fixed point of 2**-32 per observation, times in microseconds), so the order and grouping
of the observations never change a result.

Size estimate (documented in ``docs/distillation.md``):

* trajectory: ``256`` + tensor bytes of the query and response embeddings + UTF-8 bytes of its lessons
  + per step ``96`` + UTF-8 bytes of action and rationale + tensor bytes of the step's context embedding;
* compressed trajectory: ``128`` + tensor bytes of the key embedding + UTF-8 bytes of its lessons and
  key actions.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import torch

from ._util import as_embedding, check_unit, dt_to_us, us_to_dt, utcnow
from .categories import category_name
from .dedup import cosine_of_record, greedy_dedup, jaccard_of_record, words_of
from .patterns import BUILTIN_CATEGORIES, PatternCategory
from .trajectory import StepOutcomeKind, Trajectory
from .verdicts import Verdict, VerdictKind, failure_lesson

__all__ = [
    "DistillationError",
    "DistillationConfig",
    "CompressedTrajectory",
    "KeyLesson",
    "DistillationResult",
    "TrajectorySummary",
    "DistillerStats",
    "DistillationPartial",
    "MemoryDistiller",
    "infer_category",
    "estimate_trajectory_size",
]

#: fixed bytes counted per trajectory record, per step and per compressed trajectory
TRAJECTORY_OVERHEAD_BYTES = 256
STEP_OVERHEAD_BYTES = 96
COMPRESSED_OVERHEAD_BYTES = 128
#: with ``readable_lessons``, the lesson of every Recovered trajectory: one text whatever the number of
#: attempts, so that all recoveries count as observations of one lesson instead of one near-duplicate per
#: attempt count (SPEC §5's text, "Recovery possible after <n> attempts via reflection", is the default)
RECOVERY_LESSON = "Recovery possible via reflection"
#: most example actions a lesson keeps
MAX_EXAMPLE_ACTIONS = 10
_Q_SCALE = 1 << 32  # quality fixed point: one unit = 2**-32
_CAT_NAMES = BUILTIN_CATEGORIES
_CAT_CODE = {n: i for i, n in enumerate(_CAT_NAMES)}
_CATS = [PatternCategory(n) for n in _CAT_NAMES]
_C_GENERAL = _CAT_CODE["general"]
_C_CODE = _CAT_CODE["code_generation"]
_C_RESEARCH = _CAT_CODE["research"]
_C_TOOL = _CAT_CODE["tool_use"]
_C_ERROR = _CAT_CODE["error_recovery"]
_C_REFLECTION = _CAT_CODE["reflection"]
_SUCCESS_STEP = StepOutcomeKind.SUCCESS
_V_FAILURE = VerdictKind.FAILURE
_V_RECOVERED = VerdictKind.RECOVERED
_V_SUCCESS = VerdictKind.SUCCESS


class DistillationError(ValueError):
    """Distillation cannot run (for example: fewer trajectories than ``min_trajectories_for_distillation``)."""


def _utf8_len(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------
# Config and result types.


@dataclass
class DistillationConfig:
    """Settings of :class:`MemoryDistiller` (defaults of SPEC §5).

    Attributes:
        min_age_for_distillation_secs: :meth:`MemoryDistiller.compress_old_trajectories` takes trajectories
            started at least this long ago.
        compression_ratio: target share of memory to keep (informational; the result reports the
            achieved ratio).
        min_quality_threshold: trajectories with quality ≥ this are kept in compressed form.
        max_lessons: at most this many key lessons per distillation.
        min_trajectories_for_distillation: fewer trajectories raise :class:`DistillationError`.
        deduplicate_lessons: merge similar lessons (``0.6·jaccard + 0.4·cosine > threshold``).
        dedup_similarity_threshold: the threshold of that rule.
    """

    min_age_for_distillation_secs: int = 86_400
    compression_ratio: float = 0.1
    min_quality_threshold: float = 0.4
    max_lessons: int = 100
    min_trajectories_for_distillation: int = 100
    deduplicate_lessons: bool = True
    dedup_similarity_threshold: float = 0.85
    #: False: the lesson texts of SPEC §5 word for word; True: one recovery lesson whatever the number of
    #: attempts (:data:`RECOVERY_LESSON`) — what the ``rbank distill`` command writes
    readable_lessons: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        for name in ("min_age_for_distillation_secs", "max_lessons", "min_trajectories_for_distillation"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                if isinstance(v, float) and v.is_integer():
                    v = int(v)
                    setattr(self, name, v)
                else:
                    raise ValueError(f"{name} must be an integer, got {v!r}")
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
            setattr(self, name, int(v))
        self.compression_ratio = check_unit(self.compression_ratio, "compression_ratio")
        self.min_quality_threshold = check_unit(self.min_quality_threshold, "min_quality_threshold")
        if not isinstance(self.deduplicate_lessons, (bool, np.bool_)):
            raise ValueError(f"deduplicate_lessons must be a bool, got {self.deduplicate_lessons!r}")
        self.deduplicate_lessons = bool(self.deduplicate_lessons)
        thr = self.dedup_similarity_threshold
        if isinstance(thr, bool):
            raise ValueError(f"dedup_similarity_threshold must be a number, got {thr!r}")
        try:
            thr = float(thr)
        except (TypeError, ValueError):
            raise ValueError(f"dedup_similarity_threshold must be a number, got {thr!r}") from None
        if not math.isfinite(thr):
            raise ValueError(f"dedup_similarity_threshold must be finite, got {thr}")
        self.dedup_similarity_threshold = thr
        if not isinstance(self.readable_lessons, bool):
            raise ValueError(f"readable_lessons must be a bool, got {self.readable_lessons!r}")


@dataclass(slots=True)
class CompressedTrajectory:
    """The compact form of one trajectory (no steps).

    Attributes:
        original_id: the trajectory's id.
        key_embedding: ``[D]`` copy of its query embedding.
        verdict, quality, lessons: as in the trajectory.
        key_actions: up to 5 actions of successful steps, in step order.
        timestamp: the trajectory's ``started_at``.
        step_count: number of steps of the trajectory.
        category: category of SPEC §5 (:func:`infer_category`).
        compressed_at: when the compressed form was made.
    """

    original_id: int
    key_embedding: torch.Tensor
    verdict: Verdict
    quality: float
    lessons: list[str]
    key_actions: list[str]
    timestamp: datetime
    step_count: int
    category: PatternCategory
    compressed_at: datetime = field(default_factory=utcnow)

    def estimated_size(self) -> int:
        """Estimated bytes of this record (see the module docstring)."""
        return (
            COMPRESSED_OVERHEAD_BYTES
            + self.key_embedding.numel() * self.key_embedding.element_size()
            + sum(_utf8_len(s) for s in self.lessons)
            + sum(_utf8_len(s) for s in self.key_actions)
        )

    @classmethod
    def from_trajectory(cls, t: Trajectory) -> CompressedTrajectory:
        """Compress one trajectory (for many at once :meth:`MemoryDistiller.compress` is faster)."""
        return cls(
            original_id=int(t.id),
            key_embedding=as_embedding(t.query_embedding, "query_embedding").clone(),
            verdict=t.verdict,
            quality=float(t.quality),
            lessons=list(t.lessons),
            key_actions=[s.action for s in t.steps if s.outcome.kind is _SUCCESS_STEP][:5],
            timestamp=t.started_at,
            step_count=len(t.steps),
            category=infer_category(t),
        )


@dataclass
class KeyLesson:
    """A lesson distilled from one or more trajectories.

    Attributes:
        content: the lesson text.
        embedding: ``[D]`` query embedding of its first observation.
        category: category of its first observation.
        importance: count-weighted mean importance (0.5, Failure lessons 0.8, recovery lessons 0.9).
        observation_count: how many times it was observed.
        success_rate: share of observations from trajectories whose ``is_success`` holds.
        avg_quality: count-weighted mean quality of those trajectories.
        example_actions: up to 10 distinct actions of successful steps.
        tags: tags of its first observation's trajectory.
        source_trajectories: ids of the trajectories it was observed in (distinct, first-seen order).
        first_observed, last_observed: earliest and latest observation (``completed_at``, else
            ``started_at`` of the trajectory).
    """

    content: str
    embedding: torch.Tensor
    category: PatternCategory
    importance: float = 0.5
    observation_count: int = 1
    success_rate: float = 0.0
    avg_quality: float = 0.0
    example_actions: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    source_trajectories: list[int] = field(default_factory=list)
    first_observed: datetime = field(default_factory=utcnow)
    last_observed: datetime = field(default_factory=utcnow)

    @classmethod
    def new(cls, content: str, embedding: Any, category: PatternCategory | str) -> KeyLesson:
        """A lesson with the defaults: importance 0.5, one observation, success_rate 0, avg_quality 0."""
        if not isinstance(content, str):
            raise ValueError(f"content must be a string, got {type(content).__name__}")
        now = utcnow()
        return cls(
            content=content,
            embedding=as_embedding(embedding, "embedding"),
            category=PatternCategory.parse(category),
            first_observed=now,
            last_observed=now,
        )

    def merge(self, other: KeyLesson) -> None:
        """Fold another observation of this lesson in: counts add, importance/success_rate/avg_quality
        become count-weighted means, source ids and example actions (≤ 10) are unioned in order,
        the observation times widen. Text, embedding, category and tags stay."""
        n1, n2 = int(self.observation_count), int(other.observation_count)
        n = n1 + n2
        if n <= 0:
            return
        self.importance = (self.importance * n1 + other.importance * n2) / n
        self.success_rate = (self.success_rate * n1 + other.success_rate * n2) / n
        self.avg_quality = (self.avg_quality * n1 + other.avg_quality * n2) / n
        self.observation_count = n
        seen = set(self.source_trajectories)
        for i in other.source_trajectories:
            if i not in seen:
                seen.add(i)
                self.source_trajectories.append(i)
        _union_actions(self.example_actions, other.example_actions)
        self.first_observed = min(self.first_observed, other.first_observed)
        self.last_observed = max(self.last_observed, other.last_observed)

    def content_similarity(self, other: KeyLesson) -> float:
        """Word-Jaccard of the lower-cased whitespace-split texts."""
        return jaccard_of_record(words_of(self.content), words_of(other.content))

    def embedding_similarity(self, other: KeyLesson) -> float:
        """Cosine of the embeddings (0 when either is zero)."""
        return cosine_of_record(self.embedding, other.embedding)


def _union_actions(dst: list[str], src: Iterable[str]) -> None:
    if len(dst) >= MAX_EXAMPLE_ACTIONS:
        return
    for a in src:
        if a not in dst:
            dst.append(a)
            if len(dst) >= MAX_EXAMPLE_ACTIONS:
                return


@dataclass
class DistillationResult:
    """Outcome of one distillation.

    Attributes:
        compressed_trajectories: the trajectories with quality ≥ min_quality_threshold, compressed.
        key_lessons: at most ``max_lessons`` lessons, most important first.
        trajectories_processed: how many trajectories were read.
        memory_saved: estimated bytes before minus after (never negative).
        compression_ratio: estimated bytes after / before (1.0 when nothing was read).
        processing_time_ms: wall time spent in this distillation.
        category_summary: number of trajectories per category name (sorted by name).
        timestamp: when the distillation finished.
    """

    compressed_trajectories: list[CompressedTrajectory]
    key_lessons: list[KeyLesson]
    trajectories_processed: int
    memory_saved: int
    compression_ratio: float
    processing_time_ms: float
    category_summary: dict[str, int]
    timestamp: datetime


@dataclass
class TrajectorySummary:
    """Summary of a group of trajectories (:meth:`MemoryDistiller.generate_summary`)."""

    category: PatternCategory
    success_count: int
    failure_count: int
    total: int
    avg_quality: float
    common_actions: list[tuple[str, int]]
    common_lessons: list[tuple[str, int]]


@dataclass
class DistillerStats:
    """Counters of one :class:`MemoryDistiller`."""

    distillation_count: int = 0
    total_distilled: int = 0
    total_memory_saved: int = 0


def infer_category(t: Trajectory) -> PatternCategory:
    """Category of SPEC §5: Recovered → reflection, Failure → error_recovery, then the library's one rule
    table (:mod:`rbank_torch.categories`: request type code/coding/programming → code_generation, …, any
    tool invoked → tool_use, tags and request type reasoning/chat → reasoning/conversational, else general)."""
    return _CATS[_category_code(t)]


def _category_code(t: Trajectory) -> int:
    kind = t.verdict.kind
    if kind is _V_RECOVERED:
        return _C_REFLECTION
    if kind is _V_FAILURE:
        return _C_ERROR
    md = t.metadata
    if not md.request_type and not md.tags:  # the common fast case: no text to match
        return _C_TOOL if md.tools_invoked else _C_GENERAL
    return _CAT_CODE[category_name(md.request_type, md.tags, md.tools_invoked)]


def estimate_trajectory_size(t: Trajectory) -> int:
    """Estimated bytes of a full trajectory (see the module docstring)."""
    size = TRAJECTORY_OVERHEAD_BYTES + t.query_embedding.nbytes
    if t.response_embedding is not None:
        size += t.response_embedding.nbytes
    for s in t.steps:
        size += STEP_OVERHEAD_BYTES + _utf8_len(s.action) + _utf8_len(s.rationale)
        if s.context_embedding is not None:
            size += s.context_embedding.nbytes
    for les in t.lessons:
        size += _utf8_len(les)
    return size


# ---------------------------------------------------------------------------------------------------------
# The accumulated state.


def _grow(a: np.ndarray, need: int) -> np.ndarray:
    if need <= a.shape[0]:
        return a
    out = np.zeros(max(need, 2 * a.shape[0], 64), dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


def compressed_meta(c: CompressedTrajectory) -> dict[str, Any]:
    """The JSON fields of a compressed trajectory (its key embedding travels separately, as a tensor row)."""
    return {
        "id": c.original_id,
        "verdict": c.verdict.to_dict(),
        "quality": c.quality,
        "lessons": c.lessons,
        "key_actions": c.key_actions,
        "timestamp_us": dt_to_us(c.timestamp),
        "compressed_at_us": dt_to_us(c.compressed_at),
        "step_count": c.step_count,
        "category": str(c.category),
    }


@dataclass(eq=False)
class DistillationPartial:
    """Everything a distiller has accumulated: the merged lesson table (columnar) and the compressed
    trajectories. Partials of consecutive shards merge with :meth:`MemoryDistiller.merge_partial`.

    Lesson table (``L`` distinct texts, rows in order of first appearance):
        texts: ``L`` lesson texts. embeddings: ``[L, D]`` float32 (first observation's query embedding).
        count, importance_tenths, successes, quality_fx: ``[L]`` int64 sums over the observations
            (importance in tenths, quality in units of 2**-32).
        first_us, last_us: ``[L]`` int64 earliest / latest observation time (µs since the epoch).
        category: ``[L]`` int64 index into the built-in category names.
        tags: ``L`` tag lists. first_actions: ``L`` example actions of the first observation.
        distinct_actions: ``L`` lists of the first 10 distinct example actions over all observations.
        obs_row, obs_source: ``[M]`` int64 (lesson row, trajectory id) of every observation, in order.

    Other fields: compressed (the compressed trajectories), n_trajectories, category_counts ``[9]``,
    bytes_before, bytes_after, elapsed_s.
    """

    texts: list[str] = field(default_factory=list)
    embeddings: torch.Tensor | None = None
    count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    importance_tenths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    successes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    quality_fx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    first_us: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    last_us: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    category: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tags: list[list[str]] = field(default_factory=list)
    first_actions: list[list[str]] = field(default_factory=list)
    distinct_actions: list[list[str]] = field(default_factory=list)
    obs_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    obs_source: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    compressed: list[CompressedTrajectory] = field(default_factory=list)
    n_trajectories: int = 0
    category_counts: np.ndarray = field(default_factory=lambda: np.zeros(len(_CAT_NAMES), np.int64))
    bytes_before: int = 0
    bytes_after: int = 0
    elapsed_s: float = 0.0

    @property
    def n_lessons(self) -> int:
        return len(self.texts)

    # -- plain-data form (tensors and JSON), no pickling ------------------------------------------------
    def to_state_dict(self) -> dict[str, Any]:
        """Tensors plus one JSON string (``"meta"``): safe to save with safetensors or send between ranks."""
        n = self.n_lessons
        emb = self.embeddings if self.embeddings is not None else torch.zeros(0, 0)
        ct = self.compressed
        if ct:
            ct_emb = torch.stack([c.key_embedding.to(torch.float32) for c in ct])
        else:
            ct_emb = torch.zeros(0, emb.shape[1] if emb.dim() == 2 else 0)
        meta = {
            "texts": self.texts,
            "tags": self.tags,
            "first_actions": self.first_actions,
            "distinct_actions": self.distinct_actions,
            "n_trajectories": self.n_trajectories,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "elapsed_s": self.elapsed_s,
            "compressed": [
                compressed_meta(c)
                for c in ct
            ],
        }
        return {
            "meta": json.dumps(meta),
            "embeddings": emb.contiguous(),
            "count": torch.from_numpy(self.count[:n].copy()),
            "importance_tenths": torch.from_numpy(self.importance_tenths[:n].copy()),
            "successes": torch.from_numpy(self.successes[:n].copy()),
            "quality_fx": torch.from_numpy(self.quality_fx[:n].copy()),
            "first_us": torch.from_numpy(self.first_us[:n].copy()),
            "last_us": torch.from_numpy(self.last_us[:n].copy()),
            "category": torch.from_numpy(self.category[:n].copy()),
            "obs_row": torch.from_numpy(self.obs_row.copy()),
            "obs_source": torch.from_numpy(self.obs_source.copy()),
            "category_counts": torch.from_numpy(self.category_counts.copy()),
            "compressed_embeddings": ct_emb.contiguous(),
        }

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> DistillationPartial:
        """Inverse of :meth:`to_state_dict`; raises ``ValueError`` on an inconsistent state."""
        try:
            meta = json.loads(sd["meta"])
            n = len(meta["texts"])
            arrays = {
                k: np.asarray(torch.as_tensor(sd[k]).numpy(), dtype=np.int64)
                for k in (
                    "count",
                    "importance_tenths",
                    "successes",
                    "quality_fx",
                    "first_us",
                    "last_us",
                    "category",
                )
            }
            if any(a.shape != (n,) for a in arrays.values()):
                raise ValueError("lesson columns must all have one entry per text")
            if n and (arrays["category"].min() < 0 or arrays["category"].max() >= len(_CAT_NAMES)):
                raise ValueError("category codes out of range")
            if n and (arrays["count"].min() < 1):
                raise ValueError("every lesson must have at least one observation")
            emb = torch.as_tensor(sd["embeddings"]).to(torch.float32)
            if n and (emb.dim() != 2 or emb.shape[0] != n):
                raise ValueError("embeddings must be [L, D] with one row per text")
            ct_emb = torch.as_tensor(sd["compressed_embeddings"]).to(torch.float32)
            cts = []
            for i, c in enumerate(meta["compressed"]):
                cts.append(
                    CompressedTrajectory(
                        original_id=int(c["id"]),
                        key_embedding=ct_emb[i],
                        verdict=Verdict.from_dict(c["verdict"]),
                        quality=float(c["quality"]),
                        lessons=[str(x) for x in c["lessons"]],
                        key_actions=[str(x) for x in c["key_actions"]],
                        timestamp=us_to_dt(int(c["timestamp_us"])),
                        step_count=int(c["step_count"]),
                        category=PatternCategory.parse(c["category"]),
                        compressed_at=us_to_dt(int(c["compressed_at_us"])),
                    )
                )
            obs_row = np.asarray(torch.as_tensor(sd["obs_row"]).numpy(), dtype=np.int64)
            obs_source = np.asarray(torch.as_tensor(sd["obs_source"]).numpy(), dtype=np.int64)
            if obs_row.shape != obs_source.shape or (
                obs_row.size and (obs_row.min() < 0 or obs_row.max() >= n)
            ):
                raise ValueError("observation rows must index the lesson table")
            cc = np.asarray(torch.as_tensor(sd["category_counts"]).numpy(), dtype=np.int64)
            if cc.shape != (len(_CAT_NAMES),):
                raise ValueError(f"category_counts must have {len(_CAT_NAMES)} entries")
            return cls(
                texts=[str(x) for x in meta["texts"]],
                embeddings=emb if n else None,
                tags=[[str(x) for x in v] for v in meta["tags"]],
                first_actions=[[str(x) for x in v] for v in meta["first_actions"]],
                distinct_actions=[[str(x) for x in v] for v in meta["distinct_actions"]],
                obs_row=obs_row,
                obs_source=obs_source,
                compressed=cts,
                n_trajectories=int(meta["n_trajectories"]),
                category_counts=cc,
                bytes_before=int(meta["bytes_before"]),
                bytes_after=int(meta["bytes_after"]),
                elapsed_s=float(meta["elapsed_s"]),
                **arrays,
            )
        except (KeyError, TypeError, json.JSONDecodeError, IndexError) as e:
            raise ValueError(f"not a distillation partial state: {e}") from None


@dataclass
class _Chunk:
    """What the per-trajectory pass collects from one chunk, before it touches the numeric table."""

    new_emb: list[torch.Tensor] = field(default_factory=list)
    new_cat: list[int] = field(default_factory=list)
    o_row: list[int] = field(default_factory=list)
    o_imp: list[int] = field(default_factory=list)
    o_traj: list[int] = field(default_factory=list)
    t_q: list[float] = field(default_factory=list)
    t_us: list[int] = field(default_factory=list)
    t_id: list[int] = field(default_factory=list)
    t_succ: list[int] = field(default_factory=list)
    cat_counts: list[int] = field(default_factory=lambda: [0] * len(_CAT_NAMES))
    comp: list[tuple[Trajectory, list[str], int]] = field(default_factory=list)
    comp_emb: list[torch.Tensor] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0


class _Accumulator:
    """Mutable, growable form of :class:`DistillationPartial` that :class:`MemoryDistiller` fills."""

    def __init__(self, min_quality: float, readable: bool = False) -> None:
        self.min_quality = min_quality
        self.readable = readable
        self.index: dict[str, int] = {}
        self.texts: list[str] = []
        self.emb_chunks: list[torch.Tensor] = []  # each [l, D] float32
        self.dim: int | None = None
        self.count = np.zeros(0, np.int64)
        self.imp = np.zeros(0, np.int64)
        self.succ = np.zeros(0, np.int64)
        self.qfx = np.zeros(0, np.int64)
        self.first_us = np.zeros(0, np.int64)
        self.last_us = np.zeros(0, np.int64)
        self.cat = np.zeros(0, np.int64)
        self.tags: list[list[str]] = []
        self.first_actions: list[list[str]] = []
        self.distinct: list[list[str]] = []
        self.obs_row: list[np.ndarray] = []
        self.obs_source: list[np.ndarray] = []
        self.compressed: list[CompressedTrajectory] = []
        self.n_trajectories = 0
        self.cat_counts = np.zeros(len(_CAT_NAMES), np.int64)
        self.bytes_before = 0
        self.bytes_after = 0
        self.elapsed_s = 0.0

    # -- rows -----------------------------------------------------------------------------------------
    def _ensure_rows(self, n: int) -> None:
        if n > self.count.shape[0]:
            self.count = _grow(self.count, n)
            self.imp = _grow(self.imp, n)
            self.succ = _grow(self.succ, n)
            self.qfx = _grow(self.qfx, n)
            self.first_us = _grow(self.first_us, n)
            self.last_us = _grow(self.last_us, n)
            self.cat = _grow(self.cat, n)

    def _append_embeddings(self, emb: torch.Tensor, field_name: str) -> None:
        if emb.shape[0] == 0:
            return
        if self.dim is None:
            self.dim = int(emb.shape[1])
        elif emb.shape[1] != self.dim:
            raise ValueError(f"{field_name} must have dimension {self.dim}, got {emb.shape[1]}")
        self.emb_chunks.append(emb)

    # -- ingest ---------------------------------------------------------------------------------------
    def add(self, trajectories: Sequence[Trajectory]) -> None:
        """Fold a chunk of trajectories into the state: one pass of Python over the objects, then
        vectorised updates of the lesson table. On an invalid trajectory nothing of the chunk is kept."""
        n_rows0 = len(self.texts)
        touched: dict[int, int] = {}  # existing row → length of its distinct-action list before the chunk
        try:
            ch = self._scan(trajectories, touched)
            q_arr = np.asarray(ch.t_q, dtype=np.float64)
            bad = np.flatnonzero(~(np.isfinite(q_arr) & (q_arr >= 0.0) & (q_arr <= 1.0)))
            if bad.size:
                i = int(bad[0])
                raise ValueError(f"trajectories[{i}].quality must be within [0, 1], got {ch.t_q[i]!r}")
            emb_new = _stack(ch.new_emb, "query_embedding") if ch.new_emb else None
            ct_emb = _stack(ch.comp_emb, "query_embedding") if ch.comp_emb else None
            dims = {int(e.shape[1]) for e in (emb_new, ct_emb) if e is not None}
            if self.dim is not None:
                dims.add(self.dim)
            if len(dims) > 1:
                raise ValueError(
                    f"query_embedding: trajectories have embeddings of different dimensions {sorted(dims)}"
                )
        except (ValueError, TypeError) as e:
            self._rollback(n_rows0, touched)
            if isinstance(e, TypeError):
                raise ValueError(f"invalid trajectory data: {e}") from None
            raise
        except BaseException:
            self._rollback(n_rows0, touched)
            raise

        n_rows = len(self.texts)
        if emb_new is not None:
            self._append_embeddings(emb_new, "query_embedding")
        elif ct_emb is not None and self.dim is None:
            self.dim = int(ct_emb.shape[1])
        self._ensure_rows(n_rows)
        if n_rows > n_rows0:
            self.cat[n_rows0:n_rows] = ch.new_cat
            self.first_us[n_rows0:n_rows] = np.iinfo(np.int64).max
            self.last_us[n_rows0:n_rows] = np.iinfo(np.int64).min
        if ch.o_row:
            rows = np.asarray(ch.o_row, dtype=np.int64)
            traj = np.asarray(ch.o_traj, dtype=np.int64)
            qfx_t = np.rint(q_arr * _Q_SCALE).astype(np.int64)
            us_t = np.asarray(ch.t_us, dtype=np.int64)
            np.add.at(self.count, rows, 1)
            np.add.at(self.imp, rows, np.asarray(ch.o_imp, dtype=np.int64))
            np.add.at(self.succ, rows, np.asarray(ch.t_succ, dtype=np.int64)[traj])
            np.add.at(self.qfx, rows, qfx_t[traj])
            np.minimum.at(self.first_us, rows, us_t[traj])
            np.maximum.at(self.last_us, rows, us_t[traj])
            self.obs_row.append(rows)
            self.obs_source.append(np.asarray(ch.t_id, dtype=np.int64)[traj])
        if ch.comp:
            assert ct_emb is not None  # compressed trajectories always come with their embeddings
            now = utcnow()
            out = self.compressed
            for (t, ka, cat), key_emb in zip(ch.comp, ct_emb.unbind(0)):
                out.append(
                    CompressedTrajectory(
                        int(t.id),
                        key_emb,
                        t.verdict,
                        float(t.quality),
                        list(t.lessons),
                        ka,
                        t.started_at,
                        len(t.steps),
                        _CATS[cat],
                        now,
                    )
                )
        self.cat_counts += np.asarray(ch.cat_counts, dtype=np.int64)
        self.n_trajectories += len(ch.t_id)
        self.bytes_before += ch.bytes_before
        self.bytes_after += ch.bytes_after

    def _scan(self, trajectories: Sequence[Trajectory], touched: dict[int, int]) -> _Chunk:
        """The per-trajectory pass: categories, sizes, compressed picks and lesson observations."""
        ch = _Chunk()
        min_q = self.min_quality
        readable = self.readable
        index = self.index
        texts = self.texts
        tags_l, first_l, distinct_l = self.tags, self.first_actions, self.distinct
        new_emb, new_cat = ch.new_emb, ch.new_cat
        o_row, o_imp, o_traj = ch.o_row, ch.o_imp, ch.o_traj
        t_q, t_us, t_id, t_succ = ch.t_q, ch.t_us, ch.t_id, ch.t_succ
        cat_counts = ch.cat_counts
        comp, comp_emb = ch.comp, ch.comp_emb
        bytes_before = 0
        bytes_after = 0
        for pos, t in enumerate(trajectories):
            if not isinstance(t, Trajectory):
                raise ValueError(f"trajectories[{pos}] must be a Trajectory, got {type(t).__name__}")
            v = t.verdict
            kind = v.kind
            md = t.metadata
            cat = _category_code(t)  # the library's one rule table (rbank_torch.categories)
            cat_counts[cat] += 1
            qe = t.query_embedding
            size = TRAJECTORY_OVERHEAD_BYTES + qe.nbytes
            if t.response_embedding is not None:
                size += t.response_embedding.nbytes
            succ_actions: list[str] = []
            for s in t.steps:
                a = s.action
                r = s.rationale
                if s.outcome.kind is _SUCCESS_STEP:
                    succ_actions.append(a)
                size += STEP_OVERHEAD_BYTES + (len(a) if a.isascii() else len(a.encode()))
                size += len(r) if r.isascii() else len(r.encode())
                if s.context_embedding is not None:
                    size += s.context_embedding.nbytes
            lessons = t.lessons
            lesson_bytes = 0
            for les in lessons:
                lesson_bytes += len(les) if les.isascii() else len(les.encode())
            bytes_before += size + lesson_bytes
            q = t.quality
            t_q.append(q)
            is_succ = kind is _V_SUCCESS or kind is _V_RECOVERED
            if q >= min_q:
                ka = succ_actions[:5]
                comp.append((t, ka, cat))
                comp_emb.append(qe)
                bytes_after += COMPRESSED_OVERHEAD_BYTES + qe.nbytes + lesson_bytes
                for a in ka:
                    bytes_after += len(a) if a.isascii() else len(a.encode())
            gen: list[tuple[str, int]] = [(les, 5) for les in lessons]  # (text, importance in tenths)
            if is_succ and succ_actions:
                gen.append(("Successful pattern: " + " -> ".join(succ_actions[:3]), 5))
            if kind is _V_FAILURE:
                gen.append((failure_lesson(v.cause, t.steps), 8))  # type: ignore[arg-type]
            elif kind is _V_RECOVERED:
                gen.append((RECOVERY_LESSON if readable else f"Recovery possible after {v.attempts} attempts via reflection", 9))
            tpos = len(t_id)
            t_id.append(t.id)
            t_succ.append(1 if is_succ else 0)
            if not gen:
                t_us.append(0)
                continue
            t_us.append(dt_to_us(t.completed_at or t.started_at))
            ex = succ_actions[:3]
            for text, imp in gen:
                row = index.get(text)
                if row is None:
                    if not isinstance(text, str):
                        raise ValueError(f"trajectories[{pos}].lessons must hold strings, got {text!r}")
                    row = len(texts)
                    index[text] = row
                    texts.append(text)
                    new_emb.append(qe)
                    new_cat.append(cat)
                    tags_l.append(list(md.tags))
                    first_l.append(list(ex))
                    d: list[str] = []
                    _union_actions(d, ex)
                    distinct_l.append(d)
                else:
                    d = distinct_l[row]
                    if len(d) < MAX_EXAMPLE_ACTIONS and ex:
                        touched.setdefault(row, len(d))
                        _union_actions(d, ex)
                o_row.append(row)
                o_imp.append(imp)
                o_traj.append(tpos)
        ch.bytes_before = bytes_before
        ch.bytes_after = bytes_after
        return ch

    def _rollback(self, n_rows0: int, touched: dict[int, int]) -> None:
        """Undo the table changes of a chunk that failed validation."""
        for text in self.texts[n_rows0:]:
            del self.index[text]
        del self.texts[n_rows0:]
        del self.tags[n_rows0:]
        del self.first_actions[n_rows0:]
        del self.distinct[n_rows0:]
        for row, n in touched.items():
            if row < n_rows0:
                del self.distinct[row][n:]

    # -- partial states -------------------------------------------------------------------------------
    def embeddings(self) -> torch.Tensor | None:
        if not self.emb_chunks:
            return None
        if len(self.emb_chunks) > 1:
            self.emb_chunks = [torch.cat(self.emb_chunks)]
        return self.emb_chunks[0]

    def obs(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self.obs_row) > 1:
            self.obs_row = [np.concatenate(self.obs_row)]
            self.obs_source = [np.concatenate(self.obs_source)]
        if not self.obs_row:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return self.obs_row[0], self.obs_source[0]

    def to_partial(self) -> DistillationPartial:
        n = len(self.texts)
        obs_row, obs_source = self.obs()
        emb = self.embeddings()
        return DistillationPartial(
            texts=list(self.texts),
            embeddings=None if emb is None else emb.clone(),
            count=self.count[:n].copy(),
            importance_tenths=self.imp[:n].copy(),
            successes=self.succ[:n].copy(),
            quality_fx=self.qfx[:n].copy(),
            first_us=self.first_us[:n].copy(),
            last_us=self.last_us[:n].copy(),
            category=self.cat[:n].copy(),
            tags=[list(x) for x in self.tags],
            first_actions=[list(x) for x in self.first_actions],
            distinct_actions=[list(x) for x in self.distinct],
            obs_row=obs_row.copy(),
            obs_source=obs_source.copy(),
            compressed=list(self.compressed),
            n_trajectories=self.n_trajectories,
            category_counts=self.cat_counts.copy(),
            bytes_before=self.bytes_before,
            bytes_after=self.bytes_after,
            elapsed_s=self.elapsed_s,
        )

    def merge(self, p: DistillationPartial) -> None:
        """Append a partial state whose trajectories come after everything seen so far."""
        n_p = p.n_lessons
        if n_p and p.embeddings is not None:
            if self.dim is not None and p.embeddings.shape[1] != self.dim:
                raise ValueError(
                    f"partial embeddings must have dimension {self.dim}, got {p.embeddings.shape[1]}"
                )
        # map p's rows to ours (new texts appended in p's order)
        rows = np.empty(n_p, dtype=np.int64)
        new_src: list[int] = []
        for j, text in enumerate(p.texts):
            r = self.index.get(text)
            if r is None:
                r = len(self.texts)
                self.index[text] = r
                self.texts.append(text)
                self.tags.append(list(p.tags[j]))
                self.first_actions.append(list(p.first_actions[j]))
                self.distinct.append(list(p.distinct_actions[j]))
                new_src.append(j)
            else:
                d = self.distinct[r]
                if len(d) < MAX_EXAMPLE_ACTIONS:
                    _union_actions(d, p.distinct_actions[j])
            rows[j] = r
        if new_src:
            assert p.embeddings is not None
            self._append_embeddings(p.embeddings[torch.as_tensor(new_src)].to(torch.float32), "embeddings")
        self._ensure_rows(len(self.texts))
        if new_src:
            src = np.asarray(new_src, dtype=np.int64)
            self.cat[rows[src]] = p.category[src]
            self.first_us[rows[src]] = np.iinfo(np.int64).max
            self.last_us[rows[src]] = np.iinfo(np.int64).min
        if n_p:
            self.count[rows] += p.count
            self.imp[rows] += p.importance_tenths
            self.succ[rows] += p.successes
            self.qfx[rows] += p.quality_fx
            self.first_us[rows] = np.minimum(self.first_us[rows], p.first_us)
            self.last_us[rows] = np.maximum(self.last_us[rows], p.last_us)
        if p.obs_row.size:
            self.obs_row.append(rows[p.obs_row])
            self.obs_source.append(p.obs_source.copy())
        if p.compressed and self.dim is None:
            self.dim = int(p.compressed[0].key_embedding.shape[0])
        self.compressed.extend(p.compressed)
        self.n_trajectories += p.n_trajectories
        self.cat_counts += p.category_counts
        self.bytes_before += p.bytes_before
        self.bytes_after += p.bytes_after
        self.elapsed_s += p.elapsed_s


def _stack(tensors: list[torch.Tensor], field_name: str) -> torch.Tensor:
    """``[n, D]`` float32 copy of n 1-D embeddings; ``ValueError`` on mixed dimensions or bad values."""
    try:
        out = torch.stack(tensors).to(torch.float32)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"{field_name}: trajectories must have 1-D embeddings of one dimension ({e})"
        ) from None
    if out.dim() != 2:
        raise ValueError(f"{field_name} must be 1-D, got shape {tuple(out.shape[1:])}")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{field_name} must hold finite values (found NaN or inf)")
    return out


# ---------------------------------------------------------------------------------------------------------
# The distiller.


class MemoryDistiller:
    """Distils trajectories into key lessons and compressed trajectories (SPEC §5).

    One-shot::

        result = MemoryDistiller(config).extract_key_lessons(trajectories)

    Streaming (only the lesson table and the compressed trajectories stay in memory)::

        d = MemoryDistiller(config)
        for chunk in log_reader:
            d.add(chunk)
        result = d.finish()

    Sharded: each shard ``i`` runs ``add`` on its consecutive part of the log and hands over
    ``partial()`` (or its ``to_state_dict()``); one process calls ``merge_partial`` for the shards in log
    order and then ``finish()``; the result equals one pass over the whole log.
    """

    def __init__(self, config: DistillationConfig | None = None) -> None:
        if config is None:
            config = DistillationConfig()
        if not isinstance(config, DistillationConfig):
            raise ValueError(f"config must be a DistillationConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self._acc = _Accumulator(config.min_quality_threshold, config.readable_lessons)
        self._stats = DistillerStats()

    # -- streaming ------------------------------------------------------------------------------------
    def add(self, trajectories: Iterable[Trajectory]) -> int:
        """Fold trajectories into the running state. Returns the number read so far.

        Raises:
            ValueError: naming the offending trajectory and field; nothing of that chunk is kept.
        """
        t0 = time.perf_counter()
        if not isinstance(trajectories, Sequence):
            trajectories = list(trajectories)
        self._acc.add(trajectories)
        self._acc.elapsed_s += time.perf_counter() - t0
        return self._acc.n_trajectories

    @property
    def trajectories_seen(self) -> int:
        """Trajectories folded in since the last :meth:`finish` / :meth:`reset`."""
        return self._acc.n_trajectories

    def reset(self) -> None:
        """Drop the running state."""
        self._acc = _Accumulator(self.config.min_quality_threshold, self.config.readable_lessons)

    def partial(self) -> DistillationPartial:
        """A copy of the running state, to be merged elsewhere with :meth:`merge_partial`."""
        return self._acc.to_partial()

    def merge_partial(self, partial: DistillationPartial | dict[str, Any]) -> None:
        """Append a shard's state (a :class:`DistillationPartial` or its ``to_state_dict()``); its
        trajectories count as coming after everything folded in so far."""
        if isinstance(partial, dict):
            partial = DistillationPartial.from_state_dict(partial)
        if not isinstance(partial, DistillationPartial):
            raise ValueError(f"partial must be a DistillationPartial, got {type(partial).__name__}")
        t0 = time.perf_counter()
        self._acc.merge(partial)
        self._acc.elapsed_s += time.perf_counter() - t0

    def finish(self) -> DistillationResult:
        """Order, deduplicate and truncate the lessons and build the result; resets the running state.

        Raises:
            DistillationError: fewer trajectories than ``min_trajectories_for_distillation`` (the running
                state is kept, so more can be added).
        """
        acc = self._acc
        cfg = self.config
        if acc.n_trajectories < cfg.min_trajectories_for_distillation:
            raise DistillationError(
                f"need at least {cfg.min_trajectories_for_distillation} trajectories "
                f"(min_trajectories_for_distillation), got {acc.n_trajectories}"
            )
        t0 = time.perf_counter()
        lessons = self._key_lessons(acc)
        before, after = acc.bytes_before, acc.bytes_after
        summary = {
            _CAT_NAMES[i]: int(c)
            for i, c in sorted(enumerate(acc.cat_counts.tolist()), key=lambda x: _CAT_NAMES[x[0]])
            if c
        }
        elapsed = acc.elapsed_s + (time.perf_counter() - t0)
        result = DistillationResult(
            compressed_trajectories=acc.compressed,
            key_lessons=lessons,
            trajectories_processed=acc.n_trajectories,
            memory_saved=max(0, before - after),
            compression_ratio=(after / before) if before > 0 else 1.0,
            processing_time_ms=elapsed * 1000.0,
            category_summary=summary,
            timestamp=utcnow(),
        )
        self._stats.distillation_count += 1
        self._stats.total_distilled += acc.n_trajectories
        self._stats.total_memory_saved += result.memory_saved
        self.reset()
        return result

    def extract_key_lessons(self, trajectories: Iterable[Trajectory]) -> DistillationResult:
        """One-shot distillation of SPEC §5 (leaves any running streaming state untouched).

        Raises:
            DistillationError: fewer trajectories than ``min_trajectories_for_distillation``.
        """
        if not isinstance(trajectories, Sequence):
            trajectories = list(trajectories)
        if len(trajectories) < self.config.min_trajectories_for_distillation:
            raise DistillationError(
                f"need at least {self.config.min_trajectories_for_distillation} trajectories "
                f"(min_trajectories_for_distillation), got {len(trajectories)}"
            )
        saved = self._acc
        self._acc = _Accumulator(self.config.min_quality_threshold, self.config.readable_lessons)
        try:
            self.add(trajectories)
            return self.finish()
        finally:
            self._acc = saved

    # -- lessons --------------------------------------------------------------------------------------
    def _key_lessons(self, acc: _Accumulator) -> list[KeyLesson]:
        cfg = self.config
        n = len(acc.texts)
        if n == 0 or cfg.max_lessons == 0:
            return []
        count = acc.count[:n]
        imp = acc.imp[:n]
        importance = imp / (10.0 * count)  # [L] float64
        score = importance * np.log1p(count.astype(np.float64))
        order = np.argsort(-score, kind="stable")  # ties: first appearance
        emb = acc.embeddings()
        assert emb is not None
        if cfg.deduplicate_lessons and n > 1:
            texts_sorted = [acc.texts[i] for i in order.tolist()]
            parent = greedy_dedup(
                texts_sorted, emb[torch.from_numpy(order)], cfg.dedup_similarity_threshold
            ).numpy()
        else:
            parent = np.arange(n, dtype=np.int64)
        kept_pos = np.flatnonzero(parent == np.arange(n))[: cfg.max_lessons]  # positions in sorted order
        out_of = np.full(n, -1, dtype=np.int64)  # sorted position → output lesson index (-1: none)
        out_of[kept_pos] = np.arange(kept_pos.shape[0])
        member_out = out_of[parent]  # [L] output lesson of each sorted position
        sel = np.flatnonzero(member_out >= 0)  # sorted positions contributing, ascending
        rows_sel = order[sel]
        k = kept_pos.shape[0]
        grp = member_out[sel]
        tot_count = np.zeros(k, np.int64)
        np.add.at(tot_count, grp, count[rows_sel])
        tot_imp = np.zeros(k, np.int64)
        np.add.at(tot_imp, grp, imp[rows_sel])
        tot_succ = np.zeros(k, np.int64)
        np.add.at(tot_succ, grp, acc.succ[rows_sel])
        tot_q = np.zeros(k, np.int64)
        np.add.at(tot_q, grp, acc.qfx[rows_sel])
        t_first = np.full(k, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(t_first, grp, acc.first_us[rows_sel])
        t_last = np.full(k, np.iinfo(np.int64).min, np.int64)
        np.maximum.at(t_last, grp, acc.last_us[rows_sel])

        # members of each output lesson, in scan order: [(row, member rank)]
        members: list[list[int]] = [[] for _ in range(k)]
        for g, r in zip(grp.tolist(), rows_sel.tolist()):
            members[g].append(r)
        # source ids: per output lesson, member by member, each member's ids in first-seen order, distinct
        sources = _sources(acc, rows_sel, grp, k)

        out: list[KeyLesson] = []
        kept_rows = order[kept_pos]
        for j in range(k):
            row = int(kept_rows[j])
            actions = _reference_actions(acc, members[j][0])
            for r in members[j][1:]:
                _union_actions(actions, _reference_actions(acc, r))
            c = int(tot_count[j])
            out.append(
                KeyLesson(
                    content=acc.texts[row],
                    embedding=emb[row].clone(),
                    category=_CATS[int(acc.cat[row])],
                    importance=float(tot_imp[j]) / (10.0 * c),
                    observation_count=c,
                    success_rate=float(tot_succ[j]) / c,
                    avg_quality=min(1.0, float(tot_q[j]) / _Q_SCALE / c),
                    example_actions=actions,
                    tags=list(acc.tags[row]),
                    source_trajectories=sources[j],
                    first_observed=_us_to_dt(int(t_first[j])),
                    last_observed=_us_to_dt(int(t_last[j])),
                )
            )
        return out

    # -- other operations -----------------------------------------------------------------------------
    def compress(self, trajectories: Iterable[Trajectory]) -> list[CompressedTrajectory]:
        """Compressed forms of the given trajectories (all of them, in order)."""
        ts = list(trajectories)
        for i, t in enumerate(ts):
            if not isinstance(t, Trajectory):
                raise ValueError(f"trajectories[{i}] must be a Trajectory, got {type(t).__name__}")
        if not ts:
            return []
        emb = _stack([t.query_embedding for t in ts], "query_embedding").unbind(0)
        now = utcnow()
        out = []
        for t, e in zip(ts, emb):
            out.append(
                CompressedTrajectory(
                    int(t.id),
                    e,
                    t.verdict,
                    float(t.quality),
                    list(t.lessons),
                    [s.action for s in t.steps if s.outcome.kind is _SUCCESS_STEP][:5],
                    t.started_at,
                    len(t.steps),
                    infer_category(t),
                    now,
                )
            )
        return out

    def compress_old_trajectories(
        self, trajectories: Iterable[Trajectory], now: datetime | None = None
    ) -> list[CompressedTrajectory]:
        """Compressed forms of the trajectories started at least ``min_age_for_distillation_secs`` ago."""
        now = utcnow() if now is None else now
        min_age = timedelta(seconds=self.config.min_age_for_distillation_secs)
        ts = list(trajectories)
        for i, t in enumerate(ts):
            if not isinstance(t, Trajectory):
                raise ValueError(f"trajectories[{i}] must be a Trajectory, got {type(t).__name__}")
        return self.compress([t for t in ts if now - t.started_at >= min_age])

    def generate_summary(self, trajectories: Iterable[Trajectory]) -> TrajectorySummary:
        """Counts, mean quality, the 10 most common actions and lessons (ties: first seen) and the most
        common category (ties: first seen; general when empty)."""
        ts = list(trajectories)
        succ = fail = 0
        total_q = 0.0
        actions: Counter[str] = Counter()
        lessons: Counter[str] = Counter()
        cats: Counter[int] = Counter()
        for i, t in enumerate(ts):
            if not isinstance(t, Trajectory):
                raise ValueError(f"trajectories[{i}] must be a Trajectory, got {type(t).__name__}")
            if t.is_success:
                succ += 1
            elif t.is_failure:
                fail += 1
            total_q += float(t.quality)
            actions.update(s.action for s in t.steps)
            lessons.update(t.lessons)
            cats[_category_code(t)] += 1
        category = _CATS[cats.most_common(1)[0][0]] if cats else PatternCategory.GENERAL
        return TrajectorySummary(
            category=category,
            success_count=succ,
            failure_count=fail,
            total=len(ts),
            avg_quality=total_q / len(ts) if ts else 0.0,
            common_actions=actions.most_common(10),
            common_lessons=lessons.most_common(10),
        )

    def stats(self) -> DistillerStats:
        """Distillations run, trajectories distilled and estimated bytes saved, in total."""
        return DistillerStats(**vars(self._stats))


def _us_to_dt(us: int) -> datetime:
    return us_to_dt(us)


def _reference_actions(acc: _Accumulator, row: int) -> list[str]:
    """A lesson's example actions as sequential merging builds them: its first observation's actions,
    then further distinct actions in order of appearance, up to 10 entries."""
    first = acc.first_actions[row]
    out = list(first)
    if len(out) < MAX_EXAMPLE_ACTIONS:
        _union_actions(out, acc.distinct[row])
    return out


def _sources(acc: _Accumulator, rows_sel: np.ndarray, grp: np.ndarray, k: int) -> list[list[int]]:
    """Distinct source ids per output lesson: member by member (scan order), each in observation order."""
    obs_row, obs_src = acc.obs()
    n = len(acc.texts)
    member_group = np.full(n, -1, dtype=np.int64)
    member_rank = np.zeros(n, dtype=np.int64)
    member_group[rows_sel] = grp
    member_rank[rows_sel] = np.arange(rows_sel.shape[0])
    g = member_group[obs_row]
    m = np.flatnonzero(g >= 0)
    if m.size == 0:
        return [[] for _ in range(k)]
    g = g[m]
    rank = member_rank[obs_row[m]]
    src = obs_src[m]
    seq = m
    order = np.lexsort((seq, rank, g))  # by group, member rank, observation order
    g, src = g[order], src[order]
    # first occurrence of each (group, source) in that order
    o2 = np.lexsort((np.arange(g.shape[0]), src, g))
    gs, ss = g[o2], src[o2]
    first = np.ones(gs.shape[0], dtype=bool)
    first[1:] = (gs[1:] != gs[:-1]) | (ss[1:] != ss[:-1])
    keep = np.zeros(g.shape[0], dtype=bool)
    keep[o2[first]] = True
    g, src = g[keep], src[keep]
    bounds = np.searchsorted(g, np.arange(k + 1))
    src_l = src.tolist()
    return [src_l[bounds[j] : bounds[j + 1]] for j in range(k)]
