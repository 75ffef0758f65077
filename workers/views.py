"""Per-slot argument tuples for the per-packet AEAD calls, reused across batches.

``encrypt_into``/``decrypt_into`` need exact-length buffers, so each call takes memoryview
slices of the batch buffer. Creating two memoryviews costs about as much as a quarter of a
1400-byte AES-GCM call in CPython, so the views are kept per slot and rebuilt only when the
slot's geometry (where the ciphertext starts, how long it is, which AAD layout) changes from
the previous batch. A batch buffer is reused for the life of a worker, and steady traffic
repeats its geometry, so most batches build no view at all; a batch of new geometry pays the
slicing cost once per changed slot (bench/esp_codec.py measures that case as ``mixed``).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["AeadArgs", "SlotArgCache"]

AeadArgs = tuple[memoryview, memoryview, memoryview, memoryview]

NONCE_LEN = 12  # RFC 4106 §4 / RFC 7634 §4: salt (4) || IV (8)
ESN_AAD_LEN = 12  # RFC 4106 §5: SPI || seq high || seq low


class SlotArgCache:
    """(nonce, input, aad, output) views per slot of one batch buffer."""

    __slots__ = ("data", "nonce", "esn_aad", "_mv", "_nonce_mv", "_aad_mv", "_keys", "_args",
                 "_tag", "_salted")

    NONCE = np.dtype([("salt", "u1", (4,)), ("iv", ">u8")])
    ESN_AAD = np.dtype([("spi", ">u4"), ("seq", ">u8")])

    def __init__(self, data: npt.NDArray[np.uint8], capacity: int, tag_delta: int) -> None:
        self.data = data
        nonce = np.zeros(capacity * NONCE_LEN, dtype=np.uint8)
        esn_aad = np.zeros(capacity * ESN_AAD_LEN, dtype=np.uint8)
        # Per-slot nonce (salt || IV) and ESN AAD records, written by numpy a batch at a time.
        self.nonce: npt.NDArray[np.void] = nonce.view(self.NONCE)
        self.esn_aad: npt.NDArray[np.void] = esn_aad.view(self.ESN_AAD)
        self._mv = memoryview(data)  # type: ignore[arg-type]
        self._nonce_mv = memoryview(nonce)  # type: ignore[arg-type]
        self._aad_mv = memoryview(esn_aad)  # type: ignore[arg-type]
        self._keys = np.full(capacity, -1, dtype=np.int64)
        self._args: list[AeadArgs | None] = [None] * capacity
        # Output length minus input length: +16 when encrypting (tag appended), -16 decrypting.
        self._tag = tag_delta
        # (salt, n): slots 0..n-1 all hold this salt already (steady traffic on one SA).
        self._salted: tuple[bytes, int] = (b"", 0)

    def set_salt(self, sel: slice | npt.NDArray[np.int64], dense: bool,
                 salt: npt.NDArray[np.uint8]) -> None:
        """Write the SA's salt into the nonces of the selected slots (RFC 4106 §4)."""
        if dense:
            n = sel.stop if isinstance(sel, slice) else len(sel)
            key = salt.tobytes()
            if self._salted[0] == key and self._salted[1] >= n:
                return
            self.nonce["salt"][:n] = salt
            self._salted = (key, max(n, self._salted[1]) if self._salted[0] == key else n)
            return
        self.nonce["salt"][sel] = salt
        self._salted = (b"", 0)

    def args(
        self,
        slots: npt.NDArray[np.int64],
        start: int,
        length: npt.NDArray[np.int64],
        aad: int,
        esn: bool,
        dense: bool,
    ) -> list[AeadArgs]:
        """Argument tuples for a group of packets whose AEAD input starts at byte ``start``
        of their slots and is ``length`` long (``dense``: the group is slots 0..n-1).

        ``aad`` is where the 8-byte SPI || Sequence Number AAD lies in the slot (used
        without ESN; with ESN the per-slot ``esn_aad`` record is the AAD).
        """
        key = (length << 1) + ((start << 20) | int(esn))
        old = self._keys[: slots.size] if dense else self._keys[slots]
        if (old != key).any():
            stale = np.flatnonzero(old != key)
            self._rebuild(slots[stale], start, length[stale], aad, esn, key[stale])
        cached = self._args
        if dense:
            # A list slice: no per-packet Python work at all.
            return cached[: slots.size]  # type: ignore[return-value]
        return [cached[s] for s in slots.tolist()]

    def current(self, n: int) -> list[AeadArgs]:
        """The argument tuples of slots 0..n-1 as the last ``args`` call left them."""
        return self._args[:n]  # type: ignore[return-value]

    def _rebuild(
        self,
        slots: npt.NDArray[np.int64],
        start: int,
        length: npt.NDArray[np.int64],
        aad: int,
        esn: bool,
        key: npt.NDArray[np.int64],
    ) -> None:
        mv, nmv, amv, tag = self._mv, self._nonce_mv, self._aad_mv, self._tag
        slot_size = self.data.shape[0] // len(self._args)
        for s, ln in zip(slots.tolist(), length.tolist(), strict=True):
            a = s * slot_size + start
            if esn:
                aad_view = amv[s * ESN_AAD_LEN : (s + 1) * ESN_AAD_LEN]
            else:
                aad_view = mv[s * slot_size + aad : s * slot_size + aad + 8]
            self._args[s] = (nmv[s * NONCE_LEN : (s + 1) * NONCE_LEN], mv[a : a + ln], aad_view,
                             mv[a : a + ln + tag])
        self._keys[slots] = key
