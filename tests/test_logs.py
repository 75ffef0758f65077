"""controller/logs.py: JSON lines that parse and carry the IKE SA's name and id, the text form,
exceptions as one field, and the filter that keeps key material out."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from controller.logs import (
    REDACTED,
    RedactSecrets,
    is_secret_name,
    sa_logger,
    setup_logging,
)

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A log stream, with the root logger restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    yield out
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_ike_sa(stream: io.StringIO) -> None:
    setup_logging("json", "DEBUG", stream)
    log = sa_logger("espline.ike", "site-b", 3)
    log.info("IKE SA %s with %d child", "established", 1, extra={"spi_i": b"\x01\x02\xff"})
    log.debug("retransmit", extra={"tries": 2, "timeout": 1.5, "peer": None})
    first, second = lines(stream)
    assert first["msg"] == "IKE SA established with 1 child"
    assert first["level"] == "INFO" and first["logger"] == "espline.ike"
    assert first["ike"] == "site-b" and first["ike_id"] == 3
    assert first["spi_i"] == "0102ff"
    assert TS.match(str(first["ts"]))
    assert list(first)[:6] == ["ts", "level", "logger", "msg", "ike", "ike_id"]
    assert second["tries"] == 2 and second["timeout"] == 1.5 and second["peer"] is None


def test_json_exception_and_newlines_stay_on_one_line(stream: io.StringIO) -> None:
    setup_logging("json", "INFO", stream)
    log = sa_logger(logging.getLogger("espline.test"), "site\nb", 7)
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("failed:\n%s", "two lines")
    [record] = lines(stream)  # one object, one line, despite the newlines
    assert record["msg"] == "failed:\ntwo lines" and record["ike"] == "site\nb"
    assert isinstance(record["exc"], str)
    assert "Traceback" in record["exc"] and "ValueError: bad\nthing" in record["exc"]


def test_extra_fields_never_override_the_core_ones(stream: io.StringIO) -> None:
    setup_logging("json", "INFO", stream)
    logging.getLogger("espline.x").info("m", extra={"level": "fake", "ts": 0, "ike": "x"})
    [record] = lines(stream)
    assert record["level"] == "INFO" and record["ts"] != 0
    assert record["ike"] == "x"  # an unbound logger may pass ike itself


def test_bound_fields_win_and_bind_adds_more(stream: io.StringIO) -> None:
    setup_logging("json", "INFO", stream)
    log = sa_logger("espline.ike", "site-b", 3)
    log.info("a", extra={"ike": "other", "note": "kept"})
    log.bind(child="lan").warning("b")
    a, b = lines(stream)
    assert a["ike"] == "site-b" and a["note"] == "kept"
    assert b["child"] == "lan" and b["ike_id"] == 3 and b["level"] == "WARNING"


def test_text_lines(stream: io.StringIO) -> None:
    setup_logging("text", "INFO", stream)
    log = sa_logger("espline.ike", "site-b", 3)
    log.info("IKE SA established", extra={"reason": "no proposal", "n": 2, "spi": b"\xab"})
    logging.getLogger("espline.run").warning("plain")
    log.debug("not shown")
    first, second = stream.getvalue().splitlines()
    m = re.match(r"(\S+) INFO espline\.ike: site-b\[3\] IKE SA established (.*)\Z", first)
    assert m and TS.match(m.group(1))
    assert m.group(2) == 'reason="no proposal" n=2 spi=ab'
    assert second.endswith(" WARNING espline.run: plain")


def test_ike_sa_lines_without_keywords_take_the_short_way_alike(
        stream: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """IkeSaLogger makes the records of calls without keywords itself: the same line as
    LoggerAdapter's way, the level honoured, the record factory used, and a bound field
    named like key material still redacted."""
    setup_logging("json", "INFO", stream)
    made: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def recording(*args: object, **kwargs: object) -> logging.LogRecord:
        made.append(factory(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(logging, "_logRecordFactory", recording)
    log = sa_logger("espline.ike", "site-b", 3)
    log.info("CHILD_SA %s{%d} installed", "lan", 7)  # the short way
    log.info("CHILD_SA %s{%d} installed", "lan", 7, extra={})  # LoggerAdapter's
    log.debug("not shown")
    log.bind(psk="hunter2").warning("bound")
    short, general, bound = lines(stream)
    assert short.pop("ts") and general.pop("ts")
    assert short == general == {"level": "INFO", "logger": "espline.ike",
                                "msg": "CHILD_SA lan{7} installed", "ike": "site-b",
                                "ike_id": 3}
    assert len(made) == 3 and made[0].args == ("lan", 7)
    assert bound["psk"] == REDACTED and "hunter2" not in stream.getvalue()
    # Where the caller's frame is wanted (not under setup_logging), it is gathered.
    import os

    monkeypatch.setattr(logging, "_srcfile",
                        os.path.normcase(logging.addLevelName.__code__.co_filename))
    log.info("with its caller")
    assert made[-1].filename == os.path.basename(__file__) and made[-1].lineno > 0


def test_text_exception(stream: io.StringIO) -> None:
    setup_logging("text", "INFO", stream)
    try:
        raise KeyError("k")
    except KeyError:
        sa_logger("espline.ike", "s", 1).exception("oops")
    text = stream.getvalue()
    assert "s[1] oops\nTraceback" in text and "KeyError: 'k'" in text


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_key_material_is_redacted(stream: io.StringIO, fmt: str) -> None:
    setup_logging(fmt, "INFO", stream)
    secrets = {"psk": b"hunter2", "enc_key": b"\x11" * 16, "integ_key": "2222",
               "SK_ei": b"\x33" * 20, "shared_secret": "4444", "private_key": "5555",
               "keymat": b"\x66" * 8, "password": "7777"}
    sa_logger("espline.ike", "site-b", 3).info(
        "child SA installed",
        extra={**secrets, "spi_in": "0xc0ffee01", "config": {"psk": "8888", "name": "lan",
                                                             "inner": {"auth_key": "9999"}}})
    out = stream.getvalue()
    for leaked in ("hunter2", "1111", "2222", "3333", "4444", "5555", "6666", "7777",
                   "8888", "9999"):
        assert leaked not in out, leaked
    assert "0xc0ffee01" in out and "lan" in out
    if fmt == "json":
        [record] = lines(stream)
        assert all(record[k] == REDACTED for k in secrets)
        assert record["config"] == {"psk": REDACTED, "name": "lan",
                                    "inner": {"auth_key": REDACTED}}


def test_redaction_filter_on_any_handler() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    record.__dict__.update(psk="s3cret", spi=5)
    assert RedactSecrets().filter(record)
    assert record.__dict__["psk"] == REDACTED and record.__dict__["spi"] == 5
    assert record.msg == "m"  # the record's own attributes are not extras


@pytest.mark.parametrize(("name", "secret"), [
    ("key", True), ("enc_key", True), ("psk", True), ("PSK", True), ("sk_d", True),
    ("SK_pi", True), ("skeyseed", True), ("client_secret", True), ("passwd", True),
    ("spi", False), ("ike", False), ("ike_id", False), ("nonce_len", False), ("task", False),
])
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_setup_replaces_its_own_handler_only(stream: io.StringIO) -> None:
    root = logging.getLogger()
    other = logging.StreamHandler(io.StringIO())
    root.addHandler(other)
    try:
        first = setup_logging("text", "INFO", stream)
        second = setup_logging("json", logging.WARNING, stream)
        assert first not in root.handlers and second in root.handlers and other in root.handlers
        assert root.level == logging.WARNING
        logging.getLogger("espline.x").warning("once")
        assert len(stream.getvalue().splitlines()) == 1
    finally:
        root.removeHandler(other)


@pytest.mark.parametrize(("fmt", "level"), [("xml", "INFO"), ("text", "LOUD")])
def test_setup_rejects_bad_arguments(fmt: str, level: str) -> None:
    with pytest.raises(ValueError):
        setup_logging(fmt, level)


class Writes(io.StringIO):
    """A stream that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_the_lines_of_one_loop_turn_are_written_together_in_order() -> None:
    """controller/logs.py TurnStreamHandler: two lines logged in one turn of a running loop
    wait for its end, then go with one write; outside a loop a line goes at once, after
    whatever waits; close() writes what waits."""
    stream = Writes()
    handler = setup_logging("text", "INFO", stream)
    log = logging.getLogger("espline.test")
    try:
        log.info("outside a loop")
        assert stream.writes == 1 and stream.getvalue().endswith("outside a loop\n")

        async def turn() -> tuple[int, int]:
            log.info("first")
            log.info("second")
            waiting = stream.writes
            await asyncio.sleep(0)  # the turn ends
            return waiting, stream.writes

        waiting, after = asyncio.run(turn())
        assert (waiting, after) == (1, 2)
        assert [line.rsplit(": ", 1)[1] for line in stream.getvalue().splitlines()] == [
            "outside a loop", "first", "second"]

        async def left_waiting() -> None:
            log.info("third")  # the loop ends before its turn does

        asyncio.run(left_waiting())
        log.info("fourth")  # outside a loop: what waits first, then this, in one write
        assert stream.getvalue().splitlines()[-2:][0].endswith("third")
        assert stream.getvalue().endswith("fourth\n")

        async def at_close() -> None:
            log.info("fifth")
            handler.close()  # (as setup_logging replacing it, or logging.shutdown)

        asyncio.run(at_close())
        assert stream.getvalue().endswith("fifth\n")
    finally:
        logging.getLogger().removeHandler(handler)


@pytest.mark.parametrize("extra", [{}, {"ike": "s", "ike_id": 1}, {"ike": "s", "note": "n"},
                                   {"a": 1, "b": 2}, {"ike": "s", "ike_id": 1, "psk": "x"},
                                   {"ike_id": 1}])
@pytest.mark.parametrize("formatted", [False, True])
def test_extra_names_by_counting_agree_with_the_set_difference(extra: dict[str, object],
                                                               formatted: bool) -> None:
    from controller.logs import _RECORD_ATTRS, _extra_names

    record = logging.getLogger("espline.t").makeRecord("espline.t", logging.INFO, "f", 1,
                                                       "m", (), None, extra=extra)
    if formatted:
        record.message = record.getMessage()  # as a formatter leaves it
        record.asctime = "now"
    fields = vars(record)
    assert _extra_names(fields) == fields.keys() - _RECORD_ATTRS == set(extra)
