"""Search backends of the pattern store: every backend against exact search, tombstones, the insert
buffer, snapshots of the index, auto-selection, missing packages, threads."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time

import pytest
import torch

from rbank_torch import Pattern, PatternStore, PatternStoreConfig
from rbank_torch.backends import AUTO_HNSW_MIN_ROWS, BACKENDS, MissingBackendError, import_faiss

faiss = pytest.importorskip("faiss")

D = 64
ANN = ("faiss-hnsw", "faiss-ivf", "faiss-flat")


def clustered(n: int, d: int = D, centres: int = 60, noise: float = 0.6, seed: int = 0) -> torch.Tensor:
    """``[n, d]`` unit vectors: Gaussian cluster centres plus Gaussian noise (top-k is not trivial)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g)
    lab = torch.randint(0, centres, (n,), generator=g)
    x = c[lab] + noise * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def make(backend: str, x: torch.Tensor, metric: str = "cosine", **opts) -> tuple[PatternStore, list[int]]:
    opts.setdefault("background", False)
    cfg_extra = {k: opts.pop(k) for k in ("compact_dead_fraction", "ef_search", "m", "ef_construction") if k in opts}
    store = PatternStore(
        PatternStoreConfig(embedding_dim=x.shape[1], distance_metric=metric, backend=backend,
                           backend_options=opts, **cfg_extra)
    )
    ids = store.store_patterns([Pattern.new(e, "general", 0.9) for e in x])
    return store, ids


def recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    hit = 0
    total = 0
    for a, e in zip(approx.tolist(), exact.tolist()):
        e = [i for i in e if i >= 0]
        hit += len(set(a) & set(e))
        total += len(e)
    return hit / max(total, 1)


