"""Cost of EWC++ in a training step of a small transformer (~10 M parameters in ~100 tensors).

Four step variants, run round-robin in one process (so machine-load drift hits them alike), median of
several steps after a warm-up:

* ``plain``         forward, backward, AdamW step
* ``ewc_penalty``   loss + ``ewc.penalty()``; backward; ``ewc.update_fisher()``; step
* ``ewc_grad``      backward; ``ewc.update_fisher()``; ``ewc.add_penalty_grad_()``; step
* ``loop``          the usual EWC code: penalty built per parameter in a Python loop with autograd
                    (``λ/2·Σ (F·(p − θ*)²).sum()``) added to the loss, and a per-parameter Fisher EMA loop

It also times the EWC work alone (same gradients, no forward/backward of the model) to give the
added cost without the noise of the full step.

Targets (CPU): ``ewc_grad`` ≤ 1.25× ``plain``; our added time ≤ ½ of the loop's added time (both
the full-step difference and the EWC work alone are reported). On CUDA: ``ewc_grad`` ≤ 1.05× ``plain``.

Usage::

    python benchmarks/bench_ewc.py                      # CPU, then CUDA when available
    python benchmarks/bench_ewc.py --device cpu --steps 15 --batch 8 --seq 128
    python benchmarks/bench_ewc.py --device cuda        # GPU only (batch --cuda-batch, default 32)
    python benchmarks/bench_ewc.py --quick              # smoke run: 3 steps after 1 warm-up

Appends rows ``(name, provider, x, median, p20, p80, device, version)`` to ``bench_results/bench_ewc.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F_

from rbank_torch.ewc import EWCPlusPlus

VARIANTS = ("plain", "ewc_penalty", "ewc_grad", "loop")


class TinyLM(nn.Module):
    """Pre-norm transformer LM: ``[B, T]`` token ids → ``[B, T, vocab]`` logits."""

    def __init__(self, vocab: int = 8192, d: int = 256, layers: int = 8, heads: int = 4, ff: int = 1024,
                 ctx: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))  # [B, T, D]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.head(self.norm(h))


class LoopEWC:
    """The straightforward EWC code: dicts of tensors, Python loops, penalty through autograd."""

    def __init__(self, model: nn.Module, lam: float, decay: float) -> None:
        self.model, self.lam, self.decay = model, lam, decay
        self.fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        self.fisher_star = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        self.theta_star = {n: p.detach().clone() for n, p in model.named_parameters()}

    def penalty(self) -> torch.Tensor:
        loss = 0.0
        for n, p in self.model.named_parameters():
            loss = loss + (self.fisher_star[n] * (p - self.theta_star[n]) ** 2).sum()
        return self.lam / 2 * loss

    @torch.no_grad()
    def update_fisher(self) -> None:
        for n, p in self.model.named_parameters():
            if p.grad is not None:
                self.fisher[n].mul_(self.decay).add_(p.grad**2, alpha=1 - self.decay)

    def consolidate(self) -> None:
        for n, p in self.model.named_parameters():
            self.fisher_star[n] = self.fisher[n].clone()
            self.theta_star[n] = p.detach().clone()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    s = sorted(xs)
    q = statistics.quantiles(s, n=5) if len(s) >= 2 else [s[0]] * 4
    return statistics.median(s), q[0], q[3]


def bench(device: torch.device, args) -> list[dict]:
    torch.manual_seed(0)
    batch = args.cuda_batch if device.type == "cuda" else args.batch
    model = TinyLM(ctx=args.seq).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = sum(1 for _ in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 8192, (batch, args.seq + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]

    def task_loss() -> torch.Tensor:
        return F_.cross_entropy(model(x).flatten(0, 1), y.flatten())

    ewc = EWCPlusPlus(model, lambda_=args.lam, decay=args.decay)
    loop = LoopEWC(model, args.lam, args.decay)
    # a non-trivial consolidated state so that every penalty is live
    task_loss().backward()
    ewc.update_fisher()
    loop.update_fisher()
    ewc.consolidate()
    loop.consolidate()
    opt.zero_grad(set_to_none=True)

    def step(variant: str) -> None:
        opt.zero_grad(set_to_none=True)
        if variant == "plain":
            task_loss().backward()
        elif variant == "ewc_penalty":
            (task_loss() + ewc.penalty()).backward()
            ewc.update_fisher()
        elif variant == "ewc_grad":
            task_loss().backward()
            ewc.update_fisher()
            ewc.add_penalty_grad_()
        else:
            (task_loss() + loop.penalty()).backward()
            loop.update_fisher()
        opt.step()

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.warmup + args.steps):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
        for v in order:
            _sync(device)
            t0 = time.perf_counter()
            step(v)
            _sync(device)
            if r >= args.warmup:
                times[v].append(time.perf_counter() - t0)

    # the EWC work alone, on the gradients of one real backward
    opt.zero_grad(set_to_none=True)
    task_loss().backward()
    saved = [p.grad.clone() for p in model.parameters()]

    def restore() -> None:
        for p, g in zip(model.parameters(), saved):
            p.grad.copy_(g)

    def ours_grad() -> None:
        ewc.update_fisher()
        ewc.add_penalty_grad_()

    def ours_penalty() -> None:
        ewc.penalty().backward()
        ewc.update_fisher()

    def loop_work() -> None:
        loop.penalty().backward()
        loop.update_fisher()

    alone: dict[str, list[float]] = {"ewc_grad": [], "ewc_penalty": [], "loop": []}
    fns: dict[str, Callable[[], None]] = {"ewc_grad": ours_grad, "ewc_penalty": ours_penalty, "loop": loop_work}
    for r in range(args.warmup + 2 * args.steps):
        for k, fn in fns.items():
            restore()
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r >= args.warmup:
                alone[k].append(time.perf_counter() - t0)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    med = {v: _quantiles(t)[0] for v, t in times.items()}
    med_alone = {k: _quantiles(t)[0] for k, t in alone.items()}
    print(f"\n{dev_name}: TinyLM {n_params / 1e6:.1f} M parameters in {n_tensors} tensors, batch {batch}×{args.seq}, "
          f"AdamW, {args.steps} steps after {args.warmup} warm-up (median)")
    print(f"| {'variant':<12} | {'step ms':>8} | {'× plain':>7} | {'added ms':>8} | {'added / loop':>12} | "
          f"{'EWC work alone ms':>17} | {'alone / loop':>12} |")
    print("|" + "|".join("-" * w for w in (14, 10, 9, 10, 14, 19, 14)) + "|")
    added_loop = med["loop"] - med["plain"]
    for v in VARIANTS:
        added = med[v] - med["plain"]
        rel = f"{added / added_loop:.2f}" if v != "plain" and added_loop > 0 else "—"
        al = med_alone.get(v)
        al_s = f"{1e3 * al:.1f}" if al is not None else "—"
        al_rel = f"{al / med_alone['loop']:.2f}" if al is not None else "—"
        print(f"| {v:<12} | {1e3 * med[v]:>8.1f} | {med[v] / med['plain']:>7.3f} | {1e3 * added:>8.1f} | {rel:>12} | "
              f"{al_s:>17} | {al_rel:>12} |")
    target = 1.05 if device.type == "cuda" else 1.25
    r_grad = med["ewc_grad"] / med["plain"]
    r_alone = med_alone["ewc_grad"] / med_alone["loop"]
    r_added = (med["ewc_grad"] - med["plain"]) / added_loop if added_loop > 0 else float("nan")
    verdict = {True: "PASS", False: "FAIL"}
    print(f"ewc_grad step {r_grad:.3f}× plain (target ≤ {target}: {verdict[r_grad <= target]}); "
          f"added step time {r_added:.2f}× the loop's added time (target ≤ 0.5: {verdict[r_added <= 0.5]}); "
          f"EWC work alone {r_alone:.2f}× the loop's (target ≤ 0.5: {verdict[r_alone <= 0.5]})")

    rows = []
    for v, t in times.items():
        m, p20, p80 = _quantiles(t)
        rows.append({"name": "ewc_step", "provider": v, "x": n_params, "median": m, "p20": p20, "p80": p80,
                     "device": dev_name, "version": torch.__version__})
    for k, t in alone.items():
        m, p20, p80 = _quantiles(t)
        rows.append({"name": "ewc_work_alone", "provider": k, "x": n_params, "median": m, "p20": p20, "p80": p80,
                     "device": dev_name, "version": torch.__version__})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=9, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="3 timed steps after 1 warm-up (smoke run)")
    ap.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                    help="all: CPU, then CUDA when available")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step on CPU")
    ap.add_argument("--cuda-batch", type=int, default=32, help="sequences per step on CUDA")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lam", type=float, default=100.0)
    ap.add_argument("--decay", type=float, default=0.999)
    ap.add_argument("--cpu-only", action="store_true", help="same as --device cpu")
    ap.add_argument("--out", default="bench_results/bench_ewc.json")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup = 3, 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.cpu_only:
        args.device = "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    rows: list[dict] = []
    if args.device in ("all", "cpu"):
        rows += bench(torch.device("cpu"), args)
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        rows += bench(torch.device("cuda"), args)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    old = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
    stamp = {"machine": platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(args.out, "w") as f:
        json.dump(old + [{**r, **stamp} for r in rows], f, indent=1)
    print(f"appended {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
