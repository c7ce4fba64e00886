"""The checkout's kernels/ folder never takes the top-level name ``kernels``.

``transformers`` imports Hugging Face's ``kernels`` package. ``python -m …``, ``python -c …`` and
``python script.py`` run from the repository root put the root first on ``sys.path``, where the
kernels/ folder (the package ``rbank_torch.kernels``) sits. These tests run from the root, as a
newcomer does, and check that the top-level name still resolves to the installed package.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_from_root(*args: str, python_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, *python_args, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _installed_kernels_file() -> str | None:
    """Where Hugging Face's ``kernels`` lives, looked up without the checkout's root on the path."""
    code = ("import importlib.util, os, sys\n"
            "root = os.path.realpath(sys.argv[1])\n"
            "sys.path[:] = [p for p in sys.path if os.path.realpath(p or '.') != root]\n"
            "s = importlib.util.find_spec('kernels')\n"
            "print(s.origin if s else '')\n")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd="/", capture_output=True, text=True,
                         timeout=60).stdout.strip()
    return out or None


HF_KERNELS = _installed_kernels_file()
needs_hf_kernels = pytest.mark.skipif(HF_KERNELS is None, reason="Hugging Face's kernels package is not installed")


@needs_hf_kernels
def test_transformers_and_sentence_transformers_from_the_root_get_hf_kernels():
    code = (
        "import transformers.modeling_utils\n"  # imports `kernels` (transformers >= 5)
        "import sentence_transformers\n"
        "import kernels, os, sys\n"
        "assert os.path.realpath(sys.path[0] or '.') == os.getcwd()  # the root is first on the path\n"
        "import rbank_torch.kernels as ours\n"
        "assert os.path.realpath(kernels.__file__) != os.path.realpath(ours.__file__), kernels.__file__\n"
        "assert not hasattr(kernels, 'pairs_above'), 'the checkout kernels/ shadows kernels'\n"
        "assert ours.__name__ == 'rbank_torch.kernels' and hasattr(ours, 'pairs_above')\n"
        "print(kernels.__file__)\n"
    )
    proc = _run_from_root("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.realpath(proc.stdout.strip()) == os.path.realpath(HF_KERNELS)


def test_without_hf_kernels_the_name_is_missing_not_ours():
    # -S: no site-packages, so no Hugging Face `kernels`; the checkout's folder must not stand in for it
    proc = _run_from_root("-c", "import kernels", python_args=("-S",))
    assert proc.returncode != 0
    assert "ModuleNotFoundError" in proc.stderr and "rbank_torch.kernels" in proc.stderr


def test_rbank_torch_kernels_is_the_checkout_folder():
    spec = importlib.util.find_spec("rbank_torch.kernels")
    assert spec is not None and spec.origin is not None
    import rbank_torch.kernels as ours

    assert ours.__name__ == "rbank_torch.kernels" and callable(ours.pairs_above)
    assert "kernels" not in sys.modules or sys.modules["kernels"] is not ours


def test_a_checkout_without_an_installed_mapping_still_has_rbank_torch_kernels(tmp_path):
    # what a regular (non-editable) install sees when Python starts at the checkout's root: the
    # checkout's rbank_torch/ comes first on sys.path and no editable finder maps kernels/ into it
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path\n"
        "                   if 'editable' not in (getattr(f, '__name__', '') + type(f).__name__).lower()]\n"
        "assert len(sys.meta_path) >= 3\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import rbank_torch, rbank_torch.kernels as k, os\n"
        f"assert os.path.dirname(rbank_torch.__file__) == os.path.join({str(ROOT)!r}, 'rbank_torch')\n"
        f"assert os.path.dirname(k.__file__) == os.path.join({str(ROOT)!r}, 'kernels'), k.__file__\n"
        "assert k.__name__ == 'rbank_torch.kernels' and callable(k.pairs_above)\n"
        "from rbank_torch.kernels.kmeans import kmeans\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
