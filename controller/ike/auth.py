"""Public-key authentication for IKE_AUTH: X.509 certificates and digital signatures.

Sans-IO and stateless like crypto.py: the caller passes the signed octets, the peer's CERT
payloads and the time (a wall-clock ``datetime``: certificate validity is calendar time).

* AUTH method 14, Digital Signature (RFC 7427 §3): the Authentication Data is the length of
  a DER AlgorithmIdentifier, that AlgorithmIdentifier, then the signature: RSASSA-PKCS1-v1_5
  and RSASSA-PSS with SHA-256/384/512, ECDSA with SHA-256/384/512 (a DER ECDSA-Sig-Value,
  RFC 7427 §3), Ed25519 and Ed448 (hash "Identity", RFC 8420).
* The hashes a side verifies are announced in SIGNATURE_HASH_ALGORITHMS (RFC 7427 §4) in
  IKE_SA_INIT. Towards a peer that announced none we sign with the RFC 7296 §3.8 method of
  the key: 1 (RSA, PKCS#1 v1.5 with SHA-1) or 9/10/11 (ECDSA on P-256/384/521, RFC 4754:
  r | s, each the size of the curve's order); those are accepted when verifying too.
* Certificates: the peer's end-entity certificate (its first CERT payload, RFC 7296 §3.6)
  must chain, through the intermediates in its other CERT payloads, to one of the configured
  CA certificates (RFC 5280 §6.1, the parts IKE peers use: signatures, validity, CA
  basicConstraints and pathLenConstraint, keyUsage, no unknown critical extension; RFC 4945
  §5.1.3.12 for extendedKeyUsage). cryptography's own verifier follows the Web PKI profile,
  which refuses Ed25519 certificates, so the path is checked here, certificate by
  certificate, with ``Certificate.verify_directly_issued_by``.
* The identity in IDi/IDr must be bound to that certificate as strongSwan binds it: a DN
  equals the subject, an FQDN, RFC 822 address or IP address is one of its subjectAltNames,
  a KEY_ID is its subjectKeyIdentifier or the SHA-1 of its public key (RFC 5280 §4.2.1.2
  method 1) or of its SubjectPublicKeyInfo.
* CERTREQ (RFC 7296 §3.7): the SHA-1 hashes of the trusted CAs' SubjectPublicKeyInfo.

Every failure is an ``AuthenticationFailed`` with the reason; nothing else escapes from the
functions that look at a peer's input.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from .constants import AuthMethod, CertEncoding, HashAlgorithm, IdType, NotifyType
from .errors import AuthenticationFailed
from .payloads import AuthPayload, CertPayload, CertReqPayload, NotifyPayload

__all__ = [
    "MAX_CHAIN_LENGTH",
    "MAX_PATH_VISITS",
    "MAX_PEER_CERTS",
    "SIGNATURE_HASHES",
    "SUPPORTED_PRIVATE_KEYS",
    "Credential",
    "PrivateKey",
    "TrustAnchors",
    "cert_payloads",
    "check_identity",
    "dn_equal",
    "identity_in_certificate",
    "parse_hash_algorithms",
    "sign",
    "signature_hash_algorithms",
    "validate_chain",
    "verify",
]

PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
SUPPORTED_PRIVATE_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)
_PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)

# RFC 7427 §4: the hashes we verify signatures with; SHA-1 is not among them (RFC 8247 §3.2)
SIGNATURE_HASHES = (
    HashAlgorithm.SHA2_256,
    HashAlgorithm.SHA2_384,
    HashAlgorithm.SHA2_512,
    HashAlgorithm.IDENTITY,  # RFC 8420: EdDSA signs the octets themselves
)
MAX_PEER_CERTS = 8  # CERT payloads looked at: an end-entity and a few intermediates
MAX_CHAIN_LENGTH = 6  # certificates from the end entity up to (excluding) the trust anchor
MAX_PATH_VISITS = 64  # nodes of the path search (a real chain needs MAX_CHAIN_LENGTH at most)
SHA1_LEN = hashlib.sha1().digest_size  # RFC 7296 §3.7: CERTREQ holds SHA-1 hashes

_HASHES: dict[int, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    HashAlgorithm.SHA2_256: hashes.SHA256,
    HashAlgorithm.SHA2_384: hashes.SHA384,
    HashAlgorithm.SHA2_512: hashes.SHA512,
}
# RFC 5480 §4: the hash that matches each curve's strength, preferred when the peer takes it
_CURVE_HASH = {"secp256r1": HashAlgorithm.SHA2_256, "secp384r1": HashAlgorithm.SHA2_384,
               "secp521r1": HashAlgorithm.SHA2_512}
# RFC 4754 §3 / RFC 7296 §3.8: the legacy ECDSA methods, each one curve and hash
_LEGACY_ECDSA = {
    AuthMethod.ECDSA_SHA256_P256: ("secp256r1", hashes.SHA256),
    AuthMethod.ECDSA_SHA384_P384: ("secp384r1", hashes.SHA384),
    AuthMethod.ECDSA_SHA512_P521: ("secp521r1", hashes.SHA512),
}
_LEGACY_ECDSA_BY_CURVE = {curve: method for method, (curve, _) in _LEGACY_ECDSA.items()}
# RFC 4945 §5.1.3.12: a critical extendedKeyUsage must allow IKE
_IKE_EKUS = (ExtendedKeyUsageOID.IPSEC_IKE, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE)
# Extensions whose criticality we honour (RFC 5280 §4.2: "MUST reject a certificate if it
# encounters a critical extension it does not recognize"); name and policy constraints are
# not enforced here, so a CA that makes them critical is refused rather than half-obeyed.
_UNDERSTOOD = frozenset({
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.ISSUER_ALTERNATIVE_NAME,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ExtensionOID.CERTIFICATE_POLICIES,
    ExtensionOID.CRL_DISTRIBUTION_POINTS,
    ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
})
# What cryptography may raise on a peer's malformed or unusual certificate or signature
_BAD_INPUT = (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm,
              x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


# -- DER, just enough for AlgorithmIdentifiers and Names (X.690 §8.1) ------------------------
_SEQUENCE, _SET, _OID, _NULL, _INTEGER = 0x30, 0x31, 0x06, 0x05, 0x02


class _DerError(ValueError):
    pass


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _der_read(data: bytes, pos: int = 0) -> tuple[int, bytes, int]:
    """One TLV at ``pos``: (tag, content, position after it); definite lengths only."""
    if pos + 2 > len(data):
        raise _DerError("truncated")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first & 0x80:
        count = first & 0x7F
        if not 1 <= count <= 4 or pos + count > len(data):
            raise _DerError("bad length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    else:
        length = first
    if pos + length > len(data):
        raise _DerError("truncated")
    return tag, data[pos:pos + length], pos + length


def _der_items(content: bytes) -> list[tuple[int, bytes]]:
    items, pos = [], 0
    while pos < len(content):
        tag, value, pos = _der_read(content, pos)
        items.append((tag, value))
    return items


def _oid(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER's DER TLV (X.690 §8.19)."""
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return _der(_OID, bytes(body))


