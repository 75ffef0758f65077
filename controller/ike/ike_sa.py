"""One IKE SA, sans-IO (RFC 7296): IKE_SA_INIT and IKE_AUTH with a pre-shared key or X.509
certificates and RFC 7427 signatures (controller/ike/auth.py), and the first Child SA;
CREATE_CHILD_SA for further Child SAs, Child SA rekeys (optionally with PFS) and IKE SA rekeys;
INFORMATIONAL for Deletes and liveness; NAT traversal (RFC 7296 §2.23, RFC 3948); exchange
collisions (§2.8.1, §2.8.2, §2.25); retransmission, rekey, lifetime and dead-peer timers.

Like aioquic's ``QuicConnection`` it owns no socket and no clock: it is driven by
``receive_datagram(data, addr, now)`` and ``handle_timer(now)``, and drained with
``datagrams_to_send(now)``, ``get_timer()`` and ``next_event()``. Randomness (SPIs, nonces,
IVs, key exchange secrets, timer jitter) comes from the ``random`` callable it is given; the
calendar time that certificate validity needs, from ``wall_clock`` (Unix seconds).

One ``IkeSa`` is one connection's IKE SA. A rekey replaces its SPIs, keys and Message IDs in
place (``IkeSaRekeyed``; ``initiator`` then says who started the rekey), while the old IKE SA,
and after a collision a redundant new one, lives on inside it until deleted, answering its
own messages: ``local_spis`` lists every SPI of ours that still reaches this object. Our
requests go out one at a time (window size 1, RFC 7296 §2.3); the others wait in a queue.

Peer input never raises out of ``receive_datagram``: a message that cannot be parsed or
authenticated is dropped and counted in ``dropped`` (RFC 7296 §2.21), and protocol errors
become error notifies in responses, events, or a failed SA.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache

from controller.ike import auth, keyexchange
from controller.ike.child_state import ChildEvent, ChildState, next_child_state
from controller.ike.constants import (
    AuthMethod,
    DhGroup,
    ExchangeType,
    HeaderFlag,
    IdType,
    NotifyType,
    PrfId,
    ProtocolId,
)
from controller.ike.crypto import (
    IkeKeys,
    IkeProposal,
    IkeSuite,
    IntegrityError,
    SkKeys,
    compute_rekey_skeyseed,
    compute_skeyseed,
    decrypt_sk,
    derive_child_sa_keys,
    derive_ike_sa_keys,
    encrypt_sk,
    prf,
    sk_overhead,
)
from controller.ike.errors import AuthenticationFailed, IkeProtocolError
from controller.ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaFailed,
    ChildSaInfo,
    ChildSaRekeyed,
    Event,
    IkeSaClosed,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaRekeyed,
)
from controller.ike.memo import IdentityMemo
from controller.ike.message import (
    GENERIC_PAYLOAD_HEADER_LENGTH,
    IkeHeader,
    Message,
    parse_message,
    parse_payload_chain,
    serialize_message,
    serialize_payload_body,
    serialize_payload_chain,
    serialize_sk_prefix,
)
from controller.ike.payloads import (
    AuthPayload,
    CertPayload,
    DeletePayload,
    EncryptedPayload,
    IdiPayload,
    IdrPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    Proposal,
    SaPayload,
    TrafficSelector,
    TsiPayload,
    TsrPayload,
)
from controller.ike.proposals import (
    ChosenEsp,
    ChosenIke,
    accepted_esp,
    accepted_ike,
    esp_proposals,
    ike_proposals,
    select_esp,
    select_ike,
)
from controller.ike.state import IkeEvent, IkeState, LocalStateError, next_state
from pipeline.satable import Mode
from workers.algorithms import EspTransform

__all__ = [
    "ChildConfig",
    "ChildSaDeleted",
    "ChildSaEstablished",
    "ChildSaFailed",
    "ChildSaInfo",
    "ChildSaRekeyed",
    "Event",
    "IkeConfig",
    "IkeSa",
    "IkeSaClosed",
    "IkeSaEstablished",
    "IkeSaFailed",
    "IkeSaRekeyed",
    "narrow",
]

Address = tuple[str, int]
Selectors = tuple[TrafficSelector, ...]
NONCE_LEN = 32  # RFC 7296 §2.10: at least half the PRF key size; 256 bits for every PRF here
PSK_PAD = b"Key Pad for IKEv2"  # RFC 7296 §2.15
IKE_SPI_LEN = 8
ESP_SPI_LEN = 4
MIN_ESP_SPI = 0x100  # RFC 4303 §2.1: 1..255 reserved
NAT_HASH_LEN = hashlib.sha1().digest_size  # RFC 7296 §2.23: SHA-1
# RFC 7296 §2.8.1: rekeys SHOULD be jittered; like strongSwan, up to 10% before rekey_time.
REKEY_JITTER = 0.10
# RFC 7296 §2.25: after TEMPORARY_FAILURE, "retry later"; the random part keeps two peers
# that collided from colliding again.
RETRY_INTERVAL = 15.0
RETRY_JITTER = 10.0
_RANDOM_FRACTION_BYTES = 4


@dataclass(frozen=True)
class ChildConfig:
    name: str
    esp_proposals: tuple[tuple[EspTransform, bool], ...]  # (transform, esn)
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    mode: Mode = Mode.TUNNEL
    # RFC 7296 §1.3.1: a key exchange in CREATE_CHILD_SA (PFS); IKE_AUTH never has one
    pfs_group: DhGroup | None = None
    rekey_time: float | None = None  # seconds after creation, less up to 10% (jitter)
    life_time: float | None = None  # hard lifetime: the Child SA is deleted then


@dataclass(frozen=True)
class IkeConfig:
    name: str
    proposals: tuple[IkeProposal, ...]
    local_id: tuple[IdType, bytes]
    remote_id: tuple[IdType, bytes] | None  # None: any identity the peer authenticates
    psk: bytes = field(repr=False)  # for whichever side authenticates with a shared key
    child: ChildConfig | None = None  # negotiated in IKE_AUTH when we initiate
    retransmit_timeout: float = 1.0  # first wait; then multiplied by retransmit_base
    retransmit_base: float = 1.8
    retransmit_tries: int = 5
    # strongSwan's ``encap = yes``: fake our NAT_DETECTION_SOURCE_IP hash so that both sides
    # see a NAT and use UDP encapsulation (RFC 3948), NAT or not.
    force_encap: bool = False
    natt_port: int = 4500  # RFC 3948 §2.2: the NAT-T port IKE moves to when a NAT is seen
    # Further Child SAs: created with CREATE_CHILD_SA after IKE_AUTH when we initiate (the
    # first of ``all_children`` goes into IKE_AUTH); as responder, the policies we accept.
    children: tuple[ChildConfig, ...] = ()
    rekey_time: float | None = None  # IKE SA rekey (RFC 7296 §2.18), less up to 10%
    dpd_delay: float | None = None  # an empty INFORMATIONAL after this long without a word
    dpd_timeout: float | None = None  # give that check up after this long (else: retransmits)
    # A responder waiting this long for IKE_AUTH after answering IKE_SA_INIT gives up (a
    # half-open IKE SA, RFC 7296 §2.6; strongSwan's half_open_timeout)
    half_open_timeout: float | None = 30.0
    # Public-key authentication (RFC 7296 §2.15, RFC 7427): our key and certificates (None:
    # we authenticate with ``psk``), and the CAs the peer's certificate must chain to (None:
    # the peer authenticates with ``psk``). Each direction is authenticated on its own.
    credential: auth.Credential | None = None
    trust: auth.TrustAnchors | None = None
    # prf(psk, "Key Pad for IKEv2") by PRF, worked out once (psk_pad_key): as secret as the
    # PSK, and kept with it (a new configuration, a new PSK: a new cache).
    _pad_keys: dict[PrfId, bytes] = field(default_factory=dict, init=False, repr=False,
                                          compare=False, hash=False)

    def psk_pad_key(self, prf_id: PrfId) -> bytes:
        """prf(Shared Secret, "Key Pad for IKEv2") of RFC 7296 §2.15: the same for every
        AUTH with this key and PRF (two per IKE SA set up), so computed once."""
        key = self._pad_keys.get(prf_id)
        if key is None:
            key = self._pad_keys[prf_id] = prf(prf_id, self.psk, PSK_PAD)
        return key

    @property
    def uses_certificates(self) -> bool:
        return self.credential is not None or self.trust is not None

    @property
    def all_children(self) -> tuple[ChildConfig, ...]:
        first = (self.child,) if self.child is not None else ()
        return first + tuple(c for c in self.children if c is not self.child)


def narrow(
    offered: Sequence[TrafficSelector], allowed: Sequence[TrafficSelector]
) -> tuple[TrafficSelector, ...]:
    """The parts of ``offered`` that ``allowed`` covers (RFC 7296 §2.9: the responder narrows
    the initiator's selectors to its policy): range intersections, protocol 0 = any."""
    out = []
    for o in offered:
        for a in allowed:
            if o.start_address.version != a.start_address.version:
                continue
            if o.ip_protocol and a.ip_protocol and o.ip_protocol != a.ip_protocol:
                continue
            # The intersection's bounds are bounds of ``o`` or ``a``: their addresses are reused
            start = max(o.start_address, a.start_address, key=int)
            end = min(o.end_address, a.end_address, key=int)
            lo, hi = max(o.start_port, a.start_port), min(o.end_port, a.end_port)
            if int(start) > int(end) or lo > hi:
                continue
            out.append(TrafficSelector(o.ip_protocol or a.ip_protocol, lo, hi, start, end))
    return tuple(dict.fromkeys(out)) if len(out) > 1 else tuple(out)


def _covered(got: Sequence[TrafficSelector], offered: Sequence[TrafficSelector]) -> bool:
    return all(narrow((g,), offered) == (g,) for g in got)


# -- internal records ----------------------------------------------------------------------
@dataclass(eq=False)
class _ChildExchange:
    """CREATE_CHILD_SA creating a Child SA, or rekeying the one whose inbound SPI is
    ``rekey`` (RFC 7296 §1.3.1, §1.3.3)."""

    config: ChildConfig
    rekey: int | None = None
    rekey_out: int = 0
    group: int | None = None  # the PFS group, from the config
    spi_in: bytes = b""
    ni: bytes = b""
    ke: keyexchange.KePrivate | None = None
    offer: tuple[Selectors, Selectors] = ((), ())
    mode: Mode = Mode.TUNNEL
    # RFC 7296 §2.8.1: the inbound SPI of the SA we created answering the peer's rekey of
    # the same Child SA while ours was out
    collision: int | None = None
    # SPIs the peer deleted while this was out that we did not know: perhaps the SA this
    # exchange creates (the peer installed it on answering; we learn its SPI from the answer)
    peer_deleted: set[int] = field(default_factory=set)


@dataclass(eq=False)
class _DeleteChild:
    """INFORMATIONAL with a Delete for our inbound SPI (RFC 7296 §1.4.1)."""

    spi_in: int
    gone: bool = False  # already removed here (hard lifetime): tell the peer, expect nothing


@dataclass(eq=False)
class _RekeyIke:
    """CREATE_CHILD_SA rekeying the IKE SA (RFC 7296 §1.3.2, §2.18)."""

    group: int | None = None
    spi: bytes = b""
    ni: bytes = b""
    ke: keyexchange.KePrivate | None = None
    collision: _IkeContext | None = None  # RFC 7296 §2.8.2: the peer's new IKE SA


@dataclass(eq=False)
class _DeleteIke:
    """INFORMATIONAL deleting an IKE SA: the connection's, or an old or redundant one."""


@dataclass(eq=False)
class _Dpd:
    """An empty INFORMATIONAL: is the peer alive? (RFC 7296 §1.4)"""


_Task = _ChildExchange | _DeleteChild | _RekeyIke | _DeleteIke | _Dpd


@dataclass(eq=False)
class _IkeContext:
    """One IKE SA's SPIs, keys and message windows (RFC 7296 §2.3)."""

    spi_i: bytes
    spi_r: bytes
    initiator: bool  # we initiated this IKE SA (the I flag, RFC 7296 §3.1)
    suite: IkeSuite | None = None
    keys: IkeKeys | None = None
    group: int | None = None
    ni: bytes = b""
    nr: bytes = b""
    next_mid: int = 0  # our next request's Message ID
    peer_mid: int = 0  # the peer's next request's Message ID
    request: bytes | None = None  # our request awaiting its response
    request_mid: int = -1
    request_exchange: int = 0
    task: _Task | None = None
    tries: int = 0
    timer: float | None = None
    give_up: float | None = None
    last_response: tuple[int, bytes, bytes] | None = None  # (mid, request, response)
    # An old or redundant IKE SA the peer is to delete: forgotten at this time if it does
    # not (its creator may never have seen the response that made it).
    linger: float | None = None

    @property
    def local_spi(self) -> bytes:
        return self.spi_i if self.initiator else self.spi_r


@dataclass(eq=False)
class _Child:
    config: ChildConfig
    sa: ChildSaEstablished
    state: ChildState
    established: float
    ni: bytes  # the nonces of the exchange that created it (RFC 7296 §2.8.1)
    nr: bytes
    rekey_at: float | None = None
    expire_at: float | None = None

    def info(self) -> ChildSaInfo:
        sa = self.sa
        return ChildSaInfo(
            sa.name,
            self.state,
            sa.spi_in,
            sa.spi_out,
            sa.transform,
            sa.esn,
            sa.mode,
            sa.encap,
            sa.local_port,
            sa.remote_port,
            sa.local_ts,
            sa.remote_ts,
            self.established,
            self.rekey_at if self.state is ChildState.INSTALLED else None,
            self.expire_at,
        )


_UP = (IkeState.ESTABLISHED, IkeState.REKEYING, IkeState.DELETING)
_CHILD_TASKS = (_ChildExchange, _DeleteChild)
# The Flags of our messages (RFC 7296 §3.1) by (_IkeContext.initiator: I, a response: R)
_FLAGS = {
    (initiator, response): HeaderFlag(
        (HeaderFlag.INITIATOR if initiator else 0) | (HeaderFlag.RESPONSE if response else 0)
    )
    for initiator in (False, True)
    for response in (False, True)
}


@lru_cache(maxsize=4096)
def _packed_address(address: str) -> bytes:
    """A socket address's IP as on the wire; peers come back, parsing them again is waste."""
    return ipaddress.ip_address(address).packed


class IkeSa:
    def __init__(
        self,
        config: IkeConfig,
        *,
        initiator: bool,
        local: Address,
        remote: Address,
        random: Callable[[int], bytes] = os.urandom,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.wall_clock = wall_clock
        self.original_initiator = initiator
        self.local = local
        self.remote = remote
        self.random = random
        self.state = IkeState.INITIAL
        self.dropped = 0  # messages dropped: unparsable, unauthentic, unexpected
        self._retiring: list[_IkeContext] = []  # old or redundant IKE SAs, until deleted
        self._ctx = _IkeContext(b"", b"", initiator)
        if initiator:
            self._ctx.spi_i = self._new_ike_spi()
        else:
            self._ctx.spi_r = self._new_ike_spi()
        self._events: deque[Event] = deque()
        self._out: deque[tuple[bytes, Address]] = deque()
        self._queue: deque[_Task] = deque()
        self._deferred: list[tuple[float, _Task]] = []
        self._children: dict[int, _Child] = {}  # by inbound SPI
        self._msg1 = self._msg2 = b""
        self._ke: keyexchange.KePrivate | None = None
        self._cookie: bytes | None = None
        self._fake_nat: bytes | None = None
        self._auth_child: tuple[ChildConfig, bytes, tuple[Selectors, Selectors]] | None = None
        self._nat_local = self._nat_remote = False
        self._was_established = False
        self._last_received = 0.0
        self._half_open_until: float | None = None
        self._ike_rekey_at: float | None = None
        # RFC 7427 §4: the hashes the peer verifies signatures with (None: it announced none)
        self._peer_hashes: frozenset[int] | None = None

    # -- what the adapter reads -------------------------------------------------------------
    @property
    def initiator(self) -> bool:
        """We initiated the current IKE SA (after a rekey: we started that rekey)."""
        return self._ctx.initiator

    @property
    def spi_i(self) -> bytes:
        return self._ctx.spi_i

    @property
    def spi_r(self) -> bytes:
        return self._ctx.spi_r

    @property
    def local_spi(self) -> bytes:
        """Our SPI of the current IKE SA: what a peer's messages to it carry for us."""
        return self._ctx.local_spi

    @property
    def local_spis(self) -> tuple[bytes, ...]:
        """Our SPI of every IKE SA this object still answers: the current one first, then
        any old or redundant one of a rekey until its Delete exchange is over."""
        return tuple(c.local_spi for c in (self._ctx, *self._retiring) if c.local_spi)

    @property
    def child_sas(self) -> tuple[ChildSaInfo, ...]:
        """The Child SAs reported established and not yet reported deleted."""
        return tuple(c.info() for c in self._children.values())

    @property
    def encap(self) -> bool:
        """UDP encapsulation (RFC 3948): a NAT was detected on either side, or we fake one."""
        return self._nat_local or self._nat_remote or self.config.force_encap

    @property
    def suite(self) -> IkeSuite | None:
        """The negotiated transforms of the current IKE SA (None before IKE_SA_INIT ends)."""
        return self._ctx.suite

    @property
    def keys(self) -> IkeKeys | None:
        """The current IKE SA's SK_* keys: for the opt-in key log only (DESIGN §6)."""
        return self._ctx.keys

    @property
    def ke_group(self) -> int | None:
        """The key exchange method of the current IKE SA (RFC 7296 §3.3.2, Transform 4)."""
        return self._ctx.group

    # -- the sans-IO surface ----------------------------------------------------------------
    def initiate(self, now: float) -> None:
        """Start IKE_SA_INIT (initiator only)."""
        self._ctx.group = self.config.proposals[0].ke_groups[0]
        self._send_init(now, new_ke=True)
        self._transition(IkeEvent.SEND_INIT)

    def delete(self, now: float) -> None:
        """Delete the IKE SA and its Child SAs (RFC 7296 §1.4.1), after any exchange now out;
        nothing queued behind it is sent."""
        if self.state not in (IkeState.ESTABLISHED, IkeState.REKEYING):
            self._transition(IkeEvent.SEND_DELETE)  # raises: not allowed here
        self._queue.appendleft(_DeleteIke())
        self._kick(now)

    def create_child(self, child: ChildConfig, now: float) -> None:
        """Negotiate a further Child SA with CREATE_CHILD_SA (RFC 7296 §1.3.1)."""
        self._check_alive()
        self._queue.append(_ChildExchange(child, group=child.pfs_group))
        self._kick(now)

    def rekey_child(self, spi_in: int, now: float) -> None:
        """Rekey the Child SA with inbound SPI ``spi_in`` (RFC 7296 §1.3.3); nothing happens
        if it is already being rekeyed or deleted. ``KeyError`` if there is no such SA."""
        self._check_alive()
        child = self._children[spi_in]
        if child.state is ChildState.INSTALLED and not self._rekey_queued(spi_in):
            child.rekey_at = None
            self._queue.append(self._child_rekey_task(child))
            self._kick(now)

    def delete_child(self, spi_in: int, now: float) -> None:
        """Delete the Child SA with inbound SPI ``spi_in`` (RFC 7296 §1.4.1); ``KeyError`` if
        there is no such SA."""
        self._check_alive()
        if self._children[spi_in].state is not ChildState.DELETING:
            self._queue.append(_DeleteChild(spi_in))
            self._kick(now)

    def rekey(self, now: float) -> None:
        """Rekey the IKE SA (RFC 7296 §1.3.2, §2.18); the Child SAs move to the new one."""
        if self.state not in (IkeState.ESTABLISHED, IkeState.REKEYING):
            raise LocalStateError(f"rekey is not allowed in state {self.state.value}")
        self._enqueue_ike_rekey()
        self._kick(now)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        try:
            message = parse_message(data)
        except IkeProtocolError:
            self.dropped += 1  # RFC 7296 §2.21.1: unparsable before authentication: drop
            return
        try:
            self._dispatch(message, data, addr, now)
        except _Drop:
            self.dropped += 1
        self._kick(now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out = list(self._out)
        self._out.clear()
        return out

    def get_timer(self) -> float | None:
        """The earliest of the retransmission, rekey, lifetime, retry and DPD timers."""
        times = [c.timer for c in (self._ctx, *self._retiring) if c.timer is not None]
        times += [c.linger for c in self._retiring if c.linger is not None]
        if self.state is IkeState.INIT_DONE and self._half_open_until is not None:
            times.append(self._half_open_until)
        if self.state in (IkeState.ESTABLISHED, IkeState.REKEYING):
            if self.state is IkeState.ESTABLISHED and self._ike_rekey_at is not None:
                times.append(self._ike_rekey_at)
            for child in self._children.values():
                if child.expire_at is not None:
                    times.append(child.expire_at)
                if child.rekey_at is not None and child.state is ChildState.INSTALLED:
                    times.append(child.rekey_at)
            times += [at for at, _ in self._deferred]
            dpd = self._dpd_due()
            if dpd is not None:
                times.append(dpd)
        return min(times, default=None)

    def handle_timer(self, now: float) -> None:
        if (
            self.state is IkeState.INIT_DONE
            and self._half_open_until is not None
            and now >= self._half_open_until
        ):
            self._fail("half-open: no IKE_AUTH came")
            return
        for ctx in (self._ctx, *self._retiring):
            if ctx.timer is not None and now >= ctx.timer:
                self._retransmit(ctx, now)
            if self.state in (IkeState.CLOSED, IkeState.FAILED):
                return
            if ctx.linger is not None and now >= ctx.linger and ctx in self._retiring:
                self._retiring.remove(ctx)
        if self.state in (IkeState.ESTABLISHED, IkeState.REKEYING):
            self._timers_due(now)
        self._kick(now)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # -- plumbing ---------------------------------------------------------------------------
    def _transition(self, event: IkeEvent) -> None:
        self.state = next_state(self.state, event)

    def _check_alive(self) -> None:
        if self.state in (IkeState.DELETING, IkeState.CLOSED, IkeState.FAILED):
            raise LocalStateError(f"no new exchanges in state {self.state.value}")

    def _fraction(self) -> float:
        """A number in [0, 1) from the SA's random source (timer jitter)."""
        return int.from_bytes(self.random(_RANDOM_FRACTION_BYTES), "big") / (
            1 << (8 * _RANDOM_FRACTION_BYTES)
        )

    def _jittered(self, seconds: float) -> float:
        return seconds - seconds * REKEY_JITTER * self._fraction()

    def _retry_delay(self) -> float:
        return RETRY_INTERVAL + RETRY_JITTER * self._fraction()

    def _fail(self, reason: str, notify: int | None = None) -> None:
        if self.state not in (IkeState.CLOSED, IkeState.FAILED):
            self._transition(IkeEvent.FAIL)
            self._end()
            self._events.append(IkeSaFailed(self.config.name, reason, notify))

    def _close(self, by_peer: bool) -> None:
        self._end()
        self._events.append(IkeSaClosed(self.config.name, by_peer=by_peer))

    def _end(self) -> None:
        """The IKE SA is gone, and its Child SAs with it (RFC 7296 §1.4.1)."""
        for child in list(self._children.values()):
            self._child_event(child, ChildEvent.EXPIRE)
        for ctx in (self._ctx, *self._retiring):
            self._request_done(ctx)
        self._retiring.clear()
        self._queue.clear()
        self._deferred.clear()
        self._ike_rekey_at = None

    def _new_ike_spi(self) -> bytes:
        taken = {c.local_spi for c in (self._ctx, *self._retiring)}
        while True:
            spi = self.random(IKE_SPI_LEN)
            if any(spi) and spi not in taken:
                return spi

    def _new_child_spi(self) -> bytes:
        pending = {
            int.from_bytes(c.task.spi_in, "big")
            for c in (self._ctx, *self._retiring)
            if isinstance(c.task, _ChildExchange) and c.task.spi_in
        }
        while True:
            spi = self.random(ESP_SPI_LEN)
            value = int.from_bytes(spi, "big")
            if value >= MIN_ESP_SPI and value not in self._children and value not in pending:
                return spi

    def _header(
        self, ctx: _IkeContext, exchange: ExchangeType, mid: int, response: bool
    ) -> IkeHeader:
        return IkeHeader(
            spi_i=ctx.spi_i,
            spi_r=ctx.spi_r or bytes(IKE_SPI_LEN),
            exchange_type=exchange,
            flags=_FLAGS[ctx.initiator, response],
            message_id=mid,
        )

    def _seal(self, ctx: _IkeContext, header: IkeHeader, payloads: Sequence[Payload]) -> bytes:
        """An SK-protected message (RFC 7296 §3.14) with our direction's keys."""
        assert ctx.suite is not None and ctx.keys is not None
        first, inner = serialize_payload_chain(payloads)
        sk_len = GENERIC_PAYLOAD_HEADER_LENGTH + len(inner) + sk_overhead(ctx.suite, len(inner))
        aad = serialize_sk_prefix(header, first, sk_len)
        keys = _keys(ctx, outbound=True)
        body = encrypt_sk(ctx.suite, keys, aad, inner, self.random(ctx.suite.iv_len))
        return aad + body

    def _open(self, ctx: _IkeContext, message: Message, data: bytes) -> Message:
        """The message with the inner payloads of its SK payload, or _Drop (RFC 7296 §2.21.2:
        silently)."""
        sk = message.find(EncryptedPayload)
        if sk is None or ctx.suite is None or ctx.keys is None or sk is not message.payloads[-1]:
            raise _Drop
        aad = data[: len(data) - len(sk.data)]
        try:
            inner = decrypt_sk(ctx.suite, _keys(ctx, outbound=False), aad, sk.data)
            return Message(message.header, parse_payload_chain(inner, sk.first_payload))
        except (IntegrityError, IkeProtocolError):
            raise _Drop from None

    def _send_request(
        self,
        ctx: _IkeContext,
        exchange: ExchangeType,
        payloads: Sequence[Payload],
        now: float,
        task: _Task | None,
    ) -> None:
        mid = ctx.next_mid
        ctx.next_mid += 1
        data = self._seal(ctx, self._header(ctx, exchange, mid, False), payloads)
        self._queue_request(ctx, data, mid, exchange, task, now)

    def _queue_request(
        self,
        ctx: _IkeContext,
        data: bytes,
        mid: int,
        exchange: ExchangeType,
        task: _Task | None,
        now: float,
    ) -> None:
        ctx.request, ctx.request_mid, ctx.request_exchange = data, mid, exchange
        ctx.task, ctx.tries, ctx.give_up = task, 0, None
        ctx.timer = now + self.config.retransmit_timeout
        self._out.append((data, self.remote))

    def _request_done(self, ctx: _IkeContext) -> None:
        ctx.request, ctx.timer, ctx.task, ctx.give_up = None, None, None, None

    def _retransmit(self, ctx: _IkeContext, now: float) -> None:
        assert ctx.request is not None
        if ctx.tries >= self.config.retransmit_tries or (
            ctx.give_up is not None and now >= ctx.give_up
        ):
            self._request_done(ctx)
            if ctx is not self._ctx:
                self._retiring.remove(ctx)  # an old or redundant IKE SA: let it go
            elif self._was_established:
                self._fail("dead peer")
            else:
                self._fail("peer did not answer (retransmissions exhausted)")
            return
        ctx.tries += 1
        self._out.append((ctx.request, self.remote))  # RFC 7296 §2.1: same bytes again
        wait = self.config.retransmit_timeout * self.config.retransmit_base**ctx.tries
        ctx.timer = now + wait if ctx.give_up is None else min(now + wait, ctx.give_up)

    def _reply(
        self,
        ctx: _IkeContext,
        request: Message,
        data: bytes,
        payloads: Sequence[Payload],
        addr: Address,
    ) -> None:
        """Answer a request, to where it came from (RFC 7296 §2.11), and cache the answer."""
        h = request.header
        out = self._seal(
            ctx, self._header(ctx, ExchangeType(h.exchange_type), h.message_id, True), payloads
        )
        ctx.peer_mid = h.message_id + 1
        ctx.last_response = (h.message_id, data, out)
        self._out.append((out, addr))

    # -- NAT traversal (RFC 7296 §2.23, RFC 3948) --------------------------------------------
    def _nat_hash(self, spi_r: bytes, addr: Address) -> bytes:
        # RFC 7296 §2.23: SHA-1(SPIi | SPIr | IP | Port)
        ip = _packed_address(addr[0])
        return hashlib.sha1(self.spi_i + spi_r + ip + addr[1].to_bytes(2, "big")).digest()

    def _nat_notifies(self, spi_r: bytes) -> list[Payload]:
        if self.config.force_encap:
            # strongSwan's encap=yes: a source hash that no address produces, so that the
            # peer sees a NAT in front of us and both sides encapsulate.
            if self._fake_nat is None:
                self._fake_nat = self.random(NAT_HASH_LEN)
            source = self._fake_nat
        else:
            source = self._nat_hash(spi_r, self.local)
        return [
            NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, source),
            NotifyPayload(
                NotifyType.NAT_DETECTION_DESTINATION_IP, self._nat_hash(spi_r, self.remote)
            ),
        ]

    def _check_nat(self, message: Message, spi_r: bytes) -> None:
        src = message.notify(NotifyType.NAT_DETECTION_SOURCE_IP)
        dst = message.notify(NotifyType.NAT_DETECTION_DESTINATION_IP)
        if src is not None:
            self._nat_remote = not hmac.compare_digest(src.data, self._nat_hash(spi_r, self.remote))
        if dst is not None:
            self._nat_local = not hmac.compare_digest(dst.data, self._nat_hash(spi_r, self.local))

    def _float_to_natt(self) -> None:
        """RFC 7296 §2.23: with a NAT detected, the initiator moves to the NAT-T port for
        IKE_AUTH and everything after it (RFC 3948 §2.2: with the non-ESP marker)."""
        port = self.config.natt_port
        self.local = (self.local[0], port)
        self.remote = (self.remote[0], port)

    def _peer_seen(self, addr: Address, now: float) -> None:
        """A new authenticated message came from ``addr``.

        RFC 7296 §2.23: behind a NAT, the peer's address and port are those of its last
        valid authenticated message (never a retransmitted one, whose reply comes from the
        cache). The responder learns here that the initiator moved to the NAT-T port: past
        IKE_SA_INIT with a NAT detected, the initiator MUST send from it."""
        self._last_received = now
        if self.encap:
            self.remote = addr
            if self.local[1] != self.config.natt_port:
                self.local = (self.local[0], self.config.natt_port)

    # -- keys ---------------------------------------------------------------------------------
    def _derive(self, ctx: _IkeContext, chosen: ChosenIke, g_ir: bytes) -> None:
        suite = chosen.config.suite
        skeyseed = compute_skeyseed(suite.prf, ctx.ni, ctx.nr, g_ir)
        ctx.suite, ctx.group = suite, chosen.group
        ctx.keys = derive_ike_sa_keys(suite, skeyseed, ctx.ni, ctx.nr, ctx.spi_i, ctx.spi_r)

    def _derive_rekeyed(
        self, old: _IkeContext, new: _IkeContext, chosen: ChosenIke, g_ir: bytes
    ) -> None:
        # RFC 7296 §2.18: SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) with the old PRF;
        # the keys from it as in §2.14 with the new SPIs, nonces and PRF.
        assert old.suite is not None and old.keys is not None
        skeyseed = compute_rekey_skeyseed(old.suite.prf, old.keys.sk_d, g_ir, new.ni, new.nr)
        suite = chosen.config.suite
        new.suite, new.group = suite, chosen.group
        new.keys = derive_ike_sa_keys(suite, skeyseed, new.ni, new.nr, new.spi_i, new.spi_r)

    def _signed_octets(
        self, ctx: _IkeContext, message: bytes, nonce: bytes, id_payload: Payload, sk_p: bytes
    ) -> bytes:
        """RFC 7296 §2.15: InitiatorSignedOctets = RealMessage1 | NonceRData | MACedIDForI
        (and the responder's likewise), MACedID = prf(SK_p, RestOfIDPayload)."""
        assert ctx.suite is not None
        return message + nonce + prf(ctx.suite.prf, sk_p, serialize_payload_body(id_payload))

    def _psk_auth(self, ctx: _IkeContext, octets: bytes) -> bytes:
        """AUTH for a shared key (RFC 7296 §2.15): prf(prf(key, pad), signed octets)."""
        assert ctx.suite is not None
        return prf(ctx.suite.prf, self.config.psk_pad_key(ctx.suite.prf), octets)

    def _our_auth(self, ctx: _IkeContext, octets: bytes) -> AuthPayload:
        """Our AUTH payload; ``AuthenticationFailed`` if our key cannot sign for this peer."""
        credential = self.config.credential
        if credential is None:
            method = AuthMethod.SHARED_KEY_MESSAGE_INTEGRITY_CODE
            return AuthPayload(method, self._psk_auth(ctx, octets))
        return auth.sign(credential, octets, self._peer_hashes)

    def _peer_auth_problem(
        self, ctx: _IkeContext, inner: Message, id_payload: IdiPayload | IdrPayload,
        octets: bytes,
    ) -> str | None:
        """Why the peer's IKE_AUTH message does not authenticate it, or None (RFC 7296
        §2.15; with certificates RFC 7427 and auth.py's checks)."""
        payload = inner.find(AuthPayload)
        if payload is None:
            return "no AUTH payload"
        if not self._id_ok(id_payload):
            return f"peer's identity {_id_text(id_payload)} is not the one configured"
        trust = self.config.trust
        psk_method = AuthMethod.SHARED_KEY_MESSAGE_INTEGRITY_CODE
        if trust is None:
            if payload.method != psk_method:
                return f"peer used AUTH method {payload.method}; we expect a pre-shared key"
            if not hmac.compare_digest(payload.data, self._psk_auth(ctx, octets)):
                return "peer's AUTH payload did not verify"
            return None
        if payload.method == psk_method:
            return "peer used a pre-shared key; we expect a certificate"
        try:
            when = datetime.fromtimestamp(self.wall_clock(), UTC)
            cert = auth.validate_chain(inner.find_all(CertPayload), trust, when)
            auth.check_identity(id_payload.id_type, id_payload.data, cert, _id_text(id_payload))
            auth.verify(cert.public_key(), payload, octets)
        except AuthenticationFailed as exc:
            return exc.reason
        return None

    def _note_peer_hashes(self, message: Message) -> None:
        notify = message.notify(NotifyType.SIGNATURE_HASH_ALGORITHMS)
        if notify is not None:
            self._peer_hashes = auth.parse_hash_algorithms(notify.data)  # RFC 7427 §4

    # -- the message loop -------------------------------------------------------------------
    def _context_for(self, h: IkeHeader) -> _IkeContext | None:
        ctx = self._ctx
        if h.exchange_type == ExchangeType.IKE_SA_INIT:
            # RFC 7296 §2.6: the responder's SPI is zero in the request, new in the response
            if not h.is_response and not ctx.initiator and not any(h.spi_r):
                return ctx if ctx.spi_i in (b"", h.spi_i) else None
            if h.is_response and ctx.initiator and h.spi_i == ctx.spi_i:
                return ctx if self.state is IkeState.INIT_SENT else None
        for c in (ctx, *self._retiring):
            if c.spi_i == h.spi_i and c.spi_r == h.spi_r and c.spi_r:
                return c
        return None

    def _dispatch(self, message: Message, data: bytes, addr: Address, now: float) -> None:
        h = message.header
        ctx = self._context_for(h)
        # RFC 7296 §3.1: the I flag marks messages from the original initiator of that IKE SA
        if ctx is None or h.is_initiator == ctx.initiator:
            raise _Drop
        if h.is_response:
            self._on_response(ctx, message, data, addr, now)
        else:
            self._on_request(ctx, message, data, addr, now)

    def _on_response(
        self, ctx: _IkeContext, message: Message, data: bytes, addr: Address, now: float
    ) -> None:
        h = message.header
        if (
            ctx.request is None
            or h.message_id != ctx.request_mid
            or h.exchange_type != ctx.request_exchange
        ):
            raise _Drop  # RFC 7296 §2.2: not the response we wait for
        if h.exchange_type == ExchangeType.IKE_SA_INIT:
            self._on_init_response(message, data, now)
            return
        inner = self._open(ctx, message, data)
        self._peer_seen(addr, now)
        task = ctx.task
        self._request_done(ctx)
        if h.exchange_type == ExchangeType.IKE_AUTH:
            self._on_auth_response(inner, now)
            return
        match task:
            case _ChildExchange():
                self._on_child_response(ctx, task, inner, now)
            case _DeleteChild():
                self._on_delete_child_response(task)
            case _RekeyIke():
                self._on_ike_rekey_response(ctx, task, inner, now)
            case _DeleteIke():
                if ctx is self._ctx:
                    self._transition(IkeEvent.DELETE_RESPONSE)
                    self._close(by_peer=False)
                elif ctx in self._retiring:
                    self._retiring.remove(ctx)
            case _Dpd() | None:
                pass  # alive: _peer_seen noted it

    def _on_request(
        self, ctx: _IkeContext, message: Message, data: bytes, addr: Address, now: float
    ) -> None:
        h = message.header
        cached = ctx.last_response
        if cached is not None and h.message_id == cached[0]:
            if data == cached[1]:
                self._out.append((cached[2], addr))  # RFC 7296 §2.1: the same answer again
            return
        if h.message_id != ctx.peer_mid:
            raise _Drop  # RFC 7296 §2.3: outside the window
        if h.exchange_type == ExchangeType.IKE_SA_INIT:
            if self.state is not IkeState.INITIAL or ctx.initiator:
                raise _Drop
            self.remote = addr  # RFC 7296 §2.11: answer where the request came from
            self._on_init_request(message, data, now)
            return
        if h.exchange_type == ExchangeType.IKE_AUTH:
            if self.state is not IkeState.INIT_DONE:
                raise _Drop
            inner = self._open(ctx, message, data)
            self._peer_seen(addr, now)
            self._on_auth_request(inner, data, addr, now)
        elif h.exchange_type == ExchangeType.CREATE_CHILD_SA and self.state in _UP:
            inner = self._open(ctx, message, data)
            self._peer_seen(addr, now)
            self._reply(ctx, inner, data, self._on_create_child_sa(ctx, inner, now), addr)
        elif h.exchange_type == ExchangeType.INFORMATIONAL and self.state in _UP:
            inner = self._open(ctx, message, data)
            self._peer_seen(addr, now)
            self._on_informational(ctx, inner, data, addr, now)
        else:
            raise _Drop

    # -- the queue of our requests (window size 1, RFC 7296 §2.3) ---------------------------
    def _kick(self, now: float) -> None:
        while self.state is IkeState.ESTABLISHED and self._ctx.request is None and self._queue:
            self._start(self._queue.popleft(), now)

    def _start(self, task: _Task, now: float) -> None:
        """Send ``task``'s request on the current IKE SA, unless events made it moot."""
        ctx = self._ctx
        match task:
            case _ChildExchange():
                self._start_child(ctx, task, now)
            case _DeleteChild():
                if not task.gone:
                    child = self._children.get(task.spi_in)
                    if child is None or child.state is ChildState.DELETING:
                        return
                    self._child_event(child, ChildEvent.SEND_DELETE)
                delete = DeletePayload(ProtocolId.ESP, (task.spi_in,))
                self._send_request(ctx, ExchangeType.INFORMATIONAL, [delete], now, task)
            case _RekeyIke():
                self._start_ike_rekey(ctx, task, now)
            case _DeleteIke():
                self._transition(IkeEvent.SEND_DELETE)
                self._queue.clear()  # RFC 7296 §2.8: the Delete is the last request
                self._deferred.clear()
                delete = DeletePayload(ProtocolId.IKE)
                self._send_request(ctx, ExchangeType.INFORMATIONAL, [delete], now, task)
            case _Dpd():
                self._send_request(ctx, ExchangeType.INFORMATIONAL, [], now, task)
                if self.config.dpd_timeout is not None:
                    ctx.give_up = now + self.config.dpd_timeout

    def _await_peer_delete(self, ctx: _IkeContext, now: float) -> None:
        """Keep ``ctx`` answering (its Delete, retransmissions) for as long as the peer's
        retransmissions of them can last, twice over; then let it go."""
        c = self.config
        span = sum(
            c.retransmit_timeout * c.retransmit_base**k for k in range(c.retransmit_tries + 1)
        )
        ctx.linger = now + 2 * span
        if ctx not in self._retiring:
            self._retiring.append(ctx)

    def _send_delete_on(self, ctx: _IkeContext, now: float) -> None:
        """Delete an old or redundant IKE SA of this connection (RFC 7296 §2.8: the Delete is
        the last request on it)."""
        assert ctx.request is None
        delete = DeletePayload(ProtocolId.IKE)
        self._send_request(ctx, ExchangeType.INFORMATIONAL, [delete], now, _DeleteIke())

    # -- timers -----------------------------------------------------------------------------
    def _dpd_due(self) -> float | None:
        if (
            self.config.dpd_delay is None
            or self.state is not IkeState.ESTABLISHED
            or self._ctx.request is not None
            or self._queue
        ):
            return None
        return self._last_received + self.config.dpd_delay

    def _timers_due(self, now: float) -> None:
        if (
            self.state is IkeState.ESTABLISHED
            and self._ike_rekey_at is not None
            and now >= self._ike_rekey_at
        ):
            self._ike_rekey_at = None
            self._enqueue_ike_rekey()
        for child in list(self._children.values()):
            if child.expire_at is not None and now >= child.expire_at:
                self._expire(child)
            elif (
                child.rekey_at is not None
                and now >= child.rekey_at
                and child.state is ChildState.INSTALLED
            ):
                child.rekey_at = None
                if not self._rekey_queued(child.sa.spi_in):
                    self._queue.append(self._child_rekey_task(child))
        due = [entry for entry in self._deferred if entry[0] <= now]
        for entry in due:
            self._deferred.remove(entry)
            if not isinstance(entry[1], _RekeyIke):
                self._queue.append(entry[1])
            elif self.state is IkeState.ESTABLISHED:
                self._enqueue_ike_rekey()
        dpd = self._dpd_due()
        if dpd is not None and now >= dpd:
            self._queue.append(_Dpd())  # RFC 7296 §1.4: liveness check

    def _expire(self, child: _Child) -> None:
        """Hard lifetime: the Child SA is gone here; the peer is told (RFC 7296 §1.4.1)."""
        tell = child.state is not ChildState.DELETING
        self._child_event(child, ChildEvent.EXPIRE)
        if tell:
            self._queue.appendleft(_DeleteChild(child.sa.spi_in, gone=True))

    def _enqueue_ike_rekey(self) -> None:
        if self.state is IkeState.ESTABLISHED and not any(
            isinstance(t, _RekeyIke) for t in self._queue
        ):
            self._queue.append(_RekeyIke())

    def _rekey_queued(self, spi_in: int) -> bool:
        return any(isinstance(t, _ChildExchange) and t.rekey == spi_in for t in self._queue)

    def _child_rekey_task(self, child: _Child) -> _ChildExchange:
        return _ChildExchange(
            child.config,
            rekey=child.sa.spi_in,
            rekey_out=child.sa.spi_out,
            group=child.config.pfs_group,
        )

    # -- Child SA records ---------------------------------------------------------------------
    def _child_event(self, child: _Child, event: ChildEvent) -> None:
        child.state = next_child_state(child.state, event)
        if child.state is ChildState.DELETED:
            del self._children[child.sa.spi_in]
            self._events.append(ChildSaDeleted(child.sa.name, child.sa.spi_in, child.sa.spi_out))

    def _child_by_out(self, spi_out: int) -> _Child | None:
        return next((c for c in self._children.values() if c.sa.spi_out == spi_out), None)

    def _new_child(
        self,
        ctx: _IkeContext,
        config: ChildConfig,
        chosen: ChosenEsp,
        tsi: Sequence[TrafficSelector],
        tsr: Sequence[TrafficSelector],
        mode: Mode,
        nonces: tuple[bytes, bytes],
        g_ir: bytes | None,
        spi_in: bytes,
        we_initiated: bool,
        now: float,
    ) -> _Child:
        """Install a Child SA whose keys are now known. RFC 7296 §2.17: KEYMAT from SK_d
        and this exchange's nonces (and g^ir with PFS); the initiator-to-responder keys
        first, 'initiator' meaning that of this exchange, as for TSi/TSr (§2.9)."""
        assert ctx.suite is not None and ctx.keys is not None
        ni, nr = nonces
        keys = derive_child_sa_keys(ctx.suite.prf, ctx.keys.sk_d, ni, nr, chosen.transform, g_ir)
        if we_initiated:
            keys_in = (keys.encr_r2i, keys.integ_r2i)
            keys_out = (keys.encr_i2r, keys.integ_i2r)
            local_ts, remote_ts = tsi, tsr
        else:
            keys_in = (keys.encr_i2r, keys.integ_i2r)
            keys_out = (keys.encr_r2i, keys.integ_r2i)
            local_ts, remote_ts = tsr, tsi
        encap, natt = self.encap, self.config.natt_port
        sa = ChildSaEstablished(
            config.name,
            mode,
            chosen.transform,
            chosen.esn,
            int.from_bytes(spi_in, "big"),
            int.from_bytes(chosen.peer_spi, "big"),
            keys_in[0],
            keys_in[1],
            keys_out[0],
            keys_out[1],
            tuple(local_ts),
            tuple(remote_ts),
            encap,
            self.local[1] if encap else natt,
            self.remote[1] if encap else natt,
        )
        child = _Child(config, sa, ChildState.INSTALLED, now, ni, nr)
        if config.rekey_time is not None:
            child.rekey_at = now + self._jittered(config.rekey_time)
        if config.life_time is not None:
            child.expire_at = now + config.life_time
        self._children[sa.spi_in] = child
        return child

    # -- IKE_SA_INIT and IKE_AUTH ---------------------------------------------------------
    def _send_init(self, now: float, new_ke: bool) -> None:
        ctx = self._ctx
        assert ctx.group is not None
        if new_ke or self._ke is None:
            self._ke = keyexchange.generate(DhGroup(ctx.group), self.random)
        ctx.ni = ctx.ni or self.random(NONCE_LEN)
        payloads: list[Payload] = []
        if self._cookie is not None:
            payloads.append(NotifyPayload(NotifyType.COOKIE, self._cookie))  # RFC 7296 §2.6
        payloads += [
            ike_proposals(self.config.proposals),
            KePayload(ctx.group, keyexchange.public_bytes(self._ke)),
            NoncePayload(ctx.ni),
            *self._nat_notifies(bytes(IKE_SPI_LEN)),
        ]
        if self.config.uses_certificates:
            payloads.append(auth.signature_hash_algorithms())  # RFC 7427 §4
        self._msg1 = serialize_message(
            Message(self._header(ctx, ExchangeType.IKE_SA_INIT, 0, False), tuple(payloads))
        )
        ctx.next_mid = 1
        self._queue_request(ctx, self._msg1, 0, ExchangeType.IKE_SA_INIT, None, now)

    def _on_init_response(self, message: Message, data: bytes, now: float) -> None:
        ctx = self._ctx
        cookie = message.notify(NotifyType.COOKIE)
        if cookie is not None:
            # RFC 7296 §2.6: again, the cookie first and the other payloads unchanged
            self._cookie = cookie.data
            self._send_init(now, new_ke=False)
            self._transition(IkeEvent.RETRY_INIT)
            return
        invalid_ke = message.notify(NotifyType.INVALID_KE_PAYLOAD)
        if invalid_ke is not None and len(invalid_ke.data) == 2:
            group = int.from_bytes(invalid_ke.data, "big")
            offered = {g for p in self.config.proposals for g in p.ke_groups}
            if group in offered and group != ctx.group:
                ctx.group = group  # RFC 7296 §1.3: the group the responder asks for
                self._send_init(now, new_ke=True)
                self._transition(IkeEvent.RETRY_INIT)
                return
            self._request_done(ctx)
            self._fail(
                "peer asked for a key exchange group we did not offer",
                NotifyType.INVALID_KE_PAYLOAD,
            )
            return
        error = _error_notify(message)
        if error is not None:
            self._request_done(ctx)
            self._fail(f"peer refused IKE_SA_INIT: {error.name}", error)
            return
        sa, ke, nonce = message.find(SaPayload), message.find(KePayload), message.find(NoncePayload)
        chosen = accepted_ike(sa, self.config.proposals) if sa is not None else None
        if (
            chosen is None
            or ke is None
            or nonce is None
            or ke.group != ctx.group
            or len(message.header.spi_r) != IKE_SPI_LEN
            or not any(message.header.spi_r)
        ):
            raise _Drop
        assert self._ke is not None
        try:
            g_ir = keyexchange.shared_secret(self._ke, ke.data)
        except keyexchange.InvalidKeyExchange:
            raise _Drop from None
        self._request_done(ctx)
        ctx.spi_r = message.header.spi_r
        ctx.nr, self._msg2 = nonce.nonce, data
        self._note_peer_hashes(message)
        self._check_nat(message, ctx.spi_r)
        if self.encap:
            self._float_to_natt()
        self._derive(ctx, chosen, g_ir)
        self._transition(IkeEvent.INIT_RESPONSE)
        self._send_auth(now)

    def _send_auth(self, now: float) -> None:
        ctx = self._ctx
        assert ctx.keys is not None
        id_type, id_data = self.config.local_id
        idi = IdiPayload(id_type, id_data)
        try:
            our_auth = self._our_auth(
                ctx, self._signed_octets(ctx, self._msg1, ctx.nr, idi, ctx.keys.sk_pi)
            )
        except AuthenticationFailed as exc:
            self._fail(f"cannot authenticate to the peer: {exc.reason}")
            return
        # RFC 7296 §1.2: IDi, [CERT,] [CERTREQ,] [IDr,] AUTH, SAi2, TSi, TSr
        payloads: list[Payload] = [idi]
        if self.config.credential is not None:
            payloads += auth.cert_payloads(self.config.credential)
        if self.config.trust is not None:
            payloads.append(self.config.trust.certreq())
        if self.config.remote_id is not None:
            payloads.append(IdrPayload(*self.config.remote_id))
        payloads.append(our_auth)
        children = self.config.all_children
        if children:
            child = children[0]
            spi = self._new_child_spi()
            self._auth_child = (child, spi, (child.local_ts, child.remote_ts))
            if child.mode is Mode.TRANSPORT:
                payloads.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
            payloads += [
                # RFC 7296 §1.2: no key exchange in IKE_AUTH, so no KE transform either
                esp_proposals(child.esp_proposals, spi),
                TsiPayload(child.local_ts),
                TsrPayload(child.remote_ts),
            ]
        self._send_request(ctx, ExchangeType.IKE_AUTH, payloads, now, None)

    def _on_auth_response(self, inner: Message, now: float) -> None:
        ctx = self._ctx
        error = _error_notify(inner)
        idr, auth_payload = inner.find(IdrPayload), inner.find(AuthPayload)
        if error is not None and (idr is None or auth_payload is None):
            self._fail(f"peer refused IKE_AUTH: {error.name}", error)
            return
        assert ctx.keys is not None
        problem = (
            "no IDr payload"
            if idr is None
            else self._peer_auth_problem(
                ctx, inner, idr, self._signed_octets(ctx, self._msg2, ctx.ni, idr, ctx.keys.sk_pr)
            )
        )
        if problem is not None:
            self._fail(problem, NotifyType.AUTHENTICATION_FAILED)
            return
        self._transition(IkeEvent.AUTH_RESPONSE)
        self._established(now)
        for further in self.config.all_children[1:]:
            self._queue.append(_ChildExchange(further, group=further.pfs_group))
        if self._auth_child is None:
            return
        child, spi, (offer_i, offer_r) = self._auth_child
        if error is not None:
            # RFC 7296 §2.21.1: the IKE SA stands, only the Child SA was refused
            self._events.append(ChildSaFailed(child.name, f"Child SA refused: {error.name}", error))
            return
        sa, tsi, tsr = inner.find(SaPayload), inner.find(TsiPayload), inner.find(TsrPayload)
        chosen = accepted_esp(sa, child.esp_proposals) if sa is not None else None
        if (
            chosen is None
            or tsi is None
            or tsr is None
            or not _all_ranges(tsi, tsr)
            or not _covered(_ranges(tsi), offer_i)
            or not _covered(_ranges(tsr), offer_r)
        ):
            self._events.append(ChildSaFailed(child.name, "unacceptable Child SA in response"))
            return
        transport = inner.notify(NotifyType.USE_TRANSPORT_MODE) is not None
        installed = self._new_child(
            ctx,
            child,
            chosen,
            _ranges(tsi),
            _ranges(tsr),
            Mode.TRANSPORT if transport else Mode.TUNNEL,
            (ctx.ni, ctx.nr),
            None,
            spi,
            True,
            now,
        )
        self._events.append(installed.sa)

    def _id_ok(self, got: IdiPayload | IdrPayload) -> bool:
        want = self.config.remote_id
        if want is None:
            return True
        if got.id_type != want[0]:
            return False
        if want[0] == IdType.ID_DER_ASN1_DN:
            return auth.dn_equal(got.data, want[1])  # the same name in other string types
        return hmac.compare_digest(got.data, want[1])

    def _established(self, now: float) -> None:
        self._was_established = True
        self._last_received = now
        self._schedule_ike_rekey(now)
        self._events.append(
            IkeSaEstablished(
                self.config.name,
                self.spi_i,
                self.spi_r,
                self.initiator,
                self._nat_local,
                self._nat_remote,
                self.encap,
            )
        )

    def _schedule_ike_rekey(self, now: float) -> None:
        rekey_time = self.config.rekey_time
        self._ike_rekey_at = None if rekey_time is None else now + self._jittered(rekey_time)

    def _stateless_error(self, message: Message, notify: NotifyType, payload: bytes = b"") -> None:
        """An IKE_SA_INIT error response; no state kept (RFC 7296 §2.6, §1.3)."""
        h = message.header
        reply = Message(
            IkeHeader(
                spi_i=h.spi_i,
                spi_r=bytes(IKE_SPI_LEN),
                exchange_type=ExchangeType.IKE_SA_INIT,
                flags=HeaderFlag.RESPONSE,
                message_id=0,
            ),
            (NotifyPayload(notify, payload),),
        )
        self._out.append((serialize_message(reply), self.remote))

    def _on_init_request(self, message: Message, data: bytes, now: float) -> None:
        ctx = self._ctx
        sa, ke, nonce = message.find(SaPayload), message.find(KePayload), message.find(NoncePayload)
        if sa is None or ke is None or nonce is None:
            self._stateless_error(message, NotifyType.INVALID_SYNTAX)
            return
        chosen = select_ike(sa, self.config.proposals, ke.group)
        if chosen is None:
            self._stateless_error(message, NotifyType.NO_PROPOSAL_CHOSEN)
            return
        if chosen.group != ke.group:
            self._stateless_error(
                message, NotifyType.INVALID_KE_PAYLOAD, int(chosen.group).to_bytes(2, "big")
            )
            return
        self._ke = keyexchange.generate(chosen.group, self.random)
        try:
            g_ir = keyexchange.shared_secret(self._ke, ke.data)
        except keyexchange.InvalidKeyExchange:
            self._stateless_error(message, NotifyType.INVALID_SYNTAX)
            return
        ctx.spi_i = message.header.spi_i
        ctx.ni, ctx.nr, self._msg1 = nonce.nonce, self.random(NONCE_LEN), data
        self._note_peer_hashes(message)
        self._check_nat(message, bytes(IKE_SPI_LEN))
        payloads: list[Payload] = [
            SaPayload((chosen.proposal,)),
            KePayload(chosen.group, keyexchange.public_bytes(self._ke)),
            NoncePayload(ctx.nr),
            *self._nat_notifies(ctx.spi_r),
        ]
        if self.config.uses_certificates:
            payloads.append(auth.signature_hash_algorithms())  # RFC 7427 §4
        if self.config.trust is not None:
            payloads.append(self.config.trust.certreq())  # RFC 7296 §1.2: [CERTREQ]
        reply = Message(self._header(ctx, ExchangeType.IKE_SA_INIT, 0, True), tuple(payloads))
        self._msg2 = serialize_message(reply)
        self._derive(ctx, chosen, g_ir)
        ctx.peer_mid = 1
        ctx.last_response = (0, data, self._msg2)
        self._transition(IkeEvent.INIT_REQUEST)
        if self.config.half_open_timeout is not None:
            self._half_open_until = now + self.config.half_open_timeout
        self._out.append((self._msg2, self.remote))

    def _select_child(
        self,
        sa: SaPayload,
        tsi: TsiPayload | None,
        tsr: TsrPayload | None,
        candidates: Sequence[ChildConfig],
        *,
        ike_auth: bool,
    ) -> tuple[ChildConfig, ChosenEsp, Selectors, Selectors] | NotifyType:
        """The first of our Child SA policies whose selectors cover part of the offered ones
        (narrowed, RFC 7296 §2.9) and one of whose proposals is offered (§2.7)."""
        selectors_fit = False
        for config in candidates:
            nar_i = _narrowed(tsi, config.remote_ts)
            nar_r = _narrowed(tsr, config.local_ts)
            if not nar_i or not nar_r:
                continue
            selectors_fit = True
            group = None if ike_auth else config.pfs_group
            chosen = select_esp(sa, config.esp_proposals, group, ignore_ke=ike_auth)
            if chosen is not None:
                return config, chosen, nar_i, nar_r
        return NotifyType.NO_PROPOSAL_CHOSEN if selectors_fit else NotifyType.TS_UNACCEPTABLE

    def _on_auth_request(self, inner: Message, data: bytes, addr: Address, now: float) -> None:
        ctx = self._ctx
        idi = inner.find(IdiPayload)
        assert ctx.keys is not None
        problem = (
            "no IDi payload"
            if idi is None
            else self._peer_auth_problem(
                ctx, inner, idi, self._signed_octets(ctx, self._msg1, ctx.nr, idi, ctx.keys.sk_pi)
            )
        )
        id_type, id_data = self.config.local_id
        idr = IdrPayload(id_type, id_data)
        our_auth: AuthPayload | None = None
        if problem is None:
            try:
                our_auth = self._our_auth(
                    ctx, self._signed_octets(ctx, self._msg2, ctx.ni, idr, ctx.keys.sk_pr)
                )
            except AuthenticationFailed as exc:
                problem = f"cannot authenticate to the peer: {exc.reason}"
        if problem is not None or our_auth is None:
            # RFC 7296 §2.21.2: AUTHENTICATION_FAILED in the response, then the SA is gone.
            self._reply(ctx, inner, data, [NotifyPayload(NotifyType.AUTHENTICATION_FAILED)], addr)
            self._fail(problem or "no AUTH", NotifyType.AUTHENTICATION_FAILED)
            return
        # RFC 7296 §1.2: IDr, [CERT,] AUTH, SAr2, TSi, TSr
        payloads: list[Payload] = [idr]
        if self.config.credential is not None:
            payloads += auth.cert_payloads(self.config.credential)
        payloads.append(our_auth)
        install: tuple[ChildConfig, ChosenEsp, Selectors, Selectors, Mode, bytes] | None = None
        sa, tsi, tsr = inner.find(SaPayload), inner.find(TsiPayload), inner.find(TsrPayload)
        if sa is not None:
            picked = self._select_child(sa, tsi, tsr, self.config.all_children, ike_auth=True)
            if isinstance(picked, NotifyType):
                payloads.append(NotifyPayload(picked))
            else:
                child, chosen, nar_i, nar_r = picked
                spi = self._new_child_spi()
                transport = inner.notify(NotifyType.USE_TRANSPORT_MODE) is not None
                mode = Mode.TRANSPORT if transport and child.mode is Mode.TRANSPORT else Mode.TUNNEL
                if mode is Mode.TRANSPORT:
                    payloads.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
                payloads += [_answer(chosen, spi), TsiPayload(nar_i), TsrPayload(nar_r)]
                install = (child, chosen, nar_i, nar_r, mode, spi)
        self._reply(ctx, inner, data, payloads, addr)
        self._transition(IkeEvent.AUTH_REQUEST)
        self._established(now)
        if install is not None:
            child, chosen, nar_i, nar_r, mode, spi = install
            nonces = (ctx.ni, ctx.nr)
            installed = self._new_child(
                ctx, child, chosen, nar_i, nar_r, mode, nonces, None, spi, False, now
            )
            self._events.append(installed.sa)

    # -- CREATE_CHILD_SA: Child SAs (RFC 7296 §1.3.1, §1.3.3) -------------------------------
    def _start_child(self, ctx: _IkeContext, task: _ChildExchange, now: float) -> None:
        old = None
        if task.rekey is not None:
            old = self._children.get(task.rekey)
            if old is None or old.state is not ChildState.INSTALLED:
                return  # rekeyed by the peer meanwhile, or deleted
            # RFC 7296 §2.8: the new SA SHOULD have the same selectors and mode
            task.offer = (old.sa.local_ts, old.sa.remote_ts)
            task.mode = old.sa.mode
        else:
            task.offer = (task.config.local_ts, task.config.remote_ts)
            task.mode = task.config.mode
        task.spi_in = self._new_child_spi()
        task.ni = self.random(NONCE_LEN)
        payloads: list[Payload] = []
        if old is not None:
            # RFC 7296 §1.3.3: the SA being rekeyed, by the SPI the peer sends to (our inbound)
            spi = old.sa.spi_in.to_bytes(ESP_SPI_LEN, "big")
            payloads.append(NotifyPayload(NotifyType.REKEY_SA, b"", ProtocolId.ESP, spi))
        if task.mode is Mode.TRANSPORT:
            payloads.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
        payloads += [
            esp_proposals(task.config.esp_proposals, task.spi_in, task.group),
            NoncePayload(task.ni),
        ]
        if task.group is not None:
            task.ke = keyexchange.generate(DhGroup(task.group), self.random)
            payloads.append(KePayload(task.group, keyexchange.public_bytes(task.ke)))
        payloads += [TsiPayload(task.offer[0]), TsrPayload(task.offer[1])]
        if old is not None:
            self._child_event(old, ChildEvent.SEND_REKEY)
        self._send_request(ctx, ExchangeType.CREATE_CHILD_SA, payloads, now, task)

    def _on_child_response(
        self, ctx: _IkeContext, task: _ChildExchange, inner: Message, now: float
    ) -> None:
        config = task.config
        old = self._children.get(task.rekey) if task.rekey is not None else None
        error = _error_notify(inner)
        if error is not None:
            self._child_refused(task, old, error, now)
            return
        sa, nonce, ke = inner.find(SaPayload), inner.find(NoncePayload), inner.find(KePayload)
        tsi, tsr = inner.find(TsiPayload), inner.find(TsrPayload)
        chosen = accepted_esp(sa, config.esp_proposals, task.group) if sa is not None else None
        g_ir: bytes | None = None
        problem = None
        if (
            chosen is None
            or nonce is None
            or tsi is None
            or tsr is None
            or not _all_ranges(tsi, tsr)
            or not _covered(_ranges(tsi), task.offer[0])
            or not _covered(_ranges(tsr), task.offer[1])
        ):
            problem = "unacceptable Child SA in response"
        elif task.group is not None:
            assert task.ke is not None
            try:
                if ke is None or ke.group != task.group:
                    raise keyexchange.InvalidKeyExchange("no KE payload of our group")
                g_ir = keyexchange.shared_secret(task.ke, ke.data)
            except keyexchange.InvalidKeyExchange as exc:
                problem = f"unacceptable KE payload in response: {exc}"
        if problem is not None or chosen is None or nonce is None:
            if old is not None and old.state is ChildState.REKEYING:
                self._child_event(old, ChildEvent.REKEY_FAILED)
            self._events.append(ChildSaFailed(config.name, problem or "no Child SA"))
            if chosen is not None:
                # The peer installed an SA we will not use: have it deleted (RFC 7296 §1.4.1)
                spi = int.from_bytes(task.spi_in, "big")
                self._queue.appendleft(_DeleteChild(spi, gone=True))
            return
        transport = inner.notify(NotifyType.USE_TRANSPORT_MODE) is not None
        child = self._new_child(
            ctx,
            config,
            chosen,
            _ranges(tsi),
            _ranges(tsr),
            Mode.TRANSPORT if transport and task.mode is Mode.TRANSPORT else Mode.TUNNEL,
            (task.ni, nonce.nonce),
            g_ir,
            task.spi_in,
            True,
            now,
        )
        if task.rekey is None:
            self._events.append(child.sa)
        else:
            self._events.append(
                ChildSaRekeyed(config.name, task.rekey, task.rekey_out, child.sa, initiator=True)
            )
            self._child_rekeyed(task, old, child)
        if child.sa.spi_out in task.peer_deleted and child.sa.spi_in in self._children:
            # The peer deleted it before our exchange was over: it is gone on both sides
            self._child_event(child, ChildEvent.DELETE_REQUEST)

    def _child_rekeyed(self, task: _ChildExchange, old: _Child | None, child: _Child) -> None:
        if old is not None and old.state is ChildState.REKEYING:
            self._child_event(old, ChildEvent.REKEY_DONE)
        other = self._children.get(task.collision) if task.collision is not None else None
        # RFC 7296 §2.8.1: if both rekeyed the same SA, "the SA created with the lowest of the
        # four nonces used in the two exchanges SHOULD be closed by the endpoint that created
        # it" ('lowest' octet by octet: Python's bytes order); the endpoint that initiated the
        # surviving SA deletes the old one.
        if other is not None and min(child.ni, child.nr, other.ni, other.nr) in (
            child.ni,
            child.nr,
        ):
            child.rekey_at = None
            self._queue.appendleft(_DeleteChild(child.sa.spi_in))
            return  # ours is redundant; the peer deletes the old SA
        if old is not None and old.state is ChildState.REKEYED:
            # RFC 7296 §1.3.3, §2.8: the rekey's initiator deletes the old SA
            self._queue.appendleft(_DeleteChild(old.sa.spi_in))

    def _child_refused(
        self, task: _ChildExchange, old: _Child | None, error: NotifyType, now: float
    ) -> None:
        if old is not None and old.state is ChildState.REKEYING:
            if task.collision is not None and task.collision in self._children:
                # RFC 7296 §2.25.1: the peer finished its own rekey of this SA first (we
                # answered it) and now closes the old one; its new SA is the successor.
                self._child_event(old, ChildEvent.REKEY_DONE)
                return
            self._child_event(old, ChildEvent.REKEY_FAILED)
        if error == NotifyType.TEMPORARY_FAILURE:
            # RFC 7296 §2.25: a collision with another exchange; try again later
            at = now + self._retry_delay()
            if task.rekey is None:
                self._deferred.append((at, _ChildExchange(task.config, group=task.group)))
            elif old is not None and old.state is ChildState.INSTALLED:
                old.rekey_at = at
            return
        if task.rekey is not None and old is None:
            return  # deleted meanwhile (RFC 7296 §2.25.1: a Delete crossed our rekey)
        if error == NotifyType.CHILD_SA_NOT_FOUND and old is not None:
            # RFC 7296 §2.25.1: the peer has no such SA (its Delete crossed our rekey)
            if old.state is not ChildState.DELETING:
                self._child_event(old, ChildEvent.EXPIRE)
            return
        reason = f"peer refused CREATE_CHILD_SA: {error.name}"
        self._events.append(ChildSaFailed(task.config.name, reason, error))

    def _on_create_child_sa(self, ctx: _IkeContext, inner: Message, now: float) -> list[Payload]:
        """The responder's side of CREATE_CHILD_SA; returns the response payloads."""
        sa = inner.find(SaPayload)
        if sa is None or not sa.proposals:
            return [NotifyPayload(NotifyType.INVALID_SYNTAX)]
        if any(p.protocol_id == ProtocolId.IKE for p in sa.proposals):
            return self._on_ike_rekey_request(ctx, inner, sa, now)
        if ctx is not self._ctx or self.state is not IkeState.ESTABLISHED:
            # RFC 7296 §2.25.2: we are rekeying or closing this IKE SA
            return [NotifyPayload(NotifyType.TEMPORARY_FAILURE)]
        old = None
        rekey = inner.notify(NotifyType.REKEY_SA)
        if rekey is not None:
            spi = int.from_bytes(rekey.spi, "big") if len(rekey.spi) == ESP_SPI_LEN else None
            old = self._child_by_out(spi) if spi is not None else None
            if old is None and isinstance(ctx.task, _ChildExchange):
                # It may be the SA our own exchange is creating: the peer installed it on
                # answering, and its SPI for it is only in that answer (RFC 7296 §2.25).
                return [NotifyPayload(NotifyType.TEMPORARY_FAILURE)]
            if old is None:
                # RFC 7296 §2.25.1: "a request to rekey a Child SA that does not exist"
                return [
                    NotifyPayload(NotifyType.CHILD_SA_NOT_FOUND, b"", rekey.protocol_id, rekey.spi)
                ]
            if old.state in (ChildState.DELETING, ChildState.REKEYED):
                # RFC 7296 §2.25.1: "a request to rekey a Child SA that it is currently
                # trying to close" (a rekeyed SA waits for its Delete)
                return [NotifyPayload(NotifyType.TEMPORARY_FAILURE)]
        nonce, ke = inner.find(NoncePayload), inner.find(KePayload)
        tsi, tsr = inner.find(TsiPayload), inner.find(TsrPayload)
        if nonce is None or tsi is None or tsr is None:
            return [NotifyPayload(NotifyType.INVALID_SYNTAX)]
        candidates = (old.config,) if old is not None else self.config.all_children
        picked = self._select_child(sa, tsi, tsr, candidates, ike_auth=False)
        if isinstance(picked, NotifyType):
            return [NotifyPayload(picked)]
        config, chosen, nar_i, nar_r = picked
        our_ke = None
        g_ir: bytes | None = None
        if config.pfs_group is not None:
            group = config.pfs_group
            if ke is None or ke.group != group:
                # RFC 7296 §1.3: the group we selected, for the initiator to retry with
                return [NotifyPayload(NotifyType.INVALID_KE_PAYLOAD, int(group).to_bytes(2, "big"))]
            our_ke = keyexchange.generate(group, self.random)
            try:
                g_ir = keyexchange.shared_secret(our_ke, ke.data)
            except keyexchange.InvalidKeyExchange:
                return [NotifyPayload(NotifyType.INVALID_SYNTAX)]
        spi_in, nr = self._new_child_spi(), self.random(NONCE_LEN)
        mode = (
            Mode.TRANSPORT
            if inner.notify(NotifyType.USE_TRANSPORT_MODE) is not None
            and config.mode is Mode.TRANSPORT
            else Mode.TUNNEL
        )
        payloads: list[Payload] = []
        if mode is Mode.TRANSPORT:
            payloads.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
        payloads += [_answer(chosen, spi_in), NoncePayload(nr)]
        if our_ke is not None:
            payloads.append(KePayload(our_ke.group, keyexchange.public_bytes(our_ke)))
        payloads += [TsiPayload(nar_i), TsrPayload(nar_r)]
        child = self._new_child(
            ctx, config, chosen, nar_i, nar_r, mode, (nonce.nonce, nr), g_ir, spi_in, False, now
        )
        if old is None:
            self._events.append(child.sa)
            return payloads
        self._events.append(
            ChildSaRekeyed(config.name, old.sa.spi_in, old.sa.spi_out, child.sa, initiator=False)
        )
        active = ctx.task
        if (
            old.state is ChildState.REKEYING
            and isinstance(active, _ChildExchange)
            and active.rekey == old.sa.spi_in
        ):
            # RFC 7296 §2.8.1: a simultaneous rekey; "just note the situation and respond as
            # usual", and decide which new SA goes once our own response is in
            active.collision = child.sa.spi_in
        self._child_event(old, ChildEvent.PEER_REKEY)  # the peer will delete the old SA
        return payloads

    def _on_delete_child_response(self, task: _DeleteChild) -> None:
        child = None if task.gone else self._children.get(task.spi_in)
        if child is not None and child.state is ChildState.DELETING:
            self._child_event(child, ChildEvent.DELETE_RESPONSE)

    # -- CREATE_CHILD_SA: the IKE SA (RFC 7296 §1.3.2, §2.18) ------------------------------
    def _start_ike_rekey(self, ctx: _IkeContext, task: _RekeyIke, now: float) -> None:
        task.group = task.group or ctx.group
        assert task.group is not None
        task.spi = self._new_ike_spi()
        task.ni = self.random(NONCE_LEN)
        # RFC 7296 §2.18: a new key exchange is a MUST when rekeying the IKE SA
        task.ke = keyexchange.generate(DhGroup(task.group), self.random)
        payloads: list[Payload] = [
            ike_proposals(self.config.proposals, task.spi),
            NoncePayload(task.ni),
            KePayload(task.group, keyexchange.public_bytes(task.ke)),
        ]
        self._transition(IkeEvent.SEND_REKEY)
        self._send_request(ctx, ExchangeType.CREATE_CHILD_SA, payloads, now, task)

    def _on_ike_rekey_response(
        self, ctx: _IkeContext, task: _RekeyIke, inner: Message, now: float
    ) -> None:
        theirs = task.collision if task.collision in self._retiring else None
        error = _error_notify(inner)
        if error is not None:
            invalid_ke = inner.notify(NotifyType.INVALID_KE_PAYLOAD)
            if invalid_ke is not None and len(invalid_ke.data) == 2 and theirs is None:
                group = int.from_bytes(invalid_ke.data, "big")
                offered = {g for p in self.config.proposals for g in p.ke_groups}
                if group in offered and group != task.group:
                    self._transition(IkeEvent.REKEY_FAILED)
                    self._queue.appendleft(_RekeyIke(group=group))  # RFC 7296 §1.3
                    return
            self._transition(IkeEvent.REKEY_FAILED)
            if theirs is not None:
                # RFC 7296 §2.8.2: the peer completed its rekey without noticing ours and
                # answers TEMPORARY_FAILURE; its new IKE SA (which we answered) is the one.
                self._retiring.remove(theirs)
                self._await_peer_delete(ctx, now)
                self._switch(ctx, theirs, now)
            elif error == NotifyType.TEMPORARY_FAILURE:
                self._deferred.append((now + self._retry_delay(), _RekeyIke()))  # §2.25
            else:
                self._schedule_ike_rekey(now)
            return
        sa, nonce, ke = inner.find(SaPayload), inner.find(NoncePayload), inner.find(KePayload)
        chosen = accepted_ike(sa, self.config.proposals) if sa is not None else None
        peer_spi = sa.proposals[0].spi if sa is not None and sa.proposals else b""
        g_ir = None
        if (
            chosen is not None
            and nonce is not None
            and ke is not None
            and ke.group == task.group
            and len(peer_spi) == IKE_SPI_LEN
            and any(peer_spi)
        ):
            assert task.ke is not None
            try:
                g_ir = keyexchange.shared_secret(task.ke, ke.data)
            except keyexchange.InvalidKeyExchange:
                g_ir = None
        if chosen is None or nonce is None or g_ir is None:
            self._transition(IkeEvent.REKEY_FAILED)  # unusable answer: keep the IKE SA
            self._deferred.append((now + self._retry_delay(), _RekeyIke()))
            return
        ours = _IkeContext(task.spi, peer_spi, True, ni=task.ni, nr=nonce.nonce)
        self._derive_rekeyed(ctx, ours, chosen, g_ir)
        self._transition(IkeEvent.REKEY_DONE)
        if theirs is not None and min(ours.ni, ours.nr, theirs.ni, theirs.nr) in (
            ours.ni,
            ours.nr,
        ):
            # RFC 7296 §2.8.2: "The new IKE SA containing the lowest nonce SHOULD be deleted
            # by the node that created it, and the other surviving new IKE SA MUST inherit
            # all the Child SAs": ours goes, theirs stays, and the peer deletes the old one.
            self._retiring.remove(theirs)
            self._await_peer_delete(ctx, now)
            self._retiring.append(ours)
            self._switch(ctx, theirs, now)
            self._send_delete_on(ours, now)
            return
        # Ours survives (a redundant one of the peer's stays retiring: the peer deletes it);
        # RFC 7296 §2.8: the old IKE SA is deleted by the rekey's initiator.
        if theirs is not None:
            self._await_peer_delete(theirs, now)
        self._retiring.append(ctx)
        self._switch(ctx, ours, now)
        self._send_delete_on(ctx, now)

    def _switch(self, old: _IkeContext, new: _IkeContext, now: float) -> None:
        """The connection's IKE SA is now ``new``; the Child SAs belong to it (RFC 7296 §2.8)."""
        self._ctx = new
        self._queue = deque(t for t in self._queue if not isinstance(t, _RekeyIke))
        self._deferred = [d for d in self._deferred if not isinstance(d[1], _RekeyIke)]
        self._schedule_ike_rekey(now)
        self._events.append(
            IkeSaRekeyed(self.config.name, old.spi_i, old.spi_r, new.spi_i, new.spi_r)
        )

    def _on_ike_rekey_request(
        self, ctx: _IkeContext, inner: Message, sa: SaPayload, now: float
    ) -> list[Payload]:
        active = ctx.task
        if ctx is not self._ctx or self.state is IkeState.DELETING:
            # RFC 7296 §2.25.2: "a request to rekey an IKE SA that it is currently trying to
            # close" (an old IKE SA of ours is one)
            return [NotifyPayload(NotifyType.TEMPORARY_FAILURE)]
        if isinstance(active, _CHILD_TASKS):
            # RFC 7296 §2.25.1: we are creating, rekeying or deleting a Child SA of it
            return [NotifyPayload(NotifyType.TEMPORARY_FAILURE)]
        nonce, ke = inner.find(NoncePayload), inner.find(KePayload)
        if nonce is None or ke is None:
            return [NotifyPayload(NotifyType.INVALID_SYNTAX)]  # RFC 7296 §2.18: KE is a MUST
        chosen = select_ike(sa, self.config.proposals, ke.group)
        if chosen is None:
            return [NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN)]
        if len(chosen.peer_spi) != IKE_SPI_LEN or not any(chosen.peer_spi):
            return [NotifyPayload(NotifyType.INVALID_SYNTAX)]
        if chosen.group != ke.group:
            group = int(chosen.group).to_bytes(2, "big")
            return [NotifyPayload(NotifyType.INVALID_KE_PAYLOAD, group)]
        our_ke = keyexchange.generate(chosen.group, self.random)
        try:
            g_ir = keyexchange.shared_secret(our_ke, ke.data)
        except keyexchange.InvalidKeyExchange:
            return [NotifyPayload(NotifyType.INVALID_SYNTAX)]
        nr, spi = self.random(NONCE_LEN), self._new_ike_spi()
        new = _IkeContext(chosen.peer_spi, spi, False, ni=nonce.nonce, nr=nr)
        self._derive_rekeyed(ctx, new, chosen, g_ir)
        if self.state is IkeState.REKEYING and isinstance(active, _RekeyIke):
            # RFC 7296 §2.8.2: both rekey the IKE SA: answer as usual; which new one stays is
            # decided by the nonces when our own response is in
            active.collision = new
            self._await_peer_delete(new, now)
        else:
            # The peer's new IKE SA replaces ours at once; the peer deletes the old one.
            self._await_peer_delete(ctx, now)
            self._switch(ctx, new, now)
        proposal = Proposal(chosen.proposal.number, ProtocolId.IKE, spi, chosen.proposal.transforms)
        return [
            SaPayload((proposal,)),
            NoncePayload(nr),
            KePayload(chosen.group, keyexchange.public_bytes(our_ke)),
        ]

    # -- INFORMATIONAL (RFC 7296 §1.4) ----------------------------------------------------
    def _on_informational(
        self, ctx: _IkeContext, inner: Message, data: bytes, addr: Address, now: float
    ) -> None:
        deletes = inner.find_all(DeletePayload)
        if any(d.protocol_id == ProtocolId.IKE for d in deletes):
            # RFC 7296 §1.4.1: an empty response, and the IKE SA (with its Child SAs) is gone.
            self._reply(ctx, inner, data, [], addr)
            self._ike_deleted_by_peer(ctx, now)
            return
        answer: list[int] = []
        for d in deletes:
            if d.protocol_id != ProtocolId.ESP:
                continue
            for spi in d.spis:
                child = self._child_by_out(spi)
                creating = self._ctx.task
                if child is None and isinstance(creating, _ChildExchange):
                    creating.peer_deleted.add(spi)  # perhaps the SA it is creating
                if child is None or child.state is ChildState.DELETING:
                    # RFC 7296 §1.4.1: unknown, or our own Delete for it crossed this one:
                    # it is not named in the response, and our response finishes it
                    continue
                answer.append(child.sa.spi_in)
                self._child_event(child, ChildEvent.DELETE_REQUEST)
        # RFC 7296 §1.4.1: the response names the paired SAs of the other direction
        payloads: list[Payload] = [DeletePayload(ProtocolId.ESP, tuple(answer))] if answer else []
        self._reply(ctx, inner, data, payloads, addr)

    def _ike_deleted_by_peer(self, ctx: _IkeContext, now: float) -> None:
        if ctx is not self._ctx:
            if ctx in self._retiring:
                self._retiring.remove(ctx)  # an old or redundant IKE SA, retired by the peer
            return
        task = ctx.task
        if (
            self.state is IkeState.REKEYING
            and isinstance(task, _RekeyIke)
            and task.collision in self._retiring
        ):
            # RFC 7296 §2.8.2: the peer rekeyed without noticing our rekey and deletes the
            # old IKE SA; its new one (which we answered) is the one; forget our own.
            theirs = task.collision
            assert theirs is not None
            self._retiring.remove(theirs)
            self._request_done(ctx)
            self._transition(IkeEvent.REKEY_DONE)
            self._switch(ctx, theirs, now)
            return
        # RFC 7296 §2.25.2: closing while we rekey or close it too: "reply as usual, and
        # forget about its own" request
        self._transition(IkeEvent.DELETE_REQUEST)
        self._close(by_peer=True)


class _Drop(Exception):
    """This message is dropped (and counted): never answered, never fatal."""


_ERRORS = {n for n in NotifyType if n < 16384}  # RFC 7296 §3.10.1: types < 16384 are errors


def _error_notify(message: Message) -> NotifyType | None:
    for p in message.payloads:
        if isinstance(p, NotifyPayload) and p.notify_type in _ERRORS:
            return NotifyType(p.notify_type)
    return None


def _keys(ctx: _IkeContext, *, outbound: bool) -> SkKeys:
    assert ctx.keys is not None
    i_to_r = ctx.initiator == outbound
    return ctx.keys.initiator_to_responder if i_to_r else ctx.keys.responder_to_initiator


def _answer(chosen: ChosenEsp, spi: bytes) -> SaPayload:
    """The responder's SA payload: the chosen proposal with our inbound SPI."""
    p = chosen.proposal
    return SaPayload((Proposal(p.number, ProtocolId.ESP, spi, p.transforms),))


_narrowing: IdentityMemo[tuple[TrafficSelector, ...]] = IdentityMemo()


def _narrowed(ts: TsiPayload | TsrPayload | None,
              allowed: tuple[TrafficSelector, ...]) -> tuple[TrafficSelector, ...]:
    """``narrow`` of the payload's selectors to ``allowed``, computed once per payload
    object (the parser's, for the same bytes) and policy: peers offering the same
    selectors get the very same narrowed tuple (written once, payloads.py)."""
    if ts is None:
        return ()
    return _narrowing.get_or((ts, allowed), lambda: narrow(_ranges(ts), allowed))


def _ranges(ts: TsiPayload | TsrPayload | None) -> tuple[TrafficSelector, ...]:
    if ts is None:
        return ()
    return tuple(s for s in ts.selectors if isinstance(s, TrafficSelector))


def _id_text(payload: IdiPayload | IdrPayload) -> str:
    """An identity for a log line (RFC 7296 §3.5 types; others as hex)."""
    data = payload.data
    if payload.id_type in (IdType.ID_IPV4_ADDR, IdType.ID_IPV6_ADDR) and len(data) in (4, 16):
        return str(ipaddress.ip_address(data))
    if payload.id_type in (IdType.ID_FQDN, IdType.ID_RFC822_ADDR):
        return repr(data.decode("ascii", "replace"))
    return f"{payload.id_type}:{data.hex()}"


def _all_ranges(*payloads: TsiPayload | TsrPayload) -> bool:
    return all(isinstance(s, TrafficSelector) for p in payloads for s in p.selectors)
