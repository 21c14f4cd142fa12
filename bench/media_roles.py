"""Worker roles for the media benchmarks: one publisher, and a process full of subscribers.

Both work in three modes: ``spaces`` (through a Spaces media node, with the SDK), ``relay``
(through the MediaRelay baseline server) and ``direct`` (publisher straight to subscriber, the
no-SFU baseline of the latency benchmark; the orchestrator carries the SDP between them)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription

from bench.ipc import Channel
from bench.peers import (
    PUBLISHER_COLOR,
    VIDEO_BITRATE,
    PacketLoopTrack,
    PacketStats,
    RtcpCounter,
    SendRecorder,
    encode_vp8_loop,
    http_exchange,
    live_video,
    now_ns,
    raw_publisher_answer,
    raw_publisher_offer,
    raw_subscriber,
    wait_connected,
    wire_keyframe_requests,
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
    direct = SendRecorder()
    feedback = RtcpCounter()
    space: Space | None = None
    pcs: list[RTCPeerConnection] = []
    loop: PacketLoopTrack | None = None
    if config.get("preencoded_s"):
        # The cheap publisher: the same 1 Mbps pattern encoded once, then only packetized (a
        # live encoder starved by a busy machine sends fewer packets than it should).
        frames = await encode_vp8_loop(float(config["preencoded_s"]), color=PUBLISHER_COLOR)
        loop = PacketLoopTrack("video", frames, 1 / 30, 90_000)
    track: Any = loop if loop is not None else live_video()
    if mode == "spaces":
        space = Space(config["token"], config["address"], publish_bitrate=VIDEO_BITRATE)
        me = await space.join()
        published = await me.publish(track, "camera", width=640, height=480)
        if loop is not None:
            wire_keyframe_requests(published._transceiver.sender, loop)
        assert space._publisher_pc is not None
        recorder.install(space._publisher_pc)
        for transceiver in space._publisher_pc.getTransceivers():
            feedback.incoming(transceiver.sender)
        await wait_connected(space._publisher_pc)
        channel.send({"ready": True, "participant_id": space.participant_id})
    elif mode == "relay":
        pc = await raw_publisher_offer(track)
        pcs.append(pc)
        if loop is not None:
            wire_keyframe_requests(pc.getTransceivers()[0].sender, loop)
        recorder.install(pc)
        for transceiver in pc.getTransceivers():
            feedback.incoming(transceiver.sender)
        answer = await http_exchange(config["url"] + "/publish")(pc.localDescription.sdp)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await wait_connected(pc)
        channel.send({"ready": True})
    else:
        channel.send({"ready": True})

    async def answer_offer(request: dict[str, Any]) -> dict[str, Any]:
        """The direct path: answer one subscriber's offer, sending it a stream of its own (a
        second encoder of the same pattern, at the same bitrate)."""
        pc = await raw_publisher_answer(request["sdp"], live_video())
        direct.install(pc)
        pcs.append(pc)
        return {"sdp": pc.localDescription.sdp}

    async def record(request: dict[str, Any]) -> dict[str, Any]:
        """Start or stop stamping sent packets; on stop, the stamps by path."""
        on = bool(request["on"])
        for r in (recorder, direct):
            r.enabled = on
            if on:
                r.times.clear()
        if on:
            return {}
        return {
            "times": {"spaces": list(recorder.times.items()), "direct": list(direct.times.items())}
        }

    async def stats(_: dict[str, Any]) -> dict[str, Any]:
        return {
            "frames_sent": loop.count if loop is not None else track.frames_sent,
            "frames_sent_rtp": recorder.frames,
            "packets_sent": recorder.packets,
            "retransmissions": recorder.retransmissions,
            "feedback_received": feedback.take(),
        }

    async def stop(_: dict[str, Any]) -> dict[str, Any]:
        if space is not None:
            await space.leave()
        await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)
        return {}

    await channel.serve({"answer": answer_offer, "record": record, "stats": stats, "stop": stop})


# --- subscribers ----------------------------------------------------------------------------


@dataclass
class Subscriber:
    stats: PacketStats
    path: str = "spaces"
    """How the media reaches it: "spaces", "relay" or "direct"."""
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


async def until(done: Callable[[], object], limit_s: float, interval: float = 0.005) -> bool:
    """Poll ``done`` until it is true or ``limit_s`` passes; whether it became true."""
    deadline = time.monotonic() + limit_s
    while True:
        if done():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)


async def _wait_first_packet(stats: PacketStats, limit_s: float) -> None:
    if not await until(lambda: stats.first_packet_ns, limit_s):
        raise RuntimeError(f"no media within {limit_s:.0f}s")


async def run_subscribers(config: dict[str, Any], channel: Channel) -> None:
    mode = config["mode"]
    record_times = bool(config.get("record_times"))
    subscribers: list[Subscriber] = []
    feedback = RtcpCounter()
    gate = asyncio.Semaphore(JOIN_CONCURRENCY)
    direct_answer: asyncio.Future[str] | None = None
    direct_task: asyncio.Task[RTCPeerConnection] | None = None
    pending_direct: list[Subscriber] = []
    channel.send({"ready": True})

    async def join_one(token: str, publisher_id: str) -> Subscriber:
        stats = PacketStats(now_ns(), record_times)
        sub = Subscriber(stats, mode)
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
            pc = sub.pc or (sub.space._subscriber_pc if sub.space else None)
            for transceiver in pc.getTransceivers() if pc else ():
                feedback.outgoing(transceiver.receiver)
            sub.stats.start_window()
        feedback.take()
        return {"t_ns": now_ns()}

    async def report(_: dict[str, Any]) -> dict[str, Any]:
        return {
            "t_ns": now_ns(),
            "windows": [asdict(sub.stats.end_window()) for sub in subscribers],
            "feedback_sent": feedback.take(),
        }

    async def late(request: dict[str, Any]) -> dict[str, Any]:
        """Late joiners, one after another: join, wait for the first complete keyframe, leave.
        For each, from the start of its join: the join returned (presence, then the media
        session), its media transport connected (ICE + DTLS), its first keyframe was complete."""
        results: list[float | None] = []
        joined: list[float] = []
        connected: list[float | None] = []
        for token in request.get("tokens") or [""] * int(request["count"]):
            sub = await join_one(token, request.get("publisher_id", ""))
            joined.append(sub.joined_ms)
            stamp: list[float] = []

            def progress(sub: Subscriber = sub, stamp: list[float] = stamp) -> bool:
                pc = sub.pc or (sub.space._subscriber_pc if sub.space else None)
                if not stamp and pc is not None and pc.connectionState == "connected":
                    stamp.append((now_ns() - sub.stats.started_ns) / 1e6)
                return sub.stats.has_first_frame()

            await until(progress, float(request.get("timeout", 10)), 0.002)
            results.append(sub.stats.first_frame_ms())
            connected.append(stamp[0] if stamp else None)
            await sub.close()
            await asyncio.sleep(float(request.get("gap", 0.3)))
        return {"first_frame_ms": results, "joined_ms": joined, "connected_ms": connected}

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
            if not await until(lambda: track.frames_received, float(request.get("timeout", 10))):
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
        direct_sub = Subscriber(stats, "direct")
        subscribers.append(direct_sub)
        pending_direct.append(direct_sub)
        return {"sdp": await offered}

    async def direct_finish(request: dict[str, Any]) -> dict[str, Any]:
        assert direct_answer is not None and direct_task is not None
        direct_answer.set_result(request["sdp"])
        sub = pending_direct.pop()
        sub.pc = await direct_task
        await _wait_first_packet(sub.stats, FIRST_PACKET_TIMEOUT_S)
        return {}

    async def times(_: dict[str, Any]) -> dict[str, Any]:
        """Receive stamps by path, forgetting them."""
        by_path: dict[str, list[tuple[int, int]]] = {}
        for sub in subscribers:
            by_path.setdefault(sub.path, []).extend(sub.stats.recv_times.items())
            sub.stats.recv_times.clear()
        return {"times": by_path}

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
