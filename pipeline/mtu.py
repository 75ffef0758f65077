"""Path MTU handling for the tunnel (DESIGN §7): ESP overhead and the inner MTU, TCP MSS
clamping on SYNs, ICMP "fragmentation needed" / "packet too big" for packets that do not fit,
and RFC 791 fragmentation of outer IPv4 packets.

Sans-IO: functions take a batch (pipeline/batch.py) or bytes and return data: a count, a
mask, the ICMP errors to send, the fragments to send. The batch functions are vectorized with
numpy over the common layouts and fall back to per-packet Python only where a packet's layout
is rare (TCP options in another order, IPv6 extension headers) or where the output is one
``bytes`` per packet anyway (ICMP errors, fragments).

How the pieces fit on the way out (inside -> outside), per SA:

    limit = inner_mtu(path_mtu, transform, ...)          # once per SA / path MTU change
    clamp_mss(batch, mss_limit(limit, False), mss_limit(limit, True))
    icmp_errors = icmp_too_big(batch, too_big(batch, limit), limit, our_v4, our_v6)
    ... ESP encap ...; an outer IPv4 packet still over the path MTU (its inner packet had
    no DF) goes out as fragment_ipv4(packet, path_mtu)
"""

from __future__ import annotations

import ipaddress
import struct

import numpy as np
import numpy.typing as npt

from pipeline.batch import Batch, Verdict
from pipeline.offload import ones_sum
from workers import vec
from workers.algorithms import EspTransform

__all__ = [
    "clamp_mss",
    "encapsulated_length",
    "esp_overhead",
    "fragment_ipv4",
    "icmp_too_big",
    "inner_mtu",
    "mss_limit",
    "sa_limits",
    "too_big",
]

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
Mask = npt.NDArray[np.bool_]
PerPacket = npt.NDArray[np.integer] | int

# RFC 4303 §2; RFC 791 §3.1; RFC 8200 §3; RFC 768 and RFC 3948 §2.1; RFC 9293 §3.1.
ESP_HDR_LEN = 8  # SPI (4) + Sequence Number (4)
ESP_TRAILER_LEN = 2  # Pad Length (1) + Next Header (1), RFC 4303 §2.4-2.6
IPV4_HDR_LEN = 20  # without options
IPV4_MAX_HDR_LEN = 60  # IHL is 4 bits of 32-bit words
IPV6_HDR_LEN = 40
UDP_HDR_LEN = 8
TCP_HDR_LEN = 20  # without options
ICMP_HDR_LEN = 8  # type, code, checksum, 4 bytes of type-specific data (RFC 792, RFC 4443)

# RFC 791 §3.2: every module forwards 68 octets unfragmented (60 of header + 8 of data).
IPV4_MIN_MTU = 68
# RFC 8200 §5: every IPv6 link carries 1280 octets; a Packet Too Big never asks for less.
IPV6_MIN_MTU = 1280
# RFC 1812 §4.3.2.3: an ICMPv4 error quotes as much as fits in 576 bytes.
ICMP4_ERROR_MAX = 576
# RFC 4443 §2.4(c): an ICMPv6 error quotes as much as fits in the minimum MTU.
ICMP6_ERROR_MAX = IPV6_MIN_MTU
ICMP_TTL = 64  # TTL / Hop Limit of the errors we originate
# RFC 1812 §4.3.2.5: ICMP errors SHOULD carry precedence 6 (Internetwork Control): DSCP CS6.
ICMP4_TOS = 0xC0

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_ICMPV6 = 58
ICMP4_DEST_UNREACHABLE = 3  # RFC 792
ICMP4_FRAG_NEEDED = 4  # code of type 3: fragmentation needed and DF set (RFC 1191 §4)
ICMP6_PACKET_TOO_BIG = 2  # RFC 4443 §3.2
ICMP6_REDIRECT = 137  # RFC 4861 §4.5; RFC 4443 §2.4(e.2): no error about it

# RFC 791 §3.1: the flags and fragment offset word.
IPV4_RESERVED = 0x8000
IPV4_DF = 0x4000
IPV4_MF = 0x2000
IPV4_OFFSET_MASK = 0x1FFF  # in 8-octet units
IPV4_OPT_EOL = 0
IPV4_OPT_NOP = 1
IPV4_OPT_COPIED = 0x80  # option type bit: copy into every fragment

