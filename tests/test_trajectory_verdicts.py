"""SPEC §1 (trajectories) and §2 (verdicts, analyzer)."""

from __future__ import annotations

import time

import pytest
import torch

from rbank_torch import (
    FailurePattern,
    PatternCategory,
    ReasoningErrorType,
    RecoveryStrategy,
    RootCause,
    StepOutcome,
    Trajectory,
    TrajectoryRecorder,
    TrajectoryStep,
    Verdict,
    VerdictAnalyzer,
)
from rbank_torch.trajectory import StepOutcomeKind


def make_traj(steps, verdict, **meta):
    rec = TrajectoryRecorder(torch.ones(4))
    for action, outcome, conf in steps:
        rec.add_step(action, "why", outcome, conf)
    for k, v in meta.items():
        getattr(rec, k)(*v) if isinstance(v, tuple) else getattr(rec, k)(v)
    return rec.complete(verdict)


# ---------------------------------------------------------------- StepOutcome
@pytest.mark.parametrize(
    "outcome,score,kind",
    [
        (StepOutcome.success(), 1.0, "success"),
        (StepOutcome.partial("a", "b"), 0.6, "partial"),
        (StepOutcome.failure("boom"), 0.0, "failure"),
        (StepOutcome.skipped("n/a"), 0.3, "skipped"),
        (StepOutcome.needs_retry("flaky", ["again"]), 0.2, "needs_retry"),
    ],
)
def test_step_outcome_scores(outcome, score, kind):
    assert outcome.quality_score() == score
    assert outcome.kind == kind and str(outcome.kind) == kind
    assert outcome.is_success == (kind == "success")
    assert outcome.is_failure == (kind == "failure")


def test_step_quality_and_validation():
    s = TrajectoryStep(0, "a", "r", StepOutcome.partial("x", "y"), 0.5)
    assert s.quality() == pytest.approx(0.3)
    for bad in (-0.1, 1.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="confidence"):
            TrajectoryStep(0, "a", "r", StepOutcome.success(), bad)
    with pytest.raises(ValueError, match="latency_ms"):
        TrajectoryStep(0, "a", "r", StepOutcome.success(), 0.5, latency_ms=-1)


# ---------------------------------------------------------------- Trajectory
def test_new_trajectory_defaults():
    t = Trajectory.new([0.1, 0.2])
    assert t.verdict == Verdict.partial(0.0) and t.quality == 0
    assert t.query_embedding.dtype == torch.float32 and t.query_embedding.shape == (2,)
    t2 = Trajectory.new([1.0])
    assert t2.id > t.id and t2.uuid != t.uuid
    with pytest.raises(ValueError, match="query_embedding"):
        Trajectory.new([float("nan"), 1.0])


@pytest.mark.parametrize(
    "verdict,quality",
    [
        (Verdict.success(), 1.0),
        (Verdict.failure(RootCause.unknown("x")), 0.0),
        (Verdict.partial(0.4), 0.4),
        (Verdict.recovered(RootCause.unknown("x"), 2, 0.7), 0.7),
    ],
)
def test_quality_without_steps(verdict, quality):
    t = Trajectory.new([1.0, 0.0])
    t.complete(verdict)
    assert t.quality == pytest.approx(quality)
    assert t.completed_at is not None and t.completed_at >= t.started_at


def test_quality_with_steps():
    steps = [("a", StepOutcome.success(), 0.8), ("b", StepOutcome.partial("x", "y"), 0.5)]
    mean = (0.8 + 0.3) / 2
    assert make_traj(steps, Verdict.success()).quality == pytest.approx(mean)
    assert make_traj(steps, Verdict.failure(RootCause.unknown("x"))).quality == pytest.approx(mean * 0.3)
    assert make_traj(steps, Verdict.partial(0.5)).quality == pytest.approx(mean * 0.75)
    assert make_traj(steps, Verdict.recovered(RootCause.unknown("x"), 1, 0.6)).quality == pytest.approx(mean * 0.6)


