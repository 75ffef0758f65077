"""The whole data plane in one process tree: real worker processes, real ZeroMQ sockets.

Packet I/O is replaced by in-memory queues with a socketpair for readiness (the only mock:
the tun/af_packet/socket adapters have their own tests in network namespaces). What is real:
the dispatcher, sequence-number blocks, the ZeroMQ transport, pinned worker processes, the
codecs, the reassembler, replay windows, worker restarts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import mmap
import os
import random
import signal
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator

import numpy as np
import pytest

from pipeline.batch import HEADROOM, Batch
from pipeline.dataplane import DataPlane, Settings
from pipeline.dispatch import Action, Policy
from pipeline.region import HEAD, SharedRegion, copy_heads
from pipeline.satable import Direction, SaRecord, UdpEncap
from workers.esp import EspCodec
from workers.sa import SaTable

A = ipaddress.ip_address("192.0.2.1")
B = ipaddress.ip_address("192.0.2.2")
KEY = bytes(range(20))
NET_A = ipaddress.ip_network("10.1.0.0/24")
NET_B = ipaddress.ip_network("10.2.0.0/24")


class QueueIO:
    """Packets in and out of a DataPlane through Python lists, pollable via a socketpair."""

    signal_more = True  # a read that leaves packets keeps the fd readable

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._inbox: deque[bytes] = deque()
        self._lock = threading.Lock()
        self.outbox: list[bytes] = []

    def put(self, packets: list[bytes]) -> None:
        with self._lock:
            self._inbox.extend(packets)
        self._w.send(b"x")

    def fileno_list(self) -> list[int]:
        return [self._r.fileno()]

    def _take(self, max_packets: int) -> list[bytes]:
        try:
            while self._r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            take = [self._inbox.popleft() for _ in range(min(max_packets, len(self._inbox)))]
            if self._inbox and self.signal_more:
                self._w.send(b"x")  # more to read: stay readable
        return take

    def read_batch(self, batch: Batch, max_packets: int) -> int:
        take = self._take(max_packets)
        for i, pkt in enumerate(take):
            base = i * batch.slot_size + HEADROOM
            batch.data[base : base + len(pkt)] = list(pkt)
            batch.meta[i] = (base, len(pkt), 0, 0, 0, 0, 0)
        batch.count = len(take)
        return len(take)

    def write_batch(self, batch: Batch) -> int:
        out = batch.packets()
        with self._lock:
            self.outbox.extend(out)
        return len(out)


class RingIO(QueueIO):
    """:class:`QueueIO` as a reader of packet heads (pipeline/region.py), like a TPACKET_V3
    ring: each read writes its packets into a free area of shared memory, back to back at
    odd offsets as frames lie in a ring block, and hands the batch only their heads. An
    area is scribbled over the moment it is released, so a worker that read a packet's
    rest after that would send garbage; running out of areas (memory never released)
    fails the read."""

    AREAS, AREA = 8, 32 * 1600

    def __init__(self) -> None:
        super().__init__()
        self._fd = os.memfd_create("espline-test-ring")
        os.ftruncate(self._fd, self.AREAS * self.AREA)
        self._mm = mmap.mmap(self._fd, self.AREAS * self.AREA)
        self.ring = np.frombuffer(self._mm, dtype=np.uint8)
        self.free = list(range(self.AREAS))
        self.held: dict[int, int] = {}  # token -> area
        self.heads_reads = 0
        self.releases = 0
        self.heads: set[int] = set()  # head lengths asked for

    def shared_region(self) -> SharedRegion:
        return SharedRegion(self._fd, self.ring.size, self.ring)

    def read_heads(self, batch: Batch, max_packets: int, region: int, head: int) -> int:
        assert batch.buffer not in self.held, "a buffer read again before its release"
        take = self._take(max_packets)
        if not take:
            batch.count = 0
            return 0
        assert self.free, "every area held: the data plane does not release"
        area = self.free.pop()
        src, at = [], area * self.AREA + 14  # an Ethernet header's worth in
        for pkt in take:
            self.ring[at : at + len(pkt)] = np.frombuffer(pkt, dtype=np.uint8)
            src.append(at)
            at += -(-(len(pkt) + 34) // 16) * 16  # the next frame, 16-byte aligned
        assert at <= (area + 1) * self.AREA
        batch.count = 0
        copy_heads(batch, 0, self.ring, np.array(src, dtype=np.int64),
                   np.array([len(p) for p in take], dtype=np.int64), head)
        self.heads.add(head)
        batch.meta["sa"][: len(take)] = 0
        batch.meta["verdict"][: len(take)] = 0
        batch.count, batch.region = len(take), region
        self.held[batch.buffer] = area
        self.heads_reads += 1
        return len(take)

    def release(self, token: int) -> None:
        area = self.held.pop(token)
        self.ring[area * self.AREA : (area + 1) * self.AREA] = 0xAA  # scribbled over
        self.free.append(area)
        self.releases += 1


def inner(i: int, size: int = 100) -> bytes:
    """An IPv4/UDP packet from 10.1.0.1 to 10.2.0.1 whose payload carries ``i``."""
    payload = i.to_bytes(4, "big") * ((size - 28) // 4)
    total = 28 + len(payload)
    hdr = bytes([0x45, 0, total >> 8, total & 0xFF, 0, 0, 0, 0, 64, 17, 0, 0,
                 10, 1, 0, 1, 10, 2, 0, 1])
    return hdr + bytes([0x13, 0x88, 0x17, 0x70, (total - 20) >> 8, (total - 20) & 0xFF, 0, 0]) \
        + payload


def records(encap: bool) -> list[tuple[int, SaRecord]]:
    enc = UdpEncap() if encap else None
    return [
        (0, SaRecord(spi=0x1001, direction=Direction.OUT, alg="aes128gcm16", local_addr=A,
                     remote_addr=B, enc_key=KEY, encap=enc)),
        (1, SaRecord(spi=0x2001, direction=Direction.IN, alg="aes128gcm16", local_addr=A,
                     remote_addr=B, enc_key=KEY, encap=enc)),
    ]


@pytest.fixture
def gateway() -> Iterator[tuple[DataPlane, QueueIO, QueueIO]]:
    with running() as gw:
        yield gw


@contextlib.contextmanager
def running(io: tuple[QueueIO, QueueIO] | None = None,
            **settings: object) -> Iterator[tuple[DataPlane, QueueIO, QueueIO]]:
    """A data plane of two workers in a thread. These tests are about the workers: a batch
    of two packets or more goes to one (by default only full batches do: see
    test_batches_the_io_process_keeps_up_with_stay_there)."""
    settings.setdefault("handoff_min", 2)
    settings.setdefault("one_by_one", 1)  # a small batch is a batch (test_small_batches_...)
    settings.setdefault("sparse_wait", None)  # batches as big as what waits (see below)
    inside, outside = io or (QueueIO(), QueueIO())
    with tempfile.TemporaryDirectory() as rundir:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
        plane = DataPlane(Settings(workers=2, cpus=cpus, runtime_dir=rundir, max_packets=32,
                                   **settings),  # type: ignore[arg-type]
                          records(encap=True), [Policy((NET_A,), (NET_B,), sa_index=0)],
                          inside, outside)
        thread = threading.Thread(target=plane.run, daemon=True)
        thread.start()
        try:
            yield plane, inside, outside
        finally:
            plane.stop()
            thread.join(10)
            assert not thread.is_alive()


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise AssertionError("timed out")


def peer_decap(wire: list[bytes]) -> tuple[list[bytes], list[int]]:
    """Decapsulate with an independent codec instance, as the peer would."""
    table = SaTable()
    table.install(SaRecord(spi=0x1001, direction=Direction.IN, alg="aes128gcm16", local_addr=B,
                           remote_addr=A, enc_key=KEY, encap=UdpEncap(), replay_window=4096))
    batch = Batch.for_packets(wire)
    EspCodec(table).decap(batch)
    seqs = [int(s) for s in batch.meta["seq"][: batch.count]]
    assert batch.verdict_counts() == {}, batch.verdict_counts()
    return batch.packets(), seqs


def test_outbound_sequence_numbers_increase_across_workers(
        gateway: tuple[DataPlane, QueueIO, QueueIO]) -> None:
    plane, inside, outside = gateway
    wait_for(lambda: plane.ready == [0, 1])
    sent = [inner(i) for i in range(2000)]
    for k in range(0, len(sent), 100):
        inside.put(sent[k : k + 100])
    wait_for(lambda: len(outside.outbox) == len(sent))
    plain, seqs = peer_decap(outside.outbox)
    assert plain == sent  # every packet, in order
    assert seqs == list(range(1, len(sent) + 1))  # strictly increasing, none reused
    # Both workers did work: each batch went to whichever held the fewest.
    assert plane.stats.outbound.passed == len(sent)
    assert set(plane.stats.worker_batches) == {0, 1}


def send_bursts(inside: QueueIO, outside: QueueIO, bursts: list[list[bytes]],
                pause: float = 0.0) -> None:
    """Put each burst in after the one before has left (``pause`` seconds later), then check
    that every packet left once, in order, with sequence numbers 1, 2, ..."""
    sent: list[bytes] = []
    for burst in bursts:
        time.sleep(pause)
        sent += burst
        inside.put(burst)
        wait_for(lambda n=len(sent): len(outside.outbox) == n)  # noqa: B008 (bound now)
    plain, seqs = peer_decap(outside.outbox)
    assert plain == sent
    assert seqs == list(range(1, len(sent) + 1))


def test_batches_the_io_process_keeps_up_with_stay_there() -> None:
    """The default hand-off: a batch that is not full (the read found fewer packets than a
    batch holds) is done by the I/O process, a full one (input waiting) by a worker; the
    two interleave, and what leaves is every packet once, in order, with sequence numbers
    that increase across both kinds of batch."""
    with running(handoff_min=None) as (plane, inside, outside):
        wait_for(lambda: plane.ready == [0, 1])
        # Each read as full batches of 32, then what is left.
        send_bursts(inside, outside, [[inner(1000 * k + i) for i in range(size)] for k, size
                                      in enumerate([5, 100, 7, 64, 1, 31, 32, 90, 3])])
        # Full batches: 3 of the 100, 2 of the 64, 1 of the 32, 2 of the 90. The rest: the
        # 5, the 100's last 4, the 7, the 1 (alone), the 31, the 90's last 26, the 3.
        assert sum(plane.stats.worker_batches.values()) == 8, plane.stats.worker_batches
        assert (plane.stats.inline_batches, plane.stats.single_packets) == (6, 1)


def test_after_a_wait_a_read_takes_one_packet() -> None:
    """Settings.sparse_wait: a loop that waited for packets reads one (done without numpy,
    pipeline/onepacket.py); the rest of a burst that came with it is read at the next turn,
    in batches as usual. Every packet leaves once, in order."""
    with running(handoff_min=None, sparse_wait=0.001) as (plane, inside, outside):
        wait_for(lambda: plane.ready == [0, 1])
        # (Each burst after the loop waited in its poll.)
        send_bursts(inside, outside, [[inner(100 * k + i) for i in range(40)]
                                      for k in range(3)], pause=0.02)
        # Each burst: its first packet alone, then a full batch (a worker's) and 7 (here).
        assert plane.stats.single_packets == 3
        assert sum(plane.stats.worker_batches.values()) == 3, plane.stats.worker_batches
        assert plane.stats.inline_batches == 3


class HoldingIO(QueueIO):
    """An inside like a TUN queue holding the rest of a packet it cut (pipeline/tun.py):
    its fd signals once, what a read leaves is :meth:`pending`, and the fd stays quiet."""

    signal_more = False

    def pending(self) -> bool:
        with self._lock:
            return bool(self._inbox)


def test_an_inside_holding_packets_is_read_on_without_its_fd() -> None:
    with running((HoldingIO(), QueueIO())) as (plane, inside, outside):
        wait_for(lambda: plane.ready == [0, 1])
        sent = [inner(i) for i in range(100)]  # batches of 32: one signal, four reads
        inside.put(sent)
        wait_for(lambda: len(outside.outbox) == len(sent), timeout=5)
        plain, seqs = peer_decap(outside.outbox)
        assert plain == sent
        assert seqs == list(range(1, len(sent) + 1))


def test_a_killed_worker_is_replaced_and_no_sequence_number_is_reused(
        gateway: tuple[DataPlane, QueueIO, QueueIO]) -> None:
    plane, inside, outside = gateway
    wait_for(lambda: plane.ready == [0, 1])
    sent = 0
    victim = plane.supervisor.pids()[0]
    for round_ in range(40):
        inside.put([inner(sent + i) for i in range(50)])
        sent += 50
        if round_ == 10:
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.005)
    wait_for(lambda: len(outside.outbox) + plane.reassembler.lost_packets >= sent, 15)
    wait_for(lambda: plane.supervisor.restarts >= 1)
    _, seqs = peer_decap(outside.outbox)
    assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs)
    assert len(outside.outbox) + plane.reassembler.lost_packets == sent
    # Traffic resumed: packets sent after the kill came out.
    inside.put([inner(10**6 + i) for i in range(10)])
    wait_for(lambda: len(outside.outbox) + plane.reassembler.lost_packets == sent + 10)
    assert victim not in plane.supervisor.pids()
    # The replacement took batches again, and every shared buffer came back.
    wait_for(lambda: plane.ready == [0, 1])
    before = dict(plane.stats.worker_batches)
    for k in range(10):
        inside.put([inner(2 * 10**6 + 20 * k + i) for i in range(20)])
        time.sleep(0.01)
    wait_for(lambda: len(outside.outbox) + plane.reassembler.lost_packets == sent + 210)
    assert sum(plane.stats.worker_batches.values()) > sum(before.values())
    wait_for(lambda: len(plane._free) == len(plane.pool))


def test_inbound_replays_are_dropped_once_verified(
        gateway: tuple[DataPlane, QueueIO, QueueIO]) -> None:
    plane, inside, outside = gateway
    # What the peer sends us on SA 0x2001.
    table = SaTable()
    out = table.install(SaRecord(spi=0x2001, direction=Direction.OUT, alg="aes128gcm16",
                                 local_addr=B, remote_addr=A, enc_key=KEY, encap=UdpEncap()))
    batch = Batch.for_packets([inner(i) for i in range(20)])
    batch.meta["sa"][: batch.count] = out.index
    table.assign_sequence(batch)
    EspCodec(table).encap(batch)
    wire = batch.packets()
    outside.put(wire)
    wait_for(lambda: len(inside.outbox) == 20)
    outside.put(wire[:5] + wire[:5])  # replays, twice
    wait_for(lambda: plane.stats.inbound.drops().get("replay", 0) == 10)
    assert inside.outbox == [inner(i) for i in range(20)]


def test_a_hung_worker_is_killed_and_replaced(
        gateway: tuple[DataPlane, QueueIO, QueueIO]) -> None:
    """A worker that stops answering (SIGSTOP: alive, but holding its batches) is killed by
    pid once it has held a batch for ``reorder_hold``; its batches are counted lost, its
    buffers reused, and traffic flows through the replacement."""
    plane, inside, outside = gateway
    wait_for(lambda: plane.ready == [0, 1])
    victim = plane.supervisor.pids()[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        sent = 0
        for _ in range(20):
            inside.put([inner(sent + i) for i in range(20)])
            sent += 20
            time.sleep(0.01)
        wait_for(lambda: plane.supervisor.restarts >= 1, 10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
    wait_for(lambda: len(outside.outbox) + plane.reassembler.lost_packets == sent)
    assert plane.reassembler.lost_packets > 0  # what the hung worker held
    assert victim not in plane.supervisor.pids()
    _, seqs = peer_decap(outside.outbox)
    assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs)
    wait_for(lambda: plane.ready == [0, 1])
    inside.put([inner(10**6 + i) for i in range(20)])
    wait_for(lambda: len(outside.outbox) + plane.reassembler.lost_packets == sent + 20)
    wait_for(lambda: len(plane._free) == len(plane.pool))


def test_what_a_dead_io_process_left_is_removed_at_start() -> None:
    """A container restart keeps the runtime dir: the pool and socket of the I/O process
    that died are removed (even when the new process got the same PID), others kept."""
    with tempfile.TemporaryDirectory() as rundir:
        dead = os.fork()
        if dead == 0:
            os._exit(0)
        os.waitpid(dead, 0)  # a PID that is gone
        stale = [f"batches-{dead}.pool", f"batches-{dead}", f"batches-{os.getpid()}.pool"]
        live = f"batches-{os.getppid()}.pool"  # a live process's: not ours to remove
        for name in [*stale, live, "stats.json"]:
            with open(os.path.join(rundir, name), "wb") as f:
                f.write(b"x")
        plane = DataPlane(Settings(workers=1, runtime_dir=rundir, max_packets=4), [], [],
                          QueueIO(), QueueIO())
        try:
            left = sorted(os.listdir(rundir))
            assert f"batches-{dead}.pool" not in left and f"batches-{dead}" not in left
            assert live in left and "stats.json" in left
            assert os.path.getsize(plane.pool.path) == plane.pool.nbytes  # ours, fresh
        finally:
            plane.pool.close()


def peer_wire(sizes: list[int]) -> list[bytes]:
    """What the peer sends us on SA 0x2001: packet i of ``sizes[i]`` bytes."""
    table = SaTable()
    out = table.install(SaRecord(spi=0x2001, direction=Direction.OUT, alg="aes128gcm16",
                                 local_addr=B, remote_addr=A, enc_key=KEY, encap=UdpEncap()))
    batch = Batch.for_packets([inner(i, size) for i, size in enumerate(sizes)])
    batch.meta["sa"][: batch.count] = out.index
    table.assign_sequence(batch)
    EspCodec(table).encap(batch)
    return batch.packets()


@pytest.mark.parametrize("one_packet", [True, False], ids=["one-packet", "inline"])
def test_each_packet_is_counted_once_per_sa_whoever_processed_it(one_packet: bool) -> None:
    """The per-SA counters (the controller's byte and packet lifetimes, VICI, metrics) count
    a packet once, whether the I/O process did it alone (pipeline/onepacket.py), as a small
    batch of its own, or a worker did."""
    with running(one_packet=one_packet) as (plane, inside, outside):
        wait_for(lambda: plane.ready == [0, 1])
        check_counted_once(plane, inside, outside, one_packet)


def check_counted_once(plane: DataPlane, inside: QueueIO, outside: QueueIO,
                       one_packet: bool) -> None:
    small, large = [inner(i, 60) for i in range(3)], [inner(i, 200) for i in range(20)]
    for pkt in small:  # one packet per batch: done inline
        n = len(outside.outbox)
        inside.put([pkt])
        wait_for(lambda n=n: len(outside.outbox) == n + 1)
    inside.put(large)  # one batch for a worker
    wait_for(lambda: len(outside.outbox) == 23)
    alone = plane.stats.single_packets if one_packet else plane.stats.inline_batches
    assert alone == 3 and sum(plane.stats.worker_batches.values()) >= 1
    out_sa = plane.sas[0]
    assert out_sa is not None
    assert (out_sa.packets, out_sa.bytes) == (23, sum(map(len, small + large)))
    wire = peer_wire([60] * 3 + [200] * 20)
    for pkt in wire[:3]:
        n = len(inside.outbox)
        outside.put([pkt])
        wait_for(lambda n=n: len(inside.outbox) == n + 1)
    outside.put(wire[3:])
    wait_for(lambda: len(inside.outbox) == 23)
    in_sa = plane.sas[1]
    assert in_sa is not None
    assert (in_sa.packets, in_sa.bytes) == (23, 3 * 60 + 20 * 200)


def test_a_lone_packet_never_overtakes_a_batch_in_flight(
        gateway: tuple[DataPlane, QueueIO, QueueIO]) -> None:
    """A packet read alone takes the one-packet path only while no batch is out at a
    worker: right behind a batch it waits its turn, and every packet leaves in order with
    its sequence number (DESIGN §4)."""
    plane, inside, outside = gateway
    wait_for(lambda: plane.ready == [0, 1])
    sent: list[bytes] = []
    for k in range(40):
        # A full batch (max_packets), then one more packet: read alone, while that batch is
        # at a worker.
        batch = [inner(100 * k + i) for i in range(32)]
        inside.put([*batch, inner(100 * k + 50)])
        sent.extend([*batch, inner(100 * k + 50)])
        time.sleep(0.002 * (k % 3))
        if k % 10 == 9:  # and now and then one when all is quiet: the one-packet path
            wait_for(lambda: len(outside.outbox) == len(sent))
            inside.put([inner(100 * k + 99)])
            sent.append(inner(100 * k + 99))
            wait_for(lambda: len(outside.outbox) == len(sent))
    wait_for(lambda: len(outside.outbox) == len(sent))
    plain, seqs = peer_decap(outside.outbox)
    assert plain == sent
    assert seqs == list(range(1, len(sent) + 1))
    assert plane.stats.single_packets >= 4 and sum(plane.stats.worker_batches.values()) >= 40


class RoutedIO(QueueIO):
    """An inside that records the routes the data plane asks for (TunIO.sync_routes)."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: list[str] = []

    def sync_routes(self, routes: list[str]) -> None:
        self.routes = list(routes)

    def update_routes(self, added: list[str], removed: list[str]) -> None:
        assert not set(added) & set(self.routes), "added twice"
        assert set(removed) <= set(self.routes), "removed, never added"
        self.routes = sorted(set(self.routes) - set(removed) | set(added))
        self.updates += 1

    updates = 0


def test_inside_routes_follow_every_spd_change() -> None:
    """Every remote selector of the SPD is routed inside, whatever changed: policies added,
    removed, replaced by equal new ones, and an action that is not PROTECT."""
    inside = RoutedIO()
    with tempfile.TemporaryDirectory() as rundir:
        plane = DataPlane(Settings(workers=0, runtime_dir=rundir), records(encap=True), [],
                          inside, QueueIO())
        try:
            def site(i: int, action: Action = Action.PROTECT) -> Policy:
                return Policy((NET_A,), (ipaddress.ip_network(f"10.9.{i}.0/24"),), action,
                              sa_index=0)

            spd = [site(i) for i in range(5)]
            plane.set_policies(spd)
            assert inside.routes == [f"10.9.{i}.0/24" for i in range(5)]
            spd = [spd[0], site(7, Action.TRAP), *spd[2:4], site(1)]  # 4 gone, 1 anew, 7 in
            plane.set_policies(spd)
            assert inside.routes == sorted(f"10.9.{i}.0/24" for i in (0, 1, 2, 3, 7))
            plane.set_policies(spd[1:2])
            assert inside.routes == ["10.9.7.0/24"]
            plane.set_policies([])
            assert inside.routes == []
        finally:
            plane.pool.close()


def test_inside_routes_follow_spd_edits() -> None:
    """The controller's edits (by rank) route and withdraw only what changed: a route two
    policies share stays until the last goes; a policy replaced by one with the same
    selectors changes no route; the dispatcher classifies by the edited SPD."""
    inside = RoutedIO()
    with tempfile.TemporaryDirectory() as rundir:
        plane = DataPlane(Settings(workers=0, runtime_dir=rundir), records(encap=True), [],
                          inside, QueueIO())
        try:
            def site(i: int, sa: int = 0, action: Action = Action.PROTECT) -> Policy:
                return Policy((NET_A,), (ipaddress.ip_network(f"10.9.{i}.0/24"),), action,
                              sa_index=sa)

            plane.edit_policies({10: site(1), 20: site(2), 30: site(1, action=Action.TRAP)},
                                [])
            assert inside.routes == ["10.9.1.0/24", "10.9.2.0/24"]
            plane.edit_policies({}, [10])  # rank 30 still routes 10.9.1.0/24
            assert inside.routes == ["10.9.1.0/24", "10.9.2.0/24"]
            updates = inside.updates
            plane.edit_policies({20: site(2, sa=1)}, [])  # the same selectors, a new SA
            assert inside.updates == updates
            assert plane.dispatcher.policy(20).sa_index == 1
            plane.edit_policies({40: site(3)}, [30, 20])
            assert inside.routes == ["10.9.3.0/24"]
            assert sorted(plane.dispatcher._spd) == [40]
        finally:
            plane.pool.close()


def test_batches_of_packet_heads_are_completed_by_the_workers_both_ways() -> None:
    """Readers that share their memory (pipeline/region.py) hand the workers packet heads;
    what leaves is every packet whole and in order, both ways, for packets of every size
    (runs of one size, and sizes that change packet by packet), and every area read is
    released (scribbled over at once: a worker that read it late would send garbage)."""
    inside, outside = RingIO(), RingIO()
    with running(io=(inside, outside)) as (plane, _, _):
        wait_for(lambda: plane.ready == [0, 1])
        rng = random.Random(7)
        # Five bursts of 13 (batches for the workers), then one packet alone (done by the
        # I/O process, which completes it itself).
        sizes = [1400] * 20 + [rng.randrange(40, 1400) for _ in range(39)] + [100] * 3 \
            + [129, 128, 127, 60]
        send_bursts(inside, outside, [[inner(1000 + i, size) for i, size in
                                       enumerate(sizes[k : k + 13], k)]
                                      for k in range(0, len(sizes), 13)])
        wire = peer_wire(sizes)
        for k in range(0, len(wire), 13):
            outside.put(wire[k : k + 13])
            wait_for(lambda n=min(k + 13, len(wire)): len(inside.outbox) == n)  # noqa: B008
        assert inside.outbox == [inner(i, size) for i, size in enumerate(sizes)]
        assert len(sizes) == 66 and plane.stats.heads_batches == 10
        assert plane.stats.single_packets == 2
        assert inside.heads_reads == outside.heads_reads == 6
        # Outbound nothing is copied (the SPD lookup reads the addresses in place);
        # inbound the heads, for the SPI and sequence number.
        assert (inside.heads, outside.heads) == ({0}, {HEAD})
        wait_for(lambda: not inside.held and not outside.held)
    assert inside.releases == inside.heads_reads and outside.releases == outside.heads_reads


def test_a_worker_killed_with_packet_heads_gives_their_memory_back() -> None:
    """The memory a batch of heads points into goes back to its reader when the batch is
    lost with its worker, as when it comes back: nothing is held for ever, and traffic
    resumes."""
    inside = RingIO()
    with running(io=(inside, QueueIO())) as (plane, _, outside):
        wait_for(lambda: plane.ready == [0, 1])
        victim = plane.supervisor.pids()[0]
        sent = 0
        for round_ in range(30):
            inside.put([inner(sent + i, 600) for i in range(20)])
            sent += 20
            if round_ == 8:
                os.kill(victim, signal.SIGKILL)
            time.sleep(0.005)
        wait_for(lambda: len(outside.outbox) + plane.reassembler.lost_packets >= sent, 15)
        wait_for(lambda: plane.supervisor.restarts >= 1 and plane.ready == [0, 1])
        inside.put([inner(10**6 + i, 600) for i in range(20)])
        wait_for(lambda: len(outside.outbox) + plane.reassembler.lost_packets == sent + 20)
        _, seqs = peer_decap(outside.outbox)
        assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs)
        wait_for(lambda: not inside.held and len(plane._free) == len(plane.pool))
        assert inside.releases == inside.heads_reads