# RFC 9293 §3.1.
TCP_SYN = 0x02
TCP_OPT_EOL = 0
TCP_OPT_NOP = 1
TCP_OPT_MSS = 2
TCP_OPT_MSS_LEN = 4
TCP_FLAGS_AT = 13
TCP_CHECKSUM_AT = 16
TCP_MSS_FIRST_AT = TCP_HDR_LEN + 2  # the MSS value when MSS is the first option

# RFC 8200 §4 (and RFC 7045's list): extension headers in the common format, whose Hdr Ext
# Len counts 8-octet units after the first 8: Hop-by-Hop, Routing, Destination Options,
# Mobility (RFC 6275), HIP (RFC 7401), Shim6 (RFC 5533).
IPV6_EXT_GENERIC = (0, 43, 60, 135, 139, 140)
IPV6_EXT_FRAGMENT = 44  # fixed 8 octets (RFC 8200 §4.5)
IPV6_EXT_AH = 51  # Payload Len counts 4-octet units minus 2 (RFC 4302 §2.2)
IPV6_MAX_EXT_HEADERS = 16  # a bound on the walk; real chains have a few

_IS_EXT6 = np.zeros(256, dtype=np.bool_)
_IS_EXT6[[*IPV6_EXT_GENERIC, IPV6_EXT_FRAGMENT, IPV6_EXT_AH]] = True
# An IPv6 Next Header after which a TCP header may come: TCP, or an extension header.
_TCP_OR_EXT6 = _IS_EXT6.copy()
_TCP_OR_EXT6[PROTO_TCP] = True
# Where TCP starts by the first byte of the IP header: after IPv6's fixed header (extension
# headers aside) or after IPv4's IHL (RFC 791 §3.1).
_B0 = np.arange(256, dtype=np.int64)
_TCP_AT = np.where(_B0 >> 4 == 6, IPV6_HDR_LEN, (_B0 & 0xF) * 4)
# ICMPv4 messages we may answer with an error: the informational ones (RFC 792, RFC 1256,
# RFC 950). Every other type, known error or unknown, gets none (RFC 1122 §3.2.2).
_ICMP4_QUERY = np.zeros(256, dtype=np.bool_)
_ICMP4_QUERY[[0, 8, 9, 10, 13, 14, 15, 16, 17, 18]] = True
# ICMPv6: types 0-127 are errors (RFC 4443 §2.1), and Redirect is excluded by §2.4(e.2).
_ICMP6_NO_ERROR = np.arange(256) < 128
_ICMP6_NO_ERROR[ICMP6_REDIRECT] = True

_PASS = int(Verdict.PASS)  # a plain int: comparing an array with an IntEnum is slow
_PEEK_IP = IPV6_HDR_LEN  # either fixed header, addresses included
_PEEK_IP_FIXED = 10  # up to the IPv4 Protocol field: lengths, flags, Next Header
_PEEK_TCP = TCP_MSS_FIRST_AT + 2


# ============================================================================ overhead
def esp_overhead(transform: EspTransform, ipv6_outer: bool, udp_encap: bool,
                 tunnel: bool) -> int:
    """Bytes ESP adds to a packet besides its alignment padding (RFC 4303 §2): the outer IP
    header (tunnel mode), UDP (RFC 3948 §2.1), the ESP header, the IV, Pad Length and Next
    Header, and the ICV. Padding adds 0 to ``block_len - 1`` more depending on the length:
    ``encapsulated_length`` and ``inner_mtu`` account for it exactly."""
    outer = (IPV6_HDR_LEN if ipv6_outer else IPV4_HDR_LEN) if tunnel else 0
    udp = UDP_HDR_LEN if udp_encap else 0
    return (outer + udp + ESP_HDR_LEN + transform.iv_len + ESP_TRAILER_LEN
            + transform.icv_len)


def _transport_header(ipv6_outer: bool, tunnel: bool, ip_header_len: int | None) -> int:
    """Bytes in front of the ESP header that are the packet's own (transport mode)."""
    if tunnel:
        return 0
    if ip_header_len is not None:
        return ip_header_len
    return IPV6_HDR_LEN if ipv6_outer else IPV4_HDR_LEN


