"""IKEv2 wire format (controller/ike): known bytes, round trips, rejections, fuzz.

The fuzz invariant, written down: for any byte string ``b``, ``parse_message(b)`` either
returns a ``Message`` or raises ``IkeProtocolError``; nothing else escapes. And whatever it
accepts re-serializes to bytes that parse to the same ``Message``.

Expected bytes here are written by hand from the RFC 7296 §3 figures, not produced by the
serializer, so a shared misreading of a layout cannot pass both ways.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller import ike
from controller.ike import (
    AuthMethod,
    AuthPayload,
    Buffer,
    BufferReadError,
    CertEncoding,
    CertPayload,
    CertReqPayload,
    CfgType,
    ConfigurationAttribute,
    ConfigurationPayload,
    DeletePayload,
    DhGroup,
    EncrId,
    EncryptedFragmentPayload,
    EncryptedPayload,
    ExchangeType,
    HeaderFlag,
    IdiPayload,
    IdrPayload,
    IdType,
    IkeHeader,
    IkeProtocolError,
    InvalidKePayload,
    InvalidMajorVersion,
    InvalidSyntax,
    KePayload,
    Message,
    NoncePayload,
    NotifyPayload,
    NotifyType,
    Payload,
    PayloadType,
    PrfId,
    Proposal,
    ProtocolId,
    SaPayload,
    TrafficSelector,
    Transform,
    TransformAttribute,
    TransformAttributeType,
    TransformType,
    TsiPayload,
    TsrPayload,
    UnknownPayload,
    UnknownTrafficSelector,
    UnsupportedCriticalPayload,
    VendorIdPayload,
    parse_message,
    parse_payload_chain,
    pull_payload_chain,
    serialize_message,
    serialize_payload_body,
    serialize_payload_chain,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------
# Known bytes: an IKE_SA_INIT request as strongSwan sends it for
# `proposals = aes128gcm16-prfsha256-x25519`, laid out by hand from RFC 7296 §3.1-§3.10
# (and RFC 7383 §2.3.1, RFC 7427 §4 for the last two notifies). 222 bytes.
# ---------------------------------------------------------------------------------------------

SPI_I = bytes.fromhex("2e5f1a7c394d0b61")
KE_DATA = bytes.fromhex(  # an X25519 public value: 32 octets (RFC 8031 §2)
    "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
)
NONCE_I = bytes.fromhex("3f1e5c2a9b7d4e60 11223344556677889900aabbccddeeff 0f1e2d3c4b5a6978")
NATD_SRC = bytes.fromhex("5b0c9e2f7a3d61e84c90b2d7f15a6e0c3b9d2e71")  # SHA-1 size: 20 octets
NATD_DST = bytes.fromhex("d4a1c7e0f25b938a6e0d1c4b7f29e35a80c6b1d2")

STRONGSWAN_SA_INIT = bytes.fromhex(
    # -- IKE header, RFC 7296 §3.1 (28 octets) --
    "2e5f1a7c394d0b61"  # IKE SA Initiator's SPI
    "0000000000000000"  # IKE SA Responder's SPI: zero in the first message
    "21"  # Next Payload: SA (33)
    "20"  # MjVer 2 | MnVer 0
    "22"  # Exchange Type: IKE_SA_INIT (34)
    "08"  # Flags: I (initiator)
    "00000000"  # Message ID 0
    "000000de"  # Length: 222
    # -- SA payload, RFC 7296 §3.3 (4 + 36 = 40 octets) --
    "22 00 0028"  # generic header: Next KE (34), C=0, length 40
    "00 00 0024"  # Proposal: Last Substruc 0 (last), RESERVED, Proposal Length 36
    "01 01 00 03"  # Proposal Num 1, Protocol ID IKE, SPI Size 0, Num Transforms 3
    "03 00 000c"  # Transform: Last Substruc 3 (more), RESERVED, Transform Length 12
    "01 00 0014"  # Transform Type ENCR (1), RESERVED, ID ENCR_AES_GCM_16 (20)
    "800e 0080"  # Attribute: AF=1 (TV) | Key Length (14), value 128
    "03 00 0008"  # Transform: more, length 8
    "02 00 0005"  # PRF (2), PRF_HMAC_SHA2_256 (5)
    "00 00 0008"  # Transform: Last Substruc 0 (last), length 8
    "04 00 001f"  # KE (4), Curve25519 (31)
    # -- KE payload, RFC 7296 §3.4 (4 + 4 + 32 = 40 octets) --
    "28 00 0028"  # Next Nonce (40), length 40
    "001f 0000"  # DH Group Num 31, RESERVED
    "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    # -- Nonce payload, RFC 7296 §3.9 (4 + 32 = 36 octets) --
    "29 00 0024"  # Next N (41), length 36
    "3f1e5c2a9b7d4e6011223344556677889900aabbccddeeff0f1e2d3c4b5a6978"
    # -- Notify NAT_DETECTION_SOURCE_IP, RFC 7296 §3.10, §2.23 (4 + 4 + 20 = 28 octets) --
    "29 00 001c"  # Next N, length 28
    "00 00 4004"  # Protocol ID 0, SPI Size 0, type 16388
    "5b0c9e2f7a3d61e84c90b2d7f15a6e0c3b9d2e71"
    # -- Notify NAT_DETECTION_DESTINATION_IP (28 octets) --
    "29 00 001c"
    "00 00 4005"  # type 16389
    "d4a1c7e0f25b938a6e0d1c4b7f29e35a80c6b1d2"
    # -- Notify IKEV2_FRAGMENTATION_SUPPORTED, RFC 7383 §2.3.1 (8 octets, no data) --
    "29 00 0008"
    "00 00 402e"  # type 16430
    # -- Notify SIGNATURE_HASH_ALGORITHMS, RFC 7427 §4 (8 + 6 = 14 octets) --
    "00 00 000e"  # Next Payload 0 (last), length 14
    "00 00 402f"  # type 16431
    "0002 0003 0004"  # SHA2-256, SHA2-384, SHA2-512
)

STRONGSWAN_SA_INIT_MESSAGE = Message(
    IkeHeader(
        spi_i=SPI_I,
        spi_r=bytes(8),
        next_payload=PayloadType.SA,
        exchange_type=ExchangeType.IKE_SA_INIT,
        flags=HeaderFlag.INITIATOR,
        message_id=0,
        length=222,
    ),
    (
        SaPayload(
            (
                Proposal(
                    number=1,
                    protocol_id=ProtocolId.IKE,
                    spi=b"",
                    transforms=(
                        Transform(
                            TransformType.ENCR,
                            EncrId.ENCR_AES_GCM_16,
                            (TransformAttribute(TransformAttributeType.KEY_LENGTH, 128),),
                        ),
                        Transform(TransformType.PRF, PrfId.PRF_HMAC_SHA2_256),
                        Transform(TransformType.KE, DhGroup.CURVE25519),
                    ),
                ),
            )
        ),
        KePayload(DhGroup.CURVE25519, KE_DATA),
        NoncePayload(NONCE_I),
        NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, NATD_SRC),
        NotifyPayload(NotifyType.NAT_DETECTION_DESTINATION_IP, NATD_DST),
        NotifyPayload(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED),
        NotifyPayload(NotifyType.SIGNATURE_HASH_ALGORITHMS, bytes.fromhex("000200030004")),
    ),
)

# Offsets into STRONGSWAN_SA_INIT, from the layout above.
SA_AT, PROPOSAL_AT, T1_AT, T2_AT, T3_AT = 28, 32, 40, 52, 60
KE_AT, NONCE_AT, N1_AT, N2_AT, N3_AT, N4_AT = 68, 108, 144, 172, 200, 208


def test_known_bytes_layout_is_consistent() -> None:
    assert len(STRONGSWAN_SA_INIT) == 222
    assert len(STRONGSWAN_SA_INIT) == N4_AT + 14


def test_parse_strongswan_sa_init() -> None:
    message = parse_message(STRONGSWAN_SA_INIT)
    assert message == STRONGSWAN_SA_INIT_MESSAGE
    # known code points come back as enum members, not bare ints
    assert isinstance(message.header.exchange_type, ExchangeType)
    sa = message.find(SaPayload)
    assert sa is not None
    encr = sa.proposals[0].transforms[0]
    assert isinstance(encr.transform_id, EncrId) and encr.key_length == 128
    assert message.header.is_initiator and not message.header.is_response
    assert message.notify(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED) is not None
    assert len(message.find_all(NotifyPayload)) == 4


def counted_sa_parses(monkeypatch: pytest.MonkeyPatch
                      ) -> tuple[list[int], Callable[[Buffer], Payload]]:
    """An empty parser memo, and the SA payload puller counting its calls (one per parse
    the memo did not spare): the list of calls, and the counting puller."""
    from controller.ike import message as wire

    monkeypatch.setattr(wire, "_memo", {})
    calls: list[int] = []
    pull = wire.BODY_PULLERS[PayloadType.SA]

    def counted(buf: Buffer) -> Payload:
        calls.append(1)
        return pull(buf)

    monkeypatch.setitem(wire.BODY_PULLERS, PayloadType.SA, counted)
    return calls, counted


def test_a_peers_sa_payload_is_parsed_once_for_every_exchange_alike(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """controller/ike/message.py ``_pull_memo``: strongSwan's IKE_SA_INIT twice gives the
    same message; the second time its SA payload comes from the memo (the SA puller is not
    called again), not from a second parse. A body that fails to parse is never kept."""
    from controller.ike import message as wire

    calls, _ = counted_sa_parses(monkeypatch)
    first, second = parse_message(STRONGSWAN_SA_INIT), parse_message(STRONGSWAN_SA_INIT)
    assert first == second == STRONGSWAN_SA_INIT_MESSAGE and len(calls) == 1
    # A different SA body (the proposal's number changed) is parsed, and kept beside it.
    proposal = 28 + 4  # the SA payload comes first, after the IKE header and its own
    other = bytearray(STRONGSWAN_SA_INIT)
    other[proposal + 4] ^= 0x02  # the first proposal's Proposal Num
    assert parse_message(bytes(other)).find(SaPayload) != first.find(SaPayload)
    assert len(calls) == 2 and len(wire._memo) == 2
    # An SA body that does not parse: refused each time, never remembered.
    bad = bytearray(STRONGSWAN_SA_INIT)
    bad[proposal + 6] = 3  # the first proposal's SPI Size: 3, for IKE (RFC 7296 §3.3.1)
    for _ in range(2):
        with pytest.raises(IkeProtocolError):
            parse_message(bytes(bad))
    assert len(calls) == 4 and len(wire._memo) == 2
    # Bounded: past _MEMO_MAX bodies it starts again.
    monkeypatch.setattr(wire, "_MEMO_MAX", 2)
    other[proposal + 4] ^= 0x04
    parse_message(bytes(other))
    assert len(calls) == 5 and len(wire._memo) == 1


def test_child_sa_offers_that_differ_by_their_spi_only_are_parsed_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An SA payload is remembered by its shape, the body without the proposals' SPIs:
    the next Child SA offer (a new SPI) is the remembered proposals with its own SPIs,
    equal to what a parse from scratch gives; an offer without SPIs (IKE_SA_INIT) is the
    remembered object itself."""
    from controller.ike import message as wire
    from controller.ike.payloads import push_sa_payload
    from controller.ike.proposals import esp_transform_ids
    from workers.algorithms import parse_esp

    calls, counted = counted_sa_parses(monkeypatch)

    def offer(*spis: bytes) -> SaPayload:
        esp = parse_esp("aes128gcm16")
        transforms = esp_transform_ids(esp, False)
        return SaPayload(tuple(Proposal(k + 1, ProtocolId.ESP, spi, transforms)
                               for k, spi in enumerate(spis)))

    def body(sa: SaPayload) -> Buffer:
        buf = Buffer(capacity=64)
        push_sa_payload(buf, sa)
        return Buffer(data=buf.data)

    first = offer(b"\xc1\x00\x00\x01", b"\xc1\x00\x00\x02")
    second = offer(b"\xc2\x00\x00\x01", b"\xc2\x00\x00\x02")
    got1 = wire._pull_memo(PayloadType.SA, counted, body(first))
    got2 = wire._pull_memo(PayloadType.SA, counted, body(second))
    assert (got1, got2) == (first, second) and len(calls) == 1
    assert isinstance(got2, SaPayload) and isinstance(got1, SaPayload)
    assert got2.proposals[1].transforms is got1.proposals[1].transforms
    # The IKE_SA_INIT offer (no SPIs): the same object each time.
    a, b = parse_message(STRONGSWAN_SA_INIT), parse_message(STRONGSWAN_SA_INIT)
    assert a.find(SaPayload) is b.find(SaPayload) and len(calls) == 2
    # A body that is, byte for byte, a remembered shape (the SPIs cut out of an offer seen
    # before) is not that offer: it is parsed, and refused as the parser refuses it.
    shape, _ = wire._sa_shape(body(first).data_slice(0, body(first).capacity)) or (b"", ())
    with pytest.raises(IkeProtocolError):
        wire._pull_memo(PayloadType.SA, counted, Buffer(data=shape))
    assert len(calls) == 3
    # Proposal headers that do not tile the body: no shape, the parser's verdict stands.
    assert wire._sa_shape(b"\x00\x00\x00\x04" + bytes(4)) is None
    assert wire._sa_shape(b"\x00\x00\x00\x0c\x01\x03\x08\x00" + bytes(4)) is None


