"""What operators see of the gateway: the VICI ``Backend`` (controller/vici/commands.py) and
the metrics source (controller/metrics.py), both read from the gateway's registry.

Names follow strongSwan's (``AES_GCM_16``, ``HMAC_SHA2_256_128``, ``PRF_HMAC_SHA2_256``,
``CURVE_25519``, ``INSTALLED``, ``TUNNEL``) so that ``swanctl --list-sas`` prints espline's SAs
as it prints charon's. No key material is read here, let alone returned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from controller.config import ConfigError
from controller.connections import SharedKey, parse_connection, parse_identity
from controller.gateway import ChildEntry, Gateway, IkeEntry, selector_networks
from controller.ike.constants import DhGroup, ExchangeType
from controller.ike.ike_sa import IkeSa
from controller.metrics import (
    BATCH_SIZE_BOUNDS,
    ChildSaCounters,
    Histogram,
    IkeCounters,
    MetricsSnapshot,
    WorkerCounters,
    WorkerCountersMerger,
    from_dataplane_stats,
)
from controller.vici.commands import (
    AuthInfo,
    ChildConnInfo,
    ChildSaInfo,
    CommandError,
    ConnInfo,
    IkeSaInfo,
    LogFn,
    StatsInfo,
    VersionInfo,
)
from controller.vici.protocol import TextSection
from workers.algorithms import CipherKind, EspTransform

__all__ = ["GatewayBackend", "esp_algorithms", "ike_algorithms"]

log = logging.getLogger("espline.vici")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("espline")
    except PackageNotFoundError:
        return "0+unknown"


def esp_algorithms(t: EspTransform) -> tuple[str, int | None, str | None]:
    """(encr-alg, encr-keysize, integ-alg) in strongSwan's names."""
    integ = None if t.integ is None else {
        "sha256": "HMAC_SHA2_256_128", "sha384": "HMAC_SHA2_384_192",
        "sha512": "HMAC_SHA2_512_256"}.get(t.integ.keyword, t.integ.keyword.upper())
    encr = {CipherKind.AEAD_AES_GCM: "AES_GCM_16", CipherKind.AES_CBC: "AES_CBC",
            CipherKind.AEAD_CHACHA20_POLY1305: "CHACHA20_POLY1305",
            CipherKind.NULL: "NULL"}[t.kind]
    return encr, (t.enc_key_len * 8 if t.enc_key_len else None), integ


def ike_algorithms(sa: IkeSa) -> dict[str, Any]:
    """encr/integ/prf/dh names of a negotiated IKE SA (None before IKE_SA_INIT is done)."""
    suite, group = sa.suite, sa.ke_group
    out: dict[str, Any] = {"encr_alg": None, "encr_keysize": None, "integ_alg": None,
                           "prf_alg": None, "dh_group": None}
    if suite is not None:
        out["encr_alg"] = suite.encr.name.removeprefix("ENCR_")
        out["encr_keysize"] = suite.encr_key_bits
        out["integ_alg"] = None if suite.integ is None else suite.integ.name.removeprefix(
            "AUTH_")
        out["prf_alg"] = suite.prf.name
    if group is not None:
        name = DhGroup(group).name
        out["dh_group"] = name.replace("CURVE", "CURVE_") if name.startswith("CURVE") else name
    return out


def _ts(nets: Sequence[Any]) -> tuple[str, ...]:
    return tuple(str(n) for n in nets)


