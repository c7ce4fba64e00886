"""The trajectory log reader and writers (rbank_torch.logs): validation, bad lines, chunking, Parquet, text."""

from __future__ import annotations

import gzip
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from rbank_torch.logs import (
    LogFormatError,
    ReadStats,
    iter_log_batches,
    parse_record,
    read_log,
    task_to_record,
    trajectory_to_record,
    write_jsonl,
    write_parquet,
)
from rbank_torch.synthetic import generate_tasks

D = 8
START = datetime(2025, 1, 6, 9, 0, tzinfo=timezone.utc)


def _records(n: int, seed: int = 0, dim: int = D, with_embedding: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, spec in enumerate(generate_tasks(n, seed=seed)):
        emb = torch.randn(dim, generator=g).tolist() if with_embedding else None
        out.append(task_to_record(spec, i + 1, START + timedelta(minutes=i), embedding=emb))
    return out


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _dump(rec: dict) -> str:
    return json.dumps(rec, separators=(",", ":"))


def _same(a, b) -> None:
    """Two trajectories carry the same content."""
    assert a.id == b.id
    assert torch.equal(a.query_embedding, b.query_embedding)
    assert [(s.action, s.rationale, s.outcome, s.confidence, s.latency_ms) for s in a.steps] == [
        (s.action, s.rationale, s.outcome, s.confidence, s.latency_ms) for s in b.steps
    ]
    assert a.verdict == b.verdict
    assert a.quality == pytest.approx(b.quality, abs=0)
    assert a.lessons == b.lessons
    assert a.started_at == b.started_at
    assert a.metadata.tags == b.metadata.tags
    assert a.metadata.request_type == b.metadata.request_type


def test_round_trip_jsonl_and_chunking(tmp_path):
    recs = _records(50)
    p = tmp_path / "log.jsonl"
    assert write_jsonl(recs, p) == 50
    stats = ReadStats()
    batches = list(iter_log_batches(p, chunk_size=7, stats=stats))
    assert [len(b) for b in batches] == [7] * 7 + [1]
    assert stats.records == 50 and stats.lines == 50 and stats.bad_lines == 0 and stats.files == 1
    assert sum(b.nbytes for b in batches) == p.stat().st_size
    trajs = [t for b in batches for t in b.trajectories]
    assert [t.id for t in trajs] == list(range(1, 51))
    assert batches[0].lines == list(range(1, 8))
    for b in batches:  # the chunk tensor and the trajectories agree
        assert b.embeddings.shape == (len(b), D) and b.embeddings.dtype == torch.float32
        for t, row in zip(b.trajectories, b.embeddings):
            assert torch.equal(t.query_embedding, row)
    want = torch.tensor(recs[3]["query_embedding"], dtype=torch.float32)
    assert torch.equal(trajs[3].query_embedding, want)
    assert trajs[0].metadata.attributes["query"] == recs[0]["query"]

    # writing trajectories back and reading again gives the same trajectories
    p2 = tmp_path / "again.jsonl.gz"
    write_jsonl(trajs, p2)
    with gzip.open(p2, "rt") as f:
        assert len(f.readlines()) == 50
    for a, b in zip(trajs, read_log(p2)):
        _same(a, b)


def test_fast_and_plain_json_paths_agree(tmp_path):
    recs = _records(40, seed=3)
    recs[5]["query_embedding"] = [1, 2.5e-3, -3e2] + [0] * (D - 3)  # ints and exponents
    lines = [_dump(r) for r in recs]
    lines[7] = json.dumps(recs[7], indent=None)  # spaces after separators
    p = _write_lines(tmp_path / "log.jsonl", lines)
    fast = read_log(p, fast=True)
    plain = read_log(p, fast=False)
    assert len(fast) == len(plain) == 40
    for a, b in zip(fast, plain):
        _same(a, b)
    assert fast[5].query_embedding.tolist() == pytest.approx([1, 2.5e-3, -3e2] + [0] * (D - 3))


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r["steps"][0].__setitem__("confidence", 1.7), "steps[0].confidence"),
        (lambda r: r.__setitem__("verdict", {"kind": "failure"}), "verdict.cause"),
        (lambda r: r.__setitem__("verdict", "won"), "verdict.kind"),
        (lambda r: r.__setitem__("confidnce", 0.5), "confidnce"),
        (lambda r: r["steps"][1].__setitem__("outcome", {"kind": "exploded"}), "steps[1].outcome.kind"),
        (lambda r: r["query_embedding"].__setitem__(2, "x"), "query_embedding"),
        (lambda r: r.__setitem__("query_embedding", [0.5] * (D + 1)), "query_embedding"),
        (lambda r: r.__setitem__("started_at", "yesterday"), "started_at"),
        (lambda r: r["metadata"].__setitem__("tags", "coding"), "metadata.tags"),
        (lambda r: r.pop("verdict"), "verdict"),
    ],
)
def test_bad_line_names_file_line_and_field(tmp_path, mutate, field):
    recs = _records(4, seed=1)
    mutate(recs[2])
    p = _write_lines(tmp_path / "bad.jsonl", [_dump(r) for r in recs])
    with pytest.raises(LogFormatError) as ei:
        read_log(p)
    e = ei.value
    assert e.line == 3 and e.path == str(p)
    assert e.field is not None and e.field.startswith(field)
    assert str(e).startswith(f"{p}:3: {field}")


