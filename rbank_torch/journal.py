"""An append-only write-ahead journal of acknowledged bank mutations.

File layout::

    b"RBJ2"  u64 base_seq  16 bytes bank_id  u32 crc32
                                             file magic; the sequence number the file continues from; the
                                             identity of the bank the records belong to (all zero: none);
                                             CRC32 of the 28 bytes before it. Files of the older ``b"RBJ1"``
                                             layout (magic and base_seq only) are read too.
    record*                                  records, each:
        b"RJ"  u16 0                         record magic + reserved
        u64 seq                              sequence number (strictly increasing)
        u32 length                           payload length
        u32 crc32                            CRC32 of seq, length and payload
        payload                              a safetensors blob (tensors + JSON metadata)

The payload is parsed by safetensors (a JSON header and raw little-endian buffers): nothing in a journal is
unpickled or executed.

Damage at the end of the file. On open, the records are checked in order; at the first bad one:

- **torn** (what a write interrupted by a crash leaves): fewer bytes than a record header remain, the
  header's declared length runs past the end of the file, or every byte from the record's start to the end
  of the file is zero (a zero-filled tail). It is dropped unless an intact record follows it (then the
  length field itself is damaged: :class:`JournalError`).
- **corrupt**: a complete record (its declared length fits in the file) whose checksum fails (or whose
  magic or sequence number is wrong) and that ends exactly at the end of the file. A killed process cannot
  leave this, but it is the final record, so it is dropped too, with an explicit warning.
- a complete bad record followed by more bytes is corruption in the middle of the file and raises
  :class:`JournalError`; nothing is dropped.

A dropped tail is never destroyed: its bytes are first copied, atomically and fsynced, to a sibling file
``<journal>.tail-<UTC time>-<n>.bad``, then the journal is truncated to the last intact record and a
:class:`JournalTailWarning` names the copy, the offset, the byte count and the kind. The outcome is kept in
:attr:`Journal.records_dropped`, :attr:`Journal.tail_kind`, :attr:`Journal.dropped_tail_path`,
:attr:`Journal.dropped_tail_offset` and :attr:`Journal.dropped_tail_bytes`.

fsync policies: ``"always"`` fsyncs every record before the mutation is acknowledged; ``"batch"`` fsyncs
inside ``append`` every ``batch_records`` records or once ``batch_interval_s`` seconds have passed since
the last fsync, and a background flusher thread (one per journal, started by the first append that leaves
a record unsynced, stopped by :meth:`Journal.close`) fsyncs records still unsynced
``batch_interval_s`` after the last fsync, so no record stays unsynced much longer than
``batch_interval_s`` when appends stop; ``"off"`` never fsyncs (only :meth:`Journal.sync` does). Every
record is written to the operating system before the call returns, so a killed *process* loses nothing in
any mode; the policy decides what survives a crash of the *machine*. ``close()`` fsyncs (except with
``"off"``).
"""

from __future__ import annotations

import os
import struct
import threading
import time
import warnings
import weakref
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Journal",
    "JournalError",
    "JournalWriteError",
    "JournalTailWarning",
    "FSYNC_POLICIES",
    "encode_payload",
    "decode_payload",
]

FILE_MAGIC = b"RBJ2"
_FILE_HDR = struct.Struct("<4sQ16sI")
_FILE_HDR_BODY = struct.Struct("<4sQ16s")
_OLD_MAGIC = b"RBJ1"
_OLD_FILE_HDR = struct.Struct("<4sQ")
REC_MAGIC = b"RJ\x00\x00"
_HDR = struct.Struct("<4sQII")  # magic, seq, length, crc
FSYNC_POLICIES = ("always", "batch", "off")
#: a record longer than this is refused (bounded memory on hostile files)
MAX_RECORD_BYTES = 1 << 31
#: chunk size for scanning and copying a damaged tail (bounded memory)
_CHUNK = 1 << 20
#: how long an idle batch flusher sleeps before it checks whether its journal still exists
_FLUSHER_IDLE_S = 1.0


class JournalError(ValueError):
    """A journal file is corrupt (not just torn at its end) or foreign."""


