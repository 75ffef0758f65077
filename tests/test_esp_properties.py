"""Properties of the ESP codec (workers/esp.py): round trips, tampering, garbage, mixed batches.

Invariants, each with the reason a break would show:
- round trip: ``decap(encap(p)) == p`` byte for byte, for any inner length 0..9000;
- integrity: a single flipped bit anywhere from the SPI onward is dropped; the verdict is
  exactly NO_SA (SPI), REPLAY or INTEGRITY (sequence number, as the window dictates) or
  INTEGRITY (IV, ciphertext, ICV); over the whole packet, no flip ever yields a different
  inner packet (the outer header is not authenticated in ESP, RFC 4303 §3.1.2, so a flip
  there may be dropped or pass, but never changes what is delivered);
- garbage: arbitrary or malformed input never raises, every packet gets a verdict, and the
  counters add up to the drops;
- batches mixing SAs, in-slot offsets and already-dropped packets give each packet the result
  it would have alone (the codec's grouped, non-dense paths).
"""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.packet import Raw, raw

from pipeline.batch import HEADROOM, Batch, Verdict
from pipeline.satable import Direction, Mode
from tests.esp_support import (
    ADDR,
    SPI_OUT,
    U32,
    counts_add_up,
    decap,
    encap,
    inner_packet,
    install,
    ipv4_checksum_ok,
    move_packet,
    outer_ip,
    pair,
    seal_esp,
    trailer,
    transport_packet,
    udp_header,
    verdicts,
)
from workers.esp import EspCodec
from workers.sa import SaTable

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- round trip
ROUND_TRIPS = [
    # (algorithm, mode, family, UDP, ESN)
    ("aes128gcm16", Mode.TUNNEL, 4, False, False),
    ("aes256gcm16", Mode.TUNNEL, 6, True, True),
    ("chacha20poly1305", Mode.TRANSPORT, 4, False, True),
    ("aes128-sha256", Mode.TUNNEL, 6, False, False),
    ("aes256-sha512", Mode.TRANSPORT, 6, True, True),
    ("null-sha384", Mode.TRANSPORT, 4, True, False),
]


@pytest.mark.parametrize(("alg", "mode", "family", "udp", "esn"), ROUND_TRIPS,
                         ids=["-".join(map(str, c[:1] + (c[1].name, c[2], c[3], c[4])))
                              for c in ROUND_TRIPS])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 9000) | st.integers(0, 40), min_size=1, max_size=4),
       seed=st.integers(0, 2**32 - 1), inner_v6=st.booleans())
def test_round_trip(alg: str, mode: Mode, family: int, udp: bool, esn: bool,
                    sizes: list[int], seed: int, inner_v6: bool) -> None:
    rnd = random.Random(seed)
    ours, out, peer, inb = pair(alg, mode, family, esn=esn, udp=udp)
    if esn:
        out.seq_out = inb.replay.top = (3 << 32) - 2  # the batch crosses into high half 3
    packets = []
    for size in sizes:
        data = Raw(rnd.randbytes(size))
        if mode is Mode.TRANSPORT:
            local, remote = ADDR[family]
            ip = IP if family == 4 else IPv6
            packets.append(raw(ip(src=str(local), dst=str(remote)) / UDP() / data))
        elif inner_v6:
            packets.append(raw(IPv6(src="fd00::1", dst="fd00::2") / UDP() / data))
        else:
            packets.append(raw(IP(src="10.0.0.1", dst="10.0.0.2") / UDP() / data))
    wires = encap(ours, out, packets)
    assert verdicts(wires) == [Verdict.PASS] * len(packets)
    batch = decap(peer, wires.packets())
    assert verdicts(batch) == [Verdict.PASS] * len(packets)
    assert batch.packets() == packets
    assert inb.bytes == sum(map(len, packets))


