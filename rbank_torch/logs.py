"""Trajectory logs: read, validate and write the JSONL (and Parquet) log format.

The format is documented in ``docs/trajectory-format.md``: one JSON object per line holding the
query text and/or its embedding, the steps, the verdict, metadata, lessons and optional id and times.

Reading streams: :func:`iter_log_batches` reads a file in chunks of lines, validates every line, builds
:class:`~rbank_torch.trajectory.Trajectory` objects directly and turns the embeddings of a chunk into one
``[n, D]`` tensor. A bad line raises :class:`LogFormatError` naming ``file:line`` and the field, or, with
``skip_bad=True``, is reported through a callback and counted in :class:`ReadStats`; it is never dropped
silently. Lines without an embedding are embedded from their query text by the ``embed`` callback, one
batch per chunk, so a text model is only needed (and loaded) when a log lacks embeddings.

Example:
    >>> from rbank_torch.logs import iter_log_batches
    >>> for batch in iter_log_batches(["runs.jsonl"], chunk_size=4096):  # doctest: +SKIP
    ...     bank_or_distiller.add(batch.trajectories)
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import os
import random
import re
import uuid as _uuid
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np
import torch

from ._util import bump_id_counter, next_id, utcnow
from .synthetic import TaskSpec
from .trajectory import StepMetadata, StepOutcome, Trajectory, TrajectoryMetadata, TrajectoryStep
from .verdicts import Verdict

__all__ = [
    "LogFormatError",
    "MissingExtraError",
    "ReadStats",
    "LogBatch",
    "EmbedFn",
    "iter_log_batches",
    "read_log",
    "parse_record",
    "trajectory_to_record",
    "task_to_record",
    "write_jsonl",
    "write_parquet",
    "log_kind",
    "TOP_LEVEL_FIELDS",
    "STEP_FIELDS",
    "METADATA_FIELDS",
]

#: an ``embed(texts) -> [n, D] float32 tensor`` callback for lines that only carry query text
EmbedFn = Callable[[list[str]], torch.Tensor]

TOP_LEVEL_FIELDS = frozenset(
    {
        "id",
        "uuid",
        "query",
        "query_embedding",
        "response_embedding",
        "steps",
        "verdict",
        "quality",
        "metadata",
        "lessons",
        "started_at",
        "completed_at",
        "total_latency_ms",
    }
)
STEP_FIELDS = frozenset(
    {
        "action",
        "rationale",
        "outcome",
        "confidence",
        "latency_ms",
        "timestamp",
        "tool",
        "model",
        "input_tokens",
        "output_tokens",
        "tags",
        "attributes",
        "context_embedding",
    }
)
METADATA_FIELDS = frozenset(
    {
        "session_id",
        "user_id",
        "request_type",
        "total_input_tokens",
        "total_output_tokens",
        "models_used",
        "tools_invoked",
        "tags",
        "attributes",
    }
)
_STEP_META_FIELDS = frozenset({"tool", "model", "input_tokens", "output_tokens", "tags", "attributes"})
_OUTCOME_FIELDS = frozenset({"kind", "achieved", "missing", "error", "reason", "suggestions"})
_VERDICT_FIELDS = frozenset({"kind", "cause", "completion_ratio", "original", "attempts", "final_quality"})
_CAUSE_FIELDS = frozenset(
    {"type", "missing", "details", "tool", "error", "error_type", "description", "resource", "limit", "service",
     "limitation"}
)

_PARQUET_HINT = "pip install 'rbank-torch[parquet]'"
_EMB_KEY = b'"query_embedding"'
_NUMBER_TYPES = frozenset({float, int})
_JSON_NUMBER = rb"[ \t\r\n]*-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?[ \t\r\n]*"
_JSON_NUMBERS = re.compile(_JSON_NUMBER + rb"(?:," + _JSON_NUMBER + rb")*")
_NUMBER_BYTES = b"0123456789.,eE-+ \t\r\n"
_SUCCESS_OUTCOME = StepOutcome.success()
_SUCCESS_VERDICT = Verdict.success()
_UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)
#: most bad-line messages kept in :class:`ReadStats` (all are counted)
MAX_KEPT_ERRORS = 100


class LogFormatError(ValueError):
    """A log line that does not follow the format.

    Attributes:
        path: the log file.
        line: 1-based line number (row number for Parquet); 0 when the whole file is at fault.
        field: dotted path of the offending field (``steps[2].confidence``), or None.
        reason: what is wrong.
    """

    def __init__(self, path: str, line: int, field: str | None, reason: str) -> None:
        self.path = str(path)
        self.line = int(line)
        self.field = field
        self.reason = reason
        where = f"{self.path}:{self.line}" if self.line else self.path
        super().__init__(f"{where}: {field}: {reason}" if field else f"{where}: {reason}")


class _FieldError(ValueError):
    """A field of one record is invalid (becomes a :class:`LogFormatError` with the file and line)."""

    def __init__(self, field: str | None, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}" if field else reason)


class MissingExtraError(RuntimeError):
    """An optional dependency is missing; the message names the extra to install."""


@dataclass
class ReadStats:
    """What a read saw: files, lines, records kept, bad lines (counted; the first messages kept)."""

    files: int = 0
    lines: int = 0
    records: int = 0
    bad_lines: int = 0
    errors: list[str] = field(default_factory=list)
    bytes_read: int = 0
    embedded_from_text: int = 0

    def record_error(self, err: LogFormatError) -> None:
        self.bad_lines += 1
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(str(err))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LogBatch:
    """One chunk of a log: validated trajectories (their embeddings are rows of one ``[n, D]`` tensor).

    Attributes:
        path: the file the chunk comes from.
        trajectories: the trajectories, in file order.
        lines: the line (or row) number of each trajectory.
        queries: the query text of each trajectory (None when the line has none).
        embeddings: ``[n, D]`` float32, row i is ``trajectories[i].query_embedding``.
        nbytes: bytes of the file consumed by this chunk (for progress bars).
    """

    path: str
    trajectories: list[Trajectory]
    lines: list[int]
    queries: list[str | None]
    embeddings: torch.Tensor
    nbytes: int = 0

    def __len__(self) -> int:
        return len(self.trajectories)


# ---------------------------------------------------------------------------------------------------------
# Field validation.


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _str(v: Any, fld: str) -> str:
    if type(v) is str:
        return v
    raise _FieldError(fld, f"must be a string, got {_type_name(v)}")


def _opt_str(v: Any, fld: str) -> str | None:
    if v is None or type(v) is str:
        return v
    raise _FieldError(fld, f"must be a string or null, got {_type_name(v)}")


def _str_list(v: Any, fld: str) -> list[str]:
    if v is None:
        return []
    if type(v) is not list:
        raise _FieldError(fld, f"must be a list of strings, got {_type_name(v)}")
    for i, x in enumerate(v):
        if type(x) is not str:
            raise _FieldError(f"{fld}[{i}]", f"must be a string, got {_type_name(x)}")
    return v


def _attrs(v: Any, fld: str) -> dict[str, str]:
    if v is None:
        return {}
    if type(v) is list:  # Parquet maps arrive as (key, value) pairs
        try:
            v = dict(v)
        except (TypeError, ValueError):
            raise _FieldError(fld, "must be an object of strings") from None
    if type(v) is not dict:
        raise _FieldError(fld, f"must be an object of strings, got {_type_name(v)}")
    out: dict[str, str] = {}
    for k, x in v.items():
        if type(x) is str:
            out[k] = x
        elif type(x) in (int, float, bool):
            out[k] = json.dumps(x)
        else:
            raise _FieldError(f"{fld}.{k}", f"must be a string, number or boolean, got {_type_name(x)}")
    return out


#: the largest record ``id`` read: the largest integer every JSON reader keeps exactly, which also leaves
#: the bank's own id counter (int64) room to hand out ids after it
MAX_RECORD_ID = 2**53 - 1
#: the largest count (tokens) and number of milliseconds read
MAX_COUNT = 2**53 - 1
#: the longest line of a JSONL log read, in bytes (newline excluded); a longer line is a bad line, skipped
#: in bounded chunks without ever being held in memory whole
MAX_LINE_BYTES = 16 * 1024 * 1024
#: the longest query text read, in characters (it goes to the text model)
MAX_QUERY_CHARS = 1024 * 1024


def _count(v: Any, fld: str) -> int:
    if type(v) is int and 0 <= v <= MAX_COUNT:
        return v
    if type(v) is float and 0 <= v <= MAX_COUNT and v.is_integer():
        return int(v)
    raise _FieldError(fld, f"must be a non-negative integer of at most 2**53 - 1, got {v!r}")


def _unit(v: Any, fld: str) -> float:
    if (type(v) is float or type(v) is int) and 0.0 <= v <= 1.0:
        return float(v)
    if type(v) in (int, float):
        raise _FieldError(fld, f"must be within [0, 1], got {v!r}")
    raise _FieldError(fld, f"must be a number within [0, 1], got {_type_name(v)}")


def _ms(v: Any, fld: str) -> int:
    if (type(v) is int or type(v) is float) and 0 <= v <= MAX_COUNT:
        return int(v)
    raise _FieldError(fld, f"must be a non-negative number of milliseconds of at most 2**53 - 1, got {v!r}")


def _time(v: Any, fld: str) -> datetime:
    """ISO 8601 text (``Z`` or an offset; no offset means UTC) or seconds since the Unix epoch."""
    if type(v) is str:
        s = v[:-1] + "+00:00" if v.endswith(("Z", "z")) else v
        try:
            dt = datetime.fromisoformat(s)
            return dt.replace(tzinfo=_UTC) if dt.tzinfo is None else dt.astimezone(_UTC)
        except (ValueError, OverflowError):
            raise _FieldError(fld, f"must be an ISO 8601 time (years 1 to 9999 in UTC) or epoch seconds, got "
                                   f"{v[:80]!r}") from None
    if type(v) in (int, float) and math.isfinite(v):
        try:
            return _EPOCH + timedelta(seconds=v)
        except (OverflowError, ValueError):
            raise _FieldError(fld, f"epoch seconds out of range (years 1 to 9999), got {v!r}") from None
    raise _FieldError(fld, f"must be an ISO 8601 time or epoch seconds, got {_type_name(v)}")


def _unknown(d: dict, known: frozenset, fld: str) -> None:
    extra = d.keys() - known
    if extra:
        name = sorted(extra)[0]
        raise _FieldError(f"{fld + '.' if fld else ''}{name}", f"unknown field (known: {', '.join(sorted(known))})")


def _outcome(v: Any, fld: str) -> StepOutcome:
    if type(v) is str:
        v = {"kind": v}
    elif type(v) is not dict:
        raise _FieldError(fld, f"must be an object with a 'kind' (or a kind string), got {_type_name(v)}")
    kind = v.get("kind")
    if kind == "success" and len(v) == 1:
        return _SUCCESS_OUTCOME
    _unknown(v, _OUTCOME_FIELDS, fld)
    if "suggestions" in v:
        _str_list(v["suggestions"], fld + ".suggestions")
    try:
        return StepOutcome.from_dict(v)
    except ValueError as e:
        raise _FieldError(f"{fld}.kind", _strip_field(e, "outcome kind")) from None


def _strip_field(e: Exception, prefix: str) -> str:
    s = str(e)
    return s[len(prefix) + 1 :] if s.startswith(prefix + " ") else s


def _cause(v: Any, fld: str) -> None:
    if type(v) is not dict:
        raise _FieldError(fld, f"must be a root-cause object with a 'type', got {_type_name(v)}")
    _unknown(v, _CAUSE_FIELDS, fld)
    _str(v.get("type"), fld + ".type")
    for k, x in v.items():
        if k == "missing":
            _str_list(x, fld + ".missing")
        elif k != "type" and type(x) is not str:
            _str(x, f"{fld}.{k}")  # never turned into text: a number or a list here is an error


def _verdict(v: Any, fld: str) -> Verdict:
    if type(v) is str:
        v = {"kind": v}
    elif type(v) is not dict:
        raise _FieldError(fld, f"must be an object with a 'kind' (or a kind string), got {_type_name(v)}")
    kind = v.get("kind")
    if kind == "success" and len(v) == 1:
        return _SUCCESS_VERDICT
    _unknown(v, _VERDICT_FIELDS, fld)
    if kind == "failure":
        if "cause" not in v:
            raise _FieldError(f"{fld}.cause", "a failure verdict needs a root cause")
        _cause(v["cause"], fld + ".cause")
    elif kind == "recovered":
        if "original" not in v:
            raise _FieldError(f"{fld}.original", "a recovered verdict needs the original root cause")
        _cause(v["original"], fld + ".original")
        if "attempts" in v:
            _count(v["attempts"], fld + ".attempts")
        if "final_quality" in v:
            _unit(v["final_quality"], fld + ".final_quality")
    elif kind == "partial":
        if "completion_ratio" in v:
            _unit(v["completion_ratio"], fld + ".completion_ratio")
    elif kind != "success":
        raise _FieldError(f"{fld}.kind", f"must be one of success, failure, partial, recovered; got {kind!r}")
    try:
        return Verdict.from_dict(v)
    except ValueError as e:
        raise _FieldError(fld, str(e)) from None


def _embedding_list(v: Any, fld: str) -> list:
    if type(v) is not list:
        raise _FieldError(fld, f"must be a list of numbers, got {_type_name(v)}")
    if not v:
        raise _FieldError(fld, "must not be empty")
    return v


def _check_numbers(v: list, fld: str) -> None:
    for i, x in enumerate(v):
        if type(x) is not float and type(x) is not int:
            raise _FieldError(f"{fld}[{i}]", f"must be a number, got {_type_name(x)}")
        if not math.isfinite(x):
            raise _FieldError(f"{fld}[{i}]", f"must be finite, got {x!r}")


def _step(s: Any, i: int, started: datetime) -> tuple[TrajectoryStep, str | None, str | None, int, int]:
    fld = f"steps[{i}]"
    if type(s) is not dict:
        raise _FieldError(fld, f"must be an object, got {_type_name(s)}")
    if not s.keys() <= STEP_FIELDS:
        _unknown(s, STEP_FIELDS, fld)
    try:
        action = s["action"]
        outcome = s["outcome"]
        conf = s["confidence"]
    except KeyError as e:
        raise _FieldError(f"{fld}.{e.args[0]}", "required field is missing") from None
    if type(action) is not str:
        _str(action, fld + ".action")
    out = _outcome(outcome, fld + ".outcome")
    if not ((type(conf) is float or type(conf) is int) and 0.0 <= conf <= 1.0):
        _unit(conf, fld + ".confidence")
    rationale = s.get("rationale", "")
    if type(rationale) is not str:
        rationale = "" if rationale is None else _str(rationale, fld + ".rationale")
    lat = s.get("latency_ms")
    lat = 0 if lat is None else _ms(lat, fld + ".latency_ms")
    ts = s.get("timestamp")
    ts = started if ts is None else _time(ts, fld + ".timestamp")
    tool = s.get("tool")
    model = s.get("model")
    meta = None
    tin = tout = 0
    if not s.keys().isdisjoint(_STEP_META_FIELDS):
        tool = _opt_str(tool, fld + ".tool")
        model = _opt_str(model, fld + ".model")
        raw_in = s.get("input_tokens")
        tin = 0 if raw_in is None else _count(raw_in, fld + ".input_tokens")
        raw_out = s.get("output_tokens")
        tout = 0 if raw_out is None else _count(raw_out, fld + ".output_tokens")
        tags = _str_list(s.get("tags"), fld + ".tags")
        attrs = _attrs(s.get("attributes"), fld + ".attributes")
        if tool is not None or model is not None or tin or tout or tags or attrs:
            meta = StepMetadata(tool_used=tool, input_tokens=tin, output_tokens=tout, model=model, tags=list(tags),
                                attributes=attrs)
    ctx = s.get("context_embedding")
    if ctx is not None:
        _check_numbers(_embedding_list(ctx, fld + ".context_embedding"), fld + ".context_embedding")
        ctx = torch.tensor(ctx, dtype=torch.float32)
    try:
        step = TrajectoryStep(i, action, rationale, out, float(conf), lat, ts, ctx, meta)
    except ValueError as e:
        raise _FieldError(fld, str(e)) from None
    return step, tool, model, tin, tout


def parse_record(
    obj: Any, now: datetime | None = None, embedding_cut: bool = False
) -> tuple[Trajectory, str | None, Any]:
    """Validate one decoded log record and build its trajectory.

    Args:
        obj: the decoded JSON object.
        now: start time for records without ``started_at`` (default: now).
        embedding_cut: the reader cut the record's ``query_embedding`` list out of the raw line (it stands
            as ``null`` in ``obj`` and is parsed separately), so the record does carry an embedding.

    Returns:
        ``(trajectory, query_text, embedding)``: the trajectory's ``query_embedding`` is left None;
        ``embedding`` is the record's ``query_embedding`` list (None when absent: embed ``query_text``).

    Raises:
        ValueError: ``"<field>: <reason>"`` for the first invalid field.
    """
    if type(obj) is not dict:
        raise _FieldError(None, f"the line must hold a JSON object, got {_type_name(obj)}")
    if not obj.keys() <= TOP_LEVEL_FIELDS:
        _unknown(obj, TOP_LEVEL_FIELDS, "")
    query = obj.get("query")
    if query is not None and type(query) is not str:
        _str(query, "query")
    if query is not None and len(query) > MAX_QUERY_CHARS:
        raise _FieldError("query", f"is {len(query)} characters long; at most {MAX_QUERY_CHARS} are read")
    emb = obj.get("query_embedding")
    if emb is not None:
        _embedding_list(emb, "query_embedding")
    elif query is None and not embedding_cut:
        raise _FieldError("query", "a record needs its query text, its query_embedding, or both")
    if "verdict" not in obj:
        raise _FieldError("verdict", "required field is missing")
    verdict = _verdict(obj["verdict"], "verdict")

    v = obj.get("started_at")
    started = (now or utcnow()) if v is None else _time(v, "started_at")
    steps_raw = obj.get("steps")
    steps: list[TrajectoryStep] = []
    tools: list[str] = []
    models: list[str] = []
    tin_sum = tout_sum = lat_sum = 0
    if steps_raw is not None:
        if type(steps_raw) is not list:
            raise _FieldError("steps", f"must be a list of step objects, got {_type_name(steps_raw)}")
        for i, s in enumerate(steps_raw):
            st, tool, model, tin, tout = _step(s, i, started)
            steps.append(st)
            lat_sum += st.latency_ms
            if tool is not None and tool not in tools:
                tools.append(tool)
            if model is not None and model not in models:
                models.append(model)
            tin_sum += tin
            tout_sum += tout

    md_raw = obj.get("metadata")
    if md_raw is None:
        md = TrajectoryMetadata(total_input_tokens=tin_sum, total_output_tokens=tout_sum, models_used=models,
                                tools_invoked=tools)
    else:
        if type(md_raw) is not dict:
            raise _FieldError("metadata", f"must be an object, got {_type_name(md_raw)}")
        if not md_raw.keys() <= METADATA_FIELDS:
            _unknown(md_raw, METADATA_FIELDS, "metadata")
        g = md_raw.get
        ti, to = g("total_input_tokens"), g("total_output_tokens")
        mu, tv = g("models_used"), g("tools_invoked")
        md = TrajectoryMetadata(
            session_id=_opt_str(g("session_id"), "metadata.session_id"),
            user_id=_opt_str(g("user_id"), "metadata.user_id"),
            request_type=_opt_str(g("request_type"), "metadata.request_type"),
            total_input_tokens=tin_sum if ti is None else _count(ti, "metadata.total_input_tokens"),
            total_output_tokens=tout_sum if to is None else _count(to, "metadata.total_output_tokens"),
            models_used=models if mu is None else list(_str_list(mu, "metadata.models_used")),
            tools_invoked=tools if tv is None else list(_str_list(tv, "metadata.tools_invoked")),
            tags=list(_str_list(g("tags"), "metadata.tags")),
            attributes=_attrs(g("attributes"), "metadata.attributes"),
        )
    if query is not None and "query" not in md.attributes:
        md.attributes["query"] = query
    lessons = list(_str_list(obj.get("lessons"), "lessons"))

    v = obj.get("total_latency_ms")
    total_lat = lat_sum if v is None else _ms(v, "total_latency_ms")
    v = obj.get("completed_at")
    if v is None:
        try:
            completed = started + timedelta(milliseconds=total_lat)
        except (OverflowError, ValueError):
            raise _FieldError("total_latency_ms", f"{total_lat} ms after started_at is past the year 9999") from None
    else:
        completed = _time(v, "completed_at")
    v = obj.get("id")
    if v is None:
        tid = next_id()
    elif type(v) is int and 0 <= v <= MAX_RECORD_ID:
        tid = v
    elif type(v) is int and v >= 0:
        raise _FieldError("id", f"must be at most 2**53 - 1 ({MAX_RECORD_ID}), got {v}")
    else:
        raise _FieldError("id", f"must be a non-negative integer, got {v!r}")
    v = obj.get("uuid")
    uid = str(_uuid.uuid4()) if v is None else _str(v, "uuid")
    resp = obj.get("response_embedding")
    if resp is not None:
        _check_numbers(_embedding_list(resp, "response_embedding"), "response_embedding")
        resp = torch.tensor(resp, dtype=torch.float32)

    t = Trajectory(
        id=tid,
        uuid=uid,
        query_embedding=None,  # type: ignore[arg-type]  # filled from the chunk tensor
        response_embedding=resp,
        steps=steps,
        verdict=verdict,
        quality=0.0,
        total_latency_ms=total_lat,
        started_at=started,
        completed_at=completed,
        metadata=md,
        lessons=lessons,
    )
    q = obj.get("quality")
    t.quality = t.compute_quality() if q is None else _unit(q, "quality")
    return t, query, emb


# ---------------------------------------------------------------------------------------------------------
# Reading.


def log_kind(path: str | os.PathLike) -> str:
    """``"parquet"`` for ``.parquet``/``.pq`` files, else ``"jsonl"`` (``.gz`` is read compressed)."""
    name = str(path).lower()
    return "parquet" if name.endswith((".parquet", ".pq")) else "jsonl"


class _ChunkBuilder:
    """Collects the parsed lines of one chunk and turns them into a :class:`LogBatch`."""

    def __init__(self, path: str, dim: list[int | None], skip_bad: bool, stats: ReadStats,
                 on_error: Callable[[LogFormatError], None] | None, embed: EmbedFn | None) -> None:
        self.path = path
        self.dim = dim  # shared one-element holder: the first dimension seen fixes it for the whole read
        self.skip_bad = skip_bad
        self.stats = stats
        self.on_error = on_error
        self.embed = embed
        self.building = False
        #: explicit record ids seen in this read (all its files) → where: a repeated id is a bad line
        self.seen_ids: dict[int, str] = {}
        self.reset()

    def reset(self) -> None:
        self.trajs: list[Trajectory] = []
        self.lines: list[int] = []
        self.queries: list[str | None] = []
        # per trajectory: 0 = fast segment, 1 = python list, 2 = needs text embedding
        self.src: list[int] = []
        self.segs: list[bytes] = []
        self.seg_counts: list[int] = []
        self.lists: list[list] = []
        self.nbytes = 0
        self.now = utcnow()
        self.pending_errors: list[LogFormatError] = []

    def bad(self, line: int, field: str | None, reason: str) -> None:
        err = LogFormatError(self.path, line, field, reason)
        if not self.skip_bad:
            if self.trajs and not self.building:
                # earlier lines of the chunk are only checked numerically in build(): the first bad line
                # of the file must win, so check them before stopping here
                self.build()
            raise err
        # reported in line order when the chunk is built (embeddings are checked per chunk)
        self.pending_errors.append(err)

    def _flush_errors(self) -> None:
        for err in sorted(self.pending_errors, key=lambda e: e.line):
            self.stats.record_error(err)
            if self.on_error is not None:
                self.on_error(err)
        self.pending_errors = []

    def add(self, line: int, obj: Any, seg: bytes | None, seg_count: int) -> None:
        try:
            t, query, emb = parse_record(obj, self.now, embedding_cut=seg is not None)
            if seg is not None:
                d = self.dim[0]
                if d is not None and seg_count != d:
                    raise _FieldError("query_embedding", f"must have dimension {d}, got {seg_count}")
                self.dim[0] = seg_count
                src = 0
            elif emb is not None:
                d = self.dim[0]
                if d is not None and len(emb) != d:
                    raise _FieldError("query_embedding", f"must have dimension {d}, got {len(emb)}")
                self.dim[0] = len(emb)
                src = 1
            else:
                src = 2
        except _FieldError as e:
            more = _other_errors(obj, e.field)
            self.bad(line, e.field, e.reason + (f" (also: {'; '.join(more)})" if more else ""))
            return
        except (ValueError, TypeError, OverflowError) as e:
            self.bad(line, None, f"invalid record ({e})")
            return
        if obj.get("id") is not None:
            first = self.seen_ids.setdefault(t.id, f"{self.path}:{line}")
            if first != f"{self.path}:{line}":
                self.bad(line, "id", f"{t.id} was already used by the record at {first}")
                return
        self.trajs.append(t)
        self.lines.append(line)
        self.queries.append(query)
        self.src.append(src)
        if src == 0:
            self.segs.append(seg)  # type: ignore[arg-type]
            self.seg_counts.append(seg_count)
        elif src == 1:
            self.lists.append(emb)

    def _seg_rows(self) -> np.ndarray:
        """Parse the fast-path embedding segments of the chunk with one ``np.fromstring`` call."""
        n = len(self.segs)
        d = self.seg_counts[0] if n else 0
        joined = b",".join(self.segs)
        # np.fromstring also takes +1, .5, 1. and 01, which JSON forbids: those rows go the checked way
        if _JSON_NUMBERS.fullmatch(joined) is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                try:
                    flat = np.fromstring(joined, dtype=np.float64, sep=",")  # noqa: NPY201
                    if flat.size == n * d:
                        return flat.reshape(n, d)
                except (ValueError, DeprecationWarning):
                    pass
        out = np.empty((n, d), dtype=np.float64)
        for i, s in enumerate(self.segs):
            try:
                out[i] = np.asarray(json.loads(b"[" + s + b"]"), dtype=np.float64)
            except (ValueError, TypeError):
                out[i] = np.nan  # reported as a bad line below
        return out

    def _list_rows(self) -> np.ndarray:
        try:
            # numpy reads true/false as 1/0: only plain JSON numbers take the fast way
            if set(map(type, itertools.chain.from_iterable(self.lists))) <= _NUMBER_TYPES:
                arr = np.array(self.lists)
                if arr.dtype.kind in "fi" and arr.ndim == 2:
                    return arr.astype(np.float64, copy=False)
        except (ValueError, TypeError):
            pass
        out = np.empty((len(self.lists), len(self.lists[0])), dtype=np.float64)
        for i, v in enumerate(self.lists):
            ok = all((type(x) is float or type(x) is int) for x in v)
            out[i] = np.asarray(v, dtype=np.float64) if ok else np.nan
        return out

    def build(self) -> LogBatch | None:
        self.building = True
        try:
            return self._build()
        finally:
            self.building = False

    def _build(self) -> LogBatch | None:
        n = len(self.trajs)
        if n == 0:
            nb = self.nbytes
            self._flush_errors()
            self.reset()
            self.stats.bytes_read += nb
            return None
        src = np.asarray(self.src, dtype=np.int8)
        pending_text = np.flatnonzero(src == 2)
        text_emb: torch.Tensor | None = None
        if pending_text.size:
            if self.embed is None:
                for i in pending_text.tolist():
                    self.bad(self.lines[i], "query_embedding", "missing, and no text model was given to embed 'query'")
            else:
                texts = [self.queries[i] for i in pending_text.tolist()]
                uniq = list(dict.fromkeys(texts))
                e = self.embed(uniq)
                if not isinstance(e, torch.Tensor) or e.dim() != 2 or e.shape[0] != len(uniq):
                    raise ValueError("the text model returned embeddings of the wrong shape")
                d = self.dim[0]
                if d is not None and e.shape[1] != d:
                    raise LogFormatError(
                        self.path, self.lines[int(pending_text[0])], "query",
                        f"the text model gives {e.shape[1]}-d embeddings but the log's embeddings have dimension {d}",
                    )
                self.dim[0] = int(e.shape[1])
                row_of = {q: j for j, q in enumerate(uniq)}
                text_emb = e.to(torch.float32)[torch.tensor([row_of[q] for q in texts], dtype=torch.int64)]
                self.stats.embedded_from_text += len(texts)
        d = self.dim[0]
        emb = np.empty((n, d or 0), dtype=np.float32)
        if self.segs:
            emb[src == 0] = self._seg_rows()
        if self.lists:
            emb[src == 1] = self._list_rows()
        tensor = torch.from_numpy(emb)
        if text_emb is not None:
            tensor[torch.from_numpy(pending_text)] = text_emb
        keep = torch.isfinite(tensor).all(dim=1).numpy()
        if pending_text.size and text_emb is None:
            keep[pending_text] = False  # already reported above
        if not keep.all():
            for i in np.flatnonzero(~keep).tolist():
                if src[i] != 2 or text_emb is not None:
                    self.bad(self.lines[i], "query_embedding", "must hold finite numbers (found NaN, inf or a non-number)")
            idx = np.flatnonzero(keep)
            tensor = tensor[torch.from_numpy(idx)]
            trajs = [self.trajs[i] for i in idx.tolist()]
            lines = [self.lines[i] for i in idx.tolist()]
            queries = [self.queries[i] for i in idx.tolist()]
        else:
            trajs, lines, queries = self.trajs, self.lines, self.queries
        rows = tensor.unbind(0)
        max_id = 0
        for t, r in zip(trajs, rows):
            t.query_embedding = r
            if t.id > max_id:
                max_id = t.id
        bump_id_counter(max_id)
        batch = LogBatch(self.path, trajs, lines, queries, tensor, self.nbytes)
        self.stats.records += len(trajs)
        self.stats.bytes_read += self.nbytes
        self._flush_errors()
        self.reset()
        return batch if trajs else None


def _split_embedding(raw: bytes) -> tuple[bytes, bytes, int] | None:
    """Cut the ``query_embedding`` list out of a raw line: (line with ``null`` in its place, the list's inner
    bytes, its element count). None when the line does not lend itself to it (then ``json.loads`` decides)."""
    k = raw.find(_EMB_KEY)
    if k < 0 or raw.find(_EMB_KEY, k + 1) >= 0:  # absent, or given twice: json.loads and the checks decide
        return None
    c = k + len(_EMB_KEY)
    n = len(raw)
    while c < n and raw[c] in b" \t":
        c += 1
    if c >= n or raw[c] != 58:  # ':'
        return None
    s = c + 1
    while s < n and raw[s] in b" \t":
        s += 1
    if s >= n or raw[s] != 91:  # '['
        return None
    e = raw.find(b"]", s)
    if e < 0:
        return None
    seg = raw[s + 1 : e]
    if not seg.strip() or seg.translate(None, _NUMBER_BYTES):
        return None
    return raw[:s] + b"null" + raw[e + 1 :], seg, seg.count(b",") + 1


def _decode_line(raw: bytes, fast: bool) -> tuple[Any, bytes | None, int]:
    if fast:
        cut = _split_embedding(raw)
        if cut is not None:
            stripped, seg, count = cut
            try:
                obj = json.loads(stripped)
            except ValueError:
                obj = None
            if type(obj) is dict and "query_embedding" in obj and obj["query_embedding"] is None:
                return obj, seg, count
    if raw.count(_EMB_KEY) > 1:  # rare: look for the same key twice in one object (JSON keeps the last)
        return json.loads(raw, object_pairs_hook=_no_duplicate_keys), None, 0
    return json.loads(raw), None, 0


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _v in pairs:
            if k in seen:
                raise ValueError(f"the key {k!r} is given twice in one object")
            seen.add(k)
    return d


def _open_text(path: Path) -> BinaryIO:
    if str(path).endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]  # GzipFile implements BinaryIO's methods
    return open(path, "rb", buffering=1 << 20)


#: the most further errors of one bad line listed after its first one
_MORE_ERRORS = 10


def _other_errors(obj: Any, first: str | None) -> list[str]:
    """The errors of a bad record beyond its first one (``first`` is that one's field), each part of the
    record checked on its own: ``"field: reason"``, at most :data:`_MORE_ERRORS`."""
    if type(obj) is not dict:
        return []
    out: list[str] = []

    def check(fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except _FieldError as e:
            if e.field != first and len(out) < _MORE_ERRORS:
                out.append(str(e))
        except (ValueError, TypeError, OverflowError):
            pass

    check(_unknown, obj, TOP_LEVEL_FIELDS, "")
    emb = obj.get("query_embedding")
    if type(emb) is list:
        check(_check_numbers, emb, "query_embedding")
    if "verdict" in obj:
        check(_verdict, obj["verdict"], "verdict")
    steps = obj.get("steps")
    if type(steps) is list:
        for i, st in enumerate(steps[:100]):
            check(_step, st, i, _EPOCH)
    check(_str_list, obj.get("lessons"), "lessons")
    for k in ("started_at", "completed_at"):
        if obj.get(k) is not None:
            check(_time, obj[k], k)
    if obj.get("quality") is not None:
        check(_unit, obj["quality"], "quality")
    return out


def _bounded_lines(f: BinaryIO) -> Iterator[tuple[bytes | None, int]]:
    """``(line, bytes read)`` for each line of ``f``; a line longer than :data:`MAX_LINE_BYTES` comes as
    ``(None, its length)``, read past in bounded chunks (memory stays bounded however long the line)."""
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) <= MAX_LINE_BYTES or raw.endswith(b"\n"):
            yield raw, len(raw)
            continue
        n = len(raw)
        while True:
            more = f.readline(_SKIP_CHUNK)
            n += len(more)
            if not more or more.endswith(b"\n"):
                break
        yield None, n


_SKIP_CHUNK = 1 << 20


def _checked_lines(path: Path, f: BinaryIO) -> Iterator[tuple[bytes | None, int]]:
    """:func:`_bounded_lines`, with damaged data (a corrupt or truncated gzip stream, a read error) reported
    as a :class:`LogFormatError` naming the file and the line where reading stopped."""
    it = _bounded_lines(f)
    line = 0
    while True:
        try:
            item = next(it, None)
        except (OSError, EOFError, zlib.error) as e:
            raise LogFormatError(str(path), line + 1, None, f"unreadable data ({type(e).__name__}: {e})") from None
        if item is None:
            return
        line += 1
        yield item


def _iter_jsonl(
    path: Path, b: _ChunkBuilder, chunk_size: int, fast: bool, start: int = 0, end: int | None = None
) -> Iterator[LogBatch]:
    """Chunks of the records on lines ``start + 1 .. end`` (1-based, all lines by default) of a JSONL log."""
    stats = b.stats
    with _open_text(path) as f:
        lineno = 0
        for raw, nbytes in _checked_lines(path, f):
            lineno += 1
            if lineno <= start:
                continue
            if end is not None and lineno > end:
                break
            b.nbytes += nbytes
            if raw is None:
                stats.lines += 1
                b.bad(lineno, None, f"line is {nbytes} bytes long; at most {MAX_LINE_BYTES} are read")
                continue
            raw = raw.strip()
            if not raw:
                continue
            stats.lines += 1
            try:
                obj, seg, count = _decode_line(raw, fast)
            except (ValueError, RecursionError) as e:
                msg = str(e)
                if isinstance(e, UnicodeDecodeError):
                    msg = f"not valid UTF-8 ({e.reason})"
                b.bad(lineno, None, f"not valid JSON ({msg})")
                continue
            b.add(lineno, obj, seg, count)
            if len(b.trajs) >= chunk_size:
                out = b.build()
                if out is not None:
                    yield out
    out = b.build()
    if out is not None:
        yield out


def _drop_none(v: Any) -> Any:
    if type(v) is dict:
        return {k: _drop_none(x) for k, x in v.items() if x is not None}
    if type(v) is list:
        return [_drop_none(x) for x in v]
    return v


def _iter_parquet(path: Path, b: _ChunkBuilder, chunk_size: int) -> Iterator[LogBatch]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError(f"{path}: reading Parquet logs needs pyarrow: {_PARQUET_HINT}") from None
    try:
        pf = pq.ParquetFile(str(path))
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for unreadable files
        raise LogFormatError(str(path), 0, None, f"not a readable Parquet file ({e})") from None
    total = max(pf.metadata.num_rows, 1)
    size = path.stat().st_size
    row = 0
    batches = pf.iter_batches(batch_size=chunk_size)
    while True:
        try:
            rb = next(batches, None)
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types for damaged data
            raise LogFormatError(str(path), row + 1, None, f"unreadable Parquet data ({type(e).__name__}: {e})") from None
        if rb is None:
            break
        rows = rb.to_pylist()
        for obj in rows:
            row += 1
            b.stats.lines += 1
            b.add(row, _drop_none(obj), None, 0)
        b.nbytes += int(size * len(rows) / total)
        out = b.build()
        if out is not None:
            yield out


def iter_log_batches(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    chunk_size: int = 4096,
    skip_bad: bool = False,
    embed: EmbedFn | None = None,
    dim: int | None = None,
    stats: ReadStats | None = None,
    on_error: Callable[[LogFormatError], None] | None = None,
    fast: bool = True,
) -> Iterator[LogBatch]:
    """Stream the trajectories of one or more logs, chunk by chunk.

    Args:
        paths: JSONL (``.jsonl``, ``.json``, ``.ndjson``, optionally ``.gz``) or Parquet files.
        chunk_size: trajectories per batch (memory grows with it, never with the file).
        skip_bad: report bad lines through ``on_error`` and count them in ``stats`` instead of raising.
        embed: ``embed(texts) -> [n, D]`` for records without ``query_embedding`` (called once per chunk,
            with distinct texts); without it such records are bad lines.
        dim: the embedding dimension every record must have (default: the first one seen).
        stats: filled with counts as the read goes.
        on_error: called with each skipped :class:`LogFormatError`.
        fast: cut the embedding list out of each line and parse all of a chunk's lists with one numpy call
            (falls back to ``json.loads`` for lines it does not recognise; same result).

    Raises:
        LogFormatError: the first bad line (unless ``skip_bad``), or an unreadable file.
        MissingExtraError: a Parquet file without pyarrow installed.
        FileNotFoundError: a missing file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    stats = stats if stats is not None else ReadStats()
    holder: list[int | None] = [dim]
    seen_ids: dict[int, str] = {}
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such log file")
        stats.files += 1
        b = _ChunkBuilder(str(path), holder, skip_bad, stats, on_error, embed)
        b.seen_ids = seen_ids
        if log_kind(path) == "parquet":
            yield from _iter_parquet(path, b, chunk_size)
        else:
            yield from _iter_jsonl(path, b, chunk_size, fast)


def read_log(
    paths: Sequence[str | os.PathLike] | str | os.PathLike, embed: EmbedFn | None = None, **kwargs: Any
) -> list[Trajectory]:
    """All trajectories of the logs in one list (for small logs; use :func:`iter_log_batches` to stream)."""
    out: list[Trajectory] = []
    for batch in iter_log_batches(paths, embed=embed, **kwargs):
        out.extend(batch.trajectories)
    return out


# ---------------------------------------------------------------------------------------------------------
# Writing.


def task_to_record(
    spec: TaskSpec,
    record_id: int,
    started_at: datetime,
    embedding: Sequence[float] | None = None,
    rng: random.Random | None = None,
) -> dict[str, Any]:
    """The log record of one synthetic agent run (:func:`rbank_torch.synthetic.generate_tasks`).

    Args:
        spec: the generated run.
        record_id: its ``id``.
        started_at: its start time; step latencies (drawn from ``rng``) add up to its duration.
        embedding: its query embedding, or None to leave only the query text.
        rng: source of the step latencies (default: a fixed seed per id).
    """
    r = rng if rng is not None else random.Random(record_id)
    steps = []
    total = 0
    tools = spec.tools
    for j, (action, rationale, outcome, conf) in enumerate(spec.steps):
        lat = r.randint(40, 4000)
        total += lat
        o = outcome.to_dict()
        st: dict[str, Any] = {
            "action": action,
            "rationale": rationale,
            "outcome": o["kind"] if len(o) == 1 else o,
            "confidence": conf,
            "latency_ms": lat,
        }
        if tools:
            st["tool"] = tools[j % len(tools)]
        steps.append(st)
    v = spec.verdict.to_dict()
    rec: dict[str, Any] = {"id": int(record_id), "query": spec.query}
    if embedding is not None:
        rec["query_embedding"] = [float(x) for x in embedding]
    rec["steps"] = steps
    rec["verdict"] = v["kind"] if len(v) == 1 else v
    rec["metadata"] = {
        "session_id": spec.session_id,
        "request_type": spec.request_type,
        "total_input_tokens": spec.input_tokens,
        "total_output_tokens": spec.output_tokens,
        "tools_invoked": list(tools),
        "tags": list(spec.tags),
    }
    if spec.lessons:
        rec["lessons"] = list(spec.lessons)
    rec["started_at"] = _iso(started_at)
    rec["total_latency_ms"] = total
    return rec


def _iso(dt: datetime) -> str:
    s = dt.astimezone(_UTC).isoformat()
    return s[:-6] + "Z" if s.endswith("+00:00") else s


def trajectory_to_record(
    t: Trajectory, query: str | None = None, embedding: bool = True, decimals: int | None = None
) -> dict[str, Any]:
    """The log record of a trajectory (the inverse of :func:`parse_record`).

    Args:
        t: the trajectory.
        query: its query text (default: ``metadata.attributes["query"]`` when present).
        embedding: include ``query_embedding`` (leave it out to let the reader embed the text).
        decimals: round embedding values to this many decimals (smaller files).
    """
    attrs = dict(t.metadata.attributes)
    if query is None:
        query = attrs.get("query")
    if attrs.get("query") == query:
        attrs.pop("query", None)
    rec: dict[str, Any] = {"id": int(t.id), "uuid": t.uuid}
    if query is not None:
        rec["query"] = query
    if embedding or query is None:
        e = t.query_embedding.detach().to("cpu", torch.float64)
        if decimals is not None:
            e = torch.round(e, decimals=decimals)
        rec["query_embedding"] = e.tolist()
    if t.response_embedding is not None:
        rec["response_embedding"] = t.response_embedding.detach().to("cpu", torch.float64).tolist()
    steps = []
    for s in t.steps:
        d: dict[str, Any] = {"action": s.action, "rationale": s.rationale}
        o = s.outcome.to_dict()
        d["outcome"] = o["kind"] if len(o) == 1 else o
        d["confidence"] = s.confidence
        d["latency_ms"] = s.latency_ms
        if s.timestamp != t.started_at:
            d["timestamp"] = _iso(s.timestamp)
        m = s.metadata
        if m is not None:
            if m.tool_used is not None:
                d["tool"] = m.tool_used
            if m.model is not None:
                d["model"] = m.model
            if m.input_tokens:
                d["input_tokens"] = m.input_tokens
            if m.output_tokens:
                d["output_tokens"] = m.output_tokens
            if m.tags:
                d["tags"] = list(m.tags)
            if m.attributes:
                d["attributes"] = dict(m.attributes)
        if s.context_embedding is not None:
            d["context_embedding"] = s.context_embedding.detach().to("cpu", torch.float64).tolist()
        steps.append(d)
    rec["steps"] = steps
    v = t.verdict.to_dict()
    rec["verdict"] = v["kind"] if len(v) == 1 else v
    rec["quality"] = t.quality
    md = t.metadata
    meta: dict[str, Any] = {}
    for k in ("session_id", "user_id", "request_type"):
        if getattr(md, k) is not None:
            meta[k] = getattr(md, k)
    for k in ("total_input_tokens", "total_output_tokens"):
        if getattr(md, k):
            meta[k] = getattr(md, k)
    for k in ("models_used", "tools_invoked", "tags"):
        if getattr(md, k):
            meta[k] = list(getattr(md, k))
    if attrs:
        meta["attributes"] = attrs
    if meta:
        rec["metadata"] = meta
    if t.lessons:
        rec["lessons"] = list(t.lessons)
    rec["started_at"] = _iso(t.started_at)
    if t.completed_at is not None:
        rec["completed_at"] = _iso(t.completed_at)
    rec["total_latency_ms"] = t.total_latency_ms
    return rec


def _records(items: Iterable[Trajectory | dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for x in items:
        yield trajectory_to_record(x) if isinstance(x, Trajectory) else x


def write_jsonl(items: Iterable[Trajectory | dict[str, Any]], path: str | os.PathLike) -> int:
    """Write trajectories (or ready records) as a JSONL log; returns the number of lines written."""
    n = 0
    p = Path(path)
    f: IO[str]
    with gzip.open(p, "wt", encoding="utf-8") if str(p).endswith(".gz") else open(p, "w", encoding="utf-8") as f:
        for rec in _records(items):
            f.write(json.dumps(rec, ensure_ascii=False, allow_nan=False, separators=(",", ":")))
            f.write("\n")
            n += 1
    return n


def _parquet_schema():
    import pyarrow as pa

    strs = pa.list_(pa.string())
    attrs = pa.map_(pa.string(), pa.string())
    cause = pa.struct([(k, pa.string()) for k in ("type", "details", "tool", "error", "error_type", "description",
                                                   "resource", "limit", "service", "limitation")]
                      + [("missing", strs)])
    outcome = pa.struct([(k, pa.string()) for k in ("kind", "achieved", "missing", "error", "reason")]
                        + [("suggestions", strs)])
    step = pa.struct([
        ("action", pa.string()), ("rationale", pa.string()), ("outcome", outcome), ("confidence", pa.float64()),
        ("latency_ms", pa.int64()), ("timestamp", pa.string()), ("tool", pa.string()), ("model", pa.string()),
        ("input_tokens", pa.int64()), ("output_tokens", pa.int64()), ("tags", strs), ("attributes", attrs),
        ("context_embedding", pa.list_(pa.float32())),
    ])
    verdict = pa.struct([("kind", pa.string()), ("cause", cause), ("completion_ratio", pa.float64()),
                         ("original", cause), ("attempts", pa.int64()), ("final_quality", pa.float64())])
    metadata = pa.struct([
        ("session_id", pa.string()), ("user_id", pa.string()), ("request_type", pa.string()),
        ("total_input_tokens", pa.int64()), ("total_output_tokens", pa.int64()), ("models_used", strs),
        ("tools_invoked", strs), ("tags", strs), ("attributes", attrs),
    ])
    return pa.schema([
        ("id", pa.int64()), ("uuid", pa.string()), ("query", pa.string()),
        ("query_embedding", pa.list_(pa.float32())), ("response_embedding", pa.list_(pa.float32())),
        ("steps", pa.list_(step)), ("verdict", verdict), ("quality", pa.float64()), ("metadata", metadata),
        ("lessons", strs), ("started_at", pa.string()), ("completed_at", pa.string()),
        ("total_latency_ms", pa.int64()),
    ])


def _arrow_ready(rec: dict[str, Any]) -> dict[str, Any]:
    """A record with the shorthand forms expanded and maps as pairs, as the Parquet schema wants them."""
    r = dict(rec)
    v = r.get("verdict")
    if isinstance(v, str):
        r["verdict"] = {"kind": v}
    steps = []
    for s in r.get("steps") or []:
        s = dict(s)
        if isinstance(s.get("outcome"), str):
            s["outcome"] = {"kind": s["outcome"]}
        if s.get("attributes"):
            s["attributes"] = list(s["attributes"].items())
        steps.append(s)
    r["steps"] = steps
    md = r.get("metadata")
    if md is not None and md.get("attributes"):
        md = dict(md)
        md["attributes"] = list(md["attributes"].items())
        r["metadata"] = md
    return r


def write_parquet(
    items: Iterable[Trajectory | dict[str, Any]], path: str | os.PathLike, row_group_size: int = 8192
) -> int:
    """Write trajectories (or records) as a Parquet log with the schema of the format; returns rows written.

    Raises:
        MissingExtraError: pyarrow is not installed.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError(f"writing Parquet logs needs pyarrow: {_PARQUET_HINT}") from None
    schema = _parquet_schema()
    n = 0
    buf: list[dict[str, Any]] = []
    with pq.ParquetWriter(str(path), schema) as w:
        for rec in _records(items):
            buf.append(_arrow_ready(rec))
            if len(buf) >= row_group_size:
                w.write_table(pa.Table.from_pylist(buf, schema=schema))
                n += len(buf)
                buf = []
        if buf or n == 0:
            w.write_table(pa.Table.from_pylist(buf, schema=schema))
            n += len(buf)
    return n
