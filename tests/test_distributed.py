"""Sharded distillation, pair finding + leader scan and k-means on torch.distributed, against one process.

The multi-process tests spawn 2 and 3 CPU processes (gloo over 127.0.0.1, a free port, collective
timeouts set) with :func:`rbank_torch.distributed.spawn_local`; each rank returns JSON, compared here with
the single-process results. Failure tests check that a rank that raises, exits or hangs gives every other
rank a clear error within a bounded time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from rbank_torch.kernels.kmeans import kmeans
from rbank_torch.kernels.pairs import leader_scan, pairs_above

from rbank_torch import distributed as D
from rbank_torch._util import dt_to_us, us_to_dt
from rbank_torch.distillation import (
    DistillationConfig,
    DistillationError,
    DistillationResult,
    MemoryDistiller,
)
from rbank_torch.patterns import Pattern, PatternCategory
from rbank_torch.store import PatternStore, PatternStoreConfig
from rbank_torch.trajectory import StepOutcome, Trajectory, TrajectoryMetadata, TrajectoryStep
from rbank_torch.verdicts import ReasoningErrorType, RootCause, Verdict

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

BASE = datetime(2024, 5, 1, tzinfo=timezone.utc)
DIM = 8
N_LOG = 240
SPAWN_TIMEOUT_S = 90.0
COLLECTIVE_TIMEOUT_S = 30.0


# ----------------------------------------------------------------------------------------------------------
# Data: a deterministic log with repeated, similar and rank-crossing lessons.

WORDS = ["cache", "index", "schema", "retry", "timeout", "query", "config", "token", "batch", "lock"]
ACTIONS = ["search", "read_file", "run_tests", "execute", "analyze", "write_code", "verify", "answer", "plan"]
CAUSES = [
    RootCause.tool_failure("pytest", "timeout"),
    RootCause.insufficient_context(["schema", "owner"]),
    RootCause.reasoning_error(ReasoningErrorType.HALLUCINATION, "made up an API"),
    RootCause.external_failure("github", "502"),
]


def make_log(n: int = N_LOG, seed: int = 0, dim: int = DIM) -> list[Trajectory]:
    """``n`` trajectories with explicit ids and times (the same in every process)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    topics = torch.randn(6, dim, generator=g)
    out = []
    for i in range(n):
        topic = rng.randrange(6)
        emb = topics[topic] + 0.05 * torch.randn(dim, generator=g)
        t0 = BASE + timedelta(seconds=37 * i + rng.randrange(30))
        steps = []
        for s in range(rng.randrange(0, 6)):
            a = rng.choice(ACTIONS)
            o = rng.choice([StepOutcome.success()] * 3 + [StepOutcome.failure("boom"), StepOutcome.partial("a", "b")])
            steps.append(TrajectoryStep(s, a, f"why {a}", o, rng.choice([0.5, 0.8, 0.9, 1.0]), 5, t0))
        lessons = []
        for _ in range(rng.randrange(0, 4)):
            r = rng.random()
            if r < 0.4:
                lessons.append(f"Always check the {WORDS[topic]} before you {rng.choice(ACTIONS)}")
            elif r < 0.7:  # near-duplicates: one word differs, similar embeddings -> dedup merges
                w = rng.sample(WORDS, 2)
                lessons.append(f"prefer small {w[0]} steps and validate the {WORDS[topic]} output early {w[1]}")
            else:
                lessons.append(f"tip {rng.randrange(60)}: {rng.choice(WORDS)} {rng.choice(WORDS)}")
        kind = rng.random()
        if kind < 0.55:
            verdict = Verdict.success()
        elif kind < 0.75:
            verdict = Verdict.failure(rng.choice(CAUSES))
        elif kind < 0.88:
            verdict = Verdict.recovered(rng.choice(CAUSES), rng.randrange(1, 4), rng.choice([0.7, 0.85, 0.95]))
        else:
            verdict = Verdict.partial(rng.choice([0.2, 0.5, 0.9]))
        t = Trajectory(
            id=1000 + (i * 7919) % 100_003 if rng.random() < 0.97 else 1000 + (i // 2),
            uuid=f"u{i}",
            query_embedding=emb,
            steps=steps,
            started_at=t0,
            metadata=TrajectoryMetadata(
                request_type=rng.choice([None, "code review", "research task", "chat"]),
                tools_invoked=rng.choice([[], ["grep"], ["pytest", "git"]]),
                tags=rng.choice([[], ["prod"], ["eval", "nightly"]]),
            ),
            lessons=lessons,
        )
        t.complete(verdict)
        t.completed_at = t0 + timedelta(seconds=rng.randrange(1, 20))
        t.total_latency_ms = 1000
        out.append(t)
    return out


def cfg(**kw) -> DistillationConfig:
    kw.setdefault("min_trajectories_for_distillation", 10)
    kw.setdefault("max_lessons", 40)
    return DistillationConfig(**kw)


def canon(r: DistillationResult) -> dict:
    """Every field of a result that must not depend on how it was computed (not timings or timestamps)."""
    return {
        "lessons": [
            {
                "content": k.content,
                "embedding": k.embedding.tolist(),
                "category": str(k.category),
                "importance": k.importance,
                "observation_count": k.observation_count,
                "success_rate": k.success_rate,
                "avg_quality": k.avg_quality,
                "example_actions": k.example_actions,
                "tags": k.tags,
                "source_trajectories": k.source_trajectories,
                "first_observed": dt_to_us(k.first_observed),
                "last_observed": dt_to_us(k.last_observed),
            }
            for k in r.key_lessons
        ],
        "compressed": [
            [c.original_id, c.key_embedding.tolist(), c.verdict.to_dict(), c.quality, c.lessons, c.key_actions,
             dt_to_us(c.timestamp), c.step_count, str(c.category)]
            for c in r.compressed_trajectories
        ],
        "trajectories_processed": r.trajectories_processed,
        "memory_saved": r.memory_saved,
        "compression_ratio": r.compression_ratio,
        "category_summary": r.category_summary,
    }


def shares(items: list, world: int) -> list[list]:
    """Consecutive, deliberately uneven parts (the last rank gets the most)."""
    n = len(items)
    cuts = [0] + [n * (r * r + r) // (world * world + world) for r in range(1, world)] + [n]
    return [items[cuts[r] : cuts[r + 1]] for r in range(world)]


def chunked(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


# -- a small JSONL trajectory codec for the file-based path --------------------------------------------------


def traj_to_json(t: Trajectory) -> dict:
    return {
        "id": t.id,
        "uuid": t.uuid,
        "query_embedding": t.query_embedding.tolist(),
        "steps": [[s.action, s.rationale, s.outcome.to_dict(), s.confidence] for s in t.steps],
        "verdict": t.verdict.to_dict(),
        "quality": t.quality,
        "started_at": dt_to_us(t.started_at),
        "completed_at": dt_to_us(t.completed_at) if t.completed_at else None,
        "request_type": t.metadata.request_type,
        "tools": t.metadata.tools_invoked,
        "tags": t.metadata.tags,
        "lessons": t.lessons,
    }


def traj_from_json(d: dict) -> Trajectory:
    t0 = us_to_dt(d["started_at"])
    t = Trajectory(
        id=int(d["id"]),
        uuid=d["uuid"],
        query_embedding=torch.tensor(d["query_embedding"], dtype=torch.float32),
        steps=[TrajectoryStep(i, a, r, StepOutcome.from_dict(o), c, 0, t0) for i, (a, r, o, c) in enumerate(d["steps"])],
        verdict=Verdict.from_dict(d["verdict"]),
        quality=float(d["quality"]),
        started_at=t0,
        completed_at=us_to_dt(d["completed_at"]) if d["completed_at"] is not None else None,
        metadata=TrajectoryMetadata(request_type=d["request_type"], tools_invoked=d["tools"], tags=d["tags"]),
        lessons=d["lessons"],
    )
    return t


def read_chunks_jsonl(path: str, start: int, end: int, size: int = 16):
    chunk = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= end:
                break
            if i < start or not line.strip():
                continue
            chunk.append(traj_from_json(json.loads(line)))
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def write_log_files(folder: Path, log: list[Trajectory], sizes: list[int]) -> list[str]:
    paths, i = [], 0
    for j, n in enumerate(sizes):
        p = folder / f"log-{j}.jsonl"
        with open(p, "w", encoding="utf-8") as f:
            for t in log[i : i + n]:
                f.write(json.dumps(traj_to_json(t)) + "\n")
            if j == 1:
                f.write("\n")  # a blank line: counted, read as nothing
        paths.append(str(p))
        i += n
    return paths


# -- embeddings ---------------------------------------------------------------------------------------------


def cluster_rows(n: int, dim: int, seed: int, centers: int, noise: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, dim, generator=g)
    return c[torch.randint(0, centers, (n,), generator=g)] + noise * torch.randn(n, dim, generator=g)


def pair_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    emb = cluster_rows(1500, 48, seed=3, centers=200, noise=0.25)
    emb[7] = 0.0  # a zero row pairs with nothing
    emb[100] = emb[99]  # exact duplicates
    cats = torch.from_numpy(np.random.default_rng(1).integers(0, 4, 1500))
    eligible = torch.from_numpy(np.random.default_rng(2).random(1500) > 0.1)
    return emb, cats, eligible


def kmeans_inputs() -> torch.Tensor:
    return cluster_rows(2001, 12, seed=5, centers=7, noise=0.6) * 3.0


def km_json(r) -> dict:
    return {
        "centroids": r.centroids.tolist(),
        "sizes": r.sizes.tolist(),
        "inertia": r.inertia,
        "iterations": r.iterations,
        "assignments": r.assignments.tolist(),
    }


# ----------------------------------------------------------------------------------------------------------
# What each spawned rank runs.


def _equality_worker(rank: int, world: int, folder: str) -> dict:
    torch.set_num_threads(1)
    out: dict = {}
    # distillation from in-memory shards (uneven, chunks of 7)
    log = make_log()
    mine = shares(log, world)[rank]
    r = D.distill_distributed(chunked(mine, 7), cfg())
    out["distill"] = canon(r) if r is not None else None
    # a MemoryDistiller as the shard, result on the last rank
    d = MemoryDistiller(cfg(max_lessons=5))
    d.add(mine)
    r = D.distill_distributed(d, dst=world - 1)
    out["distill_last"] = canon(r) if r is not None else None
    # files, read by the ranks in consecutive record ranges
    paths = sorted(str(p) for p in Path(folder).glob("log-*.jsonl"))
    D.distill_files(paths, Path(folder) / f"out-{world}", cfg(), read_chunks=read_chunks_jsonl)
    # too few trajectories: the same DistillationError on every rank
    try:
        D.distill_distributed(chunked(mine[:2], 1), cfg(min_trajectories_for_distillation=10_000))
        out["too_few"] = None
    except DistillationError as e:
        out["too_few"] = str(e)
    # pairs and leaders
    emb, cats, eligible = pair_inputs()
    p_all = D.pairs_above_distributed(emb, 0.8, dst=None, block_size=128)
    p_cat = D.pairs_above_distributed(emb, 0.75, cats, block_size=64)
    lead = D.leaders_distributed(emb, 0.8, cats, eligible, block_size=256)
    out["pairs"] = p_all.tolist()
    out["pairs_cat"] = None if p_cat is None else p_cat.tolist()
    out["leaders"] = lead.tolist()
    # a pattern store copy on every rank
    store = PatternStore(embedding_dim=48)
    pats = []
    for i, e in enumerate(emb[:400]):
        p = Pattern.new(e, PatternCategory.GENERAL if i % 3 else PatternCategory.RESEARCH, 0.9)
        p.usage_count = 1 + i % 4
        pats.append(p)
    store.store_patterns(pats)
    ids = sorted(store.columns()["id"].tolist())
    mm = D.store_merge_map_distributed(store, 0.8, by_category=True)
    out["merge_map"] = sorted([ids.index(a), ids.index(b)] for a, b in mm.items())
    # k-means on uneven shards (the first rank holds no rows when world == 3)
    x = kmeans_inputs()
    xs = shares(list(range(x.shape[0])), world)
    if world == 3:
        xs = [[], xs[0] + xs[1], xs[2]]
    local = x[torch.tensor(xs[rank], dtype=torch.int64)] if xs[rank] else torch.zeros(0, x.shape[1])
    out["km"] = km_json(D.kmeans_distributed(local, 7, tol=0.0, batch_size=97))
    init = x[:5].clone()
    init[1] = init[0]  # a duplicate centroid: its cluster starts empty and is re-seeded
    out["km_dup"] = km_json(D.kmeans_distributed(local, 5, init=init if rank == 0 else None, iters=20, batch_size=64))
    out["km_sph"] = km_json(D.kmeans_distributed(local, 4, spherical=True, seed=3, init_sample=500))
    return out


def _crash_worker(rank: int, world: int, how: str) -> str:
    """Rank 1 fails in the middle of its share of the distillation; the others report what they saw."""
    log = make_log(60)
    mine = shares(log, world)[rank]

    def chunks():
        yield mine[:5]
        if rank == 1:
            if how == "raise":
                raise RuntimeError("injected failure while reading the log")
            if how == "exit":
                os._exit(7)
            if how == "hang":
                time.sleep(120)
        yield mine[5:]

    D.distill_distributed(chunks(), cfg())
    return "finished"


def _pairs_crash_worker(rank: int, world: int) -> str:
    emb, _, _ = pair_inputs()
    if rank == 1:
        os._exit(9)
    D.leaders_distributed(emb, 0.8)
    return "finished"


def _leave_worker(rank: int, world: int) -> list:
    """Collectives, then leave the group from inside ``fn``: spawn_local's own leave must then be a no-op."""
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    D.leave_group()
    return [float(t), dist.is_initialized()]


def _consolidation_store() -> PatternStore:
    """A store with near-duplicates in two categories and low-quality, unused patterns that get pruned."""
    from rbank_torch.patterns import Pattern

    g = torch.Generator().manual_seed(21)
    base = torch.randn(12, 24, generator=g)
    store = PatternStore(PatternStoreConfig(embedding_dim=24, max_patterns=1000))
    pats = []
    for k in range(180):
        e = base[k % 12] + 0.25 * torch.randn(24, generator=g)
        p = Pattern.new(e, ["general", "research"][k % 2], 0.8)
        p.id = 10_000 + k  # the same ids in every process
        p.usage_count = 0 if k % 7 == 0 else 1 + k % 5
        p.success_count = p.usage_count // 2
        p.avg_quality = 0.05 if k % 7 == 0 else 0.4 + (k % 6) / 10
        if k % 7 == 0:  # unused for 60 days: low importance
            p.last_accessed = p.last_accessed - timedelta(days=60)
        p.lessons = [f"lesson {k % 17}"]
        pats.append(p)
    store.store_patterns(pats)
    return store


def _store_dump(store: PatternStore) -> dict:
    cols = store.columns()
    return {
        "id": cols["id"].tolist(),
        "usage": cols["usage_count"].tolist(),
        "quality": cols["avg_quality"].tolist(),
        "emb": cols["embedding"].double().sum(dim=1).tolist(),
        "lessons": [p.lessons for p in sorted(store.get_all_patterns(), key=lambda p: p.id)],
    }


def _cluster_json(cl: list) -> list:
    return [(c.pattern.embedding.tolist(), c.member_ids, c.size, c.mean_quality) for c in cl]


def _consolidate_worker(rank: int, world: int) -> dict:
    from rbank_torch.consolidation import PatternConsolidator, cluster_patterns

    torch.set_num_threads(1)
    store = _consolidation_store()
    cons = PatternConsolidator()
    res = cons.consolidate_store(store, distributed=True)
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(5))
    q = torch.rand(300, generator=torch.Generator().manual_seed(6))
    cuts = [0, 120, 300] if world == 2 else [0, 50, 51, 300]  # uneven shards, one of a single row
    lo, hi = cuts[rank], cuts[rank + 1]
    cl = cluster_patterns(x[lo:hi], 6, q[lo:hi], seed=3, distributed=True)
    return {
        "merge_map": {str(k): v for k, v in res.merge_map.items()},
        "pruned": res.pruned_pattern_ids,
        "store": _store_dump(store),
        "clusters": _cluster_json(cl),
    }


# ----------------------------------------------------------------------------------------------------------
# Pieces, in one process.


def test_leave_group_without_a_group_is_a_noop():
    assert not dist.is_initialized()
    D.leave_group()
    D.leave_group(ok=False)
    assert not dist.is_initialized()


def test_leave_group_twice_in_spawned_ranks():
    outs = D.spawn_local(_leave_worker, 3, num_threads=1)
    assert [o.result for o in outs] == [[6.0, False]] * 3


def test_lesson_owner_is_a_stable_hash():
    text = "Avoid: Tool 'pytest' failed: timeout"
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    assert D.lesson_owner(text, 7) == h % 7
    assert D.lesson_owner("é ✓", 3) == D.lesson_owner("é ✓", 3)
    counts = np.bincount([D.lesson_owner(f"lesson {i}", 4) for i in range(4000)], minlength=4)
    assert counts.min() > 850  # spread over the owners


def test_split_records_is_consecutive_and_even():
    counts = [5, 0, 17, 3, 1]
    for world in (1, 2, 3, 7, 40):
        parts = D.split_records(counts, world)
        flat = [(i, j) for ranges in parts for i, a, b in ranges for j in range(a, b)]
        assert flat == [(i, j) for i, c in enumerate(counts) for j in range(c)]
        sizes = [sum(b - a for _, a, b in ranges) for ranges in parts]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="world_size"):
        D.split_records([1], 0)


def test_count_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b"")
    assert D.count_lines(p) == 0
    p.write_bytes(b"x\ny\n")
    assert D.count_lines(p) == 2
    p.write_bytes(b"x\n\nlast")
    assert D.count_lines(p) == 3


