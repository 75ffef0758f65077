"""Two IKE daemons over real UDP sockets on loopback negotiate an IKE SA and a Child SA."""

from __future__ import annotations

import asyncio
import socket

import pytest

from controller.daemon import IkeDaemon, PeerConfig
from controller.ike.ike_sa import ChildSaEstablished, Event, IkeSa, IkeSaEstablished
from tests.test_ike_sa import configs


def free_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_daemons_establish_over_udp() -> None:
    async def main() -> tuple[list[Event], list[Event], int]:
        p = free_ports(4)
        i_cfg, r_cfg = configs()
        got_i: list[Event] = []
        got_r: list[Event] = []
        done = asyncio.Event()

        def record(into: list[Event]) -> object:
            def on_event(sa: IkeSa, event: Event) -> None:
                into.append(event)
                if sum(isinstance(e, ChildSaEstablished) for e in got_i + got_r) == 2:
                    done.set()
            return on_event

        initiator = IkeDaemon([PeerConfig(i_cfg, ("127.0.0.1", p[2]))], "127.0.0.1", p[0], p[1],
                              on_event=record(got_i))  # type: ignore[arg-type]
        responder = IkeDaemon([PeerConfig(r_cfg, ("127.0.0.1", p[0]))], "127.0.0.1", p[2], p[3],
                              on_event=record(got_r))  # type: ignore[arg-type]
        await initiator.start()
        await responder.start()
        stop = asyncio.Event()
        timers = [asyncio.create_task(d.run_timers(stop)) for d in (initiator, responder)]
        try:
            initiator.initiate("site")
            await asyncio.wait_for(done.wait(), timeout=10)
        finally:
            stop.set()
            await asyncio.gather(*timers)
            initiator.close()
            responder.close()
        return got_i, got_r, len(responder.sas)

    got_i, got_r, responder_sas = asyncio.run(main())
    assert [type(e) for e in got_i] == [IkeSaEstablished, ChildSaEstablished]
    assert [type(e) for e in got_r] == [IkeSaEstablished, ChildSaEstablished]
    ci, cr = got_i[1], got_r[1]
    assert isinstance(ci, ChildSaEstablished) and isinstance(cr, ChildSaEstablished)
    assert ci.spi_out == cr.spi_in and ci.enc_key_out == cr.enc_key_in
    assert responder_sas == 1


def test_unsolicited_garbage_is_counted_not_answered() -> None:
    async def main() -> int:
        p = free_ports(2)
        d = IkeDaemon([], "127.0.0.1", p[0], p[1])
        await d.start()
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            for payload in (b"x", bytes(40), b"\xff" * 60):
                s.sendto(payload, ("127.0.0.1", p[0]))
            s.sendto(b"\x00\x00\x00\x00" + bytes(40), ("127.0.0.1", p[1]))
            await asyncio.sleep(0.2)
            try:
                s.recv(100)
                answered = True
            except BlockingIOError:
                answered = False
            s.close()
            assert not answered
            return d.dropped
        finally:
            d.close()

    assert asyncio.run(main()) == 4


def test_a_retransmitted_ike_sa_init_finds_the_same_responder_and_half_open_sas_expire() -> None:
    """RFC 7296 §2.1: a repeated request is answered from the SA that answered it, not by a
    second responder with its own key exchange; a half-open SA that never authenticates is
    dropped after the timeout."""
    i_cfg, r_cfg = configs()
    now = [100.0]
    responder = IkeDaemon([PeerConfig(r_cfg, ("127.0.0.1", 500))], "127.0.0.1",
                          clock=lambda: now[0])
    initiator = IkeSa(i_cfg, initiator=True, local=("127.0.0.1", 500),
                      remote=("127.0.0.1", 500))
    initiator.initiate(now[0])
    (init, _), = initiator.datagrams_to_send(now[0])
    responder.received(init, ("127.0.0.1", 500), False)
    responder.received(init, ("127.0.0.1", 500), False)
    assert len({id(sa) for sa in responder.sas.values()}) == 1
    assert responder.half_open() == 1
    responder._expire_half_open(now[0] + 10)
    assert responder.half_open() == 1
    responder._expire_half_open(now[0] + responder.half_open_timeout + 1)
    assert responder.half_open() == 0 and not responder.sas
    assert responder.alerts["half_open_expired"] == 1


def test_past_the_cookie_threshold_a_request_is_challenged_statelessly() -> None:
    """RFC 7296 §2.6 in the daemon: with one SA half-open and a threshold of 1, a new
    IKE_SA_INIT gets a COOKIE challenge and leaves no state; sent again with the cookie, it
    is answered."""
    i_cfg, r_cfg = configs()
    now = [100.0]
    responder = IkeDaemon([PeerConfig(r_cfg, ("127.0.0.1", 500))], "127.0.0.1",
                          clock=lambda: now[0], cookie_threshold=1)
    first = IkeSa(i_cfg, initiator=True, local=("127.0.0.1", 500), remote=("127.0.0.1", 500))
    first.initiate(now[0])
    (init, _), = first.datagrams_to_send(now[0])
    responder.received(init, ("127.0.0.1", 500), False)
    assert responder.half_open() == 1
    second = IkeSa(i_cfg, initiator=True, local=("127.0.0.1", 500), remote=("127.0.0.1", 500))
    second.initiate(now[0])
    (init2, _), = second.datagrams_to_send(now[0])
    assert responder.cookies is not None
    challenge = responder.cookies.check(init2, ("127.0.0.1", 500), 1, now[0])
    responder.received(init2, ("127.0.0.1", 500), False)
    assert responder.alerts["cookie_challenge"] == 1
    assert responder.half_open() == 1  # nothing kept for the challenged request
    assert challenge is not None
    second.receive_datagram(challenge, ("127.0.0.1", 500), now[0])
    (retry, _), = second.datagrams_to_send(now[0])
    responder.received(retry, ("127.0.0.1", 500), False)
    assert responder.half_open() == 2 and responder.alerts["cookie_challenge"] == 1


def test_the_controller_runs_with_its_own_gc_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """controller/run.py ``_serve`` sets the collector's first thresholds (GC_THRESHOLD0/1)
    for the life of the controller: the default's collections cost ~8% of IKE setup CPU."""
    import gc

    import controller.gateway
    from controller import run

    seen: list[tuple[int, ...]] = []

    async def serve(cfg: object, path: str) -> int:
        seen.append(gc.get_threshold()[:2])
        return 0

    monkeypatch.setattr(controller.gateway, "serve", serve)
    before = gc.get_threshold()
    try:
        assert run._serve(None, "x.yaml") == 0  # type: ignore[arg-type]
    finally:
        gc.set_threshold(*before)
    assert seen == [(run.GC_THRESHOLD0, run.GC_THRESHOLD1)] and before[0] < run.GC_THRESHOLD0
