"""Single-query search and k-means next to the published peers, every ratio from one run.

    flock /tmp/rbank-bench.lock python benchmarks/bench_peers.py                  # everything (~5 min)
    flock /tmp/rbank-bench.lock python benchmarks/bench_peers.py --no-peers       # without node
    flock /tmp/rbank-bench.lock python benchmarks/bench_peers.py --build-sizes 20000,100000

Data: ``bench_search.make_data`` (clustered unit vectors, fresh queries from the same mixture), N × 768,
k = 10, one query per call (the way an agent asks). The peers come from a folder holding
``peer_file_bench.js`` and its ``setup`` script (``--peers``, default ``$RBANK_PEERS``): the JS
ReasoningBank of ``@ruvector/ruvllm`` (brute force) and the native k-means of ``@ruvector/sona``
(``forceLearn``). They read the very rows written here, in the same run.

Sections (each prints its ratios; a summary repeats them at the end):

* **single queries** at N rows: the store's ``search_similar`` on ``exact`` / HNSW (built) / IVF / flat,
  ``search_similar_batch`` with one query on each, bare ``torch.topk(E @ q, k)``, the raw faiss index the
  store built (same M / efSearch), in interleaved rounds (median q/s of ``--rounds``);
* **after an insert**: an ``auto`` store gets the N rows in one call and is searched at once; q/s per
  ``--window`` seconds until its index is built (the first window is "the first second"), next to
  ``backend="exact"`` on the same rows measured after;
* **storage dtypes**: exact search with ``dtype="bf16"`` / ``"fp16"`` and the faiss SQ8 backend, recall@10
  against fp32 exact and q/s against fp32 exact;
* **k-means**: ``cluster_patterns`` against sona ``forceLearn`` on the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_search import make_data  # noqa: E402

from rbank_torch import Pattern, PatternStore, PatternStoreConfig  # noqa: E402
from rbank_torch.consolidation import cluster_patterns  # noqa: E402

SUMMARY: list[str] = []


def say(line: str) -> None:
    print(line, flush=True)


def ratio(name: str, value: float, target: float | None = None, ge: bool = True) -> None:
    """Print a ratio (and PASS/FAIL when a target is given) and keep it for the summary."""
    mark = ""
    if target is not None:
        ok = value >= target if ge else value <= target
        mark = f"  (target {'>=' if ge else '<='} {target:g}: {'PASS' if ok else 'FAIL'})"
    line = f"{name}: {value:.3f}{mark}"
    SUMMARY.append(line)
    say("  " + line)


# ---------------------------------------------------------------------------------------------- peers
def peers_dir(arg: str | None) -> Path | None:
    """A peers folder with node_modules installed (copied to a temporary folder when read-only)."""
    src = Path(arg or os.environ.get("RBANK_PEERS", "/work/shared/peers"))
    if not (src / "peer_file_bench.js").exists() or shutil.which("node") is None:
        say(f"peers: no peer_file_bench.js under {src} or no node on PATH: peers skipped")
        return None
    if (src / "node_modules" / "@ruvector" / "sona").exists():
        return src
    dst = Path(tempfile.gettempdir()) / "rbank-peers"
    if not (dst / "node_modules" / "@ruvector" / "sona").exists():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("node_modules"))
        r = subprocess.run(["bash", str(dst / "setup")], capture_output=True, text=True, timeout=600)
        if not (dst / "node_modules" / "@ruvector" / "sona").exists():
            say(f"peers: npm install failed (rc {r.returncode}): {r.stderr.strip()[-300:]}: peers skipped")
            return None
    return dst


def run_peer(pdir: Path, X: torch.Tensor, Q: torch.Tensor, k: int, sona_clusters: int = 0) -> dict[str, Any]:
    """Run peer_file_bench.js on rows X (stored) and Q (searched): its JSON lines by peer name."""
    with tempfile.NamedTemporaryFile(suffix=".f32", delete=False) as f:
        torch.cat([X, Q]).numpy().astype("<f4").tofile(f)
        path = f.name
    try:
        cmd = ["node", str(pdir / "peer_file_bench.js"), path, str(X.shape[0]), str(X.shape[1]), str(Q.shape[0]),
               str(k)]
        if sona_clusters:
            cmd += ["sona", str(sona_clusters)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True)
    finally:
        os.unlink(path)
    return {j["peer"]: j for j in (json.loads(line) for line in r.stdout.splitlines() if line.startswith("{"))}


# ---------------------------------------------------------------------------------------------- helpers
def make_store(X: torch.Tensor, backend: str, wait: bool = True, **cfg: Any) -> tuple[PatternStore, np.ndarray]:
    st = PatternStore(PatternStoreConfig(embedding_dim=X.shape[1], max_patterns=X.shape[0] + 1000,
                                         backend=backend, **cfg))
    ids = np.asarray(st.store_patterns([Pattern.new(X[i], "general", 0.9) for i in range(X.shape[0])]))
    if wait:
        st.search_backend.wait()
    return st, ids


def rows_of(ids: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Pattern ids → row numbers of X (ids are ascending in row order); −1 stays −1."""
    pos = np.clip(np.searchsorted(ids, found), 0, ids.size - 1)
    return np.where((found >= 0) & (ids[pos] == found), pos, -1)


