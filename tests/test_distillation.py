"""Memory distillation (SPEC §5): lessons, merging, ordering, dedup, compression, streaming, shards."""

from __future__ import annotations

import math
import random
from datetime import timedelta, timezone
from fractions import Fraction

import numpy as np
import pytest
import torch
from test_dedup import oracle_dedup

from rbank_torch._util import next_id, utcnow
from rbank_torch.dedup import greedy_dedup
from rbank_torch.distillation import (
    CompressedTrajectory,
    DistillationConfig,
    DistillationError,
    DistillationPartial,
    DistillationResult,
    KeyLesson,
    MemoryDistiller,
    estimate_trajectory_size,
    infer_category,
)
from rbank_torch.patterns import Pattern, PatternCategory
from rbank_torch.trajectory import StepOutcome, Trajectory, TrajectoryMetadata, TrajectoryStep
from rbank_torch.verdicts import ReasoningErrorType, RootCause, Verdict, failure_lesson

BASE = utcnow() - timedelta(days=10)
S, F, P = StepOutcome.success(), StepOutcome.failure("boom"), StepOutcome.partial("a", "b")


def traj(
    steps=(("search", S), ("answer", S)),
    verdict=None,
    emb=None,
    lessons=(),
    request_type=None,
    tools=(),
    tags=(),
    quality=None,
    at=0,
    dim=4,
    tid=None,
) -> Trajectory:
    ts = BASE + timedelta(seconds=at)
    t = Trajectory(
        id=next_id() if tid is None else tid,
        uuid="u",
        query_embedding=torch.randn(dim) if emb is None else torch.as_tensor(emb, dtype=torch.float32),
        steps=[TrajectoryStep(i, a, f"why {a}", o, 0.9, 5, ts) for i, (a, o) in enumerate(steps)],
        started_at=ts,
        metadata=TrajectoryMetadata(request_type=request_type, tools_invoked=list(tools), tags=list(tags)),
        lessons=list(lessons),
    )
    t.complete(verdict if verdict is not None else Verdict.success())
    t.completed_at = ts + timedelta(seconds=1)
    if quality is not None:
        t.quality = quality
    return t


def cfg(**kw) -> DistillationConfig:
    kw.setdefault("min_trajectories_for_distillation", 1)
    return DistillationConfig(**kw)


def lessons_by_text(result: DistillationResult) -> dict[str, KeyLesson]:
    return {k.content: k for k in result.key_lessons}


CAUSE = RootCause.tool_failure("pytest", "timeout")


# ----------------------------------------------------------------------------------------------------------
# Config


def test_config_defaults():
    c = DistillationConfig()
    assert c.min_age_for_distillation_secs == 86_400
    assert c.compression_ratio == 0.1
    assert c.min_quality_threshold == 0.4
    assert c.max_lessons == 100
    assert c.min_trajectories_for_distillation == 100
    assert c.deduplicate_lessons is True
    assert c.dedup_similarity_threshold == 0.85


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_lessons", -1),
        ("max_lessons", 2.5),
        ("min_trajectories_for_distillation", "3"),
        ("min_age_for_distillation_secs", -5),
        ("min_quality_threshold", 1.5),
        ("compression_ratio", float("nan")),
        ("dedup_similarity_threshold", float("inf")),
        ("deduplicate_lessons", "yes"),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DistillationConfig(**{field: value})


# ----------------------------------------------------------------------------------------------------------
# KeyLesson


def test_key_lesson_new_defaults():
    k = KeyLesson.new("Test lesson", [0.1] * 4, "general")
    assert k.observation_count == 1 and k.importance == 0.5
    assert k.success_rate == 0.0 and k.avg_quality == 0.0
    assert k.category == PatternCategory.GENERAL
    assert k.example_actions == [] and k.tags == [] and k.source_trajectories == []
    assert k.embedding.dtype == torch.float32 and k.embedding.shape == (4,)
    assert k.first_observed.tzinfo is not None
    with pytest.raises(ValueError, match="embedding"):
        KeyLesson.new("x", [float("nan")], "general")


