"""ESP (RFC 4303) encapsulation and decapsulation of whole batches, in place, sans-IO.

Headers, nonces, padding, lengths and checksums are computed for the whole batch with numpy
(workers/layout.py views the headers of a group of packets as one structured array); the
AEAD, or the cipher and HMAC, runs once per packet into the batch buffer itself. Nothing in
the per-packet path raises: each packet leaves with a verdict (pipeline/batch.py ``Verdict``)
and the caller counts them.

Packets are processed in *groups* that share an SA and a header layout (where the packet
starts in its slot, IP version and header length, UDP encapsulation). Steady traffic makes
one group per batch, and a group that is the whole batch works on live views with no copy.

Encapsulated packet (tunnel mode; transport keeps the original IP header in front):

    [outer IPv4/IPv6][UDP (RFC 3948)][SPI|Seq][IV][inner packet|TFC][Padding|PadLen|NH][ICV]
                                                  \\___________ encrypted _______________/
"""

from __future__ import annotations

import hmac
import os
from collections import deque
from collections.abc import Callable, Iterable
from functools import lru_cache
from itertools import starmap
from operator import length_hint
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag

from pipeline.batch import META_DTYPE, Batch, Verdict
from pipeline.satable import Direction, Mode, Protocol
from workers import vec
from workers.algorithms import CipherKind, EspTransform
from workers.layout import (
    INNER_PEEK,
    GroupRows,
    bytes_dtype,
    first_failure,
    group_by,
    header_dtype,
    rows,
    windows,
)
from workers.sa import SaState, SaTable
from workers.views import AeadArgs, SlotArgCache

__all__ = ["EspCodec"]

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
Mask = npt.NDArray[np.bool_]
Sel = slice | I64

# RFC 4303 §2, RFC 791, RFC 8200, RFC 768.
ESP_HDR_LEN = 8  # SPI (4) + Sequence Number (4)
ESP_TRAILER_LEN = 2  # Pad Length (1) + Next Header (1)
IPV4_HDR_LEN = 20
IPV6_HDR_LEN = 40
UDP_HDR_LEN = 8
PROTO_UDP = 17
NH_IPV4 = 4  # Next Header of a tunnelled IPv4 packet (IANA: IPv4 encapsulation)
NH_IPV6 = 41
NH_NONE = 59  # RFC 4303 §2.6: a dummy packet
OUTER_TTL = 64
IPV4_DF = 0x4000
NAT_KEEPALIVE = 0xFF  # RFC 3948 §2.3: a one-byte UDP payload of 0xFF
# IPv6 extension headers that transport-mode ESP would have to step over (RFC 8200 §4);
# this data plane does not, and says so with Verdict.UNSUPPORTED.
IPV6_EXT_HEADERS = (0, 43, 44, 51, 60, 135, 139, 140, 253, 254)
MAX_PAD = 255

# Row p: the trailer of a packet with p bytes of padding, before its Next Header:
# 1, 2, ..., p (RFC 4303 §2.4 default padding), then Pad Length p. Written with a fixed
# width; what lies beyond a packet's trailer is where its ICV goes, written afterwards.
_TRAILERS = np.zeros((MAX_PAD + 1, MAX_PAD + 2), dtype=np.uint8)
for _p in range(MAX_PAD + 1):
    _TRAILERS[_p, :_p] = np.arange(1, _p + 1)
    _TRAILERS[_p, _p] = _p
_COLS = np.arange(MAX_PAD + 2)
# By IP version nibble: the shortest packet of that version (IPv4 20, IPv6 40; others never).
_MIN_INNER_LEN = np.full(16, 1 << 30, dtype=np.int64)
_MIN_INNER_LEN[4], _MIN_INNER_LEN[6] = IPV4_HDR_LEN, IPV6_HDR_LEN
_IS_V6 = (np.arange(16) == 6).astype(np.uint8)
_NH_OF_VERSION = np.zeros(16, dtype=np.uint8)  # Next Header a tunnelled packet must carry
_NH_OF_VERSION[4], _NH_OF_VERSION[6] = NH_IPV4, NH_IPV6
# The four bytes before Pad Length for a pad of p <= 4: the last p are 1..p.
_PAD_MASK = np.zeros((5, 4), dtype=np.uint8)
_PAD_EXPECT = np.zeros((5, 4), dtype=np.uint8)
for _p in range(5):
    if _p:
        _PAD_MASK[_p, 4 - _p :] = 0xFF
        _PAD_EXPECT[_p, 4 - _p :] = np.arange(1, _p + 1)
_PAD_MASK32 = _PAD_MASK.view("<u4")[:, 0].copy()
_PAD_EXPECT32 = _PAD_EXPECT.view("<u4")[:, 0].copy()
# Byte 0, and the protocol byte of an IPv4 (offset 9) and IPv6 (offset 6) header.
_PROTO_PEEK = np.dtype({"names": ["b0", "p6", "p4"], "formats": ["u1", "u1", "u1"],
                        "offsets": [0, 6, 9], "itemsize": 10})
_IV64 = np.dtype(">u8")
# The same with the Next Header of a tunnelled IPv4 (row 0) or IPv6 (row 1) packet.
_TUNNEL_TRAILERS = np.stack([_TRAILERS, _TRAILERS])
for _p in range(MAX_PAD + 1):
    _TUNNEL_TRAILERS[0, _p, _p + 1] = NH_IPV4
    _TUNNEL_TRAILERS[1, _p, _p + 1] = NH_IPV6


def _offsets(batch: Batch, in_slot: int) -> npt.NDArray[np.uint32]:
    """Offsets of byte ``in_slot`` of every slot (the usual packet start, cached)."""
    key = ("offsets", in_slot)
    offs = batch._views.get(key)
    if not isinstance(offs, np.ndarray):
        offs = (batch.slot_starts() + in_slot).astype(np.uint32)
        batch._views[key] = offs
    return offs


def _arange(batch: Batch) -> I64:
    idx = batch._views.get("arange")
    if not isinstance(idx, np.ndarray):
        idx = np.arange(batch.capacity, dtype=np.int64)
        batch._views["arange"] = idx
    return idx

_nothing: deque[object] = deque(maxlen=0)


def _consume(it: Iterable[object]) -> None:
    """Run an iterator to its end at C speed (no per-item bytecode)."""
    _nothing.extend(it)


