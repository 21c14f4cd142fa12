"""The web wire of a media session: the JSON protocol of Mux's browser SDK <-> session events.

``MuxWire`` is sans-I/O: feed it the text of each WebSocket message (``receive``) and every event
the session core emits (``send``); it returns the session events to hand to the core and the
JSON objects to write to the socket. It holds only what the protocol itself needs: the tracks the
client announced by mid before its offer, the version of the outstanding subscriber offer, the
manual subscription set, and which of the client's request ids an answer belongs to. The session
state machine stays in the core (``spaces.media.session``).

The protocol is documented in MUX_WEB_PROTOCOL.md (the shared notes) and docs/architecture.md.
Our own browser client (``web/spaces.js``) speaks it too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from spaces.session import events as ev

MAX_MESSAGE_BYTES = 256 * 1024
"""A larger WebSocket message is refused with a fatal error (SDPs are about 10 KB)."""
MAX_NAME_CHARS = 128

# Join and session error types (Mux's numbering).
UNKNOWN = 0
DISCONNECTED = 1
HIT_TIME_LIMIT = 2
DUPLICATE_PARTICIPANT = 3
PEER_CONNECTION_CLOSED = 4
INVALID_PENDING_TRACK = 5
INVALID_JWT = 6
PARTICIPANT_LIMIT_REACHED = 7
# Request error types.
CUSTOM_EVENT_FAILED = 5
CUSTOM_EVENT_RATE_LIMITED = 6
DISPLAY_NAME_FAILED = 7
DISPLAY_NAME_RATE_LIMITED = 8
INVALID_PROTOCOL_VERSION = 9

BROADCASTING = 1
IDLE = 2
"""``broadcast_state_update`` values: the SDK treats 1 as broadcasting, anything else as not."""

CLOSE_NO_RECONNECT = 4000
"""The client must not reconnect (Mux's SDK honours this code)."""
CLOSE_RECONNECT = 4001
"""Any other code after ``joined`` makes the client reconnect with its reconnect_id."""

ROLE_NUMBERS = {"publisher": 1, "subscriber": 2}
KIND_NUMBERS = {"audio": 1, "video": 2}
KINDS_BY_NUMBER = {1: "audio", 2: "video"}
TID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")

CLIENT_KEYS = frozenset(
    {
        "pending_track",
        "offer",
        "sub_answer",
        "candidate",
        "mute_track",
        "unmute_track",
        "subscribe_tracks",
        "unsubscribe_tracks",
        "custom_event",
        "set_display_name",
        "set_video_quality",
    }
)
"""``set_video_quality`` is ours (Mux's SDK has no such message), as are the server's
``audio_only`` and ``layers_wanted``, which only our client (``JoinInfo.spaces_client``) gets."""


class ProtocolError(Exception):
    """A message the web protocol cannot accept; becomes an ``error`` message."""

    def __init__(
        self,
        message: str,
        type: int = UNKNOWN,
        *,
        fatal: bool = False,
        retry: bool = False,
        correlator: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.type = type
        self.fatal = fatal
        self.retry = retry
        self.correlator = correlator

    def payload(self) -> dict[str, Any]:
        return error_message(
            self.type,
            self.message,
            fatal=self.fatal,
            retry=self.retry,
            correlator=self.correlator,
        )


def error_message(
    type: int, message: str, *, fatal: bool, retry: bool, correlator: str = ""
) -> dict[str, Any]:
    error: dict[str, Any] = {
        "type": type,
        "message": message,
        "visibility": "public",
        "fatal": fatal,
        "retry": retry,
    }
    if correlator:
        error["request_error"] = {"correlator": correlator}
    return {"error": error}


def join_error(code: str, message: str) -> dict[str, Any]:
    """The ``error`` for a Join that presence refused (``code`` is the gRPC status name)."""
    if code == "ALREADY_EXISTS":
        kind = DUPLICATE_PARTICIPANT
    elif code == "RESOURCE_EXHAUSTED" and "full" in message:
        kind = PARTICIPANT_LIMIT_REACHED
    elif code in ("UNAUTHENTICATED", "NOT_FOUND", "PERMISSION_DENIED", "INVALID_ARGUMENT"):
        kind = INVALID_JWT
    else:
        kind = UNKNOWN
    retry = code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED") and kind == UNKNOWN
    return error_message(kind, message, fatal=True, retry=retry)


def close_code(closing: ev.Closing) -> int:
    return CLOSE_RECONNECT if closing.rejoin else CLOSE_NO_RECONNECT


def sdp_sections(sdp: str) -> list[tuple[str, str, str]]:
    """(kind, mid, direction) of each m-section, read without a full parse."""
    sections: list[list[str]] = []
    for raw in sdp.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            kind = line[2:].split(" ", 1)[0]
            sections.append([kind, "", "sendrecv"])
        elif sections and line.startswith("a=mid:"):
            sections[-1][1] = line[6:].strip()
        elif sections and line[2:] in _DIRECTIONS and line.startswith("a="):
            sections[-1][2] = line[2:]
    return [(k, m, d) for k, m, d in sections]


def track_entry(track: ev.Track) -> dict[str, Any]:
    return {
        "tid": track.id,
        "type": KIND_NUMBERS.get(track.kind, 2),
        "name": track.name,
        "muted": track.muted,
        "source": track.source or "other",
        "width": track.width,
        "height": track.height,
        "metadata": {},
    }


def participant_entry(p: ev.Participant) -> dict[str, Any]:
    return {
        "connection_id": p.connection_id,
        "participant_id": p.participant_id,
        "role": ROLE_NUMBERS.get(p.role, 1),
        "status": 1,
        "display_name": p.display_name,
        "tracks": [track_entry(t) for t in p.tracks],
    }


@dataclass(frozen=True)
class JoinInfo:
    """What the signaling service learnt from PresenceService.Join, for the ``joined`` reply."""

    ice_servers: tuple[ev.IceServer, ...] = ()
    custom_events_per_second: int = 10
    tracks_per_source: int = 1
    display_name_interval_seconds: int = 1
    camera_encodings: tuple[Mapping[str, Any], ...] = ()
    screenshare_encodings: tuple[Mapping[str, Any], ...] = ()
    spaces_client: bool = False
    """Our own client (``web/spaces.js``), which understands the messages Mux's SDK lacks."""


@dataclass
class _Pending:
    """A track the client announced (pending_track) for an m-section of its offer."""

    declaration: ev.TrackDeclaration
    kind: str


@dataclass
class _Request:
    kind: str
    client_id: Any
    connections: tuple[str, ...] = ()


@dataclass
class MuxWire:
    info: JoinInfo
    sfu_id: str = "sfu"
    _tracks: dict[str, _Pending] = field(default_factory=dict)
    """mid -> the track the client sends on it."""
    _joined: ev.Joined | None = None
    _held: list[dict[str, Any]] = field(default_factory=list)
    """What arrived between Joined and the first subscriber offer (sent after ``joined``)."""
    _offer_version: int = 0
    _manual: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Manual mode: connection_id -> track ids (empty: all of them)."""
    _requests: dict[int, _Request] = field(default_factory=dict)
    _next_request: int = 0
    _broadcasting: bool = False
    joined: bool = False
    """True once ``joined`` was sent."""

    # --- client -> core --------------------------------------------------------------------

    def _request(self, kind: str, client_id: Any, connections: tuple[str, ...] = ()) -> int:
        self._next_request += 1
        self._requests[self._next_request] = _Request(kind, client_id, connections)
        if len(self._requests) > 4096:  # answers that never came: forget the oldest
            self._requests.pop(next(iter(self._requests)))
        return self._next_request

    def receive(self, text: str | bytes) -> list[ev.ClientEvent]:
        """One WebSocket message -> the events for the core. Raises ProtocolError."""
        if len(text) > MAX_MESSAGE_BYTES:
            raise ProtocolError(
                f"message is larger than {MAX_MESSAGE_BYTES} bytes", fatal=True, retry=False
            )
        try:
            message = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError("malformed message: expected JSON") from exc
        if not isinstance(message, dict):
            raise ProtocolError("malformed message: expected a JSON object")
        client_id = message.get("request_id")
        correlator = "" if client_id is None else str(client_id)[:64]
        keys = [k for k in message if k != "request_id"]
        known = [k for k in keys if k in CLIENT_KEYS]
        if len(keys) != 1 or len(known) != 1:
            what = ", ".join(sorted(keys))[:100] or "nothing"
            raise ProtocolError(
                f"unknown message: expected one known key, got {what}", correlator=correlator
            )
        key = known[0]
        body = message[key]
        try:
            return self._decode(key, body, client_id)
        except ProtocolError as exc:
            if not exc.correlator:
                exc.correlator = correlator
            raise

    def _decode(self, key: str, body: Any, client_id: Any) -> list[ev.ClientEvent]:
        if key == "pending_track":
            self._pending_track(body)
            return []
        if key == "offer":
            return [self._offer(body, client_id)]
        if key == "sub_answer":
            sdp = body.get("sdp") if isinstance(body, dict) else None
            if not isinstance(sdp, str) or not sdp:
                raise ProtocolError(
                    "sub_answer needs an sdp", PEER_CONNECTION_CLOSED, fatal=True, retry=True
                )
            return [ev.AnswerSubscriber(version=self._offer_version, sdp=sdp)]
        if key == "candidate":
            return self._candidate(body)
        if key in ("mute_track", "unmute_track"):
            if not isinstance(body, str) or not body:
                raise ProtocolError(f"{key} needs a track id")
            muted = key == "mute_track"
            for pending in self._tracks.values():
                if pending.declaration.track_id == body:
                    d = pending.declaration
                    pending.declaration = ev.TrackDeclaration(
                        d.mid, d.source, muted, d.width, d.height, d.name, d.track_id
                    )
            return [ev.SetMuted(self._request(key, client_id), body, muted)]
        if key in ("subscribe_tracks", "unsubscribe_tracks"):
            return [self._subscription(key, body, client_id)]
        if key == "custom_event":
            if not isinstance(body, dict) or not isinstance(body.get("payload"), str):
                raise ProtocolError("custom_event needs a string payload", CUSTOM_EVENT_FAILED)
            event_id = body.get("id", "")
            return [
                ev.SendCustomEvent(
                    self._request(key, client_id),
                    body["payload"],
                    event_id=str(event_id) if event_id is not None else "",
                )
            ]
        if key == "set_video_quality":
            return [self._video_quality(body, client_id)]
        # set_display_name
        if not isinstance(body, str):
            raise ProtocolError("set_display_name needs a string", DISPLAY_NAME_FAILED)
        return [ev.SetDisplayName(self._request(key, client_id), body)]

    def _video_quality(self, body: Any, client_id: Any) -> ev.SetVideoQuality:
        if not isinstance(body, dict) or not isinstance(body.get("tid"), str):
            raise ProtocolError("set_video_quality needs a tid")
        quality = body.get("quality") or ""
        if quality not in ("", "low", "medium", "high", "off"):
            raise ProtocolError("set_video_quality: quality must be low, medium, high or off")
        width, height = body.get("width") or 0, body.get("height") or 0
        if not all(isinstance(v, int) and 0 <= v <= 16384 for v in (width, height)):
            raise ProtocolError("set_video_quality: bad width or height")
        return ev.SetVideoQuality(
            self._request("set_video_quality", client_id), body["tid"], quality, width, height
        )

    def _pending_track(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise ProtocolError("pending_track needs an object", INVALID_PENDING_TRACK)
        tid, mid = body.get("tid"), body.get("mid")
        kind = KINDS_BY_NUMBER.get(body.get("type"))  # type: ignore[arg-type]
        source = body.get("source")
        name = body.get("name") or ""
        if not isinstance(tid, str) or not TID.fullmatch(tid):
            raise ProtocolError("pending_track: tid must be a short id", INVALID_PENDING_TRACK)
        if not isinstance(mid, str) or not mid or len(mid) > 32:
            raise ProtocolError("pending_track: missing mid", INVALID_PENDING_TRACK)
        if kind is None:
            raise ProtocolError("pending_track: type must be 1 or 2", INVALID_PENDING_TRACK)
        if source not in ev.SOURCES:
            raise ProtocolError("pending_track: unknown source", INVALID_PENDING_TRACK)
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
            raise ProtocolError("pending_track: name is too long", INVALID_PENDING_TRACK)
        width, height = body.get("width") or 0, body.get("height") or 0
        if not all(isinstance(v, int) and 0 <= v <= 16384 for v in (width, height)):
            raise ProtocolError("pending_track: bad width or height", INVALID_PENDING_TRACK)
        self._tracks[mid] = _Pending(
            ev.TrackDeclaration(
                mid=mid,
                source=source,
                muted=bool(body.get("muted")),
                width=width,
                height=height,
                name=name,
                track_id=tid,
            ),
            kind,
        )

    def _offer(self, body: Any, client_id: Any) -> ev.Publish:
        if not isinstance(body, str) or not body.strip():
            raise ProtocolError(
                "offer needs an sdp string", PEER_CONNECTION_CLOSED, fatal=True, retry=True
            )
        declared: list[ev.TrackDeclaration] = []
        for kind, mid, direction in sdp_sections(body):
            pending = self._tracks.get(mid)
            if pending is None or pending.kind != kind:
                continue
            if direction in ("sendonly", "sendrecv"):
                declared.append(pending.declaration)
            else:
                del self._tracks[mid]  # unpublished: an inactive m-section
        return ev.Publish(self._request("offer", client_id), body, tuple(declared))

    def _candidate(self, body: Any) -> list[ev.ClientEvent]:
        if not isinstance(body, dict) or not isinstance(body.get("candidate"), dict):
            raise ProtocolError("candidate needs a candidate object")
        inner = body["candidate"]
        text = inner.get("candidate") or ""
        if not isinstance(text, str):
            raise ProtocolError("candidate must be a string")
        if not text:
            return []  # Chrome's end-of-gathering marker per m-line: nothing to add
        connection = ev.SUBSCRIBER_CONNECTION if body.get("type") == 1 else ev.PUBLISHER_CONNECTION
        index = inner.get("sdp_mline_index") or 0
        return [
            ev.AddIceCandidate(
                connection=connection,
                candidate=text,
                sdp_mid=str(inner.get("sdp_mid") or ""),
                sdp_mline_index=index if isinstance(index, int) else 0,
            )
        ]

    def _subscription(self, key: str, body: Any, client_id: Any) -> ev.SetSubscription:
        connections = body.get("connections") if isinstance(body, dict) else None
        if not isinstance(connections, list):
            raise ProtocolError(f"{key} needs a list of connections")
        named: list[str] = []
        for item in connections:
            if not isinstance(item, dict) or not isinstance(item.get("connection_id"), str):
                raise ProtocolError(f"{key}: each connection needs a connection_id")
            tids = item.get("track_ids") or []
            if not isinstance(tids, list) or not all(isinstance(t, str) for t in tids):
                raise ProtocolError(f"{key}: track_ids must be a list of strings")
            cid = item["connection_id"]
            named.append(cid)
            if key == "subscribe_tracks":
                previous = self._manual.get(cid)
                if previous is None or not tids or previous == ():
                    self._manual[cid] = () if not tids or previous == () else tuple(tids)
                else:
                    self._manual[cid] = tuple(dict.fromkeys((*previous, *tids)))
            elif not tids:
                self._manual.pop(cid, None)
            else:
                kept = tuple(t for t in self._manual.get(cid, ()) if t not in tids)
                if kept:
                    self._manual[cid] = kept
                else:
                    self._manual.pop(cid, None)
        return ev.SetSubscription(
            request_id=self._request(key, client_id, tuple(named)),
            mode=ev.SUBSCRIPTION_MANUAL,
            entries=tuple(
                ev.SubscriptionEntry(connection_id=cid, track_ids=tids)
                for cid, tids in self._manual.items()
            ),
        )

    # --- core -> client --------------------------------------------------------------------

    def send(self, event: ev.ServerEvent) -> list[dict[str, Any]]:
        """One event of the core -> the JSON messages for the client, in order."""
        if isinstance(event, ev.Joined):
            self._joined = event
            return []
        if isinstance(event, ev.BroadcastStateChanged) and not self.joined:
            self._broadcasting = event.broadcasting  # told in joined.broadcasting
            return []
        if isinstance(event, ev.SubscriberOffered):
            self._offer_version = event.version
            if not self.joined:
                return self._joined_message(event.sdp)
            return [{"sub_offer": {"sfu_id": self.sfu_id, "sdp": event.sdp}}]
        messages = self._translate(event)
        if not self.joined and self._joined is not None:
            self._held.extend(messages)
            return []
        return messages

    def _joined_message(self, sdp: str) -> list[dict[str, Any]]:
        joined = self._joined
        if joined is None:
            return []
        info = self.info
        self.joined = True
        message = {
            "joined": {
                "session_id": joined.active_session_id,
                "connection_id": joined.connection_id,
                "participant_id": joined.participant_id,
                "display_name": joined.display_name,
                "participants": [participant_entry(p) for p in joined.participants],
                "sub_sfus": [{"sfu_id": self.sfu_id, "sdp": sdp}],
                "ice_servers": [
                    {
                        "urls": list(s.urls),
                        "username": s.username,
                        "credential": s.credential,
                        "credential_type": "password",
                    }
                    for s in info.ice_servers
                ],
                "limits": {
                    "custom_events_per_second": info.custom_events_per_second,
                    "default_track_limit": info.tracks_per_source,
                    "seconds_per_set_display_name": info.display_name_interval_seconds,
                },
                "simulcast": {
                    "camera_encodings": [dict(e) for e in info.camera_encodings],
                    "screenshare_encodings": [dict(e) for e in info.screenshare_encodings],
                },
                "broadcasting": self._broadcasting,
                "watchrtc_token": "",
            }
        }
        held, self._held = self._held, []
        return [message, *held]

    def _answering(self, request_id: int, message: dict[str, Any]) -> dict[str, Any]:
        request = self._requests.pop(request_id, None)
        if request is not None and request.client_id is not None:
            message["request_id"] = request.client_id
        return message

    def _translate(self, event: ev.ServerEvent) -> list[dict[str, Any]]:
        if isinstance(event, ev.PublishAnswered):
            self._requests.pop(event.request_id, None)
            return [{"answer": event.sdp}]
        if isinstance(event, ev.ParticipantJoined):
            return [{"participant_connected": participant_entry(event.participant)}]
        if isinstance(event, ev.ParticipantLeft):
            self._manual.pop(event.connection_id, None)
            return [{"participant_disconnected": {"connection_id": event.connection_id}}]
        if isinstance(event, ev.TrackPublished):
            return [
                {
                    "add_track": {
                        "connection_id": event.connection_id,
                        "track": track_entry(event.track),
                    }
                }
            ]
        if isinstance(event, ev.TrackUnpublished):
            return [
                {
                    "remove_track": {
                        "connection_id": event.connection_id,
                        "track": {"tid": event.track_id},
                    }
                }
            ]
        if isinstance(event, ev.TrackMuted):
            key = "track_muted" if event.muted else "track_unmuted"
            return [{key: {"connection_id": event.connection_id, "track": {"tid": event.track_id}}}]
        if isinstance(event, ev.ActiveSpeakers):
            return [
                {
                    "active_speakers": {
                        "tracks": [
                            {"connection_id": s.connection_id, "track_id": s.track_id}
                            for s in event.speakers
                            if s.track_id
                        ]
                    }
                }
            ]
        if isinstance(event, ev.CustomEventDelivered):
            message: dict[str, Any] = {
                "custom_event": {
                    "id": event.event_id,
                    "payload": event.payload,
                    "scope": 1,
                    "connection_id": event.connection_id,
                    "sequence_num": event.seq,
                }
            }
            return [self._answering(event.request_id, message) if event.request_id else message]
        if isinstance(event, ev.DisplayNameChanged):
            message = {
                "participant_update": {
                    "connection_id": event.connection_id,
                    "display_name": event.display_name,
                }
            }
            return [self._answering(event.request_id, message) if event.request_id else message]
        if isinstance(event, ev.SubscriptionUpdated):
            request = self._requests.get(event.request_id)
            if request is None:
                return []
            failed = {e.connection_id for e in event.failures}
            reply = {
                request.kind: {
                    "successes": [
                        {"connection_id": c} for c in request.connections if c not in failed
                    ],
                    "failures": [{"connection_id": c} for c in request.connections if c in failed],
                }
            }
            return [self._answering(event.request_id, reply)]
        if isinstance(event, ev.BroadcastStateChanged):
            # The SDK dispatches on the first truthy key: "not broadcasting" cannot be 0.
            return [{"broadcast_state_update": BROADCASTING if event.broadcasting else IDLE}]
        if isinstance(event, ev.AudioOnly):
            if not self.info.spaces_client:
                return []
            return [
                {
                    "audio_only": {
                        "active": event.active,
                        "estimated_bitrate": event.estimated_bitrate,
                    }
                }
            ]
        if isinstance(event, ev.LayersWanted):
            if not self.info.spaces_client:
                return []
            return [{"layers_wanted": {"tid": event.track_id, "rids": list(event.rids)}}]
        if isinstance(event, ev.Ack):
            self._requests.pop(event.request_id, None)
            return []
        if isinstance(event, ev.RequestFailed):
            return [self._request_error(event)]
        if isinstance(event, ev.Closing):
            if event.reason == ev.CLOSE_ERROR:
                return [
                    error_message(PEER_CONNECTION_CLOSED, event.message, fatal=True, retry=True)
                ]
            return []
        return []

    def _request_error(self, event: ev.RequestFailed) -> dict[str, Any]:
        request = self._requests.pop(event.request_id, None)
        kind = request.kind if request is not None else ""
        correlator = "" if request is None or request.client_id is None else str(request.client_id)
        limited = event.code == "RESOURCE_EXHAUSTED"
        fatal = retry = event.fatal
        if kind == "custom_event":
            type = CUSTOM_EVENT_RATE_LIMITED if limited else CUSTOM_EVENT_FAILED
        elif kind == "set_display_name":
            type = DISPLAY_NAME_RATE_LIMITED if limited else DISPLAY_NAME_FAILED
        elif kind == "offer" and event.code == "INVALID_ARGUMENT" and "sdp" in event.message:
            # The offer cannot be answered, and the SDK serialises its negotiations: only a
            # fresh connection gets it publishing again.
            type, fatal, retry = PEER_CONNECTION_CLOSED, True, True
        else:
            type = UNKNOWN
        return error_message(type, event.message, fatal=fatal, retry=retry, correlator=correlator)
