"""Results kept for immutable inputs met again as the very same objects.

A responder answers thousands of peers that send the same offers: the parser already hands
out one payload object per distinct body (controller/ike/message.py ``_pull_memo``), so what
is computed from those objects and from the configuration's (choosing a proposal, narrowing
selectors, writing the answer's transforms) comes out the same every time. ``IdentityMemo``
keeps such results by the *identity* of their inputs: no hashing of nested dataclasses,
which costs about as much as the work it would save.

Safe because every input is immutable (frozen dataclasses of tuples, bytes, ints) and the
memo holds a reference to each: an object it remembers stays alive, so its ``id`` cannot be
reused by another object while the entry exists. Bounded: emptied when full, so inputs that
never repeat cost a dict insert, never memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["IdentityMemo"]

T = TypeVar("T")
# Inputs of these types could change under the same identity: never remembered.
_MUTABLE = (list, dict, set, bytearray)


class IdentityMemo(Generic[T]):
    """``result`` by the identities of ``inputs`` (and any hashable ``extra``)."""

    __slots__ = ("_entries", "limit")

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._entries: dict[tuple[object, ...], tuple[tuple[object, ...], T]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, inputs: tuple[object, ...], extra: object = None) -> T | None:
        """The result remembered for these very objects, or None."""
        # An entry keeps its inputs alive: no other object can have their ids meanwhile, so
        # the ids alone say these are the very objects.
        entry = self._entries.get((*map(id, inputs), extra))
        return None if entry is None else entry[1]

    def put(self, inputs: tuple[object, ...], result: T, extra: object = None) -> T:
        if len(self._entries) >= self.limit:
            self._entries.clear()
        self._entries[(*map(id, inputs), extra)] = (inputs, result)
        return result

    def get_or(self, inputs: tuple[object, ...], compute: Callable[[], T],
               extra: object = None) -> T:
        """The result remembered for these very objects, else ``compute()`` (remembered,
        unless it is None or an input is of a mutable type)."""
        if any(isinstance(x, _MUTABLE) for x in inputs):
            return compute()
        result = self.get(inputs, extra)
        if result is None:
            result = compute()
            if result is not None:
                self.put(inputs, result, extra)
        return result

    def clear(self) -> None:
        self._entries.clear()
