"""The I/O process: packet I/O, dispatcher and reassembler around the workers (DESIGN §2).

One poll loop. Packets read from the inside become outbound batches (SPD lookup, sequence
blocks); packets read from the outside become inbound batches (SA by SPI, replay pre-check).
Batches go to the workers over ZeroMQ; processed batches come back in any order and leave,
in batch order, to the other side. Batches are numbered in the order they are dispatched, so
the reassembler's order is the order the sequence numbers were issued.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol as TypingProtocol

import numpy as np
import numpy.typing as npt
import zmq

from pipeline import mtu
from pipeline.batch import SLOT_SIZE, Batch, Verdict
from pipeline.dispatch import Dispatcher, Policy
from pipeline.reorder import Reassembler
from pipeline.sadist import SaSubscriber
from pipeline.satable import SaRecord
from pipeline.supervisor import Supervisor
from pipeline.transport import Direction, TransportError, recv_batch, send_batch
from workers.counters import Counters
from workers.esp import EspCodec
from workers.main import WorkerSpec, install_all

__all__ = ["DataPlane", "PacketIO", "Settings"]


class PacketIO(TypingProtocol):
    def read_batch(self, batch: Batch, max_packets: int) -> int: ...
    def write_batch(self, batch: Batch) -> int: ...
    def fileno_list(self) -> list[int]: ...


@dataclass(frozen=True)
class Settings:
    workers: int = 1
    cpus: tuple[int, ...] = ()  # cores for the workers, round robin; () leaves them unpinned
    max_packets: int = 256
    slot_size: int = SLOT_SIZE
    # How long the reassembler waits for a missing batch: reorder_hold while every worker
    # lives (a busy worker's batch is late, not lost: skipping it would drop it when it
    # comes), reorder_timeout for the batches dispatched before a worker was found dead.
    reorder_timeout: float = 0.05
    reorder_hold: float = 1.0
    runtime_dir: str = "/run/espline"
    max_in_flight: int = 64  # batches out at workers before the loop stops reading
    outside_mtu: int = 1500
    mss_clamp: int | str | None = "auto"  # "auto": from each SA's overhead; int: fixed; None
    stats_interval: float = 1.0  # seconds between writes of <runtime_dir>/stats.json
    inline_max: int = 4  # batches this small are processed by the I/O process itself


@dataclass
class Stats:
    outbound: Counters = field(default_factory=Counters)
    inbound: Counters = field(default_factory=Counters)
    mss_clamped: int = 0
    icmp_too_big: int = 0
    fragmented: int = 0
    inline_batches: int = 0  # processed by the I/O process itself (tiny batches)

    def snapshot(self, plane: DataPlane) -> dict[str, object]:
        return {
            "outbound": self.outbound.snapshot(), "inbound": self.inbound.snapshot(),
            "mss_clamped": self.mss_clamped, "icmp_too_big": self.icmp_too_big,
            "fragmented": self.fragmented, "inline_batches": self.inline_batches,
            "lost_batches": plane.reassembler.skipped,
            "lost_packets": plane.reassembler.lost_packets,
            "worker_restarts": plane.supervisor.restarts,
            "worker_pids": plane.supervisor.pids(),
            "inside_io": _io_stats(plane.inside),
            "outside_io": _io_stats(plane.outside),
            # SAs that carried nothing yet are left out (their counters are zero): on a
            # concentrator with thousands of idle SAs this keeps the report small.
            "sas": [{"index": sa.index, "spi": f"{sa.record.spi:#010x}",
                     "direction": sa.record.direction.name.lower(), "packets": sa.packets,
                     "bytes": sa.bytes, "seq_out": sa.seq_out, "replay_top": sa.replay.top}
                    for sa in plane.sas if sa.packets or not plane.sa_updates],
            "sa_count": len(plane.records),
        }


def _io_stats(io: object) -> dict[str, int]:
    """The adapter's own counters (kernel ring drops, send errors, ...), when it has any."""
    get = getattr(io, "io_stats", None)
    return dict(get()) if callable(get) else {}


