"""An RX ring pair that is quick when traffic is sparse and cheap when it is heavy.

TPACKET_V3 hands packets over in blocks, each retired when full or after its block timeout
(``retire_blk_tov_ms``, 1 ms at the least). Heavy traffic fills blocks: one wake-up and one
status check for hundreds of packets, and packets the workers read in place
(pipeline/region.py). Sparse traffic waits for the timeout: each ESP packet in up to 1 ms.
On the 2-core lab a ping through two gateways took 1.9-2.8 ms with V3 against 1.1-1.4 ms
with TPACKET_V2, which wakes the reader per frame (bench/tunnel.py ``--ring``); at high rates
that is a wake-up per packet, and every frame is copied.

:class:`RxPair` keeps one of each on the interface, both members of one fanout group of mode
PACKET_FANOUT_CBPF (an id the kernel picks, PACKET_FANOUT_FLAG_UNIQUEID). The group's classic
BPF program is one instruction, ``ret #0`` (the V2 ring, the first member) or ``ret #1`` (the
V3 ring): every packet goes to exactly one of them, and the reader moves the traffic with
PACKET_FANOUT_DATA.

**When.** From the packets read per window of time:

* sparse -> bulk: ``BULK_PACKETS`` (32) within ``BULK_WINDOW_S`` (10 ms), 3 200 packets/s,
  or as many in one read (a backlog);
* bulk -> sparse: fewer than ``SPARSE_PACKETS`` (25) in a ``SPARSE_WINDOW_S`` (50 ms)
  window, 500 packets/s; or when the reader's poll times out ``IDLE_MOVE_S`` (20 ms) after
  the last packet (:meth:`RxPair.idle`), so that traffic that stops moves back before the
  next packet comes.

The gap between the two rates keeps a steady flow from flapping.

**Order.** Packets leave the pair in the order they arrived. PACKET_FANOUT_DATA returns only
after an RCU grace period (the kernel's ``synchronize_net``: the old program is freed; 6-13
ms on the lab VM), and the kernel's receive path runs under RCU, so by then every packet the
old program steered is in the old ring. A helper thread makes that call (through ctypes, so
that the GIL is free meanwhile): the reader's loop goes on, inside traffic included, reading
only the old ring. Then it empties the old ring before it reads the new one:

* to bulk: the V2 frames are all there;
* to sparse: the V3 block the kernel was filling comes with its block timeout (often
  already, after the grace period). If nothing comes within two block timeouts and
  ``DRAIN_MARGIN_S``, the pair gives up on it and counts ``drain_timeouts``.

**One fd.** The reader polls :meth:`RxPair.fileno`, an epoll set that holds the ring it may
read now (the old one, during a move and until it is empty; else the one in use) and an
eventfd that the move thread writes when the swap is done (and a timer at the drain
deadline). A readable ring the pair must not read yet is not in the set, so the loop neither
spins on it nor blocks.

Only for ESP from outside, where a pair of rings on one interface is the whole reader; an
interface spread over several I/O processes (hash fanout) uses one ring version each.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline import bpf
from pipeline.afpacket import (
    PACKET_FANOUT_CBPF,
    PACKET_FANOUT_FLAG_UNIQUEID,
    RxRing,
)
from pipeline.batch import Batch
from pipeline.region import HEAD, SharedRegion

__all__ = ["RxPair", "v2_frame_size"]

BULK_PACKETS = 32
BULK_WINDOW_S = 0.010
SPARSE_PACKETS = 25
SPARSE_WINDOW_S = 0.050
IDLE_MOVE_S = 0.020  # no packet for this long, and the reader idle: back to V2 (idle())
DRAIN_MARGIN_S = 0.020
SPARSE, BULK = 0, 1  # fanout member indexes: the order the rings join
_STEER = {m: (bpf.Insn(bpf.BPF_RET | bpf.BPF_K, 0, 0, m),) for m in (SPARSE, BULK)}

Reader = Callable[[RxRing, int | None], int]


def v2_frame_size(mtu: int) -> int:
    """A TPACKET_V2 frame for an IP packet of ``mtu`` bytes: the frame header, the
    sockaddr_ll, an Ethernet header (and a VLAN tag) fit in 128 bytes; a power of two, so
    that frames tile the ring's blocks."""
    size = 2048
    while size < mtu + 128:
        size *= 2
    return size


