"""Pairs of rows whose cosine similarity exceeds a threshold, and the leader scan of ``merge_similar``.

The pair rule (SPEC §3 ``merge_similar``, §4 consolidation): rows ``i < j`` of an embedding matrix
``E [N, D]`` form a pair when their cosine similarity is strictly greater than ``threshold`` and, when
category codes are given, ``categories[i] == categories[j]``.

The similarity *of record* is the float64 cosine of the raw rows,
``dot64(e_i, e_j) / (||e_i||64 · ||e_j||64)`` (0 when either norm is ≤ 1e-8), computed by
:func:`pair_cosine64`. Every implementation here finds candidates with a fast blocked GEMM over the
upper triangle of ``U Uᵀ`` (``U`` = unit rows in float32, bfloat16 or tf32), keeps those scoring above
``threshold - margin`` where ``margin`` bounds the GEMM's rounding error (:func:`pair_margin`), and then
re-checks every candidate with :func:`pair_cosine64`. The pair set is therefore the same for the PyTorch
and the Triton implementation, on any tile size and any precision, and it never depends on the order in
which tiles or candidates were produced. N×N is never materialised: memory beyond the unit rows is one
tile plus the candidates.

Three layers as elsewhere in ``kernels/``: the Triton kernel ``_pairs_above_kernel`` (built on first
use), its launcher ``_launch_pairs_kernel`` and the public functions :func:`torch_pairs_above`,
:func:`triton_pairs_above` and the dispatcher :func:`pairs_above`; :func:`leader_scan` turns the sparse
pairs into the leader assignment of ``merge_similar``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = [
    "PRECISIONS",
    "ZERO_NORM",
    "HAS_TRITON",
    "pair_margin",
    "resolve_precision",
    "pair_cosine64",
    "row_norms64",
    "upper_triangle_tiles",
    "torch_pairs_above",
    "triton_pairs_above",
    "pairs_above",
    "leader_scan",
]

#: GEMM precisions of the candidate pass: "fp32" (IEEE float32), "tf32" (CUDA tensor cores, 10-bit
#: mantissa inputs, float32 accumulation), "bf16" (bfloat16 inputs, float32 accumulation). The functions
#: also accept "auto" (:func:`resolve_precision`). The pair set is the same for every precision.
PRECISIONS = ("fp32", "tf32", "bf16")

#: a row whose float64 norm is at most this has similarity 0 with every row.
ZERO_NORM = 1e-8

#: True when ``triton`` can be imported (it is imported on first use only).
HAS_TRITON = importlib.util.find_spec("triton") is not None

# Filled by _load_triton() on first use, so that importing this module never imports triton.
triton: Any = None
tl: Any = None

# Rows converted to float64 at once while computing norms and unit rows ([chunk, D] float64).
_NORM_CHUNK_ROWS = 4096
# Candidate pairs re-checked at once: on CPU at most [2·chunk, D] float64 distinct rows (200 MB at
# D = 768, far less for clustered candidates); on CUDA [chunk, D] float64 twice (800 MB).
_RECHECK_CHUNK = 16384
_RECHECK_CHUNK_CUDA = 65536

# NOTE: torch path, 2-core EPYC, D = 768, float32: a [1024, 4096] tile runs the GEMM at ~200 GFLOP/s
# (32.6 ms); 512² tiles reach 195 GFLOP/s, 1024² 198 GFLOP/s, so tile shape hardly matters for the GEMM.
# The threshold test (gt into a preallocated bool tile, 0.7 ms) and nonzero (1.0-1.4 ms) cost ~5-7 %
# of the GEMM on a [1024, 4096] tile; wider column chunks amortise the per-tile Python overhead.
_TORCH_BLOCK_ROWS = 1024
_TORCH_BLOCK_COLS = 4096


# --------------------------------------------------------------------------------------------------
# validation and the similarity of record
# --------------------------------------------------------------------------------------------------


def _check_emb(emb: Any) -> torch.Tensor:
    if not isinstance(emb, torch.Tensor):
        raise ValueError(f"emb must be a torch.Tensor [N, D], got {type(emb).__name__}")
    if emb.dim() != 2:
        raise ValueError(f"emb must be 2-D [N, D], got shape {tuple(emb.shape)}")
    if not emb.dtype.is_floating_point:
        raise ValueError(f"emb must have a floating dtype, got {emb.dtype}")
    if emb.shape[1] == 0:
        raise ValueError("emb must have D >= 1 columns")
    if emb.numel() and not bool(torch.isfinite(emb).all()):
        raise ValueError("emb must hold finite values (found NaN or inf)")
    return emb


def _check_threshold(threshold: Any) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number, got {threshold!r}") from None
    if not math.isfinite(t):
        raise ValueError(f"threshold must be finite, got {t}")
    return t


def _check_categories(categories: Any, n: int, device: torch.device) -> torch.Tensor | None:
    if categories is None:
        return None
    if not isinstance(categories, torch.Tensor):
        categories = torch.as_tensor(np.asarray(categories))
    if categories.dim() != 1 or categories.shape[0] != n:
        raise ValueError(f"categories must be 1-D [N] with N = {n}, got shape {tuple(categories.shape)}")
    if categories.dtype.is_floating_point or categories.dtype.is_complex or categories.dtype == torch.bool:
        raise ValueError(f"categories must hold integer codes, got dtype {categories.dtype}")
    return categories.to(device=device, dtype=torch.int64)


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def _cpu_has_bf16_dot() -> bool:
    """Whether the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


