"""What an ``IkeSa`` reports (``next_event()``), and its read-only view of Child SAs.

Every Child SA reported by ``ChildSaEstablished`` (or as ``ChildSaRekeyed.new``) is reported
once by ``ChildSaDeleted`` when it is gone, whatever the reason: a Delete exchange, the
peer's Delete, its hard lifetime, or the end of the IKE SA (then before ``IkeSaClosed`` or
``IkeSaFailed``). Rekeying is make-before-break (DESIGN §5): the new SA is reported as soon
as its keys are known; the old one stays until its own ``ChildSaDeleted``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.satable import Mode
from workers.algorithms import EspTransform

from .child_state import ChildState
from .payloads import TrafficSelector

__all__ = [
    "ChildSaDeleted",
    "ChildSaEstablished",
    "ChildSaFailed",
    "ChildSaInfo",
    "ChildSaRekeyed",
    "Event",
    "IkeSaClosed",
    "IkeSaEstablished",
    "IkeSaFailed",
    "IkeSaRekeyed",
]


@dataclass(frozen=True)
class IkeSaEstablished:
    name: str
    spi_i: bytes
    spi_r: bytes
    initiator: bool
    nat_local: bool  # our side is behind a NAT (RFC 7296 §2.23)
    nat_remote: bool
    encap: bool = False  # UDP encapsulation: a NAT was detected (or faked, force_encap)


@dataclass(frozen=True, eq=False)
class ChildSaEstablished:
    name: str
    mode: Mode
    transform: EspTransform
    esn: bool
    spi_in: int
    spi_out: int
    enc_key_in: bytes = field(repr=False)
    integ_key_in: bytes = field(repr=False)
    enc_key_out: bytes = field(repr=False)
    integ_key_out: bytes = field(repr=False)
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    encap: bool  # UDP encapsulation, because a NAT was detected (or faked)
    # RFC 3948: the UDP ports of ESP-in-UDP when ``encap``: ours (the NAT-T port) and the
    # peer's source port of its last IKE message on the NAT-T port (a NAT may map it).
    local_port: int = 4500
    remote_port: int = 4500


@dataclass(frozen=True)
class ChildSaRekeyed:
    """A rekey (RFC 7296 §1.3.3) created ``new`` to replace the SA with these SPIs. The old
    SA keeps receiving until its ``ChildSaDeleted``; outbound moves to ``new``."""

    name: str
    old_spi_in: int
    old_spi_out: int
    new: ChildSaEstablished
    # We started the rekey: the peer installed ``new``'s inbound side before answering, so
    # outbound may move now. As the responder, outbound should stay on the old SA until the
    # initiator deletes it (its inbound side of ``new`` exists only once it has our answer).
    initiator: bool = True


@dataclass(frozen=True)
class ChildSaDeleted:
    name: str
    spi_in: int
    spi_out: int


@dataclass(frozen=True)
class ChildSaFailed:
    """A Child SA was not created, in IKE_AUTH or CREATE_CHILD_SA; the IKE SA stands."""

    name: str
    reason: str
    notify: int | None = None


@dataclass(frozen=True)
class IkeSaRekeyed:
    """The connection's IKE SA was replaced (RFC 7296 §2.18): from now on its SPIs are
    ``spi_i``/``spi_r``; the old ones are answered until the old IKE SA is deleted (see
    ``IkeSa.local_spis``)."""

    name: str
    old_spi_i: bytes
    old_spi_r: bytes
    spi_i: bytes
    spi_r: bytes


@dataclass(frozen=True)
class IkeSaFailed:
    """The IKE SA is gone (state FAILED): refused, unauthenticated, dead peer, half-open."""

    name: str
    reason: str
    notify: int | None = None


@dataclass(frozen=True)
class IkeSaClosed:
    name: str
    by_peer: bool


Event = (
    IkeSaEstablished
    | ChildSaEstablished
    | ChildSaRekeyed
    | ChildSaDeleted
    | ChildSaFailed
    | IkeSaRekeyed
    | IkeSaFailed
    | IkeSaClosed
)


@dataclass(frozen=True)
class ChildSaInfo:
    """One current Child SA as ``IkeSa.child_sas`` shows it (no keys)."""

    name: str
    state: ChildState
    spi_in: int
    spi_out: int
    transform: EspTransform
    esn: bool
    mode: Mode
    encap: bool
    local_port: int
    remote_port: int
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    established: float  # the ``now`` its keys became known
    rekey_at: float | None  # when our rekey timer fires (jittered), if any
    expire_at: float | None  # its hard lifetime, if any
