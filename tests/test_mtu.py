"""Path MTU handling (pipeline/mtu.py) against independent oracles.

- ``inner_mtu`` / ``encapsulated_length``: the ESP codec (workers/esp.py) encapsulates packets
  of exactly the inner MTU and one byte more, for every algorithm and layout; the first fits
  the outer MTU, the second does not.
- ``clamp_mss``: scapy builds each SYN twice, with the original MSS and with the clamped one;
  the clamped packet must equal scapy's byte for byte, so the incremental checksum equals
  scapy's full recomputation. Everything else must be untouched.
- ``icmp_too_big``: scapy parses the errors and recomputes their checksums.
- ``fragment_ipv4``: scapy's ``defragment`` reassembles the fragments byte for byte.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import (
    ICMP,
    IP,
    TCP,
    UDP,
    IPOption_LSRR,
    IPOption_Router_Alert,
    IPOption_RR,
    IPOption_Security,
    defragment,
)
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6ND_Redirect,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.ipsec import AH
from scapy.packet import Packet, Raw, raw

from pipeline.batch import Batch, Verdict
from pipeline.mtu import (
    clamp_mss,
    encapsulated_length,
    esp_overhead,
    fragment_ipv4,
    icmp_too_big,
    inner_mtu,
    mss_limit,
    too_big,
)
from pipeline.satable import Direction, Mode, Protocol, SaRecord, UdpEncap
from workers.algorithms import parse_esp
from workers.esp import EspCodec
from workers.sa import SaState, SaTable

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALGS = ["aes128gcm16", "aes256gcm16", "chacha20poly1305", "aes128-sha256", "aes192-sha384",
        "aes256-sha512", "null-sha256", "null-sha512"]
# (mode, outer family): tunnel packets are of the same family as the outer header.
LAYOUTS = [(Mode.TUNNEL, 4), (Mode.TUNNEL, 6), (Mode.TRANSPORT, 4), (Mode.TRANSPORT, 6)]
ADDR = {
    4: (ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("198.51.100.2")),
    6: (ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("2001:db8:ffff::2")),
}
OUR4 = ipaddress.IPv4Address("10.1.0.254")
OUR6 = ipaddress.IPv6Address("fd00:1::fe")


def inet_sum(data: bytes) -> int:
    """RFC 1071 one's complement sum, folded to 16 bits (independent of pipeline/mtu.py)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def rebuilt_checksum(pkt: Packet, layer: Any, field: str) -> int:
    """The checksum scapy computes for ``layer`` of ``pkt`` once ours is deleted."""
    copy = pkt.copy()
    delattr(copy[layer], field)
    value: int = type(pkt)(raw(copy))[layer].getfieldval(field)
    return value


# ============================================================================ ESP overhead
def out_sa(sas: SaTable, alg: str, mode: Mode, family: int, udp: bool) -> SaState:
    t = parse_esp(alg)
    local, remote = ADDR[family]
    integ = bytes(range(t.integ.key_len)) if t.integ is not None else b""
    return sas.install(SaRecord(
        spi=0x1000, direction=Direction.OUT, alg=alg, local_addr=local, remote_addr=remote,
        protocol=Protocol.ESP, mode=mode, enc_key=bytes(range(t.key_material_len)),
        integ_key=integ, encap=UdpEncap() if udp else None))


def packet(mode: Mode, family: int, size: int, *, df: bool = True) -> bytes:
    """An IPv4/UDP or IPv6/UDP packet of exactly ``size`` bytes (transport: the SA's own
    addresses, tunnel: inside addresses)."""
    if mode is Mode.TRANSPORT:
        src, dst = (str(a) for a in ADDR[family])
    else:
        src, dst = ("10.1.0.1", "10.2.0.2") if family == 4 else ("fd00:1::1", "fd00:2::2")
    hdr = (IP(src=src, dst=dst, id=7, flags="DF" if df else 0) if family == 4
           else IPv6(src=src, dst=dst))
    pkt = raw(hdr / UDP(sport=1, dport=2) / Raw(b"\xab" * (size - len(raw(hdr)) - 8)))
    assert len(pkt) == size
    return pkt


