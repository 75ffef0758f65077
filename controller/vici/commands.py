"""The VICI commands espline answers, and the ``Backend`` they ask.

This module is the adapter between strongSwan's admin vocabulary (the message trees of the
vici plugin's README, cited as ``VICI §<command>``) and the controller. It knows no socket:
``Commands.handle(name, request, emit)`` takes a decoded request and returns the response
tree; streamed data (``list-sa``, ``list-conn``, ``control-log``) goes through ``emit``, which
the server delivers only to the connection that registered for the event.

The controller side is the ``Backend`` protocol: small frozen dataclasses in, the exact keys
strongSwan emits out, so that ``swanctl --list-sas`` and the ``vici`` Python package print and
parse espline's answers as they do charon's. Secrets go in (``load_shared``) and never come
out: ``get-shared`` lists ids, and an error message that repeats a secret is redacted.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .protocol import (
    Encodable,
    EncodableSection,
    Section,
    TextSection,
    ViciProtocolError,
    text,
    to_text,
)

__all__ = [
    "AuthInfo",
    "Backend",
    "ChildConnInfo",
    "ChildSaInfo",
    "CommandError",
    "Commands",
    "ConnInfo",
    "Emit",
    "IkeSaInfo",
    "KNOWN_EVENTS",
    "LogFn",
    "StatsInfo",
    "VersionInfo",
    "child_rekey_event",
    "child_updown_event",
    "ike_rekey_event",
    "ike_sa_tree",
    "ike_updown_event",
    "log_event",
]

_log = logging.getLogger(__name__)

LogFn = Callable[[str], None]
"""Receives progress lines of initiate/terminate/rekey; each becomes a control-log event."""
Emit = Callable[[str, EncodableSection], None]
"""Sends an event to the requesting connection, if it registered for that event."""

# VICI §Server-issued events: the event names a client may register for.
KNOWN_EVENTS = frozenset({
    "log", "control-log", "list-sa", "list-policy", "list-conn", "list-cert",
    "list-authority", "ike-updown", "ike-rekey", "ike-update", "child-updown", "child-rekey",
})


class CommandError(Exception):
    """A command failed for a reason the operator should read: becomes ``errmsg``."""


# -- what the backend returns --------------------------------------------------------------


@dataclass(frozen=True)
class VersionInfo:
    """VICI §version(); sysname/release/machine default to this host's ``os.uname()``."""

    daemon: str
    version: str
    sysname: str | None = None
    release: str | None = None
    machine: str | None = None


@dataclass(frozen=True)
class StatsInfo:
    """VICI §stats(). ``started_at`` is a UNIX time; the rest are counts at the time asked.

    ``workers_active`` and ``queues`` are (critical, high, medium, low) as in charon;
    ``extra`` adds espline's own sections (e.g. data plane figures) to the reply.
    """

    started_at: float
    ike_sas_total: int
    ike_sas_half_open: int
    workers_total: int = 0
    workers_idle: int = 0
    workers_active: tuple[int, int, int, int] = (0, 0, 0, 0)
    queues: tuple[int, int, int, int] = (0, 0, 0, 0)
    scheduled: int = 0
    plugins: tuple[str, ...] = ()
    extra: Mapping[str, Encodable] = field(default_factory=dict)


@dataclass(frozen=True)
class ChildSaInfo:
    """One CHILD_SA as the list-sa event shows it (VICI §list-sa, ``child-sas``).

    Algorithm names are strongSwan's (``AES_GCM_16``, ``AES_CBC``, ``HMAC_SHA2_256_128``);
    ``mode`` is ``TUNNEL``/``TRANSPORT``, ``protocol`` ``ESP``/``AH``, ``state`` e.g.
    ``INSTALLED``. Times are seconds: ``use_*`` since the last packet (None: none yet),
    ``rekey_time``/``life_time`` until that happens (None: never), ``install_time`` since
    installation. Traffic selectors are strings such as ``10.1.0.0/16``.
    """

    name: str
    uniqueid: int
    reqid: int
    state: str
    mode: str
    protocol: str
    encap: bool
    spi_in: int
    spi_out: int
    encr_alg: str | None
    encr_keysize: int | None
    integ_alg: str | None
    esn: bool
    bytes_in: int
    bytes_out: int
    packets_in: int
    packets_out: int
    use_in: int | None
    use_out: int | None
    rekey_time: int | None
    life_time: int | None
    install_time: int
    local_ts: tuple[str, ...]
    remote_ts: tuple[str, ...]