class EspCodec:
    """Encapsulate and decapsulate batches for the ESP SAs of an ``SaTable``.

    ``random`` supplies CBC IVs (RFC 3602 §2: unpredictable). AEAD IVs are the 64-bit
    sequence number: unique per SA by construction (RFC 4106 §3.1, RFC 7634 §2).
    """

    def __init__(self, sas: SaTable, random: Callable[[int], bytes] = os.urandom,
                 replay: bool = True, count: bool = True) -> None:
        self.sas = sas
        self.random = random
        # count=False: the per-SA packet and byte counters are the caller's (the pipeline's
        # I/O process counts what leaves, and what its reassembler commits): a codec that
        # counted too would count the batches the I/O process does itself twice.
        self.count = count
        # replay=False: the pipeline's dispatcher infers each packet's full sequence number
        # into meta "seq" and pre-checks it, and its reassembler commits the window in
        # order (DESIGN §4); the codec then only verifies and decrypts.
        self.replay = replay

    @staticmethod
    def _cache(batch: Batch, name: str, tag_delta: int) -> SlotArgCache:
        cache = batch._views.get(name)
        if not isinstance(cache, SlotArgCache):
            cache = SlotArgCache(batch.data, batch.capacity, tag_delta)
            batch._views[name] = cache
        return cache

    def _counted(self, sa: SaState, packets: int, nbytes: int) -> None:
        """Count packets done on ``sa``, unless the caller counts (``count=False``)."""
        if self.count:
            sa.packets += packets
            sa.bytes += nbytes

    def _sa(self, index: int, direction: Direction) -> SaState | None:
        sa = self.sas[index]
        if (sa is None or sa.esp is None or sa.record.direction is not direction
                or sa.record.protocol is not Protocol.ESP):
            return None
        return sa

    # ================================================================== encap
    def encap(self, batch: Batch) -> None:
        """ESP-protect every passing packet with the outbound SA named in its ``sa`` column.

        Each packet's ``seq`` holds its reserved sequence number (the dispatcher's, or
        ``SaTable.assign_sequence``); 0 means none was left: SEQ_OVERFLOW.
        """
        n, meta, size = batch.count, batch.meta, batch.slot_size
        if n == 0:
            return
        # Taken out whatever happens; put back only by a path that leaves it valid.
        memo = batch._views.pop("esp-encap-memo", None)
        if isinstance(memo, _EncapMemo) and memo.replay(self, batch):
            batch._views["esp-encap-memo"] = memo
            return
        bases = batch.slot_starts()
        if not meta["verdict"][:n].any():
            # Fast path: one SA, every packet at the same place in its slot.
            sa_col, off = meta["sa"][:n], meta["offset"][:n]
            s0, c0 = int(sa_col[0]), int(off[0])
            if c0 < size and (sa_col == s0).all() and (off == _offsets(batch, c0)[:n]).all():
                sa = self._sa(s0, Direction.OUT)
                if sa is not None:
                    self._encap_group(batch, sa, _arange(batch)[:n], c0, True)
                    return
        live = np.flatnonzero(meta["verdict"][:n] == Verdict.PASS)
        if live.size == 0:
            return
        in_slot = meta["offset"][live].astype(np.int64) - bases[live]
        key = (meta["sa"][live].astype(np.int64) << 20) | (in_slot & 0xFFFFF)
        bad_off = (in_slot < 0) | (in_slot >= size)
        for k, pos in group_by(np.where(bad_off, -1, key)):
            slots = live[pos]
            sa = self._sa(k >> 20, Direction.OUT) if k >= 0 else None
            if sa is None:
                meta["verdict"][slots] = Verdict.NO_SA if k >= 0 else Verdict.RUNT
                continue
            self._encap_group(batch, sa, slots, k & 0xFFFFF, slots.size == n)

    def _encap_group(self, batch: Batch, sa: SaState, slots: I64, c: int, dense: bool) -> None:
        """Packets of one SA whose IP header starts at byte ``c`` of their slots."""
        rec, t = sa.record, sa.esp
        assert t is not None
        data, meta, size = batch.data, batch.meta, batch.slot_size
        sel: Sel = slice(0, slots.size) if dense else slots
        batch._views.pop("esp-encap-memo", None)  # this group rewrites the argument views
        length = meta["length"][sel].astype(np.int64)
        seq = meta["seq"][sel]
        peek = GroupRows(data, INNER_PEEK, size, c, slots, dense).rec
        b0 = peek["b0"]
        tunnel = rec.mode is Mode.TUNNEL
        udp = UDP_HDR_LEN if rec.encap is not None else 0
        if tunnel:
            version = b0 >> 4
            all_v4 = bool((version == 4).all())
            ip_len = 0
            checks: list[tuple[Mask | None, int]] = []
            if not all_v4:
                checks.append((length < _MIN_INNER_LEN[version], Verdict.PROTO))
            elif int(length.min()) < IPV4_HDR_LEN:
                checks.append((length < IPV4_HDR_LEN, Verdict.PROTO))
            payload_len = np.maximum(length, rec.tfc_pad) if rec.tfc_pad else length
            outer = IPV6_HDR_LEN if rec.ipv6 else IPV4_HDR_LEN
            new_c = c - outer - udp - ESP_HDR_LEN - t.iv_len
        else:
            if not (b0 == b0[0]).all():  # mixed header lengths: one group per layout
                for _, pos in group_by(b0.astype(np.int64)):
                    self._encap_group(batch, sa, slots[pos], c, False)
                return
            version_no = int(b0[0]) >> 4
            ip_len = (int(b0[0]) & 0xF) * 4 if version_no == 4 else IPV6_HDR_LEN
            if version_no != rec.local_addr.version or ip_len < IPV4_HDR_LEN:
                meta["verdict"][slots] = Verdict.PROTO
                return
            ip = GroupRows(data, header_dtype(version_no, ip_len, False, 0), size, c, slots,
                           dense).rec["ip"]
            checks = [(length < ip_len, Verdict.RUNT)]
            if version_no == 6:
                next_header = ip["next_header"]
                checks.append((np.isin(next_header, IPV6_EXT_HEADERS), Verdict.UNSUPPORTED))
            else:
                next_header = ip["proto"]
                checks.append(((ip["frag"] & 0x3FFF) != 0, Verdict.FRAGMENT))
            payload_len = length - ip_len
            new_c = c - udp - ESP_HDR_LEN - t.iv_len
        block = t.block_len  # a power of two
        padded = (payload_len + (ESP_TRAILER_LEN + block - 1)) & -block
        esn_room = 4 if (rec.esn and not t.is_aead) else 0
        room = size - (c + ip_len + t.icv_len + esn_room) if new_c >= 0 else -1
        # Scalar bounds first: a mask is built only when some packet is out of bounds.
        if int(seq.min()) == 0 or int(seq.max()) > sa.seq_limit:
            checks.append(((seq == 0) | (seq > np.uint64(sa.seq_limit)), Verdict.SEQ_OVERFLOW))
        if int(padded.max()) > room:
            checks.append((padded > room, Verdict.TOO_BIG))
        verdicts = first_failure(checks, slots.size)
        if verdicts is not None:
            meta["verdict"][slots] = verdicts
            keep = verdicts == 0
            if keep.any():
                self._encap_group(batch, sa, slots[keep], c, False)
            return

        n = slots.size
        base = batch.slot_starts()[:n] if dense else slots * size
        # (IPv6 with UDP is left out: its UDP checksum covers the ciphertext.)
        memoize = (dense and tunnel and t.is_aead and not rec.tfc_pad and not (rec.ipv6 and udp)
                   and _steady(batch, "esp-encap-lengths", meta["length"][:n]))
        # The memo's key: inner header bytes as they are before encryption overwrites them.
        memo_key = _inner_key(data, size, c, n) if memoize else None
        ct_c = c + ip_len  # the payload is encrypted where it lies
        ct_start = base + ct_c
        if tunnel and rec.tfc_pad and (extra := payload_len - length).any():
            # RFC 4303 §2.7: TFC padding (zeros) after the inner packet.
            vec.scatter_masked(data, ct_start + length,
                               np.zeros((n, int(extra.max())), np.uint8), extra)
        # Trailer: padding 1, 2, 3, ..., Pad Length (RFC 4303 §2.4), Next Header (§2.6).
        # Written with a fixed width per algorithm: what spills past a packet's trailer lands
        # where its ICV goes, which is written afterwards.
        pad = padded - payload_len - ESP_TRAILER_LEN
        width = block + ESP_TRAILER_LEN - 1 if block > 4 else 5
        if int(pad.max()) + ESP_TRAILER_LEN > width:  # TFC or odd lengths: the long way
            width = int(pad.max()) + ESP_TRAILER_LEN
        if tunnel:
            trailer = (_TUNNEL_TRAILERS[0, :, :width][pad] if all_v4
                       else _TUNNEL_TRAILERS[_IS_V6[version], pad, :width])
        else:
            trailer = _TRAILERS[pad, :width]
            trailer[np.arange(n), pad + 1] = next_header
        windows(data, width)[ct_start + payload_len] = trailer

        # The header block [IP][UDP][ESP][IV] at new_c of every slot.
        dtype = header_dtype(6 if rec.ipv6 else 4, outer if tunnel else ip_len, bool(udp),
                             t.iv_len)
        total = (ct_c - new_c) + padded + t.icv_len  # the new packet's length
        if not tunnel:
            old = GroupRows(data, dtype, size, c, slots, dense).rec
            old_ip = old["ip"].copy()
            old_opts = old["ip_options"].copy() if "ip_options" in (dtype.names or ()) else None
        hdr = GroupRows(data, dtype, size, new_c, slots, dense)
        h = hdr.rec
        if tunnel:
            raw = hdr.fill(self._template(sa, dtype))
            ip = h["ip"]
            # RFC 4301 §5.1.2.1: DSCP and ECN are copied from the inner header.
            tos = peek["b1"] if all_v4 else np.where(
                version == 4, peek["b1"], ((b0 & 0x0F) << 4) | (peek["b1"] >> 4))
            if rec.ipv6:
                ip["ver_tc_flow"] = (tos.astype(np.uint32) << 20) | 0x60000000
                ip["payload_length"] = total - IPV6_HDR_LEN
            else:
                raw[:, 1] = tos
                ip["total_length"] = total
                ident = (seq & np.uint64(0xFFFF)).astype(np.int64)  # distinct over 2^16
                ip["ident"] = ident
                # DF is copied from an inner IPv4 header (RFC 4301 §8.1 default).
                df = peek["b6"] & 0x40 if all_v4 else np.where(version == 4, peek["b6"] & 0x40, 0)
                raw[:, 6] = df
                # RFC 1071 sum: the template's words plus the fields set here. TOS is the
                # low byte of word 0, the DF byte the high byte of word 3: they never overlap.
                varying = (df.astype(np.int64) << 8) | tos
                csum_base = total + (self._template_sum(sa, dtype) - 1) + varying
                ip["checksum"] = 0xFFFE - (csum_base + ident) % 0xFFFF
        else:
            h["ip"] = old_ip
            if old_opts is not None:
                h["ip_options"] = old_opts
            proto = PROTO_UDP if udp else int(Protocol.ESP)
            h["esp"]["spi"] = rec.spi
            if rec.ipv6:
                h["ip"]["next_header"] = proto
                h["ip"]["payload_length"] = total - IPV6_HDR_LEN
            else:
                h["ip"]["proto"] = proto
                h["ip"]["total_length"] = total
        if udp:
            assert rec.encap is not None
            if not tunnel:
                h["udp"]["sport"] = rec.encap.local_port
                h["udp"]["dport"] = rec.encap.remote_port
                h["udp"]["checksum"] = 0  # RFC 3948 §2.1 over IPv4; IPv6 computes it below
            h["udp"]["length"] = padded + (UDP_HDR_LEN + ESP_HDR_LEN + t.iv_len + t.icv_len)
        h["esp"]["seq"] = seq  # RFC 4303 §2.2: the low 32 bits (assignment truncates)
        if t.is_aead:
            h["iv"] = seq  # RFC 4106 §3.1 / RFC 7634 §2: the IV is a counter
        elif t.kind is CipherKind.AES_CBC:
            h["iv"] = np.frombuffer(self.random(16 * n), dtype=np.uint8).reshape(n, 16)
        hdr.commit()
        if not tunnel and not rec.ipv6:
            vec.ipv4_checksum(data, base + new_c, ip_len)

        esp_c = new_c + (outer if tunnel else ip_len) + udp
        if t.is_aead:
            cache = self._cache(batch, "esp-encrypt", 16)
            cache.set_salt(sel, dense, sa.salt_array)
            cache.nonce["iv"][sel] = seq
            if rec.esn:
                # RFC 4106 §5: AAD = SPI || Seq high || Seq low; the high half is never sent.
                cache.esn_aad["spi"][sel] = rec.spi
                cache.esn_aad["seq"][sel] = seq
            args = cache.args(slots, ct_c, padded, esp_c, rec.esn, dense)
            assert sa.aead_encrypt_into is not None
            _consume(starmap(sa.aead_encrypt_into, args))
        else:
            esp_off = base + esp_c
            if t.kind is CipherKind.AES_CBC:
                _cbc_run(batch, slots, ct_c, padded, vec.gather(data, esp_off + ESP_HDR_LEN, 16),
                         sa, encrypt=True)
            ct_end = ct_start + padded
            vec.scatter(data, ct_end, _hmac_many(data, sa, seq, esp_off, ct_end))
        if udp and rec.ipv6:
            _udp6_checksum(data, base + new_c, total)

        meta["offset"][sel] = _offsets(batch, new_c)[:n] if dense else base + new_c
        meta["length"][sel] = total
        self._counted(sa, n, int(length.sum()))
        if memo_key is not None:
            # Steady traffic repeats this geometry slot for slot: remember what only it
            # decides, so the next such batch rewrites it instead of computing it again.
            batch._views["esp-encap-memo"] = _EncapMemo(
                batch, sa, c, dtype, new_c, memo_key, length,
                None if rec.ipv6 else csum_base, trailer, ct_start + payload_len, width,
                total, self._cache(batch, "esp-encrypt", 16))

    @staticmethod
    def _template(sa: SaState, dtype: np.dtype[np.void]) -> npt.NDArray[np.uint8]:
        """The constant part of an outbound tunnel header block for this SA."""
        key = ("esp-template", dtype)
        tmpl = sa.derived.get(key)
        if tmpl is None:
            rec = sa.record
            t = np.zeros((), dtype=dtype)
            udp = rec.encap is not None
            proto = PROTO_UDP if udp else int(Protocol.ESP)
            if rec.ipv6:
                t["ip"]["next_header"], t["ip"]["hop_limit"] = proto, OUTER_TTL
            else:
                t["ip"]["ver_ihl"], t["ip"]["ttl"], t["ip"]["proto"] = 0x45, OUTER_TTL, proto
            t["ip"]["src"] = np.frombuffer(sa.local_addr, dtype=np.uint8)
            t["ip"]["dst"] = np.frombuffer(sa.remote_addr, dtype=np.uint8)
            if udp:
                assert rec.encap is not None
                t["udp"]["sport"], t["udp"]["dport"] = rec.encap.local_port, rec.encap.remote_port
            t["esp"]["spi"] = rec.spi
            sa.derived[key] = tmpl = np.frombuffer(t.tobytes(), dtype=np.uint8)
        assert isinstance(tmpl, np.ndarray)
        return tmpl

    @staticmethod
    def _template_sum(sa: SaState, dtype: np.dtype[np.void]) -> int:
        """RFC 1071 sum of the template's IPv4 header words (varying fields are zero)."""
        key = ("esp-template-sum", dtype)
        total = sa.derived.get(key)
        if total is None:
            raw = EspCodec._template(sa, dtype)[:IPV4_HDR_LEN].tobytes()
            total = sum(int.from_bytes(raw[i : i + 2], "big") for i in range(0, 20, 2))
            sa.derived[key] = total
        assert isinstance(total, int)
        return total

    # ================================================================== decap
    def decap(self, batch: Batch) -> None:
        """Verify, decrypt and strip ESP from every passing packet (each an IP packet).

        On return each passing packet is the inner packet (tunnel mode) or the restored
        transport-mode packet; its ``sa`` column names the inbound SA and ``seq`` holds the
        full (ESN-inferred) sequence number.
        """
        n, meta, data, size = batch.count, batch.meta, batch.data, batch.slot_size
        # Taken out whatever happens: any other path may change the argument views it relies on.
        memo = batch._views.pop("esp-decap-memo", None)
        if n == 0:
            return
        # The memo's key covers the placement, version, header length, protocol and lengths.
        if isinstance(memo, _DecapMemo) and memo.replay(self, batch):
            return
        bases = batch.slot_starts()
        if not meta["verdict"][:n].any():
            # Fast path: every packet at the same place in its slot, one header layout.
            off = meta["offset"][:n]
            c0 = int(off[0])
            if c0 + IPV6_HDR_LEN <= size and (off == _offsets(batch, c0)[:n]).all():
                peek = rows(data, _PROTO_PEEK, size, c0)[:n]
                b0, p4, p6 = int(peek["b0"][0]), int(peek["p4"][0]), int(peek["p6"][0])
                proto = p4 if b0 >> 4 == 4 else p6
                same = (peek["b0"] == b0) & ((peek["p4"] if b0 >> 4 == 4 else peek["p6"]) == proto)
                if same.all() and (meta["length"][:n] >= IPV4_HDR_LEN).all():
                    self._decap_layout(batch, _arange(batch)[:n], c0, b0, proto, True)
                    return
        live = np.flatnonzero(meta["verdict"][:n] == Verdict.PASS)
        if live.size == 0:
            return
        off = meta["offset"][live].astype(np.int64)
        in_slot = off - bases[live]
        fits = (in_slot >= 0) & (in_slot + IPV6_HDR_LEN <= size)
        off = np.where(fits, off, bases[live])
        short = ~fits | (meta["length"][live] < IPV4_HDR_LEN)
        b0 = data[off].astype(np.int64)
        proto = np.where(b0 >> 4 == 4, data[off + 9], data[off + 6]).astype(np.int64)
        key = np.where(short, -1, (in_slot << 16) | (b0 << 8) | proto)
        for k, pos in group_by(key):
            slots = live[pos]
            if k < 0:
                meta["verdict"][slots] = Verdict.RUNT
                continue
            self._decap_layout(batch, slots, k >> 16, (k >> 8) & 0xFF, k & 0xFF, False)

    def _decap_layout(self, batch: Batch, slots: I64, c: int, b0: int, proto: int,
                      dense: bool) -> None:
        """Packets whose outer header starts at ``c`` with first byte ``b0``, protocol
        ``proto``: one header layout."""
        data, meta, size = batch.data, batch.meta, batch.slot_size
        version = b0 >> 4
        ip_len = (b0 & 0xF) * 4 if version == 4 else IPV6_HDR_LEN
        if version not in (4, 6) or ip_len < IPV4_HDR_LEN:
            meta["verdict"][slots] = Verdict.PROTO
            return
        if proto not in (Protocol.ESP, PROTO_UDP):
            unsupported = version == 6 and proto in IPV6_EXT_HEADERS
            meta["verdict"][slots] = Verdict.UNSUPPORTED if unsupported else Verdict.PROTO
            return
        udp = proto == PROTO_UDP
        dtype = header_dtype(version, ip_len, udp, 0)
        if c + dtype.itemsize > size:
            meta["verdict"][slots] = Verdict.RUNT
            return
        sel: Sel = slice(0, slots.size) if dense else slots
        h = GroupRows(data, dtype, size, c, slots, dense).rec
        ip = h["ip"]
        length = meta["length"][sel]
        if version == 4:
            ip_total = ip["total_length"].astype(np.int64)
            frag = ip["frag"] & 0x3FFF
            checks = [(ip_total > length, Verdict.RUNT),
                      ((frag != 0) if frag.any() else None, Verdict.FRAGMENT)]
        else:
            ip_total = ip["payload_length"].astype(np.int64) + IPV6_HDR_LEN
            checks = [(ip_total > length, Verdict.RUNT)]
        spi = h["esp"]["spi"]
        if udp:
            tiny = ip_total == ip_len + UDP_HDR_LEN + 1
            if tiny.any():
                first = data[slots * size + (c + ip_len + UDP_HDR_LEN)]
                checks.append((tiny & (first == NAT_KEEPALIVE), Verdict.KEEPALIVE))
        if int(ip_total.min()) < dtype.itemsize:
            checks.append((ip_total < dtype.itemsize, Verdict.RUNT))
        if udp:
            checks.append((spi == 0, Verdict.ENCAP))  # RFC 3948 §2.2: Non-ESP Marker, IKE
        spi0 = int(spi[0])
        index = -1  # the one SA of the whole group, when all share an SPI
        if (spi == spi0).all():
            index, found = self.sas.lookup_one(Protocol.ESP, spi0)
            if not found:
                checks.append((np.ones(slots.size, dtype=np.bool_), Verdict.NO_SA))
        else:
            sa_idx, found_mask = self.sas.lookup_inbound(Protocol.ESP, spi)
            checks.append((~found_mask, Verdict.NO_SA))
        verdicts = first_failure(checks, slots.size)
        seq_lo = h["esp"]["seq"]
        if index >= 0 and verdicts is None:
            meta["sa"][sel] = index
            sa = self._sa(index, Direction.IN)
            if sa is None:
                meta["verdict"][slots] = Verdict.NO_SA
                return
            self._decap_sa(batch, sa, slots, c, version, ip_len, udp, ip_total, seq_lo, dense)
            return
        if index >= 0:
            sa_idx = np.full(slots.size, index, dtype=np.int64)
        if verdicts is not None:
            meta["verdict"][slots] = verdicts
            keep = verdicts == 0
            slots, ip_total = slots[keep], ip_total[keep]
            seq_lo, sa_idx = seq_lo[keep], sa_idx[keep]
            dense = False
        meta["sa"][slots if not dense else sel] = sa_idx
        for k, pos in group_by(sa_idx.astype(np.int64)):
            sa = self._sa(k, Direction.IN)
            if sa is None:
                meta["verdict"][slots[pos]] = Verdict.NO_SA
                continue
            whole = pos.size == slots.size
            self._decap_sa(batch, sa, slots if whole else slots[pos], c, version, ip_len, udp,
                           ip_total if whole else ip_total[pos],
                           seq_lo if whole else seq_lo[pos], dense and whole)

    def _decap_sa(self, batch: Batch, sa: SaState, slots: I64, c: int, version: int,
                  ip_len: int, udp: bool, ip_total: I64, seq_lo: npt.NDArray[np.uint32],
                  dense: bool) -> None:
        rec, t = sa.record, sa.esp
        assert t is not None
        data, meta, size = batch.data, batch.meta, batch.slot_size
        n = slots.size
        if version != rec.local_addr.version or udp != (rec.encap is not None):
            meta["verdict"][slots] = Verdict.PROTO if udp == (rec.encap is not None) \
                else Verdict.ENCAP
            return
        if self.replay:
            seq = sa.replay.infer(seq_lo)
        else:
            seq = meta["seq"][slots if not dense else slice(0, n)].copy()
        esp_c = c + ip_len + (UDP_HDR_LEN if udp else 0)
        ct_c = esp_c + ESP_HDR_LEN + t.iv_len
        ct_len = ip_total - ((ct_c - c) + t.icv_len)  # encrypted bytes, trailer included
        esn_room = 4 if (rec.esn and not t.is_aead) else 0
        room = size - (ct_c + t.icv_len + esn_room)
        lo, hi = int(ct_len.min()), int(ct_len.max())
        verdicts = first_failure([
            (None if not self.replay or sa.replay.all_fresh(seq) else sa.replay.precheck(seq),
             Verdict.REPLAY),
            (ct_len < ESP_TRAILER_LEN if lo < ESP_TRAILER_LEN else None, Verdict.RUNT),
            ((ct_len & (t.block_len - 1)) != 0, Verdict.PAD),  # RFC 4303 §2.4 alignment
            (ct_len > room if hi > room else None, Verdict.TOO_BIG),
        ], n)
        if verdicts is not None:
            meta["verdict"][slots] = verdicts
            keep = verdicts == 0
            slots, seq, ct_len = slots[keep], seq[keep], ct_len[keep]
            n, dense = slots.size, False
            if n == 0:
                return
        sel: Sel = slice(0, n) if dense else slots
        base = batch.slot_starts()[:n] if dense else slots * size
        ct_start = base + ct_c
        meta["seq"][sel] = seq
        if (dense and t.is_aead and rec.mode is Mode.TUNNEL
                and _steady(batch, "esp-decap-lengths", meta["length"][:n])):
            # Everything up to here depended on the outer headers only: remember them.
            memo = _DecapMemo.build(batch, sa, c, version, ip_len, udp, esp_c, ct_c, ct_len)
            if memo is not None:
                batch._views["esp-decap-memo"] = memo

        if t.is_aead:
            authentic = self._aead_decrypt(batch, sa, t, slots, seq, esp_c, ct_c, ct_len, dense)
        else:
            esp_off = base + esp_c
            authentic = _hmac_verify(data, sa, t, seq, esp_off, ct_start + ct_len)
            if t.kind is CipherKind.AES_CBC:
                # Encrypt-then-MAC: only authenticated ciphertext is decrypted.
                a = slice(None) if authentic is None else np.flatnonzero(authentic)
                iv = vec.gather(data, esp_off[a] + ESP_HDR_LEN, 16)
                if iv.size:
                    _cbc_run(batch, slots[a], ct_c, ct_len[a], iv, sa, encrypt=False)

        self._decap_finish(batch, sa, slots, dense, c, version, ip_len, ct_c, ct_start, ct_len,
                           seq, authentic)

    def _decap_finish(self, batch: Batch, sa: SaState, slots: I64, dense: bool, c: int,
                      version: int, ip_len: int, ct_c: int, ct_start: I64, ct_len: I64,
                      seq: U64, authentic: Mask | None) -> None:
        """After decryption: trailer, inner packet, window commit, metadata."""
        rec = sa.record
        data, meta, size = batch.data, batch.meta, batch.slot_size
        n = slots.size
        sel: Sel = slice(0, n) if dense else slots
        # The trailer (RFC 4303 §2.4-2.6): 4 bytes before it, Pad Length, Next Header.
        tail = windows(data, 8)[ct_start + (ct_len - 6)]  # 4 bytes, Pad Length, NH, 2 more
        pad = tail[:, 4].astype(np.int64)
        next_header = tail[:, 5]
        bad_pad = pad + ESP_TRAILER_LEN > ct_len
        if int(pad.max()) <= 4:
            # RFC 4303 §2.4: the receiver checks the default padding 1, 2, 3, ...
            word = tail.view("<u4")[:, 0]
            bad_pad |= (word & _PAD_MASK32[pad]) != _PAD_EXPECT32[pad]
        else:
            checked = ~bad_pad if authentic is None else ~bad_pad & authentic
            bad_pad |= _bad_padding(data, ct_start + ct_len - 2, pad, checked)
        inner_len = ct_len - pad - ESP_TRAILER_LEN

        if rec.mode is Mode.TUNNEL:
            inner = GroupRows(data, INNER_PEEK, size, ct_c, slots, dense).rec
            iv_ = inner["b0"] >> 4
            if (iv_ == 4).all():
                ilen = inner["w2"].astype(np.int64)
                wrong_nh = next_header != NH_IPV4
            else:
                ilen = np.where(iv_ == 4, inner["w2"], inner["w4"].astype(np.int64) + IPV6_HDR_LEN)
                wrong_nh = _NH_OF_VERSION[iv_] != next_header
            bad_len = (ilen > inner_len) | (inner_len < IPV4_HDR_LEN)
            new_off = ct_start
            # The inner header's own length drops TFC padding (RFC 4303 §2.7).
            new_len = np.minimum(ilen, inner_len)
        else:
            # Transport: the IP header moves up against the payload (RFC 4303 §3.4.4).
            wrong_nh = bad_len = np.zeros(n, dtype=np.bool_)
            dtype = header_dtype(version, ip_len, False, 0)
            old = GroupRows(data, dtype, size, c, slots, dense).rec
            moved = GroupRows(data, dtype, size, ct_c - ip_len, slots, dense)
            saved_ip = old["ip"].copy()
            saved_opts = old["ip_options"].copy() if "ip_options" in (dtype.names or ()) else None
            new_len = ip_len + inner_len
            moved.rec["ip"] = saved_ip
            if saved_opts is not None:
                moved.rec["ip_options"] = saved_opts
            if version == 6:
                moved.rec["ip"]["next_header"] = next_header
                moved.rec["ip"]["payload_length"] = new_len - IPV6_HDR_LEN
            else:
                moved.rec["ip"]["proto"] = next_header
                moved.rec["ip"]["total_length"] = new_len
            moved.commit()
            new_off = ct_start - ip_len
            if version == 4:
                vec.ipv4_checksum(data, new_off, ip_len)
        # In tunnel mode a dummy packet (Next Header 59) is also a wrong Next Header: look
        # for it only then. Transport mode takes any Next Header, so it always looks.
        any_wrong_nh = bool(wrong_nh.any()) or rec.mode is Mode.TRANSPORT
        verdict = first_failure([
            (None if authentic is None else ~authentic, Verdict.INTEGRITY),
            (bad_pad, Verdict.PAD),
            (next_header == NH_NONE if any_wrong_nh else None, Verdict.DUMMY),
            (wrong_nh if any_wrong_nh else None, Verdict.PROTO),
            (bad_len, Verdict.RUNT),
        ], n)
        ok = None if verdict is None else verdict == 0
        # Only verified packets move the window, in order (RFC 4303 §3.4.3).
        replay = sa.replay.commit(seq, ok) if self.replay else None
        if verdict is not None or (replay is not None and replay.any()):
            if verdict is None:
                verdict = np.zeros(n, dtype=np.uint8)
            if replay is not None:
                verdict[replay if ok is None else replay & ok] = Verdict.REPLAY
            ok = verdict == 0
            meta["verdict"][slots] = verdict
            slots, new_off, new_len, sel = slots[ok], new_off[ok], new_len[ok], slots[ok]
        meta["offset"][sel] = new_off
        meta["length"][sel] = new_len
        self._counted(sa, slots.size, int(new_len.sum()))

    def _aead_decrypt(self, batch: Batch, sa: SaState, t: EspTransform, slots: I64, seq: U64,
                      esp_c: int, ct_c: int, ct_len: I64, dense: bool,
                      same_geometry: bool = False) -> Mask | None:
        """Decrypt in place; None when every packet authenticated, else the mask of those
        that did."""
        data, size = batch.data, batch.slot_size
        sel: Sel = slice(0, slots.size) if dense else slots
        cache = self._cache(batch, "esp-decrypt", -16)
        cache.set_salt(sel, dense, sa.salt_array)
        cache.nonce["iv"][sel] = rows(data, _IV64, size, esp_c + ESP_HDR_LEN)[sel]
        if sa.record.esn:
            cache.esn_aad["spi"][sel] = sa.record.spi
            cache.esn_aad["seq"][sel] = seq
        args = (cache.current(slots.size) if same_geometry
                else cache.args(slots, ct_c, ct_len + t.icv_len, esp_c, sa.record.esn, dense))
        assert sa.aead_decrypt_into is not None
        return _decrypt_all(sa.aead_decrypt_into, args)


