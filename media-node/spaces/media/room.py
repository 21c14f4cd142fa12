"""A room: one space as hosted on this node. Who is here, what they publish, who gets what.

The room owns the published tracks (each with its forwarder), broadcasts session events,
numbers custom events, tracks active speakers, and decides each member's subscriptions:
automatic mode keeps up to N participants, preferring recent speakers and unmuted publishers;
manual mode keeps the participants (or some of their tracks) the client named.

The room knows its members only through the :class:`Member` protocol, so it imports nothing of
the session that implements it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from spaces.media.aiortc_adapter import Codec
from spaces.media.dynacast import LayerDemand
from spaces.media.forwarding import TrackForwarder
from spaces.media.layers import LAYER_STALE_S, LayerInfo
from spaces.media.speakers import SpeakerDetector
from spaces.session import events as ev

logger = logging.getLogger(__name__)

SPEAKER_INTERVAL_S = 0.3


class Member(Protocol):
    """What the room needs of a session."""

    participant_id: str
    connection_id: str
    role: str
    display_name: str
    joined_at_ms: int
    max_subscriptions: int
    manual: ManualSubscription | None
    hidden: bool
    """A broadcaster worker's subscriber: never announced to others or listed."""

    def send(self, event: ev.ServerEvent) -> None: ...

    def set_desired(self, track_ids: set[str]) -> None: ...

    def drop_subscription(self, track_id: str) -> None: ...


M = TypeVar("M", bound=Member)


@dataclass
class ManualSubscription:
    """What a member in manual mode asked to receive."""

    participants: set[str] = field(default_factory=set)
    """participant_ids: everything they publish."""
    tracks: dict[str, set[str]] = field(default_factory=dict)
    """participant_id -> only these track ids."""

    def wants(self, participant_id: str, track_id: str) -> bool:
        if participant_id in self.participants:
            return True
        chosen = self.tracks.get(participant_id)
        return chosen is not None and track_id in chosen

    def names(self, participant_id: str) -> bool:
        return participant_id in self.participants or participant_id in self.tracks


@dataclass
class PublishedTrack:
    """One track a participant publishes, with the forwarder that fans it out."""

    id: str
    owner: Member
    mid: str
    kind: str
    source: str
    codec: Codec
    forwarder: TrackForwarder
    receiver: Any = None
    """The aiortc receiver of the publisher's track (for RTCP feedback to the publisher)."""
    muted: bool = False
    width: int = 0
    height: int = 0
    name: str = ""
    published_at: float = field(default_factory=time.monotonic)
    layers: tuple[TrackForwarder, ...] = ()
    """A simulcast track's layers, lowest first (one forwarder per rid; ``forwarder`` is the
    top one). Empty for a track without simulcast."""
    layer_bitrates: tuple[int, ...] = ()
    layer_scales: tuple[float, ...] = ()
    _layer_info: tuple[tuple[Any, ...], tuple[LayerInfo, ...]] | None = field(
        default=None, repr=False, compare=False
    )
    """The last ``layer_info`` and what it was built from: every subscriber's session asks
    for it every allocation tick, and it changes only when a layer starts or stops."""
    dynacast: LayerDemand | None = None
    """A simulcast track's layers the publisher is asked to send (spaces.media.dynacast)."""

    @property
    def forwarders(self) -> tuple[TrackForwarder, ...]:
        return self.layers or (self.forwarder,)

    def layer_info(self, now: float) -> tuple[LayerInfo, ...]:
        """The layers as the allocation sees them (a track without simulcast has one)."""
        if not self.layers:
            return (LayerInfo(bitrate=self.layer_bitrates[0] if self.layer_bitrates else 0),)
        live = tuple(now - layer.last_packet_at < LAYER_STALE_S for layer in self.layers)
        key = (self.width, self.height, live)
        cached = self._layer_info
        if cached is not None and cached[0] == key:
            return cached[1]
        info = tuple(
            LayerInfo(
                bitrate=bitrate,
                width=int(self.width / scale) if self.width else 0,
                height=int(self.height / scale) if self.height else 0,
                live=is_live,
            )
            for is_live, bitrate, scale in zip(
                live, self.layer_bitrates, self.layer_scales, strict=True
            )
        )
        self._layer_info = (key, info)
        return info

    def view(self) -> ev.Track:
        return ev.Track(
            id=self.id,
            kind=self.kind,
            source=self.source,
            muted=self.muted,
            width=self.width,
            height=self.height,
            codec=self.codec.mime_type,
            name=self.name,
        )


