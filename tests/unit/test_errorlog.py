"""csc/admin/errorlog.py: the bounded ring of a node's recent error answers."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csc.admin.errorlog import KINDS, ErrorLog
from shared.errors import PortalOffline, UnknownAlias, UpstreamTimeout


def _log(capacity: int) -> ErrorLog:
    ticks = itertools.count(1_714_564_800)
    return ErrorLog(capacity=capacity, clock=lambda: float(next(ticks)))


def test_entry_shows_what_the_bootloader_was_told() -> None:
    log = _log(4)
    entry = log.record(
        "resolve", PortalOffline("the portal is offline"), request_id="r1", tenant="acme"
    )
    assert entry.to_json() == {
        "seq": 1,
        "at": "2024-05-01T12:00:00Z",
        "kind": "resolve",
        "error": "portal_offline",
        "status": 503,
        "message": "the portal is offline",
        "tenant": "acme",
        "request_id": "r1",
    }
    assert log.record("tcp", UnknownAlias(), request_id="r2").to_json()["message"] == (
        "no tenant serves this alias"
    )


def test_ring_keeps_the_newest_and_counts_every_entry() -> None:
    log = _log(3)
    for n in range(5):
        log.record("http", UpstreamTimeout(), request_id=f"r{n}", tenant="acme" if n % 2 else None)
    assert len(log) == 3 and log.total == 5
    assert [e.request_id for e in log.recent()] == ["r4", "r3", "r2"]
    assert [e.seq for e in log.recent()] == [5, 4, 3]
    assert [e.request_id for e in log.recent(2)] == ["r4", "r3"]
    assert [e.request_id for e in log.recent(tenant="acme")] == ["r3"]
    assert log.recent(tenant="nobody") == []
    assert log.recent(0) == []


def test_refuses_unknown_kinds_and_empty_rings() -> None:
    with pytest.raises(ValueError, match="unknown error kind 'ws'"):
        _log(2).record("ws", UnknownAlias(), request_id="r")
    with pytest.raises(ValueError, match="at least one entry"):
        ErrorLog(capacity=0)


@given(
    capacity=st.integers(1, 8),
    records=st.lists(st.tuples(st.sampled_from(KINDS), st.sampled_from([None, "a", "b"]))),
    limit=st.none() | st.integers(0, 10),
    tenant=st.sampled_from([None, "a", "b"]),
)
def test_recent_is_the_filtered_tail_newest_first(
    capacity: int,
    records: list[tuple[str, str | None]],
    limit: int | None,
    tenant: str | None,
) -> None:
    log = _log(capacity)
    for n, (kind, owner) in enumerate(records):
        log.record(kind, UnknownAlias(), request_id=str(n), tenant=owner)
    kept = list(enumerate(records))[-capacity:] if records else []
    expected = [str(n) for n, (_, owner) in reversed(kept) if tenant is None or owner == tenant]
    if limit is not None:
        expected = expected[:limit]
    assert [e.request_id for e in log.recent(limit, tenant=tenant)] == expected
    assert log.total == len(records) and len(log) == min(capacity, len(records))