def encap(sas: SaTable, sa: SaState, packets: list[bytes]) -> list[bytes]:
    batch = Batch.for_packets(packets)
    batch.meta["sa"][: batch.count] = sa.index
    sas.assign_sequence(batch)
    EspCodec(sas).encap(batch)
    assert [Verdict(v) for v, _ in batch] == [Verdict.PASS] * len(packets)
    return batch.packets()


def test_esp_overhead_by_hand() -> None:
    gcm, cbc, null = (parse_esp(a) for a in ("aes128gcm16", "aes128-sha256", "null-sha256"))
    # IPv4 20 + ESP 8 + IV 8 + trailer 2 + ICV 16.
    assert esp_overhead(gcm, False, False, True) == 54
    # IPv6 40 + UDP 8 + ESP 8 + IV 16 + trailer 2 + HMAC-SHA-256-128 16.
    assert esp_overhead(cbc, True, True, True) == 90
    # Transport: ESP 8 + trailer 2 + ICV 16, no IV.
    assert esp_overhead(null, False, False, False) == 26
    # The figures operators know for a 1500-byte IPv4 path: 1446 for GCM, 1438 for CBC.
    assert inner_mtu(1500, gcm, False, False, True) == 1446
    assert inner_mtu(1500, cbc, False, False, True) == 1438
    assert mss_limit(1446, False) == 1406
    assert mss_limit(1446, True) == 1386
    with pytest.raises(ValueError):
        inner_mtu(60, cbc, False, False, True)


@pytest.mark.parametrize("udp", [False, True], ids=["esp", "udp"])
@pytest.mark.parametrize(("mode", "family"), LAYOUTS,
                         ids=["tunnel4", "tunnel6", "transport4", "transport6"])
@pytest.mark.parametrize("alg", ALGS)
def test_inner_mtu_is_exact_against_the_codec(alg: str, mode: Mode, family: int,
                                              udp: bool) -> None:
    t = parse_esp(alg)
    tunnel, v6 = mode is Mode.TUNNEL, family == 6
    sas = SaTable()
    sa = out_sa(sas, alg, mode, family, udp)
    mtus = [1280, 1400, 1437, 1500, 1501, 1502, 1503]
    limits = [inner_mtu(m, t, v6, udp, tunnel) for m in mtus]
    # Every padding length: a run of lengths over two blocks.
    run = list(range(200, 200 + 2 * t.block_len + 1))
    lengths = [x for lim in limits for x in (lim, lim + 1)] + run
    out = encap(sas, sa, [packet(mode, family, size) for size in lengths])
    for size, enc in zip(lengths, out, strict=True):
        assert len(enc) == encapsulated_length(size, t, v6, udp, tunnel)
        ip_len = (struct.unpack("!H", enc[2:4])[0] if family == 4
                  else 40 + struct.unpack("!H", enc[4:6])[0])
        assert ip_len == len(enc)
    for i, m in enumerate(mtus):
        fits, over = out[2 * i], out[2 * i + 1]
        assert len(fits) <= m < len(over), (m, limits[i], len(fits), len(over))


@FAST
@given(alg=st.sampled_from(ALGS), layout=st.sampled_from(LAYOUTS), udp=st.booleans(),
       mtu=st.integers(1280, 9000))
def test_inner_mtu_random_mtus(alg: str, layout: tuple[Mode, int], udp: bool,
                               mtu: int) -> None:
    mode, family = layout
    t = parse_esp(alg)
    limit = inner_mtu(mtu, t, family == 6, udp, mode is Mode.TUNNEL)
    sas = SaTable()
    fits, over = encap(sas, out_sa(sas, alg, mode, family, udp),
                       [packet(mode, family, limit), packet(mode, family, limit + 1)])
    assert len(fits) <= mtu < len(over)
    # Padding is at most one block: the limit is never more than a block below exact.
    assert mtu - len(fits) < t.block_len


# ============================================================================ MSS clamping
V4_SRC, V4_DST = "10.1.0.1", "10.2.0.2"
V6_SRC, V6_DST = "fd00:1::1", "fd00:2::2"


