"""Integers are bounded where they enter: a value an int64 column (or the id counter) cannot hold is a
``ValueError`` naming the field, and nothing accepted before it is lost."""

from __future__ import annotations

import json

import pytest
import torch

from rbank_torch import (
    Pattern,
    PatternStore,
    PatternStoreConfig,
    ReasoningBank,
    ReasoningBankConfig,
    StepOutcome,
    Verdict,
    _util,
)
from rbank_torch.logs import LogFormatError, read_log

D = 4


def _p(**kw):
    p = Pattern.new(torch.randn(D), "general", 0.9)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


@pytest.mark.parametrize(
    "field,value",
    [("usage_count", 2**63), ("success_count", 2**63), ("id", 2**63), ("id", 10**30), ("usage_count", -1),
     ("source_trajectories", [2**64]), ("id", True)],
)
def test_out_of_range_integer_is_refused_and_staged_patterns_survive(tmp_path, field, value):
    store = PatternStore(PatternStoreConfig(embedding_dim=D))
    good = [store.store_pattern(_p()) for _ in range(3)]  # staged, not yet written to the columns
    bad = _p(**{field: value})
    if field == "success_count":
        bad.usage_count = 2**63 - 1
    with pytest.raises(ValueError, match=field.split("_trajectories")[0]):
        store.store_pattern(bad)
    assert len(store) == 3 and sorted(p.id for p in store.get_all_patterns()) == sorted(good)
    assert len(store.search_similar(torch.randn(D), 10)) == 3  # reading flushes the staged rows
    store.save(str(tmp_path / "s.safetensors"))
    assert sorted(p.id for p in PatternStore.load(str(tmp_path / "s.safetensors")).get_all_patterns()) == sorted(good)


def test_int64_maximum_is_accepted_and_round_trips(tmp_path):
    store = PatternStore(PatternStoreConfig(embedding_dim=D))
    pid = store.store_pattern(_p(usage_count=2**63 - 1, success_count=2**63 - 1))
    store.save(str(tmp_path / "s.safetensors"))
    p = PatternStore.load(str(tmp_path / "s.safetensors")).get_pattern(pid)
    assert p is not None and p.usage_count == 2**63 - 1 and p.success_count == 2**63 - 1


def test_import_patterns_skips_the_bad_ones(tmp_path):
    bank = ReasoningBank(ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path)), journal=True)
    good = [_p() for _ in range(3)]
    batch = [good[0], _p(usage_count=2**63), good[1], _p(id=2**64), good[2], _p(success_count=10**30)]
    assert bank.import_patterns(batch) == 3
    assert sorted(p.id for p in bank.export_patterns()) == sorted(p.id for p in good)
    bank.close()
    again = ReasoningBank(ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path)), journal=True)
    assert sorted(p.id for p in again.export_patterns()) == sorted(p.id for p in good)
    again.close()


def test_trajectory_id_out_of_range_changes_nothing(tmp_path):
    bank = ReasoningBank(ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path)))
    rec = bank.start_trajectory(torch.randn(D))
    rec.add_step("search", "r", StepOutcome.success(), 0.9)
    t = rec.complete(Verdict.success())
    t.id = 2**63
    with pytest.raises(ValueError, match="trajectory id"):
        bank.store_trajectory(t)
    assert bank.stats().total_trajectories == 0 and len(bank.store) == 0


def test_id_counter_refuses_to_pass_int64(monkeypatch):
    monkeypatch.setattr(_util, "_id_last", 0)
    monkeypatch.setattr(_util, "_id_counter", iter(()))
    _util.bump_id_counter(2**63 - 1)
    with pytest.raises(ValueError, match="no id left"):
        _util.next_id()


def _line(rid):
    return json.dumps({"id": rid, "query_embedding": [0.1, 0.2, 0.3, 0.4],
                       "steps": [{"action": "a", "outcome": "success", "confidence": 0.9}], "verdict": "success"})


@pytest.mark.parametrize("rid", [2**63 - 1, 10**30, 2**53])
def test_log_record_id_out_of_range_names_file_line_and_field(tmp_path, rid):
    f = tmp_path / "log.jsonl"
    f.write_text(_line(1) + "\n" + _line(rid) + "\n" + _line(3) + "\n")
    with pytest.raises(LogFormatError) as ei:
        read_log([str(f)])
    assert ei.value.line == 2 and ei.value.field == "id" and str(ei.value).startswith(f"{f}:2: id:")
    errors: list[LogFormatError] = []
    ts = read_log([str(f)], skip_bad=True, on_error=errors.append)
    assert [t.id for t in ts] == [1, 3] and len(errors) == 1  # the other lines are read


