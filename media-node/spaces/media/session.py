"""One participant's session on a media node: the session core and its two peer connections.

The core is independent of any wire. It takes :data:`spaces.session.events.ClientEvent` values
(``handle``) and emits :data:`spaces.session.events.ServerEvent` values (``outgoing``); the gRPC
stream (``spaces.media.grpc_adapter``) and, through the signaling service, the web protocol of
Mux's SDK are thin adapters around it.

* The **publishing** connection is offered by the client. Each Publish carries the full list of
  tracks it sends (mid -> source); what is missing is unpublished. The node answers with one
  codec per track and taps each receiver into a forwarder.
* The **subscribing** connection is offered by the node. The room decides which tracks this
  session should receive; the node adds, reuses or deactivates sendonly transceivers (each
  m-section's msid names the track it carries) and sends a versioned offer, one at a time.

Errors in a request come back as a non-fatal RequestFailed and the session continues; closing
sends a Closing event that says whether the client should join again.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcconfiguration import RTCBundlePolicy

from spaces import errors, ids, metrics
from spaces.config import ServerConfig
from spaces.media.aiortc_adapter import (
    Codec,
    PlaceholderTrack,
    RtpSink,
    SimulcastOffer,
    accept_simulcast,
    add_remote_candidate,
    answer_dtx,
    answer_with_simulcast,
    check_answer,
    hook_sender,
    hook_sender_feedback,
    label_sender,
    offered_simulcast,
    on_peer_moved,
    parse_sdp,
    prefer_codec,
    request_keyframe,
    restrict_codecs,
    route_by_mid,
    tap_receiver,
    tap_simulcast_receiver,
    without_empty_bundle,
)
from spaces.media.bwe import Estimator
from spaces.media.dynacast import LayerDemand, wanted_top
from spaces.media.forwarding import DownTrack, SenderState, SimulcastDemux, TrackForwarder
from spaces.media.layers import Allocator, VideoRequest, Wanted, next_need, request_need
from spaces.media.room import ManualSubscription, PublishedTrack, Room
from spaces.session import events as ev
from spaces.store.base import Claim, Store
from spaces.tasks import spawn, wait_event

if TYPE_CHECKING:
    from aiortc import RTCRtpTransceiver

    from spaces.media.dataplane import NativePlane

logger = logging.getLogger(__name__)

MAX_SDP_BYTES = 128 * 1024
OUTBOX_LIMIT = 1024
MAX_SUBSCRIPTIONS_CEILING = 20
MAX_CANDIDATE_CHARS = 512
TRACK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
EVENT_ID_MAX_CHARS = 64
ALLOCATE_INTERVAL_S = 0.5
"""How often a subscriber's layers are reconsidered (besides on every request and estimate)."""
DEFAULT_LAYER_BITRATES = (150_000, 500_000, 1_500_000)
"""For rids the config does not name: the usual three layers' bitrates, lowest first."""
SINGLE_LAYER_BITRATE = 700_000
"""What a video track without simulcast is reckoned to need (Mux's one camera encoding)."""

STORE_REASONS: dict[str, str] = {
    "removed": ev.CLOSE_REMOVED,
    "replaced": ev.CLOSE_REPLACED,
    "duplicate": ev.CLOSE_REPLACED,
    "space_deleted": ev.CLOSE_SPACE_DELETED,
    "left": ev.CLOSE_LEFT,
    "moved": ev.CLOSE_MIGRATE,
}


def close_reason_for(store_reason: str) -> str:
    """The close reason for a connection the store no longer has (see store.keys.gone_key)."""
    return STORE_REASONS.get(store_reason, ev.CLOSE_LEASE_LOST)


def allowed_codec(codec: Codec) -> bool:
    """Opus audio, VP8 video, and H264 in packetization mode 1 (what browsers send)."""
    name = codec.name
    if name == "OPUS":
        return True
    if name == "VP8":
        return True
    return name == "H264" and str(codec.parameters.get("packetization-mode", "0")) == "1"


def _priority(track: PublishedTrack) -> int:
    return 1 if track.source == "screenshare" else 0


def source_fits(source: str, kind: str) -> bool:
    if source in ev.VIDEO_SOURCES:
        return kind == "video"
    if source in ev.AUDIO_SOURCES:
        return kind == "audio"
    return source == "other"


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


class SessionHost(Protocol):
    """What a session needs of the media node that hosts it."""

    node_id: str
    config: ServerConfig
    store: Store

    def apply_ice_policy(self, pc: RTCPeerConnection) -> None: ...

    # Optionally ``dataplane: NativePlane | None``, the native data plane (MediaNode has it).

    async def release(self, space_id: str, connection_id: str, reason: str) -> None: ...

    def session_closed(self, session: Session) -> None: ...


@dataclass
class Subscription:
    track: PublishedTrack
    transceiver: RTCRtpTransceiver
    downtrack: DownTrack | None = None
    request: VideoRequest = field(default_factory=VideoRequest)


