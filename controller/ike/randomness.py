"""The IKE daemon's random bytes: ``os.urandom`` read in blocks.

Each IKE SA a responder sets up takes about ten small draws from the kernel's CSPRNG (SPIs,
nonces, the key exchange's private value, the SK payload's IV, timer jitter). Each
``os.urandom`` call is a ``getrandom(2)`` system call, and on a VM a system call costs far
more than the bytes it returns; one call per ``BLOCK`` bytes serves dozens of draws.

The bytes are the kernel's, unchanged (no generator of our own). Bytes handed out are
overwritten with zeros in the block, so the block holds only what no one has taken yet, not
the private values and nonces already drawn from it. (What Python frees it does not zero:
the bytes object each read returns, copied into the block, stays in freed heap memory as
every ``os.urandom`` result and every key derived in Python does; this is no guarantee
against reading the process's memory.) A forked child starts with an empty block
(``os.register_at_fork``) and never repeats its parent's bytes.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

__all__ = ["BLOCK", "RandomPool"]

BLOCK = 4096  # bytes per getrandom(2)
_ZEROS = bytes(BLOCK)

_pools: weakref.WeakSet[RandomPool] = weakref.WeakSet()


class RandomPool:
    """``pool(n)``: ``n`` bytes from ``source`` (``os.urandom``), read ``block`` at a time.
    Draws larger than a quarter block go to ``source`` directly."""

    __slots__ = ("__weakref__", "_block", "_pos", "block", "source")

    def __init__(self, source: Callable[[int], bytes] = os.urandom, block: int = BLOCK) -> None:
        if not 0 < block <= BLOCK:
            raise ValueError(f"block: {block} is not in 1..{BLOCK}")
        self.source = source
        self.block = block
        self._block = bytearray()
        self._pos = 0
        _pools.add(self)

    def __call__(self, n: int) -> bytes:
        if n < 0:
            raise ValueError(f"random({n}): a negative length")
        if n > self.block // 4:
            return self.source(n)
        pos = self._pos
        end = pos + n
        block = self._block
        if end > len(block):
            self.forget()
            fresh = self.source(self.block)
            if len(fresh) != self.block:
                raise ValueError(f"random source returned {len(fresh)} of {self.block} bytes")
            block = self._block = bytearray(fresh)
            pos, end = 0, n
        out = bytes(block[pos:end])
        block[pos:end] = _ZEROS[:n]  # taken: not kept
        self._pos = end
        return out

    def forget(self) -> None:
        """Drop what was not taken yet (zeroed first); the next draw reads a new block."""
        self._block[:] = _ZEROS[: len(self._block)]
        self._block = bytearray()
        self._pos = 0


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool.forget()


os.register_at_fork(after_in_child=_after_fork_in_child)
