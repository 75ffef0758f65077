"""The worker process: pinned to one core, it turns batches around (DESIGN §2, §3).

It pulls a batch from the dispatcher's ZeroMQ socket straight into its one preallocated
``Batch``, encapsulates or decapsulates it in place, and pushes it to the reassembler. It holds
nothing but SA keys: sequence numbers come in the batch metadata and replay windows live in
the I/O process, so any worker can take any batch and a restarted one needs only the SAs.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass

import zmq

from pipeline.batch import SLOT_SIZE, Batch
from pipeline.dispatch import Policy
from pipeline.sadist import SaSubscriber
from pipeline.satable import SaRecord
from pipeline.transport import Direction, TransportError, recv_batch, send_batch
from workers.esp import EspCodec
from workers.sa import SaTable

__all__ = ["TableSink", "WorkerSpec", "run_worker"]


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    cpu: int | None  # the core to pin to; None leaves affinity alone
    batches_in: str  # ZeroMQ endpoint of the dispatcher (PUSH side binds)
    batches_out: str  # ZeroMQ endpoint of the reassembler (PULL side binds)
    sas: tuple[tuple[int, SaRecord], ...]  # (SA index, record), indices as the I/O process has
    capacity: int = 256
    slot_size: int = SLOT_SIZE
    # The controller's SA distribution (pub, snapshot endpoints); None: ``sas`` is all.
    sa_updates: tuple[str, str] | None = None


class TableSink:
    """A worker's SA table as a subscriber of the controller's (pipeline/sadist.py)."""

    def __init__(self, table: SaTable) -> None:
        self.table = table

    def reset(self, sas: dict[int, SaRecord], policies: Sequence[Policy]) -> None:
        for sa in list(self.table):
            if sas.get(sa.index) != sa.record:
                self.table.remove(sa.index)
        for index, record in sas.items():
            current = self.table[index]
            if current is None or current.record != record:
                self.table.install(record, index)

    def install(self, index: int, record: SaRecord) -> None:
        self.table.install(record, index)

    def remove(self, index: int) -> None:
        self.table.remove(index)

    def set_policies(self, policies: Sequence[Policy]) -> None:
        pass  # the SPD is the dispatcher's


def run_worker(spec: WorkerSpec) -> None:
    """The process body; returns on SIGTERM/SIGINT."""
    if spec.cpu is not None:
        os.sched_setaffinity(0, {spec.cpu})
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    codec = EspCodec(install_all(spec.sas), replay=False)
    ctx = zmq.Context()
    updates: SaSubscriber | None = None
    if spec.sa_updates is not None:
        updates = SaSubscriber(ctx, *spec.sa_updates, sink=TableSink(codec.sas))
        updates.sync()  # a restarted worker resyncs here (DESIGN §2)
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    pull.connect(spec.batches_in)
    push.connect(spec.batches_out)
    # Two buffers: ZeroMQ sends one (copy=False reads it in its I/O thread) while the next
    # batch is received into the other; a buffer is reused only once its send is done.
    buffers = [Batch(spec.capacity, spec.slot_size) for _ in range(2)]
    trackers: list[zmq.MessageTracker | None] = [None, None]
    turn = 0
    try:
        while not stop:
            if updates is not None:
                updates.drain()
            if not pull.poll(100):
                continue
            tracker = trackers[turn]
            if tracker is not None:
                tracker.wait()
            batch = buffers[turn]
            try:
                direction, flags = recv_batch(pull, batch)
            except TransportError:
                continue
            if updates is not None and batch.sa_version > updates.version:
                updates.wait_for(batch.sa_version)  # classified with SAs not seen here yet
            process(codec, batch, direction)
            trackers[turn] = send_batch(push, batch, direction, flags, track=True)
            turn ^= 1
    finally:
        if updates is not None:
            updates.close()
        pull.close(linger=0)
        push.close(linger=1000)
        ctx.term()


def process(codec: EspCodec, batch: Batch, direction: Direction) -> None:
    if direction is Direction.OUTBOUND:
        codec.encap(batch)
    else:
        codec.decap(batch)


def install_all(records: Sequence[tuple[int, SaRecord]]) -> SaTable:
    sas = SaTable()
    for index, record in records:
        sas.install(record, index)
    return sas
