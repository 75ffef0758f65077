"""Shared pieces of the two-gateway end-to-end tests (test_e2e_static.py, test_e2e_wire.py).

    hostA 10.1.0.1 [eth0] --- [lan0] gwA [wan0 192.0.2.1] ==ESP== [192.0.2.2 wan0] gwB [lan0]
        --- [eth0] 10.2.0.1 hostB

Each gateway runs ``python -m controller.cli run -c FILE`` with one static SA pair
(``config``); :func:`start_pair` builds the namespaces (:func:`build_topology`), starts both
gateways and waits until hostA's ping reaches hostB through the tunnel.

Inside modes (``inside=``):

* ``tun``: the gateway's kernel forwards between ``lan0`` and the TUN device ``espl0``
  (ip_forward on; espline routes the remote subnet into the TUN).
* ``af_packet`` (bump in the wire): espline reads every frame arriving on ``lan0`` from an
  AF_PACKET ring and writes decapsulated packets back there itself. ``lan0`` keeps its
  address (10.x.0.254, the hosts' next hop, so ARP works both ways), but IPv4 forwarding is
  off in the gateway's namespace: the kernel sees the same frames (AF_PACKET only copies)
  and must not route them too. With forwarding off a packet for another host is dropped
  silently (``ip_error`` sends no ICMP when the input device does not forward), where with
  it on the kernel would answer each one with ICMP net unreachable (it has no route to the
  remote subnet). The hosts keep TCP segmentation offload on: a veth passes a TSO
  packet (up to 64 KiB) to its peer as it is, and the ring, with virtio-net headers, hands
  it over as such for espline to cut (pipeline/offload.py; ``set_offloads`` turns TSO off
  for a test that needs wire-sized packets).

Tools, run inside a namespace as ``python -m tests.e2e_support TOOL ...`` (standard library,
numpy and espline's own pipeline modules only). Long-running ones touch ``--ready`` once they
listen and write their JSON result to ``--out`` on SIGTERM (or when ``--duration`` ends):

* ``capture``  AF_PACKET RX ring (pipeline.afpacket.RxRing, no filter): SPI and sequence number
  of every ESP / ESP-in-UDP packet arriving on an interface, in arrival order, plus the
  first ``--keep`` packets' bytes.
* ``sniff``    AF_PACKET socket: TCP SYNs with their MSS option and ICMP errors with their MTU,
  both directions of one interface.
* ``udp-send`` a paced stream of numbered, timestamped, self-checking UDP payloads.
* ``udp-recv`` receives them: arrival order and times, duplicates, corrupt payloads.
* ``inject``   sends raw IPv4 packets (IP_HDRINCL) read from a JSON file of hex strings.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.netns import REPO_ROOT, Namespace, NetnsLab

__all__ = [
    "ECHO_CLIENT",
    "ECHO_SERVER",
    "KEY_AB",
    "KEY_BA",
    "SIDE_A",
    "SIDE_B",
    "Gateway",
    "Side",
    "Tool",
    "Topology",
    "Tunnel",
    "build_topology",
    "config",
    "ike_gateway_config",
    "start_gateway",
    "start_pair",
    "wait_for",
    "wait_link",
]

KEY_AB = "0x000102030405060708090a0b0c0d0e0f10111213"
KEY_BA = "0x202122232425262728292a2b2c2d2e2f30313233"
WAN, LAN, ETH = "wan0", "lan0", "eth0"
TUN_NAME = "espl0"


@dataclass(frozen=True)
class Side:
    """One site: its gateway's outer address, its subnet, its host and its outbound SA."""

    outer: str
    net: str
    host: str
    gw_lan: str
    spi_out: int
    key_out: str


SIDE_A = Side("192.0.2.1", "10.1.0.0/24", "10.1.0.1", "10.1.0.254", 0x1001, KEY_AB)
SIDE_B = Side("192.0.2.2", "10.2.0.0/24", "10.2.0.1", "10.2.0.254", 0x2001, KEY_BA)


