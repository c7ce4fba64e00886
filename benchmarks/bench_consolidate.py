"""Consolidation kernels: pair finding against its GEMM roofline, the sequential oracle, k-means.

Questions answered (one run prints a table and appends rows to ``bench_results/results.jsonl``):

1. Pair finding at N = 20 000 and 50 000 × 768 (clustered rows, threshold 0.85): ``pairs_above`` next to a
   bare float32 GEMM over exactly the same upper-triangle tiles (the roofline), with peak extra memory.
   Target: ≤ 1.5× the bare GEMM at N = 50 000.
2. The sequential oracle at N = 3 000 (plain Python, pair by pair) against ``pairs_above`` + ``leader_scan``,
   asserting identical leaders. Target: ≥ 100× faster.
3. k-means 10 000 × 768 → 100 clusters. Target: ≤ 1 s (the Rust peer takes ~38 s).
4. Importance scoring of 1 000 000 patterns: the bare expression (``rbank_torch.importance.importance_scores``)
   and the path ``consolidate()`` takes (``PatternConsolidator.store_importance``: store columns + Fisher
   lookup). Target: < 0.5 s.
5. With ``--cuda`` and a CUDA device: pair finding at N = 1 000 000 as a fraction of the measured bf16 and
   tf32 matmul peak.

Usage::

    python benchmarks/bench_consolidate.py                 # everything on CPU
    python benchmarks/bench_consolidate.py --sizes 20000   # a quicker pair-finding section
    python benchmarks/bench_consolidate.py --cuda          # also the CUDA section
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import append_rows, make_row, peak_extra_memory, print_table, time_fn  # noqa: E402
from rbank_torch.kernels import pairs as P  # noqa: E402
from rbank_torch.kernels.kmeans import kmeans  # noqa: E402
from rbank_torch.kernels.pairs import leader_scan, pairs_above, upper_triangle_tiles  # noqa: E402

D = 768
THRESHOLD = 0.85


def clustered(n: int, d: int = D, seed: int = 0, cluster_size: int = 20, device: str = "cpu") -> torch.Tensor:
    """Raw rows around ``n / cluster_size`` random unit centres; per-cluster noise puts the in-cluster
    cosines between ~0.74 and ~0.96, so threshold 0.85 splits them (real pairs and near misses)."""
    g = torch.Generator(device=device).manual_seed(seed)
    k = max(1, n // cluster_size)
    centres = torch.randn(k, d, generator=g, device=device)
    centres /= centres.norm(dim=1, keepdim=True)
    lab = torch.randint(k, (n,), generator=g, device=device)
    spread = 0.2 + 0.4 * torch.rand(k, generator=g, device=device)
    x = centres[lab]
    x += spread[lab, None] * torch.randn(n, d, generator=g, device=device) / math.sqrt(d)
    x *= 0.5 + 2.0 * torch.rand(n, 1, generator=g, device=device)
    return x


def bare_gemm(u: torch.Tensor, dtype: torch.dtype) -> None:
    """The roofline: the torch path's upper-triangle tiles, GEMM only, into one reused buffer."""
    n = u.shape[0]
    br, bc = P._TORCH_BLOCK_ROWS, P._TORCH_BLOCK_COLS
    out = torch.empty(br * bc, dtype=dtype, device=u.device)
    for r0, r1, c0, c1 in upper_triangle_tiles(n, br, bc):
        torch.mm(u[r0:r1], u[c0:c1].T, out=out[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0))


# --------------------------------------------------------------------------------------------------
# 1. pair finding against the roofline
# --------------------------------------------------------------------------------------------------


