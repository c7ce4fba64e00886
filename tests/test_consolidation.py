"""SPEC §4 (consolidation) and §6 ``consolidate()``: Fisher information, importance, the consolidator, the
bank's fold-into-leader consolidation, and k-means pattern extraction — each against a plain sequential
implementation of the spec."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch

from rbank_torch import (
    ConsolidationConfig,
    FisherInformation,
    ImportanceScore,
    Pattern,
    PatternConsolidator,
    ReasoningBank,
    ReasoningBankConfig,
    cluster_patterns,
)
from rbank_torch._util import utcnow

D = 12


# ----------------------------------------------------------------------------------------------------------
# helpers and the sequential oracle
def make_pattern(emb, category="general", usage=1, success=1, quality=0.6, age_secs=0.0, conf=0.9):
    p = Pattern.new(torch.as_tensor(emb, dtype=torch.float32), category, conf)
    p.usage_count, p.success_count, p.avg_quality = usage, success, quality
    p.last_accessed = utcnow() - timedelta(seconds=age_secs)
    p.lessons = [f"lesson {p.id}"]
    p.example_actions = [f"act {p.id}"]
    p.source_trajectories = [p.id * 10]
    return p


def oracle_importance(p: Pattern, fisher_mean: float | None, max_age: float, now) -> float:
    usage = min(math.log(p.usage_count + 1) / 10.0, 1.0)
    age = max((now - p.last_accessed).total_seconds(), 0.0)
    recency = math.exp(-age / max_age)
    success = p.success_count / p.usage_count if p.usage_count else 0.0
    fisher = 0.5 if fisher_mean is None else min(fisher_mean, 1.0)
    return 0.25 * usage + 0.25 * p.avg_quality + 0.15 * recency + 0.20 * success + 0.15 * fisher


def cos64(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    na, nb = float(a.norm()), float(b.norm())
    if na <= 1e-8 or nb <= 1e-8:
        return 0.0
    return float(a @ b) / (na * nb)


def oracle_consolidate(patterns, cfg: ConsolidationConfig, fisher: dict[int, float], now):
    """Plain sequential SPEC §4: returns (pruned ids, merge_map)."""
    pats = sorted(patterns, key=lambda p: p.id)
    pruned = set()
    for p in pats:
        s = oracle_importance(p, fisher.get(p.id), cfg.max_unused_age_secs, now)
        if s < 0.2 and p.avg_quality < cfg.min_quality_threshold:
            pruned.add(p.id)
    absorbed: dict[int, int] = {}
    for i, a in enumerate(pats):
        if a.id in pruned or a.id in absorbed:
            continue
        for b in pats[i + 1 :]:
            if b.id in pruned or b.id in absorbed or b.category != a.category:
                continue
            if cos64(a.embedding, b.embedding) > cfg.merge_similarity_threshold:
                absorbed[b.id] = a.id
    return sorted(pruned), absorbed


def random_patterns(n: int, seed: int, n_cats: int = 3, near: bool = True):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(1, n // 6), D, generator=g)
    cats = ["general", "research", "code_generation", "custom:x"][:n_cats]
    out = []
    for _ in range(n):
        c = centres[int(torch.randint(len(centres), (1,), generator=g))]
        e = c + 0.35 * torch.randn(D, generator=g)
        usage = int(torch.randint(0, 6, (1,), generator=g))
        out.append(
            make_pattern(
                e,
                cats[int(torch.randint(len(cats), (1,), generator=g))],
                usage=usage,
                success=int(torch.randint(0, usage + 1, (1,), generator=g)),
                quality=float(torch.rand(1, generator=g)),
                age_secs=float(torch.rand(1, generator=g)) * 20 * 86_400,
            )
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# ConsolidationConfig, FisherInformation
def test_config_defaults() -> None:
    c = ConsolidationConfig()
    assert (c.lambda_, c.min_lambda, c.max_lambda, c.fisher_decay) == (2000.0, 100.0, 15000.0, 0.999)
    assert (c.min_usage_for_importance, c.min_quality_threshold, c.merge_similarity_threshold) == (3, 0.3, 0.85)
    assert c.max_unused_age_secs == 7 * 86_400 and c.auto_adapt_lambda is True


@pytest.mark.parametrize(
    ("field", "value", "msg"),
    [
        ("lambda_", float("nan"), "lambda_ must be finite"),
        ("lambda_", -1.0, "lambda_ must be >= 0"),
        ("min_lambda", float("inf"), "min_lambda must be finite"),
        ("max_lambda", 50.0, "min_lambda must be > 0 and <= max_lambda"),
        ("fisher_decay", float("nan"), "fisher_decay"),
        ("min_quality_threshold", 1.5, "min_quality_threshold must be within"),
        ("merge_similarity_threshold", float("nan"), "merge_similarity_threshold must be finite"),
        ("merge_similarity_threshold", 1.01, "merge_similarity_threshold must be within"),
        ("max_unused_age_secs", float("nan"), "max_unused_age_secs must be finite"),
        ("max_unused_age_secs", float("inf"), "max_unused_age_secs must be finite"),
        ("max_unused_age_secs", 0, "max_unused_age_secs must be > 0"),
        ("min_usage_for_importance", float("nan"), "min_usage_for_importance must be finite"),
        ("min_usage_for_importance", 2.5, "min_usage_for_importance must be an integer"),
        ("min_usage_for_importance", -1, "min_usage_for_importance must be an integer >= 0"),
    ],
)
def test_config_rejects_bad_fields(field: str, value: float, msg: str) -> None:
    cfg = ConsolidationConfig(**{field: value})
    with pytest.raises(ValueError, match=msg):
        cfg.validate()
    with pytest.raises(ValueError, match=msg):
        PatternConsolidator(cfg)


def test_importance_rejects_non_finite_age() -> None:
    p = Pattern.new(torch.ones(4), "general", 0.5)
    for bad in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="max_age_secs"):
            ImportanceScore.compute(p, None, max_age_secs=bad)


def test_fisher_new_update_and_wrong_length() -> None:
    f = FisherInformation(3)
    assert torch.equal(f.diagonal, torch.ones(3)) and torch.equal(f.ema_grad_squared, torch.zeros(3))
    assert f.sample_count == 0
    f.update([1.0, 2.0, -3.0], 0.9)
    want = 0.1 * torch.tensor([1.0, 4.0, 9.0])
    assert torch.allclose(f.ema_grad_squared, want) and torch.allclose(f.diagonal, want)
    f.update([2.0, 0.0, 1.0], 0.9)
    want = 0.9 * want + 0.1 * torch.tensor([4.0, 0.0, 1.0])
    assert torch.allclose(f.diagonal, want) and f.sample_count == 2
    before = f.diagonal.clone()
    with pytest.raises(ValueError, match="length 3"):
        f.update([1.0, 2.0], 0.9)
    with pytest.raises(ValueError, match="finite"):
        f.update([1.0, float("nan"), 2.0], 0.9)
    assert torch.equal(f.diagonal, before) and f.sample_count == 2
    assert f.importance(1) == pytest.approx(float(want[1]))
    assert f.total_importance() == pytest.approx(float(want.sum()))


def test_fisher_merge_weighted_mean() -> None:
    a, b = FisherInformation(2), FisherInformation(2)
    a.update([1.0, 1.0], 0.5)
    b.update([2.0, 4.0], 0.5)
    b.update([2.0, 4.0], 0.5)
    da, db = a.diagonal.clone(), b.diagonal.clone()
    a.merge(b, 0.25)
    assert torch.allclose(a.diagonal, 0.25 * da + 0.75 * db)
    assert a.sample_count == 1  # the weighted mean 1.75, truncated
    with pytest.raises(ValueError):
        a.merge(FisherInformation(3), 0.5)


# ----------------------------------------------------------------------------------------------------------
# importance
def test_importance_formula_and_factors() -> None:
    now = utcnow()
    p = make_pattern(torch.ones(D), usage=4, success=3, quality=0.7, age_secs=86_400)
    s = ImportanceScore.compute(p, None, max_age_secs=7 * 86_400, now=now)
    assert s.pattern_id == p.id
    assert s.score == pytest.approx(oracle_importance(p, None, 7 * 86_400, now), abs=1e-12)
    assert s.factors["usage"] == pytest.approx(math.log(5) / 10)
    assert s.factors["success"] == pytest.approx(0.75)
    assert s.factors["recency"] == pytest.approx(math.exp(-1 / 7))
    assert s.factors["fisher"] == 0.5
    f = FisherInformation(D)
    f.update(torch.full((D,), 2.0), 0.5)  # mean diagonal 2 → clamped to 1
    assert ImportanceScore.compute(p, f, now=now).factors["fisher"] == 1.0
    unused = make_pattern(torch.ones(D), usage=0, success=0, quality=0.0)
    assert ImportanceScore.compute(unused, now=now).factors["success"] == 0.0


def test_importance_batch_equals_single() -> None:
    now = utcnow()
    pats = random_patterns(40, 1)
    batch = ImportanceScore.compute_batch(pats, now=now)
    tens = ImportanceScore.scores_tensor(pats, now=now)
    for p, b, t in zip(pats, batch, tens.tolist()):
        want = oracle_importance(p, None, 7 * 86_400, now)
        assert b.score == pytest.approx(want, abs=1e-12) and t == pytest.approx(want, abs=1e-12)


def test_store_importance_equals_the_oracle_per_pattern() -> None:
    from rbank_torch import PatternStore, PatternStoreConfig

    g = torch.Generator().manual_seed(11)
    store = PatternStore(PatternStoreConfig(embedding_dim=D, max_patterns=100))
    pats = [
        make_pattern(torch.randn(D, generator=g), usage=k % 5, success=(k % 5) // 2, quality=(k % 9) / 8,
                     age_secs=3600.0 * k)
        for k in range(40)
    ]
    store.store_patterns(pats)
    c = PatternConsolidator()
    stored = sorted(store.get_all_patterns(), key=lambda p: p.id)
    for p in stored[::3]:  # Fisher information for a third of them (means above and below 1)
        c.update_fisher(p.id, torch.randn(D, generator=g) * (0.5 + p.id % 3))
    now = utcnow()
    ids, scores = c.store_importance(store, now)
    assert ids.tolist() == [p.id for p in stored] and scores.dtype == torch.float64
    for p, sc in zip(stored, scores.tolist()):
        f = c.fisher(p.id)
        want = oracle_importance(p, None if f is None else float(f.diagonal.double().mean()), 7 * 86_400, now)
        assert sc == pytest.approx(want, abs=1e-9)
    means, has = c.fisher_means(torch.tensor([stored[0].id, -5, stored[1].id]))
    assert has.tolist() == [True, False, False] and means[1] == 0 and means[0] > 0


# ----------------------------------------------------------------------------------------------------------
# the consolidator's Fisher API
def test_batched_fisher_update_equals_sequential_including_repeats() -> None:
    g = torch.Generator().manual_seed(3)
    ids = [7, 3, 7, 9, 3, 7]
    grads = torch.randn(len(ids), D, generator=g)
    a, b = PatternConsolidator(), PatternConsolidator()
    a.update_fisher_batch(ids, grads)
    for i, gr in zip(ids, grads):
        b.update_fisher(i, gr)
    ref = {i: FisherInformation(D) for i in set(ids)}
    for i, gr in zip(ids, grads):
        ref[i].update(gr, 0.999)
    for i in set(ids):
        fa, fb = a.fisher(i), b.fisher(i)
        assert fa is not None and fb is not None
        assert torch.allclose(fa.diagonal, ref[i].diagonal, rtol=1e-6, atol=1e-9)
        assert torch.allclose(fb.diagonal, ref[i].diagonal, rtol=1e-6, atol=1e-9)
        assert fa.sample_count == ref[i].sample_count == ids.count(i)
    assert a.stats().fisher_entries == 3 and a.fisher(1) is None
    with pytest.raises(ValueError, match="dimension"):
        a.update_fisher(7, torch.ones(D + 1))
    with pytest.raises(ValueError, match="one row per id"):
        a.update_fisher_batch([1, 2], torch.ones(3, D))
    with pytest.raises(ValueError, match="finite"):
        a.update_fisher_batch([1], torch.full((1, D), float("inf")))
    with pytest.raises(ValueError, match=r"pattern_ids must be 1-D"):
        a.update_fisher(torch.ones(2, 2, dtype=torch.long), torch.ones(4, D))
    with pytest.raises(ValueError, match="integer pattern ids"):
        a.update_fisher_batch([1.5], torch.ones(1, D))
    assert a.stats().fisher_entries == 3  # nothing changed
    # update_fisher(ids, grads) is the batched form too (list, tuple, tensor, numpy ids)
    c = PatternConsolidator()
    c.update_fisher(torch.tensor(ids[:3]), grads[:3])
    c.update_fisher(tuple(ids[3:]), grads[3:])
    for i in set(ids):
        fc, fa = c.fisher(i), a.fisher(i)
        assert fc is not None and fa is not None
        assert torch.equal(fc.diagonal, fa.diagonal) and fc.sample_count == fa.sample_count


def test_constraint_regularization_and_lambda() -> None:
    c = PatternConsolidator(ConsolidationConfig(lambda_=10.0, min_lambda=5.0, max_lambda=40.0, fisher_decay=0.5))
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(c.apply_constraint(1, g), g)  # no Fisher: unchanged
    assert c.regularization_loss(1, g, torch.zeros(4)) == 0.0
    c.update_fisher(1, torch.tensor([2.0, 0.0, 1.0, 4.0]))  # F = 0.5·g² = [2, 0, 0.5, 8]
    F = torch.tensor([2.0, 0.0, 0.5, 8.0])
    got = c.apply_constraint(1, g)
    want = torch.where(F > 1e-8, g / (1 + 10.0 * F), g)
    assert torch.allclose(got, want) and got[1] == g[1]
    cur, opt = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0.0, 5.0, 3.0, 1.5])
    assert c.regularization_loss(1, cur, opt) == pytest.approx(10.0 / 2 * float((F * (cur - opt) ** 2).sum()))
    # λ adaptation: base·(1 + 0.1·#established), clamped
    pats = [make_pattern(torch.ones(4), usage=u) for u in (0, 3, 5, 9)]
    assert c.adapt_lambda(pats) == pytest.approx(10.0 * 1.3)
    assert c.adapt_lambda([make_pattern(torch.ones(4), usage=3) for _ in range(40)]) == 40.0
    assert c.set_lambda(1.0) == 5.0 and c.lambda_ == 5.0
    assert c.set_lambda(1e9) == 40.0
    off = PatternConsolidator(ConsolidationConfig(lambda_=10.0, auto_adapt_lambda=False))
    assert off.adapt_lambda(pats) == off.lambda_ == 100.0  # clamped to min_lambda 100 at creation


def test_consolidate_fisher_means_under_id_zero() -> None:
    c = PatternConsolidator(ConsolidationConfig(fisher_decay=0.0))
    c.update_fisher(5, torch.full((3,), 1.0))
    c.consolidate_fisher()  # one entry: unchanged
    assert c.fisher(5) is not None
    c.update_fisher(6, torch.full((3,), 3.0))
    c.update_fisher(6, torch.full((3,), 3.0))
    c.consolidate_fisher()
    assert c.stats().fisher_entries == 1 and c.fisher(5) is None
    f0 = c.fisher(0)
    assert f0 is not None and torch.allclose(f0.diagonal, torch.full((3,), 5.0)) and f0.sample_count == 3


def test_prune_low_quality_and_merge_patterns() -> None:
    c = PatternConsolidator()
    a = make_pattern(torch.ones(D), usage=1, quality=0.1)
    b = make_pattern(torch.ones(D), usage=5, quality=0.1)
    d = make_pattern(torch.ones(D), usage=1, quality=0.9)
    assert c.prune_low_quality([a, b, d]) == [a.id]
    m = c.merge_patterns([a, b, d])
    assert m.usage_count == 7 and m.lessons == [f"lesson {a.id}", f"lesson {b.id}", f"lesson {d.id}"]
    assert a.usage_count == 1  # inputs untouched


# ----------------------------------------------------------------------------------------------------------
# consolidate_patterns against the oracle
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_consolidate_patterns_matches_oracle(seed: int) -> None:
    pats = random_patterns(150, seed)
    cfg = ConsolidationConfig(merge_similarity_threshold=0.8)
    cons = PatternConsolidator(cfg)
    g = torch.Generator().manual_seed(seed + 100)
    fisher: dict[int, float] = {}
    for p in pats[::7]:
        grad = torch.rand(D, generator=g) * 0.2
        cons.update_fisher(p.id, grad)
        fisher[p.id] = float(cons.fisher(p.id).diagonal.double().mean())
    now = utcnow()
    res = cons.consolidate_patterns(list(reversed(pats)), now=now)
    pruned, merge_map = oracle_consolidate(pats, cfg, fisher, now)
    assert sorted(res.pruned_pattern_ids) == pruned
    assert res.merge_map == merge_map and sorted(res.merged_pattern_ids) == sorted(merge_map)
    assert res.patterns_before == 150 and res.patterns_after == 150 - len(pruned) - len(merge_map)
    assert res.stats.merged_count == len(merge_map) and res.stats.pruned_count == len(pruned)
    kept = [p for p in pats if p.id not in merge_map and p.id not in set(pruned)]
    assert res.importance_preserved == pytest.approx(
        sum(oracle_importance(p, fisher.get(p.id), cfg.max_unused_age_secs, now) for p in kept), rel=1e-9
    )
    assert res.lambda_used == cons.lambda_ and cons.stats().consolidation_count == 1
    assert cons.stats().total_consolidated == len(pruned) + len(merge_map)
    assert len(merge_map) > 5  # the random store does merge something


def test_merge_threshold_is_exact_near_the_boundary() -> None:
    """Pairs whose cosine lies within 1e-6 of the threshold on either side."""
    thr = 0.85
    base = torch.zeros(D)
    base[0] = 1.0
    pats = [make_pattern(base)]
    for k, delta in enumerate([3e-7, -3e-7, 8e-7, -8e-7, 1e-6, -1e-6]):
        c = thr + delta
        e = torch.zeros(D, dtype=torch.float64)
        e[0], e[k + 1] = c, math.sqrt(1 - c * c)
        pats.append(make_pattern(e.float()))
    cfg = ConsolidationConfig(merge_similarity_threshold=thr)
    res = PatternConsolidator(cfg).consolidate_patterns(pats)
    _, want = oracle_consolidate(pats, cfg, {}, utcnow())
    assert res.merge_map == want
    assert 0 < len(want) < 6  # both sides of the threshold are present


def test_categories_never_merge_across() -> None:
    e = torch.ones(D)
    pats = [make_pattern(e, "general"), make_pattern(e, "research"), make_pattern(e, "general")]
    res = PatternConsolidator().consolidate_patterns(pats)
    assert res.merge_map == {pats[2].id: pats[0].id}


# ----------------------------------------------------------------------------------------------------------
# ReasoningBank.consolidate(): fold into leaders, remove pruned
def fold_oracle(pats, merge_map, pruned):
    by_id = {p.id: p for p in pats}
    out = {}
    for p in sorted(pats, key=lambda p: p.id):
        if p.id in merge_map or p.id in pruned:
            continue
        out[p.id] = Pattern(**{f: getattr(p, f) for f in p.__dataclass_fields__})
        out[p.id].embedding = p.embedding.clone()
        out[p.id].lessons = list(p.lessons)
        out[p.id].example_actions = list(p.example_actions)
        out[p.id].source_trajectories = list(p.source_trajectories)
    for src in sorted(merge_map):
        out[merge_map[src]].merge(by_id[src])
    return out


def test_bank_consolidate_folds_and_prunes() -> None:
    pats = random_patterns(120, 7)
    cfg = ReasoningBankConfig(embedding_dim=D)
    cfg.consolidation_config.merge_similarity_threshold = 0.8
    cfg.pattern_config.min_confidence = 0.0
    bank = ReasoningBank(cfg)
    assert bank.import_patterns(pats) == 120
    want_pruned, want_map = oracle_consolidate(pats, cfg.consolidation_config, {}, utcnow())
    res = bank.consolidate()
    assert res.merge_map == want_map and sorted(res.pruned_pattern_ids) == want_pruned
    assert len(want_map) > 5 and len(want_pruned) > 0
    want = fold_oracle(pats, want_map, set(want_pruned))
    got = {p.id: p for p in bank.export_patterns()}
    assert set(got) == set(want) and len(got) == res.patterns_after
    for pid, w in want.items():
        g = got[pid]
        assert torch.allclose(g.embedding, w.embedding, atol=1e-5)
        assert (g.usage_count, g.success_count) == (w.usage_count, w.success_count)
        assert g.avg_quality == pytest.approx(w.avg_quality, abs=1e-9)
        assert g.confidence == pytest.approx(w.confidence)
        assert g.lessons == w.lessons and g.example_actions == w.example_actions
        assert g.source_trajectories == w.source_trajectories
    st = bank.stats()
    assert st.consolidation_count == 1 and st.last_consolidation is not None
    assert st.total_patterns == res.patterns_after


def test_bank_consolidate_moves_fisher_and_snapshot_keeps_it(tmp_path) -> None:
    e = torch.ones(D)
    cfg = ReasoningBankConfig(embedding_dim=D)
    bank = ReasoningBank(cfg)
    a, b = make_pattern(e, usage=3, quality=0.9), make_pattern(e, usage=1, quality=0.9)
    bank.import_patterns([a, b])
    cons = bank._get_consolidator()
    cons.update_fisher(b.id, torch.full((D,), 10.0))
    res = bank.consolidate()
    assert res.merge_map == {b.id: a.id}
    fa = cons.fisher(a.id)
    assert fa is not None and cons.fisher(b.id) is None  # the leader inherited the absorbed one's Fisher
    path = str(tmp_path / "bank.safetensors")
    bank.save(path)
    back = ReasoningBank.load(path)
    fb = back._get_consolidator().fisher(a.id)
    assert fb is not None and torch.equal(fb.diagonal, fa.diagonal) and fb.sample_count == fa.sample_count
    assert back._get_consolidator().stats() == cons.stats()


# ----------------------------------------------------------------------------------------------------------
# k-means pattern extraction
def test_cluster_patterns_recovers_clusters_deterministically() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, D, generator=g) * 5
    lab = torch.arange(200) % 4
    x = centres[lab] + 0.05 * torch.randn(200, D, generator=g)
    q = torch.rand(200, generator=g)
    ids = list(range(1000, 1200))
    out = cluster_patterns(x, 4, quality=q, ids=ids, seed=3, category="research")
    again = cluster_patterns(x, 4, quality=q, ids=ids, seed=3, category="research")
    assert [c.member_ids for c in out] == [c.member_ids for c in again]
    assert all(torch.equal(a.centroid, b.centroid) for a, b in zip(out, again))
    assert sorted(sum((c.member_ids for c in out), [])) == ids
    assert [c.size for c in out] == [50, 50, 50, 50]
    for c in out:
        members = [i - 1000 for i in c.member_ids]
        assert len({int(lab[m]) for m in members}) == 1  # one true cluster each
        assert c.mean_quality == pytest.approx(float(q[members].double().mean()))
        assert c.pattern.usage_count == c.size and c.pattern.avg_quality == pytest.approx(c.mean_quality)
        assert str(c.pattern.category) == "research" and c.pattern.source_trajectories == c.member_ids
    with pytest.raises(ValueError, match="k must be"):
        cluster_patterns(x, 0)
    with pytest.raises(ValueError, match="quality"):
        cluster_patterns(x, 2, quality=torch.full((200,), 2.0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bank_on_cuda_matches_cpu() -> None:
    """Search, consolidation (Triton pair kernel) and Fisher on CUDA give the CPU results."""
    pats = random_patterns(300, 11)
    out = {}
    for dev in ("cpu", "cuda"):
        cfg = ReasoningBankConfig(embedding_dim=D)
        cfg.pattern_config.device = dev
        cfg.pattern_config.min_confidence = 0.0
        cfg.consolidation_config.merge_similarity_threshold = 0.8
        bank = ReasoningBank(cfg)
        bank.import_patterns([Pattern(**{f: getattr(p, f) for f in p.__dataclass_fields__}) for p in pats])
        q = torch.stack([p.embedding for p in pats[:20]])
        sims, ids = bank.search_similar_batch(q.to(dev), 5)
        res = bank.consolidate()
        out[dev] = (sims.cpu(), ids.cpu(), res.merge_map, sorted(res.pruned_pattern_ids))
    (s1, i1, m1, p1), (s2, i2, m2, p2) = out["cpu"], out["cuda"]
    assert torch.equal(i1, i2) and torch.allclose(s1, s2, atol=1e-5)
    assert m1 == m2 and p1 == p2 and len(m1) > 0
