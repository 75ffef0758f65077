"""SA distribution from the controller to the data plane (DESIGN §5): ZeroMQ's "clone" pattern.

The controller owns the truth: a versioned table of SA records by index plus the SPD. Each
change is one delta with the next version number, published on a PUB socket. A subscriber
(the I/O process, every worker) connects its SUB socket first, then asks the ROUTER socket for
a snapshot; deltas that arrive before the snapshot are kept and replayed if newer than it. A
gap in the version numbers (a slow subscriber lost messages to the high-water mark) makes the
subscriber ask for a fresh snapshot, so it can never run on a silently stale table.

An SA index is handed out again only 60 s after its SA was removed (``INDEX_QUARANTINE_S``),
and never while a PROTECT policy still names it: far longer than any batch classified with
the old SA can live (``reorder_hold``, 1 s; a later batch is dropped, never sent), so no
packet of the old SA meets the new one's keys or sequence numbers. The data plane's
per-index tables stay as large as the SAs up at once.

Wire form: one frame per message (a delta ``{"v": version, "op": ..., ...}`` or a list of
them) and one per snapshot, in Python's ``marshal`` format (:func:`encode_message`): dicts,
lists, ints, strings and bytes (keys travel raw). Both ends are processes of this one
program on one interpreter, and it is cheaper than JSON was at both ends (a Child SA's
message: 3.5-4.2 against 13-15 us to encode, 5.6 against 11.3 us to decode in each
subscriber). ``marshal`` is not meant for untrusted input: the endpoints are
``ipc://`` paths created mode 0600 in the runtime directory, as they must be anyway since
records carry key material (DESIGN §5: keys cross local sockets only), and a frame that
does not decode makes the subscriber fetch a fresh snapshot. Nothing here logs a record's
keys.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import marshal
import os
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import zmq

from pipeline.dispatch import Action, Policy, Spd, ranked
from pipeline.satable import Direction, Mode, SaRecord, UdpEncap
from pipeline.satable import Protocol as IpsecProtocol

__all__ = [
    "DeferringSaSink",
    "SaPublisher",
    "SaSink",
    "SaSubscriber",
    "SaTableSnapshot",
    "decode_message",
    "decode_record",
    "encode_message",
    "encode_record",
]

SNAPSHOT_REQUEST = b"snapshot?"
# Seconds a removed SA index waits before SaPublisher.allocate hands it out again.
INDEX_QUARANTINE_S = 60.0


class SaSink(Protocol):
    """What a subscriber applies updates to. ``reset`` brings the sink to a snapshot: an SA
    whose record is unchanged must keep its runtime state (sequence counter, replay window),
    or a resync would reissue sequence numbers."""

    def reset(self, sas: dict[int, SaRecord], policies: Mapping[int, Policy]) -> None: ...
    def install(self, index: int, record: SaRecord) -> None: ...
    def remove(self, index: int) -> None: ...
    def set_policies(self, policies: Mapping[int, Policy]) -> None: ...
    def edit_policies(self, put: Mapping[int, Policy], removed: Collection[int]) -> None: ...


class DeferringSaSink(SaSink, Protocol):
    """A sink that takes an installed record as it came on the wire (``encoded``, what
    :func:`encode_record` gives) and decodes it only if it ever needs the SA."""

    def install_encoded(self, index: int, encoded: dict[str, Any]) -> None: ...


# -- encoding -----------------------------------------------------------------------------------

_MARSHAL_VERSION = 4


def encode_message(message: dict[str, Any] | list[Any]) -> bytes:
    """A frame's bytes: a delta, a list of deltas or a snapshot (plain data only)."""
    return marshal.dumps(message, _MARSHAL_VERSION)


def decode_message(data: bytes) -> Any:
    """What :func:`encode_message` was given; ``ValueError`` for bytes it did not make."""
    try:
        return marshal.loads(data)
    except (EOFError, TypeError, ValueError) as exc:
        raise ValueError(f"not an SA distribution frame: {exc}") from None


