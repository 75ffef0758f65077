"""Connections and shared secrets in strongSwan's swanctl.conf terms (DESIGN.md §6).

One model for both sources: the ``connections``/``secrets`` sections of espline.yaml (YAML
types: lists, ints, booleans) and VICI ``load-conn``/``load-shared`` messages (everything a
string, lists as lists, as swanctl sends them). Every problem raises ``ConfigError`` with the
key path (``connections.site-b.children.lan.local_ts[0]``) and the reason.

Key names and value syntax follow swanctl.conf(5): durations ``10s``/``5m``/``4h``/``1d`` (or
bare seconds), booleans ``yes``/``no``, identities ``@fqdn``, ``user@domain``, addresses,
``@#hex`` key IDs and ``C=CH, O=x, CN=y`` distinguished names, shared keys as text, ``0x``hex
or ``0s``base64. Keys that swanctl.conf knows and espline accepts without acting on them are
listed in ``IGNORED_*``; anything else is an error rather than silently dropped.

Certificate authentication (RFC 7296 §2.15 with RFC 7427 signatures, controller/ike/auth.py)::

    authorities:                    # swanctl.conf's authorities: CAs that peers chain to
      corp-ca: {cacert: /etc/espline/ca.pem}
    connections:
      site-b:
        local:
          auth: pubkey              # or rsa/pss: sign with RSASSA-PSS (RSA keys)
          certs: [/etc/espline/gw-a.pem, /etc/espline/sub-ca.pem]  # ours first, then
          key: /etc/espline/gw-a.key                             # intermediates to send
          id: gw-a.example.net      # default: the certificate's subject DN
        remote:
          auth: pubkey
          id: gw-b.example.net      # must be in the peer's certificate (subject or SAN)
          cacerts: [...]            # optional: only these CAs (default: every authority)

Files are PEM (several certificates may share one) or DER; a value holding ``-----BEGIN``
is PEM text itself (from a Kubernetes Secret, say). Relative paths are relative to the
working directory. The private key is espline's own ``key`` (swanctl.conf has none: strongSwan
finds keys in its ``private/`` directory by public key): PKCS#8, PKCS#1 or SEC 1, not
encrypted; RSA, ECDSA, Ed25519 or Ed448, and it must belong to the first certificate. Files
are read when the configuration is, so errors name the key that gave the file; key material
is never in a repr or a message.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from controller.config import ConfigError
from controller.ike import auth as ike_auth
from controller.ike.constants import IdType
from controller.ike.crypto import IkeProposal, parse_ike_proposal
from controller.ike.payloads import TrafficSelector
from pipeline.satable import Mode
from workers.algorithms import AlgorithmError, EspTransform, parse_esp

__all__ = [
    "AuthSpec",
    "ChildSpec",
    "Connection",
    "Identity",
    "PskStore",
    "SharedKey",
    "duration",
    "network_selectors",
    "parse_authorities",
    "parse_connection",
    "parse_connections",
    "parse_identity",
    "parse_secrets",
    "parse_shared_key",
]

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
StartAction = Literal["none", "start", "trap"]
Keys = tuple[str | int, ...]

IKE_PORT = 500
DEFAULT_REPLAY_WINDOW = 32  # strongSwan's default (charon.replay_window)
DEFAULT_REKEY_TIME = 4 * 3600.0  # swanctl.conf: connections.<conn>.rekey_time
DEFAULT_CHILD_REKEY_TIME = 3600.0  # swanctl.conf: children.<child>.rekey_time

_CONN_KEYS = ("version", "local_addrs", "remote_addrs", "local_port", "remote_port",
              "proposals", "encap", "dpd_delay", "dpd_timeout", "rekey_time", "children",
              "keyingtries")
# swanctl.conf keys accepted and not acted upon (espline's behaviour is the default one).
IGNORED_CONN_KEYS = ("mobike", "fragmentation", "unique", "reauth_time", "over_time",
                     "rand_time", "send_certreq", "send_cert", "aggressive", "pull",
                     "childless", "if_id_in", "if_id_out", "ppk_required", "ppk_id")
_AUTH_KEYS = ("auth", "id", "certs", "round", "key", "cacerts")
IGNORED_AUTH_KEYS = ("eap_id", "aaa_id", "xauth_id", "revocation", "groups", "cert_policy",
                     "pubkeys", "ca_id")
_AUTHORITY_KEYS = ("cacert", "file")
IGNORED_AUTHORITY_KEYS = ("crl_uris", "ocsp_uris", "cert_uri_base")
_CHILD_KEYS = ("local_ts", "remote_ts", "esp_proposals", "mode", "start_action", "rekey_time",
               "life_time", "replay_window", "dpd_action", "close_action", "rand_time",
               "rekey_bytes", "rekey_packets", "life_bytes", "life_packets")
IGNORED_CHILD_KEYS = ("updown", "hostaccess", "ipcomp", "inactivity", "priority", "interface",
                      "mark_in", "mark_out", "set_mark_in", "set_mark_out", "reqid",
                      "policies", "policies_fwd_out", "sha256_96", "copy_df", "copy_ecn",
                      "copy_dscp", "hw_offload", "label", "tfc_padding", "if_id_in",
                      "if_id_out")


def _fail(keys: Keys, reason: str) -> NoReturn:
    raise ConfigError(_path(keys), reason)


def _path(keys: Keys) -> str:
    out = ""
    for k in keys:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else k)
    return out


# -- scalar syntax (swanctl.conf(5)) -----------------------------------------------------------

def _text(value: object, keys: Keys) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        _fail(keys, f"expected a value, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        _fail(keys, "empty")
    return text


def _list(value: object, keys: Keys) -> list[tuple[Keys, str]]:
    """A list, or one comma-separated string (swanctl.conf allows both)."""
    if isinstance(value, list | tuple):
        items = [((*keys, i), _text(v, (*keys, i))) for i, v in enumerate(value)]
    else:
        text = _text(value, keys)
        items = [(keys, part.strip()) for part in text.split(",") if part.strip()]
    if not items:
        _fail(keys, "empty list")
    return items


def _bool(value: object, keys: Keys) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value, keys).lower()
    if text in ("yes", "true", "1", "on"):
        return True
    if text in ("no", "false", "0", "off"):
        return False
    _fail(keys, f"{text!r} is not yes or no")


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(value: object, keys: Keys) -> float:
    """Seconds from ``30``, ``30s``, ``5m``, ``4h`` or ``1d`` (swanctl.conf(5) time values)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(_text(value, keys).lower())
        if match is None:
            _fail(keys, f"{value!r} is not a duration (e.g. 30s, 5m, 4h, 1d)")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds < 0:
        _fail(keys, "must not be negative")
    return seconds


