"""Prometheus metrics: espline's metric families declared once with their meaning, the text
exposition format 0.0.4 written by hand, counters kept monotonic across worker restarts, and
a small asyncio HTTP endpoint for ``GET /metrics`` (DESIGN §6, Observability).

The format (Prometheus "Exposition formats", text format 0.0.4): per family a ``# HELP`` line
(backslash and newline escaped) and a ``# TYPE`` line, then one line per series,
``name{label="value",...} value``, label values escaped (backslash, double quote, newline).
Counters carry the ``_total`` suffix; a histogram is cumulative ``_bucket{le="..."}`` series
ending with ``le="+Inf"``, then ``_sum`` and ``_count``.

The controller implements ``MetricsSource.collect()``, returning a ``MetricsSnapshot`` of plain
typed data (``WorkerCounters``, ``ChildSaCounters``, ``IkeCounters``); ``render()`` turns it into
the exposition. Worker counters restart from zero with their process: ``CounterMerger`` keeps
each worker's totals monotonic. No third-party dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from pipeline.batch import Verdict

__all__ = [
    "ALERT_TYPES",
    "ALERTS",
    "BATCH_SIZE_BOUNDS",
    "CHILD_SA_BYTES",
    "CHILD_SA_PACKETS",
    "CONTENT_TYPE",
    "DATAPLANE_DROPS",
    "DATAPLANE_PARKED",
    "DROP_REASONS",
    "FAMILIES",
    "IKE_EXCHANGES",
    "IKE_MESSAGES",
    "IKE_SAS",
    "IKE_SA_STATES",
    "LOST_BATCHES",
    "WORKER_BATCH_SIZE",
    "WORKER_PACKETS",
    "WORKER_RESTARTS",
    "ChildSaCounters",
    "CounterMerger",
    "DataplaneCounters",
    "FamilySpec",
    "Histogram",
    "IkeCounters",
    "MetricType",
    "MetricsServer",
    "MetricsSnapshot",
    "MetricsSource",
    "Registry",
    "WorkerCounters",
    "WorkerCountersMerger",
    "batch_size_bucket",
    "batch_size_histogram",
    "escape_help",
    "escape_label_value",
    "format_value",
    "from_dataplane_stats",
    "parse_listen",
    "render",
]

log = logging.getLogger("espline.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# -- the text format ----------------------------------------------------------------------

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


def escape_label_value(value: str) -> str:
    """A label value as the text format quotes it: ``\\`` -> ``\\\\``, ``"`` -> ``\\"``,
    newline -> ``\\n`` (nothing else is escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text: only backslash and newline are escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers exactly, floats as Go's ParseFloat reads them."""
    if isinstance(value, int):  # bool included: True -> 1
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _format_le(bound: float) -> str:
    # Bucket bounds in float form ("1.0", not "1"), the form Prometheus normalises ``le`` to,
    # so a series keeps one identity whichever format a server scrapes.
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class MetricType(Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class FamilySpec:
    """One metric family: its exposed name (counters end in ``_total``), type, meaning, label
    names and, for a histogram, its bucket upper bounds (``+Inf`` is implied)."""

    name: str
    type: MetricType
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not _METRIC_NAME.match(self.name):
            raise ValueError(f"metric name {self.name!r} is not a valid Prometheus name")
        if (self.type is MetricType.COUNTER) != self.name.endswith("_total"):
            raise ValueError(f"{self.name}: counters, and only counters, end in _total")
        for label in self.labels:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"{self.name}: invalid label name {label!r}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"{self.name}: duplicate label names")
        if self.type is MetricType.HISTOGRAM:
            if "le" in self.labels:
                raise ValueError(f"{self.name}: 'le' is reserved for histogram buckets")
            if not self.buckets or list(self.buckets) != sorted(set(self.buckets)):
                raise ValueError(f"{self.name}: buckets must be strictly increasing")
            if math.isinf(self.buckets[-1]):
                raise ValueError(f"{self.name}: +Inf is implied, do not list it")
        elif self.buckets:
            raise ValueError(f"{self.name}: only histograms have buckets")


@dataclass(frozen=True)
class Histogram:
    """Observations counted per bucket: ``counts[i]`` is the number of observations in
    ``(bounds[i-1], bounds[i]]``, and ``counts[-1]`` those above the last bound, so
    ``len(counts) == len(bounds) + 1``. Not cumulative: ``render`` accumulates."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float = 0

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError(
                f"histogram: {len(self.counts)} counts for {len(self.bounds)} bounds "
                "(expected one more, for +Inf)"
            )

    @property
    def count(self) -> int:
        return sum(self.counts)

    @classmethod
    def empty(cls, bounds: tuple[float, ...]) -> Histogram:
        return cls(bounds, (0,) * (len(bounds) + 1), 0)

    @classmethod
    def of(cls, bounds: tuple[float, ...], values: Iterable[float]) -> Histogram:
        counts = [0] * (len(bounds) + 1)
        total: float = 0
        for v in values:
            total += v
            for i, b in enumerate(bounds):
                if v <= b:
                    counts[i] += 1
                    break
            else:
                counts[-1] += 1
        return cls(bounds, tuple(counts), total)


# Batch sizes in powers of two up to the largest batch worth having (DESIGN §3: 256 default).
BATCH_SIZE_BOUNDS: tuple[float, ...] = tuple(float(1 << i) for i in range(11))  # 1 .. 1024


def batch_size_bucket(size: int) -> int:
    """The ``BATCH_SIZE_BOUNDS`` bucket of a batch of ``size`` packets: the smallest ``i``
    with ``size <= 2**i``, or 11 (``+Inf``) above 1024. A worker can count with this (or
    ``np.bincount`` of it) and send the 12 counts."""
    return min(max(size - 1, 0).bit_length(), len(BATCH_SIZE_BOUNDS))


def batch_size_histogram(sizes: Iterable[int]) -> Histogram:
    counts = [0] * (len(BATCH_SIZE_BOUNDS) + 1)
    total = 0
    for s in sizes:
        counts[batch_size_bucket(s)] += 1
        total += s
    return Histogram(BATCH_SIZE_BOUNDS, tuple(counts), total)


# -- the families espline exposes ---------------------------------------------------------

DROP_REASONS: tuple[str, ...] = tuple(v.label for v in Verdict if v.is_drop)
IKE_EXCHANGES: tuple[str, ...] = ("IKE_SA_INIT", "IKE_AUTH", "CREATE_CHILD_SA", "INFORMATIONAL")
# IKE SA states always exposed (at 0 when none); the controller may report others too.
IKE_SA_STATES: tuple[str, ...] = ("connecting", "established", "rekeying", "deleting")
ALERT_TYPES: tuple[str, ...] = (
    "parse_error",  # a message that does not parse (RFC 7296 §2.21.1 INVALID_SYNTAX)
    "auth_failed",  # AUTH payload or identity not accepted (AUTHENTICATION_FAILED)
    "proposal_mismatch",  # no proposal in common (NO_PROPOSAL_CHOSEN)
    "ts_unacceptable",  # traffic selectors not narrowed to something acceptable
    "retransmit_give_up",  # a request unanswered after all retransmissions (RFC 7296 §2.1)
    "invalid_spi",  # a message or Delete for an SPI we do not know (INVALID_SPI)
    "invalid_ke",  # INVALID_KE_PAYLOAD (a retry with another group follows)
)

CHILD_SA_BYTES = FamilySpec(
    "espline_child_sa_bytes_total", MetricType.COUNTER,
    "Bytes of the packets a Child SA protected (out) or accepted (in), as the data plane "
    "counts them against the SA's lifetime.",
    ("ike", "child", "direction", "spi"),
)
CHILD_SA_PACKETS = FamilySpec(
    "espline_child_sa_packets_total", MetricType.COUNTER,
    "Packets a Child SA protected (out) or accepted (in).",
    ("ike", "child", "direction", "spi"),
)
IKE_SAS = FamilySpec(
    "espline_ike_sas", MetricType.GAUGE,
    "IKE SAs by state (established, connecting, deleting, ...).",
    ("state",),
)
DATAPLANE_DROPS = FamilySpec(
    "espline_dataplane_drops_total", MetricType.COUNTER,
    "Packets dropped by the data plane, by process (worker index, or io for the I/O "
    "process: dispatcher and reassembler) and reason (xfrm_stat / VPP vocabulary).",
    ("worker", "reason"),
)
DATAPLANE_PARKED = FamilySpec(
    "espline_dataplane_parked_total", MetricType.COUNTER,
    "Inbound ESP packets held for a moment because their SPI was not known yet (an SA "
    "install on its way from the controller), each time one was held; not drops.",
    ("worker",),
)
WORKER_PACKETS = FamilySpec(
    "espline_worker_packets_total", MetricType.COUNTER,
    "Packets processed successfully, by worker and direction (in: decapsulated, "
    "out: encapsulated).",
    ("worker", "direction"),
)
WORKER_BATCH_SIZE = FamilySpec(
    "espline_worker_batch_size", MetricType.HISTOGRAM,
    "Packets per batch, by worker.",
    ("worker",),
    BATCH_SIZE_BOUNDS,
)
IKE_MESSAGES = FamilySpec(
    "espline_ike_messages_total", MetricType.COUNTER,
    "IKE messages by exchange type and direction (retransmissions included).",
    ("exchange", "direction"),
)
ALERTS = FamilySpec(
    "espline_alerts_total", MetricType.COUNTER,
    "Alerts: IKE events an operator should notice (parse_error, auth_failed, "
    "proposal_mismatch, retransmit_give_up, invalid_spi, ...).",
    ("type",),
)
WORKER_RESTARTS = FamilySpec(
    "espline_worker_restarts_total", MetricType.COUNTER,
    "Worker processes restarted by the supervisor after they died.",
)
LOST_BATCHES = FamilySpec(
    "espline_lost_batches_total", MetricType.COUNTER,
    "Batches lost with a dead worker and skipped by the reassembler.",
)

FAMILIES: tuple[FamilySpec, ...] = (
    CHILD_SA_BYTES, CHILD_SA_PACKETS, IKE_SAS, DATAPLANE_DROPS, DATAPLANE_PARKED,
    WORKER_PACKETS, WORKER_BATCH_SIZE, IKE_MESSAGES, ALERTS, WORKER_RESTARTS, LOST_BATCHES,
)


# -- the registry: one exposition being built ---------------------------------------------

LabelValues = tuple[str, ...]


class Registry:
    """The families of one exposition and their series. Families render in the order they
    were declared (a declared family with no series still gets its HELP and TYPE); series
    in the order they were first added. Adding a series again adds to its value."""

    def __init__(self, families: Iterable[FamilySpec] = FAMILIES) -> None:
        self._specs: dict[str, FamilySpec] = {}
        self._series: dict[str, dict[LabelValues, float]] = {}
        self._histograms: dict[str, dict[LabelValues, Histogram]] = {}
        for spec in families:
            self.declare(spec)

    def declare(self, spec: FamilySpec) -> None:
        known = self._specs.get(spec.name)
        if known is not None and known != spec:
            raise ValueError(f"{spec.name} declared twice with different definitions")
        self._specs[spec.name] = spec
        self._series.setdefault(spec.name, {})
        self._histograms.setdefault(spec.name, {})

    def _key(self, spec: FamilySpec, labels: Mapping[str, object]) -> LabelValues:
        if self._specs.get(spec.name) != spec:
            raise ValueError(f"{spec.name} is not declared in this registry")
        if set(labels) != set(spec.labels):
            raise ValueError(f"{spec.name}: labels {sorted(labels)}, expected {list(spec.labels)}")
        return tuple(str(labels[name]) for name in spec.labels)

    def add(self, spec: FamilySpec, value: float, labels: Mapping[str, object] | None = None
            ) -> None:
        """Add ``value`` to a counter or gauge series."""
        if spec.type is MetricType.HISTOGRAM:
            raise ValueError(f"{spec.name} is a histogram: use observe()")
        if spec.type is MetricType.COUNTER and value < 0:
            raise ValueError(f"{spec.name}: a counter cannot be negative ({value})")
        key = self._key(spec, labels or {})
        series = self._series[spec.name]
        series[key] = series.get(key, 0) + value

    def observe(self, spec: FamilySpec, histogram: Histogram,
                labels: Mapping[str, object] | None = None) -> None:
        """Add a histogram's counts and sum to a histogram series."""
        if spec.type is not MetricType.HISTOGRAM:
            raise ValueError(f"{spec.name} is not a histogram")
        if tuple(histogram.bounds) != spec.buckets:
            raise ValueError(f"{spec.name}: histogram bounds differ from the family's buckets")
        key = self._key(spec, labels or {})
        series = self._histograms[spec.name]
        old = series.get(key)
        if old is not None:
            histogram = Histogram(spec.buckets,
                                  tuple(a + b for a, b in zip(old.counts, histogram.counts,
                                                              strict=True)),
                                  old.sum + histogram.sum)
        series[key] = histogram

    def render(self) -> str:
        out: list[str] = []
        for name, spec in self._specs.items():
            out.append(f"# HELP {name} {escape_help(spec.help)}\n")
            out.append(f"# TYPE {name} {spec.type.value}\n")
            if spec.type is MetricType.HISTOGRAM:
                for key, h in self._histograms[name].items():
                    pairs = _label_pairs(spec.labels, key)
                    sep = "," if pairs else ""
                    cumulative = 0
                    for bound, c in zip((*spec.buckets, math.inf), h.counts, strict=True):
                        cumulative += c
                        out.append(f'{name}_bucket{{{pairs}{sep}le="{_format_le(bound)}"}} '
                                   f"{cumulative}\n")
                    braces = f"{{{pairs}}}" if pairs else ""
                    out.append(f"{name}_sum{braces} {format_value(h.sum)}\n")
                    out.append(f"{name}_count{braces} {cumulative}\n")
            else:
                for key, value in self._series[name].items():
                    pairs = _label_pairs(spec.labels, key)
                    braces = f"{{{pairs}}}" if pairs else ""
                    out.append(f"{name}{braces} {format_value(value)}\n")
        return "".join(out)


def _label_pairs(names: tuple[str, ...], values: LabelValues) -> str:
    return ",".join(f'{n}="{escape_label_value(v)}"' for n, v in zip(names, values, strict=True))


# -- what the controller hands over -------------------------------------------------------

@dataclass(frozen=True)
class ChildSaCounters:
    """One Child SA in one direction (each direction is its own SA, with its own SPI)."""

    ike: str  # IKE SA (connection) name
    child: str  # Child SA name
    direction: str  # "in" | "out"
    spi: int
    bytes: int
    packets: int


@dataclass(frozen=True)
class WorkerCounters:
    """One data plane process: a worker by index, or ``"io"`` for the I/O process.
    ``drops`` maps ``Verdict`` labels (``integrity``, ``replay``, ...) to counts;
    ``batch_sizes`` is a histogram over ``BATCH_SIZE_BOUNDS`` when the process counts it."""

    worker: int | str
    packets_in: int = 0
    packets_out: int = 0
    drops: Mapping[str, int] = field(default_factory=dict)
    batch_sizes: Histogram | None = None
    parked: int = 0  # inbound packets held for an SA install on its way (not drops)


@dataclass(frozen=True)
class IkeCounters:
    """The IKE side: SAs by state (a gauge), messages by exchange type name per direction,
    and alerts by type (``ALERT_TYPES`` and any other)."""

    sas_by_state: Mapping[str, int] = field(default_factory=dict)
    messages_in: Mapping[str, int] = field(default_factory=dict)
    messages_out: Mapping[str, int] = field(default_factory=dict)
    alerts: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsSnapshot:
    child_sas: Sequence[ChildSaCounters] = ()
    workers: Sequence[WorkerCounters] = ()
    ike: IkeCounters = field(default_factory=IkeCounters)
    worker_restarts: int = 0
    lost_batches: int = 0


class MetricsSource(Protocol):
    """What the metrics endpoint scrapes: the controller implements ``collect``. It runs on
    the event loop, so it must only copy what the controller already holds."""

    def collect(self) -> MetricsSnapshot: ...


def render(snapshot: MetricsSnapshot) -> str:
    """The exposition (text format 0.0.4) of a snapshot.

    Known label values (every drop reason per process, every exchange type both ways, the
    known alert types, the main IKE SA states) are exposed at zero before they first happen,
    so that ``rate()`` and ``increase()`` see the first event and sums are never empty.
    """
    reg = Registry()
    for sa in snapshot.child_sas:
        labels = {"ike": sa.ike, "child": sa.child, "direction": sa.direction,
                  "spi": f"{sa.spi:#010x}"}
        reg.add(CHILD_SA_BYTES, sa.bytes, labels)
        reg.add(CHILD_SA_PACKETS, sa.packets, labels)
    states = snapshot.ike.sas_by_state
    for state in (*IKE_SA_STATES, *(s for s in states if s not in IKE_SA_STATES)):
        reg.add(IKE_SAS, states.get(state, 0), {"state": state})
    for w in snapshot.workers:
        worker = str(w.worker)
        for reason in (*DROP_REASONS, *(r for r in w.drops if r not in DROP_REASONS)):
            reg.add(DATAPLANE_DROPS, w.drops.get(reason, 0), {"worker": worker, "reason": reason})
        if w.parked or worker == "io":  # only the I/O process holds packets
            reg.add(DATAPLANE_PARKED, w.parked, {"worker": worker})
        reg.add(WORKER_PACKETS, w.packets_in, {"worker": worker, "direction": "in"})
        reg.add(WORKER_PACKETS, w.packets_out, {"worker": worker, "direction": "out"})
        if w.batch_sizes is not None:
            reg.observe(WORKER_BATCH_SIZE, w.batch_sizes, {"worker": worker})
    for direction, messages in (("in", snapshot.ike.messages_in),
                                ("out", snapshot.ike.messages_out)):
        for exchange in (*IKE_EXCHANGES, *(e for e in messages if e not in IKE_EXCHANGES)):
            reg.add(IKE_MESSAGES, messages.get(exchange, 0),
                    {"exchange": exchange, "direction": direction})
    alerts = snapshot.ike.alerts
    for kind in (*ALERT_TYPES, *(a for a in alerts if a not in ALERT_TYPES)):
        reg.add(ALERTS, alerts.get(kind, 0), {"type": kind})
    reg.add(WORKER_RESTARTS, snapshot.worker_restarts)
    reg.add(LOST_BATCHES, snapshot.lost_batches)
    return reg.render()


# -- monotonic counters across restarts ---------------------------------------------------

class CounterMerger:
    """Totals that never go down, from counter snapshots of sources that restart from zero.

    Per source (a worker index), the last snapshot and a base are kept; the total is base +
    current. A restart is seen when any counter of the source is smaller than in its previous
    snapshot, or when the source's ``epoch`` (its pid, its start time) changes: the previous
    values then join the base. A counter absent from a snapshot keeps its previous total.
    """

    def __init__(self) -> None:
        self._last: dict[Hashable, dict[Hashable, float]] = {}
        self._base: dict[Hashable, dict[Hashable, float]] = {}
        self._epoch: dict[Hashable, Hashable] = {}
        self.restarts_seen = 0

    def update(self, source: Hashable, counters: Mapping[Any, float],
               epoch: Hashable | None = None) -> dict[Any, float]:
        """Take a snapshot of ``source``; returns its monotonic totals."""
        last = self._last.get(source)
        base = self._base.setdefault(source, {})
        if last is not None:
            restarted = (epoch is not None and self._epoch.get(source) not in (None, epoch)) \
                or any(v < last.get(k, 0) for k, v in counters.items())
            if restarted:
                self.restarts_seen += 1
                for k, v in last.items():
                    base[k] = base.get(k, 0) + v
                last = {}
        current = dict(last or {})
        current.update(counters)
        self._last[source] = current
        if epoch is not None:
            self._epoch[source] = epoch
        return self.totals(source)

    def totals(self, source: Hashable) -> dict[Any, float]:
        last = self._last.get(source, {})
        base = self._base.get(source, {})
        return {k: base.get(k, 0) + last.get(k, 0) for k in (*base, *(k for k in last
                                                                      if k not in base))}

    def sources(self) -> list[Hashable]:
        return list(self._last)

    def forget(self, source: Hashable) -> None:
        """Drop a source for good (a Child SA deleted); its series leave the exposition."""
        self._last.pop(source, None)
        self._base.pop(source, None)
        self._epoch.pop(source, None)


class WorkerCountersMerger:
    """``CounterMerger`` for ``WorkerCounters``: feed each snapshot a process reports, get
    back the monotonic counters to expose (histogram buckets and sum included)."""

    def __init__(self) -> None:
        self._merger = CounterMerger()
        self._workers: dict[int | str, None] = {}
        self._bounds: dict[int | str, tuple[float, ...]] = {}

    @property
    def restarts_seen(self) -> int:
        return self._merger.restarts_seen

    def update(self, counters: WorkerCounters, epoch: Hashable | None = None) -> WorkerCounters:
        flat: dict[tuple[str, object], float] = {
            ("in", None): counters.packets_in, ("out", None): counters.packets_out,
        }
        for reason, n in counters.drops.items():
            flat["drop", reason] = n
        flat["parked", None] = counters.parked
        if counters.batch_sizes is not None:
            self._bounds[counters.worker] = counters.batch_sizes.bounds
            for i, n in enumerate(counters.batch_sizes.counts):
                flat["bucket", i] = n
            flat["sum", None] = counters.batch_sizes.sum
        self._workers[counters.worker] = None
        totals = self._merger.update(counters.worker, flat, epoch)
        return self._unflatten(counters.worker, totals)

    def totals(self) -> list[WorkerCounters]:
        """Every process seen so far, with its monotonic totals."""
        return [self._unflatten(w, self._merger.totals(w)) for w in self._workers]

    def _unflatten(self, worker: int | str, totals: Mapping[Any, float]) -> WorkerCounters:
        drops = {reason: int(n) for (kind, reason), n in totals.items() if kind == "drop"}
        batch_sizes = None
        bounds = self._bounds.get(worker)
        if bounds is not None:
            counts = tuple(int(totals.get(("bucket", i), 0)) for i in range(len(bounds) + 1))
            batch_sizes = Histogram(bounds, counts, totals.get(("sum", None), 0))
        return WorkerCounters(worker, int(totals.get(("in", None), 0)),
                              int(totals.get(("out", None), 0)), drops, batch_sizes,
                              int(totals.get(("parked", None), 0)))


# -- the data plane's stats.json ----------------------------------------------------------

@dataclass(frozen=True)
class DataplaneCounters:
    workers: tuple[WorkerCounters, ...]
    child_sas: tuple[ChildSaCounters, ...]
    worker_restarts: int
    lost_batches: int


def from_dataplane_stats(stats: Mapping[str, Any],
                         sa_names: Mapping[int, tuple[str, str]] | None = None
                         ) -> DataplaneCounters:
    """The counters in the data plane's ``Stats.snapshot`` dict (also ``stats.json``).

    Its inbound/outbound verdict counters are counted by the I/O process when batches come
    back from the workers, so they become the ``worker="io"`` process. ``sa_names`` maps an
    SPI to its (IKE SA, Child SA) names; SAs it does not name are shown as ``static``.
    Fields that are missing or of the wrong type count as zero.
    """
    names = sa_names or {}

    def num(value: object) -> int:
        return int(value) if isinstance(value, int | float) and not isinstance(value, bool) \
            else 0

    def direction(key: str) -> Mapping[str, Any]:
        d = stats.get(key)
        return d if isinstance(d, Mapping) else {}

    inbound, outbound = direction("inbound"), direction("outbound")
    drops: dict[str, int] = {}
    for d in (inbound, outbound):
        by_reason = d.get("drops")
        if isinstance(by_reason, Mapping):
            for reason, n in by_reason.items():
                drops[str(reason)] = drops.get(str(reason), 0) + num(n)
    io = WorkerCounters("io", num(inbound.get("passed")), num(outbound.get("passed")), drops,
                        parked=num(inbound.get("parked")))
    sas: list[ChildSaCounters] = []
    raw_sas = stats.get("sas")
    for sa in raw_sas if isinstance(raw_sas, list) else []:
        if not isinstance(sa, Mapping):
            continue
        try:
            spi = int(str(sa.get("spi")), 0)
        except ValueError:
            continue
        ike, child = names.get(spi, ("static", "static"))
        sas.append(ChildSaCounters(ike, child, str(sa.get("direction", "")), spi,
                                   num(sa.get("bytes")), num(sa.get("packets"))))
    return DataplaneCounters((io,), tuple(sas), num(stats.get("worker_restarts")),
                             num(stats.get("lost_batches")))


# -- the HTTP endpoint --------------------------------------------------------------------

def parse_listen(listen: str) -> tuple[str | None, int]:
    """``"host:port"``, ``"[v6]:port"``, ``":port"`` (every address) -> (host, port)."""
    text = listen.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or not host:
            raise ValueError(f"listen {listen!r}: expected [address]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"listen {listen!r}: expected host:port or [ipv6]:port")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen {listen!r}: port must be 0..65535")
    return (host or None), int(port)


_INDEX = (
    "<html><head><title>espline</title></head><body><h1>espline</h1>"
    '<p><a href="/metrics">Metrics</a></p></body></html>\n'
)
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


class MetricsServer:
    """``GET /metrics`` over plain asyncio streams, one request per connection.

    Requests are bounded in size (``max_request`` bytes of head) and time (``read_timeout``
    for the head, the same for writing the answer); at most ``max_connections`` are served at
    once, more are turned away with 503. ``GET``/``HEAD`` on ``/metrics`` and ``/``; other
    paths 404, other methods 405, anything malformed 400.
    """

    def __init__(self, listen: str, source: MetricsSource, *, read_timeout: float = 5.0,
                 max_request: int = 8192, max_connections: int = 64) -> None:
        self.host, self._port = parse_listen(listen)
        self.source = source
        self.read_timeout = read_timeout
        self.max_request = max_request
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.scrapes = 0

    async def start(self) -> None:
        # The stream limit bounds every readline, so one long line cannot buffer more.
        self._server = await asyncio.start_server(
            self._handle, self.host, self._port, limit=self.max_request, reuse_address=True)

    @property
    def sockets(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    @property
    def port(self) -> int:
        """The bound port (the chosen one when started on port 0)."""
        socks = self.sockets
        if not socks:
            raise RuntimeError("the metrics server is not started")
        return int(socks[0][1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            if self._handlers:
                await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            if len(self._handlers) > self.max_connections:
                await self._answer(writer, 503, b"too many connections\n", "GET")
                return
            try:
                status, method, path = await asyncio.wait_for(self._read_head(reader),
                                                              self.read_timeout)
            except TimeoutError:
                await self._answer(writer, 408, b"request timeout\n", "GET")
                return
            except (asyncio.LimitOverrunError, ValueError):
                # StreamReader raises ValueError when a line exceeds its limit.
                await self._answer(writer, 431, b"request too large\n", "GET")
                await self._linger(reader, writer)
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if status != 200:
                await self._answer(writer, status, b"bad request\n", "GET")
                await self._linger(reader, writer)
                return
            await self._route(writer, method, path)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After an error answer to a request not read to its end: half-close, then read
        (and drop) what the client still sends, briefly. Closing with unread data would
        reset the connection and could destroy the answer before the client reads it."""
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError, ValueError,
                                 asyncio.LimitOverrunError):
            async with asyncio.timeout(min(self.read_timeout, 1.0)):
                for _ in range(16):
                    if not await reader.read(self.max_request):
                        break

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[int, str, str]:
        """The request line and headers (read and discarded) up to the empty line."""
        total = 0
        request_line = b""
        while True:
            line = await reader.readline()
            total += len(line)
            if total > self.max_request:
                raise asyncio.LimitOverrunError("request head too large", total)
            if not line.endswith(b"\n"):
                raise asyncio.IncompleteReadError(line, None)
            if not request_line:
                if line in (b"\r\n", b"\n"):
                    continue  # RFC 9112 §2.2: ignore empty lines before the request line
                request_line = line
                continue
            if line in (b"\r\n", b"\n"):
                break
        parts = request_line.rstrip(b"\r\n").split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1]:
            return 400, "", ""
        try:
            method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
        except UnicodeDecodeError:
            return 400, "", ""
        if not method.isalpha() or not method.isupper():
            return 400, "", ""
        return 200, method, target

    async def _route(self, writer: asyncio.StreamWriter, method: str, target: str) -> None:
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            await self._answer(writer, 405, b"method not allowed\n", method,
                               extra=("Allow: GET, HEAD",))
            return
        if path == "/metrics":
            try:
                body = render(self.source.collect()).encode()
            except Exception:
                log.exception("metrics collection failed")
                await self._answer(writer, 500, b"metrics collection failed\n", method)
                return
            self.scrapes += 1
            await self._answer(writer, 200, body, method, CONTENT_TYPE)
        elif path == "/":
            await self._answer(writer, 200, _INDEX.encode(), method, "text/html; charset=utf-8")
        else:
            await self._answer(writer, 404, b"not found\n", method)

    async def _answer(self, writer: asyncio.StreamWriter, status: int, body: bytes,
                      method: str, content_type: str = "text/plain; charset=utf-8",
                      extra: Sequence[str] = ()) -> None:
        head = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}", "Connection: close", *extra]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("ascii"))
        if method != "HEAD":
            writer.write(body)
        await asyncio.wait_for(writer.drain(), self.read_timeout)
