"""Verdicts, root causes and the verdict analyzer (SPEC §2)."""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._util import check_finite_number

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Sequence

    from .patterns import PatternCategory
    from .trajectory import Trajectory, TrajectoryStep

__all__ = [
    "ReasoningErrorType",
    "RootCause",
    "VerdictKind",
    "Verdict",
    "FailurePattern",
    "RecoveryStrategy",
    "VerdictAnalysis",
    "VerdictAnalyzerStats",
    "VerdictAnalyzer",
    "plural",
    "failed_step_lesson",
    "failure_lesson",
]


class ReasoningErrorType(str, enum.Enum):
    """Kinds of reasoning errors; they print as snake_case."""

    LOGICAL_INCONSISTENCY = "logical_inconsistency"
    FACTUAL_ERROR = "factual_error"
    HALLUCINATION = "hallucination"
    CIRCULAR_REASONING = "circular_reasoning"
    NON_SEQUITUR = "non_sequitur"
    OVER_GENERALIZATION = "over_generalization"
    UNDER_SPECIFICATION = "under_specification"
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class RootCause:
    """Why a trajectory failed. Build it with one of the classmethod constructors.

    ``cause_type`` is the CamelCase name of the cause (``"ToolFailure"``, …); ``str(cause)`` is its text.
    """

    cause_type: str
    missing: tuple[str, ...] = ()
    details: str = ""
    tool: str = ""
    error: str = ""
    error_type: ReasoningErrorType | None = None
    description: str = ""
    resource: str = ""
    limit: str = ""
    service: str = ""
    limitation: str = ""

    CAUSE_TYPES = (
        "InsufficientContext",
        "InvalidInput",
        "ToolFailure",
        "ReasoningError",
        "ResourceConstraint",
        "ExternalFailure",
        "CapabilityLimit",
        "Unknown",
    )

    @classmethod
    def insufficient_context(cls, missing: list[str]) -> RootCause:
        return cls("InsufficientContext", missing=tuple(str(m) for m in missing))

    @classmethod
    def invalid_input(cls, details: str) -> RootCause:
        return cls("InvalidInput", details=str(details))

    @classmethod
    def tool_failure(cls, tool: str, error: str) -> RootCause:
        return cls("ToolFailure", tool=str(tool), error=str(error))

    @classmethod
    def reasoning_error(cls, error_type: ReasoningErrorType | str, description: str) -> RootCause:
        try:
            et = ReasoningErrorType(error_type)
        except ValueError:
            raise ValueError(
                f"error_type must be one of {[e.value for e in ReasoningErrorType]}, got {error_type!r}"
            ) from None
        return cls("ReasoningError", error_type=et, description=str(description))

    @classmethod
    def resource_constraint(cls, resource: str, limit: str) -> RootCause:
        return cls("ResourceConstraint", resource=str(resource), limit=str(limit))

    @classmethod
    def external_failure(cls, service: str, error: str) -> RootCause:
        return cls("ExternalFailure", service=str(service), error=str(error))

    @classmethod
    def capability_limit(cls, limitation: str) -> RootCause:
        return cls("CapabilityLimit", limitation=str(limitation))

    @classmethod
    def unknown(cls, details: str) -> RootCause:
        return cls("Unknown", details=str(details))

    def __str__(self) -> str:
        # an empty detail leaves its separator out ("Tool 'git' failed", not "Tool 'git' failed: ")
        t = self.cause_type
        if t == "InsufficientContext":
            missing = ", ".join(m for m in self.missing if m.strip())
            return "Insufficient context" + (f": missing {missing}" if missing else "")
        if t == "InvalidInput":
            return _with("Invalid input", self.details)
        if t == "ToolFailure":
            return _with(f"Tool '{self.tool}' failed" if self.tool.strip() else "A tool failed", self.error)
        if t == "ReasoningError":
            return _with(f"Reasoning error ({self.error_type})" if self.error_type else "Reasoning error",
                         self.description)
        if t == "ResourceConstraint":
            res, lim = self.resource.strip(), self.limit.strip()
            if res and lim:
                return f"Resource constraint: {res} exceeded {lim}"
            return _with("Resource constraint", res or (f"limit {lim} exceeded" if lim else ""))
        if t == "ExternalFailure":
            return _with(f"External failure ({self.service})" if self.service.strip() else "External failure",
                         self.error)
        if t == "CapabilityLimit":
            return _with("Capability limit", self.limitation)
        return _with("Unknown failure", self.details)

    def to_dict(self) -> dict:
        """JSON-ready form (only the fields this cause uses)."""
        d: dict = {"type": self.cause_type}
        for name in ("details", "tool", "error", "description", "resource", "limit", "service", "limitation"):
            v = getattr(self, name)
            if v:
                d[name] = v
        if self.missing:
            d["missing"] = list(self.missing)
        if self.error_type is not None:
            d["error_type"] = self.error_type.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RootCause:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on an unknown type."""
        t = d.get("type")
        if t not in cls.CAUSE_TYPES:
            raise ValueError(f"root cause type must be one of {list(cls.CAUSE_TYPES)}, got {t!r}")
        et = d.get("error_type")
        return cls(
            cause_type=t,
            missing=tuple(str(m) for m in d.get("missing", ())),
            details=str(d.get("details", "")),
            tool=str(d.get("tool", "")),
            error=str(d.get("error", "")),
            error_type=ReasoningErrorType(et) if et is not None else None,
            description=str(d.get("description", "")),
            resource=str(d.get("resource", "")),
            limit=str(d.get("limit", "")),
            service=str(d.get("service", "")),
            limitation=str(d.get("limitation", "")),
        )


class VerdictKind(str, enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    PARTIAL = "partial"
    RECOVERED = "recovered"

    def __str__(self) -> str:
        return self.value


def plural(n: int, word: str, words: str | None = None) -> str:
    """``"1 step"``, ``"2 steps"``: the count and the word in the right number."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def _with(text: str, detail: str) -> str:
    """``text: detail``, or ``text`` alone when the detail is empty (no dangling colon)."""
    detail = detail.strip()
    return f"{text}: {detail}" if detail else text


