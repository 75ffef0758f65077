"""Device routes over rtnetlink, one message each: the TUN's routes to remote selectors.

A concentrator adds and withdraws a route with every remote-access client, so this is on
the path of each Child SA install. pyroute2 (used for everything else: links, addresses,
neighbours) runs an asyncio loop and a request parser per call, about half a millisecond
of CPU; one RTM_NEWROUTE/RTM_DELROUTE written here and its acknowledgement read back cost a
system call each way. The routes are the ones ``ip route add PREFIX dev DEV`` and pyroute2's
``route("add", dst=..., oif=...)`` make: table main, protocol static, scope global, unicast.

Wire format (Linux uapi netlink.h, rtnetlink.h; RFC 3549 §2.3): a netlink header, an rtmsg,
then the route attributes RTA_DST and RTA_OIF, each padded to 4 octets; the kernel answers
NLMSG_ERROR with error 0 (the acknowledgement) or a negative errno.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import socket
import struct

from pyroute2.netlink.exceptions import NetlinkError

__all__ = ["RouteSocket"]

NETLINK_ROUTE = 0
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 4, 0, 1
RTA_DST, RTA_OIF = 1, 4
ACK_TIMEOUT = 5.0  # seconds

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol,
#                                       scope, type, flags
_RTATTR = struct.Struct("=HH")  # length, type
_NLMSGERR = struct.Struct("=i")  # after the header: -errno, or 0 for an acknowledgement

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _attr(kind: int, value: bytes) -> bytes:
    length = _RTATTR.size + len(value)
    return _RTATTR.pack(length, kind) + value + bytes(-length % 4)


def route_message(kind: int, flags: int, seq: int, net: Network, ifindex: int) -> bytes:
    """One RTM_NEWROUTE or RTM_DELROUTE for ``net`` through the device ``ifindex``."""
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    body = (_RTMSG.pack(family, net.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC,
                        RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
            + _attr(RTA_DST, net.network_address.packed)
            + _attr(RTA_OIF, struct.pack("=I", ifindex)))
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


class RouteSocket:
    """An rtnetlink socket of the caller's network namespace, for device routes."""

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

    def _request(self, kind: int, flags: int, net: Network, ifindex: int) -> None:
        seq = next(self._seq)
        self._sock.send(route_message(kind, NLM_F_REQUEST | NLM_F_ACK | flags, seq, net,
                                      ifindex))
        while True:  # the acknowledgement of this request (nothing else is asked here)
            data = self._sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, mtype, _, mseq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise NetlinkError(errno.EPROTO, "malformed netlink reply")
                if mtype == NLMSG_ERROR and mseq == seq:
                    (error,) = _NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)
                    if error:
                        raise NetlinkError(-error, os.strerror(-error))
                    return
                offset += (length + 3) & ~3

    def close(self) -> None:
        self._sock.close()
