"""Search backends of the pattern store (SPEC §3, DESIGN "Search backends behind one small interface").

Backends, chosen by ``PatternStoreConfig.backend``:

- ``"exact"``: the store's blocked GEMM + top-k in torch (any device, exact).
- ``"faiss-hnsw"``: a CPU ``IndexHNSWFlat`` (inner product on unit vectors for cosine, inner product for
  dot, L2 for euclidean) with ``m`` / ``ef_construction`` / ``ef_search`` from the store config.
- ``"faiss-ivf"``: ``IndexIVFFlat`` trained on a sample (``nlist`` from the size, ``nprobe`` configurable);
  on a GPU when the store lives on CUDA and faiss sees a GPU.
- ``"faiss-flat"``: a flat faiss index (brute force; mostly useful on a GPU).
- ``"auto"`` (the default): exact on CUDA and below ``hnsw_min_rows`` live patterns, HNSW from there,
  IVF from ``ivf_min_rows``.

How an approximate backend stays correct:

- every index entry ("slot") maps to the pattern id it was built from; removing a pattern clears its
  slot's live bit, and dead slots are filtered at search time (``IDSelectorBitmap`` in the search
  parameters on CPU; over-fetching and filtering on GPU, whose indexes ignore selectors), so a removed
  pattern is never returned; the index is rebuilt when the store compacts or dead slots pass
  ``compact_dead_fraction``;
- new rows are not indexed at once: they sit in a buffer (the rows appended since the last absorption)
  searched exactly, and the index absorbs the buffer in batches of ``buffer_rows``; a search merges the
  ANN results over indexed rows with the exact results over the buffer, so a stored pattern is findable
  at once and ``store_pattern`` stays cheap;
- index work (build, absorption, rebuild) runs on a worker thread by default (``background``): searches
  keep using the previous index (or exact search) until the new one is ready; faiss calls run under a
  reader/writer lock of the index (exclusive on GPU, whose indexes are not thread-safe), and the faiss
  search itself runs outside the store lock when the caller does not hold it, so concurrent searches
  overlap (faiss releases the GIL);
- an index saved in a snapshot is derived data: on load its bytes are walked before faiss reads them (sizes
  bounded by the blob, ids in range), its vectors compared with the stored rows and a self-search probe run;
  an index failing any check is rebuilt from the rows (with a warning), never used.

``import rbank_torch`` never imports faiss: it is imported the first time an approximate index is needed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .store import PatternStore, PatternStoreConfig

__all__ = [
    "BACKENDS",
    "AUTO_HNSW_MIN_ROWS",
    "AUTO_IVF_MIN_ROWS",
    "BackendOptions",
    "MissingBackendError",
    "SearchBackend",
    "ExactBackend",
    "FaissBackend",
    "make_backend",
    "validate_backend",
    "import_faiss",
]

log = logging.getLogger(__name__)

#: names accepted by ``PatternStoreConfig.backend``
BACKENDS = ("auto", "exact", "faiss-hnsw", "faiss-ivf", "faiss-flat", "faiss-sq8")
_KIND_OF = {"faiss-hnsw": "hnsw", "faiss-ivf": "ivf", "faiss-flat": "flat", "faiss-sq8": "sq8"}

# NOTE: crossover measured on a 2-core EPYC at D = 768 (benchmarks/bench_search.py --crossover, see
# docs/search.md): HNSW (M 32, efC 200, ef 100) beats exact search on single queries at every measured size
# (from 1 000 rows) but on batches of 1 000 queries only from 20 000 rows (10 000: 7 530 vs 9 684 q/s;
# 20 000: 5 587 vs 3 967 q/s); auto switches where it wins on both.
#: live patterns from which ``backend="auto"`` uses HNSW on CPU
AUTO_HNSW_MIN_ROWS = 20_000
# NOTE: HNSW builds at ~0.8 ms per row here (80 s for 100 000 × 768) and holds the graph beside the
# vectors; IVF trains and adds ~20× faster, so past a few hundred thousand rows it is the practical choice.
#: live patterns from which ``backend="auto"`` uses IVF instead of HNSW
AUTO_IVF_MIN_ROWS = 500_000

_GPU_MAX_K = 2048  # faiss GPU limit on k (and nprobe)


class MissingBackendError(ImportError):
    """A backend needs a package that is not installed (the message names the extra to install)."""


@dataclass
class BackendOptions:
    """Tuning of the approximate backends (``PatternStoreConfig.backend_options``, a dict of these fields)."""

    #: buffered (not yet indexed) rows at which the index absorbs the buffer
    buffer_rows: int = 1024
    #: ``backend="auto"``: live patterns from which HNSW is used on CPU
    hnsw_min_rows: int = AUTO_HNSW_MIN_ROWS
    #: ``backend="auto"``: live patterns from which IVF is used instead of HNSW
    ivf_min_rows: int = AUTO_IVF_MIN_ROWS
    #: IVF lists (0: about 2·sqrt(rows), at most rows/39 so each list gets training points)
    nlist: int = 0
    #: IVF lists probed per query (0: nlist/8, at least 1)
    nprobe: int = 0
    #: build / absorb / rebuild on a worker thread (searches go on meanwhile); False: inline, deterministic
    background: bool = True
    #: rows added to the index per write-lock hold when absorbing in the background (bounds search stalls)
    absorb_chunk: int = 256
    #: ``faiss-sq8`` (and the interim index): candidates fetched per result, re-ranked exactly on the rows
    rerank: int = 4
    #: while a first HNSW / IVF index builds in the background, answer from a quickly built SQ8 scan of the
    #: same rows (candidates re-ranked exactly) instead of a full exact scan that competes with the build
    interim: bool = True
    #: OpenMP threads of a background build while the interim index answers (0: one, leaving the other
    #: cores to the searches; the build takes longer); later builds and absorptions use faiss's default
    interim_build_threads: int = 0

    @classmethod
    def from_config(cls, d: dict[str, Any] | None) -> BackendOptions:
        """Validated options from the config dict; raises ``ValueError`` naming the bad key."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"backend_options must be a dict or None, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"backend_options has unknown keys {unknown} (known: {sorted(known)})")
        o = cls(**d)
        for name in ("buffer_rows", "hnsw_min_rows", "ivf_min_rows", "absorb_chunk", "rerank"):
            v = getattr(o, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"backend_options[{name!r}] must be a positive integer, got {v!r}")
        for name in ("nlist", "nprobe", "interim_build_threads"):
            v = getattr(o, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"backend_options[{name!r}] must be a non-negative integer, got {v!r}")
        for name in ("background", "interim"):
            if not isinstance(getattr(o, name), bool):
                raise ValueError(f"backend_options[{name!r}] must be a bool, got {getattr(o, name)!r}")
        return o