def test_key_lesson_merge_arithmetic():
    a = KeyLesson.new("L", [1.0, 0.0], "research")
    a.importance, a.success_rate, a.avg_quality, a.observation_count = 0.5, 1.0, 0.9, 3
    a.source_trajectories, a.example_actions = [1, 2], [f"a{i}" for i in range(8)]
    b = KeyLesson.new("L", [0.0, 1.0], "general")
    b.importance, b.success_rate, b.avg_quality, b.observation_count = 0.8, 0.0, 0.1, 1
    b.source_trajectories, b.example_actions = [2, 3], ["a1", "x", "y", "z"]
    b.last_observed = a.last_observed + timedelta(hours=1)
    a.merge(b)
    assert a.observation_count == 4
    assert a.importance == pytest.approx((0.5 * 3 + 0.8) / 4)
    assert a.success_rate == pytest.approx(0.75)
    assert a.avg_quality == pytest.approx((0.9 * 3 + 0.1) / 4)
    assert a.source_trajectories == [1, 2, 3]
    assert a.example_actions == [f"a{i}" for i in range(8)] + ["x", "y"]
    assert a.last_observed == b.last_observed
    assert a.category == PatternCategory.RESEARCH and a.embedding.tolist() == [1.0, 0.0]


def test_key_lesson_similarities():
    a = KeyLesson.new("Test lesson about code generation", [1.0, 0, 0, 0], "general")
    b = KeyLesson.new("test LESSON about code generation", [1.0, 0, 0, 0], "general")
    c = KeyLesson.new("Different topic entirely", [0, 1.0, 0, 0], "general")
    assert a.content_similarity(b) == 1.0 and a.embedding_similarity(b) == 1.0
    assert a.content_similarity(c) == 0.0 and a.embedding_similarity(c) == 0.0


# ----------------------------------------------------------------------------------------------------------
# Lesson extraction


def test_lesson_texts_and_importances():
    ts = [
        traj(steps=[("plan", S), ("search", F), ("read", S), ("write", S), ("check", S)]),
        traj(verdict=Verdict.failure(CAUSE), steps=[("run", F)]),
        traj(verdict=Verdict.recovered(CAUSE, 2, 0.9), steps=[("run", F), ("rerun", S)]),
        traj(verdict=Verdict.partial(0.5), lessons=["Check inputs first"]),
        traj(verdict=Verdict.success(), steps=[("x", F)]),  # success without successful steps
    ]
    r = MemoryDistiller(cfg(deduplicate_lessons=False)).extract_key_lessons(ts)
    got = lessons_by_text(r)
    assert set(got) == {
        "Successful pattern: plan -> read -> write",
        "Avoid: Tool 'pytest' failed: timeout",
        "Successful pattern: rerun",
        "Recovery possible after 2 attempts via reflection",
        "Check inputs first",
    }  # a Partial trajectory yields only its explicit lessons
    assert got["Avoid: Tool 'pytest' failed: timeout"].importance == 0.8
    assert got["Recovery possible after 2 attempts via reflection"].importance == 0.9
    assert got["Successful pattern: plan -> read -> write"].importance == 0.5
    assert got["Check inputs first"].importance == 0.5
    assert got["Check inputs first"].success_rate == 0.0  # Partial: not a success
    assert got["Successful pattern: rerun"].success_rate == 1.0  # Recovered counts as success


def test_new_lesson_fields():
    e = torch.tensor([0.5, -1.0, 2.0, 0.0])
    t = traj(
        steps=[("a", S), ("b", F), ("c", S), ("d", S), ("e", S)],
        emb=e,
        lessons=["Be brief"],
        tags=["chat", "x"],
        request_type="research task",
    )
    r = MemoryDistiller(cfg()).extract_key_lessons([t])
    k = lessons_by_text(r)["Be brief"]
    assert torch.equal(k.embedding, e) and k.embedding.data_ptr() != t.query_embedding.data_ptr()
    assert k.observation_count == 1 and k.importance == 0.5
    assert k.success_rate == 1.0 and k.avg_quality == pytest.approx(t.quality, abs=1e-9)
    assert k.example_actions == ["a", "c", "d"]
    assert k.tags == ["chat", "x"] and k.source_trajectories == [t.id]
    assert k.category == PatternCategory.RESEARCH
    assert k.first_observed == k.last_observed == t.completed_at


