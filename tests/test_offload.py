"""TUN offloads, sans-IO (pipeline/offload.py): segmentation of TSO packets and coalescing of
segments, checked against packets scapy builds and checksums it computes (an independent
oracle)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, IPOption
from scapy.layers.inet6 import IPv6

from pipeline import offload
from pipeline.batch import HEADROOM, Batch
from pipeline.offload import (
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    OffloadError,
    Run,
    Superpacket,
    coalesce,
    complete_checksums,
    ones_sum,
    run_header,
)

FIN, PSH, ACK, CWR, ECE = 0x01, 0x08, 0x10, 0x80, 0x40
OPTIONS = [("NOP", None), ("NOP", None), ("Timestamp", (123456, 654321))]


def _ip(v6: bool, **kw: object) -> IP | IPv6:
    if v6:
        return IPv6(src="2001:db8:1::1", dst="2001:db8:2::1", tc=kw.get("tos", 0), hlim=63)
    return IP(src="10.1.0.1", dst="10.2.0.1", id=kw.get("id", 4321), flags=kw.get("ipflags", "DF"),
              ttl=63, tos=kw.get("tos", 0))


def _segment(v6: bool, seq: int, payload: bytes, flags: int, ident: int = 4321,
             ipflags: str = "DF", ack: int = 777, window: int = 501) -> bytes:
    pkt = _ip(v6, id=ident, ipflags=ipflags) / TCP(sport=40000, dport=5201, seq=seq, ack=ack,
                                                    flags=flags, window=window,
                                                    options=OPTIONS) / payload
    return bytes(pkt)


def _batch_of(packets: list[bytes]) -> Batch:
    return Batch.for_packets(packets)


def _fold(data: bytes, initial: int = 0) -> int:
    """RFC 1071, word by word (the oracle for ones_sum)."""
    padded = data + b"\0" * (len(data) % 2)
    total = initial + sum(int.from_bytes(padded[i:i + 2], "big")
                          for i in range(0, len(padded), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _verifies(pkt: bytes, proto: int = 6) -> bool:
    """The IPv4 header and TCP (or UDP: ``proto`` 17) checksums verify (a receiver's check:
    the sum including the checksum is all ones; for TCP 0x0000 and 0xFFFF are both the
    checksum of a sum of zero, UDP never sends 0, "no checksum")."""
    if pkt[0] >> 4 == 6:
        l4, pseudo = 40, _fold(pkt[8:40], proto + len(pkt) - 40)
    else:
        l4 = (pkt[0] & 0xF) * 4
        if _fold(pkt[:l4]) != 0xFFFF:
            return False
        pseudo = _fold(pkt[12:20], proto + len(pkt) - l4)
    if proto == 17 and pkt[l4 + 6:l4 + 8] == b"\0\0":
        return False
    return _fold(pkt[l4:], pseudo) == 0xFFFF


def _sans_checksums(pkt: bytes) -> bytes:
    raw = bytearray(pkt)
    l4 = 40 if pkt[0] >> 4 == 6 else (pkt[0] & 0xF) * 4
    if l4 != 40:
        raw[10:12] = b"\0\0"
    raw[l4 + 16:l4 + 18] = b"\0\0"
    return bytes(raw)


# --- the checksum -----------------------------------------------------------------------------
@given(st.binary(max_size=300), st.integers(0, 0xFFFF))
def test_ones_sum_matches_rfc1071_word_by_word(data: bytes, initial: int) -> None:
    assert ones_sum(data, initial) == _fold(data, initial)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=40, max_size=1500), st.sampled_from([20, 40])),
                min_size=1, max_size=12))
def test_complete_checksums_gives_scapy_s_checksum(items: list[tuple[bytes, int]]) -> None:
    """A TCP packet whose checksum field holds the pseudo-header sum (what a sender leaves
    with CHECKSUM_PARTIAL) comes out with the checksum scapy computes."""
    packets = []
    for payload, _ in items:
        packets.append(_segment(False, 1000, payload, ACK | PSH))
    batch = _batch_of(packets)
    n = len(packets)
    offsets = batch.meta["offset"][:n].astype(np.int64)
    lengths = batch.meta["length"][:n].astype(np.int64)
    for off, length in zip(offsets.tolist(), lengths.tolist(), strict=True):
        tcp_len = length - 20
        pseudo = ones_sum(bytes(batch.data[off + 12:off + 20]), 6 + tcp_len)
        batch.data[off + 36:off + 38] = list(pseudo.to_bytes(2, "big"))
    done = complete_checksums(batch.data, offsets, lengths, np.full(n, 20), np.full(n, 16),
                              batch.slot_size)
    assert done.all()
    for i, pkt in enumerate(packets):
        assert _sans_checksums(batch.packet(i)) == _sans_checksums(pkt)
        assert _verifies(batch.packet(i))


# --- segmentation -----------------------------------------------------------------------------
def _superpacket(v6: bool, payload: bytes, flags: int, ident: int = 4321) -> bytes:
    """What the kernel hands over with TSO: one packet, checksum left partial."""
    raw = bytearray(_segment(v6, 0xFFFFF000, payload, flags, ident))
    l4 = 40 if v6 else 20
    tcp_len = len(raw) - l4
    src = raw[8:40] if v6 else raw[12:20]
    raw[l4 + 16:l4 + 18] = ones_sum(bytes(src), 6 + tcp_len).to_bytes(2, "big")
    return bytes(raw)


def _expected_segments(v6: bool, payload: bytes, mss: int, flags: int, ident: int = 4321
                       ) -> list[bytes]:
    chunks = [payload[i:i + mss] for i in range(0, len(payload), mss)] or [b""]
    out = []
    for k, chunk in enumerate(chunks):
        f = flags
        if k != len(chunks) - 1:
            f &= ~(FIN | PSH)
        if k:
            f &= ~CWR
        out.append(_segment(v6, (0xFFFFF000 + k * mss) & 0xFFFFFFFF, chunk, f,
                            (ident + k) & 0xFFFF))
    return out


@settings(max_examples=40, deadline=None)
@given(v6=st.booleans(), size=st.integers(1, 9000), mss=st.sampled_from([536, 1000, 1348, 1448]),
       flags=st.sampled_from([ACK, ACK | PSH, ACK | PSH | FIN, ACK | CWR | ECE]),
       ident=st.sampled_from([1, 0xFFFE]), limit=st.integers(1, 12))
def test_superpacket_segments_are_what_the_kernel_would_send(
        v6: bool, size: int, mss: int, flags: int, ident: int, limit: int) -> None:
    """Cut into slots over as many batches as it takes: each segment equals the one scapy
    builds (sequence numbers wrapping past 2^32, identification past 0xFFFF, FIN/PSH on the
    last only, CWR on the first only), checksums included."""
    payload = bytes((i * 7) & 0xFF for i in range(size))
    sp_bytes = _superpacket(v6, payload, flags, ident)
    batch = Batch(16)
    gso = (GSO_TCPV6 if v6 else GSO_TCPV4) | (GSO_ECN if flags & CWR else 0)
    sp = Superpacket.parse(np.frombuffer(sp_bytes, dtype=np.uint8).copy(), gso, mss,
                           batch.max_packet)
    got: list[bytes] = []
    while sp.remaining:
        lengths = sp.emit(batch.data, HEADROOM, batch.slot_size, limit)
        for k, length in enumerate(lengths):
            off = HEADROOM + k * batch.slot_size
            got.append(bytes(batch.data[off:off + length]))
    expected = _expected_segments(v6, payload, mss, flags, ident)
    assert [_sans_checksums(p) for p in got] == [_sans_checksums(p) for p in expected]
    assert all(_verifies(p) for p in got)


@settings(max_examples=30, deadline=None)
@given(v6=st.booleans(), size=st.integers(0, 6000), mss=st.sampled_from([1, 100, 1200, 1472]),
       limit=st.integers(1, 9))
def test_udp_gso_is_cut_into_the_datagrams_sent(v6: bool, size: int, mss: int,
                                                limit: int) -> None:
    """A UDP_SEGMENT send (GSO_UDP_L4): one datagram per ``mss`` bytes, each with its own
    length and a whole checksum, IPv4 identification advancing (what the kernel's UDP
    segmentation does)."""
    from scapy.layers.inet import UDP

    payload = bytes((i * 13) & 0xFF for i in range(size))
    big = bytes(_ip(v6, id=77) / UDP(sport=4433, dport=443) / payload)
    batch = Batch(16)
    sp = Superpacket.parse(np.frombuffer(big, dtype=np.uint8).copy(), GSO_UDP_L4, mss,
                           batch.max_packet)
    got: list[bytes] = []
    while sp.remaining:
        for k, length in enumerate(sp.emit(batch.data, HEADROOM, batch.slot_size, limit)):
            off = HEADROOM + k * batch.slot_size
            got.append(bytes(batch.data[off:off + length]))
    chunks = [payload[i:i + mss] for i in range(0, size, mss)] or [b""]
    expected = [bytes(_ip(v6, id=(77 + k) & 0xFFFF) / UDP(sport=4433, dport=443) / c)
                for k, c in enumerate(chunks)]
    l4 = 40 if v6 else 20
    strip = [lambda p: p[:l4 + 6] + p[l4 + 8:] if v6 else
             p[:10] + p[12:l4 + 6] + p[l4 + 8:]][0]
    assert [strip(p) for p in got] == [strip(p) for p in expected]
    assert all(_verifies(p, 17) for p in got)


def test_tcp_over_ipv4_with_options_is_cut_as_ipv4() -> None:
    """An IPv4 header of 40 bytes (options) is still IPv4, not taken for IPv6's 40."""
    payload = bytes(range(256)) * 12
    pkt = IP(src="10.1.0.1", dst="10.2.0.1", id=9, flags="DF", ttl=63,
             options=[IPOption(b"\x94\x04\x00\x00") for _ in range(5)]) / \
        TCP(sport=1, dport=2, seq=5, ack=6, flags="A", window=7) / payload
    raw = bytes(pkt)
    assert raw[0] & 0xF == 10
    batch = Batch(8)
    sp = Superpacket.parse(np.frombuffer(raw, dtype=np.uint8).copy(), GSO_TCPV4, 1000,
                           batch.max_packet)
    lengths = sp.emit(batch.data, HEADROOM, batch.slot_size, 8)
    assert lengths == [60 + 1000, 60 + 1000, 60 + 1000, 60 + 72]  # 40 IPv4 + 20 TCP
    for k, length in enumerate(lengths):
        off = HEADROOM + k * batch.slot_size
        seg = bytes(batch.data[off:off + length])
        assert seg[:2] == raw[:2] and int.from_bytes(seg[2:4], "big") == length
        assert int.from_bytes(seg[4:6], "big") == 9 + k
        assert _verifies(seg)
        assert int.from_bytes(seg[44:48], "big") == 5 + 1000 * k  # TCP seq after 40 + 4


