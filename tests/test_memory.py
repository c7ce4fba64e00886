"""The agent memory API (SPEC §7): text in and out, provenance, failures kept, filters on every backend,
scoring, MMR, dedup, touch, format_memories, the category rule table on the sample log."""

from __future__ import annotations

import hashlib
import math
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from rbank_torch import Pattern, PatternStoreConfig
from rbank_torch._util import utcnow
from rbank_torch.backends import MissingBackendError
from rbank_torch.bank import ReasoningBank, ReasoningBankConfig, RetrievalScoring, format_memories
from rbank_torch.patterns import PatternCategory, PatternMetadata
from rbank_torch.trajectory import StepOutcome
from rbank_torch.verdicts import RootCause, Verdict

ROOT = Path(__file__).resolve().parents[1]
D = 16


class HashEmbedder:
    """Deterministic text embedder: a unit vector seeded by the text's hash (``encode`` like a model)."""

    def __init__(self, dim: int = D) -> None:
        self.dim = dim
        self.calls = 0

    def encode(self, texts: list[str]) -> torch.Tensor:
        self.calls += 1
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little")
            out.append(torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)))
        return torch.nn.functional.normalize(torch.stack(out), dim=1)


def bank(**kw) -> ReasoningBank:
    kw.setdefault("embedding_dim", D)
    return ReasoningBank(ReasoningBankConfig(**kw), embedder=HashEmbedder(kw["embedding_dim"]))


# ----------------------------------------------------------------------------- text in and out


