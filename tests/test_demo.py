"""``espline demo``, the README's first command: two sites, an IKEv2 tunnel, traffic, a summary,
and nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import demo
from tests.netns import REPO_ROOT, require_root_netns
from tests.strongswan import require_strongswan


def test_without_root_it_says_what_it_needs(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demo.os, "geteuid", lambda: 1000)
    assert demo.main(["--seconds", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs root" in err and "network namespaces" in err


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@pytest.mark.parametrize("peer", ["espline", "strongswan"])
def test_the_demo_runs_end_to_end_and_cleans_up(tmp_path: Path, peer: str) -> None:
    require_root_netns()
    if peer == "strongswan":
        require_strongswan()
    out = tmp_path / "summary.json"
    proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "demo", "--seconds", "4",
                             "--rekey", "2", "--peer", peer, "--json", str(out)],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    stdout, stderr = proc.communicate(timeout=180)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "summary" in res.stdout and "time to establish" in res.stdout
    summary = json.loads(out.read_text())
    assert summary["bytes_received"] == summary["bytes_sent"] > 1_000_000
    assert summary["packets_out"] > 100 and summary["packets_in"] > 10
    assert summary["pings"] == "20/20"
    assert summary["rekeys"] >= 1  # Child SAs rekeyed under the TCP stream, nothing lost
    assert summary["exit_codes"] == [0] * len(summary["exit_codes"])
    # Everything it created is gone (its namespaces are named after its PID: bench/lab.py).
    assert not {n for n in netns_names() if n.startswith(f"espb-{proc.pid}-")}
