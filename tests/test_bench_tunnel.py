"""bench/tunnel.py's arithmetic and arguments (the measurements themselves need root,
namespaces and iperf3: the benchmark is run by hand, not by the suite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.tunnel import Result, parse_args, percentile, summarize


def test_medians_per_setup_and_test_over_rounds() -> None:
    rounds = [
        [Result("espline", "tcp", mbps=150.0, cpu_left_pct=80.0),
         Result("espline", "ping-idle", rtt_p50_ms=1.2, rtt_p99_ms=2.0),
         Result("strongswan", "tcp", mbps=300.0)],
        [Result("espline", "tcp", mbps=210.0, cpu_left_pct=90.0),
         Result("espline", "ping-idle", rtt_p50_ms=1.4, rtt_p99_ms=5.0),
         Result("strongswan", "tcp", mbps=280.0)],
        [Result("espline", "tcp", mbps=180.0, cpu_left_pct=70.0),
         Result("espline", "ping-idle", rtt_p50_ms=1.1, rtt_p99_ms=3.0),
         Result("strongswan", "tcp", mbps=None)],  # a failed measurement: left out
    ]
    summary = summarize([r for rs in rounds for r in rs])
    assert [(r.setup, r.test) for r in summary] == [
        ("espline", "tcp"), ("espline", "ping-idle"), ("strongswan", "tcp")]
    tcp, ping, swan = summary
    assert (tcp.mbps, tcp.cpu_left_pct, tcp.rtt_p50_ms) == (180.0, 80.0, None)
    assert (tcp.extra["mbps_min"], tcp.extra["mbps_max"], tcp.extra["rounds"]) == (
        150.0, 210.0, 3)
    assert (ping.rtt_p50_ms, ping.rtt_p99_ms, ping.mbps) == (1.2, 3.0, None)
    assert "mbps_min" not in ping.extra
    assert swan.mbps == 290.0 and swan.extra["rounds"] == 3
    assert {"setup", "test", "mbps", "loss_pct", "rtt_p50_ms", "rtt_p99_ms"} <= set(
        tcp.as_dict())


def test_repeat_is_parsed_and_checked() -> None:
    assert parse_args([]).repeat == 1
    assert parse_args(["--repeat", "3"]).repeat == 3
    with pytest.raises(SystemExit):
        parse_args(["--repeat", "0"])


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 51)], 99) == 50.0


def test_setups_by_name_and_the_no_offload_variant() -> None:
    from bench.tunnel import SETUP_CLASSES, Espline, EsplineNoOffload

    assert parse_args([]).setups == ["espline", "strongswan", "plain"]  # the default: no extra
    assert parse_args(["--setups", "espline,espline-no-offload"]).setups == [
        "espline", "espline-no-offload"]
    with pytest.raises(SystemExit):
        parse_args(["--setups", "espline,bogus"])
    assert SETUP_CLASSES["espline-no-offload"] is EsplineNoOffload
    assert Espline.offload and not EsplineNoOffload.offload


def test_espline_notes_flag_inbound_drops(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing on the lab's wire is forged: an inbound drop at a gateway is a bug, and the
    benchmark says so (a throughput figure alone would hide it)."""
    import json

    from bench.tunnel import Espline

    def stats(drops: dict[str, int], lost: int = 0) -> str:
        return json.dumps({
            "outbound": {"batches": 9, "passed": 900, "drops": {"policy": 3}},
            "inbound": {"batches": 9, "passed": 900, "drops": drops},
            "lost_batches": 0, "lost_packets": lost, "worker_restarts": 0,
            "mss_clamped": 0, "icmp_too_big": 0})

    for tag, text in (("l", stats({})), ("r", stats({"integrity": 7}))):
        (tmp_path / f"espline-{tag}").mkdir()
        (tmp_path / f"espline-{tag}" / "stats.json").write_text(text)
    notes = Espline(None, tmp_path, parse_args([])).notes()  # type: ignore[arg-type]
    assert len(notes) == 3 and "integrity" in notes[2] and "WARNING" in notes[2]
    assert "espline r dropped inbound packets {'integrity': 7}" in capsys.readouterr().err
    (tmp_path / "espline-r" / "stats.json").write_text(stats({}))
    assert not any("WARNING" in n for n in Espline(None, tmp_path,  # type: ignore[arg-type]
                                                   parse_args([])).notes())