_VOLUME = re.compile(r"^(\d+)\s*([kmg]?)$")


def _volume(value: object, keys: Keys) -> int:
    """A byte or packet count: ``1000``, ``500k``, ``10M``, ``1G`` (swanctl.conf, binary)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        match = _VOLUME.match(_text(value, keys).lower())
        if match is None:
            _fail(keys, f"{value!r} is not a count (e.g. 1000, 500k, 10M, 1G)")
        number = int(match.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[match.group(2)]
    if number < 0:
        _fail(keys, "must not be negative")
    return number


def _int(value: object, keys: Keys, lo: int, hi: int) -> int:
    text = _text(value, keys)
    try:
        number = int(text, 0)
    except ValueError:
        _fail(keys, f"{text!r} is not an integer")
    if not lo <= number <= hi:
        _fail(keys, f"{number} is outside {lo}..{hi}")
    return number


def _address(text: str, keys: Keys) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        _fail(keys, f"{text!r} is not an IP address (host names and ranges are not supported)")


# -- identities (RFC 7296 §3.5; strongSwan's identification_t syntax) --------------------------

@dataclass(frozen=True)
class Identity:
    type: IdType
    data: bytes
    text: str  # as configured, for logs and VICI

    def __str__(self) -> str:
        return self.text


def parse_identity(text: str, keys: Keys = ("id",)) -> Identity:
    """``192.0.2.1`` / ``2001:db8::1`` (address), ``@gw.example.net`` or ``gw.example.net``
    (FQDN), ``user@example.net`` (RFC 822), ``@#0a1b`` (key ID), ``C=CH, O=Org, CN=gw`` (DN);
    an explicit ``fqdn:``, ``email:``, ``keyid:`` or ``dn:`` prefix selects the type."""
    prefix, _, rest = text.partition(":")
    explicit = {"fqdn": IdType.ID_FQDN, "email": IdType.ID_RFC822_ADDR,
                "rfc822": IdType.ID_RFC822_ADDR, "keyid": IdType.ID_KEY_ID,
                "dn": IdType.ID_DER_ASN1_DN}
    if prefix.lower() in explicit and rest and not _is_address(text):
        kind = explicit[prefix.lower()]
        if kind is IdType.ID_KEY_ID:
            return Identity(kind, _hex(rest.removeprefix("#"), keys), text)
        if kind is IdType.ID_DER_ASN1_DN:
            return Identity(kind, _dn(rest, keys), text)
        return Identity(kind, rest.encode(), text)
    if _is_address(text):
        addr = ipaddress.ip_address(text)
        kind = IdType.ID_IPV4_ADDR if addr.version == 4 else IdType.ID_IPV6_ADDR
        return Identity(kind, addr.packed, text)
    if text.startswith("@#"):
        return Identity(IdType.ID_KEY_ID, _hex(text[2:], keys), text)
    if text.startswith("@"):
        return Identity(IdType.ID_FQDN, text[1:].encode(), text)
    if "=" in text:
        return Identity(IdType.ID_DER_ASN1_DN, _dn(text, keys), text)
    if "@" in text:
        return Identity(IdType.ID_RFC822_ADDR, text.encode(), text)
    return Identity(IdType.ID_FQDN, text.encode(), text)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _hex(text: str, keys: Keys) -> bytes:
    try:
        return bytes.fromhex(text.removeprefix("0x").replace(":", ""))
    except ValueError:
        _fail(keys, f"{text!r} is not hex")


def _dn(text: str, keys: Keys) -> bytes:
    # strongSwan writes DNs most significant RDN first, separated by ", " or "/";
    # RFC 4514 strings are least significant first.
    parts = [p.strip() for p in re.split(r"\s*[,/]\s*(?=[A-Za-z.0-9]+=)", text) if p.strip()]
    try:
        name = x509.Name.from_rfc4514_string(",".join(reversed(parts)))
    except ValueError as exc:
        _fail(keys, f"{text!r} is not a distinguished name: {exc}")
    return name.public_bytes()


# -- traffic selectors -------------------------------------------------------------------------

def network_selectors(nets: Sequence[IpNetwork]) -> tuple[TrafficSelector, ...]:
    """Address-range selectors (RFC 7296 §3.13.1) for prefixes, any protocol and port."""
    return tuple(TrafficSelector(0, 0, 65535, n.network_address, n.broadcast_address)
                 for n in nets)


def _selectors(value: object, keys: Keys) -> tuple[IpNetwork, ...]:
    nets: list[IpNetwork] = []
    for where, text in _list(value, keys):
        if "[" in text:
            _fail(where, f"{text!r}: protocol/port selectors are not supported yet "
                  "(give address prefixes)")
        if text == "dynamic":
            _fail(where, "'dynamic' is not supported yet (give the address prefix)")
        try:
            nets.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            _fail(where, f"{text!r} is not an address prefix: {exc}")
    return tuple(nets)


# -- the model ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class AuthSpec:
    auth: Literal["psk", "pubkey"]
    # local: defaults to the certificate's subject (pubkey) or the local address (psk);
    # remote: None accepts any identity the peer authenticates
    id: Identity | None
    certs: tuple[str, ...] = ()  # as configured (file names); local pubkey only
    key: str | None = None  # as configured; local pubkey only
    cacerts: tuple[str, ...] = ()  # as configured; remote pubkey only (default: authorities)
    rsa_pss: bool = False  # local ``auth: rsa/pss``
    # What the files held (DER), read when the configuration was: the certificates to send,
    # the private key (PKCS#8), the CA certificates to trust.
    cert_der: tuple[bytes, ...] = field(default=(), repr=False)
    key_der: bytes = field(default=b"", repr=False)
    cacert_der: tuple[bytes, ...] = field(default=(), repr=False)

    def credential(self) -> ike_auth.Credential | None:
        """Our key and certificates for the IKE core (local pubkey), else None."""
        if self.auth != "pubkey" or not self.cert_der:
            return None
        key = serialization.load_der_private_key(self.key_der, None)
        assert isinstance(key, ike_auth.SUPPORTED_PRIVATE_KEYS)  # checked when loaded
        certs = tuple(x509.load_der_x509_certificate(d) for d in self.cert_der)
        return ike_auth.Credential(key, certs, self.rsa_pss)

    def trust_anchors(self) -> ike_auth.TrustAnchors | None:
        """The CAs the peer's certificate must chain to (remote pubkey), else None."""
        if self.auth != "pubkey":
            return None
        return ike_auth.TrustAnchors(
            tuple(x509.load_der_x509_certificate(d) for d in self.cacert_der))


