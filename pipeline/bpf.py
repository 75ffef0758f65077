"""Classic BPF socket filters for the AF_PACKET rings (DESIGN §7, outside side).

The outside RX ring must see ESP (IP protocol 50) and ESP-in-UDP (RFC 3948) and nothing else:
IKE stays on the controller's UDP sockets, everything else is the host's business. The kernel
runs the filter before it copies a packet into the ring, so rejected packets cost no ring space
and no Python time.

A program is a list of :class:`Insn` ``(code, jt, jf, k)``, exactly ``struct sock_filter``.
Programs are written with a tiny label assembler (:func:`assemble`) so that every jump names
its target and every instruction carries a comment; :func:`attach` installs one with
``SO_ATTACH_FILTER``.

What :func:`esp_filter` accepts (each rule is a test in tests/test_afpacket.py):

* IPv4 (ethertype 0x0800, version 4, IHL >= 5, options honoured through the IHL via
  ``BPF_LDX|BPF_B|BPF_MSH``) and IPv6 (ethertype 0x86DD, version 6);
* protocol / next header 50: ESP, accepted as is;
* protocol / next header 17 with destination port ``udp_port`` (4500 by default), a UDP length
  of at least 16 (UDP header + ESP SPI + sequence number) and a non-zero first payload word.
  A zero word is the RFC 3948 §2.2 non-ESP marker: that packet is IKE and is rejected.

What it rejects, on purpose:

* **NAT keepalives** (RFC 3948 §2.3, a one-byte 0xFF payload, UDP length 9) are *rejected*:
  they carry nothing for the data plane, and the kernel still hands them to the controller's
  UDP socket, which is where NAT mapping liveness is tracked. The check uses the UDP length,
  not the bytes after the header, because Ethernet pads a keepalive frame to 60 bytes and the
  padding (zeroes, or garbage on some NICs) would otherwise be read as a payload word.
* **IPv4 fragments other than the first** (fragment offset != 0): they have no transport
  header to classify. First fragments (offset 0, MF set) are accepted; reassembly is the
  data plane's job.
* **IPv6 extension headers**: only a next header of 50 or 17 directly after the fixed header
  is accepted, so ESP behind a fragment or destination-options header is rejected (classic
  BPF cannot walk a header chain of unknown length without loops).
* **VLAN-tagged frames**: the kernel strips the tag before the tap and reports it out of band
  (``SKF_AD_VLAN_TAG_PRESENT``); such frames are rejected, because the data plane does not yet
  carry a VLAN id through to transmit. Run the ring on the VLAN sub-interface instead.

Link layers: ``link="ethernet"`` is for a ``SOCK_RAW`` packet socket on an Ethernet device
(veth included): the filter sees the 14-byte Ethernet header and reads the ethertype at byte
12. ``link="cooked"`` is for ``SOCK_DGRAM``: the filter sees the packet from its network header
and the ethertype comes from the ``SKF_AD_PROTOCOL`` ancillary load. 802.1Q-in-the-payload
(a tag the kernel did not strip) is not recognised and so rejected in both.
"""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

__all__ = [
    "ACCEPT_ALL",
    "REJECT_ALL",
    "Insn",
    "Label",
    "assemble",
    "attach",
    "detach",
    "set_program",
    "esp_filter",
    "nat_t_socket_filter",
    "format_program",
]

# --- opcodes (linux/filter.h, linux/bpf_common.h) -------------------------------------------
# instruction classes
BPF_LD = 0x00
BPF_LDX = 0x01
BPF_ST = 0x02
BPF_STX = 0x03
BPF_ALU = 0x04
BPF_JMP = 0x05
BPF_RET = 0x06
BPF_MISC = 0x07
# load sizes
BPF_W = 0x00
BPF_H = 0x08
BPF_B = 0x10
# load modes
BPF_IMM = 0x00
BPF_ABS = 0x20
BPF_IND = 0x40
BPF_MEM = 0x60
BPF_LEN = 0x80
BPF_MSH = 0xA0
# ALU / jump operations
BPF_ADD = 0x00
BPF_SUB = 0x10
BPF_AND = 0x50
BPF_RSH = 0x70
BPF_JA = 0x00
BPF_JEQ = 0x10
BPF_JGT = 0x20
BPF_JGE = 0x30
BPF_JSET = 0x40
# operand source
BPF_K = 0x00
BPF_X = 0x08
# BPF_MISC
BPF_TAX = 0x00
BPF_TXA = 0x80