@dataclass(frozen=True)
class IkeSaInfo:
    """One IKE_SA as the list-sa event shows it (VICI §list-sa).

    ``name`` is the connection name, ``uniqueid`` the IKE_SA's number (``#1``); the SPIs are
    the 8-byte wire values. ``established`` and ``rekey_time`` are seconds (None before the
    IKE_SA is established / when it never rekeys). Algorithm names as strongSwan's
    (``AES_CBC``, ``HMAC_SHA2_256_128``, ``PRF_HMAC_SHA2_256``, ``CURVE_25519``).
    """

    name: str
    uniqueid: int
    version: int
    state: str
    local_host: str
    local_port: int
    local_id: str
    remote_host: str
    remote_port: int
    remote_id: str
    initiator: bool
    initiator_spi: bytes
    responder_spi: bytes
    nat_local: bool
    nat_remote: bool
    encr_alg: str | None
    encr_keysize: int | None
    integ_alg: str | None
    prf_alg: str | None
    dh_group: str | None
    established: int | None
    rekey_time: int | None
    child_sas: tuple[ChildSaInfo, ...] = ()


@dataclass(frozen=True)
class AuthInfo:
    """One local or remote authentication round of a connection (VICI §list-conn).

    ``auth_class`` is strongSwan's class name: ``pre-shared key``, ``public key``, ``EAP``.
    """

    auth_class: str
    id: str | None = None


@dataclass(frozen=True)
class ChildConnInfo:
    """A CHILD_SA configuration (VICI §list-conn, ``children``); 0 means never."""

    name: str
    mode: str
    local_ts: tuple[str, ...]
    remote_ts: tuple[str, ...]
    rekey_time: int = 0
    rekey_bytes: int = 0
    rekey_packets: int = 0
    dpd_action: str = "clear"


@dataclass(frozen=True)
class ConnInfo:
    """A loaded connection (VICI §list-conn); times in seconds, 0 means never/off."""

    name: str
    local_addrs: tuple[str, ...]
    remote_addrs: tuple[str, ...]
    version: str = "IKEv2"
    reauth_time: int = 0
    rekey_time: int = 0
    dpd_delay: int = 0
    local_auth: tuple[AuthInfo, ...] = ()
    remote_auth: tuple[AuthInfo, ...] = ()
    children: tuple[ChildConnInfo, ...] = ()


class Backend(Protocol):
    """What the VICI commands need from the controller.

    Failures the operator should see raise ``CommandError(message)`` (a ``ValueError`` such
    as a configuration error is reported the same way, with its text). The async methods are
    the ones that wait for the peer; ``timeout`` is in seconds, ``None`` waits for the
    result, ``0`` starts the work and returns at once (VICI's ``timeout = -1``).
    """

    def version(self) -> VersionInfo: ...

    def stats(self) -> StatsInfo: ...

    def list_sas(self, ike: str | None, ike_id: int | None) -> Sequence[IkeSaInfo]: ...

    def list_conns(self) -> Sequence[ConnInfo]: ...

    def conns(self) -> Sequence[str]:
        """Names of the connections loaded over VICI (VICI §get-conns)."""
        ...

    async def initiate(
        self, child: str, ike: str | None, timeout: float | None, log: LogFn
    ) -> None: ...

    async def terminate(
        self,
        *,
        ike: str | None,
        child: str | None,
        ike_id: int | None,
        child_id: int | None,
        force: bool,
        timeout: float | None,
        log: LogFn,
    ) -> None: ...

    async def rekey(
        self,
        *,
        ike: str | None,
        child: str | None,
        ike_id: int | None,
        child_id: int | None,
        reauth: bool,
        log: LogFn,
    ) -> None: ...

    def counters(self, name: str | None, all: bool) -> Mapping[str, Mapping[str, int]]:
        """Counter sets by connection name, ``""`` for the global set (VICI §get-counters)."""
        ...

    def reset_counters(self, name: str | None, all: bool) -> None: ...

    def load_conn(self, name: str, tree: TextSection) -> None:
        """Add or replace connection ``name`` from its swanctl.conf-shaped tree."""
        ...

    def unload_conn(self, name: str) -> None: ...

    def load_shared(
        self, type: str, data: bytes, owners: Sequence[str], id: str | None
    ) -> None:
        """Add a shared secret; ``type`` is ``IKE``, ``EAP``, ``XAUTH``, ``NTLM`` or ``PPK``."""
        ...

    def unload_shared(self, id: str) -> None: ...

    def get_shared(self) -> Sequence[str]:
        """Ids of the shared secrets loaded over VICI. Never the secrets themselves."""
        ...

    def reload(self) -> None:
        """Re-read espline's settings (VICI §reload-settings)."""
        ...


