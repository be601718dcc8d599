"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.upstream import UpstreamServer, start_upstream_server


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamServer]:
    """The portal (HTTP and TCP echo) the agents of a test serve."""
    server = await start_upstream_server(tcp_echo_port=0)
    try:
        yield server
    finally:
        await server.close()
