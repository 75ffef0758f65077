"""The controller process (DESIGN §2): IKE, the SA registry, SA distribution, the data plane.

``espline run -c FILE`` with a ``connections`` section runs this. One asyncio loop (uvloop
when installed) holds:

- the IKE daemon (controller/daemon.py) for the configured connections;
- the SA registry: IKE SAs and their Child SAs, with the data plane's indices and counters;
- the SA publisher (pipeline/sadist.py): every Child SA is pushed to the data plane as an
  inbound and an outbound record plus the SPD, make-before-break on rekey (DESIGN §5);
- the data plane, started as its own process (the I/O process, which starts the pinned
  workers), following the publisher and pushing its counters back once a second.

Event handling is the only place where IKE state turns into data plane state; the IKE core
knows nothing of indices, the data plane nothing of IKE.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import heapq
import ipaddress
import json
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

import zmq

from controller.config import Config, ConfigError, DataplaneConfig
from controller.connections import ChildSpec, Connection, PskStore, network_selectors
from controller.daemon import IkeDaemon, PeerConfig
from controller.ike.ike_sa import (
    ChildConfig,
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    Event,
    IkeConfig,
    IkeSa,
    IkeSaClosed,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaRekeyed,
)
from controller.ike.payloads import TrafficSelector
from controller.ike.state import LocalStateError
from controller.keylog import KeyLog
from controller.logs import IkeSaLogger, sa_logger
from pipeline import heap
from pipeline.dispatch import Action, Policy
from pipeline.sadist import SaPublisher
from pipeline.sadist import address as _ip_address
from pipeline.satable import Direction, SaRecord, UdpEncap

__all__ = ["ChildEntry", "DataplaneJob", "Gateway", "IkeEntry", "ike_config", "run_dataplane"]

log = logging.getLogger("espline.controller")

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Selectors = tuple[tuple[IpNetwork, ...], tuple[IpNetwork, ...]]  # (local, remote)
TRAP_RANKS = 1 << 48  # the SPD ranks of TRAP/DISCARD entries: after every PROTECT entry
# Outbound sequence numbers: rekey this far before the counter's end, delete at the end
# (the data plane itself never sends past it: SEQ_OVERFLOW drops).
SEQ_HARD_32 = (1 << 32) - 1
SEQ_SOFT_32 = SEQ_HARD_32 - (1 << 24)
SEQ_HARD_64 = (1 << 64) - 1
SEQ_SOFT_64 = SEQ_HARD_64 - (1 << 32)
REKEY_GRACE = 2.0  # seconds a rekeyed SA outlives its replacement (packets in flight)
# The counters of a Child SA that carried nothing yet, shared (never modified)
_NO_TRAFFIC: dict[str, int] = {"bytes-in": 0, "packets-in": 0, "bytes-out": 0, "packets-out": 0}


# -- configuration -> IKE ----------------------------------------------------------------------

def child_config(spec: ChildSpec) -> ChildConfig:
    return ChildConfig(spec.name, spec.esp_proposals, network_selectors(spec.local_ts),
                       network_selectors(spec.remote_ts), spec.mode,
                       rekey_time=spec.rekey_time or None, life_time=spec.life_time or None)


def ike_config(conn: Connection, psks: PskStore, natt_port: int = 4500) -> IkeConfig:
    """The IKE core's view of a connection: its first child is negotiated in IKE_AUTH, the
    others with CREATE_CHILD_SA; rekey and DPD timers as configured (0: off). Each side
    authenticates with a shared key from ``psks`` or, with ``auth: pubkey``, with the
    certificates, key and CAs the connection read from its files."""
    local_id = conn.local_id
    psk = b""
    if conn.local.auth == "psk" or conn.remote.auth == "psk":
        found = psks.lookup(local_id, conn.remote.id)
        if found is None:
            side = "local" if conn.local.auth == "psk" else "remote"
            raise ConfigError(f"connections.{conn.name}.{side}.auth",
                              f"psk: no shared key in secrets for {local_id}"
                              + (f" and {conn.remote.id}" if conn.remote.id else ""))
        psk = found
    children = tuple(child_config(c) for c in conn.children)
    return IkeConfig(
        name=conn.name,
        proposals=conn.proposals,
        local_id=(local_id.type, local_id.data),
        remote_id=None if conn.remote.id is None else (conn.remote.id.type, conn.remote.id.data),
        psk=psk,
        force_encap=conn.encap,
        natt_port=natt_port,
        child=children[0],
        children=children[1:],
        rekey_time=conn.rekey_time or None,
        dpd_delay=conn.dpd_delay or None,
        dpd_timeout=conn.dpd_timeout or None,
        credential=conn.local.credential(),
        trust=conn.remote.trust_anchors(),
    )


def selector_networks(selectors: Iterable[TrafficSelector]) -> tuple[IpNetwork, ...]:
    """Negotiated address ranges as the prefixes the data plane's SPD matches."""
    return _selector_networks(tuple(selectors))


@functools.lru_cache(maxsize=1024)
def _selector_networks(selectors: tuple[TrafficSelector, ...]) -> tuple[IpNetwork, ...]:
    # Cached: the Child SAs of a connection mostly have the same selectors, and
    # summarizing ranges is not free; the result is immutable.
    nets: list[IpNetwork] = []
    for ts in selectors:
        nets += ipaddress.summarize_address_range(ts.start_address, ts.end_address)  # type: ignore[type-var, arg-type, unused-ignore]
    return tuple(nets)


