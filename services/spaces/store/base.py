"""The store protocol: every piece of shared state, behind one interface with two implementations.

``MemoryStore`` (spaces.store.memory) is the embedded single-process mode; ``RedisStore``
(spaces.store.redis) is the distributed production path. tests/test_store_contract.py runs one
suite against both. Only the store talks to Redis.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from spaces.v1 import event_pb2, node_pb2, participant_pb2, space_pb2


@dataclass(frozen=True)
class SigningKeyRecord:
    id: str
    created_at: int
    public_key_pem: bytes


@dataclass(frozen=True)
class JoinContext:
    """What Join reads before verifying the token, in one round trip."""

    signing_key: SigningKeyRecord | None
    placement: str
    """The space's current node ("" = none)."""
    space_exists: bool


@dataclass(frozen=True)
class Reservation:
    """What Join asks the store to admit, atomically."""

    space_id: str
    connection_id: str
    participant_id: str
    generated_participant_id: bool
    role: str
    """"publisher" or "subscriber"."""
    display_name: str
    ticket_hash: str
    resume_hash: str
    node_id: str
    expected_node_id: str
    """The placement the caller read ("" = none); if it changed, PlacementMoved is raised."""
    pending_ms: int
    placement_ms: int
    default_max_participants: int
    resume_connection_id: str = ""
    presented_resume_hash: str = ""


@dataclass(frozen=True)
class Admission:
    participant_id: str
    joined_at_ms: int
    expires_at_ms: int
    replaced_connection_id: str = ""
    replaced_node_id: str = ""


class PlacementMoved(Exception):
    """The space's placement changed between read and join; choose again."""

    def __init__(self, current_node_id: str) -> None:
        super().__init__(current_node_id)
        self.current_node_id = current_node_id


@dataclass(frozen=True)
class Claim:
    """A connection a media node claimed with its ticket."""

    participant: participant_pb2.Participant
    space: space_pb2.Space
    epoch: str
    lease_expires_at_ms: int
    connection_record: dict[str, str]
    space_record: dict[str, str]


@dataclass(frozen=True)
class RenewResult:
    epoch: str
    moved: bool
    """The space's placement now names another node: its sessions here must move."""
    lost: dict[str, str] = field(default_factory=dict)
    """connection_id -> reason, for connections this node no longer holds."""


@dataclass(frozen=True)
class SpaceDeletion:
    node_id: str
    removed: list[tuple[str, str]]
    """(connection_id, node_id) of every connection the delete removed."""


@dataclass(frozen=True)
class NodeView:
    """The registry as read at one instant of store time."""

    now_ms: int
    nodes: list[node_pb2.Node]


class Store(Protocol):
    """Shared state of spaces, signing keys, presence, the node registry and events."""

    # --- lifecycle
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def now_ms(self) -> int: ...

    # --- spaces
    async def create_space(
        self, space_id: str, passthrough: str, max_participants: int
    ) -> space_pb2.Space: ...
    async def get_space(self, space_id: str) -> space_pb2.Space: ...
    async def list_spaces(
        self, limit: int, after_seq: int
    ) -> tuple[list[space_pb2.Space], int | None]: ...
    async def update_space(
        self, space_id: str, passthrough: str | None, max_participants: int | None
    ) -> space_pb2.Space: ...
    async def delete_space(self, space_id: str, force: bool) -> SpaceDeletion: ...

    # --- signing keys
    async def create_signing_key(self, key_id: str, public_key_pem: bytes) -> SigningKeyRecord: ...
    async def get_signing_key(self, key_id: str) -> SigningKeyRecord | None: ...
    async def list_signing_keys(
        self, limit: int, after_seq: int
    ) -> tuple[list[SigningKeyRecord], int | None]: ...
    async def delete_signing_key(self, key_id: str) -> bool: ...

    # --- presence
    async def join_context(self, space_id: str, key_id: str) -> JoinContext:
        """The signing key, the current placement and whether the space exists."""
        ...

    async def join(self, reservation: Reservation) -> Admission: ...
    async def claim(
        self,
        space_id: str,
        connection_id: str,
        ticket_hash: str,
        node_id: str,
        session_ms: int,
        placement_ms: int,
        session_id: str,
    ) -> Claim: ...
    async def renew(
        self,
        space_id: str,
        node_id: str,
        session_ms: int,
        placement_ms: int,
        epoch: str,
        space_record: dict[str, str],
        connection_records: list[dict[str, str]],
    ) -> RenewResult: ...
    async def leave(
        self,
        space_id: str,
        connection_id: str,
        reason: str,
        node_id: str = "",
        resume_hash: str = "",
    ) -> participant_pb2.Participant | None: ...
    async def remove_participant(
        self, space_id: str, participant_id: str, reason: str
    ) -> participant_pb2.Participant: ...
    async def get_participant(
        self, space_id: str, participant_id: str
    ) -> participant_pb2.Participant: ...
    async def list_participants(self, space_id: str) -> list[participant_pb2.Participant]: ...
    async def set_display_name(self, space_id: str, connection_id: str, name: str) -> bool: ...
    async def reap(self, max_spaces: int = 100) -> int: ...

    # --- media node registry and commands
    async def heartbeat(self, node: node_pb2.Node, record_ttl_ms: int) -> int: ...
    async def remove_node(self, node: node_pb2.Node) -> None: ...
    async def list_nodes(self, record_ttl_ms: int) -> NodeView: ...
    async def publish_node_command(self, node_id: str, command: node_pb2.NodeCommand) -> None: ...
    def node_commands(self, node_id: str) -> AsyncIterator[node_pb2.NodeCommand]:
        """Commands for one node, until cancelled. Survives store reconnects."""
        ...

    # --- events
    async def latest_event_id(self) -> str: ...
    async def read_events(
        self, after_id: str, count: int, block_ms: int
    ) -> list[event_pb2.Event]: ...
