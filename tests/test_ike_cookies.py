"""The responder's COOKIE defence (RFC 7296 §2.6) with real initiators in memory: no cookie
below the threshold, a stateless challenge above it, the initiator's retry getting through,
cookies bound to the initiator's address, nonce and SPI, secret rotation, and a flood of
spoofed requests that leaves no state behind."""

from __future__ import annotations

import random as stdrandom

from controller.ike.constants import NotifyType
from controller.ike.cookies import COOKIE_LEN, CookieGuard
from controller.ike.ike_sa import IkeSa
from controller.ike.message import parse_message
from controller.ike.payloads import NotifyPayload
from controller.ike.state import IkeState
from tests.test_ike_sa import I_ADDR, R_ADDR, Wire, assert_in_step, configs, seeded


def initiator(seed: int = 1, addr: tuple[str, int] = I_ADDR) -> IkeSa:
    ci, _ = configs()
    sa = IkeSa(ci, initiator=True, local=addr, remote=R_ADDR, random=seeded(seed))
    sa.initiate(0.0)
    return sa


def responder(seed: int = 2, remote: tuple[str, int] = I_ADDR) -> IkeSa:
    _, cr = configs()
    return IkeSa(cr, initiator=False, local=R_ADDR, remote=remote, random=seeded(seed))


def request_of(sa: IkeSa) -> bytes:
    ((data, _),) = sa.datagrams_to_send(0.0)
    return data


def cookie_in(challenge: bytes) -> bytes:
    message = parse_message(challenge)
    (notify,) = message.payloads
    assert isinstance(notify, NotifyPayload) and notify.notify_type == NotifyType.COOKIE
    return notify.data


def test_below_the_threshold_no_cookie_is_asked_for() -> None:
    guard = CookieGuard(threshold=10, random=seeded(9))
    i = initiator()
    assert guard.check(request_of(i), I_ADDR, half_open=9, now=0.0) is None
    assert guard.challenged == 0


def test_above_the_threshold_the_initiator_gets_through_with_the_cookie() -> None:
    guard = CookieGuard(threshold=10, random=seeded(9))
    i = initiator()
    first = request_of(i)
    challenge = guard.check(first, I_ADDR, half_open=10, now=0.0)
    assert challenge is not None and guard.challenged == 1
    # HDR(SPIi, 0) with the R flag and nothing but N(COOKIE) (RFC 7296 §2.6).
    h = parse_message(challenge).header
    assert h.spi_i == first[:8] and h.spi_r == bytes(8) and h.is_response and h.message_id == 0
    assert len(cookie_in(challenge)) == COOKIE_LEN
    i.receive_datagram(challenge, R_ADDR, 0.0)
    assert i.state is IkeState.INIT_SENT
    retry = request_of(i)
    # The retry: the cookie is the first payload, the rest unchanged (same KE and nonce).
    retried = parse_message(retry)
    assert isinstance(retried.payloads[0], NotifyPayload)
    assert retried.payloads[0].data == cookie_in(challenge)
    assert retried.payloads[1:] == parse_message(first).payloads
    assert guard.check(retry, I_ADDR, half_open=10, now=0.5) is None
    # The adapter now creates the responder; the exchange completes as usual.
    wire = Wire(i, responder())
    wire.r.receive_datagram(retry, I_ADDR, 0.5)
    wire.flush()
    assert wire.i.state is IkeState.ESTABLISHED and wire.r.state is IkeState.ESTABLISHED
    assert_in_step(wire.li, wire.lr)


def test_a_cookie_is_bound_to_the_address_the_nonce_and_the_spi() -> None:
    guard = CookieGuard(threshold=0, random=seeded(9))
    i = initiator()
    challenge = guard.check(request_of(i), I_ADDR, half_open=0, now=0.0)
    assert challenge is not None
    i.receive_datagram(challenge, R_ADDR, 0.0)
    retry = request_of(i)
    # The same bytes from another address: challenged again, and counted.
    again = guard.check(retry, ("203.0.113.9", 500), half_open=0, now=0.0)
    assert again is not None and guard.rejected == 1
    # Another initiator presenting this cookie: not its cookie either.
    other = initiator(seed=5)
    stolen = guard.check(request_of(other), I_ADDR, half_open=0, now=0.0)
    assert stolen is not None
    assert cookie_in(stolen) != cookie_in(challenge)
    assert guard.check(retry, I_ADDR, half_open=0, now=0.0) is None


