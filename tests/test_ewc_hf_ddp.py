"""The Hugging Face Trainer callback under DDP through accelerate: two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F_

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

WORLD = 2
TIMEOUT_S = 240


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F_.cross_entropy(logits, labels)
        return out


class _Rows(torch.utils.data.Dataset):
    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE": str(WORLD)})
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import transformers

    from rbank_torch.integrations.hf import EWCPlusPlusTrainerCallback

    transformers.logging.set_verbosity_error()
    model = _Net()
    cb = EWCPlusPlusTrainerCallback(lambda_=300.0, decay=0.8)
    history = []
    for task in range(2):
        args = transformers.TrainingArguments(
            output_dir=os.path.join(out_dir, f"t{task}"), per_device_train_batch_size=4, num_train_epochs=2,
            learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
            gradient_accumulation_steps=2, report_to=[], save_strategy="no", logging_strategy="steps",
            logging_steps=2, use_cpu=True, ddp_backend="gloo", seed=0, dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows(task + 1), callbacks=[cb])
        assert trainer.args.world_size == WORLD
        trainer.train()
        history.append([h for h in trainer.state.log_history if "loss" in h])
    assert cb.ewc is not None
    cb.ewc.save(os.path.join(out_dir, f"ewc-rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"logs-rank{rank}.json"), "w") as f:
        json.dump(history, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hf_callback_under_ddp_same_state_on_both_ranks(tmp_path) -> None:
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    states = [load_file(str(tmp_path / f"ewc-rank{r}.safetensors")) for r in range(WORLD)]
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k  # DDP averages gradients: identical Fisher and anchor
    # 32 rows, 2 ranks × batch 4 × accumulation 2 = 16 a step: 2 optimizer steps an epoch, 2 epochs, 2 tasks
    assert int(states[0]["counters/updates"]) == 8
    assert any(float(v.abs().sum()) > 0 for k, v in states[0].items() if k.startswith("fisher_star/"))
    logs = json.loads((tmp_path / "logs-rank0.json").read_text())
    assert logs[1] and all(h["ewc/penalty"] > 0 for h in logs[1])  # task B is penalised, and logged
