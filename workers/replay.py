"""Anti-replay window arithmetic, vectorized over a batch (RFC 4303 §3.4.3, Appendix A).

The window is a ring of bits: the bit for sequence number ``s`` lives at ``s mod R`` where
``R`` is the window size rounded up to a power of two, and the ring always describes the
``R`` numbers ending at ``top`` (the highest authenticated sequence number).

Two steps, as RFC 4303 §3.4.3 orders them:
- ``precheck`` before the ICV is verified: a cheap, side-effect free drop of duplicates and
  packets left of the window;
- ``commit`` after verification: the same decision taken again in packet order (a packet
  earlier in the batch may have moved the window), and only then the window moves.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["ReplayWindow"]

U32 = 1 << 32
# ESN inference still needs a window size when anti-replay is off (RFC 4303 §2.2.1 requires
# the receiver to track the high bits regardless); the minimum window is used.
_INFERENCE_MIN_WINDOW = 32

U64Array = npt.NDArray[np.uint64]
BoolArray = npt.NDArray[np.bool_]


class ReplayWindow:
    """The receive side of one SA: highest sequence number seen, and the window bitmap."""

    __slots__ = ("size", "esn", "top", "_ring", "_mask", "_bits")

    def __init__(self, size: int = 64, esn: bool = False) -> None:
        if size < 0:
            raise ValueError("replay window size must be >= 0")
        self.size = size  # 0 disables the check (RFC 4303 §3.4.3: receiver's choice)
        self.esn = esn
        self.top = 0  # highest authenticated sequence number (64-bit when ESN)
        ring = 1 << max(size - 1, 1).bit_length()
        self._ring: BoolArray = np.zeros(ring, dtype=np.bool_)
        self._mask = ring - 1
        # The same bits for one at a time (a lone packet's commit): item assignment on a
        # memoryview is a C store, numpy's is a trip through its indexing machinery.
        self._bits = memoryview(self._ring)  # type: ignore[arg-type]

    # -- RFC 4303 Appendix A2.2: infer the high 32 bits of an ESN sequence number -----------
    def infer(self, seq_lo: npt.NDArray[np.uint32]) -> U64Array:
        """Full 64-bit sequence numbers for received low halves.

        A number that would fall below 0 (only possible before the first 2^32 packets)
        is returned as 0, which ``precheck`` always rejects.
        """
        if not self.esn:
            return seq_lo.astype(np.uint64)
        lo = seq_lo.astype(np.int64)
        w = max(self.size, _INFERENCE_MIN_WINDOW)
        th, tl = self.top >> 32, self.top & (U32 - 1)
        if tl >= w - 1:
            # Case A: the window lies within one sequence number subspace.
            hi = np.where(lo >= tl - w + 1, th, th + 1)
        else:
            # Case B: the window spans two subspaces; the bottom lies in the previous one.
            bottom = (tl - w + 1) % U32
            hi = np.where(lo >= bottom, th - 1, th)
        full = (hi.astype(np.int64) << 32) | lo
        return np.where(hi < 0, 0, full).astype(np.uint64)

    def all_fresh(self, seq: U64Array) -> bool:
        """True when no packet can be a replay: all are right of the window (or it is off)."""
        return self.size == 0 or (seq.size > 0 and int(seq.min()) > self.top)

    def precheck(self, seq: U64Array) -> BoolArray:
        """True where a packet is a replay given the current window (no state change)."""
        if self.size == 0 or (seq.size and int(seq.min()) > self.top):
            return np.zeros(seq.shape, dtype=np.bool_)  # all new: the common case
        top = np.uint64(self.top)
        # Sequence number 0 is never sent (RFC 4303 §3.3.3: the first packet carries 1).
        # Left of the window: seq <= top - size (written so nothing wraps near 2^64).
        too_old = seq == 0
        if self.top >= self.size:
            too_old |= seq <= np.uint64(self.top - self.size)
        seen = (seq <= top) & self._ring[(seq & np.uint64(self._mask)).astype(np.intp)]
        replay: BoolArray = too_old | seen
        return replay

    def commit(self, seq: U64Array, verified: BoolArray | None) -> BoolArray:
        """Move the window for verified packets (None: all), in order; True where one is
        a replay.

        Equivalent to running RFC 4303 §3.4.3's check-then-update packet by packet: a packet
        is a replay if the window, as the packets before it in the batch left it, rejects it.
        """
        n = seq.shape[0]
        if verified is None:
            if n and int(seq[0]) > self.top and (n == 1 or (seq[1:] > seq[:-1]).all()):
                # The common case: fresh numbers in order. None is a replay.
                self._advance(seq, int(seq[-1]), in_order=True)
                return np.zeros(n, dtype=np.bool_)
            verified = np.ones(n, dtype=np.bool_)
        if self.size == 0:
            if n and verified.any():
                self.top = max(self.top, int(seq[verified].max()))
            return np.zeros(n, dtype=np.bool_)
        replay = verified & self.precheck(seq)
        cand = verified & ~replay
        if not cand.any():
            return replay
        # The top each packet sees: the max of the old top and every candidate before it.
        # (Tops seen by a packet that itself turns out to be a replay never exceed what the
        # candidates give, because a replay's number is <= the top it was checked against.)
        vals = np.where(cand, seq, np.uint64(0))
        running = np.maximum.accumulate(vals)
        seen_top = np.empty(n, dtype=np.uint64)
        seen_top[0] = self.top
        seen_top[1:] = np.maximum(running[:-1], np.uint64(self.top))
        size = np.uint64(self.size)
        left_of_window = cand & (seen_top >= size) & (seq <= seen_top - np.minimum(seen_top, size))
        # Duplicates inside the batch: the first occurrence wins.
        idx = np.flatnonzero(cand & ~left_of_window)
        _, first = np.unique(seq[idx], return_index=True)
        dup = np.zeros(n, dtype=np.bool_)
        dup[idx] = True
        dup[idx[first]] = False
        replay |= left_of_window | dup
        accepted = cand & ~left_of_window & ~dup
        if accepted.any():
            self._advance(seq[accepted], max(self.top, int(seq[accepted].max())))
        return replay

    def commit_run(self, first: int, count: int) -> None:
        """``commit(seq, None)`` for ``seq`` = first, first + 1, ..., first + count - 1, all
        verified and right of the window (``first > top``): none of them is a replay, so
        only the window moves. A steady flow's batch is such a run; this takes it without
        building the sequence-number array."""
        assert count > 0 and first > self.top
        new_top = first + count - 1
        if first == self.top + 1:
            self._mark(first, new_top, True)
        else:
            # A gap before the run: what _advance does, in ranges. The bits from the old top
            # to the new are cleared, then those of the run inside the window set.
            self._mark(self.top + 1, new_top, False)
            self._mark(max(first, new_top - self.size + 1), new_top, True)
        self.top = new_top

    def _mark(self, lo: int, hi: int, value: bool) -> None:
        """Set the bits of the numbers lo .. hi to ``value`` (all of them when that range
        is a ring or longer; nothing when it is empty)."""
        count = hi - lo + 1
        if count <= 0:
            return
        if count == 1:
            self._bits[lo & self._mask] = value
            return
        ring = self._ring.shape[0]
        if count >= ring:
            self._ring[:] = value
            return
        start = lo & self._mask
        end = start + count
        self._ring[start : min(end, ring)] = value
        if end > ring:
            self._ring[: end - ring] = value

    def _advance(self, accepted: U64Array, new_top: int, in_order: bool = False) -> None:
        """Slide the window to ``new_top`` and mark ``accepted`` as seen. ``in_order``:
        ``accepted`` is strictly increasing and starts above the current top."""
        if in_order and accepted.size == new_top - self.top:
            # Exactly top+1 .. new_top: every bit they reach is set, nothing else changes.
            self._mark(self.top + 1, new_top, True)
            self.top = new_top
            return
        advance = new_top - self.top
        if advance >= self._ring.shape[0]:
            self._ring[:] = False
        elif advance:
            cleared = np.arange(self.top + 1, new_top + 1, dtype=np.uint64) & np.uint64(self._mask)
            self._ring[cleared.astype(np.intp)] = False
        self.top = new_top
        if new_top >= self.size:
            accepted = accepted[accepted > np.uint64(new_top - self.size)]
        acc = accepted
        self._ring[(acc & np.uint64(self._mask)).astype(np.intp)] = True
