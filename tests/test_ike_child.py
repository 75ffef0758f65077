"""CREATE_CHILD_SA for Child SAs (RFC 7296 §1.3.1, §1.3.3, §2.17) and their Delete
(§1.4.1): new Child SAs, rekeys from either side with and without PFS, deletes from either
side, the request queue (window size 1), and lost, duplicated and reordered messages.
Keys are checked across the two sides (one's outbound keys are the other's inbound)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller.ike.child_state import ChildState
from controller.ike.constants import DhGroup, NotifyType
from controller.ike.ike_sa import (
    ChildConfig,
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaFailed,
    ChildSaRekeyed,
)
from controller.ike.state import IkeState, LocalStateError
from pipeline.satable import Mode
from tests.test_ike_sa import (
    Wire,
    _esp_records,
    assert_in_step,
    assert_keys_match,
    configs,
    pair,
    ts,
)
from workers.algorithms import parse_esp

CREATE_CHILD_SA, INFORMATIONAL = 36, 37
RESPONSE = 0x20


def child(name: str, local: str, remote: str, **kw: object) -> ChildConfig:
    return ChildConfig(
        name,
        ((parse_esp("aes128gcm16"), False), (parse_esp("aes256-sha256"), True)),
        (ts(local),),
        (ts(remote),),
        **kw,  # type: ignore[arg-type]
    )


def dmz_pair(**kw: object) -> tuple[ChildConfig, ChildConfig]:
    """A second Child SA policy on both sides: 10.1.9.0/24 <-> 10.2.9.0/24."""
    return child("dmz", "10.1.9.0/24", "10.2.9.0/24", **kw), child(
        "dmz", "10.2.9.0/24", "10.1.9.0/24", **kw
    )


def with_dmz(**kw: object) -> Wire:
    ci, cr = configs()
    di, dr = dmz_pair(**kw)
    return Wire.established(ci, replace(cr, children=(dr,)))


def first(wire: Wire) -> tuple[ChildSaEstablished, ChildSaEstablished]:
    (a,) = wire.li.of(ChildSaEstablished)[:1]
    (b,) = wire.lr.of(ChildSaEstablished)[:1]
    return a, b


def is_request(data: bytes, exchange: int) -> bool:
    return data[18] == exchange and not data[19] & RESPONSE


def is_response(data: bytes, exchange: int) -> bool:
    return data[18] == exchange and bool(data[19] & RESPONSE)


# -- new Child SAs --------------------------------------------------------------------------
def test_create_child_adds_a_second_child_sa_on_both_sides() -> None:
    wire = with_dmz()
    di, _ = dmz_pair()
    wire.i.create_child(di, wire.now)
    wire.flush()
    ni, nr = wire.li.of(ChildSaEstablished)[-1], wire.lr.of(ChildSaEstablished)[-1]
    assert ni.name == nr.name == "dmz"
    assert_keys_match(ni, nr)
    assert ni.local_ts == (ts("10.1.9.0/24"),) and ni.remote_ts == (ts("10.2.9.0/24"),)
    assert len(wire.i.child_sas) == len(wire.r.child_sas) == 2
    assert_in_step(wire.li, wire.lr)
    assert {c.state for c in wire.i.child_sas} == {ChildState.INSTALLED}


def test_the_responder_can_create_a_child_sa_too() -> None:
    ci, cr = configs()
    di, dr = dmz_pair()
    wire = Wire.established(replace(ci, children=(di,)), cr)
    # The initiator creates every configured Child SA (lan in IKE_AUTH, dmz after it); the
    # responder has no dmz policy and refuses it. The IKE SA and lan stand.
    assert [e.name for e in wire.li.of(ChildSaEstablished)] == ["lan"]
    (failed,) = wire.li.of(ChildSaFailed)
    assert failed.name == "dmz" and failed.notify == NotifyType.TS_UNACCEPTABLE
    # Now the responder starts one the other way round; the initiator has the policy.
    wire.r.create_child(dr, wire.now)
    wire.flush()
    a, b = wire.li.of(ChildSaEstablished)[-1], wire.lr.of(ChildSaEstablished)[-1]
    assert a.name == b.name == "dmz"
    assert_keys_match(a, b)
    assert a.local_ts == (ts("10.1.9.0/24"),)
    assert_in_step(wire.li, wire.lr)


def test_every_configured_child_is_created_after_ike_auth() -> None:
    ci, cr = configs()
    di, dr = dmz_pair()
    wire = Wire.established(replace(ci, children=(di,)), replace(cr, children=(dr,)))
    assert [e.name for e in wire.li.of(ChildSaEstablished)] == ["lan", "dmz"]
    assert [e.name for e in wire.lr.of(ChildSaEstablished)] == ["lan", "dmz"]
    assert_in_step(wire.li, wire.lr)


def test_children_without_child_go_first_into_ike_auth() -> None:
    ci, cr = configs()
    assert ci.child is not None and cr.child is not None
    wire = Wire.established(replace(ci, child=None, children=(ci.child,)), cr)
    assert [e.name for e in wire.li.of(ChildSaEstablished)] == ["lan"]
    assert_in_step(wire.li, wire.lr)


def test_pfs_adds_a_key_exchange_to_create_child_sa() -> None:
    wire = with_dmz(pfs_group=DhGroup.CURVE25519)
    di, _ = dmz_pair(pfs_group=DhGroup.CURVE25519)
    sizes: list[int] = []
    wire.drop = lambda d: bool(is_request(d, CREATE_CHILD_SA) and sizes.append(len(d)))
    wire.i.create_child(di, wire.now)
    wire.flush()
    a, b = wire.li.of(ChildSaEstablished)[-1], wire.lr.of(ChildSaEstablished)[-1]
    assert_keys_match(a, b)
    # Without PFS the same request is smaller by at least the KE payload (4 + 4 + 32).
    plain = with_dmz()
    plain_sizes: list[int] = []
    plain.drop = lambda d: bool(is_request(d, CREATE_CHILD_SA) and plain_sizes.append(len(d)))
    plain.i.create_child(dmz_pair()[0], plain.now)
    plain.flush()
    assert sizes[0] - plain_sizes[0] >= 40


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(DhGroup.CURVE25519, None), (None, DhGroup.CURVE25519), (DhGroup.ECP_256, DhGroup.CURVE25519)],
)
def test_pfs_mismatch_is_no_proposal_chosen(ours: DhGroup | None, theirs: DhGroup | None) -> None:
    ci, cr = configs()
    di, _ = dmz_pair(pfs_group=ours)
    _, dr = dmz_pair(pfs_group=theirs)
    wire = Wire.established(ci, replace(cr, children=(dr,)))
    wire.i.create_child(di, wire.now)
    wire.flush()
    (failed,) = wire.li.of(ChildSaFailed)
    assert failed.notify == NotifyType.NO_PROPOSAL_CHOSEN
    assert len(wire.i.child_sas) == len(wire.r.child_sas) == 1


def test_transport_mode_child() -> None:
    ci, cr = configs()
    di, dr = dmz_pair(mode=Mode.TRANSPORT)
    wire = Wire.established(ci, replace(cr, children=(dr,)))
    wire.i.create_child(di, wire.now)
    wire.flush()
    a, b = wire.li.of(ChildSaEstablished)[-1], wire.lr.of(ChildSaEstablished)[-1]
    assert a.mode is b.mode is Mode.TRANSPORT
    assert_keys_match(a, b)


# -- rekeys ---------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["initiator", "responder"])
@pytest.mark.parametrize("pfs", [None, DhGroup.CURVE25519])
def test_rekey_child_from_either_side(side: str, pfs: DhGroup | None) -> None:
    ci, cr = configs()
    assert ci.child is not None and cr.child is not None
    ci = replace(ci, child=replace(ci.child, pfs_group=pfs))
    cr = replace(cr, child=replace(cr.child, pfs_group=pfs))
    wire = Wire.established(ci, cr)
    old_i, old_r = first(wire)
    starter = wire.i if side == "initiator" else wire.r
    ledger = wire.li if side == "initiator" else wire.lr
    other = wire.lr if side == "initiator" else wire.li
    old = old_i if side == "initiator" else old_r
    starter.rekey_child(old.spi_in, wire.now)
    wire.flush()
    # Both report the rekey with the old SPIs, and the new SA's keys cross.
    (ra,) = ledger.of(ChildSaRekeyed)
    (rb,) = other.of(ChildSaRekeyed)
    assert (ra.old_spi_in, ra.old_spi_out) == (old.spi_in, old.spi_out)
    assert (rb.old_spi_in, rb.old_spi_out) == (old.spi_out, old.spi_in)
    assert_keys_match(ra.new, rb.new)
    assert ra.new.enc_key_out != old.enc_key_out and ra.new.spi_in != old.spi_in
    assert ra.new.local_ts == old.local_ts and ra.new.remote_ts == old.remote_ts
    # The rekey's initiator deleted the old SA; both report it deleted.
    assert ledger.of(ChildSaDeleted) == [ChildSaDeleted("lan", old.spi_in, old.spi_out)]
    assert other.of(ChildSaDeleted) == [ChildSaDeleted("lan", old.spi_out, old.spi_in)]
    assert [c.spi_in for c in starter.child_sas] == [ra.new.spi_in]
    assert_in_step(wire.li, wire.lr)


def test_make_before_break_the_new_sa_comes_before_the_old_is_deleted() -> None:
    wire = Wire.established()
    old_i, _ = first(wire)
    wire.i.rekey_child(old_i.spi_in, wire.now)
    # The responder reports the new SA as soon as it has the request (its keys are known)...
    ((request, _),) = wire.i.datagrams_to_send(wire.now)
    wire.r.receive_datagram(request, wire.i.local, wire.now)
    got = wire.lr.pump()
    assert [type(e) for e in got] == [ChildSaRekeyed]
    assert {c.state for c in wire.r.child_sas} == {ChildState.INSTALLED, ChildState.REKEYED}
    # ... the old inbound SA stays until the Delete exchange is over.
    ((response, _),) = wire.r.datagrams_to_send(wire.now)
    wire.i.receive_datagram(response, wire.r.local, wire.now)
    assert [type(e) for e in wire.li.pump()] == [ChildSaRekeyed]
    ((delete, _),) = wire.i.datagrams_to_send(wire.now)
    assert is_request(delete, INFORMATIONAL)
    assert len(wire.i.child_sas) == 2  # old one still in, until the response
    wire.r.receive_datagram(delete, wire.i.local, wire.now)
    assert [type(e) for e in wire.lr.pump()] == [ChildSaDeleted]
    ((answer, _),) = wire.r.datagrams_to_send(wire.now)
    wire.i.receive_datagram(answer, wire.r.local, wire.now)
    assert [type(e) for e in wire.li.pump()] == [ChildSaDeleted]
    assert_in_step(wire.li, wire.lr)


def test_rekeyed_keys_carry_esp_both_ways() -> None:
    from pipeline.batch import Batch
    from workers.esp import EspCodec
    from workers.sa import SaTable

    wire = Wire.established()
    old_i, _ = first(wire)
    wire.i.rekey_child(old_i.spi_in, wire.now)
    wire.flush()
    (ci,) = wire.li.live.values()
    (cr,) = wire.lr.live.values()
    inner = bytes.fromhex("45000020000000004011000a0a0100010a020001") + bytes(12)
    for sender, receiver, (s_local, s_remote) in (
        (ci, cr, ("192.0.2.1", "192.0.2.2")),
        (cr, ci, ("192.0.2.2", "192.0.2.1")),
    ):
        t_send, t_recv = SaTable(), SaTable()
        out = t_send.install(_esp_records(sender, s_local, s_remote)[0])
        t_recv.install(_esp_records(receiver, s_remote, s_local)[1])
        b = Batch.for_packets([inner])
        b.meta["sa"][0] = out.index
        t_send.assign_sequence(b)
        EspCodec(t_send).encap(b)
        wire_batch = Batch.for_packets(b.packets())
        EspCodec(t_recv).decap(wire_batch)
        assert wire_batch.packets() == [inner]


def test_rekey_of_an_unknown_spi_is_a_key_error_and_busy_ones_are_left_alone() -> None:
    wire = Wire.established()
    old_i, _ = first(wire)
    with pytest.raises(KeyError):
        wire.i.rekey_child(12345, wire.now)
    with pytest.raises(KeyError):
        wire.i.delete_child(12345, wire.now)
    wire.i.rekey_child(old_i.spi_in, wire.now)
    wire.i.rekey_child(old_i.spi_in, wire.now)  # already rekeying: nothing more
    assert len(wire.i.datagrams_to_send(wire.now)) == 1


# -- deletes --------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["initiator", "responder"])
def test_delete_child_from_either_side(side: str) -> None:
    wire = Wire.established()
    a, b = first(wire)
    starter, mine = (wire.i, a) if side == "initiator" else (wire.r, b)
    starter.delete_child(mine.spi_in, wire.now)
    wire.flush()
    assert wire.li.of(ChildSaDeleted) == [ChildSaDeleted("lan", a.spi_in, a.spi_out)]
    assert wire.lr.of(ChildSaDeleted) == [ChildSaDeleted("lan", b.spi_in, b.spi_out)]
    assert wire.i.child_sas == () and wire.r.child_sas == ()
    assert wire.i.state is wire.r.state is IkeState.ESTABLISHED  # the IKE SA stands


def test_crossing_deletes_each_finish_with_their_response() -> None:
    """RFC 7296 §1.4.1: both delete the same Child SA at once; neither response names it."""
    wire = Wire.established()
    a, b = first(wire)
    wire.i.delete_child(a.spi_in, wire.now)
    wire.r.delete_child(b.spi_in, wire.now)
    wire.flush()
    assert wire.li.of(ChildSaDeleted) == [ChildSaDeleted("lan", a.spi_in, a.spi_out)]
    assert wire.lr.of(ChildSaDeleted) == [ChildSaDeleted("lan", b.spi_in, b.spi_out)]
    assert wire.i.child_sas == () and wire.r.child_sas == ()


# -- the queue: one request at a time -------------------------------------------------------
def test_requests_wait_their_turn_one_outstanding_at_a_time() -> None:
    wire = with_dmz()
    di, _ = dmz_pair()
    old_i, _ = first(wire)
    wire.i.create_child(di, wire.now)
    wire.i.rekey_child(old_i.spi_in, wire.now)
    wire.i.create_child(di, wire.now)
    in_flight = 0
    while out := wire.i.datagrams_to_send(wire.now):
        assert len(out) == 1  # RFC 7296 §2.3: window size 1
        in_flight += 1
        wire.r.receive_datagram(out[0][0], wire.i.local, wire.now)
        for data, _ in wire.r.datagrams_to_send(wire.now):
            wire.i.receive_datagram(data, wire.r.local, wire.now)
    assert in_flight == 4  # create, rekey, the old SA's delete, create
    wire.flush()
    assert [e.name for e in wire.li.of(ChildSaEstablished)] == ["lan", "dmz", "dmz"]
    assert len(wire.li.of(ChildSaRekeyed)) == 1 and len(wire.li.of(ChildSaDeleted)) == 1
    assert len(wire.i.child_sas) == 3
    assert_in_step(wire.li, wire.lr)


def test_create_child_before_establishment_waits_for_it() -> None:
    ci, cr = configs()
    di, dr = dmz_pair()
    w = Wire(*pair(ci, replace(cr, children=(dr,))))
    w.i.create_child(di, 0.0)
    assert w.i.datagrams_to_send(0.0) == []
    w.i.initiate(0.0)
    w.flush()
    assert [e.name for e in w.li.of(ChildSaEstablished)] == ["lan", "dmz"]
    assert_in_step(w.li, w.lr)


def test_no_new_exchanges_once_deleting() -> None:
    wire = Wire.established()
    wire.i.delete(wire.now)
    with pytest.raises(LocalStateError):
        wire.i.create_child(dmz_pair()[0], wire.now)


# -- lost, duplicated, reordered ------------------------------------------------------------
def test_lost_create_child_response_is_answered_from_the_cache() -> None:
    wire = with_dmz()
    lost: list[bytes] = []
    wire.drop = lambda d: is_response(d, CREATE_CHILD_SA) and not lost and not lost.append(d)
    wire.i.create_child(dmz_pair()[0], wire.now)
    wire.flush()
    assert lost and len(wire.lr.of(ChildSaEstablished)) == 2  # the responder has it already
    assert len(wire.li.of(ChildSaEstablished)) == 1
    wire.drop = None
    wire.advance(5.0)  # the retransmission is answered from the cache: no second SA
    assert len(wire.lr.of(ChildSaEstablished)) == 2 and len(wire.li.of(ChildSaEstablished)) == 2
    assert_in_step(wire.li, wire.lr)


def test_lost_delete_request_is_retransmitted() -> None:
    wire = Wire.established()
    a, _ = first(wire)
    lost: list[bytes] = []
    wire.drop = lambda d: is_request(d, INFORMATIONAL) and not lost and not lost.append(d)
    wire.i.delete_child(a.spi_in, wire.now)
    wire.flush()
    assert lost and len(wire.i.child_sas) == 1
    assert wire.i.child_sas[0].state is ChildState.DELETING
    wire.drop = None
    wire.advance(5.0)
    assert wire.i.child_sas == () and wire.r.child_sas == ()


def test_duplicated_requests_create_one_child_sa() -> None:
    wire = with_dmz()
    wire.i.create_child(dmz_pair()[0], wire.now)
    ((request, _),) = wire.i.datagrams_to_send(wire.now)
    for _ in range(3):
        wire.r.receive_datagram(request, wire.i.local, wire.now)
    answers = wire.r.datagrams_to_send(wire.now)
    assert len(answers) == 3 and len({a for a, _ in answers}) == 1  # the same cached bytes
    for data, _ in answers:
        wire.i.receive_datagram(data, wire.r.local, wire.now)
    assert wire.i.dropped == 2  # the response is taken once
    wire.flush()
    assert len(wire.lr.of(ChildSaEstablished)) == 2
    assert_in_step(wire.li, wire.lr)


@pytest.mark.parametrize("seed", range(12))
def test_a_lossy_reordering_duplicating_network_still_converges(seed: int) -> None:
    wire = with_dmz()
    a, _ = first(wire)
    wire.chaos(seed)
    wire.i.create_child(dmz_pair()[0], wire.now)
    wire.i.rekey_child(a.spi_in, wire.now)
    wire.settle(60.0)
    wire.rng = None
    wire.settle(60.0)
    assert wire.i.state is wire.r.state is IkeState.ESTABLISHED
    assert len(wire.li.live) == 2
    assert_in_step(wire.li, wire.lr)
    # The old SA was reported deleted on both sides, exactly once.
    assert wire.li.of(ChildSaDeleted) == [ChildSaDeleted("lan", a.spi_in, a.spi_out)]
    assert wire.lr.of(ChildSaDeleted) == [ChildSaDeleted("lan", a.spi_out, a.spi_in)]


def test_esp_proposal_selection_with_and_without_a_key_exchange() -> None:
    from controller.ike.constants import TransformType
    from controller.ike.proposals import accepted_esp, esp_proposals, select_esp

    gcm = ((parse_esp("aes128gcm16"), False),)
    spi = bytes.fromhex("01020304")
    pfs = esp_proposals(gcm, spi, DhGroup.CURVE25519)

    def ke_of(sa: object) -> list[int]:
        assert sa is not None
        return [
            t.transform_id
            for t in sa.proposal.transforms  # type: ignore[attr-defined]
            if t.transform_type == TransformType.KE
        ]

    # RFC 7296 §1.3.1: with PFS the offer carries the KE transform and the answer picks it.
    chosen = select_esp(pfs, gcm, DhGroup.CURVE25519)
    assert ke_of(chosen) == [DhGroup.CURVE25519]
    assert chosen is not None
    answer = type(pfs)((chosen.proposal,))
    assert accepted_esp(answer, gcm, DhGroup.CURVE25519) is not None
    assert accepted_esp(answer, gcm) is None  # we did not ask for PFS: not ours
    # Without PFS on our side, an offer that insists on a KE is not acceptable ...
    assert select_esp(pfs, gcm) is None
    # ... one that allows NONE is, and the answer says NONE.
    either = esp_proposals(gcm, spi, DhGroup.CURVE25519)
    p = either.proposals[0]
    none = type(p)(
        p.number,
        p.protocol_id,
        p.spi,
        (*p.transforms, type(p.transforms[0])(TransformType.KE, DhGroup.NONE)),
    )
    assert ke_of(select_esp(type(pfs)((none,)), gcm)) == [DhGroup.NONE]
    # IKE_AUTH has no key exchange: KE transforms in the offer are disregarded.
    assert ke_of(select_esp(pfs, gcm, ignore_ke=True)) == []
