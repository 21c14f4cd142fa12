"""The store protocol: every piece of shared state, behind one interface with two implementations.

``MemoryStore`` (spaces.store.memory) is the embedded single-process mode; ``RedisStore``
(spaces.store.redis) is the distributed production path. tests/test_store_contract.py runs one
suite against both. Only the store talks to Redis.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from spaces.v1 import broadcast_pb2, event_pb2, node_pb2, participant_pb2, space_pb2


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
    signing_key_id: str = ""
    """When set, the join fails (TokenUnknownKey) unless this signing key still exists: lets
    presence verify signatures with a cached public key and still honour revocation at once."""
    token_hash: str = ""
    """SHA-256 of the join token, kept with the connection: a reconnect presenting the same
    token may take the connection over (``reconnect_participant_id``)."""
    reconnect_participant_id: str = ""
    """A client reconnecting with only its token: take over this participant's connection if
    it was admitted with the same token, or get the participant_id back once it is gone (for
    gone_ttl). Otherwise the join proceeds as a new one (and meets a live holder as a
    duplicate)."""


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
class BroadcastSpec:
    """A validated CreateBroadcast, as the store keeps it (keys.broadcast_key)."""

    space_id: str
    broadcast_id: str
    layout: str
    """Mux's name: "gallery", "active-speaker" or "crop"."""
    resolution: str
    """Mux's name, e.g. "1920x1080"."""
    rtmp_url: str
    """Without the stream key."""
    stream_key: str
    background_source: str
    """The URL, the file path, "inline", or "" for none."""
    background: bytes
    """The validated image (PNG or JPEG); empty for none."""
    background_sha256: str
    passthrough: str


@dataclass(frozen=True)
class BroadcastJob:
    """What a worker gets when it claims a broadcast: everything it needs to stream one run."""

    space_id: str
    broadcast_id: str
    run: str
    """The broadcast's start count: a Stop and a new Start make a new run."""
    layout: str
    resolution: str
    rtmp_url: str
    stream_key: str
    background: bytes
    holder: str
    """The lease value this worker holds ("<worker_id> <token>")."""


