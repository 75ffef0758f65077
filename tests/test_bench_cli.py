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
        assert REQUIRED <= r.keys()
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