def test_serialize_strongswan_sa_init() -> None:
    assert serialize_message(STRONGSWAN_SA_INIT_MESSAGE) == STRONGSWAN_SA_INIT
    # Next Payload and Length are computed, whatever the header says
    stale = replace(STRONGSWAN_SA_INIT_MESSAGE.header, next_payload=0, length=0)
    assert serialize_message(replace(STRONGSWAN_SA_INIT_MESSAGE, header=stale)) == (
        STRONGSWAN_SA_INIT
    )


# ---------------------------------------------------------------------------------------------
# Hand-built messages for the rejection tests: payloads given as (type, body) pairs, chained
# and framed here, independently of the serializer.
# ---------------------------------------------------------------------------------------------


def raw_message(
    *payloads: tuple[int, bytes],
    first: int | None = None,
    critical: frozenset[int] = frozenset(),
    version: int = 0x20,
    length_delta: int = 0,
    last_next: int = 0,
) -> bytes:
    body = b""
    for index, (_type, content) in enumerate(payloads):
        following = payloads[index + 1][0] if index + 1 < len(payloads) else last_next
        flags = 0x80 if index in critical else 0
        body += bytes((following, flags)) + (4 + len(content)).to_bytes(2, "big") + content
    first_type = payloads[0][0] if payloads else 0 if first is None else first
    if first is not None:
        first_type = first
    header = (
        SPI_I
        + bytes(8)
        + bytes((first_type, version, ExchangeType.INFORMATIONAL, 0))
        + (1).to_bytes(4, "big")
        + (28 + len(body) + length_delta).to_bytes(4, "big")
    )
    return header + body


