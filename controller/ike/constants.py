"""IKEv2 code points, named as in IANA's "Internet Key Exchange Version 2 (IKEv2) Parameters".

Each enum is one IANA registry; member names follow the registry (or, where the registry
gives only a description, the name RFC 7296 uses in its tables). The registries keep
growing: wire code keeps an unknown value as a plain ``int`` rather than failing (see
``members_by_value``), and the protocol layer decides what an unknown value means.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import TypeVar, cast

__all__ = [
    "AuthMethod",
    "CertEncoding",
    "CfgType",
    "ConfigAttributeType",
    "DhGroup",
    "EncrId",
    "EsnId",
    "ExchangeType",
    "HashAlgorithm",
    "HeaderFlag",
    "IdType",
    "IntegId",
    "NotifyType",
    "PayloadType",
    "PrfId",
    "ProtocolId",
    "TransformAttributeType",
    "TransformType",
    "TsType",
    "members_by_value",
]

_E = TypeVar("_E", bound=IntEnum)


_MEMBERS: dict[type[IntEnum], dict[int, IntEnum]] = {}


def members_by_value(enum: type[_E]) -> dict[int, _E]:
    """The registry as a dict, value -> member: ``members_by_value(E).get(v, v)`` is the
    member when the registry knows ``v``, else ``v`` itself; for parsers that convert a
    field per structure (a dict lookup where ``E(v)`` runs the Enum machinery and raises
    for unknown values)."""
    members = _MEMBERS.get(enum)
    if members is None:
        members = _MEMBERS[enum] = {int(member): member for member in enum}
    return cast(dict[int, _E], members)


class ExchangeType(IntEnum):
    """IKEv2 Exchange Types (RFC 7296 §3.1)."""

    IKE_SA_INIT = 34
    IKE_AUTH = 35
    CREATE_CHILD_SA = 36
    INFORMATIONAL = 37
    IKE_SESSION_RESUME = 38  # RFC 5723
    IKE_INTERMEDIATE = 43  # RFC 9242
    IKE_FOLLOWUP_KE = 44  # RFC 9370


class HeaderFlag(IntFlag):
    """Flags octet of the IKE header (RFC 7296 §3.1); the other bits are reserved."""

    INITIATOR = 0x08  # "I": set in messages sent by the original initiator of the IKE SA
    VERSION = 0x10  # "V": sender can speak a higher major version (never set by IKEv2)
    RESPONSE = 0x20  # "R": this message is a response to a message with the same ID


class PayloadType(IntEnum):
    """IKEv2 Payload Types (RFC 7296 §3.2), IANA notation upper-cased (IDi -> IDI)."""

    NONE = 0  # No Next Payload
    SA = 33  # Security Association
    KE = 34  # Key Exchange
    IDI = 35  # Identification - Initiator
    IDR = 36  # Identification - Responder
    CERT = 37  # Certificate
    CERTREQ = 38  # Certificate Request
    AUTH = 39  # Authentication
    NONCE = 40  # Nonce (Ni, Nr)
    N = 41  # Notify
    D = 42  # Delete
    V = 43  # Vendor ID
    TSI = 44  # Traffic Selector - Initiator
    TSR = 45  # Traffic Selector - Responder
    SK = 46  # Encrypted and Authenticated
    CP = 47  # Configuration
    EAP = 48  # Extensible Authentication
    GSPM = 49  # Generic Secure Password Method (RFC 6467)
    SKF = 53  # Encrypted and Authenticated Fragment (RFC 7383)
    PS = 54  # Puzzle Solution (RFC 8019)


class TransformType(IntEnum):
    """Transform Type Values (RFC 7296 §3.3.2; type 4 renamed KE by RFC 9370)."""

    ENCR = 1  # Encryption Algorithm
    PRF = 2  # Pseudorandom Function
    INTEG = 3  # Integrity Algorithm
    KE = 4  # Key Exchange Method, formerly "Diffie-Hellman group (D-H)"
    DH = 4  # alias of KE, the RFC 7296 name
    ESN = 5  # Extended Sequence Numbers
    ADDKE1 = 6  # Additional Key Exchange 1..7 (RFC 9370)
    ADDKE2 = 7
    ADDKE3 = 8
    ADDKE4 = 9
    ADDKE5 = 10
    ADDKE6 = 11
    ADDKE7 = 12


class TransformAttributeType(IntEnum):
    """IKEv2 Transform Attribute Types (RFC 7296 §3.3.5)."""

    KEY_LENGTH = 14  # Key Length (in bits); TV format


class EncrId(IntEnum):
    """Transform Type 1 - Encryption Algorithm Transform IDs."""

    ENCR_DES_IV64 = 1
    ENCR_DES = 2
    ENCR_3DES = 3
    ENCR_RC5 = 4
    ENCR_IDEA = 5
    ENCR_CAST = 6
    ENCR_BLOWFISH = 7
    ENCR_3IDEA = 8
    ENCR_DES_IV32 = 9
    ENCR_NULL = 11
    ENCR_AES_CBC = 12
    ENCR_AES_CTR = 13
    ENCR_AES_CCM_8 = 14
    ENCR_AES_CCM_12 = 15
    ENCR_AES_CCM_16 = 16
    ENCR_AES_GCM_8 = 18
    ENCR_AES_GCM_12 = 19
    ENCR_AES_GCM_16 = 20
    ENCR_NULL_AUTH_AES_GMAC = 21
    ENCR_CAMELLIA_CBC = 23
    ENCR_CAMELLIA_CTR = 24
    ENCR_CAMELLIA_CCM_8_ICV = 25
    ENCR_CAMELLIA_CCM_12_ICV = 26
    ENCR_CAMELLIA_CCM_16_ICV = 27
    ENCR_CHACHA20_POLY1305 = 28  # RFC 7634


class PrfId(IntEnum):
    """Transform Type 2 - Pseudorandom Function Transform IDs."""

    PRF_HMAC_MD5 = 1
    PRF_HMAC_SHA1 = 2
    PRF_HMAC_TIGER = 3
    PRF_AES128_XCBC = 4
    PRF_HMAC_SHA2_256 = 5  # RFC 4868
    PRF_HMAC_SHA2_384 = 6
    PRF_HMAC_SHA2_512 = 7
    PRF_AES128_CMAC = 8


class IntegId(IntEnum):
    """Transform Type 3 - Integrity Algorithm Transform IDs."""

    NONE = 0
    AUTH_HMAC_MD5_96 = 1
    AUTH_HMAC_SHA1_96 = 2
    AUTH_DES_MAC = 3
    AUTH_KPDK_MD5 = 4
    AUTH_AES_XCBC_96 = 5
    AUTH_HMAC_MD5_128 = 6
    AUTH_HMAC_SHA1_160 = 7
    AUTH_AES_CMAC_96 = 8
    AUTH_AES_128_GMAC = 9
    AUTH_AES_192_GMAC = 10
    AUTH_AES_256_GMAC = 11
    AUTH_HMAC_SHA2_256_128 = 12  # RFC 4868
    AUTH_HMAC_SHA2_384_192 = 13
    AUTH_HMAC_SHA2_512_256 = 14


class DhGroup(IntEnum):
    """Transform Type 4 - Key Exchange Method Transform IDs (IANA gives descriptions only)."""

    NONE = 0
    MODP_768 = 1  # 768-bit MODP Group
    MODP_1024 = 2
    MODP_1536 = 5  # RFC 3526
    MODP_2048 = 14
    MODP_3072 = 15
    MODP_4096 = 16
    MODP_6144 = 17
    MODP_8192 = 18
    ECP_256 = 19  # 256-bit random ECP group (RFC 5903)
    ECP_384 = 20
    ECP_521 = 21
    MODP_1024_160 = 22  # RFC 5114
    MODP_2048_224 = 23
    MODP_2048_256 = 24
    ECP_192 = 25
    ECP_224 = 26
    BRAINPOOL_P224R1 = 27  # RFC 6954
    BRAINPOOL_P256R1 = 28
    BRAINPOOL_P384R1 = 29
    BRAINPOOL_P512R1 = 30
    CURVE25519 = 31  # RFC 8031
    CURVE448 = 32


class EsnId(IntEnum):
    """Transform Type 5 - Extended Sequence Numbers Transform IDs."""

    NO_ESN = 0
    ESN = 1


class ProtocolId(IntEnum):
    """IKEv2 Security Protocol Identifiers (RFC 7296 §3.3.1)."""

    IKE = 1
    AH = 2
    ESP = 3


class NotifyType(IntEnum):
    """IKEv2 Notify Message Types: error types (< 16384) then status types."""

    # -- Error types, RFC 7296 §3.10.1 --
    UNSUPPORTED_CRITICAL_PAYLOAD = 1
    INVALID_IKE_SPI = 4
    INVALID_MAJOR_VERSION = 5
    INVALID_SYNTAX = 7
    INVALID_MESSAGE_ID = 9
    INVALID_SPI = 11
    NO_PROPOSAL_CHOSEN = 14
    INVALID_KE_PAYLOAD = 17
    AUTHENTICATION_FAILED = 24
    SINGLE_PAIR_REQUIRED = 34
    NO_ADDITIONAL_SAS = 35
    INTERNAL_ADDRESS_FAILURE = 36
    FAILED_CP_REQUIRED = 37
    TS_UNACCEPTABLE = 38
    INVALID_SELECTORS = 39
    UNACCEPTABLE_ADDRESSES = 40  # RFC 4555
    UNEXPECTED_NAT_DETECTED = 41  # RFC 4555
    TEMPORARY_FAILURE = 43
    CHILD_SA_NOT_FOUND = 44
    # -- Status types, RFC 7296 §3.10.1 --
    INITIAL_CONTACT = 16384
    SET_WINDOW_SIZE = 16385
    ADDITIONAL_TS_POSSIBLE = 16386
    IPCOMP_SUPPORTED = 16387
    NAT_DETECTION_SOURCE_IP = 16388
    NAT_DETECTION_DESTINATION_IP = 16389
    COOKIE = 16390
    USE_TRANSPORT_MODE = 16391
    HTTP_CERT_LOOKUP_SUPPORTED = 16392
    REKEY_SA = 16393
    ESP_TFC_PADDING_NOT_SUPPORTED = 16394
    NON_FIRST_FRAGMENTS_ALSO = 16395
    # -- Status types from later RFCs --
    MOBIKE_SUPPORTED = 16396  # RFC 4555
    ADDITIONAL_IP4_ADDRESS = 16397
    ADDITIONAL_IP6_ADDRESS = 16398
    NO_ADDITIONAL_ADDRESSES = 16399
    UPDATE_SA_ADDRESSES = 16400
    COOKIE2 = 16401
    NO_NATS_ALLOWED = 16402
    AUTH_LIFETIME = 16403  # RFC 4478
    MULTIPLE_AUTH_SUPPORTED = 16404  # RFC 4739
    ANOTHER_AUTH_FOLLOWS = 16405
    REDIRECT_SUPPORTED = 16406  # RFC 5685
    REDIRECT = 16407
    REDIRECTED_FROM = 16408
    EAP_ONLY_AUTHENTICATION = 16417  # RFC 5998
    CHILDLESS_IKEV2_SUPPORTED = 16418  # RFC 6023
    IKEV2_FRAGMENTATION_SUPPORTED = 16430  # RFC 7383
    SIGNATURE_HASH_ALGORITHMS = 16431  # RFC 7427
    USE_PPK = 16435  # RFC 8784
    INTERMEDIATE_EXCHANGE_SUPPORTED = 16438  # RFC 9242
    ADDITIONAL_KEY_EXCHANGE = 16441  # RFC 9370
    USE_AGGFRAG = 16442  # RFC 9347


class IdType(IntEnum):
    """IKEv2 Identification Payload ID Types (RFC 7296 §3.5)."""

    ID_IPV4_ADDR = 1
    ID_FQDN = 2
    ID_RFC822_ADDR = 3
    ID_IPV6_ADDR = 5
    ID_DER_ASN1_DN = 9
    ID_DER_ASN1_GN = 10
    ID_KEY_ID = 11
    ID_NULL = 13  # RFC 7619


class CertEncoding(IntEnum):
    """IKEv2 Certificate Encodings (RFC 7296 §3.6)."""

    PKCS7_WRAPPED_X509_CERTIFICATE = 1
    PGP_CERTIFICATE = 2
    DNS_SIGNED_KEY = 3
    X509_CERT_SIGNATURE = 4
    KERBEROS_TOKEN = 6
    CERTIFICATE_REVOCATION_LIST = 7
    AUTHORITY_REVOCATION_LIST = 8
    SPKI_CERTIFICATE = 9
    X509_CERT_ATTRIBUTE = 10
    RAW_RSA_KEY = 11
    HASH_AND_URL_X509_CERT = 12
    HASH_AND_URL_X509_BUNDLE = 13
    OCSP_CONTENT = 14  # RFC 4806
    RAW_PUBLIC_KEY = 15  # RFC 7670


class AuthMethod(IntEnum):
    """IKEv2 Authentication Method (RFC 7296 §3.8)."""

    RSA_DIGITAL_SIGNATURE = 1
    SHARED_KEY_MESSAGE_INTEGRITY_CODE = 2
    DSS_DIGITAL_SIGNATURE = 3
    ECDSA_SHA256_P256 = 9  # RFC 4754
    ECDSA_SHA384_P384 = 10
    ECDSA_SHA512_P521 = 11
    GENERIC_SECURE_PASSWORD = 12  # RFC 6467
    NULL_AUTHENTICATION = 13  # RFC 7619
    DIGITAL_SIGNATURE = 14  # RFC 7427


class HashAlgorithm(IntEnum):
    """IKEv2 Hash Algorithms, carried in SIGNATURE_HASH_ALGORITHMS (RFC 7427 §4)."""

    SHA1 = 1
    SHA2_256 = 2
    SHA2_384 = 3
    SHA2_512 = 4
    IDENTITY = 5  # RFC 8420


class TsType(IntEnum):
    """IKEv2 Traffic Selector Types (RFC 7296 §3.13.1)."""

    TS_IPV4_ADDR_RANGE = 7
    TS_IPV6_ADDR_RANGE = 8
    TS_FC_ADDR_RANGE = 9  # RFC 4595
    TS_SECLABEL = 10  # RFC 9478


class CfgType(IntEnum):
    """IKEv2 Configuration Payload CFG Types (RFC 7296 §3.15)."""

    CFG_REQUEST = 1
    CFG_REPLY = 2
    CFG_SET = 3
    CFG_ACK = 4


class ConfigAttributeType(IntEnum):
    """IKEv2 Configuration Payload Attribute Types (RFC 7296 §3.15.1)."""

    INTERNAL_IP4_ADDRESS = 1
    INTERNAL_IP4_NETMASK = 2
    INTERNAL_IP4_DNS = 3
    INTERNAL_IP4_NBNS = 4
    INTERNAL_IP4_DHCP = 6
    APPLICATION_VERSION = 7
    INTERNAL_IP6_ADDRESS = 8
    INTERNAL_IP6_DNS = 10
    INTERNAL_IP6_DHCP = 12
    INTERNAL_IP4_SUBNET = 13
    SUPPORTED_ATTRIBUTES = 14
    INTERNAL_IP6_SUBNET = 15
