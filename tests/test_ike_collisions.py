"""Exchange collisions (RFC 7296 §2.8.1, §2.8.2, §2.25): simultaneous Child SA rekeys and
simultaneous IKE SA rekeys, resolved by the lowest of the four nonces ("the SA created with
the lowest of the four nonces used in the two exchanges SHOULD be closed by the endpoint
that created it"), the variants where only one side notices, and rekeys crossing deletes
(TEMPORARY_FAILURE, CHILD_SA_NOT_FOUND). Then both sides doing everything at once on a
lossy, duplicating, reordering network."""

from __future__ import annotations

import random as stdrandom
from collections import deque
from dataclasses import replace

import pytest

from controller.ike.constants import NotifyType
from controller.ike.crypto import parse_ike_proposal
from controller.ike.ike_sa import (
    ChildSaDeleted,
    ChildSaFailed,
    ChildSaRekeyed,
    IkeConfig,
    IkeSa,
    IkeSaClosed,
    IkeSaRekeyed,
)
from controller.ike.message import parse_message
from controller.ike.payloads import NotifyPayload
from controller.ike.state import IkeState
from tests.test_ike_child import dmz_pair
from tests.test_ike_sa import I_ADDR, R_ADDR, Wire, assert_in_step, configs

NONCE_LEN = 32
CREATE_CHILD_SA, INFORMATIONAL = 36, 37
RESPONSE = 0x20
LOW, MID1, MID2, HIGH = b"\x01" * 32, b"\x40" * 32, b"\x41" + b"\x00" * 31, b"\x90" * 32


class ScriptedNonces:
    """A seeded random source whose 32-byte draws come from a script while it lasts. With
    X448 for the IKE SA (56-byte secrets) and no PFS, only nonces are 32 bytes long."""

    def __init__(self, seed: int) -> None:
        self.rng = stdrandom.Random(seed)
        self.script: deque[bytes] = deque()

    def __call__(self, n: int) -> bytes:
        if n == NONCE_LEN and self.script:
            return self.script.popleft()
        return self.rng.randbytes(n)


def scripted_wire() -> tuple[Wire, ScriptedNonces, ScriptedNonces]:
    x448 = (parse_ike_proposal("aes128gcm16-prfsha256-x448"),)
    ci, cr = configs(initiator={"proposals": x448}, responder={"proposals": x448})
    a, b = ScriptedNonces(1), ScriptedNonces(2)
    wire = Wire(
        IkeSa(ci, initiator=True, local=I_ADDR, remote=R_ADDR, random=a),
        IkeSa(cr, initiator=False, local=R_ADDR, remote=I_ADDR, random=b),
    )
    wire.i.initiate(0.0)
    wire.flush()
    assert wire.i.state is IkeState.ESTABLISHED
    return wire, a, b


def out(sa: IkeSa) -> bytes:
    ((data, _),) = sa.datagrams_to_send(0.0)
    return data


def give(wire: Wire, to: IkeSa, data: bytes) -> None:
    to.receive_datagram(data, wire.peer(to).local, wire.now)


def notifies(receiver: IkeSa, data: bytes) -> set[int]:
    """The notify types inside an SK message, decrypted as ``receiver`` would (a test probe)."""
    message = parse_message(data)
    ctx = receiver._context_for(message.header)
    assert ctx is not None
    inner = receiver._open(ctx, message, data)
    return {p.notify_type for p in inner.payloads if isinstance(p, NotifyPayload)}


def nonce_script(lowest: str) -> dict[str, bytes]:
    """The four nonces of two crossing exchanges (A = initiator side, B = responder side):
    ni_a/nr_b are A's exchange's, ni_b/nr_a are B's; ``lowest`` gets the lowest one."""
    names = ["ni_a", "nr_a", "ni_b", "nr_b"]
    others = iter([MID1, MID2, HIGH])
    return {n: LOW if n == lowest else next(others) for n in names}