# -- trees ---------------------------------------------------------------------------------


def _yes(flag: bool) -> str | None:
    # strongSwan adds these keys only when they hold ("initiator = <yes, if initiator>").
    return "yes" if flag else None


def _child_sa_tree(child: ChildSaInfo) -> EncodableSection:
    # VICI §list-sa, child-sas; SPIs as strongSwan prints them: "%.8x" of the host value.
    return {
        "name": child.name,
        "uniqueid": child.uniqueid,
        "reqid": child.reqid,
        "state": child.state,
        "mode": child.mode,
        "protocol": child.protocol,
        "encap": _yes(child.encap),
        "spi-in": f"{child.spi_in:08x}",
        "spi-out": f"{child.spi_out:08x}",
        "encr-alg": child.encr_alg,
        "encr-keysize": child.encr_keysize,
        "integ-alg": child.integ_alg,
        "esn": "1" if child.esn else None,
        "bytes-in": child.bytes_in,
        "packets-in": child.packets_in,
        "use-in": child.use_in,
        "bytes-out": child.bytes_out,
        "packets-out": child.packets_out,
        "use-out": child.use_out,
        "rekey-time": child.rekey_time,
        "life-time": child.life_time,
        "install-time": child.install_time,
        "local-ts": list(child.local_ts),
        "remote-ts": list(child.remote_ts),
    }


def _child_key(child: ChildSaInfo) -> str:
    # VICI §list-sa: "<unique child-sa-name>"; charon makes it unique with the id.
    return f"{child.name}-{child.uniqueid}"


def ike_sa_tree(
    sa: IkeSaInfo, children: Sequence[ChildSaInfo] | None = None
) -> dict[str, Encodable]:
    """The body of an IKE_SA section: ``children`` None lists all, () leaves the section out.

    ``child-sas`` comes last on purpose: swanctl prints the IKE_SA lines when it reaches that
    section, so every IKE key must precede it.
    """
    tree: dict[str, Encodable] = {
        "uniqueid": sa.uniqueid,
        "version": sa.version,
        "state": sa.state,
        "local-host": sa.local_host,
        "local-port": sa.local_port,
        "local-id": sa.local_id,
        "remote-host": sa.remote_host,
        "remote-port": sa.remote_port,
        "remote-id": sa.remote_id,
        "initiator": _yes(sa.initiator),
        "initiator-spi": sa.initiator_spi.hex(),
        "responder-spi": sa.responder_spi.hex(),
        "nat-local": _yes(sa.nat_local),
        "nat-remote": _yes(sa.nat_remote),
        "nat-any": _yes(sa.nat_local or sa.nat_remote),
        "encr-alg": sa.encr_alg,
        "encr-keysize": sa.encr_keysize,
        "integ-alg": sa.integ_alg,
        "prf-alg": sa.prf_alg,
        "dh-group": sa.dh_group,
        "established": sa.established,
        "rekey-time": sa.rekey_time,
    }
    listed = sa.child_sas if children is None else children
    if children is None or children:
        tree["child-sas"] = {_child_key(c): _child_sa_tree(c) for c in listed}
    return tree