class Session:
    def __init__(
        self,
        host: SessionHost,
        room: Room[Session],
        claim: Claim,
        options: ev.SessionOptions | None = None,
    ) -> None:
        self.node = host
        self.room: Room[Session] = room
        options = options or ev.SessionOptions()
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
        limits = host.config.limits
        self.max_subscriptions = limits.max_subscriptions
        if 1 <= options.max_subscriptions <= MAX_SUBSCRIPTIONS_CEILING:
            self.max_subscriptions = options.max_subscriptions
        self.manual: ManualSubscription | None = (
            ManualSubscription() if options.subscription_mode == ev.SUBSCRIPTION_MANUAL else None
        )
        self._offer_at_join = options.offer_subscriber_at_join
        self._outbox: asyncio.Queue[ev.ServerEvent | None] = asyncio.Queue()
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
        self._requests: dict[str, VideoRequest] = {}
        """track_id -> what the client asked for (kept across resubscriptions)."""
        self._allocator = Allocator()
        self._bwe = Estimator(time.monotonic())
        self.estimate: int | None = None
        """The subscriber's estimated bandwidth (bits per second) while it receives simulcast
        tracks (the only ones the estimate can change anything for); None otherwise."""
        self._floor = 0
        self._at_floor = False
        self._counted: dict[int, tuple[int, int]] = {}
        """id(sink) -> its (packets, bytes) at the last estimate tick."""
        self._allocating: asyncio.Task[None] | None = None

    # --- plumbing --------------------------------------------------------------------------

    @property
    def _plane(self) -> NativePlane | None:
        plane: NativePlane | None = getattr(self.node, "dataplane", None)
        return plane

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        if self._offer_at_join:
            self._wake.set()
        self._negotiator = asyncio.create_task(self._negotiate_forever(), name="negotiator")
        self._allocating = asyncio.create_task(self._allocate_forever(), name="layers")

    def send(self, event: ev.ServerEvent) -> None:
        if self._closed:
            return
        if self._outbox.qsize() >= OUTBOX_LIMIT:
            logger.warning("%s is not reading its session stream; closing", self.connection_id)
            spawn(self.close(ev.CLOSE_ERROR, "client stopped reading", "disconnected"))
            return
        self._outbox.put_nowait(event)

    async def outgoing(self) -> ev.ServerEvent | None:
        """The next event for the client; None once the session is over."""
        return await self._outbox.get()

    def joined_event(self) -> ev.Joined:
        return ev.Joined(
            space_id=self.space_id,
            participant_id=self.participant_id,
            connection_id=self.connection_id,
            role=self.role,
            display_name=self.display_name,
            node_id=self.node.node_id,
            active_session_id=self.room.active_session_id,
            participants=self.room.others(self),
            subscription_mode=(
                ev.SUBSCRIPTION_MANUAL if self.manual is not None else ev.SUBSCRIPTION_AUTO
            ),
            max_subscriptions=self.max_subscriptions,
        )

    def _new_pc(self) -> RTCPeerConnection:
        pc = RTCPeerConnection(
            RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
        )

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "failed" and not self._closed:
                await self.close(
                    ev.CLOSE_TRANSPORT_FAILED, "media connection failed", "transport_failed"
                )
            elif pc.connectionState == "connected" and pc is self._subscriber_pc:
                for sub in self._subs.values():
                    if sub.downtrack is not None:
                        sub.downtrack.request_keyframe()

        return pc

    # --- client events ---------------------------------------------------------------------

    async def handle(self, event: ev.ClientEvent) -> None:
        """One client event. Request errors are answered, not raised."""
        if self._closed:
            return  # queued behind the close: nothing may act for a participant who has left
        request_id = getattr(event, "request_id", 0)
        try:
            if isinstance(event, ev.Publish):
                await self._publish(event)
            elif isinstance(event, ev.AnswerSubscriber):
                await self._subscriber_answer(event)
            elif isinstance(event, ev.AddIceCandidate):
                await self._add_candidate(event)
            elif isinstance(event, ev.SetMuted):
                self._set_muted(event)
            elif isinstance(event, ev.SetSubscription):
                self._set_subscription(event)
            elif isinstance(event, ev.SendCustomEvent):
                self._custom_event(event)
            elif isinstance(event, ev.SetDisplayName):
                await self._set_display_name(event)
            elif isinstance(event, ev.SetVideoQuality):
                self._set_video_quality(event)
            elif isinstance(event, ev.Leave):
                self.send(ev.Ack(request_id))
                await self.close(ev.CLOSE_LEFT, "left", "left")
            else:
                raise errors.InvalidArgument(event.what)
        except errors.SpacesError as exc:
            self._error(request_id, exc)
        except Exception:
            if self._closed:
                return
            logger.exception("session %s: request failed", self.connection_id)
            self._error(request_id, errors.Internal())

    def _error(self, request_id: int, exc: errors.SpacesError, fatal: bool = False) -> None:
        self.send(ev.RequestFailed(request_id, exc.code_name, exc.message, fatal))

    # --- publishing --------------------------------------------------------------------------

    def _check_track_id(self, track_id: str, mid: str) -> None:
        if not TRACK_ID.fullmatch(track_id):
            raise errors.InvalidArgument(
                f"track mid {mid!r}: track_id must be 1-64 letters, digits, '-' or '_'"
            )
        existing = self.room.tracks.get(track_id)
        if existing is None or existing.owner is self:
            return
        if existing.owner.participant_id == self.participant_id:
            # Republished by this participant's new connection (a reconnect) while its old one
            # is still closing: the track moves to the new connection.
            self.room.unpublish(existing)
            return
        raise errors.AlreadyExists(f"track id {track_id!r} is already published in this space")

    async def _publish(self, event: ev.Publish) -> None:
        if self.role == "subscriber":
            raise errors.SubscriberCannotPublish()
        if event.sdp_type != "offer":
            raise errors.InvalidSdp('publish_offer must carry an sdp of type "offer"')
        if len(event.sdp) > MAX_SDP_BYTES:
            raise errors.InvalidSdp("sdp is too large")
        try:
            media = {m.mid: m for m in parse_sdp(event.sdp)}
        except ValueError as exc:
            raise errors.InvalidSdp(f"invalid sdp: {str(exc).lower()[:120]}") from exc
        declared: dict[str, ev.TrackDeclaration] = {}
        per_source: dict[str, int] = {}
        limit = self.node.config.limits.tracks_per_source
        for item in event.tracks:
            if item.mid in declared:
                raise errors.InvalidArgument(f"track mid {item.mid!r} is declared twice")
            section = media.get(item.mid)
            if section is None or section.direction not in ("sendonly", "sendrecv"):
                raise errors.InvalidArgument(
                    f"track mid {item.mid!r} is not a sending m-section of the offer"
                )
            if item.source not in ev.SOURCES:
                raise errors.InvalidArgument(f"track mid {item.mid!r}: unknown source")
            if not source_fits(item.source, section.kind):
                raise errors.InvalidArgument(
                    f"track mid {item.mid!r}: source does not fit a {section.kind} track"
                )
            if not any(allowed_codec(c) for c in section.codecs):
                raise errors.UnsupportedCodec()
            if len(item.name) > 128:
                raise errors.InvalidArgument("track name is longer than 128 characters")
            if item.track_id:
                existing = self._published.get(item.mid)
                if existing is None or existing.id != item.track_id:
                    self._check_track_id(item.track_id, item.mid)
            per_source[item.source] = per_source.get(item.source, 0) + 1
            if per_source[item.source] > limit:
                raise errors.TrackLimitReached(f"at most {limit} track(s) per source")
            declared[item.mid] = item
        ids_declared = [d.track_id for d in declared.values() if d.track_id]
        if len(ids_declared) != len(set(ids_declared)):
            raise errors.InvalidArgument("a track_id is declared twice")

        simulcast = offered_simulcast(event.sdp)
        pc = self._publisher_pc
        fresh = pc is None
        if pc is None:
            pc = self._publisher_pc = self._new_pc()
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=event.sdp, type="offer"))
        except Exception as exc:
            if fresh:
                self._publisher_pc = None
                await pc.close()
            raise errors.InvalidSdp(f"invalid sdp: {str(exc).lower()[:120]}") from exc

        added: list[PublishedTrack] = []
        removed: list[PublishedTrack] = []
        results: list[tuple[str, ev.Track]] = []
        accepted: dict[str, SimulcastOffer] = {}
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
            answer_dtx(transceiver, media[mid].codecs)
            offer = simulcast.get(mid) if transceiver.kind == "video" else None
            if offer is not None:
                accept_simulcast(transceiver, offer)
                route_by_mid(transceiver)
                accepted[mid] = offer
            rids = offer.rids if offer is not None else ()
            same_id = not wanted.track_id or (
                existing is not None and existing.id == wanted.track_id
            )
            if (
                existing is not None
                and existing.codec.mime_type == codec.mime_type
                and same_id
                and tuple(f.rid for f in existing.layers) == self._ordered_rids(rids, wanted)
            ):
                existing.width, existing.height = wanted.width, wanted.height
                if existing.muted != wanted.muted:
                    self.room.set_muted(existing, wanted.muted)
                results.append((mid, existing.view()))
                continue
            if existing is not None:
                removed.append(self._published.pop(mid))
            track = self._new_track(transceiver, wanted, codec, rids)
            self._published[mid] = track
            added.append(track)
            results.append((mid, track.view()))

        answer = await pc.createAnswer()
        self.node.apply_ice_policy(pc)
        on_peer_moved(pc, self._publisher_moved)
        await pc.setLocalDescription(answer)
        if self._closed:
            # Closed while negotiating (kicked, drained, lease lost): the room has already
            # dropped this session's tracks, and must not get new ones from it.
            return
        cap = self.node.config.node.max_publish_bitrate
        starts = {
            t.mid: min(cap, sum(t.layer_bitrates)) for t in self._published.values() if t.layers
        }
        sdp = answer_with_simulcast(pc.localDescription.sdp, accepted, starts)
        self.send(ev.PublishAnswered(event.request_id, sdp, tuple(results)))
        for track in removed:
            self.room.unpublish(track)
        for track in added:
            taken = self.room.tracks.get(track.id)
            if taken is not None and taken.owner.participant_id != self.participant_id:
                # Someone else published this id while the offer was being answered: theirs
                # stays, and this one is not forwarded (the client is told).
                self._published.pop(track.mid, None)
                for forwarder in track.forwarders:
                    forwarder.close()
                self._error(
                    event.request_id,
                    errors.AlreadyExists(f"track id {track.id!r} is already published"),
                )
                continue
            if taken is not None:
                # This participant's earlier connection, still closing, published it last.
                self.room.unpublish(taken)
            self.room.publish(track)
        if added or removed:
            logger.info(
                "%s publishes %d track(s) (+%d -%d)",
                self.participant_id,
                len(self._published),
                len(added),
                len(removed),
            )

    def _publisher_moved(self) -> None:
        """The publisher connection now reaches its peer at a new address: packets it sent
        meanwhile were lost, and so were keyframe requests sent to the old address."""
        for track in self._published.values():
            for forwarder in track.forwarders:
                forwarder.restart_at_keyframe()

    def _ordered_rids(
        self, rids: tuple[str, ...], declared: ev.TrackDeclaration
    ) -> tuple[str, ...]:
        """The offered rids, lowest layer first: in the configured order when the config names
        them all, else as offered (browsers list their encodings lowest first)."""
        configured = [e.rid for e in self.node.config.simulcast.layers(declared.source)]
        if rids and all(r in configured for r in rids):
            return tuple(sorted(rids, key=configured.index))
        return rids

    def _new_track(
        self,
        transceiver: RTCRtpTransceiver,
        declared: ev.TrackDeclaration,
        codec: Codec,
        rids: tuple[str, ...] = (),
    ) -> PublishedTrack:
        receiver = transceiver.receiver
        kind = transceiver.kind
        participant_id = self.participant_id
        room = self.room
        track_id = declared.track_id or "TR" + ids.new_session_id()[:22]
        interval = self.node.config.node.keyframe_interval_ms / 1000
        plane = self._plane

        def forwarder_for(rid: str, on_level: Callable[[int], None] | None) -> TrackForwarder:
            forwarder: TrackForwarder

            def send_pli() -> None:
                if forwarder.ssrc:
                    request_keyframe(receiver, forwarder.ssrc)

            forwarder = TrackForwarder(
                track_id=track_id,
                kind=kind,
                codec_name=codec.name,
                clock_rate=codec.clock_rate,
                send_pli=send_pli,
                keyframe_interval_s=interval,
                on_audio_level=on_level,
                rid=rid,
                # Each simulcast layer is a native source of its own (bound to its SSRC at
                # its first packet); Downs switch between them natively at keyframes, with
                # the VP8 picture id rewrite.
                native=plane.binding(transceiver) if plane is not None else None,
            )
            forwarder.set_paused(declared.muted)
            return forwarder

        on_level: Callable[[int], None] | None = None
        if kind == "audio":

            def on_level(dbov: int) -> None:
                room.observe_audio_level(participant_id, dbov, track_id)

        layers: tuple[TrackForwarder, ...] = ()
        bitrates: tuple[int, ...] = ()
        scales: tuple[float, ...] = ()
        demand: LayerDemand | None = None
        if rids:
            ordered = self._ordered_rids(rids, declared)
            demand = LayerDemand(ordered, time.monotonic())
            layers = tuple(forwarder_for(rid, None) for rid in ordered)
            by_rid = {e.rid: e for e in self.node.config.simulcast.layers(declared.source)}
            count = len(ordered)
            bitrates = tuple(
                by_rid[rid].max_bitrate
                if rid in by_rid
                else DEFAULT_LAYER_BITRATES[max(0, len(DEFAULT_LAYER_BITRATES) - count + i)]
                for i, rid in enumerate(ordered)
            )
            scales = tuple(
                by_rid[rid].scale_resolution_down_by if rid in by_rid else 2.0 ** (count - 1 - i)
                for i, rid in enumerate(ordered)
            )
            tap_simulcast_receiver(receiver, SimulcastDemux(layers).on_packet)
            forwarder = layers[-1]
        else:
            forwarder = forwarder_for("", on_level)
            tap_receiver(receiver, forwarder.on_packet, estimate_bandwidth=False)
            if kind == "video":
                bitrates = (SINGLE_LAYER_BITRATE,)
        return PublishedTrack(
            id=track_id,
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
            layers=layers,
            layer_bitrates=bitrates,
            layer_scales=scales,
            dynacast=demand,
        )

    def _set_muted(self, event: ev.SetMuted) -> None:
        track = self.room.tracks.get(event.track_id)
        if track is None or track.owner is not self:
            raise errors.TrackNotFound("track not found among your published tracks")
        self.room.set_muted(track, event.muted)
        self.send(ev.Ack(event.request_id))

    async def _add_candidate(self, event: ev.AddIceCandidate) -> None:
        pc = (
            self._publisher_pc
            if event.connection == ev.PUBLISHER_CONNECTION
            else self._subscriber_pc
            if event.connection == ev.SUBSCRIBER_CONNECTION
            else None
        )
        if event.connection not in (ev.PUBLISHER_CONNECTION, ev.SUBSCRIBER_CONNECTION):
            raise errors.InvalidArgument("ice candidate names no peer connection")
        if len(event.candidate) > MAX_CANDIDATE_CHARS:
            raise errors.InvalidArgument("ice candidate is too long")
        if pc is None or pc.remoteDescription is None:
            return  # nothing to add it to (yet): the candidates in the answer are enough
        try:
            await add_remote_candidate(pc, event.candidate, event.sdp_mid, event.sdp_mline_index)
        except ValueError as exc:
            raise errors.InvalidArgument(f"invalid ice candidate: {exc}") from exc

    # --- events and names ------------------------------------------------------------------

    def _custom_event(self, event: ev.SendCustomEvent) -> None:
        if self.role == "subscriber":
            raise errors.SubscriberCannotSendEvents()
        limit = self.node.config.limits.custom_event_max_bytes
        if len(event.payload.encode()) > limit:
            raise errors.CustomEventTooLarge(f"custom event payload is larger than {limit} bytes")
        if len(event.event_id) > EVENT_ID_MAX_CHARS:
            raise errors.InvalidArgument("custom event id is longer than 64 characters")
        if not self._events.allow():
            raise errors.CustomEventRateLimited()
        self.room.custom_event(self, event.payload, event.event_id, event.request_id)
        self.send(ev.Ack(event.request_id))

    async def _set_display_name(self, event: ev.SetDisplayName) -> None:
        limits = self.node.config.limits
        name = event.display_name
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
        self.room.display_name_changed(self, event.request_id)
        self.send(ev.Ack(event.request_id))

    # --- subscribing -----------------------------------------------------------------------

    def _set_subscription(self, event: ev.SetSubscription) -> None:
        if event.max_subscriptions:
            if not 1 <= event.max_subscriptions <= MAX_SUBSCRIPTIONS_CEILING:
                raise errors.InvalidArgument("max_subscriptions must be between 1 and 20")
            self.max_subscriptions = event.max_subscriptions
        successes: list[ev.SubscriptionEntry] = []
        failures: list[ev.SubscriptionEntry] = []
        if event.mode == ev.SUBSCRIPTION_MANUAL:
            manual = ManualSubscription(participants=set(event.participant_ids))
            for entry in event.entries:
                member = self.room.find(entry.participant_id, entry.connection_id)
                if member is None or member is self:
                    failures.append(entry)
                    continue
                successes.append(entry)
                if entry.track_ids:
                    manual.tracks.setdefault(member.participant_id, set()).update(entry.track_ids)
                else:
                    manual.participants.add(member.participant_id)
            self.manual = manual
        elif event.mode == ev.SUBSCRIPTION_AUTO:
            self.manual = None
        self.set_desired(self.room.desired_tracks(self))
        self.send(ev.SubscriptionUpdated(event.request_id, tuple(successes), tuple(failures)))
        self.send(ev.Ack(event.request_id))

    def set_desired(self, track_ids: set[str]) -> None:
        if track_ids != self._desired or track_ids != set(self._subs):
            self._desired = set(track_ids)
            self._wake.set()

    def drop_subscription(self, track_id: str) -> None:
        """The track is gone: stop forwarding at once; the m-section goes inactive next offer."""
        sub = self._subs.get(track_id)
        if sub is not None and sub.downtrack is not None:
            sub.downtrack.detach()
            sub.downtrack = None
        self._desired.discard(track_id)
        self._wake.set()

    async def _negotiate_forever(self) -> None:
        timeout = self.node.config.node.subscriber_answer_timeout_s
        while not self._closed:
            if self._awaiting_version is not None:
                # One offer at a time: wait for its answer (changes meanwhile stay in _wake
                # for the next offer; waiting on _wake here would spin while it is set).
                remaining = timeout - (time.monotonic() - self._awaiting_since)
                if remaining <= 0:
                    await self.close(
                        ev.CLOSE_ERROR, "no answer to the subscriber offer", "disconnected"
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
                await self.close(ev.CLOSE_ERROR, "subscriber negotiation failed", "disconnected")

    async def _offer_changes(self) -> None:
        room_tracks = self.room.tracks
        desired = {tid for tid in self._desired if tid in room_tracks}
        current = set(self._subs)
        remove = current - desired
        add = [room_tracks[tid] for tid in desired - current]
        first = self._subscriber_pc is None
        if not remove and not add and not (first and self._offer_at_join):
            return
        for tid in remove:
            sub = self._subs.pop(tid)
            if sub.downtrack is not None:
                sub.downtrack.detach()
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
            # The m-section's msid names the track (Mux's web SDK maps remote tracks by it).
            label_sender(transceiver, track.id)
            self._subs[track.id] = Subscription(
                track=track,
                transceiver=transceiver,
                request=self._requests.get(track.id, VideoRequest()),
            )
            self._demand_changed(track)
        self.node.apply_ice_policy(pc)
        offer = await pc.createOffer()
        await pc.setLocalDescription(offer)
        self._offer_version += 1
        self._awaiting_version = self._offer_version
        self._awaiting_since = time.monotonic()
        self._answered.clear()
        self.send(
            ev.SubscriberOffered(
                version=self._offer_version,
                sdp=without_empty_bundle(pc.localDescription.sdp),
                tracks=tuple(
                    ev.SubscribedTrack(
                        mid=sub.transceiver.mid or "",
                        participant_id=sub.track.owner.participant_id,
                        connection_id=sub.track.owner.connection_id,
                        track_id=sub.track.id,
                        kind=sub.track.kind,
                        source=sub.track.source,
                    )
                    for sub in self._subs.values()
                ),
            )
        )

    async def _subscriber_answer(self, event: ev.AnswerSubscriber) -> None:
        pc = self._subscriber_pc
        if pc is None or event.version != self._awaiting_version:
            return  # an answer to an offer that was superseded
        if event.sdp_type != "answer" or len(event.sdp) > MAX_SDP_BYTES:
            raise errors.InvalidSdp('subscriber_answer must carry an sdp of type "answer"')
        try:
            check_answer(event.sdp, pc.localDescription.sdp)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=event.sdp, type="answer"))
        except Exception as exc:
            # The subscribing connection cannot continue with a broken answer.
            await self.close(
                ev.CLOSE_ERROR,
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
            source = self._first_source(sub)
            state = self._sender_states.get(sink.ssrc)
            if state is None:
                plane = self._plane
                native = plane.down(sub.transceiver, sink) if plane is not None else None
                state = self._sender_states[sink.ssrc] = SenderState(native)
            downtrack = DownTrack(source, sink, state, self.participant_id, limit)
            hook_sender(sub.transceiver.sender, downtrack.request_keyframe, self._nacked(downtrack))
            hook_sender_feedback(sub.transceiver.sender, self._bwe.on_report, self._bwe.on_remb)
            if sub.track.kind == "audio" or not self._allocator.audio_only:
                source.add(downtrack)
            sub.downtrack = downtrack
            if sink.connected:
                downtrack.request_keyframe()
        self._wake.set()
        self.allocate()

    # --- simulcast layers --------------------------------------------------------------------

    @property
    def audio_only(self) -> bool:
        """Its estimated bandwidth cannot carry the lowest layers: it gets no video."""
        return self._allocator.audio_only

    def _set_video_quality(self, event: ev.SetVideoQuality) -> None:
        try:
            request = VideoRequest(event.quality, event.width, event.height)
        except ValueError as exc:
            raise errors.InvalidArgument(str(exc)) from exc
        if not TRACK_ID.fullmatch(event.track_id):
            raise errors.InvalidArgument("set_video_quality needs a track id")
        track = self.room.tracks.get(event.track_id)
        if track is None or track.kind != "video":
            raise errors.TrackNotFound("no such video track in the space")
        if len(self._requests) >= 256 and event.track_id not in self._requests:
            self._requests.pop(next(iter(self._requests)))
        self._requests[event.track_id] = request
        sub = self._subs.get(event.track_id)
        requested: set[str] = set()
        if sub is not None:
            sub.request = request
            if self._probe_for(sub):
                requested.add(sub.track.id)
        self.allocate(requested=requested)
        self._demand_changed(track)
        self.send(ev.Ack(event.request_id))

    def _probe_for(self, sub: Subscription) -> bool:
        """A request that lets ``sub`` go above the layer it receives takes effect now (the
        target layer is asked for a keyframe and followed from it): the estimate is raised to
        what that layer needs, unless it is backing off after congestion. Without this the raise
        waits for the estimate to grow into it and then a hold, many seconds on any link."""
        if self.estimate is None or not sub.track.layers or sub.downtrack is None:
            return False
        now = time.monotonic()
        goal = request_need(self._wanted(now), sub.track.id, self._audio_count())
        # The estimate also covers what the tracks without simulcast are reckoned to take.
        if goal is None or not self._bwe.probe(goal + self._single_layer_need(), now):
            return False
        self.estimate = self._bwe.estimate
        return True

    def _first_source(self, sub: Subscription) -> TrackForwarder:
        """The layer a new subscription starts on: what the allocation would give it now."""
        track = sub.track
        if not track.layers:
            return track.forwarder
        now = time.monotonic()
        wanted = self._wanted(now)
        wanted.append(Wanted(track.id, track.layer_info(now), sub.request, -1, _priority(track)))
        budget = self._budget()
        target = self._allocator.allocate(wanted, budget, now, self._audio_count()).targets
        index = target.get(track.id, -1)
        return track.layers[index] if index >= 0 else track.layers[0]

    def _audio_count(self) -> int:
        return sum(1 for s in self._subs.values() if s.track.kind == "audio" and s.downtrack)

    def _nacked(self, downtrack: DownTrack) -> Callable[[int], None]:
        def on_nack(sequence_number: int) -> None:
            switching = downtrack.target is not downtrack.source
            if switching and self.estimate is not None and self._bwe.congested(time.monotonic()):
                # Going down on congestion: the lower layer's keyframe is coming, and resending
                # the higher layer's packets would only add to the queue. Once on the layer
                # that fits, its losses are resent as always.
                return
            # Only NACKs of packets still worth resending are loss now: a browser goes on
            # asking for old ones (those of a layer it no longer gets) for seconds.
            if downtrack.retransmit(sequence_number):
                self._bwe.on_nack(sequence_number)

        return on_nack

    def _wanted(self, now: float) -> list[Wanted]:
        """The simulcast video subscriptions (the others are forwarded as they are)."""
        wanted: list[Wanted] = []
        for sub in self._subs.values():
            downtrack = sub.downtrack
            if downtrack is None or sub.track.kind != "video" or not sub.track.layers:
                continue
            target = downtrack.target
            track = sub.track
            current = -1
            if target is not None:
                current = track.layers.index(target) if track.layers else 0
            wanted.append(
                Wanted(track.id, track.layer_info(now), sub.request, current, _priority(track))
            )
        return wanted

    def _budget(self) -> int:
        """The estimate less what the tracks without simulcast are reckoned to take. Before
        the first tick has estimated anything (the first simulcast subscription), the
        estimator's start value: a new subscription starts on the layer it carries
        (``_first_source``), and taking an unknown estimate for no limit would switch it to
        the top layer until that tick, then back, each switch asking every layer for a
        keyframe."""
        estimate = self._bwe.estimate if self.estimate is None else self.estimate
        return max(estimate - self._single_layer_need(), 0)

    def _single_layer_need(self) -> int:
        """What the video tracks without simulcast are reckoned to take."""
        return sum(
            SINGLE_LAYER_BITRATE
            for s in self._subs.values()
            if s.track.kind == "video" and not s.track.layers and s.request.quality != "off"
        )

    def _tick_estimate(self, now: float, wanted: Sequence[Wanted]) -> None:
        """Feed the estimator what was sent since the last tick (and what the next layer up
        of ``wanted`` would need)."""
        packets = octets = 0
        counted: dict[int, tuple[int, int]] = {}
        for sub in self._subs.values():
            if sub.downtrack is None:
                continue
            sink = sub.downtrack.sink
            total = sink.counters()
            before = self._counted.get(id(sink), total)
            counted[id(sink)] = total
            packets += total[0] - before[0]
            octets += total[1] - before[1]
        self._counted = counted
        if not any(s.track.layers and s.downtrack for s in self._subs.values()):
            self.estimate = None
            return
        need = next_need(wanted, self._audio_count())
        cuts = self._bwe.cuts
        self.estimate = self._bwe.tick(
            now,
            octets,
            packets,
            self._floor,
            self._allocator.audio_only,
            self._at_floor,
            None if need is None else need + self._single_layer_need(),
        )
        metrics.ESTIMATED_BANDWIDTH.observe(self.estimate)
        if self._bwe.cuts != cuts and self._bwe.history:
            cut = self._bwe.history[-1]
            logger.info("%s (%s): estimate %s", self.connection_id, self.participant_id, cut)

    def allocate(self, tick: bool = False, requested: Collection[str] = ()) -> None:
        """Give each video subscription its layer (see spaces.media.layers); ``requested``:
        the subscriptions whose client just asked for more (raised without a hold)."""
        if self._closed:
            return
        now = time.monotonic()
        wanted = self._wanted(now)
        if tick:
            self._tick_estimate(now, wanted)
        was_audio_only = self._allocator.audio_only
        allocation = self._allocator.allocate(
            wanted,
            self._budget(),
            now,
            self._audio_count(),
            allow_raise=self.estimate is None or self._bwe.may_raise(now),
            requested=requested,
        )
        self._floor = allocation.floor
        self._at_floor = allocation.at_floor
        if allocation.raised and self.estimate is not None:
            self._bwe.raised(now)
        for sub in self._subs.values():
            downtrack = sub.downtrack
            if downtrack is None or sub.track.kind != "video" or sub.track.layers:
                continue
            # Without simulcast there is nothing lighter: forwarded unless asked for none.
            downtrack.follow(None if sub.request.quality == "off" else sub.track.forwarder)
        congested = self.estimate is not None and self._bwe.congested(now)
        for key, index in allocation.targets.items():
            target = self._subs.get(key)
            if target is None or target.downtrack is None:
                continue
            layers = target.track.layers
            downtrack = target.downtrack
            before = downtrack.target
            if congested and index >= 0 and before in layers[index + 1 :]:
                # Down on congestion: stop the layer that overloads the link now, so that the
                # lower layer's keyframe is not lost in the queue it built.
                downtrack.follow(None)
            downtrack.follow(layers[index] if index >= 0 else None)
            if downtrack.target is not before and logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "%s (%s): track %s: layer %s -> %s (estimate %s, live %s)",
                    self.connection_id,
                    self.participant_id,
                    key,
                    "none" if before is None else before.rid,
                    "none" if downtrack.target is None else downtrack.target.rid,
                    self.estimate,
                    "".join("1" if info.live else "0" for info in target.track.layer_info(now)),
                )
            _count_switch(layers, before, downtrack.target)
        if allocation.audio_only != was_audio_only:
            logger.info(
                "%s: %s (estimate %s bps)",
                self.connection_id,
                "audio only" if allocation.audio_only else "video resumes",
                self.estimate,
            )
            self.send(ev.AudioOnly(allocation.audio_only, self.estimate or 0))

    async def _allocate_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(ALLOCATE_INTERVAL_S)
            try:
                self.allocate(tick=True)
                self.update_dynacast()
            except Exception:
                logger.exception("session %s: layer allocation failed", self.connection_id)

    # --- dynacast ----------------------------------------------------------------------------

    def layer_request(self, track: PublishedTrack) -> VideoRequest | None:
        """What this subscriber asks of ``track`` (None: not subscribed to it)."""
        sub = self._subs.get(track.id)
        if sub is None or sub.track is not track:
            return None
        return sub.request

    def _demand_changed(self, track: PublishedTrack) -> None:
        """A subscription of ``track`` appeared or asks for more: its publisher may need to
        resume layers now rather than at its next tick."""
        if track.dynacast is None:
            return
        owner = self.room.sessions.get(track.owner.connection_id)
        if owner is not None and owner is not self:
            owner.update_dynacast()

    def update_dynacast(self) -> None:
        """Tell the client which layers of its simulcast tracks some subscriber wants (see
        spaces.media.dynacast); the others it may pause."""
        if self._closed:
            return
        now = time.monotonic()
        for track in self._published.values():
            demand = track.dynacast
            if demand is None or self.room.tracks.get(track.id) is not track:
                continue
            requests = [
                request
                for member in self.room.sessions.values()
                if (request := member.layer_request(track)) is not None
            ]
            before = demand.sending
            rids = demand.update(wanted_top(track.layer_info(now), requests), now)
            if rids is None:
                continue
            change = "resume" if demand.sending > before else "pause"
            metrics.DYNACAST_UPDATES.labels(change).inc()
            logger.info(
                "%s: track %s: layers wanted %s (%d subscriptions)",
                self.connection_id,
                track.id,
                ",".join(rids) or "none",
                len(requests),
            )
            self.send(ev.LayersWanted(track.id, rids))

    # --- ending ------------------------------------------------------------------------------

    async def close(self, reason: str, message: str = "", release: str | None = None) -> None:
        """End the session: tell the client why, leave the room, close the peer connections,
        and, when ``release`` names a store reason, free the participant_id at once. The work
        runs in its own task, so a caller being cancelled cannot leave it half done."""
        if not self._closed:
            self._closed = True
            logger.info("session %s closing: %s %s", self.connection_id, reason, message)
            self._outbox.put_nowait(ev.Closing(reason, message))
            self._outbox.put_nowait(None)
            self.room.remove(self, reason)
            for sub in self._subs.values():
                if sub.downtrack is not None:
                    sub.downtrack.detach()
            self._subs.clear()
            if self._negotiator is not None and self._negotiator is not asyncio.current_task():
                self._negotiator.cancel()
            if self._allocating is not None and self._allocating is not asyncio.current_task():
                self._allocating.cancel()
            self._closing = asyncio.create_task(self._release(release), name="session-close")
        if self._closing is not None:
            await asyncio.shield(self._closing)

    async def _release(self, release: str | None) -> None:
        pcs = [pc for pc in (self._publisher_pc, self._subscriber_pc) if pc is not None]
        await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)
        if release:
            await self.node.release(self.space_id, self.connection_id, release)
        self.node.session_closed(self)


def _count_switch(
    layers: Sequence[TrackForwarder], before: TrackForwarder | None, after: TrackForwarder | None
) -> None:
    """Metrics of one layer decision: a new target is a switch, which asks for a keyframe."""
    if after is before:
        return
    if after is None:
        metrics.LAYER_SWITCHES.labels("off").inc()
        return
    metrics.SWITCH_KEYFRAME_REQUESTS.inc()
    if before is None:
        direction = "on"
    else:
        direction = "up" if layers.index(after) > layers.index(before) else "down"
    metrics.LAYER_SWITCHES.labels(direction).inc()
