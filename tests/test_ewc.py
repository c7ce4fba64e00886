"""EWC++ (rbank_torch.ewc) and the Fisher ops (rbank_torch.fisher_ops)."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from torch import nn
from torch.nn import functional as F_

from rbank_torch.ewc import EWCPlusPlus
from rbank_torch.fisher_ops import (
    FlatBuffer,
    all_finite,
    constrain_,
    fisher_ema_,
    penalty_grad_,
    penalty_value,
    tensor_norms,
)

# ----------------------------------------------------------------------------- helpers


def _mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def _data(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _batch(x: torch.Tensor, y: torch.Tensor, step: int, bs: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    i = (step * bs) % x.shape[0]
    return x[i : i + bs], y[i : i + bs]


def _clone(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in d.items()}


def _train(usage: str, steps: int = 30, consolidate_at: int = 10, lam: float = 50.0, accum: int = 1):
    """Train the MLP with one of the usages; return (fisher, params, ewc)."""
    m = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ewc = EWCPlusPlus(m, lambda_=lam, decay=0.9)
    for step in range(steps):
        if step == consolidate_at:
            ewc.consolidate()
        opt.zero_grad()
        xb, yb = _batch(x, y, step, bs=8)
        for mb in range(accum):
            sl = slice(mb * 8 // accum, (mb + 1) * 8 // accum)
            task = F_.cross_entropy(m(xb[sl]), yb[sl]) / accum
            if usage == "penalty":
                (task + ewc.penalty() / accum).backward()
            else:
                task.backward()
        if usage == "penalty":
            ewc.update_fisher()
        elif usage == "grad_after":
            ewc.update_fisher()
            ewc.add_penalty_grad_()
        elif usage == "grad_before":
            ewc.add_penalty_grad_()
            ewc.update_fisher()
        else:
            raise AssertionError(usage)
        opt.step()
    return _clone(ewc.fisher), [p.detach().clone() for p in m.parameters()], ewc


# ----------------------------------------------------------------------------- fisher_ops


def test_fisher_ema_flat_and_list_match_formula() -> None:
    torch.manual_seed(0)
    shapes = [(3, 4), (5,), (2, 1, 2)]
    g1 = [torch.randn(s) for s in shapes]
    g2 = [torch.randn(s) for s in shapes]
    flat = FlatBuffer.zeros(shapes, dtype=torch.float32, device="cpu")
    lst = [torch.zeros(s) for s in shapes]
    for g in (g1, g2):
        assert bool(fisher_ema_(flat, g, 0.75))
        assert bool(fisher_ema_(lst, g, 0.75))
    for i in range(3):
        ref = 0.75 * (0.25 * g1[i] ** 2) + 0.25 * g2[i] ** 2
        torch.testing.assert_close(flat.views[i], ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(lst[i], ref, rtol=1e-6, atol=0)


def test_fisher_ema_skips_nonfinite_bit_exact() -> None:
    torch.manual_seed(0)
    F = torch.rand(7, 5)  # a per-pattern [N, D] Fisher
    before = F.clone()
    g = torch.randn(7, 5)
    g[3, 2] = float("inf")
    ok = fisher_ema_([F], [g], 0.9)
    assert ok.dtype == torch.bool and not bool(ok)
    assert torch.equal(F, before)
    g[3, 2] = float("nan")
    flat = FlatBuffer.wrap(before.clone().reshape(-1), [(7, 5)])
    assert not bool(fisher_ema_(flat, [g], 0.9))
    assert torch.equal(flat.views[0], before)


def test_fisher_ops_penalty_grad_value_constraint() -> None:
    torch.manual_seed(0)
    p = [torch.randn(4, 3), torch.randn(6)]
    a = [torch.randn(4, 3), torch.randn(6)]
    f = [torch.rand(4, 3), torch.rand(6)]
    g = [torch.randn(4, 3), torch.randn(6)]
    g0 = [t.clone() for t in g]
    penalty_grad_(g, p, a, f, 3.0)
    for i in range(2):
        torch.testing.assert_close(g[i], g0[i] + 3.0 * f[i] * (p[i] - a[i]))
    g = [t.clone() for t in g0]
    penalty_grad_(g, p, a, f, torch.tensor(2.0))
    torch.testing.assert_close(g[1], g0[1] + 2.0 * f[1] * (p[1] - a[1]))
    ref = sum((fi * (pi - ai) ** 2).sum() for pi, ai, fi in zip(p, a, f))
    torch.testing.assert_close(penalty_value(p, a, f), ref)
    g = [t.clone() for t in g0]
    constrain_(g, f, 5.0)
    torch.testing.assert_close(g[0], g0[0] / (1 + 5.0 * f[0]))
    assert bool(all_finite(g)) and not bool(all_finite([torch.tensor([1.0, float("nan")])]))
    torch.testing.assert_close(tensor_norms(g0), torch.stack([t.norm() for t in g0]))


# ----------------------------------------------------------------------------- formulas


def test_update_fisher_penalty_grad_constraint_hand_computed() -> None:
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    ewc = EWCPlusPlus([("w", w)], lambda_=4.0, decay=0.5, bias_correction=False)
    assert float(ewc.penalty()) == 0.0
    w.grad = torch.tensor([2.0, 0.0, -1.0])
    ewc.update_fisher()
    assert torch.equal(ewc.fisher["w"], torch.tensor([2.0, 0.0, 0.5]))  # 0.5·0 + 0.5·g²
    w.grad = torch.tensor([0.0, 4.0, 1.0])
    ewc.update_fisher()
    assert torch.equal(ewc.fisher["w"], torch.tensor([1.0, 8.0, 0.75]))
    assert int(ewc.num_updates) == 2 and int(ewc.skipped_steps) == 0
    ewc.consolidate()
    assert torch.equal(ewc.theta_star["w"], torch.tensor([1.0, -2.0, 0.5]))
    assert torch.equal(ewc.fisher_star["w"], torch.tensor([1.0, 8.0, 0.75]))
    with torch.no_grad():
        w.copy_(torch.tensor([2.0, -1.0, 0.0]))
    # λ/2 Σ F*(θ−θ*)² = 2·(1·1 + 8·1 + 0.75·0.25) = 18.375
    assert float(ewc.penalty().detach()) == pytest.approx(18.375)
    w.grad = torch.tensor([0.5, 0.5, 0.5])
    ewc.add_penalty_grad_()  # + λF*(θ−θ*) = 4·[1, 8, −0.375]
    torch.testing.assert_close(w.grad, torch.tensor([4.5, 32.5, -1.0]))
    w.grad = torch.tensor([3.0, 3.0, 3.0])
    ewc.apply_constraint_()  # g / (1 + 4F*)
    torch.testing.assert_close(w.grad, torch.tensor([3.0 / 5.0, 3.0 / 33.0, 3.0 / 4.0]))
    pen = ewc.penalty()
    pen.backward()
    torch.testing.assert_close(w.grad, torch.tensor([3.0 / 5.0 + 4.0, 3.0 / 33.0 + 32.0, 0.75 - 1.5]))


def test_penalty_zero_before_consolidate_and_grad_untouched() -> None:
    m = _mlp()
    ewc = EWCPlusPlus(m, lambda_=1e3)
    x, y = _data()
    F_.cross_entropy(m(x), y).backward()
    before = [p.grad.clone() for p in m.parameters()]
    assert float(ewc.penalty()) == 0.0
    ewc.add_penalty_grad_()
    ewc.apply_constraint_()
    assert all(torch.equal(a, p.grad) for a, p in zip(before, m.parameters()))


@pytest.mark.parametrize("usage", ["grad_after", "grad_before"])
def test_two_usages_same_fisher_and_params(usage: str) -> None:
    f_ref, p_ref, ewc_ref = _train("penalty")
    f, p, _ = _train(usage)
    assert float(ewc_ref.penalty().detach()) > 1e-4  # the penalty is active
    for k in f_ref:
        torch.testing.assert_close(f[k], f_ref[k], rtol=1e-5, atol=1e-9)
    for a, b in zip(p, p_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fisher_does_not_feed_on_its_own_penalty() -> None:
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    ewc = EWCPlusPlus([("w", w)], lambda_=10.0, decay=0.5)
    w.grad = torch.tensor([1.0, 1.0])
    ewc.update_fisher()
    ewc.consolidate()
    with torch.no_grad():
        w.add_(1.0)
    F0 = ewc.fisher["w"].clone()
    w.grad = None
    (0.0 * w.sum() + ewc.penalty()).backward()  # task gradient is zero
    assert w.grad.abs().min() > 1.0  # the penalty did put a gradient there
    ewc.update_fisher()
    torch.testing.assert_close(ewc.fisher["w"], 0.5 * F0, rtol=0, atol=1e-6)
    # and add_penalty_grad_ before update_fisher is taken out too
    w.grad = torch.zeros(2)
    ewc.add_penalty_grad_()
    ewc.update_fisher()
    torch.testing.assert_close(ewc.fisher["w"], 0.25 * F0, rtol=0, atol=1e-6)


def test_penalty_tracking_cleared_by_optimizer_step() -> None:
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.SGD([w], lr=0.0)
    ewc = EWCPlusPlus([("w", w)], lambda_=10.0, decay=0.5)
    w.grad = torch.tensor([1.0, 1.0])
    ewc.update_fisher()
    ewc.consolidate()
    with torch.no_grad():
        w.add_(1.0)
    ewc.penalty().backward()  # backpropagated, but no update_fisher this step
    opt.step()
    opt.zero_grad()
    w.grad = torch.tensor([2.0, 2.0])  # next step: task gradient only
    F0 = ewc.fisher["w"].clone()
    ewc.update_fisher()
    torch.testing.assert_close(ewc.fisher["w"], 0.5 * F0 + 0.5 * 4.0)


def test_add_penalty_grad_record_ends_with_new_gradients() -> None:
    w = nn.Parameter(torch.tensor([1.0]))
    ewc = EWCPlusPlus([("w", w)], lambda_=10.0, decay=0.5)
    w.grad = torch.tensor([1.0])
    ewc.update_fisher()
    ewc.consolidate()
    with torch.no_grad():
        w.add_(1.0)
    ewc.add_penalty_grad_()  # usage 2: after update_fisher, before step
    w.grad = None  # zero_grad(set_to_none=True)
    (3.0 * w).sum().backward()
    F0 = ewc.fisher["w"].clone()
    ewc.update_fisher()
    torch.testing.assert_close(ewc.fisher["w"], 0.5 * F0 + 0.5 * 9.0)


# ----------------------------------------------------------------------------- robustness


def test_nonfinite_step_skipped_and_counted_on_device() -> None:
    m = _mlp()
    ewc = EWCPlusPlus(m, lambda_=1.0, decay=0.9)
    x, y = _data()
    F_.cross_entropy(m(x), y).backward()
    ewc.update_fisher()
    before = _clone(ewc.fisher)
    for bad in (float("nan"), float("inf"), -float("inf")):
        m[0].weight.grad[0, 0] = bad
        ewc.update_fisher()
        assert all(torch.equal(before[k], v) for k, v in ewc.fisher.items())
    assert isinstance(ewc.skipped_steps, torch.Tensor) and ewc.skipped_steps.device == m[0].weight.device
    assert int(ewc.skipped_steps) == 3 and int(ewc.num_updates) == 1
    m.zero_grad()
    F_.cross_entropy(m(x), y).backward()
    ewc.update_fisher()
    assert int(ewc.num_updates) == 2
    assert not torch.equal(before["0.weight"], ewc.fisher["0.weight"])


def test_missing_grad_keeps_fisher() -> None:
    m = _mlp()
    ewc = EWCPlusPlus(m, lambda_=1.0, decay=0.9)
    x, y = _data()
    F_.cross_entropy(m(x), y).backward()
    ewc.update_fisher()
    f0 = _clone(ewc.fisher)
    m[2].bias.grad = None
    ewc.update_fisher()
    assert torch.equal(ewc.fisher["2.bias"], f0["2.bias"])
    torch.testing.assert_close(ewc.fisher["2.weight"], 0.9 * f0["2.weight"] + 0.1 * m[2].weight.grad ** 2)


def test_gradient_accumulation_matches_full_batch() -> None:
    f1, p1, _ = _train("penalty", accum=1)
    f2, p2, _ = _train("penalty", accum=2)
    f3, p3, _ = _train("grad_after", accum=4)
    for k in f1:
        torch.testing.assert_close(f2[k], f1[k], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(f3[k], f1[k], rtol=1e-4, atol=1e-8)
    for a, b, c in zip(p1, p2, p3):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_grad_scaler_penalty_in_loss(amp_dtype: torch.dtype) -> None:
    """Scaled loss incl. penalty, unscale_, update_fisher: same Fisher as the unscaled run (scale = 2^k)."""
    results = []
    for use_scaler in (True, False, "forgot"):
        m = _mlp()
        x, y = _data()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=use_scaler is not False)
        ewc = EWCPlusPlus(m, lambda_=50.0, decay=0.9, grad_scaler=scaler if use_scaler is True else None)
        for step in range(12):
            if step == 4:
                ewc.consolidate()
            opt.zero_grad()
            xb, yb = _batch(x, y, step)
            with torch.autocast("cpu", dtype=amp_dtype):
                task = F_.cross_entropy(m(xb), yb)
            scaler.scale(task + ewc.penalty()).backward()
            scaler.unscale_(opt)
            ewc.update_fisher()
            scaler.step(opt)
            scaler.update()
        results.append(_clone(ewc.fisher))
    scaled, plain, forgot = results
    for k in plain:
        torch.testing.assert_close(scaled[k], plain[k], rtol=1e-4, atol=1e-9)
    assert any(not torch.allclose(forgot[k], plain[k], rtol=1e-2) for k in plain)


# ----------------------------------------------------------------------------- consolidation modes


def test_multi_task_penalty_is_sum_over_tasks_and_capped() -> None:
    w = nn.Parameter(torch.zeros(3))
    ewc = EWCPlusPlus([("w", w)], lambda_=2.0, decay=0.0, mode="multi_task", max_tasks=2)
    tasks = []
    for t, (g, theta) in enumerate([([1.0, 2.0, 0.0], [0.0, 1.0, 2.0]), ([3.0, 0.0, 1.0], [1.0, 1.0, -1.0]),
                                     ([1.0, 1.0, 1.0], [2.0, 0.0, 0.0])]):
        with torch.no_grad():
            w.copy_(torch.tensor(theta))
        w.grad = torch.tensor(g)
        ewc.update_fisher()  # decay 0: F = g²
        ewc.consolidate()
        tasks.append((torch.tensor(g) ** 2, torch.tensor(theta)))
        assert torch.equal(ewc.fisher["w"], torch.zeros(3))  # reset per task
        assert ewc.num_tasks == min(t + 1, 2)
    with torch.no_grad():
        w.copy_(torch.tensor([0.5, -0.5, 1.5]))
    kept = tasks[1:]
    ref = sum(1.0 * (f * (w.detach() - th) ** 2).sum() for f, th in kept)  # λ/2 = 1
    torch.testing.assert_close(ewc.penalty().detach(), ref)
    w.grad = torch.zeros(3)
    ewc.add_penalty_grad_()
    ref_grad = sum(2.0 * f * (w.detach() - th) for f, th in kept)
    torch.testing.assert_close(w.grad, ref_grad)


def test_adapt_lambda_and_bias_correction() -> None:
    w = nn.Parameter(torch.ones(2))
    ewc = EWCPlusPlus([("w", w)], lambda_=1000.0, decay=0.9, adapt_lambda=True, min_lambda=100.0,
                      max_lambda=1250.0, bias_correction=True)
    w.grad = torch.tensor([1.0, 2.0])
    for _ in range(3):
        ewc.update_fisher()
    ewc.consolidate()
    assert ewc.lambda_ == pytest.approx(1100.0)
    # F after 3 updates of the same g: (1 − 0.9³)·g²; corrected back to g²
    torch.testing.assert_close(ewc.fisher_star["w"], torch.tensor([1.0, 4.0]))
    assert torch.equal(ewc.fisher["w"], torch.zeros(2))  # the within-task estimate restarts
    ewc.consolidate()  # a task with no Fisher update adds nothing (bias correction of 0 updates: 0)
    ewc.consolidate()
    torch.testing.assert_close(ewc.fisher_star["w"], torch.tensor([1.0, 4.0]))
    assert ewc.lambda_ == pytest.approx(1250.0)  # 1000·1.3 clamped
    ewc.set_lambda(5.0)
    assert ewc.lambda_ == 100.0


def test_boundary_detection_and_auto_consolidate() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.zeros(4, 8))
    b = nn.Parameter(torch.zeros(8))
    ewc = EWCPlusPlus([("w", w), ("b", b)], lambda_=1.0, decay=0.9, detect_boundary=True,
                      boundary_warmup=30, boundary_patience=3, boundary_threshold=3.0,
                      auto_consolidate=True, boundary_check_every=1)
    for _ in range(60):
        w.grad = torch.randn(4, 8) * 0.1
        b.grad = torch.randn(8) * 0.1
        ewc.update_fisher()
        assert not ewc.boundary_detected
    assert ewc.num_tasks == 0
    for k in range(3):
        w.grad = torch.randn(4, 8) * 10.0
        b.grad = torch.randn(8) * 10.0
        ewc.update_fisher()
        if k < 2:
            assert ewc.num_tasks == 0
    assert ewc.num_tasks == 1 and ewc.consolidated
    assert not ewc.boundary_detected  # consumed by consolidate
    # a NaN step neither counts towards nor corrupts the statistics
    w.grad[0, 0] = float("nan")
    ewc.update_fisher()
    assert torch.isfinite(ewc._bd_mean).all()


def test_boundary_latched_without_auto() -> None:
    torch.manual_seed(1)
    w = nn.Parameter(torch.zeros(16))
    ewc = EWCPlusPlus([("w", w)], decay=0.9, detect_boundary=True, boundary_warmup=20, boundary_patience=2)
    for _ in range(25):
        w.grad = torch.randn(16)
        ewc.update_fisher()
    assert not ewc.boundary_detected
    for _ in range(2):
        w.grad = torch.randn(16) * 1e3
        ewc.update_fisher()
    assert ewc.boundary_detected and float(ewc.boundary_score) > 2.0
    ewc.reset_boundary()
    assert not ewc.boundary_detected


# ----------------------------------------------------------------------------- state


def _trained_ewc(mode: str = "online") -> tuple[nn.Module, EWCPlusPlus]:
    m = _mlp()
    x, y = _data()
    ewc = EWCPlusPlus(m, lambda_=30.0, decay=0.8, mode=mode, detect_boundary=True)
    for step in range(6):
        m.zero_grad()
        xb, yb = _batch(x, y, step)
        F_.cross_entropy(m(xb), yb).backward()
        ewc.update_fisher()
        if step in (2, 4):
            ewc.consolidate()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01)
    return m, ewc


def _assert_same_state(a: EWCPlusPlus, b: EWCPlusPlus) -> None:
    for attr in ("fisher", "fisher_star", "theta_star"):
        da, db = getattr(a, attr), getattr(b, attr)
        assert da.keys() == db.keys()
        for k in da:
            assert torch.equal(da[k], db[k]), (attr, k)
    assert a.lambda_ == b.lambda_ and a.num_tasks == b.num_tasks and a.mode == b.mode
    assert int(a.num_updates) == int(b.num_updates) and int(a.skipped_steps) == int(b.skipped_steps)
    assert torch.equal(a._bd_mean, b._bd_mean)
    torch.testing.assert_close(a.penalty().detach(), b.penalty().detach(), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["online", "multi_task"])
def test_state_dict_round_trip(mode: str) -> None:
    m, ewc = _trained_ewc(mode)
    sd = ewc.state_dict()
    assert sd["fisher"]["0.weight"].shape == m[0].weight.shape
    other = EWCPlusPlus(m, lambda_=1.0, decay=0.5)
    other.load_state_dict(sd)
    _assert_same_state(ewc, other)
    assert other.decay == 0.8 and other.mode == mode
    assert other.task_decay == ewc.task_decay and other.fisher_norm == ewc.fisher_norm


def test_safetensors_round_trip_atomic_and_validated(tmp_path) -> None:
    m, ewc = _trained_ewc("multi_task")
    path = tmp_path / "ewc.safetensors"
    ewc.save(path)
    assert sorted(os.listdir(tmp_path)) == ["ewc.safetensors"]  # no temp file left
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "rbank_torch.ewc"
    other = EWCPlusPlus(m, lambda_=1.0)
    other.load(path)
    _assert_same_state(ewc, other)
    # overwrite keeps a single valid file
    ewc.save(path)
    other.load(path)

    wrong_names = EWCPlusPlus([("w", nn.Parameter(torch.zeros(3)))])
    with pytest.raises(ValueError, match="names differ"):
        wrong_names.load(path)
    m2 = nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 3))
    with pytest.raises(ValueError, match="shape"):
        EWCPlusPlus(m2).load(path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        other.load(bad)


def test_load_state_dict_errors_name_the_key() -> None:
    m, ewc = _trained_ewc()
    sd = ewc.state_dict()
    sd["fisher"] = dict(sd["fisher"])
    sd["fisher"]["0.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"state\['fisher'\]\['0.weight'\] has shape"):
        EWCPlusPlus(m).load_state_dict(sd)
    sd = ewc.state_dict()
    sd["theta_star"] = {k: v for k, v in sd["theta_star"].items() if k != "2.bias"}
    with pytest.raises(ValueError, match=r"missing \['2.bias'\]"):
        EWCPlusPlus(m).load_state_dict(sd)
    with pytest.raises(ValueError, match="format"):
        EWCPlusPlus(m).load_state_dict({"format": "other"})


def _bad_states(sd: dict) -> list[tuple[str, dict]]:
    """(expected message, state) pairs, each wrong in one place only."""
    import copy

    out = []

    def variant(msg: str, edit) -> None:
        d = copy.deepcopy(sd)
        edit(d)
        out.append((msg, d))

    variant(r"state\['lambda'\] must be a finite", lambda d: d.__setitem__("lambda", float("nan")))
    variant(r"'decay'\] must be within", lambda d: d["config"].__setitem__("decay", 1.5))
    variant(r"min_lambda'\] \(50000.0\) must not exceed", lambda d: d["config"].update(min_lambda=5e4, max_lambda=1e4))
    variant(r"'counters'\] is missing", lambda d: d.pop("counters"))
    variant(r"'counters'\]\['skipped'\] must be one count", lambda d: d["counters"].__setitem__("skipped", -1))
    variant(r"'mode'", lambda d: d["config"].__setitem__("mode", "sometimes"))
    variant(r"'max_tasks'\] is missing", lambda d: d["config"].pop("max_tasks"))

    def nan_fisher(d: dict) -> None:
        k = next(iter(d["fisher"]))
        d["fisher"][k] = d["fisher"][k].clone()
        d["fisher"][k].view(-1)[0] = float("nan")

    def neg_fisher(d: dict) -> None:
        k = next(iter(d["fisher_star"]))
        d["fisher_star"][k] = d["fisher_star"][k].clone()
        d["fisher_star"][k].view(-1)[0] = -1.0

    def inf_theta(d: dict) -> None:
        k = next(iter(d["theta_star"]))
        d["theta_star"][k] = d["theta_star"][k].clone()
        d["theta_star"][k].view(-1)[0] = float("inf")

    variant(r"state\['fisher'\] must hold finite values >= 0", nan_fisher)
    variant(r"state\['fisher_star'\] must hold finite values >= 0", neg_fisher)
    variant(r"state\['theta_star'\] must hold finite values", inf_theta)
    return out


def test_bad_state_raises_and_changes_nothing(tmp_path) -> None:
    m, ewc = _trained_ewc()
    good = ewc.state_dict()
    target = EWCPlusPlus(m, lambda_=5.0, decay=0.3, max_tasks=4, min_lambda=1.0, max_lambda=10.0)
    x, y = _data()
    m.zero_grad()
    F_.cross_entropy(m(x), y).backward()
    target.update_fisher()
    before_fisher = _clone(target.fisher)
    before = (target.decay, target.mode, target.max_tasks, target.min_lambda, target.max_lambda, float(target.lambda_),
              int(target.num_updates), int(target.skipped_steps))
    for msg, bad in _bad_states(good):
        with pytest.raises(ValueError, match=msg):
            target.load_state_dict(bad)
        after = (target.decay, target.mode, target.max_tasks, target.min_lambda, target.max_lambda,
                 float(target.lambda_), int(target.num_updates), int(target.skipped_steps))
        assert after == before, msg
        for k, v in target.fisher.items():
            assert torch.equal(v, before_fisher[k]), msg
    # the good state still loads, and the same checks guard load() from a file
    target.load_state_dict(good)
    assert target.decay == ewc.decay and float(target.lambda_) == float(ewc.lambda_)
    for k, v in ewc.fisher.items():
        assert torch.equal(target.fisher[k], v)


def test_buffers_follow_module_dtype() -> None:
    m, ewc = _trained_ewc()
    f32 = _clone(ewc.fisher)
    pen32 = ewc.penalty().detach()
    m.to(torch.float64)
    assert all(v.dtype == torch.float64 for v in ewc.fisher.values())
    assert ewc.penalty().dtype == torch.float64
    torch.testing.assert_close(ewc.penalty().detach().float(), pen32)
    for k, v in ewc.fisher.items():
        torch.testing.assert_close(v, f32[k].double())
    x, y = _data()
    m.zero_grad()
    F_.cross_entropy(m(x.double()), y).backward()
    ewc.update_fisher()
    ewc.add_penalty_grad_()
    assert all(v.dtype == torch.float64 for v in ewc.fisher.values())


def test_fisher_dtype_float32_for_bf16_model() -> None:
    m = _mlp(dtype=torch.bfloat16)
    ewc = EWCPlusPlus(m, lambda_=1.0, decay=0.999, fisher_dtype=torch.float32)
    x, y = _data()
    F_.cross_entropy(m(x.bfloat16()), y).backward()
    for _ in range(3):
        ewc.update_fisher()
    assert all(v.dtype == torch.float32 for v in ewc.fisher.values())
    assert all(v.dtype == torch.bfloat16 for v in ewc.theta_star.values())
    g = m[0].weight.grad.float()
    torch.testing.assert_close(ewc.fisher["0.weight"], (1 - 0.999**3) * g**2, rtol=1e-4, atol=1e-12)


# ----------------------------------------------------------------------------- validation


def test_argument_validation() -> None:
    m = _mlp()
    with pytest.raises(ValueError, match="decay"):
        EWCPlusPlus(m, decay=1.0)
    with pytest.raises(ValueError, match="lambda_"):
        EWCPlusPlus(m, lambda_=-1.0)
    with pytest.raises(ValueError, match="mode"):
        EWCPlusPlus(m, mode="offline")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_lambda"):
        EWCPlusPlus(m, min_lambda=10.0, max_lambda=1.0)
    with pytest.raises(ValueError, match="auto_consolidate"):
        EWCPlusPlus(m, auto_consolidate=True)
    with pytest.raises(ValueError, match="no trainable"):
        EWCPlusPlus(nn.Module())
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="twice"):
        EWCPlusPlus([("a", p), ("a", p)])
    with pytest.raises(ValueError, match="does not require grad"):
        EWCPlusPlus({"a": torch.zeros(2)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_host_path_matches_device_select_path(dtype: torch.dtype) -> None:
    """The CPU fast path (host flag, in-place F) and the sync-free path (scratch + where) agree exactly."""
    results = []
    for host in (True, False):
        m = _mlp(dtype=dtype)
        x, y = _data()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        ewc = EWCPlusPlus(m, lambda_=30.0, decay=0.8, fisher_dtype=torch.float32)
        ewc._host_select = host
        for step in range(8):
            if step == 3:
                ewc.consolidate()
            opt.zero_grad()
            xb, yb = _batch(x, y, step)
            F_.cross_entropy(m(xb.to(dtype)), yb).backward()
            if step == 5:
                m[0].weight.grad[1, 2] = float("nan")
            if step == 6:
                m[2].bias.grad = None
            ewc.update_fisher()
            ewc.add_penalty_grad_()
            if step != 5:
                opt.step()
        results.append((_clone(ewc.fisher), [p.detach().clone() for p in m.parameters()], int(ewc.skipped_steps)))
    (f_host, p_host, s_host), (f_dev, p_dev, s_dev) = results
    assert s_host == s_dev == 1
    for k in f_host:
        assert f_host[k].dtype == torch.float32
        assert torch.equal(f_host[k], f_dev[k]), k
    for a, b in zip(p_host, p_dev):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- across-task accumulation


def _run_task(ewc: EWCPlusPlus, w: nn.Parameter, grad: list[float], steps: int) -> None:
    for _ in range(steps):
        w.grad = torch.tensor(grad, dtype=w.dtype)
        ewc.update_fisher()
    ewc.consolidate()


@pytest.mark.parametrize("steps_b", [3, 2000])
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_online_f_star_accumulates_per_task_not_per_step(steps_b: int, gamma: float) -> None:
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    ewc = EWCPlusPlus([("w", w)], lambda_=2.0, decay=0.99, task_decay=gamma, bias_correction=True)
    _run_task(ewc, w, [1.0, 0.0, 0.0], 5)  # F_A = g² after bias correction, whatever the length
    torch.testing.assert_close(ewc.fisher_star["w"], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(ewc.fisher["w"], torch.zeros(3, dtype=torch.float64))
    _run_task(ewc, w, [0.0, 2.0, 0.0], steps_b)
    # F* = γ·F_A + F_B: task A keeps weight γ however many steps task B took
    torch.testing.assert_close(ewc.fisher_star["w"], torch.tensor([gamma, 4.0, 0.0], dtype=torch.float64))
    _run_task(ewc, w, [0.0, 0.0, 3.0], 7)
    torch.testing.assert_close(ewc.fisher_star["w"], torch.tensor([gamma**2, 4.0 * gamma, 9.0], dtype=torch.float64))
    assert ewc.num_tasks == 3


def test_old_task_still_penalised_after_a_long_later_task() -> None:
    torch.manual_seed(0)
    m = _mlp()
    x, y = _data()
    ewc = EWCPlusPlus(m, lambda_=1.0)  # the defaults
    for _ in range(20):
        m.zero_grad()
        F_.cross_entropy(m(x[:8]), y[:8]).backward()
        ewc.update_fisher()
    ewc.consolidate()
    f_a = {n: t.clone() for n, t in ewc.fisher_star.items()}
    assert float(sum(t.sum() for t in f_a.values())) > 0
    for _ in range(1500):  # a long second task on other labels: 0.99^1500 ≈ 3e-7 per-step decay
        m.zero_grad()
        F_.cross_entropy(m(x[8:16]), y[8:16].flip(0)).backward()
        ewc.update_fisher()
    ewc.consolidate()
    for n in f_a:  # task A's Fisher is still entirely in F* (γ = 1): F* = F_A + F_B ≥ F_A
        assert bool((ewc.fisher_star[n] >= f_a[n] * (1 - 1e-6)).all()), n


@pytest.mark.parametrize("norm", ["mean", "max"])
def test_fisher_norm_scale_free(norm: str) -> None:
    stars = []
    for scale in (1.0, 1e-3):
        w = nn.Parameter(torch.zeros(4, dtype=torch.float64))
        ewc = EWCPlusPlus([("w", w)], lambda_=1.0, decay=0.5, fisher_norm=norm)  # type: ignore[arg-type]
        _run_task(ewc, w, [scale * 1.0, scale * 2.0, 0.0, scale * 1.0], 4)
        _run_task(ewc, w, [0.0, 0.0, scale * 3.0, 0.0], 4)
        stars.append(ewc.fisher_star["w"].clone())
    g2a = torch.tensor([1.0, 4.0, 0.0, 1.0], dtype=torch.float64)
    g2b = torch.tensor([0.0, 0.0, 9.0, 0.0], dtype=torch.float64)
    if norm == "mean":
        want = g2a / g2a.mean() + g2b / g2b.mean()  # each task's Fisher has mean 1
    else:
        want = g2a / g2a.max() + g2b / g2b.max()
    torch.testing.assert_close(stars[0], want)
    torch.testing.assert_close(stars[1], want)  # gradients 1000× smaller: same F*, the same λ applies


def test_fisher_norm_zero_fisher_stays_zero() -> None:
    w = nn.Parameter(torch.zeros(2))
    ewc = EWCPlusPlus([("w", w)], fisher_norm="mean")
    ewc.consolidate()  # no updates: F = 0, no division by zero
    assert torch.equal(ewc.fisher_star["w"], torch.zeros(2))


def test_multi_task_task_decay_weights_older_tasks() -> None:
    w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    ewc = EWCPlusPlus([("w", w)], lambda_=2.0, decay=0.0, mode="multi_task", task_decay=0.5)
    _run_task(ewc, w, [1.0, 0.0], 1)
    _run_task(ewc, w, [0.0, 2.0], 1)
    torch.testing.assert_close(ewc.fisher_star["w"], torch.tensor([0.5, 4.0], dtype=torch.float64))


def test_task_decay_and_fisher_norm_validated() -> None:
    m = _mlp()
    with pytest.raises(ValueError, match="task_decay must be within"):
        EWCPlusPlus(m, task_decay=1.5)
    with pytest.raises(ValueError, match="task_decay must be a finite number"):
        EWCPlusPlus(m, task_decay=float("nan"))
    with pytest.raises(ValueError, match="fisher_norm must be"):
        EWCPlusPlus(m, fisher_norm="sum")  # type: ignore[arg-type]
    _, ewc = _trained_ewc()
    sd = ewc.state_dict()
    sd["config"] = dict(sd["config"], task_decay=2.0)
    with pytest.raises(ValueError, match=r"\['task_decay'\] must be within"):
        EWCPlusPlus(m).load_state_dict(sd)
    sd["config"] = dict(sd["config"], task_decay=1.0, fisher_norm="l2")
    with pytest.raises(ValueError, match=r"\['fisher_norm'\] must be"):
        EWCPlusPlus(m).load_state_dict(sd)


def test_format_1_state_loads_with_this_objects_accumulation_settings(tmp_path) -> None:
    m, ewc = _trained_ewc()
    sd = ewc.state_dict()
    sd["format_version"] = 1
    sd["config"] = {k: v for k, v in sd["config"].items() if k not in ("task_decay", "fisher_norm")}
    other = EWCPlusPlus(m, lambda_=1.0, task_decay=0.7, fisher_norm="mean")
    other.load_state_dict(sd)
    _assert_same_state(ewc, other)
    assert other.task_decay == 0.7 and other.fisher_norm == "mean"
    # the file form: a format-1 header without the two keys loads the same way
    path = tmp_path / "v2.safetensors"
    ewc.save(path)
    back = EWCPlusPlus(m, lambda_=1.0, task_decay=0.3)
    back.load(path)
    assert back.task_decay == ewc.task_decay and back.fisher_norm == ewc.fisher_norm
    _assert_same_state(ewc, back)


def test_metrics_match_the_state() -> None:
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    b = nn.Parameter(torch.tensor([0.5]))
    ewc = EWCPlusPlus([("w", w), ("b", b)], lambda_=4.0, decay=0.0)
    w.grad, b.grad = torch.tensor([1.0, 3.0]), torch.tensor([2.0])
    ewc.update_fisher()  # decay 0: F = g² = [1, 9], [4]
    m = ewc.metrics()
    assert m["fisher_mean"] == pytest.approx(14.0 / 3) and m["fisher_star_mean"] == 0.0 and m["penalty"] == 0.0
    ewc.consolidate()
    with torch.no_grad():
        w.add_(1.0)
    m = ewc.metrics()
    assert m["fisher_mean"] == 0.0 and m["fisher_star_mean"] == pytest.approx(14.0 / 3)
    assert m["penalty"] == pytest.approx(2.0 * (1.0 + 9.0)) and m["lambda"] == 4.0 and m["num_tasks"] == 1.0
    assert set(ewc.metric_tensors()) == {"penalty", "fisher_mean", "fisher_star_mean", "lambda"}


def test_rebound_carries_state_or_names_the_mismatch() -> None:
    m, ewc = _trained_ewc()
    twin = _mlp(seed=5)
    assert ewc.holds(m) and not ewc.holds(twin)
    moved = ewc.rebound(twin)
    assert moved.holds(twin) and moved.decay == ewc.decay and moved.num_tasks == ewc.num_tasks
    for k, v in ewc.fisher_star.items():
        assert torch.equal(moved.fisher_star[k], v)
    with pytest.raises(ValueError, match=r"other names: missing \['2.weight', '2.bias'\]"):
        ewc.rebound(nn.Sequential(nn.Linear(6, 16)))
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(8, 6\)"):
        ewc.rebound(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))