@dataclass(frozen=True)
class ChildSpec:
    name: str
    local_ts: tuple[IpNetwork, ...]
    remote_ts: tuple[IpNetwork, ...]
    esp_proposals: tuple[tuple[EspTransform, bool], ...]  # (transform, esn)
    esp_keywords: tuple[str, ...]
    mode: Mode = Mode.TUNNEL
    start_action: StartAction = "none"
    rekey_time: float = DEFAULT_CHILD_REKEY_TIME  # 0 disables
    life_time: float = DEFAULT_CHILD_REKEY_TIME * 1.1  # swanctl: rekey_time + 10 %
    replay_window: int = DEFAULT_REPLAY_WINDOW
    dpd_action: str = "clear"
    close_action: str = "none"
    # Volume limits (0: none), checked against the data plane's counters: rekey at the soft
    # one, delete at the hard one (swanctl.conf: rekey_bytes/packets, life_bytes/packets).
    rekey_bytes: int = 0
    rekey_packets: int = 0
    life_bytes: int = 0
    life_packets: int = 0


@dataclass(frozen=True)
class Connection:
    name: str
    local_addrs: tuple[str, ...]
    remote_addrs: tuple[str, ...]
    proposals: tuple[IkeProposal, ...]
    proposal_keywords: tuple[str, ...]
    local: AuthSpec
    remote: AuthSpec
    children: tuple[ChildSpec, ...]
    local_port: int = IKE_PORT
    remote_port: int = IKE_PORT
    encap: bool = False
    dpd_delay: float = 0.0  # 0: no liveness checks of our own
    dpd_timeout: float = 0.0
    rekey_time: float = DEFAULT_REKEY_TIME
    keyingtries: int = 1
    ignored: tuple[str, ...] = field(default=(), compare=False)  # accepted, not acted upon

    @property
    def local_id(self) -> Identity:
        if self.local.id is not None:
            return self.local.id
        if self.local.auth == "pubkey" and self.local.cert_der:
            return _subject_identity(x509.load_der_x509_certificate(self.local.cert_der[0]))
        return parse_identity(self.local_addrs[0])


