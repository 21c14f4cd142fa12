"""Spaces on a real Redis Cluster (three primaries on loopback): contested joins through several
presence processes, WatchEvents and webhooks across every shard, cancellation of blocking reads,
and a primary killed and failed over to its replica while clients are connected.

The store contract suite runs on the same cluster (tests/test_store_contract.py, the "cluster"
store)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from spaces import errors
from spaces.auth.keys import generate_signing_key
from spaces.sdk import client as sdk
from spaces.store import keys
from spaces.store.base import Reservation, SigningKeyRecord
from spaces.store.redis import RedisStore
from spaces.store.router import ClusterRouter
from spaces.v1 import event_pb2, node_pb2, presence_pb2, presence_pb2_grpc, signing_key_pb2
from tests.support.redis_cluster import RedisClusterProcess
from tests.support.system import (
    ADMIN_KEY,
    Admin,
    Process,
    Tenant,
    eventually,
    free_port,
    make_config,
    start_server,
    wait_serving,
)
from tests.support.webhook_receiver import WebhookReceiver

SECRET = "cluster-webhook-secret"


def env_for(url: str, **extra: str) -> dict[str, str]:
    return {
        "SPACES_REDIS_URL": url,
        "SPACES_ADMIN_KEY": ADMIN_KEY,
        "SPACES_GRPC_ADDR": f"127.0.0.1:{free_port()}",
        "SPACES_METRICS_ADDR": "",
        "SPACES_ICE_BIND": "127.0.0.1",
        **extra,
    }


def spaces_on_every_primary(store: RedisStore, per_primary: int, prefix: str) -> list[str]:
    """Space ids chosen so that each primary holds ``per_primary`` of them."""
    router = store.router
    assert isinstance(router, ClusterRouter)
    wanted = {address: per_primary for address in router.primaries}
    chosen: list[str] = []
    n = 0
    while any(wanted.values()):
        space_id = f"{prefix}{n}"
        n += 1
        owner = router.owner(keys.shard_of(space_id))
        if wanted.get(owner, 0) > 0:
            wanted[owner] -= 1
            chosen.append(space_id)
    return chosen


async def tenant_for(store: RedisStore, key_id: str) -> Tenant:
    generated = generate_signing_key()
    await store.create_signing_key(key_id, generated.public_key_pem)
    return Tenant(signing_key_pb2.SigningKey(id=key_id, private_key=generated.private_key_b64))


@pytest.fixture
async def cluster_store(redis_cluster_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_cluster_url)
    await store.start()
    yield store
    await store.close()


# --- contested joins ------------------------------------------------------------------------


async def test_contested_joins_through_three_presence_processes_admit_exactly_one(
    redis_cluster_url: str, cluster_store: RedisStore, tmp_path: Path
) -> None:
    store = cluster_store
    tenant = await tenant_for(store, "contestkey")
    processes = [
        Process(
            ["serve", "--services", "presence"], env_for(redis_cluster_url), tmp_path / f"p{i}.log"
        )
        for i in range(3)
    ]
    node = Process(
        ["media-node"], env_for(redis_cluster_url, SPACES_NODE_ID="m1"), tmp_path / "node.log"
    )
    channels: list[grpc.aio.Channel] = []
    try:
        for process in [*processes, node]:
            process.start()
        addresses = [p.env["SPACES_GRPC_ADDR"] for p in processes]
        for address in [*addresses, node.env["SPACES_GRPC_ADDR"]]:
            await wait_serving(address, timeout=30)
        channels = [grpc.aio.insecure_channel(a) for a in addresses]
        stubs = [presence_pb2_grpc.PresenceServiceStub(c) for c in channels]
        # One contested space on each primary, 300 joins each, all at once.
        space_ids = spaces_on_every_primary(store, 1, "contest")
        for space_id in space_ids:
            await store.create_space(space_id, "", 1000)

        async def attempt(i: int, space_id: str) -> grpc.StatusCode:
            token = tenant.token(space_id, "the-one")
            try:
                await stubs[i % 3].Join(presence_pb2.JoinRequest(token=token), timeout=60)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                return exc.code()

        per_space = 300
        results = await asyncio.gather(
            *(attempt(i, s) for s in space_ids for i in range(per_space))
        )
        for n, space_id in enumerate(space_ids):
            mine = results[n * per_space : (n + 1) * per_space]
            counts = {code.name: mine.count(code) for code in set(mine)}
            assert counts == {"OK": 1, "ALREADY_EXISTS": per_space - 1}, (space_id, counts)
            assert [p.participant_id for p in await store.list_participants(space_id)] == [
                "the-one"
            ]
    finally:
        for channel in channels:
            await channel.close()
        for process in [*processes, node]:
            process.stop()


# --- events and webhooks over every shard -----------------------------------------------------


async def test_watch_events_and_webhooks_cover_every_shard_in_order(
    redis_cluster_url: str, cluster_store: RedisStore
) -> None:
    receiver = await WebhookReceiver().start()
    config = make_config(
        redis_url=redis_cluster_url,
        services=("control", "auth", "presence", "webhooks"),
    )

    config = replace(
        config,
        webhooks=replace(config.webhooks, url=receiver.url, secret=SECRET, poll_interval_ms=100),
    )
    server = await start_server(config)
    admin = Admin(server.address)
    try:
        watch = admin.presence.WatchEvents(presence_pb2.WatchEventsRequest(), metadata=admin.md)
        await asyncio.sleep(0.3)
        # Spaces in many shards on all three primaries, each updated twice.
        space_ids = [await admin.create_space(passthrough="0") for _ in range(40)]
        assert len({keys.shard_of(s) for s in space_ids}) >= 15
        for version in ("1", "2"):
            for space_id in space_ids:
                await cluster_store.update_space(space_id, version, None)
        expected = 3 * len(space_ids)
        seen: list[event_pb2.Event] = []
        async with asyncio.timeout(20):
            async for event in watch:
                seen.append(event)
                if len(seen) == expected:
                    break
        watch.cancel()
        ids = [e.id for e in seen]
        assert len(set(ids)) == expected
        order = [tuple(int(x) for x in i.split("-")) for i in ids]
        assert order == sorted(order), "WatchEvents merges the shards in id order"
        for space_id in space_ids:
            mine = [e for e in seen if e.space_id == space_id]
            assert [e.type for e in mine] == [
                event_pb2.EVENT_TYPE_SPACE_CREATED,
                event_pb2.EVENT_TYPE_SPACE_UPDATED,
                event_pb2.EVENT_TYPE_SPACE_UPDATED,
            ]
            assert [e.space.passthrough for e in mine] == ["0", "1", "2"]
        # Resuming after any id returns exactly what followed it, from every shard.
        cut = seen[len(seen) // 3]
        resumed = admin.presence.WatchEvents(
            presence_pb2.WatchEventsRequest(after_id=cut.id), metadata=admin.md
        )
        rest: list[str] = []
        async with asyncio.timeout(20):
            async for event in resumed:
                rest.append(event.id)
                if len(rest) == expected - len(seen) // 3 - 1:
                    break
        resumed.cancel()
        assert rest == ids[len(seen) // 3 + 1 :]
        # Webhooks: every event once, each space's in order.
        await receiver.wait_accepted(expected, within=30)
        await asyncio.sleep(0.5)
        assert len(receiver.accepted) == expected
        by_space: dict[str, list[str]] = {}
        for r in receiver.accepted:
            by_space.setdefault(r.event["object"]["id"], []).append(r.event["data"]["passthrough"])
        assert by_space == {space_id: ["0", "1", "2"] for space_id in space_ids}
    finally:
        await admin.close()
        await server.stop()
        await receiver.stop()


# --- cancellation -----------------------------------------------------------------------------


async def test_cancelled_blocking_reads_stop_at_once_on_a_cluster(
    cluster_store: RedisStore,
) -> None:
    """The per-call task wrapper is what makes cancellation immediate with redis-py below 8;
    the cluster's blocking reads (event doorbell, node command stream) go through it too."""
    store = cluster_store
    mark = await store.latest_event_id()

    async def read_forever() -> None:
        while True:
            await store.read_events(mark, 10, 5_000)

    async def commands() -> None:
        async for _ in store.node_commands("nobody"):
            pass

    async def webhook_reads() -> None:
        await store.webhook_group_ensure()
        while True:
            await store.webhook_read("c1", 10, 5_000)

    for body in (read_forever, commands, webhook_reads):
        for delay in (0.0, 0.05, 0.3):
            task = asyncio.create_task(body())
            await asyncio.sleep(delay)
            task.cancel()
            started = time.monotonic()
            done, _ = await asyncio.wait({task}, timeout=1)
            assert done, f"{body.__name__} ignored cancellation after {delay}s"
            assert time.monotonic() - started < 0.5
            with contextlib.suppress(asyncio.CancelledError):
                await task


