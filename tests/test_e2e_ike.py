"""Two espline gateways that negotiate their SAs with IKEv2 (PSK), between network namespaces
the test creates:

    hostA 10.1.0.1 --- gwA [espl0 | 192.0.2.1] ===IKE+ESP=== [192.0.2.2 | espl0] gwB --- hostB

Real everything: the controller process (IKE on UDP 500/4500), SA distribution over ZeroMQ
to the I/O process and the workers, TUN devices, AF_PACKET rings on the outside. gwA starts
the connection (start_action: start), gwB waits for it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline import heap
from tests.e2e_support import (
    SIDE_A,
    SIDE_B,
    TUN_NAME,
    WAN,
    Side,
    Tunnel,
    build_topology,
    echo_roundtrips,
    heap_state,
    ike_gateway_config,
    parent,
    start_gateway,
    wait_for,
    wait_link,
)
from tests.netns import (
    REPO_ROOT,
    NetnsLab,
    netns_lab_fixture,  # noqa: F401  (provides the netns_lab fixture)
    require_root_netns,
)

PSK = "a long pre-shared key for the e2e test"


def ike_config(local: Side, remote: Side, rundir: Path, *, start: bool | str, encap: bool,
               esp: str = "aes128gcm16", ike: str = "aes128gcm16-prfsha256-x25519",
               child_extra: str = "") -> str:
    return ike_gateway_config(local, remote, rundir, start=start, encap=encap, esp=esp,
                              ike=ike, child_extra=child_extra, psk=PSK)


def start_ike_pair(lab: NetnsLab, tmp: Path, *, encap: bool = False,
                   esp: str = "aes128gcm16", start_a: bool | str = True,
                   child_extra_a: str = "") -> Tunnel:
    topo = build_topology(lab, inside="tun")
    gws = []
    for ns, local, remote, name, start in ((topo.gw_b, SIDE_B, SIDE_A, "b", False),
                                           (topo.gw_a, SIDE_A, SIDE_B, "a", start_a)):
        rundir = tmp / f"run-{name}"
        gws.append(start_gateway(ns, ike_config(local, remote, rundir, start=start,
                                                encap=encap, esp=esp,
                                                child_extra=child_extra_a if name == "a"
                                                else ""), tmp, name, rundir))
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
        stats = tunnel.a.wait_stats(lambda s: s["sa_count"] == 2 and len(s["sas"]) == 2,
                                    what="two SAs that carried traffic")
        assert {sa["direction"] for sa in stats["sas"]} == {"in", "out"}
        assert "IKE SA established" in tunnel.a.log() and "IKE SA established" in tunnel.b.log()
        # pipeline/heap.py: the I/O process (the workers' parent) has its heap on huge
        # pages, the controller keeps pymalloc.
        io = parent(stats["worker_pids"][0])
        assert parent(io) == tunnel.a.proc.pid
        assert heap_state(io)[0] == (heap.supported() is None)
        assert not heap_state(tunnel.a.proc.pid)[0]
        if esp == "aes128gcm16":
            operate_over_vici(tunnel, tmp_path)
    finally:
        codes = tunnel.stop()
    assert codes == [0, 0], tunnel.logs()
    # gwA's shutdown deleted the IKE SA: gwB saw it go.
    assert "IKE SA down" in tunnel.b.log(), tunnel.logs()
    wait_link(tunnel.topo.gw_a, TUN_NAME, False)
    wait_link(tunnel.topo.gw_b, TUN_NAME, False)


def admin(tunnel: Tunnel, side: str, *args: str) -> subprocess.CompletedProcess[str]:
    gw = tunnel.a if side == "a" else tunnel.b
    return subprocess.run([sys.executable, "-m", "controller.cli", *args, "--uri",
                           f"unix://{gw.runtime_dir}/vici.sock"], capture_output=True,
                          text=True, timeout=60, cwd=REPO_ROOT, check=False)


def operate_over_vici(tunnel: Tunnel, tmp: Path) -> None:
    """The operator's view: strongSwan's own swanctl and espline's CLI on the admin socket;
    terminate and initiate change what the tunnel carries."""
    swanctl = shutil.which("swanctl")
    if swanctl is not None:
        def list_sas() -> str:
            out = subprocess.run([swanctl, "--list-sas", "--uri",
                                  f"unix://{tunnel.a.runtime_dir}/vici.sock"],
                                 capture_output=True, text=True, timeout=30, check=False)
            assert out.returncode == 0, out.stderr
            return out.stdout

        # Counters reach the controller a few times a second.
        wait_for(lambda: re.search(r"in  [0-9a-f]{8}, +[1-9]\d{5,} bytes", list_sas())
                 is not None, 5, "inbound bytes in list-sas")
        text = list_sas()
        assert re.search(r"^site: #1, ESTABLISHED, IKEv2, [0-9a-f]{16}_i\* [0-9a-f]{16}_r$",
                         text, re.M), text
        assert "local  'gw-1.example.net' @ 192.0.2.1[500]" in text, text
        assert "AES_GCM_16-128/PRF_HMAC_SHA2_256/CURVE_25519" in text, text
        assert re.search(r"lan: #\d+, reqid \d+, INSTALLED, TUNNEL, ESP:AES_GCM_16-128", text), text
        assert "local  10.1.0.0/24" in text and "remote 10.2.0.0/24" in text, text
        assert re.search(r"in  [0-9a-f]{8}, +[1-9]\d* bytes", text), text
    listed = admin(tunnel, "b", "list-sas", "--json")
    assert listed.returncode == 0, listed.stderr
    sas = json.loads(listed.stdout)
    assert any("site" in sa for sa in (sas if isinstance(sas, list) else [sas])), sas
    assert admin(tunnel, "a", "stats").returncode == 0
    # Terminate from B: both sides drop the SAs, the tunnel stops carrying traffic.
    term = admin(tunnel, "b", "terminate", "--ike", "site")
    assert term.returncode == 0, term.stdout + term.stderr
    wait_for(lambda: "IKE SA down" in tunnel.a.log(), 10, "A to see the delete")
    assert not tunnel.topo.host_a.ping(SIDE_B.host, timeout=1)
    # Initiate from B (the responder so far): the tunnel is back.
    init = admin(tunnel, "b", "initiate", "--child", "lan")
    assert init.returncode == 0, init.stdout + init.stderr
    assert tunnel.topo.host_a.ping(SIDE_B.host, timeout=10), tunnel.logs()


def test_trap_negotiates_on_the_first_packet(netns_lab: NetnsLab, tmp_path: Path) -> None:
    """start_action: trap: no SA until traffic matches the child's selectors; the data plane
    reports the hit (an acquire), the controller initiates, the tunnel comes up."""
    require_root_netns()
    tunnel = start_ike_pair(netns_lab, tmp_path, start_a="trap")  # its ping is the trigger
    try:
        assert "traffic for a trapped child (site/lan): initiating" in tunnel.a.log()
        assert tunnel.topo.host_b.ping(SIDE_A.host, timeout=5)
    finally:
        codes = tunnel.stop()
    assert codes == [0, 0], tunnel.logs()


def test_swanctl_load_all_creates_connections_that_come_up(netns_lab: NetnsLab,
                                                           tmp_path: Path) -> None:
    """Gateway A starts with no connection at all; strongSwan's own swanctl loads one from a
    swanctl.conf written as strongSwan's documentation shows (PSK site-to-site) and
    initiates it over espline's VICI socket; the tunnel to gateway B comes up."""
    require_root_netns()
    swanctl = shutil.which("swanctl")
    if swanctl is None:
        from tests.strongswan import require_strongswan

        require_strongswan()
        return
    topo = build_topology(netns_lab, inside="tun")
    run_a, run_b = tmp_path / "run-a", tmp_path / "run-b"
    bare = textwrap.dedent(f"""\
        controller: {{vici_socket: {run_a}/vici.sock}}
        dataplane:
          workers: 2
          inside: {{mode: tun, name: {TUN_NAME}}}
          outside: {{mode: af_packet, interface: {WAN}}}
          endpoints: {{runtime_dir: {run_a}}}
        """)
    b = start_gateway(topo.gw_b, ike_config(SIDE_B, SIDE_A, run_b, start=False, encap=False),
                      tmp_path, "b", run_b)
    a = start_gateway(topo.gw_a, bare, tmp_path, "a", run_a)
    tunnel = Tunnel(topo, a, b, False)
    try:
        wait_link(topo.gw_a, TUN_NAME, True)
        wait_for(lambda: "controller up: 0 connection(s)" in a.log(), 20, "A's controller")
        conf_dir = tmp_path / "swanctl"
        conf_dir.mkdir()
        (conf_dir / "swanctl.conf").write_text(textwrap.dedent(f"""\
            connections {{
                site {{
                    local_addrs  = {SIDE_A.outer}
                    remote_addrs = {SIDE_B.outer}
                    proposals = aes128gcm16-prfsha256-x25519
                    local {{
                        auth = psk
                        id = gw-1.example.net
                    }}
                    remote {{
                        auth = psk
                        id = gw-2.example.net
                    }}
                    children {{
                        lan {{
                            local_ts  = {SIDE_A.net}
                            remote_ts = {SIDE_B.net}
                            esp_proposals = aes128gcm16
                        }}
                    }}
                    version = 2
                }}
            }}
            secrets {{
                ike-1 {{
                    id-1 = gw-1.example.net
                    id-2 = gw-2.example.net
                    secret = "{PSK}"
                }}
            }}
            """))
        uri = ["--uri", f"unix://{run_a}/vici.sock"]
        env = {**os.environ, "SWANCTL_DIR": str(conf_dir)}

        def swan(*args: str) -> str:
            res = subprocess.run([swanctl, *args, *uri], capture_output=True, text=True,
                                 env=env, timeout=60, check=False)
            assert res.returncode == 0, res.stdout + res.stderr + tunnel.logs()
            return res.stdout

        loaded = swan("--load-all")
        assert "loaded connection 'site'" in loaded and PSK not in loaded, loaded
        conns = swan("--list-conns")
        assert "site: IKEv2" in conns and "lan: TUNNEL" in conns, conns
        assert not topo.host_a.ping(SIDE_B.host, timeout=1)  # nothing up yet: dropped
        swan("--initiate", "--child", "lan")
        assert topo.host_a.ping(SIDE_B.host, timeout=10), tunnel.logs()
        assert "INSTALLED" in swan("--list-sas")
    finally:
        codes = tunnel.stop()
    assert codes == [0, 0], tunnel.logs()


