"""Moved to :mod:`harness.catalog` (shared with demo/ and bench/); re-exported for the tests."""

from harness.catalog import *  # noqa: F403
