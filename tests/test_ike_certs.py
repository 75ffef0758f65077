"""Certificate authentication (controller/ike/auth.py, RFC 7296 §2.15, RFC 7427): two IKE SAs in
memory with a PKI generated here (a root CA, an intermediate, end-entity certificates with
subjectAltNames) for every key type; the failures that must end in AUTHENTICATION_FAILED; the
SIGNATURE_HASH_ALGORITHMS and CERTREQ payloads on the wire; and the configuration that loads
certificates, keys and CAs from files (controller/connections.py, ``ike_config``).

The PKI helpers (``Pki``, ``issue``, ``new_key``) serve tests/test_interop_certs.py too."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.config import ConfigError, parse_config
from controller.connections import PskStore, parse_connection
from controller.gateway import ike_config
from controller.ike import auth
from controller.ike.constants import AuthMethod, CertEncoding, IdType, NotifyType
from controller.ike.errors import AuthenticationFailed
from controller.ike.ike_sa import (
    ChildSaEstablished,
    IkeConfig,
    IkeSa,
    IkeSaEstablished,
    IkeSaFailed,
)
from controller.ike.message import parse_message
from controller.ike.payloads import AuthPayload, CertPayload, CertReqPayload
from controller.ike.state import IkeState
from tests.test_ike_sa import I_ADDR, R_ADDR, configs, events, roundtrip, seeded

NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)
ID_A, ID_B = "gw-a.example.net", "gw-b.example.net"
KINDS = ("rsa", "rsa-pss", "p256", "p384", "p521", "ed25519", "ed448")


# -- a PKI ---------------------------------------------------------------------------------------
@functools.cache
def new_key(kind: str, label: str = "") -> auth.PrivateKey:
    """A key of ``kind`` (cached per label: RSA key generation is slow)."""
    if kind in ("rsa", "rsa-pss"):
        return rsa.generate_private_key(65537, 2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "ed448":
        return ed448.Ed448PrivateKey.generate()
    curve = {"p256": ec.SECP256R1(), "p384": ec.SECP384R1(), "p521": ec.SECP521R1()}[kind]
    return ec.generate_private_key(curve)


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: auth.PrivateKey

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self, traditional: bool = False) -> bytes:
        form = (serialization.PrivateFormat.TraditionalOpenSSL if traditional
                else serialization.PrivateFormat.PKCS8)
        return self.key.private_bytes(serialization.Encoding.PEM, form,
                                      serialization.NoEncryption())


def dn(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "espline"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issue(cn: str, key: auth.PrivateKey, issuer: Issued | None = None, *, ca: bool = False,
          sans: Sequence[x509.GeneralName] = (), now: dt.datetime = NOW,
          valid: tuple[float, float] = (-30, 365), path_length: int | None = None,
          basic_constraints: bool = True, extra: Sequence[x509.ExtensionType] = (),
          pss: bool = False) -> Issued:
    """A certificate for ``key``; self-signed without ``issuer``. ``valid`` is in days."""
    signer = key if issuer is None else issuer.key
    b = (x509.CertificateBuilder()
         .subject_name(dn(cn))
         .issuer_name(dn(cn) if issuer is None else issuer.cert.subject)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now + dt.timedelta(days=valid[0]))
         .not_valid_after(now + dt.timedelta(days=valid[1]))
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False))
    if issuer is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer.key.public_key()), False)  # type: ignore[arg-type]
    if basic_constraints:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), True)
    if ca:
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                          False), True)
    else:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                          False), True)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), False)
    for ext in extra:
        b = b.add_extension(ext, True)
    algorithm: hashes.HashAlgorithm | None = hashes.SHA256()
    if isinstance(signer, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        algorithm = None
    elif isinstance(signer, ec.EllipticCurvePrivateKey) and signer.curve.key_size > 256:
        algorithm = hashes.SHA384() if signer.curve.key_size == 384 else hashes.SHA512()
    kwargs: dict[str, Any] = {}
    if pss:
        kwargs["rsa_padding"] = padding.PSS(padding.MGF1(hashes.SHA256()),
                                            padding.PSS.DIGEST_LENGTH)
    return Issued(b.sign(signer, algorithm, **kwargs), key)


def fqdn_sans(name: str) -> list[x509.GeneralName]:
    return [x509.DNSName(name)]


@dataclass
class Pki:
    """A root CA, an intermediate CA under it, and end entities under the intermediate."""

    kind: str = "p256"
    now: dt.datetime = NOW
    label: str = ""  # another label, other keys (the same subjects)

    def __post_init__(self) -> None:
        self.issued: dict[str, Issued] = {}
        ca_kind = "rsa" if self.kind == "rsa-pss" else self.kind
        self.root = issue("Root CA", new_key(ca_kind, self.label + "root"), ca=True,
                          now=self.now)
        self.sub = issue("Sub CA", new_key(ca_kind, self.label + "sub"), self.root, ca=True,
                         now=self.now,
                         pss=self.kind == "rsa-pss")

    def end_entity(self, name: str, *, sans: Sequence[x509.GeneralName] | None = None,
                   **kw: Any) -> Issued:
        """The certificate of ``name`` (the same one each time, unless ``kw`` asks for
        another), with ``name`` as its CN and DNS subjectAltName."""
        if sans is None and not kw and name in self.issued:
            return self.issued[name]
        ee = issue(name, new_key(self.kind, self.label + name), self.sub,
                   sans=fqdn_sans(name) if sans is None else sans, now=self.now,
                   pss=self.kind == "rsa-pss", **kw)
        if sans is None and not kw:
            self.issued[name] = ee
        return ee

    def credential(self, ee: Issued) -> auth.Credential:
        return auth.Credential(ee.key, (ee.cert, self.sub.cert), rsa_pss=self.kind == "rsa-pss")

    def trust(self) -> auth.TrustAnchors:
        return auth.TrustAnchors((self.root.cert,))


# -- the in-memory pair ---------------------------------------------------------------------------
def cert_configs(pki: Pki, *, i_ee: Issued | None = None, r_ee: Issued | None = None,
                 **overrides: dict[str, Any]) -> tuple[IkeConfig, IkeConfig]:
    i_ee = i_ee or pki.end_entity(ID_A)
    r_ee = r_ee or pki.end_entity(ID_B)
    i_over = {"psk": b"", "credential": pki.credential(i_ee), "trust": pki.trust(),
              **overrides.get("initiator", {})}
    r_over = {"psk": b"", "credential": pki.credential(r_ee), "trust": pki.trust(),
              **overrides.get("responder", {})}
    return configs(initiator=i_over, responder=r_over)


def pair(i_cfg: IkeConfig, r_cfg: IkeConfig, now: dt.datetime = NOW) -> tuple[IkeSa, IkeSa]:
    def clock() -> float:
        return now.timestamp()

    i = IkeSa(i_cfg, initiator=True, local=I_ADDR, remote=R_ADDR, random=seeded(1),
              wall_clock=clock)
    r = IkeSa(r_cfg, initiator=False, local=R_ADDR, remote=I_ADDR, random=seeded(2),
              wall_clock=clock)
    return i, r


def run(i_cfg: IkeConfig, r_cfg: IkeConfig, trace: list[bytes] | None = None
        ) -> tuple[IkeSa, IkeSa, list[object], list[object]]:
    i, r = pair(i_cfg, r_cfg)
    i.initiate(0.0)
    if trace is None:
        roundtrip(i, r)
    else:
        sent: list[Any] = []
        roundtrip(i, r, trace=sent)
        trace += [s.data for s in sent]
    return i, r, events(i), events(r)


def assert_auth_failed(ei: list[object], er: list[object], *, responder: bool = True) -> None:
    assert isinstance(ei[-1], IkeSaFailed), ei
    assert ei[-1].notify == NotifyType.AUTHENTICATION_FAILED
    if responder:
        assert isinstance(er[-1], IkeSaFailed), er
        assert er[-1].notify == NotifyType.AUTHENTICATION_FAILED


@pytest.fixture
def signatures(monkeypatch: pytest.MonkeyPatch) -> list[AuthPayload]:
    """Every AUTH payload ``auth.sign`` produces, in order (initiator's first)."""
    made: list[AuthPayload] = []
    real = auth.sign

    def spy(credential: auth.Credential, octets: bytes, peer: frozenset[int] | None
            ) -> AuthPayload:
        payload = real(credential, octets, peer)
        made.append(payload)
        return payload

    monkeypatch.setattr(auth, "sign", spy)
    return made


# RFC 7427 Appendix A: the AlgorithmIdentifiers of sha256WithRSAEncryption (A.1.2) and of
# ecdsa-with-SHA256/384/512 (A.3); RFC 8420 §2 (with RFC 8410 §3): Ed25519.
RSA_SHA256 = bytes.fromhex("300d06092a864886f70d01010b0500")
ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
ECDSA_SHA384 = bytes.fromhex("300a06082a8648ce3d040303")
ECDSA_SHA512 = bytes.fromhex("300a06082a8648ce3d040304")
ED25519 = bytes.fromhex("300506032b6570")
ED448 = bytes.fromhex("300506032b6571")
RSASSA_PSS_OID = bytes.fromhex("06092a864886f70d01010a")
EXPECTED_ALGID = {"rsa": RSA_SHA256, "p256": ECDSA_SHA256, "p384": ECDSA_SHA384,
                  "p521": ECDSA_SHA512, "ed25519": ED25519, "ed448": ED448}


def algorithm_identifier(payload: AuthPayload) -> bytes:
    return payload.data[1:1 + payload.data[0]]


@pytest.mark.parametrize("kind", KINDS)
def test_certificates_authenticate_both_sides(kind: str, signatures: list[AuthPayload]) -> None:
    pki = Pki(kind)
    i, r, ei, er = run(*cert_configs(pki))
    assert i.state is IkeState.ESTABLISHED and r.state is IkeState.ESTABLISHED, (ei, er)
    assert [type(e) for e in ei] == [IkeSaEstablished, ChildSaEstablished]
    assert [type(e) for e in er] == [IkeSaEstablished, ChildSaEstablished]
    ci, cr = ei[1], er[1]
    assert isinstance(ci, ChildSaEstablished) and isinstance(cr, ChildSaEstablished)
    assert ci.enc_key_out == cr.enc_key_in and ci.enc_key_in == cr.enc_key_out
    # Both announced SIGNATURE_HASH_ALGORITHMS, so both signed with RFC 7427 (method 14)
    assert [s.method for s in signatures] == [AuthMethod.DIGITAL_SIGNATURE] * 2
    for s in signatures:
        algid = algorithm_identifier(s)
        if kind == "rsa-pss":
            # RFC 8017 A.2.3: rsassaPss, hash SHA-256, MGF1 with SHA-256, salt 32 (RFC 7427 §3)
            assert algid[2:2 + len(RSASSA_PSS_OID)] == RSASSA_PSS_OID
            assert algid.endswith(bytes.fromhex("a203020120"))
        else:
            assert algid == EXPECTED_ALGID[kind]


def test_each_side_may_use_its_own_method() -> None:
    """RFC 7296 §2.15: the initiator uses the shared key, the responder its certificate."""
    pki = Pki("p256")
    i_cfg, r_cfg = cert_configs(pki, initiator={"psk": b"k" * 20, "credential": None},
                                responder={"psk": b"k" * 20, "trust": None})
    i, r, ei, er = run(i_cfg, r_cfg)
    assert i.state is IkeState.ESTABLISHED and r.state is IkeState.ESTABLISHED, (ei, er)


def test_legacy_methods_when_the_peer_announces_no_hashes(
        monkeypatch: pytest.MonkeyPatch, signatures: list[AuthPayload]) -> None:
    """No SIGNATURE_HASH_ALGORITHMS from the peer: RFC 7296 §3.8 method 9 (RFC 4754)."""
    monkeypatch.setattr(auth, "signature_hash_algorithms",
                        lambda: auth.NotifyPayload(40960, b""))  # a private-use status notify
    i, r, ei, er = run(*cert_configs(Pki("p256")))
    assert i.state is IkeState.ESTABLISHED and r.state is IkeState.ESTABLISHED, (ei, er)
    assert [s.method for s in signatures] == [AuthMethod.ECDSA_SHA256_P256] * 2
    assert [len(s.data) for s in signatures] == [64, 64]  # r | s, 32 octets each


def test_ed25519_towards_a_peer_without_rfc7427(monkeypatch: pytest.MonkeyPatch) -> None:
    """No legacy method signs with Ed25519: the initiator gives up before IKE_AUTH, without
    an exception."""
    monkeypatch.setattr(auth, "signature_hash_algorithms",
                        lambda: auth.NotifyPayload(40960, b""))
    i, r, ei, er = run(*cert_configs(Pki("ed25519")))
    assert i.state is IkeState.FAILED and isinstance(ei[-1], IkeSaFailed)
    assert "cannot authenticate to the peer" in ei[-1].reason
    assert r.state is IkeState.INIT_DONE  # a half-open SA, until its timer


@pytest.mark.parametrize("kind", ["rsa", "p256", "p384", "p521"])
def test_legacy_signatures_round_trip(kind: str) -> None:
    pki = Pki(kind)
    ee = pki.end_entity(ID_A)
    payload = auth.sign(pki.credential(ee), b"octets", None)
    expected = {"rsa": AuthMethod.RSA_DIGITAL_SIGNATURE, "p256": AuthMethod.ECDSA_SHA256_P256,
                "p384": AuthMethod.ECDSA_SHA384_P384, "p521": AuthMethod.ECDSA_SHA512_P521}
    assert payload.method == expected[kind]
    auth.verify(ee.cert.public_key(), payload, b"octets")
    with pytest.raises(AuthenticationFailed):
        auth.verify(ee.cert.public_key(), payload, b"other octets")


def test_ed25519_needs_the_identity_hash() -> None:
    pki = Pki("ed25519")
    cred = pki.credential(pki.end_entity(ID_A))
    with pytest.raises(AuthenticationFailed, match="EdDSA"):
        auth.sign(cred, b"x", frozenset({2, 3, 4}))
    with pytest.raises(AuthenticationFailed, match="RFC 7427"):
        auth.sign(cred, b"x", None)
    pss = Pki("rsa-pss")  # configured for PSS: no quiet fallback to PKCS#1 v1.5 with SHA-1
    with pytest.raises(AuthenticationFailed, match="RSASSA-PSS needs RFC 7427"):
        auth.sign(pss.credential(pss.end_entity(ID_A)), b"x", None)


def test_signature_hash_follows_the_peer() -> None:
    pki = Pki("p256")
    cred = pki.credential(pki.end_entity(ID_A))
    assert algorithm_identifier(auth.sign(cred, b"x", frozenset({4}))) == ECDSA_SHA512
    with pytest.raises(AuthenticationFailed, match="SHA-2"):
        auth.sign(cred, b"x", frozenset({1, 5}))


# -- identities bound to the certificate ------------------------------------------------------
KEY = new_key("p256", "identities")
IDENTITY_CERT = Pki("p256")
IDENTITY_EE = issue("gw-a", KEY, IDENTITY_CERT.sub, sans=[
    x509.DNSName(ID_A), x509.RFC822Name("vpn@example.net"),
    x509.IPAddress(ipaddress.ip_address("192.0.2.1")),
    x509.IPAddress(ipaddress.ip_address("2001:db8::1"))])


def _key_ids() -> tuple[bytes, bytes]:
    spki = KEY.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return (hashlib.sha1(spki).digest(),
            x509.SubjectKeyIdentifier.from_public_key(KEY.public_key()).digest)


# The DN as strongSwan encodes it from "C=CH, O=espline, CN=GW-A": PrintableStrings, where the
# certificate has UTF8Strings (cryptography's default) and lower case; the same name all the
# same (RFC 5280 §7.1, RFC 4518 case folding).
def _printable_dn() -> bytes:
    def atv(oid: str, value: bytes) -> bytes:
        oid_der = {"C": "0603550406", "O": "060355040a", "CN": "0603550403"}[oid]
        inner = bytes.fromhex(oid_der) + bytes([0x13, len(value)]) + value
        seq = bytes([0x30, len(inner)]) + inner
        return bytes([0x31, len(seq)]) + seq

    body = atv("C", b"CH") + atv("O", b"espline") + atv("CN", b"GW-A")  # case differs too
    return bytes([0x30, len(body)]) + body


@pytest.mark.parametrize(("id_type", "data"), [
    (IdType.ID_FQDN, ID_A.encode()),
    (IdType.ID_FQDN, ID_A.upper().encode()),
    (IdType.ID_RFC822_ADDR, b"vpn@example.net"),
    (IdType.ID_IPV4_ADDR, bytes([192, 0, 2, 1])),
    (IdType.ID_IPV6_ADDR, ipaddress.ip_address("2001:db8::1").packed),
    (IdType.ID_DER_ASN1_DN, dn("gw-a").public_bytes()),
    (IdType.ID_DER_ASN1_DN, _printable_dn()),
    (IdType.ID_KEY_ID, _key_ids()[0]),
    (IdType.ID_KEY_ID, _key_ids()[1]),
], ids=["fqdn", "fqdn-case", "rfc822", "ipv4", "ipv6", "dn", "dn-printable", "keyid-spki",
        "keyid-ski"])
def test_identity_types_bound_to_the_certificate(id_type: IdType, data: bytes) -> None:
    assert auth.identity_in_certificate(id_type, data, IDENTITY_EE.cert)
    pki = IDENTITY_CERT
    i_cfg, r_cfg = cert_configs(pki, i_ee=IDENTITY_EE, initiator={"local_id": (id_type, data)},
                                responder={"remote_id": (id_type, data)})
    i, r, ei, er = run(i_cfg, r_cfg)
    assert i.state is IkeState.ESTABLISHED and r.state is IkeState.ESTABLISHED, (ei, er)
    # A responder that takes any identity takes this one too
    i, r, ei, er = run(i_cfg, replace(r_cfg, remote_id=None))
    assert r.state is IkeState.ESTABLISHED, er


@pytest.mark.parametrize(("id_type", "data"), [
    (IdType.ID_FQDN, b"gw-b.example.net"),
    (IdType.ID_FQDN, b"example.net"),
    (IdType.ID_RFC822_ADDR, b"other@example.net"),
    (IdType.ID_IPV4_ADDR, bytes([192, 0, 2, 2])),
    (IdType.ID_IPV4_ADDR, b"\xc0\x00"),
    (IdType.ID_DER_ASN1_DN, dn("gw-b").public_bytes()),
    (IdType.ID_DER_ASN1_DN, b"\x30\x80garbage"),
    (IdType.ID_KEY_ID, b"\x00" * 20),
    (IdType.ID_DER_ASN1_GN, b""),
    (IdType.ID_NULL, b""),
])
def test_identities_not_in_the_certificate(id_type: IdType, data: bytes) -> None:
    assert not auth.identity_in_certificate(id_type, data, IDENTITY_EE.cert)


# -- failures: AUTHENTICATION_FAILED, never an exception ---------------------------------------
def test_wrong_ca() -> None:
    pki, other = Pki("p256"), Pki("p256", label="other")
    i, r, ei, er = run(*cert_configs(pki, responder={"trust": other.trust()}))
    assert_auth_failed(ei, er)
    assert isinstance(er[-1], IkeSaFailed) and "not issued by a trusted CA" in er[-1].reason


@pytest.mark.parametrize(("valid", "words"), [((-30, -1), "expired"),
                                              ((1, 30), "not valid before")])
def test_certificate_outside_its_validity(valid: tuple[float, float], words: str) -> None:
    pki = Pki("p256")
    i, r, ei, er = run(*cert_configs(pki, i_ee=pki.end_entity(ID_A, valid=valid)))
    assert_auth_failed(ei, er)
    assert isinstance(er[-1], IkeSaFailed) and words in er[-1].reason


def test_responder_certificate_rejected_by_the_initiator() -> None:
    pki = Pki("p256")
    i, r, ei, er = run(*cert_configs(pki, r_ee=pki.end_entity(ID_B, valid=(-30, -1))))
    assert_auth_failed(ei, er, responder=False)
    assert isinstance(ei[-1], IkeSaFailed) and "expired" in ei[-1].reason


def test_identity_not_in_the_certificate() -> None:
    pki = Pki("p256")
    i_cfg, r_cfg = cert_configs(pki, initiator={
        "local_id": (IdType.ID_FQDN, b"intruder.example.net")}, responder={"remote_id": None})
    i, r, ei, er = run(i_cfg, r_cfg)
    assert_auth_failed(ei, er)
    assert isinstance(er[-1], IkeSaFailed) and "not in its certificate" in er[-1].reason


def test_bad_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    pki = Pki("p256")
    i_cfg, r_cfg = cert_configs(pki)
    real = auth.sign

    def flipped(credential: auth.Credential, octets: bytes, peer: frozenset[int] | None
                ) -> AuthPayload:
        payload = real(credential, octets, peer)
        if credential is i_cfg.credential:
            data = bytearray(payload.data)
            data[-5] ^= 0x01  # one bit of the signature value
            payload = AuthPayload(payload.method, bytes(data))
        return payload

    monkeypatch.setattr(auth, "sign", flipped)
    i, r, ei, er = run(i_cfg, r_cfg)
    assert_auth_failed(ei, er)


def test_wrong_key() -> None:
    pki = Pki("p256")
    cred = pki.credential(pki.end_entity(ID_A))
    with pytest.raises(ValueError, match="does not belong"):
        auth.Credential(new_key("p256", "intruder"), cred.certs)
    object.__setattr__(cred, "key", new_key("p256", "intruder"))  # past the check
    i, r, ei, er = run(*cert_configs(pki, initiator={"credential": cred}))
    assert_auth_failed(ei, er)
    assert isinstance(er[-1], IkeSaFailed) and "does not verify" in er[-1].reason


def test_key_of_another_type_than_the_signature() -> None:
    ec_ee = Pki("p256").end_entity(ID_A)
    rsa_pki = Pki("rsa")
    payload = auth.sign(rsa_pki.credential(rsa_pki.end_entity(ID_A)), b"x", frozenset({2}))
    with pytest.raises(AuthenticationFailed, match="not RSA"):
        auth.verify(ec_ee.cert.public_key(), payload, b"x")


def test_missing_intermediate() -> None:
    pki = Pki("p256")
    ee = pki.end_entity(ID_A)
    i, r, ei, er = run(*cert_configs(pki, initiator={
        "credential": auth.Credential(ee.key, (ee.cert,))}))
    assert_auth_failed(ei, er)


def test_psk_where_a_certificate_is_expected() -> None:
    pki = Pki("p256")
    i, r, ei, er = run(*cert_configs(pki, initiator={"credential": None, "psk": b"k" * 20},
                                     responder={"psk": b"k" * 20}))
    assert_auth_failed(ei, er)
    assert isinstance(er[-1], IkeSaFailed) and "pre-shared key" in er[-1].reason


def test_signature_where_a_psk_is_expected() -> None:
    pki = Pki("p256")
    i, r, ei, er = run(*cert_configs(pki, responder={"trust": None, "psk": b"k" * 20}))
    assert_auth_failed(ei, er)


@pytest.mark.parametrize("defect", ["path-length", "not-ca", "no-basic-constraints",
                                    "critical-unknown", "ee-no-digital-signature",
                                    "critical-eku-without-ike", "self-signed"])
def test_chain_defects(defect: str) -> None:
    pki = Pki("p256")
    key = new_key("p256", ID_A)
    sans = fqdn_sans(ID_A)
    chain: tuple[x509.Certificate, ...]
    if defect == "path-length":
        root = issue("Root CA", new_key("p256", "root"), ca=True, path_length=0)
        sub = issue("Sub CA", new_key("p256", "sub"), root, ca=True)
        ee = issue(ID_A, key, sub, sans=sans)
        trust = auth.TrustAnchors((root.cert,))
        chain = (ee.cert, sub.cert)
    else:
        trust = pki.trust()
        sub = pki.sub
        if defect in ("not-ca", "no-basic-constraints"):
            sub = issue("Sub CA", new_key("p256", "sub"), pki.root, ca=False,
                        basic_constraints=defect == "not-ca")
        extra: list[x509.ExtensionType] = []
        if defect == "critical-unknown":
            extra = [x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"),
                                                b"\x05\x00")]
        if defect == "critical-eku-without-ike":
            extra = [x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CODE_SIGNING])]
        ee = issue(ID_A, key, sub, sans=sans, extra=extra)
        if defect == "ee-no-digital-signature":
            ee = Issued(_without_digital_signature(ee, sub), key)
        if defect == "self-signed":
            ee = issue(ID_A, key, sans=sans)
        chain = (ee.cert, sub.cert)
    with pytest.raises(AuthenticationFailed):
        auth.validate_chain([CertPayload(CertEncoding.X509_CERT_SIGNATURE, c.public_bytes(
            serialization.Encoding.DER)) for c in chain], trust, NOW)
    i, r, ei, er = run(*cert_configs(pki, initiator={
        "credential": auth.Credential(key, chain)}, responder={"trust": trust}))
    assert_auth_failed(ei, er)


