"""The documentation runs as written.

Every ```python block of README.md and docs/*.md is executed, top to bottom, all blocks of one file
in one namespace (a later block may use what an earlier one defined), in a temporary working
directory. Nothing is injected: a block that uses a name must define it, or an earlier block of the
same file must. The outputs the README shows beside its `rbank` commands are checked against what
the commands print (tests/test_readme_outputs.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block of ``path``."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def test_every_doc_file_is_collected():
    names = {p.name for p in DOCS}
    assert "README.md" in names and len(names) >= 8
    assert sum(len(python_blocks(p)) for p in DOCS) >= 10


@pytest.mark.parametrize("path", [p for p in DOCS if python_blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run(path: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict[str, object] = {"__name__": "__doc__"}
    for line, code in python_blocks(path):
        compiled = compile(code, f"{path.name}:{line}", "exec")
        try:
            exec(compiled, namespace)
        except Exception as e:  # noqa: BLE001 - name the block that failed
            raise AssertionError(f"{path.relative_to(ROOT)} block at line {line} failed: "
                                 f"{type(e).__name__}: {e}") from e


def test_every_exception_the_docs_name_is_exported():
    import builtins

    import rbank_torch

    named: set[str] = set()
    for p in DOCS:
        named |= set(re.findall(r"\b([A-Z][A-Za-z0-9]*(?:Error|Warning))\b", p.read_text(encoding="utf-8")))
    ours = {n for n in named if not hasattr(builtins, n)}
    assert "DistillationError" in ours
    missing = sorted(n for n in ours if n not in rbank_torch.__all__)
    # names of other libraries, and ReasoningError: a root-cause kind of the log format, not an exception
    foreign = {"SafetensorError", "ReasoningError"}
    assert set(missing) <= foreign, f"named in the docs but not exported from rbank_torch: {missing}"
    for n in ours - foreign:
        assert issubclass(getattr(rbank_torch, n), (Exception, Warning))
