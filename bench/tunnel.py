"""Tunnel throughput, loss, RTT and gateway CPU: espline vs strongSwan vs plain routing.

Each setup gets the same fresh topology (bench/lab.py): two gateway namespaces joined by a
veth (192.0.2.1 <-> 192.0.2.2), inner host addresses 10.1.0.1 and 10.2.0.1 as /32 on the
gateways' ``lo``; iperf3 and the pinger run in the gateway namespaces, bound to the inner
addresses, left -> right.

- ``espline``: two ``espline run`` gateways with static SAs: ESP aes128gcm16 in UDP 4500
  (``encap: true``, as strongSwan's userspace data plane always does), TUN inside (MTU from
  the tunnel overhead), AF_PACKET outside (``--outside socket``: raw and UDP sockets), workers =
  cores.
- ``strongswan``: two Debian charons with kernel-libipsec (TUN ``ipsec0``, MTU 1400, ESP in
  UDP 4500), PSK, IKE aes128gcm16-prfsha256-x25519, ESP aes128gcm16, brought up with
  ``swanctl --initiate`` (recipe: shared/reference/strongswan-peer.md). Per-instance state
  (configs, VICI socket, pid file via a bind mount over /run in charon's own mount namespace,
  logs) lives in a temporary directory under /tmp, never under /run.
- ``plain``: routes 10.2.0.1 via 192.0.2.2 (and back); no IPsec.

Tests, in order: ``ping-idle`` (N echoes at a fixed interval), ``tcp`` (iperf3 TCP), with
``ping-loaded`` (echoes during the TCP run, from 1 s after its start to its last second),
then ``udp-<rate>`` (iperf3 UDP, 1300-byte datagrams, at each offered rate).

CPU: Δ(utime+stime) from /proc/PID/stat over the test's wall time, in % of one core, summed
over every process in each gateway namespace except the iperf3 and pinger processes this
script started (excluded by PID, not by name). For espline that is the I/O process
(``controller.cli run``), its worker processes and multiprocessing's resource tracker; for
strongSwan the charon (all threads). Kernel work done in softirq (veth, TUN, TCP) is charged
to whatever task it interrupts, so part of it lands in these figures and part elsewhere;
``host_busy_pct`` (all cores, tick-sampled /proc/stat) gives the whole machine, and
``other_cpu_pct`` the user processes outside the lab (this script excluded): other work on a
shared host, which skews every figure and should be about 0 (``other_top`` names them).

    python -m bench.tunnel                       # all three setups, table
    python -m bench.tunnel --setups espline,plain --time 10 --json
    python -m bench.tunnel --profile DIR         # espline I/O processes under cProfile
    python -m bench.tunnel --repeat 3            # interleaved rounds, then the medians

Needs root, iproute2, iperf3; strongSwan (strongswan-charon, strongswan-swanctl,
libcharon-extra-plugins, libstrongswan-standard/extra-plugins) for its setup.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.lab import (
    REPO_ROOT,
    Lab,
    ProcCpu,
    Side,
    cpu_delta,
    host_cpu,
    sample_outside,
    sample_side,
    sh,
    sigterm_as_interrupt,
)

SETUPS = ("espline", "strongswan", "plain")
# Also selectable with --setups, never by default: espline with its TUN offloads off
# (pipeline/offload.py) or its data plane heap off huge pages (pipeline/heap.py), to measure
# what they bring side by side.
EXTRA_SETUPS = ("espline-no-offload", "espline-no-hugepages")
CHARON = "/usr/lib/ipsec/charon"
SWANCTL = "swanctl"
CHARON_PLUGINS = ("random nonce openssl aes sha1 sha2 hmac gcm kdf pem pkcs1 x509 pubkey "
                  "curve25519 gmp kernel-libipsec kernel-netlink socket-default vici")
IPERF_PORT = 5201


@dataclass
class Result:
    setup: str
    test: str
    mbps: float | None = None
    loss_pct: float | None = None
    rtt_p50_ms: float | None = None
    rtt_p99_ms: float | None = None
    cpu_left_pct: float | None = None
    cpu_right_pct: float | None = None
    host_busy_pct: float | None = None
    other_cpu_pct: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 3)
        d.update(self.extra)
        return d


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (with 50 samples, p99 is the largest)."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q / 100.0 * len(s)) - 1)]


_FIGURES = ("mbps", "loss_pct", "rtt_p50_ms", "rtt_p99_ms", "cpu_left_pct", "cpu_right_pct",
            "host_busy_pct", "other_cpu_pct")


def summarize(results: list[Result]) -> list[Result]:
    """Per (setup, test), in first-seen order: the median of each figure over the rounds
    (``--repeat``), with the number of rounds and the throughput's range. This host's runs
    scatter widely (the same build: 115-218 Mbit/s of TCP in back-to-back runs); one round
    says little."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.setup, r.test), []).append(r)
    out = []
    for (setup, test), rs in groups.items():
        med = Result(setup, test, extra={"rounds": len(rs), "summary": "median"})
        for name in _FIGURES:
            values = [v for r in rs if (v := getattr(r, name)) is not None]
            if values:
                setattr(med, name, statistics.median(values))
        mbps = [r.mbps for r in rs if r.mbps is not None]
        if mbps:
            med.extra["mbps_min"], med.extra["mbps_max"] = min(mbps), max(mbps)
        out.append(med)
    return out


