"""Hostile files: truncated, bit-flipped, oversized-header, wrong-dtype, wrong-shape, foreign, random and
pickled snapshots, and journals with bad checksums or malformed records.

Every load either raises :class:`SnapshotError` / :class:`JournalError` (a ``ValueError``) or, for a
mutation that changes nothing the file guarantees (a torn journal tail), yields a state the bank really
was in. Loads are bounded in time and memory, and nothing on the load path unpickles or runs code: the
pickle machinery and ``torch.load`` are patched to fail for every test of this file.
"""

from __future__ import annotations

import os
import pickle
import random
import resource
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

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
from rbank_torch import snapshot as snapshot_mod
from rbank_torch.journal import _FILE_HDR, _HDR, Journal, JournalError, encode_payload
from rbank_torch.snapshot import SnapshotError, read_snapshot, write_snapshot

D = 8
FMT = "rbank_torch.bank"
#: every single load must finish within this many seconds and this much extra Python memory
MAX_LOAD_S = 5.0
MAX_LOAD_BYTES = 64 << 20


class _CodeExecuted(AssertionError):
    pass


@pytest.fixture(autouse=True)
def no_code_execution(monkeypatch):
    """Any unpickling or torch.load on the load path fails the test."""

    def boom(*_a, **_k):
        raise _CodeExecuted("the load path unpickled or torch.load-ed data")

    class _NoUnpickler:
        def __init__(self, *_a, **_k):
            boom()

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "Unpickler", _NoUnpickler)
    monkeypatch.setattr(torch, "load", boom)


def _cfg(folder: Path) -> ReasoningBankConfig:
    return ReasoningBankConfig(embedding_dim=D, storage_path=str(folder),
                               pattern_config=PatternStoreConfig(backend="exact"))


def _state(bank: ReasoningBank):
    return (
        [(p.id, p.usage_count, p.lessons, p.embedding.tolist()) for p in bank.export_patterns()],
        [(t.id, t.quality, t.lessons, [s.action for s in t.steps]) for t in bank.trajectories],
        bank.stats(),
    )


def _fill(bank: ReasoningBank, g: torch.Generator, n: int, states: list | None = None) -> None:
    for i in range(n):
        rec = bank.start_trajectory(torch.randn(D, generator=g))
        rec.add_step("schritt ✓ 🚀", "", StepOutcome.success(), 0.8)
        rec.add_lesson(f"lesson {i} — ünïcode")
        bank.store_trajectory(rec.complete(Verdict.success()))
        if states is not None:
            states.append(_state(bank))
    ids = [p.id for p in bank.export_patterns()]
    bank.record_usage(ids[0], True, 0.5)
    if states is not None:
        states.append(_state(bank))


@pytest.fixture(scope="module")
def good_snapshot(tmp_path_factory) -> tuple[Path, tuple]:
    folder = tmp_path_factory.mktemp("good")
    bank = ReasoningBank(_cfg(folder))
    _fill(bank, torch.Generator().manual_seed(0), 6)
    bank.consolidate()
    bank.save()
    return folder / "bank.safetensors", _state(bank)


#: hostile inputs loaded by this module (printed at the end with ``pytest -s``)
FUZZED = [0]


@pytest.fixture(scope="module", autouse=True)
def _report_count():
    yield
    print(f"\nhostile inputs loaded: {FUZZED[0]}")


def _bounded(fn):
    """Run ``fn`` (a load) checking time and Python-heap growth; returns its result or the exception."""
    FUZZED[0] += 1
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - classified by the caller
        out = e
    finally:
        elapsed = time.perf_counter() - t0
        _cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert not isinstance(out, _CodeExecuted), out
    assert elapsed < MAX_LOAD_S, f"load took {elapsed:.2f}s"
    assert peak < MAX_LOAD_BYTES, f"load allocated {peak / 2**20:.1f} MiB"
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0  # KiB on Linux
    assert grew < 512 * 1024, f"peak resident memory grew by {grew / 1024:.0f} MiB"
    return out


def _expect_snapshot_error(path: Path, loader=None) -> SnapshotError:
    out = _bounded(lambda: (loader or ReasoningBank.load)(str(path)))
    assert isinstance(out, SnapshotError), f"{path.name}: expected SnapshotError, got {out!r}"
    return out


