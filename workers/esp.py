"""ESP (RFC 4303) encapsulation and decapsulation of whole batches, in place, sans-IO.

Headers, nonces, padding, lengths and checksums are computed for the whole batch with numpy;
the AEAD (or cipher and HMAC) runs once per packet into the batch buffer itself. Nothing in
the per-packet path raises: each packet leaves with a verdict (pipeline/batch.py ``Verdict``),
and the caller counts them.

Packet layout produced by ``encap`` (tunnel mode; transport keeps the original IP header):

    [outer IPv4/IPv6][UDP 4500 (RFC 3948)][SPI|Seq (RFC 4303 §2)][IV][inner packet ...
     ... TFC pad][Padding 1,2,3..][Pad Length][Next Header][ICV]
                                              ^ encrypted from IV+len(IV) to Next Header
"""

from __future__ import annotations

import hmac
import os
from collections import deque
from collections.abc import Callable
from itertools import starmap

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag

from pipeline.batch import Batch, Verdict
from pipeline.satable import Direction, Mode, Protocol
from workers import vec
from workers.algorithms import CipherKind, EspTransform
from workers.sa import SaState, SaTable
from workers.views import SlotArgCache

__all__ = ["EspCodec"]

I64 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]

# Field sizes and offsets, RFC 4303 §2 and RFC 791 / RFC 8200 / RFC 768.
ESP_HDR_LEN = 8  # SPI (4) + Sequence Number (4)
ESP_TRAILER_LEN = 2  # Pad Length (1) + Next Header (1)
IPV4_HDR_LEN = 20
IPV6_HDR_LEN = 40
UDP_HDR_LEN = 8
PROTO_UDP = 17
NH_IPV4 = 4  # IANA protocol number of IPv4-in-IP, the Next Header of a tunnelled IPv4 packet
NH_IPV6 = 41
NH_NONE = 59  # RFC 4303 §2.6: a dummy packet
OUTER_TTL = 64
# RFC 3948 §2.2: a UDP payload starting with a zero SPI is a Non-ESP Marker (IKE).
NAT_KEEPALIVE = 0xFF  # RFC 3948 §2.3: a one-byte 0xFF UDP payload
# IPv6 extension headers that ESP in transport mode would have to step over (RFC 8200 §4);
# this data plane does not, and says so with Verdict.UNSUPPORTED.
IPV6_EXT_HEADERS = np.array([0, 43, 44, 51, 60, 135, 139, 140, 253, 254])

_nothing: deque[object] = deque(maxlen=0)  # consumes an iterator at C speed


def _consume(it: object) -> None:
    _nothing.extend(it)  # type: ignore[call-overload]


def _align(n: I64, block: int) -> I64:
    return (n + block - 1) // block * block