def test_too_big() -> None:
    """A packet as large as its slot's payload area still fits with ESP's overhead (the
    headroom and tailroom are sized for it); one without headroom, or one TFC padding would
    grow past its slot, is dropped as TOO_BIG."""
    sas = SaTable()
    out = install(sas, "aes128-sha512", Mode.TUNNEL, 6, Direction.OUT, spi=SPI_OUT, udp=True)
    tfc = install(sas, "aes128gcm16", Mode.TUNNEL, 4, Direction.OUT, spi=SPI_OUT + 1,
                  tfc_pad=3000)
    batch = Batch(4, 2048)
    largest = inner_packet(4, batch.max_packet - 28)
    assert len(largest) == batch.max_packet
    batch.load([largest, inner_packet(4, 10), inner_packet(4, 10), inner_packet(4, 10)])
    batch.meta["sa"][:4] = [out.index, out.index, out.index, tfc.index]
    sas.assign_sequence(batch)
    move_packet(batch, 2, 0)  # no headroom at all
    EspCodec(sas).encap(batch)
    assert verdicts(batch) == [Verdict.PASS, Verdict.PASS, Verdict.TOO_BIG, Verdict.TOO_BIG]
    assert batch.packet(2) == inner_packet(4, 10)
    assert counts_add_up(batch)


# --------------------------------------------------------------------------- bit flips
def _flips(pkt: bytes, start: int = 0) -> list[bytes]:
    out = []
    for i in range(start, len(pkt)):
        for bit in range(8):
            b = bytearray(pkt)
            b[i] ^= 1 << bit
            out.append(bytes(b))
    return out


FLIP_CASES = [
    # (algorithm, mode, family, UDP)
    ("aes128gcm16", Mode.TUNNEL, 4, False),
    ("chacha20poly1305", Mode.TRANSPORT, 6, True),
    ("aes192-sha384", Mode.TUNNEL, 6, True),
    ("null-sha256", Mode.TRANSPORT, 4, False),
]


@pytest.mark.parametrize(("alg", "mode", "family", "udp"), FLIP_CASES,
                         ids=[f"{c[0]}-{c[1].name}-{c[2]}-{c[3]}" for c in FLIP_CASES])
def test_every_bit_flip_from_spi_on(alg: str, mode: Mode, family: int, udp: bool) -> None:
    """SPI flips: NO_SA (no other SA). Sequence-number flips: the receiver has taken 1..1000
    with a 64 window, so a flipped number that is 0, left of the window (s + 64 <= 1000) or
    already received (937..1000) is REPLAY before any ICV is computed (RFC 4303 §3.4.3), any
    other INTEGRITY. IV, ciphertext, ICV flips: INTEGRITY. The genuine packet, last in the
    same batch, still passes: no failed packet moved the window."""
    ours, out, peer, inb = pair(alg, mode, family, udp=udp)
    out.seq_out = 1000
    inb.replay.top = 1000  # 1..1000 taken: the window's bits are all set below
    inb.replay.commit(np.arange(937, 1001, dtype=np.uint64), np.ones(64, dtype=np.bool_))
    make = inner_packet if mode is Mode.TUNNEL else transport_packet
    orig = make(family, 13)
    wire, = encap(ours, out, [orig]).packets()
    seq = 1001
    esp_at = (20 if family == 4 else 40) + (8 if udp else 0)
    assert struct.unpack("!II", wire[esp_at : esp_at + 8]) == (SPI_OUT, seq)
    flipped = _flips(wire, esp_at)
    batch = decap(peer, [*flipped, wire])
    got = verdicts(batch)
    assert got[-1] is Verdict.PASS and batch.packet(len(flipped)) == orig
    for k, verdict in enumerate(got[:-1]):
        byte, bit = divmod(k, 8)
        if byte < 4:
            assert verdict is Verdict.NO_SA, (byte, bit)
        elif byte < 8:
            s = seq ^ (1 << (8 * (7 - byte) + bit))
            replay = s <= 1000  # 0, left of the window, or received; never above top
            assert verdict is (Verdict.REPLAY if replay else Verdict.INTEGRITY), (byte, bit, s)
        else:
            assert verdict is Verdict.INTEGRITY, (byte, bit)
    assert inb.replay.top == seq
    assert counts_add_up(batch)


@pytest.mark.parametrize(("alg", "mode", "family", "udp"), FLIP_CASES,
                         ids=[f"{c[0]}-{c[1].name}-{c[2]}-{c[3]}" for c in FLIP_CASES])
