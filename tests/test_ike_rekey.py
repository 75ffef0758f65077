"""IKE SA rekey (RFC 7296 §1.3.2, §2.18): new SPIs, nonces and key exchange in a
CREATE_CHILD_SA, SKEYSEED from the old SK_d, the Child SAs moving to the new IKE SA, the old
IKE SA deleted by the rekey's initiator; Message IDs restart and the I flag follows the new
roles. The object stays the connection's IKE SA (``IkeSaRekeyed``, ``local_spi``)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller.ike.crypto import parse_ike_proposal
from controller.ike.ike_sa import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    IkeSa,
    IkeSaClosed,
    IkeSaRekeyed,
)
from controller.ike.state import IkeState, LocalStateError
from tests.test_ike_natt import PRIVATE, PUBLIC_IP
from tests.test_ike_sa import (
    I_ADDR,
    R_ADDR,
    Nat,
    Sent,
    Wire,
    assert_in_step,
    configs,
    roundtrip,
    seeded,
)

CREATE_CHILD_SA, INFORMATIONAL = 36, 37
INITIATOR, RESPONSE = 0x08, 0x20


def header(data: bytes) -> tuple[bytes, bytes, int, int, int]:
    """(SPIi, SPIr, exchange, flags, Message ID) of a datagram."""
    return data[:8], data[8:16], data[18], data[19], int.from_bytes(data[20:24], "big")


def rekeyed(ledger_log: list[object]) -> list[IkeSaRekeyed]:
    return [e for e in ledger_log if isinstance(e, IkeSaRekeyed)]


@pytest.mark.parametrize("side", ["initiator", "responder"])
def test_ike_rekey_from_either_side(side: str) -> None:
    wire = Wire.established()
    i, r = wire.i, wire.r
    old = (i.spi_i, i.spi_r)
    assert i.local_spi == old[0] and r.local_spi == old[1]
    starter, other = (i, r) if side == "initiator" else (r, i)
    starter.rekey(wire.now)
    trace_from = len(wire.delivered)
    wire.flush()
    # Both report the same replacement; the new IKE SA's initiator is the rekey's starter.
    (ei,) = rekeyed(wire.li.log)
    (er,) = rekeyed(wire.lr.log)
    assert ei == er
    assert (ei.old_spi_i, ei.old_spi_r) == old
    assert (i.spi_i, i.spi_r) == (r.spi_i, r.spi_r) == (ei.spi_i, ei.spi_r)
    assert {ei.spi_i, ei.spi_r}.isdisjoint(old)
    assert starter.initiator and not other.initiator
    assert starter.local_spi == ei.spi_i and other.local_spi == ei.spi_r
    assert starter.original_initiator is (side == "initiator")
    # The wire: the rekey on the old SA, then the Delete of the old SA (its last request).
    sent = [header(d) for _, d in wire.delivered[trace_from:]]
    assert [(h[2], bool(h[3] & RESPONSE)) for h in sent] == [
        (CREATE_CHILD_SA, False),
        (CREATE_CHILD_SA, True),
        (INFORMATIONAL, False),
        (INFORMATIONAL, True),
    ]
    assert all(h[:2] == old for h in sent)
    # The old IKE SA is gone on both sides: only the new SPI reaches the objects.
    assert i.local_spis == (i.local_spi,) and r.local_spis == (r.local_spi,)
    # Nothing happened to the Child SAs; they live on under the new IKE SA.
    assert len(wire.li.of(ChildSaEstablished)) == 1 and not wire.li.of(ChildSaDeleted)
    assert_in_step(wire.li, wire.lr)
    # The next request on the new IKE SA has Message ID 0 and the new roles' I flag.
    other.rekey_child(other.child_sas[0].spi_in, wire.now)
    ((data, _),) = other.datagrams_to_send(wire.now)
    spi_i, spi_r, exchange, flags, mid = header(data)
    assert (spi_i, spi_r, exchange, mid) == (ei.spi_i, ei.spi_r, CREATE_CHILD_SA, 0)
    assert not flags & INITIATOR  # ``other`` is the new IKE SA's responder
    starter.receive_datagram(data, other.local, wire.now)
    wire.flush()
    assert len(wire.li.of(ChildSaRekeyed)) == 1
    assert_in_step(wire.li, wire.lr)  # keys from the new SK_d agree on both sides


def test_child_sas_created_after_an_ike_rekey_use_the_new_sk_d() -> None:
    wire = Wire.established()
    wire.i.rekey(wire.now)
    wire.flush()
    wire.r.rekey(wire.now)
    wire.flush()
    assert len(rekeyed(wire.li.log)) == len(rekeyed(wire.lr.log)) == 2
    a = wire.i.child_sas[0]
    wire.i.rekey_child(a.spi_in, wire.now)
    wire.flush()
    assert_in_step(wire.li, wire.lr)


def test_a_lost_ike_rekey_response_is_answered_from_the_old_sas_cache() -> None:
    wire = Wire.established()
    lost: list[bytes] = []

    def drop(d: bytes) -> bool:
        if d[18] == CREATE_CHILD_SA and d[19] & RESPONSE and not lost:
            lost.append(d)
            return True
        return False

    wire.drop = drop
    wire.i.rekey(wire.now)
    wire.flush()
    # The responder moved to the new IKE SA; the initiator still waits.
    assert len(rekeyed(wire.lr.log)) == 1 and not rekeyed(wire.li.log)
    assert wire.i.state is IkeState.REKEYING
    assert len(wire.r.local_spis) == 2  # the new SA, and the old one until its Delete
    wire.drop = None
    wire.advance(5.0)
    assert len(rekeyed(wire.li.log)) == 1 and len(rekeyed(wire.lr.log)) == 1
    assert (wire.i.spi_i, wire.i.spi_r) == (wire.r.spi_i, wire.r.spi_r)
    assert wire.i.state is IkeState.ESTABLISHED
    assert len(wire.r.local_spis) == 1
    assert_in_step(wire.li, wire.lr)


def test_queued_requests_go_out_on_the_new_ike_sa() -> None:
    wire = Wire.established()
    start = len(wire.delivered)
    wire.i.rekey(wire.now)
    wire.i.rekey_child(wire.i.child_sas[0].spi_in, wire.now)
    wire.flush()
    (e,) = rekeyed(wire.li.log)
    assert len(wire.li.of(ChildSaRekeyed)) == 1
    # The IKE rekey went out on the old IKE SA, the Child SA rekey queued behind it on the new.
    requests = [header(d) for _, d in wire.delivered[start:] if not d[19] & RESPONSE]
    assert [(h[2], h[:2]) for h in requests if h[2] == CREATE_CHILD_SA] == [
        (CREATE_CHILD_SA, (e.old_spi_i, e.old_spi_r)),
        (CREATE_CHILD_SA, (e.spi_i, e.spi_r)),
    ]
    assert_in_step(wire.li, wire.lr)


def test_invalid_ke_payload_in_an_ike_rekey_is_retried_with_the_asked_group() -> None:
    both = (parse_ike_proposal("aes128gcm16-prfsha256-x25519-ecp256"),)
    ci, cr = configs(initiator={"proposals": both})
    wire = Wire.established(ci, cr)
    # The responder's policy changed: ECP-256 only from now on.
    wire.r.config = replace(
        wire.r.config, proposals=(parse_ike_proposal("aes128gcm16-prfsha256-ecp256"),)
    )
    wire.i.rekey(wire.now)
    wire.flush()
    assert len(rekeyed(wire.li.log)) == len(rekeyed(wire.lr.log)) == 1
    wire.i.rekey_child(wire.i.child_sas[0].spi_in, wire.now)
    wire.flush()
    assert_in_step(wire.li, wire.lr)


def test_no_proposal_chosen_keeps_the_ike_sa() -> None:
    wire = Wire.established()
    wire.r.config = replace(
        wire.r.config, proposals=(parse_ike_proposal("aes256-sha384-modp2048"),)
    )
    old = (wire.i.spi_i, wire.i.spi_r)
    wire.i.rekey(wire.now)
    wire.flush()
    assert not rekeyed(wire.li.log) and (wire.i.spi_i, wire.i.spi_r) == old
    assert wire.i.state is IkeState.ESTABLISHED and wire.r.state is IkeState.ESTABLISHED


def test_delete_after_a_rekey_closes_both_sides() -> None:
    wire = Wire.established()
    wire.r.rekey(wire.now)
    wire.flush()
    wire.i.delete(wire.now)
    wire.flush()
    assert wire.i.state is IkeState.CLOSED and wire.r.state is IkeState.CLOSED
    assert wire.li.log[-1] == IkeSaClosed("site", by_peer=False)
    assert wire.lr.log[-1] == IkeSaClosed("site", by_peer=True)
    assert wire.li.live == {} and wire.lr.live == {}


def test_rekey_needs_an_established_ike_sa() -> None:
    ci, cr = configs()
    i = IkeSa(ci, initiator=True, local=I_ADDR, remote=R_ADDR, random=seeded(1))
    with pytest.raises(LocalStateError):
        i.rekey(0.0)


def test_ike_rekey_behind_a_nat_stays_on_the_natt_port() -> None:
    ci, cr = configs()
    i = IkeSa(ci, initiator=True, local=PRIVATE, remote=R_ADDR, random=seeded(1))
    r = IkeSa(cr, initiator=False, local=R_ADDR, remote=I_ADDR, random=seeded(2))
    nat = Nat(PUBLIC_IP)
    i.initiate(0.0)
    roundtrip(i, r, nat=nat)
    trace: list[Sent] = []
    r.rekey(1.0)
    roundtrip(i, r, 1.0, nat=nat, trace=trace)
    assert i.state is IkeState.ESTABLISHED and (i.spi_i, i.spi_r) == (r.spi_i, r.spi_r)
    assert {s.dst[1] for s in trace if s.sender is i} == {4500}
    assert {s.dst for s in trace if s.sender is r} == {nat.mappings[("10.0.0.1", 4500)]}