def _without_digital_signature(ee: Issued, issuer: Issued) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(ee.cert.subject).issuer_name(ee.cert.issuer)
         .public_key(ee.key.public_key()).serial_number(1)
         .not_valid_before(ee.cert.not_valid_before_utc)
         .not_valid_after(ee.cert.not_valid_after_utc)
         .add_extension(x509.KeyUsage(False, False, True, False, False, False, False, False,
                                      False), True))
    return b.sign(issuer.key, hashes.SHA256())  # type: ignore[arg-type]


def test_a_maze_of_look_alike_cas_stays_cheap() -> None:
    """Seven CA certificates with one name and one key each 'issue' all the others: the path
    search checks each signature once and gives up after MAX_PATH_VISITS nodes."""
    key = new_key("p256", "maze")
    cas = [issue("Sub CA", key, ca=True, valid=(-30, 300 + n)) for n in range(7)]
    ee = issue(ID_A, new_key("p256", ID_A), cas[0], sans=fqdn_sans(ID_A))
    payloads = [CertPayload(CertEncoding.X509_CERT_SIGNATURE,
                            c.cert.public_bytes(serialization.Encoding.DER))
                for c in (ee, *cas)]
    started = time.monotonic()
    with pytest.raises(AuthenticationFailed, match="not issued by a trusted CA"):
        auth.validate_chain(payloads, Pki("p256").trust(), NOW)
    assert time.monotonic() - started < 2.0


