"""controller/config.py: the YAML file loads into the right values, every mistake is one
ConfigError naming the key path and the reason, and key material never shows in a message or
a repr."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import ipaddress
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.config import (
    BatchConfig,
    Config,
    ConfigError,
    ControllerConfig,
    EndpointsConfig,
    InsideConfig,
    OutsideConfig,
    StaticSaDirection,
    load_config,
    parse_config,
    parse_config_text,
)
from controller.run import settings_for
from pipeline.satable import Direction, Mode, Protocol, SaRecord, UdpEncap
from workers.algorithms import AlgorithmError, parse_ah, parse_esp
from workers.sa import SaTable

EXAMPLE = """\
dataplane:
  workers: 2
  inside: {mode: tun, name: espl0}
  outside: {mode: af_packet, interface: veth-a}
static_sas:
  - name: a-to-b
    local_addr: 192.0.2.1
    remote_addr: 192.0.2.2
    mode: tunnel
    encap: true            # ESP in UDP 4500 <-> 4500; false: raw ESP (protocol 50)
    local_ts: [10.1.0.0/24]
    remote_ts: [10.2.0.0/24]
    out: {spi: 0x00001001, enc: aes128gcm16, key: "0x000102030405060708090a0b0c0d0e0f10111213"}
    in:  {spi: 0x00002001, enc: aes128gcm16, key: "0x202122232425262728292a2b2c2d2e2f30313233"}