class _Tree:
    """One section of a connection; keys are checked against what espline understands."""

    def __init__(self, value: object, keys: Keys, known: Sequence[str],
                 ignored: Sequence[str], prefixed: Sequence[str] = ()) -> None:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            _fail(keys, f"expected a section, got {type(value).__name__}")
        self.data: dict[str, Any] = {}
        self.ignored: list[str] = []
        for key, v in value.items():
            key = key.decode() if isinstance(key, bytes) else str(key)
            if key in known or any(key == p or key.startswith(p + "-") for p in prefixed):
                self.data[key] = v
            elif key in ignored:
                self.ignored.append(_path((*keys, key)))
            else:
                _fail((*keys, key), "not a key espline knows (swanctl.conf key names; "
                      f"known here: {', '.join([*known, *prefixed])})")
        self.keys = keys

    def at(self, key: str) -> Keys:
        return (*self.keys, key)

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


def _auth(value: object, keys: Keys, side: str,
          authorities: Mapping[str, bytes] | None = None) -> AuthSpec:
    t = _Tree(value, keys, _AUTH_KEYS, IGNORED_AUTH_KEYS)
    method = _text(t.get("auth", "pubkey"), t.at("auth")).lower()
    if method not in ("psk", "pubkey", "rsa/pss"):
        _fail(t.at("auth"), f"{method!r} is not supported (psk, pubkey, or rsa/pss)")
    if method == "rsa/pss" and side != "local":
        _fail(t.at("auth"), "rsa/pss chooses how we sign: a local setting (remote: pubkey)")
    ident = t.get("id")
    identity = None if ident is None else parse_identity(_text(ident, t.at("id")), t.at("id"))
    certs = tuple(text for _, text in _list(t.get("certs"), t.at("certs"))) if t.get(
        "certs") is not None else ()
    if method == "psk":
        # certs, key and cacerts mean nothing here; accepted as they always were
        return AuthSpec("psk", identity, certs)
    if side == "local":
        return _local_pubkey(t, identity, certs, rsa_pss=method == "rsa/pss")
    return _remote_pubkey(t, identity, authorities)


