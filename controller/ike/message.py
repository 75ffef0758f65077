"""IKEv2 messages (RFC 7296 §3.1, §3.2): the IKE header, the payload chain, parse/serialize.

The Next Payload fields are chained here and nowhere else: the IKE header names the first
payload, each generic payload header names the payload after it, and the Encrypted payload's
names the first payload *inside* it. ``parse_message`` (a datagram) and
``parse_payload_chain`` (a decrypted SK payload) are the entry points for a peer's bytes:
they turn a truncation (``BufferReadError``) into ``InvalidSyntax``, so callers see a result
or an ``IkeProtocolError``, nothing else.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .buffer import Buffer, BufferReadError
from .constants import ExchangeType, HeaderFlag, NotifyType, PayloadType, members_by_value
from .errors import InvalidMajorVersion, InvalidSyntax, UnsupportedCriticalPayload
from .payloads import (
    BODY_PULLERS,
    EncryptedFragmentPayload,
    EncryptedPayload,
    NotifyPayload,
    Payload,
    Proposal,
    SaPayload,
    UnknownPayload,
    pull_encrypted_fragment_payload,
    pull_encrypted_payload,
    push_payload_body,
)

__all__ = [
    "GENERIC_PAYLOAD_HEADER_LENGTH",
    "IKE_HEADER_LENGTH",
    "GenericPayloadHeader",
    "IkeHeader",
    "Message",
    "parse_message",
    "parse_payload_chain",
    "pull_generic_payload_header",
    "pull_ike_header",
    "pull_payload_chain",
    "push_generic_payload_header",
    "push_ike_header",
    "push_payload_chain",
    "serialize_message",
    "serialize_payload_body",
    "serialize_payload_chain",
    "serialize_sk_prefix",
]

# RFC 7296 §3.1: IKE SA Initiator's SPI (8), Responder's SPI (8), Next Payload, MjVer|MnVer,
# Exchange Type, Flags, Message ID (4), Length (4)
IKE_HEADER_LENGTH = 8 + 8 + 1 + 1 + 1 + 1 + 4 + 4  # = 28
IKE_SPI_LENGTH = 8
IKE_MAJOR_VERSION = 2  # RFC 7296 §3.1: "MUST set the major version to 2"
IKE_MINOR_VERSION = 0  # RFC 7296 §3.1: "MUST set the minor version to 0"
MAX_MESSAGE_LENGTH = 2**32 - 1  # 32-bit Length field

# RFC 7296 §3.2: Next Payload, C + RESERVED, Payload Length (2)
GENERIC_PAYLOAD_HEADER_LENGTH = 1 + 1 + 2  # = 4
MAX_PAYLOAD_LENGTH = 2**16 - 1  # 16-bit Payload Length, generic header included
CRITICAL_BIT = 0x80  # RFC 7296 §3.2: "C", the top bit of the second octet

# The layouts above, for Buffer.pull_struct/push_struct (network order)
_IKE_HEADER = struct.Struct("!8s8sBBBBII")
_GENERIC_PAYLOAD_HEADER = struct.Struct("!BBH")
assert _IKE_HEADER.size == IKE_HEADER_LENGTH
assert _GENERIC_PAYLOAD_HEADER.size == GENERIC_PAYLOAD_HEADER_LENGTH

_PAYLOAD_TYPES = members_by_value(PayloadType)
_EXCHANGE_TYPES = members_by_value(ExchangeType)
# Every Flags octet as a HeaderFlag (undefined bits kept), built once: an IntFlag call per
# message is not free
_HEADER_FLAGS = tuple(HeaderFlag(value) for value in range(0x100))
_ENCRYPTED_TYPES = (PayloadType.SK, PayloadType.SKF)
_NO_NEXT_PAYLOAD = PayloadType.NONE  # a module constant: Enum class attributes are slow
# The flag bits as plain ints: IntFlag's "&" runs Python code, int's does not
_INITIATOR_BIT = int(HeaderFlag.INITIATOR)
_RESPONSE_BIT = int(HeaderFlag.RESPONSE)

_P = TypeVar("_P")


# -- IKE header (RFC 7296 §3.1) -------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class IkeHeader:
    """The IKE header (RFC 7296 §3.1), every field as on the wire.

    ``serialize_message`` computes ``next_payload`` and ``length`` from the payloads and
    ignores the values given here; ``parse_message`` returns them as received (checked).
    """

    spi_i: bytes
    spi_r: bytes
    next_payload: PayloadType | int = PayloadType.NONE
    major_version: int = IKE_MAJOR_VERSION
    minor_version: int = IKE_MINOR_VERSION
    exchange_type: ExchangeType | int
    flags: HeaderFlag = HeaderFlag(0)
    message_id: int = 0
    length: int = IKE_HEADER_LENGTH

    @property
    def is_initiator(self) -> bool:
        """The I flag: sent by the original initiator of the IKE SA."""
        return bool(int(self.flags) & _INITIATOR_BIT)

    @property
    def is_response(self) -> bool:
        """The R flag: a response to the request with the same Message ID."""
        return bool(int(self.flags) & _RESPONSE_BIT)


def pull_ike_header(buf: Buffer) -> IkeHeader:
    fields = buf.pull_struct(_IKE_HEADER)
    spi_i, spi_r, next_payload, version, exchange_type, flags, message_id, length = fields
    major_version, minor_version = version >> 4, version & 0x0F
    # RFC 7296 §3.1, §2.5: reject a major version other than 2 with INVALID_MAJOR_VERSION;
    # the minor version "MUST" be ignored
    if major_version != IKE_MAJOR_VERSION:
        raise InvalidMajorVersion(major_version)
    return IkeHeader(
        spi_i=spi_i,
        spi_r=spi_r,
        next_payload=_PAYLOAD_TYPES.get(next_payload, next_payload),
        major_version=major_version,
        minor_version=minor_version,
        exchange_type=_EXCHANGE_TYPES.get(exchange_type, exchange_type),
        # RFC 7296 §3.1: undefined flag bits "MUST be ignored on receipt"; kept, so that the
        # header re-serializes unchanged (integrity and signatures cover the received bytes)
        flags=_HEADER_FLAGS[flags],
        message_id=message_id,
        length=length,
    )


def push_ike_header(buf: Buffer, header: IkeHeader) -> None:
    _push_ike_header(buf, header, header.next_payload, header.length)


def _push_ike_header(buf: Buffer, h: IkeHeader, next_payload: int, length: int) -> None:
    """``h`` with its Next Payload and Length as given (computed by the serializers)."""
    if len(h.spi_i) != IKE_SPI_LENGTH or len(h.spi_r) != IKE_SPI_LENGTH:
        raise ValueError("IKE SPIs are 8 bytes (RFC 7296 §3.1)")
    if not (0 <= h.major_version <= 0x0F and 0 <= h.minor_version <= 0x0F):
        raise ValueError("IKE version numbers are 4 bits each")
    buf.push_struct(_IKE_HEADER, h.spi_i, h.spi_r, next_payload,
                    h.major_version << 4 | h.minor_version, h.exchange_type, h.flags,
                    h.message_id, length)


# -- Generic payload header (RFC 7296 §3.2) -------------------------------------------------


@dataclass(frozen=True)
class GenericPayloadHeader:
    """The 4 octets in front of every payload (RFC 7296 §3.2)."""

    next_payload: PayloadType | int
    critical: bool
    length: int  # Payload Length, this header included


def pull_generic_payload_header(buf: Buffer) -> GenericPayloadHeader:
    next_payload, flags, length = buf.pull_struct(_GENERIC_PAYLOAD_HEADER)
    # RFC 7296 §3.2: the 7 RESERVED bits "MUST be ignored on receipt"
    next_payload = _PAYLOAD_TYPES.get(next_payload, next_payload)
    return GenericPayloadHeader(next_payload, bool(flags & CRITICAL_BIT), length)


def push_generic_payload_header(buf: Buffer, header: GenericPayloadHeader) -> None:
    critical = CRITICAL_BIT if header.critical else 0
    buf.push_struct(_GENERIC_PAYLOAD_HEADER, header.next_payload, critical, header.length)


# -- The payload chain ----------------------------------------------------------------------


def _payload_name(payload_type: int) -> str:
    try:
        return PayloadType(payload_type).name
    except ValueError:
        return f"type-{payload_type}"


def _pull_other_payload(
    payload_type: int, next_payload: int, critical: bool, body: Buffer
) -> Payload:
    """A payload that BODY_PULLERS does not parse by its body alone."""
    # RFC 7296 §3.14 (and RFC 7383 §2.5 for SKF): the Next Payload of an Encrypted payload
    # "is the payload type of the first embedded payload"
    if payload_type == PayloadType.SK:
        return pull_encrypted_payload(body, next_payload)
    if payload_type == PayloadType.SKF:
        return pull_encrypted_fragment_payload(body, next_payload)
    # RFC 7296 §3.2: an unrecognized payload with the critical bit set rejects the message;
    # without it the payload "MUST be ignored" (skipped, and kept for the record)
    if critical:
        raise UnsupportedCriticalPayload(payload_type)
    return UnknownPayload(payload_type, body.pull_bytes(body.remaining()))


# Payloads a peer sends alike in every exchange of a kind (its IKE SA proposals, its traffic
# selectors), parsed once: the body's bytes -> the payload (immutable: frozen dataclasses of
# tuples), so one parse serves every IKE SA. An SA payload is kept by its *shape*, the body
# without its proposals' SPIs: a Child SA offer differs from the last one by its SPI only,
# and gets the remembered proposals with its own SPIs (the parser reads nothing from an
# SPI's value, RFC 7296 §3.3.1; its size is part of the shape). Bounded: emptied when full,
# so a peer sending a different body each time costs a dict insert, never memory.
_MEMO_TYPES = frozenset({PayloadType.SA, PayloadType.TSI, PayloadType.TSR})
_MEMO_MAX = 256
_memo: dict[tuple[int, bytes, int], Payload] = {}  # (type, body or shape, SPIs or -1)
_PROPOSAL_FIXED = 8  # RFC 7296 §3.3.1: the Proposal Substructure's header, before the SPI


def _sa_shape(body: bytes) -> tuple[bytes, tuple[bytes, ...]] | None:
    """An SA payload body without its proposals' SPIs, and those SPIs; None where the
    proposal headers do not tile the body (the parser then says what is wrong)."""
    parts: list[bytes] = []
    spis: list[bytes] = []
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < _PROPOSAL_FIXED:
            return None
        length = body[pos + 2] << 8 | body[pos + 3]
        spi_end = pos + _PROPOSAL_FIXED + body[pos + 6]  # SPI Size
        if spi_end > pos + length or pos + length > end:
            return None
        parts.append(body[pos:pos + _PROPOSAL_FIXED])
        parts.append(body[spi_end:pos + length])
        spis.append(body[pos + _PROPOSAL_FIXED:spi_end])
        pos += length
    return b"".join(parts), tuple(spis)


def _pull_memo(payload_type: int, puller: Callable[[Buffer], Payload], body: Buffer) -> Payload:
    data = body.data_slice(0, body.capacity)
    spis: tuple[bytes, ...] | None = None
    if payload_type == PayloadType.SA:
        shape = _sa_shape(data)
        if shape is not None:
            data, spis = shape
    # A shape and a whole body are keys of their own (a body may be bytes for bytes
    # another's shape), and a shape's key says how many SPIs it lost.
    key = (payload_type, data, -1 if spis is None else len(spis))
    payload = _memo.get(key)
    if payload is not None:
        body.seek(body.capacity)  # read to its end, as the puller would have
        if spis is None or not isinstance(payload, SaPayload):
            return payload
        if len(payload.proposals) == len(spis):  # (as the key says; never trusted blindly)
            return _with_spis(payload, spis)
        body.seek(0)
    payload = puller(body)
    if len(_memo) >= _MEMO_MAX:
        _memo.clear()
    _memo[key] = payload
    return payload


def _with_spis(sa: SaPayload, spis: tuple[bytes, ...]) -> SaPayload:
    """``sa`` (the shape's first parse) with these SPIs: the very object where they are its
    own (an IKE_SA_INIT offer carries none), else its proposals with these SPIs."""
    proposals = sa.proposals
    if all(p.spi == spi for p, spi in zip(proposals, spis, strict=True)):
        return sa
    return SaPayload(tuple(Proposal(p.number, p.protocol_id, spi, p.transforms)
                           for p, spi in zip(proposals, spis, strict=True)))


def pull_payload_chain(buf: Buffer, first_type: int, end: int) -> list[Payload]:
    """Read payloads from the cursor to ``end``, following the Next Payload chain.

    ``first_type`` is the type named by whatever precedes the chain (the IKE header, or the
    Encrypted payload for a decrypted chain). The chain must end exactly at ``end``.
    """
    payloads: list[Payload] = []
    payload_type = first_type
    while payload_type != _NO_NEXT_PAYLOAD:
        start = buf.tell()
        if end - start < GENERIC_PAYLOAD_HEADER_LENGTH:
            raise InvalidSyntax(
                f"{_where(payload_type, start)}: announced, but only {end - start} bytes remain"
            )
        # RFC 7296 §3.2: the generic payload header, as pull_generic_payload_header reads it
        next_payload, flags, length = buf.pull_struct(_GENERIC_PAYLOAD_HEADER)
        # RFC 7296 §3.2: Payload Length includes the generic header
        if length < GENERIC_PAYLOAD_HEADER_LENGTH:
            raise InvalidSyntax(f"{_where(payload_type, start)}: Payload Length {length} < 4")
        if start + length > end:
            raise InvalidSyntax(
                f"{_where(payload_type, start)}: Payload Length {length} runs past the end "
                f"({end - start} bytes left)"
            )
        body = buf.pull_buffer(length - GENERIC_PAYLOAD_HEADER_LENGTH)
        puller = BODY_PULLERS.get(payload_type)
        try:
            if puller is not None:
                # RFC 7296 §3.2: the critical bit "MUST be ignored" for a recognized type
                payload = (_pull_memo(payload_type, puller, body)
                           if payload_type in _MEMO_TYPES else puller(body))
            else:
                critical = bool(flags & CRITICAL_BIT)
                payload = _pull_other_payload(payload_type, next_payload, critical, body)
        except BufferReadError as exc:
            exc.add_note(f"in the {_where(payload_type, start)}")
            raise
        except InvalidSyntax as exc:
            raise InvalidSyntax(f"{_where(payload_type, start)}: {exc.reason}") from None
        if not body.eof():  # every body parser reads to its end; a bug if not
            raise InvalidSyntax(f"{_where(payload_type, start)}: {body.remaining()} unparsed bytes")
        payloads.append(payload)
        if payload_type in _ENCRYPTED_TYPES:
            # RFC 7296 §3.14: "the Encrypted payload, if present in a message, MUST be the
            # last payload in the message" (so also SKF, RFC 7383 §2.5)
            if buf.tell() != end:
                raise InvalidSyntax(
                    f"{_where(payload_type, start)}: {end - buf.tell()} bytes follow it, it "
                    "must be the last payload"
                )
            return payloads
        payload_type = next_payload
    # RFC 7296 §3.1: Length covers exactly the header and the payloads
    if buf.tell() != end:
        raise InvalidSyntax(
            f"{end - buf.tell()} bytes after the last payload (Next Payload 0) at offset "
            f"{buf.tell()}: a length mismatch"
        )
    return payloads


def _where(payload_type: int, start: int) -> str:
    """A payload in an error message (built only when there is an error to report)."""
    return f"{_payload_name(payload_type)} payload at offset {start}"


def push_payload_chain(buf: Buffer, payloads: Sequence[Payload]) -> int:
    """Write payloads with their generic headers chained; return the first payload's type."""
    last = len(payloads) - 1
    for index, payload in enumerate(payloads):
        next_payload: int
        if isinstance(payload, EncryptedPayload | EncryptedFragmentPayload):
            # RFC 7296 §3.14: last in the message, its Next Payload names the first inner one
            if index != last:
                raise ValueError("the Encrypted payload must be the last payload (§3.14)")
            next_payload = payload.first_payload
        else:
            next_payload = _NO_NEXT_PAYLOAD if index == last else payloads[index + 1].payload_type
            if isinstance(payload, UnknownPayload) and (
                payload.payload_type in BODY_PULLERS
                or payload.payload_type in (PayloadType.NONE, PayloadType.SK, PayloadType.SKF)
            ):
                raise ValueError(f"UnknownPayload of known type {payload.payload_type}")
        start = buf.tell()
        # RFC 7296 §3.2: C "MUST be set to zero for payload types defined in this document";
        # Payload Length is written once the body is
        buf.push_struct(_GENERIC_PAYLOAD_HEADER, next_payload, 0, 0)
        push_payload_body(buf, payload)
        length = buf.tell() - start
        if length > MAX_PAYLOAD_LENGTH:
            raise ValueError(f"{_payload_name(payload.payload_type)} payload too long")
        buf.patch_uint16(start + 2, length)
    return payloads[0].payload_type if payloads else PayloadType.NONE


# -- Messages -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """An IKE message: the header and the payloads, in order."""

    header: IkeHeader
    payloads: tuple[Payload, ...] = ()

    def find(self, kind: type[_P]) -> _P | None:
        """The first payload of class ``kind``, if any."""
        for payload in self.payloads:
            if isinstance(payload, kind):
                return payload
        return None

    def find_all(self, kind: type[_P]) -> tuple[_P, ...]:
        return tuple(payload for payload in self.payloads if isinstance(payload, kind))

    def notify(self, notify_type: NotifyType | int) -> NotifyPayload | None:
        """The first Notify payload of ``notify_type``, if any."""
        for payload in self.payloads:
            if isinstance(payload, NotifyPayload) and payload.notify_type == notify_type:
                return payload
        return None


def _truncated(exc: BufferReadError) -> InvalidSyntax:
    """The one translation of BufferReadError into the protocol's error."""
    where = "; ".join(getattr(exc, "__notes__", ()))
    return InvalidSyntax(f"truncated: {exc}" + (f" ({where})" if where else ""))


def parse_message(data: bytes) -> Message:
    """Parse one IKE message; raises ``IkeProtocolError`` (mostly ``InvalidSyntax``)."""
    if len(data) < IKE_HEADER_LENGTH:
        raise InvalidSyntax(f"{len(data)} bytes, shorter than the 28-byte IKE header")
    try:
        buf = Buffer(data=data)
        header = pull_ike_header(buf)
        # RFC 7296 §3.1: Length is "the total message (header + payloads) in octets"
        if header.length != len(data):
            raise InvalidSyntax(
                f"IKE header Length {header.length} but the message is {len(data)} bytes: "
                "a length mismatch"
            )
        payloads = pull_payload_chain(buf, header.next_payload, len(data))
    except BufferReadError as exc:
        raise _truncated(exc) from None
    return Message(header, tuple(payloads))


def parse_payload_chain(data: bytes, first_type: int) -> tuple[Payload, ...]:
    """Parse a decrypted Encrypted payload's content (padding already removed).

    ``first_type`` is the Encrypted payload's ``first_payload``.
    """
    try:
        payloads = pull_payload_chain(Buffer(data=data), first_type, len(data))
    except BufferReadError as exc:
        raise _truncated(exc) from None
    for payload in payloads:
        # RFC 7296 §3.14 defines one level of encryption: an SK (or SKF) inside another
        # could never be decrypted
        if payload.payload_type in _ENCRYPTED_TYPES:
            raise InvalidSyntax("an Encrypted payload inside the Encrypted payload")
    return tuple(payloads)


def serialize_payload_chain(payloads: Sequence[Payload]) -> tuple[int, bytes]:
    """The chained payloads as bytes, and the type to put in whatever precedes them."""
    buf = Buffer()
    first_type = push_payload_chain(buf, payloads)
    return first_type, buf.data


def serialize_payload_body(payload: Payload) -> bytes:
    """One payload's body, without the generic header.

    RFC 7296 §2.15 signs "RestOfInitIDPayload", the body of the IDi payload.
    """
    buf = Buffer()
    push_payload_body(buf, payload)
    return buf.data


def serialize_message(message: Message) -> bytes:
    """The message as bytes; the header's Next Payload and Length are computed."""
    h = message.header
    buf = Buffer()
    buf.push_bytes(bytes(IKE_HEADER_LENGTH))  # the header, written once Length is known
    first_type = push_payload_chain(buf, message.payloads)
    length = buf.tell()
    if length > MAX_MESSAGE_LENGTH:
        raise ValueError(f"IKE message of {length} bytes exceeds the 32-bit Length field")
    buf.seek(0)
    _push_ike_header(buf, h, first_type, length)
    buf.seek(length)
    return buf.data


def serialize_sk_prefix(header: IkeHeader, first_inner: int, sk_length: int) -> bytes:
    """The IKE header and the Encrypted payload's generic header of a message whose one
    payload is SK (RFC 7296 §3.14): the associated data of its encryption (RFC 5282 §5.1).

    ``first_inner`` is the type of the first payload inside; ``sk_length`` the SK payload's
    Payload Length (generic header, IV, ciphertext, ICV). The header's Next Payload (SK) and
    Length are computed.
    """
    length = IKE_HEADER_LENGTH + sk_length
    if sk_length > MAX_PAYLOAD_LENGTH:
        raise ValueError(f"SK payload of {sk_length} bytes exceeds the 16-bit Payload Length")
    buf = Buffer()
    _push_ike_header(buf, header, PayloadType.SK, length)
    # RFC 7296 §3.2: C is zero; §3.14: Next Payload names the first payload inside
    buf.push_struct(_GENERIC_PAYLOAD_HEADER, first_inner, 0, sk_length)
    return buf.data
