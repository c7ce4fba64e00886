"""Clear errors: hostile or foreign inputs raise a ValueError family error naming the field or the file."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rbank_torch import (
    Pattern,
    PatternStore,
    PatternStoreConfig,
    ReasoningBank,
    ReasoningBankConfig,
    StepOutcome,
    Verdict,
)
from rbank_torch.journal import JournalError, decode_payload
from rbank_torch.snapshot import SnapshotError, _crc, read_snapshot, write_snapshot

D = 4


def _saved_bank(tmp_path):
    bank = ReasoningBank(ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path)))
    rec = bank.start_trajectory(torch.randn(D))
    rec.add_step("search", "r", StepOutcome.success(), 0.9)
    bank.store_trajectory(rec.complete(Verdict.success()))
    path = tmp_path / "bank.safetensors"
    bank.save(str(path))
    return bank, path


def _write_raw(path, tensors, meta_json: str, fmt="rbank_torch.bank"):
    crcs = {k: _crc(t) for k, t in tensors.items()}
    crcs["@meta"] = zlib.crc32(meta_json.encode())
    save_file(tensors, str(path), metadata={"rbank.format": fmt, "rbank.version": "1", "rbank.meta": meta_json,
                                            "rbank.crc32": json.dumps(crcs)})


def test_deeply_nested_snapshot_metadata_is_a_snapshot_error(tmp_path):
    _bank, path = _saved_bank(tmp_path)
    tensors, meta = read_snapshot(path, "rbank_torch.bank")
    doc = json.dumps(meta)
    nested = doc[:-1] + ', "x": ' + "[" * 200_000 + "]" * 200_000 + "}"
    _write_raw(path, tensors, nested)
    with pytest.raises(SnapshotError, match="nested too deeply"):
        ReasoningBank.load(str(path))


def test_deeply_nested_journal_record_is_a_journal_error():
    from safetensors.torch import save

    blob = save({"_": torch.zeros(0, dtype=torch.uint8)}, metadata={"rbank.record": "[" * 200_000 + "]" * 200_000})
    with pytest.raises(JournalError):
        decode_payload(blob)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch can use CUDA: the bank loads there")
def test_cuda_snapshot_loads_on_cpu_with_a_warning(tmp_path):
    bank, path = _saved_bank(tmp_path)
    tensors, meta = read_snapshot(path, "rbank_torch.bank")
    meta["config"]["device"] = "cuda"
    meta["config"]["pattern_config"]["device"] = "cuda"
    meta["store"]["config"]["device"] = "cuda"
    write_snapshot(path, "rbank_torch.bank", tensors, meta)
    with pytest.warns(RuntimeWarning, match="cannot use"):
        loaded = ReasoningBank.load(str(path))
    assert loaded.config.device == "cpu" and loaded.store.device.type == "cpu"
    assert [p.id for p in loaded.export_patterns()] == [p.id for p in bank.export_patterns()]


def test_meta_device_in_a_snapshot_or_config_is_refused(tmp_path):
    _bank, path = _saved_bank(tmp_path)
    tensors, meta = read_snapshot(path, "rbank_torch.bank")
    meta["config"]["device"] = "meta"
    write_snapshot(path, "rbank_torch.bank", tensors, meta)
    with pytest.raises(SnapshotError, match="meta"):
        ReasoningBank.load(str(path))
    with pytest.raises(ValueError, match="meta"):
        ReasoningBank(ReasoningBankConfig(embedding_dim=D, device="meta"))
    with pytest.raises(ValueError, match="meta"):
        PatternStore(PatternStoreConfig(embedding_dim=D, device="meta"))


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.eye(D)[0].to_sparse(), "dense"),
        (torch.empty(D, device="meta"), "meta"),
        (np.array(["a", "b", "c", "d"]), "dtype <U1"),
        (np.array([1, 2, 3, 4], dtype=object), "dtype object"),
    ],
    ids=["sparse", "meta", "numpy-str", "numpy-object"],
)
def test_unusable_embeddings_name_the_field(bad, match):
    store = PatternStore(PatternStoreConfig(embedding_dim=D))
    p = Pattern.new(torch.randn(D), "general", 0.9)
    p.embedding = bad
    with pytest.raises(ValueError, match=f"embedding.*{match}"):
        store.store_pattern(p)
    with pytest.raises(ValueError, match=f"query.*{match}"):
        store.search_similar(bad, 2)
    bank = ReasoningBank(ReasoningBankConfig(embedding_dim=D))
    with pytest.raises(ValueError, match=f"query_embedding.*{match}"):
        bank.start_trajectory(bad)
    assert len(store) == 0


# ---------------------------------------------------------------------- log reader strictness
from rbank_torch.logs import LogFormatError, read_log  # noqa: E402

_STEP = '"steps": [{"action": "a", "outcome": "success", "confidence": 0.9}], "verdict": "success"'


def _read(tmp_path, text: str, fast: bool = True, name: str = "log.jsonl"):
    f = tmp_path / name
    f.write_text(text)
    return read_log([str(f)], fast=fast)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "slow"])
@pytest.mark.parametrize("num", ["+1", ".5", "1.", "01", "true", "-", "1e"])
def test_non_json_numbers_in_embeddings_are_bad_lines(tmp_path, fast, num):
    line = '{"query_embedding": [0.1, ' + num + ', 0.3, 0.4], ' + _STEP + "}\n"
    with pytest.raises(LogFormatError) as ei:
        _read(tmp_path, line, fast=fast)
    assert ei.value.line == 1 and (ei.value.field or "").startswith("query_embedding") or "JSON" in str(ei.value)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "slow"])
def test_json_numbers_still_read_on_both_paths(tmp_path, fast):
    line = '{"query_embedding": [0.1, -2, 3e-2, 0, 1E+2], ' + _STEP + "}\n"
    (t,) = _read(tmp_path, line, fast=fast)
    assert t.query_embedding.tolist() == pytest.approx([0.1, -2.0, 0.03, 0.0, 100.0])


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "slow"])
def test_duplicate_embedding_key_is_a_bad_line_on_both_paths(tmp_path, fast):
    line = '{"query_embedding": [0.1, 0.2], "query_embedding": null, ' + _STEP + "}\n"
    with pytest.raises(LogFormatError, match="given twice") as ei:
        _read(tmp_path, line, fast=fast)
    assert ei.value.line == 1


@pytest.mark.parametrize("bad", ['{"type": "ToolFailure", "tool": 5, "error": "x"}',
                                 '{"type": "ToolFailure", "tool": "t", "error": ["x"]}',
                                 '{"type": 3, "details": "x"}'])
def test_wrong_typed_root_cause_fields_are_refused(tmp_path, bad):
    line = '{"query_embedding": [0.1, 0.2], "steps": [], "verdict": {"kind": "failure", "cause": ' + bad + "}}\n"
    with pytest.raises(LogFormatError) as ei:
        _read(tmp_path, line)
    assert (ei.value.field or "").startswith("verdict.cause.")


def test_duplicate_record_id_is_a_bad_line(tmp_path):
    line = '{"id": 7, "query_embedding": [0.1, 0.2], ' + _STEP + "}\n"
    other = '{"id": 8, "query_embedding": [0.1, 0.2], ' + _STEP + "}\n"
    (tmp_path / "a.jsonl").write_text(line + other)
    (tmp_path / "b.jsonl").write_text(line)
    with pytest.raises(LogFormatError, match="already used by the record at") as ei:
        read_log([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")])
    assert ei.value.path.endswith("b.jsonl") and ei.value.line == 1 and ei.value.field == "id"
    errors: list[LogFormatError] = []
    ts = read_log([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], skip_bad=True, on_error=errors.append)
    assert [t.id for t in ts] == [7, 8] and len(errors) == 1


def test_corrupt_gzip_mid_file_names_the_file_and_line(tmp_path):
    import gzip

    good = '{"query_embedding": [0.1, 0.2], ' + _STEP + "}\n"
    blob = gzip.compress((good * 20000).encode())
    path = tmp_path / "log.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])  # truncated stream
    with pytest.raises(LogFormatError, match="unreadable data") as ei:
        read_log([str(path)])
    assert ei.value.path == str(path) and ei.value.line > 1
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0xFF
    path.write_bytes(bytes(bad))
    with pytest.raises(LogFormatError) as ei:
        read_log([str(path)])
    assert ei.value.path == str(path)


def test_corrupt_parquet_mid_file_names_the_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    n = 4000
    table = pa.table({"query_embedding": [[float(i), 1.0] for i in range(n)],
                      "verdict": ["success"] * n})
    path = tmp_path / "log.parquet"
    pq.write_table(table, path, row_group_size=500)
    blob = bytearray(path.read_bytes())
    for i in range(len(blob) // 2, len(blob) // 2 + 2000):
        blob[i] ^= 0x5A
    path.write_bytes(bytes(blob))
    with pytest.raises(LogFormatError) as ei:
        read_log([str(path)], chunk_size=500)
    assert ei.value.path == str(path)


def test_log_times_and_latencies_out_of_range_keep_file_line_field(tmp_path):
    line = '{"query_embedding": [0.1, 0.2], "started_at": 1e300, ' + _STEP + "}\n"
    with pytest.raises(LogFormatError) as ei:
        _read(tmp_path, line)
    assert ei.value.field == "started_at" and ei.value.line == 1
    line = '{"query_embedding": [0.1, 0.2], "total_latency_ms": 9007199254740991, ' + _STEP + "}\n"
    with pytest.raises(LogFormatError) as ei:
        _read(tmp_path, line)
    assert ei.value.field == "total_latency_ms"


def test_deeply_nested_ewc_header_is_a_value_error(tmp_path):
    from safetensors import safe_open

    from rbank_torch.ewc import EWCPlusPlus

    ewc = EWCPlusPlus(torch.nn.Linear(2, 2))
    path = tmp_path / "ewc.safetensors"
    ewc.save(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["config"] = "[" * 200_000 + "]" * 200_000
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="config"):
        EWCPlusPlus(torch.nn.Linear(2, 2)).load(str(path))


def test_every_error_of_a_bad_line_is_reported(tmp_path):
    line = ('{"query_embedding": [0.1, 0.2], "steps": [{"action": "a", "outcome": "success", "confidence": 1.7}, '
            '{"action": 5, "outcome": "success", "confidence": 0.5}], "verdict": {"kind": "won"}, '
            '"lessons": [3], "colour": "red"}\n')
    with pytest.raises(LogFormatError) as ei:
        _read(tmp_path, line)
    msg = str(ei.value)
    assert ei.value.line == 1
    for fld in ("colour", "steps[0].confidence", "steps[1].action", "verdict.kind", "lessons[0]"):
        assert fld in msg, (fld, msg)
    assert msg.count("colour") == 1  # the first error is not repeated
