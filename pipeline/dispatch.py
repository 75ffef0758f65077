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

import bisect
import ipaddress
import operator
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from pipeline.batch import HEADROOM, Batch, Verdict
from pipeline.satable import Protocol
from workers import vec
from workers.layout import group_by, rows
from workers.sa import SaTable, by_sa

__all__ = ["Action", "Dispatcher", "Policy", "Spd", "ranked"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

PROTO_UDP = 17
UDP_HDR_LEN = 8
ESP_MIN_LEN = 28  # the shortest packet the inbound path looks into: IPv4 + ESP header
# The address fields of an IPv4 (RFC 791) or IPv6 (RFC 8200) header, overlaid: which apply
# depends on the version nibble of b0. IPv4's source and destination are adjacent: one
# 64-bit word (source high) matches both halves of a selector pair in one comparison.
_ADDRS = np.dtype({
    "names": ["b0", "addrs4", "src6h", "src6l", "dst6h", "dst6l"],
    "formats": ["u1", ">u8", ">u8", ">u8", ">u8", ">u8"],
    "offsets": [0, 12, 8, 16, 24, 32],
    "itemsize": 40,
})
_ADDR6_WORDS = ("src6h", "src6l", "dst6h", "dst6l")  # the order of an IPv6 row's words
# Per first byte of an IP header: its length (IPv4: IHL; else the fixed IPv6 header) and
# where its protocol / Next Header field is; per protocol: the UDP header before ESP
# (RFC 3948 §2.1). Table lookups replace a handful of vector operations per batch.
_B0 = np.arange(256)
_IP_HDR_LEN = np.where(_B0 >> 4 == 4, (_B0 & 0xF) * 4, 40).astype(np.int64)
_PROTO_AT = np.where(_B0 >> 4 == 4, 9, 6).astype(np.int64)
_ENCAP_LEN = np.where(_B0 == PROTO_UDP, UDP_HDR_LEN, 0).astype(np.int64)


def _by_offset(batch: Batch, width: int) -> list[tuple[int, slice | npt.NDArray[np.int64]]]:
    """Packets grouped by where they start in their slot, those whose first ``width`` bytes
    lie inside it: (offset in the slot, packets). All of them at one offset (the common
    case) are ``slice(0, n)``, found without sorting."""
    n, slot_size = batch.count, batch.slot_size
    offset = batch.meta["offset"][:n]
    first = int(offset[0])  # slot 0 starts at 0
    in_slot = offset - batch.slot_starts()[:n] if n > 1 else None  # int64
    if in_slot is None or not np.count_nonzero(in_slot != first):
        return [(first, slice(0, n))] if 0 <= first <= slot_size - width else []
    fits = (in_slot >= 0) & (in_slot + width <= slot_size)
    groups: list[tuple[int, slice | npt.NDArray[np.int64]]] = [
        (c, pos) for c, pos in group_by(np.where(fits, in_slot, -1)) if c >= 0]
    return groups


def _records(batch: Batch, region: npt.NDArray[np.uint8]) -> npt.NDArray[np.void]:
    """Each packet's ``_ADDRS`` record, read where the packet lies: at ``batch.src`` in
    ``region`` (one gather), or in its slot for a packet read whole (``src`` -1). A packet
    that ends the region within a record's width is read up to the region's end (the
    fields past a packet's end are never used: the length checks say so)."""
    n, width = batch.count, _ADDRS.itemsize
    src = batch.src[:n]
    last = region.shape[0] - width
    odd = (src < 0) | (src > last)
    if not np.count_nonzero(odd):  # the usual batch: every record in the region
        return vec.peek(region, src, width).view(_ADDRS).reshape(n)
    raw = vec.peek(region, np.where(odd, 0, src), width)
    for j in np.flatnonzero(odd).tolist():
        raw[j] = 0
        s = int(src[j])
        if s < 0:
            off = int(batch.meta["offset"][j])
            piece = batch.data[off : off + width]
        else:
            piece = region[s:]
        raw[j, : piece.shape[0]] = piece
    return raw.view(_ADDRS).reshape(n)


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


_MIX6 = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                  0x27D4EB2F165667C5], dtype=np.uint64)


