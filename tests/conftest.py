"""Suite-wide pytest fixtures: real processes, tracked per test and stopped by PID at teardown.

* ``procs``: a :class:`tests.support.procs.ProcFactory` for the test (``procs.csc()``,
  ``procs.agent(...)``, ``procs.upstream()``, ``procs.spawn(...)``, ``procs.track(proc)``).
  At teardown every tracked process gets SIGTERM, then SIGKILL if it lingers; when the test
  failed, each process's command line and log tails are printed (pytest shows them with the
  failure).
* Every test gets the root logger's handlers and level back afterwards, so a test that runs
  an entry point's ``configure_logging`` cannot change what later tests log.
* ``haproxy``: start Debian's HAProxy in front of backends (:mod:`tests.support.haproxy`).
* ``upstream_proc``: one upstream process (HTTP + TCP echo) for the whole session. It is
  stateless; a test that needs to kill or restart an upstream starts its own with ``procs``.
* Hypothesis runs without its per-example deadline (200 ms by default) in every test: a busy
  machine can make any one example that slow, and a property test must not fail for it.
* The open-file limit's soft value is raised to its hard one (at most 65536, the deploy's
  ``LimitNOFILE``) for the tests and the processes they start: a CSC's ``max_connections =
  auto`` follows it, and the storms of tests/e2e/test_hostile_tenant.py hold about a thousand
  connections, more than a login shell's usual 1024 allows.
"""

from __future__ import annotations

import logging
import resource
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

_SOFT, _HARD = resource.getrlimit(resource.RLIMIT_NOFILE)
_WANT = 65536 if _HARD == resource.RLIM_INFINITY else min(_HARD, 65536)
if _SOFT != resource.RLIM_INFINITY and _SOFT < _WANT:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_WANT, _HARD))

settings.register_profile("csc", deadline=None)
settings.load_profile("csc")  # before the test modules are imported: their settings inherit it

_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:  # `pytest` (not `python -m pytest`) leaves the root off
    sys.path.insert(0, _REPO_ROOT)

from tests.support.postgres import postgres_server, postgres_url  # noqa: E402, F401
from tests.support.procs import ProcFactory, UpstreamProc, start_upstream  # noqa: E402

# real Redis topologies: redis_single, redis_sentinel, redis_cluster, redis_topology, redis_prefix;
# ``haproxy``: a real HAProxy in front of test backends (tests/support/haproxy.py)
pytest_plugins = ["tests.support.redis", "tests.support.haproxy"]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember each phase's report so fixtures can tell whether their test failed."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _failed(node: pytest.Item) -> bool:
    reports = node.stash.get(_REPORTS, {})
    return any(rep.failed for rep in reports.values())


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProcFactory]:
    factory = ProcFactory(tmp_path)
    yield factory
    factory.stop_all()
    node = request.node
    if isinstance(node, pytest.Item) and _failed(node):
        factory.dump_logs(sys.stderr)
        return
    # an exception escaping to a process's log is a bug, whatever the test looked at
    found = factory.tracebacks()
    if found:
        pytest.fail(f"{len(found)} traceback(s) in the processes' logs:\n" + "\n".join(found[:3]))


@pytest.fixture(scope="session")
def upstream_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamProc]:
    proc = start_upstream(tmp_path_factory.mktemp("upstream"))
    yield proc
    proc.stop()
