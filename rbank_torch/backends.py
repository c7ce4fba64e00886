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
  overlap (faiss releases the GIL).

``import rbank_torch`` never imports faiss: it is imported the first time an approximate index is needed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
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
BACKENDS = ("auto", "exact", "faiss-hnsw", "faiss-ivf", "faiss-flat")
_KIND_OF = {"faiss-hnsw": "hnsw", "faiss-ivf": "ivf", "faiss-flat": "flat"}

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
        for name in ("buffer_rows", "hnsw_min_rows", "ivf_min_rows", "absorb_chunk"):
            v = getattr(o, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"backend_options[{name!r}] must be a positive integer, got {v!r}")
        for name in ("nlist", "nprobe"):
            v = getattr(o, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"backend_options[{name!r}] must be a non-negative integer, got {v!r}")
        if not isinstance(o.background, bool):
            raise ValueError(f"backend_options['background'] must be a bool, got {o.background!r}")
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

    def begin_search(self, qp: torch.Tensor, qsq: torch.Tensor, k: int) -> _SearchPlan | None:
        """Start a search of prepared queries ``qp`` ``[B, D]`` (squared norms ``qsq`` ``[B]``)."""
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
        self.params_cache: tuple[Any, Any, Any] | None = None  # (selector, params, unused)

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


