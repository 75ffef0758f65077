"""Two IKE SAs talking in memory (like aioquic's client_and_server): every exchange, lost and
duplicated messages, errors, and the keys they agree on carrying real ESP both ways."""

from __future__ import annotations

import ipaddress
import random as stdrandom
from collections.abc import Callable
from dataclasses import replace

import pytest

from controller.ike.constants import IdType, NotifyType
from controller.ike.crypto import parse_ike_proposal
from controller.ike.ike_sa import (
    ChildConfig,
    ChildSaEstablished,
    IkeConfig,
    IkeSa,
    IkeSaClosed,
    IkeSaEstablished,
    IkeSaFailed,
    narrow,
)
from controller.ike.payloads import TrafficSelector
from controller.ike.state import IkeState
from pipeline.batch import Batch
from pipeline.satable import Direction, SaRecord
from workers.algorithms import parse_esp
from workers.esp import EspCodec
from workers.sa import SaTable

I_ADDR, R_ADDR = ("192.0.2.1", 500), ("192.0.2.2", 500)


def ts(net: str) -> TrafficSelector:
    n = ipaddress.ip_network(net)
    return TrafficSelector(0, 0, 65535, n.network_address, n.broadcast_address)


def configs(**overrides: object) -> tuple[IkeConfig, IkeConfig]:
    child_i = ChildConfig(
        "lan", ((parse_esp("aes128gcm16"), False),), (ts("10.1.0.0/24"),), (ts("10.2.0.0/24"),)
    )
    child_r = ChildConfig(
        "lan", ((parse_esp("aes128gcm16"), False),), (ts("10.2.0.0/24"),), (ts("10.1.0.0/24"),)
    )
    proposals = (parse_ike_proposal("aes128gcm16-prfsha256-x25519"),)
    i = IkeConfig(
        "site",
        proposals,
        (IdType.ID_FQDN, b"gw-a.example.net"),
        (IdType.ID_FQDN, b"gw-b.example.net"),
        b"a long pre-shared key",
        child_i,
    )
    r = IkeConfig(
        "site",
        proposals,
        (IdType.ID_FQDN, b"gw-b.example.net"),
        (IdType.ID_FQDN, b"gw-a.example.net"),
        b"a long pre-shared key",
        child_r,
    )
    ri = overrides.pop("initiator", {})
    rr = overrides.pop("responder", {})
    return replace(i, **ri), replace(r, **rr)  # type: ignore[arg-type]


def seeded(seed: int) -> Callable[[int], bytes]:
    rng = stdrandom.Random(seed)
    return lambda n: rng.randbytes(n)


def pair(i_cfg: IkeConfig, r_cfg: IkeConfig) -> tuple[IkeSa, IkeSa]:
    i = IkeSa(i_cfg, initiator=True, local=I_ADDR, remote=R_ADDR, random=seeded(1))
    r = IkeSa(r_cfg, initiator=False, local=R_ADDR, remote=I_ADDR, random=seeded(2))
    return i, r


def roundtrip(
    a: IkeSa,
    b: IkeSa,
    now: float = 0.0,
    drop: Callable[[bytes], bool] | None = None,
    max_steps: int = 50,
) -> int:
    """Deliver datagrams both ways until none is left; returns how many were delivered."""
    delivered = 0
    for _ in range(max_steps):
        moved = False
        for src, dst in ((a, b), (b, a)):
            for data, _addr in src.datagrams_to_send(now):
                moved = True
                if drop is not None and drop(data):
                    continue
                dst.receive_datagram(data, src.local, now)
                delivered += 1
        if not moved:
            return delivered
    raise AssertionError("no quiescence")


def events(sa: IkeSa) -> list[object]:
    out = []
    while (e := sa.next_event()) is not None:
        out.append(e)
    return out


def established() -> tuple[IkeSa, IkeSa, list[object], list[object]]:
    i, r = pair(*configs())
    i.initiate(0.0)
    roundtrip(i, r)
    return i, r, events(i), events(r)