def ike_updown_event(sa: IkeSaInfo, up: bool) -> EncodableSection:
    """VICI §ike-updown: the IKE_SA without its child-sas section."""
    return {"up": _yes(up), sa.name: ike_sa_tree(sa, children=())}


def child_updown_event(sa: IkeSaInfo, child: ChildSaInfo, up: bool) -> EncodableSection:
    """VICI §child-updown: the IKE_SA with only the affected CHILD_SA."""
    return {"up": _yes(up), sa.name: ike_sa_tree(sa, children=(child,))}


def ike_rekey_event(old: IkeSaInfo, new: IkeSaInfo) -> EncodableSection:
    """VICI §ike-rekey."""
    return {old.name: {"old": ike_sa_tree(old, children=()),
                       "new": ike_sa_tree(new, children=())}}


def child_rekey_event(sa: IkeSaInfo, old: ChildSaInfo, new: ChildSaInfo) -> EncodableSection:
    """VICI §child-rekey: the IKE_SA whose child-sas section holds old and new."""
    tree = ike_sa_tree(sa, children=())
    tree["child-sas"] = {old.name: {"old": _child_sa_tree(old), "new": _child_sa_tree(new)}}
    return {sa.name: tree}


def log_event(msg: str, group: str = "IKE", level: int = 1,
              ike_name: str | None = None, ike_id: int | None = None) -> EncodableSection:
    """VICI §log / §control-log (the README misspells ``ikesa-uniqueid`` as ``-uniqued``)."""
    return {"group": group, "level": level, "ikesa-name": ike_name, "ikesa-uniqueid": ike_id,
            "msg": msg}


def _conn_tree(conn: ConnInfo) -> EncodableSection:
    tree: dict[str, Encodable] = {
        "local_addrs": list(conn.local_addrs),
        "remote_addrs": list(conn.remote_addrs),
        "version": conn.version,
        "reauth_time": conn.reauth_time,
        "rekey_time": conn.rekey_time,
        "dpd_delay": conn.dpd_delay,
    }
    # VICI §list-conn: "local*, remote* = { # multiple local and remote auth sections"; charon
    # names them local-1, remote-1, ...
    for side, rounds in (("local", conn.local_auth), ("remote", conn.remote_auth)):
        for i, auth in enumerate(rounds, 1):
            tree[f"{side}-{i}"] = {"class": auth.auth_class, "id": auth.id}
    tree["children"] = {
        child.name: {
            "mode": child.mode,
            "rekey_time": child.rekey_time,
            "rekey_bytes": child.rekey_bytes,
            "rekey_packets": child.rekey_packets,
            "dpd_action": child.dpd_action,
            "local-ts": list(child.local_ts),
            "remote-ts": list(child.remote_ts),
        }
        for child in conn.children
    }
    return {conn.name: tree}


# -- request arguments ---------------------------------------------------------------------


def _arg(request: Section, *keys: str) -> str | None:
    """A value argument as text; ``keys`` are spellings (strongSwan renamed ike_id to ike-id)."""
    for key in keys:
        value = request.get(key)
        if value is None:
            continue
        if not isinstance(value, bytes):
            raise CommandError(f"{key} must be a value, not a {type(value).__name__}")
        return text(value)
    return None


def _int_arg(request: Section, *keys: str) -> int | None:
    value = _arg(request, *keys)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise CommandError(f"{keys[0]} must be a number, not {value!r}") from None


def _flag(request: Section, key: str) -> bool:
    # strongSwan's settings_value_as_bool: yes/true/enabled/1 (any case).
    value = _arg(request, key)
    return value is not None and value.lower() in ("yes", "true", "enabled", "1")


def _timeout(request: Section) -> float | None:
    # VICI §initiate: "The default timeout of 0 waits indefinitely for a result, and a timeout
    # value of -1 returns a result immediately." The unit is milliseconds.
    ms = _int_arg(request, "timeout") or 0
    if ms == 0:
        return None
    if ms < 0:
        return 0.0
    return ms / 1000