def test_merge_by_identical_text():
    e1, e2 = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    t1 = traj(
        emb=e1,
        lessons=["Avoid: Tool 'pytest' failed: timeout"],
        tags=["first"],
        steps=[("s1", S), ("s2", S)],
        at=5,
    )
    t2 = traj(emb=e2, verdict=Verdict.failure(CAUSE), tags=["second"], steps=[("s3", S), ("s1", S)], at=50)
    t3 = traj(emb=e2, verdict=Verdict.failure(CAUSE), steps=[("s4", S)], request_type="code", at=1)
    r = MemoryDistiller(cfg(deduplicate_lessons=False)).extract_key_lessons([t1, t2, t3])
    k = lessons_by_text(r)["Avoid: Tool 'pytest' failed: timeout"]
    assert k.observation_count == 3
    assert k.importance == pytest.approx((0.5 + 0.8 + 0.8) / 3)
    assert k.success_rate == pytest.approx(1 / 3)
    assert k.avg_quality == pytest.approx((t1.quality + t2.quality + t3.quality) / 3, abs=1e-9)
    assert k.source_trajectories == [t1.id, t2.id, t3.id]
    assert k.example_actions == ["s1", "s2", "s3", "s4"]
    assert torch.equal(k.embedding, e1) and k.tags == ["first"]
    assert k.category == PatternCategory.GENERAL  # first observation's category
    assert k.last_observed == t2.completed_at and k.first_observed == t3.completed_at


def test_example_actions_capped_at_ten_and_first_observation_kept_as_is():
    ts = [traj(lessons=["L"], steps=[("a", S), ("a", S), ("b", S)])]
    ts += [traj(lessons=["L"], steps=[(f"x{i}", S), (f"y{i}", S), ("a", S)]) for i in range(6)]
    r = MemoryDistiller(cfg(deduplicate_lessons=False)).extract_key_lessons(ts)
    k = lessons_by_text(r)["L"]
    assert k.example_actions == ["a", "a", "b", "x0", "y0", "x1", "y1", "x2", "y2", "x3"]


def test_ordering_importance_times_log_count_ties_by_first_appearance():
    ts = []
    ts += [traj(lessons=["five"], steps=[]) for _ in range(5)]  # 0.5 * ln 6 = 0.896
    ts += [
        traj(verdict=Verdict.failure(RootCause.unknown("u")), steps=[]) for _ in range(2)
    ]  # 0.8 ln3 = 0.879
    ts += [traj(verdict=Verdict.recovered(CAUSE, 1, 0.5), steps=[])]  # 0.9 ln2 = 0.624
    ts += [traj(lessons=["tie-b", "tie-a"], steps=[])]  # 0.5 ln 2 each, b seen first
    ts += [traj(lessons=["nine"], steps=[]) for _ in range(9)]  # 0.5 ln 10 = 1.151
    r = MemoryDistiller(cfg(deduplicate_lessons=False)).extract_key_lessons(ts)
    assert [k.content for k in r.key_lessons] == [
        "nine",
        "five",
        "Avoid: Unknown failure: u",
        "Recovery possible after 1 attempts via reflection",
        "tie-b",
        "tie-a",
    ]


def test_dedup_merges_into_highest_jaccard_kept_lesson():
    e = torch.tensor([1.0, 0.0, 0.0, 0.0])
    pv = Verdict.partial(0.9)  # no "Successful pattern" lessons
    ts = []
    ts += [
        traj(emb=e, verdict=pv, lessons=["run the unit tests before commit"], steps=[("a", S)])
        for _ in range(4)
    ]
    ts += [
        traj(emb=e, verdict=pv, lessons=["run the unit tests before merge"], steps=[("b", S)])
        for _ in range(3)
    ]
    ts += [traj(emb=-e, verdict=pv, lessons=["unrelated"], steps=[]) for _ in range(2)]
    ts += [traj(emb=e, verdict=pv, lessons=["Run the unit tests before commit now"], steps=[("c", S)])]
    r = MemoryDistiller(cfg(dedup_similarity_threshold=0.7)).extract_key_lessons(ts)
    texts = [k.content for k in r.key_lessons]
    # "before merge": jaccard 5/7 with "before commit", 0.6*5/7+0.4 = 0.829 > 0.7 → merged
    assert "run the unit tests before merge" not in texts
    assert "Run the unit tests before commit now" not in texts
    assert "unrelated" in texts
    k = lessons_by_text(r)["run the unit tests before commit"]
    assert k.observation_count == 8
    # merged in scan order (by score): "before merge" (0.5 ln 4) precedes "... now" (0.5 ln 2)
    assert k.example_actions == ["a", "b", "c"]
    assert len(k.source_trajectories) == 8 and k.source_trajectories[:4] == [t.id for t in ts[:4]]
    # with dedup off all four texts survive
    r2 = MemoryDistiller(cfg(deduplicate_lessons=False, dedup_similarity_threshold=0.7)).extract_key_lessons(
        ts
    )
    assert len(r2.key_lessons) == 4
    # with a threshold above every score nothing merges
    r3 = MemoryDistiller(cfg(dedup_similarity_threshold=0.99)).extract_key_lessons(ts)
    assert len(r3.key_lessons) == 4


