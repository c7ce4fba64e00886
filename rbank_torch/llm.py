"""LLM in the loop (SPEC §8): pluggable judges and memory extractors.

A :class:`Judge` turns a trajectory into a :class:`~rbank_torch.verdicts.Verdict`; a
:class:`MemoryExtractor` turns a trajectory (and its verdict) into :class:`MemoryItem` s — a title, a
one-sentence description and the content, from successful *and* failed runs. The rule-based pair
(:class:`RuleJudge`, :class:`RuleExtractor`) needs no model and is the fallback of the LLM pair
(:class:`LLMJudge`, :class:`LLMExtractor`), which work over any ``complete(prompt: str) -> str``:

* prompts written for this library, versioned (:data:`JUDGE_PROMPT_VERSION`,
  :data:`EXTRACT_PROMPT_VERSION`), asking for one strict JSON object;
* robust parsing: a fenced, truncated, malformed or partly valid answer, or a ``complete`` that raises,
  gives a per-trajectory error (:attr:`LLMStats.errors`) and the fallback's result for that trajectory —
  never a lost trajectory, never half of a model's items;
* cost control: bounded concurrency over a thread pool (``judge_many`` / ``extract_many`` /
  ``iter_extract``), retries with exponential backoff, an optional per-call timeout, and a
  content-hash cache on disk (:class:`ResponseCache`, JSON lines) so that a re-run over the same
  trajectories makes no new calls; :meth:`LLMJudge.stats` counts calls, cache hits, failures and the
  tokens an endpoint reports.

Adapters: :class:`OpenAICompatible` (any chat-completions endpoint: OpenAI, vLLM, llama.cpp's server,
Ollama; the ``openai`` client of the ``[llm]`` extra) and :class:`TransformersPipeline` (a local
``transformers`` text-generation pipeline).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from .verdicts import RootCause, Verdict, VerdictAnalyzer

if TYPE_CHECKING:  # pragma: no cover
    from .trajectory import Trajectory

__all__ = [
    "MemoryItem",
    "Judge",
    "MemoryExtractor",
    "Judgement",
    "RuleJudge",
    "RuleExtractor",
    "LLMJudge",
    "LLMExtractor",
    "LLMStats",
    "LLMError",
    "LLMOutputError",
    "ResponseCache",
    "Usage",
    "OpenAICompatible",
    "TransformersPipeline",
    "JUDGE_PROMPT_VERSION",
    "EXTRACT_PROMPT_VERSION",
    "judge_prompt",
    "extract_prompt",
    "parse_judgement",
    "parse_memory_items",
    "render_trajectory",
    "is_transient",
]

#: versions of the two prompts; part of every cache key, so a new prompt never reuses old answers
JUDGE_PROMPT_VERSION = "rbank-judge/1"
EXTRACT_PROMPT_VERSION = "rbank-extract/1"
#: limits of the trajectory text inside a prompt (the prompt size stays bounded whatever the run)
MAX_PROMPT_STEPS = 24
MAX_FIELD_CHARS = 300
#: limits of one memory item's fields (longer answers are rejected, not cut)
MAX_TITLE_CHARS = 120
MAX_DESCRIPTION_CHARS = 400
MAX_CONTENT_CHARS = 2000
#: most errors :class:`LLMStats` keeps (the oldest are dropped; the count stays exact)
MAX_KEPT_ERRORS = 100

Complete = Callable[[str], str]
_T = TypeVar("_T")
_R = TypeVar("_R")


# ---------------------------------------------------------------------------------------------------------
# Types and protocols.


@dataclass(frozen=True)
class MemoryItem:
    """One memory, as in ReasoningBank: a short title, a one-sentence description, the content.

    Attributes:
        title: a few words naming the strategy or the pitfall.
        description: one sentence saying when it applies.
        content: the actionable lesson itself (what to do, or what to avoid and why).
    """

    title: str
    description: str
    content: str

    def __post_init__(self) -> None:
        for name in ("title", "description", "content"):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise ValueError(f"MemoryItem.{name} must be a string, got {type(v).__name__}")

    @property
    def text(self) -> str:
        """``title + "\\n" + content``: the text a bank stores and embeds for this item."""
        return self.title + "\n" + self.content

    def to_dict(self) -> dict[str, str]:
        return {"title": self.title, "description": self.description, "content": self.content}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryItem:
        """Inverse of :meth:`to_dict`; ``ValueError`` naming a missing or non-string field."""
        if not isinstance(d, dict):
            raise ValueError(f"a memory item must be an object, got {type(d).__name__}")
        for name in ("title", "description", "content"):
            if not isinstance(d.get(name), str):
                raise ValueError(f"memory item field {name!r} must be a string, got {d.get(name)!r}")
        return cls(d["title"], d["description"], d["content"])


@runtime_checkable
class Judge(Protocol):
    """Decides a trajectory's verdict."""

    def judge(self, trajectory: Trajectory) -> Verdict: ...


