"""Conversions between stored records (flat string maps, as Redis hashes hold them) and the
API's protobuf messages. Both stores keep records in this one shape (text only), so both convert
the same way."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping

from spaces.v1 import broadcast_pb2, event_pb2, node_pb2, participant_pb2, space_pb2

Record = Mapping[str, str]

ROLE_NAMES = {
    participant_pb2.ROLE_PUBLISHER: "publisher",
    participant_pb2.ROLE_SUBSCRIBER: "subscriber",
}
ROLES_BY_NAME = {v: k for k, v in ROLE_NAMES.items()}

EVENT_TYPES = {
    "space_created": event_pb2.EVENT_TYPE_SPACE_CREATED,
    "space_updated": event_pb2.EVENT_TYPE_SPACE_UPDATED,
    "space_active": event_pb2.EVENT_TYPE_SPACE_ACTIVE,
    "space_idle": event_pb2.EVENT_TYPE_SPACE_IDLE,
    "space_deleted": event_pb2.EVENT_TYPE_SPACE_DELETED,
    "participant_joined": event_pb2.EVENT_TYPE_PARTICIPANT_JOINED,
    "participant_left": event_pb2.EVENT_TYPE_PARTICIPANT_LEFT,
    "node_state_changed": event_pb2.EVENT_TYPE_NODE_STATE_CHANGED,
    "broadcast_created": event_pb2.EVENT_TYPE_BROADCAST_CREATED,
    "broadcast_active": event_pb2.EVENT_TYPE_BROADCAST_ACTIVE,
    "broadcast_idle": event_pb2.EVENT_TYPE_BROADCAST_IDLE,
    "broadcast_deleted": event_pb2.EVENT_TYPE_BROADCAST_DELETED,
}

LAYOUT_NAMES = {
    broadcast_pb2.BROADCAST_LAYOUT_GALLERY: "gallery",
    broadcast_pb2.BROADCAST_LAYOUT_ACTIVE_SPEAKER: "active-speaker",
    broadcast_pb2.BROADCAST_LAYOUT_CROP: "crop",
}
"""Layouts by Mux's names, as stored and sent in webhooks."""
LAYOUTS_BY_NAME = {v: k for k, v in LAYOUT_NAMES.items()}
RESOLUTION_NAMES = {
    broadcast_pb2.BROADCAST_RESOLUTION_1920X1080: "1920x1080",
    broadcast_pb2.BROADCAST_RESOLUTION_1280X720: "1280x720",
    broadcast_pb2.BROADCAST_RESOLUTION_1080X1920: "1080x1920",
    broadcast_pb2.BROADCAST_RESOLUTION_720X1280: "720x1280",
    broadcast_pb2.BROADCAST_RESOLUTION_1080X1080: "1080x1080",
    broadcast_pb2.BROADCAST_RESOLUTION_720X720: "720x720",
}
"""Mux's resolution names, as stored and sent in webhooks."""
RESOLUTIONS_BY_NAME = {v: k for k, v in RESOLUTION_NAMES.items()}


def flat_to_dict(flat: list[bytes] | list[str]) -> dict[str, str]:
    """[k1, v1, k2, v2] (as HGETALL-style Lua replies) -> {k1: v1, ...}."""
    items = [x.decode() if isinstance(x, bytes) else str(x) for x in flat]
    return dict(zip(items[0::2], items[1::2], strict=True))


def space_from_record(h: Record, participant_count: int | None = None) -> space_pb2.Space:
    count = participant_count if participant_count is not None else int(h.get("count", "0"))
    return space_pb2.Space(
        id=h.get("id", ""),
        created_at=int(h.get("created_at", "0") or 0),
        status=(
            space_pb2.SPACE_STATUS_ACTIVE
            if h.get("status") == "active"
            else space_pb2.SPACE_STATUS_IDLE
        ),
        passthrough=h.get("passthrough", ""),
        active_session_id=h.get("session", ""),
        max_participants=int(h.get("max", "0") or 0),
        participant_count=count,
        broadcasts=[broadcast_from_record(b) for b in _broadcast_list(h.get("broadcasts", ""))],
    )


def _broadcast_list(text: str) -> list[dict[str, str]]:
    """The JSON list of broadcast records an event's space carries (Lua's cjson writes an empty
    list as {})."""
    if not text:
        return []
    data = json.loads(text)
    return [{k: str(v) for k, v in b.items()} for b in data] if isinstance(data, list) else []


