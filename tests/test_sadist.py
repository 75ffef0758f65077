"""SA distribution (pipeline/sadist.py): snapshot + deltas over real ZeroMQ ipc sockets, and a
running data plane (real worker processes) that follows the controller's table live."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import queue
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import zmq

from pipeline.batch import Batch
from pipeline.dataplane import PARK_MAX, PARK_S, DataPlane, Settings
from pipeline.dispatch import Policy
from pipeline.region import HEAD
from pipeline.sadist import (
    SaPublisher,
    SaSubscriber,
    decode_message,
    decode_record,
    encode_message,
    encode_record,
)
from pipeline.satable import Direction, SaRecord, UdpEncap
from pipeline.transport import Direction as BatchDirection
from tests.test_dataplane import KEY, NET_A, NET_B, QueueIO, RingIO, inner, wait_for
from workers.esp import EspCodec
from workers.main import TableSink
from workers.sa import SaTable

A = ipaddress.ip_address("192.0.2.1")
B = ipaddress.ip_address("192.0.2.2")
T = TypeVar("T")


def record(spi: int, direction: Direction, key: bytes = KEY, **kw: Any) -> SaRecord:
    return SaRecord(spi=spi, direction=direction, alg="aes128gcm16", local_addr=A,
                    remote_addr=B, enc_key=key, encap=UdpEncap(), **kw)


class PublisherThread:
    """The controller's side in a thread of its own: every call runs there (ZeroMQ sockets
    belong to one thread), and snapshot requests are answered in between."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], rundir: str) -> None:
        self.endpoints = (f"ipc://{rundir}/sa-pub", f"ipc://{rundir}/sa-snap")
        self._calls: queue.Queue[tuple[Callable[[SaPublisher], Any], queue.Queue[Any]]] = \
            queue.Queue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._ctx = ctx
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._ready.wait(5)

    def _run(self) -> None:
        pub = SaPublisher(self._ctx, *self.endpoints)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if pub.snapshot_socket.poll(5):
                    pub.serve_snapshots()
                while not self._calls.empty():
                    fn, reply = self._calls.get()
                    reply.put(fn(pub))
        finally:
            pub.close()

    def call(self, fn: Callable[[SaPublisher], T]) -> T:
        reply: queue.Queue[T] = queue.Queue()
        self._calls.put((fn, reply))  # type: ignore[arg-type]
        return reply.get(timeout=5)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)


