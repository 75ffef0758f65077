"""Shared helpers for the ESP codec tests (workers/esp.py): SAs, packets, independent checks.

Nothing here uses espline to check espline: ESP payloads are opened with ``cryptography`` and
``hmac`` directly (``open_esp``), and header checksums are recomputed from the RFCs' arithmetic
(``inet_sum``), so a test that uses these helpers fails when the codec is wrong rather than
agreeing with it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Raw, raw

from pipeline.batch import Batch, Verdict
from pipeline.satable import Direction, Mode, Protocol, SaRecord, UdpEncap
from workers.algorithms import CipherKind, EspTransform, parse_esp
from workers.esp import EspCodec
from workers.sa import SaState, SaTable


@dataclass(frozen=True)
class Alg:
    """An espline ESP keyword and its scapy names (scapy.layers.ipsec CRYPT_/AUTH_ALGOS)."""

    keyword: str
    scapy_crypt: str
    scapy_auth: str | None

    @property
    def t(self) -> EspTransform:
        return parse_esp(self.keyword)


# Every algorithm espline and scapy both implement.
ALGS = [
    Alg("aes128gcm16", "AES-GCM", None),  # RFC 4106
    Alg("aes192gcm16", "AES-GCM", None),
    Alg("aes256gcm16", "AES-GCM", None),
    Alg("chacha20poly1305", "CHACHA20-POLY1305", None),  # RFC 7634
    Alg("aes128-sha256", "AES-CBC", "SHA2-256-128"),  # RFC 3602 + RFC 4868
    Alg("aes192-sha384", "AES-CBC", "SHA2-384-192"),
    Alg("aes256-sha512", "AES-CBC", "SHA2-512-256"),
    Alg("null-sha256", "NULL", "SHA2-256-128"),  # RFC 2410 + RFC 4868
    Alg("null-sha384", "NULL", "SHA2-384-192"),
    Alg("null-sha512", "NULL", "SHA2-512-256"),
]
ALG = {a.keyword: a for a in ALGS}

SPI_OUT = 0x0A0B0C0D
SPI_IN = 0x01020304
# Sender first, receiver second: packets always flow ADDR[f][0] -> ADDR[f][1]. An outbound
# SA's local address is the first, an inbound SA's local address the second.
ADDR = {
    4: (ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("198.51.100.2")),
    6: (ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("2001:db8:ffff::2")),
}
NAT_T_PORT = 4500  # RFC 3948 §2.1
ESP_PROTO = 50
UDP_PROTO = 17
U32 = 1 << 32


@dataclass(frozen=True)
class Layout:
    """Tunnel (outer family, inner family) or transport (family, family)."""

    mode: Mode
    outer: int
    inner: int

    @property
    def id(self) -> str:
        if self.mode is Mode.TUNNEL:
            return f"{self.inner}in{self.outer}"
        return f"transport{self.outer}"


LAYOUTS = [
    Layout(Mode.TUNNEL, 4, 4),
    Layout(Mode.TUNNEL, 6, 6),
    Layout(Mode.TUNNEL, 6, 4),  # 4in6
    Layout(Mode.TUNNEL, 4, 6),  # 6in4
    Layout(Mode.TRANSPORT, 4, 4),
    Layout(Mode.TRANSPORT, 6, 6),
]


# --------------------------------------------------------------------------- keys and SAs
def keys_for(alg: str) -> tuple[bytes, bytes]:
    """(encryption key material incl. AEAD salt, integrity key), fixed per algorithm."""
    t = parse_esp(alg)
    enc = hashlib.sha512(b"enc:" + alg.encode()).digest()[: t.key_material_len]
    integ = b""
    if t.integ is not None:
        integ = (hashlib.sha512(b"integ:" + alg.encode()).digest() * 2)[: t.integ.key_len]
    return enc, integ


def record(alg: str, mode: Mode, family: int, direction: Direction, *, spi: int,
           esn: bool = False, replay_window: int = 64, udp: bool = False,
           tfc_pad: int = 0) -> SaRecord:
    local, remote = ADDR[family]
    if direction is Direction.IN:
        local, remote = remote, local
    enc, integ = keys_for(alg)
    return SaRecord(spi=spi, direction=direction, alg=alg, local_addr=local, remote_addr=remote,
                    protocol=Protocol.ESP, mode=mode, enc_key=enc, integ_key=integ, esn=esn,
                    replay_window=replay_window, encap=UdpEncap() if udp else None,
                    tfc_pad=tfc_pad)


def install(sas: SaTable, alg: str, mode: Mode, family: int, direction: Direction, *,
            spi: int, **kw: object) -> SaState:
    return sas.install(record(alg, mode, family, direction, spi=spi, **kw))  # type: ignore[arg-type]


def pair(alg: str, mode: Mode, family: int, *, spi: int = SPI_OUT, esn: bool = False,
         udp: bool = False, replay_window: int = 64
         ) -> tuple[SaTable, SaState, SaTable, SaState]:
    """Our outbound SA and the peer's matching inbound SA, in two tables."""
    ours, peer = SaTable(), SaTable()
    out = install(ours, alg, mode, family, Direction.OUT, spi=spi, esn=esn, udp=udp)
    inb = install(peer, alg, mode, family, Direction.IN, spi=spi, esn=esn, udp=udp,
                  replay_window=replay_window)
    return ours, out, peer, inb


