"""The CSC's access log (csc/relay/accesslog.py) and the cheap event path it uses (shared/logsetup.py):
the same line as ``logging`` would write, no query string, nothing when disabled."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import string
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csc.relay import accesslog
from shared.logsetup import (
    JsonFormatter,
    TextFormatter,
    configure_logging,
    log_event,
    render_event,
)

RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _record(name: str, level: int, msg: str, fields: dict[str, Any], created: float) -> Any:
    record = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    record.created, record.msecs = created, int((created - int(created)) * 1000)
    record.__dict__.update(fields)
    return record


keys = st.text(string.ascii_lowercase + "_", min_size=1, max_size=10).filter(
    lambda k: k not in RESERVED
)
values = st.one_of(
    st.text(max_size=20),
    st.integers(),
    st.floats(),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.sampled_from(["Bearer abcdefghijkl", "eyJhbGciOi.eyJzdWIiOi.c2ln"]),
)


@pytest.fixture(autouse=True)
def _nothing_left_from_earlier_tests() -> None:
    """Events buffered by an earlier test whose loop closed before their flush go to the
    stream configured then, not into this test's."""
    accesslog.flush()


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(keys, values, max_size=8),
    st.text(max_size=30),
    st.sampled_from(["json", "text"]),
    st.floats(min_value=0, max_value=4e9),
)
def test_render_event_writes_what_the_formatters_write(
    fields: dict[str, Any], msg: str, fmt: str, created: float
) -> None:
    formatter = JsonFormatter("csc") if fmt == "json" else TextFormatter("csc")
    record = _record("csc.access", logging.INFO, msg, fields, created)
    expected = formatter.format(record)
    assert render_event(fmt, "csc", "csc.access", logging.INFO, msg, fields, created=created) == (
        expected
    )


def test_log_event_writes_one_line_to_the_configured_stream() -> None:
    out = io.StringIO()
    configure_logging("info", "csc", stream=out)
    log_event(logging.getLogger("csc.access"), logging.INFO, "GET / -> 200 ok", {"status": 200})
    [line] = out.getvalue().splitlines()
    event = json.loads(line)
    assert event | {"ts": ""} == {
        "ts": "",
        "level": "info",
        "component": "csc",
        "logger": "csc.access",
        "msg": "GET / -> 200 ok",
        "status": 200,
    }


def test_log_event_goes_through_logging_when_another_handler_listens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = io.StringIO()
    configure_logging("info", "csc", stream=out)
    with caplog.at_level(logging.INFO, logger="csc.access"):
        log_event(logging.getLogger("csc.access"), logging.INFO, "a % sign", {"status": 404})
    [record] = caplog.records
    assert record.getMessage() == "a % sign" and record.__dict__["status"] == 404
    assert json.loads(out.getvalue())["msg"] == "a % sign"


def test_log_event_respects_a_filter() -> None:
    out = io.StringIO()
    configure_logging("info", "csc", stream=out)
    logger = logging.getLogger("csc.access.filtered")
    logger.addFilter(lambda record: False)
    try:
        log_event(logger, logging.INFO, "dropped", {})
    finally:
        logger.filters.clear()
    assert out.getvalue() == ""


# --- the access log -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/v1/logon", "/v1/logon"),
        ("/get/?token=s3cret&x=1", "/get/"),
        ("/a#frag?x", "/a"),
        ("/?", "/"),
        ("/p%3Fq", "/p%3Fq"),
    ],
)
def test_the_path_never_keeps_a_query_string(target: str, path: str) -> None:
    assert accesslog.path_only(target) == path


def test_one_event_per_request_with_its_fields() -> None:
    out = io.StringIO()
    configure_logging("info", "csc", stream=out)
    record = accesslog.RequestRecord(
        "http", "r" * 32, "198.51.100.7:5000", time.monotonic(), "acme@example.com"
    )
    record.method, record.path, record.status = "POST", "/v1/logon", 401
    record.bytes_in, record.bytes_out = 120, 80
    assert accesslog.enabled(True)
    accesslog.request_done(record, "acme", "ok")
    event = json.loads(out.getvalue())
    assert event["msg"] == "POST /t/acme@example.com/v1/logon -> 401 ok"
    assert {k: event[k] for k in ("request_id", "tenant", "kind", "status", "bytes_in")} == {
        "request_id": "r" * 32,
        "tenant": "acme",
        "kind": "http",
        "status": 401,
        "bytes_in": 120,
    }
    assert event["duration_ms"] >= 0 and event["client"] == "198.51.100.7:5000"


