"""Which Redis connection serves which key: one standalone server, or the primaries of a Redis
Cluster.

Every key Spaces writes carries one of the hash tags in ``keys.TAGS``, so the store never asks
"where does this key live" for an arbitrary key: it asks for the primary of one of 33 slots.
``StandaloneRouter`` answers with its one client. ``ClusterRouter`` keeps a map from those slots
to primaries, read with ``CLUSTER SLOTS``, and one ordinary redis-py asyncio client per primary.

Why not redis-py's ``RedisCluster``: the project pins redis-py below 8 (8.0 and 8.1 swallow
asyncio cancellation), and the 7.x asyncio cluster client has no pub/sub, does not refresh its
topology before retrying a MOVED (redis-py PR #4322) and does not reconnect after a whole-cluster
outage (PR #3111). Spaces needs none of its generality (every command here targets a known slot),
and the plain client is the one whose cancellation behaviour the store already wraps and tests.
So this module owns the small part of the cluster protocol Spaces uses: discovery, MOVED (patch
the slot, refresh, retry), CLUSTERDOWN / TRYAGAIN / ASK / READONLY (refresh, retry shortly:
the command did not run), and connection errors (refresh, but no retry, since the command may
have run; the caller gets UNAVAILABLE until a replica has been promoted).
docs/architecture.md ("Shards and Redis Cluster") states the trade.

Cluster URLs: ``redis+cluster://[user:password@]host:port[,host:port...][?query]`` (or
``rediss+cluster://`` for TLS). The hosts are seeds: any reachable one describes the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, unquote

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    ReadOnlyError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from spaces import errors
from spaces.store import keys

logger = logging.getLogger(__name__)

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
REFRESH_MIN_INTERVAL_S = 0.2
"""Refreshes caused by errors are at most this frequent (a failover makes every call fail)."""
REFRESH_INTERVAL_S = 10.0
"""A routine refresh, so a failover that no call noticed (an idle shard) is still picked up."""
REDIRECTS = (MovedError, AskError, TryAgainError, ClusterDownError, ReadOnlyError, MasterDownError)
"""Replies that mean "the map is stale or the cluster is mid-change": refresh and retry."""


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


@dataclass(frozen=True)
class ClusterUrl:
    """A parsed ``redis+cluster://`` URL."""

    tls: bool
    userinfo: str
    """"user:password" or ":password" as written (percent-encoded), or ""."""
    seeds: tuple[tuple[str, int], ...]
    query: str

    @classmethod
    def parse(cls, url: str) -> ClusterUrl:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() not in CLUSTER_SCHEMES:
            raise ValueError(
                "a Redis Cluster URL starts with redis+cluster:// or rediss+cluster://"
            )
        rest, _, query = rest.partition("?")
        rest = rest.split("/", 1)[0]
        userinfo, at, hosts = rest.rpartition("@")
        if not at:
            userinfo, hosts = "", rest
        seeds = []
        for item in hosts.split(","):
            host, colon, port = item.strip().rpartition(":")
            if not colon or not host or not port.isdigit():
                raise ValueError(f"Redis Cluster seed {item!r} is not host:port")
            seeds.append((host.strip("[]"), int(port)))
        if not seeds:
            raise ValueError("a Redis Cluster URL needs at least one host:port")
        return cls(scheme.lower() == "rediss+cluster", userinfo, tuple(seeds), query)

    def node_url(self, host: str, port: int) -> str:
        """A plain redis:// (or rediss://) URL for one node, with the same credentials and
        options."""
        scheme = "rediss" if self.tls else "redis"
        auth = f"{self.userinfo}@" if self.userinfo else ""
        shown = f"[{host}]" if ":" in host else host
        return f"{scheme}://{auth}{shown}:{port}/0" + (f"?{self.query}" if self.query else "")

    @property
    def redacted(self) -> str:
        user = unquote(self.userinfo.partition(":")[0]) if self.userinfo else ""
        auth = f"{quote(user)}:***@" if self.userinfo else ""
        hosts = ",".join(f"{h}:{p}" for h, p in self.seeds)
        return f"{'rediss' if self.tls else 'redis'}+cluster://{auth}{hosts}"


