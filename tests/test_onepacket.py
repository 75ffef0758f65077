"""The one-packet path (pipeline/onepacket.py) against the batch path, byte for byte.

The batch codec (workers/esp.py) is itself checked against scapy and RFC vectors; here the
oracle is that codec: for every case the one-packet path takes, both must produce the same
bytes, sequence numbers, windows and counters; for every case it declines, it must change
nothing at all (no byte, no sequence number, no window), so the batch path still decides.
"""

from __future__ import annotations

import random
import struct

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import raw

from pipeline.batch import Batch, Verdict
from pipeline.onepacket import decap_one, encap_one, maybe_syn
from pipeline.satable import Direction, Mode
from tests.esp_support import (
    ADDR,
    SPI_OUT,
    inner_packet,
    install,
    outer_ip,
    pair,
    seal_esp,
    trailer,
    udp_header,
)
from workers.esp import EspCodec
from workers.sa import SaState, SaTable

AEADS = ["aes128gcm16", "aes256gcm16", "chacha20poly1305"]
MTU = 1500
BIG = 1 << 16  # an inner MTU that never declines


def one(pkt: bytes, sa: SaState | None = None, in_slot: int | None = None) -> Batch:
    batch = Batch.for_packets([pkt])
    if sa is not None:
        batch.meta["sa"][0] = sa.index
    if in_slot is not None:
        batch.data[: batch.slot_size] = 0
        batch.data[in_slot : in_slot + len(pkt)] = list(pkt)
        batch.meta["offset"][0] = in_slot
    return batch


def snapshot(batch: Batch) -> tuple[bytes, bytes]:
    return batch.data.tobytes(), batch.meta.tobytes()


def batch_path_encap(sas: SaTable, sa: SaState, pkt: bytes) -> Batch:
    batch = one(pkt, sa)
    sas.assign_sequence(batch)
    EspCodec(sas, count=False).encap(batch)
    return batch


@pytest.mark.parametrize("alg", AEADS)
# (IPv6 with UDP is declined: its checksum is the batch path's; see declined_encaps.)
@pytest.mark.parametrize(("outer", "udp"), [(4, False), (4, True), (6, False)],
                         ids=["esp4", "udp4", "esp6"])
@pytest.mark.parametrize("esn", [False, True])
def test_encap_matches_the_batch_path(alg: str, outer: int, udp: bool, esn: bool) -> None:
    rng = random.Random(f"{alg}{outer}{udp}{esn}")
    mine, mine_sa, _, _ = pair(alg, Mode.TUNNEL, outer, udp=udp, esn=esn)
    theirs, their_sa, _, _ = pair(alg, Mode.TUNNEL, outer, udp=udp, esn=esn)
    start = rng.choice([0, 0xFFFF_FFF0, 0x1_2345_6789]) if esn else rng.choice([0, 0xFFFE])
    mine_sa.seq_out = their_sa.seq_out = start
    for _ in range(40):
        version = rng.choice([4, 6])
        pkt = inner_packet(version, rng.randrange(0, 1300), tos=rng.randrange(256),
                           df=rng.random() < 0.5, salt=rng.randrange(256))
        ours = one(pkt, mine_sa)
        assert encap_one(ours, mine_sa, BIG, MTU, clamp=False)  # (the IPv6 ones are SYNs)
        want = batch_path_encap(theirs, their_sa, pkt)
        assert want.meta["verdict"][0] == Verdict.PASS
        assert ours.packet(0) == want.packet(0)
        assert (int(ours.meta["offset"][0]), int(ours.meta["seq"][0])) == (
            int(want.meta["offset"][0]), int(want.meta["seq"][0]))
        assert mine_sa.seq_out == their_sa.seq_out