def set_bytes(data: bytes, offset: int, value: str) -> bytes:
    patch = bytes.fromhex(value)
    return data[:offset] + patch + data[offset + len(patch) :]


def with_length(data: bytes, length: int) -> bytes:
    return data[:24] + length.to_bytes(4, "big") + data[28:]


def expect_invalid(data: bytes, fragment: str) -> InvalidSyntax:
    with pytest.raises(InvalidSyntax) as caught:
        parse_message(data)
    assert fragment in caught.value.reason, caught.value.reason
    assert caught.value.notify == NotifyType.INVALID_SYNTAX
    return caught.value


NOTIFY_BODY = bytes.fromhex("00004000")  # Protocol 0, SPI Size 0, INITIAL_CONTACT


# ---------------------------------------------------------------------------------------------
# Truncation and trailing garbage
# ---------------------------------------------------------------------------------------------


def test_every_truncation_of_known_message_is_invalid_syntax() -> None:
    for cut in range(len(STRONGSWAN_SA_INIT)):
        with pytest.raises(InvalidSyntax):
            parse_message(STRONGSWAN_SA_INIT[:cut])


def test_every_truncation_with_matching_header_length_is_invalid_syntax() -> None:
    # The header Length agrees with the truncated size, so the payload parsers must notice.
    for cut in range(28, len(STRONGSWAN_SA_INIT)):
        with pytest.raises(InvalidSyntax):
            parse_message(with_length(STRONGSWAN_SA_INIT[:cut], cut))


