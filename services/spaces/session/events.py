"""The events of a media session, independent of any wire.

A media node's session core (``spaces.media.session``) takes :data:`ClientEvent` values and
emits :data:`ServerEvent` values. Each wire is a thin adapter onto these: ``grpc_wire`` for the
``MediaService.Session`` stream (the Python SDK, and the signaling service talking to a node),
``mux_wire`` for the JSON protocol of Mux's web SDK (browsers). A message goes in through its
wire's decoder, becomes one of these events, and the core never sees the wire.

Values use plain names rather than protobuf enums: a track's ``kind`` is "audio" or "video", its
``source`` one of :data:`SOURCES` (Mux's names), a role "publisher" or "subscriber".
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("audio", "video")
SOURCES = ("camera", "microphone", "screenshare", "screenshareaudio", "other")
VIDEO_SOURCES = frozenset({"camera", "screenshare"})
AUDIO_SOURCES = frozenset({"microphone", "screenshareaudio"})
ROLES = ("publisher", "subscriber")

# Why a session ends, and whether the client should join again (with its resume credential).
CLOSE_LEFT = "left"
CLOSE_REMOVED = "removed"
CLOSE_REPLACED = "replaced"
CLOSE_SPACE_DELETED = "space_deleted"
CLOSE_MIGRATE = "migrate"
CLOSE_LEASE_LOST = "lease_lost"
CLOSE_TRANSPORT_FAILED = "transport_failed"
CLOSE_ERROR = "error"
CLOSE_SERVER_STOPPING = "server_stopping"
"""A single-process server is stopping: there is no other node to join again on."""
REJOIN = frozenset({CLOSE_MIGRATE, CLOSE_LEASE_LOST, CLOSE_TRANSPORT_FAILED, CLOSE_ERROR})
"""Close reasons after which the client should join again; after the others it must not."""

SUBSCRIPTION_AUTO = "auto"
SUBSCRIPTION_MANUAL = "manual"

PUBLISHER_CONNECTION = "publisher"
SUBSCRIBER_CONNECTION = "subscriber"


# --- values ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Track:
    """A published track as others see it."""

    id: str
    kind: str
    source: str
    muted: bool = False
    width: int = 0
    height: int = 0
    codec: str = ""
    """Negotiated codec, e.g. "video/VP8"."""
    name: str = ""


@dataclass(frozen=True, slots=True)
class Participant:
    """Another participant, as a session sees it."""

    participant_id: str
    connection_id: str
    role: str
    display_name: str
    tracks: tuple[Track, ...] = ()
    joined_at_ms: int = 0


@dataclass(frozen=True, slots=True)
class TrackDeclaration:
    """What a client declares for one sending m-section of its publishing offer."""

    mid: str
    source: str
    muted: bool = False
    width: int = 0
    height: int = 0
    name: str = ""
    track_id: str = ""
    """A client-chosen id (Mux's web SDK names its tracks); empty: the node assigns one."""


@dataclass(frozen=True, slots=True)
class SubscriptionEntry:
    """Manual mode: receive this participant's tracks (all of them when ``track_ids`` is empty).
    It is named by participant_id or by connection_id."""

    participant_id: str = ""
    connection_id: str = ""
    track_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SubscribedTrack:
    """Which remote track a sending m-section of a subscriber offer carries."""

    mid: str
    participant_id: str
    connection_id: str
    track_id: str
    kind: str
    source: str


@dataclass(frozen=True, slots=True)
class Speaker:
    participant_id: str
    connection_id: str
    level: float
    """0 (silence) .. 1 (full scale), smoothed."""
    track_id: str = ""
    """The audio track the level was read from."""


@dataclass(frozen=True, slots=True)
class IceServer:
    urls: tuple[str, ...]
    username: str = ""
    credential: str = ""


# --- client -> core -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    """A (re)offer for the publishing peer connection, with every track it sends; a track
    missing from ``tracks`` is unpublished."""

    request_id: int
    sdp: str
    tracks: tuple[TrackDeclaration, ...]
    sdp_type: str = "offer"


@dataclass(frozen=True, slots=True)
class AnswerSubscriber:
    """The answer to the subscriber offer numbered ``version``."""

    version: int
    sdp: str
    sdp_type: str = "answer"


@dataclass(frozen=True, slots=True)
class AddIceCandidate:
    """A trickled remote ICE candidate (``candidate`` is the SDP attribute value, starting
    with "candidate:"; empty means end of candidates)."""

    connection: str
    """PUBLISHER_CONNECTION or SUBSCRIBER_CONNECTION."""
    candidate: str
    sdp_mid: str = ""
    sdp_mline_index: int = 0


@dataclass(frozen=True, slots=True)
class SetMuted:
    request_id: int
    track_id: str
    muted: bool


@dataclass(frozen=True, slots=True)
class SetSubscription:
    request_id: int
    mode: str = ""
    """SUBSCRIPTION_AUTO, SUBSCRIPTION_MANUAL, or "" to keep the current mode."""
    participant_ids: tuple[str, ...] = ()
    """Manual mode: receive everything these participants publish."""
    entries: tuple[SubscriptionEntry, ...] = ()
    """Manual mode: receive these participants' (or connections') tracks."""
    max_subscriptions: int = 0
    """Auto mode: at most this many participants (1..20); 0 keeps the current value."""


@dataclass(frozen=True, slots=True)
class SendCustomEvent:
    request_id: int
    payload: str
    event_id: str = ""
    """A client-chosen id, echoed in the delivered event."""


@dataclass(frozen=True, slots=True)
class SetDisplayName:
    request_id: int
    display_name: str


@dataclass(frozen=True, slots=True)
class SetVideoQuality:
    """The most a subscriber wants of one remote video track: a quality ("low", "medium",
    "high", "off", or "" for no limit) and/or the size it renders the track at. The node sends
    the best simulcast layer within it that the subscriber's bandwidth carries."""

    request_id: int
    track_id: str
    quality: str = ""
    width: int = 0
    height: int = 0