def _clamp01(x: float, name: str) -> float:
    v = check_finite_number(x, name)
    return min(max(v, 0.0), 1.0)


@dataclass(frozen=True)
class Verdict:
    """The judgement of a whole trajectory. Build it with the classmethod constructors."""

    kind: VerdictKind
    cause: RootCause | None = None
    completion_ratio: float = 0.0
    original: RootCause | None = None
    attempts: int = 0
    final_quality: float = 0.0

    @classmethod
    def success(cls) -> Verdict:
        return cls(VerdictKind.SUCCESS)

    @classmethod
    def failure(cls, cause: RootCause) -> Verdict:
        if not isinstance(cause, RootCause):
            raise ValueError(f"cause must be a RootCause, got {type(cause).__name__}")
        return cls(VerdictKind.FAILURE, cause=cause)

    @classmethod
    def partial(cls, completion_ratio: float) -> Verdict:
        """Partial completion; the ratio is clamped to [0, 1] (NaN/inf raise ``ValueError``)."""
        return cls(VerdictKind.PARTIAL, completion_ratio=_clamp01(completion_ratio, "completion_ratio"))

    @classmethod
    def recovered(cls, original: RootCause, attempts: int, final_quality: float) -> Verdict:
        """Recovered after ``attempts`` reflection attempts; final_quality is clamped to [0, 1]."""
        if not isinstance(original, RootCause):
            raise ValueError(f"original must be a RootCause, got {type(original).__name__}")
        if int(attempts) < 0:
            raise ValueError(f"attempts must be >= 0, got {attempts}")
        return cls(
            VerdictKind.RECOVERED,
            original=original,
            attempts=int(attempts),
            final_quality=_clamp01(final_quality, "final_quality"),
        )

    @property
    def is_success(self) -> bool:
        """Success, or Recovered with final_quality ≥ 0.8."""
        return self.kind is VerdictKind.SUCCESS or (
            self.kind is VerdictKind.RECOVERED and self.final_quality >= 0.8
        )

    @property
    def is_failure(self) -> bool:
        return self.kind is VerdictKind.FAILURE

    def quality_score(self) -> float:
        if self.kind is VerdictKind.SUCCESS:
            return 1.0
        if self.kind is VerdictKind.FAILURE:
            return 0.0
        if self.kind is VerdictKind.PARTIAL:
            return 0.25 + 0.5 * self.completion_ratio
        return self.final_quality

    def description(self) -> str:
        if self.kind is VerdictKind.SUCCESS:
            return "Success"
        if self.kind is VerdictKind.FAILURE:
            return f"Failure: {self.cause}"
        if self.kind is VerdictKind.PARTIAL:
            return f"Partial: {self.completion_ratio * 100:.0f}% complete"
        return f"Recovered after {self.attempts} attempts, quality {self.final_quality * 100:.0f}%"  # SPEC §2

    def root_cause(self) -> RootCause | None:
        """The Failure's cause, or the Recovered's original cause."""
        return self.cause if self.kind is VerdictKind.FAILURE else self.original

    def to_dict(self) -> dict:
        d: dict = {"kind": self.kind.value}
        if self.kind is VerdictKind.FAILURE:
            d["cause"] = self.cause.to_dict()  # type: ignore[union-attr]
        elif self.kind is VerdictKind.PARTIAL:
            d["completion_ratio"] = self.completion_ratio
        elif self.kind is VerdictKind.RECOVERED:
            d["original"] = self.original.to_dict()  # type: ignore[union-attr]
            d["attempts"] = self.attempts
            d["final_quality"] = self.final_quality
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Verdict:
        kind = d.get("kind")
        if kind == "success":
            return cls.success()
        if kind == "failure":
            return cls.failure(RootCause.from_dict(d.get("cause") or {}))
        if kind == "partial":
            return cls.partial(d.get("completion_ratio", 0.0))
        if kind == "recovered":
            return cls.recovered(
                RootCause.from_dict(d.get("original") or {}), int(d.get("attempts", 0)), d.get("final_quality", 0.0)
            )
        raise ValueError(f"verdict kind must be one of success, failure, partial, recovered; got {kind!r}")


