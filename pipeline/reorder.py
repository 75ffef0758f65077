"""The reassembler: batches back in order, and the inbound replay windows committed (DESIGN §4).

Workers finish batches in any order; the reassembler releases them strictly by batch id, so
each SA's sequence numbers leave in the order they were issued and a peer with a small replay
window sees no reordering. A batch whose worker died is declared :meth:`lost` by the data
plane, which knows which worker held which batch, and is skipped as soon as its turn comes; a
batch that merely does not come back (a hung worker) is skipped once ``timeout`` has passed
since a later batch arrived. Both are counted; their sequence numbers are never reused, so
the peer merely sees a gap.

For inbound batches the window of each SA moves here, in order, for the packets the worker
verified (RFC 4303 §3.4.3): a duplicate that slipped past the dispatcher's pre-check because
both copies were in flight at once is caught now.

The order that matters is per direction: an outbound batch's sequence numbers are its SAs'
alone, an inbound batch moves only inbound windows. :meth:`idle` answers per direction, so
that packets the I/O process sends at once (pipeline/onepacket.py) may pass batches of the
other direction, never one of their own.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.batch import Batch, Verdict
from pipeline.transport import Direction
from workers.sa import SaTable, by_sa

__all__ = ["Reassembler"]


class Reassembler:
    """``timeout``: how long a missing batch is waited for while its worker lives (a busy
    worker's batch is late, not lost: skipping it would drop it when it comes)."""

    def __init__(self, sas: SaTable, timeout: float = 1.0) -> None:
        self.sas = sas
        self.timeout = timeout
        self.next_id = 0
        self._held: dict[int, tuple[Batch, Direction]] = {}
        self._lost: set[int] = set()  # ids whose worker died with them
        self._waiting_since: float | None = None  # when a later batch first made us wait
        self.skipped = 0  # batches given up on
        self.lost_packets = 0  # the packets they held
        self.emitted = 0
        self._sizes: dict[int, int] = {}
        # Every batch sent or held, until released or skipped: its direction (None: not
        # told), and how many of each there are.
        self._pending: dict[int, Direction | None] = {}
        self._busy: dict[Direction | None, int] = {Direction.INBOUND: 0, Direction.OUTBOUND: 0,
                                                   None: 0}

    def sent(self, batch_id: int, count: int, direction: Direction | None = None) -> None:
        """The dispatcher sent this batch to a worker: if it never returns, ``count``
        packets are lost."""
        self._sizes[batch_id] = count
        self._track(batch_id, direction)

    def _track(self, batch_id: int, direction: Direction | None) -> None:
        if batch_id not in self._pending:
            self._pending[batch_id] = direction
            self._busy[direction] += 1

    def _untrack(self, batch_id: int) -> None:
        if batch_id in self._pending:
            self._busy[self._pending.pop(batch_id)] -= 1

    def push(self, batch: Batch, direction: Direction, now: float) -> bool:
        """Take a finished batch; False if its turn has passed (skipped: its packets are
        dropped, counted as lost) and the caller keeps the buffer."""
        if batch.batch_id < self.next_id or batch.batch_id in self._lost:
            return False
        self._held[batch.batch_id] = (batch, direction)
        self._track(batch.batch_id, direction)
        if batch.batch_id != self.next_id and self._waiting_since is None:
            self._waiting_since = now
        return True

    def lost(self, batch_id: int) -> None:
        """The worker holding this batch died: skip it, without waiting, when its turn comes."""
        if batch_id >= self.next_id and batch_id not in self._held:
            self._lost.add(batch_id)

    def pop(self, now: float, release: Callable[[Batch, Direction], None]) -> None:
        """Release every batch that is next in order, skipping a lost one at once and a
        missing one after the timeout; ``release`` gets each in order (and may reuse the
        buffer afterwards)."""
        while True:
            held = self._held.pop(self.next_id, None)
            if held is not None:
                batch, direction = held
                self._sizes.pop(self.next_id, None)
                self._untrack(self.next_id)
                if direction is Direction.INBOUND:
                    self._commit(batch)
                self.next_id += 1
                self.emitted += 1
                self._waiting_since = now if self._held else None
                release(batch, direction)
                continue
            if self.next_id in self._lost:
                self._lost.discard(self.next_id)
                self._skip()
                continue
            if not self._held:
                self._waiting_since = None
                return
            if self._waiting_since is not None and now - self._waiting_since >= self.timeout:
                self._skip()
                self._waiting_since = now
                continue
            return

    def _skip(self) -> None:
        self.skipped += 1
        self.lost_packets += self._sizes.pop(self.next_id, 0)
        self._untrack(self.next_id)
        self.next_id += 1

    def idle(self, direction: Direction | None = None) -> bool:
        """Nothing in flight and nothing held (of ``direction``, and of no direction told):
        a packet sent now overtakes no batch (of its direction)."""
        if direction is None:
            return not self._pending
        return not self._busy[direction] and not self._busy[None]

    def outstanding(self) -> int:
        """Batches sent to workers and neither released nor given up on yet."""
        return len(self._sizes)

    def _commit(self, batch: Batch) -> None:
        """Move each SA's window for the packets its worker verified, in batch order."""
        n = batch.count
        meta = batch.meta
        verdict = meta["verdict"][:n]
        passing = verdict == Verdict.PASS
        if not np.count_nonzero(passing):
            return
        seq, length = meta["seq"][:n], meta["length"][:n]
        for key, sel, _ in by_sa(meta["sa"][:n], passing):
            sa = self.sas[key]
            if sa is None:
                continue
            at = np.arange(n)[sel]  # the packets' positions, in batch order
            replay = sa.replay.commit(seq[at], None)
            if np.count_nonzero(replay):
                verdict[at[replay]] = Verdict.REPLAY
                at = at[~replay]
            sa.packets += at.size
            sa.bytes += int(length[at].sum())
