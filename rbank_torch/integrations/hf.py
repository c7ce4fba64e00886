"""Hugging Face ``transformers.Trainer`` callback for EWC++.

Order inside one optimizer step of ``Trainer`` (transformers ≥ 4.46)::

    training_step → backward                       (× gradient_accumulation_steps)
    clip_grad_norm_ (also unscales fp16 AMP gradients)
    on_pre_optimizer_step   ← here: update_fisher(), then add_penalty_grad_()
    optimizer.step(), on_optimizer_step, scheduler.step(), zero_grad(), on_step_end

``on_step_end`` cannot be used: the Trainer zeroes the gradients before it. Versions without
``on_pre_optimizer_step`` are therefore not supported. The penalty gradient is added after clipping,
so it is not clipped.

Example:
    >>> cb = EWCPlusPlusTrainerCallback(lambda_=1000.0, decay=0.99)             # doctest: +SKIP
    >>> Trainer(model=model, args=args, train_dataset=a, callbacks=[cb]).train()  # doctest: +SKIP
    >>> Trainer(model=model, args=args, train_dataset=b, callbacks=[cb]).train()  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from rbank_torch.ewc import EWCPlusPlus

__all__ = ["EWCPlusPlusTrainerCallback"]

if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # pragma: no cover - old transformers
    raise ImportError(
        "rbank_torch.integrations.hf needs transformers with TrainerCallback.on_pre_optimizer_step (>= 4.46)"
    )


def _unscale_if_needed(optimizer: Any) -> torch.amp.GradScaler | None:
    """Unscale fp16 AMP gradients of an accelerate optimizer unless already done; return the scaler."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    inner = getattr(optimizer, "optimizer", optimizer)
    try:
        scaler.unscale_(inner)
    except RuntimeError:  # already unscaled by clip_grad_norm_ in this step
        pass
    return scaler


class EWCPlusPlusTrainerCallback(TrainerCallback):
    """Keep an :class:`EWCPlusPlus` on the Trainer's model: Fisher every optimizer step, penalty gradient,
    consolidation at the end of each ``train()`` (one task per ``train()`` call).

    Args:
        lambda_: penalty strength λ.
        decay: Fisher EMA decay.
        consolidate_on_train_end: call ``consolidate()`` when ``train()`` ends.
        add_penalty_grad: add ``λ·F*·(θ − θ*)`` to ``.grad`` (set ``False`` if your ``compute_loss`` adds
            ``callback.ewc.penalty()`` to the loss instead).
        **ewc_kwargs: any other :class:`EWCPlusPlus` argument.

    Attributes:
        ewc: the :class:`EWCPlusPlus`, created at the first ``on_train_begin``.
    """

    def __init__(
        self,
        lambda_: float = 2000.0,
        decay: float = 0.999,
        *,
        consolidate_on_train_end: bool = True,
        add_penalty_grad: bool = True,
        **ewc_kwargs: Any,
    ) -> None:
        self.lambda_ = lambda_
        self.decay = decay
        self.consolidate_on_train_end = consolidate_on_train_end
        self.add_penalty_grad = add_penalty_grad
        self.ewc_kwargs = ewc_kwargs
        self.ewc: EWCPlusPlus | None = None

    def _ensure(self, model: torch.nn.Module | None) -> EWCPlusPlus:
        if self.ewc is None:
            if model is None:
                raise RuntimeError("the Trainer passed no model to the callback")
            self.ewc = EWCPlusPlus(model, lambda_=self.lambda_, decay=self.decay, **self.ewc_kwargs)
        return self.ewc

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._ensure(kwargs.get("model"))

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        ewc = self._ensure(kwargs.get("model"))
        scaler = _unscale_if_needed(kwargs.get("optimizer"))
        ewc.update_fisher(grad_scaler=scaler)
        if self.add_penalty_grad:
            ewc.add_penalty_grad_()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.consolidate_on_train_end and self.ewc is not None:
            self.ewc.consolidate()
