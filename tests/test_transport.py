"""Batches cross real ZeroMQ sockets intact, in one message each, into preallocated batches."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zmq

from pipeline.batch import Batch, Verdict
from pipeline.transport import Direction, TransportError, recv_batch, send_batch


@pytest.fixture
def pair(tmp_path: os.PathLike[str]) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    ctx = zmq.Context.instance()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    endpoint = f"ipc://{tmp_path}/batches"
    pull.bind(endpoint)
    push.connect(endpoint)
    yield push, pull
    push.close(linger=0)
    pull.close(linger=0)


def test_batch_round_trip_over_ipc(pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]) -> None:
    push, pull = pair
    packets = [os.urandom(n) for n in (20, 1400, 64, 1)]
    out = Batch(8)
    out.load(packets, sa=3)
    out.batch_id = 41
    out.meta["seq"][:4] = [7, 8, 9, 10]
    out.meta["verdict"][1] = Verdict.REPLAY
    send_batch(push, out, Direction.INBOUND, flags=5)
    into = Batch(8)
    into.data[:] = 0xAA  # stale content must not matter
    direction, flags = recv_batch(pull, into)
    assert (direction, flags, into.count, into.batch_id) == (Direction.INBOUND, 5, 4, 41)
    assert np.array_equal(into.meta[:4], out.meta[:4])
    assert [p for _, p in into] == packets
    assert into.verdict_counts() == {"replay": 1}


def test_receive_reuses_the_same_buffers(
        pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]) -> None:
    push, pull = pair
    into = Batch(4)
    data_ptr = into.data.ctypes.data
    for i in range(3):
        b = Batch(4)
        b.load([bytes([i]) * 100])
        b.batch_id = i
        send_batch(push, b, Direction.OUTBOUND)
        recv_batch(pull, into)
        assert into.batch_id == i and into.packet(0) == bytes([i]) * 100
    assert into.data.ctypes.data == data_ptr


def test_foreign_messages_are_refused_and_the_socket_stays_usable(
        pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]) -> None:
    push, pull = pair
    into = Batch(4)
    push.send_multipart([b"not a header", b"x"])
    with pytest.raises(TransportError, match="header"):
        recv_batch(pull, into)
    big = Batch(8)
    big.load([b"x"] * 8)
    send_batch(push, big, Direction.OUTBOUND)
    with pytest.raises(TransportError, match="does not fit"):
        recv_batch(pull, into)
    ok = Batch(4)
    ok.load([b"fine"])
    send_batch(push, ok, Direction.OUTBOUND)
    recv_batch(pull, into)
    assert into.packet(0) == b"fine"
