"""The codec benchmark and the CLI wiring: they run, and report what they promise."""

from __future__ import annotations

import json

import pytest

from bench import esp_codec
from controller import cli

REQUIRED = {"op", "alg", "mode", "size", "pps", "gbps", "aead_only_pps", "ratio"}


def test_bench_json_rows_have_the_promised_fields(capsys: pytest.CaptureFixture[str]) -> None:
    rc = esp_codec.main(["--json", "--algs", "aes128gcm16", "--modes", "tunnel",
                         "--sizes", "64", "--seconds", "0.05", "--rounds", "1", "--no-scapy",
                         "--batch", "32"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["op"] for r in rows] == ["encap", "decap"]
    for r in rows:
        assert r.keys() >= REQUIRED
        assert r["alg"] == "aes128gcm16" and r["mode"] == "tunnel" and r["size"] == 64
        assert r["pps"] > 0 and r["aead_only_pps"] > 0
        assert r["ratio"] == pytest.approx(r["ratio"])  # a number, not NaN
        assert 0 < r["ratio"] < 5


def test_bench_non_aead_has_no_aead_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    esp_codec.main(["--json", "--algs", "aes128-sha256", "--modes", "transport",
                    "--sizes", "mixed", "--seconds", "0.05", "--rounds", "1", "--no-scapy",
                    "--batch", "16"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["op"] for r in rows} == {"encap", "decap"}
    assert all(r["aead_only_pps"] is None and r["pps"] > 0 for r in rows)


def test_cli_bench_passes_arguments_through(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["bench", "--algs", "chacha20poly1305", "--modes", "tunnel", "--sizes",
                   "512", "--seconds", "0.05", "--rounds", "1", "--no-scapy", "--batch", "8"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "chacha20poly1305" in out and "encap" in out and "decap" in out


def test_cli_without_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "bench" in capsys.readouterr().out


def test_scaling_bench_runs_both_readers_through_workers(
        capsys: pytest.CaptureFixture[str]) -> None:
    """bench/scaling.py: each reader moves packets through a worker (the heads reader as
    packet heads, pipeline/region.py), and the summary's ratio is of medians."""
    from bench import scaling

    rc = scaling.main(["--json", "--seconds", "0.3", "--batch", "64", "--counts", "2",
                       "--repeat", "2"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    runs = [r for r in rows if not r.get("summary")]
    assert sorted((r["reader"], r["round"]) for r in runs) == [
        ("copy", 0), ("copy", 1), ("heads", 0), ("heads", 1)]
    for r in runs:
        assert r["pps"] > 0 and r["lost_batches"] == 0
        assert (r["heads_batches"] > 0) == (r["reader"] == "heads")
        assert 0 < r["io_busy_pct"] <= 110 and r["io_us_per_batch"] > 0
    summary = {r["reader"]: r for r in rows if r.get("summary")}
    assert summary.keys() == {"copy", "heads"}
    for s in summary.values():
        assert s["ratio"] == 1.0 and len(s["pps_runs"]) == 2
        assert s["io_us_per_batch_median"] > 0
