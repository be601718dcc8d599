"""A real HAProxy in front of ``csc serve`` sends the PROXY protocol (``send-proxy-v2``, its
health checks too): the device's address, not the balancer's, reaches the portal and the access
log, on the public and the TCP listener (the device connects from 127.0.0.2, HAProxy dials the
CSC from 127.0.0.4, the agent dials it directly from 127.0.0.1)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

from tests.support.haproxy import HTTP_BACKEND, TCP_BACKEND, HaproxyProc
from tests.support.procs import (
    ProcFactory,
    UpstreamProc,
    issue_token,
    scaled,
    wait_alias_online,
    wait_until,
)

ALIAS = "acme@example.com"
DEVICE = "127.0.0.2"
BALANCER = "127.0.0.4"


def _from_device(address: tuple[str, int], data: bytes) -> socket.socket:
    sock = socket.create_connection(address, timeout=scaled(10), source_address=(DEVICE, 0))
    sock.sendall(data)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


def test_haproxy_send_proxy_v2_names_the_device(
    procs: ProcFactory,
    upstream_proc: UpstreamProc,
    haproxy: Callable[..., HaproxyProc],
) -> None:
    csc = procs.csc(env={"CSC_PROXY_PROTOCOL": BALANCER})
    token = issue_token(csc.state_dir, "acme", ALIAS)
    echo_host, echo_port = upstream_proc.tcp_echo_addr
    procs.agent(
        csc.http_url, token, upstream_proc.http_url, tcp_upstream=f"{echo_host}:{echo_port}"
    )
    wait_alias_online(csc.http_url, ALIAS)
    lb = haproxy(
        [csc.ready["http"]],
        [csc.ready["tcp"]],
        server_options=f"send-proxy-v2 check-send-proxy source {BALANCER}",
    )
    lb.wait_backend_state(csc.ready["http"], "UP")
    assert lb.tcp_address is not None

    host, port = lb.http_address
    request = f"GET /t/{ALIAS}/echo/x HTTP/1.1\r\nHost: csc\r\nConnection: close\r\n\r\n"
    answer = _read_all(_from_device((host, port), request.encode()))
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 200 OK", answer[:300]
    headers = {k.lower(): v for k, v in json.loads(rest.partition(b"\r\n\r\n")[2])["headers"]}
    assert headers["x-forwarded-for"] == DEVICE

    sock = _from_device(lb.tcp_address, f"CONNECT {ALIAS}\r\n".encode())
    assert sock.recv(4) == b"OK\r\n"
    sock.sendall(b"through haproxy")
    sock.shutdown(socket.SHUT_WR)
    assert _read_all(sock) == b"through haproxy"

    def logged() -> list[dict[str, object]]:
        events = []
        for line in "".join(csc.logs()).splitlines():
            if '"csc.access"' in line:
                events.append(json.loads(line))
        return events

    wait_until(lambda: len(logged()) >= 2, 10, 0.1, message="two access events")
    # an HTTP event names the client's address, a TCP one its address and port
    clients = {str(e["kind"]): str(e["client"]) for e in logged()}
    assert clients["http"] == DEVICE
    assert clients["tcp"].rpartition(":")[0] == DEVICE
    # HAProxy's health checks (with their own header) kept the CSC up throughout
    states = lb.server_states()  # the spare slots are in maintenance
    assert [states[(backend, "n0")] for backend in (HTTP_BACKEND, TCP_BACKEND)] == ["UP", "UP"]


def _keep_alive_request(sock: socket.socket, path: str) -> dict[str, str]:
    """One request on an open connection; the echo's view of the request's headers."""
    sock.sendall(f"GET /t/{ALIAS}/echo/{path} HTTP/1.1\r\nHost: csc\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, body
        body += chunk
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


def test_devices_on_keep_alive_connections_are_never_named_for_each_other(
    procs: ProcFactory,
    upstream_proc: UpstreamProc,
    haproxy: Callable[..., HaproxyProc],
) -> None:
    """Two devices, each on its own keep-alive connection to HAProxy (HTTP mode, as
    deploy/haproxy.cfg runs it), take turns: HAProxy could carry one device's request on a
    server connection another device's PROXY header opened, and the CSC would count it
    against the wrong address. Every request reaches the portal with its own device's
    address, and the access log names it too."""
    csc = procs.csc(env={"CSC_PROXY_PROTOCOL": BALANCER})
    token = issue_token(csc.state_dir, "acme", ALIAS)
    procs.agent(csc.http_url, token, upstream_proc.http_url)
    wait_alias_online(csc.http_url, ALIAS)
    lb = haproxy(
        [csc.ready["http"]], [], server_options=f"send-proxy-v2 check-send-proxy source {BALANCER}"
    )
    lb.wait_backend_state(csc.ready["http"], "UP")
    devices = ["127.0.0.2", "127.0.0.3"]
    socks = {
        d: socket.create_connection(lb.http_address, timeout=scaled(10), source_address=(d, 0))
        for d in devices
    }
    try:
        for round_ in range(20):
            for device, sock in socks.items():
                seen = _keep_alive_request(sock, f"{device}-{round_}")
                assert seen["x-forwarded-for"] == device, (round_, seen)
    finally:
        for sock in socks.values():
            sock.close()

    def events() -> list[dict[str, object]]:
        lines = "".join(csc.logs(max_chars=1 << 20)).splitlines()
        return [json.loads(line) for line in lines if '"csc.access"' in line]

    wait_until(lambda: len(events()) >= 40, 10, 0.1, message="forty access events")
    for event in events():
        assert str(event["path"]).rpartition("/")[2].rpartition("-")[0] == event["client"]
