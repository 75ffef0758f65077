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
                 "_tag")

    def __init__(self, data: npt.NDArray[np.uint8], capacity: int, tag_delta: int) -> None:
        self.data = data
        self.nonce: npt.NDArray[np.uint8] = np.zeros((capacity, NONCE_LEN), dtype=np.uint8)
        self.esn_aad: npt.NDArray[np.uint8] = np.zeros((capacity, ESN_AAD_LEN), dtype=np.uint8)
        self._mv = memoryview(data)  # type: ignore[arg-type]
        self._nonce_mv = memoryview(self.nonce.reshape(-1))  # type: ignore[arg-type]
        self._aad_mv = memoryview(self.esn_aad.reshape(-1))  # type: ignore[arg-type]
        self._keys = np.full(capacity, -1, dtype=np.int64)
        self._args: list[AeadArgs | None] = [None] * capacity
        # Output length minus input length: +16 when encrypting (tag appended), -16 decrypting.
        self._tag = tag_delta

    def args(
        self,
        slots: npt.NDArray[np.int64],
        start: npt.NDArray[np.int64],
        length: npt.NDArray[np.int64],
        aad_off: npt.NDArray[np.int64],
        esn: bool,
    ) -> list[AeadArgs]:
        """Argument tuples for the packets in ``slots``.

        ``start``/``length`` delimit the AEAD input; ``aad_off`` is where the 8-byte
        SPI || sequence AAD lies in the packet (used without ESN).
        """
        key = (start << 20) | (length << 1) | int(esn)
        stale = np.flatnonzero(self._keys[slots] != key)
        if stale.size:
            self._rebuild(slots[stale], start[stale], length[stale], aad_off[stale], esn,
                          key[stale])
        cached = self._args
        if slots.size == len(cached) or (slots.size and slots[-1] == slots.size - 1):
            # Every slot from 0 in order: a list slice, no per-packet Python work.
            return cached[: slots.size]  # type: ignore[return-value]
        return [cached[s] for s in slots.tolist()]  # type: ignore[misc]

    def _rebuild(
        self,
        slots: npt.NDArray[np.int64],
        start: npt.NDArray[np.int64],
        length: npt.NDArray[np.int64],
        aad_off: npt.NDArray[np.int64],
        esn: bool,
        key: npt.NDArray[np.int64],
    ) -> None:
        mv, nmv, amv, tag = self._mv, self._nonce_mv, self._aad_mv, self._tag
        for s, a, ln, ao in zip(slots.tolist(), start.tolist(), length.tolist(),
                                aad_off.tolist(), strict=True):
            aad = amv[s * ESN_AAD_LEN : (s + 1) * ESN_AAD_LEN] if esn else mv[ao : ao + 8]
            self._args[s] = (nmv[s * NONCE_LEN : (s + 1) * NONCE_LEN], mv[a : a + ln], aad,
                             mv[a : a + ln + tag])
        self._keys[slots] = key
