"""Media fan-out: one publisher (640x480 at 30 fps, VP8 pinned to 1 Mbps) through one media
node to N subscribers, N = 1, 5, 10, 20, 40, ... until the machine runs out.

For each N it measures, over a steady window: the node's own CPU (core-seconds per second,
from /proc), forwarded packets/s (the node's counter, checked against what subscribers
count), packets/s per core, loss (by sequence number at each subscriber), and the first-frame
time of late joiners (start of join to the last packet of their first complete keyframe).

The same run then measures the baseline, aiortc's MediaRelay (decode once, encode per
subscriber), with the same publisher and the same subscriber processes, and prints the cost
ratio per subscriber stream."""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass
from typing import Any

from bench.cluster import Admin, Cluster, metric, scrape
from bench.common import CpuWindow, fmt, percentile, say, table
from bench.ipc import Worker, stop_all

NAME = "fanout"
SUMMARY = "one publisher through one media node to N subscribers, vs aiortc MediaRelay"

PUBLISHER_COLOR = (200, 60, 60)
LOSS_LIMIT = 0.01
"""A step with more loss than this is past what the machine can carry: the last step."""


@dataclass(frozen=True)
class Plan:
    steps: tuple[int, ...]
    relay_steps: tuple[int, ...]
    window_s: float
    warmup_s: float
    late_per_step: int
    workers: int


FULL = Plan(
    steps=(1, 5, 10, 20, 40, 60, 80, 120, 160, 200),
    relay_steps=(1, 2, 4, 6, 8),
    window_s=10.0,
    warmup_s=3.0,
    late_per_step=5,
    workers=2,
)
QUICK = Plan(
    steps=(1, 2), relay_steps=(1,), window_s=2.0, warmup_s=1.0, late_per_step=1, workers=1
)


async def measure_window(
    cluster_pids: dict[str, int],
    subscribers: list[Worker],
    window_s: float,
    metrics_port: int = 0,
) -> dict[str, Any]:
    """CPU of every process, packets forwarded (node counter) and received (subscribers)."""
    before = scrape(metrics_port) if metrics_port else {}
    await asyncio.gather(*(w.call("mark") for w in subscribers))
    cpu = CpuWindow(cluster_pids).start()
    await asyncio.sleep(window_s)
    cpu.stop()
    reports = await asyncio.gather(*(w.call("report") for w in subscribers))
    after = scrape(metrics_port) if metrics_port else {}
    expected = sum(sum(r["expected"]) for r in reports)
    received = sum(sum(r["received"]) for r in reports)
    per_sub = [
        (e, r) for rep in reports for e, r in zip(rep["expected"], rep["received"], strict=True)
    ]
    forwarded = metric(after, "spaces_forwarded_packets_total") - metric(
        before, "spaces_forwarded_packets_total"
    )
    dropped = metric(after, "spaces_dropped_packets_total") - metric(
        before, "spaces_dropped_packets_total"
    )
    worst = max((1 - r / e for e, r in per_sub if e), default=0.0)
    return {
        "cpu": dict(cpu.result),
        "wall_s": cpu.wall,
        "machine_busy": cpu.machine_busy,
        "expected": expected,
        "received": received,
        "loss": (1 - received / expected) if expected else math.nan,
        "worst_subscriber_loss": worst,
        "node_forwarded": forwarded,
        "node_dropped": dropped,
    }