def bench_pairs(sizes: list[int], rows: list[dict], notes: dict[int, str], summary: list[str]) -> None:
    for n in sizes:
        reps = 3 if n <= 20_000 else 2
        x = clustered(n, seed=n)
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            u = (x / x.norm(dim=1, keepdim=True)).to(dtype)
            roof = time_fn(lambda u=u, dtype=dtype: bare_gemm(u, dtype), reps=reps, warmup=1)
            del u
            found, mem = peak_extra_memory(lambda x=x, p=precision: pairs_above(x, THRESHOLD, precision=p))
            ours = time_fn(
                lambda x=x, p=precision: pairs_above(x, THRESHOLD, precision=p), reps=reps, warmup=0
            )
            if precision == "fp32":
                ref = found
            else:
                assert torch.equal(found, ref), "bf16 candidates must give the same pairs as fp32"
            ratio = ours.median / roof.median
            flops = n * n * D  # the upper triangle: N²/2 dot products of 2·D flops
            rows.append(
                make_row(
                    "pairs_gemm_roofline",
                    f"torch.mm {precision} tiles",
                    n,
                    roof,
                    gflops=flops / roof.median / 1e9,
                )
            )
            notes[len(rows) - 1] = f"{flops / roof.median / 1e9:.0f} GFLOP/s"
            rows.append(
                make_row(
                    "pairs_above",
                    f"torch {precision}",
                    n,
                    ours,
                    pairs=int(found.shape[0]),
                    peak_extra_bytes=mem,
                    ratio_to_roofline=ratio,
                )
            )
            mem_s = "n/a" if mem is None else f"{mem / 2**20:.0f} MiB"
            notes[len(rows) - 1] = f"{ratio:.2f}x roofline, {found.shape[0]} pairs, peak extra {mem_s}"
            if n == 50_000 and precision == "fp32":
                summary.append(
                    f"pairs_above fp32 at N=50000: {ratio:.2f}x the bare GEMM (target <= 1.5x): "
                    + ("PASS" if ratio <= 1.5 else "FAIL")
                )
        fp32_roof = next(r for r in rows if r["x"] == n and r["provider"] == "torch.mm fp32 tiles")["median"]
        bf16_ours = rows[-1]["median"]
        summary.append(
            f"pairs_above bf16 at N={n}: {bf16_ours / fp32_roof:.2f}x the fp32 bare GEMM, same pairs"
        )


# --------------------------------------------------------------------------------------------------
# 2. the sequential oracle
# --------------------------------------------------------------------------------------------------


def oracle_merge_scan(emb: torch.Tensor, threshold: float) -> list[int]:
    """Plain sequential Python: every pair i < j, one float64 cosine at a time, then the leader scan."""
    e = emb.to(torch.float64).numpy()
    n = e.shape[0]
    norms = [math.sqrt(float(np.dot(e[i], e[i]))) for i in range(n)]
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        ei, ni = e[i], norms[i]
        for j in range(i + 1, n):
            nj = norms[j]
            sim = 0.0 if (ni <= 1e-8 or nj <= 1e-8) else float(np.dot(ei, e[j])) / (ni * nj)
            if sim > threshold:
                neighbours[i].append(j)
    absorbed = [False] * n
    leader = list(range(n))
    for i in range(n):
        if absorbed[i]:
            continue
        for j in neighbours[i]:
            if not absorbed[j]:
                absorbed[j] = True
                leader[j] = i
    return leader


def oracle_merge_scan_skipping(emb: torch.Tensor, threshold: float) -> list[int]:
    """The reference's own loop: a leader compares itself only with later rows not yet absorbed."""
    e = emb.to(torch.float64).numpy()
    n = e.shape[0]
    norms = [math.sqrt(float(np.dot(e[i], e[i]))) for i in range(n)]
    absorbed = [False] * n
    leader = list(range(n))
    for i in range(n):
        if absorbed[i]:
            continue
        ei, ni = e[i], norms[i]
        for j in range(i + 1, n):
            if absorbed[j]:
                continue
            nj = norms[j]
            sim = 0.0 if (ni <= 1e-8 or nj <= 1e-8) else float(np.dot(ei, e[j])) / (ni * nj)
            if sim > threshold:
                absorbed[j] = True
                leader[j] = i
    return leader


def bench_oracle(rows: list[dict], notes: dict[int, str], summary: list[str], n: int = 3000) -> None:
    x = clustered(n, seed=7)

    def ours() -> torch.Tensor:
        return leader_scan(n, pairs_above(x, THRESHOLD))

    fast = time_fn(ours, reps=5, warmup=1)
    got = ours().tolist()
    t0 = time.perf_counter()
    want = oracle_merge_scan(x, THRESHOLD)
    t_all = time.perf_counter() - t0
    t0 = time.perf_counter()
    want_skip = oracle_merge_scan_skipping(x, THRESHOLD)
    t_skip = time.perf_counter() - t0
    assert got == want == want_skip, "pairs_above + leader_scan must reproduce the sequential oracle"
    merged = sum(1 for i, ld in enumerate(got) if ld != i)
    for name, t in (("oracle every pair", t_all), ("oracle skip absorbed", t_skip)):
        tm = time_fn(lambda: None, reps=1, warmup=0)
        tm.median = tm.p20 = tm.p80 = t
        tm.samples = [t]
        rows.append(make_row("merge_scan", f"python {name}", n, tm, merged=merged))
    rows.append(
        make_row(
            "merge_scan",
            "pairs_above+leader_scan",
            n,
            fast,
            merged=merged,
            speedup_every_pair=t_all / fast.median,
            speedup_skip_absorbed=t_skip / fast.median,
        )
    )
    notes[len(rows) - 1] = (
        f"identical leaders ({merged} absorbed); {t_all / fast.median:.0f}x / "
        f"{t_skip / fast.median:.0f}x faster"
    )
    summary.append(
        f"oracle at N={n}: {t_all / fast.median:.0f}x faster than the every-pair oracle, "
        f"{t_skip / fast.median:.0f}x than the skip-absorbed loop (target >= 100x): "
        + ("PASS" if t_all / fast.median >= 100 else "FAIL")
        + " / "
        + ("PASS" if t_skip / fast.median >= 100 else "FAIL")
    )


