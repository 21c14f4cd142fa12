"""``spaces redis-migrate``: move a standalone Redis from the unsharded key layout (before
shards: ``sp:{<space>}``, ``spaces``, ``keys``, ``events``, ...) to the sharded one.

Run it once, with every Spaces process stopped. It keeps what must outlive a restart:

* **spaces**, in their creation order, idle (nobody is connected while Spaces is stopped),
  with their **broadcasts** (idle too: start them again once participants are back);
* **signing keys** (only the public halves were ever stored), with their order;
* **webhook endpoints**.

It drops what is transient or cannot carry over: participants and their leases, placements,
the node registry, the event stream, undelivered webhooks and dead letters (replay or inspect
those before upgrading). Running it again is harmless: it rewrites the same records, then removes
the old keys.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis

from spaces.store import keys
from spaces.store.base import WebhookEndpointRecord
from spaces.store.redis import RedisStore, _endpoint_from_text

logger = logging.getLogger(__name__)

LIVE_NODE_MS = 10_000
"""A node heartbeat this recent in the old registry means an old Spaces process still runs."""
OLD_PATTERNS = ("sp:{*", "key:*", "node:*", "wh:*")
OLD_NAMES = (
    "spaces",
    "spaces:seq",
    "keys",
    "keys:seq",
    "events",
    "epoch",
    "leases",
    "nodes",
    "broadcasts",
)


@dataclass(frozen=True)
class MigrationReport:
    spaces: int
    broadcasts: int
    signing_keys: int
    webhook_endpoints: int
    old_keys_removed: int


class StillRunning(RuntimeError):
    pass


async def _hgetall(client: aioredis.Redis, key: str) -> dict[str, str]:
    return await cast(Awaitable[dict[str, str]], client.hgetall(key))


async def migrate(url: str, *, dry_run: bool = False) -> MigrationReport:
    client: aioredis.Redis = aioredis.from_url(url, decode_responses=True)
    store = RedisStore(url)
    try:
        now_s, _ = await client.time()
        beats = await client.zrangebyscore("nodes", (int(now_s) * 1000) - LIVE_NODE_MS, "+inf")
        if beats:
            raise StillRunning(
                f"media node(s) {', '.join(beats)} heartbeat in the old layout: stop every "
                "Spaces process first"
            )
        spaces = await client.zrange("spaces", 0, -1, withscores=True)
        signing = await client.zrange("keys", 0, -1, withscores=True)
        endpoints = await _hgetall(client, "wh:endpoints")
        if dry_run:
            counted = 0
            for space_id, _ in spaces:
                counted += int(await client.zcard(f"sp:{{{space_id}}}:bcs"))
            return MigrationReport(len(spaces), counted, len(signing), len(endpoints), 0)

        # Spaces: same records, idle, in the same order (a creation sequence in µs that
        # follows created_at and never goes backwards).
        last: dict[int, int] = {}
        sequence = 0
        broadcasts = 0
        for space_id, _ in spaces:
            record = await _hgetall(client, f"sp:{{{space_id}}}")
            if not record:
                continue
            shard = keys.shard_of(space_id)
            sequence = max(sequence + 1, int(record.get("created_at", "0") or 0) * 1_000_000)
            last[shard] = sequence
            async with client.pipeline(transaction=True) as pipe:
                pipe.hset(
                    keys.space_key(space_id),
                    mapping={
                        "id": space_id,
                        "created_at": record.get("created_at", "0"),
                        "passthrough": record.get("passthrough", ""),
                        "status": "idle",
                        "session": "",
                        "max": record.get("max", "0"),
                        "seq": str(sequence),
                        "connected": "0",
                        "hidden": "0",
                        "bcseq": record.get("bcseq", "0"),
                    },
                )
                pipe.zadd(keys.spaces_key(shard), {space_id: sequence})
                await pipe.execute()
            broadcasts += await _move_broadcasts(client, space_id)
        for shard, sequence in last.items():
            current = int(await client.get(keys.spaces_seq_key(shard)) or 0)
            if sequence > current:
                await client.set(keys.spaces_seq_key(shard), str(sequence))

        # Signing keys: the record under the global tag, a copy of the id in every shard.
        for key_id, seq in signing:
            record = await _hgetall(client, f"key:{key_id}")
            if not record:
                continue
            async with client.pipeline(transaction=False) as pipe:
                for shard in range(keys.SHARDS):
                    pipe.sadd(keys.live_signing_keys_key(shard), key_id)
                await pipe.execute()
            async with client.pipeline(transaction=True) as pipe:
                pipe.hset(keys.signing_key_key(key_id), mapping=record)
                pipe.zadd(keys.SIGNING_KEYS, {key_id: seq})
                await pipe.execute()
        old_seq = int(await client.get("keys:seq") or 0)
        if old_seq > int(await client.get(keys.SIGNING_KEYS_SEQ) or 0):
            await client.set(keys.SIGNING_KEYS_SEQ, str(old_seq))

        # Webhook endpoints, through the store (the list plus a copy per shard).
        for text in endpoints.values():
            endpoint: WebhookEndpointRecord = _endpoint_from_text(text)
            await store.webhook_put_endpoint(endpoint)

        await client.set(keys.LAYOUT, keys.LAYOUT_VERSION)
        removed = 0
        for pattern in OLD_PATTERNS:
            batch = [k async for k in client.scan_iter(match=pattern, count=1000)]
            for i in range(0, len(batch), 500):
                removed += int(await client.delete(*batch[i : i + 500]))
        removed += int(await client.delete(*OLD_NAMES))
        return MigrationReport(len(spaces), broadcasts, len(signing), len(endpoints), removed)
    finally:
        await client.aclose()
        await store.close()


async def _move_broadcasts(client: aioredis.Redis, space_id: str) -> int:
    """A space's broadcasts (record, background, order), idle and unclaimed."""
    old = f"sp:{{{space_id}}}"
    order = await client.zrange(f"{old}:bcs", 0, -1, withscores=True)
    for broadcast_id, seq in order:
        record = await _hgetall(client, f"{old}:bc:{broadcast_id}")
        if not record:
            continue
        record.update({"status": "idle", "worker": "", "streaming": "0"})
        background = await client.get(f"{old}:bc:{broadcast_id}:bg")
        async with client.pipeline(transaction=True) as pipe:
            pipe.hset(keys.broadcast_key(space_id, broadcast_id), mapping=record)
            if background:
                pipe.set(keys.broadcast_background_key(space_id, broadcast_id), background)
            pipe.zadd(keys.broadcasts_key(space_id), {broadcast_id: seq})
            await pipe.execute()
    return len(order)


async def run(url: str, dry_run: bool) -> int:
    started = time.monotonic()
    try:
        report = await migrate(url, dry_run=dry_run)
    except StillRunning as exc:
        print(f"not migrated: {exc}")
        return 1
    verb = "would move" if dry_run else "moved"
    print(
        f"{verb} {report.spaces} spaces ({report.broadcasts} broadcasts), "
        f"{report.signing_keys} signing keys and "
        f"{report.webhook_endpoints} webhook endpoints to the sharded layout"
        + ("" if dry_run else f"; removed {report.old_keys_removed} old keys")
        + f" ({time.monotonic() - started:.1f}s)"
    )
    return 0