class JournalWriteError(OSError):
    """A journal (or the bank on it) refuses writes: an earlier write, fsync or truncate of it failed.

    The failed record was cut off the file (truncated back to the last intact record) where the file system
    allowed; where it did not, the next open drops it as a torn tail. Either way the file opens and holds
    every acknowledged record. Writes resume after :meth:`Journal.reset` (``ReasoningBank.save()``) or a
    reopen.
    """


def _pack_file_header(base_seq: int, bank_id: str | None) -> bytes:
    raw = bytes.fromhex(bank_id) if bank_id else bytes(16)
    body = _FILE_HDR_BODY.pack(FILE_MAGIC, base_seq, raw)
    return body + struct.pack("<I", zlib.crc32(body))


def read_file_header(path: str | os.PathLike) -> tuple[int, str | None, int]:
    """``(base_seq, bank_id or None, header size)`` of a journal file; :class:`JournalError` when foreign."""
    with open(path, "rb") as f:
        hdr = f.read(_FILE_HDR.size)
    if hdr[:4] == FILE_MAGIC and len(hdr) == _FILE_HDR.size:
        _m, base, raw, crc = _FILE_HDR.unpack(hdr)
        if zlib.crc32(hdr[: _FILE_HDR_BODY.size]) != crc:
            raise JournalError(f"{path}: corrupt journal file header (checksum mismatch)")
        return base, (raw.hex() if any(raw) else None), _FILE_HDR.size
    if hdr[:4] == _OLD_MAGIC and len(hdr) >= _OLD_FILE_HDR.size:
        return _OLD_FILE_HDR.unpack(hdr[: _OLD_FILE_HDR.size])[1], None, _OLD_FILE_HDR.size
    raise JournalError(f"{path}: not an rbank_torch journal (bad file header)")


class JournalTailWarning(RuntimeWarning):
    """A damaged tail was dropped from a journal when it was opened (its bytes were preserved).

    Attributes:
        journal: the journal file.
        offset: byte offset of the dropped tail (the end of the last intact record).
        nbytes: how many bytes were dropped.
        kind: ``"torn"`` (an interrupted write: a short header, a record running past the end of the
            file, or a zero-filled tail) or ``"corrupt"`` (a complete final record whose checksum fails).
        reason: what exactly was wrong.
        preserved: the sibling file holding the dropped bytes.
    """

    def __init__(
        self, message: str, *, journal: Path, offset: int, nbytes: int, kind: str, reason: str, preserved: Path
    ) -> None:
        super().__init__(message)
        self.journal = journal
        self.offset = offset
        self.nbytes = nbytes
        self.kind = kind
        self.reason = reason
        self.preserved = preserved


@dataclass(frozen=True)
class _Tail:
    offset: int
    kind: str  # "torn" | "corrupt"
    reason: str


