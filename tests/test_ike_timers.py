"""Timers from the configuration: Child SA and IKE SA rekeys (jittered, strongSwan style:
up to 10% early), the Child SA hard lifetime, and dead peer detection (RFC 7296 §1.4: an
empty INFORMATIONAL when nothing was heard for ``dpd_delay``; the IKE SA fails with "dead
peer" when its retransmissions give up). ``get_timer()`` is the earliest of them all."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller.ike.ike_sa import (
    ChildSaDeleted,
    ChildSaRekeyed,
    IkeConfig,
    IkeSaFailed,
    IkeSaRekeyed,
)
from controller.ike.state import IkeState
from tests.test_ike_sa import Wire, assert_in_step, configs, pair

INFORMATIONAL = 37
RESPONSE = 0x20


def timed(child: dict[str, object] | None = None, **ike: object) -> tuple[IkeConfig, IkeConfig]:
    ci, cr = configs()
    assert ci.child is not None and cr.child is not None
    ci = replace(ci, child=replace(ci.child, **(child or {})), **ike)  # type: ignore[arg-type]
    cr = replace(cr, child=replace(cr.child, **(child or {})), **ike)  # type: ignore[arg-type]
    return ci, cr


def test_child_sas_are_rekeyed_before_rekey_time_with_jitter() -> None:
    wire = Wire.established(*timed({"rekey_time": 100.0}))
    (ci,) = wire.i.child_sas
    (cr,) = wire.r.child_sas
    assert ci.rekey_at is not None and cr.rekey_at is not None
    # Up to 10% early, drawn from each side's random source: different on the two sides.
    assert 90.0 <= ci.rekey_at <= 100.0 and 90.0 <= cr.rekey_at <= 100.0
    assert ci.rekey_at != cr.rekey_at
    assert wire.i.get_timer() == ci.rekey_at and wire.r.get_timer() == cr.rekey_at
    wire.advance(100.0)
    # The earlier side rekeyed; the other side's timer went with the old SA.
    assert len(wire.li.of(ChildSaRekeyed)) == len(wire.lr.of(ChildSaRekeyed)) == 1
    starter_at = min(ci.rekey_at, cr.rekey_at)
    (new,) = wire.i.child_sas
    assert new.established == starter_at and new.rekey_at is not None
    assert starter_at + 90.0 <= new.rekey_at <= starter_at + 100.0
    assert len(wire.li.of(ChildSaDeleted)) == 1
    assert_in_step(wire.li, wire.lr)
    wire.advance(1000.0)  # and so on, one rekey per period
    assert 10 <= len(wire.li.of(ChildSaRekeyed)) <= 12
    assert len(wire.li.live) == 1
    assert_in_step(wire.li, wire.lr)


def test_a_child_sa_expires_at_its_life_time() -> None:
    wire = Wire.established(*timed({"life_time": 50.0}))
    (c,) = wire.i.child_sas
    assert c.expire_at == 50.0 and wire.i.get_timer() == 50.0
    wire.advance(49.0)
    assert len(wire.i.child_sas) == 1
    wire.advance(2.0)
    assert wire.li.of(ChildSaDeleted) and wire.lr.of(ChildSaDeleted)
    assert wire.i.child_sas == () and wire.r.child_sas == ()
    assert wire.i.state is wire.r.state is IkeState.ESTABLISHED


def test_an_expired_child_sa_is_deleted_at_the_peer_even_if_its_lifetime_is_longer() -> None:
    ci, cr = configs()
    assert ci.child is not None
    wire = Wire.established(replace(ci, child=replace(ci.child, life_time=50.0)), cr)
    wire.advance(51.0)
    assert wire.li.of(ChildSaDeleted) and wire.lr.of(ChildSaDeleted)
    assert wire.r.child_sas == ()


def test_rekeying_comes_before_the_hard_lifetime() -> None:
    wire = Wire.established(*timed({"rekey_time": 100.0, "life_time": 110.0}))
    wire.advance(500.0)
    # Each SA was rekeyed before it expired: always one SA, never a gap.
    assert len(wire.li.live) == 1 and len(wire.li.of(ChildSaRekeyed)) >= 5
    assert len(wire.li.of(ChildSaDeleted)) == len(wire.li.of(ChildSaRekeyed))
    assert_in_step(wire.li, wire.lr)


def test_the_ike_sa_is_rekeyed_at_rekey_time() -> None:
    wire = Wire.established(*timed(rekey_time=300.0))
    first = wire.i.get_timer()
    assert first is not None and 270.0 <= first <= 300.0
    wire.advance(300.0)
    (ei,) = [e for e in wire.li.log if isinstance(e, IkeSaRekeyed)]
    (er,) = [e for e in wire.lr.log if isinstance(e, IkeSaRekeyed)]
    assert ei == er
    wire.advance(3000.0)
    assert 10 <= len([e for e in wire.li.log if isinstance(e, IkeSaRekeyed)]) <= 12
    assert (wire.i.spi_i, wire.i.spi_r) == (wire.r.spi_i, wire.r.spi_r)
    assert len(wire.i.local_spis) == len(wire.r.local_spis) == 1
    assert_in_step(wire.li, wire.lr)


def test_everything_on_timers_together_stays_in_step() -> None:
    wire = Wire.established(
        *timed({"rekey_time": 60.0, "life_time": 70.0}, rekey_time=90.0, dpd_delay=20.0)
    )
    wire.chaos(7, loss=0.1, duplicate=0.1, hold=0.3)
    wire.advance(1000.0)
    wire.rng = None
    wire.advance(200.0)
    assert wire.i.state is wire.r.state is IkeState.ESTABLISHED
    assert (wire.i.spi_i, wire.i.spi_r) == (wire.r.spi_i, wire.r.spi_r)
    assert_in_step(wire.li, wire.lr)
    assert len(wire.li.live) == 1


# -- dead peer detection ----------------------------------------------------------------------
def informational_requests(wire: Wire, sender: object) -> int:
    return sum(
        1
        for to, d in wire.delivered
        if to is not sender and d[18] == INFORMATIONAL and not d[19] & RESPONSE
    )


def test_dpd_checks_an_idle_peer_every_dpd_delay() -> None:
    wire = Wire.established(*timed(dpd_delay=30.0))
    assert wire.i.get_timer() == 30.0
    wire.advance(29.0)
    assert informational_requests(wire, wire.i) == 0
    wire.advance(2.0)
    # Both sides heard nothing for 30 s and check at the same moment: the checks cross.
    assert informational_requests(wire, wire.i) == informational_requests(wire, wire.r) == 1
    wire.advance(300.0)
    assert informational_requests(wire, wire.i) == informational_requests(wire, wire.r) == 11
    # Liveness checks make no events and change nothing.
    assert [type(e).__name__ for e in wire.li.log] == ["IkeSaEstablished", "ChildSaEstablished"]
    assert wire.i.state is wire.r.state is IkeState.ESTABLISHED


def test_other_exchanges_put_the_dpd_off() -> None:
    ci, cr = timed(dpd_delay=30.0)
    wire = Wire.established(ci, replace(cr, dpd_delay=None))
    wire.advance(20.0)
    wire.r.rekey_child(wire.r.child_sas[0].spi_in, wire.now)  # i hears from r at 20 s
    wire.flush()
    assert wire.i.get_timer() == 50.0
    wire.advance(29.0)
    assert informational_requests(wire, wire.i) == 0


@pytest.mark.parametrize("dpd_timeout", [None, 10.0])
def test_dpd_to_a_dead_peer_fails_the_ike_sa(dpd_timeout: float | None) -> None:
    wire = Wire.established(*timed(dpd_delay=30.0, dpd_timeout=dpd_timeout))
    (child,) = wire.li.live.values()
    wire.drop = lambda d: True  # the peer is gone
    wire.advance(30.0)
    assert wire.i.state is IkeState.ESTABLISHED
    wire.advance(200.0)
    assert wire.i.state is IkeState.FAILED and wire.r.state is IkeState.FAILED
    failed = wire.li.log[-1]
    assert isinstance(failed, IkeSaFailed) and failed.reason == "dead peer"
    # The Child SA is reported gone before the IKE SA; no timer is left.
    assert wire.li.log[-2] == ChildSaDeleted("lan", child.spi_in, child.spi_out)
    assert wire.li.live == {} and wire.i.get_timer() is None


def test_dead_peer_time_follows_the_retransmission_schedule() -> None:
    for dpd_timeout, expected in ((None, None), (10.0, 40.0)):
        wire = Wire.established(*timed(dpd_delay=30.0, dpd_timeout=dpd_timeout))
        wire.drop = lambda d: True
        times = []
        while wire.i.state is IkeState.ESTABLISHED:
            t = wire.i.get_timer()
            assert t is not None and t >= wire.now
            wire.now = t
            wire.i.handle_timer(t)
            wire.i.datagrams_to_send(t)
            times.append(t)
        c = wire.i.config
        span = sum(
            c.retransmit_timeout * c.retransmit_base**k for k in range(c.retransmit_tries + 1)
        )
        assert times[-1] == pytest.approx(expected if expected is not None else 30.0 + span)


def test_get_timer_is_the_earliest_of_all() -> None:
    wire = Wire.established(
        *timed({"rekey_time": 100.0, "life_time": 120.0}, rekey_time=200.0, dpd_delay=500.0)
    )
    (c,) = wire.i.child_sas
    assert wire.i.get_timer() == c.rekey_at
    wire.i.rekey(wire.now)  # a request out: its retransmission is the earliest now
    assert wire.i.get_timer() == wire.i.config.retransmit_timeout
    wire.flush()
    assert wire.i.get_timer() == wire.i.child_sas[0].rekey_at


def test_timers_never_spin() -> None:
    """After handle_timer(now), nothing is due at ``now`` any more."""
    wire = Wire.established(
        *timed({"rekey_time": 10.0, "life_time": 12.0}, rekey_time=15.0, dpd_delay=5.0)
    )
    wire.drop = lambda d: d[19] & RESPONSE == 0 and d[18] == INFORMATIONAL  # no DPD replies
    for _ in range(200):
        t = min(x for x in (wire.i.get_timer(), wire.r.get_timer()) if x is not None)
        wire.now = t
        for sa in (wire.i, wire.r):
            if (u := sa.get_timer()) is not None and u <= t:
                sa.handle_timer(t)
                v = sa.get_timer()
                assert v is None or v > t or sa.datagrams_to_send(t) != []
        wire.flush()
        if wire.i.state is not IkeState.ESTABLISHED:
            break


def test_a_half_open_responder_gives_up() -> None:
    i, r = pair(*configs())
    i.initiate(0.0)
    ((init, _),) = i.datagrams_to_send(0.0)
    r.receive_datagram(init, i.local, 0.0)
    assert r.state is IkeState.INIT_DONE and r.get_timer() == 30.0
    r.handle_timer(29.0)
    assert r.state is IkeState.INIT_DONE
    r.handle_timer(30.0)
    assert r.state is IkeState.FAILED and r.get_timer() is None
    (failed,) = [e for e in iter(r.next_event, None)][-1:]
    assert isinstance(failed, IkeSaFailed) and "half-open" in failed.reason
