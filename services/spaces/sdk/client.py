"""The Python client SDK: join a space, publish and receive media, events, auto-reconnect.

    space = Space(token, "presence.example.com:443", credentials=grpc.ssl_channel_credentials())
    me = await space.join()
    await me.publish(camera_track, "camera")
    async for event in space.events():
        ...

A Space talks to presence (Join) and then to its media node (MediaService.Session). If the
session drops, or the node tells it to move, it joins again with its resume secret, keeping its
participant_id, and republishes its tracks: up to five tries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaRelay
from aiortc.exceptions import InvalidStateError
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcconfiguration import RTCBundlePolicy, RTCIceTransportPolicy

from spaces.config import host_of, is_loopback_host
from spaces.media.aiortc_adapter import (
    IcePolicy,
    apply_ice_policy,
    pin_encoder_bitrate,
    tap_receiver,
)
from spaces.v1 import media_pb2, media_pb2_grpc, presence_pb2, presence_pb2_grpc

logger = logging.getLogger(__name__)

SOURCES = {
    "camera": media_pb2.TRACK_SOURCE_CAMERA,
    "microphone": media_pb2.TRACK_SOURCE_MICROPHONE,
    "screenshare": media_pb2.TRACK_SOURCE_SCREENSHARE,
    "screenshareaudio": media_pb2.TRACK_SOURCE_SCREENSHAREAUDIO,
    "other": media_pb2.TRACK_SOURCE_OTHER,
}
SOURCE_NAMES = {v: k for k, v in SOURCES.items()}
DEFAULT_BACKOFF = (0.5, 1.0, 2.0, 3.0, 4.0)
RETRYABLE_JOIN_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}
REQUEST_TIMEOUT_S = 20.0


# --- errors and events ----------------------------------------------------------------------


class SpacesClientError(Exception):
    """A request the server refused; ``code`` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ParticipantJoined:
    participant: RemoteParticipant


@dataclass(frozen=True)
class ParticipantLeft:
    participant: RemoteParticipant
    reason: str


@dataclass(frozen=True)
class TrackPublished:
    participant: RemoteParticipant
    track: RemoteTrack


@dataclass(frozen=True)
class TrackUnpublished:
    participant: RemoteParticipant
    track: RemoteTrack


@dataclass(frozen=True)
class TrackSubscribed:
    participant: RemoteParticipant
    track: RemoteTrack


@dataclass(frozen=True)
class TrackUnsubscribed:
    participant: RemoteParticipant
    track: RemoteTrack


@dataclass(frozen=True)
class TrackMuted:
    participant: RemoteParticipant
    track: RemoteTrack
    muted: bool


@dataclass(frozen=True)
class ActiveSpeakersChanged:
    participant_ids: list[str]
    levels: list[float]


@dataclass(frozen=True)
class CustomEventReceived:
    participant_id: str
    payload: str
    seq: int


@dataclass(frozen=True)
class DisplayNameChanged:
    participant_id: str
    display_name: str


@dataclass(frozen=True)
class BroadcastStateChanged:
    """A broadcast of the space was started or stopped (also sent right after joining while the
    space is being broadcast)."""

    broadcasting: bool
    broadcast_ids: list[str]


@dataclass(frozen=True)
class AudioOnlyChanged:
    """This client's link cannot carry even the lowest video layers of what it subscribes to:
    it receives audio only (``active``), until the estimate recovers (``active`` false)."""

    active: bool
    estimated_bitrate: int


@dataclass(frozen=True)
class Reconnecting:
    reason: str
    attempt: int


@dataclass(frozen=True)
class Reconnected:
    connection_id: str


@dataclass(frozen=True)
class ReconnectFailed:
    reason: str


@dataclass(frozen=True)
class Disconnected:
    """The session ended for good (left, removed, replaced, space deleted)."""

    reason: str
    message: str


VIDEO_QUALITIES = {
    "": media_pb2.VIDEO_QUALITY_UNSPECIFIED,
    "low": media_pb2.VIDEO_QUALITY_LOW,
    "medium": media_pb2.VIDEO_QUALITY_MEDIUM,
    "high": media_pb2.VIDEO_QUALITY_HIGH,
    "off": media_pb2.VIDEO_QUALITY_OFF,
}

