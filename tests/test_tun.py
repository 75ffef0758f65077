"""The TUN inside interface (pipeline/tun.py), end to end in a network namespace.

The TUN code runs inside a lab namespace: this module doubles as the script that does it
(``python -m tests.test_tun inner`` under ``ip netns exec``), printing one JSON line of
observations that the tests below assert on. The namespace is the lab's, so a failure
leaves no device, route or process behind in the host.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import select
import shutil
import struct
import subprocess
import sys
import time
from typing import Any

import pytest

from pipeline import tun as tun_mod
from pipeline.batch import HEADROOM, Batch, Verdict
from pipeline.tun import TunDevice, TunError
from tests.netns import REPO_ROOT, NetnsLab, netns_lab_fixture  # noqa: F401  (netns_lab)

TUN_ADDRESS = "10.99.0.1/24"
REMOTE_SUBNET = "10.98.0.0/24"
REMOTE_HOST = "10.98.0.5"


# -- helpers shared by the in-namespace script ------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo_reply(request: bytes) -> bytes:
    """The ICMP echo reply (RFC 792) to an IPv4 echo request: addresses swapped, type 0."""
    ihl = (request[0] & 0x0F) * 4
    icmp = bytearray(request[ihl:])
    icmp[0] = 0  # echo reply
    icmp[2:4] = b"\0\0"
    icmp[2:4] = struct.pack("!H", _checksum(bytes(icmp)))
    ip = bytearray(request[:ihl])
    ip[12:16], ip[16:20] = request[16:20], request[12:16]
    ip[8] = 64
    ip[10:12] = b"\0\0"
    ip[10:12] = struct.pack("!H", _checksum(bytes(ip)))
    return bytes(ip + icmp)


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False).stdout


def _inner() -> dict[str, Any]:
    """Runs inside the namespace: TUN up, ping through it, answer, close."""
    out: dict[str, Any] = {}
    batch = Batch(capacity=8)
    tun = TunDevice("espltun%d", mtu=1400, address=TUN_ADDRESS, routes=[REMOTE_SUBNET])
    pinger = None
    try:
        out["name"] = tun.name
        out["link"] = _ip("-o", "link", "show", tun.name)
        out["route"] = _ip("-o", "route", "show", REMOTE_SUBNET)
        out["empty_read"] = tun.read_batch(batch)  # EAGAIN at once: non-blocking
        out["empty_read_packets"] = [batch.packet(i).hex() for i in range(batch.count)]

        pinger = subprocess.Popen(
            [sys.executable, "-m", "tests.netns", "ping", REMOTE_HOST, "--timeout", "4"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        request = None
        deadline = time.monotonic() + 4
        while request is None and time.monotonic() < deadline:
            select.select([tun], [], [], 0.5)
            n = tun.read_batch(batch, max_packets=8)
            for i in range(n):
                pkt = batch.packet(i)
                # Skip what else the kernel sends into a fresh device (IPv6 RS, MLD).
                if pkt[0] >> 4 == 4 and pkt[9] == 1 and pkt[(pkt[0] & 0x0F) * 4] == 8:
                    request = pkt
                    m = batch.meta[i]
                    out["meta"] = {
                        "slot": i,
                        "offset": int(m["offset"]),
                        "length": int(m["length"]),
                        "verdict": int(m["verdict"]),
                        "count": batch.count,
                    }
                    break
        if request is None:
            out["error"] = "no echo request read from the TUN"
            return out
        ihl = (request[0] & 0x0F) * 4
        out["ip"] = {
            "version": request[0] >> 4,
            "ihl": ihl,
            "total_length": struct.unpack_from("!H", request, 2)[0],
            "ttl": request[8],
            "protocol": request[9],
            "header_checksum_ok": _checksum(request[:ihl]) == 0,
            "src": str(ipaddress.IPv4Address(request[12:16])),
            "dst": str(ipaddress.IPv4Address(request[16:20])),
            "icmp_type": request[ihl],
            "icmp_code": request[ihl + 1],
            "icmp_checksum_ok": _checksum(request[ihl:]) == 0,
            "len": len(request),
        }

        # Slot 0 is refused by the kernel (not IPv4/IPv6), slot 1 is a drop and must not be
        # written, slot 2 is the reply.
        out_batch = Batch.for_packets([b"\0" * 20, b"\xff" * 20, _echo_reply(request)])
        out_batch.meta["verdict"][1] = Verdict.INTEGRITY
        out["written"] = tun.write_batch(out_batch)
        q = tun.queues[0]
        out["counters"] = {"tx_packets": q.tx_packets, "tx_errors": q.tx_errors}
        out["pinger_rc"] = pinger.wait(timeout=5)
        out["pinger_out"] = pinger.stdout.read().strip() if pinger.stdout else ""
    finally:
        if pinger is not None and pinger.poll() is None:
            pinger.kill()
            pinger.wait()
        tun.close()
    tun.close()  # idempotent
    out["closed_link"] = _ip("-o", "link", "show", out["name"])
    out["closed_route"] = _ip("-o", "route", "show", REMOTE_SUBNET)
    try:
        tun.read_batch(batch)
        out["read_after_close"] = "no error"
    except ValueError as exc:
        out["read_after_close"] = str(exc)
    return out


def _inner_multiqueue() -> dict[str, Any]:
    with TunDevice("esplmq%d", queues=3, routes=["2001:db8:98::/64"]) as tun:
        fds = [q.fileno() for q in tun.queues]
        extra = tun_mod.TunQueue.attach(tun.name)
        try:
            fds.append(extra.fileno())
        finally:
            extra.close()
        route = _ip("-o", "-6", "route", "show", "2001:db8:98::/64")
        name = tun.name
    return {"fds": fds, "route": route, "name": name, "after": _ip("-o", "link", "show", name)}


def _inner_routes() -> dict[str, Any]:
    """Many routes added and withdrawn one by one (pipeline/rtnl.py), a refused one, one
    someone else removed first."""
    out: dict[str, Any] = {}
    with TunDevice("esplrt%d", address=TUN_ADDRESS) as tun, \
            TunDevice("esplrt%d") as other:
        clients = [f"10.64.{i // 200}.{i % 200 + 1}/32" for i in range(300)]
        for route in [*clients, "2001:db8:97::/64"]:
            tun.add_route(route)
        out["shown"] = _ip("-o", "route", "show", "dev", tun.name)
        out["shown6"] = _ip("-o", "-6", "route", "show", "dev", tun.name)
        try:
            other.add_route(clients[5])  # the same prefix through another device
            out["refused"] = "no error"
        except TunError as exc:
            out["refused"] = [exc.errno, str(exc)]
        _ip("route", "del", clients[7], "dev", tun.name)
        for route in clients[:250]:
            tun.remove_route(route)  # clients[7]: gone already, not an error
        out["left"] = _ip("-o", "route", "show", "dev", tun.name)
        out["routes"] = list(tun.routes)
        out["name"] = tun.name
    out["after_close"] = _ip("-o", "route", "show", "10.64.0.0/16", "root", "10.64.0.0/16")
    return out


def _inner_oversize() -> dict[str, Any]:
    """A packet longer than a slot's payload area (device MTU above it) is kept truncated and
    marked TOO_BIG; the one after it is read normally."""
    import socket

    batch = Batch(capacity=4)  # 2048-byte slots: 1600 bytes of payload area
    with TunDevice("esplbig%d", mtu=2000, address=TUN_ADDRESS, routes=[REMOTE_SUBNET]) as tun:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"x" * 1800, (REMOTE_HOST, 9))
            udp.sendto(b"y" * 10, (REMOTE_HOST, 9))
        got = 0
        deadline = time.monotonic() + 3
        while got < 2 and time.monotonic() < deadline:
            select.select([tun], [], [], 0.5)
            got = tun.read_batch(batch, max_packets=2)
        m = batch.meta[: batch.count]
        result = {
            "count": batch.count,
            "verdicts": m["verdict"].tolist(),
            "lengths": m["length"].tolist(),
            "max_packet": batch.max_packet,
        }
        # Read alone (the lone-packet branch), the same.
        alone = Batch(capacity=4)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"z" * 1800, (REMOTE_HOST, 9))
        deadline = time.monotonic() + 3
        while alone.count == 0 and time.monotonic() < deadline:
            select.select([tun], [], [], 0.5)
            tun.read_batch(alone, max_packets=1)
        result["alone"] = [alone.count, *alone.row(0)[:4]]
        result["rx_too_big"] = tun.queues[0].rx_too_big
        result["rx_packets"] = tun.queues[0].rx_packets
        return result


# -- tests -------------------------------------------------------------------------------------


def _run_inner(netns_lab: NetnsLab, which: str, *, ipv6: bool = True) -> dict[str, Any]:
    ns = netns_lab.namespace()
    if not ipv6:
        # No router solicitations or MLD reports from the fresh device: the only packets in
        # the TUN are the ones the test sends.
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", 1)
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", 1)
    proc = ns.python("-m", "tests.test_tun", which, timeout=30)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_tun_ping_roundtrip(netns_lab: NetnsLab) -> None:
    r = _run_inner(netns_lab, "inner", ipv6=False)
    assert "error" not in r, r
    name = r["name"]
    assert name.startswith("espltun")
    assert "mtu 1400" in r["link"] and ",UP" in r["link"]
    assert f"dev {name}" in r["route"]
    assert r["empty_read"] == 0, r["empty_read_packets"]

    meta = r["meta"]
    assert meta["verdict"] == Verdict.PASS
    assert (meta["slot"], meta["count"]) == (0, 1)
    assert meta["offset"] == meta["slot"] * Batch().slot_size + HEADROOM
    assert meta["length"] == r["ip"]["len"] == r["ip"]["total_length"]
    ip = r["ip"]
    assert (ip["version"], ip["ihl"], ip["protocol"]) == (4, 20, 1)
    assert (ip["src"], ip["dst"]) == ("10.99.0.1", REMOTE_HOST)
    assert ip["ttl"] == 64
    assert ip["header_checksum_ok"] and ip["icmp_checksum_ok"]
    assert (ip["icmp_type"], ip["icmp_code"]) == (8, 0)

    assert r["written"] == 1
    assert r["counters"] == {"tx_packets": 1, "tx_errors": 1}
    assert r["pinger_rc"] == 0, r["pinger_out"]

    assert r["closed_link"] == ""
    assert r["closed_route"] == ""
    assert "closed" in r["read_after_close"]


def test_tun_multi_queue(netns_lab: NetnsLab) -> None:
    r = _run_inner(netns_lab, "inner-multiqueue")
    assert len(set(r["fds"])) == 4
    assert f"dev {r['name']}" in r["route"]
    assert r["after"] == ""


def test_tun_routes_one_by_one(netns_lab: NetnsLab) -> None:
    """Routes as ``ip route add PREFIX dev DEV`` makes them (table main, proto static,
    scope global), written over rtnetlink by pipeline/rtnl.py: hundreds added, the kernel's
    refusal (EEXIST) named, withdrawn ones gone, the rest withdrawn at close."""
    r = _run_inner(netns_lab, "inner-routes")
    clients = {f"10.64.{i // 200}.{i % 200 + 1}" for i in range(300)}
    shown = [line.split() for line in r["shown"].splitlines() if "proto kernel" not in line]
    # (ip leaves out what is the default: table main, scope global, unicast)
    assert sorted(shown) == sorted([c, "proto", "static"] for c in clients)
    assert "2001:db8:97::/64 proto static metric 1024" in r["shown6"]
    assert r["refused"][0] == errno.EEXIST and "10.64.0.6/32" in r["refused"][1]
    left = {line.split()[0] for line in r["left"].splitlines()}
    assert clients - left == {f"10.64.{i // 200}.{i % 200 + 1}" for i in range(250)}
    assert len(r["routes"]) == 51 and r["routes"][-1] == "2001:db8:97::/64"
    assert r["after_close"] == ""


def test_tun_oversize_packet_is_marked_too_big(netns_lab: NetnsLab) -> None:
    r = _run_inner(netns_lab, "inner-oversize", ipv6=False)
    assert r["count"] == 2
    assert r["verdicts"] == [Verdict.TOO_BIG, Verdict.PASS]
    # count, offset (slot 0's payload area), length (cut), sa, verdict
    assert r["alone"] == [1, HEADROOM, r["max_packet"], 0, Verdict.TOO_BIG]
    assert r["lengths"] == [r["max_packet"], 20 + 8 + 10]
    assert (r["rx_too_big"], r["rx_packets"]) == (2, 3)


def test_tun_missing_device_says_what_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tun_mod, "TUN_PATH", "/nonexistent/net/tun")
    with pytest.raises(TunError, match="missing"):
        TunDevice()


def test_tun_without_cap_net_admin_says_what_is_needed(netns_lab: NetnsLab) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    ns = netns_lab.namespace()
    code = "from pipeline.tun import TunDevice\nTunDevice()"
    proc = ns.run(
        ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin",
         sys.executable, "-c", code],
        check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "TunError" in proc.stderr and "CAP_NET_ADMIN" in proc.stderr, proc.stderr


def test_batch_views_are_reused() -> None:
    """read_batch allocates its readv buffers once per batch, not once per read."""
    batch = Batch(capacity=4)
    first = tun_mod._rx_views(batch)
    assert tun_mod._rx_views(batch) is first
    views, offsets = first
    assert [v[0].nbytes for v in views] == [batch.max_packet] * 4
    assert all(v[1].nbytes == 1 for v in views)  # the spill byte that reveals truncation
    assert offsets.tolist() == [i * batch.slot_size + HEADROOM for i in range(4)]


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "inner"
    inners = {
        "inner": _inner,
        "inner-multiqueue": _inner_multiqueue,
        "inner-oversize": _inner_oversize,
        "inner-routes": _inner_routes,
    }
    result = inners[which]()
    print(json.dumps(result), flush=True)


class FlakyDevice:
    """A TunDevice stand-in whose kernel refuses some routes, then accepts them."""

    name = "flaky0"

    def __init__(self) -> None:
        self.routes: list[str] = []
        self.refuse = {"10.64.0.7/32", "10.64.0.8/32"}

    def add_route(self, route: str) -> None:
        if route in self.refuse:
            raise TunError(errno.EEXIST, f"add route {route}: File exists")
        if route not in self.routes:
            self.routes.append(route)

    def remove_route(self, route: str) -> None:
        if route == "10.64.0.9/32":
            raise TunError(errno.EPERM, "remove route: Operation not permitted")
        self.routes.remove(route)


def test_refused_routes_are_tried_again_and_failures_stay_out_of_the_io_loop(
        caplog: pytest.LogCaptureFixture) -> None:
    """TunIO.update_routes (the SPD edits' routes): a route the kernel refuses is logged
    once and tried again at every later update while wanted; a refused withdrawal is
    logged, not raised (it would stop the data plane)."""
    from controller.run import TunIO

    device = FlakyDevice()
    io = TunIO(device)  # type: ignore[arg-type]
    io.update_routes(["10.64.0.7/32", "10.64.0.1/32"], [])
    assert device.routes == ["10.64.0.1/32"]
    io.update_routes(["10.64.0.8/32"], [])
    device.refuse.clear()  # whatever held them is gone
    io.update_routes(["10.64.0.9/32"], [])
    assert sorted(device.routes) == [f"10.64.0.{i}/32" for i in (1, 7, 8, 9)]
    io.update_routes([], ["10.64.0.9/32", "10.64.0.1/32"])  # the first is refused
    assert sorted(device.routes) == [f"10.64.0.{i}/32" for i in (7, 8, 9)]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("10.64.0.7/32" in w for w in warnings) == 1  # once, not at every retry
    assert any("withdraw route 10.64.0.9/32" in w for w in warnings)
