"""The reassembler on its own: order, bounded waits, giving up on a dead worker's batches."""

from __future__ import annotations

from pipeline.batch import Batch
from pipeline.reorder import Reassembler
from pipeline.transport import Direction
from workers.sa import SaTable


def batch(batch_id: int, n: int = 2) -> Batch:
    b = Batch(4)
    b.load([bytes([batch_id]) * 20] * n)
    b.batch_id = batch_id
    return b


def test_releases_strictly_in_batch_order() -> None:
    r = Reassembler(SaTable(), timeout=1.0)
    out: list[int] = []
    for i in (0, 1, 2):
        r.sent(i, 2)
    r.push(batch(2), Direction.OUTBOUND, 0.0)
    r.push(batch(1), Direction.OUTBOUND, 0.0)
    r.pop(0.1, lambda b, d: out.append(b.batch_id))
    assert out == []  # 0 is still out
    r.push(batch(0), Direction.OUTBOUND, 0.2)
    r.pop(0.2, lambda b, d: out.append(b.batch_id))
    assert out == [0, 1, 2] and r.outstanding() == 0 and r.skipped == 0


def test_a_missing_batch_is_skipped_after_the_timeout_and_counted() -> None:
    r = Reassembler(SaTable(), timeout=0.5)
    out: list[int] = []
    for i in (0, 1):
        r.sent(i, 3)
    r.push(batch(1), Direction.OUTBOUND, 0.0)
    r.pop(0.4, lambda b, d: out.append(b.batch_id))
    assert out == []
    r.pop(0.6, lambda b, d: out.append(b.batch_id))
    assert out == [1] and r.skipped == 1 and r.lost_packets == 3
    r.push(batch(0), Direction.OUTBOUND, 0.7)  # too late: dropped, never released
    r.pop(0.7, lambda b, d: out.append(b.batch_id))
    assert out == [1]


def test_give_up_counts_the_last_batches_of_a_dead_worker() -> None:
    r = Reassembler(SaTable(), timeout=10.0)
    out: list[int] = []
    for i in (0, 1, 2):
        r.sent(i, 5)
    r.push(batch(1), Direction.OUTBOUND, 0.0)
    r.give_up(3, lambda b, d: out.append(b.batch_id))
    assert out == [1] and r.skipped == 2 and r.lost_packets == 10 and r.outstanding() == 0
    assert r.next_id == 3


def test_after_a_worker_died_its_batches_are_given_up_within_the_lost_timeout() -> None:
    r = Reassembler(SaTable(), timeout=10.0, lost_timeout=0.05)
    out: list[int] = []
    for i in (0, 1):
        r.sent(i, 4)
    r.worker_lost(2, now=1.0)
    r.pop(1.01, lambda b, d: out.append(b.batch_id))
    assert r.outstanding() == 2  # still within the short wait
    r.pop(1.1, lambda b, d: out.append(b.batch_id))
    assert r.outstanding() == 0 and r.skipped == 2 and r.lost_packets == 8
    # Later batches are waited for with the normal (long) timeout again.
    r.sent(2, 1)
    r.sent(3, 1)
    r.push(batch(3), Direction.OUTBOUND, 1.2)
    r.pop(2.0, lambda b, d: out.append(b.batch_id))
    assert out == [] and r.skipped == 2