def config(local: Side, remote: Side, rundir: Path, *, encap: bool, workers: int = 2,
           inside: str = "tun", outside: str = "socket", handoff_min: int | None = None,
           max_packets: int | None = None, hugepages: bool = True) -> str:
    """The YAML of one gateway: one static SA pair between ``local`` and ``remote``.
    ``handoff_min``: the smallest batch the I/O process hands to a worker (default: a full
    one); 1 sends the workers every batch, for tests of the worker path. ``max_packets``:
    the batch size (default 256)."""
    batch = {k: v for k, v in (("handoff_min", handoff_min), ("max_packets", max_packets))
             if v is not None}
    batch_cfg = ("batch: {" + ", ".join(f"{k}: {v}" for k, v in batch.items()) + "}"
                 if batch else "")
    inside_cfg = (f"{{mode: tun, name: {TUN_NAME}}}" if inside == "tun"
                  else f"{{mode: af_packet, interface: {LAN}}}")
    outside_cfg = ("{mode: socket}" if outside == "socket"
                   else f"{{mode: af_packet, interface: {WAN}}}")
    return textwrap.dedent(f"""\
        dataplane:
          workers: {workers}
          inside: {inside_cfg}
          outside: {outside_cfg}
          endpoints: {{runtime_dir: {rundir}}}
          hugepages: {str(hugepages).lower()}
          {batch_cfg}
        static_sas:
          - name: {local.outer}-to-{remote.outer}
            local_addr: {local.outer}
            remote_addr: {remote.outer}
            mode: tunnel
            encap: {str(encap).lower()}
            local_ts: [{local.net}]
            remote_ts: [{remote.net}]
            out: {{spi: {local.spi_out:#x}, enc: aes128gcm16, key: "{local.key_out}"}}
            in:  {{spi: {remote.spi_out:#x}, enc: aes128gcm16, key: "{remote.key_out}"}}
        """)


# -- topology --------------------------------------------------------------------------------


@dataclass
class Topology:
    gw_a: Namespace
    gw_b: Namespace
    host_a: Namespace
    host_b: Namespace
    inside: str


def build_topology(lab: NetnsLab, *, inside: str = "tun") -> Topology:
    """Four namespaces and three veth pairs; see the module docstring for ``inside``."""
    gw_a, gw_b, host_a, host_b = (lab.namespace() for _ in range(4))
    lab.veth(gw_a, gw_b, a_name=WAN, b_name=WAN,
             a_addr=f"{SIDE_A.outer}/24", b_addr=f"{SIDE_B.outer}/24")
    for host, gw, side in ((host_a, gw_a, SIDE_A), (host_b, gw_b, SIDE_B)):
        lab.veth(host, gw, a_name=ETH, b_name=LAN, a_addr=f"{side.host}/24",
                 b_addr=f"{side.gw_lan}/24")
    host_a.add_route(SIDE_B.net, via=SIDE_A.gw_lan)
    host_b.add_route(SIDE_A.net, via=SIDE_B.gw_lan)
    for gw in (gw_a, gw_b):
        if inside == "tun":
            gw.enable_forwarding()
        else:
            gw.sysctl("net.ipv4.ip_forward", 0)  # espline forwards, the kernel must not
    return Topology(gw_a, gw_b, host_a, host_b, inside)


def set_offloads(ns: Namespace, ifname: str, *, tso: bool) -> None:
    """Turn TCP segmentation offload (and generic segmentation) on or off on ``ifname``,
    through the ethtool ioctl (there may be no ``ethtool`` binary)."""
    ns.python("-m", "tests.e2e_support", "offload", ifname, "on" if tso else "off")


# -- gateways --------------------------------------------------------------------------------


