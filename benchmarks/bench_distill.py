"""Distillation throughput and vectorised lesson deduplication against the sequential rule.

One run answers two questions (2-core CPU targets):

1. distilling N in-memory trajectories (default 200 000; 5 steps, 384-d embeddings, lessons from the
   synthetic task families with many repeats): trajectories/s end to end, one-shot and streamed in chunks
   (target ≥ 10 000/s);
2. deduplicating M distinct lessons (default 50 000, 384-d): :func:`greedy_dedup` against the plain
   sequential rule (every lesson against every kept lesson, exact similarity of record). The sequential
   rule is timed on subsets and its cost extrapolated quadratically (nearly every lesson is kept, so it
   does ~n²/2 pair tests); outputs are compared wherever both run (target ≥ 50× faster).

    python benchmarks/bench_distill.py                 # full size
    python benchmarks/bench_distill.py --n 20000 --lessons 5000 --repeats 1   # quick

Prints a table and appends rows (name, provider, x, median, p20, p80, device, version; times in
seconds) to ``bench_results/results.jsonl``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rbank_torch._util import next_id, utcnow  # noqa: E402
from rbank_torch.dedup import greedy_dedup  # noqa: E402
from rbank_torch.distillation import DistillationConfig, MemoryDistiller  # noqa: E402
from rbank_torch.synthetic import FAMILIES, generate_tasks  # noqa: E402
from rbank_torch.trajectory import StepOutcome, Trajectory, TrajectoryMetadata, TrajectoryStep  # noqa: E402


def quantiles(ts: list[float]) -> tuple[float, float, float]:
    s = sorted(ts)

    def q(p: float) -> float:
        return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]

    return statistics.median(s), q(0.2), q(0.8)


def row(name: str, provider: str, x: int, ts: list[float]) -> dict:
    med, p20, p80 = quantiles(ts)
    return {
        "name": name,
        "provider": provider,
        "x": x,
        "median": med,
        "p20": p20,
        "p80": p80,
        "device": "cpu",
        "version": torch.__version__,
    }


# ------------------------------------------------------------------------------------------------ data


def make_trajectories(n: int, dim: int = 384, steps: int = 5, seed: int = 0) -> list[Trajectory]:
    """n completed trajectories with ``steps`` steps each, unit query embeddings [dim] around 64 topics,
    and lessons with repeats: the families' fixed lessons plus a Zipf-distributed tail of tips."""
    specs = generate_tasks(n, seed)
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    topics = torch.randn(64, dim, generator=g)
    emb = topics[torch.randint(0, 64, (n,), generator=g)] + 0.5 * torch.randn(n, dim, generator=g)
    emb = torch.nn.functional.normalize(emb, dim=1)
    rows = [e.clone() for e in emb]
    zipf = np.random.default_rng(seed).zipf(1.3, size=n)
    base = utcnow() - timedelta(days=3)
    out = []
    for i, sp in enumerate(specs):
        fam = FAMILIES[sp.family]
        st = list(sp.steps)
        while len(st) < steps:
            a = rng.choice(fam["steps"])
            st.insert(0, (a, f"to {a}", StepOutcome.success(), 0.9))
        ts = base + timedelta(seconds=i)
        step_objs = [TrajectoryStep(j, a, why, o, c, 12, ts) for j, (a, why, o, c) in enumerate(st[:steps])]
        lessons = list(sp.lessons)
        if rng.random() < 0.3:
            lessons.append(
                f"Reuse the cached answer for {sp.family} request {int(zipf[i]) % 20000} when inputs match"
            )
        t = Trajectory(
            id=next_id(),
            uuid=f"traj-{i}",
            query_embedding=rows[i],
            steps=step_objs,
            started_at=ts,
            metadata=TrajectoryMetadata(
                session_id=sp.session_id,
                request_type=sp.request_type,
                tools_invoked=list(sp.tools),
                tags=list(sp.tags),
            ),
            lessons=lessons,
        )
        t.complete(sp.verdict)
        out.append(t)
    return out


