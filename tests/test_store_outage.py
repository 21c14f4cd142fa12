"""Joins while Redis cannot answer: the signing key lookup fails as UNAVAILABLE (retry), never as
bad credentials, and nothing remembers the failure once Redis answers again.

The outage is a real one: the test's own redis-server is demoted to a replica of a primary that
does not exist, with ``replica-serve-stale-data no``, so every read gets ``MASTERDOWN`` and
every write ``READONLY`` (what a node that a failover demoted answers); promoting it back keeps
its data. A Redis Cluster failover is tests/test_redis_cluster.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis

from spaces import errors
from spaces.auth.tokens import TokenVerifier
from spaces.server import SpacesServer
from spaces.store.redis import UNBLOCKED, RedisStore
from spaces.v1 import node_pb2, presence_pb2
from tests.support.redis_server import RedisServer, free_port
from tests.support.system import Admin, Tenant, eventually, make_config, start_server


@pytest.fixture
async def server_on_private_redis(
    private_redis: RedisServer,
) -> AsyncIterator[tuple[SpacesServer, Admin]]:
    server = await start_server(make_config(redis_url=private_redis.url))
    admin = Admin(server.address)
    yield server, admin
    await admin.close()
    await server.stop()


async def demote(redis: aioredis.Redis) -> None:
    await redis.config_set("replica-serve-stale-data", "no")
    await redis.replicaof("127.0.0.1", free_port())


async def promote(redis: aioredis.Redis) -> None:
    await redis.replicaof("NO", "ONE")


async def join_status(admin: Admin, token: str) -> tuple[grpc.StatusCode, str]:
    try:
        await admin.presence.Join(presence_pb2.JoinRequest(token=token), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


STORE_UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, errors.StoreUnavailable.message)
OK = (grpc.StatusCode.OK, "")


async def test_joins_while_redis_cannot_answer_are_unavailable_and_succeed_once_it_can(
    private_redis: RedisServer, server_on_private_redis: tuple[SpacesServer, Admin]
) -> None:
    _, admin = server_on_private_redis
    # One key the presence service has already fetched (a join checks it in the join script),
    # one it has never seen (a join reads it first).
    known, unseen = Tenant(await admin.create_key()), Tenant(await admin.create_key())
    space_id = await admin.create_space()
    assert await join_status(admin, known.token(space_id, "first")) == OK
    store = RedisStore(private_redis.url)
    await store.start()
    redis = aioredis.from_url(private_redis.url)
    try:
        await demote(redis)
        for tenant, pid in ((known, "alice"), (unseen, "bob")):
            for _ in range(3):
                assert await join_status(admin, tenant.token(space_id, pid)) == STORE_UNAVAILABLE
        await promote(redis)
        # The media node's heartbeats failed too, and a node unheard of for a second is not
        # placed: wait for its next one (no join is attempted meanwhile), then each key works
        # at the first try.
        promoted_at_ms = await store.now_ms()

        async def heartbeat_since_promotion() -> bool:
            view = await store.list_nodes(60_000)
            return any(n.updated_at_ms > promoted_at_ms for n in view.nodes)

        await eventually(heartbeat_since_promotion, timeout=10)
        for tenant, pid in ((known, "alice"), (unseen, "bob")):
            assert await join_status(admin, tenant.token(space_id, pid)) == OK
    finally:
        await promote(redis)
        await redis.aclose()
        await store.close()


async def test_a_key_lookup_that_redis_cannot_answer_is_a_store_error_not_an_unknown_key(
    private_redis: RedisServer, server_on_private_redis: tuple[SpacesServer, Admin]
) -> None:
    _, admin = server_on_private_redis
    tenant = Tenant(await admin.create_key())
    token = tenant.token(await admin.create_space(), "alice")
    store = RedisStore(private_redis.url)
    await store.start()
    verifier = TokenVerifier(store)
    redis = aioredis.from_url(private_redis.url)
    try:
        await demote(redis)
        with pytest.raises(errors.StoreUnavailable):
            await store.get_signing_key(tenant.key.id)
        with pytest.raises(errors.StoreUnavailable):
            await verifier.verify(token)
        await promote(redis)
        assert (await verifier.verify(token)).key_id == tenant.key.id
    finally:
        await promote(redis)
        await redis.aclose()
        await store.close()


async def test_a_blocking_read_that_a_demotion_ends_is_retried_and_the_stream_goes_on(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A demoted server ends blocking reads with ``UNBLOCKED``, which redis-py raises as a plain
    ResponseError: the node's command stream must treat it as "Redis cannot answer" and read
    on, not die (a node would stop hearing kicks and space closes)."""
    store = RedisStore(private_redis.url)
    await store.start()
    redis = aioredis.from_url(private_redis.url)
    received: list[node_pb2.NodeCommand] = []

    async def consume() -> None:
        async for command in store.node_commands("node-u"):
            received.append(command)
            if len(received) == 2:
                return

    task = asyncio.create_task(consume())
    try:
        await asyncio.sleep(0.3)  # reading: the stream starts after what is already there
        kick = node_pb2.NodeCommand(kick=node_pb2.KickConnection(connection_id="c1"))
        await store.publish_node_command("node-u", kick)
        await eventually(lambda: len(received) == 1, timeout=5)
        await asyncio.sleep(0.3)  # the next read is blocked on the server
        with caplog.at_level(logging.WARNING, logger="spaces.store.redis"):
            await demote(redis)
            await eventually(lambda: UNBLOCKED in caplog.text, timeout=5)
        assert not task.done(), task
        await promote(redis)
        second = node_pb2.NodeCommand(kick=node_pb2.KickConnection(connection_id="c2"))
        await store.publish_node_command("node-u", second)
        await asyncio.wait_for(task, timeout=10)
        assert [c.kick.connection_id for c in received] == ["c1", "c2"]
    finally:
        task.cancel()
        await promote(redis)
        await redis.aclose()
        await store.close()
