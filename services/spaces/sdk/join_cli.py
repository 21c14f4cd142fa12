"""`spaces join`: join a space, optionally publish, print events, report frames per track."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import sys
import time
from pathlib import Path

import grpc

from spaces.sdk import client as sdk
from spaces.sdk.media import TestPatternTrack, ToneTrack, color_for


def _describe(event: sdk.SpaceEvent) -> str:
    name = type(event).__name__
    if isinstance(event, sdk.ParticipantJoined | sdk.ParticipantLeft):
        return f"{name} {event.participant.participant_id}"
    if isinstance(event, sdk.TrackPublished | sdk.TrackUnpublished | sdk.TrackSubscribed):
        return f"{name} {event.participant.participant_id} {event.track.source} {event.track.id}"
    if isinstance(event, sdk.TrackUnsubscribed):
        return f"{name} {event.participant.participant_id} {event.track.source}"
    if isinstance(event, sdk.TrackMuted):
        return f"{name} {event.participant.participant_id} {event.track.source} {event.muted}"
    if isinstance(event, sdk.ActiveSpeakersChanged):
        return f"{name} {','.join(event.participant_ids) or '-'}"
    if isinstance(event, sdk.CustomEventReceived):
        return f"{name} #{event.seq} from {event.participant_id}: {event.payload}"
    return f"{name} {event}"


def _report(space: sdk.Space) -> None:
    print("frames received:", flush=True)
    any_track = False
    for participant in space.participants.values():
        for track in participant.tracks.values():
            any_track = True
            print(
                f"  {participant.participant_id} {track.source:<12} {track.kind:<5} "
                f"frames={track.frames_received}",
                flush=True,
            )
    if not any_track:
        print("  (no remote tracks)", flush=True)


async def run_join(args: argparse.Namespace) -> int:
    credentials = None
    if args.tls:
        root = Path(args.ca_file).read_bytes() if args.ca_file else None  # noqa: ASYNC240
        credentials = grpc.ssl_channel_credentials(root_certificates=root)
    space = sdk.Space(
        args.token,
        args.server,
        display_name=args.display_name,
        credentials=credentials,
        ice_transport_policy="relay" if getattr(args, "relay", False) else "all",
    )
    events = space.events()
    try:
        me = await space.join()
    except grpc.aio.AioRpcError as exc:
        print(f"join failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(
        f"joined space {space.space_id} as {me.participant_id} on node {space.node_id}", flush=True
    )
    if args.test_pattern or args.file:
        if args.file:
            from aiortc.contrib.media import MediaPlayer

            player = MediaPlayer(args.file)
            if player.video is not None:
                await me.publish(player.video, "camera")
            if player.audio is not None:
                await me.publish(player.audio, "microphone")
        else:
            seed = hashlib.sha256(me.participant_id.encode()).digest()[0]
            await me.publish(TestPatternTrack(color_for(me.participant_id)), "camera")
            await me.publish(ToneTrack(300 + seed, 0.2), "microphone")
        print(f"publishing {len(me.tracks)} track(s)", flush=True)

    async def show() -> None:
        async for event in events:
            print(f"event {_describe(event)}", flush=True)
            if isinstance(event, sdk.Disconnected | sdk.ReconnectFailed):
                return

    printer = asyncio.create_task(show())
    started = time.monotonic()
    try:
        while args.duration <= 0 or time.monotonic() - started < args.duration:
            if printer.done():
                break
            await asyncio.sleep(0.2)
    finally:
        _report(space)
        printer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await printer
        events.close()
        await space.leave()
    return 0
