"""EWC++ for training loops: an online diagonal Fisher and a quadratic anchor penalty.

:class:`EWCPlusPlus` protects the parameters of any ``torch.nn.Module`` against forgetting. It keeps

* the within-task Fisher ``F`` (EMA of squared *task-loss* gradients since the last task boundary,
  one tensor per parameter),
* the consolidated pair ``(F*, θ*)``, which the penalty ``λ/2 · Σ F*·(θ − θ*)²`` uses. At each task
  boundary ``θ* ← θ`` and ``F* ← γ·F* + F_task`` (online EWC): ``F_task`` is this task's ``F``
  (optionally bias-corrected or normalised), ``γ`` (``task_decay``) shrinks each earlier task's weight
  once per later task, never per step, and ``F`` starts again from zero.

Both of these loops give the same result (same Fisher, same parameters up to float rounding)::

    loss = task_loss + ewc.penalty(); loss.backward(); ewc.update_fisher(); opt.step()
    # or
    task_loss.backward(); ewc.update_fisher(); ewc.add_penalty_grad_(); opt.step()

Everything per step stays on the parameters' device: the updates are ``torch._foreach_*`` calls
grouped by (device, dtype) over flat buffers, a non-finite step is skipped with a device-side
``torch.where`` and counted in a device tensor, and nothing is read back to the host.

Penalty contract (how ``update_fisher`` knows what to take out of ``.grad``):

* ``penalty()`` returns a tensor whose backward records its upstream gradient (the loss weight,
  times the AMP loss scale, summed over micro-batches) on the device. ``update_fisher`` subtracts
  exactly that multiple of ``λ·F*·(θ − θ*)``. Pass the ``GradScaler`` (constructor or
  ``update_fisher(grad_scaler=...)``) so the loss scale is divided out after ``scaler.unscale_``.
* ``add_penalty_grad_()`` records that it wrote into ``.grad``; the record holds while those gradient
  tensors are untouched (same objects, same version counters). Any later write — a new backward,
  ``zero_grad``, ``unscale_`` — ends it, so the usual order "update_fisher, then add_penalty_grad_,
  then step" never subtracts anything.
* Records are cleared by ``update_fisher()``, by ``reset_penalty_tracking()`` and after ``step()`` of
  any optimizer holding the protected parameters.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from rbank_torch.fisher_ops import FlatBuffer, constrain_, group_by_device_dtype, penalty_value

try:  # torch.distributed is optional on some builds
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except Exception:  # pragma: no cover - builds without distributed support
    dist = None  # type: ignore[assignment]
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["DEFAULT_DECAY", "DEFAULT_TASK_DECAY", "EWCPlusPlus", "FORMAT_NAME", "FORMAT_VERSION", "FisherNorm"]

FORMAT_NAME = "rbank_torch.ewc"
FORMAT_VERSION = 2

#: The Fisher EMA decay every entry point uses by default (constructor, callbacks, docs).
DEFAULT_DECAY = 0.99
#: The per-task factor γ of the across-task accumulation ``F* ← γ·F* + F_task``.
DEFAULT_TASK_DECAY = 1.0

Mode = Literal["online", "multi_task"]
FisherNorm = Literal["none", "mean", "max"]


def _is_dtensor(t: torch.Tensor) -> TypeGuard[DTensor]:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (an alias), or ``t`` itself."""
    if _is_dtensor(t):
        return t._local_tensor  # the storage the DTensor wraps; to_local() may return a view object
    return t


@dataclass
class _Group:
    """The parameters sharing one (device, dtype), with their state as flat buffers."""

    device: torch.device
    pdtype: torch.dtype
    fdtype: torch.dtype
    idx: list[int]
    shapes: list[torch.Size]
    fisher: FlatBuffer
    scratch: FlatBuffer
    fisher_star: FlatBuffer
    theta_star: FlatBuffer
    tasks: list[tuple[FlatBuffer, FlatBuffer]] = field(default_factory=list)
    const: torch.Tensor | None = None  # multi_task: Σ_t Σ F_t (θ*_t − θ*)², 0-dim
    work: FlatBuffer | None = None  # parameter-dtype scratch when fdtype != pdtype (CPU penalty gradient)


