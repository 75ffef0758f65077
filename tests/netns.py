"""Network-namespace lab for end-to-end tests.

A :class:`NetnsLab` (context manager, or the ``netns_lab`` pytest fixture) creates uniquely
named namespaces (``espl-<pid>-<n>``, so parallel runs never collide), veth pairs between them
or to the root namespace, addresses and routes; runs commands inside a namespace
(``ns.run([...])``) and starts background processes there (``ns.popen([...])``). On exit it
tears down everything it created, in order: processes (by PID: the tracked ones, then any PID
``ip netns pids`` still lists in a lab namespace), links, namespaces. It does so when the test
body raises, on Ctrl-C, on SIGTERM (turned into KeyboardInterrupt while a lab is open) and at
interpreter exit; a namespace left by a run that was SIGKILLed is swept by a later lab once
its owner PID is dead and it is older than ten minutes.

Addresses: use documentation and private prefixes, and only inside namespaces the test
created (10.x, 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32). This kernel has
no dummy links: give a namespace a host address on ``lo`` or on a veth into a third namespace.

``ping`` is built in (``python -m tests.netns ping ADDR``, raw ICMP/ICMPv6 sockets, standard
library only) because iputils is not installed everywhere the suite runs.

Usage::

    def test_something(netns_lab):
        a, b = netns_lab.namespace(), netns_lab.namespace()
        netns_lab.veth(a, b, a_addr="10.0.0.1/24", b_addr="10.0.0.2/24")
        assert a.ping("10.0.0.2")
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import ipaddress
import itertools
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import pytest

__all__ = [
    "NAME_PREFIX",
    "REPO_ROOT",
    "Namespace",
    "NetnsCommandError",
    "NetnsLab",
    "NetnsTeardownError",
    "Veth",
    "netns_lab_fixture",
    "ping",
    "require_root_netns",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME_PREFIX = "espl"
NETNS_DIR = Path("/run/netns")
IFNAMSIZ = 16
# A namespace whose owner PID is dead is swept only after this long, so a lab running in
# another PID namespace (whose PIDs we cannot see) is never taken for a stale one.
STALE_AFTER_S = 600.0
_STALE_RE = re.compile(rf"^{NAME_PREFIX}-(\d+)-(\d+|probe)$")

# One counter per process for namespace and link names, so names never repeat across labs.
_serial = itertools.count()
_open_labs: weakref.WeakSet[NetnsLab] = weakref.WeakSet()


class NetnsCommandError(subprocess.CalledProcessError):
    """A command failed; unlike CalledProcessError, its message carries stderr."""

    def __str__(self) -> str:
        err = self.stderr.strip() if isinstance(self.stderr, str) else self.stderr
        return f"{super().__str__()}\nstderr: {err}"


class NetnsTeardownError(RuntimeError):
    """Something the lab created could not be removed."""


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = 30.0,
    input: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        cwd=cwd,
        env=env,
    )
    if check and proc.returncode != 0:
        raise NetnsCommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def _family_flag(*addresses: str | None) -> list[str]:
    for a in addresses:
        if a and a != "default":
            return ["-6"] if ipaddress.ip_network(a, strict=False).version == 6 else ["-4"]
    return []


# -- skip helper ----------------------------------------------------------------------------


@functools.cache
def _unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "network-namespace tests need root (CAP_SYS_ADMIN + CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed"
    probe = f"{NAME_PREFIX}-{os.getpid()}-probe"
    try:
        added = _run(["ip", "netns", "add", probe], check=False, timeout=10)
        if added.returncode != 0:
            return f"`ip netns add` is not permitted here: {added.stderr.strip()}"
        veth = _run(
            ["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"],
            check=False,
            timeout=10,
        )
        if veth.returncode != 0:
            return f"veth links are not available here: {veth.stderr.strip()}"
    finally:
        _run(["ip", "netns", "del", probe], check=False, timeout=10)
    return None


def require_root_netns() -> None:
    """Skip the calling test unless namespaces and veth links can be made here.

    With ``ESPLINE_REQUIRE_NETNS=1`` (for CI that must run these tests) it fails instead.
    """
    reason = _unavailable_reason()
    if reason is None:
        return
    if os.environ.get("ESPLINE_REQUIRE_NETNS") == "1":
        pytest.fail(f"ESPLINE_REQUIRE_NETNS=1 but {reason}")
    pytest.skip(reason)


# -- namespaces ------------------------------------------------------------------------------


class Namespace:
    """A network namespace created by a :class:`NetnsLab` (which owns its teardown)."""

    def __init__(self, lab: NetnsLab, name: str) -> None:
        self.lab = lab
        self.name = name
        self._veth_serial = itertools.count()

    def __repr__(self) -> str:
        return f"<Namespace {self.name}>"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = 30.0,
        input: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace; raise NetnsCommandError (with stderr) on failure."""
        return _run(
            self.exec_argv(argv), check=check, timeout=timeout, input=input, cwd=cwd, env=env
        )

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``argv`` in the background inside the namespace; the lab kills it by PID.

        It runs in a new session, so its PID is also its process-group id and teardown reaches
        its children too. Defaults: stdin from /dev/null, text mode; pass stdout/stderr.
        """
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("text", True)
        kwargs["start_new_session"] = True
        proc: subprocess.Popen[str] = subprocess.Popen(self.exec_argv(argv), **kwargs)
        self.lab._processes.append(proc)
        return proc

    def python(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run this interpreter (the project's venv) inside the namespace, from the repo root."""
        kwargs.setdefault("cwd", REPO_ROOT)
        return self.run([sys.executable, *args], **kwargs)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n <ns> ...``: iproute2 inside the namespace without an exec."""
        return _run(["ip", "-n", self.name, *args], check=check)

    def link_up(self, ifname: str) -> None:
        self.ip("link", "set", ifname, "up")

    def add_address(self, ifname: str, cidr: str) -> None:
        """Add ``cidr`` (e.g. ``10.0.0.1/24``) to ``ifname``; IPv6 skips DAD (usable at once)."""
        extra = ["nodad"] if ipaddress.ip_interface(cidr).version == 6 else []
        self.ip("addr", "add", cidr, "dev", ifname, *extra)

    def add_route(self, dst: str, *, via: str | None = None, dev: str | None = None) -> None:
        """``ip route add dst [via GW] [dev IF]``; ``dst`` may be ``default``."""
        if via is None and dev is None:
            raise ValueError("a route needs via= or dev=")
        args = [*_family_flag(dst, via), "route", "add", dst]
        if via is not None:
            args += ["via", via]
        if dev is not None:
            args += ["dev", dev]
        self.ip(*args)

    def sysctl(self, key: str, value: str | int) -> None:
        """Set a (per-namespace) sysctl, e.g. ``net.ipv4.ip_forward``, inside this namespace."""
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def enable_forwarding(self, ipv6: bool = False) -> None:
        self.sysctl("net.ipv4.ip_forward", 1)
        if ipv6:
            self.sysctl("net.ipv6.conf.all.forwarding", 1)

    def links(self) -> list[str]:
        out = self.ip("-o", "link", "show").stdout
        return [line.split(":", 2)[1].strip().split("@", 1)[0] for line in out.splitlines()]

    def pids(self) -> list[int]:
        """PIDs of every process whose network namespace this is."""
        out = _run(["ip", "netns", "pids", self.name], check=False).stdout
        return [int(p) for p in out.split()]

    def ping(self, address: str, *, timeout: float = 2.0) -> bool:
        """True when ``address`` answers an ICMP(v6) echo from this namespace within timeout."""
        proc = self.python(
            "-m", "tests.netns", "ping", address, "--timeout", str(timeout),
            check=False, timeout=timeout + 10,
        )  # fmt: skip
        return proc.returncode == 0


@dataclass(frozen=True)
class Veth:
    """A veth pair; an end whose namespace is None lives in the root namespace."""

    a_ns: Namespace | None
    a_name: str
    b_ns: Namespace | None
    b_name: str


# -- the lab ---------------------------------------------------------------------------------


class NetnsLab:
    """Creates namespaces, links and processes, and removes all of them on close()."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.namespaces: list[Namespace] = []
        self.veths: list[Veth] = []
        self._processes: list[subprocess.Popen[str]] = []
        self._closed = False
        _sweep_stale_once()
        _open_labs.add(self)
        _install_sigterm()

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except NetnsTeardownError as err:
            if exc is None:
                raise
            # Do not mask the test's own failure with a teardown one.
            warnings.warn(f"netns lab teardown: {err}", stacklevel=2)

    def _new_name(self) -> str:
        return f"{NAME_PREFIX}-{self.pid}-{next(_serial)}"

    def namespace(self) -> Namespace:
        """A new, empty namespace with ``lo`` up."""
        if self._closed:
            raise RuntimeError("netns lab is closed")
        name = self._new_name()
        _run(["ip", "netns", "add", name])
        ns = Namespace(self, name)
        self.namespaces.append(ns)
        ns.link_up("lo")
        return ns

    def veth(
        self,
        a: Namespace | None,
        b: Namespace | None,
        *,
        a_name: str | None = None,
        b_name: str | None = None,
        a_addr: str | Sequence[str] = (),
        b_addr: str | Sequence[str] = (),
        mtu: int | None = None,
    ) -> Veth:
        """A veth pair between ``a`` and ``b`` (None: the root namespace), up, with addresses.

        Names inside a lab namespace default to ``veth0``, ``veth1``, ...; a root-namespace end
        gets a name unique to this process (``es<pid>x<n><a|b>``).
        """
        if a is None and b is None:
            raise ValueError("at least one end of a lab veth must be in a lab namespace")
        serial = next(_serial)
        names = (self._end_name(a, a_name, serial, "a"), self._end_name(b, b_name, serial, "b"))
        ends = ((a, names[0]), (b, names[1]))
        # Create from the root namespace when one end is there, so a root name is never
        # looked up inside a lab namespace; the peer goes straight to its namespace.
        (first_ns, first), (peer_ns, peer) = ends if a is None or b is not None else ends[::-1]
        argv = ["ip"] + (["-n", first_ns.name] if first_ns else [])
        argv += ["link", "add", first, "type", "veth", "peer", "name", peer]
        if peer_ns is not first_ns:
            assert peer_ns is not None
            argv += ["netns", peer_ns.name]
        _run(argv)
        veth = Veth(a, names[0], b, names[1])
        self.veths.append(veth)
        for ns, name, addrs in ((a, names[0], a_addr), (b, names[1], b_addr)):
            ip = ["ip"] + (["-n", ns.name] if ns else [])
            if mtu is not None:
                _run([*ip, "link", "set", name, "mtu", str(mtu)])
            _run([*ip, "link", "set", name, "up"])
            for cidr in [addrs] if isinstance(addrs, str) else addrs:
                extra = ["nodad"] if ipaddress.ip_interface(cidr).version == 6 else []
                _run([*ip, "addr", "add", cidr, "dev", name, *extra])
        return veth

    def _end_name(self, ns: Namespace | None, given: str | None, serial: int, side: str) -> str:
        name = given
        if name is None:
            name = f"veth{next(ns._veth_serial)}" if ns else f"es{self.pid}x{serial}{side}"
        if len(name.encode()) >= IFNAMSIZ:
            raise ValueError(f"interface name {name!r} is longer than {IFNAMSIZ - 1} bytes")
        return name

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Kill processes (by PID), delete links, delete namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _open_labs.discard(self)
        problems: list[str] = []
        try:
            self._kill_processes(problems)
            self._delete_links(problems)
            self._delete_namespaces(problems)
        finally:
            if not _open_labs:
                _restore_sigterm()
        if problems:
            raise NetnsTeardownError("; ".join(problems))

    def _kill_processes(self, problems: list[str]) -> None:
        for proc in reversed(self._processes):
            _stop_process_group(proc)
        # Whatever still lives in a lab namespace (a child that left its process group, say)
        # is ours too: end it by PID.
        for ns in self.namespaces:
            leftover = ns.pids()
            for pid in leftover:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if leftover and not _wait_gone(leftover, 2.0):
                problems.append(f"processes {leftover} in {ns.name} survived SIGKILL")

    def _delete_links(self, problems: list[str]) -> None:
        for veth in reversed(self.veths):
            # Deleting one end removes the pair; prefer the root end, which no namespace
            # deletion would clean up.
            ns, name = (veth.a_ns, veth.a_name) if veth.b_ns is not None else (None, veth.b_name)
            argv = ["ip"] + (["-n", ns.name] if ns else []) + ["link", "del", name]
            res = _run(argv, check=False)
            if res.returncode != 0 and _link_exists(ns, name):
                problems.append(f"cannot delete link {name}: {res.stderr.strip()}")

    def _delete_namespaces(self, problems: list[str]) -> None:
        for ns in reversed(self.namespaces):
            res = _run(["ip", "netns", "del", ns.name], check=False)
            if res.returncode != 0 and (NETNS_DIR / ns.name).exists():
                problems.append(f"cannot delete namespace {ns.name}: {res.stderr.strip()}")


