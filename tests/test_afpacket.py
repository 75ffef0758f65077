"""AF_PACKET I/O and its BPF filters: pipeline/afpacket.py, pipeline/bpf.py.

Two oracles for the outside filter: a small classic-BPF interpreter written here from the
opcode values in linux/filter.h (not from pipeline.bpf's constants), run over crafted frames
whose verdicts are stated by hand; and the kernel, which runs the same program on the same
frames sent over a veth pair between two network namespaces. The namespace tests also send
real kernel-generated traffic (raw ESP, UDP, ping, TCP) and check RX ring contents byte for
byte, fanout, kernel drop counters, TX with neighbour resolution, and what Linux without
CONFIG_INET_ESP answers to ESP.

``ESPLINE_BENCH=1 pytest tests/test_afpacket.py -k bench -s`` measures the TX methods.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import operator
import os
import select
import shutil
import socket
import statistics
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from pipeline import bpf, neighbours, rtnl
from pipeline.afpacket import (
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    PACKET_FANOUT_HASH,
    RxRing,
    TxPath,
    complete_l4_checksum,
    default_fanout_group,
    suppress_esp_unreachable,
)
from pipeline.batch import HEADROOM, Batch, Verdict
from pipeline.neighbours import EVENTS_EVERY, NeighbourCache
from pipeline.region import HEAD, SharedRegion, complete
from pipeline.rxpair import BULK, IDLE_MOVE_S, SPARSE, SPARSE_WINDOW_S, RxPair

# --- a classic BPF interpreter (linux/filter.h semantics) -----------------------------------


# BPF_ADD, BPF_SUB, BPF_OR, BPF_AND, BPF_LSH, BPF_RSH
_ALU = {
    0x00: operator.add,
    0x10: operator.sub,
    0x40: operator.or_,
    0x50: operator.and_,
    0x60: operator.lshift,
    0x70: operator.rshift,
}


def run_bpf(
    prog: list[bpf.Insn], pkt: bytes, *, protocol: int = 0, vlan_tagged: bool = False
) -> int:
    """Run a classic BPF program like the kernel's socket filter; return its verdict.

    A load past the end of the packet ends the program with 0, as in the kernel.
    """
    a = x = 0
    pc = 0
    ancillary = {0: protocol, 48: int(vlan_tagged)}  # SKF_AD_PROTOCOL, SKF_AD_VLAN_TAG_PRESENT
    for _ in range(4096):
        code, jt, jf, k = prog[pc]
        pc += 1
        cls = code & 0x07
        if cls == 0x00:  # BPF_LD
            mode, size = code & 0xE0, {0x00: 4, 0x08: 2, 0x10: 1}[code & 0x18]
            if mode == 0x00:  # BPF_IMM
                a = k
            elif mode == 0x80:  # BPF_LEN
                a = len(pkt)
            elif mode == 0x20 and k >= 0xFFFFF000:  # BPF_ABS, SKF_AD_OFF + n
                a = ancillary[k - 0xFFFFF000]
            elif mode in (0x20, 0x40):  # BPF_ABS, BPF_IND
                off = (k + (x if mode == 0x40 else 0)) & 0xFFFFFFFF
                if off + size > len(pkt):
                    return 0
                a = int.from_bytes(pkt[off : off + size], "big")
            else:
                raise AssertionError(f"unsupported load 0x{code:02x}")
        elif cls == 0x01:  # BPF_LDX
            if code == 0xB1:  # BPF_LDX | BPF_B | BPF_MSH
                if k >= len(pkt):
                    return 0
                x = (pkt[k] & 0x0F) * 4
            elif code == 0x01:  # BPF_LDX | BPF_IMM
                x = k
            else:
                raise AssertionError(f"unsupported ldx 0x{code:02x}")
        elif cls == 0x04:  # BPF_ALU
            src = x if code & 0x08 else k
            a = _ALU[code & 0xF0](a, src) & 0xFFFFFFFF
        elif cls == 0x05:  # BPF_JMP
            op = code & 0xF0
            if op == 0x00:  # BPF_JA
                pc += k
                continue
            src = x if code & 0x08 else k
            taken = {0x10: a == src, 0x20: a > src, 0x30: a >= src, 0x40: bool(a & src)}[op]
            pc += jt if taken else jf
        elif cls == 0x06:  # BPF_RET
            return a if code & 0x18 == 0x10 else k
        elif cls == 0x07:  # BPF_MISC
            if code & 0xF8 == 0x80:
                a = x  # TXA
            else:
                x = a  # TAX
        else:
            raise AssertionError(f"unsupported class in 0x{code:02x}")
    raise AssertionError("program did not return")


# --- packet crafting ------------------------------------------------------------------------

A_MAC = bytes.fromhex("02aa00000001")
B_MAC = bytes.fromhex("02bb00000002")
GW_MAC = bytes.fromhex("02cc00000003")  # a static neighbour: the gateway to 10.202.0.0/24
A4, B4, GW4, REMOTE4 = "10.201.0.1", "10.201.0.2", "10.201.0.3", "10.202.0.7"
A6, B6 = "2001:db8:af::1", "2001:db8:af::2"


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(
    proto: int,
    payload: bytes,
    *,
    src: str = A4,
    dst: str = B4,
    options: bytes = b"",
    frag: int = 0,
    more_fragments: bool = False,
    ident: int = 0x1234,
    version_ihl: int | None = None,
) -> bytes:
    assert len(options) % 4 == 0
    ihl = 5 + len(options) // 4
    flags = frag | (0x2000 if more_fragments else 0)
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        (0x40 | ihl) if version_ihl is None else version_ihl,
        0,
        20 + len(options) + len(payload),
        ident,
        flags,
        64,
        proto,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    hdr += options
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + payload


def ipv6(next_header: int, payload: bytes, *, src: str = A6, dst: str = B6) -> bytes:
    return (
        struct.pack("!IHBB", 0x60000000, len(payload), next_header, 64)
        + socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + payload
    )


def udp(dport: int, payload: bytes, *, sport: int = 4500, length: int | None = None) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload) if length is None else length, 0) + (
        payload
    )


def esp(spi: int = 0x1001, seq: int = 1, body: bytes = b"ciphertext-and-icv") -> bytes:
    return struct.pack("!II", spi, seq) + body


def ike(body: bytes = b"IKE_SA_INIT...") -> bytes:
    return b"\0\0\0\0" + body  # RFC 3948 §2.2 non-ESP marker


def eth(
    l3: bytes, ethertype: int, *, dst: bytes = B_MAC, src: bytes = A_MAC, pad: bool = True
) -> bytes:
    frame = dst + src + struct.pack("!H", ethertype) + l3
    return frame.ljust(60, b"\0") if pad else frame  # Ethernet minimum frame (without FCS)


@dataclass(frozen=True)
class Case:
    name: str
    frame: bytes
    accept: bool
    l3_len: int  # the L3 packet without Ethernet padding


def _case(name: str, l3: bytes, accept: bool, ethertype: int | None = None) -> Case:
    if ethertype is None:
        ethertype = ETHERTYPE_IPV6 if l3[0] >> 4 == 6 else ETHERTYPE_IPV4
    return Case(name, eth(l3, ethertype), accept, len(l3))


TCP_SYN = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0x50, 0x02, 65535, 0, 0)
ICMP_ECHO = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping"
ROUTER_ALERT = bytes([0x94, 0x04, 0x00, 0x00])  # an IPv4 option, so IHL = 6
LONG_OPTIONS = bytes([0x01] * 36 + [0x00] * 4)  # 40 bytes of NOP/EOL options: IHL = 15

CASES: list[Case] = [
    _case("esp4", ipv4(50, esp(seq=1)), True),
    _case("esp6", ipv6(50, esp(seq=2)), True),
    _case("esp_in_udp4", ipv4(17, udp(4500, esp(seq=3))), True),
    _case("esp_in_udp6", ipv6(17, udp(4500, esp(seq=4))), True),
    _case("ike4", ipv4(17, udp(4500, ike())), False),
    _case("ike6", ipv6(17, udp(4500, ike())), False),
    _case("ike_port500", ipv4(17, udp(500, b"\x11" * 28, sport=500)), False),
    # A keepalive frame is padded with zeroes to 60 bytes: the filter must not read the
    # padding as a payload word (the UDP length says 9).
    _case("keepalive4", ipv4(17, udp(4500, b"\xff")), False),
    _case("keepalive6", ipv6(17, udp(4500, b"\xff")), False),
    _case("esp_in_udp_spi_only", ipv4(17, udp(4500, b"\0\0\x10\x01")), False),
    _case("udp_other_port", ipv4(17, udp(4501, esp(seq=5))), False),
    _case("tcp4", ipv4(6, TCP_SYN), False),
    _case("icmp4", ipv4(1, ICMP_ECHO), False),
    _case("icmp6", ipv6(58, b"\x80\0\0\0\0\1\0\1ping"), False),
    _case("arp", bytes.fromhex("0001080006040001") + A_MAC + bytes(10), False, 0x0806),
    _case("esp4_options", ipv4(50, esp(seq=6), options=ROUTER_ALERT), True),
    _case("esp_in_udp4_options", ipv4(17, udp(4500, esp(seq=7)), options=ROUTER_ALERT), True),
    _case("esp_in_udp4_ihl15", ipv4(17, udp(4500, esp(seq=8)), options=LONG_OPTIONS), True),
    _case("ike4_options", ipv4(17, udp(4500, ike()), options=ROUTER_ALERT), False),
    _case("esp4_first_fragment", ipv4(50, esp(seq=9), more_fragments=True), True),
    _case(
        "esp_in_udp4_first_fragment",
        ipv4(17, udp(4500, esp(seq=10), length=1400), more_fragments=True),
        True,
    ),
    _case("esp4_later_fragment", ipv4(50, esp(seq=11), frag=185), False),
    _case("udp4_later_fragment", ipv4(17, udp(4500, esp(seq=12)), frag=185), False),
    _case("esp6_fragment_header", ipv6(44, bytes([50, 0, 0, 1, 0, 0, 0, 1]) + esp()), False),
    _case("version6_in_ipv4_ethertype", ipv6(50, esp(seq=13)), False, ETHERTYPE_IPV4),
    _case("ihl4", ipv4(50, esp(seq=14), version_ihl=0x44), False),
    _case("esp4_small_padded", ipv4(50, b"\0\0\x10\x01\0\0\0\x0f"), True),
]


def test_case_names_are_unique() -> None:
    assert len({c.name for c in CASES}) == len(CASES)


# --- the filter, without a kernel -----------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_esp_filter_on_ethernet(case: Case) -> None:
    verdict = run_bpf(bpf.esp_filter(), case.frame)
    assert (verdict != 0) == case.accept, bpf.format_program(bpf.esp_filter())
    if case.accept:
        assert verdict >= len(case.frame)  # the whole packet is kept


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_esp_filter_cooked_agrees(case: Case) -> None:
    """SOCK_DGRAM: no link header in the packet, the ethertype comes from skb->protocol."""
    ethertype = struct.unpack("!H", case.frame[12:14])[0]
    cooked = case.frame[14 : 14 + case.l3_len]
    verdict = run_bpf(bpf.esp_filter(link="cooked"), cooked, protocol=ethertype)
    assert (verdict != 0) == case.accept


def test_esp_filter_rejects_vlan_tagged_frames() -> None:
    for case in CASES:
        assert run_bpf(bpf.esp_filter(), case.frame, vlan_tagged=True) == 0


def test_esp_filter_port_is_configurable() -> None:
    prog = bpf.esp_filter(udp_port=4501)
    assert run_bpf(prog, eth(ipv4(17, udp(4501, esp())), ETHERTYPE_IPV4))
    assert not run_bpf(prog, eth(ipv4(17, udp(4500, esp())), ETHERTYPE_IPV4))
    assert run_bpf(prog, eth(ipv4(50, esp()), ETHERTYPE_IPV4))  # plain ESP has no port
    with pytest.raises(ValueError):
        bpf.esp_filter(udp_port=0)


def test_nat_t_socket_filter() -> None:
    """On a UDP socket the filter sees the datagram from its UDP header."""
    prog = bpf.nat_t_socket_filter()
    assert run_bpf(prog, udp(4500, ike()))
    assert run_bpf(prog, udp(4500, b"\xff"))  # keepalive: the controller's
    assert not run_bpf(prog, udp(4500, esp()))


def test_assembler_rejects_bad_programs() -> None:
    ret = (bpf.BPF_RET | bpf.BPF_K, 0, None, None, "")
    with pytest.raises(ValueError, match="backward"):
        bpf.assemble([bpf.Label("top"), (bpf.BPF_JMP | bpf.BPF_JA, 0, "top", None, ""), ret])
    with pytest.raises(ValueError, match="undefined"):
        bpf.assemble([(bpf.BPF_JMP | bpf.BPF_JEQ, 0, "nowhere", None, ""), ret])
    with pytest.raises(ValueError, match="return"):
        bpf.assemble([(bpf.BPF_LD | bpf.BPF_W | bpf.BPF_LEN, 0, None, None, "")])
    with pytest.raises(ValueError, match="duplicate"):
        bpf.assemble([bpf.Label("x"), bpf.Label("x"), ret])


def test_format_program_lists_every_instruction() -> None:
    prog = bpf.esp_filter()
    listing = bpf.format_program(prog).splitlines()
    assert len(listing) == len(prog)
    assert any(line.endswith("ldxb 4*([14]&0xf)") for line in listing)


# --- partial checksums (TP_STATUS_CSUMNOTREADY) -------------------------------------------


def _l4_packets() -> list[tuple[str, bytes, int]]:
    """(name, packet with correct checksums per scapy, offset of its L4 checksum)."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.packet import raw

    out = []
    for ip, ip_len in ((IP(src="10.1.0.1", dst="10.2.0.1"), 20),
                       (IPv6(src="2001:db8::1", dst="2001:db8::2"), 40)):
        for l4, at in ((TCP(sport=40000, dport=80, flags="S", options=[("MSS", 1460)]), 16),
                       (UDP(sport=5000, dport=6000), 6)):
            for size in (0, 33, 1000):  # an odd length pads with a zero byte
                pkt = raw(ip / l4 / (b"\xa5" * size))
                out.append((f"{ip.name}/{l4.name}/{size}", pkt, ip_len + at))
    return out