def test_truncation_after_dedup_keeps_merges_from_beyond_the_cut():
    e = torch.tensor([0.0, 1.0, 0.0, 0.0])
    ts = [traj(emb=e, lessons=["alpha beta gamma delta"], steps=[]) for _ in range(3)]
    ts += [traj(emb=torch.randn(4), lessons=[f"other {i}"], steps=[]) for i in range(5)]
    ts += [traj(emb=e, lessons=["alpha beta gamma delta epsilon"], steps=[])]  # last in order, merged
    r = MemoryDistiller(cfg(max_lessons=2)).extract_key_lessons(ts)
    assert len(r.key_lessons) == 2
    assert r.key_lessons[0].content == "alpha beta gamma delta"
    assert r.key_lessons[0].observation_count == 4
    assert r.key_lessons[1].content == "other 0"
    assert MemoryDistiller(cfg(max_lessons=0)).extract_key_lessons(ts).key_lessons == []


@pytest.mark.parametrize(
    "kw,expect",
    [
        (dict(verdict=Verdict.recovered(CAUSE, 1, 0.9), request_type="code", tools=["t"]), "reflection"),
        (dict(verdict=Verdict.failure(CAUSE), request_type="code", tools=["t"]), "error_recovery"),
        (dict(request_type="Write CODE", tools=["t"]), "code_generation"),
        (dict(request_type="deep research", tools=["t"]), "research"),
        (dict(verdict=Verdict.partial(0.3), request_type="chat", tools=["git"]), "tool_use"),
        (dict(request_type="chat"), "conversational"),
        (dict(request_type="coding"), "code_generation"),
        (dict(request_type="programming help"), "code_generation"),
        (dict(request_type="analyze logs"), "research"),
        (dict(request_type="creative"), "creative"),
        (dict(tags=["conversation"]), "conversational"),
        (dict(), "general"),
    ],
)
def test_categories(kw, expect):
    t = traj(quality=0.9, **kw)
    assert infer_category(t) == PatternCategory.parse(expect)
    r = MemoryDistiller(cfg()).extract_key_lessons([t])
    assert r.category_summary == {expect: 1}
    assert all(k.category == PatternCategory.parse(expect) for k in r.key_lessons)
    assert r.compressed_trajectories[0].category == PatternCategory.parse(expect)


def test_lessons_come_from_every_trajectory_but_only_good_ones_are_compressed():
    good = traj(
        steps=[("a", S), ("b", F), ("c", S), ("d", S), ("e", S), ("f", S), ("g", S)], lessons=["keep"]
    )
    edge = traj(quality=0.4, lessons=["edge"])
    bad = traj(verdict=Verdict.failure(CAUSE), steps=[("z", F)], lessons=["from bad"])
    r = MemoryDistiller(cfg()).extract_key_lessons([good, edge, bad])
    assert [c.original_id for c in r.compressed_trajectories] == [good.id, edge.id]
    assert "from bad" in lessons_by_text(r) and "Avoid: Tool 'pytest' failed: timeout" in lessons_by_text(r)
    c = r.compressed_trajectories[0]
    assert isinstance(c, CompressedTrajectory)
    assert c.key_actions == ["a", "c", "d", "e", "f"]
    assert c.step_count == 7 and c.quality == good.quality and c.lessons == ["keep"]
    assert c.verdict == good.verdict and c.timestamp == good.started_at
    assert torch.equal(c.key_embedding, good.query_embedding)
    assert c.key_embedding.data_ptr() != good.query_embedding.data_ptr()
    back = Trajectory.from_compressed(c)
    assert back.id == good.id and back.steps == [] and back.quality == good.quality