@pytest.mark.parametrize("n,world", [(10, 2), (50_000, 2), (50_000, 3), (777, 5), (3, 4)])
def test_triangle_bands_have_equal_area(n, world):
    work = np.arange(n, 0, -1)
    bands = D.triangle_bands(work, world)
    assert bands[0][0] == 0 and bands[-1][1] == n
    assert all(bands[i][1] == bands[i + 1][0] for i in range(world - 1))
    areas = [int(work[a:b].sum()) for a, b in bands]
    if n >= 1000:
        assert max(areas) - min(areas) <= 2 * n  # each cut is within one row of its ideal place
    if n == 50_000 and world == 2:
        assert abs(bands[0][1] - n * (1 - 1 / math.sqrt(2))) <= 1


def simulate(log: list[Trajectory], world: int, config: DistillationConfig, cut: list[int] | None = None):
    """The sharded distillation with ``world`` ranks simulated in this process (same code path, no network)."""
    if cut is None:
        parts = shares(log, world)
    else:
        parts = [log[a:b] for a, b in zip([0] + cut, cut + [len(log)])]
    partials = []
    for p in parts:
        d = MemoryDistiller(config)
        for c in chunked(p, 5):
            d.add(c)
        partials.append(d.partial())
    routed = [D._route(p, world) for p in partials]
    payloads = []
    for owner in range(world):
        merged, keys = D._merge_owned([routed[s][owner] for s in range(world)], config)
        table = D._partial_blob(merged, {"first_seen": torch.from_numpy(keys)})
        own = D._partial_blob(D._own_part(partials[owner]))
        payloads.append(D._pack({"table": D._bytes_tensor(table), "own": D._bytes_tensor(own)}, {}))
    return D._finish_on_dst(payloads, config, time.perf_counter())


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_sharded_merge_equals_one_pass_in_process(world, seed):
    log = make_log(150, seed=seed)
    for config in (cfg(), cfg(deduplicate_lessons=False, max_lessons=1000), cfg(max_lessons=3)):
        ref = canon(MemoryDistiller(config).extract_key_lessons(log))
        assert canon(simulate(log, world, config)) == ref


