"""Shared helpers of the benchmark scripts: timing, peak memory, result rows.

Rows are appended as JSON lines ``{name, provider, x, median, p20, p80, device, version, extra}`` to
``bench_results/results.jsonl`` (times in seconds); plots are drawn from that file.
"""

from __future__ import annotations

import json
import platform
import re
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RESULTS",
    "Timing",
    "VERSION",
    "append_rows",
    "device_name",
    "make_row",
    "peak_extra_memory",
    "print_table",
    "time_fn",
]

RESULTS = Path(__file__).resolve().parent.parent / "bench_results" / "results.jsonl"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("rbank-torch")
    except Exception:  # noqa: BLE001 - not installed: the rows still get written
        return "unknown"


VERSION = _version()


@dataclass
class Timing:
    """Wall-clock seconds of repeated runs: median, 20th and 80th percentiles, and the samples."""

    median: float
    p20: float
    p80: float
    samples: list[float]


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_fn(
    fn: Callable[[], Any], *, reps: int = 5, warmup: int = 1, device: torch.device | str | None = None
) -> Timing:
    """Time ``fn()`` ``reps`` times after ``warmup`` untimed calls (CUDA is synchronised around each call).

    Args:
        fn: the work, called without arguments.
        reps: timed calls (>= 1).
        warmup: untimed calls first.
        device: the device to synchronise, if CUDA.

    Returns:
        :class:`Timing` in seconds.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(max(1, reps)):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), samples)


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def peak_extra_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, int | None]:
    """Run ``fn()`` once and measure the memory it needed beyond what was held before.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU (Linux): the resident-set high-water mark
    (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident set before the call; where that
    reset is not allowed, a thread samples ``VmRSS`` every millisecond instead.

    Returns:
        ``(fn's result, bytes)``; bytes is None where nothing could be measured.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        return out, torch.cuda.max_memory_allocated(dev) - base
    before = _proc_status("VmRSS")
    if before is None:
        return fn(), None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out = fn()
        hwm = _proc_status("VmHWM")
        return out, None if hwm is None else max(hwm - before, 0)
    except OSError:
        pass
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            v = _proc_status("VmRSS")
            if v is not None and v > peak[0]:
                peak[0] = v
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out = fn()
    finally:
        done.set()
        th.join()
    return out, peak[0] - before


def device_name(device: torch.device | str = "cpu") -> str:
    """A short description of the device: GPU name, or CPU model and thread count."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if m:
            model = m.group(1).strip()
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def make_row(
    name: str, provider: str, x: Any, timing: Timing, device: torch.device | str = "cpu", **extra: Any
) -> dict[str, Any]:
    """One result row: ``{name, provider, x, median, p20, p80, device, version, extra}``."""
    return {
        "name": name,
        "provider": provider,
        "x": x,
        "median": timing.median,
        "p20": timing.p20,
        "p80": timing.p80,
        "device": device_name(device),
        "version": VERSION,
        "extra": {"utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra},
    }


def append_rows(rows: list[dict[str, Any]], path: Path | str = RESULTS) -> Path:
    """Append rows as JSON lines (the folder is created when missing); returns the file's path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=False) + "\n")
    return p


def print_table(rows: list[dict[str, Any]], notes: dict[int, str] | None = None) -> None:
    """Print rows as a fixed-width table (times in seconds); ``notes`` maps row index to a remark."""
    head = f"{'name':<28} {'provider':<26} {'x':>9} {'median s':>10} {'p20 s':>10} {'p80 s':>10}  note"
    print(head)
    print("-" * len(head))
    for k, r in enumerate(rows):
        note = (notes or {}).get(k, "")
        print(
            f"{r['name']:<28} {r['provider']:<26} {r['x']!s:>9} {r['median']:>10.4f} {r['p20']:>10.4f} "
            f"{r['p80']:>10.4f}  {note}"
        )