# Ancillary data: a BPF_ABS load at SKF_AD_OFF + n reads skb metadata, not packet bytes.
SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL = 0  # ntohs(skb->protocol): the ethertype
SKF_AD_PKTTYPE = 4
SKF_AD_VLAN_TAG_PRESENT = 48

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SO_LOCK_FILTER = 44

# Verdicts: a filter returns how many bytes of the packet to keep; 0 drops it. 0x40000 is
# tcpdump's snap length, larger than any GSO packet the ring will be offered.
ACCEPT_SNAPLEN = 0x40000

ETH_HLEN = 14  # destination MAC, source MAC, ethertype
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
IPPROTO_ESP = 50
IPPROTO_UDP = 17
IPV4_MIN_HLEN = 20
IPV6_HLEN = 40
UDP_HLEN = 8
# ESP-in-UDP needs at least the ESP SPI and sequence number after the UDP header
# (RFC 3948 §2.1): 8 + 4 + 4 = 16. A keepalive has UDP length 8 + 1 = 9.
ESP_IN_UDP_MIN_LEN = UDP_HLEN + 4 + 4
IPV4_FRAG_OFFSET_MASK = 0x1FFF  # the 13-bit fragment offset in the flags/offset halfword


class Insn(NamedTuple):
    """One ``struct sock_filter``."""

    code: int
    jt: int
    jf: int
    k: int


class Label(NamedTuple):
    """A jump target in :func:`assemble` input."""

    name: str


# Assembler input: a Label, or (code, k, jt-label, jf-label, comment).
Line = Label | tuple[int, int, str | None, str | None, str]


def assemble(lines: Iterable[Line]) -> list[Insn]:
    """Resolve labels into classic BPF's relative forward jumps.

    Conditional jumps name both targets (``None`` means the next instruction); ``BPF_JA``
    names its target in the jt slot. Comments are for the reader of the source only.
    """
    items = list(lines)
    where: dict[str, int] = {}
    pc = 0
    for item in items:
        if isinstance(item, Label):
            if item.name in where:
                raise ValueError(f"duplicate label {item.name!r}")
            where[item.name] = pc
        else:
            pc += 1

    def rel(target: str | None, pc: int) -> int:
        if target is None:
            return 0
        if target not in where:
            raise ValueError(f"undefined label {target!r}")
        off = where[target] - pc - 1
        if off < 0:
            raise ValueError(f"backward jump to {target!r}: classic BPF jumps only forward")
        return off

    prog: list[Insn] = []
    for item in items:
        if isinstance(item, Label):
            continue
        code, k, jt, jf, _comment = item
        pc = len(prog)
        if code == BPF_JMP | BPF_JA:
            prog.append(Insn(code, 0, 0, rel(jt, pc)))
            continue
        t, f = rel(jt, pc), rel(jf, pc)
        if t > 255 or f > 255:
            raise ValueError("conditional jump longer than 255 instructions")
        prog.append(Insn(code, t, f, k & 0xFFFFFFFF))
    if not prog or prog[-1].code & 0x07 != BPF_RET:
        raise ValueError("a program must end with a return")
    return prog


ACCEPT_ALL: tuple[Insn, ...] = (Insn(BPF_RET | BPF_K, 0, 0, ACCEPT_SNAPLEN),)
REJECT_ALL: tuple[Insn, ...] = (Insn(BPF_RET | BPF_K, 0, 0, 0),)


