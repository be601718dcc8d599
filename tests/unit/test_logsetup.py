"""shared/logsetup: one line per event, level filtering, idempotent setup."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import pytest

from shared.logsetup import configure_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_one_line_per_event() -> None:
    out = io.StringIO()
    configure_logging("info", "csc", stream=out)
    log = logging.getLogger("csc.gateway")
    log.debug("hidden")
    log.info("agent %s connected", "acme")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    lines = out.getvalue().splitlines()
    pattern = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO csc csc\.gateway: agent acme connected"
    assert re.fullmatch(pattern, lines[0])
    assert " ERROR csc csc.gateway: failed" in lines[1]
    assert all(line.startswith("    ") for line in lines[2:])
    assert not any("hidden" in line for line in lines)


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


def test_unknown_level() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("loud", "csc")
