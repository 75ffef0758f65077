"""The steady-traffic memos (workers/esp.py ``_EncapMemo``, ``_DecapMemo``) against the
general path: a batch object that is reused (memo on) and a new batch object every time
(no memo, every check computed afresh) must give the same bytes, verdicts, metadata and
anti-replay window, batch after batch, on the cases the memos take shortcuts for:
consecutive sequence numbers (IPv4 Identification and checksum arithmetic, the window moved
as a run), gaps between runs, ESN (the high half in the AAD, RFC 4106 §5), and the pipeline's
replay=False mode.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from pipeline.batch import Batch, Verdict
from pipeline.satable import Mode
from tests.esp_support import (
    U32,
    inner_packet,
    ipv4_checksum_ok,
    open_esp,
    pair,
)
from workers import esp
from workers.esp import EspCodec
from workers.replay import ReplayWindow
from workers.sa import SaState, SaTable

ALG = "aes128gcm16"
N = 8


def packets(size: int = 100, n: int = N, tos: int = 0x2A) -> list[bytes]:
    return [inner_packet(4, size + i, tos=tos) for i in range(n)]


def encap_batch(batch: Batch, sas: SaTable, sa: SaState, pkts: list[bytes],
                seqs: list[int]) -> list[tuple[int, bytes]]:
    batch.load(pkts, sa=sa.index)
    batch.meta["seq"][: len(pkts)] = seqs
    EspCodec(sas).encap(batch)
    return list(batch)


def window_state(w: ReplayWindow) -> tuple[int, bytes]:
    return w.top, w._ring.tobytes()


@pytest.fixture
def memo_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[bool]]:
    """Records what each memo's replay returned, to show the memo served the batches."""
    seen: dict[str, list[bool]] = {"encap": [], "decap": []}
    for name, cls in (("encap", esp._EncapMemo), ("decap", esp._DecapMemo)):
        original = cls.replay

        def counting(self: object, *args: object, _o: object = original,
                     _name: str = name) -> bool:
            ok = _o(self, *args)  # type: ignore[operator]
            seen[_name].append(ok)
            return bool(ok)

        monkeypatch.setattr(cls, "replay", counting)
    return seen


# ------------------------------------------------------------------------------ encap
@pytest.mark.parametrize("first", [17, 65530, 2 * 65536 - 3, 65536 * 7 + 100])
def test_encap_identification_and_checksum_across_the_16_bit_wrap(
        first: int, memo_calls: dict[str, list[bool]]) -> None:
    """Consecutive numbers whose low 16 bits wrap inside the third batch, the first the memo
    serves (it computes the IPv4 Identification and header checksum from the first number
    only)."""
    sas, out, _, _ = pair(ALG, Mode.TUNNEL, 4)
    fresh_sas, fresh_out, _, _ = pair(ALG, Mode.TUNNEL, 4)
    reused = Batch(N)
    seq = first - 2 * N
    for _ in range(4):
        seqs = list(range(seq, seq + N))
        got = encap_batch(reused, sas, out, packets(), seqs)
        want = encap_batch(Batch(N), fresh_sas, fresh_out, packets(), seqs)
        assert got == want
        for (_, pkt), s in zip(got, seqs, strict=True):
            assert ipv4_checksum_ok(pkt[:20])
            assert int.from_bytes(pkt[4:6], "big") == s & 0xFFFF
        seq += N
    assert memo_calls["encap"].count(True) == 2


def test_encap_memo_with_sequence_numbers_out_of_order(
        memo_calls: dict[str, list[bool]]) -> None:
    sas, out, _, _ = pair(ALG, Mode.TUNNEL, 4)
    fresh_sas, fresh_out, _, _ = pair(ALG, Mode.TUNNEL, 4)
    reused = Batch(N)
    rounds = [list(range(1, 9)), list(range(9, 17)), [20, 18, 30, 19, 65535, 65536, 70000, 17],
              list(range(100, 108)), [200, 201, 202, 0, 203, 204, 205, 206]]
    for seqs in rounds:
        got = encap_batch(reused, sas, out, packets(), seqs)
        want = encap_batch(Batch(N), fresh_sas, fresh_out, packets(), seqs)
        assert got == want
        assert reused.meta["length"][:N].tolist() == [len(p) for _, p in want]
    assert [v for v, _ in got] == [0, 0, 0, Verdict.SEQ_OVERFLOW, 0, 0, 0, 0]
    assert memo_calls["encap"][:2] == [True, True]


def test_encap_memo_with_esn_puts_the_high_half_in_the_aad(
        memo_calls: dict[str, list[bool]]) -> None:
    """RFC 4106 §5: with ESN the AAD is SPI || Seq high || Seq low; every batch the memo
    serves must carry its own numbers there, here across the 2^32 boundary."""
    sas, out, _, _ = pair(ALG, Mode.TUNNEL, 4, esn=True)
    fresh_sas, fresh_out, _, _ = pair(ALG, Mode.TUNNEL, 4, esn=True)
    reused = Batch(N)
    seq = U32 - 3 * N - 3
    for _ in range(6):
        seqs = list(range(seq, seq + N))
        got = encap_batch(reused, sas, out, packets(), seqs)
        assert got == encap_batch(Batch(N), fresh_sas, fresh_out, packets(), seqs)
        for (v, pkt), s, inner in zip(got, seqs, packets(), strict=True):
            assert v == Verdict.PASS
            plain = open_esp(ALG, pkt[20:], s, esn=True)  # an independent AEAD open
            assert plain[: len(inner)] == inner
        seq += N
    assert memo_calls["encap"].count(True) == 4


