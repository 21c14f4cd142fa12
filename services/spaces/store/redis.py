"""The Redis store: the distributed production path.

Every multi-step change is one Lua script from spaces.store.keys; this module only marshals
arguments and replies. Connection failures surface as StoreUnavailable (gRPC UNAVAILABLE) and
the client reconnects on the next call, so a Redis restart needs no service restart.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from spaces import errors
from spaces.store import keys
from spaces.store.base import (
    Admission,
    BroadcastJob,
    BroadcastSpec,
    Claim,
    DeadLetterRecord,
    HiddenReservation,
    JoinContext,
    NodeView,
    PlacementMoved,
    RenewResult,
    Reservation,
    SigningKeyRecord,
    SpaceDeletion,
    WebhookDelivery,
    WebhookEndpointRecord,
    WebhookJob,
)
from spaces.store.codec import (
    broadcast_from_record,
    command_from_text,
    command_to_text,
    event_from_entry,
    flat_to_dict,
    node_from_text,
    node_to_text,
    participant_from_record,
    space_from_record,
)
from spaces.v1 import broadcast_pb2, event_pb2, node_pb2, participant_pb2, space_pb2

logger = logging.getLogger(__name__)

T = TypeVar("T")

_SCRIPT_ERRORS: dict[str, type[errors.SpacesError]] = {
    "space_not_found": errors.SpaceNotFound,
    "space_active": errors.SpaceActive,
    "duplicate": errors.DuplicateParticipant,
    "full": errors.ParticipantLimitReached,
    "bad_resume": errors.BadResumeSecret,
    "invalid_ticket": errors.InvalidTicket,
    "wrong_node": errors.TicketWrongNode,
    "moved": errors.TicketWrongNode,
    "participant_not_found": errors.ParticipantNotFound,
    "unknown_key": errors.TokenUnknownKey,
    "broadcast_not_found": errors.BroadcastNotFound,
    "broadcast_active": errors.BroadcastActive,
    "broadcast_limit": errors.BroadcastLimitReached,
    "space_idle": errors.SpaceIdle,
    "lease_lost": errors.BroadcastLeaseLost,
}


def _raise_script_error(reply: list[Any]) -> None:
    if reply and reply[0] == "err":
        raise _SCRIPT_ERRORS.get(str(reply[1]), errors.Internal)()


class RedisStore:
    """Store on a standalone Redis or Sentinel-managed primary (``redis://``, ``rediss://``)."""

    def __init__(
        self,
        url: str,
        *,
        event_maxlen: int = 100_000,
        gone_ttl_ms: int = 120_000,
        socket_timeout_s: float = 10.0,
        max_connections: int = 64,
    ) -> None:
        self.url = url
        # Commands wait on a semaphore for one of ``max_connections`` slots: under a burst of
        # joins, requests queue instead of failing with "too many connections" or opening
        # thousands of sockets. The pool has headroom for pub/sub and blocking reads.
        self._slots = asyncio.Semaphore(max_connections)
        self._timeout_s = socket_timeout_s
        # No socket_timeout: redis-py's read timeout swallows task cancellation (the shutdown
        # and disconnect path); _call enforces the deadline instead, and keepalive finds dead
        # peers.
        pool = aioredis.ConnectionPool.from_url(
            url,
            max_connections=max_connections + 32,
            decode_responses=True,
            socket_connect_timeout=3.0,
            socket_keepalive=True,
            health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._client: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self._scripts = {
            name: self._client.register_script(
                keys.render_script(body, maxlen=event_maxlen, gone_ttl_ms=gone_ttl_ms)
            )
            for name, body in keys.ALL_SCRIPTS.items()
        }

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    # --- plumbing --------------------------------------------------------------------------

    async def _call(self, fn: Callable[[], Any], timeout_s: float | None = None) -> Any:
        """Run one Redis operation with a deadline. It runs as its own task so that cancelling
        the caller always takes effect at once, whatever the client library does with it."""
        async with self._slots:
            task: asyncio.Future[Any] = asyncio.ensure_future(fn())
            task.add_done_callback(_retrieve)
            try:
                done, _ = await asyncio.wait({task}, timeout=timeout_s or self._timeout_s)
            except asyncio.CancelledError:
                task.cancel()
                raise
            if not done:
                task.cancel()
                logger.warning("redis unavailable: no reply in %.1fs", timeout_s or self._timeout_s)
                raise errors.StoreUnavailable()
            try:
                return task.result()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning("redis unavailable: %s", exc)
                raise errors.StoreUnavailable() from exc

    async def _script(self, name: str, keys_: list[str], args: list[Any]) -> Any:
        script = self._scripts[name]
        return await self._call(lambda: script(keys=keys_, args=args))

    async def start(self) -> None:
        await self.ping()

    async def close(self) -> None:
        await self._client.aclose(close_connection_pool=True)

    async def ping(self) -> None:
        await self._call(self._client.ping)

    async def now_ms(self) -> int:
        seconds, micros = await self._call(self._client.time)
        return int(seconds) * 1000 + int(micros) // 1000

    # --- spaces ----------------------------------------------------------------------------

    async def create_space(
        self, space_id: str, passthrough: str, max_participants: int
    ) -> space_pb2.Space:
        flat = await self._script(
            "create_space", [keys.space_key(space_id)], [space_id, passthrough, max_participants]
        )
        return space_from_record(flat_to_dict(flat), 0)

    async def get_space(self, space_id: str) -> space_pb2.Space:
        spaces = await self._spaces_with_broadcasts([space_id])
        if not spaces:
            raise errors.SpaceNotFound()
        return spaces[0]

    async def _spaces_with_broadcasts(self, space_ids: Sequence[str]) -> list[space_pb2.Space]:
        """Spaces (those that exist, in order) with their visible count and their broadcasts:
        two pipelined round trips."""

        async def run() -> tuple[list[Any], list[Any]]:
            async with self._client.pipeline(transaction=False) as pipe:
                for space_id in space_ids:
                    pipe.hgetall(keys.space_key(space_id))
                    pipe.zcard(keys.leases_key(space_id))
                    pipe.zrange(keys.broadcasts_key(space_id), 0, -1)
                first = await pipe.execute()
            async with self._client.pipeline(transaction=False) as pipe:
                for i, space_id in enumerate(space_ids):
                    for bid in first[3 * i + 2]:
                        pipe.hgetall(keys.broadcast_key(space_id, bid))
                        pipe.get(keys.broadcast_lease_key(space_id, bid))
                second = await pipe.execute() if any(first[2::3]) else []
            return first, second

        first, second = await self._call(run)
        out: list[space_pb2.Space] = []
        at = 0
        for i in range(len(space_ids)):
            record, count, bids = first[3 * i], int(first[3 * i + 1]), first[3 * i + 2]
            found = second[at : at + 2 * len(bids)]
            at += 2 * len(bids)
            if not record:
                continue
            space = space_from_record(record, count - int(record.get("hidden", "0") or 0))
            space.broadcasts.extend(
                broadcast_from_record(found[j], found[j + 1] or "")
                for j in range(0, len(found), 2)
                if found[j]
            )
            out.append(space)
        return out

    async def list_spaces(
        self, limit: int, after_seq: int
    ) -> tuple[list[space_pb2.Space], int | None]:
        page = await self._call(
            lambda: self._client.zrangebyscore(
                keys.SPACES, f"({after_seq}", "+inf", start=0, num=limit + 1, withscores=True
            )
        )
        more = len(page) > limit
        page = page[:limit]
        spaces = await self._spaces_with_broadcasts([space_id for space_id, _ in page])
        return spaces, (int(page[-1][1]) if more and page else None)

    async def update_space(
        self, space_id: str, passthrough: str | None, max_participants: int | None
    ) -> space_pb2.Space:
        reply = await self._script(
            "update_space",
            [keys.space_key(space_id)],
            [
                space_id,
                "1" if passthrough is not None else "0",
                passthrough or "",
                "1" if max_participants is not None else "0",
                max_participants or 0,
            ],
        )
        _raise_script_error(reply)
        return await self.get_space(space_id)

    async def delete_space(self, space_id: str, force: bool) -> SpaceDeletion:
        reply = await self._script(
            "delete_space", [keys.space_key(space_id)], [space_id, "1" if force else "0"]
        )
        _raise_script_error(reply)
        rest = reply[2:]
        return SpaceDeletion(
            node_id=reply[1], removed=[(rest[i], rest[i + 1]) for i in range(0, len(rest), 2)]
        )

    # --- signing keys ------------------------------------------------------------------------

    async def create_signing_key(self, key_id: str, public_key_pem: bytes) -> SigningKeyRecord:
        async def run() -> list[Any]:
            seconds, _ = await self._client.time()
            seq = await self._client.incr(keys.SIGNING_KEYS_SEQ)
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(
                    keys.signing_key_key(key_id),
                    mapping={
                        "id": key_id,
                        "created_at": int(seconds),
                        "public_key": public_key_pem.decode(),
                    },
                )
                pipe.zadd(keys.SIGNING_KEYS, {key_id: seq})
                await pipe.execute()
            return [int(seconds)]

        (created_at,) = await self._call(run)
        return SigningKeyRecord(id=key_id, created_at=created_at, public_key_pem=public_key_pem)

    async def get_signing_key(self, key_id: str) -> SigningKeyRecord | None:
        record = await self._call(lambda: self._client.hgetall(keys.signing_key_key(key_id)))
        return _key_from_record(record)

    async def list_signing_keys(
        self, limit: int, after_seq: int
    ) -> tuple[list[SigningKeyRecord], int | None]:
        page = await self._call(
            lambda: self._client.zrangebyscore(
                keys.SIGNING_KEYS, f"({after_seq}", "+inf", start=0, num=limit + 1, withscores=True
            )
        )
        more = len(page) > limit
        page = page[:limit]

        async def run() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                for key_id, _ in page:
                    pipe.hgetall(keys.signing_key_key(key_id))
                return await pipe.execute()

        records = await self._call(run) if page else []
        found = [k for k in (_key_from_record(r) for r in records) if k is not None]
        return found, (int(page[-1][1]) if more and page else None)

    async def delete_signing_key(self, key_id: str) -> bool:
        async def run() -> list[Any]:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(keys.signing_key_key(key_id))
                pipe.zrem(keys.SIGNING_KEYS, key_id)
                return await pipe.execute()

        deleted, _ = await self._call(run)
        return bool(deleted)

    # --- presence --------------------------------------------------------------------------

    async def join_context(self, space_id: str, key_id: str) -> JoinContext:
        async def run() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.signing_key_key(key_id))
                pipe.get(keys.placement_key(space_id))
                pipe.exists(keys.space_key(space_id))
                return await pipe.execute()

        record, node, exists = await self._call(run)
        return JoinContext(_key_from_record(record), node or "", bool(exists))

    async def join(self, r: Reservation) -> Admission:
        reply = await self._script(
            "join",
            [keys.space_key(r.space_id)],
            [
                r.space_id,
                r.connection_id,
                r.participant_id,
                r.role,
                r.display_name,
                r.ticket_hash,
                r.resume_hash,
                "1" if r.generated_participant_id else "0",
                r.node_id,
                r.expected_node_id,
                r.pending_ms,
                r.placement_ms,
                r.default_max_participants,
                r.resume_connection_id,
                r.presented_resume_hash,
                r.signing_key_id,
                r.reconnect_participant_id,
                r.token_hash,
            ],
        )
        if reply[0] == "moved":
            raise PlacementMoved(reply[1])
        _raise_script_error(reply)
        return Admission(
            participant_id=reply[1],
            joined_at_ms=int(reply[2]),
            expires_at_ms=int(reply[3]),
            replaced_connection_id=reply[4],
            replaced_node_id=reply[5],
        )

    async def claim(
        self,
        space_id: str,
        connection_id: str,
        ticket_hash: str,
        node_id: str,
        session_ms: int,
        placement_ms: int,
        session_id: str,
    ) -> Claim:
        reply = await self._script(
            "claim",
            [keys.space_key(space_id)],
            [space_id, connection_id, ticket_hash, node_id, session_ms, placement_ms, session_id],
        )
        _raise_script_error(reply)
        epoch, expires = reply[1], int(reply[2])
        split = reply.index("|")
        conn = flat_to_dict(reply[3:split])
        space = flat_to_dict(reply[split + 1 :])
        return Claim(
            participant=participant_from_record(space_id, conn, expires),
            space=space_from_record(space, 0),
            epoch=epoch,
            lease_expires_at_ms=expires,
            connection_record=conn,
            space_record=space,
        )

    async def renew(
        self,
        space_id: str,
        node_id: str,
        session_ms: int,
        placement_ms: int,
        epoch: str,
        space_record: dict[str, str],
        connection_records: list[dict[str, str]],
    ) -> RenewResult:
        snapshot = json.dumps({"epoch": epoch, "space": space_record, "conns": connection_records})
        reply = await self._script(
            "renew",
            [keys.space_key(space_id)],
            [space_id, node_id, session_ms, placement_ms, snapshot],
        )
        rest = reply[2:]
        return RenewResult(
            epoch=reply[0],
            moved=reply[1] == "1",
            lost={rest[i]: rest[i + 1] for i in range(0, len(rest), 2)},
        )

    async def leave(
        self,
        space_id: str,
        connection_id: str,
        reason: str,
        node_id: str = "",
        resume_hash: str = "",
    ) -> participant_pb2.Participant | None:
        reply = await self._script(
            "leave",
            [keys.space_key(space_id)],
            [space_id, connection_id, reason, node_id, resume_hash],
        )
        _raise_script_error(reply)
        if reply[0] == "gone":
            return None
        return participant_from_record(space_id, flat_to_dict(reply[1:]))

    async def remove_participant(
        self, space_id: str, participant_id: str, reason: str
    ) -> participant_pb2.Participant:
        reply = await self._script(
            "remove_participant", [keys.space_key(space_id)], [space_id, participant_id, reason]
        )
        _raise_script_error(reply)
        return participant_from_record(space_id, flat_to_dict(reply[1:]))

    async def get_participant(
        self, space_id: str, participant_id: str
    ) -> participant_pb2.Participant:
        async def run() -> tuple[dict[str, str], float | None]:
            conn = await self._client.get(keys.pid_key(space_id, participant_id))
            if not conn:
                return {}, None
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.conn_key(space_id, conn))
                pipe.zscore(keys.leases_key(space_id), conn)
                record, expires = await pipe.execute()
            return record, expires

        record, expires = await self._call(run)
        if not record or record.get("hidden") == "1":
            if not await self._call(lambda: self._client.exists(keys.space_key(space_id))):
                raise errors.SpaceNotFound()
            raise errors.ParticipantNotFound()
        return participant_from_record(space_id, record, int(expires or 0))

    async def list_participants(self, space_id: str) -> list[participant_pb2.Participant]:
        async def run() -> tuple[int, list[tuple[str, float]], list[dict[str, str]]]:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.exists(keys.space_key(space_id))
                pipe.zrange(keys.leases_key(space_id), 0, -1, withscores=True)
                exists, leases = await pipe.execute()
            async with self._client.pipeline(transaction=False) as pipe:
                for conn, _ in leases:
                    pipe.hgetall(keys.conn_key(space_id, conn))
                records = await pipe.execute() if leases else []
            return exists, leases, records

        exists, leases, records = await self._call(run)
        if not exists:
            raise errors.SpaceNotFound()
        found = [
            participant_from_record(space_id, record, int(score))
            for (_, score), record in zip(leases, records, strict=True)
            if record and record.get("hidden") != "1"
        ]
        found.sort(key=lambda p: (p.joined_at_ms, p.connection_id))
        return found

    async def set_display_name(self, space_id: str, connection_id: str, name: str) -> bool:
        reply = await self._script(
            "set_display_name", [keys.space_key(space_id)], [connection_id, name]
        )
        return bool(reply)

    async def reap(self, max_spaces: int = 100) -> int:
        return int(await self._script("reap", [], [max_spaces]))

    # --- registry --------------------------------------------------------------------------

    async def heartbeat(self, node: node_pb2.Node, record_ttl_ms: int) -> int:
        return int(
            await self._script(
                "heartbeat",
                [keys.node_key(node.id)],
                [node.id, node_to_text(node), node_pb2.NodeState.Name(node.state), record_ttl_ms],
            )
        )

    async def remove_node(self, node: node_pb2.Node) -> None:
        final = node_pb2.Node()
        final.CopyFrom(node)
        final.state = node_pb2.NODE_STATE_STOPPED
        await self._script("remove_node", [keys.node_key(node.id)], [node.id, node_to_text(final)])

    async def list_nodes(self, record_ttl_ms: int) -> NodeView:
        reply = await self._script("list_nodes", [], [record_ttl_ms])
        rest = reply[1:]
        nodes = [node_from_text(rest[i + 2], int(rest[i + 1])) for i in range(0, len(rest), 3)]
        return NodeView(now_ms=int(reply[0]), nodes=nodes)

    async def publish_node_command(self, node_id: str, command: node_pb2.NodeCommand) -> None:
        payload = command_to_text(command)
        await self._call(lambda: self._client.publish(keys.node_channel(node_id), payload))

    async def node_commands(self, node_id: str) -> AsyncIterator[node_pb2.NodeCommand]:
        channel = keys.node_channel(node_id)
        backoff = 0.1
        while True:
            try:
                async with self._subscribed(channel) as pubsub:
                    backoff = 0.1
                    while True:
                        # No timeout: redis-py's timed read swallows cancellation. A dropped
                        # connection ends the read with an error, and we resubscribe.
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=None
                        )
                        if message and message.get("type") == "message":
                            yield command_from_text(message["data"])
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning("node %s: command channel lost (%s); resubscribing", node_id, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    @asynccontextmanager
    async def _subscribed(self, channel: str) -> AsyncIterator[aioredis.client.PubSub]:
        pubsub = self._client.pubsub()
        try:
            await pubsub.subscribe(channel)
            yield pubsub
        finally:
            try:
                await pubsub.aclose()
            except Exception:
                pass

    # --- broadcasts --------------------------------------------------------------------------

    async def create_broadcast(self, spec: BroadcastSpec, limit: int) -> broadcast_pb2.Broadcast:
        reply = await self._script(
            "create_broadcast",
            [keys.space_key(spec.space_id)],
            [
                spec.space_id,
                spec.broadcast_id,
                limit,
                spec.layout,
                spec.resolution,
                spec.rtmp_url,
                spec.stream_key,
                spec.background_source,
                spec.background_sha256,
                base64.b64encode(spec.background).decode() if spec.background else "",
                spec.passthrough,
            ],
        )
        _raise_script_error(reply)
        return broadcast_from_record(flat_to_dict(reply))

    async def get_broadcast(self, space_id: str, broadcast_id: str) -> broadcast_pb2.Broadcast:
        async def run() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.broadcast_key(space_id, broadcast_id))
                pipe.get(keys.broadcast_lease_key(space_id, broadcast_id))
                pipe.exists(keys.space_key(space_id))
                return await pipe.execute()

        record, holder, exists = await self._call(run)
        if not exists:
            raise errors.SpaceNotFound()
        if not record:
            raise errors.BroadcastNotFound()
        return broadcast_from_record(record, holder or "")

    async def list_broadcasts(self, space_id: str) -> list[broadcast_pb2.Broadcast]:
        return list((await self.get_space(space_id)).broadcasts)

    async def delete_broadcast(self, space_id: str, broadcast_id: str) -> None:
        reply = await self._script(
            "delete_broadcast", [keys.space_key(space_id)], [space_id, broadcast_id]
        )
        _raise_script_error(reply)

    async def _start_stop(
        self, script: str, space_id: str, broadcast_id: str
    ) -> tuple[broadcast_pb2.Broadcast, str]:
        reply = await self._script(script, [keys.space_key(space_id)], [space_id, broadcast_id])
        _raise_script_error(reply)
        return broadcast_from_record(flat_to_dict(reply[2:])), str(reply[1])

    async def start_broadcast(
        self, space_id: str, broadcast_id: str
    ) -> tuple[broadcast_pb2.Broadcast, str]:
        return await self._start_stop("start_broadcast", space_id, broadcast_id)

    async def stop_broadcast(
        self, space_id: str, broadcast_id: str
    ) -> tuple[broadcast_pb2.Broadcast, str]:
        return await self._start_stop("stop_broadcast", space_id, broadcast_id)

    async def broadcasts_due(self, limit: int) -> list[tuple[str, str]]:
        members = await self._script("due_broadcasts", [], [limit])
        return [(m.partition(" ")[0], m.partition(" ")[2]) for m in members]

    async def claim_broadcast(
        self, space_id: str, broadcast_id: str, holder: str, worker_id: str, lease_ms: int
    ) -> BroadcastJob | None:
        reply = await self._script(
            "claim_broadcast",
            [keys.space_key(space_id)],
            [space_id, broadcast_id, holder, worker_id, lease_ms],
        )
        if reply[0] != "ok":
            return None
        record = flat_to_dict(reply[2:])
        return BroadcastJob(
            space_id=space_id,
            broadcast_id=broadcast_id,
            run=record.get("run", "0"),
            layout=record.get("layout", "gallery"),
            resolution=record.get("res", "1920x1080"),
            rtmp_url=record.get("url", ""),
            stream_key=record.get("key", ""),
            background=base64.b64decode(reply[1]) if reply[1] else b"",
            holder=holder,
        )

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
        return str(
            await self._script(
                "renew_broadcast",
                [keys.space_key(space_id)],
                [space_id, broadcast_id, holder, lease_ms, run, "1" if streaming else "0", error],
            )
        )

    async def release_broadcast(self, space_id: str, broadcast_id: str, holder: str) -> bool:
        return bool(
            await self._script(
                "release_broadcast", [keys.space_key(space_id)], [space_id, broadcast_id, holder]
            )
        )

    async def join_hidden(self, reservation: HiddenReservation) -> tuple[str, int]:
        r = reservation
        reply = await self._script(
            "join_hidden",
            [keys.space_key(r.space_id)],
            [
                r.space_id,
                r.connection_id,
                r.participant_id,
                r.display_name,
                r.ticket_hash,
                r.pending_ms,
                r.broadcast_id,
                r.holder,
            ],
        )
        _raise_script_error(reply)
        return str(reply[1]), int(reply[2])

    # --- events ----------------------------------------------------------------------------

    async def latest_event_id(self) -> str:
        last = await self._call(lambda: self._client.xrevrange(keys.EVENTS, count=1))
        return str(last[0][0]) if last else "0-0"

    async def read_events(self, after_id: str, count: int, block_ms: int) -> list[event_pb2.Event]:
        if block_ms > 0:
            reply = await self._call(
                lambda: self._client.xread({keys.EVENTS: after_id}, count=count, block=block_ms),
                timeout_s=self._timeout_s + block_ms / 1000,
            )
            entries = reply[0][1] if reply else []
        else:
            entries = await self._call(
                lambda: self._client.xrange(keys.EVENTS, min=f"({after_id}", count=count)
            )
        return [event_from_entry(entry_id, fields) for entry_id, fields in entries]

    # --- webhooks ----------------------------------------------------------------------------
    # Delivery state and its scripts: keys.py, "webhooks". The scripts are registered on first
    # use so that this section needs nothing from __init__.

    _wh_scripts: dict[str, Any] | None = None

    async def _wh_script(self, name: str, args: list[Any]) -> Any:
        if self._wh_scripts is None:
            self._wh_scripts = {
                n: self._client.register_script(keys.render_webhook_script(body))
                for n, body in keys.WEBHOOK_SCRIPTS.items()
            }
        script = self._wh_scripts[name]
        return await self._call(lambda: script(keys=[], args=args))

    async def webhook_put_endpoint(self, endpoint: WebhookEndpointRecord) -> None:
        text = _endpoint_to_text(endpoint)
        await self._call(lambda: self._client.hset(keys.WEBHOOK_ENDPOINTS, endpoint.id, text))

    async def webhook_endpoints(self) -> list[WebhookEndpointRecord]:
        found: dict[str, str] = await self._call(
            lambda: self._client.hgetall(keys.WEBHOOK_ENDPOINTS)
        )
        records = [_endpoint_from_text(text) for text in found.values()]
        return sorted(records, key=lambda e: (e.created_at, e.id))

    async def webhook_delete_endpoint(self, endpoint_id: str) -> bool:
        return bool(await self._wh_script("webhook_delete_endpoint", [endpoint_id]))

    async def webhook_group_ensure(self) -> None:
        async def run() -> None:
            try:
                await self._client.xgroup_create(
                    keys.EVENTS, keys.WEBHOOK_GROUP, id="$", mkstream=True
                )
                logger.info("created consumer group %s on %s", keys.WEBHOOK_GROUP, keys.EVENTS)
            except RedisResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        await self._call(run)

    async def webhook_read(self, consumer: str, count: int, block_ms: int) -> list[event_pb2.Event]:
        try:
            reply: Any = await self._call(
                lambda: self._client.xreadgroup(
                    keys.WEBHOOK_GROUP,
                    consumer,
                    {keys.EVENTS: ">"},
                    count=count,
                    block=block_ms or None,
                ),
                timeout_s=self._timeout_s + block_ms / 1000,
            )
        except RedisResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis lost its data (or someone deleted the group): start again from the end.
            logger.warning("webhook consumer group vanished; recreating it at the stream's end")
            await self.webhook_group_ensure()
            return []
        entries = reply[0][1] if reply else []
        return [event_from_entry(entry_id, fields) for entry_id, fields in entries if fields]

    async def webhook_claim_stale(
        self, consumer: str, min_idle_ms: int, count: int
    ) -> list[event_pb2.Event]:
        try:
            reply: Any = await self._call(
                lambda: self._client.xautoclaim(
                    keys.EVENTS, keys.WEBHOOK_GROUP, consumer, min_idle_ms, "0-0", count=count
                )
            )
        except RedisResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            return []
        # reply[2] lists entries trimmed from the stream: XAUTOCLAIM already dropped them from
        # the pending list, and there is nothing left to deliver.
        return [event_from_entry(entry_id, fields) for entry_id, fields in reply[1] if fields]

    async def webhook_fan_out(self, jobs: Sequence[WebhookJob]) -> int:
        if not jobs:
            return 0
        args: list[Any] = []
        for job in jobs:
            args += [
                job.stream_id,
                keys.webhook_sort_key(job.stream_id),
                job.envelope_id,
                job.space_id,
                job.event_type,
                job.body,
            ]
        return int(await self._wh_script("webhook_fan_out", args))

    async def webhook_take(
        self,
        owner: str,
        lease_ms: int,
        limit: int,
        default_slots: int,
        slots: Mapping[str, int],
        rotation: int = 0,
    ) -> tuple[list[WebhookDelivery], int]:
        args: list[Any] = [owner, lease_ms, limit, default_slots, rotation]
        for endpoint_id, free in slots.items():
            args += [endpoint_id, free]
        reply = await self._wh_script("webhook_take", args)
        rest = reply[1:]
        deliveries = [
            WebhookDelivery(
                endpoint_id=rest[i],
                space_id=rest[i + 1],
                token=rest[i + 2],
                url=rest[i + 3],
                secret=rest[i + 4],
                sort_key=rest[i + 5],
                stream_id=rest[i + 6],
                envelope_id=rest[i + 7],
                event_type=rest[i + 8],
                body=rest[i + 9],
                attempts=int(rest[i + 10]),
                history=rest[i + 11],
            )
            for i in range(0, len(rest), 12)
        ]
        return deliveries, int(reply[0])

    async def webhook_renew(self, deliveries: Sequence[WebhookDelivery], lease_ms: int) -> set[str]:
        if not deliveries:
            return set()
        args: list[Any] = [lease_ms]
        for d in deliveries:
            args += [d.queue, d.token]
        return set(await self._wh_script("webhook_renew", args))

    async def webhook_delivered(self, delivery: WebhookDelivery) -> bool:
        d = delivery
        return bool(
            await self._wh_script(
                "webhook_delivered", [d.endpoint_id, d.space_id, d.sort_key, d.token]
            )
        )

    async def webhook_failed(
        self,
        delivery: WebhookDelivery,
        attempt: str,
        error: str,
        retry_in_ms: int | None,
        dead_letter_limit: int,
    ) -> str:
        d = delivery
        return str(
            await self._wh_script(
                "webhook_failed",
                [
                    d.endpoint_id,
                    d.space_id,
                    d.sort_key,
                    d.token,
                    attempt,
                    error,
                    -1 if retry_in_ms is None else max(0, retry_in_ms),
                    dead_letter_limit,
                ],
            )
        )

    async def webhook_release(self, deliveries: Sequence[WebhookDelivery]) -> int:
        if not deliveries:
            return 0
        args: list[Any] = []
        for d in deliveries:
            args += [d.queue, d.token]
        return int(await self._wh_script("webhook_release", args))

    async def webhook_dead_letters(self, limit: int) -> list[DeadLetterRecord]:
        async def run() -> list[dict[str, str]]:
            ids: list[str] = await self._client.zrevrange(keys.WEBHOOK_DEAD, 0, limit - 1)
            async with self._client.pipeline(transaction=False) as pipe:
                for dead_id in ids:
                    pipe.hgetall(keys.webhook_dead_key(dead_id))
                records: list[dict[str, str]] = await pipe.execute() if ids else []
                return records

        return [_dead_letter_from_record(r) for r in await self._call(run) if r]

    async def webhook_replay(self, ids: Sequence[str]) -> int:
        return int(await self._wh_script("webhook_replay", list(ids)))

    async def webhook_prune_consumers(self, idle_ms: int, keep: str) -> int:
        async def run() -> int:
            pruned = 0
            consumers = await self._client.xinfo_consumers(keys.EVENTS, keys.WEBHOOK_GROUP)
            for c in consumers:
                if c["name"] != keep and c["pending"] == 0 and c["idle"] >= idle_ms:
                    await self._client.xgroup_delconsumer(
                        keys.EVENTS, keys.WEBHOOK_GROUP, c["name"]
                    )
                    pruned += 1
            return pruned

        try:
            return await self._call(run)
        except RedisResponseError:
            return 0  # no group yet


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark an abandoned operation's outcome as seen (no "exception never retrieved")."""
    if not task.cancelled():
        task.exception()


