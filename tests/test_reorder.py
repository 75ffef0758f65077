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


def test_a_dead_workers_batches_are_skipped_at_once_and_counted() -> None:
    r = Reassembler(SaTable(), timeout=10.0)
    out: list[int] = []
    for i in (0, 1, 2, 3):
        r.sent(i, 5)
    r.push(batch(1), Direction.OUTBOUND, 0.0)
    r.lost(0)
    r.lost(2)  # the last batches before the death: no later batch reveals the gap
    r.pop(0.0, lambda b, d: out.append(b.batch_id))
    assert out == [1] and r.skipped == 2 and r.lost_packets == 10 and r.next_id == 3
    assert r.outstanding() == 1  # 3 is out at a live worker: waited for
    r.push(batch(3), Direction.OUTBOUND, 0.1)
    r.pop(0.1, lambda b, d: out.append(b.batch_id))
    assert out == [1, 3] and r.outstanding() == 0


def test_a_batch_that_comes_back_after_its_turn_is_refused() -> None:
    r = Reassembler(SaTable(), timeout=0.5)
    r.sent(0, 1)
    r.sent(1, 1)
    assert r.push(batch(1), Direction.OUTBOUND, 0.0)
    r.pop(0.6, lambda b, d: None)  # 0 skipped after the timeout
    assert r.skipped == 1
    assert not r.push(batch(0), Direction.OUTBOUND, 0.7)  # the caller keeps its buffer
    r.sent(2, 1)
    r.lost(2)
    assert not r.push(batch(2), Direction.OUTBOUND, 0.8)  # declared lost: never released


def test_idle_is_told_per_direction() -> None:
    """A batch out at a worker or held keeps its own direction busy, not the other one, until
    it is released or skipped; a batch sent without a direction keeps both busy."""
    r = Reassembler(SaTable(), timeout=1.0)
    assert r.idle() and r.idle(Direction.INBOUND) and r.idle(Direction.OUTBOUND)
    r.sent(0, 2, Direction.INBOUND)
    r.push(batch(1), Direction.OUTBOUND, 0.0)  # done, waiting for batch 0
    assert not r.idle() and not r.idle(Direction.INBOUND) and not r.idle(Direction.OUTBOUND)
    r.sent(2, 2, Direction.INBOUND)
    r.push(batch(0), Direction.INBOUND, 0.0)
    out: list[int] = []
    r.pop(0.0, lambda b, d: out.append(b.batch_id))
    assert out == [0, 1]
    assert r.idle(Direction.OUTBOUND) and not r.idle(Direction.INBOUND) and not r.idle()
    r.lost(2)
    r.pop(0.0, lambda b, d: out.append(b.batch_id))  # skipped: its worker died
    assert r.idle() and r.idle(Direction.INBOUND) and r.skipped == 1
    r.sent(3, 1)  # direction not told
    assert not r.idle(Direction.INBOUND) and not r.idle(Direction.OUTBOUND)
    r.push(batch(3), Direction.OUTBOUND, 0.0)
    r.pop(0.0, lambda b, d: out.append(b.batch_id))
    assert out == [0, 1, 3] and r.idle(Direction.INBOUND) and r.idle(Direction.OUTBOUND)
