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
from workers.layout import group_by, rows
from workers.sa import SaTable

__all__ = ["Action", "Dispatcher", "Policy"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
U64 = npt.NDArray[np.uint64]

PROTO_UDP = 17
UDP_HDR_LEN = 8
# The address fields of an IPv4 (RFC 791) or IPv6 (RFC 8200) header, overlaid: which apply
# depends on the version nibble of b0.
_ADDRS = np.dtype({
    "names": ["b0", "src4", "dst4", "src6h", "src6l", "dst6h", "dst6l"],
    "formats": ["u1", ">u4", ">u4", ">u8", ">u8", ">u8", ">u8"],
    "offsets": [0, 12, 16, 8, 16, 24, 32],
    "itemsize": 40,
})


class Action(Enum):
    PROTECT = "protect"
    BYPASS = "bypass"
    DISCARD = "discard"
    TRAP = "trap"  # no SA yet: drop, and tell the controller to negotiate one (an acquire)


@dataclass(frozen=True)
class Policy:
    """One SPD entry: packets from ``local_ts`` to ``remote_ts`` get ``action``."""

    local_ts: tuple[Network, ...]
    remote_ts: tuple[Network, ...]
    action: Action = Action.PROTECT
    sa_index: int = -1  # the outbound SA, for PROTECT
    name: str = ""  # for TRAP: what the controller negotiates ("connection/child")


def _split(net: Network) -> tuple[int, int, int, int]:
    """(address hi, lo, mask hi, lo) of an IPv6 prefix as 64-bit halves."""
    addr, mask = int(net.network_address), int(net.netmask)
    return addr >> 64, addr & (2**64 - 1), mask >> 64, mask & (2**64 - 1)


class Dispatcher:
    def __init__(self, sas: SaTable, policies: Sequence[Policy] = ()) -> None:
        self.sas = sas
        self.set_policies(policies)

    def set_policies(self, policies: Sequence[Policy]) -> None:
        """Flatten the SPD into rows, one per (local, remote) selector pair, in order; the
        first matching row decides (RFC 4301 §4.4.1: the SPD is ordered)."""
        self._policies = list(policies)
        self._rows4: list[tuple[int, int, int, int, int]] = []
        self._rows6: list[tuple[tuple[int, int, int, int], tuple[int, int, int, int], int]] = []
        for i, p in enumerate(policies):
            for lts in p.local_ts:
                for rts in p.remote_ts:
                    if lts.version != rts.version:
                        continue  # a v4 packet never matches a v6 selector, nor the reverse
                    if lts.version == 4:
                        self._rows4.append((int(lts.network_address), int(lts.netmask),
                                            int(rts.network_address), int(rts.netmask), i))
                    else:
                        self._rows6.append((_split(lts), _split(rts), i))
        self._actions = np.array(
            [(p.sa_index if p.action is Action.PROTECT else -1) for p in policies]
            + [-1], dtype=np.int64)  # the extra entry: no match
        self._traps = np.array([p.action is Action.TRAP for p in policies] + [False])
        self.trapped: set[int] = set()  # TRAP policies packets hit since the caller cleared it

    # ------------------------------------------------------------------ outbound
    def policy(self, index: int) -> Policy:
        return self._policies[index]

    def outbound(self, batch: Batch) -> None:
        """SPD lookup and sequence-number blocks for packets read from the inside; packets
        that hit a TRAP policy are dropped (POLICY) and the policy noted in ``trapped``."""
        n = batch.count
        if n == 0:
            return
        meta, data = batch.meta, batch.data
        no_match = len(self._policies)
        policy = np.full(n, no_match, dtype=np.int64)
        off = meta["offset"][:n].astype(np.int64)
        in_slot = off - np.arange(n, dtype=np.int64) * batch.slot_size
        for c, pos in group_by(np.where((in_slot >= 0) & (in_slot + 40 <= batch.slot_size),
                                        in_slot, -1)):
            if c < 0:
                continue
            dense = pos.size == n
            sel = slice(0, n) if dense else pos
            hdr = rows(data, _ADDRS, batch.slot_size, c)[sel]
            length = meta["length"][sel]
            version = hdr["b0"] >> 4
            v4 = (version == 4) & (length >= 20)
            got = policy[sel]
            if self._rows4 and v4.any():
                src, dst = hdr["src4"], hdr["dst4"]
                for lnet, lmask, rnet, rmask, i in self._rows4:
                    hit = v4 & ((src & lmask) == lnet) & ((dst & rmask) == rnet)
                    got = np.where(hit & (got == no_match), i, got)
            v6 = (version == 6) & (length >= 40)
            if self._rows6 and v6.any():
                sh, sl, dh, dl = hdr["src6h"], hdr["src6l"], hdr["dst6h"], hdr["dst6l"]
                for (la, lb, lma, lmb), (ra, rb, rma, rmb), i in self._rows6:
                    hit = (v6 & ((sh & np.uint64(lma)) == la) & ((sl & np.uint64(lmb)) == lb)
                           & ((dh & np.uint64(rma)) == ra) & ((dl & np.uint64(rmb)) == rb))
                    got = np.where(hit & (got == no_match), i, got)
            policy[sel] = got
        sa = self._actions[policy]
        verdict = meta["verdict"][:n]
        if self._traps.any():
            hit = policy[self._traps[policy] & (verdict == 0)]
            if hit.size:
                self.trapped.update(np.unique(hit).tolist())
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