def encapsulated_length(inner_len: int, transform: EspTransform, ipv6_outer: bool,
                        udp_encap: bool, tunnel: bool, *,
                        ip_header_len: int | None = None) -> int:
    """The exact length of a packet of ``inner_len`` bytes once ESP-protected.

    Tunnel mode encrypts the whole packet; transport mode keeps its IP header
    (``ip_header_len``: 20 or 40 unless given) in front and encrypts the rest. The encrypted
    part plus Pad Length and Next Header is padded to the transform's block (RFC 4303 §2.4:
    the cipher's block size, at least a 4-byte alignment)."""
    header = _transport_header(ipv6_outer, tunnel, ip_header_len)
    payload = inner_len - header
    block = transform.block_len
    padded = -(-(payload + ESP_TRAILER_LEN) // block) * block
    return (header + padded
            + esp_overhead(transform, ipv6_outer, udp_encap, tunnel) - ESP_TRAILER_LEN)


def inner_mtu(outer_mtu: int, transform: EspTransform, ipv6_outer: bool, udp_encap: bool,
              tunnel: bool, *, ip_header_len: int | None = None) -> int:
    """The largest packet whose ESP encapsulation fits ``outer_mtu``: exact, padding included.

    ``encapsulated_length(inner_mtu(m, ...), ...) <= m < encapsulated_length(inner_mtu(m, ...)
    + 1, ...)``. Raises ``ValueError`` when not even an empty payload fits (a configuration
    error, never a per-packet one)."""
    header = _transport_header(ipv6_outer, tunnel, ip_header_len)
    fixed = header + esp_overhead(transform, ipv6_outer, udp_encap, tunnel) - ESP_TRAILER_LEN
    block = transform.block_len
    # RFC 4303 §2.4: payload + trailer is a whole number of blocks; fit as many as there is
    # room for, and the packet fills all of them but the trailer.
    largest = header + (outer_mtu - fixed) // block * block - ESP_TRAILER_LEN
    if largest < header:
        raise ValueError(
            f"outer MTU {outer_mtu} cannot carry {transform.keyword} ESP "
            f"({fixed + ESP_TRAILER_LEN} bytes of overhead)")
    return largest


def sa_limits(outer_mtu: int, clamp: int | str | None, transform: EspTransform,
              ipv6_outer: bool, udp_encap: bool, tunnel: bool) -> tuple[int, int, int]:
    """An SA's (inner MTU, IPv4 MSS limit, IPv6 MSS limit) under the data plane's settings:
    ``clamp`` "auto" (from the tunnel's overhead), a fixed MSS, or None (no clamping:
    limits of 2^16)."""
    m = inner_mtu(outer_mtu, transform, ipv6_outer, udp_encap, tunnel)
    if clamp == "auto":
        return m, mss_limit(m, False), mss_limit(m, True)
    if isinstance(clamp, int):
        return m, clamp, clamp
    return m, 1 << 16, 1 << 16


def mss_limit(inner_mtu: int, ipv6: bool) -> int:
    """The TCP MSS that makes a full segment fit ``inner_mtu`` (RFC 9293 §3.7.1: the MSS
    counts data only, without IP or TCP headers or options)."""
    return inner_mtu - (IPV6_HDR_LEN if ipv6 else IPV4_HDR_LEN) - TCP_HDR_LEN


# ============================================================================ helpers
def _per_packet(value: PerPacket, n: int, name: str) -> I64:
    arr = np.asarray(value, dtype=np.int64)
    if arr.ndim == 0:
        return np.full(n, int(arr), dtype=np.int64)
    if arr.ndim != 1 or arr.shape[0] < n:
        raise ValueError(f"{name}: expected an int or one value per packet ({n})")
    return arr[:n]


def _passing(batch: Batch) -> slice | I64:
    """The packets whose verdict is PASS: their indices, or ``slice(0, count)`` when that
    is all of them (the common case: indexing with it copies nothing)."""
    verdict = batch.meta["verdict"][: batch.count]
    if not np.count_nonzero(verdict):
        return slice(0, batch.count)
    return np.flatnonzero(verdict == _PASS)


def _peek(batch: Batch, at: I64, width: int) -> U8:
    """(n, width) bytes at each offset. Reads are clipped to the buffer: bytes past a
    packet's end are whatever lies there, so every use is masked by the packet's length."""
    data = batch.data
    return vec.peek(data, np.minimum(at, data.shape[0] - width), width, batch._views)


def _be16(rows: U8, col: int) -> I64:
    word: I64 = (rows[:, col].astype(np.int64) << 8) | rows[:, col + 1]
    return word


def _fold(total: I64) -> I64:
    """End-around carry of a one's complement sum (RFC 1071 §4.1), to 16 bits."""
    total = (total & 0xFFFF) + (total >> 16)
    folded: I64 = (total & 0xFFFF) + (total >> 16)
    return folded


def _checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum of ``data`` (odd lengths are zero-padded)."""
    return 0xFFFF - ones_sum(data)


def _ipv6_upper(pkt: bytes, *, through_ah: bool = True) -> tuple[int, int, int]:
    """(upper-layer protocol, its offset, fragment offset) after the IPv6 extension headers
    (RFC 8200 §4). A non-first fragment (offset > 0) has no upper-layer header to look at;
    protocol -1 means the chain is truncated or too long to follow. ``through_ah=False``
    stops at an AH header: what it protects must not be changed."""
    if len(pkt) < IPV6_HDR_LEN:
        return -1, IPV6_HDR_LEN, 0  # not even the fixed header
    nh, at = pkt[6], IPV6_HDR_LEN
    for _ in range(IPV6_MAX_EXT_HEADERS):
        if nh in IPV6_EXT_GENERIC:
            if at + 2 > len(pkt):
                return -1, at, 0
            nh, at = pkt[at], at + (pkt[at + 1] + 1) * 8
        elif nh == IPV6_EXT_FRAGMENT:
            if at + 8 > len(pkt):
                return -1, at, 0
            frag_offset = int.from_bytes(pkt[at + 2 : at + 4], "big") >> 3
            nh, at = pkt[at], at + 8
            if frag_offset:
                return nh, at, frag_offset
        elif nh == IPV6_EXT_AH and through_ah:
            if at + 2 > len(pkt):
                return -1, at, 0
            nh, at = pkt[at], at + (pkt[at + 1] + 2) * 4
        else:
            return (nh, at, 0) if at <= len(pkt) else (-1, at, 0)
    return -1, at, 0


def _tcp_mss_option(options: bytes) -> int:
    """Offset of the MSS value within the TCP options, -1 if there is none (RFC 9293 §3.1:
    End of Option List, No-Operation, and kind-length-value for every other kind). A
    malformed list (a length under 2 or past the end) stops the walk: nothing is changed."""
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == TCP_OPT_EOL:
            break
        if kind == TCP_OPT_NOP:
            i += 1
            continue
        if i + 1 >= len(options):
            break
        opt_len = options[i + 1]
        if opt_len < 2 or i + opt_len > len(options):
            break
        if kind == TCP_OPT_MSS:
            return i + 2 if opt_len == TCP_OPT_MSS_LEN else -1
        i += opt_len
    return -1


def _swap16(v: I64) -> I64:
    swapped: I64 = ((v & 0xFF) << 8) | (v >> 8)
    return swapped


# ============================================================================ MSS clamping
def clamp_mss(batch: Batch, mss_v4: PerPacket, mss_v6: PerPacket, mark: int = 0) -> int:
    """Lower the MSS option of passing TCP SYNs (SYN and SYN-ACK) to the limit for their
    IP version, fixing the TCP checksum incrementally (RFC 1624 eqn. 3); returns how many
    were lowered, and sets ``mark`` in their metadata flags.

    Limits are an int or one value per packet (packets of different SAs see different
    overheads). The common layout (IPv4 with or without options, IPv6 without extension
    headers, MSS as the first option) is handled for the whole batch at once; other option
    orders walk the options (RFC 9293 §3.1) and IPv6 extension headers are stepped over per
    packet. Non-first fragments, AH-protected segments, malformed options and truncated
    headers are left as they are.
    """
    n = batch.count
    if n == 0:
        return 0
    meta, data = batch.meta, batch.data
    live = _passing(batch)
    off = meta["offset"][live].astype(np.int64)
    if off.size == 0:
        return 0
    ip = _peek(batch, off, _PEEK_IP_FIXED)
    b0, next6 = ip[:, 0], ip[:, 6]
    version = b0 >> 4
    v6 = version == 6
    # Only TCP needs a look (for IPv6, maybe behind extension headers): most batches carry
    # none, and are done after this glance at the protocol fields.
    if not np.count_nonzero(np.where(v6, _TCP_OR_EXT6[next6], ip[:, 9] == PROTO_TCP)):
        return 0
    tcp_at = _TCP_AT[b0]  # IPv6 extension headers: walked below
    # Most packets are not SYNs: look at the flags alone before reading more.
    flags = data[np.minimum(off + tcp_at + TCP_FLAGS_AT, data.shape[0] - 1)]
    syn = (flags & TCP_SYN) != 0
    ext6 = v6 & _IS_EXT6[next6]
    if not np.count_nonzero(syn | ext6):
        return 0
    length = meta["length"][live].astype(np.int64)
    # A non-first fragment (offset bits in bytes 6-7) has no TCP header.
    v4 = (version == 4) & (ip[:, 9] == PROTO_TCP) & (tcp_at >= IPV4_HDR_LEN) & (
        ((ip[:, 6] & (IPV4_OFFSET_MASK >> 8)) | ip[:, 7]) == 0)
    cand = v4 | (v6 & (next6 == PROTO_TCP))
    for j in np.flatnonzero(ext6).tolist():  # rare: extension headers
        pkt = data[off[j] : off[j] + length[j]].tobytes()
        # Not through AH: changing the MSS would break its ICV (RFC 4302 §3.3.3).
        proto, at, frag_offset = _ipv6_upper(pkt, through_ah=False)
        if proto == PROTO_TCP and not frag_offset:
            cand[j], tcp_at[j] = True, at
            syn[j] = data[min(int(off[j]) + at + TCP_FLAGS_AT, data.shape[0] - 1)] & TCP_SYN
    c = np.flatnonzero(cand & syn)
    if c.size == 0:
        return 0
    # The segment ends at the IP length: bytes past it are link-layer padding.
    seg_end = np.minimum(length[c], np.where(v4[c], _be16(ip[c], 2),
                                             IPV6_HDR_LEN + _be16(ip[c], 4)))
    tcp_start = off[c] + tcp_at[c]
    tcp = _peek(batch, tcp_start, _PEEK_TCP)
    doff = (tcp[:, 12] >> 4).astype(np.int64) * 4
    # A SYN with options, whose header lies wholly inside the packet.
    syn = (doff > TCP_HDR_LEN) & (tcp_at[c] + doff <= seg_end)
    if not syn.any():
        return 0
    first = syn & (tcp[:, 20] == TCP_OPT_MSS) & (tcp[:, 21] == TCP_OPT_MSS_LEN)
    mss_at = np.where(first, TCP_MSS_FIRST_AT, -1)  # from the start of the TCP header
    for k in np.flatnonzero(syn & ~first).tolist():  # rare: another option comes first
        start = int(tcp_start[k]) + TCP_HDR_LEN
        pos = _tcp_mss_option(data[start : int(tcp_start[k]) + int(doff[k])].tobytes())
        if pos >= 0:
            mss_at[k] = TCP_HDR_LEN + pos
    hit = np.flatnonzero(mss_at >= 0)
    if hit.size == 0:
        return 0
    at_rel = mss_at[hit]
    value_at = tcp_start[hit] + at_rel
    old = (data[value_at].astype(np.int64) << 8) | data[value_at + 1]
    pkt_index = c[hit] if isinstance(live, slice) else live[c[hit]]
    limit = np.where(v6[c[hit]], _per_packet(mss_v6, n, "mss_v6")[pkt_index],
                     _per_packet(mss_v4, n, "mss_v4")[pkt_index]).clip(0, 0xFFFF)
    lower = old > limit
    if not lower.any():
        return 0
    value_at, old, new = value_at[lower], old[lower], limit[lower]
    csum_at = tcp_start[hit][lower] + TCP_CHECKSUM_AT
    # The checksum sums 16-bit words from the start of the segment (the pseudo-header is
    # 12 or 40 bytes: even). A value at an odd offset straddles two words and adds in
    # byte-swapped (RFC 1071 §2(B): the sum is byte-order independent).
    odd = (at_rel[lower] & 1) == 1
    m_old = np.where(odd, _swap16(old), old)
    m_new = np.where(odd, _swap16(new), new)
    hc = (data[csum_at].astype(np.int64) << 8) | data[csum_at + 1]
    # RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m').
    csum = ~_fold((~hc & 0xFFFF) + (~m_old & 0xFFFF) + m_new) & 0xFFFF
    data[value_at] = new >> 8
    data[value_at + 1] = new & 0xFF
    data[csum_at] = csum >> 8
    data[csum_at + 1] = csum & 0xFF
    if mark:
        meta["flags"][pkt_index[lower]] |= mark
    return int(lower.sum())


# ============================================================================ too big
def too_big(batch: Batch, limit: PerPacket) -> Mask:
    """Passing packets longer than ``limit`` (the inner MTU: an int or one per packet)."""
    n = batch.count
    meta = batch.meta
    bound = limit if isinstance(limit, int) else _per_packet(limit, n, "limit")
    over: Mask = (meta["verdict"][:n] == _PASS) & (meta["length"][:n].astype(np.int64) > bound)
    return over


def icmp_too_big(batch: Batch, mask: Mask, mtu: PerPacket,
                 src_v4: ipaddress.IPv4Address | None, src_v6: ipaddress.IPv6Address | None,
                 *, max_errors: int | None = None) -> list[bytes]:
    """Drop the packets of ``mask`` that must not be fragmented, and build the ICMP errors
    that tell their sources the MTU; returns the errors, ready to send inside.

    Dropped (verdict ``TOO_BIG``): IPv4 with DF set, and IPv6 longer than
    ``max(mtu, 1280)`` (routers never fragment IPv6, RFC 8200 §5). IPv4 without DF stays
    PASS: its outer packet is fragmented after encapsulation (``fragment_ipv4``). IPv6
    packets of at most 1280 bytes stay PASS too, and a Packet Too Big never says less than
    1280 (RFC 8200 §5): below that the tunnel fragments (RFC 4213 §3.2 does the same).

    Each drop is answered, from ``src_v4`` / ``src_v6`` (None: no errors for that family),
    except errors about ICMP errors, non-first fragments and packets whose source is not one
    host (RFC 1122 §3.2.2, RFC 1812 §4.3.2.7, RFC 4443 §2.4(e)). ``max_errors`` bounds the
    errors built per call (RFC 1812 §4.3.2.8, RFC 4443 §2.4(f): rate-limited; the caller
    owns the clock and the budget).

    ICMPv4: type 3 code 4 with the next-hop MTU (RFC 1191 §4), quoting as much of the packet
    as fits in 576 bytes (RFC 1812 §4.3.2.3). ICMPv6: Packet Too Big (RFC 4443 §3.2),
    quoting as much as fits in 1280 bytes (§2.4(c)).
    """
    n = batch.count
    meta, data = batch.meta, batch.data
    sel = np.flatnonzero(mask[:n] & (meta["verdict"][:n] == _PASS))
    if sel.size == 0:
        return []
    off = meta["offset"][sel].astype(np.int64)
    length = meta["length"][sel].astype(np.int64)
    mtu_of = _per_packet(mtu, n, "mtu")[sel]
    h = _peek(batch, off, _PEEK_IP)
    version = h[:, 0] >> 4
    v4 = (version == 4) & (length >= IPV4_HDR_LEN)
    v6 = (version == 6) & (length >= IPV6_HDR_LEN)
    frag = _be16(h, 6)
    mtu6 = np.maximum(mtu_of, IPV6_MIN_MTU)
    drop4 = v4 & ((frag & IPV4_DF) != 0)
    drop6 = v6 & (length > mtu6)
    drop = drop4 | drop6
    if not drop.any():
        return []
    meta["verdict"][sel[drop]] = Verdict.TOO_BIG

    # IPv4 (RFC 1122 §3.2.2): not about a non-first fragment, an ICMP error, a broadcast
    # or multicast destination, or a source that is not one host (0/8, 127/8, 224/3).
    ihl = (h[:, 0].astype(np.int64) & 0xF) * 4
    icmp_type4 = data[np.minimum(off + ihl, data.shape[0] - 1)]
    icmp_err4 = (h[:, 9] == PROTO_ICMP) & ((length <= ihl) | ~_ICMP4_QUERY[icmp_type4])
    answer4 = drop4 & (ihl >= IPV4_HDR_LEN) & ((frag & IPV4_OFFSET_MASK) == 0) & ~icmp_err4 & (
        h[:, 16] < 224) & (h[:, 12] != 0) & (h[:, 12] != 127) & (h[:, 12] < 224)
    # IPv6 (RFC 4443 §2.4(e)): not about an ICMPv6 error or Redirect, nor to an unspecified,
    # loopback or multicast source. A multicast destination is answered: PTB is the exception
    # of (e.3). Non-first fragments are not answered either.
    src6 = h[:, 8:24]
    unspecified = ~src6[:, :15].any(axis=1) & (src6[:, 15] <= 1)  # :: and ::1
    upper = h[:, 6].astype(np.int64)
    upper_at = np.full(sel.size, IPV6_HDR_LEN, dtype=np.int64)
    for j in np.flatnonzero(drop6 & _IS_EXT6[h[:, 6]]).tolist():  # rare: extension headers
        proto, at, frag_offset = _ipv6_upper(data[off[j] : off[j] + length[j]].tobytes())
        upper[j], upper_at[j] = (proto, at) if not frag_offset else (-1, at)
    icmp_type6 = data[np.minimum(off + upper_at, data.shape[0] - 1)]
    icmp_err6 = (upper == PROTO_ICMPV6) & ((length <= upper_at) | _ICMP6_NO_ERROR[icmp_type6])
    answer6 = drop6 & (upper >= 0) & ~icmp_err6 & ~unspecified & (src6[:, 0] != 0xFF)
    if src_v4 is None:
        answer4[:] = False
    if src_v6 is None:
        answer6[:] = False

    errors: list[bytes] = []
    budget = sel.size if max_errors is None else max_errors
    for j in np.flatnonzero(answer4 | answer6)[: max(budget, 0)].tolist():
        start, size = int(off[j]), int(length[j])
        if answer4[j]:
            assert src_v4 is not None
            ip_len = int(_be16(h[j : j + 1], 2)[0])
            quote_len = min(size, ip_len if ip_len >= int(ihl[j]) else size,
                            ICMP4_ERROR_MAX - IPV4_HDR_LEN - ICMP_HDR_LEN)
            quote = data[start : start + quote_len].tobytes()
            errors.append(_icmp4_frag_needed(quote, int(mtu_of[j]), src_v4.packed))
        else:
            assert src_v6 is not None
            quote_len = min(size, ICMP6_ERROR_MAX - IPV6_HDR_LEN - ICMP_HDR_LEN)
            quote = data[start : start + quote_len].tobytes()
            errors.append(_icmp6_packet_too_big(quote, int(mtu6[j]), src_v6.packed))
    return errors


def _icmp4_frag_needed(quote: bytes, mtu: int, src: bytes) -> bytes:
    """IPv4 + ICMP "fragmentation needed and DF set" to the quoted packet's source."""
    # RFC 1191 §4: unused (16 bits), Next-Hop MTU (16 bits).
    icmp = bytearray(struct.pack("!BBHHH", ICMP4_DEST_UNREACHABLE, ICMP4_FRAG_NEEDED, 0, 0,
                                 min(mtu, 0xFFFF)))
    icmp += quote
    icmp[2:4] = _checksum(bytes(icmp)).to_bytes(2, "big")
    # DF set: an atomic datagram, whose Identification may be zero (RFC 6864 §4.1).
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, ICMP4_TOS,
                                   IPV4_HDR_LEN + len(icmp), 0, IPV4_DF, ICMP_TTL, PROTO_ICMP,
                                   0, src, quote[12:16]))
    header[10:12] = _checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header + icmp)