def syn(version: int, options: list[tuple[str, Any]], *, flags: str = "S",
        ip_options: list[Packet] | None = None, ext: Packet | None = None,
        data: bytes = b"") -> bytes:
    tcp = TCP(sport=40000, dport=443, seq=0x01020304, ack=0x0A0B0C0D if "A" in flags else 0,
              flags=flags, window=64240, options=options)
    if version == 4:
        ip: Packet = IP(src=V4_SRC, dst=V4_DST, id=0x4242, ttl=61, options=ip_options or [])
    else:
        ip = IPv6(src=V6_SRC, dst=V6_DST, hlim=61)
        if ext is not None:
            ip = ip / ext
    return raw(ip / tcp / Raw(data)) if data else raw(ip / tcp)


def raw_options(version: int, options: bytes) -> bytes:
    """A SYN whose TCP options are ``options`` as given, with a valid TCP checksum."""
    pkt = bytearray(syn(version, [("NOP", None)] * len(options)))
    tcp_at = 20 if version == 4 else 40
    pkt[tcp_at + 20 : tcp_at + 20 + len(options)] = options
    pkt[tcp_at + 16 : tcp_at + 18] = b"\0\0"
    segment = bytes(pkt[tcp_at:])
    if version == 4:
        pseudo = pkt[12:20] + struct.pack("!BBH", 0, 6, len(segment))
    else:
        pseudo = pkt[8:40] + struct.pack("!I3xB", len(segment), 6)
    pkt[tcp_at + 16 : tcp_at + 18] = struct.pack("!H", 0xFFFF - inet_sum(bytes(pseudo) + segment))
    return bytes(pkt)


def with_mss(options: list[tuple[str, Any]], mss: int) -> list[tuple[str, Any]]:
    return [("MSS", mss) if kind == "MSS" else (kind, v) for kind, v in options]


def clamp(packets: list[bytes], mss_v4: Any, mss_v6: Any,
          verdicts: list[Verdict] | None = None) -> tuple[int, list[bytes]]:
    batch = Batch.for_packets(packets)
    batch.data[:] = 0xA5  # a reused buffer: nothing outside the packets is zero
    batch.load(packets)
    if verdicts is not None:
        batch.meta["verdict"][: len(verdicts)] = verdicts
    before = batch.data.copy()
    count = clamp_mss(batch, mss_v4, mss_v6)
    after = [batch.packet(i) for i in range(batch.count)]
    # Nothing outside the packets changed.
    outside = np.ones(batch.data.size, dtype=bool)
    for i in range(batch.count):
        o, n = int(batch.meta["offset"][i]), int(batch.meta["length"][i])
        outside[o : o + n] = False
    assert np.array_equal(before[outside], batch.data[outside])
    return count, after


def check_tcp(pkt: bytes, mss: int) -> None:
    """scapy reads the MSS, and its own checksum equals ours."""
    p = IP(pkt) if pkt[0] >> 4 == 4 else IPv6(pkt)
    assert dict((k, v) for k, v in p[TCP].options)["MSS"] == mss
    assert rebuilt_checksum(p, TCP, "chksum") == p[TCP].chksum


OPTION_ORDERS = [
    [("MSS", 1460)],
    [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)],
    [("NOP", None), ("MSS", 1460)],  # the value at an odd offset
    [("SAckOK", b""), ("MSS", 1460), ("WScale", 7)],
    [("Timestamp", (5, 6)), ("NOP", None), ("NOP", None), ("NOP", None), ("MSS", 9000)],
    [("WScale", 14), ("MSS", 65535), ("EOL", None)],
]


@pytest.mark.parametrize("flags", ["S", "SA"])
@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("options", OPTION_ORDERS, ids=range(len(OPTION_ORDERS)))
def test_clamp_option_orders(options: list[tuple[str, Any]], version: int,
                             flags: str) -> None:
    limit = 1300
    count, (got,) = clamp([syn(version, options, flags=flags)], limit, limit)
    assert count == 1
    assert got == syn(version, with_mss(options, limit), flags=flags)
    check_tcp(got, limit)


