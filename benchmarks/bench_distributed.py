"""Sharded consolidation and distillation on torch.distributed: 1 process against 2 processes.

Every process is limited to one thread (``torch.set_num_threads(1)``), so on a 2-core machine the ratio
is the scaling efficiency that carries over to more cores and machines. Processes are started by
:func:`rbank_torch.distributed.spawn_local` (gloo over 127.0.0.1); the timed region of each run starts
after a barrier and ends when every rank has the result (the slowest rank counts).

1. **Consolidation**: pair finding + leader scan (:func:`~rbank_torch.distributed.leaders_distributed`)
   over N clustered rows × 768 (threshold 0.85, no categories: the whole upper triangle). The 1-process
   run also times the plain single-process kernels (``pairs_above`` + ``leader_scan``); all leaders must
   be identical. Target: speed-up ≥ 1.7× at N = 50 000.
2. **Distillation**: :func:`~rbank_torch.distributed.distill_files` over a JSONL log written once
   (synthetic agent runs, 128-d embeddings), 1 process against 2 (reading, distilling, merging; with
   ``--write`` also rank 0 writing the output folder); the lessons (every field, embeddings included) and
   every count must be identical.

Each rank is bound to its own physical core (``--no-pin`` to leave it to the OS; on a machine with SMT two
ranks could otherwise share one core). All runs use one GEMM precision (``--precision``; the pairs do not
depend on it).

Usage::

    flock /tmp/rbank-bench.lock python benchmarks/bench_distributed.py                 # N = 50 000
    flock /tmp/rbank-bench.lock python benchmarks/bench_distributed.py --small         # N = 10 000, quick
    python benchmarks/bench_distributed.py --n 20000 --distill-n 20000 --reps 3
    python benchmarks/bench_distributed.py --device cuda   # NCCL, one GPU per process (2 GPUs for 2 ranks)

Prints the machine load (1-minute load average) before and after, a table and the speed-ups, and appends
rows to ``bench_results/results.jsonl``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import Timing, append_rows, make_row, print_table  # noqa: E402
from rbank_torch.kernels.pairs import leader_scan, pairs_above, resolve_precision  # noqa: E402

from rbank_torch import distributed as D  # noqa: E402
from rbank_torch.distillation import DistillationConfig  # noqa: E402

DIM = 768
THRESHOLD = 0.85


def clustered(n: int, d: int = DIM, seed: int = 0, cluster_size: int = 20) -> torch.Tensor:
    """``[n, d]`` float32 rows around ``n / cluster_size`` random unit centres (in-cluster cosines ~0.74–0.96,
    so threshold 0.85 keeps real pairs and near misses); the same on every process."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, n // cluster_size)
    centres = torch.randn(k, d, generator=g)
    centres /= centres.norm(dim=1, keepdim=True)
    lab = torch.randint(k, (n,), generator=g)
    spread = 0.2 + 0.4 * torch.rand(k, generator=g)
    x = centres[lab]
    x += spread[lab, None] * torch.randn(n, d, generator=g) / math.sqrt(d)
    x *= 0.5 + 2.0 * torch.rand(n, 1, generator=g)
    return x