def test_add_get_update_remove_len_and_text_search():
    b = bank()
    i = b.add("fix the failing unit test", lessons=["run the test before editing"], metadata={"user_id": "u1"},
              tags=["ci"])
    j = b.add("deploy the service on friday", outcome="failure", quality=0.1, lessons=["never on friday"])
    assert len(b) == 2 and isinstance(i, int) and i != j
    p = b.get(i)
    assert p is not None and p.text == "fix the failing unit test" and p.outcome == "success"
    assert p.metadata.attributes == {"user_id": "u1"} and p.metadata.tags == ["ci"]
    assert p.lessons == ["run the test before editing"]
    f = b.get(j)
    assert f is not None and f.outcome == "failure" and f.avg_quality == pytest.approx(0.1)
    assert f.confidence == pytest.approx(b.store.config.min_confidence)  # max(quality, min_confidence)
    res = b.search("fix the failing unit test", k=5)
    assert [r.pattern.id for r in res][0] == i and res[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert [r.rank for r in res] == [0, 1] and res[0].score == res[0].similarity
    assert b.update(i, text="repair the broken unit test", metadata={"user_id": "u9", "n": 3}) is True
    q = b.get(i)
    assert q is not None and q.text == "repair the broken unit test" and q.metadata.attributes == {"user_id": "u9", "n": 3}
    assert torch.allclose(q.embedding, b._encode(["repair the broken unit test"])[0])
    assert b.search("repair the broken unit test", k=1)[0].pattern.id == i
    assert b.update(10**12, text="nope") is False
    assert b.remove(j) == 1 and b.remove([j, 10**12]) == 0 and len(b) == 1 and b.get(j) is None


def test_bad_input_names_the_field_and_changes_nothing():
    b = bank()
    b.add("keep me")
    for kw, field in [
        (dict(outcome="meh"), "outcome"), (dict(quality=1.5), "quality"), (dict(lessons="one string"), "lessons"),
        (dict(metadata={"k": [1]}), "metadata"), (dict(metadata={"k": float("nan")}), "metadata"),
        (dict(category="nonsense"), "category"), (dict(tags=[3]), "tags"),
    ]:
        with pytest.raises(ValueError, match=field):
            b.add("x", **kw)
    with pytest.raises(ValueError, match="where"):
        b.search("x", where={"a": {"$regex": "x"}})
    with pytest.raises(ValueError, match="mmr"):
        b.search("x", mmr=0.0)
    with pytest.raises(ValueError, match="since"):
        b.search("x", since="yesterday")
    with pytest.raises(ValueError, match="dedup"):
        b.search("x", dedup="embedding")
    with pytest.raises(ValueError, match="search options"):
        b.search_batch(["x"], 3, colour="red")
    assert len(b) == 1


def test_start_trajectory_with_text_and_store_trajectory_returns_the_id():
    b = bank()
    rec = b.start_trajectory("write a parser for the config format")
    rec.add_step("write code", "needed", StepOutcome.success(), 0.9)
    t = rec.complete(Verdict.success())
    assert t.query_text == "write a parser for the config format"
    t.metadata.user_id, t.metadata.request_type = "alice", "coding"
    t.metadata.attributes["agent"] = "planner"
    pid = b.store_trajectory(t)
    p = b.get(pid)
    assert p is not None and p.text == "write a parser for the config format" and p.outcome == "success"
    assert p.category == PatternCategory.CODE_GENERATION  # "coding" is code (one rule table)
    assert p.metadata.attributes == {"agent": "planner", "user_id": "alice", "request_type": "coding"}
    assert p.source_trajectories == [t.id]


def test_embedder_dimension_is_adopted_by_an_empty_bank_and_refused_by_a_full_one():
    b = ReasoningBank(ReasoningBankConfig(), embedder=HashEmbedder(24))  # default 768, told at construction
    assert b.config.embedding_dim == 24 and b.store.config.embedding_dim == 24
    fn = HashEmbedder(12).encode  # a plain callable: learnt at the first call
    c = ReasoningBank(ReasoningBankConfig(embedding_dim=8), embedder=fn)
    pid = c.add("hello")
    assert c.config.embedding_dim == 12 and c.get(pid).embedding.shape == (12,)
    full = ReasoningBank(ReasoningBankConfig(embedding_dim=8), embedder=HashEmbedder(12).encode)
    full.add(torch.ones(8))
    with pytest.raises(ValueError, match=r"12.*8|8.*12"):
        full.add("hello")
    assert len(full) == 1


def test_without_an_embedder_text_needs_the_text_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if [text] were not installed
    b = ReasoningBank(ReasoningBankConfig(embedding_dim=D))
    b.add(torch.ones(D))  # tensors need no embedder
    with pytest.raises(MissingBackendError, match=r"rbank-torch\[text\]"):
        b.search("anything")
    assert len(b) == 1


def test_overridden_pattern_config_fields_warn():
    pc = PatternStoreConfig(m=8)
    with pytest.warns(UserWarning, match=r"pattern_config.m = 8 is overridden by ReasoningBankConfig.m = 32"):
        b = ReasoningBank(ReasoningBankConfig(embedding_dim=D, pattern_config=pc))
    assert b.store.config.m == 32 and b.config.pattern_config.m == 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ReasoningBank(ReasoningBankConfig(embedding_dim=D, m=8))


# ----------------------------------------------------------------------------- failures kept


def _failed(b: ReasoningBank, text: str):
    rec = b.start_trajectory(text)
    rec.add_step("git push", "ship it", StepOutcome.failure("rejected: non-fast-forward"), 0.4)
    return rec.complete(Verdict.failure(RootCause.tool_failure("git", "push rejected")))


def test_failures_are_kept_as_memories_with_their_lessons():
    b = bank()
    t = _failed(b, "training loss becomes NaN")
    assert t.quality < b.config.min_quality_threshold
    pid = b.store_trajectory(t)
    p = b.get(pid)
    assert p is not None and p.outcome == "failure" and p.text == "training loss becomes NaN"
    assert p.confidence == pytest.approx(max(t.quality, b.store.config.min_confidence))
    assert any(x.startswith("Avoid: git push") for x in p.lessons)
    assert any(x.startswith("Root cause:") and "push rejected" in x for x in p.lessons)
    assert [r.pattern.id for r in b.search("training loss becomes NaN", k=1, outcome="failure")] == [pid]
    off = bank(keep_failures=False)
    assert off.store_trajectory(_failed(off, "training loss becomes NaN")) is None and len(off) == 0
    assert off.stats().failure_count == 1


def test_consolidation_never_merges_across_outcomes():
    b = bank()
    e = torch.nn.functional.normalize(torch.ones(D), dim=0)
    ok = b.add(e, outcome="success")
    bad = b.add(e.clone(), outcome="failure")
    twin = b.add(e.clone(), outcome="success")
    assert b.merge_similar_patterns(0.9) == 1
    assert b.get(ok) is not None and b.get(bad) is not None and b.get(twin) is None
    b.add(e.clone(), outcome="failure")
    b.consolidate()
    assert sorted(p.outcome for p in b.export_patterns()) == ["failure", "success"]


# ----------------------------------------------------------------------------- provenance saved


def test_provenance_round_trips_through_snapshot_and_journal(tmp_path):
    cfg = ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path / "b"))
    b = ReasoningBank(cfg, embedder=HashEmbedder(), journal=True)
    i = b.add("cache invalidation bug", metadata={"user_id": "u1", "score": 2.5, "n": 7, "flag": True},
              tags=["bug"], lessons=["clear the cache"])
    b.store_trajectory(_failed(b, "push to main failed"))
    b.search("cache invalidation bug", k=1, touch=True)
    before = {p.id: p for p in b.export_patterns()}
    b.close()  # one writer per bank
    # the journal alone (never saved) brings everything back
    again = ReasoningBank(ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path / "b")),
                          embedder=HashEmbedder(), journal=True)
    assert {p.id: p for p in again.export_patterns()} == before
    p = again.get(i)
    assert p is not None and p.metadata.attributes == {"user_id": "u1", "score": 2.5, "n": 7, "flag": True}
    assert type(p.metadata.attributes["n"]) is int and type(p.metadata.attributes["flag"]) is bool
    again.save(str(tmp_path / "snap.safetensors"))
    again.close()
    loaded = ReasoningBank.load(str(tmp_path / "snap.safetensors"))
    assert {p.id: p for p in loaded.export_patterns()} == before
    assert sorted(p.outcome for p in loaded.export_patterns()) == ["failure", "success"]
    assert [r.pattern.id for r in loaded.search_similar(before[i].embedding, 1)] == [i]
    assert loaded.search(before[i].embedding, k=2, where={"flag": True})[0].pattern.id == i


