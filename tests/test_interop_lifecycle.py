"""The life of an SA with strongSwan as the peer (same lab as test_interop_strongswan.py):

- Child SA and IKE SA rekeys started by either side, under a continuous UDP stream in both
  directions, lose no packet (make-before-break, DESIGN §5);
- a Delete from either side removes the SAs on both (swanctl, espline's data plane);
- DPD declares a dead peer: charon is killed, espline notices and tears its SAs down.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e_support import SIDE_A, SIDE_B, Tool, wait_for
from tests.netns import (
    REPO_ROOT,
    NetnsLab,
    netns_lab_fixture,  # noqa: F401  (provides the netns_lab fixture)
    require_root_netns,
)
from tests.strongswan import require_strongswan
from tests.test_interop_strongswan import Interop

IKE, ESP = "aes128gcm16-prfsha256-x25519", "aes128gcm16"


def espline_admin(run: Interop, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controller.cli", *args, "--uri",
                           f"unix://{run.espline.runtime_dir}/vici.sock"], capture_output=True,
                          text=True, timeout=60, cwd=REPO_ROOT, check=False)


def spis(text: str) -> set[str]:
    return set(re.findall(r"^\s+in\s+([0-9a-f]{8})", text, re.M))


def start(lab: NetnsLab, tmp: Path, **kw: object) -> Interop:
    require_root_netns()
    require_strongswan()
    run = Interop(lab, tmp, initiator="espline", ike=IKE, esp=ESP, **kw)  # type: ignore[arg-type]
    run.up()
    assert run.topo.host_a.ping(SIDE_B.host, timeout=15), run.logs()
    return run


@pytest.mark.parametrize("who", ["strongswan", "espline"])
@pytest.mark.parametrize("what", ["child", "ike"])
def test_rekey_under_traffic_loses_nothing(netns_lab: NetnsLab, tmp_path: Path, who: str,
                                           what: str) -> None:
    run = start(netns_lab, tmp_path)
    try:
        before = run.charon.list_sas()
        streams = []
        for name, ns_recv, ns_send, dst in (("ab", run.topo.host_b, run.topo.host_a, SIDE_B),
                                            ("ba", run.topo.host_a, run.topo.host_b, SIDE_A)):
            port = 7100 if name == "ab" else 7101
            recv = Tool.start(ns_recv, tmp_path, f"recv-{name}", "udp-recv", "--port",
                              str(port), "--duration", "60")
            send = Tool.start(ns_send, tmp_path, f"send-{name}", "udp-send", "--dst",
                              dst.host, "--port", str(port), "--count", "3000", "--rate",
                              "600", "--duration", "60")
            streams.append((recv, send))
        time.sleep(1.5)
        if who == "strongswan":
            arg = ["--child", "lan"] if what == "child" else ["--ike", "site"]
            run.charon.swanctl("--rekey", *arg)
        else:
            arg = ["--child", "lan"] if what == "child" else ["--ike", "site"]
            res = espline_admin(run, "rekey", *arg)
            assert res.returncode == 0, res.stdout + res.stderr + run.logs()
        if what == "child":
            wait_for(lambda: spis(run.charon.list_sas()) - spis(before)
                     and len(spis(run.charon.list_sas())) == 1, 15,
                     "the new CHILD_SA alone on strongSwan\n" + run.logs())
        else:
            old_spi = re.search(r"IKEv2, ([0-9a-f]{16})_i", before)
            assert old_spi is not None
            wait_for(lambda: old_spi.group(1) not in run.charon.list_sas(), 15,
                     "strongSwan's new IKE_SA\n" + run.logs())
        for recv, send in streams:
            sent = send.wait(30)
            time.sleep(1.0)
            got = recv.finish()
            missing = set(range(sent["sent"])) - set(got["counters"])
            assert sent["sent"] == 3000 and not missing, (
                f"{len(missing)} lost of {sent['sent']} ({recv.name}): {sorted(missing)[:20]}"
                f"\nespline stats: {run.espline.stats()}\n" + run.logs())
            assert got["duplicates"] == 0 and got["corrupt"] == 0
        after = run.charon.list_sas()
        assert "INSTALLED" in after
        if what == "child":
            assert "rekeyed" in run.espline.log() or "rekey" in run.espline.log()
        # The data plane holds exactly the current pair once the old SA's Delete is over.
        wait_for(lambda: (run.espline.stats() or {}).get("sa_count") == 2, 10,
                 "the old SAs to leave the data plane")
    finally:
        code = run.stop()
    assert code == 0, run.logs()


@pytest.mark.parametrize("who", ["strongswan", "espline"])
def test_a_delete_from_either_side_removes_the_sas_on_both(netns_lab: NetnsLab,
                                                           tmp_path: Path, who: str) -> None:
    run = start(netns_lab, tmp_path)
    try:
        if who == "strongswan":
            run.charon.swanctl("--terminate", "--ike", "site")
        else:
            res = espline_admin(run, "terminate", "--ike", "site")
            assert res.returncode == 0, res.stdout + res.stderr
        wait_for(lambda: "site:" not in run.charon.list_sas(), 15,
                 "strongSwan to drop the IKE_SA\n" + run.logs())
        wait_for(lambda: (run.espline.stats() or {}).get("sa_count") == 0, 10,
                 "espline's data plane to drop the SAs\n" + run.logs())
        listed = espline_admin(run, "list-sas", "--json")
        assert listed.returncode == 0 and "site" not in listed.stdout, listed.stdout
        assert not run.topo.host_a.ping(SIDE_B.host, timeout=1)
    finally:
        code = run.stop()
    assert code == 0, run.logs()


def test_dpd_declares_a_dead_peer(netns_lab: NetnsLab, tmp_path: Path) -> None:
    run = start(netns_lab, tmp_path, dpd_delay="1s", dpd_timeout="5s")
    try:
        assert run.charon.proc is not None
        run.charon.proc.kill()  # no Delete: the peer just vanishes
        run.charon.proc.wait(10)
        wait_for(lambda: "dead peer" in run.espline.log(), 20,
                 "espline to declare the peer dead\n" + run.logs())
        wait_for(lambda: (run.espline.stats() or {}).get("sa_count") == 0, 10,
                 "the data plane to drop the SAs")
    finally:
        code = run.stop()
    assert code == 0, run.logs()
