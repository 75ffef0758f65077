"""One cursor over bytes: the only place IKE wire code reads or writes integers.

Modelled on aioquic's ``Buffer``: a ``Buffer`` is built either from ``data`` (to parse) or
with a ``capacity`` (to build), and every fixed-width field has a ``pull_``/``push_`` pair.
A read past the end raises ``BufferReadError`` and leaves the cursor where it was; parse
entry points translate it into the protocol's own error (``InvalidSyntax``), so it never
reaches the message loop.

Unlike aioquic's, a push past the end grows the buffer: ``capacity`` is the initial size,
not a limit, so serializers do not have to size a message before writing it. Lengths that
are only known afterwards are written by seeking back (``tell``/``seek``).
"""

from __future__ import annotations

import struct

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

    def _check_read(self, length: int) -> int:
        start = self._pos
        if length < 0 or start + length > len(self._data):
            raise BufferReadError(
                f"need {length} bytes at offset {start}, {len(self._data) - start} left"
            )
        self._pos = start + length
        return start

    def pull_bytes(self, length: int) -> bytes:
        start = self._check_read(length)
        return bytes(self._data[start : start + length])

    def pull_uint8(self) -> int:
        return self._data[self._check_read(1)]

    def pull_uint16(self) -> int:
        value: int = _UINT16.unpack_from(self._data, self._check_read(2))[0]
        return value

    def pull_uint32(self) -> int:
        value: int = _UINT32.unpack_from(self._data, self._check_read(4))[0]
        return value

    def pull_uint64(self) -> int:
        value: int = _UINT64.unpack_from(self._data, self._check_read(8))[0]
        return value

    # -- writes --------------------------------------------------------------------------
    # A value that does not fit its field is a local bug: ValueError, never a short write.

    def push_bytes(self, value: bytes) -> None:
        end = self._pos + len(value)
        self._data[self._pos : end] = value
        self._pos = end

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
