"""The one time format shown to people and written in JSON: ISO 8601 UTC, whole seconds.

``2026-12-04T18:31:21Z``: every CLI table, the admin API, the console and the portal use it, so
a time read in one place can be pasted into another (and sorts as text). Pure: no clock.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, overload

FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@overload
def iso(moment: float) -> str: ...


@overload
def iso(moment: None) -> None: ...


def iso(moment: float | None) -> str | None:
    """``2026-12-04T18:31:21Z`` (UTC, whole seconds) for a Unix time, or None."""
    if moment is None:
        return None
    return time.strftime(FORMAT, time.gmtime(moment))


def with_iso_times(record: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """``record`` with the Unix times in ``names`` (where present) written as :func:`iso`."""
    return {
        key: iso(value) if key in names and isinstance(value, int | float) else value
        for key, value in record.items()
    }