def test_sharded_merge_with_empty_and_single_trajectory_shards():
    log = make_log(40, seed=4)
    ref = canon(MemoryDistiller(cfg()).extract_key_lessons(log))
    assert canon(simulate(log, 5, cfg(), cut=[0, 1, 1, 39])) == ref
    assert canon(simulate(log, 3, cfg(), cut=[40, 40])) == ref


def test_single_process_api_equals_the_plain_calls(tmp_path):
    log = make_log(120, seed=2)
    ref = MemoryDistiller(cfg()).extract_key_lessons(log)
    assert canon(D.distill_distributed(chunked(log, 9), cfg())) == canon(ref)
    with pytest.raises(DistillationError, match="min_trajectories_for_distillation"):
        D.distill_distributed([log[:3]], cfg(min_trajectories_for_distillation=50))
    paths = write_log_files(tmp_path, log, [50, 0, 70])
    res = D.distill_files(paths, tmp_path / "out", cfg(), read_chunks=read_chunks_jsonl)
    assert canon(res) == canon(ref)
    back = D.read_distilled(tmp_path / "out")
    assert canon(back) == canon(ref)
    lines = (tmp_path / "out" / "lessons.jsonl").read_text().splitlines()
    assert [json.loads(x)["content"] for x in lines] == [k.content for k in ref.key_lessons]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["trajectories_processed"] == 120 and summary["world_size"] == 1

    emb, cats, eligible = pair_inputs()
    assert torch.equal(D.pairs_above_distributed(emb, 0.8, cats, block_size=100), pairs_above(emb, 0.8, cats))
    lead = D.leaders_distributed(emb, 0.8, None, eligible)
    assert torch.equal(lead, leader_scan(emb.shape[0], pairs_above(emb, 0.8), eligible))
    x = kmeans_inputs()
    a, b = D.kmeans_distributed(x, 7, tol=0.0), kmeans(x, 7, tol=0.0)
    assert torch.equal(a.assignments, b.assignments) and torch.equal(a.sizes, b.sizes)
    torch.testing.assert_close(a.centroids, b.centroids, rtol=1e-5, atol=1e-5)
    assert a.inertia == pytest.approx(b.inertia, rel=1e-6)


