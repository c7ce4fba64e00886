"""SPEC §6: ReasoningBank."""

from __future__ import annotations

import logging

import pytest
import torch

from rbank_torch import (
    Pattern,
    PatternCategory,
    PatternStoreConfig,
    ReasoningBank,
    ReasoningBankConfig,
    RootCause,
    SnapshotError,
    StepOutcome,
    Trajectory,
    TrajectoryStep,
    Verdict,
)
from rbank_torch.distillation import DistillationConfig, DistillationError
from rbank_torch.trajectory import StepMetadata

D = 12


def bank_cfg(**kw) -> ReasoningBankConfig:
    kw.setdefault("embedding_dim", D)
    return ReasoningBankConfig(**kw)


def traj(bank, g, verdict=None, conf=0.9, actions=("search docs", "write code"), lessons=(), request_type=None):
    rec = bank.start_trajectory(torch.randn(D, generator=g))
    for a in actions:
        rec.add_step(a, "because", StepOutcome.success(), conf)
    for lesson in lessons:
        rec.add_lesson(lesson)
    if request_type:
        rec.set_request_type(request_type)
    return rec.complete(verdict or Verdict.success())


def test_config_defaults_and_dim_governs():
    c = ReasoningBankConfig()
    assert (c.storage_path, c.embedding_dim, c.ef_construction, c.ef_search, c.m) == (".rbank", 768, 200, 100, 32)
    assert (c.max_trajectories, c.min_quality_threshold) == (100_000, 0.3)
    assert (c.consolidation_interval_secs, c.auto_consolidate) == (3600, True)
    bank = ReasoningBank(bank_cfg(embedding_dim=7))
    assert bank.store.config.embedding_dim == 7
    assert bank.config.embedding_dim == 7
    assert bank.config.pattern_config.embedding_dim == 7  # SPEC §6: written into pattern_config
    assert ReasoningBankConfig(embedding_dim=5, pattern_config=PatternStoreConfig(embedding_dim=99)).pattern_config.embedding_dim == 5
    with pytest.raises(ValueError, match="embedding_dim"):
        ReasoningBank(bank_cfg(embedding_dim=0))
    with pytest.raises(ValueError, match="min_quality_threshold"):
        ReasoningBank(bank_cfg(min_quality_threshold=1.5))


def test_store_trajectory_stats_and_patterns():
    bank = ReasoningBank(bank_cfg(keep_failures=False))  # SPEC §6: below the threshold, no pattern
    g = torch.Generator().manual_seed(0)
    cause = RootCause.tool_failure("x", "y")
    ts = [
        traj(bank, g),
        traj(bank, g, Verdict.failure(cause)),
        traj(bank, g, Verdict.recovered(cause, 2, 0.9)),
        traj(bank, g, Verdict.partial(0.5)),
        traj(bank, g, conf=0.2),  # quality 0.2 < 0.3: no pattern
    ]
    for t in ts:
        bank.store_trajectory(t)
    s = bank.stats()
    assert (s.total_trajectories, s.success_count, s.failure_count, s.recovered_count) == (5, 2, 1, 1)
    assert s.avg_quality == pytest.approx(sum(t.quality for t in ts) / 5)
    expected_patterns = [t for t in ts if t.quality >= 0.3]
    assert s.total_patterns == len(expected_patterns) == len(bank.store)
    assert len(bank.trajectories) == 5
    srcs = sorted(p.source_trajectories[0] for p in bank.export_patterns())
    assert srcs == sorted(t.id for t in expected_patterns)
    assert s.consolidation_count == s.distillation_count == 0 and s.last_consolidation is None


