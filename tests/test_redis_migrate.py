"""Upgrading a standalone Redis from the unsharded key layout: the store refuses to run over it,
and `spaces redis-migrate` moves spaces, signing keys and webhook endpoints across."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from spaces.auth.keys import generate_signing_key
from spaces.store.redis import LegacyLayoutError, RedisStore
from spaces.v1 import broadcast_pb2
from tests.support.redis_server import RedisServer
from tests.support.system import SPACES
from tests.test_store_contract import reservation


async def write_legacy_layout(url: str) -> tuple[list[str], bytes]:
    """Data as the unsharded store wrote it (its keys.py documents these shapes)."""
    client = aioredis.from_url(url, decode_responses=True)
    space_ids = ["legacyspace1", "legacyspace2", "legacyspace3"]
    for seq, space_id in enumerate(space_ids, start=1):
        await client.hset(
            f"sp:{{{space_id}}}",
            mapping={
                "id": space_id,
                "created_at": 1_700_000_000 + seq,
                "passthrough": f"order-{seq}",
                "status": "active" if seq == 2 else "idle",
                "session": "sess" if seq == 2 else "",
                "max": 7 * seq,
                "seq": seq,
                "connected": 1 if seq == 2 else 0,
            },
        )
        await client.zadd("spaces", {space_id: seq})
    await client.set("spaces:seq", 3)
    # An active broadcast of the active space (it comes back idle).
    bc = f"sp:{{{space_ids[1]}}}:bc:bc1"
    await client.hset(
        bc,
        mapping={
            "id": "bc1",
            "space": space_ids[1],
            "created_at": 1_700_000_100,
            "status": "active",
            "layout": "gallery",
            "res": "1280x720",
            "url": "rtmp://127.0.0.1/live",
            "key": "stream-key",
            "bg": "",
            "bgsha": "",
            "pass": "bc-pass",
            "started": 1,
            "run": 1,
            "worker": "w1",
            "err": "",
            "streaming": "1",
        },
    )
    await client.hset(f"sp:{{{space_ids[1]}}}", "bcseq", 1)
    await client.zadd(f"sp:{{{space_ids[1]}}}:bcs", {"bc1": 1})
    await client.set(f"{bc}:lease", "w1 token")
    await client.zadd("broadcasts", {f"{space_ids[1]} bc1": 1})
    # Transient state of a live session, which does not carry over.
    await client.zadd(f"sp:{{{space_ids[1]}}}:leases", {"c1": 1})
    await client.hset(f"sp:{{{space_ids[1]}}}:c:c1", mapping={"pid": "alice", "cid": "c1"})
    await client.set(f"sp:{{{space_ids[1]}}}:pid:alice", "c1")
    await client.zadd("leases", {space_ids[1]: 1})
    await client.xadd("events", {"t": "space_created", "s": space_ids[0]})
    await client.zadd("nodes", {"old-node": 1_000})  # silent for years
    generated = generate_signing_key()
    await client.hset(
        "key:oldkey",
        mapping={
            "id": "oldkey",
            "created_at": 1_700_000_000,
            "public_key": generated.public_key_pem.decode(),
        },
    )
    await client.zadd("keys", {"oldkey": 1})
    await client.set("keys:seq", 1)
    await client.hset(
        "wh:endpoints",
        "ep1",
        json.dumps(
            {
                "id": "ep1",
                "url": "http://127.0.0.1:9/hooks",
                "secret": "s",
                "event_types": ["video.space.idle"],
                "created_at": 1_700_000_000,
                "from_config": False,
            }
        ),
    )
    await client.aclose()
    return space_ids, generated.public_key_pem


def migrate_command(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SPACES, "redis-migrate", "--redis-url", url, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_store_refuses_redis_data_of_the_unsharded_layout(
    private_redis: RedisServer,
) -> None:
    await write_legacy_layout(private_redis.url)
    store = RedisStore(private_redis.url)
    with pytest.raises(LegacyLayoutError, match="redis-migrate"):
        await store.start()
    await store.close()


async def test_redis_migrate_moves_spaces_signing_keys_and_endpoints(
    private_redis: RedisServer,
) -> None:
    url = private_redis.url
    space_ids, public_pem = await write_legacy_layout(url)

    dry = migrate_command(url, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert (
        "would move 3 spaces (1 broadcasts), 1 signing keys and 1 webhook endpoints" in dry.stdout
    )

    done = migrate_command(url)
    assert done.returncode == 0, done.stderr
    assert "moved 3 spaces (1 broadcasts), 1 signing keys and 1 webhook endpoints" in done.stdout

    store = RedisStore(url)
    await store.start()  # no longer refused
    try:
        listed, _ = await store.list_spaces(10, 0)
        assert [s.id for s in listed] == space_ids
        assert [(s.passthrough, s.max_participants) for s in listed] == [
            ("order-1", 7),
            ("order-2", 14),
            ("order-3", 21),
        ]
        assert {s.status for s in listed} == {1}  # idle: nobody is connected after a stop
        assert [s.participant_count for s in listed] == [0, 0, 0]
        key = await store.get_signing_key("oldkey")
        assert key is not None and key.public_key_pem == public_pem
        # Its id reached every shard: a join that checks the key passes in any space.
        for space_id in space_ids:
            r = replace(reservation(space_id, "alice"), signing_key_id="oldkey")
            assert (await store.join(r)).participant_id == "alice"
        assert [e.id for e in await store.webhook_endpoints()] == ["ep1"]
        (broadcast,) = await store.list_broadcasts(space_ids[1])
        assert (broadcast.id, broadcast.passthrough) == ("bc1", "bc-pass")
        assert broadcast.status == broadcast_pb2.BROADCAST_STATUS_IDLE
        assert await store.broadcasts_due(10) == []
        # New spaces come after the migrated ones.
        await store.create_space("brandnew", "", 0)
        listed, _ = await store.list_spaces(10, 0)
        assert [s.id for s in listed] == [*space_ids, "brandnew"]
        # Nothing of the old layout is left.
        client = aioredis.from_url(url, decode_responses=True)
        left = [k async for k in client.scan_iter() if not k.startswith("{")]
        await client.aclose()
        assert left == []
    finally:
        await store.close()

    again = migrate_command(url)
    assert again.returncode == 0 and "moved 0 spaces" in again.stdout


async def test_redis_migrate_refuses_while_an_old_node_heartbeats(
    private_redis: RedisServer,
) -> None:
    await write_legacy_layout(private_redis.url)
    client = aioredis.from_url(private_redis.url, decode_responses=True)
    await client.zadd("nodes", {"busy-node": int(time.time() * 1000)})
    await client.aclose()
    result = migrate_command(private_redis.url)
    assert result.returncode == 1
    assert "stop every Spaces process first" in result.stdout
    store = RedisStore(private_redis.url)
    with pytest.raises(LegacyLayoutError):
        await store.start()
    await store.close()
