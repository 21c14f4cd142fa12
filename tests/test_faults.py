"""Fault tolerance in the local cluster (`spaces cluster`): real processes, real Redis, real
aiortc clients. A media node is SIGKILLed, a presence replica is killed mid-joins, Redis restarts
empty, a media node drains on SIGTERM."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from spaces.cluster import LocalCluster
from spaces.sdk import client as sdk
from spaces.sdk.media import TestPatternTrack, read_pattern, same_color
from spaces.store.redis import RedisStore
from spaces.v1 import node_pb2, participant_pb2, presence_pb2, presence_pb2_grpc
from tests.support.system import ADMIN_KEY, Admin, Tenant, eventually

LEASE_S = 5.0
"""The participant lease in these clusters ("one lease period"); heartbeat and staleness keep
their defaults (2 s / 5 s)."""
CLUSTER_ENV = {
    "SPACES_LEASE_SECONDS": str(LEASE_S),
    "SPACES_LEASE_RENEW_SECONDS": "1",
    "SPACES_PENDING_LEASE_SECONDS": "5",
    "SPACES_DRAIN_GRACE_SECONDS": "3",
    "SPACES_SHUTDOWN_GRACE_SECONDS": "1",
}
COLOR = (220, 120, 20)
MEDIA_BACK_S = 3.0
"""After a media node is SIGKILLed, its clients receive media again within this (issue 15)."""


@pytest.fixture
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[LocalCluster]:
    # Split: these tests kill one presence replica and must not take control or auth with it.
    local = LocalCluster(
        replicas=2, nodes=2, split=True, signals=1, env=CLUSTER_ENV, admin_key=ADMIN_KEY
    )
    failed_before = request.session.testsfailed
    await asyncio.to_thread(local.start)
    try:
        await asyncio.to_thread(local.wait_ready)
        yield local
    finally:
        await asyncio.to_thread(local.stop)
        if request.session.testsfailed == failed_before:
            shutil.rmtree(local.workdir, ignore_errors=True)
        else:  # the processes' logs, for whoever reads the failure
            print(f"cluster logs kept in {local.workdir}")


class Deployment:
    """Admin and presence clients for a running cluster."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.control = Admin(cluster.addresses("control")[0])
        self.auth = Admin(cluster.addresses("auth")[0])
        self.presence = Admin(cluster.addresses("presence")[0])
        assert cluster.redis is not None
        self.store = RedisStore(cluster.redis.url)

    async def tenant(self) -> Tenant:
        return Tenant(await self.auth.create_key())

    async def close(self) -> None:
        for admin in (self.control, self.auth, self.presence):
            await admin.close()
        await self.store.close()


@pytest.fixture
async def deployment(cluster: LocalCluster) -> AsyncIterator[Deployment]:
    d = Deployment(cluster)
    yield d
    await d.close()


async def call(
    d: Deployment, tenant: Tenant, space_id: str, pid: str, attempts: int = 5
) -> sdk.Space:
    space = sdk.Space(
        tenant.token(space_id, pid),
        d.cluster.addresses("presence")[-1],
        reconnect_attempts=attempts,
    )
    await space.join()
    return space


async def receiving(
    viewer: sdk.Space, pid: str, since: int = 0, count: int = 15
) -> sdk.RemoteTrack:
    try:
        track = await eventually(lambda: viewer.remote_track(pid, "camera"), timeout=15)
    except AssertionError as exc:
        seen = {p: [t.source for t in r.tracks.values()] for p, r in viewer.participants.items()}
        raise AssertionError(f"{viewer.participant_id} sees {seen}, not {pid}'s camera") from exc
    await eventually(lambda: track.frames_received > since + count, timeout=15)
    assert same_color(read_pattern(track.last_frame)[0], COLOR)
    return track


async def test_a_browser_whose_media_node_is_killed_is_placed_on_another_within_3s(
    deployment: Deployment,
) -> None:
    """Through the signaling service: the node's SIGKILL breaks the browser's session stream,
    the browser is told to reconnect (4001) and does, with only its token and reconnect_id. That
    reconnect cannot name the node it lost, but presence checks the node of the connection it
    takes over at once, so the space moves now rather than when the node's heartbeat is stale
    (5 s)."""
    from tests.support.websocket import Replica, Socket, joined

    d = deployment
    tenant = await d.tenant()
    space_id = await d.control.create_space()
    (url,) = d.cluster.signal_urls()
    replica = Replica(int(url.rstrip("/").rsplit(":", 1)[1]))
    token = tenant.token(space_id, "ann")
    first = await joined(replica, token)
    dead = first.received[0]["joined"]["sub_sfus"][0]["sfu_id"]
    survivor = next(n for n in ("media-0", "media-1") if n != dead)
    d.cluster.by_name(dead).kill()
    killed_at = time.monotonic()
    assert await first.closed() == 4001
    # The client reconnects at once (as Mux's SDK does: the first attempt is immediate).
    while True:
        again = await Socket.open(replica, token=token, reconnect_id="ann", reconnect_attempt="1")
        message = await again.next()
        if message is not None and "joined" in message:
            break
        await again.close()
        assert time.monotonic() - killed_at < 10, again.received
        await asyncio.sleep(0.2)
    elapsed = time.monotonic() - killed_at
    print(f"browser placed again {elapsed:.2f}s after SIGKILL")
    assert message["joined"]["sub_sfus"][0]["sfu_id"] == survivor
    assert message["joined"]["participant_id"] == "ann"
    assert elapsed < MEDIA_BACK_S, f"placed again only after {elapsed:.2f}s"
    for socket in (first, again):
        await socket.close()


