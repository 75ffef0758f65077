"""The VICI admin socket: an asyncio Unix-socket server around ``protocol`` and ``commands``.

One task per client connection reads packets and answers them in order (VICI §Commands:
"only one command can be active at a time on a single connection"). Events go only to the
connections registered for them: the streams of a command (``list-sa``, ``list-conn``,
``control-log``) to the connection that asked, ``publish``ed ones (``ike-updown``,
``child-updown``, ``ike-rekey``, ``child-rekey``, ``log``) to every registered connection.

A client that breaks the framing is disconnected (there is no way to resynchronize a
stream); a command that fails is answered ``success = no``, never with a dropped connection.
Request contents are never logged: ``load-shared`` carries secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from pathlib import Path
from types import TracebackType

from .commands import KNOWN_EVENTS, Backend, Commands
from .protocol import (
    EncodableSection,
    FrameDecoder,
    Packet,
    PacketType,
    ViciProtocolError,
    encode_packet,
)

__all__ = ["MAX_EVENT_BACKLOG", "ViciServer", "ViciServerError"]

_log = logging.getLogger(__name__)

_READ_SIZE = 64 * 1024
# A registered client that stops reading must not make us buffer events without bound:
# past this many unsent bytes (16 maximum-size segments) it is disconnected.
MAX_EVENT_BACKLOG = 16 * 512 * 1024


class ViciServerError(OSError):
    """The socket cannot be set up (path in use by a live daemon, or not a socket)."""


class _Connection:
    """One client: its writer and the events it registered for."""

    __slots__ = ("events", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.events: set[str] = set()

    def send(self, data: bytes) -> bool:
        """Queue ``data``; False (and the connection closed) if the client is not reading."""
        if self.writer.is_closing():
            return False
        transport = self.writer.transport
        if transport.get_write_buffer_size() + len(data) > MAX_EVENT_BACKLOG:
            _log.warning("vici client is not reading its events: disconnected")
            self.writer.close()
            return False
        self.writer.write(data)
        return True

    def emit(self, event: str, message: EncodableSection) -> None:
        if event in self.events:
            self.send(encode_packet(PacketType.EVENT, event, message))


def _socket_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class ViciServer:
    """Serves VICI on the Unix socket ``path`` for ``backend``; use ``async with`` or
    ``start()``/``close()``."""

    def __init__(self, path: str | os.PathLike[str], backend: Backend, mode: int = 0o660,
                 *, commands: Commands | None = None) -> None:
        self.path = Path(path)
        self.mode = mode
        self.commands = commands if commands is not None else Commands(backend)
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._connections: dict[_Connection, asyncio.Task[None]] = {}

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, self.mode)
        self._inode = self.path.stat().st_ino
        _log.info("vici socket listening on %s", self.path)

    def _remove_stale(self) -> None:
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ViciServerError(errno.EEXIST, "exists and is not a socket", str(self.path))
        if _socket_in_use(self.path):
            raise ViciServerError(errno.EADDRINUSE, "another daemon answers on it",
                                  str(self.path))
        _log.info("removing stale vici socket %s", self.path)
        self.path.unlink()

    async def close(self) -> None:
        """Stop listening, end every connection and remove the socket file."""
        if self._server is not None:
            self._server.close()
        current = asyncio.current_task()  # close() may be called from a command's handler
        tasks = [task for task in self._connections.values() if task is not current]
        for conn, task in list(self._connections.items()):
            conn.writer.close()
            if task is not current:
                task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            # Only our own socket: a newer daemon may have taken the path over.
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()
        self._inode = None

    async def __aenter__(self) -> ViciServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def listeners(self, event: str) -> int:
        """Connections registered for ``event``: skip building an event nobody will get."""
        return sum(event in conn.events for conn in self._connections)

    def publish(self, event: str, message: EncodableSection) -> int:
        """Send ``event`` to every connection registered for it; returns how many got it."""
        data = encode_packet(PacketType.EVENT, event, message)
        return sum(conn.send(data) for conn in list(self._connections) if event in conn.events)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(writer)
        task = asyncio.current_task()
        assert task is not None
        self._connections[conn] = task
        decoder = FrameDecoder()
        try:
            while data := await reader.read(_READ_SIZE):
                decoder.receive_data(data)
                while (packet := decoder.next_packet()) is not None:
                    await self._handle(conn, packet)
                    await writer.drain()
        except ViciProtocolError as exc:
            _log.warning("vici client broke the protocol, disconnected: %s", exc.reason)
        except ConnectionError:
            pass
        finally:
            del self._connections[conn]
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _handle(self, conn: _Connection, packet: Packet) -> None:
        # VICI §Packet layer / §Commands / §Events
        if packet.type is PacketType.CMD_REQUEST:
            assert packet.name is not None
            _log.debug("vici command %s", packet.name)
            response = await self.commands.handle(packet.name, packet.message, conn.emit)
            if response is None:
                conn.send(encode_packet(PacketType.CMD_UNKNOWN))
                return
            try:
                data = encode_packet(PacketType.CMD_RESPONSE, message=response)
            except ValueError as exc:  # the backend returned what VICI cannot carry
                _log.error("vici %s: response not encodable: %s", packet.name, exc)
                data = encode_packet(PacketType.CMD_RESPONSE, message={
                    "success": "no", "errmsg": f"response not encodable: {exc}"})
            conn.send(data)
        elif packet.type in (PacketType.EVENT_REGISTER, PacketType.EVENT_UNREGISTER):
            assert packet.name is not None
            if packet.name not in KNOWN_EVENTS:
                conn.send(encode_packet(PacketType.EVENT_UNKNOWN))
                return
            if packet.type is PacketType.EVENT_REGISTER:
                conn.events.add(packet.name)
            else:
                conn.events.discard(packet.name)
            conn.send(encode_packet(PacketType.EVENT_CONFIRM))
        else:
            raise ViciProtocolError(f"a client does not send {packet.type.name}")
