"""rbank_torch: a tensor-native memory of reasoning patterns for LLM agents.

Trajectories in, searchable reasoning patterns out; failure analysis, EWC++ consolidation and
distillation of key lessons, all on PyTorch tensors (CPU or CUDA).
"""

from __future__ import annotations

import os as _os
from importlib import import_module
from importlib.util import find_spec as _find_spec
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


def _find_checkout_kernels() -> None:
    """Let ``rbank_torch.kernels`` be found in a source checkout that no installation maps.

    Installed, ``kernels/`` is ``rbank_torch/kernels`` (the wheel) or mapped there (an editable install).
    Python started from a checkout's root with a *regular* install, or with no install at all, imports
    this folder instead of the installed copy, and ``kernels/`` then sits beside it, not inside it.
    """
    if _find_spec(__name__ + ".kernels") is not None:
        return
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if _os.path.isfile(_os.path.join(root, "kernels", "__init__.py")):
        __path__.append(root)


_find_checkout_kernels()

# name -> module: resolved lazily so `import rbank_torch` stays light (no heavy optional imports)
_EXPORTS = {
    # trajectories
    "StepOutcome": "trajectory",
    "StepOutcomeKind": "trajectory",
    "StepMetadata": "trajectory",
    "TrajectoryStep": "trajectory",
    "TrajectoryMetadata": "trajectory",
    "Trajectory": "trajectory",
    "TrajectoryRecorder": "trajectory",
    # verdicts
    "Verdict": "verdicts",
    "VerdictKind": "verdicts",
    "RootCause": "verdicts",
    "ReasoningErrorType": "verdicts",
    "VerdictAnalyzer": "verdicts",
    "VerdictAnalysis": "verdicts",
    "FailurePattern": "verdicts",
    "RecoveryStrategy": "verdicts",
    # patterns and store
    "PatternCategory": "patterns",
    "Pattern": "patterns",
    "PatternMetadata": "patterns",
    "PatternSearchResult": "patterns",
    "PatternStoreConfig": "store",
    "PatternStore": "store",
    "PatternStats": "store",
    "LowConfidenceError": "store",
    "MissingBackendError": "backends",
    # consolidation
    "ConsolidationConfig": "consolidation",
    "ConsolidationResult": "consolidation",
    "FisherInformation": "consolidation",
    "ImportanceScore": "consolidation",
    "PatternConsolidator": "consolidation",
    "cluster_patterns": "consolidation",
    # EWC++
    "EWCPlusPlus": "ewc",
    # distillation
    "DistillationConfig": "distillation",
    "CompressedTrajectory": "distillation",
    "KeyLesson": "distillation",
    "DistillationResult": "distillation",
    "TrajectorySummary": "distillation",
    "MemoryDistiller": "distillation",
    "DistillationError": "distillation",
    # logs and distributed runs
    "LogFormatError": "logs",
    "DistributedError": "distributed",
    # bank
    "ReasoningBankConfig": "bank",
    "ReasoningBankStats": "bank",
    "ReasoningBank": "bank",
    "format_memories": "bank",
    "RetrievalScoring": "retrieval",
    # LLM in the loop
    "MemoryItem": "llm",
    "Judge": "llm",
    "MemoryExtractor": "llm",
    "Judgement": "llm",
    "RuleJudge": "llm",
    "RuleExtractor": "llm",
    "LLMJudge": "llm",
    "LLMExtractor": "llm",
    "LLMStats": "llm",
    "LLMError": "llm",
    "LLMOutputError": "llm",
    "ResponseCache": "llm",
    "OpenAICompatible": "llm",
    "TransformersPipeline": "llm",
    # snapshots and journal
    "SnapshotError": "snapshot",
    "JournalError": "journal",
    "JournalTailWarning": "journal",
    "JournalWriteError": "journal",
    # one writer per bank; write targets
    "BankLockedError": "locking",
    "NotARegularFileError": "_fsio",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # static type checkers see the real names
    from ._fsio import NotARegularFileError
    from .backends import MissingBackendError
    from .bank import ReasoningBank, ReasoningBankConfig, ReasoningBankStats, format_memories
    from .consolidation import (
        ConsolidationConfig,
        ConsolidationResult,
        FisherInformation,
        ImportanceScore,
        PatternConsolidator,
        cluster_patterns,
    )
    from .distillation import (
        CompressedTrajectory,
        DistillationConfig,
        DistillationError,
        DistillationResult,
        KeyLesson,
        MemoryDistiller,
        TrajectorySummary,
    )
    from .distributed import DistributedError
    from .ewc import EWCPlusPlus
    from .journal import JournalError, JournalTailWarning, JournalWriteError
    from .llm import (
        Judge,
        Judgement,
        LLMError,
        LLMExtractor,
        LLMJudge,
        LLMOutputError,
        LLMStats,
        MemoryExtractor,
        MemoryItem,
        OpenAICompatible,
        ResponseCache,
        RuleExtractor,
        RuleJudge,
        TransformersPipeline,
    )
    from .locking import BankLockedError
    from .logs import LogFormatError
    from .patterns import Pattern, PatternCategory, PatternMetadata, PatternSearchResult
    from .retrieval import RetrievalScoring
    from .snapshot import SnapshotError
    from .store import LowConfidenceError, PatternStats, PatternStore, PatternStoreConfig
    from .trajectory import (
        StepMetadata,
        StepOutcome,
        StepOutcomeKind,
        Trajectory,
        TrajectoryMetadata,
        TrajectoryRecorder,
        TrajectoryStep,
    )
    from .verdicts import (
        FailurePattern,
        ReasoningErrorType,
        RecoveryStrategy,
        RootCause,
        Verdict,
        VerdictAnalysis,
        VerdictAnalyzer,
        VerdictKind,
    )


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'rbank_torch' has no attribute {name!r}")
    value = getattr(import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
