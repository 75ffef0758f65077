"""IPv6 end to end: two espline gateways between network namespaces, every mix of inner and
outer address family (RFC 4301 §5.1.2: tunnel mode carries either family in either).

    hostA [eth0] --- [lan0] gwA [wan0] ====ESP==== [wan0] gwB [lan0] --- [eth0] hostB

    hostA eth0  10.1.0.1/24   2001:db8:1::1/64     gwA lan0  10.1.0.254  2001:db8:1::fe
    gwA wan0    192.0.2.1/24  2001:db8:ff::1/64    gwB wan0  192.0.2.2   2001:db8:ff::2
    hostB eth0  10.2.0.1/24   2001:db8:2::1/64     gwB lan0  10.2.0.254  2001:db8:2::fe

Every link is dual-stack; the SA (static, or negotiated with IKEv2) picks the families: its
outer addresses say how ESP travels (raw protocol 50 or UDP 4500, RFC 3948), its selectors
what it carries. Checked here:

1. static SAs, 6in6 and 4in6 (AF_PACKET outside: the socket outside is IPv4 only) and 6in4
   (socket and AF_PACKET outside), raw ESP and UDP-encapsulated: ping, TCP and UDP echo in
   both directions, the outer packets on gwA's wire of the SA's family and encapsulation,
   no ICMP error anywhere. A socket outside with IPv6 SAs is refused cleanly;
2. IKEv2 over IPv6 (IKE and ESP on 2001:db8:ff::/64, IPv6 selectors), raw ESP and UDP
   encapsulation: ping, TCP and UDP both ways;
3. path MTU: TCP SYNs clamped to what fits the tunnel, and an inner packet too big for it
   answered with ICMPv6 Packet Too Big carrying the tunnel's inner MTU, from gwA's kernel in
   TUN mode and from espline itself (pipeline/mtu.py) in af_packet inside mode; with mixed
   families (6in4, 4in6) in af_packet inside mode, and IPv4 without DF through 4in6
   (fragmented before encapsulation).

IPv6 addresses skip duplicate address detection (``accept_dad`` 0 in every namespace before
its links exist, and ``nodad``), so they and the link-local addresses neighbour discovery
uses are usable at once. Each gateway runs one worker: worker ordering does not depend on the
address family (tests/test_e2e_wire.py covers two), and the file stays well under 90 s on
two shared cores. The capture tool (``sniff46``) runs inside a namespace as
``python -m tests.test_e2e_ipv6 sniff46 ...``, like tests/e2e_support.py's tools.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e_support import (
    ECHO_CLIENT,
    ECHO_SERVER,
    ETH,
    KEY_AB,
    KEY_BA,
    LAN,
    TUN_NAME,
    WAN,
    Gateway,
    Tool,
    Topology,
    Tunnel,
    start_gateway,
    tcp_mss,
    wait_for,
    wait_link,
)
from tests.netns import (
    REPO_ROOT,
    Namespace,
    NetnsLab,
    netns_lab_fixture,  # noqa: F401  (provides the netns_lab fixture)
    require_root_netns,
)

Family = int  # 4 or 6


@dataclass(frozen=True)
class Site:
    """One site, dual-stack: per family its gateway's outer address, its subnet, its host and
    the gateway's inside address (the host's next hop); and its outbound SA."""

    outer: dict[Family, str]
    net: dict[Family, str]
    host: dict[Family, str]
    gw_lan: dict[Family, str]
    spi_out: int
    key_out: str
    ike_id: str


SITE_A = Site(outer={4: "192.0.2.1", 6: "2001:db8:ff::1"},
              net={4: "10.1.0.0/24", 6: "2001:db8:1::/64"},
              host={4: "10.1.0.1", 6: "2001:db8:1::1"},
              gw_lan={4: "10.1.0.254", 6: "2001:db8:1::fe"},
              spi_out=0x1001, key_out=KEY_AB, ike_id="gw-a.example.net")
SITE_B = Site(outer={4: "192.0.2.2", 6: "2001:db8:ff::2"},
              net={4: "10.2.0.0/24", 6: "2001:db8:2::/64"},
              host={4: "10.2.0.1", 6: "2001:db8:2::1"},
              gw_lan={4: "10.2.0.254", 6: "2001:db8:2::fe"},
              spi_out=0x2001, key_out=KEY_BA, ike_id="gw-b.example.net")
PREFIX_LEN = {4: 24, 6: 64}
PSK = "a long pre-shared key for the IPv6 e2e test"

# The tunnel's inner MTU with aes128gcm16 and a 1500-byte outside MTU, by hand (RFC 4303 §2,
# RFC 4106 §3, RFC 3948 §2.1): outer header (IPv4 20, IPv6 40) + UDP 8 (encap only) + SPI
# and sequence 8 + IV 8 + pad length and next header 2 + ICV 16; the encrypted part (inner
# packet + padding + 2) is a multiple of 4. Outer IPv6, UDP: 1500 - 80 = 1420 = 4 * 355, so
# 1418; raw: 1428 = 4 * 357, so 1426. Outer IPv4: 1438 and 1446 (tests/test_e2e_wire.py).
INNER_MTU = {(6, True): 1418, (6, False): 1426, (4, True): 1438, (4, False): 1446}
IP_HDR = {4: 20, 6: 40}
TCP_HDR = 20
HOST_MSS = {4: 1500 - 20 - TCP_HDR, 6: 1500 - 40 - TCP_HDR}  # on the hosts' 1500-byte links


# What each check raises where it fails (these were xfail(raises=...) markers while the bugs
# they show were open).
class MissingTooBig(AssertionError):
    """No Packet Too Big / fragmentation needed reached hostA."""


class NotDelivered(AssertionError):
    """hostB did not get the datagrams, whole."""


class NotRefused(AssertionError):
    """The gateway did not refuse its configuration cleanly."""


@pytest.fixture
def lab(netns_lab: NetnsLab) -> Iterator[NetnsLab]:
    require_root_netns()
    yield netns_lab


# -- topology --------------------------------------------------------------------------------


def no_dad(ns: Namespace) -> None:
    """Addresses (link-local ones too) usable at once on the links made after this: the
    kernel skips DAD when both ``all`` and the link's own ``accept_dad`` are below 1, and a
    new link copies ``default``."""
    for scope in ("all", "default"):
        ns.sysctl(f"net.ipv6.conf.{scope}.accept_dad", 0)


def build_dual_stack(lab: NetnsLab, *, inside: str = "tun") -> Topology:
    """tests/e2e_support.py's four namespaces and three veth pairs, with IPv4 and IPv6 on
    every link and routes for both families. ``inside``: ``tun`` (the gateways' kernels
    forward both families into and out of the TUN device) or ``af_packet`` (bump in the
    wire: forwarding off for both families, espline alone carries the hosts' packets)."""
    gw_a, gw_b, host_a, host_b = (lab.namespace() for _ in range(4))
    for ns in (gw_a, gw_b, host_a, host_b):
        no_dad(ns)
    lab.veth(gw_a, gw_b, a_name=WAN, b_name=WAN,
             a_addr=[f"{SITE_A.outer[f]}/{PREFIX_LEN[f]}" for f in (4, 6)],
             b_addr=[f"{SITE_B.outer[f]}/{PREFIX_LEN[f]}" for f in (4, 6)])
    for host, gw, site in ((host_a, gw_a, SITE_A), (host_b, gw_b, SITE_B)):
        lab.veth(host, gw, a_name=ETH, b_name=LAN,
                 a_addr=[f"{site.host[f]}/{PREFIX_LEN[f]}" for f in (4, 6)],
                 b_addr=[f"{site.gw_lan[f]}/{PREFIX_LEN[f]}" for f in (4, 6)])
    for host, here, there in ((host_a, SITE_A, SITE_B), (host_b, SITE_B, SITE_A)):
        for f in (4, 6):
            host.add_route(there.net[f], via=here.gw_lan[f])
    for gw in (gw_a, gw_b):
        if inside == "tun":
            gw.enable_forwarding(ipv6=True)
        else:
            gw.sysctl("net.ipv4.ip_forward", 0)  # espline forwards, the kernels must not
            gw.sysctl("net.ipv6.conf.all.forwarding", 0)
    if inside != "tun":
        # Unlike IPv4 (ip_error is silent when the input device does not forward), IPv6
        # answers a packet it has no route for with ICMPv6 no route to destination
        # (ip6_pkt_drop) even with forwarding off, and a host's TCP aborts its SYN_SENT
        # connection on it (ENETUNREACH) before espline's copy arrives. A blackhole route
        # makes the kernel drop the remote subnet's packets silently (dst_discard).
        gw_a.ip("-6", "route", "add", "blackhole", SITE_B.net[6])
        gw_b.ip("-6", "route", "add", "blackhole", SITE_A.net[6])
    return Topology(gw_a, gw_b, host_a, host_b, inside)


# -- gateways --------------------------------------------------------------------------------


def _io_sections(inside: str, outside: str, rundir: Path) -> str:
    inside_cfg = (f"{{mode: tun, name: {TUN_NAME}}}" if inside == "tun"
                  else f"{{mode: af_packet, interface: {LAN}}}")
    outside_cfg = ("{mode: socket}" if outside == "socket"
                   else f"{{mode: af_packet, interface: {WAN}}}")
    return (f"  inside: {inside_cfg}\n  outside: {outside_cfg}\n"
            f"  endpoints: {{runtime_dir: {rundir}}}\n")


def static_config(local: Site, remote: Site, rundir: Path, *, inner: Family, outer: Family,
                  encap: bool, inside: str = "tun", outside: str = "af_packet",
                  workers: int = 1) -> str:
    """One gateway's YAML: one static SA pair, ``inner`` selectors over ``outer`` addresses
    (quoted: an IPv6 address is a YAML string only by luck)."""
    return (f"dataplane:\n  workers: {workers}\n" + _io_sections(inside, outside, rundir)
            + textwrap.dedent(f"""\
        static_sas:
          - name: {local.ike_id.split('.')[0]}-to-{remote.ike_id.split('.')[0]}
            local_addr: "{local.outer[outer]}"
            remote_addr: "{remote.outer[outer]}"
            mode: tunnel
            encap: {str(encap).lower()}
            local_ts: ["{local.net[inner]}"]
            remote_ts: ["{remote.net[inner]}"]
            out: {{spi: {local.spi_out:#x}, enc: aes128gcm16, key: "{local.key_out}"}}
            in:  {{spi: {remote.spi_out:#x}, enc: aes128gcm16, key: "{remote.key_out}"}}
        """))


def ike_config(local: Site, remote: Site, rundir: Path, *, start: bool, encap: bool,
               outside: str = "af_packet") -> str:
    """One gateway's YAML: an IKEv2 connection (PSK) between the outer IPv6 addresses, one
    child with the IPv6 subnets as selectors."""
    return (f"controller: {{vici_socket: {rundir}/vici.sock}}\n"
            + "dataplane:\n  workers: 1\n" + _io_sections("tun", outside, rundir)
            + textwrap.dedent(f"""\
        connections:
          site:
            version: 2
            local_addrs: ["{local.outer[6]}"]
            remote_addrs: ["{remote.outer[6]}"]
            proposals: [aes128gcm16-prfsha256-x25519]
            encap: {"yes" if encap else "no"}
            local: {{auth: psk, id: {local.ike_id}}}
            remote: {{auth: psk, id: {remote.ike_id}}}
            children:
              lan:
                local_ts: ["{local.net[6]}"]
                remote_ts: ["{remote.net[6]}"]
                esp_proposals: [aes128gcm16]
                start_action: {"start" if start else "none"}
        secrets:
          ike:
            - {{id: [{local.ike_id}, {remote.ike_id}], secret: "{PSK}"}}
        """))


def start_gateways(topo: Topology, tmp: Path, configs: dict[str, str], *, ping: str,
                   ready: str, b_first: bool = False, ping_timeout: float = 15.0) -> Tunnel:
    """Start gwB then gwA with their configs (``@RUNDIR@``: each one's runtime directory),
    wait until each one's log says ``ready`` (with ``b_first``, gwB's before gwA starts: an
    IKE initiator's first IKE_SA_INIT would otherwise meet ICMP port unreachable) and for
    the TUN devices (TUN inside), then for hostA's ping of ``ping`` to come back through the
    tunnel."""
    gws = {}
    for name, ns in (("b", topo.gw_b), ("a", topo.gw_a)):
        rundir = tmp / f"run-{name}"
        cfg = configs[name].replace("@RUNDIR@", str(rundir))
        gws[name] = start_gateway(ns, cfg, tmp, name, rundir)
        if name == "b" and b_first:
            wait_ready(gws["b"], ready)
    tunnel = Tunnel(topo, gws["a"], gws["b"], False)
    for gw in gws.values():
        wait_ready(gw, ready)
    if topo.inside == "tun":
        wait_link(topo.gw_a, TUN_NAME, True)
        wait_link(topo.gw_b, TUN_NAME, True)
    assert topo.host_a.ping(ping, timeout=ping_timeout), \
        f"no ping from hostA to {ping} through the tunnel\n{tunnel.logs()}"
    return tunnel


def wait_ready(gw: Gateway, ready: str) -> None:
    """Until ``ready`` is in the gateway's log; fails at once if the gateway exits."""
    def up() -> bool:
        if gw.proc.poll() is not None:
            raise AssertionError(f"gateway {gw.name} exited with {gw.proc.returncode}\n"
                                 f"{gw.log()}")
        return ready in gw.log()

    wait_for(up, 20, f"{ready!r} in gateway {gw.name}'s log")


def start_static(lab: NetnsLab, tmp: Path, *, inner: Family, outer: Family, encap: bool,
                 inside: str = "tun", outside: str = "af_packet",
                 topo: Topology | None = None) -> Tunnel:
    topo = topo or build_dual_stack(lab, inside=inside)
    configs = {name: static_config(local, remote, tmp / f"run-{name}", inner=inner,
                                   outer=outer, encap=encap, inside=inside, outside=outside)
               for name, local, remote in (("a", SITE_A, SITE_B), ("b", SITE_B, SITE_A))}
    # "data plane up": logged once the adapters exist (the ESP sink and the NAT-T sockets
    # too, so no early packet meets an ICMP error from gwB's kernel).
    tunnel = start_gateways(topo, tmp, configs, ping=SITE_B.host[inner], ready="data plane up")
    tunnel.encap = encap
    return tunnel


def final_stats(tunnel: Tunnel) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stop both gateways unless stopped (SIGTERM: a clean exit writes stats.json once more);
    their last counters."""
    codes = tunnel.stop()
    assert codes == [0, 0], tunnel.logs()
    a, b = tunnel.a.stats(), tunnel.b.stats()
    assert a is not None and b is not None
    return a, b


# -- traffic ---------------------------------------------------------------------------------


def echo(client: Namespace, server: Namespace, server_addr: str, proto: str, port: int,
         tunnel: Tunnel, size: int = 0) -> None:
    """``client`` sends ``size`` random bytes (TCP: one stream; UDP: 20 datagrams of up to
    1000 bytes, retried) to an echo server on ``server`` and gets each byte back."""
    proc = server.popen([sys.executable, "-c", ECHO_SERVER, proto, server_addr, str(port)],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == "ready", (line, proc.stderr.read() if proc.poll() is not None
                             and proc.stderr else "")
    size = size or (300_000 if proto == "tcp" else 20_000)
    out = client.run([sys.executable, "-c", ECHO_CLIENT, proto, server_addr, str(port),
                      str(size)], check=False, timeout=60)
    assert out.returncode == 0, (proto, server_addr, out.stdout, out.stderr, tunnel.logs())


def ping_tcp_udp_both_ways(tunnel: Tunnel, inner: Family, port: int = 7101) -> None:
    """Ping, TCP echo and UDP echo through the tunnel, hostA -> hostB and hostB -> hostA."""
    topo = tunnel.topo
    assert topo.host_b.ping(SITE_A.host[inner], timeout=5), tunnel.logs()
    for client, server, site in ((topo.host_a, topo.host_b, SITE_B),
                                 (topo.host_b, topo.host_a, SITE_A)):
        for proto in ("tcp", "udp"):
            echo(client, server, site.host[inner], proto, port, tunnel)
            port += 1


# -- the capture tool, from the test's side --------------------------------------------------


def start_sniffs(tmp: Path, where: dict[str, tuple[Namespace, str]]) -> dict[str, Tool]:
    """``sniff46`` (see :func:`tool_sniff46`) on each ``name: (namespace, interface)``, all
    started at once, returned once every one captures."""
    tools: dict[str, Tool] = {}
    readies = []
    for name, (ns, iface) in where.items():
        out, ready, log_path = (tmp / f"{name}.{ext}" for ext in ("json", "ready", "log"))
        with open(log_path, "w") as log:  # the child has its own descriptor
            proc = ns.popen([sys.executable, "-m", "tests.test_e2e_ipv6", "sniff46",
                             "--iface", iface, "--out", str(out), "--ready", str(ready)],
                            stdout=log, stderr=log, cwd=REPO_ROOT)
        tools[name] = Tool(name, proc, out, log_path)
        readies.append(ready)

    def up() -> bool:
        for tool in tools.values():
            if tool.proc.poll() is not None:
                raise AssertionError(f"{tool.name} exited with {tool.proc.returncode}: "
                                     f"{tool.log()}")
        return all(r.exists() for r in readies)

    wait_for(up, 20, f"{', '.join(tools)} to be ready")
    return tools


UDP_SENDER = textwrap.dedent("""\
    import socket, sys, time
    dst, port, size, count, df = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                  int(sys.argv[4]), sys.argv[5] == "df")
    if ":" in dst:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        # IPV6_MTU_DISCOVER = IPV6_PMTUDISC_PROBE: full size whatever path MTU was learnt,
        # never fragmented here (linux/in6.h).
        s.setsockopt(socket.IPPROTO_IPV6, 23, 3)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # IP_MTU_DISCOVER: IP_PMTUDISC_PROBE (DF set, path MTU ignored) or IP_PMTUDISC_DONT
        # (no DF: a router may fragment), linux/in.h.
        s.setsockopt(socket.IPPROTO_IP, 10, 3 if df else 0)
    for i in range(count):
        s.sendto(bytes(size), (dst, port)); time.sleep(0.1)
    """)

UDP_SINK = textwrap.dedent("""\
    import json, socket, sys
    host, port, count, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, port)); s.settimeout(timeout); print("ready", flush=True)
    sizes = []
    try:
        while len(sizes) < count:
            sizes.append(len(s.recv(65535)))
    except socket.timeout:
        pass
    print(json.dumps(sizes), flush=True)
    """)


def send_udp(ns: Namespace, dst: str, port: int, total: int, *, count: int = 3,
             df: bool = True) -> None:
    """``count`` UDP datagrams from ``ns`` whose IP packets are ``total`` bytes long (IPv6:
    never fragmented by the sender; IPv4: DF set or not)."""
    size = total - (40 if ":" in dst else 20) - 8
    out = ns.run([sys.executable, "-c", UDP_SENDER, dst, str(port), str(size), str(count),
                  "df" if df else "nodf"], check=False, timeout=30)
    assert out.returncode == 0, out.stderr


# ============================================================================================
# 1. Static SAs: every inner/outer family mix, raw ESP and ESP in UDP.
# ============================================================================================

STATIC_CASES = [
    # (inner, outer, outside, encap)
    (6, 6, "af_packet", True),
    (6, 6, "af_packet", False),
    (4, 6, "af_packet", True),
    (4, 6, "af_packet", False),
    (6, 4, "socket", True),
    (6, 4, "socket", False),
    (6, 4, "af_packet", True),
]


def _case_id(inner: Family, outer: Family, outside: str, encap: bool) -> str:
    return f"{inner}in{outer}-{outside.replace('_', '')}-{'udp' if encap else 'raw'}"


@pytest.mark.parametrize(("inner", "outer", "outside", "encap"), STATIC_CASES,
                         ids=[_case_id(*c) for c in STATIC_CASES])
def test_static_sas_carry_ping_tcp_udp(lab: NetnsLab, tmp_path: Path, inner: Family,
                                       outer: Family, outside: str, encap: bool) -> None:
    """Ping, TCP and UDP echo both ways through a static SA pair; on gwA's wire every ESP
    packet is of the outer family and encapsulation the SA names, and no ICMP error shows
    up at the hosts or on the wire (each kernel left ESP / ESP-in-UDP to espline)."""
    topo = build_dual_stack(lab, inside="tun")
    sniffs = start_sniffs(tmp_path, {"hostA": (topo.host_a, ETH), "wanA": (topo.gw_a, WAN),
                                     "hostB": (topo.host_b, ETH)})
    tunnel = start_static(lab, tmp_path, inner=inner, outer=outer, encap=encap,
                          outside=outside, topo=topo)
    try:
        ping_tcp_udp_both_ways(tunnel, inner)
        seen = {name: tool.finish() for name, tool in sniffs.items()}
    finally:
        tunnel.stop()
    a, b = final_stats(tunnel)
    for name, got in seen.items():
        assert got["icmp"] == [], (name, got["icmp"])
    # The ESP on the wire: this SA's family and encapsulation, both directions, nothing else.
    kinds = {(e["v"], e["udp"], e["spi"], e["out"]) for e in seen["wanA"]["esp"]}
    spi_ab, spi_ba = f"{SITE_A.spi_out:#010x}", f"{SITE_B.spi_out:#010x}"
    assert kinds == {(outer, encap, spi_ab, True), (outer, encap, spi_ba, False)}, kinds
    # 300 kB of TCP each way: hundreds of packets, all through espline, none lost.
    for stats in (a, b):
        assert stats["outbound"]["passed"] > 200 and stats["inbound"]["passed"] > 200, stats
        assert stats["inbound"]["drops"] == {}, stats["inbound"]
        assert stats["lost_packets"] == 0, stats


@pytest.mark.parametrize("keying", ["static", "ike"])
def test_socket_outside_refuses_ipv6_outer_addresses(lab: NetnsLab, tmp_path: Path,
                                                     keying: str) -> None:
    """The portable socket outside is IPv4 only (pipeline/outside.py): a gateway whose SAs
    (static, or IKE connections) have IPv6 outer addresses on it is refused at startup,
    with exit code 2 and a line that names the setting, like every other unusable
    configuration, rather than dying with a traceback or running without a data plane."""
    topo = build_dual_stack(lab, inside="tun")
    rundir = tmp_path / "run-a"
    if keying == "static":
        cfg = static_config(SITE_A, SITE_B, rundir, inner=6, outer=6, encap=True,
                            outside="socket")
    else:
        cfg = ike_config(SITE_A, SITE_B, rundir, start=False, encap=False, outside="socket")
    gw = start_gateway(topo.gw_a, cfg, tmp_path, "a", rundir)
    # Refused, or broken: either shows within seconds.
    wait_for(lambda: gw.proc.poll() is not None or "Traceback" in gw.log(), 20,
             f"gwA to exit\n{gw.log()}")
    code = gw.stop()
    log = gw.log()
    if "Traceback" in log or code != 2 or "outside" not in log:
        raise NotRefused(code, log)
    wait_link(topo.gw_a, TUN_NAME, False)  # nothing left behind


# ============================================================================================
# 2. IKEv2 over IPv6.
# ============================================================================================


@pytest.mark.parametrize("encap", [False, True], ids=["raw-esp", "udp-encap"])
def test_ikev2_over_ipv6_carries_ping_tcp_udp(lab: NetnsLab, tmp_path: Path,
                                              encap: bool) -> None:
    """gwA initiates to gwB over IPv6 (UDP 500/4500 on 2001:db8:ff::/64); the Child SA with
    the IPv6 subnets carries ping, TCP and UDP both ways, as raw ESP or ESP in UDP over
    IPv6, and the IKE SA is seen going down when gwA stops."""
    topo = build_dual_stack(lab, inside="tun")
    sniff = start_sniffs(tmp_path, {"wanA": (topo.gw_a, WAN)})["wanA"]
    configs = {"a": ike_config(SITE_A, SITE_B, Path("@RUNDIR@"), start=True, encap=encap),
               "b": ike_config(SITE_B, SITE_A, Path("@RUNDIR@"), start=False, encap=encap)}
    tunnel = start_gateways(topo, tmp_path, configs, ping=SITE_B.host[6], ping_timeout=20,
                            ready="controller up", b_first=True)
    try:
        ping_tcp_udp_both_ways(tunnel, 6, port=7201)
        stats = tunnel.a.wait_stats(lambda s: s["sa_count"] == 2 and len(s["sas"]) == 2,
                                    what="two SAs that carried traffic")
        assert {sa["direction"] for sa in stats["sas"]} == {"in", "out"}
        assert "IKE SA established" in tunnel.a.log(), tunnel.logs()
        assert "IKE SA established" in tunnel.b.log(), tunnel.logs()
        wire = sniff.finish()
    finally:
        codes = tunnel.stop()
    assert codes == [0, 0], tunnel.logs()
    assert "IKE SA down" in tunnel.b.log(), tunnel.logs()
    # IKE went over IPv6 (port 500, then 4500 with encap), and so did the ESP.
    assert {u["v"] for u in wire["udp"] if u["dport"] in (500, 4500)} == {6}, wire["udp"][:5]
    assert {(e["v"], e["udp"]) for e in wire["esp"]} == {(6, encap)}, wire["esp"][:5]
    assert len({e["spi"] for e in wire["esp"]}) == 2, {e["spi"] for e in wire["esp"]}
    assert wire["icmp"] == [], (json.dumps(wire["icmp"]), tunnel.logs())


# ============================================================================================
# 3. Path MTU with IPv6.
# ============================================================================================

@pytest.mark.parametrize(("inside", "inner", "outer"), [("tun", 6, 6), ("af_packet", 6, 6)],
                         ids=["tun-6in6", "af_packet-6in6"])
def test_pmtu_mss_clamp_and_packet_too_big(lab: NetnsLab, tmp_path: Path, inside: str,
                                           inner: Family, outer: Family) -> None:
    pmtu_check(lab, tmp_path, inside, inner, outer)


def pmtu_check(lab: NetnsLab, tmp_path: Path, inside: str, inner: Family,
               outer: Family) -> None:
    """hostA's SYN (MSS for a 1500-byte link) reaches hostB with the MSS that fits the
    tunnel, and so does hostB's SYN-ACK; a packet of exactly the inner MTU gets through,
    one of 1500 bytes (DF / IPv6) gets ICMPv6 Packet Too Big (ICMP fragmentation needed for
    IPv4) with the inner MTU: from gwA's kernel in TUN mode (the TUN device's MTU is the
    tunnel's), from espline (pipeline/mtu.icmp_too_big) in af_packet inside mode."""
    encap = True
    topo = build_dual_stack(lab, inside=inside)
    sniffs = start_sniffs(tmp_path, {"hostA": (topo.host_a, ETH), "hostB": (topo.host_b, ETH)})
    tunnel = start_static(lab, tmp_path, inner=inner, outer=outer, encap=encap,
                          inside=inside, outside="af_packet", topo=topo)
    try:
        echo(topo.host_a, topo.host_b, SITE_B.host[inner], "tcp", 7301, tunnel)
        mtu = INNER_MTU[(outer, encap)]
        for port, total in ((9301, mtu), (9302, 1500)):
            send_udp(topo.host_a, SITE_B.host[inner], port, total)
        time.sleep(0.3)
        at_a, at_b = sniffs["hostA"].finish(), sniffs["hostB"].finish()
    finally:
        tunnel.stop()
    a, b = final_stats(tunnel)

    def syns(seen: dict[str, Any], *, out: bool, ack: bool) -> set[int | None]:
        hosts = (SITE_A.host[inner], SITE_B.host[inner])
        return {s["mss"] for s in seen["syns"] if s["out"] is out and s["v"] == inner
                and bool(s["flags"] & 0x10) is ack and (s["dst"] if out else s["src"]) in hosts}

    mss = mtu - IP_HDR[inner] - TCP_HDR
    assert syns(at_a, out=True, ack=False) == {HOST_MSS[inner]}  # hostA's SYNs as sent
    assert syns(at_b, out=False, ack=False) == {mss}  # ... as hostB got them
    assert syns(at_b, out=True, ack=True) == {HOST_MSS[inner]}  # hostB's SYN-ACKs as sent
    assert syns(at_a, out=False, ack=True) == {mss}  # ... as hostA got them
    assert a["mss_clamped"] >= 1 and b["mss_clamped"] >= 1, (a, b)

    too_big = (2, 0) if inner == 6 else (3, 4)
    errors = [i for i in at_a["icmp"] if not i["out"] and (i["type"], i["code"]) == too_big]
    if not errors:
        raise MissingTooBig(at_a["icmp"], a["outbound"], a["icmp_too_big"])
    assert {i["mtu"] for i in errors} == {mtu}, errors
    # Who answered: gwA's kernel (tun) or espline (af_packet), both from gwA's inside
    # address of the inner family, whatever the SA's outer family.
    assert {i["src"] for i in errors} == {SITE_A.gw_lan[inner]}, errors
    if inside == "tun":
        assert a["icmp_too_big"] == 0, a
    else:
        assert a["icmp_too_big"] >= 1, a
    arrived = [u for u in at_b["udp"] if not u["out"]]
    assert [u["len"] for u in arrived if u["dport"] == 9301] == [mtu] * 3, arrived
    assert not [u for u in arrived if u["dport"] == 9302], arrived