@pytest.fixture
def publisher() -> Iterator[tuple[zmq.Context[zmq.Socket[bytes]], PublisherThread]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with tempfile.TemporaryDirectory() as rundir:
        pub = PublisherThread(ctx, rundir)
        try:
            yield ctx, pub
        finally:
            pub.close()
            ctx.term()


def test_records_survive_the_wire_form_whole() -> None:
    rec = record(0x1234, Direction.IN, esn=True, replay_window=1024, tfc_pad=300, name="x")
    assert decode_record(encode_record(rec)) == rec
    plain = SaRecord(spi=0x100, direction=Direction.OUT, alg="aes128-sha256",
                     local_addr=ipaddress.ip_address("2001:db8::1"),
                     remote_addr=ipaddress.ip_address("2001:db8::2"),
                     enc_key=bytes(16), integ_key=bytes(range(32)))
    assert decode_record(encode_record(plain)) == plain


def test_endpoints_are_private(publisher: tuple[Any, PublisherThread]) -> None:
    _, pub = publisher
    for ep in pub.endpoints:
        assert stat.S_IMODE(os.stat(ep.removeprefix("ipc://")).st_mode) == 0o600


def test_snapshot_then_deltas(publisher: tuple[Any, PublisherThread]) -> None:
    ctx, pub = publisher
    pub.call(lambda p: p.install(0, record(0x1001, Direction.OUT)))
    pub.call(lambda p: p.install(1, record(0x2001, Direction.IN)))
    table = SaTable()
    sub = SaSubscriber(ctx, *pub.endpoints, sink=TableSink(table))
    try:
        sub.sync()
        assert sub.version == 2
        assert [(sa.index, sa.record.spi) for sa in table] == [(0, 0x1001), (1, 0x2001)]
        pub.call(lambda p: p.install(2, record(0x2002, Direction.IN)))
        pub.call(lambda p: p.remove(1))
        assert sub.wait_for(4, timeout=5)
        assert [(sa.index, sa.record.spi) for sa in table] == [(0, 0x1001), (2, 0x2002)]
        assert table.lookup_one(50, 0x2001) == (0, False)
        assert table.lookup_one(50, 0x2002) == (2, True)
        assert sub.resyncs == 1
    finally:
        sub.close()


@contextlib.contextmanager
def synced(ctx: zmq.Context[zmq.Socket[bytes]], pub: PublisherThread
           ) -> Iterator[tuple[SaTable, SaSubscriber]]:
    """A worker's table following ``pub``, synced to its snapshot; closed after."""
    table = SaTable()
    sub = SaSubscriber(ctx, *pub.endpoints, sink=TableSink(table))
    try:
        sub.sync()
        yield table, sub
    finally:
        sub.close()


def test_a_gap_in_versions_forces_a_fresh_snapshot(
        publisher: tuple[Any, PublisherThread]) -> None:
    ctx, pub = publisher
    with synced(ctx, pub) as (table, sub):
        pub.call(lambda p: p.install(0, record(0x1001, Direction.OUT)))
        assert sub.wait_for(1, timeout=5)

        def lose_one(p: SaPublisher) -> None:
            # A delta the subscriber never sees (as if dropped at the high-water mark).
            assert p.table.sas is not None
            p.table.sas[1] = record(0x2001, Direction.IN)
            p.table.version += 1
            p.install(2, record(0x2002, Direction.IN))

        pub.call(lose_one)
        assert sub.wait_for(3, timeout=5)
        assert sub.resyncs == 2  # the gap was noticed and a snapshot fetched
        assert sorted(sa.record.spi for sa in table) == [0x1001, 0x2001, 0x2002]


def test_a_frame_that_does_not_decode_forces_a_fresh_snapshot(
        publisher: tuple[Any, PublisherThread]) -> None:
    ctx, pub = publisher
    with synced(ctx, pub) as (table, sub):

        def garble(p: SaPublisher) -> None:
            assert p.table.sas is not None
            p.table.sas[0] = record(0x1001, Direction.OUT)
            p.table.version += 1
            p.pub.send(encode_message([{"v": 1}])[:-3])  # cut short: not a frame
            p.install(1, record(0x2001, Direction.IN))

        pub.call(garble)
        assert sub.wait_for(2, timeout=5)
        assert sub.resyncs == 2
        assert sorted(sa.record.spi for sa in table) == [0x1001, 0x2001]


def test_a_worker_builds_an_sa_only_when_a_batch_needs_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's sink takes installs as they came (install_encoded) and builds an SA's
    state when a packet first needs it: SPI lookups find deferred inbound SAs at once, a
    removed or replaced one is gone, and what a batch gets is what an eager table gives."""
    built: list[int] = []
    real_decode = decode_record
    monkeypatch.setattr("workers.main.decode_record",
                        lambda d: built.append(d["spi"]) or real_decode(d))
    table = SaTable()
    sink = TableSink(table)
    records = {i: record(0x1000 + i, Direction.OUT if i % 2 else Direction.IN)
               for i in range(40)}
    for i, r in records.items():
        sink.install_encoded(i, decode_message(encode_message(encode_record(r))))  # the wire
    assert built == []  # nothing decoded, no cipher context made
    assert table.lookup_one(50, 0x1000 + 4) == (4, True)  # deferred inbound SAs are indexed
    sink.remove(6)
    assert table.lookup_one(50, 0x1000 + 6) == (0, False) and table[6] is None
    sink.install_encoded(8, encode_record(record(0x2008, Direction.IN)))  # index 8 reused
    assert table.lookup_one(50, 0x1000 + 8) == (0, False)
    assert table.lookup_one(50, 0x2008) == (8, True)
    # An outbound batch on SA 3 builds SA 3 alone, and encrypts as an eager table does.
    eager = SaTable()
    eager.install(records[3], 3)
    packets = [inner(i) for i in range(5)]
    got, want = Batch.for_packets(packets), Batch.for_packets(packets)
    for b, t in ((got, table), (want, eager)):
        b.meta["sa"][: b.count] = 3
        b.meta["seq"][: b.count] = range(1, 6)
        EspCodec(t, replay=False, count=False).encap(b)
    assert got.packets() == want.packets() and got.verdict_counts() == {}
    assert built == [0x1003]
    # A batch from the peer on deferred inbound SA 4 decrypts.
    peer = SaTable()
    peer.install(record(0x1004, Direction.OUT), 0)
    wire = Batch.for_packets(packets)
    wire.meta["seq"][: wire.count] = range(1, 6)
    EspCodec(peer, replay=False, count=False).encap(wire)
    back = Batch.for_packets(wire.packets())
    EspCodec(table, replay=False, count=False).decap(back)
    assert back.packets() == packets and back.verdict_counts() == {}
    assert built == [0x1003, 0x1004]
    # Iterating (a resync) builds the rest; a record that cannot be built is taken out.
    sink.install_encoded(50, {**encode_record(record(0x3050, Direction.IN)), "enc_key": b"\0"})
    assert table.lookup_one(50, 0x3050) == (50, True)
    assert sorted(sa.index for sa in table) == sorted({*records, 8} - {6})
    assert table[50] is None and table.lookup_one(50, 0x3050) == (0, False)


def test_a_resync_keeps_the_state_of_unchanged_sas() -> None:
    table = SaTable()
    sink = TableSink(table)
    out = record(0x1001, Direction.OUT)
    sink.install(0, out)
    sink.install(1, record(0x2001, Direction.IN))
    state = table[0]
    assert state is not None
    state.reserve(100)
    sink.reset({0: out, 2: record(0x2002, Direction.IN)}, ())
    assert table[0] is state and state.seq_out == 100  # never reissue sequence numbers
    assert table[1] is None and table[2] is not None


def test_a_running_data_plane_follows_installs_rekeys_and_worker_restarts(
        publisher: tuple[Any, PublisherThread]) -> None:
    """make-before-break (DESIGN §5): the new outbound SA takes over with sequence number 1,
    the old inbound SA keeps working until removed, a restarted worker resyncs."""
    _, pub = publisher
    inside, outside = QueueIO(), QueueIO()
    old_key, new_key = KEY, bytes(range(100, 120))
    with tempfile.TemporaryDirectory() as rundir:
        # Every batch of two packets or more to a worker (by default only full ones): the
        # workers' copies of the SA table are what this test follows.
        plane = DataPlane(Settings(workers=2, runtime_dir=rundir, max_packets=32,
                                   handoff_min=2), [], [], inside, outside,
                          sa_updates=pub.endpoints)
        thread = threading.Thread(target=plane.run, daemon=True)
        thread.start()
        try:
            def first(p: SaPublisher) -> None:
                p.install(0, record(0x1001, Direction.OUT, old_key))
                p.install(1, record(0x2001, Direction.IN, old_key))
                p.set_policies([Policy((NET_A,), (NET_B,), sa_index=0)])

            pub.call(first)
            wait_for(lambda: plane.sa_version == 3)
            inside.put([inner(i) for i in range(50)])
            wait_for(lambda: len(outside.outbox) == 50)
            assert peer_decap(outside.outbox, 0x1001, old_key) == list(range(1, 51))

            def rekey(p: SaPublisher) -> None:
                p.install(2, record(0x2002, Direction.IN, new_key))  # new inbound first
                p.install(3, record(0x1002, Direction.OUT, new_key))
                p.set_policies([Policy((NET_A,), (NET_B,), sa_index=3)])

            pub.call(rekey)
            inside.put([inner(i) for i in range(50, 80)])  # may race the rekey: both fine
            wait_for(lambda: len(outside.outbox) == 80)
            wait_for(lambda: plane.sa_version == 6)
            # Both inbound SAs work during the overlap.
            for spi, key in ((0x2001, old_key), (0x2002, new_key)):
                before = len(inside.outbox)
                outside.put(peer_encap(spi, key, 5))
                wait_for(lambda b=before: len(inside.outbox) == b + 5)  # type: ignore[misc]
            victim = plane.supervisor.pids()[0]
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: plane.supervisor.restarts >= 1)
            pub.call(lambda p: p.remove(1))
            pub.call(lambda p: p.remove(0))
            wait_for(lambda: plane.sa_version == 8)
            outbox_before = len(outside.outbox)
            inside.put([inner(i) for i in range(100, 160)])
            wait_for(lambda: len(outside.outbox) == outbox_before + 60)
            new_wire = outside.outbox[outbox_before:]
            seqs = peer_decap(new_wire, 0x1002, new_key)
            assert seqs == sorted(seqs) and seqs[-1] == len(seqs) + seqs[0] - 1
            before = len(inside.outbox)
            outside.put(peer_encap(0x2001, old_key, 3))  # the old inbound SA is gone
            wait_for(lambda: plane.stats.inbound.drops().get("no_sa", 0) == 3)
            assert len(inside.outbox) == before
        finally:
            plane.stop()
            thread.join(10)
            assert not thread.is_alive()


def peer_decap(wire: list[bytes], spi: int, key: bytes) -> list[int]:
    table = SaTable()
    table.install(SaRecord(spi=spi, direction=Direction.IN, alg="aes128gcm16", local_addr=B,
                           remote_addr=A, enc_key=key, encap=UdpEncap(), replay_window=4096))
    batch = Batch.for_packets(wire)
    EspCodec(table).decap(batch)
    assert batch.verdict_counts() == {}, batch.verdict_counts()
    return [int(s) for s in batch.meta["seq"][: batch.count]]


_peer_out: dict[int, SaTable] = {}


def peer_encap(spi: int, key: bytes, count: int) -> list[bytes]:
    table = _peer_out.setdefault(spi, SaTable())
    if table[0] is None:
        table.install(SaRecord(spi=spi, direction=Direction.OUT, alg="aes128gcm16",
                               local_addr=B, remote_addr=A, enc_key=key, encap=UdpEncap()), 0)
    batch = Batch.for_packets([inner(i) for i in range(count)])
    batch.meta["sa"][: batch.count] = 0
    table.assign_sequence(batch)
    EspCodec(table).encap(batch)
    return batch.packets()


def test_a_batch_of_deltas_travels_as_one_message(
        publisher: tuple[Any, PublisherThread]) -> None:
    ctx, pub = publisher
    with synced(ctx, pub) as (table, sub):

        def child(p: SaPublisher) -> None:
            with p.batch():
                p.install(0, record(0x2001, Direction.IN))
                p.install(1, record(0x1001, Direction.OUT))
                with p.batch():  # nested: still the one message
                    p.set_policies([Policy((NET_A,), (NET_B,), sa_index=1)])

        pub.call(child)
        assert sub.sub.poll(5000)
        frames = []
        while sub.sub.poll(200):
            frames.append(sub.sub.recv())
        assert len(frames) == 1  # one send for three versions
        assert [d["v"] for d in decode_message(frames[0])] == [1, 2, 3]
        # Fed back in, the subscriber applies all three in order.
        sub.version = 0
        for frame in frames:
            message = decode_message(frame)
            for delta in message:
                sub._apply(delta)
                sub.version = delta["v"]
        assert sub.version == 3 and sorted(sa.record.spi for sa in table) == [0x1001, 0x2001]


def test_esp_for_an_sa_whose_install_is_still_queued_is_looked_up_again(
        publisher: tuple[Any, PublisherThread]) -> None:
    """A peer switches to a new SA as soon as it has our rekey answer; its first packets may
    reach the I/O process before the loop applied the queued install: the dispatcher drains
    waiting deltas and looks those SPIs up again instead of dropping them as no_sa."""
    ctx, pub = publisher
    with by_hand(ctx, pub) as (plane, updates, inside, outside):
        pub.call(lambda p: p.install(7, record(0x2007, Direction.IN)))
        assert updates.sub.poll(5000)  # queued, not applied
        assert plane.sas[7] is None
        outside.put(peer_encap(0x2007, KEY, 3))
        plane._ingest(outside, BatchDirection.INBOUND, None, 0.0)  # type: ignore[arg-type]
        plane.reassembler.pop(0.0, plane._release)
        assert plane.sas[7] is not None
        assert inside.outbox == [inner(i) for i in range(3)]
        assert plane.stats.inbound.drops() == {}


@contextlib.contextmanager
def by_hand(ctx: zmq.Context[zmq.Socket[bytes]], pub: PublisherThread
            ) -> Iterator[tuple[DataPlane, SaSubscriber, QueueIO, QueueIO]]:
    """A data plane whose loop the test turns by hand, following ``pub``'s table."""
    inside, outside = QueueIO(), QueueIO()
    with tempfile.TemporaryDirectory() as rundir:
        plane = DataPlane(Settings(workers=1, runtime_dir=rundir), [], [], inside, outside)
        updates = SaSubscriber(ctx, *pub.endpoints, sink=plane)
        try:
            updates.sync()
            plane._updates = updates
            yield plane, updates, inside, outside
        finally:
            plane._updates = None
            updates.close()


@contextlib.contextmanager
def following(pub: PublisherThread, workers: int = 1, outside: QueueIO | None = None,
              **settings: Any) -> Iterator[tuple[DataPlane, QueueIO, QueueIO]]:
    """A data plane running in a thread, following ``pub``'s table."""
    inside = QueueIO()
    outside = outside if outside is not None else QueueIO()
    with tempfile.TemporaryDirectory() as rundir:
        plane = DataPlane(Settings(workers=workers, runtime_dir=rundir, **settings), [], [],
                          inside, outside, sa_updates=pub.endpoints)
        thread = threading.Thread(target=plane.run, daemon=True)
        thread.start()
        try:
            wait_for(lambda: plane.sa_version >= 0 and plane._updates is not None)
            yield plane, inside, outside
        finally:
            plane.stop()
            thread.join(10)
            assert not thread.is_alive()


def test_an_installed_sa_is_built_when_a_packet_first_needs_it(
        publisher: tuple[Any, PublisherThread]) -> None:
    """The I/O process keeps an installed SA's record and builds its state (cipher
    contexts, replay window: most of what a Child SA install costs it) when a packet first
    needs it; the stats report does not build it."""
    _, pub = publisher
    with following(pub) as (plane, inside, outside):
        pub.call(lambda p: p.install(9, record(0x2009, Direction.IN)))
        wait_for(lambda: 9 in plane.records)
        assert 9 not in {sa.index for sa in plane.sas.built()}
        assert plane.stats.snapshot(plane)["sas"] == []
        assert 9 not in {sa.index for sa in plane.sas.built()}
        outside.put(peer_encap(0x2009, KEY, 2))
        wait_for(lambda: len(inside.outbox) == 2)
        assert 9 in {sa.index for sa in plane.sas.built()}
        assert [sa["index"] for sa in plane.stats.snapshot(plane)["sas"]] == [9]


def test_esp_for_an_sa_whose_install_is_still_on_its_way_is_held_until_it_comes(
        publisher: tuple[Any, PublisherThread]) -> None:
    """The install left the controller before the peer could use the SA, but reaches the
    I/O process after the peer's first packets (two ZeroMQ I/O threads on the way): those
    packets are held (PARKED, not a drop) and go through once the install is applied."""
    _, pub = publisher
    with following(pub) as (plane, inside, outside):
        outside.put(peer_encap(0x2008, KEY, 3))
        wait_for(lambda: plane.stats.inbound.parked == 3)  # read, held, nothing dropped
        assert inside.outbox == [] and plane.stats.inbound.drops() == {}
        pub.call(lambda p: p.install(8, record(0x2008, Direction.IN)))
        wait_for(lambda: len(inside.outbox) == 3)
        assert inside.outbox == [inner(i) for i in range(3)]  # in order
        assert plane.stats.inbound.drops() == {}
        snapshot = plane.stats.inbound.snapshot()
        assert snapshot["parked"] == 3 and snapshot["drops"] == {}


def test_held_packet_heads_are_held_whole(publisher: tuple[Any, PublisherThread]) -> None:
    """A batch of packet heads (pipeline/region.py: the rest in the reader's memory, which
    goes back to the reader once the batch is done): what is held is each packet whole."""
    _, pub = publisher
    ring = RingIO()
    with following(pub, workers=2, outside=ring, handoff_min=2) as (plane, inside, _):
        wait_for(lambda: plane.ready == [0, 1])
        sizes = [1400, 60, 700, HEAD - 40, HEAD + 1]
        table = SaTable()
        table.install(SaRecord(spi=0x200B, direction=Direction.OUT, alg="aes128gcm16",
                               local_addr=B, remote_addr=A, enc_key=KEY, encap=UdpEncap()), 0)
        batch = Batch.for_packets([inner(i, size) for i, size in enumerate(sizes)])
        batch.meta["sa"][: batch.count] = 0
        table.assign_sequence(batch)
        EspCodec(table).encap(batch)
        ring.put(batch.packets())
        wait_for(lambda: plane.stats.inbound.parked == len(sizes))
        # One read, or (a read after a wait takes one packet: pipeline/dataplane.py) two;
        # either way a batch of several heads.
        assert ring.heads_reads in (1, 2)
        wait_for(lambda: not ring.held)  # the reader's memory went back: scribbled over
        pub.call(lambda p: p.install(11, record(0x200B, Direction.IN)))
        wait_for(lambda: len(inside.outbox) == len(sizes))
        assert inside.outbox == [inner(i, size) for i, size in enumerate(sizes)]
        assert plane.stats.inbound.drops() == {}


def test_held_packets_go_on_when_a_later_batch_applied_their_install(
        publisher: tuple[Any, PublisherThread]) -> None:
    """The install may be applied while a later packet of the same SA is looked up (the
    drain in ``_retry_unknown_spis``), not at the top of a turn: what is held goes on at the
    next turn all the same, instead of waiting for its deadline and being dropped."""
    ctx, pub = publisher
    with by_hand(ctx, pub) as (plane, updates, inside, outside):
        outside.put(peer_encap(0x200C, KEY, 3))  # sequence numbers 1-3
        plane._ingest(outside, BatchDirection.INBOUND, None, 0.0)  # type: ignore[arg-type]
        plane.reassembler.pop(0.0, plane._release)
        assert plane.stats.inbound.parked == 3 and inside.outbox == []
        pub.call(lambda p: p.install(12, record(0x200C, Direction.IN)))
        assert updates.sub.poll(5000)  # queued, not applied
        outside.put(peer_encap(0x200C, KEY, 1))  # sequence number 4: applies it
        plane._ingest(outside, BatchDirection.INBOUND, None, 0.0)  # type: ignore[arg-type]
        plane.reassembler.pop(0.0, plane._release)
        assert inside.outbox == [inner(0)]
        plane._look_again(None, time.monotonic())  # type: ignore[arg-type]
        plane.reassembler.pop(0.0, plane._release)
        assert inside.outbox == [inner(0), inner(0), inner(1), inner(2)]
        assert plane.stats.inbound.drops() == {} and not plane._parked


def test_esp_for_an_spi_that_never_comes_is_dropped_after_the_hold(
        publisher: tuple[Any, PublisherThread]) -> None:
    """At most PARK_MAX packets are held, for PARK_S; the rest, and then those, are no_sa
    drops. An install for another SPI meanwhile does not let them through."""
    _, pub = publisher
    with following(pub) as (plane, inside, outside):
        started = time.monotonic()
        wire = peer_encap(0x2009, KEY, PARK_MAX + 10)
        outside.put(wire[:PARK_MAX])
        outside.put(wire[PARK_MAX:])
        wait_for(lambda: plane.stats.inbound.parked >= PARK_MAX)
        pub.call(lambda p: p.install(9, record(0x200A, Direction.IN)))  # not theirs
        wait_for(lambda: plane.stats.inbound.drops().get("no_sa", 0) == PARK_MAX + 10)
        assert time.monotonic() - started >= PARK_S
        assert inside.outbox == []
        # Held once each, and again after the unrelated install (if it came in time).
        assert plane.stats.inbound.parked in (PARK_MAX, 2 * PARK_MAX)


class SpdSink(TableSink):
    """The SPD a subscriber applied, by rank, and how many changes it took."""

    def __init__(self) -> None:
        super().__init__(SaTable())
        self.spd: dict[int, Policy] = {}
        self.changes = 0
        self.edits = []

    def reset(self, sas: dict[int, SaRecord], policies: Any) -> None:
        super().reset(sas, policies)
        self.spd = dict(policies)

    def set_policies(self, policies: Any) -> None:
        self.spd = dict(policies)
        self.changes += 1

    def edit_policies(self, put: Any, removed: Any) -> None:
        for rank in removed:
            self.spd.pop(rank, None)  # (as the dispatcher: a rank it never had is no error)
        self.spd.update(put)
        self.changes += 1
        self.edits.append((dict(put), list(removed)))

    edits: list[tuple[dict[int, Policy], list[int]]]


def site(i: int) -> Policy:
    return Policy((NET_A,), (ipaddress.ip_network(f"172.{16 + i // 256}.{i % 256}.0/24"),),
                  sa_index=i)


def test_spd_edits_carry_only_the_changed_entries(
        publisher: tuple[Any, PublisherThread]) -> None:
    """One site more in an SPD of 200 sends one entry, not 201, and one site less sends
    its rank; a subscriber that joins from a snapshot later holds the same ranks and
    follows the next edits; a whole new SPD replaces the old; the worker's subscriber
    (policies=False) skips SPD deltas."""
    ctx, pub = publisher
    sink, late, worker = SpdSink(), SpdSink(), SpdSink()
    sub = SaSubscriber(ctx, *pub.endpoints, sink=sink)
    wsub = SaSubscriber(ctx, *pub.endpoints, sink=worker, policies=False)
    spd = {rank: site(rank) for rank in range(0, 400, 2)}
    try:
        sub.sync()
        wsub.sync()
        pub.call(lambda p: p.edit_policies(spd))
        assert sub.wait_for(1, timeout=5) and sink.spd == spd

        def edit(p: SaPublisher, put: dict[int, Policy], removed: list[int]) -> Any:
            sent: list[bytes] = []
            real, p.pub.send = p.pub.send, sent.append  # type: ignore[method-assign]
            try:
                p.edit_policies(put, removed)
            finally:
                p.pub.send = real  # type: ignore[method-assign]
            real(sent[0])
            return decode_message(sent[0])

        delta = pub.call(lambda p: edit(p, {201: site(500)}, []))
        assert (len(delta["put"]), delta["del"]) == (1, [])
        spd[201] = site(500)  # between ranks 200 and 202
        assert sub.wait_for(2, timeout=5) and sink.spd == spd
        late_sub = SaSubscriber(ctx, *pub.endpoints, sink=late)
        try:
            late_sub.sync()
            assert late.spd == spd
            delta = pub.call(lambda p: edit(p, {}, [14, 999]))  # 999: not there, not sent
            assert (delta["put"], delta["del"]) == ([], [14])
            del spd[14]
            delta = pub.call(lambda p: edit(p, {14: site(7), 16: site(8)}, [16]))
            assert (len(delta["put"]), delta["del"]) == (2, [])  # put wins over removed
            spd.update({14: site(7), 16: site(8)})
            assert late_sub.wait_for(4, timeout=5) and late.spd == spd
            assert late_sub.resyncs == 1
            new = [site(1), site(2)]
            pub.call(lambda p: p.set_policies(new))
            assert late_sub.wait_for(5, timeout=5) and late.spd == dict(enumerate(new))
        finally:
            late_sub.close()
        assert sub.wait_for(5, timeout=5) and sink.spd == dict(enumerate(new))
        # (edits that arrived together reached the sink as one: 5 deltas, at most 5 changes)
        assert sub.resyncs == 1 and 1 <= sink.changes <= 5
        assert wsub.wait_for(5, timeout=5) and worker.changes == 0
    finally:
        sub.close()
        wsub.close()


def test_the_spd_edits_of_one_drain_reach_the_sink_as_one(
        publisher: tuple[Any, PublisherThread]) -> None:
    """Under IKE load a drain takes many deltas, most of them SPD edits giving the same
    entries new SAs: the sink gets one edit, the merge of them all in order (a later put
    replaces an earlier one, a removal cancels a put, a put after a removal wins)."""
    ctx, pub = publisher
    sink = SpdSink()
    sub = SaSubscriber(ctx, *pub.endpoints, sink=sink)
    try:
        sub.sync()
        pub.call(lambda p: p.edit_policies({10: site(1), 20: site(2), 30: site(3)}))
        assert sub.wait_for(1, timeout=5) and sink.changes == 1
        sink.edits.clear()

        def burst(p: SaPublisher) -> None:
            for k in range(50):  # rank 10 takes a new SA, fifty times
                p.edit_policies({10: site(100 + k)})
            p.edit_policies({40: site(4)})  # new, then gone within the drain
            p.edit_policies({}, [40, 20])  # 20: there before, gone
            p.edit_policies({}, [30])
            p.edit_policies({30: site(33)})  # removed, then put again: put wins

        pub.call(burst)
        time.sleep(0.3)  # every delta on the socket before the drain
        assert sub.drain() == 54
        assert sink.changes == 2 and len(sink.edits) == 1
        put, removed = sink.edits[0]
        assert put == {10: site(149), 30: site(33)} and sorted(removed) == [20, 40]
        assert sink.spd == {10: site(149), 30: site(33)}
    finally:
        sub.close()


@contextlib.contextmanager
def clocked_publisher(now: list[float]) -> Iterator[SaPublisher]:
    """A publisher on its own context, its index quarantine 60 s by the clock ``now[0]``."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with tempfile.TemporaryDirectory() as rundir:
        pub = SaPublisher(ctx, f"ipc://{rundir}/p", f"ipc://{rundir}/s", quarantine=60.0,
                          clock=lambda: now[0])
        try:
            yield pub
        finally:
            pub.close()
            ctx.term()


def test_removed_indices_are_reused_after_their_quarantine_and_removed_by_identity() -> None:
    """SaPublisher.allocate hands a removed index out again once ``quarantine`` seconds
    passed (the data plane's per-index tables stay as large as the SAs up at once); a
    removal names the SA it removes, so a late one (a rekeyed SA's second removal) cannot
    take the index's next SA; an explicit install takes an index out of quarantine."""
    now = [100.0]
    with clocked_publisher(now) as pub:
        first = record(0x1001, Direction.OUT)
        a, b = pub.allocate(), pub.allocate()
        pub.install(a, first)
        pub.install(b, record(0x1002, Direction.IN))
        assert (a, b) == (0, 1)
        assert pub.remove(a, first) and not pub.remove(a, first)  # once
        now[0] += 59.0
        assert pub.allocate() == 2  # still quarantined: a fresh one
        now[0] += 1.0
        assert pub.allocate() == a  # 60 s on: reused
        second = record(0x2001, Direction.OUT)
        pub.install(a, second)
        assert not pub.remove(a, first)  # the late removal of the old SA: refused
        assert pub.table.sas is not None and pub.table.sas[a] is second
        assert pub.remove(a, second)
        pub.install(a, record(0x3001, Direction.OUT))  # explicitly, before its time
        now[0] += 120.0
        assert pub.allocate() == 3  # a is in use: not handed out again
        assert pub.remove(b)  # (no record named: whatever is there)


def test_an_index_a_policy_still_names_or_removed_anew_waits() -> None:
    """A removed index that a PROTECT policy still names (its Child SA's successor is not
    in place yet, say) is not handed out until no policy names it; an index taken back by
    an explicit install and removed again waits its full quarantine from the new removal."""
    now = [0.0]
    with clocked_publisher(now) as pub:
        a, b = pub.allocate(), pub.allocate()
        ra, rb = record(0x1001, Direction.OUT), record(0x1002, Direction.OUT)
        pub.install(a, ra)
        pub.install(b, rb)
        pub.edit_policies({5: Policy((NET_A,), (NET_A,), sa_index=a)})
        assert pub.remove(a, ra) and pub.remove(b, rb)
        now[0] += 61.0
        assert pub.allocate() == b  # a: still named by rank 5
        pub.edit_policies({}, [5])
        assert pub.allocate() == 2  # a: named until just now, quarantined again
        now[0] += 61.0
        assert pub.allocate() == a
        # Taken back by an explicit install, removed again 30 s later: not 30 s early.
        c = pub.allocate()
        pub.install(c, record(0x3001, Direction.OUT))
        pub.remove(c)
        now[0] += 30.0
        pub.install(c, record(0x3002, Direction.OUT))
        pub.remove(c)
        now[0] += 31.0  # 61 s after the first removal, 31 after the second
        assert pub.allocate() != c
        now[0] += 30.0
        assert pub.allocate() == c
