"""Two espline gateways with static SAs, between network namespaces the test creates.

    hostA 10.1.0.1 --- gwA [espl0 | 192.0.2.1] ===ESP=== [192.0.2.2 | espl0] gwB --- 10.2.0.1 hostB

Real everything: TUN devices, raw and UDP sockets, worker processes, ZeroMQ, and the kernel
forwarding between the hosts and the gateways. Traffic: ping, TCP and UDP, in both
directions, with ESP in UDP (encap: true) and raw ESP (encap: false).
"""

from __future__ import annotations

import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.netns import (
    REPO_ROOT,
    Namespace,
    NetnsLab,
    netns_lab_fixture,  # noqa: F401  (provides the netns_lab fixture)
    require_root_netns,
)

KEY_AB = "0x000102030405060708090a0b0c0d0e0f10111213"
KEY_BA = "0x202122232425262728292a2b2c2d2e2f30313233"


def config(local: str, remote: str, lnet: str, rnet: str, out_spi: int, in_spi: int,
           out_key: str, in_key: str, encap: bool, rundir: Path) -> str:
    return textwrap.dedent(f"""\
        dataplane:
          workers: 2
          inside: {{mode: tun, name: espl0}}
          outside: {{mode: socket}}
          endpoints: {{runtime_dir: {rundir}}}
        static_sas:
          - name: {local}-to-{remote}
            local_addr: {local}
            remote_addr: {remote}
            mode: tunnel
            encap: {str(encap).lower()}
            local_ts: [{lnet}]
            remote_ts: [{rnet}]
            out: {{spi: {out_spi:#x}, enc: aes128gcm16, key: "{out_key}"}}
            in:  {{spi: {in_spi:#x}, enc: aes128gcm16, key: "{in_key}"}}
        """)


ECHO_SERVER = textwrap.dedent("""\
    import socket, sys, threading
    proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((host, port))
        print("ready", flush=True)
        while True:
            data, peer = s.recvfrom(65535); s.sendto(data, peer)
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(); print("ready", flush=True)
    while True:
        c, _ = s.accept()
        def echo(c=c):
            while (d := c.recv(65536)):
                c.sendall(d)
            c.close()
        threading.Thread(target=echo, daemon=True).start()
    """)

ECHO_CLIENT = textwrap.dedent("""\
    import os, socket, sys
    proto, host, port, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    data = os.urandom(size)
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.0)
        got = 0
        for i in range(20):
            chunk = data[i * 1000 : (i + 1) * 1000] or b"x"
            for _ in range(5):
                s.sendto(chunk, (host, port))
                try:
                    if s.recv(65535) == chunk:
                        got += 1; break
                except socket.timeout:
                    pass
        print("udp", got); sys.exit(0 if got == 20 else 1)
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(data); s.shutdown(socket.SHUT_WR)
    back = b""
    while (d := s.recv(65536)):
        back += d
    print("tcp", len(back)); sys.exit(0 if back == data else 1)
    """)


def start_gateway(ns: Namespace, cfg: str, tmp: Path, name: str) -> object:
    path = tmp / f"{name}.yaml"
    path.write_text(cfg)
    log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 (closed with the lab)
    return ns.popen([sys.executable, "-m", "controller.cli", "run", "-c", str(path)],
                    stdout=log, stderr=log, cwd=REPO_ROOT)


def wait_link(ns: Namespace, name: str, present: bool, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (name in ns.links()) == present:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} {'never appeared' if present else 'still there'} in {ns}")


@pytest.mark.parametrize("encap", [True, False], ids=["udp-encap", "raw-esp"])
def test_two_gateways_carry_ping_tcp_udp(netns_lab: NetnsLab, encap: bool,
                                         tmp_path: Path) -> None:
    require_root_netns()
    gw_a, gw_b, host_a, host_b = (netns_lab.namespace() for _ in range(4))
    netns_lab.veth(gw_a, gw_b, a_addr="192.0.2.1/24", b_addr="192.0.2.2/24")
    netns_lab.veth(host_a, gw_a, a_addr="10.1.0.1/24", b_addr="10.1.0.254/24")
    netns_lab.veth(host_b, gw_b, a_addr="10.2.0.1/24", b_addr="10.2.0.254/24")
    host_a.add_route("10.2.0.0/24", via="10.1.0.254")
    host_b.add_route("10.1.0.0/24", via="10.2.0.254")
    for gw in (gw_a, gw_b):
        gw.enable_forwarding()
    a = start_gateway(gw_a, config("192.0.2.1", "192.0.2.2", "10.1.0.0/24", "10.2.0.0/24",
                                   0x1001, 0x2001, KEY_AB, KEY_BA, encap, tmp_path / "a"),
                      tmp_path, "a")
    b = start_gateway(gw_b, config("192.0.2.2", "192.0.2.1", "10.2.0.0/24", "10.1.0.0/24",
                                   0x2001, 0x1001, KEY_BA, KEY_AB, encap, tmp_path / "b"),
                      tmp_path, "b")
    try:
        wait_link(gw_a, "espl0", True)
        wait_link(gw_b, "espl0", True)
        assert host_a.ping("10.2.0.1", timeout=10), (tmp_path / "a.log").read_text()
        assert host_b.ping("10.1.0.1", timeout=5)
        for proto, port in (("tcp", 7001), ("udp", 7002)):
            server = host_b.popen([sys.executable, "-c", ECHO_SERVER, proto, "10.2.0.1",
                                   str(port)], stdout=-1)
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            size = 300_000 if proto == "tcp" else 20_000
            out = host_a.run([sys.executable, "-c", ECHO_CLIENT, proto, "10.2.0.1", str(port),
                              str(size)], check=False, timeout=60)
            assert out.returncode == 0, (proto, out.stdout, out.stderr,
                                         (tmp_path / "a.log").read_text())
    finally:
        for proc in (a, b):
            proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
        codes = [proc.wait(15) for proc in (a, b)]  # type: ignore[attr-defined]
    assert codes == [0, 0], ((tmp_path / "a.log").read_text(), (tmp_path / "b.log").read_text())
    # SIGTERM removed the TUN devices (and with them their routes).
    wait_link(gw_a, "espl0", False)
    wait_link(gw_b, "espl0", False)