def test_every_bit_flip_in_outer_headers(alg: str, mode: Mode, family: int, udp: bool) -> None:
    """Outer IP and UDP headers are not covered by ESP's ICV (RFC 4303 §3.1.2): a flip there
    may be dropped or pass, but what passes is exactly the original inner packet (tunnel) or
    the original packet with that same header bit flipped (transport, bits other than the
    ones decap rewrites: length, protocol, checksum)."""
    ours, out, peer, _ = pair(alg, mode, family, udp=udp, replay_window=0)
    make = inner_packet if mode is Mode.TUNNEL else transport_packet
    orig = make(family, 21)
    wire, = encap(ours, out, [orig]).packets()
    esp_at = (20 if family == 4 else 40) + (8 if udp else 0)
    flipped = [f + wire[esp_at:] for f in _flips(wire[:esp_at])]
    batch = decap(peer, flipped)
    assert counts_add_up(batch)
    rewritten = {2, 3, 9, 10, 11} if family == 4 else {4, 5, 6}
    for k, (verdict, got) in enumerate(batch):
        if verdict != Verdict.PASS:
            continue
        byte, bit = divmod(k, 8)
        if mode is Mode.TUNNEL:
            assert got == orig, (byte, bit)
        elif byte >= (20 if family == 4 else 40):
            assert got == orig, (byte, bit)  # a UDP header bit: not in the output
        elif byte not in rewritten:
            want = bytearray(orig)
            want[byte] ^= 1 << bit
            if family == 4:  # the checksum is recomputed over the flipped header
                assert ipv4_checksum_ok(got[:20]), (byte, bit)
                want[10:12] = got[10:12]
            assert got == bytes(want), (byte, bit)
    # The fields decap depends on: a flip there never passes. (IPv4's DF and reserved flags
    # and IPv6's traffic class bits in byte 0 are not among them.)
    for k, verdict in enumerate(verdicts(batch)):
        byte, bit = divmod(k, 8)
        if family == 4:  # version/IHL, total length, MF/offset, protocol
            checked = byte in (0, 2, 3, 7, 9) or (byte == 6 and bit < 6)
        else:  # version, payload length, next header
            checked = byte in (4, 5, 6) or (byte == 0 and bit >= 4)
        if checked:
            assert verdict is not Verdict.PASS, (byte, bit)


# --------------------------------------------------------------------------- garbage
GARBAGE_SAS = [
    # (algorithm, mode, family, UDP, ESN)
    ("aes256gcm16", Mode.TUNNEL, 4, False, False),
    ("aes128-sha256", Mode.TRANSPORT, 6, True, True),
    ("null-sha512", Mode.TUNNEL, 6, False, False),
    ("chacha20poly1305", Mode.TRANSPORT, 4, True, False),
]
GARBAGE_SPI = 0x7A000000


def _garbage_table() -> SaTable:
    sas = SaTable()
    for i, (alg, mode, fam, udp, esn) in enumerate(GARBAGE_SAS):
        install(sas, alg, mode, fam, Direction.IN, spi=GARBAGE_SPI + i, udp=udp, esn=esn,
                replay_window=0)
        install(sas, alg, mode, fam, Direction.OUT, spi=GARBAGE_SPI + 16 + i, udp=udp,
                esn=esn)
    return sas


def _genuine(i: int, size: int = 30) -> tuple[bytes, bytes]:
    alg, mode, fam, udp, esn = GARBAGE_SAS[i]
    sas = SaTable()
    out = install(sas, alg, mode, fam, Direction.OUT, spi=GARBAGE_SPI + i, udp=udp, esn=esn)
    make = inner_packet if mode is Mode.TUNNEL else transport_packet
    orig = make(fam, size)
    # Fixed CBC IVs: the same packets every run (Hypothesis replays stored examples).
    return orig, encap(sas, out, [orig], random=lambda n: bytes(n)).packet(0)


@pytest.mark.parametrize("i", range(len(GARBAGE_SAS)),
                         ids=[f"{c[0]}-{c[1].name}-{c[2]}" for c in GARBAGE_SAS])