def test_a_forged_cookie_is_refused() -> None:
    guard = CookieGuard(threshold=0, random=seeded(9))
    i = initiator()
    challenge = guard.check(request_of(i), I_ADDR, 0, 0.0)
    assert challenge is not None
    i.receive_datagram(challenge, R_ADDR, 0.0)
    retry = bytearray(request_of(i))
    # The first payload is N(COOKIE): IKE header (28), generic header (4), Protocol ID, SPI
    # Size and Notify Type (4), then the cookie: its version field (4), then the hash.
    cookie_at = 28 + 4 + 4
    assert bytes(retry[cookie_at : cookie_at + COOKIE_LEN]) == cookie_in(challenge)
    retry[cookie_at + 10] ^= 0x01
    assert guard.check(bytes(retry), I_ADDR, 0, 0.0) is not None and guard.rejected == 1


def test_cookies_survive_one_secret_change_but_not_two() -> None:
    guard = CookieGuard(threshold=0, random=seeded(9), secret_lifetime=60.0)
    i = initiator()
    i.receive_datagram(guard.check(request_of(i), I_ADDR, 0, 0.0) or b"", R_ADDR, 0.0)
    retry = request_of(i)
    assert guard.check(retry, I_ADDR, 0, 59.0) is None
    assert guard.check(retry, I_ADDR, 0, 61.0) is None  # rotated once: the previous secret
    assert guard.check(retry, I_ADDR, 0, 125.0) is not None  # rotated twice: a new challenge
    guard2 = CookieGuard(threshold=0, random=seeded(9))
    j = initiator()
    j.receive_datagram(guard2.check(request_of(j), I_ADDR, 0, 0.0) or b"", R_ADDR, 0.0)
    retry = request_of(j)
    guard2.rotate(1.0)
    guard2.rotate(2.0)
    assert guard2.check(retry, I_ADDR, 0, 2.0) is not None


def test_anything_but_an_ike_sa_init_request_is_left_alone() -> None:
    guard = CookieGuard(threshold=0, random=seeded(9))
    wire = Wire.established()
    for to, data in wire.delivered:
        if data[18] != 34 or data[19] & 0x20:
            assert guard.check(data, I_ADDR, 0, 0.0) is None
        del to
    assert guard.check(b"garbage", I_ADDR, 0, 0.0) is None
    assert guard.challenged == 0


def test_a_flood_of_spoofed_requests_leaves_no_state_and_lets_a_real_initiator_in() -> None:
    """The adapter's loop: check first; create a responder only for what gets through."""
    guard = CookieGuard(threshold=5, random=seeded(9))
    half_open: list[IkeSa] = []
    rng = stdrandom.Random(3)

    def arrive(data: bytes, addr: tuple[str, int]) -> bytes | IkeSa:
        answer = guard.check(data, addr, len(half_open), 0.0)
        if answer is not None:
            return answer
        r = responder(seed=len(half_open) + 100, remote=addr)
        r.receive_datagram(data, addr, 0.0)
        if r.state is IkeState.INIT_DONE:
            half_open.append(r)
        return r

    # 1000 requests from spoofed addresses (they never see the answers).
    for n in range(1000):
        addr = (f"198.18.{n // 250}.{n % 250 + 1}", rng.randrange(1024, 65535))
        spoofed = initiator(seed=1000 + n, addr=addr)
        arrive(request_of(spoofed), addr)
    assert len(half_open) == 5  # the threshold's worth, then only challenges
    assert guard.challenged == 995
    # A real initiator answers its challenge and gets a responder.
    i = initiator(seed=7)
    challenge = arrive(request_of(i), I_ADDR)
    assert isinstance(challenge, bytes)
    i.receive_datagram(challenge, R_ADDR, 0.0)
    r = arrive(request_of(i), I_ADDR)
    assert isinstance(r, IkeSa)
    wire = Wire(i, r)
    wire.flush()
    assert i.state is IkeState.ESTABLISHED and r.state is IkeState.ESTABLISHED
    assert_in_step(wire.li, wire.lr)
