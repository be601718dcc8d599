"""Moved to :mod:`harness.procs`, :mod:`harness.waiting` and :mod:`harness.factory` (shared with
demo/ and bench/); re-exported for the tests."""

from harness.factory import *  # noqa: F403
from harness.procs import *  # noqa: F403
from harness.waiting import *  # noqa: F403
