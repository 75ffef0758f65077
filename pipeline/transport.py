"""Batches over ZeroMQ (DESIGN §3): one multipart message per batch, never one per packet.

Wire form, three frames:
  1. header: ``<Q B B H I I``: batch id, direction, flags, packet count, slot size, and the
     SA table version the batch was classified with (20 bytes): a worker that has not yet
     applied that version of the controller's table (pipeline/sadist.py) waits for it
  2. metadata: ``count`` records of ``META_DTYPE``
  3. data: the first ``count`` slots of the batch buffer

Frames are sent with ``copy=False`` (ZeroMQ reads the numpy buffers directly) and received
with ``recv_into`` straight into a preallocated ``Batch``: no per-batch allocation on either
side. The sender must not touch a batch until ZeroMQ is done with it; ``send_batch`` returns
the ``MessageTracker`` for that (or the caller double-buffers).
"""

from __future__ import annotations

import struct
from enum import IntEnum

import zmq

from pipeline.batch import META_DTYPE, Batch

__all__ = ["HEADER", "Direction", "TransportError", "recv_batch", "send_batch"]

HEADER = struct.Struct("<QBBHII")


class Direction(IntEnum):
    """What a batch is for: the worker picks encap or decap from it."""

    OUTBOUND = 0  # inside -> outside: encapsulate
    INBOUND = 1  # outside -> inside: decapsulate


class TransportError(ValueError):
    """A malformed batch message (wrong frame count or sizes): a bug or a foreign sender."""


def send_batch(sock: zmq.Socket[bytes], batch: Batch, direction: Direction, flags: int = 0,
               track: bool = False) -> zmq.MessageTracker | None:
    n = batch.count
    header = HEADER.pack(batch.batch_id, direction, flags, n, batch.slot_size,
                         batch.sa_version)
    meta = memoryview(batch.meta[:n]).cast("B")  # type: ignore[arg-type]
    data = memoryview(batch.data[: n * batch.slot_size])  # type: ignore[arg-type]
    tracker: zmq.MessageTracker | None = sock.send_multipart(
        [header, meta, data], copy=False, track=track)
    return tracker


def recv_batch(sock: zmq.Socket[bytes], batch: Batch, flags: int = 0) -> tuple[Direction, int]:
    """Receive one batch message into ``batch``; returns (direction, flags).

    Raises ``zmq.Again`` when ``flags`` has NOBLOCK and nothing is waiting, and
    ``TransportError`` for a message that is not a batch of this geometry (the rest of it is
    drained so the socket stays usable).
    """
    header = sock.recv(flags)
    try:
        if len(header) != HEADER.size or not sock.getsockopt(zmq.RCVMORE):
            raise TransportError(f"batch header of {len(header)} bytes, want {HEADER.size}")
        batch_id, direction, bflags, n, slot_size, sa_version = HEADER.unpack(header)
        if slot_size != batch.slot_size or n > batch.capacity:
            raise TransportError(
                f"batch of {n} packets in {slot_size}-byte slots does not fit "
                f"{batch.capacity} x {batch.slot_size}")
        meta_len = n * META_DTYPE.itemsize
        got = sock.recv_into(memoryview(batch.meta).cast("B"), nbytes=meta_len)  # type: ignore[arg-type]
        if got != meta_len or not sock.getsockopt(zmq.RCVMORE):
            raise TransportError(f"metadata frame of {got} bytes, want {meta_len}")
        data_len = n * slot_size
        got = sock.recv_into(memoryview(batch.data), nbytes=data_len)  # type: ignore[arg-type]
        if got != data_len:
            raise TransportError(f"data frame of {got} bytes, want {data_len}")
        if sock.getsockopt(zmq.RCVMORE):
            raise TransportError("more than three frames")
    except TransportError:
        while sock.getsockopt(zmq.RCVMORE):
            sock.recv()
        raise
    batch.count = n
    batch.batch_id = batch_id
    batch.sa_version = sa_version
    return Direction(direction), bflags