def test_parquet_uint64_id_names_the_field(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [json.loads(_line(1)), json.loads(_line(1))]
    table = pa.table({
        "id": pa.array([1, 2**64 - 1], type=pa.uint64()),
        "query_embedding": [r["query_embedding"] for r in rows],
        "steps": [r["steps"] for r in rows],
        "verdict": [r["verdict"] for r in rows],
    })
    path = tmp_path / "log.parquet"
    pq.write_table(table, path)
    with pytest.raises(LogFormatError) as ei:
        read_log([str(path)])
    assert ei.value.field == "id" and ei.value.line == 2


@pytest.mark.parametrize("field,value", [("latency_ms", 1e300), ("timestamp", 1e300), ("timestamp", -1e15)])
def test_log_step_numbers_out_of_range_name_the_field(tmp_path, field, value):
    rec = json.loads(_line(1))
    rec["steps"][0][field] = value
    f = tmp_path / "log.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    with pytest.raises(LogFormatError) as ei:
        read_log([str(f)])
    assert ei.value.line == 1 and ei.value.field == f"steps[0].{field}"


def test_log_started_at_out_of_range_names_the_field(tmp_path):
    rec = json.loads(_line(1))
    rec["started_at"] = "9999-12-31T23:59:59-05:00"
    f = tmp_path / "log.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    with pytest.raises(LogFormatError) as ei:
        read_log([str(f)])
    assert ei.value.field == "started_at"


# ---------------------------------------------------------------------- strings: whatever is accepted saves
@pytest.mark.parametrize(
    "field,value,match",
    [
        ("lessons", ["ok", "bad \ud800 surrogate"], r"lessons\[1\].*surrogate"),
        ("example_actions", ["\udfff"], r"example_actions\[0\].*surrogate"),
        ("category", "custom:\ud800", "category.*surrogate"),
        ("category", "custom:" + "x" * 200, "category.*at most 128"),
        ("lessons", ["x" * (64 * 1024 + 1)], r"lessons\[0\].*at most 65536"),
        ("lessons", ["l"] * 5000, "lessons has 5000 entries"),
        ("lessons", ["y" * 60_000] * 80, "at most 4194304"),
    ],
)
def test_unsaveable_strings_are_refused_at_the_boundary(tmp_path, field, value, match):
    from rbank_torch import PatternCategory

    bank = ReasoningBank(ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path)), journal=True)
    keep = _p(lessons=["é ok 😀"])
    bank.store.store_pattern(keep)
    bad = _p()
    if field == "category":
        with pytest.raises(ValueError, match=match):
            bad.category = PatternCategory.parse(value)
            bank.store.store_pattern(bad)
    else:
        setattr(bad, field, value)
        with pytest.raises(ValueError, match=match):
            bank.store.store_pattern(bad)
        assert bank.import_patterns([bad]) == 0
    bank.save()  # never fails after a refused pattern
    bank.close()
    again = ReasoningBank.load(str(tmp_path / "bank.safetensors"), journal=True)
    assert [p.id for p in again.export_patterns()] == [keep.id]
    assert again.export_patterns()[0].lessons == ["é ok 😀"]
    again.close()


def test_strings_at_the_caps_save_and_reload(tmp_path):
    from rbank_torch import PatternCategory

    bank = ReasoningBank(ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path)), journal=True)
    p = _p(lessons=["é" * (32 * 1024)] * 60, example_actions=["a" * 1000] * 10)
    p.category = PatternCategory.parse("custom:" + "c" * (128 - 7))
    p.metadata.attributes = {"k" * 100: "v" * 60_000}
    bank.store.store_pattern(p)
    bank.close()  # reopen from the journal alone
    again = ReasoningBank(ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path)), journal=True)
    got = again.store.get_pattern(p.id)
    assert got is not None and got.lessons == p.lessons and str(got.category) == str(p.category)
    again.save()
    again.close()
    loaded = ReasoningBank.load(str(tmp_path / "bank.safetensors"))
    assert loaded.store.get_pattern(p.id).metadata.attributes == {"k" * 100: "v" * 60_000}


