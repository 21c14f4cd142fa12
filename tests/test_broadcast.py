"""Broadcasts end to end: real publishers, the media node, a broadcaster worker and its composer
process, pushing to a real RTMP server (nginx + libnginx-mod-rtmp) whose recordings are checked
with ffprobe and by decoding them."""

from __future__ import annotations

import asyncio
import io
import itertools
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
from spaces.sdk.media import BeepTrack, Flashes, FlashTrack, TestPatternTrack, ToneTrack
from spaces.server import SpacesServer
from spaces.v1 import broadcast_pb2, broadcast_pb2_grpc
from tests.support.rtmp import (
    RtmpServer,
    decode_audio,
    decode_video,
    last_video_frame,
    probe,
)
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
    server: SpacesServer,
    tenant: Tenant,
    space_id: str,
    name: str,
    color: tuple[int, int, int],
    *,
    audio: float = 0.0,
    role: str = "publisher",
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
    """(pts, picture) of the frames of the newest recording with ``at_least`` of them; only
    the last frame's picture is kept (the others' are None: pictures are megabytes)."""
    for path in reversed(rtmp.recordings(key)):
        frames = decode_video(path, keep=lambda image: None)
        if len(frames) >= at_least:
            last = last_video_frame(path)
            return [*frames[:-1], (frames[-1][0], last)]
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
            stub,
            space_id,
            rtmp.url(),
            stream_key="gallery",
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
    # The recording those frames came from (the newest, unless it restarted since).
    path = max(rtmp.recordings("gallery"), key=lambda p: len(decode_video(p, keep=len)))
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
    assert all(b > a for a, b in itertools.pairwise(pts))
    assert (len(pts) - 1) / (pts[-1] - pts[0]) == pytest.approx(30, abs=1.5)
    # The sound of the same stretch as those frames (the publishers have left since).
    whole = decode_audio(path)
    audio = [s for t, s in whole if pts[0] <= t <= pts[-1]]
    level = np.sqrt(np.mean(np.concatenate(audio[-100:]) ** 2))
    assert level > 0.05, (level, len(whole))  # three tones, mixed


def latest_frame(rtmp: RtmpServer, key: str) -> Any:
    paths = rtmp.recordings(key)
    return last_video_frame(paths[-1]) if paths else None


async def wait_color(
    rtmp: RtmpServer,
    key: str,
    rect: tuple[int, int, int, int],
    color: tuple[int, int, int],
    timeout: float,
) -> float:
    started = time.monotonic()

    async def check() -> bool:
        frame = await asyncio.to_thread(latest_frame, rtmp, key)
        return frame is not None and close_to(mean(frame, *rect), color)

    try:
        await eventually(check, timeout=timeout, interval=0.25)
    except AssertionError:
        frame = await asyncio.to_thread(latest_frame, rtmp, key)
        if frame is not None:
            from PIL import Image

            Image.fromarray(frame).save(rtmp.dir.parent / f"{key}-last.png")
        raise AssertionError(
            f"{key}: {rect} never became {color}; it is "
            f"{mean(frame, *rect) if frame is not None else 'no frame'}"
        ) from None
    return time.monotonic() - started


# --- active speaker -------------------------------------------------------------------------


