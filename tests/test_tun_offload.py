"""TUN offloads (pipeline/offload.py, pipeline/tun.py) with the kernel's own TCP and UDP.

Two TUN devices in two namespaces, one relay process between them (this module, run as
``python -m tests.test_tun_offload relay ...`` in the first namespace; it opens the second
device after ``setns`` into the second namespace). The relay reads batches from each device
and writes them to the other. A TCP connection carries megabytes each way and UDP datagrams
of many sizes go across, some of them sent at once with UDP_SEGMENT; the kernel at each end
checks every checksum it is given whole (``InCsumErrors`` must stay 0), and the bytes must
arrive as sent (SHA-256).

With offloads on both devices, the kernel hands the relay TCP packets of up to 64 KiB to cut
(``rx_gso``) and the relay writes runs of segments as one (``tx_coalesced``). With offloads
on one device only, every segment the relay cuts is checked by the other kernel one by one.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import select
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from pipeline.batch import Batch
from pipeline.tun import TunDevice
from tests.netns import NetnsLab, netns_lab_fixture  # noqa: F401  (netns_lab)

A_ADDR, B_ADDR = "10.97.0.1", "10.98.0.5"
PORT = 5301
CLONE_NEWNET = 0x40000000
TCP_BYTES = 6 * 1024 * 1024
TXQUEUELEN = 8192  # packets: more than TCP_BYTES in MSS-sized segments
UDP_SIZES = [1, 2, 3, 17, 100, 511, 512, 1000, 1371, 1372]
UDP_GSO = (1200, 9)  # one UDP_SEGMENT send: 9 datagrams of 1200 bytes (and one of 100)
SOL_UDP, UDP_SEGMENT = 17, 103


def _snmp() -> dict[str, int]:
    """InCsumErrors of Tcp and Udp, and Tcp RetransSegs, in this namespace
    (/proc/net/snmp)."""
    out: dict[str, int] = {}
    lines = open("/proc/net/snmp").read().splitlines()  # noqa: SIM115
    for head, values in zip(lines[::2], lines[1::2], strict=True):
        proto = head.split(":")[0]
        fields = dict(zip(head.split()[1:], values.split()[1:], strict=True))
        if proto in ("Tcp", "Udp") and "InCsumErrors" in fields:
            out[proto] = int(fields["InCsumErrors"])
        if proto == "Tcp" and "RetransSegs" in fields:
            out["TcpRetransSegs"] = int(fields["RetransSegs"])
    return out


def _data(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _receive(conn: socket.socket) -> tuple[int, str]:
    """Up to TCP_BYTES from ``conn``: how many, and their SHA-256."""
    digest = hashlib.sha256()
    got = 0
    while got < TCP_BYTES:
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        digest.update(chunk)
        got += len(chunk)
    return got, digest.hexdigest()


def _server() -> dict[str, Any]:
    """In the second namespace: receive TCP_BYTES, send TCP_BYTES back; count UDP."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((B_ADDR, PORT))
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((B_ADDR, PORT))
    lst.listen(1)
    print("ready", flush=True)
    lst.settimeout(20)
    conn, _ = lst.accept()
    conn.settimeout(20)
    got, sha = _receive(conn)
    conn.sendall(_data(2, TCP_BYTES))
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)
    conn.close()
    udp.settimeout(2)
    datagrams = []
    try:
        while len(datagrams) < len(UDP_SIZES) + UDP_GSO[1] + 1:
            datagrams.append(udp.recv(4096))
    except TimeoutError:
        pass
    return {"got": got, "sha": sha,
            "udp_ok": sorted(len(d) for d in datagrams if d == b"u" * len(d)),
            "snmp": _snmp()}


def _client() -> dict[str, Any]:
    """In the first namespace: send TCP_BYTES, receive TCP_BYTES; then the UDP datagrams."""
    conn = socket.create_connection((B_ADDR, PORT), timeout=20, source_address=(A_ADDR, 0))
    conn.sendall(_data(1, TCP_BYTES))
    got, sha = _receive(conn)
    conn.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((A_ADDR, 0))
        for size in UDP_SIZES:
            udp.sendto(b"u" * size, (B_ADDR, PORT))
        size, count = UDP_GSO
        udp.setsockopt(SOL_UDP, UDP_SEGMENT, size)
        udp.sendto(b"u" * (size * count + 100), (B_ADDR, PORT))
    return {"got": got, "sha": sha}


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def _tx_dropped(name: str, ns: str | None = None) -> int:
    """What the kernel dropped on its way into TUN device ``name`` (its queue was full)."""
    argv = ["ip", "-j", "-s", "link", "show", name]
    out = subprocess.run(argv if ns is None else ["ip", "-n", ns, *argv[1:]], check=True,
                         capture_output=True, text=True).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["dropped"])