@pytest.mark.parametrize(("name", "pkt", "at"), _l4_packets(), ids=lambda v: str(v)[:20])
def test_partial_l4_checksum_is_completed(name: str, pkt: bytes, at: int) -> None:
    # What a local sender leaves with CHECKSUM_PARTIAL: the pseudo-header sum, or anything.
    buf = np.zeros(4096, dtype=np.uint8)
    partial = pkt[:at] + b"\x12\x34" + pkt[at + 2 :]
    buf[200 : 200 + len(pkt)] = np.frombuffer(partial, dtype=np.uint8)
    assert complete_l4_checksum(buf, 200, len(pkt))
    assert buf[200 : 200 + len(pkt)].tobytes() == pkt  # scapy's checksum, byte for byte


def test_partial_checksum_leaves_what_it_does_not_handle() -> None:
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.packet import raw

    for pkt in (raw(IP(src="10.1.0.1", dst="10.2.0.1", flags="MF") / UDP() / (b"x" * 40)),
                raw(IP(src="10.1.0.1", dst="10.2.0.1", frag=10) / (b"y" * 40)),
                raw(IP(src="10.1.0.1", dst="10.2.0.1") / ICMP() / (b"z" * 40))):
        buf = np.frombuffer(pkt, dtype=np.uint8).copy()
        assert not complete_l4_checksum(buf, 0, len(pkt))
        assert buf.tobytes() == pkt


