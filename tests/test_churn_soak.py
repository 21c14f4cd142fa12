"""Churn soak: a local cluster (Redis with an append-only file, one API process, two media
nodes, all real processes) while participants join, publish, are watched, and leave, are
kicked or vanish, spaces are deleted and created, one media node is killed or drained and
restarted again and again, and Redis restarts. At the start (after warm-up) and at the end,
with nobody connected, it records what the long-lived processes hold (memory, file
descriptors, asyncio tasks) and what Redis holds. They must be flat within 10%, and no key may
be left behind.

`make test` runs a short version (SHORT_S); `make test-slow` runs SPACES_SOAK_SECONDS (default
1800: 30 minutes). SPACES_SOAK_REPORT names a JSON file for the figures (docs/soak.md);
SPACES_SOAK_TRACE a file that gets the long-lived processes' RSS after every round;
SPACES_SOAK_SMAPS a folder that gets their memory maps at the start and the end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from spaces.cluster import LocalCluster, ServiceProcess
from spaces.sdk import client as sdk
from spaces.sdk.media import TestPatternTrack, ToneTrack
from spaces.v1 import presence_pb2, space_pb2
from tests.support.system import ADMIN_KEY, Admin, Tenant, eventually

SHORT_S = 45.0
LONG_S = float(os.environ.get("SPACES_SOAK_SECONDS", "1800"))
SPACES = 3
WARMUP_ROUNDS = 3
WARMUP_CHAOS_S = 30.0
"""The warm-up's one kill, Redis restart and drain happen within this (Chaos's short schedule)."""
FLAT = 0.10
"""Allowed growth from start to end: 10%."""
SLACK = {"fds": 4, "tasks": 4, "rss_mb": 0.0, "anon_mb": 0.0}
"""Absolute allowance on top, for tiny baselines (15 fds: 10% is 1.5); none for memory."""
REDIS_POOL_MAX = 64 + 32
"""RedisStore's connection pool bound (max_connections + its headroom)."""
CLUSTER_ENV = {
    "SPACES_LEASE_SECONDS": "4",
    "SPACES_LEASE_RENEW_SECONDS": "1",
    "SPACES_PENDING_LEASE_SECONDS": "5",
    "SPACES_DRAIN_GRACE_SECONDS": "2",
    "SPACES_SHUTDOWN_GRACE_SECONDS": "1",
    "SPACES_MALLOC_TRIM_SECONDS": "2",
    "SPACES_LOG_LEVEL": "WARNING",
}
ID = re.compile(r"[A-Za-z0-9_-]{16,}")


def key_class(key: str) -> str:
    """A key's shape: ids replaced, so keys of different spaces and connections compare."""
    return ID.sub("<id>", re.sub(r"\{[^}]*\}", "{S}", key))


SPACE_KEY = re.compile(r"^\{([^}]*)\}:sp:[^:]+$")
SPACES_INDEX = re.compile(r"^\{([^}]*)\}:spaces$")
"""A shard's index of its spaces: it exists while the shard holds any, so how many there are
depends on which shards the spaces of the moment fell in, not on what was left behind."""


async def redis_snapshot(client: aioredis.Redis) -> dict[str, Any]:
    persistent: Counter[str] = Counter()
    expiring = 0
    space_shards: set[str] = set()
    indexed_shards: set[str] = set()
    async for raw in client.scan_iter(count=1000):
        key = raw.decode()
        if await client.pttl(key) == -1:
            if match := SPACE_KEY.match(key):
                space_shards.add(match.group(1))
            if match := SPACES_INDEX.match(key):
                indexed_shards.add(match.group(1))
            else:
                persistent[key_class(key)] += 1
        else:
            expiring += 1
    return {
        "keys": await client.dbsize(),
        "persistent": dict(sorted(persistent.items())),
        "space_shards": sorted(space_shards),
        "indexed_shards": sorted(indexed_shards),
        "expiring": expiring,
        "used_memory_mb": round(int((await client.info("memory"))["used_memory"]) / 2**20, 2),
    }