def make_client(url: str, *, max_connections: int, retries: int) -> aioredis.Redis:
    """One redis-py client with the store's pool settings. No socket_timeout: redis-py's read
    timeout swallows task cancellation (the shutdown and disconnect path); the store enforces
    deadlines itself, and keepalive finds dead peers."""
    backoff = ExponentialBackoff(cap=1.0, base=0.05) if retries else NoBackoff()
    pool = aioredis.ConnectionPool.from_url(
        url,
        max_connections=max_connections,
        decode_responses=True,
        socket_connect_timeout=3.0,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(backoff, retries=retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return aioredis.Redis(connection_pool=pool)


class Router(Protocol):
    cluster: bool
    generation: int
    """Changes whenever the slot map changes: a call that failed may succeed when retried."""

    def client(self, index: int) -> aioredis.Redis:
        """The client of the primary that owns keys.TAGS[index]."""
        ...

    def by_client(self, indexes: Iterable[int]) -> list[tuple[aioredis.Redis, list[int]]]:
        """The given tag indexes grouped by the primary that owns them."""
        ...

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    async def recover(self, exc: BaseException) -> bool:
        """After a failed call: update the map if the error says it is stale. True when the
        reply says the command did not run and retrying it now may succeed."""
        ...


class StandaloneRouter:
    """A standalone Redis (or one address that always reaches the current primary)."""

    cluster = False
    generation = 0

    def __init__(self, url: str, *, max_connections: int) -> None:
        self.url = url
        self._client = make_client(url, max_connections=max_connections, retries=2)

    def client(self, index: int) -> aioredis.Redis:
        return self._client

    def by_client(self, indexes: Iterable[int]) -> list[tuple[aioredis.Redis, list[int]]]:
        return [(self._client, list(indexes))]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await self._client.aclose(close_connection_pool=True)

    async def recover(self, exc: BaseException) -> bool:
        return False


class ClusterRouter:
    """The primaries of a Redis Cluster, for the slots of keys.TAGS."""

    cluster = True

    def __init__(self, url: str, *, max_connections: int) -> None:
        self.url = ClusterUrl.parse(url)
        self._max_connections = max_connections
        self._clients: dict[tuple[str, int], aioredis.Redis] = {}
        self._owners: list[tuple[str, int]] = []
        """keys.TAGS index -> (host, port) of its primary."""
        self._slots = [keys.key_slot(keys.tag_prefix(i)) for i in range(keys.STREAMS)]
        self._lock = asyncio.Lock()
        self._refreshed_at = 0.0
        self._routine: asyncio.Task[None] | None = None
        self.generation = 0

    # --- routing ---------------------------------------------------------------------------

    def _node(self, address: tuple[str, int]) -> aioredis.Redis:
        client = self._clients.get(address)
        if client is None:
            # No client-level retries: a refused connection goes to recover() at once, which
            # may route the retry elsewhere.
            client = make_client(
                self.url.node_url(*address), max_connections=self._max_connections, retries=0
            )
            self._clients[address] = client
        return client

    def client(self, index: int) -> aioredis.Redis:
        if not self._owners:
            raise errors.StoreUnavailable()
        return self._node(self._owners[index])

    def by_client(self, indexes: Iterable[int]) -> list[tuple[aioredis.Redis, list[int]]]:
        if not self._owners:
            raise errors.StoreUnavailable()
        groups: dict[tuple[str, int], list[int]] = {}
        for index in indexes:
            groups.setdefault(self._owners[index], []).append(index)
        return [(self._node(address), group) for address, group in groups.items()]

    def owner(self, index: int) -> tuple[str, int]:
        """(host, port) of the primary that owns keys.TAGS[index]."""
        if not self._owners:
            raise errors.StoreUnavailable()
        return self._owners[index]

    @property
    def primaries(self) -> list[tuple[str, int]]:
        """The primaries currently serving Spaces' slots."""
        return sorted(set(self._owners))

    # --- the map ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.refresh(force=True)
        if not self._owners:
            raise errors.StoreUnavailable("no Redis Cluster node answered: check the seeds")
        self._routine = asyncio.create_task(self._refresh_forever(), name="redis-cluster-map")

    async def close(self) -> None:
        if self._routine is not None:
            self._routine.cancel()
            await asyncio.gather(self._routine, return_exceptions=True)
            self._routine = None
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            try:
                await client.aclose(close_connection_pool=True)
            except Exception:
                pass

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_INTERVAL_S)
            try:
                await self.refresh()
            except Exception:
                logger.exception("redis cluster: refreshing the slot map failed")

    async def refresh(self, *, force: bool = False) -> bool:
        """Read the slot map from the first node that answers (known primaries, then the
        seeds). Returns True when it changed."""
        async with self._lock:
            if not force and time.monotonic() - self._refreshed_at < REFRESH_MIN_INTERVAL_S:
                return False
            self._refreshed_at = time.monotonic()
            candidates = list(dict.fromkeys([*self.primaries, *self.url.seeds]))
            candidates += [a for a in self._clients if a not in candidates]
            for address in candidates:
                try:
                    reply = await asyncio.wait_for(
                        self._node(address).execute_command("CLUSTER SLOTS"), timeout=2.0
                    )
                except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
                    logger.debug("redis cluster: %s:%d did not answer (%s)", *address, exc)
                    continue
                except Exception as exc:
                    logger.warning(
                        "redis cluster: CLUSTER SLOTS on %s:%d failed: %s", *address, exc
                    )
                    continue
                owners = self._owners_from(reply, address)
                if owners is None:
                    continue
                changed = owners != self._owners
                if changed:
                    if self._owners:
                        logger.warning(
                            "redis cluster: slot map changed; primaries now %s",
                            ", ".join(f"{h}:{p}" for h, p in sorted(set(owners))),
                        )
                    self._owners = owners
                    self.generation += 1
                return changed
            logger.warning("redis cluster: no node answered CLUSTER SLOTS")
            return False

    def _owners_from(self, reply: Any, asked: tuple[str, int]) -> list[tuple[str, int]] | None:
        ranges = []
        for entry in reply or []:
            low, high, primary = int(entry[0]), int(entry[1]), entry[2]
            host = str(primary[0]) if primary and primary[0] not in ("", "?", None) else asked[0]
            ranges.append((low, high, (host, int(primary[1]))))
        owners = []
        for slot in self._slots:
            owner = next((a for low, high, a in ranges if low <= slot <= high), None)
            if owner is None:
                logger.warning("redis cluster: slot %d is not served by any node", slot)
                return None
            owners.append(owner)
        return owners

    async def recover(self, exc: BaseException) -> bool:
        if isinstance(exc, MovedError) and self._owners:
            # The reply names the new owner: use it at once, and refresh the rest.
            moved = (exc.host, int(exc.port))
            patched = [
                moved if s == exc.slot_id else o
                for s, o in zip(self._slots, self._owners, strict=True)
            ]
            if patched != self._owners:
                self._owners = patched
                self.generation += 1
            await self.refresh()
            return True
        if isinstance(exc, REDIRECTS):
            await self.refresh()
            await asyncio.sleep(0.05)
            return True
        if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
            # The map may be stale (a failover): refresh it for the calls that follow. This one
            # is not retried: it may have run before the connection failed, and a script such
            # as a join must not run twice.
            await self.refresh()
        return False