@dataclass
class FailurePattern:
    """A known failure pattern: matches when a failed step's action contains one of ``associated_actions``."""

    id: str
    cause_type: str
    frequency: int = 0
    triggers: list[str] = field(default_factory=list)
    mitigations: list[str] = field(default_factory=list)
    associated_actions: list[str] = field(default_factory=list)


@dataclass
class RecoveryStrategy:
    name: str
    description: str
    applicable_causes: list[str]
    success_rate: float
    actions: list[str] = field(default_factory=list)
    effort_score: int = 1


@dataclass
class VerdictAnalysis:
    verdict: Verdict
    root_cause: RootCause | None
    contributing_factors: list[str]
    failure_patterns: list[FailurePattern]
    recovery_strategies: list[RecoveryStrategy]
    lessons: list[str]
    pattern_category: PatternCategory
    confidence: float
    improvements: list[str]


@dataclass
class VerdictAnalyzerStats:
    known_patterns: int
    recovery_strategies: int
    analyses_performed: int


def _builtin_patterns() -> list[FailurePattern]:
    return [
        FailurePattern(
            id="context_gap",
            cause_type="InsufficientContext",
            triggers=["missing information", "ambiguous request", "unknown reference"],
            mitigations=["Ask clarifying questions", "Search for missing context before acting"],
            associated_actions=["search", "query"],
        ),
        FailurePattern(
            id="tool_error",
            cause_type="ToolFailure",
            triggers=["tool timeout", "invalid tool arguments", "tool unavailable"],
            mitigations=["Validate tool inputs", "Retry with backoff", "Fall back to an alternative tool"],
            associated_actions=["execute", "run"],
        ),
        FailurePattern(
            id="reasoning_flaw",
            cause_type="ReasoningError",
            triggers=["contradiction", "unsupported conclusion", "skipped step"],
            mitigations=["Decompose the problem", "Verify each step", "Cross-check conclusions"],
            associated_actions=["analyze", "reason"],
        ),
    ]