@dataclass
class Gateway:
    """One ``espline run`` process in a namespace, with its log and runtime directory."""

    name: str
    ns: Namespace
    proc: subprocess.Popen[str]
    log_path: Path
    runtime_dir: Path
    exit_code: int | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stats(self) -> dict[str, Any] | None:
        """The last ``stats.json`` the data plane wrote (every second, and at exit)."""
        try:
            data: dict[str, Any] = json.loads((self.runtime_dir / "stats.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data

    def wait_stats(self, check: Callable[[dict[str, Any]], bool], timeout: float = 10.0,
                   what: str = "stats") -> dict[str, Any]:
        """Poll ``stats.json`` until ``check`` accepts it."""
        found: list[dict[str, Any]] = []

        def ok() -> bool:
            s = self.stats()
            if s is not None and check(s):
                found.append(s)
                return True
            return False

        wait_for(ok, timeout, f"{self.name}: {what}; last {self.stats()}\n{self.log()}")
        return found[-1]

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait for a clean exit (the final stats.json is written then)."""
        if self.exit_code is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            self.exit_code = self.proc.wait(timeout)
        return self.exit_code


def start_gateway(ns: Namespace, cfg: str, tmp: Path, name: str, runtime_dir: Path) -> Gateway:
    path = tmp / f"{name}.yaml"
    path.write_text(cfg)
    log_path = tmp / f"{name}.log"
    with open(log_path, "w") as log:  # the child has its own descriptor
        proc = ns.popen([sys.executable, "-m", "controller.cli", "run", "-c", str(path)],
                        stdout=log, stderr=log, cwd=REPO_ROOT)
    return Gateway(name, ns, proc, log_path, runtime_dir)


@dataclass
class Tunnel:
    topo: Topology
    a: Gateway
    b: Gateway
    encap: bool

    def stop(self) -> list[int]:
        """Stop both gateways (each even if the other fails); their exit codes."""
        codes = []
        for gw in (self.a, self.b):
            try:
                codes.append(gw.stop())
            except subprocess.TimeoutExpired:
                codes.append(-1)
        return codes

    def logs(self) -> str:
        return f"--- gwA log\n{self.a.log()}\n--- gwB log\n{self.b.log()}"


def start_pair(lab: NetnsLab, tmp: Path, *, encap: bool = True, workers: int = 2,
               inside: str = "tun", outside: str = "socket",
               topo: Topology | None = None, handoff_min: int | None = None,
               max_packets: int | None = None,
               hugepages: tuple[bool, bool] = (True, True)) -> Tunnel:
    """Both gateways up and the tunnel carrying a ping from hostA to hostB.

    Each gateway's namespace holds only lab processes: the lab kills them by PID at teardown
    whatever happens here; a test that wants final counters calls ``Tunnel.stop()``.
    """
    topo = topo or build_topology(lab, inside=inside)
    gws = []
    for ns, local, remote, name, huge in ((topo.gw_a, SIDE_A, SIDE_B, "a", hugepages[0]),
                                          (topo.gw_b, SIDE_B, SIDE_A, "b", hugepages[1])):
        rundir = tmp / f"run-{name}"
        cfg = config(local, remote, rundir, encap=encap, workers=workers, inside=inside,
                     outside=outside, handoff_min=handoff_min, max_packets=max_packets,
                     hugepages=huge)
        gws.append(start_gateway(ns, cfg, tmp, name, rundir))
    tunnel = Tunnel(topo, gws[0], gws[1], encap)
    # Both data planes up (their sockets and rings open) before the first packet: a raw ESP
    # packet that reaches a gateway a moment too early is answered by its kernel with ICMP
    # protocol unreachable, which the tests that watch the wire count as an error.
    for gw in gws:
        wait_for(lambda gw=gw: "data plane up" in gw.log() or gw.proc.poll() is not None,
                 30, f"gateway {gw.name}'s data plane\n{tunnel.logs()}")
        if gw.proc.poll() is not None:
            raise AssertionError(f"gateway {gw.name} exited early\n{tunnel.logs()}")
    assert topo.host_a.ping(SIDE_B.host, timeout=15), f"no ping through the tunnel\n{tunnel.logs()}"
    return tunnel


def heap_state(pid: int) -> tuple[bool, int]:
    """Whether process ``pid`` was started with pipeline/heap.py's environment, and the
    KiB of anonymous memory it has on transparent huge pages."""
    from pipeline import heap

    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    huge = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            huge = int(line.split()[1])
    return f"{heap.MARKER}=hugepages".encode() in env, huge


def parent(pid: int) -> int:
    """The PID of process ``pid``'s parent (proc(5): the field after the state)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def wait_for(check: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_link(ns: Namespace, name: str, present: bool, timeout: float = 20.0) -> None:
    wait_for(lambda: (name in ns.links()) == present, timeout,
             f"{name} {'to appear' if present else 'to go'} in {ns}", interval=0.1)


# -- tools, from the test's side -------------------------------------------------------------


@dataclass
class Tool:
    """A long-running tool of this module in a namespace (see the module docstring)."""

    name: str
    proc: subprocess.Popen[str]
    out: Path
    log_path: Path

    @classmethod
    def start(cls, ns: Namespace, tmp: Path, name: str, tool: str, *args: str,
              ready_timeout: float = 15.0) -> Tool:
        out, ready, log_path = (tmp / f"{name}.{ext}" for ext in ("json", "ready", "log"))
        with open(log_path, "w") as log:  # the child has its own descriptor
            proc = ns.popen([sys.executable, "-m", "tests.e2e_support", tool, "--out",
                             str(out), "--ready", str(ready), *args],
                            stdout=log, stderr=log, cwd=REPO_ROOT)
        self = cls(name, proc, out, log_path)

        def up() -> bool:
            if ready.exists():
                return True
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}: {self.log()}")
            return False

        wait_for(up, ready_timeout, f"{name} to be ready")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> dict[str, Any]:
        """Wait for the tool to end by itself; its result."""
        self.proc.wait(timeout)
        return self.result()

    def finish(self, timeout: float = 15.0) -> dict[str, Any]:
        """SIGTERM (the tool then writes its result), wait, and return the result."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def result(self) -> dict[str, Any]:
        if self.proc.returncode != 0 or not self.out.exists():
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}: {self.log()}")
        data: dict[str, Any] = json.loads(self.out.read_text())
        return data


# ============================================================================================
# The tools themselves (run inside namespaces).
# ============================================================================================

_stop = False


def _on_term(signum: int, frame: object) -> None:
    global _stop
    _stop = True


def _setup(args: argparse.Namespace) -> float:
    """SIGTERM/SIGINT end the tool's loop; returns its deadline."""
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    return time.monotonic() + args.duration


def _ready(args: argparse.Namespace) -> None:
    Path(args.ready).touch()


def _write(args: argparse.Namespace, result: dict[str, Any]) -> None:
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, args.out)