def test_a_critical_eku_with_ipsec_ike_is_fine() -> None:
    pki = Pki("p256")
    ee = pki.end_entity(ID_A, extra=[x509.ExtendedKeyUsage(
        [x509.oid.ExtendedKeyUsageOID.IPSEC_IKE])])
    i, r, ei, er = run(*cert_configs(pki, i_ee=ee))
    assert r.state is IkeState.ESTABLISHED, er


def test_the_peer_may_send_unrelated_certificates_too() -> None:
    pki, other = Pki("p256"), Pki("p256", label="other")
    ee = pki.end_entity(ID_A)
    cred = auth.Credential(ee.key, (ee.cert, other.sub.cert, other.root.cert, pki.sub.cert))
    i, r, ei, er = run(*cert_configs(pki, initiator={"credential": cred}))
    assert r.state is IkeState.ESTABLISHED, er


# -- on the wire: SIGNATURE_HASH_ALGORITHMS, CERTREQ, CERT -------------------------------------
def test_ike_sa_init_carries_hash_algorithms_and_certreq() -> None:
    pki, other = Pki("p256"), Pki("rsa")
    trust = auth.TrustAnchors((pki.root.cert, other.root.cert))
    trace: list[bytes] = []
    i, r, ei, er = run(*cert_configs(pki, responder={"trust": trust}), trace=trace)
    assert r.state is IkeState.ESTABLISHED
    request, response = (parse_message(m) for m in trace[:2])
    for message in (request, response):
        notify = message.notify(NotifyType.SIGNATURE_HASH_ALGORITHMS)
        assert notify is not None and notify.data == bytes.fromhex("0002000300040005")
    assert request.find(CertReqPayload) is None  # RFC 7296 §1.2: the initiator's is in IKE_AUTH
    certreq = response.find(CertReqPayload)
    assert certreq is not None and certreq.encoding == CertEncoding.X509_CERT_SIGNATURE

    def spki_sha1(cert: x509.Certificate) -> bytes:
        return hashlib.sha1(cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        ).digest()

    # RFC 7296 §3.7: concatenated SHA-1 hashes of each CA's SubjectPublicKeyInfo
    assert certreq.certification_authority == spki_sha1(pki.root.cert) + spki_sha1(
        other.root.cert)