@dataclass(frozen=True, slots=True)
class Leave:
    request_id: int


@dataclass(frozen=True, slots=True)
class Unknown:
    """A message the wire could decode but not name; answered with an error."""

    request_id: int
    what: str = "empty or unknown client message"


ClientEvent = (
    Publish
    | AnswerSubscriber
    | AddIceCandidate
    | SetMuted
    | SetSubscription
    | SendCustomEvent
    | SetDisplayName
    | SetVideoQuality
    | Leave
    | Unknown
)


# --- core -> client -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Joined:
    space_id: str
    participant_id: str
    connection_id: str
    role: str
    display_name: str
    node_id: str
    active_session_id: str
    participants: tuple[Participant, ...]
    """Everyone else already in the space, with their tracks."""
    subscription_mode: str
    max_subscriptions: int


@dataclass(frozen=True, slots=True)
class Ack:
    request_id: int


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """A request (or, with ``fatal``, the session) failed. ``code`` is a gRPC status name."""

    request_id: int
    code: str
    message: str
    fatal: bool = False


@dataclass(frozen=True, slots=True)
class PublishAnswered:
    request_id: int
    sdp: str
    tracks: tuple[tuple[str, Track], ...]
    """(mid, track) for every accepted track, in offer order."""


@dataclass(frozen=True, slots=True)
class SubscriberOffered:
    version: int
    sdp: str
    tracks: tuple[SubscribedTrack, ...]


@dataclass(frozen=True, slots=True)
class ParticipantJoined:
    participant: Participant


@dataclass(frozen=True, slots=True)
class ParticipantLeft:
    participant_id: str
    connection_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class TrackPublished:
    participant_id: str
    connection_id: str
    track: Track


@dataclass(frozen=True, slots=True)
class TrackUnpublished:
    participant_id: str
    connection_id: str
    track_id: str


@dataclass(frozen=True, slots=True)
class TrackMuted:
    participant_id: str
    connection_id: str
    track_id: str
    muted: bool


@dataclass(frozen=True, slots=True)
class ActiveSpeakers:
    speakers: tuple[Speaker, ...]
    """Loudest first."""


@dataclass(frozen=True, slots=True)
class CustomEventDelivered:
    participant_id: str
    connection_id: str
    payload: str
    seq: int
    """Per space, increasing by one for every delivered event."""
    event_id: str = ""
    request_id: int = 0
    """Set only on the copy delivered to the sender: the request it answers."""


@dataclass(frozen=True, slots=True)
class DisplayNameChanged:
    participant_id: str
    connection_id: str
    display_name: str
    request_id: int = 0
    """Set only on the copy delivered to the participant who changed it."""


@dataclass(frozen=True, slots=True)
class SubscriptionUpdated:
    """The answer to SetSubscription: which named participants or connections could be
    subscribed (``failures`` are not in the space)."""

    request_id: int
    successes: tuple[SubscriptionEntry, ...] = ()
    failures: tuple[SubscriptionEntry, ...] = ()


@dataclass(frozen=True, slots=True)
class BroadcastStateChanged:
    """Whether the space is being broadcast (media.proto BroadcastState): sent after Joined
    while a broadcast is ACTIVE, and whenever the set of ACTIVE broadcasts changes."""

    broadcasting: bool
    broadcast_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AudioOnly:
    """The subscriber's link cannot carry even the lowest video layers: it receives audio only
    (``active``) until the estimate recovers, when it is told again (``active`` false)."""

    active: bool
    estimated_bitrate: int = 0
    """The estimate that decided it (bits per second)."""


@dataclass(frozen=True, slots=True)
class LayersWanted:
    """To a simulcast publisher: the layers (rids) of one of its tracks that some subscriber
    receives now; the others may be paused (dynacast) until they are wanted again."""

    track_id: str
    rids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Closing:
    reason: str
    message: str = ""

    @property
    def rejoin(self) -> bool:
        return self.reason in REJOIN


ServerEvent = (
    Joined
    | BroadcastStateChanged
    | Ack
    | RequestFailed
    | PublishAnswered
    | SubscriberOffered
    | ParticipantJoined
    | ParticipantLeft
    | TrackPublished
    | TrackUnpublished
    | TrackMuted
    | ActiveSpeakers
    | CustomEventDelivered
    | DisplayNameChanged
    | SubscriptionUpdated
    | AudioOnly
    | LayersWanted
    | Closing
)


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """How a client asks to be served, from its first message (gRPC Hello, or the web
    protocol's query parameters)."""

    subscription_mode: str = SUBSCRIPTION_AUTO
    max_subscriptions: int = 0
    """0: the node's default."""
    offer_subscriber_at_join: bool = False
    """Send a subscriber offer right after Joined even when there is nothing to receive yet
    (Mux's web SDK needs one in its join reply)."""
    client: str = ""
    extra: dict[str, str] = field(default_factory=dict)