_DER_NULL = _der(_NULL, b"")
_HASH_OID = {  # RFC 5754 §2, NIST's hash algorithm arcs
    HashAlgorithm.SHA2_256: _oid("2.16.840.1.101.3.4.2.1"),
    HashAlgorithm.SHA2_384: _oid("2.16.840.1.101.3.4.2.2"),
    HashAlgorithm.SHA2_512: _oid("2.16.840.1.101.3.4.2.3"),
}
_RSA_PKCS1_OID = {  # RFC 8017 Appendix C: sha{256,384,512}WithRSAEncryption
    HashAlgorithm.SHA2_256: _oid("1.2.840.113549.1.1.11"),
    HashAlgorithm.SHA2_384: _oid("1.2.840.113549.1.1.12"),
    HashAlgorithm.SHA2_512: _oid("1.2.840.113549.1.1.13"),
}
_ECDSA_OID = {  # RFC 5758 §3.2: ecdsa-with-SHA{256,384,512}, no parameters
    HashAlgorithm.SHA2_256: _oid("1.2.840.10045.4.3.2"),
    HashAlgorithm.SHA2_384: _oid("1.2.840.10045.4.3.3"),
    HashAlgorithm.SHA2_512: _oid("1.2.840.10045.4.3.4"),
}
_RSASSA_PSS_OID = _oid("1.2.840.113549.1.1.10")  # RFC 8017 Appendix C
_MGF1_OID = _oid("1.2.840.113549.1.1.8")
_ED25519_OID = _oid("1.3.101.112")  # RFC 8410 §3
_ED448_OID = _oid("1.3.101.113")