def test_psk_only_ike_sa_init_is_unchanged() -> None:
    trace: list[bytes] = []
    i_cfg, r_cfg = configs()
    i, r, ei, er = run(i_cfg, r_cfg, trace=trace)
    for m in trace[:2]:
        message = parse_message(m)
        assert message.notify(NotifyType.SIGNATURE_HASH_ALGORITHMS) is None
        assert message.find(CertReqPayload) is None


def test_ike_auth_sends_the_chain_and_a_certreq(monkeypatch: pytest.MonkeyPatch) -> None:
    """RFC 7296 §1.2: IDi, CERT (end entity first, RFC 7296 §3.6), CERTREQ, IDr, AUTH."""
    pki = Pki("p256")
    seen: list[Sequence[CertPayload]] = []
    real = auth.validate_chain

    def spy(certs: Sequence[CertPayload], anchors: auth.TrustAnchors, when: dt.datetime
            ) -> x509.Certificate:
        seen.append(certs)
        assert when == NOW  # the wall clock the IkeSa was given
        return real(certs, anchors, when)

    monkeypatch.setattr(auth, "validate_chain", spy)
    i_cfg, r_cfg = cert_configs(pki)
    i, r, ei, er = run(i_cfg, r_cfg)
    assert i.state is IkeState.ESTABLISHED
    der = serialization.Encoding.DER
    assert i_cfg.credential is not None and r_cfg.credential is not None
    assert [c.data for c in seen[0]] == [c.public_bytes(der) for c in i_cfg.credential.certs]
    assert [c.data for c in seen[1]] == [c.public_bytes(der) for c in r_cfg.credential.certs]