def test_touch_updates_last_accessed_and_is_journaled(tmp_path):
    cfg = ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path / "b"))
    b = ReasoningBank(cfg, embedder=HashEmbedder(), journal=True)
    old = utcnow() - timedelta(days=40)
    p = Pattern.new(HashEmbedder().encode(["a"])[0], "general", 0.9)
    p.created_at = p.last_accessed = old
    b.import_patterns([p])
    b.search("a", k=1)
    assert b.get(p.id).last_accessed == old  # a plain search changes nothing
    r = b.search("a", k=1, touch=True)
    assert r[0].pattern.last_accessed > old + timedelta(days=39)
    b.close()
    again = ReasoningBank(ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path / "b")), journal=True)
    assert again.get(p.id).last_accessed == r[0].pattern.last_accessed
    again.close()


# ----------------------------------------------------------------------------- filters on every backend


def _random_bank(backend: str, n: int, seed: int = 0) -> tuple[ReasoningBank, torch.Tensor, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, D, generator=g)
    x = torch.nn.functional.normalize(centres[torch.randint(0, 20, (n,), generator=g)]
                                      + 0.5 * torch.randn(n, D, generator=g), dim=1)
    b = ReasoningBank(ReasoningBankConfig(embedding_dim=D, pattern_config=PatternStoreConfig(
        backend=backend, backend_options={"background": False, **({"nprobe": 16} if backend == "faiss-ivf" else {})})))
    now = utcnow()
    rows = []
    pats = []
    for j in range(n):
        attrs = {"user": f"u{j % 10}", "n": j % 7, "team": ["a", "b", "c"][j % 3]}
        if j % 5 == 0:
            del attrs["team"]
        p = Pattern.new(x[j], ["general", "research", "tool_use"][j % 3], 0.5 + (j % 5) / 10)
        p.avg_quality = (j % 10) / 10
        p.usage_count = j % 4
        p.success_count = 0
        p.created_at = now - timedelta(hours=j % 50)
        p.metadata = PatternMetadata(tags=["even"] if j % 2 == 0 else [], attributes=attrs)
        p.outcome = "failure" if j % 6 == 0 else "success"
        pats.append(p)
    b.store.store_patterns(pats)
    for p in pats:
        rows.append(dict(id=p.id, attrs=p.metadata.attributes, cat=str(p.category), out=p.outcome,
                         tags=p.metadata.tags, created=p.created_at, q=p.avg_quality))
    return b, x, rows


