"""ReasoningBank (SPEC §6): trajectories in, patterns out, consolidation, distillation, snapshots."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid as _uuid
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any

import torch

from ._util import (
    as_embedding,
    as_embedding_batch,
    bump_id_counter,
    check_int,
    check_unit,
    dt_to_us,
    loadable_device,
    next_id,
    us_to_dt,
    utcnow,
)
from .categories import text_category
from .consolidation import ConsolidationConfig
from .patterns import (
    OUTCOMES,
    Pattern,
    PatternCategory,
    PatternMetadata,
    PatternSearchResult,
    check_attributes,
)
from .retrieval import FilterSpec, RetrievalScoring
from .store import LowConfidenceError, PatternStats, PatternStore, PatternStoreConfig
from .trajectory import (
    StepMetadata,
    StepOutcome,
    Trajectory,
    TrajectoryMetadata,
    TrajectoryRecorder,
    TrajectoryStep,
)
from .verdicts import Verdict, VerdictAnalysis, VerdictAnalyzer, VerdictKind

if TYPE_CHECKING:  # pragma: no cover
    from .consolidation import ConsolidationResult
    from .distillation import DistillationConfig, DistillationResult

__all__ = ["ReasoningBankConfig", "ReasoningBankStats", "ReasoningBank", "RetrievalScoring", "format_memories",
           "Embedder"]

#: what ``ReasoningBank(embedder=…)`` takes: an object with ``encode(list[str]) -> [B, D]`` (a
#: :class:`~rbank_torch.text.TextEmbedder`, a ``SentenceTransformer``) or a callable doing the same
Embedder = Any

log = logging.getLogger("rbank_torch")

_BANK_FORMAT = "rbank_torch.bank"


def _default_distillation_config() -> DistillationConfig:
    from .distillation import DistillationConfig

    return DistillationConfig()


#: configuration fields holding runtime objects (never written to a snapshot)
_RUNTIME_FIELDS = ("judge", "extractor")


@dataclass
class ReasoningBankConfig:
    """Configuration of a :class:`ReasoningBank` (defaults of SPEC §6).

    The bank's ``embedding_dim`` (and HNSW parameters, device, dtype) govern: they are written into
    ``pattern_config``.
    """

    storage_path: str = ".rbank"
    embedding_dim: int = 768
    ef_construction: int = 200
    ef_search: int = 100
    m: int = 32
    #: kept trajectories beyond which the bank distils automatically
    max_trajectories: int = 100_000
    #: trajectories of at least this quality become patterns
    min_quality_threshold: float = 0.3
    #: kept for compatibility with the reference configuration; the bank does not consolidate on a timer
    #: (call :meth:`ReasoningBank.consolidate`, e.g. from your own scheduler, or ``rbank consolidate``)
    consolidation_interval_secs: int = 3600
    #: kept for compatibility with the reference configuration (validated, not acted upon; see above)
    auto_consolidate: bool = True
    pattern_config: PatternStoreConfig = field(default_factory=PatternStoreConfig)
    consolidation_config: ConsolidationConfig = field(default_factory=ConsolidationConfig)
    distillation_config: DistillationConfig = field(default_factory=_default_distillation_config)
    #: device of the pattern columns ("cpu", "cuda", …)
    device: str = "cpu"
    #: a trajectory below ``min_quality_threshold`` becomes an ``outcome="failure"`` pattern carrying its
    #: analysis's lessons (SPEC §7); False: it becomes no pattern (SPEC §6, the reference's behaviour)
    keep_failures: bool = True
    #: decides the verdict of every stored trajectory (a :class:`rbank_torch.llm.Judge`, e.g. an ``LLMJudge``);
    #: None: the verdict the trajectory carries. A runtime object: not saved with the bank (set it again after
    #: :meth:`ReasoningBank.load`)
    judge: Any = None
    #: turns every stored trajectory into memory items (a :class:`rbank_torch.llm.MemoryExtractor`), each stored
    #: as a pattern of its own (SPEC §8); None: none. A runtime object: not saved with the bank
    extractor: Any = None

    def __post_init__(self) -> None:
        # SPEC §6: the bank's embedding_dim governs; it is written into pattern_config.embedding_dim
        if isinstance(self.pattern_config, PatternStoreConfig) and isinstance(self.embedding_dim, int):
            self.pattern_config.embedding_dim = self.embedding_dim

    def resolved_pattern_config(self) -> PatternStoreConfig:
        pc = PatternStoreConfig(**asdict(self.pattern_config))
        pc.embedding_dim = self.embedding_dim
        pc.ef_construction = self.ef_construction
        pc.ef_search = self.ef_search
        pc.m = self.m
        pc.device = self.device
        return pc

    def validate(self) -> None:
        for name in ("embedding_dim", "max_trajectories", "ef_construction", "ef_search", "m"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        check_unit(self.min_quality_threshold, "min_quality_threshold")
        if not isinstance(self.keep_failures, bool):
            raise ValueError(f"keep_failures must be a bool, got {self.keep_failures!r}")
        if self.judge is not None and not callable(getattr(self.judge, "judge", None)):
            raise ValueError(f"judge must have a judge(trajectory) -> Verdict method, got {type(self.judge).__name__}")
        if self.extractor is not None and not callable(getattr(self.extractor, "extract", None)):
            raise ValueError(
                f"extractor must have an extract(trajectory, verdict) method, got {type(self.extractor).__name__}"
            )
        self.pattern_config.embedding_dim = self.embedding_dim
        if self.consolidation_interval_secs < 0:
            raise ValueError("consolidation_interval_secs must be >= 0")
        self.resolved_pattern_config().validate()
        self.consolidation_config.validate()
        if hasattr(self.distillation_config, "validate"):
            self.distillation_config.validate()

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _RUNTIME_FIELDS}
        d["pattern_config"] = asdict(self.pattern_config)
        d["consolidation_config"] = asdict(self.consolidation_config)
        d["distillation_config"] = asdict(self.distillation_config)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReasoningBankConfig:
        from .distillation import DistillationConfig

        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ReasoningBankConfig fields: {sorted(unknown)}")
        d = dict(d)
        d["pattern_config"] = PatternStoreConfig.from_dict(d.get("pattern_config", {}))
        d["consolidation_config"] = ConsolidationConfig.from_dict(d.get("consolidation_config", {}))
        dk = {f.name for f in fields(DistillationConfig)}
        d["distillation_config"] = DistillationConfig(
            **{k: v for k, v in d.get("distillation_config", {}).items() if k in dk}
        )
        cfg = cls(**d)
        cfg.validate()
        return cfg


@dataclass
class ReasoningBankStats:
    total_trajectories: int = 0
    total_patterns: int = 0
    success_count: int = 0
    failure_count: int = 0
    recovered_count: int = 0
    consolidation_count: int = 0
    distillation_count: int = 0
    avg_quality: float = 0.0
    last_consolidation: datetime | None = None
    last_distillation: datetime | None = None
    #: automatic distillations that could not run (the trajectories were kept; retried at the next store)
    distillation_errors: int = 0


class ReasoningBank:
    """A memory of reasoning patterns learned from agent trajectories.

    Example:
        >>> bank = ReasoningBank(ReasoningBankConfig(embedding_dim=8))
        >>> rec = bank.start_trajectory(torch.randn(8))
        >>> rec.add_step("search docs", "need context", StepOutcome.success(), 0.9)
        >>> bank.store_trajectory(rec.complete(Verdict.success()))
        >>> bank.search_similar(torch.randn(8), k=3)[0].similarity  # doctest: +SKIP
    """

    def __init__(
        self,
        config: ReasoningBankConfig | None = None,
        embedder: Embedder = None,
        journal: bool | str | os.PathLike | None = None,
        fsync: str = "always",
        lock_timeout: float = 0.0,
    ) -> None:
        """Args:
        config: the bank's configuration (defaults when omitted).
        embedder: what turns text into embeddings (SPEC §7): an object with ``encode(list[str]) -> [B, D]``
            or a callable doing the same. None: the packaged all-MiniLM-L6-v2 when ``rbank-torch[text]`` is
            installed, loaded at the first text call. When its dimension differs from ``embedding_dim``, an
            empty bank adopts it; a bank holding patterns raises ``ValueError``.
        journal: ``True`` (``<storage_path>/bank.journal``) or a path: record every acknowledged mutation in
            a write-ahead journal (see :mod:`rbank_torch.journal`). Records already in that journal are
            replayed first, so a bank that was never saved is recovered after a crash. A journaled bank is
            the bank's one writer: it holds ``<journal>.lock`` until :meth:`close`
            (see :mod:`rbank_torch.locking`).
        fsync: the journal's fsync policy: ``"always"``, ``"batch"`` or ``"off"``.
        lock_timeout: seconds to wait for another writer of the same journal before
            :class:`~rbank_torch.locking.BankLockedError` (0: do not wait).
        """
        cfg = config if config is not None else ReasoningBankConfig()
        cfg.validate()
        _warn_overridden(cfg)
        self._config = cfg
        # resolved once: a later change of the working folder never moves the bank's files
        self._storage_path = os.path.abspath(cfg.storage_path)
        #: the bank's identity, recorded in its snapshots and its journal and checked when they meet
        self._bank_id = _uuid.uuid4().hex
        self._identity_known = False  # True once the identity came from a snapshot
        self._bank_lock: Any = None
        self._write_error: BaseException | None = None
        self._read_only = False
        self._store = PatternStore(cfg.resolved_pattern_config())
        self._analyzer = VerdictAnalyzer()
        self._trajectories: list[Trajectory] = []
        self._stats = ReasoningBankStats()
        # one re-entrant lock for the bank and its store: a direct store call (``bank.store.…``), a bank
        # operation and save() never interleave, so the journal holds every mutation in the order it happened
        self._lock = self._store._lock
        self._consolidator: Any = None
        self._distiller: Any = None
        self._journal: Any = None
        self._depth = 0
        self._pending_ids: set[int] = set()
        self._pending_traj: list[tuple[str, list[Trajectory]]] = []
        self._pending_cons = False  # the consolidator's state (λ, Fisher table, counters) changed
        self._embedder = _as_encoder(embedder)
        self._default_embedder: Any = None
        if embedder is not None:
            d = _known_dim(embedder)
            if d is not None and d != cfg.embedding_dim:
                self._adopt_dim(d)
        if journal:
            self._attach_journal(journal, fsync, after_seq=0, lock_timeout=lock_timeout)

    # ------------------------------------------------------------------ text
    def _encode(self, texts: list[str]) -> torch.Tensor:
        """Embeddings ``[B, D]`` float32 of ``texts`` by the bank's embedder, checked against the bank's
        dimension (an empty bank adopts the embedder's)."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}] must be a string, got {type(t).__name__}")
        enc = self._embedder
        if enc is None:
            if self._default_embedder is None:
                self._default_embedder = _default_encoder()
            enc = self._default_embedder
        out = enc(texts)
        try:
            e = torch.as_tensor(out).detach()
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"the embedder must return a [B, D] tensor or array, got {type(out).__name__}") from err
        if e.dim() != 2 or e.shape[0] != len(texts):
            raise ValueError(f"the embedder returned shape {tuple(e.shape)} for {len(texts)} texts: expected "
                             f"[{len(texts)}, D]")
        e = e.to("cpu", torch.float32)
        if not bool(torch.isfinite(e).all()):
            raise ValueError("the embedder returned non-finite values")
        d = int(e.shape[1])
        if d != self._config.embedding_dim:
            with self._lock:
                if d != self._config.embedding_dim:
                    self._adopt_dim(d)
        return e

    def _adopt_dim(self, d: int) -> None:
        """An empty bank takes the embedder's dimension; a bank holding anything refuses it."""
        old = self._config.embedding_dim
        if len(self._store) or self._trajectories:
            raise ValueError(f"the embedder gives {d}-dimensional embeddings but the bank holds "
                             f"{old}-dimensional ones (embedding_dim {old}); use an embedder of dimension {old} "
                             "or a new bank")
        log.info("empty bank adopts the embedder's dimension %d (was embedding_dim %d)", d, old)
        self._config.embedding_dim = d
        self._config.pattern_config.embedding_dim = d
        store = PatternStore(self._config.resolved_pattern_config())
        store._lock = self._lock  # one lock for the bank and its store, as before
        store._listener = self._store._listener
        self._store = store

    def _embed_one(self, value: Any, name: str) -> tuple[str | None, torch.Tensor]:
        """(text, embedding ``[D]``) of a text or an embedding."""
        if isinstance(value, str):
            return value, self._encode([value])[0]
        return None, as_embedding(value, name, dim=self._config.embedding_dim)

    def _embed_many(self, values: Any, name: str) -> torch.Tensor:
        """Embeddings ``[B, D]`` of texts (a list of str) or of a ``[B, D]`` tensor / list of vectors."""
        if isinstance(values, str):
            return self._encode([values])
        if isinstance(values, (list, tuple)) and values and all(isinstance(v, str) for v in values):
            return self._encode(list(values))
        return as_embedding_batch(values, name, dim=self._config.embedding_dim)

    # ------------------------------------------------------------------ journal
    def _journal_path(self, journal: bool | str | os.PathLike) -> str:
        if journal is True:
            return os.path.join(self._storage_path, "bank.journal")
        if journal is False:
            raise ValueError("journal must be True or a path to attach a journal")
        return os.path.abspath(os.fspath(journal))

    def _attach_journal(
        self, journal: bool | str | os.PathLike, fsync: str, after_seq: int, lock_timeout: float = 0.0,
        read_only: bool = False,
    ) -> None:
        from .journal import Journal, JournalError
        from .locking import BankLock

        path = self._journal_path(journal)
        if self._bank_lock is None and not read_only:
            self._bank_lock = BankLock(path, lock_timeout).acquire()
        try:
            j = Journal(path, fsync=fsync, bank_id=self._bank_id, read_only=read_only)
            try:
                self._check_identity(j)
                base = j._base_seq()
                if base > after_seq:
                    raise JournalError(
                        f"{path}: this journal continues a snapshot taken at record {base}, but the bank starts at "
                        f"record {after_seq}: the records in between are missing (load the newer snapshot with "
                        "this journal)"
                    )
                if j.last_seq < after_seq and not read_only:
                    # every record in it is already in the snapshot: number new records after the snapshot's
                    j.reset(after_seq)
                self.replayed_records = self._replay(j, after_seq)
            except BaseException:
                j.close()
                raise
        except BaseException:
            if self._bank_lock is not None:
                self._bank_lock.release()
                self._bank_lock = None
            raise
        self._journal = j
        self._read_only = read_only
        # held weakly: a bank dropped without close() (as a crashed process drops it) is freed at once, and
        # with it its journal handle and its writer lock
        self._store._listener = _StoreListener(self)

    def _check_identity(self, j: Any) -> None:
        """A journal holds one bank's records: refuse another bank's (never replay foreign records)."""
        from .journal import JournalError

        if j.bank_id is None or j.bank_id == self._bank_id:
            return
        if self._identity_known:
            raise JournalError(
                f"{j.path}: this journal belongs to bank {j.bank_id}, not to the bank being opened "
                f"({self._bank_id}); its records are not replayed (give this bank its own journal)"
            )
        self._bank_id = j.bank_id  # a bank recovered from its journal alone (never saved) takes its identity

    def check_writable(self) -> None:  # store listener: called before a store call changes anything
        """Raise :class:`~rbank_torch.journal.JournalWriteError` when the journal could not record an
        earlier change: the bank refuses changes until :meth:`save` or a reopen."""
        from .journal import JournalWriteError

        if self._read_only:
            raise JournalWriteError(
                f"{self._journal.path}: this bank was opened read-only (load(..., read_only=True)); it takes no "
                "changes (open it with a journal and without read_only to write)"
            )
        err = self._write_error
        if err is None and self._journal is not None:
            err = self._journal.failed
        if err is not None:
            raise JournalWriteError(
                f"{self._journal.path if self._journal is not None else 'journal'}: the journal could not record "
                f"an earlier change ({err}); this bank refuses changes until it is saved (save()) or reopened"
            )

    @property
    def journal(self) -> Any:
        """The attached :class:`~rbank_torch.journal.Journal`, or None."""
        return self._journal

    def touched(self, ids) -> None:  # store listener
        self._pending_ids.update(ids)

    def op_done(self) -> None:  # store listener: a store call made outside a bank operation is done
        if self._depth == 0:
            self._commit("store")

    @contextlib.contextmanager
    def _op(self, name: str):
        """A bank operation: under the lock; journaled (and acknowledged) when the outermost one ends."""
        with self._lock:
            if self._depth == 0 and self._journal is not None:
                self.check_writable()
            self._depth += 1
            ok = False
            try:
                yield
                ok = True
            finally:
                self._depth -= 1
                if self._depth == 0 and (ok or self._pending_ids or self._pending_traj or self._pending_cons):
                    # also on error: whatever did change in memory is recorded, so memory and journal agree
                    self._commit(name)

    def _commit(self, name: str) -> None:
        if self._journal is None:
            self._pending_ids.clear()
            self._pending_traj.clear()
            self._pending_cons = False
            return
        ids = sorted(self._pending_ids)
        traj_ops = self._pending_traj
        self._pending_ids = set()
        self._pending_traj = []
        puts = [p for p in (self._store.get_pattern(i) for i in ids) if p is not None]
        put_ids = {p.id for p in puts}
        dels = [i for i in ids if i not in put_ids]
        tensors, pmeta = _patterns_to_tensors(puts, "p/")
        meta: dict[str, Any] = {"op": name, "stats": _stats_to_json(self._stats), "patterns": pmeta, "del": dels,
                                "traj": []}
        for k, (kind, ts) in enumerate(traj_ops):
            tt, tm = _trajectories_to_tensors(ts, prefix=f"t{k}/")
            tensors.update(tt)
            meta["traj"].append({"kind": kind, "meta": tm})
        if self._pending_cons and self._consolidator is not None:
            ct, cm = self._consolidator.state_tensors("c/")
            tensors.update(ct)
            meta["consolidator"] = cm
        self._pending_cons = False
        try:
            self._journal.append(meta, tensors)
        except BaseException as e:  # memory holds a change the journal does not: refuse changes from now on
            self._write_error = e
            raise

    def _replay(self, journal: Any, after_seq: int) -> int:  # noqa: C901 - one loop over record kinds
        """Apply the journal's records after ``after_seq``; returns how many were applied."""
        from .journal import JournalError

        listener, self._store._listener = self._store._listener, None
        n = 0
        seq = after_seq
        try:
            for rec_seq, meta, tensors in journal.records(after_seq):
                seq = rec_seq
                for k, op in enumerate(meta["traj"]):
                    ts = _trajectories_from_tensors(tensors, op["meta"], prefix=f"t{k}/")
                    if op["kind"] == "add":
                        self._trajectories.extend(ts)
                    else:
                        self._trajectories = ts
                puts = _patterns_from_tensors(tensors, meta["patterns"], "p/")
                if puts:
                    d = int(puts[0].embedding.numel())
                    if d != self._config.embedding_dim and not len(self._store) and not self._trajectories:
                        self._adopt_dim(d)  # the bank had adopted its embedder's dimension
                    self._store._raw_put(puts)
                dels = meta["del"]
                if not isinstance(dels, list) or not all(type(i) is int for i in dels):
                    raise ValueError("'del' must be a list of pattern ids")
                if dels:
                    self._store.remove_patterns(dels)
                if meta.get("consolidator") is not None:
                    self._get_consolidator().load_state_tensors(tensors, meta["consolidator"], "c/")
                self._stats = _stats_from_json(meta["stats"])
                n += 1
        except JournalError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, OverflowError) as e:
            raise JournalError(f"{journal.path}: bad record {seq} ({type(e).__name__}: {e})") from None
        finally:
            self._store._listener = listener
        return n

    def close(self) -> None:
        """Flush and close the journal (if any) and let go of the bank's writer lock."""
        try:
            if self._journal is not None:
                self._journal.close()
        finally:
            if self._bank_lock is not None:
                self._bank_lock.release()
                self._bank_lock = None

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> ReasoningBankConfig:
        return self._config

    @property
    def store(self) -> PatternStore:
        """The underlying :class:`PatternStore`."""
        return self._store

    @property
    def analyzer(self) -> VerdictAnalyzer:
        return self._analyzer

    @property
    def trajectories(self) -> list[Trajectory]:
        """The kept trajectories (a new list; the trajectories themselves are shared)."""
        with self._lock:
            return list(self._trajectories)

    def _get_distiller(self):
        if self._distiller is None:
            from .distillation import MemoryDistiller

            self._distiller = MemoryDistiller(self._config.distillation_config)
        return self._distiller

    def _get_consolidator(self):
        if self._consolidator is None:
            from .consolidation import PatternConsolidator

            self._consolidator = PatternConsolidator(self._config.consolidation_config, device=self._store.device)
        return self._consolidator

    # ------------------------------------------------------------------ trajectories
    def start_trajectory(self, query: Any) -> TrajectoryRecorder:
        """A recorder for a new trajectory. ``query``: its text (embedded by the bank's embedder and kept as
        the query text, ``metadata.attributes["query"]``) or its embedding ``[D]`` of the bank's dimension."""
        text, emb = self._embed_one(query, "query_embedding")
        rec = TrajectoryRecorder(emb)
        if text is not None:
            rec.trajectory.query_text = text
        return rec

    def _validate_trajectory(self, t: Trajectory) -> None:
        """Check every field a snapshot or the journal will hold, before anything changes.

        Beyond the embedding, quality and verdict, the trajectory is encoded exactly as a snapshot
        encodes it and decoded with the loader's checks, so an accepted trajectory always saves and
        loads (a value changed after construction, a NaN count, a naive datetime or a non-JSON
        attribute is refused here, not at the next ``save()``).
        """
        if not isinstance(t, Trajectory):
            raise ValueError(f"trajectory must be a Trajectory, got {type(t).__name__}")
        q = as_embedding(t.query_embedding, "query_embedding", dim=self._config.embedding_dim)
        check_unit(t.quality, "quality")
        if not isinstance(t.verdict, Verdict):
            raise ValueError("verdict must be a Verdict")
        if t.response_embedding is not None:
            as_embedding(t.response_embedding, "response_embedding")  # any length: responses may use another model
        for i, st in enumerate(t.steps):
            if not isinstance(st, TrajectoryStep):
                raise ValueError(f"steps[{i}] must be a TrajectoryStep, got {type(st).__name__}")
            if st.context_embedding is not None:
                as_embedding(st.context_embedding, f"steps[{i}].context_embedding")
        if not all(isinstance(x, str) for x in t.lessons):
            raise ValueError("lessons must be strings")
        check_int(t.id, "trajectory id")
        try:
            tensors, meta = _trajectories_to_tensors([t])
            _trajectories_from_tensors(tensors, meta, bump_ids=False)
        except (TypeError, ValueError, KeyError, OverflowError, AttributeError) as e:
            msg = str(e).replace("corrupt snapshot: ", "")
            raise ValueError(f"trajectory {t.id} cannot be stored: {msg}") from None
        t.query_embedding = q

    def store_trajectory(self, trajectory: Trajectory) -> int | None:
        """Record a completed trajectory: stats, keep it, distil past ``max_trajectories``, and store its
        pattern when its quality reaches ``min_quality_threshold`` — or, below it with ``keep_failures``
        (default), an ``outcome="failure"`` pattern carrying the analysis's lessons (SPEC §7).

        Returns:
            the id of the pattern it stored, or None (none stored).

        Raises:
            ValueError: a wrong embedding dimension, non-finite values or an out-of-range quality; the bank
                is unchanged.
        """
        t = trajectory
        self._validate_trajectory(t)
        if self._config.judge is not None:
            self._judge(t)
        memories = self._memory_patterns(t) if self._config.extractor is not None else []
        pattern = None
        if t.quality >= self._config.min_quality_threshold:
            pattern = Pattern.from_trajectory(t)
        elif self._config.keep_failures:
            pattern = self._failure_pattern(t)
        stored: int | None = None
        with self._op("store_trajectory"):
            s = self._stats
            s.total_trajectories += 1
            if t.verdict.kind is VerdictKind.SUCCESS:
                s.success_count += 1
            elif t.verdict.kind is VerdictKind.FAILURE:
                s.failure_count += 1
            elif t.verdict.kind is VerdictKind.RECOVERED:
                s.recovered_count += 1
            s.avg_quality += (t.quality - s.avg_quality) / s.total_trajectories
            self._trajectories.append(t)
            self._pending_traj.append(("add", [t]))
            if len(self._trajectories) > self._config.max_trajectories:
                try:
                    self.distill()
                except Exception as e:  # noqa: BLE001 - the trajectory stays stored; retried next time
                    s.distillation_errors += 1
                    log.warning("automatic distillation failed (%s); trajectories kept, retrying later", e)
            if pattern is not None:
                try:
                    stored = self._store.store_pattern(pattern)
                except LowConfidenceError:
                    pass  # below the store's own min_confidence: the trajectory is kept, no pattern
            for mp in memories:
                self._store.store_pattern(mp)
        return stored

    def _judge(self, t: Trajectory) -> None:
        """The configured judge's verdict replaces the trajectory's (and its quality follows)."""
        v = self._config.judge.judge(t)
        if not isinstance(v, Verdict):
            raise ValueError(f"judge must return a Verdict, got {type(v).__name__}")
        if v != t.verdict:
            t.verdict = v
            t.quality = t.compute_quality()

    def _memory_patterns(self, t: Trajectory) -> list[Pattern]:
        """The configured extractor's memory items of ``t`` as patterns (SPEC §8): text = title + "\n" +
        content (embedded by the bank's embedder), lessons = [description], outcome "success" when the
        trajectory succeeded (Success or Recovered) else "failure", source trajectory ``t``, the trajectory's
        category, tags and attributes, quality = the trajectory's (confidence at least the store's minimum).
        An extractor that raises is logged and gives no items (the trajectory is stored all the same)."""
        try:
            items = list(self._config.extractor.extract(t, t.verdict))
        except Exception as e:  # noqa: BLE001 - an extractor's failure never loses the trajectory
            log.warning("memory extractor failed on trajectory %s (%s: %s); no memory items", t.id,
                        type(e).__name__, e)
            return []
        for i, it in enumerate(items):
            for name in ("title", "description", "content"):
                if not isinstance(getattr(it, name, None), str):
                    raise ValueError(f"extractor item {i}.{name} must be a string, got {getattr(it, name, None)!r}")
        if not items:
            return []
        texts = [it.title + "\n" + it.content for it in items]
        emb = self._encode(texts)  # [n, D]
        outcome = "success" if t.is_success else "failure"
        q = float(t.quality)
        conf = min(1.0, max(q, float(self._store.config.min_confidence)))
        base = Pattern.from_trajectory(t)
        now = utcnow()
        return [
            Pattern(
                id=next_id(), uuid=str(_uuid.uuid4()), embedding=emb[i].clone(), category=base.category,
                confidence=conf, usage_count=1, success_count=1 if outcome == "success" else 0, avg_quality=q,
                source_trajectories=[int(t.id)], lessons=[it.description], example_actions=[],
                created_at=now, last_accessed=now,
                metadata=PatternMetadata(tags=list(base.metadata.tags), source="extractor",
                                         attributes=dict(base.metadata.attributes)),
                text=texts[i], outcome=outcome,
            )
            for i, it in enumerate(items)
        ]

    def _failure_pattern(self, t: Trajectory) -> Pattern:
        """A below-threshold trajectory as a preventive memory: outcome "failure", confidence
        max(quality, min_confidence), lessons = the analysis's lessons plus the root cause."""
        analysis = self._analyzer.analyze(t)
        lessons = list(analysis.lessons)
        if analysis.root_cause is not None:
            cause = f"Root cause: {analysis.root_cause}"
            if cause not in lessons:
                lessons.append(cause)
        conf = max(float(t.quality), float(self._store.config.min_confidence))
        return Pattern.from_trajectory(t, outcome="failure", lessons=lessons, confidence=min(conf, 1.0))

    # ------------------------------------------------------------------ agent memory (SPEC §7)
    def add(
        self,
        text_or_embedding: Any,
        *,
        lessons: Sequence[str] = (),
        category: PatternCategory | str | None = None,
        outcome: str = "success",
        quality: float = 1.0,
        metadata: dict[str, Any] | None = None,
        tags: Sequence[str] = (),
    ) -> int:
        """Store one memory as a pattern and return its id.

        Args:
            text_or_embedding: the memory's text (embedded by the bank's embedder and kept as ``text``) or
                its embedding ``[D]``.
            lessons: what to remember (strings).
            category: inferred from ``metadata["request_type"]``, the text and the tags when None.
            outcome: ``"success"`` or ``"failure"``.
            quality: in [0, 1]: the pattern's avg_quality; its confidence is max(quality, min_confidence).
            metadata: attributes (str → str/int/float/bool: user_id, session_id, agent, …) for filters.
            tags: strings.

        Raises:
            ValueError: naming the argument; nothing is stored.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {list(OUTCOMES)}, got {outcome!r}")
        q = check_unit(quality, "quality")
        lessons_l = _strings(lessons, "lessons")
        tags_l = _strings(tags, "tags")
        attrs = check_attributes(metadata, "metadata")
        if category is None:
            rt = attrs.get("request_type")
            cat = None
        else:
            cat = PatternCategory.parse(category)
        text, emb = self._embed_one(text_or_embedding, "text_or_embedding")
        if cat is None:
            cat = PatternCategory.parse(text_category(text, tags_l, rt if isinstance(rt, str) else None))
        now = utcnow()
        p = Pattern(
            id=next_id(), uuid=str(_uuid.uuid4()), embedding=emb.clone(), category=cat,
            confidence=max(q, float(self._store.config.min_confidence)), usage_count=1,
            success_count=1 if outcome == "success" else 0, avg_quality=q, lessons=lessons_l,
            created_at=now, last_accessed=now,
            metadata=PatternMetadata(tags=tags_l, source="memory", attributes=attrs), text=text, outcome=outcome,
        )
        with self._op("add"):
            return self._store.store_pattern(p)

    def search(
        self,
        query: Any,
        k: int = 5,
        *,
        where: dict[str, Any] | None = None,
        category: Any = None,
        outcome: Any = None,
        tags: Any = None,
        since: Any = None,
        until: Any = None,
        min_quality: float | None = None,
        scoring: RetrievalScoring | None = None,
        mmr: float | None = None,
        dedup: str | None = None,
        touch: bool = False,
    ) -> list[PatternSearchResult]:
        """The memories most relevant to ``query`` (a text or an embedding ``[D]``), best first (SPEC §7).

        Filters are ANDed and applied before top-k: ``where`` (attribute → value, ``{"$in": [...]}`` or
        ``{"$gte"/"$gt"/"$lte"/"$lt": number}``), ``category`` and ``outcome`` (one value or a list),
        ``tags`` (all required), ``since``/``until`` (bounds of created_at: aware datetimes or POSIX seconds),
        ``min_quality`` (bound of avg_quality). Exactly ``min(k, matching live patterns)`` results on every
        backend. ``scoring`` re-weights similarity with recency, quality and usage; ``mmr=λ`` diversifies;
        ``dedup="text"`` keeps one result per text; ``touch=True`` sets the results' last_accessed to now.

        Returns:
            :class:`PatternSearchResult` list: ``pattern``, ``similarity`` (cosine), ``score``, ``rank``.
        """
        spec = FilterSpec.parse(where, category, outcome, tags, since, until, min_quality)
        _, q = self._embed_one(query, "query")
        with self._lock:
            sc, sims, ids = self._store.search_memory(q[None, :], k, filters=spec, scoring=scoring, mmr=mmr,
                                                      dedup=dedup)
            if touch:
                ids_l = [i for i in ids[0].tolist() if i >= 0]
                if ids_l:
                    with self._op("touch"):
                        self._store.touch(ids_l)
            return self._store.memory_results(sc[0], sims[0], ids[0])

    def search_batch(self, queries: Any, k: int = 5, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched :meth:`search`: ``queries`` (a list of texts, or embeddings ``[B, D]``), the same keyword
        options. Returns (scores ``[B, k]``, ids ``[B, k]``); missing slots hold −inf / −1."""
        known = {"where", "category", "outcome", "tags", "since", "until", "min_quality", "scoring", "mmr",
                 "dedup", "touch"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown search options {unknown}: expected some of {sorted(known)}")
        touch = options.pop("touch", False)
        scoring, mmr, dedup = options.pop("scoring", None), options.pop("mmr", None), options.pop("dedup", None)
        spec = FilterSpec.parse(**options)
        q = self._embed_many(queries, "queries")
        with self._lock:
            sc, _, ids = self._store.search_memory(q, k, filters=spec, scoring=scoring, mmr=mmr, dedup=dedup)
            if touch:
                hit = [i for i in ids.flatten().tolist() if i >= 0]
                if hit:
                    with self._op("touch"):
                        self._store.touch(hit)
        return sc, ids

    def get(self, id: int) -> Pattern | None:  # noqa: A002 - SPEC §7 name
        """A copy of the pattern with this id, or None."""
        return self._store.get_pattern(id)

    def remove(self, id_or_ids: int | Iterable[int]) -> int:
        """Remove one pattern or many; returns how many were stored."""
        id_list = [id_or_ids] if isinstance(id_or_ids, int) else list(id_or_ids)
        for i in id_list:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ValueError(f"ids must be integers, got {i!r}")
        with self._op("remove"):
            return self._store.remove_patterns(id_list)

    def update(
        self,
        id: int,  # noqa: A002 - SPEC §7 name
        *,
        text: str | None = None,
        lessons: Sequence[str] | None = None,
        metadata: dict[str, Any] | None = None,
        category: PatternCategory | str | None = None,
        embedding: Any = None,
    ) -> bool:
        """Change a stored memory; returns False when no pattern has this id.

        A new ``text`` is re-embedded (unless ``embedding`` is given too); ``lessons`` and ``metadata``
        replace the old ones. Everything is validated before anything changes."""
        if text is not None and not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        lessons_l = None if lessons is None else _strings(lessons, "lessons")
        attrs = None if metadata is None else check_attributes(metadata, "metadata")
        cat = None if category is None else PatternCategory.parse(category)
        emb = None
        if embedding is not None:
            emb = as_embedding(embedding, "embedding", dim=self._config.embedding_dim)
        elif text is not None:
            emb = self._encode([text])[0]
        with self._op("update"):
            p = self._store.get_pattern(id)
            if p is None:
                return False
            if text is not None:
                p.text = text
            if emb is not None:
                p.embedding = emb.clone()
            if lessons_l is not None:
                p.lessons = lessons_l
            if attrs is not None:
                p.metadata.attributes = attrs
            if cat is not None:
                p.category = cat
            self._store.store_pattern(p)
            return True

    def __len__(self) -> int:
        """Number of live patterns."""
        return len(self._store)

    # ------------------------------------------------------------------ patterns
    def search_similar(self, query_embedding: Any, k: int) -> list[PatternSearchResult]:
        """The ``k`` patterns most similar to the query ``[D]``, best first."""
        return self._store.search_similar(query_embedding, k)

    def search_similar_batch(self, queries: Any, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched search: queries ``[B, D]`` → (similarities ``[B, k]``, ids ``[B, k]``)."""
        return self._store.search_similar_batch(queries, k)

    def search_by_category(self, category: PatternCategory | str, limit: int) -> list[Pattern]:
        return self._store.get_by_category(category, limit)

    def analyze_verdict(self, trajectory: Trajectory) -> VerdictAnalysis:
        return self._analyzer.analyze(trajectory)

    def record_usage(self, pattern_id: int, successful: bool, quality: float) -> bool:
        with self._op("record_usage"):
            return self._store.record_usage(pattern_id, successful, quality)

    def prune_low_quality(self, min_quality: float) -> int:
        with self._op("prune_low_quality"):
            return self._store.prune_low_quality(min_quality)

    def merge_similar_patterns(self, similarity_threshold: float) -> int:
        with self._op("merge_similar"):
            return self._store.merge_similar(similarity_threshold)

    def export_patterns(self) -> list[Pattern]:
        return self._store.get_all_patterns()

    def import_patterns(self, patterns: list[Pattern]) -> int:
        """Store every valid pattern (invalid ones are skipped); returns how many were imported."""
        with self._op("import_patterns"):
            return self._import(patterns)

    def _import(self, patterns: list[Pattern]) -> int:
        imported = 0
        for p in patterns:
            try:
                self._store.store_pattern(p)
            except (ValueError, TypeError, OverflowError) as e:
                log.debug("import_patterns: skipped pattern %s (%s)", getattr(p, "id", "?"), e)
                continue
            imported += 1
        return imported

    def pattern_stats(self) -> PatternStats:
        return self._store.stats()

    def stats(self) -> ReasoningBankStats:
        with self._lock:
            s = ReasoningBankStats(**asdict(self._stats))
        s.total_patterns = len(self._store)
        return s

    # ------------------------------------------------------------------ consolidation / distillation
    def consolidate(self, *, group: Any = None, distributed: bool = False) -> ConsolidationResult:
        """Run the consolidator over all patterns: fold merged patterns into their leaders, drop pruned ones.

        With ``distributed=True`` (or a process ``group``), every rank calls this on its copy of the same
        bank: the pair search is split across the ranks and every rank applies the identical result
        (see :meth:`PatternConsolidator.consolidate_store`).
        """
        with self._op("consolidate"):
            cons = self._get_consolidator()
            self._pending_cons = True  # journaled with the op (also when it fails midway)
            result = cons.consolidate_store(self._store, group=group, distributed=distributed)
            self._stats.consolidation_count += 1
            self._stats.last_consolidation = utcnow()
            return result

    def distill(self) -> DistillationResult:
        """Distil all kept trajectories: keep their compressed forms (no steps) and store each key lesson
        as a pattern. If distillation fails, it raises and every kept trajectory stays in place."""
        with self._op("distill"):
            distiller = self._get_distiller()
            kept = list(self._trajectories)
            result = distiller.extract_key_lessons(kept)  # raises → nothing changed
            minimal = [Trajectory.from_compressed(c) for c in result.compressed_trajectories]
            lessons = []
            for lesson in result.key_lessons:
                p = Pattern.from_lesson(lesson)
                if p.confidence >= self._store.config.min_confidence:
                    lessons.append(p)
            if lessons:
                self._store.store_patterns(lessons)
            self._trajectories = minimal
            self._pending_traj = [("set", list(minimal))]
            self._stats.distillation_count += 1
            self._stats.last_distillation = utcnow()
            return result

    # ------------------------------------------------------------------ snapshots
    def save(self, path: str | None = None) -> None:
        """Write the whole bank (patterns, kept trajectories, Fisher information, stats, configs) to one
        safetensors file, atomically. Defaults to ``<storage_path>/bank.safetensors``."""
        from .snapshot import write_snapshot

        path = path or _default_path(self._storage_path)
        if self._read_only:
            self.check_writable()  # raises: a read-only bank does not save (that would start its journal over)
        with self._lock:
            tensors, store_meta = self._store.state_tensors("patterns/")
            traj_tensors, traj_meta = _trajectories_to_tensors(self._trajectories)
            tensors.update(traj_tensors)
            extra_t: dict[str, torch.Tensor] = {}
            cons_meta: dict[str, Any] | None = None
            if self._consolidator is not None:
                extra_t, cons_meta = self._consolidator.state_tensors("consolidator/")
            tensors.update(extra_t)
            j = self._journal
            meta = {
                "config": self._config.to_dict(),
                "bank_id": self._bank_id,
                # resolved when the bank was made: a load from another working folder finds the same journal
                "storage_path": self._storage_path,
                "stats": _stats_to_json(self._stats),
                "store": store_meta,
                "trajectories": traj_meta,
                "consolidator": cons_meta,
                "analyses_performed": self._analyzer.stats().analyses_performed,
                # after a failed append the journal may still hold that record (its cut failed): the snapshot,
                # which holds the change, covers its number too, so it is never replayed twice
                "journal_seq": (j.last_seq + (1 if j.failed is not None else 0)) if j is not None else 0,
            }
            write_snapshot(path, _BANK_FORMAT, tensors, meta)
            if j is not None:
                # the snapshot now holds everything journaled so far: start the journal over
                j.reset(meta["journal_seq"])
                self._write_error = None  # memory and files agree again

    @classmethod
    def load(
        cls,
        path: str,
        journal: bool | str | os.PathLike | None = None,
        fsync: str = "always",
        lock_timeout: float = 0.0,
        read_only: bool = False,
        **pattern_overrides: Any,
    ) -> ReasoningBank:
        """Load a bank written by :meth:`save`, then replay the journal (when given) past the snapshot.

        Raises :class:`~rbank_torch.snapshot.SnapshotError` for a missing, corrupt, foreign or incompatible
        file and :class:`~rbank_torch.journal.JournalError` for a corrupt journal; never executes code from
        either. A damaged last journal record (torn by a crash mid-write, or corrupt) is dropped, never
        half-applied; its bytes are kept beside the journal and a ``JournalTailWarning`` names them.

        With a journal the bank is the bank's one writer: the journal's lock is taken (waiting up to
        ``lock_timeout`` seconds) before the snapshot is read, so the snapshot and the journal are read as
        the previous writer left them. A journal of another bank (another identity) raises ``JournalError``.
        Without a journal no lock is taken: a read-only open works while a writer holds the bank. With
        ``read_only=True`` the journal's records are replayed too, without the lock and without touching
        the journal (a damaged or unfinished last record is skipped, not cut off); the bank then refuses
        every change and ``save()``. A read-only open that races the writer's ``save()`` may raise
        ``JournalError``: open it again."""
        from .snapshot import read_snapshot
        from .store import _check_overrides

        _check_overrides(pattern_overrides)
        tensors, meta = read_snapshot(path, _BANK_FORMAT)
        lock = None
        if journal and not read_only:
            lock, tensors, meta = _lock_for_load(path, journal, meta, tensors, lock_timeout)
        try:
            bank = cls._from_snapshot(path, tensors, meta, pattern_overrides)
            bank._bank_lock = lock
            if journal:
                bank._attach_journal(journal, fsync, after_seq=int(meta.get("journal_seq", 0)),
                                     read_only=read_only)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return bank

    @classmethod
    def _from_snapshot(
        cls, path: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], pattern_overrides: dict[str, Any]
    ) -> ReasoningBank:
        from .snapshot import SnapshotError

        try:
            cfg = ReasoningBankConfig.from_dict(meta["config"])
            if "device" not in pattern_overrides:  # saved on a GPU, opened where none is usable: the CPU
                cfg.device = loadable_device(cfg.device, f"bank {path}")
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, OverflowError) as e:
            raise SnapshotError(f"{path}: corrupt or incompatible bank snapshot ({type(e).__name__}: {e})") from None
        # overrides (device, backend, ef_search, …) apply to the bank's config and to the loaded store
        for k, v in pattern_overrides.items():
            if k in ("device", "ef_search", "ef_construction", "m"):
                setattr(cfg, k, v)
            else:
                setattr(cfg.pattern_config, k, v)
        cfg.validate()  # a bad override value raises ValueError naming the field
        for name in _BANK_GOVERNS:  # the bank's fields govern its store: no warning for what it saved itself
            setattr(cfg.pattern_config, name, getattr(cfg, name))
        try:
            bank = cls(cfg)
            bank._store = PatternStore.from_state_tensors(
                tensors, meta["store"], prefix="patterns/", **{**pattern_overrides, "device": cfg.device}
            )
            bank._lock = bank._store._lock
            bank._trajectories = _trajectories_from_tensors(tensors, meta["trajectories"])
            bank._stats = _stats_from_json(meta["stats"])
            bank._analyzer._analyses = int(meta.get("analyses_performed", 0))
            if meta.get("consolidator") is not None:
                cons = bank._get_consolidator()
                cons.load_state_tensors(tensors, meta["consolidator"], "consolidator/")
        except SnapshotError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, OverflowError) as e:
            raise SnapshotError(f"{path}: corrupt or incompatible bank snapshot ({type(e).__name__}: {e})") from None
        sp = meta.get("storage_path")
        if sp is not None:
            if not (isinstance(sp, str) and os.path.isabs(sp)):
                raise SnapshotError(f"{path}: corrupt bank snapshot (storage_path must be an absolute path, got {sp!r})")
            bank._storage_path = sp
        bid = meta.get("bank_id")
        if bid is not None:
            if not (isinstance(bid, str) and len(bid) == 32 and all(c in "0123456789abcdef" for c in bid)):
                raise SnapshotError(f"{path}: corrupt bank snapshot (bank_id must be 32 hex digits, got {bid!r})")
            bank._bank_id = bid
            bank._identity_known = True
        return bank


def format_memories(results: Iterable[PatternSearchResult | Pattern], max_chars: int = 2000) -> str:
    """A plain-text block of memories for a system prompt (SPEC §7): most relevant first, each with its
    text, outcome and lessons; cut at a whole memory so the block stays within ``max_chars``.

    Example:
        >>> print(format_memories(bank.search("deploy without downtime", k=3)))  # doctest: +SKIP
        1. [success] roll out the new API version behind a feature flag
           - Ship behind a flag, then ramp up
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 0:
        raise ValueError(f"max_chars must be a non-negative integer, got {max_chars!r}")
    blocks: list[str] = []
    used = 0
    for n, r in enumerate(results, 1):
        p = r.pattern if isinstance(r, PatternSearchResult) else r
        if not isinstance(p, Pattern):
            raise ValueError(f"results[{n - 1}] must be a PatternSearchResult or a Pattern, got {type(r).__name__}")
        head = p.text if p.text else f"(pattern {p.id}, {p.category})"
        label = "failure — avoid repeating it" if p.outcome == "failure" else "success"
        lines = [f"{n}. [{label}] {' '.join(head.split())}"]
        lines += [f"   - {' '.join(x.split())}" for x in p.lessons]
        block = "\n".join(lines)
        cost = len(block) + (1 if blocks else 0)
        if used + cost > max_chars:
            break
        blocks.append(block)
        used += cost
    return "\n".join(blocks)


def _strings(values: Any, name: str) -> list[str]:
    if isinstance(values, str):
        raise ValueError(f"{name} must be a list of strings, not one string")
    try:
        out = list(values)
    except TypeError:
        raise ValueError(f"{name} must be a list of strings, got {type(values).__name__}") from None
    for i, v in enumerate(out):
        if not isinstance(v, str):
            raise ValueError(f"{name}[{i}] must be a string, got {type(v).__name__}")
    return out


def _as_encoder(embedder: Any) -> Any:
    """``texts -> [B, D]`` of an embedder (an object with ``encode``, or a callable); None stays None."""
    if embedder is None:
        return None
    enc = getattr(embedder, "encode", None)
    if callable(enc):
        return lambda texts: enc(list(texts))
    if callable(embedder):
        return embedder
    raise ValueError(f"embedder must have encode(list[str]) or be callable, got {type(embedder).__name__}")


def _known_dim(embedder: Any) -> int | None:
    """The embedder's dimension when it says so without being run (None otherwise)."""
    for name in ("get_sentence_embedding_dimension", "get_embedding_dimension"):
        get = getattr(embedder, name, None)
        if callable(get):
            try:
                d = get()
            except Exception:  # noqa: BLE001 - a model that cannot tell: learn it from the first call
                d = None
            if isinstance(d, int) and d > 0:
                return d
    for name in ("dim", "embedding_dim", "dimension"):
        d = getattr(embedder, name, None)
        if isinstance(d, int) and not isinstance(d, bool) and d > 0:
            return d
    return None


def _default_encoder() -> Any:
    """The packaged all-MiniLM-L6-v2, loaded now; MissingBackendError naming the extra when not installed."""
    from .backends import MissingBackendError

    try:
        from .text import TextEmbedder

        emb = TextEmbedder()
    except ImportError as e:
        raise MissingBackendError(
            "text queries need an embedder: pass ReasoningBank(embedder=...) or install the packaged model with "
            f"pip install 'rbank-torch[text]' ({e})"
        ) from None
    return emb.encode


#: fields of ReasoningBankConfig written over those of its pattern_config
_BANK_GOVERNS = ("ef_construction", "ef_search", "m", "device")


def _warn_overridden(cfg: ReasoningBankConfig) -> None:
    """The bank's own fields govern the pattern store; a different value set in pattern_config would be
    dropped: warn, naming both, and align pattern_config with what the bank uses."""
    import warnings

    default = PatternStoreConfig()
    pc = cfg.pattern_config
    for name in _BANK_GOVERNS:
        mine, theirs = getattr(cfg, name), getattr(pc, name)
        if theirs != mine and theirs != getattr(default, name):
            warnings.warn(
                f"pattern_config.{name} = {theirs!r} is overridden by ReasoningBankConfig.{name} = {mine!r} "
                f"(the bank's value governs the store); set ReasoningBankConfig.{name} instead",
                UserWarning, stacklevel=3,
            )
        setattr(pc, name, mine)


class _StoreListener:
    """The bank as its store's listener, held weakly: a bank dropped without ``close()`` (as a crashed
    process drops it) is freed at once, and with it its journal handle and its writer lock. A store kept
    after its bank is gone goes on alone (its changes then reach no journal)."""

    __slots__ = ("_ref",)

    def __init__(self, bank: ReasoningBank) -> None:
        self._ref = weakref.ref(bank)

    def touched(self, ids: Any) -> None:
        bank = self._ref()
        if bank is not None:
            bank.touched(ids)

    def op_done(self) -> None:
        bank = self._ref()
        if bank is not None:
            bank.op_done()

    def check_writable(self) -> None:
        bank = self._ref()
        if bank is not None:
            bank.check_writable()


def _lock_for_load(
    path: str, journal: Any, meta: dict[str, Any], tensors: dict[str, torch.Tensor], timeout: float
) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:
    """Take the writer lock of the journal a load attaches, then re-read the snapshot if a writer replaced
    it meanwhile (so snapshot and journal are read as one writer left them)."""
    from .locking import BankLock
    from .snapshot import read_snapshot

    if journal is True:
        sp = meta.get("storage_path")
        if not isinstance(sp, str):  # a snapshot of an older version: the configured path, from here
            cfg = meta.get("config")
            sp = cfg.get("storage_path") if isinstance(cfg, dict) else None
        jpath = os.path.join(os.path.abspath(sp if isinstance(sp, str) else ".rbank"), "bank.journal")
    else:
        jpath = os.path.abspath(os.fspath(journal))
    before = os.stat(path)
    lock = BankLock(jpath, timeout).acquire()
    try:
        after = os.stat(path)
        if (after.st_ino, after.st_mtime_ns, after.st_size) != (before.st_ino, before.st_mtime_ns, before.st_size):
            tensors, meta = read_snapshot(path, _BANK_FORMAT)
    except BaseException:
        lock.release()
        raise
    return lock, tensors, meta


def _default_path(storage_path: str) -> str:
    import os

    return os.path.join(storage_path, "bank.safetensors")


def _stats_to_json(s: ReasoningBankStats) -> dict[str, Any]:
    d = asdict(s)
    for k in ("last_consolidation", "last_distillation"):
        d[k] = None if d[k] is None else dt_to_us(d[k])
    return d


def _stats_from_json(d: dict[str, Any]) -> ReasoningBankStats:
    d = dict(d)
    for k in ("last_consolidation", "last_distillation"):
        d[k] = None if d.get(k) is None else us_to_dt(int(d[k]))
    known = {f.name for f in fields(ReasoningBankStats)}
    return ReasoningBankStats(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------------- trajectory (de)serialisation
def _flat(vectors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate 1-D float32 tensors; offsets ``[n + 1]``."""
    offs = torch.zeros(len(vectors) + 1, dtype=torch.int64)
    if vectors:
        offs[1:] = torch.cumsum(torch.tensor([v.numel() for v in vectors]), 0)
        data = torch.cat([v.detach().to("cpu", torch.float32).flatten() for v in vectors])
    else:
        data = torch.zeros(0, dtype=torch.float32)
    return data, offs


def _unflat(data: torch.Tensor, offs: torch.Tensor, what: str) -> list[torch.Tensor]:
    from .snapshot import SnapshotError

    if data.dtype != torch.float32 or offs.dtype != torch.int64 or data.dim() != 1 or offs.dim() != 1:
        raise SnapshotError(f"corrupt snapshot: bad dtype/shape for {what}")
    o = offs.tolist()
    if not o or o[0] != 0 or o[-1] != data.numel() or any(b < a for a, b in zip(o, o[1:])):
        raise SnapshotError(f"corrupt snapshot: inconsistent offsets for {what}")
    return [data[a:b].clone() for a, b in zip(o, o[1:])]


def _step_to_json(s: TrajectoryStep, ctx: list[torch.Tensor]) -> dict[str, Any]:
    d: dict[str, Any] = {
        "i": s.index,
        "a": s.action,
        "r": s.rationale,
        "o": s.outcome.to_dict(),
        "c": s.confidence,
        "l": s.latency_ms,
        "ts": dt_to_us(s.timestamp),
    }
    if s.context_embedding is not None:
        d["ctx"] = len(ctx)
        ctx.append(s.context_embedding)
    if s.metadata is not None:
        d["m"] = asdict(s.metadata)
    return d


def _trajectories_to_tensors(
    ts: list[Trajectory], prefix: str = "traj/"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from .snapshot import encode_strings

    queries = [t.query_embedding for t in ts]
    resp: list[torch.Tensor] = []
    ctx: list[torch.Tensor] = []
    docs = []
    for t in ts:
        d: dict[str, Any] = {
            "id": t.id,
            "uuid": t.uuid,
            "v": t.verdict.to_dict(),
            "q": t.quality,
            "lat": t.total_latency_ms,
            "st": dt_to_us(t.started_at),
            "ct": None if t.completed_at is None else dt_to_us(t.completed_at),
            "m": asdict(t.metadata),
            "les": list(t.lessons),
            "steps": [_step_to_json(s, ctx) for s in t.steps],
        }
        if t.response_embedding is not None:
            d["resp"] = len(resp)
            resp.append(t.response_embedding)
        docs.append(d)
    q_data, q_offs = _flat(queries)
    r_data, r_offs = _flat(resp)
    c_data, c_offs = _flat(ctx)
    j_data, j_offs = encode_strings([json.dumps(docs, ensure_ascii=False, allow_nan=False)])
    tensors = {
        prefix + "query": q_data,
        prefix + "query_offsets": q_offs,
        prefix + "response": r_data,
        prefix + "response_offsets": r_offs,
        prefix + "context": c_data,
        prefix + "context_offsets": c_offs,
        prefix + "json": j_data,
    }
    return tensors, {"count": len(ts)}


def _trajectories_from_tensors(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = "traj/", bump_ids: bool = True
) -> list[Trajectory]:
    from .snapshot import SnapshotError

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise SnapshotError(f"corrupt snapshot: missing tensor {name!r}")
        return tensors[name]

    queries = _unflat(get(prefix + "query"), get(prefix + "query_offsets"), "trajectory queries")
    resp = _unflat(get(prefix + "response"), get(prefix + "response_offsets"), "response embeddings")
    ctx = _unflat(get(prefix + "context"), get(prefix + "context_offsets"), "context embeddings")
    raw = get(prefix + "json")
    if raw.dtype != torch.uint8:
        raise SnapshotError("corrupt snapshot: trajectory table has the wrong dtype")
    try:
        docs = json.loads(raw.numpy().tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SnapshotError(f"corrupt snapshot: trajectory table ({type(e).__name__}: {e})") from None
    if not isinstance(docs, list) or len(docs) != len(queries) or len(docs) != int(meta.get("count", -1)):
        raise SnapshotError("corrupt snapshot: trajectory count mismatch")
    out = []
    max_id = 0
    for d, q in zip(docs, queries):
        steps = []
        for sd in d["steps"]:
            steps.append(
                TrajectoryStep(
                    index=int(sd["i"]),
                    action=sd["a"],
                    rationale=sd["r"],
                    outcome=StepOutcome.from_dict(sd["o"]),
                    confidence=sd["c"],
                    latency_ms=int(sd["l"]),
                    timestamp=us_to_dt(sd["ts"]),
                    context_embedding=ctx[sd["ctx"]] if "ctx" in sd else None,
                    metadata=StepMetadata(**sd["m"]) if "m" in sd else None,
                )
            )
        t = Trajectory(
            id=check_int(d["id"], "trajectory id"),
            uuid=str(d.get("uuid") or _uuid.uuid4()),
            query_embedding=q,
            response_embedding=resp[d["resp"]] if "resp" in d else None,
            steps=steps,
            verdict=Verdict.from_dict(d["v"]),
            quality=float(d["q"]),
            total_latency_ms=int(d["lat"]),
            started_at=us_to_dt(d["st"]),
            completed_at=None if d["ct"] is None else us_to_dt(d["ct"]),
            metadata=TrajectoryMetadata(**d["m"]),
            lessons=[str(x) for x in d["les"]],
        )
        max_id = max(max_id, t.id)
        out.append(t)
    if bump_ids:
        bump_id_counter(max_id)
    return out


# ---------------------------------------------------------------------- pattern (de)serialisation (journal)
def _patterns_to_tensors(ps: list[Pattern], prefix: str) -> tuple[dict[str, torch.Tensor], list]:
    if not ps:
        return {}, []
    emb = torch.stack([p.embedding.detach().to("cpu", torch.float32) for p in ps])
    meta = [
        [p.id, p.uuid, str(p.category), p.confidence, p.usage_count, p.success_count, p.avg_quality,
         dt_to_us(p.created_at), dt_to_us(p.last_accessed), list(p.source_trajectories), list(p.lessons),
         list(p.example_actions), list(p.metadata.tags), p.metadata.source, p.metadata.version,
         dict(p.metadata.attributes), p.text, p.outcome]
        for p in ps
    ]
    return {prefix + "emb": emb}, meta


def _patterns_from_tensors(tensors: dict[str, torch.Tensor], meta: list, prefix: str) -> list[Pattern]:
    from .patterns import PatternMetadata

    if not meta:
        return []
    emb = tensors[prefix + "emb"]
    if emb.dim() != 2 or emb.shape[0] != len(meta):
        raise ValueError("pattern record: embedding count mismatch")
    out = []
    for e, m in zip(emb, meta):
        if len(m) not in (16, 18):
            raise ValueError("pattern record: expected 18 fields")
        (pid, uid, cat, conf, usage, success, avgq, created, last, sources, lessons, actions, tags, source,
         version, attrs) = m[:16]
        text, outcome = (m[16], m[17]) if len(m) == 18 else (None, "success")
        if text is not None and not isinstance(text, str):
            raise ValueError("pattern record: text must be a string or null")
        if outcome not in OUTCOMES:
            raise ValueError(f"pattern record: outcome must be one of {list(OUTCOMES)}")
        out.append(
            Pattern(
                id=int(pid), uuid=str(uid), embedding=e.clone(), category=PatternCategory.parse(cat),
                confidence=float(conf), usage_count=int(usage), success_count=int(success),
                avg_quality=float(avgq), source_trajectories=[int(x) for x in sources],
                lessons=[str(x) for x in lessons], example_actions=[str(x) for x in actions],
                created_at=us_to_dt(created), last_accessed=us_to_dt(last),
                metadata=PatternMetadata(tags=[str(x) for x in tags], source=str(source), version=int(version),
                                         attributes=check_attributes(attrs, "attributes")),
                text=text, outcome=outcome,
            )
        )
    bump_id_counter(max(p.id for p in out))
    return out