@pytest.mark.parametrize(("inside", "inner", "outer"), [("af_packet", 6, 4), ("af_packet", 4, 6)],
                         ids=["af_packet-6in4", "af_packet-4in6"])
def test_pmtu_packet_too_big_with_mixed_families(lab: NetnsLab, tmp_path: Path, inside: str,
                                                 inner: Family, outer: Family) -> None:
    pmtu_check(lab, tmp_path, inside, inner, outer)


def test_4in6_ipv4_without_df_larger_than_the_tunnel_arrives(lab: NetnsLab,
                                                               tmp_path: Path) -> None:
    """An inner IPv4 packet without DF is the encapsulator's to fragment (RFC 4301 §8.1,
    RFC 791): over 4in4 espline fragments the outer packet; over 4in6 it fragments the inner
    packet before encapsulation (RFC 4459 §3.3: the peer's AF_PACKET ring would not
    reassemble outer IPv6 fragments), and hostB reassembles. Three 1500-byte datagrams,
    tunnel MTU 1418: hostB receives all three, whole, and gwA counted the fragments."""
    topo = build_dual_stack(lab, inside="af_packet")
    tunnel = start_static(lab, tmp_path, inner=4, outer=6, encap=True, inside="af_packet",
                          topo=topo)
    port = 9401
    try:
        sink = topo.host_b.popen([sys.executable, "-c", UDP_SINK, SITE_B.host[4], str(port),
                                  "3", "1"], stdout=subprocess.PIPE)
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        send_udp(topo.host_a, SITE_B.host[4], port, 1500, df=False)
        sizes = json.loads(sink.communicate(timeout=15)[0])
    finally:
        tunnel.stop()
    a, b = final_stats(tunnel)
    if sizes != [1500 - 28] * 3:
        raise NotDelivered(sizes, a["outbound"], a["fragmented"], b["inbound"])
    assert a["fragmented"] >= 6 and "too_big" not in a["outbound"]["drops"]