# --- network namespaces ---------------------------------------------------------------------

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_ns_serial = itertools.count()


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _sysctl(ns: str, key: str, value: int) -> None:
    subprocess.run(
        ["ip", "netns", "exec", ns, "sh", "-c", f"echo {value} > /proc/sys/{key}"],
        check=True,
        timeout=10,
    )


@dataclass
class Lab:
    a: str
    b: str

    @contextlib.contextmanager
    def enter(self, ns: str) -> Iterator[None]:
        """Run the body in ``ns`` (this thread only); sockets made there stay there."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)
            os.close(target)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Namespaces A and B joined by veth a0 <-> b0, IPv4 and IPv6, fixed MACs.

    A routes 10.202.0.0/24 via 10.201.0.3, a static (PERMANENT) neighbour with GW_MAC.
    """
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's ip is not installed")
    names = [f"espl-afp-{os.getpid()}-{next(_ns_serial)}" for _ in range(2)]
    created: list[str] = []
    try:
        for name in names:
            _ip("netns", "add", name)
            created.append(name)
        a, b = names
        # Made inside A, so the names never meet another test run's links in the root ns.
        _ip("-n", a, "link", "add", "a0", "address", A_MAC.hex(":"), "type", "veth",
            "peer", "name", "b0", "address", B_MAC.hex(":"), "netns", b)  # fmt: skip
        for ns, dev, v4, v6 in ((a, "a0", A4, A6), (b, "b0", B4, B6)):
            # No DAD: while its link-local address is tentative, a fresh link sends no
            # neighbour solicitation for an NTF_USE request (see NeighbourCache).
            _sysctl(ns, f"net/ipv6/conf/{dev}/accept_dad", 0)
            _ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            _ip("-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        _ip(
            "-n", a, "neigh", "add", GW4, "lladdr", GW_MAC.hex(":"), "dev", "a0", "nud", "permanent"
        )
        _ip("-n", a, "route", "add", "10.202.0.0/24", "via", GW4, "dev", "a0")
        # No ICMP rate limits in B: a missing ICMP must mean "not sent", not "rate limited".
        for key in ("net/ipv4/icmp_ratelimit", "net/ipv6/icmp/ratelimit"):
            _sysctl(b, key, 0)
        yield Lab(a, b)
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


SMALL_RING = {"block_size": 1 << 16, "block_count": 8}


def frame_sender(lab: Lab) -> socket.socket:
    with lab.enter(lab.a):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        s.bind(("a0", 0))
    return s


def drain(ring: RxRing | RxPair, want: int, *, timeout: float = 2.0,
          settle: float = 0.03) -> list[bytes]:
    """Read until ``want`` packets arrived, then ``settle`` seconds more for any extra."""
    batch = Batch(capacity=want + 512)
    deadline = time.monotonic() + timeout
    while batch.count < want and time.monotonic() < deadline:
        if ring.wait(max(0.0, deadline - time.monotonic())):
            ring.read_into(batch)
    time.sleep(settle)
    ring.read_into(batch)
    return [batch.packet(i) for i in range(batch.count)]


Matcher = bytes | Callable[[bytes], bool]


def _matches(expected: Matcher, got: bytes) -> bool:
    return expected == got if isinstance(expected, bytes) else expected(got)


@pytest.mark.parametrize("lone", [False, True], ids=["batch", "lone"])
@pytest.mark.parametrize("version", [3, 2])
def test_rx_ring_filter_in_the_kernel(lab: Lab, version: int, lone: bool) -> None:
    """The kernel runs the filter: the ring sees exactly ESP and ESP-in-UDP, in order
    (TPACKET_V3 blocks and TPACKET_V2 frames alike). ``lone``: read a frame at a time,
    which takes RxRing._deliver_one (no numpy) instead of the vector _deliver."""
    most = 1 if lone else None
    with lab.enter(lab.b):
        ring = RxRing("b0", bpf=bpf.esp_filter(), version=version, **SMALL_RING)
        ethertypes = np.zeros(256, dtype=np.uint16)
    sender = frame_sender(lab)
    expected: list[Matcher] = []
    expected_types: list[int] = []
    try:
        for case in CASES:
            sender.send(case.frame)
            if case.accept:
                expected.append(case.frame[14 : 14 + case.l3_len])  # padding trimmed
                expected_types.append(struct.unpack("!H", case.frame[12:14])[0])
        # Traffic the kernel in A builds itself.
        with lab.enter(lab.a):
            raw4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
            raw6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 50)
            ping = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            udp4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp4.bind((A4, 4500))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.settimeout(2)
            with raw4, raw6, ping, udp4, tcp:
                esp4_payload = esp(spi=0x2001, seq=100)
                raw4.sendto(esp4_payload, (B4, 0))
                expected.append(lambda p: p[9] == 50 and p[20:] == esp4_payload)
                expected_types.append(ETHERTYPE_IPV4)
                udp4.sendto(ike(), (B4, 4500))
                udp4.sendto(b"\xff", (B4, 4500))
                espudp_payload = esp(spi=0x2002, seq=101)
                udp4.sendto(espudp_payload, (B4, 4500))
                expected.append(
                    lambda p: p[9] == 17 and p[22:24] == b"\x11\x94" and p[28:] == espudp_payload
                )
                expected_types.append(ETHERTYPE_IPV4)
                ping.sendto(ICMP_ECHO[:2] + struct.pack("!H", checksum(ICMP_ECHO)) + ICMP_ECHO[4:],
                            (B4, 0))  # fmt: skip
                with contextlib.suppress(ConnectionRefusedError):
                    tcp.connect((B4, 9))
                esp6_payload = esp(spi=0x2003, seq=102)
                raw6.sendto(esp6_payload, (B6, 0))
                expected.append(lambda p: p[6] == 50 and p[40:] == esp6_payload)
                expected_types.append(ETHERTYPE_IPV6)
        last = ipv4(50, esp(spi=0x2004, seq=103))
        sender.send(eth(last, ETHERTYPE_IPV4))
        expected.append(last)
        expected_types.append(ETHERTYPE_IPV4)

        batch = Batch(capacity=256)
        deadline = time.monotonic() + 2.0
        while batch.count < len(expected) and time.monotonic() < deadline:
            if ring.wait(0.1):
                ring.read_into(batch, max_packets=most, ethertypes=ethertypes)
        time.sleep(0.03)
        ring.read_into(batch, ethertypes=ethertypes)
        got = [batch.packet(i) for i in range(batch.count)]
        assert len(got) == len(expected), [g[:24].hex() for g in got]
        for i, (want, have) in enumerate(zip(expected, got, strict=True)):
            assert _matches(want, have), (i, have.hex())
        assert ethertypes[: batch.count].tolist() == expected_types
        meta = batch.active()
        assert (meta["verdict"] == Verdict.PASS).all() and (meta["sa"] == 0).all()
        assert (meta["offset"] % batch.slot_size == 128).all()  # HEADROOM
        stats = ring.stats()
        assert stats["packets"] == len(expected) and stats["kernel_drops"] == 0
    finally:
        sender.close()
        ring.close()


def test_v2_ring_wakes_per_packet_and_wraps(lab: Lab) -> None:
    """TPACKET_V2 hands each frame over as it arrives (no block to wait for: the idle
    latency of TPACKET_V3 is its block timeout), and the reader follows the ring round
    several times, in order, handing every frame back."""
    with lab.enter(lab.b):
        ring = RxRing("b0", bpf=bpf.esp_filter(), block_size=1 << 14, block_count=2,
                      version=2)
        slow = RxRing("b0", bpf=bpf.esp_filter(), retire_blk_tov_ms=500, **SMALL_RING)
    sender = frame_sender(lab)
    try:
        assert ring.frame_count == 16
        sender.send(eth(ipv4(50, esp(seq=1)), ETHERTYPE_IPV4))
        t0 = time.monotonic()
        assert ring.wait(0.2), "no wake-up for one packet"
        assert time.monotonic() - t0 < 0.1
        assert not slow.readable()  # V3: still in its open block
        batch = Batch(capacity=64)
        ring.read_into(batch)
        got = [batch.packet(0)]
        for round_ in range(4):  # 40 frames through a 16-frame ring
            for i in range(10):
                sender.send(eth(ipv4(50, esp(seq=2 + 10 * round_ + i)), ETHERTYPE_IPV4))
            deadline = time.monotonic() + 2
            batch.count = 0
            while batch.count < 10 and time.monotonic() < deadline:
                if ring.wait(0.1):
                    ring.read_into(batch)
            got += [batch.packet(i) for i in range(batch.count)]
        seqs = [struct.unpack("!I", p[24:28])[0] for p in got]
        assert seqs == list(range(1, 42))
        assert ring.stats()["kernel_drops"] == 0
    finally:
        sender.close()
        ring.close()
        slow.close()


