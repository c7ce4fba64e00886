"""Snapshots and journals are written only over regular files: device nodes, FIFOs, sockets and folders are
refused with a clear error and left as they are; a symlink is followed and its target written."""

from __future__ import annotations

import os
import socket
import stat

import pytest
import torch

from rbank_torch import ReasoningBank, ReasoningBankConfig, StepOutcome, Verdict
from rbank_torch._fsio import NotARegularFileError
from rbank_torch.ewc import EWCPlusPlus

D = 4


def _bank(folder, **kw) -> ReasoningBank:
    bank = ReasoningBank(ReasoningBankConfig(embedding_dim=D, storage_path=str(folder)), **kw)
    rec = bank.start_trajectory(torch.randn(D))
    rec.add_step("search", "r", StepOutcome.success(), 0.9)
    bank.store_trajectory(rec.complete(Verdict.success()))
    return bank


def _specials(tmp_path):
    out = {}
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out["fifo"] = fifo
    folder = tmp_path / "folder"
    folder.mkdir()
    out["folder"] = folder
    sock_path = tmp_path / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    out["socket"] = sock_path
    dev = tmp_path / "null"
    try:  # a node like /dev/null, made here (never the real one)
        os.mknod(dev, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        out["device"] = dev
    except (PermissionError, OSError):
        pass
    return out, s


def _kind(p) -> int:
    return stat.S_IFMT(os.lstat(p).st_mode)


def test_save_refuses_targets_that_are_not_regular_files(tmp_path):
    bank = _bank(tmp_path / "b")
    specials, sock = _specials(tmp_path)
    try:
        for name, p in specials.items():
            before = _kind(p)
            with pytest.raises(NotARegularFileError, match="not a regular file|it is a"):
                bank.save(str(p))
            assert _kind(p) == before, name  # left as it was
            link = tmp_path / f"link-to-{name}"
            link.symlink_to(p)
            with pytest.raises(NotARegularFileError):
                bank.save(str(link))
            assert _kind(p) == before and link.is_symlink()
    finally:
        sock.close()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_journal_refuses_targets_that_are_not_regular_files(tmp_path):
    specials, sock = _specials(tmp_path)
    try:
        for name, p in specials.items():
            before = _kind(p)
            with pytest.raises(NotARegularFileError):
                _bank(tmp_path / "b", journal=p)
            assert _kind(p) == before, name
    finally:
        sock.close()


def test_ewc_save_refuses_a_fifo(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    ewc = EWCPlusPlus(torch.nn.Linear(2, 2))
    with pytest.raises(NotARegularFileError):
        ewc.save(str(fifo))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_save_and_journal_write_through_a_symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "bank.safetensors").write_bytes(b"old")
    link = tmp_path / "bank-link.safetensors"
    link.symlink_to(real / "bank.safetensors")
    jlink = tmp_path / "journal-link"
    jlink.symlink_to(real / "bank.journal")  # dangling: the journal is created at the target
    bank = _bank(tmp_path / "b", journal=jlink)
    bank.save(str(link))
    bank.close()
    assert link.is_symlink() and jlink.is_symlink()  # the links stay links
    assert (real / "bank.journal").is_file() and not (real / "bank.journal").is_symlink()
    loaded = ReasoningBank.load(str(real / "bank.safetensors"), journal=jlink)
    assert len(loaded.trajectories) == 1
    loaded.close()
