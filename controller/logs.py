"""Logging setup: text or JSON lines, each line of an IKE SA bound to the SA's name and unique
id, and a filter that keeps key material out of the logs (DESIGN §6, Observability).

Text::

    2024-05-01T12:00:00.123Z INFO espline.ike: site-b[3] IKE SA established spi_i=...

JSON, one object per line::

    {"ts":"2024-05-01T12:00:00.123Z","level":"INFO","logger":"espline.ike",
     "msg":"IKE SA established","ike":"site-b","ike_id":3,"spi_i":"..."}

Fields passed with ``extra=`` appear as ``key=value`` in text and as members in JSON; an
exception is one string field (``exc``). Any field named like key material (``key``,
``secret``, ``psk``, ``password``, ``SK_*``, ``keymat``, ``skeyseed``, ``private``) is replaced by
``<redacted>``, inside nested mappings too.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import ipaddress
import json
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from enum import Enum
from typing import IO, Any

__all__ = [
    "REDACTED",
    "IkeSaLogger",
    "JsonFormatter",
    "RedactSecrets",
    "TextFormatter",
    "TurnStreamHandler",
    "is_secret_name",
    "sa_logger",
    "setup_logging",
]

REDACTED = "<redacted>"
_SECRET_NAME = re.compile(r"key|secret|psk|passw|^sk_|skeyseed|keymat|private|credential",
                          re.IGNORECASE)
# Every attribute a LogRecord has by itself (this Python's), so the rest are ``extra`` fields.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName",
}
_BOUND = ("ike", "ike_id")
_BOUND_SET = frozenset(_BOUND)
_NO_EXTRAS: frozenset[str] = frozenset()
_RECORD_LEN = len(vars(logging.LogRecord("", 0, "", 0, "", (), None)))


def _extra_names(fields: dict[str, Any]) -> frozenset[str] | set[str]:
    """The ``extra`` fields of a record (``vars(record)``). Most lines are an IKE SA's with
    its bound fields only, or a plain one: told apart by counting (a set difference over
    twenty names costs a microsecond, and each line needs it twice)."""
    n = len(fields) - ("message" in fields) - ("asctime" in fields)
    if n == _RECORD_LEN:
        return _NO_EXTRAS
    if n == _RECORD_LEN + 2 and "ike" in fields and "ike_id" in fields:
        return _BOUND_SET
    return fields.keys() - _RECORD_ATTRS


@functools.lru_cache(maxsize=1024)  # field names come from the code: a handful, met often
def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def _redact(value: object) -> object:
    if isinstance(value, Mapping):
        return {k: REDACTED if isinstance(k, str) and is_secret_name(k) else _redact(v)
                for k, v in value.items()}
    return value


class RedactSecrets(logging.Filter):
    """Replaces ``extra`` fields named like key material by ``<redacted>`` before any
    formatter sees them. It cannot see secrets interpolated into the message itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = vars(record)
        names = _extra_names(fields)
        if names <= _BOUND_SET:
            return True  # an IKE SA's line with no fields of its own (most lines)
        for name in names:
            if is_secret_name(name):
                fields[name] = REDACTED
            elif isinstance(fields[name], Mapping):
                fields[name] = _redact(fields[name])
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}


def _timestamp(record: logging.LogRecord) -> str:
    created = record.created
    if created < 0:
        t = datetime.datetime.fromtimestamp(created, tz=datetime.UTC)
        return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    # What datetime.fromtimestamp(created).isoformat(timespec="milliseconds") gives, with
    # the part up to the second formatted once per second: the microseconds are rounded
    # half to even as fromtimestamp rounds them, then cut to milliseconds as isoformat does.
    second = int(created)
    micros = round((created - second) * 1e6)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    return f"{_second_text(second)}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=4)
def _second_text(second: int) -> str:
    t = datetime.datetime.fromtimestamp(second, tz=datetime.UTC)
    return t.isoformat(timespec="seconds").replace("+00:00", "")