def test_trajectory_helpers():
    t = make_traj(
        [("a", StepOutcome.success(), 0.8), ("b", StepOutcome.failure("e"), 0.4), ("c", StepOutcome.success(), 0.6)],
        Verdict.recovered(RootCause.unknown("x"), 1, 0.5),
        record_tokens=(10, 5),
    )
    assert t.step_count() == 3
    assert t.step_success_rate() == pytest.approx(2 / 3)
    assert t.avg_confidence() == pytest.approx(0.6)
    assert t.total_tokens() == 15
    assert [s.index for s in t.steps] == [0, 1, 2]
    assert t.is_success and not t.is_failure  # Recovered counts, whatever the quality
    assert not t.verdict.is_success  # the stricter verdict rule
    empty = Trajectory.new([1.0])
    assert empty.step_success_rate() == 0 and empty.avg_confidence() == 0
    empty.add_lesson("l1")
    empty.set_response_embedding([1.0, 2.0])
    assert empty.lessons == ["l1"] and empty.response_embedding.tolist() == [1.0, 2.0]
    f = make_traj([], Verdict.failure(RootCause.unknown("x")))
    assert f.is_failure and not f.is_success


def test_recorder_latency_metadata_and_full_steps():
    rec = TrajectoryRecorder([1.0, 2.0])
    rec.add_step("no timer", "r", StepOutcome.success(), 1.0)
    rec.start_step()
    time.sleep(0.02)
    rec.add_step("timed", "r", StepOutcome.success(), 1.0)
    rec.add_full_step(TrajectoryStep(99, "full", "r", StepOutcome.success(), 0.5))
    rec.set_session_id("s")
    rec.set_user_id("u")
    rec.set_request_type("coding")
    rec.add_tag("t")
    rec.record_tokens(3, 4)
    rec.record_tokens(1, 1)
    rec.record_model("m")
    rec.record_model("m")
    rec.record_tool("grep")
    rec.record_tool("grep")
    rec.add_lesson("lesson")
    rec.set_response_embedding([0.5])
    assert rec.step_count() == 3
    t = rec.trajectory
    assert t.steps[0].latency_ms == 0
    assert t.steps[1].latency_ms >= 15
    assert t.steps[2].index == 2
    md = t.metadata
    assert (md.session_id, md.user_id, md.request_type, md.tags) == ("s", "u", "coding", ["t"])
    assert (md.total_input_tokens, md.total_output_tokens) == (4, 5)
    assert md.models_used == ["m"] and md.tools_invoked == ["grep"]
    done = rec.complete(Verdict.success())
    assert done is t and t.lessons == ["lesson"] and t.verdict.is_success


# ---------------------------------------------------------------- Verdict / RootCause
def test_verdict_rules():
    assert Verdict.partial(1.7).completion_ratio == 1.0
    assert Verdict.partial(-3).completion_ratio == 0.0
    assert Verdict.recovered(RootCause.unknown("x"), 1, 2.0).final_quality == 1.0
    with pytest.raises(ValueError, match="completion_ratio"):
        Verdict.partial(float("nan"))
    rc = RootCause.unknown("x")
    assert Verdict.success().is_success and not Verdict.success().is_failure
    assert Verdict.recovered(rc, 1, 0.8).is_success
    assert not Verdict.recovered(rc, 1, 0.79).is_success
    assert Verdict.failure(rc).is_failure and not Verdict.partial(0.5).is_failure
    assert Verdict.success().quality_score() == 1
    assert Verdict.failure(rc).quality_score() == 0
    assert Verdict.partial(0.5).quality_score() == pytest.approx(0.5)
    assert Verdict.recovered(rc, 1, 0.42).quality_score() == pytest.approx(0.42)
    assert Verdict.success().description() == "Success"
    assert Verdict.failure(RootCause.invalid_input("bad")).description() == "Failure: Invalid input: bad"
    assert Verdict.partial(0.5).description() == "Partial: 50% complete"
    assert Verdict.recovered(rc, 2, 0.85).description() == "Recovered after 2 attempts, quality 85%"