@dataclass(frozen=True)
class _Selector:
    """Which SAs terminate/rekey act on (VICI §terminate: child, ike, child-id, ike-id)."""

    ike: str | None
    child: str | None
    ike_id: int | None
    child_id: int | None

    @classmethod
    def of(cls, request: Section, command: str) -> _Selector:
        selector = cls(_arg(request, "ike"), _arg(request, "child"),
                       _int_arg(request, "ike-id", "ike_id"),
                       _int_arg(request, "child-id", "child_id"))
        if selector == cls(None, None, None, None):
            raise CommandError(f"missing {command} selector")
        return selector


def _success() -> EncodableSection:
    return {"success": "yes"}


def _failure(errmsg: str) -> EncodableSection:
    return {"success": "no", "errmsg": errmsg}


# -- the commands --------------------------------------------------------------------------

_SyncHandler = Callable[["Commands", Section, Emit], EncodableSection]
_AsyncHandler = Callable[["Commands", Section, Emit], Awaitable[EncodableSection]]

_PSK_ONLY = "espline supports pre-shared keys only"


def _format_delta(seconds: float) -> str:
    # strongSwan's "%V" (time_delta): days above two days, hours above two hours, minutes
    # above two minutes, else seconds; singular for 1.
    s = max(0, int(seconds))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s > 2 * size:
            n = s // size
            return f"{n} {unit}{'' if n == 1 else 's'}"
    return f"{s} second{'' if s == 1 else 's'}"


def _format_time(when: float) -> str:
    # strongSwan's "%T": local time as "Mon DD HH:MM:SS YYYY".
    return time.strftime("%b %d %H:%M:%S %Y", time.localtime(when))


