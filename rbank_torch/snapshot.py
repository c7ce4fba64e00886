"""Safetensors snapshots: atomic writes, a format version, checksums, strict validation on load.

A snapshot is one ``.safetensors`` file. Its header metadata holds:

- ``rbank.format``: what the file holds (``"rbank_torch.bank"``, ``"rbank_torch.store"``, …),
- ``rbank.version``: the format version (an integer; files of a newer version are refused),
- ``rbank.meta``: a JSON document (configs, stats, string tables),
- ``rbank.crc32``: JSON ``{tensor name: crc32 of its bytes}`` plus ``"@meta"`` for the JSON document.

Nothing on the load path unpickles or executes anything from the file: the header is parsed by
safetensors (JSON), tensors are raw little-endian buffers, strings are UTF-8.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _fsio

__all__ = [
    "SnapshotError",
    "FORMAT_VERSION",
    "write_snapshot",
    "read_snapshot",
    "check_header",
    "encode_strings",
    "decode_strings",
    "atomic_write_bytes",
    "remove_stale_temps",
]

#: current on-disk format version (bumped on incompatible changes)
FORMAT_VERSION = 1

#: header larger than this is refused before parsing (bounded memory on hostile files)
MAX_HEADER_BYTES = 256 * 1024 * 1024


class SnapshotError(ValueError):
    """A snapshot file is missing, corrupt, foreign or of an incompatible version."""


def _crc(t: torch.Tensor) -> int:
    a = t.detach().cpu().contiguous()
    if a.numel() == 0:
        return 0
    return zlib.crc32(a.view(torch.uint8).numpy().data if a.dtype != torch.uint8 else a.numpy().data)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        _fsio.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def _temp_prefix(path: Path) -> str:
    """``.<name>.<host>-<pid>.``: the temp files of one writer process, recognisable after it died."""
    return f".{path.name}.{_host_tag()}-{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its file
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[str]:
    """Delete the temp files that writers of ``path`` killed mid-write left next to it.

    Only files named by :func:`atomic_write_bytes` for ``path`` on *this* host whose writer process no
    longer exists are removed (a live writer's file, or one from another host sharing the folder, is
    kept). Called after every successful atomic write; safe to call any time.

    Returns:
        the paths removed.
    """
    path = Path(path)
    pat = re.compile(rf"^\.{re.escape(path.name)}\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>[0-9]+)\..*\.tmp$")
    host, me = _host_tag(), os.getpid()
    removed: list[str] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pat.match(entry.name)
        if m is None or m["host"] != host:
            continue
        pid = int(m["pid"])
        if pid == me or _pid_alive(pid):
            continue
        try:
            os.unlink(entry.path)
            removed.append(entry.path)
        except OSError:
            pass
    return removed


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # elsewhere: read by setting (briefly process-wide) and restoring
    os.umask(old)
    return old


def _target_mode(path: Path) -> int:
    """Permission bits for the file at ``path``: those of the file it replaces, else ``0o666 & ~umask``
    (what ``open(path, "w")`` would give), not the owner-only mode of a fresh temp file."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data_writer) -> None:
    """Write a file atomically: temp file in the same folder, fsync, ``os.replace``, fsync the folder.

    ``data_writer(fileobj)`` writes the content (``fileobj.write(bytes)``). On any error the destination is
    left untouched and the temp file removed; a temp file left by a writer that was killed is removed by
    the next successful write of the same path (:func:`remove_stale_temps`).

    A symlink at ``path`` is followed: the file it names is replaced and the link stays. A target that
    exists and is not a regular file (a device node, a FIFO, a socket, a folder) is refused with
    :class:`~rbank_torch._fsio.NotARegularFileError` (a ``ValueError``) before anything is written.
    """
    path = _fsio.resolve_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=str(path.parent))
    try:
        try:
            data_writer(_fsio.FdWriter(fd))
            if hasattr(os, "fchmod"):
                os.fchmod(fd, _target_mode(path))
            _fsio.fsync(fd)
        finally:
            os.close(fd)
        _fsio.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    remove_stale_temps(path)


