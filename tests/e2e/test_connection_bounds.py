"""``client_max_connections`` and ``max_connections`` in a real ``csc serve`` (uvloop): refusals
answered at once on both listeners and read whole by the client, places given back on close.
The bounded address is 127.0.0.2 (another loopback address), the rest of the test 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import resource

from prometheus_client.parser import text_string_to_metric_families

from csc.relay import conncap
from harness.factory import ProcFactory
from harness.procs import CscProc, issue_token
from harness.waiting import async_wait_until, http_request, wait_alias_online
from shared.runtime import NOFILE_CEILING
from tests.support.procs import scaled

OTHER = "127.0.0.2"
REQUEST = b"GET /healthz HTTP/1.1\r\nHost: csc\r\nConnection: close\r\n\r\n"


async def _open(
    addr: tuple[str, int], source: str = OTHER
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*addr, local_addr=(source, 0))


async def _answer(addr: tuple[str, int], send: bytes, source: str = OTHER) -> bytes:
    reader, writer = await _open(addr, source)
    try:
        writer.write(send)
        return await asyncio.wait_for(reader.read(), scaled(10))
    finally:
        writer.close()


async def _until_served(addr: tuple[str, int]) -> bytes:
    """The answer to REQUEST from OTHER once the node has seen a closed connection go."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(10)
    while True:
        answer = await _answer(addr, REQUEST)
        if answer.startswith(b"HTTP/1.1 200 ") or loop.time() > deadline:
            return answer
        await asyncio.sleep(0.05)


async def _until_open(csc: CscProc, count: int) -> None:
    """Until the node counts ``count`` open connections (``csc_connections``): accepted, not
    merely connected, however busy the machine."""
    await async_wait_until(
        lambda: _gauge(csc, "csc_connections") == count, scaled(10), message=f"{count} accepted"
    )


def _gauge(csc: CscProc, name: str) -> float:
    _, _, body = http_request(csc.metrics_url)
    (family,) = [f for f in text_string_to_metric_families(body.decode()) if f.name == name]
    return family.samples[0].value


async def test_one_address_is_bounded_and_a_refusal_is_read_whole(procs: ProcFactory) -> None:
    csc = procs.csc(env={"CSC_CLIENT_MAX_CONNECTIONS": "2"})
    http, tcp = csc.http_addr, csc.tcp_addr
    held = [await _open(http), await _open(tcp)]
    await _until_open(csc, 2)
    # the refused client is still sending a body far larger than the socket buffers
    body = b"x" * (4 * 1024 * 1024)
    head = b"POST /t/acme@example.com/up HTTP/1.1\r\nHost: csc\r\nContent-Length: %d\r\n\r\n"
    answer = await _answer(http, head % len(body) + body)
    assert answer.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), answer[:300]
    assert b"\r\nRetry-After: 1\r\n" in answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "too_many_connections"
    answer = await _answer(tcp, b"CONNECT acme@example.com\r\n")
    assert answer.startswith(b"ERR 429 too_many_connections: "), answer
    # another address meanwhile: served
    assert (await _answer(http, REQUEST, source="127.0.0.1")).startswith(b"HTTP/1.1 200 ")
    held.pop()[1].close()
    assert (await _until_served(http)).startswith(b"HTTP/1.1 200 ")
    for _, writer in held:
        writer.close()


async def test_a_full_node_refuses_at_once(procs: ProcFactory) -> None:
    csc = procs.csc(env={"CSC_MAX_CONNECTIONS": "2", "CSC_CLIENT_MAX_CONNECTIONS": "off"})
    http, tcp = csc.http_addr, csc.tcp_addr
    held = [await _open(http), await _open(tcp, source="127.0.0.1")]
    await _until_open(csc, 2)
    answer = await _answer(http, REQUEST, source="127.0.0.3")
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer[:300]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "node_full"
    answer = await _answer(tcp, b"CONNECT acme@example.com\r\n", source="127.0.0.3")
    assert answer.startswith(b"ERR 503 node_full: "), answer
    held.pop(0)[1].close()
    assert (await _until_served(http)).startswith(b"HTTP/1.1 200 ")
    for _, writer in held:
        writer.close()


async def test_a_tcp_connection_open_when_the_node_stops_ends_quietly(procs: ProcFactory) -> None:
    """A TCP ingress connection still waiting for its CONNECT line when the node stops: its
    task is cancelled, which asyncio 3.11 logged as an error with a traceback (the procs
    fixture fails the test on any)."""
    csc = procs.csc()
    _, writer = await _open(csc.tcp_addr, source="127.0.0.1")
    await _until_open(csc, 1)
    csc.stop()
    writer.close()


def test_serve_raises_its_open_file_limit_and_says_what_it_allows(procs: ProcFactory) -> None:
    """``csc serve`` raises its soft open-file limit to the hard one (a systemd service's
    default soft limit is 1024), ``max_connections = auto`` follows the raised one, and the
    start-up log says so; a low hard limit gets a warning. The agent raises its own too."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    csc = procs.csc(launcher=["prlimit", "--nofile=256:"])
    bound = want - max(conncap.RESERVED_FDS, want // 8)
    assert _gauge(csc, "csc_connections_max") == bound
    log = csc.stderr_path.read_text()
    assert f'open files: soft limit raised from 256 to {want}"' in log
    assert f"on the public and TCP listeners: at most {bound}; per client address: at most " in log
    assert "leaves this node" not in log

    token = issue_token(csc.state_dir, "acme", "acme@example.com")
    agent = procs.agent(
        csc.http_url, token, "http://127.0.0.1:9", launcher=["prlimit", "--nofile=256:"]
    )
    wait_alias_online(csc.http_url, "acme@example.com")  # logged at start, before connecting
    assert f'open files: soft limit raised from 256 to {want}"' in agent.stderr_path.read_text()

    low = procs.csc(launcher=["prlimit", "--nofile=512:512"])
    assert _gauge(low, "csc_connections_max") == 512 - conncap.RESERVED_FDS
    log = low.stderr_path.read_text()
    assert "soft limit raised" not in log
    assert "the open-file limit (512) leaves this node 448 connections" in log
