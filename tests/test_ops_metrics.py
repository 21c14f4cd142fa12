"""The metrics the dashboard and the alerts stand on, each made to move by the real thing: a
webhook backlog and dead letters (both stores), a Redis that restarts empty (the epoch), and
the registry's node counts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from spaces import metrics
from spaces.config import WebhookConfig
from spaces.sdk import client as sdk
from spaces.server import SpacesServer
from tests.support.redis_server import RedisServer
from tests.support.system import Admin, Tenant, eventually, free_port, make_config, start_server


def value(metric: object) -> float:
    return float(metric._value.get())  # type: ignore[attr-defined]


def unreachable_webhooks(**overrides: object) -> WebhookConfig:
    settings: dict[str, object] = {
        "url": f"http://127.0.0.1:{free_port()}/hook",  # nothing listens there
        "secret": "s3cret",
        "timeout_ms": 1_000,
        "lease_ms": 1_000,
        "claim_idle_ms": 1_000,
        "poll_interval_ms": 50,
    }
    settings.update(overrides)
    return WebhookConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "redis"])
async def backlog_server(
    request: pytest.FixtureRequest, redis_url: str
) -> AsyncIterator[SpacesServer]:
    """Every attempt fails; after the first, the queue waits a minute before the next."""
    srv = await start_server(
        make_config(
            redis_url=redis_url if request.param == "redis" else "",
            services=("control", "auth", "presence", "media", "webhooks"),
            webhooks=unreachable_webhooks(initial_backoff_ms=60_000, max_backoff_ms=60_000),
        )
    )
    yield srv
    await srv.stop()


async def test_a_failing_endpoint_shows_in_the_webhook_backlog(
    backlog_server: SpacesServer,
) -> None:
    server = backlog_server
    admin = Admin(server.address)
    await admin.create_space()  # video.space.created, to an endpoint that refuses
    await admin.close()

    async def retrying() -> bool:
        # Queued and its first attempt failed: in backoff, not due yet, so not "behind" (until
        # that first attempt the queued event is due at once, and is behind).
        backlog = await server.store.webhook_backlog()
        return backlog.queues == 1 and backlog.dead_letters == 0 and backlog.oldest_due_ms == 0

    await eventually(retrying, timeout=10)
    await asyncio.sleep(0.5)
    backlog = await server.store.webhook_backlog()
    assert backlog.oldest_due_ms == 0, backlog  # the minute's backoff holds
    await server.webhooks.update_backlog()
    assert value(metrics.WEBHOOK_QUEUES) == 1
    assert value(metrics.WEBHOOK_OLDEST_DUE) == 0


async def test_undelivered_due_events_age_in_the_backlog(backlog_server: SpacesServer) -> None:
    """With delivery stopped (a stuck replica), a due queue's wait grows."""
    server = backlog_server
    await server.webhooks.deliverer.stop()
    admin = Admin(server.address)
    await admin.create_space()
    await admin.close()

    async def waiting() -> bool:
        backlog = await server.store.webhook_backlog()
        return backlog.queues == 1 and 0 < backlog.oldest_due_ms <= backlog.now_ms - 1_000

    await eventually(waiting, timeout=10)
    await server.webhooks.update_backlog()
    assert value(metrics.WEBHOOK_OLDEST_DUE) >= 1.0
    await server.webhooks.deliverer.start()  # so that stopping the server stops it cleanly


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_dead_letters_are_counted(store: str, redis_url: str) -> None:
    server = await start_server(
        make_config(
            redis_url=redis_url if store == "redis" else "",
            services=("control", "auth", "presence", "media", "webhooks"),
            webhooks=unreachable_webhooks(max_attempts=1),
        )
    )
    try:
        admin = Admin(server.address)
        await admin.create_space()
        await admin.create_space()
        await admin.close()

        async def dead() -> bool:
            backlog = await server.store.webhook_backlog()
            return backlog.dead_letters == 2 and backlog.queues == 0

        await eventually(dead, timeout=15)
        await server.webhooks.update_backlog()
        assert value(metrics.WEBHOOK_DEAD_LETTERS) == 2
        assert value(metrics.WEBHOOK_QUEUES) == 0
    finally:
        await server.stop()


async def test_a_redis_that_restarts_empty_changes_the_epoch_the_node_reports(
    private_redis: RedisServer,
) -> None:
    server = await start_server(make_config(redis_url=private_redis.url))
    space: sdk.Space | None = None
    try:
        admin = Admin(server.address)
        tenant = Tenant(await admin.create_key())
        space_id = await admin.create_space()
        await admin.close()
        space = sdk.Space(tenant.token(space_id, "alice"), server.address, decode=False)
        await space.join()
        first = await eventually(lambda: value(metrics.STORE_EPOCH), timeout=5)
        changes = value(metrics.STORE_EPOCH_CHANGES)

        private_redis.restart()  # empty: no persistence

        await eventually(lambda: value(metrics.STORE_EPOCH_CHANGES) == changes + 1, timeout=10)
        assert value(metrics.STORE_EPOCH) not in (0, first)
    finally:
        if space is not None:
            await space.leave()
        await server.stop()


async def test_presence_publishes_the_registry_node_counts(redis_url: str) -> None:
    api = await start_server(
        replace(make_config(redis_url=redis_url, services=("control", "auth", "presence")))
    )
    nodes = [
        await start_server(make_config(redis_url=redis_url, services=("media",), node_id=n))
        for n in ("node-a", "node-b")
    ]
    try:
        serving = metrics.MEDIA_NODES.labels(state="serving")
        await eventually(lambda: value(serving) == 2, timeout=10)
        assert nodes[0].media_node is not None
        await nodes[0].media_node.drain(grace_s=0)
        draining = metrics.MEDIA_NODES.labels(state="draining")
        await eventually(lambda: value(draining) == 1 and value(serving) == 1, timeout=10)
    finally:
        for node in nodes:
            await node.stop()
        await api.stop()