# -- simultaneous Child SA rekeys (RFC 7296 §2.8.1) -----------------------------------------
@pytest.mark.parametrize("lowest", ["ni_a", "nr_b", "ni_b", "nr_a"])
def test_simultaneous_child_rekeys_keep_the_sa_without_the_lowest_nonce(lowest: str) -> None:
    wire, a, b = scripted_wire()
    n = nonce_script(lowest)
    a.script += [n["ni_a"], n["nr_a"]]  # A draws its request's nonce, then its answer's
    b.script += [n["ni_b"], n["nr_b"]]
    (old,) = wire.li.live.values()
    wire.i.rekey_child(old.spi_in, wire.now)
    wire.r.rekey_child(old.spi_out, wire.now)
    req_a, req_b = out(wire.i), out(wire.r)
    give(wire, wire.i, req_b)  # both notice the collision and answer as usual
    give(wire, wire.r, req_a)
    resp_b, resp_a = out(wire.i), out(wire.r)
    give(wire, wire.i, resp_a)
    give(wire, wire.r, resp_b)
    wire.flush()
    # Three pairs existed; each side reported both new SAs (make-before-break) ...
    assert len(wire.li.of(ChildSaRekeyed)) == len(wire.lr.of(ChildSaRekeyed)) == 2
    # ... on B, first A's (answering req_a), then its own (resp_b).
    a_made, b_made = (e.new for e in wire.lr.of(ChildSaRekeyed))
    redundant_is_as = lowest in ("ni_a", "nr_b")
    survivor = a_made if not redundant_is_as else b_made
    # One Child SA is left, in step on both sides, and it is the one the RFC keeps.
    assert list(wire.lr.live) == [survivor.spi_in]
    assert_in_step(wire.li, wire.lr)
    # The old pair and the redundant pair were deleted, and reported, on both sides.
    redundant = b_made if not redundant_is_as else a_made
    deleted_on_b = {(e.spi_in, e.spi_out) for e in wire.lr.of(ChildSaDeleted)}
    assert deleted_on_b == {
        (old.spi_out, old.spi_in),
        (redundant.spi_in, redundant.spi_out),
    }
    assert len(wire.li.of(ChildSaDeleted)) == 2
    # Each side sent one Delete: the creator of the redundant SA, and the initiator of the
    # surviving SA (for the old one).
    deletes = [
        (to, d) for to, d in wire.delivered if d[18] == INFORMATIONAL and not d[19] & RESPONSE
    ]
    assert sorted(to is wire.r for to, _ in deletes) == [False, True]
    wire.advance(120.0)  # and nothing else happens
    assert len(wire.li.of(ChildSaRekeyed)) == 2 and not wire.li.of(ChildSaFailed)


@pytest.mark.parametrize("delete_first", [True, False])
def test_child_rekey_collision_noticed_by_one_side_only(delete_first: bool) -> None:
    """A finishes its rekey before B's request reaches it: A answers that TEMPORARY_FAILURE
    (it is closing the old SA); B noticed the collision, and A's new SA is the one."""
    wire = Wire.established()
    (old,) = wire.li.live.values()
    wire.i.rekey_child(old.spi_in, wire.now)
    wire.r.rekey_child(old.spi_out, wire.now)
    req_a, req_b = out(wire.i), out(wire.r)
    give(wire, wire.r, req_a)  # B notices and answers
    give(wire, wire.i, out(wire.r))  # A completes and deletes the old SA
    delete_a = out(wire.i)
    give(wire, wire.i, req_b)  # too late: A is closing the old SA
    resp_b = out(wire.i)
    assert NotifyType.TEMPORARY_FAILURE in notifies(wire.r, resp_b)
    for data in (delete_a, resp_b) if delete_first else (resp_b, delete_a):
        give(wire, wire.r, data)
    wire.flush()
    wire.advance(120.0)
    (a_made,) = (e.new for e in wire.li.of(ChildSaRekeyed))
    assert list(wire.li.live) == [a_made.spi_in]
    assert_in_step(wire.li, wire.lr)
    assert wire.li.of(ChildSaDeleted) == [ChildSaDeleted("lan", old.spi_in, old.spi_out)]
    assert wire.lr.of(ChildSaDeleted) == [ChildSaDeleted("lan", old.spi_out, old.spi_in)]
    assert not wire.li.of(ChildSaFailed) and not wire.lr.of(ChildSaFailed)


