"""Temp files of killed writers: kept while their writer lives, removed by the next successful write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from rbank_torch.ewc import EWCPlusPlus
from rbank_torch.snapshot import _host_tag, atomic_write_bytes, remove_stale_temps


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_only_dead_local_writers_temps_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "bank.safetensors"
    host = _host_tag()
    dead = tmp_path / f".bank.safetensors.{host}-{_dead_pid()}.x1y2.tmp"
    mine = tmp_path / f".bank.safetensors.{host}-{os.getpid()}.abcd.tmp"  # another thread of this process
    live = tmp_path / f".bank.safetensors.{host}-{os.getppid()}.efgh.tmp"  # a live writer
    foreign = tmp_path / f".bank.safetensors.otherhost-{_dead_pid()}.ijkl.tmp"  # shared folder, other host
    other_file = tmp_path / f".other.safetensors.{host}-{_dead_pid()}.mnop.tmp"  # another target's temp
    unrelated = tmp_path / "notes.tmp"
    for p in (dead, mine, live, foreign, other_file, unrelated):
        p.write_bytes(b"partial")
    atomic_write_bytes(target, lambda f: f.write(b"complete"))
    assert target.read_bytes() == b"complete"
    assert not dead.exists()
    assert all(p.exists() for p in (mine, live, foreign, other_file, unrelated))
    assert remove_stale_temps(target) == []  # nothing left to remove


def test_writer_killed_mid_write_leaves_target_intact_and_temp_is_cleaned(tmp_path: Path) -> None:
    target = tmp_path / "ewc.safetensors"
    atomic_write_bytes(target, lambda f: f.write(b"old"))
    script = textwrap.dedent(
        f"""
        import sys, time
        from rbank_torch.snapshot import atomic_write_bytes
        def writer(f):
            f.write(b"half of the new content")
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        atomic_write_bytes({str(target)!r}, writer)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "writing"
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    left = [q for q in tmp_path.iterdir() if q.name.endswith(".tmp")]
    assert len(left) == 1 and f"-{p.pid}." in left[0].name  # the killed writer's temp file
    assert target.read_bytes() == b"old"  # never half-written

    # the next successful save of the same path (here an EWC++ state) removes it
    model = torch.nn.Linear(3, 2)
    ewc = EWCPlusPlus(model, lambda_=7.0)
    model(torch.randn(4, 3)).square().sum().backward()
    ewc.update_fisher()
    ewc.save(target)
    assert [q.name for q in tmp_path.iterdir()] == [target.name]
    back = EWCPlusPlus(model, lambda_=7.0)
    back.load(target)
    for k, v in ewc.fisher.items():
        assert torch.equal(back.fisher[k], v) and float(v.abs().sum()) > 0


def test_written_files_get_umask_permissions_or_keep_the_old_ones(tmp_path: Path) -> None:
    target = tmp_path / "bank.safetensors"
    old = os.umask(0o027)
    try:
        atomic_write_bytes(target, lambda f: f.write(b"a"))
    finally:
        os.umask(old)
    assert (target.stat().st_mode & 0o777) == 0o640  # 0o666 & ~0o027, not the temp file's 0o600
    os.chmod(target, 0o604)
    atomic_write_bytes(target, lambda f: f.write(b"b"))
    assert (target.stat().st_mode & 0o777) == 0o604 and target.read_bytes() == b"b"  # replacing keeps the mode
