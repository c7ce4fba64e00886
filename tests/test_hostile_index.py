"""Hostile or corrupt search indexes in store snapshots.

The faiss index a snapshot carries is derived data: loading it must never crash (only
:class:`~rbank_torch.snapshot.SnapshotError` may escape a load), and an index that does not match the stored
rows is rebuilt from them (with a warning) instead of being used. The snapshot's per-tensor CRC32 is
recomputed after every alteration here, as a crafted file would, so only the index checks stand in the way.

The fuzz loop runs in a child process under an address-space cap (``RLIMIT_AS``: what the process has mapped
after start-up plus 4 GiB), so a load that made faiss allocate what a hostile size field asks for fails
there, and a crash cannot take the test session with it. ``python tests/test_hostile_index.py KIND DIR``
runs it directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")

from rbank_torch import Pattern, PatternStore, PatternStoreConfig  # noqa: E402
from rbank_torch.snapshot import SnapshotError  # noqa: E402

D = 32
N = 480
KINDS = ("faiss-hnsw", "faiss-ivf", "faiss-flat")
FUZZ_VARIANTS = 110
INDEX = "store/ann/index"


def clustered(n: int, d: int = D, centres: int = 24, noise: float = 0.5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g)
    lab = torch.randint(0, centres, (n,), generator=g)
    return torch.nn.functional.normalize(c[lab] + noise * torch.randn(n, d, generator=g), dim=1)


def build(backend: str, metric: str = "cosine", n: int = N, m: int = 16, seed: int = 0) -> PatternStore:
    """A store whose saved index has dead slots and a buffer of unindexed rows; ef / nprobe make the index
    search exact at this size, so results can be compared with exact search."""
    x = clustered(n + 64, seed=seed)
    if metric != "cosine":
        x = x * torch.linspace(0.5, 2.0, x.shape[0])[:, None]
    store = PatternStore(PatternStoreConfig(
        embedding_dim=D, distance_metric=metric, backend=backend, m=m, ef_construction=40, ef_search=2 * n,
        compact_dead_fraction=0.9, backend_options={"background": False, "buffer_rows": 100, "nprobe": 64},
    ))
    ids = store.store_patterns([Pattern.new(e, "general", 0.9) for e in x[:n]])
    store.search_backend.wait()
    store.remove_patterns(ids[10:40])  # dead slots in the saved index
    store.store_patterns([Pattern.new(e, "general", 0.9) for e in x[n:]])  # buffered rows
    return store


def queries(seed: int = 1) -> torch.Tensor:
    return torch.cat([clustered(24, seed=seed), clustered(N, seed=0)[::40]])


def check_exact(store: PatternStore, path: str, k: int = 5) -> None:
    """``store``'s results equal exact search over the same rows (scores; ids up to ties)."""
    q = queries()
    s, i = store.search_similar_batch(q, k)
    ref = PatternStore.load(path, backend="exact")
    rs, _ = ref.search_similar_batch(q, k)
    torch.testing.assert_close(s, rs, rtol=0, atol=1e-5)
    cols = ref.columns()
    emb = dict(zip(cols["id"].tolist(), cols["embedding"].float()))
    for qq, row_s, row_i in zip(q, s.tolist(), i.tolist()):
        for sv, pid in zip(row_s, row_i):
            e = emb[pid]  # a live id
            want = {"cosine": torch.nn.functional.cosine_similarity(qq, e, dim=0).item(), "dot": float(qq @ e),
                    "euclidean": 1.0 / (1.0 + float(torch.dist(qq, e)))}[store.config.distance_metric]
            assert sv == pytest.approx(want, abs=1e-5)


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def write_variant(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str], blob: np.ndarray) -> None:
    """The snapshot with its index bytes replaced by ``blob``, the CRC table recomputed to match."""
    from safetensors.torch import save_file

    t = dict(tensors)
    t[INDEX] = torch.from_numpy(np.ascontiguousarray(blob, dtype=np.uint8).copy())
    crcs = json.loads(header["rbank.crc32"])
    crcs[INDEX] = zlib.crc32(t[INDEX].numpy().data) if t[INDEX].numel() else 0
    h = dict(header)
    h["rbank.crc32"] = json.dumps(crcs, separators=(",", ":"))
    save_file(t, str(path), metadata=h)