class DataPlane:
    def __init__(self, settings: Settings, sas: Sequence[tuple[int, SaRecord]],
                 policies: Sequence[Policy], inside: PacketIO, outside: PacketIO, *,
                 sa_updates: tuple[str, str] | None = None,
                 reports: str | None = None) -> None:
        """``sas``/``policies``: a fixed table (static SAs). ``sa_updates``: the controller's
        SA distribution endpoints (pipeline/sadist.py), followed live by this process and
        every worker. ``reports``: where to PUSH the stats snapshot each ``stats_interval``
        (the controller's counters for VICI and metrics)."""
        self.settings = settings
        self.records: dict[int, SaRecord] = dict(sas)
        self.sas = install_all(tuple(self.records.items()))
        self.dispatcher = Dispatcher(self.sas, policies)
        # The I/O process's own codec for tiny batches (replay windows move in the
        # reassembler, as for the workers' batches).
        self._codec = EspCodec(self.sas, replay=False)
        self.sa_updates = sa_updates
        self.reports = reports
        self.sa_version = 0
        self.acquires: deque[str] = deque(maxlen=64)  # TRAP hits not yet reported
        self._acquired: dict[str, float] = {}
        self._report: zmq.Socket[bytes] | None = None
        self._updates: SaSubscriber | None = None
        self._limits()
        self.reassembler = Reassembler(self.sas, settings.reorder_hold, settings.reorder_timeout)
        self.inside = inside
        self.outside = outside
        self._inside_src = {a.version: a for a in getattr(inside, "addresses", ())}
        self.stats = Stats()
        os.makedirs(settings.runtime_dir, mode=0o700, exist_ok=True)
        tag = f"{os.getpid()}"
        self.endpoint_in = f"ipc://{settings.runtime_dir}/batches-in-{tag}"
        self.endpoint_out = f"ipc://{settings.runtime_dir}/batches-out-{tag}"
        cpus = settings.cpus
        self.supervisor = Supervisor([
            WorkerSpec(index=i, cpu=cpus[i % len(cpus)] if cpus else None,
                       batches_in=self.endpoint_in, batches_out=self.endpoint_out,
                       sas=tuple(self.records.items()), capacity=settings.max_packets,
                       slot_size=settings.slot_size, sa_updates=sa_updates,
                       reports=reports)
            for i in range(settings.workers)])
        self._free: list[Batch] = []
        self._sending: deque[tuple[Batch, zmq.MessageTracker | None]] = deque()
        self._next_id = 0
        self._stop = False

    def _limits(self) -> None:
        """Per SA index: the inner MTU and the TCP MSS that fit the tunnel (DESIGN §7)."""
        size = max(self.records, default=-1) + 1
        self._inner_mtu = np.full(size + 1, self.settings.outside_mtu, dtype=np.int64)
        self._mss4 = np.full(size + 1, 1 << 16, dtype=np.int64)
        self._mss6 = np.full(size + 1, 1 << 16, dtype=np.int64)
        self._src: dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
        for i, rec in self.records.items():
            self._limit_one(i, rec)

    def _limit_one(self, i: int, rec: SaRecord | None) -> None:
        """The limits of one SA index (None: back to the defaults), growing the arrays."""
        if i + 1 >= self._inner_mtu.size:
            grow = max(2 * self._inner_mtu.size, i + 2) - self._inner_mtu.size
            self._inner_mtu = np.append(self._inner_mtu, np.full(
                grow, self.settings.outside_mtu, dtype=np.int64))
            self._mss4 = np.append(self._mss4, np.full(grow, 1 << 16, dtype=np.int64))
            self._mss6 = np.append(self._mss6, np.full(grow, 1 << 16, dtype=np.int64))
        self._inner_mtu[i] = self.settings.outside_mtu
        self._mss4[i] = self._mss6[i] = 1 << 16
        sa = self.sas[i]
        if rec is None or sa is None or sa.esp is None:
            return
        m = mtu.inner_mtu(self.settings.outside_mtu, sa.esp, rec.ipv6, rec.encap is not None,
                          rec.mode.name == "TUNNEL")
        self._inner_mtu[i] = m
        clamp = self.settings.mss_clamp
        if clamp == "auto":
            self._mss4[i], self._mss6[i] = mtu.mss_limit(m, False), mtu.mss_limit(m, True)
        elif isinstance(clamp, int):
            self._mss4[i] = self._mss6[i] = clamp
        self._src[rec.local_addr.version] = rec.local_addr

    # -- the controller's SA table (pipeline/sadist.py SaSink) ------------------------------
    def reset(self, sas: dict[int, SaRecord], policies: Sequence[Policy]) -> None:
        for index in list(self.records):
            if sas.get(index) != self.records[index]:
                self.remove(index)
        for index, record in sas.items():
            if self.records.get(index) != record:
                self.install(index, record)
        self.set_policies(policies)

    def install(self, index: int, record: SaRecord) -> None:
        self.sas.install(record, index)
        self.records[index] = record
        self._limit_one(index, record)

    def remove(self, index: int) -> None:
        self.sas.remove(index)
        self.records.pop(index, None)
        self._limit_one(index, None)

    def set_policies(self, policies: Sequence[Policy]) -> None:
        self.dispatcher.set_policies(policies)
        # The inside routes follow the SPD: every remote selector of a policy (PROTECT,
        # TRAP or DISCARD) is routed to us, so that its traffic is protected or dropped,
        # never leaked through the default route while an SA is down.
        sync = getattr(self.inside, "sync_routes", None)
        if callable(sync):
            sync(sorted({str(n) for p in policies for n in p.remote_ts}))

    def _outbound_mtu(self, batch: Batch) -> None:
        """MSS clamping on SYNs, and packets that do not fit the tunnel: ICMP back to the
        sender for DF/IPv6, outer fragmentation later for the rest (RFC 4301 §8)."""
        n = batch.count
        sa = batch.meta["sa"][:n].astype(np.int64)
        if self.settings.mss_clamp is not None:
            self.stats.mss_clamped += mtu.clamp_mss(batch, self._mss4[sa], self._mss6[sa])
        limit = self._inner_mtu[sa]
        over = mtu.too_big(batch, limit)
        if over.any():
            # From an address of the inner packet's family: the inside interface's (what
            # the kernel would use), else the SA's own when the families match.
            src4, src6 = (self._inside_src.get(v) or self._src.get(v) for v in (4, 6))
            errors = mtu.icmp_too_big(batch, over, limit, src4, src6)  # type: ignore[arg-type]
            if errors:
                self.stats.icmp_too_big += len(errors)
                self.inside.write_batch(Batch.for_packets(errors))

    def _write_stats(self, report: zmq.Socket[bytes] | None = None) -> None:
        snapshot = json.dumps(self.stats.snapshot(self))
        path = os.path.join(self.settings.runtime_dir, "stats.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(snapshot)
        os.replace(tmp, path)
        if report is not None:
            with contextlib.suppress(zmq.Again):
                report.send(snapshot.encode(), zmq.NOBLOCK)  # a busy controller skips one

    # -- buffers ---------------------------------------------------------------
    def _take(self) -> Batch:
        while self._sending and (self._sending[0][1] is None or self._sending[0][1].done):
            self._free.append(self._sending.popleft()[0])
        if self._free:
            batch = self._free.pop()
            batch.count = 0
            return batch
        return Batch(self.settings.max_packets, self.settings.slot_size)

    # -- the loop --------------------------------------------------------------
    def stop(self) -> None:
        self._stop = True

    def run(self, until: Callable[[], bool] | None = None) -> None:
        ctx = zmq.Context()
        to_workers = ctx.socket(zmq.PUSH)
        from_workers = ctx.socket(zmq.PULL)
        for sock, ep in ((to_workers, self.endpoint_in), (from_workers, self.endpoint_out)):
            sock.bind(ep)
            os.chmod(ep.removeprefix("ipc://"), 0o600)  # keys never cross these, batches do
        updates: SaSubscriber | None = None
        report: zmq.Socket[bytes] | None = None
        if self.sa_updates is not None:
            updates = SaSubscriber(ctx, *self.sa_updates, sink=self)
            updates.sync()
            self.sa_version = updates.version
            self._updates = updates
        if self.reports is not None:
            report = ctx.socket(zmq.PUSH)
            report.setsockopt(zmq.SNDHWM, 4)
            report.setsockopt(zmq.LINGER, 0)
            report.connect(self.reports)
            self._report = report
        self.supervisor.start()
        poller = zmq.Poller()
        if updates is not None:
            poller.register(updates.sub, zmq.POLLIN)
        inside_fds = set(self.inside.fileno_list())
        outside_fds = set(self.outside.fileno_list())
        for fd in inside_fds | outside_fds:
            poller.register(fd, zmq.POLLIN)
        poller.register(from_workers, zmq.POLLIN)
        last_check = last_stats = time.monotonic()
        try:
            while not self._stop and not (until is not None and until()):
                events = dict(poller.poll(10))
                now = time.monotonic()
                if updates is not None and updates.sub in events:
                    updates.drain()
                    self.sa_version = updates.version
                if self.reassembler.outstanding() < self.settings.max_in_flight:
                    if any(fd in events for fd in inside_fds):
                        self._ingest(self.inside, Direction.OUTBOUND, to_workers, now)
                    if any(fd in events for fd in outside_fds):
                        self._ingest(self.outside, Direction.INBOUND, to_workers, now)
                if from_workers in events:
                    self._collect(from_workers, now)
                self.reassembler.pop(now, self._release)
                if now - last_check > 0.05:
                    if self.supervisor.check():
                        # Whatever was dispatched so far may have died with the worker.
                        self.reassembler.worker_lost(self._next_id, now)
                    last_check = now
                if now - last_stats > self.settings.stats_interval:
                    self._write_stats(report)
                    last_stats = now
        finally:
            if updates is not None:
                self._updates = None
                updates.close()
            self._write_stats(report)
            self.supervisor.stop()
            self._write_stats(report)
            if report is not None:
                self._report = None
                report.close(linger=0)
            to_workers.close(linger=0)
            from_workers.close(linger=0)
            ctx.term()
            for ep in (self.endpoint_in, self.endpoint_out):
                path = ep.removeprefix("ipc://")
                if os.path.exists(path):
                    os.unlink(path)

    def _ingest(self, io: PacketIO, direction: Direction, sock: zmq.Socket[bytes],
                now: float) -> None:
        batch = self._take()
        io.read_batch(batch, self.settings.max_packets)
        if batch.count == 0:
            self._free.append(batch)
            return
        if direction is Direction.OUTBOUND:
            self.dispatcher.outbound(batch)
            if self.dispatcher.trapped:
                self._acquire(now)
            self._outbound_mtu(batch)
        else:
            self.dispatcher.inbound(batch)
            self._retry_unknown_spis(batch)
        batch.batch_id = self._next_id
        batch.sa_version = self.sa_version
        self._next_id += 1
        if not (batch.meta["verdict"][: batch.count] == Verdict.PASS).any():
            # Nothing for a worker to do: straight to the reassembler, keeping its place.
            self.reassembler.push(batch, direction, now)
            return
        if batch.count <= self.settings.inline_max:
            # A handful of packets (a ping, a TCP ACK at low rate) is done here: the two
            # ZeroMQ hops to a worker and back cost more than the crypto (about a
            # millisecond of wake-ups on a busy host). The reassembler still orders it.
            if direction is Direction.OUTBOUND:
                self._codec.encap(batch)
            else:
                self._codec.decap(batch)
            self.stats.inline_batches += 1
            self.reassembler.push(batch, direction, now)
            return
        self.reassembler.sent(batch.batch_id, batch.count)
        tracker = send_batch(sock, batch, direction, track=True)
        self._sending.append((batch, tracker))

    def _collect(self, sock: zmq.Socket[bytes], now: float) -> None:
        while True:
            batch = self._take()
            try:
                direction, _ = recv_batch(sock, batch, zmq.NOBLOCK)
            except zmq.Again:
                self._free.append(batch)
                return
            except TransportError:
                self._free.append(batch)
                continue
            self.reassembler.push(batch, direction, now)

    def _release(self, batch: Batch, direction: Direction) -> None:
        if direction is Direction.OUTBOUND:
            fragmented = self._fragment_oversized(batch)
            self.outside.write_batch(batch)
            if fragmented.size:
                batch.meta["verdict"][fragmented] = Verdict.PASS  # left, as fragments
            self.stats.outbound.add(batch)
            self._count_outbound(batch)
        else:
            if self.settings.mss_clamp is not None:
                sa = batch.meta["sa"][: batch.count].astype(np.int64)
                self.stats.mss_clamped += mtu.clamp_mss(batch, self._mss4[sa], self._mss6[sa])
            self.inside.write_batch(batch)
            self.stats.inbound.add(batch)
        self._free.append(batch)

    def _retry_unknown_spis(self, batch: Batch) -> None:
        """ESP for an SPI we do not know may be for an SA whose install is already on its
        way from the controller: a peer switches to a new SA as soon as it has our rekey
        answer, which left the controller after the install was published. Apply whatever
        deltas are waiting (without blocking) and look those packets up again."""
        if self._updates is None:
            return
        verdict = batch.meta["verdict"][: batch.count]
        unknown = verdict == Verdict.NO_SA
        if unknown.any() and self._updates.drain():
            self.sa_version = self._updates.version
            verdict[unknown] = Verdict.PASS
            self.dispatcher.inbound(batch)

    def _acquire(self, now: float) -> None:
        """Tell the controller which TRAP policies traffic hit (RFC 4301's ACQUIRE), at most
        once a second per policy; the packets themselves were dropped."""
        for index in self.dispatcher.trapped:
            name = self.dispatcher.policy(index).name
            if now - self._acquired.get(name, -1e9) >= 1.0:
                self._acquired[name] = now
                self.acquires.append(name)
        self.dispatcher.trapped.clear()
        if self._report is not None:
            while self.acquires:
                with contextlib.suppress(zmq.Again):
                    self._report.send(json.dumps({"acquire": self.acquires[0]}).encode(),
                                      zmq.NOBLOCK)
                self.acquires.popleft()

    def _count_outbound(self, batch: Batch) -> None:
        """Per outbound SA: packets and bytes that left (the inbound ones are counted by
        the reassembler as their windows move)."""
        meta = batch.meta[: batch.count]
        sent = meta["verdict"] == Verdict.PASS
        if not sent.any():
            return
        sa_of = meta["sa"][sent].astype(np.int64)
        packets = np.bincount(sa_of)
        octets = np.bincount(sa_of, weights=meta["length"][sent])
        for index in np.flatnonzero(packets).tolist():
            sa = self.sas[index]
            if sa is not None:
                sa.packets += int(packets[index])
                sa.bytes += int(octets[index])

    def _fragment_oversized(self, batch: Batch) -> npt.NDArray[np.int64]:
        """Outer IPv4 packets over the outside MTU (their inner packet had no DF) leave as
        fragments (RFC 4301 §8.1), sent here; they are marked TOO_BIG for the batch's own
        write and the caller restores those it returns (sent as fragments)."""
        over = mtu.too_big(batch, self.settings.outside_mtu)
        if not over.any():
            return np.zeros(0, dtype=np.int64)
        frags: list[bytes] = []
        sent = []
        for i in np.flatnonzero(over).tolist():
            batch.meta["verdict"][i] = Verdict.TOO_BIG
            try:
                frags += mtu.fragment_ipv4(batch.packet(i), self.settings.outside_mtu)
            except ValueError:
                continue  # DF set or not IPv4: stays a TOO_BIG drop
            sent.append(i)
        self.stats.fragmented += len(frags)
        if frags:
            self.outside.write_batch(Batch.for_packets(frags))
        return np.array(sent, dtype=np.int64)
