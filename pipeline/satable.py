"""SA records as the data plane sees them: the contract from the controller to the data plane.

A record is immutable and carries keys; its repr never shows them (key material must not reach
logs). The controller (or a ``static_sas`` config section) creates records; the workers turn
them into runtime state (workers/sa.py).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import IntEnum

__all__ = ["Direction", "Mode", "Protocol", "SaRecord", "SaRecordError", "UdpEncap"]

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class SaRecordError(ValueError):
    """An SA record that cannot be installed; the message names the field and the reason."""


class Direction(IntEnum):
    IN = 0
    OUT = 1


class Protocol(IntEnum):
    """IPsec protocols by IP protocol number (IANA)."""

    ESP = 50
    AH = 51


class Mode(IntEnum):
    TUNNEL = 1
    TRANSPORT = 2


@dataclass(frozen=True)
class UdpEncap:
    """RFC 3948 UDP encapsulation: our port and the peer's port (both 4500 without NAT)."""

    local_port: int = 4500
    remote_port: int = 4500


# RFC 4303 §3.4.3: a window of at least 32 MUST be supported; 64 is the default. Windows
# are kept as a power-of-two ring of bits, so sizes are capped to keep that ring small.
MIN_REPLAY_WINDOW = 32
MAX_REPLAY_WINDOW = 1 << 16


@dataclass(frozen=True)
class SaRecord:
    spi: int
    direction: Direction
    alg: str  # strongSwan keyword: "aes128gcm16", "aes128-sha256", AH: "sha256"
    local_addr: IpAddress
    remote_addr: IpAddress
    protocol: Protocol = Protocol.ESP
    mode: Mode = Mode.TUNNEL
    enc_key: bytes = field(default=b"", repr=False)  # AEAD: key || 4-byte salt
    integ_key: bytes = field(default=b"", repr=False)
    esn: bool = False
    replay_window: int = 64  # inbound only; 0 disables anti-replay (RFC 4303 §3.4.3)
    encap: UdpEncap | None = None
    tfc_pad: int = 0  # outbound tunnel mode: pad inner packets up to this length (RFC 4303 §2.7)
    name: str = ""

    def __post_init__(self) -> None:
        if not 256 <= self.spi <= 0xFFFFFFFF:
            # RFC 4303 §2.1: SPIs 1-255 are reserved by IANA, 0 is local-only.
            raise SaRecordError(f"spi: {self.spi:#x} is not in 0x100..0xffffffff")
        if type(self.local_addr) is not type(self.remote_addr):
            raise SaRecordError("local_addr/remote_addr: address families differ")
        if self.replay_window and not (
            MIN_REPLAY_WINDOW <= self.replay_window <= MAX_REPLAY_WINDOW
        ):
            raise SaRecordError(
                f"replay_window: {self.replay_window} is outside "
                f"{MIN_REPLAY_WINDOW}..{MAX_REPLAY_WINDOW} (0 disables it)"
            )
        if self.protocol is Protocol.AH and self.encap is not None:
            raise SaRecordError("encap: AH cannot be UDP-encapsulated (RFC 3948 covers ESP)")
        if not 0 <= self.tfc_pad <= 9000:
            raise SaRecordError(f"tfc_pad: {self.tfc_pad} is outside 0..9000")
        for port_name in ("local_port", "remote_port"):
            port = getattr(self.encap, port_name, 1)
            if not 1 <= port <= 65535:
                raise SaRecordError(f"encap.{port_name}: {port} is not a UDP port")

    @property
    def ipv6(self) -> bool:
        return self.local_addr.version == 6
