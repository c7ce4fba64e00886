"""Hugging Face ``transformers.Trainer`` callback for EWC++.

Order inside one optimizer step of ``Trainer`` (transformers ≥ 4.46)::

    training_step → backward                       (× gradient_accumulation_steps)
    clip_grad_norm_ (also unscales fp16 AMP gradients)
    on_pre_optimizer_step   ← here: update_fisher(), then add_penalty_grad_()
    optimizer.step(), on_optimizer_step, scheduler.step(), zero_grad(), on_step_end

``on_step_end`` cannot be used: the Trainer zeroes the gradients before it. Versions without
``on_pre_optimizer_step`` are therefore not supported. The penalty gradient is added after clipping,
so it is not clipped.

Checkpoints: the callback is an ``ExportableState`` (transformers' stateful-callback mechanism). When the
Trainer saves ``checkpoint-N``, the callback's entry in ``trainer_state.json`` records its arguments and
the step, and ``on_save`` writes the tensors (Fisher, ``F*``, ``θ*``, counters) beside it as
``rbank_ewc.safetensors``. ``train(resume_from_checkpoint=...)`` restores them at ``on_train_begin``.

Logging: at each of the Trainer's logging steps the callback adds ``ewc/penalty``, ``ewc/fisher_mean``,
``ewc/fisher_star_mean``, ``ewc/lambda`` and ``ewc/num_tasks`` to the logged values (``on_log``), so
they are in ``trainer.state.log_history`` and reach every reporting callback that comes after this one.

Example:
    >>> cb = EWCPlusPlusTrainerCallback(lambda_=1000.0)                          # doctest: +SKIP
    >>> Trainer(model=model, args=args, train_dataset=a, callbacks=[cb]).train()  # doctest: +SKIP
    >>> Trainer(model=model, args=args, train_dataset=b, callbacks=[cb]).train()  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from rbank_torch.ewc import DEFAULT_DECAY, EWCPlusPlus

__all__ = ["EWCPlusPlusTrainerCallback", "STATE_FILE"]

#: The file the callback writes into each ``checkpoint-N`` folder.
STATE_FILE = "rbank_ewc.safetensors"

if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # pragma: no cover - old transformers
    raise ImportError(
        "rbank_torch.integrations.hf needs transformers with TrainerCallback.on_pre_optimizer_step (>= 4.46)"
    )

_JSON_SCALARS = (bool, int, float, str, type(None))


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


class EWCPlusPlusTrainerCallback(TrainerCallback, ExportableState):
    """Keep an :class:`EWCPlusPlus` on the Trainer's model: Fisher every optimizer step, penalty gradient,
    consolidation at the end of each ``train()`` (one task per ``train()`` call), state in checkpoints,
    metrics in the Trainer's logs.

    Args:
        lambda_: penalty strength λ.
        decay: within-task Fisher EMA decay (default :data:`rbank_torch.ewc.DEFAULT_DECAY`).
        consolidate_on_train_end: call ``consolidate()`` when ``train()`` ends.
        add_penalty_grad: add ``λ·F*·(θ − θ*)`` to ``.grad`` (set ``False`` if your ``compute_loss`` adds
            ``callback.ewc.penalty()`` to the loss instead).
        log_metrics: add the ``ewc/*`` values to the Trainer's logs at its logging steps.
        restore_on_resume: load the EWC++ state saved in the checkpoint that ``train()`` resumes from.
        **ewc_kwargs: any other :class:`EWCPlusPlus` argument (``task_decay``, ``fisher_norm``, ``mode`` …;
            ``fisher_dtype`` may be given as a string such as ``"float32"``).

    Attributes:
        ewc: the :class:`EWCPlusPlus`, created at the first ``on_train_begin``; when a later ``train()``
            gets another model object with the same parameter names and shapes, the state moves to it
            (:meth:`EWCPlusPlus.rebound`); other names or shapes raise ``ValueError``.

    With ``TrainingArguments(restore_callback_states_from_checkpoint=True)`` the Trainer replaces this
    object by a new one built from the checkpoint's record; :meth:`from_trainer` finds the live one.
    """

    def __init__(
        self,
        lambda_: float = 2000.0,
        decay: float = DEFAULT_DECAY,
        *,
        consolidate_on_train_end: bool = True,
        add_penalty_grad: bool = True,
        log_metrics: bool = True,
        restore_on_resume: bool = True,
        **ewc_kwargs: Any,
    ) -> None:
        self.lambda_ = lambda_
        self.decay = decay
        self.consolidate_on_train_end = consolidate_on_train_end
        self.add_penalty_grad = add_penalty_grad
        self.log_metrics = log_metrics
        self.restore_on_resume = restore_on_resume
        if isinstance(ewc_kwargs.get("fisher_dtype"), str):
            name = ewc_kwargs["fisher_dtype"].removeprefix("torch.")
            dt = getattr(torch, name, None)
            if not isinstance(dt, torch.dtype):
                raise ValueError(f"fisher_dtype must name a torch dtype, got {ewc_kwargs['fisher_dtype']!r}")
            ewc_kwargs["fisher_dtype"] = dt
        self.ewc_kwargs = ewc_kwargs
        self.ewc: EWCPlusPlus | None = None
        self.saved_step = -1  # global step of the last checkpoint this callback's state went into

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """The record transformers keeps in ``trainer_state.json`` (JSON only; the tensors go to a file)."""
        kwargs: dict[str, Any] = {}
        for k, v in self.ewc_kwargs.items():
            if isinstance(v, torch.dtype):
                kwargs[k] = str(v).removeprefix("torch.")
            elif isinstance(v, _JSON_SCALARS):
                kwargs[k] = v
            # a GradScaler is not a setting: the Trainer's own scaler is found at each step
        return {
            "args": {
                "lambda_": self.lambda_,
                "decay": self.decay,
                "consolidate_on_train_end": self.consolidate_on_train_end,
                "add_penalty_grad": self.add_penalty_grad,
                "log_metrics": self.log_metrics,
                "restore_on_resume": self.restore_on_resume,
                **kwargs,
            },
            "attributes": {"saved_step": self.saved_step},
        }

    @classmethod
    def from_trainer(cls, trainer: Any) -> EWCPlusPlusTrainerCallback:
        """The instance of this callback the Trainer is using now."""
        for cb in trainer.callback_handler.callbacks:
            if isinstance(cb, cls):
                return cb
        raise LookupError(f"the Trainer has no {cls.__name__}")

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.ewc is None or not args.should_save:
            return
        folder = os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            self.ewc.save(os.path.join(folder, STATE_FILE))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # the Trainer records state() while saving, which happens after this event of the same step
        self.saved_step = state.global_step

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        """Load the state saved with the checkpoint this ``train()`` resumes from, if it is one."""
        if not self.restore_on_resume or state.global_step <= 0:
            return  # a fresh run starts at step 0
        records: Any = state.stateful_callbacks  # a dict once the Trainer has built or loaded its state
        record = records.get(type(self).__name__) if isinstance(records, dict) else None
        if isinstance(record, list):
            record = record[-1] if record else None
        if not isinstance(record, dict):
            return
        saved = record.get("attributes", {}).get("saved_step")
        if saved != state.global_step:
            return  # the record is this object's own, not one read from a checkpoint
        path = os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}", STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resuming at step {state.global_step}: the checkpoint records EWC++ state but {path!r} is missing "
                "(checkpoints are looked up in TrainingArguments.output_dir); pass restore_on_resume=False to "
                "resume without it"
            )
        assert self.ewc is not None
        self.ewc.load(path)

    # ------------------------------------------------------------------ training
    def _ensure(self, model: torch.nn.Module | None) -> EWCPlusPlus:
        if model is None:
            if self.ewc is None:
                raise RuntimeError("the Trainer passed no model to the callback")
            return self.ewc
        if self.ewc is None:
            self.ewc = EWCPlusPlus(model, lambda_=self.lambda_, decay=self.decay, **self.ewc_kwargs)
        elif not self.ewc.holds(model):
            self.ewc = self.ewc.rebound(model)
        return self.ewc

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._ensure(kwargs.get("model"))
        self._restore(args, state)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        ewc = self._ensure(kwargs.get("model"))
        scaler = _unscale_if_needed(kwargs.get("optimizer"))
        ewc.update_fisher(grad_scaler=scaler)
        if self.add_penalty_grad:
            ewc.add_penalty_grad_()

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        logs: dict[str, float] | None = None, **kwargs: Any,
    ) -> None:
        if not self.log_metrics or self.ewc is None or logs is None or "loss" not in logs:
            return  # training logs only (not evaluation or the end-of-training summary)
        values = {f"ewc/{k}": v for k, v in self.ewc.metrics().items()}
        logs.update(values)
        # the Trainer appended a copy of ``logs`` to the history just before this event
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.consolidate_on_train_end and self.ewc is not None:
            self.ewc.consolidate()
