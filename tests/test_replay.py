"""Anti-replay (workers/replay.py) and sequence numbers (workers/sa.py), model-based.

The reference model is RFC 4303 §3.4.3 read literally, one packet at a time: a set of the
numbers received and the highest one; a number is a replay if it is 0, left of the window
(``s + W <= top``) or already in the set. ESN inference is RFC 4303 Appendix A2.2 restated:
the full number is the one congruent to the received low half in [top - W + 1, top - W + 1
+ 2^32). Both are written here, independently of the ring-of-bits implementation.

The codec-level model adds the order RFC 4303 §3.4.3 prescribes: the replay precheck against
the window as the batch found it, then the ICV, then the check again and the window update, in
packet order, for verified packets only.
"""

from __future__ import annotations

import copy
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.batch import Batch, Verdict
from pipeline.satable import Direction, Mode
from tests.esp_support import (
    SPI_OUT,
    U32,
    decap,
    encap,
    inner_packet,
    install,
    pair,
    transport_packet,
    verdicts,
)
from workers.esp import EspCodec
from workers.replay import ReplayWindow
from workers.sa import SaTable

U64 = 1 << 64


class RefWindow:
    """RFC 4303 §3.4.3, sequentially, with a Python set."""

    def __init__(self, size: int, top: int = 0) -> None:
        self.size, self.top, self.seen = size, top, set[int]()

    def is_replay(self, s: int) -> bool:
        if self.size == 0:
            return False  # anti-replay off: the receiver's choice
        if s == 0:
            return True  # RFC 4303 §3.3.3: the first packet sent carries 1
        if s + self.size <= self.top:
            return True  # left of the window
        return s in self.seen

    def accept(self, s: int) -> None:
        self.top = max(self.top, s)
        self.seen.add(s)

    def infer(self, lo: int) -> int:
        """RFC 4303 Appendix A2.2: the full number nearest the window for a low half."""
        bottom = self.top - max(self.size, 32) + 1
        full = bottom + ((lo - bottom) % U32)
        return max(full, 0)