def test_store_trajectory_validation_changes_nothing():
    bank = ReasoningBank(bank_cfg())
    g = torch.Generator().manual_seed(0)
    bank.store_trajectory(traj(bank, g))
    before = (bank.stats(), len(bank.trajectories), len(bank.store))
    wrong = Trajectory.new(torch.randn(D + 1))
    wrong.complete(Verdict.success())
    with pytest.raises(ValueError, match="dimension"):
        bank.store_trajectory(wrong)
    t = traj(bank, g)
    t.quality = 1.5
    with pytest.raises(ValueError, match="quality"):
        bank.store_trajectory(t)
    t2 = traj(bank, g)
    t2.query_embedding[0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        bank.store_trajectory(t2)
    with pytest.raises(ValueError, match="dimension"):
        bank.start_trajectory(torch.randn(D + 2))
    assert (bank.stats(), len(bank.trajectories), len(bank.store)) == before


def _bad_trajectory_edits():
    import datetime as _dt

    return [
        ("latency NaN", lambda t: setattr(t, "total_latency_ms", float("nan")), "not JSON compliant"),
        ("tokens inf", lambda t: setattr(t.metadata, "total_input_tokens", float("inf")), "not JSON compliant"),
        ("attribute object", lambda t: t.metadata.attributes.__setitem__("x", object()), "not JSON serializable"),
        ("response NaN", lambda t: setattr(t, "response_embedding", torch.full((D,), float("nan"))),
         "response_embedding must hold finite"),
        ("response 2-D", lambda t: setattr(t, "response_embedding", torch.zeros(2, D)), "response_embedding must be 1-D"),
        ("lesson int", lambda t: t.lessons.append(3), "lessons must be strings"),
        ("step confidence mutated", lambda t: setattr(t.steps[0], "confidence", 7.0), "confidence must be within"),
        ("naive started_at", lambda t: setattr(t, "started_at", _dt.datetime(2020, 1, 1)), "timezone-aware"),
        ("context NaN", lambda t: setattr(t.steps[0], "context_embedding", torch.tensor([float("nan")])),
         "context_embedding must hold finite"),
    ]


@pytest.mark.parametrize("journal", [False, True])
def test_every_field_is_checked_before_anything_changes(tmp_path, journal):
    """An accepted trajectory always saves and reloads; a bad one raises, naming the field, and neither
    memory, the journal nor a later save() is affected."""
    bank = ReasoningBank(bank_cfg(storage_path=str(tmp_path)), journal=journal)
    g = torch.Generator().manual_seed(3)
    bank.store_trajectory(traj(bank, g))
    before = (bank.stats(), len(bank.trajectories), len(bank.store))
    for name, edit, msg in _bad_trajectory_edits():
        t = traj(bank, g)
        edit(t)
        with pytest.raises(ValueError, match=msg):
            bank.store_trajectory(t)
        assert (bank.stats(), len(bank.trajectories), len(bank.store)) == before, name
    bank.store_trajectory(traj(bank, g))
    bank.save()
    back = ReasoningBank.load(str(tmp_path / "bank.safetensors"))
    assert len(back.trajectories) == 2 and back.stats().total_trajectories == 2


def test_load_applies_overrides_and_rejects_unknown_ones(tmp_path):
    bank = ReasoningBank(bank_cfg(storage_path=str(tmp_path)))
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        bank.store_trajectory(traj(bank, g))
    bank.save()
    path = str(tmp_path / "bank.safetensors")
    back = ReasoningBank.load(path, backend="exact", ef_search=64, max_patterns=50)
    assert back.store.config.backend == "exact" and back.store.config.ef_search == 64
    assert back.store.config.max_patterns == 50 and back.config.pattern_config.max_patterns == 50
    assert len(back.store) == len(bank.store)
    with pytest.raises(ValueError, match=r"unknown load overrides \['bogus'\]"):
        ReasoningBank.load(path, bogus=1)
    with pytest.raises(ValueError, match="embedding_dim"):
        ReasoningBank.load(path, embedding_dim=D + 1)
    with pytest.raises(ValueError, match="ef_search"):
        ReasoningBank.load(path, ef_search=0)


def test_search_category_analyze_usage():
    bank = ReasoningBank(bank_cfg())
    g = torch.Generator().manual_seed(1)
    ts = [traj(bank, g, request_type="code" if i % 2 else "research") for i in range(10)]
    for t in ts:
        bank.store_trajectory(t)
    res = bank.search_similar(ts[3].query_embedding, 3)
    assert res[0].pattern.source_trajectories == [ts[3].id] and res[0].similarity == pytest.approx(1.0)
    sims, ids = bank.search_similar_batch(torch.stack([t.query_embedding for t in ts[:2]]), 2)
    assert sims.shape == ids.shape == (2, 2)
    code = bank.search_by_category(PatternCategory.CODE_GENERATION, 10)
    assert len(code) == 5 and all(p.category == PatternCategory.CODE_GENERATION for p in code)
    a = bank.analyze_verdict(ts[0])
    assert a.pattern_category == PatternCategory.CODE_GENERATION  # "write code"
    pid = res[0].pattern.id
    assert bank.record_usage(pid, False, 0.0)
    assert bank.store.get_pattern(pid).usage_count == 2


def test_prune_merge_export_import():
    bank = ReasoningBank(bank_cfg())
    g = torch.Generator().manual_seed(2)
    base = traj(bank, g)
    bank.store_trajectory(base)
    twin = Trajectory.new(base.query_embedding * 2.0)  # cosine 1 with base
    twin.steps = list(base.steps)
    twin.complete(Verdict.success())
    bank.store_trajectory(twin)
    for _ in range(3):
        bank.store_trajectory(traj(bank, g))
    assert len(bank.store) == 5
    assert bank.merge_similar_patterns(0.99) == 1
    assert len(bank.store) == 4
    exported = bank.export_patterns()
    other = ReasoningBank(bank_cfg())
    bad = Pattern.new(torch.randn(D + 1), "general", 0.9)
    low = Pattern.new(torch.randn(D), "general", 0.1)
    assert other.import_patterns(exported + [bad, low]) == 4
    assert other.export_patterns() == exported
    p = Pattern.new(torch.randn(D), "general", 0.5)
    p.avg_quality, p.usage_count = 0.1, 1
    other.import_patterns([p])
    assert other.prune_low_quality(0.3) == 1 and len(other.store) == 4


def test_distill_keeps_compressed_and_stores_lessons():
    cfg = bank_cfg(distillation_config=DistillationConfig(min_trajectories_for_distillation=10))
    bank = ReasoningBank(cfg)
    g = torch.Generator().manual_seed(3)
    cause = RootCause.tool_failure("pytest", "exit 1")
    ts = [traj(bank, g, lessons=["Run tests first"]) for _ in range(8)]
    ts += [traj(bank, g, Verdict.failure(cause), conf=0.5) for _ in range(4)]
    for t in ts:
        bank.store_trajectory(t)
    patterns_before = len(bank.store)
    result = bank.distill()
    kept = bank.trajectories
    assert len(kept) == len(result.compressed_trajectories) == sum(t.quality >= 0.4 for t in ts)
    assert all(t.steps == [] for t in kept)
    assert {t.id for t in kept} <= {t.id for t in ts}
    texts = {k.content for k in result.key_lessons}
    assert "Run tests first" in texts and f"Avoid: {cause}" in texts
    lesson_patterns = [p for p in bank.export_patterns() if p.metadata.source == "lesson"]
    assert len(bank.store) == patterns_before + len(lesson_patterns)
    assert {p.lessons[0] for p in lesson_patterns} == texts
    s = bank.stats()
    assert s.distillation_count == 1 and s.last_distillation is not None


def test_failed_distill_loses_nothing():
    bank = ReasoningBank(bank_cfg())  # needs 100 trajectories
    g = torch.Generator().manual_seed(4)
    ts = [traj(bank, g) for _ in range(5)]
    for t in ts:
        bank.store_trajectory(t)
    with pytest.raises(DistillationError):
        bank.distill()
    assert [t.id for t in bank.trajectories] == [t.id for t in ts]
    assert bank.trajectories[0].steps == ts[0].steps
    assert bank.stats().distillation_count == 0


def test_auto_distill_failure_keeps_trajectory_and_retries(caplog):
    cfg = bank_cfg(max_trajectories=3, distillation_config=DistillationConfig(min_trajectories_for_distillation=6))
    bank = ReasoningBank(cfg)
    g = torch.Generator().manual_seed(5)
    ts = [traj(bank, g) for _ in range(6)]
    with caplog.at_level(logging.WARNING, logger="rbank_torch"):
        for t in ts[:5]:
            bank.store_trajectory(t)
    s = bank.stats()
    assert s.distillation_errors == 2 and s.distillation_count == 0  # tried at the 4th and 5th store
    assert len(bank.trajectories) == 5 and s.total_trajectories == 5
    assert "distillation failed" in caplog.text
    bank.store_trajectory(ts[5])  # now 6 ≥ 6: the retry succeeds
    s = bank.stats()
    assert s.distillation_count == 1 and s.distillation_errors == 2
    assert s.total_trajectories == 6


def _rich_trajectory(bank, g):
    rec = bank.start_trajectory(torch.randn(D, generator=g))
    rec.set_session_id("s1")
    rec.set_user_id("u1")
    rec.set_request_type("coding")
    rec.add_tag("ünïcode ✓")
    rec.record_tokens(12, 34)
    rec.record_model("m1")
    rec.record_tool("pytest")
    rec.add_step("search", "r", StepOutcome.needs_retry("flaky", ["a", "b"]), 0.61)
    rec.add_full_step(
        TrajectoryStep(
            0, "run", "r2", StepOutcome.partial("x", "y"), 0.7, latency_ms=15,
            context_embedding=torch.randn(5, generator=g),
            metadata=StepMetadata(tool_used="pytest", input_tokens=3, output_tokens=4, model="m", tags=["t"],
                                  attributes={"k": "v"}),
        )
    )
    rec.add_lesson("lesson with\nnewline")
    rec.set_response_embedding(torch.randn(7, generator=g))
    return rec.complete(Verdict.recovered(RootCause.reasoning_error("hallucination", "d"), 2, 0.85))


def test_save_load_roundtrip_exact(tmp_path):
    bank = ReasoningBank(bank_cfg())
    g = torch.Generator().manual_seed(6)
    ts = [_rich_trajectory(bank, g) for _ in range(3)] + [traj(bank, g, Verdict.failure(RootCause.unknown("?")))]
    ts += [traj(bank, g, lessons=["keep me"]) for _ in range(2)]
    for t in ts:
        bank.store_trajectory(t)
    bank.analyze_verdict(ts[0])
    pid = bank.export_patterns()[0].id
    bank.record_usage(pid, True, 0.5)
    path = tmp_path / "bank.safetensors"
    bank.save(str(path))
    again = ReasoningBank.load(str(path))
    assert again.export_patterns() == bank.export_patterns()
    assert again.stats() == bank.stats()
    assert again.config.to_dict() == bank.config.to_dict()
    # one explicit analysis, and one made to keep the failed trajectory as a failure memory (SPEC §7)
    kept_failures = sum(t.quality < bank.config.min_quality_threshold for t in ts)
    assert kept_failures >= 1
    assert again.analyzer.stats().analyses_performed == 1 + kept_failures
    for a, b in zip(again.trajectories, bank.trajectories):
        for f in ("id", "uuid", "verdict", "quality", "total_latency_ms", "started_at", "completed_at",
                  "metadata", "lessons"):
            assert getattr(a, f) == getattr(b, f), f
        assert torch.equal(a.query_embedding, b.query_embedding)
        assert (a.response_embedding is None) == (b.response_embedding is None)
        if a.response_embedding is not None:
            assert torch.equal(a.response_embedding, b.response_embedding)
        assert len(a.steps) == len(b.steps)
        for sa, sb in zip(a.steps, b.steps):
            for f in ("index", "action", "rationale", "outcome", "confidence", "latency_ms", "timestamp", "metadata"):
                assert getattr(sa, f) == getattr(sb, f), f
            assert (sa.context_embedding is None) == (sb.context_embedding is None)
            if sa.context_embedding is not None:
                assert torch.equal(sa.context_embedding, sb.context_embedding)
    assert Trajectory.new(torch.zeros(D)).id > max(t.id for t in ts)


def test_default_save_path_and_corrupt_bank(tmp_path):
    bank = ReasoningBank(bank_cfg(storage_path=str(tmp_path / "store")))
    g = torch.Generator().manual_seed(7)
    bank.store_trajectory(traj(bank, g))
    bank.save()
    path = tmp_path / "store" / "bank.safetensors"
    assert path.is_file()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(SnapshotError):
        ReasoningBank.load(str(bad))
    bank.store.save(str(tmp_path / "store_only.safetensors"))
    with pytest.raises(SnapshotError, match="expected 'rbank_torch.bank'"):
        ReasoningBank.load(str(tmp_path / "store_only.safetensors"))