# -- peer input that cannot be parsed: AuthenticationFailed and nothing else -------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=300))
def test_arbitrary_auth_data_fails_cleanly(method: int, data: bytes) -> None:
    key = new_key("p256", ID_A).public_key()
    with pytest.raises(AuthenticationFailed):
        auth.verify(key, AuthPayload(method, data), b"octets")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=400), max_size=4))
def test_arbitrary_cert_payloads_fail_cleanly(blobs: list[bytes]) -> None:
    certs = [CertPayload(CertEncoding.X509_CERT_SIGNATURE, b) for b in blobs]
    with pytest.raises(AuthenticationFailed):
        auth.validate_chain(certs, Pki("p256").trust(), NOW)


@pytest.mark.parametrize("cut", [1, 10, -20, -1])
def test_truncated_rfc7427_signatures_fail_cleanly(cut: int) -> None:
    for kind in ("rsa-pss", "p256", "ed25519"):
        pki = Pki(kind)
        ee = pki.end_entity(ID_A)
        payload = auth.sign(pki.credential(ee), b"x", frozenset({2, 5}))
        with pytest.raises(AuthenticationFailed):
            auth.verify(ee.cert.public_key(), AuthPayload(payload.method, payload.data[:cut]),
                        b"x")


def test_pss_parameters_with_an_explicit_trailer_field() -> None:
    """RSASSA-PSS-params may carry trailerField 1 explicitly (RFC 7427 Appendix A.4)."""
    pki = Pki("rsa-pss")
    ee = pki.end_entity(ID_A)
    payload = auth.sign(pki.credential(ee), b"x", frozenset({2}))
    algid = algorithm_identifier(payload)
    params_at = 2 + len(RSASSA_PSS_OID)
    params = algid[params_at + 2:] + bytes.fromhex("a303020101")
    new_algid = (bytes([0x30, len(RSASSA_PSS_OID) + 2 + len(params)]) + RSASSA_PSS_OID
                 + bytes([0x30, len(params)]) + params)
    signature = payload.data[1 + payload.data[0]:]
    auth.verify(ee.cert.public_key(), AuthPayload(14, bytes([len(new_algid)]) + new_algid
                                                  + signature), b"x")


