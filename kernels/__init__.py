"""Fast kernels of rbank_torch, each beside its pure-PyTorch reference.

* :mod:`rbank_torch.kernels.pairs`: similar pairs over the upper triangle of ``E Eᵀ`` (PyTorch and Triton)
  and the leader scan of ``merge_similar``.
* :mod:`rbank_torch.kernels.kmeans`: k-means++ and Lloyd iterations with blocked GEMM distances
  (``from rbank_torch.kernels.kmeans import kmeans``; the function is not re-exported here so that the
  name ``rbank_torch.kernels.kmeans`` always means the module).
"""

from __future__ import annotations

from .pairs import (
    HAS_TRITON,
    leader_scan,
    pair_cosine64,
    pair_margin,
    pairs_above,
    torch_pairs_above,
    triton_pairs_above,
)

__all__ = [
    "HAS_TRITON",
    "leader_scan",
    "pair_cosine64",
    "pair_margin",
    "pairs_above",
    "torch_pairs_above",
    "triton_pairs_above",
]