def test_skip_bad_counts_and_reports_every_bad_line(tmp_path):
    recs = _records(6, seed=2)
    lines = [_dump(r) for r in recs]
    lines[1] = '{"query": "unterminated'
    lines[3] = _dump({**recs[3], "query_embedding": [float("nan")] * D})
    lines.insert(5, "")  # blank lines are not records and not errors
    lines.append("[1, 2, 3]")
    p = _write_lines(tmp_path / "mixed.jsonl", lines)
    seen: list[LogFormatError] = []
    stats = ReadStats()
    got = read_log(p, skip_bad=True, stats=stats, on_error=seen.append)
    assert [t.id for t in got] == [1, 3, 5, 6]
    assert stats.bad_lines == 3 and stats.records == 4 and stats.lines == 7
    assert [e.line for e in seen] == [2, 4, 8]
    assert "not valid JSON" in str(seen[0])
    assert seen[1].field == "query_embedding" and "finite" in seen[1].reason
    assert "JSON object" in str(seen[2])
    assert stats.errors == [str(e) for e in seen]
    # without skip_bad the first one stops the read
    with pytest.raises(LogFormatError, match=r"mixed.jsonl:2: not valid JSON"):
        read_log(p)
    # embeddings are checked per chunk, yet an earlier NaN line still wins over a later JSON error
    del lines[1]
    _write_lines(p, lines)
    with pytest.raises(LogFormatError, match=r"mixed.jsonl:3: query_embedding: must hold finite"):
        read_log(p)


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such log file"):
        read_log(tmp_path / "nope.jsonl")
    p = write_jsonl(_records(2), tmp_path / "a.jsonl") and tmp_path / "a.jsonl"
    with pytest.raises(ValueError, match="chunk_size"):
        read_log(p, chunk_size=0)


def test_dimension_is_fixed_across_files(tmp_path):
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    write_jsonl(_records(3, dim=D), a)
    write_jsonl(_records(3, dim=D + 2), b)
    with pytest.raises(LogFormatError, match=r"b.jsonl:1: query_embedding: must have dimension 8, got 10"):
        read_log([a, b])
    stats = ReadStats()
    assert len(read_log([a, b], skip_bad=True, stats=stats)) == 3 and stats.bad_lines == 3
    # an expected dimension given up front (the bank's) applies to the first file too
    with pytest.raises(LogFormatError, match="must have dimension 4"):
        read_log(a, dim=4)


def test_text_records_are_embedded_once_per_distinct_text(tmp_path):
    recs = _records(30, seed=4, with_embedding=False)
    recs[0]["query_embedding"] = [0.25] * D  # mixed: one record brings its own embedding
    p = tmp_path / "text.jsonl"
    write_jsonl(recs, p)
    calls: list[list[str]] = []

    def embed(texts: list[str]) -> torch.Tensor:
        calls.append(list(texts))
        return torch.stack([torch.full((D,), float(len(t))) for t in texts])

    stats = ReadStats()
    got = read_log(p, embed=embed, chunk_size=16, stats=stats)
    assert len(got) == 30 and stats.embedded_from_text == 29
    assert len(calls) == 2  # one call per chunk
    for c in calls:
        assert len(c) == len(set(c))  # distinct texts only
    assert torch.equal(got[0].query_embedding, torch.full((D,), 0.25))
    for t, r in zip(got[1:], recs[1:]):
        assert torch.equal(t.query_embedding, torch.full((D,), float(len(r["query"]))))
    # without a text model such records are bad lines
    with pytest.raises(LogFormatError, match=r"text.jsonl:2: query_embedding: missing"):
        read_log(p)
    # a model of another dimension than the log's embeddings is an error
    with pytest.raises(LogFormatError, match="dimension"):
        read_log(p, embed=lambda ts: torch.zeros(len(ts), D + 1))