async def test_active_speaker_shows_who_speaks_and_switches_within_two_seconds(
    bworld: tuple, rtmp: RtmpServer
) -> None:
    server, admin, tenant, space_id, stub = bworld
    tones: dict[str, ToneTrack] = {}
    people = []
    for name in ("red", "green"):
        space = sdk.Space(tenant.token(space_id, name), server.address, display_name=name)
        await space.join()
        await space.local.publish(TestPatternTrack(COLORS[name], 640, 480), "camera")
        tones[name] = ToneTrack(440, amplitude=0.5 if name == "green" else 0.0)
        await space.local.publish(tones[name], "microphone")
        people.append(space)
    watcher = people[0]
    try:
        b = await create(
            stub,
            space_id,
            rtmp.url(),
            stream_key="speaker",
            layout=broadcast_pb2.BROADCAST_LAYOUT_ACTIVE_SPEAKER,
            resolution=broadcast_pb2.BROADCAST_RESOLUTION_1280X720,
        )
        await start(stub, space_id, b.id)
        full = (0, 0, 1280, 720)
        await wait_color(rtmp, "speaker", full, COLORS["green"], timeout=60)
        # The broadcaster is invisible to everyone: not a participant, not listed.
        assert set(watcher.participants) == {"green"}
        assert {p.participant_id for p in await admin.participants(space_id)} == {"red", "green"}
        # Now red speaks and green falls silent.
        tones["green"].amplitude, tones["red"].amplitude = 0.0, 0.5
        took = await wait_color(rtmp, "speaker", full, COLORS["red"], timeout=10)
        # Recordings are read as they grow (a little behind the stream): allow for that.
        assert took <= 2.0 + 1.0, took
    finally:
        for p in people:
            await p.leave()


# --- geometry -------------------------------------------------------------------------------


async def test_crop_and_portrait_and_square_resolutions_have_the_expected_geometry(
    bworld: tuple, rtmp: RtmpServer
) -> None:
    server, _, tenant, space_id, stub = bworld
    people = [await publisher(server, tenant, space_id, name, rgb) for name, rgb in COLORS.items()]
    cases = [
        # crop fills the frame: two tiles on top, the third widened to the full last row
        (
            "crop",
            broadcast_pb2.BROADCAST_LAYOUT_CROP,
            broadcast_pb2.BROADCAST_RESOLUTION_1280X720,
            (1280, 720),
            {"red": (0, 0, 640, 360), "green": (640, 0, 640, 360), "blue": (0, 360, 1280, 360)},
        ),
        # portrait gallery, up to 4: 16:9 tiles, 10 px padding, one column of 700x392
        (
            "portrait",
            broadcast_pb2.BROADCAST_LAYOUT_GALLERY,
            broadcast_pb2.BROADCAST_RESOLUTION_720X1280,
            (720, 1280),
            {"red": (10, 42, 700, 392), "green": (10, 444, 700, 392), "blue": (10, 846, 700, 392)},
        ),
        # square gallery: 1:1 tiles of 524, two columns, the last row centred
        (
            "square",
            broadcast_pb2.BROADCAST_LAYOUT_GALLERY,
            broadcast_pb2.BROADCAST_RESOLUTION_1080X1080,
            (1080, 1080),
            {"red": (10, 10, 524, 524), "green": (544, 10, 524, 524), "blue": (278, 544, 524, 524)},
        ),
    ]
    try:
        for key, layout, resolution, size, tiles in cases:
            b = await create(
                stub, space_id, rtmp.url(), stream_key=key, layout=layout, resolution=resolution
            )
            await start(stub, space_id, b.id)
            for name, rect in tiles.items():
                await wait_color(rtmp, key, rect, COLORS[name], timeout=60)
            await stub.StopBroadcast(
                broadcast_pb2.StopBroadcastRequest(space_id=space_id, broadcast_id=b.id),
                metadata=MD,
            )
            await stub.DeleteBroadcast(
                broadcast_pb2.DeleteBroadcastRequest(space_id=space_id, broadcast_id=b.id),
                metadata=MD,
            )
            video = next(
                s for s in probe(rtmp.recordings(key)[-1])["streams"] if s["codec_type"] == "video"
            )
            assert (video["width"], video["height"]) == size
    finally:
        for p in people:
            await p.leave()


# --- lifecycle ------------------------------------------------------------------------------


