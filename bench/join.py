"""Join: how many joins per second presence admits, and how long each takes, against a real
Redis, through one presence process and through several.

Every Join verifies the JWT (RS256), reads the signing key, space and placement from Redis,
places the space on a media node and reserves the participant with one Lua script: the whole
admission path, up to the ticket for the media node (which is not dialled here).

* **throughput**: closed loop, a fixed number of joins in flight, for a fixed time;
* **latency at a fixed rate**: open loop at 1,000 joins/s, each latency measured from the
  moment the join was due (so a stall is not hidden by sending less);
* **contested**: many simultaneous joins with the same participant_id, spread over every
  presence process; exactly one per id may succeed, so duplicates must be 0.

Load generators are separate processes (`joiner` role) with pre-signed tokens: signing is the
customer's backend's work, not presence's."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import grpc

from bench.cluster import Admin, Cluster, Proc
from bench.common import CpuWindow, fmt, percentile, say, table, wait_quiet
from bench.ipc import Channel, Worker, stop_all
from spaces.v1 import presence_pb2, presence_pb2_grpc

NAME = "join"
SUMMARY = "joins/s and join latency through 1 and N presence processes; contested joins"

SPACE_CAPACITY = 10_000
"""Participants per space (the control API's ceiling); reservations from joins that never dial
the media node live for the pending lease (20 s), so the load is spread over enough spaces."""
PENDING_LEASE_S = 20


@dataclass(frozen=True)
class Plan:
    presence: tuple[int, ...]
    duration_s: float
    concurrency: int
    rates: tuple[int, ...]
    contest_ids: int
    contest_attempts: int
    generators: int
    quick: bool = False


FULL = Plan(
    presence=(1, 2, 4),
    duration_s=10.0,
    concurrency=64,
    rates=(100, 250, 500, 1000),
    contest_ids=200,
    contest_attempts=10,
    generators=2,
)
QUICK = Plan(
    presence=(1,),
    duration_s=1.5,
    concurrency=8,
    rates=(100,),
    contest_ids=5,
    contest_attempts=4,
    generators=1,
    quick=True,
)


# --- the load generator (a worker process) --------------------------------------------------


async def run_joiner(config: dict[str, Any], channel: Channel) -> None:
    channels = [grpc.aio.insecure_channel(a) for a in config["addresses"]]
    stubs = [presence_pb2_grpc.PresenceServiceStub(c) for c in channels]
    details: dict[str, str] = {}
    """The first error message seen for each status code."""
    channel.send({"ready": True})

    async def join(stub: Any, token: str) -> tuple[str, str]:
        try:
            reply = await stub.Join(presence_pb2.JoinRequest(token=token), timeout=30)
        except grpc.aio.AioRpcError as exc:
            details.setdefault(exc.code().name, str(exc.details()))
            return exc.code().name, ""
        return "OK", str(reply.participant_id)

    async def closed(request: dict[str, Any]) -> dict[str, Any]:
        tokens: list[str] = request["tokens"]
        deadline = time.monotonic() + float(request["duration_s"])
        latencies: list[float] = []
        codes: Counter[str] = Counter()
        order = itertools.count()

        async def loop(slot: int) -> None:
            while time.monotonic() < deadline:
                n = next(order)
                stub = stubs[(slot + n) % len(stubs)]
                started = time.perf_counter()
                code, _ = await join(stub, tokens[n % len(tokens)])
                latencies.append((time.perf_counter() - started) * 1000)
                codes[code] += 1

        started = time.monotonic()
        await asyncio.gather(*(loop(i) for i in range(int(request["concurrency"]))))
        return {
            "wall_s": time.monotonic() - started,
            "latency_ms": latencies,
            "codes": codes,
            "details": details,
        }

    async def open_loop(request: dict[str, Any]) -> dict[str, Any]:
        tokens: list[str] = request["tokens"]
        rate = float(request["rate"])
        count = int(rate * float(request["duration_s"]))
        latencies: list[float] = []
        codes: Counter[str] = Counter()
        tasks = []
        origin = time.perf_counter() + 0.05

        async def one(n: int, due: float) -> None:
            code, _ = await join(stubs[n % len(stubs)], tokens[n % len(tokens)])
            latencies.append((time.perf_counter() - due) * 1000)
            codes[code] += 1

        for n in range(count):
            due = origin + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(n, due)))
        await asyncio.gather(*tasks)
        return {
            "wall_s": time.perf_counter() - origin,
            "latency_ms": latencies,
            "codes": codes,
            "details": details,
        }

    async def contest(request: dict[str, Any]) -> dict[str, Any]:
        """Every (token, attempt) at once; which participant ids were admitted how often."""
        attempts = [
            (stubs[(i + a) % len(stubs)], token)
            for i, token in enumerate(request["tokens"])
            for a in range(int(request["attempts"]))
        ]
        results = await asyncio.gather(*(join(stub, token) for stub, token in attempts))
        admitted = Counter(pid for code, pid in results if code == "OK")
        codes = Counter(code for code, _ in results)
        return {"admitted": admitted, "codes": codes}

    async def stop(_: dict[str, Any]) -> dict[str, Any]:
        await asyncio.gather(*(c.close(None) for c in channels))
        return {}

    await channel.serve({"closed": closed, "open": open_loop, "contest": contest, "stop": stop})


# --- the orchestrator -----------------------------------------------------------------------


class Setup:
    """Redis, control+auth, a media node (presence places spaces on it) and N presence."""

    def __init__(self, presence: int) -> None:
        self.cluster = Cluster()
        self.presence_count = presence
        self.presence: list[Proc] = []
        self.pids: dict[str, int] = {}
        self.generators: list[Worker] = []
        self.tokens: list[str] = []
        self.key: Any = None
        self.admin: Admin | None = None

    async def start(self, generators: int, spaces: int) -> None:
        cluster = self.cluster
        self.pids["redis"] = cluster.start_redis()
        api = cluster.start_spaces("api", "serve", "--services", "control,auth")
        node = cluster.start_spaces("node", "media-node")
        self.presence = [
            cluster.start_spaces(f"presence-{i}", "serve", "--services", "presence")
            for i in range(self.presence_count)
        ]
        await asyncio.gather(*(cluster.wait_serving(p) for p in (api, node, *self.presence)))
        for i, proc in enumerate(self.presence):
            self.pids[f"presence-{i}"] = proc.pid
        self.pids["node"] = node.pid
        self.admin = Admin(api.address, cluster.admin_key)
        self.key = await self.admin.signing_key()
        space_ids = await asyncio.gather(
            *(self.admin.space(max_participants=SPACE_CAPACITY) for _ in range(spaces))
        )
        self.tokens = [self.key.token(s, role="subscriber") for s in space_ids]
        config = {"addresses": [p.address for p in self.presence]}
        self.generators = list(
            await asyncio.gather(
                *(
                    Worker.start(f"joiner-{i}", "joiner", config, cluster.workdir)
                    for i in range(generators)
                )
            )
        )
        for i, worker in enumerate(self.generators):
            self.pids[f"generator-{i}"] = worker.pid
        await self.wait_placeable()

    async def wait_placeable(self, limit_s: float = 15.0) -> None:
        """Until every presence process sees the media node in its registry view."""
        deadline = time.monotonic() + limit_s
        for proc in self.presence:
            async with grpc.aio.insecure_channel(proc.address) as ch:
                stub = presence_pb2_grpc.PresenceServiceStub(ch)
                while True:
                    try:
                        await stub.Join(presence_pb2.JoinRequest(token=self.tokens[0]), timeout=5)
                        break
                    except grpc.aio.AioRpcError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.2)

    async def close(self) -> None:
        await stop_all(self.generators)
        if self.admin is not None:
            await self.admin.close()
        self.cluster.close()


def merge(replies: list[dict[str, Any]], cpu: CpuWindow, presence: int) -> dict[str, Any]:
    latencies = [v for r in replies for v in r["latency_ms"]]
    codes: Counter[str] = Counter()
    details: dict[str, str] = {}
    for r in replies:
        codes.update(r["codes"])
        details.update(r["details"])
    wall = max(r["wall_s"] for r in replies)
    ok = codes.get("OK", 0)
    presence_cores = cpu.group("presence-")
    return {
        "presence_processes": presence,
        "joins": sum(codes.values()),
        "ok": ok,
        "errors": {k: v for k, v in codes.items() if k != "OK"},
        "error_details": details,
        "joins_per_s": ok / wall if wall else math.nan,
        "latency_ms": {
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99),
            "max": max(latencies) if latencies else math.nan,
        },
        "presence_cores": presence_cores,
        "joins_per_presence_core": ok / wall / presence_cores if presence_cores else math.nan,
        "redis_cores": cpu.cores("redis"),
        "generator_cores": cpu.group("generator-"),
        "foreign_cores": cpu.foreign_cores(),
        "machine_busy": cpu.machine_busy,
    }


async def closed_run(setup: Setup, plan: Plan) -> dict[str, Any]:
    per = max(1, plan.concurrency // len(setup.generators))
    quiet = await wait_quiet(setup.pids, plan.quick)
    cpu = CpuWindow(setup.pids).start()
    replies = await asyncio.gather(
        *(
            g.call("closed", tokens=setup.tokens, duration_s=plan.duration_s, concurrency=per)
            for g in setup.generators
        )
    )
    cpu.stop()
    row = merge(replies, cpu, setup.presence_count)
    row["concurrency"] = per * len(setup.generators)
    row["foreign_cores_before"] = quiet
    return row


async def open_run(setup: Setup, plan: Plan, rate: int) -> dict[str, Any]:
    per = rate / len(setup.generators)
    quiet = await wait_quiet(setup.pids, plan.quick)
    cpu = CpuWindow(setup.pids).start()
    replies = await asyncio.gather(
        *(
            g.call("open", tokens=setup.tokens, rate=per, duration_s=plan.duration_s)
            for g in setup.generators
        )
    )
    cpu.stop()
    row = merge(replies, cpu, setup.presence_count)
    row["offered_rate"] = rate
    row["foreign_cores_before"] = quiet
    return row


async def contest_run(setup: Setup, plan: Plan, space_token_space: str) -> dict[str, Any]:
    """Each participant id is tried ``contest_attempts`` times at once, over every presence
    process and every generator."""
    key = setup.key
    ids = [f"contested-{i}" for i in range(plan.contest_ids)]
    tokens = [key.token(space_token_space, participant_id=pid) for pid in ids]
    per_gen = max(1, plan.contest_attempts // len(setup.generators))
    replies = await asyncio.gather(
        *(g.call("contest", tokens=tokens, attempts=per_gen) for g in setup.generators)
    )
    admitted: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    for r in replies:
        admitted.update(r["admitted"])
        codes.update(r["codes"])
    duplicates = sum(max(0, n - 1) for n in admitted.values())
    return {
        "participant_ids": len(ids),
        "attempts": sum(codes.values()),
        "presence_processes": setup.presence_count,
        "admitted_ids": len(admitted),
        "duplicates": duplicates,
        "codes": dict(codes),
    }


async def run(quick: bool) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    throughput: list[dict[str, Any]] = []
    latency: list[dict[str, Any]] = []
    contested: dict[str, Any] = {}
    for presence in plan.presence:
        # Enough spaces that no space fills up with reservations during a run.
        peak = 5_000 if not quick else 500
        spaces = max(2, math.ceil(peak * (plan.duration_s + PENDING_LEASE_S) / SPACE_CAPACITY))
        setup = Setup(presence)
        try:
            await setup.start(plan.generators, spaces)
            say(f"join: {presence} presence process(es), {plan.concurrency} joins in flight")
            row = await closed_run(setup, plan)
            throughput.append(row)
            say(
                f"  {row['joins_per_s']:.0f} joins/s, p99 {row['latency_ms']['p99']:.1f} ms, "
                f"presence {row['presence_cores']:.2f} cores, errors {row['errors']}"
            )
            rates = plan.rates if presence == plan.presence[0] else plan.rates[-1:]
            for rate in rates:
                say(f"join: {presence} presence process(es), open loop at {rate} joins/s")
                await asyncio.sleep(1.0)
                row = await open_run(setup, plan, rate)
                latency.append(row)
                say(
                    f"  p50 {row['latency_ms']['p50']:.1f} ms, "
                    f"p99 {row['latency_ms']['p99']:.1f} ms, errors {row['errors']}"
                )
            if presence == plan.presence[-1]:
                assert setup.admin is not None
                space_id = await setup.admin.space(max_participants=SPACE_CAPACITY)
                say(f"join: contested, {presence} presence process(es)")
                contested = await contest_run(setup, plan, space_id)
                say(f"  duplicates {contested['duplicates']}")
        finally:
            await setup.close()
    one = throughput[0]
    one_latency = [r for r in latency if r["presence_processes"] == plan.presence[0]]
    at_1000 = next((r for r in one_latency if r["offered_rate"] == 1000), one_latency[-1])
    summary = {
        "joins_per_s_one_presence": one["joins_per_s"],
        "joins_per_s_best": max(r["joins_per_s"] for r in throughput),
        "best_presence_processes": max(throughput, key=lambda r: r["joins_per_s"])[
            "presence_processes"
        ],
        "latency_at_rate": at_1000["offered_rate"],
        "latency_ms_at_rate": at_1000["latency_ms"],
        "contested_duplicates": contested.get("duplicates"),
    }
    targets = [
        {
            "target": "joins through one presence process >=3,000 joins/s",
            "value": one["joins_per_s"],
            "met": one["joins_per_s"] >= 3000,
        },
        {
            "target": f"join p99 <=10 ms at {at_1000['offered_rate']:,} joins/s",
            "value": at_1000["latency_ms"]["p99"],
            "met": at_1000["latency_ms"]["p99"] <= 10,
        },
        {
            "target": "contested join duplicates == 0",
            "value": contested.get("duplicates"),
            "met": contested.get("duplicates") == 0,
        },
    ]
    return {
        "config": {
            "presence_processes": list(plan.presence),
            "duration_s": plan.duration_s,
            "concurrency": plan.concurrency,
            "open_loop_rates": list(plan.rates),
            "generator_processes": plan.generators,
            "contest": {"ids": plan.contest_ids, "attempts_per_id": plan.contest_attempts},
            "token": "RS256, subscriber role, pre-signed",
        },
        "throughput": throughput,
        "latency": latency,
        "contested": contested,
        "summary": summary,
        "targets": targets,
    }


def render(result: dict[str, Any]) -> str:
    def row(r: dict[str, Any], load: str) -> list[Any]:
        lat = r["latency_ms"]
        return [
            r["presence_processes"],
            load,
            fmt(r["joins_per_s"], 0),
            fmt(lat["p50"], 2),
            fmt(lat["p95"], 2),
            fmt(lat["p99"], 2),
            f"{r['presence_cores']:.2f}",
            fmt(r["joins_per_presence_core"], 0),
            f"{r['redis_cores']:.2f}",
            f"{r['generator_cores']:.2f}",
            sum(r["errors"].values()),
        ]

    rows = [row(r, f"closed, {r['concurrency']} in flight") for r in result["throughput"]]
    rows += [row(r, f"open, {r['offered_rate']:,}/s") for r in result["latency"]]
    out = table(
        [
            "presence procs",
            "load",
            "joins/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "presence cores",
            "joins/s per presence core",
            "redis cores",
            "generator cores",
            "errors",
        ],
        rows,
    )
    c = result["contested"]
    if c:
        out += (
            f"\n\ncontested: {c['participant_ids']} participant ids x "
            f"{c['attempts'] // max(1, c['participant_ids'])} simultaneous joins each over "
            f"{c['presence_processes']} presence process(es): {c['admitted_ids']} admitted, "
            f"duplicates {c['duplicates']} (codes {c['codes']})"
        )
    return out
