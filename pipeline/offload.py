"""Offloads: the virtio-net header, TCP and UDP segmentation of what the kernel hands over in
one piece, and TCP coalescing of what goes back (sans-IO; pipeline/tun.py does the reads and
writes, pipeline/afpacket.py reads GSO frames of an inside ring the same way).

Without offloads, a TUN device takes and gives one IP packet per syscall, and the kernel's
TCP runs once per packet on both ends of the tunnel: on the 2-core lab VM a TUN write of one
1400-byte segment, inner TCP receive included, cost about 7.7 µs and a read about 3 µs. With
``IFF_VNET_HDR`` and ``TUNSETOFFLOAD`` (TSO), every read and write starts with a
``struct virtio_net_hdr`` (<linux/virtio_net.h>; virtio spec 1.x §5.1.6.2), and:

* a read may return one TCP packet of up to 64 KiB (GSO) that the kernel would otherwise have
  cut into MSS-sized segments: :class:`Superpacket` cuts it here, as the kernel's TCP
  segmentation would (RFC 9293 §3.1 header fields: sequence numbers advance by the segment
  size; FIN and PSH only on the last segment, CWR only on the first; IPv4 identification
  advances by one per segment, RFC 791 §3.1 / RFC 6864), into the slots of a batch; with
  USO (Linux 6.2+), a UDP sender's ``UDP_SEGMENT`` send likewise becomes its datagrams;
* a read may also return a packet whose TCP or UDP checksum the sender left partial
  (``VIRTIO_NET_HDR_F_NEEDS_CSUM``: the field holds the pseudo-header sum,
  ``csum_start``/``csum_offset`` say where the sum starts and where it goes), which
  :func:`complete_checksums` completes: the tunnel's peer gets whole packets;
* a write may carry several consecutive segments of one TCP connection as one packet with a
  GSO header (:func:`coalesce`): the kernel receives (or forwards) them as one, as a NIC's
  GRO would have. Segments are coalesced only if their checksums verify, so a corrupted
  segment is still dropped by the kernel, alone.

The Internet checksum (RFC 1071) is computed two ways: vectorized over rows of a batch (sums
of 32-bit little-endian words modulo 0xFFFF; RFC 1071 §2(A)/(B): the sum is independent of
word size, and of byte order up to a swap, here a factor of 256), and for one packet in
plain Python, as the packet read as one big-endian integer modulo 0xFFFF (2^16 ≡ 1).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from workers import vec

__all__ = [
    "F_DATA_VALID",
    "F_NEEDS_CSUM",
    "GSO_ECN",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "GSO_UDP_L4",
    "NO_OFFLOAD",
    "VNET_HDR",
    "VNET_HDR_LEN",
    "OffloadError",
    "Run",
    "Superpacket",
    "coalesce",
    "complete_checksums",
    "ones_sum",
    "run_header",
]

# struct virtio_net_hdr, in the host's byte order (a TUN device without TUNSETVNETLE/BE).
VNET_HDR = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size
F_NEEDS_CSUM = 0x01
F_DATA_VALID = 0x02
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_UDP_L4 = 5  # a UDP sender's UDP_SEGMENT (and UDP GRO): datagrams of gso_size
GSO_ECN = 0x80
NO_OFFLOAD = bytes(VNET_HDR_LEN)  # a plain packet, checksums whole

# RFC 9293 §3.1 TCP header: offsets within it.
TCP_SEQ = 4
TCP_DOFF = 12
TCP_FLAGS = 13
TCP_CSUM = 16
TCP_MIN = 20
FIN, PSH, ACK, CWR = 0x01, 0x08, 0x10, 0x80
PROTO_TCP = 6
PROTO_UDP = 17
UDP_LEN = 4  # RFC 768: length and checksum offsets in the UDP header
UDP_CSUM = 6
UDP_HDR = 8
IPV4_MIN = 20
IPV6_LEN = 40
MAX_IP_PAYLOAD = 0xFFFF  # IPv4 total length / IPv6 payload length field

Buf = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]


class OffloadError(ValueError):
    """A packet the kernel handed over that cannot be segmented (dropped and counted)."""


# --- the Internet checksum (RFC 1071) ---------------------------------------------------------
def ones_sum(data: bytes | bytearray | memoryview | Buf, initial: int = 0) -> int:
    """The 16-bit one's-complement sum of ``data`` (big-endian words, an odd last byte padded
    with zero) plus ``initial``, folded; in [0, 0xFFFF], 0xFFFF for any non-zero sum that
    folds to zero."""
    n = int.from_bytes(data, "big")
    if len(data) % 2:
        n <<= 8
    n += initial
    if not n:
        return 0
    s = n % 0xFFFF
    return s or 0xFFFF


_PAD = np.arange(3)


def row_sums(data: Buf, starts: I64, widths: I64, stride: int) -> I64:
    """One's-complement sums of ``data[starts[i] : starts[i] + widths[i]]`` (big-endian
    words), modulo 0xFFFF: in [0, 0xFFFE], 0 standing for a sum of all ones.

    Rows are read as 32-bit little-endian words: each row must start 4-byte aligned and lie,
    with three more bytes, within one ``stride``-long slot of ``data`` (a batch's slots: the
    tailroom holds them); those three bytes after each row are zeroed. A word counts as its
    two halves (2^16 ≡ 1 modulo 0xFFFF) and a little-endian sum times 256 is the big-endian
    one (RFC 1071 §2(B)). Rows of equal width at equal slot offsets are summed with one numpy
    call.
    """
    n = len(starts)
    if not n:
        return np.zeros(0, dtype=np.int64)
    if (starts & 3).any():
        raise ValueError("rows must start 4-byte aligned")
    data[(starts + widths)[:, None] + _PAD] = 0
    words = np.ndarray((data.shape[0] // stride, stride // 4), dtype="<u4", buffer=data,
                       strides=(stride, 4))
    slot, col = np.divmod(starts, stride)
    key = (col >> 2) * 65536 + ((widths + 3) >> 2)
    first = int(key[0])
    if (key == first).all():
        c, w = first >> 16, first & 0xFFFF
        sums = words[slot, c:c + w].sum(axis=1, dtype=np.uint64)
    else:
        sums = np.zeros(n, dtype=np.uint64)
        for k in np.unique(key).tolist():
            sel = key == k
            c, w = k >> 16, k & 0xFFFF
            sums[sel] = words[slot[sel], c:c + w].sum(axis=1, dtype=np.uint64)
    out: I64 = (sums % 0xFFFF).astype(np.int64) * 256 % 0xFFFF
    return out


def complete_checksums(data: Buf, offsets: I64, lengths: I64, csum_start: I64,
                       csum_offset: I64, stride: int) -> npt.NDArray[np.bool_]:
    """Complete partial checksums in place (``F_NEEDS_CSUM``): the sum from ``csum_start`` to
    the packet's end, the field at ``csum_start + csum_offset`` holding the pseudo-header
    sum, is complemented into that field (0 written as 0xFFFF: RFC 768 reserves 0 for "no
    checksum", and for TCP both are the same one's-complement zero).

    Returns which packets were completed; the others (the field beyond the packet, a start
    not 4-byte aligned in its slot) are left as they were.
    """
    field = csum_start + csum_offset
    starts = offsets + csum_start
    ok: npt.NDArray[np.bool_] = (field + 2 <= lengths) & ((starts & 3) == 0)
    if ok.all():
        at, sums = offsets + field, row_sums(data, starts, lengths - csum_start, stride)
    elif ok.any():
        at = offsets[ok] + field[ok]
        sums = row_sums(data, starts[ok], lengths[ok] - csum_start[ok], stride)
    else:
        return ok
    # ~sum, never 0: a sum of all ones gives 0xFFFF, as UDP wants (RFC 768: 0 is "none").
    csum = 0xFFFF - sums
    data[at] = csum >> 8
    data[at + 1] = csum & 0xFF
    return ok


# --- segmentation (reads) ---------------------------------------------------------------------
@lru_cache(maxsize=16)
def _fields(v6: bool, udp: bool, l4: int, header: int) -> np.dtype[np.void]:
    """The header fields a segment changes, as a record over its first ``header`` bytes."""
    if udp:
        names, formats = ["l4_sum", "udp_len"], [">u2", ">u2"]
        offsets = [l4 + UDP_CSUM, l4 + UDP_LEN]
    else:
        names, formats = ["l4_sum", "seq", "flags"], [">u2", ">u4", "u1"]
        offsets = [l4 + TCP_CSUM, l4 + TCP_SEQ, l4 + TCP_FLAGS]
    if v6:
        names.append("ip6_len")
        formats.append(">u2")
        offsets.append(4)
    else:
        names += ["ip_len", "ip_id", "ip_sum"]
        formats += [">u2", ">u2", ">u2"]
        offsets += [2, 4, 10]
    return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                     "itemsize": header})


_KINDS = {GSO_TCPV4: (False, PROTO_TCP), GSO_TCPV6: (True, PROTO_TCP),
          GSO_UDP_L4: (None, PROTO_UDP)}


@dataclass
class Superpacket:
    """A TCP or UDP packet larger than the path allows, read with a GSO header, cut on
    demand.

    ``packet`` is its own copy (the slots it is cut into may be where it was read).
    Segment ``k`` gets payload bytes ``k * mss ..``, and IPv4 identification ``id + k``;
    TCP: sequence number ``seq + k * mss``, FIN/PSH only if last, CWR only if first
    (RFC 9293 §3.1, as the kernel's TCP segmentation); UDP (``GSO_UDP_L4``, the sender's
    UDP_SEGMENT): its own length, a datagram each (RFC 768). Checksums are computed whole
    from sums modulo 0xFFFF: the header's constant part once, then per segment its
    payload's sum and the fields that change.
    """

    packet: Buf
    v6: bool
    udp: bool
    l4: int  # offset of the TCP or UDP header
    header: int  # IP + TCP/UDP header length
    mss: int  # payload bytes per segment (gso_size)
    count: int  # segments in all
    template: Buf  # the headers with the fields that change zeroed
    l4_base: int  # sum of the template's L4 header and the pseudo-header's addresses
    ip_base: int  # sum of the template's IPv4 header
    seq: int
    ident: int
    flags: int
    done: int = 0  # segments emitted so far

    @classmethod
    def parse(cls, packet: Buf, gso_type: int, gso_size: int, room: int) -> Superpacket:
        """Check a GSO packet and how it is to be cut; ``room``: the longest segment a slot
        takes. Raises :class:`OffloadError`."""
        kind = gso_type & ~GSO_ECN
        if kind not in _KINDS:
            raise OffloadError(f"GSO type {gso_type:#x} is neither TCP nor UDP")
        want_v6, proto = _KINDS[kind]
        length = packet.shape[0]
        version = int(packet[0]) >> 4 if length else 0
        name = "UDP" if proto == PROTO_UDP else "TCPv6" if want_v6 else "TCPv4"
        if want_v6 is not None and version != (6 if want_v6 else 4):
            raise OffloadError(f"{name} GSO packet is not IPv{6 if want_v6 else 4}")
        if version == 4 and length >= IPV4_MIN:
            l4 = int(packet[0] & 0xF) * 4
            if l4 < IPV4_MIN or packet[9] != proto or (packet[6] & 0x3F) or packet[7]:
                raise OffloadError(f"{name} GSO packet is not an unfragmented {name[:3]} "
                                   "packet")
        elif version == 6 and length >= IPV6_LEN:
            if packet[6] != proto:
                raise OffloadError(f"{name} GSO packet is not IPv6 + {name[:3]} "
                                   "(extension headers?)")
            l4 = IPV6_LEN
        else:
            raise OffloadError(f"{name} GSO packet is not an IP packet")
        if proto == PROTO_UDP:
            if length < l4 + UDP_HDR:
                raise OffloadError("GSO packet shorter than its headers")
            header = l4 + UDP_HDR
        else:
            if length < l4 + TCP_MIN:
                raise OffloadError("GSO packet shorter than its headers")
            header = l4 + int(packet[l4 + TCP_DOFF] >> 4) * 4
            if header < l4 + TCP_MIN:
                raise OffloadError("GSO packet with a bad TCP header or segment size")
        payload = length - header
        if payload < 0 or gso_size <= 0:
            raise OffloadError("GSO packet with a bad TCP header or segment size")
        if header + gso_size > room:
            raise OffloadError(f"GSO segments of {header + gso_size} bytes exceed a slot")
        count = max(1, -(-payload // gso_size))
        raw = packet[:header].tobytes()
        t = bytearray(raw)
        seq = flags = 0
        if proto == PROTO_UDP:
            t[l4 + UDP_LEN:l4 + UDP_CSUM + 2] = bytes(4)
        else:
            seq = int.from_bytes(raw[l4 + TCP_SEQ:l4 + TCP_SEQ + 4], "big")
            flags = raw[l4 + TCP_FLAGS]
            t[l4 + TCP_SEQ:l4 + TCP_SEQ + 4] = bytes(4)
            t[l4 + TCP_FLAGS] = 0
            t[l4 + TCP_CSUM:l4 + TCP_CSUM + 2] = bytes(2)
        v6 = version == 6
        if v6:
            t[4:6] = bytes(2)
            ident, ip_base = 0, 0
            addrs = t[8:40]
        else:
            ident = int.from_bytes(raw[4:6], "big")
            t[2:6] = bytes(4)
            t[10:12] = bytes(2)
            ip_base = ones_sum(t[:l4])
            addrs = t[12:20]
        l4_base = ones_sum(t[l4:], ones_sum(addrs, proto))
        return cls(packet, v6, proto == PROTO_UDP, l4, header, gso_size, count,
                   np.frombuffer(bytes(t), dtype=np.uint8), l4_base, ip_base, seq, ident,
                   flags)

    @property
    def remaining(self) -> int:
        return self.count - self.done

    def emit(self, data: Buf, first: int, stride: int, limit: int) -> list[int]:
        """Write the next segments (at most ``limit``) at ``first``, ``first + stride``, ...
        (4-byte aligned, each in a slot of ``stride`` bytes with 3 bytes to spare after the
        segment) with their headers fixed and checksums whole; return their lengths."""
        m = min(limit, self.remaining)
        if m <= 0:
            return []
        if first % 4 or stride % 4:
            raise ValueError("segments go to 4-byte aligned slots")
        pkt, hl, mss, l4 = self.packet, self.header, self.mss, self.l4
        s0 = self.done
        last = s0 + m == self.count
        tail = pkt.shape[0] - hl - (self.count - 1) * mss  # the very last segment's payload
        full = m - 1 if last and tail != mss else m
        rows = np.ndarray((m, hl + mss + 3), dtype=np.uint8, buffer=data, offset=first,
                          strides=(stride, 1))
        rows[:, :hl] = self.template
        rows[:, hl + mss:] = 0  # pads for the word sums
        start = hl + s0 * mss
        words = (mss + 3) // 4
        if full:
            rows[:full, hl:hl + mss] = pkt[start:start + full * mss].reshape(full, mss)
            sums = np.ndarray((full, words), dtype="<u4", buffer=data, offset=first + hl,
                              strides=(stride, 4)).sum(axis=1, dtype=np.uint64)
        else:
            sums = np.zeros(0, dtype=np.uint64)
        if full < m:
            row = rows[m - 1]
            row[hl:hl + tail] = pkt[pkt.shape[0] - tail:]
            row[hl + tail:hl + tail + 3] = 0
            at = first + (m - 1) * stride + hl
            last_sum = np.ndarray(((tail + 3) // 4,), dtype="<u4", buffer=data,
                                  offset=at).sum(dtype=np.uint64)
            sums = np.append(sums, last_sum)
        plen = np.full(m, mss, dtype=np.int64)
        if full < m:
            plen[-1] = tail
        seg = np.arange(s0, s0 + m, dtype=np.int64)
        fields = np.ndarray((m,), dtype=_fields(self.v6, self.udp, l4, hl), buffer=data,
                            offset=first, strides=(stride,))
        l4_len = hl - l4 + plen
        # RFC 1071 sums modulo 0xFFFF: 2^16 ≡ 1, so a 32-bit word counts as its two
        # halves, and a little-endian sum times 256 is the big-endian one. The L4 length
        # counts in the pseudo-header, and for UDP in its own header too.
        total = (sums % 0xFFFF).astype(np.int64) * 256 + self.l4_base + l4_len
        if self.udp:
            fields["udp_len"] = l4_len
            total += l4_len
        else:
            seq = (self.seq + seg * mss) & 0xFFFFFFFF
            flags = np.full(m, self.flags & ~(FIN | PSH | CWR) & 0xFF, dtype=np.int64)
            if s0 == 0:
                flags[0] = self.flags & ~(FIN | PSH) & 0xFF
            if last:
                flags[-1] = self.flags & ~CWR & 0xFF if m > 1 or s0 else self.flags
            fields["seq"] = seq
            fields["flags"] = flags
            total += seq + flags
        fields["l4_sum"] = 0xFFFF - total % 0xFFFF  # never 0: UDP's "no checksum"
        if self.v6:
            fields["ip6_len"] = l4_len
        else:
            ident = (self.ident + seg) & 0xFFFF
            fields["ip_len"] = hl + plen
            fields["ip_id"] = ident
            fields["ip_sum"] = 0xFFFF - (self.ip_base + hl + plen + ident) % 0xFFFF
        self.done += m
        lengths: list[int] = (hl + plen).tolist()
        return lengths


def complete_one(mv: memoryview, off: int, length: int, start: int, field: int) -> bool:
    """:func:`complete_checksums` for one packet, in plain Python; False if the field lies
    beyond the packet (left as it is)."""
    if start + field + 2 > length:
        return False
    csum = 0xFFFF - ones_sum(mv[off + start:off + length])
    at = off + start + field
    mv[at:at + 2] = (csum or 0xFFFF).to_bytes(2, "big")
    return True


# --- coalescing (writes) ----------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """Packets ``first .. last`` (indices into the passing packets) to write as one."""

    first: int
    last: int


_GATHER = 128  # bytes of each packet compared: IPv6 (40) + the longest TCP header (60), padded
# Header bytes that may differ between segments of one run: IPv4 total length,
# identification and checksum, or IPv6 payload length; TCP sequence number, flags (PSH is
# checked apart) and checksum.
_VARYING = {IPV4_MIN: (2, 3, 4, 5, 10, 11), IPV6_LEN: (4, 5)}


@lru_cache(maxsize=4)
def _compared(l4: int) -> npt.NDArray[np.bool_]:
    keep = np.ones(_GATHER, dtype=bool)
    keep[list(_VARYING[l4])] = False
    keep[[l4 + TCP_SEQ + k for k in range(4)]] = False
    keep[[l4 + TCP_FLAGS, l4 + TCP_CSUM, l4 + TCP_CSUM + 1]] = False
    return keep


def _heads(data: Buf, offsets: I64, lengths: I64) -> Buf:
    """The first _GATHER bytes of each packet (what follows a short packet in its slot is
    read too, never compared: only header bytes are; past the buffer's end, zeros)."""
    if int(offsets.max()) + _GATHER <= data.shape[0]:
        return vec.peek(data, offsets, _GATHER)
    rows = vec.gather_masked(data, offsets, np.minimum(lengths, _GATHER))
    return np.pad(rows, ((0, 0), (0, _GATHER - rows.shape[1])))


def _joins(data: Buf, offsets: I64, lengths: I64, heads: Buf, l4: int, stride: int
           ) -> tuple[npt.NDArray[np.bool_], I64]:
    """For IP version ``l4`` (20: IPv4, 40: IPv6): whether packet i + 1 may follow packet i
    in a run, and each packet's header length."""
    h = heads
    if l4 == IPV4_MIN:
        ok = ((h[:, 0] == 0x45) & (h[:, 9] == PROTO_TCP) & ((h[:, 6] & 0x3F) == 0)
              & (h[:, 7] == 0) & (h[:, 2:4].view(">u2")[:, 0] == lengths))
        addrs = h[:, 12:20]
    else:
        ok = (((h[:, 0] >> 4) == 6) & (h[:, 6] == PROTO_TCP)
              & (h[:, 4:6].view(">u2")[:, 0] + IPV6_LEN == lengths))
        addrs = h[:, 8:40]
    doff = (h[:, l4 + TCP_DOFF] >> 4).astype(np.int64) * 4
    flags = h[:, l4 + TCP_FLAGS]
    header = l4 + doff
    ok &= ((doff >= TCP_MIN) & ((flags & (~(ACK | PSH) & 0xFF)) == 0) & ((flags & ACK) != 0)
           & (lengths > header) & (header <= _GATHER))
    if ok.sum() < 2:
        return np.zeros(len(offsets) - 1, dtype=bool), header
    # Checksums: only segments that verify are coalesced (the kernel drops the others).
    sel = np.flatnonzero(ok)
    pseudo = addrs[sel].view(">u2").sum(axis=1, dtype=np.int64) + PROTO_TCP + lengths[sel] - l4
    sums = row_sums(data, offsets[sel] + l4, lengths[sel] - l4, stride) + pseudo
    ok[sel] = sums % 0xFFFF == 0
    join = ok[:-1] & ok[1:] & (header[:-1] == header[1:])
    differ = (h[:-1] != h[1:]) & _compared(l4) & (np.arange(_GATHER) < header[:-1, None])
    join &= ~differ.any(axis=1)
    join &= ((flags[:-1] & PSH) == 0) & ((flags[:-1] | PSH) == (flags[1:] | PSH))
    seq = h[:, l4 + TCP_SEQ:l4 + TCP_SEQ + 4].view(">u4")[:, 0].astype(np.int64)
    join &= ((seq[:-1] + lengths[:-1] - header[:-1]) & 0xFFFFFFFF) == seq[1:]
    if l4 == IPV4_MIN:
        ident = h[:, 4:6].view(">u2")[:, 0].astype(np.int64)
        df = (h[:, 6] & 0x40) != 0
        join &= (df[:-1] & df[1:]) | (((ident[:-1] + 1) & 0xFFFF) == ident[1:])
    return join, header


def coalesce(data: Buf, offsets: I64, lengths: I64, stride: int) -> list[Run]:
    """Runs of two or more consecutive packets that one write may carry as one TCP packet
    with a GSO header: one connection (addresses, ports, every header byte but length,
    identification, checksums and sequence number equal, TCP options included, so ACK
    number and window too), sequence numbers following on, equal payloads but for a shorter
    last, PSH only on the last, IPv4 identification following on or DF set, checksums valid,
    at most 64 KiB in all. Packets must start 4-byte aligned (else nothing is coalesced)."""
    n = len(offsets)
    if n < 2 or (offsets % 4).any():
        return []
    heads = _heads(data, offsets, lengths)
    version = heads[:, 0] >> 4
    joins = np.zeros(n - 1, dtype=bool)
    header = np.zeros(n, dtype=np.int64)
    for v, l4 in ((4, IPV4_MIN), (6, IPV6_LEN)):
        mine = version == v
        if mine.sum() >= 2:
            pairs, hl = _joins(data, offsets, lengths, heads, l4, stride)
            joins |= pairs & mine[:-1]
            header = np.where(mine, hl, header)
    if not joins.any():
        return []
    runs: list[Run] = []
    join = joins.tolist()
    head = header.tolist()
    pay = (lengths - header).tolist()
    v6 = (version == 6).tolist()
    i = 0
    while i < n - 1:
        if not join[i]:
            i += 1
            continue
        size, total, j = pay[i], pay[i], i
        limit = MAX_IP_PAYLOAD - head[i] + (IPV6_LEN if v6[i] else 0)
        while j < n - 1 and join[j] and pay[j] == size and pay[j + 1] <= size \
                and total + pay[j + 1] <= limit:
            j += 1
            total += pay[j]
        if j > i:
            runs.append(Run(i, j))
        i = j + 1
    return runs


def run_header(data: Buf | memoryview, offset: int, header: int, l4: int, payload: int,
               gso_size: int, psh: bool) -> tuple[bytes, bytes]:
    """The virtio-net header and the IP + TCP header of a coalesced run: the first packet's
    headers (at ``offset``, ``header`` bytes, TCP at ``l4``) with the run's ``payload``
    length, PSH if the last had it, and the TCP checksum left partial (the pseudo-header
    sum) for the kernel's segmentation or receive path."""
    hdr = bytearray(bytes(data[offset:offset + header]))
    tcp_len = header - l4 + payload
    if l4 == IPV6_LEN:
        hdr[4:6] = (tcp_len + l4 - IPV6_LEN).to_bytes(2, "big")
        pseudo = ones_sum(hdr[8:40], PROTO_TCP + tcp_len)
        kind = GSO_TCPV6
    else:
        hdr[2:4] = (header + payload).to_bytes(2, "big")
        hdr[10:12] = b"\0\0"
        hdr[10:12] = (0xFFFF - ones_sum(hdr[:l4])).to_bytes(2, "big")
        pseudo = ones_sum(hdr[12:20], PROTO_TCP + tcp_len)
        kind = GSO_TCPV4
    if psh:
        hdr[l4 + TCP_FLAGS] |= PSH
    hdr[l4 + TCP_CSUM:l4 + TCP_CSUM + 2] = pseudo.to_bytes(2, "big")
    vnet = VNET_HDR.pack(F_NEEDS_CSUM, kind, header, gso_size, l4, TCP_CSUM)
    return vnet, bytes(hdr)