def _arr(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


# --------------------------------------------------------------------------- ReplayWindow model
def _draw_seq(data: st.DataObject, ref: RefWindow, history: list[int], batch: list[int],
              ring: int) -> int:
    top, w = ref.top, max(ref.size, 1)
    choices = [
        st.integers(1, 3).map(lambda d: top + d),  # the next few
        st.integers(1, 2 * ring + 2).map(lambda d: top + d),  # jumps, past the ring too
        st.integers(-2, w + 2).map(lambda d: max(top - d, 0)),  # in and around the window
        st.sampled_from([max(top - w, 0), max(top - w + 1, 0), top, 0]),  # its edges
    ]
    if history:
        choices.append(st.sampled_from(history[-200:]))  # replays of earlier batches
    if batch:
        choices.append(st.sampled_from(batch))  # duplicates within the batch
    return data.draw(st.one_of(choices))


@pytest.mark.parametrize("size", [32, 64, 1024, 4096, 100, 0])
@pytest.mark.parametrize("start", [0, U32 - 40], ids=["0", "2^32-40"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_window_matches_reference(size: int, start: int, data: st.DataObject) -> None:
    win = ReplayWindow(size, esn=start >= U32)
    win.top = start
    ref = RefWindow(size, start)
    ring = 1 << max(size - 1, 1).bit_length()
    history: list[int] = []
    for _ in range(data.draw(st.integers(1, 6), label="batches")):
        batch: list[int] = []
        for _ in range(data.draw(st.integers(1, 16), label="batch size")):
            batch.append(_draw_seq(data, ref, history, batch, ring))
        verified = data.draw(st.lists(st.booleans() | st.just(True), min_size=len(batch),
                                      max_size=len(batch)), label="verified")
        seq = _arr(batch)
        # precheck: side-effect free, against the window as the batch found it.
        assert win.precheck(seq).tolist() == [ref.is_replay(s) for s in batch]
        # commit: on the whole batch or, as the codec does, on what the precheck let through.
        if data.draw(st.booleans(), label="filtered"):
            keep = [not ref.is_replay(s) for s in batch]
        else:
            keep = [True] * len(batch)
        kept = [s for s, k in zip(batch, keep, strict=True) if k]
        ok = [v for v, k in zip(verified, keep, strict=True) if k]
        expected = []
        for s, v in zip(kept, ok, strict=True):
            replay = v and ref.is_replay(s)
            if v and not replay:
                ref.accept(s)
            expected.append(replay)
        got = win.commit(_arr(kept), np.array(ok, dtype=np.bool_))
        assert got.tolist() == expected
        assert win.top == ref.top
        # The whole window, probed number by number, is the reference's.
        probe = list(range(max(ref.top - max(size, 1) - 3, 0), ref.top + 4))
        assert win.precheck(_arr(probe)).tolist() == [ref.is_replay(s) for s in probe]
        history += batch


@pytest.mark.parametrize("size", [32, 64, 1024, 4096])
def test_window_in_order_then_replays(size: int) -> None:
    """Long in-order runs (the common fast path), then every number again."""
    win, ref = ReplayWindow(size), RefWindow(size)
    first = _arr(list(range(1, 3 * size + 2)))
    assert not win.commit(first, np.ones(first.size, np.bool_)).any()
    for s in first.tolist():
        ref.accept(s)
    assert win.top == ref.top == 3 * size + 1
    probe = list(range(0, 3 * size + 8))
    assert win.precheck(_arr(probe)).tolist() == [ref.is_replay(s) for s in probe]
    # Every number sent is now a replay: seen, or left of the window.
    assert win.precheck(first).all()
    assert not win.precheck(_arr([3 * size + 2])).any()


@settings(max_examples=200, deadline=None)
@given(top=st.integers(0, U64 - U32 - 1), size=st.sampled_from([0, 32, 64, 1024, 4096]),
       lo=st.integers(0, U32 - 1), edge=st.none() | st.integers(-2, 2))
def test_esn_inference_matches_appendix_a(top: int, size: int, lo: int,
                                          edge: int | None) -> None:
    if edge is not None:  # a low half at the window's bottom edge, or just beside it
        lo = (top - max(size, 32) + 1 + edge) % U32
    win = ReplayWindow(size, esn=True)
    win.top = top
    ref = RefWindow(size, top)
    assert int(win.infer(np.array([lo], dtype=np.uint32))[0]) == ref.infer(lo)


@pytest.mark.parametrize("size", [32, 64, 4096])
def test_esn_inference_cases(size: int) -> None:
    """RFC 4303 Appendix A2.2 case A (window inside one subspace) and case B (window spans
    two), at the edges of the window."""
    win = ReplayWindow(size, esn=True)
    win.top = (7 << 32) + 2 * size  # case A: the window is [size + 1, 2 * size] of subspace 7
    ref = RefWindow(size, win.top)
    lo = np.array([0, 1, size, size + 1, 2 * size, 2 * size + 1, U32 - 1], dtype=np.uint32)
    assert win.infer(lo).tolist() == [ref.infer(int(x)) for x in lo]
    assert win.infer(lo).tolist() == [(8 << 32) + x for x in (0, 1, size)] + [
        (7 << 32) + x for x in (size + 1, 2 * size, 2 * size + 1, U32 - 1)]
    win.top = (7 << 32) + 3  # case B: the window is [2^32 - size + 4, 2^32) of 6, [0, 3] of 7
    ref = RefWindow(size, win.top)
    lo = np.array([0, 3, 4, U32 - size + 3, U32 - size + 4, U32 - 1], dtype=np.uint32)
    assert win.infer(lo).tolist() == [ref.infer(int(x)) for x in lo]
    assert win.infer(lo).tolist() == [(7 << 32) + x for x in (0, 3, 4, U32 - size + 3)] + [
        (6 << 32) + x for x in (U32 - size + 4, U32 - 1)]
    win.top = 3  # case B before any wrap: numbers "below 0" come back as 0 (never valid)
    assert win.infer(np.array([U32 - 1], dtype=np.uint32)).tolist() == [0]


def test_non_esn_inference_is_identity() -> None:
    win = ReplayWindow(64, esn=False)
    win.top = 1000
    lo = np.array([0, 1, 999, 1000, U32 - 1], dtype=np.uint32)
    assert win.infer(lo).tolist() == lo.tolist()


def test_window_near_end_of_esn_space() -> None:
    win = ReplayWindow(64, esn=True)
    win.top = U64 - 100
    seq = _arr([U64 - 150, U64 - 5])  # inside the window, and fresh
    assert win.precheck(seq).tolist() == [False, False]


def test_commit_near_end_of_esn_space_does_not_raise() -> None:
    win = ReplayWindow(64, esn=True)
    win.top = U64 - 100
    got = win.commit(_arr([U64 - 5, U64 - 30]), np.ones(2, dtype=np.bool_))
    assert got.tolist() == [False, False] and win.top == U64 - 5


# --------------------------------------------------------------------------- codec level
def test_codec_replay_and_left_of_window() -> None:
    ours, out, peer, inb = pair("aes128gcm16", Mode.TUNNEL, 4, replay_window=64)
    inners = [inner_packet(4, k) for k in range(4)]
    wires = encap(ours, out, inners).packets()
    first = decap(peer, [*wires, wires[1], wires[1]])  # duplicates within one batch
    assert verdicts(first) == [Verdict.PASS] * 4 + [Verdict.REPLAY] * 2
    assert first.packets() == inners
    assert verdicts(decap(peer, wires)) == [Verdict.REPLAY] * 4
    # RFC 4303 §3.4.3: the duplicate check comes before the ICV; a forged duplicate is a
    # replay, a forged new number an integrity failure that does not move the window.
    fresh, = encap(ours, out, [inner_packet(4, 9)]).packets()  # seq 5
    forged = bytearray(wires[2])
    forged[-1] ^= 1
    forged_fresh = bytearray(fresh)
    forged_fresh[-1] ^= 1
    batch = decap(peer, [bytes(forged), bytes(forged_fresh)])
    assert verdicts(batch) == [Verdict.REPLAY, Verdict.INTEGRITY]
    assert inb.replay.top == 4
    assert verdicts(decap(peer, [fresh])) == [Verdict.PASS]  # seq 5
    # 64 more move the window past 1..5: 5 + 64 <= 69.
    later = encap(ours, out, [inner_packet(4, 1)] * 64).packets()
    assert set(verdicts(decap(peer, later))) == {Verdict.PASS}
    assert inb.replay.top == 69
    assert verdicts(decap(peer, [wires[0], fresh])) == [Verdict.REPLAY] * 2
    assert inb.packets == 4 + 1 + 64


def test_codec_out_of_order_within_window() -> None:
    ours, out, peer, inb = pair("null-sha256", Mode.TRANSPORT, 6, replay_window=32)
    originals = [transport_packet(6, k) for k in range(40)]
    wires = encap(ours, out, originals).packets()
    order = [39, 10, 8, 9, 7, 20, 38, 6, 7, 39]  # sequence numbers: index + 1
    batch = decap(peer, [wires[k] for k in order])
    # The first packet moves top to 40: 11, 9, 10, 21 and 39 are inside the window
    # (s + 32 > 40), 8 and 7 are left of it, the second 40 is a duplicate.
    assert verdicts(batch) == [Verdict.PASS, Verdict.PASS, Verdict.PASS, Verdict.PASS,
                               Verdict.REPLAY, Verdict.PASS, Verdict.PASS, Verdict.REPLAY,
                               Verdict.REPLAY, Verdict.REPLAY]
    assert batch.packets() == [originals[k] for k in (39, 10, 8, 9, 20, 38)]
    assert inb.replay.top == 40


CODEC_SCENARIOS = {
    # name: (algorithm, mode, family, ESN, window, first sequence number - 1)
    "gcm-tunnel4-w32": ("aes128gcm16", Mode.TUNNEL, 4, False, 32, 0),
    "sha256-transport6-w64": ("null-sha256", Mode.TRANSPORT, 6, False, 64, 0),
    "chacha-tunnel6-esn-wrap": ("chacha20poly1305", Mode.TUNNEL, 6, True, 64, U32 - 150),
    "cbc-transport4-esn-wrap": ("aes256-sha512", Mode.TRANSPORT, 4, True, 32,
                                (3 << 32) - 150),
}
CODEC_SPAN = 300


@cache
def _codec_wires(name: str) -> dict[int, bytes]:
    """Every packet the sender of a scenario sends: sequence number -> wire bytes."""
    alg, mode, family, esn, _, base = CODEC_SCENARIOS[name]
    sas = SaTable()
    out = install(sas, alg, mode, family, Direction.OUT, spi=SPI_OUT, esn=esn)
    out.seq_out = base
    make = inner_packet if mode is Mode.TUNNEL else transport_packet
    batch = encap(sas, out, [make(family, k % 50, salt=k) for k in range(CODEC_SPAN)])
    assert verdicts(batch) == [Verdict.PASS] * CODEC_SPAN
    return {base + 1 + k: w for k, w in enumerate(batch.packets())}


@pytest.mark.parametrize("name", list(CODEC_SCENARIOS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_codec_matches_reference(name: str, data: st.DataObject) -> None:
    """Arrivals in any order, duplicated, forged or late, batch after batch: every verdict is
    the reference model's, and the window ends where the model's does."""
    alg, mode, family, esn, window, base = CODEC_SCENARIOS[name]
    wires = _codec_wires(name)
    peer = SaTable()
    inb = install(peer, alg, mode, family, Direction.IN, spi=SPI_OUT, esn=esn,
                  replay_window=window)
    inb.replay.top = base
    ref = RefWindow(window, base)
    numbers = st.integers(base + 1, base + CODEC_SPAN)
    for _ in range(data.draw(st.integers(1, 5), label="batches")):
        top = ref.top
        near = st.integers(max(top - window - 3, base + 1),
                           min(top + 6, base + CODEC_SPAN))
        arrivals = data.draw(st.lists(st.tuples(near | numbers, st.booleans() | st.just(False)),
                                      min_size=1, max_size=16), label="arrivals")
        packets = []
        for s, forge in arrivals:
            wire = bytearray(wires[s])
            if forge:
                wire[-1 - data.draw(st.integers(0, 7), label="where")] ^= 0x10
            packets.append(bytes(wire))
        start = copy.deepcopy(ref)
        expected = []
        for s, forge in arrivals:
            inferred = start.infer(s % U32) if esn else s
            if start.is_replay(inferred):
                expected.append(Verdict.REPLAY)  # precheck, before the ICV
            elif forge or inferred != s:
                expected.append(Verdict.INTEGRITY)  # wrong high half: the ICV fails
            elif ref.is_replay(s):
                expected.append(Verdict.REPLAY)  # a duplicate earlier in this batch
            else:
                ref.accept(s)
                expected.append(Verdict.PASS)
        batch = decap(peer, packets)
        assert verdicts(batch) == expected
        passed = [s for (s, _), v in zip(arrivals, expected, strict=True) if v is Verdict.PASS]
        assert batch.meta["seq"][: batch.count][
            np.array([v is Verdict.PASS for v in expected])].tolist() == passed
        assert inb.replay.top == ref.top


# --------------------------------------------------------------------------- ESN boundary
@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 40), n=st.integers(1, 60), shuffle=st.randoms(use_true_random=False),
       alg=st.sampled_from(["aes256gcm16", "null-sha512"]), high=st.integers(0, 5))
def test_esn_across_2_32_boundary(k: int, n: int, shuffle: object, alg: str,
                                  high: int) -> None:
    """The sender starts at (high + 1) * 2^32 - k, the receiver's window just below; packets
    straddling the boundary, in any order inside the window, all decap with the right full
    sequence number (RFC 4303 §2.2.1, Appendix A2.2 case A, then case B)."""
    boundary = (high + 1) << 32
    ours, out, peer, inb = pair(alg, Mode.TUNNEL, 4, esn=True, replay_window=64)
    out.seq_out = boundary - k - 1
    inb.replay.top = boundary - k - 1
    inners = [inner_packet(4, j % 9, salt=j) for j in range(n)]
    wires = encap(ours, out, inners).packets()
    seqs = [boundary - k + j for j in range(n)]
    order = list(range(n))
    # Reorder only within the window: at most 31 places, so no packet falls off its left.
    for start in range(0, n, 32):
        chunk = order[start : start + 32]
        shuffle.shuffle(chunk)  # type: ignore[attr-defined]
        order[start : start + 32] = chunk
    batch = decap(peer, [wires[j] for j in order])
    assert verdicts(batch) == [Verdict.PASS] * n
    assert batch.packets() == [inners[j] for j in order]
    assert batch.meta["seq"][:n].tolist() == [seqs[j] for j in order]
    assert inb.replay.top == seqs[-1]
    # After the boundary (case B): a late packet from below it is still recognised.
    assert verdicts(decap(peer, [wires[0]])) == [Verdict.REPLAY]


def test_esn_low_half_zero_on_the_wire() -> None:
    ours, out, peer, inb = pair("aes128gcm16", Mode.TUNNEL, 6, esn=True)
    out.seq_out = U32 - 1
    inb.replay.top = U32 - 1
    wire, = encap(ours, out, [inner_packet(6, 3)]).packets()
    assert wire[44:48] == b"\0\0\0\0"  # the low half, 0, is sent (RFC 4303 §2.2.1)
    batch = decap(peer, [wire])
    assert verdicts(batch) == [Verdict.PASS] and int(batch.meta["seq"][0]) == U32


def test_without_esn_high_half_is_not_inferred() -> None:
    """Without ESN the 32-bit counter is the whole number: a receiver never infers a high
    half, so a packet whose ICV covered one is not accepted."""
    ours, out, _, _ = pair("null-sha256", Mode.TUNNEL, 4, esn=True)
    out.seq_out = (1 << 32) + 6
    wire, = encap(ours, out, [inner_packet(4, 3)]).packets()
    _, _, peer, inb = pair("null-sha256", Mode.TUNNEL, 4, esn=False)
    assert verdicts(decap(peer, [wire])) == [Verdict.INTEGRITY]
    assert inb.replay.top == 0


# --------------------------------------------------------------------------- sequence numbers
def test_assign_sequence_increasing_never_reused() -> None:
    sas = SaTable()
    a = install(sas, "aes128gcm16", Mode.TUNNEL, 4, Direction.OUT, spi=SPI_OUT)
    b = install(sas, "null-sha256", Mode.TUNNEL, 6, Direction.OUT, spi=SPI_OUT + 1)
    issued: dict[int, list[int]] = {a.index: [], b.index: []}
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        batch = Batch.for_packets([inner_packet(4, 1)] * n)
        batch.meta["sa"][:n] = rng.choice([a.index, b.index], size=n)
        dropped = rng.random(n) < 0.2
        batch.meta["verdict"][:n][dropped] = Verdict.RUNT  # earlier stages dropped these
        sas.assign_sequence(batch)
        for i in range(n):
            s = int(batch.meta["seq"][i])
            if dropped[i]:
                assert s == 0  # no number is spent on a dropped packet
            else:
                issued[int(batch.meta["sa"][i])].append(s)
    for index, numbers in issued.items():
        # Per SA: 1, 2, 3, ... in packet order, across batches: increasing, none reused.
        assert numbers == list(range(1, len(numbers) + 1))
        state = sas[index]
        assert state is not None and state.seq_out == len(numbers)


def test_encap_uses_assigned_numbers() -> None:
    ours, out, peer, _ = pair("chacha20poly1305", Mode.TUNNEL, 4)
    for batch_no in range(3):
        batch = encap(ours, out, [inner_packet(4, j) for j in range(5)])
        wires = batch.packets()
        assert [int.from_bytes(w[24:28], "big") for w in wires] == [
            5 * batch_no + j + 1 for j in range(5)]
        assert verdicts(decap(peer, wires)) == [Verdict.PASS] * 5


@pytest.mark.parametrize("esn", [False, True])
def test_seq_overflow_at_counter_end(esn: bool) -> None:
    """RFC 4303 §3.3.3: the counter never cycles; packets past its end are dropped."""
    limit = U64 - 1 if esn else U32 - 1
    ours, out, peer, _ = pair("aes128gcm16", Mode.TUNNEL, 4, esn=esn)
    out.seq_out = limit - 2
    peer_state = peer[0]
    assert peer_state is not None
    peer_state.replay.top = limit - 3
    batch = encap(ours, out, [inner_packet(4, j) for j in range(5)])
    assert verdicts(batch) == [Verdict.PASS] * 2 + [Verdict.SEQ_OVERFLOW] * 3
    assert batch.meta["seq"][:5].tolist() == [limit - 1, limit, 0, 0, 0]
    assert out.seq_out == limit
    assert out.packets == 2
    assert verdicts(decap(peer, batch.packets())) == [Verdict.PASS] * 2
    again = encap(ours, out, [inner_packet(4, 1)] * 3)
    assert verdicts(again) == [Verdict.SEQ_OVERFLOW] * 3
    assert out.seq_out == limit and out.packets == 2


def test_seq_out_of_range_given_directly() -> None:
    """A sequence number of 0 (none reserved) or past a 32-bit counter is refused by the codec
    itself, whatever the dispatcher wrote."""
    sas = SaTable()
    out = install(sas, "aes128-sha256", Mode.TUNNEL, 4, Direction.OUT, spi=SPI_OUT)
    batch = Batch.for_packets([inner_packet(4, 1)] * 4)
    batch.meta["sa"][:4] = out.index
    batch.meta["seq"][:4] = [0, U32, U32 - 1, 1]
    EspCodec(sas).encap(batch)
    assert verdicts(batch) == [Verdict.SEQ_OVERFLOW, Verdict.SEQ_OVERFLOW, Verdict.PASS,
                               Verdict.PASS]