def test_encap_from_elsewhere_in_the_slot_matches_too() -> None:
    mine, mine_sa, _, _ = pair("aes128gcm16", Mode.TUNNEL, 4, udp=True)
    theirs, their_sa, _, _ = pair("aes128gcm16", Mode.TUNNEL, 4, udp=True)
    pkt = inner_packet(4, 200)
    ours = one(pkt, mine_sa, in_slot=300)
    assert encap_one(ours, mine_sa, BIG, MTU, clamp=False)
    want = one(pkt, their_sa, in_slot=300)
    theirs.assign_sequence(want)
    EspCodec(theirs).encap(want)
    assert ours.packet(0) == want.packet(0)


def syn(version: int) -> bytes:
    tcp = TCP(sport=1, dport=2, flags="S", options=[("MSS", 1460)])
    ip = IP(src="10.1.0.1", dst="10.2.0.2") if version == 4 else IPv6(src="fd00::1",
                                                                     dst="fd00::2")
    return raw(ip / tcp)


def declined_encaps() -> list[tuple[str, SaState, bytes, int, int, bool]]:
    """(why, SA, packet, inner MTU, outside MTU, clamp) the one-packet path must refuse."""
    gcm = pair("aes128gcm16", Mode.TUNNEL, 4, udp=True)[1]
    ok = inner_packet(4, 100)
    exhausted = pair("aes128gcm16", Mode.TUNNEL, 4)[1]
    exhausted.seq_out = exhausted.seq_limit
    return [
        ("CBC", pair("aes128-sha256", Mode.TUNNEL, 4)[1], ok, BIG, MTU, True),
        ("transport", pair("aes128gcm16", Mode.TRANSPORT, 4)[1], ok, BIG, MTU, True),
        ("IPv6 UDP", pair("aes128gcm16", Mode.TUNNEL, 6, udp=True)[1], ok, BIG, MTU, True),
        ("TFC", install(SaTable(), "aes128gcm16", Mode.TUNNEL, 4, Direction.OUT, spi=SPI_OUT,
                        tfc_pad=500), ok, BIG, MTU, True),
        ("inbound SA", pair("aes128gcm16", Mode.TUNNEL, 4)[3], ok, BIG, MTU, True),
        ("over the inner MTU", gcm, ok, len(ok) - 1, MTU, True),
        ("over the outside MTU", gcm, inner_packet(4, 1460), BIG, MTU, True),
        ("SYN, clamping", gcm, syn(4), BIG, MTU, True),
        ("SYN6, clamping", gcm, syn(6), BIG, MTU, True),
        ("runt", gcm, ok[:19], BIG, MTU, True),
        ("empty", gcm, b"", BIG, MTU, True),
        ("not IP", gcm, b"\x55" * 60, BIG, MTU, True),
        ("numbers used up", exhausted, ok, BIG, MTU, True),
    ]


@pytest.mark.parametrize("case", declined_encaps(), ids=lambda c: c[0])
def test_declined_encap_changes_nothing(case: tuple[str, SaState, bytes, int, int, bool]
                                        ) -> None:
    _, sa, pkt, inner_mtu, outside_mtu, clamp = case
    batch = one(pkt, sa)
    before, seq_out = snapshot(batch), sa.seq_out
    assert not encap_one(batch, sa, inner_mtu, outside_mtu, clamp)
    assert snapshot(batch) == before and sa.seq_out == seq_out


def test_a_syn_is_taken_when_clamping_is_off() -> None:
    sa = pair("aes128gcm16", Mode.TUNNEL, 4)[1]
    assert encap_one(one(syn(4), sa), sa, BIG, MTU, clamp=False)
    assert maybe_syn(one(syn(4))) and maybe_syn(one(syn(6)))
    ack6 = raw(IPv6(src="fd00::1", dst="fd00::2") / TCP(sport=1, dport=2, flags="A"))
    assert not maybe_syn(one(inner_packet(4, 50))) and not maybe_syn(one(ack6))


