"""Redis ceiling: what one Redis primary carries. Load generators call the store directly
(``RedisStore``, the code presence and the media nodes run), so no Spaces process is the limit,
and the figure is the Redis server's own CPU, read from /proc. In this order:

* **baseline**: PING in a closed loop, to price one round trip of the same client on the same
  machine. Other costs are also given in PINGs, a ratio that travels between machines better
  than microseconds.
* **scripts**: each hot script (a space's renewal, join, claim, leave) called one at a time on an
  otherwise idle Redis, timed by Redis itself (INFO commandstats): a floor on the cost, without
  the network and event-loop overhead of a command.
* **churn**: join + claim + leave (one whole session, as presence and a media node do it) in a
  closed loop over every generator, as fast as they go.
* **hold**: P connected participants in spaces of ``space_size``, each space renewed by its
  "media node" every ``renew_interval_s`` (the real cadence, 3 s), plus the background a
  deployment of that size adds (every presence replica reaps all shards each second, nodes
  heartbeat every 2 s, presence reads the registry every 0.5 s). P grows step by step until Redis
  passes 90% of a core, renewals fall behind their schedule, or the machine runs out.

The per-participant cost is the slope of Redis CPU over the participants renewed on schedule
(least squares over the hold steps that kept it); the background is its intercept. From them:
the participant count at which one primary is at 70% of a core, the session starts per second at
70% of a core, and both together for sessions of ``session_minutes``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import os
import random
import time
import urllib.parse
from dataclasses import asdict, dataclass
from typing import Any

import hiredis
import redis.asyncio as aioredis

from bench.cluster import Cluster
from bench.common import CpuWindow, fmt, percentile, say, table, wait_quiet
from bench.ipc import Channel, Worker, stop_all
from bench.redis_load import RawClient, pack
from spaces.store.base import Reservation
from spaces.store.redis import (
    RedisStore,
    claim_args,
    claim_from_reply,
    join_args,
    leave_args,
    renew_args,
)
from spaces.v1 import node_pb2

NAME = "redis"
SUMMARY = "one Redis primary: participants (with lease renewals) and joins/s at 70% of a core"

TARGET_CORE = 0.7
SATURATED_CORE = 0.9
LATE_P99_S = 1.0
"""A renewal this late (p99) means the generators, not Redis, fell behind."""


@dataclass(frozen=True)
class Plan:
    steps: tuple[int, ...]
    """Participants held at each hold step."""
    space_size: int
    renew_interval_s: float
    window_s: float
    churn_s: float
    churn_concurrency: int
    ping_s: float
    generators: int
    script_calls: int
    presence_replicas: int
    """Reapers and registry readers simulated in the background."""
    session_minutes: float
    quick: bool = False


FULL = Plan(
    steps=(10_000, 30_000, 60_000, 90_000, 120_000, 150_000, 180_000, 220_000, 260_000),
    space_size=5,
    renew_interval_s=3.0,
    window_s=9.0,
    churn_s=8.0,
    churn_concurrency=96,
    ping_s=4.0,
    generators=2,
    script_calls=2_000,
    presence_replicas=4,
    session_minutes=30.0,
)
QUICK = Plan(
    steps=(60, 180),
    space_size=3,
    renew_interval_s=0.5,
    window_s=1.0,
    churn_s=1.0,
    churn_concurrency=8,
    ping_s=0.5,
    generators=1,
    script_calls=50,
    presence_replicas=1,
    session_minutes=30.0,
    quick=True,
)
SESSION_MS = 10_000
PLACEMENT_MS = 15_000
PENDING_MS = 20_000
NODES_PER_PARTICIPANTS = 500
"""One simulated media node per this many participants (SPACES_MAX_SESSIONS)."""


# --- the load generator (a worker process) --------------------------------------------------


@dataclass
class HeldSpace:
    space_id: str
    node_id: str
    epoch: str
    space_record: dict[str, str]
    conns: list[dict[str, str]]


PLACEHOLDER = b"##########"
"""Stands for a session's number (10 digits) in the churn's prebuilt commands."""
RENEW_TICK_S = 0.01
"""The renewal schedule's resolution: each held space is due in one tick of its interval."""


def bad_reply(reply: Any, ok: str = "ok") -> bool:
    """An error reply, or a script's own refusal (``{"err", ...}``, ``{"moved", ...}``, ...)."""
    return isinstance(reply, hiredis.ReplyError) or not reply or reply[0] != ok


