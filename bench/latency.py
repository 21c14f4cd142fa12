"""Forwarding latency: how much delay the media node adds to each packet, on loopback.

The publisher process stamps each RTP packet just before SRTP protection and ``sendto`` (its
DTLS transport's ``_send_rtp``); the subscriber process stamps it when aiortc hands it over
(after ``recvfrom``, ICE, SRTP unprotect and RTP parsing, at the receiver tap). Both stamps are
CLOCK_MONOTONIC, one clock for all processes on the machine, and packets are matched by a
hash of their payload, which the node forwards unchanged.

That one-way time includes the end points' own aiortc work. So the same two processes also
keep a direct peer connection, publisher to subscriber without the SFU (a second encoder of the
same pattern at the same bitrate), and both paths are measured in the same window. The added
delay is the difference, SFU path minus direct path, at p50 and at p99. A second window
measures again while the node also forwards to N other subscribers (each packet is sent to the
subscribers one after another)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from bench.cluster import Admin, Cluster
from bench.common import CpuWindow, fmt, percentile, say, table, wait_quiet
from bench.ipc import Worker, stop_all

NAME = "latency"
SUMMARY = "added forwarding delay of the media node (SFU path minus direct path)"


@dataclass(frozen=True)
class Plan:
    window_s: float
    loads: tuple[int, ...]
    quick: bool = False


FULL = Plan(window_s=20.0, loads=(20,))
QUICK = Plan(window_s=2.0, loads=(), quick=True)


def deltas(sent: list[list[int]], received: list[list[int]]) -> tuple[list[float], int]:
    """Per-packet one-way times in ms, and how many sent packets were never matched."""
    got = {k: t for k, t in received}
    out = []
    unmatched = 0
    for key, t_sent in sent:
        t_recv = got.get(key)
        if t_recv is None:
            unmatched += 1
            continue
        out.append((t_recv - t_sent) / 1e6)
    return out, unmatched


def stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
    }


async def record(
    publisher: Worker, subscriber: Worker, plan: Plan, pids: dict[str, int]
) -> dict[str, Any]:
    """Both paths, one window: {"direct": stats, "spaces": stats, ...}."""
    quiet = await wait_quiet(pids, plan.quick)
    await subscriber.call("times")  # forget packets from before the window
    await publisher.call("record", on=True)
    cpu = CpuWindow(pids).start()
    await asyncio.sleep(plan.window_s)
    cpu.stop()
    sent = (await publisher.call("record", on=False))["times"]
    await asyncio.sleep(0.5)  # the last packets in flight
    received = (await subscriber.call("times"))["times"]
    out: dict[str, Any] = {}
    for path in ("direct", "spaces"):
        values, unmatched = deltas(sent[path], received.get(path, []))
        out[path] = {**stats(values), "sent": len(sent[path]), "unmatched": unmatched}
    out["added_p50_ms"] = out["spaces"]["p50"] - out["direct"]["p50"]
    out["added_p90_ms"] = out["spaces"]["p90"] - out["direct"]["p90"]
    out["added_p99_ms"] = out["spaces"]["p99"] - out["direct"]["p99"]
    out["cpu"] = dict(cpu.result)
    out["foreign_cores"] = cpu.foreign_cores()
    out["foreign_cores_before"] = quiet
    return out


async def run_plane(plan: Plan, plane: str) -> list[dict[str, Any]]:
    """Both paths' windows, through a node with one data plane (``SPACES_MEDIA_DATAPLANE``)."""
    cluster = Cluster()
    workers: list[Worker] = []
    windows: list[dict[str, Any]] = []
    try:
        redis_pid = cluster.start_redis()
        api = cluster.start_spaces("api", "serve", "--services", "control,auth,presence")
        node = cluster.start_spaces("node", "media-node", SPACES_MEDIA_DATAPLANE=plane)
        await asyncio.gather(cluster.wait_serving(api), cluster.wait_serving(node))
        admin = Admin(api.address, cluster.admin_key)
        key = await admin.signing_key()
        space_id = await admin.space(max_participants=1000)
        await admin.close()
        await asyncio.sleep(0.5)
        logdir = cluster.workdir
        config = {"mode": "spaces", "address": api.address}
        publisher = await Worker.start(
            "publisher", "publisher", {**config, "token": key.token(space_id)}, logdir
        )
        workers.append(publisher)
        measured = await Worker.start(
            "subscriber", "subscribers", {**config, "record_times": True}, logdir
        )
        workers.append(measured)
        pid = publisher.ready["participant_id"]
        await measured.call(
            "add", count=1, tokens=[key.token(space_id, "subscriber")], publisher_id=pid
        )
        offer = await measured.call("direct_offer")
        answer = await publisher.call("answer", sdp=offer["sdp"])
        await measured.call("direct_finish", sdp=answer["sdp"])
        pids = {
            "node": node.pid,
            "api": api.pid,
            "redis": redis_pid,
            "publisher": publisher.pid,
            "subscriber": measured.pid,
        }
        await asyncio.sleep(1.0)
        say(f"latency ({plane} plane): publisher -> subscriber, direct and through the node")
        windows.append(
            {"others": 0, "plane": plane, **(await record(publisher, measured, plan, pids))}
        )
        if plan.loads:
            others = await Worker.start("others", "subscribers", config, logdir)
            workers.append(others)
            pids["others"] = others.pid
            count = 0
            for n in plan.loads:
                tokens = [key.token(space_id, "subscriber") for _ in range(n - count)]
                await others.call("add", limit_s=180, tokens=tokens, publisher_id=pid)
                count = n
                await asyncio.sleep(2.0)
                say(f"latency: the same, while the node also forwards to {n} other subscribers")
                windows.append(
                    {"others": n, "plane": plane, **(await record(publisher, measured, plan, pids))}
                )
    finally:
        await stop_all(workers)
        cluster.close()
    return windows


