"""Worker roles for the media benchmarks: one publisher, and a process full of subscribers.

Both work in three modes: ``spaces`` (through a Spaces media node, with the SDK), ``relay``
(through the MediaRelay baseline server) and ``direct`` (publisher straight to subscriber, the
no-SFU baseline of the latency benchmark; the orchestrator carries the SDP between them)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription

from bench.ipc import Channel
from bench.peers import (
    VIDEO_BITRATE,
    PacketStats,
    SendRecorder,
    http_exchange,
    live_video,
    now_ns,
    raw_publisher_answer,
    raw_publisher_offer,
    raw_subscriber,
    wait_connected,
)
from spaces.sdk.client import RemoteTrack, Space
from spaces.sdk.media import read_pattern, same_color

logger = logging.getLogger(__name__)

JOIN_CONCURRENCY = 8
FIRST_PACKET_TIMEOUT_S = 20.0


# --- publisher ------------------------------------------------------------------------------


async def run_publisher(config: dict[str, Any], channel: Channel) -> None:
    mode = config["mode"]
    recorder = SendRecorder()
    space: Space | None = None
    pcs: list[RTCPeerConnection] = []
    track = live_video()
    if mode == "spaces":
        space = Space(config["token"], config["address"], publish_bitrate=VIDEO_BITRATE)
        me = await space.join()
        await me.publish(track, "camera", width=640, height=480)
        assert space._publisher_pc is not None
        recorder.install(space._publisher_pc)
        await wait_connected(space._publisher_pc)
        channel.send({"ready": True, "participant_id": space.participant_id})
    elif mode == "relay":
        pc = await raw_publisher_offer(track)
        pcs.append(pc)
        answer = await http_exchange(config["url"] + "/publish")(pc.localDescription.sdp)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await wait_connected(pc)
        channel.send({"ready": True})
    else:
        channel.send({"ready": True})

    async def answer(request: dict[str, Any]) -> dict[str, Any]:
        """direct mode: answer one subscriber's offer."""
        pc = await raw_publisher_answer(request["sdp"], track)
        recorder.install(pc)
        pcs.append(pc)
        return {"sdp": pc.localDescription.sdp}

    async def record(request: dict[str, Any]) -> dict[str, Any]:
        recorder.enabled = bool(request["on"])
        if recorder.enabled:
            recorder.times.clear()
            return {}
        return {"times": list(recorder.times.items())}

    async def stats(_: dict[str, Any]) -> dict[str, Any]:
        return {"frames_sent": track.frames_sent}

    async def stop(_: dict[str, Any]) -> dict[str, Any]:
        if space is not None:
            await space.leave()
        await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)
        return {}

    await channel.serve({"answer": answer, "record": record, "stats": stats, "stop": stop})


# --- subscribers ----------------------------------------------------------------------------


@dataclass
class Subscriber:
    stats: PacketStats
    space: Space | None = None
    pc: RTCPeerConnection | None = None
    joined_ms: float = 0.0
    frames: list[float] = field(default_factory=list)

    async def close(self) -> None:
        if self.space is not None:
            await self.space.leave()
        if self.pc is not None:
            await self.pc.close()


def _camera(space: Space, publisher_id: str) -> RemoteTrack:
    track = space.remote_track(publisher_id, "camera")
    if track is None:
        raise RuntimeError("the publisher's camera track is not announced")
    return track


