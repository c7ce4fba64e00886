"""Pair finding (torch ``ref`` and Triton ``tri``) and the leader scan, against plain sequential oracles.

The Triton kernel runs on CPU under ``TRITON_INTERPRET=1``: the kernel is decorated on first use, when the
variable is read, so each Triton test sets it with ``monkeypatch`` instead of for the whole process.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rbank_torch.kernels import pairs as P
from rbank_torch.kernels.pairs import (
    leader_scan,
    pair_cosine64,
    pair_margin,
    pairs_above,
    torch_pairs_above,
    triton_pairs_above,
)

needs_triton = pytest.mark.skipif(not P.HAS_TRITON, reason="triton is not installed")


# --------------------------------------------------------------------------------------------------
# oracles: the rules written as plain sequential Python
# --------------------------------------------------------------------------------------------------


def oracle_pairs(emb: torch.Tensor, threshold: float, categories: list[int] | None = None) -> torch.Tensor:
    """Every pair i < j, one at a time: float64 cosine of the raw rows > threshold, same category."""
    e = emb.to(torch.float64).numpy()
    n = e.shape[0]
    norms = [math.sqrt(float(np.dot(e[i], e[i]))) for i in range(n)]
    out = []
    for i in range(n):
        for j in range(i + 1, n):
            if categories is not None and categories[i] != categories[j]:
                continue
            if norms[i] <= 1e-8 or norms[j] <= 1e-8:
                sim = 0.0
            else:
                sim = float(np.dot(e[i], e[j])) / (norms[i] * norms[j])
            if sim > threshold:
                out.append((i, j))
    return torch.tensor(out, dtype=torch.int64).reshape(-1, 2)


def oracle_pairs_rowwise(
    emb: torch.Tensor, threshold: float, categories: list[int] | None = None
) -> torch.Tensor:
    """The same rule, one row at a time (the inner loop vectorised) for the large case."""
    e = emb.to(torch.float64).numpy()
    n = e.shape[0]
    norms = np.sqrt((e * e).sum(axis=1))
    cats = None if categories is None else np.asarray(categories)
    out = []
    for i in range(n - 1):
        rest = e[i + 1 :]
        if norms[i] <= 1e-8:
            sims = np.zeros(n - i - 1)
        else:
            nr = norms[i + 1 :]
            sims = np.where(nr > 1e-8, (rest * e[i]).sum(axis=1) / (norms[i] * np.maximum(nr, 1e-300)), 0.0)
        ok = sims > threshold
        if cats is not None:
            ok &= cats[i + 1 :] == cats[i]
        for j in np.flatnonzero(ok):
            out.append((i, i + 1 + int(j)))
    return torch.tensor(out, dtype=torch.int64).reshape(-1, 2)


def oracle_leaders(n: int, pairs: torch.Tensor, eligible: list[bool] | None = None) -> list[int]:
    """SPEC §3 merge_similar scan: ascending rows, a non-absorbed row leads and absorbs later neighbours."""
    neighbours: dict[int, set[int]] = {}
    for i, j in pairs.tolist():
        neighbours.setdefault(i, set()).add(j)
    absorbed = [False] * n
    leader = list(range(n))
    for i in range(n):
        if absorbed[i] or (eligible is not None and not eligible[i]):
            continue
        for j in sorted(neighbours.get(i, ())):
            if j > i and not absorbed[j] and (eligible is None or eligible[j]):
                absorbed[j] = True
                leader[j] = i
    return leader


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def clustered(n: int, d: int, seed: int, n_clusters: int | None = None, dtype=torch.float32) -> torch.Tensor:
    """Raw (unnormalised) clustered rows: cluster similarities spread around 0.8-0.95."""
    g = torch.Generator().manual_seed(seed)
    k = n_clusters or max(1, n // 8)
    centres = torch.randn(k, d, generator=g)
    centres = centres / centres.norm(dim=1, keepdim=True)
    lab = torch.randint(k, (n,), generator=g)
    spread = 0.2 + 0.4 * torch.rand(k, generator=g)
    x = centres[lab] + spread[lab, None] * torch.randn(n, d, generator=g) / math.sqrt(d)
    scale = 0.5 + 3 * torch.rand(n, 1, generator=g)  # raw rows are not unit length
    return (x * scale).to(dtype)


def near_threshold(
    threshold: float, deltas: list[float], d: int, seed: int
) -> tuple[torch.Tensor, list[tuple[int, int, float]]]:
    """Row pairs (2m, 2m+1) whose float64 cosine is threshold + delta, delta from ``deltas``, scaled raw."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    expect = []
    for m, delta in enumerate(deltas):
        a = torch.randn(d, generator=g, dtype=torch.float64)
        a /= a.norm()
        b = torch.randn(d, generator=g, dtype=torch.float64)
        b -= (b @ a) * a
        b /= b.norm()
        c = threshold + delta
        v = c * a + math.sqrt(1.0 - c * c) * b
        rows += [a * (1.0 + m % 3), v * 0.7]
        expect.append((2 * m, 2 * m + 1, delta))
    return torch.stack(rows), expect


