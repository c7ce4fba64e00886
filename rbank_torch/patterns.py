"""Reasoning patterns (SPEC §3): categories, the Pattern row type and search results."""

from __future__ import annotations

import math
import uuid as _uuid
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ._util import as_embedding, check_unit, next_id, utcnow
from .categories import category_name

if TYPE_CHECKING:  # pragma: no cover
    from .distillation import KeyLesson
    from .trajectory import Trajectory

__all__ = [
    "PatternCategory",
    "PatternMetadata",
    "Pattern",
    "PatternSearchResult",
    "BUILTIN_CATEGORIES",
    "OUTCOMES",
    "AttributeValue",
    "check_attributes",
    "trajectory_attributes",
]

#: the outcomes a pattern can record (SPEC §7): what happened when its memory was made
OUTCOMES = ("success", "failure")
#: a metadata attribute value (SPEC §7)
AttributeValue = str | int | float | bool
_I64 = 1 << 63

BUILTIN_CATEGORIES = (
    "general",
    "reasoning",
    "code_generation",
    "research",
    "creative",
    "conversational",
    "tool_use",
    "error_recovery",
    "reflection",
)


class PatternCategory:
    """A pattern category: one of the built-ins or ``custom:<name>``. Compares and hashes by name.

    Example:
        >>> PatternCategory.parse("code_generation") == PatternCategory.CODE_GENERATION
        True
        >>> str(PatternCategory.custom("x"))
        'custom:x'
    """

    __slots__ = ("_name",)

    GENERAL: ClassVar[PatternCategory]
    REASONING: ClassVar[PatternCategory]
    CODE_GENERATION: ClassVar[PatternCategory]
    RESEARCH: ClassVar[PatternCategory]
    CREATIVE: ClassVar[PatternCategory]
    CONVERSATIONAL: ClassVar[PatternCategory]
    TOOL_USE: ClassVar[PatternCategory]
    ERROR_RECOVERY: ClassVar[PatternCategory]
    REFLECTION: ClassVar[PatternCategory]

    def __init__(self, name: str) -> None:
        if not isinstance(name, str):
            raise ValueError(f"category must be a string, got {type(name).__name__}")
        if name not in BUILTIN_CATEGORIES:
            if not name.startswith("custom:") or len(name) == len("custom:"):
                raise ValueError(
                    f"unknown category {name!r}: expected one of {list(BUILTIN_CATEGORIES)} or 'custom:<name>'"
                )
        self._name = name

    @classmethod
    def parse(cls, name: str | PatternCategory) -> PatternCategory:
        """Parse a category name (``"research"``, ``"custom:x"``); unknown names raise ``ValueError``."""
        if isinstance(name, PatternCategory):
            return name
        return cls(name)

    @classmethod
    def custom(cls, name: str) -> PatternCategory:
        return cls(f"custom:{name}")

    @property
    def name(self) -> str:
        return self._name

    @property
    def is_custom(self) -> bool:
        return self._name.startswith("custom:")

    def __str__(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"PatternCategory({self._name!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PatternCategory):
            return self._name == other._name
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("PatternCategory", self._name))

    def __reduce__(self):  # copy/deepcopy support
        return (PatternCategory, (self._name,))


for _n in BUILTIN_CATEGORIES:
    setattr(PatternCategory, _n.upper(), PatternCategory(_n))


@dataclass
class PatternMetadata:
    """Tags, origin and attributes of a pattern. ``attributes`` maps a name to a str, int, float or bool
    (user_id, session_id, agent, request_type, …); filters of ``ReasoningBank.search(where=…)`` read them."""

    tags: list[str] = field(default_factory=list)
    source: str = "manual"
    version: int = 1
    attributes: dict[str, AttributeValue] = field(default_factory=dict)


def check_attributes(attributes: Any, name: str = "metadata") -> dict[str, AttributeValue]:
    """A validated copy of ``attributes``: str keys; values str, bool, int (int64) or finite float.

    Raises:
        ValueError: naming the offending key and the expectation.
    """
    if attributes is None:
        return {}
    if not isinstance(attributes, dict):
        raise ValueError(f"{name} must be a dict of str to str/int/float/bool, got {type(attributes).__name__}")
    out: dict[str, AttributeValue] = {}
    for k, v in attributes.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"{name} keys must be non-empty strings, got {k!r}")
        if isinstance(v, bool) or isinstance(v, str):
            out[k] = v
        elif isinstance(v, int):
            if not -_I64 <= v < _I64:
                raise ValueError(f"{name}[{k!r}] must fit in a signed 64-bit integer, got {v}")
            out[k] = int(v)
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"{name}[{k!r}] must be a finite number, got {v}")
            out[k] = float(v)
        else:
            raise ValueError(f"{name}[{k!r}] must be a str, int, float or bool, got {type(v).__name__}")
    return out


