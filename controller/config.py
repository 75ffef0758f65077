"""espline's YAML configuration, loaded into frozen, typed dataclasses (DESIGN.md §6).

Validated here: ``controller``, ``dataplane`` and ``static_sas`` (manual keying, like
``ip xfrm state``). ``connections``, ``secrets``, ``pools`` and ``authorities`` follow
strongSwan's swanctl.conf; controller/connections.py validates them (and reads the certificate
and key files they name).

Every problem is one ``ConfigError`` naming the key path and the reason, e.g.
``static_sas[0].out.key: 19 bytes given, aes128gcm16 needs 20 (16-byte key + 4-byte salt)``;
``load_config`` adds the file and line. Key material never appears in a message or a repr.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, NoReturn, cast

import yaml  # type: ignore[import-untyped, unused-ignore]

from pipeline.cpus import spread
from pipeline.satable import (
    MAX_REPLAY_WINDOW,
    MIN_REPLAY_WINDOW,
    Direction,
    Mode,
    Protocol,
    SaRecord,
    SaRecordError,
    UdpEncap,
)
from workers.algorithms import AlgorithmError, parse_ah, parse_esp

__all__ = [
    "BatchConfig",
    "Config",
    "ConfigError",
    "ControllerConfig",
    "DataplaneConfig",
    "EndpointsConfig",
    "InsideConfig",
    "OutsideConfig",
    "StaticSa",
    "StaticSaDirection",
    "load_config",
    "parse_config",
    "parse_config_text",
]

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
InsideMode = Literal["tun", "af_packet"]
OutsideMode = Literal["af_packet", "socket"]
LogFormat = Literal["text", "json"]
LOG_LEVELS = ("debug", "info", "warning", "error")
MssClamp = int | Literal["auto"] | None  # "auto": path MTU minus overhead; None: no clamping

DEFAULT_RUNTIME_DIR = "/run/espline"
DEFAULT_VICI_SOCKET = f"{DEFAULT_RUNTIME_DIR}/vici.sock"
DEFAULT_TUN_NAME = "espl0"
DEFAULT_REPLAY_WINDOW = 64  # RFC 4303 §3.4.3: "a default window size of 64"
DEFAULT_NATT_PORT = 4500  # RFC 3948 §2: ESP in UDP on the IKE NAT-T port
MAX_BATCH_PACKETS = 4096
MAX_BATCH_WAIT_US = 1_000_000
MAX_WORKERS = 1024
MIN_MTU = 576  # RFC 791: every IPv4 host must accept 576-byte datagrams
MIN_MTU_IPV6 = 1280  # RFC 8200 §5
MAX_MTU = 65535  # the IPv4 total length field
MIN_MSS = 88  # Linux TCP_MIN_MSS
MAX_MSS = 65535 - 40  # largest IPv4 datagram minus 20-byte IPv4 and 20-byte TCP headers
MAX_TFC_PAD = 9000  # pipeline/satable.py's limit
MIN_SPI = 0x100  # RFC 4303 §2.1: SPIs 1-255 are reserved by IANA, 0 is local-only
MAX_SPI = 0xFFFFFFFF
MAX_IFNAME = 15  # Linux IFNAMSIZ (16) minus the terminating NUL
MAX_UNIX_PATH = 107  # sizeof(sockaddr_un.sun_path) (108) minus the terminating NUL
MAX_NAME = 64


# --- errors -----------------------------------------------------------------------------------

_Keys = tuple[str | int, ...]  # a key path: mapping keys and list indexes


class ConfigError(ValueError):
    """A configuration that cannot be used: ``path`` names the key, ``reason`` says why.

    ``source`` is the file (or ``"<string>"``) and ``line`` the 1-based line, where known.
    """

    def __init__(
        self, path: str, reason: str, *, source: str | None = None, line: int | None = None
    ) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason
        self.source = source
        self.line = line
        self.keys: _Keys = ()

    def __str__(self) -> str:
        where = self.source or ""
        if self.line is not None:
            where = f"{where}:{self.line}"
        parts = [p for p in (where, self.path, self.reason) if p]
        return ": ".join(parts)


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _format_path(keys: _Keys) -> str:
    out = ""
    for key in keys:
        if isinstance(key, int):
            out += f"[{key}]"
        elif _IDENT.fullmatch(key):
            out += f".{key}" if out else key
        else:
            out += f"[{key!r}]"
    return out


def _fail(keys: _Keys, reason: str) -> NoReturn:
    err = ConfigError(_format_path(keys), reason)
    err.keys = keys
    raise err


def _kind(value: object) -> str:
    """The YAML type of a value, for messages: never the value itself (it may be a key)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _unknown_key(key: str, known: Iterable[str]) -> str:
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return f"unknown key (known: {', '.join(known)})"


# --- typed reading of one mapping ---------------------------------------------------------------

_MISSING: Any = object()