def test_size_estimate_and_ratio():
    t1 = traj(steps=[("ab", S), ("cdé", S)], lessons=["xyz"], dim=8)
    t2 = traj(quality=0.1, steps=[("q", F)], dim=8)
    r = MemoryDistiller(cfg(deduplicate_lessons=False)).extract_key_lessons([t1, t2])
    s1 = 256 + 32 + (96 + 2 + len("why ab")) + (96 + 4 + len("why cdé".encode())) + 3
    s2 = 256 + 32 + 96 + 1 + 5
    assert estimate_trajectory_size(t1) == s1 and estimate_trajectory_size(t2) == s2
    c1 = 128 + 32 + 3 + 2 + 4
    assert r.compressed_trajectories[0].estimated_size() == c1
    assert r.memory_saved == s1 + s2 - c1
    assert r.compression_ratio == pytest.approx(c1 / (s1 + s2))
    assert r.processing_time_ms >= 0 and r.timestamp.tzinfo == timezone.utc
    assert r.trajectories_processed == 2


def test_too_few_trajectories_raise_and_streaming_state_survives():
    d = MemoryDistiller(DistillationConfig(min_trajectories_for_distillation=3))
    with pytest.raises(DistillationError, match="min_trajectories_for_distillation"):
        d.extract_key_lessons([traj(), traj()])
    assert issubclass(DistillationError, ValueError)
    d.add([traj(), traj()])
    with pytest.raises(DistillationError):
        d.finish()
    assert d.trajectories_seen == 2
    d.add([traj()])
    assert d.finish().trajectories_processed == 3
    assert d.trajectories_seen == 0
    assert d.stats().distillation_count == 1 and d.stats().total_distilled == 3


def test_invalid_chunk_is_rolled_back():
    rng = random.Random(0)
    good = random_trajectories(rng, 40)
    d = MemoryDistiller(cfg())
    d.add(good[:20])
    bad = random_trajectories(rng, 5)
    bad[3].quality = float("nan")
    with pytest.raises(ValueError, match=r"trajectories\[3\]\.quality"):
        d.add(bad)
    with pytest.raises(ValueError, match=r"trajectories\[1\]"):
        d.add([good[20], "not a trajectory"])
    wrong_dim = random_trajectories(rng, 3, dim=5)
    with pytest.raises(ValueError, match="dimension"):
        d.add(wrong_dim)
    d.add(good[20:])
    assert_same(d.finish(), MemoryDistiller(cfg()).extract_key_lessons(good))


# ----------------------------------------------------------------------------------------------------------
# Other operations


def test_compress_old_trajectories():
    now = utcnow()
    old = traj()
    old.started_at = now - timedelta(days=2)
    edge = traj()
    edge.started_at = now - timedelta(seconds=86_400)
    young = traj()
    young.started_at = now - timedelta(hours=1)
    out = MemoryDistiller().compress_old_trajectories([old, young, edge], now=now)
    assert [c.original_id for c in out] == [old.id, edge.id]
    out2 = MemoryDistiller(DistillationConfig(min_age_for_distillation_secs=60)).compress_old_trajectories(
        [old, young, edge], now=now
    )
    assert len(out2) == 3


def test_generate_summary():
    ts = [
        traj(steps=[("b", S), ("a", S)], lessons=["L2", "L1"], request_type="research"),
        traj(verdict=Verdict.failure(CAUSE), steps=[("a", F)], lessons=["L1"]),
        traj(verdict=Verdict.recovered(CAUSE, 1, 0.5), steps=[("c", S)]),
        traj(verdict=Verdict.partial(0.2), steps=[("b", S)], request_type="research"),
        traj(steps=[("d", S)], request_type="research"),
    ]
    s = MemoryDistiller().generate_summary(ts)
    assert s.total == 5 and s.success_count == 3 and s.failure_count == 1
    assert s.avg_quality == pytest.approx(sum(t.quality for t in ts) / 5)
    assert s.common_actions == [("b", 2), ("a", 2), ("c", 1), ("d", 1)]
    assert s.common_lessons == [("L1", 2), ("L2", 1)]
    assert s.category == PatternCategory.RESEARCH
    many = [traj(steps=[(f"act{i}", S)] * (i + 1)) for i in range(12)]
    assert [a for a, _ in MemoryDistiller().generate_summary(many).common_actions] == [
        f"act{i}" for i in range(11, 1, -1)
    ]
    empty = MemoryDistiller().generate_summary([])
    assert empty.total == 0 and empty.avg_quality == 0.0 and empty.category == PatternCategory.GENERAL