# --------------------------------------------------------------------------------------------------
# 3. k-means
# --------------------------------------------------------------------------------------------------


def bench_kmeans(rows: list[dict], notes: dict[int, str], summary: list[str]) -> None:
    n, k = 10_000, 100
    g = torch.Generator().manual_seed(3)
    data = {
        "clustered": clustered(n, seed=3, cluster_size=n // k),
        "gaussian": torch.randn(n, D, generator=g),
    }
    for kind, x in data.items():
        res: dict[str, Any] = {}

        def run(x: torch.Tensor = x, res: dict[str, Any] = res) -> None:
            res["r"] = kmeans(x, k, seed=0)

        tm = time_fn(run, reps=5, warmup=1)
        r = res["r"]
        rows.append(
            make_row(
                "kmeans", f"torch ({kind})", f"{n}x{D}->{k}", tm, iterations=r.iterations, inertia=r.inertia
            )
        )
        notes[len(rows) - 1] = f"{r.iterations} Lloyd iterations"
        summary.append(
            f"k-means {n}x{D}->{k} ({kind}): {tm.median:.2f} s (target <= 1 s): "
            + ("PASS" if tm.median <= 1.0 else "FAIL")
        )


# --------------------------------------------------------------------------------------------------
# 4. importance scoring on 1 000 000 patterns
# --------------------------------------------------------------------------------------------------
# ==== IMPORTANCE SCORING ON 1 000 000 PATTERNS ====================================================
# The batched importance of SPEC §4 over columns of a large store. Extend here (store-level columns,
# Fisher means, CUDA) when the consolidation module grows; keep the row name "importance_scores".


def bench_importance(
    rows: list[dict], notes: dict[int, str], n: int = 1_000_000, device: str = "cpu"
) -> None:
    from rbank_torch.importance import importance_scores

    g = torch.Generator(device=device).manual_seed(5)
    usage = torch.randint(0, 50, (n,), generator=g, device=device)
    success = (usage.to(torch.float32) * torch.rand(n, generator=g, device=device)).to(torch.int64)
    quality = torch.rand(n, generator=g, device=device)
    age = 86_400.0 * 30 * torch.rand(n, generator=g, device=device)
    fisher = torch.rand(n, generator=g, device=device)
    has_fisher = torch.rand(n, generator=g, device=device) < 0.5

    def run() -> torch.Tensor:
        return importance_scores(usage, success, quality, age, 7 * 86_400.0, fisher, has_fisher)

    tm = time_fn(run, reps=7, warmup=1, device=device)
    rows.append(make_row("importance_scores", f"torch {device}", n, tm, device=device))
    notes[len(rows) - 1] = f"{n / tm.median / 1e6:.0f} M patterns/s"


def bench_store_importance(rows: list[dict], notes: dict[int, str], n: int = 1_000_000, dim: int = 8) -> None:
    """The path consolidate() takes: the columns of a live store, Fisher means looked up for every id
    (a Fisher entry for every 4th pattern), scored in one expression."""
    from rbank_torch import Pattern, PatternConsolidator, PatternStore, PatternStoreConfig

    g = torch.Generator().manual_seed(6)
    store = PatternStore(PatternStoreConfig(embedding_dim=dim, max_patterns=n))
    cats = ["general", "code_generation", "research"]
    t0 = time.perf_counter()
    for s0 in range(0, n, 100_000):
        e = torch.randn(min(100_000, n - s0), dim, generator=g)
        ps = [Pattern.new(e[i], cats[i % 3], 0.7) for i in range(e.shape[0])]
        for i, p in enumerate(ps):
            p.usage_count, p.success_count, p.avg_quality = i % 50, (i % 50) // 2, (i % 97) / 96
        store.store_patterns(ps)
    build_s = time.perf_counter() - t0
    cons = PatternConsolidator()
    ids = store.ids()
    fid = ids[::4]
    cons.update_fisher_batch(fid, torch.rand(fid.numel(), dim, generator=g))
    tm = time_fn(lambda: cons.store_importance(store), reps=5, warmup=1, device="cpu")
    rows.append(make_row("store_importance", "PatternConsolidator.store_importance", n, tm, device="cpu",
                         fisher_entries=int(fid.numel())))
    notes[len(rows) - 1] = (f"{n / tm.median / 1e6:.1f} M patterns/s incl. Fisher lookup of {fid.numel()} entries "
                            f"(store built in {build_s:.0f} s, not timed); target < 0.5 s: "
                            f"{'met' if tm.median < 0.5 else 'MISSED'}")


# ==== END IMPORTANCE SCORING =======================================================================


# --------------------------------------------------------------------------------------------------
# 5. CUDA: N = 1 000 000 against the matmul peak
# --------------------------------------------------------------------------------------------------


def matmul_peak(dtype: torch.dtype, tf32: bool = False, size: int = 8192) -> float:
    """Measured dense matmul throughput (FLOP/s) of one big square product on the current GPU."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(size, size, device="cuda", dtype=dtype)
        b = torch.randn(size, size, device="cuda", dtype=dtype)
        tm = time_fn(lambda: torch.mm(a, b), reps=10, warmup=3, device="cuda")
        return 2 * size**3 / tm.median
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def bench_cuda(rows: list[dict], notes: dict[int, str], summary: list[str], n: int = 1_000_000) -> None:
    dev = "cuda"
    peaks = {"bf16": matmul_peak(torch.bfloat16), "tf32": matmul_peak(torch.float32, tf32=True)}
    x = clustered(n, seed=11, device=dev)
    flops = n * (n - 1) * D  # the useful upper triangle
    results = {}
    for precision in ("bf16", "tf32"):
        found, mem = peak_extra_memory(lambda p=precision: pairs_above(x, THRESHOLD, precision=p), device=dev)
        tm = time_fn(lambda p=precision: pairs_above(x, THRESHOLD, precision=p), reps=2, warmup=0, device=dev)
        results[precision] = found
        frac = flops / tm.median / peaks[precision]
        rows.append(
            make_row(
                "pairs_above",
                f"triton {precision}",
                n,
                tm,
                device=dev,
                pairs=int(found.shape[0]),
                peak_extra_bytes=mem,
                matmul_peak_flops=peaks[precision],
                fraction_of_peak=frac,
            )
        )
        mem_s = "n/a" if mem is None else f"{mem / 2**30:.2f} GiB"
        notes[len(rows) - 1] = (
            f"{flops / tm.median / 1e12:.0f} TFLOP/s = {100 * frac:.0f}% of the "
            f"{peaks[precision] / 1e12:.0f} TFLOP/s {precision} peak; {found.shape[0]} "
            f"pairs; peak extra {mem_s}"
        )
        summary.append(f"CUDA N={n} {precision}: {100 * frac:.0f}% of the measured {precision} matmul peak")
    assert torch.equal(results["bf16"], results["tf32"]), "bf16 and tf32 candidates must give the same pairs"
    ld = time_fn(lambda: leader_scan(n, results["bf16"]), reps=3, warmup=1, device=dev)
    rows.append(make_row("leader_scan", "torch cuda", n, ld, device=dev, pairs=int(results["bf16"].shape[0])))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[20_000, 50_000], help="N for pair finding")
    ap.add_argument("--cuda", action="store_true", help="also run the N = 1 000 000 CUDA section")
    ap.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["pairs", "oracle", "kmeans", "importance"],
        help="sections to leave out",
    )
    ap.add_argument("--out", default=None, help="results file (default bench_results/results.jsonl)")
    args = ap.parse_args(argv)

    rows: list[dict] = []
    notes: dict[int, str] = {}
    summary: list[str] = []
    if "pairs" not in args.skip:
        bench_pairs(args.sizes, rows, notes, summary)
    if "oracle" not in args.skip:
        bench_oracle(rows, notes, summary)
    if "kmeans" not in args.skip:
        bench_kmeans(rows, notes, summary)
    if "importance" not in args.skip:
        bench_importance(rows, notes)
        bench_store_importance(rows, notes)
    if args.cuda:
        if torch.cuda.is_available() and P.HAS_TRITON:
            bench_cuda(rows, notes, summary)
            bench_importance(rows, notes, device="cuda")
        else:
            summary.append("--cuda: no CUDA device or no triton here; CUDA section skipped")

    print_table(rows, notes)
    print()
    for line in summary:
        print(line)
    path = append_rows(rows, *(() if args.out is None else (args.out,)))
    print(f"\n{len(rows)} rows appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