class _Section:
    """One mapping of the YAML document, read key by key; unknown keys are errors."""

    def __init__(self, value: object, keys: _Keys, known: Sequence[str]) -> None:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            _fail(keys, f"expected a mapping, got {_kind(value)}")
        for key in value:
            if not isinstance(key, str):
                _fail((*keys, str(key)), f"keys must be strings, got {_kind(key)}")
            if key not in known:
                _fail((*keys, key), _unknown_key(key, known))
        self.data: dict[str, object] = value
        self.keys = keys

    def at(self, name: str) -> _Keys:
        return (*self.keys, name)

    def has(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str, default: Any = _MISSING) -> Any:
        value = self.data.get(name, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                _fail(self.at(name), "required")
            return default
        return value

    def get_int(self, name: str, default: Any, lo: int, hi: int) -> int:
        return _int(self.get(name, default), self.at(name), lo, hi)

    def get_bool(self, name: str, default: Any) -> bool:
        return _bool(self.get(name, default), self.at(name))

    def get_str(self, name: str, default: Any = _MISSING) -> str:
        return _str(self.get(name, default), self.at(name))

    def get_choice(self, name: str, default: Any, choices: Sequence[str]) -> str:
        return _choice(self.get(name, default), self.at(name), choices)


def _int(value: object, keys: _Keys, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(keys, f"expected an integer, got {_kind(value)}")
    if not lo <= value <= hi:
        _fail(keys, f"{value} is outside {lo}..{hi}")
    return value


def _bool(value: object, keys: _Keys) -> bool:
    if not isinstance(value, bool):
        _fail(keys, f"expected true or false, got {_kind(value)}")
    return value


def _str(value: object, keys: _Keys) -> str:
    if not isinstance(value, str):
        _fail(keys, f"expected a string, got {_kind(value)}")
    if not value:
        _fail(keys, "empty")
    return value


def _choice(value: object, keys: _Keys, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        _fail(keys, f"expected one of {', '.join(choices)}, got {_kind(value)}")
    if value not in choices:
        _fail(keys, f"{value!r} is not one of {', '.join(choices)}")
    return value


def _ifname(value: object, keys: _Keys) -> str:
    name = _str(value, keys)
    # Linux dev_valid_name(): at most IFNAMSIZ - 1 bytes, no '/', ':' or whitespace.
    if (
        len(name.encode()) > MAX_IFNAME
        or name in (".", "..")
        or any(c in "/:" or c.isspace() for c in name)
    ):
        _fail(
            keys,
            f"{name!r} is not a Linux interface name (at most {MAX_IFNAME} bytes, "
            "no '/', ':' or spaces)",
        )
    return name


def _unix_path(value: object, keys: _Keys) -> str:
    path = _str(value, keys)
    if len(path.encode()) > MAX_UNIX_PATH:
        _fail(keys, f"{len(path.encode())} bytes long; Unix socket paths allow {MAX_UNIX_PATH}")
    return path


# --- controller -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControllerConfig:
    vici_socket: str = DEFAULT_VICI_SOCKET
    metrics_listen: str | None = None  # "host:port" for the Prometheus endpoint
    keylog_dir: str | None = None  # opt-in Wireshark key logs (DESIGN.md §6)
    log_format: LogFormat = "text"
    # "info": a line per IKE SA and Child SA event; "warning" keeps only what needs a look
    # (a busy concentrator saves the lines and their CPU).
    log_level: str = "info"
    # A second YAML file with a ``secrets`` section (a Kubernetes Secret mounted apart
    # from the ConfigMap); its shared keys are added to those of the main file.
    secrets_file: str | None = None
    ike_port: int = 500
    natt_port: int = DEFAULT_NATT_PORT
    # RFC 7296 §2.6: COOKIE challenges once this many IKE SAs are half-open (0: never).
    cookie_threshold: int = 10


_CONTROLLER_KEYS = ("vici_socket", "metrics_listen", "keylog_dir", "log_format", "log_level",
                    "secrets_file", "ike_port", "natt_port", "cookie_threshold")


def _parse_controller(value: object) -> ControllerConfig:
    s = _Section(value, ("controller",), _CONTROLLER_KEYS)
    metrics = s.get("metrics_listen", None)
    if metrics is not None:
        metrics = _listen(metrics, s.at("metrics_listen"))
    keylog = s.get("keylog_dir", None)
    return ControllerConfig(
        vici_socket=_unix_path(s.get("vici_socket", DEFAULT_VICI_SOCKET), s.at("vici_socket")),
        metrics_listen=metrics,
        keylog_dir=None if keylog is None else _str(keylog, s.at("keylog_dir")),
        log_format=cast(LogFormat, s.get_choice("log_format", "text", ("text", "json"))),
        log_level=s.get_choice("log_level", "info", LOG_LEVELS),
        secrets_file=None if s.get("secrets_file", None) is None
        else _str(s.get("secrets_file"), s.at("secrets_file")),
        ike_port=s.get_int("ike_port", 500, 1, 65535),
        natt_port=s.get_int("natt_port", DEFAULT_NATT_PORT, 1, 65535),
        cookie_threshold=s.get_int("cookie_threshold", 10, 0, 1 << 20),
    )


def _listen(value: object, keys: _Keys) -> str:
    text = _str(value, keys)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        _fail(keys, f"{text!r} is not host:port (e.g. 127.0.0.1:9100, [::]:9100, :9100)")
    bracketed = host.startswith("[") and host.endswith("]")
    if ":" in host and not bracketed:
        _fail(keys, f"{text!r} is not host:port (write IPv6 addresses as [addr]:port)")
    if bracketed:
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            _fail(keys, f"{host!r} is not an IPv6 address")
    return text


# --- dataplane --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchConfig:
    """DESIGN.md §3: up to ``max_packets`` per batch, or what arrived within ``max_wait_us``.
    A batch of at least ``handoff_min`` packets goes to a worker; the I/O process does
    smaller ones itself (None: ``max_packets``, only full batches spread over the workers).
    The I/O loop never holds a partial batch back (a batch is what one read found), so the
    ``max_wait_us`` deadline is met with no wait; holding one back was measured, and bought
    no throughput (README, "The pipeline in one paragraph")."""

    max_packets: int = 256
    max_wait_us: int = 50
    handoff_min: int | None = None


@dataclass(frozen=True)
class InsideConfig:
    """The cleartext side. ``interface`` is the TUN device's name (YAML key ``name``) in tun
    mode, the AF_PACKET interface (YAML key ``interface``) in af_packet mode."""

    mode: InsideMode = "tun"
    interface: str = DEFAULT_TUN_NAME
    # Packets the kernel coalesced (TSO, GSO, GRO) are cut into segments here
    # (pipeline/offload.py): tun with virtio-net headers and TSO, writes coalesced too;
    # af_packet with the ring's virtio-net headers (PACKET_VNET_HDR).
    offload: bool = True


@dataclass(frozen=True)
class OutsideConfig:
    """The ESP side: AF_PACKET rings on ``interface``, or portable sockets (optionally bound
    to ``interface``). ``fanout`` spreads one interface over several rings (af_packet)."""

    mode: OutsideMode = "socket"
    interface: str | None = None
    fanout: bool = True
    # The RX ring (af_packet): "v3" hands packets over in blocks, after up to a block
    # timeout at low rates (~1 ms a crossing); "v2" per frame, as they arrive; "auto" both,
    # steering packets to V2 while traffic is sparse and to V3 while it is heavy
    # (pipeline/rxpair.py).
    ring: Literal["auto", "v2", "v3"] = "auto"


def _default_endpoint(runtime_dir: str, name: str) -> str:
    return f"ipc://{runtime_dir}/{name}.ipc"


@dataclass(frozen=True)
class EndpointsConfig:
    """ZeroMQ endpoints of the data plane (DESIGN.md §3, §5): ``ipc://`` under ``runtime_dir``
    by default; ``tcp://`` is allowed for batches, which carry no keys."""

    runtime_dir: str = DEFAULT_RUNTIME_DIR
    sa_snapshot: str = _default_endpoint(DEFAULT_RUNTIME_DIR, "sa_snapshot")  # clone: snapshot
    sa_updates: str = _default_endpoint(DEFAULT_RUNTIME_DIR, "sa_updates")  # clone: deltas
    batches: str = _default_endpoint(DEFAULT_RUNTIME_DIR, "batches")  # dispatcher -> workers
    results: str = _default_endpoint(DEFAULT_RUNTIME_DIR, "results")  # workers -> reassembler
    events: str = _default_endpoint(DEFAULT_RUNTIME_DIR, "events")  # data plane -> controller

    @classmethod
    def under(cls, runtime_dir: str) -> EndpointsConfig:
        return cls(runtime_dir, *(_default_endpoint(runtime_dir, n) for n in _ENDPOINT_NAMES))


_ENDPOINT_NAMES = ("sa_snapshot", "sa_updates", "batches", "results", "events")
_KEYED_ENDPOINTS = ("sa_snapshot", "sa_updates")


def _affinity() -> frozenset[int]:
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return frozenset(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class DataplaneConfig:
    workers: int = field(default_factory=lambda: max(1, len(_affinity())))
    cpus: tuple[int, ...] = field(default_factory=lambda: spread(_affinity()))
    batch: BatchConfig = BatchConfig()
    replay_window: int = DEFAULT_REPLAY_WINDOW  # default for static SAs that set none
    mss_clamp: MssClamp = "auto"
    mtu: int = 1500  # of the outside link
    inside: InsideConfig = InsideConfig()
    outside: OutsideConfig = OutsideConfig()
    endpoints: EndpointsConfig = EndpointsConfig()
    # The data plane processes' Python heap on transparent huge pages (pipeline/heap.py).
    hugepages: bool = True


_DATAPLANE_KEYS = (
    "workers",
    "cpus",
    "batch",
    "replay_window",
    "mss_clamp",
    "mtu",
    "inside",
    "outside",
    "endpoints",
    "hugepages",
)
_REPLAY_NOTE = " (0 disables anti-replay)"


def _replay_window(value: object, keys: _Keys) -> int:
    window = _int(value, keys, 0, 1 << 63)
    if window and not MIN_REPLAY_WINDOW <= window <= MAX_REPLAY_WINDOW:
        # RFC 4303 §3.4.3: a window of at least 32 MUST be supported.
        _fail(keys, f"{window} is outside {MIN_REPLAY_WINDOW}..{MAX_REPLAY_WINDOW}{_REPLAY_NOTE}")
    return window


def _format_cpus(cpus: Iterable[int]) -> str:
    ranges: list[str] = []
    for cpu in sorted(cpus):
        if ranges and ranges[-1].split("-")[-1] == str(cpu - 1):
            ranges[-1] = f"{ranges[-1].split('-')[0]}-{cpu}"
        else:
            ranges.append(str(cpu))
    return ",".join(ranges)


_CPU_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def _cpus(value: object, keys: _Keys, allowed: frozenset[int]) -> tuple[int, ...]:
    cpus: list[tuple[int, _Keys]] = []
    if isinstance(value, str):
        for item in value.split(","):
            m = _CPU_RANGE.fullmatch(item.strip())
            if m is None:
                _fail(keys, f'{value!r} is not a CPU list like "2-5,8"')
            first, last = int(m[1]), int(m[2] or m[1])
            if last < first:
                _fail(keys, f"{item.strip()!r} is a backwards range")
            cpus.extend((cpu, keys) for cpu in range(first, last + 1))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int):
                _fail((*keys, i), f"expected a CPU id, got {_kind(item)}")
            cpus.append((item, (*keys, i)))
    else:
        _fail(
            keys, f'expected a list of CPU ids or a range string like "2-5,8", got {_kind(value)}'
        )
    if not cpus:
        _fail(keys, "no CPUs given")
    seen: set[int] = set()
    for cpu, where in cpus:
        if cpu in seen:
            _fail(where, f"CPU {cpu} is listed twice")
        if cpu not in allowed:
            _fail(
                where,
                f"CPU {cpu} is not in this process's allowed set "
                f"{_format_cpus(allowed)} (os.sched_getaffinity)",
            )
        seen.add(cpu)
    return tuple(cpu for cpu, _ in cpus)


def _parse_batch(value: object, keys: _Keys) -> BatchConfig:
    s = _Section(value, keys, ("max_packets", "max_wait_us", "handoff_min"))
    max_packets = s.get_int("max_packets", 256, 1, MAX_BATCH_PACKETS)
    handoff_min = None
    if s.has("handoff_min"):
        handoff_min = s.get_int("handoff_min", max_packets, 1, MAX_BATCH_PACKETS)
        if handoff_min > max_packets:
            _fail(s.at("handoff_min"), f"{handoff_min} is more than max_packets "
                  f"({max_packets}): no batch would ever reach a worker")
    return BatchConfig(
        max_packets=max_packets,
        max_wait_us=s.get_int("max_wait_us", 50, 0, MAX_BATCH_WAIT_US),
        handoff_min=handoff_min,
    )


def _only_for(s: _Section, name: str, mode: str, note: str) -> None:
    if s.has(name):
        _fail(s.at(name), f"only for mode {mode}{note}")


def _parse_inside(value: object, keys: _Keys) -> InsideConfig:
    s = _Section(value, keys, ("mode", "name", "interface", "offload"))
    mode = cast(InsideMode, s.get_choice("mode", "tun", ("tun", "af_packet")))
    if mode == "tun":
        _only_for(s, "interface", "af_packet", " (a TUN device takes name)")
        return InsideConfig(mode, _ifname(s.get("name", DEFAULT_TUN_NAME), s.at("name")),
                            s.get_bool("offload", True))
    _only_for(s, "name", "tun", " (af_packet takes interface)")
    return InsideConfig(mode, _ifname(s.get("interface"), s.at("interface")),
                        s.get_bool("offload", True))


def _parse_outside(value: object, keys: _Keys) -> OutsideConfig:
    s = _Section(value, keys, ("mode", "interface", "fanout", "ring"))
    mode = cast(OutsideMode, s.get_choice("mode", "socket", ("af_packet", "socket")))
    if mode == "af_packet":
        interface: str | None = _ifname(s.get("interface"), s.at("interface"))
        ring = cast(Literal["auto", "v2", "v3"],
                    s.get_choice("ring", "auto", ("auto", "v2", "v3")))
        return OutsideConfig(mode, interface, s.get_bool("fanout", True), ring)
    _only_for(s, "fanout", "af_packet", "")
    _only_for(s, "ring", "af_packet", "")
    raw = s.get("interface", None)
    interface = None if raw is None else _ifname(raw, s.at("interface"))
    return OutsideConfig(mode, interface)


def _endpoint(value: object, keys: _Keys, name: str) -> str:
    url = _str(value, keys)
    scheme, sep, rest = url.partition("://")
    if scheme == "ipc" and sep and rest:
        if len(rest.encode()) > MAX_UNIX_PATH:
            _fail(
                keys,
                f"the ipc path is {len(rest.encode())} bytes long; Unix socket paths "
                f"allow {MAX_UNIX_PATH}",
            )
        return url
    if scheme == "tcp" and sep:
        if name in _KEYED_ENDPOINTS:
            # DESIGN.md §5: keys travel over ipc:// (mode 0600) or CurveZMQ-authenticated tcp://.
            _fail(
                keys,
                "tcp:// would carry SA keys unauthenticated (CurveZMQ is not "
                "supported yet); use ipc://",
            )
        host, colon, port = rest.rpartition(":")
        if colon and host and port.isdigit() and 1 <= int(port) <= 65535:
            return url
    _fail(
        keys, f"{url!r} is not a ZeroMQ endpoint like ipc:///run/espline/x.ipc or tcp://host:port"
    )


def _parse_endpoints(value: object, keys: _Keys) -> EndpointsConfig:
    s = _Section(value, keys, ("runtime_dir", *_ENDPOINT_NAMES))
    runtime_dir = s.get_str("runtime_dir", DEFAULT_RUNTIME_DIR)
    if not os.path.isabs(runtime_dir):
        _fail(s.at("runtime_dir"), f"{runtime_dir!r} is not an absolute path")
    runtime_dir = runtime_dir.rstrip("/") or "/"
    defaults = EndpointsConfig.under(runtime_dir)
    urls: dict[str, str] = {}
    for name in _ENDPOINT_NAMES:
        url = _endpoint(s.get(name, getattr(defaults, name)), s.at(name), name)
        for other, other_url in urls.items():
            if url == other_url:
                _fail(s.at(name), f"the same endpoint as {other}")
        urls[name] = url
    return EndpointsConfig(runtime_dir, **urls)


def _parse_mss_clamp(value: object, keys: _Keys) -> MssClamp:
    if value is True:
        return "auto"
    if value is False:
        return None
    if isinstance(value, int):
        return _int(value, keys, MIN_MSS, MAX_MSS)
    _fail(
        keys,
        f"expected true (clamp to the path MTU minus overhead), false or an MSS, "
        f"got {_kind(value)}",
    )


def _parse_dataplane(value: object, allowed_cpus: frozenset[int]) -> DataplaneConfig:
    s = _Section(value, ("dataplane",), _DATAPLANE_KEYS)
    cpus = (
        _cpus(s.get("cpus"), s.at("cpus"), allowed_cpus)
        if s.has("cpus")
        # Unset: every allowed CPU, one thread of each physical core before any second
        # one (workers are pinned round robin in this order: pipeline/cpus.py).
        else spread(allowed_cpus)
    )
    workers = s.get_int("workers", max(1, len(cpus)), 1, MAX_WORKERS)
    inside = _parse_inside(s.get("inside", None), s.at("inside"))
    outside = _parse_outside(s.get("outside", None), s.at("outside"))
    if inside.mode == outside.mode == "af_packet" and inside.interface == outside.interface:
        _fail((*s.at("inside"), "interface"), f"{inside.interface!r} is also the outside interface")
    return DataplaneConfig(
        workers=workers,
        cpus=cpus,
        batch=_parse_batch(s.get("batch", None), s.at("batch")),
        replay_window=_replay_window(
            s.get("replay_window", DEFAULT_REPLAY_WINDOW), s.at("replay_window")
        ),
        mss_clamp=_parse_mss_clamp(s.get("mss_clamp", True), s.at("mss_clamp")),
        mtu=s.get_int("mtu", 1500, MIN_MTU, MAX_MTU),
        inside=inside,
        outside=outside,
        endpoints=_parse_endpoints(s.get("endpoints", None), s.at("endpoints")),
        hugepages=s.get_bool("hugepages", True),
    )


# --- static SAs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StaticSaDirection:
    """One direction of a static SA. ``alg`` is the canonical strongSwan keyword (for AH the
    integrity algorithm); ``enc_key`` is key || salt for the AEADs (RFC 4106 §8.1)."""

    spi: int
    alg: str
    enc_key: bytes = field(default=b"", repr=False)
    integ_key: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class StaticSa:
    """A manually keyed pair of SAs, like two ``ip xfrm state`` entries and their policy."""

    name: str
    local_addr: IpAddress
    remote_addr: IpAddress
    outbound: StaticSaDirection  # YAML key "out"
    inbound: StaticSaDirection  # YAML key "in"
    local_ts: tuple[IpNetwork, ...]
    remote_ts: tuple[IpNetwork, ...]
    mode: Mode = Mode.TUNNEL
    protocol: Protocol = Protocol.ESP
    encap: UdpEncap | None = None
    replay_window: int = DEFAULT_REPLAY_WINDOW
    esn: bool = False
    tfc_pad: int = 0

    def records(self) -> tuple[SaRecord, SaRecord]:
        """The outbound and the inbound SA as the data plane installs them.

        Both carry our address as ``local_addr``; each carries only what its direction uses
        (the replay window inbound, TFC padding outbound).
        """
        common: dict[str, Any] = dict(
            local_addr=self.local_addr,
            remote_addr=self.remote_addr,
            protocol=self.protocol,
            mode=self.mode,
            esn=self.esn,
            encap=self.encap,
            name=self.name,
        )
        out, in_ = self.outbound, self.inbound
        return (
            SaRecord(
                spi=out.spi,
                direction=Direction.OUT,
                alg=out.alg,
                enc_key=out.enc_key,
                integ_key=out.integ_key,
                replay_window=0,
                tfc_pad=self.tfc_pad,
                **common,
            ),
            SaRecord(
                spi=in_.spi,
                direction=Direction.IN,
                alg=in_.alg,
                enc_key=in_.enc_key,
                integ_key=in_.integ_key,
                replay_window=self.replay_window,
                tfc_pad=0,
                **common,
            ),
        )


_SA_KEYS = (
    "name",
    "local_addr",
    "remote_addr",
    "mode",
    "encap",
    "protocol",
    "local_ts",
    "remote_ts",
    "replay_window",
    "esn",
    "tfc_pad",
    "out",
    "in",
)
_ESP_DIRECTION_KEYS = ("spi", "enc", "key", "integ_key")
_AH_DIRECTION_KEYS = ("spi", "integ", "integ_key")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HEX = frozenset("0123456789abcdefABCDEF")


def _sa_name(value: object, keys: _Keys) -> str:
    name = _str(value, keys)
    if len(name) > MAX_NAME or not _NAME.fullmatch(name):
        _fail(
            keys,
            f"{name!r} is not a name: use letters, digits, '.', '_' and '-' (at most {MAX_NAME})",
        )
    return name


def _address(value: object, keys: _Keys) -> IpAddress:
    if not isinstance(value, str):
        note = " (quote it: YAML read it as a number)" if isinstance(value, int) else ""
        _fail(keys, f"expected an IP address, got {_kind(value)}{note}")
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        _fail(keys, f"{value!r} is not an IPv4 or IPv6 address")
    if addr.is_unspecified or addr.is_multicast:
        _fail(keys, f"{addr} is not a unicast address")
    return addr


def _networks(value: object, keys: _Keys) -> tuple[IpNetwork, ...]:
    if isinstance(value, str):  # strongSwan style: comma-separated
        items: list[tuple[object, _Keys]] = [(v, keys) for v in value.split(",")]
    elif isinstance(value, list):
        items = [(v, (*keys, i)) for i, v in enumerate(value)]
    else:
        _fail(keys, f"expected a list of CIDR prefixes, got {_kind(value)}")
    if not items:
        _fail(keys, "empty: give at least one prefix")
    nets: list[IpNetwork] = []
    for item, where in items:
        if not isinstance(item, str):
            _fail(where, f"expected a CIDR prefix like 10.1.0.0/24, got {_kind(item)}")
        text = item.strip()
        try:
            net = ipaddress.ip_network(text)
        except ValueError:
            try:
                wide = ipaddress.ip_network(text, strict=False)
            except ValueError:
                _fail(where, f"{text!r} is not a CIDR prefix like 10.1.0.0/24 or 2001:db8::/64")
            _fail(where, f"{text!r} has host bits set (did you mean {wide}?)")
        if net in nets:
            _fail(where, f"{net} is listed twice")
        nets.append(net)
    return tuple(nets)


def _key_material(value: object, keys: _Keys) -> bytes:
    """Hex key material: ``0x``-prefixed or bare, or colon-separated bytes (strongSwan)."""
    if isinstance(value, int | float):
        _fail(
            keys,
            "write key material as a quoted string: YAML read it as a number, which "
            "loses leading zeros",
        )
    if not isinstance(value, str):
        _fail(keys, f"expected a hex string, got {_kind(value)}")
    text = value.strip()
    if ":" in text:
        octets = text.split(":")
        if not all(len(o) == 2 and set(o) <= _HEX for o in octets):
            _fail(keys, "not colon-separated hex: each byte takes two hex digits, like 0a:1b:2c")
        return bytes.fromhex("".join(octets))
    if text[:2] in ("0x", "0X"):
        text = text[2:]
    if not text:
        _fail(keys, "empty")
    if not set(text) <= _HEX:
        _fail(keys, "not hex: expected hex digits, optionally 0x-prefixed or colon-separated")
    if len(text) % 2:
        _fail(keys, f"odd number of hex digits ({len(text)}): each byte takes two")
    return bytes.fromhex(text)


def _spi(value: object, keys: _Keys) -> int:
    if isinstance(value, str):
        text = value.strip()
        if text[:2] not in ("0x", "0X") or not text[2:] or not set(text[2:]) <= _HEX:
            _fail(keys, f"{value!r} is not an SPI: write an integer or 0x-prefixed hex")
        value = int(text, 16)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(keys, f"expected an SPI (integer or 0x-prefixed hex), got {_kind(value)}")
    if not MIN_SPI <= value <= MAX_SPI:
        # RFC 4303 §2.1
        _fail(
            keys,
            f"{value:#x} is not in {MIN_SPI:#x}..{MAX_SPI:#x} "
            "(1-255 are reserved, 0 is local-only)",
        )
    return value


def _key_of_length(s: _Section, name: str, want: int, alg: str, detail: str = "") -> bytes:
    if not want:
        if s.has(name):
            _fail(s.at(name), f"{alg} takes no encryption key")
        return b""
    key = _key_material(s.get(name), s.at(name))
    if len(key) != want:
        _fail(s.at(name), f"{len(key)} bytes given, {alg} needs {want}{detail}")
    return key


def _parse_direction(
    value: object, keys: _Keys, protocol: Protocol
) -> tuple[StaticSaDirection, bool | None]:
    """One direction of a static SA, and the ESN its keyword states (``-esn``/``-noesn``)."""
    known = _AH_DIRECTION_KEYS if protocol is Protocol.AH else _ESP_DIRECTION_KEYS
    if isinstance(value, dict):
        for wrong, hint in (
            ("enc", "AH has no encryption: give integ and integ_key"),
            ("key", "AH has no encryption: give integ and integ_key"),
            (
                "integ",
                "ESP names its integrity algorithm in enc "
                "(e.g. aes128-sha256); integ is for protocol: ah",
            ),
        ):
            if wrong in value and wrong not in known:
                _fail((*keys, wrong), hint)
    s = _Section(value, keys, known)
    spi = _spi(s.get("spi"), s.at("spi"))
    if protocol is Protocol.AH:
        keyword = s.get_str("integ")
        try:
            integ, esn = parse_ah(keyword)
        except AlgorithmError as exc:
            _fail(s.at("integ"), str(exc))
        integ_key = _key_of_length(s, "integ_key", integ.key_len, integ.keyword)
        return StaticSaDirection(spi, integ.keyword, integ_key=integ_key), esn
    keyword = s.get_str("enc")
    try:
        esp = parse_esp(keyword)
    except AlgorithmError as exc:
        _fail(s.at("enc"), str(exc))
    detail = f" ({esp.enc_key_len}-byte key + {esp.salt_len}-byte salt)" if esp.salt_len else ""
    enc_key = _key_of_length(s, "key", esp.key_material_len, esp.keyword, detail)
    if esp.integ is None and s.has("integ_key"):
        _fail(s.at("integ_key"), f"{esp.keyword} is an AEAD and takes no integrity key")
    integ_len = 0 if esp.integ is None else esp.integ.key_len
    integ_key = _key_of_length(s, "integ_key", integ_len, esp.keyword)
    return StaticSaDirection(spi, esp.keyword, enc_key, integ_key), esp.esn


def _parse_encap(value: object, keys: _Keys) -> UdpEncap | None:
    if isinstance(value, bool):
        return UdpEncap() if value else None
    if not isinstance(value, dict):
        _fail(
            keys,
            f"expected true, false or a mapping with local_port/remote_port, got {_kind(value)}",
        )
    s = _Section(value, keys, ("local_port", "remote_port"))
    return UdpEncap(
        s.get_int("local_port", DEFAULT_NATT_PORT, 1, 65535),
        s.get_int("remote_port", DEFAULT_NATT_PORT, 1, 65535),
    )


def _parse_static_sa(value: object, keys: _Keys, default_replay_window: int) -> StaticSa:
    s = _Section(value, keys, _SA_KEYS)
    name = _sa_name(s.get("name"), s.at("name"))
    local_addr = _address(s.get("local_addr"), s.at("local_addr"))
    remote_addr = _address(s.get("remote_addr"), s.at("remote_addr"))
    if local_addr.version != remote_addr.version:
        _fail(
            s.at("remote_addr"),
            f"IPv{remote_addr.version} address, but local_addr "
            f"{local_addr} is IPv{local_addr.version} (both ends of an "
            "SA share one family)",
        )
    mode = Mode[s.get_choice("mode", "tunnel", ("tunnel", "transport")).upper()]
    protocol = Protocol[s.get_choice("protocol", "esp", ("esp", "ah")).upper()]
    encap = _parse_encap(s.get("encap", False), s.at("encap"))
    if encap is not None and protocol is Protocol.AH:
        _fail(s.at("encap"), "AH cannot be UDP-encapsulated (RFC 3948 covers ESP only)")
    ts: dict[str, tuple[IpNetwork, ...]] = {}
    for side, addr in (("local_ts", local_addr), ("remote_ts", remote_addr)):
        if mode is Mode.TUNNEL:
            ts[side] = _networks(s.get(side), s.at(side))
            continue
        host = ipaddress.ip_network(addr)
        ts[side] = (host,)
        if s.has(side):
            # RFC 4301 §4.4.1.1: a transport mode SA protects its own endpoints' traffic only.
            ts[side] = _networks(s.get(side), s.at(side))
            for i, net in enumerate(ts[side]):
                if net != host:
                    where = (*s.at(side), i) if isinstance(s.data[side], list) else s.at(side)
                    _fail(
                        where,
                        f"transport mode protects only {host} ({side[:-3]}_addr); "
                        f"use mode: tunnel for {net}",
                    )
    replay_window = (
        _replay_window(s.get("replay_window"), s.at("replay_window"))
        if s.has("replay_window")
        else default_replay_window
    )
    explicit_esn = s.get_bool("esn", False) if s.has("esn") else None
    tfc_pad = s.get_int("tfc_pad", 0, 0, MAX_TFC_PAD)
    if tfc_pad and protocol is Protocol.AH:
        _fail(s.at("tfc_pad"), "AH has no padding (TFC padding is ESP's, RFC 4303 §2.7)")
    outbound, out_esn = _parse_direction(s.get("out"), s.at("out"), protocol)
    inbound, in_esn = _parse_direction(s.get("in"), s.at("in"), protocol)
    esn, said_by = explicit_esn, "esn"
    alg_key = "integ" if protocol is Protocol.AH else "enc"
    for direction, stated in (("out", out_esn), ("in", in_esn)):
        if stated is None:
            continue
        if esn is None:
            esn, said_by = stated, f"{direction}.{alg_key}"
        elif stated != esn:
            # ESN is a property of the SA pair, negotiated once (RFC 7296 §3.3.2).
            _fail(
                (*s.at(direction), alg_key),
                f"ESN {'on' if stated else 'off'} here, but {said_by} turns it "
                f"{'on' if esn else 'off'}",
            )
    return StaticSa(
        name=name,
        local_addr=local_addr,
        remote_addr=remote_addr,
        outbound=outbound,
        inbound=inbound,
        local_ts=ts["local_ts"],
        remote_ts=ts["remote_ts"],
        mode=mode,
        protocol=protocol,
        encap=encap,
        replay_window=replay_window,
        esn=bool(esn),
        tfc_pad=tfc_pad,
    )


def _parse_static_sas(value: object, dataplane: DataplaneConfig) -> tuple[StaticSa, ...]:
    keys: _Keys = ("static_sas",)
    if value is None:
        return ()
    if not isinstance(value, list):
        _fail(keys, f"expected a list of SAs, got {_kind(value)}")
    sas: list[StaticSa] = []
    names: dict[str, int] = {}
    spis: dict[tuple[str, int], int] = {}
    aead_keys: dict[bytes, str] = {}
    for i, item in enumerate(value):
        at: _Keys = (*keys, i)
        sa = _parse_static_sa(item, at, dataplane.replay_window)
        if sa.name in names:
            _fail((*at, "name"), f"{sa.name!r} is already the name of static_sas[{names[sa.name]}]")
        names[sa.name] = i
        for direction, half in (("out", sa.outbound), ("in", sa.inbound)):
            j = spis.setdefault((direction, half.spi), i)
            if j != i:
                word = "outbound" if direction == "out" else "inbound"
                _fail(
                    (*at, direction, "spi"),
                    f"{half.spi:#x} is already the {word} SPI of static_sas[{j}] ({sas[j].name})",
                )
            if sa.protocol is Protocol.ESP and parse_esp(half.alg).is_aead:
                # RFC 4106 §8.1 / RFC 7634 §4: one key and nonce twice breaks the AEAD, and
                # every direction counts its sequence numbers (the IV) from 1.
                here = _format_path((*at, direction, "key"))
                first = aead_keys.setdefault(half.enc_key, here)
                if first != here:
                    _fail(
                        (*at, direction, "key"),
                        f"the same key material as {first}: every direction of every SA "
                        "needs its own AEAD key (a repeated key and nonce breaks it)",
                    )
        if sa.local_addr.version == 6 and dataplane.mtu < MIN_MTU_IPV6:
            _fail(
                ("dataplane", "mtu"),
                f"{dataplane.mtu} is below IPv6's minimum link MTU "
                f"{MIN_MTU_IPV6} (RFC 8200 §5), needed by "
                f"static_sas[{i}]",
            )
        try:
            sa.records()
        except SaRecordError as exc:  # pragma: no cover - the checks above come first
            name, _, reason = str(exc).partition(": ")
            _fail((*at, *name.split(".")), reason)
        sas.append(sa)
    return tuple(sas)


# --- the whole file ---------------------------------------------------------------------------


class _Redacted(Mapping[str, Any]):
    """A raw section whose repr names its entries but never shows their values (PSKs)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"<{len(self._data)} redacted entries: {', '.join(map(str, self._data))}>"


def _raw_section(value: object, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail((name,), f"expected a mapping, got {_kind(value)}")
    return copy.deepcopy(value)


@dataclass(frozen=True)
class Config:
    controller: ControllerConfig = ControllerConfig()
    dataplane: DataplaneConfig = field(default_factory=DataplaneConfig)
    static_sas: tuple[StaticSa, ...] = ()
    # swanctl.conf sections, raw until the IKE controller reads them.
    connections: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    secrets: Mapping[str, Any] = field(default_factory=lambda: _Redacted({}), repr=False)
    pools: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # swanctl.conf's CA certificates (``{name: {cacert: file}}``), raw; the connections
    # below hold what the files held.
    authorities: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # The same two sections, validated (controller/connections.py).
    conns: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    shared_keys: tuple[Any, ...] = field(default=(), repr=False)

    def sa_records(self) -> tuple[SaRecord, ...]:
        """Every static SA's records, outbound then inbound, in file order."""
        return tuple(r for sa in self.static_sas for r in sa.records())


_TOP_KEYS = ("controller", "dataplane", "static_sas", "connections", "secrets", "pools",
             "authorities")


def parse_config(
    mapping: Mapping[str, Any] | None,
    source: str = "<string>",
    *,
    allowed_cpus: Iterable[int] | None = None,
) -> Config:
    """Validate an already-parsed YAML document.

    ``allowed_cpus`` defaults to ``os.sched_getaffinity(0)``: the CPUs workers may be pinned to.
    """
    allowed = frozenset(allowed_cpus) if allowed_cpus is not None else _affinity()
    try:
        if mapping is not None and not isinstance(mapping, dict):
            if isinstance(mapping, Mapping):
                mapping = dict(mapping)
            else:
                _fail((), f"expected a mapping at the top level, got {_kind(mapping)}")
        top = _Section(mapping, (), _TOP_KEYS)
        dataplane = _parse_dataplane(top.get("dataplane", None), allowed)
        from controller.connections import parse_connections, parse_secrets

        connections = _raw_section(top.get("connections", None), "connections")
        secrets = _raw_section(top.get("secrets", None), "secrets")
        authorities = _raw_section(top.get("authorities", None), "authorities")
        return Config(
            controller=_parse_controller(top.get("controller", None)),
            dataplane=dataplane,
            static_sas=_parse_static_sas(top.get("static_sas", None), dataplane),
            connections=MappingProxyType(connections),
            secrets=_Redacted(secrets),
            pools=MappingProxyType(_raw_section(top.get("pools", None), "pools")),
            authorities=MappingProxyType(authorities),
            conns=MappingProxyType(parse_connections(connections, authorities)),
            shared_keys=tuple(parse_secrets(secrets)),
        )
    except ConfigError as err:
        err.source = source
        raise


# --- YAML -------------------------------------------------------------------------------------


def _yaml_error(exc: Exception, source: str) -> ConfigError:
    # Only the problem, never PyYAML's snippet of the line: it may hold key material.
    if isinstance(exc, yaml.reader.ReaderError):
        return ConfigError("", f"{exc.reason} (character {exc.position})", source=source)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = None if mark is None else int(mark.line) + 1
    reason = str(getattr(exc, "problem", None) or "not valid YAML")
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if not context:
        pass
    elif not context.startswith("while"):
        reason = f"{context}, {reason}"
    elif context_mark is not None and int(context_mark.line) + 1 != line:
        reason += f" ({context} that starts on line {int(context_mark.line) + 1})"
    else:
        reason += f" ({context})"
    return ConfigError("", reason, source=source, line=line)


def _children(node: Any) -> list[tuple[str | int, Any]]:
    if isinstance(node, yaml.MappingNode):
        return [(str(k.value), v) for k, v in node.value]
    if isinstance(node, yaml.SequenceNode):
        return list(enumerate(node.value))
    return []


def _check_duplicate_keys(root: Any, source: str) -> None:
    """YAML keeps the last of two equal keys silently; a mistyped file deserves better."""
    # Iterative, visiting each node once: aliases may share nodes or even form cycles.
    todo: list[tuple[Any, _Keys]] = [(root, ())]
    visited: set[int] = set()
    while todo:
        node, keys = todo.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: set[tuple[str, str]] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                ident = (key_node.tag, key_node.value)
                if ident in seen:
                    raise ConfigError(
                        _format_path((*keys, str(key_node.value))),
                        "duplicate key",
                        source=source,
                        line=key_node.start_mark.line + 1,
                    )
                seen.add(ident)
        todo.extend((child, (*keys, key)) for key, child in reversed(_children(node)))


def _line_of(root: Any, keys: _Keys) -> int:
    """The line of the deepest node on ``keys`` that the document has (for a mapping member,
    its key's line; for a missing key, its parent's)."""
    node, line = root, int(root.start_mark.line) + 1
    for key in keys:
        nxt = None
        if isinstance(node, yaml.MappingNode) and isinstance(key, str):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                    line, nxt = int(key_node.start_mark.line) + 1, value_node
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(key, int)
            and 0 <= key < len(node.value)
        ):
            nxt = node.value[key]
            line = int(nxt.start_mark.line) + 1
        if nxt is None:
            break
        node = nxt
    return line


def parse_config_text(
    text: str, source: str = "<string>", *, allowed_cpus: Iterable[int] | None = None
) -> Config:
    """Parse YAML text; errors carry ``source`` and the line of the key they name."""
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:  # a character YAML does not allow
        raise _yaml_error(exc, source) from None
    try:
        root = loader.get_single_node()
        if root is not None:
            _check_duplicate_keys(root, source)
        data = None if root is None else loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    finally:
        loader.dispose()
    try:
        return parse_config(data, source, allowed_cpus=allowed_cpus)
    except ConfigError as err:
        if root is not None:
            err.line = _line_of(root, err.keys)
        raise


def load_config(
    path: str | os.PathLike[str], *, allowed_cpus: Iterable[int] | None = None
) -> Config:
    """Load and validate an espline YAML file."""
    source = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError("", f"cannot read: {exc.strerror}", source=source) from None
    except UnicodeDecodeError:
        raise ConfigError("", "not UTF-8 text", source=source) from None
    return parse_config_text(text, source, allowed_cpus=allowed_cpus)