# --------------------------------------------------------------------------------------------------
# torch reference against the oracle
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 63, 123, 500])
@pytest.mark.parametrize("with_cats", [False, True])
def test_torch_pairs_match_oracle(n: int, with_cats: bool) -> None:
    d = 24 if n < 500 else 12
    emb = clustered(n, d, seed=n)
    cats = torch.randint(3, (n,), generator=torch.Generator().manual_seed(7)) if with_cats else None
    want = oracle_pairs(emb, 0.8, None if cats is None else cats.tolist())
    for precision in ("fp32", "bf16", "auto"):
        ref = torch_pairs_above(emb, 0.8, cats, block_size=64, precision=precision)
        assert ref.dtype == torch.int64 and ref.shape[1] == 2
        assert torch.equal(ref, want)
    if n >= 63:
        assert want.shape[0] > 0  # the data really has pairs


def test_large_odd_size_against_rowwise_oracle() -> None:
    n, d = 4097, 4
    emb = clustered(n, d, seed=11, n_clusters=600)
    cats = (torch.arange(n) * 7919) % 5
    for c in (None, cats):
        want = oracle_pairs_rowwise(emb, 0.99, None if c is None else c.tolist())
        ref = torch_pairs_above(emb, 0.99, c, block_size=256)
        assert want.shape[0] > 1000
        assert torch.equal(ref, want)


def test_rowwise_oracle_agrees_with_pairwise_oracle() -> None:
    emb = clustered(90, 6, seed=3)
    emb[5] = 0.0
    cats = [i % 2 for i in range(90)]
    assert torch.equal(oracle_pairs(emb, 0.7, cats), oracle_pairs_rowwise(emb, 0.7, cats))
    assert torch.equal(oracle_pairs(emb, -0.1), oracle_pairs_rowwise(emb, -0.1))


def test_pairs_are_sorted_and_unique() -> None:
    emb = clustered(300, 16, seed=5)
    ref = torch_pairs_above(emb, 0.7, block_size=17)
    assert ref.shape[0] > 100
    assert bool((ref[:, 0] < ref[:, 1]).all())
    key = ref[:, 0] * 300 + ref[:, 1]
    assert bool((key[1:] > key[:-1]).all())


@pytest.mark.parametrize("block_size", [5, 64, 1024])
def test_tile_size_does_not_change_pairs(block_size: int) -> None:
    emb = clustered(150, 20, seed=9)
    want = oracle_pairs(emb, 0.75)
    assert torch.equal(torch_pairs_above(emb, 0.75, block_size=block_size), want)


def test_pairs_within_1e6_of_threshold() -> None:
    t = 0.85
    deltas = [s * m for m in (1e-6, 3e-7, 1e-7, 1e-8, 1e-9) for s in (1.0, -1.0)] * 20
    emb, expect = near_threshold(t, deltas, d=96, seed=1)
    want = sorted((i, j) for i, j, delta in expect if delta > 0)
    oracle = oracle_pairs(emb.to(torch.float32), t)
    for precision in ("fp32", "bf16"):
        assert torch.equal(torch_pairs_above(emb.to(torch.float32), t, precision=precision), oracle)
    # float64 input keeps the constructed similarities to ~1e-16, so the expected set is exact.
    ref64 = torch_pairs_above(emb, t)
    assert ref64.tolist() == [list(p) for p in want]
    # The float32 GEMM alone gets some of these wrong: the re-check is what makes the result exact.
    u = (emb / emb.norm(dim=1, keepdim=True)).to(torch.float32)
    s32 = (u[0::2] * u[1::2]).sum(dim=1)
    decided32 = s32 > t
    truth = torch.tensor([delta > 0 for _, _, delta in expect])
    assert bool((decided32 != truth).any())


