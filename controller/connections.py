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
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, cast

from controller.config import ConfigError
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
_AUTH_KEYS = ("auth", "id", "certs", "round")
IGNORED_AUTH_KEYS = ("eap_id", "aaa_id", "xauth_id", "revocation", "groups", "cert_policy",
                     "cacerts", "pubkeys", "ca_id")
_CHILD_KEYS = ("local_ts", "remote_ts", "esp_proposals", "mode", "start_action", "rekey_time",
               "life_time", "replay_window", "dpd_action", "close_action", "rand_time")
IGNORED_CHILD_KEYS = ("updown", "hostaccess", "ipcomp", "inactivity", "priority", "interface",
                      "mark_in", "mark_out", "set_mark_in", "set_mark_out", "reqid",
                      "policies", "policies_fwd_out", "sha256_96", "copy_df", "copy_ecn",
                      "copy_dscp", "hw_offload", "label", "tfc_padding", "if_id_in",
                      "if_id_out", "rekey_bytes", "rekey_packets", "life_bytes",
                      "life_packets")


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
    from cryptography import x509

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
    id: Identity | None  # local: defaults to the local address; remote: None accepts any
    certs: tuple[str, ...] = ()


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
        return self.local.id or parse_identity(self.local_addrs[0])


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


def _auth(value: object, keys: Keys) -> AuthSpec:
    t = _Tree(value, keys, _AUTH_KEYS, IGNORED_AUTH_KEYS)
    method = _text(t.get("auth", "pubkey"), t.at("auth")).lower()
    if method not in ("psk", "pubkey"):
        _fail(t.at("auth"), f"{method!r} is not supported (psk or pubkey)")
    ident = t.get("id")
    certs = tuple(text for _, text in _list(t.get("certs"), t.at("certs"))) if t.get(
        "certs") is not None else ()
    if method == "pubkey":
        _fail(t.at("auth"), "pubkey (certificate) authentication is not supported yet; "
              "use psk")
    return AuthSpec(cast(Literal["psk", "pubkey"], method),
                    None if ident is None else parse_identity(_text(ident, t.at("id")),
                                                              t.at("id")),
                    certs)


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
    return ChildSpec(name, local_ts, remote_ts, tuple(proposals), keywords,
                     Mode.TUNNEL if mode == "tunnel" else Mode.TRANSPORT,
                     cast(StartAction, start), rekey, life, window, dpd_action, close_action)


def parse_connection(name: str, value: object, keys: Keys | None = None) -> Connection:
    """One ``connections.<name>`` section (YAML or a VICI load-conn message)."""
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
    local = _auth(t.get(locals_[0]) if locals_ else None, t.at(locals_[0] if locals_ else "local"))
    remote = _auth(t.get(remotes[0]) if remotes else None,
                   t.at(remotes[0] if remotes else "remote"))
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


def parse_connections(section: Mapping[str, Any]) -> dict[str, Connection]:
    return {str(name): parse_connection(str(name), value) for name, value in section.items()}


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
