"""Interoperability with strongSwan (Debian's charon, userspace kernel-libipsec data plane), in
network namespaces the test creates:

    hostA 10.1.0.1 --- gwA espline [espl0 | 192.0.2.1] ==IKE+ESP-in-UDP== [192.0.2.2 | ipsec0]
        gwB charon --- 10.2.0.1 hostB

kernel-libipsec speaks UDP-encapsulated ESP only and fakes NAT detection, so espline must do
the NAT-T part of RFC 7296 §2.23 and RFC 3948 to talk to it at all. Each case negotiates with
one IKE and one ESP proposal, with espline or strongSwan as the initiator, then pings and runs
TCP through the tunnel in both directions. ``test_zz_matrix`` prints the results as a matrix.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e_support import (
    SIDE_A,
    SIDE_B,
    TUN_NAME,
    Gateway,
    Tunnel,
    build_topology,
    echo_roundtrips,
    ike_gateway_config,
    start_gateway,
    wait_for,
    wait_link,
)
from tests.netns import (
    NetnsLab,
    netns_lab_fixture,  # noqa: F401  (provides the netns_lab fixture)
    require_root_netns,
)
from tests.strongswan import Charon, require_strongswan, swanctl_conf

PSK = "interop pre-shared key, long enough"
ID_A, ID_B = "gw-a.example.net", "gw-b.example.net"
IKE = ["aes128gcm16-prfsha256-x25519", "aes256-sha256-modp2048",
       "chacha20poly1305-prfsha256-ecp256"]
ESP = ["aes128gcm16", "aes256gcm16", "aes128-sha256"]
# Every IKE proposal with every ESP proposal, espline initiating; strongSwan initiating, each
# IKE proposal once (with a different ESP proposal each).
CASES = ([("espline", ike, esp) for ike in IKE for esp in ESP]
         + [("strongswan", ike, esp) for ike, esp in zip(IKE, ESP, strict=True)])
RESULTS: dict[tuple[str, str, str], str] = {}


def espline_config(rundir: Path, *, ike: str, esp: str, start: bool,
                   dpd_delay: str = "0s", dpd_timeout: str = "0s") -> str:
    return ike_gateway_config(SIDE_A, SIDE_B, rundir, start=start, encap=True, esp=esp, ike=ike,
                              ids=(ID_A, ID_B), psk=PSK,
                              conn_extra=f"dpd_delay: {dpd_delay}\n"
                                         f"            dpd_timeout: {dpd_timeout}")


class Interop:
    def __init__(self, lab: NetnsLab, tmp: Path, *, initiator: str, ike: str, esp: str,
                 dpd_delay: str = "0s", dpd_timeout: str = "0s") -> None:
        self.topo = build_topology(lab, inside="tun")
        self.charon = Charon(self.topo.gw_b.popen, tmp / "charon")
        self.charon.write(swanctl_conf(
            local=SIDE_B.outer, remote=SIDE_A.outer, local_id=ID_B, remote_id=ID_A,
            local_ts=SIDE_B.net, remote_ts=SIDE_A.net, psk=PSK, proposals=ike,
            esp_proposals=esp))
        self.charon.start()
        rundir = tmp / "run-a"
        self.espline: Gateway = start_gateway(
            self.topo.gw_a, espline_config(rundir, ike=ike, esp=esp,
                                           start=initiator == "espline", dpd_delay=dpd_delay,
                                           dpd_timeout=dpd_timeout),
            tmp, "a", rundir)
        wait_link(self.topo.gw_a, TUN_NAME, True)
        if initiator == "strongswan":
            wait_for(lambda: "controller up" in self.espline.log(), 20, "espline to listen")
            self.charon.swanctl("--initiate", "--child", "lan", "--timeout", "20", timeout=30)

    def logs(self) -> str:
        return f"--- espline\n{self.espline.log()}\n--- strongSwan\n{self.charon.log()}"

    def up(self) -> None:
        wait_for(lambda: "INSTALLED" in self.charon.list_sas(), 30,
                 "strongSwan's CHILD_SA\n" + self.logs())

    def stop(self) -> int:
        try:
            return self.espline.stop()
        finally:
            self.charon.stop()


@pytest.mark.parametrize(("initiator", "ike", "esp"), CASES,
                         ids=[f"{i}-{k}-{e}" for i, k, e in CASES])
def test_interop(netns_lab: NetnsLab, tmp_path: Path, initiator: str, ike: str,
                 esp: str) -> None:
    require_root_netns()
    require_strongswan()
    RESULTS[(initiator, ike, esp)] = "FAIL"
    run = Interop(netns_lab, tmp_path, initiator=initiator, ike=ike, esp=esp)
    try:
        run.up()
        sas = run.charon.list_sas()
        assert "TUNNEL-in-UDP" in sas, sas
        assert f"{SIDE_A.net} === " in sas or SIDE_A.net in sas, sas
        assert run.topo.host_a.ping(SIDE_B.host, timeout=15), "ping a->b\n" + run.logs()
        assert run.topo.host_b.ping(SIDE_A.host, timeout=5), "ping b->a\n" + run.logs()
        echo_roundtrips(Tunnel(run.topo, run.espline, run.espline, True))
        sas = run.charon.list_sas()
        counts = re.findall(r"^\s+(in|out)\s+[0-9a-f]{8}(?:_i)?, +(\d+) bytes", sas, re.M)
        assert {d for d, n in counts if int(n) > 300_000} == {"in", "out"}, sas
    finally:
        code = run.stop()
    assert code == 0, run.logs()
    RESULTS[(initiator, ike, esp)] = "ok"


def test_zz_matrix() -> None:
    """Print what ran (pytest -s shows it; the closing note quotes it)."""
    if not RESULTS:
        pytest.skip("no interop case ran")
    width = max(len(k) for k in IKE)
    lines = [f"{'initiator':<11} {'IKE proposal':<{width}} " + " ".join(f"{e:<13}" for e in ESP)]
    for initiator in ("espline", "strongswan"):
        for ike in IKE:
            cells = [RESULTS.get((initiator, ike, esp), "-") for esp in ESP]
            lines.append(f"{initiator:<11} {ike:<{width}} " + " ".join(f"{c:<13}" for c in cells))
    print("\n" + "\n".join(lines))
    assert all(v == "ok" for v in RESULTS.values()), "\n".join(lines)
