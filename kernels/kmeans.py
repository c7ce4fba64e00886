"""k-means with k-means++ seeding and Lloyd iterations, on the input's device.

Distances are blocked GEMMs, ``||x||² − 2·x·c + ||c||²``; the argmin only needs ``||c||² − 2·x·c``, one
``addmm`` per row block. Everything is seeded by a ``torch.Generator`` on the input's device, so a seed
gives the same result on a given device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["KMeansResult", "kmeans", "kmeans_plusplus"]


@dataclass
class KMeansResult:
    """Result of :func:`kmeans`.

    Attributes:
        centroids: ``[k, D]`` cluster centres (unit rows when ``spherical``).
        assignments: ``[N]`` int64 cluster of each row, the nearest centroid of ``centroids``.
        sizes: ``[k]`` int64 number of rows per cluster.
        inertia: sum of squared distances of the rows to their centroid (of the unit rows when spherical).
        iterations: Lloyd updates performed.
    """

    centroids: torch.Tensor
    assignments: torch.Tensor
    sizes: torch.Tensor
    inertia: float
    iterations: int


def _check_inputs(x: Any, k: Any, iters: Any, tol: Any, batch_size: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor [N, D], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [N, D], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must have a floating dtype, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must have at least one row and one column, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must hold finite values (found NaN or inf)")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {k!r}")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be within [1, N] = [1, {x.shape[0]}], got {k}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return x


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    n = x.norm(dim=1, keepdim=True)
    return torch.where(n > 0, x / n.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def _assign(
    x: torch.Tensor, xx: torch.Tensor, c: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row: ``(assignments [N] int64, squared distances [N])``."""
    n = x.shape[0]
    cc = (c * c).sum(dim=1)  # [k]
    ct = c.T.contiguous()  # [D, k]
    assign = torch.empty(n, dtype=torch.int64, device=x.device)
    mind = torch.empty(n, dtype=x.dtype, device=x.device)
    for r0 in range(0, n, batch_size):
        r1 = min(r0 + batch_size, n)
        part = torch.addmm(cc, x[r0:r1], ct, alpha=-2.0)  # [b, k] = ||c||² − 2 x·c
        val, idx = part.min(dim=1)
        assign[r0:r1] = idx
        mind[r0:r1] = val
    mind.add_(xx).clamp_(min=0.0)
    return assign, mind


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): indices of ``k`` rows of ``x``.

    The first row is drawn uniformly; each next one with probability proportional to its squared distance
    to the nearest row chosen so far (uniformly when all remaining distances are 0).

    Args:
        x: ``[N, D]`` data (float32 or float64).
        k: number of seeds, ``1 <= k <= N``.
        generator: a ``torch.Generator`` on ``x``'s device.

    Returns:
        ``[k]`` int64 row indices, in the order they were chosen.
    """
    n = x.shape[0]
    dev = x.device
    xx = (x * x).sum(dim=1)  # [N]
    idx = torch.empty(k, dtype=torch.int64, device=dev)
    first = torch.randint(n, (1,), generator=generator, device=dev)
    idx[0] = first[0]
    c = x[first[0]]
    d2 = torch.addmv(xx, x, c, alpha=-2.0).add_((c * c).sum()).clamp_(min=0.0)  # [N]
    d2[first[0]] = 0.0
    dc = torch.empty_like(d2)
    for t in range(1, k):
        if bool(d2.sum() > 0):
            nxt = torch.multinomial(d2, 1, generator=generator)
        else:
            nxt = torch.randint(n, (1,), generator=generator, device=dev)
        p = nxt[0]
        idx[t] = p
        c = x[p]
        torch.addmv(xx, x, c, alpha=-2.0, out=dc).add_((c * c).sum()).clamp_(min=0.0)
        torch.minimum(d2, dc, out=d2)
        d2[p] = 0.0
    return idx


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 50,
    seed: int = 0,
    tol: float = 1e-4,
    spherical: bool = False,
    batch_size: int = 16384,
) -> KMeansResult:
    """k-means on the rows of ``x``: k-means++ seeding, then Lloyd iterations.

    Each iteration moves every centroid to the mean of its rows and re-assigns the rows. It stops after
    ``iters`` updates, when the assignments no longer change, or when the squared centroid shift
    ``Σ||c_new − c||²`` is at most ``tol · mean per-feature variance of x`` (the scikit-learn criterion).
    An empty cluster is re-seeded with the row farthest from its centroid (ties: lowest index), the
    next empty one with the next farthest row, deterministically. With ``spherical=True`` the rows and
    the centroids are unit-normalised (cosine k-means; zero rows stay zero).

    Args:
        x: ``[N, D]`` data, any float dtype (computed in float32, or float64 for float64 input).
        k: number of clusters, ``1 <= k <= N``.
        iters: maximum number of Lloyd updates (0 returns the k-means++ seeds).
        seed: seed of the ``torch.Generator`` used for seeding.
        tol: relative tolerance on the centroid shift (0 runs until the assignments are stable).
        spherical: cosine k-means on unit rows.
        batch_size: rows per distance block (memory ``batch_size × k``).

    Returns:
        :class:`KMeansResult` on ``x``'s device.

    Raises:
        ValueError: for a non-2-D, non-float, empty or non-finite ``x``, ``k`` outside [1, N], or bad options.

    Example:
        >>> x = torch.cat([torch.zeros(5, 2), torch.full((5, 2), 10.0)])
        >>> kmeans(x, 2).sizes.tolist()
        [5, 5]
    """
    x = _check_inputs(x, k, iters, tol, batch_size)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    X = x.to(dtype)  # [N, D]
    if spherical:
        X = _normalize_rows(X)
        shift0 = None
    else:
        # Centring keeps ||x||² small, so ||x||² − 2x·c + ||c||² loses fewer digits to cancellation.
        shift0 = X.mean(dim=0)  # [D]
        X = X - shift0
    X = X.contiguous()
    n = X.shape[0]
    dev = X.device
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(seed))

    xx = (X * X).sum(dim=1)  # [N]
    C = X[kmeans_plusplus(X, k, gen)].clone()  # [k, D]
    # Mean per-feature variance, E||x||²/D − ||E x||²/D, from the row norms already at hand.
    mean = X.mean(dim=0, dtype=torch.float64)
    var = max(float(xx.sum(dtype=torch.float64)) / n - float((mean * mean).sum()), 0.0) / X.shape[1]
    tol_abs = float(tol) * var
    assign, mind = _assign(X, xx, C, batch_size)
    it = 0
    while it < iters:
        sizes = torch.bincount(assign, minlength=k)  # [k]
        sums = torch.zeros_like(C).index_add_(0, assign, X)  # [k, D]
        C_new = sums / sizes.clamp(min=1).to(dtype)[:, None]
        empty = torch.nonzero(sizes == 0).flatten()
        if empty.numel():
            # Farthest rows first (stable sort, so ties go to the lowest index).
            far = torch.sort(mind, descending=True, stable=True).indices[: empty.numel()]
            C_new[empty] = X[far]
        if spherical:
            C_new = _normalize_rows(C_new)
        shift = float(((C_new - C) ** 2).sum())
        C = C_new
        it += 1
        new_assign, mind = _assign(X, xx, C, batch_size)
        stable = torch.equal(new_assign, assign)
        assign = new_assign
        if stable or shift <= tol_abs:
            break

    sizes = torch.bincount(assign, minlength=k)
    # The reported inertia is summed from the differences themselves, not from the GEMM expansion.
    inertia = 0.0
    for r0 in range(0, n, batch_size):
        diff = X[r0 : r0 + batch_size] - C[assign[r0 : r0 + batch_size]]
        inertia += float((diff * diff).sum(dtype=torch.float64))
    if shift0 is not None:
        C = C + shift0
    return KMeansResult(centroids=C, assignments=assign, sizes=sizes, inertia=inertia, iterations=it)