@dataclass(frozen=True)
class HiddenReservation:
    """A broadcaster worker's hidden subscriber connection (see keys.JOIN_HIDDEN)."""

    space_id: str
    connection_id: str
    participant_id: str
    display_name: str
    ticket_hash: str
    pending_ms: int
    broadcast_id: str
    holder: str


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

    # --- broadcasts (keys.py, "broadcasts", documents the records and scripts)
    async def create_broadcast(self, spec: BroadcastSpec, limit: int) -> broadcast_pb2.Broadcast:
        """BroadcastLimitReached beyond ``limit`` broadcasts in the space."""
        ...

    async def get_broadcast(self, space_id: str, broadcast_id: str) -> broadcast_pb2.Broadcast: ...
    async def list_broadcasts(self, space_id: str) -> list[broadcast_pb2.Broadcast]:
        """In creation order; SpaceNotFound for an unknown space."""
        ...

    async def delete_broadcast(self, space_id: str, broadcast_id: str) -> None:
        """BroadcastActive while it is ACTIVE."""
        ...

    async def start_broadcast(
        self, space_id: str, broadcast_id: str
    ) -> tuple[broadcast_pb2.Broadcast, str]:
        """ACTIVE, if the space is (else SpaceIdle); returns it and the space's node ("")."""
        ...

    async def stop_broadcast(
        self, space_id: str, broadcast_id: str
    ) -> tuple[broadcast_pb2.Broadcast, str]:
        """IDLE; returns it and the space's node ("")."""
        ...

    async def broadcasts_due(self, limit: int) -> list[tuple[str, str]]:
        """(space_id, broadcast_id) of ACTIVE broadcasts no worker holds a live lease on."""
        ...

    async def claim_broadcast(
        self, space_id: str, broadcast_id: str, holder: str, worker_id: str, lease_ms: int
    ) -> BroadcastJob | None:
        """SET NX PX on the broadcast's lease; None if it is held or no longer ACTIVE."""
        ...

    async def renew_broadcast(
        self,
        space_id: str,
        broadcast_id: str,
        holder: str,
        lease_ms: int,
        run: str,
        streaming: bool,
        error: str,
    ) -> str:
        """ "ok", "lost" (another worker holds it) or "stopped" (idle, deleted or restarted)."""
        ...

    async def release_broadcast(self, space_id: str, broadcast_id: str, holder: str) -> bool:
        """Compare-and-delete of the lease; the broadcast is due for a claim at once."""
        ...

    async def join_hidden(self, reservation: HiddenReservation) -> tuple[str, int]:
        """Reserve a hidden subscriber on the space's node for the broadcast's lease holder:
        (node_id, ticket expiry ms). SpaceIdle or BroadcastLeaseLost otherwise."""
        ...

    # --- events
    async def latest_event_id(self) -> str: ...
    async def read_events(
        self, after_id: str, count: int, block_ms: int
    ) -> list[event_pb2.Event]: ...

    # --- webhooks (see keys.py, "webhooks", for the delivery design) ----------------------------
    async def webhook_put_endpoint(self, endpoint: WebhookEndpointRecord) -> None:
        """Create or replace an endpoint."""
        ...

    async def webhook_endpoints(self) -> list[WebhookEndpointRecord]:
        """Every endpoint, oldest first."""
        ...

    async def webhook_delete_endpoint(self, endpoint_id: str) -> bool:
        """Delete an endpoint with its queued deliveries and dead letters; False if unknown."""
        ...

    async def webhook_group_ensure(self) -> None:
        """Create the consumer group on the event stream (at its current end) if missing."""
        ...

    async def webhook_read(self, consumer: str, count: int, block_ms: int) -> list[event_pb2.Event]:
        """New events for this consumer of the group; they stay pending until fanned out."""
        ...

    async def webhook_claim_stale(
        self, consumer: str, min_idle_ms: int, count: int
    ) -> list[event_pb2.Event]:
        """Take over events another consumer read but has not fanned out for min_idle_ms."""
        ...

    async def webhook_fan_out(self, jobs: Sequence[WebhookJob]) -> int:
        """Acknowledge events and enqueue them for every endpoint that wants them, atomically.
        Events already acknowledged (by a consumer that reclaimed them) enqueue nothing.
        Returns the number of deliveries enqueued."""
        ...

    async def webhook_take(
        self,
        owner: str,
        lease_ms: int,
        limit: int,
        default_slots: int,
        slots: Mapping[str, int],
        rotation: int = 0,
    ) -> tuple[list[WebhookDelivery], int]:
        """Lease up to ``limit`` due (endpoint, space) queues and return their heads, at most
        ``slots.get(endpoint, default_slots)`` per endpoint. Lapsed leases are returned to the
        ready queues first; the second value counts them. ``owner`` must be unique per call."""
        ...

    async def webhook_renew(self, deliveries: Sequence[WebhookDelivery], lease_ms: int) -> set[str]:
        """Extend leases; returns the tokens of those no longer held."""
        ...

    async def webhook_delivered(self, delivery: WebhookDelivery) -> bool:
        """Remove the delivered job and release its queue; False if the lease had lapsed."""
        ...

    async def webhook_failed(
        self,
        delivery: WebhookDelivery,
        attempt: str,
        error: str,
        retry_in_ms: int | None,
        dead_letter_limit: int,
    ) -> str:
        """Record a failed attempt (``attempt`` is a JSON object). With ``retry_in_ms`` the
        queue is due again after it; with None the job becomes a dead letter (the oldest beyond
        ``dead_letter_limit`` are dropped). Returns "retry", "dead" or "lost"."""
        ...

    async def webhook_release(self, deliveries: Sequence[WebhookDelivery]) -> int:
        """Give leased queues back, due at once (graceful shutdown)."""
        ...

    async def webhook_dead_letters(self, limit: int) -> list[DeadLetterRecord]:
        """Dead letters, newest first."""
        ...

    async def webhook_replay(self, ids: Sequence[str]) -> int:
        """Queue dead letters again (all when ``ids`` is empty); returns how many."""
        ...

    async def webhook_backlog(self) -> WebhookBacklog:
        """How far delivery is behind, for the metrics (one read, not per event)."""
        ...

    async def webhook_prune_consumers(self, idle_ms: int, keep: str) -> int:
        """Forget group consumers idle for idle_ms with nothing pending (dead replicas)."""
        ...

    async def webhook_sync_endpoints(self) -> int:
        """Make every shard's copy of the endpoints match the list, after a change was
        interrupted half-way (the Redis store keeps one copy per shard; the memory store has
        nothing to repair). Returns the number of copies fixed."""
        ...


# --- webhooks: records ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookEndpointRecord:
    id: str
    url: str
    secret: str
    event_types: tuple[str, ...] = ()
    """Mux event names it receives; empty for all."""
    created_at: int = 0
    """Unix seconds."""
    from_config: bool = False


@dataclass(frozen=True)
class WebhookJob:
    """One event as the fan-out enqueues it. ``event_type`` is empty for events that are not
    webhooks (they are only acknowledged)."""

    stream_id: str
    envelope_id: str = ""
    space_id: str = ""
    event_type: str = ""
    body: str = ""
    """The envelope JSON without ``attempts`` (added per attempt)."""


@dataclass(frozen=True)
class WebhookDelivery:
    """The head of one leased (endpoint, space) queue."""

    endpoint_id: str
    space_id: str
    token: str
    """The lease token: proves this replica still holds the queue."""
    url: str
    secret: str
    sort_key: str
    stream_id: str
    envelope_id: str
    event_type: str
    body: str
    attempts: int
    """Failed attempts so far."""
    history: str
    """JSON list of the earlier attempts' records (the envelope's ``attempts``)."""

    @property
    def queue(self) -> str:
        return f"{self.endpoint_id} {self.space_id}"


@dataclass(frozen=True)
class DeadLetterRecord:
    id: str
    endpoint_id: str
    envelope_id: str
    event_type: str
    space_id: str
    attempts: int
    last_error: str
    failed_at_ms: int


@dataclass(frozen=True)
class WebhookBacklog:
    queues: int
    """(endpoint, space) queues with undelivered events: waiting, in backoff, or being posted."""
    oldest_due_ms: int
    """When the longest-waiting queue that is due now became due (store time, ms); 0: none."""
    dead_letters: int
    now_ms: int
    """Store time of the read."""