NAT_T_PORT = 4500


def esp_fields(pkt: bytes) -> tuple[int, int, int] | None:
    """(SPI, sequence number, offset of the ESP header) of an IPv4 ESP or ESP-in-UDP (RFC
    3948: port 4500, a non-zero SPI where IKE has its zero marker) packet; None otherwise."""
    if len(pkt) < 20 or pkt[0] >> 4 != 4:
        return None
    at = (pkt[0] & 0xF) * 4
    if pkt[9] == 17:
        if len(pkt) < at + 16 or struct.unpack_from("!H", pkt, at + 2)[0] != NAT_T_PORT:
            return None
        at += 8
    elif pkt[9] != 50 or len(pkt) < at + 8:
        return None
    spi, seq = struct.unpack_from("!II", pkt, at)
    if spi == 0:
        return None
    return spi, seq, at


def tool_capture(args: argparse.Namespace) -> int:
    from pipeline.afpacket import RxRing
    from pipeline.batch import Batch

    deadline = _setup(args)
    # 128 blocks of 256 KiB, each handed over after 20 ms at the latest: 2.5 s of a slow
    # stream or about 20 000 full-size frames before the kernel drops (kernel_drops).
    ring = RxRing(args.iface, block_size=1 << 18, block_count=128, retire_blk_tov_ms=20)
    batch = Batch(256, 2048)
    seqs: dict[str, list[int]] = {}
    kept: list[str] = []
    other = 0
    _ready(args)
    while not _stop and time.monotonic() < deadline:
        if not ring.wait(0.05):
            continue
        batch.count = 0
        ring.read_into(batch)
        for i in range(batch.count):
            pkt = batch.packet(i)
            f = esp_fields(pkt)
            if f is None:
                other += 1
                continue
            seqs.setdefault(f"{f[0]:#010x}", []).append(f[1])
            if len(kept) < args.keep:
                kept.append(pkt.hex())
    # What is still in the ring arrived before the stop: read it too.
    while True:
        batch.count = 0
        if not ring.read_into(batch):
            break
        for i in range(batch.count):
            f = esp_fields(batch.packet(i))
            if f is not None:
                seqs.setdefault(f"{f[0]:#010x}", []).append(f[1])
    stats = ring.stats()
    ring.close()
    _write(args, {"seqs": seqs, "kept": kept, "other": other, "ring": stats})
    return 0