def test_argument_errors_are_clear():
    with pytest.raises(ValueError, match="emb must be"):
        D.pairs_above_distributed(torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="finite"):
        D.pairs_above_distributed(torch.tensor([[1.0, float("nan")]]), 0.5)
    with pytest.raises(ValueError, match="categories"):
        D.pairs_above_distributed(torch.ones(3, 2), 0.5, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="k must be"):
        D.kmeans_distributed(torch.ones(3, 2), 4)
    with pytest.raises(ValueError, match="init must be"):
        D.kmeans_distributed(torch.randn(10, 2), 2, init=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="no log files"):
        D.distill_files([], None, read_chunks=read_chunks_jsonl)
    with pytest.raises(FileNotFoundError):
        D.distill_files(["/nonexistent/log.jsonl"], None, read_chunks=read_chunks_jsonl)


def test_payloads_are_plain_tensors():
    blob = D._pack({"a": torch.arange(3)}, {"x": ["é"]})
    assert blob[8:9] == b"{"  # a safetensors header, no pickle opcodes
    t, meta = D._unpack(blob, "test")
    assert t["a"].tolist() == [0, 1, 2] and meta == {"x": ["é"]}
    with pytest.raises(D.DistributedError, match="malformed"):
        D._unpack(b"\x80\x04garbage", "test")