def _hash_algorithm(hash_id: HashAlgorithm) -> bytes:
    return _der(_SEQUENCE, _HASH_OID[hash_id] + _DER_NULL)


def _pss_algorithm_identifier(hash_id: HashAlgorithm) -> bytes:
    """RSASSA-PSS-params (RFC 8017 Appendix A.2.3): the hash, MGF1 with the same hash, a salt
    as long as the hash (RFC 7427 §3 leaves the parameters to the signer); trailerField is
    the default."""
    salt = _HASHES[hash_id].digest_size
    params = (
        _der(0xA0, _hash_algorithm(hash_id))
        + _der(0xA1, _der(_SEQUENCE, _MGF1_OID + _hash_algorithm(hash_id)))
        + _der(0xA2, _der(_INTEGER, salt.to_bytes(1, "big")))
    )
    return _der(_SEQUENCE, _RSASSA_PSS_OID + _der(_SEQUENCE, params))


# -- SIGNATURE_HASH_ALGORITHMS (RFC 7427 §4) -------------------------------------------------
def signature_hash_algorithms() -> NotifyPayload:
    data = b"".join(int(h).to_bytes(2, "big") for h in SIGNATURE_HASHES)
    return NotifyPayload(NotifyType.SIGNATURE_HASH_ALGORITHMS, data)


def parse_hash_algorithms(data: bytes) -> frozenset[int]:
    """The 2-octet hash algorithm identifiers of the notify (an odd last octet is ignored)."""
    return frozenset(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data) - 1, 2))


# -- our side: a key and its certificates ----------------------------------------------------
@dataclass(frozen=True)
class Credential:
    """Our private key and certificates: the end-entity one first (its public key is the
    key's), then intermediates, sent in that order (RFC 7296 §3.6)."""

    key: PrivateKey = field(repr=False)
    certs: tuple[x509.Certificate, ...]
    rsa_pss: bool = False  # sign with RSASSA-PSS rather than PKCS#1 v1.5 (RSA keys only)

    def __post_init__(self) -> None:
        if not self.certs:
            raise ValueError("a credential needs its end-entity certificate")
        if _spki(self.certs[0].public_key()) != _spki(self.key.public_key()):
            raise ValueError("the private key does not belong to the first certificate")


def cert_payloads(credential: Credential) -> list[CertPayload]:
    return [
        CertPayload(CertEncoding.X509_CERT_SIGNATURE, c.public_bytes(serialization.Encoding.DER))
        for c in credential.certs
    ]


