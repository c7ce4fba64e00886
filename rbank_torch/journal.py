"""An append-only write-ahead journal of acknowledged bank mutations.

File layout::

    b"RBJ1"  u64 base_seq                    file magic; the sequence number the file continues from
    record*                                  records, each:
        b"RJ"  u16 0                         record magic + reserved
        u64 seq                              sequence number (strictly increasing)
        u32 length                           payload length
        u32 crc32                            CRC32 of seq, length and payload
        payload                              a safetensors blob (tensors + JSON metadata)

The payload is parsed by safetensors (a JSON header and raw little-endian buffers): nothing in a journal is
unpickled or executed. On open, a torn last record (a crash in the middle of a write: short header, short
payload, or a bad CRC on the very last record) is detected and cut off; a bad record followed by good ones
is corruption and raises :class:`JournalError`.

fsync policies: ``"always"`` fsyncs every record before the mutation is acknowledged; ``"batch"`` fsyncs
every ``batch_records`` records or ``batch_interval_s`` seconds (and on close); ``"off"`` never fsyncs.
Every record is written to the operating system before the call returns, so a killed *process* loses
nothing in any mode; the policy decides what survives a crash of the *machine*.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["Journal", "JournalError", "FSYNC_POLICIES", "encode_payload", "decode_payload"]

FILE_MAGIC = b"RBJ1"
_FILE_HDR = struct.Struct("<4sQ")
REC_MAGIC = b"RJ\x00\x00"
_HDR = struct.Struct("<4sQII")  # magic, seq, length, crc
FSYNC_POLICIES = ("always", "batch", "off")
#: a record longer than this is refused (bounded memory on hostile files)
MAX_RECORD_BYTES = 1 << 31


class JournalError(ValueError):
    """A journal file is corrupt (not just torn at its end) or foreign."""


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
        raise JournalError(f"malformed journal record ({e})") from None
    if not isinstance(meta, dict):
        raise JournalError("malformed journal record (metadata is not an object)")
    tensors.pop("_", None)
    return meta, tensors


def _crc(seq: int, length: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<QI", seq, length)))


class Journal:
    """Append-only journal file.

    Args:
        path: the journal file (created when missing).
        fsync: ``"always"``, ``"batch"`` or ``"off"``.
        batch_records: with ``"batch"``, fsync after this many records.
        batch_interval_s: with ``"batch"``, fsync when this long has passed since the last fsync.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fsync: str = "always",
        batch_records: int = 64,
        batch_interval_s: float = 0.05,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, got {fsync!r}")
        self.path = Path(path)
        self.fsync = fsync
        self.batch_records = int(batch_records)
        self.batch_interval_s = float(batch_interval_s)
        self._lock = threading.Lock()
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.last_seq = 0
        self.records_dropped = 0  # torn tail records cut off when opening
        if self.path.exists() and self.path.stat().st_size > 0:
            end, self.last_seq, self.records_dropped = self._scan_valid_end()
            self.last_seq = max(self.last_seq, self._base_seq())
            if end < self.path.stat().st_size:
                with open(self.path, "r+b") as f:
                    f.truncate(end)
                    f.flush()
                    os.fsync(f.fileno())
        else:
            from .snapshot import atomic_write_bytes

            atomic_write_bytes(self.path, lambda f: f.write(_FILE_HDR.pack(FILE_MAGIC, 0)))
        self._f = open(self.path, "ab")  # noqa: SIM115 - kept open for appends

    # ------------------------------------------------------------------ reading
    def _base_seq(self) -> int:
        with open(self.path, "rb") as f:
            hdr = f.read(_FILE_HDR.size)
        if len(hdr) < _FILE_HDR.size or hdr[:4] != FILE_MAGIC:
            raise JournalError(f"{self.path}: not an rbank_torch journal (bad file header)")
        return _FILE_HDR.unpack(hdr)[1]

    def _scan_valid_end(self) -> tuple[int, int, int]:
        """Offset just past the last intact record, its sequence number, and how many torn records follow."""
        end = _FILE_HDR.size
        last = 0
        for _seq, _payload, off_end in self._iter_raw(tolerate_tail=True):
            end, last = off_end, _seq
        size = self.path.stat().st_size
        return end, last, int(end < size)

    def _iter_raw(self, tolerate_tail: bool) -> Iterator[tuple[int, bytes, int]]:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            fh = f.read(_FILE_HDR.size)
            if len(fh) < _FILE_HDR.size or fh[:4] != FILE_MAGIC:
                raise JournalError(f"{self.path}: not an rbank_torch journal (bad file header)")
            off = _FILE_HDR.size
            prev = _FILE_HDR.unpack(fh)[1]
            while off < size:
                hdr = f.read(_HDR.size)
                torn = None
                if len(hdr) < _HDR.size:
                    torn = "short record header"
                else:
                    magic, seq, length, crc = _HDR.unpack(hdr)
                    if magic != REC_MAGIC:
                        torn = "bad record magic"
                    elif length > MAX_RECORD_BYTES or off + _HDR.size + length > size:
                        torn = "record runs past the end of the file"
                    else:
                        payload = f.read(length)
                        if _crc(seq, length, payload) != crc:
                            torn = "checksum mismatch"
                        elif seq <= prev:
                            torn = "sequence numbers out of order"
                if torn is not None:
                    if tolerate_tail and self._only_garbage_after(off, size):
                        return
                    raise JournalError(f"{self.path}: corrupt journal at byte {off} ({torn})")
                off += _HDR.size + length
                prev = seq
                yield seq, payload, off

    def _only_garbage_after(self, off: int, size: int) -> bool:
        """True when no intact record starts after ``off`` (the damage is a torn tail, not mid-file rot)."""
        with open(self.path, "rb") as f:
            f.seek(off)
            rest = f.read()
        pos = rest.find(REC_MAGIC, 1)
        while pos != -1:
            hdr = rest[pos : pos + _HDR.size]
            if len(hdr) == _HDR.size:
                _m, seq, length, crc = _HDR.unpack(hdr)
                payload = rest[pos + _HDR.size : pos + _HDR.size + length]
                if len(payload) == length and _crc(seq, length, payload) == crc:
                    return False
            pos = rest.find(REC_MAGIC, pos + 1)
        return True

    def records(self, after_seq: int = 0) -> Iterator[tuple[int, dict[str, Any], dict[str, torch.Tensor]]]:
        """Decoded records with ``seq > after_seq``, in order."""
        with self._lock:
            self._f.flush()
        for seq, payload, _ in self._iter_raw(tolerate_tail=False):
            if seq > after_seq:
                meta, tensors = decode_payload(payload)
                yield seq, meta, tensors

    # ------------------------------------------------------------------ writing
    def append(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> int:
        """Append one record and make it as durable as the fsync policy says; returns its sequence number."""
        payload = encode_payload(meta, tensors)
        with self._lock:
            seq = self.last_seq + 1
            self._f.write(_HDR.pack(REC_MAGIC, seq, len(payload), _crc(seq, len(payload), payload)))
            self._f.write(payload)
            self._f.flush()
            self.last_seq = seq
            self._unsynced += 1
            if self.fsync == "always" or (
                self.fsync == "batch"
                and (
                    self._unsynced >= self.batch_records
                    or time.monotonic() - self._last_sync >= self.batch_interval_s
                )
            ):
                self._sync()
        return seq

    def _sync(self) -> None:
        os.fsync(self._f.fileno())
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def sync(self) -> None:
        """fsync now (whatever the policy)."""
        with self._lock:
            self._f.flush()
            self._sync()

    def reset(self, base_seq: int) -> None:
        """Start over, empty, after a snapshot that holds everything up to ``base_seq``.

        The new empty file replaces the old one atomically; sequence numbers continue after ``base_seq``.
        """
        from .snapshot import atomic_write_bytes

        with self._lock:
            self._f.close()
            base = max(self.last_seq, int(base_seq))
            atomic_write_bytes(self.path, lambda f: f.write(_FILE_HDR.pack(FILE_MAGIC, base)))
            self._f = open(self.path, "ab")  # noqa: SIM115
            self.last_seq = base
            self._unsynced = 0

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.flush()
                if self.fsync != "off":
                    os.fsync(self._f.fileno())
                self._f.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