def positions(i: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Ids → their position in the list the store returned when they were stored (-1 stays -1)."""
    pos = {pid: j for j, pid in enumerate(ids)}
    return torch.tensor([[pos.get(v, -1) for v in row] for row in i.tolist()])


def exact_ids(store: PatternStore, q: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-k ids over the store's live patterns (brute force, independent of the store's search)."""
    cols = store.columns()
    e, ids = cols["embedding"].float(), cols["id"]
    metric = store.config.distance_metric
    if metric == "cosine":
        s = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(e, dim=1).T
    elif metric == "dot":
        s = q @ e.T
    else:
        s = -torch.cdist(q, e)
    return ids[s.topk(min(k, e.shape[0]), dim=1).indices]


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    x = clustered(3200)
    return x[:3000].contiguous(), x[3000:].contiguous()


# ---------------------------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
@pytest.mark.parametrize("backend", ANN)
def test_backend_recall_against_exact(data, backend: str, metric: str) -> None:
    x, q = data
    if metric != "cosine":
        x = x * torch.linspace(0.5, 2.0, x.shape[0])[:, None]  # norms matter for dot / euclidean
    ref, _ = make("exact", x, metric)
    store, _ = make(backend, x, metric, nprobe=16)
    assert store.search_backend.active_kind == backend.split("-")[1]
    rs, ri = ref.search_similar_batch(q, 10)
    s, i = store.search_similar_batch(q, 10)
    r = recall(i, exact_ids(store, q, 10))
    assert recall(ri, exact_ids(ref, q, 10)) == 1.0
    assert r >= (1.0 if backend == "faiss-flat" else 0.95), r
    # returned similarities are the metric's similarity of the returned pattern
    emb = {pid: e for pid, e in zip(store.columns()["id"].tolist(), store.columns()["embedding"])}
    for row_s, row_i, qq in zip(s[:20], i[:20], q[:20]):
        for sv, pid in zip(row_s.tolist(), row_i.tolist()):
            e = emb[pid]
            want = {"cosine": torch.nn.functional.cosine_similarity(qq, e, dim=0).item(),
                    "dot": float(qq @ e), "euclidean": 1.0 / (1.0 + float(torch.dist(qq, e)))}[metric]
            assert sv == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert torch.all(s[:, :-1] >= s[:, 1:])  # best first
    if backend == "faiss-flat":
        torch.testing.assert_close(s, rs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
def test_query_fast_path_matches_store_path_and_validates(data, metric: str) -> None:
    import numpy as np

    x, q = data
    store, ids = make("faiss-flat", x, metric=metric)
    be = store.search_backend
    pre = be.prepare_queries(q[:5])
    assert pre is not None  # CPU float32 queries on a CPU index take the fast path
    ref = store._prepare_queries(q[:5])
    torch.testing.assert_close(pre[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pre[1], ref[1], rtol=1e-5, atol=1e-6)
    s1, i1 = store.search_similar_batch(q[:5], 7)
    s2, i2 = store.search_similar_batch(q[:5].double(), 7)  # float64: the store's own path
    assert torch.equal(i1, i2)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-6)
    s3, i3 = store.search_similar_batch(q[0].numpy(), 7)  # [D] numpy float32
    assert torch.equal(i3, i1[:1])
    # invalid or degenerate inputs fall through to the store's validation and its usual errors
    bad = q[:2].clone()
    bad[1, 3] = float("nan")
    assert be.prepare_queries(bad) is None
    with pytest.raises(ValueError, match="queries"):
        store.search_similar_batch(bad, 3)
    with pytest.raises(ValueError, match="dimension"):
        store.search_similar_batch(torch.zeros(1, D + 1), 3)
    assert be.prepare_queries(torch.zeros(1, D)) is None
    assert be.prepare_queries(np.zeros((1, D), dtype=np.float64)) is None
    assert store.search_similar_batch(torch.zeros(1, D), 3)[1].shape == (1, 3)


def test_search_similar_objects_and_k_larger_than_store(data) -> None:
    x, q = data
    store, ids = make("faiss-hnsw", x[:50])
    res = store.search_similar(x[7], 5)
    assert res[0].pattern.id == ids[7] and res[0].rank == 0
    assert res[0].similarity == pytest.approx(1.0, abs=1e-5)
    s, i = store.search_similar_batch(q[:3], 80)
    assert s.shape == (3, 80) and i.shape == (3, 80)
    assert (i[:, :50] >= 0).all() and (i[:, 50:] == -1).all() and torch.isinf(s[:, 50:]).all()
    assert sorted(i[0, :50].tolist()) == sorted(ids)
    e, ei = store.search_similar_batch(q[:2], 0)
    assert e.shape == (2, 0) and ei.shape == (2, 0)


# ---------------------------------------------------------------------------------------------- deletes
@pytest.mark.parametrize("backend", ANN)
def test_deleted_rows_never_returned(data, backend: str) -> None:
    x, q = data
    store, ids = make(backend, x, compact_dead_fraction=0.9, nprobe=16)
    g = torch.Generator().manual_seed(1)
    dead = set(torch.tensor(ids)[torch.randperm(len(ids), generator=g)[:900]].tolist())
    # near neighbours of the queries are deleted first, so the filter is really exercised
    near = exact_ids(store, q, 5).flatten().tolist()
    dead |= set(near)
    assert store.remove_patterns(dead) == len(dead)
    st = store.search_backend.stats()
    assert st["index_dead"] == len(dead) and st["builds"] == 1  # filtered, not rebuilt
    s, i = store.search_similar_batch(q, 20)
    assert not (set(i.flatten().tolist()) & dead)
    assert recall(i, exact_ids(store, q, 20)) >= (1.0 if backend == "faiss-flat" else 0.9)
    for p in q[:10]:
        assert all(r.pattern.id not in dead for r in store.search_similar(p, 10))


@pytest.mark.parametrize("backend", ANN)
def test_heavy_deletes_then_compaction(data, backend: str) -> None:
    x, q = data
    store, ids = make(backend, x, nprobe=16)
    dead: set[int] = set()
    g = torch.Generator().manual_seed(2)
    order = torch.tensor(ids)[torch.randperm(len(ids), generator=g)].tolist()
    for chunk in range(0, 2700, 300):  # 90 % removed, several compactions on the way
        batch = order[chunk : chunk + 300]
        store.remove_patterns(batch)
        dead |= set(batch)
        _, i = store.search_similar_batch(q, 10)
        assert not (set(i.flatten().tolist()) & dead)
    assert len(store) == 300
    st = store.search_backend.stats()
    assert st["builds"] >= 2  # rebuilt after compaction
    _, i = store.search_similar_batch(q, 10)
    assert recall(i, exact_ids(store, q, 10)) >= 0.9
    store.remove_patterns(order[2700:])
    s, i = store.search_similar_batch(q, 10)
    assert (i == -1).all() and torch.isinf(s).all()


def test_single_removes_and_replacement(data) -> None:
    x, q = data
    store, ids = make("faiss-hnsw", x[:1000], compact_dead_fraction=0.9)
    for pid in ids[:50]:
        assert store.remove_pattern(pid)
    p = store.get_pattern(ids[60])
    assert p is not None
    p.embedding = -p.embedding  # same id, new embedding: the old vector must not answer for it
    store.store_pattern(p)
    res = store.search_similar(-x[60], 3)
    assert res[0].pattern.id == ids[60] and res[0].similarity == pytest.approx(1.0, abs=1e-5)
    res = store.search_similar(x[60], 20)
    assert all(r.pattern.id not in ids[:50] for r in res)
    assert all(r.pattern.id != ids[60] or r.similarity < 0 for r in res)


def test_merge_similar_updates_index(data) -> None:
    x, _ = data
    base = x[:500]
    dup = torch.nn.functional.normalize(base[:40] + 0.01 * torch.randn(40, D), dim=1)
    store, ids = make("faiss-hnsw", torch.cat([base, dup]), compact_dead_fraction=0.9)
    absorbed = store.merge_similar(0.99)
    assert absorbed >= 40
    live = set(store.ids().tolist())
    for i in range(40):
        leader = store.search_similar(base[i], 1)[0]
        assert leader.pattern.id in live
        torch.testing.assert_close(leader.similarity, float(torch.nn.functional.cosine_similarity(
            base[i], leader.pattern.embedding, dim=0)), rtol=0, atol=1e-5)
        assert leader.similarity > 0.99


# ---------------------------------------------------------------------------------------------- buffer
@pytest.mark.parametrize("background", [False, True])
def test_buffer_absorbed_in_batches(data, background: bool) -> None:
    x, q = data
    store, ids = make("faiss-hnsw", x[:1000], buffer_rows=100, background=background)
    store.search_backend.wait()
    assert store.search_backend.stats()["index_slots"] == 1000
    new_ids = []
    for j in range(1000, 1250):
        pid = store.store_pattern(Pattern.new(x[j], "general", 0.9))
        new_ids.append(pid)
        if j % 25 == 0:  # findable at once, indexed or not
            assert store.search_similar(x[j], 1)[0].pattern.id == pid
    store.search_backend.wait(absorb=False)
    st = store.search_backend.stats()
    assert st["absorbs"] >= 2 and st["builds"] == 1
    assert st["buffered"] < 100 or background
    store.search_backend.wait()
    st = store.search_backend.stats()
    assert st["buffered"] == 0 and st["index_slots"] == 1250
    for j, pid in zip(range(1000, 1250, 10), new_ids[::10]):
        assert store.search_similar(x[j], 1)[0].pattern.id == pid
    _, i = store.search_similar_batch(q, 10)
    assert recall(i, exact_ids(store, q, 10)) >= 0.95


def test_buffer_search_merges_with_index(data) -> None:
    x, q = data
    store, _ = make("faiss-hnsw", x[:2000], buffer_rows=10_000)
    store.search_backend.wait()
    store.store_patterns([Pattern.new(e, "general", 0.9) for e in x[2000:]])
    st = store.search_backend.stats()
    assert st["buffered"] == 1000 and st["index_slots"] == 2000
    _, i = store.search_similar_batch(q, 10)
    assert recall(i, exact_ids(store, q, 10)) >= 0.95


# ---------------------------------------------------------------------------------------------- snapshots
@pytest.mark.parametrize("backend", ANN)
def test_snapshot_roundtrip_without_rebuild(tmp_path, data, backend: str) -> None:
    x, q = data
    store, ids = make(backend, x[:2000], buffer_rows=500, compact_dead_fraction=0.9, nprobe=16)
    store.remove_patterns(ids[100:400])  # dead slots in the saved index
    store.store_patterns([Pattern.new(e, "general", 0.9) for e in x[2000:2200]])  # buffered rows
    p = store.get_pattern(ids[5])
    assert p is not None
    store.store_pattern(p)  # replaced in place: a live id whose row is not indexed
    s0, i0 = store.search_similar_batch(q, 10)
    path = tmp_path / "store.safetensors"
    store.save(str(path))
    loaded = PatternStore.load(str(path))
    st = loaded.search_backend.stats()
    assert st["loads"] == 1 and st["builds"] == 0 and st["load_rejects"] == 0
    assert st["index_slots"] == 2000 and st["buffered"] == 201
    s1, i1 = loaded.search_similar_batch(q, 10)
    assert loaded.search_backend.stats()["builds"] == 0
    assert torch.equal(i1, i0)
    torch.testing.assert_close(s1, s0, rtol=0, atol=1e-6)
    assert not (set(i1.flatten().tolist()) & set(ids[100:400]))


def test_snapshot_mismatch_falls_back_to_rebuild(data, caplog) -> None:
    x, q = data
    store, _ = make("faiss-hnsw", x[:800])
    store.search_backend.wait()
    t, meta = store.state_tensors()
    assert "store/ann/index" in t and t["store/ann/index"].dtype == torch.uint8 and meta["ann"]["ntotal"] == 800
    t["store/embedding"] = t["store/embedding"].clone()
    t["store/embedding"][3] = torch.nn.functional.normalize(torch.randn(D), dim=0)
    with caplog.at_level(logging.WARNING, logger="rbank_torch.backends"):
        loaded = PatternStore.from_state_tensors(t, meta)
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    st = loaded.search_backend.stats()
    assert st["loads"] == 0 and st["load_rejects"] == 1
    _, i = loaded.search_similar_batch(q, 10)
    assert loaded.search_backend.stats()["builds"] == 1
    assert recall(i, exact_ids(loaded, q, 10)) >= 0.95
    # a truncated index blob is refused the same way
    t2, meta2 = store.state_tensors()
    t2["store/ann/index"] = t2["store/ann/index"][:1000].clone()
    with caplog.at_level(logging.WARNING, logger="rbank_torch.backends"):
        bad = PatternStore.from_state_tensors(t2, meta2)
    assert bad.search_backend.stats()["load_rejects"] == 1


def test_bank_snapshot_keeps_index(tmp_path, data) -> None:
    from rbank_torch import ReasoningBank, ReasoningBankConfig

    x, q = data
    cfg = ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path),
                              pattern_config=PatternStoreConfig(embedding_dim=D, backend="faiss-hnsw",
                                                                backend_options={"background": False}))
    bank = ReasoningBank(cfg)
    bank.store.store_patterns([Pattern.new(e, "general", 0.9) for e in x[:600]])
    s0, i0 = bank.search_similar_batch(q, 5)
    bank.save()
    loaded = ReasoningBank.load(str(tmp_path / "bank.safetensors"))
    st = loaded.store.search_backend.stats()
    assert st["loads"] == 1 and st["builds"] == 0
    s1, i1 = loaded.search_similar_batch(q, 5)
    assert torch.equal(i0, i1)


