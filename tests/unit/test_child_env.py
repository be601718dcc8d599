"""The tests' own settings stay with the tests: a child program refuses unknown ``CSC_*``
variables, so ``CSC_TEST_TIMEOUT_FACTOR`` must not reach it."""

from __future__ import annotations

import pytest

from harness.procs import child_env, scaled


def test_the_timeout_factor_scales_the_tests_but_is_not_passed_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CSC_TEST_TIMEOUT_FACTOR", "3")
    assert scaled(2.0) == 6.0
    env = child_env({"CSC_LOG_LEVEL": "info"})
    assert "CSC_TEST_TIMEOUT_FACTOR" not in env
    assert env["CSC_LOG_LEVEL"] == "info" and env["PYTHONUNBUFFERED"] == "1"