@pytest.mark.parametrize(("version", "kw"), [
    (4, {"ip_options": [IPOption_Router_Alert()]}),
    (4, {"ip_options": [IPOption_LSRR(routers=["192.0.2.9"]), IPOption_Security()]}),
    (6, {"ext": IPv6ExtHdrHopByHop()}),
    (6, {"ext": IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop()}),
    (6, {"ext": IPv6ExtHdrFragment(offset=0, m=1, id=9)}),  # a first fragment
], ids=["v4-ra", "v4-lsrr-sec", "v6-hbh", "v6-dst-hbh", "v6-first-fragment"])
def test_clamp_other_ip_layouts(version: int, kw: dict[str, Any]) -> None:
    options = [("NOP", None), ("MSS", 1460), ("SAckOK", b"")]
    count, (got,) = clamp([syn(version, options, **kw)], 1200, 1200)
    assert count == 1
    assert got == syn(version, with_mss(options, 1200), **kw)


def test_clamp_leaves_others_byte_exact() -> None:
    mss = [("MSS", 1460)]
    packets = [
        syn(4, mss, flags="A"),  # not a SYN
        syn(6, mss, flags="PA", data=b"hello"),
        syn(4, [("MSS", 1200)]),  # already small enough
        syn(6, [("MSS", 1000), ("NOP", None)]),
        syn(4, [("MSS", 1300)]),  # exactly the limit
        syn(4, [("WScale", 7), ("SAckOK", b"")]),  # no MSS
        syn(4, []),
        syn(4, [("EOL", None), ("NOP", None), ("MSS", 1460)]),  # after End of Option List
        # Malformed: a kind-length option of length 0 or past the end before MSS; an MSS
        # option of length 3 or 5.
        raw_options(4, b"\x08\x00\x02\x04\x05\xb4\x00\x00"),
        raw_options(6, b"\x01\x08\x09\x02\x04\x05\xb4\x00"),
        raw_options(4, b"\x02\x03\x05\xb4\x00\x00\x00\x00"),
        raw_options(6, b"\x01\x02\x05\x05\xb4\x00\x00\x00"),
        # After End of Option List everything is padding, even bytes that read as an MSS.
        raw_options(4, b"\x00\x02\x02\x04\x05\xb4\x00\x00"),
        raw(IP(src=V4_SRC, dst=V4_DST) / UDP(sport=1, dport=2) / Raw(b"\x02\x04\x05\xb4" * 8)),
        # A non-first fragment whose payload looks like a SYN with MSS 1460.
        raw(IP(src=V4_SRC, dst=V4_DST, proto=6, frag=100) / Raw(syn(4, mss)[20:])),
        raw(IPv6(src=V6_SRC, dst=V6_DST) / IPv6ExtHdrFragment(offset=8, nh=6)
            / Raw(syn(6, mss)[40:])),
        # An AH-protected segment: a new MSS would break its ICV.
        raw(IPv6(src=V6_SRC, dst=V6_DST) / AH(nh=6, payloadlen=5, spi=0x1000, seq=1,
                                               icv=b"\0" * 16) / Raw(syn(6, mss)[40:])),
        syn(4, mss)[:-3],  # truncated: options past the end of the packet
        raw(IP(src=V4_SRC, dst=V4_DST, proto=6) / Raw(b"\x00" * 10)),  # TCP header cut
    ]
    count, got = clamp(packets, 1300, 1300)
    assert count == 0
    assert got == packets


def test_clamp_skips_dropped_packets_and_uses_per_packet_limits() -> None:
    packets = [syn(4, [("MSS", 1460)]), syn(6, [("MSS", 1460)]), syn(4, [("MSS", 1460)]),
               syn(6, [("NOP", None), ("MSS", 1460)]), syn(4, [("MSS", 1460)])]
    v4 = np.array([1000, 0, 1400, 0, 1100], dtype=np.int64)
    v6 = np.array([0, 1200, 0, 1300, 0], dtype=np.uint32)
    verdicts = [Verdict.PASS, Verdict.PASS, Verdict.PASS, Verdict.PASS, Verdict.POLICY]
    count, got = clamp(packets, v4, v6, verdicts)
    assert count == 4
    for pkt, mss in zip(got[:4], [1000, 1200, 1400, 1300], strict=True):
        check_tcp(pkt, mss)
    assert got[4] == packets[4]


