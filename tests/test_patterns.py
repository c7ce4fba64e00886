"""SPEC §3: PatternCategory and Pattern."""

from __future__ import annotations

import copy
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch

from rbank_torch import Pattern, PatternCategory, RootCause, StepOutcome, TrajectoryRecorder, Verdict
from rbank_torch._util import utcnow


def test_categories():
    names = ["general", "reasoning", "code_generation", "research", "creative", "conversational",
             "tool_use", "error_recovery", "reflection"]
    for n in names:
        c = PatternCategory.parse(n)
        assert str(c) == n and c == getattr(PatternCategory, n.upper())
    assert str(PatternCategory.custom("x")) == "custom:x"
    assert PatternCategory.parse("custom:x") == PatternCategory.custom("x")
    assert hash(PatternCategory.parse("research")) == hash(PatternCategory.RESEARCH)
    assert len({PatternCategory.RESEARCH, PatternCategory.parse("research")}) == 1
    assert copy.deepcopy(PatternCategory.RESEARCH) == PatternCategory.RESEARCH
    for bad in ("nope", "custom:", "", "Research"):
        with pytest.raises(ValueError, match="category"):
            PatternCategory.parse(bad)


def test_new_pattern():
    p = Pattern.new([1.0, 2.0], "research", 0.7)
    assert (p.usage_count, p.success_count, p.avg_quality, p.metadata.source) == (0, 0, 0.0, "manual")
    q = Pattern.new([1.0, 2.0], PatternCategory.RESEARCH, 0.7)
    assert q.id > p.id and q.uuid != p.uuid
    with pytest.raises(ValueError, match="confidence"):
        Pattern.new([1.0], "research", 1.5)
    with pytest.raises(ValueError, match="embedding"):
        Pattern.new([float("inf")], "research", 0.5)
    with pytest.raises(ValueError, match="category"):
        Pattern.new([1.0], "unknown", 0.5)


def _traj(request_type=None, tools=(), tags=(), verdict=None, actions=("a",) * 7):
    rec = TrajectoryRecorder(torch.tensor([1.0, 0.0, 0.0]))
    for a in actions:
        rec.add_step(a, "r", StepOutcome.success(), 0.8)
    if request_type:
        rec.set_request_type(request_type)
    for t in tools:
        rec.record_tool(t)
    for t in tags:
        rec.add_tag(t)
    rec.add_lesson("L")
    return rec.complete(verdict or Verdict.success())


@pytest.mark.parametrize(
    "kw,category",
    [
        (dict(request_type="Programming task"), "code_generation"),
        (dict(request_type="write code"), "code_generation"),
        (dict(request_type="analyze logs"), "research"),
        (dict(request_type="creative"), "creative"),
        (dict(request_type="Write a poem"), "creative"),
        (dict(tools=["grep"]), "tool_use"),
        (dict(verdict=Verdict.recovered(RootCause.unknown("x"), 1, 0.5)), "reflection"),
        (dict(tags=["Logic puzzle"]), "reasoning"),
        (dict(tags=["chat"]), "conversational"),
        (dict(), "general"),
    ],
)
def test_from_trajectory_category(kw, category):
    assert str(Pattern.from_trajectory(_traj(**kw)).category) == category


def test_from_trajectory_fields():
    t = _traj(tags=["x"], actions=[f"s{i}" for i in range(7)])
    p = Pattern.from_trajectory(t)
    assert torch.equal(p.embedding, t.query_embedding) and p.embedding is not t.query_embedding
    assert p.confidence == p.avg_quality == t.quality
    assert (p.usage_count, p.success_count) == (1, 1)
    assert p.source_trajectories == [t.id] and p.lessons == ["L"]
    assert p.example_actions == ["s0", "s1", "s2", "s3", "s4"]
    assert p.metadata.tags == ["x"] and p.metadata.source == "trajectory"
    f = Pattern.from_trajectory(_traj(verdict=Verdict.recovered(RootCause.unknown("x"), 1, 0.1)))
    assert f.success_count == 1  # Trajectory.is_success: Recovered whatever the quality
    g = Pattern.from_trajectory(_traj(verdict=Verdict.partial(0.9)))
    assert g.success_count == 0


