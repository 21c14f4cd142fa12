"""Stage one of delivery: read the event stream through the consumer group and enqueue each
event for every endpoint that wants it.

Any replica may read any batch. The store acknowledges a batch and enqueues it in one atomic
step, so an event is fanned out exactly once even when a replica that seemed dead (and whose
events another replica reclaimed) wakes up and tries again. Events a replica read but never
fanned out (it crashed) are reclaimed after ``claim_idle_ms``; until then deliveries of newer
events wait for them, which is what keeps every space's events in order (keys.py, "webhooks").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from spaces import errors
from spaces.config import WebhookConfig
from spaces.store.base import Store
from spaces.tasks import cancel_and_wait
from spaces.webhooks.envelope import job_for

logger = logging.getLogger(__name__)

BATCH = 100
READ_BLOCK_MS = 1_000
"""Short enough that a stopping replica is not held in XREADGROUP for long."""
PRUNE_INTERVAL_S = 600.0
PRUNE_IDLE_MS = 3_600_000
"""Group consumers silent this long with nothing pending are replicas that went away."""
SYNC_INTERVAL_S = 30.0
"""How soon an endpoint change that was interrupted half-way reaches every shard."""


class FanOut:
    def __init__(
        self,
        store: Store,
        config: WebhookConfig,
        consumer: str,
        on_enqueued: Callable[[], None],
    ) -> None:
        self._store = store
        self._config = config
        self.consumer = consumer
        self._on_enqueued = on_enqueued
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._store.webhook_group_ensure()
        await self._store.webhook_sync_endpoints()
        self._task = asyncio.create_task(self._run(), name=f"webhook-fan-out-{self.consumer}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        claim_every = self._config.claim_idle_ms / 2000
        next_claim = 0.0
        next_prune = time.monotonic() + PRUNE_INTERVAL_S
        next_sync = time.monotonic() + SYNC_INTERVAL_S
        backoff = 0.1
        while True:
            try:
                now = time.monotonic()
                events = []
                if now >= next_claim:
                    next_claim = now + claim_every
                    events = await self._store.webhook_claim_stale(
                        self.consumer, self._config.claim_idle_ms, BATCH
                    )
                    if events:
                        logger.warning(
                            "consumer %s: took over %d events another replica read but did "
                            "not fan out",
                            self.consumer,
                            len(events),
                        )
                if not events:
                    events = await self._store.webhook_read(self.consumer, BATCH, READ_BLOCK_MS)
                if events:
                    enqueued = await self._store.webhook_fan_out([job_for(e) for e in events])
                    if enqueued:
                        self._on_enqueued()
                if now >= next_prune:
                    next_prune = now + PRUNE_INTERVAL_S
                    await self._store.webhook_prune_consumers(PRUNE_IDLE_MS, self.consumer)
                if now >= next_sync:
                    next_sync = now + SYNC_INTERVAL_S
                    await self._store.webhook_sync_endpoints()
                backoff = 0.1
            except errors.StoreUnavailable:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception:
                logger.exception("consumer %s: webhook fan-out failed", self.consumer)
                await asyncio.sleep(1.0)
