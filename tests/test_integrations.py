"""Lightning and Hugging Face Trainer callbacks for EWC++, and lazy imports."""

from __future__ import annotations

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
        torch.testing.assert_close(cb.ewc.fisher[name], ref_ewc.fisher[ref_name], rtol=1e-5, atol=1e-9)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the callback round-trips through Lightning's callback state
    state = cb.state_dict()
    cb2 = EWCPlusPlusCallback()
    cb2.load_state_dict(state)
    cb2._ensure(module)
    assert cb2.ewc is not None and cb2.ewc.num_tasks == 2
    assert torch.equal(cb2.ewc.fisher_star[cb.ewc.names[0]], cb.ewc.fisher_star[cb.ewc.names[0]])


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