def _decrypt_all(decrypt_into: Callable[..., object], args: list[AeadArgs]) -> Mask | None:
    """One ``decrypt_into`` per argument tuple; None when every packet authenticated, else
    the mask of those that did."""
    authentic: Mask | None = None
    remaining = iter(args)
    calls = starmap(decrypt_into, remaining)
    while True:
        try:
            _consume(calls)
            return authentic
        except InvalidTag:
            # OpenSSL checked the tag in constant time. starmap resumes with the next
            # packet; the failed one is the last the argument iterator handed out.
            if authentic is None:
                authentic = np.ones(len(args), dtype=np.bool_)
            authentic[len(args) - length_hint(remaining) - 1] = False


def _bad_padding(data: npt.NDArray[np.uint8], pad_len_at: I64, pad: I64, check: Mask) -> Mask:
    """Padding other than 1, 2, 3, ... (RFC 4303 §2.4), for pads longer than 4 bytes."""
    p = np.where(check, pad, 0)
    width = int(p.max())
    if width == 0:
        return np.zeros(pad.size, dtype=np.bool_)
    got = data[(pad_len_at - p)[:, None] + _COLS[:width]]
    cols = _COLS[:width]
    return ((got != cols + 1) & (cols < p[:, None])).any(axis=1)  # type: ignore[no-any-return]