def _local_pubkey(t: _Tree, identity: Identity | None, certs: tuple[str, ...], *,
                  rsa_pss: bool) -> AuthSpec:
    if "cacerts" in t.data:
        _fail(t.at("cacerts"), "CA certificates are for the remote side (remote.cacerts)")
    if not certs:
        _fail(t.at("auth"), "pubkey authentication without certs (a certificate looked up "
              "by identity) is not supported yet; give certs and key")
    cert_der: list[bytes] = []
    labels = []
    for where, item in _items(t.get("certs"), t.at("certs")):
        cert_der += _load_certificates(item, where)
        labels.append(_label(item, where))
    certs = tuple(labels)
    leaf = x509.load_der_x509_certificate(cert_der[0])
    if "key" not in t.data:
        _fail(t.at("key"), "required with certs: the private key of the first certificate")
    key_label = _label(t.get("key"), t.at("key"))
    key = _load_private_key(t.get("key"), t.at("key"))
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        _fail(t.at("key"), f"{key_label}: this key does not belong to the certificate "
              f"{_cert_name(leaf)} (certs[0])")
    if rsa_pss and not isinstance(key, rsa.RSAPrivateKey):
        _fail(t.at("auth"), "rsa/pss needs an RSA key")
    if identity is not None:
        if not ike_auth.identity_in_certificate(identity.type, identity.data, leaf):
            _fail(t.at("id"), f"{identity} is not in the certificate {_cert_name(leaf)} "
                  "(neither its subject nor a subjectAltName)")
        if identity.type is IdType.ID_DER_ASN1_DN:
            # send the subject exactly as the certificate encodes it: a peer comparing
            # bytes, or string types, finds them equal
            identity = Identity(identity.type, leaf.subject.public_bytes(), identity.text)
    key_der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return AuthSpec("pubkey", identity, certs, key=key_label, rsa_pss=rsa_pss,
                    cert_der=tuple(cert_der), key_der=key_der)


def _remote_pubkey(t: _Tree, identity: Identity | None,
                   authorities: Mapping[str, bytes] | None) -> AuthSpec:
    if "key" in t.data:
        _fail(t.at("key"), "a private key is ours: local.key")
    if "certs" in t.data:
        _fail(t.at("certs"), "pinned peer certificates are not supported yet; the peer sends "
              "its certificate, which must chain to authorities or cacerts")
    names: tuple[str, ...] = ()
    if "cacerts" in t.data:
        cacert_der: list[bytes] = []
        labels = []
        for where, item in _items(t.get("cacerts"), t.at("cacerts")):
            cacert_der += [_check_ca(d, where) for d in _load_certificates(item, where)]
            labels.append(_label(item, where))
        cas, names = tuple(cacert_der), tuple(labels)
    else:
        cas = tuple(dict.fromkeys((authorities or {}).values()))
    if not cas:
        _fail(t.at("auth"), "pubkey needs CA certificates to check the peer's certificate "
              "against: an authorities section or cacerts here")
    return AuthSpec("pubkey", identity, cacerts=names, cacert_der=cas)


# -- certificates and keys from files (or PEM text) --------------------------------------------

def _items(value: object, keys: Keys) -> list[tuple[Keys, object]]:
    """The entries of a file list: a list, or one value (PEM text may hold commas)."""
    if isinstance(value, list | tuple):
        if not value:
            _fail(keys, "empty list")
        return [((*keys, i), v) for i, v in enumerate(value)]
    if isinstance(value, str) and "-----BEGIN" not in value:
        return [(where, text) for where, text in _list(value, keys)]
    return [(keys, value)]


def _label(value: object, keys: Keys) -> str:
    if isinstance(value, bytes) or (isinstance(value, str) and "-----BEGIN" in value):
        return "<inline PEM>" if isinstance(value, str) else "<DER data>"
    return _text(value, keys)


def _content(value: object, keys: Keys) -> tuple[str, bytes]:
    """(what to call it in messages, the bytes): inline data, or the file the value names."""
    if isinstance(value, bytes):
        return "<DER data>", value
    text = _text(value, keys)
    if "-----BEGIN" in text:
        return "<inline PEM>", text.encode()
    try:
        with open(text, "rb") as f:
            return text, f.read(1 << 20)
    except OSError as exc:
        _fail(keys, f"{text}: cannot read: {exc.strerror}")


def _load_certificates(value: object, keys: Keys) -> list[bytes]:
    """The DER of each certificate a PEM file holds, or of the one DER certificate."""
    name, data = _content(value, keys)
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError:
        _fail(keys, f"{name}: not an X.509 certificate (PEM or DER)")
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


def _load_private_key(value: object, keys: Keys) -> ike_auth.PrivateKey:
    name, data = _content(value, keys)
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, None)
        else:
            key = serialization.load_der_private_key(data, None)
    except TypeError:
        _fail(keys, f"{name}: encrypted private keys are not supported")
    except (ValueError, UnsupportedAlgorithm):
        # never the library's message: it may quote the file
        _fail(keys, f"{name}: not a private key (PEM or DER: PKCS#8, PKCS#1 or SEC 1)")
    if not isinstance(key, ike_auth.SUPPORTED_PRIVATE_KEYS):
        _fail(keys, f"{name}: a {type(key).__name__.removeprefix('_')} key; RSA, ECDSA, "
              "Ed25519 or Ed448 keys sign IKE_AUTH")
    return key


