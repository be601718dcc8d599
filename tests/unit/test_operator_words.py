"""The words and numbers operators read: log format on a terminal, bind and connect
errors in words, one time format, plurals and swapped arguments, the agent's reconnect summary
and portal URLs, the demo's commands, and the node's bounded traffic history."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pty
import re
from pathlib import Path

import pytest

from csc.admin.cli import _looks_swapped, plural
from csc.admin.errorlog import ErrorLog
from csc.relay.traffic import BUCKET_SECONDS, POINTS, LastSeen, TrafficHistory
from demo.__main__ import try_lines
from shared.logsetup import configure_logging, resolve_format
from shared.oserrors import describe_connect_error, describe_os_error
from shared.timefmt import iso, with_iso_times
from tenant_agent.agent import Outage, portal_urls

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- item 3 --------------------------------------------------------------------------------------


def test_auto_log_format_is_text_on_a_terminal_and_json_elsewhere() -> None:
    master, terminal = pty.openpty()
    try:
        with open(terminal, "w", closefd=False) as stream:
            assert resolve_format("auto", stream) == "text"
            configure_logging("info", "csc", stream=stream)  # auto is the default
            logging.getLogger("csc.test").info("hello %s", "there", extra={"tenant": "acme"})
            stream.flush()
        line = os.read(master, 4096).decode().splitlines()[0]
    finally:
        os.close(master)
        os.close(terminal)
    assert re.fullmatch(r"\S+Z INFO csc csc\.test: hello there tenant=acme", line), line
    pipe = io.StringIO()
    configure_logging("info", "csc", stream=pipe)
    logging.getLogger("csc.test").info("hello")
    assert json.loads(pipe.getvalue())["msg"] == "hello"
    assert resolve_format("text", pipe) == "text" and resolve_format("json", pipe) == "json"
    with pytest.raises(ValueError, match="auto, json, text"):
        resolve_format("yaml", pipe)


# --- item 10 and 6: errors in words --------------------------------------------------------------


def test_bind_errors_name_the_address() -> None:
    asyncio_text = (
        "error while attempting to bind on address ('127.0.0.1', 8080): address already in use"
    )
    exc = OSError(errno.EADDRINUSE, asyncio_text)
    assert describe_os_error(exc) == "127.0.0.1:8080 is already in use"
    v6 = OSError(errno.EADDRINUSE, asyncio_text.replace("('127.0.0.1', 8080)", "('::1', 80, 0, 0)"))
    assert describe_os_error(v6) == "[::1]:80 is already in use"
    plain = OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
    assert describe_os_error(plain, "10.9.9.9:1") == "10.9.9.9:1 is not an address of this machine"
    assert describe_os_error(OSError(errno.ENOENT, "No such file")) == "No such file"


def test_connect_errors_in_words_without_errno_numbers() -> None:
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")
    assert describe_connect_error(refused).startswith("the connection was refused")
    several = OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 1, 0, 0), …")
    assert describe_connect_error(several).startswith("the connection was refused")
    assert describe_connect_error(TimeoutError()) == "no answer in time"
    assert "[Errno" not in describe_connect_error(OSError(errno.EHOSTUNREACH, "No route"))


def test_reconnect_summary_and_portal_urls() -> None:
    outage = Outage()
    outage.failed("cannot connect: refused", 10.0)
    assert (
        outage.summary(10.5) == "down for 0.5 s, 1 failed attempt (last: cannot connect: refused)"
    )
    outage.failed("cannot connect: timed out", 12.0)
    assert outage.summary(13.0).startswith(
        "down for 3.0 s, 2 failed attempts (last: cannot connect: t"
    )
    urls = portal_urls("wss://csc.example.com/", ["acme@example.com", "*@acme.org"])
    assert urls == [
        "https://csc.example.com/t/acme@example.com/",
        "https://csc.example.com/t/*@acme.org/",
    ]
    assert portal_urls("http://127.0.0.1:8080", ["a@b.c"]) == ["http://127.0.0.1:8080/t/a@b.c/"]


# --- item 9 ----------------------------------------------------------------------------------------


def test_one_time_format() -> None:
    assert iso(1796409081.7) == "2026-12-04T18:31:21Z" and iso(None) is None
    record = {"name": "alice", "created_at": 1796409081.0, "devices": 2}
    assert with_iso_times(record, ("created_at",)) == {
        "name": "alice",
        "created_at": "2026-12-04T18:31:21Z",
        "devices": 2,
    }


# --- item 8 ----------------------------------------------------------------------------------------


def test_plurals_and_swapped_arguments() -> None:
    assert [plural(n, "token") for n in (0, 1, 2)] == ["0 tokens", "1 token", "2 tokens"]
    assert _looks_swapped("acme@example.com", ["acme"])
    assert not _looks_swapped("acme", ["acme@example.com", "*@acme.org"])


# --- item 10 ---------------------------------------------------------------------------------------


def test_the_demo_commands_work_in_a_fresh_shell(tmp_path: Path) -> None:
    lines = try_lines(
        "http://127.0.0.1:1111", "http://127.0.0.1:2222", tmp_path / "csc-state", "SMS", tmp_path
    )
    text = "\n".join(lines)
    assert "http://127.0.0.1:2222/console/" in text
    assert str(tmp_path / "csc-state" / "admin-token") in text
    for program in ("csc", "csc-bootloader"):
        found = re.search(rf"(\S*/{program}) ", text)
        assert found is not None, (program, text)
        path = Path(found.group(1))
        assert path.is_absolute() and os.access(path, os.X_OK), path


# --- item 11 ---------------------------------------------------------------------------------------


def test_traffic_history_is_bounded_and_windowed() -> None:
    clock = Clock()
    history = TrafficHistory(max_tenants=2, clock=clock)
    history.record("acme", error=False, nbytes=100)
    history.record("acme", error=True, nbytes=50)
    history.record(None, error=True, nbytes=1)  # no tenant: not counted
    clock.now += BUCKET_SECONDS
    history.record("acme", error=False, nbytes=10)
    series = history.series()
    assert len(series["points"]) == POINTS and all(ISO_UTC.fullmatch(p) for p in series["points"])
    [acme] = series["tenants"]
    assert acme["requests"][-2:] == [2, 1] and acme["errors"][-2:] == [1, 0]
    assert acme["bytes"][-2:] == [150, 10] and sum(acme["requests"]) == 3
    history.record("beta", error=False, nbytes=0)
    history.record("gamma", error=False, nbytes=0)  # the tenant updated longest ago goes
    assert len(history) == 2 and [t["tenant"] for t in history.series()["tenants"]] == [
        "beta",
        "gamma",
    ]
    for _ in range(POINTS * 3):
        clock.now += BUCKET_SECONDS
        history.record("beta", error=False, nbytes=1)
    assert sum(history.series("beta")["tenants"][0]["requests"]) == POINTS
    assert history.series("gamma")["tenants"] == []  # its only bucket left the window


def test_last_seen_and_agent_events() -> None:
    clock = Clock()
    seen = LastSeen(capacity=1, clock=clock)
    assert seen.alias("acme", "a@acme.org") is None
    seen.session_down("acme", ["*@acme.org"])
    assert seen.alias("acme", "a@acme.org") == clock.now
    assert seen.alias("acme", "a@other.org") is None
    seen.session_down("beta", ["b@beta.org"])
    assert seen.alias("acme", "a@acme.org") is None  # capacity 1: the older tenant went
    log = ErrorLog(clock=clock)
    entry = log.agent_disconnected("acme", "agent session s-1 down: the agent link closed")
    shown = entry.to_json()
    assert shown["kind"] == "agent" and shown["error"] == "agent_disconnected"
    assert shown["status"] is None and shown["request_id"] is None and log.total == 1
    assert ISO_UTC.fullmatch(shown["at"])