def test_kmeans_is_the_same_for_any_split_in_process():
    """Exact sums: splitting the rows changes nothing (here: the local sums of two halves, added)."""
    x = kmeans_inputs()
    ref = D.kmeans_distributed(x, 7, tol=0.0)
    scale = D._exact_scale(D.world_info(), x.abs().amax(dim=0), x.shape[0])
    a = D._qcolsum(x[:777], scale, 50) + D._qcolsum(x[777:], scale, 999)
    assert torch.equal(a, D._qcolsum(x, scale, 4096))
    assert torch.equal(D._kmeans_assign(x, x.norm(dim=1).double(), ref.centroids, 13),
                       D._kmeans_assign(x, x.norm(dim=1).double(), ref.centroids, 4096))


# ----------------------------------------------------------------------------------------------------------
# Several processes.


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    log = make_log()
    write_log_files(folder, log, [70, 0, 100, 70])
    emb, cats, eligible = pair_inputs()
    x = kmeans_inputs()
    init = x[:5].clone()
    init[1] = init[0]
    store = PatternStore(embedding_dim=48)
    pats = []
    for i, e in enumerate(emb[:400]):
        p = Pattern.new(e, PatternCategory.GENERAL if i % 3 else PatternCategory.RESEARCH, 0.9)
        p.usage_count = 1 + i % 4
        pats.append(p)
    store.store_patterns(pats)
    cols = store.columns()
    lead = leader_scan(400, pairs_above(cols["embedding"], 0.8, cols["category_code"].long()))
    return {
        "folder": folder,
        "distill": canon(MemoryDistiller(cfg()).extract_key_lessons(log)),
        "distill_last": canon(MemoryDistiller(cfg(max_lessons=5)).extract_key_lessons(log)),
        "pairs": pairs_above(emb, 0.8).tolist(),
        "pairs_cat": pairs_above(emb, 0.75, cats).tolist(),
        "leaders": leader_scan(1500, pairs_above(emb, 0.8, cats), eligible).tolist(),
        "merge_map": sorted([i, int(lead[i])] for i in range(400) if int(lead[i]) != i),
        "km": km_json(D.kmeans_distributed(x, 7, tol=0.0, batch_size=97)),
        "km_dup": km_json(D.kmeans_distributed(x, 5, init=init, iters=20, batch_size=64)),
        "km_sph": km_json(D.kmeans_distributed(x, 4, spherical=True, seed=3, init_sample=500)),
        "km_plain": kmeans(x, 7, tol=0.0),
    }


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_one_process(world, reference):
    folder = reference["folder"]
    t0 = time.monotonic()
    outs = D.spawn_local(
        _equality_worker, world, (str(folder),), timeout_s=SPAWN_TIMEOUT_S, collective_timeout_s=COLLECTIVE_TIMEOUT_S
    )
    assert time.monotonic() - t0 < SPAWN_TIMEOUT_S
    res = [o.result for o in outs]
    # distillation: the result on dst only, equal to one pass
    assert res[0]["distill"] == reference["distill"]
    assert all(r["distill"] is None for r in res[1:])
    assert res[-1]["distill_last"] == reference["distill_last"]
    assert all(r["distill_last"] is None for r in res[:-1])
    assert canon(D.read_distilled(folder / f"out-{world}")) == reference["distill"]
    summary = json.loads((folder / f"out-{world}" / "summary.json").read_text())
    assert summary["world_size"] == world and summary["records"] == [70, 1, 100, 70]
    assert all(r["too_few"] and "min_trajectories_for_distillation" in r["too_few"] for r in res)
    # pairs and leaders: exactly the single-process lists
    assert all(r["pairs"] == reference["pairs"] for r in res)
    assert res[0]["pairs_cat"] == reference["pairs_cat"] and all(r["pairs_cat"] is None for r in res[1:])
    assert all(r["leaders"] == reference["leaders"] for r in res)
    assert all(r["merge_map"] == reference["merge_map"] for r in res)
    # k-means: bitwise equal to the one-process run; assignments concatenated in rank order
    for key in ("km", "km_dup", "km_sph"):
        ref = reference[key]
        for r in res:
            got = dict(r[key])
            assert got.pop("assignments") is not None
            assert got == {k: v for k, v in ref.items() if k != "assignments"}, key
        assert sum((r[key]["assignments"] for r in res), []) == ref["assignments"], key
    assert reference["km_dup"]["sizes"][1] > 0  # the empty cluster was re-seeded
    plain = reference["km_plain"]
    assert sum((r["km"]["assignments"] for r in res), []) == plain.assignments.tolist()


