"""``espline run -c FILE``: the data plane with the SAs of a ``static_sas`` section (manual
keying, as ``ip xfrm state`` does for the kernel), in the foreground until SIGTERM/SIGINT.

Builds the I/O adapters the ``dataplane`` section names, the SA table and SPD from the static
SAs, starts the workers and runs the I/O loop. On exit it stops every process it started and
removes the TUN device and the routes it created.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Literal

from controller.config import Config, ConfigError, DataplaneConfig, StaticSa, load_config
from pipeline import heap
from pipeline.batch import Batch
from pipeline.dataplane import DataPlane, PacketIO, Settings
from pipeline.dispatch import Policy
from pipeline.outside import SocketOutside
from pipeline.region import SharedRegion
from pipeline.satable import IpAddress, Mode, Protocol, SaRecord
from pipeline.tun import TunDevice

__all__ = ["build", "main"]

log = logging.getLogger("espline.run")


@dataclass
class TunIO:
    """The TUN device as the data plane's inside."""

    device: TunDevice
    base_routes: frozenset[str] = frozenset()  # routes the device was created with
    _failed: set[str] = field(default_factory=set)  # wanted, refused by the kernel

    def read_batch(self, batch: Batch, max_packets: int) -> int:
        return self.device.read_batch(batch, max_packets)

    def write_batch(self, batch: Batch) -> int:
        return self.device.write_batch(batch)

    def pending(self) -> bool:
        return self.device.pending()

    def fileno_list(self) -> list[int]:
        return [self.device.fileno()]

    def sync_routes(self, routes: Sequence[str]) -> None:
        """Route exactly ``routes`` into the device (beyond those it was created with)."""
        want = set(routes) | self.base_routes
        have = set(self.device.routes)
        self._failed &= want
        self.update_routes(sorted(want - have), sorted(have - want))

    def update_routes(self, added: Sequence[str], removed: Sequence[str]) -> None:
        """Route ``added`` into the device and withdraw ``removed`` (never one it was
        created with). A route the kernel refused is tried again at each later update
        while it is wanted; a failure is logged, never raised into the I/O loop."""
        for route in removed:
            self._failed.discard(route)
            if route in self.base_routes:
                continue
            try:
                self.device.remove_route(route)
            except OSError as exc:
                log.warning("cannot withdraw route %s from %s: %s", route,
                            self.device.name, exc)
        retry = sorted(self._failed.difference(added))
        for route in [*added, *retry]:
            try:
                self.device.add_route(route)
            except OSError as exc:
                if route not in self._failed:
                    log.warning("cannot route %s into %s (tried again at each SPD change): "
                                "%s", route, self.device.name, exc)
                self._failed.add(route)
            else:
                self._failed.discard(route)

    def io_stats(self) -> dict[str, int]:
        q = self.device.queues[0]
        return {"rx_packets": q.rx_packets, "rx_too_big": q.rx_too_big,
                "rx_gso": q.rx_gso, "rx_gso_errors": q.rx_gso_errors,
                "tx_packets": q.tx_packets, "tx_errors": q.tx_errors,
                "tx_coalesced": q.tx_coalesced}