def _send_esp(sender: socket.socket, seqs: range | list[int], size: int = 100) -> None:
    for seq in seqs:
        sender.send(eth(ipv4(50, esp(seq=seq, body=bytes(size))), ETHERTYPE_IPV4))


def _seqs(packets: list[bytes]) -> list[int]:
    return [struct.unpack("!I", p[24:28])[0] for p in packets]  # IPv4 header, SPI, seq


# V3 blocks that wait long for their timeout: a packet read early came through the V2 ring.
SLOW_BULK = {"block_size": 1 << 16, "block_count": 8, "retire_blk_tov_ms": 200}


def test_rx_pair_follows_the_rate_and_keeps_the_order(lab: Lab) -> None:
    """pipeline/rxpair.py: sparse packets come through the V2 ring at once; a burst moves
    the traffic to the V3 ring, a quiet spell back, and every packet comes out once, in the
    order sent."""
    with lab.enter(lab.b):
        pair = RxPair("b0", bpf_program=bpf.esp_filter(), bulk=SLOW_BULK)
    sender = frame_sender(lab)
    with pair, contextlib.closing(sender):
        assert pair.mode == SPARSE
        _send_esp(sender, [1])
        t0 = time.monotonic()
        assert pair.wait(0.15) and time.monotonic() - t0 < 0.1, "no wake-up for one packet"
        got = drain(pair, 1, settle=0)
        _send_esp(sender, range(2, 202))  # a burst: more than BULK_PACKETS in a read
        got += drain(pair, 200)
        assert pair.mode == BULK
        _send_esp(sender, range(202, 802))  # steered to the V3 ring now
        got += drain(pair, 600)
        # (Its last block comes after its 200 ms timeout: a quiet spell that may move the
        # traffic back already.)
        time.sleep(SPARSE_WINDOW_S)
        _send_esp(sender, [802])  # read at once, or after a block timeout; then back
        got += drain(pair, 1)
        assert pair.mode == SPARSE
        _send_esp(sender, [803])
        t0 = time.monotonic()
        assert pair.wait(0.15) and time.monotonic() - t0 < 0.1
        got += drain(pair, 1)
        assert _seqs(got) == list(range(1, 804))
        stats = pair.stats()
        assert (stats["to_bulk"], stats["to_sparse"], stats["bulk"]) == (1, 1, 0)
        assert stats["packets"] == 803 and stats["kernel_drops"] == 0
        assert stats["drain_timeouts"] == 0


def test_rx_pair_empties_the_old_ring_first(lab: Lab) -> None:
    """A move between the rings while the old one still holds packets: they come out before
    the new ring's, also those in a V3 block the kernel has not handed over yet."""
    with lab.enter(lab.b):
        pair = RxPair("b0", bpf_program=bpf.esp_filter(), bulk=SLOW_BULK, auto=False)
    sender = frame_sender(lab)
    with pair, contextlib.closing(sender):
        _send_esp(sender, range(1, 51))  # into the V2 ring, not read yet
        time.sleep(0.01)
        assert pair.steer(BULK, wait=True)
        _send_esp(sender, range(51, 101))
        got = drain(pair, 100)
        assert _seqs(got) == list(range(1, 101))
        _send_esp(sender, range(101, 111))  # into the V3 ring's open block
        time.sleep(0.01)
        assert pair.steer(SPARSE, wait=True)
        assert not pair.steer(BULK)  # not while the V3 ring is still to be emptied
        _send_esp(sender, range(111, 121))  # V2: readable at once, but read after
        got = drain(pair, 20)
        assert _seqs(got) == list(range(101, 121))
        stats = pair.stats()
        assert (stats["to_bulk"], stats["to_sparse"], stats["drain_timeouts"]) == (1, 1, 0)
        # A V3 ring that holds nothing is left at once, without waiting for its timeout.
        assert pair.steer(BULK, wait=True)
        assert drain(pair, 0, settle=0) == []  # the V2 ring, empty: done with
        assert pair.steer(SPARSE, wait=True)
        _send_esp(sender, [121])
        t0 = time.monotonic()
        assert _seqs(drain(pair, 1, settle=0)) == [121]
        assert time.monotonic() - t0 < 0.1


def test_rx_pair_reads_during_a_move_keep_the_order(lab: Lab) -> None:
    """The swap runs on a helper thread (its grace period would block the reader): packets
    keep coming meanwhile, to the V3 ring before the swap and to the V2 ring after it, and
    the reader reads on all the while. The V2 packets, visible at once, wait until the V3
    block before them is handed over."""
    with lab.enter(lab.b):
        pair = RxPair("b0", bpf_program=bpf.esp_filter(), bulk=SLOW_BULK, auto=False)
    sender = frame_sender(lab)
    with pair, contextlib.closing(sender):
        assert pair.steer(BULK, wait=True)
        _send_esp(sender, range(1, 11))  # the V3 ring's open block
        time.sleep(0.01)
        assert pair.steer(SPARSE)  # returns at once
        batch = Batch(capacity=64)
        for seq in range(11, 41):  # over ~30 ms: during the swap and after it
            _send_esp(sender, [seq])
            pair.read_into(batch)
            time.sleep(0.001)
        got = [batch.packet(i) for i in range(batch.count)] + drain(pair, 40 - batch.count)
        assert _seqs(got) == list(range(1, 41))
        assert pair.mode == SPARSE and pair.stats()["drain_timeouts"] == 0


@pytest.mark.parametrize("to", [BULK, SPARSE], ids=["to-bulk", "to-sparse"])
def test_rx_pair_batch_of_heads_and_whole_packets(lab: Lab, to: int) -> None:
    """A read across a move fills one batch from both rings: packet heads from the V3 ring
    (the rest left in the ring, ``src`` its offset, pipeline/region.py) and whole packets
    from the V2 ring, which must say so (``src`` -1) whatever the buffer held before: else
    completing the batch copies ring bytes over them (bench/tunnel.py saw integrity drops)."""
    with lab.enter(lab.b):
        pair = RxPair("b0", bpf_program=bpf.esp_filter(), bulk=SLOW_BULK, auto=False)
    sender = frame_sender(lab)
    with pair, contextlib.closing(sender):
        if to == SPARSE:
            assert pair.steer(BULK, wait=True) and drain(pair, 0, settle=0) == []
        sent = [ipv4(50, esp(seq=i, body=bytes([i]) * 300)) for i in range(1, 41)]
        for pkt in sent[:20]:
            sender.send(eth(pkt, ETHERTYPE_IPV4))  # to the ring in use
        time.sleep(0.01)
        assert pair.steer(to, wait=True)
        for pkt in sent[20:]:
            sender.send(eth(pkt, ETHERTYPE_IPV4))  # to the other one
        time.sleep(0.01)
        batch = Batch(capacity=64)
        batch.src[:] = 4096  # what a buffer used before may hold
        deadline = time.monotonic() + 2
        while batch.count < 40 and time.monotonic() < deadline:
            if pair.wait(0.1):
                pair.read_heads(batch, None, region=1, token=7)
        assert batch.count == 40 and batch.region == 1
        src = batch.src[:40]
        assert (src[:20] >= 0).all() if to == SPARSE else (src[:20] == -1).all()
        assert (src[20:] == -1).all() if to == SPARSE else (src[20:] >= 0).all()
        ring = pair.shared_region()
        assert ring is not None and ring.data is not None
        complete(batch, ring.data)
        pair.release(7)
        assert [batch.packet(i) for i in range(40)] == sent


