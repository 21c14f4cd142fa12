"""Forwarding latency: how much delay the media node adds to each packet, on loopback.

The publisher process stamps each RTP packet just before SRTP protection and ``sendto`` (its
DTLS transport's ``_send_rtp``); the subscriber process stamps it when aiortc hands it over
(after ``recvfrom``, ICE, SRTP unprotect and RTP parsing, at the receiver tap). Both stamps are
CLOCK_MONOTONIC, one clock for all processes on the machine, and packets are matched by a
hash of their payload, which the node forwards unchanged.

That one-way time includes the end points' own aiortc work, so the same pair of processes is
also measured connected directly, without the SFU. The added delay is the difference: SFU path
minus direct path, at p50 and at p99. A second SFU run measures one subscriber while the node
also forwards to N others, since each packet is sent to subscribers one after another."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from bench.cluster import Admin, Cluster
from bench.common import fmt, percentile, say, table
from bench.ipc import Worker, stop_all

NAME = "latency"
SUMMARY = "added forwarding delay of the media node (SFU path minus direct path)"

FULL = {"window_s": 20.0, "loaded": (20,)}
QUICK = {"window_s": 2.0, "loaded": ()}


def deltas(sent: list[list[int]], received: list[list[int]]) -> tuple[list[float], int]:
    """Per-packet one-way times in ms, and how many sent packets were never matched."""
    got = dict((k, t) for k, t in received)
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


async def record(publisher: Worker, subscriber: Worker, window_s: float) -> dict[str, Any]:
    await subscriber.call("times")  # forget packets from before the window
    await publisher.call("record", on=True)
    await asyncio.sleep(window_s)
    sent = (await publisher.call("record", on=False))["times"]
    await asyncio.sleep(0.5)  # the last packets in flight
    received = (await subscriber.call("times"))["times"]
    values, unmatched = deltas(sent, received)
    return {**stats(values), "sent": len(sent), "unmatched": unmatched}


async def run_direct(window_s: float) -> dict[str, Any]:
    cluster = Cluster()
    workers: list[Worker] = []
    try:
        publisher = await Worker.start("publisher", "publisher", {"mode": "direct"}, cluster.workdir)
        workers.append(publisher)
        subscriber = await Worker.start(
            "subscriber", "subscribers", {"mode": "direct", "record_times": True}, cluster.workdir
        )
        workers.append(subscriber)
        offer = await subscriber.call("direct_offer")
        answer = await publisher.call("answer", sdp=offer["sdp"])
        await subscriber.call("direct_finish", sdp=answer["sdp"])
        await asyncio.sleep(1.0)
        say("latency: direct publisher -> subscriber")
        return await record(publisher, subscriber, window_s)
    finally:
        await stop_all(workers)
        cluster.close()


async def run_sfu(window_s: float, loads: tuple[int, ...]) -> list[dict[str, Any]]:
    cluster = Cluster()
    workers: list[Worker] = []
    results = []
    try:
        cluster.start_redis()
        api = cluster.start_spaces("api", "serve", "--services", "control,auth,presence")
        node = cluster.start_spaces("node", "media-node")
        await asyncio.gather(cluster.wait_serving(api), cluster.wait_serving(node))
        admin = Admin(api.address, cluster.admin_key)
        key = await admin.signing_key()
        space_id = await admin.space(max_participants=1000)
        await admin.close()
        await asyncio.sleep(0.5)
        publisher = await Worker.start(
            "publisher",
            "publisher",
            {"mode": "spaces", "token": key.token(space_id), "address": api.address},
            cluster.workdir,
        )
        workers.append(publisher)
        config = {"mode": "spaces", "address": api.address}
        measured = await Worker.start(
            "subscriber", "subscribers", {**config, "record_times": True}, cluster.workdir
        )
        workers.append(measured)
        pid = publisher.ready["participant_id"]
        await measured.call(
            "add", count=1, tokens=[key.token(space_id, "subscriber")], publisher_id=pid
        )
        await asyncio.sleep(1.0)
        say("latency: publisher -> media node -> subscriber")
        results.append({"others": 0, **(await record(publisher, measured, window_s))})
        if loads:
            others = await Worker.start("others", "subscribers", config, cluster.workdir)
            workers.append(others)
            count = 0
            for n in loads:
                tokens = [key.token(space_id, "subscriber") for _ in range(n - count)]
                await others.call("add", timeout=180, tokens=tokens, publisher_id=pid)
                count = n
                await asyncio.sleep(2.0)
                say(f"latency: publisher -> media node -> subscriber, with {n} other subscribers")
                results.append({"others": n, **(await record(publisher, measured, window_s))})
    finally:
        await stop_all(workers)
        cluster.close()
    return results


async def run(quick: bool) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    window_s = float(plan["window_s"])  # type: ignore[arg-type]
    loads: tuple[int, ...] = plan["loaded"]  # type: ignore[assignment]
    direct = await run_direct(window_s)
    sfu = await run_sfu(window_s, loads)
    for row in sfu:
        row["added_p50_ms"] = row["p50"] - direct["p50"]
        row["added_p99_ms"] = row["p99"] - direct["p99"]
    base = sfu[0]
    targets = [
        {
            "target": "added forwarding latency p50 <=1 ms",
            "value": base["added_p50_ms"],
            "met": base["added_p50_ms"] <= 1.0,
        },
        {
            "target": "added forwarding latency p99 <=5 ms",
            "value": base["added_p99_ms"],
            "met": base["added_p99_ms"] <= 5.0,
        },
    ]
    return {
        "config": {
            "window_s": window_s,
            "loaded_with": list(loads),
            "stamps": "publisher: before SRTP protect + sendto; subscriber: at the receiver tap",
            "clock": "CLOCK_MONOTONIC (time.monotonic_ns), shared by all processes",
        },
        "direct": direct,
        "sfu": sfu,
        "summary": {"added_p50_ms": base["added_p50_ms"], "added_p99_ms": base["added_p99_ms"]},
        "targets": targets,
    }


def render(result: dict[str, Any]) -> str:
    d = result["direct"]
    rows = [
        ["direct (no SFU)", "-", d["n"], fmt(d["p50"], 3), fmt(d["p90"], 3), fmt(d["p99"], 3),
         fmt(d["max"], 2), "-", "-", d["unmatched"]],
    ]
    for r in result["sfu"]:
        rows.append(
            [
                "via media node",
                r["others"],
                r["n"],
                fmt(r["p50"], 3),
                fmt(r["p90"], 3),
                fmt(r["p99"], 3),
                fmt(r["max"], 2),
                fmt(r["added_p50_ms"], 3),
                fmt(r["added_p99_ms"], 3),
                r["unmatched"],
            ]
        )
    return table(
        [
            "path",
            "other subscribers",
            "packets",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "added p50 ms",
            "added p99 ms",
            "unmatched",
        ],
        rows,
    )
