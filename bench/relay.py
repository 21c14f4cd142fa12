"""The baseline: what an SFU built the obvious aiortc way costs. One publisher's track is
received (aiortc always decodes it) and fanned out with ``aiortc.contrib.media.MediaRelay``,
so every subscriber's sender encodes its own copy. Encoders are pinned to the publisher's
bitrate, as the Spaces run's publisher is, so both systems carry the same stream.

Signaling is a plain HTTP POST of the SDP offer (aiortc's examples do the same):
``/publish`` for the one publisher, ``/subscribe`` for each subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError

from bench.ipc import Channel
from bench.peers import LOOPBACK_ICE, VIDEO_BITRATE, new_pc
from spaces.media.aiortc_adapter import apply_ice_policy, pin_encoder_bitrate

logger = logging.getLogger(__name__)


class RelayServer:
    def __init__(self) -> None:
        self.relay = MediaRelay()
        self.source: MediaStreamTrack | None = None
        self.source_ready = asyncio.Event()
        self.pcs: set[RTCPeerConnection] = set()
        self._drain: asyncio.Task[None] | None = None

    async def _answer(self, pc: RTCPeerConnection) -> web.Response:
        apply_ice_policy(pc, LOOPBACK_ICE)
        await pc.setLocalDescription(await pc.createAnswer())
        return web.json_response({"sdp": pc.localDescription.sdp, "type": "answer"})

    async def publish(self, request: web.Request) -> web.Response:
        params = await request.json()
        pc = new_pc()
        self.pcs.add(pc)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video" and self.source is None:
                self.source = track
                # Read the source from the start: an unread aiortc track buffers forever.
                self._drain = asyncio.create_task(self._discard(self.relay.subscribe(track)))
                self.source_ready.set()

        await pc.setRemoteDescription(RTCSessionDescription(sdp=params["sdp"], type="offer"))
        return await self._answer(pc)

    async def subscribe(self, request: web.Request) -> web.Response:
        params = await request.json()
        await asyncio.wait_for(self.source_ready.wait(), 30)
        assert self.source is not None
        pc = new_pc()
        self.pcs.add(pc)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=params["sdp"], type="offer"))
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "video":
                transceiver.direction = "sendonly"
                # Unbuffered: a relay that cannot keep up skips frames instead of queueing them.
                transceiver.sender.replaceTrack(self.relay.subscribe(self.source, buffered=False))
                pin_encoder_bitrate(transceiver.sender, VIDEO_BITRATE)
        return await self._answer(pc)

    @staticmethod
    async def _discard(track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                await track.recv()

    async def close(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
        await asyncio.gather(*(pc.close() for pc in self.pcs), return_exceptions=True)


async def run(config: dict[str, Any], channel: Channel) -> None:
    server = RelayServer()
    app = web.Application()
    app.router.add_post("/publish", server.publish)
    app.router.add_post("/subscribe", server.subscribe)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    channel.send({"ready": True, "url": f"http://127.0.0.1:{port}"})

    async def stop(_: dict[str, Any]) -> dict[str, Any]:
        await server.close()
        await runner.cleanup()
        return {}

    async def peers(_: dict[str, Any]) -> dict[str, Any]:
        return {"peers": len(server.pcs)}

    await channel.serve({"stop": stop, "peers": peers})
