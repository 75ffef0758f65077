"""The IKE adapter: asyncio (uvloop when available) around the sans-IO IKE SAs (DESIGN §2).

About as thin as aioquic's asyncio layer: UDP sockets on the IKE port and the NAT-T port
(RFC 3948 §2.2: IKE there carries a four-zero-byte Non-ESP Marker), a table of IKE SAs by
SPI, one timer task driven by the SAs' ``get_timer()``, and the SAs' events handed to a
callback. No blocking call runs on the loop.

Not yet here (next steps): the switch to the NAT-T port after IKE_SA_INIT when a NAT is
detected, rekeying, and installing the Child SAs into the data plane (SA distribution).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from controller.ike.cookies import CookieGuard
from controller.ike.ike_sa import Event, IkeConfig, IkeSa
from controller.ike.randomness import RandomPool
from controller.ike.state import IkeState

__all__ = ["IkeDaemon", "PeerConfig"]

log = logging.getLogger("espline.ike")

NON_ESP_MARKER = b"\x00\x00\x00\x00"  # RFC 3948 §2.2
IKE_HEADER_LEN = 28
IKE_SA_INIT = 34
FLAG_RESPONSE = 0x20
# IKE SAs that no peer's message reaches (not yet answered, or over)
_UNINDEXED = (IkeState.INITIAL, IkeState.CLOSED, IkeState.FAILED)


@dataclass(frozen=True)
class PeerConfig:
    """A connection: its IKE configuration and where the peer is."""

    ike: IkeConfig
    remote: tuple[str, int]  # address and IKE port of the peer
    local: str | None = None  # our address towards it (NAT-D hashes); None: the bound one


@dataclass
class _Endpoint(asyncio.DatagramProtocol):
    daemon: IkeDaemon
    natt: bool
    transport: asyncio.DatagramTransport | None = field(default=None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.natt:
            if not data.startswith(NON_ESP_MARKER):
                return  # ESP in UDP: the data plane's, not ours (or a NAT keepalive)
            data = data[len(NON_ESP_MARKER):]
        self.daemon.received(data, (addr[0], addr[1]), self.natt)


class IkeDaemon:
    def __init__(self, peers: Sequence[PeerConfig], local: str, port: int = 500,
                 natt_port: int = 4500, *, on_event: Callable[[IkeSa, Event], None] | None = None,
                 random: Callable[[int], bytes] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 cookie_threshold: int = 10) -> None:
        self.peers = list(peers)
        self.local = local
        self.port = port
        self.natt_port = natt_port
        self.on_event = on_event
        # The kernel's CSPRNG, a block per system call (controller/ike/randomness.py).
        self.random = random if random is not None else RandomPool()
        self.clock = clock
        self.sas: dict[bytes, IkeSa] = {}  # by the SPIs we chose (ours identify the SA)
        self._indexed: dict[int, tuple[bytes, ...]] = {}  # id(sa) -> its SPIs in ``sas``
        self._heap: list[tuple[float, int, IkeSa]] = []  # (timer, tie-break, SA)
        self._scheduled: dict[int, float] = {}  # id(sa) -> the timer its live entry has
        self._seq = itertools.count()
        # Responders past IKE_SA_INIT and not yet authenticated, by (SPIi, peer address):
        # found again by a retransmitted IKE_SA_INIT, dropped after ``half_open_timeout``.
        self._half_open: dict[tuple[bytes, str, int], IkeSa] = {}
        self._half_open_since: dict[int, float] = {}
        self.half_open_timeout = 30.0
        self.max_half_open = 4096
        # COOKIE challenges from this many half-open SAs on (0: never; strongSwan's
        # charon.cookie_threshold defaults to 10 as well).
        self.cookies = CookieGuard(cookie_threshold, self.random) if cookie_threshold else None
        # Handling a request from a peer: whatever it changes, the peer can act on it only
        # once our answer reaches it (Gateway holds the SA deltas of such events for the
        # loop turn, and the datagrams with them: hold_sends).
        self.answering = False
        self._held: list[tuple[bytes, tuple[str, int], bool]] | None = None
        self.dropped = 0  # datagrams that match no IKE SA and start none
        # (exchange type, "in"/"out", "request"/"response") -> messages; alerts by type
        self.messages: Counter[tuple[int, str, str]] = Counter()
        self.alerts: Counter[str] = Counter()
        self._ike: _Endpoint | None = None
        self._natt: _Endpoint | None = None
        self._wake = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        _, self._ike = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self, False), local_addr=(self.local, self.port))
        _, self._natt = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self, True), sock=self._natt_socket())

    def _natt_socket(self) -> socket.socket:
        """The NAT-T port's socket, filtered in the kernel to IKE and keepalives: the
        ESP-in-UDP there is the data plane's (its AF_PACKET ring has a copy), and queueing
        it here would cost the controller a wake-up per packet (pipeline/bpf.py)."""
        from pipeline import bpf

        family = socket.AF_INET6 if ":" in self.local else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            bpf.attach(sock, bpf.nat_t_socket_filter())  # before bind: nothing slips through
            sock.bind((self.local, self.natt_port))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        self._held = None  # closed: nothing more goes out
        for endpoint in (self._ike, self._natt):
            if endpoint is not None and endpoint.transport is not None:
                endpoint.transport.close()

    async def run_timers(self, stop: asyncio.Event) -> None:
        """Drive the SAs' timers (retransmission, rekey, DPD, expiry) until ``stop`` is set.

        A heap of (time, SA), refreshed whenever an SA is flushed: each wake-up costs
        O(log n) per due timer, not a scan of every SA (thousands of them on a concentrator).
        """
        while not stop.is_set():
            now = self.clock()
            delay = max(0.0, self._heap[0][0] - now) if self._heap else 1.0
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(delay, 1.0))
            now = self.clock()
            if self._half_open:
                self._expire_half_open(now)
            while self._heap and self._heap[0][0] <= now:
                when, _, sa = heapq.heappop(self._heap)
                if self._scheduled.get(id(sa)) != when:
                    continue  # stale: rescheduled or gone since
                del self._scheduled[id(sa)]
                timer = sa.get_timer()
                if timer is None:
                    continue
                if timer <= now:
                    sa.handle_timer(now)
                    self._flush(sa)
                else:
                    self._schedule(sa)

    def _schedule(self, sa: IkeSa) -> None:
        timer = sa.get_timer()
        if timer is None:
            self._scheduled.pop(id(sa), None)
        elif self._scheduled.get(id(sa)) != timer:
            self._scheduled[id(sa)] = timer
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (timer, next(self._seq), sa))
            if earliest is None or timer < earliest:
                self._wake.set()  # the timer task sleeps until the earliest: wake it sooner

    # -- IKE SAs -----------------------------------------------------------------------------
    def initiate(self, name: str) -> IkeSa:
        peer = next(p for p in self.peers if p.ike.name == name)
        sa = IkeSa(peer.ike, initiator=True, local=(peer.local or self.local, self.port),
                   remote=peer.remote, random=self.random)
        sa.initiate(self.clock())
        self._flush(sa)
        return sa

    def received(self, data: bytes, addr: tuple[str, int], natt: bool) -> None:
        if len(data) < IKE_HEADER_LEN:
            self.dropped += 1
            return
        spi_i, spi_r = data[:8], data[8:16]
        exchange, flags = data[18], data[19]
        self.messages[(exchange, "in", "response" if flags & FLAG_RESPONSE else "request")] += 1
        sa = self.sas.get(spi_r) or self.sas.get(spi_i)
        if sa is None and exchange == IKE_SA_INIT and not any(spi_r):
            # A retransmitted IKE_SA_INIT: the SA that answered it answers again from its
            # cache (RFC 7296 §2.1), rather than a second responder and key exchange.
            sa = self._half_open.get((spi_i, addr[0], addr[1]))
        if sa is None:
            if exchange != IKE_SA_INIT or flags & FLAG_RESPONSE or any(spi_r):
                self.dropped += 1
                self.alerts["invalid_spi"] += 1
                return
            peer = next((p for p in self.peers if p.remote[0] == addr[0]), None)
            if peer is None:
                self.dropped += 1  # nobody configured at that address
                self.alerts["peer_not_configured"] += 1
                return
            if self.cookies is not None:
                # RFC 7296 §2.6: past the threshold of half-open SAs, a request without a
                # valid cookie gets a stateless COOKIE challenge and nothing is kept.
                challenge = self.cookies.check(data, addr, len(self._half_open), self.clock())
                if challenge is not None:
                    self.alerts["cookie_challenge"] += 1
                    self._send(challenge, addr, natt)
                    return
            if len(self._half_open) >= self.max_half_open:
                self.dropped += 1  # under a flood: no state, no key exchange
                self.alerts["half_open_limit"] += 1
                return
            sa = IkeSa(peer.ike, initiator=False, local=(peer.local or self.local, self.port),
                       remote=addr, random=self.random)
            self._half_open[(spi_i, addr[0], addr[1])] = sa
            self._half_open_since[id(sa)] = self.clock()
        # The core learns the peer's address from authenticated messages (RFC 7296 §2.23).
        dropped = sa.dropped
        self.answering = not flags & FLAG_RESPONSE
        try:
            sa.receive_datagram(data, addr, self.clock())
            if sa.dropped != dropped:
                self.alerts["message_dropped"] += 1  # unparsable, unauthentic or unexpected
            self._flush(sa)
        finally:
            self.answering = False

    def half_open(self) -> int:
        return len(self._half_open)

    def _expire_half_open(self, now: float) -> None:
        for key, sa in list(self._half_open.items()):
            since = self._half_open_since.get(id(sa), now)
            if sa.state not in (IkeState.INITIAL, IkeState.INIT_DONE):
                del self._half_open[key]  # authenticated (or failed): no longer half-open
                self._half_open_since.pop(id(sa), None)
            elif now - since > self.half_open_timeout:
                del self._half_open[key]
                self._half_open_since.pop(id(sa), None)
                self.alerts["half_open_expired"] += 1
                self._scheduled.pop(id(sa), None)
                for spi in self._indexed.pop(id(sa), ()):
                    if self.sas.get(spi) is sa:
                        del self.sas[spi]

    def _index(self, sa: IkeSa) -> None:
        """Find ``sa`` by each of our SPIs it answers: the current IKE SA's, and an old or
        redundant one of a rekey until its Delete is over (RFC 7296 §2.18). A responder is
        kept only once it answered (no state for a lone IKE_SA_INIT that failed)."""
        if sa.state in _UNINDEXED:
            spis: tuple[bytes, ...] = ()
        else:
            spis = sa.local_spis
        before = self._indexed.get(id(sa), ())
        for spi in before:
            if spi not in spis and self.sas.get(spi) is sa:
                del self.sas[spi]
        for spi in spis:
            self.sas[spi] = sa
        if spis:
            self._indexed[id(sa)] = spis
        else:
            self._indexed.pop(id(sa), None)

    def _flush(self, sa: IkeSa) -> None:
        # Events first: a rekey responder's new inbound SA reaches the data plane before the
        # response that lets the peer use it goes out (make-before-break, DESIGN §5).
        while (event := sa.next_event()) is not None:
            log.debug("%s: %s", sa.config.name, type(event).__name__)
            if self.on_event is not None:
                self.on_event(sa, event)
        self._index(sa)
        if id(sa) in self._indexed:
            self._schedule(sa)
        else:
            self._scheduled.pop(id(sa), None)  # closed or never kept: its timers end
        now = self.clock()
        for data, addr in sa.datagrams_to_send(now):
            # From the NAT-T port once the SA moved there (our port, not the peer's: behind
            # a NAT the peer's may be anything), with the non-ESP marker (RFC 3948 §2.2).
            self._send(data, addr, sa.local[1] == self.natt_port)

    def hold_sends(self) -> None:
        """Keep every datagram from now on until :meth:`release_sends` (in order): the
        gateway sends the data plane what they depend on first."""
        if self._held is None:
            self._held = []

    def release_sends(self) -> None:
        held, self._held = self._held, None
        for data, addr, natt in held or ():
            self._transmit(data, addr, natt)

    def _send(self, data: bytes, addr: tuple[str, int], natt: bool) -> None:
        if self._held is not None:
            self._held.append((data, addr, natt))
        else:
            self._transmit(data, addr, natt)

    def _transmit(self, data: bytes, addr: tuple[str, int], natt: bool) -> None:
        natt = natt and self._natt is not None
        endpoint = self._natt if natt else self._ike
        if endpoint is None or endpoint.transport is None:
            return
        endpoint.transport.sendto(NON_ESP_MARKER + data if natt else data, addr)
        if len(data) >= IKE_HEADER_LEN:
            self.messages[(data[18], "out",
                           "response" if data[19] & FLAG_RESPONSE else "request")] += 1