def _reference(x: torch.Tensor, rows: list[dict], q: torch.Tensor, k: int, keep) -> list[int]:
    sims = x @ torch.nn.functional.normalize(q, dim=0)
    cand = [(float(sims[j]), -j, r["id"]) for j, r in enumerate(rows) if keep(r)]
    cand.sort(reverse=True)
    return [c[2] for c in cand[:k]]


FILTERS = [
    (dict(where={"user": "u3"}), lambda r: r["attrs"]["user"] == "u3"),
    (dict(where={"user": {"$in": ["u1", "u2"]}, "n": {"$gte": 3}}),
     lambda r: r["attrs"]["user"] in ("u1", "u2") and r["attrs"]["n"] >= 3),
    (dict(where={"team": "a"}, category=["general", "tool_use"]),
     lambda r: r["attrs"].get("team") == "a" and r["cat"] in ("general", "tool_use")),
    (dict(outcome="failure", tags=["even"]), lambda r: r["out"] == "failure" and "even" in r["tags"]),
    (dict(min_quality=0.5, where={"n": {"$lt": 4}}), lambda r: r["q"] >= 0.5 and r["attrs"]["n"] < 4),
    (dict(outcome="success"), lambda r: r["out"] == "success"),  # wide: the index path with over-fetch
    (dict(where={"nobody": 1}), lambda r: False),
]


@pytest.mark.parametrize("backend", ["exact", "faiss-flat", "faiss-hnsw", "faiss-ivf"])
def test_filters_equal_exact_filtered_search_on_every_backend(backend):
    if backend != "exact":
        pytest.importorskip("faiss")
    b, x, rows = _random_bank(backend, 1500)
    g = torch.Generator().manual_seed(1)
    since = utcnow() - timedelta(hours=20)
    filters = FILTERS + [(dict(since=since), lambda r: r["created"] >= since)]
    recalls: list[float] = []
    for opts, keep in filters:
        matching = sum(keep(r) for r in rows)
        for k in (1, 10, 400):
            q = torch.randn(D, generator=g)
            got = [r.pattern.id for r in b.search(q, k=k, **opts)]
            assert len(got) == min(k, matching), (opts, k)
            ref = _reference(x, rows, q, k, keep)
            if backend in ("exact", "faiss-flat") or 4 * matching <= len(rows) or 4 * k > len(rows):
                # exact backends, selective filters (searched over the matching rows) and large k: exact
                assert got == ref, (opts, k)
            else:  # an approximate index on a wide filter: recall against exact filtered search
                recalls.append(len(set(got) & set(ref)) / len(ref))
            assert all(keep(rows[[r["id"] for r in rows].index(i)]) for i in got)
        s, ids = b.search_batch(torch.randn(3, D, generator=g), 7, **opts)
        assert s.shape == ids.shape == (3, 7)
        assert ((ids >= 0).sum(dim=1) == min(7, matching)).all()
    if recalls:
        print(backend, "recall of wide filters", recalls)
        assert sum(recalls) / len(recalls) >= (0.95 if backend == "faiss-hnsw" else 0.9)


