"""The network-namespace lab (tests/netns.py): connectivity, routing, and teardown that holds
when the test body raises, is interrupted, or the process is sent SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.netns import (
    REPO_ROOT,
    Namespace,
    NetnsCommandError,
    NetnsLab,
    netns_lab_fixture,  # noqa: F401  (provides the netns_lab fixture)
    require_root_netns,
)


def _netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return {line.split(":", 2)[1].strip().split("@", 1)[0] for line in out.stdout.splitlines()}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_two_namespaces_joined_by_veth_ping(netns_lab: NetnsLab) -> None:
    a, b = netns_lab.namespace(), netns_lab.namespace()
    assert a.name.startswith(f"espl-{os.getpid()}-") and a.name != b.name
    netns_lab.veth(
        a, b, a_addr=["10.0.0.1/24", "2001:db8::1/64"], b_addr=["10.0.0.2/24", "2001:db8::2/64"]
    )
    assert a.ping("10.0.0.2")
    assert b.ping("10.0.0.1")
    assert a.ping("2001:db8::2")
    assert not a.ping("10.0.0.3", timeout=0.3)  # nobody there: the pinger really waits for a reply


def test_third_namespace_routed_through_the_second(netns_lab: NetnsLab) -> None:
    root_forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    a, router, c = (netns_lab.namespace() for _ in range(3))
    netns_lab.veth(a, router, a_addr="192.0.2.1/25", b_addr="192.0.2.2/25")
    netns_lab.veth(router, c, a_addr="198.51.100.1/24", b_addr="198.51.100.2/24")
    # A host address on c's loopback, reachable only through the router.
    c.add_address("lo", "203.0.113.7/32")
    a.add_route("default", via="192.0.2.2")
    c.add_route("192.0.2.0/25", via="198.51.100.1")
    router.add_route("203.0.113.7/32", via="198.51.100.2")

    assert not a.ping("203.0.113.7", timeout=0.3), "forwarding is off by default in a new netns"
    router.enable_forwarding()
    assert a.ping("203.0.113.7")
    assert a.ping("198.51.100.2")

    assert router.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1"
    assert a.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "0"
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == root_forward


def test_run_raises_with_stderr(netns_lab: NetnsLab) -> None:
    ns = netns_lab.namespace()
    with pytest.raises(NetnsCommandError, match="boom") as info:
        ns.run(["sh", "-c", "echo boom >&2; exit 3"])
    assert info.value.returncode == 3
    assert ns.run(["sh", "-c", "exit 3"], check=False).returncode == 3
    assert ns.links() == ["lo"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_teardown_when_the_body_raises(error: type[BaseException]) -> None:
    require_root_netns()
    with pytest.raises(error), NetnsLab() as lab:
        a, b = lab.namespace(), lab.namespace()
        pair = lab.veth(a, b, a_addr="10.0.1.1/24", b_addr="10.0.1.2/24")
        to_root = lab.veth(None, a)
        # A background process with a child of its own, both inside the namespace.
        proc = a.popen(["sh", "-c", "sleep 60 & exec sleep 60"])
        names = {a.name, b.name}
        assert names <= _netns_list()
        assert to_root.a_name in _root_links()
        assert pair.a_name in a.links() and pair.b_name in b.links()
        pids = _wait_for_pids(a, 2)
        raise error("test body failed")
    assert not names & _netns_list()
    assert to_root.a_name not in _root_links()
    assert proc.returncode is not None
    assert not [p for p in pids if _alive(p)]
    lab.close()  # idempotent


def _wait_for_pids(ns: Namespace, count: int) -> list[int]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pids = ns.pids()
        if len(pids) >= count:
            return pids
        time.sleep(0.02)
    raise AssertionError(f"expected {count} processes in {ns.name}, saw {ns.pids()}")


def test_teardown_on_sigterm() -> None:
    """A run killed by SIGTERM (a CI timeout) still removes what its lab created."""
    require_root_netns()
    script = textwrap.dedent(
        """
        import sys, time
        from tests.netns import NetnsLab
        with NetnsLab() as lab:
            a, b = lab.namespace(), lab.namespace()
            v = lab.veth(None, a)
            p = b.popen(["sleep", "60"])
            print(a.name, b.name, v.a_name, p.pid, flush=True)
            time.sleep(60)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        ns_a, ns_b, link, pid = child.stdout.readline().split()
        assert {ns_a, ns_b} <= _netns_list()
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=15)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not {ns_a, ns_b} & _netns_list()
    assert link not in _root_links()
    assert not _alive(int(pid))
