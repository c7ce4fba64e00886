"""The outputs README.md shows beside its commands are what the commands print.

A ```text block preceded by ``<!-- output of: COMMAND -->`` is an excerpt of COMMAND's output: the
test runs the README's bash commands of "From logs to lessons" in order (in a temporary folder with the
examples beside it) and checks that the block's lines appear, consecutively, in what COMMAND printed.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from rbank_torch.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
_SHOWN = re.compile(r"<!-- output of: (.+?) -->\s*\n```text\n(.*?)^```", re.S | re.M)


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 3)
    return README[start:] if end < 0 else README[start:end]


def _commands(section: str) -> list[list[str]]:
    block = re.search(r"```bash\n(.*?)^```", section, re.S | re.M)
    assert block, "no bash block"
    out = []
    for line in block.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(shlex.split(line))
    return out


def _norm(text: str) -> list[str]:
    # pattern ids come from a process-wide counter: a command run after other tests prints other ids
    return [re.sub(r"\(id \d+\)", "(id …)", " ".join(x.split())) for x in text.splitlines() if x.strip()]


def test_readme_shows_outputs_of_its_commands():
    shown = _SHOWN.findall(_section("From logs to lessons"))
    assert len(shown) >= 2
    commands = [" ".join(c) for c in _commands(_section("From logs to lessons"))]
    for cmd, _ in shown:
        assert " ".join(shlex.split(cmd)) in commands, f"{cmd!r} is not among the section's commands"


@pytest.mark.slow
def test_readme_outputs_match(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    section = _section("From logs to lessons")
    shown = {" ".join(shlex.split(cmd)): body for cmd, body in _SHOWN.findall(section)}
    printed: dict[str, str] = {}
    for argv in _commands(section):
        assert argv[0] == "rbank"
        key = " ".join(argv)
        code = main(argv[1:] + (["-q"] if key in shown else []))
        out = capsys.readouterr().out
        assert code == 0, key
        printed[key] = out
    for key, body in shown.items():
        want, got = _norm(body), _norm(printed[key])
        assert want, key
        starts = [i for i, line in enumerate(got) if line == want[0]]
        assert any(got[i:i + len(want)] == want for i in starts), (
            f"README shows for `{key}`:\n{body}\nbut it printed:\n{printed[key]}")