def test_root_cause_texts():
    cases = [
        (RootCause.insufficient_context(["a", "b"]), "Insufficient context: missing a, b", "InsufficientContext"),
        (RootCause.invalid_input("d"), "Invalid input: d", "InvalidInput"),
        (RootCause.tool_failure("grep", "e"), "Tool 'grep' failed: e", "ToolFailure"),
        (
            RootCause.reasoning_error(ReasoningErrorType.NON_SEQUITUR, "d"),
            "Reasoning error (non_sequitur): d",
            "ReasoningError",
        ),
        (RootCause.resource_constraint("memory", "4GB"), "Resource constraint: memory exceeded 4GB", "ResourceConstraint"),
        (RootCause.external_failure("api", "e"), "External failure (api): e", "ExternalFailure"),
        (RootCause.capability_limit("l"), "Capability limit: l", "CapabilityLimit"),
        (RootCause.unknown("d"), "Unknown failure: d", "Unknown"),
    ]
    for cause, text, ctype in cases:
        assert str(cause) == text
        assert cause.cause_type == ctype
        assert RootCause.from_dict(cause.to_dict()) == cause
    assert [str(e) for e in ReasoningErrorType] == [
        "logical_inconsistency", "factual_error", "hallucination", "circular_reasoning",
        "non_sequitur", "over_generalization", "under_specification", "other",
    ]
    with pytest.raises(ValueError, match="error_type"):
        RootCause.reasoning_error("nonsense", "x")


# ---------------------------------------------------------------- VerdictAnalyzer
def test_analyzer_failure():
    steps = [
        ("search the web", StepOutcome.failure("timeout"), 0.4),
        ("execute script", StepOutcome.failure("exit 1"), 0.9),
        ("summarise", StepOutcome.success(), 0.55),
    ]
    cause = RootCause.tool_failure("bash", "exit 1")
    t = make_traj(steps, Verdict.failure(cause), add_lesson="own lesson")
    t.total_latency_ms = 31_000
    a = VerdictAnalyzer().analyze(t)
    assert a.root_cause == cause
    assert a.contributing_factors == ["2 steps failed", "1 steps had low confidence", "Long execution time"]  # SPEC §2
    assert [p.id for p in a.failure_patterns] == ["context_gap", "tool_error"]
    assert [s.name for s in a.recovery_strategies] == ["Alternative Approach"]
    assert a.lessons == ["own lesson", "Avoid: search the web - timeout", "Avoid: execute script - exit 1"]
    assert a.pattern_category == PatternCategory.ERROR_RECOVERY
    # 0.5 + 0.1*2 (factors) + 0.1*2 (patterns) + 0.1*3 (lessons) + 0.1 (strategy), capped at 1
    assert a.confidence == 1.0
    assert a.improvements == [
        "Improve confidence in 2 steps: search the web, summarise",
        "Consider adding verification steps",
        "Consider implementing retry logic for recoverable errors",
    ]


def test_analyzer_success_and_recovered():
    steps = [
        ("implement parser", StepOutcome.success(), 0.9),
        ("check output", StepOutcome.success(), 0.9),
        ("retry flaky", StepOutcome.needs_retry("race", []), 0.9),
        ("write docs", StepOutcome.success(), 0.9),
        ("publish", StepOutcome.success(), 0.9),
    ]
    an = VerdictAnalyzer()
    a = an.analyze(make_traj(steps, Verdict.success()))
    assert a.root_cause is None and a.recovery_strategies == [] and a.failure_patterns == []
    assert a.contributing_factors == ["Step 'retry flaky' needed retry: race"]
    assert a.lessons == ["Successful pattern: implement parser -> check output -> write docs"]
    assert a.pattern_category == PatternCategory.CODE_GENERATION
    assert a.confidence == pytest.approx(0.5 + 0.1 + 0.1)
    assert a.improvements == []

    cause = RootCause.reasoning_error(ReasoningErrorType.HALLUCINATION, "made up")
    r = an.analyze(make_traj([("reason", StepOutcome.success(), 0.9)], Verdict.recovered(cause, 3, 0.9)))
    assert r.root_cause == cause
    assert [s.name for s in r.recovery_strategies] == ["Decomposition", "Self-Verification"]
    assert r.lessons == ["Successful pattern: reason", "Recovery possible with 3 reflection attempts"]
    assert r.pattern_category == PatternCategory.REFLECTION
    assert an.stats().analyses_performed == 2


@pytest.mark.parametrize(
    "action,category",
    [("do research", "research"), ("use tool", "tool_use"), ("execute", "tool_use"), ("chat", "general")],
)
def test_analyzer_categories(action, category):
    a = VerdictAnalyzer().analyze(make_traj([(action, StepOutcome.success(), 0.9)], Verdict.partial(0.5)))
    assert str(a.pattern_category) == category


