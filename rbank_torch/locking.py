"""One writer per bank: an exclusive, advisory lock held for as long as a bank writes to its files.

A journaled bank (``ReasoningBank(cfg, journal=...)``, ``ReasoningBank.load(path, journal=...)``) takes the
lock ``<journal>.lock`` (symlinks resolved) when it opens and keeps it until :meth:`ReasoningBank.close`. A second writer on the
same journal, in this process or another one, waits up to its ``lock_timeout`` (0 by default: not at all)
and then gets a :class:`BankLockedError`. A bank without a journal takes no lock: a read-only open
(``ReasoningBank.load(path)``) works while a writer holds the bank, and such a bank is not a writer (two of
them saving one snapshot overwrite each other's changes: give a writing bank a journal).
``ReasoningBank.load(path, journal=..., read_only=True)`` replays the journal too, without the lock. The ``rbank``
commands that change a bank (``ingest``, ``consolidate``, ``prune``) hold ``<bank>.lock`` from load to save,
so a second one waits for the first and then loads what it wrote.

The lock is the operating system's (``flock``/``LockFileEx`` through the ``filelock`` package): a process
that dies, however it dies, releases it. The lock file itself stays in place (removing it could let two
writers lock two different files of the same name).
"""

from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["BankLock", "BankLockedError", "lock_path_for"]


class BankLockedError(TimeoutError):
    """Another writer holds the bank's lock (and ``lock_timeout`` ran out)."""


def lock_path_for(path: str | os.PathLike) -> Path:
    """The lock file guarding ``path`` (a journal or a snapshot): ``<path>.lock`` beside it."""
    p = Path(path)
    return p.with_name(p.name + ".lock")


class BankLock:
    """An exclusive lock on the bank file ``path`` (the lock file is ``<path>.lock``).

    Args:
        path: the journal or snapshot the lock guards.
        timeout: seconds to wait for another writer to let go (0: fail at once).
    """

    def __init__(self, path: str | os.PathLike, timeout: float = 0.0) -> None:
        t = float(timeout)
        if not t >= 0.0:
            raise ValueError(f"lock_timeout must be a number of seconds >= 0, got {timeout!r}")
        # symlinks resolved: every writer of one file takes the same lock, whatever name it opened it by
        self.path = Path(os.path.realpath(path))
        self.lock_file = lock_path_for(self.path)
        self.timeout = t
        self._lock = FileLock(str(self.lock_file), thread_local=False)

    def acquire(self) -> BankLock:
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=self.timeout)
        except Timeout:
            waited = f"after waiting {self.timeout:g} s" if self.timeout > 0 else "(lock_timeout=0: not waiting)"
            raise BankLockedError(
                f"{self.path}: another writer holds this bank (lock file {self.lock_file}) {waited}; one writer "
                "per bank: close the other writer, pass lock_timeout= to wait for it, or open the bank "
                "read-only (ReasoningBank.load(path) without a journal)"
            ) from None
        return self

    @property
    def held(self) -> bool:
        return bool(self._lock.is_locked)

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release(force=True)

    def __enter__(self) -> BankLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