def _check_ca(der: bytes, keys: Keys) -> bytes:
    cert = x509.load_der_x509_certificate(der)
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    except ValueError as exc:
        _fail(keys, f"{_cert_name(cert)}: malformed extensions: {exc}")
    if bc is None or not bc.ca:
        _fail(keys, f"{_cert_name(cert)} is not a CA certificate (basicConstraints CA)")
    return der


def _spki(public_key: Any) -> bytes:
    data: bytes = public_key.public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def _dn_text(name: x509.Name) -> str:
    """strongSwan's way of writing a DN: most significant RDN first, ", " between."""
    return ", ".join(rdn.rfc4514_string() for rdn in name.rdns)


def _cert_name(cert: x509.Certificate) -> str:
    return f'"{_dn_text(cert.subject)}"'


def _subject_identity(cert: x509.Certificate) -> Identity:
    return Identity(IdType.ID_DER_ASN1_DN, cert.subject.public_bytes(), _dn_text(cert.subject))


def parse_authorities(section: Mapping[str, Any]) -> dict[str, bytes]:
    """``authorities: {<name>: {cacert: <file>}}`` (swanctl.conf; ``file`` is accepted for
    ``cacert``): each a CA certificate that peers' certificates may chain to. By name, DER."""
    out: dict[str, bytes] = {}
    for name, value in section.items():
        keys: Keys = ("authorities", str(name))
        t = _Tree(value, keys, _AUTHORITY_KEYS, IGNORED_AUTHORITY_KEYS)
        given = [k for k in _AUTHORITY_KEYS if k in t.data]
        if len(given) != 1:
            _fail(t.at("cacert"), "required (the CA certificate file)" if not given
                  else "give cacert or file, not both")
        where = t.at(given[0])
        certs = _load_certificates(t.get(given[0]), where)
        if len(certs) != 1:
            _fail(where, f"holds {len(certs)} certificates; one per authority")
        out[str(name)] = _check_ca(certs[0], where)
    return out


def _round(name: str, prefix: str) -> tuple[int, str]:
    return (0 if name == prefix else 1, name)


def _child(name: str, value: object, keys: Keys, ignored: list[str]) -> ChildSpec:
    t = _Tree(value, keys, _CHILD_KEYS, IGNORED_CHILD_KEYS)
    ignored += t.ignored
    local_ts = _selectors(t.get("local_ts"), t.at("local_ts")) if "local_ts" in t.data else ()
    remote_ts = (_selectors(t.get("remote_ts"), t.at("remote_ts"))
                 if "remote_ts" in t.data else ())
    if not local_ts:
        _fail(t.at("local_ts"), "required (the local subnets of this child)")
    if not remote_ts:
        _fail(t.at("remote_ts"), "required (the remote subnets of this child)")
    keywords = (tuple(text for _, text in _list(t.get("esp_proposals"), t.at("esp_proposals")))
                if "esp_proposals" in t.data else ("aes128gcm16", "aes128-sha256"))
    proposals = []
    for i, keyword in enumerate(keywords):
        where = (*t.at("esp_proposals"), i)
        if keyword == "default":
            proposals += [(parse_esp("aes128gcm16"), False), (parse_esp("aes128-sha256"), False)]
            continue
        try:
            transform = parse_esp(keyword)
        except AlgorithmError as exc:
            _fail(where, str(exc))
        proposals.append((transform, bool(transform.esn)))
    mode = _text(t.get("mode", "tunnel"), t.at("mode")).lower()
    if mode not in ("tunnel", "transport"):
        _fail(t.at("mode"), f"{mode!r} is not supported (tunnel or transport)")
    start = _text(t.get("start_action", "none"), t.at("start_action")).lower()
    if start not in ("none", "start", "trap"):
        _fail(t.at("start_action"), f"{start!r} is not one of none, start, trap")
    rekey = duration(t.get("rekey_time", DEFAULT_CHILD_REKEY_TIME), t.at("rekey_time"))
    life = (duration(t.get("life_time"), t.at("life_time")) if "life_time" in t.data
            else rekey * 1.1)
    if rekey and life and life < rekey:
        _fail(t.at("life_time"), f"{life:g}s is shorter than rekey_time ({rekey:g}s)")
    window = _int(t.get("replay_window", DEFAULT_REPLAY_WINDOW), t.at("replay_window"),
                  0, 1 << 16)
    if window and window < 32:
        _fail(t.at("replay_window"), f"{window} is below 32 (RFC 4303 §3.4.3; 0 disables)")
    dpd_action = _text(t.get("dpd_action", "clear"), t.at("dpd_action")).lower()
    close_action = _text(t.get("close_action", "none"), t.at("close_action")).lower()
    for key, action in (("dpd_action", dpd_action), ("close_action", close_action)):
        if action not in ("clear", "none", "trap", "start", "restart"):
            _fail(t.at(key), f"{action!r} is not one of clear, trap, start")
    volume = {k: _volume(t.get(k, 0), t.at(k)) for k in
              ("rekey_bytes", "rekey_packets", "life_bytes", "life_packets")}
    for kind in ("bytes", "packets"):
        soft, hard = volume[f"rekey_{kind}"], volume[f"life_{kind}"]
        if soft and hard and hard < soft:
            _fail(t.at(f"life_{kind}"), f"{hard} is below rekey_{kind} ({soft})")
    return ChildSpec(name, local_ts, remote_ts, tuple(proposals), keywords,
                     Mode.TUNNEL if mode == "tunnel" else Mode.TRANSPORT,
                     cast(StartAction, start), rekey, life, window, dpd_action, close_action,
                     **volume)