def test_key_lessons_become_patterns():
    ts = random_trajectories(random.Random(1), 30)
    r = MemoryDistiller(cfg()).extract_key_lessons(ts)
    k = r.key_lessons[0]
    p = Pattern.from_lesson(k)
    assert p.lessons == [k.content] and p.usage_count == k.observation_count
    assert p.confidence == pytest.approx(k.importance) and p.metadata.source == "lesson"
    assert p.success_count == math.floor(k.observation_count * k.success_rate)


# ----------------------------------------------------------------------------------------------------------
# A plain reference of the whole rule, and streaming / shards


ACTIONS = ["search docs", "read code", "write code", "run tests", "check output", "ask user", "plan"]
LESSONS = [
    "Run the tests first",
    "run the tests first please",
    "Ask before acting",
    "Keep answers short",
    "keep the answers short",
    "Read the stack trace",
]


def random_trajectories(rng: random.Random, n: int, dim: int = 6) -> list[Trajectory]:
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    centers = torch.randn(3, dim, generator=g)
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.5:
            v = Verdict.success()
        elif u < 0.7:
            v = Verdict.failure(
                rng.choice(
                    [
                        CAUSE,
                        RootCause.unknown("flaky"),
                        RootCause.reasoning_error(ReasoningErrorType.HALLUCINATION, "x"),
                    ]
                )
            )
        elif u < 0.85:
            v = Verdict.partial(rng.random())
        else:
            v = Verdict.recovered(CAUSE, rng.randint(1, 3), rng.random())
        steps = [(rng.choice(ACTIONS), rng.choice([S, S, S, F, P])) for _ in range(rng.randint(0, 5))]
        emb = centers[rng.randrange(3)] + 0.05 * torch.randn(dim, generator=g)
        out.append(
            traj(
                steps=steps,
                verdict=v,
                emb=emb,
                lessons=rng.sample(LESSONS, rng.randint(0, 2)),
                request_type=rng.choice([None, "code", "research", "chat"]),
                tools=rng.choice([[], ["git"]]),
                tags=[rng.choice(["a", "b"])],
                at=rng.randrange(10_000),
                dim=dim,
            )
        )
    return out


class RefLesson:
    def __init__(self, text, t, imp):
        ex = [s.action for s in t.steps if s.outcome.is_success][:3]
        self.text, self.emb, self.cat, self.tags = (
            text,
            t.query_embedding,
            infer_category(t),
            list(t.metadata.tags),
        )
        self.count, self.imp = 1, Fraction(imp, 10)
        self.succ, self.q = (1 if t.is_success else 0), Fraction(t.quality)
        self.actions, self.ids = list(ex), [t.id]
        self.first = self.last = t.completed_at

    def merge(self, o):
        self.count += o.count
        self.imp += o.imp
        self.succ += o.succ
        self.q += o.q
        for i in o.ids:
            if i not in self.ids:
                self.ids.append(i)
        for a in o.actions:
            if a not in self.actions and len(self.actions) < 10:
                self.actions.append(a)
        self.first, self.last = min(self.first, o.first), max(self.last, o.last)


def reference_distill(ts, c: DistillationConfig):
    table: dict[str, RefLesson] = {}
    for t in ts:
        gen = [(x, 5) for x in t.lessons]
        succ = [s.action for s in t.steps if s.outcome.is_success]
        if t.is_success and succ:
            gen.append(("Successful pattern: " + " -> ".join(succ[:3]), 5))
        if t.verdict.kind == "failure":
            gen.append((failure_lesson(t.verdict.cause, t.steps), 8))
        if t.verdict.kind == "recovered":
            gen.append(("Recovery possible via reflection" if c.readable_lessons
                        else f"Recovery possible after {t.verdict.attempts} attempts via reflection", 9))
        for text, imp in gen:
            le = RefLesson(text, t, imp)
            if text in table:
                table[text].merge(le)
            else:
                table[text] = le
    ls = list(table.values())
    ls.sort(key=lambda x: -(float(x.imp / x.count) * math.log1p(x.count)))  # stable: first appearance
    if c.deduplicate_lessons and len(ls) > 1:
        parent = oracle_dedup(
            [x.text for x in ls], torch.stack([x.emb for x in ls]), c.dedup_similarity_threshold
        )
        kept = []
        for i, p in enumerate(parent):
            if p == i:
                kept.append(ls[i])
            else:
                ls[p].merge(ls[i])
        ls = kept
    return ls[: c.max_lessons], [t.id for t in ts if t.quality >= c.min_quality_threshold]