def _steady(batch: Batch, name: str, length: npt.NDArray[np.uint32]) -> bool:
    """True when this batch's packet lengths repeat the previous batch's (the traffic looks
    steady): only then is a memo worth building. Remembers them for the next call."""
    previous = batch._views.get(name)
    steady = (isinstance(previous, np.ndarray) and previous.shape == length.shape
              and bool((previous == length).all()))
    batch._views[name] = length.copy()
    return steady


_KEY_MASK = np.uint64(0x00FF_0000_FFFF_FFFF)  # inner bytes 0-3 and 6 (not IPv4's ID)
_U64_LE = np.dtype("<u8")


def _inner_key(data: npt.NDArray[np.uint8], size: int, c: int, n: int) -> U64:
    """Per slot, the inner-header bytes the outer header depends on: version, TOS/traffic
    class, total length, DF (and IPv6 flow label bits, which only make the key stricter)."""
    key: U64 = rows(data, _U64_LE, size, c)[:n] & _KEY_MASK
    return key


_SEQ32 = np.dtype(">u4")
_U32 = 1 << 32
# The batch metadata's first eight bytes are offset (<u4) then length (<u4): read as one
# little-endian word they are offset | length << 32, so one comparison or one write covers
# both columns.
assert META_DTYPE.fields is not None
assert META_DTYPE.fields["offset"][:2] == (np.dtype("<u4"), 0)
assert META_DTYPE.fields["length"][:2] == (np.dtype("<u4"), 4)


