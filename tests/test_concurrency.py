"""Concurrency under load: many threads storing, searching, recording usage, merging, pruning, removing,
consolidating and saving at once on one journaled bank; afterwards every acknowledged mutation is accounted
for exactly once, the stats add up, no search ever returned a removed pattern, and the journal (replayed
after the snapshot) rebuilds exactly the bank that is in memory."""

from __future__ import annotations

import itertools
import random
import threading
import time

import pytest
import torch

from rbank_torch import (
    Pattern,
    PatternStore,
    PatternStoreConfig,
    ReasoningBank,
    ReasoningBankConfig,
    RootCause,
    StepOutcome,
    Verdict,
)

D = 32
RUN_S = 3.0


class _Clock:
    """A global order of events: ``tick()`` is strictly increasing across threads."""

    def __init__(self) -> None:
        self._c = itertools.count()
        self._lock = threading.Lock()

    def tick(self) -> int:
        with self._lock:
            return next(self._c)


def _pattern(g: torch.Generator, emb: torch.Tensor | None = None, usage=0, quality=0.0, category="general"):
    p = Pattern.new(torch.randn(D, generator=g) if emb is None else emb, category, 0.9)
    p.usage_count, p.avg_quality = usage, quality
    return p


def _bank_state(bank: ReasoningBank):
    ts = bank.trajectories
    return (
        bank.export_patterns(),
        [(t.id, t.uuid, t.quality, t.lessons, [s.action for s in t.steps]) for t in ts],
        bank.stats(),
    )


