"""Crash soak: many more SIGKILL trials than the test suite runs (same harness as tests/test_crash.py).

A worker process stores trajectories, records usage, removes patterns and saves snapshots in a loop; it
is killed with SIGKILL after a random delay, and the folder is reloaded and checked against what the
worker acknowledged before the kill. Two settings, side by side in one run:

- ``always``: write-ahead journal with fsync "always" — every acknowledged mutation must be present;
- ``batch``: the journal with fsync "batch" — the same (every record reaches the OS before it is
  acknowledged; "batch" only defers the fsync, which matters for a lost machine, not a killed process);
- ``off``: no journal — the bank must equal the last acknowledged snapshot (or the one being written).

    flock /tmp/rbank-bench.lock python benchmarks/crash_soak.py               # 500 trials per setting
    flock /tmp/rbank-bench.lock python benchmarks/crash_soak.py --trials 100  # quick

Prints, per setting: trials, kills, kills survived (reload succeeded and matched), kills that landed in
the middle of a mutation / of a snapshot write, acknowledged mutations checked, and records lost (must
be 0). Exits with status 1 when anything was lost.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _harness():
    spec = importlib.util.spec_from_file_location("rbank_crash_harness", ROOT / "tests" / "test_crash.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=500, help="trials per setting")
    ap.add_argument("--max-delay", type=float, default=0.5, help="longest run before the kill, seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.trials <= 0:
        raise SystemExit("--trials must be positive")
    sys.path.insert(0, str(ROOT))
    h = _harness()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rbank-soak-") as tmp, h.Zygote() as z:
        for mode in ("always", "batch", "off"):
            t0 = time.perf_counter()
            tally = h.run_trials(z, Path(tmp), mode, args.trials, args.seed, args.max_delay)
            tally["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append((mode, tally))
    cols = ["trials", "kills", "survived", "kills_mid_mutation", "kills_mid_snapshot", "acked", "lost", "seconds"]
    print(f"{'journal':<14}" + "".join(f"{c:>20}" for c in cols))
    for mode, tally in rows:
        name = "off" if mode == "off" else f"fsync={mode}"
        print(f"{name:<14}" + "".join(f"{tally[c]:>20}" for c in cols))
    total = sum(t["trials"] for _m, t in rows)
    survived = sum(t["survived"] for _m, t in rows)
    lost = sum(t["lost"] for _m, t in rows)
    print(f"kills survived: {survived}/{total} ({survived / total:.3f}); records lost: {lost}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
