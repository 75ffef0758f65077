"""One IKE SA, sans-IO (RFC 7296): IKE_SA_INIT, IKE_AUTH with a pre-shared key and the first
Child SA, retransmission, duplicate requests, INFORMATIONAL (Delete, liveness).

Like aioquic's ``QuicConnection`` it owns no socket and no clock: it is driven by
``receive_datagram(data, addr, now)`` and ``handle_timer(now)``, and drained with
``datagrams_to_send(now)``, ``get_timer()`` and ``next_event()``. Randomness (SPIs, nonces,
IVs, key exchange secrets) comes from the ``random`` callable it is given.

Peer input never raises out of ``receive_datagram``: a message that cannot be parsed or
authenticated is dropped and counted in ``dropped`` (RFC 7296 §2.21), and protocol errors
become error notifies in responses or a failed SA, reported as an event.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from controller.ike import keyexchange
from controller.ike.buffer import Buffer
from controller.ike.constants import (
    AuthMethod,
    DhGroup,
    ExchangeType,
    HeaderFlag,
    IdType,
    NotifyType,
    PayloadType,
    ProtocolId,
)
from controller.ike.crypto import (
    IkeKeys,
    IkeProposal,
    IkeSuite,
    IntegrityError,
    SkKeys,
    compute_skeyseed,
    decrypt_sk,
    derive_child_sa_keys,
    derive_ike_sa_keys,
    encrypt_sk,
    prf,
    sk_overhead,
)
from controller.ike.errors import IkeProtocolError
from controller.ike.message import (
    GENERIC_PAYLOAD_HEADER_LENGTH,
    IKE_HEADER_LENGTH,
    GenericPayloadHeader,
    IkeHeader,
    Message,
    parse_message,
    parse_payload_chain,
    push_generic_payload_header,
    push_ike_header,
    serialize_message,
    serialize_payload_body,
    serialize_payload_chain,
)
from controller.ike.payloads import (
    AuthPayload,
    DeletePayload,
    EncryptedPayload,
    IdiPayload,
    IdrPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
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
from controller.ike.state import IkeEvent, IkeState, next_state
from pipeline.satable import Mode
from workers.algorithms import EspTransform

__all__ = [
    "ChildConfig",
    "ChildSaEstablished",
    "IkeConfig",
    "IkeSa",
    "IkeSaClosed",
    "IkeSaEstablished",
    "IkeSaFailed",
    "narrow",
]

Address = tuple[str, int]
NONCE_LEN = 32  # RFC 7296 §2.10: at least half the PRF key size; 256 bits for every PRF here
PSK_PAD = b"Key Pad for IKEv2"  # RFC 7296 §2.15
IKE_SPI_LEN = 8
ESP_SPI_LEN = 4
MIN_ESP_SPI = 0x100  # RFC 4303 §2.1: 1..255 reserved


@dataclass(frozen=True)
class ChildConfig:
    name: str
    esp_proposals: tuple[tuple[EspTransform, bool], ...]  # (transform, esn)
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    mode: Mode = Mode.TUNNEL


@dataclass(frozen=True)
class IkeConfig:
    name: str
    proposals: tuple[IkeProposal, ...]
    local_id: tuple[IdType, bytes]
    remote_id: tuple[IdType, bytes] | None  # None: any identity the PSK authenticates
    psk: bytes = field(repr=False)
    child: ChildConfig | None = None
    retransmit_timeout: float = 1.0  # first wait; then multiplied by retransmit_base
    retransmit_base: float = 1.8
    retransmit_tries: int = 5


# -- events -------------------------------------------------------------------------------
@dataclass(frozen=True)
class IkeSaEstablished:
    name: str
    spi_i: bytes
    spi_r: bytes
    initiator: bool
    nat_local: bool  # our side is behind a NAT (RFC 7296 §2.23)
    nat_remote: bool


@dataclass(frozen=True, eq=False)
class ChildSaEstablished:
    name: str
    mode: Mode
    transform: EspTransform
    esn: bool
    spi_in: int
    spi_out: int
    enc_key_in: bytes = field(repr=False)
    integ_key_in: bytes = field(repr=False)
    enc_key_out: bytes = field(repr=False)
    integ_key_out: bytes = field(repr=False)
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    encap: bool  # UDP encapsulation, because a NAT was detected


@dataclass(frozen=True)
class IkeSaFailed:
    name: str
    reason: str
    notify: int | None = None


@dataclass(frozen=True)
class IkeSaClosed:
    name: str
    by_peer: bool


Event = IkeSaEstablished | ChildSaEstablished | IkeSaFailed | IkeSaClosed


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
            start = max(int(o.start_address), int(a.start_address))
            end = min(int(o.end_address), int(a.end_address))
            lo, hi = max(o.start_port, a.start_port), min(o.end_port, a.end_port)
            if start > end or lo > hi:
                continue
            family = (
                ipaddress.IPv4Address if o.start_address.version == 4 else ipaddress.IPv6Address
            )
            out.append(
                TrafficSelector(o.ip_protocol or a.ip_protocol, lo, hi, family(start), family(end))
            )
    return tuple(dict.fromkeys(out))


def _covered(got: Sequence[TrafficSelector], offered: Sequence[TrafficSelector]) -> bool:
    return all(narrow((g,), offered) == (g,) for g in got)


class IkeSa:
    def __init__(
        self,
        config: IkeConfig,
        *,
        initiator: bool,
        local: Address,
        remote: Address,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.config = config
        self.initiator = initiator
        self.local = local
        self.remote = remote
        self.random = random
        self.state = IkeState.INITIAL
        self.spi_i = random(IKE_SPI_LEN) if initiator else b""
        self.spi_r = b"" if initiator else random(IKE_SPI_LEN)
        self.dropped = 0  # messages dropped: unparsable, unauthentic, unexpected
        self._events: deque[Event] = deque()
        self._out: deque[tuple[bytes, Address]] = deque()
        self._suite: IkeSuite | None = None
        self._keys: IkeKeys | None = None
        self._ni = self._nr = b""
        self._msg1 = self._msg2 = b""
        self._ke: keyexchange.KePrivate | None = None
        self._group: int | None = None
        self._cookie: bytes | None = None
        self._next_mid = 0  # our next request's Message ID
        self._peer_mid = 0  # the peer's next request's Message ID
        self._request: bytes | None = None  # our request awaiting its response
        self._request_mid = -1
        self._timer: float | None = None
        self._tries = 0
        self._last_response: tuple[int, bytes, bytes] | None = None  # (mid, request, resp)
        self._child_spi_in = b""
        self._child_offer: tuple[tuple[TrafficSelector, ...], tuple[TrafficSelector, ...]] = (
            (),
            (),
        )
        self._nat_local = self._nat_remote = False

    # -- the sans-IO surface ----------------------------------------------------------------
    def initiate(self, now: float) -> None:
        """Start IKE_SA_INIT (initiator only)."""
        self._group = self.config.proposals[0].ke_groups[0]
        self._send_init(now)
        self._transition(IkeEvent.SEND_INIT)

    def delete(self, now: float) -> None:
        """Send a Delete for the IKE SA (RFC 7296 §1.4.1)."""
        self._transition(IkeEvent.SEND_DELETE)
        self._send_request(ExchangeType.INFORMATIONAL, [DeletePayload(ProtocolId.IKE)], now)

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

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out = list(self._out)
        self._out.clear()
        return out

    def get_timer(self) -> float | None:
        return self._timer

    def handle_timer(self, now: float) -> None:
        if self._timer is None or now < self._timer or self._request is None:
            return
        if self._tries >= self.config.retransmit_tries:
            self._timer = None
            self._request = None
            self._fail("peer did not answer (retransmissions exhausted)")
            return
        self._tries += 1
        self._out.append((self._request, self.remote))  # RFC 7296 §2.1: same bytes again
        self._timer = (
            now + self.config.retransmit_timeout * self.config.retransmit_base**self._tries
        )

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # -- plumbing ---------------------------------------------------------------------------
    def _transition(self, event: IkeEvent) -> None:
        self.state = next_state(self.state, event)

    def _fail(self, reason: str, notify: int | None = None) -> None:
        if self.state not in (IkeState.CLOSED, IkeState.FAILED):
            self._transition(IkeEvent.FAIL)
            self._events.append(IkeSaFailed(self.config.name, reason, notify))

    def _header(self, exchange: ExchangeType, mid: int, response: bool) -> IkeHeader:
        flags = HeaderFlag(0)
        if self.initiator:
            flags |= HeaderFlag.INITIATOR
        if response:
            flags |= HeaderFlag.RESPONSE
        return IkeHeader(
            spi_i=self.spi_i,
            spi_r=self.spi_r or bytes(IKE_SPI_LEN),
            exchange_type=exchange,
            flags=flags,
            message_id=mid,
        )

    def _seal(self, header: IkeHeader, payloads: Sequence[Payload]) -> bytes:
        """An SK-protected message (RFC 7296 §3.14) with our direction's keys."""
        assert self._suite is not None and self._keys is not None
        first, inner = serialize_payload_chain(list(payloads))
        sk_len = GENERIC_PAYLOAD_HEADER_LENGTH + len(inner) + sk_overhead(self._suite, len(inner))
        total = IKE_HEADER_LENGTH + sk_len
        buf = Buffer()
        push_ike_header(
            buf,
            IkeHeader(
                spi_i=header.spi_i,
                spi_r=header.spi_r,
                next_payload=PayloadType.SK,
                exchange_type=header.exchange_type,
                flags=header.flags,
                message_id=header.message_id,
                length=total,
            ),
        )
        push_generic_payload_header(buf, GenericPayloadHeader(first, False, sk_len))
        aad = buf.data
        body = encrypt_sk(
            self._suite, self._out_keys(), aad, inner, self.random(self._suite.iv_len)
        )
        return aad + body

    def _open(self, message: Message, data: bytes) -> tuple[Payload, ...]:
        """The inner payloads of an SK message, or _Drop (RFC 7296 §2.21.2: silently)."""
        sk = message.find(EncryptedPayload)
        if (
            sk is None
            or self._suite is None
            or self._keys is None
            or sk is not message.payloads[-1]
        ):
            raise _Drop
        aad = data[: len(data) - len(sk.data)]
        try:
            inner = decrypt_sk(self._suite, self._in_keys(), aad, sk.data)
            return parse_payload_chain(inner, sk.first_payload)
        except (IntegrityError, IkeProtocolError):
            raise _Drop from None

    def _out_keys(self) -> SkKeys:
        assert self._keys is not None
        return (
            self._keys.initiator_to_responder
            if self.initiator
            else self._keys.responder_to_initiator
        )

    def _in_keys(self) -> SkKeys:
        assert self._keys is not None
        return (
            self._keys.responder_to_initiator
            if self.initiator
            else self._keys.initiator_to_responder
        )

    def _send_request(
        self, exchange: ExchangeType, payloads: Sequence[Payload], now: float
    ) -> None:
        mid = self._next_mid
        self._next_mid += 1
        data = self._seal(self._header(exchange, mid, False), payloads)
        self._queue_request(data, mid, now)

    def _queue_request(self, data: bytes, mid: int, now: float) -> None:
        self._request, self._request_mid, self._tries = data, mid, 0
        self._timer = now + self.config.retransmit_timeout
        self._out.append((data, self.remote))

    def _respond(self, request: bytes, mid: int, data: bytes) -> None:
        self._last_response = (mid, request, data)
        self._out.append((data, self.remote))

    def _request_done(self) -> None:
        self._request, self._timer = None, None

    def _nat_hash(self, spi_r: bytes, addr: Address) -> bytes:
        # RFC 7296 §2.23: SHA-1(SPIi | SPIr | IP | Port)
        ip = ipaddress.ip_address(addr[0]).packed
        return hashlib.sha1(self.spi_i + spi_r + ip + addr[1].to_bytes(2, "big")).digest()

    def _nat_notifies(self, spi_r: bytes) -> list[Payload]:
        return [
            NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, self._nat_hash(spi_r, self.local)),
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

    def _derive(self, chosen: ChosenIke, g_ir: bytes) -> None:
        suite = chosen.config.suite
        skeyseed = compute_skeyseed(suite.prf, self._ni, self._nr, g_ir)
        self._suite = suite
        self._keys = derive_ike_sa_keys(suite, skeyseed, self._ni, self._nr, self.spi_i, self.spi_r)

    def _psk_auth(self, signed_msg: bytes, nonce: bytes, id_payload: Payload, sk_p: bytes) -> bytes:
        """AUTH for a shared key (RFC 7296 §2.15): prf(prf(key, pad), msg | nonce |
        prf(SK_p, RestOfIDPayload))."""
        assert self._suite is not None
        p = self._suite.prf
        maced_id = prf(p, sk_p, serialize_payload_body(id_payload))
        return prf(p, prf(p, self.config.psk, PSK_PAD), signed_msg + nonce + maced_id)

    def _child_spi(self) -> bytes:
        while True:
            spi = self.random(ESP_SPI_LEN)
            if int.from_bytes(spi, "big") >= MIN_ESP_SPI:
                return spi

    # -- the exchanges ----------------------------------------------------------------------
    def _send_init(self, now: float) -> None:
        assert self._group is not None
        self._ke = keyexchange.generate(DhGroup(self._group), self.random)
        self._ni = self._ni or self.random(NONCE_LEN)
        payloads: list[Payload] = []
        if self._cookie is not None:
            payloads.append(NotifyPayload(NotifyType.COOKIE, self._cookie))  # RFC 7296 §2.6
        payloads += [
            ike_proposals(self.config.proposals),
            KePayload(self._group, keyexchange.public_bytes(self._ke)),
            NoncePayload(self._ni),
            *self._nat_notifies(bytes(IKE_SPI_LEN)),
        ]
        self._msg1 = serialize_message(
            Message(self._header(ExchangeType.IKE_SA_INIT, 0, False), tuple(payloads))
        )
        self._next_mid = 1
        self._queue_request(self._msg1, 0, now)

    def _dispatch(self, message: Message, data: bytes, addr: Address, now: float) -> None:
        h = message.header
        if h.is_response:
            if (
                not self.initiator
                and h.exchange_type != ExchangeType.INFORMATIONAL
                and h.message_id != self._request_mid
            ):
                raise _Drop
            if h.message_id != self._request_mid or self._request is None:
                raise _Drop  # RFC 7296 §2.2: not the response we wait for
            if h.spi_i != self.spi_i:
                raise _Drop
            self._on_response(message, data, now)
            return
        # A request from the peer.
        if self._last_response is not None and h.message_id == self._last_response[0]:
            if data == self._last_response[1]:
                self._out.append((self._last_response[2], self.remote))  # RFC 7296 §2.1
            return
        if h.message_id != self._peer_mid:
            raise _Drop  # RFC 7296 §2.3: outside the window
        self._on_request(message, data, addr, now)

    def _on_response(self, message: Message, data: bytes, now: float) -> None:
        h = message.header
        if h.exchange_type == ExchangeType.IKE_SA_INIT and self.state is IkeState.INIT_SENT:
            self._on_init_response(message, data, now)
        elif h.exchange_type == ExchangeType.IKE_AUTH and self.state is IkeState.AUTH_SENT:
            self._on_auth_response(message, data)
        elif h.exchange_type == ExchangeType.INFORMATIONAL:
            self._open(message, data)
            self._request_done()
            if self.state is IkeState.DELETING:
                self._transition(IkeEvent.DELETE_RESPONSE)
                self._events.append(IkeSaClosed(self.config.name, by_peer=False))
        else:
            raise _Drop

    def _on_init_response(self, message: Message, data: bytes, now: float) -> None:
        cookie = message.notify(NotifyType.COOKIE)
        if cookie is not None:
            self._cookie = cookie.data  # RFC 7296 §2.6: again, with the cookie first
            self._send_init(now)
            self._transition(IkeEvent.RETRY_INIT)
            return
        invalid_ke = message.notify(NotifyType.INVALID_KE_PAYLOAD)
        if invalid_ke is not None and len(invalid_ke.data) == 2:
            group = int.from_bytes(invalid_ke.data, "big")
            offered = {g for p in self.config.proposals for g in p.ke_groups}
            if group in offered and group != self._group:
                self._group = group  # RFC 7296 §1.3: the group the responder asks for
                self._send_init(now)
                self._transition(IkeEvent.RETRY_INIT)
                return
            self._request_done()
            self._fail(
                "peer asked for a key exchange group we did not offer",
                NotifyType.INVALID_KE_PAYLOAD,
            )
            return
        error = _error_notify(message)
        if error is not None:
            self._request_done()
            self._fail(f"peer refused IKE_SA_INIT: {error.name}", error)
            return
        sa, ke, nonce = message.find(SaPayload), message.find(KePayload), message.find(NoncePayload)
        chosen = accepted_ike(sa, self.config.proposals) if sa is not None else None
        if (
            chosen is None
            or ke is None
            or nonce is None
            or ke.group != self._group
            or len(message.header.spi_r) != IKE_SPI_LEN
            or not any(message.header.spi_r)
        ):
            raise _Drop
        assert self._ke is not None
        try:
            g_ir = keyexchange.shared_secret(self._ke, ke.data)
        except keyexchange.InvalidKeyExchange:
            raise _Drop from None
        self._request_done()
        self.spi_r = message.header.spi_r
        self._nr, self._msg2 = nonce.nonce, data
        self._check_nat(message, self.spi_r)
        self._derive(chosen, g_ir)
        self._transition(IkeEvent.INIT_RESPONSE)
        self._send_auth(now)

    def _id_payloads(self) -> tuple[IdiPayload, IdrPayload | None]:
        id_type, id_data = self.config.local_id
        idi = IdiPayload(id_type, id_data)
        idr = IdrPayload(*self.config.remote_id) if self.config.remote_id else None
        return idi, idr

    def _send_auth(self, now: float) -> None:
        assert self._keys is not None
        idi, idr = self._id_payloads()
        auth = self._psk_auth(self._msg1, self._nr, idi, self._keys.sk_pi)
        payloads: list[Payload] = [idi]
        if idr is not None:
            payloads.append(idr)
        payloads.append(AuthPayload(AuthMethod.SHARED_KEY_MESSAGE_INTEGRITY_CODE, auth))
        child = self.config.child
        if child is not None:
            self._child_spi_in = self._child_spi()
            self._child_offer = (child.local_ts, child.remote_ts)
            if child.mode is Mode.TRANSPORT:
                payloads.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
            payloads += [
                esp_proposals(child.esp_proposals, self._child_spi_in),
                TsiPayload(child.local_ts),
                TsrPayload(child.remote_ts),
            ]
        self._send_request(ExchangeType.IKE_AUTH, payloads, now)

    def _on_auth_response(self, message: Message, data: bytes) -> None:
        inner = Message(message.header, self._open(message, data))
        self._request_done()
        error = _error_notify(inner)
        idr, auth = inner.find(IdrPayload), inner.find(AuthPayload)
        if error is not None and (idr is None or auth is None):
            self._fail(f"peer refused IKE_AUTH: {error.name}", error)
            return
        assert self._keys is not None
        if (
            idr is None
            or auth is None
            or not self._id_ok(idr)
            or not hmac.compare_digest(
                auth.data, self._psk_auth(self._msg2, self._ni, idr, self._keys.sk_pr)
            )
        ):
            self._fail("peer's AUTH payload did not verify", NotifyType.AUTHENTICATION_FAILED)
            return
        self._transition(IkeEvent.AUTH_RESPONSE)
        self._established()
        child = self.config.child
        if child is None:
            return
        if error is not None:
            self._events.append(IkeSaFailed(child.name, f"Child SA refused: {error.name}", error))
            return
        sa, tsi, tsr = inner.find(SaPayload), inner.find(TsiPayload), inner.find(TsrPayload)
        chosen = accepted_esp(sa, child.esp_proposals) if sa is not None else None
        if (
            chosen is None
            or tsi is None
            or tsr is None
            or not _all_ranges(tsi, tsr)
            or not _covered(_ranges(tsi), self._child_offer[0])
            or not _covered(_ranges(tsr), self._child_offer[1])
        ):
            self._events.append(IkeSaFailed(child.name, "unacceptable Child SA in response"))
            return
        transport = inner.notify(NotifyType.USE_TRANSPORT_MODE) is not None
        self._child_established(
            child, chosen, _ranges(tsi), _ranges(tsr), Mode.TRANSPORT if transport else Mode.TUNNEL
        )

    def _id_ok(self, got: IdiPayload | IdrPayload) -> bool:
        want = self.config.remote_id
        return want is None or (got.id_type == want[0] and hmac.compare_digest(got.data, want[1]))

    def _established(self) -> None:
        self._events.append(
            IkeSaEstablished(
                self.config.name,
                self.spi_i,
                self.spi_r,
                self.initiator,
                self._nat_local,
                self._nat_remote,
            )
        )

    def _child_established(
        self,
        child: ChildConfig,
        chosen: ChosenEsp,
        tsi: Sequence[TrafficSelector],
        tsr: Sequence[TrafficSelector],
        mode: Mode,
    ) -> None:
        assert self._suite is not None and self._keys is not None
        keys = derive_child_sa_keys(
            self._suite.prf, self._keys.sk_d, self._ni, self._nr, chosen.transform
        )
        if self.initiator:
            enc_in, integ_in, enc_out, integ_out = (
                keys.encr_r2i,
                keys.integ_r2i,
                keys.encr_i2r,
                keys.integ_i2r,
            )
            local_ts, remote_ts = tsi, tsr
        else:
            enc_in, integ_in, enc_out, integ_out = (
                keys.encr_i2r,
                keys.integ_i2r,
                keys.encr_r2i,
                keys.integ_r2i,
            )
            local_ts, remote_ts = tsr, tsi
        self._events.append(
            ChildSaEstablished(
                child.name,
                mode,
                chosen.transform,
                chosen.esn,
                int.from_bytes(self._child_spi_in, "big"),
                int.from_bytes(chosen.peer_spi, "big"),
                enc_in,
                integ_in,
                enc_out,
                integ_out,
                tuple(local_ts),
                tuple(remote_ts),
                self._nat_local or self._nat_remote,
            )
        )

    # -- responder --------------------------------------------------------------------------
    def _on_request(self, message: Message, data: bytes, addr: Address, now: float) -> None:
        h = message.header
        if (
            h.exchange_type == ExchangeType.IKE_SA_INIT
            and self.state is IkeState.INITIAL
            and not self.initiator
        ):
            self._on_init_request(message, data)
        elif h.exchange_type == ExchangeType.IKE_AUTH and self.state is IkeState.INIT_DONE:
            self._on_auth_request(message, data)
        elif h.exchange_type == ExchangeType.INFORMATIONAL and self.state in (
            IkeState.ESTABLISHED,
            IkeState.DELETING,
        ):
            self._on_informational(message, data)
        else:
            raise _Drop

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

    def _on_init_request(self, message: Message, data: bytes) -> None:
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
        self.spi_i = message.header.spi_i
        self._ni, self._nr, self._msg1 = nonce.nonce, self.random(NONCE_LEN), data
        self._check_nat(message, bytes(IKE_SPI_LEN))
        reply = Message(
            self._header(ExchangeType.IKE_SA_INIT, 0, True),
            (
                SaPayload((chosen.proposal,)),
                KePayload(chosen.group, keyexchange.public_bytes(self._ke)),
                NoncePayload(self._nr),
                *self._nat_notifies(self.spi_r),
            ),
        )
        self._msg2 = serialize_message(reply)
        self._derive(chosen, g_ir)
        self._peer_mid = 1
        self._transition(IkeEvent.INIT_REQUEST)
        self._respond(data, 0, self._msg2)

    def _reply(self, request: bytes, message: Message, payloads: Sequence[Payload]) -> None:
        h = message.header
        out = self._seal(self._header(ExchangeType(h.exchange_type), h.message_id, True), payloads)
        self._peer_mid = h.message_id + 1
        self._respond(request, h.message_id, out)

    def _on_auth_request(self, message: Message, data: bytes) -> None:
        inner = Message(message.header, self._open(message, data))
        idi, auth = inner.find(IdiPayload), inner.find(AuthPayload)
        assert self._keys is not None
        if (
            idi is None
            or auth is None
            or not self._id_ok(idi)
            or not hmac.compare_digest(
                auth.data, self._psk_auth(self._msg1, self._nr, idi, self._keys.sk_pi)
            )
        ):
            # RFC 7296 §2.21.2: AUTHENTICATION_FAILED in the response, then the SA is gone.
            self._reply(data, message, [NotifyPayload(NotifyType.AUTHENTICATION_FAILED)])
            self._fail("peer's AUTH payload did not verify", NotifyType.AUTHENTICATION_FAILED)
            return
        _, _ = self._id_payloads()
        id_type, id_data = self.config.local_id
        idr = IdrPayload(id_type, id_data)
        payloads: list[Payload] = [
            idr,
            AuthPayload(
                AuthMethod.SHARED_KEY_MESSAGE_INTEGRITY_CODE,
                self._psk_auth(self._msg2, self._ni, idr, self._keys.sk_pr),
            ),
        ]
        child_event: (
            tuple[
                ChildConfig,
                ChosenEsp,
                tuple[TrafficSelector, ...],
                tuple[TrafficSelector, ...],
                Mode,
            ]
            | None
        ) = None
        child = self.config.child
        sa, tsi, tsr = inner.find(SaPayload), inner.find(TsiPayload), inner.find(TsrPayload)
        if child is not None and sa is not None:
            chosen = select_esp(sa, child.esp_proposals)
            nar_i = narrow(_ranges(tsi), child.remote_ts) if tsi is not None else ()
            nar_r = narrow(_ranges(tsr), child.local_ts) if tsr is not None else ()
            transport = inner.notify(NotifyType.USE_TRANSPORT_MODE) is not None
            if chosen is None:
                payloads.append(NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN))
            elif not nar_i or not nar_r:
                payloads.append(NotifyPayload(NotifyType.TS_UNACCEPTABLE))
            else:
                self._child_spi_in = self._child_spi()
                answer = SaPayload(
                    (
                        chosen.proposal.__class__(
                            chosen.proposal.number,
                            ProtocolId.ESP,
                            self._child_spi_in,
                            chosen.proposal.transforms,
                        ),
                    )
                )
                mode = Mode.TRANSPORT if transport and child.mode is Mode.TRANSPORT else Mode.TUNNEL
                if mode is Mode.TRANSPORT:
                    payloads.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
                payloads += [answer, TsiPayload(nar_i), TsrPayload(nar_r)]
                child_event = (child, chosen, nar_i, nar_r, mode)
        elif sa is not None:
            payloads.append(NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN))
        self._reply(data, message, payloads)
        self._transition(IkeEvent.AUTH_REQUEST)
        self._established()
        if child_event is not None:
            self._child_established(*child_event)

    def _on_informational(self, message: Message, data: bytes) -> None:
        inner = Message(message.header, self._open(message, data))
        deletes = inner.find_all(DeletePayload)
        if any(d.protocol_id == ProtocolId.IKE for d in deletes):
            # RFC 7296 §1.4.1: an empty response, and the IKE SA (with its Child SAs) is gone.
            self._reply(data, message, [])
            self._transition(IkeEvent.DELETE_REQUEST)
            self._request_done()
            self._events.append(IkeSaClosed(self.config.name, by_peer=True))
            return
        self._reply(data, message, [])  # liveness check (RFC 7296 §1.4) and the rest


class _Drop(Exception):
    """This message is dropped (and counted): never answered, never fatal."""


_ERRORS = {n for n in NotifyType if n < 16384}  # RFC 7296 §3.10.1: types < 16384 are errors


def _error_notify(message: Message) -> NotifyType | None:
    for p in message.payloads:
        if isinstance(p, NotifyPayload) and p.notify_type in _ERRORS:
            return NotifyType(p.notify_type)
    return None


def _ranges(ts: TsiPayload | TsrPayload | None) -> tuple[TrafficSelector, ...]:
    if ts is None:
        return ()
    return tuple(s for s in ts.selectors if isinstance(s, TrafficSelector))


def _all_ranges(*payloads: TsiPayload | TsrPayload) -> bool:
    return all(isinstance(s, TrafficSelector) for p in payloads for s in p.selectors)
