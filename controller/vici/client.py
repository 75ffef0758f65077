"""A small synchronous VICI client over a plain Unix socket, for the admin CLI and tests.

Every failure to talk to the daemon (no socket, permission denied, refused, closed, timed
out, or an answer that is not VICI) is one ``ViciClientError`` whose text is a one-line
explanation for an operator.
"""

from __future__ import annotations

import errno
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from urllib.parse import urlparse

from .protocol import (
    EncodableSection,
    FrameDecoder,
    Packet,
    PacketType,
    Section,
    ViciProtocolError,
    encode_packet,
)

__all__ = ["DEFAULT_TIMEOUT", "ViciClient", "ViciClientError", "socket_path"]

DEFAULT_TIMEOUT = 60.0  # seconds without a byte from the daemon before giving up
_READ_SIZE = 64 * 1024


class ViciClientError(Exception):
    """The daemon could not be reached or answered wrongly; ``str()`` is one line."""


def socket_path(uri: str) -> str:
    """The filesystem path of ``unix:///path`` (a bare path is taken as it is)."""
    if "://" not in uri:
        return uri
    parsed = urlparse(uri)
    if parsed.scheme != "unix":
        raise ViciClientError(f"unsupported admin socket URI {uri!r}: use unix:///path")
    path = parsed.netloc + parsed.path
    if not path:
        raise ViciClientError(f"admin socket URI {uri!r} has no path")
    return path


def _explain(path: str, exc: OSError) -> str:
    reasons = {
        errno.ENOENT: "no such file (is `espline run` running?)",
        errno.EACCES: "permission denied (run as root or as a member of the socket's group)",
        errno.EPERM: "permission denied (run as root or as a member of the socket's group)",
        errno.ECONNREFUSED: "connection refused (a stale socket: is `espline run` running?)",
        errno.ENOTSOCK: "not a socket",
    }
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return f"cannot reach the espline admin socket {path}: {reason}"


class ViciClient:
    """One connection to a VICI server; ``timeout`` bounds each wait for the daemon."""

    def __init__(self, uri: str, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.path = socket_path(uri)
        self._decoder = FrameDecoder()
        self._pending: deque[tuple[str, Section]] = deque()  # events met while registering
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._timeout = timeout
        try:
            self._sock.connect(self.path)
        except OSError as exc:
            self._sock.close()
            raise ViciClientError(_explain(self.path, exc)) from None

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ViciClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- packets ---------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise ViciClientError(f"lost the admin socket {self.path}: {exc}") from None

    def _receive(self) -> Packet:
        try:
            while (packet := self._decoder.next_packet()) is None:
                data = self._sock.recv(_READ_SIZE)
                if not data:
                    raise ViciClientError(f"the daemon closed the admin socket {self.path}")
                self._decoder.receive_data(data)
        except TimeoutError:
            raise ViciClientError(f"no answer from the daemon within {self._timeout:g}s") from None
        except ViciProtocolError as exc:
            raise ViciClientError(f"bad answer from the daemon: {exc.reason}") from None
        except OSError as exc:
            raise ViciClientError(f"lost the admin socket {self.path}: {exc}") from None
        return packet

    def _register(self, event: str, register: bool = True) -> None:
        kind = PacketType.EVENT_REGISTER if register else PacketType.EVENT_UNREGISTER
        self._send(encode_packet(kind, event))
        while (packet := self._receive()).type is PacketType.EVENT:
            if packet.name is not None:  # an earlier registration's: kept for listen()
                self._pending.append((packet.name, packet.message))
        if packet.type is PacketType.EVENT_UNKNOWN:
            raise ViciClientError(f"the daemon has no event {event!r}")
        if packet.type is not PacketType.EVENT_CONFIRM:
            raise ViciClientError(f"unexpected {packet.type.name} to {kind.name} {event!r}")

    # -- API -------------------------------------------------------------------------------

    def request(self, command: str, message: EncodableSection | None = None) -> Section:
        """Send ``command`` and return its response (``success``/``errmsg`` untouched)."""
        return self._request(command, message, None)[1]

    def streamed(self, command: str, message: EncodableSection | None, event: str,
                 on_event: Callable[[Section], None] | None = None,
                 ) -> tuple[list[Section], Section]:
        """``command`` with its ``event`` stream: (the events in order, the response).

        ``on_event`` sees each event as it arrives (for progress output).
        """
        self._register(event)
        try:
            return self._request(command, message, event, on_event)
        finally:
            self._register(event, register=False)

    def _request(self, command: str, message: EncodableSection | None, event: str | None,
                 on_event: Callable[[Section], None] | None = None,
                 ) -> tuple[list[Section], Section]:
        self._send(encode_packet(PacketType.CMD_REQUEST, command, message))
        events: list[Section] = []
        while True:
            packet = self._receive()
            if packet.type is PacketType.EVENT:
                if packet.name == event:
                    events.append(packet.message)
                    if on_event is not None:
                        on_event(packet.message)
            elif packet.type is PacketType.CMD_RESPONSE:
                return events, packet.message
            elif packet.type is PacketType.CMD_UNKNOWN:
                raise ViciClientError(f"the daemon does not know the command {command!r}")
            else:
                raise ViciClientError(f"unexpected {packet.type.name} to {command!r}")

    def listen(self, events: Sequence[str]) -> Iterator[tuple[str, Section]]:
        """Register for ``events`` and yield (name, message) as they come, until closed."""
        for event in events:
            self._register(event)
        while self._pending:
            yield self._pending.popleft()
        while True:
            packet = self._receive()
            if packet.type is PacketType.EVENT and packet.name is not None:
                yield packet.name, packet.message
