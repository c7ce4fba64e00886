"""Catastrophic forgetting on permuted-pixel digits: plain fine-tuning vs EWC++.

Data: scikit-learn's bundled digits (1 797 images 8×8, no download), split per seed into
train / validation / test (60 / 20 / 20, stratified). Task A = the original images, task B = the same
images under one fixed random pixel permutation (task C, with ``--tasks 3``, a second permutation).
Model: MLP 64-128-10 (ReLU), SGD, trained on A, then on B (then C).

EWC++ loop per step: ``task_loss.backward(); ewc.update_fisher(); ewc.add_penalty_grad_(); opt.step()``
and ``ewc.consolidate()`` at the end of each task. λ is chosen on the *validation* split (mean of the
task-A and task-B validation accuracies after training on B, averaged over the seeds); the test split
is only used for the reported numbers.

Usage::

    python benchmarks/ewc_forgetting.py            # 3 seeds, A → B
    python benchmarks/ewc_forgetting.py --tasks 3  # also A → B → C with the chosen λ

Writes ``bench_results/ewc_forgetting.json`` (one row per run, plus the summary).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F_

from rbank_torch.ewc import EWCPlusPlus

LAMBDAS = (100.0, 300.0, 1000.0, 3000.0, 10000.0)


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def make_split(seed: int) -> Split:
    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0  # [1797, 64]
    y = digits.target.astype(np.int64)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, random_state=seed, stratify=y)
    x_va, x_te, y_va, y_te = train_test_split(x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest)
    t = torch.from_numpy
    return Split(t(x_tr), t(y_tr), t(x_va), t(y_va), t(x_te), t(y_te))


def permutations(seed: int, n_tasks: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    return [torch.arange(64)] + [torch.randperm(64, generator=g) for _ in range(n_tasks - 1)]


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def train_task(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ewc: EWCPlusPlus | None, args, seed: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    for _ in range(args.epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, args.batch_size):
            idx = order[i : i + args.batch_size]
            opt.zero_grad()
            F_.cross_entropy(model(x[idx]), y[idx]).backward()
            if ewc is not None:
                ewc.update_fisher()
                ewc.add_penalty_grad_()
            opt.step()
    if ewc is not None:
        ewc.consolidate()


def run(seed: int, lam: float | None, n_tasks: int, args) -> dict:
    """Train tasks in sequence; accuracies on val and test after each task (``lam=None``: plain)."""
    sp = make_split(seed)
    perms = permutations(seed, n_tasks)
    model = mlp(seed)
    ewc = EWCPlusPlus(model, lambda_=lam, decay=args.decay) if lam is not None else None
    row: dict = {"method": "plain" if lam is None else "ewc++", "lambda": lam, "seed": seed, "tasks": n_tasks}
    names = "ABC"
    for t in range(n_tasks):
        train_task(model, sp.x_train[:, perms[t]], sp.y_train, ewc, args, seed * 100 + t)
        for split in ("val", "test"):
            x, y = getattr(sp, f"x_{split}"), getattr(sp, f"y_{split}")
            for k in range(t + 1):
                row[f"{split}_{names[k]}_after_{names[t]}"] = accuracy(model, x[:, perms[k]], y)
    return row


def mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--decay", type=float, default=0.99)
    ap.add_argument("--tasks", type=int, default=2, choices=(2, 3))
    ap.add_argument("--out", default="bench_results/ewc_forgetting.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    seeds = list(range(args.seeds))

    plain = [run(s, None, 2, args) for s in seeds]
    grid: dict[float, list[dict]] = {lam: [run(s, lam, 2, args) for s in seeds] for lam in LAMBDAS}
    val_score = {lam: 0.5 * (mean(r, "val_A_after_B") + mean(r, "val_B_after_B")) for lam, r in grid.items()}
    best = max(val_score, key=lambda lam: val_score[lam])
    ewc_rows = grid[best]

    drop_plain = mean(plain, "test_A_after_A") - mean(plain, "test_A_after_B")
    drop_ewc = mean(ewc_rows, "test_A_after_A") - mean(ewc_rows, "test_A_after_B")
    reduction = 1.0 - drop_ewc / drop_plain if drop_plain > 0 else float("nan")
    b_gap = mean(plain, "test_B_after_B") - mean(ewc_rows, "test_B_after_B")

    print(f"permuted digits, MLP 64-128-10, SGD lr {args.lr}, {args.epochs} epochs/task, batch {args.batch_size}, "
          f"decay {args.decay}, {len(seeds)} seeds (test split, mean ± sd)")
    print("λ on validation (mean of A and B accuracy after B): "
          + ", ".join(f"{lam:g}: {v:.3f}" for lam, v in val_score.items()) + f"  → λ = {best:g}")
    header = f"| {'method':<16} | {'A after A':>11} | {'A after B':>11} | {'A drop':>6} | {'B after B':>11} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")

    def fmt(rows: list[dict], key: str) -> str:
        vals = [r[key] for r in rows]
        return f"{statistics.fmean(vals):.3f}±{statistics.pstdev(vals):.3f}"

    for label, rows in (("plain", plain), (f"EWC++ λ={best:g}", ewc_rows)):
        drop = mean(rows, "test_A_after_A") - mean(rows, "test_A_after_B")
        print(f"| {label:<16} | {fmt(rows, 'test_A_after_A'):>11} | {fmt(rows, 'test_A_after_B'):>11} | "
              f"{drop:>6.3f} | {fmt(rows, 'test_B_after_B'):>11} |")
    ok_drop = reduction >= 0.5
    ok_b = b_gap <= 0.05
    print(f"task-A drop cut by {100 * reduction:.0f}% (target ≥ 50%: {'PASS' if ok_drop else 'FAIL'}); "
          f"task B {100 * b_gap:+.1f} points below plain (target ≤ 5: {'PASS' if ok_b else 'FAIL'})")

    three: list[dict] = []
    if args.tasks == 3:
        three = [run(s, None, 3, args) for s in seeds] + [run(s, best, 3, args) for s in seeds]
        print(f"A → B → C, same λ = {best:g} (test):")
        for label in ("plain", "ewc++"):
            rows = [r for r in three if r["method"] == label]
            print(f"  {label:<6} A {fmt(rows, 'test_A_after_C')}  B {fmt(rows, 'test_B_after_C')}  "
                  f"C {fmt(rows, 'test_C_after_C')}")

    summary = {
        "method": "summary", "lambda": best, "val_score": {str(k): v for k, v in val_score.items()},
        "drop_plain": drop_plain, "drop_ewc": drop_ewc, "drop_reduction": reduction, "task_b_gap": b_gap,
        "pass_drop": ok_drop, "pass_task_b": ok_b, "seeds": len(seeds), "config": vars(args),
        "torch": torch.__version__, "machine": platform.machine(), "seconds": time.perf_counter() - t0,
    }
    rows = plain + [r for lam in LAMBDAS for r in grid[lam]] + three + [summary]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {len(rows)} rows to {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
