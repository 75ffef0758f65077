"""The responder's COOKIE defence (RFC 7296 §2.6), sans-IO: state that no single IKE SA owns.

When too many IKE SAs are half-open (IKE_SA_INIT answered, IKE_AUTH not yet done), a
responder answers an IKE_SA_INIT request that carries no valid cookie with a stateless
response holding only N(COOKIE), and keeps nothing. An initiator that really is at its
address sends the request again with the cookie first; then the responder goes on as usual.
The cookie is computed, as RFC 7296 §2.6 suggests, as

    Cookie = <VersionIDofSecret> | Hash(Ni | IPi | SPIi | <secret>)

with SHA-256, so that the responder can check it without state; the secret changes every
``secret_lifetime`` seconds and cookies made with the previous one are still accepted, so
that one arriving just after a change does not cost another round trip.

The adapter calls ``check`` before creating a responder ``IkeSa`` for a request, and sends
back the bytes it returns (if any) to the request's address. Like the IKE SA it is driven
by ``now`` and a ``random`` callable; it owns no clock.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Callable

from .constants import ExchangeType, HeaderFlag, NotifyType
from .errors import IkeProtocolError
from .message import IkeHeader, Message, parse_message, serialize_message
from .payloads import NoncePayload, NotifyPayload

__all__ = ["CookieGuard"]

Address = tuple[str, int]
SECRET_LEN = 32
VERSION_LEN = 4  # <VersionIDofSecret>: a 32-bit counter, big-endian
COOKIE_LEN = VERSION_LEN + hashlib.sha256().digest_size  # 36; RFC 7296 §2.6: 1..64 octets
IKE_SPI_LEN = 8


class CookieGuard:
    """Stateless COOKIE challenges above ``threshold`` half-open IKE SAs (RFC 7296 §2.6)."""

    def __init__(
        self,
        threshold: int,
        random: Callable[[int], bytes] = os.urandom,
        *,
        secret_lifetime: float = 60.0,
    ) -> None:
        self.threshold = threshold
        self.random = random
        self.secret_lifetime = secret_lifetime
        self.challenged = 0  # requests answered with a COOKIE
        self.rejected = 0  # requests with a cookie that was not (or no longer) ours
        self._version = 0
        self._secret = random(SECRET_LEN)
        self._previous: tuple[int, bytes] | None = None
        self._since: float | None = None  # when the current secret came into use

    def rotate(self, now: float) -> None:
        """Use a new secret from now on; cookies made with the one before stay valid until
        the next rotation (RFC 7296 §2.6: "the responder should change the value of
        <secret> frequently")."""
        self._previous = (self._version, self._secret)
        self._version = (self._version + 1) % (1 << (8 * VERSION_LEN))
        self._secret = self.random(SECRET_LEN)
        self._since = now

    def cookie(self, nonce: bytes, addr: Address, spi_i: bytes, now: float) -> bytes:
        """The cookie for an initiator with this Ni, address and SPIi (current secret)."""
        self._age(now)
        return self._make(self._version, self._secret, nonce, addr, spi_i)

    def check(
        self, message_bytes: bytes, addr: Address, half_open: int, now: float
    ) -> bytes | None:
        """None: go on with this IKE_SA_INIT request. Bytes: the stateless response to send
        back to ``addr`` instead (a COOKIE challenge); nothing is kept.

        Only an IKE_SA_INIT request (responder SPI zero) is considered: anything else, or a
        request that does not parse, is None here and left to the IKE SA (which drops it).
        """
        self._age(now)
        try:
            message = parse_message(message_bytes)
        except IkeProtocolError:
            return None
        h = message.header
        if (
            h.exchange_type != ExchangeType.IKE_SA_INIT
            or h.is_response
            or any(h.spi_r)
            or h.message_id != 0
        ):
            return None
        if half_open < self.threshold:
            return None  # not under load: no cookie asked for (one offered is ignored)
        nonce = message.find(NoncePayload)
        if nonce is None:
            return None  # the IKE SA answers INVALID_SYNTAX, statelessly
        offered = message.notify(NotifyType.COOKIE)
        if offered is not None:
            if self._valid(offered.data, nonce.nonce, addr, h.spi_i):
                return None
            self.rejected += 1
        self.challenged += 1
        return self._challenge(h, self.cookie(nonce.nonce, addr, h.spi_i, now))

    # -- internals ------------------------------------------------------------------------
    def _age(self, now: float) -> None:
        if self._since is None:
            self._since = now
        elif now - self._since >= self.secret_lifetime:
            self.rotate(now)

    @staticmethod
    def _make(version: int, secret: bytes, nonce: bytes, addr: Address, spi_i: bytes) -> bytes:
        ip = ipaddress.ip_address(addr[0]).packed
        # RFC 7296 §2.6: Hash(Ni | IPi | SPIi | <secret>)
        digest = hashlib.sha256(nonce + ip + spi_i + secret).digest()
        return version.to_bytes(VERSION_LEN, "big") + digest

    def _valid(self, cookie: bytes, nonce: bytes, addr: Address, spi_i: bytes) -> bool:
        if len(cookie) != COOKIE_LEN:
            return False
        version = int.from_bytes(cookie[:VERSION_LEN], "big")
        secrets = [(self._version, self._secret)]
        if self._previous is not None:
            secrets.append(self._previous)
        for v, secret in secrets:
            if v == version:
                expected = self._make(v, secret, nonce, addr, spi_i)
                return hmac.compare_digest(cookie, expected)
        return False

    @staticmethod
    def _challenge(request: IkeHeader, cookie: bytes) -> bytes:
        # RFC 7296 §2.6: HDR(A,0), N(COOKIE): the initiator's SPI, a zero responder SPI
        reply = Message(
            IkeHeader(
                spi_i=request.spi_i,
                spi_r=bytes(IKE_SPI_LEN),
                exchange_type=ExchangeType.IKE_SA_INIT,
                flags=HeaderFlag.RESPONSE,
                message_id=0,
            ),
            (NotifyPayload(NotifyType.COOKIE, cookie),),
        )
        return serialize_message(reply)