@pytest.mark.parametrize(("raw", "gso", "why"), [
    (bytes(_ip(False) / TCP() / b"x"), GSO_TCPV6, "not IPv6"),
    (bytes(_ip(True) / TCP() / b"x"), GSO_TCPV4, "not IPv4"),
    (bytes(IP(src="1.2.3.4", dst="5.6.7.8", proto=17) / (b"x" * 30)), GSO_TCPV4, "not an unfrag"),
    (bytes(IP(src="1.2.3.4", dst="5.6.7.8", flags="MF") / TCP() / b"x"), GSO_TCPV4, "unfrag"),
    (bytes(_ip(False) / TCP()), 3, "neither TCP nor UDP"),
    (bytes(_ip(False) / TCP() / b"x"), GSO_UDP_L4, "not an unfragmented UDP"),
    (bytes(_ip(False) / TCP(dataofs=3)), GSO_TCPV4, "bad TCP header"),
    (bytes(_ip(False) / TCP())[:30], GSO_TCPV4, "shorter than its headers"),
])
def test_superpacket_refuses_what_it_cannot_cut(raw: bytes, gso: int, why: str) -> None:
    with pytest.raises(OffloadError, match=why):
        Superpacket.parse(np.frombuffer(raw, dtype=np.uint8).copy(), gso, 500, 1500)


