"""IKEv2 payload bodies (RFC 7296 §3.3-§3.15): frozen dataclasses and pull/push pairs.

A *body* is what follows the 4-octet generic payload header. ``pull_<payload>(buf)`` reads a
body up to the end of ``buf`` (the chain in ``message.py`` hands it a buffer holding exactly
that body) and ``push_<payload>(buf, payload)`` writes one. The generic header, the chaining
of Next Payload fields and the critical bit are handled in one place, ``message.py``.

Reading: a field outside what RFC 7296 allows raises ``InvalidSyntax`` naming it; a read past
the end raises ``BufferReadError``, which the parse entry points translate. Writing: a value
that cannot be encoded, or that our own parser would reject, is a local bug: ``ValueError``.
Reserved fields are sent as zero and ignored on receipt (RFC 7296 §3.2). Code points known
to IANA come back as enum members, unknown ones as plain ``int`` (registries grow).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from ipaddress import IPv4Address, IPv6Address
from typing import Any, ClassVar, TypeAlias, get_args

from .buffer import Buffer
from .constants import (
    AuthMethod,
    CertEncoding,
    CfgType,
    ConfigAttributeType,
    DhGroup,
    EncrId,
    EsnId,
    IdType,
    IntegId,
    NotifyType,
    PayloadType,
    PrfId,
    ProtocolId,
    TransformAttributeType,
    TransformType,
    TsType,
    members_by_value,
)
from .errors import InvalidSyntax
from .memo import IdentityMemo

__all__ = [
    "BODY_PULLERS",
    "MAX_NONCE_LENGTH",
    "MIN_NONCE_LENGTH",
    "AuthPayload",
    "CertPayload",
    "CertReqPayload",
    "ConfigurationAttribute",
    "ConfigurationPayload",
    "DeletePayload",
    "EncryptedFragmentPayload",
    "EncryptedPayload",
    "IdiPayload",
    "IdrPayload",
    "KePayload",
    "NoncePayload",
    "NotifyPayload",
    "Payload",
    "Proposal",
    "SaPayload",
    "TrafficSelector",
    "Transform",
    "TransformAttribute",
    "TsiPayload",
    "TsrPayload",
    "UnknownPayload",
    "UnknownTrafficSelector",
    "VendorIdPayload",
    "pull_auth_payload",
    "pull_cert_payload",
    "pull_certreq_payload",
    "pull_configuration_payload",
    "pull_delete_payload",
    "pull_encrypted_fragment_payload",
    "pull_encrypted_payload",
    "pull_idi_payload",
    "pull_idr_payload",
    "pull_ke_payload",
    "pull_nonce_payload",
    "pull_notify_payload",
    "pull_sa_payload",
    "pull_tsi_payload",
    "pull_tsr_payload",
    "pull_vendor_id_payload",
    "push_auth_payload",
    "push_cert_payload",
    "push_certreq_payload",
    "push_configuration_payload",
    "push_delete_payload",
    "push_encrypted_fragment_payload",
    "push_encrypted_payload",
    "push_idi_payload",
    "push_idr_payload",
    "push_ke_payload",
    "push_nonce_payload",
    "push_notify_payload",
    "push_payload_body",
    "push_sa_payload",
    "push_tsi_payload",
    "push_tsr_payload",
    "push_vendor_id_payload",
]

# -- Sizes and limits -------------------------------------------------------------------------

# RFC 7296 §3.3.1: Last Substruc, RESERVED, Proposal Length (2), Proposal Num, Protocol ID,
# SPI Size, Num Transforms
PROPOSAL_HEADER_LENGTH = 1 + 1 + 2 + 1 + 1 + 1 + 1  # = 8
# RFC 7296 §3.3.2: Last Substruc, RESERVED, Transform Length (2), Transform Type, RESERVED,
# Transform ID (2)
TRANSFORM_HEADER_LENGTH = 1 + 1 + 2 + 1 + 1 + 2  # = 8
# RFC 7296 §3.3.5: AF bit + Attribute Type (2), then Attribute Value (TV) or Length (TLV)
ATTRIBUTE_HEADER_LENGTH = 2 + 2  # = 4
ATTRIBUTE_FORMAT_TV = 0x8000  # AF bit: 1 = TV (two-octet value), 0 = TLV
ATTRIBUTE_TYPE_MASK = 0x7FFF
MAX_SUBSTRUCTURE_LENGTH = 2**16 - 1  # 16-bit length fields of proposals and transforms
# RFC 7296 §3.3.1 and §3.3.2: the Last Substruc values
LAST_SUBSTRUCTURE = 0
MORE_PROPOSALS = 2
MORE_TRANSFORMS = 3

IKE_SPI_SIZE = 8  # RFC 7296 §3.1: SPIs in the IKE header are 8 octets
CHILD_SA_SPI_SIZE = 4  # RFC 7296 §3.3.1: "4 for ESP and AH" (RFC 4303 §2.1: 32-bit SPI)

# RFC 7296 §3.9: "The size of the Nonce Data MUST be between 16 and 256 octets, inclusive."
MIN_NONCE_LENGTH = 16
MAX_NONCE_LENGTH = 256

# RFC 7296 §3.13.1: TS Type, IP Protocol ID, Selector Length (2), Start Port (2), End Port (2),
# Starting Address, Ending Address
TS_HEADER_LENGTH = 1 + 1 + 2  # = 4: the part every TS type shares (type, octet, length)
TS_IPV4_LENGTH = TS_HEADER_LENGTH + 2 + 2 + 4 + 4  # = 16
TS_IPV6_LENGTH = TS_HEADER_LENGTH + 2 + 2 + 16 + 16  # = 40
MAX_TRAFFIC_SELECTORS = 2**8 - 1  # one-octet "Number of TSs"

# RFC 7296 §3.15.1: R bit + Attribute Type (2), Length (2)
CONFIG_ATTRIBUTE_HEADER_LENGTH = 2 + 2  # = 4
CONFIG_ATTRIBUTE_TYPE_MASK = 0x7FFF  # the top bit is reserved

# The fixed layouts above for Buffer.pull_struct/push_struct: network order, "x" for a
# RESERVED octet ("MUST be sent as zero; MUST be ignored on receipt", RFC 7296 §3.2)
_SUBSTRUCTURE_HEADER = struct.Struct("!BxH")  # Last Substruc, RESERVED, Length (§3.3.1/2)
_PROPOSAL_FIELDS = struct.Struct("!BBBB")  # Proposal Num, Protocol ID, SPI Size, Num Transforms
_TRANSFORM_FIELDS = struct.Struct("!BxH")  # Transform Type, RESERVED, Transform ID
_ATTRIBUTE_HEADER = struct.Struct("!HH")  # AF + Attribute Type, Value (TV) or Length (TLV)
_TYPE_RESERVED_3 = struct.Struct("!B3x")  # ID Type / Auth Method / CFG Type, RESERVED (3)
_KE_HEADER = struct.Struct("!H2x")  # Diffie-Hellman Group Num, RESERVED (§3.4)
_NOTIFY_HEADER = struct.Struct("!BBH")  # Protocol ID, SPI Size, Notify Message Type (§3.10)
_DELETE_HEADER = struct.Struct("!BBH")  # Protocol ID, SPI Size, Num of SPIs (§3.11)
_TS_HEADER = struct.Struct("!BBH")  # TS Type, IP Protocol ID, Selector Length (§3.13.1)
_TS_PORTS = struct.Struct("!HH")  # Start Port, End Port (§3.13.1)
_TS_COUNT = struct.Struct("!B3x")  # Number of TSs, RESERVED (§3.13)
_FRAGMENT_HEADER = struct.Struct("!HH")  # Fragment Number, Total Fragments (RFC 7383 §2.5)
_CONFIG_ATTRIBUTE_HEADER = struct.Struct("!HH")  # R + Attribute Type, Length (§3.15.1)
# Written in one step, the same headers: a proposal's and a transform's (read in two, so that
# a Length running past the end is reported as such), a selector up to its addresses
_PROPOSAL_HEADER = struct.Struct("!BxHBBBB")
_TRANSFORM_HEADER = struct.Struct("!BxHBxH")
_TS_HEADER_PORTS = struct.Struct("!BBHHH")
assert _SUBSTRUCTURE_HEADER.size + _PROPOSAL_FIELDS.size == _PROPOSAL_HEADER.size
assert _PROPOSAL_HEADER.size == PROPOSAL_HEADER_LENGTH
assert _SUBSTRUCTURE_HEADER.size + _TRANSFORM_FIELDS.size == _TRANSFORM_HEADER.size
assert _TRANSFORM_HEADER.size == TRANSFORM_HEADER_LENGTH
assert _TS_HEADER.size == TS_HEADER_LENGTH
assert _TS_HEADER.size + _TS_PORTS.size == _TS_HEADER_PORTS.size

# Registry lookups for the fields parsed per structure (constants.members_by_value)
_TRANSFORM_TYPES = members_by_value(TransformType)
_TRANSFORM_ATTRIBUTE_TYPES = members_by_value(TransformAttributeType)
_PROTOCOL_IDS = members_by_value(ProtocolId)
_ID_TYPES = members_by_value(IdType)
_CERT_ENCODINGS = members_by_value(CertEncoding)
_AUTH_METHODS = members_by_value(AuthMethod)
_NOTIFY_TYPES = members_by_value(NotifyType)
_DH_GROUPS = members_by_value(DhGroup)
_PAYLOAD_TYPES = members_by_value(PayloadType)
_CFG_TYPES = members_by_value(CfgType)
_CONFIG_ATTRIBUTE_TYPES = members_by_value(ConfigAttributeType)
_KEY_LENGTH = TransformAttributeType.KEY_LENGTH  # read per transform: Enum attributes are slow


def _pull_rest(buf: Buffer) -> bytes:
    return buf.pull_bytes(buf.remaining())


def _patch_length(buf: Buffer, at: int, start: int, what: str) -> None:
    """Write the 16-bit length of the structure that began at ``start`` into ``at``."""
    length = buf.tell() - start
    if length > MAX_SUBSTRUCTURE_LENGTH:
        raise ValueError(f"{what} is {length} bytes, its length field holds at most 65535")
    buf.patch_uint16(at, length)


def _raise_if(problem: str | None) -> None:
    if problem is not None:
        raise InvalidSyntax(problem)


def _fail_if(problem: str | None) -> None:
    if problem is not None:
        raise ValueError(problem)


# -- SA payload (RFC 7296 §3.3) -------------------------------------------------------------

_TRANSFORM_ID_ENUMS: dict[int, type[IntEnum]] = {
    TransformType.ENCR: EncrId,
    TransformType.PRF: PrfId,
    TransformType.INTEG: IntegId,
    TransformType.KE: DhGroup,
    TransformType.ESN: EsnId,
}
_TRANSFORM_IDS: dict[int, dict[int, IntEnum]] = {
    transform_type: members_by_value(ids) for transform_type, ids in _TRANSFORM_ID_ENUMS.items()
}


@dataclass(frozen=True)
class TransformAttribute:
    """A transform attribute (RFC 7296 §3.3.5): an ``int`` value is TV, ``bytes`` is TLV."""

    attribute_type: TransformAttributeType | int
    value: int | bytes


@dataclass(frozen=True)
class Transform:
    """A Transform Substructure (RFC 7296 §3.3.2)."""

    transform_type: TransformType | int
    transform_id: int  # an EncrId / PrfId / IntegId / DhGroup / EsnId when known
    attributes: tuple[TransformAttribute, ...] = ()

    @property
    def key_length(self) -> int | None:
        """The Key Length attribute in bits (RFC 7296 §3.3.5), if present."""
        for attribute in self.attributes:
            if attribute.attribute_type == _KEY_LENGTH and isinstance(attribute.value, int):
                return attribute.value
        return None


@dataclass(frozen=True)
class Proposal:
    """A Proposal Substructure (RFC 7296 §3.3.1): transforms ANDed, for one protocol."""

    number: int
    protocol_id: ProtocolId | int
    spi: bytes
    transforms: tuple[Transform, ...]


@dataclass(frozen=True)
class SaPayload:
    """Security Association payload (RFC 7296 §3.3): proposals ORed, in preference order."""

    payload_type: ClassVar[PayloadType] = PayloadType.SA
    proposals: tuple[Proposal, ...]


def _proposal_spi_problem(protocol_id: int, spi_size: int) -> str | None:
    # RFC 7296 §3.3.1 SPI Size: zero for an initial IKE SA negotiation, else "8 for IKE,
    # 4 for ESP and AH"
    if protocol_id == ProtocolId.IKE:
        allowed: tuple[int, ...] = (0, IKE_SPI_SIZE)
    elif protocol_id in (ProtocolId.ESP, ProtocolId.AH):
        allowed = (CHILD_SA_SPI_SIZE,)
    else:
        allowed = (0, CHILD_SA_SPI_SIZE, IKE_SPI_SIZE)
    if spi_size not in allowed:
        return f"SPI size {spi_size} for protocol {protocol_id}, expected one of {allowed}"
    return None


def _pull_transform_attributes(buf: Buffer) -> tuple[TransformAttribute, ...]:
    attributes: list[TransformAttribute] = []
    while not buf.eof():
        word, value_or_length = buf.pull_struct(_ATTRIBUTE_HEADER)
        attribute_type = word & ATTRIBUTE_TYPE_MASK
        attribute_type = _TRANSFORM_ATTRIBUTE_TYPES.get(attribute_type, attribute_type)
        value: int | bytes
        if word & ATTRIBUTE_FORMAT_TV:  # RFC 7296 §3.3.5: AF = 1, the value is two octets
            value = value_or_length
        else:
            length = value_or_length
            if length > buf.remaining():
                raise InvalidSyntax(
                    f"transform attribute {attribute_type}: length {length} runs past the "
                    f"transform ({buf.remaining()} bytes left)"
                )
            value = buf.pull_bytes(length)
            if attribute_type == TransformAttributeType.KEY_LENGTH:
                # RFC 7296 §3.3.5: Key Length is a TV attribute
                raise InvalidSyntax("Key Length transform attribute in TLV format")
        attributes.append(TransformAttribute(attribute_type, value))
    return tuple(attributes)


def _push_transform_attribute(buf: Buffer, attribute: TransformAttribute) -> None:
    if not 0 <= attribute.attribute_type <= ATTRIBUTE_TYPE_MASK:
        raise ValueError(f"transform attribute type {attribute.attribute_type} exceeds 15 bits")
    if isinstance(attribute.value, int):
        buf.push_struct(
            _ATTRIBUTE_HEADER, ATTRIBUTE_FORMAT_TV | attribute.attribute_type, attribute.value
        )
    else:
        if attribute.attribute_type == TransformAttributeType.KEY_LENGTH:
            raise ValueError("Key Length must be a TV attribute (RFC 7296 §3.3.5): give an int")
        buf.push_struct(_ATTRIBUTE_HEADER, attribute.attribute_type, len(attribute.value))
        buf.push_bytes(attribute.value)


def _pull_transform(buf: Buffer) -> tuple[Transform, bool]:
    """One transform and whether its Last Substruc announces another."""
    last_substructure, length = buf.pull_struct(_SUBSTRUCTURE_HEADER)
    # RFC 7296 §3.3.2: "0 (last) or 3 (more transforms)"
    if last_substructure != LAST_SUBSTRUCTURE and last_substructure != MORE_TRANSFORMS:
        raise InvalidSyntax(f"transform Last Substruc {last_substructure}, expected 0 or 3")
    if length < TRANSFORM_HEADER_LENGTH:
        raise InvalidSyntax(f"Transform Length {length} < {TRANSFORM_HEADER_LENGTH}")
    if length - 4 > buf.remaining():
        raise InvalidSyntax(
            f"Transform Length {length} runs past the proposal ({buf.remaining() + 4} left)"
        )
    transform_type, raw_id = buf.pull_struct(_TRANSFORM_FIELDS)
    ids = _TRANSFORM_IDS.get(transform_type)
    transform_id = raw_id if ids is None else ids.get(raw_id, raw_id)
    attributes = (
        _pull_transform_attributes(buf.pull_buffer(length - TRANSFORM_HEADER_LENGTH))
        if length > TRANSFORM_HEADER_LENGTH
        else ()
    )
    transform = Transform(
        _TRANSFORM_TYPES.get(transform_type, transform_type), transform_id, attributes
    )
    return transform, last_substructure == MORE_TRANSFORMS


def _push_transform(buf: Buffer, transform: Transform, last: bool) -> None:
    start = buf.tell()
    buf.push_struct(_TRANSFORM_HEADER, LAST_SUBSTRUCTURE if last else MORE_TRANSFORMS,
                    TRANSFORM_HEADER_LENGTH, transform.transform_type, transform.transform_id)
    if transform.attributes:  # Transform Length grows: patched once they are written
        for attribute in transform.attributes:
            _push_transform_attribute(buf, attribute)
        _patch_length(buf, start + 2, start, "transform")


def _pull_proposal(buf: Buffer) -> tuple[Proposal, bool]:
    """One proposal and whether its Last Substruc announces another."""
    last_substructure, length = buf.pull_struct(_SUBSTRUCTURE_HEADER)
    # RFC 7296 §3.3.1: "0 if this was the last Proposal Substructure, and a value of 2 if
    # there are more"
    if last_substructure != LAST_SUBSTRUCTURE and last_substructure != MORE_PROPOSALS:
        raise InvalidSyntax(f"proposal Last Substruc {last_substructure}, expected 0 or 2")
    number, protocol_id, spi_size, num_transforms = buf.pull_struct(_PROPOSAL_FIELDS)
    protocol_id = _PROTOCOL_IDS.get(protocol_id, protocol_id)
    # RFC 7296 §3.3.1: proposals are numbered from 1; a response echoes the chosen number
    if number == 0:
        raise InvalidSyntax("Proposal Num 0 (proposals are numbered from 1)")
    _raise_if(_proposal_spi_problem(protocol_id, spi_size))
    if length < PROPOSAL_HEADER_LENGTH + spi_size:
        raise InvalidSyntax(
            f"proposal {number}: Proposal Length {length} < {PROPOSAL_HEADER_LENGTH} + SPI "
            f"size {spi_size}"
        )
    if length - PROPOSAL_HEADER_LENGTH > buf.remaining():
        raise InvalidSyntax(
            f"proposal {number}: Proposal Length {length} runs past the SA payload "
            f"({buf.remaining() + PROPOSAL_HEADER_LENGTH} bytes left)"
        )
    inner = buf.pull_buffer(length - PROPOSAL_HEADER_LENGTH)
    spi = inner.pull_bytes(spi_size)
    transforms: list[Transform] = []
    while not inner.eof():
        transform, more = _pull_transform(inner)
        transforms.append(transform)
        # RFC 7296 §3.3.2: Last Substruc must agree with the Proposal Length
        if more == inner.eof():
            raise InvalidSyntax(
                f"proposal {number}: transform {len(transforms)} has Last Substruc "
                f"{'3 (more)' if more else '0 (last)'} but the proposal "
                f"{'ends' if more else 'goes on'}"
            )
    # RFC 7296 §3.3.1: "Num Transforms - Specifies the number of transforms in this proposal"
    if len(transforms) != num_transforms:
        raise InvalidSyntax(
            f"proposal {number}: Num Transforms {num_transforms} but {len(transforms)} "
            "transforms present"
        )
    return Proposal(number, protocol_id, spi, tuple(transforms)), (
        last_substructure == MORE_PROPOSALS
    )


def _push_proposal(buf: Buffer, proposal: Proposal, last: bool) -> None:
    if proposal.number == 0:
        raise ValueError("proposals are numbered from 1 (RFC 7296 §3.3.1)")
    _fail_if(_proposal_spi_problem(proposal.protocol_id, len(proposal.spi)))
    start = buf.tell()
    # Proposal Length is patched below, once the transforms are written
    buf.push_struct(
        _PROPOSAL_HEADER,
        LAST_SUBSTRUCTURE if last else MORE_PROPOSALS,
        0,
        proposal.number,
        proposal.protocol_id,
        len(proposal.spi),
        len(proposal.transforms),
    )
    buf.push_bytes(proposal.spi)
    buf.push_bytes(_transforms_bytes(proposal.transforms))
    _patch_length(buf, start + 2, start, "proposal")


# What a tuple of transforms, or of traffic selectors, writes: a responder answers every
# peer with the same chosen transforms and narrowed selectors (the same objects, from
# proposals.select_ike/esp_transform_ids and ike_sa's narrowing), so they are written once.
_written: IdentityMemo[bytes] = IdentityMemo()


def _transforms_bytes(transforms: tuple[Transform, ...]) -> bytes:
    def write() -> bytes:
        buf = Buffer(capacity=64)
        last_index = len(transforms) - 1
        for index, transform in enumerate(transforms):
            _push_transform(buf, transform, last=index == last_index)
        return buf.data

    return _written.get_or((transforms,), write)


def pull_sa_payload(buf: Buffer) -> SaPayload:
    # RFC 7296 §3.3: "An SA payload consists of one or more proposals."
    if buf.eof():
        raise InvalidSyntax("SA payload without proposals")
    proposals: list[Proposal] = []
    while not buf.eof():
        proposal, more = _pull_proposal(buf)
        proposals.append(proposal)
        # RFC 7296 §3.3.1: Last Substruc must agree with the SA payload's length
        if more == buf.eof():
            raise InvalidSyntax(
                f"proposal {proposal.number} has Last Substruc "
                f"{'2 (more)' if more else '0 (last)'} but the SA payload "
                f"{'ends' if more else 'goes on'}"
            )
    return SaPayload(tuple(proposals))


def push_sa_payload(buf: Buffer, payload: SaPayload) -> None:
    if not payload.proposals:
        raise ValueError("an SA payload needs at least one proposal (RFC 7296 §3.3)")
    last_index = len(payload.proposals) - 1
    for index, proposal in enumerate(payload.proposals):
        _push_proposal(buf, proposal, last=index == last_index)


# -- KE payload (RFC 7296 §3.4) -------------------------------------------------------------


@dataclass(frozen=True)
class KePayload:
    """Key Exchange payload (RFC 7296 §3.4): the group and the public value."""

    payload_type: ClassVar[PayloadType] = PayloadType.KE
    group: DhGroup | int
    data: bytes


def pull_ke_payload(buf: Buffer) -> KePayload:
    (group,) = buf.pull_struct(_KE_HEADER)
    return KePayload(_DH_GROUPS.get(group, group), _pull_rest(buf))


def push_ke_payload(buf: Buffer, payload: KePayload) -> None:
    buf.push_struct(_KE_HEADER, payload.group)
    buf.push_bytes(payload.data)


# -- ID payloads (RFC 7296 §3.5) ------------------------------------------------------------


@dataclass(frozen=True)
class IdiPayload:
    """Identification - Initiator (RFC 7296 §3.5)."""

    payload_type: ClassVar[PayloadType] = PayloadType.IDI
    id_type: IdType | int
    data: bytes


@dataclass(frozen=True)
class IdrPayload:
    """Identification - Responder (RFC 7296 §3.5)."""

    payload_type: ClassVar[PayloadType] = PayloadType.IDR
    id_type: IdType | int
    data: bytes


def _pull_identification(buf: Buffer) -> tuple[IdType | int, bytes]:
    (id_type,) = buf.pull_struct(_TYPE_RESERVED_3)
    return _ID_TYPES.get(id_type, id_type), _pull_rest(buf)


def _push_identification(buf: Buffer, id_type: int, data: bytes) -> None:
    buf.push_struct(_TYPE_RESERVED_3, id_type)
    buf.push_bytes(data)


def pull_idi_payload(buf: Buffer) -> IdiPayload:
    return IdiPayload(*_pull_identification(buf))


def push_idi_payload(buf: Buffer, payload: IdiPayload) -> None:
    _push_identification(buf, payload.id_type, payload.data)


def pull_idr_payload(buf: Buffer) -> IdrPayload:
    return IdrPayload(*_pull_identification(buf))


def push_idr_payload(buf: Buffer, payload: IdrPayload) -> None:
    _push_identification(buf, payload.id_type, payload.data)


# -- CERT and CERTREQ payloads (RFC 7296 §3.6, §3.7) ------------------------------------------


@dataclass(frozen=True)
class CertPayload:
    """Certificate payload (RFC 7296 §3.6)."""

    payload_type: ClassVar[PayloadType] = PayloadType.CERT
    encoding: CertEncoding | int
    data: bytes


@dataclass(frozen=True)
class CertReqPayload:
    """Certificate Request payload (RFC 7296 §3.7).

    For X.509 encodings, ``certification_authority`` is a concatenation of 20-octet SHA-1
    hashes of trusted CAs' public keys; kept as received.
    """

    payload_type: ClassVar[PayloadType] = PayloadType.CERTREQ
    encoding: CertEncoding | int
    certification_authority: bytes


def pull_cert_payload(buf: Buffer) -> CertPayload:
    encoding = buf.pull_uint8()
    return CertPayload(_CERT_ENCODINGS.get(encoding, encoding), _pull_rest(buf))


def push_cert_payload(buf: Buffer, payload: CertPayload) -> None:
    buf.push_uint8(payload.encoding)
    buf.push_bytes(payload.data)


def pull_certreq_payload(buf: Buffer) -> CertReqPayload:
    encoding = buf.pull_uint8()
    return CertReqPayload(_CERT_ENCODINGS.get(encoding, encoding), _pull_rest(buf))


def push_certreq_payload(buf: Buffer, payload: CertReqPayload) -> None:
    buf.push_uint8(payload.encoding)
    buf.push_bytes(payload.certification_authority)


# -- AUTH payload (RFC 7296 §3.8) -----------------------------------------------------------


@dataclass(frozen=True)
class AuthPayload:
    """Authentication payload (RFC 7296 §3.8)."""

    payload_type: ClassVar[PayloadType] = PayloadType.AUTH
    method: AuthMethod | int
    data: bytes


def pull_auth_payload(buf: Buffer) -> AuthPayload:
    (method,) = buf.pull_struct(_TYPE_RESERVED_3)
    return AuthPayload(_AUTH_METHODS.get(method, method), _pull_rest(buf))


def push_auth_payload(buf: Buffer, payload: AuthPayload) -> None:
    buf.push_struct(_TYPE_RESERVED_3, payload.method)
    buf.push_bytes(payload.data)


# -- Nonce payload (RFC 7296 §3.9) ----------------------------------------------------------


@dataclass(frozen=True)
class NoncePayload:
    """Nonce payload, Ni or Nr (RFC 7296 §3.9)."""

    payload_type: ClassVar[PayloadType] = PayloadType.NONCE
    nonce: bytes


def _nonce_problem(length: int) -> str | None:
    # RFC 7296 §3.9: "between 16 and 256 octets, inclusive"
    if not MIN_NONCE_LENGTH <= length <= MAX_NONCE_LENGTH:
        return f"nonce of {length} bytes, RFC 7296 §3.9 requires 16..256"
    return None


def pull_nonce_payload(buf: Buffer) -> NoncePayload:
    nonce = _pull_rest(buf)
    _raise_if(_nonce_problem(len(nonce)))
    return NoncePayload(nonce)


def push_nonce_payload(buf: Buffer, payload: NoncePayload) -> None:
    _fail_if(_nonce_problem(len(payload.nonce)))
    buf.push_bytes(payload.nonce)


# -- Notify payload (RFC 7296 §3.10) --------------------------------------------------------


@dataclass(frozen=True)
class NotifyPayload:
    """Notify payload (RFC 7296 §3.10).

    ``protocol_id`` and ``spi`` name the SA the notification concerns; with no SPI,
    RFC 7296 §3.10 says the Protocol ID "MUST be sent as zero and MUST be ignored on
    receipt" (it is kept as received, so that a message re-serializes unchanged).
    """

    payload_type: ClassVar[PayloadType] = PayloadType.N
    notify_type: NotifyType | int
    data: bytes = b""
    protocol_id: ProtocolId | int = 0
    spi: bytes = b""


def pull_notify_payload(buf: Buffer) -> NotifyPayload:
    protocol_id, spi_size, notify_type = buf.pull_struct(_NOTIFY_HEADER)
    protocol_id = _PROTOCOL_IDS.get(protocol_id, protocol_id)
    notify_type = _NOTIFY_TYPES.get(notify_type, notify_type)
    if spi_size > buf.remaining():
        raise InvalidSyntax(
            f"notify {notify_type}: SPI Size {spi_size} but {buf.remaining()} bytes left"
        )
    spi = buf.pull_bytes(spi_size)
    return NotifyPayload(notify_type, _pull_rest(buf), protocol_id, spi)


def push_notify_payload(buf: Buffer, payload: NotifyPayload) -> None:
    buf.push_struct(_NOTIFY_HEADER, payload.protocol_id, len(payload.spi), payload.notify_type)
    buf.push_bytes(payload.spi)
    buf.push_bytes(payload.data)


# -- Delete payload (RFC 7296 §3.11) --------------------------------------------------------


@dataclass(frozen=True)
class DeletePayload:
    """Delete payload (RFC 7296 §3.11): no SPIs for the IKE SA, 4-octet SPIs for ESP/AH."""

    payload_type: ClassVar[PayloadType] = PayloadType.D
    protocol_id: ProtocolId
    spis: tuple[int, ...] = ()


def _delete_problem(protocol_id: int, spi_size: int, count: int) -> str | None:
    # RFC 7296 §3.11: Protocol ID "Must be 1 for an IKE SA, 2 for AH, or 3 for ESP"; SPI Size
    # "MUST be zero for IKE (SPI is in message header) or four for AH and ESP"; the IKE SA is
    # deleted with "a protocol ID of 1 (IKE) but no SPIs"
    if protocol_id == ProtocolId.IKE:
        if spi_size != 0 or count != 0:
            return f"Delete for the IKE SA with SPI size {spi_size} and {count} SPIs"
    elif protocol_id in (ProtocolId.ESP, ProtocolId.AH):
        if spi_size != CHILD_SA_SPI_SIZE:
            return f"Delete for protocol {protocol_id} with SPI size {spi_size}, expected 4"
    else:
        return f"Delete for protocol {protocol_id}, expected IKE (1), AH (2) or ESP (3)"
    return None


def pull_delete_payload(buf: Buffer) -> DeletePayload:
    raw_protocol, spi_size, count = buf.pull_struct(_DELETE_HEADER)
    _raise_if(_delete_problem(raw_protocol, spi_size, count))
    # RFC 7296 §3.11: the SPIs fill the rest of the payload, "SPI Size * Num of SPIs" octets
    if spi_size * count != buf.remaining():
        raise InvalidSyntax(
            f"Delete with {count} SPIs of {spi_size} bytes but {buf.remaining()} bytes follow"
        )
    spis = tuple(buf.pull_uint32() for _ in range(count))
    return DeletePayload(ProtocolId(raw_protocol), spis)


def push_delete_payload(buf: Buffer, payload: DeletePayload) -> None:
    spi_size = 0 if payload.protocol_id == ProtocolId.IKE else CHILD_SA_SPI_SIZE
    _fail_if(_delete_problem(payload.protocol_id, spi_size, len(payload.spis)))
    buf.push_struct(_DELETE_HEADER, payload.protocol_id, spi_size, len(payload.spis))
    for spi in payload.spis:
        buf.push_uint32(spi)


# -- Vendor ID payload (RFC 7296 §3.12) -----------------------------------------------------


@dataclass(frozen=True)
class VendorIdPayload:
    """Vendor ID payload (RFC 7296 §3.12)."""

    payload_type: ClassVar[PayloadType] = PayloadType.V
    vendor_id: bytes


def pull_vendor_id_payload(buf: Buffer) -> VendorIdPayload:
    return VendorIdPayload(_pull_rest(buf))


def push_vendor_id_payload(buf: Buffer, payload: VendorIdPayload) -> None:
    buf.push_bytes(payload.vendor_id)


# -- TS payloads (RFC 7296 §3.13) -----------------------------------------------------------


@dataclass(frozen=True)
class TrafficSelector:
    """An address-range traffic selector (RFC 7296 §3.13.1); the type follows the family.

    Ports are not checked for order: start > end is how RFC 7296 §3.13.1 says OPAQUE.
    """

    ip_protocol: int  # 0 = any
    start_port: int
    end_port: int
    start_address: IPv4Address | IPv6Address
    end_address: IPv4Address | IPv6Address

    @property
    def ts_type(self) -> TsType:
        if self.start_address.version == 4:
            return TsType.TS_IPV4_ADDR_RANGE
        return TsType.TS_IPV6_ADDR_RANGE


@dataclass(frozen=True)
class UnknownTrafficSelector:
    """A selector of a type this module does not parse, kept whole as received.

    ``raw`` holds the complete selector (TS Type, one octet, Selector Length, the rest); the
    IKE layer answers such a TS with TS_UNACCEPTABLE rather than failing the message.
    """

    raw: bytes

    @property
    def ts_type(self) -> int:
        return self.raw[0]


Selector: TypeAlias = TrafficSelector | UnknownTrafficSelector


@dataclass(frozen=True)
class TsiPayload:
    """Traffic Selector - Initiator (RFC 7296 §3.13)."""

    payload_type: ClassVar[PayloadType] = PayloadType.TSI
    selectors: tuple[Selector, ...]


@dataclass(frozen=True)
class TsrPayload:
    """Traffic Selector - Responder (RFC 7296 §3.13)."""

    payload_type: ClassVar[PayloadType] = PayloadType.TSR
    selectors: tuple[Selector, ...]


_TS_LENGTHS: dict[int, int] = {
    TsType.TS_IPV4_ADDR_RANGE: TS_IPV4_LENGTH,
    TsType.TS_IPV6_ADDR_RANGE: TS_IPV6_LENGTH,
}


# Selectors repeat (every Child SA of a connection offers the same ones): their addresses are
# built once per distinct value, not per message (ip_address objects are immutable).
@lru_cache(maxsize=1024)
def _ipv4_address(packed: bytes) -> IPv4Address:
    return IPv4Address(packed)


@lru_cache(maxsize=1024)
def _ipv6_address(packed: bytes) -> IPv6Address:
    return IPv6Address(packed)


def _pull_traffic_selector(buf: Buffer) -> Selector:
    start = buf.tell()
    ts_type, ip_protocol, length = buf.pull_struct(_TS_HEADER)
    expected = _TS_LENGTHS.get(ts_type)
    if expected is None:
        if length < TS_HEADER_LENGTH or length - TS_HEADER_LENGTH > buf.remaining():
            raise InvalidSyntax(
                f"traffic selector of type {ts_type}: Selector Length {length} invalid "
                f"({buf.remaining() + TS_HEADER_LENGTH} bytes left)"
            )
        buf.pull_bytes(length - TS_HEADER_LENGTH)
        return UnknownTrafficSelector(buf.data_slice(start, start + length))
    # RFC 7296 §3.13.1: 16 octets for TS_IPV4_ADDR_RANGE, 40 for TS_IPV6_ADDR_RANGE
    if length != expected:
        raise InvalidSyntax(
            f"{TsType(ts_type).name}: Selector Length {length}, expected {expected}"
        )
    start_port, end_port = buf.pull_struct(_TS_PORTS)
    address_size = (expected - TS_HEADER_LENGTH - _TS_PORTS.size) // 2
    address: Callable[[bytes], IPv4Address] | Callable[[bytes], IPv6Address] = (
        _ipv4_address if ts_type == TsType.TS_IPV4_ADDR_RANGE else _ipv6_address
    )
    start_address = address(buf.pull_bytes(address_size))
    end_address = address(buf.pull_bytes(address_size))
    return TrafficSelector(ip_protocol, start_port, end_port, start_address, end_address)


def _push_traffic_selector(buf: Buffer, selector: Selector) -> None:
    if isinstance(selector, UnknownTrafficSelector):
        raw = selector.raw
        if len(raw) < TS_HEADER_LENGTH or int.from_bytes(raw[2:4], "big") != len(raw):
            raise ValueError("UnknownTrafficSelector.raw must carry its own Selector Length")
        buf.push_bytes(raw)
        return
    if selector.start_address.version != selector.end_address.version:
        raise ValueError("a traffic selector's addresses must be of one family")
    ts_type = selector.ts_type
    buf.push_struct(
        _TS_HEADER_PORTS,
        ts_type,
        selector.ip_protocol,
        _TS_LENGTHS[ts_type],
        selector.start_port,
        selector.end_port,
    )
    buf.push_bytes(selector.start_address.packed + selector.end_address.packed)


def _pull_traffic_selectors(buf: Buffer) -> tuple[Selector, ...]:
    (count,) = buf.pull_struct(_TS_COUNT)
    selectors: list[Selector] = []
    while not buf.eof():
        selectors.append(_pull_traffic_selector(buf))
    # RFC 7296 §3.13: "Number of TSs - Number of Traffic Selectors being provided"
    if len(selectors) != count:
        raise InvalidSyntax(f"Number of TSs {count} but {len(selectors)} selectors present")
    return tuple(selectors)


def _push_traffic_selectors(buf: Buffer, selectors: tuple[Selector, ...]) -> None:
    def write() -> bytes:
        if len(selectors) > MAX_TRAFFIC_SELECTORS:
            raise ValueError(f"{len(selectors)} traffic selectors, at most 255 fit")
        body = Buffer(capacity=64)
        body.push_struct(_TS_COUNT, len(selectors))
        for selector in selectors:
            _push_traffic_selector(body, selector)
        return body.data

    buf.push_bytes(_written.get_or((selectors,), write, PayloadType.TSI))


def pull_tsi_payload(buf: Buffer) -> TsiPayload:
    return TsiPayload(_pull_traffic_selectors(buf))


def push_tsi_payload(buf: Buffer, payload: TsiPayload) -> None:
    _push_traffic_selectors(buf, payload.selectors)


def pull_tsr_payload(buf: Buffer) -> TsrPayload:
    return TsrPayload(_pull_traffic_selectors(buf))


def push_tsr_payload(buf: Buffer, payload: TsrPayload) -> None:
    _push_traffic_selectors(buf, payload.selectors)


# -- SK and SKF payloads (RFC 7296 §3.14, RFC 7383 §2.5) -------------------------------------


@dataclass(frozen=True)
class EncryptedPayload:
    """Encrypted and Authenticated payload, SK (RFC 7296 §3.14), still encrypted.

    ``data`` is IV || ciphertext || ICV as received; ``first_payload`` is the generic
    header's Next Payload, which for SK names the first payload *inside* it. Decrypting is
    the crypto layer's job; it parses the plaintext with ``parse_payload_chain``.
    """

    payload_type: ClassVar[PayloadType] = PayloadType.SK
    first_payload: PayloadType | int
    data: bytes


@dataclass(frozen=True)
class EncryptedFragmentPayload:
    """Encrypted and Authenticated Fragment, SKF (RFC 7383 §2.5)."""

    payload_type: ClassVar[PayloadType] = PayloadType.SKF
    fragment_number: int
    total_fragments: int
    first_payload: PayloadType | int  # NONE in every fragment but the first
    data: bytes


def pull_encrypted_payload(buf: Buffer, first_payload: int) -> EncryptedPayload:
    return EncryptedPayload(_PAYLOAD_TYPES.get(first_payload, first_payload), _pull_rest(buf))


def push_encrypted_payload(buf: Buffer, payload: EncryptedPayload) -> None:
    buf.push_bytes(payload.data)


def _fragment_problem(number: int, total: int, first_payload: int) -> str | None:
    # RFC 7383 §2.5: Fragment Number "MUST NOT be zero" and "MUST be less than or equal to"
    # Total Fragments; Next Payload "MUST be set to zero" in all but the first fragment
    if number == 0 or number > total:
        return f"fragment number {number} of {total}"
    if number > 1 and first_payload != PayloadType.NONE:
        return f"fragment {number} of {total} has Next Payload {first_payload}, expected 0"
    return None


def pull_encrypted_fragment_payload(buf: Buffer, first_payload: int) -> EncryptedFragmentPayload:
    number, total = buf.pull_struct(_FRAGMENT_HEADER)
    _raise_if(_fragment_problem(number, total, first_payload))
    return EncryptedFragmentPayload(
        number, total, _PAYLOAD_TYPES.get(first_payload, first_payload), _pull_rest(buf)
    )


def push_encrypted_fragment_payload(buf: Buffer, payload: EncryptedFragmentPayload) -> None:
    _fail_if(
        _fragment_problem(payload.fragment_number, payload.total_fragments, payload.first_payload)
    )
    buf.push_struct(_FRAGMENT_HEADER, payload.fragment_number, payload.total_fragments)
    buf.push_bytes(payload.data)


# -- Configuration payload (RFC 7296 §3.15) -------------------------------------------------


@dataclass(frozen=True)
class ConfigurationAttribute:
    """A Configuration Attribute (RFC 7296 §3.15.1); the value is kept as raw bytes."""

    attribute_type: ConfigAttributeType | int
    value: bytes = b""


@dataclass(frozen=True)
class ConfigurationPayload:
    """Configuration payload, CP (RFC 7296 §3.15)."""

    payload_type: ClassVar[PayloadType] = PayloadType.CP
    cfg_type: CfgType | int
    attributes: tuple[ConfigurationAttribute, ...] = ()


def pull_configuration_payload(buf: Buffer) -> ConfigurationPayload:
    (cfg_type,) = buf.pull_struct(_TYPE_RESERVED_3)
    attributes: list[ConfigurationAttribute] = []
    while not buf.eof():
        word, length = buf.pull_struct(_CONFIG_ATTRIBUTE_HEADER)
        # RFC 7296 §3.15.1: the top bit is reserved, "MUST be ignored on receipt"
        attribute_type = word & CONFIG_ATTRIBUTE_TYPE_MASK
        attribute_type = _CONFIG_ATTRIBUTE_TYPES.get(attribute_type, attribute_type)
        if length > buf.remaining():
            raise InvalidSyntax(
                f"configuration attribute {attribute_type}: length {length} runs past the "
                f"CP payload ({buf.remaining()} bytes left)"
            )
        attributes.append(ConfigurationAttribute(attribute_type, buf.pull_bytes(length)))
    return ConfigurationPayload(_CFG_TYPES.get(cfg_type, cfg_type), tuple(attributes))


def push_configuration_payload(buf: Buffer, payload: ConfigurationPayload) -> None:
    buf.push_struct(_TYPE_RESERVED_3, payload.cfg_type)
    for attribute in payload.attributes:
        if not 0 <= attribute.attribute_type <= CONFIG_ATTRIBUTE_TYPE_MASK:
            raise ValueError(f"configuration attribute type {attribute.attribute_type} > 15 bits")
        buf.push_struct(_CONFIG_ATTRIBUTE_HEADER, attribute.attribute_type, len(attribute.value))
        buf.push_bytes(attribute.value)


# -- Unrecognized payloads (RFC 7296 §3.2) --------------------------------------------------


@dataclass(frozen=True)
class UnknownPayload:
    """A payload of a type this module does not parse, skipped but kept (RFC 7296 §3.2)."""

    payload_type: int
    data: bytes


Payload: TypeAlias = (
    SaPayload
    | KePayload
    | IdiPayload
    | IdrPayload
    | CertPayload
    | CertReqPayload
    | AuthPayload
    | NoncePayload
    | NotifyPayload
    | DeletePayload
    | VendorIdPayload
    | TsiPayload
    | TsrPayload
    | EncryptedPayload
    | EncryptedFragmentPayload
    | ConfigurationPayload
    | UnknownPayload
)

# Body parsers of the payloads whose body alone determines them; SK and SKF also need the
# generic header's Next Payload and are handled by the chain (message.py).
BODY_PULLERS: dict[int, Callable[[Buffer], Payload]] = {
    PayloadType.SA: pull_sa_payload,
    PayloadType.KE: pull_ke_payload,
    PayloadType.IDI: pull_idi_payload,
    PayloadType.IDR: pull_idr_payload,
    PayloadType.CERT: pull_cert_payload,
    PayloadType.CERTREQ: pull_certreq_payload,
    PayloadType.AUTH: pull_auth_payload,
    PayloadType.NONCE: pull_nonce_payload,
    PayloadType.N: pull_notify_payload,
    PayloadType.D: pull_delete_payload,
    PayloadType.V: pull_vendor_id_payload,
    PayloadType.TSI: pull_tsi_payload,
    PayloadType.TSR: pull_tsr_payload,
    PayloadType.CP: pull_configuration_payload,
}


def _push_unknown_payload(buf: Buffer, payload: UnknownPayload) -> None:
    buf.push_bytes(payload.data)


# Body serializers by payload class, the counterpart of BODY_PULLERS (a dict lookup: the
# payloads of a message are written one by one)
_BODY_PUSHERS: dict[type, Callable[[Buffer, Any], None]] = {
    SaPayload: push_sa_payload,
    KePayload: push_ke_payload,
    IdiPayload: push_idi_payload,
    IdrPayload: push_idr_payload,
    CertPayload: push_cert_payload,
    CertReqPayload: push_certreq_payload,
    AuthPayload: push_auth_payload,
    NoncePayload: push_nonce_payload,
    NotifyPayload: push_notify_payload,
    DeletePayload: push_delete_payload,
    VendorIdPayload: push_vendor_id_payload,
    TsiPayload: push_tsi_payload,
    TsrPayload: push_tsr_payload,
    EncryptedPayload: push_encrypted_payload,
    EncryptedFragmentPayload: push_encrypted_fragment_payload,
    ConfigurationPayload: push_configuration_payload,
    UnknownPayload: _push_unknown_payload,
}
assert set(_BODY_PUSHERS) == set(get_args(Payload))


def push_payload_body(buf: Buffer, payload: Payload) -> None:
    """Write the body of any payload (everything after its generic header)."""
    pusher = _BODY_PUSHERS.get(type(payload))
    if pusher is None:
        raise TypeError(f"not a payload: {payload!r}")
    pusher(buf, payload)
