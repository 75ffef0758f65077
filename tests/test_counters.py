"""Counters add up verdicts across batches, by reason."""

from __future__ import annotations

from pipeline.batch import Batch, Verdict
from workers.counters import Counters


def test_counts_by_reason_across_batches() -> None:
    c = Counters()
    b = Batch.for_packets([b"\x45" + bytes(19)] * 5)
    b.meta["verdict"][:5] = [Verdict.PASS, Verdict.REPLAY, Verdict.REPLAY, Verdict.INTEGRITY,
                             Verdict.PASS]
    c.add(b)
    c.add(b)
    assert c.passed == 4
    assert c.drops() == {"replay": 4, "integrity": 2}
    assert c.snapshot() == {"batches": 2, "passed": 4, "drops": {"replay": 4, "integrity": 2}}


def test_slots_beyond_count_are_not_counted() -> None:
    c = Counters()
    b = Batch(8)
    b.load([bytes(20)] * 3)
    b.meta["verdict"][3:] = Verdict.RUNT  # stale slots from an earlier, larger batch
    c.add(b)
    assert c.passed == 3 and c.drops() == {}
