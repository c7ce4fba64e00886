"""Crash safety: a process writing trajectories, usage records, removals and snapshots in a loop is killed
with SIGKILL at random moments; every reload succeeds and holds what was acknowledged before the kill.

Harness: a long-lived *zygote* subprocess (this file run as a script) imports the library once, then for
each trial forks a worker that runs the workload in a fresh folder and writes one line to a pipe after
every acknowledged mutation. The zygote kills the worker with SIGKILL after a random delay, drains the
pipe (lines written before the kill are acknowledgements) and reports them as one JSON line. The test
process then reloads the folder and checks it against the acknowledgements:

- journal, fsync ``"always"`` or ``"batch"``: every acknowledged trajectory, pattern, usage record and
  removal is present; at most the one mutation in flight at the kill is present beyond them ("batch"
  defers only the fsync: each record reaches the OS before it is acknowledged, so a killed process
  loses nothing; a lost machine may lose the records since the last fsync);
- journal off: the bank equals the last acknowledged snapshot, or the one being written at the kill
  (never a mixture, never unreadable).

``benchmarks/crash_soak.py`` runs the same harness for many more trials.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

D = 16
#: worker modes that run with the write-ahead journal (their fsync policy); "off" runs without one
JOURNAL_MODES = ("always", "batch")
SNAPSHOT = "bank.safetensors"
JOURNAL = "bank.journal"


# ---------------------------------------------------------------------------------------------- worker
def _bank_config(folder: str) -> Any:
    from rbank_torch import PatternStoreConfig, ReasoningBankConfig

    return ReasoningBankConfig(
        embedding_dim=D,
        storage_path=folder,
        pattern_config=PatternStoreConfig(backend="exact"),
    )


def _worker(folder: str, mode: str, seed: int, fd: int) -> None:
    """The workload (runs in the forked worker until it is killed). ``mode``: "always", "batch" or "off"."""
    import torch

    from rbank_torch import ReasoningBank, StepOutcome, Verdict

    def ack(*parts: object) -> None:
        os.write(fd, (" ".join(str(p) for p in parts) + "\n").encode())

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    journaled = mode in JOURNAL_MODES
    bank = ReasoningBank(_bank_config(folder), journal=journaled, fsync=mode if journaled else "always")
    ack("ready")
    pids: list[int] = []
    while True:
        r = rng.random()
        if r < 0.55 or not pids:
            ack("?", "T")
            rec = bank.start_trajectory(torch.randn(D, generator=g))
            for _ in range(rng.randint(1, 3)):
                rec.add_step("act ✓", "why", StepOutcome.success(), rng.uniform(0.5, 1.0))
            rec.add_lesson(f"lesson {rng.random()}")
            t = rec.complete(Verdict.success())
            bank.store_trajectory(t)
            p = next((p for p in bank.store.get_all_patterns() if t.id in p.source_trajectories), None)
            if p is not None:
                pids.append(p.id)
            ack("T", t.id, -1 if p is None else p.id, 0 if p is None else p.usage_count)
        elif r < 0.8:
            pid = rng.choice(pids)
            ack("?", "U", pid)
            bank.record_usage(pid, True, 0.9)
            ack("U", pid)
        elif r < 0.9:
            pid = pids.pop(rng.randrange(len(pids)))
            ack("?", "R", pid)
            bank.store.remove_pattern(pid)
            ack("R", pid)
        else:
            ack("?", "S")
            bank.save()
            ack("S")


def _zygote() -> None:
    """Serve trials: one JSON request per stdin line, one JSON report per stdout line."""
    import torch

    torch.set_num_threads(1)
    import rbank_torch  # noqa: F401 - preloaded for the forked workers
    from rbank_torch import journal, snapshot  # noqa: F401

    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # worker
            os.close(rfd)
            try:
                _worker(req["folder"], req["mode"], req["seed"], wfd)
            finally:
                os._exit(3)
        os.close(wfd)
        buf = b""
        ready_at = None
        deadline = None
        t0 = time.monotonic()
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if now - t0 > 60:
                break
            timeout = 0.5 if deadline is None else max(0.0, deadline - now)
            r, _, _ = select.select([rfd], [], [], timeout)
            if r:
                chunk = os.read(rfd, 65536)
                if not chunk:
                    break  # the worker died by itself
                buf += chunk
                if ready_at is None and b"ready\n" in buf:
                    ready_at = time.monotonic()
                    deadline = ready_at + req["delay"]
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        while True:  # acknowledgements written before the kill
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            buf += chunk
        os.close(rfd)
        lines = buf.decode().splitlines()
        if lines and not buf.endswith(b"\n"):
            lines = lines[:-1]
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        out.write(json.dumps({"acks": lines, "killed": killed}) + "\n")
        out.flush()


# ---------------------------------------------------------------------------------------------- driver
class Zygote:
    """The trial server subprocess (context manager)."""

    def __init__(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        root = Path(__file__).resolve().parent.parent
        env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        first = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not first or not json.loads(first).get("ready"):
            raise RuntimeError("crash-test zygote did not start")

    def trial(self, folder: str, mode: str, seed: int, delay: float) -> dict[str, Any]:
        req = {"folder": folder, "mode": mode, "seed": seed, "delay": delay}
        self.proc.stdin.write(json.dumps(req) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError("crash-test zygote died")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Acked:
    """What the worker acknowledged, replayed in order, and the one mutation in flight at the kill."""

    trajectories: list[int] = field(default_factory=list)
    #: pattern id -> usage count acknowledged (patterns of stored trajectories, not removed)
    usage: dict[int, int] = field(default_factory=dict)
    removed: set[int] = field(default_factory=set)
    #: per acknowledged snapshot: (trajectory ids, live pattern usage) at that moment
    snapshots: list[tuple[list[int], dict[int, int]]] = field(default_factory=list)
    #: acknowledged mutations, and how many of them came before the last acknowledged snapshot
    records: int = 0
    records_in_snapshot: int = 0
    #: the mutation announced but not acknowledged: ("T",), ("U", pid), ("R", pid), ("S",) or None
    pending: tuple | None = None

    @classmethod
    def parse(cls, lines: list[str]) -> Acked:
        a = cls()
        for line in lines:
            parts = line.split()
            kind = parts[0]
            if kind == "?":
                a.pending = (parts[1], *map(int, parts[2:]))
                continue
            if kind == "T":
                a.trajectories.append(int(parts[1]))
                if int(parts[2]) >= 0:
                    a.usage[int(parts[2])] = int(parts[3])
            elif kind == "U":
                a.usage[int(parts[1])] += 1
            elif kind == "R":
                del a.usage[int(parts[1])]
                a.removed.add(int(parts[1]))
            elif kind == "S":
                a.snapshots.append((list(a.trajectories), dict(a.usage)))
            else:
                continue
            a.pending = None
            a.records += 1
            if kind == "S":
                a.records_in_snapshot = a.records
        return a

    def with_pending(self) -> tuple[list[int] | None, dict[int, int] | None]:
        """The state after the in-flight mutation too (None for a part it would add unknown ids to)."""
        t, u = list(self.trajectories), dict(self.usage)
        if self.pending is None or self.pending[0] == "S":
            return t, u
        if self.pending[0] == "U":
            u[self.pending[1]] += 1
            return t, u
        if self.pending[0] == "R":
            del u[self.pending[1]]
            return t, u
        return None, None  # a trajectory in flight: one unknown trajectory and pattern more


def _load(folder: str, mode: str) -> Any:
    from rbank_torch import ReasoningBank

    snap = os.path.join(folder, SNAPSHOT)
    if mode in JOURNAL_MODES:
        if os.path.exists(snap):
            return ReasoningBank.load(snap, journal=os.path.join(folder, JOURNAL))
        return ReasoningBank(_bank_config(folder), journal=os.path.join(folder, JOURNAL))
    if os.path.exists(snap):
        return ReasoningBank.load(snap)
    return None


def check_trial(folder: str, mode: str, acks: list[str]) -> tuple[int, int]:
    """Reload ``folder`` and compare it with the acknowledgements.

    Returns:
        (acknowledged mutations that must be present, how many of them are missing or wrong). Raises
        AssertionError when the folder holds something never acknowledged nor in flight (a phantom or
        half-applied mutation).
    """
    a = Acked.parse(acks)
    bank = _load(folder, mode)
    try:
        if mode in JOURNAL_MODES:
            assert bank is not None
            kept = [t.id for t in bank.trajectories]
            got = {p.id: p.usage_count for p in bank.export_patterns()}
            lost = sum(1 for i, x in enumerate(a.trajectories) if i >= len(kept) or kept[i] != x)
            lost += sum(1 for pid, u in a.usage.items() if got.get(pid) != u and a.pending not in (
                ("U", pid), ("R", pid)))
            lost += sum(1 for pid in a.removed if pid in got)
            if lost:
                return a.records, lost
            pt, pu = a.with_pending()
            if pt is None:  # a trajectory in flight: it and its pattern are there entirely or not at all
                extra_t = kept[len(a.trajectories):]
                extra_p = {pid: u for pid, u in got.items() if pid not in a.usage}
                assert len(extra_t) <= 1 and len(extra_p) <= len(extra_t), (extra_t, extra_p)
                got_rest = {pid: u for pid, u in got.items() if pid in a.usage}
                assert got_rest == a.usage, "a pattern changed by no acknowledged mutation"
            else:
                assert (kept, got) in ((a.trajectories, a.usage), (pt, pu)), "state is neither acknowledged "\
                    "nor acknowledged + the mutation in flight"
            return a.records, 0
        # journal off: exactly the last acknowledged snapshot, or the one in flight (= every acknowledgement)
        states = [a.snapshots[-1]] if a.snapshots else []
        if a.pending == ("S",):
            states.append((a.trajectories, a.usage))
        if bank is None:
            assert not a.snapshots, "an acknowledged snapshot is missing"
            return 0, 0
        got_t = [t.id for t in bank.trajectories]
        got_u = {p.id: p.usage_count for p in bank.export_patterns()}
        if not any(got_t == t and got_u == u for t, u in states):
            return a.records_in_snapshot, max(1, a.records_in_snapshot)
        return a.records_in_snapshot, 0
    finally:
        if bank is not None:
            bank.close()


def run_trials(
    zygote: Zygote, root: Path, mode: str, trials: int, seed: int, max_delay: float
) -> dict[str, int]:
    """Run ``trials`` kill-and-reload trials; returns the tallies."""
    rng = random.Random(seed)
    tally = {"trials": 0, "kills": 0, "survived": 0, "acked": 0, "lost": 0, "kills_mid_mutation": 0,
             "kills_mid_snapshot": 0}
    for i in range(trials):
        folder = str(root / f"{mode}-{seed}-{i}")
        rep = zygote.trial(folder, mode, rng.randrange(1 << 30), rng.uniform(0.0, max_delay))
        acked, lost = check_trial(folder, mode, rep["acks"])
        tally["trials"] += 1
        tally["kills"] += int(rep["killed"])
        tally["survived"] += int(rep["killed"])  # check_trial raised otherwise
        tally["acked"] += acked
        tally["lost"] += lost
        pending = Acked.parse(rep["acks"]).pending
        tally["kills_mid_mutation"] += int(pending is not None)
        tally["kills_mid_snapshot"] += int(pending == ("S",))
    return tally


# ---------------------------------------------------------------------------------------------- tests
def test_sigkill_with_journal_always_loses_nothing_acknowledged(tmp_path):
    with Zygote() as z:
        t = run_trials(z, tmp_path, "always", trials=40, seed=1, max_delay=0.25)
    assert t["trials"] == 40 and t["kills"] == 40
    assert t["lost"] == 0, t
    assert t["acked"] > 40  # the workers did acknowledge work before being killed
    assert t["kills_mid_mutation"] > 0


def test_sigkill_with_journal_batch_loses_nothing_acknowledged(tmp_path):
    """fsync "batch" defers fsync, not the write: a killed process (not a lost machine) loses nothing."""
    with Zygote() as z:
        t = run_trials(z, tmp_path, "batch", trials=15, seed=3, max_delay=0.25)
    assert t["trials"] == 15 and t["kills"] == 15
    assert t["lost"] == 0, t
    assert t["acked"] > 15


def test_sigkill_with_journal_off_keeps_last_snapshot(tmp_path):
    with Zygote() as z:
        t = run_trials(z, tmp_path, "off", trials=20, seed=2, max_delay=0.25)
    assert t["trials"] == 20 and t["kills"] == 20
    assert t["lost"] == 0, t


def test_check_trial_detects_a_lost_record(tmp_path):
    """The checker is not vacuous: an acknowledgement the folder does not hold is counted as lost."""
    with Zygote() as z:
        rep = z.trial(str(tmp_path / "w"), "always", seed=5, delay=0.15)
    acks = rep["acks"] + ["T 999999999 -1 0"]
    try:
        _acked, lost = check_trial(str(tmp_path / "w"), "always", acks)
    except AssertionError:
        lost = 1
    assert lost >= 1


if __name__ == "__main__" and "--zygote" in sys.argv:
    _zygote()