def tcp_mss(pkt: bytes, at: int) -> int | None:
    """The MSS option of the TCP header at ``at`` (RFC 9293 §3.1), None if it has none."""
    doff = (pkt[at + 12] >> 4) * 4
    opts = pkt[at + 20 : at + doff]
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2:
            break
        if kind == 2 and opts[i + 1] == 4:
            return int(struct.unpack_from("!H", opts, i + 2)[0])
        i += opts[i + 1]
    return None


def tool_sniff(args: argparse.Namespace) -> int:
    deadline = _setup(args)
    eth_p_all = 0x0003
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(eth_p_all))
    s.bind((args.iface, eth_p_all))
    s.settimeout(0.05)
    syns: list[dict[str, Any]] = []
    icmp: list[dict[str, Any]] = []
    udp: list[dict[str, Any]] = []
    _ready(args)
    while not _stop and time.monotonic() < deadline:
        try:
            pkt, addr = s.recvfrom(65535)
        except TimeoutError:
            continue
        if len(pkt) < 20 or pkt[0] >> 4 != 4:
            continue
        ihl = (pkt[0] & 0xF) * 4
        proto = pkt[9]
        src, dst = socket.inet_ntoa(pkt[12:16]), socket.inet_ntoa(pkt[16:20])
        out = addr[2] == socket.PACKET_OUTGOING
        base = {"src": src, "dst": dst, "out": out, "len": struct.unpack_from("!H", pkt, 2)[0],
                "df": bool(pkt[6] & 0x40)}
        if proto == 6 and len(pkt) >= ihl + 20 and pkt[ihl + 13] & 0x02:
            syns.append({**base, "flags": pkt[ihl + 13], "mss": tcp_mss(pkt, ihl)})
        elif proto == 1 and len(pkt) >= ihl + 8 and pkt[ihl] in (3, 11, 12):
            mtu = struct.unpack_from("!H", pkt, ihl + 6)[0]
            icmp.append({**base, "type": pkt[ihl], "code": pkt[ihl + 1], "mtu": mtu})
        elif proto == 17 and len(pkt) >= ihl + 8:
            udp.append({**base, "dport": struct.unpack_from("!H", pkt, ihl + 2)[0]})
    s.close()
    _write(args, {"syns": syns, "icmp": icmp, "udp": udp[-10000:]})
    return 0


MAGIC = b"ESPL"
_HDR = struct.Struct("!4sIIQ")  # magic, run id, counter, send time (ns, CLOCK_MONOTONIC)
_DIGEST = 8


def payload(run: int, counter: int, size: int, sent_ns: int = 0) -> bytes:
    """A stream payload: header, filler, and a digest of both (corruption shows)."""
    head = _HDR.pack(MAGIC, run, counter, sent_ns)
    body = head + bytes((counter + i) & 0xFF for i in range(max(0, size - len(head) - _DIGEST)))
    return body + hashlib.blake2b(body, digest_size=_DIGEST).digest()