def sign(credential: Credential, octets: bytes, peer_hashes: frozenset[int] | None) -> AuthPayload:
    """AUTH over InitiatorSignedOctets/ResponderSignedOctets (RFC 7296 §2.15): RFC 7427 with a
    hash the peer announced, or the key's RFC 7296 method if it announced none. Raises
    ``AuthenticationFailed`` when the key has no signature the peer can verify."""
    key = credential.key
    if peer_hashes is None and not credential.rsa_pss:
        return _sign_legacy(key, octets)
    if peer_hashes is None:
        raise AuthenticationFailed("RSASSA-PSS needs RFC 7427, and the peer did not announce "
                                   "it (SIGNATURE_HASH_ALGORITHMS)")
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        if HashAlgorithm.IDENTITY not in peer_hashes:
            raise AuthenticationFailed("the peer does not verify EdDSA (no Identity hash in "
                                       "its SIGNATURE_HASH_ALGORITHMS)")
        oid = _ED25519_OID if isinstance(key, ed25519.Ed25519PrivateKey) else _ED448_OID
        return _digital_signature(_der(_SEQUENCE, oid), key.sign(octets))
    preferred = HashAlgorithm.SHA2_256
    if isinstance(key, ec.EllipticCurvePrivateKey):
        preferred = _CURVE_HASH.get(key.curve.name, preferred)
    candidates = [preferred, *(h for h in _HASHES if h != preferred)]
    hash_id = next((HashAlgorithm(h) for h in candidates if h in peer_hashes), None)
    if hash_id is None:
        raise AuthenticationFailed("no SHA-2 hash in the peer's SIGNATURE_HASH_ALGORITHMS")
    algorithm = _HASHES[hash_id]()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algid = _der(_SEQUENCE, _ECDSA_OID[hash_id])
        return _digital_signature(algid, key.sign(octets, ec.ECDSA(algorithm)))
    if credential.rsa_pss:
        pss = padding.PSS(padding.MGF1(algorithm), algorithm.digest_size)
        return _digital_signature(_pss_algorithm_identifier(hash_id),
                                  key.sign(octets, pss, algorithm))
    algid = _der(_SEQUENCE, _RSA_PKCS1_OID[hash_id] + _DER_NULL)
    return _digital_signature(algid, key.sign(octets, padding.PKCS1v15(), algorithm))


def _digital_signature(algorithm_identifier: bytes, signature: bytes) -> AuthPayload:
    # RFC 7427 §3: ASN.1 Length (1 octet) | AlgorithmIdentifier | Signature Value
    assert len(algorithm_identifier) < 256
    data = bytes([len(algorithm_identifier)]) + algorithm_identifier + signature
    return AuthPayload(AuthMethod.DIGITAL_SIGNATURE, data)


def _sign_legacy(key: PrivateKey, octets: bytes) -> AuthPayload:
    if isinstance(key, rsa.RSAPrivateKey):
        # RFC 7296 §3.8 method 1: RSASSA-PKCS1-v1_5; SHA-1 as every implementation does
        sig = key.sign(octets, padding.PKCS1v15(), hashes.SHA1())
        return AuthPayload(AuthMethod.RSA_DIGITAL_SIGNATURE, sig)
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _LEGACY_ECDSA_BY_CURVE:
        method = _LEGACY_ECDSA_BY_CURVE[key.curve.name]
        _, algorithm = _LEGACY_ECDSA[method]
        r, s = utils.decode_dss_signature(key.sign(octets, ec.ECDSA(algorithm())))
        size = (key.curve.key_size + 7) // 8
        return AuthPayload(method, r.to_bytes(size, "big") + s.to_bytes(size, "big"))
    raise AuthenticationFailed("the peer did not announce RFC 7427 signatures "
                               "(SIGNATURE_HASH_ALGORITHMS), which this key needs")


# -- the peer's side: trust anchors, the chain, the identity, the signature ------------------
@dataclass(frozen=True)
class TrustAnchors:
    """The CA certificates a peer's certificate must chain to."""

    cas: tuple[x509.Certificate, ...]

    def certreq(self) -> CertReqPayload:
        """RFC 7296 §3.7: the SHA-1 hash of each trusted CA's SubjectPublicKeyInfo."""
        hashes_ = dict.fromkeys(hashlib.sha1(_spki(c.public_key())).digest() for c in self.cas)
        return CertReqPayload(CertEncoding.X509_CERT_SIGNATURE, b"".join(hashes_))