def test_rx_pair_moves_back_when_idle(lab: Lab) -> None:
    """RxPair.idle (the reader's poll timed out): back to the V2 ring once IDLE_MOVE_S
    passed since the last packet, before the next one comes; not before, and never with
    ``auto`` off."""
    with lab.enter(lab.b):
        pair = RxPair("b0", bpf_program=bpf.esp_filter(), bulk=SLOW_BULK)
        manual = RxPair("b0", bpf_program=bpf.esp_filter(), bulk=SLOW_BULK, auto=False)
    sender = frame_sender(lab)
    with pair, manual, contextlib.closing(sender):
        _send_esp(sender, range(1, 101))  # a burst: to bulk
        got = drain(pair, 100)  # (its last read, 30 ms on, settles the move)
        assert pair.mode == BULK and manual.steer(BULK, wait=True)
        pair._last_packet = time.monotonic()  # as if a packet came just now
        pair.idle()
        manual.idle()
        assert pair.stats()["to_sparse"] == manual.stats()["to_sparse"] == 0  # no move begun
        time.sleep(IDLE_MOVE_S)
        pair.idle()
        manual.idle()
        assert (pair.stats()["to_sparse"], manual.stats()["to_sparse"]) == (1, 0)
        assert drain(pair, 0, settle=0.05) == []  # the move settles, the V3 ring is empty
        assert pair.mode == SPARSE and manual.mode == BULK
        _send_esp(sender, [101])
        t0 = time.monotonic()
        got += drain(pair, 1, settle=0)
        assert time.monotonic() - t0 < 0.1  # the V2 ring's: no block timeout
        assert _seqs(got) == list(range(1, 102))
        assert (pair.stats()["to_bulk"], pair.stats()["to_sparse"]) == (1, 1)