@runtime_checkable
class MemoryExtractor(Protocol):
    """Turns a trajectory (and its verdict; the trajectory's own when None) into memory items."""

    def extract(self, trajectory: Trajectory, verdict: Verdict | None = None) -> list[MemoryItem]: ...


@dataclass(frozen=True)
class Judgement:
    """A verdict with its rationale. ``from_model`` is False when the fallback decided (``error`` says why)."""

    verdict: Verdict
    rationale: str
    from_model: bool
    error: str | None = None


@dataclass(frozen=True)
class Usage:
    """Tokens one call used, as the endpoint reported them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class LLMError:
    """Why the model's answer for one trajectory was not used (its fallback result was)."""

    trajectory_id: int
    message: str


class LLMOutputError(ValueError):
    """A model's answer is not the JSON the prompt asked for (the message names the field)."""


@dataclass
class LLMStats:
    """Counters of an :class:`LLMJudge` or :class:`LLMExtractor`.

    Attributes:
        calls: invocations of ``complete`` (retries included).
        failures: trajectories whose model answer could not be used (they got the fallback's result).
        cache_hits: answers taken from the cache instead of a call.
        retries: calls repeated after ``complete`` raised or timed out.
        prompt_tokens, completion_tokens: tokens reported by the endpoint (0 when it reports none).
        prompt_chars: characters of all prompts sent (cache hits excluded).
        errors: the latest :data:`MAX_KEPT_ERRORS` failures, oldest first.
    """

    calls: int = 0
    failures: int = 0
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_chars: int = 0
    errors: list[LLMError] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if k != "errors"}
        d["errors"] = [{"trajectory_id": e.trajectory_id, "message": e.message} for e in self.errors]
        return d


# ---------------------------------------------------------------------------------------------------------
# Rule-based implementations.


def _with_verdict(t: Trajectory, verdict: Verdict | None) -> Trajectory:
    if verdict is None or verdict == t.verdict:
        return t
    if not isinstance(verdict, Verdict):
        raise ValueError(f"verdict must be a Verdict or None, got {type(verdict).__name__}")
    t2 = copy.copy(t)
    t2.verdict = verdict
    return t2


class RuleJudge:
    """The verdict the trajectory already carries (its recorder's or its log's)."""

    def judge(self, trajectory: Trajectory) -> Verdict:
        return trajectory.verdict

    def assess(self, trajectory: Trajectory) -> Judgement:
        v = trajectory.verdict
        return Judgement(v, f"recorded verdict: {v.description()}", from_model=False)


def _lesson_title(lesson: str) -> str:
    """A short title for an analyser lesson: "Avoid: <action>" for a failed step (its error stays in the
    content), "Recovery by reflection", the kind before a colon ("Successful pattern"), else the first words."""
    if lesson.startswith("Avoid: "):
        head = lesson.split(" - ", 1)[0]
        return head if len(head) <= MAX_TITLE_CHARS else head[: MAX_TITLE_CHARS - 1] + "…"
    if lesson.startswith("Recovery possible"):
        return "Recovery by reflection"
    head, sep, _ = lesson.partition(":")
    if sep and 0 < len(head) <= 40:
        return head.strip()
    words = lesson.split()
    return " ".join(words[:8]) + (" …" if len(words) > 8 else "")


class RuleExtractor:
    """Memory items made from the verdict analyser's lessons (one item per distinct lesson).

    The title is the lesson's kind ("Successful pattern", "Avoid", …) or its first words; the description
    says which verdict and request type it came from; the content is the lesson text.
    """

    def __init__(self, analyzer: VerdictAnalyzer | None = None) -> None:
        self.analyzer = analyzer if analyzer is not None else VerdictAnalyzer()

    def extract(self, trajectory: Trajectory, verdict: Verdict | None = None) -> list[MemoryItem]:
        t = _with_verdict(trajectory, verdict)
        analysis = self.analyzer.analyze(t)
        rt = t.metadata.request_type
        context = f"From a {rt} run" if rt else "From a run"
        desc = f"{context} judged {t.verdict.description()}."
        out: list[MemoryItem] = []
        seen: set[str] = set()
        for lesson in analysis.lessons:
            if not lesson or lesson in seen:
                continue
            seen.add(lesson)
            out.append(MemoryItem(_lesson_title(lesson), desc, lesson))
        return out


# ---------------------------------------------------------------------------------------------------------
# Prompts.


def _clip(s: Any, n: int = MAX_FIELD_CHARS) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def query_text(t: Trajectory) -> str | None:
    """The query text of a trajectory when it has one (a ``query``/``text`` field or attribute)."""
    for name in ("query", "text", "query_text"):
        v = getattr(t, name, None)
        if isinstance(v, str) and v:
            return v
    v = t.metadata.attributes.get("query") if t.metadata.attributes else None
    return v if isinstance(v, str) and v else None