# ---------------------------------------------------------------------------------------------- bytes
def test_truncated_snapshots(good_snapshot, tmp_path):
    src, _ = good_snapshot
    blob = src.read_bytes()
    cuts = sorted({0, 1, 7, 8, 9, 20, len(blob) - 1, len(blob) - 8} | set(range(0, len(blob), len(blob) // 60)))
    for cut in cuts:
        if cut >= len(blob):
            continue
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(blob[:cut])
        _expect_snapshot_error(p)
    assert len(cuts) >= 60


def test_bit_flipped_snapshots(good_snapshot, tmp_path):
    src, expected = good_snapshot
    blob = bytearray(src.read_bytes())
    rng = random.Random(0)
    n_hdr = int.from_bytes(blob[:8], "little")
    # every bit of the length prefix, flips all over the header, and flips in the tensor data
    positions = [(i, b) for i in range(8) for b in range(8)]
    positions += [(rng.randrange(8, 8 + n_hdr), rng.randrange(8)) for _ in range(150)]
    positions += [(rng.randrange(8 + n_hdr, len(blob)), rng.randrange(8)) for _ in range(100)]
    errors = 0
    p = tmp_path / "flip.safetensors"
    for pos, bit in positions:
        bad = bytearray(blob)
        bad[pos] ^= 1 << bit
        p.write_bytes(bytes(bad))
        out = _bounded(lambda: ReasoningBank.load(str(p)))
        if isinstance(out, ReasoningBank):
            # a flip the format cannot see (e.g. in JSON whitespace) must leave the content intact
            assert _state(out) == expected, f"flip at byte {pos} bit {bit} loaded a different bank"
        else:
            assert isinstance(out, SnapshotError), f"flip at byte {pos} bit {bit}: {out!r}"
            errors += 1
    assert errors >= len(positions) - 5  # data flips are always caught by the CRCs


def test_oversized_and_lying_headers(good_snapshot, tmp_path, monkeypatch):
    src, _ = good_snapshot
    blob = src.read_bytes()
    n_hdr = int.from_bytes(blob[:8], "little")
    for fake in (2**63 - 1, 2**40, len(blob), n_hdr + 1, 0):
        p = tmp_path / f"hdr{fake}.safetensors"
        p.write_bytes(fake.to_bytes(8, "little") + blob[8:])
        _expect_snapshot_error(p)
    # a header larger than the limit is refused before it is parsed
    monkeypatch.setattr(snapshot_mod, "MAX_HEADER_BYTES", n_hdr - 1)
    err = _expect_snapshot_error(src)
    assert "header length" in str(err)
    monkeypatch.undo()
    # a header claiming a tensor far larger than the file
    p = tmp_path / "huge_tensor.safetensors"
    hdr = b'{"x":{"dtype":"F32","shape":[1000000000,1000],"data_offsets":[0,4000000000000]}}'
    p.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 64)
    _expect_snapshot_error(p)


def test_random_bytes_empty_and_missing_files(tmp_path):
    rng = random.Random(1)
    for i in range(40):
        p = tmp_path / f"rand{i}.safetensors"
        size = rng.choice([1, 7, 8, 9, 100, 4096, 100_000])
        data = bytearray(rng.randbytes(size))
        if i % 4 == 0 and size > 9:  # a plausible length prefix and an opening brace
            data[:8] = (size - 8).to_bytes(8, "little")
            data[8] = ord("{")
        p.write_bytes(bytes(data))
        _expect_snapshot_error(p)
        _expect_snapshot_error(p, PatternStore.load)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _expect_snapshot_error(empty)
    _expect_snapshot_error(tmp_path / "missing.safetensors")
    _expect_snapshot_error(tmp_path)  # a folder


def test_pickle_files_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    # a hand-written protocol-0 pickle that would create ``marker`` when unpickled
    evil = b"cbuiltins\nopen\n(S'" + str(marker).encode() + b"'\nS'w'\ntR."
    for name, data in (("evil.safetensors", evil), ("evil.pt", evil), ("zip.pt", b"PK\x03\x04" + evil)):
        p = tmp_path / name
        p.write_bytes(data)
        _expect_snapshot_error(p)
        _expect_snapshot_error(p, PatternStore.load)
    assert not marker.exists()


def test_foreign_safetensors(good_snapshot, tmp_path):
    plain = tmp_path / "model.safetensors"
    save_file({"weight": torch.randn(4, 4)}, str(plain))
    assert "rbank.format" in str(_expect_snapshot_error(plain))
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.randn(4, 4)}, str(other), metadata={"rbank.format": "someone.else"})
    _expect_snapshot_error(other)
    store_file = tmp_path / "store.safetensors"
    PatternStore(PatternStoreConfig(embedding_dim=D)).save(str(store_file))
    _expect_snapshot_error(store_file)  # a store snapshot is not a bank snapshot
    _expect_snapshot_error(good_snapshot[0], PatternStore.load)  # and vice versa
    newer = tmp_path / "newer.safetensors"
    tensors, meta = read_snapshot(good_snapshot[0], FMT)
    write_snapshot(newer, FMT, tensors, meta)
    blob = newer.read_bytes().replace(b'"rbank.version":"1"', b'"rbank.version":"9"')
    newer.write_bytes(blob)
    assert "version" in str(_expect_snapshot_error(newer))