# -- a rekey crossing a delete (RFC 7296 §2.25.1) -------------------------------------------
@pytest.mark.parametrize("delete_first", [True, False])
def test_child_rekey_crossing_its_delete(delete_first: bool) -> None:
    wire = Wire.established()
    (old,) = wire.li.live.values()
    wire.i.rekey_child(old.spi_in, wire.now)
    wire.r.delete_child(old.spi_out, wire.now)
    rekey, delete = out(wire.i), out(wire.r)
    if delete_first:
        give(wire, wire.i, delete)  # "reply as usual, with a Delete payload"
        give(wire, wire.r, rekey)
    else:
        give(wire, wire.r, rekey)  # "currently trying to close": TEMPORARY_FAILURE
        give(wire, wire.i, delete)
    answer_to_rekey = [d for d, _ in wire.r.datagrams_to_send(wire.now)]
    assert NotifyType.TEMPORARY_FAILURE in notifies(wire.i, answer_to_rekey[0])
    for data in answer_to_rekey:
        give(wire, wire.i, data)
    wire.flush()
    wire.advance(120.0)  # no retry: the SA is gone
    assert wire.li.live == {} and wire.lr.live == {}
    assert wire.li.of(ChildSaDeleted) == [ChildSaDeleted("lan", old.spi_in, old.spi_out)]
    assert wire.lr.of(ChildSaDeleted) == [ChildSaDeleted("lan", old.spi_out, old.spi_in)]
    assert not wire.li.of(ChildSaRekeyed) and not wire.li.of(ChildSaFailed)
    assert wire.i.state is wire.r.state is IkeState.ESTABLISHED


def test_rekey_of_a_child_sa_the_peer_no_longer_has_is_child_sa_not_found() -> None:
    wire = Wire.established()
    (old,) = wire.li.live.values()
    wire.i.rekey_child(old.spi_in, wire.now)
    held = out(wire.i)  # delayed in the network
    wire.r.delete_child(old.spi_out, wire.now)
    wire.flush()  # the Delete exchange completes on both sides
    give(wire, wire.r, held)
    ((answer, _),) = wire.r.datagrams_to_send(wire.now)
    assert NotifyType.CHILD_SA_NOT_FOUND in notifies(wire.i, answer)
    give(wire, wire.i, answer)
    wire.flush()
    assert wire.li.live == {} and wire.lr.live == {}
    assert not wire.li.of(ChildSaFailed)