# ---------------------------------------------------------------------- bounded time and memory
def test_huge_k_is_capped_by_the_live_count():
    store = PatternStore(PatternStoreConfig(embedding_dim=D))
    ids = {store.store_pattern(_p()) for _ in range(5)}
    s, i = store.search_similar_batch(torch.randn(3, D), 2**31)
    assert s.shape == (3, 5) and i.shape == (3, 5)  # no [3, 2**31] allocation
    assert all(set(row) == ids for row in i.tolist())
    assert len(store.search_similar(torch.randn(D), 2**62)) == 5
    s, i = store.search_similar_batch(torch.randn(2, D), 8)  # a small k is still padded as documented
    assert s.shape == (2, 8) and (i[:, 5:] == -1).all()


def test_hostile_journal_opens_in_linear_time(tmp_path, monkeypatch):
    """A torn first record followed by record headers whose lengths all reach the end of the file: telling
    a torn tail from mid-file damage used to checksum the rest of the file once per header (quadratic)."""
    import struct

    from rbank_torch import journal as jmod

    head = jmod._pack_file_header(0, None)
    body = bytearray(struct.pack("<4sQII", b"RJ\x00\x00", 1, 2**30, 0))  # torn: runs past the end
    step = 512
    pos = len(head) + len(body)
    size = pos + ((1 << 20) // step) * step  # the file's size: every header's length reaches exactly its end
    while pos + step <= size:
        chunk = bytearray(step)
        chunk[: jmod._HDR.size] = struct.pack("<4sQII", b"RJ\x00\x00", 2, size - pos - jmod._HDR.size, 12345)
        body += chunk
        pos += step
    path = tmp_path / "bank.journal"
    path.write_bytes(head + bytes(body))
    crc_bytes = [0]
    real_crc = jmod._crc

    def counting_crc(seq, length, payload):
        crc_bytes[0] += len(payload)
        return real_crc(seq, length, payload)

    monkeypatch.setattr(jmod, "_crc", counting_crc)
    from rbank_torch.journal import JournalError

    with pytest.raises(JournalError, match="corrupt journal"):
        jmod.Journal(path)
    n = path.stat().st_size
    assert crc_bytes[0] <= 3 * n + (1 << 20), f"checksummed {crc_bytes[0]} bytes of a {n}-byte file"
    assert path.read_bytes()[: len(head)] == head  # refused, the file untouched


def test_overlong_log_line_is_a_bad_line_read_in_bounded_chunks(tmp_path, monkeypatch):
    import gzip

    from rbank_torch import logs

    monkeypatch.setattr(logs, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(logs, "_SKIP_CHUNK", 4096)
    long_line = json.dumps(dict(json.loads(_line(2)), lessons=["x" * 200_000]))
    path = tmp_path / "log.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(_line(1) + "\n" + long_line + "\n" + _line(3) + "\n")
    with pytest.raises(LogFormatError) as ei:
        read_log([str(path)])
    assert ei.value.line == 2 and "at most 1000" in str(ei.value) and str(ei.value).startswith(f"{path}:2:")
    sizes: list[int] = []
    real_open = logs._open_text

    def spying_open(p):
        fh = real_open(p)
        real_readline = fh.readline

        def readline(limit=-1):
            out = real_readline(limit)
            sizes.append(len(out))
            return out

        fh.readline = readline
        return fh

    monkeypatch.setattr(logs, "_open_text", spying_open)
    errors: list[LogFormatError] = []
    ts = read_log([str(path)], skip_bad=True, on_error=errors.append)
    assert [t.id for t in ts] == [1, 3] and [e.line for e in errors] == [2]
    assert max(sizes) <= 4096  # never the whole 200 KB line at once


def test_overlong_query_text_names_the_field(tmp_path, monkeypatch):
    from rbank_torch import logs

    monkeypatch.setattr(logs, "MAX_QUERY_CHARS", 50)
    rec = dict(json.loads(_line(1)), query="q" * 51)
    f = tmp_path / "log.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    with pytest.raises(LogFormatError) as ei:
        read_log([str(f)])
    assert ei.value.field == "query" and ei.value.line == 1