# ---------------------------------------------------------------------------------------------- content
_OTHER_DTYPE = {
    torch.float32: torch.float64, torch.float64: torch.float32, torch.int64: torch.int32,
    torch.int32: torch.int64, torch.uint8: torch.int16, torch.int8: torch.int16,
}


def _variants(t: torch.Tensor):
    yield "dtype", t.to(_OTHER_DTYPE[t.dtype])
    yield "longer", torch.cat([t.flatten(), torch.zeros(1, dtype=t.dtype)])
    if t.dim() == 2:
        yield "transposed", t.T.contiguous() if t.shape[0] != t.shape[1] else t[:, :-1].contiguous()
        yield "flat", t.flatten()
    else:
        yield "2d", t.reshape(1, -1)
    if t.numel():
        yield "shorter", t.flatten()[:-1].contiguous()
        yield "empty", t.flatten()[:0].contiguous()


def test_wrong_dtype_shape_and_missing_tensors(good_snapshot, tmp_path):
    """Files with valid checksums but tensors of the wrong dtype or shape, or missing ones."""
    tensors, meta = read_snapshot(good_snapshot[0], FMT)
    p = tmp_path / "bad.safetensors"
    tried = loaded = 0
    for name, t in tensors.items():
        cases = [(kind, v) for kind, v in _variants(t)] + [("missing", None)]
        for kind, v in cases:
            bad = dict(tensors)
            if v is None:
                del bad[name]
            else:
                bad[name] = v
            write_snapshot(p, FMT, bad, meta)
            out = _bounded(lambda: ReasoningBank.load(str(p)))
            # a change to data nothing refers to (an empty table, an unused offset) may load: the bank
            # must then be exactly the saved one
            if isinstance(out, ReasoningBank):
                assert _state(out) == good_snapshot[1], f"{name} {kind} loaded a different bank"
                loaded += 1
            else:
                assert isinstance(out, SnapshotError), f"{name} {kind}: {out!r}"
            tried += 1
    assert tried >= 100 and loaded <= tried // 5


_JUNK = [None, "x", -1, 2**70, 1.5, [], {}, [1, "a"], {"a": None}, True, float("1e308")]


def _meta_paths(meta, prefix=()):
    for k, v in meta.items():
        yield prefix + (k,)
        if isinstance(v, dict) and len(prefix) < 2:
            yield from _meta_paths(v, prefix + (k,))


def test_fuzzed_metadata_documents(good_snapshot, tmp_path):
    """Valid checksums, hostile JSON: every field replaced by junk of every type, or deleted."""
    import copy

    tensors, meta = read_snapshot(good_snapshot[0], FMT)
    p = tmp_path / "meta.safetensors"
    tried = loaded = 0
    for path in _meta_paths(meta):
        for junk in [*_JUNK, "<delete>"]:
            m = copy.deepcopy(meta)
            node = m
            for k in path[:-1]:
                node = node[k]
            if junk == "<delete>":
                del node[path[-1]]
            else:
                node[path[-1]] = junk
            write_snapshot(p, FMT, tensors, m)
            out = _bounded(lambda: ReasoningBank.load(str(p)))
            tried += 1
            if isinstance(out, ReasoningBank):
                loaded += 1  # a field with a default or a tolerant type: it must still be a working bank
                out.search_similar(torch.ones(D), 3)
                out.stats()
            else:
                assert isinstance(out, SnapshotError), f"{path} = {junk!r}: {out!r}"
    assert tried >= 200 and loaded < tried