def _plain(value: object) -> object:
    """A JSON-able form of values logs commonly carry."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address
                  | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger>: [<ike>[<ike_id>] ]<message>[ key=value ...]``, then the
    traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        fields = vars(record)
        extra_names = _extra_names(fields)
        prefix = ""
        if "ike" in extra_names:
            ike, ike_id = fields["ike"], fields.get("ike_id")
            prefix = f"{ike}[{ike_id}] " if ike_id is not None else f"{ike} "
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {prefix}{record.message}"
        shown = extra_names - _BOUND_SET
        if shown:  # fields beyond the bound ones, in the record's order
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items()
                                   if k in shown)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _text_value(value: object) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, int | float | bool) or value is None:
        return str(value)
    else:
        plain = _plain(value)
        text = plain if isinstance(plain, str) else json.dumps(plain, default=_plain)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, then ``ike`` and
    ``ike_id`` when bound, the ``extra`` fields, and ``exc``/``stack`` as strings."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extras = _extras(record)
        for name in _BOUND:
            if name in extras:
                obj[name] = extras.pop(name)
        for k, v in extras.items():
            obj.setdefault(k, v)  # an extra never overrides the fields above
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            obj["exc"] = record.exc_text
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        # json.dumps escapes control characters, so the object stays on one line.
        return json.dumps(obj, default=_plain, ensure_ascii=False, separators=(",", ":"))


class IkeSaLogger(logging.LoggerAdapter[logging.Logger]):
    """Binds ``ike`` (the IKE SA's connection name) and ``ike_id`` (its unique id) to every
    record, keeping the call's own ``extra`` fields (the bound ones win)."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if kwargs or logging._srcfile:
            # exc_info, extra, stacklevel..., or the caller's frame wanted (setup_logging
            # turns that off): LoggerAdapter's way, the caller being this method's caller
            kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1
            super().log(level, msg, *args, **kwargs)
            return
        logger = self.logger
        if not logger.isEnabledFor(level):
            return
        # Every IKE SA logs a few lines: the record is made here, as Logger._log makes it
        # without the caller's frame (setup_logging does not gather it), with the bound
        # fields set as ``extra`` would set them; four calls fewer a line.
        record = logging.getLogRecordFactory()(logger.name, level, "(unknown file)", 0, msg,
                                               args, None, "(unknown function)", None)
        if self.extra:
            vars(record).update(self.extra)
        logger.handle(record)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]
                ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(kwargs.get("extra") or {}), **(self.extra or {})}
        return msg, kwargs

    def bind(self, **fields: object) -> IkeSaLogger:
        """A logger with more bound fields (e.g. ``child="lan"``)."""
        return IkeSaLogger(self.logger, {**(self.extra or {}), **fields})


def sa_logger(base: logging.Logger | str, ike_name: str, ike_id: int) -> IkeSaLogger:
    """The logger of one IKE SA: ``sa_logger("espline.ike", "site-b", 3)``."""
    logger = logging.getLogger(base) if isinstance(base, str) else base
    return IkeSaLogger(logger, {"ike": ike_name, "ike_id": ike_id})


class TurnStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A ``StreamHandler`` that writes the lines of one asyncio loop turn with one write.

    Under load the controller logs a few lines per IKE SA set up, several SAs per loop turn,
    and each write is a system call (stderr is line-buffered) that also wakes whatever reads
    the pipe; batched, a few us per setup less here. Lines logged on a thread with a running
    loop wait for the end of its turn (a ``call_soon``: microseconds, no I/O in between); on
    any other thread, or with no loop, they are written at once, after whatever waits (so
    the order holds). ``flush`` and ``close`` (``logging.shutdown`` at exit) write what
    waits."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._turn: asyncio.AbstractEventLoop | None = None  # the loop whose turn waits

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # as StreamHandler.emit: a bad record must not stop the caller
            self.handleError(record)
            return
        self._lines.append(line)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            self._write()
        elif self._turn is not loop:
            # The turn's first line (or a loop that ended before its turn did: its lines
            # go with this turn's).
            self._turn = loop
            loop.call_soon(self._end_turn, loop)

    def _end_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        self.acquire()
        try:
            if self._turn is loop:
                self._turn = None
                self._write()
        finally:
            self.release()

    def _write(self) -> None:
        """Write and flush every waiting line (the caller holds the handler's lock)."""
        if not self._lines:
            return
        text = self.terminator.join(self._lines) + self.terminator
        self._lines.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # as StreamHandler.emit: a full disk must not stop the caller
            self.handleError(logging.LogRecord("espline", logging.ERROR, "", 0, text, (),
                                               None))

    def flush(self) -> None:
        self.acquire()
        try:
            self._turn = None
            self._write()
        finally:
            self.release()
        super().flush()

    def close(self) -> None:
        self.flush()  # (setup_logging closes the handler it replaces without a flush)
        super().close()


def setup_logging(format: str = "text", level: int | str = "INFO",
                  stream: IO[str] | None = None) -> logging.Handler:
    """Configure the root logger: one handler on ``stream`` (stderr) with the text or JSON
    formatter and the redaction filter. Calling it again replaces the handler it installed
    before (other handlers are left alone). Returns the handler."""
    if format not in ("text", "json"):
        raise ValueError(f"log format {format!r}: expected 'text' or 'json'")
    if isinstance(level, str):
        levels = logging.getLevelNamesMapping()
        if level.upper() not in levels:
            raise ValueError(f"log level {level!r}: expected one of {', '.join(levels)}")
        level = levels[level.upper()]
    # No record field our formatters leave out is gathered (the logging HOWTO's
    # "Optimization"): the caller's frame, thread, process and multiprocessing names cost a
    # fifth of a line, and the daemon logs a few lines per IKE SA.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_espline", False)]:
        root.removeHandler(old)
        old.close()
    handler = TurnStreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    handler.addFilter(RedactSecrets())
    handler._espline = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    return handler
