"""Runtime SA state used by the per-packet path, and the table the codecs look SAs up in.

An ``SaState`` is built once from an ``SaRecord`` (pipeline/satable.py): cipher objects,
salt, outer header template, replay window and counters. Building it validates the record's
key material; the per-packet path can then assume a well-formed SA.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from pipeline.batch import Batch
from pipeline.satable import Direction, Protocol, SaRecord, SaRecordError
from workers.algorithms import (
    AlgorithmError,
    CipherKind,
    EspTransform,
    IntegAlg,
    parse_ah,
    parse_esp,
)
from workers.replay import ReplayWindow

__all__ = ["SaState", "SaTable", "by_sa"]

log = logging.getLogger("espline.sa")

SEQ_MAX_32 = (1 << 32) - 1
SEQ_MAX_64 = (1 << 64) - 1

AeadCall = Callable[[bytes, bytes | memoryview, bytes, memoryview], int]
# Which packets of a batch: ``slice(None)`` for all of them (a view, no copy), else indices.
Packets = slice | npt.NDArray[np.intp]


def by_sa(sa_of: npt.NDArray[np.uint32],
          selected: npt.NDArray[np.bool_] | None = None) -> list[tuple[int, Packets, int]]:
    """The packets of each SA among those ``selected`` (all when None): (SA index, packets,
    how many), SA indices ascending, packets in batch order. A whole batch on one SA (the
    common case) comes back as one group of ``slice(None)`` without any sorting."""
    pos = None
    if selected is not None and np.count_nonzero(selected) < sa_of.size:
        pos = np.flatnonzero(selected)
    keys = sa_of if pos is None else sa_of[pos]
    if keys.size == 0:
        return []
    first = int(keys[0])
    if keys.size == 1 or not np.count_nonzero(keys != first):
        return [(first, slice(None) if pos is None else pos, keys.size)]
    groups: list[tuple[int, Packets, int]] = []
    for key in np.unique(keys).tolist():
        at = np.flatnonzero(keys == key)
        groups.append((key, at if pos is None else pos[at], at.size))
    return groups


class SaState:
    """One SA as a worker holds it."""

    __slots__ = (
        "record", "index", "esp", "integ", "salt", "aead_encrypt_into", "aead_decrypt_into",
        "ecb_encrypt", "ecb_decrypt", "integ_key", "replay", "seq_out", "packets", "bytes",
        "local_addr", "remote_addr", "derived", "salt_array",
    )

    def __init__(self, record: SaRecord, index: int) -> None:
        self.record = record
        self.index = index
        self.esp: EspTransform | None = None
        self.integ: IntegAlg | None = None
        self.salt = b""
        self.salt_array: npt.NDArray[np.uint8] = np.zeros(0, dtype=np.uint8)
        self.aead_encrypt_into: AeadCall | None = None
        self.aead_decrypt_into: AeadCall | None = None
        self.ecb_encrypt: CipherContext | None = None
        self.ecb_decrypt: CipherContext | None = None
        self.integ_key = record.integ_key
        self.local_addr = record.local_addr.packed
        self.remote_addr = record.remote_addr.packed
        # Per-SA values the codecs derive once (header templates and their checksums).
        self.derived: dict[object, object] = {}
        try:
            self._init_crypto(record)
        except AlgorithmError as exc:
            raise SaRecordError(f"alg: {exc}") from None
        self.replay = ReplayWindow(record.replay_window, record.esn)
        self.seq_out = 0  # last sequence number reserved (outbound)
        self.packets = 0
        self.bytes = 0

    def _init_crypto(self, record: SaRecord) -> None:
        if record.protocol is Protocol.AH:
            self.integ, _ = parse_ah(record.alg)
            self._check_len("integ_key", record.integ_key, self.integ.key_len)
            return
        esp = self.esp = parse_esp(record.alg)
        self.integ = esp.integ
        key = record.enc_key
        self._check_len("enc_key", key, esp.key_material_len)
        if esp.integ is not None:
            self._check_len("integ_key", record.integ_key, esp.integ.key_len)
        if esp.kind is CipherKind.AEAD_AES_GCM:
            aead: AESGCM | ChaCha20Poly1305 = AESGCM(key[: esp.enc_key_len])
        elif esp.kind is CipherKind.AEAD_CHACHA20_POLY1305:
            aead = ChaCha20Poly1305(key[: esp.enc_key_len])
        elif esp.kind is CipherKind.AES_CBC:
            # CBC is run as ECB over a whole batch with the chaining done in numpy
            # (workers/esp.py), so one context per SA serves every packet.
            cipher = Cipher(algorithms.AES(key), modes.ECB())
            self.ecb_encrypt = cipher.encryptor()
            self.ecb_decrypt = cipher.decryptor()
            return
        else:
            return
        self.salt = key[esp.enc_key_len :]
        self.salt_array = np.frombuffer(self.salt, dtype=np.uint8)
        self.aead_encrypt_into = aead.encrypt_into
        self.aead_decrypt_into = aead.decrypt_into

    @staticmethod
    def _check_len(name: str, key: bytes, want: int) -> None:
        if len(key) != want:
            raise SaRecordError(f"{name}: {len(key)} bytes given, the algorithm needs {want}")

    @property
    def seq_limit(self) -> int:
        return SEQ_MAX_64 if self.record.esn else SEQ_MAX_32

    def reserve(self, count: int) -> int:
        """Reserve ``count`` consecutive outbound sequence numbers; returns the first.

        Numbers are never reissued. Returns 0 when fewer than ``count`` remain (the caller
        drops those packets as SEQ_OVERFLOW: RFC 4303 §3.3.3 forbids cycling the counter).
        """
        first = self.seq_out + 1
        if first + count - 1 > self.seq_limit:
            return 0
        self.seq_out += count
        return first


def _spi_key(protocol: int, spi: int) -> int:
    """The SPI index's key of an SA: (protocol << 32) | SPI."""
    return (int(protocol) << 32) | spi


