"""VICI wire format, sans-IO: transport framing, packets and the message tree.

The source for every rule here is the README of strongSwan's vici plugin
(``src/libcharon/plugins/vici/README.md``), cited as ``VICI §<section>``. This module owns no
socket: ``FrameDecoder.feed`` takes bytes and returns ``Packet``s, ``encode_packet`` returns
bytes to write. All wire integers go through the one ``Buffer`` cursor of the IKE code.

Decoded messages are plain Python: sections become ``dict``, lists ``list[bytes]`` and values
``bytes`` (VICI §Message format: "The interpretation of any value is not defined by the message
format; it can take arbitrary blobs"); ``to_text`` turns a tree's values into ``str``.
Encoding takes ``dict``/``list``/``str``/``bytes``/``int``/``bool``: integers become decimal
strings and booleans ``yes``/``no``, as strongSwan encodes them; ``None`` values are left out,
so optional fields can be passed as they are.

Malformed input raises ``ViciProtocolError`` and nothing else (``BufferReadError`` is
translated at the two pull entry points). Data we are asked to encode that cannot be encoded
is a local bug and raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TypeAlias, TypeGuard, Union

from controller.ike.buffer import Buffer, BufferReadError

__all__ = [
    "LENGTH_PREFIX_SIZE",
    "MAX_NAME_LENGTH",
    "MAX_SECTION_DEPTH",
    "MAX_SEGMENT_SIZE",
    "MAX_VALUE_LENGTH",
    "Encodable",
    "EncodableSection",
    "ElementType",
    "FrameDecoder",
    "Packet",
    "PacketType",
    "Section",
    "TextSection",
    "TextValue",
    "Value",
    "ViciProtocolError",
    "decode_message",
    "decode_packet",
    "encode_message",
    "encode_packet",
    "pull_message",
    "push_message",
    "text",
    "to_text",
]

# VICI §Transport protocol: "Each byte sequence is prefixed by a 32-bit length header in
# network order ... The maximum segment length is currently limited to 512KB of data, and the
# length field contains the length of the data only, not including the length field itself."
LENGTH_PREFIX_SIZE = 4
MAX_SEGMENT_SIZE = 512 * 1024
# VICI §Message format: names carry an 8-bit length header, values a 16-bit one.
MAX_NAME_LENGTH = 0xFF
MAX_VALUE_LENGTH = 0xFFFF
# Not a VICI rule: sections "can be nested to arbitrary levels", but a peer must not make us
# build (or a printer recurse through) a 256 Ki-deep tree from one 512 KiB segment.
# swanctl.conf trees are about 5 deep (connections.<conn>.children.<child>.<key>).
MAX_SECTION_DEPTH = 64


class ViciProtocolError(ValueError):
    """The bytes are not valid VICI: ``reason`` says which rule they broke."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PacketType(IntEnum):
    """VICI §Packet layer: the 8-bit packet type, first byte of a transport segment."""

    CMD_REQUEST = 0
    CMD_RESPONSE = 1
    CMD_UNKNOWN = 2
    EVENT_REGISTER = 3
    EVENT_UNREGISTER = 4
    EVENT_CONFIRM = 5
    EVENT_UNKNOWN = 6
    EVENT = 7


class ElementType(IntEnum):
    """VICI §Message format: the 8-bit element types of a message."""

    SECTION_START = 1
    SECTION_END = 2
    KEY_VALUE = 3
    LIST_START = 4
    LIST_ITEM = 5
    LIST_END = 6


# VICI §Packet layer: which packet types carry a name tag, and which wrap a message
# ("Messages are currently used in CMD_REQUEST/CMD_RESPONSE, and in EVENT packets").
_NAMED = frozenset({PacketType.CMD_REQUEST, PacketType.EVENT_REGISTER,
                    PacketType.EVENT_UNREGISTER, PacketType.EVENT})
_WITH_MESSAGE = frozenset({PacketType.CMD_REQUEST, PacketType.CMD_RESPONSE, PacketType.EVENT})

# A decoded tree.
Value: TypeAlias = Union[bytes, list[bytes], "Section"]
Section: TypeAlias = dict[str, Value]
# The same tree with values as text (``to_text``).
TextValue: TypeAlias = Union[str, list[str], "TextSection"]
TextSection: TypeAlias = dict[str, TextValue]
# What ``push_message`` accepts.
Scalar: TypeAlias = str | bytes | int | bool
Encodable: TypeAlias = Union[Scalar, None, Sequence[Scalar], "EncodableSection"]
EncodableSection: TypeAlias = Mapping[str, Encodable]


@dataclass(frozen=True)
class Packet:
    """One decoded VICI packet: ``name`` for the named types, ``message`` ({} if none)."""

    type: PacketType
    name: str | None = None
    message: Section = field(default_factory=dict)


# -- names and values ----------------------------------------------------------------------