SpaceEvent = (
    ParticipantJoined
    | ParticipantLeft
    | TrackPublished
    | TrackUnpublished
    | TrackSubscribed
    | TrackUnsubscribed
    | TrackMuted
    | ActiveSpeakersChanged
    | CustomEventReceived
    | DisplayNameChanged
    | BroadcastStateChanged
    | AudioOnlyChanged
    | Reconnecting
    | Reconnected
    | ReconnectFailed
    | Disconnected
)


# --- remote side ----------------------------------------------------------------------------


class RemoteTrack:
    """A track someone else publishes. Subscribed tracks receive decoded frames; the SDK reads
    them continuously (an unread aiortc track would buffer without bound) and keeps the latest
    frames for ``frames()`` consumers, who may skip frames if they are slow."""

    def __init__(self, participant_id: str, info: media_pb2.Track) -> None:
        self.participant_id = participant_id
        self.info = info
        self.subscribed = False
        self.frames_received = 0
        self.last_frame: Any = None
        self.packets_received = 0
        """RTP packets received; counted when the Space was made with decode=False."""
        self.packet_listeners: list[Any] = []
        """Callables given each RtpPacket, when the Space was made with decode=False."""
        self._consumers: list[asyncio.Queue[Any]] = []

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def kind(self) -> str:
        return "audio" if self.info.kind == media_pb2.TRACK_KIND_AUDIO else "video"

    @property
    def source(self) -> str:
        return SOURCE_NAMES.get(self.info.source, "other")

    @property
    def muted(self) -> bool:
        return self.info.muted

    def _on_packet(self, packet: Any) -> None:
        self.packets_received += 1
        for listener in self.packet_listeners:
            listener(packet)

    def _deliver(self, frame: Any) -> None:
        self.frames_received += 1
        self.last_frame = frame
        for queue in self._consumers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(frame)

    async def frames(self, buffer: int = 4) -> AsyncIterator[Any]:
        """Decoded frames (av.VideoFrame / av.AudioFrame) as they arrive."""
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=buffer)
        self._consumers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._consumers.remove(queue)


@dataclass
class RemoteParticipant:
    participant_id: str
    connection_id: str
    display_name: str
    role: str
    tracks: dict[str, RemoteTrack] = field(default_factory=dict)


# --- local side -----------------------------------------------------------------------------


@dataclass
class LocalTrack:
    source_track: MediaStreamTrack
    source: int
    name: str = ""
    width: int = 0
    height: int = 0
    muted: bool = False
    codec: str = ""
    """Preferred codec mime type, e.g. "video/H264"; empty for aiortc's default (VP8/opus)."""
    track_id: str = ""
    """Server-assigned once published."""
    mid: str = ""
    _transceiver: Any = None

    @property
    def kind(self) -> str:
        return str(self.source_track.kind)


class LocalParticipant:
    def __init__(self, space: Space) -> None:
        self._space = space

    @property
    def participant_id(self) -> str:
        return self._space.participant_id

    @property
    def connection_id(self) -> str:
        return self._space.connection_id

    @property
    def tracks(self) -> list[LocalTrack]:
        return list(self._space._local_tracks)

    async def publish(
        self,
        track: MediaStreamTrack,
        source: str = "camera",
        *,
        name: str = "",
        width: int = 0,
        height: int = 0,
        codec: str = "",
        muted: bool = False,
    ) -> LocalTrack:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}")
        local = LocalTrack(
            source_track=track,
            source=SOURCES[source],
            name=name,
            width=width,
            height=height,
            codec=codec,
            muted=muted,
        )
        space = self._space
        space._local_tracks.append(local)
        try:
            await space._negotiate_publisher()
        except SpacesClientError as exc:
            if exc.code == "UNAVAILABLE" and space.state == "reconnecting" and not space._left:
                return local  # the reconnect publishes it with the others
            space._local_tracks.remove(local)
            raise
        except BaseException:
            space._local_tracks.remove(local)
            raise
        return local

    async def unpublish(self, local: LocalTrack) -> None:
        self._space._local_tracks.remove(local)
        await self._space._negotiate_publisher()

    async def set_muted(self, local: LocalTrack, muted: bool) -> None:
        local.muted = muted
        await self._space._request(
            media_pb2.ClientMessage(
                set_muted=media_pb2.SetMuted(track_id=local.track_id, muted=muted)
            )
        )

    async def publish_custom_event(self, payload: str) -> None:
        await self._space._request(
            media_pb2.ClientMessage(custom_event=media_pb2.CustomEventRequest(payload=payload))
        )

    async def set_display_name(self, name: str) -> None:
        await self._space._request(
            media_pb2.ClientMessage(set_display_name=media_pb2.SetDisplayName(display_name=name))
        )
        self._space.display_name = name

    async def subscribe(self, participant_ids: Sequence[str]) -> None:
        """Manual mode: receive exactly these participants."""
        self._space._manual = set(participant_ids)
        await self._space._send_subscription()

    async def auto_subscribe(self, max_subscriptions: int = 0) -> None:
        self._space._manual = None
        if max_subscriptions:
            self._space.max_subscriptions = max_subscriptions
        await self._space._send_subscription()