def test_trailing_garbage_is_a_length_mismatch() -> None:
    for garbage in (b"\x00", b"\xff" * 7, bytes(range(40))):
        expect_invalid(STRONGSWAN_SA_INIT + garbage, "length mismatch")


def test_trailing_garbage_covered_by_header_length() -> None:
    data = STRONGSWAN_SA_INIT + b"\x00\x01\x02"
    expect_invalid(with_length(data, len(data)), "3 bytes after the last payload")


def test_short_header() -> None:
    expect_invalid(STRONGSWAN_SA_INIT[:27], "shorter than the 28-byte IKE header")


# ---------------------------------------------------------------------------------------------
# Wrong lengths, counts and markers in substructures
# ---------------------------------------------------------------------------------------------

SUBSTRUCTURE_CASES = [
    pytest.param(PROPOSAL_AT + 2, "0023", "Transform Length 8 runs past", id="proposal-short"),
    pytest.param(PROPOSAL_AT + 2, "0025", "runs past the SA payload", id="proposal-long"),
    pytest.param(PROPOSAL_AT + 2, "0007", "Proposal Length 7 < 8", id="proposal-tiny"),
    pytest.param(PROPOSAL_AT, "01", "expected 0 or 2", id="proposal-last-substruc-1"),
    pytest.param(PROPOSAL_AT, "02", "2 (more) but the SA payload ends", id="proposal-more"),
    pytest.param(PROPOSAL_AT + 4, "00", "Proposal Num 0", id="proposal-num-0"),
    pytest.param(PROPOSAL_AT + 6, "03", "SPI size 3", id="proposal-spi-size"),
    pytest.param(PROPOSAL_AT + 7, "02", "Num Transforms 2 but 3", id="num-transforms"),
    pytest.param(T1_AT + 2, "0010", "runs past the transform", id="transform-long"),
    pytest.param(T1_AT + 2, "0007", "Transform Length 7 < 8", id="transform-tiny"),
    pytest.param(T1_AT, "00", "0 (last) but the proposal goes on", id="transform-last"),
    pytest.param(T3_AT, "03", "3 (more) but the proposal ends", id="transform-more"),
    pytest.param(T2_AT, "02", "expected 0 or 3", id="transform-last-substruc-2"),
    pytest.param(T3_AT + 2, "0009", "runs past the proposal", id="transform-past-proposal"),
    pytest.param(SA_AT + 2, "0003", "Payload Length 3 < 4", id="payload-tiny"),
    pytest.param(SA_AT + 2, "0029", "SA payload at offset 28", id="sa-payload-long"),
    pytest.param(KE_AT + 2, "0007", "KE payload at offset 68", id="ke-payload-short"),
    pytest.param(NONCE_AT + 2, "0013", "nonce of 15 bytes", id="nonce-short"),
    pytest.param(N1_AT + 5, "15", "SPI Size 21 but 20 bytes left", id="notify-spi-size"),
    pytest.param(N4_AT + 2, "0010", "runs past the end", id="last-payload-long"),
]


@pytest.mark.parametrize(("offset", "value", "fragment"), SUBSTRUCTURE_CASES)
def test_wrong_substructure_fields(offset: int, value: str, fragment: str) -> None:
    expect_invalid(set_bytes(STRONGSWAN_SA_INIT, offset, value), fragment)


def sa_body(attribute: str) -> bytes:
    transform = "0000" + f"{8 + len(attribute) // 2:04x}" + "01000014" + attribute
    proposal_length = 8 + len(transform) // 2
    return bytes.fromhex(f"0000{proposal_length:04x}01010001" + transform)


def test_key_length_must_be_tv() -> None:
    assert parse_message(raw_message((PayloadType.SA, sa_body("800e0080"))))
    expect_invalid(raw_message((PayloadType.SA, sa_body("000e00020080"))), "TLV format")


def test_tlv_attribute_length_past_transform() -> None:
    expect_invalid(raw_message((PayloadType.SA, sa_body("00010005aabb"))), "runs past")


def test_unknown_transform_attributes_are_kept() -> None:
    message = parse_message(raw_message((PayloadType.SA, sa_body("00010002aabb8002ffff"))))
    sa = message.find(SaPayload)
    assert sa is not None
    assert sa.proposals[0].transforms[0].attributes == (
        TransformAttribute(1, b"\xaa\xbb"),
        TransformAttribute(2, 0xFFFF),
    )


def test_empty_sa_payload() -> None:
    expect_invalid(raw_message((PayloadType.SA, b"")), "without proposals")


IPV4_TS = bytes.fromhex("07 06 0010 0000 ffff 0a000000 0a0000ff")