class System:
    """One system under test (Spaces or the MediaRelay server) with its load generators."""

    def __init__(self, label: str, cluster: Cluster, plan: Plan) -> None:
        self.label = label
        self.cluster = cluster
        self.plan = plan
        self.workers: list[Worker] = []
        self.subscribers: list[Worker] = []
        self.publisher: Worker | None = None
        self.pids: dict[str, int] = {}
        self.server_name = ""
        self.metrics_port = 0
        self.count = 0
        self.tokens: Any = None
        self.publisher_id = ""
        self.sub_config: dict[str, Any] = {}

    async def start_generators(self, pub_config: dict[str, Any]) -> None:
        logdir = self.cluster.workdir
        self.publisher = await Worker.start(
            f"{self.label}-publisher", "publisher", pub_config, logdir
        )
        self.workers.append(self.publisher)
        self.publisher_id = self.publisher.ready.get("participant_id", "")
        self.pids["publisher"] = self.publisher.pid
        for i in range(self.plan.workers):
            worker = await Worker.start(
                f"{self.label}-subscribers-{i}", "subscribers", self.sub_config, logdir
            )
            self.subscribers.append(worker)
            self.workers.append(worker)
            self.pids[f"generator-{i}"] = worker.pid

    async def grow(self, n: int) -> list[float]:
        """Add subscribers up to ``n`` in total, spread over the generator processes."""
        shares = [0] * len(self.subscribers)
        for i in range(self.count, n):
            shares[i % len(shares)] += 1
        calls = []
        for worker, share in zip(self.subscribers, shares, strict=True):
            if share:
                calls.append(
                    worker.call(
                        "add",
                        timeout=180,
                        count=share,
                        tokens=self.new_tokens(share),
                        publisher_id=self.publisher_id,
                    )
                )
        replies = await asyncio.gather(*calls)
        self.count = n
        return [ms for reply in replies for ms in reply["join_ms"]]

    def new_tokens(self, count: int) -> list[str] | None:
        return [self.tokens() for _ in range(count)] if self.tokens else None

    async def late_joiners(self, count: int) -> list[float | None]:
        if not count:
            return []
        reply = await self.subscribers[0].call(
            "late",
            timeout=60 + 15 * count,
            count=count,
            tokens=self.new_tokens(count),
            publisher_id=self.publisher_id,
        )
        return list(reply["first_frame_ms"])

    async def close(self) -> None:
        await stop_all(self.workers)


def step_row(label: str, n: int, m: dict[str, Any], server: str) -> dict[str, Any]:
    server_cores = m["cpu"].get(server, 0.0)
    generators = sum(v for k, v in m["cpu"].items() if k.startswith("generator"))
    received_pps = m["received"] / m["wall_s"]
    forwarded_pps = m["node_forwarded"] / m["wall_s"] if m["node_forwarded"] else received_pps
    return {
        "system": label,
        "subscribers": n,
        "server_cores": server_cores,
        "server_cores_per_subscriber": server_cores / n,
        "forwarded_pps": forwarded_pps,
        "received_pps": received_pps,
        "received_pps_per_subscriber": received_pps / n,
        "pps_per_core": forwarded_pps / server_cores if server_cores > 0 else math.nan,
        "loss": m["loss"],
        "worst_subscriber_loss": m["worst_subscriber_loss"],
        "node_dropped": m["node_dropped"],
        "publisher_cores": m["cpu"].get("publisher", 0.0),
        "generator_cores": generators,
        "other_cores": {
            k: v
            for k, v in m["cpu"].items()
            if k not in (server, "publisher") and not k.startswith("generator")
        },
        "machine_busy": m["machine_busy"],
    }


async def run_spaces(plan: Plan) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    cluster = Cluster()
    system = System("spaces", cluster, plan)
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"late_first_frame_ms": [], "join_ms": []}
    try:
        redis = cluster.start_redis()
        api = cluster.start_spaces("api", "serve", "--services", "control,auth,presence")
        node = cluster.start_spaces("node", "media-node")
        await asyncio.gather(cluster.wait_serving(api), cluster.wait_serving(node))
        admin = Admin(api.address, cluster.admin_key)
        key = await admin.signing_key()
        space_id = await admin.space(max_participants=1000)
        await admin.close()
        await asyncio.sleep(0.5)  # the node's first heartbeat reaches presence's registry view
        system.pids = {"node": node.pid, "api": api.pid, "redis": redis.pid}
        system.tokens = lambda: key.token(space_id, role="subscriber")
        system.sub_config = {"mode": "spaces", "address": api.address}
        await system.start_generators(
            {"mode": "spaces", "token": key.token(space_id), "address": api.address}
        )
        for n in plan.steps:
            say(f"fanout/spaces: {n} subscriber(s)")
            extra["join_ms"] += await system.grow(n)
            await asyncio.sleep(plan.warmup_s)
            m = await measure_window(system.pids, system.subscribers, plan.window_s, node.metrics_port)
            late = await system.late_joiners(plan.late_per_step)
            row = step_row("spaces", n, m, "node")
            row["late_first_frame_ms"] = late
            extra["late_first_frame_ms"] += late
            rows.append(row)
            say(
                f"  node {row['server_cores']:.3f} cores, {row['forwarded_pps']:.0f} pkt/s, "
                f"loss {row['loss']:.4%}, generators {row['generator_cores']:.2f} cores"
            )
            if not (row["loss"] <= LOSS_LIMIT) or row["machine_busy"] > 0.97:
                row["limit"] = "loss" if not (row["loss"] <= LOSS_LIMIT) else "machine busy"
                say(f"  stopping: {row['limit']}")
                break
        extra["decoded_sample"] = await system.subscribers[0].call(
            "decoded",
            token=key.token(space_id, role="subscriber"),
            publisher_id=system.publisher_id,
            color=list(PUBLISHER_COLOR),
        )
    finally:
        await system.close()
        cluster.close()
    return rows, extra


