"""Batches over ZeroMQ (DESIGN §3): one message per batch, never one per packet.

The packets and their metadata stay in shared memory (pipeline/shmpool.py); a message hands a
buffer over. Its one frame is the header ``<Q B B H I I`` (20 bytes): batch id, direction,
flags, packet count, the buffer's index in the pool, and the SA table version the batch was
classified with: a worker that has not yet applied that version of the controller's table
(pipeline/sadist.py) waits for it. Flags: bit 0 set says the slots hold packet heads only,
the packets being whole in the shared region numbered by bits 1-3 (``Batch.region``,
pipeline/region.py); bit 4, that the slots hold nothing of them (``Batch.head`` 0).

The I/O process talks to its workers over one ROUTER socket, each worker over a DEALER whose
identity is its index (:func:`worker_identity`), so the I/O process knows which worker holds
which buffer. A worker announces itself with :data:`HELLO` when it is ready for batches.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import TYPE_CHECKING, NamedTuple

from pipeline.batch import Batch
from pipeline.region import HEAD

if TYPE_CHECKING:
    from pipeline.shmpool import BatchPool

__all__ = ["HEADER", "HELLO", "MAX_REGIONS", "Direction", "Handoff", "TransportError", "names",
           "pack", "unpack", "worker_identity"]

HEADER = struct.Struct("<QBBHII")
HELLO = b"ready"  # a worker's first message: it has its SA table and takes batches


class Direction(IntEnum):
    """What a batch is for: the worker picks encap or decap from it."""

    OUTBOUND = 0  # inside -> outside: encapsulate
    INBOUND = 1  # outside -> inside: decapsulate


class TransportError(ValueError):
    """A malformed batch message (wrong size, a buffer or count outside the pool): a bug or a
    foreign sender."""


def worker_identity(index: int) -> bytes:
    return b"w%d" % index


HEADS = 0x01  # flags: heads only, the region's number above this bit
EMPTY = 0x10  # with HEADS: not even the heads (Batch.head 0)
MAX_REGIONS = 8


def pack(batch: Batch, direction: Direction) -> bytes:
    """The message that hands ``batch`` (a buffer of the pool) over."""
    if batch.buffer < 0:
        raise ValueError("only a batch of the shared pool can be handed over")
    if not -1 <= batch.region < MAX_REGIONS:
        raise ValueError(f"region {batch.region} out of range")
    flags = HEADS | batch.region << 1 | (0 if batch.head else EMPTY) \
        if batch.region >= 0 else 0
    return HEADER.pack(batch.batch_id, direction, flags, batch.count, batch.buffer,
                       batch.sa_version)


class Handoff(NamedTuple):
    batch: Batch
    direction: Direction


def _header(frame: bytes) -> tuple[int, int, int, int, int, int]:
    if len(frame) != HEADER.size:
        raise TransportError(f"batch header of {len(frame)} bytes, want {HEADER.size}")
    return HEADER.unpack(frame)


def names(frame: bytes) -> tuple[int, int]:
    """(batch id, buffer) of a message, nothing changed: whether the buffer is the
    sender's to name is the receiver's ledger's to say before :func:`unpack` writes the
    header into that buffer's batch."""
    batch_id, _, _, _, buffer, _ = _header(frame)
    return batch_id, buffer


def unpack(frame: bytes, pool: BatchPool) -> Handoff:
    """The batch a message names, with its count, id, SA version and region set from the
    header."""
    batch_id, direction, flags, n, buffer, sa_version = _header(frame)
    if buffer >= len(pool) or n > pool.capacity:
        raise TransportError(f"batch of {n} packets in buffer {buffer} does not fit the pool "
                             f"of {len(pool)} x {pool.capacity}")
    if direction not in (Direction.OUTBOUND, Direction.INBOUND):
        raise TransportError(f"unknown direction {direction}")
    if flags & ~(HEADS | EMPTY | (MAX_REGIONS - 1) << 1) or flags & (HEADS | EMPTY) == EMPTY:
        raise TransportError(f"unknown flags {flags:#x}")
    batch = pool[buffer]
    batch.count, batch.batch_id, batch.sa_version = n, batch_id, sa_version
    batch.region = (flags >> 1) & (MAX_REGIONS - 1) if flags & HEADS else -1
    batch.head = 0 if flags & EMPTY else HEAD
    return Handoff(batch, Direction(direction))
