"""CPU of one broadcast: its composer process (decode + compose + mix + H.264/AAC encode + RTMP
push) at 720p30 and 1080p30 with 3 and 10 participants, against an encode-only baseline measured
in the same run (the same encoder, preset and resolution fed synthetic frames at 30 fps: what any
broadcast must spend), reported as a ratio.

Each participant publishes a 640x480 VP8 test pattern at 30 fps and a tone, through a real media
node; the broadcast goes to a real nginx-rtmp. Only the composer process's CPU is counted
(/proc/<pid>/stat), so the publishers running on the same machine do not inflate it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

from bench.common import fmt, process_cpu_seconds, say, table

NAME = "broadcast"
SUMMARY = "CPU per broadcast (composer process) at 720p30/1080p30 with 3 and 10 participants"
PRESET = "veryfast"

ENCODE_ONLY = r"""
import fractions, sys, time
import av, numpy as np
w, h, seconds, preset = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
ctx = av.CodecContext.create("libx264", "w")
ctx.width, ctx.height, ctx.pix_fmt = w, h, "yuv420p"
ctx.time_base = fractions.Fraction(1, 30)
ctx.framerate = 30
ctx.bit_rate = (4500 if w * h >= 1920 * 1080 * 0.9 else 2500) * 1000
ctx.gop_size = 60
ctx.options = {"preset": preset}
base = np.full((h * 3 // 2, w), 50, np.uint8)
base[: h // 2, : w // 2] = 200
start = time.monotonic()
n = 0
while time.monotonic() - start < seconds:
    due = start + n / 30
    if due > time.monotonic():
        time.sleep(due - time.monotonic())
    img = np.roll(base, n * 4, axis=1)
    frame = av.VideoFrame.from_ndarray(img, format="yuv420p")
    frame.pts = n
    ctx.encode(frame)
    n += 1
"""


def encode_only_cores(width: int, height: int, seconds: float) -> float:
    """The baseline: a process that only encodes synthetic frames in real time."""
    proc = subprocess.Popen(
        [sys.executable, "-c", ENCODE_ONLY, str(width), str(height), str(seconds), PRESET]
    )
    time.sleep(1.0)
    cpu0, t0 = process_cpu_seconds(proc.pid), time.monotonic()
    time.sleep(max(0.5, seconds - 1.5))
    cpu1, t1 = process_cpu_seconds(proc.pid), time.monotonic()
    proc.wait(30)
    return (cpu1 - cpu0) / (t1 - t0)


async def measure(
    width: int, height: int, participants: int, seconds: float, warmup: float
) -> dict[str, Any]:
    from spaces.config import BroadcastConfig
    from spaces.sdk import client as sdk
    from spaces.sdk.media import TestPatternTrack, ToneTrack, color_for
    from spaces.server import SpacesServer
    from spaces.v1 import broadcast_pb2, broadcast_pb2_grpc
    from tests.support.rtmp import RtmpServer
    from tests.support.system import ADMIN_KEY, Admin, Tenant, make_config

    resolution = {
        (1280, 720): broadcast_pb2.BROADCAST_RESOLUTION_1280X720,
        (1920, 1080): broadcast_pb2.BROADCAST_RESOLUTION_1920X1080,
    }[(width, height)]
    rtmp = RtmpServer().start()
    config = make_config(
        services=("control", "auth", "presence", "media", "broadcaster"),
        broadcast=BroadcastConfig(video_options=(("preset", PRESET),)),
        fast=False,
    )
    config = replace(config, limits=replace(config.limits, max_subscriptions=20))
    server = SpacesServer(config)
    await server.start()
    admin = Admin(server.address)
    people: list[Any] = []
    md = (("authorization", f"Bearer {ADMIN_KEY}"),)
    try:
        tenant = Tenant(await admin.create_key())
        space_id = await admin.create_space()
        for i in range(participants):
            name = f"p{i}"
            space = sdk.Space(tenant.token(space_id, name), server.address, max_subscriptions=1)
            await space.join()
            # Publishers receive nothing (manual, empty): only the broadcast decodes.
            await space.local.subscribe([])
            await space.local.publish(TestPatternTrack(color_for(name), 640, 480), "camera")
            await space.local.publish(ToneTrack(300 + 40 * i, 0.1), "microphone")
            people.append(space)
        stub = broadcast_pb2_grpc.BroadcastServiceStub(admin.channel)
        b = await stub.CreateBroadcast(
            broadcast_pb2.CreateBroadcastRequest(
                space_id=space_id, rtmp_url=rtmp.url("bench"), resolution=resolution
            ),
            metadata=md,
        )
        await stub.StartBroadcast(
            broadcast_pb2.StartBroadcastRequest(space_id=space_id, broadcast_id=b.id), metadata=md
        )
        deadline = time.monotonic() + 60
        run = None
        while time.monotonic() < deadline:
            run = next(iter(server.broadcaster.runs.values()), None)
            if run is not None and run.status.get("streaming") and run.process is not None:
                break
            await asyncio.sleep(0.2)
        if run is None or run.process is None or not run.status.get("streaming"):
            raise RuntimeError("the broadcast did not start streaming")
        await asyncio.sleep(warmup)
        pid = run.process.pid
        first = dict(run.status)
        cpu0, t0 = process_cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(seconds)
        cpu1, t1 = process_cpu_seconds(pid), time.monotonic()
        last = dict(run.status)
        composed = last["frames_composed"] - first["frames_composed"]
        dropped = last["frames_dropped"] - first["frames_dropped"]
        return {
            "resolution": f"{width}x{height}",
            "participants": participants,
            "cores": round((cpu1 - cpu0) / (t1 - t0), 3),
            "fps": round(composed / (t1 - t0), 1),
            "dropped": dropped,
            "tiles": last.get("participants", 0),
            "seconds": round(t1 - t0, 1),
        }
    finally:
        for space in people:
            await space.leave()
        await admin.close()
        await server.stop()
        rtmp.close()


async def run(quick: bool) -> dict[str, Any]:
    cases = (
        [(1280, 720, 3)]
        if quick
        else [(1280, 720, 3), (1280, 720, 10), (1920, 1080, 3), (1920, 1080, 10)]
    )
    seconds, warmup = (4.0, 2.0) if quick else (20.0, 5.0)
    rows = []
    baselines: dict[str, float] = {}
    for width, height, n in cases:
        key = f"{width}x{height}"
        if key not in baselines:
            say(f"broadcast: encode-only baseline at {key}")
            baselines[key] = round(
                await asyncio.to_thread(encode_only_cores, width, height, seconds), 3
            )
        say(f"broadcast: {key} with {n} participants")
        row = await measure(width, height, n, seconds, warmup)
        row["encode_only_cores"] = baselines[key]
        row["vs_encode_only"] = round(row["cores"] / baselines[key], 2) if baselines[key] else None
        rows.append(row)
    first = rows[0]
    summary = {"cores_720p_3": first["cores"], "encode_only_720p": baselines["1280x720"]}
    for row in rows:
        summary[f"cores_{row['resolution']}_{row['participants']}"] = row["cores"]
    return {
        "config": {
            "preset": PRESET,
            "publishers": "640x480 VP8 test pattern at 30 fps + opus tone each",
            "window_s": seconds,
            "baseline": "libx264 alone encoding synthetic frames at the same size, 30 fps",
        },
        "rows": rows,
        "summary": summary,
        "targets": [
            {
                "target": "CPU per broadcast at 720p30 with 3 participants <=0.5 core",
                "value": first["cores"],
                "met": first["cores"] <= 0.5,
            }
        ],
    }


def render(result: dict[str, Any]) -> str:
    return table(
        [
            "resolution",
            "participants",
            "composer cores",
            "encode-only cores",
            "ratio",
            "fps",
            "dropped",
        ],
        [
            [
                r["resolution"],
                r["participants"],
                fmt(r["cores"], 3),
                fmt(r["encode_only_cores"], 3),
                fmt(r["vs_encode_only"], 2),
                fmt(r["fps"]),
                r["dropped"],
            ]
            for r in result["rows"]
        ],
    )