def trajectory_attributes(t: Trajectory) -> dict[str, AttributeValue]:
    """The attributes a trajectory hands to its pattern: its metadata attributes (the query text aside,
    which becomes the pattern's ``text``) plus ``user_id``, ``session_id`` and ``request_type`` when set."""
    md = t.metadata
    out: dict[str, AttributeValue] = {k: v for k, v in md.attributes.items() if k != "query"}
    for key in ("user_id", "session_id", "request_type"):
        v = getattr(md, key)
        if v is not None:
            out[key] = v
    return out


@dataclass(eq=False)
class Pattern:
    """One learned reasoning pattern (one row of a :class:`~rbank_torch.store.PatternStore`).

    The store hands out copies: changing a Pattern changes nothing stored.
    ``embedding`` is a 1-D tensor ``[D]``.
    """

    id: int
    uuid: str
    embedding: torch.Tensor
    category: PatternCategory
    confidence: float
    usage_count: int = 0
    success_count: int = 0
    avg_quality: float = 0.0
    source_trajectories: list[int] = field(default_factory=list)
    lessons: list[str] = field(default_factory=list)
    example_actions: list[str] = field(default_factory=list)
    created_at: datetime = field(default_factory=utcnow)
    last_accessed: datetime = field(default_factory=utcnow)
    metadata: PatternMetadata = field(default_factory=PatternMetadata)
    #: the text the memory came from (the trajectory's query, or the text given to ``add``); None when only
    #: an embedding was given
    text: str | None = None
    #: "success" or "failure" (a failed run kept as a preventive memory)
    outcome: str = "success"

    def __eq__(self, other: object) -> bool:
        """Field-by-field equality (embeddings compared exactly, dtype included)."""
        if not isinstance(other, Pattern):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "embedding":
                if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.cpu(), b.cpu()):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def new(cls, embedding: Any, category: PatternCategory | str, confidence: float) -> Pattern:
        """A manual pattern: usage 0, success 0, avg_quality 0, source "manual", fresh id."""
        now = utcnow()
        return cls(
            id=next_id(),
            uuid=str(_uuid.uuid4()),
            embedding=as_embedding(embedding, "embedding"),
            category=PatternCategory.parse(category),
            confidence=check_unit(confidence, "confidence"),
            created_at=now,
            last_accessed=now,
            metadata=PatternMetadata(source="manual"),
        )

    @staticmethod
    def infer_category(t: Trajectory) -> PatternCategory:
        """Category of a trajectory's pattern (SPEC §3 ``from_trajectory``; the rule table of
        :mod:`rbank_torch.categories`)."""
        from .verdicts import VerdictKind

        md = t.metadata
        name = category_name(md.request_type, md.tags, md.tools_invoked,
                             recovered=t.verdict.kind is VerdictKind.RECOVERED)
        return getattr(PatternCategory, name.upper())

    @classmethod
    def from_trajectory(cls, t: Trajectory, *, outcome: str = "success", lessons: list[str] | None = None,
                        confidence: float | None = None) -> Pattern:
        """Pattern of a completed trajectory (SPEC §3), with its provenance (SPEC §7): ``text`` is the
        trajectory's query text, the attributes are :func:`trajectory_attributes`.

        ``outcome``, ``lessons`` and ``confidence`` serve a failure kept as a memory (the bank passes
        ``"failure"``, the analysis's lessons and ``max(quality, min_confidence)``)."""
        now = utcnow()
        q = check_unit(t.quality, "trajectory.quality")
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {list(OUTCOMES)}, got {outcome!r}")
        text = t.query_text
        return cls(
            id=next_id(),
            uuid=str(_uuid.uuid4()),
            embedding=as_embedding(t.query_embedding, "query_embedding").clone(),
            category=cls.infer_category(t),
            confidence=q if confidence is None else check_unit(confidence, "confidence"),
            usage_count=1,
            success_count=1 if t.is_success else 0,
            avg_quality=q,
            source_trajectories=[int(t.id)],
            lessons=list(t.lessons) if lessons is None else [str(x) for x in lessons],
            example_actions=[s.action for s in t.steps[:5]],
            created_at=now,
            last_accessed=now,
            metadata=PatternMetadata(tags=list(t.metadata.tags), source="trajectory",
                                     attributes=check_attributes(trajectory_attributes(t), "trajectory attributes")),
            text=text,
            outcome=outcome,
        )

    @classmethod
    def from_lesson(cls, lesson: KeyLesson) -> Pattern:
        """Pattern of a distilled key lesson (SPEC §3)."""
        now = utcnow()
        count = int(lesson.observation_count)
        return cls(
            id=next_id(),
            uuid=str(_uuid.uuid4()),
            embedding=as_embedding(lesson.embedding, "lesson.embedding").clone(),
            category=PatternCategory.parse(lesson.category),
            confidence=check_unit(lesson.importance, "lesson.importance"),
            usage_count=count,
            success_count=int(math.floor(count * float(lesson.success_rate))),
            avg_quality=check_unit(lesson.avg_quality, "lesson.avg_quality"),
            source_trajectories=[int(x) for x in lesson.source_trajectories],
            lessons=[lesson.content],
            example_actions=list(lesson.example_actions),
            created_at=now,
            last_accessed=now,
            metadata=PatternMetadata(tags=list(lesson.tags), source="lesson"),
        )

    def record_usage(self, successful: bool, quality: float) -> None:
        """usage+1, success+1 if successful, avg_quality ← running mean, last_accessed ← now."""
        q = check_unit(quality, "quality")
        self.usage_count += 1
        if successful:
            self.success_count += 1
        self.avg_quality += (q - self.avg_quality) / self.usage_count
        self.last_accessed = utcnow()

    def success_rate(self) -> float:
        return self.success_count / self.usage_count if self.usage_count > 0 else 0.0

    def merge(self, other: Pattern) -> None:
        """Fold ``other`` into this pattern (usage-weighted, SPEC §3). Nothing happens when both are unused."""
        u1, u2 = self.usage_count, other.usage_count
        u = u1 + u2
        if u == 0:
            return
        self.embedding = merge_embeddings(self.embedding, u1, other.embedding, u2)
        self.avg_quality = (u1 * self.avg_quality + u2 * other.avg_quality) / u
        self.usage_count = u
        self.success_count += other.success_count
        self.confidence = max(self.confidence, other.confidence)
        self.source_trajectories.extend(other.source_trajectories)
        for x in other.lessons:
            if x not in self.lessons:
                self.lessons.append(x)
        for a in other.example_actions:
            if len(self.example_actions) >= 10:
                break
            if a not in self.example_actions:
                self.example_actions.append(a)
        self.last_accessed = utcnow()

    def similarity(self, query: Any) -> float:
        """Cosine similarity with ``query``; 0 when lengths differ or either norm ≤ 1e-8."""
        q = torch.as_tensor(query, dtype=torch.float64).flatten()
        e = self.embedding.detach().to(torch.float64).flatten().cpu()
        if q.shape != e.shape:
            return 0.0
        nq, ne = float(q.norm()), float(e.norm())
        if nq <= 1e-8 or ne <= 1e-8:
            return 0.0
        return float(q.cpu() @ e) / (nq * ne)

    def should_prune(self, min_usage: int, max_age_secs: float, min_quality: float) -> bool:
        """usage < min_usage and unused longer than max_age and avg_quality < min_quality."""
        age = (utcnow() - self.last_accessed).total_seconds()
        return self.usage_count < min_usage and age > max_age_secs and self.avg_quality < min_quality


def merge_embeddings(e1: torch.Tensor, u1: int, e2: torch.Tensor, u2: int) -> torch.Tensor:
    """``(u1·e1 + u2·e2) / (u1 + u2)`` in float64, returned in ``e1``'s dtype. Shape ``[D]`` (or ``[..., D]``)."""
    u = u1 + u2
    out = (e1.to(torch.float64) * u1 + e2.to(torch.float64) * u2) / u
    return out.to(e1.dtype)


@dataclass
class PatternSearchResult:
    """One search hit: the pattern (a copy), its cosine ``similarity`` to the query, its 0-based ``rank``
    and the ``score`` it was ranked by (the similarity unless a ``RetrievalScoring`` was given)."""

    pattern: Pattern
    similarity: float
    rank: int
    score: float | None = None

    def __post_init__(self) -> None:
        if self.score is None:
            self.score = self.similarity