# ============================================================================================
# The capture tool (runs inside a namespace): python -m tests.test_e2e_ipv6 sniff46 ...
# ============================================================================================

NAT_T_PORT = 4500
_IPV6_EXT = {0, 43, 60}  # hop-by-hop, routing, destination options (RFC 8200 §4)
_IPV6_FRAGMENT = 44
_stop = False


def _on_term(signum: int, frame: object) -> None:
    global _stop
    _stop = True


def _l4(pkt: bytes) -> tuple[int, str, str, int, int, bytes] | None:
    """(version, src, dst, total length, upper-layer protocol, upper-layer bytes) of an IPv4
    or IPv6 packet (IPv6: stepping over extension headers; a non-first fragment: None)."""
    if len(pkt) >= 20 and pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 0xF) * 4
        if struct.unpack_from("!H", pkt, 6)[0] & 0x1FFF:
            return None
        total = struct.unpack_from("!H", pkt, 2)[0]
        return (4, socket.inet_ntoa(pkt[12:16]), socket.inet_ntoa(pkt[16:20]), total,
                pkt[9], pkt[ihl:total])
    if len(pkt) >= 40 and pkt[0] >> 4 == 6:
        total = 40 + struct.unpack_from("!H", pkt, 4)[0]
        nh, at = pkt[6], 40
        while nh in _IPV6_EXT or nh == _IPV6_FRAGMENT:
            if len(pkt) < at + 8:
                return None
            if nh == _IPV6_FRAGMENT:
                if struct.unpack_from("!H", pkt, at + 2)[0] & 0xFFF8:
                    return None
                nh, at = pkt[at], at + 8
            else:
                nh, at = pkt[at], at + (pkt[at + 1] + 1) * 8
        return (6, socket.inet_ntop(socket.AF_INET6, pkt[8:24]),
                socket.inet_ntop(socket.AF_INET6, pkt[24:40]), total, nh, pkt[at:total])
    return None


