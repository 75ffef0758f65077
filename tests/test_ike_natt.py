"""NAT traversal (RFC 7296 §2.23, RFC 3948): NAT detection, the move to the NAT-T port, the
ports ESP-in-UDP uses, and strongSwan's ``encap = yes`` (a faked NAT_DETECTION_SOURCE_IP)."""

from __future__ import annotations

from dataclasses import replace

from controller.ike.ike_sa import ChildSaEstablished, IkeConfig, IkeSa, IkeSaEstablished
from controller.ike.state import IkeState
from tests.test_ike_sa import (
    I_ADDR,
    R_ADDR,
    Address,
    Nat,
    Sent,
    configs,
    events,
    roundtrip,
    seeded,
)

PRIVATE = ("10.0.0.1", 500)  # the initiator, behind a NAT
PUBLIC_IP = "198.51.100.7"
IKE_SA_INIT, IKE_AUTH = 34, 35


def _established(
    i: IkeSa, r: IkeSa, nat: Nat | None = None
) -> tuple[list[object], list[object], list[Sent]]:
    trace: list[Sent] = []
    i.initiate(0.0)
    roundtrip(i, r, nat=nat, trace=trace)
    assert i.state is IkeState.ESTABLISHED and r.state is IkeState.ESTABLISHED
    return events(i), events(r), trace


def _pair(
    i_cfg: IkeConfig | None = None, r_cfg: IkeConfig | None = None, i_local: Address = I_ADDR
) -> tuple[IkeSa, IkeSa]:
    ci, cr = configs()
    i = IkeSa(i_cfg or ci, initiator=True, local=i_local, remote=R_ADDR, random=seeded(1))
    r = IkeSa(r_cfg or cr, initiator=False, local=R_ADDR, remote=I_ADDR, random=seeded(2))
    return i, r


def _ike(ev: list[object]) -> IkeSaEstablished:
    e = ev[0]
    assert isinstance(e, IkeSaEstablished)
    return e


def _child(ev: list[object]) -> ChildSaEstablished:
    e = ev[1]
    assert isinstance(e, ChildSaEstablished)
    return e


def test_without_nat_everything_stays_on_port_500_unencapsulated() -> None:
    i, r = _pair()
    ei, er, trace = _established(i, r)
    assert {s.dst[1] for s in trace} == {500}
    assert not _ike(ei).encap and not _ike(er).encap
    assert not _child(ei).encap and not _child(er).encap
    assert i.local == I_ADDR and i.remote == R_ADDR and r.local == R_ADDR


def test_nat_in_front_of_the_initiator_moves_ike_to_4500_and_both_encapsulate() -> None:
    nat = Nat(PUBLIC_IP)
    i, r = _pair(i_local=PRIVATE)
    ei, er, trace = _established(i, r, nat)
    # RFC 7296 §2.23: the initiator sees its own address changed (NAT_DETECTION_DESTINATION_IP),
    # the responder sees the initiator's changed (NAT_DETECTION_SOURCE_IP).
    assert _ike(ei).nat_local and not _ike(ei).nat_remote and _ike(ei).encap
    assert _ike(er).nat_remote and not _ike(er).nat_local and _ike(er).encap
    # IKE_SA_INIT on 500; IKE_AUTH both ways on the NAT-T port (the NAT maps the initiator's
    # 4500 to a public port of its own).
    init = [s for s in trace if s.data[18] == IKE_SA_INIT]
    auth = [s for s in trace if s.data[18] == IKE_AUTH]
    public_500 = nat.mappings[PRIVATE]
    public_4500 = nat.mappings[("10.0.0.1", 4500)]
    assert [s.dst for s in init] == [("192.0.2.2", 500), public_500] and len(auth) == 2
    assert public_500 != public_4500
    assert auth[0].sender is i and auth[0].dst == ("192.0.2.2", 4500)
    assert auth[0].src == public_4500
    assert auth[1].sender is r and auth[1].dst == public_4500
    assert i.local == ("10.0.0.1", 4500) and i.remote == ("192.0.2.2", 4500)
    assert r.local == ("192.0.2.2", 4500) and r.remote == public_4500
    ci, cr = _child(ei), _child(er)
    assert ci.encap and cr.encap
    # ESP in UDP: each side's own NAT-T port, and the port the peer's IKE came from on 4500.
    assert (ci.local_port, ci.remote_port) == (4500, 4500)
    assert (cr.local_port, cr.remote_port) == (4500, public_4500[1])


