"""PresenceService: thin handlers over the token library, placement and the store."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator

import grpc

from spaces import errors, ids, logs, metrics, paging, turn
from spaces.auth import tokens
from spaces.config import ServerConfig
from spaces.lru import Lru
from spaces.presence import credentials
from spaces.routing.liveness import LivenessChecker
from spaces.routing.placement import Placer
from spaces.store.base import Admission, PlacementMoved, Reservation, SigningKeyRecord, Store
from spaces.store.codec import ROLES_BY_NAME
from spaces.v1 import event_pb2, node_pb2, presence_pb2, presence_pb2_grpc

logger = logging.getLogger(__name__)

MAX_DISPLAY_NAME_CHARS = 64
MAX_NODE_ID_CHARS = 256
PLACEMENT_ATTEMPTS = 4
WATCH_BATCH = 200
WATCH_BLOCK_MS = 1000


def check_display_name(name: str, limit: int = MAX_DISPLAY_NAME_CHARS) -> str:
    if len(name) > limit:
        raise errors.DisplayNameTooLong(f"display_name is longer than {limit} characters")
    if name and not name.isprintable():
        raise errors.InvalidArgument("display_name must be printable text")
    return name


class PresenceServicer(presence_pb2_grpc.PresenceServiceServicer):
    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        placer: Placer,
        closing: asyncio.Event,
        liveness: LivenessChecker | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._placer = placer
        self._liveness = liveness
        self._keys = tokens.PublicKeyCache()
        self._signing_keys: Lru[str, SigningKeyRecord] = Lru(4096)
        """Signing keys already fetched: a key's public half never changes; revocation is
        checked by the join script."""
        self._placements: Lru[str, str] = Lru(100_000)
        """space_id -> node of its last join here: a hint the join script verifies."""
        self._closing = closing
        limits = config.limits
        self._limits = presence_pb2.ClientLimits(
            custom_events_per_second=limits.custom_events_per_second,
            custom_event_max_bytes=limits.custom_event_max_bytes,
            tracks_per_source=limits.tracks_per_source,
            display_name_interval_seconds=limits.display_name_interval_seconds,
            display_name_max_chars=limits.display_name_max_chars,
            max_subscriptions=limits.max_subscriptions,
        )
        self._ice_servers = [
            presence_pb2.IceServer(urls=list(s.urls), username=s.username, credential=s.credential)
            for s in config.ice_servers
        ]

    async def Join(
        self, request: presence_pb2.JoinRequest, context: grpc.aio.ServicerContext
    ) -> presence_pb2.JoinResponse:
        started = time.perf_counter()
        try:
            reply = await self._join(request)
        except errors.SpacesError as exc:
            metrics.JOINS.labels(result=exc.code.name.lower()).inc()
            raise
        metrics.JOINS.labels(result="ok").inc()
        metrics.JOIN_LATENCY.observe(time.perf_counter() - started)
        return reply

    async def _join(self, request: presence_pb2.JoinRequest) -> presence_pb2.JoinResponse:
        display_name = check_display_name(
            request.display_name, self._config.limits.display_name_max_chars
        )
        peeked = tokens.peek(request.token)
        resume = None
        if request.resume_secret:
            resume = credentials.parse(request.resume_secret)
            if resume is None or resume.space_id != peeked.space_id:
                raise errors.BadResumeSecret()
        # The common case costs one Redis round trip: a signing key seen before is verified
        # from memory (the join script still checks it was not revoked) and the placement is
        # taken from the last join of the space (the script checks it, too).
        known = self._signing_keys.get(peeked.key_id)
        if known is not None:
            claims = tokens.verify(peeked, known, self._keys)
            current = self._placements.get(claims.space_id) or ""
        else:
            context = await self._store.join_context(peeked.space_id, peeked.key_id)
            claims = tokens.verify(peeked, context.signing_key, self._keys)
            if not context.space_exists:
                raise errors.SpaceNotFound()
            assert context.signing_key is not None  # verify() refused a missing key
            self._signing_keys.put(peeked.key_id, context.signing_key)
            current = context.placement
        logs.bind(space_id=claims.space_id)
        if request.unreachable_node_id and self._liveness is not None:
            # The client lost its node: find out now whether it is dead (then placement skips
            # it and the space moves) rather than after its heartbeat goes stale.
            if len(request.unreachable_node_id) > MAX_NODE_ID_CHARS:
                raise errors.InvalidArgument("unreachable_node_id is too long")
            await self._liveness.check(request.unreachable_node_id)
        elif request.reconnect_participant_id and self._liveness is not None:
            # A reconnect by token (a browser) cannot name the node it lost, but its old
            # connection does: check that node the same way.
            await self._check_node_of(claims.space_id, request.reconnect_participant_id)

        connection_id = ids.new_connection_id()
        token_hash = hashlib.sha256(request.token.encode()).hexdigest()
        if len(request.reconnect_participant_id) > ids.MAX_PARTICIPANT_ID_CHARS:
            raise errors.InvalidArgument("reconnect_participant_id is too long")
        ticket = credentials.issue(claims.space_id, connection_id)
        resume_secret = credentials.issue(claims.space_id, connection_id)
        participant_id = claims.participant_id or ids.new_participant_id()
        leases = self._config.leases
        admission: Admission | None = None
        node = None
        for _ in range(PLACEMENT_ATTEMPTS):
            placement = await self._placer.place(current)
            node = placement.node
            try:
                admission = await self._store.join(
                    Reservation(
                        space_id=claims.space_id,
                        connection_id=connection_id,
                        participant_id=participant_id,
                        generated_participant_id=claims.participant_id is None,
                        role=claims.role,
                        display_name=display_name,
                        ticket_hash=ticket.hash,
                        resume_hash=resume_secret.hash,
                        node_id=node.id,
                        expected_node_id=current,
                        pending_ms=leases.pending_ms,
                        placement_ms=leases.placement_ms,
                        default_max_participants=self._config.limits.max_participants,
                        resume_connection_id=resume.connection_id if resume else "",
                        presented_resume_hash=resume.hash if resume else "",
                        signing_key_id=peeked.key_id if known is not None else "",
                        token_hash=token_hash,
                        reconnect_participant_id=request.reconnect_participant_id,
                    )
                )
                break
            except PlacementMoved as moved:
                current = moved.current_node_id
            except errors.TokenUnknownKey:
                self._signing_keys.pop(peeked.key_id)
                raise
        self._placements.put(claims.space_id, node.id if node else "")
        if admission is None or node is None:
            raise errors.Unavailable("space placement is contended: retry the join")

        logs.bind(
            connection_id=connection_id, participant_id=admission.participant_id, node_id=node.id
        )
        if admission.replaced_connection_id and admission.replaced_node_id:
            await self._kick(
                admission.replaced_node_id,
                claims.space_id,
                admission.replaced_connection_id,
                "replaced",
            )
        logger.debug(
            "admitted %s as %s on node %s%s",
            admission.participant_id,
            connection_id,
            node.id,
            " (resumed)" if admission.replaced_connection_id else "",
        )
        return presence_pb2.JoinResponse(
            space_id=claims.space_id,
            participant_id=admission.participant_id,
            connection_id=connection_id,
            role=ROLES_BY_NAME[claims.role],
            resume_secret=resume_secret.secret,
            media_address=node.address,
            node_id=node.id,
            ticket=ticket.secret,
            ice_servers=self._ice_servers_for(connection_id, claims.expires_at),
            limits=self._limits,
            ticket_expires_at_ms=admission.expires_at_ms,
            resumed=bool(admission.replaced_connection_id),
            display_name=display_name,
        )

    def _ice_servers_for(
        self, connection_id: str, token_expires_at: int
    ) -> list[presence_pb2.IceServer]:
        """The configured STUN/TURN servers, plus the TURN server with a credential minted
        for this connection (its id is the TURN username's user part, so coturn's logs name
        the connection)."""
        config = self._config.turn
        if not config.enabled:
            return self._ice_servers
        credential = turn.mint(
            config.secret, connection_id, turn.expiry(config, time.time(), token_expires_at)
        )
        return [
            *self._ice_servers,
            presence_pb2.IceServer(
                urls=list(config.urls),
                username=credential.username,
                credential=credential.credential,
            ),
        ]

    async def _check_node_of(self, space_id: str, participant_id: str) -> None:
        assert self._liveness is not None
        try:
            old = await self._store.get_participant(space_id, participant_id)
        except (errors.ParticipantNotFound, errors.SpaceNotFound, errors.InvalidArgument):
            return
        if old.node_id:
            await self._liveness.check(old.node_id)

    async def _kick(self, node_id: str, space_id: str, connection_id: str, reason: str) -> None:
        command = node_pb2.NodeCommand(
            kick=node_pb2.KickConnection(
                space_id=space_id, connection_id=connection_id, reason=reason
            )
        )
        try:
            await self._store.publish_node_command(node_id, command)
        except errors.StoreUnavailable:
            # The node also learns it from its next lease renewal.
            logger.warning("could not tell node %s to close %s", node_id, connection_id)

    async def Leave(
        self, request: presence_pb2.LeaveRequest, context: grpc.aio.ServicerContext
    ) -> presence_pb2.LeaveResponse:
        secret = credentials.parse(request.resume_secret)
        if secret is None:
            raise errors.BadResumeSecret("malformed resume secret")
        participant = await self._store.leave(
            secret.space_id, secret.connection_id, "left", resume_hash=secret.hash
        )
        if participant is None:
            raise errors.ConnectionNotFound()
        if participant.node_id and participant.state:
            await self._kick(participant.node_id, secret.space_id, secret.connection_id, "left")
        return presence_pb2.LeaveResponse()

    async def ListParticipants(
        self, request: presence_pb2.ListParticipantsRequest, context: grpc.aio.ServicerContext
    ) -> presence_pb2.ListParticipantsResponse:
        space_id = ids.validate_id(request.space_id, "space")
        limit = paging.page_limit(request.limit)
        offset = paging.decode_cursor(request.page_token)
        everyone = await self._store.list_participants(space_id)
        page = everyone[offset : offset + limit]
        more = offset + limit < len(everyone)
        return presence_pb2.ListParticipantsResponse(
            participants=page,
            next_page_token=paging.encode_cursor(offset + limit if more else None),
        )

    async def GetParticipant(
        self, request: presence_pb2.GetParticipantRequest, context: grpc.aio.ServicerContext
    ) -> presence_pb2.Participant:  # type: ignore[name-defined]
        space_id = ids.validate_id(request.space_id, "space")
        if not request.participant_id:
            raise errors.InvalidArgument("missing participant_id")
        return await self._store.get_participant(space_id, request.participant_id)

    async def RemoveParticipant(
        self, request: presence_pb2.RemoveParticipantRequest, context: grpc.aio.ServicerContext
    ) -> presence_pb2.RemoveParticipantResponse:
        space_id = ids.validate_id(request.space_id, "space")
        if not request.participant_id:
            raise errors.InvalidArgument("missing participant_id")
        removed = await self._store.remove_participant(space_id, request.participant_id, "removed")
        if removed.node_id:
            await self._kick(removed.node_id, space_id, removed.connection_id, "removed")
        return presence_pb2.RemoveParticipantResponse()

    async def WatchEvents(
        self, request: presence_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[event_pb2.Event]:
        space_id = request.space_id
        if space_id:
            ids.validate_id(space_id, "space")
        after = request.after_id or await self._store.latest_event_id()
        if not _is_event_id(after):
            raise errors.InvalidArgument("malformed after_id: pass an Event.id")
        backoff = 0.1
        while not self._closing.is_set():
            try:
                batch = await self._store.read_events(after, WATCH_BATCH, WATCH_BLOCK_MS)
                backoff = 0.1
            except errors.StoreUnavailable:
                # Keep the stream: the client resumes seamlessly once the store is back.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            for event in batch:
                after = event.id
                if not space_id or event.space_id == space_id:
                    yield event


def _is_event_id(value: str) -> bool:
    ms, sep, seq = value.partition("-")
    return bool(sep) and ms.isdigit() and seq.isdigit()
