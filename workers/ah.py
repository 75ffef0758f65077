"""AH (RFC 4302) encapsulation and decapsulation of whole batches, in place, sans-IO.

Header parsing and writing, mutable-field zeroing, lengths and checksums are done for the whole
batch with numpy; the HMAC (RFC 4868 HMAC-SHA2-256-128 / -384-192 / -512-256) runs once per
packet over the batch buffer itself, with the mutable fields zeroed in place for the call and
restored afterwards. Nothing in the per-packet path raises: each packet leaves with a verdict
(pipeline/batch.py ``Verdict``), and the caller counts them.

Packet layouts (RFC 4302 §3.1):

    tunnel:    [outer IPv4/IPv6][NH|Len|Rsvd|SPI|Seq|ICV|pad][inner packet]
    transport: [IP header (+ options)][NH|Len|Rsvd|SPI|Seq|ICV|pad][upper-layer payload]

IPv4 options and IPv6 extension headers (hop-by-hop, routing, destination options) are handled
by a per-packet Python path that only packets carrying them take. Outbound transport mode over
IPv6 refuses extension headers (``Verdict.UNSUPPORTED``): AH would have to go after them.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from pipeline.batch import Batch, Verdict
from pipeline.satable import Direction, Mode, Protocol
from workers import vec
from workers.sa import SaState, SaTable

__all__ = ["AhCodec", "ah_length"]

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
U32 = npt.NDArray[np.uint32]
U64 = npt.NDArray[np.uint64]
Mask = npt.NDArray[np.bool_]
# A byte range to overwrite for the ICV computation only: (offset, replacement bytes).
Patch = tuple[int, bytes]

# RFC 4302 §2: Next Header (1) + Payload Len (1) + Reserved (2) + SPI (4) + Sequence Number (4),
# followed by the ICV.
AH_FIXED_LEN = 12
AH_NEXT_HEADER = 0
AH_PAYLOAD_LEN = 1
AH_RESERVED = 2
AH_SPI = 4
AH_SEQ = 8
AH_ICV = AH_FIXED_LEN
# RFC 4302 §2.2: Payload Len is the AH length in 32-bit words minus 2.
AH_LEN_UNIT = 4
AH_LEN_BIAS = 2
# RFC 4302 §2.6: the AH header is a multiple of 32 bits over IPv4 and of 64 bits over IPv6.
AH_ALIGN_IPV4 = 4
AH_ALIGN_IPV6 = 8

IPV4_HDR_LEN = 20  # RFC 791, without options
IPV6_HDR_LEN = 40  # RFC 8200 §3
IPV4_MAX_TOTAL = 0xFFFF  # Total Length is 16 bits (RFC 791)
IPV6_MAX_PAYLOAD = 0xFFFF  # Payload Length is 16 bits; jumbograms are not handled (RFC 2675)
IPV4_PROTO = 9  # offset of the Protocol field
IPV4_TOTAL_LEN = 2
IPV4_FLAGS_FRAG = 6
IPV4_MF_AND_OFFSET = 0x3FFF  # More Fragments + Fragment Offset (RFC 791)
IPV6_PAYLOAD_LEN = 4
IPV6_NEXT_HEADER = 6
NH_IPV4 = 4  # IANA protocol numbers: IPv4 and IPv6 encapsulated (RFC 4302 §3.1.2)
NH_IPV6 = 41
NH_AH = int(Protocol.AH)
# RFC 8200 §4: the extension headers AH may follow (RFC 4302 §3.1.1), and the fragment header.
NH_HOP_BY_HOP = 0
NH_ROUTING = 43
NH_FRAGMENT = 44
NH_DEST_OPTS = 60
# Other next headers (ESP, Mobility, ...) are payload that AH goes in front of and covers.
IPV6_SKIPPED_EXT = (NH_HOP_BY_HOP, NH_ROUTING, NH_DEST_OPTS)
IPV6_EXT_UNIT = 8  # Hdr Ext Len counts 8-octet units, not counting the first 8 (RFC 8200 §4.3)
MAX_EXT_HEADERS = 8  # bounds the per-packet walk; more is not a packet we authenticate
OUTER_TTL = 64

# RFC 4302 §3.3.3.1.1.1 / §3.3.3.1.2.1: mutable base header fields, as AND masks over a
# header's first 12 bytes. IPv4: DSCP+ECN (1), Flags+Fragment Offset (6-7), TTL (8), Header
# Checksum (10-11). IPv6: Traffic Class (low nibble of 0, high nibble of 1), Flow Label
# (rest of 1, 2-3), Hop Limit (7).
MUTABLE_SPAN = 12
_KEEP_IPV4 = np.array([0xFF, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0xFF, 0x00, 0x00],
                      dtype=np.uint8)
_KEEP_IPV6 = np.array([0xF0, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0x00, 0xFF, 0xFF, 0xFF, 0xFF],
                      dtype=np.uint8)

# RFC 4302 Appendix A.1: IPv4 options included in the ICV (by option type octet): End of
# Options List, No Operation, Security, Extended Security, Commercial Security, Router Alert,
# Sender Directed Multi-Destination Delivery. Every other option is zeroed as a whole.
IPV4_OPT_EOL = 0
IPV4_OPT_NOP = 1
IPV4_IMMUTABLE_OPTIONS = frozenset({0, 1, 130, 133, 134, 148, 149})
# Loose and Strict Source Route: "mutable but predictable" (RFC 4302 Appendix A.1): the
# sender computes the ICV over the final destination, the last address of the route.
IPV4_SOURCE_ROUTES = frozenset({131, 137})
IPV4_ADDR_LEN = 4
IPV4_DST = 16
IPV4_ROUTE_MIN_LEN = 3 + IPV4_ADDR_LEN  # type, length, pointer, one address
# RFC 8200 §4.2: option type bit 0x20 says the option data may change en route; RFC 4302
# §3.3.3.1.2.2 zeroes such data for the ICV.
IPV6_OPT_PAD1 = 0
IPV6_OPT_MAY_CHANGE = 0x20

ESN_HIGH_LEN = 4  # RFC 4302 §2.5.1, §3.4.4: appended after the packet for the ICV, never sent


def _align(n: int, block: int) -> int:
    return (n + block - 1) // block * block


def ah_length(icv_len: int, ipv6: bool) -> int:
    """Bytes of the AH header, ICV and its explicit padding (RFC 4302 §2.6)."""
    return _align(AH_FIXED_LEN + icv_len, AH_ALIGN_IPV6 if ipv6 else AH_ALIGN_IPV4)


def _fail(bad: I64, cond: Mask | np.bool_, verdict: Verdict) -> I64:
    """Set ``verdict`` where ``cond`` holds and no earlier reason was recorded."""
    return np.where((bad == Verdict.PASS) & cond, int(verdict), bad)


def _move(data: U8, src: I64, dst: I64, width: I64) -> None:
    """Copy ``width[i]`` bytes from ``src[i]`` to ``dst[i]`` (the ranges may overlap)."""
    cols = np.arange(int(width.max()) if width.size else 0)
    inside = cols[None, :] < width[:, None]
    data[(dst[:, None] + cols)[inside]] = data[(src[:, None] + cols)[inside]]


def _ipv4_option_patches(hdr: bytes, outbound: bool) -> tuple[Verdict, list[Patch]]:
    """ICV patches for an IPv4 header's options (RFC 4302 §3.3.3.1.1.2, Appendix A.1).

    ``hdr`` is the whole header (IHL * 4 bytes); patch offsets are relative to its start.
    """
    patches: list[Patch] = []
    i, ihl = IPV4_HDR_LEN, len(hdr)
    while i < ihl:
        kind = hdr[i]
        if kind == IPV4_OPT_EOL:
            break  # the rest is padding, included as sent (RFC 791)
        if kind == IPV4_OPT_NOP:
            i += 1
            continue
        if i + 1 >= ihl:
            return Verdict.PROTO, []
        opt_len = hdr[i + 1]
        if opt_len < 2 or i + opt_len > ihl:
            return Verdict.PROTO, []
        if kind not in IPV4_IMMUTABLE_OPTIONS:
            if outbound and kind in IPV4_SOURCE_ROUTES:
                if opt_len < IPV4_ROUTE_MIN_LEN:
                    return Verdict.PROTO, []
                # The receiver sees the final destination in the header (RFC 4302 App. A.1).
                patches.append((IPV4_DST, hdr[i + opt_len - IPV4_ADDR_LEN : i + opt_len]))
            patches.append((i, bytes(opt_len)))
        i += opt_len
    return Verdict.PASS, patches


def _ipv6_option_patches(pkt: bytes, start: int, stop: int, patches: list[Patch]) -> Verdict:
    """Zero the data of options marked "may change" in one options header (RFC 8200 §4.2)."""
    i = start
    while i < stop:
        kind = pkt[i]
        if kind == IPV6_OPT_PAD1:
            i += 1
            continue
        if i + 2 > stop or i + 2 + pkt[i + 1] > stop:
            return Verdict.PROTO
        opt_len = pkt[i + 1]
        if kind & IPV6_OPT_MAY_CHANGE and opt_len:
            patches.append((i + 2, bytes(opt_len)))
        i += 2 + opt_len
    return Verdict.PASS


def _ipv6_locate_ah(pkt: bytes) -> tuple[Verdict, int, int, list[Patch]]:
    """Walk IPv6 extension headers to AH (RFC 4302 §3.1.1, §3.3.3.1.2.2).

    Returns (verdict, AH offset, offset of the Next Header byte that names AH, ICV patches),
    offsets relative to the packet start. Routing headers are included as received: their
    mutable fields are what the sender predicted for the receiver.
    """
    patches: list[Patch] = []
    nh, nh_at, cur = pkt[IPV6_NEXT_HEADER], IPV6_NEXT_HEADER, IPV6_HDR_LEN
    for _ in range(MAX_EXT_HEADERS + 1):
        if nh == NH_AH:
            return Verdict.PASS, cur, nh_at, patches
        if nh == NH_FRAGMENT:
            return Verdict.FRAGMENT, 0, 0, []
        if nh not in IPV6_SKIPPED_EXT:
            return Verdict.PROTO, 0, 0, []
        if cur + IPV6_EXT_UNIT > len(pkt):
            return Verdict.RUNT, 0, 0, []
        ext_len = (pkt[cur + 1] + 1) * IPV6_EXT_UNIT
        if cur + ext_len > len(pkt):
            return Verdict.RUNT, 0, 0, []
        if nh != NH_ROUTING:
            verdict = _ipv6_option_patches(pkt, cur + 2, cur + ext_len, patches)
            if verdict:
                return verdict, 0, 0, []
        nh, nh_at, cur = pkt[cur], cur, cur + ext_len
    return Verdict.UNSUPPORTED, 0, 0, []


class AhCodec:
    """Authenticate and verify batches for the AH SAs of an ``SaTable`` (RFC 4302)."""

    def __init__(self, sas: SaTable) -> None:
        self.sas = sas

    # ------------------------------------------------------------------ helpers
    def _groups(self, batch: Batch) -> list[tuple[SaState, I64]]:
        """Passing packets grouped by outbound AH SA, in slot order; others dropped NO_SA."""
        meta = batch.active()
        live = np.flatnonzero(meta["verdict"] == Verdict.PASS)
        if live.size == 0:
            return []
        sa_of = meta["sa"][live]
        out = []
        for key in np.unique(sa_of).tolist():
            slots = live[sa_of == key]
            sa = self.sas[key]
            if (sa is None or sa.integ is None or sa.record.protocol is not Protocol.AH
                    or sa.record.direction is not Direction.OUT):
                meta["verdict"][slots] = Verdict.NO_SA
                continue
            out.append((sa, slots.astype(np.int64)))
        return out

    @staticmethod
    def _icvs(data: U8, sa: SaState, ip_off: I64, is4: Mask, icv_off: I64, end: I64,
              seq: U64, patches: Sequence[Iterable[Patch]]) -> U8:
        """ICVs (n, icv_len) over each packet from ``ip_off`` to ``end`` (RFC 4302 §3.3.3).

        Mutable fields and the ICV are zeroed in place for the HMAC and restored after it;
        with ESN the high 32 bits of the sequence number follow the payload for the ICV only
        (RFC 4302 §2 table: "Seq# (high-order 32 bits) ... not xmtd"; §3.4.4: "append the
        high-order 32 bits of the ESN after the end of the packet"). Only the ICV itself is
        zeroed, "not any ICV field padding" (§3.4.4).
        """
        integ = sa.integ
        assert integ is not None
        icv_len = integ.icv_len
        saved_hdr = vec.gather(data, ip_off, MUTABLE_SPAN)
        keep = np.where(is4[:, None], _KEEP_IPV4, _KEEP_IPV6)
        vec.scatter(data, ip_off, saved_hdr & keep)
        saved_icv = vec.gather(data, icv_off, icv_len)
        vec.scatter(data, icv_off, np.zeros_like(saved_icv))
        undo: list[tuple[int, U8]] = []
        for base, plist in zip(ip_off.tolist(), patches, strict=True):
            for rel, repl in plist:
                at = base + rel
                undo.append((at, data[at : at + len(repl)].copy()))
                data[at : at + len(repl)] = np.frombuffer(repl, dtype=np.uint8)
        msg_end = end
        if sa.record.esn:
            vec.put_be32(data, end, seq >> np.uint64(32))
            msg_end = end + ESN_HIGH_LEN
        mv = memoryview(data)  # type: ignore[arg-type]
        key, name = sa.integ_key, integ.hash_name
        digests = b"".join(
            hmac.digest(key, mv[a:b], name)[:icv_len]
            for a, b in zip(ip_off.tolist(), msg_end.tolist(), strict=True))
        for at, orig in reversed(undo):
            data[at : at + orig.size] = orig
        vec.scatter(data, icv_off, saved_icv)
        vec.scatter(data, ip_off, saved_hdr)
        return np.frombuffer(digests, dtype=np.uint8).reshape(-1, icv_len)

    # ------------------------------------------------------------------ encap
    def encap(self, batch: Batch) -> None:
        """AH-protect every passing packet for the outbound SA in its ``sa`` column.

        Each packet's ``seq`` must hold its reserved sequence number (pipeline dispatcher,
        or ``SaTable.assign_sequence``); 0 means none was left and drops as SEQ_OVERFLOW.
        """
        for sa, slots in self._groups(batch):
            self._encap_sa(batch, sa, slots)

    def _encap_sa(self, batch: Batch, sa: SaState, slots: I64) -> None:
        meta, data, rec = batch.meta, batch.data, sa.record
        integ = sa.integ
        assert integ is not None
        off = meta["offset"][slots].astype(np.int64)
        length = meta["length"][slots].astype(np.int64)
        seq = meta["seq"][slots]
        slot_base = slots * batch.slot_size
        # RFC 4302 §3.3.2: the counter never cycles; 0 is never sent.
        bad = np.where((seq == 0) | (seq > np.uint64(sa.seq_limit)),
                       int(Verdict.SEQ_OVERFLOW), int(Verdict.PASS))
        bad = _fail(bad, length < IPV4_HDR_LEN, Verdict.RUNT)
        safe = np.where(bad == 0, off, slot_base)
        version = (data[safe] >> 4).astype(np.int64)
        ah_len = ah_length(integ.icv_len, rec.ipv6)
        tunnel = rec.mode is Mode.TUNNEL
        patches: dict[int, list[Patch]] = {}
        if tunnel:
            bad = _fail(bad, (version != 4) & (version != 6), Verdict.PROTO)
            bad = _fail(bad, (version == 6) & (length < IPV6_HDR_LEN), Verdict.RUNT)
            next_header = np.where(version == 4, NH_IPV4, NH_IPV6)
            hdr_len = np.full_like(off, IPV6_HDR_LEN if rec.ipv6 else IPV4_HDR_LEN)
            new_off = off - ah_len - hdr_len
        else:
            bad = _fail(bad, version != (6 if rec.ipv6 else 4), Verdict.PROTO)
            if rec.ipv6:
                bad = _fail(bad, length < IPV6_HDR_LEN, Verdict.RUNT)
                safe = np.where(bad == 0, off, slot_base)
                hdr_len = np.full_like(off, IPV6_HDR_LEN)
                next_header = data[safe + IPV6_NEXT_HEADER].astype(np.int64)
                bad = _fail(bad, next_header == NH_FRAGMENT, Verdict.FRAGMENT)
                # RFC 4302 §3.1.1 puts AH after hop-by-hop, routing and fragment headers
                # (destination options before or after); this codec does not step over them.
                bad = _fail(bad, np.isin(next_header, IPV6_SKIPPED_EXT), Verdict.UNSUPPORTED)
            else:
                hdr_len = (data[safe] & 0x0F).astype(np.int64) * 4
                next_header = data[safe + IPV4_PROTO].astype(np.int64)
                bad = _fail(bad, hdr_len < IPV4_HDR_LEN, Verdict.PROTO)
                bad = _fail(bad, length < hdr_len, Verdict.RUNT)
                frag = vec.be16(data, safe + IPV4_FLAGS_FRAG) & IPV4_MF_AND_OFFSET
                # RFC 4302 §3.3.4: AH is applied to whole datagrams only.
                bad = _fail(bad, frag != 0, Verdict.FRAGMENT)
                for i in np.flatnonzero((bad == 0) & (hdr_len > IPV4_HDR_LEN)).tolist():
                    hdr = data[off[i] : off[i] + hdr_len[i]].tobytes()
                    verdict, plist = _ipv4_option_patches(hdr, outbound=True)
                    bad[i] = verdict
                    if plist:
                        patches[int(slots[i])] = plist
            new_off = off - ah_len
        total = length + ah_len + (hdr_len if tunnel else 0)
        esn_room = ESN_HIGH_LEN if rec.esn else 0
        fits = (new_off >= slot_base) & (
            off + length + esn_room <= slot_base + batch.slot_size)
        fits &= total <= (IPV6_MAX_PAYLOAD + IPV6_HDR_LEN if rec.ipv6 else IPV4_MAX_TOTAL)
        bad = _fail(bad, ~fits, Verdict.TOO_BIG)
        if bad.any():
            meta["verdict"][slots] = bad
            keep = bad == 0
            if not keep.any():
                return
            slots, off, length, seq, version = (
                slots[keep], off[keep], length[keep], seq[keep], version[keep])
            next_header, hdr_len, new_off, total = (
                next_header[keep], hdr_len[keep], new_off[keep], total[keep])
        n = slots.size
        ah_off = new_off + hdr_len
        end = off + length

        if tunnel:
            # The outer header is built from the inner one (RFC 4301 §5.1.2.1).
            inner_tos = np.where(version == 4, data[off + 1],
                                 ((data[off] & 0x0F) << 4) | (data[off + 1] >> 4))
            if rec.ipv6:
                self._write_ipv6(data, new_off, inner_tos, total - IPV6_HDR_LEN,
                                 sa.local_addr, sa.remote_addr)
            else:
                df = np.where(version == 4, data[off + IPV4_FLAGS_FRAG] & 0x40, 0)
                self._write_ipv4(data, new_off, inner_tos, total, seq, df,
                                 sa.local_addr, sa.remote_addr)
        else:
            # Transport: the IP header moves up to make room for AH (RFC 4302 §3.1.1).
            _move(data, off, new_off, hdr_len)
            if rec.ipv6:
                data[new_off + IPV6_NEXT_HEADER] = NH_AH
                vec.put_be16(data, new_off + IPV6_PAYLOAD_LEN, total - IPV6_HDR_LEN)
            else:
                data[new_off + IPV4_PROTO] = NH_AH
                vec.put_be16(data, new_off + IPV4_TOTAL_LEN, total)
                vec.ipv4_checksum(data, new_off, hdr_len)

        # RFC 4302 §2: Next Header, Payload Len, Reserved = 0, SPI, low 32 bits of the
        # sequence number; ICV zero until computed; padding zero (§2.6, §3.3.3.2: only as
        # much as the alignment needs; it is covered by the ICV).
        ah = np.zeros((n, ah_len), dtype=np.uint8)
        ah[:, AH_NEXT_HEADER] = next_header
        ah[:, AH_PAYLOAD_LEN] = ah_len // AH_LEN_UNIT - AH_LEN_BIAS
        ah[:, AH_SPI : AH_SPI + 4] = np.frombuffer(rec.spi.to_bytes(4, "big"), dtype=np.uint8)
        ah[:, AH_SEQ : AH_SEQ + 4] = (
            (seq & np.uint64(0xFFFFFFFF)).astype(">u4").view(np.uint8).reshape(-1, 4))
        vec.scatter(data, ah_off, ah)

        is4 = np.full(n, not rec.ipv6)
        plists = [patches.get(s, ()) for s in slots.tolist()] if patches else [()] * n
        icvs = self._icvs(data, sa, new_off, is4, ah_off + AH_ICV, end, seq, plists)
        vec.scatter(data, ah_off + AH_ICV, icvs)

        meta["offset"][slots] = new_off
        meta["length"][slots] = total
        sa.packets += n
        sa.bytes += int(length.sum())

    @staticmethod
    def _write_ipv4(data: U8, at: I64, tos: npt.ArrayLike, total: I64, seq: U64,
                    df: npt.ArrayLike, src: bytes, dst: bytes) -> None:
        n = at.size
        hdr = np.zeros((n, IPV4_HDR_LEN), dtype=np.uint8)
        hdr[:, 0] = 0x45
        hdr[:, 1] = tos  # DSCP and ECN copied from the inner header (RFC 4301 §5.1.2.1)
        hdr[:, 2], hdr[:, 3] = total >> 8, total & 0xFF
        # Identification from the sequence number: distinct for 2^16 consecutive packets.
        ident = (seq & np.uint64(0xFFFF)).astype(np.int64)
        hdr[:, 4], hdr[:, 5] = ident >> 8, ident & 0xFF
        hdr[:, 6] = df  # DF copied from an inner IPv4 header (RFC 4301 §8.1 default)
        hdr[:, 8] = OUTER_TTL
        hdr[:, 9] = NH_AH
        hdr[:, 12:16] = np.frombuffer(src, dtype=np.uint8)
        hdr[:, 16:20] = np.frombuffer(dst, dtype=np.uint8)
        csum = vec.inet_checksum(hdr)
        hdr[:, 10], hdr[:, 11] = csum >> 8, csum & 0xFF
        vec.scatter(data, at, hdr)

    @staticmethod
    def _write_ipv6(data: U8, at: I64, tc: npt.ArrayLike, payload: I64, src: bytes,
                    dst: bytes) -> None:
        n = at.size
        hdr = np.zeros((n, IPV6_HDR_LEN), dtype=np.uint8)
        tc = np.asarray(tc, dtype=np.int64)
        hdr[:, 0] = 0x60 | (tc >> 4)
        hdr[:, 1] = (tc & 0x0F) << 4
        hdr[:, 4], hdr[:, 5] = payload >> 8, payload & 0xFF
        hdr[:, 6] = NH_AH
        hdr[:, 7] = OUTER_TTL
        hdr[:, 8:24] = np.frombuffer(src, dtype=np.uint8)
        hdr[:, 24:40] = np.frombuffer(dst, dtype=np.uint8)
        vec.scatter(data, at, hdr)

    # ------------------------------------------------------------------ decap
    def decap(self, batch: Batch) -> None:
        """Verify and strip AH from every passing packet (outer IP header first).

        On return each passing packet is the inner packet (tunnel mode) or the transport
        packet with AH removed (Next Header/Protocol restored, lengths and IPv4 checksum
        fixed, mutable fields as received); its ``sa`` column names the inbound SA and
        ``seq`` holds the full (ESN-inferred) sequence number.
        """
        meta, data = batch.meta, batch.data
        n = batch.count
        if n == 0:
            return
        verdict = meta["verdict"][:n]
        slots = np.flatnonzero(verdict == Verdict.PASS).astype(np.int64)
        if slots.size == 0:
            return
        off = meta["offset"][slots].astype(np.int64)
        length = meta["length"][slots].astype(np.int64)
        slot_base = slots * batch.slot_size
        bad = np.where(length < IPV4_HDR_LEN, int(Verdict.RUNT), int(Verdict.PASS))
        safe = np.where(bad == 0, off, slot_base)  # reads stay inside the slot
        version = (data[safe] >> 4).astype(np.int64)
        is4 = version == 4
        bad = _fail(bad, ~is4 & (version != 6), Verdict.PROTO)
        bad = _fail(bad, (version == 6) & (length < IPV6_HDR_LEN), Verdict.RUNT)
        safe = np.where(bad == 0, off, slot_base)
        ip_len = np.where(is4, (data[safe] & 0x0F).astype(np.int64) * 4, IPV6_HDR_LEN)
        ip_total = np.where(is4, vec.be16(data, safe + IPV4_TOTAL_LEN),
                            vec.be16(data, safe + IPV6_PAYLOAD_LEN) + IPV6_HDR_LEN)
        proto = np.where(is4, data[safe + IPV4_PROTO],
                         data[safe + IPV6_NEXT_HEADER]).astype(np.int64)
        frag = np.where(is4, vec.be16(data, safe + IPV4_FLAGS_FRAG) & IPV4_MF_AND_OFFSET, 0)
        bad = _fail(bad, ip_len < IPV4_HDR_LEN, Verdict.PROTO)
        bad = _fail(bad, (ip_total > length) | (ip_total < ip_len), Verdict.RUNT)
        # RFC 4302 §3.4.1: fragments are reassembled before AH processing.
        bad = _fail(bad, frag != 0, Verdict.FRAGMENT)
        ext = ~is4 & np.isin(proto, IPV6_SKIPPED_EXT)
        bad = _fail(bad, ~is4 & (proto == NH_FRAGMENT), Verdict.FRAGMENT)
        bad = _fail(bad, ~ext & (proto != NH_AH), Verdict.PROTO)
        length = np.where(bad == 0, np.minimum(length, ip_total), length)  # link padding
        end = off + length
        ah_off = off + ip_len
        nh_at = off + np.where(is4, IPV4_PROTO, IPV6_NEXT_HEADER)

        # The slow path: IPv4 options and IPv6 extension headers, packet by packet.
        patches: dict[int, list[Patch]] = {}
        slow = (bad == 0) & ((is4 & (ip_len > IPV4_HDR_LEN)) | ext)
        for i in np.flatnonzero(slow).tolist():
            if is4[i]:
                hdr = data[off[i] : off[i] + ip_len[i]].tobytes()
                why, plist = _ipv4_option_patches(hdr, outbound=False)
            else:
                pkt = data[off[i] : end[i]].tobytes()
                why, ah_rel, nh_rel, plist = _ipv6_locate_ah(pkt)
                ah_off[i], nh_at[i] = off[i] + ah_rel, off[i] + nh_rel
            bad[i] = why
            if plist:
                patches[int(slots[i])] = plist

        bad = _fail(bad, ah_off + AH_FIXED_LEN > end, Verdict.RUNT)
        safe_ah = np.where(bad == 0, ah_off, slot_base)
        ah_len = (data[safe_ah + AH_PAYLOAD_LEN].astype(np.int64) + AH_LEN_BIAS) * AH_LEN_UNIT
        spi = vec.be32(data, safe_ah + AH_SPI)
        seq_lo = vec.be32(data, safe_ah + AH_SEQ)
        bad = _fail(bad, ah_off + ah_len > end, Verdict.RUNT)
        # RFC 4301 §4.1: a unicast SA is found by its SPI alone.
        sa_idx, found = self.sas.lookup_inbound(Protocol.AH, spi)
        bad = _fail(bad, ~found, Verdict.NO_SA)
        verdict[slots] = bad
        meta["sa"][slots] = np.where(found, sa_idx, 0)
        ok = bad == 0
        if not ok.any():
            return
        fields = (slots[ok], off[ok], end[ok], is4[ok], ah_off[ok], ah_len[ok], nh_at[ok],
                  seq_lo[ok])
        sa_of = sa_idx[ok]
        for key in np.unique(sa_of).tolist():
            sel = sa_of == key
            sa = self.sas[key]
            assert sa is not None
            self._decap_sa(batch, sa, patches, *(f[sel] for f in fields))

    def _decap_sa(self, batch: Batch, sa: SaState, patches: dict[int, list[Patch]],
                  slots: I64, off: I64, end: I64, is4: Mask, ah_off: I64, ah_len: I64,
                  nh_at: I64, seq_lo: U32) -> None:
        meta, data, rec = batch.meta, batch.data, sa.record
        integ = sa.integ
        assert integ is not None
        verdict = meta["verdict"]
        # RFC 4302 §2.6: the SA fixes the ICV length, and a sender "MUST insert only enough
        # padding" for the family's alignment, so any other Payload Len is malformed.
        want = np.where(is4, ah_length(integ.icv_len, False), ah_length(integ.icv_len, True))
        bad = np.where(ah_len != want, int(Verdict.PROTO), int(Verdict.PASS))
        seq = sa.replay.infer(seq_lo)
        # RFC 4302 §3.4.3: the cheap replay check comes before the ICV.
        bad = _fail(bad, sa.replay.precheck(seq), Verdict.REPLAY)
        esn_room = ESN_HIGH_LEN if rec.esn else 0
        bad = _fail(bad, end + esn_room > (slots + 1) * batch.slot_size, Verdict.TOO_BIG)
        if bad.any():
            verdict[slots] = bad
            keep = bad == 0
            if not keep.any():
                return
            slots, off, end, is4, ah_off, ah_len, nh_at, seq = (
                slots[keep], off[keep], end[keep], is4[keep], ah_off[keep], ah_len[keep],
                nh_at[keep], seq[keep])
        meta["seq"][slots] = seq

        # RFC 4302 §3.4.4: ICV over the packet with mutable fields and the ICV zeroed.
        icv_off = ah_off + AH_ICV
        received = vec.gather(data, icv_off, integ.icv_len)
        plists = [patches.get(s, ()) for s in slots.tolist()] if patches else [()] * slots.size
        expected = self._icvs(data, sa, off, is4, icv_off, end, seq, plists)
        authentic = np.fromiter(
            map(hmac.compare_digest, map(bytes, received), map(bytes, expected)),
            dtype=np.bool_, count=slots.size)
        bad = np.where(authentic, int(Verdict.PASS), int(Verdict.INTEGRITY))

        payload_off = ah_off + ah_len
        payload_len = end - payload_off
        next_header = data[ah_off + AH_NEXT_HEADER].astype(np.int64)
        tunnel = rec.mode is Mode.TUNNEL
        inner_len = payload_len
        if tunnel:
            # RFC 4302 §3.1.2: the payload is a whole IP packet, as Next Header says.
            bad = _fail(bad, payload_len < IPV4_HDR_LEN, Verdict.RUNT)
            safe = np.where(bad == 0, payload_off, off)
            inner_version = data[safe] >> 4
            right_nh = (((next_header == NH_IPV4) & (inner_version == 4))
                        | ((next_header == NH_IPV6) & (inner_version == 6)))
            bad = _fail(bad, ~right_nh, Verdict.PROTO)
            safe = np.where(bad == 0, payload_off, off)
            claimed = np.where(inner_version == 4, vec.be16(data, safe + IPV4_TOTAL_LEN),
                               vec.be16(data, safe + IPV6_PAYLOAD_LEN) + IPV6_HDR_LEN)
            too_short = (claimed > payload_len) | (
                (inner_version == 6) & (payload_len < IPV6_HDR_LEN))
            bad = _fail(bad, too_short, Verdict.RUNT)
            inner_len = np.minimum(claimed, payload_len)

        # Only now, for packets that verified, does the window move (RFC 4302 §3.4.3).
        replay = sa.replay.commit(seq, bad == 0)
        bad = _fail(bad, replay, Verdict.REPLAY)
        verdict[slots] = bad
        good = bad == 0
        if not good.any():
            return
        if tunnel:
            new_off, new_len = payload_off[good], inner_len[good]
        else:
            # Transport: the IP header (and extension headers before AH) moves down over AH
            # and names AH's Next Header again (RFC 4302 §3.1.1).
            off, ah_off, ah_len, nh_at = off[good], ah_off[good], ah_len[good], nh_at[good]
            hdr_len = ah_off - off
            new_off = off + ah_len
            new_len = hdr_len + payload_len[good]
            _move(data, off, new_off, hdr_len)
            data[nh_at + ah_len] = next_header[good]
            g4 = is4[good]
            v4, v6 = np.flatnonzero(g4), np.flatnonzero(~g4)
            if v6.size:
                vec.put_be16(data, new_off[v6] + IPV6_PAYLOAD_LEN, new_len[v6] - IPV6_HDR_LEN)
            if v4.size:
                vec.put_be16(data, new_off[v4] + IPV4_TOTAL_LEN, new_len[v4])
                vec.ipv4_checksum(data, new_off[v4], hdr_len[v4])
        done = slots[good]
        meta["offset"][done] = new_off
        meta["length"][done] = new_len
        sa.packets += int(done.size)
        sa.bytes += int(new_len.sum())
