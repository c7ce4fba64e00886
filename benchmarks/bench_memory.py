"""Agent-memory retrieval costs, as ratios measured side by side in one run (SPEC §7).

100 000 × 384 patterns (clustered unit vectors) with five metadata fields (user_id: 1 000 values, agent: 5,
team: 2, severity: 1–5, score: a float) and creation times spread over 100 days. Single queries, the
way an agent asks; variants run round-robin, medians reported.

* filtered exact search (one equality, agent = …, 20 %, and a time range, the newer half: 10 %
  selectivity) against unfiltered exact search;
* MMR (λ = 0.5, 50 candidates → 10) against plain search of 10;
* ``search("text")`` against the embedder's own time for that text (packaged MiniLM; HNSW backend, built);
* HNSW filtered results against exact filtered results: recall@10 at 10 % and 50 % selectivity.

    flock /tmp/rbank-bench.lock python benchmarks/bench_memory.py            # ~2 minutes on 2 cores
    python benchmarks/bench_memory.py --rows 20000 --reps 10                # quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import timedelta

import torch

from rbank_torch import Pattern, PatternMetadata, PatternStoreConfig, ReasoningBank, ReasoningBankConfig
from rbank_torch._util import utcnow


def make_bank(backend: str, x: torch.Tensor, embedder=None) -> tuple[ReasoningBank, list[int]]:
    n = x.shape[0]
    cfg = ReasoningBankConfig(embedding_dim=x.shape[1], max_trajectories=10, pattern_config=PatternStoreConfig(
        backend=backend, max_patterns=max(100_000, n), backend_options={"background": False}))
    bank = ReasoningBank(cfg, embedder=embedder)
    now = utcnow()
    g = torch.Generator().manual_seed(1)
    sev = torch.randint(1, 6, (n,), generator=g).tolist()
    score = torch.rand(n, generator=g).tolist()
    pats = []
    for j in range(n):
        p = Pattern.new(x[j], "general", 0.9)
        p.created_at = p.last_accessed = now - timedelta(seconds=100 * 86400 * j / n)
        p.metadata = PatternMetadata(attributes={
            "user_id": f"user-{j % 1000}", "agent": f"agent-{j % 5}", "team": "red" if j % 2 else "blue",
            "severity": sev[j], "score": score[j]})
        pats.append(p)
    ids = bank.store.store_patterns(pats)
    bank.store.search_backend.wait() if hasattr(bank.store.search_backend, "wait") else None
    return bank, ids


def median_ms(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1000)
    return statistics.median(ts)


def round_robin(variants: dict[str, object], reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()  # type: ignore[operator]
            times[name].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--noise", type=float, default=0.7,
                    help="spread of the rows around their cluster centres (larger: harder for HNSW)")
    ap.add_argument("--ef-search", type=int, nargs="+", default=[100, 400], help="HNSW efSearch values to try")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(200, args.dim, generator=g)
    x = centres[torch.randint(0, 200, (args.rows,), generator=g)] + args.noise * torch.randn(args.rows, args.dim, generator=g)
    x = torch.nn.functional.normalize(x, dim=1)
    queries = torch.nn.functional.normalize(x[torch.randint(0, args.rows, (64,), generator=g)]
                                            + 0.3 * torch.randn(64, args.dim, generator=g), dim=1)
    print(f"{args.rows} × {args.dim} patterns, 5 metadata fields; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    t0 = time.perf_counter()
    exact, exact_ids = make_bank("exact", x)
    exact_pos = {pid: j for j, pid in enumerate(exact_ids)}
    print(f"built the exact bank in {time.perf_counter() - t0:.1f} s")
    since = utcnow() - timedelta(days=50)
    qi = iter(range(10**9))

    def q() -> torch.Tensor:
        return queries[next(qi) % queries.shape[0]]

    # 1. filtered vs unfiltered exact search
    flt = {"where": {"agent": "agent-2"}, "since": since}
    matching = int(exact.store.filter_mask(**flt).sum())
    r = round_robin({
        "unfiltered": lambda: exact.search(q(), k=10),
        "filtered": lambda: exact.search(q(), k=10, **flt),
        "plain k=10": lambda: exact.search(q(), k=10),
        "mmr": lambda: exact.search(q(), k=10, mmr=0.5),
    }, args.reps)
    print(f"\nexact backend, single queries, median ms over {args.reps} (round-robin):")
    print(f"  unfiltered search            {r['unfiltered']:8.3f}")
    print(f"  filtered ({matching / args.rows:.0%} selectivity)    {r['filtered']:8.3f}   "
          f"ratio {r['filtered'] / r['unfiltered']:.2f}  (target ≤ 1.3)")
    print(f"  MMR λ=0.5, 50 → 10           {r['mmr']:8.3f}   ratio {r['mmr'] / r['plain k=10']:.2f}  (target ≤ 1.5)")

    # 2. HNSW filtered recall against exact filtered search
    t0 = time.perf_counter()
    hnsw, hnsw_ids = make_bank("faiss-hnsw", x)
    hnsw_pos = {pid: j for j, pid in enumerate(hnsw_ids)}  # rows compared by position: ids differ per bank
    print(f"\nbuilt the HNSW bank in {time.perf_counter() - t0:.1f} s "
          f"(active index: {hnsw.store.search_backend.active_kind})")
    for ef in args.ef_search:
        hnsw.store.config.ef_search = ef
        print(f"  efSearch {ef}:")
        for label, f in (("no filter", {}), ("10 %", flt), ("50 %", {"where": {"team": "red"}})):
            hits = total = 0
            for i in range(queries.shape[0]):
                a = [hnsw_pos[h.pattern.id] for h in hnsw.search(queries[i], k=10, **f)]
                b = [exact_pos[h.pattern.id] for h in exact.search(queries[i], k=10, **f)]
                hits += len(set(a) & set(b))
                total += len(b)
            what = "unfiltered recall@10 (the index's own)" if not f else f"filtered recall@10 at {label} selectivity"
            print(f"    HNSW {what}: {hits / total:.3f}")

    # 3. search("text") against the embedder alone
    try:
        from rbank_torch.text import TextEmbedder
    except ImportError:
        print("\n[text] not installed: search('text') not measured")
        return
    hnsw.store.config.ef_search = args.ef_search[0]  # the first efSearch (default 100: the config's default)
    wide = {"where": {"team": "red"}}
    r = round_robin({
        "hnsw": lambda: hnsw.search(q(), k=10),
        "hnsw 50 %": lambda: hnsw.search(q(), k=10, **wide),
        "exact 50 %": lambda: exact.search(q(), k=10, **wide),
    }, args.reps)
    print(f"  single queries at efSearch {args.ef_search[0]}, median ms: HNSW {r['hnsw']:.3f}, HNSW filtered 50 % "
          f"{r['hnsw 50 %']:.3f}, exact filtered 50 % {r['exact 50 %']:.3f}")
    emb = TextEmbedder(device="cpu")
    hnsw._embedder = lambda texts: emb.encode(list(texts))  # the same bank, now speaking text
    texts = [f"the deploy of service {i} failed after a config change" for i in range(8)]
    ti = iter(range(10**9))

    def text() -> str:
        return texts[next(ti) % len(texts)]

    r = round_robin({
        "embedder": lambda: emb.encode([text()]),
        "search(text)": lambda: hnsw.search(text(), k=10),
    }, args.reps)
    print(f"\nsearch('text') on the HNSW bank: {r['search(text)']:.3f} ms, the embedder alone {r['embedder']:.3f} ms: "
          f"ratio {r['search(text)'] / r['embedder']:.2f}  (target ≤ 1.2)")


if __name__ == "__main__":
    main()
