"""The ``rbank`` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    run(args.n, args.seed, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="rbank",
        description="rbank_torch: a memory of reasoning patterns learned from agent trajectories.",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser(
        "demo",
        help="generate agent runs, store, search, analyse, snapshot (start here)",
        description="Generate a few thousand realistic agent runs, embed their queries with the packaged "
        "MiniLM model, store them in a ReasoningBank, answer text queries, analyse a failure, save and "
        "reload a snapshot, and print a summary with timings.",
    )
    d.add_argument("-n", type=int, default=3000, help="agent runs to generate (default: 3000)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    d.add_argument("--out", help="keep the bank snapshot at this path")
    d.set_defaults(func=_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help(sys.stderr)
        return 2
    return int(args.func(args))