_CPU_BF16 = _cpu_has_bf16_dot()


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The GEMM precision used for ``precision`` on ``device``.

    "auto" is "bf16" on CUDA and on CPUs with native bfloat16 dot products, "fp32" elsewhere. Any
    precision gives the same pairs (the float64 re-check decides); only the speed differs.

    NOTE: 2-core EPYC with AVX512-BF16, D = 768: a [1024, 4096] bf16 tile runs at ~820-950 GFLOP/s
    against ~200 GFLOP/s in float32; the wider bf16 margin (1.6e-2) adds ~11 % candidates at
    threshold 0.85 on clustered rows.
    """
    if precision == "auto":
        dev = torch.device(device)
        return "bf16" if dev.type == "cuda" or _CPU_BF16 else "fp32"
    return _check_precision(precision)


def _torch_margin_precision(precision: str, device: torch.device, gemm_dtype: torch.dtype) -> str:
    """The precision whose error bound covers ``torch.mm`` here, global matmul settings included.

    A float32 ``torch.mm`` may run in tf32 or bf16 when ``torch.set_float32_matmul_precision`` is "high" or
    "medium" (or ``torch.backends.cuda.matmul.allow_tf32`` is set); the margin must cover that.
    """
    if gemm_dtype != torch.float32:
        return precision
    setting = torch.get_float32_matmul_precision()
    if setting == "medium":
        return "bf16"
    wide = setting == "high" or (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)
    if wide and precision == "fp32":
        return "tf32"
    return precision


def pair_margin(dim: int, precision: str = "fp32") -> float:
    """Upper bound of ``|s_gemm - s64|`` for two unit rows of length ``dim`` (the candidate margin).

    With unit roundoff ``u`` of the GEMM inputs and ``u32 = 2^-24``, ``U`` holds ``fl(e / ||e||64)``, so
    each component carries a relative error ≤ ``u_in = u + u32`` (rounding to float32, then to the GEMM
    input format). For unit rows ``Σ|a_k b_k| ≤ 1`` (Cauchy-Schwarz), hence

    * input rounding changes the dot by at most ``2·u_in + u_in²``;
    * float32 accumulation of ``dim`` products, in any order, blocked or with FMA, adds at most
      ``γ_dim = dim·u32 / (1 - dim·u32)`` times ``Σ|a_k b_k| ≤ (1 + u_in)²`` (Higham, Thm 3.5);
    * bf16 results may be rounded to bf16 on output and, with reduced-precision split-K on CUDA, once
      more: ``2·u_bf16·(1 + u_in)²``;
    * the float64 similarity of record is within ~``dim·2^-53`` of the exact cosine: ``1e-12`` covers it.

    For ``dim = 768``: fp32 ≈ 4.6e-5, tf32 ≈ 2.0e-3, bf16 ≈ 1.6e-2. A pair whose float64 cosine exceeds
    the threshold therefore always scores above ``threshold - margin`` in the GEMM, so no true pair can
    be missed; every candidate is then re-checked in float64.

    Args:
        dim: embedding length D.
        precision: one of :data:`PRECISIONS`.

    Returns:
        the margin, a float.
    """
    _check_precision(precision)
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    u32 = 2.0**-24
    u_gemm = {"fp32": 0.0, "tf32": 2.0**-10, "bf16": 2.0**-8}[precision]  # tf32: truncation is allowed
    u_in = u32 + u_gemm
    if dim * u32 >= 0.5:
        raise ValueError(f"dim = {dim} is too long for a float32 error bound")
    gamma = dim * u32 / (1.0 - dim * u32)
    grow = (1.0 + u_in) ** 2
    out_round = 2.0 * 2.0**-8 * grow if precision == "bf16" else 0.0
    return 2.0 * u_in + u_in * u_in + gamma * grow + out_round + 1e-12


def _floor_to(x: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` that is ≤ ``x`` (so a comparison in ``dtype`` never loses a candidate)."""
    t = torch.tensor(x, dtype=torch.float64).to(dtype)
    while float(t) > x:
        t = torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype))
    return float(t)


def row_norms64(emb: torch.Tensor) -> torch.Tensor:
    """Float64 Euclidean norms of the rows, computed in row chunks.

    Args:
        emb: ``[N, D]`` floating tensor.

    Returns:
        ``[N]`` float64 norms on ``emb``'s device.
    """
    out = torch.empty(emb.shape[0], dtype=torch.float64, device=emb.device)
    for r0 in range(0, emb.shape[0], _NORM_CHUNK_ROWS):
        e = emb[r0 : r0 + _NORM_CHUNK_ROWS].to(torch.float64)
        out[r0 : r0 + e.shape[0]] = (e * e).sum(dim=1).sqrt_()
    return out