async def run_relay(plan: Plan) -> list[dict[str, Any]]:
    cluster = Cluster()
    system = System("relay", cluster, plan)
    rows: list[dict[str, Any]] = []
    try:
        server = await Worker.start("relay-server", "relay", {}, cluster.workdir)
        system.workers.append(server)
        url = server.ready["url"]
        system.pids = {"relay": server.pid}
        system.sub_config = {"mode": "relay", "url": url}
        await system.start_generators({"mode": "relay", "url": url})
        for n in plan.relay_steps:
            say(f"fanout/relay: {n} subscriber(s)")
            await system.grow(n)
            await asyncio.sleep(plan.warmup_s)
            m = await measure_window(system.pids, system.subscribers, plan.window_s)
            row = step_row("relay", n, m, "relay")
            rows.append(row)
            say(
                f"  relay {row['server_cores']:.3f} cores, {row['received_pps']:.0f} pkt/s "
                f"received ({row['received_pps_per_subscriber']:.0f} per subscriber)"
            )
            if row["server_cores"] > 0.9 or row["machine_busy"] > 0.97:
                row["limit"] = "relay saturated" if row["server_cores"] > 0.9 else "machine busy"
                say(f"  stopping: {row['limit']}")
                break
    finally:
        await system.close()
        cluster.close()
    return rows