def resolve_local(conn: Connection) -> str:
    """The connection's local address; ``0.0.0.0``/``::`` (one ConfigMap for every node of a
    Kubernetes DaemonSet) becomes the address this host uses towards the peer, from the
    kernel's route lookup (a connected UDP socket sends nothing)."""
    local = conn.local_addrs[0]
    if not ipaddress.ip_address(local).is_unspecified:
        return local
    remote = conn.remote_addrs[0]
    family = socket.AF_INET6 if ":" in remote else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((remote, conn.remote_port))
            return str(probe.getsockname()[0])
    except OSError as exc:
        raise ConfigError(f"connections.{conn.name}.local_addrs",
                          f"no route to {remote} to pick a local address from: "
                          f"{exc.strerror}") from None


# -- the registry ------------------------------------------------------------------------------

@dataclass
class ChildEntry:
    uniqueid: int
    name: str
    event: ChildSaEstablished
    index_in: int
    index_out: int
    installed: float  # wall clock
    local_port: int = 4500
    remote_port: int = 4500
    counters: dict[str, int] = field(default_factory=dict)
    rekeys: int = 0
    replaced: bool = False  # rekeyed: its successor carries on
    # Its selectors as SPD prefixes (computed once: summarizing ranges is not free).
    selectors: Selectors = ((), ())
    successor: ChildEntry | None = None  # a rekey we answered: outbound moves on our delete
    rekeying: bool = False  # a volume or sequence limit asked for a rekey
    deleting: bool = False
    # What it installed at index_in/index_out: removed by identity, as an index is handed
    # out again once its SA is gone (SaPublisher.allocate).
    record_in: SaRecord | None = None
    record_out: SaRecord | None = None


class Holders:
    """The Child SAs that hold one pair of selectors, by unique id. The newest (highest id)
    gives the pair's PROTECT entry its outbound SA; found in O(log n) amortized (a heap with
    stale ids skipped), not by a scan: a concentrator's clients may all share one pair."""

    __slots__ = ("children", "_ids")

    def __init__(self) -> None:
        self.children: dict[int, ChildEntry] = {}
        self._ids: list[int] = []  # negated unique ids: a max-heap, with stale ones

    def add(self, child: ChildEntry) -> None:
        self.children[child.uniqueid] = child
        heapq.heappush(self._ids, -child.uniqueid)

    def discard(self, uniqueid: int) -> None:
        self.children.pop(uniqueid, None)
        if not self.children:
            self._ids.clear()

    def newest(self) -> ChildEntry:
        while -self._ids[0] not in self.children:
            heapq.heappop(self._ids)
        return self.children[-self._ids[0]]

    def __len__(self) -> int:
        return len(self.children)


@dataclass
class IkeEntry:
    uniqueid: int
    conn: str
    sa: IkeSa
    created: float
    established: float | None = None
    nat_local: bool = False
    nat_remote: bool = False
    children: dict[int, ChildEntry] = field(default_factory=dict)  # by inbound SPI
    rekeys: int = 0
    closed: str | None = None  # why it went down
    # Its log lines: ``site-b[3] ...`` in text, ``ike``/``ike_id`` fields in JSON
    logger: IkeSaLogger = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.logger = sa_logger(log, self.conn, self.uniqueid)

    @property
    def state(self) -> str:
        return {"established": "ESTABLISHED", "deleting": "DELETING", "closed": "DELETED",
                "failed": "DELETED"}.get(self.sa.state.value, "CONNECTING")


# -- the data plane process --------------------------------------------------------------------

@dataclass(frozen=True)
class DataplaneJob:
    """What the I/O process needs (picklable: it crosses a spawn)."""

    dataplane: DataplaneConfig
    routes: tuple[str, ...]
    tun_mtu: int
    sa_updates: tuple[str, str]
    reports: str
    log_format: str = "text"
    log_level: str = "info"


def run_dataplane(job: DataplaneJob) -> None:
    """The I/O process body: adapters, then the data plane loop until SIGTERM."""
    from controller.logs import setup_logging
    from controller.run import build_io, settings_for
    from pipeline.dataplane import DataPlane

    _die_with_parent()
    setup_logging(job.log_format, job.log_level)
    heap.log_state()
    with ExitStack() as stack:
        inside, outside = build_io(job.dataplane, stack, routes=job.routes,
                                   tun_mtu=job.tun_mtu, nat_t=())
        # Counters reach the controller four times a second: list-sas and metrics stay fresh.
        settings = dataclasses.replace(settings_for(job.dataplane), stats_interval=0.25)
        plane = DataPlane(settings, [], [], inside, outside,
                          sa_updates=job.sa_updates, reports=job.reports)

        def on_signal(signum: int, frame: object) -> None:
            plane.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        heap.settle()  # the collector walks only what the SAs and packets make
        plane.run()


def _die_with_parent() -> None:
    """SIGTERM this process when the controller dies, however it dies (prctl(2)
    PR_SET_PDEATHSIG): the data plane never outlives the process that holds its SAs."""
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the parent is already gone
        os.kill(os.getpid(), signal.SIGTERM)


