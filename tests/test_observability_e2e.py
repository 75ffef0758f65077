"""What an operator observes of a running gateway, checked with independent tools:

- tshark, given only espline's opt-in key log, decrypts the captured IKE_AUTH exchange (the
  identities inside it) and the ESP traffic (the inner ICMP echoes);
- the Prometheus endpoint, parsed by prometheus_client's own parser, counts the Child SA's
  packets and the IKE messages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e_support import (
    SIDE_A,
    SIDE_B,
    TUN_NAME,
    WAN,
    Tool,
    build_topology,
    start_gateway,
    wait_for,
    wait_link,
)
from tests.netns import (
    NetnsLab,
    netns_lab_fixture,  # noqa: F401  (provides the netns_lab fixture)
    require_root_netns,
)
from tests.test_e2e_ike import ike_config

METRICS = "127.0.0.1:9469"
SCRAPE = ("import urllib.request,sys; "
          f"sys.stdout.write(urllib.request.urlopen('http://{METRICS}/metrics', timeout=5)"
          ".read().decode())")


def require_tshark() -> str:
    path = shutil.which("tshark")
    if path is None:
        if os.environ.get("ESPLINE_REQUIRE_TSHARK") == "1":
            pytest.fail("tshark is not installed")
        pytest.skip("tshark is not installed")
    return path


def test_key_log_lets_tshark_decrypt_and_metrics_count(netns_lab: NetnsLab,
                                                        tmp_path: Path) -> None:
    require_root_netns()
    tshark = require_tshark()
    from prometheus_client.parser import text_string_to_metric_families

    topo = build_topology(netns_lab, inside="tun")
    capture = tmp_path / "wan.pcap"
    dumper = topo.gw_b.popen([tshark, "-i", WAN, "-w", str(capture), "-q"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: capture.exists() and capture.stat().st_size > 0, 15, "the capture")
    keylog = tmp_path / "keylog"
    gws = []
    for ns, local, remote, name, start in ((topo.gw_b, SIDE_B, SIDE_A, "b", False),
                                           (topo.gw_a, SIDE_A, SIDE_B, "a", True)):
        rundir = tmp_path / f"run-{name}"
        cfg = ike_config(local, remote, rundir, start=start, encap=False)
        if name == "a":
            cfg = cfg.replace(f"controller: {{vici_socket: {rundir}/vici.sock}}",
                              f"controller: {{vici_socket: {rundir}/vici.sock, "
                              f"keylog_dir: {keylog}, metrics_listen: '{METRICS}', "
                              "log_format: json}")
            # Every batch of two packets or more to a worker (by default only full ones):
            # the workers' own counters must show in the metrics.
            assert cfg.count("\n  workers: 2\n") == 1, cfg
            cfg = cfg.replace("\n  workers: 2\n", "\n  workers: 2\n  batch: {handoff_min: 2}\n")
        else:  # gwB logs warnings only
            cfg = cfg.replace(f"controller: {{vici_socket: {rundir}/vici.sock}}",
                              f"controller: {{vici_socket: {rundir}/vici.sock, "
                              "log_level: warning}")
        gws.append(start_gateway(ns, cfg, tmp_path, name, rundir))
    b, a = gws
    try:
        wait_link(topo.gw_a, TUN_NAME, True)
        assert topo.host_a.ping(SIDE_B.host, timeout=20), a.log() + b.log()
        for _ in range(3):
            assert topo.host_a.ping(SIDE_B.host, timeout=5)
        # A burst: batches bigger than the I/O process handles itself go to the workers.
        Tool.start(topo.host_a, tmp_path, "burst", "udp-send", "--dst", SIDE_B.host, "--port",
                   "7400", "--count", "2000", "--duration", "20").wait(20)
        time.sleep(1.5)  # the I/O process reports 4 times a second, the workers once
        scraped = topo.gw_a.run([sys.executable, "-c", SCRAPE], timeout=30)
        samples = {}
        for family in text_string_to_metric_families(scraped.stdout):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        out_packets = [v for (n, labels), v in samples.items()
                       if n == "espline_child_sa_packets_total" and ("direction", "out") in labels
                       and ("child", "lan") in labels]
        assert out_packets and out_packets[0] >= 4, scraped.stdout
        auth = [v for (n, labels), v in samples.items() if n == "espline_ike_messages_total"
                and ("exchange", "IKE_AUTH") in labels]
        assert sum(auth) >= 2, scraped.stdout  # our request and the peer's response
        assert samples[("espline_ike_sas", (("state", "established"),))] == 1
        # The workers' own counters (each reports once a second): packets and batch sizes.
        by_worker = [v for (n, labels), v in samples.items()
                     if n == "espline_worker_packets_total" and dict(labels)["worker"] != "io"]
        assert sum(by_worker) >= 100, scraped.stdout
        assert any(n == "espline_worker_batch_size_count" and v > 0
                   for (n, _), v in samples.items()), scraped.stdout
    finally:
        codes = [gw.stop() for gw in (a, b)]
        dumper.terminate()
        dumper.wait(10)
    assert codes == [0, 0]
    # gwB, at log_level warning, wrote no INFO line (gwA's show there were events to log).
    assert " INFO " not in b.log() and "IKE SA established" not in b.log(), b.log()
    # JSON logs: one object per line, bound to the IKE SA where one applies.
    lines = [json.loads(line) for line in a.log().splitlines() if line.startswith("{")]
    established = [r for r in lines if r["msg"].startswith("IKE SA established")]
    assert established and established[0]["ike"] == "site" and established[0]["ike_id"] == 1
    assert all("secret" not in json.dumps(r).lower() or "<redacted>" in json.dumps(r)
               for r in lines)
    files = sorted(p.name for p in keylog.iterdir())
    assert files == ["esp_sa", "ikev2_decryption_table"]
    assert all(oct((keylog / f).stat().st_mode & 0o777) == "0o600" for f in files)
    env = {**os.environ, "WIRESHARK_CONFIG_DIR": str(keylog)}
    read = subprocess.run([tshark, "-n", "-r", str(capture), "-o",
                           "esp.enable_encryption_decode:TRUE", "-T", "fields", "-E",
                           "separator=/t", "-e", "isakmp.exchangetype", "-e",
                           "isakmp.id.data.fqdn", "-e", "esp.spi", "-e", "icmp.type"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert read.returncode == 0, read.stderr
    rows = [line.split("\t") for line in read.stdout.splitlines()]
    ids = {r[1] for r in rows if r[0] == "35" and r[1]}  # IKE_AUTH, decrypted
    assert any("gw-1.example.net" in i for i in ids) and any("gw-2.example.net" in i
                                                                for i in ids), rows
    echoes = [r for r in rows if r[2] and r[3]]  # ESP whose inner ICMP tshark could read
    assert {"8", "0"} <= {t for r in echoes for t in r[3].split(",")}, rows
