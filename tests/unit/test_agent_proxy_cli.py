"""``csc-agent proxy``'s command line, configuration and request parsing, without a network.

The command-line tests replace :mod:`tenant_agent.proxy.server` by a fake, as tests/unit/test_cli.py
does for the agent. The property test feeds pipelined requests, split at arbitrary points, to a
:class:`~tenant_agent.proxy.http.ClientConnection` on a fake transport with a stand-in portal
that echoes what it received, and checks every request arrives whole, in order, rewritten.
The proxy over real sockets is tested in tests/integration/test_agent_proxy.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import types
from pathlib import Path
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.config import reference_table
from shared.errors import BadRequest
from tenant_agent import cli as agent_cli
from tenant_agent.config import load_agent_config
from tenant_agent.http_upstream import RelayedStream
from tenant_agent.proxy.config import ENV_PREFIX, ProxyConfig
from tenant_agent.proxy.http import ClientConnection, HttpFrontend
from tenant_agent.proxy.messages import origin_form
from tests.support.procs import async_wait_until

README = Path(__file__).resolve().parents[2] / "README.md"


def agent(*argv: str, env: dict[str, str] | None = None) -> int:
    return agent_cli.main(list(argv), env=env or {})


@pytest.fixture
def fake_proxy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[ProxyConfig, Path | None]]:
    calls: list[tuple[ProxyConfig, Path | None]] = []

    def run(config: ProxyConfig, *, ready_file: Path | None = None) -> int:
        calls.append((config, ready_file))
        return 0

    module = types.ModuleType("tenant_agent.proxy.server")
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tenant_agent.proxy.server", module)
    return calls


def test_cli_builds_the_proxy_config(
    tmp_path: Path, fake_proxy: list[tuple[ProxyConfig, Path | None]]
) -> None:
    file = tmp_path / "proxy.toml"
    file.write_text('upstream = "http://portal:8000/prov"\nidle_timeout = "2m"\n')
    env = {
        "CSC_AGENT_PROXY_CONFIG": str(file),
        "CSC_AGENT_PROXY_MAX_BODY_SIZE": "1GiB",
        "CSC_AGENT_TOKEN": "belongs to the agent",
    }
    ready = tmp_path / "r.json"
    argv = ["proxy", "--listen", "0.0.0.0:8090", "--ready-file", str(ready), "--log-level", "debug"]
    assert agent(*argv, env=env) == 0
    [(config, ready_file)] = fake_proxy
    assert (config.listen, config.upstream, config.mode) == (
        "0.0.0.0:8090",
        "http://portal:8000/prov",
        "http",
    )
    assert config.idle_timeout == 120.0 and config.max_body_size == 1024**3
    assert config.log_level == "debug" and ready_file == ready
    assert "drain_timeout" in reference_table(ProxyConfig, ENV_PREFIX)


def test_cli_reports_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_proxy: list[Any]
) -> None:
    env = {"CSC_AGENT_PROXY_BOGUS": "1"}
    argv = ["proxy", "--listen", "nope", "--upstream", "ftp://x", "--tls-cert", "c.pem"]
    assert agent(*argv, env=env) == 2
    err = capsys.readouterr().err
    assert err.startswith("csc-agent proxy: configuration error:\n")
    for expected in ("option --listen", "option --upstream", "CSC_AGENT_PROXY_BOGUS"):
        assert expected in err
    assert agent("proxy", "--listen", "127.0.0.1:0", "--upstream", "tcp://h:1/x") == 2
    assert "only tcp://HOST:PORT" in capsys.readouterr().err
    assert agent("proxy", "--listen", "127.0.0.1:0", "--upstream", "tcp://h") == 2
    assert "needs a port" in capsys.readouterr().err
    argv = ["proxy", "--listen", "127.0.0.1:0", "--upstream", "http://h", "--tls-cert", "c"]
    assert agent(*argv, "--ca-file", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "tls_cert and tls_key must be set together" in err
    assert "ca_file is only used with an https:// upstream" in err
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    bad = str(tmp_path / "bad.pem")
    argv = ["proxy", "--listen", "127.0.0.1:0", "--upstream", "https://h"]
    assert agent(*argv, "--tls-cert", bad, "--tls-key", bad, "--ca-file", bad) == 2
    err = capsys.readouterr().err
    assert "cannot be loaded" in err and "Traceback" not in err
    assert agent("proxy", "--bogus") == 2
    assert not fake_proxy


def test_agent_ignores_proxy_variables_and_mentions_the_mode(
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {"CSC_AGENT_PROXY_LISTEN": "127.0.0.1:1", "CSC_AGENT_TOKEN": "t"}
    overrides = {"csc": "ws://c", "upstream": "http://p"}
    assert load_agent_config(file=None, env=env, overrides=overrides).upstream == "http://p"
    assert agent("--help") == 0
    assert "csc-agent proxy --help" in capsys.readouterr().out


def test_readme_documents_the_proxy_settings() -> None:
    table = reference_table(ProxyConfig, ENV_PREFIX)
    assert table in README.read_text(encoding="utf-8"), f"README.md is out of date:\n{table}"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/a?b=1", "/a?b=1"),
        ("http://evil.example/x/y?q", "/x/y?q"),
        ("HTTPS://h:1", "/"),
    ],
)
def test_origin_form(target: str, expected: str) -> None:
    assert origin_form(target) == expected


_PATHS = st.text("abz09-._~%/?=&", max_size=30).map(lambda t: "/" + t)


@given(path=_PATHS, host=st.sampled_from(["h", "evil.example:8443", "[::1]:1"]))
def test_origin_form_keeps_paths_and_drops_hosts(path: str, host: str) -> None:
    assert origin_form(path) == path
    reduced = origin_form(f"http://{host}{path}")
    assert reduced.startswith("/") and host not in reduced


@given(target=st.text(max_size=40))
def test_origin_form_is_a_path_or_a_bad_request(target: str) -> None:
    try:
        result = origin_form(target)
    except BadRequest:
        assert not target.startswith("/")
    else:
        assert result.startswith("/")


# --- property: any split of the bytes gives the same requests -------------------------------


class _FakeTransport(asyncio.Transport):
    def __init__(self, protocol: ClientConnection) -> None:
        super().__init__()
        self.out = bytearray()
        self.protocol = protocol
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _EchoRelay:
    """Answers each request with what it received: method, target, headers seen, body."""

    async def handle(self, stream: RelayedStream) -> None:
        body = bytearray()
        while chunk := await stream.read():
            body += chunk
            stream.consumed(len(chunk))
        info = stream.info
        names = [n.lower() for n, _ in info["headers"]]
        payload = json.dumps(
            {"method": info["method"], "target": info["target"], "names": names, "body": len(body)}
        ).encode() + bytes(body)
        stream.accept({"status": 200, "reason": "OK", "headers": [("X-Len", str(len(payload)))]})
        await stream.write(payload)
        stream.write_eof()

    async def close(self) -> None:
        pass


_requests = st.lists(
    st.tuples(
        st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
        st.text("abcxyz019-_/", max_size=12),
        st.binary(max_size=300),
        st.booleans(),
    ),
    min_size=1,
    max_size=3,
)


def _encode(method: str, path: str, body: bytes, chunked: bool) -> bytes:
    head = (
        f"{method} /{path} HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n"
    )
    if chunked:
        pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
        encoded = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + encoded
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _parse_responses(data: bytes) -> list[bytes]:
    """The bodies of the complete responses in ``data``."""
    bodies: list[bytes] = []
    body = bytearray()

    class Sink:
        def on_body(self, chunk: bytes) -> None:
            body.extend(chunk)

        def on_message_complete(self) -> None:
            bodies.append(bytes(body))
            body.clear()

    httptools.HttpResponseParser(Sink()).feed_data(data)
    return bodies


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=_requests, cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=8))
def test_requests_survive_any_split(
    requests: list[tuple[str, str, bytes, bool]], cuts: list[int]
) -> None:
    data = b"".join(_encode(*r) for r in requests)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})

    async def run() -> bytes:
        config = ProxyConfig(listen="127.0.0.1:0", upstream="http://127.0.0.1:1")
        frontend = HttpFrontend(config, _EchoRelay(), tls=False)
        conn = frontend.protocol()
        transport = _FakeTransport(conn)
        conn.connection_made(transport)
        for start, end in itertools.pairwise(points):
            conn.data_received(data[start:end])
            await asyncio.sleep(0)  # let the serving task run between the pieces
        await async_wait_until(
            lambda: len(_parse_responses(bytes(transport.out))) == len(requests), 5, 0.001
        )
        conn.connection_lost(None)
        await frontend.close()
        return bytes(transport.out)

    bodies = _parse_responses(asyncio.run(run()))
    assert len(bodies) == len(requests)
    for (method, path, body, _), answer in zip(requests, bodies, strict=True):
        meta, _, echoed = answer.partition(b"}")
        seen = json.loads(meta + b"}")
        assert (seen["method"], seen["target"], seen["body"]) == (method, f"/{path}", len(body))
        assert echoed == body
        assert "x-drop" not in seen["names"] and "connection" not in seen["names"]
        assert {"x-forwarded-for", "x-forwarded-proto", "x-request-id"} <= set(seen["names"])
