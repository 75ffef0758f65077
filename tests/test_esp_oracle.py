"""ESP codec (workers/esp.py) against scapy's SecurityAssociation as an independent oracle.

Both directions, for every algorithm espline and scapy share, tunnel (4in4, 6in6, 4in6, 6in4)
and transport (IPv4, IPv6), with and without RFC 3948 UDP encapsulation and with and without
ESN (RFC 4303 §2.2.1; the ESN cases straddle a 2^32 boundary of the sequence number):

- scapy decrypts what ``EspCodec.encap`` produces and gets the original packet byte for byte;
  the plaintext is also opened with plain ``cryptography``/``hmac`` (tests/esp_support.py) to
  check the trailer: default padding 1, 2, 3, ... to the block, Pad Length, Next Header;
- ``EspCodec.decap`` restores what scapy produces byte for byte;
- with the same IV (the sequence number for the AEADs, the IV espline drew for CBC) and the same
  sequence number, espline's ESP bytes (SPI onward) equal scapy's.

The outer header fields espline chooses are checked against the RFCs, not against scapy:
TTL/Hop Limit 64, protocol, lengths, an independently computed IPv4 checksum, DSCP/ECN and DF
copied from the inner header, UDP ports and checksums.
"""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import IP, UDP, IPOption_Router_Alert, IPOption_RR
from scapy.layers.ipsec import ESP
from scapy.packet import Raw, raw

from pipeline.batch import Verdict
from pipeline.satable import Direction, Mode
from tests.esp_support import (
    ADDR,
    ALG,
    ALGS,
    LAYOUTS,
    SPI_IN,
    SPI_OUT,
    U32,
    Layout,
    decap,
    encap,
    inner_packet,
    install,
    ipv4_checksum_ok,
    open_esp,
    packet_for,
    parse,
    scapy_encrypt,
    scapy_sa,
    trailer,
    udp_checksum_ok,
    verdicts,
)
from workers.algorithms import CipherKind
from workers.sa import SaTable

SIZES = (0, 1, 7, 64, 1300)


def _first_seq(esn: bool) -> int:
    """Sequence numbers 4:fffffffe, 4:ffffffff, 5:0, 5:1, 5:2 with ESN: the high half changes
    inside the batch and one packet carries 0 as its low half."""
    return (4 << 32) + U32 - 2 if esn else 1


CASES = [
    pytest.param(a.keyword, lay, udp, esn,
                 id=f"{a.keyword}-{lay.id}-{'udp' if udp else 'esp'}-{'esn' if esn else '32'}")
    for a in ALGS for lay in LAYOUTS for udp in (False, True) for esn in (False, True)
]


def _header_len(layout: Layout, wire: bytes) -> int:
    """Length of the IP header in front of ESP (or of its UDP header)."""
    if layout.outer == 6:
        return 40
    return (wire[0] & 0xF) * 4


def _inner_tos(pkt: bytes) -> int:
    if pkt[0] >> 4 == 4:
        return pkt[1]
    return ((pkt[0] & 0x0F) << 4) | (pkt[1] >> 4)


def _next_header(layout: Layout, orig: bytes) -> int:
    if layout.mode is Mode.TUNNEL:
        return 4 if layout.inner == 4 else 41  # IANA: IPv4 / IPv6 encapsulation
    return orig[9] if layout.outer == 4 else orig[6]


def _check_esp(alg: str, layout: Layout, udp: bool, esn: bool, orig: bytes, wire: bytes,
               seq: int) -> None:
    """SPI, sequence number, IV and the whole plaintext, opened without scapy or espline."""
    at = _header_len(layout, wire) + (8 if udp else 0)
    esp = wire[at:]
    assert struct.unpack("!II", esp[:8]) == (SPI_OUT, seq % U32)  # RFC 4303 §2.2: low half
    t = ALG[alg].t
    if t.is_aead:
        assert esp[8:16] == seq.to_bytes(8, "big")  # RFC 4106 §3.1: a counter IV
    plain = open_esp(alg, esp, seq, esn=esn)
    body = orig if layout.mode is Mode.TUNNEL else orig[_header_len(layout, orig) :]
    block = 16 if t.kind is CipherKind.AES_CBC else 4  # RFC 3602 §3; RFC 4303 §2.4
    assert plain == body + trailer(len(body), _next_header(layout, orig), block)


