"""Packet heads in batches, the rest in the reader's shared memory (pipeline/region.py)."""

from __future__ import annotations

import mmap
import multiprocessing
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.batch import HEADROOM, Batch, Verdict
from pipeline.region import HEAD, SharedRegion, complete, copy_heads, copy_segments


def _oracle(dst: np.ndarray, at: list[int], src: np.ndarray, frm: list[int],
            length: list[int]) -> np.ndarray:
    out = dst.copy()
    for a, f, m in zip(at, frm, length, strict=True):
        out[a : a + m] = src[f : f + m]
    return out


@st.composite
def segments(draw: st.DrawFn) -> tuple[list[int], list[int], list[int]]:
    """Segments as a ring and a batch lay them out: runs of one size at one stride (the
    common case), broken by other sizes, other strides, and steps backwards (a ring
    wrapping to its start)."""
    at: list[int] = []
    frm: list[int] = []
    length: list[int] = []
    slot, pos = 0, draw(st.integers(0, 64))
    for _ in range(draw(st.integers(1, 6))):
        m = draw(st.integers(0, 90))
        step = draw(st.sampled_from([m, m + 2, m + 16, 200]))
        if draw(st.booleans()):
            pos = draw(st.integers(0, 64))  # back to the start
        for _ in range(draw(st.integers(1, 5))):
            at.append(slot * 128 + 5)
            frm.append(pos)
            length.append(m)
            slot += 1
            pos += step
    return at, frm, length


@given(segments())
@settings(max_examples=200, deadline=None)
def test_copying_segments_by_runs_matches_copying_them_one_by_one(
        seg: tuple[list[int], list[int], list[int]]) -> None:
    at, frm, length = seg
    src = np.frombuffer(os.urandom(max(f + m for f, m in zip(frm, length, strict=True)) + 1),
                        dtype=np.uint8)
    dst = np.zeros(128 * len(at) + 128, dtype=np.uint8)
    want = _oracle(dst, at, src, frm, length)
    copy_segments(dst, np.array(at, dtype=np.int64), src, np.array(frm, dtype=np.int64),
                  np.array(length, dtype=np.int64))
    assert (dst == want).all()


def test_a_view_beyond_the_source_is_refused() -> None:
    src = np.zeros(100, dtype=np.uint8)
    dst = np.zeros(1000, dtype=np.uint8)
    with pytest.raises((ValueError, TypeError)):
        copy_segments(dst, np.array([0, 100], dtype=np.int64), src,
                      np.array([0, 60], dtype=np.int64), np.array([50, 50], dtype=np.int64))


def _region_with(packets: list[bytes], starts: list[int], size: int) -> np.ndarray:
    region = np.frombuffer(bytearray(os.urandom(size)), dtype=np.uint8)
    for p, s in zip(packets, starts, strict=True):
        region[s : s + len(p)] = np.frombuffer(p, dtype=np.uint8)
    return region


def test_heads_then_completion_give_the_packets_whole() -> None:
    """Short packets (within one head), long ones, one that ends at the region's very end
    (its head would reach past it), one dropped before completion (its rest is never
    copied) and one the reader copied whole (src -1)."""
    packets = [os.urandom(n) for n in (40, HEAD, HEAD + 1, 1400, 1400, 900, 60)]
    starts = [14, 100, 400, 700, 2200, 3700, 4603]
    size = 4603 + 60  # packet 6 ends the region: a HEAD-byte read there would run past it
    region = _region_with(packets, starts, size)
    batch = Batch(8)
    batch.data[:] = 0
    copy_heads(batch, 0, region, np.array(starts[:6], dtype=np.int64),
               np.array([len(p) for p in packets[:6]], dtype=np.int64))
    copy_heads(batch, 6, region, np.array(starts[6:], dtype=np.int64),
               np.array([60], dtype=np.int64))
    batch.count, batch.region = 7, 0
    for i, p in enumerate(packets):
        head = batch.packet(i)
        assert head[:HEAD] == p[:HEAD] and len(head) == len(p)
    batch.meta["verdict"][4] = Verdict.REPLAY
    whole = os.urandom(900)  # as if the reader copied packet 5 into its slot itself
    off = int(batch.meta["offset"][5])
    batch.data[off : off + 900] = np.frombuffer(whole, dtype=np.uint8)
    batch.src[5] = -1
    assert complete(batch, region) == 2  # the 129- and the first 1400-byte packet
    assert batch.region == -1
    got = [batch.packet(i) for i in range(7)]
    assert got[:4] == packets[:4] and got[6] == packets[6] and got[5] == whole
    assert got[4][:HEAD] == packets[4][:HEAD] and got[4] != packets[4]  # dropped: left


