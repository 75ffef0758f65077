"""The VICI server against independent clients: strongSwan's ``vici`` Python package and
strongSwan's own ``swanctl`` (5.9.8 on Debian 12), plus the server's socket behaviour.

The backend here is ``FakeBackend``, an in-test stand-in with canned SAs that records every
call: these tests check the protocol adapter and what the clients print, not the controller.
The swanctl tests are skipped when /usr/sbin/swanctl is missing, unless
ESPLINE_REQUIRE_STRONGSWAN=1 (then they fail).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from controller.vici import (
    AuthInfo,
    ChildConnInfo,
    ChildSaInfo,
    CommandError,
    ConnInfo,
    IkeSaInfo,
    StatsInfo,
    VersionInfo,
    ViciClient,
    ViciClientError,
    ViciServer,
    ViciServerError,
    child_updown_event,
    ike_updown_event,
)
from controller.vici.commands import LogFn
from controller.vici.protocol import (
    EncodableSection,
    FrameDecoder,
    Packet,
    PacketType,
    TextSection,
    encode_packet,
)

SWANCTL = "/usr/sbin/swanctl"
_REQUIRE = os.environ.get("ESPLINE_REQUIRE_STRONGSWAN") == "1"
HAVE_SWANCTL = os.access(SWANCTL, os.X_OK)
needs_swanctl = pytest.mark.skipif(not HAVE_SWANCTL and not _REQUIRE,
                                   reason=f"{SWANCTL} not installed")

STARTED_AT = time.mktime((2024, 3, 1, 12, 0, 0, 0, 0, -1))

CHILD = ChildSaInfo(
    name="lan", uniqueid=1, reqid=1, state="INSTALLED", mode="TUNNEL", protocol="ESP",
    encap=True, spi_in=0xC1234567, spi_out=0x0765ABCD, encr_alg="AES_GCM_16",
    encr_keysize=128, integ_alg=None, esn=False, bytes_in=1000, bytes_out=2000,
    packets_in=10, packets_out=20, use_in=5, use_out=3, rekey_time=3000, life_time=3600,
    install_time=120, local_ts=("10.1.0.0/16",), remote_ts=("10.2.0.0/16",))
SA = IkeSaInfo(
    name="site-b", uniqueid=1, version=2, state="ESTABLISHED", local_host="192.0.2.1",
    local_port=4500, local_id="moon.example.org", remote_host="192.0.2.2", remote_port=4500,
    remote_id="sun.example.org", initiator=True,
    initiator_spi=bytes.fromhex("0123456789abcdef"),
    responder_spi=bytes.fromhex("fedcba9876543210"), nat_local=False, nat_remote=True,
    encr_alg="AES_CBC", encr_keysize=256, integ_alg="HMAC_SHA2_256_128",
    prf_alg="PRF_HMAC_SHA2_256", dh_group="CURVE_25519", established=120, rekey_time=3000,
    child_sas=(CHILD,))
SA2 = IkeSaInfo(
    name="road", uniqueid=2, version=2, state="CONNECTING", local_host="192.0.2.1",
    local_port=500, local_id="moon.example.org", remote_host="198.51.100.7", remote_port=500,
    remote_id="%any", initiator=False, initiator_spi=bytes.fromhex("1111111111111111"),
    responder_spi=bytes(8), nat_local=False, nat_remote=False, encr_alg=None,
    encr_keysize=None, integ_alg=None, prf_alg=None, dh_group=None, established=None,
    rekey_time=None)
CONN = ConnInfo(
    name="site-b", local_addrs=("192.0.2.1",), remote_addrs=("192.0.2.2",), rekey_time=14400,
    dpd_delay=30, local_auth=(AuthInfo("pre-shared key", "moon.example.org"),),
    remote_auth=(AuthInfo("pre-shared key", "sun.example.org"),),
    children=(ChildConnInfo("lan", "TUNNEL", ("10.1.0.0/16",), ("10.2.0.0/16",),
                            rekey_time=3600),))

# What swanctl --list-sas prints for SA and SA2 (checked against the real swanctl below).
LIST_SAS_LINES = [
    "site-b: #1, ESTABLISHED, IKEv2, 0123456789abcdef_i* fedcba9876543210_r",
    "  local  'moon.example.org' @ 192.0.2.1[4500]",
    "  remote 'sun.example.org' @ 192.0.2.2[4500]",
    "  AES_CBC-256/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/CURVE_25519",
    "  established 120s ago, rekeying in 3000s",
    "  lan: #1, reqid 1, INSTALLED, TUNNEL-in-UDP, ESP:AES_GCM_16-128",
    "    installed 120s ago, rekeying in 3000s, expires in 3600s",
    "    in  c1234567,   1000 bytes,    10 packets,     5s ago",
    "    out 0765abcd,   2000 bytes,    20 packets,     3s ago",
    "    local  10.1.0.0/16",
    "    remote 10.2.0.0/16",
    "road: #2, CONNECTING, IKEv2, 1111111111111111_i 0000000000000000_r*",
    "  local  'moon.example.org' @ 192.0.2.1[500]",
    "  remote '%any' @ 198.51.100.7[500]",
]
LIST_CONNS_LINES = [
    "site-b: IKEv2, no reauthentication, rekeying every 14400s, dpd delay 30s",
    "  local:  192.0.2.1",
    "  remote: 192.0.2.2",
    "  local pre-shared key authentication:",
    "    id: moon.example.org",
    "  remote pre-shared key authentication:",
    "    id: sun.example.org",
    "  lan: TUNNEL, rekeying every 3600s, dpd action is clear",
    "    local:  10.1.0.0/16",
    "    remote: 10.2.0.0/16",
]


class FakeBackend:
    """An in-test Backend with canned SAs that records every call (see the module doc)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.loaded: dict[str, TextSection] = {}
        self.shared: dict[str, tuple[str, bytes, list[str]]] = {}
        self.fail_initiate: str | None = None

    def version(self) -> VersionInfo:
        return VersionInfo("espline", "0.1.0", "Linux", "6.1", "x86_64")

    def stats(self) -> StatsInfo:
        return StatsInfo(started_at=STARTED_AT, ike_sas_total=2, ike_sas_half_open=1,
                         workers_total=4, workers_idle=3, workers_active=(0, 1, 0, 0),
                         plugins=("espline-ike", "espline-esp"))

    def list_sas(self, ike: str | None, ike_id: int | None) -> Sequence[IkeSaInfo]:
        self.calls.append(("list_sas", ike, ike_id))
        return [sa for sa in (SA, SA2) if ike in (None, sa.name) and ike_id in (None, sa.uniqueid)]

    def list_conns(self) -> Sequence[ConnInfo]:
        return [CONN]

    def conns(self) -> Sequence[str]:
        return list(self.loaded)

    async def initiate(self, child: str, ike: str | None, timeout: float | None,
                       log: LogFn) -> None:
        self.calls.append(("initiate", child, ike, timeout))
        log(f"initiating CHILD_SA {child}")
        await asyncio.sleep(0)
        if self.fail_initiate:
            raise CommandError(self.fail_initiate)
        log(f"CHILD_SA {child}{{1}} established")

    async def terminate(self, *, ike: str | None, child: str | None, ike_id: int | None,
                        child_id: int | None, force: bool, timeout: float | None,
                        log: LogFn) -> None:
        self.calls.append(("terminate", ike, child, ike_id, child_id, force, timeout))
        log(f"deleting IKE_SA {ike}")

    async def rekey(self, *, ike: str | None, child: str | None, ike_id: int | None,
                    child_id: int | None, reauth: bool, log: LogFn) -> None:
        self.calls.append(("rekey", ike, child, ike_id, child_id, reauth))

    def counters(self, name: str | None, all: bool) -> Mapping[str, Mapping[str, int]]:
        self.calls.append(("counters", name, all))
        values = {"ike-rekey-init": 1, "ike-rekey-resp": 0, "invalid": 7}
        if all:
            return {"site-b": values, "road": values}
        return {name or "": values}

    def reset_counters(self, name: str | None, all: bool) -> None:
        self.calls.append(("reset_counters", name, all))

    def load_conn(self, name: str, tree: TextSection) -> None:
        self.calls.append(("load_conn", name))
        if "remote_addrs" not in tree:
            raise ValueError(f"connections.{name}.remote_addrs: missing")
        self.loaded[name] = tree

    def unload_conn(self, name: str) -> None:
        self.calls.append(("unload_conn", name))
        if self.loaded.pop(name, None) is None:
            raise CommandError(f"connection '{name}' not found")

    def load_shared(self, type: str, data: bytes, owners: Sequence[str],
                    id: str | None) -> None:
        self.shared[id or f"key-{len(self.shared)}"] = (type, data, list(owners))

    def unload_shared(self, id: str) -> None:
        self.calls.append(("unload_shared", id))
        del self.shared[id]

    def get_shared(self) -> Sequence[str]:
        return list(self.shared)

    def reload(self) -> None:
        self.calls.append(("reload",))