class _Penalty(torch.autograd.Function):
    """``λ/2 Σ F*(θ − θ*)²`` with a hand-written backward that also records its upstream gradient.

    The forward keeps ``W = F*·(θ − θ*)``: the backward returns ``λ·grad_out·W`` and hands ``W`` to
    :meth:`EWCPlusPlus.update_fisher`, which takes ``λ·c·W`` back out of ``.grad`` without recomputing it.
    """

    @staticmethod
    def forward(ctx: Any, ewc: EWCPlusPlus, *params: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            value, weighted = ewc._penalty_forward(list(params))
        ctx.ewc = ewc
        ctx.weighted = weighted
        ctx.save_for_backward(*params)
        return value

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ewc: EWCPlusPlus = ctx.ewc
        weighted: list[torch.Tensor] | None = ctx.weighted
        ctx.weighted = None  # handed over to update_fisher, which may reuse its memory
        if weighted is None:  # a second backward through a retained graph
            with torch.no_grad():
                weighted = ewc._penalty_forward(list(ctx.saved_tensors))[1]
        go = grad_out.detach()
        ewc._pen_coef.add_(go.to(ewc._pen_coef.device, torch.float32))
        ewc._pen_weighted = weighted
        grads: list[torch.Tensor | None] = [None] * len(weighted)
        for g in ewc._groups:
            out = torch._foreach_mul([weighted[i] for i in g.idx], (go * ewc._lambda).to(g.device, g.pdtype))
            for i, d in zip(g.idx, out):
                grads[i] = d
        return (None, *grads)


def _step_post_hook(ref: weakref.ref, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    ewc = ref()
    if ewc is None:
        return
    holds = ewc._opt_cache.get(optimizer)
    if holds is None:
        mine = {id(p) for p in ewc._params}
        holds = any(id(p) in mine for grp in optimizer.param_groups for p in grp["params"])
        ewc._opt_cache[optimizer] = holds
    if holds:
        ewc.reset_penalty_tracking()


class EWCPlusPlus:
    """Online EWC (EWC++) for any module: running Fisher, consolidation, penalty, constraint.

    Args:
        module_or_named_params: an ``nn.Module`` (its parameters with ``requires_grad``), or an iterable of
            ``(name, parameter)`` pairs, or a mapping ``name → parameter``. Parameters may be DTensors
            (FSDP2): all state is then kept as local shards shaped like the local parameter shards.
        lambda_: penalty strength λ ≥ 0 (the base value when ``adapt_lambda``).
        decay: within-task Fisher EMA decay in ``[0, 1)``: ``F ← decay·F + (1 − decay)·g²`` (the
            estimate averages roughly the last ``1/(1 − decay)`` steps of the task).
        task_decay: γ in ``[0, 1]``, the across-task factor: at each ``consolidate`` the Fisher of every
            earlier task is multiplied by γ (1: every task keeps its full weight; 0: only the last task
            is protected).
        fisher_norm: how ``F_task`` is scaled before it is accumulated. ``"none"`` (default): as
            measured. ``"mean"``: divided by its mean over all protected parameters, so that
            ``λ/2·Σ F*(θ − θ*)²`` no longer depends on the size of the gradients (loss scale, how
            converged the model is, optimizer): λ is then the weight of a mean-importance parameter's
            squared displacement and transfers between models and optimizers. ``"max"``: divided by its
            maximum (every weight in ``[0, 1]``).
        mode: ``"online"`` (default): ``consolidate`` sets ``θ* ← θ``, ``F* ← γ·F* + F_task`` and resets
            ``F``. ``"multi_task"``: each ``consolidate`` stores this task's ``(F_task, θ)`` (earlier
            tasks' Fisher times γ), keeps the last ``max_tasks`` of them, resets ``F``, and the penalty is
            ``λ/2 Σ_t Σ F_t (θ − θ_t)²`` (evaluated as one merged quadratic, so a step costs the same as
            in online mode).
        max_tasks: how many task buffers ``"multi_task"`` keeps (the oldest is dropped).
        adapt_lambda: after each ``consolidate``, ``λ = clamp(lambda_·(1 + 0.1·num_tasks), min_lambda,
            max_lambda)``.
        min_lambda, max_lambda: the clamp range of ``adapt_lambda`` and ``set_lambda``.
        bias_correction: take ``F_task = F / (1 − decay^n)`` (``n`` = Fisher updates since the last
            boundary, where ``F`` started from zero), a weighted mean of this task's ``g²`` whatever the
            task's length. Default ``False``: ``F_task = F``, which underweights a task short compared
            with ``1/(1 − decay)`` (by the factor ``1 − decay^n``: 0.1 % after 700 steps at decay 0.99).
        fisher_dtype: dtype of ``F`` and ``F*`` (default: each parameter's dtype). ``torch.float32`` keeps
            the EMA meaningful for bf16/fp16 parameters, where ``decay·F`` may round back to ``F``.
        detect_boundary: track per-parameter-tensor gradient statistics (running mean and variance of
            ``log‖g‖`` since the last boundary) and latch :attr:`boundary_detected` when the mean
            ``|z|`` exceeds ``boundary_threshold`` for ``boundary_patience`` consecutive updates after
            ``boundary_warmup`` updates.
        boundary_threshold, boundary_warmup, boundary_patience: see ``detect_boundary``.
        auto_consolidate: with ``detect_boundary``, call :meth:`consolidate` when a boundary is latched.
            The flag is read on the host once every ``boundary_check_every`` Fisher updates (the only
            host synchronisation, amortised).
        boundary_check_every: see ``auto_consolidate``.
        grad_scaler: the ``torch.amp.GradScaler`` whose scale multiplies the loss, if any (see the
            module docstring); ``update_fisher`` must then run after ``scaler.unscale_(optimizer)``.
        sync_sharded: with DTensor parameters and an initialised process group, all-reduce the
            non-finite flag (and the boundary statistics) so every rank skips the same steps.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> ewc = EWCPlusPlus(model, lambda_=100.0)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> ewc.update_fisher(); ewc.consolidate()
        >>> float(ewc.penalty().detach())
        0.0
    """

    def __init__(
        self,
        module_or_named_params: nn.Module | Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
        lambda_: float = 2000.0,
        decay: float = DEFAULT_DECAY,
        *,
        task_decay: float = DEFAULT_TASK_DECAY,
        fisher_norm: FisherNorm = "none",
        mode: Mode = "online",
        max_tasks: int = 10,
        adapt_lambda: bool = False,
        min_lambda: float = 100.0,
        max_lambda: float = 15000.0,
        bias_correction: bool = False,
        fisher_dtype: torch.dtype | None = None,
        detect_boundary: bool = False,
        boundary_threshold: float = 2.0,
        boundary_warmup: int = 50,
        boundary_patience: int = 5,
        auto_consolidate: bool = False,
        boundary_check_every: int = 10,
        grad_scaler: torch.amp.GradScaler | None = None,
        sync_sharded: bool = True,
    ) -> None:
        self._base_lambda = _check_nonneg(lambda_, "lambda_")
        self.decay = float(decay)
        if not (math.isfinite(self.decay) and 0.0 <= self.decay < 1.0):
            raise ValueError(f"decay must be within [0, 1), got {decay!r}")
        self.task_decay = _check_unit(task_decay, "task_decay")
        if fisher_norm not in ("none", "mean", "max"):
            raise ValueError(f"fisher_norm must be 'none', 'mean' or 'max', got {fisher_norm!r}")
        self.fisher_norm: FisherNorm = fisher_norm
        if mode not in ("online", "multi_task"):
            raise ValueError(f"mode must be 'online' or 'multi_task', got {mode!r}")
        self.mode: Mode = mode
        if int(max_tasks) < 1:
            raise ValueError(f"max_tasks must be >= 1, got {max_tasks!r}")
        self.max_tasks = int(max_tasks)
        self.min_lambda = _check_nonneg(min_lambda, "min_lambda")
        self.max_lambda = _check_nonneg(max_lambda, "max_lambda")
        if self.min_lambda > self.max_lambda:
            raise ValueError(f"min_lambda ({min_lambda}) must not exceed max_lambda ({max_lambda})")
        self.adapt_lambda = bool(adapt_lambda)
        self.bias_correction = bool(bias_correction)
        if fisher_dtype is not None and not fisher_dtype.is_floating_point:
            raise ValueError(f"fisher_dtype must be a floating dtype, got {fisher_dtype}")
        self.fisher_dtype = fisher_dtype
        self.detect_boundary = bool(detect_boundary)
        self.boundary_threshold = _check_nonneg(boundary_threshold, "boundary_threshold")
        if int(boundary_warmup) < 2:
            raise ValueError(f"boundary_warmup must be >= 2, got {boundary_warmup!r}")
        self.boundary_warmup = int(boundary_warmup)
        if int(boundary_patience) < 1:
            raise ValueError(f"boundary_patience must be >= 1, got {boundary_patience!r}")
        self.boundary_patience = int(boundary_patience)
        if auto_consolidate and not detect_boundary:
            raise ValueError("auto_consolidate=True needs detect_boundary=True")
        self.auto_consolidate = bool(auto_consolidate)
        if int(boundary_check_every) < 1:
            raise ValueError(f"boundary_check_every must be >= 1, got {boundary_check_every!r}")
        self.boundary_check_every = int(boundary_check_every)
        self.grad_scaler = grad_scaler
        self.sync_sharded = bool(sync_sharded)

        self._names, self._params = _collect_params(module_or_named_params)
        self._any_dtensor = any(_is_dtensor(p) for p in self._params)
        self._lambda = self._base_lambda
        self._num_tasks = 0
        self._consolidated = False
        self._checks = 0
        self._pen_pending = False
        self._pen_weighted: list[torch.Tensor] | None = None
        self._add_records: list[tuple[torch.Tensor, int]] | None = None
        self._add_count = 0
        # CPU: read the non-finite flag on the host and update F in place (see update_fisher)
        self._host_select = True
        self._opt_cache: weakref.WeakKeyDictionary[torch.optim.Optimizer, bool] = weakref.WeakKeyDictionary()
        self._groups: list[_Group] = []
        self._meta: list[tuple[torch.device, torch.dtype, torch.Size]] = []
        self._build(None)
        handle = register_optimizer_step_post_hook(_bound_hook(weakref.ref(self)))
        weakref.finalize(self, handle.remove)

    # ------------------------------------------------------------------ layout
    @property
    def device(self) -> torch.device:
        """Device of the counters (that of the first parameter)."""
        return self._primary

    @property
    def names(self) -> list[str]:
        """Names of the protected parameters, in order."""
        return list(self._names)

    def _sharded(self) -> bool:
        return self._any_dtensor

    def _current_meta(self) -> list[tuple[torch.device, torch.dtype, torch.Size]]:
        out = []
        for p in self._params:
            loc = _local(p)
            out.append((loc.device, loc.dtype, loc.shape))
        return out

    def _build(self, per_param: Mapping[str, Any] | None) -> None:
        """(Re)build the flat groups from per-parameter tensors (``None``: fresh zero state)."""
        meta = self._current_meta()
        self._meta = meta
        self._primary = meta[0][0]
        locs = [_local(p) for p in self._params]
        new_groups: list[_Group] = []
        n_tasks = len(per_param["tasks_fisher"]) if per_param is not None else 0
        for (dev, pdt), idx in group_by_device_dtype(locs).items():
            fdt = self.fisher_dtype or pdt
            shapes = [locs[i].shape for i in idx]

            def take(key: str, dtype: torch.dtype, idx: list[int] = idx, dev: torch.device = dev) -> FlatBuffer:
                buf = FlatBuffer.zeros([locs[i].shape for i in idx], dtype=dtype, device=dev)
                if per_param is not None:
                    src = [per_param[key][i] for i in idx]
                    torch._foreach_copy_(buf.views, [s.to(dev, dtype) for s in src])
                return buf

            fisher = take("fisher", fdt)
            g = _Group(
                device=dev,
                pdtype=pdt,
                fdtype=fdt,
                idx=idx,
                shapes=shapes,
                fisher=fisher,
                scratch=fisher.empty_like(),
                fisher_star=take("fisher_star", fdt),
                theta_star=take("theta_star", pdt),
            )
            if per_param is not None:
                for k in range(n_tasks):
                    tf = _take_nested(per_param["tasks_fisher"][k], idx, locs, dev, fdt)
                    tt = _take_nested(per_param["tasks_theta"][k], idx, locs, dev, pdt)
                    g.tasks.append((tf, tt))
            new_groups.append(g)
        self._groups = new_groups
        if self.mode == "multi_task" and self._groups and self._groups[0].tasks:
            self._merge_tasks()
        old = getattr(self, "_counts", None)
        dev = self._primary
        if old is None:
            # (updates, skipped, since_reset) in one tensor: one where + one add_ per step
            self._counts = torch.zeros(3, dtype=torch.int64, device=dev)
            self._count_inc = torch.tensor([[0, 1, 0], [1, 0, 1]], dtype=torch.int64, device=dev)  # [bad, ok]
            self._pen_coef = torch.zeros((), dtype=torch.float32, device=dev)
            n = len(self._params)
            self._bd_n = torch.zeros((), dtype=torch.float32, device=dev)
            self._bd_mean = torch.zeros(n, dtype=torch.float32, device=dev)
            self._bd_m2 = torch.zeros(n, dtype=torch.float32, device=dev)
            self._bd_run = torch.zeros((), dtype=torch.float32, device=dev)
            self._bd_flag = torch.zeros((), dtype=torch.bool, device=dev)
            self._bd_score = torch.zeros((), dtype=torch.float32, device=dev)
        else:
            for name in (
                "_counts", "_count_inc", "_pen_coef", "_bd_n", "_bd_mean", "_bd_m2",
                "_bd_run", "_bd_flag", "_bd_score",
            ):
                setattr(self, name, getattr(self, name).to(dev))
        self._updates, self._skipped, self._since_reset = self._counts.unbind(0)  # 0-dim views

    def _export(self) -> dict[str, Any]:
        """Per-parameter (local) views of the whole state, in parameter order."""
        n = len(self._params)
        out: dict[str, Any] = {
            "fisher": [None] * n, "fisher_star": [None] * n, "theta_star": [None] * n,
            "tasks_fisher": [], "tasks_theta": [],
        }
        n_tasks = len(self._groups[0].tasks) if self._groups else 0
        out["tasks_fisher"] = [[None] * n for _ in range(n_tasks)]
        out["tasks_theta"] = [[None] * n for _ in range(n_tasks)]
        for g in self._groups:
            for j, i in enumerate(g.idx):
                out["fisher"][i] = g.fisher.views[j]
                out["fisher_star"][i] = g.fisher_star.views[j]
                out["theta_star"][i] = g.theta_star.views[j]
                for k, (tf, tt) in enumerate(g.tasks):
                    out["tasks_fisher"][k][i] = tf.views[j]
                    out["tasks_theta"][k][i] = tt.views[j]
        return out

    def _sync_layout(self) -> None:
        """Follow the parameters after ``module.to(device / dtype)`` (cheap check, rebuild on change)."""
        params = self._params
        meta = self._meta
        if self._any_dtensor:
            params = [_local(p) for p in params]
        for p, m in zip(params, meta):
            if p.dtype is not m[1] or p.device != m[0]:
                break
        else:
            return
        params = self._params
        for i, (p, m) in enumerate(zip(params, meta)):
            if _local(p).shape != m[2]:
                raise RuntimeError(
                    f"parameter {self._names[i]!r} changed shape from {tuple(m[2])} to {tuple(_local(p).shape)}"
                )
        self._build(self._export())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> EWCPlusPlus:
        """Re-sync the buffers with the parameters' current device and dtype.

        Buffers follow the parameters automatically at every call; this method exists for symmetry with
        ``nn.Module.to`` and returns ``self``. ``device`` and ``dtype``, when given, must match the
        parameters (the buffers cannot live elsewhere than the parameters they protect).
        """
        self._sync_layout()
        for name, p in zip(self._names, self._params):
            if device is not None and _local(p).device != torch.device(device):
                raise ValueError(f"device={device} differs from parameter {name!r} on {_local(p).device}; move the module")
            if dtype is not None and p.dtype != dtype:
                raise ValueError(f"dtype={dtype} differs from parameter {name!r} ({p.dtype}); convert the module")
        return self

    # ------------------------------------------------------------------ properties
    @property
    def lambda_(self) -> float:
        """The current λ."""
        return self._lambda

    def set_lambda(self, value: float) -> None:
        """Set λ, clamped to ``[min_lambda, max_lambda]``."""
        v = _check_nonneg(value, "value")
        self._lambda = min(max(v, self.min_lambda), self.max_lambda)

    @property
    def num_tasks(self) -> int:
        """Number of consolidations (online) or of task buffers kept (multi_task)."""
        return len(self._groups[0].tasks) if self.mode == "multi_task" and self._groups else self._num_tasks

    @property
    def consolidated(self) -> bool:
        """Whether ``consolidate`` ran at least once (before that the penalty is zero)."""
        return self._consolidated

    @property
    def skipped_steps(self) -> torch.Tensor:
        """0-dim int64 device tensor: Fisher updates skipped for non-finite gradients (``int()`` syncs)."""
        return self._skipped

    @property
    def num_updates(self) -> torch.Tensor:
        """0-dim int64 device tensor: Fisher updates applied."""
        return self._updates

    @property
    def boundary_detected(self) -> bool:
        """Whether a task boundary is latched (reads one device flag: a host sync)."""
        return bool(self._bd_flag)

    @property
    def boundary_score(self) -> torch.Tensor:
        """0-dim float32: the mean ``|z|`` of the last update (0 during warm-up)."""
        return self._bd_score

    def _named(self, attr: str) -> dict[str, torch.Tensor]:
        self._sync_layout()
        out: dict[str, torch.Tensor] = {}
        for g in self._groups:
            buf: FlatBuffer = getattr(g, attr)
            for j, i in enumerate(g.idx):
                out[self._names[i]] = buf.views[j]
        return {n: out[n] for n in self._names}

    @property
    def fisher(self) -> dict[str, torch.Tensor]:
        """The running Fisher ``F``, name → (local) tensor shaped like the parameter (a live view)."""
        return self._named("fisher")

    @property
    def fisher_star(self) -> dict[str, torch.Tensor]:
        """The consolidated Fisher ``F*`` (merged over tasks in multi_task mode)."""
        return self._named("fisher_star")

    @property
    def theta_star(self) -> dict[str, torch.Tensor]:
        """The anchor ``θ*`` (Fisher-weighted merge over tasks in multi_task mode)."""
        return self._named("theta_star")

    @torch.no_grad()
    def metric_tensors(self) -> dict[str, torch.Tensor]:
        """What the callbacks log, as 0-dim float32 tensors on :attr:`device` (no host read).

        ``penalty``: the current ``λ/2·Σ F*(θ − θ*)²`` (one pass over the parameters); ``fisher_mean``:
        the mean of the within-task Fisher ``F``; ``fisher_star_mean``: the mean of ``F*``; ``lambda``:
        λ. With DTensor parameters the values are this rank's share (penalty) or local mean.
        """
        self._sync_layout()
        dev = self._primary
        total = sum(g.fisher.flat.numel() for g in self._groups)

        def mean(attr: str) -> torch.Tensor:
            s = torch.stack([getattr(g, attr).flat.sum(dtype=torch.float32).to(dev) for g in self._groups]).sum()
            return s / max(total, 1)

        return {
            "penalty": self.penalty().detach().to(torch.float32),
            "fisher_mean": mean("fisher"),
            "fisher_star_mean": mean("fisher_star"),
            "lambda": torch.tensor(self._lambda, dtype=torch.float32, device=dev),
        }

    def metrics(self) -> dict[str, float]:
        """:meth:`metric_tensors` read back as floats (one host synchronisation), plus ``num_tasks``."""
        out = {k: float(v) for k, v in self.metric_tensors().items()}
        out["num_tasks"] = float(self.num_tasks)
        return out

    def rebound(self, module_or_named_params: nn.Module | Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]
                ) -> EWCPlusPlus:
        """A new :class:`EWCPlusPlus` on other parameters with the same names and shapes, holding this state.

        Used when training moves on to a new module object of the same architecture (a new
        ``LightningModule``, a model reloaded from disk): the Fisher, ``F*``, ``θ*``, λ and configuration
        carry over by parameter name.

        Raises:
            ValueError: when the names or shapes differ (the message lists them).
        """
        new = EWCPlusPlus(
            module_or_named_params, lambda_=self._base_lambda, decay=self.decay, task_decay=self.task_decay,
            fisher_norm=self.fisher_norm, mode=self.mode, max_tasks=self.max_tasks, adapt_lambda=self.adapt_lambda,
            min_lambda=self.min_lambda, max_lambda=self.max_lambda, bias_correction=self.bias_correction,
            fisher_dtype=self.fisher_dtype, detect_boundary=self.detect_boundary,
            boundary_threshold=self.boundary_threshold, boundary_warmup=self.boundary_warmup,
            boundary_patience=self.boundary_patience, auto_consolidate=self.auto_consolidate,
            boundary_check_every=self.boundary_check_every, grad_scaler=self.grad_scaler,
            sync_sharded=self.sync_sharded,
        )
        if new._names != self._names:
            missing = [n for n in self._names if n not in new._names]
            extra = [n for n in new._names if n not in self._names]
            raise ValueError(
                f"cannot rebind EWC++ state to parameters with other names: missing {missing}, unexpected {extra}"
            )
        for name, a, b in zip(self._names, self._params, new._params):
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(
                    f"cannot rebind EWC++ state: parameter {name!r} has shape {tuple(b.shape)}, "
                    f"the state was built for {tuple(a.shape)}"
                )
        new.load_state_dict(self.state_dict())
        return new

    def holds(self, module_or_params: nn.Module | Iterable[torch.Tensor]) -> bool:
        """Whether this object protects exactly these parameter objects (a module: its trainable ones)."""
        params: list[torch.Tensor]
        if isinstance(module_or_params, nn.Module):
            params = [p for p in module_or_params.parameters() if p.requires_grad]
        else:
            params = list(module_or_params)
        return len(params) == len(self._params) and all(a is b for a, b in zip(params, self._params))

    # ------------------------------------------------------------------ per step
    def reset_penalty_tracking(self) -> None:
        """Forget what ``penalty()`` / ``add_penalty_grad_()`` contributed to ``.grad`` so far."""
        if self._pen_pending:
            self._pen_coef.zero_()
        self._pen_pending = False
        self._pen_weighted = None
        self._add_records = None
        self._add_count = 0

    def _local_grads(self) -> list[torch.Tensor | None]:
        if not self._any_dtensor:
            return [p.grad for p in self._params]
        out: list[torch.Tensor | None] = []
        for p in self._params:
            g = p.grad
            out.append(None if g is None else _local(g))
        return out

    def _penalty_coefficient(self, grad_scaler: torch.amp.GradScaler | None) -> torch.Tensor | float | None:
        """How many times ``λF*(θ−θ*)`` is in ``.grad`` now (device tensor or float), or None."""
        coef: torch.Tensor | float | None = None
        if self._pen_pending:
            c = self._pen_coef
            scaler = grad_scaler if grad_scaler is not None else self.grad_scaler
            if scaler is not None and scaler.is_enabled():
                scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else scaler._scale
                if scale is not None:
                    c = c / scale.to(c.device, torch.float32)
            coef = c
        if self._add_records is not None and self._records_valid():
            coef = float(self._add_count) if coef is None else coef + float(self._add_count)
        return coef

    def _records_valid(self) -> bool:
        assert self._add_records is not None
        for g, (rec, version) in zip(self._local_grads(), self._add_records):
            if g is not rec or g._version != version:
                return False
        return True

    @torch.no_grad()
    def update_fisher(self, *, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """``F ← decay·F + (1 − decay)·g²`` from the task-loss gradient in ``.grad``.

        Call after the last backward of the step (after every micro-batch when accumulating) and, with
        AMP, after ``scaler.unscale_(optimizer)``. The penalty's own contribution to ``.grad`` is taken
        out first (see the module docstring). A step whose gradients hold any NaN/inf leaves ``F``
        untouched (no decay either) and adds one to :attr:`skipped_steps`. Parameters whose ``.grad``
        is ``None`` keep their ``F``.

        Args:
            grad_scaler: overrides the constructor's ``grad_scaler`` for this call.
        """
        self._sync_layout()
        grads = self._local_grads()
        coef = self._penalty_coefficient(grad_scaler) if self._consolidated else None
        decay = self.decay
        flags: list[torch.Tensor] = []
        task_grads_all: list[torch.Tensor | None] = [None] * len(self._params)
        active: list[_Group] = []
        host_work: list[tuple[_Group, list[int], list[torch.Tensor] | tuple[torch.Tensor, ...]]] = []
        for g in self._groups:
            present = [j for j, i in enumerate(g.idx) if grads[i] is not None]
            if not present:
                continue
            active.append(g)
            host = self._host_select and g.device.type == "cpu"
            if not host:
                torch.mul(g.fisher.flat, decay, out=g.scratch.flat)  # [M]
            gs: list[torch.Tensor] | tuple[torch.Tensor, ...] = [t for i in g.idx if (t := grads[i]) is not None]
            if coef is not None:
                tg: list[torch.Tensor] | tuple[torch.Tensor, ...]
                if self._pen_weighted is not None:  # F*·(θ − θ*) handed over by the penalty (ours to reuse)
                    tg = [self._pen_weighted[g.idx[j]] for j in present]
                else:
                    theta = [_local(self._params[g.idx[j]]) for j in present]
                    tg = torch._foreach_sub(theta, [g.theta_star.views[j] for j in present])
                    torch._foreach_mul_(tg, [g.fisher_star.views[j] for j in present])
                if isinstance(coef, torch.Tensor):
                    torch._foreach_mul_(tg, (coef * -self._lambda).to(g.device, g.pdtype))
                else:
                    torch._foreach_mul_(tg, -coef * self._lambda)
                torch._foreach_add_(tg, gs)
                gs = tg
            for j, t in zip(present, gs):
                task_grads_all[g.idx[j]] = t
            if host:
                # NOTE: on CPU the flag is read on the host (there is no device to wait for) and F is
                # updated in place when finite: 7 passes over memory instead of 10 for scratch + where.
                gnorms = torch._foreach_norm(gs, 2, dtype=torch.promote_types(torch.float32, g.pdtype))
                flags.append(torch.isfinite(torch.stack(gnorms).sum()).to(self._primary))
                host_work.append((g, present, gs))
                continue
            sv = [g.scratch.views[j] for j in present]
            torch._foreach_addcmul_(sv, gs, gs, value=1.0 - decay)
            if len(present) != len(g.idx):
                missing = [j for j in range(len(g.idx)) if grads[g.idx[j]] is None]
                torch._foreach_copy_([g.scratch.views[j] for j in missing], [g.fisher.views[j] for j in missing])
            flags.append(torch.isfinite(g.scratch.flat.sum(dtype=torch.float32)).to(self._primary))
        self.reset_penalty_tracking()
        if not flags:
            return
        ok = flags[0]
        for f in flags[1:]:
            ok = ok & f
        norms: torch.Tensor | None = None
        if self.detect_boundary:
            norms = self._grad_sq_norms(task_grads_all)
        if self.sync_sharded and self._sharded() and dist is not None and dist.is_initialized():
            bad = (~ok).to(torch.float32).reshape(1)
            packed = bad if norms is None else torch.cat([norms, bad])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            ok = packed[-1] == 0
            if norms is not None:
                norms = packed[:-1]
        host_groups = {id(g) for g, _, _ in host_work}
        for g in active:
            if id(g) not in host_groups:
                torch.where(ok.to(g.device), g.scratch.flat, g.fisher.flat, out=g.fisher.flat)
        if host_work and bool(ok):
            for g, present, gs in host_work:
                if len(present) == len(g.idx):
                    g.fisher.flat.mul_(decay)
                    fv = g.fisher.views
                else:
                    fv = [g.fisher.views[j] for j in present]
                    torch._foreach_mul_(fv, decay)
                torch._foreach_addcmul_(fv, gs, gs, value=1.0 - decay)
        self._counts.add_(torch.where(ok, self._count_inc[1], self._count_inc[0]))  # no host read
        if norms is not None:
            self._boundary_step(norms, ok)
            if self.auto_consolidate:
                self._checks += 1
                if self._checks % self.boundary_check_every == 0 and bool(self._bd_flag):
                    self.consolidate()

    def _grad_sq_norms(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """``[P]`` float32 squared L2 norms (0 for a missing gradient), on the primary device."""
        zero = torch.zeros((), dtype=torch.float32, device=self._primary)
        present = [i for i, t in enumerate(grads) if t is not None]
        if not present:
            return zero.expand(len(grads)).clone()
        tensors = [t for t in grads if t is not None]
        sq: list[torch.Tensor] = [zero] * len(grads)  # a missing gradient stays 0 (no host index tensor)
        for (_d, dt), idx in group_by_device_dtype(tensors).items():
            norms = torch._foreach_norm([tensors[k] for k in idx], 2, dtype=torch.promote_types(torch.float32, dt))
            for k, n in zip(idx, norms):
                sq[present[k]] = n.to(self._primary, torch.float32)
        return torch.stack(sq).square()

    def _boundary_step(self, sq_norms: torch.Tensor, ok: torch.Tensor) -> None:
        """Device-side Welford statistics of ``log‖g‖`` per parameter tensor and the boundary latch."""
        x = torch.where(ok, 0.5 * torch.log(sq_norms.clamp_min(1e-60)), torch.zeros_like(sq_norms))  # [P]
        n = self._bd_n
        var = self._bd_m2 / (n - 1.0).clamp_min(1.0)
        valid = var > 1e-12
        z = torch.where(valid, (x - self._bd_mean).abs() / var.clamp_min(1e-12).sqrt(), torch.zeros_like(x))
        zbar = z.sum() / valid.sum().clamp_min(1).to(torch.float32)
        warm = n >= float(self.boundary_warmup)
        zbar = torch.where(warm, zbar, torch.zeros_like(zbar))
        high = warm & (zbar > self.boundary_threshold) & ok
        run = torch.where(high, self._bd_run + 1.0, torch.zeros_like(self._bd_run))
        self._bd_run.copy_(torch.where(ok, run, self._bd_run))
        self._bd_flag.logical_or_(self._bd_run >= float(self.boundary_patience))
        self._bd_score.copy_(zbar)
        inc = (ok & ~high).to(torch.float32)
        n1 = n + inc
        delta = x - self._bd_mean
        self._bd_mean.add_(inc * delta / n1.clamp_min(1.0))
        self._bd_m2.add_(inc * delta * (x - self._bd_mean))
        self._bd_n.copy_(n1)

    def reset_boundary(self) -> None:
        """Clear the boundary latch and restart the gradient statistics."""
        for t in (self._bd_n, self._bd_mean, self._bd_m2, self._bd_run, self._bd_score):
            t.zero_()
        self._bd_flag.zero_()

    # ------------------------------------------------------------------ penalty
    def _penalty_forward(self, params: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The penalty value and ``W = F*·(θ − θ*)`` per parameter (parameter order)."""
        acc = torch.promote_types(torch.float32, params[0].dtype)
        parts: list[torch.Tensor] = []
        weighted: list[torch.Tensor] = [params[0]] * len(params)
        for g in self._groups:
            ps = [params[i] for i in g.idx]
            diff = torch._foreach_sub(ps, g.theta_star.views)
            w = torch._foreach_mul(diff, g.fisher_star.views)
            if g.pdtype in (torch.float32, torch.float64):
                sums = [torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(w, diff)]
            else:
                torch._foreach_mul_(diff, w)
                sums = [d.sum(dtype=acc) for d in diff]
            parts.append(torch.stack(sums).sum().to(self._primary, acc))
            if g.const is not None:
                parts.append(g.const.to(self._primary, acc))
            for i, t in zip(g.idx, w):
                weighted[i] = t
        total = torch.stack(parts).sum() if len(parts) > 1 else parts[0]
        return total * (0.5 * self._lambda), weighted

    def _penalty_value(self, params: list[torch.Tensor]) -> torch.Tensor:
        acc = torch.promote_types(torch.float32, params[0].dtype)
        total = torch.zeros((), dtype=acc, device=self._primary)
        for g in self._groups:
            ps = [params[i] for i in g.idx]
            total = total + penalty_value(ps, g.theta_star.views, g.fisher_star.views, device=self._primary).to(acc)
            if g.const is not None:
                total = total + g.const.to(self._primary, acc)
        return total * (0.5 * self._lambda)

    def penalty(self) -> torch.Tensor:
        """``λ/2 · Σ F*·(θ − θ*)²`` as a 0-dim tensor (float32, or float64 for float64 parameters).

        Differentiable with respect to the parameters when grad mode is on; its backward records how
        much of ``λ·F*·(θ − θ*)`` went into ``.grad`` so that :meth:`update_fisher` can take it out.
        Zero (and constant) before the first :meth:`consolidate`. With FSDP2 the value is this rank's
        share (sum it over ranks for the total); the gradient is exact.

        Returns:
            0-dim tensor on :attr:`device`.
        """
        self._sync_layout()
        acc = torch.promote_types(torch.float32, self._meta[0][1])
        if not self._consolidated:
            return torch.zeros((), dtype=acc, device=self._primary)
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._params):
            locs = [p.to_local() if _is_dtensor(p) else p for p in self._params]
            self._pen_pending = True
            return _Penalty.apply(self, *locs)
        with torch.no_grad():
            return self._penalty_value([_local(p) for p in self._params])

    @torch.no_grad()
    def add_penalty_grad_(self) -> None:
        """Add ``λ·F*·(θ − θ*)`` to each ``.grad`` in place, with no autograd graph.

        Call after :meth:`update_fisher` (the Fisher then never sees it) or, if you call it before,
        right before :meth:`update_fisher` with no backward, ``zero_grad`` or ``unscale_`` in between
        (the contribution is then taken out). With AMP, call it after ``scaler.unscale_``. A ``None``
        gradient is created as zeros first.
        """
        self._sync_layout()
        if not self._consolidated:
            return
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads: list[torch.Tensor] = self._local_grads()  # type: ignore[assignment]
        locs = [_local(p) for p in self._params] if self._any_dtensor else self._params
        lam = self._lambda
        for g in self._groups:
            gs = [grads[i] for i in g.idx]
            ps = [locs[i] for i in g.idx]
            # NOTE: θ − θ* goes through the group's work buffer (the Fisher scratch, free between Fisher
            # updates) on every device: a fresh [M] buffer per call costs page faults on CPU (15 ms vs 6 ms
            # for 10 M parameters), and on CUDA `_foreach_sub` allocating one output per tensor cost
            # ~300 µs of host time per call for ~100 tensors (H100 profile), in a launch-bound step.
            work = self._work_buffer(g)
            torch._foreach_copy_(work.views, ps)
            work.flat.sub_(g.theta_star.flat)
            torch._foreach_addcmul_(gs, work.views, g.fisher_star.views, value=lam)
        prev_valid = self._add_records is not None and self._records_valid()
        self._add_count = (self._add_count if prev_valid else 0) + 1
        self._add_records = [(t, t._version) for t in grads]

    def _work_buffer(self, g: _Group) -> FlatBuffer:
        """A parameter-dtype buffer shaped like the group: the Fisher scratch when dtypes agree."""
        if g.fdtype == g.pdtype:
            return g.scratch
        if g.work is None:
            g.work = FlatBuffer.zeros(g.shapes, dtype=g.pdtype, device=g.device)
        return g.work

    @torch.no_grad()
    def apply_constraint_(self) -> None:
        """In place ``g ← g / (1 + λ·F*)`` on every ``.grad`` (call after :meth:`update_fisher`)."""
        self._sync_layout()
        if not self._consolidated:
            return
        grads = self._local_grads()
        for g in self._groups:
            pairs = [(t, g.fisher_star.views[j]) for j, i in enumerate(g.idx) if (t := grads[i]) is not None]
            if pairs:
                constrain_([a for a, _ in pairs], [b for _, b in pairs], self._lambda)

    # ------------------------------------------------------------------ consolidation
    def _task_scale(self) -> torch.Tensor | None:
        """The 0-dim float64 factor turning ``F`` into ``F_task`` (bias correction × normalisation), or None."""
        if self.fisher_norm != "none":
            return self._norm_scale()  # normalising cancels any bias correction (a common factor)
        if self.bias_correction:
            corr = 1.0 - torch.pow(torch.tensor(self.decay, dtype=torch.float64, device=self._primary),
                                   self._since_reset.to(torch.float64))
            return torch.where(corr > 0, 1.0 / corr.clamp_min(1e-300), torch.zeros_like(corr))
        return None

    def _norm_scale(self) -> torch.Tensor:
        """``1 / mean(F)`` or ``1 / max(F)`` over all protected parameters (all ranks when sharded); 0 for F = 0."""
        if self.fisher_norm == "mean":
            stats = torch.stack([
                torch.stack([g.fisher.flat.sum(dtype=torch.float64).to(self._primary) for g in self._groups]).sum(),
                torch.tensor(float(sum(g.fisher.flat.numel() for g in self._groups)), dtype=torch.float64,
                             device=self._primary),
            ])
            if self.sync_sharded and self._sharded() and dist is not None and dist.is_initialized():
                dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            level = stats[0] / stats[1].clamp_min(1.0)
        else:
            maxes = [g.fisher.flat.max().to(self._primary, torch.float64) for g in self._groups if g.fisher.flat.numel()]
            level = torch.stack(maxes).max() if maxes else torch.zeros((), dtype=torch.float64, device=self._primary)
            if self.sync_sharded and self._sharded() and dist is not None and dist.is_initialized():
                dist.all_reduce(level, op=dist.ReduceOp.MAX)
        return torch.where(level > 0, 1.0 / level.clamp_min(1e-300), torch.zeros_like(level))

    @torch.no_grad()
    def consolidate(self) -> None:
        """Task boundary: ``θ* ← θ``, ``F* ← γ·F* + F_task`` and ``F`` restarts from zero (online), or
        store this task's buffer and merge (multi_task).

        ``F_task`` is ``F`` bias-corrected (``bias_correction``) and normalised (``fisher_norm``); γ is
        ``task_decay``. Also clears the boundary latch and statistics, and adapts λ when ``adapt_lambda``.
        """
        self._sync_layout()
        scale = self._task_scale()
        gamma = self.task_decay
        for g in self._groups:
            f_task = g.fisher.flat if scale is None else g.fisher.flat * scale.to(g.device, g.fdtype)
            theta = [_local(self._params[i]) for i in g.idx]
            if self.mode == "online":
                if gamma != 1.0:
                    g.fisher_star.flat.mul_(gamma)
                g.fisher_star.flat.add_(f_task)
                torch._foreach_copy_(g.theta_star.views, theta)
            else:
                if gamma != 1.0:
                    for tf_old, _ in g.tasks:
                        tf_old.flat.mul_(gamma)
                tf = FlatBuffer.wrap(f_task.clone() if scale is None else f_task, g.shapes)
                tt = FlatBuffer.zeros(g.shapes, dtype=g.pdtype, device=g.device)
                torch._foreach_copy_(tt.views, theta)
                g.tasks.append((tf, tt))
                if len(g.tasks) > self.max_tasks:
                    g.tasks.pop(0)
            g.fisher.flat.zero_()
        if self.mode == "multi_task":
            self._merge_tasks()
        self._since_reset.zero_()
        self._num_tasks += 1
        self._consolidated = True
        if self.adapt_lambda:
            factor = 1.0 + 0.1 * self.num_tasks
            self._lambda = min(max(self._base_lambda * factor, self.min_lambda), self.max_lambda)
        self.reset_boundary()

    def _merge_tasks(self) -> None:
        """``F* = Σ_t F_t``, ``θ* = Σ_t F_t θ_t / F*`` (latest ``θ_t`` where ``F* = 0``) and the constant."""
        for g in self._groups:
            fs = g.fisher_star.flat
            fs.zero_()
            num = torch.zeros_like(g.theta_star.flat, dtype=torch.promote_types(g.fdtype, g.pdtype))
            for tf, tt in g.tasks:
                fs.add_(tf.flat)
                num.addcmul_(tf.flat, tt.flat)
            latest = g.tasks[-1][1].flat
            merged = torch.where(fs > 0, num / torch.where(fs > 0, fs, torch.ones_like(fs)), latest)
            g.theta_star.flat.copy_(merged)
            acc = torch.promote_types(torch.float32, g.pdtype)
            const = torch.zeros((), dtype=acc, device=g.device)
            for tf, tt in g.tasks:
                d = tt.flat.to(acc) - g.theta_star.flat.to(acc)
                const = const + (tf.flat.to(acc) * d * d).sum()
            g.const = const

    # ------------------------------------------------------------------ state
    def _config(self) -> dict[str, Any]:
        return {
            "base_lambda": self._base_lambda,
            "decay": self.decay,
            "task_decay": self.task_decay,
            "fisher_norm": self.fisher_norm,
            "mode": self.mode,
            "max_tasks": self.max_tasks,
            "adapt_lambda": self.adapt_lambda,
            "min_lambda": self.min_lambda,
            "max_lambda": self.max_lambda,
            "bias_correction": self.bias_correction,
            "detect_boundary": self.detect_boundary,
        }

    def _shapes(self) -> list[list[int]]:
        return [list(p.shape) for p in self._params]

    def state_dict(self) -> dict[str, Any]:
        """All state: Fisher, anchors, task buffers, counters, λ and the configuration.

        Tensors are live views on the parameters' devices (like ``nn.Module.state_dict``); for DTensor
        parameters they are DTensors with the parameters' mesh and placements, so
        ``torch.distributed.checkpoint`` can save them.

        Returns:
            ``{"format", "format_version", "config", "lambda", "num_tasks", "consolidated", "names",
            "counters": {...}, "boundary": {...}, "fisher": {name: T}, "fisher_star": {...},
            "theta_star": {...}, "tasks": [{"fisher": {...}, "theta_star": {...}}, ...]}``.
        """
        self._sync_layout()
        exp = self._export()

        def wrap(values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            out = {}
            for name, p, v in zip(self._names, self._params, values):
                if _is_dtensor(p):
                    v = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                           shape=p.shape, stride=p.stride())
                out[name] = v
            return out

        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config": self._config(),
            "lambda": self._lambda,
            "num_tasks": self._num_tasks,
            "consolidated": self._consolidated,
            "names": list(self._names),
            "counters": {"updates": self._updates, "skipped": self._skipped, "since_reset": self._since_reset},
            "boundary": {
                "n": self._bd_n, "mean": self._bd_mean, "m2": self._bd_m2, "run": self._bd_run,
                "flag": self._bd_flag, "score": self._bd_score,
            },
            "fisher": wrap(exp["fisher"]),
            "fisher_star": wrap(exp["fisher_star"]),
            "theta_star": wrap(exp["theta_star"]),
            "tasks": [
                {"fisher": wrap(tf), "theta_star": wrap(tt)}
                for tf, tt in zip(exp["tasks_fisher"], exp["tasks_theta"])
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` (names and shapes must match this object's parameters).

        Values are copied to the parameters' current device and dtype. The configuration stored in
        ``state`` (decay, mode, λ bounds …) replaces this object's.

        Raises:
            ValueError: naming the key for a wrong format, missing/unexpected names or a shape mismatch.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a mapping, got {type(state).__name__}")
        if state.get("format") != FORMAT_NAME:
            raise ValueError(f"state['format'] must be {FORMAT_NAME!r}, got {state.get('format')!r}")
        if int(state.get("format_version", -1)) > FORMAT_VERSION:
            raise ValueError(
                f"state['format_version'] {state.get('format_version')} is newer than supported ({FORMAT_VERSION})"
            )
        self._sync_layout()
        cfg = state["config"]
        mode = cfg["mode"]
        if mode not in ("online", "multi_task"):
            raise ValueError(f"state['config']['mode'] must be 'online' or 'multi_task', got {mode!r}")
        locs = [_local(p) for p in self._params]

        def unwrap(section: str, d: Any) -> list[torch.Tensor]:
            if not isinstance(d, Mapping):
                raise ValueError(f"state[{section!r}] must be a mapping name -> tensor")
            missing = [n for n in self._names if n not in d]
            extra = [n for n in d if n not in set(self._names)]
            if missing or extra:
                raise ValueError(f"state[{section!r}] names do not match the parameters: missing {missing}, unexpected {extra}")
            out = []
            for name, p, loc in zip(self._names, self._params, locs):
                v = d[name]
                if not isinstance(v, torch.Tensor):
                    raise ValueError(f"state[{section!r}][{name!r}] must be a tensor, got {type(v).__name__}")
                if _is_dtensor(v):
                    if tuple(v.shape) != tuple(p.shape):
                        raise ValueError(f"state[{section!r}][{name!r}] has shape {tuple(v.shape)}, expected {tuple(p.shape)}")
                    v = v.to_local()
                if tuple(v.shape) != tuple(loc.shape):
                    raise ValueError(
                        f"state[{section!r}][{name!r}] has shape {tuple(v.shape)}, expected {tuple(loc.shape)}"
                    )
                if not v.dtype.is_floating_point:
                    raise ValueError(f"state[{section!r}][{name!r}] must be floating point, got {v.dtype}")
                out.append(v.detach())
            return out

        tasks = state.get("tasks", [])
        if not isinstance(tasks, (list, tuple)):
            raise ValueError(f"state['tasks'] must be a list, got {type(tasks).__name__}")
        for k, t in enumerate(tasks):
            if not isinstance(t, Mapping) or "fisher" not in t or "theta_star" not in t:
                raise ValueError(f"state['tasks'][{k}] must be a mapping with 'fisher' and 'theta_star'")
        for key in ("fisher", "fisher_star", "theta_star", "lambda", "num_tasks", "consolidated", "counters"):
            if key not in state:
                raise ValueError(f"state[{key!r}] is missing")
        fisher = unwrap("fisher", state["fisher"])
        fisher_star = unwrap("fisher_star", state["fisher_star"])
        theta_star = unwrap("theta_star", state["theta_star"])
        tasks_fisher = [unwrap(f"tasks[{k}].fisher", t["fisher"]) for k, t in enumerate(tasks)]
        tasks_theta = [unwrap(f"tasks[{k}].theta_star", t["theta_star"]) for k, t in enumerate(tasks)]
        # every value is checked before anything is assigned: a bad state changes nothing
        for section, flat in (
            ("fisher", fisher),
            ("fisher_star", fisher_star),
            ("tasks[].fisher", [t for ts in tasks_fisher for t in ts]),
        ):
            for t in flat:
                if t.numel() and not bool(torch.isfinite(t).all() and (t >= 0).all()):
                    raise ValueError(f"state[{section!r}] must hold finite values >= 0 (a Fisher diagonal)")
        for section, flat in (("theta_star", theta_star), ("tasks[].theta_star", [t for ts in tasks_theta for t in ts])):
            for t in flat:
                if t.numel() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"state[{section!r}] must hold finite values")
        per_param = {
            "fisher": fisher,
            "fisher_star": fisher_star,
            "theta_star": theta_star,
            "tasks_fisher": tasks_fisher,
            "tasks_theta": tasks_theta,
        }

        def num(key: str, value: Any, kind: type = float) -> Any:
            try:
                v = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be a number, got {value!r}") from None
            if kind is float and not math.isfinite(v):
                raise ValueError(f"{key} must be finite, got {value!r}")
            return v

        for key in ("base_lambda", "decay", "max_tasks", "adapt_lambda", "min_lambda", "max_lambda",
                    "bias_correction"):
            if key not in cfg:
                raise ValueError(f"state['config'][{key!r}] is missing")
        base_lambda = _check_nonneg(cfg["base_lambda"], "state['config']['base_lambda']")
        decay = num("state['config']['decay']", cfg["decay"])
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"state['config']['decay'] must be within [0, 1), got {decay}")
        # format 1 had neither key (its online F* was the last task's F alone): keep this object's values
        task_decay = _check_unit(cfg.get("task_decay", self.task_decay), "state['config']['task_decay']")
        fisher_norm = cfg.get("fisher_norm", self.fisher_norm)
        if fisher_norm not in ("none", "mean", "max"):
            raise ValueError(f"state['config']['fisher_norm'] must be 'none', 'mean' or 'max', got {fisher_norm!r}")
        max_tasks = num("state['config']['max_tasks']", cfg["max_tasks"], int)
        if max_tasks < 1:
            raise ValueError(f"state['config']['max_tasks'] must be >= 1, got {max_tasks}")
        if len(tasks) > max_tasks:
            raise ValueError(f"state['tasks'] holds {len(tasks)} task buffers, more than max_tasks={max_tasks}")
        min_lambda = _check_nonneg(cfg["min_lambda"], "state['config']['min_lambda']")
        max_lambda = _check_nonneg(cfg["max_lambda"], "state['config']['max_lambda']")
        if min_lambda > max_lambda:
            raise ValueError(f"state['config']['min_lambda'] ({min_lambda}) must not exceed max_lambda ({max_lambda})")
        lam = _check_nonneg(state["lambda"], "state['lambda']")
        num_tasks = num("state['num_tasks']", state["num_tasks"], int)
        if num_tasks < 0:
            raise ValueError(f"state['num_tasks'] must be >= 0, got {num_tasks}")
        counters_in = state["counters"]
        if not isinstance(counters_in, Mapping):
            raise ValueError("state['counters'] must be a mapping")
        counters: list[tuple[str, torch.Tensor]] = []
        for key, attr in (("updates", "_updates"), ("skipped", "_skipped"), ("since_reset", "_since_reset")):
            if key not in counters_in:
                raise ValueError(f"state['counters'][{key!r}] is missing")
            v = torch.as_tensor(counters_in[key])
            if v.numel() != 1 or not bool(torch.isfinite(v.double()).all()) or float(v) < 0:
                raise ValueError(f"state['counters'][{key!r}] must be one count >= 0, got {counters_in[key]!r}")
            counters.append((attr, v.reshape(getattr(self, attr).shape)))
        boundary: list[tuple[str, torch.Tensor]] = []
        bd = state.get("boundary")
        if bd is not None:
            if not isinstance(bd, Mapping):
                raise ValueError("state['boundary'] must be a mapping")
            for key, attr in (("n", "_bd_n"), ("mean", "_bd_mean"), ("m2", "_bd_m2"), ("run", "_bd_run"),
                              ("flag", "_bd_flag"), ("score", "_bd_score")):
                if key not in bd:
                    raise ValueError(f"state['boundary'][{key!r}] is missing")
                v = torch.as_tensor(bd[key])
                want = tuple(getattr(self, attr).shape)
                if tuple(v.shape) != want:
                    raise ValueError(f"state['boundary'][{key!r}] must have shape {want}, got {tuple(v.shape)}")
                if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    raise ValueError(f"state['boundary'][{key!r}] must hold finite values")
                boundary.append((attr, v))

        # apply
        self._base_lambda = base_lambda
        self.decay = decay
        self.task_decay = task_decay
        self.fisher_norm = fisher_norm
        self.mode = mode
        self.max_tasks = max_tasks
        self.adapt_lambda = bool(cfg["adapt_lambda"])
        self.min_lambda = min_lambda
        self.max_lambda = max_lambda
        self.bias_correction = bool(cfg["bias_correction"])
        self._lambda = lam
        self._num_tasks = num_tasks
        self._consolidated = bool(state["consolidated"])
        self._build(per_param)
        dev = self._primary
        for attr, v in counters:
            getattr(self, attr).copy_(v.to(dev))
        for attr, v in boundary:
            getattr(self, attr).copy_(v.to(dev))
        self.reset_penalty_tracking()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state to a safetensors file atomically (temp file in the same folder, fsync, rename).

        With DTensor parameters each rank writes its local shards: give each rank its own path.

        Args:
            path: destination file.
        """
        from safetensors.torch import save as st_save

        sd = self.state_dict()
        tensors: dict[str, torch.Tensor] = {}

        def put(key: str, t: torch.Tensor) -> None:
            if _is_dtensor(t):
                t = t.to_local()
            tensors[key] = t.detach().to("cpu", copy=True).contiguous()

        for section in ("fisher", "fisher_star", "theta_star"):
            for name, t in sd[section].items():
                put(f"{section}/{name}", t)
        for k, task in enumerate(sd["tasks"]):
            for section in ("fisher", "theta_star"):
                for name, t in task[section].items():
                    put(f"tasks/{k}/{section}/{name}", t)
        for key, t in sd["counters"].items():
            put(f"counters/{key}", t)
        for key, t in sd["boundary"].items():
            put(f"boundary/{key}", t)
        meta = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "config": json.dumps(sd["config"]),
            "lambda": repr(float(sd["lambda"])),
            "num_tasks": str(sd["num_tasks"]),
            "num_task_buffers": str(len(sd["tasks"])),
            "consolidated": "1" if sd["consolidated"] else "0",
            "names": json.dumps(sd["names"]),
            "shapes": json.dumps(self._shapes()),
            "local_shards": "1" if self._sharded() else "0",
        }
        from .snapshot import atomic_write_bytes

        data = st_save(tensors, metadata=meta)
        atomic_write_bytes(path, lambda f: f.write(data))

    def load(self, path: str | os.PathLike[str]) -> None:
        """Load a file written by :meth:`save` (no code is executed; names and shapes are validated).

        Raises:
            ValueError: naming the file and the problem (format, names, shapes).
        """
        from safetensors import safe_open

        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"path {path!r} is not a readable safetensors file: {e}") from e
        if meta.get("format") != FORMAT_NAME:
            raise ValueError(f"path {path!r} is not an EWC++ file (format {meta.get('format')!r})")
        names = _meta_json(meta, "names", path)
        if names != self._names:
            missing = [n for n in self._names if n not in names]
            extra = [n for n in names if n not in self._names]
            raise ValueError(f"path {path!r}: parameter names differ: missing {missing}, unexpected {extra}")
        shapes = _meta_json(meta, "shapes", path)
        for name, s, p in zip(names, shapes, self._params):
            if list(p.shape) != list(s):
                raise ValueError(f"path {path!r}: parameter {name!r} has shape {tuple(s)} in the file, {tuple(p.shape)} here")

        def section(prefix: str) -> dict[str, torch.Tensor]:
            out = {}
            for name in names:
                key = f"{prefix}/{name}"
                if key not in tensors:
                    raise ValueError(f"path {path!r}: tensor {key!r} is missing")
                out[name] = tensors[key]
            return out

        n_tasks = int(meta.get("num_task_buffers", "0"))
        state = {
            "format": FORMAT_NAME,
            "format_version": int(meta["format_version"]),
            "config": _meta_json(meta, "config", path),
            "lambda": float(meta["lambda"]),
            "num_tasks": int(meta["num_tasks"]),
            "consolidated": meta["consolidated"] == "1",
            "names": names,
            "counters": {k: tensors[f"counters/{k}"] for k in ("updates", "skipped", "since_reset")},
            "boundary": {k: tensors[f"boundary/{k}"] for k in ("n", "mean", "m2", "run", "flag", "score")},
            "fisher": section("fisher"),
            "fisher_star": section("fisher_star"),
            "theta_star": section("theta_star"),
            "tasks": [
                {"fisher": section(f"tasks/{k}/fisher"), "theta_star": section(f"tasks/{k}/theta_star")}
                for k in range(n_tasks)
            ],
        }
        self.load_state_dict(state)

    def __repr__(self) -> str:
        return (
            f"EWCPlusPlus(params={len(self._params)}, lambda_={self._lambda:g}, decay={self.decay:g}, "
            f"mode={self.mode!r}, num_tasks={self.num_tasks}, device={self._primary})"
        )


def _bound_hook(ref: weakref.ref) -> Any:
    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        _step_post_hook(ref, optimizer, args, kwargs)

    return hook


def _take_nested(
    src: list[torch.Tensor | None], idx: list[int], locs: list[torch.Tensor], dev: torch.device, dtype: torch.dtype
) -> FlatBuffer:
    buf = FlatBuffer.zeros([locs[i].shape for i in idx], dtype=dtype, device=dev)
    torch._foreach_copy_(buf.views, [src[i].to(dev, dtype) for i in idx])  # type: ignore[union-attr]
    return buf


def _check_unit(value: Any, name: str) -> float:
    v = _check_nonneg(value, name)
    if v > 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {value!r}")
    return v


def _check_nonneg(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def _collect_params(
    src: nn.Module | Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
) -> tuple[list[str], list[torch.Tensor]]:
    pairs: list[tuple[str, torch.Tensor]]
    if isinstance(src, nn.Module):
        pairs = [(n, p) for n, p in src.named_parameters() if p.requires_grad]
    elif isinstance(src, Mapping):
        pairs = list(src.items())
    else:
        try:
            pairs = list(src)
        except TypeError:
            raise ValueError(
                "module_or_named_params must be an nn.Module, an iterable of (name, parameter) pairs or a mapping"
            ) from None
    if not pairs:
        raise ValueError("module_or_named_params has no trainable parameters")
    names: list[str] = []
    params: list[torch.Tensor] = []
    seen: set[str] = set()
    for item in pairs:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"module_or_named_params must yield (name, parameter) pairs, got {item!r}")
        name, p = item
        if not isinstance(name, str):
            raise ValueError(f"parameter names must be strings, got {name!r}")
        if name in seen:
            raise ValueError(f"parameter name {name!r} appears twice in module_or_named_params")
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"parameter {name!r} must be a tensor, got {type(p).__name__}")
        if not p.dtype.is_floating_point:
            raise ValueError(f"parameter {name!r} must be floating point, got {p.dtype}")
        if not p.requires_grad:
            raise ValueError(f"parameter {name!r} does not require grad")
        seen.add(name)
        names.append(name)
        params.append(p)
    return names, params


def _meta_json(meta: dict[str, str], key: str, path: Any) -> Any:
    """One JSON field of an EWC++ file's header; a missing, malformed or too deeply nested one is a
    ``ValueError`` naming the file and the field."""
    try:
        return json.loads(meta[key])
    except KeyError:
        raise ValueError(f"path {path!r}: the header has no {key!r} field") from None
    except (ValueError, RecursionError, TypeError) as e:
        raise ValueError(f"path {path!r}: header field {key!r} is not valid JSON ({type(e).__name__})") from None