def parse_connection(name: str, value: object, keys: Keys | None = None,
                     authorities: Mapping[str, bytes] | None = None) -> Connection:
    """One ``connections.<name>`` section (YAML or a VICI load-conn message); a remote side
    with ``auth: pubkey`` and no ``cacerts`` trusts every CA of ``authorities``
    (``parse_authorities``)."""
    keys = keys if keys is not None else ("connections", name)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        _fail(keys, "connection names are 1-64 letters, digits, '_', '.', '-'")
    t = _Tree(value, keys, _CONN_KEYS, IGNORED_CONN_KEYS, prefixed=("local", "remote"))
    version = _int(t.get("version", 2), t.at("version"), 0, 2)
    if version == 1:
        _fail(t.at("version"), "IKEv1 is not supported (version: 2)")
    local_addrs = tuple(_address(text, where) for where, text in
                        _list(t.get("local_addrs", "0.0.0.0"), t.at("local_addrs")))
    if "remote_addrs" not in t.data:
        _fail(t.at("remote_addrs"), "required (espline does not run as a road-warrior "
              "responder for %any yet)")
    remote_addrs = tuple(_address(text, where) for where, text in
                         _list(t.get("remote_addrs"), t.at("remote_addrs")))
    keywords = (tuple(text for _, text in _list(t.get("proposals"), t.at("proposals")))
                if "proposals" in t.data else ("default",))
    proposals: list[IkeProposal] = []
    for i, keyword in enumerate(keywords):
        text = ("aes128gcm16-prfsha256-x25519" if keyword == "default" else keyword)
        try:
            proposals.append(parse_ike_proposal(text))
        except AlgorithmError as exc:
            _fail((*t.at("proposals"), i), str(exc))
    locals_ = sorted((k for k in t.data if k == "local" or k.startswith("local-")),
                     key=lambda k: _round(k, "local"))
    remotes = sorted((k for k in t.data if k == "remote" or k.startswith("remote-")),
                     key=lambda k: _round(k, "remote"))
    if len(locals_) > 1 or len(remotes) > 1:
        _fail(t.at((locals_ + remotes)[1]), "multiple authentication rounds are not supported")
    local = _auth(t.get(locals_[0]) if locals_ else None, t.at(locals_[0] if locals_ else "local"),
                  "local")
    remote = _auth(t.get(remotes[0]) if remotes else None,
                   t.at(remotes[0] if remotes else "remote"), "remote", authorities)
    children_value = t.get("children")
    if not isinstance(children_value, Mapping) or not children_value:
        _fail(t.at("children"), "at least one child section is required")
    ignored = list(t.ignored)
    children = tuple(_child(str(cname), cvalue, (*t.at("children"), str(cname)), ignored)
                     for cname, cvalue in children_value.items())
    local_port = _int(t.get("local_port", IKE_PORT), t.at("local_port"), 1, 65535)
    remote_port = _int(t.get("remote_port", IKE_PORT), t.at("remote_port"), 1, 65535)
    return Connection(
        name=name, local_addrs=local_addrs, remote_addrs=remote_addrs,
        proposals=tuple(proposals), proposal_keywords=keywords, local=local, remote=remote,
        children=children, local_port=local_port, remote_port=remote_port,
        encap=_bool(t.get("encap", False), t.at("encap")),
        dpd_delay=duration(t.get("dpd_delay", 0), t.at("dpd_delay")),
        dpd_timeout=duration(t.get("dpd_timeout", 0), t.at("dpd_timeout")),
        rekey_time=duration(t.get("rekey_time", DEFAULT_REKEY_TIME), t.at("rekey_time")),
        keyingtries=_int(t.get("keyingtries", 1), t.at("keyingtries"), 0, 1000),
        ignored=tuple(ignored),
    )


