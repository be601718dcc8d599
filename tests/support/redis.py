"""Real Redis topologies as pytest fixtures (the processes themselves: :mod:`harness.redis`).

Fixtures (registered by ``tests/conftest.py``): ``redis_single``, ``redis_sentinel`` and
``redis_cluster`` (session scope, started on first use); ``redis_topology``, parametrized over
the three, which heals the topology after each test and prints the servers' logs when the test
failed; ``redis_prefix``, a key prefix of its own for each test. The names of
:mod:`harness.redis` are re-exported here for the tests that import them from this module.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator

import pytest

from harness.redis import *  # noqa: F403
from harness.redis import KINDS, RedisTopology, running


def _session_topology(kind: str, factory: pytest.TempPathFactory) -> Iterator[RedisTopology]:
    with running(kind, factory.mktemp(f"redis-{kind}")) as topology:
        print(f"redis {kind} started in {topology.startup_seconds:.2f}s", file=sys.stderr)
        yield topology


@pytest.fixture(scope="session")
def redis_single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisTopology]:
    yield from _session_topology("single", tmp_path_factory)


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisTopology]:
    yield from _session_topology("sentinel", tmp_path_factory)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisTopology]:
    yield from _session_topology("cluster", tmp_path_factory)


@pytest.fixture(params=list(KINDS))
def redis_topology(request: pytest.FixtureRequest) -> Iterator[RedisTopology]:
    """Each topology in turn; healed after the test, its logs printed if the test failed."""
    topology: RedisTopology = request.getfixturevalue(f"redis_{request.param}")
    failed_before = request.session.testsfailed
    yield topology
    if request.session.testsfailed > failed_before:
        print(topology.describe(), file=sys.stderr)
    topology.heal()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses (no hash tag: add ``{...}`` where one slot is needed)."""
    return f"csctest:{uuid.uuid4().hex[:12]}:"