def single_qps(fn: Any, qs: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    for q in qs:
        fn(q)
    return len(qs) / (time.perf_counter() - t0)


def interleaved(variants: dict[str, Any], qs: list[torch.Tensor], rounds: int) -> dict[str, float]:
    """Median single-query q/s of each variant over ``rounds`` rounds, variants rotated every round."""
    names = list(variants)
    for n in names:  # warm-up
        for q in qs[:20]:
            variants[n](q)
    got: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            got[n].append(single_qps(variants[n], qs))
    return {n: statistics.median(v) for n, v in got.items()}


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth)) / truth.size


# ---------------------------------------------------------------------------------------------- sections
def section_single(args: argparse.Namespace, X: torch.Tensor, Q: torch.Tensor, peer: dict[str, Any] | None) -> None:
    k = args.k
    n = X.shape[0]
    qs = [Q[i] for i in range(Q.shape[0])]
    say(f"\n== single queries, {n} x {X.shape[1]}, k = {k}, {len(qs)} queries x {args.rounds} rounds ==")
    truth = torch.topk(Q @ X.T, k, dim=1).indices.numpy()
    stores: dict[str, tuple[PatternStore, np.ndarray]] = {}
    for be in ("exact", "faiss-hnsw", "faiss-ivf", "faiss-flat"):
        t0 = time.perf_counter()
        stores[be] = make_store(X, be)
        say(f"  store {be}: built in {time.perf_counter() - t0:.1f} s")
    E = X.clone()
    hn = stores["faiss-hnsw"][0]
    raw = hn.search_backend._ix.index  # the very index the store searches: same graph, M and efSearch
    import faiss

    raw_params = faiss.SearchParametersHNSW()
    raw_params.efSearch = hn.config.ef_search

    def raw_faiss(q: torch.Tensor) -> Any:
        x = q.numpy()[None, :]
        return raw.search(x / np.linalg.norm(x), k, params=raw_params)

    variants: dict[str, Any] = {"bare topk(E @ q)": lambda q: torch.topk(E @ q, k), "raw faiss HNSW": raw_faiss}
    for be, (st, _) in stores.items():
        variants[f"{be} search_similar"] = lambda q, st=st: st.search_similar(q, k)
        variants[f"{be} batch of 1"] = lambda q, st=st: st.search_similar_batch(q[None, :], k)
    res = interleaved(variants, qs, args.rounds)
    for name, v in res.items():
        say(f"  {name:<32} {v:9.1f} q/s")
    say("  ratios:")
    for be in stores:
        ratio(f"{be}: search_similar / search_similar_batch(1 query)",
              res[f"{be} search_similar"] / res[f"{be} batch of 1"], 0.9)
    ratio("exact search_similar / bare topk(E @ q)", res["exact search_similar"] / res["bare topk(E @ q)"], 0.9)
    ratio("faiss-hnsw search_similar_batch(1 query) / raw faiss HNSW",
          res["faiss-hnsw batch of 1"] / res["raw faiss HNSW"], 0.9)
    ratio("faiss-hnsw search_similar / raw faiss HNSW", res["faiss-hnsw search_similar"] / res["raw faiss HNSW"],
          0.9)
    # recall of each store against exact fp32
    for be, (st, ids) in stores.items():
        found = np.stack([rows_of(ids, np.array([r.pattern.id for r in st.search_similar(q, k)])) for q in qs])
        say(f"  {be} recall@{k}: {recall_at(found, truth):.4f}")
    if peer is not None:
        js = peer["ruvllm-js"]
        say(f"  JS ReasoningBank (ruvllm): {js['search_qps']:.1f} q/s")
        st, ids = stores["faiss-hnsw"]
        ours = np.array([rows_of(ids, np.array([st.search_similar(q, 1)[0].pattern.id]))[0] for q in qs])
        agree = float(np.mean(ours == np.asarray(js["top1"][: len(qs)])))
        ratio("HNSW built: search_similar / JS ReasoningBank", res["faiss-hnsw search_similar"] / js["search_qps"],
              20)
        ratio("top-1 agreement HNSW vs JS ReasoningBank", agree, 0.98)
        ratio("exact search_similar / JS ReasoningBank", res["exact search_similar"] / js["search_qps"])
    args._exact_qps = res["exact search_similar"]
    args._js_qps = peer["ruvllm-js"]["search_qps"] if peer is not None else None
    del stores