def parse_connections(section: Mapping[str, Any],
                      authorities: Mapping[str, Any] | None = None) -> dict[str, Connection]:
    """The ``connections`` section; ``authorities`` is the raw top-level section of CAs."""
    cas = parse_authorities(authorities or {})
    return {str(name): parse_connection(str(name), value, authorities=cas)
            for name, value in section.items()}


# -- secrets -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SharedKey:
    """An IKE pre-shared key and the identities it is for (none: any)."""

    owners: tuple[str, ...]
    secret: bytes = field(repr=False)
    key_id: str = ""  # the name it was loaded under (swanctl: ike-<suffix>)


def parse_shared_key(text: str, keys: Keys) -> bytes:
    """strongSwan's secret syntax: ``0x`` hex, ``0s`` base64, else the text itself."""
    if text.startswith("0x"):
        return _hex(text, keys)
    if text.startswith("0s"):
        try:
            return base64.b64decode(text[2:], validate=True)
        except binascii.Error:
            _fail(keys, "not valid base64 after 0s")
    return text.encode()


def _secret_entry(value: object, keys: Keys, key_id: str) -> SharedKey:
    if not isinstance(value, Mapping):
        _fail(keys, f"expected a section with id and secret, got {type(value).__name__}")
    owners: list[str] = []
    secret: bytes | None = None
    for k, v in value.items():
        k = str(k)
        where = (*keys, k)
        if k == "secret":
            secret = v if isinstance(v, bytes) else parse_shared_key(_text(v, where), where)
        elif k == "id" or k.startswith("id-"):
            owners += [text for _, text in _list(v, where)]
        else:
            _fail(where, "not a key of a shared secret (id, id-<suffix>, secret)")
    if not secret:
        _fail((*keys, "secret"), "required")
    for i, owner in enumerate(owners):
        parse_identity(owner, (*keys, "id", i))
    return SharedKey(tuple(owners), secret, key_id)


def parse_secrets(section: Mapping[str, Any]) -> list[SharedKey]:
    """``secrets: {ike: [{id: [...], secret: ...}, ...]}`` (espline.yaml) or swanctl's
    ``secrets { ike-x { id = ..., secret = ... } }`` form."""
    out: list[SharedKey] = []
    for name, value in section.items():
        name = str(name)
        keys: Keys = ("secrets", name)
        if name == "ike" and isinstance(value, list | tuple):
            out += [_secret_entry(v, (*keys, i), f"ike-{i}") for i, v in enumerate(value)]
        elif name == "ike" or name.startswith("ike-"):
            out.append(_secret_entry(value, keys, name))
        else:
            _fail(keys, "only IKE shared keys (ike, ike-<suffix>) are supported")
    return out


class PskStore:
    """Pre-shared keys, found by the pair of identities as strongSwan does: an entry naming
    both beats one naming one, which beats one naming none."""

    def __init__(self, keys: Sequence[SharedKey] = ()) -> None:
        self._keys: dict[str, SharedKey] = {}
        for i, k in enumerate(keys):
            self._keys[k.key_id or f"ike-{i}"] = k

    def add(self, key: SharedKey) -> None:
        self._keys[key.key_id or f"ike-{len(self._keys)}"] = key

    def remove(self, key_id: str) -> bool:
        return self._keys.pop(key_id, None) is not None

    def ids(self) -> list[str]:
        return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def lookup(self, local: Identity, remote: Identity | None) -> bytes | None:
        best: tuple[int, bytes] | None = None
        wanted = {local.text, local.text.lstrip("@")}
        remote_texts = set() if remote is None else {remote.text, remote.text.lstrip("@")}
        for key in self._keys.values():
            owners = {o.lstrip("@") for o in key.owners} | set(key.owners)
            if owners:
                score = (2 if owners & wanted else 0) + (1 if owners & remote_texts else 0)
                if score == 0:
                    continue
            else:
                score = 0
            if best is None or score > best[0]:
                best = (score, key.secret)
        return None if best is None else best[1]