class Commands:
    """Dispatches VICI commands to a ``Backend``; ``now`` is the clock for stats' uptime."""

    def __init__(self, backend: Backend, now: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self._now = now

    @staticmethod
    def known(name: str) -> bool:
        return name in _SYNC or name in _ASYNC

    async def handle(self, name: str, request: Section, emit: Emit) -> EncodableSection | None:
        """The response to command ``name``, or None when there is no such command.

        Every failure becomes ``{success: no, errmsg: ...}``: a broken request or a failing
        backend must never cost the client its connection.
        """
        try:
            if name in _SYNC:
                return _SYNC[name](self, request, emit)
            if name in _ASYNC:
                return await _ASYNC[name](self, request, emit)
            return None
        except (CommandError, ViciProtocolError, ValueError) as exc:
            return _failure(self._redact(name, request, str(exc) or type(exc).__name__))
        except Exception as exc:  # a backend bug: answered, logged, the connection lives on
            _log.exception("vici command %s failed", name)
            return _failure(self._redact(name, request, f"internal error: {exc!r}"))

    @staticmethod
    def _redact(name: str, request: Section, errmsg: str) -> str:
        # A backend might quote what it was given; a secret must not leave in an error.
        data = request.get("data")
        if name == "load-shared" and isinstance(data, bytes) and data:
            for form in {data.decode("utf-8", "replace"), data.hex(), repr(data)}:
                if form:
                    errmsg = errmsg.replace(form, "<secret>")
        return errmsg

    # VICI §version()
    def _version(self, request: Section, emit: Emit) -> EncodableSection:
        info = self.backend.version()
        uname = os.uname()
        return {
            "daemon": info.daemon,
            "version": info.version,
            "sysname": info.sysname or uname.sysname,
            "release": info.release or uname.release,
            "machine": info.machine or uname.machine,
        }

    # VICI §stats()
    def _stats(self, request: Section, emit: Emit) -> EncodableSection:
        s = self.backend.stats()
        priorities = ("critical", "high", "medium", "low")
        tree: dict[str, Encodable] = {
            "uptime": {"running": _format_delta(self._now() - s.started_at),
                       "since": _format_time(s.started_at)},
            "workers": {"total": s.workers_total, "idle": s.workers_idle,
                        "active": dict(zip(priorities, s.workers_active, strict=True))},
            "queues": dict(zip(priorities, s.queues, strict=True)),
            "scheduled": s.scheduled,
            "ikesas": {"total": s.ike_sas_total, "half-open": s.ike_sas_half_open},
            "plugins": list(s.plugins),
        }
        for key, value in s.extra.items():
            tree.setdefault(key, value)
        return tree

    # VICI §reload-settings()
    def _reload_settings(self, request: Section, emit: Emit) -> EncodableSection:
        self.backend.reload()
        return _success()

    # VICI §list-sas(): streams one list-sa event per IKE_SA
    def _list_sas(self, request: Section, emit: Emit) -> EncodableSection:
        sas = self.backend.list_sas(_arg(request, "ike"), _int_arg(request, "ike-id", "ike_id"))
        for sa in sas:
            emit("list-sa", {sa.name: ike_sa_tree(sa)})
        return {}

    # VICI §list-conns(): streams one list-conn event per connection
    def _list_conns(self, request: Section, emit: Emit) -> EncodableSection:
        only = _arg(request, "ike")
        for conn in self.backend.list_conns():
            if only is None or conn.name == only:
                emit("list-conn", _conn_tree(conn))
        return {}

    # VICI §get-conns()
    def _get_conns(self, request: Section, emit: Emit) -> EncodableSection:
        return {"conns": list(self.backend.conns())}

    def _control_log(self, emit: Emit) -> LogFn:
        return lambda msg: emit("control-log", log_event(msg))

    # VICI §initiate()
    async def _initiate(self, request: Section, emit: Emit) -> EncodableSection:
        child = _arg(request, "child")
        if not child:
            raise CommandError("missing configuration name")
        await self.backend.initiate(child, _arg(request, "ike"), _timeout(request),
                                    self._control_log(emit))
        return _success()

    # VICI §terminate()
    async def _terminate(self, request: Section, emit: Emit) -> EncodableSection:
        s = _Selector.of(request, "terminate")
        await self.backend.terminate(
            ike=s.ike, child=s.child, ike_id=s.ike_id, child_id=s.child_id,
            force=_flag(request, "force"), timeout=_timeout(request),
            log=self._control_log(emit))
        return _success()

    # VICI §rekey()
    async def _rekey(self, request: Section, emit: Emit) -> EncodableSection:
        s = _Selector.of(request, "rekey")
        await self.backend.rekey(
            ike=s.ike, child=s.child, ike_id=s.ike_id, child_id=s.child_id,
            reauth=_flag(request, "reauth"), log=self._control_log(emit))
        return _success()

    # VICI §get-counters()
    def _get_counters(self, request: Section, emit: Emit) -> EncodableSection:
        sets = self.backend.counters(_arg(request, "name"), _flag(request, "all"))
        return {"counters": {name: dict(values) for name, values in sets.items()},
                "success": "yes"}

    # VICI §reset-counters()
    def _reset_counters(self, request: Section, emit: Emit) -> EncodableSection:
        self.backend.reset_counters(_arg(request, "name"), _flag(request, "all"))
        return _success()

    # VICI §load-conn(): { <IKE_SA config name> = { ... } }
    def _load_conn(self, request: Section, emit: Emit) -> EncodableSection:
        if not request:
            raise CommandError("missing connection definition")
        for name, body in request.items():
            if not isinstance(body, dict):
                raise CommandError(f"{name!r} is not a connection section")
        for name, body in request.items():
            assert isinstance(body, dict)
            self.backend.load_conn(name, to_text(body))
        return _success()

    # VICI §unload-conn()
    def _unload_conn(self, request: Section, emit: Emit) -> EncodableSection:
        name = _arg(request, "name")
        if not name:
            raise CommandError("missing connection name to unload")
        self.backend.unload_conn(name)
        return _success()

    # VICI §load-shared()
    def _load_shared(self, request: Section, emit: Emit) -> EncodableSection:
        kind = _arg(request, "type")
        data = request.get("data")
        if not kind:
            raise CommandError("shared key type missing")
        if not isinstance(data, bytes) or not data:
            raise CommandError("shared key data missing")
        owners = request.get("owners", [])
        if not isinstance(owners, list):
            raise CommandError("owners must be a list")
        self.backend.load_shared(kind.upper(), data, [text(o) for o in owners],
                                 _arg(request, "id"))
        return _success()

    # VICI §unload-shared()
    def _unload_shared(self, request: Section, emit: Emit) -> EncodableSection:
        key_id = _arg(request, "id")
        if not key_id:
            raise CommandError("unique identifier is required")
        self.backend.unload_shared(key_id)
        return _success()

    # VICI §get-shared(): identifiers only
    def _get_shared(self, request: Section, emit: Emit) -> EncodableSection:
        return {"keys": [str(key_id) for key_id in self.backend.get_shared()]}

    # VICI §clear-creds(): drops what was loaded over VICI, here only shared keys
    def _clear_creds(self, request: Section, emit: Emit) -> EncodableSection:
        for key_id in list(self.backend.get_shared()):
            self.backend.unload_shared(key_id)
        return _success()

    # Commands swanctl sends that espline has nothing behind: truthful empty answers, so a
    # PSK-only ``swanctl --load-all`` completes, and refusals for what would need more.
    def _empty(self, request: Section, emit: Emit) -> EncodableSection:
        return {}

    def _no_keys(self, request: Section, emit: Emit) -> EncodableSection:
        return {"keys": []}  # VICI §get-keys(): no private keys

    def _no_authorities(self, request: Section, emit: Emit) -> EncodableSection:
        return {"authorities": []}  # VICI §get-authorities()

    def _nothing_to_unload(self, request: Section, emit: Emit) -> EncodableSection:
        what = _arg(request, "id") or _arg(request, "name") or ""
        return _failure(f"{what!r} not found: {_PSK_ONLY}")

    def _refuse_psk_only(self, request: Section, emit: Emit) -> EncodableSection:
        return _failure(_PSK_ONLY)

    def _refuse_unsupported(self, request: Section, emit: Emit) -> EncodableSection:
        return _failure("not supported by espline")


_SYNC: dict[str, _SyncHandler] = {
    "version": Commands._version,
    "stats": Commands._stats,
    "reload-settings": Commands._reload_settings,
    "list-sas": Commands._list_sas,
    "list-conns": Commands._list_conns,
    "get-conns": Commands._get_conns,
    "get-counters": Commands._get_counters,
    "reset-counters": Commands._reset_counters,
    "load-conn": Commands._load_conn,
    "unload-conn": Commands._unload_conn,
    "load-shared": Commands._load_shared,
    "unload-shared": Commands._unload_shared,
    "get-shared": Commands._get_shared,
    "clear-creds": Commands._clear_creds,
    # nothing behind these: empty streams and lists
    "list-policies": Commands._empty,
    "list-certs": Commands._empty,
    "list-authorities": Commands._empty,
    "get-pools": Commands._empty,
    "get-algorithms": Commands._empty,
    "flush-certs": lambda self, request, emit: _success(),
    "get-keys": Commands._no_keys,
    "get-authorities": Commands._no_authorities,
    # what a PSK-only daemon refuses
    "load-cert": Commands._refuse_psk_only,
    "load-key": Commands._refuse_psk_only,
    "load-token": Commands._refuse_psk_only,
    "load-authority": Commands._refuse_psk_only,
    "unload-key": Commands._nothing_to_unload,
    "unload-authority": Commands._nothing_to_unload,
    "unload-pool": Commands._nothing_to_unload,
    "load-pool": Commands._refuse_unsupported,
    "install": Commands._refuse_unsupported,
    "uninstall": Commands._refuse_unsupported,
    "redirect": Commands._refuse_unsupported,
}

_ASYNC: dict[str, _AsyncHandler] = {
    "initiate": Commands._initiate,
    "terminate": Commands._terminate,
    "rekey": Commands._rekey,
}