@pytest.mark.parametrize("backend", ["faiss-hnsw", "faiss-ivf"])
def test_large_k_returns_min_k_live_on_approximate_indexes(backend):
    pytest.importorskip("faiss")
    b, x, rows = _random_bank(backend, 3000, seed=2)
    b.remove([r["id"] for r in rows[:200]])
    for k in (1500, 2800, 5000):
        s, ids = b.search_similar_batch(x[:2], k)
        assert ((ids >= 0).sum(dim=1) == min(k, 2800)).all()
        assert len(b.search_similar(x[0], k)) == min(k, 2800)


# ----------------------------------------------------------------------------- scoring, MMR, dedup


def test_retrieval_scoring_matches_its_formula():
    b, x, rows = _random_bank("exact", 300, seed=3)
    sc = RetrievalScoring(similarity=0.7, recency=0.5, half_life_secs=3600 * 10, quality=0.3, usage=0.2)
    q = torch.randn(D, generator=torch.Generator().manual_seed(4))
    res = b.search(q, k=12, scoring=sc)
    qn = torch.nn.functional.normalize(q, dim=0)
    now = utcnow()
    pats = {p.id: p for p in b.export_patterns()}
    max_u = max(p.usage_count for p in pats.values())

    def score(p):
        age = (now - p.created_at).total_seconds()
        return (0.7 * float(p.embedding @ qn) + 0.5 * 2 ** (-age / 36000) + 0.3 * p.avg_quality
                + 0.2 * math.log1p(p.usage_count) / math.log1p(max_u))

    ref = sorted(pats.values(), key=lambda p: -score(p))[:12]
    assert [r.pattern.id for r in res] == [p.id for p in ref]
    for r in res:
        assert r.score == pytest.approx(score(pats[r.pattern.id]), abs=1e-4)
        assert r.similarity == pytest.approx(float(pats[r.pattern.id].embedding @ qn), abs=1e-5)
    assert [r.pattern.id for r in b.search(q, k=5, scoring=RetrievalScoring())] == \
        [r.pattern.id for r in b.search(q, k=5)]


def test_mmr_matches_a_greedy_reference_and_diversifies():
    b = bank()
    base = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(0)), dim=0)
    g = torch.Generator().manual_seed(5)
    for j in range(60):
        b.add(torch.nn.functional.normalize(base + (0.05 if j < 30 else 1.5) * torch.randn(D, generator=g), dim=0))
    plain = b.search(base, k=5)
    lam = 0.5
    div = b.search(base, k=5, mmr=lam)
    pats = [r.pattern for r in b.search(base, k=50)]
    E = torch.nn.functional.normalize(torch.stack([p.embedding for p in pats]), dim=1)
    s = E @ base
    picked: list[int] = []
    for _ in range(5):
        best, arg = -math.inf, -1
        for c in range(len(pats)):
            if c in picked:
                continue
            red = max((float(E[c] @ E[j]) for j in picked), default=0.0)
            v = lam * float(s[c]) - (1 - lam) * red
            if v > best:
                best, arg = v, c
        picked.append(arg)
    assert [r.pattern.id for r in div] == [pats[c].id for c in picked]
    assert [r.rank for r in div] == list(range(5))

    def spread(rs):
        e = torch.stack([r.pattern.embedding for r in rs])
        return float((e @ e.T).triu(1).sum())

    assert spread(div) < spread(plain)


def test_dedup_text_keeps_one_result_per_text():
    b = bank()
    for _ in range(30):
        b.add("give me three ideas for a team offsite")
    b.add("plan the team offsite")
    b.add("book a venue for the offsite")
    res = b.search("give me three ideas for a team offsite", k=3, dedup="text")
    texts = [r.pattern.text for r in res]
    assert len(texts) == 3 and len(set(texts)) == 3
    assert texts[0] == "give me three ideas for a team offsite"
    assert len(b.search("give me three ideas for a team offsite", k=10, dedup="text")) == 3