def _pull_name(buf: Buffer) -> str:
    # VICI §Message format: "an ASCII string ... which itself uses an 8-bit length header".
    # UTF-8 is accepted (it is a superset, and connection names are user text).
    raw = buf.pull_bytes(buf.pull_uint8())
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ViciProtocolError(f"name {raw!r} is not ASCII/UTF-8") from None


def _push_name(buf: Buffer, name: str) -> None:
    raw = name.encode()
    if len(raw) > MAX_NAME_LENGTH:
        raise ValueError(f"name {name[:32]!r}... is {len(raw)} bytes, max {MAX_NAME_LENGTH}")
    buf.push_uint8(len(raw))
    buf.push_bytes(raw)


def _pull_value(buf: Buffer) -> bytes:
    # VICI §Message format: "a raw blob sequence, prefixed with a 16-bit network order length".
    return buf.pull_bytes(buf.pull_uint16())


def _scalar_bytes(value: Scalar) -> bytes:
    # VICI §Message format: "The vici plugin currently uses non-null terminated strings as
    # values only; numbers get encoded as strings." Booleans as strongSwan writes them.
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, bool):
        return b"yes" if value else b"no"
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, str):
        return value.encode()
    raise ValueError(f"cannot encode {type(value).__name__} as a VICI value")


def _push_value(buf: Buffer, value: Scalar) -> None:
    raw = _scalar_bytes(value)
    if len(raw) > MAX_VALUE_LENGTH:
        raise ValueError(f"value is {len(raw)} bytes, max {MAX_VALUE_LENGTH}")
    buf.push_uint16(len(raw))
    buf.push_bytes(raw)


# -- messages ------------------------------------------------------------------------------


def _set_unique(section: Section, name: str, value: Value) -> None:
    # VICI §Key/Values: "Key names must be unique in the current section".
    if name in section:
        raise ViciProtocolError(f"duplicate key {name!r} in one section")
    section[name] = value


def pull_message(buf: Buffer) -> Section:
    """Decode the message tree from the cursor to the end of ``buf``."""
    root: Section = {}
    stack: list[Section] = [root]
    current_list: list[bytes] | None = None
    try:
        while not buf.eof():
            offset = buf.tell()
            code = buf.pull_uint8()
            try:
                element = ElementType(code)
            except ValueError:
                raise ViciProtocolError(f"unknown element type {code} at {offset}") from None
            # VICI §Lists: "After opening a list, only list items may appear before the list
            # closing element ... list items may appear within lists only."
            in_list = current_list is not None
            if in_list != (element in (ElementType.LIST_ITEM, ElementType.LIST_END)):
                where = "inside" if in_list else "outside"
                raise ViciProtocolError(f"{element.name} {where} a list at {offset}")
            if element is ElementType.SECTION_START:
                if len(stack) > MAX_SECTION_DEPTH:
                    raise ViciProtocolError(f"sections nested deeper than {MAX_SECTION_DEPTH}")
                section: Section = {}
                _set_unique(stack[-1], _pull_name(buf), section)
                stack.append(section)
            elif element is ElementType.SECTION_END:
                # VICI §Sections: "SECTION_START and SECTION_END items must be balanced".
                if len(stack) == 1:
                    raise ViciProtocolError(f"SECTION_END without a section at {offset}")
                stack.pop()
            elif element is ElementType.KEY_VALUE:
                name = _pull_name(buf)
                _set_unique(stack[-1], name, _pull_value(buf))
            elif element is ElementType.LIST_START:
                current_list = []
                _set_unique(stack[-1], _pull_name(buf), current_list)
            elif element is ElementType.LIST_ITEM:
                assert current_list is not None
                current_list.append(_pull_value(buf))
            else:  # LIST_END
                current_list = None
    except BufferReadError as exc:
        raise ViciProtocolError(f"truncated message: {exc}") from None
    # VICI §Lists: "all lists must be closed in valid messages".
    if current_list is not None:
        raise ViciProtocolError("message ends inside a list")
    if len(stack) > 1:
        raise ViciProtocolError(f"message ends with {len(stack) - 1} section(s) open")
    return root


def _is_scalar(value: object) -> TypeGuard[Scalar]:
    # bool is an int; bytes-like values must not be taken for sequences of ints
    return isinstance(value, str | bytes | bytearray | memoryview | int)


def push_message(buf: Buffer, message: EncodableSection) -> None:
    """Encode ``message`` at the cursor (the order of the mapping is kept)."""
    for name, value in message.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            buf.push_uint8(ElementType.SECTION_START)
            _push_name(buf, name)
            push_message(buf, value)
            buf.push_uint8(ElementType.SECTION_END)
        elif _is_scalar(value):
            buf.push_uint8(ElementType.KEY_VALUE)
            _push_name(buf, name)
            _push_value(buf, value)
        elif isinstance(value, Sequence):
            # VICI §Lists: lists "may not be nested", items are values.
            buf.push_uint8(ElementType.LIST_START)
            _push_name(buf, name)
            for item in value:
                if not _is_scalar(item):
                    raise ValueError(f"list {name!r} holds a {type(item).__name__}")
                buf.push_uint8(ElementType.LIST_ITEM)
                _push_value(buf, item)
            buf.push_uint8(ElementType.LIST_END)
        else:
            raise ValueError(f"cannot encode {name!r}: {type(value).__name__}")