class RxPair:
    """A TPACKET_V2 ring for sparse traffic and a TPACKET_V3 ring for bulk, on ``ifname``,
    read as one :class:`~pipeline.afpacket.RxRing`. ``bpf_program`` filters both; ``mtu``
    sizes the V2 frames; ``bulk`` passes geometry to the V3 ring (``sparse`` to the V2
    ring). ``auto`` False: the rings change only with :meth:`steer`."""

    def __init__(self, ifname: str, *, bpf_program: Sequence[bpf.Insn] | None,
                 mtu: int = 1500, bulk: dict[str, Any] | None = None,
                 sparse: dict[str, Any] | None = None, auto: bool = True) -> None:
        frame = v2_frame_size(mtu)
        v2: dict[str, Any] = {"block_size": max(1 << 17, frame), "block_count": 32,
                              "frame_size": frame}
        # The V2 ring joins first (member 0, where a group without a program steers).
        self._sparse = RxRing(ifname, bpf=bpf_program, version=2, fanout_group=0,
                              fanout_mode=PACKET_FANOUT_CBPF,
                              fanout_flags=PACKET_FANOUT_FLAG_UNIQUEID, **(sparse or v2))
        try:
            # Bound with no filter it would take a copy of every packet until it joins.
            self._bulk = RxRing(ifname, bpf=bpf.REJECT_ALL, version=3,
                                fanout_group=self._sparse.fanout_id(),
                                fanout_mode=PACKET_FANOUT_CBPF, **(bulk or {}))
            try:
                self._bulk.set_filter(bpf_program if bpf_program is not None
                                      else bpf.ACCEPT_ALL)
                self._sparse.set_fanout_program(_STEER[SPARSE])
            except BaseException:
                self._bulk.close()
                raise
        except BaseException:
            self._sparse.close()
            raise
        self._rings = (self._sparse, self._bulk)
        self._drain_wait = 2 * self._bulk.retire_blk_tov_ms / 1000 + DRAIN_MARGIN_S
        self.mode = SPARSE
        self._auto = auto
        self._old: RxRing | None = None  # the ring to empty before the active one is read
        self._old_until = 0.0
        # A move under way: the target and the thread swapping the program (its grace
        # period would otherwise block the reader's loop, inside traffic included).
        self._move: tuple[int, threading.Thread] | None = None
        self._move_error: OSError | None = None
        self._deadline: threading.Timer | None = None
        # The reader polls one fd: an epoll set of the rings it may read now, and an
        # eventfd the move thread (or the drain deadline) writes.
        self._event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(self._event, select.EPOLLIN)
        self._watched = self._sparse.fileno()
        self._epoll.register(self._watched, select.EPOLLIN)
        self._window_start = self._last_packet = time.monotonic()
        self._window_packets = 0
        self._counters = {"to_bulk": 0, "to_sparse": 0, "drain_timeouts": 0, "move_errors": 0}

    # -- what RxRing offers ------------------------------------------------------------------
    def fileno(self) -> int:
        """The fd to poll: readable when a ring the pair reads now has packets, or a move
        or a drain deadline wants the reader."""
        return self._epoll.fileno()

    def shared_region(self) -> SharedRegion | None:
        return self._bulk.shared_region()

    def read_into(self, batch: Batch, max_packets: int | None = None,
                  ethertypes: npt.NDArray[np.uint16] | None = None) -> int:
        return self._read(lambda ring, n: ring.read_into(batch, n, ethertypes), max_packets)

    def read_heads(self, batch: Batch, max_packets: int | None, region: int, token: int,
                   *, head: int = HEAD) -> int:
        """:meth:`RxRing.read_heads` of the ring in use: heads from the V3 ring, whole packets
        from the V2 ring (``batch.region`` stays -1 for those)."""
        return self._read(lambda ring, n: ring.read_heads(batch, n, region, token, head=head),
                          max_packets)

    def release(self, token: int) -> None:
        self._bulk.release(token)

    def pending(self) -> bool:
        return False  # no virtio-net headers on this pair: nothing is held between reads

    def wait(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds for :meth:`fileno` to be readable."""
        return bool(self._epoll.poll(-1 if timeout is None else max(0.0, timeout)))

    def stats(self) -> dict[str, int]:
        """Both rings' counters summed, the moves between them, and ``bulk`` (1 while the
        V3 ring receives)."""
        out = dict(self._counters, bulk=int(self.mode == BULK))
        for ring in self._rings:
            for key, value in ring.stats().items():
                out[key] = out.get(key, 0) + value
        return out

    def close(self) -> None:
        if self._move is not None:
            self._move[1].join()
        if self._deadline is not None:
            self._deadline.cancel()
        self._epoll.close()
        os.close(self._event)
        self._bulk.close()
        self._sparse.close()

    def __enter__(self) -> RxPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- steering ----------------------------------------------------------------------------
    def _read(self, read: Reader, max_packets: int | None) -> int:
        # During a move (no old ring then: see steer) ``mode`` is still the ring in use,
        # and only it is read until the swap is done.
        self._settle()
        n = 0
        if self._old is not None:
            n = self._drain(read, max_packets)
            if self._old is not None:
                return n  # the old ring has more, or its last block is still to come
            if max_packets is not None:
                max_packets -= n
                if max_packets <= 0:
                    return n
        got = read(self._rings[self.mode], max_packets)
        if self._auto:
            self._account(got)
        return n + got

    def _drain(self, read: Reader, max_packets: int | None) -> int:
        """Read the old ring; done with it once it is drained, or at the deadline if
        nothing came (a V3 block that never came: only after the ring was full). Until
        then the new ring is not watched: the reader's loop waits for the old one."""
        old = self._old
        assert old is not None
        n = read(old, max_packets)
        if old.drained():
            self._drained()
        elif not n and time.monotonic() >= self._old_until:
            self._counters["drain_timeouts"] += 1
            self._drained()
        return n

    def _drained(self) -> None:
        self._old = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._watch(self._rings[self.mode])

    def _settle(self) -> None:
        """Take note of a move whose swap is done: the ring it left is emptied first."""
        if self._move is None:
            return
        target, thread = self._move
        if thread.is_alive():
            return
        thread.join()
        self._move = None
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._event)
        if self._move_error is not None:  # the program did not change
            self._counters["move_errors"] += 1
            self._move_error = None
            return
        old = self._rings[self.mode]
        self.mode = target
        if old.drained():  # nothing left there: no wake-up would come for it
            self._watch(self._rings[target])
            return
        self._old = old
        self._old_until = time.monotonic() + self._drain_wait
        self._deadline = threading.Timer(self._drain_wait, os.eventfd_write, (self._event, 1))
        self._deadline.daemon = True
        self._deadline.start()
        self._watch(old)

    def _watch(self, ring: RxRing) -> None:
        """Let the reader's poll see ``ring`` (besides the eventfd), and no other ring."""
        if ring.fileno() != self._watched:
            self._epoll.unregister(self._watched)
            self._watched = ring.fileno()
            self._epoll.register(self._watched, select.EPOLLIN)

    def _swap(self, mode: int) -> None:
        """The move thread: swap the steering program (the grace period passes here), then
        wake the reader."""
        try:
            self._sparse.set_fanout_program(_STEER[mode])
        except OSError as exc:
            self._move_error = exc
        finally:
            os.eventfd_write(self._event, 1)

    def idle_timeout_ms(self) -> int | None:
        """How soon the reader should call :meth:`idle` when nothing comes: while the V3
        ring receives, within half an IDLE_MOVE_S; else no wish (None)."""
        return int(IDLE_MOVE_S * 500) if self.mode == BULK and self._auto else None

    def idle(self) -> None:
        """The reader found nothing for a while (its poll timed out): back to the V2 ring
        once ``IDLE_MOVE_S`` passed without a packet, soon enough that the next packet,
        maybe the first of sparse traffic, finds the move done rather than waiting for it
        (a packet that comes during a move waits for it to end)."""
        self._settle()
        if (self._auto and self.mode == BULK and self._old is None and self._move is None
                and time.monotonic() - self._last_packet >= IDLE_MOVE_S):
            self.steer(SPARSE)
            self._window_start, self._window_packets = time.monotonic(), 0

    def _account(self, n: int) -> None:
        now = time.monotonic()
        if n:
            self._last_packet = now
        self._window_packets += n
        elapsed = now - self._window_start
        if self.mode == SPARSE:
            if elapsed >= BULK_WINDOW_S:  # a new window, starting with this read's packets
                self._window_start, self._window_packets = now, n
            if self._window_packets >= BULK_PACKETS:  # (in one read: a backlog)
                self.steer(BULK)
                self._window_start, self._window_packets = now, 0
        elif elapsed >= SPARSE_WINDOW_S:
            if self._window_packets < SPARSE_PACKETS:
                self.steer(SPARSE)
            self._window_start, self._window_packets = time.monotonic(), 0

    def steer(self, mode: int, *, wait: bool = False) -> bool:
        """Send new packets to the ``SPARSE`` (V2) or ``BULK`` (V3) ring, from when a helper
        thread has swapped the program (after a grace period, see above); what the ring in
        use holds is read first. ``wait``: return once the swap is done (tests). False
        (nothing done) while a move is under way or its old ring is still being emptied:
        moving back then would mix that ring's old packets with its new ones."""
        self._settle()
        if self._old is not None or self._move is not None:
            return False
        if mode != self.mode:
            thread = threading.Thread(target=self._swap, args=(mode,), daemon=True,
                                      name="espline-rx-steer")
            self._move = (mode, thread)
            self._counters["to_bulk" if mode == BULK else "to_sparse"] += 1
            thread.start()
            if wait:
                thread.join()
                self._settle()
        return True