def test_dn_equal() -> None:
    assert auth.dn_equal(dn("gw-a").public_bytes(), _printable_dn())
    assert not auth.dn_equal(dn("gw-a").public_bytes(), dn("gw-b").public_bytes())
    assert not auth.dn_equal(b"\x30\x03\x31\x01", dn("gw-a").public_bytes())


# -- configuration: files, errors, no key material in reprs ------------------------------------
@dataclass
class Files:
    tmp: Path
    pki: Pki

    def write(self, name: str, data: bytes) -> str:
        path = self.tmp / name
        path.write_bytes(data)
        return str(path)


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path, Pki("p256", now=dt.datetime.now(dt.UTC)))


def yaml_conn(files: Files, local: dict[str, Any] | None = None,
              remote: dict[str, Any] | None = None) -> dict[str, Any]:
    ee = files.pki.end_entity(ID_A)
    base_local = {"auth": "pubkey", "id": ID_A,
                  "certs": [files.write("gw-a.pem", ee.pem() + files.pki.sub.pem())],
                  "key": files.write("gw-a.key", ee.key_pem(traditional=True))}
    return {
        "local_addrs": ["192.0.2.1"], "remote_addrs": ["192.0.2.2"],
        "local": {**base_local, **(local or {})},
        "remote": {"auth": "pubkey", "id": ID_B, **(remote or {})},
        "children": {"lan": {"local_ts": ["10.1.0.0/24"], "remote_ts": ["10.2.0.0/24"]}},
    }