def test_margin_zero_can_miss_pairs_default_margin_does_not() -> None:
    t = 0.85
    deltas = [1e-7, 3e-8, 1e-8, 3e-9] * 50
    emb, _ = near_threshold(t, deltas, d=256, seed=2)
    emb = emb.to(torch.float32)
    want = oracle_pairs(emb, t)
    exact = torch_pairs_above(emb, t)
    no_margin = torch_pairs_above(emb, t, margin=0.0, precision="fp32")
    assert torch.equal(exact, want)
    assert no_margin.shape[0] < want.shape[0]  # without the margin some true pairs are lost


def test_zero_rows_have_similarity_zero() -> None:
    emb = clustered(40, 8, seed=4)
    emb[[3, 17, 30]] = 0.0
    emb[21] = 1e-10  # below the zero-norm cut
    for t in (0.5, -0.25):
        want = oracle_pairs(emb, t)
        ref = torch_pairs_above(emb, t)
        assert torch.equal(ref, want)
    neg = torch_pairs_above(emb, -0.25).tolist()
    assert [3, 17] in neg and [17, 30] in neg  # 0 > -0.25: zero rows pair with each other
    pos = torch_pairs_above(emb, 0.0)
    assert not bool(torch.isin(pos, torch.tensor([3, 17, 21, 30])).any())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtypes(dtype: torch.dtype) -> None:
    emb = clustered(120, 16, seed=6, dtype=dtype)
    want = oracle_pairs(emb, 0.8)
    assert want.shape[0] > 0
    assert torch.equal(torch_pairs_above(emb, 0.8), want)


@pytest.mark.parametrize("precision", ["tf32", "bf16", "auto"])
def test_low_precision_candidates_same_result(precision: str) -> None:
    emb = clustered(400, 32, seed=8)
    want = torch_pairs_above(emb, 0.8, precision="fp32")
    assert torch.equal(torch_pairs_above(emb, 0.8, precision=precision, block_size=64), want)


def test_margin_follows_global_matmul_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    # A float32 torch.mm may run in bf16 under "medium": the margin must widen to the bf16 bound.
    seen: list[str] = []
    real = P.pair_margin
    monkeypatch.setattr(P, "pair_margin", lambda d, p="fp32": (seen.append(p), real(d, p))[1])
    prev = torch.get_float32_matmul_precision()
    emb = clustered(50, 8, seed=1)
    try:
        torch.set_float32_matmul_precision("medium")
        torch_pairs_above(emb, 0.8, precision="fp32")
        torch.set_float32_matmul_precision("high")
        torch_pairs_above(emb, 0.8, precision="fp32")
        torch.set_float32_matmul_precision("highest")
        torch_pairs_above(emb, 0.8, precision="fp32")
    finally:
        torch.set_float32_matmul_precision(prev)
    assert seen == ["bf16", "tf32", "fp32"]


