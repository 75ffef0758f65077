"""One cursor over bytes: the only place IKE wire code reads or writes integers.

Modelled on aioquic's ``Buffer``: a ``Buffer`` is built either from ``data`` (to parse) or
with a ``capacity`` (to build), and every fixed-width field has a ``pull_``/``push_`` pair.
A read past the end raises ``BufferReadError`` and leaves the cursor where it was; parse
entry points translate it into the protocol's own error (``InvalidSyntax``), so it never
reaches the message loop.

Unlike aioquic's, a push past the end grows the buffer: ``capacity`` is the initial size,
not a limit, so serializers do not have to size a message before writing it. Lengths that
are only known afterwards are written by seeking back (``tell``/``seek``) or in place with
``patch_uint16``.

Fixed layouts of several fields (a header, a substructure) are read and written in one step
with ``pull_struct``/``push_struct`` and a precompiled ``struct.Struct`` (network order,
``x`` for RESERVED octets): the codec's time goes into calls, not bytes, so one call per
header rather than one per field.
"""

from __future__ import annotations

import struct
from typing import Any

__all__ = ["Buffer", "BufferReadError"]

_UINT16 = struct.Struct("!H")
_UINT32 = struct.Struct("!I")
_UINT64 = struct.Struct("!Q")


class BufferReadError(ValueError):
    """A read ran past the end of the data: the bytes are truncated."""


class Buffer:
    """A read/write cursor over a ``bytearray``; integers are big-endian (network order)."""

    __slots__ = ("_data", "_pos")

    def __init__(self, capacity: int = 0, data: bytes | None = None) -> None:
        if data is not None:
            self._data = bytearray(data)
        else:
            self._data = bytearray(capacity)
        self._pos = 0

    @property
    def capacity(self) -> int:
        """Bytes in the buffer (grows when a push passes the end)."""
        return len(self._data)

    @property
    def data(self) -> bytes:
        """The bytes from the start up to the cursor."""
        return bytes(self._data[: self._pos])

    def data_slice(self, start: int, end: int) -> bytes:
        if not 0 <= start <= end <= len(self._data):
            raise BufferReadError(f"slice [{start}:{end}] outside {len(self._data)} bytes")
        return bytes(self._data[start:end])

    def eof(self) -> bool:
        return self._pos == len(self._data)

    def remaining(self) -> int:
        """Bytes between the cursor and the end."""
        return len(self._data) - self._pos

    def seek(self, pos: int) -> None:
        if not 0 <= pos <= len(self._data):
            raise BufferReadError(f"seek to {pos} outside {len(self._data)} bytes")
        self._pos = pos

    def tell(self) -> int:
        return self._pos

    # -- reads ---------------------------------------------------------------------------
    # Each read checks its length itself (no shared helper: a read is a handful of
    # operations, and a call per field would double it).

    def _underrun(self, length: int) -> BufferReadError:
        return BufferReadError(
            f"need {length} bytes at offset {self._pos}, {len(self._data) - self._pos} left"
        )

    def pull_bytes(self, length: int) -> bytes:
        start = self._pos
        end = start + length
        if length < 0 or end > len(self._data):
            raise self._underrun(length)
        self._pos = end
        return bytes(self._data[start:end])

    def pull_buffer(self, length: int) -> Buffer:
        """The next ``length`` bytes as a ``Buffer`` of their own (a substructure's body)."""
        start = self._pos
        end = start + length
        if length < 0 or end > len(self._data):
            raise self._underrun(length)
        self._pos = end
        sub = Buffer.__new__(Buffer)
        sub._data = self._data[start:end]
        sub._pos = 0
        return sub

    def pull_struct(self, fmt: struct.Struct) -> tuple[Any, ...]:
        """The fields of one fixed layout, ``fmt.size`` bytes, as ``fmt`` unpacks them."""
        start = self._pos
        end = start + fmt.size
        if end > len(self._data):
            raise self._underrun(fmt.size)
        self._pos = end
        return fmt.unpack_from(self._data, start)

    def pull_uint8(self) -> int:
        pos = self._pos
        if pos >= len(self._data):
            raise self._underrun(1)
        self._pos = pos + 1
        return self._data[pos]

    def pull_uint16(self) -> int:
        value: int = self.pull_struct(_UINT16)[0]
        return value

    def pull_uint32(self) -> int:
        value: int = self.pull_struct(_UINT32)[0]
        return value

    def pull_uint64(self) -> int:
        value: int = self.pull_struct(_UINT64)[0]
        return value

    # -- writes --------------------------------------------------------------------------
    # A value that does not fit its field is a local bug: ValueError, never a short write.

    def push_bytes(self, value: bytes) -> None:
        data, pos = self._data, self._pos
        if pos == len(data):
            data += value  # appending (the usual case): no slice to build
        else:
            data[pos : pos + len(value)] = value
        self._pos = pos + len(value)

    def push_struct(self, fmt: struct.Struct, *values: Any) -> None:
        """The fields of one fixed layout, packed by ``fmt``."""
        try:
            packed = fmt.pack(*values)
        except struct.error as exc:
            raise ValueError(f"{values} do not fit {fmt.format!r}: {exc}") from None
        data, pos = self._data, self._pos
        if pos == len(data):
            data += packed
        else:
            data[pos : pos + len(packed)] = packed
        self._pos = pos + len(packed)

    def _push_packed(self, fmt: struct.Struct, value: int, bits: int) -> None:
        if not 0 <= value < 1 << bits:
            raise ValueError(f"{value} does not fit in {bits} bits")
        self.push_bytes(fmt.pack(value))

    def push_uint8(self, value: int) -> None:
        if not 0 <= value <= 0xFF:
            raise ValueError(f"{value} does not fit in 8 bits")
        self.push_bytes(bytes((value,)))

    def push_uint16(self, value: int) -> None:
        self._push_packed(_UINT16, value, 16)

    def push_uint32(self, value: int) -> None:
        self._push_packed(_UINT32, value, 32)

    def push_uint64(self, value: int) -> None:
        self._push_packed(_UINT64, value, 64)

    def patch_uint16(self, offset: int, value: int) -> None:
        """Overwrite the 16 bits at ``offset`` (a length known only once its structure is
        written); the cursor does not move."""
        if not 0 <= offset <= len(self._data) - 2:
            raise ValueError(f"patch at {offset} outside {len(self._data)} bytes")
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"{value} does not fit in 16 bits")
        _UINT16.pack_into(self._data, offset, value)