# ------------------------------------------------------------------------------- inbound
def wire(alg: str, outer: int, udp: bool, seq: int, inner: bytes, *,
         pad: int | None = None, pad_bytes: bytes | None = None, nh: int | None = None,
         flip: int | None = None) -> bytes:
    """What the peer sends: ESP built with plain cryptography (tests/esp_support.py)."""
    src, dst = ADDR[outer]
    block = 4 if alg != "aes128-sha256" else 16
    nh = (4 if inner[0] >> 4 == 4 else 41) if nh is None else nh
    esp = bytearray(seal_esp(alg, SPI_OUT, seq, inner + trailer(len(inner), nh, block, pad,
                                                                pad_bytes), esn=False))
    if flip is not None:
        esp[flip] ^= 0x01
    body = udp_header(bytes(esp)) if udp else bytes(esp)
    return outer_ip(outer, src, dst, body, proto=17 if udp else 50)


def batch_path_decap(sas: SaTable, pkt: bytes) -> Batch:
    batch = one(pkt)
    EspCodec(sas, count=False).decap(batch)
    return batch


@pytest.mark.parametrize("alg", AEADS)
@pytest.mark.parametrize("outer", [4, 6])
@pytest.mark.parametrize("udp", [False, True])
def test_decap_matches_the_batch_path(alg: str, outer: int, udp: bool) -> None:
    rng = random.Random(f"{alg}{outer}{udp}")
    _, _, mine, mine_sa = pair(alg, Mode.TUNNEL, outer, udp=udp, replay_window=64)
    _, _, theirs, their_sa = pair(alg, Mode.TUNNEL, outer, udp=udp, replay_window=64)
    scratch = bytearray(Batch().slot_size)
    seq = 0
    for _ in range(40):
        seq += rng.choice([1, 1, 1, 5, 100])  # in order, with gaps: all right of the window
        inner = inner_packet(rng.choice([4, 6]), rng.randrange(0, 1300), salt=seq)
        pad = -(len(inner) + 2) % 4 + rng.choice([0, 0, 8, 20])  # longer padding too
        pkt = wire(alg, outer, udp, seq, inner, pad=pad)
        ours = one(pkt)
        assert decap_one(ours, mine, scratch) == (mine_sa, len(inner))
        want = batch_path_decap(theirs, pkt)
        assert want.meta["verdict"][0] == Verdict.PASS
        assert ours.packet(0) == want.packet(0) == inner
        for col in ("offset", "seq", "sa"):
            assert int(ours.meta[col][0]) == int(want.meta[col][0]), col
        assert mine_sa.replay.top == their_sa.replay.top == seq
        assert mine_sa.replay._ring.tobytes() == their_sa.replay._ring.tobytes()


def declined_decaps() -> list[tuple[str, bytes]]:
    """(why, packet) for the inbound SA of pair("aes128gcm16", TUNNEL, 4, udp=True)."""
    inner = inner_packet(4, 100)
    good = wire("aes128gcm16", 4, True, 10, inner)
    frag = bytearray(good)
    frag[6] |= 0x20  # More Fragments
    short_total = bytearray(good)
    short_total[2:4] = struct.pack("!H", len(good) + 1)
    return [
        ("tampered ciphertext", wire("aes128gcm16", 4, True, 10, inner, flip=30)),
        ("tampered ICV", wire("aes128gcm16", 4, True, 10, inner, flip=-1)),
        ("replayed", wire("aes128gcm16", 4, True, 5, inner)),  # 1 .. 7 were seen
        ("unknown SPI", good[:28] + b"\x00\x00\x99\x99" + good[32:]),
        ("raw ESP for a UDP SA", wire("aes128gcm16", 4, False, 10, inner)),
        ("IPv6 outer for an IPv4 SA", wire("aes128gcm16", 6, True, 10, inner)),
        ("fragment", bytes(frag)),
        ("IP length past the packet", bytes(short_total)),
        ("NAT keepalive", outer_ip(4, *ADDR[4], udp_header(b"\xff"), proto=17)),
        ("IKE (non-ESP marker)", outer_ip(4, *ADDR[4], udp_header(bytes(40)), proto=17)),
        ("bad padding", wire("aes128gcm16", 4, True, 10, inner, pad=6,
                             pad_bytes=b"\x01\x02\x03\x04\x05\x07")),
        ("wrong next header", wire("aes128gcm16", 4, True, 10, inner, nh=41)),
        ("dummy packet", wire("aes128gcm16", 4, True, 10, inner, nh=59)),
        ("inner length past the payload", wire("aes128gcm16", 4, True, 10,
                                               inner[:2] + b"\x05\xdc" + inner[4:])),
        ("not a multiple of 4", wire("aes128gcm16", 4, True, 10, inner, pad=1)),
    ]