def test_analyzer_learn_and_add():
    an = VerdictAnalyzer()
    assert an.stats().known_patterns == 3 and an.stats().recovery_strategies == 4
    an.learn_pattern(FailurePattern("tool_error", "ToolFailure", associated_actions=["deploy"]))
    an.learn_pattern(FailurePattern("new", "Unknown", associated_actions=["parse"]))
    an.add_strategy(RecoveryStrategy("Ask", "ask a human", ["Unknown"], 0.5, [], 1))
    assert an.stats().known_patterns == 4 and an.stats().recovery_strategies == 5
    t = make_traj(
        [("deploy app", StepOutcome.failure("x"), 0.9), ("execute", StepOutcome.failure("y"), 0.9),
         ("parse", StepOutcome.failure("z"), 0.9)],
        Verdict.failure(RootCause.unknown("?")),
    )
    a = an.analyze(t)
    assert [p.id for p in a.failure_patterns] == ["tool_error", "new"]  # replaced one no longer matches "execute"
    assert [s.name for s in a.recovery_strategies] == ["Ask"]
    assert StepOutcomeKind.NEEDS_RETRY.value == "needs_retry"


def test_texts_use_singular_for_one_and_leave_out_empty_details():
    rc = RootCause.tool_failure("git", "")
    assert str(rc) == "Tool 'git' failed"  # no dangling colon
    assert str(RootCause.external_failure("search api", "")) == "External failure (search api)"
    assert str(RootCause.insufficient_context([])) == "Insufficient context"
    assert str(RootCause.unknown("")) == "Unknown failure"
    assert str(RootCause.resource_constraint("memory", "")) == "Resource constraint: memory"
    assert Verdict.recovered(rc, 2, 0.85).description() == "Recovered after 2 attempts, quality 85%"
    steps = [("push the branch", StepOutcome.failure(""), 0.4), ("summarise", StepOutcome.success(), 0.9)]
    t = make_traj(steps, Verdict.recovered(rc, 1, 0.5))
    a = VerdictAnalyzer(readable=True).analyze(t)
    assert a.contributing_factors == ["1 step failed", "1 step had low confidence"]
    assert a.lessons == ["Successful pattern: summarise", "Recovery possible with 1 reflection attempt"]
    assert a.improvements[0] == "Improve confidence in 1 step: push the branch"
    f = VerdictAnalyzer(readable=True).analyze(make_traj(steps, Verdict.failure(rc)))
    assert f.lessons == ["Avoid: push the branch"]  # an empty error leaves no dangling dash
    # by default the texts of SPEC §2, word for word
    spec = VerdictAnalyzer().analyze(t)
    assert spec.contributing_factors == ["1 steps failed", "1 steps had low confidence"]
    assert spec.lessons == ["Successful pattern: summarise", "Recovery possible with 1 reflection attempts"]
    assert VerdictAnalyzer().analyze(make_traj(steps, Verdict.failure(rc))).lessons == ["Avoid: push the branch - "]
    with pytest.raises(ValueError, match="readable"):
        VerdictAnalyzer(readable=1)  # type: ignore[arg-type]


def test_failure_lesson_takes_the_error_of_the_failed_tool_step():
    from rbank_torch.trajectory import StepMetadata
    from rbank_torch.verdicts import failed_step_lesson, failure_lesson

    t = make_traj([("push the branch", StepOutcome.failure("rejected: non-fast-forward"), 0.4)],
                  Verdict.failure(RootCause.tool_failure("git", "")))
    t.steps[0].metadata = StepMetadata(tool_used="git")
    assert failure_lesson(t.verdict.cause, t.steps) == "Avoid: Tool 'git' failed: rejected: non-fast-forward"
    assert failed_step_lesson(t.steps[0]) == "Avoid: push the branch (tool 'git') - rejected: non-fast-forward"
    assert failure_lesson(RootCause.tool_failure("git", "")) == "Avoid: Tool 'git' failed"  # nothing to take
    assert failure_lesson(RootCause.tool_failure("git", "boom"), t.steps) == "Avoid: Tool 'git' failed: boom"