@pytest.mark.parametrize("world", [2, 3])
def test_consolidation_and_clustering_across_ranks_equal_one_process(world):
    from rbank_torch.consolidation import PatternConsolidator, cluster_patterns

    store = _consolidation_store()
    ref = PatternConsolidator().consolidate_store(store)
    assert ref.pruned_pattern_ids and ref.merge_map  # both rules are exercised
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(5))
    q = torch.rand(300, generator=torch.Generator().manual_seed(6))
    ref_cl = json.loads(json.dumps(_cluster_json(cluster_patterns(x, 6, q, seed=3))))
    outs = D.spawn_local(_consolidate_worker, world, timeout_s=SPAWN_TIMEOUT_S, collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    want_map = {str(k): v for k, v in ref.merge_map.items()}
    for o in outs:
        r = o.result
        assert r["merge_map"] == want_map and r["pruned"] == ref.pruned_pattern_ids
        assert r["store"] == json.loads(json.dumps(_store_dump(store)))
        assert r["clusters"] == ref_cl  # centroids bit for bit, members, sizes, qualities


@pytest.mark.parametrize("how", ["raise", "exit", "hang"])
def test_a_failing_rank_gives_every_rank_a_clear_error(how):
    world = 3 if how == "raise" else 2
    coll_timeout = 4.0
    # a hanging rank is only stopped by the overall time limit; the others must not wait that long
    limit = 12.0 if how == "hang" else 25.0
    t0 = time.monotonic()
    outs = D.spawn_local(
        _crash_worker, world, (how,), timeout_s=limit, collective_timeout_s=coll_timeout, raise_on_error=False
    )
    elapsed = time.monotonic() - t0
    assert elapsed < limit + 10.0  # bounded: the limit plus the time to stop and collect the processes
    others = [o for o in outs if o.rank != 1]
    assert all(o.error_type == "DistributedError" for o in others), [o.error for o in outs]
    if how == "raise":
        for o in outs:  # the same explanation everywhere, the failing rank included
            assert o.error_type == "DistributedError"
            assert "rank 1 failed with RuntimeError: injected failure while reading the log" in o.error
            assert "distil the local share" in o.error
    elif how == "exit":
        assert outs[1].exitcode == 7
        assert "collective failed" in others[0].error and "distil the local share" in others[0].error
    else:
        assert outs[1].error_type == "Timeout"
        assert "distil the local share" in others[0].error
        assert others[0].seconds < coll_timeout + 10


def test_a_crashed_rank_during_pair_finding_is_reported():
    outs = D.spawn_local(_pairs_crash_worker, 2, timeout_s=25.0, collective_timeout_s=4.0, raise_on_error=False)
    assert outs[1].exitcode == 9 and outs[1].error_type == "Exited"
    assert outs[0].error_type == "DistributedError" and "find pairs" in outs[0].error
    with pytest.raises(D.DistributedError, match="rank 1: exited with code 9"):
        D.spawn_local(_pairs_crash_worker, 2, timeout_s=25.0, collective_timeout_s=4.0)


# ----------------------------------------------------------------------------------------------------------
# Log ranges and the command line under torchrun.


def write_cli_logs(folder: Path) -> list[str]:
    """Two JSONL logs with embeddings, query texts and ids; the second has a bad line and a blank line."""
    from rbank_torch.logs import trajectory_to_record, write_jsonl

    log = make_log(300, seed=5)
    recs = [trajectory_to_record(t, query=f"task {i % 23}") for i, t in enumerate(log)]
    a, b = folder / "a.jsonl", folder / "b.jsonl"
    write_jsonl(recs[:110], a)
    write_jsonl(recs[110:], b)
    lines = b.read_text(encoding="utf-8").splitlines(True)
    lines.insert(150, '{"bogus": 1}\n')  # line 152 of b once the blank line is in: record 262 of 302, in rank 1's half
    lines.insert(15, "\n")
    b.write_text("".join(lines), encoding="utf-8")
    return [str(a), str(b)]


@pytest.mark.parametrize("kind", ["jsonl", "gz", "parquet"])
def test_log_ranges_concatenate_to_the_whole_log(tmp_path, kind):
    from rbank_torch.logs import ReadStats, iter_log_batches, trajectory_to_record, write_jsonl, write_parquet

    log = make_log(57, seed=4)
    path = tmp_path / {"jsonl": "l.jsonl", "gz": "l.jsonl.gz", "parquet": "l.parquet"}[kind]
    recs = [trajectory_to_record(t, query=f"q{i}") for i, t in enumerate(log)]
    if kind == "parquet":
        write_parquet(recs, path)
    else:
        write_jsonl(recs, path)
    n = D.count_log_records(path)
    assert n == 57
    whole_stats = ReadStats()
    whole = [t for b in iter_log_batches(path, chunk_size=5, stats=whole_stats) for t in b.trajectories]
    got, lines, stats = [], [], ReadStats()
    for a, b in [(0, 13), (13, 13), (13, 40), (40, 57)]:
        for batch in D.iter_log_range(path, a, b, chunk_size=4, stats=stats):
            got.extend(batch.trajectories)
            lines.extend(batch.lines)
    assert [t.id for t in got] == [t.id for t in whole] == [t.id for t in log]
    assert all(torch.equal(x.query_embedding, y.query_embedding) for x, y in zip(got, whole))
    assert lines == list(range(1, 58)) and stats.lines == whole_stats.lines == 57
    with pytest.raises(ValueError, match="start"):
        list(D.iter_log_range(path, 5, 2))


def _strip_times(summary: dict) -> dict:
    timing = {"processing_time_ms", "timestamp", "read_seconds", "wall_seconds", "trajectories_per_s"}
    return {k: v for k, v in summary.items() if k not in timing}


def _safetensors_fields(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()}


def _torchrun(n: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, RBANK_DIST_TIMEOUT_S="60", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "rbank_torch", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_torchrun_distill_command_equals_one_process(tmp_path):
    paths = write_cli_logs(tmp_path)
    opts = ["--min-trajectories", "10", "--max-lessons", "30", "--skip-bad", "--chunk-size", "16", "-q"]
    one = subprocess.run([sys.executable, "-m", "rbank_torch", "distill", *paths, "--out", "one", *opts],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    two = _torchrun(2, ["distill", *paths, "--out", "two", *opts, "--bad-lines", "bad.jsonl"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    # each rank lists the bad lines of its share: the one bad line is in rank 1's
    assert (tmp_path / "bad.jsonl.rank0").read_text() == ""
    bad = [json.loads(x) for x in (tmp_path / "bad.jsonl.rank1").read_text().splitlines()]
    assert len(bad) == 1 and bad[0]["line"] == 152 and bad[0]["path"].endswith("b.jsonl")
    assert "on 2 ranks" in two.stdout and two.stdout.count("distilled 300 trajectories") == 1
    a, b = tmp_path / "one", tmp_path / "two"
    # lessons, their order and the compressed embeddings: the same bytes
    assert (a / "lessons.jsonl").read_bytes() == (b / "lessons.jsonl").read_bytes()
    assert (a / "compressed.safetensors").read_bytes() == (b / "compressed.safetensors").read_bytes()
    # safetensors orders metadata keys arbitrarily: compare fields
    assert _safetensors_fields(a / "lessons.safetensors") == _safetensors_fields(b / "lessons.safetensors")
    ca = [json.loads(x) for x in (a / "compressed.jsonl").read_text().splitlines()]
    cb = [json.loads(x) for x in (b / "compressed.jsonl").read_text().splitlines()]
    assert len(ca) == len(cb) > 0
    assert [{k: v for k, v in x.items() if k != "compressed_at"} for x in ca] == [
        {k: v for k, v in x.items() if k != "compressed_at"} for x in cb
    ]
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert _strip_times(sa) == _strip_times(sb)
    assert sb["trajectories_processed"] == 300 and sb["bad_lines"] == 1 and sb["lines"] == 301
    assert len(json.loads((a / "lessons.jsonl").read_text().splitlines()[0])["source_trajectories"]) > 0


def test_torchrun_distill_command_reports_a_failing_rank(tmp_path):
    paths = write_cli_logs(tmp_path)  # the bad line is in rank 1's share; without --skip-bad it is an error
    t0 = time.monotonic()
    res = _torchrun(2, ["distill", *paths, "--out", "out", "--min-trajectories", "10", "-q"], tmp_path)
    assert time.monotonic() - t0 < 100
    assert res.returncode != 0
    msg = "rank 1 failed with LogFormatError"
    assert res.stderr.count(msg) == 2, res.stderr[-3000:]  # reported by both ranks
    assert "b.jsonl:152: bogus" in res.stderr and "distil the local share" in res.stderr
    assert not (tmp_path / "out" / "lessons.jsonl").exists()