def scapy_sa(alg: str, layout: Layout, *, spi: int, udp: bool,
             esn_hi: int | None = None) -> SecurityAssociation:
    """scapy's end of an SA whose packets flow from ADDR[f][0] to ADDR[f][1], as ours do."""
    a = ALG[alg]
    local, remote = ADDR[layout.outer]
    tunnel = None
    if layout.mode is Mode.TUNNEL:
        tunnel = (IP if layout.outer == 4 else IPv6)(src=str(local), dst=str(remote))
    enc, integ = keys_for(alg)
    kw: dict[str, object] = {}
    if esn_hi is not None:
        kw = {"esn_en": True, "esn": esn_hi}
    return SecurityAssociation(
        ESP, spi=spi, crypt_algo=a.scapy_crypt, crypt_key=enc or None,
        auth_algo=a.scapy_auth, auth_key=integ or None, tunnel_header=tunnel,
        nat_t_header=UDP(sport=NAT_T_PORT, dport=NAT_T_PORT) if udp else None, **kw)


def scapy_encrypt(sa: SecurityAssociation, pkt: bytes, seq: int, *, aead: bool) -> bytes:
    """scapy's ESP packet for ``pkt`` with the 64-bit sequence number ``seq``.

    For the AEADs the IV is the sequence number, as espline sends it (RFC 4106 §3.1 allows
    any unique IV; a counter makes the two implementations' output comparable byte for byte).
    """
    sa.seq_num = seq % U32  # scapy's ``seq_num or self.seq_num`` would turn 0 into 1
    sa.esn = seq >> 32
    iv = seq.to_bytes(8, "big") if aead else None
    return raw(sa.encrypt(parse(pkt), iv=iv))


# --------------------------------------------------------------------------- packets
def payload(size: int, salt: int = 0) -> bytes:
    return bytes((i * 7 + salt) & 0xFF for i in range(size))


def inner_packet(version: int, size: int, *, tos: int = 0x2A, df: bool = True,
                 salt: int = 0) -> bytes:
    """A tunnelled packet: IPv4/UDP or IPv6/TCP with ``size`` payload bytes."""
    data = Raw(payload(size, salt))
    if version == 4:
        return raw(IP(src="10.1.0.1", dst="10.2.0.2", ttl=33, tos=tos, id=777,
                      flags="DF" if df else 0) / UDP(sport=1234, dport=5678) / data)
    return raw(IPv6(src="fd00::1", dst="fd00::2", tc=tos, fl=0x12345, hlim=33)
               / TCP(sport=1234, dport=80) / data)