# --- a primary down for good ------------------------------------------------------------------


async def test_shards_on_the_other_primaries_keep_working_while_one_is_down(
    tmp_path: Path,
) -> None:
    """No replica to take over: the dead primary's spaces are UNAVAILABLE, the others carry on
    (joins, reaping, webhook delivery); WatchEvents over every space waits, by design, since it
    can only hand out events in an order no shard can later undercut."""
    cluster = RedisClusterProcess(masters=3).start()
    receiver = await WebhookReceiver().start()
    store = RedisStore(cluster.url)
    config = make_config(
        redis_url=cluster.url, services=("control", "auth", "presence", "webhooks")
    )
    config = replace(
        config,
        webhooks=replace(config.webhooks, url=receiver.url, secret=SECRET, poll_interval_ms=100),
    )
    server = None
    try:
        await store.start()
        router = store.router
        assert isinstance(router, ClusterRouter)
        server = await start_server(config)
        space_ids = spaces_on_every_primary(store, 2, "down")
        for space_id in space_ids:
            await store.create_space(space_id, "0", 0)
        await receiver.wait_accepted(len(space_ids), within=20)
        victim_address = router.owner(keys.shard_of(space_ids[0]))
        if victim_address == router.owner(keys.GLOBAL):
            victim_address = next(a for a in router.primaries if a != victim_address)
        dead = [s for s in space_ids if router.owner(keys.shard_of(s)) == victim_address]
        alive = [s for s in space_ids if s not in dead]
        victim = next(
            n for n in cluster.nodes if n.address == f"{victim_address[0]}:{victim_address[1]}"
        )
        cluster.kill(victim)

        with pytest.raises(errors.StoreUnavailable):
            await store.get_space(dead[0])
        for space_id in alive:
            await store.update_space(space_id, "1", None)
            await store.join(
                Reservation(
                    space_id=space_id,
                    connection_id="c-" + space_id,
                    participant_id="p",
                    generated_participant_id=False,
                    role="publisher",
                    display_name="",
                    ticket_hash="t",
                    resume_hash="r",
                    node_id="n1",
                    expected_node_id="",
                    pending_ms=200,
                    placement_ms=1_000,
                    default_max_participants=10,
                )
            )

        # The presence reaper keeps reaping the healthy shards' lapsed reservations.
        async def reaped() -> bool:
            return all([await store.list_participants(s) == [] for s in alive])

        await eventually(reaped, timeout=10)
        assert await store.reap() == 0  # and reaping every shard does not fail

        def delivered_updates() -> set[str]:
            return {
                r.event["object"]["id"]
                for r in receiver.accepted
                if r.event["type"] == "video.space.updated"
            }

        await eventually(lambda: delivered_updates() == set(alive), timeout=20)
        with pytest.raises(errors.StoreUnavailable):
            await store.read_events("0-0", 10, 0)
    finally:
        if server is not None:
            await server.stop()
        await store.close()
        await receiver.stop()
        cluster.close()