def make_lessons(
    n: int, dim: int = 384, seed: int = 0, dup_frac: float = 0.1
) -> tuple[list[str], torch.Tensor]:
    """n distinct lesson texts (6-14 Zipf words over 5 000) with embeddings around 64 topics; a share are
    edited copies of earlier lessons (one word changed, embedding nudged), so some really are duplicates."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(5000)])
    centers = rng.standard_normal((64, dim)).astype(np.float32)
    texts: list[str] = []
    emb = np.empty((n, dim), np.float32)
    seen: set[str] = set()
    while len(texts) < n:
        i = len(texts)
        if i > 100 and rng.random() < dup_frac:
            j = int(rng.integers(0, i))
            ws = texts[j].split()
            ws[int(rng.integers(0, len(ws)))] = vocab[int(rng.zipf(1.2)) % 5000]
            t = " ".join(ws)
            e = emb[j] + 0.05 * rng.standard_normal(dim).astype(np.float32)
        else:
            t = " ".join(vocab[rng.zipf(1.2, size=int(rng.integers(6, 15))) % 5000])
            e = centers[int(rng.integers(0, 64))] + 0.8 * rng.standard_normal(dim).astype(np.float32)
        if t in seen:
            continue
        seen.add(t)
        texts.append(t)
        emb[i] = e
    return texts, torch.from_numpy(emb)


def sequential_dedup(texts: list[str], emb: torch.Tensor, threshold: float) -> list[int]:
    """The plain rule: each lesson against every kept lesson, exact similarity of record."""
    words = [frozenset(t.lower().split()) for t in texts]
    rows = emb.to(torch.float64).tolist()
    sq = [math.fsum([x * x for x in r]) for r in rows]
    kept: list[int] = []
    parent: list[int] = []
    for i in range(len(texts)):
        best_s = -math.inf
        dup = False
        for k in kept:
            union = len(words[i] | words[k])
            jac = len(words[i] & words[k]) / union if union else 0.0
            den = math.sqrt(sq[i]) * math.sqrt(sq[k])
            cos = (
                0.0
                if den == 0
                else min(1.0, max(-1.0, math.fsum([a * b for a, b in zip(rows[i], rows[k])]) / den))
            )
            if 0.6 * jac + 0.4 * cos > threshold:
                dup = True
                break
        if dup:
            best, best_s = kept[0], -1.0
            for k in kept:
                union = len(words[i] | words[k])
                jac = len(words[i] & words[k]) / union if union else 0.0
                if jac > best_s:
                    best, best_s = k, jac
            parent.append(best)
        else:
            kept.append(i)
            parent.append(i)
    return parent


# ------------------------------------------------------------------------------------------------ runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000, help="trajectories to distil")
    ap.add_argument("--lessons", type=int, default=50_000, help="distinct lessons to deduplicate")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=10_000, help="chunk size of the streamed run")
    ap.add_argument("--oracle-sizes", type=int, nargs="+", default=[300, 600])
    ap.add_argument("--out", default="bench_results")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows: list[dict] = []
    table: list[tuple[str, str]] = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    # 1. distillation throughput
    t0 = time.perf_counter()
    ts = make_trajectories(args.n, args.dim)
    print(f"built {args.n} trajectories in {time.perf_counter() - t0:.1f} s")
    cfg = DistillationConfig()
    times = []
    result = None
    for _ in range(args.repeats):
        gc.collect()
        t0 = time.perf_counter()
        result = MemoryDistiller(cfg).extract_key_lessons(ts)
        times.append(time.perf_counter() - t0)
    assert result is not None
    rows.append(row("distill_one_shot", "rbank_torch", args.n, times))
    med = statistics.median(times)
    table.append(
        (f"distil {args.n} trajectories, one shot", f"{med:.2f} s = {args.n / med:,.0f} trajectories/s")
    )
    stimes = []
    for _ in range(max(1, args.repeats // 2)):
        gc.collect()
        t0 = time.perf_counter()
        d = MemoryDistiller(cfg)
        for a in range(0, args.n, args.chunk):
            d.add(ts[a : a + args.chunk])
        streamed = d.finish()
        stimes.append(time.perf_counter() - t0)
    same = [k.content for k in streamed.key_lessons] == [k.content for k in result.key_lessons] and [
        k.source_trajectories for k in streamed.key_lessons
    ] == [k.source_trajectories for k in result.key_lessons]
    rows.append(row("distill_streamed", "rbank_torch", args.n, stimes))
    smed = statistics.median(stimes)
    table.append(
        (
            f"distil streamed, chunks of {args.chunk}",
            f"{smed:.2f} s = {args.n / smed:,.0f}/s, same result: {same}",
        )
    )
    probe = MemoryDistiller(cfg)
    probe.add(ts)
    n_distinct = probe.partial().n_lessons
    del probe
    table.append(
        (
            "  distinct lesson texts / key lessons / compressed trajectories",
            f"{n_distinct} / {len(result.key_lessons)} / {len(result.compressed_trajectories)}",
        )
    )
    table.append(("  estimated compression ratio", f"{result.compression_ratio:.3f}"))
    del ts, result, streamed, d
    gc.collect()

    # 2. dedup of distinct lessons
    texts, emb = make_lessons(args.lessons, args.dim)
    dtimes = []
    fast = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fast = greedy_dedup(texts, emb, 0.85)
        dtimes.append(time.perf_counter() - t0)
    assert fast is not None
    rows.append(row("dedup", "rbank_torch", args.lessons, dtimes))
    fmed = statistics.median(dtimes)
    n_dup = int((fast != torch.arange(args.lessons)).sum())
    table.append((f"greedy_dedup {args.lessons} distinct lessons", f"{fmed:.2f} s ({n_dup} merged)"))
    t0 = time.perf_counter()
    other = greedy_dedup(texts, emb, 0.85, method="gemm")
    tg = time.perf_counter() - t0
    rows.append(row("dedup_gemm_path", "rbank_torch", args.lessons, [tg]))
    table.append(("  same with the blocked-GEMM path", f"{tg:.2f} s, identical: {torch.equal(other, fast)}"))
    last_n, last_t = None, None
    for m in args.oracle_sizes:
        t0 = time.perf_counter()
        ref = sequential_dedup(texts[:m], emb[:m], 0.85)
        t_ref = time.perf_counter() - t0
        sub = greedy_dedup(texts[:m], emb[:m], 0.85).tolist()
        rows.append(row("dedup", "sequential_rule", m, [t_ref]))
        table.append(
            (f"  sequential rule on the first {m}", f"{t_ref:.2f} s, identical output: {sub == ref}")
        )
        last_n, last_t = m, t_ref
    assert last_n is not None and last_t is not None
    extrap = last_t * (args.lessons / last_n) ** 2
    rows.append(row("dedup_extrapolated", "sequential_rule", args.lessons, [extrap]))
    table.append(
        (
            f"  sequential rule at {args.lessons} (quadratic extrapolation from {last_n})",
            f"{extrap:,.0f} s → speed-up {extrap / fmed:,.0f}x",
        )
    )

    width = max(len(a) for a, _ in table)
    print()
    for a, b in table:
        print(f"{a:<{width}}  {b}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"\nappended {len(rows)} rows to {out / 'results.jsonl'}")


if __name__ == "__main__":
    main()
