"""SPEC §3: the columnar PatternStore."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from rbank_torch import (
    LowConfidenceError,
    Pattern,
    PatternCategory,
    PatternStore,
    PatternStoreConfig,
    SnapshotError,
)
from rbank_torch._util import utcnow

D = 16


def rand_pattern(g: torch.Generator, cat="general", conf=0.5, usage=1, quality=0.5, dim=D) -> Pattern:
    p = Pattern.new(torch.randn(dim, generator=g), cat, conf)
    p.usage_count, p.success_count, p.avg_quality = usage, min(usage, 1), quality
    return p


def filled(n=50, metric="cosine", seed=0, **cfg) -> tuple[PatternStore, list[Pattern]]:
    g = torch.Generator().manual_seed(seed)
    store = PatternStore(PatternStoreConfig(embedding_dim=D, distance_metric=metric, **cfg))
    pats = [rand_pattern(g, cat=["general", "research", "tool_use"][i % 3], conf=0.3 + 0.7 * (i % 7) / 6)
            for i in range(n)]
    store.store_patterns(pats[: n // 2])
    for p in pats[n // 2 :]:
        store.store_pattern(p)
    return store, pats


def test_config_defaults():
    c = PatternStoreConfig()
    assert (c.embedding_dim, c.ef_construction, c.ef_search, c.m, c.max_patterns) == (768, 200, 100, 32, 100_000)
    assert (c.distance_metric, c.min_confidence, c.auto_prune, c.prune_threshold) == ("cosine", 0.3, True, 2)
    assert c.max_unused_age_secs == 30 * 86_400 and c.storage_path is None
    for field, bad in [("embedding_dim", 0), ("distance_metric", "l1"), ("min_confidence", 2.0), ("dtype", "int8")]:
        with pytest.raises(ValueError, match=field):
            PatternStore(PatternStoreConfig(**{field: bad}))


def test_store_copies_and_get():
    store, pats = filled(10)
    p = pats[0]
    got = store.get_pattern(p.id)
    assert got == p and got is not p
    got.usage_count = 99
    got.lessons.append("x")
    assert store.get_pattern(p.id) == p
    p.embedding.add_(1.0)  # the caller's object is not the stored one
    assert not torch.equal(store.get_pattern(p.id).embedding, p.embedding)
    assert store.get_pattern(-5) is None
    assert len(store) == store.len() == 10 and not store.is_empty()
    assert [q.id for q in store.get_all_patterns()] == sorted(q.id for q in pats)


def test_validation_leaves_store_unchanged():
    store, pats = filled(6)
    before = store.get_all_patterns()
    g = torch.Generator().manual_seed(1)
    bad_dim = rand_pattern(g, dim=D + 1)
    nan = rand_pattern(g)
    nan.embedding[3] = float("nan")
    low = rand_pattern(g, conf=0.1)
    badq = rand_pattern(g)
    badq.avg_quality = 1.5
    with pytest.raises(ValueError, match="dimension"):
        store.store_pattern(bad_dim)
    with pytest.raises(ValueError, match="finite"):
        store.store_pattern(nan)
    with pytest.raises(LowConfidenceError):
        store.store_pattern(low)
    with pytest.raises(ValueError, match="avg_quality"):
        store.store_pattern(badq)
    good = rand_pattern(g)
    with pytest.raises(ValueError, match="finite"):
        store.store_patterns([good, nan])  # nothing of the batch is written
    with pytest.raises(ValueError, match="k"):
        store.search_similar(torch.zeros(D), -1)
    with pytest.raises(ValueError, match="dimension"):
        store.search_similar_batch(torch.zeros(2, D + 1), 3)
    with pytest.raises(ValueError, match="finite"):
        store.search_similar_batch(torch.full((2, D), float("inf")), 3)
    with pytest.raises(ValueError, match="category"):
        store.get_by_category("bogus", 3)
    with pytest.raises(ValueError, match="quality"):
        store.record_usage(pats[0].id, True, -0.5)
    assert store.get_all_patterns() == before


def brute(store_pats, q, metric):
    E = torch.stack([p.embedding for p in store_pats]).double()
    q = q.double()
    if metric == "cosine":
        s = (E @ q) / (E.norm(dim=1) * q.norm())
    elif metric == "dot":
        s = E @ q
    else:
        s = 1.0 / (1.0 + (E - q).norm(dim=1))
    return s


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
@pytest.mark.parametrize("block", [7, 65_536])
def test_search_matches_brute_force(metric, block):
    store, pats = filled(60, metric=metric, search_block_rows=block)
    removed = {p.id for p in pats[::4]}
    for pid in removed:
        assert store.remove_pattern(pid)
    live = [p for p in pats if p.id not in removed]
    g = torch.Generator().manual_seed(5)
    Q = torch.randn(9, D, generator=g)
    sims, ids = store.search_similar_batch(Q, 10)
    assert sims.shape == ids.shape == (9, 10)
    for b in range(9):
        ref = brute(live, Q[b], metric)
        order = torch.argsort(ref, descending=True)[:10]
        assert ids[b].tolist() == [live[i].id for i in order.tolist()]
        torch.testing.assert_close(sims[b].double(), ref[order], rtol=1e-5, atol=1e-5)
        assert not set(ids[b].tolist()) & removed
    res = store.search_similar(Q[0], 4)
    assert [r.rank for r in res] == [0, 1, 2, 3]
    assert [r.pattern.id for r in res] == ids[0, :4].tolist()
    assert [r.similarity for r in res] == pytest.approx(sims[0, :4].tolist())


def test_search_padding_and_small_k():
    store, pats = filled(5)
    store.remove_pattern(pats[0].id)
    sims, ids = store.search_similar_batch(torch.randn(2, D), 8)
    assert (ids[:, 4:] == -1).all() and torch.isinf(sims[:, 4:]).all() and (sims[:, 4:] < 0).all()
    assert set(ids[0, :4].tolist()) == {p.id for p in pats[1:]}
    assert len(store.search_similar(torch.randn(D), 8)) == 4
    assert store.search_similar(torch.randn(D), 0) == []
    empty = PatternStore(PatternStoreConfig(embedding_dim=D))
    s, i = empty.search_similar_batch(torch.randn(3, D), 2)
    assert (i == -1).all() and s.shape == (3, 2)


def test_removed_never_returned_and_compaction():
    store, pats = filled(40, compact_dead_fraction=0.2)
    for p in pats[:30]:
        assert store.remove_pattern(p.id)
    assert not store.remove_pattern(pats[0].id)
    assert store._dead < 10  # compaction ran
    assert len(store) == 10
    sims, ids = store.search_similar_batch(torch.stack([p.embedding for p in pats]), 40)
    live = {p.id for p in pats[30:]}
    got = set(ids.flatten().tolist()) - {-1}
    assert got == live
    for p in pats[30:]:
        assert store.get_pattern(p.id) == p


def test_replace_same_id():
    store, pats = filled(4)
    p = store.get_pattern(pats[1].id)
    p.confidence = 0.99
    store.store_pattern(p)
    assert len(store) == 4 and store.get_pattern(p.id).confidence == 0.99
    store.store_patterns([p])
    assert len(store) == 4


def test_get_by_category_sorted_before_cut():
    store, pats = filled(30)
    res = store.get_by_category("research", 4)
    research = sorted([p for p in pats if p.category == PatternCategory.RESEARCH], key=lambda p: (-p.confidence, p.id))
    assert [p.id for p in res] == [p.id for p in research[:4]]
    assert store.get_by_category(PatternCategory.custom("none"), 5) == []
    assert store.get_by_category("research", 0) == []


def test_record_usage_and_prune_low_quality():
    store, pats = filled(6)
    pid = pats[0].id
    assert store.record_usage(pid, True, 1.0)
    p = store.get_pattern(pid)
    assert (p.usage_count, p.success_count) == (2, 2)
    assert p.avg_quality == pytest.approx(0.75)
    assert not store.record_usage(-1, True, 0.5)
    g = torch.Generator().manual_seed(3)
    lowq = [rand_pattern(g, usage=1, quality=0.1), rand_pattern(g, usage=5, quality=0.1), rand_pattern(g, usage=0, quality=0.25)]
    store.store_patterns(lowq)
    assert store.prune_low_quality(0.3) == 2
    assert store.get_pattern(lowq[1].id) is not None  # used enough: kept
    assert store.get_pattern(lowq[0].id) is None and store.get_pattern(lowq[2].id) is None


def test_capacity_prunes_oldest_prunable_first():
    cfg = PatternStoreConfig(embedding_dim=D, max_patterns=20, max_unused_age_secs=60, min_confidence=0.3)
    store = PatternStore(cfg)
    g = torch.Generator().manual_seed(0)
    pats = [rand_pattern(g, usage=5, quality=0.9) for _ in range(20)]
    old = utcnow() - timedelta(days=1)
    for i in (3, 7, 11):  # prunable: usage < 2, older than 60 s, quality < 0.3
        pats[i].usage_count, pats[i].success_count, pats[i].avg_quality = 1, 0, 0.1
        pats[i].last_accessed = old + timedelta(seconds=i)
    store.store_patterns(pats)
    new = rand_pattern(g)
    store.store_pattern(new)
    # at most max_patterns/10 = 2 pruned at once, oldest last access first
    assert len(store) == 19
    assert store.get_pattern(pats[3].id) is None and store.get_pattern(pats[7].id) is None
    assert store.get_pattern(pats[11].id) is not None and store.get_pattern(new.id) is not None


def test_capacity_prune_is_capped_and_ordered():
    cfg = PatternStoreConfig(embedding_dim=D, max_patterns=30, max_unused_age_secs=60)
    store = PatternStore(cfg)
    g = torch.Generator().manual_seed(0)
    pats = [rand_pattern(g, usage=5, quality=0.9) for _ in range(30)]
    old = utcnow() - timedelta(days=1)
    for j, i in enumerate((20, 4, 9, 15, 1)):  # prunable, i=20 oldest … i=1 newest
        pats[i].usage_count, pats[i].success_count, pats[i].avg_quality = 0, 0, 0.0
        pats[i].last_accessed = old + timedelta(seconds=j)
    store.store_patterns(pats)
    store.store_pattern(rand_pattern(g))
    gone = {p.id for p in pats if store.get_pattern(p.id) is None}
    assert gone == {pats[20].id, pats[4].id, pats[9].id}  # oldest first, at most max/10 = 3
    assert len(store) == 28


def test_capacity_evicts_least_important_when_nothing_prunable():
    cfg = PatternStoreConfig(embedding_dim=D, max_patterns=10)
    store = PatternStore(cfg)
    g = torch.Generator().manual_seed(0)
    pats = [rand_pattern(g, usage=10, quality=0.9) for _ in range(10)]
    pats[6].usage_count, pats[6].success_count, pats[6].avg_quality = 1, 0, 0.35  # least important
    store.store_patterns(pats)
    for _ in range(5):
        store.store_pattern(rand_pattern(g, usage=10, quality=0.9))
        assert len(store) <= 10
    assert store.get_pattern(pats[6].id) is None
    assert len(store) == 10
    with pytest.raises(ValueError, match="max_patterns"):
        store.store_patterns([rand_pattern(g) for _ in range(11)])
    assert len(store) == 10


def test_stats():
    store, pats = filled(9)
    store.search_similar(torch.randn(D), 3)
    store.search_similar_batch(torch.randn(4, D), 3)
    s = store.stats()
    assert s.total_patterns == 9 and s.by_category == {"general": 3, "research": 3, "tool_use": 3}
    assert s.avg_confidence == pytest.approx(sum(p.confidence for p in pats) / 9)
    assert s.avg_usage == pytest.approx(1.0)
    assert s.total_searches == 5 and s.avg_search_latency_ms > 0


def test_custom_categories_and_dtype_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    store = PatternStore(PatternStoreConfig(embedding_dim=D, dtype="bfloat16"))
    p = rand_pattern(g, cat="custom:planning")
    store.store_pattern(p)
    assert store.get_by_category("custom:planning", 1)[0].id == p.id
    store.save(str(tmp_path / "s.safetensors"))
    again = PatternStore.load(str(tmp_path / "s.safetensors"))
    assert again.get_pattern(p.id).category == PatternCategory.custom("planning")
    assert torch.equal(again.get_pattern(p.id).embedding, store.get_pattern(p.id).embedding)


def test_snapshot_roundtrip_exact(tmp_path):
    store, pats = filled(25)
    store.remove_pattern(pats[3].id)
    pid = pats[5].id
    store.record_usage(pid, True, 0.77)
    path = tmp_path / "store.safetensors"
    store.save(str(path))
    again = PatternStore.load(str(path))
    assert again.get_all_patterns() == store.get_all_patterns()
    assert again.config == store.config
    assert again.stats() == store.stats()
    s1, i1 = store.search_similar_batch(torch.ones(2, D), 5)
    s2, i2 = again.search_similar_batch(torch.ones(2, D), 5)
    assert torch.equal(i1, i2) and torch.equal(s1, s2)
    nxt = Pattern.new(torch.ones(D), "general", 0.5)
    assert nxt.id > max(p.id for p in pats)


def test_snapshot_corruption(tmp_path):
    store, _ = filled(8)
    path = tmp_path / "s.safetensors"
    store.save(str(path))
    data = path.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "tiny": data[:5],
        "flipped": data[:-20] + bytes([data[-20] ^ 0x10]) + data[-19:],
        "random": bytes(range(256)) * 10,
        "empty": b"",
    }
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(SnapshotError):
            PatternStore.load(str(bad))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(SnapshotError, match="not an rbank_torch snapshot"):
        PatternStore.load(str(tmp_path / "foreign.safetensors"))
    with pytest.raises(SnapshotError, match="no such"):
        PatternStore.load(str(tmp_path / "missing.safetensors"))


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    store, _ = filled(5)
    path = tmp_path / "s.safetensors"
    store.save(str(path))
    before = path.read_bytes()
    store.store_pattern(Pattern.new(torch.ones(D), "general", 0.9))
    import rbank_torch.snapshot as snap

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(snap.os, "replace", boom)
    with pytest.raises(OSError):
        store.save(str(path))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temp file left behind
