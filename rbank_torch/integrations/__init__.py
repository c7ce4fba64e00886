"""Training-framework integrations of :class:`rbank_torch.ewc.EWCPlusPlus`.

Submodules are imported on demand so that ``import rbank_torch`` never imports a framework:

* :mod:`rbank_torch.integrations.lightning` — ``EWCPlusPlusCallback`` for PyTorch Lightning.
* :mod:`rbank_torch.integrations.hf` — ``EWCPlusPlusTrainerCallback`` for the Hugging Face ``Trainer``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["lightning", "hf"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
