"""shared.runtime (start-up helpers), shared.link_config (link settings declared once) and the
table printer the CLIs share."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

from csc.config import CSCConfig
from shared import runtime
from shared.cli_support import table
from shared.link_config import DEFAULTS, HELP, link_problems
from shared.protocol import LinkSettings
from tenant_agent.config import AgentConfig


def test_addresses_are_host_port_with_brackets_for_ipv6() -> None:
    assert runtime.format_hostport("127.0.0.1", 80) == "127.0.0.1:80"
    assert runtime.sockname_address(("::1", 8080, 0, 0)) == "[::1]:8080"
    assert runtime.sockname_address("/run/csc.sock") == "/run/csc.sock"


def test_ready_file_is_one_json_line_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "ready.json"
    runtime.write_ready_file(path, {"http": "127.0.0.1:1", "pid": 7})
    runtime.write_ready_file(path, {"http": "127.0.0.1:2", "pid": 7})
    assert json.loads(path.read_text()) == {"http": "127.0.0.1:2", "pid": 7}
    assert path.read_text().endswith("}\n")
    assert os.listdir(tmp_path) == ["ready.json"]


def test_a_stop_signal_sets_the_stop_event() -> None:
    async def main() -> bool:
        stop = runtime.stop_event()
        os.kill(os.getpid(), signal.SIGTERM)
        await stop.wait()
        return stop.is_set()

    assert runtime.run(main()) is True


def test_both_programs_default_to_the_protocol_link_settings() -> None:
    for cls in (CSCConfig, AgentConfig):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in HELP:
            assert fields[name].default == DEFAULTS[name], (cls, name)
    defaults = {f.name: f.default for f in dataclasses.fields(LinkSettings)}
    assert {name: defaults[name] for name in HELP} == {name: DEFAULTS[name] for name in HELP}


def test_link_problems_are_every_broken_rule() -> None:
    ok = LinkSettings()
    assert link_problems(ok) == []
    bad = dataclasses.replace(
        ok, initial_window=2, max_window=1, max_frame=ok.session_budget + 1, heartbeat_timeout=1.0
    )
    problems = link_problems(bad)
    assert len(problems) == 3
    assert problems[2] == "heartbeat_timeout (1s) must be greater than heartbeat_interval (10s)"


def test_table_aligns_columns_and_says_when_empty() -> None:
    text = table(["A", "LONGER"], [["xyz", None], ["q", ["a", "b"]], ["r", []]], "(none)")
    assert text.split("\n") == ["A    LONGER", "xyz  -", "q    a,b", "r    -"]
    assert table(["A"], [], "(none)") == "(none)"


def test_listen_on_binds_an_ip_literal_itself_and_leaves_names_to_create_server() -> None:
    """uvloop resolves even ``127.0.0.1`` in libuv's thread pool (four threads for the rest of
    the process's life): a literal is bound here, as create_server would bind it."""
    import errno
    import socket

    import pytest

    assert runtime.listen_on("localhost", 0) == {"host": "localhost", "port": 0}
    assert runtime.listen_on(None, 0) == {"host": None, "port": 0}
    assert runtime.listen_on("fe80::1%lo", 0) == {"host": "fe80::1%lo", "port": 0}
    for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
        sock = runtime.listen_on(host, 0)["sock"]
        with sock:
            assert sock.family == family and sock.type == socket.SOCK_STREAM
            assert sock.getsockname()[0] == host and not sock.getblocking()
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
            if family == socket.AF_INET6:
                assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            sock.listen()
            port = sock.getsockname()[1]
            with pytest.raises(OSError, match="error while attempting to bind on address") as err:
                runtime.listen_on(host, port)
            assert err.value.errno == errno.EADDRINUSE
