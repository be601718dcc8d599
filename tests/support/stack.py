"""Moved to :mod:`harness.stack` (shared with demo/ and bench/); re-exported for the tests."""

from harness.stack import *  # noqa: F403