def test_a_volume_limit_rekeys_the_child_sa_under_traffic(netns_lab: NetnsLab,
                                                          tmp_path: Path) -> None:
    """rekey_packets: the data plane's counters reach the controller, which rekeys the Child
    SA (make-before-break): the stream through it loses nothing."""
    require_root_netns()
    from tests.e2e_support import Tool

    tunnel = start_ike_pair(netns_lab, tmp_path, child_extra_a="rekey_packets: 300")
    try:
        recv = Tool.start(tunnel.topo.host_b, tmp_path, "recv", "udp-recv", "--port", "7300",
                          "--duration", "60")
        send = Tool.start(tunnel.topo.host_a, tmp_path, "send", "udp-send", "--dst",
                          SIDE_B.host, "--port", "7300", "--count", "1500", "--rate", "500",
                          "--duration", "60")
        sent = send.wait(30)
        wait_for(lambda: "reached its soft limit" in tunnel.a.log(), 10, "the soft limit")
        time.sleep(1.0)
        got = recv.finish()
        missing = set(range(sent["sent"])) - set(got["counters"])
        assert sent["sent"] == 1500 and not missing, (sorted(missing)[:20], tunnel.logs())
        assert re.search(r"CHILD_SA lan\{1\} rekeyed into \{2\}", tunnel.a.log()), tunnel.logs()
    finally:
        codes = tunnel.stop()
    assert codes == [0, 0], tunnel.logs()


