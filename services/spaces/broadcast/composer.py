"""``python -m spaces.broadcast.composer``: the process that streams one broadcast.

A broadcaster worker starts one per broadcast it holds (so decoding and encoding never run in
a media node's or a worker's event loop, and a stuck RTMP write can be ended by ending the
process). It joins the space as a hidden subscriber with tickets the worker gets from the store,
decodes what it receives (aiortc), composes the layout, mixes the audio and pushes H.264 + AAC
over RTMP (PyAV).

Protocol with the worker, JSON lines:

* stdin: first ``{"type": "job", ...}`` (see ``Job``); then ``{"type": "ticket", ...}`` or
  ``{"type": "ticket_error", "message"}`` answering a ticket request; ``{"type": "stop"}``.
* stdout: ``{"type": "status", ...}`` every second (the worker's watchdog and metrics), and
  ``{"type": "ticket_request"}`` whenever the session needs a (new) ticket.
* exit status 0 after a stop; ``EXIT_STALLED`` when the RTMP server stalled (start again).

It also dies with its worker (PR_SET_PDEATHSIG, and end of stdin), so a SIGKILLed worker never
leaves a second publisher behind on the RTMP server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from spaces.broadcast.compose import Compositor, Mixer, Scene, SourceClock
from spaces.broadcast.layouts import Subject
from spaces.broadcast.output import OutputSettings, Pipeline

logger = logging.getLogger("spaces.broadcast.composer")

EXIT_STALLED = 75
STATUS_INTERVAL_S = 1.0
SESSION_RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0)
MAX_SUBSCRIPTIONS = 20
DISPLAY_NAME = "broadcast"


@dataclass
class Job:
    broadcast_id: str
    space_id: str
    layout: str
    width: int
    height: int
    rtmp_url: str
    background: bytes = b""
    encoder: str = "libx264"
    encoder_options: dict[str, str] = field(default_factory=dict)
    video_kbps: int = 0
    audio_kbps: int = 128
    rtmp_timeout_s: float = 5.0
    retry_initial_s: float = 1.0
    retry_max_s: float = 30.0
    ice_addresses: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["background"] = base64.b64encode(self.background).decode()
        return {"type": "job", **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        data = {k: v for k, v in data.items() if k != "type"}
        data["background"] = base64.b64decode(data.get("background", ""))
        return cls(**data)


def die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when the worker that started it dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent and os.getppid() != parent:
        os._exit(1)  # the worker died before the death signal was armed


def emit(message: dict[str, Any]) -> None:
    """One line to the worker; os.write so that threads may call it too."""
    data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
    with contextlib.suppress(OSError):
        os.write(1, data)


class Composer:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.scene = Scene()
        self.mixer = Mixer()
        self.compositor = Compositor(job.layout, job.width, job.height, job.background)
        self.pipeline = Pipeline(
            OutputSettings(
                url=job.rtmp_url,
                width=job.width,
                height=job.height,
                encoder=job.encoder,
                encoder_options=dict(job.encoder_options),
                video_kbps=job.video_kbps,
                audio_kbps=job.audio_kbps,
                rtmp_timeout_s=job.rtmp_timeout_s,
                retry_initial_s=job.retry_initial_s,
                retry_max_s=job.retry_max_s,
            ),
            self.compositor,
            self.scene,
            self.mixer,
            self._stalled,
        )
        self._tickets: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._space: Any = None
        self.session_state = "joining"

    def _stalled(self, error: str) -> None:
        emit({"type": "status", **self._status(), "error": error, "stalled": True})
        os._exit(EXIT_STALLED)

    def _status(self) -> dict[str, Any]:
        stats = self.pipeline.stats
        return {
            "streaming": stats.streaming,
            "frames_composed": stats.frames_composed,
            "frames_dropped": stats.frames_dropped,
            "frames_lost": stats.frames_lost,
            "encoder_errors": stats.encoder_errors,
            "rtmp_errors": stats.rtmp_errors,
            "connects": stats.connects,
            "error": stats.last_error,
            "session": self.session_state,
            "participants": len(self.scene.subjects),
        }

    # --- the session ------------------------------------------------------------------------

    async def _ticket(self) -> Any:
        from spaces.sdk.client import SpacesClientError
        from spaces.v1 import participant_pb2, presence_pb2

        emit({"type": "ticket_request"})
        reply = await asyncio.wait_for(self._tickets.get(), 30)
        if reply.get("type") != "ticket":
            raise SpacesClientError("UNAVAILABLE", str(reply.get("message", "no ticket")))
        return presence_pb2.JoinResponse(
            space_id=reply["space_id"],
            participant_id=reply["participant_id"],
            connection_id=reply["connection_id"],
            role=participant_pb2.ROLE_SUBSCRIBER,
            media_address=reply["media_address"],
            node_id=reply["node_id"],
            ticket=reply["ticket"],
        )

    async def session_forever(self) -> None:
        from spaces.sdk import client as sdk

        attempt = 0
        while True:
            space = sdk.Space(
                "",
                join=self._ticket,
                ice_addresses=self.job.ice_addresses or None,
                max_subscriptions=MAX_SUBSCRIPTIONS,
                display_name=DISPLAY_NAME,
            )
            self._space = space
            events = space.events()
            try:
                self.session_state = "joining"
                await space.join()
                self.session_state = "joined"
                attempt = 0
                self._rebuild()
                for participant in space.participants.values():
                    for track in participant.tracks.values():
                        if track.subscribed:
                            self._follow(track)
                await self._handle(space, events)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("broadcast %s: session failed: %s", self.job.broadcast_id, exc)
            finally:
                events.close()
                self._clear()
                with contextlib.suppress(Exception):
                    await space.leave()
            self.session_state = "rejoining"
            await asyncio.sleep(SESSION_RETRY_S[min(attempt, len(SESSION_RETRY_S) - 1)])
            attempt += 1

    async def _handle(self, space: Any, events: Any) -> None:
        from spaces.sdk import client as sdk

        async for event in events:
            if isinstance(event, sdk.TrackSubscribed):
                self._follow(event.track)
            elif isinstance(event, sdk.TrackUnsubscribed | sdk.TrackUnpublished):
                self._unfollow(event.track)
            elif isinstance(event, sdk.ParticipantLeft):
                for track in event.participant.tracks.values():
                    self._unfollow(track)
            elif isinstance(event, sdk.ActiveSpeakersChanged):
                if event.participant_ids:
                    self.scene.speaker = event.participant_ids[0]
            elif isinstance(event, sdk.Disconnected | sdk.ReconnectFailed):
                return
            elif isinstance(event, sdk.Reconnecting):
                self.session_state = "reconnecting"
                self._clear()
            elif isinstance(event, sdk.Reconnected):
                self.session_state = "joined"
            self._rebuild()

    @staticmethod
    def _key(track: Any) -> str:
        if track.kind == "audio":
            return f"{track.participant_id}/audio/{track.id}"
        if track.source == "screenshare":
            return f"{track.participant_id}/screen"
        return str(track.participant_id)

    def _follow(self, track: Any) -> None:
        key = self._key(track)
        if track.id in self._readers:
            return
        self._readers[track.id] = asyncio.create_task(self._read(track, key), name=f"read-{key}")

    def _unfollow(self, track: Any) -> None:
        reader = self._readers.pop(track.id, None)
        if reader is not None:
            reader.cancel()
        key = self._key(track)
        if track.kind == "audio":
            self.mixer.remove(key)
        else:
            self.scene.video.pop(key, None)

    def _clear(self) -> None:
        for reader in self._readers.values():
            reader.cancel()
        self._readers.clear()
        self.scene.video.clear()
        for key in list(self.mixer._tracks):
            self.mixer.remove(key)

    async def _read(self, track: Any, key: str) -> None:
        audio = track.kind == "audio"
        clock = SourceClock()  # one per subscription: its frames' timestamps are one timeline
        async for frame in track.frames(buffer=50 if audio else 4):
            due = clock.due(frame, time.monotonic())
            if audio:
                self.mixer.push(key, frame, due)
            else:
                self.scene.push_video(key, due, frame)

    def _rebuild(self) -> None:
        space = self._space
        if space is None:
            return
        subjects: list[Subject] = []
        names: dict[str, str] = {}
        for p in list(space.participants.values()):
            if p.role == "subscriber":
                continue  # subscriber-role participants are hidden, as in Mux's layouts
            name = p.display_name or p.participant_id
            videos = [t for t in p.tracks.values() if t.kind == "video"]
            camera = next((t for t in videos if t.source != "screenshare"), None)
            screen = next((t for t in videos if t.source == "screenshare"), None)
            subjects.append(
                Subject(p.participant_id, has_video=camera is not None and not camera.muted)
            )
            names[p.participant_id] = name
            if screen is not None and not screen.muted:
                subjects.append(Subject(f"{p.participant_id}/screen", screen=True))
                names[f"{p.participant_id}/screen"] = f"{name} (screen)"
        keys = {s.key for s in subjects}
        if self.scene.speaker and self.scene.speaker not in keys:
            self.scene.speaker = ""
        self.scene.names = names
        self.scene.subjects = tuple(subjects)
        self.compositor.forget(keys)

    # --- the worker's side ------------------------------------------------------------------

    async def status_forever(self) -> None:
        while True:
            emit({"type": "status", **self._status()})
            await asyncio.sleep(STATUS_INTERVAL_S)

    async def commands(self, reader: asyncio.StreamReader) -> None:
        while True:
            line = await reader.readline()
            if not line:
                return  # the worker is gone
            message = json.loads(line)
            if message.get("type") in ("ticket", "ticket_error"):
                self._tickets.put_nowait(message)
            elif message.get("type") == "stop":
                return


async def main() -> int:
    die_with_parent(int(os.environ.get("SPACES_COMPOSER_PARENT", "0")))
    # The session's modules (aiortc, grpc), imported before the first status: seconds on a
    # busy machine, covered by the worker's start-up allowance rather than its watchdog.
    import spaces.sdk.client  # noqa: F401

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    first = await reader.readline()
    if not first:
        return 1
    job = Job.from_json(json.loads(first))
    composer = Composer(job)
    composer.pipeline.start()
    tasks = [
        # Status first: the session's imports hold the loop for a while on a busy machine.
        asyncio.create_task(composer.status_forever(), name="status"),
        asyncio.create_task(composer.session_forever(), name="session"),
    ]
    try:
        await composer.commands(reader)
    finally:
        for task in tasks:
            task.cancel()
        if composer._space is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(composer._space.leave(), 3)
        await asyncio.to_thread(composer.pipeline.stop)
        emit({"type": "status", **composer._status(), "stopped": True})
    return 0


def run() -> None:
    logging.basicConfig(
        level=os.environ.get("SPACES_LOG_LEVEL", "INFO").upper(),
        stream=sys.stderr,
        format="%(asctime)s composer[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aioice").setLevel(logging.WARNING)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when it ends
    sys.exit(asyncio.run(main()))


if __name__ == "__main__":
    run()