async def test_lifecycle_start_needs_an_active_space_and_idle_stops_it_with_webhooks_in_order(
    rtmp: RtmpServer,
) -> None:
    from tests.support.webhook_receiver import WebhookReceiver
    from tests.test_webhooks import fast_webhooks

    receiver = await WebhookReceiver().start()
    config = make_config(
        services=("control", "auth", "presence", "media", "webhooks", "broadcaster"),
        broadcast=FAST_BROADCASTS,
    )
    server = await start_server(replace(config, webhooks=fast_webhooks(receiver.url)))
    admin = Admin(server.address)
    stub = broadcast_pb2_grpc.BroadcastServiceStub(admin.channel)
    try:
        tenant = Tenant(await admin.create_key())
        space_id = await admin.create_space()
        b = await create(stub, space_id, rtmp.url("life"), passthrough="town hall")
        assert b.status == broadcast_pb2.BROADCAST_STATUS_IDLE
        assert b.rtmp_url == rtmp.url() and "life" not in str(b)  # the key is write-only
        assert b.layout == broadcast_pb2.BROADCAST_LAYOUT_GALLERY
        assert b.resolution == broadcast_pb2.BROADCAST_RESOLUTION_1920X1080
        with pytest.raises(grpc.aio.AioRpcError) as idle:
            await start(stub, space_id, b.id)
        assert idle.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "idle" in (idle.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as second:
            await create(stub, space_id, rtmp.url("other"))
        assert second.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # one per space

        alice = await publisher(server, tenant, space_id, "alice", COLORS["red"])
        events = alice.events()
        active = await start(stub, space_id, b.id)
        assert active.status == broadcast_pb2.BROADCAST_STATUS_ACTIVE
        space = await admin.get_space(space_id)
        assert [x.id for x in space.broadcasts] == [b.id]
        # The participant is told the space is being broadcast.
        state = await eventually(
            lambda: next(
                (e for e in drain(events) if isinstance(e, sdk.BroadcastStateChanged)), None
            ),
            timeout=10,
        )
        assert state.broadcasting and state.broadcast_ids == [b.id]
        assert alice.broadcasting
        await eventually(lambda: asyncio.to_thread(frames_of, rtmp, "life", 30), timeout=60)
        streaming = await eventually(lambda: _streaming(stub, space_id, b.id), timeout=10)
        assert streaming.worker_id == server.broadcaster.worker_id
        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await stub.DeleteBroadcast(
                broadcast_pb2.DeleteBroadcastRequest(space_id=space_id, broadcast_id=b.id),
                metadata=MD,
            )
        assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # The space going idle stops the broadcast, and its worker lets go of it.
        await alice.leave()
        stopped = await stub.GetBroadcast(
            broadcast_pb2.GetBroadcastRequest(space_id=space_id, broadcast_id=b.id), metadata=MD
        )
        assert stopped.status == broadcast_pb2.BROADCAST_STATUS_IDLE
        await eventually(lambda: not server.broadcaster.runs, timeout=10)
        await stub.DeleteBroadcast(
            broadcast_pb2.DeleteBroadcastRequest(space_id=space_id, broadcast_id=b.id),
            metadata=MD,
        )
        wanted = [
            "video.space.broadcast.created",
            "video.space.broadcast.active",
            "video.space.broadcast.idle",
            "video.space.broadcast.deleted",
        ]

        def broadcast_hooks() -> list[dict[str, Any]]:
            return [r.event for r in receiver.received if r.event["type"] in wanted]

        hooks = await eventually(
            lambda: len(broadcast_hooks()) >= 4 and broadcast_hooks(), timeout=15
        )
        assert [h["type"] for h in hooks] == wanted
        assert all(h["data"]["id"] == b.id and h["object"]["type"] == "broadcast" for h in hooks)
        assert hooks[1]["data"]["status"] == "active"
        assert hooks[2]["data"]["status"] == "idle"
        assert hooks[0]["data"]["passthrough"] == "town hall"
        assert all("life" not in str(h) for h in hooks)
        types = [r.event["type"] for r in receiver.received]
        assert types.index("video.space.broadcast.idle") < types.index("video.space.idle")
    finally:
        await admin.close()
        await server.stop()
        await receiver.stop()


def drain(stream: sdk.EventStream) -> list[Any]:
    out = []
    while (event := stream.get_nowait()) is not None:
        out.append(event)
    return out


async def _streaming(stub: Any, space_id: str, bid: str) -> broadcast_pb2.Broadcast | None:
    got = await stub.GetBroadcast(
        broadcast_pb2.GetBroadcastRequest(space_id=space_id, broadcast_id=bid), metadata=MD
    )
    return got if got.streaming else None


# --- bad input ------------------------------------------------------------------------------


async def test_bad_input_gets_a_clear_error_and_leaves_nothing(
    bworld: tuple, tmp_path: Path
) -> None:
    _, _, _, space_id, stub = bworld
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    from tests.support.system import free_port

    dead = f"http://127.0.0.1:{free_port()}/bg.png"
    cases: list[tuple[dict[str, Any], grpc.StatusCode, str]] = [
        ({"rtmp_url": "http://example/live"}, grpc.StatusCode.INVALID_ARGUMENT, "rtmp"),
        ({"rtmp_url": "rtmp://"}, grpc.StatusCode.INVALID_ARGUMENT, "rtmp"),
        ({"rtmp_url": "rtmp://host:99999/live"}, grpc.StatusCode.INVALID_ARGUMENT, "rtmp"),
        ({"rtmp_url": "rtmp://host"}, grpc.StatusCode.INVALID_ARGUMENT, "application"),
        ({"rtmp_url": "rtmp://h/live", "layout": 9}, grpc.StatusCode.INVALID_ARGUMENT, "layout"),
        (
            {"rtmp_url": "rtmp://h/live", "resolution": 42},
            grpc.StatusCode.INVALID_ARGUMENT,
            "resolution",
        ),
        (
            {"rtmp_url": "rtmp://h/live", "background": broadcast_pb2.BackgroundImage(url=dead)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "unreachable",
        ),
        (
            {
                "rtmp_url": "rtmp://h/live",
                "background": broadcast_pb2.BackgroundImage(path=str(text)),
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "not a png or jpeg",
        ),
        (
            {
                "rtmp_url": "rtmp://h/live",
                "background": broadcast_pb2.BackgroundImage(image=b"GIF89a...."),
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "not a png or jpeg",
        ),
        (
            {
                "rtmp_url": "rtmp://h/live",
                "background": broadcast_pb2.BackgroundImage(path=str(tmp_path / "missing.png")),
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "not found",
        ),
        (
            {"rtmp_url": "rtmp://h/live", "passthrough": "x" * 256},
            grpc.StatusCode.INVALID_ARGUMENT,
            "passthrough",
        ),
    ]
    for fields, code, words in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateBroadcast(
                broadcast_pb2.CreateBroadcastRequest(space_id=space_id, **fields), metadata=MD
            )
        assert err.value.code() == code, fields
        assert words in (err.value.details() or ""), (fields, err.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await create(stub, "nosuchspace", "rtmp://h/live")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    for rpc, request in (
        (
            stub.GetBroadcast,
            broadcast_pb2.GetBroadcastRequest(space_id=space_id, broadcast_id="nope"),
        ),
        (
            stub.StartBroadcast,
            broadcast_pb2.StartBroadcastRequest(space_id=space_id, broadcast_id="nope"),
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await rpc(request, metadata=MD)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
        await stub.ListBroadcasts(broadcast_pb2.ListBroadcastsRequest(space_id=space_id))
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    listed = await stub.ListBroadcasts(
        broadcast_pb2.ListBroadcastsRequest(space_id=space_id), metadata=MD
    )
    assert list(listed.broadcasts) == []  # nothing half-created
    # A good one with a real PNG background still works after all that.
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (64, 32), (200, 10, 10)).save(png, format="PNG")
    ok = await create(
        stub,
        space_id,
        "rtmps://h:443/app/key",
        background=broadcast_pb2.BackgroundImage(image=png.getvalue()),
    )
    assert ok.rtmp_url == "rtmps://h:443/app" and ok.background == "inline"
    assert len(ok.background_sha256) == 64


# --- timing ---------------------------------------------------------------------------------


def packet_times(path: Path) -> dict[str, list[float]]:
    """Presentation times (seconds) of a recording's video and audio packets, and the video
    packets' decoding times, in file order."""
    import av

    times: dict[str, list[float]] = {"video": [], "audio": [], "video_dts": []}
    with av.open(str(path)) as container:
        for packet in container.demux():
            if packet.pts is not None and packet.stream.type in times:
                times[packet.stream.type].append(float(packet.pts * packet.time_base))
                if packet.stream.type == "video" and packet.dts is not None:
                    times["video_dts"].append(float(packet.dts * packet.time_base))
    return times


def gallery_rects(count: int) -> list[tuple[int, int, int, int]]:
    from spaces.broadcast.layouts import Subject, layout

    subjects = [Subject(f"p{i}") for i in range(count)]
    return [
        (t.rect.x, t.rect.y, t.rect.w, t.rect.h) for t in layout("gallery", subjects, 1280, 720)
    ]


async def stop_and_delete(stub: Any, space_id: str, broadcast_id: str) -> None:
    await stub.StopBroadcast(
        broadcast_pb2.StopBroadcastRequest(space_id=space_id, broadcast_id=broadcast_id),
        metadata=MD,
    )
    await stub.DeleteBroadcast(
        broadcast_pb2.DeleteBroadcastRequest(space_id=space_id, broadcast_id=broadcast_id),
        metadata=MD,
    )


async def test_joining_and_leaving_mid_broadcast_relays_out_with_no_gap_in_the_timestamps(
    bworld: tuple, rtmp: RtmpServer
) -> None:
    server, _, tenant, space_id, stub = bworld
    red = await publisher(server, tenant, space_id, "red", COLORS["red"], audio=0.2)
    try:
        b = await create(
            stub,
            space_id,
            rtmp.url(),
            stream_key="relayout",
            resolution=broadcast_pb2.BROADCAST_RESOLUTION_1280X720,
        )
        await start(stub, space_id, b.id)
        [alone] = gallery_rects(1)
        await wait_color(rtmp, "relayout", alone, COLORS["red"], timeout=60)
        await asyncio.sleep(2.0)
        green = await publisher(server, tenant, space_id, "green", COLORS["green"], audio=0.2)
        left, right = gallery_rects(2)
        await wait_color(rtmp, "relayout", right, COLORS["green"], timeout=30)
        await wait_color(rtmp, "relayout", left, COLORS["red"], timeout=5)
        await asyncio.sleep(2.0)
        await green.leave()
        await wait_color(rtmp, "relayout", alone, COLORS["red"], timeout=30)
        await asyncio.sleep(2.0)
        status = dict(next(iter(server.broadcaster.runs.values())).status)
        await stop_and_delete(stub, space_id, b.id)
    finally:
        await red.leave()
    # One publish from start to stop (no reconnect), through the join and the leave.
    [path] = rtmp.recordings("relayout")
    times = await asyncio.to_thread(packet_times, path)
    video, audio = times["video"], times["audio"]
    assert len(video) > 150, len(video)
    # Video: no backstep and no gap. Every 1/30 s slot has a frame (FLV stamps are whole
    # milliseconds: 33 or 34 ms apart).
    shown = sorted(video)
    assert len(set(shown)) == len(shown), "two frames with one timestamp"
    gaps = [b - a for a, b in itertools.pairwise(shown)]
    holes = [
        (round(t, 3), round(g, 3))
        for t, g in zip(shown, gaps, strict=False)
        if not 0.032 <= g <= 0.035
    ]
    assert not holes, (status, holes, len(shown))
    assert (len(shown) - 1) / (shown[-1] - shown[0]) == pytest.approx(30, abs=0.1)
    # Decoding order only ever moves forward too.
    assert all(b > a for a, b in itertools.pairwise(times["video_dts"]))
    # Audio: continuous AAC frames (1024 samples, 21.3 ms) from the first to the last.
    assert all(b > a for a, b in itertools.pairwise(audio))
    agaps = [b - a for a, b in itertools.pairwise(audio)]
    assert max(agaps) <= 0.023 and min(agaps) >= 0.020, (min(agaps), max(agaps))
    assert audio[-1] - audio[0] == pytest.approx(shown[-1] - shown[0], abs=0.1)


def flash_onsets(path: Path) -> list[float]:
    """When the picture lights up: the pts of each frame whose mean luma crosses the midpoint
    between dark and light, after at least half a second of dark."""
    frames = decode_video(path, keep=lambda image: float(image[::8, ::8].mean()))
    if not frames:
        return []
    lumas = [luma for _, luma in frames]
    middle = (min(lumas) + max(lumas)) / 2
    onsets: list[float] = []
    dark_since: float | None = None
    for t, luma in frames:
        if luma < middle:
            dark_since = t if dark_since is None else dark_since
        else:
            if dark_since is not None and t - dark_since >= 0.5:
                onsets.append(t)
            dark_since = None
    return onsets


def beep_onsets(path: Path, window: float = 0.005) -> list[float]:
    """When the sound starts: the start of each 5 ms window whose RMS is above a third of the
    loudest window's, after at least half a second quieter."""
    chunks = decode_audio(path)
    if not chunks:
        return []
    rate = 48_000
    # Place every decoded frame at its own pts (not end to end), in one timeline.
    first = chunks[0][0]
    end = max(t + len(s) / rate for t, s in chunks)  # type: ignore[arg-type]
    signal = np.zeros(int((end - first) * rate) + 1, np.float32)
    for t, samples in chunks:
        at = round((t - first) * rate)
        piece = np.asarray(samples, np.float32)[: len(signal) - at]
        signal[at : at + len(piece)] = piece
    size = int(window * rate)
    blocks = signal[: len(signal) // size * size].reshape(-1, size)
    rms = np.sqrt((blocks.astype(np.float64) ** 2).mean(axis=1))
    if rms.max() < 0.05:
        return []
    loud = rms > rms.max() / 3
    onsets: list[float] = []
    quiet = 0
    for i, on in enumerate(loud):
        if not on:
            quiet += 1
        else:
            if quiet * window >= 0.5:
                onsets.append(first + i * window)
            quiet = 0
    return onsets


async def test_audio_and_video_stay_in_sync(bworld: tuple, rtmp: RtmpServer) -> None:
    """A flash and a beep captured at the same instants (one shared clock, ``Flashes``: each
    video frame is lit by its own capture time, each audio sample by its own) arrive at the RTMP
    server within 100 ms of each other, all through a 15 s broadcast: neither offset nor
    drifting. The video's onset is measured to a frame (up to 33 ms late at capture, half a slot
    either way at output); the audio's to 5 ms."""
    server, _, tenant, space_id, stub = bworld
    flashes = Flashes(period=2.0, length=0.1)
    space = sdk.Space(tenant.token(space_id, "flash"), server.address, display_name="flash")
    await space.join()
    try:
        await space.local.publish(FlashTrack(flashes), "camera")
        await space.local.publish(BeepTrack(flashes, amplitude=0.5), "microphone")
        b = await create(
            stub,
            space_id,
            rtmp.url(),
            stream_key="sync",
            layout=broadcast_pb2.BROADCAST_LAYOUT_ACTIVE_SPEAKER,
            resolution=broadcast_pb2.BROADCAST_RESOLUTION_1280X720,
        )
        await start(stub, space_id, b.id)
        await eventually(
            lambda: asyncio.to_thread(frames_of, rtmp, "sync", 30), timeout=60, interval=1
        )
        await asyncio.sleep(15)
        status = dict(next(iter(server.broadcaster.runs.values())).status)
        await stop_and_delete(stub, space_id, b.id)
    finally:
        await space.leave()
    # One publish from start to stop (no reconnect).
    paths = rtmp.recordings("sync")
    assert len(paths) == 1, (paths, status)
    path = paths[0]
    flashes_seen = await asyncio.to_thread(flash_onsets, path)
    beeps = await asyncio.to_thread(beep_onsets, path)
    offsets = [
        (round(v, 3), round(v - min(beeps, key=lambda a: abs(a - v)), 3))
        for v in flashes_seen
        if beeps
    ]
    print(f"\nflashes {[round(v, 3) for v in flashes_seen]}\nbeeps {[round(a, 3) for a in beeps]}")
    print(f"video - audio (s) per event: {[o for _, o in offsets]}")
    assert len(offsets) >= 4, (flashes_seen, beeps, status)
    assert len(beeps) >= 4 and abs(len(beeps) - len(flashes_seen)) <= 1, (
        flashes_seen,
        beeps,
        status,
    )
    assert all(abs(o) <= 0.1 for _, o in offsets), (offsets, status)


# --- metrics --------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """The /metrics text of a server, as {'name{labels}': value}."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_metrics_show_the_broadcast_its_frames_cpu_and_rtmp_errors_while_rtmp_is_down() -> (
    None
):
    from tests.support.system import free_port

    config = make_config(
        services=("control", "auth", "presence", "media", "broadcaster"),
        broadcast=FAST_BROADCASTS,
        metrics_addr="127.0.0.1:0",
    )
    server = await start_server(config)
    admin = Admin(server.address)
    stub = broadcast_pb2_grpc.BroadcastServiceStub(admin.channel)
    port = server.metrics_port
    rtmp_errors = 'spaces_broadcast_errors_total{kind="rtmp"}'
    composed = 'spaces_broadcast_frames_total{result="composed"}'
    try:
        tenant = Tenant(await admin.create_key())
        space_id = await admin.create_space()
        alice = await publisher(server, tenant, space_id, "alice", COLORS["red"], audio=0.2)
        before = await asyncio.to_thread(scrape, port)
        # Nothing listens on this port: every attempt is refused, and retried.
        b = await create(stub, space_id, f"rtmp://127.0.0.1:{free_port()}/live/down")
        await start(stub, space_id, b.id)

        async def errors_over(count: float) -> dict[str, float] | None:
            now = await asyncio.to_thread(scrape, port)
            return now if now.get(rtmp_errors, 0) - before.get(rtmp_errors, 0) > count else None

        first = await eventually(lambda: errors_over(0), timeout=30, interval=0.5)
        # It keeps retrying (with backoff), and each refusal is counted.
        later = await eventually(
            lambda: errors_over(first[rtmp_errors] - before.get(rtmp_errors, 0)),
            timeout=15,
            interval=0.5,
        )
        assert later["spaces_broadcasts_active"] == before["spaces_broadcasts_active"] + 1
        # The composer keeps its clock (and composes) while the server is down.
        assert later[composed] > before.get(composed, 0)
        assert 'spaces_broadcast_frames_total{result="dropped"}' in later
        cpu = later[f'spaces_broadcast_cpu_cores{{broadcast_id="{b.id}"}}']
        assert cpu > 0, cpu
        await alice.leave()  # the space goes idle: the broadcast stops, its gauges go
        gone = await eventually(
            lambda: asyncio.to_thread(
                lambda: (
                    (m := scrape(port))["spaces_broadcasts_active"]
                    == before["spaces_broadcasts_active"]
                    and m
                )
            ),
            timeout=15,
        )
        assert f'spaces_broadcast_cpu_cores{{broadcast_id="{b.id}"}}' not in gone
    finally:
        await admin.close()
        await server.stop()