def _unit_rows(
    emb: torch.Tensor, norms64: torch.Tensor, dtype: torch.dtype, perm: torch.Tensor | None = None
) -> torch.Tensor:
    """``fl(e / ||e||64)`` in ``dtype`` (zero rows stay zero), rows in ``perm`` order, ``[N, D]`` contiguous."""
    n = emb.shape[0]
    out = torch.empty((n, emb.shape[1]), dtype=dtype, device=emb.device)
    for r0 in range(0, n, _NORM_CHUNK_ROWS):
        rows = slice(r0, r0 + _NORM_CHUNK_ROWS) if perm is None else perm[r0 : r0 + _NORM_CHUNK_ROWS]
        e = emb[rows].to(torch.float64)
        nr = norms64[rows]
        inv = torch.where(nr > ZERO_NORM, 1.0 / nr.clamp(min=ZERO_NORM), torch.zeros_like(nr))
        out[r0 : r0 + e.shape[0]] = (e * inv[:, None]).to(torch.float32).to(dtype)
    return out


def _dot64_gathered(emb: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Float64 dots of row pairs: gather both rows of every pair, multiply, sum each row."""
    a = emb.index_select(0, i).to(torch.float64)  # [c, D]
    b = emb.index_select(0, j).to(torch.float64)  # [c, D]
    return a.mul_(b).sum(dim=1)


def _dot64_sampled(emb: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Float64 dots of row pairs through ``torch.sparse.sampled_addmm`` on the distinct rows only (CPU).

    Each distinct row is converted once; the CPU kernel then computes every sampled entry as one
    vectorised dot of two contiguous float64 rows, so a pair's value depends on its two rows only.
    """
    ui, ri = torch.unique(i, return_inverse=True)
    uj, rj = torch.unique(j, return_inverse=True)
    order = torch.argsort(ri * uj.numel() + rj)  # CSR order: by compact row, then column
    a = emb.index_select(0, ui).to(torch.float64)  # [rows, D]
    b = emb.index_select(0, uj).to(torch.float64)  # [cols, D]
    crow = torch.zeros(ui.numel() + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(ri, minlength=ui.numel()), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta state"
        mask = torch.sparse_csr_tensor(
            crow,
            rj[order],
            torch.zeros(i.numel(), dtype=torch.float64),
            size=(ui.numel(), uj.numel()),
            check_invariants=False,
        )
        vals = torch.sparse.sampled_addmm(mask, a, b.T, beta=0.0).values()
    out = torch.empty_like(vals)
    out[order] = vals
    return out


def pair_cosine64(
    emb: torch.Tensor, i: torch.Tensor, j: torch.Tensor, norms64: torch.Tensor | None = None
) -> torch.Tensor:
    """The similarity of record of row pairs: the float64 cosine of the raw rows.

    ``dot64(e_i, e_j) / (||e_i||64 · ||e_j||64)``, and 0 where either norm is ≤ :data:`ZERO_NORM`.
    The value of one pair depends on its two rows only, never on the other pairs asked for at the same
    time or on how they are chunked; so every implementation on one device decides every pair alike.
    (Devices may differ in the last bits of the float64 dot, ~``D·2^-53``.)

    Args:
        emb: ``[N, D]`` embeddings (any float dtype).
        i: ``[P]`` int64 row indices.
        j: ``[P]`` int64 row indices.
        norms64: ``[N]`` float64 row norms (from :func:`row_norms64`), computed when omitted.

    Returns:
        ``[P]`` float64 similarities on ``emb``'s device.
    """
    if norms64 is None:
        norms64 = row_norms64(emb)
    out = torch.empty(i.shape[0], dtype=torch.float64, device=emb.device)
    on_cpu = emb.device.type == "cpu"
    chunk = _RECHECK_CHUNK if on_cpu else _RECHECK_CHUNK_CUDA
    for p0 in range(0, i.shape[0], chunk):
        ii = i[p0 : p0 + chunk]
        jj = j[p0 : p0 + chunk]
        # NOTE: CPU, 126 k candidate pairs of clustered rows, D = 768: gather + multiply + row sum
        # 3.98 s, sampled_addmm over the distinct rows 1.51 s (same loaded machine, same values to
        # ~5e-15). bmm on [c, 1, D] x [c, D, 1] was also faster than the gather, but it rounds a batch of
        # one pair differently from larger batches, so a pair's value would depend on its chunk.
        dot = _dot64_sampled(emb, ii, jj) if on_cpu else _dot64_gathered(emb, ii, jj)
        ni = norms64[ii]
        nj = norms64[jj]
        ok = (ni > ZERO_NORM) & (nj > ZERO_NORM)
        out[p0 : p0 + ii.shape[0]] = torch.where(ok, dot / (ni * nj), torch.zeros_like(dot))
    return out


# --------------------------------------------------------------------------------------------------
# shared pieces of both implementations
# --------------------------------------------------------------------------------------------------


class _Prepared:
    """Unit rows (sorted by category when categories are given) and what the re-check needs."""

    def __init__(self, emb: torch.Tensor, categories: torch.Tensor | None, gemm_dtype: torch.dtype) -> None:
        self.emb = emb
        self.n = emb.shape[0]
        self.norms64 = row_norms64(emb)  # [N]
        if categories is not None:
            # A stable sort keeps ascending original order inside each category, so a pair r < c in
            # sorted order is the pair perm[r] < perm[c] in original order (pairs never cross categories).
            sorted_cats, perm = torch.sort(categories, stable=True)
            self.perm: torch.Tensor | None = perm  # [N] sorted position -> original row
            # Dense codes 0..G-1 (sorted), so any int64 codes fit the kernel's int32 category column.
            self.cats: torch.Tensor | None = torch.unique_consecutive(sorted_cats, return_inverse=True)[1]
        else:
            self.perm = None
            self.cats = None
        self.unit = _unit_rows(emb, self.norms64, gemm_dtype, self.perm)  # [N, D]

    def col_end(self, r0: int, r1: int) -> int:
        """One past the last sorted row that can pair with rows ``[r0, r1)`` (same category)."""
        if self.cats is None:
            return self.n
        last = self.cats[r1 - 1 : r1]
        return int(torch.searchsorted(self.cats, last, right=True).item())

    def recheck(self, r: torch.Tensor, c: torch.Tensor, threshold: float) -> torch.Tensor:
        """Map sorted-space candidates ``(r, c)`` to original rows and keep the true pairs, ``[K, 2]``."""
        if self.perm is not None:
            r = self.perm[r]
            c = self.perm[c]
        if r.numel() == 0:
            return torch.empty((0, 2), dtype=torch.int64, device=self.emb.device)
        sim = pair_cosine64(self.emb, r, c, self.norms64)
        keep = sim > threshold
        return torch.stack([r[keep], c[keep]], dim=1)


def _sort_pairs(parts: list[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    parts = [p for p in parts if p.shape[0]]
    if not parts:
        return torch.empty((0, 2), dtype=torch.int64, device=device)
    pairs = torch.cat(parts, dim=0)
    if pairs.shape[0] > 1:
        order = torch.argsort(pairs[:, 0] * n + pairs[:, 1])
        pairs = pairs[order]
    return pairs.contiguous()


def upper_triangle_tiles(
    n: int, block_rows: int, block_cols: int, col_end: Any = None
) -> Iterator[tuple[int, int, int, int]]:
    """The tiles ``(r0, r1, c0, c1)`` of the upper triangle (diagonal included) that the torch path visits.

    Row blocks of ``block_rows`` rows; for each, columns from ``r0`` to ``col_end(r0, r1)`` (default ``n``)
    in chunks of ``block_cols``. The benchmark runs a bare GEMM over exactly these tiles.

    Args:
        n: number of rows N.
        block_rows: rows per tile.
        block_cols: columns per tile.
        col_end: optional callable ``(r0, r1) -> int``, one past the last column that row block needs.

    Yields:
        ``(r0, r1, c0, c1)`` half-open row and column ranges.
    """
    for r0 in range(0, n, block_rows):
        r1 = min(r0 + block_rows, n)
        end = n if col_end is None else col_end(r0, r1)
        for c0 in range(r0, end, block_cols):
            yield r0, r1, c0, min(c0 + block_cols, end)


# --------------------------------------------------------------------------------------------------
# PyTorch implementation
# --------------------------------------------------------------------------------------------------


def torch_pairs_above(
    emb: torch.Tensor,
    threshold: float,
    categories: torch.Tensor | None = None,
    *,
    block_size: int | None = None,
    margin: float | None = None,
    precision: str = "auto",
) -> torch.Tensor:
    """All pairs ``(i, j)``, ``i < j``, whose float64 cosine exceeds ``threshold`` (same category when given).

    Blocked GEMM over the upper triangle of the unit rows (tiles of ``block_size`` rows ×
    ``4·block_size`` columns; with categories, rows are sorted by category and only tiles that can hold
    same-category pairs are computed), a fused ``score > threshold - margin`` test on each tile, then the
    exact float64 re-check (:func:`pair_cosine64`) of every candidate. Works on any device.

    Args:
        emb: ``[N, D]`` embeddings, any float dtype, not necessarily normalised.
        threshold: similarity threshold (strict ``>``).
        categories: optional ``[N]`` integer category codes; pairs must have equal codes.
        block_size: rows per tile (default 1024).
        margin: candidate margin; default :func:`pair_margin` ``(D, precision)``. A smaller value than the
            default may miss pairs; a larger one only costs re-check time.
        precision: GEMM precision of the candidate pass: "auto" (default, :func:`resolve_precision`) or
            one of :data:`PRECISIONS`. Here "tf32" computes in float32 with the tf32 margin, and "bf16"
            computes in bfloat16 on CPU and in float32 on CUDA (where cuBLAS may reduce split-K partial
            sums in bfloat16, which the bf16 margin does not cover).

    Returns:
        ``[P, 2]`` int64 pairs, sorted by ``i`` then ``j``, on ``emb``'s device.

    Example:
        >>> e = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]])
        >>> torch_pairs_above(e, 0.9).tolist()
        [[0, 1]]
    """
    emb = _check_emb(emb)
    thr = _check_threshold(threshold)
    precision = resolve_precision(precision, emb.device)
    n, d = emb.shape
    cats = _check_categories(categories, n, emb.device)
    block_rows = _TORCH_BLOCK_ROWS if block_size is None else int(block_size)
    if block_rows < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    block_cols = block_rows * (_TORCH_BLOCK_COLS // _TORCH_BLOCK_ROWS)
    gemm_dtype = torch.bfloat16 if precision == "bf16" and emb.device.type == "cpu" else torch.float32
    m_prec = _torch_margin_precision(precision, emb.device, gemm_dtype)
    m = pair_margin(d, m_prec) if margin is None else float(margin)
    if not (math.isfinite(m) and m >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    if n < 2:
        return torch.empty((0, 2), dtype=torch.int64, device=emb.device)

    prep = _Prepared(emb, cats, gemm_dtype)
    thr_lo = _floor_to(thr - m, gemm_dtype)
    u = prep.unit  # [N, D]

    # Flat buffers viewed as contiguous [rows, cols] tiles: allocated once, reused by every tile.
    score = torch.empty(block_rows * block_cols, dtype=gemm_dtype, device=emb.device)
    hit = torch.empty(block_rows * block_cols, dtype=torch.bool, device=emb.device)
    parts: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []  # candidate (r, c) rows awaiting the re-check, batched
    n_pending = 0
    for r0, r1, c0, c1 in upper_triangle_tiles(n, block_rows, block_cols, prep.col_end):
        s = score[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
        h = hit[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
        torch.mm(u[r0:r1], u[c0:c1].T, out=s)  # [rows, cols]
        torch.gt(s, thr_lo, out=h)
        idx = h.nonzero()  # [K, 2] local (row, col)
        if idx.shape[0] == 0:
            continue
        idx[:, 0] += r0
        idx[:, 1] += c0
        keep = idx[:, 0] < idx[:, 1]
        if prep.cats is not None:
            keep &= prep.cats[idx[:, 0]] == prep.cats[idx[:, 1]]
        if not bool(keep.all()):
            idx = idx[keep]
        pending.append(idx)
        n_pending += idx.shape[0]
        if n_pending >= _RECHECK_CHUNK:
            parts.append(_recheck_pending(prep, pending, thr))
            pending, n_pending = [], 0
    if pending:
        parts.append(_recheck_pending(prep, pending, thr))
    return _sort_pairs(parts, n, emb.device)


def _recheck_pending(prep: _Prepared, pending: list[torch.Tensor], thr: float) -> torch.Tensor:
    cand = torch.cat(pending) if len(pending) > 1 else pending[0]  # [K, 2] sorted-space
    return prep.recheck(cand[:, 0], cand[:, 1], thr)


# --------------------------------------------------------------------------------------------------
# Triton implementation
# --------------------------------------------------------------------------------------------------

_KERNELS: dict[bool, Any] = {}


def _load_triton() -> None:
    global triton, tl
    if triton is None:
        import triton as _triton
        import triton.language as _tl

        triton, tl = _triton, _tl


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _get_kernel() -> Any:
    """The jitted kernel, decorated on first use (``TRITON_INTERPRET`` is read when decorating)."""
    interp = _interpret_mode()
    if interp in _KERNELS:
        return _KERNELS[interp]
    _load_triton()

    @triton.jit
    def _pairs_above_kernel(
        u_ptr,
        cat_ptr,
        tile_i_ptr,
        tile_j_ptr,
        out_ptr,
        count_ptr,
        n_rows,
        dim,
        stride_row,
        thr_lo,
        capacity,
        HAS_CAT: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # One program = one tile (bi, bj), bj >= bi, of the upper triangle of U Uᵀ.
        pid = tl.program_id(0)
        bi = tl.load(tile_i_ptr + pid)
        bj = tl.load(tile_j_ptr + pid)
        rows = bi * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        cols = bj * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        rmask = rows < n_rows
        cmask = cols < n_rows
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            kk = k0 + offs_k
            kmask = kk < dim
            a = tl.load(
                u_ptr + rows[:, None] * stride_row + kk[None, :],
                mask=rmask[:, None] & kmask[None, :],
                other=0.0,
            )  # [BM, BK]
            b = tl.load(
                u_ptr + cols[:, None] * stride_row + kk[None, :],
                mask=cmask[:, None] & kmask[None, :],
                other=0.0,
            )  # [BN, BK]
            acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)
        # Fused tests: score, strict upper triangle (which also bounds the rows), same category.
        keep = (acc > thr_lo) & (rows[:, None] < cols[None, :]) & cmask[None, :]
        if HAS_CAT:
            ci = tl.load(cat_ptr + rows, mask=rmask, other=-1)
            cj = tl.load(cat_ptr + cols, mask=cmask, other=-1)
            keep = keep & (ci[:, None] == cj[None, :])
        keep_i = keep.to(tl.int32)
        row_cnt = tl.sum(keep_i, axis=1)  # [BM]
        total = tl.sum(row_cnt, axis=0)
        if total > 0:
            # One atomic per tile reserves a contiguous slice; positions inside it by prefix sums.
            base = tl.atomic_add(count_ptr, total)
            row_off = tl.cumsum(row_cnt, axis=0) - row_cnt  # [BM]
            pos = base + row_off[:, None] + tl.cumsum(keep_i, axis=1) - keep_i  # [BM, BN]
            ok = keep & (pos < capacity)
            r2 = tl.broadcast_to(rows[:, None], (BLOCK_M, BLOCK_N))
            c2 = tl.broadcast_to(cols[None, :], (BLOCK_M, BLOCK_N))
            tl.store(out_ptr + pos * 2, r2, mask=ok)
            tl.store(out_ptr + pos * 2 + 1, c2, mask=ok)

    _KERNELS[interp] = _pairs_above_kernel
    return _pairs_above_kernel


# NOTE: 128×128 tiles with BLOCK_K = 64, 8 warps, 3 stages is the usual float32/tf32 GEMM shape on
# sm80/sm90; under TRITON_INTERPRET=1 each program costs the same Python overhead whatever its size,
# so the interpreter uses 32×32 tiles to keep tests on small inputs quick.
_CUDA_BLOCK = 128
_CUDA_BLOCK_K = 32
_INTERP_BLOCK = 32
_INTERP_BLOCK_K = 32
# Tiles per launch: bounds the tile-list memory (8 bytes per tile) and the retry cost of an overflow.
_MAX_TILES_PER_LAUNCH = 1 << 20


def _tile_lists(
    prep: _Prepared, block: int, b0: int, b1: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``(tile_i, tile_j)`` for row blocks ``[b0, b1)``: column blocks ``bi .. end(bi)``."""
    n = prep.n
    nb = (n + block - 1) // block
    bi = torch.arange(b0, b1, device=device, dtype=torch.int64)
    if prep.cats is None:
        end = torch.full_like(bi, nb)
    else:
        last_row = torch.clamp((bi + 1) * block, max=n) - 1
        col_end = torch.searchsorted(prep.cats, prep.cats[last_row], right=True)
        end = (col_end + block - 1) // block
    counts = end - bi  # [b] >= 1
    tile_i = torch.repeat_interleave(bi, counts)
    starts = torch.cumsum(counts, 0) - counts
    tile_j = torch.arange(tile_i.shape[0], device=device) - torch.repeat_interleave(starts, counts) + tile_i
    return tile_i.to(torch.int32), tile_j.to(torch.int32)


def _row_block_groups(prep: _Prepared, block: int) -> list[tuple[int, int, int]]:
    """Split row blocks into launches of at most ``_MAX_TILES_PER_LAUNCH`` tiles: ``(b0, b1, tiles)``."""
    n = prep.n
    nb = (n + block - 1) // block
    bi = torch.arange(nb, dtype=torch.int64)
    if prep.cats is None:
        counts = (nb - bi).tolist()
    else:
        cats = prep.cats.cpu()
        last_row = torch.clamp((bi + 1) * block, max=n) - 1
        end = (torch.searchsorted(cats, cats[last_row], right=True) + block - 1) // block
        counts = (end - bi).tolist()
    groups: list[tuple[int, int, int]] = []
    b0, acc = 0, 0
    for b, c in enumerate(counts):
        if acc and acc + c > _MAX_TILES_PER_LAUNCH:
            groups.append((b0, b, acc))
            b0, acc = b, 0
        acc += c
    if acc:
        groups.append((b0, nb, acc))
    return groups


def _launch_pairs_kernel(
    prep: _Prepared,
    thr_lo: float,
    precision: str,
    block: int,
    block_k: int,
    capacity: int,
    b0: int,
    b1: int,
) -> tuple[torch.Tensor, int]:
    """Run the kernel over row blocks ``[b0, b1)``; returns (candidates ``[K, 2]`` int64 sorted-space, capacity)."""
    kernel = _get_kernel()
    u = prep.unit
    device = u.device
    tile_i, tile_j = _tile_lists(prep, block, b0, b1, device)
    cats = prep.cats.to(torch.int32) if prep.cats is not None else tile_i  # placeholder when unused
    input_precision = {"fp32": "ieee", "tf32": "tf32", "bf16": "ieee"}[precision]
    extra = {} if _interpret_mode() else {"num_warps": 8, "num_stages": 3}
    while True:
        out = torch.empty((capacity, 2), dtype=torch.int32, device=device)
        count = torch.zeros(1, dtype=torch.int32, device=device)
        kernel[(tile_i.shape[0],)](
            u,
            cats,
            tile_i,
            tile_j,
            out,
            count,
            prep.n,
            u.shape[1],
            u.stride(0),
            thr_lo,
            capacity,
            HAS_CAT=prep.cats is not None,
            INPUT_PRECISION=input_precision,
            BLOCK_M=block,
            BLOCK_N=block,
            BLOCK_K=block_k,
            **extra,
        )
        k = int(count.item())
        if k <= capacity:
            return out[:k].to(torch.int64), capacity
        # Overflow: the counter holds the exact number of candidates, so one retry always suffices.
        capacity = k + k // 8


def triton_pairs_above(
    emb: torch.Tensor,
    threshold: float,
    categories: torch.Tensor | None = None,
    *,
    block_size: int | None = None,
    margin: float | None = None,
    precision: str = "auto",
) -> torch.Tensor:
    """Triton version of :func:`torch_pairs_above`: same arguments, exactly the same output.

    A Triton kernel computes tiles of the upper triangle of ``U Uᵀ`` with the threshold, triangle and
    category tests fused, and appends candidates to a buffer through one atomic counter per tile (an
    overflow re-runs the launch with the exact size); the candidates are then re-checked in float64.
    Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before first use.

    Args:
        emb: ``[N, D]`` embeddings, any float dtype, not necessarily normalised.
        threshold: similarity threshold (strict ``>``).
        categories: optional ``[N]`` integer category codes; pairs must have equal codes.
        block_size: square tile size (a power of two ≥ 16; default 128 on CUDA, 32 interpreted).
        margin: candidate margin; default :func:`pair_margin` ``(D, precision)``.
        precision: "auto" (default: "bf16" on CUDA, :func:`resolve_precision`), "fp32" (IEEE float32
            dot), "tf32" or "bf16" (tensor cores, wider margin). The kernel sets it explicitly, so global
            matmul settings do not matter here.

    Returns:
        ``[P, 2]`` int64 pairs, sorted by ``i`` then ``j``, on ``emb``'s device.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton_pairs_above needs the triton package (pip install rbank-torch[gpu])")
    emb = _check_emb(emb)
    thr = _check_threshold(threshold)
    precision = resolve_precision(precision, emb.device)
    n, d = emb.shape
    cats = _check_categories(categories, n, emb.device)
    interp = _interpret_mode()
    if emb.device.type != "cuda" and not interp:
        raise ValueError(
            f"emb is on {emb.device}; triton_pairs_above needs a CUDA tensor, or TRITON_INTERPRET=1 "
            "set before the first call to run on CPU"
        )
    block = (_INTERP_BLOCK if interp else _CUDA_BLOCK) if block_size is None else int(block_size)
    if block < 16 or block & (block - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    block_k = _INTERP_BLOCK_K if interp else _CUDA_BLOCK_K
    m = pair_margin(d, precision) if margin is None else float(margin)
    if not (math.isfinite(m) and m >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    if n < 2:
        return torch.empty((0, 2), dtype=torch.int64, device=emb.device)
    if n >= 2**31 - block:
        raise ValueError(f"emb has {n} rows; the kernel indexes rows with int32")

    gemm_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    prep = _Prepared(emb, cats, gemm_dtype)
    # The kernel compares float32 scores with a float32 scalar: round the bound down, never up.
    thr_lo = _floor_to(thr - m, torch.float32)
    parts: list[torch.Tensor] = []
    capacity = max(4096, 4 * n)
    for b0, b1, n_tiles in _row_block_groups(prep, block):
        cand, capacity = _launch_pairs_kernel(prep, thr_lo, precision, block, block_k, capacity, b0, b1)
        if cand.shape[0]:
            found = prep.recheck(cand[:, 0], cand[:, 1], thr)
            if found.shape[0]:
                parts.append(found)
        # Size the next launch's buffer from this one's candidate density.
        capacity = max(capacity, int(1.25 * cand.shape[0] / max(n_tiles, 1) * _MAX_TILES_PER_LAUNCH) + 1024)
    return _sort_pairs(parts, n, emb.device)


def pairs_above(
    emb: torch.Tensor,
    threshold: float,
    categories: torch.Tensor | None = None,
    *,
    block_size: int | None = None,
    margin: float | None = None,
    precision: str = "auto",
) -> torch.Tensor:
    """Dispatcher: :func:`triton_pairs_above` for CUDA tensors when triton is installed, else
    :func:`torch_pairs_above`. Same arguments and output (``[P, 2]`` int64 pairs ``i < j``, sorted)."""
    if isinstance(emb, torch.Tensor) and emb.device.type == "cuda" and HAS_TRITON:
        fn = triton_pairs_above
    else:
        fn = torch_pairs_above
    return fn(emb, threshold, categories, block_size=block_size, margin=margin, precision=precision)


# --------------------------------------------------------------------------------------------------
# leader scan
# --------------------------------------------------------------------------------------------------

_UNDECIDED, _LEADER, _ABSORBED = 0, 1, 2
# Switch to the sequential finish when a round decides fewer than this share of the undecided rows.
_MIN_ROUND_PROGRESS = 0.02


def _check_pairs(n: int, pairs: Any) -> torch.Tensor:
    if not isinstance(pairs, torch.Tensor):
        pairs = torch.as_tensor(np.asarray(pairs, dtype=np.int64).reshape(-1, 2))
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be [P, 2], got shape {tuple(pairs.shape)}")
    if pairs.dtype.is_floating_point or pairs.dtype == torch.bool:
        raise ValueError(f"pairs must hold integer indices, got dtype {pairs.dtype}")
    pairs = pairs.to(torch.int64)
    if pairs.numel():
        i, j = pairs[:, 0], pairs[:, 1]
        if bool((i < 0).any()) or bool((j >= n).any()):
            raise ValueError(f"pairs must index rows in [0, {n})")
        if bool((i >= j).any()):
            raise ValueError("pairs must satisfy i < j in every row")
    return pairs


def leader_scan(n: int, pairs: torch.Tensor, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Leader assignment of ``merge_similar`` (SPEC §3) from a sparse list of similar pairs.

    Sequential definition: scan rows in ascending index; a row not yet absorbed becomes a leader and
    absorbs every later, not yet absorbed row it has a pair with. Rows with ``eligible[i] == False`` take
    no part (pairs touching them are ignored).

    Computed in rounds over the whole pair list: a row whose earlier neighbours are all absorbed is a
    leader; a row with a leader among its earlier neighbours is absorbed. Decisions are final and match
    the sequential scan; resolved rows and their pairs drop out each round. Clustered data needs a few
    rounds; when a round makes little progress (long chains), the remaining rows are finished by the
    sequential scan over what is left. Each absorbed row's leader is its smallest leader neighbour.

    Args:
        n: number of rows.
        pairs: ``[P, 2]`` integer pairs with ``0 <= i < j < n`` (any order, duplicates allowed).
        eligible: optional ``[n]`` bool; ineligible rows are neither leaders nor absorbed.

    Returns:
        ``[n]`` int64 ``leader``: ``leader[i] == i`` for leaders and unabsorbed rows, else the index of
        the leader that absorbed row ``i`` (always ``< i``). On the pairs' device.

    Example:
        >>> leader_scan(4, torch.tensor([[0, 1], [1, 2], [2, 3]])).tolist()
        [0, 0, 2, 2]
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pairs = _check_pairs(n, pairs)
    device = pairs.device
    if eligible is not None:
        if not isinstance(eligible, torch.Tensor):
            eligible = torch.as_tensor(np.asarray(eligible))
        if eligible.shape != (n,) or eligible.dtype != torch.bool:
            raise ValueError(
                f"eligible must be a bool tensor [n] = [{n}], got {eligible.dtype} {tuple(eligible.shape)}"
            )
        eligible = eligible.to(device)
        if pairs.numel():
            pairs = pairs[eligible[pairs[:, 0]] & eligible[pairs[:, 1]]]
    leader = torch.arange(n, dtype=torch.int64, device=device)
    if pairs.shape[0] == 0:
        return leader

    state = torch.zeros(n, dtype=torch.int8, device=device)
    i, j = pairs[:, 0], pairs[:, 1]
    involved = torch.zeros(n, dtype=torch.bool, device=device)
    involved[i] = True
    involved[j] = True
    undecided = int(involved.sum())
    blocked = torch.zeros(n, dtype=torch.bool, device=device)
    while i.shape[0]:
        # Every remaining pair joins two undecided rows; a row with no undecided earlier neighbour leads.
        blocked.zero_()
        blocked[j] = True
        new_leader = involved & (state == _UNDECIDED) & ~blocked
        state[new_leader] = _LEADER
        state[j[state[i] == _LEADER]] = _ABSORBED
        live = (state[i] == _UNDECIDED) & (state[j] == _UNDECIDED)
        i, j = i[live], j[live]
        left = int((involved & (state == _UNDECIDED)).sum())
        progress = undecided - left
        undecided = left
        if i.shape[0] and progress < _MIN_ROUND_PROGRESS * undecided:
            _sequential_finish(state, i, j)
            break
    # Rows still undecided have no undecided or leader earlier neighbour left: they lead.
    state[involved & (state == _UNDECIDED)] = _LEADER
    a, b = pairs[:, 0], pairs[:, 1]
    hit = state[a] == _LEADER
    leader.scatter_reduce_(0, b[hit], a[hit], reduce="amin", include_self=True)
    return leader


def _sequential_finish(state: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> None:
    """The sequential scan over the remaining pairs (all between undecided rows), in place on ``state``."""
    order = torch.argsort(i * (int(j.max()) + 1) + j)
    ii = i[order].cpu().numpy()
    jj = j[order].cpu().numpy()
    st = state.cpu().numpy().copy()
    starts = np.flatnonzero(np.r_[True, ii[1:] != ii[:-1]])
    ends = np.r_[starts[1:], ii.shape[0]]
    rows = ii[starts].tolist()
    jl = jj.tolist()
    for r, s, e in zip(rows, starts.tolist(), ends.tolist()):
        if st[r] == _ABSORBED:
            continue
        st[r] = _LEADER
        for c in jl[s:e]:
            if st[c] == _UNDECIDED:
                st[c] = _ABSORBED
    state.copy_(torch.from_numpy(st))
