"""shared/logsetup: one event per line (JSON or text), extras, redaction, idempotent setup."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.logsetup import configure_logging, redact


def _boom(log: logging.Logger) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")


def test_json_one_object_per_event_with_extras() -> None:
    out = io.StringIO()
    configure_logging("info", "csc", stream=out)
    log = logging.getLogger("csc.relay.gateway")
    log.debug("hidden")
    log.info("agent %s connected", "acme", extra={"tenant": "acme", "request_id": "r1"})
    _boom(log)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert first | {"ts": ""} == {
        "ts": "",
        "level": "info",
        "component": "csc",
        "logger": "csc.relay.gateway",
        "msg": "agent acme connected",
        "tenant": "acme",
        "request_id": "r1",
    }
    assert second["level"] == "error" and second["msg"] == "failed"
    assert "RuntimeError: boom" in second["exc"]


def test_text_format_indents_continuation_lines() -> None:
    out = io.StringIO()
    configure_logging("info", "csc", stream=out, fmt="text")
    log = logging.getLogger("csc.relay.gateway")
    log.info("agent %s connected", "acme", extra={"tenant": "acme"})
    _boom(log)
    lines = out.getvalue().splitlines()
    pattern = (
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO csc csc\.relay\.gateway: "
        r"agent acme connected tenant=acme"
    )
    assert re.fullmatch(pattern, lines[0])
    assert " ERROR csc csc.relay.gateway: failed" in lines[1]
    assert all(line.startswith("    ") for line in lines[2:])


def test_values_json_cannot_hold_become_strings() -> None:
    out = io.StringIO()
    configure_logging("info", "csc", stream=out)
    logging.getLogger("x").info("odd", extra={"peer": ("127.0.0.1", 5), "obj": object()})
    event = json.loads(out.getvalue())
    assert event["peer"] == ["127.0.0.1", 5]
    assert event["obj"].startswith("<object object")


def test_secrets_are_redacted_in_both_formats() -> None:
    jwt = "eyJhbGciOiJFZERTQSJ9.eyJ0ZW5hbnQiOiJhY21lIn0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    for fmt in ("json", "text"):
        out = io.StringIO()
        configure_logging("info", "csc", stream=out, fmt=fmt)
        logging.getLogger("x").info("got %s and Authorization: Bearer abcdefgh12345", jwt)
        assert jwt not in out.getvalue()
        assert "abcdefgh12345" not in out.getvalue()
        assert out.getvalue().count("[redacted]") == 2


@given(st.text())
def test_redact_is_idempotent_and_keeps_plain_text(text: str) -> None:
    once = redact(text)
    assert redact(once) == once
    if "eyJ" not in text and "bearer" not in text.lower():
        assert once == text


def test_reconfigure_replaces_own_handler_only() -> None:
    foreign = logging.NullHandler()
    logging.getLogger().addHandler(foreign)
    first, second = io.StringIO(), io.StringIO()
    configure_logging("debug", "csc-agent", stream=first)
    configure_logging("warning", "csc-agent", stream=second)
    logging.getLogger("x").warning("once")
    logging.getLogger("x").info("filtered")
    assert first.getvalue() == ""
    assert second.getvalue().count("\n") == 1
    assert foreign in logging.getLogger().handlers


def test_unknown_level_and_format() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("loud", "csc")
    with pytest.raises(ValueError, match="unknown log format"):
        configure_logging("info", "csc", fmt="xml")