def test_truncated_at_every_length(i: int) -> None:
    orig, wire = _genuine(i)
    cuts = [wire[:n] for n in range(len(wire))]
    batch = decap(_garbage_table(), [*cuts, wire + b"\xee" * 9])
    got = verdicts(batch)
    # Shorter than its headers or its length field: RUNT (the taxonomy's meaning).
    assert got[:-1] == [Verdict.RUNT] * len(cuts)
    # Bytes after the IP datagram (link-layer padding) are not part of it.
    assert got[-1] is Verdict.PASS and batch.packet(len(cuts)) == orig
    assert counts_add_up(batch)


@pytest.mark.parametrize("i", range(len(GARBAGE_SAS)),
                         ids=[f"{c[0]}-{c[1].name}-{c[2]}" for c in GARBAGE_SAS])
def test_length_field_lies(i: int) -> None:
    """IP length fields larger than the packet: RUNT; too small for IP + ESP headers: RUNT;
    a few bytes short: the payload is misaligned (PAD, RFC 4303 §2.4) or, a whole block
    short, the ICV is read from the wrong place (INTEGRITY)."""
    alg, _, fam, udp, _ = GARBAGE_SAS[i]
    block = 16 if "sha" in alg and not alg.startswith("null") else 4
    _, wire = _genuine(i)
    at = 2 if fam == 4 else 4
    base = 0 if fam == 4 else 40
    declared = struct.unpack("!H", wire[at : at + 2])[0]

    def with_length(n: int) -> bytes:
        b = bytearray(wire)
        b[at : at + 2] = struct.pack("!H", n)
        if fam == 4:
            b[10:12] = b"\0\0"  # the outer checksum is not what is being tested
        return bytes(b)

    minimum = (20 if fam == 4 else 0) + (8 if udp else 0) + 8  # IP + UDP + ESP header
    cases = [
        (declared + 1, Verdict.RUNT),
        (0xFFFF - base, Verdict.RUNT),
        (minimum - 1, Verdict.RUNT),
        (0, Verdict.RUNT),
        (declared - 1, Verdict.PAD),
        (declared - 3, Verdict.PAD),
        (declared - block, Verdict.INTEGRITY),
    ]
    if fam == 4:
        cases.append((19, Verdict.RUNT))
    batch = decap(_garbage_table(), [with_length(n) for n, _ in cases])
    assert verdicts(batch) == [v for _, v in cases]
    assert counts_add_up(batch)


def _aead_wire(plaintext: bytes, *, seq: int = 1, spi: int = GARBAGE_SPI) -> bytes:
    """A packet for GARBAGE_SAS[0] (aes256gcm16, tunnel, IPv4) around any plaintext."""
    local, remote = ADDR[4]
    esp = seal_esp("aes256gcm16", spi, seq, plaintext, esn=False)
    return outer_ip(4, local, remote, esp)


def _udp_wire(body: bytes, family: int = 4) -> bytes:
    local, remote = ADDR[family]
    return outer_ip(family, local, remote, udp_header(body), proto=17)