def encode_message(message: EncodableSection) -> bytes:
    buf = Buffer(capacity=256)
    push_message(buf, message)
    return buf.data


def decode_message(data: bytes) -> Section:
    return pull_message(Buffer(data=data))


# -- packets -------------------------------------------------------------------------------


def encode_packet(
    type: PacketType, name: str | None = None, message: EncodableSection | None = None
) -> bytes:
    """One transport segment: length prefix, packet type, name tag if named, message."""
    if (name is not None) != (type in _NAMED):
        raise ValueError(f"{type.name} {'needs' if type in _NAMED else 'has no'} a name")
    if message and type not in _WITH_MESSAGE:
        raise ValueError(f"{type.name} carries no message")
    buf = Buffer(capacity=256)
    buf.push_uint32(0)  # the length, written below once known
    buf.push_uint8(type)
    if name is not None:
        _push_name(buf, name)
    if message:
        push_message(buf, message)
    length = buf.tell() - LENGTH_PREFIX_SIZE
    if length > MAX_SEGMENT_SIZE:
        raise ValueError(f"packet is {length} bytes, max {MAX_SEGMENT_SIZE}")
    end = buf.tell()
    buf.seek(0)
    buf.push_uint32(length)
    buf.seek(end)
    return buf.data


def decode_packet(segment: bytes) -> Packet:
    """Decode one transport segment's data (without its length prefix)."""
    buf = Buffer(data=segment)
    try:
        code = buf.pull_uint8()
        try:
            type = PacketType(code)
        except ValueError:
            raise ViciProtocolError(f"unknown packet type {code}") from None
        # VICI §Packet layer: "For packets having a named type, after the packet type an
        # 8-bit length header of the name follows".
        name = _pull_name(buf) if type in _NAMED else None
    except BufferReadError as exc:
        raise ViciProtocolError(f"truncated packet: {exc}") from None
    if type in _WITH_MESSAGE:
        message = pull_message(buf)
    elif not buf.eof():
        raise ViciProtocolError(f"{type.name} with {buf.remaining()} trailing bytes")
    else:
        message = {}
    return Packet(type, name, message)


class FrameDecoder:
    """Reassembles transport segments from a byte stream (VICI §Transport protocol).

    h11-style: ``receive_data`` buffers bytes, ``next_packet`` returns the next whole packet
    or None; ``feed`` does both and returns every packet completed. After a
    ``ViciProtocolError`` the stream has no recoverable framing: the caller closes it.
    """

    __slots__ = ("_buffer", "_max_segment")

    def __init__(self, max_segment: int = MAX_SEGMENT_SIZE) -> None:
        self._buffer = bytearray()
        self._max_segment = max_segment

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole segment."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def next_packet(self) -> Packet | None:
        if len(self._buffer) < LENGTH_PREFIX_SIZE:
            return None
        length = int.from_bytes(self._buffer[:LENGTH_PREFIX_SIZE], "big")
        # Checked on the header alone: an oversized segment is refused before it is read.
        if length > self._max_segment:
            raise ViciProtocolError(f"segment of {length} bytes, max {self._max_segment}")
        if length == 0:
            raise ViciProtocolError("empty segment: no packet type")
        end = LENGTH_PREFIX_SIZE + length
        if len(self._buffer) < end:
            return None
        segment = bytes(self._buffer[LENGTH_PREFIX_SIZE:end])
        del self._buffer[:end]
        return decode_packet(segment)

    def feed(self, data: bytes) -> list[Packet]:
        self.receive_data(data)
        packets = []
        while (packet := self.next_packet()) is not None:
            packets.append(packet)
        return packets


# -- text views ----------------------------------------------------------------------------


def text(value: bytes, errors: str = "strict") -> str:
    """A value as text (UTF-8); with ``errors="strict"`` bad bytes are a ViciProtocolError."""
    try:
        return value.decode("utf-8", errors)
    except UnicodeDecodeError:
        raise ViciProtocolError(f"value {value[:32]!r} is not UTF-8") from None


def to_text(tree: Section, errors: str = "strict") -> TextSection:
    """The tree with every value (and list item) decoded as UTF-8 text."""
    out: TextSection = {}
    for name, value in tree.items():
        if isinstance(value, bytes):
            out[name] = text(value, errors)
        elif isinstance(value, list):
            out[name] = [text(item, errors) for item in value]
        else:
            out[name] = to_text(value, errors)
    return out