def assert_matches_reference(result: DistillationResult, ts, c):
    ref, comp_ids = reference_distill(ts, c)
    assert [k.content for k in result.key_lessons] == [x.text for x in ref]
    for k, x in zip(result.key_lessons, ref):
        assert k.observation_count == x.count
        assert k.importance == float(x.imp / x.count)
        assert k.success_rate == x.succ / x.count
        assert k.avg_quality == pytest.approx(float(x.q / x.count), abs=1e-9)
        assert k.example_actions == x.actions
        assert k.source_trajectories == x.ids
        assert k.tags == x.tags and k.category == x.cat
        assert torch.equal(k.embedding, x.emb)
        assert (k.first_observed, k.last_observed) == (x.first, x.last)
    assert [ct.original_id for ct in result.compressed_trajectories] == comp_ids
    assert result.trajectories_processed == len(ts)
    assert result.memory_saved == max(
        0,
        sum(estimate_trajectory_size(t) for t in ts)
        - sum(ct.estimated_size() for ct in result.compressed_trajectories),
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(dedup_similarity_threshold=0.6),
        dict(deduplicate_lessons=False),
        dict(max_lessons=5, dedup_similarity_threshold=0.5),
        dict(readable_lessons=True),
    ],
)
def test_matches_plain_reference(seed, kw):
    ts = random_trajectories(random.Random(seed), 150)
    c = cfg(**kw)
    r = MemoryDistiller(c).extract_key_lessons(ts)
    assert len(r.key_lessons) > 3
    assert_matches_reference(r, ts, c)


def assert_same(a: DistillationResult, b: DistillationResult) -> None:
    assert a.trajectories_processed == b.trajectories_processed
    assert a.memory_saved == b.memory_saved and a.compression_ratio == b.compression_ratio
    assert a.category_summary == b.category_summary
    assert len(a.key_lessons) == len(b.key_lessons)
    for x, y in zip(a.key_lessons, b.key_lessons):
        for f in (
            "content",
            "category",
            "importance",
            "observation_count",
            "success_rate",
            "avg_quality",
            "example_actions",
            "tags",
            "source_trajectories",
            "first_observed",
            "last_observed",
        ):
            assert getattr(x, f) == getattr(y, f), f
        assert torch.equal(x.embedding, y.embedding)
    assert len(a.compressed_trajectories) == len(b.compressed_trajectories)
    for x, y in zip(a.compressed_trajectories, b.compressed_trajectories):
        assert (
            x.original_id,
            x.quality,
            x.lessons,
            x.key_actions,
            x.step_count,
            x.category,
            x.timestamp,
        ) == (y.original_id, y.quality, y.lessons, y.key_actions, y.step_count, y.category, y.timestamp)
        assert torch.equal(x.key_embedding, y.key_embedding)


@pytest.mark.parametrize("chunks", [[1], [7], [50, 1, 99, 50], [200], [3, 0, 197]])
def test_streaming_equals_one_shot(chunks):
    ts = random_trajectories(random.Random(42), 200)
    c = cfg(dedup_similarity_threshold=0.6)
    one = MemoryDistiller(c).extract_key_lessons(ts)
    d = MemoryDistiller(c)
    pos, i = 0, 0
    while pos < len(ts):
        step = chunks[i % len(chunks)]
        d.add(ts[pos : pos + step])
        pos += step
        i += 1
    assert d.trajectories_seen == 200
    assert_same(d.finish(), one)
    # a generator works too, and extract_key_lessons leaves a running stream alone
    d.add(iter(ts[:10]))
    assert_same(d.extract_key_lessons(ts), one)
    assert d.trajectories_seen == 10


