"""``rbank distill`` on a large JSONL log, and ``rbank search`` on a large bank, run as real commands.

Two questions (targets on the 2-core CPU):

1. ``rbank distill`` over a generated log of N trajectories (default 1 000 000) whose lines carry their
   384-d query embeddings: trajectories/s (target >= 5 000/s) and the peak RSS of the whole process
   (target <= 2 GiB). The log is written under ``--work`` (default ``/tmp/rbank-bench-cli``), never in
   the repository: a pool of distinct generated records (synthetic agent runs, each with its own random
   unit embedding) is serialised once and the lines are repeated with fresh ids.
2. ``rbank search BANK "text" -k 5`` on a bank of P patterns (default 100 000, 384-d, random unit
   embeddings, text model the packaged MiniLM): wall time of the whole command, interpreter start-up,
   bank load and model load included (target < 5 s).

Both run in a subprocess (``python -m rbank_torch …``), timed from outside; the peak RSS is the child's
``ru_maxrss``. The distillation row also reports the command's own figure (``summary.json``).

    flock /tmp/rbank-bench.lock python benchmarks/bench_cli_distill.py              # full size
    flock /tmp/rbank-bench.lock python benchmarks/bench_cli_distill.py --n 100000 --patterns 20000  # quick

Prints a table and appends rows (name, provider, x, median, p20, p80, device, version, extra; seconds) to
``bench_results/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import Timing, _quantile, append_rows, make_row  # noqa: E402
from rbank_torch.logs import task_to_record  # noqa: E402
from rbank_torch.synthetic import generate_tasks  # noqa: E402

GIB = 1 << 30
START = datetime(2025, 1, 6, tzinfo=timezone.utc)


def make_log(path: Path, n: int, dim: int, pool: int, seed: int = 0) -> float:
    """Write an ``n``-line JSONL log with ``dim``-d embeddings to ``path``; returns its size in bytes.

    ``pool`` distinct records are serialised once (each with its own unit embedding, rounded to 6
    decimals); line i repeats record ``i % pool`` under id ``i + 1``.
    """
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(pool, dim, generator=g)
    emb = emb / emb.norm(dim=1, keepdim=True)
    tails = []
    for j, spec in enumerate(generate_tasks(pool, seed=seed)):
        rec = task_to_record(spec, 0, START + timedelta(seconds=j),
                             embedding=[round(x, 6) for x in emb[j].tolist()])
        rec.pop("id")
        tails.append(json.dumps(rec, separators=(",", ":"))[1:])  # without the opening brace
    with open(path, "w", encoding="utf-8", buffering=1 << 22) as f:
        block: list[str] = []
        for i in range(n):
            block.append(f'{{"id":{i + 1},{tails[i % pool]}\n')
            if len(block) == 8192:
                f.write("".join(block))
                block = []
        f.write("".join(block))
    return float(path.stat().st_size)


def make_bank(path: Path, n: int, dim: int, seed: int = 0) -> None:
    """A bank of ``n`` patterns with random unit embeddings, recorded as built with the packaged MiniLM."""
    from rbank_torch.bank import ReasoningBank, ReasoningBankConfig
    from rbank_torch.cli import DEFAULT_MODEL, _write_sidecar
    from rbank_torch.patterns import Pattern
    from rbank_torch.store import PatternStoreConfig

    cats = ["code_generation", "research", "tool_use", "conversational", "reflection", "general"]
    g = torch.Generator().manual_seed(seed)
    bank = ReasoningBank(ReasoningBankConfig(embedding_dim=dim, storage_path=str(path.parent),
                                             pattern_config=PatternStoreConfig(max_patterns=n)))
    step = 20_000
    for s in range(0, n, step):
        e = torch.randn(min(step, n - s), dim, generator=g)
        e = e / e.norm(dim=1, keepdim=True)
        ps = []
        for i in range(e.shape[0]):
            p = Pattern.new(e[i], cats[(s + i) % len(cats)], 0.5 + 0.5 * ((s + i) % 7) / 7)
            p.avg_quality = ((s + i) % 11) / 10
            p.lessons = [f"lesson {(s + i) % 97}"]
            p.example_actions = ["read the code", "run the tests"]
            ps.append(p)
        bank.store.store_patterns(ps)
    bank.save(str(path))
    _write_sidecar(path, {"embedding_model": DEFAULT_MODEL, "embedding_dim": dim})


def timing(samples: list[float]) -> Timing:
    """Median and 20th/80th percentiles of wall-clock samples."""
    return Timing(_quantile(samples, 0.5), _quantile(samples, 0.2), _quantile(samples, 0.8), list(samples))


def run_child(argv: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run ``python -m rbank_torch ARGV``; returns (wall seconds, peak RSS bytes of the child, result)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rbank_torch", *argv], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        raise SystemExit(f"rbank {' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    # ru_maxrss of the children is the largest of them so far: only a new maximum is this child's own
    if peak <= before:
        print("note: peak RSS not above an earlier child's; reporting the running maximum", file=sys.stderr)
    return wall, peak * 1024.0, proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="trajectories in the log (default: 1000000)")
    ap.add_argument("--dim", type=int, default=384, help="embedding dimension (default: 384)")
    ap.add_argument("--pool", type=int, default=20_000, help="distinct records in the log (default: 20000)")
    ap.add_argument("--patterns", type=int, default=100_000, help="patterns in the search bank (default: 100000)")
    ap.add_argument("--search-repeats", type=int, default=3, help="timed search commands (default: 3)")
    ap.add_argument("--chunk-size", type=int, default=4096, help="rbank distill --chunk-size (default: 4096)")
    ap.add_argument("--work", default="/tmp/rbank-bench-cli", help="folder for the generated files")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--skip-distill", action="store_true")
    ap.add_argument("--skip-search", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    report = []
    try:
        if not args.skip_distill:
            log = work / f"log_{args.n}_{args.dim}.jsonl"
            if not log.is_file():
                t0 = time.perf_counter()
                size = make_log(log, args.n, args.dim, args.pool)
                print(f"generated {log} ({size / GIB:.2f} GiB) in {time.perf_counter() - t0:.0f}s", flush=True)
            size = float(log.stat().st_size)
            out = work / "distilled"
            shutil.rmtree(out, ignore_errors=True)
            wall, rss, _ = run_child(["distill", str(log), "--out", str(out), "-q", "--json",
                                      "--chunk-size", str(args.chunk_size)])
            summary = json.loads((out / "summary.json").read_text())
            n = summary["trajectories_processed"]
            tps = n / wall
            report.append(("rbank distill", f"{n} trajectories, {size / GIB:.2f} GiB JSONL, {args.dim}-d",
                           f"{wall:.1f} s wall ({tps:,.0f} traj/s incl. start-up; command's own figure "
                           f"{summary['trajectories_per_s']:,.0f}/s)",
                           f"peak RSS {rss / GIB:.2f} GiB", f"target >= 5000/s: {'met' if tps >= 5000 else 'MISSED'}; "
                           f"RSS <= 2 GiB: {'met' if rss <= 2 * GIB else 'MISSED'}"))
            rows.append(make_row(
                "cli_distill", "rbank distill", n, timing([wall]), traj_per_s=tps,
                cmd_traj_per_s=summary["trajectories_per_s"], peak_rss_bytes=rss, file_bytes=size, dim=args.dim,
                key_lessons=summary["key_lessons"], compressed=summary["compressed_trajectories"],
                chunk_size=args.chunk_size))
        if not args.skip_search:
            bank = work / f"bank_{args.patterns}_{args.dim}.safetensors"
            if not bank.is_file():
                t0 = time.perf_counter()
                make_bank(bank, args.patterns, args.dim)
                print(f"built {bank} ({bank.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f}s",
                      flush=True)
            walls = []
            for _ in range(max(1, args.search_repeats)):
                wall, rss, proc = run_child(["search", str(bank), "my unit tests fail after a refactor", "-k", "5",
                                             "--json", "-q"])
                walls.append(wall)
                doc = json.loads(proc.stdout)
                assert len(doc["results"]) == 5 and doc["patterns"] == args.patterns
            ws = sorted(walls)
            med = ws[len(ws) // 2]
            report.append(("rbank search", f"{args.patterns} patterns, {args.dim}-d, text query",
                           f"{med:.2f} s wall median of {len(ws)} (min {ws[0]:.2f}, max {ws[-1]:.2f}; "
                           f"command's own {doc['seconds']:.2f} s, encoder {doc['encoder']})",
                           f"peak RSS {rss / GIB:.2f} GiB", f"target < 5 s: {'met' if med < 5 else 'MISSED'}"))
            rows.append(make_row("cli_search", "rbank search", args.patterns, timing(walls), encoder=doc["encoder"],
                                 cmd_seconds=doc["seconds"], peak_rss_bytes=rss, dim=args.dim))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for r in report:
        print(" | ".join(r))
    append_rows(rows)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
