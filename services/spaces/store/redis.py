"""The Redis store: the distributed production path, on a standalone Redis or a Redis Cluster.

Every multi-step change is one Lua script from spaces.store.keys, run in the slot of the space's
shard; this module only routes calls (spaces.store.router), marshals arguments and replies, and
merges what several shards return. Connection failures surface as StoreUnavailable (gRPC
UNAVAILABLE) and the client reconnects on the next call, so a Redis restart or a cluster
failover needs no service restart.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import heapq
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
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
    WebhookBacklog,
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
from spaces.store.feed import EventFeed
from spaces.store.router import REDIRECTS, ClusterRouter, Router, StandaloneRouter, is_cluster_url
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
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError, *REDIRECTS)
"""Failures that mean "Redis cannot answer right now" (retry later), not a bug."""
UNBLOCKED = "UNBLOCKED"
"""The error a server ends a blocking read with when its primary becomes a replica (failover):
redis-py raises it as a plain ResponseError, and it means the same as a lost connection."""


def _unavailable(exc: BaseException) -> BaseException:
    """``exc``, or the connection error it stands for (an UNBLOCKED reply)."""
    if isinstance(exc, RedisResponseError) and str(exc).startswith(UNBLOCKED):
        return RedisConnectionError(str(exc))
    return exc


def _reply_error(reply: Exception) -> Exception:
    """What an error reply inside a pipeline raises: StoreUnavailable when Redis cannot answer
    right now (the shard is failing over), else the reply itself (a bug)."""
    unavailable = _unavailable(reply)
    if isinstance(unavailable, _UNAVAILABLE):
        return errors.StoreUnavailable()
    return reply


REDIRECT_RETRIES = 3
SHARDS = range(keys.SHARDS)
EVERY_STREAM = range(keys.STREAMS)
_SHA_CLIENT = aioredis.Redis(decode_responses=True)
"""Never connects: only gives AsyncScript the encoding it hashes scripts with."""


def _raise_script_error(reply: list[Any]) -> None:
    if reply and reply[0] == "err":
        raise _SCRIPT_ERRORS.get(str(reply[1]), errors.Internal)()


class LegacyLayoutError(RuntimeError):
    """Redis holds data written in the unsharded key layout of earlier versions."""


class RedisStore:
    """Store on a standalone Redis or Sentinel-managed primary (``redis://``, ``rediss://``) or on
    a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""

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
        # thousands of sockets. Each pool has headroom for blocking reads (the event doorbell,
        # node commands, which do not take a slot).
        self._slots = asyncio.Semaphore(max_connections)
        self._timeout_s = socket_timeout_s
        self._router: Router
        if is_cluster_url(url):
            self._router = ClusterRouter(url, max_connections=max_connections + 48)
        else:
            self._router = StandaloneRouter(url, max_connections=max_connections + 32)
        # The cap is per stream, so that all of them together keep about event_maxlen.
        per_stream = max(1_000, -(-event_maxlen // keys.SHARDS))
        self._scripts = {
            name: AsyncScript(
                _SHA_CLIENT, keys.render_script(body, maxlen=per_stream, gone_ttl_ms=gone_ttl_ms)
            )
            for name, body in keys.ALL_SCRIPTS.items()
        }
        self._wh_scripts = {
            name: AsyncScript(_SHA_CLIENT, keys.render_webhook_script(body))
            for name, body in keys.WEBHOOK_SCRIPTS.items()
        }
        self._feed = EventFeed(self._router, self._call)

    @property
    def router(self) -> Router:
        return self._router

    @property
    def client(self) -> aioredis.Redis:
        """The client of the primary holding the global keys (on a standalone Redis: the
        only one)."""
        return self._router.client(keys.GLOBAL)

    # --- plumbing --------------------------------------------------------------------------

    async def _call(
        self,
        fn: Callable[[], Awaitable[T]],
        timeout_s: float | None = None,
        *,
        limited: bool = True,
    ) -> T:
        """Run one Redis operation with a deadline. It runs as its own task so that cancelling
        the caller always takes effect at once, whatever the client library does with it. On a
        cluster, an operation that met a stale slot map is retried once the map is updated.
        ``limited=False`` is for blocking reads, which must not hold one of the slots."""
        timeout = timeout_s or self._timeout_s

        async def attempt() -> Any:
            for tries in range(REDIRECT_RETRIES + 1):
                try:
                    try:
                        return await fn()
                    except RedisResponseError as exc:
                        unavailable = _unavailable(exc)
                        if unavailable is exc:
                            raise
                        raise unavailable from exc
                except _UNAVAILABLE as exc:
                    if tries == REDIRECT_RETRIES or not await self._router.recover(exc):
                        raise
            raise AssertionError("unreachable")

        if limited:
            await self._slots.acquire()
        try:
            task: asyncio.Future[Any] = asyncio.ensure_future(attempt())
            task.add_done_callback(_retrieve)
            try:
                done, _ = await asyncio.wait({task}, timeout=timeout)
            except asyncio.CancelledError:
                task.cancel()
                raise
            if not done:
                task.cancel()
                logger.warning("redis unavailable: no reply in %.1fs", timeout)
                raise errors.StoreUnavailable()
            try:
                return task.result()
            except _UNAVAILABLE as exc:
                logger.warning("redis unavailable: %s", exc)
                raise errors.StoreUnavailable() from exc
        finally:
            if limited:
                self._slots.release()

    async def _script(self, name: str, key: str, args: list[Any], index: int) -> Any:
        """Run one script in the slot of keys.TAGS[index]; ``key`` is its KEYS[1]."""
        script = self._scripts[name]
        return await self._call(
            lambda: script(keys=[key], args=args, client=self._router.client(index))
        )

    async def _space_script(self, name: str, space_id: str, args: list[Any]) -> Any:
        return await self._script(name, keys.space_key(space_id), args, keys.shard_of(space_id))

    def space_command(self, name: str, space_id: str, args: Sequence[Any]) -> tuple[Any, ...]:
        """The command that running script ``name`` for ``space_id`` sends (its ``EVALSHA``),
        for a load generator that writes it to Redis itself (bench redis). The script must be
        loaded: any call of it through this store loads it."""
        sha = self._scripts[name].sha
        return ("EVALSHA", sha, 1, keys.space_key(space_id), *args)

    async def _on(self, index: int, fn: Callable[[aioredis.Redis], Any]) -> Any:
        """Run ``fn`` with the client of keys.TAGS[index]'s primary."""
        return await self._call(lambda: fn(self._router.client(index)))

    async def _each(
        self,
        indexes: Iterable[int],
        queue: Callable[[aioredis.client.Pipeline, int], Any],
        *,
        partial: bool = False,
        raise_on_error: bool = True,
    ) -> dict[int, list[Any]]:
        """One pipeline per primary, all at once: ``queue(pipe, index)`` adds the commands for
        each tag index (awaited when it returns an awaitable: queueing a script is). Returns
        each index's replies (error replies as exceptions, with ``raise_on_error=False``).
        With ``partial``, a primary that cannot answer is left out: work that each shard does
        on its own (reaping, webhooks) goes on while one primary fails over. The call fails only
        when none answers."""
        wanted = list(indexes)

        async def on(client: aioredis.Redis, group: list[int]) -> dict[int, list[Any]]:
            counts = []
            async with client.pipeline(transaction=False) as pipe:
                for index in group:
                    before = len(pipe)
                    queued = queue(pipe, index)
                    if inspect.isawaitable(queued):
                        await queued
                    counts.append(len(pipe) - before)
                replies = await pipe.execute(raise_on_error=raise_on_error) if len(pipe) else []
            out, at = {}, 0
            for index, n in zip(group, counts, strict=True):
                out[index] = replies[at : at + n]
                at += n
            return out

        async def run() -> dict[int, list[Any]]:
            groups = self._router.by_client(wanted)
            parts = await asyncio.gather(*(on(c, g) for c, g in groups), return_exceptions=partial)
            merged: dict[int, list[Any]] = {}
            failures = []
            for part in parts:
                if isinstance(part, _UNAVAILABLE):
                    failures.append(part)
                elif isinstance(part, BaseException):
                    raise part
                else:
                    merged.update(part)
            if failures and not merged:
                raise failures[0]
            for failure in failures:
                logger.warning("redis: a primary did not answer (%s); its shards wait", failure)
                await self._router.recover(failure)
            return merged

        return await self._call(run)

    async def start(self) -> None:
        try:
            await self._router.start()
        except _UNAVAILABLE as exc:
            raise errors.StoreUnavailable() from exc
        # The global keys' primary must answer; on a cluster, a shard whose primary is down at
        # start is served once its replica takes over.
        await self._check_layout()
        script = self._scripts["prepare_shard"]
        await self._each(
            SHARDS,
            lambda pipe, shard: script(keys=[keys.epoch_key(shard)], args=[], client=pipe),
            partial=True,
        )

    async def _check_layout(self) -> None:
        """Refuse to run over data of the unsharded layout (it would be invisible: spaces and
        signing keys would seem to have vanished); mark a fresh Redis as sharded."""

        async def run(client: aioredis.Redis) -> tuple[Any, int]:
            layout = await client.get(keys.LAYOUT)
            legacy = 0 if self._router.cluster or layout else await client.exists(*keys.LEGACY_KEYS)
            return layout, legacy

        layout, legacy = await self._on(keys.GLOBAL, run)
        if layout is None and legacy:
            raise LegacyLayoutError(
                "this Redis holds Spaces data in the unsharded layout of an earlier version: "
                "run `spaces redis-migrate` once with every Spaces process stopped "
                '(docs/operations.md, "Upgrading to the sharded layout")'
            )
        if layout is None:
            await self._on(keys.GLOBAL, lambda c: c.set(keys.LAYOUT, keys.LAYOUT_VERSION, nx=True))
        elif layout != keys.LAYOUT_VERSION:
            raise LegacyLayoutError(f"unknown Spaces key layout {layout!r} in this Redis")

    async def close(self) -> None:
        await self._feed.close()
        await self._router.close()

    async def ping(self) -> None:
        """Every primary that holds Spaces' slots answers."""

        async def run() -> None:
            await asyncio.gather(
                *(c.execute_command("PING") for c, _ in self._router.by_client(EVERY_STREAM))
            )

        await self._call(run)

    async def now_ms(self) -> int:
        seconds, micros = await self._on(keys.GLOBAL, lambda c: c.time())
        return int(seconds) * 1000 + int(micros) // 1000

    # --- spaces ----------------------------------------------------------------------------

    async def create_space(
        self, space_id: str, passthrough: str, max_participants: int
    ) -> space_pb2.Space:
        flat = await self._space_script(
            "create_space", space_id, [space_id, passthrough, max_participants]
        )
        return space_from_record(flat_to_dict(flat), 0)

    async def get_space(self, space_id: str) -> space_pb2.Space:
        spaces = await self._spaces_with_broadcasts([space_id])
        if not spaces:
            raise errors.SpaceNotFound()
        return spaces[0]

    async def _spaces_with_broadcasts(self, space_ids: Sequence[str]) -> list[space_pb2.Space]:
        """Spaces (those that exist, in order) with their visible count and their broadcasts:
        two round trips, each one pipeline per primary."""
        by_shard: dict[int, list[str]] = {}
        for space_id in dict.fromkeys(space_ids):
            by_shard.setdefault(keys.shard_of(space_id), []).append(space_id)

        def first(pipe: aioredis.client.Pipeline, shard: int) -> None:
            for space_id in by_shard[shard]:
                pipe.hgetall(keys.space_key(space_id))
                pipe.zcard(keys.leases_key(space_id))
                pipe.zrange(keys.broadcasts_key(space_id), 0, -1)

        replies = await self._each(by_shard, first) if by_shard else {}
        found: dict[str, tuple[dict[str, str], int, list[str]]] = {}
        for shard, ids in by_shard.items():
            r = replies[shard]
            for i, space_id in enumerate(ids):
                found[space_id] = (r[3 * i], int(r[3 * i + 1]), r[3 * i + 2])
        wanted = {
            shard: [(space_id, bid) for space_id in ids for bid in found[space_id][2]]
            for shard, ids in by_shard.items()
        }
        wanted = {shard: pairs for shard, pairs in wanted.items() if pairs}

        def second(pipe: aioredis.client.Pipeline, shard: int) -> None:
            for space_id, bid in wanted[shard]:
                pipe.hgetall(keys.broadcast_key(space_id, bid))
                pipe.get(keys.broadcast_lease_key(space_id, bid))

        more = await self._each(wanted, second) if wanted else {}
        broadcasts: dict[str, list[broadcast_pb2.Broadcast]] = {}
        for shard, pairs in wanted.items():
            r = more[shard]
            for j, (space_id, _) in enumerate(pairs):
                if r[2 * j]:
                    broadcasts.setdefault(space_id, []).append(
                        broadcast_from_record(r[2 * j], r[2 * j + 1] or "")
                    )
        out: list[space_pb2.Space] = []
        for space_id in space_ids:
            record, count, _ = found[space_id]
            if not record:
                continue
            space = space_from_record(record, count - int(record.get("hidden", "0") or 0))
            space.broadcasts.extend(broadcasts.get(space_id, []))
            out.append(space)
        return out

    async def list_spaces(
        self, limit: int, after_seq: int
    ) -> tuple[list[space_pb2.Space], int | None]:
        """Every shard's spaces merged in creation order: by creation sequence (Redis time in
        µs), then shard. The cursor is ``sequence * SHARDS + shard`` of the last one returned, so
        a page starts where the last ended even when spaces are deleted in between."""
        after, after_shard = divmod(after_seq, keys.SHARDS)

        def queue(pipe: aioredis.client.Pipeline, shard: int) -> None:
            low = f"{after}" if shard > after_shard else f"({after}"
            pipe.zrangebyscore(
                keys.spaces_key(shard), low, "+inf", start=0, num=limit + 1, withscores=True
            )

        pages = await self._each(SHARDS, queue)
        candidates = heapq.nsmallest(
            limit + 1,
            (
                (int(score), shard, space_id)
                for shard, (page,) in pages.items()
                for space_id, score in page
            ),
        )
        more = len(candidates) > limit
        chosen = candidates[:limit]
        spaces = await self._spaces_with_broadcasts([space_id for _, _, space_id in chosen])
        cursor = None
        if more and chosen:
            seq, shard, _ = chosen[-1]
            cursor = seq * keys.SHARDS + shard
        return spaces, cursor

    async def update_space(
        self, space_id: str, passthrough: str | None, max_participants: int | None
    ) -> space_pb2.Space:
        reply = await self._space_script(
            "update_space",
            space_id,
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
        reply = await self._space_script(
            "delete_space", space_id, [space_id, "1" if force else "0"]
        )
        _raise_script_error(reply)
        rest = reply[2:]
        return SpaceDeletion(
            node_id=reply[1], removed=[(rest[i], rest[i + 1]) for i in range(0, len(rest), 2)]
        )

    # --- signing keys ------------------------------------------------------------------------
    # The record lives under the global tag; each shard holds a copy of the live key ids for the
    # join script (keys.live_signing_keys_key). Copies are written before the record and revoked
    # before it is deleted, so a key that is listed is usable everywhere, and a key whose delete
    # was interrupted is still listed (delete it again).

    async def create_signing_key(self, key_id: str, public_key_pem: bytes) -> SigningKeyRecord:
        await self._each(
            SHARDS, lambda pipe, shard: pipe.sadd(keys.live_signing_keys_key(shard), key_id)
        )

        async def run(client: aioredis.Redis) -> int:
            seconds, _ = await client.time()
            seq = await client.incr(keys.SIGNING_KEYS_SEQ)
            async with client.pipeline(transaction=True) as pipe:
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
            return int(seconds)

        created_at = await self._on(keys.GLOBAL, run)
        return SigningKeyRecord(id=key_id, created_at=created_at, public_key_pem=public_key_pem)

    async def get_signing_key(self, key_id: str) -> SigningKeyRecord | None:
        record = await self._on(keys.GLOBAL, lambda c: c.hgetall(keys.signing_key_key(key_id)))
        return _key_from_record(record)

    async def list_signing_keys(
        self, limit: int, after_seq: int
    ) -> tuple[list[SigningKeyRecord], int | None]:
        async def run(client: aioredis.Redis) -> tuple[list[Any], list[Any]]:
            page = await client.zrangebyscore(
                keys.SIGNING_KEYS, f"({after_seq}", "+inf", start=0, num=limit + 1, withscores=True
            )
            async with client.pipeline(transaction=False) as pipe:
                for key_id, _ in page[:limit]:
                    pipe.hgetall(keys.signing_key_key(key_id))
                records = await pipe.execute() if page else []
            return page, records

        page, records = await self._on(keys.GLOBAL, run)
        more = len(page) > limit
        page = page[:limit]
        found = [k for k in (_key_from_record(r) for r in records) if k is not None]
        return found, (int(page[-1][1]) if more and page else None)

    async def delete_signing_key(self, key_id: str) -> bool:
        exists = await self._on(keys.GLOBAL, lambda c: c.exists(keys.signing_key_key(key_id)))
        if not exists:
            return False
        script = self._scripts["revoke_signing_key"]
        await self._each(
            SHARDS,
            lambda pipe, shard: script(
                keys=[keys.live_signing_keys_key(shard)], args=[key_id], client=pipe
            ),
        )

        async def run(client: aioredis.Redis) -> list[Any]:
            async with client.pipeline(transaction=True) as pipe:
                pipe.delete(keys.signing_key_key(key_id))
                pipe.zrem(keys.SIGNING_KEYS, key_id)
                return await pipe.execute()

        deleted, _ = await self._on(keys.GLOBAL, run)
        return bool(deleted)

    async def _restore_signing_key(self, shard: int, key_id: str) -> bool:
        """After the join script found no copy of a key id in its shard: if the key still exists
        (the shard's primary lost its data), put the copy back. True when it did."""
        if not await self._on(keys.GLOBAL, lambda c: c.exists(keys.signing_key_key(key_id))):
            return False
        restored = await self._script(
            "restore_signing_key", keys.live_signing_keys_key(shard), [key_id], shard
        )
        if restored:
            logger.warning("shard %d had lost signing key %s: restored", shard, key_id)
        return bool(restored)

    # --- presence --------------------------------------------------------------------------

    async def join_context(self, space_id: str, key_id: str) -> JoinContext:
        shard = keys.shard_of(space_id)

        def queue(pipe: aioredis.client.Pipeline, index: int) -> None:
            if index == keys.GLOBAL:
                pipe.hgetall(keys.signing_key_key(key_id))
            else:
                pipe.get(keys.placement_key(space_id))
                pipe.exists(keys.space_key(space_id))

        replies = await self._each((keys.GLOBAL, shard), queue)
        (record,) = replies[keys.GLOBAL]
        node, exists = replies[shard]
        return JoinContext(_key_from_record(record), node or "", bool(exists))

    async def join(self, r: Reservation) -> Admission:
        args = join_args(r)
        reply = await self._space_script("join", r.space_id, args)
        if (
            reply[0] == "err"
            and reply[1] == "unknown_key"
            and await self._restore_signing_key(keys.shard_of(r.space_id), r.signing_key_id)
        ):
            reply = await self._space_script("join", r.space_id, args)
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
        reply = await self._space_script(
            "claim",
            space_id,
            claim_args(
                space_id, connection_id, ticket_hash, node_id, session_ms, placement_ms, session_id
            ),
        )
        return claim_from_reply(space_id, reply)

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
        reply = await self._space_script(
            "renew",
            space_id,
            renew_args(
                space_id, node_id, session_ms, placement_ms, epoch, space_record, connection_records
            ),
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
        reply = await self._space_script(
            "leave", space_id, leave_args(space_id, connection_id, reason, node_id, resume_hash)
        )
        _raise_script_error(reply)
        if reply[0] == "gone":
            return None
        return participant_from_record(space_id, flat_to_dict(reply[1:]))

    async def remove_participant(
        self, space_id: str, participant_id: str, reason: str
    ) -> participant_pb2.Participant:
        reply = await self._space_script(
            "remove_participant", space_id, [space_id, participant_id, reason]
        )
        _raise_script_error(reply)
        return participant_from_record(space_id, flat_to_dict(reply[1:]))

    async def get_participant(
        self, space_id: str, participant_id: str
    ) -> participant_pb2.Participant:
        async def run(client: aioredis.Redis) -> tuple[dict[str, str], float | None, int]:
            conn = await client.get(keys.pid_key(space_id, participant_id))
            if not conn:
                return {}, None, await client.exists(keys.space_key(space_id))
            async with client.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.conn_key(space_id, conn))
                pipe.zscore(keys.leases_key(space_id), conn)
                pipe.exists(keys.space_key(space_id))
                record, expires, exists = await pipe.execute()
            return record, expires, exists

        record, expires, exists = await self._on(keys.shard_of(space_id), run)
        if not record or record.get("hidden") == "1":
            if not exists:
                raise errors.SpaceNotFound()
            raise errors.ParticipantNotFound()
        return participant_from_record(space_id, record, int(expires or 0))

    async def list_participants(self, space_id: str) -> list[participant_pb2.Participant]:
        async def run(
            client: aioredis.Redis,
        ) -> tuple[int, list[tuple[str, float]], list[dict[str, str]]]:
            async with client.pipeline(transaction=False) as pipe:
                pipe.exists(keys.space_key(space_id))
                pipe.zrange(keys.leases_key(space_id), 0, -1, withscores=True)
                exists, leases = await pipe.execute()
            async with client.pipeline(transaction=False) as pipe:
                for conn, _ in leases:
                    pipe.hgetall(keys.conn_key(space_id, conn))
                records = await pipe.execute() if leases else []
            return exists, leases, records

        exists, leases, records = await self._on(keys.shard_of(space_id), run)
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
        reply = await self._space_script("set_display_name", space_id, [connection_id, name])
        return bool(reply)

    async def reap(self, max_spaces: int = 100) -> int:
        """Reap every shard (``max_spaces`` per shard and pass)."""
        script = self._scripts["reap"]
        replies = await self._each(
            SHARDS,
            lambda pipe, shard: script(
                keys=[keys.lease_index_key(shard)], args=[max_spaces], client=pipe
            ),
            partial=True,
        )
        return sum(int(removed) for (removed,) in replies.values())

    # --- registry --------------------------------------------------------------------------

    async def heartbeat(self, node: node_pb2.Node, record_ttl_ms: int) -> int:
        return int(
            await self._script(
                "heartbeat",
                keys.node_key(node.id),
                [node.id, node_to_text(node), node_pb2.NodeState.Name(node.state), record_ttl_ms],
                keys.GLOBAL,
            )
        )

    async def remove_node(self, node: node_pb2.Node) -> None:
        final = node_pb2.Node()
        final.CopyFrom(node)
        final.state = node_pb2.NODE_STATE_STOPPED
        await self._script(
            "remove_node", keys.node_key(node.id), [node.id, node_to_text(final)], keys.GLOBAL
        )

    async def list_nodes(self, record_ttl_ms: int) -> NodeView:
        reply = await self._script("list_nodes", keys.NODES, [record_ttl_ms], keys.GLOBAL)
        rest = reply[1:]
        nodes = [node_from_text(rest[i + 2], int(rest[i + 1])) for i in range(0, len(rest), 3)]
        return NodeView(now_ms=int(reply[0]), nodes=nodes)

    # --- node commands: one capped stream per node ---------------------------------------------

    async def publish_node_command(self, node_id: str, command: node_pb2.NodeCommand) -> None:
        stream = keys.node_commands_key(node_id)
        payload = command_to_text(command)

        async def run(client: aioredis.Redis) -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.xadd(
                    stream, {"c": payload}, maxlen=keys.NODE_COMMANDS_MAXLEN, approximate=True
                )
                pipe.pexpire(stream, keys.NODE_COMMANDS_TTL_MS)
                await pipe.execute()

        await self._on(keys.GLOBAL, run)

    async def node_commands(self, node_id: str) -> AsyncIterator[node_pb2.NodeCommand]:
        stream = keys.node_commands_key(node_id)
        position: str | None = None
        backoff = 0.1

        async def read(after: str) -> Any:
            return await self._router.client(keys.GLOBAL).xread(
                {stream: after}, count=100, block=1_000
            )

        while True:
            try:
                if position is None:
                    tail = await self._on(keys.GLOBAL, lambda c: c.xrevrange(stream, count=1))
                    position = tail[0][0] if tail else "0-0"
                reply = await self._call(
                    functools.partial(read, position), timeout_s=self._timeout_s + 1, limited=False
                )
                backoff = 0.1
                for _, entries in reply or []:
                    for entry_id, fields in entries:
                        position = entry_id
                        yield command_from_text(fields["c"])
            except errors.StoreUnavailable as exc:
                logger.warning("node %s: command stream unavailable (%s); retrying", node_id, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    # --- broadcasts --------------------------------------------------------------------------

    async def create_broadcast(self, spec: BroadcastSpec, limit: int) -> broadcast_pb2.Broadcast:
        reply = await self._space_script(
            "create_broadcast",
            spec.space_id,
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
        async def run(client: aioredis.Redis) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.broadcast_key(space_id, broadcast_id))
                pipe.get(keys.broadcast_lease_key(space_id, broadcast_id))
                pipe.exists(keys.space_key(space_id))
                return await pipe.execute()

        record, holder, exists = await self._on(keys.shard_of(space_id), run)
        if not exists:
            raise errors.SpaceNotFound()
        if not record:
            raise errors.BroadcastNotFound()
        return broadcast_from_record(record, holder or "")

    async def list_broadcasts(self, space_id: str) -> list[broadcast_pb2.Broadcast]:
        return list((await self.get_space(space_id)).broadcasts)

    async def delete_broadcast(self, space_id: str, broadcast_id: str) -> None:
        reply = await self._space_script("delete_broadcast", space_id, [space_id, broadcast_id])
        _raise_script_error(reply)

    async def _start_stop(
        self, script: str, space_id: str, broadcast_id: str
    ) -> tuple[broadcast_pb2.Broadcast, str]:
        reply = await self._space_script(script, space_id, [space_id, broadcast_id])
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
        """The due broadcasts of every shard (``limit`` per shard; a shard whose primary is
        down waits)."""
        script = self._scripts["due_broadcasts"]
        replies = await self._each(
            SHARDS,
            lambda pipe, shard: script(
                keys=[keys.broadcast_queue_key(shard)], args=[limit], client=pipe
            ),
            partial=True,
        )
        return [
            (m.partition(" ")[0], m.partition(" ")[2])
            for shard in sorted(replies)
            for m in replies[shard][0]
        ]

    async def claim_broadcast(
        self, space_id: str, broadcast_id: str, holder: str, worker_id: str, lease_ms: int
    ) -> BroadcastJob | None:
        reply = await self._space_script(
            "claim_broadcast",
            space_id,
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
            await self._space_script(
                "renew_broadcast",
                space_id,
                [space_id, broadcast_id, holder, lease_ms, run, "1" if streaming else "0", error],
            )
        )

    async def release_broadcast(self, space_id: str, broadcast_id: str, holder: str) -> bool:
        return bool(
            await self._space_script(
                "release_broadcast", space_id, [space_id, broadcast_id, holder]
            )
        )

    async def join_hidden(self, reservation: HiddenReservation) -> tuple[str, int]:
        r = reservation
        reply = await self._space_script(
            "join_hidden",
            r.space_id,
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
        return await self._feed.latest_id()

    async def read_events(self, after_id: str, count: int, block_ms: int) -> list[event_pb2.Event]:
        entries = await self._feed.read(after_id, count, block_ms)
        return [event_from_entry(entry_id, fields) for entry_id, fields in entries]

    # --- webhooks ----------------------------------------------------------------------------
    # Delivery state and its scripts: keys.py, "webhooks". Every shard runs both stages for its
    # own spaces; these methods visit the shards and merge what they return.

    def _wh(self, name: str, index: int, args: list[Any]) -> Awaitable[Any]:
        script = self._wh_scripts[name]
        return self._call(
            lambda: script(
                keys=[keys.webhook_endpoints_key(index)],
                args=args,
                client=self._router.client(index),
            )
        )

    async def _wh_queue(
        self, pipe: aioredis.client.Pipeline, name: str, index: int, args: list[Any]
    ) -> None:
        await self._wh_scripts[name](
            keys=[keys.webhook_endpoints_key(index)], args=args, client=pipe
        )

    async def webhook_put_endpoint(self, endpoint: WebhookEndpointRecord) -> None:
        version = int(await self._on(keys.GLOBAL, lambda c: c.incr(keys.WEBHOOK_ENDPOINTS_SEQ)))
        text = _endpoint_to_text(endpoint, version)
        args = [endpoint.id, text, version, "1"]
        # The global list first; webhook_sync_endpoints repairs the shards from it if this is
        # interrupted.
        await self._wh("webhook_put_endpoint", keys.GLOBAL, args)
        await self._each(
            SHARDS, lambda pipe, shard: self._wh_queue(pipe, "webhook_put_endpoint", shard, args)
        )

    async def webhook_endpoints(self) -> list[WebhookEndpointRecord]:
        found: dict[str, str] = await self._on(
            keys.GLOBAL, lambda c: c.hgetall(keys.webhook_endpoints_key(keys.GLOBAL))
        )
        records = [_endpoint_from_text(text) for text in found.values()]
        return sorted(records, key=lambda e: (e.created_at, e.id))

    async def webhook_delete_endpoint(self, endpoint_id: str) -> bool:
        existed = await self._wh("webhook_delete_endpoint", keys.GLOBAL, [endpoint_id])
        await self._each(
            SHARDS,
            lambda pipe, shard: self._wh_queue(
                pipe, "webhook_delete_endpoint", shard, [endpoint_id]
            ),
        )
        return bool(existed)

    _orphans: frozenset[tuple[int, str]] = frozenset()
    """(shard, endpoint id) copies that were not in the list at the last repair."""

    async def webhook_sync_endpoints(self) -> int:
        """Make every shard's copy of the endpoints equal to the global list, after a put or a
        delete was interrupted half-way or a shard's primary lost its data. Writes are
        versioned and deletions leave a mark, so a repair racing a change never undoes it. A
        copy missing from the list is dropped only when two repairs in a row saw it (it may be
        a put that has not reached the list yet)."""
        listed: dict[str, str] = await self._on(
            keys.GLOBAL, lambda c: c.hgetall(keys.webhook_endpoints_key(keys.GLOBAL))
        )
        truth = {i: (text, _endpoint_version(text)) for i, text in listed.items()}
        copies = await self._each(
            SHARDS, lambda pipe, shard: pipe.hgetall(keys.webhook_endpoints_key(shard))
        )
        writes: dict[int, list[list[Any]]] = {}
        orphans: set[tuple[int, str]] = set()
        for shard, (copy,) in copies.items():
            for endpoint_id, (text, version) in truth.items():
                have = copy.get(endpoint_id)
                if have is None or _endpoint_version(have) < version:
                    writes.setdefault(shard, []).append([endpoint_id, text, version, "0"])
            orphans |= {(shard, i) for i in copy if i not in truth}
        drops = orphans & self._orphans
        self._orphans = frozenset(orphans - drops)
        touched = set(writes) | {shard for shard, _ in drops}
        if not touched:
            return 0

        async def queue(pipe: aioredis.client.Pipeline, shard: int) -> None:
            for args in writes.get(shard, []):
                await self._wh_queue(pipe, "webhook_put_endpoint", shard, args)
            for s, endpoint_id in drops:
                if s == shard:
                    await self._wh_queue(pipe, "webhook_delete_endpoint", shard, [endpoint_id])

        await self._each(touched, queue)
        fixed = sum(len(w) for w in writes.values()) + len(drops)
        logger.warning("webhook endpoints: repaired %d shard copies", fixed)
        return fixed

    async def webhook_group_ensure(self) -> None:
        def queue(pipe: aioredis.client.Pipeline, index: int) -> None:
            pipe.xgroup_create(keys.events_key(index), keys.WEBHOOK_GROUP, id="$", mkstream=True)

        async def run() -> None:
            for client, group in self._router.by_client(EVERY_STREAM):
                async with client.pipeline(transaction=False) as pipe:
                    for index in group:
                        queue(pipe, index)
                    replies = await pipe.execute(raise_on_error=False)
                created = 0
                for reply in replies:
                    if isinstance(reply, Exception):
                        if "BUSYGROUP" not in str(reply):
                            raise _reply_error(reply)
                    else:
                        created += 1
                if created:
                    logger.info(
                        "created consumer group %s on %d streams", keys.WEBHOOK_GROUP, created
                    )

        await self._call(run)

    async def webhook_read(self, consumer: str, count: int, block_ms: int) -> list[event_pb2.Event]:
        """New entries for this consumer from every stream (each stream's group hands out its
        entries once). Waits on the event doorbell, not in Redis."""
        deadline = asyncio.get_running_loop().time() + block_ms / 1000
        while True:
            rung = self._feed.doorbell.generation
            events = await self._call(lambda: self._read_group(consumer, count))
            remaining = deadline - asyncio.get_running_loop().time()
            if events or remaining <= 0:
                return events
            await self._feed.doorbell.wait(rung, remaining)

    async def _read_group(self, consumer: str, count: int) -> list[event_pb2.Event]:
        replies = await self._each(
            EVERY_STREAM,
            lambda pipe, index: pipe.xreadgroup(
                keys.WEBHOOK_GROUP, consumer, {keys.events_key(index): ">"}, count=count
            ),
            partial=True,
            raise_on_error=False,
        )
        events: list[event_pb2.Event] = []
        lost: list[int] = []
        for index, (reply,) in replies.items():
            if isinstance(reply, RedisResponseError) and "NOGROUP" in str(reply):
                lost.append(index)
            elif isinstance(reply, Exception):
                raise _reply_error(reply) from reply
            else:
                for _, entries in reply or []:
                    events += [event_from_entry(i, fields) for i, fields in entries if fields]
        if lost:
            # A shard lost its data (or someone deleted the group): start it again at its end.
            logger.warning(
                "webhook consumer group vanished on %d streams; recreating it", len(lost)
            )
            await self._each(
                lost,
                lambda pipe, index: pipe.xgroup_create(
                    keys.events_key(index), keys.WEBHOOK_GROUP, id="$", mkstream=True
                ),
                raise_on_error=False,
            )
        return events

    async def webhook_claim_stale(
        self, consumer: str, min_idle_ms: int, count: int
    ) -> list[event_pb2.Event]:
        replies = await self._each(
            EVERY_STREAM,
            lambda pipe, index: pipe.xautoclaim(
                keys.events_key(index),
                keys.WEBHOOK_GROUP,
                consumer,
                min_idle_ms,
                "0-0",
                count=count,
            ),
            partial=True,
            raise_on_error=False,
        )
        events: list[event_pb2.Event] = []
        for (reply,) in replies.values():
            if isinstance(reply, RedisResponseError) and "NOGROUP" in str(reply):
                continue
            if isinstance(reply, Exception):
                raise _reply_error(reply) from reply
            # reply[2] lists entries trimmed from the stream: XAUTOCLAIM already dropped them
            # from the pending list, and there is nothing left to deliver.
            events += [event_from_entry(i, fields) for i, fields in reply[1] if fields]
        return events

    async def webhook_fan_out(self, jobs: Sequence[WebhookJob]) -> int:
        """One script per stream the jobs came from: each acknowledges its entries and enqueues
        their deliveries in one step."""
        if not jobs:
            return 0
        by_stream: dict[int, list[Any]] = {}
        for job in jobs:
            by_stream.setdefault(keys.event_stream_index(job.stream_id), []).extend(
                [
                    job.stream_id,
                    keys.webhook_sort_key(job.stream_id),
                    job.envelope_id,
                    job.space_id,
                    job.event_type,
                    job.body,
                ]
            )
        replies = await self._each(
            by_stream,
            lambda pipe, index: self._wh_queue(pipe, "webhook_fan_out", index, by_stream[index]),
        )
        return sum(int(n) for (n,) in replies.values())

    async def webhook_take(
        self,
        owner: str,
        lease_ms: int,
        limit: int,
        default_slots: int,
        slots: Mapping[str, int],
        rotation: int = 0,
    ) -> tuple[list[WebhookDelivery], int]:
        """One look at every shard at once for due work, then shard by shard where there is
        some (from a rotating start, so none is starved), each with what is left of the budget
        and of each endpoint's slots."""
        due = await self._each(
            SHARDS,
            lambda pipe, shard: self._wh_queue(pipe, "webhook_due", shard, []),
            partial=True,
        )
        free = dict(slots)
        taken: list[WebhookDelivery] = []
        reclaimed = 0
        unreachable: set[aioredis.Redis] = set()
        for n in range(keys.SHARDS):
            if len(taken) >= limit:
                break
            shard = (n + rotation) % keys.SHARDS
            if not int((due.get(shard) or [0])[0]):
                continue  # nothing due there (or its primary did not answer)
            args: list[Any] = [
                f"{owner}/{shard}",
                lease_ms,
                limit - len(taken),
                default_slots,
                rotation,
            ]
            for endpoint_id, left in free.items():
                args += [endpoint_id, left]
            primary = self._router.client(shard)
            if primary in unreachable:
                continue
            try:
                reply = await self._wh("webhook_take", shard, args)
            except errors.StoreUnavailable:
                # This primary's queues wait for it (or for its replica); the others go on.
                unreachable.add(primary)
                continue
            reclaimed += int(reply[0])
            rest = reply[1:]
            for i in range(0, len(rest), 12):
                delivery = WebhookDelivery(
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
                taken.append(delivery)
                ep = delivery.endpoint_id
                free[ep] = free.get(ep, default_slots) - 1
        return taken, reclaimed

    def _by_shard(self, deliveries: Iterable[WebhookDelivery]) -> dict[int, list[WebhookDelivery]]:
        groups: dict[int, list[WebhookDelivery]] = {}
        for d in deliveries:
            groups.setdefault(keys.shard_of(d.space_id), []).append(d)
        return groups

    async def webhook_renew(self, deliveries: Sequence[WebhookDelivery], lease_ms: int) -> set[str]:
        groups = self._by_shard(deliveries)
        if not groups:
            return set()

        async def queue(pipe: aioredis.client.Pipeline, shard: int) -> None:
            args: list[Any] = [lease_ms]
            for d in groups[shard]:
                args += [d.queue, d.token]
            await self._wh_queue(pipe, "webhook_renew", shard, args)

        replies = await self._each(groups, queue)
        return {token for (lost,) in replies.values() for token in lost}

    async def webhook_delivered(self, delivery: WebhookDelivery) -> bool:
        d = delivery
        return bool(
            await self._wh(
                "webhook_delivered",
                keys.shard_of(d.space_id),
                [d.endpoint_id, d.space_id, d.sort_key, d.token],
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
        outcome = str(
            await self._wh(
                "webhook_failed",
                keys.shard_of(d.space_id),
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
        if outcome == "dead":
            await self._cap_dead_letters(dead_letter_limit)
        return outcome

    async def _cap_dead_letters(self, limit: int) -> None:
        """Keep at most ``limit`` dead letters over all shards, dropping the oldest. Each shard
        caps its own in the failing script; this trims the total after the fact (replicas
        trimming at once may drop a few more than needed)."""
        counts = await self._each(
            SHARDS, lambda pipe, shard: pipe.zcard(keys.webhook_dead_index_key(shard))
        )
        excess = sum(int(n) for (n,) in counts.values()) - limit
        if excess <= 0:
            return
        oldest = await self._each(
            [s for s, (n,) in counts.items() if n],
            lambda pipe, shard: pipe.zrange(
                keys.webhook_dead_index_key(shard), 0, excess - 1, withscores=True
            ),
        )
        drop = heapq.nsmallest(
            excess,
            (
                (score, dead_id, shard)
                for shard, (page,) in oldest.items()
                for dead_id, score in page
            ),
        )
        by_shard: dict[int, list[str]] = {}
        for _, dead_id, shard in drop:
            by_shard.setdefault(shard, []).append(dead_id)
        await self._each(
            by_shard,
            lambda pipe, shard: self._wh_queue(pipe, "webhook_drop_dead", shard, by_shard[shard]),
        )

    async def webhook_release(self, deliveries: Sequence[WebhookDelivery]) -> int:
        groups = self._by_shard(deliveries)
        if not groups:
            return 0

        async def queue(pipe: aioredis.client.Pipeline, shard: int) -> None:
            args: list[Any] = []
            for d in groups[shard]:
                args += [d.queue, d.token]
            await self._wh_queue(pipe, "webhook_release", shard, args)

        replies = await self._each(groups, queue)
        return sum(int(n) for (n,) in replies.values())

    async def webhook_dead_letters(self, limit: int) -> list[DeadLetterRecord]:
        pages = await self._each(
            SHARDS,
            lambda pipe, shard: pipe.zrevrange(
                keys.webhook_dead_index_key(shard), 0, limit - 1, withscores=True
            ),
        )
        newest = heapq.nlargest(
            limit,
            (
                (score, dead_id, shard)
                for shard, (page,) in pages.items()
                for dead_id, score in page
            ),
        )
        if not newest:
            return []
        by_shard: dict[int, list[str]] = {}
        for _, dead_id, shard in newest:
            by_shard.setdefault(shard, []).append(dead_id)

        def read(pipe: aioredis.client.Pipeline, shard: int) -> None:
            for dead_id in by_shard[shard]:
                pipe.hgetall(keys.webhook_dead_key(dead_id))

        records = await self._each(by_shard, read)
        found = {
            dead_id: record
            for shard, ids in by_shard.items()
            for dead_id, record in zip(ids, records[shard], strict=True)
        }
        return [_dead_letter_from_record(found[i]) for _, i, _ in newest if found.get(i)]

    async def webhook_replay(self, ids: Sequence[str]) -> int:
        if ids:
            by_shard: dict[int, list[str]] = {}
            for dead_id in ids:
                shard = _dead_letter_shard(dead_id)
                if shard is not None:
                    by_shard.setdefault(shard, []).append(dead_id)
        else:
            by_shard = {shard: [] for shard in SHARDS}
        if not by_shard:
            return 0
        replies = await self._each(
            by_shard,
            lambda pipe, shard: self._wh_queue(pipe, "webhook_replay", shard, by_shard[shard]),
        )
        return sum(int(n) for (n,) in replies.values())

    async def webhook_backlog(self) -> WebhookBacklog:
        """Every shard's backlog, summed (the oldest due time: the earliest of any shard)."""
        replies = await self._each(
            SHARDS,
            lambda pipe, shard: self._wh_queue(pipe, "webhook_backlog", shard, []),
            partial=True,
        )
        rows = [reply for (reply,) in replies.values()]
        due = [int(oldest) for _, oldest, _, _ in rows if int(oldest) >= 0]
        return WebhookBacklog(
            queues=sum(int(queues) for queues, _, _, _ in rows),
            oldest_due_ms=min(due, default=0),
            dead_letters=sum(int(dead) for _, _, dead, _ in rows),
            now_ms=max(int(now) for _, _, _, now in rows),
        )

    async def webhook_prune_consumers(self, idle_ms: int, keep: str) -> int:
        async def run() -> int:
            pruned = 0
            for index in EVERY_STREAM:
                client = self._router.client(index)
                stream = keys.events_key(index)
                try:
                    consumers = await client.xinfo_consumers(stream, keys.WEBHOOK_GROUP)
                except RedisResponseError:
                    continue  # no group on this stream yet
                for c in consumers:
                    if c["name"] != keep and c["pending"] == 0 and c["idle"] >= idle_ms:
                        await client.xgroup_delconsumer(stream, keys.WEBHOOK_GROUP, c["name"])
                        pruned += 1
            return pruned

        return await self._call(run)


def join_args(r: Reservation) -> list[Any]:
    """The join script's arguments."""
    return [
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
    ]


def claim_args(
    space_id: str,
    connection_id: str,
    ticket_hash: str,
    node_id: str,
    session_ms: int,
    placement_ms: int,
    session_id: str,
) -> list[Any]:
    """The claim script's arguments."""
    return [space_id, connection_id, ticket_hash, node_id, session_ms, placement_ms, session_id]


def claim_from_reply(space_id: str, reply: list[Any]) -> Claim:
    """The claim script's reply, decoded (or its error raised)."""
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


def renew_args(
    space_id: str,
    node_id: str,
    session_ms: int,
    placement_ms: int,
    epoch: str,
    space_record: dict[str, str],
    connection_records: list[dict[str, str]],
) -> list[Any]:
    """The renewal script's arguments: the node's snapshot of the space, to restore it from
    if Redis lost it."""
    snapshot = json.dumps({"epoch": epoch, "space": space_record, "conns": connection_records})
    return [space_id, node_id, session_ms, placement_ms, snapshot]


def leave_args(
    space_id: str, connection_id: str, reason: str, node_id: str = "", resume_hash: str = ""
) -> list[Any]:
    """The leave script's arguments."""
    return [space_id, connection_id, reason, node_id, resume_hash]


def _dead_letter_shard(dead_letter_id: str) -> int | None:
    """A dead letter's id is "<endpoint_id>:<stream id>"; the stream id names the shard."""
    stream_id = dead_letter_id.rpartition(":")[2]
    ms, sep, seq = stream_id.partition("-")
    if not (sep and ms.isdigit() and seq.isdigit()):
        return None
    index = keys.event_stream_index(stream_id)
    return index if index < keys.SHARDS else None


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


def _endpoint_to_text(endpoint: WebhookEndpointRecord, version: int) -> str:
    return json.dumps(
        {
            "id": endpoint.id,
            "url": endpoint.url,
            "secret": endpoint.secret,
            "event_types": list(endpoint.event_types),
            "created_at": endpoint.created_at,
            "from_config": endpoint.from_config,
            "v": version,
        }
    )


def _endpoint_version(text: str) -> int:
    return int(json.loads(text).get("v", 0))


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