def _icmp6_packet_too_big(quote: bytes, mtu: int, src: bytes) -> bytes:
    """IPv6 + ICMPv6 Packet Too Big (RFC 4443 §3.2) to the quoted packet's source."""
    dst = quote[8:24]
    icmp = bytearray(struct.pack("!BBHI", ICMP6_PACKET_TOO_BIG, 0, 0, mtu)) + quote
    # RFC 4443 §2.3: the checksum covers the RFC 8200 §8.1 pseudo-header.
    pseudo = src + dst + struct.pack("!I3xB", len(icmp), PROTO_ICMPV6)
    icmp[2:4] = _checksum(pseudo + bytes(icmp)).to_bytes(2, "big")
    header = struct.pack("!IHBB16s16s", 0x60000000, len(icmp), PROTO_ICMPV6, ICMP_TTL, src,
                         dst)
    return header + bytes(icmp)


# ============================================================================ fragmentation
def _copied_options(options: bytes) -> bytes:
    """The options that go into every fragment (copy flag set, RFC 791 §3.1), padded with
    End of Option List to a 32-bit boundary."""
    out = bytearray()
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == IPV4_OPT_EOL:
            break
        if kind == IPV4_OPT_NOP:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2 or i + options[i + 1] > len(options):
            raise ValueError("malformed IPv4 options")
        if kind & IPV4_OPT_COPIED:
            out += options[i : i + options[i + 1]]
        i += options[i + 1]
    out += bytes(-len(out) % 4)
    return bytes(out)


