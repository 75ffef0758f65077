"""IKE setup rate: IKE_SA + first Child SA setups per second, and the responder's CPU per setup,
with espline and with strongSwan's charon as the responder, driven by the same load initiator.

    netns espb-<pid>-<n>l                              netns espb-<pid>-<n>r
    load initiator (192.0.2.1:500, :4500)  ==IKEv2==>  responder on 192.0.2.2: espline
    (espline's sans-IO IkeSa, one process)             (controller + data plane) or charon

strongSwan's load-tester plugin is not in Debian's packages, so the initiator is written on
espline's sans-IO core (controller/ike/ike_sa.py): one process, one UDP socket on the IKE port
and one on the NAT-T port (RFC 3948 §2.2: IKE there behind the four-zero-byte non-ESP marker).
It keeps ``--concurrency`` setups in flight until ``--count`` have been started, each a fresh
``IkeSa`` (fresh SPIs, the same identities and PSK), routes every response to its SA by the
initiator's SPI (bytes 0..8 of the IKE header, RFC 7296 §3.1), drives the retransmission
timers, and counts a setup once both IkeSaEstablished and ChildSaEstablished came. The SAs
are left up (no Delete): the responder's work is setups only, so it must accept many IKE SAs
with the same identities (strongSwan: ``unique = no``; espline's responder SAs are
independent). PSK, IKE ``aes128gcm16-prfsha256-x25519``, ESP ``aes128gcm16``.

Responders, each in a fresh lab (bench/lab.py) with the same initiator and parameters:

- ``espline``: ``espline run`` with one connection (``encap: no`` by default, so IKE stays on
  port 500) and a data plane of ``--workers`` worker(s): every Child SA is pushed to the data
  plane (SA distribution, pipeline/sadist.py), which is part of the cost measured.
- ``strongswan``: Debian's charon with kernel-libipsec, which installs every Child SA into its
  userspace SAD (and fakes NAT detection, so IKE_AUTH moves to port 4500); ``unique = no``,
  ``dos_protection = no``, half-open and per-IP limits raised, log level 1 to a file.

Responder CPU: Δ(utime+stime) from /proc of every process in the responder's namespace (the
initiator excluded by PID), from the moment the initiator is told to go until ``--settle``
seconds after its last setup (so work the responder defers, like the data plane's SA
installs, is counted). ``cpu_ms_per_setup`` = that CPU / established setups. The responder's
idle CPU rate is sampled for ``--idle`` seconds before; ``cpu_ms_per_setup_idle_corrected``
subtracts it. The initiator reports its own CPU (getrusage) per setup for context.

Selectors (``--selectors``): ``shared`` (default) gives every Child SA the same selectors,
so the responder keeps one SPD entry and replaces it at each setup; ``distinct`` has each
setup propose its own /32 of 10.64.0.0/16 (a remote-access client's address), narrowed to by
the responder: an SPD entry and a route per Child SA, as on a concentrator. The cost of an
SPD that grows with the SAs shows there, at a few thousand setups.

    python -m bench.ike_rate                              # both responders, 500 setups each
    python -m bench.ike_rate --count 3000 --selectors distinct
    python -m bench.ike_rate --responders espline --count 2000 --concurrency 32
    python -m bench.ike_rate --profile DIR                # espline's controller under cProfile

Output: a table and JSON (``--out``, default bench/ike_rate.json): a list of objects with
``responder``, ``setups``, ``failed``, ``seconds``, ``setups_per_s``, ``cpu_ms_per_setup``,
``initiator_cpu_ms_per_setup`` and more. Needs root (network namespaces); strongSwan
(strongswan-charon, strongswan-swanctl, libcharon-extra-plugins, libstrongswan-*-plugins)
for its responder, skipped with a note where it is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.lab import (
    CLK_TCK,
    LEFT_NET,
    REPO_ROOT,
    RIGHT_NET,
    Lab,
    ProcCpu,
    Side,
    cpu_delta,
    host_cpu,
    sample_side,
    sigterm_as_interrupt,
)
from bench.strongswan import Charon, missing
from controller.connections import network_selectors
from controller.ike.constants import IdType
from controller.ike.crypto import parse_ike_proposal
from controller.ike.ike_sa import (
    ChildConfig,
    ChildSaEstablished,
    IkeConfig,
    IkeSa,
    IkeSaEstablished,
    IkeSaFailed,
)
from workers.algorithms import parse_esp

IKE_PROPOSAL = "aes128gcm16-prfsha256-x25519"
ESP_PROPOSAL = "aes128gcm16"
INITIATOR_ID = "load.ike-rate.espline"
RESPONDER_ID = "responder.ike-rate.espline"
IKE_PORT, NATT_PORT = 500, 4500
NON_ESP_MARKER = bytes(4)  # RFC 3948 §2.2
IKE_HEADER_LENGTH = 28  # RFC 7296 §3.1
SPI_I = slice(0, 8)  # RFC 7296 §3.1: the IKE SA Initiator's SPI, octets 0..7 of the header
RECV_BURST = 256  # datagrams read per socket per wake-up
SOCKET_BUFFER = 4 << 20
RESPONDERS = ("espline", "strongswan")
DEFAULT_OUT = REPO_ROOT / "bench" / "ike_rate.json"
# --selectors distinct: every initiator proposes its own inner address (a remote-access
# client's virtual IP, RFC 7296 §2.9 narrowing), one /32 of this pool, as on a concentrator
# whose every Child SA has selectors of its own (and an SPD entry and a route of its own)
CLIENT_POOL = ipaddress.ip_network("10.64.0.0/16")
SELECTORS = ("shared", "distinct")


# -- the load initiator (runs in the left namespace) ------------------------------------------


@dataclass
class _Pending:
    sa: IkeSa
    started: float
    ike_up: bool = False
    child_up: bool = False


@dataclass
class LoadResult:
    established: int = 0
    failed: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    cpu_s: float = 0.0  # this process, user + system
    sent: int = 0  # datagrams, retransmissions included
    retransmits: int = 0
    stray: int = 0  # datagrams for no SA in flight (late duplicates, unknown SPIs)
    latencies_ms: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        return {
            "established": self.established, "failed": self.failed,
            "failures": dict(self.failures), "seconds": self.seconds, "cpu_s": self.cpu_s,
            "sent": self.sent, "retransmits": self.retransmits, "stray": self.stray,
            "setup_ms_p50": _quantile(lat, 0.5), "setup_ms_p99": _quantile(lat, 0.99),
        }


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


def initiator_config(psk: bytes, *, retransmit_timeout: float,
                     retransmit_tries: int) -> IkeConfig:
    """The load's IkeConfig: the same identities and PSK for every SA."""
    child = ChildConfig("lan", ((parse_esp(ESP_PROPOSAL), False),),
                        network_selectors([ipaddress.ip_network(LEFT_NET)]),
                        network_selectors([ipaddress.ip_network(RIGHT_NET)]))
    return IkeConfig("load", (parse_ike_proposal(IKE_PROPOSAL),),
                     (IdType.ID_FQDN, INITIATOR_ID.encode()),
                     (IdType.ID_FQDN, RESPONDER_ID.encode()), psk, child,
                     retransmit_timeout=retransmit_timeout, retransmit_tries=retransmit_tries,
                     natt_port=NATT_PORT)