def test_superpacket_refuses_segments_longer_than_a_slot() -> None:
    raw = _superpacket(False, b"x" * 5000, ACK)
    with pytest.raises(OffloadError, match="exceed a slot"):
        Superpacket.parse(np.frombuffer(raw, dtype=np.uint8).copy(), GSO_TCPV4, 1500, 1500)
    with pytest.raises(OffloadError, match="segment size"):
        Superpacket.parse(np.frombuffer(raw, dtype=np.uint8).copy(), GSO_TCPV4, 0, 1500)


# --- coalescing -------------------------------------------------------------------------------
def _stream(v6: bool, sizes: list[int], seq0: int = 5000, **kw: object) -> list[bytes]:
    out, seq = [], seq0
    for k, size in enumerate(sizes):
        out.append(_segment(v6, seq, bytes([k & 0xFF]) * size, ACK, ident=100 + k, **kw))  # type: ignore[arg-type]
        seq += size
    return out


def _write(batch: Batch, runs: list[Run]) -> list[tuple[bytes, bytes]]:
    """What tun.py writes: (virtio-net header, packet) per run and per lone packet."""
    n = batch.count
    out: list[tuple[bytes, bytes]] = []
    in_run = {i: r for r in runs for i in range(r.first, r.last + 1)}
    i = 0
    while i < n:
        run = in_run.get(i)
        if run is None:
            out.append((offload.NO_OFFLOAD, batch.packet(i)))
            i += 1
            continue
        first = batch.packet(run.first)
        l4 = 40 if first[0] >> 4 == 6 else 20
        header = l4 + (first[l4 + 12] >> 4) * 4
        pays = [batch.packet(k)[header:] for k in range(run.first, run.last + 1)]
        last = batch.packet(run.last)
        vnet, hdr = run_header(batch.data, int(batch.meta["offset"][run.first]), header, l4,
                               sum(map(len, pays)), len(pays[0]), bool(last[l4 + 13] & PSH))
        out.append((vnet, hdr + b"".join(pays)))
        i = run.last + 1
    return out