async def run_generator(config: dict[str, Any], channel: Channel) -> None:
    """Sends the store's own commands (``RedisStore.space_command``, the same scripts, keys and
    arguments) over :class:`bench.redis_load.RawClient`, so that the generator spends a few µs
    per command; setup, the background and the script costs go through ``RedisStore``."""
    store = RedisStore(config["redis_url"], max_connections=64)
    await store.start()
    url = urllib.parse.urlsplit(config["redis_url"])
    raw = RawClient(
        url.hostname or "127.0.0.1",
        url.port or 6379,
        connections=int(config.get("connections", 32)),
        depth=int(config.get("depth", 1)),
    )
    await raw.start()
    loop = asyncio.get_running_loop()
    tag = config["name"]
    serial = itertools.count()
    stats = {"renews": 0, "errors": 0}
    lateness: list[float] = []
    measuring = [False]
    background: list[asyncio.Task[None]] = []
    schedule: list[list[bytes]] = []
    renewer: list[asyncio.Task[None]] = []
    held = [0]

    def reservation(space_id: str, node_id: str, pid: str, placed: bool = True) -> Reservation:
        n = next(serial)
        return Reservation(
            space_id=space_id,
            connection_id=f"c{tag}-{n}",
            participant_id=pid,
            generated_participant_id=False,
            role="publisher",
            display_name=pid,
            ticket_hash=f"t{tag}-{n}",
            resume_hash=f"r{tag}-{n}",
            node_id=node_id,
            expected_node_id=node_id if placed else "",
            pending_ms=PENDING_MS,
            placement_ms=PLACEMENT_MS,
            default_max_participants=1_000,
        )

    def commands(r: Reservation) -> tuple[bytes, bytes, bytes]:
        """Join, claim and leave of one session, packed: as presence and the media node send
        them."""
        s, c, node = r.space_id, r.connection_id, r.node_id
        return (
            pack(store.space_command("join", s, join_args(r))),
            pack(
                store.space_command(
                    "claim",
                    s,
                    claim_args(s, c, r.ticket_hash, node, SESSION_MS, PLACEMENT_MS, "sess"),
                )
            ),
            pack(store.space_command("leave", s, leave_args(s, c, "left", node))),
        )

    def call(payload: bytes) -> asyncio.Future[Any]:
        future = loop.create_future()
        raw.send(payload, future.set_result)
        return future

    # Each script once through the store, which loads it into Redis for EVALSHA.
    warm = f"{tag}-warm"
    await store.create_space(warm, "", 0)
    r = reservation(warm, "warm-node", "w", placed=False)
    await store.join(r)
    claimed = await store.claim(
        warm, r.connection_id, r.ticket_hash, "warm-node", SESSION_MS, PLACEMENT_MS, "sess"
    )
    await store.renew(
        warm,
        "warm-node",
        SESSION_MS,
        PLACEMENT_MS,
        claimed.epoch,
        claimed.space_record,
        [claimed.connection_record],
    )
    await store.leave(warm, r.connection_id, "left", node_id="warm-node")
    channel.send({"ready": True})

    async def renew_on_schedule(interval: float) -> None:
        """As media nodes renew their rooms: each held space every ``interval``, in its own
        tick of it; lateness is from the moment a renewal was due to its reply."""
        ticks = len(schedule)
        began = loop.time()
        for k in itertools.count():
            due = began + k * RENEW_TICK_S
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

            def done(reply: Any, due: float = due) -> None:
                if isinstance(reply, hiredis.ReplyError) or len(reply) != 2 or reply[1] == "1":
                    stats["errors"] += 1  # lost sessions or a moved space: not a plain renewal
                else:
                    stats["renews"] += 1
                if measuring[0]:
                    lateness.append(loop.time() - due)

            for payload in schedule[k % ticks]:
                raw.send(payload, done)

    async def grow(request: dict[str, Any]) -> dict[str, Any]:
        """Add spaces of ``size`` connected participants until ``participants`` are held."""
        size, target, nodes = int(request["size"]), int(request["participants"]), request["nodes"]
        interval = float(request["interval_s"])
        if not schedule:
            schedule.extend([] for _ in range(max(1, round(interval / RENEW_TICK_S))))
            renewer.append(asyncio.create_task(renew_on_schedule(interval)))
        sem = asyncio.Semaphore(256)
        started = time.perf_counter()

        async def one_space(n: int) -> None:
            async with sem:
                space_id = f"{tag}-h{n}"
                node_id = nodes[n % len(nodes)]
                await store.create_space(space_id, "", 0)
                # The first join places the space on its node; the others find it there.
                conns, claim = [], None
                for i in range(size):
                    join, claim_command, _ = commands(
                        reservation(space_id, node_id, f"p{i}", placed=i > 0)
                    )
                    reply = await call(join)
                    if bad_reply(reply):
                        raise RuntimeError(f"join refused: {reply}")
                    claim = claim_from_reply(space_id, await call(claim_command))
                    conns.append(claim.connection_record)
                assert claim is not None
                renew = renew_args(
                    space_id,
                    node_id,
                    SESSION_MS,
                    PLACEMENT_MS,
                    claim.epoch,
                    claim.space_record,
                    conns,
                )
                schedule[random.randrange(len(schedule))].append(
                    pack(store.space_command("renew", space_id, renew))
                )
                held[0] += size

        first = held[0] // size
        await asyncio.gather(
            *(one_space(first + n) for n in range(max(0, math.ceil((target - held[0]) / size))))
        )
        return {"participants": held[0], "setup_s": time.perf_counter() - started}

    async def window(request: dict[str, Any]) -> dict[str, Any]:
        """Counts over the next ``seconds``."""
        lateness.clear()
        before = dict(stats)
        measuring[0] = True
        await asyncio.sleep(float(request["seconds"]))
        measuring[0] = False
        late = list(lateness)
        return {
            "renews": stats["renews"] - before["renews"],
            "errors": stats["errors"] - before["errors"],
            "late_p50_s": percentile(late, 50),
            "late_p99_s": percentile(late, 99),
            "queued": raw.queued,
        }

    async def start_background(request: dict[str, Any]) -> dict[str, Any]:
        """What presence replicas and media nodes do besides renewing: reap every shard each
        second, read the registry every 0.5 s, heartbeat every 2 s."""
        for task in background:
            task.cancel()
        background.clear()

        async def every(seconds: float, call: Any) -> None:
            await asyncio.sleep(random.random() * seconds)
            while True:
                with contextlib.suppress(Exception):
                    await call()
                await asyncio.sleep(seconds)

        for _ in range(int(request["replicas"])):
            background.append(asyncio.create_task(every(1.0, store.reap)))
            background.append(asyncio.create_task(every(0.5, lambda: store.list_nodes(60_000))))
        for node_id in request["nodes"]:
            record = node_pb2.Node(
                id=node_id, address="127.0.0.1:1", state=node_pb2.NODE_STATE_SERVING
            )
            background.append(
                asyncio.create_task(
                    every(2.0, lambda record=record: store.heartbeat(record, 60_000))
                )
            )
        return {"tasks": len(background)}

    async def churn(request: dict[str, Any]) -> dict[str, Any]:
        """Join + claim + leave: ``concurrency`` sessions in a closed loop, or, with ``rate``,
        that many session starts per second (open loop: a start does not wait for others)."""
        seconds, node_id = float(request["seconds"]), request["node"]
        rate = float(request.get("rate", 0))
        spaces = [f"{tag}-c{next(serial)}" for _ in range(int(request["spaces"]))]
        for space_id in spaces:
            await store.create_space(space_id, "", 0)
            r = reservation(space_id, node_id, "anchor", placed=False)
            await store.join(r)  # places the space; its anchor keeps it active
            await store.claim(
                space_id, r.connection_id, r.ticket_hash, node_id, SESSION_MS, PLACEMENT_MS, "s"
            )
        # Each space's three commands, built once by the store's own code with a fixed-width
        # placeholder in the session's ids; a session fills in its number (same lengths, so
        # the RESP stays valid): the generator does not rebuild the arguments every time.
        templates = [
            commands(
                dataclasses.replace(
                    reservation(space_id, node_id, f"x{tag}-{PLACEHOLDER.decode()}"),
                    connection_id=f"c{tag}-{PLACEHOLDER.decode()}",
                    ticket_hash=f"t{tag}-{PLACEHOLDER.decode()}",
                    resume_hash=f"r{tag}-{PLACEHOLDER.decode()}",
                )
            )
            for space_id in spaces
        ]
        counts = {"cycles": 0, "errors": 0, "active": 0}
        latencies: list[float] = []
        finished = loop.create_future()
        deadline = loop.time() + seconds
        closed = rate <= 0

        def end_one(ok: bool) -> None:
            counts["cycles" if ok else "errors"] += 1
            counts["active"] -= 1
            if closed and loop.time() < deadline:
                start_one()
            elif counts["active"] == 0 and loop.time() >= deadline and not finished.done():
                finished.set_result(None)

        def start_one() -> None:
            join_t, claim_t, leave_t = templates[next(serial) % len(templates)]
            n = b"%010d" % next(serial)
            join = join_t.replace(PLACEHOLDER, n)
            claim = claim_t.replace(PLACEHOLDER, n)
            leave = leave_t.replace(PLACEHOLDER, n)
            began = loop.time()
            counts["active"] += 1

            def after_leave(reply: Any) -> None:
                latencies.append(loop.time() - began)
                end_one(not bad_reply(reply))

            def after_claim(reply: Any) -> None:
                if bad_reply(reply):
                    end_one(False)
                else:
                    raw.send(leave, after_leave)

            def after_join(reply: Any) -> None:
                if bad_reply(reply):
                    end_one(False)
                else:
                    raw.send(claim, after_claim)

            raw.send(join, after_join)

        started = loop.time()
        if closed:
            for _ in range(int(request["concurrency"])):
                start_one()
        else:
            # Open loop: the starts due by each tick of 1 ms, however many are still running.
            n = 0
            while (now := loop.time()) < deadline:
                while started + n / rate <= now:
                    start_one()
                    n += 1
                await asyncio.sleep(0.001)
            if counts["active"] == 0 and not finished.done():
                finished.set_result(None)
        await finished
        return {
            "cycles": counts["cycles"],
            "errors": counts["errors"],
            "wall_s": loop.time() - started,
            "session_p50_s": percentile(latencies, 50),
            "session_p99_s": percentile(latencies, 99),
        }

    async def ping(request: dict[str, Any]) -> dict[str, Any]:
        """PING in a closed loop, ``concurrency`` in flight."""
        deadline = loop.time() + float(request["seconds"])
        payload = pack(("PING",))
        counts = {"pings": 0, "active": 0}
        finished = loop.create_future()

        def again(_: Any) -> None:
            counts["pings"] += 1
            if loop.time() < deadline:
                raw.send(payload, again)
            else:
                counts["active"] -= 1
                if counts["active"] == 0:
                    finished.set_result(None)

        started = loop.time()
        for _ in range(int(request["concurrency"])):
            counts["active"] += 1
            raw.send(payload, again)
        await finished
        return {"pings": counts["pings"], "wall_s": loop.time() - started}

    pending: list[tuple[str, Reservation]] = []
    sample: list[HeldSpace] = []

    async def script(request: dict[str, Any]) -> dict[str, Any]:
        """``count`` calls of one script, one after another (the orchestrator reads Redis's own
        accounting around them): renew (a space of ``size``), join, claim or leave."""
        kind, count, size = request["kind"], int(request["count"]), int(request["size"])
        node_id = "cost-node"
        if kind == "renew":
            if not sample:
                space_id = f"{tag}-cost-{next(serial)}"
                await store.create_space(space_id, "", 0)
                conns, claim = [], None
                for i in range(size):
                    r = reservation(space_id, node_id, f"p{i}", placed=i > 0)
                    await store.join(r)
                    claim = await store.claim(
                        space_id,
                        r.connection_id,
                        r.ticket_hash,
                        node_id,
                        SESSION_MS,
                        PLACEMENT_MS,
                        "sess",
                    )
                    conns.append(claim.connection_record)
                assert claim is not None
                sample.append(HeldSpace(space_id, node_id, claim.epoch, claim.space_record, conns))
            space = sample[0]
            for _ in range(count):
                await store.renew(
                    space.space_id,
                    node_id,
                    SESSION_MS,
                    PLACEMENT_MS,
                    space.epoch,
                    space.space_record,
                    space.conns,
                )
        elif kind == "join":
            pending.clear()
            spaces = [f"{tag}-costj-{next(serial)}" for _ in range(math.ceil(count / 500))]
            for space_id in spaces:
                await store.create_space(space_id, "", 0)
                r = reservation(space_id, node_id, "anchor", placed=False)
                await store.join(r)
                await store.claim(
                    space_id,
                    r.connection_id,
                    r.ticket_hash,
                    node_id,
                    SESSION_MS,
                    PLACEMENT_MS,
                    "sess",
                )
            for n in range(count):
                space_id = spaces[n % len(spaces)]
                r = reservation(space_id, node_id, f"j{n}")
                await store.join(r)
                pending.append((space_id, r))
        elif kind == "claim":
            for space_id, r in pending:
                await store.claim(
                    space_id,
                    r.connection_id,
                    r.ticket_hash,
                    node_id,
                    SESSION_MS,
                    PLACEMENT_MS,
                    "sess",
                )
        elif kind == "leave":
            for space_id, r in pending:
                await store.leave(space_id, r.connection_id, "left", node_id=node_id)
        return {"calls": count}

    async def stop(_: dict[str, Any]) -> dict[str, Any]:
        for task in renewer + background:
            task.cancel()
        await asyncio.gather(*renewer, *background, return_exceptions=True)
        await raw.close()
        await store.close()
        return {}

    await channel.serve(
        {
            "grow": grow,
            "window": window,
            "background": start_background,
            "churn": churn,
            "ping": ping,
            "script": script,
            "stop": stop,
        }
    )


