"""The agent's token over its life (tenant_agent/token.py): expiry read from the claims, a new
token taken from ``token_file`` only when the file changed, and warnings before the expiry."""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.config import Secret
from tenant_agent.token import WARN_BEFORE, AgentToken, describe_expiry, token_expiry


def _jwt(claims: object) -> str:
    def part(value: object) -> str:
        raw = json.dumps(value).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part({'alg': 'EdDSA'})}.{part(claims)}.c2ln"


def test_the_expiry_is_the_exp_claim() -> None:
    assert token_expiry(_jwt({"exp": 1_800_000_000, "jti": "x"})) == 1_800_000_000.0
    assert token_expiry(_jwt({"exp": 1.5})) == 1.5


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-jwt",
        "a.b",
        "a.!!!.c",
        _jwt({"jti": "no exp"}),
        _jwt({"exp": "1800000000"}),
        _jwt({"exp": True}),
        _jwt([1, 2]),
        "a." + base64.urlsafe_b64encode(b"\xff\xfe").decode() + ".c",
    ],
)
def test_no_expiry_when_there_is_none_to_read(token: str) -> None:
    assert token_expiry(token) is None


@given(st.text())
def test_any_text_gives_an_expiry_or_none(text: str) -> None:
    value = token_expiry(text)
    assert value is None or isinstance(value, float)


def test_describe_expiry() -> None:
    now = 1_800_000_000.0
    assert describe_expiry(None, now).startswith("no expiry")
    assert describe_expiry(now + 10 * 86400, now).endswith("(in 10.0 days)")
    assert describe_expiry(now + 3 * 3600, now).endswith("(in 3.0 h)")
    assert describe_expiry(now - 1, now) == "expired 2027-01-15T07:59:59Z"


def _write(path: Path, text: str) -> None:
    """Replace the file as a deployment tool does (a new inode renamed in place)."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.replace(fresh, path)


def _in_use(tmp_path: Path) -> tuple[Path, AgentToken]:
    """A token file holding the token in use."""
    path = tmp_path / "token"
    path.write_text("old.token.x")
    return path, AgentToken(Secret("old.token.x"), path)


def test_without_a_file_nothing_changes(tmp_path: Path) -> None:
    token = AgentToken(Secret("a.b.c"), None)
    assert not token.check_file()
    assert token.dial == Secret("a.b.c") and token.candidate is None


def test_a_new_token_in_the_file_becomes_the_candidate_then_the_token(tmp_path: Path) -> None:
    path, token = _in_use(tmp_path)
    assert not token.check_file()  # unchanged
    _write(path, "old.token.x\n")
    assert not token.check_file()  # rewritten with the token in use
    _write(path, " new.token.y \n")
    assert token.check_file()
    assert token.candidate == Secret("new.token.y") and token.dial == Secret("new.token.y")
    assert token.current == Secret("old.token.x")
    assert not token.check_file()  # seen already
    assert not token.proven(Secret("old.token.x"))
    assert token.proven(Secret("new.token.y"))
    assert token.current == Secret("new.token.y") and token.candidate is None


def test_a_refused_candidate_is_dropped_until_the_file_changes_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, token = _in_use(tmp_path)
    _write(path, "bad.token.z")
    assert token.check_file()
    with caplog.at_level(logging.ERROR, "csc_agent"):
        assert token.refused(Secret("bad.token.z"), "HTTP 401: bad signature")
    assert "was refused (HTTP 401: bad signature)" in caplog.text
    assert "bad.token.z" not in caplog.text  # never a token in the log
    assert token.dial == Secret("old.token.x") and token.candidate is None
    assert not token.refused(Secret("old.token.x"), "HTTP 401")  # not the candidate: fatal
    _write(path, "bad.token.z")
    assert not token.check_file()  # the same refused token again
    _write(path, "good.token.w")
    assert token.check_file() and token.dial == Secret("good.token.w")


@pytest.mark.parametrize("content", ["", "  \n"])
def test_an_empty_or_missing_file_keeps_the_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str
) -> None:
    path, token = _in_use(tmp_path)
    _write(path, content)
    with caplog.at_level(logging.WARNING, "csc_agent"):
        assert not token.check_file()
    assert "the file is empty; keeping the token in use" in caplog.text
    path.unlink()
    assert not token.check_file()
    assert token.dial == Secret("old.token.x")


def test_an_unreadable_file_keeps_the_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, token = _in_use(tmp_path)
    path.write_bytes(b"\xff\xfe not utf-8")
    with caplog.at_level(logging.WARNING, "csc_agent"):
        assert not token.check_file()
    assert "cannot read" in caplog.text and token.dial == Secret("old.token.x")


def test_expiry_warnings_come_once_a_day_from_a_week_before(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    now = time.time()
    token = AgentToken(Secret(_jwt({"exp": now + WARN_BEFORE + 3600})), tmp_path / "t")
    with caplog.at_level(logging.WARNING, "csc_agent"):
        token.warn_if_expiring(now)
        assert not caplog.records  # more than a week left
        token.warn_if_expiring(now + 7200)
        token.warn_if_expiring(now + 7300)
        assert len(caplog.records) == 1
        assert "put a new one in token_file" in caplog.text
        token.warn_if_expiring(now + 7200 + 86400)
        assert len(caplog.records) == 2
    without_file = AgentToken(Secret(_jwt({"exp": now + 60})), None)
    with caplog.at_level(logging.WARNING, "csc_agent"):
        without_file.warn_if_expiring(now)
    assert "restart the agent with a new one" in caplog.records[-1].getMessage()
    assert AgentToken(Secret("no.exp.here"), None).expires is None


def test_a_kubernetes_secret_volume_update_is_seen(tmp_path: Path) -> None:
    """The kubelet writes a Secret's new content to a new directory and swaps the ``..data``
    symlink to it; the file the agent names (``token`` → ``..data/token``) then reads new."""
    mount = tmp_path / "token"
    (mount / "..2026_12_01").mkdir(parents=True)
    (mount / "..2026_12_01" / "token").write_text("old.token.x")
    (mount / "..data").symlink_to("..2026_12_01")
    (mount / "token").symlink_to("..data/token")
    token = AgentToken(Secret("old.token.x"), mount / "token")
    assert not token.check_file()
    (mount / "..2026_12_30").mkdir()
    (mount / "..2026_12_30" / "token").write_text("new.token.y")
    (mount / "..data_tmp").symlink_to("..2026_12_30")
    os.replace(mount / "..data_tmp", mount / "..data")
    assert token.check_file() and token.dial == Secret("new.token.y")
