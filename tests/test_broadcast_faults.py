"""Broadcast faults with real processes: Redis, control/auth/presence, a media node and
`spaces broadcaster` workers as separate processes; nginx-rtmp as the receiver. A worker is
SIGKILLed mid-broadcast; the RTMP server is down at start, then stalls mid-stream."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spaces.cluster import LocalCluster
from spaces.sdk import client as sdk
from spaces.sdk.media import TestPatternTrack, ToneTrack
from spaces.store.redis import RedisStore
from spaces.v1 import broadcast_pb2, broadcast_pb2_grpc
from tests.support.rtmp import RtmpServer, decode_video
from tests.support.system import ADMIN_KEY, Admin, Tenant, eventually

MD = (("authorization", f"Bearer {ADMIN_KEY}"),)
LEASE_S = 3.0
ENV = {
    "SPACES_LEASE_SECONDS": "5",
    "SPACES_LEASE_RENEW_SECONDS": "1",
    "SPACES_SHUTDOWN_GRACE_SECONDS": "1",
    "SPACES_BROADCAST_LEASE_SECONDS": str(LEASE_S),
    "SPACES_BROADCAST_RENEW_SECONDS": "0.5",
    "SPACES_BROADCAST_VIDEO_OPTIONS": "preset=ultrafast",
    "SPACES_BROADCAST_RTMP_TIMEOUT_SECONDS": "3",
    "SPACES_BROADCAST_WATCHDOG_SECONDS": "8",
    "SPACES_BROADCAST_RETRY_MAX_SECONDS": "2",
}


@pytest.fixture
def rtmp() -> Iterator[RtmpServer]:
    server = RtmpServer()
    yield server
    server.close()


async def cluster_with(broadcasters: int, request: pytest.FixtureRequest) -> LocalCluster:
    local = LocalCluster(
        replicas=1, nodes=1, broadcasters=broadcasters, env=ENV, admin_key=ADMIN_KEY
    )
    await asyncio.to_thread(local.start)
    await asyncio.to_thread(local.wait_ready)
    return local


@pytest.fixture
async def two_workers(request: pytest.FixtureRequest) -> AsyncIterator[LocalCluster]:
    local = await cluster_with(2, request)
    yield local
    await asyncio.to_thread(local.stop)
    shutil.rmtree(local.workdir, ignore_errors=True)


@pytest.fixture
async def one_worker(request: pytest.FixtureRequest) -> AsyncIterator[LocalCluster]:
    local = await cluster_with(1, request)
    yield local
    await asyncio.to_thread(local.stop)
    shutil.rmtree(local.workdir, ignore_errors=True)


async def broadcasting(
    cluster: LocalCluster, rtmp: RtmpServer, key: str
) -> tuple[Admin, broadcast_pb2_grpc.BroadcastServiceStub, sdk.Space, str, str]:
    control = Admin(cluster.api_addresses("control")[0])
    auth = Admin(cluster.api_addresses("auth")[0])
    tenant = Tenant(await auth.create_key())
    await auth.close()
    space_id = await control.create_space()
    alice = sdk.Space(tenant.token(space_id, "alice"), cluster.api_addresses("presence")[0])
    await alice.join()
    await alice.local.publish(TestPatternTrack((220, 40, 40), 640, 480), "camera")
    await alice.local.publish(ToneTrack(440, 0.2), "microphone")
    stub = broadcast_pb2_grpc.BroadcastServiceStub(control.channel)
    b = await stub.CreateBroadcast(
        broadcast_pb2.CreateBroadcastRequest(
            space_id=space_id,
            rtmp_url=rtmp.url(),
            stream_key=key,
            resolution=broadcast_pb2.BROADCAST_RESOLUTION_1280X720,
        ),
        metadata=MD,
    )
    await stub.StartBroadcast(
        broadcast_pb2.StartBroadcastRequest(space_id=space_id, broadcast_id=b.id), metadata=MD
    )
    return control, stub, alice, space_id, b.id


async def get(
    stub: broadcast_pb2_grpc.BroadcastServiceStub, space_id: str, bid: str
) -> broadcast_pb2.Broadcast:
    return await stub.GetBroadcast(
        broadcast_pb2.GetBroadcastRequest(space_id=space_id, broadcast_id=bid), metadata=MD
    )


def new_recording_with_frames(rtmp: RtmpServer, key: str, after: int) -> bool:
    paths = rtmp.recordings(key)
    return len(paths) > after and any(len(decode_video(p, 5)) >= 5 for p in paths[after:])


def composers_of(pid: int) -> list[int]:
    """Composer processes started by the worker with this pid (still running)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"spaces.broadcast.composer" in cmdline and (
            f"SPACES_COMPOSER_PARENT={pid}".encode() in environ.split(b"\0")
        ):
            found.append(int(entry.name))
    return found


