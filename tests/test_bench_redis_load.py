"""bench.redis_load: the raw client the Redis ceiling's generators use sends the store's own
commands (``RedisStore.space_command``), with the store's effect, against a real Redis."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import hiredis
import pytest

from bench.redis_load import RawClient, pack
from spaces.store.base import Reservation
from spaces.store.redis import (
    RedisStore,
    claim_args,
    claim_from_reply,
    join_args,
    leave_args,
    renew_args,
)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_url)
    await store.start()
    yield store
    await store.close()


async def raw_client(url: str, connections: int, depth: int) -> RawClient:
    parts = urllib.parse.urlsplit(url)
    client = RawClient(parts.hostname or "", parts.port or 0, connections, depth)
    await client.start()
    return client


def call(client: RawClient, payload: bytes) -> asyncio.Future[Any]:
    future = asyncio.get_running_loop().create_future()
    client.send(payload, future.set_result)
    return future


def reservation(space_id: str, n: int, placed: bool) -> Reservation:
    return Reservation(
        space_id=space_id,
        connection_id=f"conn-{n}",
        participant_id=f"p{n}",
        generated_participant_id=False,
        role="publisher",
        display_name=f"P {n}",
        ticket_hash=f"ticket-{n}",
        resume_hash=f"resume-{n}",
        node_id="node-a",
        expected_node_id="node-a" if placed else "",
        pending_ms=20_000,
        placement_ms=15_000,
        default_max_participants=100,
    )


async def test_raw_commands_do_what_the_store_does(store: RedisStore, redis_url: str) -> None:
    await store.create_space("sp1", "", 0)
    # Load the scripts the way the generators do: one call of each through the store (a
    # participant who stays, and one who leaves).
    first = reservation("sp1", 0, placed=False)
    await store.join(first)
    anchor = await store.claim(
        "sp1", first.connection_id, first.ticket_hash, "node-a", 10_000, 15_000, "s"
    )
    other = reservation("sp1", 9, placed=True)
    await store.join(other)
    await store.claim("sp1", other.connection_id, other.ticket_hash, "node-a", 10_000, 15_000, "s")
    await store.renew(
        "sp1",
        "node-a",
        10_000,
        15_000,
        anchor.epoch,
        anchor.space_record,
        [anchor.connection_record],
    )
    await store.leave("sp1", other.connection_id, "left", node_id="node-a")
    client = await raw_client(redis_url, connections=2, depth=1)
    try:
        r = reservation("sp1", 1, placed=True)
        reply = await call(client, pack(store.space_command("join", "sp1", join_args(r))))
        assert reply[0] == "ok" and reply[1] == "p1", reply
        claimed = claim_from_reply(
            "sp1",
            await call(
                client,
                pack(
                    store.space_command(
                        "claim",
                        "sp1",
                        claim_args(
                            "sp1", r.connection_id, r.ticket_hash, "node-a", 10_000, 15_000, "s"
                        ),
                    )
                ),
            ),
        )
        assert claimed.participant.participant_id == "p1"
        assert {p.participant_id for p in await store.list_participants("sp1")} == {"p0", "p1"}
        # A renewal as media nodes send it: the space's epoch kept, nothing lost.
        renewal = await call(
            client,
            pack(
                store.space_command(
                    "renew",
                    "sp1",
                    renew_args(
                        "sp1",
                        "node-a",
                        10_000,
                        15_000,
                        claimed.epoch,
                        claimed.space_record,
                        [anchor.connection_record, claimed.connection_record],
                    ),
                )
            ),
        )
        assert renewal[0] == claimed.epoch and renewal[1] == "0" and len(renewal) == 2, renewal
        left = await call(
            client,
            pack(store.space_command("leave", "sp1", leave_args("sp1", r.connection_id, "left"))),
        )
        assert left[0] == "ok", left
        assert [p.participant_id for p in await store.list_participants("sp1")] == ["p0"]
        # An error reply is handed over as a value, and the connection keeps serving.
        error = await call(client, pack(("EVALSHA", "0" * 40, 0)))
        assert isinstance(error, hiredis.ReplyError) and "NOSCRIPT" in str(error)
        assert await call(client, pack(("PING",))) == "PONG"
    finally:
        await client.close()


@pytest.mark.parametrize("depth", [1, 4])
async def test_replies_reach_their_commands_in_order(redis_url: str, depth: int) -> None:
    client = await raw_client(redis_url, connections=3, depth=depth)
    try:
        # More commands than the connections take at once: the rest wait in the queue.
        replies = await asyncio.gather(*(call(client, pack(("ECHO", f"m{i}"))) for i in range(500)))
        assert replies == [f"m{i}" for i in range(500)]
        assert client.queued == 0 and client.sent == 500
        # At most depth in flight per connection: all connections are idle again.
        assert sorted(c.idle_slots for c in client._all) == [depth] * 3
    finally:
        await client.close()