def encode_record(r: SaRecord) -> dict[str, Any]:
    return {
        "spi": r.spi, "dir": int(r.direction), "alg": r.alg,
        "local": str(r.local_addr), "remote": str(r.remote_addr), "proto": int(r.protocol),
        "mode": int(r.mode), "enc_key": r.enc_key, "integ_key": r.integ_key,
        "esn": r.esn, "replay": r.replay_window, "tfc": r.tfc_pad, "name": r.name,
        "encap": None if r.encap is None else [r.encap.local_port, r.encap.remote_port],
    }


# A concentrator's SAs share a handful of addresses: parse each once (ip_address objects
# are immutable). The controller's gateway parses its peers' with it too.
address = functools.lru_cache(maxsize=4096)(ipaddress.ip_address)


# Enum members by value: a dict lookup, where calling the Enum costs a microsecond (every
# subscriber decodes every record).
_DIRECTIONS: dict[int, Direction] = {m.value: m for m in Direction}
_PROTOCOLS: dict[int, IpsecProtocol] = {m.value: m for m in IpsecProtocol}
_MODES: dict[int, Mode] = {m.value: m for m in Mode}


def _member(members: dict[int, Any], enum: Any, value: object) -> Any:
    member = members.get(value) if type(value) is int else None
    return member if member is not None else enum(value)  # (raises as the Enum does)


def decode_record(d: dict[str, Any]) -> SaRecord:
    encap = d["encap"]
    return SaRecord(
        spi=int(d["spi"]), direction=_member(_DIRECTIONS, Direction, d["dir"]),
        alg=str(d["alg"]), local_addr=address(d["local"]), remote_addr=address(d["remote"]),
        protocol=_member(_PROTOCOLS, IpsecProtocol, d["proto"]),
        mode=_member(_MODES, Mode, d["mode"]),
        enc_key=bytes(d["enc_key"]), integ_key=bytes(d["integ_key"]),
        esn=bool(d["esn"]), replay_window=int(d["replay"]), tfc_pad=int(d["tfc"]),
        name=str(d["name"]),
        encap=None if encap is None else UdpEncap(int(encap[0]), int(encap[1])),
    )


def _encode_policy(p: Policy) -> dict[str, Any]:
    return {"local": [str(n) for n in p.local_ts], "remote": [str(n) for n in p.remote_ts],
            "action": p.action.value, "sa": p.sa_index, "name": p.name}


_network = functools.lru_cache(maxsize=4096)(ipaddress.ip_network)


def _decode_policy(d: dict[str, Any]) -> Policy:
    return Policy(tuple(_network(n) for n in d["local"]),
                  tuple(_network(n) for n in d["remote"]),
                  Action(d["action"]), int(d["sa"]), str(d.get("name", "")))


def _encode_spd(policies: Mapping[int, Policy]) -> list[list[Any]]:
    return [[rank, _encode_policy(p)] for rank, p in sorted(policies.items())]


def _decode_spd(entries: list[list[Any]]) -> dict[int, Policy]:
    return {int(rank): _decode_policy(p) for rank, p in entries}


@dataclass
class SaTableSnapshot:
    """The controller's side of the table: what a snapshot carries."""

    version: int = 0
    sas: dict[int, SaRecord] | None = None
    # The SPD by rank (the smaller matches first): SPD deltas name entries by rank.
    policies: dict[int, Policy] | None = None

    def __post_init__(self) -> None:
        if self.sas is None:
            self.sas = {}
        if self.policies is None:
            self.policies = {}

    def encode(self) -> bytes:
        assert self.sas is not None and self.policies is not None
        return encode_message({
            "v": self.version,
            "sas": [[i, encode_record(r)] for i, r in sorted(self.sas.items())],
            "policies": _encode_spd(self.policies),
        })

    @classmethod
    def decode(cls, data: bytes) -> SaTableSnapshot:
        d = decode_message(data)
        return cls(int(d["v"]), {int(i): decode_record(r) for i, r in d["sas"]},
                   _decode_spd(d["policies"]))

    def apply_to(self, sink: SaSink) -> None:
        assert self.sas is not None and self.policies is not None
        sink.reset(dict(self.sas), dict(self.policies))