def validate_chain(
    peer_certs: Sequence[CertPayload], anchors: TrustAnchors, when: datetime
) -> x509.Certificate:
    """The peer's end-entity certificate, once it chains to a trust anchor at ``when``
    (timezone-aware); ``AuthenticationFailed`` with the reason otherwise."""
    x509_certs = [c.data for c in peer_certs if c.encoding == CertEncoding.X509_CERT_SIGNATURE]
    if not x509_certs:
        raise AuthenticationFailed("the peer sent no X.509 certificate (CERT payload)")
    parsed = []
    for i, der in enumerate(x509_certs[:MAX_PEER_CERTS]):
        try:
            parsed.append(x509.load_der_x509_certificate(der))
        except _BAD_INPUT as exc:
            raise AuthenticationFailed(
                f"the peer's certificate #{i} is not X.509: {exc}"
            ) from None
    leaf, intermediates = parsed[0], parsed[1:]
    try:
        problem = _usable(leaf, when) or _end_entity_problem(leaf)
        if problem is not None:
            raise AuthenticationFailed(f"certificate {_subject(leaf)}: {problem}")
        search = _PathSearch(intermediates, anchors.cas, when)
        if search.chains(leaf, []):
            return leaf
    except _BAD_INPUT as exc:
        raise AuthenticationFailed(f"certificate {_subject(leaf)}: malformed: {exc}") from None
    reason = search.reasons[0] if search.reasons else "not issued by a trusted CA"
    raise AuthenticationFailed(f"certificate {_subject(leaf)}: {reason}")


class _PathSearch:
    """A depth-first search for a path from the end entity up to a trust anchor (RFC 5280
    §6.1). Each (certificate, issuer) signature is checked once, and the search visits a
    bounded number of nodes: certificates that share a name and key cannot make it costly."""

    def __init__(self, intermediates: Sequence[x509.Certificate],
                 cas: Sequence[x509.Certificate], when: datetime) -> None:
        self.intermediates, self.cas, self.when = intermediates, cas, when
        self.reasons: list[str] = []
        self.visits = 0
        self._signed: dict[tuple[int, int], bool] = {}

    def issued_by(self, cert: x509.Certificate, issuer: x509.Certificate) -> bool:
        key = (id(cert), id(issuer))
        if key not in self._signed:
            try:
                cert.verify_directly_issued_by(issuer)  # issuer name and signature
                self._signed[key] = True
            except _BAD_INPUT:
                self._signed[key] = False
        return self._signed[key]

    def chains(self, cert: x509.Certificate, path: list[x509.Certificate]) -> bool:
        self.visits += 1
        if self.visits > MAX_PATH_VISITS:
            return False
        below = len(path)  # CA certificates between ``cert``'s issuer and the end entity
        for ca in self.cas:
            if self.issued_by(cert, ca):
                problem = _usable(ca, self.when) or _ca_problem(ca, below)
                if problem is None:
                    return True
                self.reasons.append(f"trusted CA {_subject(ca)}: {problem}")
        if len(path) + 1 >= MAX_CHAIN_LENGTH:
            return False
        for inter in self.intermediates:
            if inter is cert or any(inter is p for p in path) or not self.issued_by(cert, inter):
                continue
            problem = _usable(inter, self.when) or _ca_problem(inter, below)
            if problem is not None:
                self.reasons.append(f"intermediate CA {_subject(inter)}: {problem}")
                continue
            if self.chains(inter, [*path, inter]):
                return True
        return False


def _usable(cert: x509.Certificate, when: datetime) -> str | None:
    if when < cert.not_valid_before_utc:
        return f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
    if when > cert.not_valid_after_utc:
        return f"expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
    for ext in cert.extensions:
        if ext.critical and ext.oid not in _UNDERSTOOD:
            return f"unsupported critical extension {ext.oid.dotted_string}"
    return None


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension[
    x509.ExtensionType
] | None:
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def _ca_problem(cert: x509.Certificate, below: int) -> str | None:
    """RFC 5280 §6.1.4 (k), (l), (n): a CA flag, room for ``below`` CAs under it, keyCertSign."""
    bc = _extension(cert, x509.BasicConstraints)
    if bc is None or not isinstance(bc.value, x509.BasicConstraints) or not bc.value.ca:
        return "not a CA (basicConstraints)"
    if bc.value.path_length is not None and below > bc.value.path_length:
        return f"pathLenConstraint {bc.value.path_length} exceeded"
    ku = _extension(cert, x509.KeyUsage)
    if ku is not None and isinstance(ku.value, x509.KeyUsage) and not ku.value.key_cert_sign:
        return "keyUsage does not allow keyCertSign"
    return None