def esp_filter(
    udp_port: int = 4500, *, link: Literal["ethernet", "cooked"] = "ethernet"
) -> list[Insn]:
    """The outside ring's filter: ESP and ESP-in-UDP on ``udp_port``, IPv4 and IPv6.

    See the module docstring for exactly what passes. ``link`` picks the header offsets:
    ``"ethernet"`` for SOCK_RAW on an Ethernet device, ``"cooked"`` for SOCK_DGRAM.
    """
    if not 0 < udp_port < 0x10000:
        raise ValueError(f"udp_port out of range: {udp_port}")
    if link == "ethernet":
        l3 = ETH_HLEN
        load_ethertype: Line = (BPF_LD | BPF_H | BPF_ABS, 12, None, None, "A = ethertype")
    elif link == "cooked":
        l3 = 0
        load_ethertype = (
            BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_PROTOCOL, None, None,
            "A = skb->protocol (no link header in a cooked packet)",
        )  # fmt: skip
    else:
        raise ValueError(f"unknown link type {link!r}")
    udp4 = l3  # BPF_IND loads below add X = IPv4 header length to this
    udp6 = l3 + IPV6_HLEN
    ld_b = BPF_LD | BPF_B | BPF_ABS
    ld_h = BPF_LD | BPF_H | BPF_ABS
    ld_w = BPF_LD | BPF_W | BPF_ABS
    ldi_h = BPF_LD | BPF_H | BPF_IND
    ldi_w = BPF_LD | BPF_W | BPF_IND
    jeq = BPF_JMP | BPF_JEQ | BPF_K
    jge = BPF_JMP | BPF_JGE | BPF_K
    jset = BPF_JMP | BPF_JSET | BPF_K
    and_k = BPF_ALU | BPF_AND | BPF_K
    ret = BPF_RET | BPF_K
    vlan = SKF_AD_OFF + SKF_AD_VLAN_TAG_PRESENT
    lines: list[Line] = [
        (ld_w, vlan, None, None, "A = 1 if the kernel stripped a VLAN tag"),
        (jeq, 0, None, "reject", "tagged: not supported yet"),
        load_ethertype,
        (jeq, ETHERTYPE_IPV4, "ipv4", None, "IPv4?"),
        (jeq, ETHERTYPE_IPV6, "ipv6", "reject", "IPv6? anything else is not ours"),
        Label("ipv4"),
        (ld_b, l3, None, None, "A = version/IHL byte"),
        (and_k, 0xF0, None, None, "A = version << 4"),
        (jeq, 0x40, None, "reject", "ethertype and version must agree"),
        (BPF_LDX | BPF_B | BPF_MSH, l3, None, None, "X = 4 * IHL: header length with options"),
        (BPF_MISC | BPF_TXA, 0, None, None, "A = X"),
        (jge, IPV4_MIN_HLEN, None, "reject", "IHL < 5 is malformed"),
        (ld_h, l3 + 6, None, None, "A = flags | fragment offset"),
        (jset, IPV4_FRAG_OFFSET_MASK, "reject", None, "non-first fragment: no L4 header"),
        (ld_b, l3 + 9, None, None, "A = protocol"),
        (jeq, IPPROTO_ESP, "accept", None, "ESP (RFC 4303)"),
        (jeq, IPPROTO_UDP, None, "reject", "UDP? anything else is not ours"),
        (ldi_h, udp4 + 2, None, None, "A = UDP destination port (X skips IPv4 options)"),
        (jeq, udp_port, None, "reject", "the NAT-T port (RFC 3948 §2.1)"),
        (ldi_h, udp4 + 4, None, None, "A = UDP length"),
        (jge, ESP_IN_UDP_MIN_LEN, None, "reject", "too short for ESP: keepalive or runt"),
        (ldi_w, udp4 + UDP_HLEN, None, None, "A = first payload word"),
        (jeq, 0, "reject", "accept", "zero: non-ESP marker, IKE (RFC 3948 §2.2)"),
        Label("ipv6"),
        (ld_b, l3, None, None, "A = version/traffic class byte"),
        (and_k, 0xF0, None, None, "A = version << 4"),
        (jeq, 0x60, None, "reject", "ethertype and version must agree"),
        (ld_b, l3 + 6, None, None, "A = next header"),
        (jeq, IPPROTO_ESP, "accept", None, "ESP directly after the fixed header"),
        (jeq, IPPROTO_UDP, None, "reject", "UDP? extension headers are not walked"),
        (ld_h, udp6 + 2, None, None, "A = UDP destination port"),
        (jeq, udp_port, None, "reject", "the NAT-T port"),
        (ld_h, udp6 + 4, None, None, "A = UDP length"),
        (jge, ESP_IN_UDP_MIN_LEN, None, "reject", "too short for ESP: keepalive or runt"),
        (ld_w, udp6 + UDP_HLEN, None, None, "A = first payload word"),
        (jeq, 0, "reject", "accept", "zero: non-ESP marker, IKE"),
        Label("accept"),
        (ret, ACCEPT_SNAPLEN, None, None, "keep the whole packet"),
        Label("reject"),
        (ret, 0, None, None, "drop"),
    ]
    return assemble(lines)