# -- the controller's side ----------------------------------------------------------------------

def _bind_private(sock: zmq.Socket[bytes], endpoint: str) -> None:
    sock.bind(endpoint)
    if endpoint.startswith("ipc://"):
        os.chmod(endpoint.removeprefix("ipc://"), 0o600)


class SaPublisher:
    """Publishes every change of the SA table; answers snapshot requests.

    Sockets are plain (non-blocking use only), so the controller's asyncio loop drives
    ``serve_snapshots`` from a reader on ``snapshot_socket``'s file descriptor.
    """

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], pub_endpoint: str,
                 snapshot_endpoint: str, *, quarantine: float = INDEX_QUARANTINE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.table = SaTableSnapshot()
        self.quarantine = quarantine
        self._clock = clock
        # Removed indices, oldest first, and when each still in quarantine was removed (an
        # explicit install takes one back; a deque entry whose time is not its index's
        # there is stale and skipped).
        self._released: deque[tuple[float, int]] = deque()
        self._quarantined: dict[int, float] = {}
        # PROTECT policies per outbound SA index they name: such an index is not handed out
        # again, even with its SA gone, until no policy names it.
        self._named: dict[int, int] = {}
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.snapshot_socket = ctx.socket(zmq.ROUTER)
        self.snapshot_socket.setsockopt(zmq.LINGER, 0)
        self.endpoints = (pub_endpoint, snapshot_endpoint)
        _bind_private(self.pub, pub_endpoint)
        _bind_private(self.snapshot_socket, snapshot_endpoint)
        self._next_index = 0
        self._pending: list[dict[str, Any]] | None = None

    @property
    def version(self) -> int:
        return self.table.version

    def allocate(self) -> int:
        """An SA index for a new SA: one removed at least ``quarantine`` seconds ago, else
        one never handed out. Reusing indices keeps every per-index table of the data plane
        (its SA slots, its MTU and MSS arrays) as large as the SAs up at once, not as all
        the SAs a concentrator ever had (hourly rekeys of 10 000 clients: 175 million a
        year). The quarantine outlasts, by far, any batch classified with the old SA
        (``reorder_hold``, 1 s: a later one is dropped by the reassembler, never sent), so
        no packet of the old SA can meet the new one's keys or sequence numbers."""
        released, quarantined = self._released, self._quarantined
        now = self._clock()
        for _ in range(len(released)):
            since, index = released[0]
            if quarantined.get(index) != since:
                released.popleft()  # taken back by an explicit install meanwhile
                continue
            if since > now - self.quarantine:
                break  # the oldest is still in quarantine, and so are the rest
            released.popleft()
            if index in self._named:
                # A policy still names it (its holder is going, say): not while it does.
                quarantined[index] = now
                released.append((now, index))
                continue
            del quarantined[index]
            return index
        index = self._next_index
        self._next_index += 1
        return index

    def _name(self, policy: Policy | None, step: int) -> None:
        if policy is not None and policy.action is Action.PROTECT:
            count = self._named.get(policy.sa_index, 0) + step
            if count > 0:
                self._named[policy.sa_index] = count
            else:
                self._named.pop(policy.sa_index, None)

    def _publish(self, delta: dict[str, Any]) -> None:
        self.table.version += 1
        delta["v"] = self.table.version
        if self._pending is not None:
            self._pending.append(delta)
        else:
            self.pub.send(encode_message(delta))

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Send the deltas made inside as one message (still one version each): a Child SA
        is an inbound SA, an outbound SA and an SPD change, and one send costs ~100 us."""
        if self._pending is not None:  # inside a batch or a hold: it joins that
            yield
            return
        self.hold()
        try:
            yield
        finally:
            self.release()

    def hold(self) -> None:
        """Keep every delta from now on, until :meth:`release`: the deltas of several IKE
        exchanges go as one message (each message wakes every subscriber's ZeroMQ thread).
        A :meth:`batch` inside a hold joins it."""
        if self._pending is None:
            self._pending = []

    def send_held(self) -> None:
        """Send what is kept now, as one message, and go on holding."""
        if self._pending:
            pending, self._pending = self._pending, []
            self.pub.send(encode_message(pending))

    def release(self) -> None:
        """Send what is kept, as one message, and stop holding."""
        self.send_held()
        self._pending = None

    def install(self, index: int, record: SaRecord) -> None:
        assert self.table.sas is not None
        self._quarantined.pop(index, None)
        self.table.sas[index] = record
        self._next_index = max(self._next_index, index + 1)
        self._publish({"op": "install", "index": index, "sa": encode_record(record)})

    def remove(self, index: int, record: SaRecord | None = None) -> bool:
        """Remove the SA at ``index`` (only if it is ``record``, when given: an index may
        hold another SA by now); its index is quarantined, then reused. Whether it was."""
        assert self.table.sas is not None
        held = self.table.sas.get(index)
        if held is None or (record is not None and held is not record):
            return False
        del self.table.sas[index]
        self._publish({"op": "remove", "index": index})
        now = self._clock()
        self._released.append((now, index))
        self._quarantined[index] = now
        return True

    def set_policies(self, policies: Spd) -> None:
        """Replace the whole SPD: ``policies`` in order, or by rank (smaller first). For a
        change of a few entries, :meth:`edit_policies` sends only them."""
        self.table.policies = ranked(policies)
        self._named = {}
        for policy in self.table.policies.values():
            self._name(policy, 1)
        self._publish({"op": "spd", "policies": _encode_spd(self.table.policies)})

    def edit_policies(self, put: Mapping[int, Policy], removed: Iterable[int] = ()) -> None:
        """Change some SPD entries: ``put`` (new or replacing, by rank) and the ``removed``
        ranks. On a concentrator one Child SA changes one entry of thousands: the delta
        carries that entry, and the subscribers rework only it."""
        policies = self.table.policies
        assert policies is not None
        gone = []
        for rank in removed:
            if rank not in put and (old := policies.pop(rank, None)) is not None:
                gone.append(rank)
                self._name(old, -1)
        for rank, policy in put.items():
            self._name(policies.get(rank), -1)
            self._name(policy, 1)
            policies[rank] = policy
        if put or gone:
            self._publish({"op": "spd-edit", "put": _encode_spd(put), "del": gone})

    def serve_snapshots(self) -> int:
        """Answer every waiting snapshot request; returns how many."""
        served = 0
        while True:
            try:
                frames = self.snapshot_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return served
            if len(frames) >= 2 and frames[-1] == SNAPSHOT_REQUEST:
                self.snapshot_socket.send_multipart([frames[0], b"", self.table.encode()])
                served += 1

    def close(self) -> None:
        self.pub.close(linger=0)
        self.snapshot_socket.close(linger=0)
        for ep in self.endpoints:
            path = ep.removeprefix("ipc://")
            if ep.startswith("ipc://") and os.path.exists(path):
                os.unlink(path)


# -- the data plane's side ----------------------------------------------------------------------

class _Resync(Exception):
    """A delta that cannot be applied to what this subscriber holds."""


class SaSubscriber:
    """Follows the controller's table into ``sink`` (an I/O process's or a worker's)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], pub_endpoint: str,
                 snapshot_endpoint: str, sink: SaSink | DeferringSaSink, *,
                 policies: bool = True) -> None:
        """``policies=False``: the sink has no use for the SPD (a worker), whose deltas
        are then skipped unparsed. A :class:`DeferringSaSink` gets installs undecoded."""
        self.sink = sink
        self.policies = policies
        self._install_encoded = getattr(sink, "install_encoded", None)
        # SPD edits of one drain, merged (encoded): rank -> entry, and ranks removed. The
        # sink gets one edit per drain, not one per Child SA (under IKE load a drain takes
        # a hundred deltas, and most edits give the same entries new SAs).
        self._put: dict[int, Any] = {}
        self._removed: set[int] = set()
        self.version = -1  # nothing applied yet
        self.resyncs = 0
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 100_000)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(pub_endpoint)
        self._ctx = ctx
        self._snapshot_endpoint = snapshot_endpoint

    def sync(self, timeout: float = 5.0) -> None:
        """Fetch a snapshot and apply it plus every newer delta already received.

        Raises ``TimeoutError`` when the controller does not answer in time.
        """
        req = self._ctx.socket(zmq.DEALER)
        req.setsockopt(zmq.LINGER, 0)
        try:
            req.connect(self._snapshot_endpoint)
            req.send_multipart([b"", SNAPSHOT_REQUEST])
            if not req.poll(int(timeout * 1000)):
                raise TimeoutError(f"no SA snapshot from {self._snapshot_endpoint} "
                                   f"within {timeout:g}s")
            frames = req.recv_multipart()
        finally:
            req.close(linger=0)
        snapshot = SaTableSnapshot.decode(frames[-1])
        snapshot.apply_to(self.sink)
        self.version = snapshot.version
        self.resyncs += 1
        self.drain()  # deltas published since: newer ones apply, older ones are skipped

    def pending(self) -> bool:
        """Whether a delta waits on the socket (cheaper than a receive that finds none)."""
        return bool(int(self.sub.getsockopt(zmq.EVENTS)) & zmq.POLLIN)

    def drain(self) -> int:
        """Apply every delta waiting on the socket; returns how many were applied. The SPD
        edits among them reach the sink as one, once the rest is applied (the sink sees
        the SPD of the last delta; no packet is classified in between)."""
        applied = 0
        while True:
            try:
                data = self.sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                self._edit_policies()
                return applied
            try:
                message = decode_message(data)
            except ValueError:
                self._resync()  # not a frame of ours: start again from a snapshot
                return applied
            for delta in message if isinstance(message, list) else (message,):
                version = int(delta["v"])
                if version <= self.version:
                    continue  # already in the snapshot
                if version != self.version + 1:
                    self._resync()  # a gap: lost deltas; start again from a snapshot
                    return applied
                try:
                    self._apply(delta)
                except _Resync:
                    self._resync()
                    return applied
                self.version = version
                applied += 1

    def _resync(self) -> None:
        self._put, self._removed = {}, set()  # the snapshot has what they would have done
        self.sync()

    def _edit_policies(self) -> None:
        """The merged SPD edits of this drain, to the sink."""
        if not self._put and not self._removed:
            return
        put, removed = self._put, self._removed
        self._put, self._removed = {}, set()
        self.sink.edit_policies(_decode_spd([[rank, p] for rank, p in put.items()]),
                                sorted(removed))

    def wait_for(self, version: int, timeout: float = 1.0) -> bool:
        """Block until ``version`` is applied (a batch was classified with it)."""
        deadline = time.monotonic() + timeout
        while self.version < version:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sub.poll(int(left * 1000) + 1):
                return self.version >= version
            self.drain()
        return True

    def _apply(self, delta: dict[str, Any]) -> None:
        op = delta["op"]
        if op == "install":
            if self._install_encoded is not None:
                self._install_encoded(int(delta["index"]), delta["sa"])
            else:
                self.sink.install(int(delta["index"]), decode_record(delta["sa"]))
        elif op == "remove":
            self.sink.remove(int(delta["index"]))
        elif op in ("spd", "spd-edit"):
            if not self.policies:
                return  # this sink has no SPD (a worker)
            if op == "spd":  # the whole SPD: edits merged so far are moot
                self._put, self._removed = {}, set()
                self.sink.set_policies(_decode_spd(delta["policies"]))
            else:
                for rank in delta["del"]:
                    self._put.pop(int(rank), None)
                    self._removed.add(int(rank))
                for rank, policy in delta["put"]:
                    self._put[int(rank)] = policy  # put wins over removed (edit_policies)
                    self._removed.discard(int(rank))
        else:
            raise _Resync  # an operation this subscriber does not know

    def close(self) -> None:
        self.sub.close(linger=0)
