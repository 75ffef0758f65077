"""The one-packet path: a lone packet through the I/O process without numpy.

Sparse traffic (a ping, an interactive session, a TCP ACK at low rate) arrives one packet per
wake-up. The batch path costs the same hundred-odd numpy calls for one packet as for 256, and
after an idle gap a process runs cold: on the 2-core lab VMs a numpy-heavy 35 us of work takes
230 us 20 ms after the last wake-up, a plain-Python 6 us takes 100 us. A lone packet in the
I/O process took 194 us hot and 663 us cold through the batch path; this module does the
common case in plain Python with the same SA state (21 us hot, about 300 us cold), and the
adapters read and write a lone packet without numpy too (pipeline/batch.py ``Batch.row``):

- outbound: a packet whose policy PROTECTs it with an ESP tunnel-mode SA of an AEAD
  transform (RFC 4303, RFC 4106, RFC 7634), not a TCP SYN when MSS clamping is on, and small
  enough for the tunnel;
- inbound: ESP (raw or UDP-encapsulated, RFC 3948) for such an SA, right of the replay
  window, that verifies and is well formed.

Anything else is *declined*: the function returns False having changed nothing (no sequence
number reserved, no window moved, no byte of the batch written), and the caller takes the
batch path, which decides every other case and counts every drop by reason. The two paths
are held to the same output byte for byte by tests/test_onepacket.py. The caller takes this
path only while no batch is in flight, so the packet cannot overtake one (DESIGN §4: output
leaves in the order sequence numbers were issued).
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag

from pipeline.batch import Batch, Verdict
from pipeline.satable import Direction, Mode, Protocol
from workers.sa import SaState, SaTable

__all__ = ["decap_one", "encap_one"]

# RFC 791, RFC 8200, RFC 768 / RFC 3948, RFC 4303 §2.
IPV4_HDR_LEN = 20
IPV6_HDR_LEN = 40
UDP_HDR_LEN = 8
ESP_HDR_LEN = 8
ESP_TRAILER_LEN = 2
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ESP = int(Protocol.ESP)
NH_IPV4 = 4
NH_IPV6 = 41
OUTER_TTL = 64
TCP_SYN = 0x02
TCP_FLAGS_AT = 13
IPV4_FRAG_MASK = 0x3FFF  # MF and the fragment offset
# RFC 8200 §4: headers a TCP header may hide behind (the batch path steps over them).
IPV6_EXT_HEADERS = frozenset((0, 43, 44, 51, 60, 135, 139, 140, 253, 254))

# RFC 4303 §2.4: default padding 1, 2, ..., p, then Pad Length p.
_PAD = [bytes(range(1, p + 1)) + bytes([p]) for p in range(256)]
_IPV4_OUTER = struct.Struct("!BBHHBBBBH4s4s")
_IPV6_OUTER = struct.Struct("!IHBB16s16s")
_UDP = struct.Struct("!HHHH")
_ESP_AEAD = struct.Struct("!IIQ")  # SPI, low 32 bits of the sequence number, IV (RFC 4106 §3.1)
_U16 = struct.Struct("!H")
_SPI_SEQ = struct.Struct("!II")
_ESN_AAD = struct.Struct("!IQ")  # RFC 4106 §5: SPI, then the whole 64-bit sequence number


def maybe_syn(batch: Batch) -> bool:
    """Whether MSS clamping may want the batch's one packet (see ``_syn``)."""
    off, length, *_ = batch.row(0)
    pkt = batch.memory()[0][off : off + length]
    version = pkt[0] >> 4 if length else 0
    if (version == 4 and length >= IPV4_HDR_LEN) or (version == 6 and length >= IPV6_HDR_LEN):
        return _syn(pkt, version, length)
    return False


def _syn(pkt: memoryview, version: int, length: int) -> bool:
    """Whether MSS clamping may want this packet: a TCP SYN (or a TCP header it cannot see
    at once, behind IPv6 extension headers)."""
    if version == 4:
        ihl = (pkt[0] & 0xF) * 4
        return pkt[9] == PROTO_TCP and (
            length <= ihl + TCP_FLAGS_AT or bool(pkt[ihl + TCP_FLAGS_AT] & TCP_SYN))
    nh = pkt[6]
    if nh in IPV6_EXT_HEADERS:
        return True
    return nh == PROTO_TCP and (length <= IPV6_HDR_LEN + TCP_FLAGS_AT
                                or bool(pkt[IPV6_HDR_LEN + TCP_FLAGS_AT] & TCP_SYN))