def test_config_loads_certificates_keys_and_authorities(files: Files) -> None:
    ca = files.write("ca.pem", files.pki.root.pem())
    cfg = parse_config({"authorities": {"corp": {"cacert": ca}},
                        "connections": {"site": yaml_conn(files)}}, allowed_cpus=[0])
    conn = cfg.conns["site"]
    ike = ike_config(conn, PskStore())
    assert ike.psk == b"" and ike.credential is not None and ike.trust is not None
    assert ike.credential.certs == (files.pki.end_entity(ID_A).cert, files.pki.sub.cert)
    assert ike.trust.cas == (files.pki.root.cert,)
    assert ike.local_id == (IdType.ID_FQDN, ID_A.encode())
    # Key material stays out of reprs
    key_der = conn.local.key_der
    for text in (repr(conn), repr(cfg), repr(ike), repr(ike.credential)):
        assert key_der.hex() not in text and "PRIVATE KEY" not in text
        assert str(key_der) not in text
    # The two built from it authenticate each other
    b_ee = files.pki.end_entity(ID_B)
    b_cfg = replace(ike, local_id=(IdType.ID_FQDN, ID_B.encode()),
                    remote_id=(IdType.ID_FQDN, ID_A.encode()),
                    credential=files.pki.credential(b_ee))
    a_cfg = replace(ike, child=configs()[0].child, children=())
    b_cfg = replace(b_cfg, child=configs()[1].child, children=())
    i, r, ei, er = _run_now(a_cfg, b_cfg)
    assert i.state is IkeState.ESTABLISHED and r.state is IkeState.ESTABLISHED, (ei, er)


def _run_now(i_cfg: IkeConfig, r_cfg: IkeConfig) -> tuple[IkeSa, IkeSa, list[object],
                                                          list[object]]:
    i, r = pair(i_cfg, r_cfg, now=dt.datetime.now(dt.UTC))
    i.initiate(0.0)
    roundtrip(i, r)
    return i, r, events(i), events(r)