# ---------------------------------------------------------------------------------------------- journals
@pytest.fixture(scope="module")
def good_journal(tmp_path_factory):
    """A journal of several records (no snapshot) and the bank state after each record."""
    folder = tmp_path_factory.mktemp("journal")
    bank = ReasoningBank(_cfg(folder), journal=True)
    states = [_state(bank)]
    _fill(bank, torch.Generator().manual_seed(1), 5, states)
    n = bank.journal.last_seq
    bank.close()
    assert n == len(states) - 1
    return folder, states


def _open_copy(good_journal, tmp_path, data: bytes):
    folder, _states = good_journal
    dst = tmp_path / "j"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir()
    (dst / "bank.journal").write_bytes(data)
    return _bounded(lambda: ReasoningBank(_cfg(dst), journal=True))


def _record_offsets(blob: bytes) -> list[tuple[int, int]]:
    """(start, end) of each record of a journal file."""
    out, off = [], _FILE_HDR.size
    while off < len(blob):
        _m, _seq, length, _crc = _HDR.unpack(blob[off : off + _HDR.size])
        out.append((off, off + _HDR.size + length))
        off += _HDR.size + length
    return out


def test_journal_bit_flips_raise_or_drop_only_the_torn_tail(good_journal, tmp_path):
    folder, states = good_journal
    blob = (folder / "bank.journal").read_bytes()
    recs = _record_offsets(blob)
    rng = random.Random(4)
    positions = [rng.randrange(len(blob)) for _ in range(120)] + list(range(_FILE_HDR.size))
    for pos in positions:
        bad = bytearray(blob)
        bad[pos] ^= 1 << rng.randrange(8)
        out = _open_copy(good_journal, tmp_path, bytes(bad))
        in_last = pos >= recs[-1][0]
        if isinstance(out, ReasoningBank):
            # only damage in the last record may be read as a torn write: that record alone is dropped
            assert in_last, f"flip at byte {pos} (not in the last record) was accepted"
            assert _state(out) == states[-2]
            out.close()
        else:
            assert isinstance(out, JournalError), f"flip at byte {pos}: {out!r}"