def test_small_batches_go_one_by_one_in_order() -> None:
    """Settings.one_by_one: a batch of at most that many packets, nothing of its direction
    in flight, goes packet by packet through the one-packet path (no worker, no batch
    path); a bigger one goes to a worker as before. Both ways every packet leaves once, in
    order, with sequence numbers 1, 2, ..."""
    with running(one_by_one=8) as (plane, inside, outside):
        wait_for(lambda: plane.ready == [0, 1])
        send_bursts(inside, outside, [[inner(10 * k + i) for i in range(size)]
                                      for k, size in enumerate([5, 8, 9, 1])])
        assert plane.stats.single_packets == 5 + 8 + 1
        assert plane.stats.inline_batches == 0
        assert sum(plane.stats.worker_batches.values()) == 1  # the 9
        wire = peer_wire([100] * 6 + [1000] * 3)
        outside.put(wire[:6])
        wait_for(lambda: len(inside.outbox) == 6)
        assert inside.outbox == [inner(i) for i in range(6)]
        assert plane.stats.single_packets == 14 + 6
        # Inbound packets long enough to be TCP segments worth coalescing: a batch.
        outside.put(wire[6:])
        wait_for(lambda: len(inside.outbox) == 9)
        assert inside.outbox[6:] == [inner(i, 1000) for i in range(6, 9)]
        assert plane.stats.single_packets == 20
        assert sum(plane.stats.worker_batches.values()) == 2


