"""Test-session set-up.

Triton decides at import time whether its own ``@triton.jit`` helpers run in the interpreter, so
``TRITON_INTERPRET=1`` must be in the environment before anything imports ``triton``. Without CUDA the
Triton kernels can only run in the interpreter, so it is switched on here for the whole session.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