TS_CASES = [
    pytest.param(bytes.fromhex("02000000") + IPV4_TS, "Number of TSs 2 but 1", id="count"),
    pytest.param(
        bytes.fromhex("01000000") + set_bytes(IPV4_TS, 2, "0028"), "expected 16", id="v4-len"
    ),
    pytest.param(bytes.fromhex("01000000") + IPV4_TS[:-1], "need 4 bytes", id="v4-truncated"),
    pytest.param(
        bytes.fromhex("01000000 0a000010 00"), "Selector Length 16 invalid", id="unknown-len"
    ),
]


@pytest.mark.parametrize(("body", "fragment"), TS_CASES)
def test_wrong_traffic_selectors(body: bytes, fragment: str) -> None:
    expect_invalid(raw_message((PayloadType.TSI, body)), fragment)


def test_unknown_traffic_selector_type_is_kept() -> None:
    seclabel = bytes.fromhex("0a 00 0008 73656c66")  # TS_SECLABEL (RFC 9478), 4-octet label
    data = raw_message((PayloadType.TSR, bytes.fromhex("02000000") + seclabel + IPV4_TS))
    ts = parse_message(data).find(TsrPayload)
    assert ts is not None
    assert ts.selectors == (
        UnknownTrafficSelector(seclabel),
        TrafficSelector(6, 0, 0xFFFF, IPv4Address("10.0.0.0"), IPv4Address("10.0.0.255")),
    )
    assert serialize_message(parse_message(data)) == data


DELETE_CASES = [
    pytest.param("01 00 0001", "IKE SA with SPI size 0 and 1 SPIs", id="ike-with-spis"),
    pytest.param("01 08 0000", "IKE SA with SPI size 8", id="ike-spi-size"),
    pytest.param("03 08 0001 0000000000000001", "SPI size 8, expected 4", id="esp-spi-size"),
    pytest.param("03 04 0002 00000001", "2 SPIs of 4 bytes but 4 bytes", id="count"),
    pytest.param("05 04 0000", "expected IKE (1), AH (2) or ESP (3)", id="protocol"),
]


@pytest.mark.parametrize(("body", "fragment"), DELETE_CASES)
def test_wrong_delete(body: str, fragment: str) -> None:
    expect_invalid(raw_message((PayloadType.D, bytes.fromhex(body))), fragment)


def test_nonce_bounds() -> None:
    for size in (16, 256):
        assert parse_message(raw_message((PayloadType.NONCE, bytes(size))))
    for size in (0, 15, 257):
        expect_invalid(raw_message((PayloadType.NONCE, bytes(size))), f"nonce of {size} bytes")
    with pytest.raises(ValueError, match="16..256"):
        serialize_message(replace(STRONGSWAN_SA_INIT_MESSAGE, payloads=(NoncePayload(b"x"),)))


def test_configuration_attribute_past_payload() -> None:
    body = bytes.fromhex("01000000 0001 0004 0a00")
    expect_invalid(raw_message((PayloadType.CP, body)), "runs past the CP payload")


def test_encrypted_payload_must_be_last() -> None:
    data = raw_message((PayloadType.SK, b"\x01" * 24), (PayloadType.N, NOTIFY_BODY))
    expect_invalid(data, "bytes follow it, it must be the last payload")
    with pytest.raises(ValueError, match="last payload"):
        serialize_payload_chain([EncryptedPayload(PayloadType.IDI, b"x"), NoncePayload(bytes(16))])


def test_encrypted_payload_names_first_inner_payload() -> None:
    data = raw_message((PayloadType.N, NOTIFY_BODY), (PayloadType.SK, b"\x01" * 24), last_next=35)
    message = parse_message(data)
    assert message.payloads[-1] == EncryptedPayload(PayloadType.IDI, b"\x01" * 24)
    assert serialize_message(message) == data


@pytest.mark.parametrize(
    ("number", "total", "next_payload", "fragment"),
    [
        (0, 3, 0, "fragment number 0 of 3"),
        (4, 3, 0, "fragment number 4 of 3"),
        (2, 3, 35, "fragment 2 of 3 has Next Payload 35"),
    ],
)
def test_wrong_fragments(number: int, total: int, next_payload: int, fragment: str) -> None:
    body = number.to_bytes(2, "big") + total.to_bytes(2, "big") + b"\x02" * 20
    expect_invalid(raw_message((PayloadType.SKF, body), last_next=next_payload), fragment)


def test_announced_payload_missing() -> None:
    expect_invalid(raw_message(first=PayloadType.N), "announced, but only 0 bytes remain")


# ---------------------------------------------------------------------------------------------
# Critical bit, versions
# ---------------------------------------------------------------------------------------------


def test_unknown_non_critical_payload_is_skipped_and_kept() -> None:
    data = raw_message(
        (PayloadType.N, NOTIFY_BODY), (200, b"extension"), (PayloadType.V, b"espline")
    )
    message = parse_message(data)
    assert message.payloads == (
        NotifyPayload(NotifyType.INITIAL_CONTACT),
        UnknownPayload(200, b"extension"),
        VendorIdPayload(b"espline"),
    )
    assert serialize_message(message) == data


def test_unknown_critical_payload_is_rejected() -> None:
    data = raw_message((PayloadType.N, NOTIFY_BODY), (200, b"extension"), critical=frozenset({1}))
    with pytest.raises(UnsupportedCriticalPayload) as caught:
        parse_message(data)
    assert caught.value.payload_type == 200
    assert caught.value.notify == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD
    assert caught.value.notification_data == b"\xc8"  # RFC 7296 §3.10.1: one-octet type


