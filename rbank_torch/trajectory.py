"""Trajectories: the recorded steps of one agent run and their verdict (SPEC §1)."""

from __future__ import annotations

import enum
import time
import uuid as _uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import torch

from ._util import as_embedding, check_finite_number, check_unit, next_id, utcnow
from .verdicts import Verdict, VerdictKind

if TYPE_CHECKING:  # pragma: no cover
    from .distillation import CompressedTrajectory

__all__ = [
    "StepOutcomeKind",
    "StepOutcome",
    "StepMetadata",
    "TrajectoryStep",
    "TrajectoryMetadata",
    "Trajectory",
    "TrajectoryRecorder",
]


class StepOutcomeKind(str, enum.Enum):
    SUCCESS = "success"
    PARTIAL = "partial"
    FAILURE = "failure"
    SKIPPED = "skipped"
    NEEDS_RETRY = "needs_retry"

    def __str__(self) -> str:
        return self.value


_OUTCOME_SCORE = {
    StepOutcomeKind.SUCCESS: 1.0,
    StepOutcomeKind.PARTIAL: 0.6,
    StepOutcomeKind.FAILURE: 0.0,
    StepOutcomeKind.SKIPPED: 0.3,
    StepOutcomeKind.NEEDS_RETRY: 0.2,
}


