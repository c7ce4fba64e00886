"""The main job: from agent runs to a searchable memory, in under two minutes on a laptop CPU.

Generates a few thousand realistic agent trajectories (coding, research, tool use, chat; successes,
failures with root causes, partial results, recoveries), embeds their queries with the packaged
all-MiniLM-L6-v2 model, stores them in a :class:`ReasoningBank`, answers text queries with the most
similar patterns and their lessons, analyses a failure, consolidates the patterns (near-duplicates folded
into their leaders, low-value ones pruned), distils the trajectories into key lessons, saves a snapshot,
reloads it and checks it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from .bank import ReasoningBank, ReasoningBankConfig
from .synthetic import generate_tasks
from .trajectory import Trajectory, TrajectoryRecorder
from .verdicts import VerdictAnalyzer

QUESTIONS = [
    "my unit tests started failing after a refactor",
    "how do I deploy a service without breaking production",
    "find recent papers about catastrophic forgetting",
    "help me organise a team event",
]


def _build(tasks, embeddings: torch.Tensor) -> list[Trajectory]:
    out = []
    for spec, emb in zip(tasks, embeddings):
        rec = TrajectoryRecorder(emb)
        rec.set_request_type(spec.request_type)
        rec.set_session_id(spec.session_id)
        for tag in spec.tags:
            rec.add_tag(tag)
        for tool in spec.tools:
            rec.record_tool(tool)
        rec.record_tokens(spec.input_tokens, spec.output_tokens)
        for action, rationale, outcome, conf in spec.steps:
            rec.add_step(action, rationale, outcome, conf)
        for lesson in spec.lessons:
            rec.add_lesson(lesson)
        t = rec.complete(spec.verdict)
        t.metadata.attributes["query"] = spec.query
        out.append(t)
    return out


def run(n: int = 3000, seed: int = 0, out: str | None = None, quiet: bool = False) -> dict:
    """Run the demo; returns the figures it printed (for tests)."""
    say = (lambda *a: None) if quiet else print
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    from .text import TextEmbedder

    embedder = TextEmbedder()
    timings["load model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tasks = generate_tasks(n, seed=seed)
    uniq = sorted({t.query for t in tasks})
    table = dict(zip(uniq, embedder.encode(uniq)))
    embs = torch.stack([table[t.query] for t in tasks])
    timings["embed queries"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    trajectories = _build(tasks, embs)
    cfg = ReasoningBankConfig(embedding_dim=embedder.dim)
    cfg.distillation_config.readable_lessons = True  # one recovery lesson, counted over all attempt counts
    bank = ReasoningBank(cfg, embedder=embedder)
    for t in trajectories:
        bank.store_trajectory(t)
    timings["record + store"] = time.perf_counter() - t0
    st = bank.stats()
    say(f"rbank_torch demo: {n} agent runs, {len(uniq)} distinct queries, {embedder.dim}-d MiniLM embeddings")
    say(
        f"  stored {st.total_trajectories} trajectories: {st.success_count} succeeded, {st.failure_count} failed, "
        f"{st.recovered_count} recovered; avg quality {st.avg_quality:.2f}; {st.total_patterns} patterns"
    )

    t0 = time.perf_counter()
    cons = bank.consolidate()
    timings["consolidate"] = time.perf_counter() - t0
    say(
        f"consolidated: {cons.patterns_before} -> {cons.patterns_after} patterns "
        f"({cons.stats.merged_count} near-duplicates folded into their leaders, {cons.stats.pruned_count} "
        f"low-value patterns pruned; EWC lambda {cons.lambda_used:.0f})"
    )

    t0 = time.perf_counter()
    answers = {}
    qe = embedder.encode(QUESTIONS)  # [Q, D]: the snapshot check below compares batched answers
    for q in QUESTIONS:
        # text in; what worked (one memory per distinct task text), then the closest run that failed
        res = bank.search(q, k=3, outcome="success", dedup="text")
        answers[q] = res
        say(f"\n? {q}")
        for r in res:
            p = r.pattern
            lesson = p.lessons[0] if p.lessons else "-"
            say(
                f"  {r.rank + 1}. sim {r.similarity:.3f} [{p.category}] \"{p.text}\" "
                f"quality {p.avg_quality:.2f}; steps: {' -> '.join(p.example_actions[:3])}; lesson: {lesson}"
            )
        for r in bank.search(q, k=1, outcome="failure"):
            avoid = next((x for x in r.pattern.lessons if x.startswith(("Avoid", "Root cause"))), "-")
            say(f"  failed before: \"{r.pattern.text}\" (sim {r.similarity:.3f}): {avoid}")
    timings["search"] = time.perf_counter() - t0

    failure = next(t for t in trajectories if t.is_failure and t.steps)
    a = VerdictAnalyzer(readable=True).analyze(failure)  # counts in the right number, tools named
    say(f"\nWhy did \"{failure.metadata.attributes['query']}\" fail?")
    say(f"  root cause: {a.root_cause}")
    say(f"  factors: {'; '.join(a.contributing_factors) or '-'}")
    say(f"  strategies: {', '.join(s.name for s in a.recovery_strategies) or '-'}")
    say(f"  lessons: {'; '.join(a.lessons)}")
    say(f"  improvements: {'; '.join(a.improvements) or '-'}  (confidence {a.confidence:.2f})")

    t0 = time.perf_counter()
    dist = bank.distill()
    timings["distill"] = time.perf_counter() - t0
    say(
        f"\ndistilled {dist.trajectories_processed} trajectories into {len(dist.key_lessons)} key lessons "
        f"(kept as {len(dist.compressed_trajectories)} compressed trajectories, "
        f"size ratio {dist.compression_ratio:.2f}); the most important:"
    )
    for k in dist.key_lessons[:3]:
        say(f"  - {k.content} (importance {k.importance:.2f}, seen {k.observation_count}x, "
            f"success rate {k.success_rate:.2f})")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(out) if out else Path(tmp) / "bank.safetensors"
        bank.save(str(path))
        size = path.stat().st_size
        again = ReasoningBank.load(str(path))
    timings["save + load"] = time.perf_counter() - t0
    same = again.export_patterns() == bank.export_patterns()
    s1, i1 = bank.search_similar_batch(qe, 3)
    s2, i2 = again.search_similar_batch(qe, 3)
    same = same and torch.equal(i1, i2) and len(again.trajectories) == len(bank.trajectories)
    say(f"\nsnapshot: {size / 1e6:.1f} MB, reloaded {len(again.trajectories)} trajectories and "
        f"{len(again.store)} patterns, identical: {same}")
    say("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    if not same:
        raise RuntimeError("snapshot round-trip differs")
    return {
        "stats": st,
        "answers": answers,
        "timings": timings,
        "roundtrip_identical": same,
        "analysis": a,
        "consolidation": cons,
        "distillation": dist,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rbank demo", description=__doc__)
    ap.add_argument("-n", type=int, default=3000, help="agent runs to generate (default 3000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="keep the snapshot at this path")
    args = ap.parse_args(argv)
    run(args.n, args.seed, args.out)
    return 0
