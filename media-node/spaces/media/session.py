"""One participant's session on a media node: the signaling stream and its two peer connections.

* The **publishing** connection is offered by the client. Each PublishOffer carries the full list
  of tracks it sends (mid -> source); what is missing is unpublished. The node answers with one
  codec per track and taps each receiver into a forwarder.
* The **subscribing** connection is offered by the node. The room decides which tracks this
  session should receive; the node adds, reuses or deactivates sendonly transceivers and sends a
  versioned SubscriberOffer, one at a time.

Errors in a request come back as a non-fatal SessionError and the session continues; closing
sends a Closing message that says whether the client should join again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcconfiguration import RTCBundlePolicy

from spaces import errors, ids
from spaces.media.aiortc_adapter import (
    Codec,
    PlaceholderTrack,
    RtpSink,
    hook_sender,
    parse_sdp,
    prefer_codec,
    request_keyframe,
    restrict_codecs,
    tap_receiver,
)
from spaces.media.forwarding import DownTrack, SenderState, TrackForwarder
from spaces.media.room import PublishedTrack, Room
from spaces.store.base import Claim
from spaces.store.codec import ROLES_BY_NAME
from spaces.tasks import spawn, wait_event
from spaces.v1 import media_pb2

if TYPE_CHECKING:
    from aiortc import RTCRtpTransceiver

    from spaces.media.node import MediaNode

logger = logging.getLogger(__name__)

MAX_SDP_BYTES = 128 * 1024
OUTBOX_LIMIT = 1024
ANSWER_TIMEOUT_S = 20.0
MAX_SUBSCRIPTIONS_CEILING = 20

VIDEO_SOURCES = {media_pb2.TRACK_SOURCE_CAMERA, media_pb2.TRACK_SOURCE_SCREENSHARE}
AUDIO_SOURCES = {media_pb2.TRACK_SOURCE_MICROPHONE, media_pb2.TRACK_SOURCE_SCREENSHAREAUDIO}

CLOSE_REJOIN: dict[int, bool] = {
    media_pb2.CLOSE_REASON_MIGRATE: True,
    media_pb2.CLOSE_REASON_LEASE_LOST: True,
    media_pb2.CLOSE_REASON_TRANSPORT_FAILED: True,
    media_pb2.CLOSE_REASON_ERROR: True,
}

STORE_REASONS: dict[str, int] = {
    "removed": media_pb2.CLOSE_REASON_REMOVED,
    "replaced": media_pb2.CLOSE_REASON_REPLACED,
    "duplicate": media_pb2.CLOSE_REASON_REPLACED,
    "space_deleted": media_pb2.CLOSE_REASON_SPACE_DELETED,
    "left": media_pb2.CLOSE_REASON_LEFT,
    "moved": media_pb2.CLOSE_REASON_MIGRATE,
}


def close_reason_for(store_reason: str) -> int:
    """The CloseReason for a connection the store no longer has (see store.keys.gone_key)."""
    return STORE_REASONS.get(store_reason, media_pb2.CLOSE_REASON_LEASE_LOST)


def close_reason_name(reason: int) -> str:
    """CLOSE_REASON_MIGRATE -> "migrate"."""
    return media_pb2.CloseReason.Name(reason).removeprefix("CLOSE_REASON_").lower()  # type: ignore[arg-type]


def allowed_codec(codec: Codec) -> bool:
    """Opus audio, VP8 video, and H264 in packetization mode 1 (what browsers send)."""
    name = codec.name
    if name == "OPUS":
        return True
    if name == "VP8":
        return True
    return name == "H264" and str(codec.parameters.get("packetization-mode", "0")) == "1"


def source_fits(source: int, kind: str) -> bool:
    if source in VIDEO_SOURCES:
        return kind == "video"
    if source in AUDIO_SOURCES:
        return kind == "audio"
    return source == media_pb2.TRACK_SOURCE_OTHER


class RateLimiter:
    """Token bucket: ``rate`` per second, bursts up to ``rate``."""

    def __init__(self, rate: float) -> None:
        self._rate = max(rate, 0.001)
        self._tokens = self._rate
        self._at = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._rate, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


@dataclass
class Subscription:
    track: PublishedTrack
    transceiver: RTCRtpTransceiver
    downtrack: DownTrack | None = None


class Session:
    def __init__(self, node: MediaNode, room: Room, claim: Claim) -> None:
        self.node = node
        self.room = room
        participant = claim.participant
        self.space_id = participant.space_id
        self.connection_id = participant.connection_id
        self.participant_id = participant.participant_id
        self.role = claim.connection_record.get("role", "publisher")
        self.hidden = claim.connection_record.get("hidden") == "1"
        """A broadcaster worker's subscriber: never shown to others, never announced."""
        self.display_name = participant.display_name
        self.joined_at_ms = participant.joined_at_ms
        self.record = dict(claim.connection_record)
        """The store's record of this connection, re-asserted if Redis loses its data."""
        limits = node.config.limits
        self.max_subscriptions = limits.max_subscriptions
        self.manual_subscriptions: set[str] | None = None
        self._outbox: asyncio.Queue[media_pb2.ServerMessage | None] = asyncio.Queue()
        self._closed = False
        self._events = RateLimiter(limits.custom_events_per_second)
        self._last_name_change = 0.0
        self._publisher_pc: RTCPeerConnection | None = None
        self._subscriber_pc: RTCPeerConnection | None = None
        self._published: dict[str, PublishedTrack] = {}
        """mid -> track on the publishing connection."""
        self._desired: set[str] = set()
        self._subs: dict[str, Subscription] = {}
        self._free: dict[str, list[RTCRtpTransceiver]] = {"audio": [], "video": []}
        self._sender_states: dict[int, SenderState] = {}
        self._offer_version = 0
        self._awaiting_version: int | None = None
        self._awaiting_since = 0.0
        self._wake = asyncio.Event()
        """Set when the subscriptions may need another offer."""
        self._answered = asyncio.Event()
        """Set when the outstanding subscriber offer got its answer."""
        self._negotiator: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None

    # --- plumbing --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        self._negotiator = asyncio.create_task(self._negotiate_forever(), name="negotiator")

    def send(self, message: media_pb2.ServerMessage) -> None:
        if self._closed:
            return
        if self._outbox.qsize() >= OUTBOX_LIMIT:
            logger.warning("%s is not reading its session stream; closing", self.connection_id)
            spawn(
                self.close(media_pb2.CLOSE_REASON_ERROR, "client stopped reading", "disconnected")
            )
            return
        self._outbox.put_nowait(message)

    async def outgoing(self) -> media_pb2.ServerMessage | None:
        """The next message for the client; None once the session is over."""
        return await self._outbox.get()

    def remote_view(self) -> media_pb2.RemoteParticipant:
        return media_pb2.RemoteParticipant(
            participant_id=self.participant_id,
            connection_id=self.connection_id,
            role=ROLES_BY_NAME.get(self.role, 0),  # type: ignore[arg-type]
            display_name=self.display_name,
            tracks=[t.message() for t in self.room.tracks_of(self)],
            joined_at_ms=self.joined_at_ms,
        )

    def joined_message(self) -> media_pb2.ServerMessage:
        return media_pb2.ServerMessage(
            joined=media_pb2.Joined(
                space_id=self.space_id,
                participant_id=self.participant_id,
                connection_id=self.connection_id,
                role=ROLES_BY_NAME.get(self.role, 0),  # type: ignore[arg-type]
                display_name=self.display_name,
                node_id=self.node.node_id,
                active_session_id=self.room.active_session_id,
                participants=self.room.others(self),
                subscription_mode=media_pb2.SUBSCRIPTION_MODE_AUTO,
                max_subscriptions=self.max_subscriptions,
            )
        )

    def _new_pc(self) -> RTCPeerConnection:
        pc = RTCPeerConnection(
            RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
        )

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "failed" and not self._closed:
                await self.close(
                    media_pb2.CLOSE_REASON_TRANSPORT_FAILED,
                    "media connection failed",
                    "transport_failed",
                )
            elif pc.connectionState == "connected" and pc is self._subscriber_pc:
                for sub in self._subs.values():
                    if sub.downtrack is not None:
                        sub.downtrack.request_keyframe()

        return pc

    # --- client messages -------------------------------------------------------------------

    async def handle(self, message: media_pb2.ClientMessage) -> None:
        """One client message. Request errors are answered, not raised."""
        if self._closed:
            return  # queued behind the close: nothing may act for a participant who has left
        request_id = message.request_id
        kind = message.WhichOneof("message")
        try:
            if kind == "publish_offer":
                await self._publish(request_id, message.publish_offer)
            elif kind == "subscriber_answer":
                await self._subscriber_answer(message.subscriber_answer)
            elif kind == "set_muted":
                self._set_muted(request_id, message.set_muted)
            elif kind == "set_subscription":
                self._set_subscription(request_id, message.set_subscription)
            elif kind == "custom_event":
                self._custom_event(request_id, message.custom_event.payload)
            elif kind == "set_display_name":
                await self._set_display_name(request_id, message.set_display_name.display_name)
            elif kind == "leave":
                self._ack(request_id)
                await self.close(media_pb2.CLOSE_REASON_LEFT, "left", "left")
            elif kind == "hello":
                raise errors.FailedPrecondition("already joined: hello is only sent once")
            else:
                raise errors.InvalidArgument("empty or unknown client message")
        except errors.SpacesError as exc:
            self._error(request_id, exc, fatal=False)
        except Exception:
            if self._closed:
                return
            logger.exception("session %s: request failed", self.connection_id)
            self._error(request_id, errors.Internal(), fatal=False)

    def _ack(self, request_id: int) -> None:
        self.send(media_pb2.ServerMessage(request_id=request_id, ack=media_pb2.Ack()))

    def _error(self, request_id: int, exc: errors.SpacesError, fatal: bool) -> None:
        self.send(
            media_pb2.ServerMessage(
                request_id=request_id,
                error=media_pb2.SessionError(code=exc.code_name, message=exc.message, fatal=fatal),
            )
        )

    # --- publishing --------------------------------------------------------------------------

    async def _publish(self, request_id: int, request: media_pb2.PublishOffer) -> None:
        if self.role == "subscriber":
            raise errors.SubscriberCannotPublish()
        offer = request.offer
        if offer.type != "offer":
            raise errors.InvalidSdp('publish_offer must carry an sdp of type "offer"')
        if len(offer.sdp) > MAX_SDP_BYTES:
            raise errors.InvalidSdp("sdp is too large")
        try:
            media = {m.mid: m for m in parse_sdp(offer.sdp)}
        except ValueError as exc:
            raise errors.InvalidSdp(f"invalid sdp: {str(exc).lower()[:120]}") from exc
        declared: dict[str, media_pb2.PublishedTrack] = {}
        per_source: dict[int, int] = {}
        for item in request.tracks:
            if item.mid in declared:
                raise errors.InvalidArgument(f"track mid {item.mid!r} is declared twice")
            section = media.get(item.mid)
            if section is None or section.direction not in ("sendonly", "sendrecv"):
                raise errors.InvalidArgument(
                    f"track mid {item.mid!r} is not a sending m-section of the offer"
                )
            if not source_fits(item.source, section.kind):
                raise errors.InvalidArgument(
                    f"track mid {item.mid!r}: source does not fit a {section.kind} track"
                )
            if not any(allowed_codec(c) for c in section.codecs):
                raise errors.UnsupportedCodec()
            if len(item.name) > 128:
                raise errors.InvalidArgument("track name is longer than 128 characters")
            per_source[item.source] = per_source.get(item.source, 0) + 1
            if per_source[item.source] > self.node.config.limits.tracks_per_source:
                raise errors.TrackLimitReached(
                    f"at most {self.node.config.limits.tracks_per_source} track(s) per source"
                )
            declared[item.mid] = item

        pc = self._publisher_pc
        fresh = pc is None
        if pc is None:
            pc = self._publisher_pc = self._new_pc()
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer"))
        except Exception as exc:
            if fresh:
                self._publisher_pc = None
                await pc.close()
            raise errors.InvalidSdp(f"invalid sdp: {str(exc).lower()[:120]}") from exc

        added: list[PublishedTrack] = []
        removed: list[PublishedTrack] = []
        results: list[media_pb2.PublishedTrackResult] = []
        for transceiver in pc.getTransceivers():
            mid = transceiver.mid or ""
            wanted = declared.get(mid)
            existing = self._published.get(mid)
            if wanted is None:
                transceiver.direction = "inactive"
                if existing is not None:
                    removed.append(self._published.pop(mid))
                continue
            transceiver.direction = "recvonly"
            codec = restrict_codecs(transceiver, allowed_codec)
            if codec is None:  # checked above; kept for safety against aiortc's matching
                raise errors.UnsupportedCodec()
            if existing is not None and existing.codec.mime_type == codec.mime_type:
                existing.width, existing.height = wanted.width, wanted.height
                if existing.muted != wanted.muted:
                    self.room.set_muted(existing, wanted.muted)
                results.append(media_pb2.PublishedTrackResult(mid=mid, track=existing.message()))
                continue
            if existing is not None:
                removed.append(self._published.pop(mid))
            track = self._new_track(transceiver, wanted, codec)
            self._published[mid] = track
            added.append(track)
            results.append(media_pb2.PublishedTrackResult(mid=mid, track=track.message()))

        answer = await pc.createAnswer()
        self.node.apply_ice_policy(pc)
        await pc.setLocalDescription(answer)
        if self._closed:
            # Closed while negotiating (kicked, drained, lease lost): the room has already
            # dropped this session's tracks, and must not get new ones from it.
            return
        local = pc.localDescription
        self.send(
            media_pb2.ServerMessage(
                request_id=request_id,
                publish_answer=media_pb2.PublishAnswer(
                    answer=media_pb2.SessionDescription(type=local.type, sdp=local.sdp),
                    tracks=results,
                ),
            )
        )
        for track in removed:
            self.room.unpublish(track)
        for track in added:
            self.room.publish(track)
        if added or removed:
            logger.info(
                "%s publishes %d track(s) (+%d -%d)",
                self.participant_id,
                len(self._published),
                len(added),
                len(removed),
            )

    def _new_track(
        self,
        transceiver: RTCRtpTransceiver,
        declared: media_pb2.PublishedTrack,
        codec: Codec,
    ) -> PublishedTrack:
        receiver = transceiver.receiver
        kind = transceiver.kind
        participant_id = self.participant_id
        room = self.room
        forwarder: TrackForwarder

        def send_pli() -> None:
            if forwarder.ssrc:
                request_keyframe(receiver, forwarder.ssrc)

        def on_level(dbov: int) -> None:
            room.observe_audio_level(participant_id, dbov)

        forwarder = TrackForwarder(
            track_id="TR" + ids.new_session_id()[:22],
            kind=kind,
            codec_name=codec.name,
            clock_rate=codec.clock_rate,
            send_pli=send_pli,
            keyframe_interval_s=self.node.config.node.keyframe_interval_ms / 1000,
            on_audio_level=on_level if kind == "audio" else None,
        )
        forwarder.set_paused(declared.muted)
        tap_receiver(receiver, forwarder.on_packet, estimate_bandwidth=False)
        return PublishedTrack(
            id=forwarder.track_id,
            owner=self,
            mid=transceiver.mid or "",
            kind=kind,
            source=declared.source,
            codec=codec,
            forwarder=forwarder,
            receiver=receiver,
            muted=declared.muted,
            width=declared.width,
            height=declared.height,
            name=declared.name,
        )

    def _set_muted(self, request_id: int, request: media_pb2.SetMuted) -> None:
        track = self.room.tracks.get(request.track_id)
        if track is None or track.owner is not self:
            raise errors.TrackNotFound("track not found among your published tracks")
        self.room.set_muted(track, request.muted)
        self._ack(request_id)

    # --- events and names ------------------------------------------------------------------

    def _custom_event(self, request_id: int, payload: str) -> None:
        if self.role == "subscriber":
            raise errors.SubscriberCannotSendEvents()
        limit = self.node.config.limits.custom_event_max_bytes
        if len(payload.encode()) > limit:
            raise errors.CustomEventTooLarge(f"custom event payload is larger than {limit} bytes")
        if not self._events.allow():
            raise errors.CustomEventRateLimited()
        self.room.custom_event(self, payload)
        self._ack(request_id)

    async def _set_display_name(self, request_id: int, name: str) -> None:
        limits = self.node.config.limits
        if len(name) > limits.display_name_max_chars:
            raise errors.DisplayNameTooLong(
                f"display_name is longer than {limits.display_name_max_chars} characters"
            )
        if name and not name.isprintable():
            raise errors.InvalidArgument("display_name must be printable text")
        now = time.monotonic()
        if now - self._last_name_change < limits.display_name_interval_seconds:
            raise errors.DisplayNameRateLimited()
        self._last_name_change = now
        self.display_name = name
        self.record["name"] = name
        await self.node.store.set_display_name(self.space_id, self.connection_id, name)
        self.room.broadcast(
            media_pb2.ServerMessage(
                display_name_changed=media_pb2.DisplayNameChanged(
                    participant_id=self.participant_id, display_name=name
                )
            )
        )
        self._ack(request_id)

    # --- subscribing -----------------------------------------------------------------------

    def _set_subscription(self, request_id: int, request: media_pb2.SetSubscription) -> None:
        if request.max_subscriptions:
            if not 1 <= request.max_subscriptions <= MAX_SUBSCRIPTIONS_CEILING:
                raise errors.InvalidArgument("max_subscriptions must be between 1 and 20")
            self.max_subscriptions = request.max_subscriptions
        if request.mode == media_pb2.SUBSCRIPTION_MODE_MANUAL:
            self.manual_subscriptions = set(request.participant_ids)
        elif request.mode == media_pb2.SUBSCRIPTION_MODE_AUTO:
            self.manual_subscriptions = None
        elif request.mode != media_pb2.SUBSCRIPTION_MODE_UNSPECIFIED:
            raise errors.InvalidArgument("unknown subscription mode")
        self.set_desired(self.room.desired_tracks(self))
        self._ack(request_id)

    def set_desired(self, track_ids: set[str]) -> None:
        if track_ids != self._desired or track_ids != set(self._subs):
            self._desired = set(track_ids)
            self._wake.set()

    def drop_subscription(self, track_id: str) -> None:
        """The track is gone: stop forwarding at once; the m-section goes inactive next offer."""
        sub = self._subs.get(track_id)
        if sub is not None and sub.downtrack is not None:
            sub.track.forwarder.remove(sub.downtrack)
            sub.downtrack = None
        self._desired.discard(track_id)
        self._wake.set()

    async def _negotiate_forever(self) -> None:
        while not self._closed:
            if self._awaiting_version is not None:
                # One offer at a time: wait for its answer (changes meanwhile stay in _wake
                # for the next offer; waiting on _wake here would spin while it is set).
                remaining = ANSWER_TIMEOUT_S - (time.monotonic() - self._awaiting_since)
                if remaining <= 0:
                    await self.close(
                        media_pb2.CLOSE_REASON_ERROR,
                        "no answer to the subscriber offer",
                        "disconnected",
                    )
                    return
                await wait_event(self._answered, remaining)
                continue
            await self._wake.wait()
            if self._closed:
                return
            self._wake.clear()
            try:
                await self._offer_changes()
            except Exception:
                if self._closed:
                    return
                logger.exception("session %s: subscriber negotiation failed", self.connection_id)
                await self.close(
                    media_pb2.CLOSE_REASON_ERROR, "subscriber negotiation failed", "disconnected"
                )

    async def _offer_changes(self) -> None:
        room_tracks = self.room.tracks
        desired = {tid for tid in self._desired if tid in room_tracks}
        current = set(self._subs)
        remove = current - desired
        add = [room_tracks[tid] for tid in desired - current]
        if not remove and not add:
            return
        for tid in remove:
            sub = self._subs.pop(tid)
            if sub.downtrack is not None:
                sub.track.forwarder.remove(sub.downtrack)
            sub.transceiver.direction = "inactive"
            self._free[sub.transceiver.kind].append(sub.transceiver)
        pc = self._subscriber_pc
        if pc is None:
            pc = self._subscriber_pc = self._new_pc()
        for track in sorted(add, key=lambda t: t.published_at):
            free = self._free[track.kind]
            if free:
                transceiver = free.pop(0)
                transceiver.direction = "sendonly"
            else:
                transceiver = pc.addTransceiver(PlaceholderTrack(track.kind), direction="sendonly")
            prefer_codec(transceiver, track.codec)
            self._subs[track.id] = Subscription(track=track, transceiver=transceiver)
        self.node.apply_ice_policy(pc)
        offer = await pc.createOffer()
        await pc.setLocalDescription(offer)
        self._offer_version += 1
        self._awaiting_version = self._offer_version
        self._awaiting_since = time.monotonic()
        self._answered.clear()
        local = pc.localDescription
        self.send(
            media_pb2.ServerMessage(
                subscriber_offer=media_pb2.SubscriberOffer(
                    offer=media_pb2.SessionDescription(type=local.type, sdp=local.sdp),
                    tracks=[
                        media_pb2.SubscribedTrack(
                            mid=sub.transceiver.mid or "",
                            participant_id=sub.track.owner.participant_id,
                            track_id=sub.track.id,
                            kind=(
                                media_pb2.TRACK_KIND_AUDIO
                                if sub.track.kind == "audio"
                                else media_pb2.TRACK_KIND_VIDEO
                            ),
                            source=sub.track.source,  # type: ignore[arg-type]
                        )
                        for sub in self._subs.values()
                    ],
                    version=self._offer_version,
                )
            )
        )

    async def _subscriber_answer(self, request: media_pb2.SubscriberAnswer) -> None:
        pc = self._subscriber_pc
        if pc is None or request.version != self._awaiting_version:
            return  # an answer to an offer that was superseded
        if request.answer.type != "answer" or len(request.answer.sdp) > MAX_SDP_BYTES:
            raise errors.InvalidSdp('subscriber_answer must carry an sdp of type "answer"')
        try:
            parse_sdp(request.answer.sdp)
            await pc.setRemoteDescription(
                RTCSessionDescription(sdp=request.answer.sdp, type="answer")
            )
        except Exception as exc:
            # The subscribing connection cannot continue with a broken answer.
            await self.close(
                media_pb2.CLOSE_REASON_ERROR,
                f"invalid subscriber answer: {str(exc).lower()[:120]}",
                "disconnected",
            )
            return
        self._awaiting_version = None
        self._answered.set()
        limit = self.node.config.node.subscriber_buffer_bytes
        for sub in list(self._subs.values()):
            if sub.downtrack is not None:
                continue
            if sub.track.id not in self.room.tracks:
                continue
            sink = RtpSink(sub.transceiver)
            state = self._sender_states.setdefault(sink.ssrc, SenderState())
            downtrack = DownTrack(sub.track.forwarder, sink, state, self.participant_id, limit)
            hook_sender(sub.transceiver.sender, downtrack.request_keyframe, downtrack.retransmit)
            sub.track.forwarder.add(downtrack)
            sub.downtrack = downtrack
            if sink.connected:
                downtrack.request_keyframe()
        self._wake.set()

    # --- ending ------------------------------------------------------------------------------

    async def close(self, reason: int, message: str = "", release: str | None = None) -> None:
        """End the session: tell the client why, leave the room, close the peer connections,
        and, when ``release`` names a store reason, free the participant_id at once. The work
        runs in its own task, so a caller being cancelled cannot leave it half done."""
        if not self._closed:
            self._closed = True
            logger.info(
                "session %s closing: %s %s", self.connection_id, close_reason_name(reason), message
            )
            self._outbox.put_nowait(
                media_pb2.ServerMessage(
                    closing=media_pb2.Closing(
                        reason=reason,  # type: ignore[arg-type]
                        message=message,
                        rejoin=CLOSE_REJOIN.get(reason, False),
                    )
                )
            )
            self._outbox.put_nowait(None)
            self.room.remove(self, close_reason_name(reason))
            for sub in self._subs.values():
                if sub.downtrack is not None:
                    sub.track.forwarder.remove(sub.downtrack)
            self._subs.clear()
            if self._negotiator is not None and self._negotiator is not asyncio.current_task():
                self._negotiator.cancel()
            self._closing = asyncio.create_task(self._release(release), name="session-close")
        if self._closing is not None:
            await asyncio.shield(self._closing)

    async def _release(self, release: str | None) -> None:
        pcs = [pc for pc in (self._publisher_pc, self._subscriber_pc) if pc is not None]
        await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)
        if release:
            await self.node.release(self.space_id, self.connection_id, release)
        self.node.session_closed(self)
