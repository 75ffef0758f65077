"""The worker process: pinned to one core, it turns batches around (DESIGN §2, §3).

It maps the I/O process's shared batch buffers (pipeline/shmpool.py), takes the buffer each
message names from its DEALER socket, encapsulates or decapsulates it in place, and hands it
back on the same socket (pipeline/transport.py). It holds
nothing but SA keys: sequence numbers come in the batch metadata and replay windows live in
the I/O process, so any worker can take any batch and a restarted one needs only the SAs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from pipeline import heap, mtu
from pipeline.batch import MSS_CLAMPED, SLOT_SIZE, Batch
from pipeline.dispatch import Policy
from pipeline.region import SharedRegion, complete
from pipeline.sadist import SaSubscriber, decode_record
from pipeline.satable import Direction as SaDirection
from pipeline.satable import Mode, SaRecord
from pipeline.satable import Protocol as IpsecProtocol
from pipeline.shmpool import BatchPool
from pipeline.transport import (
    HELLO,
    Direction,
    TransportError,
    pack,
    unpack,
    worker_identity,
)
from workers.counters import Counters
from workers.esp import EspCodec
from workers.sa import SaTable

__all__ = ["MssLimits", "TableSink", "WorkerSpec", "run_worker"]


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    cpu: int | None  # the core to pin to; None leaves affinity alone
    batches: str  # ZeroMQ endpoint of the I/O process's ROUTER
    pool: str  # the shared batch buffers' file (pipeline/shmpool.py)
    pool_buffers: int
    sas: tuple[tuple[int, SaRecord], ...]  # (SA index, record), indices as the I/O process has
    capacity: int = 256
    slot_size: int = SLOT_SIZE
    # The controller's SA distribution (pub, snapshot endpoints); None: ``sas`` is all.
    sa_updates: tuple[str, str] | None = None
    # Where to PUSH this worker's counters once a second (the controller's metrics).
    reports: str | None = None
    report_interval: float = 1.0
    # The readers' shared memory, by region number (pipeline/region.py): batches of packet
    # heads name one, and the worker copies the rest of each packet from it.
    regions: tuple[SharedRegion | None, ...] = ()
    # The data plane's MTU settings: a worker clamps the TCP MSS of the outbound batches
    # it takes (MssLimits).
    outside_mtu: int = 1500
    mss_clamp: int | str | None = "auto"


BATCH_BUCKETS = 12  # batch sizes <= 1, 2, 4, ... 1024, and above (controller/metrics.py)


class WorkerStats:
    """What one worker counts: outcomes by verdict per direction, and batch sizes."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.outbound = Counters()
        self.inbound = Counters()
        self.buckets = [0] * BATCH_BUCKETS
        self.packets = 0

    def add(self, batch: Batch, direction: Direction) -> None:
        (self.outbound if direction is Direction.OUTBOUND else self.inbound).add(batch)
        self.buckets[min(max(batch.count - 1, 0).bit_length(), BATCH_BUCKETS - 1)] += 1
        self.packets += batch.count

    def snapshot(self) -> dict[str, object]:
        drops: dict[str, int] = {}
        for c in (self.outbound, self.inbound):
            for reason, n in c.drops().items():
                drops[reason] = drops.get(reason, 0) + n
        return {"worker": self.index, "pid": os.getpid(), "in": self.inbound.passed,
                "out": self.outbound.passed, "drops": drops, "batch_buckets": self.buckets,
                "batch_sum": self.packets}


class MssLimits:
    """The TCP MSS limits of each outbound SA (pipeline/mtu.py ``sa_limits``, as the I/O
    process computes them), for the SYNs of the batches this worker takes: the I/O process
    leaves the clamp of those batches to their worker, which alone reads the whole of each
    packet (pipeline/region.py)."""

    def __init__(self, outside_mtu: int, clamp: int | str | None) -> None:
        self.outside_mtu = outside_mtu
        self.clamp = clamp
        self._memo: dict[int, tuple[object, int, int]] = {}  # index -> (its SA, mss4, mss6)

    def __call__(self, sas: SaTable, batch: Batch) -> int:
        """Clamp ``batch``'s SYNs, marking them MSS_CLAMPED; returns how many."""
        n = batch.count
        if self.clamp is None or not n:
            return 0
        col = batch.meta["sa"][:n]
        first = int(col[0])
        if not np.count_nonzero(col != first):  # one SA: the usual batch
            mss4, mss6 = self._of(sas, first)
            return mtu.clamp_mss(batch, mss4, mss6, mark=MSS_CLAMPED)
        present, which = np.unique(col, return_inverse=True)
        limits = np.array([self._of(sas, i) for i in present.tolist()], dtype=np.int64)
        return mtu.clamp_mss(batch, limits[which, 0], limits[which, 1], mark=MSS_CLAMPED)

    def _of(self, sas: SaTable, index: int) -> tuple[int, int]:
        sa = sas[index]
        memo = self._memo.get(index)
        if memo is not None and memo[0] is sa:
            return memo[1], memo[2]
        mss4 = mss6 = 1 << 16
        if sa is not None and sa.esp is not None:
            rec = sa.record
            _, mss4, mss6 = mtu.sa_limits(self.outside_mtu, self.clamp, sa.esp, rec.ipv6,
                                          rec.encap is not None, rec.mode is Mode.TUNNEL)
        self._memo[index] = (sa, mss4, mss6)
        return mss4, mss6


