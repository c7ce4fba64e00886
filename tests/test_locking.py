"""One writer per bank, a bank identity checked on replay, storage paths resolved once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rbank_torch import ReasoningBank, ReasoningBankConfig, StepOutcome, Verdict
from rbank_torch.journal import JournalError
from rbank_torch.locking import BankLock, BankLockedError

D = 4


def _cfg(folder) -> ReasoningBankConfig:
    return ReasoningBankConfig(embedding_dim=D, storage_path=str(folder))


def _store(bank: ReasoningBank, n: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        rec = bank.start_trajectory(torch.randn(D, generator=g))
        rec.add_step("search", "r", StepOutcome.success(), 0.9)
        bank.store_trajectory(rec.complete(Verdict.success()))


def test_second_writer_in_the_same_process_is_refused(tmp_path):
    a = ReasoningBank(_cfg(tmp_path), journal=True)
    _store(a, 2)
    with pytest.raises(BankLockedError, match="another writer holds this bank"):
        ReasoningBank(_cfg(tmp_path), journal=True)
    a.save()
    with pytest.raises(BankLockedError):
        ReasoningBank.load(str(tmp_path / "bank.safetensors"), journal=True)
    # a read-only open (no journal) works while the writer holds the bank
    assert len(ReasoningBank.load(str(tmp_path / "bank.safetensors")).trajectories) == 2
    _store(a, 1, seed=1)
    a.close()
    b = ReasoningBank.load(str(tmp_path / "bank.safetensors"), journal=True)
    assert len(b.trajectories) == 3  # the snapshot and the record written after it
    b.close()


def test_a_dropped_bank_lets_go_of_its_lock(tmp_path):
    a = ReasoningBank(_cfg(tmp_path), journal=True)
    _store(a, 1)
    del a  # as a crashed process would: no close()
    b = ReasoningBank(_cfg(tmp_path), journal=True)
    assert len(b.trajectories) == 1
    b.close()


_HOLDER = r"""
import sys, torch
from rbank_torch import ReasoningBank, ReasoningBankConfig
bank = ReasoningBank(ReasoningBankConfig(embedding_dim=4, storage_path=sys.argv[1]), journal=True)
print("ready", flush=True)
sys.stdin.readline()
bank.close()
print("closed", flush=True)
sys.stdin.readline()
"""


def test_second_writer_in_another_process_gets_an_error_or_waits(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == "ready"
        with pytest.raises(BankLockedError):
            ReasoningBank(_cfg(tmp_path), journal=True)
        p.stdin.write("\n")
        p.stdin.flush()
        b = ReasoningBank(_cfg(tmp_path), journal=True, lock_timeout=120)  # waits for the other to close
        assert p.stdout.readline().strip() == "closed"
        b.close()
    finally:
        p.kill()
        p.wait()


def test_lock_timeout_is_validated(tmp_path):
    with pytest.raises(ValueError, match="lock_timeout"):
        BankLock(tmp_path / "x", timeout=-1)
    with pytest.raises(ValueError, match="lock_timeout"):
        ReasoningBank(_cfg(tmp_path), journal=True, lock_timeout=float("nan"))


def test_a_journal_of_another_bank_is_not_replayed(tmp_path):
    a = ReasoningBank(_cfg(tmp_path / "a"), journal=True)
    _store(a, 2)
    a.save()
    a.close()
    b = ReasoningBank(_cfg(tmp_path / "b"), journal=True)
    _store(b, 3, seed=5)
    b.close()
    # a's snapshot with b's journal (copied over a's): refused, nothing replayed
    (tmp_path / "a" / "bank.journal").write_bytes((tmp_path / "b" / "bank.journal").read_bytes())
    with pytest.raises(JournalError, match="belongs to bank"):
        ReasoningBank.load(str(tmp_path / "a" / "bank.safetensors"), journal=True)
    # and through an explicit path
    with pytest.raises(JournalError, match="belongs to bank"):
        ReasoningBank.load(str(tmp_path / "a" / "bank.safetensors"), journal=tmp_path / "b" / "bank.journal")


def test_identity_survives_save_and_reload(tmp_path):
    a = ReasoningBank(_cfg(tmp_path), journal=True)
    _store(a, 1)
    a.save()
    ident = a._bank_id
    a.close()
    b = ReasoningBank.load(str(tmp_path / "bank.safetensors"), journal=True)
    assert b._bank_id == ident and b.journal.bank_id == ident
    b.close()


def test_relative_storage_path_is_resolved_once(tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    monkeypatch.chdir(one)
    bank = ReasoningBank(ReasoningBankConfig(embedding_dim=D, storage_path="rel"), journal=True)
    _store(bank, 7)
    bank.save()
    _store(bank, 3, seed=1)
    monkeypatch.chdir(two)  # the working folder changes under a live bank
    _store(bank, 2, seed=2)
    bank.save()
    _store(bank, 5, seed=3)
    bank.close()
    assert not (two / "rel").exists()
    # opened from another working folder: the same journal, every acknowledged trajectory
    again = ReasoningBank.load(str(one / "rel" / "bank.safetensors"), journal=True)
    assert len(again.trajectories) == 17 and again.replayed_records == 5
    again.close()


_LOG_LINE = {"query_embedding": [0.1, 0.2, 0.3, 0.4],
             "steps": [{"action": "search", "outcome": "success", "confidence": 0.9}], "verdict": "success"}


def test_two_ingests_into_one_bank_keep_every_trajectory(tmp_path):
    logs = []
    for k in range(2):
        f = tmp_path / f"log{k}.jsonl"
        rows = []
        for i in range(150):
            r = dict(_LOG_LINE, query_embedding=[float(k), float(i), 1.0, 2.0])
            rows.append(json.dumps(r))
        f.write_text("\n".join(rows) + "\n")
        logs.append(f)
    bank = tmp_path / "bank.safetensors"
    # the first ingest creates the bank; then two run at once
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "rbank_torch", "ingest", "--quiet", "--bank", str(bank)]
    r = subprocess.run(cmd + [str(logs[0])], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    procs = [subprocess.Popen(cmd + [str(f)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for f in logs]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert ReasoningBank.load(str(bank)).stats().total_trajectories == 450


def test_a_store_kept_after_its_bank_is_dropped_still_works(tmp_path):
    from rbank_torch import Pattern

    a = ReasoningBank(_cfg(tmp_path), journal=True)
    _store(a, 1)
    store = a.store
    del a
    pid = store.store_pattern(Pattern.new(torch.randn(D), "general", 0.9))
    assert store.get_pattern(pid) is not None and len(store) == 2
    b = ReasoningBank(_cfg(tmp_path), journal=True)  # the dropped bank's lock was released
    assert len(b.trajectories) == 1
    b.close()


def test_read_only_open_replays_the_journal_without_the_lock(tmp_path):
    from rbank_torch.journal import JournalWriteError

    w = ReasoningBank(_cfg(tmp_path), journal=True)
    _store(w, 3)
    w.save()
    _store(w, 2, seed=1)  # in the journal only
    path = tmp_path / "bank.journal"
    size = path.stat().st_size
    with open(path, "ab") as f:  # a record the writer has not finished yet
        f.write(b"RJ\x00\x00\x09")
    r = ReasoningBank.load(str(tmp_path / "bank.safetensors"), journal=True, read_only=True)
    assert len(r.trajectories) == 5 and r.replayed_records == 2
    with pytest.raises(JournalWriteError, match="read-only"):
        _store(r, 1)
    with pytest.raises(JournalWriteError, match="read-only"):
        r.save()
    with pytest.raises(JournalWriteError, match="read-only"):
        r.store.remove_pattern(r.export_patterns()[0].id)
    assert len(r.trajectories) == 5
    r.close()
    assert path.stat().st_size == size + 5  # the reader touched nothing
    with open(path, "r+b") as f:
        f.truncate(size)
    _store(w, 1, seed=2)  # the writer goes on
    w.close()
    assert len(ReasoningBank.load(str(tmp_path / "bank.safetensors"), journal=True).trajectories) == 6