def test_resolve_precision() -> None:
    assert P.resolve_precision("fp32", "cpu") == "fp32"
    assert P.resolve_precision("auto", "cuda") == "bf16"
    assert P.resolve_precision("auto", "cpu") == ("bf16" if P._CPU_BF16 else "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        P.resolve_precision("fp16", "cpu")


def test_bf16_margin_bounds_observed_error() -> None:
    g = torch.Generator().manual_seed(0)
    for d in (16, 768):
        x = torch.randn(512, d, generator=g, dtype=torch.float64)
        u = x / x.norm(dim=1, keepdim=True)
        s64 = u @ u.T
        s32 = (u.float() @ u.float().T).double()
        sbf = (u.float().bfloat16() @ u.float().bfloat16().T).double()
        assert float((s32 - s64).abs().max()) <= pair_margin(d, "fp32")
        assert float((sbf - s64).abs().max()) <= pair_margin(d, "bf16")
    assert pair_margin(768) < pair_margin(768, "tf32") < pair_margin(768, "bf16")
    assert pair_margin(4096) > pair_margin(768)


def test_pair_cosine64_is_the_record() -> None:
    emb = torch.tensor([[3.0, 4.0], [4.0, 3.0], [0.0, 0.0], [-3.0, -4.0]])
    i = torch.tensor([0, 0, 0, 2])
    j = torch.tensor([1, 2, 3, 3])
    sims = pair_cosine64(emb, i, j)
    assert sims.dtype == torch.float64
    assert sims.tolist() == [24.0 / 25.0, 0.0, -1.0, 0.0]


def test_pair_cosine64_value_does_not_depend_on_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    emb = clustered(200, 48, seed=14)
    g = torch.Generator().manual_seed(0)
    i = torch.randint(200, (500,), generator=g)
    j = torch.randint(200, (500,), generator=g)
    full = pair_cosine64(emb, i, j)
    exact = torch.nn.functional.cosine_similarity(emb[i].double(), emb[j].double(), dim=1)
    torch.testing.assert_close(full, exact, rtol=0, atol=1e-14)
    perm = torch.randperm(500, generator=g)
    assert torch.equal(pair_cosine64(emb, i[perm], j[perm]), full[perm])
    singles = torch.cat([pair_cosine64(emb, i[k : k + 1], j[k : k + 1]) for k in range(0, 500, 7)])
    assert torch.equal(singles, full[0:500:7])
    monkeypatch.setattr(P, "_RECHECK_CHUNK", 3)
    assert torch.equal(pair_cosine64(emb, i, j), full)


def test_dispatcher_uses_torch_on_cpu() -> None:
    emb = clustered(100, 8, seed=12)
    assert torch.equal(pairs_above(emb, 0.9), torch_pairs_above(emb, 0.9))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"emb": torch.zeros(5)}, "emb must be 2-D"),
        ({"emb": torch.zeros(5, 3, dtype=torch.int64)}, "emb must have a floating dtype"),
        ({"emb": torch.tensor([[1.0, float("nan")]])}, "emb must hold finite"),
        ({"emb": np.zeros((4, 2))}, "emb must be a torch.Tensor"),
        ({"threshold": float("nan")}, "threshold must be finite"),
        ({"threshold": "x"}, "threshold must be a number"),
        ({"categories": torch.zeros(3, dtype=torch.int64)}, "categories must be 1-D"),
        ({"categories": torch.zeros(4)}, "categories must hold integer"),
        ({"margin": -1.0}, "margin must be"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"block_size": 0}, "block_size must be"),
    ],
)
def test_invalid_inputs(kwargs: dict, match: str) -> None:
    args = {"emb": torch.randn(4, 3), "threshold": 0.5, "categories": None}
    args.update(kwargs)
    emb, thr, cats = args.pop("emb"), args.pop("threshold"), args.pop("categories")
    with pytest.raises(ValueError, match=match):
        torch_pairs_above(emb, thr, cats, **args)


# --------------------------------------------------------------------------------------------------
# Triton kernel (interpreted on CPU) against the torch reference
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    # Triton reads TRITON_INTERPRET when it is first imported (tests/conftest.py sets it without CUDA);
    # with CUDA the kernel runs compiled and the CUDA tests below cover it
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the Triton kernel is tested compiled, not interpreted")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@needs_triton
@pytest.mark.parametrize("n", [1, 63, 123, 500])
@pytest.mark.parametrize("with_cats", [False, True])
def test_triton_matches_torch(interpret: None, n: int, with_cats: bool) -> None:
    d = 40 if n < 500 else 8
    emb = clustered(n, d, seed=100 + n)
    cats = torch.randint(4, (n,), generator=torch.Generator().manual_seed(1)) if with_cats else None
    ref = torch_pairs_above(emb, 0.8, cats)
    tri = triton_pairs_above(emb, 0.8, cats)
    assert tri.dtype == torch.int64
    assert torch.equal(tri, ref)
    if n >= 63:
        assert ref.shape[0] > 0