def render_trajectory(t: Trajectory, *, with_verdict: Verdict | None = None) -> str:
    """The plain-text form of a trajectory inside a prompt: task, request type, tools, steps (at most
    :data:`MAX_PROMPT_STEPS`, fields cut at :data:`MAX_FIELD_CHARS`), the agent's own lessons and, when
    given, the verdict."""
    lines = []
    q = query_text(t)
    lines.append(f"Task: {_clip(q) if q else '(no task text recorded)'}")
    md = t.metadata
    if md.request_type:
        lines.append(f"Request type: {_clip(md.request_type, 80)}")
    if md.tools_invoked:
        lines.append("Tools available: " + _clip(", ".join(md.tools_invoked), 200))
    steps = t.steps
    lines.append(f"Steps ({len(steps)}):")
    shown = steps if len(steps) <= MAX_PROMPT_STEPS else steps[: MAX_PROMPT_STEPS - 4] + steps[-4:]
    for i, s in enumerate(shown):
        if len(steps) > MAX_PROMPT_STEPS and i == MAX_PROMPT_STEPS - 4:
            lines.append(f"  … {len(steps) - MAX_PROMPT_STEPS} steps left out …")
        o = s.outcome
        detail = o.error or o.reason or o.missing
        tool = s.metadata.tool_used if s.metadata is not None else None
        line = f"  {s.index + 1}. {_clip(s.action)}"
        if tool:
            line += f" [tool: {_clip(tool, 60)}]"
        line += f" -> {o.kind.value}"
        if detail:
            line += f": {_clip(detail)}"
        line += f" (confidence {s.confidence:.2f})"
        lines.append(line)
        if s.rationale and s.rationale != s.action:
            lines.append(f"     why: {_clip(s.rationale)}")
    if t.lessons:
        lines.append("Agent's own notes: " + _clip("; ".join(t.lessons), 2 * MAX_FIELD_CHARS))
    if with_verdict is not None:
        lines.append(f"Verdict: {with_verdict.description()}")
    return "\n".join(lines)


_CAUSE_HELP = (
    'InsufficientContext {"missing": [..]}, InvalidInput {"details"}, ToolFailure {"tool", "error"}, '
    'ReasoningError {"error_type": one of logical_inconsistency, factual_error, hallucination, '
    'circular_reasoning, non_sequitur, over_generalization, under_specification, other; "description"}, '
    'ResourceConstraint {"resource", "limit"}, ExternalFailure {"service", "error"}, '
    'CapabilityLimit {"limitation"}, Unknown {"details"}'
)

_JUDGE_TEMPLATE = """\
You review one run of an AI agent and decide whether it achieved the task. Judge by the evidence in the \
steps and their outcomes, not by the agent's confidence.

{trajectory}

Answer with exactly one JSON object and nothing else (no prose, no code fence):
{{"verdict": "success" | "failure" | "partial" | "recovered",
 "rationale": "<one or two sentences citing the steps that decided it>",
 "completion_ratio": <0..1, only for partial>,
 "cause": {{"type": "<cause type>", ...}} <only for failure: why it failed>,
 "original": {{"type": "<cause type>", ...}} <only for recovered: what went wrong first>,
 "attempts": <integer, only for recovered: attempts until it worked>,
 "final_quality": <0..1, only for recovered>}}
Cause types and their fields: {causes}.
"recovered" means a step failed but the agent reflected, retried and then reached the goal.
[{version}]"""

_EXTRACT_TEMPLATE = """\
You distil reusable memories from one run of an AI agent, so that future runs on similar tasks do \
better. The run's verdict is given. From a successful run, extract the strategies that made it work; \
from a failed or partial run, extract what went wrong and how to prevent it; from a recovered run, \
both. Each memory must be general enough to help on other tasks (no ids, no one-off values) and \
specific enough to act on. Extract at most {max_items} memories; fewer is fine.

{trajectory}

Answer with exactly one JSON object and nothing else (no prose, no code fence):
{{"memories": [{{"title": "<at most 10 words>",
  "description": "<one sentence: when this applies>",
  "content": "<1-3 sentences: what to do, or what to avoid and why>"}}]}}
[{version}]"""


def judge_prompt(t: Trajectory) -> str:
    """The judge prompt (:data:`JUDGE_PROMPT_VERSION`) for one trajectory."""
    return _JUDGE_TEMPLATE.format(trajectory=render_trajectory(t), causes=_CAUSE_HELP, version=JUDGE_PROMPT_VERSION)


def extract_prompt(t: Trajectory, verdict: Verdict | None = None, max_items: int = 3) -> str:
    """The extraction prompt (:data:`EXTRACT_PROMPT_VERSION`) for one trajectory and its verdict."""
    v = verdict if verdict is not None else t.verdict
    return _EXTRACT_TEMPLATE.format(
        trajectory=render_trajectory(t, with_verdict=v), max_items=int(max_items), version=EXTRACT_PROMPT_VERSION
    )