def ratios(spaces: list[dict[str, Any]], relay: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """MediaRelay's CPU per subscriber stream over Spaces' at the same N."""
    by_n = {r["subscribers"]: r for r in spaces}
    out = []
    for r in relay:
        s = by_n.get(r["subscribers"])
        if s is None or s["server_cores"] <= 0:
            continue
        out.append(
            {
                "subscribers": r["subscribers"],
                "relay_cores_per_subscriber": r["server_cores_per_subscriber"],
                "spaces_cores_per_subscriber": s["server_cores_per_subscriber"],
                "ratio": r["server_cores_per_subscriber"] / s["server_cores_per_subscriber"],
            }
        )
    return out


def interpolate_steps(plan: Plan) -> Plan:
    """Relay steps must be a subset of the Spaces steps for a like-for-like ratio."""
    steps = tuple(sorted(set(plan.steps) | set(plan.relay_steps)))
    return Plan(
        steps, plan.relay_steps, plan.window_s, plan.warmup_s, plan.late_per_step, plan.workers
    )


async def run(quick: bool) -> dict[str, Any]:
    plan = interpolate_steps(QUICK if quick else FULL)
    spaces_rows, extra = await run_spaces(plan)
    relay_rows = await run_relay(plan)
    ratio_rows = ratios(spaces_rows, relay_rows)
    late = [v for v in extra["late_first_frame_ms"] if v is not None]
    missing = sum(1 for v in extra["late_first_frame_ms"] if v is None)
    clean = [r for r in spaces_rows if r["loss"] <= LOSS_LIMIT]
    best = max(clean or spaces_rows, key=lambda r: r["subscribers"])
    # Marginal cost per subscriber stream: slope between the smallest and largest clean step.
    small = min(clean or spaces_rows, key=lambda r: r["subscribers"])
    marginal = (
        (best["server_cores"] - small["server_cores"])
        / (best["subscribers"] - small["subscribers"])
        if best["subscribers"] > small["subscribers"]
        else best["server_cores_per_subscriber"]
    )
    headline_ratio = max(ratio_rows, key=lambda r: r["subscribers"]) if ratio_rows else None
    summary = {
        "max_subscribers_clean": best["subscribers"],
        "node_cores_at_max": best["server_cores"],
        "forwarded_pps_at_max": best["forwarded_pps"],
        "pps_per_core_at_max": best["pps_per_core"],
        "node_cores_per_subscriber_at_max": best["server_cores_per_subscriber"],
        "marginal_cores_per_subscriber": marginal,
        "late_first_frame_ms": {
            "n": len(late),
            "p50": percentile(late, 50),
            "p95": percentile(late, 95),
            "max": max(late) if late else math.nan,
            "missing": missing,
        },
        "relay_vs_spaces_ratio": headline_ratio["ratio"] if headline_ratio else math.nan,
        "ratio_at_subscribers": headline_ratio["subscribers"] if headline_ratio else 0,
        "decoded_sample": extra.get("decoded_sample"),
    }
    targets = [
        {
            "target": "cost per subscriber stream >=30x cheaper than MediaRelay",
            "value": summary["relay_vs_spaces_ratio"],
            "met": summary["relay_vs_spaces_ratio"] >= 30,
        },
        {
            "target": "forwarded packets/s per core >=50,000",
            "value": summary["pps_per_core_at_max"],
            "met": summary["pps_per_core_at_max"] >= 50_000,
        },
        {
            "target": "late-joiner first frame p95 <=300 ms",
            "value": summary["late_first_frame_ms"]["p95"],
            "met": bool(late) and missing == 0 and summary["late_first_frame_ms"]["p95"] <= 300,
        },
    ]
    return {
        "config": {
            "steps": list(plan.steps),
            "relay_steps": list(plan.relay_steps),
            "window_s": plan.window_s,
            "generator_processes": plan.workers,
            "video": "640x480@30 VP8, encoder pinned to 1 Mbps (REMB ignored)",
            "loss_limit": LOSS_LIMIT,
        },
        "spaces": spaces_rows,
        "relay": relay_rows,
        "ratios": ratio_rows,
        "join_ms": summarize_list(extra["join_ms"]),
        "summary": summary,
        "targets": targets,
    }


def summarize_list(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "max": max(values) if values else math.nan,
    }


def render(result: dict[str, Any]) -> str:
    rows = []
    for r in result["spaces"] + result["relay"]:
        late = [v for v in r.get("late_first_frame_ms", []) if v is not None]
        rows.append(
            [
                "Spaces node" if r["system"] == "spaces" else "MediaRelay",
                r["subscribers"],
                f"{r['server_cores']:.3f}",
                f"{r['server_cores_per_subscriber'] * 1000:.2f}",
                fmt(r["forwarded_pps"], 0),
                fmt(r["pps_per_core"], 0),
                f"{r['loss']:.3%}",
                fmt(percentile(late, 50), 0) if late else "-",
                f"{r['publisher_cores']:.2f}",
                f"{r['generator_cores']:.2f}",
                f"{r['machine_busy']:.0%}",
            ]
        )
    out = [
        table(
            [
                "system",
                "N",
                "server cores",
                "millicores/sub",
                "pkt/s out",
                "pkt/s per core",
                "loss",
                "late 1st frame p50 ms",
                "publisher cores",
                "generator cores",
                "machine busy",
            ],
            rows,
        )
    ]
    if result["ratios"]:
        out.append("")
        out.append(
            table(
                ["N", "MediaRelay cores/sub", "Spaces cores/sub", "ratio"],
                [
                    [
                        r["subscribers"],
                        f"{r['relay_cores_per_subscriber']:.4f}",
                        f"{r['spaces_cores_per_subscriber']:.4f}",
                        f"{r['ratio']:.1f}x",
                    ]
                    for r in result["ratios"]
                ],
            )
        )
    s = result["summary"]
    lf = s["late_first_frame_ms"]
    out.append("")
    out.append(
        f"late joiners: {lf['n']} measured, first frame p50 {fmt(lf['p50'], 0)} ms, "
        f"p95 {fmt(lf['p95'], 0)} ms, max {fmt(lf['max'], 0)} ms, {lf['missing']} without a frame"
    )
    sample = s.get("decoded_sample") or {}
    with contextlib.suppress(TypeError):
        out.append(
            f"decoded sample: first decoded frame {fmt(sample.get('first_decoded_ms'), 0)} ms "
            f"after joining, test pattern intact: {fmt(sample.get('pattern_ok'))}"
        )
    return "\n".join(out)