def test_critical_bit_ignored_on_known_payload() -> None:
    data = raw_message((PayloadType.N, NOTIFY_BODY), critical=frozenset({0}))
    assert parse_message(data).payloads == (NotifyPayload(NotifyType.INITIAL_CONTACT),)


@pytest.mark.parametrize("version", [0x30, 0x10, 0xF0])
def test_other_major_version(version: int) -> None:
    with pytest.raises(InvalidMajorVersion) as caught:
        parse_message(raw_message((PayloadType.N, NOTIFY_BODY), version=version))
    assert caught.value.major_version == version >> 4
    assert caught.value.notify == NotifyType.INVALID_MAJOR_VERSION


def test_minor_version_ignored_and_kept() -> None:
    data = raw_message((PayloadType.N, NOTIFY_BODY), version=0x21)
    message = parse_message(data)
    assert message.header.minor_version == 1
    assert serialize_message(message) == data


def test_reserved_flag_bits_kept() -> None:
    data = set_bytes(STRONGSWAN_SA_INIT, 19, "ff")
    message = parse_message(data)
    assert message.header.is_response and message.header.is_initiator
    assert serialize_message(message) == data


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def test_error_classes_carry_their_notify() -> None:
    classes = [
        obj
        for obj in vars(ike).values()
        if isinstance(obj, type)
        and issubclass(obj, IkeProtocolError)
        and obj is not IkeProtocolError
    ]
    assert len(classes) == 17
    for cls in classes:
        expected = NotifyType[_snake(cls.__name__)]
        make: Any = cls
        if cls is InvalidKePayload:
            error: IkeProtocolError = make(19)
        elif cls in (UnsupportedCriticalPayload, InvalidMajorVersion):
            error = make(3)
        else:
            error = make("why")
        assert error.notify == expected
        assert isinstance(error.reason, str) and error.reason


def test_invalid_ke_payload_data() -> None:
    error = InvalidKePayload(DhGroup.ECP_256)
    assert error.group == 19
    assert error.notification_data == b"\x00\x13"  # RFC 7296 §3.10.1: two octets, big endian


def test_truncation_inside_a_payload_names_it() -> None:
    error = expect_invalid(set_bytes(STRONGSWAN_SA_INIT, KE_AT + 2, "0007"), "truncated")
    assert "KE payload at offset 68" in error.reason


# ---------------------------------------------------------------------------------------------
# Buffer
# ---------------------------------------------------------------------------------------------


def test_buffer_pull_push() -> None:
    buf = Buffer(capacity=4)
    buf.push_uint8(0x01)
    buf.push_uint16(0x0203)
    buf.push_uint32(0x04050607)
    buf.push_uint64(0x08090A0B0C0D0E0F)
    buf.push_bytes(b"\x10")
    assert buf.data == bytes(range(1, 17)) and buf.capacity == 16
    buf.seek(1)
    buf.push_uint16(0xFFFF)  # overwrite in place
    assert buf.data_slice(0, 4) == b"\x01\xff\xff\x04"
    reader = Buffer(data=bytes(range(1, 17)))
    assert reader.pull_uint8() == 1
    assert reader.pull_uint16() == 0x0203
    assert reader.pull_uint32() == 0x04050607
    assert reader.pull_uint64() == 0x08090A0B0C0D0E0F
    assert not reader.eof() and reader.remaining() == 1
    assert reader.pull_bytes(1) == b"\x10" and reader.eof()


def test_buffer_underrun_does_not_move() -> None:
    reader = Buffer(data=b"\x01\x02\x03")
    for pull in (reader.pull_uint32, reader.pull_uint64, lambda: reader.pull_bytes(4)):
        with pytest.raises(BufferReadError):
            pull()
        assert reader.tell() == 0
    with pytest.raises(BufferReadError):
        reader.seek(4)
    with pytest.raises(BufferReadError):
        reader.pull_bytes(-1)
    with pytest.raises(ValueError):
        Buffer().push_uint16(0x10000)
    with pytest.raises(ValueError):
        Buffer().push_uint8(-1)


# ---------------------------------------------------------------------------------------------
# Hypothesis strategies: every payload type
# ---------------------------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
small = st.binary(max_size=48)

attributes = st.one_of(
    st.builds(TransformAttribute, st.integers(0, 0x7FFF), u16),  # TV
    st.builds(
        TransformAttribute,
        st.integers(0, 0x7FFF).filter(lambda t: t != TransformAttributeType.KEY_LENGTH),
        st.binary(max_size=12),
    ),  # TLV
)
transforms = st.builds(Transform, u8, u16, st.lists(attributes, max_size=3).map(tuple))


@st.composite
def proposals(draw: st.DrawFn) -> Proposal:
    protocol = draw(st.sampled_from([1, 2, 3, 9]))
    sizes = {1: [0, 8], 2: [4], 3: [4], 9: [0, 4, 8]}[protocol]
    spi = draw(st.binary(min_size=(n := draw(st.sampled_from(sizes))), max_size=n))
    return Proposal(
        draw(st.integers(1, 255)), protocol, spi, tuple(draw(st.lists(transforms, max_size=5)))
    )


@st.composite
def deletes(draw: st.DrawFn) -> DeletePayload:
    protocol = draw(st.sampled_from(ProtocolId))
    if protocol == ProtocolId.IKE:
        return DeletePayload(protocol)
    return DeletePayload(protocol, tuple(draw(st.lists(u32, max_size=6))))


