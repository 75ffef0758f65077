"""bench/ike_rate.py, small: 20 IKE SA + Child SA setups against espline's responder (and
strongSwan's charon where it is installed), in network namespaces, and nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import ike_rate
from tests.netns import REPO_ROOT, require_root_netns
from tests.strongswan import require_strongswan

COUNT = 20
FIELDS = (
    "responder",
    "setups",
    "failed",
    "seconds",
    "setups_per_s",
    "cpu_ms_per_setup",
    "initiator_cpu_ms_per_setup",
    "cpu_s_by_process",
)


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_without_root_it_says_what_it_needs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(ike_rate.os, "geteuid", lambda: 1000)
    assert ike_rate.main(["--count", "1"]) == 2
    assert "needs root" in capsys.readouterr().err


def test_the_table_has_one_row_per_responder() -> None:
    row = {
        "responder": "espline",
        "setups": 3,
        "failed": 0,
        "seconds": 0.5,
        "setups_per_s": 6.0,
        "cpu_ms_per_setup": 1.25,
        "initiator_cpu_ms_per_setup": None,
    }
    lines = ike_rate.table([row, {**row, "responder": "strongswan"}]).splitlines()
    assert lines[0].split()[:2] == ["responder", "setups"] and len(lines) == 4
    assert lines[2].split() == ["espline", "3", "0", "0.50", "6.0", "1.250", "-"]


def test_rounds_end_with_each_responders_median() -> None:
    rounds = [{"responder": name, "round": i, "setups": 3, "failed": 0, "count": 3,
               "seconds": 0.5 * i, "setups_per_s": 6.0 / i, "cpu_ms_per_setup": cpu,
               "cpu_ms_per_setup_idle_corrected": cpu, "initiator_cpu_ms_per_setup": None,
               "idle_cpu_pct": 0.0, "setup_ms_p50": 1.0, "setup_ms_p99": 2.0}
              for i, (name, cpu) in enumerate([("espline", 1.2), ("espline", 0.9),
                                               ("espline", 1.0)], 1)]
    med = ike_rate.median_result(rounds)
    assert med["round"] == "median" and med["cpu_ms_per_setup"] == 1.0
    assert med["cpu_ms_per_setup_rounds"] == [1.2, 0.9, 1.0]
    assert (med["setups"], med["count"], med["seconds"]) == (9, 9, 1.0)
    assert med["initiator_cpu_ms_per_setup"] is None
    lines = ike_rate.table([*rounds, med]).splitlines()
    assert lines[2].split()[:2] == ["espline", "#1"]
    assert lines[-1].split()[:3] == ["espline", "#median", "9"]


@pytest.mark.parametrize(("responder", "selectors"),
                         [("espline", "shared"), ("strongswan", "shared"),
                          ("espline", "distinct")])
def test_every_setup_succeeds_against_the_responder(tmp_path: Path, responder: str,
                                                    selectors: str) -> None:
    """``distinct``: every client its own /32, each narrowed to by the responder."""
    require_root_netns()
    if responder == "strongswan":
        require_strongswan()
    out = tmp_path / "ike_rate.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.ike_rate",
            "--responders",
            responder,
            "--count",
            str(COUNT),
            "--concurrency",
            "8",
            "--idle",
            "0.2",
            "--settle",
            "0.2",
            "--selectors",
            selectors,
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    stdout, stderr = proc.communicate(timeout=120)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert res.returncode == 0, res.stdout + res.stderr
    (result,) = json.loads(out.read_text())
    for key in FIELDS:
        assert key in result, key
    assert (result["responder"], result["selectors"]) == (responder, selectors)
    assert result["setups"] == COUNT and result["failed"] == 0, result
    assert result["setups_per_s"] > 0
    assert result["cpu_ms_per_setup"] >= 0  # /proc counts in ticks: 20 setups may be one
    assert result["cpu_s_by_process"]  # the responder's processes were sampled
    assert responder in res.stdout and "setups/s" in res.stdout
    # Everything it created is gone (its namespaces are named after its PID: bench/lab.py;
    # other test runs may have namespaces of their own meanwhile).
    assert not {n for n in netns_names() if n.startswith(f"espb-{proc.pid}-")}