def _key_from_record(record: dict[str, str]) -> SigningKeyRecord | None:
    if not record:
        return None
    return SigningKeyRecord(
        id=record["id"],
        created_at=int(record["created_at"]),
        public_key_pem=record["public_key"].encode(),
    )


# --- webhooks: record conversions ---------------------------------------------------------------


def _endpoint_to_text(endpoint: WebhookEndpointRecord) -> str:
    return json.dumps(
        {
            "id": endpoint.id,
            "url": endpoint.url,
            "secret": endpoint.secret,
            "event_types": list(endpoint.event_types),
            "created_at": endpoint.created_at,
            "from_config": endpoint.from_config,
        }
    )


def _endpoint_from_text(text: str) -> WebhookEndpointRecord:
    data = json.loads(text)
    return WebhookEndpointRecord(
        id=data["id"],
        url=data["url"],
        secret=data["secret"],
        event_types=tuple(data.get("event_types") or ()),
        created_at=int(data.get("created_at", 0)),
        from_config=bool(data.get("from_config", False)),
    )


def _dead_letter_from_record(record: dict[str, str]) -> DeadLetterRecord:
    return DeadLetterRecord(
        id=record["id"],
        endpoint_id=record["ep"],
        envelope_id=record.get("evid", ""),
        event_type=record.get("type", ""),
        space_id=record.get("space", ""),
        attempts=int(record.get("n", "0") or 0),
        last_error=record.get("err", ""),
        failed_at_ms=int(record.get("at", "0") or 0),
    )