def test_config_defaults_and_variants(files: Files) -> None:
    ca_pem = files.pki.root.pem().decode()
    ee = files.pki.end_entity(ID_A)
    # No id: the certificate's subject DN; CA certificates as inline PEM
    local = {k: v for k, v in yaml_conn(files)["local"].items() if k != "id"}
    conn = parse_connection("x", {**yaml_conn(files), "local": local,
                                  "remote": {"auth": "pubkey", "cacerts": [ca_pem]}})
    assert conn.local_id.type is IdType.ID_DER_ASN1_DN
    assert conn.local_id.data == ee.cert.subject.public_bytes()
    assert conn.local_id.text == "C=CH, O=espline, CN=gw-a.example.net"
    assert conn.remote.cacerts == ("<inline PEM>",) and conn.remote.id is None
    # A DN id is sent as the certificate encodes it
    conn = parse_connection("x", yaml_conn(files, local={"id": "C=CH, O=espline, "
                                                               "CN=gw-a.example.net"},
                                           remote={"cacerts": [ca_pem]}))
    assert conn.local_id.data == ee.cert.subject.public_bytes()
    # A DER certificate and a PKCS#8 DER key work as well as PEM
    der_cert = files.write("ee.der", ee.cert.public_bytes(serialization.Encoding.DER))
    der_key = files.write("ee.key.der", ee.key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    conn = parse_connection("x", yaml_conn(files, local={"certs": der_cert, "key": der_key},
                                           remote={"cacerts": [ca_pem]}))
    cred = conn.local.credential()
    assert cred is not None and cred.certs == (ee.cert,)


def _error(files: Files, mutate: Callable[[dict[str, Any]], None],
           authorities: dict[str, Any] | None = None) -> ConfigError:
    conn = yaml_conn(files)
    mutate(conn)
    ca = files.write("ca.pem", files.pki.root.pem())
    with pytest.raises(ConfigError) as info:
        parse_config({"authorities": authorities if authorities is not None else {
            "corp": {"cacert": ca}}, "connections": {"x": conn}}, allowed_cpus=[0])
    return info.value


@pytest.mark.parametrize(("name", "path", "reason"), [
    ("missing", "connections.x.local.certs[0]", "cannot read: No such file"),
    ("not-cert", "connections.x.local.certs[0]", "not an X.509 certificate"),
    ("key-mismatch", "connections.x.local.key", "does not belong to the certificate"),
    ("key-missing", "connections.x.local.key", "required"),
    ("key-garbage", "connections.x.local.key", "not a private key"),
    ("key-encrypted", "connections.x.local.key", "encrypted private keys are not supported"),
    ("id-not-in-cert", "connections.x.local.id", "is not in the certificate"),
    ("no-certs", "connections.x.local.auth", "not supported yet"),
    ("pss-ec", "connections.x.local.auth", "rsa/pss needs an RSA key"),
    ("remote-pss", "connections.x.remote.auth", "local setting"),
    ("remote-certs", "connections.x.remote.certs", "not supported yet"),
    ("remote-cacert-not-ca", "connections.x.remote.cacerts[0]", "not a CA certificate"),
    ("local-cacerts", "connections.x.local.cacerts", "remote side"),
])
def test_config_errors_name_the_key_and_the_reason(files: Files, name: str, path: str,
                                                   reason: str) -> None:
    def mutate(c: dict[str, Any]) -> None:
        local, remote = c["local"], c["remote"]
        if name == "missing":
            local["certs"] = [str(files.tmp / "absent.pem")]
        elif name == "not-cert":
            local["certs"] = [files.write("junk.pem", b"hello")]
        elif name == "key-mismatch":
            local["key"] = files.write("other.key", Issued(files.pki.root.cert, new_key(
                "p256", "other")).key_pem())
        elif name == "key-missing":
            del local["key"]
        elif name == "key-garbage":
            local["key"] = files.write("bad.key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"
                                                  b"-----END PRIVATE KEY-----\n")
        elif name == "key-encrypted":
            key = new_key("p256", ID_A).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret passphrase"))
            local["key"] = files.write("enc.key", key)
        elif name == "id-not-in-cert":
            local["id"] = "gw-z.example.net"
        elif name == "no-certs":
            del local["certs"]
        elif name == "pss-ec":
            local["auth"] = "rsa/pss"
        elif name == "remote-pss":
            remote["auth"] = "rsa/pss"
        elif name == "remote-certs":
            remote["certs"] = local["certs"]
        elif name == "remote-cacert-not-ca":
            remote["cacerts"] = local["certs"][:1]
        elif name == "local-cacerts":
            local["cacerts"] = ["ca.pem"]

    err = _error(files, mutate)
    assert err.path == path, err
    assert reason in err.reason, err
    assert "PRIVATE" not in err.reason and "AAAA" not in err.reason


@pytest.mark.parametrize(("authorities", "path", "reason"), [
    ({}, "connections.x.remote.auth", "needs CA certificates"),
    ({"corp": {}}, "authorities.corp.cacert", "required"),
    ({"corp": {"cacert": "/nonexistent/ca.pem"}}, "authorities.corp.cacert", "cannot read"),
    ({"corp": {"cacert": "EE"}}, "authorities.corp.cacert", "not a CA certificate"),
    ({"corp": {"cacert": "CA", "crl_uris": ["http://crl"], "handle": "0x1"}},
     "authorities.corp.handle", "not a key espline knows"),
])
def test_authority_errors(files: Files, authorities: dict[str, Any], path: str,
                          reason: str) -> None:
    for value in authorities.values():
        if value.get("cacert") == "EE":
            value["cacert"] = files.write("ee.pem", files.pki.end_entity(ID_A).pem())
        if value.get("cacert") == "CA":
            value["cacert"] = files.write("ca.pem", files.pki.root.pem())
    err = _error(files, lambda c: None, authorities)
    assert (err.path, reason in err.reason) == (path, True), err


def test_psk_connections_are_unchanged() -> None:
    conn = parse_connection("x", {
        "remote_addrs": ["192.0.2.2"], "local": {"auth": "psk", "id": ID_A},
        "remote": {"auth": "psk", "id": ID_B},
        "children": {"lan": {"local_ts": ["10.1.0.0/24"], "remote_ts": ["10.2.0.0/24"]}}})
    assert conn.local.credential() is None and conn.remote.trust_anchors() is None
    with pytest.raises(ConfigError) as info:
        ike_config(conn, PskStore())
    assert info.value.path == "connections.x.local.auth"