def physical_cpus() -> list[int]:
    """One logical CPU per physical core this process may use (SMT siblings left out), lowest first."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    seen: set[tuple[str, str]] = set()
    out = []
    for c in allowed:
        base = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            key = ((base / "physical_package_id").read_text().strip(), (base / "core_id").read_text().strip())
        except OSError:
            key = ("?", str(c))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _pin(rank: int, pin: bool) -> None:
    """Bind this process to its own physical core (rank r -> the r-th core), when asked and possible."""
    cpus = physical_cpus() if pin else []
    if cpus:
        os.sched_setaffinity(0, {cpus[rank % len(cpus)]})


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


# -- workers (run in spawned processes; module level so that they can be found by name) -----------------


def consolidation_worker(
    rank: int, world: int, n: int, reps: int, device: str, plain: bool, precision: str, pin: bool
) -> dict[str, Any]:
    """Time ``leaders_distributed`` ``reps`` times (seconds on this rank, barrier to result)."""
    torch.set_num_threads(1)
    _pin(rank, pin)
    dev = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else "cpu"
    emb = clustered(n).to(dev)
    times: list[float] = []
    lead = None
    for _ in range(reps):
        _barrier(world)
        _sync(dev)
        t0 = time.perf_counter()
        lead = D.leaders_distributed(emb, THRESHOLD, precision=precision)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    assert lead is not None
    out: dict[str, Any] = {
        "times": times,
        "leaders": _sha(lead.numpy().tobytes()),
        "absorbed": int((lead != torch.arange(n)).sum()),
    }
    if plain and world == 1:
        pt, st = [], []
        for _ in range(reps):
            _sync(dev)
            t0 = time.perf_counter()
            pairs = pairs_above(emb, THRESHOLD, precision=precision)
            _sync(dev)
            t1 = time.perf_counter()
            ref = leader_scan(n, pairs.cpu())
            t2 = time.perf_counter()
            pt.append(t1 - t0)
            st.append(t2 - t1)
        out.update(plain_pairs=pt, plain_scan=st, plain_leaders=_sha(ref.numpy().tobytes()), pairs=int(pairs.shape[0]))
    return out


def _lessons_digest(res: Any) -> str:
    """Digest of every lesson field that must not depend on the number of processes (embeddings included)."""
    h = hashlib.sha256()
    for k in res.key_lessons:
        h.update(repr((k.content, str(k.category), k.importance, k.observation_count, k.success_rate, k.avg_quality,
                       k.example_actions, k.tags, k.source_trajectories, k.first_observed.isoformat(),
                       k.last_observed.isoformat())).encode())
        h.update(k.embedding.float().numpy().tobytes())
    return h.hexdigest()[:16]


def distill_worker(
    rank: int, world: int, paths: list[str], out_root: str, reps: int, cfg: dict, write: bool, pin: bool
) -> dict[str, Any]:
    """Time ``distill_files`` over ``paths`` ``reps`` times (rank 0 writes the output folder when ``write``);
    rank 0 returns digests of the result."""
    torch.set_num_threads(1)
    _pin(rank, pin)
    config = DistillationConfig(**cfg)
    times: list[float] = []
    out_dir = Path(out_root) / f"world-{world}" if write else None
    res = None
    for _ in range(reps):
        _barrier(world)
        t0 = time.perf_counter()
        res = D.distill_files(paths, out_dir, config)
        _barrier(world)
        times.append(time.perf_counter() - t0)
    out: dict[str, Any] = {"times": times}
    if rank == 0:
        assert res is not None
        out.update(
            lessons=_lessons_digest(res),
            key_lessons=len(res.key_lessons),
            compressed=len(res.compressed_trajectories),
            compressed_ids=_sha(str([c.original_id for c in res.compressed_trajectories]).encode()),
            trajectories=res.trajectories_processed,
            memory_saved=res.memory_saved,
            category_summary=res.category_summary,
        )
    return out


# -- driver -------------------------------------------------------------------------------------------------


def _timing(per_rank: list[list[float]]) -> Timing:
    """Per repetition the slowest rank; median and 20/80 % quantiles over repetitions."""
    ts = [max(r[i] for r in per_rank) for i in range(len(per_rank[0]))]
    s = sorted(ts)

    def q(p: float) -> float:
        return s[min(len(s) - 1, int(round(p * (len(s) - 1))))]

    return Timing(statistics.median(ts), q(0.2), q(0.8), ts)


def _load() -> str:
    try:
        a, b, c = os.getloadavg()
        return f"load average {a:.2f}, {b:.2f}, {c:.2f} on {os.cpu_count()} CPUs"
    except OSError:
        return "load average unavailable"


def write_log(path: Path, n: int, dim: int, seed: int = 0) -> int:
    """A JSONL log of ``n`` synthetic agent runs (ids, query texts, ``dim``-d embeddings); returns its bytes."""
    from bench_distill import make_trajectories

    from rbank_torch.logs import trajectory_to_record, write_jsonl

    log = make_trajectories(n, dim=dim, seed=seed)
    write_jsonl((trajectory_to_record(t, query=f"task {i}", decimals=6) for i, t in enumerate(log)), path)
    return path.stat().st_size


def run_consolidation(args: argparse.Namespace, rows: list[dict], notes: dict[int, str]) -> float | None:
    backend = "nccl" if args.device == "cuda" else "gloo"
    worlds = [1, 2]
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        print(f"only {torch.cuda.device_count()} CUDA device(s): NCCL needs one GPU per rank; timing 1 rank only")
        worlds = [1]
    res: dict[int, list[dict]] = {}
    for world in worlds:
        outs = D.spawn_local(
            consolidation_worker, world,
            (args.n, args.reps, args.device, not args.no_plain, args.precision, not args.no_pin),
            backend=backend, timeout_s=args.timeout, collective_timeout_s=args.timeout, num_threads=1,
        )
        res[world] = [o.result for o in outs]
    one = res[1][0]
    t1 = _timing([one["times"]])
    rows.append(make_row("dist_consolidate", "1 process", args.n, t1, args.device, absorbed=one["absorbed"]))
    if "plain_pairs" in one:
        tp = _timing([[a + b for a, b in zip(one["plain_pairs"], one["plain_scan"])]])
        same = one["plain_leaders"] == one["leaders"]
        rows.append(make_row("dist_consolidate", "plain kernels, 1 process", args.n, tp, args.device, identical=same))
        notes[len(rows) - 1] = f"pairs_above + leader_scan; {one['pairs']} pairs; leaders identical: {same}"
        if not same:
            raise SystemExit("leaders of the plain kernels differ from leaders_distributed")
    if 2 not in res:
        return None
    t2 = _timing([r["times"] for r in res[2]])
    same = all(r["leaders"] == one["leaders"] and r["absorbed"] == one["absorbed"] for r in res[2])
    speed = t1.median / t2.median
    rows.append(make_row("dist_consolidate", "2 processes", args.n, t2, args.device, speedup=speed, identical=same))
    notes[len(rows) - 1] = f"speed-up {speed:.2f}x (target >= 1.7x at N = 50 000); leaders identical: {same}"
    if not same:
        raise SystemExit("leaders of 2 processes differ from 1 process")
    return speed


def run_distillation(args: argparse.Namespace, rows: list[dict], notes: dict[int, str]) -> float:
    with tempfile.TemporaryDirectory(prefix="rbank-bench-dist-") as tmp:
        log = Path(tmp) / "log.jsonl"
        t0 = time.perf_counter()
        size = write_log(log, args.distill_n, args.distill_dim)
        print(f"distillation log: {args.distill_n} runs, {size / 1e6:.1f} MB, written in {time.perf_counter() - t0:.1f} s")
        cfg = {"min_trajectories_for_distillation": 10, "max_lessons": 100}
        res: dict[int, list[dict]] = {}
        for world in (1, 2):
            outs = D.spawn_local(
                distill_worker, world, ([str(log)], tmp, args.reps, cfg, args.write, not args.no_pin),
                timeout_s=args.timeout, collective_timeout_s=args.timeout, num_threads=1,
            )
            res[world] = [o.result for o in outs]
    one, two = res[1][0], res[2][0]
    t1 = _timing([one["times"]])
    t2 = _timing([r["times"] for r in res[2]])
    keys = ("lessons", "key_lessons", "compressed", "compressed_ids", "trajectories", "memory_saved", "category_summary")
    same = all(one[k] == two[k] for k in keys)
    speed = t1.median / t2.median
    rows.append(make_row("dist_distill", "1 process", args.distill_n, t1, "cpu", key_lessons=one["key_lessons"]))
    notes[len(rows) - 1] = f"{args.distill_n / t1.median:,.0f} trajectories/s"
    rows.append(make_row("dist_distill", "2 processes", args.distill_n, t2, "cpu", speedup=speed, identical=same))
    notes[len(rows) - 1] = f"speed-up {speed:.2f}x; lessons and counts identical: {same}"
    if not same:
        raise SystemExit(f"distillation with 2 processes differs: {[k for k in keys if one[k] != two[k]]}")
    return speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000, help="rows for consolidation (default 50 000)")
    ap.add_argument("--small", action="store_true", help="N = 10 000 and 10 000 runs to distil (a quick check)")
    ap.add_argument("--distill-n", type=int, default=40_000, help="agent runs in the distillation log")
    ap.add_argument("--distill-dim", type=int, default=128, help="embedding dimension of the log")
    ap.add_argument("--reps", type=int, default=1, help="timed repetitions per run (default 1)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="consolidation device (cuda: NCCL)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "tf32", "bf16"],
                    help="GEMM precision of the candidate pass, the same for every run (auto: bf16 where the "
                    "CPU or GPU multiplies bfloat16 natively, else fp32; the pairs do not depend on it)")
    ap.add_argument("--no-pin", action="store_true", help="do not bind each rank to its own physical core")
    ap.add_argument("--write", action="store_true", help="time distillation with rank 0 writing the output folder")
    ap.add_argument("--skip-distill", action="store_true", help="only consolidation")
    ap.add_argument("--skip-consolidate", action="store_true", help="only distillation")
    ap.add_argument("--no-plain", action="store_true", help="do not also time the plain single-process kernels")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per run (default 1800)")
    ap.add_argument("--no-save", action="store_true", help="do not append to bench_results/results.jsonl")
    args = ap.parse_args()
    if args.small:
        args.n, args.distill_n = 10_000, 10_000
    for name in ("n", "distill_n", "distill_dim", "reps"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    args.precision = resolve_precision(args.precision, args.device)
    print(f"torch {torch.__version__}; 1 thread per process; GEMM precision {args.precision}; "
          f"{'ranks pinned to physical cores ' + str(physical_cpus()[:2]) if not args.no_pin else 'not pinned'}; "
          f"{_load()} (before)")
    rows: list[dict] = []
    notes: dict[int, str] = {}
    speeds = {}
    if not args.skip_consolidate:
        speeds["consolidation"] = run_consolidation(args, rows, notes)
    if not args.skip_distill:
        speeds["distillation"] = run_distillation(args, rows, notes)
    print()
    print_table(rows, notes)
    print()
    for k, v in speeds.items():
        if v is not None:
            print(f"{k}: 2 processes / 1 process speed-up {v:.2f}x")
    print(f"{_load()} (after)")
    if not args.no_save:
        print(f"rows appended to {append_rows(rows)}")


if __name__ == "__main__":
    main()
