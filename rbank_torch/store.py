"""The columnar pattern store (SPEC §3, DESIGN "PatternStore is columnar").

Embeddings live in one ``[capacity, D]`` tensor on the store's device, every numeric field in its own
column tensor, strings and lists in a Python side table indexed by row. A :class:`Pattern` is a copy
built on demand. Deletes clear an alive bit (tombstone); dead rows are compacted away once they pass
a fraction of the rows. Single inserts are staged and written to the columns in one batch before the
next read, so ``store_pattern`` stays cheap on any device.

Thread safety: every public method takes the store's re-entrant lock; a store may be shared by threads.
"""

from __future__ import annotations

import contextlib
import gc
import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from ._util import (
    EPOCH,
    MAX_CATEGORY_BYTES,
    MAX_LIST_ITEMS,
    MAX_PATTERN_TEXT_BYTES,
    MAX_TEXT_BYTES,
    as_embedding,
    as_embedding_batch,
    check_int,
    check_text,
    check_unit,
    dt_to_us,
    loadable_device,
    us_to_dt,
    utcnow,
)
from .importance import importance_scores
from .patterns import (
    BUILTIN_CATEGORIES,
    OUTCOMES,
    Pattern,
    PatternCategory,
    PatternMetadata,
    PatternSearchResult,
    check_attributes,
)
from .retrieval import AttributeColumn, FilterSpec, RetrievalScoring, mmr_select

__all__ = [
    "PatternStoreConfig",
    "PatternStore",
    "PatternStats",
    "LowConfidenceError",
    "DISTANCE_METRICS",
]

DISTANCE_METRICS = ("cosine", "euclidean", "dot")
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
_NEG_INF = float("-inf")
_F32_MAX = torch.finfo(torch.float32).max
_I64_MAX = 2**63 - 1
#: search_similar_batch pads missing slots up to k only while B·k stays within this many slots; past it
#: (a huge k) the result has min(k, live count) columns instead of allocating B·k
_MAX_PAD_SLOTS = 1 << 22
#: a float64 sum of counts at or above this may exceed the int64 max: the count saturates
_I64_SATURATE = float(2**63 - 2**11)


class LowConfidenceError(ValueError):
    """A pattern's confidence is below the store's ``min_confidence``."""