def _meta_offlen(batch: Batch) -> U64:
    """Every slot's offset and length metadata as one little-endian word (a live view)."""
    view = batch._views.get("meta-offlen")
    if not isinstance(view, np.ndarray) or view.base is not batch.meta:
        meta = batch.meta
        view = np.ndarray(meta.shape, dtype=_U64_LE, buffer=meta, strides=meta.strides)
        batch._views["meta-offlen"] = view
    return view


def _offlen(offset: npt.NDArray[Any], length: npt.NDArray[Any]) -> U64:
    """The words ``_meta_offlen`` reads for these offsets and lengths."""
    word: U64 = offset.astype(np.uint64) | (length.astype(np.uint64) << np.uint64(32))
    return word


def _words64(batch: Batch) -> U64:
    """The batch buffer as overlapping little-endian 64-bit words: element i is bytes
    i .. i+7. Indexing it with an array of offsets reads or writes 8 bytes at each offset
    in one 1-D operation, about three times cheaper than ``windows`` rows of 8 bytes."""
    view = batch._views.get("words64")
    if not isinstance(view, np.ndarray) or view.base is not batch.data:
        data = batch.data
        view = np.ndarray((data.shape[0] - 7,), dtype=_U64_LE, buffer=data, strides=(1,))
        batch._views["words64"] = view
    return view


