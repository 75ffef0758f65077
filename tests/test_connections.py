"""Connections and secrets in swanctl.conf terms (controller/connections.py): the YAML form and
the all-strings form VICI's load-conn delivers give one model; errors name key and reason."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from controller.config import ConfigError, parse_config
from controller.connections import (
    PskStore,
    SharedKey,
    duration,
    network_selectors,
    parse_connection,
    parse_identity,
    parse_secrets,
)
from controller.gateway import ike_config, resolve_local, selector_networks
from controller.ike.constants import IdType
from pipeline.satable import Mode

YAML_CONN: dict[str, Any] = {
    "version": 2,
    "local_addrs": ["192.0.2.1"],
    "remote_addrs": ["192.0.2.2"],
    "proposals": ["aes128gcm16-prfsha256-x25519", "aes256-sha256-modp2048"],
    "encap": True,
    "dpd_delay": "10s",
    "rekey_time": "4h",
    "local": {"auth": "psk", "id": "gw-a.example.net"},
    "remote": {"auth": "psk", "id": "gw-b.example.net"},
    "children": {"lan": {"local_ts": ["10.1.0.0/24"], "remote_ts": ["10.2.0.0/24"],
                         "esp_proposals": ["aes128gcm16"], "start_action": "start",
                         "rekey_time": "1h"}},
}
# What swanctl --load-all sends for the same connection (swanctl.conf syntax, all strings).
VICI_CONN: dict[str, Any] = {
    "version": "2",
    "local_addrs": ["192.0.2.1"],
    "remote_addrs": ["192.0.2.2"],
    "proposals": ["aes128gcm16-prfsha256-x25519", "aes256-sha256-modp2048"],
    "encap": "yes",
    "dpd_delay": "10",
    "rekey_time": "14400",
    "mobike": "no",
    "local-1": {"auth": "psk", "id": "gw-a.example.net"},
    "remote-1": {"auth": "psk", "id": "gw-b.example.net"},
    "children": {"lan": {"local_ts": ["10.1.0.0/24"], "remote_ts": ["10.2.0.0/24"],
                         "esp_proposals": ["aes128gcm16"], "start_action": "start",
                         "rekey_time": "3600", "updown": "/usr/lib/ipsec/_updown"}},
}


def test_yaml_and_vici_forms_give_the_same_connection() -> None:
    a = parse_connection("site-b", YAML_CONN)
    b = parse_connection("site-b", VICI_CONN)
    assert a == b  # ``ignored`` (mobike, updown) is not part of the comparison
    assert b.ignored == ("connections.site-b.mobike",
                         "connections.site-b.children.lan.updown")
    assert a.encap and a.dpd_delay == 10 and a.rekey_time == 14400
    assert a.local_id.type is IdType.ID_FQDN and a.local_id.data == b"gw-a.example.net"
    child = a.children[0]
    assert (child.name, child.mode, child.start_action, child.rekey_time) == (
        "lan", Mode.TUNNEL, "start", 3600)
    assert child.life_time == pytest.approx(3960)
    assert child.local_ts == (ipaddress.ip_network("10.1.0.0/24"),)
    assert [t.keyword for t, _ in child.esp_proposals] == ["aes128gcm16"]


@pytest.mark.parametrize(("mutate", "path", "reason"), [
    (lambda c: c.update(version=1), "connections.x.version", "IKEv1 is not supported"),
    (lambda c: c.update(proposals=["aes128gcm16-x25519"]), "connections.x.proposals[0]",
     "explicit PRF"),
    (lambda c: c.update(remote_addrs=["gw.example.net"]), "connections.x.remote_addrs[0]",
     "not an IP address"),
    (lambda c: c.pop("remote_addrs"), "connections.x.remote_addrs", "required"),
    (lambda c: c.update(dpd_delay="soon"), "connections.x.dpd_delay", "not a duration"),
    (lambda c: c.update(colour="blue"), "connections.x.colour", "not a key espline knows"),
    (lambda c: c["local"].update(auth="eap-md5"), "connections.x.local.auth",
     "not supported"),
    (lambda c: c["local"].update(auth="pubkey"), "connections.x.local.auth",
     "not supported yet"),
    (lambda c: c["children"]["lan"].update(local_ts=["10.1.0.1/24"]),
     "connections.x.children.lan.local_ts[0]", "not an address prefix"),
    (lambda c: c["children"]["lan"].update(local_ts=["10.1.0.0/24[tcp/80]"]),
     "connections.x.children.lan.local_ts[0]", "protocol/port selectors"),
    (lambda c: c["children"]["lan"].pop("remote_ts"), "connections.x.children.lan.remote_ts",
     "required"),
    (lambda c: c["children"]["lan"].update(esp_proposals=["aes128-md5"]),
     "connections.x.children.lan.esp_proposals[0]", "unknown integrity algorithm"),
    (lambda c: c["children"]["lan"].update(mode="beet"), "connections.x.children.lan.mode",
     "not supported"),
    (lambda c: c["children"]["lan"].update(start_action="maybe"),
     "connections.x.children.lan.start_action", "not one of"),
    (lambda c: c["children"]["lan"].update(replay_window=16),
     "connections.x.children.lan.replay_window", "below 32"),
    (lambda c: c["children"]["lan"].update(life_time="30m"),
     "connections.x.children.lan.life_time", "shorter than rekey_time"),
    (lambda c: c.update(children={}), "connections.x.children", "at least one child"),
])
def test_errors_name_the_key_and_the_reason(mutate: Any, path: str, reason: str) -> None:
    import copy

    conn = copy.deepcopy(YAML_CONN)
    mutate(conn)
    with pytest.raises(ConfigError) as info:
        parse_connection("x", conn)
    assert info.value.path == path
    assert reason in info.value.reason


@pytest.mark.parametrize(("text", "kind", "data"), [
    ("192.0.2.1", IdType.ID_IPV4_ADDR, bytes([192, 0, 2, 1])),
    ("2001:db8::1", IdType.ID_IPV6_ADDR, ipaddress.ip_address("2001:db8::1").packed),
    ("@gw.example.net", IdType.ID_FQDN, b"gw.example.net"),
    ("gw.example.net", IdType.ID_FQDN, b"gw.example.net"),
    ("alice@example.net", IdType.ID_RFC822_ADDR, b"alice@example.net"),
    ("@#0a1b2c", IdType.ID_KEY_ID, bytes.fromhex("0a1b2c")),
    ("keyid:0a1b", IdType.ID_KEY_ID, bytes.fromhex("0a1b")),
    ("fqdn:192.0.2.1.example", IdType.ID_FQDN, b"192.0.2.1.example"),
])
def test_identities_follow_strongswan_syntax(text: str, kind: IdType, data: bytes) -> None:
    ident = parse_identity(text)
    assert (ident.type, ident.data, str(ident)) == (kind, data, text)


def test_distinguished_names_are_der_most_significant_first() -> None:
    ident = parse_identity("C=CH, O=strongSwan, CN=gw-a")
    assert ident.type is IdType.ID_DER_ASN1_DN
    expected = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "strongSwan"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "gw-a")])
    assert ident.data == expected.public_bytes()


@pytest.mark.parametrize(("value", "seconds"), [
    (30, 30.0), ("30", 30.0), ("30s", 30.0), ("5m", 300.0), ("4h", 14400.0), ("1d", 86400.0),
    ("1.5h", 5400.0),
])
def test_durations(value: object, seconds: float) -> None:
    assert duration(value, ("k",)) == seconds


def test_secrets_both_forms_and_psk_lookup() -> None:
    yaml_form = parse_secrets({"ike": [{"id": ["gw-a.example.net", "gw-b.example.net"],
                                        "secret": "yaml key"},
                                       {"secret": "0x00ff"}]})
    vici_form = parse_secrets({"ike-b": {"id-1": "gw-b.example.net", "id-2": "gw-c",
                                         "secret": "0sYmFzZTY0IGtleQ=="}})
    store = PskStore([*yaml_form, *vici_form])
    a, b, c = (parse_identity(t) for t in ("gw-a.example.net", "gw-b.example.net", "gw-c"))
    assert store.lookup(a, b) == b"yaml key"  # both identities beat one
    assert store.lookup(b, c) == b"base64 key"
    assert store.lookup(parse_identity("gw-d"), None) == b"\x00\xff"  # the wildcard entry
    assert "yaml key" not in repr(yaml_form) and "yaml key" not in repr(store.__dict__.keys())
    store.remove("ike-b")
    assert store.lookup(b, c) == b"yaml key"  # one identity still beats the wildcard


def test_secret_errors() -> None:
    with pytest.raises(ConfigError) as info:
        parse_secrets({"ike": [{"id": "x"}]})
    assert (info.value.path, info.value.reason) == ("secrets.ike[0].secret", "required")
    with pytest.raises(ConfigError) as info:
        parse_secrets({"eap-x": {"secret": "y"}})
    assert info.value.path == "secrets.eap-x"


def test_config_file_carries_the_parsed_model_and_builds_ike_configs() -> None:
    cfg = parse_config({"connections": {"site-b": YAML_CONN},
                        "secrets": {"ike": [{"id": ["gw-a.example.net"], "secret": "k"}]}},
                       allowed_cpus=[0])
    conn = cfg.conns["site-b"]
    ike = ike_config(conn, PskStore(cfg.shared_keys), natt_port=4501)
    assert ike.psk == b"k" and ike.force_encap and ike.natt_port == 4501
    assert ike.child is not None and ike.child.local_ts == network_selectors(
        conn.children[0].local_ts)
    with pytest.raises(ConfigError) as info:
        ike_config(conn, PskStore([SharedKey(("someone-else",), b"k")]))
    assert info.value.path == "connections.site-b.local.auth"
    assert "k" not in info.value.reason.split(": ", 1)[1].split()  # no key in the message


def test_negotiated_ranges_become_prefixes() -> None:
    nets = [ipaddress.ip_network("10.1.0.0/24"), ipaddress.ip_network("10.9.0.0/16")]
    assert selector_networks(network_selectors(nets)) == tuple(nets)


def test_a_wildcard_local_address_resolves_by_route() -> None:
    conn = parse_connection("x", {**YAML_CONN, "local_addrs": ["0.0.0.0"],
                                  "remote_addrs": ["127.0.0.1"]})
    assert resolve_local(conn) == "127.0.0.1"
    assert resolve_local(parse_connection("y", YAML_CONN)) == "192.0.2.1"


def test_volume_limits_parse_with_binary_suffixes_and_are_checked() -> None:
    import copy

    conn = copy.deepcopy(VICI_CONN)
    conn["children"]["lan"].update(rekey_bytes="500k", life_bytes="1M", rekey_packets="1000",
                                   life_packets=2000)
    child = parse_connection("v", conn).children[0]
    assert (child.rekey_bytes, child.life_bytes, child.rekey_packets, child.life_packets) == (
        500 << 10, 1 << 20, 1000, 2000)
    conn["children"]["lan"].update(life_packets="10")
    with pytest.raises(ConfigError) as info:
        parse_connection("v", conn)
    assert info.value.path == "connections.v.children.lan.life_packets"
    assert "below rekey_packets" in info.value.reason
    conn["children"]["lan"].update(life_packets="lots")
    with pytest.raises(ConfigError) as info:
        parse_connection("v", conn)
    assert "not a count" in info.value.reason
