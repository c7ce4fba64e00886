"""PatternStore: insert rates, exact search vs a bare torch baseline, resident memory per pattern.

One run on N × 768 patterns (default N = 100 000), all ratios measured side by side:

    python benchmarks/bench_store.py            # full size
    python benchmarks/bench_store.py --n 20000  # quick

Targets (2-core CPU): batch insert ≥ 100 000/s, single insert ≥ 5 000/s, exact search within 1.25× of
``torch.topk(q @ E.T)`` on the same tensors, memory ≤ 1.5× (raw embedding bytes + string data).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rbank_torch import Pattern, PatternStore, PatternStoreConfig  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def make_patterns(n: int, d: int, seed: int) -> list[Pattern]:
    g = torch.Generator().manual_seed(seed)
    E = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    cats = ["general", "research", "code_generation", "tool_use"]
    out = []
    for i in range(n):
        p = Pattern.new(E[i].clone(), cats[i % 4], 0.5 + 0.5 * ((i * 7919) % 100) / 100)
        p.usage_count, p.success_count, p.avg_quality = 1 + i % 5, i % 2, 0.6
        p.lessons = [f"lesson {i % 1000}"]
        p.example_actions = ["search", "summarise"]
        out.append(p)
    return out


def timeit(fn, repeat: int) -> list[float]:
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def row(name, provider, x, ts):
    ts = sorted(ts)
    q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))]  # noqa: E731
    return {"name": name, "provider": provider, "x": x, "median": statistics.median(ts), "p20": q(0.2),
            "p80": q(0.8), "device": "cpu", "version": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--single", type=int, default=20_000, help="patterns inserted one at a time")
    args = ap.parse_args()
    n, d = args.n, args.d
    rows = []
    cfg = PatternStoreConfig(embedding_dim=d, max_patterns=n + args.single, backend="exact")

    # ---- memory + batch insert (patterns built in chunks outside the timed region)
    trim()
    base = rss()
    store = PatternStore(cfg)
    chunk = 10_000
    t_batch = 0.0
    string_bytes = 0
    for s in range(0, n, chunk):
        pats = make_patterns(min(chunk, n - s), d, seed=s)
        string_bytes += sum(len(p.uuid) + sum(len(x) for x in p.lessons + p.example_actions) for p in pats)
        t0 = time.perf_counter()
        store.store_patterns(pats)
        t_batch += time.perf_counter() - t0
        del pats
        trim()
    mem = rss() - base
    raw = n * d * 4
    batch_rate = n / t_batch
    rows.append(row("store_patterns", "rbank_torch", n, [n / batch_rate]))

    # ---- single inserts (the staged rows are flushed by the search at the end: timed too)
    singles = make_patterns(args.single, d, seed=10**9)
    t0 = time.perf_counter()
    for p in singles:
        store.store_pattern(p)
    store.search_similar_batch(torch.zeros(1, d), 1)
    t_single = time.perf_counter() - t0
    single_rate = args.single / t_single
    for p in singles:
        store.remove_pattern(p.id)
    store.compact()
    del singles
    trim()

    # ---- exact search vs bare torch on the same tensors
    g = torch.Generator().manual_seed(1)
    Q = torch.nn.functional.normalize(torch.randn(args.queries, d, generator=g), dim=1)
    E = store._emb[: store._n]  # the very tensor the store searches

    def bare_batch():
        return torch.topk(Q @ E.T, args.k, dim=1)

    def ours_batch():
        return store.search_similar_batch(Q, args.k)

    def bare_single():
        for i in range(50):
            torch.topk(Q[i : i + 1] @ E.T, args.k, dim=1)

    def ours_single():
        for i in range(50):
            store.search_similar_batch(Q[i : i + 1], args.k)

    tb, to = [], []
    for _ in range(5):  # interleaved, so drift hits both alike
        tb += timeit(bare_batch, 1)
        to += timeit(ours_batch, 1)
    sb, so = [], []
    for _ in range(5):
        sb += timeit(bare_single, 1)
        so += timeit(ours_single, 1)
    ours_ids = ours_batch()[1]
    bare_ids = store._ids[bare_batch().indices]
    agree = float((ours_ids == bare_ids).float().mean())
    rows += [row("search_batch", "torch_topk", n, tb), row("search_batch", "rbank_torch", n, to),
             row("search_single", "torch_topk", n, sb), row("search_single", "rbank_torch", n, so)]

    mb, ob = statistics.median(tb), statistics.median(to)
    ms, os_ = statistics.median(sb) / 50, statistics.median(so) / 50
    print(f"PatternStore, N = {n} x {d}, {args.queries} queries, k = {args.k}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'measure':44s} {'value':>14s} {'target':>12s}")
    print(f"{'batch insert (store_patterns)':44s} {batch_rate:>12,.0f}/s {'>= 100,000/s':>12s}")
    print(f"{'single insert (store_pattern, incl. flush)':44s} {single_rate:>12,.0f}/s {'>= 5,000/s':>12s}")
    print(f"{'batch search: bare topk(q @ E.T)':44s} {args.queries / mb:>10,.0f} q/s")
    print(f"{'batch search: rbank_torch exact':44s} {args.queries / ob:>10,.0f} q/s")
    print(f"{'  time ratio ours / bare':44s} {ob / mb:>14.3f} {'<= 1.25':>12s}")
    print(f"{'single-query search: bare':44s} {1 / ms:>10,.0f} q/s")
    print(f"{'single-query search: rbank_torch':44s} {1 / os_:>10,.0f} q/s")
    print(f"{'  time ratio ours / bare':44s} {os_ / ms:>14.3f}")
    print(f"{'top-k ids equal to the bare baseline':44s} {agree:>14.4f}")
    print(f"{'resident memory per pattern':44s} {mem / n:>12,.0f} B")
    print(f"{'  ratio to (raw embedding + string bytes)':44s} {mem / (raw + string_bytes):>14.3f} {'<= 1.5':>12s}")
    out = Path("bench_results")
    out.mkdir(exist_ok=True)
    with open(out / "results.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