def fragment_ipv4(packet: bytes, mtu: int) -> list[bytes]:
    """Fragment an IPv4 packet to ``mtu`` (RFC 791 §3.2, "An Example Fragmentation
    Procedure"); a packet that fits is returned alone.

    Every fragment but the last carries a multiple of 8 data bytes and MF; all keep the
    Identification; offsets add to the packet's own (a fragment can be fragmented again);
    the first fragment keeps every option, later ones only those with the copy flag. For
    our own outer packets: a DF packet, a malformed one or an MTU under 68 raises
    ``ValueError``."""
    if len(packet) < IPV4_HDR_LEN or packet[0] >> 4 != 4:
        raise ValueError("not an IPv4 packet")
    ihl = (packet[0] & 0xF) * 4
    total = int.from_bytes(packet[2:4], "big")
    if ihl < IPV4_HDR_LEN or total < ihl or total > len(packet):
        raise ValueError("malformed IPv4 header")
    packet = packet[:total]
    if total <= mtu:
        return [packet]
    if mtu < IPV4_MIN_MTU:
        raise ValueError(f"MTU {mtu} is below the IPv4 minimum of {IPV4_MIN_MTU} (RFC 791)")
    flags_offset = int.from_bytes(packet[6:8], "big")
    if flags_offset & IPV4_DF:
        raise ValueError("DF is set: the packet must not be fragmented (RFC 791 §3.2)")
    header, payload = packet[:ihl], packet[ihl:]
    later = bytearray(header[:IPV4_HDR_LEN]) + _copied_options(header[IPV4_HDR_LEN:])
    later[0] = 0x40 | len(later) // 4
    base_offset = flags_offset & IPV4_OFFSET_MASK
    last_mf = flags_offset & IPV4_MF  # a fragment being fragmented keeps MF on its last piece
    keep = flags_offset & IPV4_RESERVED
    fragments: list[bytes] = []
    pos = 0
    while pos < len(payload):
        hdr = bytearray(header) if pos == 0 else bytearray(later)
        room = (mtu - len(hdr)) // 8 * 8
        chunk = payload[pos : pos + room]
        more = pos + len(chunk) < len(payload)
        offset = base_offset + pos // 8
        if offset > IPV4_OFFSET_MASK:
            raise ValueError("fragment offset overflows 13 bits")
        hdr[2:4] = (len(hdr) + len(chunk)).to_bytes(2, "big")
        hdr[6:8] = (keep | (IPV4_MF if more else last_mf) | offset).to_bytes(2, "big")
        hdr[10:12] = b"\0\0"
        hdr[10:12] = _checksum(bytes(hdr)).to_bytes(2, "big")
        fragments.append(bytes(hdr) + chunk)
        pos += len(chunk)
    return fragments