@st.composite
def selectors(draw: st.DrawFn) -> TrafficSelector | UnknownTrafficSelector:
    kind = draw(st.sampled_from(["v4", "v6", "unknown"]))
    if kind == "unknown":
        ts_type = draw(st.integers(9, 255))
        rest = draw(st.binary(max_size=12))
        raw = bytes((ts_type, draw(u8))) + (4 + len(rest)).to_bytes(2, "big") + rest
        return UnknownTrafficSelector(raw)
    addresses = st.ip_addresses(v=4) if kind == "v4" else st.ip_addresses(v=6)
    return TrafficSelector(draw(u8), draw(u16), draw(u16), draw(addresses), draw(addresses))


@st.composite
def fragments(draw: st.DrawFn) -> EncryptedFragmentPayload:
    total = draw(st.integers(1, 0xFFFF))
    number = draw(st.integers(1, total))
    first = draw(u8) if number == 1 else 0
    return EncryptedFragmentPayload(number, total, first, draw(small))


KNOWN_TYPES = {int(t) for t in PayloadType}

PAYLOAD_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "SA": st.builds(SaPayload, st.lists(proposals(), min_size=1, max_size=3).map(tuple)),
    "KE": st.builds(KePayload, u16, small),
    "IDi": st.builds(IdiPayload, u8, small),
    "IDr": st.builds(IdrPayload, u8, small),
    "CERT": st.builds(CertPayload, u8, small),
    "CERTREQ": st.builds(CertReqPayload, u8, small),
    "AUTH": st.builds(AuthPayload, u8, small),
    "Nonce": st.builds(NoncePayload, st.binary(min_size=16, max_size=256)),
    "N": st.builds(NotifyPayload, u16, small, u8, st.binary(max_size=16)),
    "D": deletes(),
    "V": st.builds(VendorIdPayload, small),
    "TSi": st.builds(TsiPayload, st.lists(selectors(), max_size=4).map(tuple)),
    "TSr": st.builds(TsrPayload, st.lists(selectors(), max_size=4).map(tuple)),
    "SK": st.builds(EncryptedPayload, u8, small),
    "SKF": fragments(),
    "CP": st.builds(
        ConfigurationPayload,
        u8,
        st.lists(st.builds(ConfigurationAttribute, st.integers(0, 0x7FFF), small), max_size=4).map(
            tuple
        ),
    ),
    "unknown": st.builds(
        UnknownPayload, st.integers(1, 255).filter(lambda t: t not in KNOWN_TYPES), small
    ),
}

PULL: dict[str, Callable[[Buffer, Any], Payload]] = {
    "SA": lambda b, p: ike.pull_sa_payload(b),
    "KE": lambda b, p: ike.pull_ke_payload(b),
    "IDi": lambda b, p: ike.pull_idi_payload(b),
    "IDr": lambda b, p: ike.pull_idr_payload(b),
    "CERT": lambda b, p: ike.pull_cert_payload(b),
    "CERTREQ": lambda b, p: ike.pull_certreq_payload(b),
    "AUTH": lambda b, p: ike.pull_auth_payload(b),
    "Nonce": lambda b, p: ike.pull_nonce_payload(b),
    "N": lambda b, p: ike.pull_notify_payload(b),
    "D": lambda b, p: ike.pull_delete_payload(b),
    "V": lambda b, p: ike.pull_vendor_id_payload(b),
    "TSi": lambda b, p: ike.pull_tsi_payload(b),
    "TSr": lambda b, p: ike.pull_tsr_payload(b),
    "SK": lambda b, p: ike.pull_encrypted_payload(b, p.first_payload),
    "SKF": lambda b, p: ike.pull_encrypted_fragment_payload(b, p.first_payload),
    "CP": lambda b, p: ike.pull_configuration_payload(b),
    "unknown": lambda b, p: UnknownPayload(p.payload_type, b.pull_bytes(b.remaining())),
}

HEADER = IkeHeader(
    spi_i=SPI_I, spi_r=bytes(range(8)), exchange_type=ExchangeType.IKE_AUTH, message_id=1
)


@pytest.mark.parametrize("kind", sorted(PAYLOAD_STRATEGIES))
@FAST
@given(data=st.data())
def test_payload_round_trip(kind: str, data: st.DataObject) -> None:
    payload = data.draw(PAYLOAD_STRATEGIES[kind])
    body = serialize_payload_body(payload)
    reader = Buffer(data=body)
    assert PULL[kind](reader, payload) == payload
    assert reader.eof()
    # and framed in a message, through the chain
    assert parse_message(serialize_message(Message(HEADER, (payload,)))).payloads == (payload,)


plain_payloads = st.one_of(
    [s for name, s in PAYLOAD_STRATEGIES.items() if name not in ("SK", "SKF")]
)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    header = IkeHeader(
        spi_i=draw(st.binary(min_size=8, max_size=8)),
        spi_r=draw(st.binary(min_size=8, max_size=8)),
        minor_version=draw(st.integers(0, 15)),
        exchange_type=draw(u8),
        flags=HeaderFlag(draw(u8)),
        message_id=draw(u32),
    )
    payloads: list[Payload] = draw(st.lists(plain_payloads, max_size=5))
    tail = draw(st.sampled_from(["none", "SK", "SKF"]))
    if tail != "none":
        payloads.append(draw(PAYLOAD_STRATEGIES[tail]))
    return Message(header, tuple(payloads))


