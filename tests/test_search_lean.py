"""Light search results (patterns built when read, still copies), the SQ8 backend with its exact re-rank, the
interim SQ8 index that answers while a first index builds, and the dtype names of the embedding column."""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch

from rbank_torch import Pattern, PatternStore, PatternStoreConfig
from rbank_torch.backends import FaissBackend

D = 32


def clustered(n: int, d: int = D, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(40, d, generator=g)
    x = c[torch.randint(0, 40, (n,), generator=g)] + 0.6 * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def filled(backend: str, x: torch.Tensor, **opts) -> tuple[PatternStore, list[int]]:
    st = PatternStore(PatternStoreConfig(embedding_dim=x.shape[1], backend=backend, backend_options=opts or None))
    pats = []
    for i, e in enumerate(x):
        p = Pattern.new(e, "research", 0.9)
        p.lessons = [f"lesson {i}"]
        p.metadata.tags = ["t"]
        p.metadata.attributes = {"n": i}
        pats.append(p)
    return st, st.store_patterns(pats)


def exact_ids(x: torch.Tensor, ids: list[int], q: torch.Tensor, k: int) -> list[int]:
    s = torch.nn.functional.normalize(q, dim=0) @ x.T
    return [ids[i] for i in torch.topk(s, k).indices.tolist()]


def test_result_patterns_are_copies_built_when_read() -> None:
    x = clustered(50)
    st, ids = filled("exact", x)
    res = st.search_similar(x[3], 3)
    p = res[0].pattern
    assert isinstance(p, Pattern) and p.id == ids[3]
    assert p == st.get_pattern(ids[3])
    assert repr(p).startswith("Pattern(id=")
    assert p.lessons == ["lesson 3"] and p.metadata.attributes == {"n": 3}
    assert torch.equal(p.embedding, st.get_pattern(ids[3]).embedding) and p.embedding.dtype == torch.float32
    # changing the copy changes nothing stored
    p.lessons.append("mine")
    p.embedding[0] = 42.0
    assert st.get_pattern(ids[3]).lessons == ["lesson 3"]
    assert float(st.get_pattern(ids[3]).embedding[0]) != 42.0
    # a copy taken by the search shows the pattern as found, whatever the store does next
    q = st.search_similar(x[3], 1)[0].pattern
    st.record_usage(ids[3], True, 1.0)
    st.store_pattern(Pattern.new(x[3], "research", 0.9))  # a twin, so that merge_similar folds into ids[3]
    assert st.merge_similar(0.999) >= 1
    assert q.usage_count == 0 and q.lessons == ["lesson 3"]
    assert q.last_accessed == q.created_at
    now = st.get_pattern(ids[3])
    assert now.usage_count >= 1 and now.lessons == ["lesson 3"] and len(now.source_trajectories) == 0
    # copies, replace, deepcopy, assignment before the first read
    r = st.search_similar(x[5], 1)[0].pattern
    c = copy.deepcopy(r)
    assert type(c) is Pattern and c == r
    assert dataclasses.replace(r, confidence=0.5).confidence == 0.5
    r2 = st.search_similar(x[5], 1)[0].pattern
    r2.metadata = dataclasses.replace(r2.metadata, source="x")
    assert r2.metadata.source == "x" and r2.lessons == ["lesson 5"]
    assert dataclasses.asdict(st.search_similar(x[5], 1)[0].pattern)["lessons"] == ["lesson 5"]


def test_single_query_validation_unchanged() -> None:
    x = clustered(20)
    st, _ = filled("exact", x)
    with pytest.raises(ValueError, match="query"):
        st.search_similar(x[:2], 1)
    with pytest.raises(ValueError, match="query"):
        st.search_similar(torch.full((D,), float("nan")), 1)
    assert len(st.search_similar(x[0], 10_000)) == 20


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
def test_sq8_backend_reranks_exactly(metric: str) -> None:
    pytest.importorskip("faiss")
    x = clustered(600) * (1.0 + torch.rand(600, 1))
    st = PatternStore(PatternStoreConfig(embedding_dim=D, backend="faiss-sq8", distance_metric=metric,
                                         backend_options={"background": False}))
    ids = st.store_patterns([Pattern.new(e, "general", 0.9) for e in x])
    ex = PatternStore(PatternStoreConfig(embedding_dim=D, backend="exact", distance_metric=metric))
    ex.store_patterns([Pattern.new(e, "general", 0.9) for e in x])
    st.search_backend.wait()
    assert st.search_backend.active_kind == "sq8"
    q = clustered(30, seed=1)
    s1, i1 = st.search_similar_batch(q, 10)
    s2, _ = ex.search_similar_batch(q, 10)
    # the re-ranked scores are exact: any miss can only be a tie-level difference
    assert torch.allclose(s1, s2, atol=1e-5)
    assert int((i1 < 0).sum()) == 0
    # removed patterns never come back, and the count stays min(k, live)
    top = st.search_similar(q[0], 1)[0].pattern.id
    st.remove_pattern(top)
    res = st.search_similar(q[0], 10)
    assert top not in [r.pattern.id for r in res] and len(res) == 10
    assert len(st.search_similar(q[0], 10_000)) == len(ids) - 1


def test_sq8_search_memory_scores_exactly() -> None:
    pytest.importorskip("faiss")
    x = clustered(800)
    st = PatternStore(PatternStoreConfig(embedding_dim=D, backend="faiss-sq8", backend_options={"background": False}))
    ex = PatternStore(PatternStoreConfig(embedding_dim=D, backend="exact"))
    for s_ in (st, ex):
        s_.store_patterns([Pattern.new(e, "general", 0.9) for e in x])
    st.search_backend.wait()
    q = clustered(10, seed=4)
    sc1, sim1, _ = st.search_memory(q, 5)
    sc2, sim2, _ = ex.search_memory(q, 5)
    assert torch.allclose(sim1, sim2, atol=1e-5) and torch.allclose(sc1, sc2, atol=1e-5)


def test_interim_index_answers_while_the_first_build_runs(monkeypatch) -> None:
    pytest.importorskip("faiss")
    gate = threading.Event()
    real = FaissBackend._build_index

    def slow(self, kind, x):
        if kind == "hnsw":
            assert gate.wait(60)
        return real(self, kind, x)

    monkeypatch.setattr(FaissBackend, "_build_index", slow)
    x = clustered(800)
    st, ids = filled("auto", x, hnsw_min_rows=500)
    try:
        be = st.search_backend
        st.search_similar(x[0], 1)  # 800 rows are below the buffer size: the first search starts the build
        for _ in range(500):  # the interim SQ8 index is published by the worker before the HNSW build
            if be.stats()["interim"]:
                break
            threading.Event().wait(0.01)
        assert be.stats()["interim"] and be.stats()["job"] == "build:hnsw"
        q = clustered(20, seed=2)
        for i in range(20):
            got = [r.pattern.id for r in st.search_similar(q[i], 10)]
            assert got == exact_ids(x, ids, q[i], 10)
        # rows stored during the build are searched exactly beside the interim index
        new = st.store_pattern(Pattern.new(q[0], "general", 0.9))
        assert st.search_similar(q[0], 1)[0].pattern.id == new
        # a removed row drops out of the re-ranked candidates
        st.remove_pattern(new)
        assert new not in [r.pattern.id for r in st.search_similar(q[0], 10)]
    finally:
        gate.set()
    st.search_backend.wait()
    assert st.search_backend.active_kind == "hnsw" and not st.search_backend.stats()["interim"]
    assert len(st.search_similar(q[0], 10)) == 10


@pytest.mark.parametrize(("name", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_short_dtype_names(name: str, dtype: torch.dtype) -> None:
    x = clustered(100)
    st, ids = filled("exact", x)
    st2 = PatternStore(PatternStoreConfig(embedding_dim=D, backend="exact", dtype=name))
    ids2 = st2.store_patterns([Pattern.new(e, "general", 0.9) for e in x])
    assert st2._emb.dtype == dtype
    q = clustered(10, seed=3)
    hits = sum(len({ids.index(r.pattern.id) for r in st.search_similar(q[i], 10)}
                   & {ids2.index(r.pattern.id) for r in st2.search_similar(q[i], 10)}) for i in range(10))
    assert hits >= 95