def nat_t_socket_filter() -> list[Insn]:
    """For the controller's UDP 4500 socket: keep IKE and keepalives, drop ESP-in-UDP.

    Without it every ESP-in-UDP packet is also queued to the controller (AF_PACKET only copies).
    On a UDP socket the filter sees the datagram from its UDP header. Dropping there still
    counts as delivered to a socket, so the kernel sends no ICMP port unreachable. Do not use
    ``UDP_ENCAP_ESPINUDP`` instead: on a kernel without ESP (CONFIG_INET_ESP unset) that
    option turns every ESP-in-UDP packet into an ICMP port unreachable (tested on 6.18).
    """
    return assemble(
        [
            (BPF_LD | BPF_W | BPF_LEN, 0, None, None, "A = UDP header + payload length"),
            (BPF_JMP | BPF_JGE | BPF_K, UDP_HLEN + 4, None, "accept", "< 4 bytes: keepalive"),
            (BPF_LD | BPF_W | BPF_ABS, UDP_HLEN, None, None, "A = first payload word"),
            (BPF_JMP | BPF_JEQ | BPF_K, 0, "accept", "reject", "non-ESP marker: IKE"),
            Label("accept"),
            (BPF_RET | BPF_K, ACCEPT_SNAPLEN, None, None, "to the controller"),
            Label("reject"),
            (BPF_RET | BPF_K, 0, None, None, "ESP-in-UDP: the data plane's"),
        ]
    )


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def attach(sock: socket.socket, program: Sequence[Insn], *, lock: bool = False) -> None:
    """Attach ``program`` with SO_ATTACH_FILTER; ``lock`` forbids later changes (SO_LOCK_FILTER).

    Attach before ``bind()``: a bound socket without a filter receives everything meanwhile.
    """
    set_program(sock, socket.SOL_SOCKET, SO_ATTACH_FILTER, program)
    if lock:
        sock.setsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER, 1)


def set_program(sock: socket.socket, level: int, option: int, program: Sequence[Insn], *,
                release_gil: bool = False) -> None:
    """Hand ``program`` to the kernel as a ``struct sock_fprog`` socket option: a socket
    filter (SO_ATTACH_FILTER), or a fanout group's steering program (PACKET_FANOUT_DATA,
    pipeline/afpacket.py). ``release_gil``: call libc's setsockopt through ctypes, which lets
    other threads run meanwhile (``socket.setsockopt`` holds the GIL, and replacing a fanout
    program waits out an RCU grace period in the kernel)."""
    if not 0 < len(program) <= 4096:  # BPF_MAXINSNS
        raise ValueError(f"a classic BPF program has 1..4096 instructions, got {len(program)}")
    insns = (_SockFilter * len(program))(*(_SockFilter(*insn) for insn in program))
    fprog = _SockFprog(len(program), insns)
    # setsockopt copies the program before it returns; ``insns`` outlives the call.
    if not release_gil:
        sock.setsockopt(level, option, bytes(fprog))
        return
    if _libc.setsockopt(sock.fileno(), level, option, ctypes.byref(fprog),
                        ctypes.sizeof(fprog)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_libc = ctypes.CDLL(None, use_errno=True)  # CDLL calls release the GIL
_libc.setsockopt.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.c_uint32)
_libc.setsockopt.restype = ctypes.c_int


def detach(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)


_CLASS = {BPF_LD: "ld", BPF_LDX: "ldx", BPF_ALU: "alu", BPF_JMP: "j", BPF_RET: "ret"}
_SIZE = {BPF_W: "", BPF_H: "h", BPF_B: "b"}
_JMP = {BPF_JA: "ja", BPF_JEQ: "jeq", BPF_JGT: "jgt", BPF_JGE: "jge", BPF_JSET: "jset"}


def format_program(program: Sequence[Insn]) -> str:
    """A ``tcpdump -d``-like listing, for logs and failing tests."""
    out = []
    for pc, (code, jt, jf, k) in enumerate(program):
        cls = code & 0x07
        text = f"code=0x{code:02x} k=0x{k:x}"
        if cls in (BPF_LD, BPF_LDX):
            mode, size = code & 0xE0, code & 0x18
            name = _CLASS[cls] + _SIZE.get(size, "?")
            if mode == BPF_ABS and k >= 0x100000000 + SKF_AD_OFF:
                text = f"{name} #ancillary[{k - (0x100000000 + SKF_AD_OFF)}]"
            elif mode == BPF_ABS:
                text = f"{name} [{k}]"
            elif mode == BPF_IND:
                text = f"{name} [x + {k}]"
            elif mode == BPF_MSH:
                text = f"ldxb 4*([{k}]&0xf)"
            elif mode == BPF_IMM:
                text = f"{name} #0x{k:x}"
        elif cls == BPF_JMP:
            op = _JMP.get(code & 0xF0, "j?")
            if op == "ja":
                text = f"ja {pc + 1 + k}"
            else:
                text = f"{op} #0x{k:x} jt {pc + 1 + jt} jf {pc + 1 + jf}"
        elif cls == BPF_ALU and code & 0xF0 == BPF_AND:
            text = f"and #0x{k:x}"
        elif cls == BPF_RET:
            text = f"ret #{k}"
        elif cls == BPF_MISC:
            text = "txa" if code & 0xF8 == BPF_TXA else "tax"
        out.append(f"({pc:03d}) {text}")
    return "\n".join(out)
