"""The presence component: the servicer plus the lease reaper that keeps ghosts out."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from spaces import errors, metrics
from spaces.config import ServerConfig
from spaces.presence.servicer import PresenceServicer
from spaces.routing.liveness import LivenessChecker
from spaces.routing.placement import Placer
from spaces.routing.registry import NodeDirectory
from spaces.store.base import Store
from spaces.tasks import cancel_and_wait
from spaces.v1 import presence_pb2_grpc

logger = logging.getLogger(__name__)

REGISTRY_METRICS_S = 5.0
"""How often presence publishes the registry's node counts (spaces_media_nodes)."""


class PresenceComponent:
    def __init__(self, config: ServerConfig, store: Store) -> None:
        self._config = config
        self._store = store
        self.directory = NodeDirectory(store, config.registry)
        self._closing = asyncio.Event()
        self.liveness = LivenessChecker(
            self.directory,
            config.registry,
            grpc.ssl_channel_credentials() if config.tls.enabled else None,
        )
        self.servicer = PresenceServicer(
            config, store, Placer(self.directory), self._closing, self.liveness
        )
        self._reaper: asyncio.Task[None] | None = None

    def register(self, server: grpc.aio.Server) -> None:
        presence_pb2_grpc.add_PresenceServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_forever(), name="lease-reaper")

    async def _reap_forever(self) -> None:
        interval = self._config.leases.reap_interval_ms / 1000
        last_count = 0.0
        while not self._closing.is_set():
            if time.monotonic() - last_count >= REGISTRY_METRICS_S:
                last_count = time.monotonic()
                await self._count_nodes()
            try:
                removed = await self._store.reap()
                if removed:
                    metrics.LEASE_EXPIRIES.inc(removed)
                    logger.info("reaped %d lapsed connections", removed)
            except errors.StoreUnavailable:
                pass
            except Exception:
                logger.exception("lease reaper failed")
            await asyncio.sleep(interval)

    async def _count_nodes(self) -> None:
        try:
            counts = await self.directory.counts()
        except errors.StoreUnavailable:
            return
        for state, count in counts.items():
            metrics.MEDIA_NODES.labels(state=state).set(count)

    async def stop(self) -> None:
        self._closing.set()
        await cancel_and_wait(self._reaper)
