"""Journal tail damage (torn vs corrupt: dropped bytes preserved and warned about) and the batch flusher."""

from __future__ import annotations

import gc
import os
import re
import threading
import time
import warnings

import pytest
import torch

from rbank_torch import ReasoningBank, ReasoningBankConfig, StepOutcome, Verdict
from rbank_torch.journal import _FILE_HDR, _HDR, Journal, JournalError, JournalTailWarning

D = 8
SIDECAR = re.compile(r"bank\.journal\.tail-\d{8}T\d{6}Z-\d+\.bad")


def _traj(bank, g):
    rec = bank.start_trajectory(torch.randn(D, generator=g))
    rec.add_step("search", "r", StepOutcome.success(), 0.9)
    rec.add_lesson("lesson")
    return rec.complete(Verdict.success())


def _cfg(tmp_path):
    return ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path))


def _bank_with(tmp_path, n, fsync="always"):
    bank = ReasoningBank(_cfg(tmp_path), journal=True, fsync=fsync)
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        bank.store_trajectory(_traj(bank, g))
    assert bank.journal.last_seq == n
    bank.close()
    return tmp_path / "bank.journal"


def _record_spans(blob: bytes) -> list[tuple[int, int]]:
    out, off = [], _FILE_HDR.size
    while off < len(blob):
        _m, _seq, length, _crc = _HDR.unpack(blob[off : off + _HDR.size])
        out.append((off, off + _HDR.size + length))
        off += _HDR.size + length
    return out


def _sidecars(folder):
    return sorted(p for p in folder.iterdir() if SIDECAR.fullmatch(p.name))


def _reopen_expecting(tmp_path, kind):
    with pytest.warns(JournalTailWarning) as rec:
        bank = ReasoningBank(_cfg(tmp_path), journal=True)
    ws = [w.message for w in rec if isinstance(w.message, JournalTailWarning)]
    assert len(ws) == 1
    w = ws[0]
    assert w.kind == kind and f"dropped a {kind} tail of {w.nbytes} bytes" in str(w)
    assert str(w.preserved) in str(w) and f"at byte {w.offset}" in str(w) and f"{w.nbytes} bytes" in str(w)
    j = bank.journal
    assert j.records_dropped == 1 and j.tail_kind == kind
    assert j.dropped_tail_path == w.preserved and j.dropped_tail_offset == w.offset
    assert j.dropped_tail_bytes == w.nbytes
    return bank, w


def _append_and_reopen_cleanly(tmp_path, bank, n_expected):
    bank.store_trajectory(_traj(bank, torch.Generator().manual_seed(99)))
    bank.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", JournalTailWarning)
        again = ReasoningBank(_cfg(tmp_path), journal=True)
    assert len(again.trajectories) == n_expected and again.journal.records_dropped == 0
    assert again.journal.tail_kind is None and again.journal.dropped_tail_path is None
    again.close()