_SHAPE6_MIN_ROWS = 4
_EDIT_ROWS_MAX = 256  # rows (ranks) an SPD edit inserts or deletes one by one; more: a rebuild
_NO_MATCH = np.iinfo(np.int64).max  # the rank of "no policy matched" (sorts last)
_EMPTY_U64 = np.zeros(0, dtype=np.uint64)
_EMPTY_I64 = np.zeros(0, dtype=np.int64)
_ANSWERS_MAX = 1 << 16  # protect_one's remembered address pairs (then it starts over)


def _hash6(words: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """One 64-bit key per row of four 64-bit words (multiply-xor; wraps modulo 2**64)."""
    h: npt.NDArray[np.uint64] = (words * _MIX6).sum(axis=1, dtype=np.uint64)
    return h ^ (h >> np.uint64(29))


Spd = Sequence[Policy] | Mapping[int, Policy]  # in order, or by rank (smaller first)


A = TypeVar("A", bound=np.generic)


def _inserted(a: npt.NDArray[A], pos: int, value: object) -> npt.NDArray[A]:
    """``a`` with ``value`` at ``pos`` (np.insert, without its general-case overhead)."""
    return np.concatenate((a[:pos], np.array([value], dtype=a.dtype), a[pos:]))


def _deleted(a: npt.NDArray[A], pos: int) -> npt.NDArray[A]:
    return np.concatenate((a[:pos], a[pos + 1 :]))


K = TypeVar("K")  # a row's net (pair)
M = TypeVar("M")  # a row's mask (pair): its shape


def _add_rank(nets: dict[K, list[int]], net: K, rank: int,
              set_first: Callable[[int], None]) -> bool:
    """Note that the policy of ``rank`` has the row ``net`` of a shape (the row's ranks
    sorted: the first is what a match answers, ``set_first`` told when it changes); True if
    the row is new to the shape (the caller puts it into the shape's arrays)."""
    ranks = nets.get(net)
    if ranks is None:
        nets[net] = [rank]
        return True
    bisect.insort(ranks, rank)
    if ranks[0] == rank:
        set_first(rank)
    return False


def _drop_rank(nets: dict[K, list[int]], net: K, rank: int,
               set_first: Callable[[int], None]) -> bool:
    """The reverse of :func:`_add_rank`; True if the row has no policy left (gone from
    ``nets``: the caller takes it out of the shape's arrays)."""
    ranks = nets[net]
    first = ranks[0]
    ranks.remove(rank)
    if not ranks:
        del nets[net]
        return True
    if ranks[0] != first:
        set_first(ranks[0])
    return False


def ranked(policies: Spd) -> dict[int, Policy]:
    """An SPD by rank: as given, or ranked by position."""
    return dict(policies) if isinstance(policies, Mapping) else dict(enumerate(policies))


class _Entry(NamedTuple):
    """An SPD entry as the lookup uses it: IPv4 rows (address pair, mask pair), source in
    the high half (see _ADDRS); IPv6 rows (the four 64-bit words of the address pair, of
    the mask pair); its outbound SA (-1: not PROTECT); whether it TRAPs."""

    policy: Policy
    rows4: list[tuple[int, int]]
    rows6: list[tuple[tuple[int, ...], tuple[int, ...]]]
    sa: int
    trap: bool


def _entry(p: Policy) -> _Entry:
    rows4: list[tuple[int, int]] = []
    rows6: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for lts in p.local_ts:
        for rts in p.remote_ts:
            if lts.version != rts.version:
                continue  # a v4 packet never matches a v6 selector, nor the reverse
            if lts.version == 4:
                rows4.append((int(lts.network_address) << 32 | int(rts.network_address),
                              int(lts.netmask) << 32 | int(rts.netmask)))
            else:
                (la, lb, lma, lmb), (ra, rb, rma, rmb) = _split(lts), _split(rts)
                rows6.append(((la, lb, ra, rb), (lma, lmb, rma, rmb)))
    return _Entry(p, rows4, rows6, p.sa_index if p.action is Action.PROTECT else -1,
                  p.action is Action.TRAP)


_Loop6Row = tuple[tuple[np.uint64, ...], tuple[np.uint64, ...], int]  # nets, masks, rank
_Rows = Callable[[_Entry], Sequence[tuple[Any, Any]]]  # an entry's (net, mask) rows of a family
_ROWS4: _Rows = operator.attrgetter("rows4")
_ROWS6: _Rows = operator.attrgetter("rows6")


class Dispatcher:
    def __init__(self, sas: SaTable, policies: Spd = ()) -> None:
        self.sas = sas
        self._spd: dict[int, _Entry] = {}  # by rank: smaller ranks match first
        # IPv4 rows by shape (their mask pair): within a shape a packet matches a row iff its
        # masked address pair equals the row's, so one sorted search per shape finds the
        # first matching row of that shape, however many rows share it (a concentrator has
        # one policy per site or client, nearly all of one shape). The first match overall
        # is the smallest rank of the shapes' answers. Per shape: net pair -> the ranks of
        # the policies that have that row (sorted), and the arrays searched.
        self._rows4: dict[int, dict[int, list[int]]] = {}
        self._shapes4: dict[int, tuple[np.uint64, U64, I64]] = {}
        # IPv6 likewise, per shape (the four 64-bit words of its mask pair): net pair ->
        # ranks (sorted); a shape of many rows is searched by hash (_shapes6), a small or
        # colliding one row by row (its rows in _loop6_by_shape, all of them in _loop6).
        self._rows6: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
        self._shapes6: dict[tuple[int, ...], tuple[U64, U64, U64, I64]] = {}
        self._loop6_by_shape: dict[tuple[int, ...], list[_Loop6Row]] = {}
        self._loop6: list[_Loop6Row] = []
        # Per rank present, ascending, then one for "no match": its SA, whether it has none
        # (dropped: no match, BYPASS, DISCARD, TRAP, no SA), whether it TRAPs.
        self._ranks: I64 = np.array([_NO_MATCH], dtype=np.int64)
        self._sa_col: npt.NDArray[np.uint32] = np.zeros(1, dtype=np.uint32)
        self._no_sa_col: npt.NDArray[np.bool_] = np.ones(1, dtype=bool)
        self._trap_col: npt.NDArray[np.bool_] = np.zeros(1, dtype=bool)
        self._any_trap = False
        self.trapped: set[int] = set()  # ranks of TRAP policies packets hit since cleared
        self._answers: dict[bytes, int] = {}  # protect_one's: address pair -> rank
        self.set_policies(policies)

    def set_policies(self, policies: Spd) -> None:
        """Replace the SPD: ``policies`` in order, or by rank (RFC 4301 §4.4.1: the SPD is
        ordered; the first matching entry decides). A policy kept at its rank is not
        worked out again."""
        kept, self._spd = self._spd, {}
        for rank, p in ranked(policies).items():
            old = kept.get(rank)
            self._spd[rank] = old if old is not None and old.policy is p else _entry(p)
        self._rebuild4()
        self._rebuild6()
        self._rebuild_columns()

    def edit_policies(self, put: Mapping[int, Policy], removed: Collection[int] = ()) -> None:
        """Change some entries of the SPD: ``put`` (new or replacing, by rank; put wins
        over removed) and the ``removed`` ranks. The others stay: the cost is the changed
        rows, not the SPD's (a concentrator's SPD changes with every Child SA that comes or
        goes). An entry replaced by one with the same rows (a new SA for the same
        selectors) changes its column only."""
        changes: list[tuple[int, _Entry | None, _Entry | None]] = [
            (rank, self._spd.pop(rank), None) for rank in removed
            if rank not in put and rank in self._spd]
        for rank, p in put.items():
            entry = _entry(p)
            changes.append((rank, self._spd.get(rank), entry))
            self._spd[rank] = entry
        moved = [(rank, old, new) for rank, old, new in changes if old is None or new is None
                 or (old.rows4, old.rows6) != (new.rows4, new.rows6)]
        entries = [e for _, old, new in moved for e in (old, new) if e is not None]
        self._edit_rows(moved, entries, _ROWS4, self._rebuild4, self._remove4, self._add4)
        self._edit_rows(moved, entries, _ROWS6, self._rebuild6, self._remove6, self._add6)
        if len(changes) > _EDIT_ROWS_MAX:
            self._rebuild_columns()  # each insert or delete copies the columns
            return
        for rank, _, new in changes:
            if new is None:
                self._drop_column(rank)
            else:
                self._put_column(rank, new)
        self._changed()

    @staticmethod
    def _edit_rows(moved: list[tuple[int, _Entry | None, _Entry | None]],
                   entries: list[_Entry], rows: _Rows, rebuild: Callable[[], None],
                   remove: Callable[[Any, Any, int], None],
                   add: Callable[[Any, Any, int], None]) -> None:
        """One address family's rows of an edit: each row removed and added in place, or
        for a large change the family's structures rebuilt (one sort beats many inserts)."""
        if sum(len(rows(e)) for e in entries) > _EDIT_ROWS_MAX:
            rebuild()
            return
        for rank, old, new in moved:
            for net, mask in rows(old) if old is not None else ():
                remove(mask, net, rank)
            for net, mask in rows(new) if new is not None else ():
                add(mask, net, rank)

    def _rows_by_shape(self, rows: Callable[[_Entry], Sequence[tuple[K, M]]]
                       ) -> dict[M, dict[K, list[int]]]:
        """Shape (mask) -> net -> the ranks of the policies with that row, ascending."""
        shapes: dict[M, dict[K, list[int]]] = {}
        for rank in sorted(self._spd):
            for net, mask in rows(self._spd[rank]):
                shapes.setdefault(mask, {}).setdefault(net, []).append(rank)
        return shapes

    def _rebuild4(self) -> None:
        self._rows4 = self._rows_by_shape(_ROWS4)
        self._shapes4 = {}
        for mask, nets in self._rows4.items():
            keys = sorted(nets)
            self._shapes4[mask] = (np.uint64(mask), np.array(keys, dtype=np.uint64),
                                   np.array([nets[k][0] for k in keys], dtype=np.int64))

    def _add4(self, mask: int, net: int, rank: int) -> None:
        nets = self._rows4.setdefault(mask, {})
        if not _add_rank(nets, net, rank, lambda first: self._set_first4(mask, net, first)):
            return
        m, keys, first = self._shapes4.get(mask) or (np.uint64(mask), _EMPTY_U64, _EMPTY_I64)
        pos = int(np.searchsorted(keys, np.uint64(net)))
        self._shapes4[mask] = (m, _inserted(keys, pos, np.uint64(net)),
                               _inserted(first, pos, rank))

    def _remove4(self, mask: int, net: int, rank: int) -> None:
        nets = self._rows4[mask]
        if not _drop_rank(nets, net, rank, lambda first: self._set_first4(mask, net, first)):
            return
        m, keys, first = self._shapes4[mask]
        if not nets:
            del self._rows4[mask], self._shapes4[mask]
            return
        pos = int(np.searchsorted(keys, np.uint64(net)))
        self._shapes4[mask] = (m, _deleted(keys, pos), _deleted(first, pos))

    def _set_first4(self, mask: int, net: int, rank: int) -> None:
        _, keys, first = self._shapes4[mask]
        first[int(np.searchsorted(keys, np.uint64(net)))] = rank

    def _rebuild6(self) -> None:
        """The IPv6 rows the same way, the four 64-bit words of a masked address pair
        hashed to one sortable key (and compared whole on a hit), for shapes of many rows;
        a shape of a few rows (cheaper row by row) or whose distinct rows collide in the
        hash is searched row by row."""
        self._rows6 = self._rows_by_shape(_ROWS6)
        self._shapes6, self._loop6_by_shape = {}, {}
        for masks6 in self._rows6:
            self._build_shape6(masks6, flatten=False)
        self._flatten_loop6()

    def _build_shape6(self, masks6: tuple[int, ...], flatten: bool = True) -> None:
        """Work out one IPv6 shape again from its rows: hashed, row by row, or gone."""
        nets = self._rows6.get(masks6)
        looped = self._loop6_by_shape.pop(masks6, None) is not None
        self._shapes6.pop(masks6, None)
        if not nets:
            self._rows6.pop(masks6, None)
        else:
            keys = list(nets)
            words = np.array(keys, dtype=np.uint64).reshape(-1, 4)
            hashes = _hash6(words)
            if hashes.size >= _SHAPE6_MIN_ROWS and np.unique(hashes).size == hashes.size:
                order = np.argsort(hashes)
                first = np.array([nets[k][0] for k in keys], dtype=np.int64)
                self._shapes6[masks6] = (np.array(masks6, dtype=np.uint64), hashes[order],
                                         words[order], first[order])
            else:
                masks = tuple(map(np.uint64, masks6))
                self._loop6_by_shape[masks6] = [(tuple(map(np.uint64, k)), masks, nets[k][0])
                                                for k in keys]
                looped = True
        if looped and flatten:
            self._flatten_loop6()

    def _flatten_loop6(self) -> None:
        self._loop6 = sorted((row for rows in self._loop6_by_shape.values() for row in rows),
                             key=lambda r: r[2])

    def _find6(self, masks6: tuple[int, ...],
               nets6: tuple[int, ...]) -> tuple[int, np.uint64, bool]:
        """Where ``nets6`` is, or goes, in its hashed shape's arrays: the position, the
        row's hash, and whether a row with that hash is there."""
        _, hashes, _, _ = self._shapes6[masks6]
        h = _hash6(np.array(nets6, dtype=np.uint64).reshape(1, 4))[0]
        pos = int(np.searchsorted(hashes, h))
        return pos, h, pos < hashes.size and hashes[pos] == h

    def _add6(self, masks6: tuple[int, ...], nets6: tuple[int, ...], rank: int) -> None:
        nets = self._rows6.setdefault(masks6, {})
        if not _add_rank(nets, nets6, rank, lambda _: self._set_first6(masks6, nets6)):
            return
        if masks6 not in self._shapes6:
            self._build_shape6(masks6)  # a small shape (it may be one no longer), or new
            return
        pos, h, taken = self._find6(masks6, nets6)
        if taken:  # two rows, one hash: this shape is searched row by row from now
            self._build_shape6(masks6)
            return
        m, hashes, words, first = self._shapes6[masks6]
        row = np.array(nets6, dtype=np.uint64).reshape(1, 4)
        self._shapes6[masks6] = (m, _inserted(hashes, pos, h),
                                 np.concatenate((words[:pos], row, words[pos:])),
                                 _inserted(first, pos, rank))

    def _remove6(self, masks6: tuple[int, ...], nets6: tuple[int, ...], rank: int) -> None:
        nets = self._rows6[masks6]
        if not _drop_rank(nets, nets6, rank, lambda _: self._set_first6(masks6, nets6)):
            return
        if masks6 not in self._shapes6 or len(nets) < _SHAPE6_MIN_ROWS:
            self._build_shape6(masks6)
            return
        pos, _, _ = self._find6(masks6, nets6)
        m, hashes, words, first = self._shapes6[masks6]
        self._shapes6[masks6] = (m, _deleted(hashes, pos),
                                 np.concatenate((words[:pos], words[pos + 1 :])),
                                 _deleted(first, pos))

    def _set_first6(self, masks6: tuple[int, ...], nets6: tuple[int, ...]) -> None:
        if masks6 in self._shapes6:
            pos, _, _ = self._find6(masks6, nets6)
            self._shapes6[masks6][3][pos] = self._rows6[masks6][nets6][0]
        else:
            self._build_shape6(masks6)

    def _rebuild_columns(self) -> None:
        entries = [self._spd[r] for r in sorted(self._spd)]
        self._ranks = np.array([*sorted(self._spd), _NO_MATCH], dtype=np.int64)
        self._sa_col = np.array([max(e.sa, 0) for e in entries] + [0], dtype=np.uint32)
        self._no_sa_col = np.array([e.sa < 0 for e in entries] + [True])
        self._trap_col = np.array([e.trap for e in entries] + [False])
        self._changed()

    def _put_column(self, rank: int, e: _Entry) -> None:
        pos = int(np.searchsorted(self._ranks, rank))
        if self._ranks[pos] == rank:
            self._sa_col[pos], self._no_sa_col[pos], self._trap_col[pos] = (
                max(e.sa, 0), e.sa < 0, e.trap)
        else:
            self._ranks = _inserted(self._ranks, pos, rank)
            self._sa_col = _inserted(self._sa_col, pos, max(e.sa, 0))
            self._no_sa_col = _inserted(self._no_sa_col, pos, e.sa < 0)
            self._trap_col = _inserted(self._trap_col, pos, e.trap)

    def _drop_column(self, rank: int) -> None:
        pos = int(np.searchsorted(self._ranks, rank))
        self._ranks = _deleted(self._ranks, pos)
        self._sa_col = _deleted(self._sa_col, pos)
        self._no_sa_col = _deleted(self._no_sa_col, pos)
        self._trap_col = _deleted(self._trap_col, pos)

    def _changed(self) -> None:
        self._any_trap = bool(np.count_nonzero(self._trap_col))
        self._answers = {}  # protect_one's answers were the old SPD's
        if self.trapped:  # (intersection_update would walk the whole SPD)
            self.trapped = {rank for rank in self.trapped if rank in self._spd}

    # ------------------------------------------------------------------ outbound
    def policy(self, rank: int) -> Policy:
        return self._spd[rank].policy

    def outbound(self, batch: Batch, region: npt.NDArray[np.uint8] | None = None) -> None:
        """SPD lookup and sequence-number blocks for packets read from the inside; packets
        that hit a TRAP policy are dropped (POLICY) and the policy noted in ``trapped``.
        ``region``: the packets lie there (at ``batch.src``), not in their slots
        (pipeline/region.py)."""
        n = batch.count
        if n == 0:
            return
        meta = batch.meta
        rank = self._lookup(batch, region)
        column = np.searchsorted(self._ranks, rank)  # every rank found is there
        verdict = meta["verdict"][:n]
        if self._any_trap:
            hit = rank[self._trap_col[column] & (verdict == 0)]
            if hit.size:
                self.trapped.update(np.unique(hit).tolist())
        no_sa = self._no_sa_col[column]
        if np.count_nonzero(no_sa):
            verdict[no_sa & (verdict == 0)] = Verdict.POLICY
        meta["sa"][:n] = self._sa_col[column]
        self.sas.assign_sequence(batch)

    def protect_one(self, batch: Batch) -> int:
        """The outbound SA of a batch's one packet if a PROTECT policy covers it, else -1
        (and the caller takes :meth:`outbound`, which deals with every other outcome). The
        SPD's answer for each address pair seen is kept until the SPD changes: a packet
        that comes alone is looked up without numpy (pipeline/onepacket.py)."""
        off, length, *_ = batch.row(0)
        if off % batch.slot_size + _ADDRS.itemsize > batch.slot_size:
            return -1
        data = batch.memory()[0]
        version = data[off] >> 4
        if version == 4 and length >= 20:
            key = data[off + 12 : off + 20].tobytes()  # the fields _ADDRS reads
        elif version == 6 and length >= 40:
            key = data[off + 8 : off + 40].tobytes()
        else:
            return -1
        rank = self._answers.get(key)
        if rank is None:
            rank = int(self._lookup(batch)[0])
            if len(self._answers) >= _ANSWERS_MAX:
                self._answers.clear()
            self._answers[key] = rank
        entry = self._spd.get(rank)
        return entry.sa if entry is not None else -1

    def _lookup(self, batch: Batch,
                region: npt.NDArray[np.uint8] | None = None) -> npt.NDArray[np.int64]:
        """The rank of each packet's first matching policy (``_NO_MATCH``: none).
        ``region``: the batch's packets lie there, at ``batch.src`` (pipeline/region.py),
        their slots empty."""
        n = batch.count
        policy = np.full(n, _NO_MATCH, dtype=np.int64)  # no match, until one does
        if not (self._shapes4 or self._rows6):
            return policy
        length = batch.meta["length"]
        if region is not None:
            self._match(_records(batch, region), length[:n], policy)
            return policy
        for c, sel in _by_offset(batch, _ADDRS.itemsize):
            got = policy[sel]  # a view when sel is a slice: written in place
            self._match(rows(batch.data, _ADDRS, batch.slot_size, c)[sel], length[sel], got)
            if not isinstance(sel, slice):
                policy[sel] = got
        return policy

    def _match(self, hdr: npt.NDArray[np.void], length: npt.NDArray[np.uint32],
               got: npt.NDArray[np.int64]) -> None:
        """Lower ``got`` to the rank of each packet's first matching policy, from its
        address fields ``hdr`` (``_ADDRS`` records) and its ``length``."""
        version = hdr["b0"] >> 4
        # (IPv4 and IPv6 rows never match the same packet.)
        if self._shapes4:
            v4 = (version == 4) & (length >= 20)
            if np.count_nonzero(v4):
                addrs = hdr["addrs4"].astype(np.uint64)
                for mask, keys, first in self._shapes4.values():
                    masked = addrs & mask
                    pos = np.searchsorted(keys, masked)
                    np.minimum(pos, keys.size - 1, out=pos)
                    hit = v4 & (keys[pos] == masked)
                    np.minimum(got, np.where(hit, first[pos], got), out=got)
        if self._rows6:
            v6 = (version == 6) & (length >= 40)
            if np.count_nonzero(v6):
                words = [hdr[f].astype(np.uint64) for f in _ADDR6_WORDS]
                packed = np.stack(words, axis=1)
                for masks6, hashes, nets6, first6 in self._shapes6.values():
                    masked = packed & masks6
                    pos = np.searchsorted(hashes, _hash6(masked))
                    np.minimum(pos, hashes.size - 1, out=pos)
                    hit = v6 & (nets6[pos] == masked).all(axis=1)
                    np.minimum(got, np.where(hit, first6[pos], got), out=got)
                for nets, masks, i in self._loop6:  # shapes whose rows collide
                    hit = v6 & (got > i)
                    for word, net, mask in zip(words, nets, masks, strict=True):
                        hit = hit & ((word & mask) == net)
                    np.copyto(got, i, where=hit)

    # ------------------------------------------------------------------ inbound
    def inbound(self, batch: Batch) -> None:
        """SA by SPI, ESN inference and the replay pre-check for packets from outside."""
        n = batch.count
        if n == 0:
            return
        meta, data = batch.meta, batch.data
        verdict = meta["verdict"][:n]
        off = meta["offset"][:n].astype(np.int64)
        length = meta["length"][:n]
        short = length < ESP_MIN_LEN
        end = off + length
        # A packet too short to hold the headers is read at its slot's start instead (its
        # verdict is RUNT either way); the reads stay inside the buffer.
        any_short = np.count_nonzero(short) > 0
        safe = np.where(short, batch.slot_starts()[:n] + HEADROOM, off) \
            if any_short else off
        b0 = data[safe]
        esp_off = safe + _IP_HDR_LEN[b0]
        esp_off += _ENCAP_LEN[data[safe + _PROTO_AT[b0]]]
        short |= esp_off + 8 > end
        if any_short or np.count_nonzero(short):
            esp_off = np.where(short, safe, esp_off)
        # SPI and Sequence Number (RFC 4303 §2.1-2.2): two big-endian words.
        esp = vec.peek(data, esp_off, 8, batch._views).view(">u4")
        spi, seq_lo = esp[:, 0].astype(np.uint32), esp[:, 1].astype(np.uint32)
        idx, found = self.sas.lookup_inbound(Protocol.ESP, spi)
        live = verdict == 0
        if np.count_nonzero(short):
            verdict[live & short] = Verdict.RUNT
            live &= ~short
        if np.count_nonzero(found) < n:
            verdict[live & ~found] = Verdict.NO_SA
            live &= found
            meta["sa"][:n] = np.where(found, idx, 0)
        else:
            meta["sa"][:n] = idx
        seq_col = meta["seq"][:n]
        for key, sel, _ in by_sa(idx, live):
            sa = self.sas[key]
            if sa is None:
                continue
            seq = sa.replay.infer(seq_lo[sel])
            seq_col[sel] = seq
            if not sa.replay.all_fresh(seq):
                verdict[sel] = np.where(sa.replay.precheck(seq), Verdict.REPLAY, verdict[sel])