async def test_media_node_killed_with_live_sessions(deployment: Deployment) -> None:
    d = deployment
    tenant = await d.tenant()
    space_id = await d.control.create_space()
    alice = await call(d, tenant, space_id, "alice")
    await alice.local.publish(TestPatternTrack(COLOR), "camera")
    bob = await call(d, tenant, space_id, "bob")
    carol = await call(d, tenant, space_id, "carol", attempts=0)  # will not come back
    track = await receiving(bob, "alice")
    dead = alice.node_id
    assert bob.node_id == dead == carol.node_id
    survivor = next(n for n in ("media-0", "media-1") if n != dead)

    d.cluster.by_name(dead).kill()
    killed_at = time.monotonic()
    frames_at_kill = track.frames_received

    # alice and bob reconnect on their own, to the other node, and media flows again. Their
    # Joins name the node they lost, so presence finds it dead at once instead of placing them
    # on it again until its heartbeat is stale (5 s). Timed from the kill, while the rest runs.
    async def time_media_back() -> float:
        def flowing() -> bool:
            fresh = bob.remote_track("alice", "camera")
            return (
                bob.node_id == survivor
                and fresh is not None
                and fresh is not track  # the track as received through the survivor
                and fresh.frames_received > 0
            )

        await eventually(flowing, timeout=12, interval=0.02)
        return time.monotonic() - killed_at

    media_back = asyncio.create_task(time_media_back())

    # carol's participant_id is free within one lease period (plus one reaper pass).
    async def carol_can_join() -> bool:
        try:
            await d.presence.presence.Join(
                presence_pb2.JoinRequest(token=tenant.token(space_id, "carol"))
            )
            return True
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.ALREADY_EXISTS
            return False

    await eventually(carol_can_join, timeout=LEASE_S + 3, interval=0.2)
    assert time.monotonic() - killed_at <= LEASE_S + 1.5

    recovered = await media_back
    print(f"media back {recovered:.2f}s after SIGKILL")
    assert recovered < MEDIA_BACK_S, f"media flowed again only after {recovered:.2f}s"
    track = await receiving(bob, "alice", since=0, count=10)
    assert alice.node_id == survivor
    assert alice.participant_id == "alice" and bob.participant_id == "bob"
    assert bob.reconnects >= 1 and frames_at_kill > 0

    # No ghost participant and no stale mapping left in Redis.
    async def clean() -> bool:
        people = await d.store.list_participants(space_id)
        connected = {
            p.participant_id
            for p in people
            if p.state == participant_pb2.PARTICIPANT_STATE_CONNECTED
        }
        on_dead = [p for p in people if p.node_id == dead]
        context = await d.store.join_context(space_id, "")
        return connected == {"alice", "bob"} and not on_dead and context.placement == survivor

    await eventually(clean, timeout=LEASE_S + 3)
    view = await d.store.list_nodes(60_000)
    dead_records = [n for n in view.nodes if n.id == dead]
    assert not dead_records or view.now_ms - dead_records[0].updated_at_ms > 5_000
    for space in (alice, bob, carol):
        await space.leave()