async def _wait_first_packet(stats: PacketStats, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not stats.first_packet_ns:
        if time.monotonic() > deadline:
            raise RuntimeError("no media within %.0fs" % timeout)
        await asyncio.sleep(0.01)


async def run_subscribers(config: dict[str, Any], channel: Channel) -> None:
    mode = config["mode"]
    record_times = bool(config.get("record_times"))
    subscribers: list[Subscriber] = []
    gate = asyncio.Semaphore(JOIN_CONCURRENCY)
    direct_answer: asyncio.Future[str] | None = None
    direct_task: asyncio.Task[RTCPeerConnection] | None = None
    channel.send({"ready": True})

    async def join_one(token: str, publisher_id: str) -> Subscriber:
        stats = PacketStats(now_ns(), record_times)
        sub = Subscriber(stats)
        if mode == "spaces":
            sub.space = Space(token, config["address"], decode=False)
            await sub.space.join()
            # Attached before the subscriber offer is handled: no packet is missed.
            _camera(sub.space, publisher_id).packet_listeners.append(stats.on_packet)
        else:
            sub.pc = await raw_subscriber(http_exchange(config["url"] + "/subscribe"), stats)
        sub.joined_ms = (now_ns() - stats.started_ns) / 1e6
        return sub

    async def add(request: dict[str, Any]) -> dict[str, Any]:
        tokens: list[str] = request.get("tokens") or [""] * int(request["count"])

        async def one(token: str) -> Subscriber:
            async with gate:
                sub = await join_one(token, request.get("publisher_id", ""))
            await _wait_first_packet(sub.stats, FIRST_PACKET_TIMEOUT_S)
            return sub

        added = await asyncio.gather(*(one(t) for t in tokens))
        subscribers.extend(added)
        return {"subscribers": len(subscribers), "join_ms": [s.joined_ms for s in added]}

    async def mark(_: dict[str, Any]) -> dict[str, Any]:
        for sub in subscribers:
            sub.stats.start_window()
        return {"t_ns": now_ns()}

    async def report(_: dict[str, Any]) -> dict[str, Any]:
        t = now_ns()
        windows = [sub.stats.end_window() for sub in subscribers]
        return {
            "t_ns": t,
            "expected": [w[0] for w in windows],
            "received": [w[1] for w in windows],
        }

    async def late(request: dict[str, Any]) -> dict[str, Any]:
        """Late joiners, one after another: join, wait for the first complete keyframe, leave.
        Returns each one's time from starting to join to that keyframe's last packet."""
        results: list[float | None] = []
        for token in request.get("tokens") or [""] * int(request["count"]):
            sub = await join_one(token, request.get("publisher_id", ""))
            deadline = time.monotonic() + float(request.get("timeout", 10))
            while not sub.stats.first_key_done_ns and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            results.append(sub.stats.first_frame_ms())
            await sub.close()
            await asyncio.sleep(float(request.get("gap", 0.3)))
        return {"first_frame_ms": results}

    async def decoded(request: dict[str, Any]) -> dict[str, Any]:
        """One late joiner that decodes: time to its first decoded frame, and whether the
        frame shows the publisher's test pattern."""
        started = now_ns()
        if mode != "spaces":
            return {"first_decoded_ms": None, "pattern_ok": None}
        space = Space(request["token"], config["address"], decode=True)
        try:
            await space.join()
            track = _camera(space, request["publisher_id"])
            deadline = time.monotonic() + float(request.get("timeout", 10))
            while not track.frames_received and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            if not track.frames_received:
                return {"first_decoded_ms": None, "pattern_ok": False}
            first_ms = (now_ns() - started) / 1e6
            color, _ = read_pattern(track.last_frame)
            return {
                "first_decoded_ms": first_ms,
                "pattern_ok": same_color(color, tuple(request["color"])),
            }
        finally:
            await space.leave()

    async def direct_offer(_: dict[str, Any]) -> dict[str, Any]:
        nonlocal direct_answer, direct_task
        offered: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        direct_answer = asyncio.get_running_loop().create_future()
        answer = direct_answer
        stats = PacketStats(now_ns(), record_times)

        async def exchange(sdp: str) -> str:
            offered.set_result(sdp)
            return await answer

        direct_task = asyncio.create_task(raw_subscriber(exchange, stats))
        subscribers.append(Subscriber(stats))
        return {"sdp": await offered}

    async def direct_finish(request: dict[str, Any]) -> dict[str, Any]:
        assert direct_answer is not None and direct_task is not None
        direct_answer.set_result(request["sdp"])
        pc = await direct_task
        subscribers[-1].pc = pc
        await _wait_first_packet(subscribers[-1].stats, FIRST_PACKET_TIMEOUT_S)
        return {}

    async def times(_: dict[str, Any]) -> dict[str, Any]:
        merged: dict[int, int] = {}
        for sub in subscribers:
            merged.update(sub.stats.recv_times)
            sub.stats.recv_times.clear()
        return {"times": list(merged.items())}

    async def leave_all(_: dict[str, Any]) -> dict[str, Any]:
        await asyncio.gather(*(s.close() for s in subscribers), return_exceptions=True)
        subscribers.clear()
        return {}

    async def stop(request: dict[str, Any]) -> dict[str, Any]:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(leave_all(request), 15)
        return {}

    await channel.serve(
        {
            "add": add,
            "mark": mark,
            "report": report,
            "late": late,
            "decoded": decoded,
            "direct_offer": direct_offer,
            "direct_finish": direct_finish,
            "times": times,
            "leave_all": leave_all,
            "stop": stop,
        }
    )