class EspCodec:
    """Encapsulate and decapsulate batches for the ESP SAs of an ``SaTable``.

    ``random`` supplies CBC IVs (RFC 3602 §2: unpredictable); AEAD IVs are the 64-bit
    sequence number, unique per SA by construction (RFC 4106 §3.1, RFC 7634 §2).
    """

    def __init__(self, sas: SaTable, random: Callable[[int], bytes] = os.urandom) -> None:
        self.sas = sas
        self.random = random

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _cache(batch: Batch, name: str, tag_delta: int) -> SlotArgCache:
        cache = batch._views.get(name)
        if cache is None:
            cache = SlotArgCache(batch.data, batch.capacity, tag_delta)
            batch._views[name] = cache
        assert isinstance(cache, SlotArgCache)
        return cache

    def _groups(self, batch: Batch, direction: Direction) -> list[tuple[SaState, I64]]:
        """Packets still passing, grouped by SA, in slot order; unknown SAs dropped NO_SA."""
        meta = batch.active()
        live = np.flatnonzero(meta["verdict"] == Verdict.PASS)
        if live.size == 0:
            return []
        sa_of = meta["sa"][live]
        first = int(sa_of[0])
        if (sa_of == first).all():
            keys, groups = [first], [live]
        else:
            order = np.argsort(sa_of, kind="stable")
            keys_arr, starts = np.unique(sa_of[order], return_index=True)
            keys = keys_arr.tolist()
            groups = np.split(live[order], starts[1:])
        out = []
        for key, slots in zip(keys, groups, strict=True):
            sa = self.sas[key]
            if (sa is None or sa.esp is None or sa.record.direction is not direction
                    or sa.record.protocol is not Protocol.ESP):
                meta["verdict"][slots] = Verdict.NO_SA
                continue
            out.append((sa, slots.astype(np.int64)))
        return out

    # ------------------------------------------------------------------ encap
    def encap(self, batch: Batch) -> None:
        """ESP-protect every passing packet for the outbound SA in its ``sa`` column.

        Each packet's ``seq`` must hold its reserved sequence number (pipeline dispatcher,
        or ``SaTable.assign_sequence``); 0 means none was left and drops as SEQ_OVERFLOW.
        """
        for sa, slots in self._groups(batch, Direction.OUT):
            self._encap_sa(batch, sa, slots)

    def _encap_sa(self, batch: Batch, sa: SaState, slots: I64) -> None:
        meta, data, rec = batch.meta, batch.data, sa.record
        t = sa.esp
        assert t is not None
        verdict = meta["verdict"]
        off = meta["offset"][slots].astype(np.int64)
        length = meta["length"][slots].astype(np.int64)
        seq = meta["seq"][slots]
        version = data[off] >> 4
        bad = np.where(seq == 0, Verdict.SEQ_OVERFLOW, Verdict.PASS)
        bad = np.where((seq > sa.seq_limit) & (bad == 0), Verdict.SEQ_OVERFLOW, bad)
        tunnel = rec.mode is Mode.TUNNEL
        if tunnel:
            ok_version = ((version == 4) & (length >= IPV4_HDR_LEN)) | (
                (version == 6) & (length >= IPV6_HDR_LEN))
            bad = np.where(~ok_version & (bad == 0), Verdict.PROTO, bad)
            next_header = np.where(version == 4, NH_IPV4, NH_IPV6)
            ip_len = np.zeros_like(off)
            payload_len = np.maximum(length, rec.tfc_pad)  # RFC 4303 §2.7 TFC padding
            outer_hdr = IPV6_HDR_LEN if rec.ipv6 else IPV4_HDR_LEN
        else:
            want = 6 if rec.ipv6 else 4
            ip_len = np.where(version == 4, (data[off] & 0xF).astype(np.int64) * 4, IPV6_HDR_LEN)
            next_header = np.where(version == 4, data[off + 9], data[off + 6]).astype(np.int64)
            frag = np.where(version == 4, vec.be16(data, off + 6) & 0x3FFF, 0)
            bad = np.where((version != want) & (bad == 0), Verdict.PROTO, bad)
            bad = np.where((length < ip_len) & (bad == 0), Verdict.RUNT, bad)
            bad = np.where((frag != 0) & (bad == 0), Verdict.FRAGMENT, bad)
            ext = (version == 6) & np.isin(next_header, IPV6_EXT_HEADERS)
            bad = np.where(ext & (bad == 0), Verdict.UNSUPPORTED, bad)
            payload_len = length - ip_len
            outer_hdr = 0
        ct_start = off + ip_len  # the payload is encrypted where it lies
        padded = _align(payload_len + ESP_TRAILER_LEN, t.block_len)
        udp = UDP_HDR_LEN if rec.encap is not None else 0
        esp_off = ct_start - t.iv_len - ESP_HDR_LEN
        new_off = esp_off - udp - (outer_hdr if tunnel else ip_len)
        slot_base = slots * batch.slot_size
        esn_room = 4 if (rec.esn and not t.is_aead) else 0
        fits = (new_off >= slot_base) & (
            ct_start + padded + t.icv_len + esn_room <= slot_base + batch.slot_size)
        bad = np.where(~fits & (bad == 0), Verdict.TOO_BIG, bad)
        if bad.any():
            verdict[slots] = bad
            keep = bad == 0
            if not keep.any():
                return
            slots, off, length, seq, version = slots[keep], off[keep], length[keep], seq[keep], version[keep]
            next_header, ip_len, payload_len = next_header[keep], ip_len[keep], payload_len[keep]
            ct_start, padded, esp_off, new_off = ct_start[keep], padded[keep], esp_off[keep], new_off[keep]
        n = slots.size

        if not tunnel:
            # Transport mode: the IP header moves to the front of the new packet (RFC 4303
            # §3.1.1); take a copy before the ESP header overwrites its old place.
            hdr_width = int(ip_len.max())
            saved_hdr = vec.gather(data, off, hdr_width)
        elif rec.tfc_pad:
            extra = payload_len - length
            if extra.any():
                width = int(extra.max())
                vec.scatter_masked(data, off + length, np.zeros((n, width), np.uint8), extra)

        # Padding 1, 2, 3, ... (RFC 4303 §2.4), Pad Length, Next Header.
        pad = padded - payload_len - ESP_TRAILER_LEN
        trailer_at = ct_start + payload_len
        max_pad = int(pad.max())
        if max_pad:
            pattern = np.broadcast_to(np.arange(1, max_pad + 1, dtype=np.uint8), (n, max_pad))
            vec.scatter_masked(data, trailer_at, pattern, pad)
        data[ct_start + padded - 2] = pad
        data[ct_start + padded - 1] = next_header

        # ESP header: SPI, low 32 bits of the sequence number (RFC 4303 §2.1, §2.2).
        vec.put_be32(data, esp_off, rec.spi)
        vec.put_be32(data, esp_off + 4, seq & np.uint64(0xFFFFFFFF))

        if t.is_aead:
            self._aead_encrypt(batch, sa, t, slots, seq, esp_off, ct_start, padded)
        else:
            self._cbc_hmac_encrypt(batch, sa, t, slots, seq, esp_off, ct_start, padded)
        ct_end = ct_start + padded + t.icv_len
        esp_len = ct_end - esp_off

        if udp:
            # RFC 3948 §2.1: UDP header before ESP; checksum zero over IPv4.
            udp_off = esp_off - UDP_HDR_LEN
            vec.put_be16(data, udp_off, rec.encap.local_port)  # type: ignore[union-attr]
            vec.put_be16(data, udp_off + 2, rec.encap.remote_port)  # type: ignore[union-attr]
            vec.put_be16(data, udp_off + 4, esp_len + UDP_HDR_LEN)
            vec.put_be16(data, udp_off + 6, 0)
        proto = PROTO_UDP if udp else int(Protocol.ESP)
        total = ct_end - new_off

        if tunnel:
            inner_tos = np.where(version == 4, data[off + 1],
                                 ((data[off] & 0x0F) << 4) | (data[off + 1] >> 4))
            df = np.where(version == 4, data[off + 6] & 0x40, 0)
            if rec.ipv6:
                self._write_ipv6(data, new_off, inner_tos, total - IPV6_HDR_LEN, proto,
                                 sa.local_addr, sa.remote_addr)
            else:
                self._write_ipv4(data, new_off, inner_tos, total, seq, df, proto,
                                 sa.local_addr, sa.remote_addr)
        else:
            vec.scatter_masked(data, new_off, saved_hdr, ip_len)
            if rec.ipv6:
                data[new_off + 6] = proto
                vec.put_be16(data, new_off + 4, total - IPV6_HDR_LEN)
            else:
                data[new_off + 9] = proto
                vec.put_be16(data, new_off + 2, total)
                self._ipv4_checksum(data, new_off, ip_len)
        if udp and rec.ipv6:
            self._udp6_checksum(data, new_off, total)

        meta["offset"][slots] = new_off
        meta["length"][slots] = total
        sa.packets += n
        sa.bytes += int(length.sum())

    def _aead_encrypt(self, batch: Batch, sa: SaState, t: EspTransform, slots: I64,
                      seq: npt.NDArray[np.uint64], esp_off: I64, ct_start: I64,
                      padded: I64) -> None:
        data = batch.data
        iv = seq.astype(">u8").view(np.uint8).reshape(-1, 8)
        vec.scatter(data, esp_off + ESP_HDR_LEN, iv)  # RFC 4106 §3.1: IV = counter
        cache = self._cache(batch, "esp-encrypt", 16)
        cache.nonce[slots, :4] = np.frombuffer(sa.salt, dtype=np.uint8)
        cache.nonce[slots, 4:] = iv
        if sa.record.esn:
            # RFC 4106 §5: AAD = SPI || Seq high || Seq low (the high half is never sent).
            cache.esn_aad[slots, :4] = vec.gather(data, esp_off, 4)
            cache.esn_aad[slots, 4:] = seq.astype(">u8").view(np.uint8).reshape(-1, 8)
        args = cache.args(slots, ct_start, padded, esp_off, sa.record.esn)
        assert sa.aead_encrypt_into is not None
        _consume(starmap(sa.aead_encrypt_into, args))

    def _cbc_hmac_encrypt(self, batch: Batch, sa: SaState, t: EspTransform, slots: I64,
                          seq: npt.NDArray[np.uint64], esp_off: I64, ct_start: I64,
                          padded: I64) -> None:
        data = batch.data
        if t.kind is CipherKind.AES_CBC:
            iv = np.frombuffer(self.random(16 * slots.size), dtype=np.uint8).reshape(-1, 16)
            vec.scatter(data, esp_off + ESP_HDR_LEN, iv)
            _cbc_run(data, ct_start, padded, iv, sa, encrypt=True)
        ct_end = ct_start + padded
        icvs = _hmac_many(data, sa, seq, esp_off, ct_end)
        vec.scatter(data, ct_end, icvs)

    @staticmethod
    def _write_ipv4(data: npt.NDArray[np.uint8], at: I64, tos: npt.ArrayLike, total: I64,
                    seq: npt.NDArray[np.uint64], df: npt.ArrayLike, proto: int, src: bytes,
                    dst: bytes) -> None:
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
        hdr[:, 9] = proto
        hdr[:, 12:16] = np.frombuffer(src, dtype=np.uint8)
        hdr[:, 16:20] = np.frombuffer(dst, dtype=np.uint8)
        csum = vec.inet_checksum(hdr)
        hdr[:, 10], hdr[:, 11] = csum >> 8, csum & 0xFF
        vec.scatter(data, at, hdr)

    @staticmethod
    def _write_ipv6(data: npt.NDArray[np.uint8], at: I64, tc: npt.ArrayLike, payload: I64,
                    proto: int, src: bytes, dst: bytes) -> None:
        n = at.size
        hdr = np.zeros((n, IPV6_HDR_LEN), dtype=np.uint8)
        tc = np.asarray(tc, dtype=np.int64)
        hdr[:, 0] = 0x60 | (tc >> 4)
        hdr[:, 1] = (tc & 0x0F) << 4
        hdr[:, 4], hdr[:, 5] = payload >> 8, payload & 0xFF
        hdr[:, 6] = proto
        hdr[:, 7] = OUTER_TTL
        hdr[:, 8:24] = np.frombuffer(src, dtype=np.uint8)
        hdr[:, 24:40] = np.frombuffer(dst, dtype=np.uint8)
        vec.scatter(data, at, hdr)

    @staticmethod
    def _ipv4_checksum(data: npt.NDArray[np.uint8], at: I64, ihl_bytes: I64) -> None:
        vec.put_be16(data, at + 10, 0)
        width = int(ihl_bytes.max())
        rows = vec.gather(data, at, width)
        rows[np.arange(width)[None, :] >= ihl_bytes[:, None]] = 0
        vec.put_be16(data, at + 10, vec.inet_checksum(rows))

    @staticmethod
    def _udp6_checksum(data: npt.NDArray[np.uint8], at: I64, total: I64) -> None:
        """UDP checksum over IPv6 (mandatory there, RFC 8200 §8.1), for encapsulated ESP."""
        udp_off = at + IPV6_HDR_LEN
        udp_len = total - IPV6_HDR_LEN
        vec.put_be16(data, udp_off + 6, 0)
        width = int(udp_len.max())
        rows = vec.gather(data, udp_off, width)
        rows[np.arange(width)[None, :] >= udp_len[:, None]] = 0
        pseudo = vec.gather(data, at + 8, 32).astype(np.int64)  # source and destination
        initial = (pseudo[:, 0::2] << 8).sum(axis=1) + pseudo[:, 1::2].sum(axis=1)
        initial = initial + udp_len + PROTO_UDP
        csum = vec.inet_checksum(rows, initial)
        vec.put_be16(data, udp_off + 6, np.where(csum == 0, 0xFFFF, csum))

    # ------------------------------------------------------------------ decap
    def decap(self, batch: Batch) -> None:
        """Verify, decrypt and strip ESP from every passing packet (outer IP header first).

        On return each passing packet is the inner packet (tunnel mode) or the restored
        transport-mode packet, its ``sa`` column names the inbound SA and ``seq`` holds the
        full (ESN-inferred) sequence number.
        """
        meta, data = batch.meta, batch.data
        n = batch.count
        if n == 0:
            return
        verdict = meta["verdict"][:n]
        slots = np.flatnonzero(verdict == Verdict.PASS).astype(np.int64)
        off = meta["offset"][slots].astype(np.int64)
        length = meta["length"][slots].astype(np.int64)
        bad = np.where(length < IPV4_HDR_LEN, Verdict.RUNT, Verdict.PASS)
        safe_off = np.where(bad == 0, off, slots * batch.slot_size)  # reads stay in-slot
        version = data[safe_off] >> 4
        is4 = version == 4
        ip_len = np.where(is4, (data[safe_off] & 0xF).astype(np.int64) * 4, IPV6_HDR_LEN)
        proto = np.where(is4, data[safe_off + 9], data[safe_off + 6]).astype(np.int64)
        ip_total = np.where(is4, vec.be16(data, safe_off + 2),
                            vec.be16(data, safe_off + 4) + IPV6_HDR_LEN)
        frag = np.where(is4, vec.be16(data, safe_off + 6) & 0x3FFF, 0)
        bad = np.where((bad == 0) & ~is4 & (version != 6), Verdict.PROTO, bad)
        bad = np.where((bad == 0) & ((ip_total > length) | (ip_total < ip_len + ESP_HDR_LEN)
                                     | (ip_len < IPV4_HDR_LEN)), Verdict.RUNT, bad)
        bad = np.where((bad == 0) & (frag != 0), Verdict.FRAGMENT, bad)
        is_udp = proto == PROTO_UDP
        bad = np.where((bad == 0) & ~is_udp & (proto != Protocol.ESP), Verdict.PROTO, bad)
        length = np.minimum(length, ip_total)  # drop link-layer padding
        esp_off = off + ip_len + np.where(is_udp, UDP_HDR_LEN, 0)
        udp_payload = length - (esp_off - off)
        if is_udp.any():
            first = data[np.where(bad == 0, esp_off, safe_off)].astype(np.int64)
            keepalive = is_udp & (udp_payload == 1) & (first == NAT_KEEPALIVE)
            bad = np.where((bad == 0) & keepalive, Verdict.KEEPALIVE, bad)
        bad = np.where((bad == 0) & (udp_payload < ESP_HDR_LEN), Verdict.RUNT, bad)
        esp_read = np.where(bad == 0, esp_off, safe_off)
        spi = vec.be32(data, esp_read)
        seq_lo = vec.be32(data, esp_read + 4)
        # RFC 3948 §2.2: SPI 0 in a UDP payload is the Non-ESP Marker: IKE, not ours.
        bad = np.where((bad == 0) & is_udp & (spi == 0), Verdict.ENCAP, bad)
        sa_idx, found = self.sas.lookup_inbound(Protocol.ESP, spi)
        bad = np.where((bad == 0) & ~found, Verdict.NO_SA, bad)
        verdict[slots] = bad
        meta["sa"][slots] = np.where(found, sa_idx, 0)
        ok = bad == 0
        if not ok.any():
            return
        fields = (slots[ok], off[ok], length[ok], esp_off[ok], ip_len[ok], is_udp[ok],
                  seq_lo[ok], version[ok])
        sa_of = sa_idx[ok]
        for key in np.unique(sa_of).tolist():
            sel = sa_of == key
            sa = self.sas[key]
            assert sa is not None
            self._decap_sa(batch, sa, *(f[sel] for f in fields))

    def _decap_sa(self, batch: Batch, sa: SaState, slots: I64, off: I64, length: I64,
                  esp_off: I64, ip_len: I64, is_udp: Mask,
                  seq_lo: npt.NDArray[np.uint32], version: npt.NDArray[np.uint8]) -> None:
        meta, data, rec = batch.meta, batch.data, sa.record
        t = sa.esp
        assert t is not None
        verdict = meta["verdict"]
        bad = np.where(is_udp != (rec.encap is not None), Verdict.ENCAP, Verdict.PASS)
        seq = sa.replay.infer(seq_lo)
        bad = np.where((bad == 0) & sa.replay.precheck(seq), Verdict.REPLAY, bad)
        ct_start = esp_off + ESP_HDR_LEN + t.iv_len
        ct_len = length - (ct_start - off) - t.icv_len  # encrypted part, trailer included
        bad = np.where((bad == 0) & (ct_len < ESP_TRAILER_LEN), Verdict.RUNT, bad)
        bad = np.where((bad == 0) & (ct_len % t.block_len != 0), Verdict.PAD, bad)
        esn_room = 4 if (rec.esn and not t.is_aead) else 0
        slot_end = (slots + 1) * batch.slot_size
        bad = np.where((bad == 0) & (ct_start + ct_len + t.icv_len + esn_room > slot_end),
                       Verdict.TOO_BIG, bad)
        if bad.any():
            verdict[slots] = bad
            keep = bad == 0
            slots, off, length, esp_off, ip_len = slots[keep], off[keep], length[keep], esp_off[keep], ip_len[keep]
            seq, ct_start, ct_len, version = seq[keep], ct_start[keep], ct_len[keep], version[keep]
            if slots.size == 0:
                return
        meta["seq"][slots] = seq

        if t.is_aead:
            authentic = self._aead_decrypt(batch, sa, t, slots, seq, esp_off, ct_start, ct_len)
        else:
            authentic = self._hmac_cbc_decrypt(batch, sa, t, slots, seq, esp_off, ct_start,
                                               ct_len)
        bad = np.where(authentic, Verdict.PASS, Verdict.INTEGRITY)

        # Trailer (RFC 4303 §2.4-2.6).
        end = ct_start + ct_len
        pad = data[end - 2].astype(np.int64)
        next_header = data[end - 1].astype(np.int64)
        bad = np.where((bad == 0) & (pad + ESP_TRAILER_LEN > ct_len), Verdict.PAD, bad)
        max_pad = int(np.where(bad == 0, pad, 0).max())
        if max_pad:
            # RFC 4303 §2.4: the default padding is 1, 2, 3, ...; a receiver checks it.
            got = vec.gather(data, np.where(bad == 0, end - 2 - pad, end - 2), max_pad)
            cols = np.arange(max_pad)
            wrong = ((got != cols + 1) & (cols[None, :] < pad[:, None])).any(axis=1)
            bad = np.where((bad == 0) & wrong, Verdict.PAD, bad)
        bad = np.where((bad == 0) & (next_header == NH_NONE), Verdict.DUMMY, bad)
        inner_len = ct_len - pad - ESP_TRAILER_LEN

        if rec.mode is Mode.TUNNEL:
            iv = data[ct_start] >> 4
            wrong_nh = ~(((next_header == NH_IPV4) & (iv == 4)) | ((next_header == NH_IPV6) & (iv == 6)))
            bad = np.where((bad == 0) & wrong_nh, Verdict.PROTO, bad)
            # The inner header's own length removes TFC padding (RFC 4303 §2.7).
            safe = np.where(bad == 0, ct_start, off)
            ilen = np.where(iv == 4, vec.be16(data, safe + 2), vec.be16(data, safe + 4) + 40)
            bad = np.where((bad == 0) & ((ilen > inner_len) | (inner_len < IPV4_HDR_LEN)),
                           Verdict.RUNT, bad)
            new_off, new_len = ct_start, np.minimum(ilen, inner_len)
        else:
            # Transport: the original IP header moves up against the payload (RFC 4303 §3.4.4).
            new_off = ct_start - ip_len
            new_len = ip_len + inner_len
            hdr = vec.gather(data, off, int(ip_len.max()))
            vec.scatter_masked(data, new_off, hdr, ip_len)
            if rec.ipv6:
                data[new_off + 6] = next_header
                vec.put_be16(data, new_off + 4, new_len - IPV6_HDR_LEN)
            else:
                data[new_off + 9] = next_header
                vec.put_be16(data, new_off + 2, new_len)
                self._ipv4_checksum(data, new_off, ip_len)

        # Only now, for packets that verified, does the window move (RFC 4303 §3.4.3).
        replay = sa.replay.commit(seq, bad == 0)
        bad = np.where((bad == 0) & replay, Verdict.REPLAY, bad)
        good = bad == 0
        verdict[slots] = bad
        meta["offset"][slots[good]] = new_off[good]
        meta["length"][slots[good]] = new_len[good]
        sa.packets += int(good.sum())
        sa.bytes += int(new_len[good].sum())

    def _aead_decrypt(self, batch: Batch, sa: SaState, t: EspTransform, slots: I64,
                      seq: npt.NDArray[np.uint64], esp_off: I64, ct_start: I64,
                      ct_len: I64) -> Mask:
        data = batch.data
        cache = self._cache(batch, "esp-decrypt", -16)
        cache.nonce[slots, :4] = np.frombuffer(sa.salt, dtype=np.uint8)
        cache.nonce[slots, 4:] = vec.gather(data, esp_off + ESP_HDR_LEN, 8)
        if sa.record.esn:
            cache.esn_aad[slots, :4] = vec.gather(data, esp_off, 4)
            cache.esn_aad[slots, 4:] = seq.astype(">u8").view(np.uint8).reshape(-1, 8)
        args = cache.args(slots, ct_start, ct_len + t.icv_len, esp_off, sa.record.esn)
        assert sa.aead_decrypt_into is not None
        authentic = np.ones(slots.size, dtype=np.bool_)
        remaining = iter(args)
        calls = starmap(sa.aead_decrypt_into, remaining)
        while True:
            try:
                _consume(calls)
                return authentic
            except InvalidTag:
                # The tag was checked in constant time by OpenSSL; the starmap resumes with
                # the next packet. Which one failed: everything the iterator has handed out.
                authentic[slots.size - remaining.__length_hint__() - 1] = False

    def _hmac_cbc_decrypt(self, batch: Batch, sa: SaState, t: EspTransform, slots: I64,
                          seq: npt.NDArray[np.uint64], esp_off: I64, ct_start: I64,
                          ct_len: I64) -> Mask:
        data = batch.data
        ct_end = ct_start + ct_len
        received = vec.gather(data, ct_end, t.icv_len)  # before the ESN bits overwrite it
        expected = _hmac_many(data, sa, seq, esp_off, ct_end)
        authentic = np.fromiter(
            map(hmac.compare_digest, map(bytes, received), map(bytes, expected)),
            dtype=np.bool_, count=slots.size)
        if t.kind is CipherKind.AES_CBC and authentic.any():
            # Encrypt-then-MAC: only authenticated ciphertext is decrypted (RFC 4303 §3.4.4.1).
            a = np.flatnonzero(authentic)
            iv = vec.gather(data, esp_off[a] + ESP_HDR_LEN, 16)
            _cbc_run(data, ct_start[a], ct_len[a], iv, sa, encrypt=False)
        return authentic