# -- simultaneous IKE SA rekeys (RFC 7296 §2.8.2) -------------------------------------------
@pytest.mark.parametrize("lowest", ["ni_a", "nr_b", "ni_b", "nr_a"])
def test_simultaneous_ike_rekeys_keep_the_ike_sa_without_the_lowest_nonce(lowest: str) -> None:
    wire, a, b = scripted_wire()
    old = (wire.i.spi_i, wire.i.spi_r)
    n = nonce_script(lowest)
    a.script += [n["ni_a"], n["nr_a"]]
    b.script += [n["ni_b"], n["nr_b"]]
    wire.i.rekey(wire.now)
    wire.r.rekey(wire.now)
    req_a, req_b = out(wire.i), out(wire.r)
    give(wire, wire.i, req_b)
    give(wire, wire.r, req_a)
    resp_b, resp_a = out(wire.i), out(wire.r)
    give(wire, wire.i, resp_a)
    give(wire, wire.r, resp_b)
    wire.flush()
    # "The new IKE SA containing the lowest nonce SHOULD be deleted by the node that created
    # it, and the other surviving new IKE SA MUST inherit all the Child SAs."
    b_survives = lowest in ("ni_a", "nr_b")
    (ei,) = [e for e in wire.li.log if isinstance(e, IkeSaRekeyed)]
    (er,) = [e for e in wire.lr.log if isinstance(e, IkeSaRekeyed)]
    assert ei == er and (ei.old_spi_i, ei.old_spi_r) == old
    assert (wire.i.spi_i, wire.i.spi_r) == (wire.r.spi_i, wire.r.spi_r) == (ei.spi_i, ei.spi_r)
    assert wire.r.initiator is b_survives and wire.i.initiator is not b_survives
    # The old and the redundant IKE SAs are gone on both sides.
    assert wire.i.local_spis == (wire.i.local_spi,) and wire.r.local_spis == (wire.r.local_spi,)
    # The Child SA moved along and works under the survivor's SK_d.
    assert_in_step(wire.li, wire.lr)
    wire.i.rekey_child(wire.i.child_sas[0].spi_in, wire.now)
    wire.flush()
    assert_in_step(wire.li, wire.lr)
    wire.advance(120.0)
    assert wire.i.state is wire.r.state is IkeState.ESTABLISHED


@pytest.mark.parametrize("delete_first", [True, False])
def test_ike_rekey_collision_noticed_by_one_side_only(delete_first: bool) -> None:
    wire = Wire.established()
    wire.i.rekey(wire.now)
    wire.r.rekey(wire.now)
    req_a, req_b = out(wire.i), out(wire.r)
    give(wire, wire.r, req_a)  # B notices and answers
    give(wire, wire.i, out(wire.r))  # A completes: new IKE SA, Delete on the old one
    delete_a = out(wire.i)
    give(wire, wire.i, req_b)  # on A's old IKE SA, which it is closing
    resp_b = out(wire.i)
    assert NotifyType.TEMPORARY_FAILURE in notifies(wire.r, resp_b)
    for data in (delete_a, resp_b) if delete_first else (resp_b, delete_a):
        give(wire, wire.r, data)
    wire.flush()
    (ei,) = [e for e in wire.li.log if isinstance(e, IkeSaRekeyed)]
    (er,) = [e for e in wire.lr.log if isinstance(e, IkeSaRekeyed)]
    assert ei == er and wire.i.initiator and not wire.r.initiator
    assert (wire.i.spi_i, wire.i.spi_r) == (wire.r.spi_i, wire.r.spi_r)
    assert wire.i.local_spis == (wire.i.local_spi,) and wire.r.local_spis == (wire.r.local_spi,)
    assert wire.i.state is wire.r.state is IkeState.ESTABLISHED
    wire.advance(120.0)  # no retry of B's rekey
    assert len([e for e in wire.lr.log if isinstance(e, IkeSaRekeyed)]) == 1
    assert_in_step(wire.li, wire.lr)


def test_ike_rekey_crossing_a_child_rekey_both_retry_later() -> None:
    """RFC 7296 §2.25.1: no IKE SA rekey while a Child SA exchange is out, and (as strongSwan
    does) no Child SA exchange while rekeying the IKE SA: both TEMPORARY_FAILURE, both retry."""
    wire = Wire.established()
    wire.i.rekey(wire.now)
    wire.r.rekey_child(wire.r.child_sas[0].spi_in, wire.now)
    req_a, req_b = out(wire.i), out(wire.r)
    give(wire, wire.i, req_b)
    give(wire, wire.r, req_a)
    resp_b, resp_a = out(wire.i), out(wire.r)
    assert NotifyType.TEMPORARY_FAILURE in notifies(wire.r, resp_b)
    assert NotifyType.TEMPORARY_FAILURE in notifies(wire.i, resp_a)
    give(wire, wire.r, resp_b)
    give(wire, wire.i, resp_a)
    assert wire.i.get_timer() is not None and wire.r.get_timer() is not None
    wire.advance(30.0)  # RETRY_INTERVAL + up to RETRY_JITTER
    assert len([e for e in wire.li.log if isinstance(e, IkeSaRekeyed)]) == 1
    assert len(wire.lr.of(ChildSaRekeyed)) == 1
    assert_in_step(wire.li, wire.lr)