def _syn(i: int, mss: int, flags: str = "S") -> bytes:
    """A TCP SYN (or ``flags``) from 10.1.0.1 with an MSS option of ``mss``."""
    from scapy.layers.inet import IP, TCP
    from scapy.packet import raw
    return raw(IP(src="10.1.0.1", dst="10.2.0.1", id=i) / TCP(
        sport=40000 + i, dport=443, flags=flags, options=[("NOP", None), ("MSS", mss)]))


@pytest.mark.parametrize("handoff_min", [2, None], ids=["worker", "inline"])
def test_a_packet_declined_one_by_one_takes_the_rest_of_its_batch_along(
        handoff_min: int | None) -> None:
    """The one-packet path declines a SYN to clamp: the packets before it have left, it and
    those after it go through the batch path (a worker's, or this process's), moved to the
    front of the batch. Every packet leaves once, in order, the SYN clamped."""
    from scapy.layers.inet import IP, TCP

    with running(one_by_one=8, handoff_min=handoff_min) as (plane, inside, outside):
        wait_for(lambda: plane.ready == [0, 1])
        limit = int(plane._mss4[0])
        burst = [inner(0), inner(1, 300), _syn(2, 1460), inner(3, 40), inner(4, 1400),
                 inner(5)]
        inside.put(burst)
        wait_for(lambda: len(outside.outbox) == len(burst))
        plain, seqs = peer_decap(outside.outbox)
        assert seqs == list(range(1, len(burst) + 1))
        assert plain[:2] == burst[:2] and plain[3:] == burst[3:]
        assert dict(IP(plain[2])[TCP].options)["MSS"] == limit
        assert plane.stats.single_packets == 2 and plane.stats.mss_clamped == 1
        assert (sum(plane.stats.worker_batches.values()), plane.stats.inline_batches) == (
            (1, 0) if handoff_min == 2 else (0, 1))