def _tun_mtu(cfg: Config) -> int:
    """The TUN MTU that fits every configured ESP proposal UDP-encapsulated (the worst case:
    what is negotiated is only known later)."""
    from pipeline.mtu import inner_mtu

    mtus = [inner_mtu(cfg.dataplane.mtu, transform, ":" in conn.local_addrs[0], True,
                      child.mode.name == "TUNNEL")
            for conn in cfg.conns.values() for child in conn.children
            for transform, _ in child.esp_proposals]
    return min(mtus) if mtus else 1400


# -- the gateway -------------------------------------------------------------------------------

class Gateway:
    def __init__(self, cfg: Config, *, start_dataplane: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.start_dataplane = start_dataplane
        self.clock = clock
        self.psks = PskStore(cfg.shared_keys)
        self.conns: dict[str, Connection] = dict(cfg.conns)
        # IKE listens on the wildcard address: connections loaded later (VICI) may use any
        # local address; each IKE SA knows its own (for the NAT-D hashes).
        families = {":" in resolve_local(conn) for conn in self.conns.values()}
        if len(families) > 1:
            raise ConfigError("connections", "IPv4 and IPv6 connections in one gateway are "
                              "not supported yet")
        self.local = "::" if families == {True} else "0.0.0.0"
        self.started_at = time.time()
        self.daemon = IkeDaemon([], self.local, cfg.controller.ike_port,
                                cfg.controller.natt_port, on_event=self._on_event,
                                cookie_threshold=cfg.controller.cookie_threshold)
        self._rebuild_peers(strict=True)
        self.ike: dict[int, IkeEntry] = {}  # by unique id
        self._by_sa: dict[int, IkeEntry] = {}  # by id(IkeSa)
        self._next_ike = 1
        self._next_child = 1
        self.runtime_dir = cfg.dataplane.endpoints.runtime_dir
        self.publisher: SaPublisher | None = None
        self._turn_held = False  # SA deltas and IKE datagrams wait for the turn's end
        # The Child SA of each data plane SA index (its inbound and its outbound SA), while
        # it is one of its IKE SA's children: the counter reports name SAs by index.
        self._by_index: dict[int, tuple[IkeEntry, ChildEntry]] = {}
        self.stats: dict[str, Any] = {}  # the data plane's last counter report
        self.worker_stats: dict[int, dict[str, Any]] = {}  # each worker's last report
        # (event, IKE SA, Child SA or None, up): ike-updown, child-updown, ike-rekey, ...
        self.listeners: list[Callable[[str, IkeEntry, ChildEntry | None, bool], None]] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        # The SPD's PROTECT entries by selectors: the Child SAs that have them (the newest
        # wins), kept up to date per install/remove rather than rebuilt from every SA.
        self._protect: dict[Selectors, Holders] = {}
        self._up: dict[tuple[str, str], int] = {}  # (connection, child) -> Child SAs
        # The SPD as the data plane has it, by rank (pipeline/dispatch.py); the rank of
        # each PROTECT entry's selectors and of each configured child's TRAP/DISCARD entry.
        self._spd: dict[int, Policy] = {}
        self._ranks: dict[Selectors, int] = {}
        self._next_rank = 0
        self._trap_ranks: dict[tuple[str, str], int] = {}
        self.keylog: KeyLog | None = None
        if cfg.controller.keylog_dir is not None:
            # Opt-in (DESIGN §6): session keys on disk, for Wireshark, when an operator asks.
            self.keylog = KeyLog(cfg.controller.keylog_dir)
            log.warning("key log enabled: IKE and ESP session keys are written to %s",
                        cfg.controller.keylog_dir)
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._reports: zmq.Socket[bytes] | None = None
        self._dataplane: BaseProcess | None = None
        self._stop = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        os.makedirs(self.runtime_dir, mode=0o700, exist_ok=True)
        tag = os.getpid()
        ctx = self._ctx = zmq.Context()
        endpoints = (f"ipc://{self.runtime_dir}/sa-pub-{tag}",
                     f"ipc://{self.runtime_dir}/sa-snapshot-{tag}")
        reports = f"ipc://{self.runtime_dir}/reports-{tag}"
        publisher = self.publisher = SaPublisher(ctx, *endpoints)
        self._reports = ctx.socket(zmq.PULL)
        self._reports.setsockopt(zmq.LINGER, 0)
        self._reports.bind(reports)
        os.chmod(reports.removeprefix("ipc://"), 0o600)
        loop = asyncio.get_running_loop()
        self._publish_policies()  # the TRAP policies, before any SA exists
        self._watch(loop, publisher.snapshot_socket, publisher.serve_snapshots)
        self._watch(loop, self._reports, self._read_reports)
        if self.start_dataplane:
            # No routes at creation: they follow the SPD the data plane receives (every
            # configured child's remote selectors, see DataPlane.set_policies).
            job = DataplaneJob(self.cfg.dataplane, (), _tun_mtu(self.cfg), endpoints,
                               reports, self.cfg.controller.log_format,
                               self.cfg.controller.log_level)
            proc = multiprocessing.get_context("spawn").Process(
                target=run_dataplane, args=(job,), name="espline-io")  # it has children
            with heap.spawning(self.cfg.dataplane.hugepages):
                proc.start()
            self._dataplane = proc
        await self.daemon.start()
        self._timers = asyncio.create_task(self.daemon.run_timers(self._stop))
        for conn in self.conns.values():
            if any(ch.start_action == "start" for ch in conn.children):
                self.initiate(conn.name)

    def _watch(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket[bytes],
               handler: Callable[[], object]) -> None:
        """Run ``handler`` whenever ``sock`` has input. ZeroMQ's FD is edge-triggered: the
        handler drains everything, and EVENTS is re-checked after it."""
        def ready() -> None:
            while int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                handler()

        loop.add_reader(sock.getsockopt(zmq.FD), ready)  # type: ignore[arg-type]
        loop.call_soon(ready)

    def _read_reports(self) -> None:
        assert self._reports is not None
        while True:
            try:
                data = self._reports.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = json.loads(data)
            except ValueError:
                continue
            if "acquire" in message:
                self._on_acquire(str(message["acquire"]))
            elif "worker" in message:
                self.worker_stats[int(message["worker"])] = message
            else:
                self.stats = message
                self._update_counters()

    def _on_acquire(self, name: str) -> None:
        """Traffic hit the TRAP policy of ``connection/child``: negotiate it, unless an IKE
        SA of that connection is already on its way."""
        conn = name.split("/", 1)[0]
        if conn not in self.conns or any(e.conn == conn and e.closed is None
                                         for e in self.ike.values()):
            return
        log.info("%s: traffic for a trapped child (%s): initiating", conn, name,
                 extra={"ike": conn})
        try:
            self.initiate(conn)
        except (KeyError, ConfigError) as exc:
            log.warning("%s: cannot initiate on acquire: %s", conn, exc)

    def _update_counters(self) -> None:
        """The report's counters into the Child SAs they belong to, and their limits
        checked. The report lists only SAs that carried traffic: the others keep zero
        counters (``_NO_TRAFFIC``, which no limit reaches: volumes are >= 0), and a report
        costs what those few SAs cost, not a visit of every Child SA of a concentrator."""
        # Each Child SA that carried traffic, with the report's figures of the indices it
        # owns (an index of a rekeyed Child SA, gone before the Child SA, may be another's).
        carried: dict[int, tuple[IkeEntry, ChildEntry, dict[int, dict[str, Any]]]] = {}
        for sa in self.stats.get("sas", []):
            owner = self._by_index.get(sa["index"])
            if owner is not None:
                entry, child = owner
                carried.setdefault(child.uniqueid, (entry, child, {}))[2][sa["index"]] = sa
        specs: dict[tuple[str, str], ChildSpec | None] = {}  # each child's, once a report
        for entry, child, figures in carried.values():
            cin, cout = figures.get(child.index_in, {}), figures.get(child.index_out, {})
            child.counters = {"bytes-in": cin.get("bytes", 0),
                              "packets-in": cin.get("packets", 0),
                              "bytes-out": cout.get("bytes", 0),
                              "packets-out": cout.get("packets", 0)}
            if not child.replaced:
                key = (entry.conn, child.name)
                if key not in specs:
                    specs[key] = self._child_spec(*key)
                self._check_limits(entry, child, int(cout.get("seq_out", 0)), specs[key])

    def _child_spec(self, conn_name: str, child_name: str) -> ChildSpec | None:
        """The configuration of a connection's child, if it is still configured."""
        conn = self.conns.get(conn_name)
        return next((c for c in conn.children if c.name == child_name), None) if conn else None

    def _check_limits(self, entry: IkeEntry, child: ChildEntry, seq_out: int,
                      spec: ChildSpec | None) -> None:
        """Volume lifetimes and sequence-number exhaustion, from the data plane's counters:
        past a soft limit the Child SA is rekeyed, past a hard one deleted (RFC 4301 §4.4.2.1;
        RFC 4303 §3.3.3: a 32-bit counter must not cycle, so rekey well before it would)."""
        c = child.counters
        octets = max(c.get("bytes-in", 0), c.get("bytes-out", 0))
        packets = max(c.get("packets-in", 0), c.get("packets-out", 0))
        seq_limit = SEQ_SOFT_64 if child.event.esn else SEQ_SOFT_32
        hard = spec is not None and ((spec.life_bytes and octets >= spec.life_bytes) or
                                     (spec.life_packets and packets >= spec.life_packets))
        if hard or seq_out >= (SEQ_HARD_64 if child.event.esn else SEQ_HARD_32):
            if not child.deleting:
                child.deleting = True
                self._log(entry).info("CHILD_SA %s{%d} reached its hard limit: deleting",
                                      child.name, child.uniqueid)
                with contextlib.suppress(KeyError, LocalStateError):  # already gone
                    entry.sa.delete_child(child.event.spi_in, self.clock())
                    self.poke(entry.sa)
            return
        soft = seq_out >= seq_limit or (spec is not None and (
            (spec.rekey_bytes and octets >= spec.rekey_bytes)
            or (spec.rekey_packets and packets >= spec.rekey_packets)))
        if soft and not child.rekeying:
            child.rekeying = True
            self._log(entry).info("CHILD_SA %s{%d} reached its soft limit (%d bytes, %d "
                                  "packets, sequence %d): rekeying", child.name,
                                  child.uniqueid, octets, packets, seq_out)
            with contextlib.suppress(KeyError, LocalStateError):  # already gone
                entry.sa.rekey_child(child.event.spi_in, self.clock())
                self.poke(entry.sa)

    async def stop(self, grace: float = 1.0) -> None:
        """Delete every IKE SA (the peer learns at once), then stop everything we started."""
        now = self.clock()
        for entry in list(self.ike.values()):
            if entry.sa.state.value == "established":
                entry.sa.delete(now)
                self.poke(entry.sa)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
                e.sa.state.value == "deleting" for e in self.ike.values()):
            await asyncio.sleep(0.05)
        self._stop.set()
        with contextlib.suppress(Exception):
            await self._timers
        self.daemon.close()
        self.close()

    def close(self) -> None:
        proc = self._dataplane
        if proc is not None and proc.pid is not None:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
            self._dataplane = None
        with contextlib.suppress(Exception):
            loop = asyncio.get_running_loop()
            for sock in (self._reports, getattr(self.publisher, "snapshot_socket", None)):
                if sock is not None:
                    loop.remove_reader(sock.getsockopt(zmq.FD))  # type: ignore[arg-type]
        self._end_turn()
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None
        if self._reports is not None:
            endpoint = self._reports.getsockopt(zmq.LAST_ENDPOINT)
            path = bytes(endpoint).decode().removeprefix("ipc://")
            self._reports.close(linger=0)
            self._reports = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    @property
    def dataplane_pid(self) -> int | None:
        return None if self._dataplane is None else self._dataplane.pid

    # -- connections -----------------------------------------------------------------------
    def _rebuild_peers(self, strict: bool = False) -> None:
        """The IKE daemon's peer list from the connections and the shared keys. A connection
        without a key yet (VICI loads credentials and connections separately) is left out
        until one arrives; from the configuration file (``strict``) that is an error."""
        peers = []
        for conn in self.conns.values():
            try:
                ike = ike_config(conn, self.psks, self.cfg.controller.natt_port)
            except ConfigError:
                if strict:
                    raise
                log.warning("connection %s: no shared key for its identities yet", conn.name)
                continue
            peers.append(PeerConfig(ike, (conn.remote_addrs[0], conn.remote_port),
                                    resolve_local(conn)))
        self.daemon.peers = peers

    def set_connection(self, conn: Connection) -> bool:
        """Add or replace a connection; established SAs are left alone. False: unchanged."""
        if self.conns.get(conn.name) == conn:
            return False
        local = resolve_local(conn)
        if (":" in local) != (":" in self.local):
            raise ConfigError(f"connections.{conn.name}.local_addrs",
                              f"{local}: this gateway's IKE runs over "
                              f"{'IPv6' if ':' in self.local else 'IPv4'}")
        self.conns[conn.name] = conn
        self._rebuild_peers()
        if self.publisher is not None:
            self._publish_policies()
        return True

    def remove_connection(self, name: str) -> bool:
        if self.conns.pop(name, None) is None:
            return False
        self._rebuild_peers()
        if self.publisher is not None:
            self._publish_policies()
        return True

    def shared_keys_changed(self) -> None:
        self._rebuild_peers()

    # -- operations -----------------------------------------------------------------------
    def initiate(self, name: str) -> IkeEntry:
        if name not in self.conns:
            raise KeyError(name)
        if not any(p.ike.name == name for p in self.daemon.peers):
            raise ConfigError(f"connections.{name}", "no shared key for its identities")
        sa = self.daemon.initiate(name)
        return self._entry(sa)

    def terminate(self, entry: IkeEntry) -> None:
        if entry.sa.state.value == "established":
            entry.sa.delete(self.clock())
            self.poke(entry.sa)

    def poke(self, sa: IkeSa) -> None:
        """Send what an operation on ``sa`` queued and deliver its events."""
        self.daemon._flush(sa)

    async def wait_until(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until ``done()`` holds (checked after every IKE event); False on timeout."""
        if done():
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((done, future))
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except TimeoutError:
            return done()
        finally:
            self._waiters = [w for w in self._waiters if w[1] is not future]

    def _wake_waiters(self) -> None:
        for done, future in list(self._waiters):
            if not future.done() and done():
                future.set_result(None)

    # -- IKE events -> registry and data plane ----------------------------------------------
    def _entry(self, sa: IkeSa) -> IkeEntry:
        entry = self._by_sa.get(id(sa))
        if entry is None:
            entry = IkeEntry(self._next_ike, sa.config.name, sa, time.time())
            self._next_ike += 1
            self._by_sa[id(sa)] = entry
            self.ike[entry.uniqueid] = entry
        return entry

    def _on_event(self, sa: IkeSa, event: Event) -> None:
        try:
            pub = self.publisher
            if pub is None:
                self._handle(sa, event)
            elif self.daemon.answering:
                # From a peer's request: the peer can use what it changed only once our
                # answer reaches it. The deltas wait for the end of the loop turn, and so
                # do the datagrams from then on: then the data plane gets the turn's deltas
                # as one message (under load the controller answers several requests per
                # turn, and each message wakes the I/O process and every worker), and only
                # then the answers go out (make-before-break).
                self._hold_turn(pub)
                self._handle(sa, event)
            else:
                # From a peer's answer, a timer or an operator: sent at once, as early as
                # it can be (the ZeroMQ hop is asynchronous; a peer that answered a rekey
                # may already send on the new SA). Holding these to the end of the turn
                # lost packets as no_sa under rekeys (6395539).
                with pub.batch():
                    self._handle(sa, event)
                if self._turn_held:
                    pub.send_held()  # with what the turn held so far, in order
        finally:
            self._wake_waiters()

    def _hold_turn(self, pub: SaPublisher) -> None:
        if self._turn_held:
            return
        self._turn_held = True
        pub.hold()
        self.daemon.hold_sends()
        asyncio.get_running_loop().call_soon(self._end_turn)

    def _end_turn(self) -> None:
        """The deltas the turn held, then the datagrams that depend on them."""
        if not self._turn_held:
            return
        self._turn_held = False
        if self.publisher is not None:
            self.publisher.release()
        self.daemon.release_sends()

    def _handle(self, sa: IkeSa, event: Event) -> None:
        entry = self._entry(sa)
        if isinstance(event, IkeSaEstablished):
            entry.established = time.time()
            entry.nat_local, entry.nat_remote = event.nat_local, event.nat_remote
            self._log_ike_keys(sa)
            self._log(entry).info("IKE SA established with %s", sa.remote[0])
            self._emit("ike-updown", entry, None, True)
        elif isinstance(event, ChildSaEstablished):
            self._install_child(entry, event)
        elif isinstance(event, IkeSaFailed | IkeSaClosed):
            reason = event.reason if isinstance(event, IkeSaFailed) else (
                "deleted by peer" if event.by_peer else "deleted")
            self._log(entry).info("IKE SA down: %s", reason)
            entry.closed = reason
            for child in list(entry.children.values()):
                self._remove_child(entry, child)
            self._emit("ike-updown", entry, None, False)
            self.ike.pop(entry.uniqueid, None)
            self._by_sa.pop(id(sa), None)
        elif isinstance(event, ChildSaRekeyed):
            self._install_child(entry, event.new, replaces=event.old_spi_in,
                                switch=event.initiator)
        elif isinstance(event, ChildSaDeleted):
            gone = entry.children.get(event.spi_in)
            if gone is not None:
                self._remove_child(entry, gone)
        elif isinstance(event, IkeSaRekeyed):
            entry.rekeys += 1
            self._log_ike_keys(entry.sa)
            self._log(entry).info("IKE SA rekeyed")
            self._emit("ike-rekey", entry, None, True)

    @staticmethod
    def _log(entry: IkeEntry) -> IkeSaLogger:
        """Log lines bound to the IKE SA: ``site-b[3] ...`` in text, ``ike``/``ike_id``
        fields in JSON (controller/logs.py)."""
        return entry.logger

    def _log_ike_keys(self, sa: IkeSa) -> None:
        keys, suite = sa.keys, sa.suite
        if self.keylog is None or keys is None or suite is None:
            return
        from controller.keylog import ike_suite_keywords

        try:
            encr, integ = ike_suite_keywords(suite.encr, suite.encr_key_bits, suite.integ)
            self.keylog.log_ike_sa(sa.spi_i, sa.spi_r, keys.sk_ei, keys.sk_er, encr,
                                   keys.sk_ai, keys.sk_ar, integ)
        except ValueError as exc:  # e.g. ChaCha20-Poly1305: not in Wireshark's IKEv2 table
            log.warning("key log: %s", exc)

    def _records(self, entry: IkeEntry, e: ChildSaEstablished) -> tuple[SaRecord, SaRecord,
                                                                          int, int]:
        local = _ip_address(entry.sa.local[0])
        remote = _ip_address(entry.sa.remote[0])
        lport, rport = e.local_port, e.remote_port
        encap = UdpEncap(lport, rport) if e.encap else None
        spec = self._child_spec(entry.conn, e.name)
        window = spec.replay_window if spec is not None else 32
        common = {"alg": e.transform.keyword, "local_addr": local, "remote_addr": remote,
                  "mode": e.mode, "esn": e.esn, "encap": encap,
                  "name": f"{entry.conn}/{e.name}"}
        out = SaRecord(spi=e.spi_out, direction=Direction.OUT, enc_key=e.enc_key_out,
                       integ_key=e.integ_key_out, replay_window=0, **common)  # type: ignore[arg-type]
        inbound = SaRecord(spi=e.spi_in, direction=Direction.IN, enc_key=e.enc_key_in,
                           integ_key=e.integ_key_in, replay_window=window, **common)  # type: ignore[arg-type]
        return out, inbound, lport, rport

    def _install_child(self, entry: IkeEntry, e: ChildSaEstablished,
                       replaces: int | None = None, switch: bool = True) -> None:
        """Install a Child SA's pair in the data plane. For a rekey (``replaces``), outbound
        moves to it now if we started the rekey (``switch``: the peer installed its inbound
        side before answering), else when the initiator deletes the old SA: until our
        answer reaches it, it could not decrypt what we send on the new one."""
        pub = self.publisher
        assert pub is not None
        out, inbound, lport, rport = self._records(entry, e)
        index_in, index_out = pub.allocate(), pub.allocate()
        pub.install(index_in, inbound)  # inbound first: the peer may already send on it
        pub.install(index_out, out)
        if self.keylog is not None:
            for record in (inbound, out):
                try:
                    self.keylog.log_sa_record(record)
                except ValueError as exc:  # an algorithm Wireshark does not know
                    log.warning("key log: %s", exc)
        child = ChildEntry(self._next_child, e.name, e, index_in, index_out, time.time(),
                           lport, rport, counters=_NO_TRAFFIC,
                           selectors=(selector_networks(e.local_ts),
                                      selector_networks(e.remote_ts)),
                           record_in=inbound, record_out=out)
        self._by_index[index_in] = self._by_index[index_out] = (entry, child)
        self._next_child += 1
        self._up[(entry.conn, e.name)] = self._up.get((entry.conn, e.name), 0) + 1
        old = entry.children.get(replaces) if replaces is not None else None
        if old is not None:
            child.rekeys = old.rekeys + 1
            old.replaced = True
        entry.children[e.spi_in] = child
        if old is None or switch:
            holders = self._protect.get(child.selectors)
            if holders is None:
                holders = self._protect[child.selectors] = Holders()
            holders.add(child)
            self._publish_policies([child.selectors], [(entry.conn, e.name)])
            if old is not None:
                # make-before-break: outbound has switched; the old inbound SA stays until
                # its Delete completes (ChildSaDeleted), and a moment longer.
                self._remove_later(old.index_out, old.record_out)
        else:
            old.successor = child  # outbound moves when the old SA is deleted
        self._log(entry).info("CHILD_SA %s{%d} installed, SPIs %08x_i %08x_o%s", e.name,
                              child.uniqueid, e.spi_in, e.spi_out,
                              " (UDP-encapsulated)" if e.encap else "")
        if old is not None:
            self._log(entry).info("CHILD_SA %s{%d} rekeyed into {%d}", e.name, old.uniqueid,
                                  child.uniqueid)
            self._emit("child-rekey", entry, child, True)
        else:
            self._emit("child-updown", entry, child, True)

    def _remove_child(self, entry: IkeEntry, child: ChildEntry) -> None:
        pub = self.publisher
        if entry.children.pop(child.event.spi_in, None) is None:
            return
        for index in (child.index_in, child.index_out):
            if self._by_index.get(index, (None, None))[1] is child:
                del self._by_index[index]  # (else the index is another SA's by now)
        holders = self._protect.get(child.selectors) or Holders()
        holders.discard(child.uniqueid)
        successor = child.successor
        if successor is not None and successor.event.spi_in in entry.children:
            holders.add(successor)  # the rekey initiator deleted the old SA
            self._protect[child.selectors] = holders
        if not holders:
            self._protect.pop(child.selectors, None)
        key = (entry.conn, child.name)
        self._up[key] = self._up.get(key, 1) - 1
        if self._up[key] <= 0:
            del self._up[key]
        if pub is not None:
            self._publish_policies([child.selectors], [key])
            if child.replaced and entry.closed is None:
                # A rekeyed SA lingers a moment after its Delete: packets the peer sent on it
                # before switching may still be on their way in, and batches classified
                # before the SPD moved may still be on their way to a worker.
                self._remove_later(child.index_out, child.record_out)
                self._remove_later(child.index_in, child.record_in)
            else:
                pub.remove(child.index_out, child.record_out)
                pub.remove(child.index_in, child.record_in)
        if not child.replaced:
            self._emit("child-updown", entry, child, False)

    def _remove_later(self, index: int, record: SaRecord | None) -> None:
        asyncio.get_running_loop().call_later(REKEY_GRACE, self._remove_index, index, record)

    def _remove_index(self, index: int, record: SaRecord | None) -> None:
        """Remove ``record`` at ``index`` unless it went already (a rekeyed SA's outbound
        index is removed when its successor takes over and again with the SA itself; by
        then the index may hold another SA)."""
        if self.publisher is not None:
            self.publisher.remove(index, record)

    def _publish_policies(self, selectors: Iterable[Selectors] | None = None,
                          children: Iterable[tuple[str, str]] | None = None) -> None:
        """Bring the data plane's SPD up to date, sending only the entries that changed
        (pipeline/sadist.py ``edit_policies``): the PROTECT entries of ``selectors`` and the
        TRAP/DISCARD entries of ``children`` ((connection, child) pairs), or all of them.

        A PROTECT entry per pair of selectors that a Child SA has: its outbound SA, the
        newest Child SA's (rekeyed SAs are listed after the ones they replace); ranked in
        the order the pairs came. After them (TRAP_RANKS on), in configuration order, the
        children that are not up: TRAP (negotiate on first use, or again after a
        close_action/dpd_action trap), else DISCARD (never sent in the clear: the TUN keeps
        routing their traffic to us, see DataPlane.set_policies)."""
        assert self.publisher is not None
        want: dict[int, Policy | None] = {}
        keys = ([*self._protect, *(k for k in self._ranks if k not in self._protect)]
                if selectors is None else selectors)
        for key in keys:
            holders = self._protect.get(key)
            if holders:
                rank = self._ranks.get(key)
                if rank is None:
                    rank = self._ranks[key] = self._next_rank
                    self._next_rank += 1
                want[rank] = Policy(key[0], key[1], sa_index=holders.newest().index_out)
            elif key in self._ranks:
                want[self._ranks.pop(key)] = None
        if children is None:
            self._trap_ranks = {}
            for conn in self.conns.values():
                for configured in conn.children:
                    self._trap_ranks[(conn.name, configured.name)] = (
                        TRAP_RANKS + len(self._trap_ranks))
            want.update({rank: None for rank in self._spd if rank >= TRAP_RANKS})
            children = self._trap_ranks
        for pair in children:
            rank = self._trap_ranks.get(pair)
            spec = self._child_spec(*pair)
            if rank is None or spec is None:
                continue
            if pair in self._up:
                want[rank] = None
                continue
            trap = spec.start_action == "trap" or "trap" in (spec.close_action,
                                                             spec.dpd_action)
            want[rank] = Policy(spec.local_ts, spec.remote_ts,
                                Action.TRAP if trap else Action.DISCARD, name="/".join(pair))
        put = {r: p for r, p in want.items() if p is not None and self._spd.get(r) != p}
        removed = [r for r, p in want.items() if p is None and r in self._spd]
        for rank in removed:
            del self._spd[rank]
        self._spd.update(put)
        self.publisher.edit_policies(put, removed)  # (nothing changed: nothing sent)

    def _emit(self, event: str, entry: IkeEntry, child: ChildEntry | None, up: bool) -> None:
        for listener in self.listeners:
            try:
                listener(event, entry, child, up)
            except Exception:  # an observer's failure must not break the IKE SA
                log.exception("event listener failed on %s", event)


async def serve(cfg: Config, config_path: str | None = None) -> int:
    """Run the gateway with its admin socket and metrics endpoint until SIGTERM/SIGINT;
    SIGHUP reloads the configuration file."""
    from controller.backend import GatewayBackend
    from controller.metrics import MetricsServer
    from controller.vici.commands import (
        child_rekey_event,
        child_updown_event,
        ike_rekey_event,
        ike_updown_event,
        log_event,
    )
    from controller.vici.server import ViciServer

    gateway = Gateway(cfg)
    backend = GatewayBackend(gateway, config_path)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, done.set)

    def reload() -> None:
        try:
            backend.reload()
        except Exception as exc:  # a bad file is reported and the running config kept
            log.error("reload failed, configuration unchanged: %s", exc)

    loop.add_signal_handler(signal.SIGHUP, reload)
    vici = ViciServer(cfg.controller.vici_socket, backend)
    metrics = (MetricsServer(cfg.controller.metrics_listen, backend)
               if cfg.controller.metrics_listen else None)

    def publish(event: str, entry: IkeEntry, child: ChildEntry | None, up: bool) -> None:
        if not vici.listeners(event):
            return
        info = backend.ike_info(entry)
        if event == "ike-updown":
            vici.publish(event, ike_updown_event(info, up))
        elif event == "child-updown" and child is not None:
            vici.publish(event, child_updown_event(info, backend.child_info(entry, child), up))
        elif event == "child-rekey" and child is not None:
            new = backend.child_info(entry, child)
            vici.publish(event, child_rekey_event(info, new, new))
        elif event == "ike-rekey":
            vici.publish(event, ike_rekey_event(info, info))

    gateway.listeners.append(publish)

    class ViciLog(logging.Handler):
        """Log records to the VICI clients registered for ``log`` (swanctl --log)."""

        def handle(self, record: logging.LogRecord) -> bool:
            # Most of the time nobody listens: skip the filters and the handler's lock
            return bool(vici.listeners("log")) and bool(super().handle(record))

        def emit(self, record: logging.LogRecord) -> None:  # through handle: listened to
            group = "IKE" if record.name.startswith(("espline.ike", "espline.controller")) \
                else "CFG"
            level = {logging.DEBUG: 2, logging.INFO: 1}.get(record.levelno, 0)
            vici.publish("log", log_event(record.getMessage(), group, level,
                                          getattr(record, "ike", None),
                                          getattr(record, "ike_id", None)))

    vici_log = ViciLog(logging.INFO)
    logging.getLogger("espline").addHandler(vici_log)
    try:
        await gateway.start()
        await vici.start()
        if metrics is not None:
            await metrics.start()
        log.info("controller up: %d connection(s), IKE on %s:%d/%d, VICI on %s%s",
                 len(gateway.conns), gateway.local, cfg.controller.ike_port,
                 cfg.controller.natt_port, cfg.controller.vici_socket,
                 f", metrics on {cfg.controller.metrics_listen}" if metrics else "")
        # What start-up made (modules, configuration, the loop) lives as long as the
        # process: out of the cyclic collector's generations, which then walk only what
        # IKE SAs make (gc.freeze; bench/ike_rate.py, 500 setups, rounds interleaved:
        # controller CPU 0.38, 0.34, 0.34 s against 0.38, 0.37, 0.39 s without).
        heap.settle()
        await done.wait()
    finally:
        logging.getLogger("espline").removeHandler(vici_log)
        await gateway.stop()
        await vici.close()
        if metrics is not None:
            await metrics.close()
    return 0