def _relay(peer_ns: str, offload_a: bool, offload_b: bool, capacity: int) -> dict[str, Any]:
    """In the first namespace: device A here, device B in ``peer_ns``; relay in batches of
    ``capacity`` until the client is done, then a little longer for the UDP datagrams."""
    own = f"/proc/{os.getpid()}/ns/net"
    own_fd = os.open(own, os.O_RDONLY)
    a = TunDevice("esplofa%d", mtu=1400, address=f"{A_ADDR}/24", routes=["10.98.0.0/24"],
                  offload=offload_a)
    _setns(f"/run/netns/{peer_ns}")
    try:
        b = TunDevice("esplofb%d", mtu=1400, address=f"{B_ADDR}/24", routes=["10.97.0.0/24"],
                      offload=offload_b)
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setns(own_fd, CLONE_NEWNET)
        os.close(own_fd)
    # Room in each device's queue for the whole transfer: the relay shares two cores with
    # both TCP ends, and a queue that overflows while it waits for a core (500 packets by
    # default) makes TCP retransmit, which the test counts as a fault of the relay.
    subprocess.run(["ip", "link", "set", a.name, "txqueuelen", str(TXQUEUELEN)], check=True)
    subprocess.run(["ip", "-n", peer_ns, "link", "set", b.name, "txqueuelen", str(TXQUEUELEN)],
                   check=True)
    server = subprocess.Popen(["ip", "netns", "exec", peer_ns, sys.executable, "-m",
                               "tests.test_tun_offload", "server"],
                              stdout=subprocess.PIPE, text=True)
    client = None
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        client = subprocess.Popen([sys.executable, "-m", "tests.test_tun_offload", "client"],
                                  stdout=subprocess.PIPE, text=True)
        batches = {a: Batch(capacity), b: Batch(capacity)}
        other = {a: b, b: a}
        deadline = time.monotonic() + 60
        drain_until = None
        while time.monotonic() < deadline:
            if drain_until is None and client.poll() is not None:
                drain_until = time.monotonic() + 1.0
            if drain_until is not None and (time.monotonic() > drain_until
                                            or server.poll() is not None):
                break
            ready = [d for d in (a, b) if d.pending()]
            if not ready:
                readable, _, _ = select.select([a, b], [], [], 0.1)
                ready = list(readable)
            for dev in ready:
                batch = batches[dev]
                if dev.read_batch(batch):
                    other[dev].write_batch(batch)
        client_out = json.loads(client.communicate(timeout=30)[0].strip().splitlines()[-1])
        server_out = json.loads(server.communicate(timeout=30)[0].strip().splitlines()[-1])
        qa, qb = a.queues[0], b.queues[0]
        counters = {name: {k: getattr(q, k) for k in ("rx_packets", "rx_gso", "rx_gso_errors",
                                                       "rx_too_big", "tx_packets", "tx_errors",
                                                       "tx_coalesced")}
                    for name, q in (("a", qa), ("b", qb))}
        dropped = {"a": _tx_dropped(a.name),
                   "b": _tx_dropped(b.name, peer_ns)}  # kernel: queue full
        return {"client": client_out, "server": server_out, "counters": counters,
                "tx_dropped": dropped,
                "snmp_a": _snmp(),
                "expect_up": hashlib.sha256(_data(1, TCP_BYTES)).hexdigest(),
                "expect_down": hashlib.sha256(_data(2, TCP_BYTES)).hexdigest()}
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        a.close()
        b.close()


@pytest.mark.parametrize(("offload_a", "offload_b", "capacity"), [
    (True, True, 64), (True, False, 64), (False, True, 64),
    (True, True, 7),  # a 64 KiB packet cut over many reads (TunQueue.pending)
])
def test_tcp_and_udp_cross_offloading_tun_devices_intact(
        netns_lab: NetnsLab, offload_a: bool, offload_b: bool, capacity: int) -> None:
    ns_a, ns_b = netns_lab.namespace(), netns_lab.namespace()
    for ns in (ns_a, ns_b):
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", 1)
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", 1)
    proc = ns_a.python("-m", "tests.test_tun_offload", "relay", ns_b.name,
                       str(int(offload_a)), str(int(offload_b)), str(capacity), timeout=90)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    c = r["counters"]
    assert r["client"]["got"] == r["server"]["got"] == TCP_BYTES, r
    assert r["server"]["sha"] == r["expect_up"]
    assert r["client"]["sha"] == r["expect_down"]
    assert r["server"]["udp_ok"] == sorted([*UDP_SIZES, *[UDP_GSO[0]] * UDP_GSO[1], 100]), r
    # Nothing lost or corrupted on the way: no checksum errors, and no retransmission but
    # the odd tail loss probe (TCP resends a segment when no ACK comes within two round
    # trips: the relay shares two cores with both TCP ends).
    assert r["tx_dropped"] == {"a": 0, "b": 0}, r
    for snmp in (r["server"]["snmp"], r["snmp_a"]):
        assert (snmp["Tcp"], snmp["Udp"]) == (0, 0), r
        assert snmp["TcpRetransSegs"] <= 3, r
    for side, on in (("a", offload_a), ("b", offload_b)):
        assert c[side]["rx_gso_errors"] == c[side]["rx_too_big"] == c[side]["tx_errors"] == 0
        # What offloads change: the kernel hands big TCP packets to cut, runs go out as one.
        assert (c[side]["rx_gso"] > 0) is on, c
        assert (c[side]["tx_coalesced"] > 0) is on, c


def main(argv: list[str]) -> int:
    if argv[0] == "server":
        print(json.dumps(_server()))
    elif argv[0] == "client":
        print(json.dumps(_client()))
    else:
        print(json.dumps(_relay(argv[1], argv[2] == "1", argv[3] == "1", int(argv[4]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
