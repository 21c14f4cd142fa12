"""Webhooks: Mux-compatible signatures and envelopes, delivered at least once and in order per
space and endpoint, through retries, dead letters, slow endpoints and a killed replica.

Real things throughout: an aiohttp receiver on loopback, real Redis, real gRPC servers, the SDK
with an embedded media node, and `spaces serve` subprocesses for the crash test.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from spaces.config import WebhookConfig
from spaces.sdk import client as sdk
from spaces.sdk.webhooks import WebhookVerificationError, verify_webhook
from spaces.server import SpacesServer
from spaces.store.redis import RedisStore
from spaces.v1 import space_pb2, webhook_pb2, webhook_pb2_grpc
from spaces.webhooks.delivery import backoff_ms
from spaces.webhooks.signing import sign
from tests.support.redis_server import RedisServer
from tests.support.system import (
    ADMIN_KEY,
    Admin,
    Process,
    Tenant,
    eventually,
    free_port,
    make_config,
    start_server,
    wait_serving,
)
from tests.support.webhook_receiver import Received, WebhookReceiver

SECRET = "whsec_test_secret"
MUX_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
SPACE_LIFE = [
    "video.space.created",
    "video.space.active",
    "video.space.participant.joined",
    "video.space.participant.left",
    "video.space.idle",
    "video.space.deleted",
]


def fast_webhooks(url: str = "", **overrides: Any) -> WebhookConfig:
    """Short backoffs, leases and polls, so retries and takeovers happen within a test."""
    settings: dict[str, Any] = {
        "url": url,
        "secret": SECRET if url else "",
        "initial_backoff_ms": 50,
        "max_backoff_ms": 200,
        "timeout_ms": 2_000,
        "lease_ms": 1_000,
        "claim_idle_ms": 1_000,
        "poll_interval_ms": 50,
    }
    settings.update(overrides)
    return WebhookConfig(**settings)


def expected_signature(secret: str, header: str, body: bytes) -> str:
    """The Mux formula, computed here from scratch: hex HMAC-SHA256(secret, "<t>.<body>")."""
    timestamp = header.split(",", maxsplit=1)[0].removeprefix("t=")
    message = timestamp.encode() + b"." + body
    return f"t={timestamp},v1={hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()}"


def by_space(received: list[Received]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in received:
        out.setdefault(r.event["object"]["id"], []).append(r.event)
    return out


class Webhooks:
    """Admin client for WebhookService."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = webhook_pb2_grpc.WebhookServiceStub(self.channel)
        self.md = (("authorization", f"Bearer {ADMIN_KEY}"),)

    async def create(
        self, url: str, secret: str = "", event_types: tuple[str, ...] = ()
    ) -> webhook_pb2.WebhookEndpoint:
        return await self.stub.CreateWebhookEndpoint(
            webhook_pb2.CreateWebhookEndpointRequest(
                url=url, secret=secret, event_types=list(event_types)
            ),
            metadata=self.md,
        )

    async def endpoints(self) -> list[webhook_pb2.WebhookEndpoint]:
        reply = await self.stub.ListWebhookEndpoints(
            webhook_pb2.ListWebhookEndpointsRequest(), metadata=self.md
        )
        return list(reply.endpoints)

    async def dead_letters(self) -> list[webhook_pb2.DeadLetter]:
        reply = await self.stub.ListDeadLetters(
            webhook_pb2.ListDeadLettersRequest(), metadata=self.md
        )
        return list(reply.dead_letters)

    async def replay(self, *ids: str) -> int:
        reply = await self.stub.ReplayDeadLetters(
            webhook_pb2.ReplayDeadLettersRequest(ids=list(ids)), metadata=self.md
        )
        return reply.replayed

    async def close(self) -> None:
        await self.channel.close(None)


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    r = await WebhookReceiver().start()
    yield r
    await r.stop()


async def api_server(
    redis_url: str = "", services: tuple[str, ...] = ("control", "webhooks"), **webhooks: Any
) -> tuple[SpacesServer, Admin, Webhooks]:
    config = make_config(redis_url=redis_url, services=services)
    server = await start_server(replace(config, webhooks=fast_webhooks(**webhooks)))
    return server, Admin(server.address), Webhooks(server.address)