# ---------------------------------------------------------------------------------------------- auto
def test_auto_is_default_and_exact_below_threshold(data) -> None:
    assert PatternStoreConfig().backend == "auto"
    x, q = data
    auto, ids_a = make("auto", x[:1000])
    ref, ids_r = make("exact", x[:1000])
    assert auto.search_backend.active_kind == "exact" and 1000 < AUTO_HNSW_MIN_ROWS
    s0, i0 = ref.search_similar_batch(q, 10)
    s1, i1 = auto.search_similar_batch(q, 10)
    assert torch.equal(positions(i0, ids_r), positions(i1, ids_a)) and torch.equal(s0, s1)


def test_auto_switches_at_thresholds(data) -> None:
    x, q = data
    store, ids = make("auto", x[:400], hnsw_min_rows=500, ivf_min_rows=2000, nprobe=16)
    ref, ids_r = make("exact", x[:400])
    s0, i0 = store.search_similar_batch(q, 10)
    s1, i1 = ref.search_similar_batch(q, 10)
    assert torch.equal(positions(i0, ids), positions(i1, ids_r)) and torch.equal(s0, s1)
    assert store.search_backend.active_kind == "exact"
    ids += store.store_patterns([Pattern.new(e, "general", 0.9) for e in x[400:600]])
    _, i = store.search_similar_batch(q, 10)
    assert store.search_backend.active_kind == "hnsw"
    assert recall(i, exact_ids(store, q, 10)) >= 0.95
    ids += store.store_patterns([Pattern.new(e, "general", 0.9) for e in x[600:2100]])
    _, i = store.search_similar_batch(q, 10)
    assert store.search_backend.active_kind == "ivf"
    assert recall(i, exact_ids(store, q, 10)) >= 0.95
    # back below the HNSW threshold: exact again, identical to exact search
    store.remove_patterns(ids[:1700])
    assert len(store) == 400
    ref2, _ = make("exact", store.columns()["embedding"])
    assert store.search_backend.active_kind == "exact"
    s, i = store.search_similar_batch(q, 10)
    torch.testing.assert_close(s, ref2.search_similar_batch(q, 10)[0], rtol=0, atol=0)


