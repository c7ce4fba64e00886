"""Small shared helpers: ids, time, validation of public inputs."""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

__all__ = [
    "next_id",
    "bump_id_counter",
    "utcnow",
    "dt_to_us",
    "us_to_dt",
    "as_embedding",
    "as_embedding_batch",
    "check_unit",
    "check_finite_number",
    "check_int",
    "check_text",
    "loadable_device",
    "EPOCH",
    "MAX_TEXT_BYTES",
    "MAX_CATEGORY_BYTES",
    "MAX_LIST_ITEMS",
    "MAX_PATTERN_TEXT_BYTES",
    "MAX_ID",
    "MAX_COUNT",
]

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

#: the largest id a pattern or trajectory may have (ids live in int64 columns)
MAX_ID = 2**63 - 1
#: the largest usage or success count (int64 columns; counts saturate here instead of wrapping)
MAX_COUNT = 2**63 - 1
#: the longest single string of a pattern (a lesson, an example action, a tag, the source, an attribute
#: key or value, the text), in UTF-8 bytes
MAX_TEXT_BYTES = 64 * 1024
#: the longest category name (``custom:<name>`` included), in UTF-8 bytes
MAX_CATEGORY_BYTES = 128
#: the most entries in one list of a pattern (lessons, example actions, tags, source trajectories,
#: attributes)
MAX_LIST_ITEMS = 4096
#: the most UTF-8 bytes of all the strings of one pattern together
MAX_PATTERN_TEXT_BYTES = 4 * 1024 * 1024

_id_lock = threading.Lock()
_id_counter = itertools.count(1)
_id_last = 0


def next_id() -> int:
    """Next id of the process-wide counter (ids increase in creation order)."""
    global _id_last
    with _id_lock:
        if _id_last >= MAX_ID:
            raise ValueError(
                f"no id left to hand out: an id of {_id_last} (the largest, 2**63 - 1) is in use; ids must stay "
                "below 2**63"
            )
        _id_last = next(_id_counter)
        return _id_last


def bump_id_counter(min_last: int) -> None:
    """Make sure the next id handed out is greater than ``min_last``."""
    global _id_counter, _id_last
    with _id_lock:
        if min_last > _id_last:
            _id_last = int(min_last)
            _id_counter = itertools.count(_id_last + 1)


def utcnow() -> datetime:
    """Timezone-aware current UTC time."""
    return datetime.now(timezone.utc)


def dt_to_us(dt: datetime) -> int:
    """Microseconds since the Unix epoch (exact for any aware datetime)."""
    if dt.tzinfo is None:
        raise ValueError("datetime must be timezone-aware (UTC)")
    delta = dt - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def us_to_dt(us: int) -> datetime:
    """Inverse of :func:`dt_to_us`."""
    from datetime import timedelta

    return EPOCH + timedelta(microseconds=int(us))


def check_int(value: Any, field: str, lo: int = 0, hi: int = MAX_COUNT) -> int:
    """Return ``value`` as int, raising ``ValueError`` naming ``field`` unless it is an integer (not a bool)
    within ``[lo, hi]`` (by default ``0 <= value < 2**63``, what an int64 column holds)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{field} must be an integer, got {type(value).__name__} {value!r}")
    v = int(value)
    if not lo <= v <= hi:
        raise ValueError(f"{field} must be an integer within [{lo}, {hi}], got {v}")
    return v


def check_text(value: Any, field: str, max_bytes: int = MAX_TEXT_BYTES) -> int:
    """Check that ``value`` is a ``str`` that UTF-8 can encode (no lone surrogate) of at most ``max_bytes``
    bytes; returns its size in bytes. Raises ``ValueError`` naming ``field``."""
    if type(value) is not str:
        if not isinstance(value, str):
            raise ValueError(f"{field} must be a string, got {type(value).__name__}")
        value = str.__str__(value)
    if value.isascii():
        n = len(value)
    else:
        try:
            n = len(value.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise ValueError(
                f"{field} holds a lone surrogate ({value[e.start]!r} at index {e.start}), which UTF-8 cannot "
                "encode"
            ) from None
    if n > max_bytes:
        raise ValueError(f"{field} is {n} bytes of UTF-8; at most {max_bytes} are accepted")
    return n


def loadable_device(device: str, what: str) -> str:
    """The device to load a file saved on ``device`` onto: ``device`` when this torch can use it, else
    ``"cpu"`` with a warning (a bank saved on a GPU machine opens on a CPU-only one)."""
    import warnings

    dev = torch.device(device)
    if dev.type == "cpu":
        return device
    try:
        if dev.type == "cuda":
            ok = torch.cuda.is_available() and (dev.index is None or dev.index < torch.cuda.device_count())
        else:
            torch.empty(0, device=dev)
            ok = True
    except (RuntimeError, AssertionError, ValueError):
        ok = False
    if ok:
        return device
    warnings.warn(
        f"{what} was saved on device {device!r}, which this torch installation cannot use; loading it on the CPU "
        "(pass device=... to choose)",
        RuntimeWarning,
        stacklevel=3,
    )
    return "cpu"


def check_finite_number(value: Any, field: str) -> float:
    """Return ``value`` as float, raising ``ValueError`` naming ``field`` when not a finite number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{field} must be finite, got {v}")
    return v


def check_unit(value: Any, field: str) -> float:
    """Return ``value`` as float, raising ``ValueError`` unless it is finite and within [0, 1]."""
    v = check_finite_number(value, field)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{field} must be within [0, 1], got {v}")
    return v


def _to_tensor(x: Any, field: str, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.layout != torch.strided:
            raise ValueError(f"{field} must be a dense tensor, got layout {x.layout}")
        if x.is_meta:
            raise ValueError(f"{field} is a 'meta' tensor, which holds no values")
        t = x.detach()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise ValueError(f"{field} must hold real numbers, got a numpy array of dtype {x.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        try:
            t = torch.as_tensor(list(x), dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{field} must be a sequence of numbers") from None
    else:
        raise ValueError(f"{field} must be a tensor, numpy array or list of floats, got {type(x).__name__}")
    if not (t.dtype.is_floating_point or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"{field} must hold real numbers, got dtype {t.dtype}")
    return t.to(dtype)


def as_embedding(
    x: Any,
    field: str = "embedding",
    dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Validate and convert one embedding to a 1-D tensor ``[D]``.

    Raises:
        ValueError: naming ``field`` for a wrong rank, wrong dimension or non-finite values.
    """
    t = _to_tensor(x, field, dtype)
    if t.dim() != 1:
        raise ValueError(f"{field} must be 1-D, got shape {tuple(t.shape)}")
    if dim is not None and t.shape[0] != dim:
        raise ValueError(f"{field} must have dimension {dim}, got {t.shape[0]}")
    if t.shape[0] == 0:
        raise ValueError(f"{field} must not be empty")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{field} must hold finite values (found NaN or inf)")
    if device is not None:
        t = t.to(device)
    return t


def as_embedding_batch(
    x: Any,
    field: str = "queries",
    dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Validate and convert a batch of embeddings to a 2-D tensor ``[B, D]`` (a 1-D input becomes ``[1, D]``)."""
    t = _to_tensor(x, field, dtype)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise ValueError(f"{field} must be 2-D [B, D], got shape {tuple(t.shape)}")
    if dim is not None and t.shape[1] != dim:
        raise ValueError(f"{field} must have dimension {dim}, got {t.shape[1]}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{field} must hold finite values (found NaN or inf)")
    if device is not None:
        t = t.to(device)
    return t