def _end_entity_problem(cert: x509.Certificate) -> str | None:
    ku = _extension(cert, x509.KeyUsage)
    if (
        ku is not None
        and isinstance(ku.value, x509.KeyUsage)
        and not (ku.value.digital_signature or ku.value.content_commitment)
    ):
        return "keyUsage allows neither digitalSignature nor nonRepudiation"  # RFC 4945 §5.1.3.2
    eku = _extension(cert, x509.ExtendedKeyUsage)
    if (
        eku is not None
        and eku.critical
        and isinstance(eku.value, x509.ExtendedKeyUsage)
        and not any(oid in eku.value for oid in _IKE_EKUS)
    ):
        return "critical extendedKeyUsage without ipsecIKE"  # RFC 4945 §5.1.3.12
    if not isinstance(cert.public_key(), _PublicKey):
        return "public key of an unsupported type"
    return None


def _subject(cert: x509.Certificate) -> str:
    try:
        return f'"{cert.subject.rfc4514_string()}"'
    except _BAD_INPUT:
        return "(unprintable subject)"


def check_identity(id_type: int, data: bytes, cert: x509.Certificate, shown: str) -> None:
    """``AuthenticationFailed`` unless the identity (``shown`` in the message) is bound to
    ``cert``."""
    if not identity_in_certificate(id_type, data, cert):
        raise AuthenticationFailed(f"peer's identity {shown} is not in its certificate "
                                   f"{_subject(cert)}")


def identity_in_certificate(id_type: int, data: bytes, cert: x509.Certificate) -> bool:
    """Is the IDi/IDr identity bound to ``cert`` (strongSwan's rules, module docstring)?"""
    try:
        return _identity_in_certificate(id_type, data, cert)
    except (*_BAD_INPUT, _DerError):
        return False


def _identity_in_certificate(id_type: int, data: bytes, cert: x509.Certificate) -> bool:
    if id_type == IdType.ID_DER_ASN1_DN:
        return dn_equal(data, cert.subject.public_bytes())
    if id_type == IdType.ID_KEY_ID:
        public_key = cert.public_key()
        ids = [
            hashlib.sha1(_spki(public_key)).digest(),
            x509.SubjectKeyIdentifier.from_public_key(public_key).digest,
        ]
        ski = _extension(cert, x509.SubjectKeyIdentifier)
        if ski is not None and isinstance(ski.value, x509.SubjectKeyIdentifier):
            ids.append(ski.value.digest)
        return any(hmac.compare_digest(data, i) for i in ids)
    san = _extension(cert, x509.SubjectAlternativeName)
    if san is None or not isinstance(san.value, x509.SubjectAlternativeName):
        return False
    names = san.value
    if id_type in (IdType.ID_IPV4_ADDR, IdType.ID_IPV6_ADDR):
        if len(data) != (4 if id_type == IdType.ID_IPV4_ADDR else 16):
            return False
        address = ipaddress.ip_address(data)
        return address in names.get_values_for_type(x509.IPAddress)
    text = data.decode("ascii", "replace").lower()
    if id_type == IdType.ID_FQDN:
        return text in (n.lower() for n in names.get_values_for_type(x509.DNSName))
    if id_type == IdType.ID_RFC822_ADDR:
        return text in (n.lower() for n in names.get_values_for_type(x509.RFC822Name))
    return False  # ID_DER_ASN1_GN, ID_NULL and unknown types bind to nothing


# UTF8String, PrintableString, IA5String, TeletexString (as Latin-1), BMPString, UniversalString
_STRING_TAGS = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x14: "latin-1", 0x1E: "utf-16-be",
                0x1C: "utf-32-be"}


