"""Multi-core scaling of the data plane on ONE SA: packets/s for 1, 2, 4, ... workers.

The whole pipeline runs as in production (dispatcher with sequence-number blocks, ZeroMQ
batches, pinned worker processes, in-order reassembly); only the packet I/O is synthetic: the
inside always has a full batch of 1400-byte packets ready in shared memory, and the outside
counts what leaves. Two readers, side by side: "copy" copies every packet into its batch
slot in the I/O process (a TUN read, or a TPACKET_V2 ring); "heads" copies nothing, the SPD
lookup reads the addresses in place and the worker copies the packets (pipeline/region.py,
what a TPACKET_V3 ring does for outbound batches that go to workers; with one worker the
data plane copies as "copy" does, see pipeline/dataplane.py). The I/O process takes
one core; workers get the others, round robin (more workers than cores share).

    python -m bench.scaling                 # table: each count with each reader
    python -m bench.scaling --json          # one JSON object per line
    python -m bench.scaling --reader heads  # only the heads-only reader
    python -m bench.scaling --counts 1,8 --repeat 3   # medians of 3 interleaved rounds
    python -m bench.scaling --profile io.prof   # the I/O loop at the most workers, profiled
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ipaddress
import json
import mmap
import os
import pstats
import socket
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from bench.esp_codec import inner_packet
from pipeline.batch import HEADROOM, Batch
from pipeline.cpus import siblings, spread
from pipeline.dataplane import DataPlane, Settings
from pipeline.dispatch import Policy
from pipeline.region import SharedRegion, copy_heads
from pipeline.satable import Direction, SaRecord

LOCAL = ipaddress.ip_address("192.0.2.1")
REMOTE = ipaddress.ip_address("192.0.2.2")


class Source:
    """Inside: a full batch is always ready. Reading it copies each packet's bytes into its
    slot (what a TUN read, or a ring read by copy, must do at least), and the metadata.

    The packets lie in shared memory, as in an AF_PACKET RX ring."""

    def __init__(self, size: int, batch: int) -> None:
        self.template = Batch(batch)
        self.template.load([inner_packet(size, i) for i in range(batch)])
        self.size = size
        n, t = self.template.count, self.template
        self._fd = os.memfd_create("espline-bench-source")
        os.ftruncate(self._fd, t.data.nbytes)
        self._mm = mmap.mmap(self._fd, t.data.nbytes)
        self._ring = np.frombuffer(self._mm, dtype=np.uint8)
        self._ring[:] = t.data
        self._src = self._ring[: n * t.slot_size].reshape(n, -1)[:, HEADROOM : HEADROOM + size]
        self._offsets = t.meta["offset"][:n].astype(np.int64)
        self._lengths = t.meta["length"][:n].astype(np.int64)
        # A socket that stays readable: poll always reports the inside ready.
        self._r, self._w = socket.socketpair()
        self._w.send(b"x")

    def fileno_list(self) -> list[int]:
        return [self._r.fileno()]

    def read_batch(self, batch: Batch, max_packets: int) -> int:
        n = self.template.count
        batch.meta[:n] = self.template.meta[:n]
        np.copyto(batch.data[: n * batch.slot_size].reshape(n, -1)[
            :, HEADROOM : HEADROOM + self.size], self._src)
        batch.count = n
        return n

    def write_batch(self, batch: Batch) -> int:
        return 0

    def close(self) -> None:
        os.close(self._fd)  # the mapping goes with the last view of it
        self._r.close()
        self._w.close()


class HeadsSource(Source):
    """:class:`Source` as a :class:`pipeline.dataplane.HeadsReader`: for batches that go to
    workers it copies nothing of the packets (outbound, the SPD lookup reads their
    addresses where they lie), and the workers copy them from the shared memory
    (pipeline/region.py), as the data plane does with a TPACKET_V3 ring.
    The ring's own per-frame work (the frame-list walk, the per-frame checks) is not
    modelled."""

    def __init__(self, size: int, batch: int) -> None:
        super().__init__(size, batch)
        self.released = 0

    def shared_region(self) -> SharedRegion:
        return SharedRegion(self._fd, self._ring.size, self._ring)

    def read_heads(self, batch: Batch, max_packets: int, region: int, head: int) -> int:
        n = self.template.count
        batch.meta[:n] = self.template.meta[:n]
        copy_heads(batch, 0, self._ring, self._offsets, self._lengths, head)
        batch.count, batch.region = n, region
        return n

    def release(self, token: int) -> None:
        self.released += 1


class Sink:
    """Outside: counts packets and bytes that leave."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self.packets = 0
        self.bytes = 0

    def fileno_list(self) -> list[int]:
        return [self._r.fileno()]

    def read_batch(self, batch: Batch, max_packets: int) -> int:
        return 0

    def write_batch(self, batch: Batch) -> int:
        n = batch.count
        ok = batch.meta["verdict"][:n] == 0
        self.packets += int(ok.sum())
        self.bytes += int(batch.meta["length"][:n][ok].sum())
        return n