def tool_sniff46(args: argparse.Namespace) -> int:
    """Both directions of one interface, IPv4 and IPv6: ESP and ESP-in-UDP (family,
    encapsulation, SPI, direction; each distinct kind once), TCP SYNs with their MSS, ICMP
    and ICMPv6 errors with their MTU, UDP datagrams (total length, ports)."""
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    deadline = time.monotonic() + args.duration
    eth_p_all = 0x0003
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(eth_p_all))
    s.bind((args.iface, eth_p_all))
    s.settimeout(0.05)
    esp: dict[tuple[int, bool, str, bool], int] = {}
    syns: list[dict[str, Any]] = []
    icmp: list[dict[str, Any]] = []
    udp: list[dict[str, Any]] = []
    Path(args.ready).touch()
    while not _stop and time.monotonic() < deadline:
        try:
            pkt, addr = s.recvfrom(65535)
        except TimeoutError:
            continue
        parsed = _l4(pkt)
        if parsed is None:
            continue
        v, src, dst, total, proto, l4 = parsed
        out = addr[2] == socket.PACKET_OUTGOING
        base = {"v": v, "src": src, "dst": dst, "out": out, "len": total}
        if proto == 50 and len(l4) >= 8:
            key = (v, False, f"{struct.unpack_from('!I', l4)[0]:#010x}", out)
            esp[key] = esp.get(key, 0) + 1
        elif proto == 17 and len(l4) >= 8:
            sport, dport = struct.unpack_from("!HH", l4)
            spi = struct.unpack_from("!I", l4, 8)[0] if len(l4) >= 16 else 0
            if NAT_T_PORT in (sport, dport) and spi != 0:  # RFC 3948: 0 marks IKE
                key = (v, True, f"{spi:#010x}", out)
                esp[key] = esp.get(key, 0) + 1
            else:
                udp.append({**base, "sport": sport, "dport": dport})
        elif proto == 6 and len(l4) >= 20 and l4[13] & 0x02:
            syns.append({**base, "flags": l4[13], "mss": tcp_mss(l4, 0)})
        elif proto == 1 and len(l4) >= 8 and l4[0] in (3, 11, 12):
            icmp.append({**base, "type": l4[0], "code": l4[1],
                         "mtu": struct.unpack_from("!H", l4, 6)[0], "quote": l4[8:56].hex()})
        elif proto == 58 and len(l4) >= 8 and l4[0] < 128:  # RFC 4443 §2.1: errors
            icmp.append({**base, "type": l4[0], "code": l4[1],
                         "mtu": struct.unpack_from("!I", l4, 4)[0], "quote": l4[8:56].hex()})
    s.close()
    result = {"esp": [{"v": k[0], "udp": k[1], "spi": k[2], "out": k[3], "packets": n}
                      for k, n in esp.items()],
              "syns": syns, "icmp": icmp, "udp": udp[-10000:]}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.test_e2e_ipv6")
    sub = parser.add_subparsers(dest="tool", required=True)
    p = sub.add_parser("sniff46")
    p.add_argument("--iface", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ready", required=True)
    p.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args(argv)
    return tool_sniff46(args)


if __name__ == "__main__":
    sys.exit(main())

