"""Two IKE SAs talking in memory (like aioquic's client_and_server): every exchange, lost and
duplicated messages, errors, and the keys they agree on carrying real ESP both ways."""

from __future__ import annotations

import ipaddress
import random as stdrandom
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from controller.ike.constants import IdType, NotifyType
from controller.ike.crypto import parse_ike_proposal
from controller.ike.ike_sa import (
    ChildConfig,
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaFailed,
    ChildSaRekeyed,
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


Address = tuple[str, int]


@dataclass
class Nat:
    """A NAPT in front of one side: each private (address, port) it sees leaving gets a
    public port of its own; answers to a public port go back to its private address."""

    public_ip: str
    next_port: int = 40000
    mappings: dict[Address, Address] = field(default_factory=dict)

    def outbound(self, private: Address) -> Address:
        if private not in self.mappings:
            self.mappings[private] = (self.public_ip, self.next_port)
            self.next_port += 1
        return self.mappings[private]

    def inbound(self, public: Address) -> Address | None:
        return next((p for p, q in self.mappings.items() if q == public), None)

    def rebind(self) -> None:
        """The NAT forgets its mappings (as after an idle timeout): new public ports."""
        self.mappings.clear()


@dataclass(frozen=True)
class Sent:
    """One datagram on the wire, as the receiver saw it."""

    sender: IkeSa
    src: Address  # after the NAT
    dst: Address  # as addressed by the sender (before the NAT's reverse mapping)
    data: bytes


def roundtrip(
    a: IkeSa,
    b: IkeSa,
    now: float = 0.0,
    drop: Callable[[bytes], bool] | None = None,
    max_steps: int = 50,
    *,
    nat: Nat | None = None,
    trace: list[Sent] | None = None,
) -> int:
    """Deliver datagrams both ways until none is left; returns how many were delivered.

    ``nat`` stands in front of ``a``. A datagram reaches its receiver only if it is sent to
    the receiver's address on its IKE port or its NAT-T port (the daemon's two sockets)."""
    delivered = 0
    for _ in range(max_steps):
        moved = False
        for src, dst in ((a, b), (b, a)):
            for data, addr in src.datagrams_to_send(now):
                moved = True
                if drop is not None and drop(data):
                    continue
                source = src.local
                target: Address | None = addr
                if nat is not None and src is a:
                    source = nat.outbound(src.local)
                elif nat is not None:
                    target = nat.inbound(addr)
                ports = (500, dst.config.natt_port)
                if target is None or target[0] != dst.local[0] or target[1] not in ports:
                    continue  # nobody listens there
                if trace is not None:
                    trace.append(Sent(src, source, addr, data))
                dst.receive_datagram(data, source, now)
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


@dataclass
class Ledger:
    """What a data plane fed by one side's events would hold: its Child SAs by inbound SPI.

    It checks the event contract on the way: a reported SA is new, a deleted one was
    there (with the same outbound SPI), and ``child_sas`` shows exactly what was reported."""

    sa: IkeSa
    live: dict[int, ChildSaEstablished] = field(default_factory=dict)
    log: list[object] = field(default_factory=list)

    def pump(self) -> list[object]:
        got = events(self.sa)
        for e in got:
            self.log.append(e)
            if isinstance(e, ChildSaEstablished | ChildSaRekeyed):
                new = e if isinstance(e, ChildSaEstablished) else e.new
                assert new.spi_in not in self.live, "an SA reported twice"
                self.live[new.spi_in] = new
            elif isinstance(e, ChildSaDeleted):
                assert self.live.pop(e.spi_in).spi_out == e.spi_out
        assert {c.spi_in for c in self.sa.child_sas} == set(self.live)
        return got

    def of(self, kind: type[object]) -> list[Any]:
        return [e for e in self.log if isinstance(e, kind)]


def assert_keys_match(a: ChildSaEstablished, b: ChildSaEstablished) -> None:
    """``a`` and ``b`` are the two ends of one Child SA: SPIs and keys cross."""
    assert (a.spi_out, a.spi_in) == (b.spi_in, b.spi_out)
    assert (a.enc_key_out, a.integ_key_out) == (b.enc_key_in, b.integ_key_in)
    assert (a.enc_key_in, a.integ_key_in) == (b.enc_key_out, b.integ_key_out)
    assert a.enc_key_in != a.enc_key_out
    assert (a.transform, a.esn, a.mode) == (b.transform, b.esn, b.mode)
    assert (a.local_ts, a.remote_ts) == (b.remote_ts, b.local_ts)


def assert_in_step(li: Ledger, lr: Ledger) -> None:
    """Both sides hold the same Child SAs, each end with the other's keys."""
    assert len(li.live) == len(lr.live)
    for spi_in, a in li.live.items():
        b = next(b for b in lr.live.values() if b.spi_out == spi_in)
        assert_keys_match(a, b)


class Wire:
    """An initiator and a responder in memory with a clock, their ledgers, and a network that
    loses, duplicates and reorders datagrams when asked to (``chaos``, seeded)."""

    def __init__(self, i: IkeSa, r: IkeSa) -> None:
        self.i, self.r = i, r
        self.li, self.lr = Ledger(i), Ledger(r)
        self.now = 0.0
        self.drop: Callable[[bytes], bool] | None = None
        self.rng: stdrandom.Random | None = None
        self.loss = self.duplicate = self.hold = 0.0
        self.delivered: list[tuple[IkeSa, bytes]] = []  # (receiver, datagram)

    @classmethod
    def established(cls, i_cfg: IkeConfig | None = None, r_cfg: IkeConfig | None = None) -> Wire:
        ci, cr = configs()
        wire = cls(*pair(i_cfg or ci, r_cfg or cr))
        wire.i.initiate(0.0)
        wire.flush()
        assert wire.i.state is IkeState.ESTABLISHED and wire.r.state is IkeState.ESTABLISHED
        return wire

    def chaos(
        self, seed: int, loss: float = 0.2, duplicate: float = 0.2, hold: float = 0.3
    ) -> None:
        self.rng = stdrandom.Random(seed)
        self.loss, self.duplicate, self.hold = loss, duplicate, hold

    def peer(self, sa: IkeSa) -> IkeSa:
        return self.r if sa is self.i else self.i

    def flush(self, max_steps: int = 200) -> None:
        """Deliver until nothing is in flight (lost datagrams wait for retransmission)."""
        held: list[tuple[IkeSa, bytes]] = []
        was_held: set[tuple[int, bytes]] = set()  # each datagram is overtaken at most once
        for _ in range(max_steps):
            pool = [
                (src, data)
                for src in (self.i, self.r)
                for data, _ in src.datagrams_to_send(self.now)
            ]
            if not pool and not held:
                break
            if self.rng is not None:
                self.rng.shuffle(pool)
            pool, held = held + pool, []
            for src, data in pool:
                if self.drop is not None and self.drop(data):
                    continue
                rng = self.rng
                if rng is not None and rng.random() < self.loss:
                    continue
                key = (id(src), data)
                if rng is not None and key not in was_held and rng.random() < self.hold:
                    was_held.add(key)
                    held.append((src, data))  # overtaken by whatever comes next
                    continue
                copies = 2 if rng is not None and rng.random() < self.duplicate else 1
                for _ in range(copies):
                    self.delivered.append((self.peer(src), data))
                    self.peer(src).receive_datagram(data, src.local, self.now)
        else:
            raise AssertionError("no quiescence")
        self.li.pump()
        self.lr.pump()

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, firing both sides' timers in order."""
        end = self.now + seconds
        spins = 0
        while True:
            due = [t for t in (self.i.get_timer(), self.r.get_timer()) if t is not None]
            if not due or min(due) > end:
                break
            spins = spins + 1 if min(due) <= self.now else 0
            assert spins < 100, "a timer that handle_timer does not move"
            self.now = max(self.now, min(due))
            for sa in (self.i, self.r):
                t = sa.get_timer()
                if t is not None and t <= self.now:
                    sa.handle_timer(self.now)
            self.flush()
        self.now = end

    def settle(self, seconds: float = 120.0) -> None:
        """Deliver, then let retransmissions run their course."""
        self.flush()
        self.advance(seconds)


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
    assert isinstance(ev[1], ChildSaFailed) and ev[1].notify == NotifyType.TS_UNACCEPTABLE
    assert ev[1].name == "lan" and i.state is IkeState.ESTABLISHED


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
    i, r, ei, er = established()
    ci, cr = ei[1], er[1]
    assert isinstance(ci, ChildSaEstablished) and isinstance(cr, ChildSaEstablished)
    r.delete(1.0)
    roundtrip(i, r, now=1.0)
    assert i.state is IkeState.CLOSED and r.state is IkeState.CLOSED
    # Each Child SA is reported gone with the IKE SA, before the IKE SA itself.
    assert events(i) == [
        ChildSaDeleted("lan", ci.spi_in, ci.spi_out),
        IkeSaClosed("site", by_peer=True),
    ]
    assert events(r) == [
        ChildSaDeleted("lan", cr.spi_in, cr.spi_out),
        IkeSaClosed("site", by_peer=False),
    ]
    assert i.child_sas == () and r.child_sas == ()
    assert i.get_timer() is None and r.get_timer() is None


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