def test_inbound_drop_reasons() -> None:
    inner = inner_packet(4, 11)
    pad = -(len(inner) + 2) % 4  # 3

    def padded(p: int, corrupt: int | None = None, pad_len: int | None = None) -> bytes:
        pad_bytes = bytearray(range(1, p + 1))
        if corrupt is not None:
            pad_bytes[corrupt] ^= 0x40
        return inner + bytes(pad_bytes) + bytes([p if pad_len is None else pad_len, 4])

    good = _aead_wire(padded(pad))
    _, cbc_good = _genuine(1)
    local, remote = ADDR[4]
    v6l, v6r = ADDR[6]
    cases = [
        (good, Verdict.PASS),
        # RFC 4303 §2.4: the receiver checks the default padding 1, 2, 3, ...; any length
        # up to 255 that keeps the payload aligned is valid.
        (_aead_wire(padded(pad + 196)), Verdict.PASS),
        (_aead_wire(padded(pad, corrupt=0)), Verdict.PAD),
        (_aead_wire(padded(pad + 4, corrupt=pad + 3)), Verdict.PAD),
        (_aead_wire(padded(pad + 196, corrupt=100)), Verdict.PAD),
        (_aead_wire(padded(pad, pad_len=pad + 1)), Verdict.PAD),  # Pad Length off by one
        (_aead_wire(bytes(range(1, 255)) + bytes([255, 4])), Verdict.PAD),  # longer than all
        (_aead_wire(inner + bytes([1, 2, 2, 4])), Verdict.PAD),  # not a multiple of 4 bytes
        # RFC 4303 §2.6: Next Header 59 is a dummy packet, dropped silently.
        (_aead_wire(bytes(30) + trailer(30, 59, 4), seq=2), Verdict.DUMMY),
        # Tunnel mode: Next Header must name the inner packet's version.
        (_aead_wire(inner + trailer(len(inner), 41, 4), seq=3), Verdict.PROTO),
        (_aead_wire(inner + trailer(len(inner), 17, 4), seq=4), Verdict.PROTO),
        # The inner header claims more than was decrypted.
        (_aead_wire(inner[:2] + struct.pack("!H", len(inner) + 4) + inner[4:]
                    + trailer(len(inner), 4, 4), seq=5), Verdict.RUNT),
        (_aead_wire(inner + trailer(len(inner), 4, 4), spi=0xDEADBEEF), Verdict.NO_SA),
        (outer_ip(4, local, remote, b"\x00" * 40, proto=6), Verdict.PROTO),
        # UDP-encapsulated: keepalive, non-ESP marker (IKE), encapsulation mismatch.
        (_udp_wire(b"\xff"), Verdict.KEEPALIVE),
        (_udp_wire(b"\xff", family=6), Verdict.KEEPALIVE),
        (_udp_wire(b"\x00\x00\x00\x00" + bytes(60)), Verdict.ENCAP),
        (_udp_wire(good[20:]), Verdict.ENCAP),  # GARBAGE_SAS[0] is not UDP-encapsulated
        (cbc_good[:4] + struct.pack("!HB", len(cbc_good) - 48, 50) + cbc_good[7:40]
         + cbc_good[48:], Verdict.ENCAP),  # GARBAGE_SAS[1] is, and this one came without
        # Wrong IP version, or a family other than the SA's.
        (b"\x55" + good[1:], Verdict.PROTO),
        (b"\x05" + good[1:], Verdict.PROTO),
        (outer_ip(6, v6l, v6r, good[20:]), Verdict.PROTO),
        # IP fragments (reassembly happens before the codec).
        (good[:6] + b"\x20\x00" + good[8:], Verdict.FRAGMENT),
        (good[:6] + b"\x00\x10" + good[8:], Verdict.FRAGMENT),
        (raw(IPv6(src=str(v6l), dst=str(v6r)) / IPv6ExtHdrFragment(nh=50) / Raw(good[20:])),
         Verdict.UNSUPPORTED),
        (raw(IPv6(src=str(v6l), dst=str(v6r)) / IPv6ExtHdrHopByHop(nh=50) / Raw(good[20:])),
         Verdict.UNSUPPORTED),
        (b"", Verdict.RUNT),
        (b"\x45", Verdict.RUNT),
    ]
    batch = decap(_garbage_table(), [c[0] for c in cases])
    assert verdicts(batch) == [c[1] for c in cases]
    assert batch.packets() == [inner, inner]
    assert counts_add_up(batch)


@pytest.mark.parametrize(("alg", "mode", "family"), [
    ("aes128-sha256", Mode.TRANSPORT, 6), ("null-sha512", Mode.TUNNEL, 6),
    ("aes256-sha384", Mode.TUNNEL, 4)])