def load_quiet(path: str) -> tuple[PatternStore, list[str]]:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        store = PatternStore.load(path)
    return store, [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]


# ---------------------------------------------------------------------------------------------- mutations
HUGE = [2**31 - 1, 2**32 + 7, 2**40, 2**62, 2**64 - 1, 10**12]


def size_fields(blob: np.ndarray, kind: str) -> list[tuple[int, int]]:
    """(offset, width) of the size fields of an intact index as faiss writes it (faiss/impl/index_write.cpp):
    the index headers' d and ntotal, every vector's count, IVF nlist / code size / each list size."""
    out: list[tuple[int, int]] = []

    def u64(p: int) -> int:
        return int(blob[p : p + 8].view("<u8")[0])

    def header(p: int) -> int:  # fourcc, d i32, ntotal i64, 2 dummies i64, is_trained u8, metric i32
        out.extend([(p + 4, 4), (p + 8, 8)])
        return p + 37

    def vec(p: int, item: int) -> int:
        out.append((p, 8))
        return p + 8 + item * u64(p)

    def flat(p: int) -> int:
        return vec(header(p), 4)

    if kind == "flat":
        flat(0)
    elif kind == "hnsw":
        p = header(0)
        for item in (8, 4, 4, 8, 4):  # level probabilities, links per level, levels, offsets, links
            p = vec(p, item)
        flat(p + 20)  # entry point, max level, efConstruction, efSearch, unused
    else:
        p = header(0)
        out.append((p, 8))  # nlist (then nprobe)
        p = flat(p + 16)  # the quantizer
        p = vec(p + 1, 8) + 4  # direct map, "ilar"
        out.extend([(p, 8), (p + 8, 8), (p + 20, 8)])  # nlist, code size, count of the list sizes
        out.extend((p + 28 + 8 * i, 8) for i in range(u64(p + 20)))  # each list size (or list, size pair)
    return out


