"""Two espline gateways that negotiate their SAs with IKEv2 (PSK), between network namespaces
the test creates:

    hostA 10.1.0.1 --- gwA [espl0 | 192.0.2.1] ===IKE+ESP=== [192.0.2.2 | espl0] gwB --- hostB

Real everything: the controller process (IKE on UDP 500/4500), SA distribution over ZeroMQ
to the I/O process and the workers, TUN devices, AF_PACKET rings on the outside. gwA starts
the connection (start_action: start), gwB waits for it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.e2e_support import (
    SIDE_A,
    SIDE_B,
    TUN_NAME,
    WAN,
    Side,
    Tunnel,
    build_topology,
    echo_roundtrips,
    start_gateway,
    wait_link,
)
from tests.netns import (
    NetnsLab,
    netns_lab_fixture,  # noqa: F401  (provides the netns_lab fixture)
    require_root_netns,
)

PSK = "a long pre-shared key for the e2e test"


def ike_config(local: Side, remote: Side, rundir: Path, *, start: bool, encap: bool,
               esp: str = "aes128gcm16", ike: str = "aes128gcm16-prfsha256-x25519") -> str:
    local_id, remote_id = (f"gw-{s.outer.rsplit('.', 1)[1]}.example.net" for s in (local, remote))
    return textwrap.dedent(f"""\
        controller: {{vici_socket: {rundir}/vici.sock}}
        dataplane:
          workers: 2
          inside: {{mode: tun, name: {TUN_NAME}}}
          outside: {{mode: af_packet, interface: {WAN}}}
          endpoints: {{runtime_dir: {rundir}}}
        connections:
          site:
            version: 2
            local_addrs: [{local.outer}]
            remote_addrs: [{remote.outer}]
            proposals: [{ike}]
            encap: {"yes" if encap else "no"}
            local: {{auth: psk, id: {local_id}}}
            remote: {{auth: psk, id: {remote_id}}}
            children:
              lan:
                local_ts: [{local.net}]
                remote_ts: [{remote.net}]
                esp_proposals: [{esp}]
                start_action: {"start" if start else "none"}
        secrets:
          ike:
            - {{id: [{local_id}, {remote_id}], secret: "{PSK}"}}
        """)


def start_ike_pair(lab: NetnsLab, tmp: Path, *, encap: bool = False,
                   esp: str = "aes128gcm16") -> Tunnel:
    topo = build_topology(lab, inside="tun")
    gws = []
    for ns, local, remote, name, start in ((topo.gw_b, SIDE_B, SIDE_A, "b", False),
                                           (topo.gw_a, SIDE_A, SIDE_B, "a", True)):
        rundir = tmp / f"run-{name}"
        gws.append(start_gateway(ns, ike_config(local, remote, rundir, start=start,
                                                encap=encap, esp=esp), tmp, name, rundir))
    tunnel = Tunnel(topo, gws[1], gws[0], encap)
    wait_link(topo.gw_a, TUN_NAME, True)
    wait_link(topo.gw_b, TUN_NAME, True)
    for gw in gws:
        if gw.proc.poll() is not None:
            raise AssertionError(f"gateway {gw.name} exited early\n{tunnel.logs()}")
    assert topo.host_a.ping(SIDE_B.host, timeout=20), f"no ping through the tunnel\n{tunnel.logs()}"
    return tunnel


@pytest.mark.parametrize("esp", ["aes128gcm16", "aes128-sha256"])
def test_two_gateways_negotiate_with_ikev2_and_carry_traffic(
        netns_lab: NetnsLab, tmp_path: Path, esp: str) -> None:
    require_root_netns()
    tunnel = start_ike_pair(netns_lab, tmp_path, esp=esp)
    try:
        assert tunnel.topo.host_b.ping(SIDE_A.host, timeout=5)
        echo_roundtrips(tunnel)
        # The SAs came from IKE: the data plane reports an inbound and an outbound SA.
        stats = tunnel.a.wait_stats(lambda s: len(s["sas"]) == 2, what="two SAs")
        assert {sa["direction"] for sa in stats["sas"]} == {"in", "out"}
        assert "IKE SA established" in tunnel.a.log() and "IKE SA established" in tunnel.b.log()
    finally:
        codes = tunnel.stop()
    assert codes == [0, 0], tunnel.logs()
    # gwA's shutdown deleted the IKE SA: gwB saw it go.
    assert "IKE SA down" in tunnel.b.log(), tunnel.logs()
    wait_link(tunnel.topo.gw_a, TUN_NAME, False)
    wait_link(tunnel.topo.gw_b, TUN_NAME, False)