class TableSink:
    """A worker's SA table as a subscriber of the controller's (pipeline/sadist.py)."""

    def __init__(self, table: SaTable) -> None:
        self.table = table

    def reset(self, sas: dict[int, SaRecord], policies: Mapping[int, Policy]) -> None:
        for sa in list(self.table):
            if sas.get(sa.index) != sa.record:
                self.table.remove(sa.index)
        for index, record in sas.items():
            current = self.table[index]
            if current is None or current.record != record:
                self.table.install(record, index)

    def install(self, index: int, record: SaRecord) -> None:
        self.table.install(record, index)

    def install_encoded(self, index: int, encoded: dict[str, Any]) -> None:
        """Each SA reaches every worker, and most are never used by most of them (batches
        reach workers only under load): its record is decoded and its cipher contexts
        built when a batch first needs it (SaTable.install_deferred)."""
        self.table.install_deferred(index, int(encoded["spi"]), IpsecProtocol(encoded["proto"]),
                                    int(encoded["dir"]) == SaDirection.IN,
                                    functools.partial(decode_record, encoded))

    def remove(self, index: int) -> None:
        self.table.remove(index)

    def set_policies(self, policies: Mapping[int, Policy]) -> None:
        pass  # the SPD is the dispatcher's

    def edit_policies(self, put: Mapping[int, Policy], removed: Collection[int]) -> None:
        pass


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
    codec = EspCodec(install_all(spec.sas), replay=False, count=False)
    ctx = zmq.Context()
    updates: SaSubscriber | None = None
    if spec.sa_updates is not None:
        updates = SaSubscriber(ctx, *spec.sa_updates, sink=TableSink(codec.sas),
                               policies=False)
        updates.sync()  # a restarted worker resyncs here (DESIGN §2)
    pool = BatchPool(spec.pool, spec.pool_buffers, spec.capacity, spec.slot_size,
                     create=False)
    regions = [r.map() if r is not None else None for r in spec.regions]
    clamp = MssLimits(spec.outside_mtu, spec.mss_clamp)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, worker_identity(spec.index))
    sock.connect(spec.batches)
    sock.send(HELLO)
    stats = WorkerStats(spec.index)
    report: zmq.Socket[bytes] | None = None
    if spec.reports is not None:
        report = ctx.socket(zmq.PUSH)
        report.setsockopt(zmq.SNDHWM, 4)
        report.setsockopt(zmq.LINGER, 0)
        report.connect(spec.reports)
    last_report = time.monotonic()
    heap.settle()  # the collector walks only what the batches make
    try:
        while not stop:
            if updates is not None:
                updates.drain()
            if report is not None and time.monotonic() - last_report >= spec.report_interval:
                with contextlib.suppress(zmq.Again):
                    report.send(json.dumps(stats.snapshot()).encode(), zmq.NOBLOCK)
                last_report = time.monotonic()
            if not sock.poll(100):
                continue
            try:
                batch, direction = unpack(sock.recv(), pool)
            except TransportError:
                continue
            region = regions[batch.region] if 0 <= batch.region < len(regions) else None
            if batch.region >= 0 and region is None:
                continue  # a region not given to this worker: never answered, found hung
            if updates is not None and batch.sa_version > updates.version:
                updates.wait_for(batch.sa_version)  # classified with SAs not seen here yet
            if region is not None:
                complete(batch, region)  # the rest of each packet, from the reader's memory
            if direction is Direction.OUTBOUND:
                clamp(codec.sas, batch)
            process(codec, batch, direction)
            stats.add(batch, direction)
            sock.send(pack(batch, direction))
    finally:
        if updates is not None:
            updates.close()
        if report is not None:
            report.close(linger=0)
        sock.close(linger=0)
        ctx.term()
        pool.close()


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