def _dn_attributes(der: bytes) -> list[list[tuple[bytes, str]]]:
    """A Name (RFC 5280 §4.1.2.4) as RDNs of (OID, value): string values decoded whatever
    their ASN.1 string type, white space collapsed and case folded (RFC 4518 in short)."""
    tag, content, end = _der_read(der)
    if tag != _SEQUENCE or end != len(der):
        raise _DerError("not a Name")
    rdns = []
    for rdn_tag, rdn in _der_items(content):
        if rdn_tag != _SET:
            raise _DerError("not an RDN")
        attributes: list[tuple[bytes, str]] = []
        for atv_tag, atv in _der_items(rdn):
            items = _der_items(atv)
            if atv_tag != _SEQUENCE or len(items) != 2 or items[0][0] != _OID:
                raise _DerError("not an AttributeTypeAndValue")
            (_, oid), (value_tag, value) = items
            if value_tag in _STRING_TAGS:
                text = value.decode(_STRING_TAGS[value_tag], "replace")
                attributes.append((oid, " ".join(text.split()).casefold()))
            else:  # not a string: compared as encoded (a prefix no string can have)
                attributes.append((oid, f"\0{value_tag:02x}:{value.hex()}"))
        rdns.append(sorted(attributes))
    return rdns


def dn_equal(a: bytes, b: bytes) -> bool:
    """Two DER distinguished names name the same entity (string types and case aside)."""
    if a == b:
        return True
    try:
        return _dn_attributes(a) == _dn_attributes(b)
    except _DerError:
        return False


def verify(public_key: object, auth: AuthPayload, octets: bytes) -> None:
    """Check the peer's AUTH signature over ``octets`` with ``public_key``; raise
    ``AuthenticationFailed`` (with the reason) if it does not verify."""
    try:
        if auth.method == AuthMethod.DIGITAL_SIGNATURE:
            _verify_digital_signature(public_key, auth.data, octets)
        elif auth.method == AuthMethod.RSA_DIGITAL_SIGNATURE:
            if not isinstance(public_key, rsa.RSAPublicKey):
                raise AuthenticationFailed("AUTH method RSA, but the certificate's key is not")
            public_key.verify(auth.data, octets, padding.PKCS1v15(), hashes.SHA1())
        elif auth.method in _LEGACY_ECDSA:
            curve, algorithm = _LEGACY_ECDSA[AuthMethod(auth.method)]
            if not isinstance(public_key, ec.EllipticCurvePublicKey) or (
                public_key.curve.name != curve
            ):
                raise AuthenticationFailed(f"AUTH method {auth.method}: the key is not {curve}")
            size = (public_key.curve.key_size + 7) // 8
            if len(auth.data) != 2 * size:  # RFC 4754 §7: r | s, each of the curve's size
                raise AuthenticationFailed("ECDSA signature of the wrong length")
            r = int.from_bytes(auth.data[:size], "big")
            s = int.from_bytes(auth.data[size:], "big")
            der = utils.encode_dss_signature(r, s)
            public_key.verify(der, octets, ec.ECDSA(algorithm()))
        else:
            raise AuthenticationFailed(f"AUTH method {auth.method} is not a signature we take")
    except InvalidSignature:
        raise AuthenticationFailed("the AUTH signature does not verify") from None
    except (ValueError, TypeError, UnsupportedAlgorithm, _DerError) as exc:
        raise AuthenticationFailed(f"unusable AUTH signature: {exc}") from None


