"""Two-gateway namespace topology for bench/tunnel.py, with cleanup by PID, a raw-socket
pinger and per-process CPU accounting. Standard library only (no pytest, no iputils).

    netns espb-<pid>-<n>l ("left")                  netns espb-<pid>-<n>r ("right")
    lo 10.1.0.1/32 (inner host address)             lo 10.2.0.1/32
    veth0 192.0.2.1/24  <-------- veth -------->    veth0 192.0.2.2/24

There is no dummy link in this kernel, so the inner addresses sit on ``lo`` of the gateway
namespaces (as in shared/reference/strongswan-peer.md): traffic generators and pingers run in
the gateway namespaces and bind to the inner addresses.

A :class:`Lab` tracks every process it starts (each in its own session, so its PID is also
its process group) and on :meth:`Lab.close` stops them by PID (SIGTERM, then SIGKILL), kills by
PID whatever else still lives in its namespaces, and deletes the namespaces. ``with Lab()``,
Ctrl-C, SIGTERM (see :func:`sigterm_as_interrupt`) and interpreter exit all reach close().
Namespaces left by a SIGKILLed run (owner PID dead, older than ten minutes) are swept by the
next lab.

``python -m bench.lab rtt DST --src SRC --count N --interval S`` (run inside a namespace)
prints one JSON object with the echo RTTs; ``python -m bench.lab ping DST`` waits for one reply.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
NETNS_DIR = Path("/run/netns")
PREFIX = "espb"
STALE_AFTER_S = 600.0
_STALE_RE = re.compile(rf"^{PREFIX}-(\d+)-\d+[lr]$")
_serial = itertools.count()
_open: weakref.WeakSet[Lab] = weakref.WeakSet()

LEFT_OUTER, RIGHT_OUTER = "192.0.2.1", "192.0.2.2"
LEFT_INNER, RIGHT_INNER = "10.1.0.1", "10.2.0.1"
LEFT_NET, RIGHT_NET = "10.1.0.0/24", "10.2.0.0/24"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def sh(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A short command; raises with its stderr on failure."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


@dataclass
class Side:
    name: str  # namespace
    outer: str
    inner: str
    net: str
    peer_outer: str
    peer_inner: str
    peer_net: str
    dev: str = "veth0"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(["ip", "-n", self.name, *args], check=check)

    def has_link(self, name: str) -> bool:
        return self.ip("link", "show", name, check=False).returncode == 0

    def pids(self) -> list[int]:
        """Every process whose network namespace this is (what `ip netns pids` does)."""
        try:
            st = os.stat(NETNS_DIR / self.name)
        except FileNotFoundError:
            return []
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                ns = os.stat(f"/proc/{entry.name}/ns/net")
            except OSError:
                continue
            if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino):
                found.append(int(entry.name))
        return found


class Lab:
    """Two namespaces joined by a veth, inner /32s on lo; everything removed on close()."""

    def __init__(self) -> None:
        _sweep_stale()
        n = next(_serial)
        base = f"{PREFIX}-{os.getpid()}-{n}"
        self.left = Side(base + "l", LEFT_OUTER, LEFT_INNER, LEFT_NET,
                         RIGHT_OUTER, RIGHT_INNER, RIGHT_NET)
        self.right = Side(base + "r", RIGHT_OUTER, RIGHT_INNER, RIGHT_NET,
                          LEFT_OUTER, LEFT_INNER, LEFT_NET)
        self.procs: list[subprocess.Popen[Any]] = []
        self.tools: set[int] = set()  # PIDs of traffic generators/pingers (not gateways)
        self._made: list[Side] = []
        self._closed = False
        _open.add(self)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def sides(self) -> tuple[Side, Side]:
        return self.left, self.right

    def up(self) -> None:
        for s in self.sides:
            sh(["ip", "netns", "add", s.name])
            self._made.append(s)
            s.ip("link", "set", "lo", "up")
        self.left.ip("link", "add", self.left.dev, "type", "veth", "peer", "name",
                     self.right.dev, "netns", self.right.name)
        for s in self.sides:
            s.ip("addr", "add", f"{s.outer}/24", "dev", s.dev)
            s.ip("link", "set", s.dev, "up")
            s.ip("addr", "add", f"{s.inner}/32", "dev", "lo")

    def popen(self, side: Side, argv: Sequence[str], *, tool: bool = False,
              **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``side``'s namespace, in a new session; stopped by PID on close.
        ``tool``: a traffic generator or pinger, left out of the gateways' CPU figures."""
        if self._closed:
            raise RuntimeError("lab is closed")
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs["start_new_session"] = True
        proc = subprocess.Popen(side.exec_argv(argv), **kwargs)
        self.procs.append(proc)
        if tool:
            self.tools.add(proc.pid)
        return proc

    def stop(self, proc: subprocess.Popen[Any], grace: float = 3.0) -> int | None:
        """SIGTERM, then SIGKILL, the process group of ``proc`` (only while it is unreaped,
        so the PID cannot have been reused); returns its exit status."""
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return proc.returncode

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _open.discard(self)
        problems = []
        for proc in reversed(self.procs):
            self.stop(proc)
        for s in self._made:
            left = s.pids()
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if left and not _wait_gone(left, 3.0):
                problems.append(f"processes {left} in {s.name} survived SIGKILL")
        for s in reversed(self._made):
            res = sh(["ip", "netns", "del", s.name], check=False)
            if res.returncode != 0 and (NETNS_DIR / s.name).exists():
                problems.append(f"cannot delete namespace {s.name}: {res.stderr.strip()}")
        self._made.clear()
        if problems:
            raise RuntimeError("lab teardown: " + "; ".join(problems))


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_pid_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _sweep_stale() -> None:
    """Delete namespaces of earlier bench runs that were killed outright (SIGKILL)."""
    try:
        entries = list(NETNS_DIR.iterdir())
    except OSError:
        return
    for path in entries:
        m = _STALE_RE.match(path.name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        if _pid_alive(int(m.group(1))):
            continue
        try:
            if time.time() - path.stat().st_mtime < STALE_AFTER_S:
                continue
        except OSError:
            continue
        stale = Side(path.name, "", "", "", "", "", "")
        for pid in stale.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        sh(["ip", "netns", "del", path.name], check=False)


@atexit.register
def _close_all() -> None:
    for lab in list(_open):
        with contextlib.suppress(Exception):
            lab.close()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def sigterm_as_interrupt() -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every ``finally`` and ``with`` cleans up; SIGINT
    is made to interrupt even where it was inherited as ignored (a background job)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)