def test_parse_record_defaults():
    t, query, emb = parse_record({"query": "q", "verdict": "success", "steps": [
        {"action": "a", "outcome": "success", "confidence": 0.8, "latency_ms": 10, "tool": "git", "model": "m",
         "input_tokens": 5},
        {"action": "b", "outcome": {"kind": "partial", "achieved": "x", "missing": "y"}, "confidence": 0.5,
         "latency_ms": 30, "tool": "git"},
    ]}, now=START)
    assert query == "q" and emb is None
    assert t.total_latency_ms == 40 and t.completed_at == START + timedelta(milliseconds=40)
    assert t.metadata.tools_invoked == ["git"] and t.metadata.models_used == ["m"]
    assert t.metadata.total_input_tokens == 5
    assert t.quality == pytest.approx(t.compute_quality())
    with pytest.raises(ValueError, match="query"):
        parse_record({"verdict": "success"})


def test_parquet_reads_like_jsonl(tmp_path):
    pytest.importorskip("pyarrow")
    recs = _records(60, seed=5)
    recs[4]["verdict"] = {"kind": "recovered", "original": {"type": "ToolFailure", "tool": "t", "error": "e"},
                          "attempts": 2, "final_quality": 0.7}
    recs[6]["steps"][0]["attributes"] = {"k": "v"}
    jp, pp = tmp_path / "log.jsonl", tmp_path / "log.parquet"
    write_jsonl(recs, jp)
    assert write_parquet(recs, pp, row_group_size=16) == 60
    a, b = read_log(jp), read_log(pp, chunk_size=10)
    assert len(a) == len(b) == 60
    for x, y in zip(a, b):
        assert x.id == y.id and x.verdict == y.verdict and x.quality == pytest.approx(y.quality)
        # Parquet stores float32 embeddings; JSONL rounds the same float64 values to float32 on reading
        assert torch.equal(x.query_embedding, y.query_embedding)
        assert [s.action for s in x.steps] == [s.action for s in y.steps]
    assert b[6].steps[0].metadata.attributes == {"k": "v"}
    # a bad row is reported by its row number
    bad = [dict(r) for r in recs[:3]]
    bad[1] = {**bad[1], "steps": [{**bad[1]["steps"][0], "confidence": 2.0}]}
    write_parquet(bad, tmp_path / "bad.parquet")
    with pytest.raises(LogFormatError, match=r"bad.parquet:2: steps\[0\].confidence"):
        read_log(tmp_path / "bad.parquet")


def test_trajectory_record_round_trip_keeps_everything():
    recs = _records(3, seed=6)
    t, _, emb = parse_record(recs[1], now=START)
    t.query_embedding = torch.tensor(emb, dtype=torch.float32)
    rec = trajectory_to_record(t)
    t2, q2, emb2 = parse_record(json.loads(json.dumps(rec)), now=START)
    t2.query_embedding = torch.tensor(emb2, dtype=torch.float32)
    assert q2 == recs[1]["query"] and t2.uuid == t.uuid
    _same(t, t2)


@pytest.mark.parametrize("fast", [True, False])
def test_embedding_without_query_text(tmp_path, fast):
    """A record may carry only its embedding (no query text), on both JSON paths."""
    recs = _records(6, seed=4)
    for r in recs:
        r.pop("query", None)
    p = _write_lines(tmp_path / "log.jsonl", [_dump(r) for r in recs])
    got = read_log(p, fast=fast)
    assert [t.query_embedding.tolist() for t in got] == [pytest.approx(r["query_embedding"]) for r in recs]
    recs[2].pop("query_embedding")
    p = _write_lines(tmp_path / "bad.jsonl", [_dump(r) for r in recs])
    with pytest.raises(LogFormatError, match=r"bad.jsonl:3: query"):
        read_log(p, fast=fast)