def scrape(process: ServiceProcess) -> dict[str, float]:
    address = process.env["SPACES_METRICS_ADDR"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def redis_connections(pid: int, redis_port: int) -> int:
    """TCP sockets from ``pid`` to Redis, in any state: the store's pool, which keeps up to its
    bound (RedisStore's max_connections) of idle connections after a burst, and, after a Redis
    restart, the pool's old connections in CLOSE_WAIT until the pool next touches them."""
    listing = subprocess.run(
        ["ss", "-tanpH", "dst", f"127.0.0.1:{redis_port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return listing.count(f"pid={pid},")


def footprint(process: ServiceProcess, redis_port: int) -> dict[str, float]:
    assert process.proc is not None
    pid = process.proc.pid
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    anon_kb = int(re.search(r"Anonymous:\s+(\d+)", rollup).group(1))  # type: ignore[union-attr]
    pool = redis_connections(pid, redis_port)
    metrics = scrape(process)
    return {
        "rss_mb": round(rss_kb / 1024, 1),
        # The process's own memory (heap, Python's arenas, stacks), without the pages of the
        # files it maps (its libraries), which the kernel may evict and read back at will.
        "anon_mb": round(anon_kb / 1024, 1),
        "fds": len(os.listdir(f"/proc/{pid}/fd")) - pool,
        "redis_connections": pool,
        "tasks": metrics["spaces_asyncio_tasks"],
        "malloc_trims": metrics.get("spaces_malloc_trims_total", 0.0),
        # Reported, not compared: each thread that allocates may get its own malloc arena.
        "threads": len(os.listdir(f"/proc/{pid}/task")),
    }


def keep_smaps(process: ServiceProcess, name: str, when: str) -> None:
    """With SPACES_SOAK_SMAPS (a folder), keep the process's memory map, to see which mapping
    grew."""
    folder = os.environ.get("SPACES_SOAK_SMAPS")
    if folder and process.proc is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        smaps = Path(f"/proc/{process.proc.pid}/smaps").read_text()
        (Path(folder) / f"{name}-{when}.smaps").write_text(smaps)


class Churn:
    """Rounds of participants in a few spaces, counted."""

    def __init__(self, cluster: LocalCluster, admin: Admin, tenant: Tenant) -> None:
        self.cluster = cluster
        self.admin = admin
        self.tenant = tenant
        self.spaces: list[str] = []
        self.rounds = 0
        self.joins = 0
        self.retried_joins = 0
        self.kicks = 0
        self.drops = 0
        self.leaves = 0
        self.spaces_replaced = 0

    def presence(self) -> str:
        return self.cluster.api_addresses("presence")[0]

    async def join(self, space_id: str, pid: str, **kw: Any) -> sdk.Space:
        for attempt in range(40):
            space = sdk.Space(self.tenant.token(space_id, pid), self.presence(), decode=False, **kw)
            try:
                await space.join()
                self.joins += 1
                return space
            except (grpc.aio.AioRpcError, sdk.SpacesClientError, TimeoutError):
                # A restart under way (Redis, or the node it was placed on): try again.
                await space.leave()
                self.retried_joins += 1
                await asyncio.sleep(min(0.25 * (attempt + 1), 2.0))
        raise AssertionError(f"{pid} could not join {space_id}")

    async def one_space(self, index: int) -> None:
        space_id = self.spaces[index]
        tag = f"r{self.rounds}s{index}"
        publisher = await self.join(space_id, f"{tag}-pub")
        await publisher.local.publish(TestPatternTrack((200, 40, 40), height=80, fps=10), "camera")
        await publisher.local.publish(ToneTrack(440), "microphone")
        viewer = await self.join(space_id, f"{tag}-view")
        dropper = await self.join(space_id, f"{tag}-drop")
        with contextlib.suppress(AssertionError):
            # Media flows (unless a restart interrupts it: the SDK then reconnects).
            track = await eventually(lambda: viewer.remote_track(f"{tag}-pub", "camera"), 15)
            await eventually(lambda: track.packets_received > 10, timeout=15)
        # Three ways to end: a clean leave, a kick, a client that vanishes.
        await publisher.leave()
        self.leaves += 1
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.admin.presence.RemoveParticipant(
                presence_pb2.RemoveParticipantRequest(
                    space_id=space_id, participant_id=viewer.participant_id
                ),
                metadata=self.admin.md,
            )
            self.kicks += 1
        with contextlib.suppress(AssertionError):
            await eventually(lambda: viewer.state in ("closed", "failed"), timeout=10)
        await viewer.leave()
        if dropper._call is not None:
            dropper._call.cancel()
        self.drops += 1
        await asyncio.sleep(0.2)
        await dropper.leave()

    async def round(self) -> None:
        await asyncio.gather(*(self.one_space(i) for i in range(len(self.spaces))))
        self.rounds += 1
        if self.rounds % 4 == 0:
            # Space churn: the oldest space goes, a new one comes.
            old = self.spaces.pop(0)
            for attempt in range(20):
                try:
                    await self.admin.spaces.DeleteSpace(
                        space_pb2.DeleteSpaceRequest(id=old, force=True), metadata=self.admin.md
                    )
                    self.spaces.append(await self.admin.create_space())
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(min(0.25 * (attempt + 1), 2.0))
            else:
                raise AssertionError("could not replace a space")
            self.spaces_replaced += 1

    async def quiesce(self, redis: aioredis.Redis) -> None:
        """Wait until nobody is connected anywhere, then a little more."""

        async def empty() -> bool:
            for node in ("media-0", "media-1"):
                process = self.cluster.by_name(node)
                if process.alive():
                    try:
                        if scrape(process).get("spaces_media_sessions", 0) != 0:
                            return False
                    except OSError:
                        return False
            for space_id in self.spaces:
                if await self.admin.participants(space_id):
                    return False
            return True

        await eventually(empty, timeout=60, interval=0.5)
        await asyncio.sleep(3.0)  # closed peer connections' last callbacks, reaper passes
        # The media node's trims after its last session ended are done (spaces.media.allocator:
        # two, an interval apart): what the sessions freed is back with the OS, as it is a few
        # seconds after any quiet moment in production. Done when no trim came for longer than
        # the interval.
        node = self.cluster.by_name("media-0")
        interval = float(CLUSTER_ENV["SPACES_MALLOC_TRIM_SECONDS"])
        for _ in range(10):
            trims = scrape(node)["spaces_malloc_trims_total"]
            await asyncio.sleep(2.5 * interval)
            if scrape(node)["spaces_malloc_trims_total"] == trims:
                break
        else:
            raise AssertionError("media-0 kept trimming with nobody connected")


class Chaos:
    """Restarts on a schedule: media-1 killed (SIGKILL) or drained (SIGTERM) and started
    again, and Redis restarted (gracefully: its append-only file keeps the data)."""

    def __init__(self, cluster: LocalCluster, seconds: float) -> None:
        self.cluster = cluster
        self.node_restarts = {"kill": 0, "drain": 0}
        self.redis_restarts = 0
        if seconds <= 120:
            self.schedule = [(0.3, "kill"), (0.5, "redis"), (0.7, "drain")]
        else:
            every = 180.0 / seconds
            marks = [every * i for i in range(1, int(0.95 / every) + 1)]
            self.schedule = [(m, "kill" if i % 2 == 0 else "drain") for i, m in enumerate(marks)]
            self.schedule.append((0.5, "redis"))
            self.schedule.sort()

    async def run(self, started: float, seconds: float) -> None:
        for fraction, action in self.schedule:
            await asyncio.sleep(max(0.0, started + fraction * seconds - time.monotonic()))
            if action == "redis":
                assert self.cluster.redis is not None
                await asyncio.to_thread(self.cluster.redis.restart, True)
                self.redis_restarts += 1
                continue
            node = self.cluster.by_name("media-1")
            if action == "kill":
                await asyncio.to_thread(node.kill)
            else:
                node.signal(signal.SIGTERM)
                await asyncio.to_thread(node.proc.wait, 30)  # type: ignore[union-attr]
            self.node_restarts[action] += 1
            node.start()


async def run_with_chaos(churn: Churn, chaos: Chaos, seconds: float, trace: str | None) -> None:
    """Rounds for ``seconds`` and until every event of ``chaos`` has happened. ``trace`` names a
    file that gets the long-lived processes' RSS after every round."""
    began = time.monotonic()
    chaos_task = asyncio.create_task(chaos.run(began, seconds))
    while time.monotonic() - began < seconds or not chaos_task.done():
        await churn.round()
        if chaos_task.done():
            chaos_task.result()  # raise what went wrong
        if trace:
            # The long-lived processes' memory every round (not quiesced: a trend only).
            sample: dict[str, float] = {"t": round(time.monotonic() - began, 1)}
            sample["round"] = churn.rounds
            assert churn.cluster.redis is not None
            for name in ("api-0", "media-0"):
                now = footprint(churn.cluster.by_name(name), churn.cluster.redis.port)
                sample[name], sample[f"{name}-anon"] = now["rss_mb"], now["anon_mb"]
            with open(trace, "a") as out:  # noqa: ASYNC230 - a line per round
                out.write(json.dumps(sample) + "\n")
    await chaos_task


def grown(before: float, after: float, slack: float) -> bool:
    return after > before * (1 + FLAT) + slack


@pytest.fixture
async def churn_cluster(request: pytest.FixtureRequest) -> AsyncIterator[LocalCluster]:
    cluster = LocalCluster(
        replicas=1, nodes=2, env=CLUSTER_ENV, admin_key=ADMIN_KEY, redis_appendonly=True
    )
    failed_before = request.session.testsfailed
    await asyncio.to_thread(cluster.start)
    try:
        await asyncio.to_thread(cluster.wait_ready)
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)
        if request.session.testsfailed == failed_before:
            import shutil

            shutil.rmtree(cluster.workdir, ignore_errors=True)
        else:
            print(f"cluster logs kept in {cluster.workdir}")


@pytest.mark.parametrize(
    "seconds",
    [
        pytest.param(SHORT_S, id="short"),
        pytest.param(
            LONG_S, id="long", marks=[pytest.mark.slow, pytest.mark.timeout(LONG_S + 600)]
        ),
    ],
)
async def test_churn_with_restarts_leaves_processes_and_redis_flat(
    churn_cluster: LocalCluster, seconds: float
) -> None:
    cluster = churn_cluster
    admin = Admin(cluster.api_addresses()[0])
    assert cluster.redis is not None
    redis = aioredis.from_url(cluster.redis.url)
    long_lived = {name: cluster.by_name(name) for name in ("api-0", "media-0")}
    try:
        tenant = Tenant(await admin.create_key())
        churn = Churn(cluster, admin, tenant)
        churn.spaces = [await admin.create_space() for _ in range(SPACES)]
        # Warm-up, until each long-lived process has seen its peak: media-0 alone hosts every
        # space while media-1 is down (memory a process has used once stays in its RSS).
        await churn.round()
        await asyncio.to_thread(cluster.by_name("media-1").kill)
        for _ in range(WARMUP_ROUNDS - 1):
            await churn.round()
        cluster.by_name("media-1").start()
        # Then one of each chaos event under load: sessions moved onto media-0 mid-call by a
        # kill and a drain, and a Redis restart. Ordinary rounds do not reach the peak that a
        # drain's sessions arriving at once reach (docs/soak.md, "Memory").
        await run_with_chaos(churn, Chaos(cluster, WARMUP_CHAOS_S), WARMUP_CHAOS_S, None)
        await churn.round()
        await churn.quiesce(redis)
        start = {name: footprint(p, cluster.redis.port) for name, p in long_lived.items()}
        for name, process in long_lived.items():
            keep_smaps(process, name, "start")
        start_redis = await redis_snapshot(redis)

        chaos = Chaos(cluster, seconds)
        began, start_rounds = time.monotonic(), churn.rounds
        await run_with_chaos(churn, chaos, seconds, os.environ.get("SPACES_SOAK_TRACE"))
        rounds = churn.rounds - start_rounds
        await churn.quiesce(redis)
        end = {name: footprint(p, cluster.redis.port) for name, p in long_lived.items()}
        for name, process in long_lived.items():
            keep_smaps(process, name, "end")
        end_redis = await redis_snapshot(redis)

        report = {
            "seconds": round(time.monotonic() - began),
            "rounds": rounds,
            "joins": churn.joins,
            "retried_joins": churn.retried_joins,
            "leaves": churn.leaves,
            "kicks": churn.kicks,
            "drops": churn.drops,
            "spaces_replaced": churn.spaces_replaced,
            "node_restarts": chaos.node_restarts,
            "redis_restarts": chaos.redis_restarts,
            "start": {**start, "redis": start_redis},
            "end": {**end, "redis": end_redis},
        }
        print("churn soak:", json.dumps(report))
        if os.environ.get("SPACES_SOAK_REPORT"):
            Path(os.environ["SPACES_SOAK_REPORT"]).write_text(  # noqa: ASYNC240
                json.dumps(report, indent=2) + "\n"
            )

        assert chaos.redis_restarts == 1 and sum(chaos.node_restarts.values()) >= 2
        assert rounds > 1
        # Nothing left behind in Redis: the same persistent keys, by shape, as at the start.
        leaked = Counter(end_redis["persistent"]) - Counter(start_redis["persistent"])
        assert not leaked, leaked
        # Each shard's index of spaces exists exactly while the shard holds spaces.
        for snapshot in (start_redis, end_redis):
            assert snapshot["indexed_shards"] == snapshot["space_shards"], snapshot
        # Keys with a TTL (a departed connection's reason, node records) expire by themselves
        # and are reported, not compared; the persistent ones must not grow.
        persistent = [sum(r["persistent"].values()) for r in (start_redis, end_redis)]
        assert not grown(persistent[0], persistent[1], 0), (start_redis, end_redis)
        # The long-lived processes are flat (file descriptors other than the Redis pool, whose
        # idle connections are bounded by its size).
        for name in long_lived:
            assert end[name]["redis_connections"] <= REDIS_POOL_MAX, end[name]
            for measure, slack in SLACK.items():
                assert not grown(start[name][measure], end[name][measure], slack), (
                    name,
                    measure,
                    start[name],
                    end[name],
                )
    finally:
        await redis.aclose()
        await admin.close()