def _hmac_many(data: npt.NDArray[np.uint8], sa: SaState, seq: npt.NDArray[np.uint64],
               esp_off: I64, ct_end: I64) -> npt.NDArray[np.uint8]:
    """HMAC-SHA2 ICVs over ESP header .. trailer, ESN high bits appended (RFC 4303 §2.2.1)."""
    integ = sa.integ
    assert integ is not None
    msg_end = ct_end
    if sa.record.esn:
        vec.put_be32(data, ct_end, seq >> np.uint64(32))
        msg_end = ct_end + 4
    mv = memoryview(data)  # type: ignore[arg-type]
    key, name, icv = sa.integ_key, integ.hash_name, integ.icv_len
    digests = b"".join(
        hmac.digest(key, mv[a:b], name)[:icv]
        for a, b in zip(esp_off.tolist(), msg_end.tolist(), strict=True))
    return np.frombuffer(digests, dtype=np.uint8).reshape(-1, icv)


def _cbc_run(data: npt.NDArray[np.uint8], start: I64, length: I64, iv: npt.NDArray[np.uint8],
             sa: SaState, encrypt: bool) -> None:
    """AES-CBC over many packets at once (RFC 3602), as ECB with the chaining in numpy.

    Encryption is sequential within a packet, so it walks block columns: block j of every
    packet in one ECB call. Decryption is parallel: all blocks in one ECB call, then XOR with
    the previous ciphertext block.
    """
    n = start.size
    width = int(length.max())
    cols = np.arange(width)
    idx = start[:, None] + cols
    inside = cols[None, :] < length[:, None]
    idx = np.where(inside, idx, start[:, None])  # short packets read their own first byte
    blocks = data[idx].reshape(n, width // 16, 16)
    if encrypt:
        ctx = sa.ecb_encrypt
        assert ctx is not None
        prev = iv
        out = np.empty_like(blocks)
        for j in range(blocks.shape[1]):
            x = np.bitwise_xor(blocks[:, j], prev)
            out[:, j] = np.frombuffer(ctx.update(x.tobytes()), dtype=np.uint8).reshape(n, 16)
            prev = out[:, j]
    else:
        ctx = sa.ecb_decrypt
        assert ctx is not None
        plain = np.frombuffer(ctx.update(blocks.tobytes()), dtype=np.uint8).reshape(blocks.shape)
        chain = np.concatenate([iv[:, None, :], blocks[:, :-1]], axis=1)
        out = plain ^ chain
    flat = out.reshape(n, width)
    data[idx[inside]] = flat[inside]