def test_sighup_reload_keeps_sas_and_vici_events_flow(netns_lab: NetnsLab,
                                                      tmp_path: Path) -> None:
    """A connection added to the file arrives with SIGHUP; the established SA is left alone;
    a `vici` package client registered for events sees the IKE SA go down and log lines."""
    require_root_netns()
    import socket as socketlib
    import threading

    import vici

    tunnel = start_ike_pair(netns_lab, tmp_path)
    events: list[tuple[str, dict[str, object]]] = []
    sock = socketlib.socket(socketlib.AF_UNIX)
    try:
        before = json.loads(admin(tunnel, "a", "list-sas", "--json").stdout)
        sock.connect(str(tunnel.a.runtime_dir / "vici.sock"))
        session = vici.Session(sock)

        def listen() -> None:
            for name, message in session.listen(["ike-updown", "log"], timeout=0.5):
                if name is None:
                    if stop.is_set():
                        return
                    continue
                events.append((name.decode(), message))

        stop = threading.Event()
        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        config = tmp_path / "a.yaml"
        config.write_text(config.read_text().replace("connections:\n", textwrap.dedent(f"""\
            connections:
              second:
                local_addrs: [{SIDE_A.outer}]
                remote_addrs: [{SIDE_B.outer}]
                proposals: [aes256-sha256-modp2048]
                local: {{auth: psk, id: gw-1.example.net}}
                remote: {{auth: psk, id: gw-2.example.net}}
                children:
                  more: {{local_ts: [10.1.9.0/24], remote_ts: [10.2.9.0/24]}}
            """), 1))
        tunnel.a.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in tunnel.a.log(), 10, "the reload")
        conns = admin(tunnel, "a", "list-conns")
        assert "second:" in conns.stdout and "site:" in conns.stdout, conns.stdout
        after = json.loads(admin(tunnel, "a", "list-sas", "--json").stdout)
        assert after == before or _spis(after) == _spis(before)  # the SA was left alone
        assert tunnel.topo.host_a.ping(SIDE_B.host, timeout=5)
        assert admin(tunnel, "a", "terminate", "--ike", "site").returncode == 0
        wait_for(lambda: any(n == "ike-updown" for n, _ in events), 10, "ike-updown")
        wait_for(lambda: any(n == "log" for n, _ in events), 10, "log events")
        stop.set()
        listener.join(5)
    finally:
        sock.close()
        codes = tunnel.stop()
    assert codes == [0, 0], tunnel.logs()
    down = next(m for n, m in events if n == "ike-updown")
    assert "site" in down and "up" not in down  # the IKE SA went down
    assert any(b"IKE SA down" in bytes(m.get("msg", b"")) for n, m in events if n == "log")


def _spis(listed: object) -> list[str]:
    return sorted(re.findall(r"[0-9a-f]{16}", json.dumps(listed)))