# --- the space ------------------------------------------------------------------------------


class EventStream:
    """An async iterator of SpaceEvents that starts collecting when it is created."""

    def __init__(self, listeners: list[asyncio.Queue[SpaceEvent]]) -> None:
        self._listeners = listeners
        self._queue: asyncio.Queue[SpaceEvent] = asyncio.Queue(maxsize=10_000)
        listeners.append(self._queue)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> SpaceEvent:
        return await self._queue.get()

    def get_nowait(self) -> SpaceEvent | None:
        return None if self._queue.empty() else self._queue.get_nowait()

    def close(self) -> None:
        if self._queue in self._listeners:
            self._listeners.remove(self._queue)


class Space:
    def __init__(
        self,
        token: str,
        address: str = "127.0.0.1:50051",
        *,
        display_name: str = "",
        credentials: grpc.ChannelCredentials | None = None,
        ice_addresses: Sequence[str] | None = None,
        reconnect_attempts: int = 5,
        reconnect_backoff: Sequence[float] = DEFAULT_BACKOFF,
        publish_bitrate: int = 0,
        max_subscriptions: int = 0,
        decode: bool = True,
        ice_transport_policy: str = "all",
        join: Callable[[], Awaitable[presence_pb2.JoinResponse]] | None = None,
    ) -> None:
        """``ice_addresses``: local addresses ICE may use (default: every non-loopback
        address, or loopback when the server is on loopback). ``publish_bitrate``: pin video
        encoders to this bitrate instead of following the server's estimate. ``decode=False``:
        receive RTP packets only (``RemoteTrack.packet_listeners``), never decoding; for load
        generators and recorders. ``join``: get each session's ticket from this coroutine
        instead of PresenceService.Join (Spaces' own broadcaster workers, which hold no JWT).
        ``ice_transport_policy="relay"``: send media only through the TURN server that Join
        hands out (as a browser's ``iceTransportPolicy``)."""
        if ice_transport_policy not in ("all", "relay"):
            raise ValueError('ice_transport_policy must be "all" or "relay"')
        self._ice_transport_policy = RTCIceTransportPolicy(ice_transport_policy)
        self.token = token
        self._join = join
        self.broadcasting = False
        """True while a broadcast of the space is ACTIVE (BroadcastStateChanged)."""
        self.audio_only = False
        """Whether the node sends this client audio only (its link cannot carry video)."""
        self._video_qualities: dict[str, media_pb2.SetVideoQuality] = {}
        self.address = address
        self.display_name = display_name
        self._credentials = credentials
        self._ice_addresses = tuple(ice_addresses) if ice_addresses is not None else None
        self._reconnect_attempts = reconnect_attempts
        self._backoff = tuple(reconnect_backoff)
        self._publish_bitrate = publish_bitrate
        self.max_subscriptions = max_subscriptions
        self._manual: set[str] | None = None
        self.state = "new"
        self.participant_id = ""
        self.connection_id = ""
        self.node_id = ""
        self.space_id = ""
        self.join_response: presence_pb2.JoinResponse | None = None
        self.participants: dict[str, RemoteParticipant] = {}
        self.active_speakers: list[str] = []
        self.local = LocalParticipant(self)
        self._local_tracks: list[LocalTrack] = []
        self._relay = MediaRelay()
        self._resume_secret = ""
        self._listeners: list[asyncio.Queue[SpaceEvent]] = []
        self._presence_channel: grpc.aio.Channel | None = None
        self._media_channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._write_lock = asyncio.Lock()
        self._publish_lock = asyncio.Lock()
        self._request_ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[media_pb2.ServerMessage]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._publisher_pc: RTCPeerConnection | None = None
        self._subscriber_pc: RTCPeerConnection | None = None
        self._mid_owner: dict[str, RemoteTrack] = {}
        self._drains: dict[str, asyncio.Task[None]] = {}
        self._reconnecting: asyncio.Task[None] | None = None
        self._ended_while_connecting = ""
        self._left = False
        self._decode = decode
        self.reconnects = 0
        self._lost_node = ""
        """The node whose session broke without a Closing: named in the next Join, so that
        presence checks at once whether it died instead of placing us on it again."""

    # --- public --------------------------------------------------------------------------

    async def join(self) -> LocalParticipant:
        self.state = "joining"
        await self._connect()
        if self.state == "joining":  # not already reconnecting from a session that just ended
            self.state = "joined"
        return self.local

    async def leave(self) -> None:
        """Leave cleanly: the participant_id is free at once. Also call it after the session
        ended on its own (removed, reconnect failed): it releases the connections."""
        if not self._left:
            self._left = True
            if self._reconnecting is not None:
                self._reconnecting.cancel()
            if self._call is not None and self.state == "joined":
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self._request(media_pb2.ClientMessage(leave=media_pb2.LeaveSession())), 5
                    )
            self.state = "left"
            await self._teardown()
        channels = (self._presence_channel, self._media_channel)
        self._presence_channel = self._media_channel = None
        for channel in channels:
            if channel is not None:
                await channel.close()

    def events(self) -> EventStream:
        """Events from now on (subscribe before join() to see everyone already there)."""
        return EventStream(self._listeners)

    async def set_video_quality(
        self, track: RemoteTrack | str, quality: str = "", *, width: int = 0, height: int = 0
    ) -> None:
        """The most this client wants of a remote video track: ``quality`` "low", "medium",
        "high", "off" (none of its video) or "" (no limit), and/or the size it is rendered at
        (the node then sends the smallest simulcast layer that covers it). The node sends the
        best layer within it that this client's bandwidth carries. Kept across reconnects."""
        track_id = track if isinstance(track, str) else track.id
        if quality not in VIDEO_QUALITIES:
            raise ValueError("quality must be low, medium, high, off or empty")
        request = media_pb2.SetVideoQuality(
            track_id=track_id, quality=VIDEO_QUALITIES[quality], width=width, height=height
        )
        self._video_qualities[track_id] = request
        await self._request(media_pb2.ClientMessage(set_video_quality=request))

    def remote_track(self, participant_id: str, source: str) -> RemoteTrack | None:
        participant = self.participants.get(participant_id)
        if participant is None:
            return None
        return next((t for t in participant.tracks.values() if t.source == source), None)

    # --- connecting ------------------------------------------------------------------------

    def _channel(self, address: str) -> grpc.aio.Channel:
        options = [("grpc.keepalive_time_ms", 15_000), ("grpc.keepalive_timeout_ms", 5_000)]
        if self._credentials is not None:
            return grpc.aio.secure_channel(address, self._credentials, options=options)
        return grpc.aio.insecure_channel(address, options=options)

    def _ice_policy(self) -> IcePolicy:
        if self._ice_addresses is not None:
            return IcePolicy(bind_addresses=self._ice_addresses)
        if self.join_response and is_loopback_host(host_of(self.join_response.media_address)):
            return IcePolicy(bind_addresses=("127.0.0.1",))
        return IcePolicy()

    def _new_pc(self) -> RTCPeerConnection:
        servers = [
            RTCIceServer(
                urls=list(s.urls), username=s.username or None, credential=s.credential or None
            )
            for s in (self.join_response.ice_servers if self.join_response else [])
        ]
        pc = RTCPeerConnection(
            RTCConfiguration(
                iceServers=servers,
                bundlePolicy=RTCBundlePolicy.MAX_BUNDLE,
                iceTransportPolicy=self._ice_transport_policy,
            )
        )

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "failed" and not self._left:
                self._start_reconnect("media connection failed")

        return pc

    async def _connect(self) -> None:
        if self._presence_channel is None:
            self._presence_channel = self._channel(self.address)
        presence = presence_pb2_grpc.PresenceServiceStub(self._presence_channel)
        if self._join is not None:
            response = await self._join()
        else:
            response = await presence.Join(
                presence_pb2.JoinRequest(
                    token=self.token,
                    display_name=self.display_name,
                    resume_secret=self._resume_secret,
                    unreachable_node_id=self._lost_node,
                ),
                timeout=REQUEST_TIMEOUT_S,
            )
        self._lost_node = ""  # reported; a new failure reports again
        self.join_response = response
        self._resume_secret = response.resume_secret
        self.participant_id = response.participant_id
        self.connection_id = response.connection_id
        self.node_id = response.node_id
        self.space_id = response.space_id
        if self._media_channel is not None:
            await self._media_channel.close()
        self._media_channel = self._channel(response.media_address)
        stub = media_pb2_grpc.MediaServiceStub(self._media_channel)
        call = stub.Session()
        await call.write(
            media_pb2.ClientMessage(
                hello=media_pb2.Hello(ticket=response.ticket, client="spaces-python")
            )
        )
        first = await asyncio.wait_for(call.read(), REQUEST_TIMEOUT_S)
        if first is grpc.aio.EOF or first.WhichOneof("message") != "joined":
            raise SpacesClientError("UNAVAILABLE", "media node did not accept the session")
        self._call = call
        self._apply_joined(first.joined)
        self._reader = asyncio.create_task(self._read(call), name="space-reader")
        if self._manual is not None or self.max_subscriptions:
            await self._send_subscription()
        for request in list(self._video_qualities.values()):
            await self._write(media_pb2.ClientMessage(set_video_quality=request))
        if self._local_tracks:
            await self._negotiate_publisher()

    def _apply_joined(self, joined: media_pb2.Joined) -> None:
        seen = set()
        for info in joined.participants:
            seen.add(info.participant_id)
            if info.participant_id not in self.participants:
                participant = self._remote(info)
                self._emit(ParticipantJoined(participant))
                for track in participant.tracks.values():
                    self._emit(TrackPublished(participant, track))
            else:
                participant = self.participants[info.participant_id]
                participant.connection_id = info.connection_id
                known = set(participant.tracks)
                for track_info in info.tracks:
                    if track_info.id not in participant.tracks:
                        track = RemoteTrack(info.participant_id, track_info)
                        participant.tracks[track.id] = track
                        self._emit(TrackPublished(participant, track))
                    known.discard(track_info.id)
                for track_id in known:
                    self._emit(TrackUnpublished(participant, participant.tracks.pop(track_id)))
        for participant_id in list(self.participants):
            if participant_id not in seen:
                gone = self.participants.pop(participant_id)
                self._emit(ParticipantLeft(gone, "left"))

    def _remote(self, info: media_pb2.RemoteParticipant) -> RemoteParticipant:
        participant = RemoteParticipant(
            participant_id=info.participant_id,
            connection_id=info.connection_id,
            display_name=info.display_name,
            role="subscriber" if info.role == 2 else "publisher",
        )
        for track_info in info.tracks:
            participant.tracks[track_info.id] = RemoteTrack(info.participant_id, track_info)
        self.participants[info.participant_id] = participant
        return participant

    def _emit(self, event: SpaceEvent) -> None:
        for queue in self._listeners:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)

    # --- the signaling stream ----------------------------------------------------------------

    async def _write(self, message: media_pb2.ClientMessage) -> None:
        if self._call is None:
            raise SpacesClientError("UNAVAILABLE", "not connected")
        call = self._call
        async with self._write_lock:
            try:
                await call.write(message)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                # The node ended the stream (its reason arrives through the reader).
                raise SpacesClientError("UNAVAILABLE", "session ended") from exc

    async def _request(self, message: media_pb2.ClientMessage) -> media_pb2.ServerMessage:
        request_id = next(self._request_ids)
        message.request_id = request_id
        future: asyncio.Future[media_pb2.ServerMessage] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self._write(message)
            reply = await asyncio.wait_for(future, REQUEST_TIMEOUT_S)
        finally:
            self._pending.pop(request_id, None)
        if reply.WhichOneof("message") == "error":
            raise SpacesClientError(reply.error.code, reply.error.message)
        return reply

    async def _read(self, call: Any) -> None:
        """Read the session stream. Messages are handled in order by a separate task, so that
        this one is always reading: a ``closing`` (and its reason) is seen even while an offer
        is being answered, and a write that fails because the node ended the stream (grpc then
        fails later reads too) cannot hide it."""
        reason = "session stream ended"
        told = False
        inbox: asyncio.Queue[media_pb2.ServerMessage] = asyncio.Queue()
        handler = asyncio.create_task(self._handle_all(call, inbox), name="space-handler")
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    break
                if message.WhichOneof("message") == "closing":
                    closing = message.closing
                    name = media_pb2.CloseReason.Name(closing.reason)
                    reason = name.removeprefix("CLOSE_REASON_").lower()
                    told = True
                    if not closing.rejoin:
                        handler.cancel()
                        await self._finish(reason, closing.message)
                        return
                    break
                inbox.put_nowait(message)
        except grpc.aio.AioRpcError as exc:
            reason = f"session failed: {exc.code().name.lower()}"
        except asyncio.CancelledError:
            return
        finally:
            handler.cancel()
        if self._call is call:
            self._fail_pending()  # their replies will not come: fail them now, not on timeout
        if not self._left and self._call is call:
            if not told:
                # The stream broke without a Closing: the node may be dead.
                self._lost_node = self.node_id
            self._start_reconnect(reason)

    async def _handle_all(self, call: Any, inbox: asyncio.Queue[media_pb2.ServerMessage]) -> None:
        while True:
            message = await inbox.get()
            try:
                await self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._left or self._call is not call:
                    return
                if isinstance(exc, grpc.aio.AioRpcError | SpacesClientError):
                    # The stream ended under us; the reader reports why and reconnects.
                    logger.debug("space: %s not answered: %s", message.WhichOneof("message"), exc)
                    return
                logger.exception("space: handling %s failed", message.WhichOneof("message"))

    async def _dispatch(self, message: media_pb2.ServerMessage) -> None:
        kind = message.WhichOneof("message")
        if message.request_id and kind in ("ack", "error", "publish_answer"):
            future = self._pending.get(message.request_id)
            if future is not None and not future.done():
                future.set_result(message)
            elif kind == "error":
                logger.warning("space: %s", message.error.message)
            return
        participant: RemoteParticipant | None
        if kind == "subscriber_offer":
            await self._on_subscriber_offer(message.subscriber_offer)
        elif kind == "participant_joined":
            info = message.participant_joined.participant
            participant = self._remote(info)
            self._emit(ParticipantJoined(participant))
            for track in participant.tracks.values():
                self._emit(TrackPublished(participant, track))
        elif kind == "participant_left":
            left = message.participant_left
            gone = self.participants.get(left.participant_id)
            if gone is not None and gone.connection_id == left.connection_id:
                del self.participants[left.participant_id]
                self._emit(ParticipantLeft(gone, left.reason))
        elif kind == "track_published":
            event = message.track_published
            participant = self.participants.get(event.participant_id)
            if participant is not None:
                track = RemoteTrack(event.participant_id, event.track)
                participant.tracks[track.id] = track
                self._emit(TrackPublished(participant, track))
        elif kind == "track_unpublished":
            event_u = message.track_unpublished
            participant = self.participants.get(event_u.participant_id)
            if participant is not None and event_u.track_id in participant.tracks:
                track = participant.tracks.pop(event_u.track_id)
                self._emit(TrackUnpublished(participant, track))
        elif kind == "track_muted":
            event_m = message.track_muted
            participant = self.participants.get(event_m.participant_id)
            if participant is not None and event_m.track_id in participant.tracks:
                track = participant.tracks[event_m.track_id]
                track.info.muted = event_m.muted
                self._emit(TrackMuted(participant, track, event_m.muted))
        elif kind == "active_speakers":
            speakers = message.active_speakers.speakers
            self.active_speakers = [s.participant_id for s in speakers]
            self._emit(ActiveSpeakersChanged(self.active_speakers, [s.level for s in speakers]))
        elif kind == "custom_event":
            event_c = message.custom_event
            self._emit(CustomEventReceived(event_c.participant_id, event_c.payload, event_c.seq))
        elif kind == "broadcast_state":
            state = message.broadcast_state
            self.broadcasting = state.broadcasting
            self._emit(BroadcastStateChanged(state.broadcasting, list(state.broadcast_ids)))
        elif kind == "audio_only":
            self.audio_only = message.audio_only.active
            self._emit(
                AudioOnlyChanged(message.audio_only.active, message.audio_only.estimated_bitrate)
            )
        elif kind == "display_name_changed":
            event_d = message.display_name_changed
            participant = self.participants.get(event_d.participant_id)
            if participant is not None:
                participant.display_name = event_d.display_name
            self._emit(DisplayNameChanged(event_d.participant_id, event_d.display_name))

    # --- publishing --------------------------------------------------------------------------

    async def _negotiate_publisher(self) -> None:
        async with self._publish_lock:
            pc = self._publisher_pc
            if pc is None:
                pc = self._publisher_pc = self._new_pc()
            try:
                await self._offer_publisher(pc)
            except SpacesClientError:
                raise
            except Exception as exc:
                # A reconnect tore the session down during an await (aiortc then fails in
                # assorted ways); it publishes every local track again on the new session.
                if pc is not self._publisher_pc:
                    raise SpacesClientError(
                        "UNAVAILABLE", "session ended while publishing"
                    ) from exc
                raise

    async def _offer_publisher(self, pc: RTCPeerConnection) -> None:
        wanted = list(self._local_tracks)
        attached = {id(t._transceiver) for t in wanted if t._transceiver is not None}
        for transceiver in pc.getTransceivers():
            if id(transceiver) not in attached and transceiver.direction != "inactive":
                transceiver.direction = "inactive"
                transceiver.sender.replaceTrack(None)
        for local in wanted:
            if local._transceiver is not None:
                continue
            proxy = self._relay.subscribe(local.source_track, buffered=local.kind == "audio")
            reusable = next(
                (
                    t
                    for t in pc.getTransceivers()
                    if t.kind == local.kind and t.direction == "inactive" and id(t) not in attached
                ),
                None,
            )
            if reusable is not None:
                reusable.direction = "sendonly"
                reusable.sender.replaceTrack(proxy)
                transceiver = reusable
            else:
                transceiver = pc.addTransceiver(proxy, direction="sendonly")
            if local.codec:
                caps = [
                    c
                    for c in RTCRtpSender.getCapabilities(local.kind).codecs
                    if c.mimeType.lower() == local.codec.lower()
                ]
                if not caps:
                    raise ValueError(f"codec {local.codec} is not supported")
                transceiver.setCodecPreferences(caps)
            if self._publish_bitrate and local.kind == "video":
                pin_encoder_bitrate(transceiver.sender, self._publish_bitrate)
            local._transceiver = transceiver
            attached.add(id(transceiver))
        apply_ice_policy(pc, self._ice_policy())
        offer = await pc.createOffer()
        await pc.setLocalDescription(offer)
        for local in wanted:
            local.mid = local._transceiver.mid or ""
        description = pc.localDescription
        reply = await self._request(
            media_pb2.ClientMessage(
                publish_offer=media_pb2.PublishOffer(
                    offer=media_pb2.SessionDescription(type=description.type, sdp=description.sdp),
                    tracks=[
                        media_pb2.PublishedTrack(
                            mid=local.mid,
                            source=local.source,  # type: ignore[arg-type]
                            muted=local.muted,
                            width=local.width,
                            height=local.height,
                            name=local.name,
                        )
                        for local in wanted
                    ],
                )
            )
        )
        answer = reply.publish_answer
        await pc.setRemoteDescription(
            RTCSessionDescription(sdp=answer.answer.sdp, type=answer.answer.type)
        )
        by_mid = {result.mid: result.track for result in answer.tracks}
        for local in wanted:
            if local.mid in by_mid:
                local.track_id = by_mid[local.mid].id

    # --- subscribing -------------------------------------------------------------------------

    async def _send_subscription(self) -> None:
        if self._call is None:
            return
        request = media_pb2.SetSubscription(
            mode=(
                media_pb2.SUBSCRIPTION_MODE_MANUAL
                if self._manual is not None
                else media_pb2.SUBSCRIPTION_MODE_AUTO
            ),
            participant_ids=sorted(self._manual or ()),
            max_subscriptions=self.max_subscriptions,
        )
        await self._request(media_pb2.ClientMessage(set_subscription=request))

    async def _on_subscriber_offer(self, offer: media_pb2.SubscriberOffer) -> None:
        pc = self._subscriber_pc
        if pc is None:
            pc = self._subscriber_pc = self._new_pc()
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer.offer.sdp, type="offer"))
            apply_ice_policy(pc, self._ice_policy())
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except InvalidStateError:
            if self._subscriber_pc is not pc:
                return  # a reconnect closed this connection meanwhile: its offer is moot
            raise
        description = pc.localDescription
        await self._write(
            media_pb2.ClientMessage(
                subscriber_answer=media_pb2.SubscriberAnswer(
                    answer=media_pb2.SessionDescription(type=description.type, sdp=description.sdp),
                    version=offer.version,
                )
            )
        )
        torn_down = self._subscriber_pc is not pc  # a reconnect, meanwhile
        if torn_down:
            return  # this connection's tracks are gone with it
        transceivers = {t.mid: t for t in pc.getTransceivers()}
        now_owned: dict[str, RemoteTrack] = {}
        for sub in offer.tracks:
            participant = self.participants.get(sub.participant_id)
            track = participant.tracks.get(sub.track_id) if participant else None
            transceiver = transceivers.get(sub.mid)
            if track is None or transceiver is None:
                continue
            now_owned[sub.mid] = track
            if sub.mid not in self._drains:
                if not self._decode:
                    route = functools.partial(self._route_packet, sub.mid)
                    # Spaces media nodes ignore subscribers' REMB (no simulcast to pick from),
                    # so a packet-only client skips the estimator's cost.
                    tap_receiver(transceiver.receiver, route, estimate_bandwidth=False)
                self._drains[sub.mid] = asyncio.create_task(
                    self._drain(sub.mid, transceiver.receiver.track), name=f"drain-{sub.mid}"
                )
        for mid, track in self._mid_owner.items():
            if now_owned.get(mid) is not track and track.subscribed:
                track.subscribed = False
                participant = self.participants.get(track.participant_id)
                if participant is not None:
                    self._emit(TrackUnsubscribed(participant, track))
        previous = self._mid_owner
        self._mid_owner = now_owned
        for mid, track in now_owned.items():
            if previous.get(mid) is not track:
                track.subscribed = True
                participant = self.participants.get(track.participant_id)
                if participant is not None:
                    self._emit(TrackSubscribed(participant, track))

    def _route_packet(self, mid: str, packet: Any) -> None:
        owner = self._mid_owner.get(mid)
        if owner is not None:
            owner._on_packet(packet)

    async def _drain(self, mid: str, media: MediaStreamTrack) -> None:
        """Read every frame of one receiving m-section, for whichever track it carries now."""
        try:
            while True:
                frame = await media.recv()
                owner = self._mid_owner.get(mid)
                if owner is not None:
                    owner._deliver(frame)
        except (MediaStreamError, asyncio.CancelledError):
            return

    # --- reconnecting ------------------------------------------------------------------------

    def _start_reconnect(self, reason: str) -> None:
        if self._left:
            return
        if self._reconnecting is not None and not self._reconnecting.done():
            # The session a reconnect is still setting up ended already: it goes on trying.
            self._ended_while_connecting = reason
            return
        self._reconnecting = asyncio.create_task(self._reconnect(reason), name="reconnect")

    async def _reconnect(self, reason: str) -> None:
        self.state = "reconnecting"
        await self._teardown()
        failure = reason
        for attempt, delay in enumerate(self._backoff[: self._reconnect_attempts], start=1):
            self._emit(Reconnecting(reason, attempt))
            await asyncio.sleep(delay)
            self._ended_while_connecting = ""
            try:
                await self._connect()
            except grpc.aio.AioRpcError as exc:
                failure = f"{exc.code().name.lower()}: {exc.details()}"
                await self._teardown()
                if exc.code() not in RETRYABLE_JOIN_CODES and not (
                    exc.code() == grpc.StatusCode.UNAUTHENTICATED and "ticket" in failure
                ):
                    break
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the new session failed while being set up
                if self._left:
                    return  # it was closed for good meanwhile (_finish) or left
                failure = str(exc) or type(exc).__name__
                await self._teardown()
                continue
            if self._left:
                return
            if self._ended_while_connecting or self._reader is None or self._reader.done():
                failure = reason = self._ended_while_connecting or "session stream ended"
                await self._teardown()
                continue
            self.state = "joined"
            self.reconnects += 1
            self._emit(Reconnected(self.connection_id))
            return
        self.state = "failed"
        self._emit(ReconnectFailed(failure))

    async def _finish(self, reason: str, message: str) -> None:
        self.state = "closed"
        self._left = True
        # Said before the teardown, which a concurrent leave() may cut short.
        self._emit(Disconnected(reason, message))
        await self._teardown(keep_reader=True)

    def _fail_pending(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(SpacesClientError("UNAVAILABLE", "session ended"))

    async def _teardown(self, keep_reader: bool = False) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        if (
            self._reader is not None
            and not keep_reader
            and self._reader is not asyncio.current_task()
        ):
            self._reader.cancel()
        self._fail_pending()
        for task in self._drains.values():
            task.cancel()
        self._drains.clear()
        for track in self._mid_owner.values():
            track.subscribed = False
        self._mid_owner = {}
        pcs = [pc for pc in (self._publisher_pc, self._subscriber_pc) if pc is not None]
        self._publisher_pc = self._subscriber_pc = None
        for local in self._local_tracks:
            local._transceiver = None
            local.track_id = ""
        if pcs:
            # Shielded: a peer connection whose close() is cancelled half way never closes.
            await asyncio.shield(
                asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)
            )