def test_heads_outside_the_region_or_the_batch_are_refused() -> None:
    region = np.zeros(4096, dtype=np.uint8)
    batch = Batch(2)
    one = np.array([1400], dtype=np.int64)
    with pytest.raises(ValueError, match="region"):
        copy_heads(batch, 0, region, np.array([3000], dtype=np.int64), one)
    with pytest.raises(ValueError, match="fit"):
        copy_heads(batch, 2, region, np.array([0], dtype=np.int64), one)
    with pytest.raises(ValueError, match="fit"):
        copy_heads(batch, 0, region, np.array([0], dtype=np.int64),
                   np.array([batch.max_packet + 1], dtype=np.int64))


def _child_reads(region: SharedRegion, out: multiprocessing.queues.Queue[bytes]) -> None:
    data = region.map()
    out.put(data[:64].tobytes())
    assert not data.flags.writeable  # workers only read the reader's memory


def test_a_region_reaches_a_spawned_worker_as_the_same_memory() -> None:
    fd = os.memfd_create("espline-test-region")
    try:
        os.ftruncate(fd, 8192)
        mm = mmap.mmap(fd, 8192)
        data = np.frombuffer(mm, dtype=np.uint8)
        data[:64] = np.frombuffer(os.urandom(64), dtype=np.uint8)
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        child = ctx.Process(target=_child_reads, args=(SharedRegion(fd, 8192, data), out))
        child.start()
        try:
            assert out.get(timeout=30) == data[:64].tobytes()
        finally:
            child.join(10)
        assert child.exitcode == 0
    finally:
        os.close(fd)


def test_a_batch_read_without_heads_is_completed_whole() -> None:
    """``head`` 0: the slots get nothing (the I/O process reads the packets in place), and
    completion copies each packet whole, the short ones too."""
    packets = [os.urandom(n) for n in (20, 1400, 300)]
    starts = [30, 100, 1600]
    region = _region_with(packets, starts, 2000)
    batch = Batch(4)
    batch.data[:] = 0xEE
    copy_heads(batch, 0, region, np.array(starts, dtype=np.int64),
               np.array([len(p) for p in packets], dtype=np.int64), head=0)
    batch.count, batch.region = 3, 0
    assert batch.head == 0 and (batch.data == 0xEE).all()  # nothing written
    assert complete(batch, region) == 3
    assert [batch.packet(i) for i in range(3)] == packets
    with pytest.raises(ValueError, match="head"):
        copy_heads(batch, 0, region, np.array([0], dtype=np.int64),
                   np.array([10], dtype=np.int64), head=64)


def test_slots_keep_their_place_for_heads() -> None:
    batch = Batch(4)
    region = np.frombuffer(os.urandom(4096), dtype=np.uint8)
    copy_heads(batch, 1, region, np.array([10, 2000], dtype=np.int64),
               np.array([300, 30], dtype=np.int64))
    assert batch.meta["offset"][1:3].tolist() == [batch.slot_size + HEADROOM,
                                                  2 * batch.slot_size + HEADROOM]
    assert batch.src[1:3].tolist() == [10, 2000]