@pytest.mark.parametrize("after", [0, 43, 44, 51, 60])
def test_clamp_truncated_ipv6_headers(after: int) -> None:
    """IPv6 packets too short to hold a Next Header, whose next byte in the buffer reads as
    an extension header: left alone, and no IndexError out of the data plane."""
    packets = [b"\x60", b"\x60\x00\x00\x00\x00\x08", syn(6, [("MSS", 1460)])[:39]]
    batch = Batch.for_packets(packets)
    for i, pkt in enumerate(packets):
        batch.data[int(batch.meta["offset"][i]) + len(pkt):][:8] = after
    before = batch.data.copy()
    assert clamp_mss(batch, 1200, 1200) == 0
    assert np.array_equal(batch.data, before)


def test_clamp_packets_anywhere_in_their_slots() -> None:
    """Packets at other offsets, one ending at the very end of the buffer."""
    packets = [syn(4, [("MSS", 1460)]), syn(6, [("NOP", None), ("MSS", 1460)]), syn(4, [])]
    batch = Batch.for_packets(packets)
    for i, shift in enumerate([7, 301, batch.slot_size - batch.meta["offset"][2] % batch.slot_size
                               - len(packets[2])]):
        start = int(batch.meta["offset"][i]) + int(shift)
        batch.data[start : start + len(packets[i])] = np.frombuffer(packets[i], np.uint8)
        batch.meta["offset"][i] = start
    assert int(batch.meta["offset"][2]) + len(packets[2]) == batch.data.size
    assert clamp_mss(batch, 536, 536) == 2
    check_tcp(batch.packet(0), 536)
    check_tcp(batch.packet(1), 536)
    assert batch.packet(2) == packets[2]


OTHER_OPTIONS = st.sampled_from([("NOP", None), ("WScale", 7), ("SAckOK", b""),
                                 ("Timestamp", (0x01020304, 0x05060708)), ("EOL", None)])


@st.composite
def syn_cases(draw: st.DrawFn) -> tuple[bytes, bytes, int, int]:
    """(packet, expected packet after clamping, limit, 1 if clamped)."""
    version = draw(st.sampled_from([4, 6]))
    options = draw(st.lists(OTHER_OPTIONS, max_size=3))
    mss = draw(st.none() | st.integers(0, 0xFFFF))
    if mss is not None:
        options.insert(draw(st.integers(0, len(options))), ("MSS", mss))
    flags = draw(st.sampled_from(["S", "SA", "A", "SE"]))
    kw: dict[str, Any] = {}
    if draw(st.integers(0, 3)) == 0:
        if version == 4:
            kw["ip_options"] = [draw(st.sampled_from(
                [IPOption_Router_Alert(), IPOption_RR(), IPOption_Security()]))]
        else:
            kw["ext"] = draw(st.sampled_from([IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt()]))
    kw["data"] = draw(st.binary(max_size=20))
    limit = draw(st.integers(0, 0xFFFF))
    pkt = syn(version, options, flags=flags, **kw)
    kinds = [k for k, _ in options]
    found = "MSS" in kinds and "EOL" not in kinds[: kinds.index("MSS")]
    if found and "S" in flags and mss is not None and mss > limit:
        return pkt, syn(version, with_mss(options, limit), flags=flags, **kw), limit, 1
    return pkt, pkt, limit, 0


@FAST
@given(st.lists(syn_cases(), min_size=1, max_size=8))
def test_clamp_random_layouts(cases: list[tuple[bytes, bytes, int, int]]) -> None:
    packets = [c[0] for c in cases]
    limits = np.array([c[2] for c in cases], dtype=np.int64)
    count, got = clamp(packets, limits, limits)
    assert count == sum(c[3] for c in cases)
    assert got == [c[1] for c in cases]


def test_clamped_segment_fits_the_tunnel() -> None:
    """A full-sized segment at the clamped MSS encapsulates within the outer MTU."""
    t = parse_esp("aes128-sha256")
    limit = inner_mtu(1400, t, False, True, True)
    mss = mss_limit(limit, False)
    _, (got,) = clamp([syn(4, [("MSS", 1460)])], mss, mss)
    check_tcp(got, mss)
    segment = syn(4, [], flags="A", data=b"x" * mss)
    sas = SaTable()
    (enc,) = encap(sas, out_sa(sas, "aes128-sha256", Mode.TUNNEL, 4, True), [segment])
    assert len(segment) == limit and len(enc) <= 1400