T = TypeVar("T")


class ServerThread:
    """A ViciServer on its own event loop thread, so blocking clients can talk to it."""

    def __init__(self, path: Path, backend: FakeBackend) -> None:
        self.path = path
        self.uri = f"unix://{path}"
        self.backend = backend
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ViciServer(path, backend)
        self.call(self.server.start())

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def publish(self, event: str, message: EncodableSection) -> int:
        async def publish() -> int:
            return self.server.publish(event, message)
        return self.call(publish())

    def wait_listeners(self, event: str, count: int = 1) -> None:
        async def listeners() -> int:
            return self.server.listeners(event)
        deadline = time.monotonic() + 10
        while self.call(listeners()) < count:
            assert time.monotonic() < deadline, f"nobody registered for {event}"
            time.sleep(0.02)

    def stop(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def vici_server(tmp_path: Path) -> Iterator[ServerThread]:
    server = ServerThread(tmp_path / "run" / "vici.sock", FakeBackend())
    try:
        yield server
    finally:
        server.stop()


# -- raw socket helpers --------------------------------------------------------------------


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


def _read(sock: socket.socket, decoder: FrameDecoder) -> Packet:
    while (packet := decoder.next_packet()) is None:
        data = sock.recv(65536)
        assert data, "server closed the connection"
        decoder.receive_data(data)
    return packet


def _nothing_pending(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        return sock.recv(1) == b""  # closed counts as nothing
    except TimeoutError:
        return True
    finally:
        sock.settimeout(5)


# -- the socket itself ---------------------------------------------------------------------


def test_socket_file_mode_parent_and_cleanup(vici_server: ServerThread) -> None:
    st = vici_server.path.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    vici_server.call(vici_server.server.close())
    assert not vici_server.path.exists()


def test_stale_socket_is_replaced_live_one_and_plain_file_are_not(tmp_path: Path) -> None:
    path = tmp_path / "vici.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed daemon leaves
    first = ServerThread(path, FakeBackend())
    try:
        with ViciClient(first.uri) as client:
            assert client.request("version")["daemon"] == b"espline"
        with pytest.raises(ViciServerError, match="another daemon"):
            first.call(ViciServer(path, FakeBackend()).start())
    finally:
        first.stop()
    plain = tmp_path / "plain"
    plain.write_text("keep me")
    with pytest.raises(ViciServerError, match="not a socket"):
        asyncio.run(ViciServer(plain, FakeBackend()).start())
    assert plain.read_text() == "keep me"


def test_unknown_command_and_event(vici_server: ServerThread) -> None:
    with ViciClient(vici_server.uri) as client:
        with pytest.raises(ViciClientError, match="does not know the command 'frobnicate'"):
            client.request("frobnicate")
        with pytest.raises(ViciClientError, match="no event 'no-such-event'"):
            client.listen(["no-such-event"]).__next__()
        assert client.request("version")["version"] == b"0.1.0"  # still connected


def test_backend_exception_answers_and_keeps_the_connection(vici_server: ServerThread) -> None:
    with ViciClient(vici_server.uri) as client:
        reply = client.request("load-conn", {"bad": {"local_addrs": "192.0.2.1"}})
        assert reply == {"success": b"no", "errmsg": b"connections.bad.remote_addrs: missing"}
        reply = client.request("unload-conn", {"name": "nope"})
        assert reply == {"success": b"no", "errmsg": b"connection 'nope' not found"}
        assert client.request("get-conns") == {"conns": []}


def test_broken_framing_drops_only_that_client(vici_server: ServerThread) -> None:
    bad = _connect(vici_server.path)
    bad.sendall(b"\x00\x00\x00\x02\x09\x00")  # packet type 9 does not exist
    bad.settimeout(5)
    assert bad.recv(1) == b""  # disconnected
    bad.close()
    with ViciClient(vici_server.uri) as client:
        assert client.request("version")["daemon"] == b"espline"


def test_streams_go_only_to_the_registered_requester(vici_server: ServerThread) -> None:
    watcher, requester, unregistered = (_connect(vici_server.path) for _ in range(3))
    decoders = [FrameDecoder() for _ in range(3)]
    for sock, decoder in ((watcher, decoders[0]), (requester, decoders[1])):
        sock.sendall(encode_packet(PacketType.EVENT_REGISTER, "list-sa"))
        assert _read(sock, decoder).type is PacketType.EVENT_CONFIRM
    requester.sendall(encode_packet(PacketType.CMD_REQUEST, "list-sas"))
    names = [_read(requester, decoders[1]) for _ in range(3)]
    assert [(p.type, p.name) for p in names] == [
        (PacketType.EVENT, "list-sa"), (PacketType.EVENT, "list-sa"),
        (PacketType.CMD_RESPONSE, None)]
    assert list(names[0].message) == ["site-b"] and list(names[1].message) == ["road"]
    # the requester not registered gets the response alone
    unregistered.sendall(encode_packet(PacketType.CMD_REQUEST, "list-sas"))
    assert _read(unregistered, decoders[2]).type is PacketType.CMD_RESPONSE
    assert _nothing_pending(watcher) and _nothing_pending(unregistered)
    for sock in (watcher, requester, unregistered):
        sock.close()


def test_publish_reaches_registered_connections_only(vici_server: ServerThread) -> None:
    a, b = _connect(vici_server.path), _connect(vici_server.path)
    da = FrameDecoder()
    a.sendall(encode_packet(PacketType.EVENT_REGISTER, "ike-updown"))
    assert _read(a, da).type is PacketType.EVENT_CONFIRM
    assert vici_server.publish("ike-updown", ike_updown_event(SA, up=True)) == 1
    event = _read(a, da)
    assert event.name == "ike-updown" and event.message["up"] == b"yes"
    assert _nothing_pending(b)
    a.sendall(encode_packet(PacketType.EVENT_UNREGISTER, "ike-updown"))
    assert _read(a, da).type is PacketType.EVENT_CONFIRM
    assert vici_server.publish("ike-updown", ike_updown_event(SA, up=False)) == 0
    a.close()
    b.close()


# -- the vici package (strongSwan's Python client) -----------------------------------------

try:
    import vici
except ImportError:  # the test extra installs it
    vici = None
needs_vici = pytest.mark.skipif(vici is None, reason="the vici package is not installed")


def _session(server: ServerThread) -> Any:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(server.path))
    return vici.Session(sock)


@needs_vici
def test_vici_package_version_stats_and_list_sas(vici_server: ServerThread) -> None:
    session = _session(vici_server)
    version = session.version()
    assert version["daemon"] == b"espline" and version["machine"] == b"x86_64"
    stats = session.stats()
    assert stats["ikesas"] == {"total": b"2", "half-open": b"1"}
    assert stats["plugins"] == [b"espline-ike", b"espline-esp"]
    sas = list(session.list_sas())
    assert [list(sa) for sa in sas] == [["site-b"], ["road"]]
    child = sas[0]["site-b"]["child-sas"]["lan-1"]
    assert child["spi-in"] == b"c1234567" and child["local-ts"] == [b"10.1.0.0/16"]
    assert list(session.list_sas({"ike": "road"}))[0]["road"]["state"] == b"CONNECTING"
    assert ("list_sas", "road", None) in vici_server.backend.calls
    conns = list(session.list_conns())
    assert conns[0]["site-b"]["children"]["lan"]["mode"] == b"TUNNEL"


@needs_vici
def test_vici_package_load_conn_and_shared(vici_server: ServerThread) -> None:
    session = _session(vici_server)
    session.load_conn({"site-c": {"remote_addrs": ["192.0.2.3"], "version": 2,
                                  "children": {"net": {"local_ts": ["10.1.0.0/16"]}}}})
    assert vici_server.backend.loaded["site-c"] == {
        "remote_addrs": ["192.0.2.3"], "version": "2",
        "children": {"net": {"local_ts": ["10.1.0.0/16"]}}}
    assert session.get_conns() == {"conns": [b"site-c"]}
    with pytest.raises(vici.exception.CommandException, match="remote_addrs: missing"):
        session.load_conn({"broken": {"local_addrs": ["192.0.2.1"]}})
    session.load_shared({"id": "psk-1", "type": "IKE", "data": "s3cr3t!",
                         "owners": ["moon.example.org", "sun.example.org"]})
    assert vici_server.backend.shared["psk-1"] == (
        "IKE", b"s3cr3t!", ["moon.example.org", "sun.example.org"])
    shared = session.get_shared()
    assert shared == {"keys": [b"psk-1"]} and b"s3cr3t!" not in repr(shared).encode()
    session.unload_shared({"id": "psk-1"})
    assert session.get_shared() == {"keys": []}


@needs_vici
def test_vici_package_initiate_streams_control_log(vici_server: ServerThread) -> None:
    session = _session(vici_server)
    logs = list(session.initiate({"child": "lan", "ike": "site-b", "timeout": 2000}))
    assert [log["msg"] for log in logs] == [b"initiating CHILD_SA lan",
                                            b"CHILD_SA lan{1} established"]
    assert ("initiate", "lan", "site-b", 2.0) in vici_server.backend.calls
    vici_server.backend.fail_initiate = "peer did not answer"
    with pytest.raises(vici.exception.CommandException, match="peer did not answer"):
        list(session.initiate({"child": "lan", "timeout": -1}))
    assert ("initiate", "lan", None, 0.0) in vici_server.backend.calls


@needs_vici
def test_vici_package_receives_published_events(vici_server: ServerThread) -> None:
    session = _session(vici_server)
    events = session.listen(["ike-updown", "child-updown"], timeout=0.05)
    assert next(events) == (None, None)  # registered, nothing yet
    vici_server.publish("child-updown", child_updown_event(SA, CHILD, up=True))
    vici_server.publish("ike-updown", ike_updown_event(SA, up=False))
    got = [e for e in (next(events), next(events), next(events)) if e[0] is not None]
    assert [name for name, _ in got] == [b"child-updown", b"ike-updown"]
    assert got[0][1]["up"] == b"yes" and "lan-1" in got[0][1]["site-b"]["child-sas"]
    assert "up" not in got[1][1] and "child-sas" not in got[1][1]["site-b"]
    events.close()


# -- swanctl -------------------------------------------------------------------------------


def swanctl(server: ServerThread, *args: str, env: Mapping[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    if not HAVE_SWANCTL:
        pytest.fail(f"ESPLINE_REQUIRE_STRONGSWAN=1 but {SWANCTL} is missing")
    return subprocess.run([SWANCTL, *args, "--uri", server.uri], capture_output=True,
                          text=True, timeout=20, env={**os.environ, **(env or {})})


@needs_swanctl
def test_swanctl_list_sas(vici_server: ServerThread) -> None:
    result = swanctl(vici_server, "--list-sas")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == LIST_SAS_LINES
    result = swanctl(vici_server, "--list-sas", "--ike-id", "2")
    assert result.stdout.splitlines() == LIST_SAS_LINES[11:]
    assert ("list_sas", None, 2) in vici_server.backend.calls


@needs_swanctl
def test_swanctl_list_conns_stats_counters(vici_server: ServerThread) -> None:
    result = swanctl(vici_server, "--list-conns")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == LIST_CONNS_LINES
    result = swanctl(vici_server, "--stats")
    since = time.strftime("%b %d %H:%M:%S %Y", time.localtime(STARTED_AT))
    lines = result.stdout.splitlines()
    assert lines[0].startswith("uptime: ") and lines[0].endswith(f" days, since {since}")
    assert lines[1:] == ["worker threads: 4 total, 3 idle, working: 0/1/0/0",
                         "job queues: 0/0/0/0", "jobs scheduled: 0",
                         "IKE_SAs: 2 total, 1 half-open",
                         "loaded plugins: espline-ike espline-esp"]
    result = swanctl(vici_server, "--counters", "--all")
    assert result.returncode == 0, result.stderr
    block = ["  ike-rekey-init        : 1", "  ike-rekey-resp        : 0",
             "  invalid               : 7"]
    assert result.stdout.splitlines() == ["site-b:", *block, "road:", *block]
    assert swanctl(vici_server, "--counters").stdout.splitlines() == ["global:", *block]
    result = swanctl(vici_server, "--counters", "--reset", "--name", "site-b")
    assert result.stdout == "reset-counters completed successfully\n"
    assert ("reset_counters", "site-b", False) in vici_server.backend.calls


@needs_swanctl
def test_swanctl_initiate_terminate_rekey(vici_server: ServerThread) -> None:
    calls = vici_server.backend.calls
    result = swanctl(vici_server, "--initiate", "--child", "lan", "--ike", "site-b")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[IKE] initiating CHILD_SA lan",
                                          "[IKE] CHILD_SA lan{1} established",
                                          "initiate completed successfully"]
    assert ("initiate", "lan", "site-b", None) in calls  # swanctl waits for the result
    result = swanctl(vici_server, "--terminate", "--ike", "site-b", "--timeout", "3")
    assert result.stdout.splitlines() == ["[IKE] deleting IKE_SA site-b",
                                          "terminate completed successfully"]
    assert ("terminate", "site-b", None, None, None, False, 3.0) in calls
    result = swanctl(vici_server, "--rekey", "--child-id", "7", "--reauth")
    assert result.returncode == 0 and "rekey completed successfully" in result.stdout
    assert ("rekey", None, None, None, 7, True) in calls
    vici_server.backend.fail_initiate = "no matching config"
    result = swanctl(vici_server, "--initiate", "--child", "lan")
    assert result.returncode != 0
    assert "initiate failed: no matching config" in result.stderr


SWANCTL_CONF = """\
connections {
    site-b {
        version = 2
        local_addrs = 192.0.2.1
        remote_addrs = 192.0.2.2
        proposals = aes128gcm16-prfsha256-x25519
        dpd_delay = 30s
        local {
            auth = psk
            id = moon.example.org
        }
        remote {
            auth = psk
            id = sun.example.org
        }
        children {
            lan {
                local_ts = 10.1.0.0/16
                remote_ts = 10.2.0.0/16,10.3.0.0/16
                esp_proposals = aes128gcm16
                start_action = start
            }
        }
    }
}

secrets {
    ike-1 {
        id-1 = moon.example.org
        id-2 = sun.example.org
        secret = "v3ry s3cret psk"
    }
}
"""
_CRED_DIRS = ("x509", "x509ca", "x509ocsp", "x509aa", "x509ac", "x509crl", "pubkey", "private",
              "rsa", "ecdsa", "bliss", "pkcs8", "pkcs12")


@needs_swanctl
def test_swanctl_load_all(vici_server: ServerThread, tmp_path: Path) -> None:
    conf_dir = tmp_path / "swanctl"
    for name in _CRED_DIRS:
        (conf_dir / name).mkdir(parents=True)
    (conf_dir / "swanctl.conf").write_text(SWANCTL_CONF)
    # strongswan.conf points swanctl at the socket too, as an operator's would
    strongswan_conf = tmp_path / "strongswan.conf"
    strongswan_conf.write_text(f"swanctl {{\n  socket = {vici_server.uri}\n}}\n")
    env = {"SWANCTL_DIR": str(conf_dir), "STRONGSWAN_CONF": str(strongswan_conf)}
    result = swanctl(vici_server, "--load-all", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        "loaded ike secret 'ike-1'",
        "no authorities found, 0 unloaded",
        "no pools found, 0 unloaded",
        "loaded connection 'site-b'",
        "successfully loaded 1 connections, 0 unloaded",
    ]
    assert vici_server.backend.loaded == {"site-b": {
        "version": "2",
        "local_addrs": ["192.0.2.1"],
        "remote_addrs": ["192.0.2.2"],
        "proposals": ["aes128gcm16-prfsha256-x25519"],
        "dpd_delay": "30s",
        "local": {"auth": "psk", "id": "moon.example.org"},
        "remote": {"auth": "psk", "id": "sun.example.org"},
        "children": {"lan": {"local_ts": ["10.1.0.0/16"],
                             "remote_ts": ["10.2.0.0/16", "10.3.0.0/16"],
                             "esp_proposals": ["aes128gcm16"], "start_action": "start"}},
    }}
    assert vici_server.backend.shared == {
        "ike-1": ("IKE", b"v3ry s3cret psk", ["moon.example.org", "sun.example.org"])}
    assert "s3cret" not in result.stdout + result.stderr
    # again, with the secret and connection already there: replaced, nothing unloaded
    result = swanctl(vici_server, "--load-all", env=env)
    assert result.returncode == 0 and result.stderr == ""
    assert "successfully loaded 1 connections, 0 unloaded" in result.stdout
    # a connection dropped from the file is unloaded, as on charon
    (conf_dir / "swanctl.conf").write_text(SWANCTL_CONF.replace("site-b", "site-c"))
    result = swanctl(vici_server, "--load-conns", env=env)
    assert "successfully loaded 1 connections, 1 unloaded" in result.stdout
    assert list(vici_server.backend.loaded) == ["site-c"]


@needs_swanctl
def test_swanctl_monitor_sa_prints_published_events(vici_server: ServerThread) -> None:
    if not HAVE_SWANCTL:
        pytest.fail(f"ESPLINE_REQUIRE_STRONGSWAN=1 but {SWANCTL} is missing")
    proc = subprocess.Popen([SWANCTL, "--monitor-sa", "--uri", vici_server.uri],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        vici_server.wait_listeners("child-updown")
        assert vici_server.publish("child-updown", child_updown_event(SA, CHILD, up=True)) == 1
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    assert out.splitlines() == LIST_SAS_LINES[:11]

