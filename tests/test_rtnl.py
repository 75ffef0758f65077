"""rtnetlink wire format (pipeline/rtnl.py): the answers and notifications the outside TX
path reads, whole, truncated and with trailing bytes. The kernel's own answers are read in
tests/test_afpacket.py (NeighbourCache in network namespaces)."""

from __future__ import annotations

import socket
import struct

import pytest

from pipeline import rtnl

GW = socket.inet_aton("192.0.2.254")
DST = socket.inet_aton("198.51.100.7")
GW6 = socket.inet_pton(socket.AF_INET6, "fe80::1")
MAC = bytes.fromhex("02cc00000003")


def attr(kind: int, value: bytes) -> bytes:
    """An rtattr as the kernel writes it (rtnetlink.h RTA_LENGTH, RTA_ALIGN), written here
    independently of rtnl._attr."""
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * ((4 - length % 4) % 4)


def rtmsg(family: int = socket.AF_INET, dst_len: int = 32, table: int = 254,
          rtype: int = rtnl.RTN_UNICAST) -> bytes:
    return struct.pack("=BBBBBBBBI", family, dst_len, 0, 0, table, 0, 0, rtype, 0)


def route_answer(*attrs: bytes, **kw: int) -> bytes:
    return rtmsg(**kw) + b"".join(attrs)


def ndmsg(family: int = socket.AF_INET, ifindex: int = 7, state: int = 0x02) -> bytes:
    return struct.pack("=BBHiHBB", family, 0, 0, ifindex, state, 0, 0)


def nlmsg(kind: int, seq: int, payload: bytes) -> bytes:
    length = 16 + len(payload)
    return struct.pack("=IHHII", length, kind, 0, seq, 0) + payload + b"\0" * (-length % 4)


def test_a_route_answer_through_a_gateway() -> None:
    payload = route_answer(attr(rtnl.RTA_DST, DST), attr(rtnl.RTA_OIF, struct.pack("=I", 7)),
                           attr(rtnl.RTA_GATEWAY, GW))
    route = rtnl.parse_route(memoryview(payload))
    assert route == rtnl.Route(socket.AF_INET, 32, 254, rtnl.RTN_UNICAST, DST, 7,
                               (socket.AF_INET, GW))


def test_an_ipv4_route_through_an_ipv6_next_hop() -> None:
    """RTA_VIA (RFC 5549): struct rtvia, the next hop's family then its address."""
    via = struct.pack("=H", socket.AF_INET6) + GW6
    payload = route_answer(attr(rtnl.RTA_OIF, struct.pack("=I", 3)), attr(rtnl.RTA_VIA, via))
    route = rtnl.parse_route(memoryview(payload))
    assert route is not None and route.gateway == (socket.AF_INET6, GW6)


def test_a_gateway_of_the_wrong_length_is_no_gateway() -> None:
    payload = route_answer(attr(rtnl.RTA_OIF, struct.pack("=I", 3)),
                           attr(rtnl.RTA_GATEWAY, GW[:3]))
    route = rtnl.parse_route(memoryview(payload))
    assert route is not None and route.gateway is None and route.oif == 3


def test_a_neighbour_entry() -> None:
    payload = ndmsg(state=0x04) + attr(rtnl.NDA_DST, GW) + attr(rtnl.NDA_LLADDR, MAC)
    assert rtnl.parse_neighbour(memoryview(payload)) == rtnl.Neighbour(
        socket.AF_INET, 7, 0x04, GW, MAC)


@pytest.mark.parametrize("parse, payload", [
    (rtnl.parse_route, route_answer(attr(rtnl.RTA_DST, DST),
                                    attr(rtnl.RTA_OIF, struct.pack("=I", 7)),
                                    attr(rtnl.RTA_GATEWAY, GW))),
    (rtnl.parse_neighbour, ndmsg() + attr(rtnl.NDA_DST, GW) + attr(rtnl.NDA_LLADDR, MAC)),
], ids=["route", "neighbour"])
def test_truncated_and_padded_payloads_parse_or_give_none(parse: object, payload: bytes
                                                          ) -> None:
    """Every prefix of an answer gives None (no family header) or what its whole attributes
    say; trailing bytes that make no attribute are ignored."""
    assert callable(parse)
    whole = parse(memoryview(payload))
    assert whole is not None
    header = 12
    for cut in range(len(payload)):
        got = parse(memoryview(payload[:cut]))
        if cut < header:
            assert got is None
        else:
            assert type(got) is type(whole)  # parsed, maybe with fewer attributes
    assert parse(memoryview(payload + b"\xff\x00")) == whole
    assert parse(memoryview(payload + struct.pack("=HH", 200, 1))) == whole  # runs past


def test_messages_frames_a_datagram_and_stops_at_a_bad_length() -> None:
    first = nlmsg(rtnl.RTM_NEWROUTE, 5, rtmsg())
    second = nlmsg(rtnl.RTM_NEWNEIGH, 6, ndmsg())
    got = [(kind, seq, bytes(p)) for kind, seq, p in rtnl.messages(first + second)]
    assert got == [(rtnl.RTM_NEWROUTE, 5, rtmsg()), (rtnl.RTM_NEWNEIGH, 6, ndmsg())]
    bad = struct.pack("=IHHII", 8, rtnl.RTM_NEWROUTE, 0, 7, 0)  # shorter than its header
    assert [k for k, _, _ in rtnl.messages(first + bad + second)] == [rtnl.RTM_NEWROUTE]
    overlong = struct.pack("=IHHII", 64, rtnl.RTM_NEWROUTE, 0, 7, 0) + bytes(8)
    assert list(rtnl.messages(overlong)) == []
    assert list(rtnl.messages(first[:15])) == []


def test_requests_are_what_iproute2_sends() -> None:
    """``ip route get`` and ``ip neigh get``: the request's family header and RTA_DST /
    NDA_DST, as strace shows iproute2 writing them (table, protocol, scope, type all 0)."""
    req = rtnl.route_get_message(9, socket.AF_INET, DST)
    length, kind, flags, seq, port = struct.unpack_from("=IHHII", req)
    assert (length, kind, flags, seq, port) == (len(req), rtnl.RTM_GETROUTE,
                                                rtnl.NLM_F_REQUEST, 9, 0)
    assert req[16:] == rtmsg(dst_len=32, table=0, rtype=0) + attr(rtnl.RTA_DST, DST)
    req = rtnl.neighbour_message(rtnl.RTM_GETNEIGH, rtnl.NLM_F_REQUEST, 10, socket.AF_INET6,
                                 GW6, 4)
    assert req[16:] == ndmsg(socket.AF_INET6, 4, 0) + attr(rtnl.NDA_DST, GW6)