def test_bad_padding_hmac_suites(alg: str, mode: Mode, family: int) -> None:
    """Padding is checked after the ICV verifies, for the HMAC suites too."""
    sas = SaTable()
    install(sas, alg, mode, family, Direction.IN, spi=SPI_OUT, replay_window=0)
    local, remote = ADDR[family]
    block = 4 if alg.startswith("null") else 16
    if mode is Mode.TUNNEL:
        body, nh = inner_packet(family, 9), 4 if family == 4 else 41
    else:
        body, nh = b"\x00\x07\x00\x09\x00\x0c\x00\x00abcd", 17  # a UDP datagram
    pad = -(len(body) + 2) % block
    good = body + trailer(len(body), nh, block)
    wrong = body + bytes([7] * pad) + bytes([pad, nh]) if pad else None
    longer = body + bytes(range(1, pad + block + 1)) + bytes([pad + block, nh])
    bad_long = body + bytes(range(1, pad + block)) + b"\x00" + bytes([pad + block, nh])
    dummy = body + trailer(len(body), 59, block)
    plaintexts = [good, longer, bad_long, dummy] + ([wrong] if wrong else [])
    expected = [Verdict.PASS, Verdict.PASS, Verdict.PAD, Verdict.DUMMY] + (
        [Verdict.PAD] if wrong else [])
    wires = []
    for k, plain in enumerate(plaintexts, start=1):
        esp = seal_esp(alg, SPI_OUT, k, plain, esn=False, iv=bytes([k]) * 16)
        wires.append(outer_ip(family, local, remote, esp))
    batch = decap(sas, wires)
    assert verdicts(batch) == expected
    if mode is Mode.TUNNEL:
        assert batch.packets() == [body, body]
    else:
        assert [p[40 if family == 6 else 20 :] for p in batch.packets()] == [body, body]
    assert counts_add_up(batch)


@st.composite
def _forged(draw: st.DrawFn) -> bytes:
    """IP (+ UDP) + ESP with consistent lengths and a known SPI, so fuzzing reaches the ICV,
    the padding and the inner-header checks."""
    i = draw(st.integers(0, len(GARBAGE_SAS) - 1))
    _, _, fam, udp, _ = GARBAGE_SAS[i]
    spi = draw(st.sampled_from([GARBAGE_SPI + i, GARBAGE_SPI + i, 0, GARBAGE_SPI + 9]))
    body = struct.pack("!II", spi, draw(st.integers(0, U32 - 1)))
    body += draw(st.binary(min_size=0, max_size=120))
    if udp and draw(st.booleans()):
        body = udp_header(body)
        proto = 17
    else:
        proto = draw(st.sampled_from([50, 50, 50, 17, 51]))
    local, remote = ADDR[fam]
    pkt = bytearray(outer_ip(fam, remote, local, body, proto=proto))
    if fam == 4 and draw(st.booleans()):
        pkt[6:8] = draw(st.binary(min_size=2, max_size=2))
    return bytes(pkt[: len(pkt) - draw(st.sampled_from([0, 0, 0, 1, 4, 17]))])


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """A genuine packet with a few bytes from the SPI on changed: never valid."""
    i = draw(st.integers(0, len(GARBAGE_SAS) - 1))
    pkt = bytearray(GENUINE[i])
    _, _, fam, udp, _ = GARBAGE_SAS[i]
    first = (20 if fam == 4 else 40) + (8 if udp else 0)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(first, len(pkt) - 1))
        pkt[at] = (pkt[at] + draw(st.integers(1, 255))) & 0xFF
    return bytes(pkt)


GENUINE = [_genuine(i)[1] for i in range(len(GARBAGE_SAS))]
# What a genuine packet carries from its SPI on: a fuzzed packet may pass only if it carries
# one of these (the outer IP and UDP headers are not authenticated, RFC 4303 §3.1.2).
GENUINE_ESP = [g[(20 if c[2] == 4 else 40) + (8 if c[3] else 0) :]
               for g, c in zip(GENUINE, GARBAGE_SAS, strict=True)]
GARBAGE = st.one_of(st.binary(max_size=150), _forged(), _mutated())


@FAST
@given(packets=st.lists(GARBAGE, min_size=1, max_size=12),
       sa_column=st.lists(st.integers(0, 40), max_size=12),
       dropped=st.lists(st.booleans(), max_size=12))
def test_fuzz_never_raises(packets: list[bytes], sa_column: list[int],
                           dropped: list[bool]) -> None:
    """Invariant: any bytes, inbound or outbound, get a verdict and never an exception; an
    inbound packet passes only if it carries a genuine ESP packet; the counters add up."""
    sas = _garbage_table()
    batch = decap(sas, packets)
    for pkt, verdict in zip(packets, verdicts(batch), strict=True):
        assert verdict is not Verdict.PASS or any(g in pkt for g in GENUINE_ESP)
    assert counts_add_up(batch)
    batch = Batch.for_packets(packets)
    n = batch.count
    batch.meta["sa"][:n] = (sa_column + [4] * n)[:n]
    batch.meta["verdict"][:n] = [Verdict.RUNT if d else 0 for d in (dropped + [False] * n)[:n]]
    sas.assign_sequence(batch)
    EspCodec(sas).encap(batch)
    assert counts_add_up(batch)
    for d, v in zip((dropped + [False] * n)[:n], verdicts(batch), strict=True):
        if d:
            assert v is Verdict.RUNT