class GatewayBackend:
    """The VICI backend and metrics source over one ``Gateway``."""

    def __init__(self, gateway: Gateway, config_path: str | None = None) -> None:
        self.gw = gateway
        self.config_path = config_path
        self.vici_conns: set[str] = set()  # loaded over VICI (get-conns)
        self.vici_secrets: set[str] = set()
        self._counter_base: dict[str, int] = {}
        self._workers = WorkerCountersMerger()

    # -- views -----------------------------------------------------------------------------
    def child_info(self, entry: IkeEntry, child: ChildEntry) -> ChildSaInfo:
        e = child.event
        encr, keysize, integ = esp_algorithms(e.transform)
        now = time.time()
        conn = self.gw.conns.get(entry.conn)
        spec = next((c for c in conn.children if c.name == child.name), None) if conn else None
        age = now - child.installed
        c = child.counters
        return ChildSaInfo(
            name=child.name, uniqueid=child.uniqueid, reqid=child.uniqueid,
            state="REKEYED" if child.replaced else "INSTALLED",
            mode=e.mode.name, protocol="ESP", encap=e.encap, spi_in=e.spi_in,
            spi_out=e.spi_out, encr_alg=encr, encr_keysize=keysize, integ_alg=integ,
            esn=e.esn, bytes_in=c.get("bytes-in", 0), bytes_out=c.get("bytes-out", 0),
            packets_in=c.get("packets-in", 0), packets_out=c.get("packets-out", 0),
            use_in=None, use_out=None,
            rekey_time=(max(0, int(spec.rekey_time - age)) if spec and spec.rekey_time
                        else None),
            life_time=(max(0, int(spec.life_time - age)) if spec and spec.life_time else None),
            install_time=int(age),
            local_ts=_ts(selector_networks(e.local_ts)),
            remote_ts=_ts(selector_networks(e.remote_ts)))

    def ike_info(self, entry: IkeEntry) -> IkeSaInfo:
        sa = entry.sa
        conn = self.gw.conns.get(entry.conn)
        local_id = str(conn.local_id) if conn else ""
        remote_id = str(conn.remote.id) if conn and conn.remote.id else sa.remote[0]
        initiator = sa.original_initiator
        now = time.time()
        est = entry.established
        return IkeSaInfo(
            name=entry.conn, uniqueid=entry.uniqueid, version=2, state=entry.state,
            local_host=sa.local[0], local_port=sa.local[1], local_id=local_id,
            remote_host=sa.remote[0], remote_port=sa.remote[1], remote_id=remote_id,
            initiator=initiator, initiator_spi=bytes(sa.spi_i), responder_spi=bytes(sa.spi_r),
            nat_local=entry.nat_local, nat_remote=entry.nat_remote,
            **ike_algorithms(sa),
            established=None if est is None else int(now - est),
            rekey_time=(max(0, int(conn.rekey_time - (now - est)))
                        if conn and conn.rekey_time and est else None),
            child_sas=tuple(self.child_info(entry, c) for c in
                            sorted(entry.children.values(), key=lambda c: c.uniqueid)))

    # -- Backend ---------------------------------------------------------------------------
    def version(self) -> VersionInfo:
        return VersionInfo("espline", _version())

    def stats(self) -> StatsInfo:
        states = [e.state for e in self.gw.ike.values()]
        dp = self.gw.cfg.dataplane
        st = self.gw.stats
        extra: dict[str, Any] = {"dataplane": {
            "workers": str(dp.workers),
            "pid": str(self.gw.dataplane_pid or ""),
            "worker-restarts": str(st.get("worker_restarts", 0)),
            "lost-batches": str(st.get("lost_batches", 0)),
            "packets-out": str(st.get("outbound", {}).get("passed", 0)),
            "packets-in": str(st.get("inbound", {}).get("passed", 0)),
        }}
        return StatsInfo(started_at=self.gw.started_at, ike_sas_total=len(states),
                         ike_sas_half_open=sum(s == "CONNECTING" for s in states),
                         workers_total=dp.workers, workers_idle=dp.workers,
                         plugins=("vici", "espline-dataplane"), extra=extra)

    def list_sas(self, ike: str | None, ike_id: int | None) -> Sequence[IkeSaInfo]:
        return [self.ike_info(e) for e in sorted(self.gw.ike.values(), key=lambda e: e.uniqueid)
                if (ike is None or e.conn == ike) and (ike_id is None or e.uniqueid == ike_id)]

    def list_conns(self) -> Sequence[ConnInfo]:
        out = []
        for conn in self.gw.conns.values():
            out.append(ConnInfo(
                name=conn.name, local_addrs=conn.local_addrs, remote_addrs=conn.remote_addrs,
                rekey_time=int(conn.rekey_time), dpd_delay=int(conn.dpd_delay),
                local_auth=(AuthInfo("pre-shared key", str(conn.local_id)),),
                remote_auth=(AuthInfo("pre-shared key",
                                      None if conn.remote.id is None else str(conn.remote.id)),),
                children=tuple(ChildConnInfo(c.name, c.mode.name, _ts(c.local_ts),
                                             _ts(c.remote_ts), int(c.rekey_time),
                                             dpd_action=c.dpd_action)
                               for c in conn.children)))
        return out

    def conns(self) -> Sequence[str]:
        return sorted(self.vici_conns & set(self.gw.conns))

    def _find_conn(self, child: str | None, ike: str | None) -> str:
        for conn in self.gw.conns.values():
            if ike is not None and conn.name != ike:
                continue
            if child is None or any(c.name == child for c in conn.children):
                return conn.name
        what = f"CHILD_SA config '{child}'" if child else f"IKE_SA config '{ike}'"
        raise CommandError(f"{what} not found")

    async def initiate(self, child: str, ike: str | None, timeout: float | None,
                       log: LogFn) -> None:
        name = self._find_conn(child or None, ike)

        def up() -> IkeEntry | None:
            return next((e for e in self.gw.ike.values() if e.conn == name and any(
                c.name == child and not c.replaced for c in e.children.values())), None)

        existing = up()
        if existing is not None:
            log(f"CHILD_SA '{child}' of IKE_SA '{name}' is already established")
            return
        try:
            entry = self.gw.initiate(name)
        except (KeyError, ConfigError) as exc:
            raise CommandError(f"cannot initiate '{name}': {exc}") from None
        log(f"initiating IKE_SA {name}[{entry.uniqueid}] to {entry.sa.remote[0]}")
        if timeout == 0:
            return
        ok = await self.gw.wait_until(lambda: up() is not None or entry.closed is not None,
                                      timeout)
        if up() is not None:
            log(f"CHILD_SA {child} established")
            return
        raise CommandError(f"establishing CHILD_SA '{child}' failed: "
                           f"{entry.closed or ('timeout' if not ok else 'unknown')}")

    def _select(self, ike: str | None, child: str | None, ike_id: int | None,
                child_id: int | None) -> list[tuple[IkeEntry, ChildEntry | None]]:
        found: list[tuple[IkeEntry, ChildEntry | None]] = []
        for e in self.gw.ike.values():
            if (ike is not None and e.conn != ike) or (ike_id is not None and
                                                       e.uniqueid != ike_id):
                continue
            if child is None and child_id is None:
                found.append((e, None))
                continue
            found += [(e, c) for c in e.children.values()
                      if (child is None or c.name == child)
                      and (child_id is None or c.uniqueid == child_id)]
        if not found:
            raise CommandError("no matching SAs to act on")
        return found

    async def terminate(self, *, ike: str | None, child: str | None, ike_id: int | None,
                        child_id: int | None, force: bool, timeout: float | None,
                        log: LogFn) -> None:
        targets = self._select(ike, child, ike_id, child_id)
        for entry, c in targets:
            if c is None:
                log(f"deleting IKE_SA {entry.conn}[{entry.uniqueid}]")
                self.gw.terminate(entry)
            else:
                log(f"deleting CHILD_SA {c.name}{{{c.uniqueid}}}")
                entry.sa.delete_child(c.event.spi_in, self.gw.clock())
                self.gw.poke(entry.sa)
        if timeout == 0:
            return
        gone = await self.gw.wait_until(
            lambda: all((c is None and e.closed is not None)
                        or (c is not None and c.event.spi_in not in e.children)
                        for e, c in targets), timeout if timeout is not None else 30.0)
        if not gone:
            raise CommandError("terminate timed out")
        log("terminated")

    async def rekey(self, *, ike: str | None, child: str | None, ike_id: int | None,
                    child_id: int | None, reauth: bool, log: LogFn) -> None:
        for entry, c in self._select(ike, child, ike_id, child_id):
            if c is None:
                if reauth:
                    raise CommandError("reauthentication is not supported")
                entry.sa.rekey(self.gw.clock())
                log(f"rekeying IKE_SA {entry.conn}[{entry.uniqueid}]")
            else:
                entry.sa.rekey_child(c.event.spi_in, self.gw.clock())
                log(f"rekeying CHILD_SA {c.name}{{{c.uniqueid}}}")
            self.gw.poke(entry.sa)

    def _global_counters(self) -> dict[str, int]:
        m = self.gw.daemon.messages
        names = {ExchangeType.IKE_SA_INIT: "ike-init", ExchangeType.IKE_AUTH: "ike-auth",
                 ExchangeType.CREATE_CHILD_SA: "create-child",
                 ExchangeType.INFORMATIONAL: "info"}
        out = {"ike-rekey-init": 0, "ike-rekey-resp": 0, "child-rekey": 0,
               "invalid": self.gw.daemon.alerts.get("message_dropped", 0),
               "invalid-spi": self.gw.daemon.alerts.get("invalid_spi", 0)}
        for exchange, prefix in names.items():
            for direction in ("in", "out"):
                for kind, short in (("request", "req"), ("response", "rsp")):
                    out[f"{prefix}-{direction}-{short}"] = m.get((int(exchange), direction,
                                                                  kind), 0)
        out["ike-rekey-init"] = sum(e.rekeys for e in self.gw.ike.values())
        out["child-rekey"] = sum(c.rekeys for e in self.gw.ike.values()
                                 for c in e.children.values())
        return {k: v - self._counter_base.get(k, 0) for k, v in out.items()}

    def counters(self, name: str | None, all: bool) -> Mapping[str, Mapping[str, int]]:
        if name is not None and name not in self.gw.conns:
            raise CommandError(f"no counters found for '{name}'")
        if all:
            return {"": self._global_counters(), **{n: {} for n in self.gw.conns}}
        return {name or "": self._global_counters() if name is None else {}}

    def reset_counters(self, name: str | None, all: bool) -> None:
        self._counter_base = {}
        self._counter_base = dict(self._global_counters())

    def load_conn(self, name: str, tree: TextSection) -> None:
        conn = parse_connection(name, tree)
        changed = self.gw.set_connection(conn)
        self.vici_conns.add(name)
        log.info("connection %s %s over VICI", name, "loaded" if changed else "unchanged")

    def unload_conn(self, name: str) -> None:
        if not self.gw.remove_connection(name):
            raise CommandError(f"unloading connection '{name}' failed: not found")
        self.vici_conns.discard(name)

    def load_shared(self, type: str, data: bytes, owners: Sequence[str], id: str | None) -> None:
        if type != "IKE":
            raise CommandError(f"shared secrets of type {type} are not supported")
        for owner in owners:
            parse_identity(owner, ("owners",))
        key_id = id or f"vici-{len(self.vici_secrets)}"
        self.gw.psks.add(SharedKey(tuple(owners), bytes(data), key_id))
        self.vici_secrets.add(key_id)
        self.gw.shared_keys_changed()

    def unload_shared(self, id: str) -> None:
        if not self.gw.psks.remove(id):
            raise CommandError(f"unloading shared secret '{id}' failed: not found")
        self.vici_secrets.discard(id)
        self.gw.shared_keys_changed()

    def get_shared(self) -> Sequence[str]:
        return sorted(self.vici_secrets)

    def reload(self) -> None:
        """Re-read the configuration file: new and changed connections are loaded, removed
        ones unloaded; established SAs are left alone (strongSwan's behaviour)."""
        if self.config_path is None:
            raise CommandError("no configuration file to reload")
        from controller.config import load_config
        from controller.run import with_secrets_file

        cfg = with_secrets_file(load_config(self.config_path))
        for key in cfg.shared_keys:
            self.gw.psks.add(key)
        for name in set(self.gw.conns) - set(cfg.conns) - self.vici_conns:
            self.gw.remove_connection(name)
        for conn in cfg.conns.values():
            self.gw.set_connection(conn)
        self.gw.shared_keys_changed()
        log.info("configuration reloaded from %s", self.config_path)

    # -- metrics ---------------------------------------------------------------------------
    def collect(self) -> MetricsSnapshot:
        names: dict[int, tuple[str, str]] = {}
        for e in self.gw.ike.values():
            for c in e.children.values():
                names[c.event.spi_in] = names[c.event.spi_out] = (e.conn, c.name)
        dp = from_dataplane_stats(self.gw.stats, names)
        states: dict[str, int] = {}
        for e in self.gw.ike.values():
            key = e.state.lower()
            states[key] = states.get(key, 0) + 1
        msgs_in: dict[str, int] = {}
        msgs_out: dict[str, int] = {}
        for (exchange, direction, _), n in self.gw.daemon.messages.items():
            try:
                label = ExchangeType(exchange).name
            except ValueError:
                label = str(exchange)
            into = msgs_in if direction == "in" else msgs_out
            into[label] = into.get(label, 0) + n
        alerts = dict(self.gw.daemon.alerts)
        workers = list(dp.workers)
        for index, w in sorted(self.gw.worker_stats.items()):
            buckets = tuple(int(n) for n in w.get("batch_buckets", ()))
            hist = (Histogram(BATCH_SIZE_BOUNDS, buckets, float(w.get("batch_sum", 0)))
                    if len(buckets) == len(BATCH_SIZE_BOUNDS) + 1 else None)
            # A restarted worker counts from zero again: its PID is the merger's epoch.
            workers.append(self._workers.update(
                WorkerCounters(index, int(w.get("in", 0)), int(w.get("out", 0)),
                               {str(k): int(v) for k, v in w.get("drops", {}).items()}, hist),
                epoch=w.get("pid")))
        return MetricsSnapshot(
            child_sas=tuple(c for c in dp.child_sas if isinstance(c, ChildSaCounters)),
            workers=tuple(workers),
            ike=IkeCounters(states, msgs_in, msgs_out, alerts),
            worker_restarts=dp.worker_restarts, lost_batches=dp.lost_batches)