def test_ike_sa_init_and_auth_establish_both_sides() -> None:
    i, r, ei, er = established()
    assert i.state is IkeState.ESTABLISHED and r.state is IkeState.ESTABLISHED
    assert [type(e) for e in ei] == [IkeSaEstablished, ChildSaEstablished]
    assert [type(e) for e in er] == [IkeSaEstablished, ChildSaEstablished]
    ci, cr = ei[1], er[1]
    assert isinstance(ci, ChildSaEstablished) and isinstance(cr, ChildSaEstablished)
    # The SPIs cross, and the keys each side sends with are the keys the other receives with.
    assert (ci.spi_out, ci.spi_in) == (cr.spi_in, cr.spi_out)
    assert ci.enc_key_out == cr.enc_key_in and ci.enc_key_in == cr.enc_key_out
    assert ci.enc_key_in != ci.enc_key_out and len(ci.enc_key_out) == 20  # key + salt
    assert ci.local_ts == cr.remote_ts == (ts("10.1.0.0/24"),)
    # Keys never show in a repr.
    assert ci.enc_key_out.hex() not in repr(ci)


def _esp_records(e: ChildSaEstablished, local: str, remote: str) -> tuple[SaRecord, SaRecord]:
    la, ra = ipaddress.ip_address(local), ipaddress.ip_address(remote)
    alg = e.transform.keyword
    return (
        SaRecord(
            spi=e.spi_out,
            direction=Direction.OUT,
            alg=alg,
            local_addr=la,
            remote_addr=ra,
            enc_key=e.enc_key_out,
            integ_key=e.integ_key_out,
        ),
        SaRecord(
            spi=e.spi_in,
            direction=Direction.IN,
            alg=alg,
            local_addr=la,
            remote_addr=ra,
            enc_key=e.enc_key_in,
            integ_key=e.integ_key_in,
        ),
    )


def test_negotiated_keys_carry_esp_both_ways() -> None:
    _, _, ei, er = established()
    ci, cr = ei[1], er[1]
    assert isinstance(ci, ChildSaEstablished) and isinstance(cr, ChildSaEstablished)
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
        wire = Batch.for_packets(b.packets())
        EspCodec(t_recv).decap(wire)
        assert wire.packets() == [inner]


def test_lost_response_is_retransmitted_and_duplicate_request_answered_from_cache() -> None:
    i, r = pair(*configs())
    i.initiate(0.0)
    lost = []

    def drop_first_auth_response(data: bytes) -> bool:
        # IKE_AUTH responses: exchange type 35 with the R flag.
        if data[18] == 35 and data[19] & 0x20 and not lost:
            lost.append(data)
            return True
        return False

    roundtrip(i, r, drop=drop_first_auth_response)
    assert lost and i.state is IkeState.AUTH_SENT and r.state is IkeState.ESTABLISHED
    timer = i.get_timer()
    assert timer is not None
    i.handle_timer(timer)  # retransmit IKE_AUTH
    roundtrip(i, r, now=timer)
    assert i.state is IkeState.ESTABLISHED
    # The responder answered the duplicate from its cache: one Child SA on each side.
    assert [type(e) for e in events(r)].count(ChildSaEstablished) == 1
    assert [type(e) for e in events(i)].count(ChildSaEstablished) == 1


def test_retransmissions_give_up() -> None:
    i, _ = pair(*configs())
    i.initiate(0.0)
    sent = len(i.datagrams_to_send(0.0))
    waits = []
    while (t := i.get_timer()) is not None:
        waits.append(t)
        i.handle_timer(t)
        sent += len(i.datagrams_to_send(t))
    assert sent == 1 + i.config.retransmit_tries
    assert all(b - a > 0 for a, b in zip(waits, waits[1:], strict=False))
    gaps = [b - a for a, b in zip(waits, waits[1:], strict=False)]
    assert gaps == sorted(gaps)  # exponential backoff
    (failed,) = events(i)
    assert isinstance(failed, IkeSaFailed) and "retransmissions" in failed.reason
    assert i.state is IkeState.FAILED


def test_invalid_ke_payload_retry_with_the_group_the_responder_wants() -> None:
    i_cfg, r_cfg = configs(
        initiator={"proposals": (parse_ike_proposal("aes128gcm16-prfsha256-x25519-ecp256"),)},
        responder={"proposals": (parse_ike_proposal("aes128gcm16-prfsha256-ecp256"),)},
    )
    i, r = pair(i_cfg, r_cfg)
    i.initiate(0.0)
    roundtrip(i, r)
    assert i.state is IkeState.ESTABLISHED and r.state is IkeState.ESTABLISHED


def test_no_proposal_chosen() -> None:
    i_cfg, r_cfg = configs(responder={"proposals": (parse_ike_proposal("aes256-sha384-modp2048"),)})
    i, r = pair(i_cfg, r_cfg)
    i.initiate(0.0)
    roundtrip(i, r)
    (failed,) = events(i)
    assert isinstance(failed, IkeSaFailed) and failed.notify == NotifyType.NO_PROPOSAL_CHOSEN
    assert r.state is IkeState.INITIAL  # the responder kept no state