def _verify_digital_signature(public_key: object, data: bytes, octets: bytes) -> None:
    # RFC 7427 §3: ASN.1 Length | AlgorithmIdentifier | Signature Value
    if not data or len(data) < 1 + data[0]:
        raise AuthenticationFailed("truncated RFC 7427 Authentication Data")
    algid, signature = data[1:1 + data[0]], data[1 + data[0]:]
    tag, content, end = _der_read(algid)
    if tag != _SEQUENCE or end != len(algid):
        raise AuthenticationFailed("RFC 7427 AlgorithmIdentifier is not a SEQUENCE")
    oid_tag, oid, pos = _der_read(content)
    if oid_tag != _OID:
        raise AuthenticationFailed("RFC 7427 AlgorithmIdentifier without an OID")
    oid_tlv, params = _der(_OID, oid), content[pos:]
    for hash_id, known in _RSA_PKCS1_OID.items():
        if oid_tlv == known and params in (b"", _DER_NULL):
            if not isinstance(public_key, rsa.RSAPublicKey):
                raise _wrong_key("RSA")
            public_key.verify(signature, octets, padding.PKCS1v15(), _HASHES[hash_id]())
            return
    for hash_id, known in _ECDSA_OID.items():
        if oid_tlv == known and not params:
            if not isinstance(public_key, ec.EllipticCurvePublicKey):
                raise _wrong_key("ECDSA")
            public_key.verify(signature, octets, ec.ECDSA(_HASHES[hash_id]()))
            return
    if oid_tlv == _RSASSA_PSS_OID:
        algorithm, pss = _pss_parameters(params)
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise _wrong_key("RSA")
        public_key.verify(signature, octets, pss, algorithm)
        return
    if oid_tlv == _ED25519_OID and not params:
        if not isinstance(public_key, ed25519.Ed25519PublicKey):
            raise _wrong_key("Ed25519")
        public_key.verify(signature, octets)
        return
    if oid_tlv == _ED448_OID and not params:
        if not isinstance(public_key, ed448.Ed448PublicKey):
            raise _wrong_key("Ed448")
        public_key.verify(signature, octets)
        return
    raise AuthenticationFailed(f"signature algorithm {algid.hex()} is not one we verify")


def _wrong_key(name: str) -> AuthenticationFailed:
    return AuthenticationFailed(f"a {name} signature, but the certificate's key is not {name}")


def _pss_parameters(
    params: bytes,
) -> tuple[hashes.SHA256 | hashes.SHA384 | hashes.SHA512, padding.PSS]:
    """RSASSA-PSS-params (RFC 8017 Appendix A.2.3) with SHA-2 for both hash and MGF1; the
    SHA-1 defaults are refused (we announced no SHA-1)."""
    tag, content, end = _der_read(params)
    if tag != _SEQUENCE or end != len(params):
        raise AuthenticationFailed("RSASSA-PSS parameters are not a SEQUENCE")
    fields = dict(_der_items(content))
    by_oid = {v: k for k, v in _HASH_OID.items()}

    def hash_of(algid: bytes) -> HashAlgorithm:
        t, c, e = _der_read(algid)
        if t != _SEQUENCE or e != len(algid):
            raise AuthenticationFailed("malformed hash AlgorithmIdentifier")
        ot, o, p = _der_read(c)
        if ot != _OID or c[p:] not in (b"", _DER_NULL) or _der(_OID, o) not in by_oid:
            raise AuthenticationFailed("RSASSA-PSS with a hash we do not verify")
        return by_oid[_der(_OID, o)]

    if 0xA0 not in fields or 0xA1 not in fields:
        raise AuthenticationFailed("RSASSA-PSS with the SHA-1 defaults")
    hash_id = hash_of(fields[0xA0])
    t, mgf, e = _der_read(fields[0xA1])
    mgf_items = _der_items(mgf) if t == _SEQUENCE and e == len(fields[0xA1]) else []
    if len(mgf_items) != 2 or _der(*mgf_items[0]) != _MGF1_OID:
        raise AuthenticationFailed("RSASSA-PSS with a mask generation function other than MGF1")
    mgf_hash = hash_of(_der(*mgf_items[1]))
    salt = 20  # RFC 8017 Appendix A.2.3: the default saltLength
    if 0xA2 in fields:
        t, value, e = _der_read(fields[0xA2])
        if t != _INTEGER or e != len(fields[0xA2]) or not value or len(value) > 4:
            raise AuthenticationFailed("malformed RSASSA-PSS saltLength")
        salt = int.from_bytes(value, "big")
    if 0xA3 in fields:
        t, value, e = _der_read(fields[0xA3])
        if t != _INTEGER or int.from_bytes(value, "big") != 1:
            raise AuthenticationFailed("RSASSA-PSS trailerField other than 1")  # RFC 8017
    algorithm = _HASHES[hash_id]()
    return algorithm, padding.PSS(padding.MGF1(_HASHES[mgf_hash]()), salt)


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