# ============================================================================ too big / ICMP
MTU = 1400
BIG = 1500


def ping4(size: int, *, df: bool = True, src: str = V4_SRC, dst: str = V4_DST,
          frag: int = 0, icmp: Packet | None = None) -> bytes:
    ip = IP(src=src, dst=dst, id=0x55, ttl=60, flags="DF" if df else 0, frag=frag)
    pkt = ip / (icmp if icmp is not None else ICMP(type=8, id=1, seq=2))
    return raw(pkt / Raw(bytes(i & 0xFF for i in range(size - len(raw(pkt))))))


def ping6(size: int, *, src: str = V6_SRC, dst: str = V6_DST,
          upper: Packet | None = None) -> bytes:
    pkt = IPv6(src=src, dst=dst, hlim=60) / (upper if upper is not None
                                            else ICMPv6EchoRequest(id=1, seq=2))
    return raw(pkt / Raw(bytes(i & 0xFF for i in range(size - len(raw(pkt))))))


def run_too_big(packets: list[bytes], mtu: Any = MTU, limit: Any = MTU,
                **kw: Any) -> tuple[list[Verdict], list[bytes]]:
    batch = Batch.for_packets(packets)
    mask = too_big(batch, limit)
    errors = icmp_too_big(batch, mask, mtu, OUR4, OUR6, **kw)
    return [Verdict(v) for v, _ in batch], errors


def check_icmp4(err: bytes, orig: bytes, mtu: int) -> None:
    e = IP(err)
    assert e.version == 4 and e.ihl == 5 and e.len == len(err) <= 576
    assert e.ttl == 64 and e.proto == 1
    assert e.src == str(OUR4) and e.dst == IP(orig).src
    assert inet_sum(err[:20]) == 0xFFFF
    assert rebuilt_checksum(e, IP, "chksum") == e.chksum
    icmp = e[ICMP]
    assert (icmp.type, icmp.code, icmp.nexthopmtu) == (3, 4, mtu)
    assert inet_sum(err[20:]) == 0xFFFF
    assert rebuilt_checksum(e, ICMP, "chksum") == icmp.chksum
    assert err[28:] == orig[: 576 - 28]


def check_icmp6(err: bytes, orig: bytes, mtu: int) -> None:
    e = IPv6(err)
    assert e.nh == 58 and e.hlim == 64 and e.plen == len(err) - 40 and len(err) <= 1280
    assert e.src == str(OUR6) and e.dst == IPv6(orig).src
    ptb = e[ICMPv6PacketTooBig]
    assert (ptb.type, ptb.code, ptb.mtu) == (2, 0, mtu)
    assert rebuilt_checksum(e, ICMPv6PacketTooBig, "cksum") == ptb.cksum
    assert err[48:] == orig[: 1280 - 48]


def test_too_big_mask() -> None:
    batch = Batch.for_packets([ping4(MTU), ping4(MTU + 1), ping6(BIG), ping6(100)])
    batch.meta["verdict"][2] = Verdict.NO_SA
    assert too_big(batch, MTU).tolist() == [False, True, False, False]
    assert too_big(batch, np.array([10, 2000, 10, 99])).tolist() == [True, False, False, True]