def client_config(config: IkeConfig, k: int) -> IkeConfig:
    """``config`` for the ``k``-th setup of ``--selectors distinct``: its Child SA's local
    selector is the ``k``-th address of CLIENT_POOL alone."""
    assert config.child is not None
    address = CLIENT_POOL[k % (CLIENT_POOL.num_addresses - 2) + 1]
    own = network_selectors([ipaddress.ip_network(f"{address}/32")])
    return dataclasses.replace(config, child=dataclasses.replace(config.child, local_ts=own))


class LoadInitiator:
    """``count`` IKE SAs against one responder, ``concurrency`` of them in flight at a time."""

    def __init__(self, config: IkeConfig, local: str, remote: str, *, count: int, concurrency: int,
                 distinct: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.local, self.remote = config, local, remote
        self.count, self.concurrency, self.clock = count, concurrency, clock
        self.distinct = distinct
        self.inflight: dict[bytes, _Pending] = {}  # by our SPI
        self.started = 0
        self.result = LoadResult()
        self.ike = self._socket(IKE_PORT)
        self.natt = self._socket(NATT_PORT)

    def _socket(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        sock.bind((self.local, port))
        return sock

    def close(self) -> None:
        self.ike.close()
        self.natt.close()

    def run(self) -> LoadResult:
        r = self.result
        cpu0 = _own_cpu()
        t0 = self.clock()
        while self.started < self.count or self.inflight:
            while len(self.inflight) < self.concurrency and self.started < self.count:
                now = self.clock()
                config = (client_config(self.config, self.started) if self.distinct
                          else self.config)
                sa = IkeSa(config, initiator=True, local=(self.local, IKE_PORT),
                           remote=(self.remote, IKE_PORT))
                self.started += 1
                pending = self.inflight[sa.spi_i] = _Pending(sa, now)
                sa.initiate(now)
                self._flush(pending, now)
            timers = [t for p in self.inflight.values() if (t := p.sa.get_timer()) is not None]
            wait = max(0.0, min(timers) - self.clock()) if timers else 1.0
            ready, _, _ = select.select([self.ike, self.natt], [], [], min(wait, 1.0))
            for sock in ready:
                self._receive(sock)
            now = self.clock()
            for p in list(self.inflight.values()):
                timer = p.sa.get_timer()
                if timer is not None and timer <= now:
                    p.sa.handle_timer(now)
                    r.retransmits += self._flush(p, now)  # the timer's output: retransmits
        r.seconds = self.clock() - t0
        r.cpu_s = _own_cpu() - cpu0
        return r

    def _receive(self, sock: socket.socket) -> None:
        natt = sock is self.natt
        for _ in range(RECV_BURST):
            try:
                data, addr = sock.recvfrom(65535, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:  # ICMP errors (e.g. port unreachable) surface here
                continue
            if natt:
                if not data.startswith(NON_ESP_MARKER):
                    continue  # ESP in UDP or a NAT keepalive: not IKE
                data = data[len(NON_ESP_MARKER):]
            pending = self.inflight.get(data[SPI_I]) if len(data) >= IKE_HEADER_LENGTH else None
            if pending is None:
                self.result.stray += 1
                continue
            now = self.clock()
            pending.sa.receive_datagram(data, (addr[0], addr[1]), now)
            self._flush(pending, now)

    def _flush(self, p: _Pending, now: float) -> int:
        """Send what ``p``'s SA has queued and take its events; returns datagrams sent."""
        sa, r = p.sa, self.result
        out = sa.datagrams_to_send(now)
        for data, addr in out:
            # The SA floated to the NAT-T port (a NAT seen or faked, RFC 7296 §2.23).
            natt = sa.local[1] == NATT_PORT
            with contextlib.suppress(OSError):
                if natt:
                    self.natt.sendto(NON_ESP_MARKER + data, addr)
                else:
                    self.ike.sendto(data, addr)
        r.sent += len(out)
        failed = None
        while (event := sa.next_event()) is not None:
            if isinstance(event, IkeSaEstablished):
                p.ike_up = True
            elif isinstance(event, ChildSaEstablished):
                p.child_up = True
            elif isinstance(event, IkeSaFailed):
                failed = event.reason
        if failed is not None or (p.ike_up and p.child_up):
            del self.inflight[sa.spi_i]
            if failed is not None:
                r.failed += 1
                r.failures[failed] += 1
            else:
                r.established += 1
                r.latencies_ms.append((now - p.started) * 1000.0)
        return len(out)


def _own_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def tool_initiator() -> int:
    """``python -m bench.ike_rate initiator``: parameters as one JSON line on stdin, then
    "ready" on stdout; "go" on stdin starts the load; the result is one JSON line."""
    params = json.loads(sys.stdin.readline())
    config = initiator_config(bytes.fromhex(params["psk"]),
                              retransmit_timeout=params["retransmit_timeout"],
                              retransmit_tries=params["retransmit_tries"])
    load = LoadInitiator(config, params["local"], params["remote"], count=params["count"],
                         concurrency=params["concurrency"],
                         distinct=params.get("selectors") == "distinct")
    try:
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 1
        result = load.run()
    finally:
        load.close()
    print(json.dumps(result.as_dict()), flush=True)
    return 0


# -- responders (run in the right namespace) --------------------------------------------------


class Responder:
    name = ""

    def __init__(self, lab: Lab, work: Path, args: argparse.Namespace, psk: str) -> None:
        self.lab, self.work, self.args, self.psk = lab, work, args, psk

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """An orderly stop before the lab kills what is left."""

    def label(self, p: ProcCpu) -> str:
        return p.comm

    def log_tail(self) -> str:
        return ""

    def describe(self) -> str:
        return ""


class EsplineResponder(Responder):
    name = "espline"

    def config(self) -> str:
        side, rundir = self.lab.right, self.work / "espline-r"
        return textwrap.dedent(f"""\
            controller: {{vici_socket: {rundir}/vici.sock, cookie_threshold: 0}}
            dataplane:
              workers: {self.args.workers}
              inside: {{mode: tun, name: espl0}}
              outside: {{mode: af_packet, interface: {side.dev}}}
              endpoints: {{runtime_dir: {rundir}}}
            connections:
              load:
                version: 2
                local_addrs: [{side.outer}]
                remote_addrs: [{side.peer_outer}]
                proposals: [{IKE_PROPOSAL}]
                encap: {"yes" if self.args.encap else "no"}
                local: {{auth: psk, id: {RESPONDER_ID}}}
                remote: {{auth: psk, id: {INITIATOR_ID}}}
                children:
                  lan:
                    local_ts: [{side.net}]
                    remote_ts: [{_remote_ts(self.args, side)}]
                    esp_proposals: [{ESP_PROPOSAL}]
                    start_action: none
            secrets:
              ike:
                - {{secret: "{self.psk}"}}
            """)

    @property
    def log_path(self) -> Path:
        return self.work / "espline-r.log"

    def start(self) -> None:
        side = self.lab.right
        path = self.work / "espline-r.yaml"
        path.write_text(self.config())
        path.chmod(0o600)
        argv = [sys.executable]
        if self.args.profile:
            argv += ["-m", "cProfile", "-o", str(Path(self.args.profile).resolve()
                                                  / "espline-responder.prof")]
        argv += ["-m", "controller.cli", "run", "-c", str(path)]
        with open(self.log_path, "w") as log:
            self.proc = self.lab.popen(side, argv, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=REPO_ROOT)
        # Up: the TUN device exists (the data plane is running) and IKE is listening.
        deadline = time.monotonic() + 30
        while not (side.has_link("espl0") and _udp_bound(self.proc.pid, IKE_PORT)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("espline did not come up:\n" + self.log_tail())
            time.sleep(0.1)
        time.sleep(0.5)  # the workers finish starting

    def _log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def log_tail(self) -> str:
        return "\n".join(self._log().splitlines()[-25:])

    def stop(self) -> None:
        code = self.lab.stop(self.proc, grace=15.0)
        if code not in (0, None):
            print(f"espline exited with {code}:\n{self.log_tail()}", file=sys.stderr)

    def label(self, p: ProcCpu) -> str:
        if p.pid == self.proc.pid:
            return "controller"
        if "resource_tracker" in p.cmdline:
            return "mp-resource-tracker"
        if "spawn_main" in p.cmdline or "multiprocessing" in p.cmdline:
            return "dataplane-io" if p.ppid == self.proc.pid else "dataplane-worker"
        return p.comm

    def describe(self) -> str:
        return (f"espline: controller (IKE) + data plane with {self.args.workers} worker(s); "
                "every Child SA is installed into the data plane, part of the cost")


def _remote_ts(args: argparse.Namespace, side: Side) -> str:
    """The responder's remote selector: the initiator's network, or with ``--selectors
    distinct`` the pool its clients' addresses come from."""
    return str(CLIENT_POOL) if args.selectors == "distinct" else side.peer_net


def _udp_bound(pid: int, port: int) -> bool:
    """Whether a UDP socket in ``pid``'s network namespace is bound to ``port`` (IPv4)."""
    try:
        with open(f"/proc/{pid}/net/udp", encoding="ascii") as f:
            next(f)
            return any(int(line.split()[1].split(":")[1], 16) == port for line in f)
    except (OSError, StopIteration, IndexError, ValueError):
        return False


class LoadCharon(Charon):
    """bench/strongswan.py's charon with the knobs a setup-rate load needs: no DoS
    protection (cookies, half-open limits, per-IP blocking) and a large IKE SA table."""

    def write(self, swanctl_conf: str, **kw: object) -> None:
        super().write(swanctl_conf, ike_log_level=1, flush_log=False, options={
            "dos_protection": "no", "cookie_threshold": 1000000,
            "block_threshold": 1000000, "init_limit_half_open": 1000000,
            "init_limit_job_load": 0, "ikesa_table_size": 4096, "ikesa_table_segments": 16})


class StrongSwanResponder(Responder):
    name = "strongswan"

    def start(self) -> None:
        side = self.lab.right
        self.charon = LoadCharon(lambda argv, **kw: self.lab.popen(side, argv, **kw),
                                 self.work / "charon")
        self.charon.write(load_swanctl_conf(side, self.psk, _remote_ts(self.args, side)))
        self.charon.start()

    def stop(self) -> None:
        self.charon.stop()

    def log_tail(self) -> str:
        return self.charon.log()

    def describe(self) -> str:
        return ("strongswan: Debian's charon with kernel-libipsec (every Child SA installed "
                "into its userspace SAD), log level 1 to a file")


def load_swanctl_conf(side: Side, psk: str, remote_ts: str) -> str:
    """One connection that accepts any number of IKE SAs with the same identities."""
    return textwrap.dedent(f"""\
        connections {{
            load {{
                version = 2
                local_addrs = {side.outer}
                remote_addrs = {side.peer_outer}
                unique = no
                encap = no
                mobike = no
                proposals = {IKE_PROPOSAL}
                dpd_delay = 0s
                local {{
                    auth = psk
                    id = {RESPONDER_ID}
                }}
                remote {{
                    auth = psk
                    id = {INITIATOR_ID}
                }}
                children {{
                    lan {{
                        mode = tunnel
                        local_ts = {side.net}
                        remote_ts = {remote_ts}
                        esp_proposals = {ESP_PROPOSAL}
                        start_action = none
                    }}
                }}
            }}
        }}
        secrets {{
            ike-load {{
                id-a = {RESPONDER_ID}
                id-b = {INITIATOR_ID}
                secret = "{psk}"
            }}
        }}
        """)


# -- one measurement --------------------------------------------------------------------------


def measure(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    psk = os.urandom(24).hex()
    with Lab() as lab:
        lab.up()
        cls = EsplineResponder if name == "espline" else StrongSwanResponder
        responder = cls(lab, work, args, psk)
        try:
            responder.start()
            return _drive(lab, responder, args, psk, work)
        except BaseException:
            print(f"[{name}] responder log:\n{responder.log_tail()}", file=sys.stderr)
            raise
        finally:
            with contextlib.suppress(Exception):
                responder.stop()


def _drive(lab: Lab, responder: Responder, args: argparse.Namespace, psk: str,
           work: Path) -> dict[str, Any]:
    left, right = lab.sides
    with open(work / f"initiator-{responder.name}.err", "w") as err:
        init = lab.popen(left, [sys.executable, "-m", "bench.ike_rate", "initiator"],
                         tool=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                         text=True, cwd=REPO_ROOT)
    assert init.stdin is not None and init.stdout is not None
    init.stdin.write(json.dumps({
        "psk": psk.encode().hex(), "local": left.outer, "remote": left.peer_outer,
        "count": args.count, "concurrency": args.concurrency, "selectors": args.selectors,
        "retransmit_timeout": args.retransmit_timeout,
        "retransmit_tries": args.retransmit_tries}) + "\n")
    init.stdin.flush()
    if init.stdout.readline().strip() != "ready":
        raise RuntimeError("the load initiator did not start:\n"
                           + (work / f"initiator-{responder.name}.err").read_text())
    # The responder's idle rate, then the measured window.
    idle0, ti0 = sample_side(right, lab.tools), time.monotonic()
    time.sleep(args.idle)
    idle1, ti1 = sample_side(right, lab.tools), time.monotonic()
    idle_s = _cpu_seconds(idle0, idle1)
    idle_rate = idle_s / (ti1 - ti0)
    before, host0, t0 = idle1, host_cpu(), time.monotonic()
    try:
        out, _ = init.communicate("go\n", timeout=args.max_seconds)
    except subprocess.TimeoutExpired:
        lab.stop(init)
        raise RuntimeError(f"the load did not finish within {args.max_seconds:g} s") from None
    if init.returncode != 0 or not out.strip():
        raise RuntimeError(f"the load initiator failed ({init.returncode}):\n"
                           + (work / f"initiator-{responder.name}.err").read_text())
    load = json.loads(out.strip().splitlines()[-1])
    time.sleep(args.settle)
    after, host1, t1 = sample_side(right, lab.tools), host_cpu(), time.monotonic()
    window = t1 - t0
    rows = cpu_delta(before, after, window)
    cpu_s = sum(pct for _, pct in rows) / 100.0 * window
    by_proc: dict[str, float] = {}
    for p, pct in rows:
        label = responder.label(p)
        by_proc[label] = by_proc.get(label, 0.0) + pct / 100.0 * window
    n = load["established"]

    def per(seconds: float) -> float | None:
        return seconds / n * 1000.0 if n else None

    busy = host1[0] - host0[0], host1[1] - host0[1]
    return {
        "responder": responder.name,
        "setups": n, "failed": load["failed"], "failures": load["failures"],
        "count": args.count, "concurrency": args.concurrency, "selectors": args.selectors,
        "seconds": load["seconds"],
        "setups_per_s": n / load["seconds"] if load["seconds"] > 0 else None,
        "cpu_ms_per_setup": per(cpu_s),
        "cpu_ms_per_setup_idle_corrected": per(max(0.0, cpu_s - idle_rate * window)),
        "initiator_cpu_ms_per_setup": per(load["cpu_s"]),
        "responder_cpu_s": cpu_s, "window_s": window, "settle_s": args.settle,
        "idle_cpu_pct": 100.0 * idle_rate,
        "cpu_s_by_process": {k: round(v, 4) for k, v in sorted(by_proc.items(),
                                                                key=lambda kv: -kv[1])},
        "host_busy_pct": 100.0 * busy[0] / busy[1] if busy[1] else None,
        "setup_ms_p50": load["setup_ms_p50"], "setup_ms_p99": load["setup_ms_p99"],
        "retransmits": load["retransmits"], "datagrams_sent": load["sent"],
        "stray_datagrams": load["stray"],
        "ike_proposal": IKE_PROPOSAL, "esp_proposal": ESP_PROPOSAL,
        "workers": args.workers if responder.name == "espline" else None,
        "encap": bool(args.encap) if responder.name == "espline" else True,
        "note": responder.describe(),
    }


def _cpu_seconds(before: dict[tuple[int, int], ProcCpu],
                 after: dict[tuple[int, int], ProcCpu]) -> float:
    ticks = 0
    for key, p in after.items():
        old = before.get(key)
        ticks += p.ticks - (old.ticks if old else 0)
    return ticks / CLK_TCK


# -- output -----------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


# The figures a median row takes from its rounds (the rest: the first round's).
MEDIAN_FIELDS = ("seconds", "setups_per_s", "cpu_ms_per_setup",
                 "cpu_ms_per_setup_idle_corrected", "initiator_cpu_ms_per_setup",
                 "idle_cpu_pct", "setup_ms_p50", "setup_ms_p99")


def median_result(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One responder's rounds as one result: each figure's median, ``round`` "median",
    the setups and failures summed, and ``cpu_ms_per_setup_rounds`` (every round's)."""
    out = dict(rounds[0])
    for key in MEDIAN_FIELDS:
        values = [r[key] for r in rounds if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["setups"] = sum(r["setups"] for r in rounds)
    out["failed"] = sum(r["failed"] for r in rounds)
    out["count"] = sum(r["count"] for r in rounds)
    out["round"] = "median"
    out["cpu_ms_per_setup_rounds"] = [r["cpu_ms_per_setup"] for r in rounds]
    return out


def table(results: Sequence[dict[str, Any]]) -> str:
    head = ("responder", "setups", "failed", "seconds", "setups/s", "resp CPU ms/setup",
            "init CPU ms/setup")
    rows = [head] + [(r["responder"] + (f" #{r['round']}" if "round" in r else ""),
                      str(r["setups"]), str(r["failed"]),
                      _fmt(r["seconds"], ".2f"), _fmt(r["setups_per_s"], ".1f"),
                      _fmt(r["cpu_ms_per_setup"], ".3f"),
                      _fmt(r["initiator_cpu_ms_per_setup"], ".3f")) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ike_rate",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--responders", default=",".join(RESPONDERS),
                   help="comma-separated: espline, strongswan (default both)")
    p.add_argument("--count", type=int, default=500, help="IKE SAs to set up (default 500)")
    p.add_argument("--concurrency", type=int, default=16,
                   help="setups in flight at a time (default 16)")
    p.add_argument("--selectors", choices=SELECTORS, default="shared",
                   help="shared: every Child SA has the same selectors (one SPD entry, "
                        "replaced at each setup); distinct: each initiator proposes its own "
                        f"/32 of {CLIENT_POOL}, narrowed to by the responder (an SPD entry "
                        "and a route per Child SA, as on a remote-access concentrator)")
    p.add_argument("--workers", type=int, default=1,
                   help="espline data plane workers (default 1)")
    p.add_argument("--encap", action="store_true",
                   help="espline with encap: yes (IKE_AUTH on 4500, ESP in UDP, as strongSwan "
                        "with kernel-libipsec always does)")
    p.add_argument("--retransmit-timeout", type=float, default=1.0)
    p.add_argument("--retransmit-tries", type=int, default=3)
    p.add_argument("--idle", type=float, default=1.0,
                   help="seconds of responder idle CPU sampled before the load (default 1)")
    p.add_argument("--settle", type=float, default=0.5,
                   help="seconds after the last setup still counted (default 0.5)")
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="give up on one responder's load after this long")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds, the responders interleaved (espline, strongswan, espline, "
                        "...); the table and the JSON then end with each responder's median "
                        "(default 1; figures on a shared VM drift by 20%% from run to run)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON output (default %(default)s)")
    p.add_argument("--profile", metavar="DIR",
                   help="run espline's controller under cProfile, writing DIR/*.prof")
    args = p.parse_args(argv)
    args.responders = [r.strip() for r in args.responders.split(",") if r.strip()]
    for r in args.responders:
        if r not in RESPONDERS:
            p.error(f"unknown responder {r!r} (choose from {', '.join(RESPONDERS)})")
    if args.count < 1 or args.concurrency < 1 or args.workers < 1 or args.repeat < 1:
        p.error("--count, --concurrency, --workers and --repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["initiator"]:
        return tool_initiator()
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.ike_rate needs root (network namespaces)", file=sys.stderr)
        return 2
    sigterm_as_interrupt()
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    notes: list[str] = []
    responders = list(args.responders)
    if "strongswan" in responders and (why := missing()) is not None:
        notes.append(f"strongswan skipped: {why}")
        print(f"[strongswan] skipped: {why}", file=sys.stderr)
        responders.remove("strongswan")
    with tempfile.TemporaryDirectory(prefix="espline-ike-rate-") as tmp:
        for rnd in range(1, args.repeat + 1):
            for name in responders:
                of = f" (round {rnd} of {args.repeat})" if args.repeat > 1 else ""
                print(f"[{name}] {args.count} setups, {args.concurrency} in flight{of} ...",
                      file=sys.stderr, flush=True)
                work = Path(tmp) / f"{name}-{rnd}"
                work.mkdir()
                res = measure(name, args, work)
                if args.repeat > 1:
                    res["round"] = rnd
                results.append(res)
                print(f"[{name}] {res['setups']} up, {res['failed']} failed in "
                      f"{res['seconds']:.2f} s; CPU by process: {res['cpu_s_by_process']}",
                      file=sys.stderr, flush=True)
    rounds = list(results)
    if args.repeat > 1:
        results += [median_result([r for r in rounds if r["responder"] == name])
                    for name in responders]
    print(f"IKE setup rate: IKE {IKE_PROPOSAL}, ESP {ESP_PROPOSAL}, PSK, {args.count} "
          f"setups per responder, {args.concurrency} in flight; CPU = responder namespace, "
          f"from go to {args.settle:g} s after the last setup")
    print(table(results))
    for r in results[len(rounds):] if args.repeat > 1 else rounds:  # the medians' notes
        print(f"  {r['note']}; idle {r['idle_cpu_pct']:.1f}% of a core, "
              f"{_fmt(r['cpu_ms_per_setup_idle_corrected'], '.3f')} ms/setup net of idle; "
              f"setup p50 {_fmt(r['setup_ms_p50'], '.1f')} ms, p99 "
              f"{_fmt(r['setup_ms_p99'], '.1f')} ms; retransmits {r['retransmits']}"
              + (f"; failures {r['failures']}" if r["failures"] else ""))
    for note in notes:
        print(f"  {note}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if rounds and all(r["setups"] == args.count for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
