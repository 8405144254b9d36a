"""Fixtures: a private redis-server per test (tests/helpers/redis_server.py)."""

from __future__ import annotations

import itertools
import os

import pytest

from tests.helpers.redis_server import RedisServer, have_redis_server

_names = itertools.count()


@pytest.fixture
def redis_server():
    """A started redis-server without AOF, killed and removed at teardown."""
    if not have_redis_server():
        pytest.skip("redis-server is not on PATH (install Redis 7 to run the upstream tests)")
    with RedisServer() as server:
        yield server.start()


@pytest.fixture
def redis_aof():
    """A started redis-server with ``appendonly yes`` and ``appendfsync always``."""
    if not have_redis_server():
        pytest.skip("redis-server is not on PATH (install Redis 7 to run the upstream tests)")
    with RedisServer(appendonly=True, appendfsync="always") as server:
        yield server.start()


@pytest.fixture
def dataset():
    """A dataset name of its own for this test."""
    return f"t{os.getpid()}_{next(_names)}"


@pytest.fixture(scope="module")
def shared_redis():
    """One redis-server for a module's tests that do not stop or freeze it (each test
    uses a dataset of its own)."""
    if not have_redis_server():
        pytest.skip("redis-server is not on PATH (install Redis 7 to run the upstream tests)")
    with RedisServer() as server:
        yield server.start()
