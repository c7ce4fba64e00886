"""Sharded distillation and consolidation on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Everything here runs unchanged in one process (no process group: the world is one rank and no
collective is issued) and under ``torchrun`` (one or many machines); the results are the same.

* **Distillation** (:func:`distill_distributed`, :func:`distill_files`): every rank distils a contiguous
  share of the log (rank order = log order) with :class:`~rbank_torch.distillation.MemoryDistiller`. The
  rows of each rank's lesson table go to an *owner* rank chosen by a stable hash of the lesson text
  (BLAKE2b, :func:`lesson_owner`) in one ``all_to_all_single``; the owner merges the rows of one text
  in rank order with ``merge_partial`` (counts add, integer sums, first observation kept, actions and
  source ids unioned in order, times widened), and remembers where the text first appeared
  ``(rank, local row)``. The merged tables go to the destination rank, which restores global
  first-appearance order, appends the compressed trajectories in rank order and runs ``finish()``
  (order, deduplication, truncation). The result equals one pass over the whole log: same lesson
  texts, order, counts, sums, actions, sources, compressed trajectories and summaries.
* **Files and the command line** (:func:`distill_files`, :func:`cli_distill`): the records of the log files
  (:func:`count_log_records`) are cut into one consecutive range per rank, read with :func:`iter_log_range`
  (the parsing of :mod:`rbank_torch.logs`); ``torchrun … -m rbank_torch distill`` hands over to
  :func:`cli_distill`, whose rank 0 writes the same files as the single-process command.
* **Pair finding and the leader scan** (:func:`pairs_above_distributed`, :func:`leaders_distributed`):
  the upper triangle of ``E Eᵀ`` is cut into one band of consecutive rows per rank, of equal *area*
  (:func:`triangle_bands`); every rank computes its band's tiles with the candidate margin and the
  float64 re-check of :mod:`rbank_torch.kernels.pairs`, so the pair set is exactly that of
  :func:`~rbank_torch.kernels.pairs.pairs_above`; the pairs are gathered on one rank, which runs
  :func:`~rbank_torch.kernels.pairs.leader_scan` and broadcasts the leaders.
* **k-means** (:func:`kmeans_distributed`): rows sharded across ranks; the init (k-means++ on rank 0,
  or given centroids) is broadcast from rank 0; Lloyd iterations all-reduce exact centroid sums and
  counts. The result is bitwise the same for any number of ranks and any split of the rows.

Exchange format: only tensors travel. Payloads are safetensors blobs (raw little-endian tensors, strings
as UTF-8 JSON inside a ``uint8`` tensor) sent as ``uint8`` tensors with ``all_to_all_single``; sizes go
first as an ``int64`` tensor. The ``*_object`` collectives (which pickle) are never used, and nothing
received is unpickled or executed.

Failures: every local phase ends with an agreement step (``monitored_barrier`` on gloo, then an
``all_gather`` of a status record); when a rank raised, every rank raises :class:`DistributedError`
naming it and its message. A rank that exits or crashes makes the next collective fail on its peers
("connection reset"), and a rank that hangs makes it time out after the process group's ``timeout``;
both surface as :class:`DistributedError` naming the phase.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ._util import dt_to_us, us_to_dt
from .distillation import (
    CompressedTrajectory,
    DistillationConfig,
    DistillationError,
    DistillationPartial,
    DistillationResult,
    KeyLesson,
    MemoryDistiller,
    compressed_meta,
)
from .kernels.kmeans import KMeansResult, _normalize_rows, kmeans_plusplus
from .kernels.pairs import (
    PRECISIONS,
    ZERO_NORM,
    _torch_margin_precision,
    leader_scan,
    pair_cosine64,
    pair_margin,
    row_norms64,
)
from .patterns import PatternCategory
from .trajectory import Trajectory
from .verdicts import Verdict

__all__ = [
    "DistributedError",
    "WorldInfo",
    "world_info",
    "init_from_env",
    "leave_group",
    "lesson_owner",
    "distill_distributed",
    "distill_files",
    "count_lines",
    "count_log_records",
    "iter_log_range",
    "read_log_range",
    "launched_by_torchrun",
    "cli_distill",
    "split_records",
    "write_distilled",
    "read_distilled",
    "triangle_bands",
    "pairs_above_distributed",
    "leaders_distributed",
    "store_merge_map_distributed",
    "kmeans_distributed",
    "kmeans_exact",
    "RankOutcome",
    "spawn_local",
]

#: default timeout of the process groups this module creates (collectives fail after it)
DEFAULT_TIMEOUT_S = 1800.0
#: bytes of one rank's status record in the agreement step (the error text is cut to fit)
_STATUS_BYTES = 2048
#: format tag of the files written by :func:`write_distilled`
DISTILLED_FORMAT = "rbank_torch.distilled"

ReadChunks = Callable[[str, int, int], Iterable[Sequence[Trajectory]]]
CountRecords = Callable[[str], int]


class DistributedError(RuntimeError):
    """A sharded operation failed on some rank, or a collective failed (a peer exited, crashed or timed out).

    Raised on every rank with the same explanation where the ranks could still agree on it.
    """


# ---------------------------------------------------------------------------------------------------------
# The world: rank, size, backend, device.


@dataclass(frozen=True)
class WorldInfo:
    """Where this process stands.

    Attributes:
        rank: this process's rank in ``group`` (0 without a process group).
        world_size: number of ranks (1 without a process group).
        backend: ``"gloo"``, ``"nccl"``, … or None without a process group.
        device: where exchanged tensors live (``cuda:<current>`` for NCCL, else CPU).
        group: the process group (None = the default group).
    """

    rank: int
    world_size: int
    backend: str | None
    device: torch.device
    group: Any = None

    @property
    def distributed(self) -> bool:
        """True when collectives are issued (a process group with more than one rank)."""
        return self.world_size > 1


def world_info(group: Any = None) -> WorldInfo:
    """The :class:`WorldInfo` of ``group`` (default group), or a one-rank world when none is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return WorldInfo(0, 1, None, torch.device("cpu"), None)
    backend = str(dist.get_backend(group))
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return WorldInfo(dist.get_rank(group), dist.get_world_size(group), backend, device, group)


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[WorldInfo, bool]:
    """Join the process group described by the environment (``torchrun`` sets ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

    Does nothing when a process group already exists or when ``WORLD_SIZE`` is unset or 1.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or None (NCCL when CUDA is available, else gloo).
        timeout_s: collective timeout; a collective waiting longer on a silent peer fails.

    Returns:
        ``(world info, created)``; ``created`` is True when this call created the process group (the caller
        should then call :func:`leave_group` when done).

    Raises:
        DistributedError: incomplete environment or a failed rendezvous.
    """
    if dist.is_available() and dist.is_initialized():
        return world_info(), False
    world = int(os.environ.get("WORLD_SIZE", "1") or "1")
    if world <= 1:
        return world_info(), False
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0") or "0")
        torch.cuda.set_device(local % max(torch.cuda.device_count(), 1))
    try:
        dist.init_process_group(backend, timeout=_dt.timedelta(seconds=float(timeout_s)))
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"could not join the process group ({backend}, WORLD_SIZE={world}): {e}") from e
    return world_info(), True


def leave_group(ok: bool = True) -> None:
    """Destroy the default process group, after a closing barrier when this rank succeeded.

    A gloo rank that tears its connections down while a peer still drains the last collective can
    abort that peer (``terminate called without an active exception``); the barrier makes every rank
    leave together. After a failure the peers may be gone, so no barrier is attempted.

    Args:
        ok: this rank finished its work normally.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if ok and dist.get_world_size() > 1:
            dist.barrier()
    except Exception:  # noqa: BLE001 - leaving anyway; the real outcome was already decided
        pass
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# Tensor-only exchange and the agreement step.


def _short(e: BaseException, limit: int = 400) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _group_timeout(w: WorldInfo) -> _dt.timedelta:
    """The collective timeout of ``w``'s process group (``DEFAULT_TIMEOUT_S`` when it cannot be read)."""
    try:
        pg: Any = w.group if w.group is not None else dist.group.WORLD
        return pg._get_backend(torch.device("cpu")).options._timeout
    except Exception:  # private API: fall back to the module default
        return _dt.timedelta(seconds=DEFAULT_TIMEOUT_S)


@contextmanager
def _collective(w: WorldInfo, phase: str) -> Iterator[None]:
    """Turn a failed collective into a :class:`DistributedError` that names the rank and the phase."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:  # gloo and NCCL errors (DistBackendError is a RuntimeError)
        raise DistributedError(
            f"rank {w.rank}/{w.world_size}: {phase}: a collective failed ({_short(e)}); another rank probably "
            "exited, crashed or stopped responding within the timeout (see its log)"
        ) from e


def _agree(w: WorldInfo, phase: str, error: BaseException | None, passthrough: tuple[type, ...] = ()) -> None:
    """Every rank reports whether its local work for ``phase`` succeeded; any failure raises on all ranks.

    When every failed rank raised one of ``passthrough`` (for example :class:`DistillationError`), that type
    is raised on all ranks with the first failed rank's message; otherwise :class:`DistributedError`.
    """
    if not w.distributed:
        if error is not None:
            raise error
        return
    with _collective(w, f"{phase} (agreement)"):
        if w.backend == "gloo":
            # monitored_barrier does not take the group's timeout by default (it waits 30 min): pass it
            dist.monitored_barrier(group=w.group, timeout=_group_timeout(w), wait_all_ranks=True)
        rec = torch.zeros(_STATUS_BYTES, dtype=torch.uint8)
        if error is not None:
            kind = type(error).__name__
            body = f"{kind}\x00{error}".encode("utf-8", "replace")[: _STATUS_BYTES - 1]
            rec[0] = 1
            rec[1 : 1 + len(body)] = torch.frombuffer(bytearray(body), dtype=torch.uint8)
        rec = rec.to(w.device)
        out = [torch.empty_like(rec) for _ in range(w.world_size)]
        dist.all_gather(out, rec, group=w.group)
    failed: list[tuple[int, str, str]] = []
    for r, t in enumerate(out):
        t = t.cpu()
        if int(t[0]) == 1:
            raw = bytes(t[1:].numpy().tobytes()).rstrip(b"\x00").decode("utf-8", "replace")
            kind, _, msg = raw.partition("\x00")
            failed.append((r, kind, msg))
    if not failed:
        return
    names = {c.__name__: c for c in passthrough}
    if all(k in names for _, k, _ in failed):
        r, k, msg = failed[0]
        raise names[k](msg) from error
    text = "; ".join(f"rank {r} failed with {k}: {msg}" for r, k, msg in failed)
    raise DistributedError(f"{phase}: {text}") from error


def _pack(tensors: dict[str, torch.Tensor], meta: Any) -> bytes:
    """A safetensors blob of ``tensors`` plus ``meta`` (JSON, stored as a ``uint8`` tensor)."""
    from safetensors.torch import save

    out = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    mb = json.dumps(meta, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    out["__meta__"] = torch.frombuffer(bytearray(mb), dtype=torch.uint8) if mb else torch.zeros(0, dtype=torch.uint8)
    return save(out)


def _unpack(blob: bytes, what: str) -> tuple[dict[str, torch.Tensor], Any]:
    """Inverse of :func:`_pack`; raises :class:`DistributedError` on a malformed payload."""
    from safetensors.torch import load

    try:
        tensors = load(blob)
        meta = json.loads(tensors.pop("__meta__").numpy().tobytes().decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - any parse failure is a malformed payload
        raise DistributedError(f"malformed {what} payload ({_short(e)})") from None
    return tensors, meta


def _bytes_tensor(b: bytes) -> torch.Tensor:
    if not b:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def _exchange(w: WorldInfo, payloads: Sequence[bytes], phase: str) -> list[bytes]:
    """All-to-all of byte strings: ``payloads[d]`` goes to rank ``d``; returns what each rank sent here."""
    if not w.distributed:
        return [payloads[0]]
    if len(payloads) != w.world_size:
        raise ValueError(f"need one payload per rank ({w.world_size}), got {len(payloads)}")
    with _collective(w, phase):
        send_sizes = torch.tensor([len(p) for p in payloads], dtype=torch.int64, device=w.device)
        recv_sizes = torch.empty_like(send_sizes)
        dist.all_to_all_single(recv_sizes, send_sizes, group=w.group)
        rs = recv_sizes.cpu().tolist()
        send = _bytes_tensor(b"".join(payloads)).to(w.device)
        recv = torch.empty(sum(rs), dtype=torch.uint8, device=w.device)
        dist.all_to_all_single(recv, send, rs, send_sizes.cpu().tolist(), group=w.group)
    raw = recv.cpu().numpy().tobytes()
    out, o = [], 0
    for s in rs:
        out.append(raw[o : o + s])
        o += s
    return out


def _gather(w: WorldInfo, payload: bytes, dst: int, phase: str) -> list[bytes] | None:
    """Every rank's ``payload`` on rank ``dst`` (in rank order); None elsewhere."""
    if not w.distributed:
        return [payload]
    got = _exchange(w, [payload if d == dst else b"" for d in range(w.world_size)], phase)
    return got if w.rank == dst else None