@pytest.mark.parametrize("cuts", [[100], [1, 2, 150], [0, 60, 60, 199]])
def test_shard_partials_merge_to_one_shot(cuts):
    ts = random_trajectories(random.Random(5), 200)
    c = cfg(dedup_similarity_threshold=0.6)
    one = MemoryDistiller(c).extract_key_lessons(ts)
    bounds = [0, *cuts, len(ts)]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        d = MemoryDistiller(c)
        for k in range(a, b, 17):  # each shard itself streams
            d.add(ts[k : min(b, k + 17)])
        parts.append(d.partial())
    coord = MemoryDistiller(c)
    for p in parts:
        coord.merge_partial(p)
    assert_same(coord.finish(), one)
    # the same through the plain-data form (tensors + JSON)
    coord2 = MemoryDistiller(c)
    for p in parts:
        sd = p.to_state_dict()
        assert all(isinstance(v, (torch.Tensor, str)) for v in sd.values())
        coord2.merge_partial(sd)
    assert_same(coord2.finish(), one)


def test_partial_state_dict_rejects_garbage():
    with pytest.raises(ValueError, match="partial"):
        DistillationPartial.from_state_dict({"meta": "{}"})
    p = MemoryDistiller(cfg()).partial()
    sd = p.to_state_dict()
    sd["count"] = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError):
        DistillationPartial.from_state_dict(sd)


def test_dedup_in_distillation_uses_greedy_dedup_rule():
    ts = random_trajectories(random.Random(9), 120)
    c = cfg(dedup_similarity_threshold=0.55, max_lessons=1000)
    r_on = MemoryDistiller(c).extract_key_lessons(ts)
    r_off = MemoryDistiller(cfg(deduplicate_lessons=False, max_lessons=1000)).extract_key_lessons(ts)
    texts = [k.content for k in r_off.key_lessons]
    parent = greedy_dedup(texts, torch.stack([k.embedding for k in r_off.key_lessons]), 0.55)
    kept = [texts[i] for i in range(len(texts)) if int(parent[i]) == i]
    assert [k.content for k in r_on.key_lessons] == kept
    assert len(kept) < len(texts)
    assert sum(k.observation_count for k in r_on.key_lessons) == sum(
        k.observation_count for k in r_off.key_lessons
    )
    assert np.isclose(
        sum(k.importance * k.observation_count for k in r_on.key_lessons),
        sum(k.importance * k.observation_count for k in r_off.key_lessons),
    )


def _hash_embed(texts):
    """A deterministic stand-in for a text model: one pseudo-random unit vector per distinct text."""
    import zlib

    out = []
    for s in texts:
        g = torch.Generator().manual_seed(zlib.crc32(s.encode("utf-8")))
        out.append(torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0))
    return torch.stack(out)


def test_sample_log_top_lessons_are_distinct_and_complete():
    """The sample log, four times over (960 runs): the ten most important lessons never differ only in a
    number, never end in an empty detail, and every recovery counts towards one lesson."""
    import pathlib
    import re

    from rbank_torch.logs import iter_log_batches

    log = pathlib.Path(__file__).resolve().parents[1] / "examples" / "sample_log.jsonl"
    spec = MemoryDistiller(DistillationConfig())  # SPEC §5's texts: one recovery lesson per attempt count
    d = MemoryDistiller(DistillationConfig(readable_lessons=True))
    for batch in iter_log_batches([log] * 4, embed=_hash_embed):
        spec.add(batch.trajectories)
        d.add(batch.trajectories)
    r = d.finish()
    assert r.trajectories_processed == 960
    top = [k.content for k in r.key_lessons[:10]]
    shapes = [re.sub(r"\d+", "N", t) for t in top]
    assert len(set(shapes)) == len(shapes), top
    assert not any(t.rstrip().endswith((":", "-")) for t in top), top
    rec = [k for k in r.key_lessons if k.content.startswith("Recovery possible")]
    assert [k.content for k in rec] == ["Recovery possible via reflection"]
    assert rec[0].observation_count == 88 and top[0] == rec[0].content
    assert not any(re.search(r"\b1 (attempts|steps)\b", k.content) for k in r.key_lessons)
    spec_rec = sorted(k.content for k in spec.finish().key_lessons if k.content.startswith("Recovery possible"))
    assert spec_rec == [f"Recovery possible after {n} attempts via reflection" for n in (1, 2, 3)]