def validate_backend(name: Any, options: Any) -> None:
    """Check ``PatternStoreConfig.backend`` / ``backend_options``; raises ``ValueError`` naming the field."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    BackendOptions.from_config(options)


def import_faiss(backend: str = "faiss-hnsw", gpu: bool = False) -> Any:
    """Import faiss for ``backend``; raises :class:`MissingBackendError` naming the extra when missing.

    Args:
        backend: the backend name (for the message).
        gpu: also require faiss with GPU support that sees at least one GPU.
    """
    try:
        import faiss  # noqa: PLC0415 - optional dependency, imported on first use
    except ImportError as e:
        extra = "gpu" if gpu else "faiss"
        raise MissingBackendError(
            f"backend {backend!r} needs the faiss package; install it with pip install 'rbank-torch[{extra}]'"
        ) from e
    if gpu and (not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1):
        raise MissingBackendError(
            f"backend {backend!r} on a CUDA store needs faiss with GPU support that sees a GPU; install it with "
            "pip install 'rbank-torch[gpu]' (faiss-gpu; uninstall faiss-cpu first)"
        )
    return faiss


def _faiss_present() -> bool:
    try:
        import_faiss()
    except MissingBackendError:
        return False
    return True


_gpu_res: dict[int, Any] = {}
_gpu_res_lock = threading.Lock()


def _gpu_resources(faiss: Any, device: int) -> Any:
    """One ``StandardGpuResources`` per GPU for the process (they hold scratch memory)."""
    with _gpu_res_lock:
        res = _gpu_res.get(device)
        if res is None:
            res = _gpu_res[device] = faiss.StandardGpuResources()
        return res


class _RWLock:
    """Readers/writer lock that prefers writers; ``exclusive`` makes readers exclusive too (GPU indexes)."""

    def __init__(self, exclusive: bool = False) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._exclusive = exclusive

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._waiting_writers or (self._exclusive and self._readers):
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    @contextmanager
    def read(self) -> Iterator[None]:
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# ---------------------------------------------------------------------------------------------- interface
class SearchBackend:
    """What the store tells its backend, and how it searches.

    The store calls the ``on_*`` hooks under its lock whenever rows change; row numbers are the store's
    column rows (``0 ≤ row < store._n``). :meth:`begin_search` returns None when the store's exact search
    must answer, or a plan whose :meth:`_SearchPlan.run` gives the results.
    """

    name = "exact"
    #: the index in use now ("exact", "hnsw", "ivf", "flat")
    active_kind = "exact"

    def on_append(self, a: int, b: int) -> None:
        """Rows ``[a, b)`` were appended."""

    def on_kill(self, rows: torch.Tensor) -> None:
        """Rows ``[r]`` (unique, previously alive) were tombstoned."""

    def on_compact(self, keep: torch.Tensor) -> None:
        """The columns were rewritten to hold only rows ``keep`` ``[m]`` (ascending) as rows ``0..m-1``."""

    def on_change(self, rows: torch.Tensor) -> None:
        """The embeddings of rows ``[r]`` (alive) were rewritten in place."""

    def prepare_queries(self, queries: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Validate and prepare raw queries on a fast path, or None to let the store do it (the default).

        Returns:
            (prepared queries ``[B, D]``, squared norms ``[B]``), as ``PatternStore._prepare_queries``.
        """
        return None

    def begin_search(self, qp: torch.Tensor, qsq: torch.Tensor, k: int, ef_scale: float = 1.0) -> _SearchPlan | None:
        """Start a search of prepared queries ``qp`` ``[B, D]`` (squared norms ``qsq`` ``[B]``); ``ef_scale``
        widens an HNSW walk (a filtered search over-fetches and needs the wider walk to keep its recall)."""
        return None

    def wait(self, absorb: bool = True, timeout: float | None = None) -> None:
        """Finish pending index work (and, with ``absorb``, index the buffer now)."""

    def stats(self) -> dict[str, Any]:
        """Counters and sizes of the backend (for tests, benchmarks and monitoring)."""
        return {"backend": self.name, "active": self.active_kind}

    def state_tensors(self, prefix: str, rows: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and metadata persisting the index for a snapshot of store rows ``rows`` (saved order)."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None, prefix: str) -> None:
        """Adopt the index of a snapshot just loaded into the store (rows in saved order)."""


class ExactBackend(SearchBackend):
    """The store's own exact search (nothing to maintain)."""

    def __init__(self, name: str = "exact") -> None:
        self.name = name


# ---------------------------------------------------------------------------------------------- faiss
class _Index:
    """One faiss index and the map of its slots (labels) to pattern ids."""

    def __init__(self, kind: str, index: Any, gpu: bool, built_rows: int, nlist: int = 0) -> None:
        self.kind = kind
        self.index = index
        self.gpu = gpu
        self.built_rows = built_rows
        self.nlist = nlist
        self.lock = _RWLock(exclusive=gpu)
        self.ntotal = 0  # slots reconciled (index.ntotal may be ahead while an absorption is in flight)
        self.ndead = 0
        self.slot_id = np.empty(0, dtype=np.int64)  # [cap] pattern id of each slot
        self.slot_live = np.zeros(0, dtype=np.bool_)  # [cap]
        self.version = 0
        self._bits: tuple[int, np.ndarray, Any] | None = None  # (version, packed bitmap, selector)
        self.params_cache: tuple[Any, Any, Any] | None = None  # (selector, params, efSearch)

    def reserve(self, n: int) -> None:
        if n <= self.slot_id.shape[0]:
            return
        cap = max(n, int(self.slot_id.shape[0] * 1.5) + 1024)
        sid = np.full(cap, -1, dtype=np.int64)
        sid[: self.ntotal] = self.slot_id[: self.ntotal]
        live = np.zeros(cap, dtype=np.bool_)
        live[: self.ntotal] = self.slot_live[: self.ntotal]
        self.slot_id, self.slot_live = sid, live

    def kill(self, slots: np.ndarray) -> None:
        slots = slots[self.slot_live[slots]]
        if slots.size:
            self.slot_live[slots] = False
            self.ndead += int(slots.size)
            self.version += 1

    def bitmap(self, faiss: Any) -> tuple[np.ndarray, Any]:
        """Live bits of the reconciled slots (little-endian bit order, as faiss reads them) and a CPU
        ``IDSelectorBitmap`` over them (None on GPU). Slots past the bitmap are not selected."""
        b = self._bits
        if b is None or b[0] != self.version:
            bits = np.packbits(self.slot_live[: self.ntotal], bitorder="little")
            sel = None if self.gpu else faiss.IDSelectorBitmap(bits.shape[0], faiss.swig_ptr(bits))
            b = self._bits = (self.version, bits, sel)
        return b[1], b[2]


class _Job:
    """Index work on a snapshot of some rows' vectors: build a new index, or absorb into the current one."""

    def __init__(self, op: str, kind: str, vectors: np.ndarray, base: int, ix: _Index | None) -> None:
        self.op = op  # "build" | "absorb"
        self.kind = kind
        self.vectors = vectors  # [m, D] float32, prepared for the index metric
        self.base = base  # first slot of the items (absorb)
        self.ix = ix  # the index absorbing (absorb)
        self.result: _Index | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.thread: threading.Thread | None = None
        self.finished = threading.Event()
        #: build: ids of the items (slot order), for the interim index
        self.ids: np.ndarray | None = None
        #: build: store rows when the job started (rows from there on are searched exactly beside the interim)
        self.n0 = 0
        #: build: an SQ8 index of the same items that answers (re-ranked) until the build is adopted
        self.interim: _Index | None = None
        self.want_interim = False
        #: build: rows were rewritten or compacted since the job started: the interim index is not used
        self.stale = False


class _SearchPlan:
    """A search started under the store lock; :meth:`run` does the faiss part (the index read lock is held
    from :meth:`FaissBackend.begin_search` until :meth:`run` returns) and merges it with the buffer part."""

    __slots__ = ("_ix", "_xq", "_qsq", "_k", "_kf", "_params", "_bits", "_buf", "_device", "_l2", "_keep", "rerank")

    def __init__(self, be: FaissBackend, ix: _Index, xq: np.ndarray, qsq: torch.Tensor, k: int, kf: int,
                 params: Any, bits: np.ndarray | None, buf: tuple[torch.Tensor, torch.Tensor] | None,
                 keep: tuple[Any, ...] = (), rerank: bool = False) -> None:
        #: the results are candidates (``k`` of them) for the store to re-rank exactly
        self.rerank = rerank
        self._ix, self._xq, self._qsq, self._k, self._kf = ix, xq, qsq, k, kf
        self._params, self._bits, self._buf = params, bits, buf
        self._keep = keep  # the selector and its bitmap: faiss holds raw pointers to them during the search
        self._device = be.device
        self._l2 = be.metric == "euclidean"

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (scores ``[B, k']``, ids ``[B, k']``) in the store's score space, best first, k' ≤ k."""
        ix = self._ix
        try:
            if self._params is None:
                D, I = ix.index.search(self._xq, self._kf)  # noqa: E741 - faiss names
            else:
                D, I = ix.index.search(self._xq, self._kf, params=self._params)  # noqa: E741
        finally:
            ix.lock.release_read()
            self._keep = ()
        buf = self._buf
        k = self._k
        if self._bits is None and buf is None and not self._l2 and I.shape[1] <= k and I.min() >= 0:
            # NOTE: the common case (CPU index, no buffer, every slot found) in a few µs: single queries
            # on a 100 000-row HNSW index take ~300 µs, so the wrapper's share must stay this small
            s = torch.from_numpy(D)
            ids_t = torch.from_numpy(ix.slot_id[I])
            if self._device.type != "cpu":
                s, ids_t = s.to(self._device), ids_t.to(self._device)
            return s, ids_t
        ok = I >= 0  # [B, kf]
        if self._bits is not None:  # GPU: drop dead slots ourselves (GPU indexes ignore selectors)
            bits = self._bits
            Ic = np.where(ok, I, 0)
            byte = Ic >> 3
            inb = byte < bits.shape[0]
            ok &= inb & (((bits[np.where(inb, byte, 0)] >> (Ic & 7)) & 1) == 1)
        all_ok = bool(ok.all())
        ids = ix.slot_id[I] if all_ok else np.where(ok, ix.slot_id[np.where(ok, I, 0)], -1)
        s = torch.from_numpy(D)
        if self._l2:
            s = self._qsq.to("cpu", torch.float32)[:, None] - s  # 2q·e − |e|² = |q|² − d²
        if not all_ok:
            s = s.masked_fill(torch.from_numpy(~ok), float("-inf"))
        ids_t = torch.from_numpy(ids)
        if buf is not None:
            s = torch.cat([s, buf[0].to("cpu")], dim=1)
            ids_t = torch.cat([ids_t, buf[1].to("cpu")], dim=1)
        if buf is not None or self._bits is not None:
            s, j = torch.topk(s, min(k, s.shape[1]), dim=1)
            ids_t = torch.gather(ids_t, 1, j)
        elif s.shape[1] > k:
            s, ids_t = s[:, :k], ids_t[:, :k]
        if self._device.type != "cpu":
            s, ids_t = s.to(self._device), ids_t.to(self._device)
        return s, ids_t


# ---------------------------------------------------------------------------------------------- index bytes
# A snapshot's index is derived data: it is checked against the stored rows before use and rebuilt from them
# when anything is off. faiss's reader trusts the sizes in its input (a 40 KB blob can make it allocate
# gigabytes) and its search trusts the graph / list ids (an id out of range reads out of bounds), so the blob
# is walked here first, in numpy, for the three layouts this module writes (faiss/impl/index_read.cpp):
#
#   index header: fourcc u32 | d i32 | ntotal i64 | 2 × dummy i64 | is_trained u8 | metric_type i32
#                 (| metric_arg f32 when metric_type > 1); a vector: count u64 then count items
#   "IxFI"/"IxF2"/"IxFl" (IndexFlat): header | codes as floats: count (= ntotal·d) u64, floats
#   "IHNf" (IndexHNSWFlat): header | assign_probas f64[] | cum_nneighbor_per_level i32[] | levels i32[]
#                 | offsets u64[] | neighbors i32[] | entry_point i32 | max_level i32 | efConstruction i32
#                 | efSearch i32 | unused i32 | storage (an IndexFlat)
#   "IwFl" (IndexIVFFlat): header | nlist u64 | nprobe u64 | quantizer (an IndexFlat) | direct map type u8,
#                 i64[] | "ilar" | nlist u64 | code_size u64 | "full" u64[nlist] sizes or "sprs" u64[]
#                 (list, size) pairs | per non-empty list: codes (size·code_size bytes), ids (size i64)
#
# Every count is checked against the expected shape and the bytes left before anything is read, so faiss
# is only handed a blob whose allocations are bounded by its length and whose ids are in range.

#: floats of index vectors compared one by one with the rows on load; larger indexes compare a sample
_VERIFY_ALL_FLOATS = 1 << 22
#: stored vectors compared with their rows (and IVF assignments checked) when the index is larger
_VERIFY_SAMPLE = 256
#: probe queries (live slots searched for themselves) on load; indexes up to this many live slots probe all
_PROBE_ALL = 512
_PROBE_SAMPLE = 64
_MAX_HNSW_LEVELS = 256


def _fourcc(s: str) -> int:
    b = s.encode("ascii")
    return b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24


_FLAT_CODES = {_fourcc("IxFI"), _fourcc("IxF2"), _fourcc("IxFl")}
_HNSW_FLAT = _fourcc("IHNf")
_IVF_FLAT = _fourcc("IwFl")


class _BlobReader:
    """Bounds-checked little-endian reads from a serialized faiss index (views, no copies)."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: np.ndarray) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, nbytes: int, what: str) -> np.ndarray:
        if nbytes < 0 or nbytes > self.buf.shape[0] - self.pos:
            raise ValueError(f"index bytes end inside {what} (needs {nbytes} bytes at offset {self.pos}, "
                             f"{self.buf.shape[0] - self.pos} left)")
        a = self.buf[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return a

    def scalar(self, dt: str, what: str) -> Any:
        return self.take(np.dtype(dt).itemsize, what).view(dt)[0].item()

    def array(self, dt: str, count: int, what: str) -> np.ndarray:
        return self.take(count * np.dtype(dt).itemsize, what).view(dt)

    def vector(self, dt: str, what: str, count: int | None = None, most: int | None = None) -> np.ndarray:
        """A faiss vector (u64 count, then the items); ``count``: the count it must hold, ``most``: at most."""
        c = self.scalar("<u8", what + " size")
        if count is not None and c != count:
            raise ValueError(f"{what} holds {c} items, expected {count}")
        if most is not None and c > most:
            raise ValueError(f"{what} holds {c} items, at most {most} expected")
        return self.array(dt, c, what)

    def header(self, fourccs: set[int], d: int, ntotal: int, metric: int, what: str) -> int:
        h = self.scalar("<u4", what + " type")
        if h not in fourccs:
            raise ValueError(f"{what} has type {h:#010x}, expected one of {sorted(fourccs)}")
        got_d = self.scalar("<i4", what + " d")
        got_n = self.scalar("<i8", what + " ntotal")
        self.take(16, what + " header")
        trained = self.scalar("<u1", what + " is_trained")
        got_metric = self.scalar("<i4", what + " metric")
        if (got_d, got_n, got_metric, trained) != (d, ntotal, metric, 1):
            raise ValueError(f"{what} header says {got_n} × {got_d}, metric {got_metric}, trained {trained}; "
                             f"expected {ntotal} × {d}, metric {metric}, trained")
        return h

    def flat(self, d: int, ntotal: int, metric: int, what: str) -> np.ndarray:
        """An IndexFlat: its vectors ``[ntotal, d]`` float32."""
        self.header(_FLAT_CODES, d, ntotal, metric, what)
        return self.vector("<f4", what + " vectors", count=ntotal * d).reshape(ntotal, d)


@dataclass
class _ParsedIndex:
    """What :func:`_parse_index` read: views of the stored vectors and, for IVF, of the lists and centroids."""

    kind: str
    ntotal: int
    blocks: list[np.ndarray]  # stored vectors ``[m, D]`` float32: one block in slot order, or one per IVF list
    block_of: np.ndarray | None = None  # ivf: block holding each slot
    row_of: np.ndarray | None = None  # ivf: row of its block holding each slot
    block_slots: list[np.ndarray] | None = None  # ivf: slot of each row of each block
    list_of: np.ndarray | None = None  # ivf: list of each slot
    centroids: np.ndarray | None = None  # ivf: ``[nlist, D]``

    def slot_vectors(self, slots: np.ndarray) -> np.ndarray:
        """Stored vectors of ``slots`` ``[m]`` → ``[m, D]`` float32 (a copy)."""
        if self.block_of is None or self.row_of is None:
            return np.ascontiguousarray(self.blocks[0][slots], dtype=np.float32)
        out = np.empty((slots.shape[0], self.blocks[0].shape[1] if self.blocks else 0), dtype=np.float32)
        for i, s in enumerate(slots.tolist()):
            out[i] = self.blocks[int(self.block_of[s])][int(self.row_of[s])]
        return out

    def chunks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(slots ``[m]``, their stored vectors ``[m, D]``) over every slot, about ``rows`` at a time."""
        if self.block_slots is None:
            v = self.blocks[0]
            for a in range(0, v.shape[0], rows):
                yield np.arange(a, min(a + rows, v.shape[0]), dtype=np.int64), v[a : a + rows]
            return
        i = 0
        while i < len(self.blocks):
            j, m = i, 0
            while j < len(self.blocks) and (m == 0 or m + self.blocks[j].shape[0] <= rows):
                m += self.blocks[j].shape[0]
                j += 1
            yield np.concatenate(self.block_slots[i:j]), np.concatenate(self.blocks[i:j])
            i = j


def _parse_index(blob: np.ndarray, kind: str, d: int, ntotal: int, metric: int, nlist: int) -> _ParsedIndex:
    """Walk a serialized index of ``kind`` (module comment above); raises ValueError naming what is wrong."""
    r = _BlobReader(blob)
    if kind == "flat":
        p = _ParsedIndex(kind, ntotal, [r.flat(d, ntotal, metric, "flat index")])
    elif kind == "hnsw":
        p = _parse_hnsw(r, d, ntotal, metric)
    elif kind == "ivf":
        p = _parse_ivf(r, d, ntotal, metric, nlist)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    if r.pos != blob.shape[0]:
        raise ValueError(f"{blob.shape[0] - r.pos} bytes follow the index")
    return p


def _parse_hnsw(r: _BlobReader, d: int, n: int, metric: int) -> _ParsedIndex:
    r.header({_HNSW_FLAT}, d, n, metric, "HNSW index")
    probas = r.vector("<f8", "HNSW level probabilities", most=_MAX_HNSW_LEVELS)
    cum = r.vector("<i4", "HNSW neighbours per level", count=probas.shape[0] + 1).astype(np.int64)
    # faiss's defaults for the graph's M (HNSW::set_default_probas): level l gets 2M (l = 0) or M links and
    # probability exp(-l·ln M)·(1 - 1/M); other values would let later inserts claim many links / levels
    m2 = int(cum[1]) if cum.shape[0] > 1 else 0
    if m2 < 4 or m2 % 2 or int(cum[0]) != 0 or (np.diff(cum[1:]) != m2 // 2).any():
        raise ValueError("HNSW neighbours per level are not 2M, M, M, ...")
    mult = 1.0 / math.log(m2 // 2)
    want = np.exp(-np.arange(probas.shape[0]) / mult) * (1.0 - math.exp(-1.0 / mult))
    if not np.allclose(probas, want, rtol=1e-4, atol=1e-12):  # NaN fails
        raise ValueError("HNSW level probabilities are not faiss's for the graph's M")
    levels = r.vector("<i4", "HNSW levels", count=n).astype(np.int64)
    if n and (int(levels.min()) < 1 or int(levels.max()) > cum.shape[0] - 1):
        raise ValueError(f"HNSW levels out of [1, {cum.shape[0] - 1}]")
    offsets = r.vector("<u8", "HNSW offsets", count=n + 1).astype(np.int64)
    if offsets[0] != 0 or (n and not np.array_equal(np.diff(offsets), cum[levels])):
        raise ValueError("HNSW offsets do not match the node levels")
    nb = r.vector("<i4", "HNSW neighbours", count=int(offsets[-1]))
    if nb.shape[0] and (int(nb.min()) < -1 or int(nb.max()) >= n):
        raise ValueError(f"HNSW neighbour ids out of [-1, {n})")
    entry = r.scalar("<i4", "HNSW entry point")
    max_level = r.scalar("<i4", "HNSW max level")
    r.take(12, "HNSW search settings")
    if n == 0:
        if entry != -1 or max_level != -1:
            raise ValueError("empty HNSW graph with an entry point")
    else:
        top = int(levels.max()) - 1
        if max_level != top or not 0 <= entry < n or int(levels[entry]) - 1 != top:
            raise ValueError(f"HNSW entry point {entry} / max level {max_level} do not match the graph")
        # upper levels: a node's neighbours at level L must exist at level L (its list there is read then)
        for lev in range(1, top + 1):
            nodes = np.nonzero(levels > lev)[0]
            width = int(cum[lev + 1] - cum[lev])
            if nodes.size == 0 or width == 0:
                continue
            at = (offsets[nodes] + int(cum[lev]))[:, None] + np.arange(width)
            ids = nb[at].astype(np.int64)
            ok = ids < 0
            ok |= levels[np.where(ok, 0, ids)] > lev
            if not ok.all():
                raise ValueError(f"HNSW level-{lev} neighbours that are not on level {lev}")
    return _ParsedIndex("hnsw", n, [r.flat(d, n, metric, "HNSW storage")])


def _parse_ivf(r: _BlobReader, d: int, n: int, metric: int, nlist: int) -> _ParsedIndex:
    r.header({_IVF_FLAT}, d, n, metric, "IVF index")
    got = r.scalar("<u8", "IVF nlist")
    nprobe = r.scalar("<u8", "IVF nprobe")
    if got < 1 or got > max(n, 1) or (nlist and got != nlist):
        raise ValueError(f"IVF index has {got} lists, expected {nlist or f'1..{max(n, 1)}'}")
    nlist = got
    if not 1 <= nprobe <= nlist:
        raise ValueError(f"IVF nprobe {nprobe} out of [1, {nlist}]")
    cent = r.flat(d, nlist, metric, "IVF quantizer")
    if r.scalar("<u1", "IVF direct map type") != 0:
        raise ValueError("IVF index with a direct map")
    r.vector("<i8", "IVF direct map", count=0)
    if r.scalar("<u4", "IVF lists type") != _fourcc("ilar"):
        raise ValueError("IVF lists are not array lists")
    code_size = 4 * d
    if r.scalar("<u8", "IVF lists nlist") != nlist or r.scalar("<u8", "IVF code size") != code_size:
        raise ValueError("IVF lists disagree with the index on nlist or code size")
    list_type = r.scalar("<u4", "IVF list sizes type")
    if list_type == _fourcc("full"):
        sizes = r.vector("<u8", "IVF list sizes", count=nlist).astype(np.int64)
    elif list_type == _fourcc("sprs"):
        pairs = r.vector("<u8", "IVF list sizes", most=2 * nlist)
        if pairs.shape[0] % 2:
            raise ValueError("IVF sparse list sizes of odd length")
        which = pairs[0::2]
        if (which >= nlist).any() or np.unique(which).shape[0] != which.shape[0]:
            raise ValueError("IVF sparse list sizes name a list out of range or twice")
        sizes = np.zeros(nlist, dtype=np.int64)
        cnt = pairs[1::2]
        if (cnt > n).any():
            raise ValueError("IVF list larger than the index")
        sizes[which.astype(np.int64)] = cnt.astype(np.int64)
    else:
        raise ValueError(f"IVF list sizes of unknown type {list_type:#010x}")
    if (sizes < 0).any() or (sizes > n).any() or int(sizes.sum()) != n:
        raise ValueError(f"IVF lists hold {int(sizes.clip(0, n).sum())} entries, the index {n}")
    if n * (code_size + 8) != r.buf.shape[0] - r.pos:
        raise ValueError("IVF list data does not fill the rest of the index bytes")
    codes: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    for s in sizes[sizes > 0].tolist():
        codes.append(r.array("<f4", s * d, "IVF list vectors").reshape(s, d))
        ids.append(r.array("<i8", s, "IVF list ids"))
    order = np.concatenate(ids).astype(np.int64) if ids else np.empty(0, dtype=np.int64)
    if order.shape[0] and (int(order.min()) < 0 or int(order.max()) >= n
                           or int(np.bincount(order, minlength=n).max()) != 1):
        raise ValueError("IVF list ids are not each slot once")
    nz = sizes[sizes > 0]
    block_of = np.empty(n, dtype=np.int64)
    block_of[order] = np.repeat(np.arange(nz.shape[0], dtype=np.int64), nz)
    row_of = np.empty(n, dtype=np.int64)
    row_of[order] = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(nz) - nz, nz)
    list_of = np.empty(n, dtype=np.int64)
    list_of[order] = np.repeat(np.arange(nlist, dtype=np.int64), sizes)
    return _ParsedIndex("ivf", n, codes, block_of=block_of, row_of=row_of,
                        block_slots=[i.astype(np.int64) for i in ids], list_of=list_of, centroids=cent)


def _meta_int(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    v = meta.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"index metadata {key!r} is {v!r}, not a non-negative integer")
    return v


def _sample(slots: np.ndarray, m: int) -> np.ndarray:
    """At most ``m`` of ``slots``, evenly spread (deterministic)."""
    if slots.size <= m:
        return slots
    return slots[np.unique(np.linspace(0, slots.size - 1, m).round().astype(np.int64))]


def _probe_slots(live_slots: np.ndarray) -> np.ndarray:
    return live_slots if live_slots.size <= _PROBE_ALL else _sample(live_slots, _PROBE_SAMPLE)


class FaissBackend(SearchBackend):
    """Approximate search through faiss (``auto``, ``faiss-hnsw``, ``faiss-ivf``, ``faiss-flat``).

    Args:
        store: the owning store (its lock guards every method; :meth:`_SearchPlan.run` runs outside it).
    """

    def __init__(self, store: PatternStore) -> None:
        cfg: PatternStoreConfig = store.config
        self.store = store
        self.name = cfg.backend
        self.opts = BackendOptions.from_config(cfg.backend_options)
        self.metric = cfg.distance_metric
        self.dim = cfg.embedding_dim
        self.device = store.device
        self.forced = _KIND_OF.get(cfg.backend)  # None for auto
        self.gpu = self.device.type == "cuda" and self.forced in ("ivf", "flat")
        self.gpu_id = (self.device.index or 0) if self.gpu else -1
        if self.forced is not None:
            import_faiss(cfg.backend, gpu=self.gpu)  # fail fast, naming the extra
        self._faiss: Any = None
        self._ix: _Index | None = None
        self._job: _Job | None = None
        self._rebuild = False
        self._failed = False
        self._warned_missing = False
        self._n = 0  # rows the store holds (mirror of store._n)
        self._row_slot = np.full(0, -1, dtype=np.int64)  # [cap] slot of each row in the index, -1: buffered
        self._row_job = np.full(0, -1, dtype=np.int64)  # [cap] item of the in-flight job holding the row
        self._tail = 0  # rows >= tail are all buffered
        self._loose = np.empty(0, dtype=np.int64)  # buffered rows below tail (sorted)
        self.counters = {"builds": 0, "absorbs": 0, "loads": 0, "load_rejects": 0, "build_seconds": 0.0}

    # ------------------------------------------------------------------ helpers
    @property
    def active_kind(self) -> str:  # type: ignore[override]
        ix = self._ix
        return ix.kind if ix is not None and self._use_index() else "exact"

    def _fa(self) -> Any:
        if self._faiss is None:
            self._faiss = import_faiss(self.name, gpu=self.gpu)
        return self._faiss

    def _reserve_rows(self, n: int) -> None:
        if n <= self._row_slot.shape[0]:
            return
        cap = max(n, int(self._row_slot.shape[0] * 1.25) + 1024)
        for name in ("_row_slot", "_row_job"):
            old = getattr(self, name)
            new = np.full(cap, -1, dtype=np.int64)
            new[: self._n] = old[: self._n]
            setattr(self, name, new)

    def _live_count(self) -> int:
        return self.store._n - self.store._dead

    def _wanted(self) -> str | None:
        """The index kind the configuration asks for now (None: exact search)."""
        if self._failed:
            return None
        if self.forced is not None:
            return self.forced
        if self.device.type == "cuda":
            return None
        n = self._live_count()
        if n < self.opts.hnsw_min_rows:
            return None
        if self._faiss is None and not _faiss_present():
            if not self._warned_missing:
                self._warned_missing = True
                log.warning("pattern store past %d patterns uses exact search: install 'rbank-torch[faiss]' "
                            "for approximate search", self.opts.hnsw_min_rows)
            return None
        return "ivf" if n >= self.opts.ivf_min_rows else "hnsw"

    def _use_index(self) -> bool:
        if self._failed or self._ix is None:
            return False
        if self.forced is not None:
            return True
        return self.device.type != "cuda" and self._live_count() >= self.opts.hnsw_min_rows

    def _prepared(self, rows: np.ndarray) -> np.ndarray:
        """Index vectors of store rows ``[m]`` → ``[m, D]`` float32 (unit rows for cosine; 0 for zero rows)."""
        st = self.store
        idx = torch.from_numpy(rows).to(st.device)
        e = st._emb[idx].to(torch.float32)
        if self.metric == "cosine":
            nrm = st._norm[idx]
            e = e * torch.where(nrm > 1e-8, 1.0 / nrm.clamp(min=1e-30), torch.zeros_like(nrm))[:, None]
        return np.ascontiguousarray(e.cpu().numpy())

    def _faiss_metric(self) -> int:
        fa = self._fa()
        return fa.METRIC_L2 if self.metric == "euclidean" else fa.METRIC_INNER_PRODUCT

    def _buffer_count(self) -> int:
        return int(self._loose.size) + max(0, self._n - self._tail)

    def _recompute_buffer(self) -> None:
        n = self._n
        indexed = np.nonzero(self._row_slot[:n] >= 0)[0]
        self._tail = int(indexed[-1]) + 1 if indexed.size else 0
        if self._tail:
            alive = self.store._alive[: self._tail].cpu().numpy()
            self._loose = np.nonzero((self._row_slot[: self._tail] < 0) & alive)[0].astype(np.int64)
        else:
            self._loose = np.empty(0, dtype=np.int64)

    # ------------------------------------------------------------------ hooks (under the store lock)
    def on_append(self, a: int, b: int) -> None:
        self._reserve_rows(b)
        self._row_slot[a:b] = -1
        self._row_job[a:b] = -1
        self._n = b
        if self._ix is not None or self._buffer_count() >= self.opts.buffer_rows:
            self._maintain()

    def on_kill(self, rows: torch.Tensor) -> None:
        r = rows.cpu().numpy().astype(np.int64, copy=False)
        self._row_job[r] = -1
        slots = self._row_slot[r]
        slots = slots[slots >= 0]
        if self._ix is not None and slots.size:
            self._ix.kill(slots)

    def on_compact(self, keep: torch.Tensor) -> None:
        if self._job is not None:
            self._job.stale = True
        k = keep.cpu().numpy().astype(np.int64, copy=False)
        m = int(k.size)
        self._row_slot[:m] = self._row_slot[k]
        self._row_job[:m] = self._row_job[k]
        self._row_slot[m : self._n] = -1
        self._row_job[m : self._n] = -1
        self._n = m
        self._recompute_buffer()
        if self._ix is not None and self._ix.ndead:
            self._rebuild = True
        self._maintain()

    def on_change(self, rows: torch.Tensor) -> None:
        if self._job is not None:
            self._job.stale = True
        r = rows.cpu().numpy().astype(np.int64, copy=False)
        self._row_job[r] = -1
        slots = self._row_slot[r]
        if self._ix is not None:
            self._ix.kill(slots[slots >= 0])
        self._row_slot[r] = -1
        low = r[r < self._tail]
        if low.size:
            self._loose = np.union1d(self._loose, low).astype(np.int64)

    # ------------------------------------------------------------------ index work
    def _maintain(self) -> None:
        """Adopt a finished job; start the next one the store needs (under the store lock)."""
        job = self._job
        if job is not None:
            if not job.finished.is_set():
                return
            self._reconcile(job)
        want = self._wanted()
        ix = self._ix
        if want is None:
            if ix is not None and self.forced is None and (
                self._failed or self._live_count() < self.opts.hnsw_min_rows // 2
            ):
                self._drop_index()
            return
        n_live = self._live_count()
        if n_live == 0:
            return
        if (
            ix is None
            or ix.kind != want
            or self._rebuild
            or ix.ndead > self.store.config.compact_dead_fraction * max(ix.ntotal, 1)
            or (ix.kind == "ivf" and n_live > 4 * max(ix.built_rows, 1))
            or (ix.gpu and ix.ndead > _GPU_MAX_K // 2)
        ):
            self._start_build(want)
        elif self._buffer_count() >= self.opts.buffer_rows:
            self._start_absorb()

    def _drop_index(self) -> None:
        self._ix = None
        self._row_slot[: self._n] = -1
        self._recompute_buffer()

    def _start_build(self, kind: str) -> None:
        self._rebuild = False
        rows = torch.nonzero(self.store._alive[: self._n]).flatten().cpu().numpy().astype(np.int64)
        self._row_job[: self._n] = -1
        self._row_job[rows] = np.arange(rows.size, dtype=np.int64)
        job = _Job("build", kind, self._prepared(rows), 0, None)
        if (self.opts.interim and kind in ("hnsw", "ivf") and self._ix is None and self.opts.background
                and not self.gpu):
            job.want_interim = True
            job.ids = self.store._ids[torch.from_numpy(rows).to(self.device)].cpu().numpy()
            job.n0 = self._n
        self._launch(job)

    def _start_absorb(self) -> None:
        ix = self._ix
        assert ix is not None
        tail = np.arange(self._tail, self._n, dtype=np.int64)
        rows = np.concatenate([self._loose, tail]) if self._loose.size else tail
        if rows.size:
            rows = rows[self.store._alive[torch.from_numpy(rows).to(self.device)].cpu().numpy()]
        if rows.size == 0:
            return
        self._row_job[: self._n] = -1
        self._row_job[rows] = np.arange(rows.size, dtype=np.int64)
        self._launch(_Job("absorb", ix.kind, self._prepared(rows), ix.ntotal, ix))

    def _launch(self, job: _Job) -> None:
        self._job = job
        if self.opts.background and not self.gpu:
            t = threading.Thread(target=self._work, args=(job,), name="rbank-index", daemon=True)
            job.thread = t
            t.start()
        else:
            self._work(job)
            self._reconcile(job)

    def _work(self, job: _Job) -> None:
        """The faiss part of a job (worker thread or inline); never takes the store lock."""
        t0 = time.perf_counter()
        try:
            if job.op == "build":
                if job.want_interim and job.ids is not None:
                    # NOTE: OpenMP's thread count is per calling thread: this limits the worker's build only.
                    # A build on every core leaves single queries of the interim index one core short (and
                    # slower than an exact scan on a quiet machine); with one thread they keep a core.
                    self._fa().omp_set_num_threads(self.opts.interim_build_threads or 1)
                    iix = self._build_index("sq8", job.vectors)
                    m = int(job.ids.size)
                    iix.reserve(m)
                    iix.slot_id[:m] = job.ids
                    iix.slot_live[:m] = True
                    iix.ntotal = m
                    job.interim = iix  # published: searches use it from now on
                job.result = self._build_index(job.kind, job.vectors)
            else:
                ix = job.ix
                assert ix is not None
                m = job.vectors.shape[0]
                step = m if ix.gpu or not self.opts.background else self.opts.absorb_chunk
                for a in range(0, m, step):
                    with ix.lock.write():
                        ix.index.add(job.vectors[a : a + step])
        except BaseException as e:  # noqa: BLE001 - reported at reconciliation; the store falls back to exact
            job.error = e
        finally:
            job.seconds = time.perf_counter() - t0
            job.vectors = np.empty((0, self.dim), dtype=np.float32)
            job.finished.set()

    def _build_index(self, kind: str, x: np.ndarray) -> _Index:
        """A new index of ``kind`` over ``x`` ``[m, D]`` (slots 0..m-1)."""
        fa = self._fa()
        cfg = self.store.config
        m, d = x.shape
        metric = self._faiss_metric()
        nlist = 0
        if kind == "hnsw":
            index = fa.IndexHNSWFlat(d, cfg.m, metric)
            index.hnsw.efConstruction = cfg.ef_construction
            index.hnsw.efSearch = cfg.ef_search
            index.add(x)
        elif kind == "sq8":
            # 8 bits per value (per-dimension ranges trained on a sample); results are re-ranked exactly
            index = fa.IndexScalarQuantizer(d, fa.ScalarQuantizer.QT_8bit, metric)
            sample = x
            if m > 65_536:
                sample = x[np.sort(np.random.default_rng(0).choice(m, 65_536, replace=False))]
            index.train(sample)
            index.add(x)
        elif kind == "flat":
            index = fa.index_factory(d, "Flat", metric)
            if self.gpu:
                index = fa.index_cpu_to_gpu(_gpu_resources(fa, self.gpu_id), self.gpu_id, index)
            index.add(x)
        else:
            nlist = self.opts.nlist or int(round(2.0 * math.sqrt(m)))
            nlist = max(1, min(nlist, m // 39))
            index = fa.index_factory(d, f"IVF{nlist},Flat", metric)
            if self.gpu:
                index = fa.index_cpu_to_gpu(_gpu_resources(fa, self.gpu_id), self.gpu_id, index)
            sample = x
            if m > 40 * nlist:
                pick = np.random.default_rng(0).choice(m, 40 * nlist, replace=False)
                sample = x[np.sort(pick)]
            index.train(sample)
            index.add(x)
            self._set_nprobe(index, nlist)
        return _Index(kind, index, self.gpu, m, nlist)

    def _nprobe(self, nlist: int) -> int:
        p = self.opts.nprobe or max(1, math.ceil(nlist / 8))
        return max(1, min(p, nlist, _GPU_MAX_K))

    def _set_nprobe(self, index: Any, nlist: int) -> None:
        p = self._nprobe(nlist)
        try:
            index.nprobe = p
        except AttributeError:  # GPU wrappers without the attribute
            index.setNumProbes(p)

    def _reconcile(self, job: _Job) -> None:
        """Adopt a finished job (under the store lock): map its items to the rows still holding them."""
        self._job = None
        n = self._n
        rows = np.nonzero(self._row_job[:n] >= 0)[0]
        items = self._row_job[rows]
        self._row_job[:n] = -1
        if job.error is not None:
            self._failed = True
            self._drop_index()
            log.warning("search index %s (%s) failed; the store falls back to exact search: %r",
                        job.op, job.kind, job.error)
            return
        ids = self.store._ids[torch.from_numpy(rows).to(self.device)].cpu().numpy()
        if job.op == "build":
            ix = job.result
            assert ix is not None
            total = int(ix.index.ntotal)
            ix.reserve(total)
            ix.slot_live[:total] = False
            ix.slot_id[items] = ids
            ix.slot_live[items] = True
            ix.ntotal = total
            ix.ndead = total - int(items.size)
            self._row_slot[:n] = -1
            self._row_slot[rows] = items
            self._ix = ix
            self.counters["builds"] += 1
            self.counters["build_seconds"] += job.seconds
        else:
            ix = job.ix
            assert ix is not None and ix is self._ix
            m = int(ix.index.ntotal) - job.base
            ix.reserve(job.base + m)
            slots = job.base + items
            ix.slot_id[slots] = ids
            ix.slot_live[job.base : job.base + m] = False
            ix.slot_live[slots] = True
            ix.ndead += m - int(items.size)
            ix.ntotal = job.base + m
            ix.version += 1
            self._row_slot[rows] = slots
            self.counters["absorbs"] += 1
        self._recompute_buffer()

    def wait(self, absorb: bool = True, timeout: float | None = None) -> None:
        """Finish pending index work: start what the store needs (with ``absorb``, index the whole buffer
        too), wait for it and adopt it. Takes the store lock itself (waits outside it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        st = self.store
        while True:
            with st._lock:
                st._flush()
                self._maintain()
                if (absorb and self._job is None and self._ix is not None and self._wanted() is not None
                        and self._buffer_count()):
                    self._start_absorb()
                job = self._job
                if job is None:
                    return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("search index work did not finish in time")
            job.finished.wait(left)

    # ------------------------------------------------------------------ search
    def _buffer_search(self, qp: torch.Tensor, k: int,
                       start: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Exact top-k over the buffered rows (``start``: over rows ``start..n`` instead): (scores ``[B, k_b]``,
        ids ``[B, k_b]``), or None when empty."""
        st = self.store
        n, t = self._n, self._tail if start is None else start
        parts: list[torch.Tensor] = []
        if self._loose.size and start is None:
            parts.append(torch.from_numpy(self._loose).to(st.device))
        if n > t:
            parts.append(torch.arange(t, n, device=st.device))
        if not parts:
            return None
        if len(parts) == 1 and (start is not None or not self._loose.size):
            E, nrm, alive, rows = st._emb[t:n], st._norm[t:n], st._alive[t:n], parts[0]
        else:
            rows = torch.cat(parts)
            E, nrm, alive = st._emb[rows], st._norm[rows], st._alive[rows]
        s = torch.mm(qp, E.T)  # [B, nb]
        if s.dtype != torch.float32:
            s = s.float()
        if self.metric == "cosine":
            s.mul_(torch.where(nrm > 1e-8, 1.0 / nrm.clamp(min=1e-30), torch.zeros_like(nrm)))
        elif self.metric == "euclidean":
            s.mul_(2.0).sub_(nrm * nrm)
        s.masked_fill_(~alive, float("-inf"))
        ts, ti = torch.topk(s, min(k, s.shape[1]), dim=1)
        flat = rows.index_select(0, ti.reshape(-1))
        ids = torch.where(torch.isfinite(ts), st._ids.index_select(0, flat).view(ti.shape), torch.full_like(ti, -1))
        return ts, ids

    def prepare_queries(self, queries: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fast path for what single queries mostly are: CPU float32 tensors or arrays ``[B, D]`` / ``[D]``
        with finite, non-tiny rows, searched through a CPU index of a float32 CPU store. Anything else
        (including every invalid input, so that the store raises its usual error) returns None."""
        # NOTE: the store's torch path (validation, norm, scaling) costs ~20 µs per call on this CPU; this
        # numpy path ~6 µs, which keeps the wrapper within 10 % of raw faiss HNSW on single queries.
        ix = self._ix
        if ix is None or ix.gpu or self.store.dtype != torch.float32 or not self._use_index():
            return None
        return fast_prepare(queries, self.dim, self.metric)

    def begin_search(self, qp: torch.Tensor, qsq: torch.Tensor, k: int, ef_scale: float = 1.0) -> _SearchPlan | None:
        self._maintain()
        ix = self._ix
        if ix is None and k > 0:
            return self._interim_search(qp, qsq, k)
        if ix is None or not self._use_index() or k == 0:
            return None
        fa = self._fa()
        job = self._job
        absorbing = job is not None and job.op == "absorb"
        live = ix.ntotal - ix.ndead
        if live <= 0:
            return None
        if ix.gpu:
            kf = min(k + ix.ndead, ix.ntotal)
            if kf > _GPU_MAX_K:
                return None
        else:
            kf = min(k, max(live, 1))
        params = None
        bits = None
        filtered = ix.ndead > 0 or absorbing
        keep: tuple[Any, ...] = ()
        if ix.gpu:
            if filtered:
                bits, _ = ix.bitmap(fa)
        else:
            sel = None
            if filtered:
                sel_bits, sel = ix.bitmap(fa)
                keep = (sel_bits, sel)
            params = self._params(ix, sel, ef_scale)
        rerank = ix.kind == "sq8"
        if rerank:
            kf = min(live, max(k * self.opts.rerank, k + 16))
        buf = self._buffer_search(qp, kf if rerank else k)
        ix.lock.acquire_read()
        return _SearchPlan(self, ix, self._query_array(qp), qsq, kf if rerank else k, kf, params, bits, buf, keep,
                           rerank=rerank)

    @staticmethod
    def _query_array(qp: torch.Tensor) -> np.ndarray:
        q32 = qp if qp.dtype == torch.float32 else qp.float()
        return np.ascontiguousarray(q32.cpu().numpy()) if q32.device.type != "cpu" else q32.contiguous().numpy()

    def _interim_search(self, qp: torch.Tensor, qsq: torch.Tensor, k: int) -> _SearchPlan | None:
        """A plan on the interim SQ8 index of the first build (candidates for an exact re-rank), or None."""
        job = self._job
        if job is None or job.op != "build" or job.stale or job.finished.is_set() or not self._use_index():
            return None
        iix = job.interim
        if iix is None or iix.ntotal == 0:
            return None
        kf = min(iix.ntotal, max(k * self.opts.rerank, k + 16))
        buf = self._buffer_search(qp, kf, start=job.n0) if self._n > job.n0 else None
        iix.lock.acquire_read()
        return _SearchPlan(self, iix, self._query_array(qp), qsq, kf, kf, None, None, buf, rerank=True)

    def _params(self, ix: _Index, sel: Any, ef_scale: float = 1.0) -> Any:
        """Search parameters for a CPU index (efSearch × ``ef_scale`` / nprobe from the config, the dead-slot
        selector)."""
        fa = self._fa()
        cached = ix.params_cache
        # keyed by the selector and efSearch: a changed config.ef_search takes effect at the next search
        ef = max(1, int(round(self.store.config.ef_search * max(1.0, ef_scale))))
        if cached is not None and cached[0] is sel and cached[2] == ef:
            return cached[1]
        if ix.kind == "hnsw":
            p = fa.SearchParametersHNSW()
            p.efSearch = ef
        elif ix.kind == "ivf":
            p = fa.SearchParametersIVF()
            p.nprobe = self._nprobe(ix.nlist)
        else:  # flat, sq8
            if sel is None:
                return None
            p = fa.SearchParameters()
        if sel is not None:
            p.sel = sel
        ix.params_cache = (sel, p, ef)
        return p

    # ------------------------------------------------------------------ snapshots
    def _checksum(self, rows_by_slot: torch.Tensor, slot_pos: np.ndarray) -> str:
        """blake2b of the embeddings (store dtype bytes) of the indexed rows in slot order, and the slot map."""
        h = hashlib.blake2b(digest_size=16)
        e = self.store._emb[rows_by_slot.to(self.device)].cpu().contiguous()
        if e.numel():
            h.update(e.view(torch.uint8).numpy().data)
        h.update(np.ascontiguousarray(slot_pos, dtype="<i8").tobytes())
        return h.hexdigest()

    def state_tensors(self, prefix: str, rows: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        job = self._job
        if job is not None:
            job.finished.wait()
            self._maintain()
            job = self._job
            if job is not None:  # a new job was started: save the index as it is, without it
                job.finished.wait()
                self._reconcile(job)
        ix = self._ix
        if ix is None or ix.kind == "sq8":  # an SQ8 scan is rebuilt from the rows in moments: not saved
            return {}, {}
        fa = self._fa()
        n = self._n
        r = rows.cpu().numpy().astype(np.int64)
        pos_of_row = np.full(n, -1, dtype=np.int64)
        pos_of_row[r] = np.arange(r.size, dtype=np.int64)
        slot_pos = np.full(ix.ntotal, -1, dtype=np.int64)
        indexed = np.nonzero(self._row_slot[:n] >= 0)[0]
        slot_pos[self._row_slot[indexed]] = pos_of_row[indexed]
        live_slots = np.nonzero(slot_pos >= 0)[0]
        probe: dict[str, Any] | None = None
        with ix.lock.read():
            cpu_index = fa.index_gpu_to_cpu(ix.index) if ix.gpu else ix.index
            blob = fa.serialize_index(cpu_index)
            try:
                parsed = _parse_index(np.asarray(blob, dtype=np.uint8), ix.kind, self.dim, int(ix.ntotal),
                                      self._faiss_metric(), int(ix.nlist))
            except ValueError as e:  # a faiss release writing another layout: loads will rebuild the index
                log.warning("search index serialized in a layout the snapshot loader does not accept (%s); "
                            "it will be rebuilt on load", e)
            else:
                if ix.kind == "hnsw" and live_slots.size:
                    # NOTE: HNSW search is approximate: even an intact graph may not find a row from itself
                    # (a few in 10 000 at m = 32, more at small m). What this index answers to its probe
                    # queries is recorded so that the load can tell "intact" from "damaged" exactly.
                    slots = _probe_slots(live_slots)
                    ef = self._probe_ef()
                    _, got = self._probe_search(cpu_index, "hnsw", slot_pos >= 0,
                                                parsed.slot_vectors(slots), ef, 0)
                    probe = {"ef": ef, "slots": slots.tolist(), "labels": got.tolist()}
        rows_by_slot = torch.from_numpy(r[slot_pos[live_slots]])
        meta = {
            "kind": ix.kind,
            "metric": self.metric,
            "dim": self.dim,
            "ntotal": int(ix.ntotal),
            "built_rows": int(ix.built_rows),
            "nlist": int(ix.nlist),
            "checksum": self._checksum(rows_by_slot, slot_pos),
        }
        if probe is not None:
            meta["probe"] = probe
        t = {prefix + "ann/index": torch.from_numpy(np.asarray(blob, dtype=np.uint8).copy()),
             prefix + "ann/slot_pos": torch.from_numpy(slot_pos)}
        return t, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None, prefix: str) -> None:
        n = self.store._n
        self._reserve_rows(n)
        self._n = n
        self._row_slot[:n] = -1
        self._row_job[:n] = -1
        self._recompute_buffer()
        if not meta:
            return
        kind = meta.get("kind") if isinstance(meta, dict) else None
        usable = {"hnsw", "ivf"} if self.forced is None else {self.forced}
        if self.forced is None and self.device.type == "cuda":
            usable = set()
        if not isinstance(kind, str) or kind not in usable:
            log.info("snapshot search index (%s) not used by backend %r; it will be rebuilt as needed",
                     kind if isinstance(kind, str) else type(kind).__name__, self.name)
            return
        try:
            ix, pos, live_slots = self._load_index(tensors, meta, prefix)
        except Exception as e:  # noqa: BLE001 - derived data: whatever is wrong with it, rebuild it from the rows
            # NOTE: MemoryError included (faiss allocating what a hostile size field asks for would raise it;
            # the checks before deserialization are meant to make that unreachable)
            self.counters["load_rejects"] += 1
            why = str(e) if type(e) is ValueError else f"{type(e).__name__}: {e}"
            msg = f"search index in the snapshot is unusable ({why}); rebuilding it from the stored rows"
            log.warning("%s", msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            return
        self._row_slot[pos] = live_slots
        self._ix = ix
        self.counters["loads"] += 1
        self._recompute_buffer()

    def _load_index(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    prefix: str) -> tuple[_Index, np.ndarray, np.ndarray]:
        """The snapshot's index, checked against the rows; raises (ValueError mostly) when it must be rebuilt.

        Returns:
            (the index, saved positions ``[m]`` of the indexed live rows, their slots ``[m]``).
        """
        fa = self._fa()
        n = self._n
        blob_t = tensors.get(prefix + "ann/index")
        slot_pos_t = tensors.get(prefix + "ann/slot_pos")
        if blob_t is None or slot_pos_t is None:
            raise ValueError("index tensors missing")
        if (blob_t.dtype != torch.uint8 or slot_pos_t.dtype != torch.int64 or blob_t.dim() != 1
                or slot_pos_t.dim() != 1):
            raise ValueError("index tensors of the wrong dtype or shape")
        kind = str(meta["kind"])
        ntotal = _meta_int(meta, "ntotal")
        nlist = _meta_int(meta, "nlist", 0)
        built_rows = _meta_int(meta, "built_rows", ntotal)
        if meta.get("metric") != self.metric or _meta_int(meta, "dim") != self.dim:
            raise ValueError(f"index metric/dim {meta.get('metric')}/{meta.get('dim')} differ from the store's")
        slot_pos = slot_pos_t.cpu().numpy().astype(np.int64)
        if slot_pos.shape[0] != ntotal:
            raise ValueError(f"slot map holds {slot_pos.shape[0]} slots, index metadata says {ntotal}")
        live_slots = np.nonzero(slot_pos >= 0)[0]
        pos = slot_pos[live_slots]
        if pos.size and (int(pos.max()) >= n or np.unique(pos).size != pos.size):
            raise ValueError("slot map points outside the rows or twice at one row")
        if self._checksum(torch.from_numpy(pos), slot_pos) != meta.get("checksum"):
            raise ValueError("checksum of the indexed rows differs")
        # 1. bound the work before faiss sees a byte: plausible size, then every field and count walked
        blob = np.ascontiguousarray(blob_t.cpu().numpy())
        lo, hi = ntotal * self.dim * 4, self._blob_limit(kind, ntotal, nlist)
        if not lo <= blob.shape[0] <= hi:
            raise ValueError(f"index of {blob.shape[0]} bytes cannot hold {ntotal} × {self.dim} ({kind}: "
                             f"{lo} to {hi} bytes)")
        metric = self._faiss_metric()
        parsed = _parse_index(blob, kind, self.dim, ntotal, metric, nlist)
        # 2. the stored vectors are the rows' (all of them up to a size, a sample beyond)
        self._verify_vectors(parsed, slot_pos, live_slots)
        # 3. deserialize; whatever faiss raises (its errors, MemoryError) means the same: rebuild
        try:
            index = fa.deserialize_index(blob)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"faiss cannot read it ({type(e).__name__}: {e})") from None
        self._check_structure(index, kind, ntotal)
        if kind == "hnsw":
            index.hnsw.efSearch = self.store.config.ef_search
            index.hnsw.efConstruction = self.store.config.ef_construction
        if kind == "ivf":
            nlist = int(index.nlist)
            self._set_nprobe(index, nlist)
        # 4. a self-consistency probe: stored rows searched for themselves
        live = slot_pos >= 0
        self._probe_check(index, kind, parsed, live, live_slots, meta)
        if self.gpu:
            index = fa.index_cpu_to_gpu(_gpu_resources(fa, self.gpu_id), self.gpu_id, index)
            if kind == "ivf":
                self._set_nprobe(index, nlist)
        ix = _Index(kind, index, self.gpu, built_rows, nlist)
        ix.reserve(ntotal)
        ids = self.store._ids[:n].cpu().numpy()
        ix.slot_id[live_slots] = ids[pos]
        ix.slot_live[live_slots] = True
        ix.ntotal = ntotal
        ix.ndead = ntotal - int(live_slots.size)
        return ix, pos, live_slots

    def _blob_limit(self, kind: str, ntotal: int, nlist: int) -> int:
        """Most bytes an index of ``kind`` over ``ntotal`` slots may take (a few times the expected size)."""
        d = self.dim
        per = 4 * d
        extra = 0
        if kind == "hnsw":  # levels, offsets, ~2m + 2 neighbours
            per += 12 + 4 * (2 * max(self.store.config.m, 32) + 2)
        elif kind == "ivf":  # ids; the centroids
            per += 8
            extra = max(nlist, 1) * (4 * d + 16)
        return (1 << 20) + 4 * (ntotal * per + extra)

    def _verify_vectors(self, parsed: _ParsedIndex, slot_pos: np.ndarray, live_slots: np.ndarray) -> None:
        """Compare the stored vectors of live slots with their rows (and check IVF list assignments)."""
        d = self.dim
        half = self.store.dtype in (torch.float16, torch.bfloat16)
        # NOTE: a cosine index holds rows scaled by the norm computed at insertion (of the float32 input);
        # the loaded store recomputes it from the stored (for half dtypes rounded) values
        rel = 1e-2 if half and self.metric == "cosine" else 1e-5

        def compare(slots: np.ndarray, got: np.ndarray) -> None:
            want = self._prepared(slot_pos[slots])
            err = np.abs(got - want).max(axis=1)
            bad = ~(err <= rel * np.abs(want).max(axis=1) + 1e-12)  # NaN is bad
            if bad.any():
                raise ValueError(f"stored vector of slot {int(slots[bad][0])} differs from its row "
                                 f"({int(bad.sum())} of {slots.size} checked)")

        nl = parsed.centroids.shape[0] if parsed.centroids is not None else 0
        lists = nl > 0
        if parsed.ntotal * d <= _VERIFY_ALL_FLOATS:
            all_lists = lists and parsed.ntotal * nl * d <= 1 << 26
            for slots, vec in parsed.chunks(8192):
                if not np.isfinite(vec).all():
                    raise ValueError("non-finite values among the stored vectors")
                keep = slot_pos[slots] >= 0
                if keep.any():
                    got = np.asarray(vec[keep], dtype=np.float32)
                    compare(slots[keep], got)
                    if all_lists:
                        self._verify_lists(parsed, slots[keep], got)
            if all_lists or not lists:
                return
            sample = _sample(live_slots, _VERIFY_SAMPLE)
            got = parsed.slot_vectors(sample)
        else:
            sample = _sample(live_slots, _VERIFY_SAMPLE)
            got = parsed.slot_vectors(sample)
            compare(sample, got)
        if lists:
            keep = np.isin(sample, _sample(sample, _PROBE_SAMPLE))
            self._verify_lists(parsed, sample[keep], got[keep])

    def _verify_lists(self, parsed: _ParsedIndex, slots: np.ndarray, x32: np.ndarray) -> None:
        """IVF: each of ``slots`` (vectors ``x32``) sits in the list of its nearest centroid (up to rounding)."""
        cent, list_of = parsed.centroids, parsed.list_of
        assert cent is not None and list_of is not None
        c = cent.astype(np.float64)
        if not np.isfinite(c).all():
            raise ValueError("non-finite IVF centroids")
        cn = np.einsum("ij,ij->i", c, c)
        step = max(1, (1 << 22) // max(c.shape[0] * max(c.shape[1], 1), 1))
        for a in range(0, slots.shape[0], step):
            x = x32[a : a + step].astype(np.float64)
            xn = np.einsum("ij,ij->i", x, x)
            s = x @ c.T  # [m, nlist]
            if self.metric == "euclidean":
                s = (xn[:, None] + cn[None, :]) - 2.0 * s
                s = -s  # larger is better below
            own = s[np.arange(x.shape[0]), list_of[slots[a : a + step]]]
            tol = 1e-4 * (xn + float(cn.max(initial=0.0))) + 1e-12
            bad = own < s.max(axis=1) - tol
            if bad.any():
                raise ValueError(f"IVF slot {int(slots[a:a + step][bad][0])} is not in the list of its nearest "
                                 f"centroid ({int(bad.sum())} of {x.shape[0]} checked)")

    def _check_structure(self, index: Any, kind: str, ntotal: int) -> None:
        """What faiss read is what was walked: type, sizes, metric, training, graph / list sizes."""
        fa = self._fa()
        want = {"hnsw": fa.IndexHNSWFlat, "ivf": fa.IndexIVFFlat, "flat": fa.IndexFlat}[kind]
        if not isinstance(index, want):
            raise ValueError(f"index is a {type(index).__name__}, expected {want.__name__}")
        if (int(index.ntotal) != ntotal or int(index.d) != self.dim or int(index.metric_type) != self._faiss_metric()
                or not bool(index.is_trained)):
            raise ValueError(f"index holds {index.ntotal} × {index.d} (metric {index.metric_type}, trained "
                             f"{index.is_trained}), expected {ntotal} × {self.dim}")
        if kind == "hnsw":
            h = index.hnsw
            if (int(h.levels.size()) != ntotal or int(h.offsets.size()) != ntotal + 1
                    or int(index.storage.ntotal) != ntotal or int(index.storage.d) != self.dim):
                raise ValueError("HNSW graph or storage sizes differ from the index size")
        elif kind == "ivf":
            inv = index.invlists
            if (inv is None or int(inv.nlist) != int(index.nlist) or int(inv.code_size) != 4 * self.dim
                    or int(index.quantizer.ntotal) != int(index.nlist)
                    or sum(int(inv.list_size(i)) for i in range(int(index.nlist))) != ntotal):
                raise ValueError("IVF lists or quantizer sizes differ from the index size")

    def _probe_ef(self) -> int:
        return min(max(self.store.config.ef_search, 64), 4096)

    def _probe_search(self, index: Any, kind: str, live: np.ndarray, q: np.ndarray, ef: int,
                      nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-1 of queries ``q`` ``[m, D]`` over the ``live`` slots of a CPU index: (scores ``[m]``, slots ``[m]``)."""
        fa = self._fa()
        bits = None
        if kind == "hnsw":
            p = fa.SearchParametersHNSW()
            p.efSearch = ef
        elif kind == "ivf":
            p = fa.SearchParametersIVF()
            p.nprobe = nprobe
        else:
            p = fa.SearchParameters()
        if not live.all():
            bits = np.packbits(live, bitorder="little")
            sel = fa.IDSelectorBitmap(bits.shape[0], fa.swig_ptr(bits))
            p.sel = sel
        D, I = index.search(np.ascontiguousarray(q, dtype=np.float32), 1, params=p)  # noqa: E741 - faiss names
        del bits
        return D[:, 0].astype(np.float64), I[:, 0].astype(np.int64)

    def _probe_check(self, index: Any, kind: str, parsed: _ParsedIndex, live: np.ndarray,
                     live_slots: np.ndarray, meta: dict[str, Any]) -> None:
        """Search live slots' stored vectors; each must find itself (or an equally good slot) at rank 1.

        HNSW: a slot whose search gives what the save recorded passes too (an intact graph may miss a few
        rows; the record makes the check exact); without a record half the probes must find themselves.
        """
        if live_slots.size == 0:
            return
        ntotal = parsed.ntotal
        slots, labels, ef = None, None, self._probe_ef()
        rec = meta.get("probe") if kind == "hnsw" else None
        if isinstance(rec, dict):
            try:
                rs = np.asarray(rec["slots"], dtype=np.int64)
                rl = np.asarray(rec["labels"], dtype=np.int64)
                ref = rec["ef"]
                if (rs.ndim == 1 and rl.shape == rs.shape and 0 < rs.size <= _PROBE_ALL
                        and isinstance(ref, int) and 1 <= ref <= 4096
                        and int(rs.min()) >= 0 and int(rs.max()) < ntotal and live[rs].all()
                        and np.unique(rs).size == rs.size):
                    slots, labels, ef = rs, rl, ref
            except (KeyError, TypeError, ValueError, OverflowError):
                pass
        if slots is None:
            slots = _probe_slots(live_slots)
        if kind == "flat":  # brute force: each query costs a pass over the index
            slots = _sample(slots, max(1, (1 << 25) // max(ntotal * self.dim, 1)))
        # IVF: the vectors checked sit in the list of their nearest centroid (_verify_lists), which a search
        # probing a few lists scans (an intact index only needs more than one at near-ties of centroids)
        nprobe = min(int(index.nlist), 4) if kind == "ivf" else 0
        q = parsed.slot_vectors(slots)
        score, got = self._probe_search(index, kind, live, q, ef, nprobe)
        valid = (got >= 0) & (got < ntotal)
        valid[valid] &= live[got[valid]]
        x = parsed.slot_vectors(np.where(valid, got, slots)).astype(np.float64)
        q64 = q.astype(np.float64)
        qn = np.einsum("ij,ij->i", q64, q64)
        xn = np.einsum("ij,ij->i", x, x)
        ip = np.einsum("ij,ij->i", q64, x)
        scale = qn + xn
        if self.metric == "euclidean":
            true = qn + xn - 2.0 * ip
            good = true <= 1e-5 * scale + 1e-12  # d(q, x) ~ 0 = d(q, q)
        else:
            true = ip
            good = true >= qn - 1e-5 * scale - 1e-12  # q·x ≥ q·q
        consistent = np.abs(score - true) <= 1e-3 * scale + 1e-6  # faiss read the vectors we walked
        hit = valid & consistent & ((got == slots) | good)
        if labels is not None:
            hit |= valid & consistent & (got == labels)
        need = slots.size if kind != "hnsw" or labels is not None else (slots.size + 1) // 2
        if int(hit.sum()) < need:
            raise ValueError(f"{slots.size - int(hit.sum())} of {slots.size} stored rows searched in the index "
                             f"do not find themselves")

    def stats(self) -> dict[str, Any]:
        ix = self._ix
        return {
            "backend": self.name,
            "active": self.active_kind,
            "index_kind": ix.kind if ix is not None else None,
            "index_slots": ix.ntotal if ix is not None else 0,
            "index_dead": ix.ndead if ix is not None else 0,
            "buffered": self._buffer_count(),
            "job": None if self._job is None else f"{self._job.op}:{self._job.kind}",
            "interim": self._job is not None and self._job.interim is not None and not self._job.stale,
            "failed": self._failed,
            **self.counters,
        }


def fast_prepare(queries: Any, dim: int, metric: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Validate and prepare CPU float32 queries (tensor or array, ``[B, D]`` or ``[D]``) in numpy, or None when
    they are anything else (including invalid: the store's torch path then raises its usual error).

    Returns:
        (prepared queries ``[B, D]`` float32, unit rows for cosine; squared norms ``[B]``).
    """
    # NOTE: the store's torch path (validation, norm, scaling) costs ~20 µs per call on a quiet CPU and far more
    # on a busy one (each small torch op); this numpy path ~6 µs
    if isinstance(queries, torch.Tensor):
        if (queries.dtype != torch.float32 or queries.device.type != "cpu" or queries.requires_grad
                or queries.layout != torch.strided):
            return None  # sparse and other layouts: the store's checks name the problem
        a = queries.numpy()
    elif isinstance(queries, np.ndarray) and queries.dtype == np.float32:
        a = queries
    else:
        return None
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] != dim or a.shape[0] == 0:
        return None
    sq = np.einsum("ij,ij->i", a, a)  # [B] finite iff every value is finite (barring overflow)
    if not (sq.min() > 1e-16 and sq.max() < np.inf):  # NaN fails both comparisons
        return None
    if metric == "cosine":
        a = a * (1.0 / np.sqrt(sq))[:, None]
    return torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(sq)


def make_backend(store: PatternStore) -> SearchBackend:
    """The backend object for ``store.config.backend`` (raises :class:`MissingBackendError` for a forced
    faiss backend whose package is missing)."""
    name = store.config.backend
    if name == "exact":
        return ExactBackend()
    if name == "auto" and store.device.type == "cuda":
        return ExactBackend("auto")
    return FaissBackend(store)


def _options_dict(o: BackendOptions) -> dict[str, Any]:
    return asdict(o)