# --- signature ------------------------------------------------------------------------------


def test_signature_header_matches_the_mux_formula_computed_independently() -> None:
    body = b'{"type":"video.space.idle","object":{"id":"abc","type":"space"}}'
    header = sign(SECRET, 1_700_000_000, body)
    digest = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={digest}"
    assert verify_webhook(body, header, SECRET, now=1_700_000_010)["type"] == "video.space.idle"


def test_verify_webhook_rejects_tampering_old_or_future_timestamps_and_wrong_secrets() -> None:
    body = b'{"type":"video.space.idle"}'
    now = time.time()
    header = sign(SECRET, int(now), body)
    assert verify_webhook(body.decode(), header, SECRET) == {"type": "video.space.idle"}
    cases = {
        "tampered body": (b'{"type":"video.space.active"}', header, SECRET),
        "old timestamp": (body, sign(SECRET, int(now) - 301, body), SECRET),
        "future timestamp": (body, sign(SECRET, int(now) + 301, body), SECRET),
        "wrong secret": (body, header, "other"),
        "missing header": (body, "", SECRET),
        "no signature": (body, f"t={int(now)}", SECRET),
        "bad timestamp": (body, "t=soon,v1=00", SECRET),
    }
    for name, (b, h, s) in cases.items():
        with pytest.raises(WebhookVerificationError):
            verify_webhook(b, h, s)
            pytest.fail(name)
    # An old timestamp passes with a wider tolerance, and a rotated secret's extra v1 is fine.
    old = sign(SECRET, int(now) - 301, body)
    assert verify_webhook(body, old, SECRET, tolerance=600)
    rotated = f"{header},v1={'0' * 64}"
    assert verify_webhook(body, rotated, SECRET)


