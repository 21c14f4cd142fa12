"""PresenceService: admission, uniqueness across replicas, leases, resume, lifecycle, placement
and events. Real gRPC servers, real Redis, real presence processes."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import jwt
import pytest

from spaces.auth.keys import generate_signing_key
from spaces.config import LeaseConfig, RegistryConfig
from spaces.routing.registry import NodeHeartbeat
from spaces.sdk import client as sdk
from spaces.sdk.tokens import load_private_key
from spaces.server import SpacesServer
from spaces.store.base import Store
from spaces.store.memory import MemoryStore
from spaces.store.redis import RedisStore
from spaces.v1 import event_pb2, node_pb2, presence_pb2, presence_pb2_grpc, space_pb2
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

REGISTRY = RegistryConfig(heartbeat_ms=200, stale_ms=800, cache_ms=50)


class FakeNode:
    """A registry entry kept alive by the real heartbeat code, without a media stack: placement
    only looks at the registry."""

    def __init__(self, store: Store, node_id: str, load: float = 0.0) -> None:
        self.record = node_pb2.Node(
            id=node_id,
            address=f"127.0.0.1:{free_port()}",
            state=node_pb2.NODE_STATE_SERVING,
            load=load,
            max_sessions=100,
        )
        self.heartbeat = NodeHeartbeat(store, REGISTRY, lambda: self.record)

    def start(self) -> FakeNode:
        self.heartbeat.start()
        return self

    async def started(self) -> FakeNode:
        """Started, and visible in the registry (the first heartbeat has landed)."""
        self.start()
        await eventually(lambda: self.heartbeat.beats > 0, timeout=10, interval=0.02)
        await asyncio.sleep(REGISTRY.cache_ms / 1000 * 2)  # presence's cached view catches up
        return self

    async def stop(self) -> None:
        await self.heartbeat.stop()


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


@pytest.fixture(params=["memory", "redis"])
async def presence_only(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[tuple[SpacesServer, Store]]:
    """control + auth + presence (no media node), on either store."""
    if request.param == "redis":
        store: Store = RedisStore(redis_server.url)
        await store.client.flushall()  # type: ignore[attr-defined]
    else:
        store = MemoryStore()
    config = make_config(
        services=("control", "auth", "presence"),
        redis_url=redis_server.url if request.param == "redis" else "",
        registry=REGISTRY,
        leases=LeaseConfig(
            pending_ms=800,
            session_ms=2000,
            renew_interval_ms=500,
            placement_ms=3000,
            reap_interval_ms=100,
        ),
    )
    server = SpacesServer(config, store=store)
    await server.start()
    yield server, store
    await server.stop()
    await store.close()


async def setup(server: SpacesServer) -> tuple[Admin, Tenant, str]:
    admin = Admin(server.address)
    tenant = Tenant(await admin.create_key())
    return admin, tenant, await admin.create_space()


async def join(admin: Admin, token: str, **kw: str) -> presence_pb2.JoinResponse:
    return await admin.presence.Join(presence_pb2.JoinRequest(token=token, **kw))


# --- admission ------------------------------------------------------------------------------


async def test_join_reply_carries_everything_a_client_needs(presence_only: tuple) -> None:
    server, store = presence_only
    admin, tenant, space_id = await setup(server)
    node = await FakeNode(store, "n1").started()
    try:
        reply = await join(
            admin, tenant.token(space_id, "alice", role="subscriber"), display_name="Alice"
        )
        assert reply.participant_id == "alice"
        assert reply.space_id == space_id
        assert reply.role == 2  # ROLE_SUBSCRIBER
        assert reply.connection_id and reply.resume_secret and reply.ticket
        assert reply.node_id == "n1" and reply.media_address == node.record.address
        assert reply.limits.custom_events_per_second > 0
        assert reply.limits.tracks_per_source >= 1
        assert reply.limits.custom_event_max_bytes == 4096
        assert reply.ticket_expires_at_ms > time.time() * 1000
        second = await join(admin, tenant.token(space_id, "bob"))
        assert second.connection_id != reply.connection_id
        participant = await admin.presence.GetParticipant(
            presence_pb2.GetParticipantRequest(space_id=space_id, participant_id="alice"),
            metadata=admin.md,
        )
        assert participant.display_name == "Alice"
        assert participant.state == 1  # PENDING until the media node claims it
    finally:
        await node.stop()
        await admin.close()


async def test_duplicate_participant_id_is_already_exists(presence_only: tuple) -> None:
    server, store = presence_only
    admin, tenant, space_id = await setup(server)
    node = await FakeNode(store, "n1").started()
    try:
        await join(admin, tenant.token(space_id, "alice"))
        error = await rpc_error(join(admin, tenant.token(space_id, "alice")))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "already connected" in (error.details() or "")
        # Without a participant_id the same token may be used many times.
        token = tenant.token(space_id)
        ids = {(await join(admin, token)).participant_id for _ in range(3)}
        assert len(ids) == 3
    finally:
        await node.stop()
        await admin.close()


async def test_pending_lease_lapses_and_the_id_can_join_again(presence_only: tuple) -> None:
    server, store = presence_only
    admin, tenant, space_id = await setup(server)
    node = await FakeNode(store, "n1").started()
    try:
        await join(admin, tenant.token(space_id, "alice"))
        error = await rpc_error(join(admin, tenant.token(space_id, "alice")))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        await asyncio.sleep(1.2)  # the pending lease is 0.8 s: nobody claimed the ticket
        reply = await join(admin, tenant.token(space_id, "alice"))
        assert reply.participant_id == "alice"
    finally:
        await node.stop()
        await admin.close()


async def test_resume_takes_over_and_a_wrong_secret_is_refused(presence_only: tuple) -> None:
    server, store = presence_only
    admin, tenant, space_id = await setup(server)
    node = await FakeNode(store, "n1").started()
    try:
        first = await join(admin, tenant.token(space_id, "alice"))
        resumed = await join(
            admin, tenant.token(space_id, "alice"), resume_secret=first.resume_secret
        )
        assert resumed.resumed is True
        assert resumed.participant_id == "alice"
        assert resumed.connection_id != first.connection_id
        wrong = first.resume_secret[:-4] + "AAAA"
        error = await rpc_error(
            join(
                admin,
                tenant.token(space_id, "alice"),
                resume_secret=resumed.resume_secret[:-4] + "AAAA",
            )
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        error = await rpc_error(
            join(admin, tenant.token(space_id, "mallory"), resume_secret=resumed.resume_secret)
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        error = await rpc_error(join(admin, tenant.token(space_id, "alice"), resume_secret=wrong))
        assert error.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS)
        error = await rpc_error(
            join(admin, tenant.token(space_id, "alice"), resume_secret="garbage")
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        participants = await admin.participants(space_id)
        assert [p.connection_id for p in participants] == [resumed.connection_id]
    finally:
        await node.stop()
        await admin.close()


async def test_every_bad_token_is_unauthenticated_through_join(presence_only: tuple) -> None:
    server, store = presence_only
    admin, tenant, space_id = await setup(server)
    node = await FakeNode(store, "n1").started()
    pem = load_private_key(tenant.key.private_key)
    now = int(time.time())
    base = {"sub": space_id, "aud": "rt", "kid": tenant.key.id, "exp": now + 60}

    def b64(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    other = generate_signing_key()
    revoked = Tenant(await admin.create_key())
    revoked_token = revoked.token(space_id)
    await admin.keys.DeleteSigningKey(
        __import__("spaces.v1.signing_key_pb2", fromlist=["x"]).DeleteSigningKeyRequest(
            id=revoked.key.id
        ),
        metadata=admin.md,
    )
    cases = {
        "alg none": b64({"alg": "none", "kid": tenant.key.id}) + "." + b64(base) + ".",
        "hs256 with public key": jwt.encode(
            base, "public-key-as-secret", "HS256", headers={"kid": tenant.key.id}
        ),
        "wrong aud": jwt.encode({**base, "aud": "video"}, pem, "RS256"),
        "no aud": jwt.encode({k: v for k, v in base.items() if k != "aud"}, pem, "RS256"),
        "expired": jwt.encode({**base, "exp": now - 3600}, pem, "RS256"),
        "no exp": jwt.encode({k: v for k, v in base.items() if k != "exp"}, pem, "RS256"),
        "unknown kid": jwt.encode({**base, "kid": "unknownkey"}, pem, "RS256"),
        "revoked kid": revoked_token,
        "another key's signature": jwt.encode(
            base, load_private_key(other.private_key_b64), "RS256"
        ),
        "garbage": "garbage.garbage.garbage",
        "one megabyte": "x" * (1 << 20),
    }
    try:
        for name, token in cases.items():
            error = await rpc_error(join(admin, token))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, name
            details = error.details() or ""
            assert details and details[0].islower() and len(details) < 100, (name, details)
        # Mux's own sample shape: kid in the payload only.
        seed = jwt.encode(
            {**base, "role": "publisher", "participant_id": "MY_CUSTOM_ID"}, pem, "RS256"
        )
        assert (await join(admin, seed)).participant_id == "MY_CUSTOM_ID"
        # A token for a deleted space: NOT_FOUND.
        await admin.spaces.DeleteSpace(
            space_pb2.DeleteSpaceRequest(id=space_id, force=True), metadata=admin.md
        )
        error = await rpc_error(join(admin, tenant.token(space_id, "late")))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        # The server keeps serving.
        assert await admin.create_space()
    finally:
        await node.stop()
        await admin.close()


async def test_participant_limit_is_resource_exhausted(presence_only: tuple) -> None:
    server, store = presence_only
    admin = Admin(server.address)
    tenant = Tenant(await admin.create_key())
    space_id = await admin.create_space(max_participants=2)
    node = await FakeNode(store, "n1").started()
    try:
        await join(admin, tenant.token(space_id))
        await join(admin, tenant.token(space_id))
        error = await rpc_error(join(admin, tenant.token(space_id)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "full" in (error.details() or "")
    finally:
        await node.stop()
        await admin.close()


async def test_oversized_display_name_is_invalid_argument(presence_only: tuple) -> None:
    server, store = presence_only
    admin, tenant, space_id = await setup(server)
    node = await FakeNode(store, "n1").started()
    try:
        error = await rpc_error(join(admin, tenant.token(space_id), display_name="x" * 65))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "64" in (error.details() or "")
    finally:
        await node.stop()
        await admin.close()


# --- placement ------------------------------------------------------------------------------


async def test_no_media_node_is_unavailable_with_a_message(presence_only: tuple) -> None:
    server, _ = presence_only
    admin, tenant, space_id = await setup(server)
    error = await rpc_error(join(admin, tenant.token(space_id)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "no media node available" in (error.details() or "")
    await admin.close()


async def test_a_spaces_participants_land_on_one_node(presence_only: tuple) -> None:
    server, store = presence_only
    admin, tenant, space_id = await setup(server)
    nodes = [await FakeNode(store, f"n{i}").started() for i in range(3)]
    try:
        await asyncio.sleep(0.3)
        placed = {(await join(admin, tenant.token(space_id))).node_id for _ in range(12)}
        assert len(placed) == 1
        # Different spaces spread over the nodes (two random choices among equals).
        spread = set()
        for _ in range(12):
            other = await admin.create_space()
            spread.add((await join(admin, tenant.token(other))).node_id)
        assert len(spread) >= 2
    finally:
        for node in nodes:
            await node.stop()
        await admin.close()


async def test_less_loaded_node_is_chosen(presence_only: tuple) -> None:
    server, store = presence_only
    admin, tenant, _ = await setup(server)
    busy = await FakeNode(store, "busy", load=0.9).started()
    idle = await FakeNode(store, "idle", load=0.1).started()
    try:
        await asyncio.sleep(0.3)
        for _ in range(5):
            space_id = await admin.create_space()
            assert (await join(admin, tenant.token(space_id))).node_id == "idle"
    finally:
        await busy.stop()
        await idle.stop()
        await admin.close()


async def test_a_node_that_stops_heartbeating_is_not_chosen(presence_only: tuple) -> None:
    server, store = presence_only
    admin, tenant, space_id = await setup(server)
    first = await FakeNode(store, "first").started()
    try:
        await asyncio.sleep(0.3)
        assert (await join(admin, tenant.token(space_id))).node_id == "first"
        second = await FakeNode(store, "second").started()
        await first.stop()  # silent from now on, like a crashed node
        await asyncio.sleep(1.0)  # stale after 0.8 s
        # The space's sticky mapping is re-checked and replaced; new spaces avoid it too.
        assert (await join(admin, tenant.token(space_id))).node_id == "second"
        other = await admin.create_space()
        assert (await join(admin, tenant.token(other))).node_id == "second"
        await second.stop()
    finally:
        await first.stop()
        await admin.close()


async def test_a_draining_node_receives_no_new_spaces(presence_only: tuple) -> None:
    server, store = presence_only
    admin, tenant, _ = await setup(server)
    draining = await FakeNode(store, "draining").started()
    serving = await FakeNode(store, "serving").started()
    try:
        await asyncio.sleep(0.3)
        draining.record.state = node_pb2.NODE_STATE_DRAINING
        beats = draining.heartbeat.beats
        draining.heartbeat.beat_now()
        await eventually(lambda: draining.heartbeat.beats > beats, interval=0.02)
        await asyncio.sleep(REGISTRY.cache_ms / 1000 * 2)
        for _ in range(6):
            space_id = await admin.create_space()
            assert (await join(admin, tenant.token(space_id))).node_id == "serving"
        await serving.stop()
        await asyncio.sleep(1.0)
        error = await rpc_error(join(admin, tenant.token(await admin.create_space())))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await draining.stop()
        await serving.stop()
        await admin.close()


# --- lifecycle with a real media node ------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def full_system(
    request: pytest.FixtureRequest, redis_url: str
) -> AsyncIterator[SpacesServer]:
    config = make_config(redis_url=redis_url if request.param == "redis" else "")
    server = await start_server(config)
    yield server
    await server.stop()


async def test_space_goes_active_and_idle_with_a_new_session_id_each_time(
    full_system: SpacesServer,
) -> None:
    admin, tenant, space_id = await setup(full_system)
    sessions = []
    for _ in range(2):
        assert (await admin.get_space(space_id)).status == space_pb2.SPACE_STATUS_IDLE
        space = sdk.Space(tenant.token(space_id, "alice"), full_system.address)
        await space.join()
        active = await admin.get_space(space_id)
        assert active.status == space_pb2.SPACE_STATUS_ACTIVE
        assert active.active_session_id
        sessions.append(active.active_session_id)
        await space.leave()
        idle = await admin.get_space(space_id)
        assert idle.status == space_pb2.SPACE_STATUS_IDLE
        assert idle.active_session_id == ""
    assert sessions[0] != sessions[1]
    await admin.close()


async def test_forced_delete_removes_participants_and_closes_their_sessions(
    full_system: SpacesServer,
) -> None:
    admin, tenant, space_id = await setup(full_system)
    space = sdk.Space(tenant.token(space_id, "alice"), full_system.address)
    events = space.events()
    await space.join()
    assert len(await admin.participants(space_id)) == 1
    error = await rpc_error(
        admin.spaces.DeleteSpace(space_pb2.DeleteSpaceRequest(id=space_id), metadata=admin.md)
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    await admin.spaces.DeleteSpace(
        space_pb2.DeleteSpaceRequest(id=space_id, force=True), metadata=admin.md
    )

    async def disconnected() -> sdk.Disconnected | None:
        while (event := events.get_nowait()) is not None:
            if isinstance(event, sdk.Disconnected):
                return event
        return None

    event = await eventually(disconnected, timeout=5)
    assert event.reason == "space_deleted"
    error = await rpc_error(admin.participants(space_id))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    await space.leave()
    await admin.close()


async def test_remove_participant_closes_the_session_with_a_reason(
    full_system: SpacesServer,
) -> None:
    admin, tenant, space_id = await setup(full_system)
    space = sdk.Space(tenant.token(space_id, "alice"), full_system.address)
    events = space.events()
    await space.join()
    await admin.presence.RemoveParticipant(
        presence_pb2.RemoveParticipantRequest(space_id=space_id, participant_id="alice"),
        metadata=admin.md,
    )

    async def removed() -> sdk.Disconnected | None:
        while (event := events.get_nowait()) is not None:
            if isinstance(event, sdk.Disconnected):
                return event
        return None

    event = await eventually(removed, timeout=5)
    assert event.reason == "removed"
    assert space.reconnects == 0  # a removed participant does not come back on its own
    assert (await admin.get_space(space_id)).status == space_pb2.SPACE_STATUS_IDLE
    error = await rpc_error(
        admin.presence.RemoveParticipant(
            presence_pb2.RemoveParticipantRequest(space_id=space_id, participant_id="alice"),
            metadata=admin.md,
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    await space.leave()
    await admin.close()


async def test_leave_with_the_resume_secret_frees_the_id(full_system: SpacesServer) -> None:
    admin, tenant, space_id = await setup(full_system)
    reply = await join(admin, tenant.token(space_id, "alice"))
    await admin.presence.Leave(presence_pb2.LeaveRequest(resume_secret=reply.resume_secret))
    assert (await join(admin, tenant.token(space_id, "alice"))).participant_id == "alice"
    error = await rpc_error(
        admin.presence.Leave(presence_pb2.LeaveRequest(resume_secret=reply.resume_secret))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    await admin.close()


# --- many replicas on one Redis ------------------------------------------------------------


def presence_env(redis: RedisServer, port: int, **extra: str) -> dict[str, str]:
    return {
        "SPACES_REDIS_URL": redis.url,
        "SPACES_ADMIN_KEY": ADMIN_KEY,
        "SPACES_GRPC_ADDR": f"127.0.0.1:{port}",
        "SPACES_METRICS_ADDR": "",
        "SPACES_NODE_STALE_SECONDS": "5",
        **extra,
    }


@pytest.fixture
async def replicas(
    private_redis: RedisServer, tmp_path: Path
) -> AsyncIterator[tuple[list[str], RedisStore]]:
    """Three `spaces serve --services presence` processes on one Redis."""
    processes = []
    addresses = []
    for i in range(3):
        port = free_port()
        process = Process(
            ["serve", "--services", "presence"],
            presence_env(private_redis, port),
            tmp_path / f"presence-{i}.log",
        ).start()
        processes.append(process)
        addresses.append(f"127.0.0.1:{port}")
    store = RedisStore(private_redis.url)
    try:
        for address in addresses:
            await wait_serving(address, timeout=30)
        yield addresses, store
    finally:
        for process in processes:
            process.stop()
        await store.close()


async def test_contested_joins_across_three_replicas_admit_exactly_one(
    replicas: tuple[list[str], RedisStore],
) -> None:
    addresses, store = replicas
    generated = generate_signing_key()
    await store.create_signing_key("contestkey", generated.public_key_pem)
    tenant = Tenant(
        __import__("spaces.v1.signing_key_pb2", fromlist=["x"]).SigningKey(
            id="contestkey", private_key=generated.private_key_b64
        )
    )
    node = await FakeNode(store, "contest-node").started()
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs = [presence_pb2_grpc.PresenceServiceStub(c) for c in channels]
    try:
        await asyncio.sleep(0.3)
        rounds, per_round = 6, 510
        for round_no in range(rounds):
            space_id = f"contest{round_no}"
            await store.create_space(space_id, "", 1000)
            token = tenant.token(space_id, "the-one")

            async def attempt(i: int, token: str = token) -> grpc.StatusCode:
                try:
                    await stubs[i % 3].Join(presence_pb2.JoinRequest(token=token), timeout=60)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    return exc.code()

            results = await asyncio.gather(*(attempt(i) for i in range(per_round)))
            assert results.count(grpc.StatusCode.OK) == 1, round_no
            assert results.count(grpc.StatusCode.ALREADY_EXISTS) == per_round - 1, (
                round_no,
                {code.name: results.count(code) for code in set(results)},
            )
            assert len(await store.list_participants(space_id)) == 1
    finally:
        await node.stop()
        for channel in channels:
            await channel.close()


async def test_watch_events_on_one_replica_sees_joins_through_another(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """Two presence replicas and a media node process on one Redis: a participant joins through
    replica B; a watcher on replica A sees it, and a watcher that reconnects with the last event
    id misses nothing."""
    ports = [free_port() for _ in range(3)]
    env = {**presence_env(private_redis, 0)}
    a = Process(
        ["serve", "--services", "control,auth,presence"],
        {**env, "SPACES_GRPC_ADDR": f"127.0.0.1:{ports[0]}"},
        tmp_path / "a.log",
    ).start()
    b = Process(
        ["serve", "--services", "presence"],
        {**env, "SPACES_GRPC_ADDR": f"127.0.0.1:{ports[1]}"},
        tmp_path / "b.log",
    ).start()
    node = Process(
        ["media-node"],
        {
            **env,
            "SPACES_GRPC_ADDR": f"127.0.0.1:{ports[2]}",
            "SPACES_NODE_ID": "m1",
            "SPACES_ICE_BIND": "127.0.0.1",
        },
        tmp_path / "node.log",
    ).start()
    try:
        for port in ports:
            await wait_serving(f"127.0.0.1:{port}", timeout=30)
        admin_a = Admin(f"127.0.0.1:{ports[0]}")
        tenant = Tenant(await admin_a.create_key())
        space_id = await admin_a.create_space()
        watch = admin_a.presence.WatchEvents(
            presence_pb2.WatchEventsRequest(space_id=space_id), metadata=admin_a.md
        )
        await asyncio.sleep(0.5)
        client = sdk.Space(tenant.token(space_id, "alice"), f"127.0.0.1:{ports[1]}")
        await client.join()
        seen: list[event_pb2.Event] = []
        async for event in watch:
            seen.append(event)
            if event.type == event_pb2.EVENT_TYPE_PARTICIPANT_JOINED:
                break
        watch.cancel()
        assert [e.type for e in seen] == [
            event_pb2.EVENT_TYPE_SPACE_ACTIVE,
            event_pb2.EVENT_TYPE_PARTICIPANT_JOINED,
        ]
        assert seen[-1].participant.participant_id == "alice"
        assert seen[-1].participant.node_id == "m1"
        last = seen[-1].id
        # Disconnected watcher: events happen meanwhile; resuming after `last` misses nothing.
        await client.leave()
        resumed = admin_a.presence.WatchEvents(
            presence_pb2.WatchEventsRequest(space_id=space_id, after_id=last), metadata=admin_a.md
        )
        later = []
        async for event in resumed:
            later.append(event.type)
            if event.type == event_pb2.EVENT_TYPE_SPACE_IDLE:
                break
        resumed.cancel()
        assert later == [event_pb2.EVENT_TYPE_PARTICIPANT_LEFT, event_pb2.EVENT_TYPE_SPACE_IDLE]
        bad = admin_a.presence.WatchEvents(
            presence_pb2.WatchEventsRequest(after_id="not-an-id"), metadata=admin_a.md
        )
        error = await rpc_error(bad.read())
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        await admin_a.close()
    finally:
        for process in (a, b, node):
            process.stop()


def test_replicas_config_is_split_by_services_flag() -> None:
    from spaces.config import ServerConfig

    config = ServerConfig.from_env({"SPACES_REDIS_URL": "redis://x"}, services="presence")
    assert config.services == frozenset({"presence"})
    config = replace(config, services=frozenset({"presence", "media"}))
    assert "media" in config.services
