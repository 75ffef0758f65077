"""Two espline gateways with static SAs, between network namespaces the test creates.

    hostA 10.1.0.1 --- gwA [espl0 | 192.0.2.1] ===ESP=== [192.0.2.2 | espl0] gwB --- 10.2.0.1 hostB

Real everything: TUN devices, raw and UDP sockets, worker processes, ZeroMQ, and the kernel
forwarding between the hosts and the gateways. Traffic: ping, TCP and UDP, in both
directions, with ESP in UDP (encap: true) and raw ESP (encap: false). The topology, the
configuration and the gateway processes come from tests/e2e_support.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import heap
from tests.e2e_support import (
    SIDE_A,
    TUN_NAME,
    Tunnel,
    echo_roundtrips,
    heap_state,
    start_pair,
    wait_link,
)
from tests.netns import (
    NetnsLab,
    netns_lab_fixture,  # noqa: F401  (provides the netns_lab fixture)
    require_root_netns,
)


@pytest.mark.parametrize("encap", [True, False], ids=["udp-encap", "raw-esp"])
def test_two_gateways_carry_ping_tcp_udp(netns_lab: NetnsLab, encap: bool,
                                         tmp_path: Path) -> None:
    """With raw ESP, batches of 4: the TCP packets of 64 KiB the TUN devices hand over
    (hostA's TCP sends them over its veth, gwA forwards them whole) are cut over many
    batches (pipeline/tun.py ``pending``)."""
    require_root_netns()
    tunnel = start_pair(netns_lab, tmp_path, encap=encap,  # hostA's ping reached hostB
                        max_packets=None if encap else 4, hugepages=(True, False))
    try:
        assert tunnel.topo.host_b.ping(SIDE_A.host, timeout=5)
        echo_roundtrips(tunnel)
        check_heaps(tunnel)
    finally:
        codes = tunnel.stop()
    assert codes == [0, 0], tunnel.logs()
    # TUN offloads (pipeline/offload.py): TCP packets cut here, segments written back as one.
    io = [gw.stats()["inside_io"] for gw in (tunnel.a, tunnel.b)]  # type: ignore[index]
    assert sum(s["rx_gso"] for s in io) > 0 and sum(s["tx_coalesced"] for s in io) > 0, io
    assert all(s["rx_gso_errors"] == s["tx_errors"] == 0 for s in io), io
    # SIGTERM removed the TUN devices (and with them their routes).
    wait_link(tunnel.topo.gw_a, TUN_NAME, False)
    wait_link(tunnel.topo.gw_b, TUN_NAME, False)


def check_heaps(tunnel: Tunnel) -> None:
    """pipeline/heap.py: gwA (``hugepages`` by default) executed itself again with the heap
    on huge pages, and its workers inherited that; gwB (``hugepages: false``) did not. Where
    this kernel or libc cannot do it, neither changed anything."""
    stats = tunnel.a.wait_stats(lambda s: len(s["worker_pids"]) == 2, what="two workers")
    on, huge = heap_state(tunnel.a.proc.pid)
    workers = [heap_state(pid)[0] for pid in stats["worker_pids"]]
    if heap.supported() is None:
        assert on and all(workers), (on, workers)
        assert huge > 0, "the heap holds no huge page"
        assert "data plane heap: transparent huge pages" in tunnel.a.log()
    else:
        assert not on and not any(workers)
    assert not heap_state(tunnel.b.proc.pid)[0]