def _builtin_strategies() -> list[RecoveryStrategy]:
    return [
        RecoveryStrategy(
            "Clarification Loop",
            "Ask for or look up the missing information, then retry",
            ["InsufficientContext", "InvalidInput"],
            0.75,
            ["identify missing information", "ask clarifying question", "retry with context"],
            3,
        ),
        RecoveryStrategy(
            "Decomposition",
            "Break the problem into smaller verifiable sub-problems",
            ["ReasoningError", "CapabilityLimit"],
            0.70,
            ["split task", "solve sub-problems", "combine results"],
            5,
        ),
        RecoveryStrategy(
            "Alternative Approach",
            "Use a different tool or service to reach the same goal",
            ["ToolFailure", "ExternalFailure"],
            0.65,
            ["select alternative tool", "adapt inputs", "retry"],
            4,
        ),
        RecoveryStrategy(
            "Self-Verification",
            "Re-check each reasoning step against the evidence",
            ["ReasoningError"],
            0.80,
            ["list assumptions", "verify each step", "revise conclusion"],
            2,
        ),
    ]


class VerdictAnalyzer:
    """Explains a trajectory's verdict: root cause, contributing factors, matching failure patterns,
    applicable recovery strategies, lessons and improvements (SPEC §2). Thread-safe.

    Args:
        readable: ``False`` (default): the texts of SPEC §2 word for word ("1 steps failed", "Avoid: <action> -
            <error>"). ``True``: counts in the right number ("1 step failed") and failed-step lessons that
            name the step's tool and leave out an empty error (what the ``rbank`` command prints).
    """

    def __init__(self, readable: bool = False) -> None:
        if not isinstance(readable, bool):
            raise ValueError(f"readable must be a bool, got {readable!r}")
        self.readable = readable
        self._patterns: dict[str, FailurePattern] = {p.id: p for p in _builtin_patterns()}
        self._strategies: list[RecoveryStrategy] = _builtin_strategies()
        self._analyses = 0
        self._lock = threading.Lock()

    def _count(self, n: int, word: str) -> str:
        """``"<n> <word>s"`` as SPEC §2 writes it, or in the right number when ``readable``."""
        return plural(n, word) if self.readable else _spec_count(n, word)

    @property
    def failure_patterns(self) -> list[FailurePattern]:
        return list(self._patterns.values())

    @property
    def strategies(self) -> list[RecoveryStrategy]:
        return list(self._strategies)

    def learn_pattern(self, pattern: FailurePattern) -> None:
        """Add a failure pattern, replacing one with the same id."""
        with self._lock:
            self._patterns[pattern.id] = pattern

    def add_strategy(self, strategy: RecoveryStrategy) -> None:
        with self._lock:
            self._strategies.append(strategy)

    def stats(self) -> VerdictAnalyzerStats:
        with self._lock:
            return VerdictAnalyzerStats(len(self._patterns), len(self._strategies), self._analyses)

    def analyze(self, trajectory: Trajectory) -> VerdictAnalysis:
        from .patterns import PatternCategory
        from .trajectory import StepOutcomeKind

        t = trajectory
        verdict = t.verdict
        root = verdict.root_cause()
        steps = t.steps

        factors: list[str] = []
        failed = [s for s in steps if s.outcome.is_failure]
        if failed:
            factors.append(f"{self._count(len(failed), 'step')} failed")
        low = sum(1 for s in steps if s.confidence < 0.5)
        if low:
            factors.append(f"{self._count(low, 'step')} had low confidence")
        for s in steps:
            if s.outcome.kind is StepOutcomeKind.NEEDS_RETRY:
                factors.append(f"Step '{s.action}' needed retry: {s.outcome.reason}")
        if t.total_latency_ms > 30_000:
            factors.append("Long execution time")

        with self._lock:
            known = list(self._patterns.values())
            strategies = list(self._strategies)
        failed_actions = [s.action.lower() for s in failed]
        patterns = [
            p
            for p in known
            if any(a.lower() in fa for fa in failed_actions for a in p.associated_actions)
        ]
        applicable = (
            [s for s in strategies if root.cause_type in s.applicable_causes] if root is not None else []
        )

        lessons = list(t.lessons)
        # Trajectory.is_success (Success or Recovered, any quality), as the reference chooses this branch
        if t.is_success:
            ok = [s.action for s in steps if s.outcome.is_success][:3]
            if ok:
                lessons.append("Successful pattern: " + " -> ".join(ok))
        else:
            for s in failed:
                lessons.append(failed_step_lesson(s) if self.readable else f"Avoid: {s.action} - {s.outcome.error}")
        if verdict.kind is VerdictKind.RECOVERED:
            lessons.append(f"Recovery possible with {self._count(verdict.attempts, 'reflection attempt')}")

        actions = [s.action.lower() for s in steps]

        def any_action(*words: str) -> bool:
            return any(w in a for a in actions for w in words)

        if verdict.kind is VerdictKind.RECOVERED:
            category = PatternCategory.REFLECTION
        elif verdict.kind is VerdictKind.FAILURE:
            category = PatternCategory.ERROR_RECOVERY
        elif any_action("code", "implement"):
            category = PatternCategory.CODE_GENERATION
        elif any_action("search", "research"):
            category = PatternCategory.RESEARCH
        elif any_action("tool", "execute"):
            category = PatternCategory.TOOL_USE
        else:
            category = PatternCategory.GENERAL

        confidence = (
            0.5
            + 0.1 * min(len(factors), 2)
            + 0.1 * min(len(patterns), 2)
            + 0.1 * min(len(lessons), 3)
            + (0.1 if applicable else 0.0)
        )
        confidence = min(confidence, 1.0)

        improvements: list[str] = []
        unsure = [s.action for s in steps if s.confidence < 0.6]
        if unsure:
            improvements.append(f"Improve confidence in {self._count(len(unsure), 'step')}: {', '.join(unsure[:3])}")
        if len(steps) > 2 and not any_action("verify", "check"):
            improvements.append("Consider adding verification steps")
        if verdict.kind is VerdictKind.FAILURE and not any(
            s.outcome.kind is StepOutcomeKind.NEEDS_RETRY for s in steps
        ):
            improvements.append("Consider implementing retry logic for recoverable errors")

        with self._lock:
            self._analyses += 1
        return VerdictAnalysis(
            verdict=verdict,
            root_cause=root,
            contributing_factors=factors,
            failure_patterns=patterns,
            recovery_strategies=applicable,
            lessons=lessons,
            pattern_category=category,
            confidence=confidence,
            improvements=improvements,
        )