def section_build(args: argparse.Namespace, n: int) -> None:
    """q/s of an ``auto`` store searched right after it received n rows, until its index is built."""
    X, Q = make_data(n, args.queries, args.dim, max(50, n // 50), seed=7)
    k = args.k
    qs = [Q[i] for i in range(Q.shape[0])]
    say(f"\n== during the index build: auto store, {n} rows inserted in one call, then single queries ==")
    pats = [Pattern.new(X[i], "general", 0.9) for i in range(n)]
    st = PatternStore(PatternStoreConfig(embedding_dim=X.shape[1], max_patterns=n + 1000, backend="auto",
                                         backend_options={"hnsw_min_rows": min(n, 20_000)}))
    t_ins = time.perf_counter()
    st.store_patterns(pats)
    windows: list[tuple[float, float, str, bool]] = []
    i = 0
    t_end = t_ins + args.max_build_s
    while True:
        w0 = time.perf_counter()
        cnt = 0
        while time.perf_counter() - w0 < args.window:
            st.search_similar(qs[i % len(qs)], k)
            i += 1
            cnt += 1
        stats = st.search_backend.stats()
        kind = stats["active"]
        done = stats["job"] is None and kind != "exact" and stats["buffered"] == 0
        what = "interim SQ8 + re-rank" if stats.get("interim") else kind
        windows.append((w0 - t_ins, cnt / (time.perf_counter() - w0), f"{what} (job {stats['job']})", done))
        if done:
            break
        if time.perf_counter() > t_end:
            break
    t_built = time.perf_counter() - t_ins
    ex, _ = make_store(X, "exact")
    ex_qps = statistics.median([single_qps(lambda q: ex.search_similar(q, k), qs) for _ in range(3)])
    say(f"  backend='exact' on the same rows (measured after): {ex_qps:.1f} q/s; index ready after {t_built:.1f} s")
    say(f"  {'t (s)':>7} {'q/s':>9} {'/ exact':>8}  answering")
    for t, v, what, _ in windows:
        say(f"  {t:7.1f} {v:9.1f} {v / ex_qps:8.2f}  {what}")
    building_w = [v for _, v, _, done in windows if not done] or [windows[0][1]]
    ratio(f"{n} rows: slowest window during the build / exact", min(building_w) / ex_qps, 1.0)
    ratio(f"{n} rows: first window after the insert / exact", windows[0][1] / ex_qps, 1.0)
    if args._js_qps and n == args.n:
        ratio(f"{n} rows: first second after the insert / JS ReasoningBank", windows[0][1] / args._js_qps, 4)
    del st


def section_dtypes(args: argparse.Namespace, X: torch.Tensor, Q: torch.Tensor) -> None:
    k = args.k
    qs = [Q[i] for i in range(Q.shape[0])]
    say(f"\n== storage: fp32 exact vs bf16 / fp16 exact vs faiss SQ8, {X.shape[0]} x {X.shape[1]} ==")
    truth = torch.topk(Q @ X.T, k, dim=1).indices.numpy()
    stores: dict[str, tuple[PatternStore, np.ndarray]] = {"fp32 exact": make_store(X, "exact")}
    for dt in ("bf16", "fp16"):
        try:
            stores[f"{dt} exact"] = make_store(X, "exact", dtype=dt)
        except ValueError as e:
            say(f"  {dt}: {e}")
    try:
        stores["faiss-sq8"] = make_store(X, "faiss-sq8")
    except ValueError as e:
        say(f"  faiss-sq8: {e}")
    variants = {name: (lambda q, st=st: st.search_similar(q, k)) for name, (st, _) in stores.items()}
    res = interleaved(variants, qs, args.rounds)
    for name, (st, ids) in stores.items():
        found = np.stack([rows_of(ids, np.array([r.pattern.id for r in st.search_similar(q, k)])) for q in qs])
        rc = recall_at(found, truth)
        say(f"  {name:<12} {res[name]:9.1f} q/s  recall@{k} {rc:.4f}")
        if name != "fp32 exact":
            ratio(f"{name}: recall@{k} vs fp32 exact", rc, 0.99)
            ratio(f"{name}: single q/s / fp32 exact", res[name] / res["fp32 exact"], 1.6)


def section_kmeans(args: argparse.Namespace, pdir: Path | None) -> None:
    say("\n== k-means: cluster_patterns vs sona forceLearn (same rows) ==")
    for spec in args.kmeans.split(","):
        if not spec:
            continue
        size, c_s = spec.split("->")
        n, c = int(size.split("x")[0]), int(c_s)
        X, Q = make_data(n, 2, args.dim, c, seed=11)
        times = []
        res = cluster_patterns(X[: min(n, 500)], min(c, 10), seed=0)  # warm-up (first-call costs)
        for _ in range(args.kmeans_reps):
            t0 = time.perf_counter()
            res = cluster_patterns(X, c, seed=0)
            times.append(time.perf_counter() - t0)
        ours = statistics.median(times)
        assert res is not None
        say(f"  {n} x {args.dim} -> {c}: cluster_patterns {ours:.3f} s (median of {len(times)}; "
            f"{len(res)} clusters)")
        if pdir is not None:
            sona = run_peer(pdir, X, Q, 1, sona_clusters=c)["sona"]["learn_s"]
            say(f"  {n} x {args.dim} -> {c}: sona forceLearn {sona:.3f} s")
            ratio(f"cluster_patterns {n}x{args.dim}->{c} speed-up over sona", sona / ours, 20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch and faiss threads (0: their defaults)")
    ap.add_argument("--peers", default=None, help="folder with peer_file_bench.js (default $RBANK_PEERS)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--build-sizes", default="20000", help="comma-separated sizes for the build timeline")
    ap.add_argument("--window", type=float, default=1.0, help="seconds per q/s window during the build")
    ap.add_argument("--max-build-s", type=float, default=240.0)
    ap.add_argument("--kmeans", default="2000x768->50,10000x768->100")
    ap.add_argument("--kmeans-reps", type=int, default=3)
    ap.add_argument("--sections", default="single,build,dtypes,kmeans")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass
    args._exact_qps = None
    args._js_qps = None
    sections = set(args.sections.split(","))
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    pdir = None if args.no_peers else peers_dir(args.peers)
    X, Q = make_data(args.n, args.queries, args.dim, max(50, args.n // 50), seed=5)
    peer = None
    if pdir is not None and ("single" in sections or "build" in sections):
        peer = run_peer(pdir, X, Q, args.k)
    if "single" in sections:
        section_single(args, X, Q, peer)
    elif peer is not None:
        args._js_qps = peer["ruvllm-js"]["search_qps"]
    if "build" in sections:
        for n in (int(v) for v in args.build_sizes.split(",") if v):
            section_build(args, n)
    if "dtypes" in sections:
        section_dtypes(args, X, Q)
    if "kmeans" in sections:
        section_kmeans(args, pdir)
    say("\n== summary ==")
    for line in SUMMARY:
        say("  " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