# ---------------------------------------------------------------------------------------------------------
# Parsing.

_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)(?:```|$)", re.S)


def _json_object(text: Any) -> Any:
    """The first JSON value of a model answer: a code fence and prose around the JSON are tolerated;
    anything else raises :class:`LLMOutputError` saying what was wrong."""
    if not isinstance(text, str):
        raise LLMOutputError(f"the model must return text, got {type(text).__name__}")
    s = text.strip()
    if not s:
        raise LLMOutputError("empty answer")
    m = _FENCE.search(s)
    if m is not None and m.group(1).strip():
        s = m.group(1).strip()
    starts = [i for i in (s.find("{"), s.find("[")) if i >= 0]
    if not starts:
        raise LLMOutputError(f"no JSON object in the answer: {_clip(s, 80)!r}")
    start = min(starts)
    try:
        value, _ = json.JSONDecoder().raw_decode(s, start)
    except json.JSONDecodeError as e:
        cut = e.msg.startswith("Unterminated") or e.pos >= len(s.rstrip()) - 1
        what = "truncated JSON" if cut else "malformed JSON"
        msg = e.msg if e.msg.endswith(" at") else e.msg + " at"
        raise LLMOutputError(f"{what}: {msg} character {e.pos} of {len(s)}") from None
    return value


def _str_field(d: dict[str, Any], name: str, where: str, limit: int | None = None) -> str:
    v = d.get(name)
    if not isinstance(v, str) or not v.strip():
        raise LLMOutputError(f"{where}{name} must be a non-empty string, got {_clip(repr(v), 60)}")
    v = v.strip()
    if limit is not None and len(v) > limit:
        raise LLMOutputError(f"{where}{name} must be at most {limit} characters, got {len(v)}")
    return v


def _unit_field(d: dict[str, Any], name: str) -> float:
    v = d.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 1.0):
        raise LLMOutputError(f"{name} must be a number in [0, 1], got {_clip(repr(v), 60)}")
    return float(v)


def _cause_field(d: dict[str, Any], name: str) -> RootCause:
    c = d.get(name)
    if not isinstance(c, dict):
        raise LLMOutputError(f"{name} must be a root-cause object with a 'type', got {_clip(repr(c), 60)}")
    if c.get("type") not in RootCause.CAUSE_TYPES:
        raise LLMOutputError(f"{name}.type must be one of {', '.join(RootCause.CAUSE_TYPES)}, got {c.get('type')!r}")
    for k, v in c.items():
        if k == "missing":
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise LLMOutputError(f"{name}.missing must be a list of strings")
        elif not isinstance(v, str):
            raise LLMOutputError(f"{name}.{k} must be a string, got {_clip(repr(v), 60)}")
    try:
        return RootCause.from_dict(c)
    except ValueError as e:
        raise LLMOutputError(f"{name}: {e}") from None


def parse_judgement(text: str) -> tuple[Verdict, str]:
    """``(verdict, rationale)`` from a judge answer; :class:`LLMOutputError` naming the first bad field."""
    d = _json_object(text)
    if not isinstance(d, dict):
        raise LLMOutputError(f"the answer must be a JSON object, got a {type(d).__name__}")
    kind = d.get("verdict")
    if kind not in ("success", "failure", "partial", "recovered"):
        raise LLMOutputError(f"verdict must be one of success, failure, partial, recovered; got {_clip(repr(kind), 60)}")
    rationale = _str_field(d, "rationale", "")
    if kind == "success":
        return Verdict.success(), rationale
    if kind == "failure":
        return Verdict.failure(_cause_field(d, "cause")), rationale
    if kind == "partial":
        return Verdict.partial(_unit_field(d, "completion_ratio")), rationale
    attempts = d.get("attempts")
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        raise LLMOutputError(f"attempts must be an integer >= 0, got {_clip(repr(attempts), 60)}")
    return Verdict.recovered(_cause_field(d, "original"), attempts, _unit_field(d, "final_quality")), rationale


def parse_memory_items(text: str, max_items: int = 3) -> list[MemoryItem]:
    """The memory items of an extraction answer (``{"memories": [...]}`` or a bare list), at most
    ``max_items``; :class:`LLMOutputError` naming the first bad item and field — one bad item rejects the
    whole answer, so no half of an answer is ever stored."""
    d = _json_object(text)
    if isinstance(d, dict):
        if "memories" not in d:
            raise LLMOutputError("the answer must have a 'memories' list")
        items = d["memories"]
    else:
        items = d
    if not isinstance(items, list):
        raise LLMOutputError(f"memories must be a list, got {type(items).__name__}")
    out: list[MemoryItem] = []
    for i, it in enumerate(items[: max(0, int(max_items))]):
        where = f"memories[{i}]."
        if not isinstance(it, dict):
            raise LLMOutputError(f"memories[{i}] must be an object, got {type(it).__name__}")
        out.append(
            MemoryItem(
                _str_field(it, "title", where, MAX_TITLE_CHARS),
                _str_field(it, "description", where, MAX_DESCRIPTION_CHARS),
                _str_field(it, "content", where, MAX_CONTENT_CHARS),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# Cache.


class ResponseCache:
    """Usable model answers by content hash, in memory or (with a ``path``) in a JSON-lines file.

    Each line is ``{"key": sha256 hex, "output": text, "prompt_tokens": n, "completion_tokens": n}``. With a
    file, only the keys and their line offsets stay in memory (about 100 bytes an answer) and an answer is
    read back when asked for. A line that cannot be read (a crash cut the last one) is skipped and counted in
    :attr:`bad_lines`. In memory, at most ``max_entries`` answers are kept (the oldest go first), so a
    long-lived bank with an LLM extractor does not grow without bound. Thread-safe; only plain JSON is read,
    nothing is ever executed.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, max_entries: int = 10_000) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an integer >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self.path = Path(path) if path is not None else None
        self._mem: dict[str, tuple[str, Usage | None]] = {}
        self._offsets: dict[str, tuple[int, int]] = {}  # key -> (offset, length) of its line in the file
        self._lock = threading.Lock()
        self.bad_lines = 0
        if self.path is not None and self.path.exists():
            with open(self.path, "rb") as f:
                pos = 0
                for line in f:
                    n = len(line)
                    rec = self._decode(line)
                    if rec is None:
                        self.bad_lines += int(bool(line.strip()))
                    else:
                        self._offsets.setdefault(rec[0], (pos, n))
                    pos += n

    @staticmethod
    def _decode(line: bytes) -> tuple[str, str, Usage | None] | None:
        try:
            rec = json.loads(line)
            key, out = rec["key"], rec["output"]
            if not isinstance(key, str) or not isinstance(out, str):
                return None
            pt, ct = int(rec.get("prompt_tokens", 0)), int(rec.get("completion_tokens", 0))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        return key, out, (Usage(pt, ct) if (pt or ct) else None)

    @staticmethod
    def key(*parts: str) -> str:
        """sha256 of the parts (prompt version, model id, prompt)."""
        h = hashlib.sha256()
        for p in parts:
            b = p.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        return h.hexdigest()

    def get(self, key: str) -> tuple[str, Usage | None] | None:
        """``(answer, usage)`` stored under ``key``, or None."""
        with self._lock:
            if self.path is None:
                return self._mem.get(key)
            at = self._offsets.get(key)
            if at is None:
                return None
            with open(self.path, "rb") as f:
                f.seek(at[0])
                rec = self._decode(f.read(at[1]))
        return None if rec is None or rec[0] != key else (rec[1], rec[2])

    def put(self, key: str, output: str, usage: Usage | None = None) -> None:
        """Keep ``output`` under ``key`` (a key already present is left as it is)."""
        rec: dict[str, Any] = {"key": key, "output": output}
        if usage is not None:
            rec["prompt_tokens"] = usage.prompt_tokens
            rec["completion_tokens"] = usage.completion_tokens
        with self._lock:
            if self.path is None:
                if key not in self._mem:
                    self._mem[key] = (output, usage)
                    if len(self._mem) > self.max_entries:
                        del self._mem[next(iter(self._mem))]
                return
            if key in self._offsets:
                return
            line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                f.seek(0, os.SEEK_END)
                pos = f.tell()
                if pos > 0:  # a line cut by a crash is closed first, so this one starts on its own line
                    with open(self.path, "rb") as r:
                        r.seek(pos - 1)
                        if r.read(1) != b"\n":
                            f.write(b"\n")
                            pos += 1
                f.write(line)
            self._offsets[key] = (pos, len(line))

    def __len__(self) -> int:
        with self._lock:
            return len(self._mem) if self.path is None else len(self._offsets)


# ---------------------------------------------------------------------------------------------------------
# The LLM-backed judge and extractor.


def _call_with_timeout(fn: Complete, prompt: str, timeout: float | None) -> str:
    if timeout is None:
        return fn(prompt)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["out"] = fn(prompt)
        except BaseException as e:  # handed to the caller
            box["err"] = e

    th = threading.Thread(target=run, name="rbank-llm-call", daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        raise TimeoutError(f"the model did not answer within {timeout:g} s")
    if "err" in box:
        raise box["err"]
    return box["out"]


class _LLMBase:
    """Calls, cache, retries, stats and the thread pool shared by :class:`LLMJudge` and :class:`LLMExtractor`."""

    prompt_version = ""

    def __init__(
        self,
        complete: Complete,
        *,
        cache: ResponseCache | str | os.PathLike[str] | bool | None = True,
        model_id: str | None = None,
        max_workers: int = 4,
        retries: int = 2,
        backoff_s: float = 0.5,
        timeout_s: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not callable(complete):
            raise ValueError(f"complete must be a callable str -> str, got {type(complete).__name__}")
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be an integer >= 1, got {max_workers!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        if not isinstance(backoff_s, (int, float)) or backoff_s < 0:
            raise ValueError(f"backoff_s must be a number >= 0, got {backoff_s!r}")
        if timeout_s is not None and (not isinstance(timeout_s, (int, float)) or timeout_s <= 0):
            raise ValueError(f"timeout_s must be a number > 0 or None, got {timeout_s!r}")
        self.complete = complete
        if cache is True:
            self.cache: ResponseCache | None = ResponseCache()
        elif cache is None or cache is False:
            self.cache = None
        elif isinstance(cache, ResponseCache):
            self.cache = cache
        elif isinstance(cache, (str, os.PathLike)):
            self.cache = ResponseCache(cache)
        else:
            raise ValueError(f"cache must be True, False/None, a path or a ResponseCache, got {type(cache).__name__}")
        self.model_id = model_id if model_id is not None else str(getattr(complete, "model_id", ""))
        self.max_workers = max_workers
        self.retries = retries
        self.backoff_s = float(backoff_s)
        self.timeout_s = timeout_s
        self._sleep = sleep
        self._stats = LLMStats()
        self._errors: deque[LLMError] = deque(maxlen=MAX_KEPT_ERRORS)
        self._lock = threading.Lock()

    def stats(self) -> LLMStats:
        """A copy of the counters (calls, failures, cache_hits, retries, tokens, recent errors)."""
        with self._lock:
            s = copy.copy(self._stats)
            s.errors = list(self._errors)
            return s

    def _count(self, **inc: int) -> None:
        with self._lock:
            for k, v in inc.items():
                setattr(self._stats, k, getattr(self._stats, k) + v)

    def _fail(self, t: Trajectory, message: str) -> None:
        with self._lock:
            self._stats.failures += 1
            self._errors.append(LLMError(int(t.id), message))

    def _ask(self, prompt: str, parse: Callable[[str], _R]) -> _R:
        """``parse`` of the model's answer to ``prompt``: from the cache, else from ``complete`` (retried with
        backoff). Only an answer that parses is cached, so a re-run asks again where the model failed."""
        key = ResponseCache.key(self.prompt_version, self.model_id, prompt) if self.cache is not None else ""
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self._count(cache_hits=1)
                return parse(hit[0])
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            self._count(calls=1, prompt_chars=len(prompt))
            try:
                out = _call_with_timeout(self.complete, prompt, self.timeout_s)
            except Exception as e:
                if attempt == self.retries or not is_transient(e):
                    raise
                self._count(retries=1)
                if delay > 0:
                    self._sleep(delay)
                delay *= 2
                continue
            if not isinstance(out, str):
                raise LLMOutputError(f"complete must return a str, got {type(out).__name__}")
            usage = _last_usage(self.complete)
            if usage is not None:
                self._count(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
            result = parse(out)
            if self.cache is not None:
                self.cache.put(key, out, usage)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _map(self, fn: Callable[[_T], _R], items: Iterable[_T]) -> Iterator[_R]:
        """``fn`` over ``items`` on at most ``max_workers`` threads, results in input order, at most
        ``2 * max_workers`` items in flight (memory stays bounded on long inputs)."""
        if self.max_workers == 1:
            for it in items:
                yield fn(it)
            return
        window: deque[Future[_R]] = deque()
        with ThreadPoolExecutor(self.max_workers, thread_name_prefix="rbank-llm") as ex:
            for it in items:
                window.append(ex.submit(fn, it))
                if len(window) >= 2 * self.max_workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()


#: exception class names (of the openai client and httpx) that a retry may cure
_TRANSIENT_NAMES = frozenset({
    "APIConnectionError", "APITimeoutError", "RateLimitError", "InternalServerError", "ServiceUnavailableError",
    "ConnectError", "ReadTimeout", "WriteTimeout", "ConnectTimeout", "PoolTimeout", "RemoteProtocolError",
})


def is_transient(e: BaseException) -> bool:
    """Whether a failed call is worth repeating: a timeout, a connection error, HTTP 408/409/429 or 5xx — not
    a bad request, a refused key or a bug in ``complete`` (repeating those only costs)."""
    if isinstance(e, (TimeoutError, ConnectionError)):
        return True
    status = getattr(e, "status_code", None)
    if isinstance(status, int):
        return status in (408, 409, 429) or status >= 500
    return any(c.__name__ in _TRANSIENT_NAMES for c in type(e).__mro__)


def _last_usage(complete: Any) -> Usage | None:
    u = getattr(complete, "last_usage", None)
    return u if isinstance(u, Usage) else None


def _describe(e: BaseException) -> str:
    if isinstance(e, LLMOutputError):
        return str(e)
    return f"complete raised {type(e).__name__}: {e}"


class LLMJudge(_LLMBase):
    """A judge that asks a model (prompt :data:`JUDGE_PROMPT_VERSION`); the fallback decides when the
    answer cannot be used.

    Args:
        complete: any ``str -> str`` callable (an :class:`OpenAICompatible`, a
            :class:`TransformersPipeline`, a function of yours).
        fallback: the judge used for a trajectory whose answer fails (default :class:`RuleJudge`).
        cache: True (default): answers kept in memory for this object's life; a path: kept in that JSON-lines
            file (re-runs in new processes make no calls); a :class:`ResponseCache` (shared); None or False:
            no cache.
        model_id: part of the cache key (default: ``complete.model_id`` when it has one, else "").
        max_workers: concurrent calls in :meth:`judge_many`.
        retries: further tries when a call fails in a way a retry may cure (:func:`is_transient`: a timeout, a
            connection error, HTTP 408/409/429/5xx), after ``backoff_s``, then twice that, and so on.
        timeout_s: per-call limit (None: none; adapters have their own).

    Example::

        judge = LLMJudge(OpenAICompatible("http://127.0.0.1:8000/v1", "qwen2.5-7b-instruct"))
        verdicts = judge.judge_many(trajectories)
        print(judge.stats().calls, judge.stats().failures)
    """

    prompt_version = JUDGE_PROMPT_VERSION

    def __init__(self, complete: Complete, fallback: Judge | None = None, **kw: Any) -> None:
        super().__init__(complete, **kw)
        self.fallback: Judge = fallback if fallback is not None else RuleJudge()

    def assess(self, trajectory: Trajectory) -> Judgement:
        """The verdict and rationale of one trajectory (the fallback's verdict on any failure)."""
        try:
            verdict, rationale = self._ask(judge_prompt(trajectory), parse_judgement)
            return Judgement(verdict, rationale, from_model=True)
        except Exception as e:
            msg = _describe(e)
            self._fail(trajectory, msg)
            return Judgement(self.fallback.judge(trajectory), "", from_model=False, error=msg)

    def judge(self, trajectory: Trajectory) -> Verdict:
        return self.assess(trajectory).verdict

    def judge_many(self, trajectories: Iterable[Trajectory]) -> list[Verdict]:
        """Verdicts of many trajectories (concurrent calls, input order)."""
        return [j.verdict for j in self._map(self.assess, trajectories)]

    def iter_assess(self, trajectories: Iterable[Trajectory]) -> Iterator[Judgement]:
        """Judgements streamed in input order (for progress bars over long inputs)."""
        return self._map(self.assess, trajectories)


class LLMExtractor(_LLMBase):
    """An extractor that asks a model (prompt :data:`EXTRACT_PROMPT_VERSION`) for at most ``max_items``
    memory items per trajectory; the fallback's items replace an answer that cannot be used.

    Arguments as :class:`LLMJudge`, plus ``max_items`` (default 3).
    """

    prompt_version = EXTRACT_PROMPT_VERSION

    def __init__(
        self, complete: Complete, fallback: MemoryExtractor | None = None, *, max_items: int = 3, **kw: Any
    ) -> None:
        super().__init__(complete, **kw)
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items must be an integer >= 1, got {max_items!r}")
        self.fallback: MemoryExtractor = fallback if fallback is not None else RuleExtractor()
        self.max_items = max_items

    def extract(self, trajectory: Trajectory, verdict: Verdict | None = None) -> list[MemoryItem]:
        try:
            n = self.max_items
            return self._ask(extract_prompt(trajectory, verdict, n), lambda text: parse_memory_items(text, n))
        except Exception as e:
            self._fail(trajectory, _describe(e))
            return self.fallback.extract(trajectory, verdict)

    def _extract_pair(self, pair: tuple[Trajectory, Verdict | None]) -> list[MemoryItem]:
        return self.extract(pair[0], pair[1])

    def iter_extract(
        self, trajectories: Iterable[Trajectory], verdicts: Iterable[Verdict | None] | None = None
    ) -> Iterator[list[MemoryItem]]:
        """Items of many trajectories streamed in input order (concurrent calls)."""
        if verdicts is None:
            pairs: Iterable[tuple[Trajectory, Verdict | None]] = ((t, None) for t in trajectories)
        else:
            pairs = zip(trajectories, verdicts)
        return self._map(self._extract_pair, pairs)

    def extract_many(
        self, trajectories: Iterable[Trajectory], verdicts: Sequence[Verdict | None] | None = None
    ) -> list[list[MemoryItem]]:
        """Items of many trajectories (concurrent calls, input order)."""
        ts = list(trajectories)
        if verdicts is not None and len(verdicts) != len(ts):
            raise ValueError(f"verdicts must have one entry per trajectory ({len(ts)}), got {len(verdicts)}")
        return list(self.iter_extract(ts, verdicts))


# ---------------------------------------------------------------------------------------------------------
# Adapters.


class OpenAICompatible:
    """A ``complete`` callable over the chat-completions protocol (OpenAI, vLLM, llama.cpp's server,
    Ollama, …) with the official ``openai`` client (extra ``[llm]``).

    Args:
        base_url: the endpoint's base URL, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name the endpoint serves.
        api_key: the key (default: ``$OPENAI_API_KEY``, else a placeholder that local servers accept).
        timeout: seconds per request.
        temperature: sampling temperature (0: as repeatable as the endpoint allows).
        max_tokens: most tokens per answer (None: the endpoint's default).
        system: an optional system message.
        json_mode: ask for ``response_format={"type": "json_object"}`` (where the endpoint supports it).
        max_retries: the client's own retries (:class:`LLMJudge` / :class:`LLMExtractor` retry too).

    The tokens of the latest call in the calling thread are in :attr:`last_usage` (None when the
    endpoint reports none); the LLM judge and extractor add them to their stats.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        *,
        temperature: float = 0.0,
        max_tokens: int | None = 1024,
        system: str | None = None,
        json_mode: bool = False,
        max_retries: int = 0,
    ) -> None:
        if not isinstance(base_url, str) or not base_url:
            raise ValueError(f"base_url must be a non-empty string, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        try:
            import openai
        except ImportError:
            from .backends import MissingBackendError

            raise MissingBackendError(
                "OpenAICompatible needs the openai client: pip install 'rbank-torch[llm]'"
            ) from None
        self.base_url = base_url
        self.model = model
        self.timeout = float(timeout)
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.system = system
        self.json_mode = bool(json_mode)
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY") or "not-needed"
        self._client = openai.OpenAI(base_url=base_url, api_key=key, timeout=self.timeout, max_retries=max_retries)
        self._local = threading.local()

    @property
    def model_id(self) -> str:
        """The cache identity of this model (``openai-compatible:<model>``)."""
        return f"openai-compatible:{self.model}"

    @property
    def last_usage(self) -> Usage | None:
        return getattr(self._local, "usage", None)

    def __call__(self, prompt: str) -> str:
        messages: list[dict[str, str]] = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        messages.append({"role": "user", "content": prompt})
        kw: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens is not None:
            kw["max_tokens"] = int(self.max_tokens)
        if self.json_mode:
            kw["response_format"] = {"type": "json_object"}
        self._local.usage = None
        resp = self._client.chat.completions.create(**kw)
        u = getattr(resp, "usage", None)
        if u is not None:
            self._local.usage = Usage(int(u.prompt_tokens or 0), int(u.completion_tokens or 0))
        if not resp.choices:
            raise LLMOutputError("the endpoint returned no choices")
        content = resp.choices[0].message.content
        return content if isinstance(content, str) else ""

    def close(self) -> None:
        self._client.close()


class TransformersPipeline:
    """A ``complete`` callable over a local ``transformers`` text-generation pipeline.

    Args:
        pipeline: a ``transformers.pipeline("text-generation", …)`` object, or a model name or path to
            build one from (loaded with the usual transformers rules; offline machines need it on disk).
        max_new_tokens: most tokens per answer.
        chat: send the prompt as a chat message (default: when the tokenizer has a chat template).
        **generate_kwargs: passed to every call (greedy decoding unless you say otherwise).
    """

    def __init__(self, pipeline: Any, *, max_new_tokens: int = 512, chat: bool | None = None, **generate_kwargs: Any) -> None:
        if isinstance(pipeline, str):
            try:
                from transformers import pipeline as make_pipeline
            except ImportError:
                from .backends import MissingBackendError

                raise MissingBackendError(
                    "TransformersPipeline needs transformers: pip install 'rbank-torch[hf]'"
                ) from None
            pipeline = make_pipeline("text-generation", model=pipeline)
        if not callable(pipeline):
            raise ValueError(f"pipeline must be a text-generation pipeline or a model name, got {type(pipeline).__name__}")
        self.pipeline = pipeline
        self.max_new_tokens = int(max_new_tokens)
        if chat is None:
            tok = getattr(pipeline, "tokenizer", None)
            chat = bool(getattr(tok, "chat_template", None))
        self.chat = chat
        self.generate_kwargs = {"do_sample": False, **generate_kwargs}
        model = getattr(pipeline, "model", None)
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(pipeline).__name__
        self.model_id = f"transformers:{name}"

    def __call__(self, prompt: str) -> str:
        inp: Any = [{"role": "user", "content": prompt}] if self.chat else prompt
        out = self.pipeline(inp, max_new_tokens=self.max_new_tokens, return_full_text=False, **self.generate_kwargs)
        first = out[0] if isinstance(out, list) and out else out
        if isinstance(first, list) and first:  # batched form
            first = first[0]
        text = first.get("generated_text") if isinstance(first, dict) else first
        if isinstance(text, list):  # chat form: the messages, the answer last
            last = text[-1] if text else {}
            text = last.get("content", "") if isinstance(last, dict) else str(last)
        if not isinstance(text, str):
            raise LLMOutputError(f"the pipeline returned {type(text).__name__}, not text")
        return text