def _check_outer(layout: Layout, udp: bool, orig: bytes, wire: bytes, *,
                 checksum: bool = True) -> None:
    local, remote = ADDR[layout.outer]
    proto = 17 if udp else 50
    if layout.mode is Mode.TRANSPORT:
        # RFC 4303 §3.1.1: the original header stays; only length, protocol, checksum change.
        if layout.outer == 4:
            assert wire[9] == proto
            assert struct.unpack("!H", wire[2:4])[0] == len(wire)
            assert ipv4_checksum_ok(wire[:20])
            assert wire[:2] + wire[4:9] + wire[12:20] == orig[:2] + orig[4:9] + orig[12:20]
        else:
            assert wire[6] == proto
            assert struct.unpack("!H", wire[4:6])[0] == len(wire) - 40
            assert wire[:4] + wire[7:40] == orig[:4] + orig[7:40]
        return
    tos = _inner_tos(orig)
    if layout.outer == 4:
        ver_ihl, got_tos, total, _ident, frag, ttl, got_proto, _ck, src, dst = struct.unpack(
            "!BBHHHBBH4s4s", wire[:20])
        assert ver_ihl == 0x45
        # RFC 4301 §5.1.2.1: DSCP copied; ECN copied too (RFC 6040 §4.1, normal mode).
        assert got_tos == tos
        assert total == len(wire)
        # RFC 4301 §8.1: DF copied from an inner IPv4 header; never MF or an offset.
        inner_df = orig[6] & 0x40 if orig[0] >> 4 == 4 else 0
        assert frag == inner_df << 8
        assert (ttl, got_proto) == (64, proto)
        if checksum:
            assert ipv4_checksum_ok(wire[:20])
        assert (src, dst) == (local.packed, remote.packed)
    else:
        vtf, plen, nh, hlim = struct.unpack("!IHBB", wire[:8])
        assert vtf >> 28 == 6
        assert (vtf >> 20) & 0xFF == tos
        assert plen == len(wire) - 40
        assert (nh, hlim) == (proto, 64)
        assert (wire[8:24], wire[24:40]) == (local.packed, remote.packed)


# --------------------------------------------------------------------------- espline -> scapy
@pytest.mark.parametrize(("alg", "layout", "udp", "esn"), CASES)
def test_encap_decrypted_by_scapy(alg: str, layout: Layout, udp: bool, esn: bool) -> None:
    sas = SaTable()
    out = install(sas, alg, layout.mode, layout.outer, Direction.OUT, spi=SPI_OUT, esn=esn,
                  udp=udp)
    first = _first_seq(esn)
    out.seq_out = first - 1
    originals = [packet_for(layout, size, salt=k) for k, size in enumerate(SIZES)]
    batch = encap(sas, out, originals)
    assert verdicts(batch) == [Verdict.PASS] * len(originals)
    wires = batch.packets()
    for k, (orig, wire) in enumerate(zip(originals, wires, strict=True)):
        seq = first + k
        assert int(batch.meta["seq"][k]) == seq
        sa = scapy_sa(alg, layout, spi=SPI_OUT, udp=udp, esn_hi=seq >> 32 if esn else None)
        pkt = parse(wire)
        assert pkt.version == layout.outer
        if udp:
            assert (pkt[UDP].sport, pkt[UDP].dport) == (4500, 4500)
        assert pkt[ESP].spi == SPI_OUT
        assert raw(sa.decrypt(pkt)) == orig
        _check_esp(alg, layout, udp, esn, orig, wire, seq)
        _check_outer(layout, udp, orig, wire)
    assert out.packets == len(originals)
    assert out.bytes == sum(map(len, originals))
    assert out.seq_out == first + len(originals) - 1


# --------------------------------------------------------------------------- scapy -> espline
@pytest.mark.parametrize(("alg", "layout", "udp", "esn"), CASES)
def test_decap_of_scapy_packets(alg: str, layout: Layout, udp: bool, esn: bool) -> None:
    sas = SaTable()
    inb = install(sas, alg, layout.mode, layout.outer, Direction.IN, spi=SPI_IN, esn=esn,
                  udp=udp)
    first = _first_seq(esn)
    if esn:
        inb.replay.top = first - 1  # the receiver has seen everything before
    sa = scapy_sa(alg, layout, spi=SPI_IN, udp=udp, esn_hi=0 if esn else None)
    originals = [packet_for(layout, size, salt=k) for k, size in enumerate(SIZES)]
    aead = ALG[alg].t.is_aead
    wires = [scapy_encrypt(sa, p, first + k, aead=aead) for k, p in enumerate(originals)]
    batch = decap(sas, wires)
    assert verdicts(batch) == [Verdict.PASS] * len(originals)
    assert batch.packets() == originals
    assert batch.meta["seq"][: batch.count].tolist() == [first + k for k in range(len(wires))]
    assert set(batch.meta["sa"][: batch.count].tolist()) == {inb.index}
    assert inb.packets == len(originals)
    assert inb.bytes == sum(map(len, originals))
    assert inb.replay.top == first + len(originals) - 1
    # The same packets again are replays (RFC 4303 §3.4.3), and nothing else changes.
    again = decap(sas, wires)
    assert verdicts(again) == [Verdict.REPLAY] * len(originals)
    assert inb.packets == len(originals)