async def test_presence_replica_killed_mid_joins(deployment: Deployment) -> None:
    d = deployment
    tenant = await d.tenant()
    space_id = await d.control.create_space(max_participants=1000)
    doomed, healthy = d.cluster.addresses("presence")
    channels = [grpc.aio.insecure_channel(a) for a in (doomed, healthy)]
    stubs = [presence_pb2_grpc.PresenceServiceStub(c) for c in channels]

    async def attempt(i: int) -> str:
        try:
            await stubs[i % 2].Join(
                presence_pb2.JoinRequest(token=tenant.token(space_id, f"p{i}")), timeout=15
            )
            return "ok"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name

    burst = [asyncio.create_task(attempt(i)) for i in range(300)]
    await asyncio.sleep(0.05)
    d.cluster.by_name("presence-0").kill()
    results = await asyncio.gather(*burst)
    healthy_results = results[1::2]
    assert healthy_results.count("ok") == len(healthy_results), set(healthy_results)
    # The surviving replica keeps admitting.
    for i in range(300, 310):
        await stubs[1].Join(presence_pb2.JoinRequest(token=tenant.token(space_id, f"p{i}")))
    admitted = len(await d.store.list_participants(space_id))
    assert admitted >= len(healthy_results) + 10
    # Nothing the dead replica admitted stays stuck: unclaimed reservations lapse with their
    # pending lease, and the ids can join again.
    await asyncio.sleep(5 + 1.5)
    assert await d.store.list_participants(space_id) == []
    await stubs[1].Join(presence_pb2.JoinRequest(token=tenant.token(space_id, "p0")))
    for channel in channels:
        await channel.close()


async def test_redis_restarted_empty(deployment: Deployment) -> None:
    d = deployment
    tenant = await d.tenant()
    space_id = await d.control.create_space(passthrough="survives")
    alice = await call(d, tenant, space_id, "alice")
    await alice.local.publish(TestPatternTrack(COLOR), "camera")
    bob = await call(d, tenant, space_id, "bob")
    track = await receiving(bob, "alice")
    assert d.cluster.redis is not None

    d.cluster.redis.restart()
    restarted_at = time.monotonic()

    # Nodes re-register within a heartbeat (2 s), services recover without a restart.
    async def nodes_back() -> bool:
        try:
            view = await d.store.list_nodes(60_000)
        except Exception:
            return False
        return {n.id for n in view.nodes if n.state == node_pb2.NODE_STATE_SERVING} == {
            "media-0",
            "media-1",
        }

    await eventually(nodes_back, timeout=5)
    assert time.monotonic() - restarted_at < 2.0 + 1.5

    # Live sessions re-assert their presence: the space and both participants come back.
    async def reasserted() -> bool:
        try:
            people = await d.store.list_participants(space_id)
        except Exception:
            return False
        return {p.participant_id for p in people} == {"alice", "bob"}

    await eventually(reasserted, timeout=5)
    space = await d.control.get_space(space_id)
    assert space.passthrough == "survives"
    assert space.status == 2  # ACTIVE
    # Media never stopped.
    await receiving(bob, "alice", since=track.frames_received, count=20)
    assert bob.reconnects == 0

    # Uniqueness holds again (the signing keys were lost with the data: make a new one).
    fresh = await d.tenant()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await d.presence.presence.Join(
            presence_pb2.JoinRequest(token=fresh.token(space_id, "alice"))
        )
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert all(s.alive() for s in d.cluster.services)
    for participant in (alice, bob):
        await participant.leave()


async def test_media_node_drains_on_sigterm(deployment: Deployment) -> None:
    d = deployment
    tenant = await d.tenant()
    space_id = await d.control.create_space()
    alice = await call(d, tenant, space_id, "alice")
    await alice.local.publish(TestPatternTrack(COLOR), "camera")
    bob = await call(d, tenant, space_id, "bob")
    bob_events = bob.events()
    await receiving(bob, "alice")
    draining = alice.node_id
    other = next(n for n in ("media-0", "media-1") if n != draining)
    process = d.cluster.by_name(draining)

    process.signal(signal.SIGTERM)
    sent_at = time.monotonic()

    async def is_draining() -> bool:
        view = await d.store.list_nodes(60_000)
        return any(n.id == draining and n.state == node_pb2.NODE_STATE_DRAINING for n in view.nodes)

    await eventually(is_draining, timeout=3)
    # No new spaces go to a draining node.
    for _ in range(4):
        fresh_space = await d.control.create_space()
        reply = await d.presence.presence.Join(
            presence_pb2.JoinRequest(token=tenant.token(fresh_space))
        )
        assert reply.node_id == other
    # Its sessions are told to move, and the SDK moves them to the other node.
    await eventually(lambda: bob.node_id == other and bob.state == "joined", timeout=15)
    events = []
    while (event := bob_events.get_nowait()) is not None:
        events.append(event)
    assert any(isinstance(e, sdk.Reconnecting) and e.reason == "migrate" for e in events), [
        (type(e).__name__, getattr(e, "reason", "")) for e in events
    ]
    await receiving(bob, "alice", count=10)
    # And it exits within its grace period (3 s drain + 1 s shutdown + start-up slack).
    assert await asyncio.to_thread(process.proc.wait, 10) == 0  # type: ignore[union-attr]
    assert time.monotonic() - sent_at < 3 + 1 + 4
    for participant in (alice, bob):
        await participant.leave()