# SIGTERM (a CI timeout, say) unwinds like Ctrl-C while a lab is open, so that with-blocks and
# fixtures tear down; installed only over the default action, from the main thread.


def _sigterm_to_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _install_sigterm() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)


def _restore_sigterm() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is _sigterm_to_interrupt:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stop_process_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL, the process group led by ``proc`` (it was started in a new
    session); only while ``proc`` is unreaped, so its PID cannot have been reused."""
    if proc.poll() is None:
        for sig, grace in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if _pid_alive(p)]
        if not alive:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"  # a zombie holds no namespace resources worth waiting for


def _link_exists(ns: Namespace | None, name: str) -> bool:
    argv = ["ip"] + (["-n", ns.name] if ns else []) + ["link", "show", name]
    return _run(argv, check=False).returncode == 0


@functools.cache
def _sweep_stale_once() -> None:
    """Remove lab namespaces left by runs that were killed outright (SIGKILL, OOM)."""
    try:
        entries = list(NETNS_DIR.iterdir())
    except OSError:
        return
    now = time.time()
    for path in entries:
        m = _STALE_RE.match(path.name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # owner alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            if now - path.stat().st_mtime < STALE_AFTER_S:
                continue
        except OSError:
            continue
        out = _run(["ip", "netns", "pids", path.name], check=False).stdout
        for pid in (int(p) for p in out.split()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _run(["ip", "netns", "del", path.name], check=False)


@atexit.register
def _close_open_labs() -> None:
    for lab in list(_open_labs):
        with contextlib.suppress(Exception):
            lab.close()


@pytest.fixture(name="netns_lab")
def netns_lab_fixture() -> Iterator[NetnsLab]:
    """The ``netns_lab`` fixture: a NetnsLab for one test, torn down after it; skips where
    namespaces cannot be made (require_root_netns).

    Import it into a test module as ``from tests.netns import netns_lab_fixture  # noqa: F401``
    (or list ``tests.netns`` in a conftest's ``pytest_plugins``); tests then ask for
    ``netns_lab``.
    """
    require_root_netns()
    lab = NetnsLab()
    try:
        yield lab
    finally:
        lab.close()


# -- ping (standard library only, runs inside a namespace) -----------------------------------

_ICMP_ECHO = {4: (8, 0), 6: (128, 129)}  # (request, reply): RFC 792, RFC 4443 §4


def _inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ping(address: str, *, timeout: float = 2.0, interval: float = 0.2) -> bool:
    """Send ICMP(v6) echo requests to ``address`` until one is answered or timeout passes."""
    target = ipaddress.ip_address(address)
    request, reply = _ICMP_ECHO[target.version]
    if target.version == 4:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    else:
        # The kernel fills in the ICMPv6 checksum on raw ICMPv6 sockets (RFC 3542 §3.1).
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    ident = os.getpid() & 0xFFFF
    payload = b"espline netns ping"
    with sock:
        deadline = time.monotonic() + timeout
        next_send = 0.0
        seq = 0
        while (now := time.monotonic()) < deadline:
            if now >= next_send:
                seq = (seq + 1) & 0xFFFF
                header = struct.pack("!BBHHH", request, 0, 0, ident, seq)
                csum = _inet_checksum(header + payload) if target.version == 4 else 0
                header = struct.pack("!BBHHH", request, 0, csum, ident, seq)
                with contextlib.suppress(OSError):  # e.g. ENETUNREACH: keep trying
                    sock.sendto(header + payload, (str(target), 0))
                next_send = now + interval
            ready, _, _ = select.select([sock], [], [], max(0.0, min(next_send, deadline) - now))
            if not ready:
                continue
            data, src = sock.recvfrom(65535)
            icmp = data[(data[0] & 0x0F) * 4 :] if target.version == 4 else data
            if len(icmp) < 8 or icmp[0] != reply:
                continue
            if struct.unpack_from("!H", icmp, 4)[0] != ident:
                continue
            if ipaddress.ip_address(src[0].split("%", 1)[0]) == target:
                return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netns")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ping", help="ICMP(v6) echo; exit 0 when answered")
    p.add_argument("address")
    p.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    ok = ping(args.address, timeout=args.timeout)
    print(f"ping {args.address}: {'reply' if ok else 'no reply'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