def write_snapshot(path: str | os.PathLike, fmt: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write ``tensors`` and the JSON-able ``meta`` as a safetensors snapshot, atomically."""
    from safetensors.torch import save

    cpu: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"snapshot entry {k!r} is not a tensor")
        cpu[k] = t.detach().cpu().contiguous()
    meta_json = json.dumps(meta, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    crcs = {k: _crc(t) for k, t in cpu.items()}
    crcs["@meta"] = zlib.crc32(meta_json.encode("utf-8"))
    header = {
        "rbank.format": fmt,
        "rbank.version": str(FORMAT_VERSION),
        "rbank.meta": meta_json,
        "rbank.crc32": json.dumps(crcs, separators=(",", ":")),
    }
    blob = save(cpu, metadata=header)
    atomic_write_bytes(path, lambda f: f.write(blob))


def check_header(path: Path) -> None:
    """Tell a foreign file from a damaged snapshot before safetensors reads it.

    A safetensors file starts with an 8-byte little-endian header length followed by a JSON object, so
    its ninth byte is ``{``; anything else (a script, a text file, another binary format) is not a
    snapshot at all, whatever its first eight bytes happen to encode.
    """
    size = path.stat().st_size
    if size < 9:
        raise SnapshotError(f"{path}: not an rbank snapshot (a file of {size} bytes is too short)")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] != b"{":
        raise SnapshotError(f"{path}: not an rbank snapshot (not a safetensors file)")
    n = int.from_bytes(head[:8], "little")
    if n <= 0 or n > MAX_HEADER_BYTES or n + 8 > size:
        raise SnapshotError(f"{path}: corrupt or truncated snapshot (header length {n}, file size {size})")


def read_snapshot(path: str | os.PathLike, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and validate a snapshot written by :func:`write_snapshot`.

    Returns:
        (tensors on CPU, the meta document).

    Raises:
        SnapshotError: missing file, truncated or corrupt data (checksum mismatch), foreign file,
            another format than ``fmt``, or a newer format version.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"{path}: no such snapshot file")
    check_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            got_fmt = header.get("rbank.format")
            if got_fmt is None:
                raise SnapshotError(f"{path}: not an rbank_torch snapshot (no 'rbank.format' in its header)")
            if got_fmt != fmt:
                raise SnapshotError(f"{path}: holds {got_fmt!r}, expected {fmt!r}")
            try:
                version = int(header.get("rbank.version", ""))
            except ValueError:
                raise SnapshotError(f"{path}: bad format version {header.get('rbank.version')!r}") from None
            if version > FORMAT_VERSION or version < 1:
                raise SnapshotError(
                    f"{path}: format version {version} is not supported (this library reads <= {FORMAT_VERSION})"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SnapshotError:
        raise
    except (SafetensorError, ValueError, RuntimeError, OSError, UnicodeDecodeError, TypeError) as e:
        raise SnapshotError(f"{path}: corrupt or truncated snapshot ({e})") from None
    meta_json = header.get("rbank.meta", "")
    try:
        crcs = json.loads(header.get("rbank.crc32", ""))
    except (json.JSONDecodeError, RecursionError):
        raise SnapshotError(f"{path}: corrupt checksum table") from None
    if not isinstance(crcs, dict) or crcs.get("@meta") != zlib.crc32(meta_json.encode("utf-8")):
        raise SnapshotError(f"{path}: corrupt snapshot (metadata checksum mismatch)")
    if set(crcs) - {"@meta"} != set(tensors):
        raise SnapshotError(f"{path}: corrupt snapshot (tensor set does not match its checksum table)")
    for k, t in tensors.items():
        if crcs[k] != _crc(t):
            raise SnapshotError(f"{path}: corrupt snapshot (checksum mismatch in {k!r})")
    try:
        meta = json.loads(meta_json)
    except json.JSONDecodeError:
        raise SnapshotError(f"{path}: corrupt metadata document") from None
    except RecursionError:
        raise SnapshotError(f"{path}: corrupt metadata document (nested too deeply)") from None
    if not isinstance(meta, dict):
        raise SnapshotError(f"{path}: corrupt metadata document (not an object)")
    return tensors, meta


def encode_strings(items: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes ``[total] uint8`` and offsets ``[n + 1] int64`` for a list of strings."""
    encoded = [s.encode("utf-8") for s in items]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    if encoded:
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
    buf = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return torch.from_numpy(buf), torch.from_numpy(offsets)


def decode_strings(data: torch.Tensor, offsets: torch.Tensor, what: str = "strings") -> list[str]:
    """Inverse of :func:`encode_strings`; raises :class:`SnapshotError` on inconsistent input."""
    if data.dtype != torch.uint8 or data.dim() != 1 or offsets.dtype != torch.int64 or offsets.dim() != 1:
        raise SnapshotError(f"corrupt snapshot: bad dtype/shape for {what}")
    o = offsets.numpy()
    if len(o) == 0 or o[0] != 0 or o[-1] != data.numel() or (len(o) > 1 and np.any(np.diff(o) < 0)):
        raise SnapshotError(f"corrupt snapshot: inconsistent offsets for {what}")
    raw = data.numpy().tobytes()
    try:
        return [raw[o[i] : o[i + 1]].decode("utf-8") for i in range(len(o) - 1)]
    except UnicodeDecodeError:
        raise SnapshotError(f"corrupt snapshot: invalid UTF-8 in {what}") from None


def expect_tensor(
    tensors: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple[int | None, ...]
) -> torch.Tensor:
    """Fetch ``tensors[name]`` checking dtype and shape (None = any size); raises SnapshotError."""
    t = tensors.get(name)
    if t is None:
        raise SnapshotError(f"corrupt snapshot: missing tensor {name!r}")
    if t.dtype != dtype:
        raise SnapshotError(f"corrupt snapshot: {name!r} has dtype {t.dtype}, expected {dtype}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        raise SnapshotError(f"corrupt snapshot: {name!r} has shape {tuple(t.shape)}, expected {shape}")
    return t
