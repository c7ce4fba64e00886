"""rbank_torch.llm: judges and memory extractors, rule-based and over a model (scripted fakes and a
loopback chat-completions server; nothing leaves the machine)."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import rbank_torch
from rbank_torch.llm import (
    EXTRACT_PROMPT_VERSION,
    JUDGE_PROMPT_VERSION,
    Judge,
    LLMExtractor,
    LLMJudge,
    LLMOutputError,
    MemoryExtractor,
    MemoryItem,
    ResponseCache,
    RuleExtractor,
    RuleJudge,
    TransformersPipeline,
    Usage,
    extract_prompt,
    judge_prompt,
    parse_judgement,
    parse_memory_items,
)
from rbank_torch.trajectory import StepMetadata, StepOutcome, TrajectoryRecorder
from rbank_torch.verdicts import RootCause, Verdict, VerdictKind


def make_traj(task="fix the failing unit test", verdict=None, fail=False):
    rec = TrajectoryRecorder(torch.ones(4))
    rec.set_request_type("coding")
    rec.add_step("run the tests", "see what fails", StepOutcome.failure("import error") if fail else StepOutcome.success(), 0.8)
    rec.add_step("fix the import", "repair", StepOutcome.success(), 0.9)
    rec.trajectory.metadata.attributes["query"] = task
    return rec.complete(verdict or Verdict.success())


GOOD_ITEMS = {"memories": [
    {"title": "Run tests first", "description": "When a change touches imports.", "content": "Run the tests before editing."},
    {"title": "Fix imports early", "description": "When collection fails.", "content": "Import errors hide other failures."},
]}


class Scripted:
    """A fake ``complete``: answers from a list (or a function of the prompt), records every prompt."""

    def __init__(self, answers):
        self.answers = answers
        self.prompts: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, prompt: str) -> str:
        with self.lock:
            self.prompts.append(prompt)
            n = len(self.prompts) - 1
        a = self.answers(prompt) if callable(self.answers) else self.answers[min(n, len(self.answers) - 1)]
        if isinstance(a, BaseException):
            raise a
        return a


# ------------------------------------------------------------------------------------------ types, rules
def test_memory_item_text_and_validation():
    it = MemoryItem("T", "D", "C")
    assert it.text == "T\nC" and MemoryItem.from_dict(it.to_dict()) == it
    with pytest.raises(ValueError, match="content"):
        MemoryItem("T", "D", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'description'"):
        MemoryItem.from_dict({"title": "T", "content": "C"})


def test_rule_judge_and_extractor_follow_the_protocols():
    t = make_traj(fail=True, verdict=Verdict.failure(RootCause.tool_failure("pytest", "")))
    assert isinstance(RuleJudge(), Judge) and isinstance(RuleExtractor(), MemoryExtractor)
    assert RuleJudge().judge(t) is t.verdict
    items = RuleExtractor().extract(t)
    assert [i.content for i in items] == ["Avoid: run the tests - import error"]
    assert items[0].title == "Avoid: run the tests" and "coding" in items[0].description
    rec = RuleExtractor().extract(make_traj(fail=True, verdict=Verdict.recovered(RootCause.unknown("x"), 2, 0.9)))
    assert [(i.title, i.content) for i in rec] == [
        ("Successful pattern", "Successful pattern: fix the import"),
        ("Recovery by reflection", "Recovery possible with 2 reflection attempts"),
    ]
    # with another verdict, the items follow that verdict and the trajectory is left as it was
    items = RuleExtractor().extract(t, Verdict.success())
    assert [i.content for i in items] == ["Successful pattern: fix the import"]
    assert t.verdict.kind is VerdictKind.FAILURE


def test_public_names_are_exported():
    for name in ("MemoryItem", "Judge", "MemoryExtractor", "RuleJudge", "RuleExtractor", "LLMJudge",
                 "LLMExtractor", "OpenAICompatible", "LLMStats"):
        assert getattr(rbank_torch, name) is getattr(rbank_torch.llm, name)


def test_prompts_are_versioned_and_carry_the_run():
    t = make_traj(fail=True, verdict=Verdict.recovered(RootCause.tool_failure("pytest", "import error"), 1, 0.9))
    t.steps[0].metadata = StepMetadata(tool_used="pytest")
    jp, ep = judge_prompt(t), extract_prompt(t, max_items=2)
    assert JUDGE_PROMPT_VERSION in jp and EXTRACT_PROMPT_VERSION in ep
    for p in (jp, ep):
        assert "Task: fix the failing unit test" in p and "[tool: pytest] -> failure: import error" in p
    assert "Verdict: Recovered after 1 attempts, quality 90%" in ep and "at most 2 memories" in ep
    assert "Verdict:" not in jp  # the judge decides it
    many = make_traj()
    for i in range(100):
        many.steps.append(many.steps[0].__class__(i + 2, f"step {i} " + "x" * 1000, "r", StepOutcome.success(), 0.5))
    assert len(judge_prompt(many)) < 12_000  # bounded: steps and fields are cut


# ------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("answer,verdict", [
    ('{"verdict": "success", "rationale": "all steps passed"}', Verdict.success()),
    ('```json\n{"verdict": "partial", "completion_ratio": 0.5, "rationale": "half"}\n```', Verdict.partial(0.5)),
    ('Here you go: {"verdict": "failure", "rationale": "r", "cause": {"type": "ToolFailure", "tool": "git", '
     '"error": "rejected"}} hope this helps', Verdict.failure(RootCause.tool_failure("git", "rejected"))),
    ('{"verdict": "recovered", "rationale": "r", "attempts": 2, "final_quality": 0.9, '
     '"original": {"type": "InsufficientContext", "missing": ["logs"]}}',
     Verdict.recovered(RootCause.insufficient_context(["logs"]), 2, 0.9)),
])
def test_parse_judgement_accepts_valid_answers(answer, verdict):
    v, why = parse_judgement(answer)
    assert v == verdict and why


MALFORMED_JUDGE = [
    ("", "empty answer"),
    ("   ", "empty answer"),
    ("The run looks fine to me.", "no JSON object"),
    ('{"verdict": "success", "rationale": "all st', "truncated JSON"),
    ('{"verdict": "success" "rationale": "x"}', "malformed JSON"),
    ("```json\n{\"verdict\": \"succ", "truncated JSON"),
    ('["success"]', "must be a JSON object"),
    ('{"verdict": "great", "rationale": "x"}', "verdict must be one of"),
    ('{"verdict": "success"}', "rationale must be a non-empty string"),
    ('{"verdict": "success", "rationale": ""}', "rationale must be a non-empty string"),
    ('{"verdict": "failure", "rationale": "x"}', "cause must be a root-cause object"),
    ('{"verdict": "failure", "rationale": "x", "cause": {"type": "Oops"}}', "cause.type must be one of"),
    ('{"verdict": "failure", "rationale": "x", "cause": {"type": "ToolFailure", "tool": 3}}', "cause.tool must be a string"),
    ('{"verdict": "partial", "rationale": "x", "completion_ratio": 1.5}', "completion_ratio must be a number in"),
    ('{"verdict": "partial", "rationale": "x"}', "completion_ratio must be a number in"),
    ('{"verdict": "recovered", "rationale": "x", "attempts": -1, "final_quality": 1, '
     '"original": {"type": "Unknown"}}', "attempts must be an integer"),
    ('{"verdict": "recovered", "rationale": "x", "attempts": true, "final_quality": 1, '
     '"original": {"type": "Unknown"}}', "attempts must be an integer"),
    ('{"verdict": "recovered", "rationale": "x", "attempts": 1, "final_quality": 1}', "original must be"),
]


@pytest.mark.parametrize("answer,message", MALFORMED_JUDGE)
def test_parse_judgement_rejects_malformed_answers_naming_the_problem(answer, message):
    with pytest.raises(LLMOutputError, match=re.escape(message)):
        parse_judgement(answer)


MALFORMED_ITEMS = [
    ("", "empty answer"),
    ("I could not find any lessons.", "no JSON object"),
    ('{"memories": [{"title": "Run tests first", "descr', "truncated JSON"),
    ("{'memories': []}", "malformed JSON"),
    ('{"lessons": []}', "must have a 'memories' list"),
    ('{"memories": "run tests"}', "memories must be a list"),
    ('{"memories": ["run tests"]}', "memories[0] must be an object"),
    ('{"memories": [{"title": "T", "description": "D"}]}', "memories[0].content must be a non-empty string"),
    ('{"memories": [{"title": "T", "description": "D", "content": 5}]}', "memories[0].content must be a non-empty"),
    ('{"memories": [{"title": "' + "t" * 200 + '", "description": "D", "content": "C"}]}',
     "memories[0].title must be at most 120 characters"),
    # partly valid: the first item is fine, the second is not -> the whole answer is rejected
    ('{"memories": [{"title": "T", "description": "D", "content": "C"}, {"title": "T2", "description": "D2"}]}',
     "memories[1].content"),
]


@pytest.mark.parametrize("answer,message", MALFORMED_ITEMS)
def test_parse_memory_items_rejects_malformed_answers_naming_the_item(answer, message):
    with pytest.raises(LLMOutputError, match=re.escape(message)):
        parse_memory_items(answer)


def test_parse_memory_items_fenced_bare_list_and_cap():
    fenced = "```json\n" + json.dumps(GOOD_ITEMS) + "\n```"
    assert [i.title for i in parse_memory_items(fenced)] == ["Run tests first", "Fix imports early"]
    assert [i.title for i in parse_memory_items(json.dumps(GOOD_ITEMS["memories"]))] == ["Run tests first",
                                                                                      "Fix imports early"]
    assert len(parse_memory_items(json.dumps(GOOD_ITEMS), max_items=1)) == 1
    assert parse_memory_items('{"memories": []}') == []
    assert parse_memory_items('{"memories": [{"title": " T ", "description": "D", "content": "C"}]}')[0].title == "T"


# ------------------------------------------------------------------------------------------ fallbacks
@pytest.mark.parametrize("answer,message", MALFORMED_JUDGE + [(RuntimeError("endpoint down"), "complete raised RuntimeError")])
def test_llm_judge_falls_back_per_trajectory_and_counts(answer, message):
    t = make_traj(fail=True, verdict=Verdict.failure(RootCause.tool_failure("pytest", "import error")))
    judge = LLMJudge(Scripted([answer]), retries=0)
    j = judge.assess(t)
    assert j.verdict == t.verdict and not j.from_model and message in j.error
    s = judge.stats()
    assert (s.calls, s.failures, s.cache_hits) == (1, 1, 0)
    assert s.errors[0].trajectory_id == t.id and message in s.errors[0].message


@pytest.mark.parametrize("answer,message", MALFORMED_ITEMS + [(ValueError("bad gateway"), "complete raised ValueError")])
def test_llm_extractor_falls_back_to_rule_items(answer, message):
    t = make_traj(fail=True, verdict=Verdict.failure(RootCause.tool_failure("pytest", "import error")))
    ex = LLMExtractor(Scripted([answer]), retries=0)
    assert ex.extract(t) == RuleExtractor().extract(t)  # nothing lost, nothing half-stored
    s = ex.stats()
    assert (s.calls, s.failures) == (1, 1) and message in s.errors[0].message


def test_complete_returning_non_text_is_a_failure():
    t = make_traj()
    ex = LLMExtractor(lambda p: None, retries=0)  # type: ignore[arg-type,return-value]
    assert ex.extract(t) == RuleExtractor().extract(t)
    assert "must return a str" in ex.stats().errors[0].message


def test_a_mixed_batch_keeps_every_trajectory():
    ts = [make_traj(task=f"task {i}") for i in range(12)]

    def answer(prompt):
        i = int(re.search(r"Task: task (\d+)", prompt).group(1))
        if i % 3 == 0:
            return '{"memories": [{"title": "broken"'  # truncated
        if i % 3 == 1:
            raise ConnectionError("reset")
        return json.dumps({"memories": [{"title": f"T{i}", "description": "D", "content": "C"}]})

    ex = LLMExtractor(Scripted(answer), retries=0, max_workers=3)
    out = ex.extract_many(ts)
    assert len(out) == 12
    for i, items in enumerate(out):
        if i % 3 == 2:
            assert [it.title for it in items] == [f"T{i}"]
        else:
            assert items == RuleExtractor().extract(ts[i])
    s = ex.stats()
    assert (s.calls, s.failures) == (12, 8)
    assert sorted(e.trajectory_id for e in s.errors) == sorted(ts[i].id for i in range(12) if i % 3 != 2)


# ------------------------------------------------------------------------------------------ cost control
def test_retries_with_exponential_backoff_then_success():
    slept: list[float] = []
    fake = Scripted([TimeoutError("slow"), ConnectionError("reset"), json.dumps(GOOD_ITEMS)])
    ex = LLMExtractor(fake, retries=2, backoff_s=0.25, sleep=slept.append)
    items = ex.extract(make_traj())
    assert [i.title for i in items] == ["Run tests first", "Fix imports early"]
    s = ex.stats()
    assert (s.calls, s.retries, s.failures) == (3, 2, 0) and slept == [0.25, 0.5]


def test_only_transient_errors_are_retried():
    from rbank_torch.llm import is_transient

    class Status(Exception):
        def __init__(self, code):
            self.status_code = code

    assert is_transient(TimeoutError()) and is_transient(ConnectionResetError()) and is_transient(Status(503))
    assert is_transient(Status(429)) and not is_transient(Status(400)) and not is_transient(Status(401))
    assert not is_transient(ValueError("bug in complete"))
    judge = LLMJudge(Scripted([Status(401)]), retries=3, sleep=lambda s: None)
    t = make_traj()
    assert judge.judge(t) == t.verdict
    assert (judge.stats().calls, judge.stats().retries, judge.stats().failures) == (1, 0, 1)


def test_retries_exhausted_fall_back():
    ex = LLMJudge(Scripted([ConnectionError("reset")]), retries=3, sleep=lambda s: None)
    t = make_traj()
    assert ex.judge(t) == t.verdict
    s = ex.stats()
    assert (s.calls, s.retries, s.failures) == (4, 3, 1)


def test_timeout_gives_the_fallback():
    release = threading.Event()

    def hangs(prompt):
        release.wait()
        return json.dumps(GOOD_ITEMS)

    ex = LLMExtractor(hangs, retries=0, timeout_s=0.05)
    t = make_traj()
    try:
        assert ex.extract(t) == RuleExtractor().extract(t)
    finally:
        release.set()
    assert "did not answer within" in ex.stats().errors[0].message


def test_bounded_concurrency_and_input_order():
    active = [0]
    peak = [0]
    lock = threading.Lock()
    gate = threading.Barrier(3, timeout=30)

    def fake(prompt):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            gate.wait()  # three calls really run at once
        except threading.BrokenBarrierError:
            pass
        with lock:
            active[0] -= 1
        i = re.search(r"Task: task (\d+)", prompt).group(1)
        return json.dumps({"memories": [{"title": f"T{i}", "description": "D", "content": "C"}]})

    ts = [make_traj(task=f"task {i}") for i in range(9)]
    ex = LLMExtractor(fake, max_workers=3)
    out = list(ex.iter_extract(ts))
    assert [o[0].title for o in out] == [f"T{i}" for i in range(9)]
    assert peak[0] == 3


def test_disk_cache_makes_reruns_free(tmp_path):
    path = tmp_path / "llm-cache.jsonl"
    ts = [make_traj(task=f"task {i}") for i in range(5)]
    first = Scripted([json.dumps(GOOD_ITEMS)])
    a = LLMExtractor(first, cache=path)
    out_a = a.extract_many(ts)
    assert len(first.prompts) == 5 and a.stats().cache_hits == 0
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5 and all(set(json.loads(x)) >= {"key", "output"} for x in lines)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"key": "cut by a cra')  # a crash cut the last line
    second = Scripted([RuntimeError("must not be called")])
    b = LLMExtractor(second, cache=path)
    assert b.extract_many(ts) == out_a
    s = b.stats()
    assert second.prompts == [] and (s.calls, s.cache_hits, s.failures) == (0, 5, 0)
    assert b.cache is not None and b.cache.bad_lines == 1 and len(b.cache) == 5
    # another prompt version or model is another key
    c = LLMExtractor(Scripted([json.dumps(GOOD_ITEMS)]), cache=path, model_id="other-model")
    c.extract(ts[0])
    assert c.stats().calls == 1
    # the new answer went on a line of its own after the cut one: the file reads back whole
    d = ResponseCache(path)
    assert (len(d), d.bad_lines) == (6, 1)
    assert ResponseCache.key("a", "bc") != ResponseCache.key("ab", "c")


def test_memory_cache_is_bounded():
    c = ResponseCache(max_entries=2)
    for k in "abc":
        c.put(k, k.upper())
    assert len(c) == 2 and c.get("a") is None and c.get("c") == ("C", None)
    with pytest.raises(ValueError, match="max_entries"):
        ResponseCache(max_entries=0)


def test_only_usable_answers_are_cached_and_the_default_cache_is_in_memory():
    t = make_traj()
    fake = Scripted(["not json", '{"verdict": "partial", "completion_ratio": 0.5, "rationale": "half"}'])
    judge = LLMJudge(fake)  # default: an in-memory cache
    assert judge.judge(t) == t.verdict  # malformed: the fallback, and nothing cached
    assert judge.judge(t) == Verdict.partial(0.5)  # asked again
    assert judge.judge(t) == Verdict.partial(0.5)  # now from the cache
    s = judge.stats()
    assert (s.calls, s.cache_hits, s.failures) == (2, 1, 1) and len(fake.prompts) == 2
    plain = LLMJudge(Scripted(['{"verdict": "success", "rationale": "ok"}']), cache=None)
    plain.judge(t), plain.judge(t)
    assert (plain.stats().calls, plain.stats().cache_hits) == (2, 0)
    with pytest.raises(ValueError, match="cache must be"):
        LLMJudge(lambda p: p, cache=3)


def test_reported_tokens_are_counted():
    class WithUsage:
        def __init__(self):
            self._local = threading.local()

        @property
        def last_usage(self):
            return getattr(self._local, "u", None)

        def __call__(self, prompt):
            self._local.u = Usage(len(prompt) // 4, 7)
            return '{"verdict": "success", "rationale": "ok"}'

    fake = WithUsage()
    judge = LLMJudge(fake, max_workers=2)
    ts = [make_traj(task=f"task {i}") for i in range(4)]
    assert all(v.kind is VerdictKind.SUCCESS for v in judge.judge_many(ts))
    s = judge.stats()
    assert s.completion_tokens == 28 and s.prompt_tokens == sum(len(judge_prompt(t)) // 4 for t in ts)
    assert s.prompt_chars == sum(len(judge_prompt(t)) for t in ts)


def test_argument_validation():
    with pytest.raises(ValueError, match="complete must be a callable"):
        LLMJudge("gpt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_workers"):
        LLMJudge(lambda p: p, max_workers=0)
    with pytest.raises(ValueError, match="max_items"):
        LLMExtractor(lambda p: p, max_items=0)
    with pytest.raises(ValueError, match="verdicts must have one entry per trajectory"):
        LLMExtractor(lambda p: p).extract_many([make_traj()], [])


# ------------------------------------------------------------------------------------------ adapters
def test_transformers_pipeline_adapter_plain_and_chat():
    class FakePipe:
        def __init__(self, chat):
            self.tokenizer = type("Tok", (), {"chat_template": "{{x}}" if chat else None})()
            self.calls = []

        def __call__(self, inp, **kw):
            self.calls.append((inp, kw))
            if isinstance(inp, list):
                return [{"generated_text": inp + [{"role": "assistant", "content": "chat answer"}]}]
            return [{"generated_text": "plain answer"}]

    p = FakePipe(chat=False)
    c = TransformersPipeline(p, max_new_tokens=64)
    assert c("hello") == "plain answer"
    assert p.calls[0][1]["max_new_tokens"] == 64 and p.calls[0][1]["return_full_text"] is False
    assert p.calls[0][1]["do_sample"] is False
    q = FakePipe(chat=True)
    assert TransformersPipeline(q)("hello") == "chat answer"
    assert q.calls[0][0] == [{"role": "user", "content": "hello"}]
    with pytest.raises(ValueError, match="pipeline must be"):
        TransformersPipeline(3)


class _ChatServer:
    """A loopback HTTP server speaking enough of the chat-completions protocol for the openai client.
    It answers at most ``limit`` requests, records every request body, and is stopped by the test."""

    def __init__(self, answer, limit=50):
        self.requests: list[dict] = []
        self.answer = answer
        self.limit = limit
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(n) or b"{}")
                with lock:
                    outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                    over = len(outer.requests) > outer.limit
                prompt = body["messages"][-1]["content"]
                status, content = (429, None) if over else outer.answer(prompt)
                if status != 200:
                    payload = json.dumps({"error": {"message": "no", "type": "server_error"}}).encode()
                else:
                    payload = json.dumps({
                        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": content}}],
                        "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 11,
                                  "total_tokens": len(prompt.split()) + 11},
                    }).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=30)


@pytest.fixture
def no_proxy(monkeypatch):
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def test_openai_client_against_a_loopback_server_end_to_end(no_proxy, tmp_path):
    pytest.importorskip("openai")
    from rbank_torch.llm import OpenAICompatible

    def answer(prompt):
        task = re.search(r"Task: (.*)", prompt).group(1)
        if EXTRACT_PROMPT_VERSION in prompt:
            if "task 3" in task:
                return 200, '{"memories": [{"title": "cut off'  # truncated by a max_tokens limit
            return 200, "```json\n" + json.dumps({"memories": [
                {"title": f"Lesson of {task}", "description": "When tests fail.", "content": "Run them first."}]}) + "\n```"
        if "task 4" in task:
            return 500, None
        return 200, json.dumps({"verdict": "failure", "rationale": "step 1 failed",
                                "cause": {"type": "ToolFailure", "tool": "pytest", "error": "import error"}})

    ts = [make_traj(task=f"task {i}") for i in range(6)]
    with _ChatServer(answer, limit=40) as srv:
        model = OpenAICompatible(srv.base_url, "tiny-test-model", timeout=30)
        judge = LLMJudge(model, retries=1, backoff_s=0, max_workers=3, cache=tmp_path / "c.jsonl")
        verdicts = judge.judge_many(ts)
        ex = LLMExtractor(model, retries=0, max_workers=3, cache=tmp_path / "c.jsonl")
        items = ex.extract_many(ts, verdicts)
        # a re-run over the same trajectories is answered from the cache: no new requests
        n_requests = len(srv.requests)
        rerun = LLMExtractor(model, max_workers=3, cache=tmp_path / "c.jsonl")
        again = rerun.extract_many(ts, verdicts)
        # only the answer that could not be used is asked for again (and is cut off again)
        assert len(srv.requests) == n_requests + 1
        assert (rerun.stats().calls, rerun.stats().cache_hits, rerun.stats().failures) == (1, 5, 1)
        model.close()
    want = Verdict.failure(RootCause.tool_failure("pytest", "import error"))
    assert [v == want for v in verdicts] == [True, True, True, True, False, True]
    assert verdicts[4] == ts[4].verdict  # HTTP 500 twice: the recorded verdict
    js = judge.stats()
    assert (js.calls, js.retries, js.failures) == (7, 1, 1) and "InternalServerError" in js.errors[0].message
    assert js.completion_tokens == 11 * 5 and js.prompt_tokens > 0
    assert [i[0].title for k, i in enumerate(items) if k != 3] == [f"Lesson of task {k}" for k in (0, 1, 2, 4, 5)]
    assert items[3] == RuleExtractor().extract(ts[3], verdicts[3])
    es = ex.stats()
    assert (es.calls, es.failures, es.cache_hits) == (6, 1, 0) and "truncated JSON" in es.errors[0].message
    assert again == items
    bodies = [r["body"] for r in srv.requests]
    assert {r["path"] for r in srv.requests} == {"/v1/chat/completions"}
    assert all(b["model"] == "tiny-test-model" and b["messages"][-1]["role"] == "user" for b in bodies)
    assert all(b["temperature"] == 0.0 for b in bodies)
    assert n_requests == 13 <= 40


# ------------------------------------------------------------------------------------------ command line
@pytest.fixture
def small_log(tmp_path):
    from datetime import datetime, timedelta, timezone

    from rbank_torch.logs import task_to_record, write_jsonl
    from rbank_torch.synthetic import generate_tasks

    g = torch.Generator().manual_seed(0)
    start = datetime(2025, 1, 6, 9, 0, tzinfo=timezone.utc)
    recs = [task_to_record(spec, i + 1, start + timedelta(minutes=i),
                           embedding=[round(x, 5) for x in torch.randn(8, generator=g).tolist()])
            for i, spec in enumerate(generate_tasks(30, seed=3))]
    p = tmp_path / "runs.jsonl"
    write_jsonl(recs, p)
    return p


def _cli(capsys, *argv):
    from rbank_torch.cli import main

    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_distill_with_openai_judge_and_extractor(no_proxy, tmp_path, small_log, capsys):
    pytest.importorskip("openai")

    def answer(prompt):
        task = re.search(r"Task: (.*)", prompt).group(1)
        if EXTRACT_PROMPT_VERSION in prompt:
            return 200, json.dumps({"memories": [{"title": "Check first", "description": f"For {task}.",
                                                  "content": "Verify the inputs before acting."}]})
        return 200, '{"verdict": "success", "rationale": "every step reached its goal"}'

    out = tmp_path / "out"
    with _ChatServer(answer, limit=100) as srv:
        code, stdout, err = _cli(capsys, "distill", small_log, "--out", out, "--min-trajectories", "10",
                                 "--judge", "openai", "--extractor", "openai", "--base-url", srv.base_url,
                                 "--model", "tiny-test-model", "--llm-concurrency", "2")
        assert code == 0, err
        first = len(srv.requests)
        # the same command again: every answer comes from the cache in DIR/llm-cache.jsonl
        code, stdout2, err = _cli(capsys, "distill", small_log, "--out", out, "--min-trajectories", "10",
                                  "--judge", "openai", "--extractor", "openai", "--base-url", srv.base_url,
                                  "--llm-model", "tiny-test-model", "--json", "-q")
        assert code == 0, err
        assert len(srv.requests) == first == 60
    assert all(r["body"]["model"] == "tiny-test-model" for r in srv.requests)
    mems = [json.loads(x) for x in (out / "memories.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(mems) == 30 and {m["verdict"] for m in mems} == {"success"}  # the judge's verdicts
    assert set(mems[0]) == {"trajectory_id", "outcome", "verdict", "title", "description", "content"}
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["llm"]["memories"] == 30 and summary["files"]["memories"] == "memories.jsonl"
    assert summary["llm"]["judge_stats"]["cache_hits"] == 30 and summary["llm"]["judge_stats"]["calls"] == 0
    assert "judge: 30 calls, 0 cached, 0 failed" in stdout and "30 memories ->" in stdout
    doc = json.loads(stdout2)
    assert doc["llm"]["extractor_stats"]["cache_hits"] == 30
    # every run judged a success: no failure lesson survives
    lessons = [json.loads(x)["content"] for x in (out / "lessons.jsonl").read_text(encoding="utf-8").splitlines()]
    assert not any(x.startswith("Avoid:") for x in lessons)


def test_cli_distill_rule_extractor_needs_no_model(tmp_path, small_log, capsys):
    out = tmp_path / "out"
    code, stdout, err = _cli(capsys, "distill", small_log, "--out", out, "--min-trajectories", "10",
                             "--extractor", "rule", "-q")
    assert code == 0, err
    mems = [json.loads(x) for x in (out / "memories.jsonl").read_text(encoding="utf-8").splitlines()]
    assert mems and all(m["content"] and m["title"] for m in mems)
    assert not (out / "llm-cache.jsonl").exists()


def test_cli_distill_openai_needs_a_base_url(tmp_path, small_log, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    code, _, err = _cli(capsys, "distill", small_log, "--out", tmp_path / "o", "--extractor", "openai",
                        "--llm-model", "m", "--min-trajectories", "10", "-q")
    assert code != 0 and "--base-url" in err


# ------------------------------------------------------------------------------------------ the bank
def _hash_encoder(texts):
    import zlib

    rows = []
    for s in texts:
        g = torch.Generator().manual_seed(zlib.crc32(s.encode("utf-8")))
        rows.append(torch.nn.functional.normalize(torch.randn(4, generator=g), dim=0))
    return torch.stack(rows)


def test_bank_stores_extracted_memory_items_as_patterns(tmp_path):
    from rbank_torch import ReasoningBank, ReasoningBankConfig

    fake = Scripted([json.dumps(GOOD_ITEMS)])
    ex = LLMExtractor(fake)
    bank = ReasoningBank(ReasoningBankConfig(embedding_dim=4, extractor=ex), embedder=_hash_encoder)
    t = make_traj()
    pid = bank.store_trajectory(t)
    assert pid is not None and len(fake.prompts) == 1
    mems = bank.search("Run tests first\nRun the tests before editing.", k=5)
    by_text = {r.pattern.text: r.pattern for r in mems}
    first = by_text["Run tests first\nRun the tests before editing."]
    assert "Fix imports early\nImport errors hide other failures." in by_text
    assert first.outcome == "success" and first.source_trajectories == [t.id]
    assert first.lessons == ["When a change touches imports."] and first.metadata.source == "extractor"
    assert first.metadata.attributes.get("request_type") == "coding"  # the run's attributes, for filters
    assert torch.allclose(first.embedding, _hash_encoder([first.text])[0])
    assert len(bank) == 3  # the trajectory's own pattern and two memories
    # saved and loaded: the memories stay, the runtime extractor does not travel with the file
    bank.save(tmp_path / "b.safetensors")
    again = ReasoningBank.load(tmp_path / "b.safetensors")
    assert again.config.extractor is None and len(again) == 3
    assert {p.text for p in again.export_patterns()} >= set(by_text)


def test_bank_with_a_failing_model_stores_the_rule_items_and_a_judged_verdict():
    from rbank_torch import ReasoningBank, ReasoningBankConfig

    judge = LLMJudge(Scripted(['{"verdict": "failure", "rationale": "tests never passed", '
                               '"cause": {"type": "ToolFailure", "tool": "pytest", "error": "import error"}}']))
    ex = LLMExtractor(Scripted(["```json\n{\"memories\": [{\"title\": \"cut"]), retries=0)
    bank = ReasoningBank(ReasoningBankConfig(embedding_dim=4, judge=judge, extractor=ex), embedder=_hash_encoder)
    t = make_traj(fail=True)
    bank.store_trajectory(t)
    assert t.verdict == Verdict.failure(RootCause.tool_failure("pytest", "import error")) and t.quality < 0.3
    assert bank.stats().failure_count == 1 and ex.stats().failures == 1
    pats = [p for p in bank.export_patterns() if p.metadata.source == "extractor"]
    want = RuleExtractor().extract(t)
    assert [p.text for p in pats] == [w.text for w in want] and want
    assert all(p.outcome == "failure" and p.source_trajectories == [t.id] for p in pats)


def test_bank_config_rejects_objects_that_are_not_judges_or_extractors():
    from rbank_torch import ReasoningBank, ReasoningBankConfig

    with pytest.raises(ValueError, match="extractor must have an extract"):
        ReasoningBank(ReasoningBankConfig(embedding_dim=4, extractor="openai"), embedder=_hash_encoder)
    with pytest.raises(ValueError, match="judge must have a judge"):
        ReasoningBank(ReasoningBankConfig(embedding_dim=4, judge=42), embedder=_hash_encoder)