def test_a_refused_tcp_connection_has_its_err_status() -> None:
    out = io.StringIO()
    configure_logging("info", "csc", stream=out, fmt="text")
    record = accesslog.RequestRecord("tcp", "t" * 32, "?", time.monotonic(), "acme@example.com")
    record.status = 429
    accesslog.request_done(record, "acme", "rate_limited")
    assert "csc.access: CONNECT acme@example.com -> 429 rate_limited" in out.getvalue()


def test_disabled_by_the_setting_or_the_level() -> None:
    configure_logging("warning", "csc", stream=io.StringIO())
    assert not accesslog.enabled(True)
    configure_logging("info", "csc", stream=io.StringIO())
    assert accesslog.enabled(True) and not accesslog.enabled(False)


def _entry_record(status: int | None, kind: str, path: str) -> accesslog.RequestRecord:
    record = accesslog.RequestRecord(kind, "q" * 32, "[::1]:7", time.monotonic(), 'a"é@x.org')
    record.method, record.path, record.status = "GET", path, status
    record.bytes_in, record.bytes_out = 3, 1 << 40
    return record


@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest.mark.parametrize(
    ("status", "kind", "path", "tenant"),
    [
        (200, "http", "/x\ny", "acme"),
        (None, "tcp", "", ""),
        (503, "http", "/Bearer abcdefghij", ""),
    ],
)
def test_the_preformatted_line_is_the_line_logging_writes(
    fmt: str, status: int | None, kind: str, path: str, tenant: str
) -> None:
    entry = (time.time(), 12.5, kind, "q" * 32, "[::1]:7", 'a"é@x.org', "GET", path, status)
    entry += (3, 1 << 40, tenant, "ok")
    fast, reference = io.StringIO(), io.StringIO()
    configure_logging("info", "csc", stream=fast, fmt=fmt)
    accesslog._pending.append(entry)
    accesslog.flush()
    configure_logging("info", "csc", stream=reference, fmt=fmt)
    logging.getLogger().handlers[-1].addFilter(lambda record: True)  # not ours alone now
    accesslog._pending.append(entry)
    accesslog.flush()  # so through logging.LogRecord and the formatter, with the entry's time
    assert fast.getvalue() == reference.getvalue()
    assert "abcdefghij" not in fast.getvalue() and fast.getvalue().count("\n") >= 1


async def test_in_a_loop_events_are_buffered_then_written_together() -> None:
    out = io.StringIO()
    configure_logging("info", "csc", stream=out)
    for _ in range(3):
        accesslog.request_done(_entry_record(200, "http", "/a"), "acme", "ok")
    assert out.getvalue() == ""  # off the request path
    deadline = time.monotonic() + 10
    while out.getvalue().count("\n") < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert [json.loads(line)["path"] for line in out.getvalue().splitlines()] == ["/a"] * 3


async def test_flush_writes_what_is_buffered_and_a_full_buffer_writes_at_once() -> None:
    out = io.StringIO()
    configure_logging("info", "csc", stream=out)
    accesslog.request_done(_entry_record(200, "http", "/b"), "acme", "ok")
    accesslog.flush()  # at exit (atexit) or by hand: nothing stays behind
    assert out.getvalue().count("\n") == 1
    for _ in range(accesslog.MAX_BATCH):
        accesslog.request_done(_entry_record(200, "http", "/c"), "acme", "ok")
    assert out.getvalue().count("\n") == 1 + accesslog.MAX_BATCH


async def test_a_flush_due_on_a_loop_that_ended_is_due_again_on_the_next() -> None:
    """Events buffered on a loop that ended before its flush (a test's, or a restart's)
    are written by a flush due on the loop that runs now."""
    out = io.StringIO()
    configure_logging("info", "csc", stream=out)

    async def one_event() -> None:
        accesslog.request_done(_entry_record(200, "http", "/gone"), "acme", "ok")

    await asyncio.to_thread(asyncio.run, one_event())  # its loop ends, the flush never ran
    assert out.getvalue() == ""
    accesslog.request_done(_entry_record(200, "http", "/now"), "acme", "ok")
    deadline = time.monotonic() + 10
    while out.getvalue().count("\n") < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert [json.loads(line)["path"] for line in out.getvalue().splitlines()] == ["/gone", "/now"]
