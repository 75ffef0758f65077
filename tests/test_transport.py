"""Batches handed between processes: shared buffers (pipeline/shmpool.py), one small ZeroMQ
message naming each (pipeline/transport.py)."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import zmq

from pipeline.batch import Batch, Verdict
from pipeline.shmpool import BatchPool
from pipeline.transport import (
    HEADER,
    HELLO,
    Direction,
    TransportError,
    names,
    pack,
    unpack,
    worker_identity,
)


def _child_flips(path: str, endpoint: str) -> None:
    """Another process: maps the pool, takes the batch a message names, changes it in
    place and hands it back."""
    pool = BatchPool(path, 4, 8, 2048, create=False)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, worker_identity(3))
    sock.connect(endpoint)
    sock.send(HELLO)
    batch, direction = unpack(sock.recv(), pool)
    assert batch.region == 5 and batch.src[: batch.count].tolist() == [7, 8, 9]
    for i in range(batch.count):
        off = int(batch.meta["offset"][i])
        batch.data[off] ^= 0xFF
    batch.meta["verdict"][1] = Verdict.REPLAY
    batch.region = -1  # made whole
    sock.send(pack(batch, direction))
    sock.close(linger=1000)
    ctx.term()


def test_a_batch_crosses_processes_by_buffer_index(tmp_path: Path) -> None:
    path, endpoint = str(tmp_path / "pool"), f"ipc://{tmp_path}/batches"
    with BatchPool(path, 4, 8, 2048, create=True) as pool:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        ctx = zmq.Context.instance()
        router = ctx.socket(zmq.ROUTER)
        router.bind(endpoint)
        child = multiprocessing.get_context("spawn").Process(
            target=_child_flips, args=(path, endpoint))
        child.start()
        try:
            assert router.poll(20000)
            ident, hello = router.recv_multipart()
            assert (ident, hello) == (worker_identity(3), HELLO)
            packets = [os.urandom(n) for n in (20, 1400, 64)]
            batch = pool[2]
            batch.load(packets, sa=3)
            batch.batch_id, batch.sa_version = 41, 7
            batch.region, batch.src[:3] = 5, [7, 8, 9]  # heads of packets in region 5
            router.send_multipart([ident, pack(batch, Direction.INBOUND)])
            assert router.poll(20000)
            ident, frame = router.recv_multipart()
            back, direction = unpack(frame, pool)
            assert back is pool[2] and (direction, back.region) == (Direction.INBOUND, -1)
            assert (back.count, back.batch_id, back.sa_version) == (3, 41, 7)
            # The child's writes are visible here: the same memory, no copy.
            assert [p for _, p in back] == [bytes([p[0] ^ 0xFF]) + p[1:] for p in packets]
            assert back.verdict_counts() == {"replay": 1}
        finally:
            child.join(10)
            router.close(linger=0)
        assert child.exitcode == 0
    assert not os.path.exists(path)  # the creator removes it


def test_buffers_do_not_overlap(tmp_path: Path) -> None:
    with BatchPool(str(tmp_path / "pool"), 3, 4, 1024, create=True) as pool:
        for i, b in enumerate(pool):
            b.data[:] = i
            b.meta["seq"][:] = i
            b.src[:] = -i
        for i, b in enumerate(pool):
            assert (b.data == i).all() and (b.meta["seq"] == i).all() and b.buffer == i
            assert (b.src == -i).all()


def test_a_pool_of_another_geometry_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "pool")
    with BatchPool(path, 4, 8, 2048, create=True):
        with pytest.raises(ValueError, match="want"):
            BatchPool(path, 5, 8, 2048, create=False)
        with pytest.raises(FileExistsError):
            BatchPool(path, 4, 8, 2048, create=True)  # never someone else's file


def test_malformed_messages_are_refused(tmp_path: Path) -> None:
    with BatchPool(str(tmp_path / "pool"), 2, 4, 1024, create=True) as pool:
        with pytest.raises(TransportError, match="header"):
            unpack(b"not a header", pool)
        with pytest.raises(TransportError, match="does not fit"):
            unpack(HEADER.pack(1, 0, 0, 1, 2, 0), pool)  # buffer 2 of 2
        with pytest.raises(TransportError, match="does not fit"):
            unpack(HEADER.pack(1, 0, 0, 5, 0, 0), pool)  # 5 packets in 4 slots
        with pytest.raises(TransportError, match="direction"):
            unpack(HEADER.pack(1, 9, 0, 1, 0, 0), pool)
        with pytest.raises(TransportError, match="flags"):
            unpack(HEADER.pack(1, 0, 0x20, 1, 0, 0), pool)  # an unknown bit
        with pytest.raises(TransportError, match="flags"):
            unpack(HEADER.pack(1, 0, 0x10, 1, 0, 0), pool)  # "not even heads" of no region
        with pytest.raises(ValueError, match="pool"):
            pack(Batch(4), Direction.OUTBOUND)  # a private batch cannot be handed over
        pool[0].region = 8
        with pytest.raises(ValueError, match="region"):
            pack(pool[0], Direction.OUTBOUND)
        assert np.all(pool[0].meta["verdict"] == 0)


def test_a_batch_names_its_region_and_how_much_its_slots_hold(tmp_path: Path) -> None:
    with BatchPool(str(tmp_path / "pool"), 2, 4, 1024, create=True) as pool:
        batch = pool[1]
        batch.count = 2
        for region, head in ((0, 128), (7, 0), (-1, 0)):
            batch.region, batch.head = region, head
            frame = pack(batch, Direction.OUTBOUND)
            batch.region, batch.head = 3, 99  # overwritten by unpack
            back, _ = unpack(frame, pool)
            assert (back.region, back.head if region >= 0 else 0) == (region, head)


def test_a_message_is_read_for_its_names_before_it_writes_a_batch(tmp_path: Path) -> None:
    """The I/O process checks its ledger (is this buffer out at the sender?) with
    ``names``, which writes nothing: a late answer naming a buffer in use again must not
    change that batch's count, id or region."""
    with BatchPool(str(tmp_path / "pool"), 2, 4, 1024, create=True) as pool:
        live = pool[1]
        live.count, live.batch_id, live.region = 3, 77, -1
        frame = HEADER.pack(5, 0, 0x15, 1, 1, 0)  # batch 5 in buffer 1, heads of region 2
        assert names(frame) == (5, 1)
        assert (live.count, live.batch_id, live.region) == (3, 77, -1)
        with pytest.raises(TransportError, match="header"):
            names(frame[:-1])