# --------------------------------------------------------------------------- mixed batches
def test_mixed_sas_interleaved() -> None:
    """Two SAs, different algorithms, modes and families, alternating in one batch, both
    ways; then two SAs of the same layout (one group, several SPIs)."""
    ours, peer = SaTable(), SaTable()
    a = install(ours, "aes128gcm16", Mode.TUNNEL, 4, Direction.OUT, spi=SPI_OUT)
    b = install(ours, "aes256-sha512", Mode.TRANSPORT, 6, Direction.OUT, spi=SPI_OUT + 1,
                udp=True)
    c = install(ours, "chacha20poly1305", Mode.TUNNEL, 4, Direction.OUT, spi=SPI_OUT + 2)
    ia = install(peer, "aes128gcm16", Mode.TUNNEL, 4, Direction.IN, spi=SPI_OUT)
    ib = install(peer, "aes256-sha512", Mode.TRANSPORT, 6, Direction.IN, spi=SPI_OUT + 1,
                 udp=True)
    ic = install(peer, "chacha20poly1305", Mode.TUNNEL, 4, Direction.IN, spi=SPI_OUT + 2)
    plan = [a, b, a, c, b, b, c, a, c, a]
    originals = [inner_packet(4, 3 * k, salt=k) if sa is not b else
                 transport_packet(6, 5 * k, salt=k) for k, sa in enumerate(plan)]
    batch = Batch.for_packets(originals)
    batch.meta["sa"][: batch.count] = [sa.index for sa in plan]
    ours.assign_sequence(batch)
    EspCodec(ours).encap(batch)
    assert verdicts(batch) == [Verdict.PASS] * len(plan)
    wires = batch.packets()
    # Sequence numbers are per SA, in packet order.
    expect_seq, counters = [], {a.index: 0, b.index: 0, c.index: 0}
    for sa in plan:
        counters[sa.index] += 1
        expect_seq.append(counters[sa.index])
    assert batch.meta["seq"][: batch.count].tolist() == expect_seq
    back = decap(peer, wires)
    assert verdicts(back) == [Verdict.PASS] * len(plan)
    assert back.packets() == originals
    by_sa = {a.index: ia.index, b.index: ib.index, c.index: ic.index}
    assert back.meta["sa"][: back.count].tolist() == [by_sa[sa.index] for sa in plan]
    assert back.meta["seq"][: back.count].tolist() == expect_seq
    assert (ia.packets, ib.packets, ic.packets) == (4, 3, 3)


@pytest.mark.parametrize("alg", ["aes128gcm16", "aes128-sha256", "null-sha256"])
def test_mixed_offsets(alg: str) -> None:
    """Packets at different places in their slots (less or more headroom), both ways."""
    ours, out, peer, _ = pair(alg, Mode.TUNNEL, 4, udp=True)
    originals = [inner_packet(4, 10 + k, salt=k) for k in range(6)]
    batch = Batch.for_packets(originals)
    batch.meta["sa"][: batch.count] = out.index
    ours.assign_sequence(batch)
    shifts = [0, 8, -40, 64, -60, 1]
    for k, shift in enumerate(shifts):
        if shift:
            move_packet(batch, k, HEADROOM + shift)
    EspCodec(ours).encap(batch)
    assert verdicts(batch) == [Verdict.PASS] * len(originals)
    wires = batch.packets()
    back = Batch.for_packets(wires)
    for k, shift in enumerate(reversed(shifts)):
        if shift:
            move_packet(back, k, HEADROOM + shift)
    EspCodec(peer).decap(back)
    assert verdicts(back) == [Verdict.PASS] * len(originals)
    assert back.packets() == originals


