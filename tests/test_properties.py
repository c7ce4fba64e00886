"""Property-based tests (hypothesis) across the public API of the bank.

A :class:`RuleBasedStateMachine` drives random sequences of store / store_trajectory / remove /
record_usage / merge / prune / consolidate / search / save+load on a journaled bank, with hostile values
everywhere (NaN, ±inf, huge and denormal embedding values, empty and non-ASCII strings, extreme counts
and timestamps) and checks it against a simple model of the live pattern ids and their usage.

Invariants after every step: the only exceptions are the documented ``ValueError`` family
(``LowConfidenceError``, ``SnapshotError``, ``JournalError``) and a refused call changes nothing; search
never returns a dead row; counts and stats agree with the model; save/load and journal replay give back
an equal bank.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from datetime import datetime, timezone

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rbank_torch import (
    LowConfidenceError,
    Pattern,
    PatternStoreConfig,
    ReasoningBank,
    ReasoningBankConfig,
    RootCause,
    StepOutcome,
    Verdict,
)

D = 4
INT64_MAX = 2**63 - 1

# finite extremes (denormal, tiny, huge) and the non-finite values that must be refused
_extreme = st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1e-38, 1e-310, 3e38, -3e38, 1e30])
_nonfinite = st.sampled_from([float("nan"), float("inf"), float("-inf")])
floats_any = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), _extreme, _nonfinite)
_finite_el = st.one_of(st.floats(-10, 10, width=32), st.floats(-10, 10, width=32), _extreme)
_valid_emb = st.lists(_finite_el, min_size=D, max_size=D)
_hostile_emb = st.lists(st.one_of(_finite_el, _nonfinite), min_size=D, max_size=D)
# mostly valid values (so the bank fills up), hostile ones often enough to be exercised
embeddings = st.one_of(_valid_emb, _valid_emb, _valid_emb, _hostile_emb)
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_unit = st.floats(0, 1)
unit_or_bad = st.one_of(_unit, _unit, _unit, _unit, st.sampled_from([-0.5, 1.5, float("nan"), float("inf")]))
counts = st.one_of(st.integers(0, 50), st.integers(0, 50), st.sampled_from([2**31, 2**53, 2**62, INT64_MAX, -1]))
timestamps = st.one_of(
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(timezone.utc)),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(timezone.utc)),
)
VALID_CATEGORIES = ["general", "research", "code_generation", "reflection", "custom:ü✓"]
categories = st.sampled_from([*VALID_CATEGORIES, "", "nope"])


def _finite(v: list[float]) -> bool:
    return all(math.isfinite(x) for x in v)


def _bank_state(bank: ReasoningBank):
    pats = [
        (p.id, p.uuid, p.embedding.tolist(), str(p.category), p.confidence, p.usage_count, p.success_count,
         p.avg_quality, p.created_at, p.last_accessed, p.source_trajectories, p.lessons, p.example_actions)
        for p in bank.export_patterns()
    ]
    trajs = [(t.id, t.uuid, t.quality, t.lessons, [(s.action, s.rationale) for s in t.steps])
             for t in bank.trajectories]
    return pats, trajs, bank.stats()


class BankMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="rbank-prop-")
        cfg = ReasoningBankConfig(
            embedding_dim=D, storage_path=self.dir, max_trajectories=3,
            pattern_config=PatternStoreConfig(backend="exact", compact_dead_fraction=0.3),
        )
        cfg.distillation_config.min_trajectories_for_distillation = 2  # distil past 3 trajectories
        self.bank = ReasoningBank(cfg, journal=True, fsync="off")
        #: model: live pattern id -> (usage, success)
        self.live: dict[int, tuple[int, int]] = {}
        self.trajectories = 0
        self.saves = 0

    def teardown(self) -> None:
        self.bank.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ helpers
    def _ids(self) -> set[int]:
        return set(self.bank.store.ids().tolist())

    def _refused(self, before, fn):
        """Call ``fn``; a documented error must leave the bank unchanged."""
        try:
            return fn()
        except ValueError:
            assert _bank_state(self.bank)[:2] == before[:2], "a refused call changed the bank"
            return None

    def _sync_usage(self, ids) -> None:
        for pid in ids:
            p = self.bank.store.get_pattern(pid)
            self.live[pid] = (p.usage_count, p.success_count)

    # ------------------------------------------------------------------ rules
    @rule(emb=embeddings, category=categories, conf=unit_or_bad, usage=counts, frac=st.floats(0, 1),
          bad_success=st.integers(0, 9), q=unit_or_bad, created=timestamps, last=timestamps, lesson=texts,
          tag=texts)
    def store_pattern(self, emb, category, conf, usage, frac, bad_success, q, created, last, lesson, tag):
        success = usage + 1 if bad_success == 0 else int(max(usage, 0) * frac)
        try:
            p = Pattern.new(torch.ones(D), "general", 0.9)
            p.category = category
        except ValueError:
            return
        p.embedding, p.confidence, p.usage_count, p.success_count = torch.tensor(emb), conf, usage, success
        p.avg_quality, p.created_at, p.last_accessed = q, created, last
        p.lessons, p.metadata.tags = [lesson], [tag]
        before = _bank_state(self.bank)
        try:
            pid = self.bank.store.store_pattern(p)
        except LowConfidenceError:
            assert conf < self.bank.store.config.min_confidence
            assert _bank_state(self.bank)[:2] == before[:2]
            return
        except ValueError:
            assert _bank_state(self.bank)[:2] == before[:2]
            assert not (_finite(emb) and 0 <= conf <= 1 and 0 <= q <= 1 and 0 <= success <= usage
                        <= INT64_MAX and category in VALID_CATEGORIES), "a valid pattern was refused"
            return
        assert _finite(emb) and 0 <= success <= usage
        got = self.bank.store.get_pattern(pid)
        assert got.lessons == [lesson] and got.metadata.tags == [tag]
        assert got.created_at == created and got.last_accessed == last and got.usage_count == usage
        self.live[pid] = (usage, success)

    @rule(embs=st.lists(_valid_emb, min_size=1, max_size=6), twins=st.integers(0, 3), via=st.booleans())
    def store_many(self, embs, twins, via):
        """A batch of valid patterns (some exact twins, so merges and consolidation have work)."""
        ps = []
        for e in embs + embs[:twins]:
            p = Pattern.new(torch.tensor(e), "research", 0.8)
            p.usage_count, p.success_count, p.avg_quality = 1, 1, 0.6
            ps.append(p)
        if via:
            ids = self.bank.store.store_patterns(ps)
        else:
            assert self.bank.import_patterns(ps) == len(ps)
            ids = [p.id for p in ps]
        for pid in ids:
            self.live[pid] = (1, 1)

    @rule(emb=_valid_emb, confs=st.lists(_unit, min_size=1, max_size=3), action=texts, lesson=texts,
          kind=st.sampled_from(["success", "failure", "partial", "recovered"]))
    def store_valid_trajectory(self, emb, confs, action, lesson, kind):
        self.store_trajectory(emb, confs, action, lesson, kind)

    @rule(emb=embeddings, confs=st.lists(unit_or_bad, min_size=1, max_size=3), action=texts, lesson=texts,
          kind=st.sampled_from(["success", "failure", "partial", "recovered"]))
    def store_trajectory(self, emb, confs, action, lesson, kind):
        before_ids = self._ids()
        try:
            rec = self.bank.start_trajectory(emb)
            for c in confs:
                rec.add_step(action, lesson, StepOutcome.success(), c)
            rec.add_lesson(lesson)
            verdict = {"success": Verdict.success(), "failure": Verdict.failure(RootCause.unknown(lesson)),
                       "partial": Verdict.partial(0.5), "recovered": Verdict.recovered(RootCause.unknown(action), 2, 0.7)}[kind]
            t = rec.complete(verdict)
        except ValueError:
            assert not _finite(emb) or not all(0 <= c <= 1 for c in confs)
            return
        before = _bank_state(self.bank)
        done = self._refused(before, lambda: self.bank.store_trajectory(t) or True)
        if done is None:
            return
        self.trajectories += 1
        now = self._ids()
        assert before_ids <= now or self.bank.stats().distillation_count > before[2].distillation_count
        for pid in before_ids - now:
            self.live.pop(pid, None)
        self._sync_usage(now - before_ids)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def remove_live(self, data):
        pid = data.draw(st.sampled_from(sorted(self.live)))
        assert self.bank.store.remove_pattern(pid) is True
        del self.live[pid]

    @rule(pid=st.one_of(st.integers(-5, 10**6), st.just(INT64_MAX)))
    def remove_unknown(self, pid):
        if pid in self.live:
            return
        assert self.bank.store.remove_pattern(pid) is False

    @precondition(lambda self: self.live)
    @rule(data=st.data(), ok=st.booleans(), q=unit_or_bad)
    def record_usage(self, data, ok, q):
        pid = data.draw(st.sampled_from(sorted(self.live)))
        before = _bank_state(self.bank)
        res = self._refused(before, lambda: self.bank.record_usage(pid, ok, q))
        if res is None:
            assert not 0 <= q <= 1
            return
        assert res is True
        u, s = self.live[pid]
        u1 = min(u + 1, INT64_MAX)  # counts saturate at the int64 max
        self.live[pid] = (u1, min(s + int(ok), u1))
        assert self.bank.store.get_pattern(pid).usage_count == u1

    @rule(threshold=st.one_of(st.floats(-1.5, 1.5), st.sampled_from([0.999, float("nan"), float("inf")])))
    def merge(self, threshold):
        before = _bank_state(self.bank)
        n = self._refused(before, lambda: self.bank.merge_similar_patterns(threshold))
        if n is None:
            assert not math.isfinite(threshold)
            return
        now = self._ids()
        assert now <= set(self.live) and len(self.live) - len(now) == n
        usage_before = sum(u for u, _s in self.live.values())
        for pid in set(self.live) - now:
            del self.live[pid]
        self._sync_usage(now)
        if usage_before < INT64_MAX // 2:  # (a sum past the int64 max saturates)
            assert sum(u for u, _s in self.live.values()) == usage_before, "merging lost or made up usage"

    @rule(mq=unit_or_bad)
    def prune(self, mq):
        before = _bank_state(self.bank)
        n = self._refused(before, lambda: self.bank.prune_low_quality(mq))
        if n is None:
            assert not 0 <= mq <= 1
            return
        gone = set(self.live) - self._ids()
        assert len(gone) == n
        thr = self.bank.store.config.prune_threshold
        for pid in gone:
            assert self.live.pop(pid)[0] < thr

    @rule()
    def consolidate(self):
        res = self.bank.consolidate()
        gone = set(self.live) - self._ids()
        assert gone == set(res.merged_pattern_ids) | set(res.pruned_pattern_ids)
        assert res.patterns_after == res.patterns_before - len(gone) == len(self._ids())
        for pid in gone:
            del self.live[pid]
        self._sync_usage(self._ids())

    @rule(q=embeddings, k=st.integers(0, 12))
    def search(self, q, k):
        try:
            res = self.bank.search_similar(q, k)
        except ValueError:
            assert not _finite(q)
            return
        ids = [r.pattern.id for r in res]
        assert len(ids) == min(k, len(self.live)) and len(set(ids)) == len(ids)
        assert set(ids) <= set(self.live), "search returned a dead row"
        sims = [r.similarity for r in res]
        assert all(not math.isnan(s) for s in sims) and sims == sorted(sims, reverse=True)
        s, ids_t = self.bank.search_similar_batch(torch.tensor([q, q]), k)
        got = [i for i in ids_t[0].tolist() if i >= 0]
        assert set(got) <= set(self.live) and len(got) == len(ids)

    @rule()
    def save_and_load(self):
        expected = _bank_state(self.bank)
        self.bank.save()
        self.bank.close()
        self.bank = ReasoningBank.load(f"{self.dir}/bank.safetensors", journal=True, fsync="off")
        assert _bank_state(self.bank) == expected
        self.saves += 1

    @rule()
    def crash_and_replay(self):
        """Drop the object without save or close: snapshot + journal give back the same bank."""
        expected = _bank_state(self.bank)
        self.bank.journal.sync()
        snap = f"{self.dir}/bank.safetensors"
        import os

        cfg = self.bank.config
        self.bank = None  # dropped as a crash drops it: its writer lock goes with it
        if os.path.exists(snap):
            self.bank = ReasoningBank.load(snap, journal=True, fsync="off")
        else:
            self.bank = ReasoningBank(cfg, journal=True, fsync="off")
        assert _bank_state(self.bank) == expected

    # ------------------------------------------------------------------ invariants
    @invariant()
    def counts_agree(self):
        ids = self._ids()
        assert ids == set(self.live), (ids ^ set(self.live))
        st_ = self.bank.stats()
        ps = self.bank.pattern_stats()
        assert len(self.bank.store) == st_.total_patterns == ps.total_patterns == len(ids)
        assert sum(ps.by_category.values()) == len(ids)
        assert st_.total_trajectories == self.trajectories
        assert st_.success_count + st_.failure_count + st_.recovered_count <= st_.total_trajectories
        assert 0.0 <= st_.avg_quality <= 1.0
        for pid, (u, s) in self.live.items():
            p = self.bank.store.get_pattern(pid)
            assert (p.usage_count, p.success_count) == (u, s)


BankMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None, suppress_health_check=list(HealthCheck)
)
TestBankMachine = BankMachine.TestCase


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(q=st.lists(floats_any, min_size=1, max_size=2 * D), k=st.one_of(st.integers(-3, 20), st.just(2**40)))
def test_search_rejects_or_answers_any_query(q, k):
    bank = _SHARED_BANK
    try:
        res = bank.search_similar(q, k)
    except ValueError:
        assert len(q) != D or not _finite(q) or k < 0
        return
    assert len(res) == min(k, len(bank.store))
    assert all(math.isfinite(r.similarity) or r.similarity == float("-inf") for r in res)


def _shared_bank() -> ReasoningBank:
    bank = ReasoningBank(ReasoningBankConfig(embedding_dim=D, pattern_config=PatternStoreConfig(backend="exact")))
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e-40, 3e38, 1e-10):
        p = Pattern.new(torch.randn(D, generator=g) * scale + (1.0 if scale < 1e-5 else 0.0), "general", 0.9)
        bank.store.store_pattern(p)
    return bank


_SHARED_BANK = _shared_bank()


def test_counts_saturate_instead_of_overflowing():
    """Usage counts near the int64 maximum: recording and merging saturate, never wrap or raise."""
    from rbank_torch import PatternStore

    store = PatternStore(PatternStoreConfig(embedding_dim=D, backend="exact"))
    a = Pattern.new(torch.ones(D), "general", 0.9)
    b = Pattern.new(torch.ones(D) * 2, "general", 0.9)
    c = Pattern.new(-torch.ones(D), "general", 0.9)
    a.usage_count = a.success_count = INT64_MAX
    b.usage_count, b.success_count = INT64_MAX - 5, 3
    c.usage_count, c.success_count = 2**53 + 1, 0
    for p in (a, b, c):
        store.store_pattern(p)
    assert store.record_usage(a.id, True, 0.5)
    assert store.get_pattern(a.id).usage_count == INT64_MAX
    assert store.merge_similar(0.99) == 1
    merged = store.get_pattern(a.id)
    assert merged.usage_count == INT64_MAX and 0 <= merged.success_count <= INT64_MAX
    # past 2**53 counts are still exact (summed as integers, not floats)
    d = Pattern.new(-torch.ones(D) * 3, "general", 0.9)
    d.usage_count = 1
    store.store_pattern(d)
    assert store.merge_similar(0.99) == 1
    assert store.get_pattern(c.id).usage_count == 2**53 + 2


def test_huge_k_returns_only_live_results():
    bank = _shared_bank()
    res = bank.search_similar(torch.ones(D), 2**40)
    assert len(res) == len(bank.store) == 4