def parse_payload(data: bytes) -> tuple[int, int, int] | None:
    """(run, counter, send time) of an intact payload; None if corrupt or foreign."""
    if len(data) < _HDR.size + _DIGEST or data[:4] != MAGIC:
        return None
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.blake2b(body, digest_size=_DIGEST).digest() != digest:
        return None
    _, run, counter, sent = _HDR.unpack_from(data)
    return run, counter, sent


def tool_udp_send(args: argparse.Namespace) -> int:
    deadline = _setup(args)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if args.df:
        ip_mtu_discover, ip_pmtudisc_probe = 10, 3  # linux/in.h: DF set, PMTU ignored
        s.setsockopt(socket.IPPROTO_IP, ip_mtu_discover, ip_pmtudisc_probe)
    template = payload(args.run, 0, args.size)
    filler = bytearray(template)
    interval = 1.0 / args.rate if args.rate else 0.0
    errors = sent = 0
    _ready(args)
    t0 = time.monotonic()
    for i in range(args.first, args.first + args.count):
        if _stop or time.monotonic() > deadline:
            break
        if interval:
            wait = t0 + (i - args.first) * interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        head = _HDR.pack(MAGIC, args.run, i, time.monotonic_ns())
        filler[: len(head)] = head
        pad = len(filler) - len(head) - _DIGEST
        if pad > 0:
            filler[len(head) : len(head) + pad] = bytes((i + k) & 0xFF for k in range(pad))
        body = bytes(filler[:-_DIGEST])
        msg = body + hashlib.blake2b(body, digest_size=_DIGEST).digest()
        try:
            s.sendto(msg, (args.dst, args.port))
            sent += 1
        except OSError:
            errors += 1
    _write(args, {"sent": sent, "errors": errors, "first": args.first,
                  "elapsed": time.monotonic() - t0})
    return 0


def tool_udp_recv(args: argparse.Namespace) -> int:
    deadline = _setup(args)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with contextlib.suppress(OSError):  # SO_RCVBUFFORCE needs CAP_NET_ADMIN (we are root)
        s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
    s.bind((args.bind, args.port))
    s.settimeout(0.05)
    counters: list[int] = []
    recv_ns: list[int] = []
    sent_ns: list[int] = []
    corrupt = foreign = 0
    _ready(args)
    while not _stop and time.monotonic() < deadline:
        try:
            data = s.recv(65535)
        except TimeoutError:
            continue
        now = time.monotonic_ns()
        got = parse_payload(data)
        if got is None:
            corrupt += 1
            continue
        if got[0] != args.run:
            foreign += 1
            continue
        counters.append(got[1])
        sent_ns.append(got[2])
        recv_ns.append(now)
    s.close()
    _write(args, {"counters": counters, "recv_ns": recv_ns, "sent_ns": sent_ns,
                  "corrupt": corrupt, "foreign": foreign,
                  "duplicates": len(counters) - len(set(counters))})
    return 0


def tool_inject(args: argparse.Namespace) -> int:
    packets = [bytes.fromhex(h) for h in json.loads(Path(args.file).read_text())]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sent = 0
    for pkt in packets:
        s.sendto(pkt, (socket.inet_ntoa(pkt[16:20]), 0))
        sent += 1
        if args.gap:
            time.sleep(args.gap)
    s.close()
    print(json.dumps({"sent": sent}))
    return 0


