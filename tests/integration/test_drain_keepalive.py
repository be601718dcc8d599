"""A draining node still answers on the connections it has, with ``Connection: close``, so a
load balancer in front of it keeps no idle connection that the node's stop would cut under a
request (the rolling restart of tests/e2e/test_cluster_rolling.py)."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.support.inproc import relay


async def test_a_draining_node_answers_connection_close(tmp_path: Path) -> None:
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        async with http.get(f"{r.csc_url}/healthz") as resp:
            assert resp.status == 200
            assert resp.headers.get("Connection", "").lower() != "close"
        async with http.get(r.tunnel("/small")) as resp:
            assert resp.status == 200
            assert resp.headers.get("Connection", "").lower() != "close"
        r.node.state.draining = True  # as Node.drain sets it, without closing the listener
        try:
            for url in (f"{r.csc_url}/healthz", f"{r.csc_url}/readyz", r.tunnel("/small")):
                async with http.get(url) as resp:
                    await resp.read()
                    assert resp.headers.get("Connection", "").lower() == "close", url
        finally:
            r.node.state.draining = False