# --------------------------------------------------------------------------- byte-exact
@pytest.mark.parametrize(("alg", "layout", "udp", "esn"), CASES)
def test_encap_bytes_equal_scapy(alg: str, layout: Layout, udp: bool, esn: bool) -> None:
    """With the same sequence number and IV, espline and scapy send the same ESP bytes.

    scapy pads with 1, 2, 3, ... to lcm(block, 4) (RFC 4303 §2.4 default), as espline does,
    so this also pins espline's padding. CBC IVs are random: scapy is given the IV espline
    drew (from the injected ``random``), and the draws are checked to be fresh.
    """
    drawn = bytearray()

    def rng(n: int) -> bytes:
        chunk = bytes((len(drawn) + i) * 37 % 251 for i in range(n))
        drawn.extend(chunk)
        return chunk

    sas = SaTable()
    out = install(sas, alg, layout.mode, layout.outer, Direction.OUT, spi=SPI_OUT, esn=esn,
                  udp=udp)
    first = _first_seq(esn)
    out.seq_out = first - 1
    originals = [packet_for(layout, size, salt=k) for k, size in enumerate(SIZES)]
    wires = encap(sas, out, originals, random=rng).packets()
    sa = scapy_sa(alg, layout, spi=SPI_OUT, udp=udp, esn_hi=0 if esn else None)
    t = ALG[alg].t
    ivs = []
    for k, (orig, wire) in enumerate(zip(originals, wires, strict=True)):
        seq = first + k
        at = _header_len(layout, wire) + (8 if udp else 0)
        mine = wire[at:]
        iv = mine[8 : 8 + t.iv_len]
        sa.seq_num, sa.esn = seq % U32, seq >> 32
        theirs_pkt = sa.encrypt(parse(orig), iv=iv)
        theirs = raw(theirs_pkt[ESP])
        assert mine == theirs
        if layout.mode is Mode.TRANSPORT and not udp:
            assert wire == raw(theirs_pkt)  # transport: the whole packet is determined
        ivs.append(iv)
    if t.kind is CipherKind.AES_CBC:
        assert len(set(ivs)) == len(ivs)
        positions = [bytes(drawn).find(iv) for iv in ivs]
        assert all(pos >= 0 and pos % 16 == 0 for pos in positions)  # whole draws


# --------------------------------------------------------------------------- outer header
@pytest.mark.parametrize("outer", [4, 6])
def test_outer_header_copies_tos_and_df_per_packet(outer: int) -> None:
    """DSCP/ECN and DF come from each packet's own inner header, not from the first one.
    (The IPv4 header checksum is left to test_tunnel_outer_header.)"""
    sas = SaTable()
    out = install(sas, "aes128gcm16", Mode.TUNNEL, outer, Direction.OUT, spi=SPI_OUT)
    inners = [
        inner_packet(4, 10, tos=0x00, df=True),
        inner_packet(4, 11, tos=0xB8, df=False),  # EF
        inner_packet(6, 12, tos=0x2B),
        inner_packet(4, 13, tos=0x03, df=True),  # ECN CE only
        inner_packet(6, 14, tos=0xFC),
        inner_packet(4, 15, tos=0x48, df=False),  # AF21
    ]
    batch = encap(sas, out, inners)
    assert verdicts(batch) == [Verdict.PASS] * len(inners)
    for orig, wire in zip(inners, batch.packets(), strict=True):
        layout = Layout(Mode.TUNNEL, outer, orig[0] >> 4)
        _check_outer(layout, False, orig, wire, checksum=False)
    if outer == 4:
        idents = [struct.unpack("!H", w[4:6])[0] for w in batch.packets()]
        assert len(set(idents)) == len(idents)  # RFC 6864 §4.1 for the non-DF ones


@pytest.mark.parametrize(("outer", "tos"), [
    pytest.param(outer, tos, id=f"v{outer}-tos{tos:#04x}",
                 )
    for outer in (4, 6) for tos in (0x00, 0x2A, 0xB8, 0x03)])
@pytest.mark.parametrize("udp", [False, True], ids=["esp", "udp"])
def test_tunnel_outer_header(outer: int, tos: int, udp: bool) -> None:
    """Every field espline sets in a tunnel-mode outer header, the checksum recomputed
    independently (RFC 791 §3.1, RFC 1071)."""
    sas = SaTable()
    out = install(sas, "aes256gcm16", Mode.TUNNEL, outer, Direction.OUT, spi=SPI_OUT, udp=udp)
    inners = [inner_packet(4, 20, tos=tos, df=True), inner_packet(4, 21, tos=tos, df=False),
              inner_packet(6, 22, tos=tos)]
    batch = encap(sas, out, inners)
    assert verdicts(batch) == [Verdict.PASS] * len(inners)
    for orig, wire in zip(inners, batch.packets(), strict=True):
        _check_outer(Layout(Mode.TUNNEL, outer, orig[0] >> 4), udp, orig, wire)


