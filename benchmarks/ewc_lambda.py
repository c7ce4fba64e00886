"""Task-A retention against λ, for SGD and AdamW, with the raw Fisher and with ``fisher_norm`` "mean" / "max".

Permuted digits (scikit-learn's bundled set, split 60/20/20 per seed): task A = the images, task B =
the images under one fixed pixel permutation. MLP 64-128-10, batch 32, 15 epochs a task; SGD lr 0.1 or
AdamW lr 1e-3 (weight decay 0); EWC++ at the library's defaults otherwise, form 2 of the loop. For
each optimizer, Fisher scaling and λ: task-A test accuracy after B and task-B test accuracy, mean over
3 seeds. The "best λ" per row maximises the mean of the two on the validation split.

    flock /tmp/rbank-bench.lock python benchmarks/ewc_lambda.py            # about 4 minutes on 1 thread

Writes ``bench_results/ewc_lambda.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F_

from rbank_torch.ewc import EWCPlusPlus

GRIDS = {
    "none": (10.0, 100.0, 1e3, 1e4, 1e5),
    "mean": (0.01, 0.1, 1.0, 10.0, 100.0),
    "max": (0.3, 1.0, 3.0, 10.0, 30.0),
}


def data(seed: int) -> dict[str, torch.Tensor]:
    d = load_digits()
    x = d.data.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, random_state=seed, stratify=y)
    x_va, x_te, y_va, y_te = train_test_split(x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest)
    t = torch.from_numpy
    return {"x_train": t(x_tr), "y_train": t(y_tr), "x_val": t(x_va), "y_val": t(y_va),
            "x_test": t(x_te), "y_test": t(y_te)}


def run(seed: int, opt_name: str, norm: str, lam: float | None, epochs: int) -> dict[str, float]:
    sp = data(seed)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(10_000 + seed))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    ewc = None if lam is None else EWCPlusPlus(model, lambda_=lam, fisher_norm=norm)  # type: ignore[arg-type]
    out: dict[str, float] = {}
    for t, p in enumerate((torch.arange(64), perm)):
        opt: torch.optim.Optimizer = (torch.optim.SGD(model.parameters(), lr=0.1) if opt_name == "sgd"
                                      else torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0))
        g = torch.Generator().manual_seed(1_000 * seed + t)
        x, y = sp["x_train"][:, p], sp["y_train"]
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 32):
                idx = order[i : i + 32]
                opt.zero_grad()
                F_.cross_entropy(model(x[idx]), y[idx]).backward()
                if ewc is not None:
                    ewc.update_fisher()
                    ewc.add_penalty_grad_()
                opt.step()
        if ewc is not None:
            ewc.consolidate()
    with torch.no_grad():
        for part in ("val", "test"):
            for name, p in (("A", torch.arange(64)), ("B", perm)):
                acc = (model(sp[f"x_{part}"][:, p]).argmax(1) == sp[f"y_{part}"]).float().mean()
                out[f"{part}_{name}"] = float(acc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", default="bench_results/ewc_lambda.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    seeds = range(args.seeds)
    rows: list[dict[str, Any]] = []
    for opt_name in ("sgd", "adamw"):
        base = [run(s, opt_name, "none", None, args.epochs) for s in seeds]
        rows.append({"opt": opt_name, "norm": "–", "lambda": None,
                     **{k: statistics.fmean(r[k] for r in base) for k in base[0]}})
        for norm, grid in GRIDS.items():
            for lam in grid:
                rs = [run(s, opt_name, norm, lam, args.epochs) for s in seeds]
                rows.append({"opt": opt_name, "norm": norm, "lambda": lam,
                             **{k: statistics.fmean(r[k] for r in rs) for k in rs[0]}})
    print(f"permuted digits A → B, MLP 64-128-10, {args.epochs} epochs a task, batch 32, {args.seeds} seeds; "
          "cells: task-A test accuracy after B / task-B test accuracy")
    for norm, grid in GRIDS.items():
        print(f"\nfisher_norm={norm!r}")
        print("| optimizer | no EWC | " + " | ".join(f"λ = {g:g}" for g in grid) + " | best λ (validation) |")
        print("|---|---|" + "---|" * len(grid) + "---|")
        for opt_name in ("sgd", "adamw"):
            base = next(r for r in rows if r["opt"] == opt_name and r["lambda"] is None)
            mine = [r for r in rows if r["opt"] == opt_name and r["norm"] == norm]
            best = max(mine, key=lambda r: r["val_A"] + r["val_B"])
            cells = " | ".join(f"{r['test_A']:.2f} / {r['test_B']:.2f}" for r in mine)
            print(f"| {'SGD 0.1' if opt_name == 'sgd' else 'AdamW 1e-3'} | {base['test_A']:.2f} / "
                  f"{base['test_B']:.2f} | {cells} | {best['lambda']:g} |")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
