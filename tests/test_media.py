"""The media node and the SDK with real aiortc peers over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from spaces.media.forwarding import TrackForwarder
from spaces.sdk import client as sdk
from spaces.sdk.media import TestPatternTrack, ToneTrack, color_for, read_pattern, same_color
from spaces.server import SpacesServer
from spaces.session import events as ev
from spaces.v1 import media_pb2, media_pb2_grpc, presence_pb2
from tests.support.system import (
    ADMIN_KEY,
    Admin,
    Process,
    Tenant,
    eventually,
    free_port,
    make_config,
    start_server,
    wait_serving,
)

ROOT = Path(__file__).resolve().parent.parent


async def connect(
    server: SpacesServer, tenant: Tenant, space_id: str, pid: str, **kw: object
) -> tuple[sdk.Space, sdk.EventStream]:
    role = str(kw.pop("role", "publisher"))
    space = sdk.Space(tenant.token(space_id, pid, role=role), server.address, **kw)  # type: ignore[arg-type]
    events = space.events()
    await space.join()
    return space, events


def drain_events(stream: sdk.EventStream) -> list[sdk.SpaceEvent]:
    out = []
    while (event := stream.get_nowait()) is not None:
        out.append(event)
    return out


async def frames_from(space: sdk.Space, pid: str, source: str, count: int) -> list[object]:
    track = await eventually(lambda: space.remote_track(pid, source), timeout=10)
    await eventually(lambda: track.frames_received >= count, timeout=15)
    return [track.last_frame]


# --- exchange -------------------------------------------------------------------------------


async def test_three_participants_exchange_audio_and_video_from_the_right_publisher(
    world: tuple,
) -> None:
    server, _, tenant, space_id = world
    names = ["alice", "bob", "carol"]
    spaces = {}
    for name in names:
        space, _ = await connect(server, tenant, space_id, name)
        await space.local.publish(TestPatternTrack(color_for(name)), "camera")
        await space.local.publish(ToneTrack(300), "microphone")
        spaces[name] = space
    try:
        for viewer in names:
            for sender in names:
                if viewer == sender:
                    continue
                video = await eventually(
                    lambda v=viewer, s=sender: spaces[v].remote_track(s, "camera"), timeout=10
                )
                audio = spaces[viewer].remote_track(sender, "microphone")
                assert audio is not None
                await eventually(lambda t=video: t.frames_received >= 20, timeout=15)
                await eventually(lambda t=audio: t.frames_received >= 30, timeout=15)
                color, number = read_pattern(video.last_frame)
                assert same_color(color, color_for(sender)), (viewer, sender, color)
                for other in names:
                    if other != sender:
                        assert not same_color(color, color_for(other))
                # The frame counter advances: a live stream, not one frozen frame.
                _, later = read_pattern(
                    await eventually(
                        lambda t=video, n=number: (
                            t.frames_received > 0
                            and read_pattern(t.last_frame)[1] > n
                            and t.last_frame
                        ),
                        timeout=5,
                    )
                )
                assert later > number
    finally:
        for space in spaces.values():
            await space.leave()


async def test_screen_share_is_a_second_video_track(world: tuple) -> None:
    server, _, tenant, space_id = world
    presenter, _ = await connect(server, tenant, space_id, "presenter")
    viewer, _ = await connect(server, tenant, space_id, "viewer")
    try:
        await presenter.local.publish(TestPatternTrack((200, 30, 30)), "camera")
        await presenter.local.publish(TestPatternTrack((30, 30, 200)), "screenshare")
        camera = await eventually(lambda: viewer.remote_track("presenter", "camera"))
        screen = await eventually(lambda: viewer.remote_track("presenter", "screenshare"))
        assert camera.kind == screen.kind == "video"
        await eventually(
            lambda: camera.frames_received > 10 and screen.frames_received > 10, timeout=15
        )
        assert same_color(read_pattern(camera.last_frame)[0], (200, 30, 30))
        assert same_color(read_pattern(screen.last_frame)[0], (30, 30, 200))
    finally:
        await presenter.leave()
        await viewer.leave()


async def test_h264_is_forwarded(world: tuple) -> None:
    server, _, tenant, space_id = world
    publisher, _ = await connect(server, tenant, space_id, "h264pub")
    viewer, _ = await connect(server, tenant, space_id, "h264view")
    try:
        local = await publisher.local.publish(
            TestPatternTrack((20, 200, 20)), "camera", codec="video/H264"
        )
        track = await eventually(lambda: viewer.remote_track("h264pub", "camera"))
        assert track.info.codec == "video/H264"
        await eventually(lambda: track.frames_received > 10, timeout=20)
        assert same_color(read_pattern(track.last_frame)[0], (20, 200, 20))
        assert local.track_id == track.id
    finally:
        await publisher.leave()
        await viewer.leave()


# --- keyframes ------------------------------------------------------------------------------


def keyframe_requests(server: SpacesServer) -> int:
    return sum(
        t.forwarder.keyframe_requests_sent
        for room in server.media_node.rooms.values()
        for t in room.tracks.values()
    )


async def late_joiner_first_frame(world: tuple, pid: str) -> tuple[float | None, int]:
    """(seconds from joining to the first decoded frame, or None after 2 s; keyframe requests
    the node sent upstream meanwhile)."""
    server, _, tenant, space_id = world
    publisher, _ = await connect(server, tenant, space_id, "steady", publish_bitrate=800_000)
    await publisher.local.publish(TestPatternTrack((10, 180, 180)), "camera")
    try:
        await asyncio.sleep(5)  # the publisher's one keyframe is long gone
        before = keyframe_requests(server)
        started = time.monotonic()
        late, _ = await connect(server, tenant, space_id, pid)
        try:
            track = await eventually(lambda: late.remote_track("steady", "camera"))
            deadline = started + 2.0
            while time.monotonic() < deadline:
                if track.frames_received:
                    return time.monotonic() - started, keyframe_requests(server) - before
                await asyncio.sleep(0.02)
            return None, keyframe_requests(server) - before
        finally:
            await late.leave()
    finally:
        await publisher.leave()


async def test_late_joiner_sees_video_within_two_seconds_via_pli_forwarding(
    world: tuple,
) -> None:
    elapsed, requests = await late_joiner_first_frame(world, "late")
    assert elapsed is not None, "late joiner got no frame within 2 s"
    assert elapsed < 2.0
    assert requests >= 1


async def test_without_pli_forwarding_a_late_joiner_sees_nothing(
    world: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the test above: a fixed-bitrate publisher makes no keyframe on its own,
    so only forwarded keyframe requests can start a late subscriber."""
    monkeypatch.setattr(TrackForwarder, "request_keyframe", lambda self: None)
    elapsed, requests = await late_joiner_first_frame(world, "late2")
    assert elapsed is None
    assert requests == 0