def transport_packet(version: int, size: int, *, salt: int = 0) -> bytes:
    """A packet between the SA's own addresses (transport mode), ADDR[f][0] to ADDR[f][1]."""
    local, remote = ADDR[version]
    data = Raw(payload(size, salt))
    if version == 4:
        return raw(IP(src=str(local), dst=str(remote), ttl=33, tos=0x2A, id=99)
                   / UDP(sport=7, dport=9) / data)
    return raw(IPv6(src=str(local), dst=str(remote), tc=0x2A, fl=0xABCDE, hlim=33)
               / UDP(sport=7, dport=9) / data)


def packet_for(layout: Layout, size: int, *, salt: int = 0, tos: int = 0x28) -> bytes:
    """A packet for ``layout``; a non-zero inner TOS (AF11) by default, so the algorithm
    matrices also check that the copied TOS enters the outer IPv4 checksum correctly."""
    if layout.mode is Mode.TUNNEL:
        return inner_packet(layout.inner, size, salt=salt, tos=tos)
    return transport_packet(layout.outer, size, salt=salt)


def parse(pkt: bytes) -> IP | IPv6:
    return IP(pkt) if pkt[0] >> 4 == 4 else IPv6(pkt)


# --------------------------------------------------------------------------- codec runs
def poisoned_batch(packets: list[bytes], fill: int = 0xA5) -> Batch:
    """A batch whose bytes outside the packets are not zero, like a reused buffer."""
    batch = Batch.for_packets(packets)
    batch.data[:] = fill
    batch.load(packets)
    return batch


def encap(sas: SaTable, sa: SaState, packets: list[bytes], *, poison: bool = False,
          random: Callable[[int], bytes] | None = None) -> Batch:
    batch = poisoned_batch(packets) if poison else Batch.for_packets(packets)
    batch.meta["sa"][: batch.count] = sa.index
    sas.assign_sequence(batch)
    (EspCodec(sas) if random is None else EspCodec(sas, random=random)).encap(batch)
    return batch


def decap(sas: SaTable, packets: list[bytes]) -> Batch:
    batch = Batch.for_packets(packets)
    EspCodec(sas).decap(batch)
    return batch


def verdicts(batch: Batch) -> list[Verdict]:
    return [Verdict(int(v)) for v in batch.meta["verdict"][: batch.count]]


def counts_add_up(batch: Batch) -> bool:
    """Every packet has a verdict, and the drop counters account for every drop."""
    got = verdicts(batch)
    drops = sum(v is not Verdict.PASS for v in got)
    passed = len(batch.packets())
    return sum(batch.verdict_counts().values()) == drops and passed == len(got) - drops


def move_packet(batch: Batch, i: int, in_slot: int) -> None:
    """Move packet ``i`` to byte ``in_slot`` of its slot (a different headroom)."""
    pkt = batch.packet(i)
    start = i * batch.slot_size + in_slot
    batch.data[i * batch.slot_size : (i + 1) * batch.slot_size] = 0x5A
    batch.data[start : start + len(pkt)] = np.frombuffer(pkt, np.uint8)
    batch.meta["offset"][i] = start