def _aead_tunnel(sa: SaState | None, direction: Direction) -> bool:
    if sa is None or sa.esp is None or not sa.esp.is_aead:
        return False
    rec = sa.record
    # (Inbound TFC padding is dropped by the inner header's length, as the batch path does.)
    return (rec.direction is direction and rec.protocol is Protocol.ESP
            and rec.mode is Mode.TUNNEL and not (rec.tfc_pad and direction is Direction.OUT))


def encap_one(batch: Batch, sa: SaState | None, inner_mtu: int, outside_mtu: int,
              clamp: bool) -> bool:
    """ESP-protect the batch's one packet with ``sa`` (its policy's outbound SA) in place, as
    the batch path would; False, having changed nothing, where it declines."""
    if not _aead_tunnel(sa, Direction.OUT):
        return False
    assert sa is not None and sa.esp is not None and sa.aead_encrypt_into is not None
    rec, t = sa.record, sa.esp
    off, length, index, verdict, *_ = batch.row(0)
    udp = UDP_HDR_LEN if rec.encap is not None else 0
    if rec.ipv6 and udp:
        return False  # its UDP checksum covers the ciphertext: the batch path's business
    size = batch.slot_size
    base = off - off % size
    c = off - base
    mv = batch.memory()[0]
    pkt = mv[off : off + length]
    if verdict or not IPV4_HDR_LEN <= length <= inner_mtu or c + IPV6_HDR_LEN > size:
        return False
    b0 = pkt[0]
    version = b0 >> 4
    if not ((version == 4 and length >= IPV4_HDR_LEN)
            or (version == 6 and length >= IPV6_HDR_LEN)):
        return False
    if clamp and _syn(pkt, version, length):
        return False
    outer = IPV6_HDR_LEN if rec.ipv6 else IPV4_HDR_LEN
    head = outer + udp + ESP_HDR_LEN + t.iv_len
    new_c = c - head
    block = t.block_len
    padded = (length + ESP_TRAILER_LEN + block - 1) & -block
    total = head + padded + t.icv_len
    if new_c < 0 or c + padded + t.icv_len > size or total > outside_mtu:
        return False
    if sa.seq_out >= sa.seq_limit:
        return False
    seq = sa.reserve(1)

    # RFC 4301 §5.1.2.1: DSCP and ECN from the inner header; §8.1: DF from an inner IPv4.
    b1 = pkt[1]
    if version == 4:
        tos, df, nh = b1, pkt[6] & 0x40, NH_IPV4
    else:
        tos, df, nh = ((b0 & 0x0F) << 4) | (b1 >> 4), 0, NH_IPV6
    pad = padded - length - ESP_TRAILER_LEN
    end = off + length
    mv[end : end + pad + 1] = _PAD[pad]
    mv[end + pad + 1] = nh
    start = base + new_c
    proto = PROTO_UDP if udp else PROTO_ESP
    if rec.ipv6:
        mv[start : start + outer] = _IPV6_OUTER.pack(
            0x60000000 | tos << 20, total - IPV6_HDR_LEN, proto, OUTER_TTL, sa.local_addr,
            sa.remote_addr)
    else:
        ident = seq & 0xFFFF
        header = _IPV4_OUTER.pack(0x45, tos, total, ident, df, 0, OUTER_TTL, proto, 0,
                                  sa.local_addr, sa.remote_addr)
        words = struct.unpack("!10H", header)
        mv[start : start + outer] = header
        mv[start + 10 : start + 12] = _U16.pack(0xFFFE - (sum(words) - 1) % 0xFFFF)
    at = start + outer
    if udp:
        assert rec.encap is not None
        mv[at : at + UDP_HDR_LEN] = _UDP.pack(
            rec.encap.local_port, rec.encap.remote_port,
            padded + UDP_HDR_LEN + ESP_HDR_LEN + t.iv_len + t.icv_len, 0)
        at += UDP_HDR_LEN
    mv[at : at + ESP_HDR_LEN + t.iv_len] = _ESP_AEAD.pack(rec.spi, seq & 0xFFFFFFFF, seq)
    aad = _ESN_AAD.pack(rec.spi, seq) if rec.esn else mv[at : at + ESP_HDR_LEN].tobytes()
    nonce = sa.salt + seq.to_bytes(8, "big")
    sa.aead_encrypt_into(nonce, mv[off : off + padded], aad, mv[off : off + padded + t.icv_len])
    batch.set_row(0, start, total, sa.index, 0, seq, length)
    return True