# -- CPU accounting -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcCpu:
    pid: int
    ppid: int
    start: int  # starttime in ticks: (pid, start) identifies a process across PID reuse
    ticks: int  # utime + stime
    comm: str
    cmdline: str


def proc_cpu(pid: int) -> ProcCpu | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            raw = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    head, tail = raw.rsplit(")", 1)
    fields = tail.split()
    # after "(comm)": state ppid ... utime(11) stime(12) ... starttime(19)
    return ProcCpu(pid, int(fields[1]), int(fields[19]), int(fields[11]) + int(fields[12]),
                   head.split("(", 1)[1], cmd)


def sample_side(side: Side, exclude: set[int]) -> dict[tuple[int, int], ProcCpu]:
    out = {}
    for pid in side.pids():
        if pid in exclude:
            continue
        p = proc_cpu(pid)
        if p is not None:
            out[(pid, p.start)] = p
    return out


def sample_outside(lab: Lab) -> dict[tuple[int, int], ProcCpu]:
    """Every process outside the lab's namespaces except this one: other work on the host
    (kernel threads have ppid 2 or are pid 2)."""
    inside = {pid for s in lab.sides for pid in s.pids()}
    me = os.getpid()
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid in inside or pid == me:
            continue
        p = proc_cpu(pid)
        if p is not None:
            out[(pid, p.start)] = p
    return out


def cpu_delta(before: dict[tuple[int, int], ProcCpu], after: dict[tuple[int, int], ProcCpu],
              wall: float) -> list[tuple[ProcCpu, float]]:
    """Per process: % of one core over ``wall`` seconds. A process that started inside the
    window counts whole; one that ended inside it is lost (its last figures are unreadable)."""
    rows = []
    for key, p in after.items():
        old = before.get(key)
        ticks = p.ticks - (old.ticks if old else 0)
        rows.append((p, 100.0 * ticks / CLK_TCK / wall if wall > 0 else 0.0))
    return rows


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies over all cores from /proc/stat (tick-sampled, approximate)."""
    with open("/proc/stat", encoding="ascii") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    total = sum(v[:8])
    return total - idle, total


# -- ping (raw ICMP, run inside a namespace) ------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo(ident: int, seq: int, size: int = 56) -> bytes:
    payload = bytes((seq + i) & 0xFF for i in range(size))
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq) + payload


def rtt(dst: str, *, src: str | None, count: int, interval: float,
        wait: float = 1.0) -> dict[str, Any]:
    """Send ``count`` ICMP echoes ``interval`` s apart; RTTs (ms) of those answered within
    ``wait`` s of the last send."""
    ident = os.getpid() & 0xFFFF
    sent: dict[int, float] = {}
    got: dict[int, float] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        if src:
            sock.bind((src, 0))
        t0 = time.perf_counter()
        nxt = 0
        while True:
            now = time.perf_counter()
            if nxt < count and now >= t0 + nxt * interval:
                seq = nxt & 0xFFFF
                with contextlib.suppress(OSError):
                    sent[seq] = time.perf_counter()
                    sock.sendto(_echo(ident, seq), (dst, 0))
                nxt += 1
                continue
            if nxt >= count and (len(got) == len(sent) or now > t0 + (count - 1) * interval
                                 + wait):
                break
            until = t0 + nxt * interval if nxt < count else t0 + (count - 1) * interval + wait
            ready, _, _ = select.select([sock], [], [], max(0.0, until - now))
            while ready:
                try:
                    data = sock.recv(65535, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                t = time.perf_counter()
                icmp = data[(data[0] & 0x0F) * 4:]
                if len(icmp) < 8 or icmp[0] != 0:
                    continue
                rid, rseq = struct.unpack_from("!HH", icmp, 4)
                if rid == ident and rseq in sent and rseq not in got:
                    got[rseq] = (t - sent[rseq]) * 1000.0
    return {"sent": count, "received": len(got), "rtt_ms": [got[s] for s in sorted(got)]}


def wait_reply(dst: str, *, src: str | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rtt(dst, src=src, count=1, interval=0.0, wait=0.3)["received"]:
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lab")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("rtt", help="ICMP echo RTTs as one JSON object")
    p.add_argument("dst")
    p.add_argument("--src")
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--interval", type=float, default=0.02)
    p.add_argument("--wait", type=float, default=1.0)
    q = sub.add_parser("ping", help="exit 0 once an echo is answered")
    q.add_argument("dst")
    q.add_argument("--src")
    q.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.command == "rtt":
        print(json.dumps(rtt(args.dst, src=args.src, count=args.count, interval=args.interval,
                             wait=args.wait)))
        return 0
    return 0 if wait_reply(args.dst, src=args.src, timeout=args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