# --- failover ---------------------------------------------------------------------------------


async def signing_key_after_failover(store: RedisStore, key_id: str) -> SigningKeyRecord | None:
    """The key's record, once this store's slot map has caught up with the failover."""
    for _ in range(100):
        with contextlib.suppress(errors.StoreUnavailable):
            return await store.get_signing_key(key_id)
        await asyncio.sleep(0.1)
    raise AssertionError("the store did not answer after the failover")


@pytest.fixture
def failover_cluster() -> Any:
    cluster = RedisClusterProcess(masters=3, replicas=1, node_timeout_ms=1_000).start()
    yield cluster
    cluster.close()


async def test_a_primary_killed_and_failed_over_loses_no_participant_and_duplicates_none(
    failover_cluster: RedisClusterProcess, tmp_path: Path
) -> None:
    cluster = failover_cluster
    url = cluster.url
    receiver = await WebhookReceiver().start()
    store = RedisStore(url)
    await store.start()
    env = {
        "SPACES_LEASE_SECONDS": "10",
        "SPACES_LEASE_RENEW_SECONDS": "1",
        "SPACES_WEBHOOK_URL": receiver.url,
        "SPACES_WEBHOOK_SECRET": SECRET,
        "SPACES_WEBHOOK_BACKOFF_SECONDS": "0.1",
        "SPACES_WEBHOOK_MAX_BACKOFF_SECONDS": "0.5",
    }
    api = Process(
        ["serve", "--services", "control,auth,presence,webhooks"],
        env_for(url, **env),
        tmp_path / "api.log",
    )
    node = Process(["media-node"], env_for(url, SPACES_NODE_ID="m1", **env), tmp_path / "node.log")
    clients: list[sdk.Space] = []
    admin: Admin | None = None
    try:
        api.start()
        node.start()
        address = api.env["SPACES_GRPC_ADDR"]
        await wait_serving(address, timeout=30)
        await wait_serving(node.env["SPACES_GRPC_ADDR"], timeout=30)
        admin = Admin(address)
        tenant = Tenant(await admin.create_key())
        router = store.router
        assert isinstance(router, ClusterRouter)
        # Two spaces on each primary, two participants in each, connected to the media node.
        space_ids = spaces_on_every_primary(store, 2, "fo")
        for space_id in space_ids:
            await store.create_space(space_id, "before", 0)
        for space_id in space_ids:
            for pid in ("alice", "bob"):
                client = sdk.Space(tenant.token(space_id, pid), address, reconnect_attempts=10)
                await client.join()
                clients.append(client)
        watch = admin.presence.WatchEvents(presence_pb2.WatchEventsRequest(), metadata=admin.md)
        watched: list[event_pb2.Event] = []

        async def follow() -> None:
            async for event in watch:
                watched.append(event)

        follower = asyncio.create_task(follow())
        # A node command stream (under the global tag, on the primary about to die) being read.
        commands: list[node_pb2.NodeCommand] = []

        async def listen() -> None:
            async for command in store.node_commands("listener"):
                commands.append(command)

        listener = asyncio.create_task(listen())
        await receiver.wait_accepted(len(space_ids) * 4, within=20)  # created, active, 2 joined

        # Kill the primary that holds the global keys (signing keys, node registry, node
        # commands) and two spaces' shards, once its replica has every write.
        victim_address = router.owner(keys.GLOBAL)
        victim = next(
            n for n in cluster.nodes if n.address == f"{victim_address[0]}:{victim_address[1]}"
        )
        await asyncio.to_thread(cluster.wait_replicated, victim)
        on_victim = [s for s in space_ids if router.owner(keys.shard_of(s)) == victim_address]
        killed_at_ms = await store.now_ms()
        cluster.kill(victim)
        killed_at = time.monotonic()

        # Joins contesting one participant_id in a space on the dead primary, all through the
        # outage: UNAVAILABLE while the shard has no primary, then exactly one admitted.
        contested = on_victim[0]
        stub = admin.presence
        codes: list[str] = []

        async def contest(stop_at: float) -> None:
            token = tenant.token(contested, "carol")
            while time.monotonic() < stop_at:
                try:
                    await stub.Join(presence_pb2.JoinRequest(token=token), timeout=10)
                    codes.append("OK")
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code().name)
                await asyncio.sleep(0.02)

        contesting = [asyncio.create_task(contest(time.monotonic() + 12)) for _ in range(4)]
        await asyncio.to_thread(cluster.wait_failover, victim, 30)
        failed_over = time.monotonic() - killed_at
        await asyncio.gather(*contesting)
        # The promoted replica has the primary's data: had it lost the signing key, every join
        # after the failover would be UNAUTHENTICATED, rightly, and the codes below would say so.
        assert await signing_key_after_failover(store, tenant.key.id) is not None, (
            "the promoted replica lost the signing key: it was killed before its copy was whole"
        )
        assert codes.count("OK") == 1, {c: codes.count(c) for c in set(codes)}
        assert set(codes) <= {"OK", "ALREADY_EXISTS", "UNAVAILABLE"}
        assert "UNAVAILABLE" in codes, "the joins did run while the shard had no primary"

        # The services recovered without a restart: the same processes serve the moved shard.
        assert api.alive() and node.alive()
        late = await admin.create_space(passthrough="after")
        for space_id in on_victim:
            await store.update_space(space_id, "after", None)
        joined = sdk.Space(tenant.token(contested, "dave"), address)
        await joined.join()
        clients.append(joined)

        # Nobody lost, nobody twice: every space has exactly its participants, once each.
        async def settled() -> bool:
            for space_id in space_ids:
                people = [p.participant_id for p in await store.list_participants(space_id)]
                want = ["alice", "bob"] + (["carol", "dave"] if space_id == contested else [])
                if sorted(people) != sorted(want):
                    return False
            return True

        await eventually(settled, timeout=15)
        for space_id in space_ids:
            people = [p.participant_id for p in await store.list_participants(space_id)]
            assert len(people) == len(set(people)), (space_id, people)

        # The media node kept every live session: its lease renewals resumed on the new primary
        # (each lease now ends more than a lease period after the kill).
        async def renewed_on_new_primary() -> bool:
            for space_id in on_victim:
                for p in await store.list_participants(space_id):
                    if p.participant_id in ("alice", "bob") and p.lease_expires_at_ms < (
                        killed_at_ms + 10_500
                    ):
                        return False
            return True

        await eventually(renewed_on_new_primary, timeout=10)
        sessions = [c for c in clients if c.state == "joined"]
        assert len(sessions) == len(clients)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Join(presence_pb2.JoinRequest(token=tenant.token(contested, "alice")))
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS

        # Node commands reach the node that was listening through the outage.
        kick = node_pb2.NodeCommand(
            kick=node_pb2.KickConnection(space_id="s", connection_id="c", reason="removed")
        )
        await store.publish_node_command("listener", kick)
        await eventually(lambda: commands == [kick], timeout=10)
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener

        # The WatchEvents stream opened before the kill carries on, and webhooks flow.
        def saw(space_id: str, kind: int, passthrough: str = "") -> bool:
            return any(
                e.space_id == space_id
                and e.type == kind
                and (not passthrough or e.space.passthrough == passthrough)
                for e in watched
            )

        await eventually(lambda: saw(late, event_pb2.EVENT_TYPE_SPACE_CREATED), timeout=15)
        for space_id in on_victim:
            await eventually(
                lambda s=space_id: saw(s, event_pb2.EVENT_TYPE_SPACE_UPDATED, "after"), timeout=15
            )
        ids = [e.id for e in watched]
        assert len(ids) == len(set(ids)), "no event twice on the stream"

        def hooked(space_id: str, kind: str, passthrough: str = "") -> bool:
            return any(
                r.event["object"]["id"] == space_id
                and r.event["type"] == kind
                and (not passthrough or r.event["data"].get("passthrough") == passthrough)
                for r in receiver.accepted
            )

        await eventually(lambda: hooked(late, "video.space.created"), timeout=20)
        for space_id in on_victim:
            await eventually(
                lambda s=space_id: hooked(s, "video.space.updated", "after"), timeout=20
            )
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await follower
        print(f"failover took {failed_over:.1f}s")
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.leave()
        if admin is not None:
            await admin.close()
        node.stop()
        api.stop()
        await store.close()
        await receiver.stop()