def placement(io_cpus: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the I/O process's CPUs, the workers' in the order they are handed out): the I/O
    process takes the first core (both its hardware threads when ``io_cpus`` is 2 and it
    has two: its loop and its ZeroMQ I/O thread), the workers the others, one thread of
    each core before any second one (pipeline/cpus.py)."""
    allowed = os.sched_getaffinity(0)
    order = spread(allowed)
    io = siblings(order[0], allowed)[:io_cpus]
    if len(io) < io_cpus:
        io = order[:io_cpus]
    rest = tuple(c for c in order if c not in io)
    return io, rest or io


READERS = ("copy", "heads")


def measure(workers: int, seconds: float, size: int, batch: int, per_worker: int,
            where: tuple[tuple[int, ...], tuple[int, ...]],
            profile: str | None = None, reader: str = "heads") -> dict[str, Any]:
    """``where``: (the I/O process's CPUs, the workers'), from ``placement``. ``reader``:
    "copy" (the I/O process copies every packet into its slot) or "heads" (it copies the
    heads, the workers the rest: pipeline/region.py)."""
    io, worker_cpus = where
    records = [(0, SaRecord(spi=0x1001, direction=Direction.OUT, alg="aes128gcm16",
                            local_addr=LOCAL, remote_addr=REMOTE, enc_key=os.urandom(20)))]
    policy = Policy((ipaddress.ip_network("10.1.0.0/24"),),
                    (ipaddress.ip_network("10.2.0.0/24"),), sa_index=0)
    source = HeadsSource(size, batch) if reader == "heads" else Source(size, batch)
    sink = Sink()
    with tempfile.TemporaryDirectory() as rundir, contextlib.closing(source):
        plane = DataPlane(Settings(workers=workers, cpus=worker_cpus, max_packets=batch,
                                   runtime_dir=rundir,
                                   max_in_flight=per_worker * (workers + 1)),
                          records, [policy], source, sink)
        cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, set(io))
        prof = cProfile.Profile() if profile else None
        target = plane.run if prof is None else (lambda: prof.runcall(plane.run))
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        try:
            # Workers start (spawn: a fresh interpreter each, slow with many at once);
            # until one is ready the I/O process does every batch itself.
            deadline = time.monotonic() + 60
            while len(plane.ready) < workers and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # warm up
            assert thread.ident is not None
            io_clock = time.pthread_getcpuclockid(thread.ident)  # the I/O loop's CPU time
            p0, t0, c0 = sink.packets, time.perf_counter(), time.clock_gettime(io_clock)
            time.sleep(seconds)
            p1, t1, c1 = sink.packets, time.perf_counter(), time.clock_gettime(io_clock)
        finally:
            plane.stop()
            thread.join(10)
            os.sched_setaffinity(0, cpus)
        if prof is not None and profile:
            prof.dump_stats(profile)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    pps = (p1 - p0) / (t1 - t0)
    # The I/O loop's CPU per batch it moved: what caps packets/s once workers are plenty
    # (batch / this), whatever the core count of the machine measured on.
    batches = (p1 - p0) / batch
    return {"reader": reader, "workers": workers, "pps": pps, "gbps": pps * size * 8 / 1e9,
            "io_busy_pct": 100.0 * (c1 - c0) / (t1 - t0),
            "io_us_per_batch": (c1 - c0) / batches * 1e6 if batches else None,
            "io_cpus": list(io), "worker_cpus": list(worker_cpus[:workers]),
            "lost_batches": plane.reassembler.skipped,
            "inline_batches": plane.stats.inline_batches,
            "heads_batches": plane.stats.heads_batches}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=1400)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--max-workers", type=int, default=0,
                    help="default: one per CPU the I/O process leaves")
    ap.add_argument("--per-worker", type=int, default=2,
                    help="batches out at each worker (default 2: one being processed, one "
                         "waiting); more buffers in flight cost cache")
    ap.add_argument("--io-cpus", type=int, default=1, choices=(1, 2),
                    help="CPUs for the I/O process (default 1; 2: its loop and its ZeroMQ "
                         "I/O thread each get one, the second hardware thread of its core "
                         "where there is one); the workers get the others")
    ap.add_argument("--profile", metavar="FILE",
                    help="run the I/O loop under cProfile at the largest worker count, dump "
                         "the stats to FILE and print the top functions to stderr")
    ap.add_argument("--reader", choices=(*READERS, "both"), default="both",
                    help="copy: the I/O process copies each packet into its batch; heads: "
                         "only its first bytes, the worker the rest (pipeline/region.py); "
                         "both (default): each worker count with each, side by side")
    ap.add_argument("--counts", type=lambda v: [int(c) for c in v.split(",")],
                    help="worker counts, e.g. 1,8 (default: 1, 2, 4, ... up to --max-workers)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds over every (count, reader), interleaved; the table gives "
                         "each one's median and range, the ratio is of medians (default 1)")
    args = ap.parse_args(argv)
    readers = READERS if args.reader == "both" else (args.reader,)
    io, worker_cpus = placement(args.io_cpus)
    args.max_workers = args.max_workers or len(worker_cpus)
    counts = args.counts
    if not counts:
        counts, w = [], 1
        while w <= args.max_workers:
            counts.append(w)
            w *= 2
        if counts[-1] != args.max_workers:
            counts.append(args.max_workers)
    if not args.json:
        print(f"cores: {len(os.sched_getaffinity(0))}, one SA (aes128gcm16), "
              f"{args.size}-byte packets, batch {args.batch}; I/O process on CPUs "
              f"{list(io)}, workers on {list(worker_cpus)} in that order; "
              f"{args.repeat} round(s)")
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    last = (counts[-1], readers[-1])
    for round_ in range(args.repeat):
        for w in counts:
            for reader in readers:
                profile = args.profile if (w, reader) == last and round_ == 0 else None
                row = measure(w, args.seconds, args.size, args.batch, args.per_worker,
                              (io, worker_cpus), profile, reader)
                row["round"] = round_
                runs.setdefault((w, reader), []).append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
    median = {key: statistics.median(r["pps"] for r in rows) for key, rows in runs.items()}
    io_us = {key: statistics.median(r["io_us_per_batch"] or 0.0 for r in rows)
             for key, rows in runs.items()}
    if args.json:
        for (w, reader), rows in runs.items():
            base = median[(counts[0], reader)]
            print(json.dumps({"summary": True, "reader": reader, "workers": w,
                              "pps_median": median[(w, reader)],
                              "pps_runs": [r["pps"] for r in rows],
                              "io_us_per_batch_median": io_us[(w, reader)],
                              "ratio": median[(w, reader)] / base if base else None}))
        return 0
    print(f"{'workers':>7}" + "".join(f" {r + ' pps':>11} {'range':>19} {'ratio':>6}"
                                      f" {'io us/b':>7}" for r in readers))
    for w in counts:
        line = f"{w:7d}"
        for reader in readers:
            pps = [r["pps"] for r in runs[(w, reader)]]
            base = median[(counts[0], reader)]
            line += (f" {median[(w, reader)]:11.0f} {f'{min(pps):.0f}-{max(pps):.0f}':>19}"
                     f" {median[(w, reader)] / base if base else float('nan'):6.2f}"
                     f" {io_us[(w, reader)]:7.0f}")
        print(line, flush=True)
    lost = sum(int(r["lost_batches"]) for rows in runs.values() for r in rows)
    print(f"ratio: median packets/s over the median of {counts[0]} worker(s), same reader; "
          f"io us/b: the I/O loop's CPU per batch of {args.batch} (median); "
          f"batches lost: {lost}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
