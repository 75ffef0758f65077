"""rtnetlink, one message each, where pyroute2 costs too much: the TUN's routes to remote
selectors, and the outside TX path's next hops (pipeline/neighbours.py).

pyroute2 (used for everything else: links, addresses) runs an asyncio loop and a request
parser per call, about half a millisecond of CPU, and its neighbour dump parses the whole
table. Here a request is one datagram and its answer one more:

* device routes: a concentrator adds and withdraws a route with every remote-access client,
  so this is on the path of each Child SA install. The routes are the ones ``ip route add
  PREFIX dev DEV`` and pyroute2's ``route("add", dst=..., oif=...)`` make: table main,
  protocol static, scope global, unicast;
* ``ip route get ADDR`` (RTM_GETROUTE), ``ip neigh get ADDR dev DEV`` (RTM_GETNEIGH for one
  entry, Linux 5.0 and later) and ``ip neigh replace ADDR dev DEV use`` (RTM_NEWNEIGH with
  NTF_USE: the kernel sends an ARP request or neighbour solicitation);
* :class:`RtnlEvents`: the kernel's notifications of route, address, link and neighbour
  changes (multicast groups), read without blocking.

Wire format (Linux uapi netlink.h, rtnetlink.h, neighbour.h; RFC 3549 §2.3): a netlink
header, a family header (rtmsg, ndmsg), then attributes, each padded to 4 octets; the kernel
answers a request with the object asked for, or NLMSG_ERROR with error 0 (the
acknowledgement) or a negative errno.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import itertools
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

__all__ = ["Neighbour", "Route", "RouteSocket", "RtnlEvents"]

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RTM_NEWRULE, RTM_DELRULE = 32, 33
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 4, 0, 1
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_VIA = 1, 4, 5, 18
NDA_DST, NDA_LLADDR = 1, 2
NTF_USE = 0x01
NUD_STALE = 0x04  # neighbour.h: an entry usable, but not confirmed for a while
NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERM
# Multicast groups (rtnetlink.h RTMGRP_*): what RtnlEvents hears of.
RTMGRP_LINK, RTMGRP_NEIGH = 0x1, 0x4
RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV4_RULE = 0x10, 0x40, 0x80
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
ACK_TIMEOUT = 5.0  # seconds
EVENTS_RCVBUF = 1 << 20  # a burst of changes (a link going down) fits; past it, ENOBUFS

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol,
#                                       scope, type, flags
_NDMSG = struct.Struct("=BBHiHBB")  # family, pad, pad, ifindex, state, flags, type
_RTATTR = struct.Struct("=HH")  # length, type
_NLMSGERR = struct.Struct("=i")  # after the header: -errno, or 0 for an acknowledgement
_FAMILY = struct.Struct("=H")  # RTA_VIA: struct rtvia's family, then the address
_ADDRESS_LEN: dict[int, int] = {int(socket.AF_INET): 4, int(socket.AF_INET6): 16}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _attr(kind: int, value: bytes) -> bytes:
    length = _RTATTR.size + len(value)
    return _RTATTR.pack(length, kind) + value + bytes(-length % 4)


def messages(data: bytes) -> Iterator[tuple[int, int, memoryview]]:
    """(type, sequence, payload) of each netlink message in one datagram; a message whose
    length does not fit ends the datagram (nothing after it can be framed)."""
    view = memoryview(data)
    offset = 0
    while offset + _NLMSGHDR.size <= len(view):
        length, mtype, _, seq, _ = _NLMSGHDR.unpack_from(view, offset)
        if length < _NLMSGHDR.size or offset + length > len(view):
            return
        yield mtype, seq, view[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3


def attributes(payload: memoryview, offset: int) -> dict[int, bytes]:
    """The attributes from ``offset`` on (the first of each type; nested ones not opened).
    One whose length does not fit ends the list."""
    found: dict[int, bytes] = {}
    while offset + _RTATTR.size <= len(payload):
        length, kind = _RTATTR.unpack_from(payload, offset)
        if length < _RTATTR.size or offset + length > len(payload):
            break
        found.setdefault(kind & 0x3FFF, bytes(payload[offset + _RTATTR.size : offset + length]))
        offset += (length + 3) & ~3
    return found


@dataclass(frozen=True)
class Route:
    """An RTM_NEWROUTE: what ``ip route get`` answers, or a change the kernel announces."""

    family: int
    dst_len: int
    table: int
    type: int  # RTN_UNICAST, RTN_LOCAL, ...
    dst: bytes | None  # RTA_DST (None: the default route, or an answer without it)
    oif: int | None  # RTA_OIF
    gateway: tuple[int, bytes] | None  # (family, address): RTA_GATEWAY, or RTA_VIA


def parse_route(payload: memoryview) -> Route | None:
    """None when the payload is too short for an rtmsg."""
    if len(payload) < _RTMSG.size:
        return None
    family, dst_len, _, _, table, _, _, rtype, _ = _RTMSG.unpack_from(payload)
    attrs = attributes(payload, _RTMSG.size)
    oif = attrs.get(RTA_OIF)
    gateway: tuple[int, bytes] | None = None
    if RTA_GATEWAY in attrs:
        gateway = (family, attrs[RTA_GATEWAY])
    elif RTA_VIA in attrs and len(attrs[RTA_VIA]) >= _FAMILY.size:
        # An IPv4 route through an IPv6 next hop (RFC 5549): struct rtvia.
        (via_family,) = _FAMILY.unpack_from(attrs[RTA_VIA])
        gateway = (via_family, attrs[RTA_VIA][_FAMILY.size :])
    if gateway is not None and len(gateway[1]) != _ADDRESS_LEN.get(gateway[0]):
        gateway = None  # a length no address of that family has
    return Route(family, dst_len, table, rtype, attrs.get(RTA_DST),
                 struct.unpack("=I", oif)[0] if oif is not None and len(oif) == 4 else None,
                 gateway)


@dataclass(frozen=True)
class Neighbour:
    """An RTM_NEWNEIGH or RTM_DELNEIGH: one entry of the neighbour table."""

    family: int
    ifindex: int
    state: int  # NUD_* bits
    dst: bytes | None  # NDA_DST
    lladdr: bytes | None  # NDA_LLADDR


def parse_neighbour(payload: memoryview) -> Neighbour | None:
    """None when the payload is too short for an ndmsg."""
    if len(payload) < _NDMSG.size:
        return None
    family, _, _, ifindex, state, _, _ = _NDMSG.unpack_from(payload)
    attrs = attributes(payload, _NDMSG.size)
    return Neighbour(family, ifindex, state, attrs.get(NDA_DST), attrs.get(NDA_LLADDR))


def route_get_message(seq: int, family: int, addr: bytes) -> bytes:
    """``ip route get ADDR``: no output interface given (with one forced, the kernel takes a
    destination without a route for on-link)."""
    body = (_RTMSG.pack(family, 8 * len(addr), 0, 0, 0, 0, 0, 0, 0)
            + _attr(RTA_DST, addr))
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, seq,
                          0) + body


def neighbour_message(kind: int, flags: int, seq: int, family: int, addr: bytes,
                      ifindex: int, ntf: int = 0) -> bytes:
    """RTM_GETNEIGH for one entry, or RTM_NEWNEIGH with ``ntf`` (NTF_USE)."""
    body = _NDMSG.pack(family, 0, 0, ifindex, 0, ntf, 0) + _attr(NDA_DST, addr)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def route_message(kind: int, flags: int, seq: int, net: Network, ifindex: int) -> bytes:
    """One RTM_NEWROUTE or RTM_DELROUTE for ``net`` through the device ``ifindex``."""
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    body = (_RTMSG.pack(family, net.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC,
                        RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
            + _attr(RTA_DST, net.network_address.packed)
            + _attr(RTA_OIF, struct.pack("=I", ifindex)))
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


class RouteSocket:
    """An rtnetlink socket of the caller's network namespace: device routes, route and
    neighbour lookups."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.settimeout(ACK_TIMEOUT)  # the kernel answers at once; never hang on it
        self._sock.bind((0, 0))
        self._seq = itertools.count(1)

    def add(self, net: Network, ifindex: int) -> None:
        """Route ``net`` into the device; NetlinkError (EEXIST, ...) when refused."""
        self._request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, net, ifindex)

    def delete(self, net: Network, ifindex: int) -> None:
        """Withdraw the route; NetlinkError (ESRCH: there is none, ...) when refused."""
        self._request(RTM_DELROUTE, 0, net, ifindex)

    def get_route(self, family: int, addr: bytes) -> Route:
        """The route the kernel would send a packet to ``addr`` by (``ip route get``);
        NetlinkError (ENETUNREACH, EHOSTUNREACH, EINVAL for a blackhole, ...) when none."""
        seq = next(self._seq)
        payload = self._answer(route_get_message(seq, family, addr), seq, RTM_NEWROUTE)
        route = parse_route(payload) if payload is not None else None
        if route is None:
            raise NetlinkError(errno.EPROTO, "malformed route in the kernel's answer")
        return route

    def get_neighbour(self, family: int, addr: bytes, ifindex: int) -> Neighbour:
        """``addr``'s entry on the device (``ip neigh get``); NetlinkError (ENOENT: none)."""
        seq = next(self._seq)
        payload = self._answer(neighbour_message(RTM_GETNEIGH, NLM_F_REQUEST, seq, family,
                                                 addr, ifindex), seq, RTM_NEWNEIGH)
        neighbour = parse_neighbour(payload) if payload is not None else None
        if neighbour is None:
            raise NetlinkError(errno.EPROTO, "malformed neighbour in the kernel's answer")
        return neighbour

    def use_neighbour(self, family: int, addr: bytes, ifindex: int) -> None:
        """Have the kernel resolve (or confirm) ``addr`` on the device, as a packet it sent
        there would (``ip neigh replace ADDR dev DEV use``). The entry is created if there
        is none; its state is left to the kernel (NTF_USE ignores the one asked for)."""
        seq = next(self._seq)
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        self._answer(neighbour_message(RTM_NEWNEIGH, flags, seq, family, addr, ifindex,
                                       NTF_USE), seq, None)

    def _request(self, kind: int, flags: int, net: Network, ifindex: int) -> None:
        seq = next(self._seq)
        self._answer(route_message(kind, NLM_F_REQUEST | NLM_F_ACK | flags, seq, net,
                                   ifindex), seq, None)

    def _answer(self, request: bytes, seq: int, kind: int | None) -> memoryview | None:
        """Send ``request``; the payload of the answer of type ``kind`` (None: wait for
        the acknowledgement, and return None). A refusal raises NetlinkError."""
        self._sock.send(request)
        while True:  # only this request is outstanding: anything else is stale, skipped
            data = self._sock.recv(65536)
            if len(data) >= _NLMSGHDR.size and _NLMSGHDR.unpack_from(data)[0] < _NLMSGHDR.size:
                raise NetlinkError(errno.EPROTO, "malformed netlink reply")
            for mtype, mseq, payload in messages(data):
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    (error,) = _NLMSGERR.unpack_from(payload) if len(payload) >= 4 else (0,)
                    if error:
                        raise NetlinkError(-error, os.strerror(-error))
                    if kind is None:
                        return None
                elif mtype == kind:
                    return payload

    def close(self) -> None:
        self._sock.close()


class RtnlEvents:
    """The kernel's notifications for ``groups`` (RTMGRP_* bits) in the caller's network
    namespace, read without blocking. A reader that falls behind loses some (the kernel
    says ENOBUFS): :meth:`read` reports it, and the caller must assume anything changed."""

    def __init__(self, groups: int, rcvbuf: int = EVENTS_RCVBUF) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self._sock.bind((0, groups))
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> tuple[list[tuple[int, memoryview]], bool]:
        """((type, payload) of each notification waiting, whether some were lost)."""
        found: list[tuple[int, memoryview]] = []
        lost = False
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return found, lost
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                lost = True  # the queue overflowed; what is queued since still comes
                continue
            found += [(mtype, payload) for mtype, _, payload in messages(data)]

    def close(self) -> None:
        self._sock.close()