async def test_sigkilled_worker_broadcast_resumes_on_another_within_15s(
    two_workers: LocalCluster, rtmp: RtmpServer
) -> None:
    cluster = two_workers
    rtmp.start()
    control, stub, alice, space_id, bid = await broadcasting(cluster, rtmp, "failover")
    try:
        await eventually(
            lambda: asyncio.to_thread(new_recording_with_frames, rtmp, "failover", 0),
            timeout=60,
            interval=0.5,
        )
        holder = (await eventually(lambda: _held(stub, space_id, bid), timeout=10)).worker_id
        victim = cluster.by_name(holder)
        assert victim.proc is not None
        victim_pid = victim.proc.pid
        assert composers_of(victim_pid)
        before = len(rtmp.recordings("failover"))
        killed = time.monotonic()
        victim.signal(signal.SIGKILL)
        await eventually(
            lambda: asyncio.to_thread(new_recording_with_frames, rtmp, "failover", before),
            timeout=20,
            interval=0.25,
        )
        resumed = time.monotonic() - killed
        assert resumed <= 15.0, resumed
        # Its composer died with it: never a second publisher on the stream.
        assert composers_of(victim_pid) == []
        survivor = (await get(stub, space_id, bid)).worker_id
        assert survivor and survivor != holder
        # No broadcast stays claimed by a dead worker: kill the survivor too, and within a lease
        # period the broadcast is claimable again, held by nobody.
        cluster.by_name(survivor).signal(signal.SIGKILL)
        orphan = await eventually(lambda: _unheld(stub, space_id, bid), timeout=LEASE_S + 3)
        assert orphan.status == broadcast_pb2.BROADCAST_STATUS_ACTIVE
        assert cluster.redis is not None
        store = RedisStore(cluster.redis.url)
        try:
            assert (space_id, bid) in await store.broadcasts_due(10)
        finally:
            await store.close()
    finally:
        await alice.leave()
        await control.close()


async def _held(
    stub: broadcast_pb2_grpc.BroadcastServiceStub, space_id: str, bid: str
) -> broadcast_pb2.Broadcast | None:
    got = await get(stub, space_id, bid)
    return got if got.worker_id and got.streaming else None


async def _unheld(
    stub: broadcast_pb2_grpc.BroadcastServiceStub, space_id: str, bid: str
) -> broadcast_pb2.Broadcast | None:
    got = await get(stub, space_id, bid)
    return got if not got.worker_id else None


async def health_times(address: str, seconds: float) -> list[float]:
    """Round trips of gRPC health checks (1 s deadline each) for ``seconds``."""
    times = []
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.monotonic()
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            times.append(time.monotonic() - started)
            await asyncio.sleep(0.2)
    return times


async def test_rtmp_down_at_start_then_stalled_is_retried_while_the_worker_stays_responsive(
    one_worker: LocalCluster, rtmp: RtmpServer
) -> None:
    cluster = one_worker
    worker = cluster.by_name("broadcaster-0")
    control, stub, alice, space_id, bid = await broadcasting(cluster, rtmp, "flaky")
    try:
        # Nobody listens yet: the worker retries, says why, and answers health meanwhile.
        failing = await eventually(lambda: _erring(stub, space_id, bid, "rtmp"), timeout=15)
        assert not failing.streaming and failing.worker_id == "broadcaster-0"
        assert max(await health_times(worker.address, 3.0)) < 1.0
        rtmp.start()
        await eventually(
            lambda: asyncio.to_thread(new_recording_with_frames, rtmp, "flaky", 0),
            timeout=30,
            interval=0.5,
        )
        await eventually(lambda: _held(stub, space_id, bid), timeout=10)
        # The server stops reading mid-stream: the write blocks, the composer is replaced.
        before = len(rtmp.recordings("flaky"))
        rtmp.stall()
        assert max(await health_times(worker.address, 6.0)) < 1.0
        stalled = await eventually(lambda: _erring(stub, space_id, bid, "stall"), timeout=15)
        assert not stalled.streaming
        rtmp.resume()
        await eventually(
            lambda: asyncio.to_thread(new_recording_with_frames, rtmp, "flaky", before),
            timeout=30,
            interval=0.5,
        )
        assert (await eventually(lambda: _held(stub, space_id, bid), timeout=10)).worker_id == (
            "broadcaster-0"
        )
    finally:
        if rtmp.proc is not None:
            rtmp.resume()
        await alice.leave()
        await control.close()


async def _erring(
    stub: broadcast_pb2_grpc.BroadcastServiceStub, space_id: str, bid: str, word: str
) -> broadcast_pb2.Broadcast | None:
    got = await get(stub, space_id, bid)
    return got if word in got.last_error else None
