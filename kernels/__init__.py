"""Fast kernels of rbank_torch, each beside its pure-PyTorch reference.

* :mod:`rbank_torch.kernels.pairs`: similar pairs over the upper triangle of ``E Eᵀ`` (PyTorch and Triton)
  and the leader scan of ``merge_similar``.
* :mod:`rbank_torch.kernels.kmeans`: k-means++ and Lloyd iterations with blocked GEMM distances
  (``from rbank_torch.kernels.kmeans import kmeans``; the function is not re-exported here so that the
  name ``rbank_torch.kernels.kmeans`` always means the module).

This folder is the package ``rbank_torch.kernels`` (``pyproject.toml`` maps it there). It is never the
top-level module ``kernels``: that name belongs to Hugging Face's ``kernels`` package, which
``transformers`` imports. Python puts the current folder first on ``sys.path`` for ``python -m …``,
``python -c …`` and ``python script.py`` run from a checkout's root, where this folder would shadow it.
So when this file runs under the name ``kernels`` it hands the name to the installed package of that
name (found on ``sys.path`` without the checkout's root) and stops. See CONTRIBUTING.md, "Why
kernels/ hands over its name".
"""

from __future__ import annotations

if __name__ == "kernels":  # imported from a checkout's root, not as rbank_torch.kernels
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

    def _is_root(entry: str) -> bool:
        try:
            return _os.path.samefile(entry or _os.getcwd(), _root)
        except OSError:
            return False

    _saved = list(_sys.path)
    _sys.path[:] = [p for p in _saved if not _is_root(p)]
    del _sys.modules["kernels"]
    try:
        # The import system re-reads sys.modules["kernels"] after this file has run, so the caller of
        # `import kernels` gets the installed package (importlib._bootstrap._load_unlocked).
        import importlib as _importlib

        _importlib.import_module("kernels")
    except ModuleNotFoundError as _e:
        if _e.name != "kernels":
            raise
        raise ModuleNotFoundError(
            "No module named 'kernels': the kernels/ folder of this checkout is rbank_torch.kernels "
            "(import it under that name); the top-level name is Hugging Face's `kernels` package, "
            "which is not installed",
            name="kernels",
        ) from None
    finally:
        _sys.path[:] = _saved
else:
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