def test_ike_delete_crossing_an_ike_rekey_closes_both() -> None:
    """RFC 7296 §2.25.2: "reply as usual, and forget about its own rekeying request"."""
    wire = Wire.established()
    wire.i.rekey(wire.now)
    wire.r.delete(wire.now)
    req_a, req_b = out(wire.i), out(wire.r)
    give(wire, wire.r, req_a)  # B is closing: TEMPORARY_FAILURE
    give(wire, wire.i, req_b)  # A answers and closes
    wire.flush()
    assert wire.i.state is IkeState.CLOSED and wire.r.state is IkeState.CLOSED
    assert wire.li.log[-1] == IkeSaClosed("site", by_peer=True)
    assert wire.lr.log[-1] == IkeSaClosed("site", by_peer=False)
    assert wire.li.live == {} and wire.lr.live == {}


def test_crossing_ike_deletes_close_both() -> None:
    wire = Wire.established()
    wire.i.delete(wire.now)
    wire.r.delete(wire.now)
    wire.flush()
    assert wire.i.state is IkeState.CLOSED and wire.r.state is IkeState.CLOSED
    assert wire.li.live == {} and wire.lr.live == {}


# -- everything at once, on a bad network --------------------------------------------------
def _busy_configs() -> tuple[IkeConfig, IkeConfig]:
    """Two Child SA policies; enough retransmissions that the lossy network (each exchange
    lost with p = 1 - 0.85**2 per try) does not make a dead peer (0.28**11 per request)."""
    ci, cr = configs()
    di, dr = dmz_pair()
    return (
        replace(ci, children=(di,), retransmit_tries=10),
        replace(cr, children=(dr,), retransmit_tries=10),
    )


@pytest.mark.parametrize("seed", range(40))
def test_both_sides_rekeying_and_deleting_at_once_on_a_bad_network(seed: int) -> None:
    wire = Wire.established(*_busy_configs())
    rng = stdrandom.Random(seed)
    wire.chaos(seed, loss=0.15, duplicate=0.2, hold=0.4)
    for _ in range(6):
        for sa in (wire.i, wire.r):
            if sa.state not in (IkeState.ESTABLISHED, IkeState.REKEYING):
                continue
            action = rng.choice(["rekey_child", "rekey_child", "rekey", "create", "delete_child"])
            installed = [c for c in sa.child_sas if c.state.value == "installed"]
            if action == "rekey" or not installed:
                sa.rekey(wire.now)
            elif action == "rekey_child":
                sa.rekey_child(rng.choice(installed).spi_in, wire.now)
            elif action == "delete_child" and len(installed) > 1:
                sa.delete_child(rng.choice(installed).spi_in, wire.now)
            else:
                sa.create_child(dmz_pair()[0 if sa is wire.i else 1], wire.now)
        wire.flush()
        wire.advance(rng.uniform(0.0, 3.0))
    wire.advance(60.0)
    wire.rng = None  # the network heals; everything in flight settles
    wire.advance(2000.0)  # past any lingering old IKE SA (2 x the retransmission span)
    i, r = wire.i, wire.r
    if i.state is IkeState.FAILED or r.state is IkeState.FAILED:
        pytest.fail(f"the IKE SA failed: {wire.li.log[-1]} / {wire.lr.log[-1]}")
    assert i.state is r.state is IkeState.ESTABLISHED
    assert (i.spi_i, i.spi_r) == (r.spi_i, r.spi_r)
    assert i.local_spis == (i.local_spi,) and r.local_spis == (r.local_spi,)
    assert_in_step(wire.li, wire.lr)
    assert all(c.state.value == "installed" for c in (*i.child_sas, *r.child_sas))