def _broadcast_bytes(w: WorldInfo, payload: bytes | None, src: int, phase: str) -> bytes:
    """``payload`` of rank ``src`` on every rank."""
    if not w.distributed:
        assert payload is not None
        return payload
    with _collective(w, phase):
        size = torch.tensor([len(payload) if w.rank == src and payload is not None else 0], dtype=torch.int64, device=w.device)
        dist.broadcast(size, src, group=w.group)
        n = int(size.item())
        buf = _bytes_tensor(payload).to(w.device) if w.rank == src and payload else torch.empty(n, dtype=torch.uint8, device=w.device)
        if n:
            dist.broadcast(buf, src, group=w.group)
    return buf.cpu().numpy().tobytes() if n else b""


def _broadcast_tensor(w: WorldInfo, t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, src: int, phase: str) -> torch.Tensor:
    """A tensor of known shape and dtype from rank ``src`` to every rank (on the CPU afterwards)."""
    if not w.distributed:
        assert t is not None
        return t
    with _collective(w, phase):
        if w.rank == src:
            assert t is not None
            buf = t.to(device=w.device, dtype=dtype).contiguous()
        else:
            buf = torch.empty(shape, dtype=dtype, device=w.device)
        dist.broadcast(buf, src, group=w.group)
    return buf.cpu()


def _all_reduce(w: WorldInfo, t: torch.Tensor, op: str, phase: str) -> torch.Tensor:
    """All-reduce (``op``: "sum" or "max") a CPU tensor through the exchange device; returns it on the CPU."""
    if not w.distributed:
        return t
    with _collective(w, phase):
        buf = t.to(w.device).contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=w.group)
    return buf.cpu()


def _all_gather_i64(w: WorldInfo, values: Sequence[int], phase: str) -> np.ndarray:
    """``[world, len(values)]`` int64: every rank's ``values``."""
    t = torch.tensor(list(values), dtype=torch.int64)
    if not w.distributed:
        return t.numpy()[None, :]
    with _collective(w, phase):
        buf = t.to(w.device)
        out = [torch.empty_like(buf) for _ in range(w.world_size)]
        dist.all_gather(out, buf, group=w.group)
    return torch.stack([o.cpu() for o in out]).numpy()


def _fingerprint(obj: Any) -> int:
    raw = json.dumps(obj, sort_keys=True, default=str).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=7).digest(), "little")


def _check_same(w: WorldInfo, phase: str, **values: Any) -> None:
    """Raise on every rank when the named values differ between ranks."""
    if not w.distributed:
        return
    keys = sorted(values)
    got = _all_gather_i64(w, [_fingerprint(values[k]) for k in keys], phase)
    for j, k in enumerate(keys):
        if len(set(got[:, j].tolist())) > 1:
            raise DistributedError(f"{phase}: {k} differs between ranks (every rank must pass the same {k})")


# ---------------------------------------------------------------------------------------------------------
# Distillation.


def lesson_owner(text: str, world_size: int) -> int:
    """The rank that merges lesson ``text``: BLAKE2b-64 of its UTF-8 bytes modulo ``world_size``.

    Stable across processes, machines and Python versions (unlike the salted built-in ``hash``).
    """
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") % int(world_size)


