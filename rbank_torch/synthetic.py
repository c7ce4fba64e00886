"""Realistic synthetic agent trajectories (for the demo, the sample logs, tests and benchmarks).

Four task families (coding, research, tool use, chat), each with query templates, step sequences,
typical failures with root causes, partial completions and recoveries. Everything is drawn from a
seeded ``random.Random``, so a seed gives the same trajectories.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .trajectory import StepOutcome
from .verdicts import ReasoningErrorType, RootCause, Verdict

__all__ = ["TaskSpec", "generate_tasks", "FAMILIES"]

FAMILIES: dict[str, dict[str, Any]] = {
    "coding": {
        "request_type": "code",
        "queries": [
            "fix the failing unit test in the {x} module",
            "implement a {x} parser with error recovery",
            "refactor the {x} service to remove duplicated code",
            "add type hints and docstrings to the {x} package",
            "write a function that validates {x} input",
            "optimise the slow {x} query in the data layer",
            "port the {x} script from Python 2 to Python 3",
        ],
        "subjects": ["billing", "auth", "csv", "json", "scheduler", "cache", "logging", "payments", "search"],
        "steps": ["read the code", "reproduce the bug", "implement the fix", "run the tests", "verify the output",
                  "write code", "review the diff"],
        "tools": ["pytest", "git", "python"],
        "failures": [
            lambda r: RootCause.tool_failure("pytest", r.choice(["import error", "timeout after 60s", "segfault"])),
            lambda r: RootCause.reasoning_error(ReasoningErrorType.LOGICAL_INCONSISTENCY, "fix contradicts the spec"),
            lambda r: RootCause.insufficient_context(["stack trace", "failing input"]),
        ],
        "lessons": ["Run the failing test before editing code", "Read the stack trace to the first frame of our code",
                    "Keep refactors and behaviour changes in separate commits"],
    },
    "research": {
        "request_type": "research",
        "queries": [
            "summarise recent papers on {x}",
            "compare the main approaches to {x}",
            "find benchmarks that measure {x}",
            "explain the trade-offs of {x} for a newcomer",
            "collect citations about {x} since 2020",
        ],
        "subjects": ["retrieval augmented generation", "mixture of experts", "continual learning",
                     "catastrophic forgetting", "vector databases", "speculative decoding", "quantisation"],
        "steps": ["search the literature", "read the abstracts", "analyze the results", "compare methods",
                  "check the citations", "write the summary"],
        "tools": ["web_search", "pdf_reader"],
        "failures": [
            lambda r: RootCause.external_failure("search api", r.choice(["rate limited", "HTTP 503"])),
            lambda r: RootCause.reasoning_error(ReasoningErrorType.HALLUCINATION, "cited a paper that does not exist"),
            lambda r: RootCause.insufficient_context(["date range", "target venue"]),
        ],
        "lessons": ["Verify every citation against the source", "State the date range of the search",
                    "Prefer surveys for a first overview"],
    },
    "tool_use": {
        "request_type": "operations",
        "queries": [
            "deploy the {x} service to staging",
            "rotate the credentials of the {x} database",
            "back up the {x} bucket and verify the archive",
            "restart the {x} workers and check their health",
            "collect logs from the {x} cluster for the last hour",
        ],
        "subjects": ["orders", "analytics", "inventory", "gateway", "ingest", "reporting"],
        "steps": ["execute the deploy script", "run the health check", "execute the backup", "check the logs",
                  "call the cloud api", "verify the result"],
        "tools": ["kubectl", "aws_cli", "bash"],
        "failures": [
            lambda r: RootCause.tool_failure("kubectl", r.choice(["permission denied", "context not found"])),
            lambda r: RootCause.resource_constraint(r.choice(["memory", "disk", "api quota"]), r.choice(["4GB", "95%", "1000/h"])),
            lambda r: RootCause.external_failure("cloud provider", "region outage"),
        ],
        "lessons": ["Run the health check after every deploy", "Check credentials before long operations",
                    "Dry-run destructive commands first"],
    },
    "chat": {
        "request_type": "conversation",
        "queries": [
            "help me plan a {x} for next week",
            "explain {x} in simple words",
            "draft a friendly reply about {x}",
            "give me three ideas for {x}",
        ],
        "subjects": ["team offsite", "budget review", "product launch", "onboarding", "birthday party"],
        "steps": ["clarify the request", "reason about constraints", "draft the answer", "check tone",
                  "answer the user"],
        "tools": [],
        "failures": [
            lambda r: RootCause.insufficient_context(["date", "audience"]),
            lambda r: RootCause.capability_limit("cannot access the user's calendar"),
            lambda r: RootCause.invalid_input("request mixes two unrelated tasks"),
        ],
        "lessons": ["Ask about the audience before drafting", "Keep answers short unless asked otherwise"],
    },
}


@dataclass
class TaskSpec:
    """One generated agent run, before embedding (``query`` is text)."""

    family: str
    query: str
    steps: list[tuple[str, str, StepOutcome, float]]
    verdict: Verdict
    request_type: str
    tools: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    lessons: list[str] = field(default_factory=list)
    session_id: str = ""
    input_tokens: int = 0
    output_tokens: int = 0


def generate_tasks(n: int, seed: int = 0) -> list[TaskSpec]:
    """``n`` agent runs over the four families: ~60 % success, ~15 % failure, ~15 % partial, ~10 % recovered."""
    r = random.Random(seed)
    fams = list(FAMILIES)
    out = []
    for i in range(n):
        fam = fams[i % len(fams)] if i < len(fams) else r.choice(fams)
        spec = FAMILIES[fam]
        query = r.choice(spec["queries"]).format(x=r.choice(spec["subjects"]))
        u = r.random()
        kind = "success" if u < 0.6 else "failure" if u < 0.75 else "partial" if u < 0.9 else "recovered"
        nsteps = r.randint(2, 5)
        actions = r.sample(spec["steps"], k=min(nsteps, len(spec["steps"])))
        steps = []
        cause = r.choice(spec["failures"])(r)
        for j, a in enumerate(actions):
            conf = round(r.uniform(0.55, 0.98), 3)
            if kind == "failure" and j == len(actions) - 1:
                steps.append((a, "attempt", StepOutcome.failure(str(cause)), round(r.uniform(0.2, 0.6), 3)))
            elif kind == "partial" and j == len(actions) - 1:
                steps.append((a, "attempt", StepOutcome.partial("first half", "second half"), conf))
            elif kind == "recovered" and j == 1:
                steps.append((a, "retry", StepOutcome.needs_retry("transient error", ["retry", "reflect"]), conf))
            else:
                steps.append((a, f"to {a}", StepOutcome.success(), conf))
        if kind == "success":
            verdict = Verdict.success()
        elif kind == "failure":
            verdict = Verdict.failure(cause)
        elif kind == "partial":
            verdict = Verdict.partial(round(r.uniform(0.3, 0.8), 2))
        else:
            verdict = Verdict.recovered(cause, r.randint(1, 3), round(r.uniform(0.6, 0.95), 2))
        tools = r.sample(spec["tools"], k=min(len(spec["tools"]), r.randint(0, 2))) if spec["tools"] else []
        tags = [fam] + (["chat"] if fam == "chat" else [])
        lessons = [r.choice(spec["lessons"])] if r.random() < 0.35 else []
        out.append(
            TaskSpec(
                family=fam,
                query=query,
                steps=steps,
                verdict=verdict,
                request_type=spec["request_type"],
                tools=tools,
                tags=tags,
                lessons=lessons,
                session_id=f"session-{r.randrange(1_000_000):06d}",
                input_tokens=r.randint(200, 4000),
                output_tokens=r.randint(50, 1500),
            )
        )
    return out