def decap_one(batch: Batch, sas: SaTable, scratch: bytearray) -> tuple[SaState, int] | None:
    """Verify, decrypt and strip the batch's one ESP packet in place, moving its SA's replay
    window, as the batch path would; (the SA, the inner packet's length) or None, having
    changed nothing, where it declines. ``scratch`` holds the decrypted packet until it
    proved authentic and well formed (a slot's size)."""
    off, length, _, verdict, *_ = batch.row(0)
    size = batch.slot_size
    base = off - off % size
    if verdict or off - base + IPV6_HDR_LEN + UDP_HDR_LEN + ESP_HDR_LEN > size:
        return None
    mv = batch.memory()[0]
    b0 = mv[off]
    version = b0 >> 4
    if version == 4:
        ip_len = (b0 & 0xF) * 4
        if ip_len < IPV4_HDR_LEN or mv[off + 6] & 0x3F or mv[off + 7]:
            return None  # options: fine; a fragment: the batch path's (it drops it)
        proto = mv[off + 9]
        (ip_total,) = _U16.unpack_from(mv, off + 2)
    elif version == 6:
        ip_len, proto = IPV6_HDR_LEN, mv[off + 6]
        ip_total = _U16.unpack_from(mv, off + 4)[0] + IPV6_HDR_LEN
    else:
        return None
    if ip_total > length:
        return None
    esp_at = off + ip_len
    if proto == PROTO_UDP:
        esp_at += UDP_HDR_LEN
    elif proto != PROTO_ESP:
        return None
    if esp_at + ESP_HDR_LEN > off + ip_total:
        return None
    spi, seq = _SPI_SEQ.unpack_from(mv, esp_at)
    index, found = sas.lookup_one(PROTO_ESP, spi) if spi else (0, False)
    sa = sas[index] if found else None
    if not _aead_tunnel(sa, Direction.IN):
        return None
    assert sa is not None and sa.esp is not None and sa.aead_decrypt_into is not None
    rec, t = sa.record, sa.esp
    replay = sa.replay
    if (rec.esn or version != rec.local_addr.version
            or (proto == PROTO_UDP) != (rec.encap is not None)
            or seq == 0 or seq <= replay.top):
        return None  # ESN inference and anything near the window: the batch path's
    ct_at = esp_at + ESP_HDR_LEN + t.iv_len
    ct_len = off + ip_total - ct_at - t.icv_len
    if ct_len < ESP_TRAILER_LEN or ct_len & (t.block_len - 1) or ct_len > len(scratch):
        return None
    nonce = sa.salt + mv[esp_at + ESP_HDR_LEN : ct_at].tobytes()
    aad = mv[esp_at : esp_at + ESP_HDR_LEN].tobytes()
    out = memoryview(scratch)[:ct_len]
    try:
        sa.aead_decrypt_into(nonce, mv[ct_at : ct_at + ct_len + t.icv_len], aad, out)
    except (InvalidTag, ValueError):  # the batch path decides again, and counts it
        return None
    pad, nh = out[ct_len - 2], out[ct_len - 1]
    inner_len = ct_len - pad - ESP_TRAILER_LEN
    if inner_len < IPV4_HDR_LEN or out[inner_len : inner_len + pad + 1] != _PAD[pad]:
        return None
    iv = out[0] >> 4
    if iv == 4 and nh == NH_IPV4:
        ilen = _U16.unpack_from(out, 2)[0]
    elif iv == 6 and nh == NH_IPV6:
        ilen = _U16.unpack_from(out, 4)[0] + IPV6_HDR_LEN
    else:
        return None
    if ilen > inner_len:
        return None
    replay.commit_run(seq, 1)
    mv[ct_at : ct_at + ilen] = out[:ilen]
    batch.set_row(0, ct_at, ilen, index, Verdict.PASS, seq)
    return sa, ilen