@pytest.mark.parametrize("alg", ["chacha20poly1305", "aes192-sha384"])
def test_already_dropped_packets_are_left_alone(alg: str) -> None:
    """Packets an earlier stage dropped keep their verdict and bytes, take no sequence
    number, and do not move the receiver's window."""
    ours, out, peer, inb = pair(alg, Mode.TUNNEL, 6)
    originals = [inner_packet(6, 20 + k, salt=k) for k in range(8)]
    dropped = [1, 4, 5]
    batch = Batch.for_packets(originals)
    batch.meta["sa"][: batch.count] = out.index
    for k in dropped:
        batch.meta["verdict"][k] = Verdict.NO_SA
    ours.assign_sequence(batch)
    EspCodec(ours).encap(batch)
    got = verdicts(batch)
    assert got == [Verdict.NO_SA if k in dropped else Verdict.PASS for k in range(8)]
    for k in dropped:
        assert batch.packet(k) == originals[k]
    live = [k for k in range(8) if k not in dropped]
    assert [int(batch.meta["seq"][k]) for k in live] == list(range(1, 6))
    assert out.seq_out == 5
    wires = [batch.packet(k) for k in range(8)]  # dropped ones too, as they are

    back = Batch.for_packets(wires)
    for k in (0, 2, 4):  # an earlier inbound stage dropped these, one of them a dropped one
        back.meta["verdict"][k] = Verdict.ENCAP
    EspCodec(peer).decap(back)
    got = verdicts(back)
    for k in range(8):
        if k in (0, 2, 4):
            assert got[k] is Verdict.ENCAP and back.packet(k) == wires[k]
        elif k in dropped:
            assert got[k] is not Verdict.PASS  # a plain inner packet is no ESP packet
        else:
            assert got[k] is Verdict.PASS and back.packet(k) == originals[k]
    assert inb.packets == 3
    # Seq 1 and 2 (packets 0 and 2) were never seen: they still pass.
    again = decap(peer, [wires[0], wires[2]])
    assert verdicts(again) == [Verdict.PASS, Verdict.PASS]
    assert again.packets() == [originals[0], originals[2]]


def test_mixed_everything_matches_one_by_one() -> None:
    """A batch of SAs, offsets, drops and garbage: each packet's result equals what it gets
    in a batch of its own (the dense single-packet path)."""
    rnd = random.Random(5)
    ours, peer = SaTable(), SaTable()
    sas = []
    for i, (alg, mode, fam, udp) in enumerate([
            ("aes128gcm16", Mode.TUNNEL, 4, False), ("aes256-sha256", Mode.TUNNEL, 6, True),
            ("null-sha384", Mode.TRANSPORT, 4, True), ("aes192gcm16", Mode.TRANSPORT, 6, False)]):
        o = install(ours, alg, mode, fam, Direction.OUT, spi=SPI_OUT + i, udp=udp)
        install(peer, alg, mode, fam, Direction.IN, spi=SPI_OUT + i, udp=udp, replay_window=0)
        sas.append((o, mode, fam))
    wires = []
    for k in range(24):
        o, mode, fam = rnd.choice(sas)
        make = inner_packet if mode is Mode.TUNNEL else transport_packet
        wires.append(encap(ours, o, [make(fam, rnd.randrange(60), salt=k)]).packet(0))
    wires[5] = wires[5][:-1]
    wires[9] = b"\x45" + bytes(40)
    wires[13] = bytes(wires[13][:-3]) + b"zzz"
    alone = []
    for w in wires:
        single = decap(peer, [w])
        alone.append((verdicts(single)[0], single.packet(0)))
    batch = Batch.for_packets(wires)
    for k in range(24):
        if k % 3 == 1:
            move_packet(batch, k, HEADROOM + rnd.choice([-48, -8, 16, 40]))
    batch.meta["verdict"][17] = Verdict.RUNT
    EspCodec(peer).decap(batch)
    assert {v for v, _ in alone} == {Verdict.PASS, Verdict.RUNT, Verdict.PROTO,
                                     Verdict.INTEGRITY}
    for k, (v, pkt) in enumerate(batch):
        want_verdict, want_pkt = (Verdict.RUNT, wires[17]) if k == 17 else alone[k]
        assert Verdict(v) is want_verdict, k
        if want_verdict is Verdict.PASS or k == 17:
            assert pkt == want_pkt, k
    assert counts_add_up(batch)