def test_force_encap_fakes_a_nat_and_both_sides_encapsulate() -> None:
    ci, cr = configs(initiator={"force_encap": True})
    i, r = _pair(ci, cr)
    ei, er, trace = _established(i, r)
    # Nothing is translated: the initiator's own view shows no NAT, but it encapsulates.
    assert not _ike(ei).nat_local and not _ike(ei).nat_remote and _ike(ei).encap
    # The responder believes the initiator is behind a NAT (the faked source hash).
    assert _ike(er).nat_remote and _ike(er).encap
    assert [s.dst[1] for s in trace if s.data[18] == IKE_AUTH] == [4500, 4500]
    assert _child(ei).encap and _child(er).encap
    assert (_child(ei).local_port, _child(ei).remote_port) == (4500, 4500)
    assert (_child(er).local_port, _child(er).remote_port) == (4500, 4500)


def test_a_responder_that_fakes_nat_detection_moves_the_initiator_too() -> None:
    """strongSwan with kernel-libipsec fakes NAT detection as responder as well."""
    ci, cr = configs(responder={"force_encap": True})
    i, r = _pair(ci, cr)
    ei, er, trace = _established(i, r)
    assert _ike(ei).nat_remote and _ike(ei).encap and _ike(er).encap
    assert [s.dst[1] for s in trace if s.data[18] == IKE_AUTH] == [4500, 4500]
    assert _child(ei).encap and _child(er).encap


def test_a_lost_ike_auth_is_retransmitted_to_the_natt_port() -> None:
    nat = Nat(PUBLIC_IP)
    i, r = _pair(i_local=PRIVATE)
    i.initiate(0.0)
    lost: list[bytes] = []

    def drop_first_auth(data: bytes) -> bool:
        if data[18] == IKE_AUTH and not lost:
            lost.append(data)
            return True
        return False

    roundtrip(i, r, nat=nat, drop=drop_first_auth)
    assert lost and i.state is IkeState.AUTH_SENT
    timer = i.get_timer()
    assert timer is not None
    i.handle_timer(timer)
    ((data, addr),) = i.datagrams_to_send(timer)
    assert data == lost[0] and addr == ("192.0.2.2", 4500)
    r.receive_datagram(data, nat.outbound(i.local), timer)
    roundtrip(i, r, now=timer, nat=nat)
    assert i.state is IkeState.ESTABLISHED and r.state is IkeState.ESTABLISHED


def test_custom_natt_port() -> None:
    ci, cr = configs(initiator={"force_encap": True, "natt_port": 4501})
    i, r = _pair(ci, replace(cr, natt_port=4501))
    ei, er, trace = _established(i, r)
    assert [s.dst[1] for s in trace if s.data[18] == IKE_AUTH] == [4501, 4501]
    assert i.remote == ("192.0.2.2", 4501) and r.local == ("192.0.2.2", 4501)
    assert (_child(ei).local_port, _child(er).remote_port) == (4501, 4501)


def test_the_side_outside_the_nat_follows_a_new_mapping() -> None:
    """RFC 7296 §2.23: the peer's address is that of its last authenticated message, so a
    NAT that rebinds (new public port) does not cut the responder's own requests off."""
    ci, cr = configs(initiator={"dpd_delay": 30.0})
    i, r = _pair(ci, cr, i_local=PRIVATE)
    nat = Nat(PUBLIC_IP)
    i.initiate(0.0)
    roundtrip(i, r, nat=nat)
    before = r.remote
    nat.rebind()
    t = i.get_timer()
    assert t == 30.0
    i.handle_timer(t)  # a liveness check, from a new public port
    roundtrip(i, r, t, nat=nat)
    assert r.remote == nat.mappings[("10.0.0.1", 4500)] != before
    trace: list[Sent] = []
    r.delete(t)  # the responder's request reaches the initiator through the new mapping
    roundtrip(i, r, t, nat=nat, trace=trace)
    assert trace[0].sender is r and trace[0].dst == r.remote
    assert i.state is IkeState.CLOSED and r.state is IkeState.CLOSED


def test_a_replayed_message_does_not_move_the_peer() -> None:
    nat = Nat(PUBLIC_IP)
    i, r = _pair(i_local=PRIVATE)
    i.initiate(0.0)
    trace: list[Sent] = []
    roundtrip(i, r, nat=nat, trace=trace)
    remote = r.remote
    auth_request = next(s.data for s in trace if s.sender is i and s.data[18] == IKE_AUTH)
    r.receive_datagram(auth_request, ("203.0.113.66", 5555), 1.0)  # replayed from elsewhere
    assert r.remote == remote  # answered from the cache; the address stays