"""
KEY_OUT = bytes(range(0x00, 0x14))
KEY_IN = bytes(range(0x20, 0x34))
PSK = "this-psk-must-never-be-printed"
CPUS = frozenset(range(4))  # injected, so the tests do not depend on this machine's CPUs
SA: tuple[Any, ...] = ("static_sas", 0)


def secret_fragments(*keys: bytes) -> list[str]:
    """Ways a key could leak into text: hex (either case, with colons) and bytes repr."""
    out = [PSK]
    for key in keys:
        out += [
            key[:6].hex(),
            key[:6].hex().upper(),
            key[-6:].hex(),
            ":".join(f"{b:02x}" for b in key[:4]),
            repr(key[:8])[2:-1],
            repr(key[-8:])[2:-1],
        ]
    return out


SECRETS = secret_fragments(KEY_OUT, KEY_IN)


def assert_no_secrets(text: str, fragments: list[str] = SECRETS) -> None:
    for fragment in fragments:
        assert fragment not in text, f"secret fragment {fragment!r} leaked: {text}"


def base() -> dict[str, Any]:
    data = yaml.safe_load(EXAMPLE)
    assert isinstance(data, dict)
    return data


def second_sa() -> dict[str, Any]:
    return {
        "name": "a-to-c",
        "local_addr": "192.0.2.1",
        "remote_addr": "192.0.2.3",
        "local_ts": ["10.1.0.0/24"],
        "remote_ts": ["10.3.0.0/24"],
        "out": {"spi": 0x1002, "enc": "aes128gcm16", "key": (b"\x40" * 20).hex()},
        "in": {"spi": 0x2002, "enc": "aes128gcm16", "key": (b"\x60" * 20).hex()},
    }


def parse(mapping: dict[str, Any]) -> Config:
    return parse_config(mapping, allowed_cpus=CPUS)


# --- the example --------------------------------------------------------------------------------


def test_example_file_loads_with_the_right_values(tmp_path: Path) -> None:
    path = tmp_path / "espline.yaml"
    path.write_text(EXAMPLE)
    cfg = load_config(path, allowed_cpus=CPUS)

    dp = cfg.dataplane
    assert (dp.workers, dp.cpus, dp.batch, dp.replay_window, dp.mss_clamp, dp.mtu) == (
        2,
        (0, 1, 2, 3),
        BatchConfig(256, 50),
        64,
        "auto",
        1500,
    )
    assert dp.inside == InsideConfig("tun", "espl0")
    assert dp.outside == OutsideConfig("af_packet", "veth-a", fanout=True)
    assert dp.hugepages  # pipeline/heap.py, on by default
    assert dp.endpoints == EndpointsConfig.under("/run/espline")
    assert cfg.controller == ControllerConfig("/run/espline/vici.sock", None, None, "text")
    assert (dict(cfg.connections), dict(cfg.secrets), dict(cfg.pools)) == ({}, {}, {})

    (sa,) = cfg.static_sas
    assert sa.name == "a-to-b"
    assert sa.local_addr == ipaddress.IPv4Address("192.0.2.1")
    assert sa.remote_addr == ipaddress.IPv4Address("192.0.2.2")
    assert (sa.mode, sa.protocol, sa.encap) == (Mode.TUNNEL, Protocol.ESP, UdpEncap(4500, 4500))
    assert sa.local_ts == (ipaddress.ip_network("10.1.0.0/24"),)
    assert sa.remote_ts == (ipaddress.ip_network("10.2.0.0/24"),)
    assert (sa.replay_window, sa.esn, sa.tfc_pad) == (64, False, 0)
    assert sa.outbound == StaticSaDirection(0x1001, "aes128gcm16", KEY_OUT)
    assert sa.inbound == StaticSaDirection(0x2001, "aes128gcm16", KEY_IN)


def test_example_records_are_what_the_data_plane_installs() -> None:
    cfg = parse(base())
    out, inb = cfg.static_sas[0].records()
    assert cfg.sa_records() == (out, inb)
    common = dict(
        alg="aes128gcm16",
        local_addr=ipaddress.IPv4Address("192.0.2.1"),
        remote_addr=ipaddress.IPv4Address("192.0.2.2"),
        protocol=Protocol.ESP,
        mode=Mode.TUNNEL,
        encap=UdpEncap(),
        esn=False,
        name="a-to-b",
    )
    assert out == SaRecord(
        spi=0x1001, direction=Direction.OUT, enc_key=KEY_OUT, replay_window=0, **common
    )
    assert inb == SaRecord(
        spi=0x2001, direction=Direction.IN, enc_key=KEY_IN, replay_window=64, **common
    )
    table = SaTable()  # the workers' own key-length checks are an independent oracle
    for record in (out, inb):
        table.install(record)
    assert len(table) == 2


def test_defaults_for_an_empty_document() -> None:
    for doc in (None, {}):
        cfg = parse_config(doc, allowed_cpus={5, 3})
        assert (cfg.dataplane.workers, cfg.dataplane.cpus) == (2, (3, 5))
        assert cfg.dataplane.inside == InsideConfig("tun", "espl0")
        assert cfg.dataplane.outside == OutsideConfig("socket", None)
        assert cfg.static_sas == ()
    assert parse_config({}).dataplane.workers == max(1, len(os.sched_getaffinity(0)))


# --- accepted variants ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        KEY_OUT.hex(),
        "0x" + KEY_OUT.hex(),
        "0X" + KEY_OUT.hex().upper(),
        ":".join(f"{b:02x}" for b in KEY_OUT),
        "  0x" + KEY_OUT.hex() + " ",
    ],
)
def test_key_material_formats(text: str) -> None:
    c = base()
    c["static_sas"][0]["out"]["key"] = text
    assert parse(c).static_sas[0].outbound.enc_key == KEY_OUT


def test_spi_as_hex_string_and_the_same_spi_in_both_directions() -> None:
    c = base()
    c["static_sas"][0]["out"]["spi"] = "0x2001"
    sa = parse(c).static_sas[0]
    assert (sa.outbound.spi, sa.inbound.spi) == (0x2001, 0x2001)


def test_transport_mode_defaults_selectors_to_the_endpoints() -> None:
    c = base()
    sa = c["static_sas"][0]
    sa["mode"] = "transport"
    del sa["local_ts"]
    sa["remote_ts"] = "192.0.2.2/32"
    parsed = parse(c).static_sas[0]
    assert parsed.mode is Mode.TRANSPORT
    assert parsed.local_ts == (ipaddress.ip_network("192.0.2.1/32"),)
    assert parsed.remote_ts == (ipaddress.ip_network("192.0.2.2/32"),)


def test_selectors_mixed_families_and_comma_string() -> None:
    c = base()
    c["static_sas"][0]["local_ts"] = ["10.1.0.0/24", "2001:db8:1::/48", "10.9.9.9"]
    c["static_sas"][0]["remote_ts"] = "10.2.0.0/24, 2001:db8:2::/48"
    sa = parse(c).static_sas[0]
    assert sa.local_ts == tuple(
        map(ipaddress.ip_network, ["10.1.0.0/24", "2001:db8:1::/48", "10.9.9.9/32"])
    )
    assert sa.remote_ts == tuple(map(ipaddress.ip_network, ["10.2.0.0/24", "2001:db8:2::/48"]))


def test_ipv6_outer_addresses() -> None:
    c = base()
    c["static_sas"][0].update(local_addr="2001:db8::1", remote_addr="2001:db8::2")
    out, inb = parse(c).static_sas[0].records()
    assert out.ipv6 and inb.local_addr == ipaddress.IPv6Address("2001:db8::1")


def test_encap_ports_and_raw_esp() -> None:
    c = base()
    c["static_sas"][0]["encap"] = {"remote_port": 31000}
    assert parse(c).static_sas[0].encap == UdpEncap(4500, 31000)
    c["static_sas"][0]["encap"] = False
    assert parse(c).static_sas[0].encap is None
    del c["static_sas"][0]["encap"]
    assert parse(c).static_sas[0].encap is None


def test_cbc_hmac_sa() -> None:
    c = base()
    integ = bytes(range(100, 132))
    c["static_sas"][0]["out"] = {
        "spi": 0x1001,
        "enc": "aes128-sha2_256",
        "key": KEY_OUT[:16].hex(),
        "integ_key": integ.hex(),
    }
    out, _ = parse(c).static_sas[0].records()
    assert (out.alg, out.enc_key, out.integ_key) == ("aes128-sha256", KEY_OUT[:16], integ)
    SaTable().install(out)


def test_ah_sa() -> None:
    c = base()
    sa = c["static_sas"][0]
    sa["protocol"] = "ah"
    del sa["encap"]
    k1, k2 = bytes(range(32)), bytes(range(32, 64))
    sa["out"] = {"spi": 0x1001, "integ": "sha256", "integ_key": k1.hex()}
    sa["in"] = {"spi": 0x2001, "integ": "sha2_256", "integ_key": k2.hex()}
    out, inb = parse(c).static_sas[0].records()
    assert (out.protocol, out.alg, out.integ_key, out.enc_key) == (Protocol.AH, "sha256", k1, b"")
    assert (inb.alg, inb.integ_key) == ("sha256", k2)
    table = SaTable()
    table.install(out)
    table.install(inb)


def test_esn_from_the_keyword_or_the_key() -> None:
    c = base()
    c["static_sas"][0]["out"]["enc"] = "aes128gcm16-esn"
    sa = parse(c).static_sas[0]
    assert sa.esn and sa.outbound.alg == "aes128gcm16"
    assert all(r.esn for r in sa.records())
    c = base()
    c["static_sas"][0]["esn"] = True
    assert parse(c).static_sas[0].esn


def test_replay_window_inherits_and_overrides() -> None:
    c = base()
    c["dataplane"]["replay_window"] = 0
    c["static_sas"].append(second_sa())
    c["static_sas"][1]["replay_window"] = 4096
    first, second = parse(c).static_sas
    assert (first.replay_window, second.replay_window) == (0, 4096)
    assert second.records()[1].replay_window == 4096


@pytest.mark.parametrize(("value", "expected"), [(True, "auto"), (False, None), (1360, 1360)])
def test_mss_clamp(value: object, expected: object) -> None:
    c = base()
    c["dataplane"]["mss_clamp"] = value
    assert parse(c).dataplane.mss_clamp == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1-2", (1, 2)),
        ("3", (3,)),
        ("0,2-3", (0, 2, 3)),
        ([3, 0], (3, 0)),
    ],
)
def test_cpus_and_the_default_worker_count(value: object, expected: tuple[int, ...]) -> None:
    c = base()
    c["dataplane"]["cpus"] = value
    del c["dataplane"]["workers"]
    dp = parse(c).dataplane
    assert (dp.cpus, dp.workers) == (expected, len(expected))


def test_dataplane_sections_in_full() -> None:
    c = base()
    c["dataplane"].update(
        batch={"max_packets": 4096, "max_wait_us": 0, "handoff_min": 64},
        mtu=9000,
        inside={"mode": "af_packet", "interface": "eth1"},
        outside={"mode": "af_packet", "interface": "eth0", "fanout": False, "ring": "v2"},
        endpoints={"runtime_dir": "/tmp/e/", "batches": "tcp://10.0.0.5:5555"},
        hugepages=False,
    )
    dp = parse(c).dataplane
    assert not dp.hugepages
    assert InsideConfig().offload  # TUN offloads by default (pipeline/offload.py)
    assert OutsideConfig().ring == "auto"  # V2 while sparse, V3 while busy (pipeline/rxpair.py)
    c2 = base()
    c2["dataplane"]["inside"] = {"mode": "tun", "name": "espl1", "offload": False}
    assert parse(c2).dataplane.inside == InsideConfig("tun", "espl1", offload=False)
    c2["dataplane"]["inside"] = {"mode": "af_packet", "interface": "eth1", "offload": False}
    assert parse(c2).dataplane.inside == InsideConfig("af_packet", "eth1", offload=False)
    assert (dp.batch, dp.mtu) == (BatchConfig(4096, 0, 64), 9000)
    assert settings_for(dp).handoff_min == 64
    assert dp.inside == InsideConfig("af_packet", "eth1")
    assert dp.outside == OutsideConfig("af_packet", "eth0", fanout=False, ring="v2")
    assert dp.endpoints == dataclasses.replace(
        EndpointsConfig.under("/tmp/e"), batches="tcp://10.0.0.5:5555"
    )
    assert dp.endpoints.sa_updates == "ipc:///tmp/e/sa_updates.ipc"


def test_outside_socket_may_name_an_interface() -> None:
    c = base()
    c["dataplane"]["outside"] = {"mode": "socket", "interface": "eth0"}
    assert parse(c).dataplane.outside == OutsideConfig("socket", "eth0")


def test_controller_section() -> None:
    c = base()
    c["controller"] = {
        "vici_socket": "/tmp/v.sock",
        "metrics_listen": "[::]:9100",
        "keylog_dir": "/var/log/espline",
        "log_format": "json",
        "log_level": "warning",
    }
    assert parse(c).controller == ControllerConfig(
        "/tmp/v.sock", "[::]:9100", "/var/log/espline", "json", "warning"
    )
    assert parse(base()).controller.log_level == "info"


def test_swanctl_sections_pass_through_raw_and_copied() -> None:
    c = base()
    gw = {"remote_addrs": ["198.51.100.1"], "local": {"auth": "psk"}, "remote": {"auth": "psk"},
          "children": {"net": {"local_ts": ["10.1.0.0/24"], "remote_ts": ["10.2.0.0/24"]}}}
    c["connections"] = {"gw": copy.deepcopy(gw)}
    c["secrets"] = {"ike-gw": {"id": "gw", "secret": PSK}}
    c["pools"] = {"p": {"addrs": "10.3.0.0/24"}}
    cfg = parse(c)
    c["connections"]["gw"]["remote_addrs"].append("changed")
    assert cfg.connections == {"gw": gw}
    assert cfg.conns["gw"].remote_addrs == ("198.51.100.1",)
    assert [k.owners for k in cfg.shared_keys] == [("gw",)]
    assert cfg.secrets["ike-gw"]["secret"] == PSK
    assert cfg.pools == {"p": {"addrs": "10.3.0.0/24"}}
    assert "ike-gw" in repr(cfg.secrets)
    assert_no_secrets(repr(cfg) + repr(cfg.secrets) + str(cfg))


def test_config_objects_are_frozen() -> None:
    cfg = parse(base())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.static_sas[0].outbound.spi = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.connections["x"] = 1  # type: ignore[index]


def test_no_key_material_in_any_repr() -> None:
    c = base()
    c["secrets"] = {"ike": {"secret": PSK}}
    cfg = parse(c)
    sa = cfg.static_sas[0]
    texts = [
        repr(cfg),
        str(cfg),
        repr(sa),
        repr(sa.outbound),
        repr(sa.inbound),
        repr(sa.records()),
        repr(cfg.sa_records()),
    ]
    assert "a-to-b" in texts[0]  # the reprs are real, just without keys
    for text in texts:
        assert_no_secrets(text)


# --- errors: (mutation, path, reason) -------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]
DROP = object()


def at(keys: tuple[Any, ...], value: object = DROP) -> Mutation:
    def mutate(c: dict[str, Any]) -> None:
        node: Any = c
        for key in keys[:-1]:
            node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
        if value is DROP:
            del node[keys[-1]]
        else:
            node[keys[-1]] = copy.deepcopy(value)

    return mutate


def seq(*mutations: Mutation) -> Mutation:
    def mutate(c: dict[str, Any]) -> None:
        for m in mutations:
            m(c)

    return mutate


def add_second(**changes: Any) -> Mutation:
    def mutate(c: dict[str, Any]) -> None:
        sa = second_sa()
        for key, value in changes.items():
            if key.endswith("_spi"):
                sa[key.removesuffix("_spi")]["spi"] = value
            else:
                sa[key] = value
        c["static_sas"].append(sa)

    return mutate


def ah(out: dict[str, Any] | None = None) -> Mutation:
    return seq(
        at((*SA, "protocol"), "ah"),
        at((*SA, "encap")),
        at((*SA, "out"), out or {"spi": 0x1001, "integ": "sha256", "integ_key": bytes(32).hex()}),
        at((*SA, "in"), {"spi": 0x2001, "integ": "sha256", "integ_key": bytes(32).hex()}),
    )


def alg_error(keyword: str, ah_: bool = False) -> str:
    with pytest.raises(AlgorithmError) as info:
        (parse_ah if ah_ else parse_esp)(keyword)
    return str(info.value)


H20 = bytes(range(50, 70)).hex()  # a right-length AEAD key that is not one of the example's
OUT, IN = (*SA, "out"), (*SA, "in")
NOT_HEX = "not hex: expected hex digits, optionally 0x-prefixed or colon-separated"
SPI_RANGE = "is not in 0x100..0xffffffff (1-255 are reserved, 0 is local-only)"
ALLOWED = "is not in this process's allowed set 0-3 (os.sched_getaffinity)"

ERROR_CASES: list[tuple[str, Mutation, str, str]] = [
    # required keys
    ("missing name", at((*SA, "name")), "static_sas[0].name", "required"),
    ("missing local_addr", at((*SA, "local_addr")), "static_sas[0].local_addr", "required"),
    ("missing remote_addr", at((*SA, "remote_addr")), "static_sas[0].remote_addr", "required"),
    ("missing local_ts", at((*SA, "local_ts")), "static_sas[0].local_ts", "required"),
    ("missing remote_ts", at((*SA, "remote_ts")), "static_sas[0].remote_ts", "required"),
    ("missing out", at(OUT), "static_sas[0].out", "required"),
    ("missing in", at(IN), "static_sas[0].in", "required"),
    ("missing spi", at((*OUT, "spi")), "static_sas[0].out.spi", "required"),
    ("missing enc", at((*IN, "enc")), "static_sas[0].in.enc", "required"),
    ("missing key", at((*IN, "key")), "static_sas[0].in.key", "required"),
    (
        "missing integ_key (cbc)",
        at(OUT, {"spi": 0x1001, "enc": "aes128-sha256", "key": H20[:32]}),
        "static_sas[0].out.integ_key",
        "required",
    ),
    (
        "missing integ (ah)",
        ah({"spi": 0x1001, "integ_key": "00" * 32}),
        "static_sas[0].out.integ",
        "required",
    ),
    (
        "missing integ_key (ah)",
        ah({"spi": 0x1001, "integ": "sha256"}),
        "static_sas[0].out.integ_key",
        "required",
    ),
    (
        "missing outside interface",
        at(("dataplane", "outside", "interface")),
        "dataplane.outside.interface",
        "required",
    ),
    (
        "missing inside interface",
        at(("dataplane", "inside"), {"mode": "af_packet"}),
        "dataplane.inside.interface",
        "required",
    ),
    # wrong types
    (
        "workers string",
        at(("dataplane", "workers"), "two"),
        "dataplane.workers",
        "expected an integer, got a string",
    ),
    (
        "workers bool",
        at(("dataplane", "workers"), True),
        "dataplane.workers",
        "expected an integer, got a boolean",
    ),
    ("dataplane list", at(("dataplane",), []), "dataplane", "expected a mapping, got a list"),
    (
        "static_sas mapping",
        at(("static_sas",), {"a": 1}),
        "static_sas",
        "expected a list of SAs, got a mapping",
    ),
    ("sa not a mapping", at(SA, "a-to-b"), "static_sas[0]", "expected a mapping, got a string"),
    ("out not a mapping", at(OUT, "x"), "static_sas[0].out", "expected a mapping, got a string"),
    (
        "encap string",
        at((*SA, "encap"), "yes"),
        "static_sas[0].encap",
        "expected true, false or a mapping with local_port/remote_port, got a string",
    ),
    (
        "fanout string",
        at(("dataplane", "outside", "fanout"), "yes"),
        "dataplane.outside.fanout",
        "expected true or false, got a string",
    ),
    (
        "hugepages string",
        at(("dataplane", "hugepages"), "off"),
        "dataplane.hugepages",
        "expected true or false, got a string",
    ),
    (
        "esn string",
        at((*SA, "esn"), "no"),
        "static_sas[0].esn",
        "expected true or false, got a string",
    ),
    ("name int", at((*SA, "name"), 7), "static_sas[0].name", "expected a string, got an integer"),
    (
        "ts int",
        at((*SA, "local_ts"), 5),
        "static_sas[0].local_ts",
        "expected a list of CIDR prefixes, got an integer",
    ),
    (
        "ts item int",
        at((*SA, "remote_ts"), ["10.2.0.0/24", 5]),
        "static_sas[0].remote_ts[1]",
        "expected a CIDR prefix like 10.1.0.0/24, got an integer",
    ),
    (
        "addr int",
        at((*SA, "local_addr"), 3221225985),
        "static_sas[0].local_addr",
        "expected an IP address, got an integer (quote it: YAML read it as a number)",
    ),
    (
        "key int",
        at((*OUT, "key"), 0x102030405060708090A0B0C0D0E0F10111213),
        "static_sas[0].out.key",
        "write key material as a quoted string: "
        "YAML read it as a number, which loses leading zeros",
    ),
    (
        "key list",
        at((*OUT, "key"), [1, 2]),
        "static_sas[0].out.key",
        "expected a hex string, got a list",
    ),
    (
        "spi float",
        at((*OUT, "spi"), 1.5),
        "static_sas[0].out.spi",
        "expected an SPI (integer or 0x-prefixed hex), got a number with a fraction",
    ),
    (
        "spi bool",
        at((*OUT, "spi"), True),
        "static_sas[0].out.spi",
        "expected an SPI (integer or 0x-prefixed hex), got a boolean",
    ),
    (
        "mode typo",
        at((*SA, "mode"), "tunel"),
        "static_sas[0].mode",
        "'tunel' is not one of tunnel, transport",
    ),
    (
        "protocol typo",
        at((*SA, "protocol"), "esp4"),
        "static_sas[0].protocol",
        "'esp4' is not one of esp, ah",
    ),
    (
        "inside mode",
        at(("dataplane", "inside", "mode"), 1),
        "dataplane.inside.mode",
        "expected one of tun, af_packet, got an integer",
    ),
    (
        "log_format",
        at(("controller", "log_format"), "xml"),
        "controller.log_format",
        "'xml' is not one of text, json",
    ),
    (
        "log_level",
        at(("controller", "log_level"), "verbose"),
        "controller.log_level",
        "'verbose' is not one of debug, info, warning, error",
    ),
    (
        "mss_clamp string",
        at(("dataplane", "mss_clamp"), "yes"),
        "dataplane.mss_clamp",
        "expected true (clamp to the path MTU minus overhead), false or an MSS, got a string",
    ),
    (
        "vici_socket int",
        at(("controller", "vici_socket"), 5),
        "controller.vici_socket",
        "expected a string, got an integer",
    ),
    ("keylog_dir empty", at(("controller", "keylog_dir"), ""), "controller.keylog_dir", "empty"),
    (
        "metrics_listen port only",
        at(("controller", "metrics_listen"), "9100"),
        "controller.metrics_listen",
        "'9100' is not host:port (e.g. 127.0.0.1:9100, [::]:9100, :9100)",
    ),
    (
        "metrics_listen bare v6",
        at(("controller", "metrics_listen"), "::1:9100"),
        "controller.metrics_listen",
        "'::1:9100' is not host:port (write IPv6 addresses as [addr]:port)",
    ),
    (
        "non-string key",
        at(("dataplane", 1), 2),
        "dataplane['1']",
        "keys must be strings, got an integer",
    ),
    (
        "connections list",
        at(("connections",), ["gw"]),
        "connections",
        "expected a mapping, got a list",
    ),
    ("secrets string", at(("secrets",), PSK), "secrets", "expected a mapping, got a string"),
    # bad hex
    (
        "hex bad digit",
        at((*OUT, "key"), "0x" + KEY_OUT.hex()[:-2] + "zz"),
        "static_sas[0].out.key",
        NOT_HEX,
    ),
    (
        "hex odd",
        at((*OUT, "key"), KEY_OUT.hex()[:-1]),
        "static_sas[0].out.key",
        "odd number of hex digits (39): each byte takes two",
    ),
    (
        "hex colon",
        at((*OUT, "key"), ":".join(f"{b:x}" for b in KEY_OUT)),
        "static_sas[0].out.key",
        "not colon-separated hex: each byte takes two hex digits, like 0a:1b:2c",
    ),
    ("hex empty", at((*OUT, "key"), "0x"), "static_sas[0].out.key", "empty"),
    ("hex spaces", at((*OUT, "key"), KEY_OUT.hex(" ")), "static_sas[0].out.key", NOT_HEX),
    # key lengths
    (
        "key short",
        at((*OUT, "key"), KEY_OUT[:19].hex()),
        "static_sas[0].out.key",
        "19 bytes given, aes128gcm16 needs 20 (16-byte key + 4-byte salt)",
    ),
    (
        "key without salt",
        at((*IN, "enc"), "aes256gcm16"),
        "static_sas[0].in.key",
        "20 bytes given, aes256gcm16 needs 36 (32-byte key + 4-byte salt)",
    ),
    (
        "chacha key",
        at((*IN, "enc"), "chacha20poly1305"),
        "static_sas[0].in.key",
        "20 bytes given, chacha20poly1305 needs 36 (32-byte key + 4-byte salt)",
    ),
    (
        "cbc key",
        at(OUT, {"spi": 0x1001, "enc": "aes256-sha384", "key": H20[:32], "integ_key": "00" * 48}),
        "static_sas[0].out.key",
        "16 bytes given, aes256-sha384 needs 32",
    ),
    (
        "cbc integ_key",
        at(OUT, {"spi": 0x1001, "enc": "aes128-sha256", "key": H20[:32], "integ_key": "00" * 31}),
        "static_sas[0].out.integ_key",
        "31 bytes given, aes128-sha256 needs 32",
    ),
    (
        "aead integ_key",
        at((*OUT, "integ_key"), "00" * 32),
        "static_sas[0].out.integ_key",
        "aes128gcm16 is an AEAD and takes no integrity key",
    ),
    (
        "null with key",
        at(OUT, {"spi": 0x1001, "enc": "null-sha256", "key": H20, "integ_key": "00" * 32}),
        "static_sas[0].out.key",
        "null-sha256 takes no encryption key",
    ),
    (
        "ah integ_key",
        ah({"spi": 0x1001, "integ": "sha384", "integ_key": "00" * 20}),
        "static_sas[0].out.integ_key",
        "20 bytes given, sha384 needs 48",
    ),
    # algorithms
    (
        "unknown enc",
        at((*OUT, "enc"), "aes128gcm8"),
        "static_sas[0].out.enc",
        alg_error("aes128gcm8"),
    ),
    (
        "unknown integ",
        at((*OUT, "enc"), "aes128-md5"),
        "static_sas[0].out.enc",
        alg_error("aes128-md5"),
    ),
    (
        "unknown ah integ",
        ah({"spi": 0x1001, "integ": "md5", "integ_key": "00" * 16}),
        "static_sas[0].out.integ",
        alg_error("md5", ah_=True),
    ),
    (
        "integ under esp",
        at((*OUT, "integ"), "sha256"),
        "static_sas[0].out.integ",
        "ESP names its integrity algorithm in enc (e.g. aes128-sha256); integ is for protocol: ah",
    ),
    (
        "enc under ah",
        ah({"spi": 0x1001, "enc": "aes128gcm16", "integ": "sha256"}),
        "static_sas[0].out.enc",
        "AH has no encryption: give integ and integ_key",
    ),
    # SPIs
    ("spi reserved", at((*OUT, "spi"), 0xFF), "static_sas[0].out.spi", f"0xff {SPI_RANGE}"),
    ("spi zero", at((*IN, "spi"), 0), "static_sas[0].in.spi", f"0x0 {SPI_RANGE}"),
    (
        "spi too big",
        at((*OUT, "spi"), 1 << 32),
        "static_sas[0].out.spi",
        f"0x100000000 {SPI_RANGE}",
    ),
    (
        "spi decimal string",
        at((*OUT, "spi"), "4097"),
        "static_sas[0].out.spi",
        "'4097' is not an SPI: write an integer or 0x-prefixed hex",
    ),
    (
        "spi bad hex string",
        at((*OUT, "spi"), "0x10g1"),
        "static_sas[0].out.spi",
        "'0x10g1' is not an SPI: write an integer or 0x-prefixed hex",
    ),
    # duplicates
    (
        "duplicate name",
        add_second(name="a-to-b"),
        "static_sas[1].name",
        "'a-to-b' is already the name of static_sas[0]",
    ),
    (
        "duplicate out spi",
        add_second(out_spi=0x1001),
        "static_sas[1].out.spi",
        "0x1001 is already the outbound SPI of static_sas[0] (a-to-b)",
    ),
    (
        "duplicate in spi",
        add_second(in_spi=0x2001),
        "static_sas[1].in.spi",
        "0x2001 is already the inbound SPI of static_sas[0] (a-to-b)",
    ),
    (
        "aead key reused across directions",
        at((*IN, "key"), KEY_OUT.hex()),
        "static_sas[0].in.key",
        "the same key material as static_sas[0].out.key: every direction of every SA needs its "
        "own AEAD key (a repeated key and nonce breaks it)",
    ),
    (
        "duplicate selector",
        at((*SA, "local_ts"), ["10.1.0.0/24", "10.1.0.0/24"]),
        "static_sas[0].local_ts[1]",
        "10.1.0.0/24 is listed twice",
    ),
    # addresses and selectors
    (
        "family v4/v6",
        at((*SA, "remote_addr"), "2001:db8::2"),
        "static_sas[0].remote_addr",
        "IPv6 address, but local_addr 192.0.2.1 is IPv4 (both ends of an SA share one family)",
    ),
    (
        "family v6/v4",
        at((*SA, "local_addr"), "2001:db8::1"),
        "static_sas[0].remote_addr",
        "IPv4 address, but local_addr 2001:db8::1 is IPv6 (both ends of an SA share one family)",
    ),
    (
        "bad address",
        at((*SA, "local_addr"), "192.0.2.300"),
        "static_sas[0].local_addr",
        "'192.0.2.300' is not an IPv4 or IPv6 address",
    ),
    (
        "unspecified address",
        at((*SA, "remote_addr"), "0.0.0.0"),
        "static_sas[0].remote_addr",
        "0.0.0.0 is not a unicast address",
    ),
    (
        "multicast address",
        at((*SA, "remote_addr"), "ff02::1"),
        "static_sas[0].remote_addr",
        "ff02::1 is not a unicast address",
    ),
    (
        "ts host bits",
        at((*SA, "local_ts"), ["10.1.0.1/24"]),
        "static_sas[0].local_ts[0]",
        "'10.1.0.1/24' has host bits set (did you mean 10.1.0.0/24?)",
    ),
    (
        "ts garbage",
        at((*SA, "local_ts"), "10.1.0.0/33"),
        "static_sas[0].local_ts",
        "'10.1.0.0/33' is not a CIDR prefix like 10.1.0.0/24 or 2001:db8::/64",
    ),
    (
        "ts empty",
        at((*SA, "remote_ts"), []),
        "static_sas[0].remote_ts",
        "empty: give at least one prefix",
    ),
    (
        "transport wide ts",
        at((*SA, "mode"), "transport"),
        "static_sas[0].local_ts[0]",
        "transport mode protects only 192.0.2.1/32 (local_addr); use mode: tunnel for 10.1.0.0/24",
    ),
    # unknown keys
    (
        "unknown top with hint",
        at(("static_sa",), []),
        "static_sa",
        "unknown key (did you mean 'static_sas'?)",
    ),
    (
        "unknown top",
        at(("zzz",), 1),
        "zzz",
        "unknown key (known: controller, dataplane, static_sas, connections, secrets, pools, "
        "authorities)",
    ),
    (
        "unknown dataplane",
        at(("dataplane", "worker"), 2),
        "dataplane.worker",
        "unknown key (did you mean 'workers'?)",
    ),
    (
        "unknown batch",
        at(("dataplane", "batch", "max_packet"), 2),
        "dataplane.batch.max_packet",
        "unknown key (did you mean 'max_packets'?)",
    ),
    (
        "unknown sa",
        at((*SA, "remote_tss"), []),
        "static_sas[0].remote_tss",
        "unknown key (did you mean 'remote_ts'?)",
    ),
    (
        "unknown direction",
        at((*OUT, "spii"), 1),
        "static_sas[0].out.spii",
        "unknown key (did you mean 'spi'?)",
    ),
    (
        "unknown encap",
        at((*SA, "encap"), {"local": 1}),
        "static_sas[0].encap.local",
        "unknown key (did you mean 'local_port'?)",
    ),
    (
        "unknown controller",
        at(("controller", "keylog"), "/x"),
        "controller.keylog",
        "unknown key (did you mean 'keylog_dir'?)",
    ),
    (
        "unknown endpoint",
        at(("dataplane", "endpoints", "batch"), "ipc:///x"),
        "dataplane.endpoints.batch",
        "unknown key (did you mean 'batches'?)",
    ),
    # cpus (allowed: 0-3)
    ("cpus range outside", at(("dataplane", "cpus"), "0-9"), "dataplane.cpus", f"CPU 4 {ALLOWED}"),
    (
        "cpus list outside",
        at(("dataplane", "cpus"), [0, 7]),
        "dataplane.cpus[1]",
        f"CPU 7 {ALLOWED}",
    ),
    (
        "cpus backwards",
        at(("dataplane", "cpus"), "3-1"),
        "dataplane.cpus",
        "'3-1' is a backwards range",
    ),
    (
        "cpus garbage",
        at(("dataplane", "cpus"), "a-b"),
        "dataplane.cpus",
        "'a-b' is not a CPU list like \"2-5,8\"",
    ),
    (
        "cpus twice in list",
        at(("dataplane", "cpus"), [0, 0]),
        "dataplane.cpus[1]",
        "CPU 0 is listed twice",
    ),
    (
        "cpus twice in ranges",
        at(("dataplane", "cpus"), "0-2,1"),
        "dataplane.cpus",
        "CPU 1 is listed twice",
    ),
    (
        "cpus int",
        at(("dataplane", "cpus"), 2),
        "dataplane.cpus",
        'expected a list of CPU ids or a range string like "2-5,8", got an integer',
    ),
    ("cpus empty", at(("dataplane", "cpus"), []), "dataplane.cpus", "no CPUs given"),
    (
        "cpus item string",
        at(("dataplane", "cpus"), ["1"]),
        "dataplane.cpus[0]",
        "expected a CPU id, got a string",
    ),
    # out of range
    ("workers 0", at(("dataplane", "workers"), 0), "dataplane.workers", "0 is outside 1..1024"),
    (
        "max_packets 0",
        at(("dataplane", "batch"), {"max_packets": 0}),
        "dataplane.batch.max_packets",
        "0 is outside 1..4096",
    ),
    (
        "max_packets 4097",
        at(("dataplane", "batch"), {"max_packets": 4097}),
        "dataplane.batch.max_packets",
        "4097 is outside 1..4096",
    ),
    (
        "handoff_min above max_packets",
        at(("dataplane", "batch"), {"max_packets": 64, "handoff_min": 65}),
        "dataplane.batch.handoff_min",
        "65 is more than max_packets (64): no batch would ever reach a worker",
    ),
    (
        "handoff_min 0",
        at(("dataplane", "batch"), {"handoff_min": 0}),
        "dataplane.batch.handoff_min",
        "0 is outside 1..4096",
    ),
    (
        "max_wait_us negative",
        at(("dataplane", "batch"), {"max_wait_us": -1}),
        "dataplane.batch.max_wait_us",
        "-1 is outside 0..1000000",
    ),
    (
        "replay_window 16",
        at(("dataplane", "replay_window"), 16),
        "dataplane.replay_window",
        "16 is outside 32..65536 (0 disables anti-replay)",
    ),
    (
        "replay_window 65537",
        at(("dataplane", "replay_window"), 65537),
        "dataplane.replay_window",
        "65537 is outside 32..65536 (0 disables anti-replay)",
    ),
    (
        "sa replay_window 31",
        at((*SA, "replay_window"), 31),
        "static_sas[0].replay_window",
        "31 is outside 32..65536 (0 disables anti-replay)",
    ),
    ("mtu", at(("dataplane", "mtu"), 575), "dataplane.mtu", "575 is outside 576..65535"),
    ("mss", at(("dataplane", "mss_clamp"), 87), "dataplane.mss_clamp", "87 is outside 88..65495"),
    ("tfc_pad", at((*SA, "tfc_pad"), 9001), "static_sas[0].tfc_pad", "9001 is outside 0..9000"),
    (
        "encap port",
        at((*SA, "encap"), {"local_port": 0}),
        "static_sas[0].encap.local_port",
        "0 is outside 1..65535",
    ),
    (
        "ipv6 needs 1280",
        seq(
            at(("dataplane", "mtu"), 1000),
            at((*SA, "local_addr"), "2001:db8::1"),
            at((*SA, "remote_addr"), "2001:db8::2"),
        ),
        "dataplane.mtu",
        "1000 is below IPv6's minimum link MTU 1280 (RFC 8200 §5), needed by static_sas[0]",
    ),
    # protocol combinations
    (
        "ah with encap",
        seq(ah(), at((*SA, "encap"), True)),
        "static_sas[0].encap",
        "AH cannot be UDP-encapsulated (RFC 3948 covers ESP only)",
    ),
    (
        "ah with tfc",
        seq(ah(), at((*SA, "tfc_pad"), 100)),
        "static_sas[0].tfc_pad",
        "AH has no padding (TFC padding is ESP's, RFC 4303 §2.7)",
    ),
    (
        "esn key vs keyword",
        seq(at((*SA, "esn"), False), at((*OUT, "enc"), "aes128gcm16-esn")),
        "static_sas[0].out.enc",
        "ESN on here, but esn turns it off",
    ),
    (
        "esn out vs in",
        seq(at((*OUT, "enc"), "aes128gcm16-esn"), at((*IN, "enc"), "aes128gcm16-noesn")),
        "static_sas[0].in.enc",
        "ESN off here, but out.enc turns it on",
    ),
    # interfaces and endpoints
    (
        "ifname too long",
        at(("dataplane", "outside", "interface"), "a" * 16),
        "dataplane.outside.interface",
        "'aaaaaaaaaaaaaaaa' is not a Linux interface name "
        "(at most 15 bytes, no '/', ':' or spaces)",
    ),
    (
        "ifname slash",
        at(("dataplane", "inside", "name"), "tun/0"),
        "dataplane.inside.name",
        "'tun/0' is not a Linux interface name (at most 15 bytes, no '/', ':' or spaces)",
    ),
    (
        "inside is outside",
        at(("dataplane", "inside"), {"mode": "af_packet", "interface": "veth-a"}),
        "dataplane.inside.interface",
        "'veth-a' is also the outside interface",
    ),
    (
        "fanout on socket",
        at(("dataplane", "outside"), {"mode": "socket", "fanout": True}),
        "dataplane.outside.fanout",
        "only for mode af_packet",
    ),
    (
        "ring on socket",
        at(("dataplane", "outside"), {"mode": "socket", "ring": "v2"}),
        "dataplane.outside.ring",
        "only for mode af_packet",
    ),
    (
        "ring unknown",
        at(("dataplane", "outside"), {"mode": "af_packet", "interface": "eth0", "ring": "v1"}),
        "dataplane.outside.ring",
        "'v1' is not one of auto, v2, v3",
    ),
    (
        "tun with interface",
        at(("dataplane", "inside", "interface"), "eth1"),
        "dataplane.inside.interface",
        "only for mode af_packet (a TUN device takes name)",
    ),
    (
        "af_packet with name",
        at(("dataplane", "inside"), {"mode": "af_packet", "name": "x"}),
        "dataplane.inside.name",
        "only for mode tun (af_packet takes interface)",
    ),
    (
        "offload not a bool",
        at(("dataplane", "inside", "offload"), "yes please"),
        "dataplane.inside.offload",
        "expected true or false, got a string",
    ),
    (
        "keys over tcp",
        at(("dataplane", "endpoints", "sa_updates"), "tcp://10.0.0.1:5556"),
        "dataplane.endpoints.sa_updates",
        "tcp:// would carry SA keys unauthenticated (CurveZMQ is not supported yet); use ipc://",
    ),
    (
        "endpoint twice",
        at(("dataplane", "endpoints"), {"batches": "ipc:///x", "results": "ipc:///x"}),
        "dataplane.endpoints.results",
        "the same endpoint as batches",
    ),
    (
        "endpoint scheme",
        at(("dataplane", "endpoints", "events"), "http://x:1"),
        "dataplane.endpoints.events",
        "'http://x:1' is not a ZeroMQ endpoint like ipc:///run/espline/x.ipc or tcp://host:port",
    ),
    (
        "endpoint tcp port",
        at(("dataplane", "endpoints", "batches"), "tcp://host"),
        "dataplane.endpoints.batches",
        "'tcp://host' is not a ZeroMQ endpoint like ipc:///run/espline/x.ipc or tcp://host:port",
    ),
    (
        "runtime_dir relative",
        at(("dataplane", "endpoints", "runtime_dir"), "run/espline"),
        "dataplane.endpoints.runtime_dir",
        "'run/espline' is not an absolute path",
    ),
    (
        "ipc path too long",
        at(("dataplane", "endpoints", "runtime_dir"), "/" + "d" * 100),
        "dataplane.endpoints.sa_snapshot",
        "the ipc path is 117 bytes long; Unix socket paths allow 107",
    ),
    (
        "vici path too long",
        at(("controller", "vici_socket"), "/" + "v" * 107),
        "controller.vici_socket",
        "108 bytes long; Unix socket paths allow 107",
    ),
    (
        "bad name",
        at((*SA, "name"), "a b"),
        "static_sas[0].name",
        "'a b' is not a name: use letters, digits, '.', '_' and '-' (at most 64)",
    ),
]


@pytest.mark.parametrize(
    ("mutation", "path", "reason"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_error_names_path_and_reason(mutation: Mutation, path: str, reason: str) -> None:
    c = base()
    mutation(c)
    with pytest.raises(ConfigError) as info:
        parse(c)
    err = info.value
    assert (err.path, err.reason) == (path, reason)
    assert str(err) == f"<string>: {path}: {reason}"
    assert isinstance(err, ValueError)
    assert_no_secrets(str(err) + repr(err))


def test_error_cases_are_distinct() -> None:
    ids = [c[0] for c in ERROR_CASES]
    assert len(ids) == len(set(ids))


# --- YAML text and files ------------------------------------------------------------------------


def test_error_in_a_file_carries_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "espline.yaml"
    path.write_text(EXAMPLE.replace("0f10111213", "0f101112"))
    with pytest.raises(ConfigError) as info:
        load_config(path, allowed_cpus=CPUS)
    err = info.value
    assert (err.path, err.line, err.source) == ("static_sas[0].out.key", 13, str(path))
    assert str(err) == (
        f"{path}:13: static_sas[0].out.key: 19 bytes given, aes128gcm16 needs "
        "20 (16-byte key + 4-byte salt)"
    )


@pytest.mark.parametrize(
    ("text", "path", "line", "reason"),
    [
        ("dataplane:\n  workers: 2\n   mtu: 1500\n", "", 3, "mapping values are not allowed here"),
        # The line with the unclosed quote holds a key; the message must not quote it.
        (
            'static_sas:\n  - name: x\n    out: {spi: 0x1001, key: "0x000102030405060708090a\n',
            "",
            4,
            "found unexpected end of stream (while scanning a quoted scalar that starts on line 3)",
        ),
        ("dataplane:\n  mtu: 1500\n  mtu: 1400\n", "dataplane.mtu", 3, "duplicate key"),
        (
            "static_sas:\n  - name: a\n    out:\n      spi: 1\n      spi: 2\n",
            "static_sas[0].out.spi",
            5,
            "duplicate key",
        ),
        ("- 1\n", "", 1, "expected a mapping at the top level, got a list"),
        (
            "dataplane:\n  inside:\n    mode: tun\n    nmae: x\n",
            "dataplane.inside.nmae",
            4,
            "unknown key (did you mean 'name'?)",
        ),
        (
            "static_sas:\n  - name: a\n    local_addr: 192.0.2.1\n",
            "static_sas[0].remote_addr",
            2,
            "required",
        ),
        (
            "a: 1\n---\nb: 2\n",
            "",
            2,
            "expected a single document in the stream, but found another document",
        ),
    ],
)
def test_yaml_text_errors(text: str, path: str, line: int, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, "f.yaml", allowed_cpus=CPUS)
    err = info.value
    assert (err.path, err.line, err.reason) == (path, line, reason)
    assert str(err) == ": ".join(p for p in (f"f.yaml:{line}", path, reason) if p)
    assert_no_secrets(str(err), secret_fragments(bytes(range(12))))


def test_yaml_aliases_are_walked_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text("connections:\n  a: &x [*x]\n", allowed_cpus=CPUS)
    assert (info.value.path, info.value.reason) == ("connections.a",
                                                    "expected a section, got list")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml")
    assert (info.value.path, info.value.reason) == ("", "cannot read: No such file or directory")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"a: \xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.reason == "not UTF-8 text"


def test_unquoted_hex_spi_and_quoted_key_survive_yaml() -> None:
    cfg = parse_config_text(EXAMPLE, allowed_cpus=CPUS)
    assert cfg == parse(base())


# --- Hypothesis: generated mappings parse into the fields they were made from --------------------

ESP_ALGS = [
    "aes128gcm16",
    "aes192gcm16",
    "aes256gcm16",
    "chacha20poly1305",
    "aes128-sha256",
    "aes192-sha384",
    "aes256-sha512",
    "null-sha256",
]
AH_ALGS = ["sha256", "sha384", "sha512"]
ALLOWED_CPUS = frozenset(range(16))


def hex_text(key: bytes, style: int) -> str:
    return [
        key.hex(),
        "0x" + key.hex(),
        "0X" + key.hex().upper(),
        ":".join(f"{b:02x}" for b in key),
    ][style]


def unicast(version: int) -> st.SearchStrategy[str]:
    return (
        st.ip_addresses(v=version)
        .filter(lambda a: not (a.is_unspecified or a.is_multicast))
        .map(str)
    )


@st.composite
def prefixes(draw: st.DrawFn) -> list[str]:
    def one(version: int) -> st.SearchStrategy[str]:
        bits = 32 if version == 4 else 128
        return st.tuples(st.ip_addresses(v=version), st.integers(0, bits)).map(
            lambda ap: str(ipaddress.ip_network(f"{ap[0]}/{ap[1]}", strict=False))
        )

    return draw(st.lists(st.one_of(one(4), one(6)), min_size=1, max_size=3, unique=True))


@st.composite
def static_sa(
    draw: st.DrawFn, name: str, spi_out: int, spi_in: int, seed: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A static SA as YAML data, and the fields it should parse into."""
    version = draw(st.sampled_from([4, 6]))
    local, remote = draw(unicast(version)), draw(unicast(version))
    mode = draw(st.sampled_from(["tunnel", "transport"]))
    protocol = draw(st.sampled_from(["esp", "ah"]))
    sa: dict[str, Any] = {"name": name, "local_addr": local, "remote_addr": remote}
    want: dict[str, Any] = {
        "name": name,
        "local_addr": ipaddress.ip_address(local),
        "remote_addr": ipaddress.ip_address(remote),
        "mode": Mode[mode.upper()],
        "protocol": Protocol[protocol.upper()],
    }
    if mode == "transport" or draw(st.booleans()):
        sa["mode"] = mode
    if protocol == "ah" or draw(st.booleans()):
        sa["protocol"] = protocol
    if mode == "tunnel":
        sa["local_ts"], sa["remote_ts"] = draw(prefixes()), draw(prefixes())
        want["local_ts"] = tuple(map(ipaddress.ip_network, sa["local_ts"]))
        want["remote_ts"] = tuple(map(ipaddress.ip_network, sa["remote_ts"]))
    else:
        want["local_ts"] = (ipaddress.ip_network(local),)
        want["remote_ts"] = (ipaddress.ip_network(remote),)
        if draw(st.booleans()):
            sa["local_ts"] = [f"{local}/{32 if version == 4 else 128}"]
    want["encap"] = None
    if protocol == "esp":
        encap = draw(
            st.one_of(
                st.booleans(),
                st.fixed_dictionaries(
                    {},
                    optional={
                        "local_port": st.integers(1, 65535),
                        "remote_port": st.integers(1, 65535),
                    },
                ),
            )
        )
        sa["encap"] = encap
        if encap is True:
            want["encap"] = UdpEncap()
        elif isinstance(encap, dict):
            want["encap"] = UdpEncap(**encap)
        want["tfc_pad"] = draw(st.integers(0, 9000))
        sa["tfc_pad"] = want["tfc_pad"]
    else:
        want["tfc_pad"] = 0
    esn = draw(st.sampled_from([None, False, True]))
    if esn is not None:
        sa["esn"] = esn
    suffix = draw(st.sampled_from(["", "-esn" if esn is not False else "-noesn"]))
    want["esn"] = bool(esn) or suffix == "-esn"
    window = draw(st.one_of(st.none(), st.just(0), st.integers(32, 65536)))
    if window is not None:
        sa["replay_window"] = window
    want["replay_window"] = window

    for direction, spi in (("out", spi_out), ("in", spi_in)):
        material = hashlib.shake_256(f"{seed}/{name}/{direction}".encode())
        spi_value = draw(st.sampled_from([spi, f"{spi:#x}", f"0x{spi:08X}"]))
        if protocol == "ah":
            alg = draw(st.sampled_from(AH_ALGS))
            integ = parse_ah(alg)[0]
            integ_key = material.digest(integ.key_len)
            sa[direction] = {
                "spi": spi_value,
                "integ": alg + suffix,
                "integ_key": hex_text(integ_key, draw(st.integers(0, 3))),
            }
            want[direction] = StaticSaDirection(spi, alg, b"", integ_key)
            continue
        alg = draw(st.sampled_from(ESP_ALGS))
        esp = parse_esp(alg)
        both = material.digest(esp.key_material_len + (esp.integ.key_len if esp.integ else 0))
        enc_key, integ_key = both[: esp.key_material_len], both[esp.key_material_len :]
        sa[direction] = {"spi": spi_value, "enc": alg + suffix}
        if enc_key:
            sa[direction]["key"] = hex_text(enc_key, draw(st.integers(0, 3)))
        if integ_key:
            sa[direction]["integ_key"] = hex_text(integ_key, draw(st.integers(0, 3)))
        want[direction] = StaticSaDirection(spi, esp.keyword, enc_key, integ_key)
    return sa, want


