"""Lightning and Hugging Face Trainer callbacks for EWC++, and lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F_

from rbank_torch.ewc import EWCPlusPlus

N, BS = 32, 8


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g)


def _manual(tasks, lam: float, decay: float, epochs: int, accum: int = 1):
    """The reference loop: what the callbacks must reproduce exactly."""
    model = _mlp()
    ewc = EWCPlusPlus(model, lambda_=lam, decay=decay)
    for x, y in tasks:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(epochs):
            for i in range(0, N, BS * accum):
                opt.zero_grad()
                for j in range(accum):
                    s = slice(i + j * BS, i + (j + 1) * BS)
                    (F_.cross_entropy(model(x[s]), y[s]) / accum).backward()
                ewc.update_fisher()
                ewc.add_penalty_grad_()
                opt.step()
        ewc.consolidate()
    return model, ewc


def test_import_is_lazy() -> None:
    code = (
        "import sys, rbank_torch, rbank_torch.ewc, rbank_torch.fisher_ops, rbank_torch.integrations\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ----------------------------------------------------------------------------- Lightning


def _lightning_module(model: nn.Module):
    L = pytest.importorskip("lightning.pytorch")

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F_.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return L, Module()


@pytest.mark.parametrize("accum", [1, 2])
def test_lightning_callback_matches_manual_loop(accum: int) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    pytest.importorskip("lightning.pytorch")
    from rbank_torch.integrations.lightning import EWCPlusPlusCallback

    tasks = [_data(1), _data(2)]
    ref_model, ref_ewc = _manual(tasks, lam=30.0, decay=0.8, epochs=2, accum=accum)

    model = _mlp()
    L, module = _lightning_module(model)
    cb = EWCPlusPlusCallback(lambda_=30.0, decay=0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in tasks:
            trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, callbacks=[cb], logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                accumulate_grad_batches=accum)
            trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=BS, shuffle=False))
    assert cb.ewc is not None and cb.ewc.num_tasks == 2
    assert int(cb.ewc.num_updates) == 2 * 2 * (N // (BS * accum))  # once per optimizer step
    names = [n.removeprefix("net.") for n in cb.ewc.names]
    assert names == list(ref_ewc.names)
    for name, ref_name in zip(cb.ewc.names, ref_ewc.names):
        torch.testing.assert_close(cb.ewc.fisher_star[name], ref_ewc.fisher_star[ref_name], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(cb.ewc.theta_star[name], ref_ewc.theta_star[ref_name], rtol=1e-5, atol=1e-7)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the callback round-trips through Lightning's callback state
    state = cb.state_dict()
    cb2 = EWCPlusPlusCallback()
    cb2.load_state_dict(state)
    cb2._ensure(module)
    assert cb2.ewc is not None and cb2.ewc.num_tasks == 2
    assert torch.equal(cb2.ewc.fisher_star[cb.ewc.names[0]], cb.ewc.fisher_star[cb.ewc.names[0]])


def _lightning_fit(L, module, cb, x, y, log_every: int = 1):
    from torch.utils.data import DataLoader, TensorDataset

    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, callbacks=[cb], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=log_every)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=BS, shuffle=False))
    return trainer


def test_lightning_logs_ewc_metrics() -> None:
    pytest.importorskip("lightning.pytorch")
    from rbank_torch.integrations.lightning import EWCPlusPlusCallback

    L, module = _lightning_module(_mlp())
    cb = EWCPlusPlusCallback(lambda_=30.0, decay=0.8)
    (xa, ya), (xb, yb) = _data(1), _data(2)
    t1 = _lightning_fit(L, module, cb, xa, ya)
    m1 = t1.callback_metrics
    assert {"ewc/penalty", "ewc/fisher_mean", "ewc/fisher_star_mean", "ewc/lambda"} <= set(m1)
    assert float(m1["ewc/penalty"]) == 0.0 and float(m1["ewc/fisher_mean"]) > 0  # no anchor yet, Fisher running
    t2 = _lightning_fit(L, module, cb, xb, yb)
    m2 = t2.callback_metrics
    assert float(m2["ewc/penalty"]) > 0 and float(m2["ewc/lambda"]) == 30.0
    assert cb.ewc is not None
    assert float(m2["ewc/fisher_star_mean"]) > 0


def test_lightning_rebinds_to_the_module_of_each_fit() -> None:
    pytest.importorskip("lightning.pytorch")
    from rbank_torch.integrations.lightning import EWCPlusPlusCallback

    (xa, ya), (xb, yb) = _data(1), _data(2)
    L, first = _lightning_module(_mlp())
    cb = EWCPlusPlusCallback(lambda_=300.0, decay=0.8)
    _lightning_fit(L, first, cb, xa, ya)
    assert cb.ewc is not None and cb.ewc.holds(first)
    fisher_a = {k: v.clone() for k, v in cb.ewc.fisher_star.items()}
    theta_a = {k: v.clone() for k, v in cb.ewc.theta_star.items()}

    # a new module object (as after reloading weights): the state follows it and protects it
    _, second = _lightning_module(_mlp())
    second.load_state_dict(first.state_dict())
    _, free = _lightning_module(_mlp())
    free.load_state_dict(first.state_dict())
    _lightning_fit(L, second, cb, xb, yb)
    _lightning_fit(L, free, EWCPlusPlusCallback(lambda_=0.0), xb, yb)
    assert cb.ewc.holds(second) and not cb.ewc.holds(first) and cb.ewc.num_tasks == 2
    assert all(bool((cb.ewc.fisher_star[k] >= fisher_a[k] * (1 - 1e-6)).all()) for k in fisher_a)

    def drift(m) -> float:
        return sum(float((fisher_a[n] * (p.detach() - theta_a[n]) ** 2).sum()) for n, p in m.named_parameters())

    assert drift(second) < 0.5 * drift(free)  # the penalty acted on the second module's parameters
    # the first module was left alone by the second fit
    assert all(torch.equal(p, theta_a[n]) for n, p in first.named_parameters())

    # another architecture: a clear error naming the parameters
    _, other = _lightning_module(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))
    with pytest.raises(ValueError, match=r"does not match.*'net.0.weight' has shape \(8, 6\)"):
        _lightning_fit(L, other, cb, xb, yb)


def test_lightning_rejects_bad_penalty_mode() -> None:
    pytest.importorskip("lightning.pytorch")
    from rbank_torch.integrations.lightning import EWCPlusPlusCallback

    with pytest.raises(ValueError, match="penalty"):
        EWCPlusPlusCallback(penalty="both")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- Hugging Face


class _HFNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F_.cross_entropy(logits, labels)
        return out


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_train(model: nn.Module, tasks, callbacks, tmp_path, accum: int = 1) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    for k, (x, y) in enumerate(tasks):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"t{k}"), per_device_train_batch_size=BS, num_train_epochs=2,
            learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
            gradient_accumulation_steps=accum, report_to=[], save_strategy="no", logging_strategy="no",
            use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_ListDataset(x, y), callbacks=callbacks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()


def test_hf_callback_fisher_steps_and_protection(tmp_path) -> None:
    pytest.importorskip("transformers")
    from rbank_torch.integrations.hf import EWCPlusPlusTrainerCallback

    tasks = [_data(1), _data(2)]
    model = _HFNet()
    cb = EWCPlusPlusTrainerCallback(lambda_=300.0, decay=0.8)
    _hf_train(model, tasks[:1], [cb], tmp_path, accum=2)
    assert cb.ewc is not None and cb.ewc.num_tasks == 1
    assert int(cb.ewc.num_updates) == 2 * N // (BS * 2)  # once per optimizer step, after accumulation
    assert all(float(v.abs().sum()) > 0 for v in cb.ewc.fisher_star.values())
    after_a = [p.detach().clone() for p in model.parameters()]
    fisher_a = {k: v.clone() for k, v in cb.ewc.fisher_star.items()}

    _hf_train(model, tasks[1:], [cb], tmp_path)
    free = _HFNet()
    free.load_state_dict({k: v for k, v in zip(free.state_dict(), after_a)})
    _hf_train(free, tasks[1:], [], tmp_path)
    assert cb.ewc.num_tasks == 2

    def drift(m: nn.Module) -> float:  # Σ F*_A (θ − θ*_A)², what the penalty limits
        fs = list(fisher_a.values())
        return sum(float((f * (p.detach() - a) ** 2).sum()) for f, p, a in zip(fs, m.parameters(), after_a))

    assert drift(model) < 0.5 * drift(free)  # the penalty gradient reached the optimizer


def test_hf_callback_same_fisher_as_manual_loop(tmp_path) -> None:
    pytest.importorskip("transformers")
    from rbank_torch.integrations.hf import EWCPlusPlusTrainerCallback

    # one epoch of unshuffled-equivalent data: a single full batch per step makes the order irrelevant
    x, y = _data(1)
    model = _HFNet()
    cb = EWCPlusPlusTrainerCallback(lambda_=30.0, decay=0.8)
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "full"), per_device_train_batch_size=N, num_train_epochs=3, learning_rate=0.1,
        optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.Trainer(model=model, args=args, train_dataset=_ListDataset(x, y), callbacks=[cb]).train()
    ref = _mlp()
    ewc = EWCPlusPlus(ref, lambda_=30.0, decay=0.8)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        F_.cross_entropy(ref(x), y).backward()
        ewc.update_fisher()
        opt.step()
    ewc.consolidate()
    for name, ref_name in zip(cb.ewc.names, ewc.names):
        torch.testing.assert_close(cb.ewc.fisher_star[name], ewc.fisher_star[ref_name], rtol=1e-4, atol=1e-9)


def _hf_args(out, **kw):
    transformers = pytest.importorskip("transformers")
    base = dict(
        output_dir=str(out), per_device_train_batch_size=BS, num_train_epochs=2, learning_rate=0.1, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _hf_fit(model, cb, x, y, args, **train_kw):
    transformers = pytest.importorskip("transformers")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_ListDataset(x, y),
                                   callbacks=[cb] if cb is not None else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(**train_kw)
    return trainer


def test_hf_callback_logs_metrics(tmp_path) -> None:
    pytest.importorskip("transformers")
    from rbank_torch.integrations.hf import EWCPlusPlusTrainerCallback

    model = _HFNet()
    cb = EWCPlusPlusTrainerCallback(lambda_=300.0, decay=0.8)
    (xa, ya), (xb, yb) = _data(1), _data(2)
    t1 = _hf_fit(model, cb, xa, ya, _hf_args(tmp_path / "a", logging_strategy="steps", logging_steps=2))
    logs_a = [h for h in t1.state.log_history if "loss" in h]
    assert len(logs_a) == 4  # 8 steps, every 2
    for h in logs_a:
        assert h["ewc/penalty"] == 0.0 and h["ewc/fisher_mean"] > 0 and h["ewc/lambda"] == 300.0
    t2 = _hf_fit(model, cb, xb, yb, _hf_args(tmp_path / "b", logging_strategy="steps", logging_steps=2))
    logs_b = [h for h in t2.state.log_history if "loss" in h]
    assert logs_b and all(h["ewc/penalty"] > 0 and h["ewc/fisher_star_mean"] > 0 for h in logs_b)
    assert not any("ewc/penalty" in h for h in t2.state.log_history if "loss" not in h)  # not in the summary


def test_hf_resume_from_checkpoint_restores_fisher_and_anchor(tmp_path) -> None:
    pytest.importorskip("transformers")
    from rbank_torch.integrations.hf import STATE_FILE, EWCPlusPlusTrainerCallback

    (xa, ya), (xb, yb) = _data(1), _data(2)
    model = _HFNet()
    cb = EWCPlusPlusTrainerCallback(lambda_=300.0, decay=0.8, fisher_dtype="float64")
    _hf_fit(model, cb, xa, ya, _hf_args(tmp_path / "a"))
    out = tmp_path / "b"
    _hf_fit(model, cb, xb, yb, _hf_args(out, save_strategy="steps", save_steps=3))  # task B, uninterrupted
    assert cb.ewc is not None and cb.ewc.num_tasks == 2
    ckpt = out / "checkpoint-3"
    assert (ckpt / STATE_FILE).is_file()
    state_json = json.loads((ckpt / "trainer_state.json").read_text())
    record = state_json["stateful_callbacks"]["EWCPlusPlusTrainerCallback"]
    assert record["attributes"]["saved_step"] == 3 and record["args"]["fisher_dtype"] == "float64"

    # a new process would build a new model and callback, then resume task B from step 3 of 8
    model2 = _HFNet()
    cb2 = EWCPlusPlusTrainerCallback(lambda_=300.0, decay=0.8, fisher_dtype="float64")
    t2 = _hf_fit(model2, cb2, xb, yb, _hf_args(out, save_strategy="steps", save_steps=3),
                 resume_from_checkpoint=str(ckpt))
    live = EWCPlusPlusTrainerCallback.from_trainer(t2)
    assert live is cb2 and cb2.ewc is not None and cb2.ewc.num_tasks == 2
    assert int(cb2.ewc.num_updates) == int(cb.ewc.num_updates)
    for attr in ("fisher_star", "theta_star", "fisher"):
        a, b = getattr(cb.ewc, attr), getattr(cb2.ewc, attr)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-9, msg=f"{attr}[{k}]")
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-8)

    # without the state the resume would be silently different: the file is required
    (ckpt / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="rbank_ewc.safetensors"):
        _hf_fit(_HFNet(), EWCPlusPlusTrainerCallback(lambda_=300.0, decay=0.8), xb, yb,
                _hf_args(out, save_strategy="no"), resume_from_checkpoint=str(ckpt))


def test_hf_resume_with_restore_callback_states(tmp_path) -> None:
    pytest.importorskip("transformers")
    from rbank_torch.integrations.hf import EWCPlusPlusTrainerCallback

    xa, ya = _data(1)
    model = _HFNet()
    cb = EWCPlusPlusTrainerCallback(lambda_=300.0, decay=0.8, task_decay=0.9)
    _hf_fit(model, cb, xa, ya, _hf_args(tmp_path / "a", save_strategy="steps", save_steps=4))
    cb_other = EWCPlusPlusTrainerCallback(lambda_=1.0)  # replaced by the checkpoint's record
    t2 = _hf_fit(_HFNet(), cb_other, xa, ya,
                 _hf_args(tmp_path / "a", save_strategy="no", restore_callback_states_from_checkpoint=True),
                 resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    live = EWCPlusPlusTrainerCallback.from_trainer(t2)
    assert live is not cb_other and live.lambda_ == 300.0 and live.ewc is not None
    assert live.ewc.task_decay == 0.9
    for k, v in cb.ewc.fisher_star.items():  # type: ignore[union-attr]
        torch.testing.assert_close(live.ewc.fisher_star[k], v, rtol=1e-6, atol=1e-9)


def test_hf_callback_rebinds_to_a_new_model(tmp_path) -> None:
    pytest.importorskip("transformers")
    from rbank_torch.integrations.hf import EWCPlusPlusTrainerCallback

    (xa, ya), (xb, yb) = _data(1), _data(2)
    first = _HFNet()
    cb = EWCPlusPlusTrainerCallback(lambda_=300.0, decay=0.8)
    _hf_fit(first, cb, xa, ya, _hf_args(tmp_path / "a"))
    assert cb.ewc is not None
    fisher_a = {k: v.clone() for k, v in cb.ewc.fisher_star.items()}
    second = _HFNet()
    second.load_state_dict(first.state_dict())
    _hf_fit(second, cb, xb, yb, _hf_args(tmp_path / "b"))
    assert cb.ewc.holds(second) and cb.ewc.num_tasks == 2
    assert all(bool((cb.ewc.fisher_star[k] >= fisher_a[k] * (1 - 1e-6)).all()) for k in fisher_a)
    with pytest.raises(ValueError, match="other names"):
        _hf_fit(_mlp(), cb, xb, yb, _hf_args(tmp_path / "c"))
