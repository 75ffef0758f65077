"""The controller's side of the data plane: when its SA deltas leave (controller/gateway.py
``_on_event``), and where the data plane's counter reports land (``_update_counters``).

A real gateway (no data plane process) on loopback UDP, on uvloop as ``espline run`` has
it, a real SUB socket on its SA publisher, and initiators on espline's sans-IO core sending
real datagrams:

- Child SAs a turn of the event loop creates while *answering* requests (IKE_AUTH as the
  responder) travel to the data plane as one message, and that message is out before any of
  the answers that let a peer use them (make-before-break, DESIGN §5);
- a Child SA created from a peer's *answer* (we initiated) goes out at once, in the event's
  own handling: the peer may already send on it;
- a counter report reaches the Child SAs whose SAs it names, and only them.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import uvloop
import zmq

from controller.config import parse_config
from controller.gateway import Gateway
from controller.ike.events import ChildSaEstablished, Event
from controller.ike.ike_sa import IkeSa
from pipeline.sadist import decode_message
from tests.test_ike_daemon import free_ports
from tests.test_ike_sa import configs

LO = "127.0.0.1"


def gateway_config(tmp: Path, ike_port: int, natt_port: int) -> dict[str, Any]:
    """The responder's side of tests/test_ike_sa.py ``configs()``, for peers on loopback."""
    return {
        "controller": {"ike_port": ike_port, "natt_port": natt_port},
        "dataplane": {"endpoints": {"runtime_dir": str(tmp / "run")}},
        "connections": {"site": {
            "version": 2, "local_addrs": [LO], "remote_addrs": [LO],
            "proposals": ["aes128gcm16-prfsha256-x25519"],
            "local": {"auth": "psk", "id": "gw-b.example.net"},
            "remote": {"auth": "psk", "id": "gw-a.example.net"},
            "children": {"lan": {"local_ts": ["10.2.0.0/24"], "remote_ts": ["10.1.0.0/24"],
                                 "esp_proposals": ["aes128gcm16"], "start_action": "none"}},
        }},
        "secrets": {"ike": [{"id": ["gw-a.example.net", "gw-b.example.net"],
                             "secret": "a long pre-shared key"}]},
    }


class Watch:
    """The data plane's view: a SUB socket on the gateway's SA publisher, and the order in
    which the gateway's datagrams and delta messages went out."""

    def __init__(self, gw: Gateway) -> None:
        assert gw.publisher is not None and gw._ctx is not None
        self.sub = gw._ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(gw.publisher.endpoints[0])
        self.messages: list[list[dict[str, Any]]] = []
        # For each datagram the gateway transmitted: the delta messages out before it.
        self.before_datagram: list[int] = []
        transmit = gw.daemon._transmit

        def watched(data: bytes, addr: tuple[str, int], natt: bool) -> None:
            self.drain()
            self.before_datagram.append(len(self.messages))
            transmit(data, addr, natt)

        gw.daemon._transmit = watched  # type: ignore[method-assign]

    def close(self) -> None:
        self.sub.close(linger=0)  # before the gateway's context ends

    def drain(self) -> None:
        while self.sub.poll(50):  # a message sent before now arrives well within this
            message = decode_message(self.sub.recv())
            self.messages.append(message if isinstance(message, list) else [message])

    def installs(self) -> list[int]:
        """Per message, the SAs it installs."""
        return [sum(d["op"] == "install" for d in m) for m in self.messages]


async def start(tmp: Path) -> tuple[Gateway, Watch, tuple[int, int]]:
    ike, natt = free_ports(2)
    gw = Gateway(parse_config(gateway_config(tmp, ike, natt), allowed_cpus=[0]),
                 start_dataplane=False)
    await gw.start()
    watch = Watch(gw)
    await asyncio.sleep(0.2)  # the SUB socket's subscription reaches the publisher
    watch.drain()  # the TRAP/DISCARD policies published at start
    watch.messages.clear()
    return gw, watch, (ike, natt)


