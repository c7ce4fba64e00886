"""Write-ahead journal: replay after a crash, after a snapshot, torn tails, corruption."""

from __future__ import annotations

import pytest
import torch

from rbank_torch import Pattern, ReasoningBank, ReasoningBankConfig, RootCause, StepOutcome, Verdict
from rbank_torch.journal import Journal, JournalError

D = 8


def _traj(bank, g, verdict=None):
    rec = bank.start_trajectory(torch.randn(D, generator=g))
    rec.add_step("search", "r", StepOutcome.success(), 0.9)
    rec.add_lesson("lesson")
    return rec.complete(verdict or Verdict.success())


def _state(bank):
    return (
        bank.export_patterns(),
        [(t.id, t.quality, t.lessons, [s.action for s in t.steps]) for t in bank.trajectories],
        bank.stats(),
    )


def _workload(bank, g, n=12):
    for i in range(n):
        bank.store_trajectory(_traj(bank, g, None if i % 3 else Verdict.failure(RootCause.unknown("x"))))
    ids = [p.id for p in bank.export_patterns()]
    bank.record_usage(ids[0], True, 0.2)
    bank.store.store_pattern(Pattern.new(torch.randn(D, generator=g), "research", 0.8))  # direct store call
    bank.store.remove_pattern(ids[1])
    twin = Pattern.new(bank.store.get_pattern(ids[2]).embedding * 3, "general", 0.9)
    twin.usage_count = 2
    bank.import_patterns([twin])
    bank.merge_similar_patterns(0.999)
    bank.prune_low_quality(0.0)


@pytest.mark.parametrize("fsync", ["always", "batch", "off"])
def test_replay_after_crash_without_snapshot(tmp_path, fsync):
    cfg = ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path))
    bank = ReasoningBank(cfg, journal=True, fsync=fsync)
    _workload(bank, torch.Generator().manual_seed(0))
    expected = _state(bank)
    # a crash: the object is gone without save() or close(); every record reached the OS
    del bank
    again = ReasoningBank(cfg, journal=True)
    assert _state(again) == expected
    assert again.replayed_records >= 12


def test_consolidation_state_is_journaled(tmp_path):
    """λ, the Fisher table and the consolidator's counters come back after a crash, not only the patterns."""
    cfg = ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path))
    bank = ReasoningBank(cfg, journal=True)
    g = torch.Generator().manual_seed(7)
    _workload(bank, g)
    cons = bank._get_consolidator()
    ids = [p.id for p in bank.export_patterns()]
    cons.update_fisher(ids[:3], torch.rand(3, D, generator=g))
    result = bank.consolidate()
    expected = (_state(bank), cons.lambda_, cons.stats(), {i: cons.fisher(i) for i in ids})
    del bank, cons  # a crash: no save(), no close()
    again = ReasoningBank(cfg, journal=True)
    c2 = again._consolidator
    assert c2 is not None and _state(again) == expected[0]
    assert c2.lambda_ == expected[1] and c2.stats() == expected[2]
    assert c2.stats().consolidation_count == 1 and result.patterns_after == len(again.store)
    for i, f in expected[3].items():
        got = c2.fisher(i)
        assert (got is None) == (f is None)
        if f is not None:
            assert torch.equal(got.diagonal, f.diagonal) and got.sample_count == f.sample_count


def test_snapshot_then_journal(tmp_path):
    cfg = ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path))
    g = torch.Generator().manual_seed(1)
    bank = ReasoningBank(cfg, journal=True)
    _workload(bank, g)
    bank.save()
    assert sum(1 for _ in bank.journal.records()) == 0  # compacted into the snapshot
    for _ in range(5):
        bank.store_trajectory(_traj(bank, g))
    expected = _state(bank)
    bank.close()
    again = ReasoningBank.load(str(tmp_path / "bank.safetensors"), journal=True)
    assert again.replayed_records == 5
    assert _state(again) == expected
    # without the journal only the snapshot's state comes back
    snap_only = ReasoningBank.load(str(tmp_path / "bank.safetensors"))
    assert len(snap_only.trajectories) == len(expected[1]) - 5


def test_stale_journal_records_are_not_replayed_twice(tmp_path):
    """A crash between the snapshot and the journal reset leaves old records: they are skipped by seq."""
    cfg = ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path))
    g = torch.Generator().manual_seed(2)
    bank = ReasoningBank(cfg, journal=True)
    for _ in range(4):
        bank.store_trajectory(_traj(bank, g))
    journal_bytes = (tmp_path / "bank.journal").read_bytes()
    bank.save()
    bank.close()  # one writer per bank: the next one opens after this one is closed
    (tmp_path / "bank.journal").write_bytes(journal_bytes)  # as if the reset never happened
    again = ReasoningBank.load(str(tmp_path / "bank.safetensors"), journal=True)
    assert again.replayed_records == 0 and len(again.trajectories) == 4


def test_torn_tail_dropped_never_half_applied(tmp_path):
    cfg = ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path))
    g = torch.Generator().manual_seed(3)
    bank = ReasoningBank(cfg, journal=True)
    for _ in range(6):
        bank.store_trajectory(_traj(bank, g))
    bank.close()
    five = None
    path = tmp_path / "bank.journal"
    data = path.read_bytes()
    j = Journal(path)
    offsets = []
    for _seq, _payload, end in j._iter_raw(tolerate_tail=False):
        offsets.append(end)
    j.close()
    five = offsets[4]
    for cut in (five + 3, five + 25, len(data) - 1):
        path.write_bytes(data[:cut])
        again = ReasoningBank(cfg, journal=True)
        assert len(again.trajectories) == 5 and again.stats().total_trajectories == 5
        assert again.journal.records_dropped == 1
        again.close()
        assert path.stat().st_size == five  # the torn bytes were cut off


def test_corruption_mid_file_raises(tmp_path):
    cfg = ReasoningBankConfig(embedding_dim=D, storage_path=str(tmp_path))
    g = torch.Generator().manual_seed(4)
    bank = ReasoningBank(cfg, journal=True)
    for _ in range(4):
        bank.store_trajectory(_traj(bank, g))
    bank.close()
    path = tmp_path / "bank.journal"
    data = bytearray(path.read_bytes())
    data[40] ^= 0x55  # inside the first record
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="corrupt journal"):
        ReasoningBank(cfg, journal=True)
    path.write_bytes(b"not a journal at all")
    with pytest.raises(JournalError, match="not an rbank_torch journal"):
        ReasoningBank(cfg, journal=True)


def test_journal_validation():
    with pytest.raises(ValueError, match="fsync"):
        Journal("/tmp/x.journal", fsync="sometimes")