def _first_occurrences(obs_row: np.ndarray, obs_src: np.ndarray) -> np.ndarray:
    """Positions of the first observation of each distinct (row, source) pair, in observation order."""
    if obs_row.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.arange(obs_row.size), obs_src, obs_row))
    r, s = obs_row[order], obs_src[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = (r[1:] != r[:-1]) | (s[1:] != s[:-1])
    return np.sort(order[first])


def _sub_partial(p: DistillationPartial, rows: np.ndarray, obs_pos: np.ndarray) -> DistillationPartial:
    """The lesson rows ``rows`` of ``p`` (and the observations at ``obs_pos``, rows renumbered), no trajectories."""
    remap = np.full(p.n_lessons, -1, dtype=np.int64)
    remap[rows] = np.arange(rows.size, dtype=np.int64)
    emb = None
    if rows.size and p.embeddings is not None:
        emb = p.embeddings[torch.from_numpy(rows)]
    return DistillationPartial(
        texts=[p.texts[i] for i in rows.tolist()],
        embeddings=emb,
        count=p.count[rows],
        importance_tenths=p.importance_tenths[rows],
        successes=p.successes[rows],
        quality_fx=p.quality_fx[rows],
        first_us=p.first_us[rows],
        last_us=p.last_us[rows],
        category=p.category[rows],
        tags=[p.tags[i] for i in rows.tolist()],
        first_actions=[p.first_actions[i] for i in rows.tolist()],
        distinct_actions=[p.distinct_actions[i] for i in rows.tolist()],
        obs_row=remap[p.obs_row[obs_pos]],
        obs_source=p.obs_source[obs_pos],
    )


def _partial_blob(p: DistillationPartial, extra: dict[str, torch.Tensor] | None = None) -> bytes:
    sd = p.to_state_dict()
    meta = sd.pop("meta")
    tensors = {k: v for k, v in sd.items()}
    if extra:
        tensors.update(extra)
    return _pack(tensors, meta)


def _blob_partial(blob: bytes, what: str) -> tuple[DistillationPartial, dict[str, torch.Tensor]]:
    tensors, meta = _unpack(blob, what)
    if not isinstance(meta, str):
        raise DistributedError(f"malformed {what} payload (no partial state)")
    sd: dict[str, Any] = dict(tensors)
    sd["meta"] = meta
    try:
        p = DistillationPartial.from_state_dict(sd)
    except ValueError as e:
        raise DistributedError(f"malformed {what} payload ({e})") from None
    return p, tensors


def _route(p: DistillationPartial, world_size: int) -> list[bytes]:
    """Split the lesson table by owner rank: one payload per owner (rows, their local row numbers, their
    first observation of every source)."""
    owners = np.fromiter((lesson_owner(t, world_size) for t in p.texts), dtype=np.int64, count=p.n_lessons)
    keep = _first_occurrences(p.obs_row, p.obs_source)
    obs_owner = owners[p.obs_row[keep]] if keep.size else np.zeros(0, dtype=np.int64)
    out = []
    for o in range(world_size):
        rows = np.flatnonzero(owners == o)
        sub = _sub_partial(p, rows, keep[obs_owner == o])
        out.append(_partial_blob(sub, {"local_rows": torch.from_numpy(rows.astype(np.int64))}))
    return out


def _merge_owned(blobs: Sequence[bytes], config: DistillationConfig) -> tuple[DistillationPartial, np.ndarray]:
    """Merge the rows this rank owns, in sender order; returns the merged table and, per row, where its text
    first appeared: ``[L, 2]`` (rank, local row)."""
    d = MemoryDistiller(config)
    keys: dict[str, tuple[int, int]] = {}
    for src, blob in enumerate(blobs):
        sub, extra = _blob_partial(blob, f"lesson rows from rank {src}")
        local = extra.get("local_rows")
        if local is None or local.dtype != torch.int64 or tuple(local.shape) != (sub.n_lessons,):
            raise DistributedError(f"malformed lesson rows from rank {src} (local_rows)")
        lr = local.tolist()
        for j, text in enumerate(sub.texts):
            if text not in keys:
                keys[text] = (src, lr[j])
        d.merge_partial(sub)
    merged = d.partial()
    if merged.texts != list(keys):
        raise DistributedError("internal error: merged lesson order differs from first appearance")
    k = np.asarray(list(keys.values()), dtype=np.int64).reshape(-1, 2)
    return merged, k


def _own_part(p: DistillationPartial) -> DistillationPartial:
    """The compressed trajectories and counters of ``p`` without its lesson table."""
    return DistillationPartial(
        compressed=p.compressed,
        n_trajectories=p.n_trajectories,
        category_counts=p.category_counts.copy(),
        bytes_before=p.bytes_before,
        bytes_after=p.bytes_after,
        elapsed_s=p.elapsed_s,
    )


def _assemble(tables: Sequence[DistillationPartial], keys: Sequence[np.ndarray], own: Sequence[DistillationPartial]) -> DistillationPartial:
    """One partial equal to a single pass: lesson rows in global first-appearance order, compressed
    trajectories and counters of the ranks in rank order."""
    sizes = [t.n_lessons for t in tables]
    base = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(base[-1])
    key = np.concatenate([k for k in keys]) if keys else np.zeros((0, 2), np.int64)
    order = np.lexsort((key[:, 1], key[:, 0])) if n else np.zeros(0, dtype=np.int64)
    inv = np.empty(n, dtype=np.int64)
    inv[order] = np.arange(n, dtype=np.int64)
    ol = order.tolist()

    def cat_list(name: str) -> list:
        allv: list = []
        for t in tables:
            allv.extend(getattr(t, name))
        return [allv[i] for i in ol]

    def cat_col(name: str) -> np.ndarray:
        if not n:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([getattr(t, name)[: t.n_lessons] for t in tables])[order]

    embs = [t.embeddings for t in tables if t.n_lessons and t.embeddings is not None]
    dims = {int(e.shape[1]) for e in embs}
    for o in own:
        if o.compressed:
            dims.add(int(o.compressed[0].key_embedding.shape[0]))
    if len(dims) > 1:
        raise ValueError(f"ranks read trajectories with embeddings of different dimensions {sorted(dims)}")
    emb = torch.cat(embs)[torch.from_numpy(order)] if n else None
    obs_row = [inv[t.obs_row + base[i]] for i, t in enumerate(tables) if t.obs_row.size]
    obs_src = [t.obs_source for t in tables if t.obs_row.size]
    compressed: list[CompressedTrajectory] = []
    for o in own:
        compressed.extend(o.compressed)
    return DistillationPartial(
        texts=cat_list("texts"),
        embeddings=emb,
        count=cat_col("count"),
        importance_tenths=cat_col("importance_tenths"),
        successes=cat_col("successes"),
        quality_fx=cat_col("quality_fx"),
        first_us=cat_col("first_us"),
        last_us=cat_col("last_us"),
        category=cat_col("category"),
        tags=cat_list("tags"),
        first_actions=cat_list("first_actions"),
        distinct_actions=cat_list("distinct_actions"),
        obs_row=np.concatenate(obs_row) if obs_row else np.zeros(0, np.int64),
        obs_source=np.concatenate(obs_src) if obs_src else np.zeros(0, np.int64),
        compressed=compressed,
        n_trajectories=sum(o.n_trajectories for o in own),
        category_counts=np.sum([o.category_counts for o in own], axis=0).astype(np.int64),
        bytes_before=sum(o.bytes_before for o in own),
        bytes_after=sum(o.bytes_after for o in own),
    )


def _config_dict(config: DistillationConfig) -> dict[str, Any]:
    return asdict(config)


def distill_distributed(
    shard: Iterable[Sequence[Trajectory]] | MemoryDistiller | DistillationPartial,
    config: DistillationConfig | None = None,
    *,
    dst: int = 0,
    group: Any = None,
) -> DistillationResult | None:
    """Distil a log sharded across ranks; the result equals one pass over the whole log.

    Rank ``r`` passes the ``r``-th consecutive part of the log (rank order must be log order): chunks of
    trajectories, a :class:`MemoryDistiller` that has read its part (its running state is consumed), or
    a :class:`DistillationPartial`. Lesson rows are merged on their owner rank (:func:`lesson_owner`),
    then ordered, deduplicated and truncated on ``dst``.

    Args:
        shard: this rank's part of the log.
        config: distillation settings (the same on every rank; checked).
        dst: the rank that builds and returns the result.
        group: process group (default group; none initialised means one process).

    Returns:
        the :class:`DistillationResult` on ``dst``; None on the other ranks.

    Raises:
        DistillationError: on every rank, when the whole log has fewer than
            ``min_trajectories_for_distillation`` trajectories.
        DistributedError: on every rank, when a rank failed (its error is named) or a collective failed.

    Example (under ``torchrun --nproc-per-node 2``)::

        dist.init_process_group("gloo")
        part = my_part_of_the_log(dist.get_rank(), dist.get_world_size())   # chunks of Trajectory
        result = distill_distributed(part, DistillationConfig())
    """
    w = world_info(group)
    t0 = time.perf_counter()
    if config is None:
        config = shard.config if isinstance(shard, MemoryDistiller) else DistillationConfig()
    if not 0 <= dst < w.world_size:
        raise ValueError(f"dst must be a rank in [0, {w.world_size}), got {dst}")

    # 1. this rank's part of the log
    err: BaseException | None = None
    partial: DistillationPartial | None = None
    try:
        if not isinstance(config, DistillationConfig):
            raise ValueError(f"config must be a DistillationConfig, got {type(config).__name__}")
        config.validate()
        partial = _local_partial(shard, config)
    except Exception as e:  # noqa: BLE001 - reported to every rank by the agreement step
        err = e
    _agree(w, "distil the local share", err)
    _check_same(w, "distil the local share", config=_config_dict(config), dst=dst)
    assert partial is not None

    # 2. lesson rows to their owners, merged there in rank order
    err = None
    outgoing: list[bytes] = []
    try:
        outgoing = _route(partial, w.world_size)
    except Exception as e:  # noqa: BLE001
        err = e
    _agree(w, "route lessons to their owners", err)
    incoming = _exchange(w, outgoing, "route lessons to their owners")
    del outgoing
    err = None
    payload = b""
    own_here: DistillationPartial | None = None
    try:
        merged, keys = _merge_owned(incoming, config)
        payload = _partial_blob(merged, {"first_seen": torch.from_numpy(keys)})
        own = _own_part(partial)
        if w.rank == dst:  # dst keeps its own compressed trajectories: no serialisation round trip
            own_here = own
            payload = _pack({"table": _bytes_tensor(payload)}, {})
        else:
            payload = _pack({"table": _bytes_tensor(payload), "own": _bytes_tensor(_partial_blob(own))}, {})
    except Exception as e:  # noqa: BLE001
        err = e
    del incoming
    _agree(w, "merge owned lessons", err)

    # 3. merged tables and compressed trajectories on dst: order, deduplicate, truncate
    got = _gather(w, payload, dst, "gather merged lessons")
    err = None
    result: DistillationResult | None = None
    if got is not None:
        try:
            result = _finish_on_dst(got, config, t0, dst, own_here)
        except Exception as e:  # noqa: BLE001
            err = e
    _agree(w, "order, deduplicate and truncate lessons", err, passthrough=(DistillationError,))
    return result


def _local_partial(shard: Any, config: DistillationConfig) -> DistillationPartial:
    if isinstance(shard, DistillationPartial):
        return shard
    if isinstance(shard, MemoryDistiller):
        p = shard.partial()
        shard.reset()
        return p
    d = MemoryDistiller(config)
    for chunk in shard:
        d.add(chunk)
    return d.partial()


def _finish_on_dst(
    blobs: Sequence[bytes], config: DistillationConfig, t0: float, dst: int = 0,
    own_dst: DistillationPartial | None = None,
) -> DistillationResult:
    """Restore global order from every rank's merged table (and compressed trajectories; ``own_dst`` are
    those of ``dst`` itself, kept in memory) and finish."""
    tables, keys, own = [], [], []
    for r, blob in enumerate(blobs):
        parts, _ = _unpack(blob, f"merged lessons of rank {r}")
        if "table" not in parts or ("own" not in parts and not (r == dst and own_dst is not None)):
            raise DistributedError(f"malformed merged lessons of rank {r}")
        table, extra = _blob_partial(parts["table"].numpy().tobytes(), f"merged lessons of rank {r}")
        fs = extra.get("first_seen")
        if fs is None or fs.dtype != torch.int64 or tuple(fs.shape) != (table.n_lessons, 2):
            raise DistributedError(f"malformed merged lessons of rank {r} (first_seen)")
        if r == dst and own_dst is not None:
            o = own_dst
        else:
            o, _ = _blob_partial(parts["own"].numpy().tobytes(), f"trajectories of rank {r}")
        tables.append(table)
        keys.append(fs.numpy())
        own.append(o)
    whole = _assemble(tables, keys, own)
    whole.elapsed_s = time.perf_counter() - t0
    d = MemoryDistiller(config)
    d.merge_partial(whole)
    return d.finish()


# -- files ----------------------------------------------------------------------------------------------


def count_lines(path: str | os.PathLike) -> int:
    """Number of lines of a text file (a last line without a newline counts)."""
    n = 0
    last = b"\n"
    with open(path, "rb") as f:
        while True:
            buf = f.read(1 << 20)
            if not buf:
                break
            n += buf.count(b"\n")
            last = buf[-1:]
    return n + (0 if last == b"\n" else 1)


def split_records(counts: Sequence[int], world_size: int) -> list[list[tuple[int, int, int]]]:
    """Cut the concatenation of files (``counts[i]`` records in file ``i``) into ``world_size`` consecutive
    parts of equal size (±1 record).

    Returns:
        for each rank, its ``(file index, start, end)`` ranges (records ``[start, end)``), in log order.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    c = [int(x) for x in counts]
    if any(x < 0 for x in c):
        raise ValueError("record counts must be >= 0")
    total = sum(c)
    bounds = [total * r // world_size for r in range(world_size + 1)]
    starts = np.concatenate([[0], np.cumsum(c)]).tolist() if c else [0]
    out: list[list[tuple[int, int, int]]] = []
    for r in range(world_size):
        lo, hi = bounds[r], bounds[r + 1]
        ranges = []
        for i, n in enumerate(c):
            a, b = max(lo, starts[i]), min(hi, starts[i] + n)
            if a < b:
                ranges.append((i, a - starts[i], b - starts[i]))
        out.append(ranges)
    return out


def _default_reader() -> tuple[ReadChunks, CountRecords]:
    """``rbank_torch.logs.read_chunks``/``count_records`` when that module has them, else this module's
    :func:`read_log_range` and :func:`count_log_records` (JSONL, ``.jsonl.gz`` and Parquet logs)."""
    try:
        from . import logs
    except ImportError:  # pragma: no cover - the package always has it
        return read_log_range, count_log_records
    read = getattr(logs, "read_chunks", None) or read_log_range
    count = getattr(logs, "count_records", None) or count_log_records
    return read, count


def distill_files(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    config: DistillationConfig | None = None,
    *,
    read_chunks: ReadChunks | None = None,
    count_records: CountRecords | None = None,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    group: Any = None,
) -> DistillationResult | None:
    """Distil trajectory log files, in one process or sharded over the ranks of ``torchrun``.

    The files, taken in the given order, form one log; its records are cut into one consecutive range per
    rank (:func:`split_records`; file ``i``'s records are counted by rank ``i mod world_size``). Each rank
    reads its ranges with ``read_chunks`` and distils them; :func:`distill_distributed` merges. Rank 0
    writes ``out_dir`` (:func:`write_distilled`) when given.

    Process group: an existing one is used; else, with ``WORLD_SIZE > 1`` in the environment (torchrun),
    one is created from it (``backend``, ``timeout_s``) and destroyed before returning; else one process.

    Args:
        paths: log files (every rank must be able to open the ones it reads).
        out_dir: output folder written by rank 0, or None.
        config: distillation settings (default :class:`DistillationConfig`).
        read_chunks: ``(path, start_line, end_line) -> iterable of trajectory chunks`` for records
            ``[start_line, end_line)`` (0-based, end exclusive); default :func:`read_log_range` (JSONL, ``.gz``,
            Parquet; records without ``query_embedding`` are bad lines there: use the command line for text).
        count_records: ``path -> number of records`` in the numbering of ``read_chunks``; default
            :func:`count_log_records` with the default reader, else :func:`count_lines`.
        backend, timeout_s: for a process group created here.
        group: process group to use instead of the default one.

    Returns:
        the result on rank 0, None on the other ranks.

    Raises:
        DistillationError: too few trajectories in the whole log (on every rank).
        DistributedError: a rank failed (named, with its error) or a collective failed.
        ValueError: bad arguments (in a single process: also unreadable files).
    """
    created = False
    if group is None:
        w, created = init_from_env(backend, timeout_s)
    else:
        w = world_info(group)
    ok = False
    try:
        out = _distill_files(w, [os.fspath(p) for p in paths], out_dir, config, read_chunks, count_records)
        ok = True
        return out
    finally:
        if created:
            leave_group(ok)


def _distill_files(
    w: WorldInfo,
    paths: list[str],
    out_dir: str | os.PathLike | None,
    config: DistillationConfig | None,
    read_chunks: ReadChunks | None,
    count_records: CountRecords | None,
) -> DistillationResult | None:
    t0 = time.perf_counter()
    config = DistillationConfig() if config is None else config
    err: BaseException | None = None
    counts = np.zeros(len(paths), dtype=np.int64)
    try:
        if not paths:
            raise ValueError("no log files given")
        if read_chunks is None:
            read_chunks, default_count = _default_reader()
            count_records = count_records or default_count
        count_records = count_records or count_lines
        for i in range(w.rank, len(paths), w.world_size):
            counts[i] = int(count_records(paths[i]))
    except Exception as e:  # noqa: BLE001
        err = e
    _agree(w, "count log records", err)
    _check_same(w, "count log records", paths=paths)
    counts = _all_reduce(w, torch.from_numpy(counts), "sum", "count log records").numpy()
    ranges = split_records(counts.tolist(), w.world_size)[w.rank]
    assert read_chunks is not None

    def chunks() -> Iterator[Sequence[Trajectory]]:
        for i, a, b in ranges:
            yield from read_chunks(paths[i], a, b)

    result = distill_distributed(chunks(), config, dst=0, group=w.group)
    err = None
    if w.rank == 0 and out_dir is not None:
        try:
            assert result is not None
            write_distilled(out_dir, result, extra={
                "world_size": w.world_size,
                "inputs": paths,
                "records": counts.tolist(),
                "wall_time_s": time.perf_counter() - t0,
            })
        except Exception as e:  # noqa: BLE001
            err = e
    _agree(w, "write the distilled output", err)
    return result


# -- output files ---------------------------------------------------------------------------------------


def _lesson_json(k: KeyLesson) -> dict[str, Any]:
    return {
        "content": k.content,
        "category": str(k.category),
        "importance": k.importance,
        "observation_count": k.observation_count,
        "success_rate": k.success_rate,
        "avg_quality": k.avg_quality,
        "example_actions": k.example_actions,
        "tags": k.tags,
        "source_trajectories": k.source_trajectories,
        "first_observed": k.first_observed.isoformat(),
        "last_observed": k.last_observed.isoformat(),
        "first_observed_us": dt_to_us(k.first_observed),
        "last_observed_us": dt_to_us(k.last_observed),
    }


def write_distilled(out_dir: str | os.PathLike, result: DistillationResult, extra: dict[str, Any] | None = None) -> None:
    """Write a distillation result to a folder (each file atomically):

    * ``lessons.jsonl``: one key lesson per line, most important first (all fields but the embedding);
    * ``distilled.safetensors``: the whole result (embeddings as tensors, the rest as JSON metadata),
      read back by :func:`read_distilled`;
    * ``summary.json``: trajectories processed, memory saved, compression ratio, category summary,
      lesson count, timing and ``extra``.
    """
    from .snapshot import atomic_write_bytes, write_snapshot

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lessons = [_lesson_json(k) for k in result.key_lessons]
    body = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lessons).encode("utf-8")
    atomic_write_bytes(out / "lessons.jsonl", lambda f: f.write(body))
    ks = result.key_lessons
    cs = result.compressed_trajectories
    dim = int(ks[0].embedding.shape[0]) if ks else (int(cs[0].key_embedding.shape[0]) if cs else 0)
    tensors = {
        "lesson_embeddings": torch.stack([k.embedding.float() for k in ks]) if ks else torch.zeros(0, dim),
        "compressed_embeddings": torch.stack([c.key_embedding.float() for c in cs]) if cs else torch.zeros(0, dim),
    }
    meta = {
        "lessons": lessons,
        "compressed": [compressed_meta(c) for c in cs],
        "trajectories_processed": result.trajectories_processed,
        "memory_saved": result.memory_saved,
        "compression_ratio": result.compression_ratio,
        "processing_time_ms": result.processing_time_ms,
        "category_summary": result.category_summary,
        "timestamp_us": dt_to_us(result.timestamp),
    }
    write_snapshot(out / "distilled.safetensors", DISTILLED_FORMAT, tensors, meta)
    summary = {
        "trajectories_processed": result.trajectories_processed,
        "key_lessons": len(ks),
        "compressed_trajectories": len(cs),
        "memory_saved": result.memory_saved,
        "compression_ratio": result.compression_ratio,
        "category_summary": result.category_summary,
        "processing_time_ms": result.processing_time_ms,
        "timestamp": result.timestamp.isoformat(),
    }
    summary.update(extra or {})
    sb = (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    atomic_write_bytes(out / "summary.json", lambda f: f.write(sb))


def read_distilled(out_dir: str | os.PathLike) -> DistillationResult:
    """Load the result written by :func:`write_distilled` (no code is executed from the file).

    Raises:
        rbank_torch.snapshot.SnapshotError: missing, corrupt or foreign file.
    """
    from .snapshot import SnapshotError, read_snapshot

    path = Path(out_dir) / "distilled.safetensors"
    tensors, meta = read_snapshot(path, DISTILLED_FORMAT)
    try:
        le = tensors["lesson_embeddings"]
        ce = tensors["compressed_embeddings"]
        lessons = [
            KeyLesson(
                content=str(x["content"]),
                embedding=le[i].clone(),
                category=PatternCategory.parse(x["category"]),
                importance=float(x["importance"]),
                observation_count=int(x["observation_count"]),
                success_rate=float(x["success_rate"]),
                avg_quality=float(x["avg_quality"]),
                example_actions=[str(a) for a in x["example_actions"]],
                tags=[str(a) for a in x["tags"]],
                source_trajectories=[int(a) for a in x["source_trajectories"]],
                first_observed=us_to_dt(int(x["first_observed_us"])),
                last_observed=us_to_dt(int(x["last_observed_us"])),
            )
            for i, x in enumerate(meta["lessons"])
        ]
        compressed = [
            CompressedTrajectory(
                original_id=int(c["id"]),
                key_embedding=ce[i].clone(),
                verdict=Verdict.from_dict(c["verdict"]),
                quality=float(c["quality"]),
                lessons=[str(a) for a in c["lessons"]],
                key_actions=[str(a) for a in c["key_actions"]],
                timestamp=us_to_dt(int(c["timestamp_us"])),
                step_count=int(c["step_count"]),
                category=PatternCategory.parse(c["category"]),
                compressed_at=us_to_dt(int(c["compressed_at_us"])),
            )
            for i, c in enumerate(meta["compressed"])
        ]
        return DistillationResult(
            compressed_trajectories=compressed,
            key_lessons=lessons,
            trajectories_processed=int(meta["trajectories_processed"]),
            memory_saved=int(meta["memory_saved"]),
            compression_ratio=float(meta["compression_ratio"]),
            processing_time_ms=float(meta["processing_time_ms"]),
            category_summary={str(k): int(v) for k, v in meta["category_summary"].items()},
            timestamp=us_to_dt(int(meta["timestamp_us"])),
        )
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise SnapshotError(f"{path}: corrupt distillation result ({e})") from None


# -- log ranges and the ``rbank distill`` command under torchrun ----------------------------------------


def count_log_records(path: str | os.PathLike) -> int:
    """Records of a trajectory log in the numbering of :func:`read_log_range`: physical lines of a JSONL file
    (``.gz`` decompressed; a last line without a newline counts, blank lines count), rows of a Parquet file."""
    from . import logs as L

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such log file")
    if L.log_kind(p) == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise L.MissingExtraError(f"{p}: reading Parquet logs needs pyarrow") from None
        return int(pq.ParquetFile(str(p)).metadata.num_rows)
    n = 0
    last = b"\n"
    with L._open_text(p) as f:
        while True:
            buf = f.read(1 << 20)
            if not buf:
                break
            n += buf.count(b"\n")
            last = buf[-1:]
    return n + (0 if last == b"\n" else 1)


def iter_log_range(
    path: str | os.PathLike,
    start: int,
    end: int,
    *,
    chunk_size: int = 4096,
    skip_bad: bool = False,
    embed: Callable[[list[str]], torch.Tensor] | None = None,
    stats: Any = None,
    on_error: Callable[[Exception], None] | None = None,
    dim: list[int | None] | None = None,
) -> Iterator[Any]:
    """The :class:`~rbank_torch.logs.LogBatch` chunks of records ``[start, end)`` (0-based, end exclusive; the
    numbering of :func:`count_log_records`) of one log, parsed and validated exactly as
    :func:`~rbank_torch.logs.iter_log_batches` does (bad lines are reported with their line number in the file).

    Args:
        path: a JSONL (optionally ``.gz``) or Parquet log.
        start, end: the record range.
        chunk_size, skip_bad, embed, stats, on_error: as for ``iter_log_batches``.
        dim: one-element holder of the embedding dimension shared by successive calls (first seen fixes it).
    """
    from . import logs as L

    if not 0 <= start <= end:
        raise ValueError(f"need 0 <= start <= end, got start={start}, end={end}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such log file")
    stats = stats if stats is not None else L.ReadStats()
    stats.files += 1
    b = L._ChunkBuilder(str(p), dim if dim is not None else [None], skip_bad, stats, on_error, embed)
    if start == end:
        return
    if L.log_kind(p) == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise L.MissingExtraError(f"{p}: reading Parquet logs needs pyarrow") from None
        pf = pq.ParquetFile(str(p))
        total = max(pf.metadata.num_rows, 1)
        size = p.stat().st_size
        row = 0
        for rb in pf.iter_batches(batch_size=chunk_size):
            n = rb.num_rows
            if row + n <= start:
                row += n
                continue
            lo, hi = max(start - row, 0), min(end - row, n)
            rows = rb.slice(lo, hi - lo).to_pylist()
            for j, obj in enumerate(rows):
                stats.lines += 1
                b.add(row + lo + j + 1, L._drop_none(obj), None, 0)
            b.nbytes += int(size * len(rows) / total)
            row += n
            out = b.build()
            if out is not None:
                yield out
            if row >= end:
                break
        return
    yield from L._iter_jsonl(p, b, chunk_size, True, start, end)


def read_log_range(path: str, start: int, end: int) -> Iterator[Sequence[Trajectory]]:
    """Trajectory chunks of records ``[start, end)`` of a log (the default reader of :func:`distill_files`)."""
    for batch in iter_log_range(path, start, end):
        yield batch.trajectories


def torchrun_world_size() -> int:
    """The ``WORLD_SIZE`` that ``torchrun`` put in the environment (1 when absent or unreadable)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1") or "1"), 1)
    except ValueError:
        return 1


def launched_by_torchrun() -> bool:
    """True when this process is one of several ranks started by ``torchrun`` (``WORLD_SIZE > 1``)."""
    return torchrun_world_size() > 1


def cli_distill(args: Any) -> int:
    """``rbank distill`` on every rank of a ``torchrun`` launch (the command line hands over here when
    ``WORLD_SIZE > 1``).

    The files, in the given order, form one log whose records are split into one consecutive range per rank
    (:func:`split_records`); every rank reads its ranges with the command's options (``--chunk-size``,
    ``--skip-bad``, text model) and :func:`distill_distributed` merges; rank 0 writes the same five files as
    the single-process command (``lessons.jsonl``, ``lessons.safetensors``, ``compressed.jsonl``,
    ``compressed.safetensors``, ``summary.json``) and prints the report. The files are identical to those of
    one process but for the times of the run (``compressed_at``, ``timestamp``, the timings in the summary).

    Every rank must be able to read the files it is given (a shared or copied folder); the output folder
    is only written on rank 0. The collective timeout is ``RBANK_DIST_TIMEOUT_S`` seconds (default 1800).

    Returns:
        the exit code (0).

    Raises:
        rbank_torch.cli.CliError: bad options or input, too few trajectories (as the single-process command).
        DistributedError: a rank failed (named, with its error) or a collective failed / timed out.
    """
    from . import cli as C
    from .logs import MAX_KEPT_ERRORS, ReadStats

    try:
        timeout_s = float(os.environ.get("RBANK_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        if not timeout_s > 0:
            raise ValueError
    except ValueError:
        raise C.CliError(
            f"RBANK_DIST_TIMEOUT_S must be a positive number of seconds, got {os.environ['RBANK_DIST_TIMEOUT_S']!r}"
        ) from None
    w, created = init_from_env(None, timeout_s)
    ok = False
    try:
        code = _cli_distill(w, args, C, ReadStats, MAX_KEPT_ERRORS)
        ok = True
        return code
    finally:
        if created:
            leave_group(ok)


def _cli_distill(w: WorldInfo, args: Any, C: Any, ReadStats: Any, max_errors: int) -> int:
    t0 = time.perf_counter()
    out = C._Out(args)
    if w.rank != 0:  # rank 0 reports; the others only warn (bad lines, with their file and line number)
        out.quiet = True
        out.say = lambda *a: None
        out.emit = lambda doc: None
    paths = [str(p) for p in args.logs]
    err: BaseException | None = None
    cfg: DistillationConfig | None = None
    counts = np.zeros(len(paths), dtype=np.int64)
    try:
        C._check_inputs(paths)
        cfg = C.distill_config(args)
        for i in range(w.rank, len(paths), w.world_size):
            counts[i] = count_log_records(paths[i])
    except Exception as e:  # noqa: BLE001 - reported on every rank by the agreement step
        err = e
    _agree(w, "count log records", err, passthrough=(C.CliError,))
    _check_same(w, "count log records", paths=paths, out=str(args.out))
    assert cfg is not None
    counts = _all_reduce(w, torch.from_numpy(counts), "sum", "count log records").numpy()
    ranges = split_records(counts.tolist(), w.world_size)[w.rank]
    out.note(f"distilling over {w.world_size} ranks ({w.backend}); rank 0 reads {sum(b - a for _, a, b in ranges)} "
             f"of {int(counts.sum())} records")

    embedder = C._LazyEmbedder(args.model, args.device, args.batch_size, out)
    stats = ReadStats()
    bad_path = getattr(args, "bad_lines", None)
    if bad_path is not None and w.world_size > 1:
        bad_path = f"{bad_path}.rank{w.rank}"
    reporter = C._BadLineReporter(out, path=bad_path)
    holder: list[int | None] = [None]

    def chunks() -> Iterator[Sequence[Trajectory]]:
        with out.bar(total=sum(b - a for _, a, b in ranges), unit="rec", desc="distill (rank 0)") as bar:
            for i, a, b in ranges:
                for batch in iter_log_range(
                    paths[i], a, b, chunk_size=args.chunk_size, skip_bad=args.skip_bad, embed=embedder,
                    stats=stats, on_error=reporter, dim=holder,
                ):
                    yield batch.trajectories
                    bar.update(len(batch))

    try:
        result = distill_distributed(chunks(), cfg, dst=0, group=w.group)
    except DistillationError as e:
        raise C.CliError(f"cannot distil: {e} (lower it with --min-trajectories)") from None
    read_s = time.perf_counter() - t0

    # the read statistics of every rank, summed on rank 0 (the kept error messages in log order)
    mine = {"lines": stats.lines, "bad_lines": stats.bad_lines, "errors": stats.errors[:max_errors],
            "embedded_from_text": stats.embedded_from_text, "dim": holder[0]}
    got = _gather(w, _pack({}, mine), 0, "gather read statistics")
    dims = _all_gather_i64(w, [-1 if holder[0] is None else int(holder[0])], "gather read statistics")[:, 0]
    seen = sorted({int(d) for d in dims.tolist() if d >= 0})
    if len(seen) > 1:
        raise DistributedError(
            "the ranks' shares of the log have embeddings of different dimensions "
            + ", ".join(f"rank {r}: {int(d)}" for r, d in enumerate(dims.tolist()) if d >= 0)
        )

    err = None
    summary: dict[str, Any] = {}
    if w.rank == 0:
        try:
            assert result is not None and got is not None
            read_counts = {"lines": 0, "bad_lines": 0, "embedded_from_text": 0}
            errors: list[str] = []
            for r, blob in enumerate(got):
                _, s = _unpack(blob, f"read statistics of rank {r}")
                for k in read_counts:
                    read_counts[k] += int(s[k])
                errors.extend(str(x) for x in s["errors"])
            total: dict[str, Any] = {**read_counts, "errors": errors[:max_errors]}
            summary = _write_cli_distilled(C, args, paths, cfg, result, total, read_s, t0)
        except Exception as e:  # noqa: BLE001
            err = e
    _agree(w, "write the distilled output", err, passthrough=(C.CliError,))
    if w.rank != 0:
        return 0
    assert result is not None
    out.emit({"out": str(Path(args.out)), **summary})
    out.say(
        f"distilled {summary['trajectories_processed']} trajectories from {len(paths)} file(s) on "
        f"{w.world_size} ranks in {summary['wall_seconds']:.1f}s ({summary['trajectories_per_s']}/s): "
        f"{summary['key_lessons']} key lessons, {summary['compressed_trajectories']} compressed trajectories "
        f"-> {Path(args.out)}"
    )
    for lesson in result.key_lessons[:5]:
        out.say(f"  [{lesson.observation_count:>6}x] {lesson.content}")
    if summary["bad_lines"]:
        out.say(f"  {summary['bad_lines']} bad line(s) skipped")
    return 0


def _write_cli_distilled(
    C: Any, args: Any, paths: list[str], cfg: DistillationConfig, result: DistillationResult,
    stats: dict[str, Any], read_s: float, t0: float,
) -> dict[str, Any]:
    """Write the five files of ``rbank distill`` (same formats, same bytes but for the times of the run)."""
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = dict(C.DISTILL_FILES)
    tmp = {k: out_dir / f".{v}.partial" for k, v in names.items()}
    cts = result.compressed_trajectories
    ok = False
    appender = C._SafetensorsAppender(tmp["compressed_embeddings"])
    try:
        with open(tmp["compressed"], "w", encoding="utf-8", buffering=1 << 20) as comp_f:
            step = 4096
            for s in range(0, len(cts), step):
                part = cts[s : s + step]
                emb = torch.stack([c.key_embedding for c in part]).to(torch.float32)
                appender.append(emb, np.fromiter((c.original_id for c in part), dtype=np.int64, count=len(part)))
                comp_f.write("".join(
                    json.dumps(C.compressed_to_json(c, s + j), ensure_ascii=False, separators=(",", ":")) + "\n"
                    for j, c in enumerate(part)
                ))
        ks = result.key_lessons
        dim = appender.dim or (int(ks[0].embedding.shape[0]) if ks else 0)
        appender.close({"format": "rbank_torch.distill.compressed", "rows": str(len(cts)), "dim": str(dim)})
        C.write_lesson_files(tmp["lessons"], tmp["lesson_embeddings"], ks, dim)
        elapsed = time.perf_counter() - t0
        summary = C.distill_summary(
            paths, result, len(cts), stats["lines"], stats["bad_lines"], stats["errors"],
            stats["embedded_from_text"], args.model, dim, read_s, elapsed, cfg,
        )
        tmp["summary"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for k, v in names.items():
            os.replace(tmp[k], out_dir / v)
        ok = True
    finally:
        if not ok:
            if not appender.f.closed:
                appender.abort()
            for p in tmp.values():
                try:
                    p.unlink()
                except OSError:
                    pass
    return summary


# ---------------------------------------------------------------------------------------------------------
# Pairs above a threshold and the leader scan.

_BLOCK_ROWS = 1024
_BLOCK_COLS = 4096
#: rows per tile on CUDA (fewer, larger tiles: each tile synchronises once for its candidates)
_BLOCK_ROWS_CUDA = 4096


def _gemm_dtype(precision: str, device: torch.device) -> torch.dtype:
    """bfloat16 tiles for "bf16" on CPU; float32 elsewhere (on CUDA, cuBLAS may reduce bf16 split-K partial
    sums in bfloat16, which the bf16 margin does not cover), as in :mod:`rbank_torch.kernels.pairs`."""
    return torch.bfloat16 if precision == "bf16" and device.type == "cpu" else torch.float32


def _floor_to(x: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` that is ≤ ``x``."""
    t = torch.tensor(x, dtype=torch.float64).to(dtype)
    while float(t) > x:
        t = torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype))
    return float(t)


def _unit_rows(emb: torch.Tensor, norms64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``fl(e / ||e||64)`` in ``dtype`` (rows of norm ≤ ZERO_NORM become zero), as the candidate margin assumes."""
    out = torch.empty(emb.shape, dtype=dtype, device=emb.device)
    step = 4096
    for r0 in range(0, emb.shape[0], step):
        e = emb[r0 : r0 + step].to(torch.float64)
        nr = norms64[r0 : r0 + e.shape[0]]
        inv = torch.where(nr > ZERO_NORM, 1.0 / nr.clamp(min=ZERO_NORM), torch.zeros_like(nr))
        out[r0 : r0 + e.shape[0]] = (e * inv[:, None]).to(torch.float32).to(dtype)
    return out


def triangle_bands(row_work: Sequence[int] | np.ndarray, world_size: int) -> list[tuple[int, int]]:
    """Cut rows into ``world_size`` bands of consecutive rows with equal total work.

    For the upper triangle of an ``N × N`` similarity matrix row ``i`` has ``N - i`` entries (with categories:
    up to the end of its category's span), so equal bands of *work* are short at the top and long at the
    bottom: with ``N`` rows and 2 ranks the cut is at ``N·(1 - 1/√2) ≈ 0.29·N``.

    Args:
        row_work: ``[N]`` non-negative work per row.
        world_size: number of bands.

    Returns:
        ``world_size`` half-open row ranges ``(start, end)`` covering ``[0, N)`` in order (some may be empty).
    """
    wk = np.asarray(row_work, dtype=np.float64)
    n = wk.shape[0]
    cum = np.cumsum(wk)
    total = float(cum[-1]) if n else 0.0
    cuts = [0]
    for r in range(1, world_size):
        if total > 0:
            target = total * r / world_size
            a = int(np.searchsorted(cum, target, side="left")) + 1  # first cut with prefix >= target
            below = float(cum[a - 2]) if a >= 2 else 0.0
            if a - 1 >= 0 and target - below < float(cum[min(a, n) - 1]) - target:
                a -= 1  # the cut just before is closer
        else:
            a = n * r // world_size
        cuts.append(min(max(a, cuts[-1]), n))
    cuts.append(n)
    return [(cuts[r], cuts[r + 1]) for r in range(world_size)]


class _Band:
    """One rank's share of the pair search: rows ``[a, b)`` of the (category-sorted) order and the rows it reads."""

    def __init__(self, emb: torch.Tensor, cats: torch.Tensor | None, world: int, rank: int) -> None:
        n = emb.shape[0]
        self.n = n
        if cats is not None:
            sorted_cats, perm = torch.sort(cats.cpu(), stable=True)
            ends = torch.searchsorted(sorted_cats, sorted_cats, right=True)  # [N] end of each row's span
            self.perm: torch.Tensor | None = perm
            self.cats_sorted: torch.Tensor | None = sorted_cats
            self.ends: torch.Tensor | None = ends
        else:
            self.perm = None
            self.cats_sorted = None
            self.ends = None
        if self.ends is not None:
            work = (self.ends - torch.arange(n)).numpy()
        else:
            work = np.arange(n, 0, -1, dtype=np.int64)
        self.a, self.b = triangle_bands(work, world)[rank]
        if self.a >= self.b:
            self.lo = self.hi = self.a
        else:
            self.lo = self.a
            self.hi = n if self.ends is None else int(self.ends[self.b - 1])

    def col_end(self, r1: int) -> int:
        return self.n if self.ends is None else int(self.ends[r1 - 1])


def _band_pairs(
    emb: torch.Tensor,
    threshold: float,
    cats: torch.Tensor | None,
    world: int,
    rank: int,
    block_rows: int,
    margin: float,
    precision: str,
) -> torch.Tensor:
    """The pairs of this rank's band, ``[K, 2]`` int64 original row indices ``i < j``, unsorted."""
    device = emb.device
    band = _Band(emb, cats, world, rank)
    if band.a >= band.b:
        return torch.empty((0, 2), dtype=torch.int64, device=device)
    lo, hi = band.lo, band.hi
    if band.perm is not None:
        idx = band.perm[lo:hi].to(device)
        src = emb.index_select(0, idx)  # [hi-lo, D]
        cats_loc = band.cats_sorted[lo:hi].to(device)  # type: ignore[index]
    else:
        src = emb[lo:hi]
        cats_loc = None
    norms = row_norms64(src)  # [hi-lo]
    perm = band.perm.to(device) if band.perm is not None else None
    gemm_dtype = _gemm_dtype(precision, device)
    u = _unit_rows(src, norms, gemm_dtype)
    thr_lo = _floor_to(threshold - margin, gemm_dtype)
    block_cols = block_rows * (_BLOCK_COLS // _BLOCK_ROWS)
    score = torch.empty(block_rows * block_cols, dtype=gemm_dtype, device=device)
    hit = torch.empty(block_rows * block_cols, dtype=torch.bool, device=device)
    parts: list[torch.Tensor] = []
    for r0 in range(band.a, band.b, block_rows):
        r1 = min(r0 + block_rows, band.b)
        end = band.col_end(r1)
        for c0 in range(r0, end, block_cols):
            c1 = min(c0 + block_cols, end)
            s = score[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            h = hit[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            torch.mm(u[r0 - lo : r1 - lo], u[c0 - lo : c1 - lo].T, out=s)
            torch.gt(s, thr_lo, out=h)
            ij = h.nonzero()
            if ij.shape[0] == 0:
                continue
            r = ij[:, 0] + (r0 - lo)
            c = ij[:, 1] + (c0 - lo)
            keep = r < c
            if cats_loc is not None:
                keep &= cats_loc[r] == cats_loc[c]
            r, c = r[keep], c[keep]
            if r.numel() == 0:
                continue
            sim = pair_cosine64(src, r, c, norms)
            ok = sim > threshold
            r, c = r[ok] + lo, c[ok] + lo
            if perm is not None:
                r, c = perm[r], perm[c]
            if r.numel():
                parts.append(torch.stack([r, c], dim=1))
    if not parts:
        return torch.empty((0, 2), dtype=torch.int64, device=device)
    return torch.cat(parts)


def _check_pair_args(emb: Any, threshold: Any, categories: Any, precision: str, block_size: int | None, margin: float | None) -> tuple[torch.Tensor, float, torch.Tensor | None, int, float]:
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or not emb.dtype.is_floating_point:
        got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise ValueError(f"emb must be a floating torch.Tensor [N, D], got {got}")
    if emb.shape[1] == 0:
        raise ValueError("emb must have D >= 1 columns")
    try:
        thr = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number, got {threshold!r}") from None
    if not math.isfinite(thr):
        raise ValueError(f"threshold must be finite, got {thr}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    cats = None
    if categories is not None:
        cats = categories if isinstance(categories, torch.Tensor) else torch.as_tensor(np.asarray(categories))
        if cats.dim() != 1 or cats.shape[0] != emb.shape[0]:
            raise ValueError(f"categories must be 1-D [N] with N = {emb.shape[0]}, got shape {tuple(cats.shape)}")
        if cats.dtype.is_floating_point or cats.dtype.is_complex or cats.dtype == torch.bool:
            raise ValueError(f"categories must hold integer codes, got dtype {cats.dtype}")
        cats = cats.to(torch.int64)
    default_block = _BLOCK_ROWS_CUDA if emb.device.type == "cuda" else _BLOCK_ROWS
    block = default_block if block_size is None else int(block_size)
    if block < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    # the margin must cover the GEMM torch.mm really runs (tf32 when the global matmul settings allow it)
    m_prec = _torch_margin_precision(precision, emb.device, _gemm_dtype(precision, emb.device))
    m = pair_margin(int(emb.shape[1]), m_prec) if margin is None else float(margin)
    if not (math.isfinite(m) and m >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    return emb, thr, cats, block, m


def pairs_above_distributed(
    emb: torch.Tensor,
    threshold: float,
    categories: torch.Tensor | None = None,
    *,
    dst: int | None = 0,
    block_size: int | None = None,
    margin: float | None = None,
    precision: str = "fp32",
    group: Any = None,
) -> torch.Tensor | None:
    """All pairs ``(i, j)``, ``i < j``, with float64 cosine above ``threshold`` (same category when given),
    found by all ranks together; exactly the output of :func:`~rbank_torch.kernels.pairs.pairs_above`.

    Every rank passes the same ``emb`` (it may be memory-mapped: a rank reads only rows ``[a, N)`` of its
    band, or the rows of the categories its band touches). The upper triangle is cut into equal-area
    bands (:func:`triangle_bands`); each rank runs blocked GEMM tiles with the candidate margin of
    :func:`~rbank_torch.kernels.pairs.pair_margin` and re-checks candidates with
    :func:`~rbank_torch.kernels.pairs.pair_cosine64`, so the pair set does not depend on the number of ranks.

    Args:
        emb: ``[N, D]`` embeddings (any float dtype; CPU for gloo, CUDA for NCCL).
        threshold: similarity threshold (strict ``>``).
        categories: optional ``[N]`` integer codes; pairs must have equal codes.
        dst: rank that receives the pairs, or None for every rank.
        block_size: rows per tile (columns: 4×; default 1024, 4096 on CUDA).
        margin: candidate margin (default ``pair_margin(D, precision)``).
        precision: GEMM precision of the candidate pass ("fp32", "tf32", "bf16").
        group: process group (default group; none initialised means one process).

    Returns:
        ``[P, 2]`` int64 pairs sorted by ``i`` then ``j`` (CPU) on ``dst`` (every rank when ``dst`` is None);
        None on the other ranks.
    """
    w = world_info(group)
    if dst is not None and not 0 <= dst < w.world_size:
        raise ValueError(f"dst must be a rank in [0, {w.world_size}) or None, got {dst}")
    err: BaseException | None = None
    payload = b""
    n = 0
    try:
        emb, thr, cats, block, m = _check_pair_args(emb, threshold, categories, precision, block_size, margin)
        n = int(emb.shape[0])
        if emb.numel() and not bool(torch.isfinite(emb).all()):
            raise ValueError("emb must hold finite values (found NaN or inf)")
        found = _band_pairs(emb, thr, cats, w.world_size, w.rank, block, m, precision)
        payload = _pack({"pairs": found.cpu()}, {"n": n})
    except Exception as e:  # noqa: BLE001
        err = e
    _agree(w, "find pairs in this rank's band", err)
    _check_same(w, "find pairs in this rank's band", n=n, dim=int(emb.shape[1]), threshold=thr, margin=m, precision=precision)
    if dst is None:
        got: list[bytes] | None = _exchange(w, [payload] * w.world_size, "gather pairs")
    else:
        got = _gather(w, payload, dst, "gather pairs")
    if got is None:
        return None
    parts = []
    for r, blob in enumerate(got):
        t, _ = _unpack(blob, f"pairs of rank {r}")
        p = t.get("pairs")
        if p is None or p.dtype != torch.int64 or p.dim() != 2 or p.shape[1] != 2:
            raise DistributedError(f"malformed pairs of rank {r}")
        parts.append(p)
    pairs = torch.cat(parts) if parts else torch.empty((0, 2), dtype=torch.int64)
    if pairs.shape[0] > 1:
        pairs = pairs[torch.argsort(pairs[:, 0] * n + pairs[:, 1])]
    return pairs.contiguous()


def leaders_distributed(
    emb: torch.Tensor,
    threshold: float,
    categories: torch.Tensor | None = None,
    eligible: torch.Tensor | None = None,
    *,
    block_size: int | None = None,
    margin: float | None = None,
    precision: str = "fp32",
    group: Any = None,
) -> torch.Tensor:
    """Leader assignment of ``merge_similar`` (SPEC §3) computed by all ranks; on every rank.

    Pairs by :func:`pairs_above_distributed` (gathered on rank 0), :func:`~rbank_torch.kernels.pairs.leader_scan`
    on rank 0, leaders broadcast. Equal to ``leader_scan(N, pairs_above(emb, threshold, categories), eligible)``.

    Args:
        emb: ``[N, D]`` embeddings, rows in scan order (ascending id), the same on every rank.
        threshold: similarity threshold (strict ``>``).
        categories: optional ``[N]`` integer codes (merge only within a category).
        eligible: optional ``[N]`` bool; ineligible rows neither lead nor get absorbed.
        block_size, margin, precision, group: as in :func:`pairs_above_distributed`.

    Returns:
        ``[N]`` int64 (CPU): ``leader[i] == i`` for leaders and untouched rows, else the absorbing row.
    """
    w = world_info(group)
    n = int(emb.shape[0]) if isinstance(emb, torch.Tensor) else 0
    pairs = pairs_above_distributed(
        emb, threshold, categories, dst=0, block_size=block_size, margin=margin, precision=precision, group=group
    )
    err: BaseException | None = None
    leader: torch.Tensor | None = None
    if w.rank == 0:
        try:
            assert pairs is not None
            el = None if eligible is None else torch.as_tensor(eligible).cpu()
            leader = leader_scan(n, pairs, el).cpu()
        except Exception as e:  # noqa: BLE001
            err = e
    _agree(w, "leader scan", err)
    return _broadcast_tensor(w, leader, (n,), torch.int64, 0, "broadcast leaders")


def store_merge_map_distributed(store: Any, threshold: float, *, by_category: bool = False, group: Any = None) -> dict[int, int]:
    """``{absorbed id: leader id}`` of ``store.merge_similar(threshold)`` (SPEC §3), computed by all ranks
    on their copies of one :class:`~rbank_torch.store.PatternStore` (on every rank).

    Args:
        store: the pattern store (the same content on every rank; checked by size).
        threshold: similarity threshold (strict ``>``).
        by_category: merge only within a category (the consolidation rule of SPEC §4).
        group: process group.
    """
    cols = store.columns()
    ids = cols["id"].cpu()
    cats = cols["category_code"].to(torch.int64) if by_category else None
    leader = leaders_distributed(cols["embedding"], threshold, cats, group=group)
    pos = torch.arange(leader.numel())
    absorbed = torch.nonzero(leader != pos).flatten()
    return dict(zip(ids[absorbed].tolist(), ids[leader[absorbed]].tolist()))


# ---------------------------------------------------------------------------------------------------------
# k-means.


def _exact_scale(w: WorldInfo, colmax: torch.Tensor, n_total: int) -> torch.Tensor:
    """Per-column power-of-two scales that turn values into integers whose sums stay exact in float64.

    With ``|x| ≤ m`` in a column and ``N`` rows, a value is rounded to a multiple of ``2^(e - b)`` where
    ``m < 2^e`` and ``b = 52 - ⌈log2(N + 1)⌉``: any sum of up to N such values, in any order, is an integer
    multiple below ``2^52`` and therefore exact in float64.
    """
    gmax = _all_reduce(w, colmax.to(torch.float64), "max", "exact sums (column ranges)")
    bits = 52 - math.ceil(math.log2(n_total + 1))
    if bits < 20:
        raise ValueError(f"too many rows ({n_total}) for exact float64 sums")
    _, e = torch.frexp(gmax)  # gmax = f·2^e, 0.5 ≤ f < 1, so gmax < 2^e
    e = torch.where(gmax > 0, e, torch.zeros_like(e)).to(torch.float64)
    return torch.pow(2.0, bits - e)  # [D] float64


#: k-means keeps the quantised rows (float64) for all its iterations up to this many values (128 MiB)
_KMEANS_QUANT_CACHE = 1 << 24


def _quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x.to(torch.float64) * scale)


def _qcolsum(x: torch.Tensor, scale: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Column sums of the quantised rows (exact in float64), ``[D]`` on the CPU."""
    out = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for r0 in range(0, x.shape[0], batch_size):
        out += _quantize(x[r0 : r0 + batch_size], scale).sum(dim=0)
    return out.cpu()


def _row_sq64(x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``Σ x²`` of every row in float64, ``[n]``, computed in row blocks."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for r0 in range(0, x.shape[0], batch_size):
        xb = x[r0 : r0 + batch_size].to(torch.float64)
        out[r0 : r0 + xb.shape[0]] = (xb * xb).sum(dim=1)
    return out


def _record_d2(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distances of record ``Σ (x − c)²`` in float64, row by row: ``x [m, D]``, ``c [m, D]`` → ``[m]``."""
    d = x.to(torch.float64) - c.to(torch.float64)
    return (d * d).sum(dim=1)


def _kmeans_assign(
    x: torch.Tensor, xn: torch.Tensor, c: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Nearest centroid of every row by the squared distance of record, ties to the lowest index.

    A blocked GEMM gives ``||c||² − 2 x·c``; rows whose two best values are closer than twice the GEMM's
    error bound are decided by float64 distances, so the decision does not depend on the blocking.
    """
    n, d = x.shape
    k = c.shape[0]
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    if n == 0:
        return out
    u = 2.0**-53 if x.dtype == torch.float64 else 2.0**-24
    gamma = (d + 2) * u / (1.0 - (d + 2) * u)
    cc = (c * c).sum(dim=1)  # [k]
    ct = c.T.contiguous()  # [D, k]
    cmax = float(torch.sqrt(cc.to(torch.float64).max()))
    c64 = c.to(torch.float64)
    chunk = max(1, (1 << 22) // max(k * d, 1))
    for r0 in range(0, n, batch_size):
        r1 = min(r0 + batch_size, n)
        part = torch.addmm(cc, x[r0:r1], ct, alpha=-2.0)  # [b, k]
        if k == 1:
            out[r0:r1] = 0
            continue
        vals, idx = part.topk(2, dim=1, largest=False)  # ascending
        best = idx[:, 0].clone()
        gap = (vals[:, 1] - vals[:, 0]).to(torch.float64)
        xr = xn[r0:r1]
        bound = 2.0 * (2.0 * gamma * (cmax * cmax + 2.0 * xr * cmax) + 2.0**-40 * (xr + cmax) ** 2) + 1e-300
        flagged = torch.nonzero(gap <= bound).flatten()
        for f0 in range(0, flagged.numel(), chunk):
            f = flagged[f0 : f0 + chunk]
            xf = x[r0 + f].to(torch.float64)  # [m, D]
            diff = xf[:, None, :] - c64[None, :, :]  # [m, k, D]
            best[f] = (diff * diff).sum(dim=2).argmin(dim=1)
        out[r0:r1] = best
    return out


def kmeans_distributed(
    x_local: torch.Tensor,
    k: int,
    *,
    iters: int = 50,
    seed: int = 0,
    tol: float = 1e-4,
    spherical: bool = False,
    batch_size: int = 16384,
    init: torch.Tensor | None = None,
    init_sample: int = 1 << 18,
    group: Any = None,
) -> KMeansResult:
    """k-means over rows sharded across ranks (the algorithm of :func:`rbank_torch.kernels.kmeans.kmeans`).

    Rank ``r`` passes its rows (the global row order is rank order, then local order). Steps:

    * centring (or, with ``spherical``, unit rows) with the exact global mean;
    * init broadcast from rank 0: ``init`` centroids given on rank 0, else k-means++
      (:func:`~rbank_torch.kernels.kmeans.kmeans_plusplus`, seeded by ``seed``) on rank 0 over all rows, or
      over ``init_sample`` evenly spaced rows when there are more;
    * Lloyd iterations: local assignments (blocked GEMM, near-ties decided in float64), all-reduced
      counts and exact centroid sums (values rounded to a per-column power-of-two grid fine enough that
      float64 sums are exact in any order; see :func:`_exact_scale`); an empty cluster takes the row farthest
      from its centroid (ties: lowest global index); stop after ``iters`` updates, when no assignment
      changes, or when the squared centroid shift is ≤ ``tol`` × the mean per-feature variance.

    Every reduction is exact and every decision is made per row, so the result is bitwise the same for any
    number of ranks and any split of the rows (one process included). Against
    :func:`~rbank_torch.kernels.kmeans.kmeans` (float32 running sums) centroids agree to float32
    rounding and assignments agree except for rows within rounding of a tie.

    Args:
        x_local: ``[n_r, D]`` this rank's rows (float32 or float64; ``n_r`` may be 0).
        k: number of clusters (``1 <= k <= N``).
        iters, seed, tol, spherical, batch_size: as in :func:`~rbank_torch.kernels.kmeans.kmeans`.
        init: ``[k, D]`` initial centroids, read on rank 0 only (None: k-means++).
        init_sample: most rows k-means++ sees on rank 0.
        group: process group (default group; none initialised means one process).

    Returns:
        :class:`~rbank_torch.kernels.kmeans.KMeansResult`: global ``centroids``, ``sizes``, ``inertia`` and
        ``iterations`` (the same on every rank) and ``assignments`` of this rank's rows.
    """
    return _kmeans_exact(
        world_info(group), x_local, k, iters=iters, seed=seed, tol=tol, spherical=spherical,
        batch_size=batch_size, init=init, init_sample=init_sample,
    )


def kmeans_exact(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 50,
    seed: int = 0,
    tol: float = 1e-4,
    spherical: bool = False,
    batch_size: int = 16384,
    init: torch.Tensor | None = None,
    init_sample: int = 1 << 18,
) -> KMeansResult:
    """:func:`kmeans_distributed` in this process alone (whatever process group exists): the result a
    sharded run gives, bit for bit, for any number of ranks and any split of the rows."""
    return _kmeans_exact(
        WorldInfo(0, 1, None, torch.device("cpu"), None), x, k, iters=iters, seed=seed, tol=tol,
        spherical=spherical, batch_size=batch_size, init=init, init_sample=init_sample,
    )


def _kmeans_exact(
    w: WorldInfo,
    x_local: torch.Tensor,
    k: int,
    *,
    iters: int,
    seed: int,
    tol: float,
    spherical: bool,
    batch_size: int,
    init: torch.Tensor | None,
    init_sample: int,
) -> KMeansResult:
    err: BaseException | None = None
    try:
        if not isinstance(x_local, torch.Tensor) or x_local.dim() != 2 or not x_local.dtype.is_floating_point:
            got = tuple(x_local.shape) if isinstance(x_local, torch.Tensor) else type(x_local).__name__
            raise ValueError(f"x_local must be a floating torch.Tensor [n, D], got {got}")
        if x_local.numel() and not bool(torch.isfinite(x_local).all()):
            raise ValueError("x_local must hold finite values (found NaN or inf)")
        for name, v, lo in (("k", k, 1), ("iters", iters, 0), ("batch_size", batch_size, 1), ("init_sample", init_sample, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
            raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    except Exception as e:  # noqa: BLE001
        err = e
    _agree(w, "k-means arguments", err)
    dtype = torch.float64 if x_local.dtype == torch.float64 else torch.float32
    d = int(x_local.shape[1])
    _check_same(w, "k-means arguments", k=k, iters=iters, seed=seed, tol=float(tol), spherical=bool(spherical), dim=d, dtype=str(dtype))
    sizes_all = _all_gather_i64(w, [int(x_local.shape[0])], "k-means row counts")[:, 0]
    n_total = int(sizes_all.sum())
    offset = int(sizes_all[: w.rank].sum())
    if not 1 <= k <= n_total:
        raise ValueError(f"k must be within [1, N] = [1, {n_total}], got {k}")
    dev = x_local.device
    X = x_local.to(dtype)
    n = X.shape[0]

    # centring (exact global mean) or unit rows
    shift0: torch.Tensor | None = None
    if spherical:
        X = _normalize_rows(X)
    else:
        scale = _exact_scale(w, X.abs().amax(dim=0).cpu() if n else torch.zeros(d), n_total)
        colsum = _all_reduce(w, _qcolsum(X, scale.to(dev), batch_size), "sum", "k-means mean")
        shift0 = (colsum / scale / n_total).to(dtype).to(dev)
        X = X - shift0
    X = X.contiguous()
    scale = _exact_scale(w, X.abs().amax(dim=0).cpu() if n else torch.zeros(d), n_total).to(dev)
    sq = _row_sq64(X, batch_size)  # [n]
    xn = torch.sqrt(sq)  # row norms (error bound of the GEMM only)

    C = _kmeans_init(w, X, offset, n_total, k, seed, init, init_sample, shift0, spherical, dtype)
    C = C.to(dev)
    # tolerance: mean per-feature variance, E||x||²/D − ||E x||²/D, from exact sums
    sq = sq[:, None]  # [n, 1]
    sq_scale = _exact_scale(w, sq.amax(dim=0).cpu() if n else torch.zeros(1), n_total).to(dev)
    tot_sq = _all_reduce(w, _qcolsum(sq, sq_scale, batch_size), "sum", "k-means variance")
    tot_x = _all_reduce(w, _qcolsum(X, scale, batch_size), "sum", "k-means variance")
    mean = tot_x / scale.cpu() / n_total
    var = max(float(tot_sq[0] / sq_scale.cpu()[0]) / n_total - float((mean * mean).sum()), 0.0) / d
    tol_abs = float(tol) * var

    assign = _kmeans_assign(X, xn, C, batch_size)
    # the quantised rows, once for every iteration when they fit (they are exact integers times a power of two,
    # so the sums below are the same whichever way they are computed)
    Xq = _quantize(X, scale) if n * d <= _KMEANS_QUANT_CACHE else None
    it = 0
    while it < iters:
        counts = _all_reduce(w, torch.bincount(assign.cpu(), minlength=k), "sum", "k-means counts")
        sums = torch.zeros((k, d), dtype=torch.float64, device=dev)
        for r0 in range(0, n, batch_size):
            xq = Xq[r0 : r0 + batch_size] if Xq is not None else _quantize(X[r0 : r0 + batch_size], scale)
            sums.index_add_(0, assign[r0 : r0 + batch_size], xq)
        sums = _all_reduce(w, sums.cpu(), "sum", "k-means sums")
        C_new = (sums / scale.cpu() / counts.clamp(min=1).to(torch.float64)[:, None]).to(dtype).to(dev)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            C_new[empty.to(dev)] = _farthest_rows(w, X, C, assign, offset, int(empty.numel()), batch_size).to(dev)
        if spherical:
            C_new = _normalize_rows(C_new)
        shift = float(((C_new - C) ** 2).sum())
        C = C_new
        it += 1
        new_assign = _kmeans_assign(X, xn, C, batch_size)
        changed = int((new_assign != assign).sum())
        changed = int(_all_reduce(w, torch.tensor([changed], dtype=torch.int64), "sum", "k-means changes")[0])
        assign = new_assign
        if changed == 0 or shift <= tol_abs:
            break

    sizes = _all_reduce(w, torch.bincount(assign.cpu(), minlength=k), "sum", "k-means sizes")
    d2 = torch.cat([_record_d2(X[r0 : r0 + batch_size], C.index_select(0, assign[r0 : r0 + batch_size])) for r0 in range(0, n, batch_size)]) if n else torch.zeros(0, dtype=torch.float64)
    d2 = d2[:, None]
    d2_scale = _exact_scale(w, d2.amax(dim=0).cpu() if n else torch.zeros(1), n_total).to(dev)
    inertia_q = _all_reduce(w, _qcolsum(d2, d2_scale, batch_size), "sum", "k-means inertia")
    inertia = float(inertia_q[0] / d2_scale.cpu()[0])
    if shift0 is not None:
        C = C + shift0
    return KMeansResult(centroids=C, assignments=assign, sizes=sizes.to(dev), inertia=inertia, iterations=it)


def _kmeans_init(
    w: WorldInfo,
    X: torch.Tensor,
    offset: int,
    n_total: int,
    k: int,
    seed: int,
    init: torch.Tensor | None,
    init_sample: int,
    shift0: torch.Tensor | None,
    spherical: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Initial centroids in the working space (centred or unit rows), the same on every rank."""
    d = X.shape[1]
    err: BaseException | None = None
    C: torch.Tensor | None = None
    given = torch.tensor([int(init is not None)], dtype=torch.int64) if w.rank == 0 else None
    if bool(_broadcast_tensor(w, given, (1,), torch.int64, 0, "k-means init")[0]):
        if w.rank == 0:
            try:
                c0 = torch.as_tensor(init)
                if tuple(c0.shape) != (k, d) or not c0.dtype.is_floating_point or not bool(torch.isfinite(c0).all()):
                    raise ValueError(f"init must be finite [k, D] = [{k}, {d}] centroids, got {tuple(c0.shape)} {c0.dtype}")
                c0 = c0.to(dtype=dtype, device=X.device)
                C = _normalize_rows(c0) if spherical or shift0 is None else c0 - shift0
            except Exception as e:  # noqa: BLE001
                err = e
        _agree(w, "k-means init", err)
        return _broadcast_tensor(w, None if C is None else C.cpu(), (k, d), dtype, 0, "k-means init")
    # k-means++ on rank 0 over all rows, or evenly spaced ones
    n = X.shape[0]
    if n_total <= init_sample:
        local = torch.arange(n)
    else:
        g = torch.div(torch.arange(init_sample, dtype=torch.int64) * n_total, init_sample, rounding_mode="floor")
        local = g[(g >= offset) & (g < offset + n)] - offset
    payload = _pack({"rows": X[local.to(X.device)].cpu()}, {})
    got = _gather(w, payload, 0, "k-means init sample")
    if got is not None:
        try:
            rows = []
            for r, blob in enumerate(got):
                t, _ = _unpack(blob, f"k-means sample of rank {r}")
                rows.append(t["rows"])
            sample = torch.cat(rows).to(dtype=dtype, device=X.device)
            gen = torch.Generator(device=X.device)
            gen.manual_seed(int(seed))
            C = sample[kmeans_plusplus(sample, k, gen)].clone()
        except Exception as e:  # noqa: BLE001
            err = e
    _agree(w, "k-means init", err)
    return _broadcast_tensor(w, None if C is None else C.cpu(), (k, d), dtype, 0, "k-means init")


def _farthest_rows(w: WorldInfo, X: torch.Tensor, C: torch.Tensor, assign: torch.Tensor, offset: int, m: int, batch_size: int) -> torch.Tensor:
    """The ``m`` rows farthest from their centroid (squared distance of record; ties: lowest global index)."""
    n = X.shape[0]
    if n:
        d2 = torch.cat([_record_d2(X[r0 : r0 + batch_size], C.index_select(0, assign[r0 : r0 + batch_size])) for r0 in range(0, n, batch_size)])
        top = torch.sort(d2.cpu(), descending=True, stable=True).indices[:m]
        vals = d2.cpu()[top]
        rows = X[top.to(X.device)].cpu()
        gidx = top + offset
    else:
        vals = torch.zeros(0, dtype=torch.float64)
        rows = torch.zeros((0, X.shape[1]), dtype=X.dtype)
        gidx = torch.zeros(0, dtype=torch.int64)
    payload = _pack({"d2": vals, "rows": rows, "index": gidx}, {})
    got = _exchange(w, [payload] * w.world_size, "k-means empty clusters") if w.distributed else [payload]
    vs, rs, gs = [], [], []
    for r, blob in enumerate(got):
        t, _ = _unpack(blob, f"k-means candidates of rank {r}")
        vs.append(t["d2"])
        rs.append(t["rows"])
        gs.append(t["index"])
    v, rr, g = torch.cat(vs), torch.cat(rs), torch.cat(gs)
    order = np.lexsort((g.numpy(), -v.numpy()))[:m]
    return rr[torch.from_numpy(order)]


# ---------------------------------------------------------------------------------------------------------
# Local multi-process runs (tests, benchmarks, notebooks).


@dataclass
class RankOutcome:
    """What one process of :func:`spawn_local` did.

    Attributes:
        rank: its rank.
        exitcode: process exit code (None: killed after the deadline).
        result: the JSON value its function returned (None on failure).
        error: ``"<Type>: <message>"`` of the exception it raised, or why it produced nothing.
        error_type: the exception's class name.
        seconds: wall time of its function.
    """

    rank: int
    exitcode: int | None
    result: Any = None
    error: str | None = None
    error_type: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.exitcode == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    collective_timeout_s: float,
    num_threads: int | None,
    fn: Callable[..., Any],
    args: tuple,
    out_path: str,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    rec: dict[str, Any] = {}
    code = 0
    t0 = time.perf_counter()
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=_dt.timedelta(seconds=collective_timeout_s)
        )
        ok = False
        try:
            value = fn(rank, world_size, *args)
            rec["result"] = json.loads(json.dumps(value))
            ok = True
        finally:
            leave_group(ok)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        rec = {"error": f"{type(e).__name__}: {e}", "error_type": type(e).__name__, "trace": traceback.format_exc()}
        code = 1
    rec["seconds"] = time.perf_counter() - t0
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rec, f)
    os.replace(tmp, out_path)
    if code:
        os._exit(code)


def spawn_local(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    collective_timeout_s: float = 60.0,
    num_threads: int | None = None,
    raise_on_error: bool = True,
) -> list[RankOutcome]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes on this machine, each in a
    process group (``backend`` over 127.0.0.1 on a free port).

    ``fn`` must be importable by name (a module-level function) and return a JSON value (results travel as
    JSON files, never pickled). All processes are ended by ``timeout_s``.

    Args:
        fn: the function each process runs.
        world_size: number of processes.
        args: extra arguments (passed to the new processes by ``multiprocessing``'s spawn).
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per process).
        timeout_s: deadline for the whole run; processes still running then are terminated.
        collective_timeout_s: ``timeout`` of the process group (a collective waiting on a silent peer fails).
        num_threads: ``torch.set_num_threads`` in each process (None: torch's default).
        raise_on_error: raise :class:`DistributedError` when a process failed.

    Returns:
        one :class:`RankOutcome` per rank.
    """
    import multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="rbank-spawn-") as tmp:
        paths = [os.path.join(tmp, f"rank-{r}.json") for r in range(world_size)]
        procs = [
            ctx.Process(
                target=_local_worker,
                args=(r, world_size, port, backend, float(collective_timeout_s), num_threads, fn, tuple(args), paths[r]),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + float(timeout_s)
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        late = {r for r, p in enumerate(procs) if p.is_alive()}
        for r in late:
            procs[r].terminate()
        for p in procs:
            p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join(5.0)
        out: list[RankOutcome] = []
        for r, (p, path) in enumerate(zip(procs, paths)):
            code = p.exitcode
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    rec = json.load(f)
                out.append(
                    RankOutcome(r, code, rec.get("result"), rec.get("error"), rec.get("error_type"), float(rec.get("seconds", 0.0)))
                )
            elif r in late:
                out.append(RankOutcome(r, code, error=f"still running after {timeout_s:g} s; terminated", error_type="Timeout"))
            else:
                out.append(RankOutcome(r, code, error=f"exited with code {code} without a result", error_type="Exited"))
    if raise_on_error and not all(o.ok for o in out):
        bad = "; ".join(f"rank {o.rank}: {o.error}" for o in out if not o.ok)
        raise DistributedError(f"spawn_local: {bad}")
    return out
