"""Next-hop MAC addresses for the outside TX path, from the kernel's route and neighbour
tables (DESIGN §7: the AF_PACKET outside writes whole Ethernet frames).

Two caches, because a concentrator talks to many peers through few next hops (remote-access
clients, each at its own public address, all behind the default gateway):

* destination -> next hop, from ``ip route get <dst>``: the route must leave through our
  interface (else the packet is dropped as ``no_route``); its gateway is the next hop, or
  the destination itself when it is on-link. Kept until the kernel announces a change that
  may touch it (a route covering it, a rule, an address or a link), :data:`ROUTE_TTL` at the
  most;
* next hop -> MAC, from the neighbour table (one entry asked for, ``ip neigh get``): kept for
  ``ttl`` seconds, or until the kernel announces a change of that entry.

Each costs one rtnetlink request and answer (pipeline/rtnl.py), so a second of traffic to
N peers behind one gateway costs one neighbour request, not N route and N neighbour
requests. (This used pyroute2 per destination every ``ttl``, dumping the whole neighbour
table: about 2 ms of CPU each on the 2-core lab, taken in the data plane's loop.)

When the next hop has no usable entry, resolution is triggered the way ``ip neigh replace
... use`` does it (RTM_NEWNEIGH with NTF_USE: the kernel sends the ARP request or neighbour
solicitation) and the packet is dropped; the miss is remembered for ``retry`` seconds (or
until the entry changes) so that one batch does not trigger a netlink round trip per packet.
A STALE entry is still used, and resolution is triggered too: this data plane's traffic
bypasses the kernel, so the kernel never confirms the neighbour by itself.

IPv6 caveat: for a few seconds after a link comes up its link-local address is tentative
(DAD); meanwhile the kernel sends no solicitation for an NTF_USE request, the entry fails
after its probes (about 3 s) and the next miss starts over. A gateway's outside link is up
long before traffic, so this only shows in freshly built test labs.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pipeline import rtnl

__all__ = ["NeighbourCache"]

# s: a route answer's life while change notifications come (a safety net), less up to half
# of it (by destination) so that many peers' answers do not expire in the same batch
ROUTE_TTL = 10.0
EVENTS_EVERY = 0.1  # s: how often a lookup reads the change notifications, at most
# Answers kept at the most, per cache: past it the expired ones go, then all (a concentrator
# meets new peer addresses for as long as it runs)
CACHE_MAX = 65536
# Route changes read at once past which every route answer goes rather than those each
# covers (a routing daemon loading a table: each would walk the answers)
ROUTE_CHANGES_WALKED = 32
_EVENT_GROUPS = (rtnl.RTMGRP_LINK | rtnl.RTMGRP_NEIGH | rtnl.RTMGRP_IPV4_IFADDR
                 | rtnl.RTMGRP_IPV4_ROUTE | rtnl.RTMGRP_IPV4_RULE | rtnl.RTMGRP_IPV6_IFADDR
                 | rtnl.RTMGRP_IPV6_ROUTE)
_ROUTE_CHANGES = frozenset({rtnl.RTM_NEWROUTE, rtnl.RTM_DELROUTE})
_EVERYTHING = frozenset({rtnl.RTM_NEWLINK, rtnl.RTM_DELLINK, rtnl.RTM_NEWADDR,
                         rtnl.RTM_DELADDR, rtnl.RTM_NEWRULE, rtnl.RTM_DELRULE})

Key = tuple[int, bytes]  # (address family, address)


class NeighbourCache:
    """The next-hop MAC of destinations out of ``ifname`` (see the module's text).

    ``requests`` counts the rtnetlink requests made (route, neighbour, NTF_USE): what the
    caches save shows there."""

    def __init__(
        self,
        ifname: str,
        *,
        ttl: float = 1.0,
        retry: float = 0.05,
        iproute: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        ipr: Any = iproute if iproute is not None else IPRoute()
        try:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                raise OSError(errno.ENODEV, f"no interface {ifname!r}")
            link = ipr.link("get", index=int(found[0]))[0]
        finally:
            if iproute is None:
                ipr.close()
        self.ifname = ifname
        self.ifindex = int(found[0])
        self.mac = bytes.fromhex(str(link.get("IFLA_ADDRESS")).replace(":", ""))
        self.mtu = int(link.get("IFLA_MTU"))
        self.ttl = ttl
        self.retry = retry
        self.requests = 0
        self._clock = clock
        self._rtnl = rtnl.RouteSocket()
        # Without notifications (none allowed here) a route answer lives ``ttl``.
        self._events: rtnl.RtnlEvents | None = None
        with contextlib.suppress(OSError):
            self._events = rtnl.RtnlEvents(_EVENT_GROUPS)
        self._route_ttl = ROUTE_TTL if self._events is not None else ttl
        self._events_due = 0.0
        # destination -> (expiry, next hop or None, reason when None)
        self._routes: dict[Key, tuple[float, Key | None, str]] = {}
        # next hop -> (expiry, MAC or None, reason when None)
        self._hops: dict[Key, tuple[float, bytes | None, str]] = {}

    def lookup(self, family: int, addr: bytes) -> tuple[bytes | None, str]:
        """(next-hop MAC, "") or (None, reason): reason is ``no_route`` or ``no_neighbour``."""
        now = self._clock()
        if now >= self._events_due:
            self._read_events()
            self._events_due = now + EVENTS_EVERY
        key = (family, addr)
        route = self._routes.get(key)
        if route is None or route[0] <= now:
            hop, reason = self._route(family, addr)
            life = self._route_ttl * (1.0 - (hash(key) & 0xFF) / 512) if hop is not None \
                else self.retry
            _make_room(self._routes, now)
            route = self._routes[key] = (now + life, hop, reason)
        hop = route[1]
        if hop is None:
            return None, route[2]
        entry = self._hops.get(hop)
        if entry is None or entry[0] <= now:
            mac = self._neighbour(hop)
            _make_room(self._hops, now)
            entry = self._hops[hop] = ((now + self.ttl, mac, "") if mac is not None
                                       else (now + self.retry, None, "no_neighbour"))
        return entry[1], entry[2]

    def _route(self, family: int, addr: bytes) -> tuple[Key | None, str]:
        self.requests += 1
        try:
            route = self._rtnl.get_route(family, addr)
        except (NetlinkError, OSError):
            return None, "no_route"
        if route.type != rtnl.RTN_UNICAST or route.oif != self.ifindex:
            return None, "no_route"  # unreachable, local, or out of another interface
        return (route.gateway or (family, addr)), ""

    def _neighbour(self, hop: Key) -> bytes | None:
        family, addr = hop
        self.requests += 1
        try:
            entry = self._rtnl.get_neighbour(family, addr, self.ifindex)
        except (NetlinkError, OSError):
            entry = None  # ENOENT: none yet
        if entry is not None and entry.lladdr and entry.state & rtnl.NUD_VALID:
            if entry.state & rtnl.NUD_STALE:
                self._solicit(hop)
            return entry.lladdr
        self._solicit(hop)
        return None

    def _solicit(self, hop: Key) -> None:
        family, addr = hop
        self.requests += 1
        try:
            self._rtnl.use_neighbour(family, addr, self.ifindex)
        except (NetlinkError, OSError):
            # No CAP_NET_ADMIN: a datagram sent through the kernel stack resolves too.
            with socket.socket(family, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.ifname.encode())
                s.sendto(b"", (socket.inet_ntop(family, addr), 9))  # discard port

    def _read_events(self) -> None:
        """Forget what the kernel's announced changes may have changed."""
        if self._events is None:
            return
        try:
            events, lost = self._events.read()
        except OSError:
            events, lost = [], True
        if lost:
            self.flush()
            return
        if (sum(kind in _ROUTE_CHANGES for kind, _ in events) > ROUTE_CHANGES_WALKED
                or any(kind in _EVERYTHING for kind, _ in events)):
            self._routes.clear()  # reachability itself moved: every route answer
        for kind, payload in events:
            if kind in _ROUTE_CHANGES and self._routes:
                route = rtnl.parse_route(payload)
                if route is None:
                    self._routes.clear()
                else:
                    self._forget_routes(route)
            elif kind in (rtnl.RTM_NEWNEIGH, rtnl.RTM_DELNEIGH):
                entry = rtnl.parse_neighbour(payload)
                if entry is None:
                    self._hops.clear()
                elif entry.dst is not None:
                    self._hops.pop((entry.family, entry.dst), None)

    def _forget_routes(self, route: rtnl.Route) -> None:
        """Drop the destinations a changed route covers (the answer for them may differ)."""
        bits = 8 * len(route.dst or b"")
        if route.dst is not None and route.dst_len == bits:
            # A host route (a concentrator adds one into the TUN per remote-access client):
            # it covers one destination, found without a walk over every answer.
            self._routes.pop((route.family, route.dst), None)
            return
        if route.dst is None or not 0 <= route.dst_len <= bits:
            # The default route (no RTA_DST), or one not read whole: any answer may move.
            self._routes = {k: v for k, v in self._routes.items() if k[0] != route.family}
            return
        shift = bits - route.dst_len
        prefix = int.from_bytes(route.dst, "big") >> shift
        self._routes = {k: v for k, v in self._routes.items()
                        if k[0] != route.family or len(k[1]) != len(route.dst)
                        or int.from_bytes(k[1], "big") >> shift != prefix}

    def flush(self) -> None:
        self._routes.clear()
        self._hops.clear()

    def close(self) -> None:
        self._rtnl.close()
        if self._events is not None:
            self._events.close()


def _make_room(cache: dict[Key, tuple[float, Any, str]], now: float) -> None:
    """Keep ``cache`` under CACHE_MAX answers before one more goes in."""
    if len(cache) < CACHE_MAX:
        return
    for key in [k for k, v in cache.items() if v[0] <= now]:
        del cache[key]
    if len(cache) >= CACHE_MAX:
        cache.clear()
