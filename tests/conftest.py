"""Shared fixtures: real redis-server processes, both stores, real gRPC servers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from spaces.server import SpacesServer
from spaces.store.base import Store
from spaces.store.memory import MemoryStore
from spaces.store.redis import RedisStore
from tests.support.redis_cluster import RedisClusterProcess
from tests.support.redis_server import RedisServer
from tests.support.system import Admin, Tenant, make_config, start_server

# aioice must never gather anything but loopback in tests (see REFERENCE.md, "Loopback").
os.environ.setdefault("SPACES_ICE_BIND", "127.0.0.1")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcess]:
    """One real 3-primary Redis Cluster on loopback, shared by the whole session (tests flush
    it); failover tests start their own, with replicas."""
    cluster = RedisClusterProcess(masters=3).start()
    yield cluster
    cluster.close()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterProcess) -> str:
    """The shared cluster, emptied."""
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture
async def redis_url(redis_server: RedisServer) -> AsyncIterator[str]:
    """A clean database on the shared test Redis."""
    client = aioredis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    yield redis_server.url


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, for killing and restarting."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[Store]:
    """Each contract test runs once per store: in memory, on a standalone Redis, and on a real
    3-primary Redis Cluster."""
    if request.param == "memory":
        s: Store = MemoryStore()
    elif request.param == "cluster":
        cluster: RedisClusterProcess = request.getfixturevalue("redis_cluster")
        cluster.flush()
        s = RedisStore(cluster.url)
    else:
        client = aioredis.from_url(redis_server.url)
        await client.flushall()
        await client.aclose()
        s = RedisStore(redis_server.url)
    await s.start()
    yield s
    await s.close()


@pytest.fixture(autouse=True)
async def _dump_tasks_when_stuck(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Debug aid: if a test's event loop is still busy after 60 s, print every task's stack
    (not for the slow tests, which run for minutes on purpose)."""
    import asyncio
    import sys

    if request.node.get_closest_marker("slow"):
        yield
        return

    def dump() -> None:
        print("\n=== asyncio tasks after 60 s ===", file=sys.stderr)
        for task in asyncio.all_tasks():
            chain = []
            coro = task.get_coro()
            while coro is not None:
                frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
                if frame is not None:
                    chain.append(f"{frame.f_code.co_qualname}:{frame.f_lineno}")
                coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
            print(task.get_name(), " -> ".join(chain), file=sys.stderr)

    handle = asyncio.get_running_loop().call_later(60, dump)
    yield
    handle.cancel()


@pytest.fixture
async def server() -> AsyncIterator[SpacesServer]:
    """A whole single-process server (memory store) on port 0."""
    srv = await start_server(make_config())
    yield srv
    await srv.stop()


@pytest.fixture
async def world(server: SpacesServer) -> AsyncIterator[tuple[SpacesServer, Admin, Tenant, str]]:
    """That server, an admin client, a tenant with a signing key, and one space."""
    admin = Admin(server.address)
    tenant = Tenant(await admin.create_key())
    space_id = await admin.create_space()
    yield server, admin, tenant, space_id
    await admin.close()
