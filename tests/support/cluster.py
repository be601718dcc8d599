"""Moved to :mod:`harness.cluster` (shared with demo/ and bench/); re-exported for the tests."""

from harness.cluster import *  # noqa: F403