# --------------------------------------------------------------------------- independent checks
def inet_sum(data: bytes) -> int:
    """RFC 1071 one's complement sum, folded to 16 bits."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ipv4_checksum_ok(header: bytes) -> bool:
    return inet_sum(header) == 0xFFFF


def udp_checksum_ok(pkt: bytes) -> bool:
    """The UDP checksum of an IPv4/IPv6 + UDP packet (RFC 768, RFC 8200 §8.1)."""
    if pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 0xF) * 4
        segment = pkt[ihl : struct.unpack("!H", pkt[2:4])[0]]
        pseudo = pkt[12:20] + struct.pack("!BBH", 0, UDP_PROTO, len(segment))
    else:
        segment = pkt[40 : 40 + struct.unpack("!H", pkt[4:6])[0]]
        pseudo = pkt[8:40] + struct.pack("!IxxxB", len(segment), UDP_PROTO)
    if struct.unpack("!H", segment[6:8])[0] == 0:
        return False
    return inet_sum(pseudo + segment) == 0xFFFF


def open_esp(alg: str, esp: bytes, seq: int, *, esn: bool) -> bytes:
    """Verify and decrypt an ESP packet (SPI onward) with plain ``cryptography``/``hmac``;
    returns the plaintext with its trailer (padding, Pad Length, Next Header).

    ``seq`` is the full sequence number; with ``esn`` its high half enters the AAD
    (RFC 4106 §5, RFC 7634 §2.1) or the ICV input (RFC 4303 §2.2.1) without being sent.
    """
    t = parse_esp(alg)
    enc, integ_key = keys_for(alg)
    header, iv = esp[:8], esp[8 : 8 + t.iv_len]
    assert header[4:] == struct.pack("!I", seq % U32)
    body = esp[8 + t.iv_len :]
    if t.is_aead:
        aad = struct.pack("!IQ", int.from_bytes(header[:4], "big"), seq) if esn else header
        return _aead(t, enc).decrypt(enc[t.enc_key_len :] + iv, body, aad)
    assert t.integ is not None
    ct, icv = body[: -t.icv_len], body[-t.icv_len :]
    suffix = struct.pack("!I", seq >> 32) if esn else b""
    want = hmac.digest(integ_key, esp[: -t.icv_len] + suffix, t.integ.hash_name)[: t.icv_len]
    assert hmac.compare_digest(icv, want), "ICV does not verify"
    if t.kind is CipherKind.NULL:
        return ct
    d = Cipher(algorithms.AES(enc), modes.CBC(iv)).decryptor()
    return d.update(ct) + d.finalize()


def seal_esp(alg: str, spi: int, seq: int, plaintext: bytes, *, esn: bool,
             iv: bytes | None = None) -> bytes:
    """Build an ESP packet (SPI onward) around ``plaintext`` (trailer included, as given),
    with plain ``cryptography``/``hmac``: lets tests send what espline would never send."""
    t = parse_esp(alg)
    enc, integ_key = keys_for(alg)
    header = struct.pack("!II", spi, seq % U32)
    if t.is_aead:
        iv = seq.to_bytes(8, "big") if iv is None else iv
        aad = struct.pack("!IQ", spi, seq) if esn else header
        return header + iv + _aead(t, enc).encrypt(enc[t.enc_key_len :] + iv, plaintext, aad)
    assert t.integ is not None
    if t.kind is CipherKind.AES_CBC:
        iv = bytes(range(16)) if iv is None else iv
        e = Cipher(algorithms.AES(enc), modes.CBC(iv)).encryptor()
        body = iv + e.update(plaintext) + e.finalize()
    else:
        body = plaintext
    msg = header + body
    suffix = struct.pack("!I", seq >> 32) if esn else b""
    return msg + hmac.digest(integ_key, msg + suffix, t.integ.hash_name)[: t.icv_len]


def _aead(t: EspTransform, enc: bytes) -> AESGCM | ChaCha20Poly1305:
    key = enc[: t.enc_key_len]
    return AESGCM(key) if t.kind is CipherKind.AEAD_AES_GCM else ChaCha20Poly1305(key)


def trailer(payload_len: int, next_header: int, block: int, pad: int | None = None,
            pad_bytes: bytes | None = None) -> bytes:
    """RFC 4303 §2.4 trailer: default padding 1, 2, ... to the block, Pad Length, NH."""
    if pad is None:
        pad = -(payload_len + 2) % block
    if pad_bytes is None:
        pad_bytes = bytes(range(1, pad + 1))
    return pad_bytes + bytes([pad, next_header])


def outer_ip(family: int, src: ipaddress.IPv4Address | ipaddress.IPv6Address,
             dst: ipaddress.IPv4Address | ipaddress.IPv6Address, body: bytes,
             proto: int = ESP_PROTO) -> bytes:
    """An outer IPv4/IPv6 header in front of ``body``, with correct length and checksum."""
    if family == 4:
        hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0x1234, 0, 64,
                                    proto, 0, src.packed, dst.packed))
        hdr[10:12] = struct.pack("!H", 0xFFFF - inet_sum(bytes(hdr)))
        return bytes(hdr) + body
    return struct.pack("!IHBB16s16s", 0x60000000, len(body), proto, 64, src.packed,
                       dst.packed) + body


def udp_header(body: bytes, sport: int = NAT_T_PORT, dport: int = NAT_T_PORT) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(body), 0) + body
