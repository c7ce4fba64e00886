"""EWC++ under DDP and FSDP2: two CPU processes (gloo), compared with a single-process reference."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F_

from rbank_torch.ewc import EWCPlusPlus

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

WORLD = 2
STEPS = 8
CONSOLIDATE_AT = 3
TIMEOUT_S = 120


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(STEPS, 16, 6, generator=g), torch.randint(0, 3, (STEPS, 16), generator=g)


def _run(model: nn.Module, ewc: EWCPlusPlus, xs: torch.Tensor, ys: torch.Tensor, usage: str) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(STEPS):
        if step == CONSOLIDATE_AT:
            ewc.consolidate()
        opt.zero_grad()
        task = F_.cross_entropy(model(xs[step]), ys[step])
        if usage == "penalty":
            (task + ewc.penalty()).backward()
            ewc.update_fisher()
        else:
            task.backward()
            ewc.update_fisher()
            ewc.add_penalty_grad_()
        opt.step()


def _reference(usage: str) -> dict[str, torch.Tensor]:
    model = _mlp()
    ewc = EWCPlusPlus(model, lambda_=20.0, decay=0.7)
    xs, ys = _data()
    _run(model, ewc, xs, ys, usage)
    out = {f"fisher/{k}": v.clone() for k, v in ewc.fisher.items()}
    out.update({f"param/{k}": p.detach().clone() for k, p in model.named_parameters()})
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))


USAGES = ("penalty", "grad")


def _shutdown() -> None:
    """Drop DDP reducers / FSDP state that still hold the group, then leave it together with the peer
    (:func:`rbank_torch.distributed.leave_group`: closing barrier, then destroy)."""
    import gc

    from rbank_torch.distributed import leave_group

    gc.collect()
    leave_group()


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    _init(rank, port)
    try:
        for usage in USAGES:
            _ddp_run(rank, out_dir, usage)
    finally:
        _shutdown()


def _ddp_run(rank: int, out_dir: str, usage: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _mlp()
    ddp = DDP(model)
    ewc = EWCPlusPlus(model, lambda_=20.0, decay=0.7)
    xs, ys = _data()
    half = slice(rank * 8, (rank + 1) * 8)  # equal halves: the DDP mean equals the full-batch mean
    _run(ddp, ewc, xs[:, half], ys[:, half], usage)
    out = {f"fisher/{k}": v.contiguous() for k, v in ewc.fisher.items()}
    out.update({f"param/{k}": p.detach().contiguous() for k, p in model.named_parameters()})
    out["skipped"] = ewc.skipped_steps.reshape(1)
    save_file(out, os.path.join(out_dir, f"{usage}-rank{rank}.safetensors"))


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    _init(rank, port)
    try:
        for usage in USAGES:
            _fsdp_run(rank, out_dir, usage)
    finally:
        _shutdown()


def _fsdp_run(rank: int, out_dir: str, usage: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD,))  # explicit: on a CUDA machine the default mesh would be CUDA
    model = _mlp()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    ewc = EWCPlusPlus(model, lambda_=20.0, decay=0.7)
    xs, ys = _data()
    half = slice(rank * 8, (rank + 1) * 8)
    _run(model, ewc, xs[:, half], ys[:, half], usage)
    sd = ewc.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        f = sd["fisher"][name]
        assert isinstance(f, DTensor) and f.shape == p.shape and f.placements == p.placements
        assert ewc.fisher[name].shape == p.to_local().shape  # local shard shaped like the param shard
        out[f"fisher/{name}"] = f.full_tensor().contiguous()
        out[f"theta_star/{name}"] = sd["theta_star"][name].full_tensor().contiguous()
        out[f"param/{name}"] = p.detach().full_tensor().contiguous()
    # a NaN in one rank's shard only: every rank must skip that step
    before = {k: v.clone() for k, v in ewc.fisher.items()}
    task = F_.cross_entropy(model(xs[0][half]), ys[0][half])
    task.backward()
    if rank == 1:
        model[2].weight.grad.to_local().view(-1)[0] = float("nan")
    ewc.update_fisher()
    out["skipped"] = ewc.skipped_steps.reshape(1)
    out["unchanged"] = torch.tensor([all(torch.equal(before[k], v) for k, v in ewc.fisher.items())])
    save_file(out, os.path.join(out_dir, f"{usage}-rank{rank}.safetensors"))


def _spawn(fn, out_dir: str) -> dict[str, list[dict[str, torch.Tensor]]]:
    ctx = mp.start_processes(fn, args=(_free_port(), out_dir), nprocs=WORLD, join=False,
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
    return {
        u: [load_file(os.path.join(out_dir, f"{u}-rank{r}.safetensors")) for r in range(WORLD)] for u in USAGES
    }


def test_ddp_same_fisher_on_both_ranks_and_as_single_process(tmp_path) -> None:
    results = _spawn(_ddp_worker, str(tmp_path))
    for usage in USAGES:
        r0, r1 = results[usage]
        ref = _reference(usage)
        for key in ref:
            assert torch.equal(r0[key], r1[key]), (usage, key)  # identical on both ranks
            torch.testing.assert_close(r0[key], ref[key], rtol=1e-4, atol=1e-7)
        assert int(r0["skipped"]) == 0
        assert any(float(v.abs().max()) > 0 for k, v in r0.items() if k.startswith("fisher/"))


def test_fsdp2_sharded_fisher_matches_single_process(tmp_path) -> None:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) not available")
    results = _spawn(_fsdp_worker, str(tmp_path))
    for usage in USAGES:
        r0, r1 = results[usage]
        ref = _reference(usage)
        for key in ref:
            torch.testing.assert_close(r0[key], ref[key], rtol=1e-4, atol=1e-7)
            assert torch.equal(r0[key], r1[key]), (usage, key)
        assert int(r0["skipped"]) == 1 and int(r1["skipped"]) == 1
        assert bool(r0["unchanged"]) and bool(r1["unchanged"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_buffers_and_no_host_sync() -> None:
    model = _mlp().cuda()
    ewc = EWCPlusPlus(model, lambda_=20.0, decay=0.7, detect_boundary=True)
    xs, ys = _data()
    xs, ys = xs.cuda(), ys.cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F_.cross_entropy(model(xs[0]), ys[0]).backward()
    ewc.update_fisher()
    ewc.consolidate()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            opt.zero_grad()
            (F_.cross_entropy(model(xs[step]), ys[step]) + ewc.penalty()).backward()
            ewc.update_fisher()
            ewc.add_penalty_grad_()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.is_cuda for v in ewc.fisher.values())
    assert int(ewc.num_updates) == 4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_grad_scaler_fp16() -> None:
    """Same run on CPU and CUDA gives the same Fisher and parameters; fp16 AMP with GradScaler
    (penalty in the scaled loss, update_fisher after unscale_) gives the Fisher of the fp32 run."""
    xs, ys = _data()
    out: dict[str, dict[str, torch.Tensor]] = {}
    for dev in ("cpu", "cuda"):
        model = _mlp().to(dev)
        ewc = EWCPlusPlus(model, lambda_=20.0, decay=0.7)
        _run(model, ewc, xs.to(dev), ys.to(dev), "grad")
        out[dev] = {k: v.cpu() for k, v in ewc.fisher.items()}
        out[dev].update({f"p/{n}": p.detach().cpu() for n, p in model.named_parameters()})
    for k in out["cpu"]:
        torch.testing.assert_close(out["cuda"][k], out["cpu"][k], rtol=1e-4, atol=1e-6)

    fishers = []
    for use_scaler in (True, False):
        model = _mlp().cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, enabled=use_scaler)
        ewc = EWCPlusPlus(model, lambda_=20.0, decay=0.7, grad_scaler=scaler if use_scaler else None)
        for step in range(STEPS):
            if step == CONSOLIDATE_AT:
                ewc.consolidate()
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_scaler):
                task = F_.cross_entropy(model(xs[step].cuda()), ys[step].cuda())
            scaler.scale(task + ewc.penalty()).backward()
            scaler.unscale_(opt)
            ewc.update_fisher()
            scaler.step(opt)
            scaler.update()
        assert int(ewc.skipped_steps) == 0
        fishers.append({k: v.float().cpu() for k, v in ewc.fisher.items()})
    for k in fishers[0]:  # fp16 matmuls: compare loosely, but far tighter than the loss scale 2^10
        torch.testing.assert_close(fishers[0][k], fishers[1][k], rtol=5e-2, atol=1e-5)
