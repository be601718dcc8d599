"""Moved to :mod:`harness.procs` (shared with demo/ and bench/); re-exported for the tests."""

from harness.procs import *  # noqa: F403
