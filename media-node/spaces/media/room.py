"""A room: one space as hosted on this node. Who is here, what they publish, who gets what.

The room owns the published tracks (each with its forwarder), broadcasts signaling events,
numbers custom events, tracks active speakers, and decides each session's subscriptions:
automatic mode keeps up to N participants, preferring recent speakers and unmuted publishers;
manual mode keeps the participants the client named.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spaces.media.aiortc_adapter import Codec
from spaces.media.forwarding import TrackForwarder
from spaces.media.speakers import SpeakerDetector
from spaces.v1 import media_pb2

if TYPE_CHECKING:
    from spaces.media.session import Session

logger = logging.getLogger(__name__)

SPEAKER_INTERVAL_S = 0.3


@dataclass
class PublishedTrack:
    """One track a participant publishes, with the forwarder that fans it out."""

    id: str
    owner: Session
    mid: str
    kind: str
    source: int
    codec: Codec
    forwarder: TrackForwarder
    receiver: Any = None
    """The aiortc receiver of the publisher's track (for RTCP feedback to the publisher)."""
    muted: bool = False
    width: int = 0
    height: int = 0
    name: str = ""
    published_at: float = field(default_factory=time.monotonic)

    def message(self) -> media_pb2.Track:
        return media_pb2.Track(
            id=self.id,
            kind=media_pb2.TRACK_KIND_AUDIO if self.kind == "audio" else media_pb2.TRACK_KIND_VIDEO,
            source=self.source,  # type: ignore[arg-type]
            muted=self.muted,
            width=self.width,
            height=self.height,
            codec=self.codec.mime_type,
            name=self.name,
        )


