"""Moved to :mod:`harness.upstream` (shared with demo/ and bench/); re-exported for the tests."""

from harness.upstream import *  # noqa: F403