# ---------------------------------------------------------------------------------------------- tail damage
def test_bit_flip_in_last_record_is_corrupt_tail_preserved_and_warned(tmp_path):
    """The review's case: 3 fsynced records, one byte flipped inside the last one's payload."""
    path = _bank_with(tmp_path, 3)
    blob = path.read_bytes()
    start, end = _record_spans(blob)[-1]
    assert end == len(blob)
    bad = bytearray(blob)
    bad[start + _HDR.size + (end - start - _HDR.size) // 2] ^= 0x01
    path.write_bytes(bytes(bad))

    bank, w = _reopen_expecting(tmp_path, "corrupt")
    assert "checksum mismatch" in w.reason and "does not check out" in str(w)
    assert len(bank.trajectories) == 2
    assert w.offset == start and w.nbytes == len(blob) - start
    assert path.stat().st_size == start
    # the dropped bytes are preserved byte for byte, next to the journal
    (side,) = _sidecars(tmp_path)
    assert side == w.preserved and side.read_bytes() == bytes(bad[start:])
    assert path.read_bytes() == bytes(bad[:start])
    _append_and_reopen_cleanly(tmp_path, bank, 3)
    assert _sidecars(tmp_path) == [side]


def test_bad_magic_or_seq_in_complete_last_record_is_corrupt(tmp_path):
    path = _bank_with(tmp_path, 3)
    blob = path.read_bytes()
    start, _end = _record_spans(blob)[-1]
    bad = bytearray(blob)
    bad[start] ^= 0x20  # record magic
    path.write_bytes(bytes(bad))
    bank, w = _reopen_expecting(tmp_path, "corrupt")
    assert "magic" in w.reason and len(bank.trajectories) == 2
    assert w.preserved.read_bytes() == bytes(bad[start:])
    bank.close()


@pytest.mark.parametrize("into", [3, _HDR.size - 1, _HDR.size, _HDR.size + 40, -1])
def test_torn_tail_is_preserved_and_warned(tmp_path, into):
    path = _bank_with(tmp_path, 3)
    blob = path.read_bytes()
    start, end = _record_spans(blob)[-1]
    cut = end - 1 if into == -1 else start + into
    path.write_bytes(blob[:cut])
    bank, w = _reopen_expecting(tmp_path, "torn")
    assert "torn" in str(w) and w.offset == start and w.nbytes == cut - start
    assert ("short record header" in w.reason) == (into < _HDR.size and into != -1)
    assert len(bank.trajectories) == 2 and path.stat().st_size == start
    assert w.preserved.read_bytes() == blob[start:cut]
    _append_and_reopen_cleanly(tmp_path, bank, 3)


@pytest.mark.parametrize("shape", ["appended", "replacing_last", "short"])
def test_zero_filled_tail_is_torn(tmp_path, shape):
    """What a machine crash can leave when the size reached the disk before the data."""
    path = _bank_with(tmp_path, 3)
    blob = path.read_bytes()
    start, end = _record_spans(blob)[-1]
    if shape == "appended":
        data, keep, n_left = blob + b"\0" * 4096, len(blob), 3
    elif shape == "replacing_last":
        data, keep, n_left = blob[:start] + b"\0" * (end - start), start, 2
    else:
        data, keep, n_left = blob + b"\0" * 7, len(blob), 3
    path.write_bytes(data)
    bank, w = _reopen_expecting(tmp_path, "torn")
    assert "zero-filled" in w.reason
    assert w.offset == keep and w.nbytes == len(data) - keep
    assert w.preserved.read_bytes() == data[keep:]
    assert len(bank.trajectories) == n_left and path.stat().st_size == keep
    _append_and_reopen_cleanly(tmp_path, bank, n_left + 1)


def test_complete_bad_record_followed_by_data_raises_and_keeps_the_file(tmp_path):
    path = _bank_with(tmp_path, 3)
    blob = path.read_bytes()
    spans = _record_spans(blob)
    # a complete bad record in the middle
    s, e = spans[1]
    bad = bytearray(blob)
    bad[(s + e) // 2] ^= 0x01
    path.write_bytes(bytes(bad))
    with pytest.raises(JournalError, match="corrupt journal"):
        ReasoningBank(_cfg(tmp_path), journal=True)
    assert path.read_bytes() == bytes(bad) and not _sidecars(tmp_path)
    # a complete bad final record followed by some garbage: not a torn write either
    s, e = spans[-1]
    bad = bytearray(blob)
    bad[(s + e) // 2] ^= 0x01
    bad += b"garbage"
    path.write_bytes(bytes(bad))
    with pytest.raises(JournalError, match="corrupt journal"):
        ReasoningBank(_cfg(tmp_path), journal=True)
    assert path.read_bytes() == bytes(bad) and not _sidecars(tmp_path)
    # a length field that now runs past the end while an intact record follows: raises as well
    s, _e = spans[1]
    bad = bytearray(blob)
    bad[s + 12 + 3] = 0x7F  # high byte of the u32 length
    path.write_bytes(bytes(bad))
    with pytest.raises(JournalError, match="corrupt journal"):
        ReasoningBank(_cfg(tmp_path), journal=True)
    assert not _sidecars(tmp_path)


def test_tail_warning_from_journal_directly_and_unique_sidecars(tmp_path):
    path = _bank_with(tmp_path, 2)
    blob = path.read_bytes()
    start, _end = _record_spans(blob)[-1]
    for i in range(3):
        path.write_bytes(blob[: start + 5 + i])
        with pytest.warns(JournalTailWarning, match=r"dropped a torn tail of \d+ bytes at byte \d+"):
            j = Journal(path)
        assert j.tail_kind == "torn" and j.last_seq == 1
        j.close()
    sides = _sidecars(tmp_path)
    assert len(sides) == 3
    assert sorted(s.read_bytes() for s in sides) == sorted(blob[start : start + 5 + i] for i in range(3))
    # an intact journal: no warning, nothing dropped
    path.write_bytes(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        j = Journal(path)
    assert j.records_dropped == 0 and j.tail_kind is None and j.dropped_tail_bytes == 0
    j.close()


def test_unpreservable_tail_is_left_untouched(tmp_path, monkeypatch):
    """Never destroy bytes: when the copy cannot be written, the journal is not truncated."""
    from rbank_torch import snapshot

    path = _bank_with(tmp_path, 2)
    blob = path.read_bytes()
    path.write_bytes(blob[:-3])

    def fail(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshot, "atomic_write_bytes", fail)
    with pytest.raises(JournalError, match="could not be preserved"):
        Journal(path)
    assert path.read_bytes() == blob[:-3]


# ---------------------------------------------------------------------------------------------- batch flusher
def _flushers(j=None):
    name = None if j is None else f"rbank-journal-flusher:{j.path.name}"
    return [t for t in threading.enumerate() if t.name.startswith("rbank-journal-flusher") and
            (name is None or t.name == name)]


@pytest.fixture
def fsync_calls(monkeypatch):
    calls: list[int] = []
    real = os.fsync

    def counting(fd):
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def _wait_for(cond, timeout=10.0):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.005)
    return True


def test_batch_records_are_fsynced_when_appends_stop(tmp_path, fsync_calls):
    j = Journal(tmp_path / "b.journal", fsync="batch", batch_interval_s=1.0)  # wide: robust on a busy machine
    fd = j._f.fileno()
    j.sync()
    n0 = fsync_calls.count(fd)
    t0 = time.monotonic()
    for i in range(3):
        j.append({"i": i})
    assert j._unsynced == 3 and fsync_calls.count(fd) == n0  # nothing synced inline within the window
    flusher = j._flusher
    assert flusher is not None and flusher.is_alive() and flusher.daemon
    assert _wait_for(lambda: j._unsynced == 0, timeout=10.0)
    assert time.monotonic() - t0 >= 0.99  # not before the window ends ...
    assert fsync_calls.count(fd) == n0 + 1  # ... and then one fsync of the journal's file
    j.close()
    assert not flusher.is_alive() and not _flushers(j)


def test_batch_default_window_bounded_without_further_appends(tmp_path, fsync_calls):
    bank = ReasoningBank(_cfg(tmp_path), journal=True, fsync="batch")
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        bank.store_trajectory(_traj(bank, g))
    j = bank.journal
    fd = j._f.fileno()
    assert _wait_for(lambda: j._unsynced == 0, timeout=10.0)  # no further append needed
    assert fd in fsync_calls
    flusher = j._flusher
    assert flusher is not None and flusher.is_alive()
    bank.close()
    assert not flusher.is_alive() and j._flusher is None and not _flushers(j)


def test_one_flusher_thread_per_journal_not_per_append(tmp_path):
    j = Journal(tmp_path / "c.journal", fsync="batch")
    before = threading.active_count()
    first = None
    for i in range(300):
        j.append({"i": i})
        if j._flusher is not None:
            first = first or j._flusher
            assert j._flusher is first
        if i % 50 == 0:
            time.sleep(0.06)  # let the flusher sync and go idle in between
    assert first is not None and len(_flushers(j)) == 1
    assert threading.active_count() <= before + 1
    assert _wait_for(lambda: j._unsynced == 0)
    j.close()
    assert not first.is_alive()


def test_flusher_never_started_for_always_or_off(tmp_path):
    for mode in ("always", "off"):
        j = Journal(tmp_path / f"{mode}.journal", fsync=mode)
        for i in range(5):
            j.append({"i": i})
        assert j._flusher is None and not _flushers(j)
        j.close()


def test_flusher_ends_when_journal_is_dropped_without_close(tmp_path):
    j = Journal(tmp_path / "d.journal", fsync="batch", batch_interval_s=0.02)
    j.sync()
    j.append({"x": 1})
    flusher = j._flusher
    assert flusher is not None
    t0 = time.monotonic()
    while j._unsynced and time.monotonic() - t0 < 10:
        time.sleep(0.005)
    assert j._unsynced == 0
    del j
    gc.collect()
    flusher.join(timeout=5)
    assert not flusher.is_alive()


def test_batch_concurrent_appends_resets_and_close(tmp_path):
    j = Journal(tmp_path / "e.journal", fsync="batch", batch_interval_s=0.01)
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(k):
        try:
            for i in range(150):
                j.append({"k": k, "i": i})
                if i % 40 == 0:
                    time.sleep(0.02)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def compactor():
        try:
            while not stop.is_set():
                j.reset(j.last_seq)
                sum(1 for _ in j.records())
                time.sleep(0.015)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ws = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    c = threading.Thread(target=compactor)
    for t in [*ws, c]:
        t.start()
    for t in ws:
        t.join()
    stop.set()
    c.join()
    assert not errors, errors
    assert j.last_seq >= 600
    assert _wait_for(lambda: j._unsynced == 0)
    flusher = j._flusher
    j.close()
    assert flusher is None or not flusher.is_alive()
    again = Journal(tmp_path / "e.journal", fsync="batch")
    seqs = [s for s, _m, _t in again.records()]
    assert seqs == sorted(seqs) and (not seqs or seqs[-1] == j.last_seq)
    again.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_with_a_running_flusher(tmp_path):
    """A child forked while the flusher runs gets working locks and starts its own flusher when needed."""
    parent = Journal(tmp_path / "f.journal", fsync="batch", batch_interval_s=0.02)
    parent.sync()
    parent.append({"who": "parent"})
    assert parent._flusher is not None
    child_j = tmp_path / "child.journal"
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            ok = parent._flusher is None  # the parent's thread does not exist here
            cj = Journal(child_j, fsync="batch", batch_interval_s=0.02)
            cj.sync()
            cj.append({"who": "child"})
            ok = ok and _wait_for(lambda: cj._unsynced == 0, 5.0)
            cj.close()
            code = 0 if ok else 2
        finally:
            os._exit(code)
    t0 = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - t0 > 20:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("forked child hung (a journal lock held across fork?)")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _wait_for(lambda: parent._unsynced == 0)
    parent.close()
    assert not _flushers(parent)