async def run(quick: bool) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    windows = await run_plane(plan, "native")
    python_windows = await run_plane(plan, "python")
    base = windows[0]
    python_base = python_windows[0]
    targets = [
        {
            "target": "added forwarding latency p50 <=0.3 ms (native plane)",
            "value": base["added_p50_ms"],
            "met": base["added_p50_ms"] <= 0.3,
        },
        {
            "target": "added forwarding latency p99 <=2 ms (native plane)",
            "value": base["added_p99_ms"],
            "met": base["added_p99_ms"] <= 2.0,
        },
    ]
    return {
        "config": {
            "window_s": plan.window_s,
            "loaded_with": list(plan.loads),
            "stamps": "publisher: before SRTP protect + sendto; subscriber: at the receiver tap",
            "clock": "CLOCK_MONOTONIC (time.monotonic_ns), shared by all processes",
            "baseline": "a direct publisher-to-subscriber connection in the same processes, "
            "measured in the same window",
        },
        "windows": windows,
        "python_plane": python_windows,
        "python_summary": {
            "added_p50_ms": python_base["added_p50_ms"],
            "added_p99_ms": python_base["added_p99_ms"],
        },
        "summary": {
            "added_p50_ms": base["added_p50_ms"],
            "added_p99_ms": base["added_p99_ms"],
            "direct_p50_ms": base["direct"]["p50"],
            "direct_p99_ms": base["direct"]["p99"],
            "spaces_p50_ms": base["spaces"]["p50"],
            "spaces_p99_ms": base["spaces"]["p99"],
        },
        "targets": targets,
    }


def render(result: dict[str, Any]) -> str:
    rows = []
    for w in result["windows"] + result.get("python_plane", []):
        for path, label in (("direct", "direct (no SFU)"), ("spaces", "via media node")):
            r = w[path]
            added = path == "spaces"
            rows.append(
                [
                    w.get("plane", "native"),
                    w["others"],
                    label,
                    r["n"],
                    fmt(r["p50"], 3),
                    fmt(r["p90"], 3),
                    fmt(r["p99"], 3),
                    fmt(r["max"], 2),
                    fmt(w["added_p50_ms"], 3) if added else "-",
                    fmt(w["added_p99_ms"], 3) if added else "-",
                    r["unmatched"],
                    fmt(w["cpu"].get("node", 0.0), 3) if added else "-",
                    fmt(
                        sum(w["cpu"].get(k, 0.0) for k in ("publisher", "subscriber", "others")),
                        2,
                    )
                    if added
                    else "-",
                ]
            )
    return table(
        [
            "plane",
            "other subscribers",
            "path",
            "packets",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "added p50 ms",
            "added p99 ms",
            "unmatched",
            "node cores",
            "generator cores",
        ],
        rows,
    )
