"""Mux's webhook envelope, and the mapping from stream events to Mux event names.

A delivery's body is ``{"type", "object", "id", "created_at", "data", "attempts"}``, as Mux sent
it. ``data`` is the Space in Mux's JSON shape (``created_at`` as a string of unix seconds,
``status`` "idle" or "active"), or the Participant for the participant events Spaces adds.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from spaces.store.base import WebhookJob
from spaces.store.codec import LAYOUT_NAMES, RESOLUTION_NAMES, ROLE_NAMES
from spaces.v1 import broadcast_pb2, event_pb2, participant_pb2, space_pb2

logger = logging.getLogger(__name__)

EVENT_NAMES: dict[int, str] = {
    event_pb2.EVENT_TYPE_SPACE_CREATED: "video.space.created",
    event_pb2.EVENT_TYPE_SPACE_ACTIVE: "video.space.active",
    event_pb2.EVENT_TYPE_SPACE_IDLE: "video.space.idle",
    event_pb2.EVENT_TYPE_SPACE_UPDATED: "video.space.updated",
    event_pb2.EVENT_TYPE_SPACE_DELETED: "video.space.deleted",
    event_pb2.EVENT_TYPE_PARTICIPANT_JOINED: "video.space.participant.joined",
    event_pb2.EVENT_TYPE_PARTICIPANT_LEFT: "video.space.participant.left",
    event_pb2.EVENT_TYPE_BROADCAST_CREATED: "video.space.broadcast.created",
    event_pb2.EVENT_TYPE_BROADCAST_ACTIVE: "video.space.broadcast.active",
    event_pb2.EVENT_TYPE_BROADCAST_IDLE: "video.space.broadcast.idle",
    event_pb2.EVENT_TYPE_BROADCAST_DELETED: "video.space.broadcast.deleted",
}
"""Stream event type -> Mux event name. Node events are internal and never webhooks."""

KNOWN_EVENT_NAMES = frozenset(EVENT_NAMES.values())

_ENVELOPE_IDS = uuid.UUID("6c1b3f0e-5d0a-4f43-9a52-0d7c9a1e2b11")
"""Namespace for envelope ids: a stable UUID per stream entry, so every retry and every replica
sends the same id and receivers can de-duplicate on it."""

MAX_RESPONSE_BODY = 1024
"""Bytes of an endpoint's reply kept in the attempt record."""


def envelope_id(stream_id: str) -> str:
    return str(uuid.uuid5(_ENVELOPE_IDS, stream_id))


def iso_time(unix_ms: int) -> str:
    """Mux's timestamp format: "2023-01-17T17:21:31.000000Z"."""
    seconds, ms = divmod(int(unix_ms), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}000Z"


def space_data(space: space_pb2.Space) -> dict[str, Any]:
    """A Space as Mux's REST API and webhooks showed it, plus Spaces' own fields."""
    active = space.status == space_pb2.SPACE_STATUS_ACTIVE
    data: dict[str, Any] = {
        "id": space.id,
        "created_at": str(space.created_at),
        "type": "server",
        "status": "active" if active else "idle",
        "broadcasts": [broadcast_data(b) for b in space.broadcasts],
        "max_participants": space.max_participants,
        "participant_count": space.participant_count,
    }
    # Mux left these out when unset rather than sending empty strings.
    if space.passthrough:
        data["passthrough"] = space.passthrough
    if space.active_session_id:
        data["active_session_id"] = space.active_session_id
    return data


def broadcast_data(broadcast: broadcast_pb2.Broadcast) -> dict[str, Any]:
    """A Broadcast as Mux showed it (layout and resolution by name), with Spaces' own fields
    (the RTMP URL without its stream key, the worker streaming it). Never the stream key."""
    active = broadcast.status == broadcast_pb2.BROADCAST_STATUS_ACTIVE
    data: dict[str, Any] = {
        "id": broadcast.id,
        "space_id": broadcast.space_id,
        "created_at": str(broadcast.created_at),
        "status": "active" if active else "idle",
        "layout": LAYOUT_NAMES.get(broadcast.layout, "gallery"),
        "resolution": RESOLUTION_NAMES.get(broadcast.resolution, "1920x1080"),
        "rtmp_url": broadcast.rtmp_url,
    }
    if broadcast.background:
        data["background"] = broadcast.background if broadcast.background != "inline" else ""
    if broadcast.passthrough:
        data["passthrough"] = broadcast.passthrough
    return data


def participant_data(participant: participant_pb2.Participant, reason: str) -> dict[str, Any]:
    return {
        "id": participant.participant_id,
        "participant_id": participant.participant_id,
        "connection_id": participant.connection_id,
        "space_id": participant.space_id,
        "role": ROLE_NAMES.get(participant.role, "publisher"),
        "display_name": participant.display_name,
        "joined_at": iso_time(participant.joined_at_ms) if participant.joined_at_ms else None,
        "reason": reason,
    }


def envelope(event: event_pb2.Event) -> dict[str, Any] | None:
    """The envelope of one stream event, without ``attempts``; None if it is no webhook."""
    name = EVENT_NAMES.get(event.type)
    if name is None:
        return None
    subject = event.WhichOneof("subject")
    obj = {"id": event.space_id, "type": "space"}
    if subject == "space":
        data = space_data(event.space)
    elif subject == "broadcast":
        data = broadcast_data(event.broadcast)
        obj = {"id": event.broadcast.id, "type": "broadcast"}
    elif subject == "participant":
        data = participant_data(event.participant, event.reason)
    else:
        return None
    return {
        "type": name,
        "object": obj,
        "id": envelope_id(event.id),
        "created_at": iso_time(event.created_at_ms),
        "data": data,
    }


def job_for(event: event_pb2.Event) -> WebhookJob:
    """What the fan-out enqueues for one event. An event that cannot be rendered is only
    acknowledged: leaving it pending would hold back every delivery (the fan-out watermark)."""
    try:
        body = envelope(event)
    except Exception:
        logger.exception("event %s: cannot render a webhook; skipping it", event.id)
        body = None
    if body is None:
        return WebhookJob(stream_id=event.id)
    return WebhookJob(
        stream_id=event.id,
        envelope_id=body["id"],
        space_id=event.space_id,
        event_type=body["type"],
        body=json.dumps(body, separators=(",", ":")),
    )


def with_attempts(body: str, history: str) -> bytes:
    """The bytes sent for one attempt: the stored envelope plus the earlier attempts."""
    envelope_ = json.loads(body)
    envelope_["attempts"] = json.loads(history)
    return json.dumps(envelope_, separators=(",", ":")).encode()


def attempt_record(
    *,
    endpoint_id: str,
    url: str,
    at_ms: int,
    status: int | None,
    response_body: str,
    error: str,
    max_attempts: int,
) -> str:
    """One entry of the envelope's ``attempts``, in Mux's field names (JSON text)."""
    return json.dumps(
        {
            "id": str(uuid.uuid4()),
            "webhook_id": endpoint_id,
            "address": url,
            "created_at": iso_time(at_ms),
            "response_status_code": status,
            "response_body": response_body[:MAX_RESPONSE_BODY] if response_body else None,
            "response_headers": {},
            "max_attempts": max_attempts,
            "error": error or None,
        },
        separators=(",", ":"),
    )