@dataclass(frozen=True)
class StepOutcome:
    """What one step achieved. Build it with the classmethod constructors."""

    kind: StepOutcomeKind
    achieved: str = ""
    missing: str = ""
    error: str = ""
    reason: str = ""
    suggestions: tuple[str, ...] = ()

    @classmethod
    def success(cls) -> StepOutcome:
        return cls(StepOutcomeKind.SUCCESS)

    @classmethod
    def partial(cls, achieved: str, missing: str) -> StepOutcome:
        return cls(StepOutcomeKind.PARTIAL, achieved=str(achieved), missing=str(missing))

    @classmethod
    def failure(cls, error: str) -> StepOutcome:
        return cls(StepOutcomeKind.FAILURE, error=str(error))

    @classmethod
    def skipped(cls, reason: str) -> StepOutcome:
        return cls(StepOutcomeKind.SKIPPED, reason=str(reason))

    @classmethod
    def needs_retry(cls, reason: str, suggestions: list[str] | tuple[str, ...] = ()) -> StepOutcome:
        return cls(StepOutcomeKind.NEEDS_RETRY, reason=str(reason), suggestions=tuple(str(s) for s in suggestions))

    @property
    def is_success(self) -> bool:
        return self.kind is StepOutcomeKind.SUCCESS

    @property
    def is_failure(self) -> bool:
        return self.kind is StepOutcomeKind.FAILURE

    def quality_score(self) -> float:
        """success 1.0, partial 0.6, failure 0.0, skipped 0.3, needs_retry 0.2."""
        return _OUTCOME_SCORE[self.kind]

    def to_dict(self) -> dict:
        d: dict = {"kind": self.kind.value}
        for name in ("achieved", "missing", "error", "reason"):
            v = getattr(self, name)
            if v:
                d[name] = v
        if self.suggestions:
            d["suggestions"] = list(self.suggestions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StepOutcome:
        try:
            kind = StepOutcomeKind(d.get("kind"))
        except ValueError:
            raise ValueError(
                f"outcome kind must be one of {[k.value for k in StepOutcomeKind]}, got {d.get('kind')!r}"
            ) from None
        return cls(
            kind,
            achieved=str(d.get("achieved", "")),
            missing=str(d.get("missing", "")),
            error=str(d.get("error", "")),
            reason=str(d.get("reason", "")),
            suggestions=tuple(str(s) for s in d.get("suggestions", ())),
        )


@dataclass
class StepMetadata:
    tool_used: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    model: str | None = None
    tags: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class TrajectoryStep:
    """One step of a trajectory. ``quality() = outcome.quality_score() * confidence``."""

    index: int
    action: str
    rationale: str
    outcome: StepOutcome
    confidence: float
    latency_ms: int = 0
    timestamp: datetime = field(default_factory=utcnow)
    context_embedding: torch.Tensor | None = None
    metadata: StepMetadata | None = None

    def __post_init__(self) -> None:
        self.confidence = check_unit(self.confidence, "confidence")
        lat = check_finite_number(self.latency_ms, "latency_ms")
        if lat < 0:
            raise ValueError(f"latency_ms must be >= 0, got {lat}")
        self.latency_ms = int(lat)
        if not isinstance(self.outcome, StepOutcome):
            raise ValueError(f"outcome must be a StepOutcome, got {type(self.outcome).__name__}")
        if self.context_embedding is not None:
            self.context_embedding = as_embedding(self.context_embedding, "context_embedding")

    def quality(self) -> float:
        return self.outcome.quality_score() * self.confidence


@dataclass
class TrajectoryMetadata:
    session_id: str | None = None
    user_id: str | None = None
    request_type: str | None = None
    total_input_tokens: int = 0
    total_output_tokens: int = 0
    models_used: list[str] = field(default_factory=list)
    tools_invoked: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class Trajectory:
    """A recorded agent run: query embedding ``[D]``, steps, verdict and quality.

    A new trajectory (``Trajectory.new``) has verdict ``Verdict.partial(0.0)`` and quality 0.
    """

    id: int
    uuid: str
    query_embedding: torch.Tensor
    response_embedding: torch.Tensor | None = None
    steps: list[TrajectoryStep] = field(default_factory=list)
    verdict: Verdict = field(default_factory=lambda: Verdict.partial(0.0))
    quality: float = 0.0
    total_latency_ms: int = 0
    started_at: datetime = field(default_factory=utcnow)
    completed_at: datetime | None = None
    metadata: TrajectoryMetadata = field(default_factory=TrajectoryMetadata)
    lessons: list[str] = field(default_factory=list)

    @classmethod
    def new(cls, query_embedding: Any) -> Trajectory:
        """A fresh trajectory with a new id and uuid (validates the embedding)."""
        return cls(id=next_id(), uuid=str(_uuid.uuid4()), query_embedding=as_embedding(query_embedding, "query_embedding"))

    def complete(self, verdict: Verdict) -> None:
        """Set the verdict, ``completed_at``, ``total_latency_ms`` and ``quality`` (SPEC §1)."""
        if not isinstance(verdict, Verdict):
            raise ValueError(f"verdict must be a Verdict, got {type(verdict).__name__}")
        self.verdict = verdict
        self.completed_at = utcnow()
        self.total_latency_ms = max(0, int((self.completed_at - self.started_at).total_seconds() * 1000))
        self.quality = self.compute_quality()

    def compute_quality(self) -> float:
        v = self.verdict
        if not self.steps:
            if v.kind is VerdictKind.SUCCESS:
                return 1.0
            if v.kind is VerdictKind.FAILURE:
                return 0.0
            if v.kind is VerdictKind.PARTIAL:
                return v.completion_ratio
            return v.final_quality
        mean = sum(s.quality() for s in self.steps) / len(self.steps)
        if v.kind is VerdictKind.SUCCESS:
            factor = 1.0
        elif v.kind is VerdictKind.FAILURE:
            factor = 0.3
        elif v.kind is VerdictKind.PARTIAL:
            factor = 0.5 + 0.5 * v.completion_ratio
        else:
            factor = v.final_quality
        return mean * factor

    def step_count(self) -> int:
        return len(self.steps)

    def step_success_rate(self) -> float:
        if not self.steps:
            return 0.0
        return sum(1 for s in self.steps if s.outcome.is_success) / len(self.steps)

    def avg_confidence(self) -> float:
        if not self.steps:
            return 0.0
        return sum(s.confidence for s in self.steps) / len(self.steps)

    def total_tokens(self) -> int:
        return self.metadata.total_input_tokens + self.metadata.total_output_tokens

    @property
    def is_success(self) -> bool:
        """Verdict is Success or Recovered, whatever the quality (looser than ``Verdict.is_success``)."""
        return self.verdict.kind in (VerdictKind.SUCCESS, VerdictKind.RECOVERED)

    @property
    def is_failure(self) -> bool:
        return self.verdict.kind is VerdictKind.FAILURE

    @property
    def query_text(self) -> str | None:
        """The task's text (``metadata.attributes["query"]``), which its pattern keeps as ``text``; None
        when the trajectory was started from an embedding alone."""
        v = self.metadata.attributes.get("query")
        return v if isinstance(v, str) else None

    @query_text.setter
    def query_text(self, text: str | None) -> None:
        if text is None:
            self.metadata.attributes.pop("query", None)
        elif not isinstance(text, str):
            raise ValueError(f"query_text must be a string or None, got {type(text).__name__}")
        else:
            self.metadata.attributes["query"] = text

    def add_lesson(self, lesson: str) -> None:
        self.lessons.append(str(lesson))

    def set_response_embedding(self, embedding: Any) -> None:
        self.response_embedding = as_embedding(embedding, "response_embedding")

    @classmethod
    def from_compressed(cls, ct: CompressedTrajectory) -> Trajectory:
        """A minimal trajectory (no steps) rebuilt from its compressed form; keeps id, verdict, quality,
        lessons, timestamp and category (as a tag ``category:<name>``)."""
        t = cls(
            id=int(ct.original_id),
            uuid=str(_uuid.uuid4()),
            query_embedding=as_embedding(ct.key_embedding, "key_embedding"),
            verdict=ct.verdict,
            quality=float(ct.quality),
            started_at=ct.timestamp,
            completed_at=ct.timestamp,
            lessons=list(ct.lessons),
        )
        t.metadata.tags.append(f"category:{ct.category}")
        t.metadata.attributes["compressed"] = "true"
        t.metadata.attributes["step_count"] = str(int(ct.step_count))
        if ct.key_actions:
            t.metadata.attributes["key_actions"] = "\n".join(ct.key_actions)
        return t


class TrajectoryRecorder:
    """Builds a :class:`Trajectory` step by step while an agent runs.

    Example:
        >>> rec = TrajectoryRecorder(torch.randn(8))
        >>> rec.start_step()
        >>> rec.add_step("search docs", "need context", StepOutcome.success(), 0.9)
        >>> t = rec.complete(Verdict.success())
    """

    def __init__(self, query_embedding: Any) -> None:
        self._t = Trajectory.new(query_embedding)
        self._step_start: float | None = None

    @property
    def trajectory(self) -> Trajectory:
        """The trajectory being recorded (read it, don't modify it)."""
        return self._t

    def start_step(self) -> None:
        self._step_start = time.perf_counter()

    def add_step(self, action: str, rationale: str, outcome: StepOutcome, confidence: float) -> None:
        lat = 0 if self._step_start is None else int((time.perf_counter() - self._step_start) * 1000)
        self._t.steps.append(
            TrajectoryStep(
                index=len(self._t.steps),
                action=str(action),
                rationale=str(rationale),
                outcome=outcome,
                confidence=confidence,
                latency_ms=lat,
            )
        )
        self._step_start = None

    def add_full_step(self, step: TrajectoryStep) -> None:
        step.index = len(self._t.steps)
        self._t.steps.append(step)

    def set_session_id(self, session_id: str) -> None:
        self._t.metadata.session_id = str(session_id)

    def set_user_id(self, user_id: str) -> None:
        self._t.metadata.user_id = str(user_id)

    def set_request_type(self, request_type: str) -> None:
        self._t.metadata.request_type = str(request_type)

    def add_tag(self, tag: str) -> None:
        self._t.metadata.tags.append(str(tag))

    def record_tokens(self, input_tokens: int, output_tokens: int) -> None:
        if int(input_tokens) < 0 or int(output_tokens) < 0:
            raise ValueError("input_tokens and output_tokens must be >= 0")
        self._t.metadata.total_input_tokens += int(input_tokens)
        self._t.metadata.total_output_tokens += int(output_tokens)

    def record_model(self, name: str) -> None:
        if name not in self._t.metadata.models_used:
            self._t.metadata.models_used.append(str(name))

    def record_tool(self, name: str) -> None:
        if name not in self._t.metadata.tools_invoked:
            self._t.metadata.tools_invoked.append(str(name))

    def add_lesson(self, lesson: str) -> None:
        self._t.add_lesson(lesson)

    def set_response_embedding(self, embedding: Any) -> None:
        self._t.set_response_embedding(embedding)

    def step_count(self) -> int:
        return len(self._t.steps)

    def complete(self, verdict: Verdict) -> Trajectory:
        self._t.complete(verdict)
        return self._t
