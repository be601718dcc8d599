"""The fuzz targets' shared budget and checks: bounded, reproducible, typed errors only.

Every target in ``tests/fuzz`` runs under :func:`fuzz` settings: an explicit ``max_examples``,
no deadline (a busy CI machine must not fail a test for being slow), ``derandomize=True`` and no
example database, so two runs of the same code draw the same examples and CI is reproducible.
The whole folder is budgeted to finish well under 60 s on a busy 2-core machine.

:func:`only` runs a parser and returns the documented error it raised (or None): any other
exception escapes and fails the test with its own traceback. :func:`peak_memory` measures the
peak of Python allocations (``tracemalloc``) while a callable runs, for the large-input checks.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings

T = TypeVar("T")
KiB = 1024
MiB = 1024 * KiB


def fuzz(max_examples: int) -> settings:
    """Settings of one fuzz target: ``max_examples`` drawn the same way on every run."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def only(
    allowed: tuple[type[BaseException], ...], fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> BaseException | None:
    """Call ``fn``; return the ``allowed`` exception it raised, None if it returned.

    Anything not in ``allowed`` propagates, so the failing example shows the real traceback.
    """
    try:
        fn(*args, **kwargs)
    except allowed as exc:
        return exc
    return None


def peak_memory(fn: Callable[[], T]) -> tuple[T, int]:
    """``fn()``'s result and the peak bytes Python allocated while it ran (above the start)."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return result, peak


def raises_within(
    allowed: tuple[type[BaseException], ...], fn: Callable[[], Any]
) -> tuple[BaseException | None, int]:
    """:func:`only` and :func:`peak_memory` together: the documented error and the peak."""
    return peak_memory(lambda: only(allowed, fn))
