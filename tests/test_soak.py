"""Soak: participants come and go for minutes, every way a session can end, while one publisher
stays. Afterwards nothing may be left behind: no session, subscription or forwarding target on
the node, no participant or lease in Redis, and the process (server and clients share it) holds
no more file descriptors, tasks or memory than after the first rounds.

Marked slow: `make test-slow` (SPACES_SESSION_SOAK_SECONDS, default 120, sets the length;
the cluster churn soak, tests/test_churn_soak.py, reads SPACES_SOAK_SECONDS)."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from spaces.sdk import client as sdk
from spaces.sdk.media import TestPatternTrack, ToneTrack
from spaces.server import SpacesServer
from spaces.session import events as ev
from spaces.store import keys
from spaces.v1 import presence_pb2
from tests.support.system import Admin, Tenant, eventually, make_config, start_server

SOAK_S = float(os.environ.get("SPACES_SESSION_SOAK_SECONDS", "120"))
WARMUP_ROUNDS = 3
"""Rounds before the baseline is taken: aiortc, grpc and codecs allocate caches once."""

pytestmark = [pytest.mark.slow, pytest.mark.timeout(SOAK_S + 240)]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def footprint() -> dict[str, float]:
    gc.collect()
    return {"fds": open_fds(), "tasks": len(asyncio.all_tasks()), "rss_mb": rss_mb()}


async def test_participants_coming_and_going_for_minutes_leave_nothing_behind(
    redis_url: str,
) -> None:
    server = await start_server(make_config(redis_url=redis_url))
    admin = Admin(server.address)
    redis = aioredis.from_url(redis_url)
    anchor: sdk.Space | None = None
    node = server.media_node
    assert node is not None
    try:
        tenant = Tenant(await admin.create_key())
        space_id = await admin.create_space()
        anchor = sdk.Space(tenant.token(space_id, "anchor"), server.address, decode=False)
        await anchor.join()
        await anchor.local.publish(TestPatternTrack((200, 40, 40), fps=15), "camera")
        await anchor.local.publish(ToneTrack(440), "microphone")

        async def receiving(pid: str, **kw: object) -> sdk.Space:
            space = sdk.Space(
                tenant.token(space_id, pid),
                server.address,
                decode=False,
                **kw,  # type: ignore[arg-type]
            )
            await space.join()
            track = await eventually(lambda: space.remote_track("anchor", "camera"), timeout=10)
            await eventually(lambda: track.packets_received > 20, timeout=10)
            return space

        async def leave(space: sdk.Space) -> None:
            await space.leave()

        async def drop(space: sdk.Space) -> None:
            """The client vanishes without a goodbye: the node sees its stream end."""
            connection_id = space.connection_id
            assert space._call is not None
            space._call.cancel()
            await eventually(lambda: connection_id not in node.sessions, timeout=10)
            await space.leave()

        async def kick(space: sdk.Space) -> None:
            await admin.presence.RemoveParticipant(
                presence_pb2.RemoveParticipantRequest(
                    space_id=space_id, participant_id=space.participant_id
                ),
                metadata=admin.md,
            )
            await eventually(lambda: space.state == "closed", timeout=10)
            await space.leave()

        async def resume_then_leave(space: sdk.Space) -> None:
            """The node tells the session to join again (a drain, a moved space); the SDK
            resumes the same participant, media flows again, then it leaves."""
            before = space.reconnects
            await node.sessions[space.connection_id].close(ev.CLOSE_MIGRATE, "join again")
            await eventually(lambda: space.reconnects > before and space.state == "joined", 15)
            track = await eventually(lambda: space.remote_track("anchor", "camera"), timeout=10)
            seen = track.packets_received
            await eventually(lambda: track.packets_received > seen + 10, timeout=10)
            await space.leave()

        endings: list[Callable[[sdk.Space], object]] = [leave, drop, kick, resume_then_leave]
        rounds = 0
        baseline: dict[str, float] = {}
        deadline = time.monotonic() + SOAK_S
        while time.monotonic() < deadline or rounds <= WARMUP_ROUNDS:
            names = [f"r{rounds}-{ending.__name__}" for ending in endings]
            spaces = await asyncio.gather(*(receiving(name) for name in names))
            await asyncio.gather(*(end(s) for end, s in zip(endings, spaces, strict=True)))  # type: ignore[misc]
            rounds += 1
            if rounds == WARMUP_ROUNDS:
                await settle(server, space_id)
                baseline = footprint()

        await settle(server, space_id)
        after = footprint()

        # The node: the anchor alone, its tracks forwarded to nobody.
        assert [s.participant_id for s in node.sessions.values()] == ["anchor"]
        room = node.rooms[space_id]
        assert [s.participant_id for s in room.sessions.values()] == ["anchor"]
        assert {t.owner.participant_id for t in room.tracks.values()} == {"anchor"}
        assert all(t.forwarder.downtracks == () for t in room.tracks.values())
        # Redis: one connection, one participant_id guard, one lease.
        assert [p.participant_id for p in await admin.participants(space_id)] == ["anchor"]
        conns = [k async for k in redis.scan_iter(match=keys.conn_key(space_id, "*"))]
        pids = [k async for k in redis.scan_iter(match=keys.pid_key(space_id, "*"))]
        assert len(conns) == 1 and len(pids) == 1
        assert await redis.zcard(keys.leases_key(space_id)) == 1
        # The process: nothing grows with the number of rounds.
        assert after["fds"] <= baseline["fds"] + 8, (baseline, after, rounds)
        assert after["tasks"] <= baseline["tasks"] + 8, (baseline, after, rounds)
        assert after["rss_mb"] <= baseline["rss_mb"] + 80, (baseline, after, rounds)
        print(f"soak: {rounds} rounds of {len(endings)} in {SOAK_S:.0f}s; {baseline} -> {after}")
    finally:
        if anchor is not None:
            await anchor.leave()
        await redis.aclose()
        await admin.close()
        await server.stop()


async def settle(server: SpacesServer, space_id: str) -> None:
    """Wait until only the anchor is left on the node (sessions end asynchronously)."""
    node = server.media_node
    assert node is not None

    def only_anchor() -> bool:
        room = node.rooms.get(space_id)
        return (
            len(node.sessions) == 1
            and room is not None
            and all(t.forwarder.downtracks == () for t in room.tracks.values())
        )

    await eventually(only_anchor, timeout=15)
    await asyncio.sleep(0.5)  # closed peer connections' last callbacks