# --- rules ----------------------------------------------------------------------------------


async def test_subscriber_cannot_publish_or_send_events_and_the_session_continues(
    world: tuple,
) -> None:
    server, _, tenant, space_id = world
    watcher, _ = await connect(server, tenant, space_id, "watcher", role="subscriber")
    publisher, _ = await connect(server, tenant, space_id, "speaker")
    try:
        with pytest.raises(sdk.SpacesClientError) as info:
            await watcher.local.publish(TestPatternTrack((1, 2, 3)), "camera")
        assert info.value.code == "PERMISSION_DENIED"
        with pytest.raises(sdk.SpacesClientError) as info:
            await watcher.local.publish_custom_event("hi")
        assert info.value.code == "PERMISSION_DENIED"
        # Still in the session: it receives the publisher's media.
        await publisher.local.publish(TestPatternTrack((250, 250, 10)), "camera")
        track = await eventually(lambda: watcher.remote_track("speaker", "camera"))
        await eventually(lambda: track.frames_received > 5, timeout=15)
        assert watcher.state == "joined"
    finally:
        await watcher.leave()
        await publisher.leave()


async def test_custom_events_arrive_in_order_and_are_rate_limited(world: tuple) -> None:
    server, _, tenant, space_id = world
    sender, sender_events = await connect(server, tenant, space_id, "chatty")
    receiver, receiver_events = await connect(server, tenant, space_id, "listener")
    try:
        sent = []
        refused = 0
        for i in range(25):
            try:
                await sender.local.publish_custom_event(f"message {i}")
                sent.append(f"message {i}")
            except sdk.SpacesClientError as exc:
                assert exc.code == "RESOURCE_EXHAUSTED"
                refused += 1
        assert refused > 0, "25 events in a burst must hit the 10/s limit"
        assert len(sent) >= 10

        async def received() -> list[sdk.CustomEventReceived] | None:
            got = [
                e for e in drain_events(receiver_events) if isinstance(e, sdk.CustomEventReceived)
            ]
            received.all += got  # type: ignore[attr-defined]
            return received.all if len(received.all) >= len(sent) else None  # type: ignore[attr-defined]

        received.all = []  # type: ignore[attr-defined]
        events = await eventually(received, timeout=5)
        assert [e.payload for e in events] == sent
        seqs = [e.seq for e in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert all(e.participant_id == "chatty" for e in events)
        with pytest.raises(sdk.SpacesClientError) as info:
            await asyncio.sleep(1.1)
            await sender.local.publish_custom_event("x" * 4097)
        assert info.value.code == "INVALID_ARGUMENT"
        drain_events(sender_events)
    finally:
        await sender.leave()
        await receiver.leave()


async def test_mute_and_unmute_reach_the_others(world: tuple) -> None:
    server, _, tenant, space_id = world
    publisher, _ = await connect(server, tenant, space_id, "muter")
    viewer, viewer_events = await connect(server, tenant, space_id, "observer")
    try:
        local = await publisher.local.publish(ToneTrack(500), "microphone")
        track = await eventually(lambda: viewer.remote_track("muter", "microphone"))
        await eventually(lambda: track.frames_received > 10, timeout=10)
        await publisher.local.set_muted(local, True)
        await eventually(lambda: track.muted, timeout=5)
        muted = [e for e in drain_events(viewer_events) if isinstance(e, sdk.TrackMuted)]
        assert muted and muted[-1].muted is True
        # A muted track is not forwarded.
        await asyncio.sleep(0.3)
        paused_at = track.frames_received
        await asyncio.sleep(0.5)
        assert track.frames_received <= paused_at + 5
        await publisher.local.set_muted(local, False)
        await eventually(lambda: not track.muted, timeout=5)
        await eventually(lambda: track.frames_received > paused_at + 10, timeout=5)
    finally:
        await publisher.leave()
        await viewer.leave()


async def test_active_speakers_follow_the_one_participant_making_sound(world: tuple) -> None:
    server, _, tenant, space_id = world
    loud, _ = await connect(server, tenant, space_id, "loud")
    quiet, quiet_events = await connect(server, tenant, space_id, "quiet")
    try:
        await loud.local.publish(ToneTrack(440, amplitude=0.5), "microphone")
        await quiet.local.publish(ToneTrack(440, amplitude=0.0), "microphone")
        await eventually(lambda: quiet.active_speakers == ["loud"], timeout=10)
        changes = [
            e for e in drain_events(quiet_events) if isinstance(e, sdk.ActiveSpeakersChanged)
        ]
        assert changes and changes[-1].participant_ids == ["loud"]
        assert all("quiet" not in c.participant_ids for c in changes)
        # When the loud one stops, the list empties.
        await loud.leave()
        await eventually(lambda: quiet.active_speakers == [], timeout=10)
    finally:
        await quiet.leave()


async def test_display_name_changes_are_validated_rate_limited_and_broadcast(
    world: tuple,
) -> None:
    server, admin, tenant, space_id = world
    renamer, _ = await connect(server, tenant, space_id, "renamer")
    other, other_events = await connect(server, tenant, space_id, "other")
    try:
        with pytest.raises(sdk.SpacesClientError) as info:
            await renamer.local.set_display_name("x" * 65)
        assert info.value.code == "INVALID_ARGUMENT"
        await renamer.local.set_display_name("Renamed")
        with pytest.raises(sdk.SpacesClientError) as info:
            await renamer.local.set_display_name("Again")
        assert info.value.code == "RESOURCE_EXHAUSTED"
        await eventually(lambda: other.participants["renamer"].display_name == "Renamed")
        assert any(
            isinstance(e, sdk.DisplayNameChanged) and e.display_name == "Renamed"
            for e in drain_events(other_events)
        )
        participant = (await admin.participants(space_id))[0]
        assert participant.display_name == "Renamed"
    finally:
        await renamer.leave()
        await other.leave()


async def test_tracks_per_source_are_limited(world: tuple) -> None:
    server, _, tenant, space_id = world
    space, _ = await connect(server, tenant, space_id, "greedy")
    try:
        await space.local.publish(TestPatternTrack((9, 9, 9)), "camera")
        with pytest.raises(sdk.SpacesClientError) as info:
            await space.local.publish(TestPatternTrack((8, 8, 8)), "camera")
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert len(space.local.tracks) == 1
        # A different source is fine.
        await space.local.publish(TestPatternTrack((7, 7, 7)), "screenshare")
    finally:
        await space.leave()


async def test_garbage_sdp_gets_invalid_argument_and_the_session_continues(
    world: tuple,
) -> None:
    server, _, tenant, space_id = world
    space, _ = await connect(server, tenant, space_id, "garbler")
    try:
        for sdp in ("garbage", "v=0\r\n" * 5000, ""):
            with pytest.raises(sdk.SpacesClientError) as info:
                await space._request(
                    media_pb2.ClientMessage(
                        publish_offer=media_pb2.PublishOffer(
                            offer=media_pb2.SessionDescription(type="offer", sdp=sdp),
                            tracks=[
                                media_pb2.PublishedTrack(
                                    mid="0", source=media_pb2.TRACK_SOURCE_CAMERA
                                )
                            ],
                        )
                    )
                )
            assert info.value.code == "INVALID_ARGUMENT"
        with pytest.raises(sdk.SpacesClientError) as info:
            await space._request(media_pb2.ClientMessage())
        assert info.value.code == "INVALID_ARGUMENT"
        # The session still works.
        await space.local.publish(TestPatternTrack((100, 100, 100)), "camera")
        assert space.local.tracks[0].track_id
    finally:
        await space.leave()


# --- subscriptions --------------------------------------------------------------------------


async def test_auto_mode_keeps_at_most_n_and_manual_mode_picks_participants(
    world: tuple,
) -> None:
    server, _, tenant, space_id = world
    publishers = []
    for i in range(3):
        space, _ = await connect(server, tenant, space_id, f"pub{i}")
        await space.local.publish(
            ToneTrack(200 + i * 100, amplitude=0.4 if i == 2 else 0.0), "microphone"
        )
        publishers.append(space)
    viewer, _ = await connect(server, tenant, space_id, "picky", max_subscriptions=2)
    try:

        def subscribed() -> set[str]:
            return {
                p.participant_id
                for p in viewer.participants.values()
                for t in p.tracks.values()
                if t.subscribed
            }

        await eventually(lambda: len(subscribed()) == 2, timeout=10)
        # The one making sound is preferred.
        await eventually(lambda: "pub2" in subscribed(), timeout=10)
        await viewer.local.subscribe(["pub0"])
        await eventually(lambda: subscribed() == {"pub0"}, timeout=10)
        track = viewer.remote_track("pub0", "microphone")
        assert track is not None
        await eventually(lambda: track.frames_received > 5, timeout=10)
        await viewer.local.auto_subscribe(3)
        await eventually(lambda: subscribed() == {"pub0", "pub1", "pub2"}, timeout=10)
    finally:
        await viewer.leave()
        for space in publishers:
            await space.leave()


async def test_unpublish_stops_the_track_for_everyone(world: tuple) -> None:
    server, _, tenant, space_id = world
    publisher, _ = await connect(server, tenant, space_id, "unpub")
    viewer, viewer_events = await connect(server, tenant, space_id, "seer")
    try:
        local = await publisher.local.publish(TestPatternTrack((60, 60, 60)), "camera")
        track = await eventually(lambda: viewer.remote_track("unpub", "camera"))
        await eventually(lambda: track.frames_received > 5, timeout=10)
        await publisher.local.unpublish(local)
        await eventually(lambda: viewer.remote_track("unpub", "camera") is None, timeout=5)
        assert any(isinstance(e, sdk.TrackUnpublished) for e in drain_events(viewer_events))
        # Publishing again reuses the negotiated m-section and flows again.
        await publisher.local.publish(TestPatternTrack((90, 90, 90)), "camera")
        again = await eventually(lambda: viewer.remote_track("unpub", "camera"))
        await eventually(lambda: again.frames_received > 5, timeout=10)
        assert same_color(read_pattern(again.last_frame)[0], (90, 90, 90))
    finally:
        await publisher.leave()
        await viewer.leave()


async def test_a_session_closed_while_publishing_leaves_no_track_behind(world: tuple) -> None:
    """A kick (or drain, or lost lease) can land while a publish offer is being answered. The
    room must not take tracks from the closed session: the others would see a ghost track."""
    server, _, tenant, space_id = world
    viewer, viewer_events = await connect(server, tenant, space_id, "viewer")
    publisher, publisher_events = await connect(server, tenant, space_id, "kicked")
    session = server.media_node.sessions[publisher.connection_id]
    new_pc = session._new_pc
    closing: list[asyncio.Future[None]] = []

    def pc_closed_during_negotiation() -> Any:
        pc = new_pc()
        set_local = pc.setLocalDescription

        async def set_local_then_close(description: Any) -> None:
            await set_local(description)
            # An admin's RemoveParticipant, handled by another task, gets in first.
            closing.append(
                asyncio.ensure_future(session.close(ev.CLOSE_REMOVED, "removed", "removed"))
            )
            await asyncio.sleep(0)

        pc.setLocalDescription = set_local_then_close
        return pc

    session._new_pc = pc_closed_during_negotiation
    try:
        with contextlib.suppress(sdk.SpacesClientError):
            await publisher.local.publish(TestPatternTrack((10, 200, 10)), "camera")
        await eventually(lambda: publisher.state == "closed", timeout=5)
        await asyncio.gather(*closing)
        await eventually(lambda: "kicked" not in viewer.participants, timeout=5)
        await asyncio.sleep(0.3)
        room = server.media_node.rooms[space_id]
        assert room.tracks == {}
        assert [s.participant_id for s in room.sessions.values()] == ["viewer"]
        assert not any(isinstance(e, sdk.TrackPublished) for e in drain_events(viewer_events))
        assert any(isinstance(e, sdk.Disconnected) for e in drain_events(publisher_events))
    finally:
        await publisher.leave()
        await viewer.leave()


# --- leaving --------------------------------------------------------------------------------


async def test_end_of_session_frees_the_participant_id_at_once(world: tuple) -> None:
    server, admin, tenant, space_id = world
    space, _ = await connect(server, tenant, space_id, "leaver")
    await space.leave()
    assert await admin.participants(space_id) == []
    again, _ = await connect(server, tenant, space_id, "leaver")
    assert again.participant_id == "leaver"
    # A stream that just drops (no goodbye) also frees it at once.
    assert again._call is not None
    again._call.cancel()
    await eventually(lambda: server.media_node.sessions == {}, timeout=5)
    third, _ = await connect(server, tenant, space_id, "leaver")
    assert third.participant_id == "leaver"
    await third.leave()
    await again.leave()


def everyone_sees_everyone(names: list[str], sessions: list[tuple[Any, set[str]]]) -> bool:
    return all(seen == set(names) - {name} for name, (_, seen) in zip(names, sessions, strict=True))


async def test_sessions_opened_and_closed_at_the_same_moment_all_see_each_other(
    world: tuple,
) -> None:
    """Clients reconnecting after a node loss or a drain arrive at once. Each must see every
    other one (in its Joined snapshot or as a later ParticipantJoined), and a room emptied
    while a session is being seated must not swallow that session."""
    server, admin, tenant, space_id = world

    async def ticket(pid: str) -> str:
        reply = await admin.presence.Join(
            presence_pb2.JoinRequest(token=tenant.token(space_id, pid))
        )
        return str(reply.ticket)

    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = media_pb2_grpc.MediaServiceStub(channel)

        async def open_session(pid: str) -> tuple[Any, set[str]]:
            call = stub.Session()
            await call.write(hello(await ticket(pid)))
            return call, set()

        async def watch(call: Any, seen: set[str]) -> None:
            while True:
                message = await call.read()
                kind = message.WhichOneof("message")
                if kind == "joined":
                    seen.update(p.participant_id for p in message.joined.participants)
                elif kind == "participant_joined":
                    seen.add(message.participant_joined.participant.participant_id)
                elif kind == "participant_left":
                    seen.discard(message.participant_left.participant_id)

        for round_ in range(5):
            leaver, _ = await open_session(f"leaver-{round_}")
            assert (await leaver.read()).WhichOneof("message") == "joined"
            names = [f"p{round_}-{i}" for i in range(6)]
            leaving = asyncio.ensure_future(
                leaver.write(media_pb2.ClientMessage(leave=media_pb2.LeaveSession()))
            )
            sessions = await asyncio.gather(*(open_session(name) for name in names))
            await leaving
            watchers = [asyncio.ensure_future(watch(call, seen)) for call, seen in sessions]

            try:
                await eventually(functools.partial(everyone_sees_everyone, names, sessions), 5)
                assert list(server.media_node.rooms) == [space_id]
                room = server.media_node.rooms[space_id]
                assert {s.participant_id for s in room.sessions.values()} == set(names)
            finally:
                for watcher in watchers:
                    watcher.cancel()
                for call, _ in sessions:
                    call.cancel()
                leaver.cancel()
            await eventually(lambda: server.media_node.rooms == {}, timeout=5)


# --- the node process -----------------------------------------------------------------------


async def metric(port: int, name: str) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_the_node_forwards_without_creating_any_decoder_or_encoder(
    tmp_path: Path,
) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    node = Process(
        ["serve"],
        {
            "SPACES_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
            "SPACES_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
            "SPACES_ADMIN_KEY": ADMIN_KEY,
            "SPACES_ICE_BIND": "127.0.0.1",
        },
        tmp_path / "node.log",
    ).start()
    address = f"127.0.0.1:{grpc_port}"
    try:
        await wait_serving(address, timeout=30)
        admin = Admin(address)
        tenant = Tenant(await admin.create_key())
        space_id = await admin.create_space()
        pub = sdk.Space(tenant.token(space_id, "p"), address)
        await pub.join()
        await pub.local.publish(TestPatternTrack((5, 250, 5)), "camera")
        await pub.local.publish(ToneTrack(300), "microphone")
        viewers = []
        for i in range(2):
            viewer = sdk.Space(tenant.token(space_id, f"v{i}"), address)
            await viewer.join()
            viewers.append(viewer)
        for viewer in viewers:
            track = await eventually(lambda v=viewer: v.remote_track("p", "camera"))
            await eventually(lambda t=track: t.frames_received > 30, timeout=15)
            assert same_color(read_pattern(track.last_frame)[0], (5, 250, 5))
        forwarded = await metric(metrics_port, "spaces_forwarded_packets_total")
        assert forwarded > 100
        assert await metric(metrics_port, "spaces_media_decoders_created_total") == 0
        assert await metric(metrics_port, "spaces_media_encoders_created_total") == 0
        # The clients in this process did decode, through the same counting hook's absence:
        # the count above is the node's alone.
        for space in [pub, *viewers]:
            await space.leave()
        await admin.close()
    finally:
        node.stop()


async def test_a_stalled_subscriber_never_stalls_the_others_and_recovers(
    world: tuple, tmp_path: Path
) -> None:
    """One subscriber's process is frozen (SIGSTOP): it stops reading, its socket fills, and it
    loses packets. The other subscriber keeps receiving at full rate, and when the frozen one
    resumes it gets a keyframe (via its own PLI, forwarded) and decodes again."""
    import os
    import signal
    import subprocess
    import sys

    server, _, tenant, space_id = world
    publisher, _ = await connect(server, tenant, space_id, "source", publish_bitrate=800_000)
    await publisher.local.publish(TestPatternTrack((120, 40, 160)), "camera")
    healthy, _ = await connect(server, tenant, space_id, "healthy")
    frozen = subprocess.Popen(  # noqa: ASYNC220 - a child we signal and read line by line
        [
            sys.executable,
            "-m",
            "tests.support.viewer",
            server.address,
            tenant.token(space_id, "frozen"),
            "source",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    lines: list[int] = []

    async def read_lines() -> None:
        assert frozen.stdout is not None
        while True:
            line = await asyncio.to_thread(frozen.stdout.readline)
            if not line:
                return
            lines.append(int(line.split()[1]))

    reader = asyncio.create_task(read_lines())
    try:
        await eventually(lambda: lines and lines[-1] > 30, timeout=20)
        track = await eventually(lambda: healthy.remote_track("source", "camera"))
        os.kill(frozen.pid, signal.SIGSTOP)
        stopped_at = lines[-1]
        before = track.frames_received
        await asyncio.sleep(3)
        # The healthy subscriber kept ~30 fps while the other was frozen.
        assert track.frames_received - before > 60
        os.kill(frozen.pid, signal.SIGCONT)
        await eventually(lambda: lines[-1] > stopped_at + 30, timeout=10)
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
        frozen.kill()
        frozen.wait()
        reader.cancel()
        await healthy.leave()
        await publisher.leave()


# --- admission ------------------------------------------------------------------------------


async def session_error(address: str, first: media_pb2.ClientMessage) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        call = media_pb2_grpc.MediaServiceStub(channel).Session()
        await call.write(first)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        return info.value


def hello(ticket: str) -> media_pb2.ClientMessage:
    return media_pb2.ClientMessage(hello=media_pb2.Hello(ticket=ticket))


async def test_a_session_is_admitted_only_with_a_fresh_ticket_for_this_node(
    redis_url: str,
) -> None:
    main = await start_server(make_config(redis_url=redis_url, node_id="node-a"))
    other = await start_server(
        make_config(redis_url=redis_url, services=("media",), node_id="node-b")
    )
    admin = Admin(main.address)
    try:
        tenant = Tenant(await admin.create_key())
        space_id = await admin.create_space()
        for first in (
            hello("garbage"),
            hello("a.b.c"),
            media_pb2.ClientMessage(leave=media_pb2.LeaveSession()),
        ):
            error = await session_error(main.address, first)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "ticket" in (error.details() or "")
        reply = await admin.presence.Join(
            presence_pb2.JoinRequest(token=tenant.token(space_id, "alice"))
        )
        wrong_node = other if reply.node_id == "node-a" else main
        error = await session_error(wrong_node.address, hello(reply.ticket))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        right_node = main if wrong_node is other else other
        async with grpc.aio.insecure_channel(right_node.address) as channel:
            call = media_pb2_grpc.MediaServiceStub(channel).Session()
            await call.write(hello(reply.ticket))
            joined = await call.read()
            assert joined.joined.participant_id == "alice"
            # A ticket is single use.
            error = await session_error(right_node.address, hello(reply.ticket))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            call.cancel()
    finally:
        await admin.close()
        await other.stop()
        await main.stop()


async def test_reconnect_gives_up_after_its_tries_and_says_so(world: tuple) -> None:
    server, _, tenant, space_id = world
    space = sdk.Space(
        tenant.token(space_id, "stranded"),
        server.address,
        reconnect_backoff=(0.1, 0.1, 0.1),
        reconnect_attempts=3,
    )
    events = space.events()
    await space.join()
    # The whole deployment disappears, without a word (an orderly stop of a single-process
    # server would tell the client "server stopping", and it would not try again).
    assert server._server is not None
    await server._server.stop(None)

    async def failed() -> sdk.ReconnectFailed | None:
        while (event := events.get_nowait()) is not None:
            if isinstance(event, sdk.ReconnectFailed):
                return event
            failed.tries += isinstance(event, sdk.Reconnecting)  # type: ignore[attr-defined]
        return None

    failed.tries = 0  # type: ignore[attr-defined]
    event = await eventually(failed, timeout=20)
    assert failed.tries == 3  # type: ignore[attr-defined]
    assert event.reason
    assert space.state == "failed"
    await space.leave()


async def test_publishers_are_told_the_configured_bitrate_cap(world: tuple) -> None:
    """The node announces SPACES_MAX_PUBLISH_BITRATE by REMB, never a figure derived from its
    own scheduling delay (which would throttle publishers whenever the node is busy)."""
    from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, unpack_remb_fci

    server, _, tenant, space_id = world
    publisher, _ = await connect(server, tenant, space_id, "capped")
    viewer, _ = await connect(server, tenant, space_id, "watching")
    try:
        local = await publisher.local.publish(TestPatternTrack((1, 100, 1)), "camera")
        sender = local._transceiver.sender
        seen: list[int] = []
        original = sender._handle_rtcp_packet

        async def record(packet: object) -> None:
            if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
                seen.append(unpack_remb_fci(packet.fci)[0])
            await original(packet)

        sender._handle_rtcp_packet = record
        await eventually(lambda: len(seen) >= 3, timeout=10)
        cap = server.config.node.max_publish_bitrate
        # REMB's mantissa/exponent encoding rounds the figure a little.
        assert all(abs(bitrate - cap) <= cap * 0.01 for bitrate in seen), seen
    finally:
        await publisher.leave()
        await viewer.leave()