def test_wrong_psk_fails_authentication_on_both_sides() -> None:
    i, r = pair(*configs(responder={"psk": b"another key entirely"}))
    i.initiate(0.0)
    roundtrip(i, r)
    (fi,) = events(i)
    (fr,) = events(r)
    assert isinstance(fi, IkeSaFailed) and fi.notify == NotifyType.AUTHENTICATION_FAILED
    assert isinstance(fr, IkeSaFailed) and fr.notify == NotifyType.AUTHENTICATION_FAILED


def test_unexpected_peer_identity_fails() -> None:
    i, r = pair(*configs(initiator={"remote_id": (IdType.ID_FQDN, b"someone-else")}))
    i.initiate(0.0)
    roundtrip(i, r)
    assert isinstance(events(i)[-1], IkeSaFailed)


def test_traffic_selectors_are_narrowed_and_unacceptable_ones_refused() -> None:
    wide = ChildConfig(
        "lan", ((parse_esp("aes128gcm16"), False),), (ts("10.1.0.0/16"),), (ts("10.2.0.0/16"),)
    )
    i, r = pair(*configs(initiator={"child": wide}))
    i.initiate(0.0)
    roundtrip(i, r)
    child = events(i)[1]
    assert isinstance(child, ChildSaEstablished)
    assert child.local_ts == (ts("10.1.0.0/24"),) and child.remote_ts == (ts("10.2.0.0/24"),)
    elsewhere = ChildConfig(
        "lan", ((parse_esp("aes128gcm16"), False),), (ts("172.16.0.0/24"),), (ts("10.2.0.0/24"),)
    )
    i, r = pair(*configs(initiator={"child": elsewhere}))
    i.initiate(0.0)
    roundtrip(i, r)
    ev = events(i)
    assert isinstance(ev[0], IkeSaEstablished)  # RFC 7296 §2.21.1: the IKE SA stands
    assert isinstance(ev[1], IkeSaFailed) and ev[1].notify == NotifyType.TS_UNACCEPTABLE


def test_tampered_message_is_dropped_silently() -> None:
    i, r = pair(*configs())
    i.initiate(0.0)
    roundtrip(i, r, drop=lambda d: d[18] == 35)  # hold back IKE_AUTH
    timer = i.get_timer()
    assert timer is not None
    i.handle_timer(timer)
    ((auth, _),) = i.datagrams_to_send(timer)
    forged = bytearray(auth)
    forged[-5] ^= 0x01
    r.receive_datagram(bytes(forged), I_ADDR, timer)
    assert r.dropped == 1 and r.datagrams_to_send(timer) == [] and r.state is IkeState.INIT_DONE
    r.receive_datagram(auth, I_ADDR, timer)
    roundtrip(i, r, now=timer)
    assert r.state is IkeState.ESTABLISHED and i.state is IkeState.ESTABLISHED


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 27, b"\xff" * 100, bytes(range(256))])
def test_garbage_is_dropped_and_counted(garbage: bytes) -> None:
    _, r = pair(*configs())
    r.receive_datagram(garbage, I_ADDR, 0.0)
    assert r.dropped == 1 and r.datagrams_to_send(0.0) == []


def test_delete_closes_both_sides() -> None:
    i, r, _, _ = established()
    r.delete(1.0)
    roundtrip(i, r, now=1.0)
    assert i.state is IkeState.CLOSED and r.state is IkeState.CLOSED
    assert events(i) == [IkeSaClosed("site", by_peer=True)]
    assert events(r) == [IkeSaClosed("site", by_peer=False)]


def test_narrow_intersects_ranges_and_protocols() -> None:
    a = TrafficSelector(
        6, 0, 65535, ipaddress.ip_address("10.0.0.0"), ipaddress.ip_address("10.0.255.255")
    )
    b = TrafficSelector(
        0, 80, 80, ipaddress.ip_address("10.0.1.0"), ipaddress.ip_address("10.1.0.0")
    )
    assert narrow((a,), (b,)) == (
        TrafficSelector(
            6, 80, 80, ipaddress.ip_address("10.0.1.0"), ipaddress.ip_address("10.0.255.255")
        ),
    )
    udp = replace(b, ip_protocol=17)
    assert narrow((a,), (udp,)) == ()
    v6 = TrafficSelector(
        0, 0, 65535, ipaddress.ip_address("2001:db8::"), ipaddress.ip_address("2001:db8::ffff")
    )
    assert narrow((a,), (v6,)) == ()