def _spec_count(n: int, word: str) -> str:
    return f"{n} {word}s"


def failed_step_lesson(step: TrajectoryStep) -> str:
    """``"Avoid: <action> - <error>"`` for a failed step, naming its tool when one is recorded and not
    already in the action (``"Avoid: push the branch (tool 'git') - rejected"``); no dash without an error."""
    text = f"Avoid: {step.action}"
    tool = step.metadata.tool_used if step.metadata is not None else None
    if tool and tool.lower() not in step.action.lower():
        text += f" (tool '{tool}')"
    err = step.outcome.error.strip()
    return f"{text} - {err}" if err else text


def failure_lesson(cause: RootCause, steps: Sequence[TrajectoryStep] = ()) -> str:
    """``"Avoid: <cause>"``; a tool failure whose cause records no error (or no tool) takes them from the
    trajectory's failed step of that tool, so the lesson names both when the run recorded them."""
    if cause.cause_type == "ToolFailure" and not (cause.error.strip() and cause.tool.strip()):
        tool, err = cause.tool.strip(), cause.error.strip()
        failed = [s for s in steps if s.outcome.is_failure]
        same = [s for s in failed if s.metadata is not None and s.metadata.tool_used == tool] if tool else []
        for s in same or failed:
            if not tool and s.metadata is not None and s.metadata.tool_used:
                tool = s.metadata.tool_used
            if not err and s.outcome.error.strip():
                err = s.outcome.error.strip()
            if tool and err:
                break
        cause = RootCause.tool_failure(tool, err)
    return f"Avoid: {cause}"