def _key(record: SaRecord) -> int:
    return _spi_key(record.protocol, record.spi)


class _Deferred(NamedTuple):
    """An SA installed but not built yet (:meth:`SaTable.install_deferred`): what the SPI
    index needs now, and how to get the record when a packet first needs the SA."""

    key: int  # (protocol << 32) | SPI
    inbound: bool
    record: Callable[[], SaRecord]


class SaTable:
    """SAs by index, with a vectorized inbound lookup by (protocol, SPI).

    The SPI index is a dict, authoritative and updated per install; the sorted arrays for a
    batch of mixed SPIs are rebuilt from it only when a lookup needs them after a change
    (a controller installing thousands of SAs pays nothing per SA for them). Two inbound SAs
    with one SPI (a peer reusing it across a rekey): the newest is found, and the older
    again once the newest is gone.
    """

    def __init__(self) -> None:
        self._sas: list[SaState | _Deferred | None] = []
        self._by_key: dict[int, list[int]] = {}  # key -> SA indices, newest last
        self._keys: npt.NDArray[np.uint64] = np.zeros(0, dtype=np.uint64)
        self._idx: npt.NDArray[np.uint32] = np.zeros(0, dtype=np.uint32)
        self._stale = False  # the arrays lag behind _by_key

    def install(self, record: SaRecord, index: int | None = None) -> SaState:
        if index is None:
            index = next((i for i, s in enumerate(self._sas) if s is None), len(self._sas))
        state = SaState(record, index)
        self._put(index, state, _key(record), record.direction is Direction.IN)
        return state

    def install_deferred(self, index: int, spi: int, protocol: Protocol, inbound: bool,
                         record: Callable[[], SaRecord]) -> None:
        """Install an SA whose state is built when a packet first needs it (``record()``
        then gives its record). A worker gets every SA of the controller's table and uses
        few of them: the cipher contexts and windows of the rest are never made. A record
        that cannot be built then is logged and the SA is taken out (its packets find no
        SA)."""
        key = _spi_key(protocol, spi)
        self._put(index, _Deferred(key, inbound, record), key, inbound)

    def _put(self, index: int, entry: SaState | _Deferred, key: int, inbound: bool) -> None:
        while len(self._sas) <= index:
            self._sas.append(None)
        self._unindex(self._sas[index], index)
        self._sas[index] = entry
        if inbound:
            self._by_key.setdefault(key, []).append(index)
            self._stale = True

    def remove(self, index: int) -> None:
        if 0 <= index < len(self._sas):
            self._unindex(self._sas[index], index)
            self._sas[index] = None

    def _unindex(self, entry: SaState | _Deferred | None, index: int) -> None:
        """Take SA ``index`` (``entry``) out of the SPI index."""
        if entry is None:
            return
        if isinstance(entry, _Deferred):
            key, inbound = entry.key, entry.inbound
        else:
            key, inbound = _key(entry.record), entry.record.direction is Direction.IN
        if not inbound:
            return
        holders = self._by_key.get(key)
        if holders is not None and index in holders:
            holders.remove(index)
            if not holders:
                del self._by_key[key]
            self._stale = True

    def _arrays(self) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint32]]:
        if self._stale:
            keys = sorted(self._by_key)
            self._keys = np.array(keys, dtype=np.uint64)
            self._idx = np.array([self._by_key[k][-1] for k in keys], dtype=np.uint32)
            self._stale = False
        return self._keys, self._idx

    def __getitem__(self, index: int) -> SaState | None:
        entry = self._sas[index] if 0 <= index < len(self._sas) else None
        if isinstance(entry, _Deferred):
            return self._build(index, entry)
        return entry

    def _build(self, index: int, entry: _Deferred) -> SaState | None:
        try:
            state = SaState(entry.record(), index)
        except (SaRecordError, KeyError, TypeError, ValueError) as exc:
            log.warning("SA %d cannot be installed: %s", index, exc)
            self.remove(index)
            return None
        self._sas[index] = state
        return state

    def __iter__(self) -> Iterator[SaState]:
        for index in range(len(self._sas)):
            state = self[index]
            if state is not None:
                yield state

    def built(self) -> Iterator[SaState]:
        """The SAs built so far, building none (one deferred has carried nothing yet)."""
        for entry in self._sas:
            if isinstance(entry, SaState):
                yield entry

    def __len__(self) -> int:
        return len(self._sas)

    def lookup_one(self, protocol: int, spi: int) -> tuple[int, bool]:
        """The inbound SA index for one SPI (the whole batch shares it: the common case)."""
        holders = self._by_key.get(_spi_key(protocol, spi))
        return (0, False) if holders is None else (holders[-1], True)

    def lookup_inbound(
        self, protocol: int, spi: npt.NDArray[np.uint32]
    ) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.bool_]]:
        """SA indices for SPIs (RFC 4301 §4.1: unicast SAs are found by SPI alone)."""
        if not self._by_key:
            return np.zeros(spi.shape, np.uint32), np.zeros(spi.shape, np.bool_)
        if spi.size:
            first = int(spi.flat[0])
            index, found = self.lookup_one(protocol, first)
            if found and (spi.size == 1 or not np.count_nonzero(spi != first)):
                # One known SPI for the whole batch (the common case): no search.
                return np.full(spi.shape, index, np.uint32), np.ones(spi.shape, np.bool_)
        table_keys, table_idx = self._arrays()
        keys = spi.astype(np.uint64) | np.uint64(protocol << 32)
        pos = np.searchsorted(table_keys, keys)
        np.minimum(pos, table_keys.size - 1, out=pos)
        found = table_keys[pos] == keys
        return table_idx[pos], found

    def _assign_sorted(self, meta: npt.NDArray[np.void],
                       live: npt.NDArray[np.bool_] | None) -> bool:
        """A batch of many SAs (a concentrator's traffic to many sites): one stable sort
        instead of a pass per SA. Returns False, having reserved nothing, when an SA is
        missing or short of numbers (the per-SA path deals with those)."""
        pos = np.arange(meta.size) if live is None else np.flatnonzero(live)
        if pos.size == 0:
            return True
        keys = meta["sa"][pos]
        order = np.argsort(keys, kind="stable")  # batch order within each SA
        uniq, starts, counts = np.unique(keys[order], return_index=True, return_counts=True)
        sas = [self[k] for k in uniq.tolist()]
        sizes = counts.tolist()
        if any(sa is None or sa.seq_limit - sa.seq_out < c
               for sa, c in zip(sas, sizes, strict=True)):
            return False
        firsts = np.array([sa.reserve(c) for sa, c in zip(sas, sizes, strict=True)
                           if sa is not None], dtype=np.uint64)
        rank = np.arange(order.size, dtype=np.uint64) - np.repeat(starts, counts).astype(
            np.uint64)
        meta["seq"][pos[order]] = np.repeat(firsts, counts) + rank
        return True

    def assign_sequence(self, batch: Batch) -> None:
        """Give each passing packet the next sequence numbers of its outbound SA, in order.

        The data plane's dispatcher does this per batch (DESIGN §4); packets beyond the
        counter's end get 0, which the codec drops as SEQ_OVERFLOW.
        """
        meta = batch.active()
        verdict = meta["verdict"]
        seq_col = meta["seq"]
        live = None if not np.count_nonzero(verdict) else verdict == 0
        sa_col = meta["sa"]
        if sa_col.size > 1 and np.count_nonzero(sa_col != sa_col[0]) and self._assign_sorted(
                meta, live):
            return
        for key, sel, size in by_sa(sa_col, live):
            sa = self[key]
            if sa is None:
                continue
            room = sa.seq_limit - sa.seq_out
            count = min(size, room)
            if count == size:
                first = sa.reserve(count)
                seq_col[sel] = np.arange(first, first + count, dtype=np.uint64)
                continue
            seq = np.zeros(size, dtype=np.uint64)
            if count:
                first = sa.reserve(count)
                seq[:count] = np.arange(first, first + count, dtype=np.uint64)
            seq_col[sel] = seq