def test_a_tampered_packet_among_a_few_is_dropped_alone_and_counted() -> None:
    """Inbound, the one-packet path declines a packet whose ICV does not verify: the batch
    path takes it and what follows, drops it (counted as ``integrity``) and delivers the
    rest, in order."""
    with running(one_by_one=8, handoff_min=None) as (plane, inside, outside):
        wait_for(lambda: plane.ready == [0, 1])
        wire = peer_wire([60, 80, 100, 120, 140])  # ESP-in-UDP of at most 204 bytes
        bad = bytearray(wire[2])
        bad[-20] ^= 0x01  # in the ciphertext
        outside.put([wire[0], wire[1], bytes(bad), wire[3], wire[4]])
        wait_for(lambda: plane.stats.inbound.snapshot()["drops"] == {"integrity": 1})
        wait_for(lambda: len(inside.outbox) == 4)
        assert inside.outbox == [inner(i, size) for i, size in
                                 ((0, 60), (1, 80), (3, 120), (4, 140))]
        assert plane.stats.single_packets == 2 and plane.stats.inline_batches == 1


@pytest.mark.parametrize("reader", [QueueIO, RingIO], ids=["whole", "heads"])
def test_workers_clamp_the_mss_of_the_syns_they_take(reader: type[QueueIO]) -> None:
    """A batch handed to a worker is clamped by it (the I/O process leaves it: only the
    worker has the whole packet when the reader shares heads). The MSS is the SA's limit,
    the TCP checksum still verifies (scapy recomputes it), and the I/O process counts
    each clamp once."""
    from scapy.layers.inet import IP, TCP
    from scapy.packet import raw

    with running(io=(reader(), QueueIO())) as (plane, inside, outside):
        wait_for(lambda: plane.ready == [0, 1])
        limit = int(plane._mss4[0])
        assert 1200 < limit < 1460
        burst = [_syn(0, 1460), inner(1), _syn(2, 1000), _syn(3, 8960, "SA"), inner(4, 1400)]
        inside.put(burst)
        wait_for(lambda: len(outside.outbox) == len(burst))
        plain, _ = peer_decap(outside.outbox)
        assert sum(plane.stats.worker_batches.values()) == 1
        assert plane.stats.mss_clamped == 2  # 1460 and 8960; 1000 is below the limit
        for pkt, want in zip((plain[0], plain[2], plain[3]), (limit, 1000, limit),
                             strict=True):
            p = IP(pkt)
            assert dict(p[TCP].options)["MSS"] == want
            got = p[TCP].chksum
            del p[TCP].chksum
            assert IP(raw(p))[TCP].chksum == got
        assert plain[1] == burst[1] and plain[4] == burst[4]