class AfPacketIO:
    """An AF_PACKET RX ring and TX path on one interface."""

    def __init__(self, interface: str, *, esp_only: bool, fanout: bool,
                 ring: Literal["auto", "v2", "v3"] = "v3", vnet_hdr: bool = False,
                 mtu: int = 1500) -> None:
        from pipeline import afpacket, bpf, rxpair

        self.addresses = interface_addresses(interface)  # ICMP errors to inside hosts
        program = bpf.esp_filter() if esp_only else None
        self.rx: afpacket.RxRing | rxpair.RxPair
        self._pair: rxpair.RxPair | None = None
        if ring == "auto":  # its two rings are a fanout group of their own
            try:
                self.rx = self._pair = rxpair.RxPair(interface, bpf_program=program, mtu=mtu)
            except OSError as exc:  # a kernel without PACKET_FANOUT_CBPF (Linux < 4.2)
                if exc.errno not in (errno.EINVAL, errno.ENOPROTOOPT):
                    raise
                log.warning("outside ring pair unavailable on %s (%s): one TPACKET_V3 ring",
                            interface, exc)
                ring = "v3"
        if self._pair is None:
            self.rx = afpacket.RxRing(
                interface, bpf=program, version=2 if ring == "v2" else 3, vnet_hdr=vnet_hdr,
                frame_size=rxpair.v2_frame_size(mtu) if ring == "v2" else 2048,
                fanout_group=afpacket.default_fanout_group() if fanout else None)
        self.tx = afpacket.TxPath(interface)

    def read_batch(self, batch: Batch, max_packets: int) -> int:
        batch.count = 0
        return self.rx.read_into(batch, max_packets)

    # pipeline.dataplane.HeadsReader: batches for workers carry packet heads, the workers
    # map the ring (pipeline/region.py).
    def shared_region(self) -> SharedRegion | None:
        return self.rx.shared_region()

    def read_heads(self, batch: Batch, max_packets: int, region: int, head: int) -> int:
        batch.count = 0
        return self.rx.read_heads(batch, max_packets, region, batch.buffer, head=head)

    def release(self, token: int) -> None:
        self.rx.release(token)

    def pending(self) -> bool:
        return self.rx.pending()

    def write_batch(self, batch: Batch) -> int:
        return self.tx.send(batch)

    def idle(self) -> None:
        """Nothing came for a poll timeout (pipeline.dataplane): the ring pair may move."""
        if self._pair is not None:
            self._pair.idle()

    def idle_timeout_ms(self) -> int | None:
        """The poll timeout the ring pair wants while nothing comes (None: no wish)."""
        return self._pair.idle_timeout_ms() if self._pair is not None else None

    def fileno_list(self) -> list[int]:
        return [self.rx.fileno()]  # the ring pair's: one epoll fd for both rings

    def io_stats(self) -> dict[str, int]:
        return {**{f"rx_{k}": v for k, v in self.rx.stats().items()},
                **{f"tx_{k}": v for k, v in self.tx.stats().items()}}

    def close(self) -> None:
        self.rx.close()
        self.tx.close()


def interface_addresses(interface: str) -> tuple[IpAddress, ...]:
    """The global addresses of ``interface`` (IPv4 first, link-local ones left out)."""
    import ipaddress

    from pyroute2 import IPRoute

    found: list[IpAddress] = []
    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=interface)
        if not links:
            return ()
        for msg in ipr.get_addr(index=links[0]):
            addr = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
            if not addr.is_link_local:
                found.append(addr)
    return tuple(sorted(found, key=lambda a: a.version))


def sa_records(static: tuple[StaticSa, ...]) -> tuple[list[tuple[int, SaRecord]],
                                                      list[Policy]]:
    """SA table entries (outbound 2i, inbound 2i+1) and one SPD entry per static SA."""
    records: list[tuple[int, SaRecord]] = []
    policies: list[Policy] = []
    for i, sa in enumerate(static):
        if sa.protocol is not Protocol.ESP:
            raise ConfigError(f"static_sas[{i}].protocol",
                              "the data plane pipeline runs ESP SAs only for now")
        out, inbound = sa.records()
        records += [(2 * i, out), (2 * i + 1, inbound)]
        # Transport-mode selectors are the SA's own addresses (controller/config.py sets and
        # enforces that), so one SPD entry shape serves both modes.
        policies.append(Policy(tuple(sa.local_ts), tuple(sa.remote_ts), sa_index=2 * i))
    return records, policies