@needs_triton
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_triton_precisions_near_threshold(interpret: None, precision: str) -> None:
    t = 0.85
    deltas = [s * m for m in (1e-6, 1e-7, 1e-9) for s in (1.0, -1.0)] * 6
    emb, expect = near_threshold(t, deltas, d=72, seed=5)
    emb = emb.to(torch.float32)
    ref = torch_pairs_above(emb, t)
    tri = triton_pairs_above(emb, t, precision=precision)
    assert torch.equal(tri, ref)
    assert torch.equal(ref, oracle_pairs(emb, t))


@needs_triton
def test_triton_zero_rows_categories_and_block_size(interpret: None) -> None:
    emb = clustered(70, 33, seed=21)  # D not a multiple of BLOCK_K
    emb[[0, 9, 50]] = 0.0
    cats = torch.tensor([i % 3 for i in range(70)])
    for t, c in ((0.7, cats), (-0.5, None), (-0.5, cats)):
        ref = torch_pairs_above(emb, t, c)
        tri = triton_pairs_above(emb, t, c, block_size=16)
        assert torch.equal(tri, ref)
        assert torch.equal(ref, oracle_pairs(emb, t, None if c is None else c.tolist()))


@needs_triton
def test_triton_large_category_codes(interpret: None) -> None:
    # int64 codes that collide when cast to int32 (2**32 + 1 and 1): the kernel must keep them apart.
    emb = clustered(64, 16, seed=22, n_clusters=4)
    cats = torch.where(torch.arange(64) % 2 == 0, torch.tensor(2**32 + 1), torch.tensor(1))
    ref = torch_pairs_above(emb, 0.8, cats)
    assert torch.equal(ref, oracle_pairs(emb, 0.8, cats.tolist()))
    assert torch.equal(triton_pairs_above(emb, 0.8, cats), ref)
    assert bool((cats[ref[:, 0]] == cats[ref[:, 1]]).all())


@needs_triton
def test_triton_buffer_overflow_and_many_launches(interpret: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # threshold below -1: every pair qualifies (7 503 > the first buffer of 4 096), and tiny launches.
    monkeypatch.setattr(P, "_MAX_TILES_PER_LAUNCH", 3)
    emb = clustered(123, 16, seed=31)
    tri = triton_pairs_above(emb, -2.0)
    assert tri.shape[0] == 123 * 122 // 2
    assert torch.equal(tri, torch_pairs_above(emb, -2.0))
    cats = torch.arange(123) % 2
    assert torch.equal(triton_pairs_above(emb, 0.8, cats), torch_pairs_above(emb, 0.8, cats))


@needs_triton
def test_triton_cpu_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensor"):
        triton_pairs_above(torch.randn(8, 4), 0.5)


@pytest.mark.cuda
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_triton_cuda_matches_cpu_reference(precision: str) -> None:
    n = 3001
    emb = clustered(n, 96, seed=41, n_clusters=300)
    cats = torch.arange(n) % 3
    for c in (None, cats):
        ref = torch_pairs_above(emb, 0.85, c)  # CPU
        tri = triton_pairs_above(emb.cuda(), 0.85, None if c is None else c.cuda(), precision=precision)
        assert tri.is_cuda
        assert ref.shape[0] > 0
        assert torch.equal(tri.cpu(), ref)
        assert torch.equal(pairs_above(emb.cuda(), 0.85, None if c is None else c.cuda()).cpu(), ref)


# --------------------------------------------------------------------------------------------------
# leader scan
# --------------------------------------------------------------------------------------------------


def test_leader_scan_small_examples() -> None:
    chain = torch.tensor([[0, 1], [1, 2], [2, 3]])
    assert leader_scan(4, chain).tolist() == [0, 0, 2, 2]
    # 1 is absorbed by 0, so the pair (1, 3) absorbs nothing; 3 leads.
    assert leader_scan(4, torch.tensor([[0, 1], [1, 3]])).tolist() == [0, 0, 2, 3]
    # the smallest leader absorbs
    assert leader_scan(5, torch.tensor([[2, 4], [0, 4], [1, 4]])).tolist() == [0, 1, 2, 3, 0]
    assert leader_scan(3, torch.empty((0, 2), dtype=torch.int64)).tolist() == [0, 1, 2]
    assert leader_scan(0, torch.empty((0, 2), dtype=torch.int64)).tolist() == []


def test_leader_scan_eligible() -> None:
    pairs = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 3]])
    eligible = torch.tensor([False, True, True, True])
    got = leader_scan(4, pairs, eligible)
    assert got.tolist() == oracle_leaders(4, pairs, eligible.tolist()) == [0, 1, 1, 3]