# ------------------------------------------------------------------------------ decap
def wire(seqs: list[int], esn: bool = False) -> list[bytes]:
    """What a peer sends: the same inner packets under the given sequence numbers."""
    sas, out, _, _ = pair(ALG, Mode.TUNNEL, 4, esn=esn)
    return [p for _, p in encap_batch(Batch(N), sas, out, packets(), seqs)]


Round = tuple[list[tuple[int, bytes]], list[int], list[int]]


def decap_round(batch: Batch, codec: EspCodec, pkts: list[bytes]) -> Round:
    batch.load(pkts)
    codec.decap(batch)
    n = batch.count
    return (list(batch), batch.meta["seq"][:n].tolist(), batch.meta["sa"][:n].tolist())


@pytest.mark.parametrize("window", [0, 32, 64, 1024])
def test_decap_runs_gaps_and_replays_match_the_general_path(
        window: int, memo_calls: dict[str, list[bool]]) -> None:
    """Runs right after the window's top, runs after a gap (lost packets), late packets
    inside the window, duplicates, and a jump further than the window."""
    _, _, rx, inb = pair(ALG, Mode.TUNNEL, 4, replay_window=window)
    _, _, ref_rx, ref_inb = pair(ALG, Mode.TUNNEL, 4, replay_window=window)
    codec, ref = EspCodec(rx), EspCodec(ref_rx)
    reused = Batch(N)
    starts = [1, 9, 17, 40, 25, 48, 48, 56, 1000, 990, 1008, 1016, 1017, 1100, 1108]
    outcome = {}
    for k, first in enumerate(starts):
        pkts = wire(list(range(first, first + N)))
        got = decap_round(reused, codec, pkts)
        want = decap_round(Batch(N), ref, pkts)
        assert got == want, first
        assert window_state(inb.replay) == window_state(ref_inb.replay), first
        assert (inb.packets, inb.bytes) == (ref_inb.packets, ref_inb.bytes)
        outcome[k] = [v for v, _ in reused]
    replay, fresh = Verdict.REPLAY if window else Verdict.PASS, Verdict.PASS
    assert outcome[4] == [fresh] * N  # late, inside the window, never seen
    assert outcome[6] == [replay] * N  # the same batch again
    assert outcome[12] == [replay] * (N - 1) + [fresh]
    # Served by the memo: from the third batch on, those whose numbers are all right of
    # the window (with the window off, all), except right after one the memo handed over.
    assert memo_calls["decap"].count(True) == (7 if window else 13)


def test_decap_memo_with_esn_across_the_2_32_boundary(
        memo_calls: dict[str, list[bool]]) -> None:
    _, _, rx, inb = pair(ALG, Mode.TUNNEL, 4, esn=True, replay_window=128)
    _, _, ref_rx, ref_inb = pair(ALG, Mode.TUNNEL, 4, esn=True, replay_window=128)
    codec, ref = EspCodec(rx), EspCodec(ref_rx)
    reused = Batch(N)
    first = U32 - 4 * N + 3
    inb.replay.top = ref_inb.replay.top = first - 1  # as if 2^32 - 30 packets came before
    for k in range(8):
        seqs = list(range(first, first + N))
        pkts = wire(seqs, esn=True)
        got = decap_round(reused, codec, pkts)
        assert got == decap_round(Batch(N), ref, pkts)
        assert [p for _, p in got[0]] == packets()
        assert got[1] == seqs
        assert window_state(inb.replay) == window_state(ref_inb.replay)
        first += N + (5 if k == 4 else 0)
    assert memo_calls["decap"].count(True) >= 5


def test_decap_memo_in_pipeline_mode_keeps_the_dispatchers_numbers(
        memo_calls: dict[str, list[bool]]) -> None:
    """replay=False: the dispatcher wrote each full number into meta ``seq`` and owns the
    window; the codec verifies and decrypts, and leaves the numbers and window as they are."""
    _, _, rx, inb = pair(ALG, Mode.TUNNEL, 4)
    codec = EspCodec(rx, replay=False)
    reused = Batch(N)
    for first in (1, 9, 17, 25, 5):
        seqs = list(range(first, first + N))
        reused.load(wire(seqs))
        reused.meta["seq"][:N] = seqs
        codec.decap(reused)
        assert reused.packets() == packets()
        assert reused.meta["seq"][:N].tolist() == seqs
    assert window_state(inb.replay) == (0, bytes(inb.replay._ring.size))
    assert memo_calls["decap"].count(True) == 3


# ------------------------------------------------------------------- the window as a run
@pytest.mark.parametrize("size", [0, 32, 64, 100, 1024])
def test_commit_run_is_commit_of_the_run(size: int) -> None:
    """``ReplayWindow.commit_run(first, count)`` leaves exactly the state ``commit`` leaves
    for the array first .. first + count - 1 (fresh and all verified)."""
    rng = random.Random(size)
    for _ in range(300):
        a = ReplayWindow(size)
        for _ in range(rng.randrange(4)):  # some history, with holes
            top = a.top
            seq = np.array(sorted(rng.sample(range(max(1, top - 50), top + 3000), 40)),
                           dtype=np.uint64)
            a.commit(seq, None)
        b = ReplayWindow(size)
        b.top = a.top
        b._ring[:] = a._ring  # in place: the window also keeps a view of it
        first = a.top + 1 + rng.choice([0, 0, 1, 5, 63, 64, 65, 1023, 1024, 5000])
        count = rng.choice([1, 2, 31, 32, 33, 64, 256, 1025])
        assert not a.commit(np.arange(first, first + count, dtype=np.uint64), None).any()
        b.commit_run(first, count)
        assert window_state(a) == window_state(b), (first, count)