def mutate(blob: np.ndarray, kind: str, n: int, rng: np.random.Generator, case: int) -> tuple[str, np.ndarray]:
    b = blob.copy()
    size = b.size
    what = case % 8
    if what == 0:  # random byte flips
        k = int(rng.choice([1, 2, 8, 64]))
        at = rng.integers(0, size, k)
        b[at] ^= rng.integers(1, 256, k).astype(np.uint8)
        return f"flip{k}", b
    if what == 1:  # single bit flips
        at = rng.integers(0, size, 3)
        b[at] ^= (1 << rng.integers(0, 8, 3)).astype(np.uint8)
        return "bits", b
    if what == 2:  # truncation
        return "truncate", b[: int(rng.integers(0, size))]
    if what == 3:  # extension
        return "extend", np.concatenate([b, rng.integers(0, 256, int(rng.integers(1, 4096))).astype(np.uint8)])
    if what == 4:  # a size field set to a huge value
        fields = size_fields(blob, kind)
        at, width = fields[int(rng.integers(0, len(fields)))]
        v = HUGE[int(rng.integers(0, len(HUGE)))] & ((1 << (8 * width)) - 1)
        b[at : at + width] = np.frombuffer(v.to_bytes(width, "little"), dtype=np.uint8)
        return f"size@{at}", b
    if what == 5:  # header d / ntotal / metric inflated
        at, width = [(4, 4), (8, 8), (37, 4)][int(rng.integers(0, 3))]
        v = HUGE[int(rng.integers(0, len(HUGE)))] & ((1 << (8 * width)) - 1)
        b[at : at + width] = np.frombuffer(v.to_bytes(width, "little"), dtype=np.uint8)
        return f"header@{at}", b
    if what == 6:  # a 4-byte word set to a valid slot id (a rewired graph link, a moved list entry, ...)
        at = int(rng.integers(0, (size - 4) // 4)) * 4 + int(rng.integers(0, 4))
        b[at : at + 4] = np.frombuffer(np.int32(rng.integers(0, n)).tobytes(), dtype=np.uint8)
        return "id", b
    # a float overwritten with a random, huge or non-finite value
    at = int(rng.integers(0, size - 4))
    v = np.float32(rng.choice([np.nan, np.inf, 1e30, -3.0, float(rng.standard_normal())]))
    b[at : at + 4] = np.frombuffer(v.tobytes(), dtype=np.uint8)
    return "float", b


_REASONS = [("cannot hold", "size"), ("faiss cannot read", "faiss"), ("stored vector", "vectors"),
            ("non-finite", "vectors"), ("list of its nearest centroid", "lists"), ("find themselves", "probe"),
            ("differ from the index size", "structure"), ("index is a", "structure")]


def _reason(msg: str) -> str:
    """Which check caught it: size bound, layout walk, vectors vs rows, IVF lists, faiss, structure, probe."""
    return next((name for key, name in _REASONS if key in msg), "layout")


def fuzz(kind: str, tmp: Path, variants: int = FUZZ_VARIANTS, seed: int = 0) -> dict:
    """Save a store of ``kind``, then load ``variants`` altered copies of its index; returns the counts of
    outcomes and the failures (a load raising anything but SnapshotError, or results differing from exact)."""
    backend = kind if kind.startswith("faiss-") else f"faiss-{kind}"
    metric = {"faiss-hnsw": "cosine", "faiss-ivf": "euclidean", "faiss-flat": "dot"}[backend]
    store = build(backend, metric)
    good = tmp / "good.safetensors"
    store.save(str(good))
    tensors, header = read_file(good)
    blob = tensors[INDEX].numpy()
    n = int(json.loads(header["rbank.meta"])["ann"]["ntotal"])
    rng = np.random.default_rng(seed)
    out: dict = {"snapshot_error": 0, "rebuilt": 0, "kept": 0, "kept_altered": 0, "failures": [], "reasons": {}}
    path = tmp / "bad.safetensors"
    for case in range(variants):
        name, b = mutate(blob, backend.split("-")[1], n, rng, case)
        tag = f"{case}:{name}"
        print(tag, file=sys.stderr, flush=True)  # the last line names the variant if the process dies
        write_variant(path, tensors, header, b)
        try:
            loaded, warned = load_quiet(str(path))
        except SnapshotError:
            out["snapshot_error"] += 1
            continue
        except BaseException as e:  # noqa: BLE001 - the point of the test
            out["failures"].append(f"{tag}: {type(e).__name__}: {e}")
            continue
        st = loaded.search_backend.stats()
        if st["load_rejects"] == 1 and st["loads"] == 0:
            out["rebuilt"] += 1
            if not any("rebuilding it from the stored rows" in w for w in warned):
                out["failures"].append(f"{tag}: rebuilt without a warning")
            reason = _reason(warned[0] if warned else "")
            out["reasons"][reason] = out["reasons"].get(reason, 0) + 1
        elif st["loads"] == 1 and st["load_rejects"] == 0:
            out["kept"] += 1
            out["kept_altered"] += int(b.size != blob.size or bool((b != blob).any()))
        else:
            out["failures"].append(f"{tag}: unexpected stats {st}")
            continue
        try:
            check_exact(loaded, str(path))
        except BaseException as e:  # noqa: BLE001
            out["failures"].append(f"{tag}: results differ from exact search: {str(e)[:300]}")
    return out


def _limit_address_space(extra: int = 4 << 30) -> None:
    import resource

    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + extra
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
@pytest.mark.parametrize("backend", KINDS)
def test_intact_roundtrip_keeps_index(tmp_path, backend: str, metric: str) -> None:
    store = build(backend, metric)
    q = queries()
    s0, i0 = store.search_similar_batch(q, 5)
    path = str(tmp_path / "s.safetensors")
    store.save(path)
    loaded, warned = load_quiet(path)
    st = loaded.search_backend.stats()
    assert warned == []
    assert st["loads"] == 1 and st["load_rejects"] == 0 and st["builds"] == 0
    assert st["index_dead"] == 30 and st["buffered"] == 64
    s1, i1 = loaded.search_similar_batch(q, 5)
    assert loaded.search_backend.stats()["builds"] == 0
    assert torch.equal(i1, i0)
    torch.testing.assert_close(s1, s0, rtol=0, atol=1e-6)
    check_exact(loaded, path)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_intact_roundtrip_other_dtypes(tmp_path, dtype: str) -> None:
    for backend in KINDS:
        store = PatternStore(PatternStoreConfig(embedding_dim=D, backend=backend, dtype=dtype,
                                                backend_options={"background": False}))
        store.store_patterns([Pattern.new(e, "general", 0.9) for e in clustered(300, seed=3) * 3.0])
        store.search_backend.wait()
        path = str(tmp_path / f"{backend}.safetensors")
        store.save(path)
        loaded, warned = load_quiet(path)
        assert warned == [] and loaded.search_backend.stats()["loads"] == 1, (backend, warned)


def test_intact_hnsw_that_misses_rows_still_loads(tmp_path) -> None:
    """An intact HNSW graph at a small m does not find every row from itself (here most rows); the probe's
    record from the save tells that apart from damage. Without a record (older snapshots) half the probes
    must find themselves, which graphs of usual m do; a degenerate one is then rebuilt once."""
    x = clustered(3000, centres=6, noise=0.05, seed=5)
    x[:600] = x[0]  # many duplicates
    for m, ef, record_less_loads in ((2, 8, False), (8, 64, True)):
        store = PatternStore(PatternStoreConfig(embedding_dim=D, backend="faiss-hnsw", m=m, ef_construction=ef,
                                                ef_search=ef, backend_options={"background": False}))
        store.store_patterns([Pattern.new(e, "general", 0.9) for e in x])
        store.search_backend.wait()
        path = tmp_path / "s.safetensors"
        store.save(str(path))
        loaded, warned = load_quiet(str(path))
        assert warned == [] and loaded.search_backend.stats()["loads"] == 1, (m, warned)
        tensors, header = read_file(path)
        meta = json.loads(header["rbank.meta"])
        del meta["ann"]["probe"]
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            loaded = PatternStore.from_state_tensors(tensors, meta)
        assert loaded.search_backend.stats()["loads"] == int(record_less_loads), (m, [str(x.message) for x in w])


def _reserialize(path: Path, out: Path, edit) -> None:
    """Rewrite the snapshot's index through faiss with ``edit(index)`` applied (a well-formed but wrong index)."""
    tensors, header = read_file(path)
    index = faiss.deserialize_index(tensors[INDEX].numpy())
    edit(index)
    write_variant(out, tensors, header, faiss.serialize_index(index))


def test_wellformed_but_wrong_indexes_are_rebuilt(tmp_path) -> None:
    """Faults that faiss reads without complaint: an unreachable HNSW node, an IVF entry in the wrong list,
    an altered flat vector. Each is caught (probe, list check, vector check) and the index rebuilt."""
    for backend in KINDS:
        store = build(backend)
        good = tmp_path / f"{backend}.safetensors"
        store.save(str(good))
        bad = tmp_path / f"{backend}-bad.safetensors"

        def edit(index, backend=backend):
            if backend == "faiss-hnsw":  # no node links to node 7 any more: searches cannot reach it
                h = index.hnsw
                nb = faiss.vector_to_array(h.neighbors)
                nb[nb == 7] = 100
                faiss.copy_array_to_vector(nb.astype(np.int32), h.neighbors)
            elif backend == "faiss-ivf":  # slot 5 moved to another list
                inv = faiss.extract_index_ivf(index).invlists
                for lst in range(inv.nlist):
                    ids = faiss.rev_swig_ptr(inv.get_ids(lst), inv.list_size(lst))
                    if 5 in ids:
                        j = int(np.nonzero(ids == 5)[0][0])
                        code = faiss.rev_swig_ptr(inv.get_single_code(lst, j), inv.code_size).copy()
                        other = (lst + 1) % inv.nlist
                        inv.add_entry(other, 5, faiss.swig_ptr(code))
                        last = inv.list_size(lst) - 1
                        inv.update_entry(lst, j, int(ids[last]),
                                         faiss.swig_ptr(faiss.rev_swig_ptr(inv.get_single_code(lst, last),
                                                                           inv.code_size).copy()))
                        inv.resize(lst, last)
                        break
            else:  # one stored vector nudged
                x = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d)
                x[3 * index.d] += 0.05

        _reserialize(good, bad, edit)
        loaded, warned = load_quiet(str(bad))
        st = loaded.search_backend.stats()
        assert st["load_rejects"] == 1 and st["loads"] == 0, (backend, st)
        assert len(warned) == 1 and "rebuilding it from the stored rows" in warned[0], warned
        check_exact(loaded, str(bad))
        assert loaded.search_backend.stats()["builds"] == 1


def test_inflated_sizes_are_refused_before_faiss_reads_them(tmp_path, monkeypatch) -> None:
    """Header and count fields claiming gigabytes never reach ``faiss.deserialize_index``."""
    calls = []
    real = faiss.deserialize_index
    monkeypatch.setattr(faiss, "deserialize_index", lambda b: calls.append(len(b)) or real(b))
    for backend in KINDS:
        store = build(backend)
        good = tmp_path / f"{backend}.safetensors"
        store.save(str(good))
        tensors, header = read_file(good)
        blob = tensors[INDEX].numpy()
        fields = size_fields(blob, backend.split("-")[1])
        assert len(fields) >= 3
        for at, width in fields:
            for v in (2**33 + 1, 2**62, 2**64 - 1):
                b = blob.copy()
                b[at : at + width] = np.frombuffer((v & ((1 << (8 * width)) - 1)).to_bytes(width, "little"),
                                                   dtype=np.uint8)
                write_variant(tmp_path / "bad.safetensors", tensors, header, b)
                calls.clear()
                loaded, warned = load_quiet(str(tmp_path / "bad.safetensors"))
                assert loaded.search_backend.stats()["load_rejects"] == 1, (backend, at)
                assert calls == [], (backend, at)  # refused before faiss read a byte
                assert warned and "rebuilding" in warned[0]


def test_faiss_errors_and_memory_errors_mean_rebuild(tmp_path, monkeypatch) -> None:
    store = build("faiss-hnsw")
    path = str(tmp_path / "s.safetensors")
    store.save(path)
    for exc in (MemoryError("std::bad_alloc"), RuntimeError("Error in faiss::read_index"), OverflowError("x")):
        def boom(b, exc=exc):
            raise exc

        monkeypatch.setattr(faiss, "deserialize_index", boom)
        loaded, warned = load_quiet(path)
        assert loaded.search_backend.stats()["load_rejects"] == 1
        assert type(exc).__name__ in warned[0] or str(exc) in warned[0]
        check_exact(loaded, path)


def test_hostile_index_metadata(tmp_path) -> None:
    store = build("faiss-ivf")
    t, meta = store.state_tensors()
    bad_metas = [
        [1, 2], "hnsw", {"kind": ["ivf"]}, {"kind": "ivf"},
        {**meta["ann"], "ntotal": True}, {**meta["ann"], "ntotal": 1e300}, {**meta["ann"], "ntotal": -1},
        {**meta["ann"], "ntotal": 10**30}, {**meta["ann"], "dim": "32"}, {**meta["ann"], "nlist": 10**12},
        {**meta["ann"], "nlist": 1}, {**meta["ann"], "built_rows": None}, {**meta["ann"], "checksum": None},
    ]
    for ann in bad_metas:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = PatternStore.from_state_tensors(t, {**meta, "ann": ann})
        assert loaded.search_backend.stats()["loads"] == 0, ann
        _, i = loaded.search_similar_batch(queries()[:3], 5)
        assert i.shape == (3, 5)
    # a garbage probe record is ignored (the absolute probe applies)
    h = build("faiss-hnsw")
    t, meta = h.state_tensors()
    for probe in ({"ef": 10**9, "slots": [0], "labels": [0]}, {"slots": "x"}, [1], {"ef": 8, "slots": [10**12],
                                                                                    "labels": [1]}):
        loaded = PatternStore.from_state_tensors(t, {**meta, "ann": {**meta["ann"], "probe": probe}})
        assert loaded.search_backend.stats()["loads"] == 1


@pytest.mark.parametrize("backend", KINDS)
def test_fuzzed_indexes_under_memory_cap(tmp_path, backend: str) -> None:
    """~100 altered indexes per kind, CRC recomputed, loaded in a child process under an address-space cap:
    every load raises SnapshotError or gives exact results (index intact or rebuilt), nothing else."""
    r = subprocess.run([sys.executable, __file__, backend, str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"child died ({r.returncode}); last variants:\n{r.stderr[-2000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["failures"] == [], out["failures"][:10]
    assert out["snapshot_error"] + out["rebuilt"] + out["kept"] == FUZZ_VARIANTS
    assert out["rebuilt"] >= FUZZ_VARIANTS // 2, out  # most alterations are caught


if __name__ == "__main__":
    _limit_address_space()
    print(json.dumps(fuzz(sys.argv[1], Path(sys.argv[2]))))
