"""The I/O process: packet I/O, dispatcher and reassembler around the workers (DESIGN §2).

One poll loop. Packets read from the inside become outbound batches (SPD lookup, sequence
blocks); packets read from the outside become inbound batches (SA by SPI, replay pre-check).
Batches go to the workers over ZeroMQ; processed batches come back in any order and leave,
in batch order, to the other side. Batches are numbered in the order they are dispatched, so
the reassembler's order is the order the sequence numbers were issued.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol as TypingProtocol

import zmq

from pipeline.batch import SLOT_SIZE, Batch, Verdict
from pipeline.dispatch import Dispatcher, Policy
from pipeline.reorder import Reassembler
from pipeline.satable import SaRecord
from pipeline.supervisor import Supervisor
from pipeline.transport import Direction, TransportError, recv_batch, send_batch
from workers.counters import Counters
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
    reorder_timeout: float = 0.05  # how long a missing batch is waited for
    runtime_dir: str = "/run/espline"
    max_in_flight: int = 64  # batches out at workers before the loop stops reading


@dataclass
class Stats:
    outbound: Counters = field(default_factory=Counters)
    inbound: Counters = field(default_factory=Counters)


class DataPlane:
    def __init__(self, settings: Settings, sas: Sequence[tuple[int, SaRecord]],
                 policies: Sequence[Policy], inside: PacketIO, outside: PacketIO) -> None:
        self.settings = settings
        self.records = tuple(sas)
        self.sas = install_all(self.records)
        self.dispatcher = Dispatcher(self.sas, policies)
        self.reassembler = Reassembler(self.sas, settings.reorder_timeout)
        self.inside = inside
        self.outside = outside
        self.stats = Stats()
        os.makedirs(settings.runtime_dir, mode=0o700, exist_ok=True)
        tag = f"{os.getpid()}"
        self.endpoint_in = f"ipc://{settings.runtime_dir}/batches-in-{tag}"
        self.endpoint_out = f"ipc://{settings.runtime_dir}/batches-out-{tag}"
        cpus = settings.cpus
        self.supervisor = Supervisor([
            WorkerSpec(index=i, cpu=cpus[i % len(cpus)] if cpus else None,
                       batches_in=self.endpoint_in, batches_out=self.endpoint_out,
                       sas=self.records, capacity=settings.max_packets,
                       slot_size=settings.slot_size)
            for i in range(settings.workers)])
        self._free: list[Batch] = []
        self._sending: deque[tuple[Batch, zmq.MessageTracker | None]] = deque()
        self._next_id = 0
        self._stop = False

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
        self.supervisor.start()
        poller = zmq.Poller()
        inside_fds = set(self.inside.fileno_list())
        outside_fds = set(self.outside.fileno_list())
        for fd in inside_fds | outside_fds:
            poller.register(fd, zmq.POLLIN)
        poller.register(from_workers, zmq.POLLIN)
        last_check = time.monotonic()
        try:
            while not self._stop and not (until is not None and until()):
                events = dict(poller.poll(10))
                now = time.monotonic()
                if self.reassembler.outstanding() < self.settings.max_in_flight:
                    if any(fd in events for fd in inside_fds):
                        self._ingest(self.inside, Direction.OUTBOUND, to_workers, now)
                    if any(fd in events for fd in outside_fds):
                        self._ingest(self.outside, Direction.INBOUND, to_workers, now)
                if from_workers in events:
                    self._collect(from_workers, now)
                self.reassembler.pop(now, self._release)
                if now - last_check > 0.05:
                    self.supervisor.check()
                    last_check = now
        finally:
            self.supervisor.stop()
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
        else:
            self.dispatcher.inbound(batch)
        batch.batch_id = self._next_id
        self._next_id += 1
        if not (batch.meta["verdict"][: batch.count] == Verdict.PASS).any():
            # Nothing for a worker to do: straight to the reassembler, keeping its place.
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
            self.outside.write_batch(batch)
            self.stats.outbound.add(batch)
        else:
            self.inside.write_batch(batch)
            self.stats.inbound.add(batch)
        self._free.append(batch)