def test_outside_io_takes_the_pair_or_one_v3_ring(lab: Lab, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """controller/run.py AfPacketIO, ``ring: auto``: the pair (one fd to poll); where the
    kernel refuses it (PACKET_FANOUT_CBPF is Linux 4.2: a refusal simulated here, since this
    kernel has it) one TPACKET_V3 ring, and a warning."""
    import errno

    from controller.run import AfPacketIO
    from pipeline import rxpair

    with lab.enter(lab.b):
        port = AfPacketIO("b0", esp_only=True, fanout=False, ring="auto")
        try:
            assert isinstance(port.rx, RxPair) and port.fileno_list() == [port.rx.fileno()]
            assert port.idle_timeout_ms() is None
        finally:
            port.close()

        def refused(*args: object, **kwargs: object) -> RxPair:
            raise OSError(errno.EINVAL, "Invalid argument")

        monkeypatch.setattr(rxpair, "RxPair", refused)
        port = AfPacketIO("b0", esp_only=True, fanout=False, ring="auto")
        try:
            assert len(port.fileno_list()) == 1 and isinstance(port.rx, RxRing)
            assert port.rx.version == 3 and port.idle_timeout_ms() is None
        finally:
            port.close()
    assert "ring pair unavailable on b0" in caplog.text


def test_v3_ring_drained_sees_a_block_not_opened_again(lab: Lab) -> None:
    """RxRing.drained: the kernel's open block holding packets is not drained; a block
    handed back and not opened again since (the ring was full) still shows last round's
    header and packet count, and is."""
    with lab.enter(lab.b):
        ring = RxRing("b0", bpf=bpf.esp_filter(), block_size=1 << 12, block_count=2,
                      retire_blk_tov_ms=500)
    sender = frame_sender(lab)
    with ring, contextlib.closing(sender):
        assert ring.drained()
        _send_esp(sender, [1], size=100)
        time.sleep(0.01)
        assert not ring.readable() and not ring.drained()  # in the open block
        _send_esp(sender, range(2, 20), size=1400)  # fills both blocks; the rest dropped
        time.sleep(0.01)
        got = drain(ring, 4, settle=0)
        assert _seqs(got)[0] == 1 and ring.stats()["kernel_drops"] > 0
        assert ring.drained()


def test_rx_ring_ignores_own_transmissions(lab: Lab) -> None:
    frame = eth(ipv4(50, esp(seq=7), src=B4, dst=A4), ETHERTYPE_IPV4, dst=A_MAC, src=B_MAC)
    with lab.enter(lab.b):
        ring = RxRing("b0", bpf=bpf.esp_filter(), **SMALL_RING)
        out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        out.bind(("b0", 0))
    with lab.enter(lab.a):
        peer = RxRing("a0", bpf=bpf.esp_filter(), **SMALL_RING)
    with ring, peer, out:
        out.send(frame)
        assert drain(peer, 1) == [frame[14:]]  # it did leave B
        assert drain(ring, 0, settle=0.02) == []  # B's own ring never saw it


def test_rx_ring_resumes_partial_blocks_and_wraps(lab: Lab) -> None:
    """Small reads across block boundaries; more data than the ring holds, read as it comes."""
    with lab.enter(lab.b):
        ring = RxRing("b0", bpf=bpf.esp_filter(), block_size=1 << 14, block_count=4)
    sender = frame_sender(lab)
    sent: list[bytes] = []
    got: list[bytes] = []
    batch = Batch(capacity=16)
    try:
        for round_ in range(12):  # 12 x 20 x ~1 KB = 240 KB through a 64 KB ring
            for i in range(20):
                pkt = ipv4(50, esp(seq=round_ * 100 + i, body=bytes([i]) * 1000))
                sent.append(pkt)
                sender.send(eth(pkt, ETHERTYPE_IPV4))
            deadline = time.monotonic() + 2.0
            while len(got) < len(sent) and time.monotonic() < deadline:
                if ring.wait(0.1):
                    batch.count = 0
                    n = ring.read_into(batch, max_packets=3)  # never a whole block
                    assert n <= 3
                    got.extend(batch.packet(i) for i in range(n))
        assert got == sent
        assert ring.stats()["kernel_drops"] == 0
    finally:
        sender.close()
        ring.close()


@pytest.mark.parametrize("head", [HEAD, 0], ids=["heads", "nothing"])
def test_rx_ring_heads_keep_their_blocks_until_released(lab: Lab, head: int) -> None:
    """Heads-only reads (pipeline/region.py): the slots get each packet's first bytes, and
    a second mapping of the ring (what a worker makes from the socket's descriptor) holds
    the rest, intact for as long as the batch is out, while more traffic than the ring
    holds arrives: the kernel stops at the held block (and counts its drops) rather than
    write over it. On release the block goes back and traffic flows again."""
    with lab.enter(lab.b):
        # A long block timeout: the three packets land in one block, read as one batch.
        ring = RxRing("b0", bpf=bpf.esp_filter(), block_size=1 << 14, block_count=4,
                      retire_blk_tov_ms=50)
    region = ring.shared_region()
    assert region is not None
    worker_view = SharedRegion(os.dup(region.fd), region.size).map()  # a worker's mapping
    sender = frame_sender(lab)
    try:
        first = [ipv4(50, esp(seq=i, body=bytes([i]) * 1000)) for i in range(3)]
        for pkt in first:
            sender.send(eth(pkt, ETHERTYPE_IPV4))
        held = Batch(capacity=8)
        held.buffer = 5
        assert ring.wait(2.0)
        held.data[:] = 0xEE
        assert ring.read_heads(held, 8, 0, held.buffer, head=head) == 3
        assert (held.region, held.head) == (0, head)
        assert [held.packet(i)[:head] for i in range(3)] == [p[:head] for p in first]
        assert held.packet(0)[head:] == b"\xee" * (len(first[0]) - head)  # no more
        assert ring.held_blocks() == 1
        # 100 KB more through a 64 KB ring, read (whole) as it comes.
        later: list[bytes] = []
        for round_ in range(10):
            for i in range(10):
                pkt = ipv4(50, esp(seq=100 + 10 * round_ + i, body=bytes([i, 7]) * 500))
                sender.send(eth(pkt, ETHERTYPE_IPV4))
            later += drain(ring, 10, timeout=0.2)
        assert 0 < len(later) < 100 and ring.stats()["kernel_drops"] > 0
        assert complete(held, worker_view) == 3
        assert [held.packet(i) for i in range(3)] == first  # intact all along
        ring.release(held.buffer)
        assert ring.held_blocks() == 0
        late = ipv4(50, esp(seq=999, body=bytes(700)))
        sender.send(eth(late, ETHERTYPE_IPV4))
        assert drain(ring, 1, timeout=2.0)[-1:] == [late]
    finally:
        sender.close()
        ring.close()


def test_rx_ring_counts_kernel_drops_and_recovers(lab: Lab) -> None:
    with lab.enter(lab.b):
        ring = RxRing("b0", bpf=bpf.esp_filter(), block_size=1 << 12, block_count=2)
    sender = frame_sender(lab)
    try:
        for i in range(20):  # two 4 KiB blocks hold 4 of these
            sender.send(eth(ipv4(50, esp(seq=i, body=bytes(1400))), ETHERTYPE_IPV4))
        time.sleep(0.02)
        first = drain(ring, 4)
        assert 2 <= len(first) <= 4
        stats = ring.stats()
        assert stats["kernel_drops"] == 20 - len(first)
        assert stats["kernel_freeze_q_cnt"] >= 1
        late = ipv4(50, esp(seq=99))
        sender.send(eth(late, ETHERTYPE_IPV4))
        assert drain(ring, 1) == [late]  # the blocks went back to the kernel
    finally:
        sender.close()
        ring.close()


@pytest.mark.parametrize("lone", [False, True], ids=["batch", "lone"])
@pytest.mark.parametrize("version", [3, 2])
def test_rx_ring_drops_what_does_not_fit_a_slot(lab: Lab, version: int, lone: bool) -> None:
    with lab.enter(lab.b):
        ring = RxRing("b0", bpf=bpf.esp_filter(), version=version, **SMALL_RING)
    sender = frame_sender(lab)
    try:
        batch = Batch(capacity=8, slot_size=1024)  # payload area: 1024 - 128 - 320 = 576
        big = ipv4(50, esp(body=bytes(600)))
        small = ipv4(50, esp(seq=2))
        sender.send(eth(big, ETHERTYPE_IPV4))
        sender.send(eth(small, ETHERTYPE_IPV4))
        deadline = time.monotonic() + 2.0
        while batch.count < 1 and time.monotonic() < deadline:
            ring.wait(0.1)
            ring.read_into(batch, max_packets=1 if lone else None)
        assert batch.packets() == [small]
        assert ring.stats()["too_big"] == 1
        assert batch.row(0)[:4] == (HEADROOM, len(small), 0, Verdict.PASS)
    finally:
        sender.close()
        ring.close()


@pytest.mark.parametrize("capacity", [256, 5])
def test_rx_ring_cuts_gso_frames_into_segments(lab: Lab, capacity: int) -> None:
    """With virtio-net headers (``vnet_hdr``), a TCP sender's TSO packets, which a veth
    passes to its peer whole (up to 64 KiB), come out of the ring as the segments the wire
    would carry: each within the MTU, checksums whole, and their payloads in sequence are
    the bytes sent. With batches of 5, a frame's segments span many reads."""
    import threading

    from tests.test_offload import _verifies

    data = bytes((i * 7 + i // 251) & 0xFF for i in range(300_000))
    with lab.enter(lab.b):
        ring = RxRing("b0", vnet_hdr=True, block_count=16)  # 512 KiB blocks: 64 KiB frames
        server = socket.create_server((B4, 5301))
    got: dict[int, bytes] = {}
    received = bytearray()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while len(received) < len(data) and (chunk := conn.recv(1 << 16)):
                received.extend(chunk)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with lab.enter(lab.a):
            client = socket.create_connection((B4, 5301), timeout=10)
        with client:
            client.sendall(data)
            batch = Batch(capacity=capacity)
            deadline = time.monotonic() + 10
            quiet = 0  # reads in a row that found nothing, once all was received
            while time.monotonic() < deadline and quiet < 5:
                if not ring.pending():
                    ring.wait(0.05)
                batch.count = 0
                ring.read_into(batch)
                quiet = quiet + 1 if not batch.count and len(received) == len(data) else 0
                for pkt in batch.packets():
                    if pkt[9] == 6 and pkt[12:16] == socket.inet_aton(A4):  # TCP from A
                        assert len(pkt) <= 1500 and _verifies(pkt), pkt[:60].hex()
                        l4 = (pkt[0] & 0xF) * 4
                        hl = l4 + (pkt[l4 + 12] >> 4) * 4
                        if len(pkt) > hl:
                            got[int.from_bytes(pkt[l4 + 4:l4 + 8], "big")] = pkt[hl:]
        thread.join(5)
        stats = ring.stats()
    finally:
        server.close()
        ring.close()
    assert bytes(received) == data
    assert stats["gso"] > 0 and stats["gso_errors"] == stats["too_big"] == 0, stats
    first = min(got)
    stream = b"".join(got[k] for k in sorted(got))
    assert stream == data, (first, len(stream))


def test_fanout_splits_flows_between_rings(lab: Lab) -> None:
    group = default_fanout_group()
    with lab.enter(lab.b):
        rings = [
            RxRing("b0", bpf=bpf.esp_filter(), fanout_group=group,
                   fanout_mode=PACKET_FANOUT_HASH, **SMALL_RING)
            for _ in range(2)
        ]  # fmt: skip
    sender = frame_sender(lab)
    try:
        flows = {sport: [] for sport in range(40000, 40032)}
        for seq in range(4):
            for sport, pkts in flows.items():
                pkt = ipv4(17, udp(4500, esp(spi=sport, seq=seq), sport=sport))
                pkts.append(pkt)
                sender.send(eth(pkt, ETHERTYPE_IPV4))
        total = sum(len(p) for p in flows.values())
        got = [drain(r, 1, timeout=0.5, settle=0.05) for r in rings]
        assert sum(map(len, got)) == total
        assert all(got), "one ring got every flow"
        for sport, pkts in flows.items():
            holders = [i for i, g in enumerate(got) if pkts[0] in g]
            assert len(holders) == 1, sport
            mine = [p for p in got[holders[0]] if p in pkts]
            assert mine == pkts  # the whole flow, in order, on one ring
    finally:
        sender.close()
        for r in rings:
            r.close()


# --- transmit -------------------------------------------------------------------------------


def _wait_resolved(tx: TxPath, family: int, addr: str, timeout: float = 2.0) -> None:
    raw = socket.inet_pton(family, addr)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tx.neighbours.lookup(family, raw)[0] is not None:
            return
        time.sleep(0.02)
    raise AssertionError(f"{addr} never resolved")


def test_tx_resolves_neighbours_on_demand(lab: Lab) -> None:
    """No neighbour entry: the packet is dropped and counted, and the kernel is told to ARP."""
    _ip("-n", lab.a, "neigh", "flush", "dev", "a0")
    with lab.enter(lab.b):
        ring = RxRing("b0", bpf=bpf.esp_filter(), **SMALL_RING)
    with lab.enter(lab.a):
        tx = TxPath("a0", neighbour_ttl=1.0)
    try:
        pkt = ipv4(50, esp(seq=1))
        batch = Batch.for_packets([pkt])
        assert tx.send(batch) == 0
        assert tx.stats()["no_neighbour"] == 1
        assert tx.stats()["neighbour_requests"] >= 3  # the route, the entry, NTF_USE
        _wait_resolved(tx, socket.AF_INET, B4)
        batch = Batch.for_packets([pkt])
        assert tx.send(batch) == 1
        assert drain(ring, 1) == [pkt]
    finally:
        tx.close()
        ring.close()


@contextlib.contextmanager
def _neighbour_cache(lab: Lab, ttl: float = 60.0) -> Iterator[NeighbourCache]:
    """A NeighbourCache of A's a0 (its sockets made in A), closed afterwards."""
    with lab.enter(lab.a):
        cache = NeighbourCache("a0", ttl=ttl)
    try:
        yield cache
    finally:
        cache.close()


def _lookup4(cache: NeighbourCache, addr: str) -> tuple[bytes | None, str]:
    return cache.lookup(socket.AF_INET, socket.inet_aton(addr))


def _del_routes(lab: Lab, *nets: str) -> None:
    """Take A's routes ``nets`` away, those that are there (a test's cleanup)."""
    for net in nets:
        subprocess.run(["ip", "-n", lab.a, "route", "del", net], capture_output=True)


def _resolved(cache: NeighbourCache, addr: str, want: bytes, timeout: float = 1.0) -> float:
    """Seconds until ``addr`` resolves to ``want`` (lookups every 10 ms); fails past
    ``timeout``."""
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < timeout:
        if _lookup4(cache, addr)[0] == want:
            return elapsed
        time.sleep(0.01)
    raise AssertionError(f"{addr} still resolves to {_lookup4(cache, addr)}")


def test_peers_behind_one_gateway_cost_one_neighbour_request_per_ttl(lab: Lab) -> None:
    """A concentrator's remote-access peers: each destination's route is asked once, and the
    gateway they share is asked once per ``ttl``, however many peers there are (before,
    every destination cost a route request and a whole neighbour dump every ``ttl``)."""
    peers = [f"10.202.0.{i}" for i in range(10, 50)]
    with _neighbour_cache(lab, ttl=0.25) as cache:
        rounds, start = 0, time.monotonic()
        while time.monotonic() - start < 1.0:
            for peer in peers:
                assert _lookup4(cache, peer) == (GW_MAC, "")
            rounds += 1
            time.sleep(0.02)
        assert rounds >= 10
        # 40 routes once each; the gateway every 0.25 s: about 5 times in the second.
        assert len(peers) + 1 <= cache.requests <= len(peers) + 8, cache.requests


def test_a_route_change_is_seen_at_once_not_after_a_ttl(lab: Lab) -> None:
    """The kernel announces route changes (rtnetlink multicast): a lookup after one follows
    it, though the answers before it would live a minute."""
    host = f"{REMOTE4}/32"
    with _neighbour_cache(lab) as cache:
        assert _lookup4(cache, REMOTE4) == (GW_MAC, "")
        try:
            _ip("-n", lab.a, "route", "add", host, "via", B4, "dev", "a0")
            assert _resolved(cache, REMOTE4, B_MAC) < 0.5  # B's entry may need an ARP first
            _ip("-n", lab.a, "route", "del", host)
            assert _resolved(cache, REMOTE4, GW_MAC) < 0.5
            # Another prefix's change leaves the answers it does not cover alone.
            before = cache.requests
            _ip("-n", lab.a, "route", "add", "10.203.0.0/24", "via", GW4, "dev", "a0")
            _ip("-n", lab.a, "route", "del", "10.203.0.0/24")
            time.sleep(EVENTS_EVERY + 0.05)  # the next lookup reads the announcements
            assert _lookup4(cache, REMOTE4) == (GW_MAC, "")
            assert cache.requests == before
        finally:
            _del_routes(lab, host)


def test_a_neighbour_change_is_seen_at_once_not_after_a_ttl(lab: Lab) -> None:
    """A next hop's new MAC (a router replaced) is used from the kernel's announcement on."""
    other = bytes.fromhex("02cc000000ff")
    with _neighbour_cache(lab) as cache:
        assert _lookup4(cache, REMOTE4) == (GW_MAC, "")
        try:
            _ip("-n", lab.a, "neigh", "replace", GW4, "lladdr", other.hex(":"), "dev", "a0",
                "nud", "permanent")
            assert _resolved(cache, REMOTE4, other) < 0.5
        finally:
            _ip("-n", lab.a, "neigh", "replace", GW4, "lladdr", GW_MAC.hex(":"), "dev",
                "a0", "nud", "permanent")


def test_many_route_changes_at_once_forget_every_answer(lab: Lab) -> None:
    """A routing daemon loading a table: past ROUTE_CHANGES_WALKED changes read at once,
    every route answer goes (once), instead of a walk over the answers per change."""
    nets = [f"10.205.{i}.0/24" for i in range(neighbours.ROUTE_CHANGES_WALKED + 1)]
    with _neighbour_cache(lab) as cache:
        assert _lookup4(cache, REMOTE4) == (GW_MAC, "")
        try:
            for net in nets:  # none covers REMOTE4: walked one by one, its answer would stay
                _ip("-n", lab.a, "route", "add", net, "via", GW4, "dev", "a0")
            time.sleep(EVENTS_EVERY + 0.05)
            before = cache.requests
            assert _lookup4(cache, REMOTE4) == (GW_MAC, "")
            assert cache.requests == before + 1  # its route asked again (the MAC stays)
        finally:
            _del_routes(lab, *nets)


def test_answers_kept_are_bounded(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every peer address ever met is not kept forever: past CACHE_MAX answers, the expired
    ones go, then all of them."""
    monkeypatch.setattr(neighbours, "CACHE_MAX", 8)
    with _neighbour_cache(lab) as cache:
        for i in range(10, 30):
            assert _lookup4(cache, f"10.202.0.{i}") == (GW_MAC, "")
            assert len(cache._routes) <= 8 and len(cache._hops) <= 8
        assert _lookup4(cache, "10.202.0.29") == (GW_MAC, "")


def test_announcements_lost_in_a_burst_forget_every_answer(lab: Lab) -> None:
    """More changes than the notification socket holds (the kernel says ENOBUFS): nothing
    cached can be trusted, so both caches are emptied and asked again."""
    nets = [f"10.204.{i}.0/24" for i in range(64)]
    with _neighbour_cache(lab) as cache:
        assert cache._events is not None
        cache._events.close()
        with lab.enter(lab.a):
            cache._events = rtnl.RtnlEvents(rtnl.RTMGRP_IPV4_ROUTE, rcvbuf=1)  # the least
        assert _lookup4(cache, REMOTE4) == (GW_MAC, "")
        try:
            for net in nets:  # far from REMOTE4: alone, none would touch its answer
                _ip("-n", lab.a, "route", "add", net, "via", GW4, "dev", "a0")
            before = cache.requests
            time.sleep(EVENTS_EVERY + 0.05)
            assert _lookup4(cache, REMOTE4) == (GW_MAC, "")
            assert cache.requests == before + 2  # the route and the neighbour, asked again
        finally:
            _del_routes(lab, *nets)


@pytest.mark.parametrize("lone", [False, True], ids=["batch", "lone"])
def test_tx_batch_arrives_byte_exact_with_the_right_macs(lab: Lab, lone: bool) -> None:
    """``lone``: each packet sent as a batch of its own (TxPath._send_one, no numpy). The
    receiving ring is then TPACKET_V2 (a frame per packet): sent one by one, the packets
    would fill TPACKET_V3 blocks a few at a time as each times out, and run out of them."""
    with lab.enter(lab.b):
        ring = RxRing("b0", bpf=bpf.esp_filter(), block_size=1 << 20, block_count=4,
                      version=2 if lone else 3)
        tap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        bpf.attach(tap, bpf.esp_filter())
        tap.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        tap.bind(("b0", 0x0003))
        tap.setblocking(False)
    with lab.enter(lab.a):
        tx = TxPath("a0")
    try:
        _wait_resolved(tx, socket.AF_INET, B4)
        _wait_resolved(tx, socket.AF_INET6, B6)
        pkts: list[bytes] = []
        want_mac: dict[bytes, bytes] = {}
        for i in range(248):
            p = ipv4(50, esp(seq=i, body=i.to_bytes(2, "big") * 691), ident=i)  # 1410 bytes
            pkts.append(p)
            want_mac[p] = B_MAC
        for i in range(3):
            p = ipv4(50, esp(seq=1000 + i), dst=REMOTE4)  # via the gateway
            pkts.append(p)
            want_mac[p] = GW_MAC
        for i in range(2):
            p = ipv6(50, esp(seq=2000 + i, body=bytes(1300)))
            pkts.append(p)
            want_mac[p] = B_MAC
        dropped = {
            "no_neighbour": ipv4(50, esp(seq=3000), dst="10.201.0.99"),  # on-link, nobody there
            "no_route": ipv4(50, esp(seq=3001), dst="192.0.2.1"),  # A has no default route
            "too_big": ipv4(50, esp(seq=3002, body=bytes(1520))),  # > MTU 1500
            "bad_version": bytes([0x50]) + bytes(40),
        }
        replayed = ipv4(50, esp(seq=3003))
        batch = Batch.for_packets(pkts + list(dropped.values()) + [replayed])
        batch.meta["verdict"][batch.count - 1] = Verdict.REPLAY  # not for sending
        assert batch.count == 258

        if lone:
            sent = 0
            for i in range(batch.count):
                one = Batch.for_packets([batch.packet(i)])
                one.meta["verdict"][0] = batch.meta["verdict"][i]
                sent += tx.send(one)
            assert sent == len(pkts)
        else:
            assert tx.send(batch) == len(pkts)
        got = drain(ring, len(pkts))
        assert got == pkts
        stats = tx.stats()
        for reason in dropped:
            assert stats[reason] == 1, (reason, stats)
        assert stats["packets"] == len(pkts)

        frames = []
        with contextlib.suppress(BlockingIOError):
            while True:
                frames.append(tap.recv(4096))
        assert len(frames) == len(pkts)
        for frame, pkt in zip(frames, pkts, strict=True):
            assert frame[14:] == pkt
            assert frame[:6] == want_mac[pkt], pkt[:20].hex()
            assert frame[6:12] == A_MAC
            ethertype = ETHERTYPE_IPV6 if pkt[0] >> 4 == 6 else ETHERTYPE_IPV4
            assert struct.unpack("!H", frame[12:14])[0] == ethertype
    finally:
        tx.close()
        tap.close()
        ring.close()


@pytest.mark.parametrize("method", ["ring", "sendmsg"])
def test_tx_other_methods_send_the_same(lab: Lab, method: str) -> None:
    with lab.enter(lab.b):
        ring = RxRing("b0", bpf=bpf.esp_filter(), block_size=1 << 20, block_count=4)
    with lab.enter(lab.a):
        tx = TxPath("a0", method=method, ring_frames=64)  # type: ignore[arg-type]
    try:
        _wait_resolved(tx, socket.AF_INET, B4)
        pkts = [ipv4(50, esp(seq=i, body=bytes([i]) * 1380)) for i in range(100)]
        for _ in range(2):  # 200 packets through a 64-frame ring: frames are reused
            assert tx.send(Batch.for_packets(pkts)) == len(pkts)
        assert drain(ring, 2 * len(pkts)) == pkts + pkts
    finally:
        tx.close()
        ring.close()


# --- what the kernel answers to ESP ---------------------------------------------------------


def _icmp_errors(sock4: socket.socket, sock6: socket.socket, wait: float) -> list[tuple[int, ...]]:
    """(family, type, code) of the ICMP errors that arrive within ``wait`` seconds."""
    seen: list[tuple[int, ...]] = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock4, sock6], [], [], left)
        for s in ready:
            data = s.recv(4096)
            if s is sock4:
                icmp = data[(data[0] & 0x0F) * 4 :]
                if icmp[0] in (3, 11, 12):
                    seen.append((4, icmp[0], icmp[1]))
            elif data[0] < 128:  # ICMPv6 errors are types 1..127
                seen.append((6, data[0], data[1]))
    return seen


def test_kernel_without_esp_answers_icmp_unless_suppressed(lab: Lab) -> None:
    """Linux without CONFIG_INET_ESP: ICMP protocol unreachable / parameter problem, unless a
    raw ESP socket exists in the namespace (suppress_esp_unreachable)."""
    with lab.enter(lab.a):
        icmp4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        icmp6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        esp4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
        esp6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 50)
    with icmp4, icmp6, esp4, esp6:

        def send_esp() -> None:
            esp4.sendto(esp(), (B4, 0))
            esp6.sendto(esp(), (B6, 0))

        with lab.enter(lab.b):
            sink = suppress_esp_unreachable()
        with sink:
            send_esp()
            assert _icmp_errors(icmp4, icmp6, 0.2) == []
        send_esp()
        # IPv4: destination unreachable, protocol unreachable. IPv6: parameter problem,
        # unrecognized next header (RFC 4443 §3.4).
        assert sorted(_icmp_errors(icmp4, icmp6, 0.5)) == [(4, 3, 2), (6, 4, 1)]


def test_nat_t_socket_filter_in_the_kernel(lab: Lab) -> None:
    """The controller's UDP 4500 socket keeps IKE and keepalives; ESP-in-UDP is dropped there
    without an ICMP port unreachable."""
    with lab.enter(lab.b):
        ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        bpf.attach(ctl, bpf.nat_t_socket_filter())
        ctl.bind((B4, 4500))
        ctl.settimeout(0.5)
    with lab.enter(lab.a):
        icmp4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        icmp6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with ctl, icmp4, icmp6, peer:
        for payload in (esp(), ike(), b"\xff", esp(seq=2)):
            peer.sendto(payload, (B4, 4500))
        assert ctl.recv(2048) == ike()
        assert ctl.recv(2048) == b"\xff"
        ctl.settimeout(0.05)
        with pytest.raises(TimeoutError):
            ctl.recv(2048)
        assert _icmp_errors(icmp4, icmp6, 0.05) == []


# --- TX benchmark (opt-in) ------------------------------------------------------------------


@pytest.mark.skipif(not os.environ.get("ESPLINE_BENCH"), reason="set ESPLINE_BENCH=1")
def test_bench_tx_methods(lab: Lab) -> None:
    """Packets/s for 1400-byte IPv4 ESP packets, batch 256, A -> B over veth.

    B holds a raw ESP sink (as a gateway would), so its stack drops the packets cheaply and
    sends no ICMP. Methods are interleaved round by round; the median is reported.
    """
    with lab.enter(lab.b):
        sink = suppress_esp_unreachable()
    pkt = ipv4(50, esp(body=bytes(1400 - 28)))
    assert len(pkt) == 1400
    batch = Batch.for_packets([pkt] * 256)
    specs: list[tuple[str, bool]] = [
        ("sendmmsg", False), ("ring", False), ("sendmsg", False),
        ("sendmmsg", True), ("ring", True),
    ]  # fmt: skip
    paths = {}
    for method, bypass in specs:
        with lab.enter(lab.a):
            paths[(method, bypass)] = TxPath("a0", method=method, qdisc_bypass=bypass)  # type: ignore[arg-type]
    rates: dict[tuple[str, bool], list[float]] = {s: [] for s in specs}
    try:
        _wait_resolved(paths[specs[0]], socket.AF_INET, B4)
        for tx in paths.values():
            _wait_resolved(tx, socket.AF_INET, B4)
            tx.send(batch)
        for _ in range(5):
            for spec, tx in paths.items():
                n, t0 = 0, time.perf_counter()
                while (dt := time.perf_counter() - t0) < 0.3:
                    n += tx.send(batch)
                rates[spec].append(n / dt)
        print()
        for (method, bypass), r in rates.items():
            label = method + (" +qdisc_bypass" if bypass else "")
            med, lo, hi = statistics.median(r), min(r), max(r)
            print(f"{label:24s} median {med:9.0f} pps  (min {lo:.0f}, max {hi:.0f})")
        assert all(statistics.median(r) > 0 for r in rates.values())
    finally:
        for tx in paths.values():
            tx.close()
        sink.close()