def claim_nat_t_ports(ports: Sequence[tuple[str, int]]) -> list[socket.socket]:
    """UDP sockets on the local NAT-T ports of the UDP-encapsulated SAs, for the AF_PACKET
    outside: the ring only copies ESP-in-UDP, and with no socket on the port the kernel
    would answer every packet with ICMP port unreachable. Their filter drops everything
    (there is no IKE to read here), which still counts as delivered: no ICMP."""
    from pipeline import bpf

    socks: list[socket.socket] = []
    try:
        for addr, port in ports:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            s = socket.socket(family, socket.SOCK_DGRAM)
            socks.append(s)
            bpf.attach(s, bpf.REJECT_ALL)  # before bind: nothing is ever queued
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 0)
            s.bind((addr, port))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def tunnel_mtu(cfg: Config) -> int:
    """The smallest inner MTU over the static SAs, for the outside link's MTU."""
    from pipeline.mtu import inner_mtu
    from workers.algorithms import parse_esp

    return min(inner_mtu(cfg.dataplane.mtu, parse_esp(sa.outbound.alg), sa.local_addr.version == 6,
                         sa.encap is not None, sa.mode is Mode.TUNNEL)
               for sa in cfg.static_sas)


def build_io(dp: DataplaneConfig, stack: ExitStack, *, routes: Sequence[str], tun_mtu: int,
             nat_t: Sequence[tuple[str, int]], socket_local: IpAddress | None = None
             ) -> tuple[PacketIO, PacketIO]:
    """The inside and outside adapters the ``dataplane`` section names, cleanup on ``stack``.

    ``routes``: prefixes routed into the TUN device; ``tun_mtu``: its MTU (what fits through
    the tunnel: the kernel then answers bigger packets with ICMP itself and TCP finds the
    path MTU). ``nat_t``: local (address, port) pairs of UDP-encapsulated SAs to claim with a
    socket (AF_PACKET outside, no IKE daemon owning them). ``socket_local``: the address of
    the portable socket outside.
    """
    inside: PacketIO
    if dp.inside.mode == "tun":
        device = TunDevice(dp.inside.interface, mtu=tun_mtu, routes=sorted(routes),
                           offload=dp.inside.offload)
        stack.callback(device.close)
        inside = TunIO(device, frozenset(device.routes))
    else:
        assert dp.inside.interface is not None
        port = AfPacketIO(dp.inside.interface, esp_only=False, fanout=False,
                          vnet_hdr=dp.inside.offload)
        stack.callback(port.close)
        inside = port
    outside: PacketIO
    if dp.outside.mode == "socket":
        assert socket_local is not None
        sock = SocketOutside(socket_local, 4500 if nat_t else None)  # type: ignore[arg-type]
        stack.callback(sock.close)
        outside = sock
    else:
        from pipeline.afpacket import suppress_esp_unreachable

        assert dp.outside.interface is not None
        sink = suppress_esp_unreachable()
        stack.callback(sink.close)
        for nat_t_sock in claim_nat_t_ports(nat_t):
            stack.callback(nat_t_sock.close)
        port = AfPacketIO(dp.outside.interface, esp_only=True, fanout=dp.outside.fanout,
                          ring=dp.outside.ring, mtu=dp.mtu)
        stack.callback(port.close)
        outside = port
    return inside, outside


def settings_for(dp: DataplaneConfig) -> Settings:
    clamp = dp.mss_clamp
    return Settings(workers=dp.workers, cpus=dp.cpus, max_packets=dp.batch.max_packets,
                    handoff_min=dp.batch.handoff_min,
                    runtime_dir=dp.endpoints.runtime_dir, outside_mtu=dp.mtu,
                    mss_clamp="auto" if clamp == "auto" else clamp)


def build(cfg: Config, stack: ExitStack) -> DataPlane:
    """Everything ``run`` needs, with its cleanup registered on ``stack``."""
    if not cfg.static_sas:
        raise ConfigError("static_sas", "espline run needs at least one static SA "
                          "(IKE-negotiated SAs come with the controller)")
    records, policies = sa_records(cfg.static_sas)
    if cfg.dataplane.outside.mode == "socket":
        for i, sa in enumerate(cfg.static_sas):
            if sa.local_addr.version == 6:
                raise ConfigError(f"static_sas[{i}].local_addr",
                                  "an IPv6 SA needs dataplane.outside.mode af_packet (the "
                                  "socket outside is IPv4-only)")
    inside, outside = build_io(
        cfg.dataplane, stack,
        routes=sorted({str(n) for sa in cfg.static_sas for n in sa.remote_ts}),
        tun_mtu=tunnel_mtu(cfg),
        nat_t=sorted({(str(sa.local_addr), sa.encap.local_port)
                      for sa in cfg.static_sas if sa.encap is not None}),
        socket_local=cfg.static_sas[0].local_addr)
    return DataPlane(settings_for(cfg.dataplane), records, policies, inside, outside)