@lru_cache(maxsize=8)
def _ident_cycle(n: int) -> npt.NDArray[np.uint16]:
    """Big-endian (s + i) mod 2^16 at index s + i: the slice [s : s + n] holds the IPv4
    Identification of n consecutive sequence numbers whose first has low 16 bits s."""
    cycle = (np.arange((1 << 16) + n, dtype=np.int64) & 0xFFFF).astype(">u2")
    cycle.flags.writeable = False
    return cycle


class _EncapMemo:
    """What one dense tunnel-mode AEAD encapsulation computed that depends only on the SA
    and each slot's geometry (inner length, TOS, DF), not on the sequence numbers, and
    views of the batch for everything a later batch of the same geometry rewrites."""

    __slots__ = (
        "sa", "n", "data", "meta", "args", "verdict", "sa_col", "sa_want", "offlen",
        "offlen_want", "seq", "run", "ar", "inner", "inner_tmp", "key", "trailer_view",
        "trailer_at", "trailer", "header_rows", "header", "ident", "checksum", "csum_base",
        "csum_run", "tmp", "esp_seq", "iv", "nonce_iv", "aad_seq",
        "offlen_out", "inner_bytes",
    )

    def __init__(self, batch: Batch, sa: SaState, c: int, dtype: np.dtype[Any], new_c: int,
                 key: U64, length: I64, csum_base: I64 | None, trailer: npt.NDArray[np.uint8],
                 trailer_at: I64, width: int, total: I64, cache: SlotArgCache) -> None:
        t = sa.esp
        assert t is not None
        n, data, meta, size = batch.count, batch.data, batch.meta, batch.slot_size
        self.sa, self.n, self.data, self.meta = sa, n, data, meta
        # The same slots, salts and argument views serve every batch of this geometry: only
        # a group taking another path (which drops the memo first) can change them.
        self.args = cache.current(n)
        self.nonce_iv = cache.nonce["iv"][:n]
        self.aad_seq = cache.esn_aad["seq"][:n]
        # What a batch must look like to be served: checked before anything is written.
        self.verdict = meta["verdict"][:n]
        self.sa_col = meta["sa"][:n]
        self.sa_want = np.full(n, sa.index, dtype=self.sa_col.dtype).tobytes()
        self.offlen = _meta_offlen(batch)[:n]
        self.offlen_want = _offlen(_offsets(batch, c)[:n], length).tobytes()
        self.seq = meta["seq"][:n]
        self.run = np.empty(n, dtype=np.uint64)
        self.ar = np.arange(n, dtype=np.uint64)
        self.inner = rows(data, _U64_LE, size, c)[:n]
        self.inner_tmp = np.empty(n, dtype=np.uint64)
        self.key = key.tobytes()
        # What it writes.
        self.trailer_at = trailer_at
        if width <= 8 <= ESP_TRAILER_LEN + t.icv_len:
            # 8 bytes from the trailer's start end inside the ICV, which is written after.
            words = np.zeros((n, 8), dtype=np.uint8)
            words[:, :width] = trailer
            self.trailer_view: npt.NDArray[Any] = _words64(batch)
            self.trailer: npt.NDArray[Any] = words.view(_U64_LE)[:, 0].copy()
        else:
            self.trailer_view = windows(data, width)
            self.trailer = trailer.copy()
        self.header_rows = rows(data, bytes_dtype(dtype.itemsize), size, new_c)[:n]
        self.header = self.header_rows.copy()
        h = rows(data, dtype, size, new_c)[:n]
        self.csum_base = csum_base
        if csum_base is not None:
            self.ident, self.checksum = h["ip"]["ident"], h["ip"]["checksum"]
            self.csum_run = csum_base + np.arange(n)
            self.tmp = np.empty(n, dtype=np.int64)
        self.esp_seq, self.iv = h["esp"]["seq"], h["iv"]
        self.offlen_out = _offlen(_offsets(batch, new_c)[:n], total)
        self.inner_bytes = int(length.sum())

    def replay(self, codec: EspCodec, batch: Batch) -> bool:
        """Encapsulate the batch from the memo if its geometry is unchanged; False, having
        written nothing, if not (the caller then takes the general path, which checks
        everything)."""
        n, sa = batch.count, self.sa
        if (n != self.n or batch.data is not self.data or batch.meta is not self.meta
                or codec.sas[sa.index] is not sa):
            return False
        # Every packet passing, of this SA, at the memo's place in its slot, of its length.
        if (np.count_nonzero(self.verdict) or self.sa_col.tobytes() != self.sa_want
                or self.offlen.tobytes() != self.offlen_want):
            return False
        seq, first = self.seq, int(self.seq[0])
        run = np.add(self.ar, first, out=self.run)
        consecutive = seq.tobytes() == run.tobytes()  # first, first + 1, ...: the usual
        if consecutive:
            if first == 0 or first + n - 1 > sa.seq_limit:
                return False
        elif int(seq.min()) == 0 or int(seq.max()) > sa.seq_limit:
            return False
        np.bitwise_and(self.inner, _KEY_MASK, out=self.inner_tmp)
        if self.inner_tmp.tobytes() != self.key:
            return False

        self.trailer_view[self.trailer_at] = self.trailer
        self.header_rows[...] = self.header
        if self.csum_base is not None:
            if consecutive and n <= 1 << 16:
                # Identification = seq mod 2^16 (distinct over 2^16 packets); the RFC 1071
                # sum adds it to the per-slot base. Consecutive numbers from s: slot i gets
                # s + i, less 2^16 once s + i passes it, and 2^16 = 1 (mod 0xFFFF).
                s = first & 0xFFFF
                self.ident[...] = _ident_cycle(n)[s : s + n]
                acc = np.add(self.csum_run, s, out=self.tmp)
                if s + n > 1 << 16:
                    acc[(1 << 16) - s :] -= 1
                np.remainder(acc, 0xFFFF, out=acc)
                self.checksum[...] = 0xFFFE - acc
            else:
                ident = (seq & np.uint64(0xFFFF)).astype(np.int64)
                self.ident[...] = ident
                self.checksum[...] = 0xFFFE - (self.csum_base + ident) % 0xFFFF
        self.esp_seq[...] = seq  # RFC 4303 §2.2: the low 32 bits (assignment truncates)
        self.iv[...] = seq  # RFC 4106 §3.1 / RFC 7634 §2: the IV is a counter
        self.nonce_iv[...] = seq
        if sa.record.esn:
            self.aad_seq[...] = seq  # RFC 4106 §5: AAD = SPI || Seq high || Seq low
        assert sa.aead_encrypt_into is not None
        _consume(starmap(sa.aead_encrypt_into, self.args))
        self.offlen[...] = self.offlen_out
        codec._counted(sa, n, self.inner_bytes)
        return True