def test_journal_truncated_anywhere_replays_a_prefix(good_journal, tmp_path):
    folder, states = good_journal
    blob = (folder / "bank.journal").read_bytes()
    ends = [e for _s, e in _record_offsets(blob)]
    for cut in range(_FILE_HDR.size, len(blob), max(1, len(blob) // 50)):
        out = _open_copy(good_journal, tmp_path, blob[:cut])
        assert isinstance(out, ReasoningBank), f"cut at {cut}: {out!r}"
        complete = sum(1 for e in ends if e <= cut)
        assert _state(out) == states[complete]
        assert out.journal.records_dropped == int(cut not in ends and cut > _FILE_HDR.size)
        out.close()
    for cut in range(0, _FILE_HDR.size):  # the file header itself torn: not a journal
        out = _open_copy(good_journal, tmp_path, blob[:cut])
        if cut == 0:
            assert isinstance(out, ReasoningBank) and _state(out) == states[0]  # empty file = new journal
            out.close()
        else:
            assert isinstance(out, JournalError), f"cut at {cut}: {out!r}"


def _raw_record(seq: int, payload: bytes) -> bytes:
    from rbank_torch.journal import REC_MAGIC, _crc

    return _HDR.pack(REC_MAGIC, seq, len(payload), _crc(seq, len(payload), payload)) + payload


def test_journal_records_with_valid_checksums_but_hostile_content(good_journal, tmp_path):
    """A correct CRC proves nothing about the content: bad payloads and bad records raise JournalError."""
    folder, _states = good_journal
    blob = (folder / "bank.journal").read_bytes()
    first_end = _record_offsets(blob)[0][1]
    head = blob[:first_end]
    marker = tmp_path / "pwned"
    evil = b"cbuiltins\nopen\n(S'" + str(marker).encode() + b"'\nS'w'\ntR."
    meta_ok = {"op": "x", "stats": {}, "patterns": [], "del": [], "traj": []}
    payloads = [
        evil,
        os.urandom(200),
        b"\xff" * 8 + b"{}",
        encode_payload({"op": "x"}),  # missing fields
        encode_payload(dict(meta_ok, patterns=[[1, 2, 3]]), {"p/emb": torch.zeros(1, D)}),
        encode_payload(dict(meta_ok, patterns=[[0] * 16]), {"p/emb": torch.zeros(2, D)}),  # count mismatch
        encode_payload(dict(meta_ok, traj=[{"kind": "add", "meta": {"count": 5}}])),
        encode_payload(dict(meta_ok, stats={"total_trajectories": "many", "last_distillation": "x"})),
        encode_payload(dict(meta_ok, **{"del": "all"})),
        encode_payload(dict(meta_ok, stats={"last_consolidation": 2**70})),
        encode_payload(dict(meta_ok, traj=[{"kind": "add", "meta": {"count": 0}}])),  # tensors missing
        encode_payload(["not", "an", "object"]),  # type: ignore[arg-type]
    ]
    bad_pattern = encode_payload(
        dict(meta_ok, patterns=[[7, "u", "general", 0.9, 1, 1, 0.5, 0, 0, [], [], [], [], "s", 1, {}]]),
        {"p/emb": torch.full((1, D), float("nan"))},
    )
    payloads.append(bad_pattern)
    for i, payload in enumerate(payloads):
        # followed by a good record, so the bad one cannot pass for a torn tail
        data = head + _raw_record(2, payload) + _raw_record(3, encode_payload(meta_ok))
        out = _open_copy(good_journal, tmp_path, data)
        assert isinstance(out, JournalError), f"payload {i}: {out!r}"
    # sequence numbers going backwards, a foreign file header, a record claiming 2 GiB
    data = head + _raw_record(1, encode_payload(meta_ok)) + _raw_record(5, encode_payload(meta_ok))
    assert isinstance(_open_copy(good_journal, tmp_path, data), JournalError)
    assert isinstance(_open_copy(good_journal, tmp_path, b"RBJ9" + blob[4:]), JournalError)
    assert isinstance(_open_copy(good_journal, tmp_path, os.urandom(5000)), JournalError)
    huge = head + struct.pack("<4sQII", b"RJ\x00\x00", 2, 2**31 - 1, 0) + b"\0" * 100 + _raw_record(
        3, encode_payload(meta_ok))
    assert isinstance(_open_copy(good_journal, tmp_path, huge), JournalError)
    assert not marker.exists()


def test_journal_of_another_snapshot_is_refused(good_journal, tmp_path):
    """A journal continuing a newer snapshot than the one loaded: records are missing, so it raises."""
    folder = tmp_path / "b"
    bank = ReasoningBank(_cfg(folder), journal=True)
    _fill(bank, torch.Generator().manual_seed(2), 2)
    bank.save(str(folder / "old.safetensors"))
    _fill(bank, torch.Generator().manual_seed(3), 2)
    bank.save()
    bank.close()
    with Journal(folder / "bank.journal") as j:
        assert j._base_seq() > 0
    out = _bounded(lambda: ReasoningBank.load(str(folder / "old.safetensors"), journal=True))
    assert isinstance(out, JournalError), out


def test_pattern_import_from_hostile_objects_is_validated():
    """Patterns built from hostile values are refused by name, not stored half-way."""
    bank = ReasoningBank(_cfg(Path("/nonexistent-unused")))
    bad = [Pattern.new(torch.ones(D), "general", 0.9) for _ in range(4)]
    bad[0].embedding = torch.full((D,), float("nan"))
    bad[1].embedding = torch.ones(D + 1)
    bad[2].usage_count = -3
    bad[3].confidence = float("inf")
    assert bank.import_patterns(bad) == 0
    assert len(bank.store) == 0