class Room:
    def __init__(self, space_id: str, on_empty: Callable[[Room], None]) -> None:
        self.space_id = space_id
        self.sessions: dict[str, Session] = {}
        """connection_id -> session, in join order."""
        self.tracks: dict[str, PublishedTrack] = {}
        self.speakers = SpeakerDetector()
        self.epoch = ""
        self.space_record: dict[str, str] = {}
        self.active_session_id = ""
        self._custom_event_seq = 0
        self._on_empty = on_empty
        self._last_speakers: list[str] = []
        self._speaker_task: asyncio.Task[None] | None = None

    # --- membership ------------------------------------------------------------------------

    def add(self, session: Session) -> None:
        self.sessions[session.connection_id] = session
        if not session.hidden:
            self.broadcast(
                media_pb2.ServerMessage(
                    participant_joined=media_pb2.ParticipantJoined(
                        participant=session.remote_view()
                    )
                ),
                exclude=session,
            )
        if self._last_speakers:
            # A late joiner would otherwise learn who speaks only at the next change.
            session.send(self._speakers_message(self.speakers.speakers()))
        if self._speaker_task is None:
            self._speaker_task = asyncio.create_task(self._speaker_loop(), name="speakers")
        self.reconcile()

    def others(self, session: Session) -> list[media_pb2.RemoteParticipant]:
        """Everyone else. A participant's earlier connection, still closing after this one
        resumed it, is not someone else."""
        return [
            s.remote_view()
            for s in self.sessions.values()
            if s.participant_id != session.participant_id and not s.hidden
        ]

    def remove(self, session: Session, reason: str) -> None:
        if self.sessions.pop(session.connection_id, None) is None:
            return
        for track in [t for t in self.tracks.values() if t.owner is session]:
            self.unpublish(track, announce=False)
        if not any(s.participant_id == session.participant_id for s in self.sessions.values()):
            self.speakers.forget(session.participant_id)
        if not session.hidden:
            self.broadcast(
                media_pb2.ServerMessage(
                    participant_left=media_pb2.ParticipantLeft(
                        participant_id=session.participant_id,
                        connection_id=session.connection_id,
                        reason=reason,
                    )
                )
            )
        self.reconcile()
        if not self.sessions:
            if self._speaker_task is not None:
                self._speaker_task.cancel()
                self._speaker_task = None
            self._on_empty(self)

    def broadcast(self, message: media_pb2.ServerMessage, exclude: Session | None = None) -> None:
        for session in list(self.sessions.values()):
            if session is not exclude:
                session.send(message)

    # --- tracks ----------------------------------------------------------------------------

    def tracks_of(self, session: Session) -> list[PublishedTrack]:
        return [t for t in self.tracks.values() if t.owner is session]

    def publish(self, track: PublishedTrack) -> None:
        self.tracks[track.id] = track
        self.broadcast(
            media_pb2.ServerMessage(
                track_published=media_pb2.TrackPublished(
                    participant_id=track.owner.participant_id, track=track.message()
                )
            ),
            exclude=track.owner,
        )
        self.reconcile()

    def unpublish(self, track: PublishedTrack, announce: bool = True) -> None:
        if self.tracks.pop(track.id, None) is None:
            return
        track.forwarder.close()
        for session in self.sessions.values():
            session.drop_subscription(track.id)
        if announce:
            self.broadcast(
                media_pb2.ServerMessage(
                    track_unpublished=media_pb2.TrackUnpublished(
                        participant_id=track.owner.participant_id, track_id=track.id
                    )
                ),
                exclude=track.owner,
            )
            self.reconcile()

    def set_muted(self, track: PublishedTrack, muted: bool) -> None:
        if track.muted == muted:
            return
        track.muted = muted
        track.forwarder.set_paused(muted)
        self.broadcast(
            media_pb2.ServerMessage(
                track_muted=media_pb2.TrackMuted(
                    participant_id=track.owner.participant_id, track_id=track.id, muted=muted
                )
            ),
            exclude=track.owner,
        )
        self.reconcile()

    # --- custom events ---------------------------------------------------------------------

    def custom_event(self, session: Session, payload: str) -> int:
        """Deliver to everyone (the sender included), numbered per space, in order."""
        self._custom_event_seq += 1
        self.broadcast(
            media_pb2.ServerMessage(
                custom_event=media_pb2.CustomEvent(
                    participant_id=session.participant_id,
                    payload=payload,
                    seq=self._custom_event_seq,
                )
            )
        )
        return self._custom_event_seq

    # --- subscriptions ---------------------------------------------------------------------

    def _rank(self, candidate: Session, order: int) -> tuple[float, int, int]:
        spoke = self.speakers.last_spoke.get(candidate.participant_id, 0.0)
        unmuted = any(not t.muted for t in self.tracks_of(candidate))
        return (-spoke, 0 if unmuted else 1, order)

    def desired_tracks(self, session: Session) -> set[str]:
        publishers = [
            (i, s)
            for i, s in enumerate(self.sessions.values())
            if s.participant_id != session.participant_id and self.tracks_of(s)
        ]
        if session.manual_subscriptions is not None:
            chosen = [s for _, s in publishers if s.participant_id in session.manual_subscriptions]
        else:
            ranked = sorted(publishers, key=lambda item: self._rank(item[1], item[0]))
            chosen = [s for _, s in ranked[: session.max_subscriptions]]
        return {t.id for s in chosen for t in self.tracks_of(s)}

    def reconcile(self) -> None:
        for session in list(self.sessions.values()):
            session.set_desired(self.desired_tracks(session))

    # --- active speakers -------------------------------------------------------------------

    def observe_audio_level(self, participant_id: str, dbov: int) -> None:
        self.speakers.observe(participant_id, dbov)

    async def _speaker_loop(self) -> None:
        while True:
            await asyncio.sleep(SPEAKER_INTERVAL_S)
            current = self.speakers.speakers()
            ids = [pid for pid, _ in current]
            if ids != self._last_speakers:
                self._last_speakers = ids
                self.broadcast(self._speakers_message(current))
                # A new speaker may deserve a place among limited auto subscriptions.
                publishers = sum(1 for s in self.sessions.values() if self.tracks_of(s))
                if any(publishers > s.max_subscriptions for s in self.sessions.values()):
                    self.reconcile()

    @staticmethod
    def _speakers_message(current: list[tuple[str, float]]) -> media_pb2.ServerMessage:
        return media_pb2.ServerMessage(
            active_speakers=media_pb2.ActiveSpeakers(
                speakers=[media_pb2.Speaker(participant_id=p, level=lv) for p, lv in current]
            )
        )

    def close(self) -> None:
        if self._speaker_task is not None:
            self._speaker_task.cancel()
            self._speaker_task = None
        for track in list(self.tracks.values()):
            track.forwarder.close()
        self.tracks.clear()