@lru_cache(maxsize=64)
def _outer_mask(width: int, version: int, udp: bool) -> U64:
    """Which bits of the outer header bytes (IP, UDP, SPI) decapsulation's checks and
    geometry depend on, as little-endian words (zero past ``width``): the fields that
    change per packet (IPv4 ID, TTL, checksum, TOS; the UDP checksum) are masked out."""
    mask = np.zeros(-(-width // 8) * 8, dtype=np.uint8)
    mask[:width] = 0xFF
    if version == 4:
        mask[[1, 4, 5, 8, 10, 11]] = 0
    else:
        mask[[1, 2, 3, 7]] = 0  # traffic class/flow label, hop limit
        mask[0] = 0xF0
    if udp:
        ip_len = width - 4 - UDP_HDR_LEN  # the key ends with the 4-byte SPI
        mask[ip_len + 6 : ip_len + 8] = 0
    words: U64 = mask.view(_U64_LE)
    words.flags.writeable = False
    return words


# An inner IPv4 header's first 8 bytes as a little-endian word: the version nibble and the
# Total Length (RFC 791 §3.1).
_INNER_V4_MASK = np.uint64(0xFFFF_00F0)


class _DecapMemo:
    """The outer-header work of one dense tunnel-mode AEAD decapsulation: which SA, where
    the ciphertext starts and how long it is. A batch whose outer headers (minus the fields
    that change per packet) equal the remembered ones skips straight to decryption; the
    sequence numbers, the replay pre-check, the ICVs and everything inside are checked as
    always."""

    __slots__ = (
        "sa", "c", "n", "version", "ip_len", "esp_c", "ct_c", "ct_len", "data", "meta",
        "verdict", "offlen", "offlen_want", "outer", "outer_mask", "outer_tmp", "outer_key",
        "seq_lo", "meta_seq", "meta_sa", "ar64", "iv_in", "args",
        "nonce_iv", "aad_seq", "words", "trailer_at", "room", "offsets", "fin_at",
        "fin_mask", "fin_key", "fin_ilen", "fin_offlen", "fin_bytes",
    )

    @classmethod
    def build(cls, batch: Batch, sa: SaState, c: int, version: int, ip_len: int, udp: bool,
              esp_c: int, ct_c: int, ct_len: I64) -> _DecapMemo | None:
        width = esp_c - c + 4  # the outer headers through the SPI
        if c + -(-width // 8) * 8 > batch.slot_size:
            return None
        return cls(batch, sa, c, version, ip_len, udp, esp_c, ct_c, ct_len, width)

    def __init__(self, batch: Batch, sa: SaState, c: int, version: int, ip_len: int,
                 udp: bool, esp_c: int, ct_c: int, ct_len: I64, width: int) -> None:
        n, data, meta, size = batch.count, batch.data, batch.meta, batch.slot_size
        self.sa, self.c, self.n, self.version, self.ip_len = sa, c, n, version, ip_len
        self.esp_c, self.ct_c, self.ct_len = esp_c, ct_c, ct_len
        self.data, self.meta = data, meta
        self.verdict = meta["verdict"][:n]
        self.offlen = _meta_offlen(batch)[:n]
        self.offlen_want = _offlen(_offsets(batch, c)[:n], meta["length"][:n]).tobytes()
        self.outer_mask = _outer_mask(width, version, udp)
        words = self.outer_mask.shape[0]
        self.outer = np.ndarray((n, words), dtype=_U64_LE, buffer=data, offset=c,
                                strides=(size, 8))
        self.outer_tmp = np.empty((n, words), dtype=np.uint64)
        self.outer_key = np.bitwise_and(self.outer, self.outer_mask).tobytes()
        self.seq_lo = rows(data, _SEQ32, size, esp_c + 4)[:n]
        self.meta_seq, self.meta_sa = meta["seq"][:n], meta["sa"][:n]
        self.ar64 = np.arange(n, dtype=np.uint64)
        self.iv_in = rows(data, _IV64, size, esp_c + ESP_HDR_LEN)[:n]
        self.args: list[AeadArgs] | None = None  # bound on first use, see replay
        self.words = _words64(batch)
        base = batch.slot_starts()[:n] + ct_c
        self.trailer_at = base + (ct_len - 6)
        self.room = ct_len - ESP_TRAILER_LEN
        self.offsets = base.astype(np.uint32)
        self.fin_key: bytes | None = None  # see _finish_ipv4

    def replay(self, codec: EspCodec, batch: Batch) -> bool:
        """Decapsulate the batch if its geometry is the memo's; False, having changed
        nothing, if not (the caller then takes the general path)."""
        n, sa = batch.count, self.sa
        t = sa.esp
        if (n != self.n or t is None or batch.data is not self.data
                or batch.meta is not self.meta or codec.sas[sa.index] is not sa):
            return False
        # Every packet passing, at the memo's place in its slot, of its length.
        if np.count_nonzero(self.verdict) or self.offlen.tobytes() != self.offlen_want:
            return False
        np.bitwise_and(self.outer, self.outer_mask, out=self.outer_tmp)
        if self.outer_tmp.tobytes() != self.outer_key:
            return False
        seq: U64 | None = None
        run = 0  # when not 0: the sequence numbers are run, run + 1, ..., all right of the window
        if codec.replay:
            window = sa.replay
            lo = self.seq_lo
            first = int(lo[0])
            if (not sa.record.esn and first > window.top and first + n <= _U32
                    and lo.tobytes() == np.arange(first, first + n, dtype=_SEQ32).tobytes()):
                run = first
            if run:
                np.add(self.ar64, run, out=self.meta_seq)
            else:
                seq = window.infer(lo)
                if not window.all_fresh(seq):
                    return False  # the general path sorts replays out packet by packet
                self.meta_seq[...] = seq
        else:
            seq = self.meta_seq.copy()
        self.meta_sa[...] = sa.index
        args = self.args
        if args is None:
            # The creation batch built these slots' argument views and salts, and any other
            # path drops the memo before it changes them.
            cache = codec._cache(batch, "esp-decrypt", -16)
            self.args = args = cache.current(n)
            self.nonce_iv, self.aad_seq = cache.nonce["iv"][:n], cache.esn_aad["seq"][:n]
        self.nonce_iv[...] = self.iv_in
        if sa.record.esn:
            self.aad_seq[...] = seq  # RFC 4106 §5: AAD = SPI || Seq high || Seq low
        assert sa.aead_decrypt_into is not None
        authentic = _decrypt_all(sa.aead_decrypt_into, args)
        batch._views["esp-decap-memo"] = self
        if authentic is None:
            if self.fin_key is not None:
                # The common outcome in one comparison: trailers and inner headers whose
                # checked bits equal those of a batch _finish_ipv4 passed.
                got = self.words[self.fin_at]
                if np.bitwise_and(got, self.fin_mask, out=got).tobytes() == self.fin_key:
                    self._commit(codec, batch, sa, seq, run, self.fin_ilen, self.fin_offlen,
                                 self.fin_bytes)
                    return True
            if self._finish_ipv4(codec, batch, sa, seq, run):
                return True
        if seq is None:
            seq = self.meta_seq.copy()
        codec._decap_finish(batch, sa, _arange(batch)[:n], True, self.c, self.version,
                            self.ip_len, self.ct_c, batch.slot_starts()[:n] + self.ct_c,
                            self.ct_len, seq, authentic)
        return True

    def _finish_ipv4(self, codec: EspCodec, batch: Batch, sa: SaState, seq: U64 | None,
                     run: int) -> bool:
        """The common outcome in a few operations: every packet authentic, default padding of
        at most 3 bytes, an IPv4 inner packet of the length its header gives. Anything else
        returns False, before any state changes, and the general checks run instead."""
        n, data, size = self.n, batch.data, batch.slot_size
        room = self.room
        tail = windows(data, 8)[self.trailer_at]
        pad = tail[:, 4]
        if int(pad.max()) > 3:
            return False
        # One 64-bit compare checks the padding bytes, Pad Length and Next Header (4) at once.
        word = tail.view("<u8")[:, 0]
        inner = rows(data, INNER_PEEK, size, self.ct_c)[:n]
        ilen = inner["w2"].astype(np.int64)
        ok = ((word & _TAIL_MASK[pad]) == _TAIL_V4[pad]) & ((inner["b0"] & 0xF0) == 0x40)
        ok &= (ilen + pad <= room) & (ilen >= IPV4_HDR_LEN)
        if not ok.all():
            return False
        # Every check above reads only the bits these masks keep: a later batch whose bits
        # are the same passes them all, with the same padding and inner lengths.
        self.fin_at = np.concatenate([self.trailer_at, self.offsets.astype(np.int64)])
        self.fin_mask = np.concatenate([_TAIL_MASK[pad], np.full(n, _INNER_V4_MASK)])
        self.fin_key = (self.words[self.fin_at] & self.fin_mask).tobytes()
        self.fin_ilen, self.fin_bytes = ilen, int(ilen.sum())
        self.fin_offlen = _offlen(self.offsets, ilen)
        self._commit(codec, batch, sa, seq, run, ilen, self.fin_offlen, self.fin_bytes)
        return True

    def _commit(self, codec: EspCodec, batch: Batch, sa: SaState, seq: U64 | None, run: int,
                ilen: I64, offlen: U64, nbytes: int) -> None:
        """Every packet verified, decrypted and well formed: move the window (RFC 4303
        §3.4.3, in packet order), then hand the inner packets on."""
        n = self.n
        if codec.replay:
            if run:
                sa.replay.commit_run(run, n)
            else:
                assert seq is not None
                replay = sa.replay.commit(seq, None)
                if replay.any():
                    meta = batch.meta
                    meta["verdict"][:n][replay] = Verdict.REPLAY
                    good = ~replay
                    meta["offset"][:n][good] = self.offsets[good]
                    meta["length"][:n][good] = ilen[good]
                    codec._counted(sa, int(good.sum()), int(ilen[good].sum()))
                    return
        self.offlen[...] = offlen
        codec._counted(sa, n, nbytes)


# The last 8 bytes before the ICV of a packet with p (<= 3) bytes of padding, read as one
# little-endian u64 from 6 bytes before Pad Length: [.., .., 1..p, p, 4(NH), ICV, ICV].
# Mask keeps padding, Pad Length and Next Header; expected holds 1..p, p, 4.
_TAIL_MASK = np.zeros(4, dtype=np.uint64)
_TAIL_V4 = np.zeros(4, dtype=np.uint64)
for _p in range(4):
    _m = np.zeros(8, dtype=np.uint8)
    _e = np.zeros(8, dtype=np.uint8)
    _m[4 - _p : 6] = 0xFF
    _e[4 - _p : 4] = np.arange(1, _p + 1)
    _e[4], _e[5] = _p, NH_IPV4
    _TAIL_MASK[_p] = _m.view("<u8")[0]
    _TAIL_V4[_p] = _e.view("<u8")[0]


def _udp6_checksum(data: npt.NDArray[np.uint8], at: I64, total: I64) -> None:
    """UDP checksum of encapsulated ESP over IPv6, mandatory there (RFC 8200 §8.1)."""
    udp_off = at + IPV6_HDR_LEN
    udp_len = total - IPV6_HDR_LEN
    vec.put_be16(data, udp_off + 6, 0)
    segment = vec.gather_masked(data, udp_off, udp_len)
    pseudo = vec.gather(data, at + 8, 32).astype(np.int64)  # source and destination
    initial = (pseudo[:, 0::2] << 8).sum(axis=1) + pseudo[:, 1::2].sum(axis=1)
    csum = vec.inet_checksum(segment, initial + udp_len + PROTO_UDP)
    vec.put_be16(data, udp_off + 6, np.where(csum == 0, 0xFFFF, csum))


def _hmac_many(data: npt.NDArray[np.uint8], sa: SaState, seq: U64, esp_off: I64,
               ct_end: I64) -> npt.NDArray[np.uint8]:
    """HMAC-SHA2 ICVs over ESP header .. Next Header, with the ESN high bits appended for
    the computation only (RFC 4303 §2.2.1, §3.3.2.1)."""
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


def _hmac_verify(data: npt.NDArray[np.uint8], sa: SaState, t: EspTransform, seq: U64,
                 esp_off: I64, ct_end: I64) -> Mask | None:
    """ICV check in constant time per packet; None when all verify."""
    received = vec.gather(data, ct_end, t.icv_len)  # before the ESN bits overwrite it
    expected = _hmac_many(data, sa, seq, esp_off, ct_end)
    ok = np.fromiter(
        map(hmac.compare_digest, map(bytes, received), map(bytes, expected)),
        dtype=np.bool_, count=received.shape[0])
    return None if ok.all() else ok


def _cbc_run(batch: Batch, slots: I64, ct_c: int, length: I64, iv: npt.NDArray[np.uint8],
             sa: SaState, encrypt: bool) -> None:
    """AES-CBC over many packets at once (RFC 3602), as ECB with the chaining in numpy.

    The ciphertext of every packet starts at byte ``ct_c`` of its slot, so the blocks of the
    group are one strided (packets, blocks, 16) array over the batch buffer. Encryption is
    sequential within a packet, so it walks block columns: block j of every packet in one
    ECB call. Decryption is parallel: every block of every packet in one ECB call, then XOR
    with the previous ciphertext block. Packets shorter than the longest run on over bytes
    of their own slot's tailroom (where their ICV goes afterwards); nothing else is touched.
    """
    n = slots.size
    width = int(length.max())
    size = batch.slot_size
    dense = n and int(slots[-1]) == n - 1
    rows_view = rows(batch.data, np.dtype(("u1", (width,))), size, ct_c)
    blocks = (rows_view[:n] if dense else rows_view[slots]).reshape(n, width // 16, 16)
    if encrypt:
        ctx = sa.ecb_encrypt
        assert ctx is not None
        prev = iv
        for j in range(blocks.shape[1]):
            x = np.bitwise_xor(blocks[:, j], prev)
            blocks[:, j] = np.frombuffer(ctx.update(x.tobytes()), dtype=np.uint8).reshape(n, 16)
            prev = blocks[:, j]
    else:
        ctx = sa.ecb_decrypt
        assert ctx is not None
        plain = np.frombuffer(ctx.update(blocks.tobytes()), dtype=np.uint8).reshape(blocks.shape)
        chain = np.concatenate([iv[:, None, :], blocks[:, :-1]], axis=1)
        blocks[...] = plain ^ chain
    if not dense:
        rows_view[slots] = blocks.reshape(n, width)