class _SearchPlan:
    """A search started under the store lock; :meth:`run` does the faiss part (the index read lock is held
    from :meth:`FaissBackend.begin_search` until :meth:`run` returns) and merges it with the buffer part."""

    __slots__ = ("_ix", "_xq", "_qsq", "_k", "_kf", "_params", "_bits", "_buf", "_device", "_l2", "_keep")

    def __init__(self, be: FaissBackend, ix: _Index, xq: np.ndarray, qsq: torch.Tensor, k: int, kf: int,
                 params: Any, bits: np.ndarray | None, buf: tuple[torch.Tensor, torch.Tensor] | None,
                 keep: tuple[Any, ...] = ()) -> None:
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
        if not _faiss_present():
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
        self._launch(_Job("build", kind, self._prepared(rows), 0, None))

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
    def _buffer_search(self, qp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Exact top-k over the buffered rows: (scores ``[B, k_b]``, ids ``[B, k_b]``), or None when empty."""
        st = self.store
        n, t = self._n, self._tail
        parts: list[torch.Tensor] = []
        if self._loose.size:
            parts.append(torch.from_numpy(self._loose).to(st.device))
        if n > t:
            parts.append(torch.arange(t, n, device=st.device))
        if not parts:
            return None
        if len(parts) == 1 and not self._loose.size:
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
        ids = torch.where(torch.isfinite(ts), st._ids[rows[ti]], torch.full_like(ti, -1))
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
        if isinstance(queries, torch.Tensor):
            if queries.dtype != torch.float32 or queries.device.type != "cpu" or queries.requires_grad:
                return None
            a = queries.numpy()
        elif isinstance(queries, np.ndarray) and queries.dtype == np.float32:
            a = queries
        else:
            return None
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2 or a.shape[1] != self.dim or a.shape[0] == 0:
            return None
        sq = np.einsum("ij,ij->i", a, a)  # [B] finite iff every value is finite (barring overflow)
        if not (sq.min() > 1e-16 and sq.max() < np.inf):  # NaN fails both comparisons
            return None
        if self.metric == "cosine":
            a = a * (1.0 / np.sqrt(sq))[:, None]
        return torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(sq)

    def begin_search(self, qp: torch.Tensor, qsq: torch.Tensor, k: int) -> _SearchPlan | None:
        self._maintain()
        ix = self._ix
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
            params = self._params(ix, sel)
        buf = self._buffer_search(qp, k)
        q32 = qp if qp.dtype == torch.float32 else qp.float()
        xq = np.ascontiguousarray(q32.cpu().numpy()) if q32.device.type != "cpu" else q32.contiguous().numpy()
        ix.lock.acquire_read()
        return _SearchPlan(self, ix, xq, qsq, k, kf, params, bits, buf, keep)

    def _params(self, ix: _Index, sel: Any) -> Any:
        """Search parameters for a CPU index (efSearch / nprobe from the config, the dead-slot selector)."""
        fa = self._fa()
        cached = ix.params_cache
        if cached is not None and cached[0] is sel:
            return cached[1]
        if ix.kind == "hnsw":
            p = fa.SearchParametersHNSW()
            p.efSearch = self.store.config.ef_search
        elif ix.kind == "ivf":
            p = fa.SearchParametersIVF()
            p.nprobe = self._nprobe(ix.nlist)
        else:
            if sel is None:
                return None
            p = fa.SearchParameters()
        if sel is not None:
            p.sel = sel
        ix.params_cache = (sel, p, None)
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
        if ix is None:
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
        with ix.lock.read():
            cpu_index = fa.index_gpu_to_cpu(ix.index) if ix.gpu else ix.index
            blob = fa.serialize_index(cpu_index)
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
        kind = meta.get("kind")
        usable = {"hnsw", "ivf"} if self.forced is None else {self.forced}
        if self.forced is None and self.device.type == "cuda":
            usable = set()
        if kind not in usable:
            log.info("snapshot search index (%s) not used by backend %r; it will be rebuilt as needed",
                     kind, self.name)
            return
        try:
            ix = self._load_index(tensors, meta, prefix)
        except (ValueError, RuntimeError, KeyError, TypeError) as e:
            self.counters["load_rejects"] += 1
            log.warning("search index in the snapshot does not match its rows (%s); rebuilding it", e)
            return
        self._ix = ix
        self.counters["loads"] += 1
        self._recompute_buffer()

    def _load_index(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str) -> _Index:
        fa = self._fa()
        n = self._n
        blob = tensors.get(prefix + "ann/index")
        slot_pos_t = tensors.get(prefix + "ann/slot_pos")
        if blob is None or slot_pos_t is None:
            raise ValueError("index tensors missing")
        if blob.dtype != torch.uint8 or slot_pos_t.dtype != torch.int64 or blob.dim() != 1 or slot_pos_t.dim() != 1:
            raise ValueError("index tensors of the wrong dtype or shape")
        slot_pos = slot_pos_t.cpu().numpy().astype(np.int64)
        ntotal = int(meta["ntotal"])
        if meta.get("metric") != self.metric or int(meta["dim"]) != self.dim:
            raise ValueError(f"index metric/dim {meta.get('metric')}/{meta.get('dim')} differ from the store's")
        if slot_pos.shape[0] != ntotal:
            raise ValueError(f"slot map holds {slot_pos.shape[0]} slots, index metadata says {ntotal}")
        live_slots = np.nonzero(slot_pos >= 0)[0]
        pos = slot_pos[live_slots]
        if pos.size and (int(pos.max()) >= n or np.unique(pos).size != pos.size):
            raise ValueError("slot map points outside the rows or twice at one row")
        if self._checksum(torch.from_numpy(pos), slot_pos) != meta.get("checksum"):
            raise ValueError("checksum of the indexed rows differs")
        index = fa.deserialize_index(np.ascontiguousarray(blob.cpu().numpy()))
        if index.ntotal != ntotal or index.d != self.dim or index.metric_type != self._faiss_metric():
            raise ValueError(f"index holds {index.ntotal} × {index.d} (metric {index.metric_type}), "
                             f"expected {ntotal} × {self.dim}")
        kind = str(meta["kind"])
        nlist = int(meta.get("nlist", 0))
        if kind == "hnsw":
            index.hnsw.efSearch = self.store.config.ef_search
        if self.gpu:
            index = fa.index_cpu_to_gpu(_gpu_resources(fa, self.gpu_id), self.gpu_id, index)
        if kind == "ivf":
            self._set_nprobe(index, nlist)
        ix = _Index(kind, index, self.gpu, int(meta.get("built_rows", ntotal)), nlist)
        ix.reserve(ntotal)
        ids = self.store._ids[: n].cpu().numpy()
        ix.slot_id[live_slots] = ids[pos]
        ix.slot_live[live_slots] = True
        ix.ntotal = ntotal
        ix.ndead = ntotal - int(live_slots.size)
        self._row_slot[pos] = live_slots
        return ix

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
            "failed": self._failed,
            **self.counters,
        }


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