def test_from_lesson():
    lesson = SimpleNamespace(
        content="Avoid: x", embedding=torch.tensor([0.0, 1.0]), category="error_recovery", tags=["t"],
        example_actions=["a"], source_trajectories=[3, 4], importance=0.8, observation_count=7,
        success_rate=0.5, avg_quality=0.6,
    )
    p = Pattern.from_lesson(lesson)
    assert p.category == PatternCategory.ERROR_RECOVERY and p.confidence == 0.8
    assert (p.usage_count, p.success_count, p.avg_quality) == (7, 3, 0.6)
    assert p.lessons == ["Avoid: x"] and p.example_actions == ["a"] and p.source_trajectories == [3, 4]
    assert p.metadata.source == "lesson" and p.metadata.tags == ["t"]


def test_record_usage_and_success_rate():
    p = Pattern.new([1.0], "general", 0.5)
    assert p.success_rate() == 0
    before = p.last_accessed
    p.record_usage(True, 0.9)
    p.record_usage(False, 0.3)
    assert (p.usage_count, p.success_count) == (2, 1)
    assert p.avg_quality == pytest.approx(0.6)
    assert p.success_rate() == 0.5 and p.last_accessed >= before
    with pytest.raises(ValueError, match="quality"):
        p.record_usage(True, 1.2)
    assert p.usage_count == 2


def test_merge():
    a = Pattern.new([1.0, 0.0], "general", 0.5)
    b = Pattern.new([0.0, 1.0], "general", 0.9)
    a.usage_count, a.success_count, a.avg_quality = 1, 1, 0.3
    b.usage_count, b.success_count, b.avg_quality = 3, 2, 0.7
    a.lessons, b.lessons = ["x", "y"], ["y", "z"]
    a.example_actions = [f"a{i}" for i in range(8)]
    b.example_actions = ["a0", "b1", "b2", "b3"]
    a.source_trajectories, b.source_trajectories = [1], [2, 3]
    a.merge(b)
    assert torch.allclose(a.embedding, torch.tensor([0.25, 0.75]))
    assert (a.usage_count, a.success_count, a.confidence) == (4, 3, 0.9)
    assert a.avg_quality == pytest.approx(0.6)
    assert a.lessons == ["x", "y", "z"] and a.source_trajectories == [1, 2, 3]
    assert a.example_actions == [f"a{i}" for i in range(8)] + ["b1", "b2"]
    c, d = Pattern.new([1.0, 0.0], "general", 0.5), Pattern.new([0.0, 1.0], "general", 0.9)
    c.lessons, d.lessons = [], ["q"]
    c.merge(d)  # both unused: nothing happens
    assert c.confidence == 0.5 and c.lessons == [] and torch.equal(c.embedding, torch.tensor([1.0, 0.0]))


def test_similarity_and_prune():
    p = Pattern.new([3.0, 4.0], "general", 0.5)
    assert p.similarity([3.0, 4.0]) == pytest.approx(1.0)
    assert p.similarity([-4.0, 3.0]) == pytest.approx(0.0)
    assert p.similarity([1.0, 2.0, 3.0]) == 0.0
    assert p.similarity([0.0, 0.0]) == 0.0
    assert Pattern.new([0.0, 0.0], "general", 0.5).similarity([1.0, 0.0]) == 0.0
    p.last_accessed = utcnow() - timedelta(seconds=100)
    assert p.should_prune(1, 50, 0.5)
    assert not p.should_prune(0, 50, 0.5)  # usage 0 is not < 0
    assert not p.should_prune(1, 200, 0.5)  # not old enough
    assert not p.should_prune(1, 50, 0.0)  # quality not below


def test_pattern_equality_is_fieldwise():
    p = Pattern.new([1.0, 2.0], "general", 0.5)
    q = copy.deepcopy(p)
    assert p == q
    q.embedding = q.embedding + 1e-6
    assert p != q