def test_format_memories_cuts_at_a_whole_memory():
    b = bank()
    b.add("first memory", lessons=["lesson one"])
    b.add("second memory", outcome="failure", lessons=["do not do this"])
    res = b.search("first memory", k=2)
    full = format_memories(res)
    assert full.startswith("1. [success] first memory\n   - lesson one")
    assert "2. [failure" in full and "do not do this" in full
    first = full.split("\n2. ")[0]
    assert format_memories(res, max_chars=len(first)) == first
    assert format_memories(res, max_chars=len(first) - 1) == ""
    assert format_memories([r.pattern for r in res]) == full
    with pytest.raises(ValueError, match="max_chars"):
        format_memories(res, max_chars=-1)


# ----------------------------------------------------------------------------- one category rule table


def test_the_sample_log_has_coding_patterns():
    from rbank_torch.distillation import infer_category
    from rbank_torch.logs import read_log

    trajectories = read_log(ROOT / "examples" / "sample_log.jsonl", embed=HashEmbedder().encode)
    coding = [t for t in trajectories if (t.metadata.request_type or "") == "coding"]
    assert len(coding) >= 50
    assert all(str(Pattern.infer_category(t)) == "code_generation" for t in coding)
    # distillation puts the verdict first, then the same table
    plain = [t for t in coding if t.verdict.kind.name not in ("FAILURE", "RECOVERED")]
    assert plain and all(str(infer_category(t)) == "code_generation" for t in plain)
    b = bank()
    for t in trajectories:
        b.store_trajectory(t)
    assert b.pattern_stats().by_category.get("code_generation", 0) >= 50


# ----------------------------------------------------------------------------- the command line shows provenance


@pytest.mark.slow
def test_cli_search_stats_and_report_show_provenance(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sentence_transformers")
    from rbank_torch.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bank_path = tmp_path / "bank.safetensors"
    assert main(["ingest", str(ROOT / "examples" / "sample_log.jsonl"), "--bank", str(bank_path), "-q"]) == 0
    capsys.readouterr()
    q = "my unit tests fail after a refactor"
    assert main(["search", "--bank", str(bank_path), q, "-k", "3", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.count("memory: ") == 3 and "3 of 240 patterns" in out
    assert main(["search", "--bank", str(bank_path), q, "-k", "4", "-q", "--outcome", "failure",
                 "--where", "request_type=coding"]) == 0
    out = capsys.readouterr().out
    assert out.count("(failed: avoid)") == 4 and out.count("lesson: Root cause:") == 4
    assert main(["search", "--bank", str(bank_path), q, "--where", "oops"]) == 2
    assert main(["stats", "--bank", str(bank_path), "-q"]) == 0
    assert "memories of successes 213, of failures 27" in capsys.readouterr().out
    report = tmp_path / "r.html"
    assert main(["report", "--bank", str(bank_path), "--out", str(report), "--top", "5", "-q"]) == 0
    html = report.read_text(encoding="utf-8")
    assert "<th>memory</th>" in html
    loaded = ReasoningBank.load(str(bank_path))
    texts = {p.text for p in loaded.export_patterns()}
    assert None not in texts and sum(t in html for t in texts) >= 3


def test_a_changed_ef_search_takes_effect_at_the_next_search():
    pytest.importorskip("faiss")
    b, x, rows = _random_bank("faiss-hnsw", 1200, seed=7)
    q = x[:20] + 0.3
    b.search_similar_batch(q, 10)
    ix = b.store.search_backend._ix
    assert ix.params_cache[2] == b.store.config.ef_search
    b.store.config.ef_search = 321
    b.search_similar_batch(q, 10)
    assert ix.params_cache[1].efSearch == 321


def test_text_category_reads_whole_words():
    from rbank_torch.categories import text_category

    assert text_category("Write code for the parser.") == "code_generation"
    assert text_category("analyze the quarterly numbers") == "research"
    assert text_category("decode the message, then rewrite it") == "general"  # words, not substrings
    assert text_category("let's chat about the plan") == "conversational"
    assert text_category("the logic is odd") == "general"  # reasoning comes from tags, not free text
    assert text_category("the logic is odd", tags=["logic"]) == "reasoning"
    assert text_category("anything", request_type="coding") == "code_generation"