@pytest.mark.parametrize("seed", range(4))
def test_leader_scan_random_graphs(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 2000
    raw = torch.randint(n, (6000, 2), generator=g)
    raw = raw[raw[:, 0] != raw[:, 1]]
    pairs = torch.stack([raw.min(dim=1).values, raw.max(dim=1).values], dim=1)
    eligible = torch.rand(n, generator=g) > 0.1
    assert leader_scan(n, pairs).tolist() == oracle_leaders(n, pairs)
    assert leader_scan(n, pairs, eligible).tolist() == oracle_leaders(n, pairs, eligible.tolist())


def test_leader_scan_long_chain_uses_sequential_finish() -> None:
    n = 20_000
    chain = torch.stack([torch.arange(n - 1), torch.arange(1, n)], dim=1)
    extra = torch.tensor([[0, 5], [7, 100], [3, 19_999]])
    pairs = torch.cat([chain, extra])
    got = leader_scan(n, pairs)
    assert got.tolist() == oracle_leaders(n, pairs)


def test_leader_scan_on_found_pairs() -> None:
    emb = clustered(400, 24, seed=13)
    cats = torch.arange(400) % 3
    eligible = torch.arange(400) % 11 != 0
    pairs = torch_pairs_above(emb, 0.8, cats)
    assert pairs.shape[0] > 50
    assert leader_scan(400, pairs, eligible).tolist() == oracle_leaders(400, pairs, eligible.tolist())


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 30),
    edges=st.lists(st.tuples(st.integers(0, 29), st.integers(0, 29)), max_size=80),
    mask=st.lists(st.booleans(), min_size=30, max_size=30),
)
def test_leader_scan_property(n: int, edges: list[tuple[int, int]], mask: list[bool]) -> None:
    es = [(min(a, b), max(a, b)) for a, b in edges if a != b and a < n and b < n]
    pairs = torch.tensor(es, dtype=torch.int64).reshape(-1, 2)
    eligible = torch.tensor(mask[:n])
    assert leader_scan(n, pairs).tolist() == oracle_leaders(n, pairs)
    assert leader_scan(n, pairs, eligible).tolist() == oracle_leaders(n, pairs, mask[:n])


@pytest.mark.parametrize(
    ("n", "pairs", "eligible", "match"),
    [
        (3, torch.tensor([[1, 1]]), None, "i < j"),
        (3, torch.tensor([[2, 1]]), None, "i < j"),
        (3, torch.tensor([[0, 3]]), None, r"rows in \[0, 3\)"),
        (3, torch.tensor([0, 1, 2]), None, r"pairs must be \[P, 2\]"),
        (3, torch.tensor([[0.0, 1.0]]), None, "integer indices"),
        (3, torch.tensor([[0, 1]]), torch.tensor([True, False]), "eligible must be"),
        (-1, torch.empty((0, 2), dtype=torch.int64), None, "n must be"),
    ],
)
def test_leader_scan_invalid(n: int, pairs: torch.Tensor, eligible, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        leader_scan(n, pairs, eligible)


@needs_triton
def test_triton_large_odd_size_matches_torch(interpret: None) -> None:
    """N = 4097 (one row past a power of two) with large tiles so the interpreter stays quick."""
    n = 4097
    emb = clustered(n, 4, seed=11, n_clusters=600)
    cats = (torch.arange(n) * 7919) % 2
    ref = torch_pairs_above(emb, 0.99, cats, block_size=256)
    tri = triton_pairs_above(emb, 0.99, cats, block_size=1024)
    assert ref.shape[0] > 1000
    assert torch.equal(tri, ref)
