"""The encapsulation memo (steady traffic reuses per-slot header work) must never change a
single output byte: a reused batch and a fresh one give identical packets, and anything that
changes the geometry, the SA or the sequence numbers' validity takes the full path."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest

from pipeline.batch import Batch, Verdict
from pipeline.satable import Direction, SaRecord, UdpEncap
from workers import esp
from workers.esp import EspCodec
from workers.sa import SaTable

A, B = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
A6, B6 = ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("2001:db8::2")


def inner(i: int, size: int, tos: int = 0, df: bool = True) -> bytes:
    payload = bytes([i & 0xFF]) * (size - 20)
    return bytes([0x45, tos, size >> 8, size & 0xFF, i >> 8 & 0xFF, i & 0xFF,
                  0x40 if df else 0, 0, 64, 17, 0, 0, 10, 1, 0, 1, 10, 2, 0, 1]) + payload


def table(v6: bool = False, encap: bool = False, key: bytes = bytes(range(20))) -> tuple[
        SaTable, int]:
    t = SaTable()
    out = t.install(SaRecord(spi=0x1001, direction=Direction.OUT, alg="aes128gcm16",
                             local_addr=A6 if v6 else A, remote_addr=B6 if v6 else B,
                             enc_key=key, encap=UdpEncap() if encap else None))
    return t, out.index


def encap_into(batch: Batch, codec: EspCodec, sa: int, packets: list[bytes],
               first_seq: int) -> list[bytes]:
    batch.load(packets, sa=sa)
    batch.meta["seq"][: batch.count] = np.arange(first_seq, first_seq + batch.count)
    codec.encap(batch)
    return [p for _, p in batch]


@pytest.mark.parametrize(("v6", "encap"), [(False, False), (False, True), (True, False)])
def test_reused_batch_equals_fresh_batch(v6: bool, encap: bool,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    replayed = []
    original = esp._EncapMemo.replay

    def counting(self: esp._EncapMemo, *args: object) -> bool:
        ok = original(self, *args)  # type: ignore[arg-type]
        replayed.append(ok)
        return ok

    monkeypatch.setattr(esp._EncapMemo, "replay", counting)
    t, sa = table(v6, encap)
    codec = EspCodec(t)
    reused = Batch(16)
    rounds = [
        [inner(i, 100 + i) for i in range(16)],  # first: computes and remembers
        [inner(i + 50, 100 + i) for i in range(16)],  # same geometry: replayed from memo
        [inner(i + 90, 100 + i) for i in range(16)],  # again
        [inner(i, 100 + i, tos=0xB8) for i in range(16)],  # TOS changed: full path
        [inner(i, 100 + i, tos=0xB8) for i in range(16)],  # memo again, new values
        [inner(i, 101 + i, tos=0xB8) for i in range(16)],  # lengths changed
        [inner(i, 101 + i, tos=0xB8, df=False) for i in range(16)],  # DF changed
        [inner(i, 101 + i) for i in range(12)],  # fewer packets
    ]
    seq = 1
    for packets in rounds:
        fresh_t, fresh_sa = table(v6, encap)
        got = encap_into(reused, codec, sa, packets, seq)
        want = encap_into(Batch(16), EspCodec(fresh_t), fresh_sa, packets, seq)
        assert got == want
        seq += len(packets)
    # A memo is built once lengths repeat (round 2, again rounds 4 and 7) and serves the
    # next batch of the same geometry: rounds 3 and 5.
    assert replayed.count(True) == 2, replayed


def test_ipv6_with_udp_is_never_memoized() -> None:
    """Its UDP checksum (RFC 8200 §8.1) covers the ciphertext, so nothing can be reused."""
    t, sa = table(v6=True, encap=True)
    codec = EspCodec(t)
    batch = Batch(4)
    packets = [inner(i, 90) for i in range(4)]
    for seq in (1, 5, 9):
        fresh_t, fresh_sa = table(v6=True, encap=True)
        assert encap_into(batch, codec, sa, packets, seq) == encap_into(
            Batch(4), EspCodec(fresh_t), fresh_sa, packets, seq)
        assert "esp-encap-memo" not in batch._views


def test_a_replaced_sa_is_not_served_from_the_memo() -> None:
    t, sa = table()
    codec = EspCodec(t)
    batch = Batch(8)
    packets = [inner(i, 200) for i in range(8)]
    encap_into(batch, codec, sa, packets, 1)
    encap_into(batch, codec, sa, packets, 9)
    t.install(SaRecord(spi=0x2002, direction=Direction.OUT, alg="aes128gcm16", local_addr=A,
                       remote_addr=B, enc_key=bytes(20)), index=sa)  # rekeyed in place
    got = encap_into(batch, codec, sa, packets, 1)
    fresh_t = SaTable()
    fresh = fresh_t.install(SaRecord(spi=0x2002, direction=Direction.OUT, alg="aes128gcm16",
                                     local_addr=A, remote_addr=B, enc_key=bytes(20)))
    assert got == encap_into(Batch(8), EspCodec(fresh_t), fresh.index, packets, 1)
    assert all(p[20:24] == (0x2002).to_bytes(4, "big") for p in got)


def test_exhausted_sequence_numbers_take_the_full_path() -> None:
    t, sa = table()
    codec = EspCodec(t)
    batch = Batch(4)
    packets = [inner(i, 80) for i in range(4)]
    encap_into(batch, codec, sa, packets, 1)
    batch.load(packets, sa=sa)
    batch.meta["seq"][:4] = [5, 6, 0, 7]
    codec.encap(batch)
    assert [v for v, _ in batch] == [Verdict.PASS, Verdict.PASS, Verdict.SEQ_OVERFLOW,
                                     Verdict.PASS]


def _inbound(v6: bool = False, encap: bool = True) -> tuple[SaTable, int, SaTable, int]:
    """A sender table (outbound) and a receiver table (inbound) for one SA."""
    tx, out = table(v6, encap)
    rx = SaTable()
    inb = rx.install(SaRecord(spi=0x1001, direction=Direction.IN, alg="aes128gcm16",
                              local_addr=B6 if v6 else B, remote_addr=A6 if v6 else A,
                              enc_key=bytes(range(20)), encap=UdpEncap() if encap else None,
                              replay_window=1024))
    return tx, out, rx, inb.index


def _wire(tx: SaTable, out: int, packets: list[bytes], first_seq: int) -> list[bytes]:
    return encap_into(Batch(len(packets)), EspCodec(tx), out, packets, first_seq)


@pytest.mark.parametrize(("v6", "encap"), [(False, True), (False, False), (True, False)])
def test_decap_memo_gives_what_a_fresh_batch_gives(v6: bool, encap: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    replayed = []
    original = esp._DecapMemo.replay

    def counting(self: esp._DecapMemo, *args: object) -> bool:
        ok = original(self, *args)  # type: ignore[arg-type]
        replayed.append(ok)
        return ok

    monkeypatch.setattr(esp._DecapMemo, "replay", counting)
    tx, out, rx, _ = _inbound(v6, encap)
    codec = EspCodec(rx)
    reused = Batch(8)
    packets = [inner(i, 120 + i) for i in range(8)]
    seq = 1
    results = []
    for k in range(4):
        wire = _wire(tx, out, packets, seq)
        if k == 2:  # a forged ICV in a batch the memo serves
            wire[3] = wire[3][:-1] + bytes([wire[3][-1] ^ 1])
        reused.load(wire)
        codec.decap(reused)
        results.append([v for v, _ in reused])
        assert [p for v, p in reused if v == Verdict.PASS] == [
            p for j, p in enumerate(packets) if not (k == 2 and j == 3)]
        seq += len(packets)
    assert results[2][3] == Verdict.INTEGRITY
    assert replayed.count(True) == 2, replayed  # batch 2 builds it; 3 and 4 use it
    # The same packets again: replays. The memo sees it (not all fresh) and hands over.
    reused.load(_wire(tx, out, packets, 1))
    codec.decap(reused)
    assert [v for v, _ in reused] == [Verdict.REPLAY] * 8


def test_decap_memo_is_not_used_for_another_spi() -> None:
    tx, out, rx, _ = _inbound()
    codec = EspCodec(rx)
    batch = Batch(4)
    packets = [inner(i, 100) for i in range(4)]
    for seq in (1, 5):
        batch.load(_wire(tx, out, packets, seq))
        codec.decap(batch)
        assert batch.verdict_counts() == {}
    other = SaTable()
    o = other.install(SaRecord(spi=0x7777, direction=Direction.OUT, alg="aes128gcm16",
                               local_addr=A, remote_addr=B, enc_key=bytes(range(20)),
                               encap=UdpEncap()))
    batch.load(_wire(other, o.index, packets, 9))
    codec.decap(batch)
    assert batch.verdict_counts() == {"no_sa": 4}


def test_decap_memo_is_dropped_when_another_geometry_passes_in_between() -> None:
    """A mixed batch (general path) rebuilds argument views; the memo must not survive it."""
    tx, out, rx, _ = _inbound(encap=True)
    codec = EspCodec(rx)
    batch = Batch(4)
    packets = [inner(i, 100) for i in range(4)]
    seq = 1
    for _ in range(2):
        batch.load(_wire(tx, out, packets, seq))
        codec.decap(batch)
        seq += 4
    # Different sizes, one slot already dropped: not the fast path.
    mixed = _wire(tx, out, [inner(i, 300 + 8 * i) for i in range(4)], seq)
    batch.load(mixed)
    batch.meta["verdict"][0] = Verdict.RUNT
    codec.decap(batch)
    seq += 4
    batch.load(_wire(tx, out, packets, seq))
    codec.decap(batch)
    assert batch.verdict_counts() == {} and [p for _, p in batch] == packets


def test_decap_memo_fast_finish_falls_back_for_anything_unusual(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Packets the memo's geometry fits but whose insides are unusual — bad padding, a
    dummy, TFC padding, an IPv6 inner packet, a duplicate within the batch — get exactly the
    verdicts and contents the general checks give."""
    from tests.esp_support import keys_for, outer_ip, seal_esp

    enc, _ = keys_for("aes128gcm16")
    rx = SaTable()
    rx.install(SaRecord(spi=0x4242, direction=Direction.IN, alg="aes128gcm16", local_addr=B,
                        remote_addr=A, enc_key=enc, replay_window=1024))
    codec = EspCodec(rx)
    body = inner(7, 120)  # 120 + pad 2 + 2 = 124 bytes of plaintext

    def wire(seq: int, plaintext: bytes) -> bytes:
        assert len(plaintext) == 124  # same geometry as the memo's batches
        return outer_ip(4, A, B, seal_esp("aes128gcm16", 0x4242, seq, plaintext, esn=False))

    good = body + bytes([1, 2, 2, 4])
    fast = []
    original = esp._DecapMemo._finish_ipv4

    def watching(self: esp._DecapMemo, *args: object) -> bool:
        ok = original(self, *args)  # type: ignore[arg-type]
        fast.append(ok)
        return ok

    monkeypatch.setattr(esp._DecapMemo, "_finish_ipv4", watching)
    batch = Batch(4)
    seq = 1
    for _ in range(3):  # builds the memo (2nd batch), then uses it
        batch.load([wire(seq + i, good) for i in range(4)])
        codec.decap(batch)
        assert batch.verdict_counts() == {} and batch.packets() == [body] * 4
        seq += 4
    assert fast == [True]
    tfc_inner = inner(9, 100)
    v6_inner = bytes([0x60, 0, 0, 0, 0, 80, 17, 64]) + bytes(32) + bytes(80)  # 120 bytes
    cases = [
        (body + bytes([7, 7, 2, 4]), Verdict.PAD, None),  # padding not 1, 2
        (body + bytes([1, 2, 2, 59]), Verdict.DUMMY, None),  # RFC 4303 §2.6
        (tfc_inner + bytes(20) + bytes([1, 2, 2, 4]), Verdict.PASS, tfc_inner),  # §2.7
        (v6_inner + bytes([1, 2, 2, 41]), Verdict.PASS, v6_inner),
    ]
    batch.load([wire(seq + i, c[0]) for i, c in enumerate(cases)])
    codec.decap(batch)
    assert [v for v, _ in batch] == [c[1] for c in cases]
    assert batch.packets() == [c[2] for c in cases if c[2] is not None]
    assert fast[-1] is False  # the general checks decided
    seq += 4
    # Fresh numbers but a duplicate inside the batch: the commit catches it.
    dup = [wire(seq, good), wire(seq + 1, good), wire(seq + 1, good), wire(seq + 2, good)]
    batch.load(dup)
    codec.decap(batch)
    assert [v for v, _ in batch] == [Verdict.PASS, Verdict.PASS, Verdict.REPLAY, Verdict.PASS]