@pytest.mark.parametrize("case", declined_decaps(), ids=lambda c: c[0])
def test_declined_decap_changes_nothing_and_the_batch_path_drops_it(
        case: tuple[str, bytes]) -> None:
    _, pkt = case
    _, _, sas, sa = pair("aes128gcm16", Mode.TUNNEL, 4, udp=True)
    _, _, ref, ref_sa = pair("aes128gcm16", Mode.TUNNEL, 4, udp=True)
    for s in (sa, ref_sa):
        s.replay.commit_run(1, 7)  # 1 .. 7 seen
    batch = one(pkt)
    before, ring = snapshot(batch), sa.replay._ring.tobytes()
    assert decap_one(batch, sas, bytearray(batch.slot_size)) is None
    assert snapshot(batch) == before
    assert (sa.replay.top, sa.replay._ring.tobytes()) == (7, ring)
    # What it declined here, the batch path refuses too (and counts by reason).
    assert batch_path_decap(ref, pkt).meta["verdict"][0] != Verdict.PASS


def test_esn_and_cbc_are_declined() -> None:
    inner = inner_packet(4, 64)
    for alg, esn in (("aes128gcm16", True), ("aes128-sha256", False)):
        _, _, sas, sa = pair(alg, Mode.TUNNEL, 4, esn=esn)
        src, dst = ADDR[4]
        block = 4 if alg == "aes128gcm16" else 16
        pkt = outer_ip(4, src, dst, seal_esp(alg, SPI_OUT, 1, inner + trailer(
            len(inner), 4, block), esn=esn))
        assert batch_path_decap(pair(alg, Mode.TUNNEL, 4, esn=esn)[2], pkt).meta[
            "verdict"][0] == Verdict.PASS
        assert decap_one(one(pkt), sas, bytearray(2048)) is None and sa.replay.top == 0


def test_random_bytes_never_raise() -> None:
    """Whatever a packet holds, both functions either take it or decline it unchanged."""
    rng = random.Random(7)
    _, out_sa, _, _ = pair("aes128gcm16", Mode.TUNNEL, 4, udp=True)
    _, _, in_sas, _ = pair("aes128gcm16", Mode.TUNNEL, 4, udp=True)
    good = wire("aes128gcm16", 4, True, 1, inner_packet(4, 40))
    for k in range(3000):
        if k % 3 == 0:  # a real packet, cut or with bytes changed
            pkt = bytearray(good[: rng.randrange(len(good) + 1)])
            for _ in range(rng.randrange(4)):
                if pkt:
                    pkt[rng.randrange(len(pkt))] = rng.randrange(256)
            data = bytes(pkt)
        else:
            data = bytes([rng.choice((0x45, 0x46, 0x60))]) + rng.randbytes(rng.randrange(120))
        for run in (lambda b: encap_one(b, out_sa, BIG, MTU, True),
                    lambda b: decap_one(b, in_sas, bytearray(b.slot_size))):
            batch = one(data)
            before = snapshot(batch)
            if not run(batch):
                assert snapshot(batch) == before
