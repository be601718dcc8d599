"""Moved to :mod:`harness.readyfile` (shared with demo/ and bench/); re-exported for the tests."""

from harness.readyfile import *  # noqa: F403