def stop(gw: Gateway, watch: Watch, *socks: socket.socket) -> None:
    """Close what a test opened: its initiators' sockets, the watch, the gateway."""
    for sock in socks:
        sock.close()
    watch.close()
    gw.daemon.close()
    gw.close()


def initiators(ike: int, count: int) -> tuple[socket.socket, list[IkeSa]]:
    """``count`` initiators of tests/test_ike_sa.py ``configs()`` on one loopback socket,
    each with its IKE_SA_INIT request ready for the gateway's IKE port ``ike``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LO, 0))
    sock.setblocking(False)
    i_cfg, _ = configs()
    sas = [IkeSa(i_cfg, initiator=True, local=sock.getsockname(), remote=(LO, ike),
                 random=os.urandom) for _ in range(count)]
    for sa in sas:
        sa.initiate(0.0)
    return sock, sas


async def exchange(sock: socket.socket, sas: list[IkeSa], port: int) -> None:
    """Every initiator's pending request to the gateway, sent back to back (so that the
    gateway reads them in one loop turn), then every answer fed back."""
    for sa in sas:
        for data, _ in sa.datagrams_to_send(0.0):
            sock.sendto(data, (LO, port))
    loop = asyncio.get_running_loop()
    by_spi = {sa.spi_i: sa for sa in sas}
    for _ in sas:
        data = await asyncio.wait_for(loop.sock_recv(sock, 65535), 5)
        by_spi[data[:8]].receive_datagram(data, (LO, port), 0.0)


def test_child_sas_made_answering_requests_go_in_one_message_before_the_answers(
        tmp_path: Path) -> None:
    count = 6

    async def main() -> Watch:
        gw, watch, (ike, _) = await start(tmp_path)
        sock, sas = initiators(ike, count)
        try:
            await exchange(sock, sas, ike)  # IKE_SA_INIT: no SA for the data plane yet
            assert watch.messages == [] or watch.installs() == [0] * len(watch.messages)
            watch.messages.clear()
            answers = len(watch.before_datagram)
            await exchange(sock, sas, ike)  # IKE_AUTH: a Child SA each
            assert all(sa.state.name == "ESTABLISHED" for sa in sas)
            watch.drain()
            auth = watch.before_datagram[answers:]
            assert len(auth) == count
            # Every answer went out after the message that installed its Child SA.
            assert min(auth) >= 1 and watch.installs()[0] > 0
            for k, seen in enumerate(auth):
                assert sum(watch.installs()[:seen]) >= 2 * (k + 1)
            return watch
        finally:
            stop(gw, watch, sock)

    watch = uvloop.run(main())  # the controller's loop (controller/run.py)
    assert sum(watch.installs()) == 2 * count  # an inbound and an outbound SA each
    # Read in one turn, answered in one turn: far fewer messages than Child SAs (one, unless
    # the loop happened to read the requests over two turns).
    assert len(watch.messages) <= 2, watch.installs()


def test_a_child_sa_made_from_a_peers_answer_goes_at_once(tmp_path: Path) -> None:
    async def main() -> tuple[list[int], int]:
        gw, watch, _ = await start(tmp_path)
        try:
            i_cfg, r_cfg = configs()
            # An SA of ours as the initiator, already answered: its Child SA event comes
            # while the gateway handles no request (a peer's answer, a timer, an operator).
            ours = IkeSa(replace(r_cfg, name="site"), initiator=True, local=(LO, 500),
                         remote=(LO, 501), random=os.urandom)
            peer = IkeSa(i_cfg, initiator=False, local=(LO, 501), remote=(LO, 500),
                         random=os.urandom)
            ours.initiate(0.0)
            for _ in range(2):
                for data, _addr in ours.datagrams_to_send(0.0):
                    peer.receive_datagram(data, (LO, 500), 0.0)
                for data, _addr in peer.datagrams_to_send(0.0):
                    ours.receive_datagram(data, (LO, 501), 0.0)
            events: list[Event] = []
            while (event := ours.next_event()) is not None:
                events.append(event)
            assert any(isinstance(e, ChildSaEstablished) for e in events)
            assert not gw.daemon.answering
            for event in events:
                gw._on_event(ours, event)  # as IkeDaemon._flush hands them over
            watch.drain()  # no loop turn has ended: only what was sent at once is here
            at_once = watch.installs()
            await asyncio.sleep(0.05)
            watch.drain()
            return at_once, sum(watch.installs())
        finally:
            stop(gw, watch)

    at_once, total = uvloop.run(main())
    assert at_once == [2] and total == 2


def test_a_counter_report_reaches_the_child_sas_it_names(tmp_path: Path) -> None:
    async def main() -> None:
        gw, watch, (ike, _) = await start(tmp_path)
        sock, sas = initiators(ike, 3)
        try:
            await exchange(sock, sas, ike)
            await exchange(sock, sas, ike)
            children = [(entry, child) for entry in gw.ike.values()
                        for child in entry.children.values()]
            assert len(children) == 3
            (e0, busy), (e1, gone), (_, idle) = children
            gw.stats = {"sas": [
                {"index": busy.index_in, "bytes": 1400, "packets": 1},
                {"index": busy.index_out, "bytes": 2800, "packets": 2, "seq_out": 2},
                {"index": 10_000, "bytes": 5, "packets": 5},  # an SA no Child SA has
            ]}
            gw._update_counters()
            assert busy.counters == {"bytes-in": 1400, "packets-in": 1,
                                     "bytes-out": 2800, "packets-out": 2}
            zero = {"bytes-in": 0, "packets-in": 0, "bytes-out": 0, "packets-out": 0}
            assert idle.counters == zero and gone.counters == zero
            # A Child SA gone: a late report that still names its SAs changes nothing.
            gw._remove_child(e1, gone)
            gw.stats = {"sas": [{"index": gone.index_in, "bytes": 9, "packets": 9}]}
            gw._update_counters()
            assert gone.counters == zero
            assert set(gw._by_index) == {busy.index_in, busy.index_out,
                                         idle.index_in, idle.index_out}
        finally:
            stop(gw, watch, sock)

    uvloop.run(main())


def test_a_reused_index_is_never_taken_from_the_sa_that_holds_it_now(tmp_path: Path) -> None:
    """SA indices come back into use once their SA is gone (SaPublisher.allocate): a late
    removal of the old SA (a rekeyed Child SA's outbound SA goes when its successor takes
    over, and again with the Child SA itself) leaves the index's new SA installed, and its
    counters mapped."""
    async def main() -> None:
        gw, watch, (ike, _) = await start(tmp_path)
        assert gw.publisher is not None and gw.publisher.table.sas is not None
        gw.publisher.quarantine = 0.0  # (60 s in service)
        sock, sas = initiators(ike, 1)
        try:
            await exchange(sock, sas, ike)
            await exchange(sock, sas, ike)
            [(entry_a, a)] = [(e, c) for e in gw.ike.values() for c in e.children.values()]
            # Its SAs go, as after a rekey (REKEY_GRACE), while the Child SA itself stays.
            gw._remove_index(a.index_out, a.record_out)
            gw._remove_index(a.index_in, a.record_in)
            sock2, sas2 = initiators(ike, 1)
            try:
                await exchange(sock2, sas2, ike)
                await exchange(sock2, sas2, ike)
            finally:
                sock2.close()
            [(_, b)] = [(e, c) for e in gw.ike.values() for c in e.children.values()
                        if c is not a]
            # A's inbound index is B's now; its outbound one was still named by the PROTECT
            # policy of their selectors when B's were handed out, so it was not.
            assert b.index_in == a.index_in and b.index_out not in (a.index_in, a.index_out)
            gw._remove_child(entry_a, a)  # the old Child SA goes: its indices are b's now
            await asyncio.sleep(0.05)
            table = gw.publisher.table.sas
            assert table[b.index_in] is b.record_in and table[b.index_out] is b.record_out
            assert gw._by_index[b.index_in][1] is b and gw._by_index[b.index_out][1] is b
        finally:
            stop(gw, watch, sock)

    uvloop.run(main())
