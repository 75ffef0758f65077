"""Packets left where they were read: the reader's memory, shared with the workers.

With one I/O process feeding many workers, the I/O process's time per batch bounds the data
plane. Measured on the 16-core machine (bench/scaling.py, one SA, 1400-byte packets), its
largest single cost was copying every packet from where it was read into its batch slot:
300 of about 650 µs per 1024-packet batch under eight workers, which capped one SA at about
1.7 M packets/s whatever the number of workers.

So a reader whose memory other processes can map (an AF_PACKET V3 RX ring: its socket
descriptor, passed to each worker at spawn, maps the same pages) does not copy the packets
of a batch that goes to a worker. It records in ``Batch.src`` where each packet lies and
copies into its slot only the first ``head`` bytes the I/O process needs there:

* outbound, none (``head`` 0): the SPD lookup reads the addresses where the packet lies
  (pipeline/dispatch.py), and the MSS clamp is the worker's (workers/main.py MssLimits);
* inbound, :data:`HEAD` bytes: the outer IP and UDP headers, the SPI and sequence number,
  read by the dispatcher's SA lookup and replay pre-check.

The worker that takes such a batch copies the rest (:func:`complete`) before it encrypts or
decrypts, in parallel with the other workers. The reader keeps that memory (a ring does not
hand the block back to the kernel) until the batch comes back or is lost with its worker.

A batch the I/O process keeps (short of ``handoff_min``, a lone packet, no worker ready) it
completes at once, and everything downstream sees whole packets as before; so does one with
a packet too big for its SA (the ICMP error quotes it, fragmentation copies it).
"""

from __future__ import annotations

import mmap
import os
from multiprocessing import reduction
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.batch import HEADROOM, Batch, Verdict

__all__ = ["HEAD", "SharedRegion", "complete", "copy_heads", "copy_segments"]

# Bytes of an inbound packet the I/O process copies: the largest outer header stack it reads
# is IPv4 with options (60) + UDP (8) + ESP's SPI and sequence number (8): 76.
HEAD = 128


class SharedRegion:
    """Memory a reader fills and workers read: a file descriptor to map, and its size.

    ``data`` is the creating process's own view (not pickled). Pickled into a worker's spec
    at spawn, the descriptor travels with the new process (multiprocessing passes it); the
    worker calls :meth:`map` once, which maps it read-only and closes the descriptor.
    """

    def __init__(self, fd: int, size: int, data: npt.NDArray[np.uint8] | None = None) -> None:
        if size < HEAD:
            raise ValueError(f"a region of {size} bytes is smaller than a head ({HEAD})")
        self.fd = fd
        self.size = size
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (reduction.DupFd(self.fd), self.size)

    def map(self) -> npt.NDArray[np.uint8]:
        """The region, read-only (in the worker); the descriptor is closed."""
        if self.data is None:
            try:
                mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
            finally:
                os.close(self.fd)
            self.data = np.frombuffer(mm, dtype=np.uint8)
        return self.data


def _rebuild(dup: Any, size: int) -> SharedRegion:
    return SharedRegion(dup.detach(), size)


def copy_segments(dst: npt.NDArray[np.uint8], at: npt.NDArray[np.int64],
                  src: npt.NDArray[np.uint8], frm: npt.NDArray[np.int64],
                  length: npt.NDArray[np.int64]) -> None:
    """``dst[at[i] : at[i] + length[i]] = src[frm[i] : frm[i] + length[i]]`` for every i,
    the segments not overlapping in ``dst``.

    One Python-level copy per packet costs about 0.4 µs, more than the 1400 bytes it moves.
    But packets of one size lie at a fixed stride both in a ring block (frames back to back)
    and in a batch (one per slot): each run of equal lengths at constant strides is one
    strided 2-D copy. Bulk traffic is long runs."""
    n = len(length)
    if not n:
        return
    if n == 1:
        a, f, m = int(at[0]), int(frm[0]), int(length[0])
        dst[a : a + m] = src[f : f + m]
        return
    step_to, step_from = np.diff(at), np.diff(frm)
    # A run ends after packet i when packet i + 1 differs in length, or the step to it
    # differs from the step into i (a run may end early; it is never wrong).
    ends = length[1:] != length[:-1]
    ends[1:] |= (step_to[1:] != step_to[:-1]) | (step_from[1:] != step_from[:-1])
    bounds = [0, *(np.flatnonzero(ends) + 1).tolist(), n]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        m = int(length[a])
        t0, f0 = int(at[a]), int(frm[a])
        if b - a == 1:
            dst[t0 : t0 + m] = src[f0 : f0 + m]
            continue
        k, st, sf = b - a, int(step_to[a]), int(step_from[a])
        if st <= 0 or sf <= 0:  # not laid out forwards: packet by packet
            for i in range(a, b):
                t, f = int(at[i]), int(frm[i])
                dst[t : t + m] = src[f : f + m]
            continue
        # (np.ndarray checks that each view lies within its buffer.)
        np.copyto(np.ndarray((k, m), np.uint8, dst, t0, (st, 1)),
                  np.ndarray((k, m), np.uint8, src, f0, (sf, 1)))


def copy_heads(batch: Batch, first: int, region: npt.NDArray[np.uint8],
               src: npt.NDArray[np.int64], length: npt.NDArray[np.int64],
               head: int = HEAD) -> None:
    """Slots ``first``, ``first + 1``, ...: the packets at ``src`` in ``region`` (``length``
    bytes each), their first ``head`` bytes only (HEAD, or 0: nothing). Sets their
    ``offset``, ``length`` and ``src``, and ``batch.head``; the caller sets
    ``batch.region`` and the rest of the metadata."""
    if head not in (0, HEAD):
        raise ValueError(f"a head is {HEAD} bytes or none, got {head}")
    batch.head = head
    k = len(src)
    if not k:
        return
    if k > batch.capacity - first or int(length.max()) > batch.max_packet:
        raise ValueError("packets do not fit the batch")
    if int(src.min()) < 0 or int((src + length).max()) > region.shape[0]:
        raise ValueError("packets outside the region")
    offset = batch.slot_starts()[first : first + k] + HEADROOM
    if head:
        copy_segments(batch.data, offset, region, src, np.minimum(length, head))
    sl = slice(first, first + k)
    batch.meta["offset"][sl] = offset
    batch.meta["length"][sl] = length
    batch.src[sl] = src


def complete(batch: Batch, region: npt.NDArray[np.uint8]) -> int:
    """Copy the rest of each passing packet of a heads-only batch from ``region`` (the
    others are dropped: nothing reads them again; a ``src`` of -1 is a packet read whole)
    and mark the batch whole. Returns the packets completed. The packets' slots and lengths
    are as :func:`copy_heads` left them: nothing before this moves them."""
    n, head = batch.count, batch.head
    meta = batch.meta[:n]
    length = meta["length"].astype(np.int64)
    src = batch.src[:n]
    todo = np.flatnonzero((length > head) & (meta["verdict"] == Verdict.PASS) & (src >= 0))
    batch.region = -1
    if todo.size:
        copy_segments(batch.data, meta["offset"][todo].astype(np.int64) + head, region,
                      src[todo] + head, length[todo] - head)
    return int(todo.size)