@FAST
@given(messages())
def test_message_round_trip(message: Message) -> None:
    data = serialize_message(message)
    parsed = parse_message(data)
    assert parsed.payloads == message.payloads
    first = message.payloads[0].payload_type if message.payloads else PayloadType.NONE
    assert parsed.header == replace(message.header, next_payload=first, length=len(data))
    assert serialize_message(parsed) == data


@settings(max_examples=15, deadline=None)
@given(messages())
def test_every_truncation_of_any_message_is_invalid_syntax(message: Message) -> None:
    data = serialize_message(message)
    for cut in range(len(data)):
        with pytest.raises(InvalidSyntax):
            parse_message(data[:cut])
        if cut >= 28:
            with pytest.raises(InvalidSyntax):
                parse_message(with_length(data[:cut], cut))


@FAST
@given(messages(), st.binary(min_size=1, max_size=32))
def test_trailing_garbage_on_any_message(message: Message, garbage: bytes) -> None:
    data = serialize_message(message) + garbage
    expect_invalid(data, "length mismatch")
    with pytest.raises(InvalidSyntax):
        parse_message(with_length(data, len(data)))


def test_inner_chain_of_an_ike_auth_request() -> None:
    inner = (
        IdiPayload(IdType.ID_FQDN, b"moon.strongswan.org"),
        AuthPayload(AuthMethod.SHARED_KEY_MESSAGE_INTEGRITY_CODE, bytes(32)),
        NotifyPayload(NotifyType.INITIAL_CONTACT),
        SaPayload(
            (
                Proposal(
                    1,
                    ProtocolId.ESP,
                    b"\xc1\x2a\x3b\x4c",
                    (
                        Transform(
                            TransformType.ENCR,
                            EncrId.ENCR_AES_GCM_16,
                            (TransformAttribute(TransformAttributeType.KEY_LENGTH, 256),),
                        ),
                        Transform(TransformType.ESN, 0),
                    ),
                ),
            )
        ),
        TsiPayload((TrafficSelector(0, 0, 0xFFFF, IPv6Address("::"), IPv6Address("::1")),)),
        TsrPayload(
            (TrafficSelector(0, 0, 0xFFFF, IPv4Address("10.1.0.0"), IPv4Address("10.1.255.255")),)
        ),
        CertReqPayload(CertEncoding.X509_CERT_SIGNATURE, bytes(20)),
        ConfigurationPayload(CfgType.CFG_REQUEST, (ConfigurationAttribute(1),)),
    )
    first, plaintext = serialize_payload_chain(inner)
    assert first == PayloadType.IDI
    assert parse_payload_chain(plaintext, first) == inner
    for cut in range(len(plaintext)):
        with pytest.raises(InvalidSyntax):
            parse_payload_chain(plaintext[:cut], first)
    # the crypto layer frames the ciphertext; the AAD is everything before its data
    outer = Message(HEADER, (EncryptedPayload(first, b"\x00" * 40),))
    wire = serialize_message(outer)
    assert wire[28] == PayloadType.IDI and len(wire) == 28 + 4 + 40


def test_inner_chain_rejects_nested_encryption() -> None:
    first, plaintext = serialize_payload_chain([EncryptedPayload(PayloadType.NONE, b"x")])
    with pytest.raises(InvalidSyntax, match="inside the Encrypted payload"):
        parse_payload_chain(plaintext, first)


def test_pull_payload_chain_stops_at_end() -> None:
    first, chain = serialize_payload_chain([NoncePayload(bytes(16)), VendorIdPayload(b"v")])
    buf = Buffer(data=chain + b"\xff\xff")
    assert len(pull_payload_chain(buf, first, len(chain))) == 2
    assert buf.tell() == len(chain)


# ---------------------------------------------------------------------------------------------
# Fuzz: parse_message returns a Message or raises IkeProtocolError, nothing else
# ---------------------------------------------------------------------------------------------


def assert_parses_or_protocol_error(data: bytes) -> None:
    try:
        message = parse_message(data)
    except IkeProtocolError:
        return
    assert isinstance(message, Message)
    # what we accept, we can write back, and it reads the same
    assert parse_message(serialize_message(message)) == message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    assert_parses_or_protocol_error(data)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([0, *sorted(KNOWN_TYPES), 1, 99, 200]),
    st.sampled_from([0x20, 0x21, 0x30]),
    st.binary(max_size=300),
)
def test_fuzz_plausible_header_random_payloads(first: int, version: int, body: bytes) -> None:
    # a well-formed header with the right Length, so the payload parsers see the bytes
    header = SPI_I + bytes(8) + bytes((first, version, 34, 8)) + bytes(4)
    assert_parses_or_protocol_error(header + (28 + len(body)).to_bytes(4, "big") + body)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    base = draw(st.one_of(st.just(STRONGSWAN_SA_INIT), messages().map(serialize_message)))
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        at = draw(st.integers(0, len(data)))
        if op == "set" and at < len(data):
            data[at] = draw(u8)
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 4))]
    if draw(st.booleans()) and len(data) >= 28:  # keep the header Length honest half the time
        data[24:28] = len(data).to_bytes(4, "big")
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_fuzz_mutations_of_valid_messages(data: bytes) -> None:
    assert_parses_or_protocol_error(data)
