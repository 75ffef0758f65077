"""controller/metrics.py: the exposition read back by prometheus_client's own text parser (an
independent implementation of the format), label escaping, counters that never go down across
worker restarts, and the HTTP endpoint over a real socket."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from controller.metrics import (
    ALERT_TYPES,
    BATCH_SIZE_BOUNDS,
    CONTENT_TYPE,
    DROP_REASONS,
    FAMILIES,
    IKE_EXCHANGES,
    IKE_SA_STATES,
    ChildSaCounters,
    CounterMerger,
    FamilySpec,
    Histogram,
    IkeCounters,
    MetricsServer,
    MetricsSnapshot,
    MetricType,
    Registry,
    WorkerCounters,
    WorkerCountersMerger,
    batch_size_bucket,
    batch_size_histogram,
    escape_label_value,
    from_dataplane_stats,
    parse_listen,
    render,
)
from pipeline.batch import Batch, Verdict
from workers.counters import Counters


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of one sample name, keyed by their sorted labels."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def L(**labels: str) -> tuple[tuple[str, str], ...]:  # noqa: N802
    return tuple(sorted(labels.items()))


def snapshot() -> MetricsSnapshot:
    return MetricsSnapshot(
        child_sas=(
            ChildSaCounters("site-b", "lan", "out", 0xC0FFEE01, 15_000, 10),
            ChildSaCounters("site-b", "lan", "in", 0x00001234, 3_000, 2),
        ),
        workers=(
            WorkerCounters(0, packets_in=100, packets_out=200,
                           drops={"integrity": 3, "replay": 1},
                           batch_sizes=batch_size_histogram([1, 2, 3, 256, 256, 2000])),
            WorkerCounters("io", packets_in=5, packets_out=7, drops={"no_sa": 4}),
        ),
        ike=IkeCounters(
            sas_by_state={"established": 2, "connecting": 1},
            messages_in={"IKE_SA_INIT": 3, "IKE_AUTH": 2},
            messages_out={"IKE_SA_INIT": 3, "INFORMATIONAL": 1},
            alerts={"auth_failed": 1, "something_new": 2},
        ),
        worker_restarts=1,
        lost_batches=4,
    )


# -- exposition, read by an independent parser ------------------------------------------------

def test_every_family_has_its_type_and_help() -> None:
    fams = families(render(MetricsSnapshot()))
    for spec in FAMILIES:
        name = spec.name.removesuffix("_total")  # the parser names counters without it
        assert name in fams, spec.name
        assert fams[name].type == spec.type.value
        assert fams[name].documentation == spec.help


def test_values_labels_and_types_read_back() -> None:
    text = render(snapshot())
    fams = families(text)
    assert fams["espline_child_sa_bytes"].type == "counter"
    assert samples(text, "espline_child_sa_bytes_total") == {
        L(ike="site-b", child="lan", direction="out", spi="0xc0ffee01"): 15_000,
        L(ike="site-b", child="lan", direction="in", spi="0x00001234"): 3_000,
    }
    assert samples(text, "espline_child_sa_packets_total")[
        L(ike="site-b", child="lan", direction="in", spi="0x00001234")] == 2
    assert fams["espline_ike_sas"].type == "gauge"
    assert samples(text, "espline_ike_sas") == {L(state="established"): 2,
                                               L(state="connecting"): 1,
                                               L(state="rekeying"): 0, L(state="deleting"): 0}
    drops = samples(text, "espline_dataplane_drops_total")
    assert drops[L(worker="0", reason="integrity")] == 3
    assert drops[L(worker="0", reason="replay")] == 1
    assert drops[L(worker="io", reason="no_sa")] == 4
    packets = samples(text, "espline_worker_packets_total")
    assert packets == {L(worker="0", direction="in"): 100, L(worker="0", direction="out"): 200,
                       L(worker="io", direction="in"): 5, L(worker="io", direction="out"): 7}
    messages = samples(text, "espline_ike_messages_total")
    assert messages[L(exchange="IKE_SA_INIT", direction="in")] == 3
    assert messages[L(exchange="INFORMATIONAL", direction="out")] == 1
    alerts = samples(text, "espline_alerts_total")
    assert alerts[L(type="auth_failed")] == 1
    assert alerts[L(type="something_new")] == 2
    assert samples(text, "espline_worker_restarts_total") == {(): 1}
    assert samples(text, "espline_lost_batches_total") == {(): 4}


def test_known_label_values_start_at_zero() -> None:
    """rate() misses the first event of a series that appears already non-zero."""
    text = render(MetricsSnapshot(workers=(WorkerCounters(3),)))
    drops = samples(text, "espline_dataplane_drops_total")
    assert set(drops) == {L(worker="3", reason=r) for r in DROP_REASONS}
    assert set(DROP_REASONS) == {v.name.lower() for v in Verdict
                                 if v not in (Verdict.PASS, Verdict.PARKED)}  # not a drop
    assert not any(drops.values())
    messages = samples(text, "espline_ike_messages_total")
    assert set(messages) == {L(exchange=e, direction=d) for e in IKE_EXCHANGES
                             for d in ("in", "out")}
    assert set(samples(text, "espline_alerts_total")) == {L(type=t) for t in ALERT_TYPES}
    assert samples(text, "espline_ike_sas") == {L(state=s): 0 for s in IKE_SA_STATES}


def test_histogram_is_cumulative_with_inf_sum_and_count() -> None:
    text = render(snapshot())
    fam = families(text)["espline_worker_batch_size"]
    assert fam.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in fam.samples
               if s.name == "espline_worker_batch_size_bucket" and s.labels["worker"] == "0"}
    # sizes 1, 2, 3, 256, 256, 2000
    assert list(buckets) == [*(repr(b) for b in BATCH_SIZE_BOUNDS), "+Inf"]
    assert buckets["1.0"] == 1 and buckets["2.0"] == 2 and buckets["4.0"] == 3
    assert buckets["128.0"] == 3 and buckets["256.0"] == 5 and buckets["1024.0"] == 5
    assert buckets["+Inf"] == 6
    assert samples(text, "espline_worker_batch_size_count") == {L(worker="0"): 6}
    assert samples(text, "espline_worker_batch_size_sum") == {L(worker="0"): 2518}
    # The I/O process sent no histogram: no series for it.
    assert all(s.labels["worker"] == "0" for s in fam.samples)


@pytest.mark.parametrize(("size", "bucket"), [(0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (5, 3),
                                              (256, 8), (257, 9), (1024, 10), (1025, 11)])
def test_batch_size_bucket(size: int, bucket: int) -> None:
    assert batch_size_bucket(size) == bucket
    assert batch_size_histogram([size]).counts == Histogram.of(BATCH_SIZE_BOUNDS, [size]).counts


def test_label_values_are_escaped() -> None:
    nasty = 'a "quoted"\\back\\slash\nnew line'
    snap = MetricsSnapshot(child_sas=(ChildSaCounters(nasty, "c}h,i=ld", "in", 256, 1, 1),))
    text = render(snap)
    assert 'ike="a \\"quoted\\"\\\\back\\\\slash\\nnew line"' in text
    # One line per series: the newline in the value did not break it.
    assert sum(1 for line in text.splitlines() if line.startswith("espline_child_sa_bytes")) == 1
    [(labels, value)] = samples(text, "espline_child_sa_bytes_total").items()
    assert dict(labels) == {"ike": nasty, "child": "c}h,i=ld", "direction": "in",
                            "spi": "0x00000100"}
    assert value == 1
    assert escape_label_value("\\\"\n") == '\\\\\\"\\n'


def test_help_text_is_escaped() -> None:
    spec = FamilySpec("x_total", MetricType.COUNTER, "back\\slash\nand newline")
    reg = Registry([spec])
    reg.add(spec, 1)
    text = reg.render()
    assert text.startswith("# HELP x_total back\\\\slash\\nand newline\n# TYPE x_total counter\n")
    assert families(text)["x"].documentation == "back\\slash\nand newline"


def test_exposition_shape() -> None:
    text = render(snapshot())
    assert text.endswith("\n") and "\n\n" not in text
    lines = text.splitlines()
    # HELP then TYPE, once per family, before its samples.
    for spec in FAMILIES:
        i = lines.index(f"# HELP {spec.name} {spec.help}")
        assert lines[i + 1] == f"# TYPE {spec.name} {spec.type.value}"
    assert "espline_worker_restarts_total 1" in lines


def test_registry_sums_repeated_series_and_rejects_misuse() -> None:
    c = FamilySpec("c_total", MetricType.COUNTER, "c", ("a",))
    g = FamilySpec("g", MetricType.GAUGE, "g")
    h = FamilySpec("h", MetricType.HISTOGRAM, "h", (), (1.0, 2.0))
    reg = Registry([c, g, h])
    reg.add(c, 2, {"a": "x"})
    reg.add(c, 3, {"a": "x"})
    reg.add(g, -1.5)
    reg.observe(h, Histogram.of((1.0, 2.0), [1, 2, 3]))
    reg.observe(h, Histogram.of((1.0, 2.0), [0.5]))
    text = reg.render()
    assert samples(text, "c_total") == {L(a="x"): 5}
    assert samples(text, "g") == {(): -1.5}
    assert samples(text, "h_bucket") == {L(le="1.0"): 2, L(le="2.0"): 3, L(le="+Inf"): 4}
    assert samples(text, "h_sum") == {(): 6.5}
    with pytest.raises(ValueError, match="labels"):
        reg.add(c, 1, {"b": "x"})
    with pytest.raises(ValueError, match="negative"):
        reg.add(c, -1, {"a": "x"})
    with pytest.raises(ValueError, match="histogram"):
        reg.add(h, 1)
    with pytest.raises(ValueError, match="bounds"):
        reg.observe(h, Histogram.of((1.0,), [1]))
    with pytest.raises(ValueError, match="not declared"):
        reg.add(FamilySpec("other_total", MetricType.COUNTER, "o"), 1)


@pytest.mark.parametrize("kwargs", [
    {"name": "x", "type": MetricType.COUNTER, "help": ""},  # counter without _total
    {"name": "x_total", "type": MetricType.GAUGE, "help": ""},  # _total on a gauge
    {"name": "1x", "type": MetricType.GAUGE, "help": ""},
    {"name": "x", "type": MetricType.GAUGE, "help": "", "labels": ("bad-label",)},
    {"name": "x", "type": MetricType.GAUGE, "help": "", "labels": ("__reserved",)},
    {"name": "x", "type": MetricType.GAUGE, "help": "", "labels": ("a", "a")},
    {"name": "x", "type": MetricType.HISTOGRAM, "help": "", "labels": ("le",), "buckets": (1.0,)},
    {"name": "x", "type": MetricType.HISTOGRAM, "help": "", "buckets": (2.0, 1.0)},
    {"name": "x", "type": MetricType.HISTOGRAM, "help": "", "buckets": ()},
    {"name": "x", "type": MetricType.GAUGE, "help": "", "buckets": (1.0,)},
])
def test_family_spec_rejects_invalid_declarations(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FamilySpec(**kwargs)


# -- counters across worker restarts ----------------------------------------------------------

def test_restarted_worker_never_makes_totals_go_down() -> None:
    merger = WorkerCountersMerger()
    seen: list[str] = []
    reports = [
        WorkerCounters(0, 10, 20, {"integrity": 1}, batch_size_histogram([4, 4])),
        WorkerCounters(0, 50, 60, {"integrity": 2}, batch_size_histogram([4, 4, 8])),
        # The worker died and came back: it counts from zero again.
        WorkerCounters(0, 3, 1, {}, batch_size_histogram([1])),
        WorkerCounters(0, 9, 4, {"replay": 5}, batch_size_histogram([1, 2])),
    ]
    for report in reports:
        merged = merger.update(report)
        seen.append(render(MetricsSnapshot(workers=[merged])))
    assert merger.restarts_seen == 1
    names = ("espline_worker_packets_total", "espline_dataplane_drops_total",
             "espline_worker_batch_size_bucket", "espline_worker_batch_size_sum",
             "espline_worker_batch_size_count")
    for earlier, later in zip(seen, seen[1:], strict=False):
        for name in names:
            before, after = samples(earlier, name), samples(later, name)
            for key, value in before.items():
                assert after[key] >= value, (name, key)
    last = seen[-1]
    assert samples(last, "espline_worker_packets_total")[L(worker="0", direction="in")] == 59
    drops = samples(last, "espline_dataplane_drops_total")
    assert drops[L(worker="0", reason="integrity")] == 2
    assert drops[L(worker="0", reason="replay")] == 5
    assert samples(last, "espline_worker_batch_size_count") == {L(worker="0"): 5}
    assert samples(last, "espline_worker_batch_size_sum") == {L(worker="0"): 19}


def test_held_packets_survive_an_io_process_restart_in_the_totals() -> None:
    merger = WorkerCountersMerger()
    for parked in (3, 7, 2):  # the I/O process restarted after 7: it counts from zero
        merged = merger.update(WorkerCounters("io", 0, 0, {}, parked=parked))
    assert merged.parked == 9
    text = render(MetricsSnapshot(workers=[merged]))
    assert samples(text, "espline_dataplane_parked_total") == {L(worker="io"): 9}


def test_epoch_change_is_a_restart_even_when_counters_grew() -> None:
    m = CounterMerger()
    assert m.update(1, {"p": 10}, epoch=100) == {"p": 10}
    # A new pid whose counters already passed the old ones: values alone cannot tell.
    assert m.update(1, {"p": 15}, epoch=200) == {"p": 25}
    assert m.update(1, {"p": 16}, epoch=200) == {"p": 26}
    assert m.update(1, {"p": 17}) == {"p": 27}  # no epoch given: not a change
    assert m.restarts_seen == 1


def test_sources_are_independent_and_missing_counters_keep_their_total() -> None:
    m = CounterMerger()
    m.update(0, {"a": 5, "b": 1})
    m.update(1, {"a": 100})
    assert m.update(0, {"a": 6}) == {"a": 6, "b": 1}
    assert m.update(0, {"a": 2}) == {"a": 8, "b": 1}  # restart: b's 1 stays in the base
    assert m.totals(1) == {"a": 100}
    m.forget(1)
    assert m.sources() == [0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 50), st.integers(0, 50)),
                min_size=1, max_size=40))
def test_merged_totals_are_monotonic_and_count_every_event(
        steps: list[tuple[bool, int, int]]) -> None:
    """A worker that restarts at random: the total is every increment it ever made."""
    m = CounterMerger()
    current = {"x": 0, "y": 0}
    made = {"x": 0, "y": 0}
    previous = {"x": 0.0, "y": 0.0}
    for restart, dx, dy in steps:
        if restart:
            current = {"x": 0, "y": 0}
            # A restart is only visible when a counter went down; an unchanged snapshot
            # after a restart with no traffic loses nothing either.
        current["x"] += dx
        current["y"] += dy
        made["x"] += dx
        made["y"] += dy
        totals = m.update("w", dict(current), epoch=None)
        assert all(totals[k] >= previous[k] for k in previous)
        previous = {k: float(v) for k, v in totals.items()}
    # Undetectable restarts (nothing decreased) may make totals lag behind what was made,
    # never run ahead of it; with an epoch they are exact (next test).
    assert all(previous[k] <= made[k] for k in made)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 50)), min_size=1, max_size=40))
def test_merged_totals_with_epochs_are_exact(steps: list[tuple[bool, int]]) -> None:
    m = CounterMerger()
    epoch, current, made = 0, 0, 0
    for restart, d in steps:
        if restart:
            epoch, current = epoch + 1, 0
        current += d
        made += d
        assert m.update("w", {"x": current}, epoch=epoch) == {"x": made}


# -- the data plane's stats ------------------------------------------------------------------

def test_from_dataplane_stats_reads_the_stats_snapshot_shape() -> None:
    inbound, outbound = Counters(), Counters()
    batch = Batch.for_packets([b"x" * 40] * 5)
    batch.meta["verdict"][:5] = [Verdict.PASS, Verdict.INTEGRITY, Verdict.REPLAY,
                                 Verdict.INTEGRITY, Verdict.PARKED]
    inbound.add(batch)
    batch.meta["verdict"][:5] = Verdict.PASS
    batch.meta["verdict"][0] = Verdict.NO_SA
    outbound.add(batch)
    # The shape of pipeline/dataplane.py Stats.snapshot (also written to stats.json).
    stats = {
        "outbound": outbound.snapshot(), "inbound": inbound.snapshot(),
        "mss_clamped": 0, "icmp_too_big": 0, "fragmented": 0,
        "lost_batches": 2, "lost_packets": 30, "worker_restarts": 1,
        "worker_pids": [101, 102], "inside_io": {}, "outside_io": {},
        "sas": [{"index": 0, "spi": "0x0a0b0c0d", "direction": "out", "packets": 4,
                 "bytes": 160, "seq_out": 4, "replay_top": 0},
                {"index": 1, "spi": "0x01020304", "direction": "in", "packets": 2,
                 "bytes": 80, "seq_out": 0, "replay_top": 2}],
    }
    dp = from_dataplane_stats(stats, {0x0A0B0C0D: ("site-b", "lan")})
    [io] = dp.workers
    assert io.worker == "io" and io.packets_in == 1 and io.packets_out == 4
    assert dict(io.drops) == {"integrity": 2, "replay": 1, "no_sa": 1}  # held: not a drop
    assert io.parked == 1
    assert dp.child_sas == (
        ChildSaCounters("site-b", "lan", "out", 0x0A0B0C0D, 160, 4),
        ChildSaCounters("static", "static", "in", 0x01020304, 80, 2),
    )
    assert (dp.worker_restarts, dp.lost_batches) == (1, 2)
    text = render(MetricsSnapshot(dp.child_sas, dp.workers,
                                  worker_restarts=dp.worker_restarts,
                                  lost_batches=dp.lost_batches))
    assert samples(text, "espline_dataplane_drops_total")[L(worker="io", reason="no_sa")] == 1
    assert samples(text, "espline_dataplane_parked_total") == {L(worker="io"): 1}


def test_from_dataplane_stats_tolerates_missing_and_odd_fields() -> None:
    dp = from_dataplane_stats({"inbound": "?", "sas": [{"spi": "zz"}, 3], "lost_batches": "x"})
    assert dp.child_sas == () and dp.lost_batches == 0
    assert dp.workers[0].packets_in == 0


# -- the HTTP endpoint -----------------------------------------------------------------------

@pytest.mark.parametrize(("listen", "want"), [
    ("127.0.0.1:9469", ("127.0.0.1", 9469)),
    ("[::1]:9469", ("::1", 9469)),
    (":9469", (None, 9469)),
    ("localhost:0", ("localhost", 0)),
])
def test_parse_listen(listen: str, want: tuple[str | None, int]) -> None:
    assert parse_listen(listen) == want


@pytest.mark.parametrize("listen", ["9469", "::1:9469", "[::1]", "host:99999", "host:x", "[]:1"])
def test_parse_listen_rejects(listen: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(listen)


class Source:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    def collect(self) -> MetricsSnapshot:
        self.calls += 1
        if self.fail:
            raise RuntimeError("broken source")
        return snapshot()


async def raw(port: int, data: bytes, host: str = "127.0.0.1", timeout: float = 5.0
              ) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: test\r\nAccept: */*\r\n\r\n".encode()


def serve(test: Callable[[MetricsServer, Source], Awaitable[None]], listen: str = "127.0.0.1:0",
          **kw: Any) -> None:
    async def main() -> None:
        source = Source()
        server = MetricsServer(listen, source, **kw)
        await server.start()
        try:
            await test(server, source)
        finally:
            await server.close()
    asyncio.run(main())


def test_get_metrics_with_urllib() -> None:
    async def test(server: MetricsServer, source: Source) -> None:
        url = f"http://127.0.0.1:{server.port}/metrics"

        def fetch() -> tuple[int, str, str]:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, resp.headers["Content-Type"], resp.read().decode()

        status, ctype, body = await asyncio.to_thread(fetch)
        assert status == 200 and ctype == CONTENT_TYPE
        assert body == render(snapshot())
        assert samples(body, "espline_lost_batches_total") == {(): 4}
        assert source.calls == 1 and server.scrapes == 1
    serve(test)


def test_head_index_404_405_400() -> None:
    async def test(server: MetricsServer, source: Source) -> None:
        p = server.port
        status, headers, body = await raw(p, get("/metrics"))
        assert status == 200 and headers["connection"] == "close"
        assert int(headers["content-length"]) == len(body)
        status, head_headers, head_body = await raw(p, get("/metrics", "HEAD"))
        assert status == 200 and head_body == b""
        assert head_headers["content-length"] == headers["content-length"]
        assert head_headers["content-type"] == CONTENT_TYPE
        status, headers, body = await raw(p, get("/metrics?name[]=x"))
        assert status == 200
        status, headers, body = await raw(p, get("/"))
        assert status == 200 and b'href="/metrics"' in body
        assert (await raw(p, get("/metricsx")))[0] == 404
        assert (await raw(p, get("/other/path")))[0] == 404
        status, headers, _ = await raw(p, get("/metrics", "POST"))
        assert status == 405 and headers["allow"] == "GET, HEAD"
        for bad in (b"GARBAGE\r\n\r\n", b"GET /metrics\r\n\r\n", b"GET  HTTP/1.1\r\n\r\n",
                    b"get /metrics HTTP/1.1\r\n\r\n", b"GET /metrics SPDY/3\r\n\r\n",
                    b"GET /\xff HTTP/1.1\r\n\r\n"):
            assert (await raw(p, bad))[0] == 400, bad
        # Bare LF line ends are tolerated (RFC 9112 §2.2).
        assert (await raw(p, b"GET /metrics HTTP/1.0\n\n"))[0] == 200
    serve(test)


def test_oversized_request_and_slow_client() -> None:
    async def test(server: MetricsServer, source: Source) -> None:
        p = server.port
        long_header = get("/metrics").replace(b"Accept", b"X-Long: " + b"a" * 5000 + b"\r\nAccept")
        assert (await raw(p, long_header))[0] == 431
        many_headers = b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 800 + b"\r\n"
        assert (await raw(p, many_headers))[0] == 431
        # A client that never finishes its request is answered 408 after read_timeout.
        loop = asyncio.get_running_loop()
        start = loop.time()
        status, _, _ = await raw(p, b"GET /metrics HTTP/1.1\r\n")
        assert status == 408 and loop.time() - start < 2
        # A client that connects and closes at once does not disturb the server.
        _, w = await asyncio.open_connection("127.0.0.1", p)
        w.close()
        assert (await raw(p, get("/metrics")))[0] == 200
    serve(test, read_timeout=0.3, max_request=4096)


def test_concurrent_scrapes() -> None:
    async def test(server: MetricsServer, source: Source) -> None:
        answers = await asyncio.gather(*(raw(server.port, get("/metrics")) for _ in range(40)))
        assert {a[0] for a in answers} == {200}
        assert len({a[2] for a in answers}) == 1
        assert source.calls == 40
        # A stalled client does not hold up the others.
        _, stalled = await asyncio.open_connection("127.0.0.1", server.port)
        answers = await asyncio.gather(*(raw(server.port, get("/metrics")) for _ in range(5)))
        assert {a[0] for a in answers} == {200}
        stalled.close()
    serve(test)


def test_connection_limit() -> None:
    async def test(server: MetricsServer, source: Source) -> None:
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert (await raw(server.port, get("/metrics")))[0] == 503
        for _, w in held:
            w.close()
        await asyncio.sleep(0.05)
        assert (await raw(server.port, get("/metrics")))[0] == 200
    serve(test, max_connections=2)


def test_failing_source_is_a_500_and_the_server_goes_on(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    async def test(server: MetricsServer, source: Source) -> None:
        source.fail = True
        assert (await raw(server.port, get("/metrics")))[0] == 500
        source.fail = False
        assert (await raw(server.port, get("/metrics")))[0] == 200
    serve(test)
    assert "metrics collection failed" in caplog.text


def test_close_with_a_connection_open_and_restart_on_the_same_port() -> None:
    async def main() -> None:
        server = MetricsServer("127.0.0.1:0", Source(), read_timeout=30)
        await server.start()
        port = server.port
        _, w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.05)
        await asyncio.wait_for(server.close(), 2)
        w.close()
        with pytest.raises(RuntimeError):
            _ = server.port
        async with MetricsServer(f"127.0.0.1:{port}", Source()) as again:
            assert (await raw(again.port, get("/metrics")))[0] == 200
    asyncio.run(main())


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_listen() -> None:
    async def test(server: MetricsServer, source: Source) -> None:
        assert server.sockets[0][0] == "::1"
        assert (await raw(server.port, get("/metrics"), host="::1"))[0] == 200
    serve(test, listen="[::1]:0")


def test_urllib_sees_404() -> None:
    async def test(server: MetricsServer, source: Source) -> None:
        def fetch() -> int:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{server.port}/x", timeout=5)
            except urllib.error.HTTPError as e:
                return e.code
            return 200
        assert await asyncio.to_thread(fetch) == 404
    serve(test)