def test_backoff_doubles_with_jitter_up_to_the_maximum() -> None:
    config = WebhookConfig(initial_backoff_ms=1_000, max_backoff_ms=8_000)
    for attempt, base in [(1, 1_000), (2, 2_000), (3, 4_000), (4, 8_000), (9, 8_000)]:
        delays = {backoff_ms(attempt, config) for _ in range(50)}
        assert all(base // 2 <= d <= base for d in delays)
        assert len(delays) > 1


# --- a space's life ---------------------------------------------------------------------------


async def test_a_space_life_arrives_in_order_exactly_once_signed_in_mux_shape(
    redis_url: str, receiver: WebhookReceiver
) -> None:
    """Create, join (active), leave (idle) and delete through the real gRPC API, the SDK and
    the embedded media node, on Redis."""
    services = ("control", "auth", "presence", "media", "webhooks")
    server, admin, hooks = await api_server(redis_url, services)
    space: sdk.Space | None = None
    try:
        endpoint = await hooks.create(receiver.url)
        assert endpoint.secret and endpoint.id
        tenant = Tenant(await admin.create_key())
        space_id = await admin.create_space(passthrough="order-42")
        space = sdk.Space(tenant.token(space_id, "alice"), server.address)
        await space.join()
        await receiver.wait_accepted(3)
        await space.leave()
        await receiver.wait_accepted(5)
        await admin.spaces.DeleteSpace(space_pb2.DeleteSpaceRequest(id=space_id), metadata=admin.md)
        await receiver.wait_accepted(6)
        await asyncio.sleep(0.5)  # long enough for a duplicate to show up
        assert receiver.accepted_types() == SPACE_LIFE
        assert len(receiver.received) == 6

        events = [r.event for r in receiver.received]
        assert len({e["id"] for e in events}) == 6
        for r, e in zip(receiver.received, events, strict=True):
            assert r.signature == expected_signature(endpoint.secret, r.signature, r.body)
            assert verify_webhook(r.body, r.signature, endpoint.secret) == e
            assert r.headers["Content-Type"] == "application/json"
            uuid.UUID(e["id"])
            assert e["object"] == {"id": space_id, "type": "space"}
            assert MUX_TIME.match(e["created_at"])
            assert e["attempts"] == []
        created, active, joined, left, idle, deleted = (e["data"] for e in events)
        assert created["id"] == space_id
        assert created["status"] == "idle"
        assert created["passthrough"] == "order-42"
        assert created["type"] == "server"
        assert int(created["created_at"]) > 1_600_000_000
        assert active["status"] == "active"
        assert active["active_session_id"]
        assert joined["participant_id"] == "alice"
        assert joined["space_id"] == space_id
        assert joined["role"] == "publisher"
        assert left["participant_id"] == "alice"
        assert left["reason"] == "left"
        assert idle["status"] == "idle"
        assert "active_session_id" not in idle
        assert deleted["id"] == space_id
    finally:
        if space is not None:
            await space.leave()
        await hooks.close()
        await admin.close()
        await server.stop()


async def test_embedded_mode_delivers_to_the_config_endpoint_and_filters_by_event_type(
    receiver: WebhookReceiver,
) -> None:
    """The in-memory store (no Redis) runs the same delivery; the endpoint from config gets
    everything, a filtered endpoint only what it asked for."""
    idle_only = await WebhookReceiver().start()
    server, admin, hooks = await api_server("", url=receiver.url)
    try:
        await hooks.create(idle_only.url, event_types=("video.space.deleted",))
        space_id = await admin.create_space()
        await admin.spaces.UpdateSpace(
            space_pb2.UpdateSpaceRequest(id=space_id, passthrough="v2"), metadata=admin.md
        )
        await admin.spaces.DeleteSpace(space_pb2.DeleteSpaceRequest(id=space_id), metadata=admin.md)
        await receiver.wait_accepted(3)
        await idle_only.wait_accepted(1)
        await asyncio.sleep(0.3)
        assert receiver.accepted_types() == [
            "video.space.created",
            "video.space.updated",
            "video.space.deleted",
        ]
        assert receiver.accepted[1].event["data"]["passthrough"] == "v2"
        for r in receiver.accepted:
            verify_webhook(r.body, r.signature, SECRET)
        assert idle_only.accepted_types() == ["video.space.deleted"]
    finally:
        await hooks.close()
        await admin.close()
        await server.stop()
        await idle_only.stop()


# --- failures -------------------------------------------------------------------------------


async def test_a_receiver_that_is_down_gets_every_event_in_order_once_it_is_up(
    redis_url: str,
) -> None:
    down = WebhookReceiver()  # nothing listens on its port yet: connections are refused
    server, admin, hooks = await api_server(redis_url, url=down.url, max_attempts=50)

    def failed() -> float:
        value = REGISTRY.get_sample_value("spaces_webhook_deliveries_total", {"result": "failed"})
        return value or 0.0

    try:
        before = failed()
        space_id = await admin.create_space(passthrough="v1")
        await admin.spaces.UpdateSpace(
            space_pb2.UpdateSpaceRequest(id=space_id, passthrough="v2"), metadata=admin.md
        )
        await eventually(lambda: failed() >= before + 3, timeout=10)
        await down.start()
        accepted = await down.wait_accepted(2)
        await asyncio.sleep(0.3)
        assert [r.event["data"]["passthrough"] for r in down.received] == ["v1", "v2"]
        first = accepted[0].event
        assert first["type"] == "video.space.created"
        attempts = first["attempts"]
        assert len(attempts) >= 3
        for attempt in attempts:
            assert attempt["response_status_code"] is None
            assert attempt["address"] == down.url
            assert attempt["error"]
            assert MUX_TIME.match(attempt["created_at"])
        assert len({a["id"] for a in attempts}) == len(attempts)
        # The later event waited behind the failing one instead of overtaking it.
        assert accepted[1].event["attempts"] == []
    finally:
        await hooks.close()
        await admin.close()
        await server.stop()
        await down.stop()


async def test_a_receiver_down_for_good_ends_in_dead_letters_and_a_replay_delivers(
    redis_url: str, receiver: WebhookReceiver
) -> None:
    receiver.mode = "fail"
    server, admin, hooks = await api_server(redis_url, url=receiver.url, max_attempts=3)
    try:
        space_id = await admin.create_space()
        dead = await eventually(hooks.dead_letters, timeout=10)
        assert len(dead) == 1
        letter = dead[0]
        assert letter.endpoint_id == "config"
        assert letter.event_type == "video.space.created"
        assert letter.attempts == 3
        assert letter.last_error == "http 500"
        assert letter.failed_at_ms > 0
        assert len(receiver.received) == 3
        assert {r.event["id"] for r in receiver.received} == {letter.event_id}
        # The queue moved on: a later event of the space is delivered once the endpoint is up.
        receiver.mode = "ok"
        await admin.spaces.UpdateSpace(
            space_pb2.UpdateSpaceRequest(id=space_id, passthrough="later"), metadata=admin.md
        )
        await receiver.wait_accepted(1)
        assert await hooks.replay() == 1
        accepted = await receiver.wait_accepted(2)
        replayed = accepted[1].event
        assert replayed["id"] == letter.event_id
        assert replayed["type"] == "video.space.created"
        assert [a["response_status_code"] for a in replayed["attempts"]] == [500, 500, 500]
        assert await hooks.dead_letters() == []
        assert await hooks.replay() == 0
    finally:
        await hooks.close()
        await admin.close()
        await server.stop()


async def test_a_hanging_endpoint_never_delays_others_and_flaky_ones_keep_each_space_in_order(
    redis_url: str,
) -> None:
    """Two replicas deliver concurrently to a hanging, a flaky and a healthy endpoint. Each
    replica has 4 slots, at most 2 per endpoint, and the hanging endpoint has 5 spaces' events
    that never time out during the test: without the per-endpoint cap it would hold every slot
    and nothing else would be delivered."""
    hanging = await WebhookReceiver(mode="hang").start()
    flaky = await WebhookReceiver(mode="flaky").start()
    healthy = await WebhookReceiver().start()
    limits: dict[str, Any] = {"timeout_ms": 60_000, "concurrency": 4, "endpoint_concurrency": 2}
    server, admin, hooks = await api_server(redis_url, **limits)
    replica = await start_server(
        replace(
            make_config(redis_url=redis_url, services=("webhooks",)),
            webhooks=fast_webhooks(**limits),
        )
    )
    try:
        for r in (hanging, flaky, healthy):
            await hooks.create(r.url)
        spaces = [await admin.create_space(passthrough="0") for _ in range(5)]
        for version in range(1, 6):
            for space_id in spaces:
                await admin.spaces.UpdateSpace(
                    space_pb2.UpdateSpaceRequest(id=space_id, passthrough=str(version)),
                    metadata=admin.md,
                )
        expected = [str(v) for v in range(6)]
        await healthy.wait_accepted(30, within=10)
        await flaky.wait_accepted(30, within=20)
        # All the while, the hanging endpoint held its slots: 2 per replica, never answered.
        assert len(hanging.received) == 4
        assert hanging.accepted == []
        assert any(r.status == 500 for r in flaky.received)
        for receiver in (healthy, flaky):
            seen = by_space(receiver.accepted)
            assert sorted(seen) == sorted(spaces)
            for events in seen.values():
                assert [e["data"]["passthrough"] for e in events] == expected
        # It got first events of distinct spaces only: each space's later events wait.
        assert len({r.event["object"]["id"] for r in hanging.received}) == 4
        assert all(r.event["type"] == "video.space.created" for r in hanging.received)
    finally:
        await hooks.close()
        await admin.close()
        await replica.stop()
        await server.stop()
        for r in (hanging, flaky, healthy):
            await r.stop()


# --- crash ----------------------------------------------------------------------------------


async def test_a_replica_killed_mid_delivery_is_taken_over_and_nothing_is_lost(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    receiver = await WebhookReceiver(mode="hang").start()
    store = RedisStore(private_redis.url)
    await store.start()

    def replica(name: str) -> Process:
        env = {
            "SPACES_REDIS_URL": private_redis.url,
            "SPACES_ADMIN_KEY": ADMIN_KEY,
            "SPACES_GRPC_ADDR": f"127.0.0.1:{free_port()}",
            "SPACES_METRICS_ADDR": "",
            "SPACES_WEBHOOK_URL": receiver.url,
            "SPACES_WEBHOOK_SECRET": SECRET,
            "SPACES_WEBHOOK_LEASE_SECONDS": "1",
            "SPACES_WEBHOOK_TIMEOUT_SECONDS": "30",
            "SPACES_WEBHOOK_BACKOFF_SECONDS": "0.05",
            "SPACES_WEBHOOK_MAX_BACKOFF_SECONDS": "0.2",
            "SPACES_WEBHOOK_MAX_ATTEMPTS": "50",
        }
        return Process(["serve", "--services", "webhooks"], env, tmp_path / f"{name}.log")

    first = replica("first").start()
    second = replica("second")
    try:
        await wait_serving(first.env["SPACES_GRPC_ADDR"])
        spaces = [f"s{i}" + uuid.uuid4().hex[:8] for i in range(3)]
        for space_id in spaces:
            await store.create_space(space_id, "0", 0)
        for version in (1, 2):
            for space_id in spaces:
                await store.update_space(space_id, str(version), None)
        # The first replica is now posting each space's first event, and the receiver hangs.
        hung = await receiver.wait_received(3, within=15)
        first.kill()
        assert first.proc is not None and first.proc.returncode == -signal.SIGKILL
        receiver.mode = "ok"
        # Events that happen while no replica runs wait in the stream.
        for space_id in spaces:
            await store.update_space(space_id, "3", None)
        second.start()
        await receiver.wait_accepted(12, within=20)
        await asyncio.sleep(0.5)
        expected = [str(v) for v in range(4)]
        seen = by_space(receiver.accepted)
        assert sorted(seen) == sorted(spaces)
        for events in seen.values():
            assert [e["data"]["passthrough"] for e in events] == expected
        # The events caught mid-delivery went out again under the same id.
        assert {r.event["id"] for r in hung} <= {r.event["id"] for r in receiver.accepted}
        assert len(receiver.accepted) == 12
        assert "came back from a replica" in second.log()
    finally:
        first.kill()
        second.stop()
        await store.close()
        await receiver.stop()


# --- admin API ------------------------------------------------------------------------------


async def test_endpoint_admin_rpcs_validate_hide_secrets_and_protect_the_config_endpoint(
    receiver: WebhookReceiver,
) -> None:
    server, admin, hooks = await api_server("", url=receiver.url, event_types=())
    try:
        created = await hooks.create(
            "https://hooks.example.com/mux", secret="given", event_types=("video.space.idle",)
        )
        assert created.secret == "given"
        generated = await hooks.create("http://127.0.0.1:1/x")
        assert len(generated.secret) >= 32
        listed = {e.id: e for e in await hooks.endpoints()}
        assert set(listed) == {"config", created.id, generated.id}
        assert [listed[i].from_config for i in ("config", created.id)] == [True, False]
        assert listed["config"].url == receiver.url
        assert all(e.secret == "" for e in listed.values())
        assert list(listed[created.id].event_types) == ["video.space.idle"]

        bad: list[tuple[Any, grpc.StatusCode]] = [
            (hooks.create("ftp://example.com/x"), grpc.StatusCode.INVALID_ARGUMENT),
            (hooks.create("not a url"), grpc.StatusCode.INVALID_ARGUMENT),
            (
                hooks.create("http://x.test/", event_types=("video.asset.ready",)),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            (
                hooks.stub.DeleteWebhookEndpoint(
                    webhook_pb2.DeleteWebhookEndpointRequest(id="config"), metadata=hooks.md
                ),
                grpc.StatusCode.FAILED_PRECONDITION,
            ),
            (
                hooks.stub.DeleteWebhookEndpoint(
                    webhook_pb2.DeleteWebhookEndpointRequest(id="missing"), metadata=hooks.md
                ),
                grpc.StatusCode.NOT_FOUND,
            ),
            (
                hooks.stub.ListWebhookEndpoints(webhook_pb2.ListWebhookEndpointsRequest()),
                grpc.StatusCode.UNAUTHENTICATED,
            ),
        ]
        for call, code in bad:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == code
        # Broadcast event names are reserved, so endpoints may subscribe to them already.
        await hooks.create("http://x.test/", event_types=("video.space.broadcast.active",))
        await hooks.stub.DeleteWebhookEndpoint(
            webhook_pb2.DeleteWebhookEndpointRequest(id=created.id), metadata=hooks.md
        )
        assert created.id not in [e.id for e in await hooks.endpoints()]
    finally:
        await hooks.close()
        await admin.close()
        await server.stop()