def encode_payload(meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """Serialise one record: ``meta`` (JSON-able) and tensors, as a safetensors blob."""
    import json

    from safetensors.torch import save

    t = {k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()}
    if not t:
        t = {"_": torch.zeros(0, dtype=torch.uint8)}
    return save(t, metadata={"rbank.record": json.dumps(meta, ensure_ascii=False, allow_nan=False)})


def decode_payload(blob: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Inverse of :func:`encode_payload`; raises :class:`JournalError` on malformed data."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(blob)
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + n])
        meta = json.loads(header["__metadata__"]["rbank.record"])
    except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as e:
        # RuntimeError includes RecursionError (JSON nested too deeply)
        raise JournalError(f"malformed journal record ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise JournalError("malformed journal record (metadata is not an object)")
    tensors.pop("_", None)
    return meta, tensors


def _crc(seq: int, length: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<QI", seq, length)))


# ---------------------------------------------------------------------- fork safety
# Every open journal, so that a fork never happens while one of its locks is held (by the batch flusher
# or another thread in the middle of a write): the locks are taken before the fork and released after it;
# in the child they are replaced and the flusher (a thread that does not exist there) is forgotten.
_LIVE: weakref.WeakSet[Journal] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()
_FORK_HELD: list[Journal] = []


def _before_fork() -> None:
    _LIVE_LOCK.acquire()
    for j in list(_LIVE):
        j._lock.acquire()
        _FORK_HELD.append(j)


def _after_fork_parent() -> None:
    while _FORK_HELD:
        _FORK_HELD.pop()._lock.release()
    _LIVE_LOCK.release()


def _after_fork_child() -> None:
    global _LIVE_LOCK
    while _FORK_HELD:
        j = _FORK_HELD.pop()
        j._lock = threading.Lock()
        j._cond = threading.Condition(j._lock)
        j._flusher = None
    _LIVE_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child)


def _flusher_main(ref: weakref.ReferenceType[Journal], cond: threading.Condition) -> None:
    """The batch flusher: fsyncs records left unsynced ``batch_interval_s`` after the last fsync.

    Holds its journal only weakly while it sleeps, so a journal dropped without ``close()`` is collected and
    the thread ends within ``_FLUSHER_IDLE_S``.
    """
    me = threading.current_thread()
    while True:
        j = ref()
        if j is None:
            return
        with cond:
            if j._closed or j._flusher is not me or j._cond is not cond:
                return
            wait = _FLUSHER_IDLE_S
            if j._unsynced:
                wait = j._last_sync + j.batch_interval_s - time.monotonic()
                if wait <= 0:
                    try:
                        j._f.flush()
                        j._sync()
                    except (OSError, ValueError) as e:  # reported by the next append / sync / close
                        j._sync_error = e
                        j._flusher = None
                        return
                    wait = _FLUSHER_IDLE_S
            del j
            cond.wait(wait)


class Journal:
    """Append-only journal file.

    Args:
        path: the journal file (created when missing).
        fsync: ``"always"``, ``"batch"`` or ``"off"``.
        batch_records: with ``"batch"``, fsync after this many records.
        batch_interval_s: with ``"batch"``, no record stays unsynced much longer than this: ``append`` fsyncs
            when this long has passed since the last fsync, and a background flusher does when no append
            comes.

    Attributes:
        records_dropped: 1 when a damaged tail was dropped on open, else 0.
        tail_kind: ``"torn"`` or ``"corrupt"`` for a dropped tail (see the module docs), else None.
        dropped_tail_path: the sibling file the dropped bytes were copied to, else None.
        dropped_tail_offset: where the dropped tail started (the new end of the file), else None.
        dropped_tail_bytes: how many bytes were dropped (0 when none).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fsync: str = "always",
        batch_records: int = 64,
        batch_interval_s: float = 0.05,
        bank_id: str | None = None,
        read_only: bool = False,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, got {fsync!r}")
        from . import _fsio

        self.path = _fsio.resolve_target(Path(path).absolute(), "journal")
        self.fsync = fsync
        self.batch_records = int(batch_records)
        self.batch_interval_s = float(batch_interval_s)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._flusher: threading.Thread | None = None
        self._sync_error: BaseException | None = None
        self._closed = False
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.last_seq = 0
        self.records_dropped = 0  # damaged tail records cut off (and preserved) when opening
        self.tail_kind: str | None = None
        self.dropped_tail_path: Path | None = None
        self.dropped_tail_offset: int | None = None
        self.dropped_tail_bytes = 0
        #: why the journal refuses writes (an append, fsync or truncate failed), else None
        self.failed: BaseException | None = None
        #: opened to read only: nothing is created, cut or written (a damaged tail is left where it is)
        self.read_only = bool(read_only)
        if self.read_only:
            self.bank_id, self._hdr_size = None, _FILE_HDR.size
            if self.path.exists() and self.path.stat().st_size > 0:
                base, self.bank_id, self._hdr_size = read_file_header(self.path)
                self.last_seq = max(self._scan_valid_end()[1], base)
            self._f = open(os.devnull, "ab", buffering=0)  # noqa: SIM115 - a closed stand-in: appends refuse
            self._f.close()
            self._end = 0
            return
        if self.path.exists() and self.path.stat().st_size > 0:
            base, self.bank_id, self._hdr_size = read_file_header(self.path)
            end, self.last_seq, tail = self._scan_valid_end()
            self.last_seq = max(self.last_seq, base)
            size = self.path.stat().st_size
            if end < size:
                self._drop_tail(tail or _Tail(end, "torn", "unreadable bytes after the last record"), size)
        else:
            from .snapshot import atomic_write_bytes

            if bank_id is not None:
                bytes.fromhex(bank_id)  # a malformed identity raises ValueError before anything is written
            self.bank_id = bank_id
            self._hdr_size = _FILE_HDR.size
            atomic_write_bytes(self.path, lambda f: f.write(_pack_file_header(0, bank_id)))
        # unbuffered: a record reaches the operating system in whole write calls, and a failed write leaves
        # nothing queued in a buffer that a later flush could still write
        self._f = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open for appends
        self._end = os.fstat(self._f.fileno()).st_size  # the end of the last intact record
        with _LIVE_LOCK:
            _LIVE.add(self)

    # ------------------------------------------------------------------ reading
    def _base_seq(self) -> int:
        return read_file_header(self.path)[0]

    def _scan_valid_end(self) -> tuple[int, int, _Tail | None]:
        """Offset just past the last intact record, its sequence number, and the tolerated damage after it."""
        end = self._hdr_size
        last = 0
        tail: list[_Tail] = []
        for _seq, _payload, off_end in self._iter_raw(tolerate_tail=True, tail_out=tail):
            end, last = off_end, _seq
        return end, last, (tail[0] if tail else None)

    def _iter_raw(self, tolerate_tail: bool, tail_out: list[_Tail] | None = None) -> Iterator[tuple[int, bytes, int]]:
        size = self.path.stat().st_size
        prev, _bank, off = read_file_header(self.path)
        with open(self.path, "rb") as f:
            f.seek(off)
            while off < size:
                hdr = f.read(_HDR.size)
                bad = None
                rec_end = size + 1  # where the damaged record ends (past EOF unless its header is complete)
                if len(hdr) < _HDR.size:
                    bad = "short record header"
                else:
                    magic, seq, length, crc = _HDR.unpack(hdr)
                    if length <= MAX_RECORD_BYTES:
                        rec_end = off + _HDR.size + length
                    if magic != REC_MAGIC:
                        bad = "bad record magic"
                    elif rec_end > size:
                        bad = "record runs past the end of the file"
                    else:
                        payload = f.read(length)
                        if _crc(seq, length, payload) != crc:
                            bad = "checksum mismatch"
                        elif seq <= prev:
                            bad = "sequence numbers out of order"
                if bad is not None:
                    tail = self._classify_tail(off, size, rec_end, bad) if tolerate_tail else None
                    if tail is None:
                        raise JournalError(f"{self.path}: corrupt journal at byte {off} ({bad})")
                    if tail_out is not None:
                        tail_out.append(tail)
                    return
                off += _HDR.size + length
                prev = seq
                yield seq, payload, off

    def _classify_tail(self, off: int, size: int, rec_end: int, bad: str) -> _Tail | None:
        """The damage at ``off`` as a droppable tail, or None when it is corruption in the middle of the file."""
        if self._all_zero(off, size):
            return _Tail(off, "torn", f"zero-filled tail ({bad})")
        if rec_end > size:  # a short header, or a record running past the end of the file: an interrupted write
            if self._only_garbage_after(off, size):
                return _Tail(off, "torn", bad)
            return None  # an intact record follows: the header itself is damaged
        if rec_end == size:  # a complete record, the last one, that does not check out: corrupt, not torn
            return _Tail(off, "corrupt", bad)
        return None  # a complete bad record followed by more bytes

    def _all_zero(self, off: int, size: int) -> bool:
        with open(self.path, "rb") as f:
            f.seek(off)
            left = size - off
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    break
                if chunk.count(0) != len(chunk):
                    return False
                left -= len(chunk)
        return True

    def _only_garbage_after(self, off: int, size: int) -> bool:
        """True when no intact record starts after ``off`` (the damage is a torn tail, not mid-file rot)."""
        with open(self.path, "rb") as f:
            f.seek(off)
            rest = f.read()
        # NOTE: every candidate costs a CRC over its payload; a hostile file of headers whose lengths all
        # reach the end of the file would make this quadratic (3.5 MB took 10 s). The bytes checksummed are
        # capped at a small multiple of the tail: past that, "an intact record may follow" is assumed, which
        # refuses the file (JournalError, nothing dropped) instead of guessing. A real torn tail is one
        # partial record and stays far below the cap.
        budget = 2 * len(rest) + _CHUNK
        pos = rest.find(REC_MAGIC, 1)
        while pos != -1:
            hdr = rest[pos : pos + _HDR.size]
            if len(hdr) == _HDR.size:
                _m, seq, length, crc = _HDR.unpack(hdr)
                if pos + _HDR.size + length <= len(rest):
                    budget -= length
                    if budget < 0:
                        return False
                    if _crc(seq, length, rest[pos + _HDR.size : pos + _HDR.size + length]) == crc:
                        return False
            pos = rest.find(REC_MAGIC, pos + 1)
        return True

    def _drop_tail(self, tail: _Tail, size: int) -> None:
        """Copy the bytes from ``tail.offset`` to the end to a sibling file (fsynced), then truncate and warn."""
        from .snapshot import atomic_write_bytes

        nbytes = size - tail.offset
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        n = 1
        while True:
            keep = self.path.with_name(f"{self.path.name}.tail-{stamp}-{n}.bad")
            if not keep.exists():
                break
            n += 1

        def copy(out: Any) -> None:
            with open(self.path, "rb") as src:
                src.seek(tail.offset)
                left = nbytes
                while left > 0:
                    chunk = src.read(min(_CHUNK, left))
                    if not chunk:
                        raise OSError(f"{self.path} shrank while its damaged tail was being copied")
                    out.write(chunk)
                    left -= len(chunk)

        try:
            atomic_write_bytes(keep, copy)
        except OSError as e:
            raise JournalError(
                f"{self.path}: a damaged tail ({tail.kind}: {tail.reason}) at byte {tail.offset} could not be "
                f"preserved in {keep} ({e}); the journal was left untouched"
            ) from e
        from . import _fsio

        with open(self.path, "r+b", buffering=0) as f:
            _fsio.truncate(f.fileno(), tail.offset)
            _fsio.fsync(f.fileno())
        self.records_dropped = 1
        self.tail_kind = tail.kind
        self.dropped_tail_path = keep
        self.dropped_tail_offset = tail.offset
        self.dropped_tail_bytes = nbytes
        if tail.kind == "torn":
            what = "it looks like a write interrupted by a crash"
        else:
            what = ("a complete final record that does not check out: a crash does not do this, suspect the "
                    "disk or another writer")
        warnings.warn(
            JournalTailWarning(
                f"{self.path}: dropped a {tail.kind} tail of {nbytes} bytes at byte {tail.offset} "
                f"({tail.reason}; {what}); the bytes were preserved in {keep}",
                journal=self.path,
                offset=tail.offset,
                nbytes=nbytes,
                kind=tail.kind,
                reason=tail.reason,
                preserved=keep,
            ),
            stacklevel=3,
        )

    def records(self, after_seq: int = 0) -> Iterator[tuple[int, dict[str, Any], dict[str, torch.Tensor]]]:
        """Decoded records with ``seq > after_seq``, in order."""
        if self.read_only:  # a writer may be appending: a record it has not finished is not read yet
            if not self.path.exists() or self.path.stat().st_size == 0:
                return
        for seq, payload, _ in self._iter_raw(tolerate_tail=self.read_only):
            if seq > after_seq:
                meta, tensors = decode_payload(payload)
                yield seq, meta, tensors

    # ------------------------------------------------------------------ writing
    def append(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> int:
        """Append one record and make it as durable as the fsync policy says; returns its sequence number."""
        from . import _fsio

        payload = encode_payload(meta, tensors)
        with self._lock:
            self._check_writable()
            seq = self.last_seq + 1
            record = _HDR.pack(REC_MAGIC, seq, len(payload), _crc(seq, len(payload), payload)) + payload
            sync_now = self.fsync == "always" or (
                self.fsync == "batch"
                and (
                    self._unsynced + 1 >= self.batch_records
                    or time.monotonic() - self._last_sync >= self.batch_interval_s
                )
            )
            try:
                _fsio.write_all(self._f.fileno(), record)
                if sync_now:
                    self._sync()
            except OSError as e:  # nothing acknowledged: cut the record off and refuse further writes
                self._write_failed(e)
                raise
            self._end += len(record)
            self.last_seq = seq
            if not sync_now:
                self._unsynced += 1
            if self.fsync == "batch" and self._unsynced:
                if self._flusher is None:
                    self._start_flusher()
                elif self._unsynced == 1:
                    self._cond.notify()  # the flusher may be idle: it now has a deadline
                if self._sync_error is not None:  # a background fsync failed: report it (the record is written)
                    err, self._sync_error = self._sync_error, None
                    raise err
        return seq

    def _check_writable(self) -> None:
        if self.read_only:
            raise JournalWriteError(f"{self.path}: the journal was opened read-only")
        if self.failed is not None:
            raise JournalWriteError(
                f"{self.path}: an earlier write to this journal failed ({self.failed}); it refuses writes until "
                "it is reset (ReasoningBank.save()) or reopened"
            )
        if self._f.closed:
            raise JournalWriteError(f"{self.path}: the journal is closed")

    def _write_failed(self, err: BaseException) -> None:
        """After a failed write or fsync: cut the file back to the last intact record and refuse writes.

        The cut record was never acknowledged. If the file cannot be cut, the next open drops the partial
        record as a torn tail (or replays it whole, if it did reach the file complete).
        """
        from . import _fsio

        self.failed = err
        try:
            _fsio.truncate(self._f.fileno(), self._end)
            _fsio.fsync(self._f.fileno())
        except OSError:
            pass

    def _start_flusher(self) -> None:
        t = threading.Thread(
            target=_flusher_main,
            args=(weakref.ref(self), self._cond),
            name=f"rbank-journal-flusher:{self.path.name}",
            daemon=True,
        )
        self._flusher = t
        t.start()

    def _sync(self) -> None:
        from . import _fsio

        _fsio.fsync(self._f.fileno())
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def sync(self) -> None:
        """fsync now (whatever the policy)."""
        with self._lock:
            self._f.flush()
            self._sync()
            if self._sync_error is not None:
                err, self._sync_error = self._sync_error, None
                raise err

    def reset(self, base_seq: int) -> None:
        """Start over, empty, after a snapshot that holds everything up to ``base_seq``.

        The new empty file replaces the old one atomically; sequence numbers continue after ``base_seq``.
        """
        from .snapshot import atomic_write_bytes

        with self._lock:
            if self._f.closed:
                raise JournalWriteError(f"{self.path}: the journal is closed")
            base = max(self.last_seq, int(base_seq))
            # the new file is complete before the old one is let go: if writing it fails, the old file and
            # its handle stay as they were (every record still in it, appends still go to it)
            atomic_write_bytes(self.path, lambda f: f.write(_pack_file_header(base, self.bank_id)))
            old = self._f
            try:
                self._f = open(self.path, "ab", buffering=0)  # noqa: SIM115
            except OSError as e:  # the old handle names the replaced file: never append to it again
                self.failed = e
                raise
            finally:
                old.close()
            self._hdr_size = _FILE_HDR.size
            self._end = _FILE_HDR.size
            self.last_seq = base
            self.failed = None
            self._unsynced = 0
            self._last_sync = time.monotonic()

    def close(self) -> None:
        """Flush, fsync (unless the policy is ``"off"``) and close; stops the batch flusher (joined).

        An fsync error (this one, or an earlier one of the background flusher) is raised after everything
        is closed and stopped."""
        err: BaseException | None = None
        with self._lock:
            flusher, self._flusher = self._flusher, None
            self._closed = True
            self._cond.notify_all()
            if not self._f.closed:
                try:
                    self._f.flush()
                    if self.fsync != "off" and self.failed is None:
                        os.fsync(self._f.fileno())
                    self._unsynced = 0
                except (OSError, ValueError) as e:
                    err = e
                finally:
                    self._f.close()
            if self._sync_error is not None:
                err, self._sync_error = (err or self._sync_error), None
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join()
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if err is not None:
            raise err

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
