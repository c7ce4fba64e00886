"""EWC++ (rbank_torch) side by side with Avalanche's ``EWCPlugin`` on permuted digits.

Not part of CI: Avalanche imports torchvision, whose PyPI wheels need PyPI's torch build, so this runs in
an environment of its own::

    python3 -m venv /tmp/ava && /tmp/ava/bin/pip install avalanche-lib scikit-learn safetensors
    /tmp/ava/bin/pip install --no-deps -e .
    flock /tmp/rbank-bench.lock /tmp/ava/bin/python benchmarks/ewc_vs_avalanche.py --tasks 3
    flock /tmp/rbank-bench.lock /tmp/ava/bin/python benchmarks/ewc_vs_avalanche.py --tasks 5

Set-up (the same for every method): scikit-learn's digits (1 797 images 8×8, no download), split per
seed 60/20/20 (train/validation/test, stratified); task 1 = the images, task k > 1 = the images under a
fixed random pixel permutation; MLP 64-128-128-10 (ReLU), SGD lr 0.1, batch 32, 20 epochs a task, one
thread. Every method sees the same batches: one ``DataLoader(shuffle=True)`` per task whose generator is
seeded by (seed, task) — the hand-written loops iterate it, and Avalanche's ``Naive`` strategy is given
the same loader (``make_train_dataloader`` overridden, nothing else). ``Naive`` without a plugin
reproduces the hand-written plain loop (its accuracies are printed beside it).

Methods: plain fine-tuning; rbank EWC++ at the library's defaults (``decay``, ``task_decay``,
``bias_correction``; form 2 of the loop, ``consolidate()`` after each task); Avalanche ``EWCPlugin``
``mode="online"`` (``decay_factor`` as ``--ava-decay``) and ``mode="separate"``. Each method's λ is
picked from the same grid on the validation split (average accuracy over all tasks after the last,
mean over seeds); the table is on the test split. Scale conventions differ: our penalty is
``λ/2·ΣF(θ − θ*)²``, Avalanche's ``λ·ΣF(θ − θ*)²``; our Fisher is a running average of squared
mini-batch gradients over the task, Avalanche's one extra pass over the task's data at its end.

Time per task: wall time of training (and, for the EWC methods, of the Fisher work and consolidation)
divided by the number of tasks, relative to the hand-written plain loop measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F_
from torch.utils.data import DataLoader, TensorDataset

from rbank_torch.ewc import DEFAULT_DECAY, DEFAULT_TASK_DECAY, EWCPlusPlus

GRID = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)


def split(seed: int) -> dict[str, torch.Tensor]:
    d = load_digits()
    x = d.data.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, random_state=seed, stratify=y)
    x_va, x_te, y_va, y_te = train_test_split(x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest)
    t = torch.from_numpy
    return {"x_train": t(x_tr), "y_train": t(y_tr), "x_val": t(x_va), "y_val": t(y_va),
            "x_test": t(x_te), "y_test": t(y_te)}


def perms(seed: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    return [torch.arange(64)] + [torch.randperm(64, generator=g) for _ in range(n - 1)]


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def loader(dataset: Any, seed: int, task: int, batch: int, collate: Any = None) -> DataLoader:
    g = torch.Generator().manual_seed(1_000 * seed + task)
    return DataLoader(dataset, batch_size=batch, shuffle=True, generator=g, collate_fn=collate)


@torch.no_grad()
def accuracies(model: nn.Module, sp: dict[str, torch.Tensor], ps: list[torch.Tensor], upto: int, part: str) -> list[float]:
    model.eval()
    out = [float((model(sp[f"x_{part}"][:, ps[k]]).argmax(1) == sp[f"y_{part}"]).float().mean()) for k in range(upto)]
    model.train()
    return out


def run_hand(seed: int, n_tasks: int, lam: float | None, args: argparse.Namespace) -> dict[str, Any]:
    sp, ps = split(seed), perms(seed, n_tasks)
    model = mlp(seed)
    ewc = EWCPlusPlus(model, lambda_=lam) if lam is not None else None
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    row: dict[str, Any] = {"val": [], "test": [], "seconds": 0.0}
    for t in range(n_tasks):
        dl = loader(TensorDataset(sp["x_train"][:, ps[t]], sp["y_train"]), seed, t, args.batch)
        t0 = time.perf_counter()
        for _ in range(args.epochs):
            for x, y in dl:
                opt.zero_grad()
                F_.cross_entropy(model(x), y).backward()
                if ewc is not None:
                    ewc.update_fisher()
                    ewc.add_penalty_grad_()
                opt.step()
        if ewc is not None:
            ewc.consolidate()
        row["seconds"] += time.perf_counter() - t0
        row["val"].append(accuracies(model, sp, ps, t + 1, "val"))
        row["test"].append(accuracies(model, sp, ps, t + 1, "test"))
    return row


def run_avalanche(seed: int, n_tasks: int, mode: str | None, lam: float, args: argparse.Namespace) -> dict[str, Any]:
    from avalanche.benchmarks import tensors_benchmark
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin, EWCPlugin

    sp, ps = split(seed), perms(seed, n_tasks)
    bench = tensors_benchmark(
        train_tensors=[(sp["x_train"][:, p], sp["y_train"]) for p in ps],
        test_tensors=[(sp["x_test"][:, p], sp["y_test"]) for p in ps],
        task_labels=[0] * n_tasks,
    )
    model = mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    plugins = [] if mode is None else [
        EWCPlugin(lam, mode=mode, decay_factor=args.ava_decay if mode == "online" else None)]
    task_box = {"t": 0}

    class SameBatches(Naive):  # type: ignore[misc]
        def make_train_dataloader(self, *a: Any, **kw: Any) -> None:
            ds = self.adapted_dataset
            self.dataloader = loader(ds, seed, task_box["t"], args.batch, getattr(ds, "collate_fn", None))

    strategy = SameBatches(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=args.batch,
                           train_epochs=args.epochs, device="cpu", plugins=plugins,
                           evaluator=EvaluationPlugin(loggers=[]))
    row: dict[str, Any] = {"val": [], "test": [], "seconds": 0.0}
    for t, exp in enumerate(bench.train_stream):
        task_box["t"] = t
        t0 = time.perf_counter()
        strategy.train(exp, num_workers=0)
        row["seconds"] += time.perf_counter() - t0
        row["val"].append(accuracies(model, sp, ps, t + 1, "val"))
        row["test"].append(accuracies(model, sp, ps, t + 1, "test"))
    return row


def avg_last(row: dict[str, Any], part: str) -> float:
    return statistics.fmean(row[part][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ava-decay", type=float, default=1.0, help="Avalanche online decay_factor")
    ap.add_argument("--grid", type=float, nargs="*", default=list(GRID))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    n = args.tasks
    t_start = time.perf_counter()

    runs: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
    runs[("plain", None)] = [run_hand(s, n, None, args) for s in seeds]
    runs[("ava_naive", None)] = [run_avalanche(s, n, None, 0.0, args) for s in seeds]
    for lam in args.grid:
        runs[("rbank", lam)] = [run_hand(s, n, lam, args) for s in seeds]
        for mode in ("online", "separate"):
            runs[(f"ava_{mode}", lam)] = [run_avalanche(s, n, mode, lam, args) for s in seeds]
        print(f"λ={lam:g}: " + ", ".join(
            f"{m} {statistics.fmean(avg_last(r, 'val') for r in runs[(m, lam)]):.3f}"
            for m in ("rbank", "ava_online", "ava_separate")) + " (validation)", flush=True)

    best: dict[str, float | None] = {"plain": None, "ava_naive": None}
    for m in ("rbank", "ava_online", "ava_separate"):
        best[m] = max(args.grid, key=lambda lam, m=m: statistics.fmean(avg_last(r, "val") for r in runs[(m, lam)]))

    # timing: the chosen λ of each method, measured again side by side (round-robin over the seeds)
    timing: dict[str, list[float]] = {m: [] for m in best}
    for s in seeds:
        for m, lam in best.items():
            if m == "plain":
                r = run_hand(s, n, None, args)
            elif m == "rbank":
                r = run_hand(s, n, lam, args)
            elif m == "ava_naive":
                r = run_avalanche(s, n, None, 0.0, args)
            else:
                r = run_avalanche(s, n, m.removeprefix("ava_"), float(lam or 0.0), args)
            timing[m].append(r["seconds"] / n)
    t_plain = statistics.median(timing["plain"])

    labels = {
        "plain": "plain fine-tuning (hand loop)",
        "ava_naive": "Avalanche Naive (no plugin)",
        "rbank": f"rbank EWC++ (decay {DEFAULT_DECAY:g}, task_decay {DEFAULT_TASK_DECAY:g})",
        "ava_online": f"Avalanche EWC online (decay_factor {args.ava_decay:g})",
        "ava_separate": "Avalanche EWC separate",
    }
    print(f"\npermuted digits, {n} tasks, MLP 64-128-128-10, SGD lr {args.lr}, batch {args.batch}, "
          f"{args.epochs} epochs/task, {len(seeds)} seeds, test split (mean ± sd); torch {torch.__version__}")
    print("| method | λ | average accuracy after last task | drop on task 1 | time per task vs plain |")
    print("|---|---|---|---|---|")
    summary = []
    for m in ("plain", "ava_naive", "rbank", "ava_online", "ava_separate"):
        rows = runs[(m, best[m])]
        avg = [avg_last(r, "test") for r in rows]
        drop = [r["test"][0][0] - r["test"][-1][0] for r in rows]
        ratio = statistics.median(timing[m]) / t_plain
        lam_s = "–" if best[m] is None else f"{best[m]:g}"
        print(f"| {labels[m]} | {lam_s} | {statistics.fmean(avg):.3f} ± {statistics.pstdev(avg):.3f} | "
              f"{statistics.fmean(drop):.3f} | {ratio:.2f} |")
        summary.append({"method": m, "lambda": best[m], "avg_acc": statistics.fmean(avg), "avg_acc_sd":
                        statistics.pstdev(avg), "drop_task1": statistics.fmean(drop), "time_ratio": ratio,
                        "seconds_per_task": statistics.median(timing[m])})
    ours = next(s for s in summary if s["method"] == "rbank")
    best_ava = max((s for s in summary if s["method"] in ("ava_online", "ava_separate")), key=lambda s: s["avg_acc"])
    online = next(s for s in summary if s["method"] == "ava_online")
    gap = 100 * (ours["avg_acc"] - best_ava["avg_acc"])
    print(f"rbank − best Avalanche ({best_ava['method']}): {gap:+.1f} points (target ≥ +1: "
          f"{'PASS' if gap >= 1.0 else 'FAIL'}); time per task {ours['seconds_per_task'] * 1e3:.0f} ms vs Avalanche "
          f"online {online['seconds_per_task'] * 1e3:.0f} ms (target ≤: "
          f"{'PASS' if ours['seconds_per_task'] <= online['seconds_per_task'] else 'FAIL'})")
    print(f"validation-chosen λ from grid {', '.join(f'{g:g}' for g in args.grid)}; "
          f"whole run {time.perf_counter() - t_start:.0f} s")
    out = args.out or f"bench_results/ewc_vs_avalanche_{n}tasks.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"config": vars(args), "summary": summary, "machine": platform.machine(),
                   "torch": torch.__version__,
                   "val": {f"{m}@{lam}": statistics.fmean(avg_last(r, "val") for r in rs)
                           for (m, lam), rs in runs.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
