"""The dispatcher: classify a batch before it goes to the workers (DESIGN §2, §4).

Outbound (inside -> outside): the SPD lookup by traffic selectors (RFC 4301 §4.4.1), vectorized
over the batch, gives each packet its outbound SA or a POLICY drop; then each SA's packets get
a contiguous block of sequence numbers from the one counter the dispatcher owns, so workers
encrypt in parallel without sharing state and no number is ever issued twice.

Inbound (outside -> inside): the SA is found by SPI, the full (ESN) sequence number inferred
from the SA's window and pre-checked against it (a cheap drop of duplicates before any
crypto). The window itself moves only in the reassembler, after the ICV verified.

The dispatcher lives in the I/O process, which also owns the replay windows; it uses the
workers' window arithmetic (workers/replay.py) and SA table.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt

from pipeline.batch import Batch, Verdict
from pipeline.satable import Protocol
from workers import vec
from workers.sa import SaTable

__all__ = ["Action", "Dispatcher", "Policy"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
U64 = npt.NDArray[np.uint64]

PROTO_UDP = 17
UDP_HDR_LEN = 8
# IPv4 addresses are matched as IPv4-mapped IPv6 addresses (RFC 4291 §2.5.5.2), so one
# 128-bit comparison serves both families.
_V4_MAPPED_HI = 0
_V4_MAPPED_LO = 0xFFFF << 32


class Action(Enum):
    PROTECT = "protect"
    BYPASS = "bypass"
    DISCARD = "discard"


@dataclass(frozen=True)
class Policy:
    """One SPD entry: packets from ``local_ts`` to ``remote_ts`` get ``action``."""

    local_ts: tuple[Network, ...]
    remote_ts: tuple[Network, ...]
    action: Action = Action.PROTECT
    sa_index: int = -1  # the outbound SA, for PROTECT


def _split(net: Network) -> tuple[int, int, int, int]:
    """(address hi, lo, mask hi, lo) of a prefix in the 128-bit (v4-mapped) space."""
    if net.version == 4:
        addr = (0xFFFF << 32) | int(net.network_address)
        mask = ((1 << 96) - 1) << 32 | int(net.netmask)
    else:
        addr, mask = int(net.network_address), int(net.netmask)
    return addr >> 64, addr & (2**64 - 1), mask >> 64, mask & (2**64 - 1)


class Dispatcher:
    def __init__(self, sas: SaTable, policies: Sequence[Policy] = ()) -> None:
        self.sas = sas
        self.set_policies(policies)

    def set_policies(self, policies: Sequence[Policy]) -> None:
        """Flatten the SPD into arrays: one row per (local, remote) selector pair, in
        order; the first matching row decides (RFC 4301 §4.4.1: the SPD is ordered)."""
        rows = []
        for i, p in enumerate(policies):
            for lts in p.local_ts:
                for rts in p.remote_ts:
                    rows.append((*_split(lts), *_split(rts), i))
        table = np.array(rows, dtype=np.uint64).reshape(-1, 9)
        self._spd = table
        self._policies = list(policies)
        self._actions = np.array(
            [(p.sa_index if p.action is Action.PROTECT else -1) for p in policies]
            + [-1], dtype=np.int64)  # the extra entry: no match

    # ------------------------------------------------------------------ outbound
    def outbound(self, batch: Batch) -> None:
        """SPD lookup and sequence-number blocks for packets read from the inside."""
        n = batch.count
        if n == 0:
            return
        meta, data = batch.meta, batch.data
        off = meta["offset"][:n].astype(np.int64)
        src_hi, src_lo, dst_hi, dst_lo, ok = _addresses(data, off, meta["length"][:n])
        spd = self._spd
        if spd.shape[0] == 0:
            meta["verdict"][:n] = np.where(meta["verdict"][:n] == 0, Verdict.POLICY,
                                           meta["verdict"][:n])
            return
        col = spd[:, :, None]
        match = (((src_hi & col[:, 2]) == col[:, 0]) & ((src_lo & col[:, 3]) == col[:, 1])
                 & ((dst_hi & col[:, 6]) == col[:, 4]) & ((dst_lo & col[:, 7]) == col[:, 5]))
        hit = match.any(axis=0) & ok
        first = match.argmax(axis=0)
        policy = np.where(hit, spd[first, 8].astype(np.int64), len(self._policies))
        sa = self._actions[policy]
        verdict = meta["verdict"][:n]
        verdict[(sa < 0) & (verdict == 0)] = Verdict.POLICY
        meta["sa"][:n] = np.where(sa >= 0, sa, 0)
        self.sas.assign_sequence(batch)

    # ------------------------------------------------------------------ inbound
    def inbound(self, batch: Batch) -> None:
        """SA by SPI, ESN inference and the replay pre-check for packets from outside."""
        n = batch.count
        if n == 0:
            return
        meta, data = batch.meta, batch.data
        verdict = meta["verdict"][:n]
        off = meta["offset"][:n].astype(np.int64)
        length = meta["length"][:n].astype(np.int64)
        short = length < 28
        safe = np.where(short, batch.slot_size * np.arange(n) + 128, off)
        b0 = data[safe]
        v4 = (b0 >> 4) == 4
        ip_len = np.where(v4, (b0 & 0xF).astype(np.int64) * 4, 40)
        proto = np.where(v4, data[safe + 9], data[safe + 6])
        esp_off = safe + ip_len + np.where(proto == PROTO_UDP, UDP_HDR_LEN, 0)
        short |= esp_off + 8 > off + length
        esp_off = np.where(short, safe, esp_off)
        spi = vec.be32(data, esp_off)
        seq_lo = vec.be32(data, esp_off + 4)
        idx, found = self.sas.lookup_inbound(Protocol.ESP, spi)
        live = (verdict == 0) & ~short & found
        verdict[(verdict == 0) & short] = Verdict.RUNT
        verdict[(verdict == 0) & ~found] = Verdict.NO_SA
        meta["sa"][:n] = np.where(found, idx, 0)
        for key in np.unique(idx[live]).tolist():
            sa = self.sas[key]
            if sa is None:
                continue
            sel = np.flatnonzero(live & (idx == key))
            seq = sa.replay.infer(seq_lo[sel])
            meta["seq"][sel] = seq
            verdict[sel[sa.replay.precheck(seq)]] = Verdict.REPLAY


def _addresses(data: npt.NDArray[np.uint8], off: npt.NDArray[np.int64],
               length: npt.NDArray[np.uint32]) -> tuple[U64, U64, U64, U64,
                                                         npt.NDArray[np.bool_]]:
    """Source and destination of each IP packet as 128-bit (hi, lo) pairs."""
    b0 = data[off] >> 4
    v4 = (b0 == 4) & (length >= 20)
    v6 = (b0 == 6) & (length >= 40)
    hdr = vec.gather(data, off, 40).astype(np.uint64)
    shifts = (np.arange(7, -1, -1, dtype=np.uint64) * np.uint64(8))

    def word(cols: slice) -> U64:
        return (hdr[:, cols] << shifts).sum(axis=1, dtype=np.uint64)  # type: ignore[no-any-return]

    src4 = (hdr[:, 12:16] << shifts[4:]).sum(axis=1, dtype=np.uint64)
    dst4 = (hdr[:, 16:20] << shifts[4:]).sum(axis=1, dtype=np.uint64)
    mapped = np.uint64(_V4_MAPPED_LO)
    src_hi = np.where(v4, np.uint64(_V4_MAPPED_HI), word(slice(8, 16)))
    src_lo = np.where(v4, mapped | src4, word(slice(16, 24)))
    dst_hi = np.where(v4, np.uint64(_V4_MAPPED_HI), word(slice(24, 32)))
    dst_lo = np.where(v4, mapped | dst4, word(slice(32, 40)))
    return src_hi, src_lo, dst_hi, dst_lo, v4 | v6
