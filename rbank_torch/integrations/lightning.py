"""PyTorch Lightning callback for EWC++.

Hook order inside one optimizer step of Lightning's automatic optimization::

    training_step → backward  (× accumulate_grad_batches)
    precision plugin: scaler.unscale_(optimizer)          (16-mixed only)
    on_before_optimizer_step   ← here: update_fisher(), then add_penalty_grad_()
    gradient clipping, optimizer.step(), zero_grad()

``on_after_backward`` is not used: it fires after *every* micro-batch and, with 16-mixed, before the
gradients are unscaled. ``on_before_optimizer_step`` fires once per optimizer step, after gradient
accumulation and after unscaling, which is exactly when the Fisher must read ``.grad``. The penalty
gradient is added right after the Fisher update, so the Fisher never sees it, and before gradient
clipping, so clipping bounds the total gradient.

Each ``fit`` binds the callback to the module being fitted: a new ``LightningModule`` object with the
same parameter names and shapes receives the state (Fisher, ``F*``, ``θ*``); one with other names or
shapes raises ``ValueError`` naming them.

Logged with ``pl_module.log`` every ``trainer.log_every_n_steps`` optimizer steps: ``ewc/penalty``,
``ewc/fisher_mean``, ``ewc/fisher_star_mean``, ``ewc/lambda`` (device tensors: no host read here).

Example:
    >>> cb = EWCPlusPlusCallback(lambda_=1000.0)                  # doctest: +SKIP
    >>> L.Trainer(max_epochs=5, callbacks=[cb]).fit(model, task_a)  # doctest: +SKIP
    >>> L.Trainer(max_epochs=5, callbacks=[cb]).fit(model, task_b)  # task A is protected  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from rbank_torch.ewc import DEFAULT_DECAY, EWCPlusPlus

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone ``pytorch_lightning`` distribution
    import pytorch_lightning as pl  # type: ignore[no-redef]

__all__ = ["EWCPlusPlusCallback"]


class EWCPlusPlusCallback(pl.Callback):
    """Keep an :class:`EWCPlusPlus` on the trained module: Fisher every optimizer step, penalty, consolidation.

    Args:
        lambda_: penalty strength λ.
        decay: within-task Fisher EMA decay (default :data:`rbank_torch.ewc.DEFAULT_DECAY`).
        penalty: ``"grad"`` (default): the callback adds ``λ·F*·(θ − θ*)`` to ``.grad`` after the Fisher
            update. ``"loss"``: the callback adds nothing; put ``callback.penalty()`` in your
            ``training_step`` loss (the Fisher update then takes the penalty's contribution out).
        consolidate_on_fit_end: call ``consolidate()`` when a ``fit`` ends, so that each ``fit`` is one
            task (set ``False`` to consolidate yourself or with ``detect_boundary`` /
            ``auto_consolidate``).
        log_metrics: log the ``ewc/*`` values (the penalty costs one extra pass over the parameters) every
            ``trainer.log_every_n_steps`` optimizer steps.
        **ewc_kwargs: any other :class:`EWCPlusPlus` argument (``mode``, ``fisher_dtype``,
            ``detect_boundary`` …).

    Attributes:
        ewc: the :class:`EWCPlusPlus`, created at the first ``fit`` (``None`` before) and moved to the
            module of each later ``fit`` (:meth:`EWCPlusPlus.rebound`).
    """

    def __init__(
        self,
        lambda_: float = 2000.0,
        decay: float = DEFAULT_DECAY,
        *,
        penalty: Literal["grad", "loss"] = "grad",
        consolidate_on_fit_end: bool = True,
        log_metrics: bool = True,
        **ewc_kwargs: Any,
    ) -> None:
        super().__init__()
        if penalty not in ("grad", "loss"):
            raise ValueError(f"penalty must be 'grad' or 'loss', got {penalty!r}")
        self.lambda_ = lambda_
        self.decay = decay
        self.penalty_mode = penalty
        self.consolidate_on_fit_end = consolidate_on_fit_end
        if "log_penalty" in ewc_kwargs:  # the earlier name of log_metrics
            log_metrics = bool(ewc_kwargs.pop("log_penalty"))
        self.log_metrics = log_metrics
        self.ewc_kwargs = ewc_kwargs
        self.ewc: EWCPlusPlus | None = None
        self._pending_state: dict[str, Any] | None = None

    def _ensure(self, pl_module: torch.nn.Module) -> EWCPlusPlus:
        if self.ewc is None:
            self.ewc = EWCPlusPlus(pl_module, lambda_=self.lambda_, decay=self.decay, **self.ewc_kwargs)
        elif not self.ewc.holds(pl_module):
            try:
                self.ewc = self.ewc.rebound(pl_module)
            except ValueError as e:
                raise ValueError(
                    f"EWCPlusPlusCallback: the module of this fit ({type(pl_module).__name__}) does not match the one "
                    f"the EWC++ state was built for: {e}"
                ) from None
        if self._pending_state is not None:
            self.ewc.load_state_dict(self._pending_state)
            self._pending_state = None
        return self.ewc

    def penalty(self) -> torch.Tensor:
        """The EWC++ penalty to add to the loss when ``penalty="loss"`` (zero before the first fit ends)."""
        if self.ewc is None:
            raise RuntimeError("penalty() is available once fit has started (the callback creates its EWC then)")
        return self.ewc.penalty()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._ensure(pl_module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        ewc = self._ensure(pl_module)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        ewc.update_fisher(grad_scaler=scaler)
        if self.penalty_mode == "grad":
            ewc.add_penalty_grad_()
        every = max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1)
        if self.log_metrics and trainer.global_step % every == 0:
            for k, v in ewc.metric_tensors().items():
                pl_module.log(f"ewc/{k}", v, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.consolidate_on_fit_end and self.ewc is not None:
            self.ewc.consolidate()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.ewc is None else {"ewc": self.ewc.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "ewc" not in state_dict:
            return
        if self.ewc is None:
            self._pending_state = state_dict["ewc"]
        else:
            self.ewc.load_state_dict(state_dict["ewc"])