def _complete(pkt: bytes, vnet: bytes) -> bytes:
    """The coalesced packet as the kernel sees it after completing the checksum."""
    flags, gso, hdr_len, _, start, field = offload.VNET_HDR.unpack(vnet)
    assert flags == F_NEEDS_CSUM and gso in (GSO_TCPV4, GSO_TCPV6)
    raw = bytearray(pkt)
    csum = 0xFFFF - ones_sum(bytes(raw[start:]))
    raw[start + field:start + field + 2] = (csum or 0xFFFF).to_bytes(2, "big")
    return bytes(raw)


@pytest.mark.parametrize("v6", [False, True])
def test_a_stream_coalesces_into_what_scapy_builds_whole(v6: bool) -> None:
    sizes = [1000] * 7 + [300]
    pkts = _stream(v6, sizes)
    batch = _batch_of(pkts)
    runs = coalesce(batch.data, batch.meta["offset"][:8].astype(np.int64),
                    batch.meta["length"][:8].astype(np.int64), batch.slot_size)
    assert runs == [Run(0, 7)]
    [(vnet, pkt)] = _write(batch, runs)
    _, gso, hdr_len, gso_size, start, field = offload.VNET_HDR.unpack(vnet)
    assert (gso, gso_size, start, field) == ((GSO_TCPV6 if v6 else GSO_TCPV4), 1000,
                                             40 if v6 else 20, 16)
    whole = _segment(v6, 5000, b"".join(bytes([k]) * s for k, s in enumerate(sizes)), ACK,
                     ident=100)
    done = _complete(pkt, vnet)
    assert _sans_checksums(done) == _sans_checksums(whole)
    assert _verifies(done)
    assert hdr_len == (40 if v6 else 20) + 32


def _runs(pkts: list[bytes]) -> list[Run]:
    batch = _batch_of(pkts)
    n = len(pkts)
    return coalesce(batch.data, batch.meta["offset"][:n].astype(np.int64),
                    batch.meta["length"][:n].astype(np.int64), batch.slot_size)


def _with(pkt: bytes, **fields: object) -> bytes:
    p = (IPv6 if pkt[0] >> 4 == 6 else IP)(pkt)
    for k, v in fields.items():
        setattr(p[TCP], k, v)
    del p[TCP].chksum
    return bytes(p)


@pytest.mark.parametrize("v6", [False, True])
def test_what_breaks_a_run(v6: bool) -> None:
    s = _stream(v6, [1000] * 6)
    assert _runs(s) == [Run(0, 5)]
    # another ACK number, window or timestamp: another run (a flow's state changed)
    assert _runs(s[:3] + [_with(s[3], ack=778)] + s[4:]) == [Run(0, 2), Run(4, 5)]
    assert _runs(s[:3] + [_with(s[3], window=502)] + s[4:]) == [Run(0, 2), Run(4, 5)]
    # a gap in the sequence numbers
    assert _runs(s[:3] + s[4:]) == [Run(0, 2), Run(3, 4)]
    # PSH ends a run; a FIN or a SYN is never coalesced
    assert _runs(s[:2] + [_with(s[2], flags="PA")] + s[3:]) == [Run(0, 2), Run(3, 5)]
    assert _runs(s[:2] + [_with(s[2], flags="FA")] + s[3:]) == [Run(0, 1), Run(3, 5)]
    # a shorter segment ends a run; a longer one cannot follow
    short = _stream(v6, [1000, 1000, 500, 1000, 1000])
    assert _runs(short) == [Run(0, 2), Run(3, 4)]
    # another port
    assert _runs(s[:2] + [_with(s[2], sport=40001)] + s[3:]) == [Run(0, 1), Run(3, 5)]
    # a bad checksum: the segment stays alone, for the kernel to drop
    bad = bytearray(s[2])
    bad[-1] ^= 0xFF
    assert _runs(s[:2] + [bytes(bad)] + s[3:]) == [Run(0, 1), Run(3, 5)]