def broadcast_from_record(h: Record, holder: str | None = None) -> broadcast_pb2.Broadcast:
    """A broadcast record (keys.broadcast_key) -> Broadcast. ``holder`` is its lease's value
    when read with it: without a live lease no worker streams it, whatever the record says."""
    active = h.get("status") == "active"
    worker = h.get("worker", "") if active else ""
    if holder is not None:
        worker = holder.partition(" ")[0] if active else ""
    return broadcast_pb2.Broadcast(
        id=h.get("id", ""),
        space_id=h.get("space", ""),
        created_at=int(h.get("created_at", "0") or 0),
        status=(
            broadcast_pb2.BROADCAST_STATUS_ACTIVE if active else broadcast_pb2.BROADCAST_STATUS_IDLE
        ),
        layout=LAYOUTS_BY_NAME.get(h.get("layout", ""), broadcast_pb2.BROADCAST_LAYOUT_GALLERY),
        resolution=RESOLUTIONS_BY_NAME.get(
            h.get("res", ""), broadcast_pb2.BROADCAST_RESOLUTION_1920X1080
        ),
        rtmp_url=h.get("url", ""),
        background=h.get("bg", ""),
        background_sha256=h.get("bgsha", ""),
        passthrough=h.get("pass", ""),
        worker_id=worker,
        last_error=h.get("err", "") if active else "",
        started_at_ms=int(h.get("started", "0") or 0),
        streaming=active and bool(worker) and h.get("streaming") == "1",
    )


def participant_from_record(
    space_id: str, h: Record, lease_expires_at_ms: int = 0
) -> participant_pb2.Participant:
    return participant_pb2.Participant(
        space_id=space_id,
        participant_id=h.get("pid", ""),
        connection_id=h.get("cid", ""),
        role=ROLES_BY_NAME.get(h.get("role", ""), participant_pb2.ROLE_PUBLISHER),
        display_name=h.get("name", ""),
        state=(
            participant_pb2.PARTICIPANT_STATE_CONNECTED
            if h.get("state") == "connected"
            else participant_pb2.PARTICIPANT_STATE_PENDING
        ),
        node_id=h.get("node", ""),
        joined_at_ms=int(h.get("joined", "0") or 0),
        lease_expires_at_ms=lease_expires_at_ms,
    )


def event_from_entry(entry_id: str, fields: Record) -> event_pb2.Event:
    """A stream entry (see keys.EVENTS) -> Event."""
    space_id = fields.get("s", "")
    event = event_pb2.Event(
        id=entry_id,
        type=EVENT_TYPES.get(fields.get("t", ""), event_pb2.EVENT_TYPE_UNSPECIFIED),
        created_at_ms=int(fields.get("ts", "0") or 0),
        space_id=space_id,
        reason=fields.get("r", ""),
    )
    subject = {k[2:]: v for k, v in fields.items() if k.startswith("x.")}
    kind = fields.get("k", "")
    if kind == "space":
        event.space.CopyFrom(space_from_record(subject))
    elif kind == "participant":
        event.participant.CopyFrom(participant_from_record(space_id, subject))
    elif kind == "node":
        event.node.CopyFrom(node_from_entry(subject))
    elif kind == "broadcast":
        event.broadcast.CopyFrom(broadcast_from_record(subject))
    return event


def node_to_text(node: node_pb2.Node) -> str:
    """Node records are kept as base64 text, so every stored field is a string."""
    return base64.b64encode(node.SerializeToString()).decode()


def node_from_text(text: str, updated_at_ms: int | None = None) -> node_pb2.Node:
    node = node_pb2.Node()
    node.ParseFromString(base64.b64decode(text))
    if updated_at_ms is not None:
        node.updated_at_ms = updated_at_ms
    return node


def node_from_entry(subject: Record) -> node_pb2.Node:
    at = subject.get("at")
    return node_from_text(subject.get("pb", ""), int(at) if at else None)


def command_to_text(command: node_pb2.NodeCommand) -> str:
    return base64.b64encode(command.SerializeToString()).decode()


def command_from_text(text: str) -> node_pb2.NodeCommand:
    command = node_pb2.NodeCommand()
    command.ParseFromString(base64.b64decode(text))
    return command