def tool_offload(args: argparse.Namespace) -> int:
    """ETHTOOL_STSO / ETHTOOL_SGSO through SIOCETHTOOL (linux/ethtool.h)."""
    import ctypes
    import fcntl

    siocethtool = 0x8946
    ethtool_stso, ethtool_sgso = 0x1F, 0x24
    value = 1 if args.state == "on" else 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for cmd in (ethtool_stso, ethtool_sgso):
            arg = ctypes.create_string_buffer(struct.pack("II", cmd, value))  # ethtool_value
            # struct ifreq: the name, then ifr_data pointing at the argument (40 bytes).
            ifreq = struct.pack("16sP16x", args.iface.encode(), ctypes.addressof(arg))
            fcntl.ioctl(s.fileno(), siocethtool, ifreq)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e_support")
    sub = parser.add_subparsers(dest="tool", required=True)

    def long_running(name: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--ready", required=True)
        p.add_argument("--duration", type=float, default=60.0)
        return p

    p = long_running("capture")
    p.add_argument("--iface", required=True)
    p.add_argument("--keep", type=int, default=0)
    p = long_running("sniff")
    p.add_argument("--iface", required=True)
    p = long_running("udp-send")
    p.add_argument("--dst", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--rate", type=float, default=0.0, help="packets/s; 0: as fast as possible")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--run", type=int, default=1)
    p.add_argument("--df", action="store_true")
    p = long_running("udp-recv")
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--run", type=int, default=1)
    p = sub.add_parser("inject")
    p.add_argument("--file", required=True)
    p.add_argument("--gap", type=float, default=0.0)
    p = sub.add_parser("offload")
    p.add_argument("iface")
    p.add_argument("state", choices=("on", "off"))
    args = parser.parse_args(argv)
    tools: dict[str, Callable[[argparse.Namespace], int]] = {
        "capture": tool_capture, "sniff": tool_sniff, "udp-send": tool_udp_send,
        "udp-recv": tool_udp_recv, "inject": tool_inject, "offload": tool_offload,
    }
    return tools[args.tool](args)


ECHO_SERVER = textwrap.dedent("""\
    import socket, sys, threading
    proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if proto == "udp":
        s = socket.socket(family, socket.SOCK_DGRAM); s.bind((host, port))
        print("ready", flush=True)
        while True:
            data, peer = s.recvfrom(65535); s.sendto(data, peer)
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    data = os.urandom(size)
    if proto == "udp":
        s = socket.socket(family, socket.SOCK_DGRAM); s.settimeout(1.0)
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


def echo_roundtrips(tunnel: Tunnel, ports: tuple[int, int] = (7001, 7002)) -> None:
    """TCP (300 kB) and UDP (20 x 1000 B) echoed by hostB for hostA, through the tunnel."""
    host_a, host_b = tunnel.topo.host_a, tunnel.topo.host_b
    for proto, port in (("tcp", ports[0]), ("udp", ports[1])):
        server = host_b.popen([sys.executable, "-c", ECHO_SERVER, proto, SIDE_B.host,
                               str(port)], stdout=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        size = 300_000 if proto == "tcp" else 20_000
        out = host_a.run([sys.executable, "-c", ECHO_CLIENT, proto, SIDE_B.host, str(port),
                          str(size)], check=False, timeout=60)
        assert out.returncode == 0, (proto, out.stdout, out.stderr, tunnel.logs())


if __name__ == "__main__":
    sys.exit(main())


def ike_gateway_config(local: Side, remote: Side, rundir: Path, *, start: bool | str,
                       encap: bool, esp: str = "aes128gcm16",
                       ike: str = "aes128gcm16-prfsha256-x25519", child_extra: str = "",
                       conn_extra: str = "", ids: tuple[str, str] | None = None,
                       psk: str = "a long pre-shared key for the e2e test") -> str:
    """The YAML of one gateway with an IKE connection ``site`` (child ``lan``) from
    ``local`` to ``remote``, PSK-authenticated; ``start``: start_action (True: start)."""
    action = start if isinstance(start, str) else ("start" if start else "none")
    local_id, remote_id = ids or tuple(f"gw-{s.outer.rsplit('.', 1)[1]}.example.net"
                                       for s in (local, remote))
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
            {conn_extra}
            local: {{auth: psk, id: {local_id}}}
            remote: {{auth: psk, id: {remote_id}}}
            children:
              lan:
                local_ts: [{local.net}]
                remote_ts: [{remote.net}]
                esp_proposals: [{esp}]
                start_action: {action}
                {child_extra}
        secrets:
          ike:
            - {{id: [{local_id}, {remote_id}], secret: "{psk}"}}
        """)
