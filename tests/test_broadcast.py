"""Broadcasts end to end: real publishers, the media node, a broadcaster worker and its composer
process, pushing to a real RTMP server (nginx + libnginx-mod-rtmp) whose recordings are checked
with ffprobe and by decoding them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from spaces.config import BroadcastConfig
from spaces.sdk import client as sdk
from spaces.sdk.media import TestPatternTrack, ToneTrack
from spaces.server import SpacesServer
from spaces.v1 import broadcast_pb2, broadcast_pb2_grpc
from tests.support.rtmp import RtmpServer, decode_audio, decode_video, probe
from tests.support.system import ADMIN_KEY, Admin, Tenant, eventually, make_config, start_server

MD = (("authorization", f"Bearer {ADMIN_KEY}"),)
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230)}
FAST_BROADCASTS = BroadcastConfig(
    lease_ms=2_000,
    renew_interval_ms=500,
    poll_interval_ms=200,
    video_options=(("preset", "ultrafast"),),
    rtmp_timeout_ms=3_000,
    watchdog_ms=8_000,
    retry_initial_ms=500,
    retry_max_ms=2_000,
)


@pytest.fixture
def rtmp() -> Iterator[RtmpServer]:
    server = RtmpServer().start()
    yield server
    server.close()


@pytest.fixture
async def bworld() -> AsyncIterator[tuple[SpacesServer, Admin, Tenant, str, Any]]:
    """One process with every service and an embedded broadcaster worker."""
    config = make_config(
        services=("control", "auth", "presence", "media", "broadcaster"),
        broadcast=FAST_BROADCASTS,
    )
    server = await start_server(config)
    admin = Admin(server.address)
    tenant = Tenant(await admin.create_key())
    space_id = await admin.create_space()
    stub = broadcast_pb2_grpc.BroadcastServiceStub(admin.channel)
    yield server, admin, tenant, space_id, stub
    await admin.close()
    await server.stop()


async def publisher(
    server: SpacesServer, tenant: Tenant, space_id: str, name: str, color: tuple[int, int, int],
    *, audio: float = 0.0, role: str = "publisher",
) -> sdk.Space:
    space = sdk.Space(tenant.token(space_id, name, role=role), server.address, display_name=name)
    await space.join()
    if role == "publisher":
        await space.local.publish(TestPatternTrack(color, 640, 480), "camera")
        await space.local.publish(ToneTrack(440, amplitude=audio), "microphone")
    return space


async def create(stub: Any, space_id: str, url: str, **kw: Any) -> broadcast_pb2.Broadcast:
    return await stub.CreateBroadcast(
        broadcast_pb2.CreateBroadcastRequest(space_id=space_id, rtmp_url=url, **kw), metadata=MD
    )


async def start(stub: Any, space_id: str, broadcast_id: str) -> broadcast_pb2.Broadcast:
    return await stub.StartBroadcast(
        broadcast_pb2.StartBroadcastRequest(space_id=space_id, broadcast_id=broadcast_id),
        metadata=MD,
    )


def frames_of(rtmp: RtmpServer, key: str, at_least: int) -> list[tuple[float, Any]]:
    for path in reversed(rtmp.recordings(key)):
        frames = decode_video(path)
        if len(frames) >= at_least:
            return frames
    return []


def mean(image: Any, x: int, y: int, w: int, h: int) -> tuple[int, int, int]:
    """Mean colour of the middle half of a rectangle (tile edges are blurred by scaling)."""
    patch = image[y + h // 4 : y + 3 * h // 4, x + w // 4 : x + 3 * w // 4]
    return tuple(int(c) for c in patch.reshape(-1, 3).mean(axis=0))  # type: ignore[return-value]


def close_to(a: tuple[int, int, int], b: tuple[int, int, int], tolerance: int = 40) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


# --- gallery --------------------------------------------------------------------------------


async def test_gallery_of_three_publishers_at_720p_arrives_as_h264_and_aac(
    bworld: tuple, rtmp: RtmpServer
) -> None:
    server, _, tenant, space_id, stub = bworld
    people = [
        await publisher(server, tenant, space_id, name, rgb, audio=0.2)
        for name, rgb in COLORS.items()
    ]
    try:
        b = await create(
            stub, space_id, rtmp.url(), stream_key="gallery",
            layout=broadcast_pb2.BROADCAST_LAYOUT_GALLERY,
            resolution=broadcast_pb2.BROADCAST_RESOLUTION_1280X720,
        )
        await start(stub, space_id, b.id)
        frames = await eventually(
            lambda: asyncio.to_thread(frames_of, rtmp, "gallery", 150), timeout=60, interval=1
        )
    finally:
        for p in people:
            await p.leave()
    path = rtmp.recordings("gallery")[-1]
    streams = {s["codec_type"]: s for s in probe(path)["streams"]}
    assert streams["video"]["codec_name"] == "h264"
    assert (streams["video"]["width"], streams["video"]["height"]) == (1280, 720)
    num, _, den = streams["video"]["avg_frame_rate"].partition("/")
    assert 29 <= int(num) / int(den or 1) <= 31
    assert streams["audio"]["codec_name"] == "aac"
    # Mux's landscape gallery for 3: 60 px padding, 30 px gaps, 16:9 tiles; two columns win
    # (506x284 tiles), the second row's single tile centred.
    tiles = {"red": (118, 60, 506, 284), "green": (654, 60, 506, 284), "blue": (386, 374, 506, 284)}
    _, last = frames[-1]
    for name, rect in tiles.items():
        assert close_to(mean(last, *rect), COLORS[name]), (name, mean(last, *rect))
    assert close_to(mean(last, 0, 0, 50, 50), (0x32, 0x32, 0x32), 12)  # the background
    # Timestamps: monotonic, 30 per second.
    pts = [t for t, _ in frames]
    assert all(b > a for a, b in zip(pts, pts[1:], strict=False))
    assert (len(pts) - 1) / (pts[-1] - pts[0]) == pytest.approx(30, abs=1.5)
    audio = decode_audio(path)
    level = np.sqrt(np.mean(np.concatenate([s for _, s in audio[-100:]]) ** 2))
    assert level > 0.05, level  # three tones, mixed