# -- setups ---------------------------------------------------------------------------------


class Setup:
    name = ""

    def __init__(self, lab: Lab, work: Path, args: argparse.Namespace) -> None:
        self.lab, self.work, self.args = lab, work, args
        self.roles: dict[int, str] = {}  # PID -> label for the CPU breakdown

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Orderly shutdown before the lab kills what is left."""

    def label(self, p: ProcCpu) -> str:
        if p.pid in self.roles:
            return self.roles[p.pid]
        return p.comm

    def notes(self) -> list[str]:
        return []


class Plain(Setup):
    name = "plain"

    def start(self) -> None:
        for s in self.lab.sides:
            s.ip("route", "add", f"{s.peer_inner}/32", "via", s.peer_outer, "src", s.inner)


class Espline(Setup):
    name = "espline"
    offload = True
    hugepages = True

    def outside(self, side: Side) -> str:
        if self.args.outside == "socket":
            return "{mode: socket}"
        return f"{{mode: af_packet, interface: {side.dev}, ring: {self.args.ring}}}"

    def config(self, side: Side, out_spi: int, in_spi: int, out_key: str, in_key: str) -> str:
        rundir = self.work / f"espline-{side.name[-1]}"
        return textwrap.dedent(f"""\
            dataplane:
              workers: {self.args.workers}
              inside: {{mode: tun, name: espl0, offload: {str(self.offload).lower()}}}
              outside: {self.outside(side)}
              endpoints: {{runtime_dir: {rundir}}}
              hugepages: {str(self.hugepages).lower()}
            static_sas:
              - name: {side.outer}-to-{side.peer_outer}
                local_addr: {side.outer}
                remote_addr: {side.peer_outer}
                mode: tunnel
                encap: true
                local_ts: [{side.net}]
                remote_ts: [{side.peer_net}]
                out: {{spi: {out_spi:#x}, enc: aes128gcm16, key: "{out_key}"}}
                in:  {{spi: {in_spi:#x}, enc: aes128gcm16, key: "{in_key}"}}
            """)

    def start(self) -> None:
        k_lr, k_rl = "0x" + os.urandom(20).hex(), "0x" + os.urandom(20).hex()
        left, right = self.lab.sides
        cfgs = [(left, self.config(left, 0x1001, 0x2001, k_lr, k_rl)),
                (right, self.config(right, 0x2001, 0x1001, k_rl, k_lr))]
        self.procs = []
        for side, text in cfgs:
            tag = side.name[-1]
            path = self.work / f"espline-{tag}.yaml"
            path.write_text(text)
            path.chmod(0o600)
            argv = [sys.executable]
            if self.args.profile:
                argv += ["-m", "cProfile", "-o", str(Path(self.args.profile) / f"espline-{tag}"
                                                      ".prof")]
            argv += ["-m", "controller.cli", "run", "-c", str(path)]
            log = open(self.work / f"espline-{tag}.log", "w")  # noqa: SIM115 (closed below)
            try:
                proc = self.lab.popen(side, argv, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=REPO_ROOT)
            finally:
                log.close()
            self.procs.append((side, proc))
            self.roles[proc.pid] = "espline-io"
        deadline = time.monotonic() + 30
        for side, proc in self.procs:
            while not side.has_link("espl0"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"espline in {side.name} did not come up:\n"
                                       + self.log_tail(side))
                time.sleep(0.1)

    def log_tail(self, side: Side) -> str:
        path = self.work / f"espline-{side.name[-1]}.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text().splitlines()[-20:])
        return ""

    def label(self, p: ProcCpu) -> str:
        if p.pid in self.roles:
            return self.roles[p.pid]
        if "spawn_main" in p.cmdline:
            return "espline-worker"
        if "resource_tracker" in p.cmdline:
            return "mp-resource-tracker"
        return p.comm

    def stop(self) -> None:
        for side, proc in getattr(self, "procs", []):
            code = self.lab.stop(proc, grace=10.0)
            if code not in (0, None):
                print(f"espline in {side.name} exited with {code}:\n{self.log_tail(side)}",
                      file=sys.stderr)

    def notes(self) -> list[str]:
        out = []
        for tag in "lr":
            path = self.work / f"espline-{tag}" / "stats.json"
            with contextlib.suppress(OSError, ValueError):
                st = json.loads(path.read_text())
                out.append(f"espline {tag} stats: out {st['outbound']}, in {st['inbound']}, "
                           f"lost batches {st['lost_batches']}, lost packets "
                           f"{st['lost_packets']}, restarts {st['worker_restarts']}, mss "
                           f"clamped {st['mss_clamped']}, icmp too-big {st['icmp_too_big']}")
                # Nothing on the lab's wire is forged or replayed: an inbound drop (integrity,
                # replay, ...) or a lost packet is a bug, whatever the throughput says.
                if st["inbound"]["drops"] or st["lost_packets"]:
                    warning = (f"WARNING: espline {tag} dropped inbound packets "
                               f"{st['inbound']['drops']} / lost {st['lost_packets']}: a bug")
                    print(f"[{self.name}] {warning}", file=sys.stderr)
                    out.append(warning)
        return out


class StrongSwan(Setup):
    name = "strongswan"
    psk = "espline-bench-" + os.urandom(12).hex()

    def paths(self, side: Side) -> dict[str, Path]:
        d = self.work / f"swan-{side.name[-1]}"
        return {"dir": d, "run": d / "run", "conf": d / "strongswan.conf",
                "swanctl": d / "swanctl", "vici": d / "charon.vici", "log": d / "charon.log",
                "out": d / "charon.out", "pid": d / "run" / "charon.pid"}

    def env(self, side: Side) -> dict[str, str]:
        p = self.paths(side)
        return {**os.environ, "STRONGSWAN_CONF": str(p["conf"]),
                "SWANCTL_DIR": str(p["swanctl"])}

    def swanctl(self, side: Side, *args: str, timeout: float = 30.0) -> str:
        p = self.paths(side)
        res = sh([SWANCTL, *args, "--uri", f"unix://{p['vici']}"], env=self.env(side),
                 timeout=timeout)
        return res.stdout

    def write_config(self, side: Side) -> None:
        p = self.paths(side)
        for sub in ("conf.d", "x509", "x509ca", "x509ocsp", "x509aa", "x509ac", "x509crl",
                    "pubkey", "private", "rsa", "ecdsa", "bliss", "pkcs8", "pkcs12"):
            (p["swanctl"] / sub).mkdir(parents=True, exist_ok=True)
        p["run"].mkdir(parents=True, exist_ok=True)
        p["conf"].write_text(textwrap.dedent(f"""\
            charon {{
                load = {CHARON_PLUGINS}
                port = 500
                port_nat_t = 4500
                install_routes = yes
                install_virtual_ip = no
                retransmit_tries = 3
                plugins {{
                    vici {{
                        socket = unix://{p['vici']}
                    }}
                    kernel-libipsec {{
                        allow_peer_ts = no
                    }}
                }}
                filelog {{
                    bench {{
                        path = {p['log']}
                        time_format = %H:%M:%S
                        append = yes
                        flush_line = yes
                        default = 1
                    }}
                }}
                syslog {{
                    daemon {{
                        default = -1
                    }}
                }}
            }}
            swanctl {{
                socket = unix://{p['vici']}
            }}
            """))
        swc = p["swanctl"] / "swanctl.conf"
        swc.write_text(textwrap.dedent(f"""\
            connections {{
                bench {{
                    version = 2
                    local_addrs = {side.outer}
                    remote_addrs = {side.peer_outer}
                    encap = yes
                    mobike = no
                    proposals = aes128gcm16-prfsha256-x25519
                    send_certreq = no
                    local {{
                        auth = psk
                        id = {side.outer}
                    }}
                    remote {{
                        auth = psk
                        id = {side.peer_outer}
                    }}
                    children {{
                        net {{
                            mode = tunnel
                            local_ts = {side.net}
                            remote_ts = {side.peer_net}
                            esp_proposals = aes128gcm16
                            start_action = none
                        }}
                    }}
                }}
            }}
            secrets {{
                ike-bench {{
                    id-a = {side.outer}
                    id-b = {side.peer_outer}
                    secret = "{self.psk}"
                }}
            }}
            """))
        swc.chmod(0o600)

    def start(self) -> None:
        for tool in (CHARON, shutil.which(SWANCTL)):
            if not tool or not os.access(tool, os.X_OK):
                raise RuntimeError(f"strongSwan is not installed ({tool or SWANCTL} missing)")
        real = os.path.realpath(self.work)
        if real in ("/run", "/var/run") or real.startswith(("/run/", "/var/run/")):
            raise RuntimeError(f"strongSwan state {real} must not be under /run (bind-mounted "
                               "over in charon's mount namespace)")
        self.procs = []
        for side in self.lab.sides:
            p = self.paths(side)
            self.write_config(side)
            # `ip netns exec` gives the command its own mount namespace: bind our run
            # directory over /run there, so the compiled-in /run/charon.pid is per instance.
            script = 'mount --bind "$0" /run || exit 1; exec "$1"'
            out = open(p["out"], "a")  # noqa: SIM115 (closed below)
            try:
                proc = self.lab.popen(side, ["sh", "-c", script, str(p["run"]), CHARON],
                                      env=self.env(side), stdout=out, stderr=subprocess.STDOUT)
            finally:
                out.close()
            self.procs.append((side, proc))
            self.roles[proc.pid] = "charon"
        for side, proc in self.procs:
            p = self.paths(side)
            deadline = time.monotonic() + 15
            while not (p["vici"].exists() and p["pid"].exists()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"charon in {side.name} did not come up:\n"
                                       + self.log_tail(side))
                time.sleep(0.1)
            self.swanctl(side, "--load-all")
        self.swanctl(self.lab.left, "--initiate", "--ike", "bench", "--child", "net",
                     "--timeout", "30", timeout=40)

    def log_tail(self, side: Side) -> str:
        lines = []
        for key in ("log", "out"):
            with contextlib.suppress(OSError):
                lines += self.paths(side)[key].read_text().splitlines()[-15:]
        return "\n".join(lines)

    def stop(self) -> None:
        for _side, proc in getattr(self, "procs", []):
            self.lab.stop(proc, grace=5.0)

    def notes(self) -> list[str]:
        out = []
        for side in self.lab.sides:
            with contextlib.suppress(Exception):
                sas = self.swanctl(side, "--list-sas")
                lines = [ln.strip() for ln in sas.splitlines() if "bytes_i" in ln
                         or "ESP:" in ln or "AES" in ln]
                out.append(f"strongswan {side.name[-1]}: " + " | ".join(lines[:4]))
        return out


class EsplineNoOffload(Espline):
    name = "espline-no-offload"
    offload = False


class EsplineNoHugepages(Espline):
    name = "espline-no-hugepages"
    hugepages = False


SETUP_CLASSES: dict[str, type[Setup]] = {"espline": Espline, "strongswan": StrongSwan,
                                         "plain": Plain, "espline-no-offload": EsplineNoOffload,
                                         "espline-no-hugepages": EsplineNoHugepages}


# -- measurements ---------------------------------------------------------------------------


class Bench:
    def __init__(self, setup: Setup, args: argparse.Namespace) -> None:
        self.setup, self.args, self.lab = setup, args, setup.lab
        self.results: list[Result] = []
        self.breakdown: list[tuple[str, str, str]] = []  # (test, side, text)

    def pinger(self, count: int) -> subprocess.Popen[str]:
        left = self.lab.left
        return self.lab.popen(left, [sys.executable, "-m", "bench.lab", "rtt", left.peer_inner,
                                     "--src", left.inner, "--count", str(count),
                                     "--interval", str(self.args.ping_interval)],
                              tool=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO_ROOT)

    def ping_result(self, proc: subprocess.Popen[str], test: str, timeout: float) -> Result:
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"pinger failed: {err.strip()}")
        data = json.loads(out)
        rtts = data["rtt_ms"]
        return Result(self.setup.name, test,
                      loss_pct=100.0 * (data["sent"] - data["received"]) / data["sent"],
                      rtt_p50_ms=percentile(rtts, 50), rtt_p99_ms=percentile(rtts, 99),
                      extra={"pings": data["sent"]})

    def wait_tunnel(self) -> None:
        left = self.lab.left
        res = sh(left.exec_argv([sys.executable, "-m", "bench.lab", "ping", left.peer_inner,
                                 "--src", left.inner, "--timeout", "15"]), check=False,
                 timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"{self.setup.name}: no ping reply through the tunnel in 15 s")

    def cpu_window(self) -> tuple[dict[str, Any], float, tuple[int, int]]:
        samples = {s.name: sample_side(s, self.lab.tools) for s in self.lab.sides}
        samples[""] = sample_outside(self.lab)
        return samples, time.monotonic(), host_cpu()

    def cpu_close(self, res: Result, start: tuple[dict[str, Any], float, tuple[int, int]]
                  ) -> None:
        before, t0, (b0, tot0) = start
        wall = time.monotonic() - t0
        b1, tot1 = host_cpu()
        res.host_busy_pct = 100.0 * (b1 - b0) / (tot1 - tot0) if tot1 > tot0 else None
        # user processes outside the lab (other work on the host skews everything);
        # kernel threads (ksoftirqd, kworker) may be doing our packets' work and are apart
        outside = cpu_delta(before[""], sample_outside(self.lab), wall)
        res.other_cpu_pct = sum((pct for p, pct in outside if p.ppid != 2 and p.pid != 2), 0.0)
        res.extra["kthreads_cpu_pct"] = round(
            sum((pct for p, pct in outside if p.ppid == 2 or p.pid == 2), 0.0), 1)
        top = sorted(((pct, p) for p, pct in outside if p.ppid != 2 and p.pid != 2),
                     key=lambda t: -t[0])[:3]
        res.extra["other_top"] = [f"{p.comm}[{p.pid}] {pct:.0f}%" for pct, p in top if pct >= 1]
        per: dict[str, list[dict[str, Any]]] = {}
        for key, side in zip(("left", "right"), self.lab.sides, strict=True):
            after = sample_side(side, self.lab.tools)
            rows = cpu_delta(before[side.name], after, wall)
            total = sum((pct for _, pct in rows), 0.0)
            setattr(res, f"cpu_{key}_pct", total)
            per[key] = [{"pid": p.pid, "proc": self.setup.label(p), "pct": round(pct, 1)}
                        for p, pct in sorted(rows, key=lambda r: -r[1])]
            text = ", ".join(f"{self.setup.label(p)}[{p.pid}] {pct:.0f}%"
                             for p, pct in sorted(rows, key=lambda r: -r[1]) if pct >= 0.5)
            self.breakdown.append((res.test, key, text or "-"))
        res.extra["cpu_procs"] = per

    def iperf(self, extra: list[str], seconds: float) -> subprocess.Popen[str]:
        left = self.lab.left
        return self.lab.popen(left, ["iperf3", "-c", left.peer_inner, "-B", left.inner,
                                     "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J", *extra],
                              tool=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)

    def iperf_result(self, proc: subprocess.Popen[str], seconds: float,
                     test: str) -> dict[str, Any]:
        out, err = proc.communicate(timeout=seconds + 30)
        (self.setup.work / f"iperf3-{self.setup.name}-{test}.json").write_text(out)
        try:
            data = json.loads(out)
        except ValueError as exc:
            raise RuntimeError(f"iperf3 gave no JSON: {err.strip() or out[-300:]}") from exc
        if "error" in data:
            raise RuntimeError(f"iperf3: {data['error']}")
        return data  # type: ignore[no-any-return]

    def run(self) -> list[Result]:
        a = self.args
        self.wait_tunnel()
        right = self.lab.right
        srv_log = self.setup.work / f"iperf3-server-{self.setup.name}.log"
        with open(srv_log, "w") as log:
            server = self.lab.popen(right, ["iperf3", "-s", "-B", right.inner, "-p",
                                            str(IPERF_PORT), "--forceflush"],
                                    tool=True, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while "listening" not in srv_log.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"iperf3 server did not start: {srv_log.read_text()}")
            time.sleep(0.05)
        # warm-up: a short burst so the first measured test does not pay for cold caches
        self.iperf_result(self.iperf(["-u", "-b", "50M", "-l", str(a.udp_len)], 1), 1, "warmup")

        # idle RTT
        cpu = self.cpu_window()
        pinger = self.pinger(a.pings)
        res = self.ping_result(pinger, "ping-idle", a.pings * a.ping_interval + 30)
        self.cpu_close(res, cpu)
        self.results.append(res)

        # TCP with the loaded-RTT pinger alongside
        cpu = self.cpu_window()
        handle = self.iperf([], a.time)
        loaded_count = max(1, int((a.time - 2.0) / a.ping_interval))
        time.sleep(1.0)
        pinger = self.pinger(loaded_count)
        data = self.iperf_result(handle, a.time, "tcp")
        res = Result(self.setup.name, "tcp")
        self.cpu_close(res, cpu)
        end = data["end"]
        res.mbps = end["sum_received"]["bits_per_second"] / 1e6
        res.extra["sender_mbps"] = round(end["sum_sent"]["bits_per_second"] / 1e6, 1)
        res.extra["retransmits"] = end["sum_sent"].get("retransmits")
        res.extra["seconds"] = a.time
        loaded = self.ping_result(pinger, "ping-loaded", loaded_count * a.ping_interval + 30)
        self.results += [res, loaded]

        # UDP at each offered rate
        for rate in a.udp_rates:
            cpu = self.cpu_window()
            data = self.iperf_result(self.iperf(["-u", "-b", rate, "-l", str(a.udp_len)],
                                                a.udp_time), a.udp_time, f"udp-{rate}")
            res = Result(self.setup.name, f"udp-{rate}")
            self.cpu_close(res, cpu)
            s = data["end"]["sum"]
            received = data["end"].get("sum_received", {}).get("bits_per_second")
            lost = s.get("lost_packets", 0)
            packets = s.get("packets", 0)
            pct = s.get("lost_percent", 100.0 * lost / packets if packets else None)
            res.loss_pct = None if pct is None else float(pct)
            sent_mbps = data["end"].get("sum_sent", s)["bits_per_second"] / 1e6
            # what arrived: the receiver's figure where iperf3 gives one, else sent - lost
            res.mbps = (received / 1e6 if received is not None
                        else sent_mbps * (1 - (res.loss_pct or 0) / 100.0))
            res.extra.update(offered=rate, sender_mbps=round(sent_mbps, 1), packets=packets,
                             lost_packets=lost, seconds=a.udp_time)
            self.results.append(res)
        self.lab.stop(server)
        return self.results


# -- output ---------------------------------------------------------------------------------


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(results: list[Result], breakdown: list[tuple[str, str, str, str]],
                notes: list[str]) -> None:
    w = max(11, *(len(r.setup) + 1 for r in results))
    head = (f"{'setup':<{w}}{'test':<14}{'Mbit/s':>9}{'loss%':>8}{'rtt p50':>9}{'rtt p99':>9}"
            f"{'cpu L%':>8}{'cpu R%':>8}{'host%':>7}{'other%':>8}  extra")
    print(head)
    print("-" * len(head))
    for r in results:
        extra = ""
        if "rounds" in r.extra:
            extra = f"{r.extra['rounds']} rounds"
            if "mbps_min" in r.extra:
                extra += f", {r.extra['mbps_min']:.1f}-{r.extra['mbps_max']:.1f}"
        elif r.test == "tcp":
            extra = f"retr {r.extra.get('retransmits')}"
        elif r.test.startswith("udp"):
            extra = f"sent {r.extra.get('sender_mbps')}"
        elif "pings" in r.extra:
            extra = f"{r.extra['pings']} pings"
        if "round" in r.extra:
            extra = f"round {r.extra['round']}, {extra}"
        print(f"{r.setup:<{w}}{r.test:<14}{fmt(r.mbps, '.1f'):>9}{fmt(r.loss_pct, '.2f'):>8}"
              f"{fmt(r.rtt_p50_ms, '.3f'):>9}{fmt(r.rtt_p99_ms, '.3f'):>9}"
              f"{fmt(r.cpu_left_pct, '.0f'):>8}{fmt(r.cpu_right_pct, '.0f'):>8}"
              f"{fmt(r.host_busy_pct, '.0f'):>7}{fmt(r.other_cpu_pct, '.0f'):>8}  {extra}")
    print("\nrtt in ms; cpu L/R: gateway processes of the left/right namespace, % of one core; "
          "host%: all cores busy (/proc/stat);\nother%: processes outside the lab (other work "
          "on this host, % of one core; should be ~0 for figures to be comparable)")
    if breakdown:
        print("\nCPU by process (% of one core):")
        for setup, test, side, text in breakdown:
            if text == "-":
                continue
            print(f"  {setup:<{w}}{test:<12}{side:<6}{text}")
    for n in notes:
        print(n)


def show_profiles(directory: str) -> None:
    import pstats

    for tag in "lr":
        path = Path(directory) / f"espline-{tag}.prof"
        if not path.exists():
            continue
        print(f"\n=== cProfile of the espline I/O process, {tag} side ({path}) ===",
              file=sys.stderr)
        pstats.Stats(str(path), stream=sys.stderr).sort_stats("tottime").print_stats(25)


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.tunnel", description=__doc__.split("\n")[0])
    p.add_argument("--setups", default=",".join(SETUPS),
                   help="comma-separated, from: espline,strongswan,plain (default: all), "
                        "espline-no-offload (espline, TUN offloads off), espline-no-hugepages "
                        "(espline, data plane heap not on huge pages: pipeline/heap.py)")
    p.add_argument("--time", type=float, default=5.0, help="iperf3 TCP seconds (default 5)")
    p.add_argument("--udp-time", type=float, default=None,
                   help="seconds per UDP rate (default: --time)")
    p.add_argument("--udp-rates", default="200M,500M,1G",
                   help="iperf3 -b values, comma-separated ('' for none; default 200M,500M,1G)")
    p.add_argument("--udp-len", type=int, default=1300, help="UDP datagram size (default 1300)")
    p.add_argument("--pings", type=int, default=50, help="idle pings (default 50)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of every setup, interleaved (espline, strongswan, plain, "
                        "espline, ...); the table then ends with each figure's median "
                        "(default 1)")
    p.add_argument("--ping-interval", type=float, default=0.02,
                   help="seconds between pings, idle and loaded (default 0.02)")
    p.add_argument("--outside", choices=("af_packet", "socket"), default="af_packet",
                   help="espline's outside mode (default af_packet: TPACKET_V3 ring, "
                        "sendmmsg; socket: raw/UDP sockets, one syscall per packet)")
    p.add_argument("--ring", choices=("auto", "v3", "v2"), default="auto",
                   help="the af_packet outside's RX ring (auto: v2 while sparse, v3 while busy; "
                   "v3: blocks; v2: per frame)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="espline workers (default: cores)")
    p.add_argument("--profile", metavar="DIR",
                   help="run the espline I/O processes under cProfile, write DIR/espline-[lr]"
                        ".prof and print the top functions")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (configs, logs, iperf3 server log)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = p.parse_args(argv)
    args.setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    bad = [s for s in args.setups if s not in SETUPS + EXTRA_SETUPS]
    if bad or not args.setups:
        p.error(f"unknown setup(s) {bad}; choose from {','.join(SETUPS + EXTRA_SETUPS)}")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.udp_rates = [r.strip() for r in args.udp_rates.split(",") if r.strip()]
    if args.udp_time is None:
        args.udp_time = args.time
    if args.time < 3:
        p.error("--time must be at least 3 s (the loaded pings start 1 s into the TCP run)")
    return args


def background_load(seconds: float = 1.0) -> float:
    """% of all cores busy while nothing of ours runs: other work skews every figure."""
    b0, t0 = host_cpu()
    time.sleep(seconds)
    b1, t1 = host_cpu()
    return 100.0 * (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def run_setup(name: str, args: argparse.Namespace, work: Path, emit: Any,
              round_: int | None = None
              ) -> tuple[list[Result], list[tuple[str, str, str, str]], list[str]]:
    idle = background_load()
    notes = [f"{name}: host {idle:.0f}% busy before the setup started (other processes)"]
    if idle > 10:
        print(f"[{name}] WARNING: the host is already {idle:.0f}% busy (all cores) with other "
              "work; figures will be skewed", file=sys.stderr)
    with Lab() as lab:
        lab.up()
        setup = SETUP_CLASSES[name](lab, work, args)
        try:
            setup.start()
            bench = Bench(setup, args)
            results = bench.run()
            for r in results:
                r.extra["host_busy_before_pct"] = round(idle, 1)
                if round_ is not None:
                    r.extra["round"] = round_ + 1
                emit(r)
            notes += setup.notes()
        finally:
            setup.stop()
    return results, [(name, *b) for b in bench.breakdown], notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.tunnel needs root (namespaces, TUN, raw sockets)", file=sys.stderr)
        return 2
    if shutil.which("iperf3") is None:
        print("bench.tunnel needs iperf3", file=sys.stderr)
        return 2
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        args.profile = os.path.abspath(args.profile)
    sigterm_as_interrupt()
    work = Path(tempfile.mkdtemp(prefix="espline-tunnel-", dir="/tmp"))

    def emit(r: Result) -> None:
        if args.json:
            print(json.dumps(r.as_dict()), flush=True)

    results: list[Result] = []
    breakdown: list[tuple[str, str, str, str]] = []
    notes: list[str] = []
    failed = 0
    rounds = [(k, name) for k in range(args.repeat) for name in args.setups]
    try:
        for k, name in rounds:
            if not args.json:
                tag = f" (round {k + 1} of {args.repeat})" if args.repeat > 1 else ""
                print(f"[{name}] running{tag} ...", file=sys.stderr, flush=True)
            try:
                r, b, n = run_setup(name, args, work, emit, k if args.repeat > 1 else None)
            except (RuntimeError, OSError, subprocess.SubprocessError, KeyError) as exc:
                failed += 1
                print(f"[{name}] FAILED: {exc}", file=sys.stderr)
                if args.json:
                    print(json.dumps({"setup": name, "test": "setup", "error": str(exc)}),
                          flush=True)
                continue
            results += r
            breakdown += b
            notes += n
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarize(results) if args.repeat > 1 else []
    if not args.json:
        print_table(results, breakdown, notes)
        if summary:
            print(f"\nMedian of {args.repeat} rounds (Mbit/s min-max in extra):")
            print_table(summary, [], [])
    else:
        for r in summary:
            print(json.dumps(r.as_dict()), flush=True)
        for n in notes:
            print(n, file=sys.stderr)
    if args.profile:
        show_profiles(args.profile)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