class Room(Generic[M]):
    def __init__(self, space_id: str, on_empty: Callable[[Room[M]], None]) -> None:
        self.space_id = space_id
        self.sessions: dict[str, M] = {}
        """connection_id -> member, in join order."""
        self.tracks: dict[str, PublishedTrack] = {}
        self.speakers = SpeakerDetector()
        self.epoch = ""
        self.space_record: dict[str, str] = {}
        self.active_session_id = ""
        self._custom_event_seq = 0
        self._on_empty = on_empty
        self._last_speakers: list[str] = []
        self._speaking_track: dict[str, str] = {}
        """participant_id -> the audio track its level was last read from."""
        self._speaker_task: asyncio.Task[None] | None = None

    # --- membership ------------------------------------------------------------------------

    def view(self, member: Member) -> ev.Participant:
        return ev.Participant(
            participant_id=member.participant_id,
            connection_id=member.connection_id,
            role=member.role,
            display_name=member.display_name,
            tracks=tuple(t.view() for t in self.tracks_of(member)),
            joined_at_ms=member.joined_at_ms,
        )

    def add(self, member: M) -> None:
        self.sessions[member.connection_id] = member
        if not member.hidden:
            self.broadcast(ev.ParticipantJoined(self.view(member)), exclude=member)
        current = self.speakers.speakers()
        if current:
            # A late joiner would otherwise learn who speaks only at the next change.
            member.send(ev.ActiveSpeakers(tuple(self._speaker(p, lv) for p, lv in current)))
        if self._speaker_task is None:
            self._speaker_task = asyncio.create_task(self._speaker_loop(), name="speakers")
        self.reconcile()

    def others(self, member: Member) -> tuple[ev.Participant, ...]:
        """Everyone else. A participant's earlier connection, still closing after this one
        resumed it, is not someone else."""
        return tuple(
            self.view(s)
            for s in self.sessions.values()
            if s.participant_id != member.participant_id and not s.hidden
        )

    def remove(self, member: Member, reason: str) -> None:
        if self.sessions.pop(member.connection_id, None) is None:
            return
        for track in [t for t in self.tracks.values() if t.owner is member]:
            self.unpublish(track, announce=False)
        if not any(s.participant_id == member.participant_id for s in self.sessions.values()):
            self.speakers.forget(member.participant_id)
            self._speaking_track.pop(member.participant_id, None)
        if not member.hidden:
            self.broadcast(ev.ParticipantLeft(member.participant_id, member.connection_id, reason))
        self.reconcile()
        if not self.sessions:
            if self._speaker_task is not None:
                self._speaker_task.cancel()
                self._speaker_task = None
            self._on_empty(self)

    def broadcast(self, event: ev.ServerEvent, exclude: Member | None = None) -> None:
        for member in list(self.sessions.values()):
            if member is not exclude:
                member.send(event)

    def find(self, participant_id: str = "", connection_id: str = "") -> M | None:
        """A member by connection_id, or the newest connection of a participant_id."""
        if connection_id:
            return self.sessions.get(connection_id)
        found = None
        for member in self.sessions.values():
            if member.participant_id == participant_id:
                found = member
        return found

    # --- tracks ----------------------------------------------------------------------------

    def tracks_of(self, member: Member) -> list[PublishedTrack]:
        return [t for t in self.tracks.values() if t.owner is member]

    def publish(self, track: PublishedTrack) -> None:
        owner = track.owner
        self.tracks[track.id] = track
        self.broadcast(
            ev.TrackPublished(owner.participant_id, owner.connection_id, track.view()),
            exclude=owner,
        )
        self.reconcile()

    def unpublish(self, track: PublishedTrack, announce: bool = True) -> None:
        if self.tracks.pop(track.id, None) is None:
            return
        for forwarder in track.forwarders:
            forwarder.close()
        for member in self.sessions.values():
            member.drop_subscription(track.id)
        if announce:
            owner = track.owner
            self.broadcast(
                ev.TrackUnpublished(owner.participant_id, owner.connection_id, track.id),
                exclude=owner,
            )
            self.reconcile()

    def set_muted(self, track: PublishedTrack, muted: bool) -> None:
        if track.muted == muted:
            return
        track.muted = muted
        for forwarder in track.forwarders:
            forwarder.set_paused(muted)
        owner = track.owner
        self.broadcast(
            ev.TrackMuted(owner.participant_id, owner.connection_id, track.id, muted),
            exclude=owner,
        )
        self.reconcile()

    # --- custom events and names ------------------------------------------------------------

    def custom_event(self, member: Member, payload: str, event_id: str, request_id: int) -> int:
        """Deliver to everyone (the sender included, its copy answering ``request_id``),
        numbered per space, in order."""
        self._custom_event_seq += 1
        seq = self._custom_event_seq
        for other in list(self.sessions.values()):
            other.send(
                ev.CustomEventDelivered(
                    participant_id=member.participant_id,
                    connection_id=member.connection_id,
                    payload=payload,
                    seq=seq,
                    event_id=event_id,
                    request_id=request_id if other is member else 0,
                )
            )
        return seq

    def display_name_changed(self, member: Member, request_id: int) -> None:
        for other in list(self.sessions.values()):
            other.send(
                ev.DisplayNameChanged(
                    member.participant_id,
                    member.connection_id,
                    member.display_name,
                    request_id=request_id if other is member else 0,
                )
            )

    # --- subscriptions ---------------------------------------------------------------------

    def _rank(self, candidate: Member, order: int) -> tuple[float, int, int]:
        spoke = self.speakers.last_spoke.get(candidate.participant_id, 0.0)
        unmuted = any(not t.muted for t in self.tracks_of(candidate))
        return (-spoke, 0 if unmuted else 1, order)

    def desired_tracks(self, member: Member) -> set[str]:
        publishers = [
            (i, s)
            for i, s in enumerate(self.sessions.values())
            if s.participant_id != member.participant_id and self.tracks_of(s)
        ]
        manual = member.manual
        if manual is not None:
            return {
                t.id
                for _, s in publishers
                for t in self.tracks_of(s)
                if manual.wants(s.participant_id, t.id)
            }
        ranked = sorted(publishers, key=lambda item: self._rank(item[1], item[0]))
        chosen = [s for _, s in ranked[: member.max_subscriptions]]
        return {t.id for s in chosen for t in self.tracks_of(s)}

    def reconcile(self) -> None:
        for member in list(self.sessions.values()):
            member.set_desired(self.desired_tracks(member))

    # --- active speakers -------------------------------------------------------------------

    def observe_audio_level(self, participant_id: str, dbov: int, track_id: str = "") -> None:
        self.speakers.observe(participant_id, dbov)
        if track_id:
            self._speaking_track[participant_id] = track_id

    def _speaker(self, participant_id: str, level: float) -> ev.Speaker:
        member = self.find(participant_id)
        return ev.Speaker(
            participant_id=participant_id,
            connection_id=member.connection_id if member is not None else "",
            level=level,
            track_id=self._speaking_track.get(participant_id, ""),
        )

    async def _speaker_loop(self) -> None:
        while True:
            await asyncio.sleep(SPEAKER_INTERVAL_S)
            current = self.speakers.speakers()
            ids = [pid for pid, _ in current]
            if ids != self._last_speakers:
                self._last_speakers = ids
                self.broadcast(
                    ev.ActiveSpeakers(tuple(self._speaker(pid, level) for pid, level in current))
                )
                # A new speaker may deserve a place among limited auto subscriptions.
                publishers = sum(1 for s in self.sessions.values() if self.tracks_of(s))
                if any(publishers > s.max_subscriptions for s in self.sessions.values()):
                    self.reconcile()

    def close(self) -> None:
        if self._speaker_task is not None:
            self._speaker_task.cancel()
            self._speaker_task = None
        for track in list(self.tracks.values()):
            for forwarder in track.forwarders:
                forwarder.close()
        self.tracks.clear()