def with_secrets_file(cfg: Config) -> Config:
    """Add the shared keys of ``controller.secrets_file`` (a Kubernetes Secret mounted apart
    from the ConfigMap) to the configuration's own."""
    path = cfg.controller.secrets_file
    if path is None:
        return cfg
    import dataclasses

    from controller.config import parse_config_text

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError("controller.secrets_file", f"cannot read {path}: {exc.strerror}"
                          ) from None
    extra = parse_config_text(text, path)
    if set(extra.connections) or extra.static_sas:
        raise ConfigError("controller.secrets_file", f"{path} may hold a secrets section only")
    return dataclasses.replace(cfg, shared_keys=cfg.shared_keys + extra.shared_keys)


# The cyclic garbage collector's first two thresholds for the controller (pipeline/heap.py
# says why and what they saved).
GC_THRESHOLD0 = heap.GC_THRESHOLD0
GC_THRESHOLD1 = heap.GC_THRESHOLD1


def _serve(cfg: Config, config_path: str) -> int:
    """The controller with IKE (controller/gateway.py), on uvloop when it is installed."""
    import asyncio
    import gc

    from controller.gateway import serve

    gc.set_threshold(GC_THRESHOLD0, GC_THRESHOLD1, *gc.get_threshold()[2:])

    try:
        import uvloop

        runner: object = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        return int(runner(serve(cfg, config_path)))  # type: ignore[operator]
    except ConfigError as exc:
        print(f"espline: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"espline: {exc} (the controller needs CAP_NET_ADMIN and CAP_NET_RAW; binding "
              "UDP 500 also needs CAP_NET_BIND_SERVICE or net.ipv4.ip_unprivileged_port_start"
              " <= 500, or set controller.ike_port above 1023)", file=sys.stderr)
        return 1


def main(config_path: str, *, reexec: bool = False) -> int:
    """``espline run -c FILE``. ``reexec``: this is the program itself (not a caller in
    the same process), which may execute itself again for the data plane's heap
    (pipeline/heap.py)."""
    from controller.logs import setup_logging

    setup_logging("text")  # until the file names its format
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        print(f"espline: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"espline: cannot read {config_path}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        cfg = with_secrets_file(cfg)
    except ConfigError as exc:
        print(f"espline: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.controller.log_format, cfg.controller.log_level)
    if cfg.conns or not cfg.static_sas:
        # The controller: connections from the file, or later over VICI (swanctl).
        if cfg.dataplane.outside.mode == "socket":
            print("espline: dataplane.outside.mode: 'socket' cannot run with IKE yet (the "
                  "controller owns UDP 4500); use {mode: af_packet, interface: ...}",
                  file=sys.stderr)
            return 2
        return _serve(cfg, config_path)
    if reexec:  # the data plane in this very process: its heap from the start
        heap.reexec(cfg.dataplane.hugepages)
    heap.log_state()
    with ExitStack() as stack:
        try:
            plane = build(cfg, stack)
        except ConfigError as exc:
            print(f"espline: {exc}", file=sys.stderr)
            return 2
        except PermissionError as exc:
            print(f"espline: {exc} (the data plane needs CAP_NET_ADMIN and CAP_NET_RAW)",
                  file=sys.stderr)
            return 1

        def on_signal(signum: int, frame: object) -> None:
            plane.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        log.info("data plane up: %d static SA(s), %d worker(s)", len(cfg.static_sas),
                 plane.settings.workers)
        heap.settle()
        plane.run()
        stats = plane.stats
        log.info("stopped: out %s, in %s, lost batches %d", stats.outbound.snapshot(),
                 stats.inbound.snapshot(), plane.reassembler.skipped)
    return 0