@st.composite
def configs(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    dp: dict[str, Any] = {}
    want: dict[str, Any] = {}
    cpus = draw(st.lists(st.sampled_from(sorted(ALLOWED_CPUS)), min_size=1, unique=True))
    if draw(st.booleans()):
        dp["cpus"] = draw(st.sampled_from([cpus, ",".join(map(str, cpus))]))
        want["cpus"] = tuple(cpus)
    else:
        want["cpus"] = tuple(sorted(ALLOWED_CPUS))
    want["workers"] = draw(st.integers(1, 64))
    if draw(st.booleans()):
        dp["workers"] = want["workers"]
    else:
        want["workers"] = len(want["cpus"])
    max_packets = draw(st.integers(1, 4096))
    want["batch"] = BatchConfig(max_packets, draw(st.integers(0, 1_000_000)),
                                draw(st.none() | st.integers(1, max_packets)))
    dp["batch"] = {k: v for k, v in dataclasses.asdict(want["batch"]).items()
                   if v is not None}  # no handoff_min: the default
    want["replay_window"] = draw(st.sampled_from([0, 32, 64, 1024, 65536]))
    dp["replay_window"] = want["replay_window"]
    dp["mss_clamp"] = draw(st.one_of(st.booleans(), st.integers(88, 65495)))
    want["mss_clamp"] = {True: "auto", False: None}.get(dp["mss_clamp"], dp["mss_clamp"])
    want["mtu"] = dp["mtu"] = draw(st.integers(1280, 65535))
    want["outside"] = OutsideConfig("af_packet", "out0", draw(st.booleans()))
    dp["outside"] = dataclasses.asdict(want["outside"])
    want["inside"] = InsideConfig(
        "tun", draw(st.from_regex(r"[a-z][a-z0-9]{0,14}", fullmatch=True))
    )
    dp["inside"] = {"mode": "tun", "name": want["inside"].interface}

    n = draw(st.integers(0, 4))
    names = draw(
        st.lists(
            st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
            min_size=n,
            max_size=n,
            unique=True,
        )
    )
    spis = st.lists(st.integers(0x100, 0xFFFFFFFF), min_size=n, max_size=n, unique=True)
    spis_out, spis_in = draw(spis), draw(spis)
    seed = draw(st.integers(0, 2**32))
    sas = [draw(static_sa(names[i], spis_out[i], spis_in[i], seed)) for i in range(n)]
    for _, sa_want in sas:
        if sa_want["replay_window"] is None:
            sa_want["replay_window"] = want["replay_window"]
    return {"dataplane": dp, "static_sas": [s for s, _ in sas]}, want, [w for _, w in sas]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_generated_configs_parse_into_their_fields(
    case: tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]],
) -> None:
    mapping, want_dp, want_sas = case
    cfg = parse_config(mapping, allowed_cpus=ALLOWED_CPUS)
    for key, value in want_dp.items():
        assert getattr(cfg.dataplane, key) == value, key
    assert len(cfg.static_sas) == len(want_sas)
    table = SaTable()
    for sa, want in zip(cfg.static_sas, want_sas, strict=True):
        for key, value in want.items():
            attr = {"out": "outbound", "in": "inbound"}.get(key, key)
            assert getattr(sa, attr) == value, key
        out, inb = sa.records()
        assert (out.direction, inb.direction) == (Direction.OUT, Direction.IN)
        assert (out.spi, inb.spi) == (sa.outbound.spi, sa.inbound.spi)
        assert (out.local_addr, inb.local_addr) == (sa.local_addr, sa.local_addr)
        assert inb.replay_window == sa.replay_window and out.tfc_pad == sa.tfc_pad
        table.install(out)  # the workers accept the keys the config accepted
        table.install(inb)
        assert_no_secrets(
            repr(sa),
            secret_fragments(
                sa.outbound.enc_key or sa.outbound.integ_key,
                sa.inbound.enc_key or sa.inbound.integ_key,
            ),
        )
    # Through YAML text as well: what safe_dump writes loads into the same Config.
    assert parse_config_text(yaml.safe_dump(mapping), allowed_cpus=ALLOWED_CPUS) == cfg