def test_auto_background_build_keeps_answering(data) -> None:
    x, q = data
    store, _ = make("auto", x, hnsw_min_rows=1000, background=True)
    _, i = store.search_similar_batch(q, 10)  # exact while the index is built
    assert recall(i, exact_ids(store, q, 10)) >= 0.95
    store.search_backend.wait()
    assert store.search_backend.active_kind == "hnsw"
    _, i = store.search_similar_batch(q, 10)
    assert recall(i, exact_ids(store, q, 10)) >= 0.95


# ---------------------------------------------------------------------------------------------- config / packages
def test_config_validation() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        PatternStore(PatternStoreConfig(backend="annoy"))
    with pytest.raises(ValueError, match="backend_options has unknown keys"):
        PatternStore(PatternStoreConfig(backend_options={"nprobes": 3}))
    with pytest.raises(ValueError, match=r"backend_options\['buffer_rows'\]"):
        PatternStore(PatternStoreConfig(backend_options={"buffer_rows": 0}))
    with pytest.raises(ValueError, match="backend_options must be a dict"):
        PatternStore(PatternStoreConfig(backend_options=[1]))  # type: ignore[arg-type]
    assert set(BACKENDS) == {"auto", "exact", "faiss-hnsw", "faiss-ivf", "faiss-flat", "faiss-sq8"}


