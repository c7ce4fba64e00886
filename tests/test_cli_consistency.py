"""What a newcomer types: one spelling of the bank everywhere, clear words for a foreign file, the
library's default backend."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from rbank_torch import ReasoningBank
from rbank_torch.cli import build_parser, main
from rbank_torch.logs import task_to_record
from rbank_torch.store import PatternStoreConfig
from rbank_torch.synthetic import generate_tasks

ROOT = Path(__file__).resolve().parents[1]
D = 8
BANK_COMMANDS = ["search", "stats", "consolidate", "prune", "report"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def bank(tmp_path, capsys) -> Path:
    g = torch.Generator().manual_seed(0)
    start = datetime(2025, 1, 6, 9, 0, tzinfo=timezone.utc)
    rows = [task_to_record(spec, i + 1, start + timedelta(minutes=i),
                           embedding=torch.randn(D, generator=g).tolist())
            for i, spec in enumerate(generate_tasks(40, seed=0))]
    log = tmp_path / "runs.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b = tmp_path / "bank.safetensors"
    code, _, err = run(capsys, "ingest", log, "--bank", b, "-q")
    assert code == 0, err
    return b


def _extra(cmd: str, tmp_path: Path) -> list[str]:
    return {"search": ["q", "--embedding", json.dumps([0.5] * D)], "prune": ["--min-quality", "0.1"],
            "report": ["--out", str(tmp_path / "r.html")]}.get(cmd, [])


def test_every_bank_command_takes_dash_dash_bank(bank, tmp_path, capsys):
    parser = build_parser()
    for cmd in ["ingest", *BANK_COMMANDS]:
        text = parser._subparsers._group_actions[0].choices[cmd].format_help()  # type: ignore[union-attr]
        assert "-b BANK, --bank BANK" in text, (cmd, text)
    for cmd in BANK_COMMANDS:
        code, out, err = run(capsys, cmd, "--bank", bank, *_extra(cmd, tmp_path), "--json")
        assert code == 0, (cmd, err)
        assert "deprecated" not in err
        doc = json.loads(out)
        assert isinstance(doc, dict) and doc
        code, _, err = run(capsys, cmd, "-b", bank, *_extra(cmd, tmp_path), "-q")
        assert code == 0 and err == "", (cmd, err)


@pytest.mark.parametrize("cmd", BANK_COMMANDS)
def test_positional_bank_still_works_with_a_note(bank, tmp_path, capsys, cmd):
    code, out, err = run(capsys, cmd, bank, *_extra(cmd, tmp_path), "--json")
    assert code == 0, err
    assert f"use --bank {bank}" in err and "deprecated" in err
    # the same result as the documented spelling
    code2, out2, _ = run(capsys, cmd, "--bank", bank, *_extra(cmd, tmp_path), "--json")
    assert code2 == 0
    if cmd in ("search", "stats"):
        a, b = json.loads(out), json.loads(out2)
        for d in (a, b):
            d.pop("timings_s", None)
            d.pop("seconds", None)
        assert a.keys() == b.keys()


def test_search_query_alone_is_not_taken_for_the_bank(bank, capsys):
    code, _, err = run(capsys, "search", "just a query")
    assert code == 2 and "--bank BANK" in err


@pytest.mark.parametrize("cmd", ["stats", "search", "consolidate", "report"])
@pytest.mark.parametrize("name", ["cli.py", "README.md"])
def test_a_file_that_is_not_a_snapshot_says_so(cmd, name, tmp_path, capsys):
    target = ROOT / ("rbank_torch/cli.py" if name == "cli.py" else name)
    extra = _extra(cmd, tmp_path)
    code, _, err = run(capsys, cmd, "--bank", target, *extra, "-q")
    assert code == 1
    assert "not an rbank snapshot" in err and "header length" not in err, err
    assert not target.with_name(target.name + ".lock").exists()  # no writer lock left beside a non-bank


def test_short_and_empty_files_are_not_snapshots(tmp_path, capsys):
    for data in (b"", b"12345678", b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]"):
        f = tmp_path / "x.safetensors"
        f.write_bytes(data)
        code, _, err = run(capsys, "stats", "--bank", f)
        assert code == 1 and "not an rbank snapshot" in err, (data, err)


def test_a_damaged_snapshot_is_still_called_corrupt(bank, tmp_path, capsys):
    raw = bank.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) // 3])
    code, _, err = run(capsys, "stats", "--bank", cut)
    assert code == 1 and "corrupt or truncated" in err


def test_ingest_backend_defaults_to_the_library_default(bank):
    parser = build_parser()
    args = parser.parse_args(["ingest", "x.jsonl", "--bank", "b"])
    assert args.backend == PatternStoreConfig().backend == "auto"
    assert ReasoningBank.load(bank).store.config.backend == PatternStoreConfig().backend
