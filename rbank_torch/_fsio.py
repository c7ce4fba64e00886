"""The file-system calls behind every durable write (journal records, snapshots), in one place.

Journals and snapshots write, fsync, rename and truncate only through these functions, so a test can fail
any one of them (the N-th ``write``, ``fsync``, ``replace`` or ``truncate``) and check that the files left
behind still open and hold every acknowledged change.

Targets must be regular files: :func:`resolve_target` follows a symlink to the file it names (the write
goes to that file; the link stays) and refuses a device node, a FIFO, a socket or a folder, so replacing a
file never turns ``/dev/null`` into a regular file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["write", "write_all", "fsync", "replace", "truncate", "FdWriter", "resolve_target", "NotARegularFileError"]


class NotARegularFileError(ValueError):
    """A write target exists and is not a regular file (a device node, FIFO, socket or folder)."""


def write(fd: int, data: bytes | memoryview) -> int:
    """One ``os.write`` (may write fewer bytes than given)."""
    return os.write(fd, data)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every byte of ``data`` to ``fd`` (short writes are continued; errors raise ``OSError``)."""
    view = memoryview(data)
    while len(view):
        n = write(fd, view)
        if n <= 0:  # pragma: no cover - os.write raises instead of returning 0 for regular files
            raise OSError(f"write to fd {fd} made no progress")
        view = view[n:]


def fsync(fd: int) -> None:
    os.fsync(fd)


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    os.replace(src, dst)


def truncate(fd: int, length: int) -> None:
    os.ftruncate(fd, length)


class FdWriter:
    """A minimal binary file object over a descriptor whose ``write`` goes through :func:`write_all`."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, data: bytes | bytearray | memoryview) -> int:
        write_all(self._fd, data)
        return len(data)

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self._fd


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def resolve_target(path: str | os.PathLike, what: str = "file") -> Path:
    """The file a write to ``path`` must replace: ``path`` itself, or the file a symlink at ``path`` names
    (followed to the end). Raises :class:`NotARegularFileError` when that exists and is not a regular file.
    """
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return p
    except OSError:
        return p  # e.g. a missing folder on the way: the write itself reports it
    if stat.S_ISLNK(st.st_mode):
        p = Path(os.path.realpath(p))
        try:
            st = os.stat(p)
        except FileNotFoundError:
            return p  # a dangling link: the file it names is created
    if not stat.S_ISREG(st.st_mode):
        raise NotARegularFileError(
            f"{path}: refusing to write the {what} there: it is {_kind(st.st_mode)}, not a regular file"
        )
    return p