@pytest.mark.parametrize(("alg", "layout"), [
    pytest.param(a.keyword, lay, id=f"{a.keyword}-{lay.id}",
                 )
    for a in ALGS for lay in LAYOUTS])
def test_udp_encapsulation_header(alg: str, layout: Layout) -> None:
    """RFC 3948 §2.1: ports 4500, length; the checksum is zero over IPv4 (or else valid, as a
    receiver verifies a non-zero one, RFC 768) and valid over IPv6 (RFC 8200 §8.1). The batch
    buffer is reused (not zero) around the packets, as it is in the data plane."""
    sas = SaTable()
    out = install(sas, alg, layout.mode, layout.outer, Direction.OUT, spi=SPI_OUT, udp=True)
    originals = [packet_for(layout, size, salt=k) for k, size in enumerate(SIZES)]
    batch = encap(sas, out, originals, poison=True)
    assert verdicts(batch) == [Verdict.PASS] * len(originals)
    sa = scapy_sa(alg, layout, spi=SPI_OUT, udp=True)
    for orig, wire in zip(originals, batch.packets(), strict=True):
        assert raw(sa.decrypt(parse(wire))) == orig
        at = _header_len(layout, wire)
        sport, dport, length, checksum = struct.unpack("!HHHH", wire[at : at + 8])
        assert (sport, dport, length) == (4500, 4500, len(wire) - at)
        if layout.outer == 4:
            assert checksum == 0 or udp_checksum_ok(wire)
            assert ipv4_checksum_ok(wire[:at])
        else:
            assert udp_checksum_ok(wire)


# --------------------------------------------------------------------------- IPv4 options, TFC
@pytest.mark.parametrize("alg", ["aes256gcm16", "aes128-sha256", "null-sha384"])
def test_transport_ipv4_options_both_ways(alg: str) -> None:
    """The options travel in front of ESP untouched (RFC 4303 §3.1.1) both ways."""
    local, remote = ADDR[4]
    orig = raw(IP(src=str(local), dst=str(remote), ttl=9,
                  options=[IPOption_RR(routers=["1.1.1.1", "0.0.0.0"]),
                           IPOption_Router_Alert()]) / UDP(sport=5, dport=6) / Raw(b"opts"))
    ihl = (orig[0] & 0xF) * 4
    assert ihl > 20
    layout = Layout(Mode.TRANSPORT, 4, 4)
    sas = SaTable()
    out = install(sas, alg, Mode.TRANSPORT, 4, Direction.OUT, spi=SPI_OUT)
    wire = encap(sas, out, [orig]).packet(0)
    assert wire[20:ihl] == orig[20:ihl] and wire[9] == 50 and ipv4_checksum_ok(wire[:ihl])
    sa = scapy_sa(alg, layout, spi=SPI_OUT, udp=False)
    assert raw(sa.decrypt(IP(wire))) == orig

    peer = SaTable()
    install(peer, alg, Mode.TRANSPORT, 4, Direction.IN, spi=SPI_IN)
    theirs = scapy_encrypt(scapy_sa(alg, layout, spi=SPI_IN, udp=False), orig, 1,
                           aead=ALG[alg].t.is_aead)
    batch = decap(peer, [theirs])
    assert verdicts(batch) == [Verdict.PASS]
    assert batch.packet(0) == orig


@pytest.mark.parametrize("alg", ["chacha20poly1305", "aes128-sha256"])
def test_tfc_padding(alg: str) -> None:
    """RFC 4303 §2.7: short inner packets are padded with zeros to ``tfc_pad`` inside the
    encryption; the receiver drops the padding by the inner header's length."""
    sas, peer = SaTable(), SaTable()
    out = install(sas, alg, Mode.TUNNEL, 4, Direction.OUT, spi=SPI_OUT, tfc_pad=300)
    install(peer, alg, Mode.TUNNEL, 4, Direction.IN, spi=SPI_OUT)
    inners = [inner_packet(4, 3), inner_packet(6, 200), inner_packet(4, 400)]
    batch = encap(sas, out, inners)
    assert verdicts(batch) == [Verdict.PASS] * 3
    wires = batch.packets()
    for k, (orig, wire) in enumerate(zip(inners, wires, strict=True)):
        plain = open_esp(alg, wire[20:], k + 1, esn=False)
        padded = max(len(orig), 300)
        assert plain[:padded] == orig + bytes(padded - len(orig))
        assert plain[padded:] == trailer(padded, 4 if orig[0] >> 4 == 4 else 41,
                                         16 if "sha" in alg else 4)
    back = decap(peer, wires)
    assert verdicts(back) == [Verdict.PASS] * 3
    assert back.packets() == inners