def test_missing_faiss_names_the_extra(monkeypatch, data, caplog) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    for backend in ANN:
        with pytest.raises(MissingBackendError, match=r"pip install 'rbank-torch\[faiss\]'"):
            PatternStore(PatternStoreConfig(embedding_dim=D, backend=backend))
    with pytest.raises(ImportError, match=r"rbank-torch\[gpu\]"):
        import_faiss("faiss-ivf", gpu=True)
    x, q = data
    with caplog.at_level(logging.WARNING, logger="rbank_torch.backends"):
        store, _ = make("auto", x[:600], hnsw_min_rows=500)
        _, i = store.search_similar_batch(q, 10)
    assert store.search_backend.active_kind == "exact"
    assert any("rbank-torch[faiss]" in r.getMessage() for r in caplog.records)
    assert recall(i, exact_ids(store, q, 10)) == 1.0


def test_gpu_extra_named_without_gpu_faiss() -> None:
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss sees a GPU here")
    with pytest.raises(MissingBackendError, match=r"rbank-torch\[gpu\]"):
        import_faiss("faiss-flat", gpu=True)


def test_import_does_not_import_faiss() -> None:
    code = ("import sys, rbank_torch\n"
            "from rbank_torch import PatternStore, PatternStoreConfig, Pattern\n"
            "s = PatternStore(PatternStoreConfig(embedding_dim=4))\n"
            "s.store_pattern(Pattern.new([1.0, 0, 0, 0], 'general', 0.9))\n"
            "s.search_similar([1.0, 0, 0, 0], 1)\n"
            "assert 'faiss' not in sys.modules, 'faiss imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------- threads
def test_concurrent_search_insert_delete(data) -> None:
    x, q = data
    store, ids = make("faiss-hnsw", x[:1500], buffer_rows=64, absorb_chunk=32, background=True,
                      compact_dead_fraction=0.2)
    inserted: dict[int, torch.Tensor] = {pid: x[i] for i, pid in enumerate(ids)}
    removed: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    deadline = time.monotonic() + 4.0

    def writer() -> None:
        try:
            g = torch.Generator().manual_seed(5)
            j = 1500
            while time.monotonic() < deadline and j < 3000:
                e = x[j]
                p = Pattern.new(e, "general", 0.9)
                inserted[p.id] = e  # before storing: a reader may find it as soon as it is stored
                pid = store.store_pattern(p)
                assert pid == p.id
                top = store.search_similar_batch(e[None], 1)[1][0, 0].item()
                assert top == pid, "a pattern just stored must be found at once"
                j += 1
                if j % 3 == 0:
                    live = [p for p in list(inserted) if p not in set(removed)]
                    victim = live[int(torch.randint(len(live), (1,), generator=g))]
                    assert store.remove_pattern(victim)
                    removed.append(victim)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    def reader(seed: int) -> None:
        try:
            g = torch.Generator().manual_seed(seed)
            while not stop.is_set():
                gone = set(removed[: len(removed)])  # removed before this search began
                qq = q[torch.randint(len(q), (4,), generator=g)]
                s, i = store.search_similar_batch(qq, 10)
                got = [v for v in i.flatten().tolist() if v >= 0]
                assert not (set(got) & gone), "a removed pattern was returned"
                assert all(v in inserted for v in got)
                assert torch.all(s[:, :-1] >= s[:, 1:])
                res = store.search_similar(qq[0], 5)
                assert all(r.pattern.id not in gone for r in res)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    assert not any(t.is_alive() for t in threads)
    store.search_backend.wait()
    st = store.search_backend.stats()
    assert st["absorbs"] >= 1 and not st["failed"]
    _, i = store.search_similar_batch(q, 10)
    assert not (set(i.flatten().tolist()) & set(removed))
    assert recall(i, exact_ids(store, q, 10)) >= 0.95


# ---------------------------------------------------------------------------------------------- GPU
def _gpu_ready() -> bool:
    return torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@pytest.mark.cuda
@pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and faiss-gpu")
@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-ivf"])
def test_gpu_backends(data, backend: str) -> None:
    x, q = data
    store = PatternStore(PatternStoreConfig(embedding_dim=D, backend=backend, device="cuda",
                                            compact_dead_fraction=0.9, backend_options={"nprobe": 16}))
    ids = store.store_patterns([Pattern.new(e, "general", 0.9) for e in x])
    _, i = store.search_similar_batch(q, 10)
    assert i.device.type == "cuda"
    assert recall(i.cpu(), exact_ids(store, q, 10).cpu()) >= (0.999 if backend == "faiss-flat" else 0.95)
    dead = set(ids[:1000])
    store.remove_patterns(dead)
    _, i = store.search_similar_batch(q, 50)
    assert not (set(i.flatten().tolist()) & dead)
    auto = PatternStore(PatternStoreConfig(embedding_dim=D, device="cuda"))
    assert auto.search_backend.active_kind == "exact"