@pytest.mark.parametrize("fsync", ["off", "batch"])
def test_bank_stress_accounting_and_journal(tmp_path, fsync):
    # the accounting below is SPEC §6's (a failed run makes no pattern and no analysis)
    cfg = ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path), keep_failures=False)
    bank = ReasoningBank(cfg, journal=True, fsync=fsync)
    clock = _Clock()
    stop_at = time.monotonic() + RUN_S
    book = threading.Lock()  # guards the bookkeeping below (never held while calling the bank)
    errors: list[str] = []
    traj_ids: list[tuple[int, float]] = []  # (id, quality)
    tracked: dict[int, int] = {}  # pattern id -> usage acknowledged so far (never merged or pruned)
    junk: list[int] = []  # prunable patterns (avg_quality 0.05, usage 0)
    bait: list[tuple[int, int]] = []  # (leader, twin): cosine 1, merged together
    removed_at: dict[int, int] = {}  # pattern id -> clock tick after its removal was acknowledged
    searches: list[tuple[int, list[int]]] = []  # (tick when the search started, ids it returned)
    pruned_total = [0]
    analyses = [0]
    consolidations = [0]

    g0 = torch.Generator().manual_seed(0)
    for _ in range(30):
        p = _pattern(g0, usage=5, quality=0.9)
        tracked[bank.store.store_pattern(p)] = 5

    def worker(fn, seed):
        def run():
            rng = random.Random(seed)
            g = torch.Generator().manual_seed(seed)
            try:
                while time.monotonic() < stop_at:
                    fn(rng, g)
            except Exception as e:  # noqa: BLE001 - reported by the test
                import traceback

                errors.append(f"{fn.__name__}: {type(e).__name__}: {e}\n{traceback.format_exc()}")

        return threading.Thread(target=run, name=fn.__name__)

    def store_trajectories(rng, g):
        rec = bank.start_trajectory(torch.randn(D, generator=g))
        for _ in range(rng.randint(1, 3)):
            rec.add_step("search", "why", StepOutcome.success(), rng.uniform(0.6, 1.0))
        rec.add_lesson("ünïcode lesson ✓")
        v = Verdict.success() if rng.random() < 0.8 else Verdict.failure(RootCause.unknown("x"))
        t = rec.complete(v)
        bank.store_trajectory(t)
        with book:
            traj_ids.append((t.id, t.quality))
        if rng.random() < 0.2:
            bank.analyze_verdict(t)
            with book:
                analyses[0] += 1

    def store_direct(rng, g):
        r = rng.random()
        if r < 0.4:
            pid = bank.store.store_pattern(_pattern(g, usage=5, quality=0.9))
            with book:
                tracked[pid] = 5
        elif r < 0.8:
            p = _pattern(g, usage=0, quality=0.05)
            if rng.random() < 0.5:
                pid = bank.store.store_pattern(p)
            else:
                assert bank.import_patterns([p]) == 1
                pid = p.id
            with book:
                junk.append(pid)
        else:
            e = torch.randn(D, generator=g)
            a = bank.store.store_pattern(_pattern(g, e, usage=3, quality=0.8, category="research"))
            b = bank.store.store_pattern(_pattern(g, e * 2.0, usage=3, quality=0.8, category="research"))
            with book:
                bait.append((a, b))

    def use(rng, g):
        with book:
            pid = rng.choice(list(tracked))
        ok = bank.record_usage(pid, rng.random() < 0.5, rng.random())
        assert ok, f"tracked pattern {pid} vanished"
        with book:
            tracked[pid] += 1

    def search(rng, g):
        start = clock.tick()
        if rng.random() < 0.5:
            res = bank.search_similar(torch.randn(D, generator=g), rng.randint(1, 20))
            ids = [r.pattern.id for r in res]
            sims = [r.similarity for r in res]
            assert sims == sorted(sims, reverse=True)
            assert [r.rank for r in res] == list(range(len(res)))
        else:
            _s, ids_t = bank.search_similar_batch(torch.randn(3, D, generator=g), rng.randint(1, 20))
            ids = [i for i in ids_t.flatten().tolist() if i >= 0]
        with book:
            searches.append((start, ids))

    def maintain(rng, g):
        r = rng.random()
        if r < 0.35:
            bank.merge_similar_patterns(0.999)
            with book:
                pairs = list(bait)
            gone = [b for _a, b in pairs if b not in bank.store]
            t = clock.tick()
            with book:
                for b in gone:
                    removed_at.setdefault(b, t)
        elif r < 0.6:
            n = bank.prune_low_quality(0.1)
            t = clock.tick()
            with book:
                pruned_total[0] += n
                gone = [j for j in junk if j not in removed_at and j not in bank.store]
                for j in gone:
                    removed_at.setdefault(j, t)
        elif r < 0.8:
            with book:
                cands = [j for j in junk if j not in removed_at]
            if cands:
                pid = rng.choice(cands)
                if bank.store.remove_pattern(pid):
                    t = clock.tick()
                    with book:
                        removed_at.setdefault(pid, t)
                        junk.remove(pid)  # removed explicitly: no longer counted as prunable junk
        else:
            res = bank.consolidate()
            t = clock.tick()
            with book:
                consolidations[0] += 1
                for pid in list(res.merged_pattern_ids) + list(res.pruned_pattern_ids):
                    removed_at.setdefault(pid, t)
                pruned_total[0] += len(res.pruned_pattern_ids)
        time.sleep(0.005)

    def snapshot(rng, g):
        bank.save()
        time.sleep(0.05)

    threads = [
        worker(store_trajectories, 1),
        worker(store_trajectories, 2),
        worker(store_direct, 3),
        worker(use, 4),
        worker(search, 5),
        worker(search, 6),
        worker(maintain, 7),
        worker(snapshot, 8),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=RUN_S + 60)
    assert not any(t.is_alive() for t in threads), "a worker thread hangs (deadlock?)"
    assert not errors, "\n".join(errors)

    # one final merge folds every bait twin into its leader
    bank.merge_similar_patterns(0.999)
    pats = bank.export_patterns()
    by_id = {p.id: p for p in pats}
    assert len(by_id) == len(pats) == len(bank.store), "a pattern is present twice"

    # trajectories: each acknowledged one kept exactly once, stats add up
    kept = [t.id for t in bank.trajectories]
    assert sorted(kept) == sorted(i for i, _q in traj_ids) and len(set(kept)) == len(kept)
    st = bank.stats()
    assert st.total_trajectories == len(traj_ids)
    assert st.success_count + st.failure_count + st.recovered_count <= st.total_trajectories
    assert st.total_patterns == len(pats) == bank.pattern_stats().total_patterns
    assert sum(bank.pattern_stats().by_category.values()) == len(pats)
    assert bank.analyzer.stats().analyses_performed == analyses[0]
    assert st.consolidation_count == consolidations[0]
    # every stored trajectory pattern is present exactly once (its source id in exactly one pattern)
    sources = [s for p in pats for s in p.source_trajectories]
    assert len(sources) == len(set(sources))
    for tid, q in traj_ids:
        if q >= cfg.min_quality_threshold:
            assert tid in set(sources), f"pattern of trajectory {tid} lost"
    # tracked patterns: present once, with every acknowledged usage
    for pid, usage in tracked.items():
        assert pid in by_id, f"tracked pattern {pid} lost"
        assert by_id[pid].usage_count == usage
    # bait pairs: the leader absorbed its twin
    for a, b in bait:
        assert a in by_id and b not in by_id
        assert by_id[a].usage_count == 6
    # junk: present, or pruned (each prune counted once)
    live_junk = [j for j in junk if j in by_id]
    assert len(junk) - len(live_junk) == pruned_total[0]
    # searches never returned a pattern whose removal was acknowledged before the search started
    for start, ids in searches:
        for pid in ids:
            t = removed_at.get(pid)
            assert t is None or t > start, f"search at {start} returned pattern {pid} removed at {t}"
    assert len(searches) > 10 and len(traj_ids) > 10

    # the snapshot + journal rebuild exactly this bank (nothing acknowledged lost, no record out of order)
    expected = _bank_state(bank)
    bank.close()
    again = ReasoningBank.load(str(tmp_path / "bank.safetensors"), journal=True)
    assert _bank_state(again) == expected
    again.close()


def test_store_shared_by_threads_never_returns_dead_rows():
    """A bare PatternStore shared by threads: inserts, removals (with compaction) and searches interleave."""
    store = PatternStore(PatternStoreConfig(embedding_dim=D, compact_dead_fraction=0.1, backend="exact"))
    stop_at = time.monotonic() + 1.5
    book = threading.Lock()
    removed: set[int] = set()
    live: set[int] = set()
    errors: list[str] = []

    def writer(seed):
        rng = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        try:
            while time.monotonic() < stop_at:
                if rng.random() < 0.5:
                    ids = store.store_patterns([_pattern(g) for _ in range(rng.randint(1, 8))])
                    with book:
                        live.update(ids)
                else:
                    with book:
                        pid = rng.choice(sorted(live)) if live else None
                    if pid is not None and store.remove_pattern(pid):
                        with book:
                            live.discard(pid)
                            removed.add(pid)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    def reader(seed):
        g = torch.Generator().manual_seed(seed)
        try:
            while time.monotonic() < stop_at:
                with book:
                    gone = set(removed)
                res = store.search_similar(torch.randn(D, generator=g), 10)
                ids = [r.pattern.id for r in res]
                assert not gone & set(ids), "search returned a removed pattern"
                assert len(ids) == len(set(ids))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    ts = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    ts += [threading.Thread(target=reader, args=(10 + i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
    assert not errors, errors
    assert set(store.ids().tolist()) == live
    assert len(store) == len(live) == store.stats().total_patterns