@dataclass
class PatternStoreConfig:
    """Configuration of a :class:`PatternStore` (defaults of SPEC §3 plus device/dtype/search options)."""

    #: dimension D of every embedding
    embedding_dim: int = 768
    #: HNSW build breadth (used by the approximate backends)
    ef_construction: int = 200
    #: HNSW search breadth (used by the approximate backends)
    ef_search: int = 100
    #: HNSW graph degree (used by the approximate backends)
    m: int = 32
    #: hard cap on live patterns; at capacity the store prunes, then evicts the least important
    max_patterns: int = 100_000
    #: "cosine", "euclidean" or "dot"
    distance_metric: str = "cosine"
    #: patterns with a lower confidence are refused
    min_confidence: float = 0.3
    #: prune stale patterns when at capacity
    auto_prune: bool = True
    #: usage below which a pattern may be pruned
    prune_threshold: int = 2
    #: seconds unused after which a pattern may be pruned (30 days)
    max_unused_age_secs: int = 30 * 86_400
    #: default file for save()/load() when no path is given
    storage_path: str | None = None
    #: where the columns live ("cpu", "cuda", "cuda:1", …)
    device: str = "cpu"
    #: dtype of the embedding column ("float32", "float16", "bfloat16", "float64"; also "fp32", "fp16", "bf16")
    dtype: str = "float32"
    #: search backend: "auto" (exact on CUDA and for small stores, HNSW / IVF on CPU past measured sizes),
    #: "exact", "faiss-hnsw", "faiss-ivf" or "faiss-flat" (see rbank_torch.backends and docs/search.md)
    backend: str = "auto"
    #: tuning of the approximate backends (dict of rbank_torch.backends.BackendOptions fields), None: defaults
    backend_options: dict[str, Any] | None = None
    #: rows of the embedding matrix scored per GEMM block in exact search (bounds peak memory)
    search_block_rows: int = 65_536
    #: compact when dead rows exceed this fraction of the rows
    compact_dead_fraction: float = 0.25

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        for name in ("embedding_dim", "ef_construction", "ef_search", "m", "max_patterns", "search_block_rows"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.distance_metric not in DISTANCE_METRICS:
            raise ValueError(f"distance_metric must be one of {DISTANCE_METRICS}, got {self.distance_metric!r}")
        check_unit(self.min_confidence, "min_confidence")
        if not isinstance(self.prune_threshold, int) or self.prune_threshold < 0:
            raise ValueError(f"prune_threshold must be a non-negative integer, got {self.prune_threshold!r}")
        if not (isinstance(self.max_unused_age_secs, (int, float)) and self.max_unused_age_secs > 0):
            raise ValueError(f"max_unused_age_secs must be > 0, got {self.max_unused_age_secs!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {self.dtype!r}")
        from .backends import validate_backend

        validate_backend(self.backend, self.backend_options)
        if not 0.0 < float(self.compact_dead_fraction) <= 1.0:
            raise ValueError(f"compact_dead_fraction must be in (0, 1], got {self.compact_dead_fraction!r}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device string, got {self.device!r}") from None
        if dev.type == "meta":
            raise ValueError("device must hold data: 'meta' tensors have none (use 'cpu' or 'cuda')")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PatternStoreConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown PatternStoreConfig fields: {sorted(unknown)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg


@dataclass
class PatternStats:
    total_patterns: int
    by_category: dict[str, int]
    avg_confidence: float
    avg_usage: float
    total_searches: int
    avg_search_latency_ms: float


class _Side:
    """Strings and lists of one row (empty containers are stored as None to save memory)."""

    __slots__ = ("uuid", "_sources", "_lessons", "_actions", "_tags", "source", "version", "_attributes", "text")

    def __init__(self, p: Pattern) -> None:
        md = p.metadata
        self.uuid = str(p.uuid)
        self._sources = [int(x) for x in p.source_trajectories] or None
        self._lessons = [str(x) for x in p.lessons] or None
        self._actions = [str(x) for x in p.example_actions] or None
        self._tags = [str(x) for x in md.tags] or None
        self.source = str(md.source)
        self.version = int(md.version)
        self._attributes = check_attributes(md.attributes, "metadata.attributes") or None
        text = p.text
        if text is not None and not isinstance(text, str):
            raise ValueError(f"text must be a string or None, got {type(text).__name__}")
        self.text: str | None = text

    # list views (created on first write)
    @property
    def sources(self) -> list[int]:
        if self._sources is None:
            self._sources = []
        return self._sources

    @property
    def lessons(self) -> list[str]:
        if self._lessons is None:
            self._lessons = []
        return self._lessons

    @property
    def actions(self) -> list[str]:
        if self._actions is None:
            self._actions = []
        return self._actions

    @property
    def tags(self) -> list[str]:
        return self._tags or []

    @property
    def attributes(self) -> dict[str, Any]:
        return self._attributes or {}

    def to_json(self) -> list:
        return [self.uuid, self._sources or [], self._lessons or [], self._actions or [], self._tags or [],
                self.source, self.version, self._attributes or {}, self.text]

    @classmethod
    def from_json(cls, j: list) -> _Side:
        s = cls.__new__(cls)
        if not isinstance(j, list) or len(j) not in (8, 9):
            raise ValueError("side row must be a list of 9 fields")
        uuid, sources, lessons, actions, tags, source, version, attributes = j[:8]
        text = j[8] if len(j) == 9 else None  # snapshots written before patterns kept their text
        if text is not None and not isinstance(text, str):
            raise ValueError("side row text must be a string or null")
        s.text = text
        if not (isinstance(uuid, str) and isinstance(source, str) and isinstance(version, int)
                and all(isinstance(x, list) for x in (sources, lessons, actions, tags))
                and isinstance(attributes, dict)):
            raise ValueError("side row has fields of the wrong type")
        s.uuid, s.source, s.version = uuid, source, version
        s._sources = [int(x) for x in sources] or None
        s._lessons = [str(x) for x in lessons] or None
        s._actions = [str(x) for x in actions] or None
        s._tags = [str(x) for x in tags] or None
        s._attributes = check_attributes(attributes, "attributes") or None
        return s


class _Row:
    """A validated pattern waiting to be written to the columns."""

    __slots__ = ("id", "emb", "conf", "usage", "success", "avgq", "created", "last", "cat", "side", "outcome")

    id: int
    emb: torch.Tensor  # [D] float32 (set for staged single inserts; batches keep the stacked [m, D])
    conf: float
    usage: int
    success: int
    avgq: float
    created: int  # µs since the epoch
    last: int  # µs since the epoch
    cat: PatternCategory
    side: _Side
    outcome: int  # index in OUTCOMES


_US = timedelta(microseconds=1)

#: the columns a search result reads when it is made (the rest of its pattern is built when read)
_RESULT_COLUMNS = ("_conf", "_usage", "_success", "_avgq", "_created", "_last", "_cat", "_outcome")
#: Pattern fields a search result builds only when first read (see :class:`_PatternView`)
_LAZY_FIELDS = frozenset(
    ("embedding", "source_trajectories", "lessons", "example_actions", "created_at", "last_accessed", "metadata")
)


class _PatternView(Pattern):
    """The pattern of a search result: a :class:`Pattern` copy whose embedding, lists, times and metadata are
    built from the search's snapshot of its row when first read.

    The snapshot is taken when the search runs (the embedding is gathered into a block private to the
    search, the side lists are the list objects of that moment, which the store never changes in place), so
    the copy shows the pattern as it was found, whatever happens to the store afterwards. Reading any field,
    comparing, printing or ``dataclasses.replace`` behave as on a plain Pattern.
    """

    def __getattr__(self, name: str) -> Any:
        # only called for attributes missing from the instance: the lazy fields until they are built
        d = self.__dict__
        lz = d.get("_lz")
        if lz is None or name not in _LAZY_FIELDS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        emb, i, created, last, side = lz
        d["embedding"] = emb[i].clone()
        d["source_trajectories"] = list(side[0] or ())
        d["lessons"] = list(side[1] or ())
        d["example_actions"] = list(side[2] or ())
        d["created_at"] = EPOCH + timedelta(microseconds=created)
        d["last_accessed"] = EPOCH + timedelta(microseconds=last)
        d["metadata"] = PatternMetadata(tags=list(side[3] or ()), source=side[4], version=side[5],
                                        attributes=dict(side[6] or {}))
        del d["_lz"]
        return d[name]

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY_FIELDS and "_lz" in self.__dict__:
            getattr(self, name)  # build the lazy fields first, so that none is built over this value
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if name in _LAZY_FIELDS and "_lz" in self.__dict__:
            getattr(self, name)
        object.__delattr__(self, name)

    def __repr__(self) -> str:
        return "Pattern" + Pattern.__repr__(self)[len(type(self).__qualname__):]

    def __reduce__(self) -> Any:
        # copies (copy, deepcopy) and anything else that serialises the object get a plain Pattern
        return (Pattern, tuple(getattr(self, f.name) for f in fields(Pattern)))


def _unit(v: Any, name: str) -> float:
    # fast path for plain floats in [0, 1]; anything else goes through the full check (NaN fails both tests)
    if type(v) is float and 0.0 <= v <= 1.0:
        return v
    return check_unit(v, name)


def _check_scalars(p: Pattern, min_confidence: float) -> _Row:
    """Check every field of ``p`` but the embedding; returns a row record (embedding not yet set)."""
    if not isinstance(p, Pattern):
        raise ValueError(f"pattern must be a Pattern, got {type(p).__name__}")
    r = _Row()
    conf = _unit(p.confidence, "confidence")
    if conf < min_confidence:
        raise LowConfidenceError(f"confidence {conf} is below min_confidence {min_confidence}")
    r.conf = conf
    r.avgq = _unit(p.avg_quality, "avg_quality")
    pid, usage, success = p.id, p.usage_count, p.success_count
    if not (type(pid) is int and type(usage) is int and type(success) is int and 0 <= pid <= _I64_MAX
            and 0 <= usage <= _I64_MAX and 0 <= success <= _I64_MAX):
        # bounded here, before anything is staged: an int64 column cannot hold 2**63 or more
        pid = check_int(pid, "id")
        usage = check_int(usage, "usage_count")
        success = check_int(success, "success_count")
    if success > usage:
        raise ValueError(f"success_count ({success}) must not exceed usage_count ({usage})")
    r.id, r.usage, r.success = pid, usage, success
    cat = p.category
    r.cat = cat if isinstance(cat, PatternCategory) else PatternCategory.parse(cat)
    try:
        r.created = (p.created_at - EPOCH) // _US
        r.last = (p.last_accessed - EPOCH) // _US
    except TypeError:
        raise ValueError("created_at and last_accessed must be timezone-aware datetimes") from None
    _check_side_ints(p)
    _check_texts(p, r.cat)
    r.side = _Side(p)
    try:
        r.outcome = OUTCOMES.index(p.outcome)
    except ValueError:
        raise ValueError(f"outcome must be one of {list(OUTCOMES)}, got {p.outcome!r}") from None
    return r


def _check_list(v: Any, field: str) -> Sequence:
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise ValueError(f"{field} must be a list, got {type(v).__name__}")
    if len(v) > MAX_LIST_ITEMS:
        raise ValueError(f"{field} has {len(v)} entries; at most {MAX_LIST_ITEMS} are accepted")
    return v


def _check_texts(p: Pattern, cat: PatternCategory) -> None:
    """Every string of ``p`` encodes as UTF-8 (no lone surrogate) within the size caps, so whatever is
    accepted also saves (snapshot and journal) and loads back."""
    md = p.metadata
    # NOTE: the common case (a few short ASCII strings) is settled with C-level joins and maps; anything
    # else takes the field-by-field check below, which names the offending field
    lessons, actions, tags = p.lessons, p.example_actions, md.tags
    if (type(lessons) is list and type(actions) is list and type(tags) is list and not md.attributes
            and getattr(p, "text", None) is None and len(lessons) <= MAX_LIST_ITEMS
            and len(actions) <= MAX_LIST_ITEMS and len(tags) <= MAX_LIST_ITEMS
            and len(p.source_trajectories) <= MAX_LIST_ITEMS):
        strs = [*lessons, *actions, *tags, p.uuid, md.source, cat.name]
        try:
            joined = "".join(strs)
        except TypeError:
            joined = None
        if (joined is not None and joined.isascii() and len(joined) <= MAX_PATTERN_TEXT_BYTES
                and len(cat.name) <= MAX_CATEGORY_BYTES and len(p.uuid) <= 256
                and max(map(len, strs)) <= MAX_TEXT_BYTES):
            return
    check_text(cat.name, "category", MAX_CATEGORY_BYTES)
    total = check_text(str(p.uuid), "uuid", 256) + check_text(str(md.source), "metadata.source")
    text = getattr(p, "text", None)
    if text is not None:
        total += check_text(text, "text")
    for name, items in (("lessons", p.lessons), ("example_actions", p.example_actions), ("metadata.tags", md.tags)):
        for i, s in enumerate(_check_list(items, name)):
            total += check_text(s if isinstance(s, str) else str(s), f"{name}[{i}]")  # stored as str(s)
    _check_list(p.source_trajectories, "source_trajectories")
    attrs = md.attributes
    if not isinstance(attrs, dict):
        raise ValueError(f"metadata.attributes must be a dict, got {type(attrs).__name__}")
    if len(attrs) > MAX_LIST_ITEMS:
        raise ValueError(f"metadata.attributes has {len(attrs)} entries; at most {MAX_LIST_ITEMS} are accepted")
    for k, v in attrs.items():
        total += check_text(k if isinstance(k, str) else str(k), "metadata.attributes key")
        total += check_text(v if isinstance(v, str) else str(v), f"metadata.attributes[{k!r}]")
    if total > MAX_PATTERN_TEXT_BYTES:
        raise ValueError(
            f"pattern {p.id}: its strings hold {total} bytes of UTF-8; at most {MAX_PATTERN_TEXT_BYTES} are accepted"
        )


def _check_side_ints(p: Pattern) -> None:
    """Source trajectory ids and the metadata version are integers a snapshot can hold."""
    src = p.source_trajectories
    if src and not all(type(x) is int and 0 <= x <= _I64_MAX for x in src):
        for i, x in enumerate(src):
            check_int(x, f"source_trajectories[{i}]")
    v = p.metadata.version
    if not (type(v) is int and -_I64_MAX <= v <= _I64_MAX):
        check_int(v, "metadata.version", -_I64_MAX, _I64_MAX)


def _prepare(patterns: Sequence[Pattern], dim: int, min_confidence: float) -> tuple[list[_Row], torch.Tensor]:
    """Validate patterns; returns their row records and their embeddings stacked ``[m, D]`` float32 (CPU)."""
    # NOTE: pausing the cyclic GC while building many small row objects halves the cost of a 20 000-pattern
    # batch (the collector otherwise rescans the caller's pattern list over and over).
    paused = gc.isenabled() and len(patterns) > 256
    if paused:
        gc.disable()
    try:
        rows = [_check_scalars(p, min_confidence) for p in patterns]
    finally:
        if paused:
            gc.enable()
    embs = [p.embedding for p in patterns]
    if not embs:
        return rows, torch.empty((0, dim))
    E = None
    try:  # fast path: a list of 1-D tensors of the right size on one device
        E = torch.stack(embs).detach()
        if E.shape != (len(embs), dim) or E.layout != torch.strided or E.is_meta:
            E = None  # the checked path below names what is wrong
    except (TypeError, RuntimeError):
        E = None
    if E is None:
        E = torch.stack([as_embedding(e, "embedding", dim=dim) for e in embs])
    E = E.to("cpu", torch.float32)
    lo, hi = torch.aminmax(E)  # NaN propagates; ±inf shows at an end: finite ends ⇔ all finite
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        bad = int(torch.nonzero(~torch.isfinite(E).all(dim=1))[0])
        raise ValueError(f"embedding must hold finite values (found NaN or inf in pattern {patterns[bad].id})")
    return rows, E


class PatternStore:
    """Columnar store of reasoning patterns with exact similarity search.

    Args:
        config: a :class:`PatternStoreConfig` (defaults when omitted); keyword overrides are applied on top.

    Example:
        >>> store = PatternStore(PatternStoreConfig(embedding_dim=4))
        >>> pid = store.store_pattern(Pattern.new([1.0, 0.0, 0.0, 0.0], "research", 0.9))
        >>> store.search_similar([1.0, 0.1, 0.0, 0.0], k=1)[0].pattern.id == pid
        True
    """

    _COLUMNS = ("_ids", "_conf", "_usage", "_success", "_avgq", "_created", "_last", "_cat", "_alive", "_norm",
                "_outcome")

    def __init__(self, config: PatternStoreConfig | None = None, **overrides: Any) -> None:
        cfg = PatternStoreConfig(**asdict(config)) if config is not None else PatternStoreConfig()
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise ValueError(f"unknown PatternStoreConfig field {k!r}")
            setattr(cfg, k, v)
        cfg.validate()
        self.config = cfg
        self.device = torch.device(cfg.device)
        self.dtype = _DTYPES[cfg.dtype]
        self._lock = threading.RLock()
        self._cat_codes: dict[str, int] = {n: i for i, n in enumerate(BUILTIN_CATEGORIES)}
        self._cat_names: list[str] = list(BUILTIN_CATEGORIES)
        self._cat_objs: dict[str, PatternCategory] = {}  # shared immutable category objects of results
        #: numpy views of the CPU columns search results read (keyed by the _conf tensor they were made from)
        self._np_cols: tuple[torch.Tensor, list[np.ndarray]] | None = None
        self._total_searches = 0
        self._search_time_ms = 0.0
        #: observer of mutations (the bank's journal): ``touched(ids)`` and ``op_done()``
        self._listener: Any = None
        self._op_depth = 0
        self._alloc(0)
        from .backends import make_backend

        self._backend = make_backend(self)

    # ------------------------------------------------------------------ columns
    def _alloc(self, cap: int) -> None:
        d, D = self.device, self.config.embedding_dim
        self._cap = cap
        self._n = 0  # rows in use (alive or dead)
        self._dead = 0
        self._emb = torch.empty((cap, D), dtype=self.dtype, device=d)  # [cap, D]
        self._norm = torch.empty(cap, dtype=torch.float32, device=d)  # [cap] L2 norm of each row
        self._ids = torch.empty(cap, dtype=torch.int64, device=d)
        self._conf = torch.empty(cap, dtype=torch.float64, device=d)
        self._usage = torch.empty(cap, dtype=torch.int64, device=d)
        self._success = torch.empty(cap, dtype=torch.int64, device=d)
        self._avgq = torch.empty(cap, dtype=torch.float64, device=d)
        self._created = torch.empty(cap, dtype=torch.int64, device=d)  # µs since epoch
        self._last = torch.empty(cap, dtype=torch.int64, device=d)  # µs since epoch
        self._cat = torch.empty(cap, dtype=torch.int32, device=d)
        self._alive = torch.zeros(cap, dtype=torch.bool, device=d)
        self._outcome = torch.zeros(cap, dtype=torch.int8, device=d)  # index in OUTCOMES
        #: metadata attributes on columns (one per attribute name) and the rows holding each tag
        self._attrs: dict[str, AttributeColumn] = {}
        self._tag_rows: dict[str, list[int]] = {}
        self._side: list[_Side | None] = []
        self._row_of: dict[int, int] = {}
        self._staged: dict[int, _Row] = {}
        self._cache_version = 0
        self._score_cache: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._norm_bound = float("inf")  # bound of the live rows' norms, set with the score cache

    def _grow(self, need: int) -> None:
        if need <= self._cap:
            return
        # NOTE: growth factor 1.5 (not 2) bounds the slack of a growing store (untouched slack pages are not
        # even resident) while keeping the number of copies of the columns small; capped at
        # max_patterns so a full store holds no slack at all.
        new_cap = max(need, min(int(self._cap * 1.5) + 1024, self.config.max_patterns))
        emb = torch.empty((new_cap, self.config.embedding_dim), dtype=self.dtype, device=self.device)
        emb[: self._n] = self._emb[: self._n]
        self._emb = emb
        for name in self._COLUMNS:
            old = getattr(self, name)
            new = (torch.zeros if name == "_alive" else torch.empty)(new_cap, dtype=old.dtype, device=self.device)
            new[: self._n] = old[: self._n]
            setattr(self, name, new)
        for acol in self._attrs.values():
            acol.grow(new_cap, self._n)
        self._cap = new_cap

    def _touch(self) -> None:
        self._cache_version += 1

    def _touched(self, ids: Iterable[int]) -> None:
        if self._listener is not None:
            self._listener.touched(ids)

    @contextlib.contextmanager
    def _mutating(self):
        """Lock, and tell the listener when the outermost mutating call is done."""
        with self._lock:
            if self._op_depth == 0 and self._listener is not None:
                self._listener.check_writable()  # the bank refuses changes its journal could not record
            self._op_depth += 1
            try:
                yield
            finally:
                self._op_depth -= 1
            if self._op_depth == 0 and self._listener is not None:
                self._listener.op_done()

    def _code(self, cat: PatternCategory) -> int:
        code = self._cat_codes.get(cat.name)
        if code is None:
            code = len(self._cat_names)
            self._cat_codes[cat.name] = code
            self._cat_names.append(cat.name)
        return code

    def _append(self, rows: Sequence[_Row], emb: torch.Tensor | None = None) -> None:
        """Write validated rows (with unused ids) to new rows of the columns in one batch.

        ``emb`` ``[m, D]`` float32 holds their embeddings when already stacked.
        """
        m = len(rows)
        if m == 0:
            return
        self._grow(self._n + m)
        a, b = self._n, self._n + m
        dev = self.device
        if emb is None:
            emb = torch.stack([r.emb for r in rows])
        emb = emb.to(device=dev)  # [m, D] float32
        self._norm[a:b] = torch.linalg.vector_norm(emb, dim=1)
        self._emb[a:b] = emb.to(self.dtype)

        def col(vals: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(vals, dtype=dtype).to(dev)

        self._ids[a:b] = col([r.id for r in rows], torch.int64)
        self._conf[a:b] = col([r.conf for r in rows], torch.float64)
        self._usage[a:b] = col([r.usage for r in rows], torch.int64)
        self._success[a:b] = col([r.success for r in rows], torch.int64)
        self._avgq[a:b] = col([r.avgq for r in rows], torch.float64)
        self._created[a:b] = col([r.created for r in rows], torch.int64)
        self._last[a:b] = col([r.last for r in rows], torch.int64)
        self._cat[a:b] = col([self._code(r.cat) for r in rows], torch.int32)
        self._outcome[a:b] = col([r.outcome for r in rows], torch.int8)
        self._alive[a:b] = True
        row_of = self._row_of
        for i, r in enumerate(rows):
            self._side.append(r.side)
            row_of[r.id] = a + i
        self._index_rows(a, b)
        self._n = b
        self._touch()
        self._backend.on_append(a, b)

    def _flush(self) -> None:
        if self._staged:
            # emptied only once the rows are written: a failure here loses nothing staged
            self._append(list(self._staged.values()))
            self._staged = {}

    def _kill_rows(self, rows: torch.Tensor) -> None:
        """Tombstone rows (``[r]`` int64, alive, unique)."""
        if rows.numel() == 0:
            return
        self._alive[rows] = False
        killed = self._ids[rows].tolist()
        for r, pid in zip(rows.tolist(), killed):
            self._row_of.pop(pid, None)
            self._side[r] = None
        self._touched(killed)
        self._dead += int(rows.numel())
        self._touch()
        self._backend.on_kill(rows)
        if self._dead > self.config.compact_dead_fraction * self._n:
            self._compact()

    def _compact(self) -> None:
        """Rewrite the columns without dead rows (row order is kept)."""
        n = self._n
        keep = torch.nonzero(self._alive[:n]).flatten()
        m = int(keep.numel())
        self._emb[:m] = self._emb[keep]
        for name in self._COLUMNS:
            col = getattr(self, name)
            col[:m] = col[keep]
        self._alive[m:n] = False
        for acol in self._attrs.values():
            acol.codes[:m] = acol.codes[keep]
            acol.num[:m] = acol.num[keep]
        keep_l = keep.tolist()
        self._side = [self._side[r] for r in keep_l]
        self._tag_rows = {}
        self._index_tags(0, m)
        self._row_of = {pid: i for i, pid in enumerate(self._ids[:m].tolist())}
        self._n = m
        self._dead = 0
        self._touch()
        self._backend.on_compact(keep)

    def compact(self) -> None:
        """Drop dead rows now (also done automatically past ``compact_dead_fraction``)."""
        with self._lock:
            self._flush()
            if self._dead:
                self._compact()

    # ------------------------------------------------------------------ building patterns
    def _patterns_at(self, rows: Sequence[int]) -> list[Pattern]:
        if not rows:
            return []
        idx = torch.as_tensor(list(rows), dtype=torch.int64, device=self.device)
        emb = self._emb.index_select(0, idx).to(torch.float32)
        cols = {
            name: getattr(self, name)[idx].tolist()
            for name in ("_ids", "_conf", "_usage", "_success", "_avgq", "_created", "_last", "_cat")
        }
        outcome = self._outcome[idx].tolist()
        out = []
        for i, r in enumerate(rows):
            s = self._side[r]
            assert s is not None
            out.append(
                Pattern(
                    id=cols["_ids"][i],
                    uuid=s.uuid,
                    embedding=emb[i].clone(),
                    category=PatternCategory(self._cat_names[cols["_cat"][i]]),
                    confidence=cols["_conf"][i],
                    usage_count=cols["_usage"][i],
                    success_count=cols["_success"][i],
                    avg_quality=cols["_avgq"][i],
                    source_trajectories=list(s.sources),
                    lessons=list(s.lessons),
                    example_actions=list(s.actions),
                    created_at=us_to_dt(cols["_created"][i]),
                    last_accessed=us_to_dt(cols["_last"][i]),
                    metadata=PatternMetadata(
                        tags=list(s.tags), source=s.source, version=s.version, attributes=dict(s.attributes)
                    ),
                    text=s.text,
                    outcome=OUTCOMES[outcome[i]],
                )
            )
        return out

    # ------------------------------------------------------------------ metadata on columns
    def _index_rows(self, a: int, b: int) -> None:
        """Write the attribute codes and tag lists of rows ``a:b`` (their side rows are in place)."""
        for acol in self._attrs.values():
            acol.codes[a:b] = -1
            acol.num[a:b] = math.nan
        per_key: dict[str, tuple[list[int], list[int], list[float]]] = {}
        for r in range(a, b):
            side = self._side[r]
            attrs = side.attributes if side is not None else None
            if not attrs:
                continue
            for key, v in attrs.items():
                found = self._attrs.get(key)
                if found is None:
                    found = self._attrs[key] = AttributeColumn(self._cap, self.device)
                acol = found
                rows_l, codes_l, nums_l = per_key.setdefault(key, ([], [], []))
                rows_l.append(r)
                codes_l.append(acol.code(v))
                nums_l.append(AttributeColumn.number(v))
        for key, (rows_l, codes_l, nums_l) in per_key.items():
            acol = self._attrs[key]
            idx = torch.tensor(rows_l, dtype=torch.int64, device=self.device)
            acol.codes[idx] = torch.tensor(codes_l, dtype=torch.int32, device=self.device)
            acol.num[idx] = torch.tensor(nums_l, dtype=torch.float64, device=self.device)
        self._index_tags(a, b)

    def _index_tags(self, a: int, b: int) -> None:
        tag_rows = self._tag_rows
        for r in range(a, b):
            side = self._side[r]
            if side is not None and side._tags:
                for t in set(side._tags):
                    tag_rows.setdefault(t, []).append(r)

    def merge_groups(self, rows: torch.Tensor, by_category: bool) -> torch.Tensor | None:
        """Group code ``[r]`` int64 of ``rows`` that consolidation merges within: patterns of different outcomes
        (SPEC §7) — and, with ``by_category``, of different categories — never merge. None: one group."""
        out = self._outcome[rows].to(torch.int64)
        if by_category:
            return self._cat[rows].to(torch.int64) * len(OUTCOMES) + out
        mixed = out.numel() > 0 and bool((out != out[0]).any())
        return out if mixed else None

    def filter_mask(
        self,
        *,
        where: dict[str, Any] | None = None,
        category: Any = None,
        outcome: Any = None,
        tags: Any = None,
        since: Any = None,
        until: Any = None,
        min_quality: float | None = None,
    ) -> torch.Tensor | None:
        """Boolean mask ``[n]`` over the store's rows (live rows that match every filter, ANDed), on the
        store's device; None when no filter is given. The filters are those of ``ReasoningBank.search``
        (SPEC §7); they are validated here and raise ``ValueError`` naming the filter."""
        spec = FilterSpec.parse(where, category, outcome, tags, since, until, min_quality)
        with self._lock:
            self._flush()
            return self._mask(spec)

    def _mask(self, spec: FilterSpec) -> torch.Tensor | None:
        return spec.mask(self._n, self._alive, self._cat, self._cat_codes, self._outcome, self._created,
                         self._avgq, self._attrs, self._tag_rows)

    def touch(self, pattern_ids: Iterable[int]) -> int:
        """Set last_accessed ← now for the given patterns (a retrieval); returns how many are stored."""
        with self._mutating():
            self._flush()
            rows = sorted({self._row_of[i] for i in pattern_ids if i in self._row_of})
            if not rows:
                return 0
            idx = torch.tensor(rows, dtype=torch.int64, device=self.device)
            self._last[idx] = dt_to_us(utcnow())
            self._touched(self._ids[idx].tolist())
            self._touch()
            return len(rows)

    # ------------------------------------------------------------------ capacity
    def _live_rows(self) -> torch.Tensor:
        return torch.nonzero(self._alive[: self._n]).flatten()

    def _live_rows_by_id(self) -> torch.Tensor:
        """Live rows in ascending id order (no sort when rows already are: ids usually grow with the row)."""
        rows = self._live_rows()
        ids = self._ids[rows]
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            rows = rows[torch.argsort(ids)]
        return rows

    def _make_room(self, incoming: int) -> None:
        """Prune, then evict, until ``incoming`` more patterns fit under max_patterns."""
        cfg = self.config
        cap = cfg.max_patterns
        if incoming > cap:
            raise ValueError(f"cannot store {incoming} patterns at once: max_patterns is {cap}")
        chunk = max(1, cap // 10)
        while len(self) + incoming > cap:
            self._flush()
            need = len(self) + incoming - cap
            freed = 0
            if cfg.auto_prune:
                now = dt_to_us(utcnow())
                n = self._n
                prunable = (
                    self._alive[:n]
                    & (self._usage[:n] < cfg.prune_threshold)
                    & ((now - self._last[:n]).double() / 1e6 > cfg.max_unused_age_secs)
                    & (self._avgq[:n] < cfg.min_confidence)
                )
                rows = torch.nonzero(prunable).flatten()
                if rows.numel():
                    order = torch.argsort(self._last[rows], stable=True)[:chunk]
                    rows = rows[order]
                    freed = int(rows.numel())
                    self._kill_rows(torch.sort(rows).values)
            if freed == 0:
                k = min(max(need, 1), chunk)
                rows = self._live_rows()
                scores = self._importance(rows)
                # lowest importance first; ties: oldest last access, then lowest id
                order = torch.argsort(scores, stable=True)[:k]
                self._kill_rows(torch.sort(rows[order]).values)

    def _importance(self, rows: torch.Tensor, fisher_mean: torch.Tensor | None = None,
                    has_fisher: torch.Tensor | None = None, max_age_secs: float | None = None) -> torch.Tensor:
        now = dt_to_us(utcnow())
        age = (now - self._last[rows]).double().clamp(min=0) / 1e6
        return importance_scores(
            self._usage[rows],
            self._success[rows],
            self._avgq[rows],
            age,
            float(max_age_secs if max_age_secs is not None else self.config.max_unused_age_secs),
            fisher_mean,
            has_fisher,
        )

    # ------------------------------------------------------------------ public API: writes
    def store_pattern(self, pattern: Pattern) -> int:
        """Store (a copy of) one pattern and return its id.

        A pattern whose id is already stored replaces the stored one.

        Raises:
            ValueError: wrong embedding dimension, non-finite values, out-of-range fields.
            LowConfidenceError: confidence below ``min_confidence``.
        """
        rows, emb = _prepare([pattern], self.config.embedding_dim, self.config.min_confidence)
        r = rows[0]
        r.emb = emb[0].clone()
        with self._mutating():
            replacing = r.id in self._row_of or r.id in self._staged
            if not replacing and len(self) + 1 > self.config.max_patterns:
                self._make_room(1)
            if r.id in self._row_of:
                self._kill_rows(torch.tensor([self._row_of[r.id]], device=self.device))
            self._staged[r.id] = r
            self._touch()
            self._touched((r.id,))
        return r.id

    def store_patterns(self, patterns: Iterable[Pattern]) -> list[int]:
        """Store many patterns in one batch; all are validated before anything is written.

        Returns:
            their ids, in order.
        """
        cfg = self.config
        rows, emb = _prepare(list(patterns), cfg.embedding_dim, cfg.min_confidence)
        ids = [r.id for r in rows]
        if len(set(ids)) != len(ids):
            raise ValueError("store_patterns: the batch holds the same pattern id twice")
        with self._mutating():
            self._flush()
            old = [self._row_of[i] for i in ids if i in self._row_of]
            new_count = len(rows) - len(old)
            if len(self) + new_count > cfg.max_patterns:
                self._make_room(new_count)
                old = [self._row_of[i] for i in ids if i in self._row_of]
            if old:
                self._kill_rows(torch.tensor(sorted(old), dtype=torch.int64, device=self.device))
            self._append(rows, emb)
            self._touched(ids)
        return ids

    def _raw_put(self, patterns: Sequence[Pattern]) -> None:
        """Write patterns as they are (replacing same ids), without capacity or confidence rules (replay)."""
        rows, emb = _prepare(list(patterns), self.config.embedding_dim, 0.0)
        with self._lock:
            self._flush()
            old = sorted(self._row_of[r.id] for r in rows if r.id in self._row_of)
            if old:
                self._kill_rows(torch.tensor(old, dtype=torch.int64, device=self.device))
            self._append(rows, emb)

    def remove_pattern(self, pattern_id: int) -> bool:
        """Remove a pattern; returns False when it is not stored."""
        with self._mutating():
            if self._staged.pop(pattern_id, None) is not None:
                self._touch()
                self._touched((pattern_id,))
                return True
            row = self._row_of.get(pattern_id)
            if row is None:
                return False
            self._kill_rows(torch.tensor([row], device=self.device))
            return True

    def remove_patterns(self, pattern_ids: Iterable[int]) -> int:
        """Remove many patterns; returns how many were stored."""
        with self._mutating():
            self._flush()
            rows = sorted({self._row_of[i] for i in pattern_ids if i in self._row_of})
            self._kill_rows(torch.tensor(rows, dtype=torch.int64, device=self.device))
            return len(rows)

    def record_usage(self, pattern_id: int, successful: bool, quality: float) -> bool:
        """Record one use of a pattern (SPEC ``Pattern.record_usage``); returns False when not stored."""
        q = check_unit(quality, "quality")
        with self._mutating():
            self._flush()
            row = self._row_of.get(pattern_id)
            if row is None:
                return False
            self._touched((pattern_id,))
            u = min(int(self._usage[row]) + 1, _I64_MAX)  # saturates at the int64 max
            self._usage[row] = u
            if successful:
                self._success[row] = min(int(self._success[row]) + 1, u)
            avg = float(self._avgq[row])
            self._avgq[row] = avg + (q - avg) / u
            self._last[row] = dt_to_us(utcnow())
            self._touch()
            return True

    def prune_low_quality(self, min_quality: float) -> int:
        """Remove patterns with avg_quality < min_quality **and** usage_count < prune_threshold."""
        mq = check_unit(min_quality, "min_quality")
        with self._mutating():
            self._flush()
            n = self._n
            mask = self._alive[:n] & (self._avgq[:n] < mq) & (self._usage[:n] < self.config.prune_threshold)
            rows = torch.nonzero(mask).flatten()
            self._kill_rows(rows)
            return int(rows.numel())

    def merge_similar(self, threshold: float) -> int:
        """Merge near-duplicate patterns (SPEC §3): scan live patterns by ascending id; each pattern not yet
        absorbed leads and absorbs every later unabsorbed pattern whose cosine with it exceeds ``threshold``
        (cosines of the embeddings as they were before the call). Returns the number absorbed."""
        thr = float(threshold)
        if not math.isfinite(thr):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
        with self._mutating():
            self._flush()
            rows, leader = self._leaders(thr, by_category=False)
            return self._fold(rows, leader)

    def _leaders(
        self, threshold: float, by_category: bool, eligible: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ):
        """Live rows in ascending id order and, for each, the position of its leader (SPEC §3 scan).

        ``rows``: the live rows already in ascending id order, when the caller has them."""
        from .kernels.pairs import leader_scan, pairs_above

        if rows is None:
            rows = self._live_rows_by_id()
        n = int(rows.numel())
        if n == 0:
            return rows, torch.empty(0, dtype=torch.int64)
        emb = self._emb[rows]
        cats = self.merge_groups(rows, by_category)
        pairs = pairs_above(emb, threshold, cats)
        leader = leader_scan(n, pairs.cpu(), None if eligible is None else eligible.cpu())
        return rows, leader.cpu()

    def _fold(self, rows: torch.Tensor, leader: torch.Tensor) -> int:
        """Fold every absorbed row into its leader (``Pattern.merge`` semantics, ascending id order) and
        tombstone the absorbed rows. ``rows`` are in ascending id order; ``leader[i]`` a position."""
        pos = torch.arange(leader.numel())
        absorbed_pos = torch.nonzero(leader != pos).flatten()
        if absorbed_pos.numel() == 0:
            return 0
        rows_l = rows.tolist()
        lead_l = leader.tolist()
        usage = self._usage[rows].tolist()
        # which merges are effective: Pattern.merge does nothing while the running usage stays 0
        running: dict[int, int] = {}
        effective: list[int] = []
        now_us = dt_to_us(utcnow())
        for p in absorbed_pos.tolist():
            L = lead_l[p]
            u = running.get(L, usage[L]) + usage[p]
            running[L] = u
            if u == 0:
                continue
            effective.append(p)
            ls, os_ = self._side[rows_l[L]], self._side[rows_l[p]]
            assert ls is not None and os_ is not None
            # new lists, never in place: search results hold the lists of the moment they were found
            ls._sources = [*ls.sources, *os_.sources]
            lessons = list(ls.lessons)
            seen = set(lessons)
            for x in os_.lessons:
                if x not in seen:
                    lessons.append(x)
                    seen.add(x)
            ls._lessons = lessons
            actions = list(ls.actions)
            for a in os_.actions:
                if len(actions) >= 10:
                    break
                if a not in actions:
                    actions.append(a)
            ls._actions = actions
        if effective:
            eff = torch.tensor(effective, dtype=torch.int64)
            src = rows[eff].to(self.device)
            dst = rows[leader[eff]].to(self.device)
            uniq = torch.unique(dst)
            # usage-weighted sums in float64 over the leader and its effective absorbed rows
            u_src = self._usage[src].double()
            u_dst = self._usage[uniq].double()
            acc_e = self._emb[uniq].double() * u_dst[:, None]  # [L, D]
            acc_q = self._avgq[uniq] * u_dst
            acc_u = u_dst.clone()
            slot = torch.searchsorted(uniq, dst)
            acc_e.index_add_(0, slot, self._emb[src].double() * u_src[:, None])
            acc_q.index_add_(0, slot, self._avgq[src] * u_src)
            acc_u.index_add_(0, slot, u_src)
            acc_s = self._success[uniq].clone().index_add_(0, slot, self._success[src])
            acc_c = self._conf[uniq].clone().scatter_reduce_(0, slot, self._conf[src], reduce="amax")
            new_e = acc_e / acc_u[:, None]
            self._emb[uniq] = new_e.to(self.dtype)
            self._norm[uniq] = torch.linalg.vector_norm(new_e.float(), dim=1)
            self._backend.on_change(uniq)
            self._avgq[uniq] = acc_q / acc_u
            # counts are summed exactly in int64 (float64 loses units past 2**53) and saturate at the int64 max
            acc_ui = self._usage[uniq].clone().index_add_(0, slot, self._usage[src])
            sat = acc_u >= _I64_SATURATE
            acc_ui = torch.where(sat, torch.full_like(acc_ui, _I64_MAX), acc_ui)
            acc_s = torch.where(sat & (acc_s < 0), acc_ui, acc_s.clamp(max=acc_ui))
            self._usage[uniq] = acc_ui
            self._success[uniq] = acc_s
            self._conf[uniq] = acc_c
            self._last[uniq] = now_us
            self._touched(self._ids[uniq].tolist())
        dead = torch.sort(rows[absorbed_pos]).values.to(self.device)
        self._touch()
        self._kill_rows(dead)
        return int(absorbed_pos.numel())

    # ------------------------------------------------------------------ public API: reads
    def __len__(self) -> int:
        # staged ids are never in _row_of: a replaced row is tombstoned when its successor is staged
        return self._n - self._dead + len(self._staged)

    def len(self) -> int:  # noqa: A003 - SPEC name
        """Number of live patterns."""
        with self._lock:
            return len(self)

    def is_empty(self) -> bool:
        return self.len() == 0

    def get_pattern(self, pattern_id: int) -> Pattern | None:
        """A copy of the pattern, or None."""
        with self._lock:
            if pattern_id in self._staged:
                self._flush()
            row = self._row_of.get(pattern_id)
            return None if row is None else self._patterns_at([row])[0]

    def get_patterns(self, pattern_ids: Iterable[int]) -> list[Pattern]:
        """Copies of the stored patterns among ``pattern_ids``, in the order given (missing ids skipped)."""
        with self._lock:
            self._flush()
            found = [(r, i) for r, i in ((self._row_of.get(i), i) for i in pattern_ids) if r is not None]
            # the light copies search results use: costly fields are built from a snapshot when first read
            return self._result_patterns([r for r, _ in found], [i for _, i in found])

    def __contains__(self, pattern_id: object) -> bool:
        with self._lock:
            return pattern_id in self._staged or pattern_id in self._row_of

    def get_all_patterns(self) -> list[Pattern]:
        """Copies of all live patterns in ascending id order."""
        with self._lock:
            self._flush()
            rows = self._live_rows_by_id()
            return self._patterns_at(rows.tolist())

    def ids(self) -> torch.Tensor:
        """``[N]`` int64 ids of the live patterns, ascending."""
        with self._lock:
            self._flush()
            return torch.sort(self._ids[self._live_rows()]).values

    def get_by_category(self, category: PatternCategory | str, limit: int) -> list[Pattern]:
        """The ``limit`` highest-confidence patterns of ``category``, best first (ties: lower id first)."""
        cat = PatternCategory.parse(category)
        limit = _check_k(limit, "limit")
        with self._lock:
            self._flush()
            code = self._cat_codes.get(cat.name)
            if code is None or limit == 0:
                return []
            n = self._n
            rows = torch.nonzero(self._alive[:n] & (self._cat[:n] == code)).flatten()
            rows = rows[torch.argsort(self._ids[rows])]
            order = torch.argsort(self._conf[rows], descending=True, stable=True)[:limit]
            return self._patterns_at(rows[order].tolist())

    def _scores_prep(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``scale`` and ``bias`` ``[n]`` float32 such that score = scale·(q·e) + bias (dead rows −inf)."""
        if self._score_cache is not None and self._score_cache[0] == self._cache_version:
            return self._score_cache[1], self._score_cache[2]
        n = self._n
        alive = self._alive[:n]
        norm = self._norm[:n]
        bias = torch.zeros(n, dtype=torch.float32, device=self.device).masked_fill_(~alive, _NEG_INF)
        metric = self.config.distance_metric
        if metric == "cosine":
            scale = torch.where(norm > 1e-8, 1.0 / norm.clamp(min=1e-30), torch.zeros_like(norm))
        elif metric == "dot":
            scale = torch.ones_like(norm)
        else:  # euclidean: rank by 2·q·e − ||e||² (= ||q||² − d²)
            scale = torch.full_like(norm, 2.0)
            bias = bias - norm * norm
        # bound of every live row's norm: decides whether a search may overflow float32 (see _search_rows)
        live_norm = norm[alive]
        self._norm_bound = float(live_norm.max()) if live_norm.numel() else 0.0
        self._score_cache = (self._cache_version, scale, bias)
        return scale, bias

    def _search_rows(self, q: torch.Tensor, k: int, scale: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k: ``q`` ``[B, D]`` (prepared) → (scores ``[B, k']``, rows ``[B, k']``), k' = min(k, n).

        ``scale``/``bias`` ``[n]`` replace the per-row score terms of :meth:`_scores_prep` (a filter sets −inf
        in ``bias`` where a row does not match; a retrieval scoring adds its per-row terms)."""
        n = self._n
        B = q.shape[0]
        kk = min(k, n)
        if kk == 0:
            e = torch.empty((B, 0), device=self.device)
            return e, e.long()
        if scale is None or bias is None:
            scale, bias = self._scores_prep()
        block = self.config.search_block_rows
        E = self._emb
        # |q·e| ≤ ||q||·||e|| bounds every partial sum too (Cauchy–Schwarz): when that bound (and ||e||² for
        # euclidean) stays far below the float32 maximum no score can overflow, and one fused
        # scale·s + bias gives finite scores to live rows and −inf to dead ones (bias holds −inf there)
        q_bound = float(torch.linalg.vector_norm(q.float(), dim=1).max()) if B else 0.0
        e_bound = self._norm_bound
        safe = q_bound * e_bound < 1e36 and e_bound * e_bound < 1e36
        # inf − inf (euclidean) is "infinitely far"; inf·0 (cosine, dot) counts as no similarity
        nan_score = -_F32_MAX if self.config.distance_metric == "euclidean" else 0.0
        best_s: torch.Tensor | None = None
        best_r: torch.Tensor | None = None
        for a in range(0, n, block):
            b = min(n, a + block)
            # one query: a matrix-vector product (BLAS gemv over the rows) beats a 1-row GEMM
            s = torch.mv(E[a:b], q[0])[None, :] if B == 1 else torch.mm(q, E[a:b].T)  # [B, nb]
            if s.dtype != torch.float32:
                s = s.float()
            if safe:
                s = torch.addcmul(bias[a:b], s, scale[a:b])
            else:
                s.mul_(scale[a:b]).add_(bias[a:b])
                # products of huge finite values overflow to inf/NaN (NaN would outrank every row in topk):
                # live rows keep a finite score, dead rows −inf, so "finite" still means "live" below
                torch.nan_to_num_(s, nan=nan_score, posinf=_F32_MAX, neginf=-_F32_MAX)
                s.masked_fill_(torch.isneginf(bias[a:b]), _NEG_INF)
            ts, ti = torch.topk(s, min(kk, b - a), dim=1)
            ti += a
            if best_s is None or best_r is None:
                best_s, best_r = ts, ti
            else:
                cs = torch.cat([best_s, ts], dim=1)
                cr = torch.cat([best_r, ti], dim=1)
                best_s, j = torch.topk(cs, kk, dim=1)
                best_r = torch.gather(cr, 1, j)
        assert best_s is not None and best_r is not None
        return best_s, best_r

    def _rerank(self, qp: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The best ``k`` of candidate ids ``[B, c]`` (−1: none) by their exact scores (the score space of
        :meth:`_search_rows`): (scores ``[B, k']``, ids ``[B, k']``); candidates no longer stored drop out."""
        B, c = ids.shape
        if c == 0:
            return torch.empty((B, 0), device=self.device), ids
        scale, bias = self._scores_prep()
        row_of = self._row_of
        rows = torch.tensor([row_of.get(i, -1) for i in ids.reshape(-1).tolist()], dtype=torch.int64,
                            device=self.device).view(B, c)
        ok = rows >= 0
        rr = rows.clamp(min=0)
        rf = rr.reshape(-1)
        e = self._emb.index_select(0, rf).view(B, c, -1)
        dots = torch.bmm(e.float(), qp.float().unsqueeze(2)).squeeze(2)  # [B, c]
        sc = (dots * scale.index_select(0, rf).view(B, c) + bias.index_select(0, rf).view(B, c))
        sc.masked_fill_(~ok, _NEG_INF)
        ts, j = torch.topk(sc, min(k, c), dim=1)
        ti = torch.gather(ids.to(self.device), 1, j)
        return ts, torch.where(torch.isfinite(ts), ti, torch.full_like(ti, -1))

    def _ids_of_rows(self, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Pattern ids ``[B, k]`` of exact-search rows ``r`` (−1 where the score ``s`` is −inf)."""
        return _ids_missing_as_minus_one(_take(self._ids, r), s)

    def _prepare_queries(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cast/normalise queries ``[B, D]``; returns (prepared, squared norms)."""
        q = q.to(device=self.device, dtype=torch.float32)
        qn = torch.linalg.vector_norm(q, dim=1)
        if self.config.distance_metric == "cosine":
            q = q * torch.where(qn > 1e-8, 1.0 / qn.clamp(min=1e-30), torch.zeros_like(qn))[:, None]
        return q.to(self.dtype), qn * qn

    def _finish_scores(self, scores: torch.Tensor, qsq: torch.Tensor) -> torch.Tensor:
        if self.config.distance_metric == "euclidean":
            d2 = (qsq[:, None] - scores).clamp(min=0)
            return torch.where(torch.isfinite(scores), 1.0 / (1.0 + d2.sqrt()), scores)
        return scores

    def search_similar_batch(self, queries: Any, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k live patterns for each query.

        Args:
            queries: ``[B, D]`` (a ``[D]`` query is treated as ``[1, D]``).
            k: results per query (≥ 0).

        Returns:
            (similarities ``[B, k]`` float32, ids ``[B, k]`` int64), best first; missing slots hold −inf / −1.
            Similarity is the cosine (``cosine``), the dot product (``dot``) or 1/(1+distance) (``euclidean``).
            The search itself never looks for more than the live count; when ``k`` is so large that padding
            would pass 4 194 304 slots (B·k), the result has only min(k, live count) columns.
        """
        return self._search_batch(queries, _check_k(k, "k"), None)

    def _search_batch(self, queries: Any, k: int, single: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`search_similar_batch` (``k`` checked); ``single`` names the argument of a single ``[D]``
        query (validated as such), None for a batch. ``k`` is capped at the live count for a single query."""
        # an approximate backend may validate and prepare plain CPU float32 queries itself (cheaper per call)
        pre = self._backend.prepare_queries(queries)
        if pre is None and self.device.type == "cpu" and self.dtype == torch.float32:
            from .backends import fast_prepare

            pre = fast_prepare(queries, self.config.embedding_dim, self.config.distance_metric)
        if pre is None:
            if single is None:
                pre_q = as_embedding_batch(queries, "queries", dim=self.config.embedding_dim)
            else:
                pre_q = as_embedding(queries, single, dim=self.config.embedding_dim)[None, :]
        elif single is not None and not (isinstance(queries, (torch.Tensor, np.ndarray)) and queries.ndim == 1):
            raise ValueError(f"{single} must be 1-D, got shape {tuple(queries.shape)}")
        t0 = time.perf_counter()
        with self._lock:
            self._flush()
            if single is not None:
                k = min(k, len(self))  # a huge k must not allocate k padding slots
            qp, qsq = pre if pre is not None else self._prepare_queries(pre_q)
            k_out = k
            k = min(k, len(self))  # never more than the live count: a huge k must not allocate B·k slots
            if k_out > k and qp.shape[0] * k_out > _MAX_PAD_SLOTS:
                k_out = k
            plan = self._backend.begin_search(qp, qsq, k)
            if plan is None:
                s, r = self._search_rows(qp, k)
                ids = self._ids_of_rows(s, r)
        if plan is not None:
            # approximate backend: the index search runs outside the store lock (unless the caller holds it)
            s, ids = plan.run()
            with self._lock:
                if plan.rerank:
                    s, ids = self._rerank(qp, ids, k)
                # an index may return fewer than min(k, live) (HNSW with dead slots, IVF probing few lists):
                # then the exact search answers, so the count is always min(k, live)
                need = min(k, len(self))
                # results are best first with the missing ones (−1) last: the need-th column tells
                if s.shape[1] < need or (need > 0 and _any_missing(ids[:, need - 1])):
                    self._flush()
                    s, r = self._search_rows(qp, k)
                    ids = self._ids_of_rows(s, r)
        s = self._finish_scores(s, qsq)
        B = qp.shape[0]
        if s.shape[1] < k_out:
            pad = k_out - s.shape[1]
            s = torch.cat([s, torch.full((B, pad), _NEG_INF, device=self.device)], dim=1)
            ids = torch.cat([ids, torch.full((B, pad), -1, dtype=torch.int64, device=self.device)], dim=1)
        with self._lock:
            self._total_searches += B
            self._search_time_ms += (time.perf_counter() - t0) * 1000.0
        return s, ids

    def search_memory(
        self,
        queries: Any,
        k: int,
        *,
        filters: FilterSpec | None = None,
        scoring: RetrievalScoring | None = None,
        mmr: float | None = None,
        dedup: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Filtered, scored, diversified top-k (SPEC §7; ``ReasoningBank.search`` is the documented entry).

        Args:
            queries: ``[B, D]`` (or ``[D]``).
            k: results per query.
            filters: a :class:`~rbank_torch.retrieval.FilterSpec` (ANDed with the live rows, before top-k).
            scoring: a :class:`~rbank_torch.retrieval.RetrievalScoring` (None: by similarity).
            mmr: λ of maximal marginal relevance over the top ``max(4k, 50)`` by score (None: off).
            dedup: ``"text"``: at most one result per distinct text.

        Returns:
            (scores ``[B, k]`` float32, similarities ``[B, k]`` float32, ids ``[B, k]`` int64), best first;
            exactly ``min(k, matching live patterns)`` results per query on every backend; missing slots
            hold −inf / −inf / −1.
        """
        k = _check_k(k, "k")
        D = self.config.embedding_dim
        q = as_embedding_batch(queries, "queries", dim=D)
        if scoring is not None and not isinstance(scoring, RetrievalScoring):
            raise ValueError(f"scoring must be a RetrievalScoring, got {type(scoring).__name__}")
        if scoring is not None and scoring.is_plain:
            scoring = None
        if scoring is not None and self.config.distance_metric == "euclidean":
            raise ValueError("scoring needs the cosine or dot distance_metric (similarity is not linear in "
                             "the query for euclidean)")
        if mmr is not None:
            if isinstance(mmr, bool) or not isinstance(mmr, (int, float)) or not 0.0 < float(mmr) <= 1.0:
                raise ValueError(f"mmr must be a number λ with 0 < λ ≤ 1, got {mmr!r}")
            mmr = float(mmr)
        if dedup not in (None, "text"):
            raise ValueError(f"dedup must be None or 'text', got {dedup!r}")
        B = q.shape[0]
        t0 = time.perf_counter()
        with self._lock:
            self._flush()
            qp, qsq = self._prepare_queries(q)
            mask = self._mask(filters) if filters is not None else None
            live = len(self)
            matching = int(mask.sum()) if mask is not None else live
            want = min(k, matching)
            mmr_pool = max(4 * k, 50)
            pool = want if mmr is None else min(matching, mmr_pool)
            target = k if mmr is None else mmr_pool  # candidates wanted after dedup
            if dedup is not None:
                pool = min(matching, 4 * target)
            plan = None
            if scoring is None and pool > 0 and dedup is None and (mask is None or 4 * matching > live):
                # the index serves unscored searches on wide filters; it over-fetches for the filter
                kf = pool if mask is None else min(live, math.ceil(pool * live / matching * 1.5) + 16)
                # NOTE: past a quarter of the rows an exact scan costs no more than the index, and is exact
                if 4 * kf <= live:
                    # the walk widens with the over-fetch: finding kf neighbours of which `pool` match takes
                    # a wider efSearch for the same recall (2·kf/pool: measured in benchmarks/bench_memory.py)
                    wider = 1.0 if mask is None else 2.0 * kf / max(pool, 1)
                    plan = self._backend.begin_search(qp, qsq, kf, ef_scale=wider)
            if plan is None:
                sc, rows = self._candidates(qp, qsq, pool, mask, scoring, matching)
        if plan is not None:
            s_raw, ids_raw = plan.run()
        with self._lock:
            self._flush()
            if plan is not None:
                if plan.rerank:  # approximate scores of candidates: exact ones, all candidates kept
                    s_raw, ids_raw = self._rerank(qp, ids_raw, ids_raw.shape[1])
                if mask is not None:  # rows may have moved while the index searched outside the lock
                    mask = self._mask(filters)  # type: ignore[arg-type]
                got, sc = self._rows_of_ids(ids_raw, s_raw, qsq, mask, pool)
                if got is not None:
                    rows = got
                else:  # the index could not supply enough matching rows: exact search answers
                    matching = int(mask.sum()) if mask is not None else len(self)
                    pool = min(pool, matching)
                    sc, rows = self._candidates(qp, qsq, pool, mask, scoring, matching)
            if dedup == "text":
                size = pool
                while True:
                    sc, rows, full = self._dedup_text(sc, rows, target)
                    if full or size >= matching:
                        break
                    size = min(matching, size * 4)
                    sc, rows = self._candidates(qp, qsq, size, mask, scoring, matching)
            if mmr is not None and rows.shape[1] > 0:
                sc, rows = sc[:, :mmr_pool], rows[:, :mmr_pool]
                safe_rows = rows.clamp(min=0)
                e = self._emb[safe_rows].float()  # [B, P, D]
                unit = e / torch.linalg.vector_norm(e, dim=2, keepdim=True).clamp(min=1e-12)
                pick = mmr_select(sc, unit, mmr, k)
                ok = pick >= 0
                pk = pick.clamp(min=0)
                sc = torch.where(ok, torch.gather(sc, 1, pk), torch.full_like(sc[:, :1].expand_as(pk), _NEG_INF))
                rows = torch.where(ok, torch.gather(rows, 1, pk), torch.full_like(pk, -1))
            sc, rows = sc[:, :k], rows[:, :k]
            found = rows >= 0
            safe_rows = rows.clamp(min=0)
            ids = torch.where(found, self._ids[safe_rows], torch.full_like(rows, -1))
            sc = sc.masked_fill(~found, _NEG_INF)
            # by similarity alone the score is the similarity; otherwise it is recomputed for the results
            sims = sc if scoring is None else self._similarities(qp, safe_rows).masked_fill(~found, _NEG_INF)
            if sc.shape[1] < k:
                pad = k - sc.shape[1]
                sc = torch.cat([sc, torch.full((B, pad), _NEG_INF, device=self.device)], dim=1)
                sims = torch.cat([sims, torch.full((B, pad), _NEG_INF, device=self.device)], dim=1)
                ids = torch.cat([ids, torch.full((B, pad), -1, dtype=torch.int64, device=self.device)], dim=1)
            self._total_searches += B
            self._search_time_ms += (time.perf_counter() - t0) * 1000.0
        return sc, sims, ids

    def memory_results(self, scores: torch.Tensor, sims: torch.Tensor, ids: torch.Tensor) -> list[PatternSearchResult]:
        """One query's row of :meth:`search_memory` (scores, similarities, ids ``[k]``) as search results,
        best first; empty slots (id −1) are left out and ids no longer stored are skipped."""
        found = [(i, s, c) for i, s, c in zip(ids.tolist(), sims.tolist(), scores.tolist()) if i >= 0]
        pats = self.get_patterns([i for i, _, _ in found])
        by_id = {i: (s, c) for i, s, c in found}
        return [PatternSearchResult(p, by_id[p.id][0], r, by_id[p.id][1]) for r, p in enumerate(pats)]

    def _candidates(self, qp: torch.Tensor, qsq: torch.Tensor, pool: int, mask: torch.Tensor | None,
                    scoring: RetrievalScoring | None, matching: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-``pool`` rows by score among the rows ``mask`` keeps: (scores ``[B, p]``, rows ``[B, p]``
        with −1 for empty slots), scores in similarity space (:meth:`_finish_scores` applied)."""
        B = qp.shape[0]
        if pool <= 0:
            e = torch.empty((B, 0), device=self.device)
            return e, e.long()
        scale, bias = self._scores_prep()
        n = self._n
        if scoring is not None:
            alive_usage = self._usage[:n][self._alive[:n]]
            max_usage = int(alive_usage.max()) if alive_usage.numel() else 0
            extra = scoring.row_bias(self._created[:n], self._avgq[:n], self._usage[:n], max_usage)
            scale = scale * scoring.similarity
            bias = bias + extra
        if mask is not None and 4 * matching <= n:
            # a selective filter: score only the matching rows (a gather of m rows, then one small GEMM)
            sel = torch.nonzero(mask).flatten()
            e = self._emb[sel]
            s = torch.mm(qp, e.T).float() * scale[sel] + bias[sel]
            if scoring is None:
                s = self._finish_scores(s, qsq)
            ts, ti = torch.topk(s, min(pool, int(sel.numel())), dim=1)
            rows = sel[ti]
        else:
            if mask is not None:
                bias = bias.masked_fill(~mask, _NEG_INF)
            ts, rows = self._search_rows(qp, pool, scale, bias)
            if scoring is None:
                ts = self._finish_scores(ts, qsq)
        rows = torch.where(torch.isfinite(ts), rows, torch.full_like(rows, -1))
        return ts, rows

    def _rows_of_ids(self, ids: torch.Tensor, s: torch.Tensor, qsq: torch.Tensor, mask: torch.Tensor | None,
                     pool: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Rows of an index's answer kept by ``mask``, the first ``pool`` per query; (None, …) when some query
        got fewer than ``pool`` (the caller then searches exactly)."""
        ids_l = ids.cpu().tolist()
        row_of = self._row_of
        rows_l = [[row_of.get(i, -1) if i >= 0 else -1 for i in qi] for qi in ids_l]
        rows = torch.tensor(rows_l, dtype=torch.int64, device=self.device).reshape(ids.shape)
        ok = rows >= 0
        if mask is not None:
            ok &= mask[rows.clamp(min=0)]
        if bool((ok.sum(dim=1) < pool).any()):
            return None, s
        s = self._finish_scores(s.to(self.device), qsq).masked_fill(~ok, _NEG_INF)
        ts, j = torch.topk(s, pool, dim=1)  # stable enough: the index's order among equal scores is kept
        return torch.gather(rows, 1, j), ts

    def _dedup_text(self, sc: torch.Tensor, rows: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Keep the best-scored candidate per distinct text (patterns without text are all distinct); the
        flag says whether every query kept ``target`` candidates (or ran out of candidates)."""
        B, P = rows.shape
        out_r = torch.full((B, P), -1, dtype=torch.int64, device=self.device)
        out_s = torch.full((B, P), _NEG_INF, device=self.device)
        full = True
        rows_l = rows.tolist()
        for b in range(B):
            seen: set[str] = set()
            keep: list[int] = []
            for j, r in enumerate(rows_l[b]):
                if r < 0:
                    break
                side = self._side[r]
                text = side.text if side is not None else None
                if text is not None:
                    if text in seen:
                        continue
                    seen.add(text)
                keep.append(j)
            got = len(keep)
            exhausted = P == 0 or rows_l[b][-1] < 0
            if got < target and not exhausted:
                full = False
            if keep:
                idx = torch.tensor(keep, dtype=torch.int64, device=self.device)
                out_r[b, :got] = rows[b, idx]
                out_s[b, :got] = sc[b, idx]
        return out_s, out_r, full

    def _similarities(self, qp: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Similarity ``[B, p]`` of each prepared query with its rows: the per-row scale of
        :meth:`_scores_prep` times the dot product (cosine or dot; a scored search refuses euclidean)."""
        if rows.numel() == 0:
            return torch.empty(rows.shape, device=self.device)
        scale, _ = self._scores_prep()
        e = self._emb[rows].float()  # [B, p, D]
        return torch.bmm(e, qp.float().unsqueeze(2)).squeeze(2) * scale[rows]

    def search_similar(self, query: Any, k: int) -> list[PatternSearchResult]:
        """The ``min(k, len)`` live patterns most similar to ``query`` ``[D]``, best first (rank 0-based)."""
        k = _check_k(k, "k")
        with self._lock:
            sims, ids = self._search_batch(query, k, "query")
            sims_l, ids_l = sims[0].tolist(), ids[0].tolist()
            row_of = self._row_of
            rows = [row_of[i] for i in ids_l if i >= 0]
            pats = self._result_patterns(rows, ids_l)
        out: list[PatternSearchResult] = []
        new = object.__new__
        for r, (p, s) in enumerate(zip(pats, sims_l)):
            # the dataclass's own __init__ + __post_init__, without their call overhead (score = similarity)
            res = new(PatternSearchResult)
            res.__dict__ = {"pattern": p, "similarity": s, "rank": r, "score": s}
            out.append(res)
        return out

    def _result_patterns(self, rows: list[int], ids: list[int]) -> list[Pattern]:
        """Patterns of search results at ``rows`` (ids ``ids``): :class:`_PatternView` copies, whose costly
        fields are built from a snapshot taken now only when read."""
        if not rows:
            return []
        if self.device.type == "cpu":
            ri = np.asarray(rows, dtype=np.int64)
            emb = self._emb.index_select(0, torch.from_numpy(ri))
            cache = self._np_cols
            if cache is None or cache[0] is not self._conf:  # the columns were reallocated
                cache = self._np_cols = (self._conf, [getattr(self, c).numpy() for c in _RESULT_COLUMNS])
            conf, usage, success, avgq, created, last, cat, outcome = (col[ri].tolist() for col in cache[1])
        else:
            idx = torch.tensor(rows, dtype=torch.int64, device=self.device)
            emb = self._emb.index_select(0, idx)
            conf, usage, success, avgq, created, last, cat, outcome = (
                getattr(self, c).index_select(0, idx).tolist() for c in _RESULT_COLUMNS
            )
        if emb.dtype != torch.float32:
            emb = emb.to(torch.float32)
        names, cats, side = self._cat_names, self._cat_objs, self._side
        out: list[Pattern] = []
        new = object.__new__
        for i, r in enumerate(rows):
            sd = side[r]
            assert sd is not None
            name = names[cat[i]]
            c = cats.get(name)
            if c is None:
                c = cats[name] = PatternCategory(name)
            v = new(_PatternView)
            object.__setattr__(v, "__dict__", {
                "id": ids[i], "uuid": sd.uuid, "category": c, "confidence": conf[i], "usage_count": usage[i],
                "success_count": success[i], "avg_quality": avgq[i], "text": sd.text, "outcome": OUTCOMES[outcome[i]],
                "_lz": (emb, i, created[i], last[i],
                        (sd._sources, sd._lessons, sd._actions, sd._tags, sd.source, sd.version, sd._attributes)),
            })
            out.append(v)
        return out

    @property
    def search_backend(self) -> Any:
        """The search backend object (:mod:`rbank_torch.backends`): ``active_kind``, ``stats()``, ``wait()``."""
        return self._backend

    def stats(self) -> PatternStats:
        with self._lock:
            self._flush()
            rows = self._live_rows()
            n = int(rows.numel())
            by_cat: dict[str, int] = {}
            if n:
                codes, counts = torch.unique(self._cat[rows], return_counts=True)
                by_cat = {self._cat_names[c]: int(k) for c, k in zip(codes.tolist(), counts.tolist())}
            return PatternStats(
                total_patterns=n,
                by_category=by_cat,
                avg_confidence=float(self._conf[rows].mean()) if n else 0.0,
                avg_usage=float(self._usage[rows].double().mean()) if n else 0.0,
                total_searches=self._total_searches,
                avg_search_latency_ms=self._search_time_ms / self._total_searches if self._total_searches else 0.0,
            )

    # ------------------------------------------------------------------ column access for bulk work
    def columns(self) -> dict[str, Any]:
        """Live rows as columns in ascending id order (copies): ``embedding [N, D]``, ``id``, ``confidence``,
        ``usage_count``, ``success_count``, ``avg_quality``, ``created_us``, ``last_accessed_us``,
        ``category_code`` ``[N]``; plus ``category_names`` (list, indexed by code)."""
        with self._lock:
            self._flush()
            rows = self._live_rows_by_id()
            return {
                "embedding": self._emb[rows],
                "id": self._ids[rows],
                "confidence": self._conf[rows],
                "usage_count": self._usage[rows],
                "success_count": self._success[rows],
                "avg_quality": self._avgq[rows],
                "created_us": self._created[rows],
                "last_accessed_us": self._last[rows],
                "category_code": self._cat[rows],
                "category_names": list(self._cat_names),
                "outcome_code": self._outcome[rows],
            }

    # ------------------------------------------------------------------ snapshots
    def state_tensors(self, prefix: str = "store/") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON metadata describing the whole store (used by :meth:`save` and the bank)."""
        import json

        from .snapshot import encode_strings

        with self._lock:
            self._flush()
            rows = self._live_rows_by_id()
            rl = rows.tolist()
            side = json.dumps([self._side[r].to_json() for r in rl], ensure_ascii=False)
            data, offs = encode_strings([side])
            t = {
                prefix + "embedding": self._emb[rows],
                prefix + "id": self._ids[rows],
                prefix + "confidence": self._conf[rows],
                prefix + "usage_count": self._usage[rows],
                prefix + "success_count": self._success[rows],
                prefix + "avg_quality": self._avgq[rows],
                prefix + "created_us": self._created[rows],
                prefix + "last_accessed_us": self._last[rows],
                prefix + "category_code": self._cat[rows],
                prefix + "outcome": self._outcome[rows],
                prefix + "side": data,
            }
            meta = {
                "config": self.config.to_dict(),
                "category_names": list(self._cat_names),
                "total_searches": self._total_searches,
                "search_time_ms": self._search_time_ms,
                "count": len(rl),
                "outcomes": True,  # the outcome column is present (snapshots before it had none)
            }
            # the approximate search index, labels mapped to positions of this saved order
            ann_t, ann_meta = self._backend.state_tensors(prefix, rows)
            if ann_meta:
                t.update(ann_t)
                meta["ann"] = ann_meta
            return t, meta

    @classmethod
    def from_state_tensors(
        cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = "store/", **overrides: Any
    ) -> PatternStore:
        """Rebuild a store from :meth:`state_tensors` output; raises SnapshotError on inconsistent data."""
        import json

        from ._util import bump_id_counter
        from .snapshot import SnapshotError, expect_tensor

        _check_overrides(overrides)
        try:
            cfg = PatternStoreConfig.from_dict(dict(meta["config"]))
            if "device" not in overrides:  # saved on a GPU, opened where none is usable: the CPU, with a warning
                cfg.device = loadable_device(cfg.device, "the pattern store")
            for k, v in overrides.items():
                setattr(cfg, k, v)
            cfg.validate()
            names = [str(x) for x in meta["category_names"]]
            count = int(meta["count"])
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotError(f"corrupt snapshot: bad pattern store metadata ({e})") from None
        D = cfg.embedding_dim
        emb = expect_tensor(tensors, prefix + "embedding", _DTYPES[cfg.dtype], (count, D))
        spec = {
            "id": torch.int64, "confidence": torch.float64, "usage_count": torch.int64, "success_count": torch.int64,
            "avg_quality": torch.float64, "created_us": torch.int64, "last_accessed_us": torch.int64,
            "category_code": torch.int32,
        }
        cols = {k: expect_tensor(tensors, prefix + k, dt, (count,)) for k, dt in spec.items()}
        side_raw = expect_tensor(tensors, prefix + "side", torch.uint8, (None,))
        try:
            side = json.loads(side_raw.numpy().tobytes().decode("utf-8"))
            if not isinstance(side, list) or len(side) != count:
                raise ValueError("side table length")
            sides = [_Side.from_json(j) for j in side]
        except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as e:
            raise SnapshotError(f"corrupt snapshot: bad pattern side table ({type(e).__name__}: {e})") from None
        codes = cols["category_code"]
        if count and (int(codes.min()) < 0 or int(codes.max()) >= len(names)):
            raise SnapshotError("corrupt snapshot: category code out of range")
        if prefix + "outcome" in tensors or meta.get("outcomes"):
            outcome = expect_tensor(tensors, prefix + "outcome", torch.int8, (count,))
            if count and (int(outcome.min()) < 0 or int(outcome.max()) >= len(OUTCOMES)):
                raise SnapshotError("corrupt snapshot: outcome code out of range")
        else:  # written before patterns kept their outcome: every pattern was a success
            outcome = torch.zeros(count, dtype=torch.int8)
        if len(set(cols["id"].tolist())) != count:
            raise SnapshotError("corrupt snapshot: duplicate pattern ids")
        if count and not bool(torch.isfinite(emb.float()).all()):
            raise SnapshotError("corrupt snapshot: non-finite embedding values")
        for nm in names:
            PatternCategory.parse(nm)
        store = cls(cfg)
        store._cat_names = names
        store._cat_codes = {n: i for i, n in enumerate(names)}
        store._grow(count)
        dev = store.device
        store._emb[:count] = emb.to(dev)
        store._norm[:count] = torch.linalg.vector_norm(emb.to(dev).float(), dim=1)
        store._ids[:count] = cols["id"].to(dev)
        store._conf[:count] = cols["confidence"].to(dev)
        store._usage[:count] = cols["usage_count"].to(dev)
        store._success[:count] = cols["success_count"].to(dev)
        store._avgq[:count] = cols["avg_quality"].to(dev)
        store._created[:count] = cols["created_us"].to(dev)
        store._last[:count] = cols["last_accessed_us"].to(dev)
        store._cat[:count] = codes.to(dev)
        store._outcome[:count] = outcome.to(dev)
        store._alive[:count] = True
        store._side = list(sides)
        store._index_rows(0, count)
        store._row_of = {pid: i for i, pid in enumerate(cols["id"].tolist())}
        store._n = count
        store._total_searches = int(meta.get("total_searches", 0))
        store._search_time_ms = float(meta.get("search_time_ms", 0.0))
        if count:
            bump_id_counter(int(cols["id"].max()))
        store._touch()
        store._backend.load_state(tensors, meta.get("ann"), prefix)
        return store

    def save(self, path: str | None = None) -> None:
        """Write the store to a safetensors snapshot, atomically (``config.storage_path`` when omitted)."""
        from .snapshot import write_snapshot

        path = path or self.config.storage_path
        if not path:
            raise ValueError("path must be given (or config.storage_path set)")
        t, meta = self.state_tensors()
        write_snapshot(path, "rbank_torch.store", t, meta)

    @classmethod
    def load(cls, path: str, **overrides: Any) -> PatternStore:
        """Load a store written by :meth:`save` (keyword overrides, e.g. ``device="cuda"``, are applied)."""
        from .snapshot import read_snapshot

        tensors, meta = read_snapshot(path, "rbank_torch.store")
        return cls.from_state_tensors(tensors, meta, **overrides)


def _ids_missing_as_minus_one(ids: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``ids`` with −1 where the score ``s`` is not finite (numpy on the CPU)."""
    if s.device.type == "cpu":
        return torch.from_numpy(np.where(np.isfinite(s.numpy()), ids.numpy(), -1))
    return torch.where(torch.isfinite(s), ids, torch.full_like(ids, -1))


def _any_missing(ids: torch.Tensor) -> bool:
    """Whether any of the ids ``[B]`` is −1 (numpy on the CPU: a torch reduction costs more here)."""
    if ids.device.type == "cpu":
        return bool((ids.numpy() < 0).any())
    return bool((ids < 0).any())


def _take(col: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``col[rows]`` for an index tensor of any shape, through ``index_select`` (advanced indexing costs
    hundreds of µs per call on some CPU builds, far more than the few values it gathers)."""
    if rows.numel() == 0:
        return rows
    return col.index_select(0, rows.reshape(-1)).view(rows.shape)


def _check_overrides(overrides: dict[str, Any]) -> None:
    """Load-time overrides must name PatternStoreConfig fields other than the embedding dimension."""
    from dataclasses import fields as _fields

    known = {f.name for f in _fields(PatternStoreConfig)} - {"embedding_dim", "dtype"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown load overrides {unknown}: expected PatternStoreConfig fields {sorted(known)} "
                         "(embedding_dim and dtype are fixed by the snapshot)")


def _check_k(k: Any, name: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        try:
            import numpy as np

            if isinstance(k, np.integer):
                k = int(k)
            else:
                raise TypeError
        except TypeError:
            raise ValueError(f"{name} must be a non-negative integer, got {k!r}") from None
    if k < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {k}")
    return k