def test_icmp_errors() -> None:
    cases = [
        # (packet, verdict, answered)
        (ping4(BIG), Verdict.TOO_BIG, True),
        (ping4(BIG, df=False), Verdict.PASS, False),  # fragmented outside instead
        (ping4(MTU), Verdict.PASS, False),
        (ping4(BIG, icmp=ICMP(type=3, code=1)), Verdict.TOO_BIG, False),  # an ICMP error
        (ping4(BIG, icmp=ICMP(type=11)), Verdict.TOO_BIG, False),
        (ping4(BIG, icmp=ICMP(type=42)), Verdict.TOO_BIG, False),  # unknown: maybe an error
        (ping4(BIG, frag=185), Verdict.TOO_BIG, False),  # a non-first fragment
        (ping4(BIG, src="0.0.0.0"), Verdict.TOO_BIG, False),
        (ping4(BIG, src="127.0.0.1"), Verdict.TOO_BIG, False),
        (ping4(BIG, src="224.0.0.9"), Verdict.TOO_BIG, False),
        (ping4(BIG, dst="239.1.2.3"), Verdict.TOO_BIG, False),
        (ping4(BIG, dst="255.255.255.255"), Verdict.TOO_BIG, False),
        (raw(IP(src=V4_SRC, dst=V4_DST, flags="DF") / TCP() / Raw(b"t" * 1600)),
         Verdict.TOO_BIG, True),
        (ping6(BIG), Verdict.TOO_BIG, True),
        (ping6(MTU), Verdict.PASS, False),
        (ping6(BIG, upper=ICMPv6DestUnreach()), Verdict.TOO_BIG, False),
        (ping6(BIG, upper=IPv6ExtHdrHopByHop() / ICMPv6DestUnreach()), Verdict.TOO_BIG, False),
        (ping6(BIG, upper=IPv6ExtHdrDestOpt() / ICMPv6EchoRequest()), Verdict.TOO_BIG, True),
        (ping6(BIG, upper=IPv6ExtHdrFragment(offset=4, nh=58)), Verdict.TOO_BIG, False),
        (ping6(BIG, upper=ICMPv6ND_Redirect()), Verdict.TOO_BIG, False),  # RFC 4443 (e.2)
        (ping6(BIG, src="::"), Verdict.TOO_BIG, False),
        (ping6(BIG, src="ff02::1"), Verdict.TOO_BIG, False),
        (ping6(BIG, dst="ff02::1"), Verdict.TOO_BIG, True),  # RFC 4443 §2.4(e.3) exception
        (ping6(1800, upper=UDP() / Raw(b"u")), Verdict.TOO_BIG, True),
    ]
    packets = [c[0] for c in cases]
    verdicts, errors = run_too_big(packets)
    assert verdicts == [c[1] for c in cases]
    answered = [c[0] for c in cases if c[2]]
    assert len(errors) == len(answered)
    for err, orig in zip(errors, answered, strict=True):
        if orig[0] >> 4 == 4:
            check_icmp4(err, orig, MTU)
        else:
            check_icmp6(err, orig, MTU)


def test_icmp_small_packets_quoted_whole_and_per_packet_mtus() -> None:
    packets = [ping4(300), ping6(300), ping4(300), ping6(1300)]
    # Link-layer padding past the IP length is not quoted.
    packets[2] = packets[2] + b"\xee" * 6
    verdicts, errors = run_too_big(packets, mtu=np.array([296, 280, 290, 1000]), limit=200)
    assert verdicts == [Verdict.TOO_BIG, Verdict.PASS, Verdict.TOO_BIG, Verdict.TOO_BIG]
    check_icmp4(errors[0], packets[0], 296)
    assert len(errors[0]) == 28 + 300
    check_icmp4(errors[1], packets[2][:-6], 290)
    assert len(errors[1]) == 28 + 300
    # Below 1280, IPv6 is not refused: a PTB says 1280 at least (RFC 8200 §5).
    check_icmp6(errors[2], packets[3], 1280)


def test_icmp_budget_and_missing_source() -> None:
    packets = [ping4(BIG), ping6(BIG), ping4(BIG), ping6(BIG)]
    verdicts, errors = run_too_big(packets, max_errors=3)
    assert verdicts == [Verdict.TOO_BIG] * 4 and len(errors) == 3
    batch = Batch.for_packets(packets)
    errors = icmp_too_big(batch, too_big(batch, MTU), MTU, None, OUR6)
    assert [Verdict(v) for v, _ in batch] == [Verdict.TOO_BIG] * 4
    assert [e[0] >> 4 for e in errors] == [6, 6]


@FAST
@given(version=st.sampled_from([4, 6]), size=st.integers(48, 3000),
       mtu=st.integers(576, 2000))
def test_icmp_random_sizes(version: int, size: int, mtu: int) -> None:
    orig = ping4(size) if version == 4 else ping6(size)
    verdicts, errors = run_too_big([orig], mtu=mtu, limit=mtu)
    refused = size > mtu if version == 4 else size > max(mtu, 1280)
    assert verdicts == [Verdict.TOO_BIG if refused else Verdict.PASS]
    assert len(errors) == refused
    if refused and version == 4:
        check_icmp4(errors[0], orig, mtu)
    elif refused:
        check_icmp6(errors[0], orig, max(mtu, 1280))


