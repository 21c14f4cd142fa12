"""The media node registry: nodes heartbeat their record; presence reads a cached view.

A node is *available* when its last heartbeat (Redis time) is younger than ``stale_ms`` and its
state is SERVING. LiveKit's numbers: a report every 2 s, stale after 5 s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from spaces import errors
from spaces.config import RegistryConfig
from spaces.store.base import NodeView, Store
from spaces.tasks import cancel_and_wait, wait_event
from spaces.v1 import node_pb2

logger = logging.getLogger(__name__)


def is_fresh(node: node_pb2.Node, now_ms: int, stale_ms: int) -> bool:
    return now_ms - node.updated_at_ms < stale_ms


def is_available(node: node_pb2.Node, now_ms: int, stale_ms: int) -> bool:
    return node.state == node_pb2.NODE_STATE_SERVING and is_fresh(node, now_ms, stale_ms)


class NodeDirectory:
    """Presence's view of the registry, re-read at most every ``cache_ms``. Freshness is judged
    against the store's clock as of the read, advanced by local elapsed time."""

    def __init__(self, store: Store, config: RegistryConfig) -> None:
        self._store = store
        self._config = config
        self._view: NodeView | None = None
        self._read_at = 0.0
        self._lock = asyncio.Lock()
        self._excluded: dict[str, float] = {}
        """node_id -> monotonic time until which placement skips it (found dead here)."""

    def exclude(self, node_id: str, for_ms: int) -> None:
        """Skip this node in placement for a while: a liveness check found it dead before its
        heartbeat went stale."""
        self._excluded[node_id] = time.monotonic() + for_ms / 1000

    def _is_excluded(self, node_id: str) -> bool:
        until = self._excluded.get(node_id)
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._excluded[node_id]
            return False
        return True

    async def fresh(self, node_id: str) -> tuple[node_pb2.Node | None, int]:
        """The node's record read from the store now (not the cache), and the store time."""
        view = await self._store.list_nodes(self._config.record_ttl_ms)
        async with self._lock:
            self._view, self._read_at = view, time.monotonic()
        return next((n for n in view.nodes if n.id == node_id), None), view.now_ms

    async def _current(self) -> tuple[NodeView, int]:
        async with self._lock:
            age_ms = (time.monotonic() - self._read_at) * 1000
            if self._view is None or age_ms >= self._config.cache_ms:
                self._view = await self._store.list_nodes(self._config.record_ttl_ms)
                self._read_at = time.monotonic()
                age_ms = 0
            return self._view, self._view.now_ms + int(age_ms)

    async def available(self) -> tuple[list[node_pb2.Node], int]:
        """SERVING nodes with a fresh heartbeat, and the store time they were judged at."""
        view, now = await self._current()
        return [
            n
            for n in view.nodes
            if is_available(n, now, self._config.stale_ms) and not self._is_excluded(n.id)
        ], now

    async def counts(self) -> dict[str, int]:
        """Nodes by state as placement would see them now: serving, draining, starting, stale.
        Read from the store, not the cache (and not into it: a read made for the metrics must
        not hold an older view for placement)."""
        view = await self._store.list_nodes(self._config.record_ttl_ms)
        now = view.now_ms
        counts = dict.fromkeys(("serving", "draining", "starting", "stale"), 0)
        for node in view.nodes:
            if not is_fresh(node, now, self._config.stale_ms):
                counts["stale"] += 1
            elif node.state == node_pb2.NODE_STATE_SERVING:
                counts["serving"] += 1
            elif node.state == node_pb2.NODE_STATE_DRAINING:
                counts["draining"] += 1
            else:
                counts["starting"] += 1
        return counts

    async def get(self, node_id: str) -> node_pb2.Node | None:
        view, _ = await self._current()
        return next((n for n in view.nodes if n.id == node_id), None)


class NodeHeartbeat:
    """The node side: writes this node's record every ``heartbeat_ms`` (and at once on a state
    change). Survives store outages: it keeps trying, so a restarted Redis sees the node again
    within one heartbeat."""

    def __init__(
        self,
        store: Store,
        config: RegistryConfig,
        record: Callable[[], node_pb2.Node],
    ) -> None:
        self._store = store
        self._config = config
        self._record = record
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.beats = 0
        self.last_ok_ms = 0
        self._stopped = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="node-heartbeat")

    def beat_now(self) -> None:
        self._wake.set()

    async def beat_once(self) -> None:
        record = self._record()
        self.last_ok_ms = await self._store.heartbeat(record, self._config.record_ttl_ms)
        self.beats += 1

    async def _run(self) -> None:
        while not self._stopped:
            try:
                await self.beat_once()
            except errors.StoreUnavailable:
                logger.warning("heartbeat failed: store unavailable; retrying")
            except Exception:
                logger.exception("heartbeat failed")
            self._wake.clear()
            await wait_event(self._wake, self._config.heartbeat_ms / 1000)

    async def stop(self) -> None:
        self._stopped = True
        await cancel_and_wait(self._task)
        self._task = None