def test_ipv4_identification_must_follow_on_without_df() -> None:
    s = _stream(False, [1000] * 4, ipflags="")
    assert _runs(s) == [Run(0, 3)]
    jumped = bytearray(s[2])
    p = IP(bytes(jumped))
    p.id = 999
    del p.chksum
    assert _runs(s[:2] + [bytes(p)] + s[3:]) == [Run(0, 1)]


def test_a_run_stays_within_64k() -> None:
    s = _stream(False, [1400] * 60)
    runs = _runs(s)
    assert [r.last - r.first + 1 for r in runs] == [46, 14]
    for r in runs:
        total = sum(len(s[k]) - 52 for k in range(r.first, r.last + 1))
        assert 52 + total <= 0xFFFF


def test_other_traffic_is_not_coalesced() -> None:
    udp = bytes(IP(src="10.1.0.1", dst="10.2.0.1", proto=17) / (b"x" * 100))
    s = _stream(False, [1000] * 2)
    assert _runs([udp, *s, udp]) == [Run(1, 2)]
    assert _runs([udp, udp]) == []


@pytest.mark.parametrize("count", [1, 3, 40])  # plain Python below tun._PLAIN_MAX, numpy above
def test_a_tun_read_completes_partial_checksums_either_way(count: int) -> None:
    """What pipeline/tun.py does with the packets of a read flagged NEEDS_CSUM: TCP and UDP,
    IPv4 and IPv6, odd and even lengths, in slots as a read leaves them."""
    from scapy.layers.inet import UDP

    from pipeline import tun

    whole: list[bytes] = []
    heads = bytearray(count * offload.VNET_HDR_LEN)
    for i in range(count):
        v6, udp = bool(i % 2), bool(i % 3 == 0)
        l4 = 40 if v6 else 20
        payload = bytes((i + k) & 0xFF for k in range(7 * i + 1))
        ip = _ip(v6)
        pkt = bytes(ip / UDP(sport=1000 + i, dport=53) / payload) if udp else \
            _segment(v6, 100 * i, payload, ACK | PSH)
        whole.append(pkt)
        offload.VNET_HDR.pack_into(heads, i * offload.VNET_HDR_LEN, F_NEEDS_CSUM, 0, 0, 0, l4,
                                   6 if udp else 16)
    batch = Batch(count)
    lengths = []
    for i, pkt in enumerate(whole):
        raw = bytearray(pkt)
        l4 = 40 if pkt[0] >> 4 == 6 else 20
        field = l4 + (6 if i % 3 == 0 else 16)
        src = raw[8:40] if l4 == 40 else raw[12:20]
        raw[field:field + 2] = ones_sum(bytes(src), (17 if i % 3 == 0 else 6)
                                        + len(raw) - l4).to_bytes(2, "big")  # partial
        off = i * batch.slot_size + HEADROOM
        batch.data[off:off + len(raw)] = list(raw)
        lengths.append(len(raw))
    tun._complete(batch, list(range(count)), lengths, heads)
    for i, pkt in enumerate(whole):
        off = i * batch.slot_size + HEADROOM
        got = bytes(batch.data[off:off + len(pkt)])
        l4 = 40 if pkt[0] >> 4 == 6 else 20
        at = l4 + (6 if i % 3 == 0 else 16)
        assert got[:at] + got[at + 2:] == pkt[:at] + pkt[at + 2:]
        expect, mine = int.from_bytes(pkt[at:at + 2], "big"), int.from_bytes(got[at:at + 2], "big")
        assert mine == expect or {mine, expect} == {0, 0xFFFF} and i % 3, (i, mine, expect)