# ============================================================================ fragmentation
IP_OPTIONS = [
    [],
    [IPOption_Router_Alert()],  # copied
    [IPOption_RR(length=11, routers=["1.2.3.4", "5.6.7.8"])],  # not copied
    [IPOption_Security(), IPOption_RR(length=7, routers=["1.1.1.1"])],  # one of each
    [IPOption_LSRR(routers=["192.0.2.9"]), IPOption_RR(length=7, routers=["1.1.1.1"]),
     IPOption_Router_Alert()],
]


def check_fragments(orig: bytes, frags: list[bytes], mtu: int) -> None:
    first = IP(orig)
    offset = first.frag * 8
    for i, f in enumerate(frags):
        p = IP(f)
        last = i == len(frags) - 1
        assert len(f) <= mtu and p.len == len(f)
        assert inet_sum(f[: p.ihl * 4]) == 0xFFFF
        assert p.id == first.id and p.src == first.src and p.dst == first.dst
        assert p.frag * 8 == offset
        assert bool(p.flags.MF) == (bool(first.flags.MF) if last else True)
        data = len(f) - p.ihl * 4
        assert last or data % 8 == 0
        if i:  # later fragments carry only the options with the copy flag (RFC 791 §3.1)
            assert all(o.copy_flag or o.option == 0 for o in p.options)
        offset += data
    assert offset == first.frag * 8 + len(orig) - first.ihl * 4


@FAST
@given(size=st.integers(0, 5000), mtu=st.integers(68, 1500),
       options=st.sampled_from(range(len(IP_OPTIONS))), ident=st.integers(0, 0xFFFF),
       trailer=st.binary(max_size=4))
def test_fragment_reassembles(size: int, mtu: int, options: int, ident: int,
                              trailer: bytes) -> None:
    orig = raw(IP(src="192.0.2.1", dst="198.51.100.2", id=ident, proto=50, ttl=64,
                  options=IP_OPTIONS[options]) / Raw(bytes(i % 251 for i in range(size))))
    frags = fragment_ipv4(orig + trailer, mtu)  # trailing link padding is dropped
    if len(orig) <= mtu:
        assert frags == [orig]
        return
    check_fragments(orig, frags, mtu)
    (whole,) = defragment([IP(f) for f in frags])
    assert raw(whole) == orig


def test_fragment_a_fragment_and_refusals() -> None:
    orig = raw(IP(src="192.0.2.1", dst="198.51.100.2", id=3, flags="MF", frag=100)
               / Raw(b"z" * 1000))
    frags = fragment_ipv4(orig, 300)
    check_fragments(orig, frags, 300)
    assert IP(frags[-1]).flags.MF
    with pytest.raises(ValueError, match="DF"):
        fragment_ipv4(ping4(1500), 1400)
    with pytest.raises(ValueError):
        fragment_ipv4(ping4(1500, df=False), 60)
    with pytest.raises(ValueError):
        fragment_ipv4(b"\x60" + bytes(39), 1280)


def test_encapsulated_then_fragmented() -> None:
    """A packet without DF over the inner MTU passes, and its outer packet is fragmented
    to the path MTU and reassembles to exactly what the codec produced."""
    t = parse_esp("aes128gcm16")
    limit = inner_mtu(1400, t, False, True, True)
    inner = packet(Mode.TUNNEL, 4, limit + 200, df=False)
    batch = Batch.for_packets([inner])
    assert icmp_too_big(batch, too_big(batch, limit), limit, OUR4, OUR6) == []
    assert batch.meta["verdict"][0] == Verdict.PASS
    sas = SaTable()
    (outer,) = encap(sas, out_sa(sas, "aes128gcm16", Mode.TUNNEL, 4, True), [inner])
    assert not IP(outer).flags.DF and len(outer) > 1400
    frags = fragment_ipv4(outer, 1400)
    check_fragments(outer, frags, 1400)
    (whole,) = defragment([IP(f) for f in frags])
    assert raw(whole) == outer
