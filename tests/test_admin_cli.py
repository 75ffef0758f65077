"""The admin CLI (controller/admin.py) against a VICI server with the in-test FakeBackend.

Human output is held to the lines strongSwan's swanctl prints for the same answers (those
lines are checked against the real swanctl in test_vici_swanctl.py), and ``--raw`` to
swanctl's own ``--raw`` dump when swanctl is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.admin import add_admin_parsers, dump_raw, run_admin
from controller.vici.protocol import decode_message, encode_message
from tests.test_vici_swanctl import (
    LIST_CONNS_LINES,
    LIST_SAS_LINES,
    FakeBackend,
    ServerThread,
    needs_swanctl,
    swanctl,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    thread = ServerThread(tmp_path / "vici.sock", FakeBackend())
    try:
        yield thread
    finally:
        thread.stop()


def admin(capsys: pytest.CaptureFixture[str], server: ServerThread, command: str,
          *args: str) -> tuple[int, str, str]:
    rc = run_admin(command, [*args, "--uri", server.uri])
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_sas_and_list_conns_print_like_swanctl(
        capsys: pytest.CaptureFixture[str], server: ServerThread) -> None:
    rc, out, err = admin(capsys, server, "list-sas")
    assert (rc, err) == (0, "") and out.splitlines() == LIST_SAS_LINES
    rc, out, _ = admin(capsys, server, "list-sas", "--ike", "road")
    assert out.splitlines() == LIST_SAS_LINES[11:]
    rc, out, _ = admin(capsys, server, "list-conns")
    assert rc == 0 and out.splitlines() == LIST_CONNS_LINES


def test_stats_counters_and_control(capsys: pytest.CaptureFixture[str],
                                    server: ServerThread) -> None:
    rc, out, _ = admin(capsys, server, "stats")
    assert rc == 0 and out.splitlines()[1:] == [
        "worker threads: 4 total, 3 idle, working: 0/1/0/0", "job queues: 0/0/0/0",
        "jobs scheduled: 0", "IKE_SAs: 2 total, 1 half-open",
        "loaded plugins: espline-ike espline-esp"]
    rc, out, _ = admin(capsys, server, "counters", "--name", "site-b")
    assert out.splitlines()[0] == "site-b:" and "  invalid               : 7" in out
    rc, out, _ = admin(capsys, server, "counters", "--all", "--reset")
    assert out == "reset-counters completed successfully\n"
    rc, out, _ = admin(capsys, server, "initiate", "--child", "lan", "--timeout", "2.5")
    assert rc == 0 and out.splitlines() == ["[IKE] initiating CHILD_SA lan",
                                            "[IKE] CHILD_SA lan{1} established",
                                            "initiate completed successfully"]
    rc, out, _ = admin(capsys, server, "terminate", "--ike-id", "1", "--force")
    assert rc == 0 and out.endswith("terminate completed successfully\n")
    rc, out, _ = admin(capsys, server, "rekey", "--child", "lan")
    assert rc == 0 and out == "rekey completed successfully\n"
    rc, out, _ = admin(capsys, server, "reload")
    assert rc == 0 and out == "reload-settings completed successfully\n"
    assert server.backend.calls[-6:] == [
        ("counters", "site-b", False), ("reset_counters", None, True),
        ("initiate", "lan", None, 2.5), ("terminate", None, None, 1, None, True, None),
        ("rekey", None, "lan", None, None, False), ("reload",)]


def test_failure_is_errmsg_on_stderr_and_status_1(capsys: pytest.CaptureFixture[str],
                                                   server: ServerThread) -> None:
    server.backend.fail_initiate = "peer unreachable"
    rc, out, err = admin(capsys, server, "initiate", "--child", "lan")
    assert rc == 1
    assert out == "[IKE] initiating CHILD_SA lan\n"
    assert err == "initiate failed: peer unreachable\n"


def test_json_output_parses(capsys: pytest.CaptureFixture[str], server: ServerThread) -> None:
    rc, out, _ = admin(capsys, server, "list-sas", "--json")
    sas = json.loads(out)
    assert rc == 0 and [list(sa) for sa in sas] == [["site-b"], ["road"]]
    assert sas[0]["site-b"]["child-sas"]["lan-1"]["local-ts"] == ["10.1.0.0/16"]
    rc, out, _ = admin(capsys, server, "stats", "--json")
    assert json.loads(out)["ikesas"] == {"total": "2", "half-open": "1"}
    rc, out, err = admin(capsys, server, "initiate", "--child", "lan", "--json")
    assert json.loads(out) == {"success": "yes"}
    assert err.splitlines()[0] == "[IKE] initiating CHILD_SA lan"  # progress on stderr


def test_raw_dump_format() -> None:
    tree = decode_message(encode_message(
        {"a": "1", "s": {"l": ["x", "y"], "e": []}, "b": b"\x00\x01", "": {"k": "v"}}))
    assert dump_raw("x reply", tree) == "x reply {a=1 s {l=[x y] e=[]} b=0x0001  {k=v}}\n"
    assert dump_raw("x reply", tree, pretty=True) == (
        "x reply {\n  a = 1\n  s {\n    l = [\n      x\n      y\n    ]\n    e = [\n    ]\n"
        "  }\n  b = 0x0001\n   {\n    k = v\n  }\n}\n")


@needs_swanctl
@pytest.mark.parametrize(("ours", "theirs"), [
    (["list-sas", "--raw"], ["--list-sas", "--raw"]),
    (["list-conns", "--raw"], ["--list-conns", "--raw"]),
    (["stats", "--raw"], ["--stats", "--raw"]),
    (["counters", "--all", "--raw"], ["--counters", "--all", "--raw"]),
    (["stats", "--pretty"], ["--stats", "--pretty"]),
    (["list-sas", "--pretty"], ["--list-sas", "--pretty"]),
    (["stats"], ["--stats"]),
])
def test_output_matches_swanctl(capsys: pytest.CaptureFixture[str], server: ServerThread,
                                ours: list[str], theirs: list[str]) -> None:
    rc, out, _ = admin(capsys, server, ours[0], *ours[1:])
    assert rc == 0
    assert out == swanctl(server, *theirs).stdout


def test_missing_socket_is_one_line_and_status_1(tmp_path: Path) -> None:
    # A real process: no traceback may reach the operator.
    missing = tmp_path / "nowhere" / "vici.sock"
    result = subprocess.run(
        [sys.executable, "-m", "controller.admin", "list-sas", "--uri", f"unix://{missing}"],
        capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"espline list-sas: cannot reach the espline admin socket "
                             f"{missing}: no such file (is `espline run` running?)\n")


def test_refused_and_environment_uri(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    stale = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(stale))
    sock.close()
    monkeypatch.setenv("ESPLINE_VICI", f"unix://{stale}")
    assert run_admin("stats", []) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "connection refused" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_permission_denied_is_explained(server: ServerThread) -> None:
    os.chmod(server.path.parent, 0o700)  # no way through for anyone but root
    result = subprocess.run(
        [sys.executable, "-c",
         # import first: the interpreter's files need not be readable as nobody
         "import os, shutil, sys; from controller.admin import run_admin;"
         "os.setgid(65534); os.setuid(65534);"
         f"sys.exit(run_admin('stats', ['--uri', {server.uri!r}]))"],
        capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 1, result.stderr
    assert result.stderr.endswith(": permission denied (run as root or as a member of the "
                                  "socket's group)\n")
    assert result.stderr.count("\n") == 1


def test_add_admin_parsers_wires_in_one_line(capsys: pytest.CaptureFixture[str],
                                             server: ServerThread) -> None:
    parser = argparse.ArgumentParser(prog="espline")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run")
    dispatch = add_admin_parsers(sub)
    assert dispatch(parser.parse_args(["run"])) is None
    assert dispatch(parser.parse_args(["list-conns", "--uri", server.uri])) == 0
    assert capsys.readouterr().out.splitlines() == LIST_CONNS_LINES
    with pytest.raises(SystemExit):
        parser.parse_args(["terminate", "--ike", "a", "--child", "b"])  # one selector only
    capsys.readouterr()