# --- the orchestrator -----------------------------------------------------------------------


async def measure(
    redis: aioredis.Redis, pids: dict[str, int], quick: bool, calls: list[Any]
) -> tuple[CpuWindow, list[dict[str, Any]], float, dict[str, dict[str, float]], float]:
    """Run ``calls`` (the generators' work for one window) and measure Redis over it: CPU from
    /proc, Redis's own per-command accounting (INFO commandstats, reset first), and the
    machine's 1-minute load average at the end (on a shared machine, how crowded it was)."""
    quiet = await wait_quiet(pids, quick)
    await redis.config_resetstat()
    cpu = CpuWindow(pids).start()
    replies = await asyncio.gather(*calls)
    cpu.stop()
    load_average = os.getloadavg()[0]
    stats = await redis.info("commandstats")
    commands = {
        name.removeprefix("cmdstat_"): {
            "calls": float(v["calls"]),
            "usec_per_call": float(v["usec_per_call"]),
        }
        for name, v in stats.items()
    }
    return cpu, list(replies), quiet, commands, load_average


def command_usec(commands: dict[str, dict[str, float]]) -> float:
    """µs Redis spent executing commands (scripts included), by its own accounting."""
    return sum(c["calls"] * c["usec_per_call"] for c in commands.values())


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line y = a + b x: (a, b)."""
    n = len(points)
    if n < 2:
        x, y = points[0]
        return 0.0, y / x if x else math.nan
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else math.nan
    return my - b * mx, b


async def run(quick: bool) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    cluster = Cluster()
    generators: list[Worker] = []
    redis: aioredis.Redis | None = None
    try:
        pids = {"redis": cluster.start_redis()}
        redis = aioredis.from_url(cluster.redis_url, decode_responses=True)
        generators = list(
            await asyncio.gather(
                *(
                    Worker.start(
                        f"redis-load-{i}",
                        "redis-load",
                        {"redis_url": cluster.redis_url, "name": f"g{i}"},
                        cluster.workdir,
                    )
                    for i in range(plan.generators)
                )
            )
        )
        for i, g in enumerate(generators):
            pids[f"generator-{i}"] = g.pid

        # 1. The price of a round trip.
        say("redis: baseline, PING in a closed loop")
        cpu, replies, quiet, _, load_average = await measure(
            redis,
            pids,
            plan.quick,
            [g.call("ping", seconds=plan.ping_s, concurrency=32) for g in generators],
        )
        pings = sum(r["pings"] for r in replies) / max(r["wall_s"] for r in replies)
        ping_us = cpu.cores("redis") / pings * 1e6 if pings else math.nan
        baseline = {
            "pings_per_s": pings,
            "redis_cores": cpu.cores("redis"),
            "redis_us_per_ping": ping_us,
            "generator_cores": cpu.group("generator-"),
            "machine_busy": cpu.machine_busy,
            "foreign_cores_before": quiet,
            "load_average": load_average,
        }
        say(f"  {pings:,.0f} PING/s, {ping_us:.1f} µs of Redis CPU each")

        # 2. What each script costs Redis, by its own accounting, one call at a time on an
        #    otherwise idle Redis (the least of a few rounds: the machine may be shared).
        say("redis: script costs (INFO commandstats)")
        scripts: dict[str, float] = {}
        first = generators[0]
        for _ in range(3):
            for kind in ("renew", "join", "claim", "leave"):
                await redis.config_resetstat()
                await first.call(
                    "script",
                    limit_s=300,
                    kind=kind,
                    count=plan.script_calls,
                    size=plan.space_size,
                )
                stats = await redis.info("commandstats")
                spent = stats["cmdstat_evalsha"]["usec_per_call"]
                scripts[kind] = min(scripts.get(kind, math.inf), float(spent))
        say(
            "  "
            + ", ".join(f"{k} {v:.1f} µs" for k, v in scripts.items())
            + f" (renew: a space of {plan.space_size})"
        )

        # 3. Churn: whole sessions, as fast as the generators go, before anyone is held (held
        #    participants' renewals would compete with it for the generators). Then the same at
        #    the rate that should take Redis to 70% of a core, to measure that point.
        per_gen = max(1, plan.churn_concurrency // plan.generators)

        async def churn_phase(rate: float) -> dict[str, Any]:
            cpu, replies, quiet, commands, load_average = await measure(
                redis,
                pids,
                plan.quick,
                [
                    g.call(
                        "churn",
                        limit_s=600,
                        seconds=plan.churn_s,
                        concurrency=per_gen,
                        rate=rate / len(generators),
                        spaces=max(4, per_gen),
                        node="node-0",
                    )
                    for g in generators
                ],
            )
            cycles = sum(r["cycles"] for r in replies) / max(r["wall_s"] for r in replies)
            cores = cpu.cores("redis")
            return {
                "load": f"open, {rate:,.0f}/s" if rate else f"closed, {per_gen * len(generators)}",
                "sessions_per_s": cycles,
                "errors": sum(r["errors"] for r in replies),
                "redis_cores": cores,
                "redis_cores_for_churn": cores,
                "redis_us_per_session": cores / cycles * 1e6 if cycles else math.nan,
                "session_p50_s": max(r["session_p50_s"] for r in replies),
                "session_p99_s": max(r["session_p99_s"] for r in replies),
                "generator_cores": cpu.group("generator-"),
                "machine_busy": cpu.machine_busy,
                "foreign_cores_before": quiet,
                "load_average": load_average,
                "redis_command_cores": command_usec(commands) / 1e6 / cpu.wall,
                "evalsha_usec_per_call": commands.get("evalsha", {}).get("usec_per_call", 0.0),
            }

        say("redis: churn, join + claim + leave in a closed loop")
        churn = await churn_phase(0.0)
        say(
            f"  {churn['sessions_per_s']:,.0f} sessions/s on {churn['redis_cores']:.3f} Redis "
            f"cores ({churn['redis_us_per_session']:.0f} µs each), generators "
            f"{churn['generator_cores']:.2f} cores"
        )
        # (If the closed loop did not reach 70%, the paced run cannot either: it runs at the
        # closed loop's rate then.)
        paced_rate = churn["sessions_per_s"] * min(
            1.0, TARGET_CORE / max(churn["redis_cores"], 1e-9)
        )
        say(f"redis: churn at {paced_rate:,.0f} session starts/s (open loop)")
        paced = await churn_phase(paced_rate)
        say(
            f"  {paced['sessions_per_s']:,.0f} sessions/s on {paced['redis_cores']:.3f} Redis "
            f"cores, session p99 {paced['session_p99_s'] * 1000:.1f} ms"
        )
        # 4. Held participants with their renewals, growing.
        steps: list[dict[str, Any]] = []
        nodes_started = 0
        for target in plan.steps:
            nodes = [f"node-{i}" for i in range(max(1, target // NODES_PER_PARTICIPANTS))]
            per = math.ceil(target / plan.generators)
            say(f"redis: hold {target:,} participants in spaces of {plan.space_size}")
            grown = await asyncio.gather(
                *(
                    g.call(
                        "grow",
                        limit_s=600,
                        participants=per,
                        size=plan.space_size,
                        nodes=nodes,
                        interval_s=plan.renew_interval_s,
                    )
                    for g in generators
                )
            )
            if len(nodes) != nodes_started:
                nodes_started = len(nodes)
                # The background scales with the deployment: one generator plays it.
                await generators[0].call("background", replicas=plan.presence_replicas, nodes=nodes)
            await asyncio.sleep(plan.renew_interval_s)  # one full renewal cycle first
            cpu, replies, quiet, commands, load_average = await measure(
                redis,
                pids,
                plan.quick,
                [g.call("window", seconds=plan.window_s) for g in generators],
            )
            held = sum(r["participants"] for r in grown)
            renews = sum(r["renews"] for r in replies) / cpu.wall
            # Renewals Redis ran, whether they found their sessions or not (a session that
            # expired while the machine starved the generators is "lost": still a renewal).
            answered = renews + sum(r["errors"] for r in replies) / cpu.wall
            late = max(r["late_p99_s"] for r in replies)
            row = {
                "participants": held,
                # Participants whose renewals Redis ran: what its CPU paid for.
                "renewed_participants": answered * plan.space_size * plan.renew_interval_s,
                "spaces": held // plan.space_size,
                "nodes": len(nodes),
                "renews_per_s": renews,
                "expected_renews_per_s": held / plan.space_size / plan.renew_interval_s,
                "renew_errors": sum(r["errors"] for r in replies),
                "late_p99_s": late,
                "redis_cores": cpu.cores("redis"),
                "generator_cores": cpu.group("generator-"),
                "machine_busy": cpu.machine_busy,
                "steal": cpu.steal,
                "foreign_cores_before": quiet,
                "load_average": load_average,
                "setup_s": max(r["setup_s"] for r in grown),
                "redis_command_cores": command_usec(commands) / 1e6 / cpu.wall,
                "evalsha_usec_per_call": commands.get("evalsha", {}).get("usec_per_call", 0.0),
            }
            row["on_schedule"] = renews >= 0.9 * row["expected_renews_per_s"] and late < LATE_P99_S
            row["redis_us_per_participant_s"] = row["redis_cores"] / held * 1e6
            steps.append(row)
            say(
                f"  Redis {row['redis_cores']:.3f} cores, {renews:,.0f} renewals/s "
                f"(of {row['expected_renews_per_s']:,.0f}), late p99 {late * 1000:.0f} ms, "
                f"machine {row['machine_busy']:.0%}"
            )
            if row["redis_cores"] >= SATURATED_CORE:
                say("  Redis is saturated")
                break
            own = row["redis_cores"] + row["generator_cores"]
            if not row["on_schedule"] or own > 0.95 * (os.cpu_count() or 1):
                say("  the generators fell behind (the machine is full): stopping here")
                break

    finally:
        await stop_all(generators)
        if redis is not None:
            await redis.aclose()
        cluster.close()

    # The cost of what was actually renewed, over the steps that kept their schedule (a step
    # where the generators fell behind still says something, but less).
    kept = [r for r in steps if r["on_schedule"]] or steps
    any_on_schedule = any(r["on_schedule"] for r in steps)
    intercept, slope = fit([(r["renewed_participants"], r["redis_cores"]) for r in kept])
    per_participant_us = slope * 1e6
    participants_at_target = (TARGET_CORE - intercept) / slope if slope > 0 else math.nan
    session_us = churn["redis_us_per_session"]
    sessions_at_target = TARGET_CORE / (session_us / 1e6) if session_us > 0 else math.nan
    # Sessions of session_minutes: each participant also starts one per session length.
    with_churn_us = per_participant_us + session_us / (plan.session_minutes * 60)
    mixed_at_target = (
        (TARGET_CORE - intercept) / (with_churn_us / 1e6) if with_churn_us > 0 else math.nan
    )
    top = max(steps, key=lambda r: r["redis_cores"])
    measured = max(kept, key=lambda r: r["redis_cores"])
    # The same model from the scripts' own cost (a floor: it leaves out each command's network
    # and event-loop overhead, one PING's worth).
    script_participant_us = scripts["renew"] / plan.space_size / plan.renew_interval_s
    script_session_us = scripts["join"] + scripts["claim"] + scripts["leave"]
    summary = {
        "script_us": scripts,
        "script_us_per_participant_s": script_participant_us,
        "script_us_per_session": script_session_us,
        "participants_at_70pct_core_from_script_cost": TARGET_CORE / (script_participant_us / 1e6),
        "redis_us_per_participant_s": per_participant_us,
        "background_redis_cores": intercept,
        "participants_at_70pct_core": participants_at_target,
        "redis_us_per_session": session_us,
        "sessions_per_s_at_70pct_core": sessions_at_target,
        "participants_at_70pct_core_with_churn": mixed_at_target,
        "session_minutes": plan.session_minutes,
        "participant_in_pings": per_participant_us / baseline["redis_us_per_ping"],
        "session_in_pings": session_us / baseline["redis_us_per_ping"],
        "steps_fitted": len(kept),
        "highest_measured_participants": top["participants"],
        "highest_measured_redis_cores": top["redis_cores"],
        "saturated": top["redis_cores"] >= SATURATED_CORE,
        "sessions_per_s_measured": churn["sessions_per_s"],
        # Measured, not extrapolated: the busiest hold step whose renewals kept their schedule,
        # and the churn paced for 70% of a core.
        "measured_participants": measured["participants"],
        "measured_participants_on_schedule": any_on_schedule,
        "measured_participants_redis_cores": measured["redis_cores"],
        "measured_participants_renews_per_s": measured["renews_per_s"],
        "measured_sessions_per_s": paced["sessions_per_s"],
        "measured_sessions_redis_cores": paced["redis_cores"],
    }
    targets = [
        {
            "target": "one primary at 70% of a core carries >=50,000 connected participants",
            "value": participants_at_target,
            "met": bool(participants_at_target >= 50_000),
        },
        {
            "target": "the per-participant cost rests on >=2 steps that kept their schedule",
            "value": sum(1 for r in steps if r["on_schedule"]),
            "met": sum(1 for r in steps if r["on_schedule"]) >= 2,
        },
        {
            "target": "Redis measured at >=70% of a core holding participants on schedule",
            "value": measured["redis_cores"],
            "met": bool(measured["on_schedule"] and measured["redis_cores"] >= TARGET_CORE),
        },
        {
            "target": "Redis measured at >=70% of a core under churn (closed loop)",
            "value": churn["redis_cores"],
            "met": bool(churn["redis_cores"] >= TARGET_CORE),
        },
    ]
    return {
        "config": {
            **{k: v for k, v in asdict(plan).items() if k != "quick"},
            "session_lease_ms": SESSION_MS,
            "participants_per_node": NODES_PER_PARTICIPANTS,
            "store": "RedisStore (standalone), hiredis",
        },
        "baseline": baseline,
        "steps": steps,
        "churn": churn,
        "churn_paced": paced,
        "summary": summary,
        "targets": targets,
    }


def render(result: dict[str, Any]) -> str:
    rows = [
        [
            r["participants"],
            fmt(r["renewed_participants"], 0),
            fmt(r["renews_per_s"], 0),
            f"{r['redis_cores']:.3f}",
            f"{r['redis_command_cores']:.3f}",
            f"{r['evalsha_usec_per_call']:.1f}",
            f"{r['redis_us_per_participant_s']:.2f}",
            f"{r['late_p99_s'] * 1000:.0f}",
            "yes" if r["on_schedule"] else "no",
            f"{r['generator_cores']:.2f}",
            f"{r['machine_busy']:.0%}",
            f"{r.get('load_average', math.nan):.1f}",
        ]
        for r in result["steps"]
    ]
    s, b, c = result["summary"], result["baseline"], result["churn"]
    out = table(
        [
            "participants",
            "renewed on time",
            "renewals/s",
            "redis cores",
            "of which commands",
            "µs per EVALSHA",
            "redis µs per participant-s (incl. background)",
            "renew late p99 ms",
            "on schedule",
            "generator cores",
            "machine busy",
            "load average",
        ],
        rows,
    )
    costs = ", ".join(f"{k} {v:.1f}" for k, v in s["script_us"].items())
    out += (
        f"\n\nbaseline: {fmt(b['pings_per_s'], 0)} PING/s, {b['redis_us_per_ping']:.2f} µs of "
        f"Redis CPU per PING"
        f"\nscripts, µs of Redis time per call (INFO commandstats): {costs}; from these alone, "
        f"{s['script_us_per_participant_s']:.2f} µs per participant-s and "
        f"{fmt(s['participants_at_70pct_core_from_script_cost'], 0)} participants at 70% of a "
        f"core (a floor on the cost: no network or event-loop overhead)"
        f"\nchurn: {fmt(c['sessions_per_s'], 0)} sessions/s (join + claim + leave) on "
        f"{c['redis_cores_for_churn']:.3f} Redis cores: "
        f"{fmt(c['redis_us_per_session'], 1)} µs per session (generators "
        f"{c['generator_cores']:.2f} cores); paced: "
        f"{fmt(result['churn_paced']['sessions_per_s'], 0)} sessions/s on "
        f"{result['churn_paced']['redis_cores']:.3f} Redis cores, session p99 "
        f"{result['churn_paced']['session_p99_s'] * 1000:.1f} ms; load average "
        f"{c.get('load_average', math.nan):.1f} and "
        f"{result['churn_paced'].get('load_average', math.nan):.1f}"
        f"\nmeasured: {s['measured_participants']:,} participants "
        + (
            "renewed on schedule "
            if s.get("measured_participants_on_schedule", True)
            else "held, renewals NOT on schedule "
        )
        + f"({fmt(s['measured_participants_renews_per_s'], 0)} renewals/s) on "
        f"{s['measured_participants_redis_cores']:.3f} Redis cores; "
        f"{fmt(s['measured_sessions_per_s'], 0)} session starts/s on "
        f"{s['measured_sessions_redis_cores']:.3f} Redis cores"
        f"\n\nper participant (slope over {s['steps_fitted']} steps): "
        f"{s['redis_us_per_participant_s']:.2f} µs of Redis CPU per second "
        f"({s['participant_in_pings']:.2f} PINGs/s); background {s['background_redis_cores']:.3f} "
        f"cores"
        f"\none primary at 70% of a core: {fmt(s['participants_at_70pct_core'], 0)} participants, "
        f"or {fmt(s['sessions_per_s_at_70pct_core'], 0)} session starts/s, or "
        f"{fmt(s['participants_at_70pct_core_with_churn'], 0)} participants in "
        f"{s['session_minutes']:.0f}-minute sessions"
        f"\nhighest measured: {s['highest_measured_participants']:,} participants on "
        f"{s['highest_measured_redis_cores']:.3f} Redis cores"
        + (" (saturated)" if s["saturated"] else " (not saturated)")
    )
    return out
