"""Stage two of delivery: lease due (endpoint, space) queues, post their heads, record results.

A replica holds a queue's lease while it posts that queue's head, so one space's events reach
one endpoint one at a time and in order, while other queues go in parallel. A failure puts the
queue back with an exponential, jittered backoff (later events of that space wait behind it);
the last allowed failure turns the event into a dead letter and the queue moves on. Leases are
renewed while a post is in flight; a replica that dies stops renewing, and another one takes
the queue over when the lease lapses and posts the same event again (at least once).

Each replica limits its posts in flight overall and per endpoint, so a slow or hanging endpoint
holds at most ``endpoint_concurrency`` slots and never delays the others.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp

from spaces import errors, metrics
from spaces.config import WebhookConfig
from spaces.store.base import Store, WebhookDelivery
from spaces.tasks import cancel_and_wait, wait_event
from spaces.webhooks.envelope import MAX_RESPONSE_BODY, attempt_record, with_attempts
from spaces.webhooks.signing import HEADER, sign

logger = logging.getLogger(__name__)

T = TypeVar("T")

USER_AGENT = "Spaces-Webhooks/1"
STOP_GRACE_S = 1.0
"""On shutdown, posts in flight may finish this long; the rest are handed back undelivered."""
STORE_RETRIES = 3
"""Tries to record an outcome before giving up and letting the lease lapse (a redelivery)."""


def backoff_ms(
    failed_attempts: int, config: WebhookConfig, rng: random.Random | None = None
) -> int:
    """Delay after the n-th failure: doubling from the initial backoff up to the maximum, half
    of it random ("equal jitter"), so retries to a recovering endpoint spread out but still
    grow."""
    exponent = min(max(failed_attempts - 1, 0), 40)
    base = min(config.max_backoff_ms, config.initial_backoff_ms * 2**exponent)
    half = base // 2
    return half + int((rng or random).random() * (base - half))


class Deliverer:
    def __init__(self, store: Store, config: WebhookConfig, worker_id: str) -> None:
        self._store = store
        self._config = config
        self.worker_id = worker_id
        self._wakeup = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight: dict[str, tuple[WebhookDelivery, asyncio.Task[None]]] = {}
        """lease token -> the delivery and the task posting it."""
        self._per_endpoint: dict[str, int] = {}
        self._lost: set[str] = set()
        self._takes = 0

    def wake(self) -> None:
        """Look for due queues now rather than at the next poll."""
        self._wakeup.set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._config.timeout_ms / 1000),
            connector=aiohttp.TCPConnector(limit=self._config.concurrency),
        )
        self._tasks = [
            asyncio.create_task(self._take_forever(), name=f"webhook-take-{self.worker_id}"),
            asyncio.create_task(self._renew_forever(), name=f"webhook-renew-{self.worker_id}"),
        ]

    async def stop(self) -> None:
        await asyncio.gather(*(cancel_and_wait(task) for task in self._tasks))
        self._tasks = []
        if self._in_flight:
            await asyncio.wait([t for _, t in self._in_flight.values()], timeout=STOP_GRACE_S)
        unfinished = [d for d, _ in self._in_flight.values()]
        for _, task in list(self._in_flight.values()):
            task.cancel()
        await asyncio.gather(*(t for _, t in self._in_flight.values()), return_exceptions=True)
        if unfinished:
            # Hand the queues back at once instead of making another replica wait out the lease.
            try:
                await self._store.webhook_release(unfinished)
            except errors.StoreUnavailable:
                pass
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- taking work ---------------------------------------------------------------------------

    async def _take_forever(self) -> None:
        config = self._config
        backoff = 0.1
        while True:
            self._wakeup.clear()
            free = config.concurrency - len(self._in_flight)
            if free > 0:
                self._takes += 1
                slots = {
                    ep: max(0, config.endpoint_concurrency - n)
                    for ep, n in self._per_endpoint.items()
                }
                try:
                    deliveries, reclaimed = await self._store.webhook_take(
                        f"{self.worker_id}:{self._takes}",
                        config.lease_ms,
                        free,
                        config.endpoint_concurrency,
                        slots,
                        self._takes,
                    )
                    backoff = 0.1
                except errors.StoreUnavailable:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                except Exception:
                    logger.exception("webhook worker %s: taking work failed", self.worker_id)
                    await asyncio.sleep(1.0)
                    continue
                if reclaimed:
                    logger.warning(
                        "webhook worker %s: %d queues came back from a replica that stopped "
                        "renewing its leases; redelivering",
                        self.worker_id,
                        reclaimed,
                    )
                for delivery in deliveries:
                    self._launch(delivery)
            # Fewer taken than free means nothing else is due yet; a full take means no slot
            # is left. Either way the next chance is a finished delivery, a fan-out or a poll.
            await wait_event(self._wakeup, config.poll_interval_ms / 1000)

    def _launch(self, delivery: WebhookDelivery) -> None:
        task = asyncio.create_task(
            self._deliver(delivery), name=f"webhook-{delivery.endpoint_id}-{delivery.space_id}"
        )
        self._in_flight[delivery.token] = (delivery, task)
        ep = delivery.endpoint_id
        self._per_endpoint[ep] = self._per_endpoint.get(ep, 0) + 1

    def _finished(self, delivery: WebhookDelivery) -> None:
        self._in_flight.pop(delivery.token, None)
        self._lost.discard(delivery.token)
        ep = delivery.endpoint_id
        left = self._per_endpoint.get(ep, 1) - 1
        if left > 0:
            self._per_endpoint[ep] = left
        else:
            self._per_endpoint.pop(ep, None)
        # The queue may have its next event due now, and a slot is free.
        self._wakeup.set()

    async def _renew_forever(self) -> None:
        interval = self._config.lease_ms / 3000
        while True:
            await asyncio.sleep(interval)
            held = [d for d, _ in self._in_flight.values() if d.token not in self._lost]
            if not held:
                continue
            try:
                lost = await self._store.webhook_renew(held, self._config.lease_ms)
            except errors.StoreUnavailable:
                continue
            except Exception:
                logger.exception("webhook worker %s: renewing leases failed", self.worker_id)
                continue
            for d in held:
                if d.token in lost:
                    self._lost.add(d.token)
                    logger.warning(
                        "webhook %s to endpoint %s (space %s): lease lapsed while posting; "
                        "another replica may deliver it too",
                        d.envelope_id,
                        d.endpoint_id,
                        d.space_id,
                    )

    # --- posting -------------------------------------------------------------------------------

    async def _deliver(self, d: WebhookDelivery) -> None:
        try:
            started = time.time()
            status, reply, error = await self._post(d, started)
            if status is not None and 200 <= status < 300:
                await self._record_success(d)
            else:
                await self._record_failure(d, started, status, reply, error or f"http {status}")
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("webhook %s to endpoint %s failed", d.envelope_id, d.endpoint_id)
        finally:
            self._finished(d)

    async def _post(self, d: WebhookDelivery, started: float) -> tuple[int | None, str, str]:
        """(HTTP status or None, start of the reply, error text)."""
        assert self._session is not None
        body = with_attempts(d.body, d.history)
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            HEADER: sign(d.secret, int(started), body),
        }
        try:
            async with self._session.post(
                d.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                reply = await response.content.read(MAX_RESPONSE_BODY)
                return response.status, reply.decode(errors="replace"), ""
        except TimeoutError:
            return None, "", f"no response within {self._config.timeout_ms / 1000:g}s"
        except aiohttp.ClientError as exc:
            return None, "", f"{type(exc).__name__}: {exc}"[:300]

    async def _record_success(self, d: WebhookDelivery) -> None:
        metrics.WEBHOOK_DELIVERIES.labels(result="delivered").inc()
        await self._with_store_retries(lambda: self._store.webhook_delivered(d))
        logger.log(
            logging.INFO if d.attempts else logging.DEBUG,
            "webhook %s %s to endpoint %s (space %s) delivered after %d failed attempts",
            d.event_type,
            d.envelope_id,
            d.endpoint_id,
            d.space_id,
            d.attempts,
        )

    async def _record_failure(
        self, d: WebhookDelivery, started: float, status: int | None, reply: str, error: str
    ) -> None:
        config = self._config
        failed = d.attempts + 1
        retry_in = None if failed >= config.max_attempts else backoff_ms(failed, config)
        record = attempt_record(
            endpoint_id=d.endpoint_id,
            url=d.url,
            at_ms=int(started * 1000),
            status=status,
            response_body=reply,
            error=error,
            max_attempts=config.max_attempts,
        )
        outcome = await self._with_store_retries(
            lambda: self._store.webhook_failed(d, record, error, retry_in, config.dead_letter_limit)
        )
        if outcome == "dead":
            metrics.WEBHOOK_DELIVERIES.labels(result="dead_letter").inc()
            logger.warning(
                "webhook %s %s to endpoint %s (space %s): dead letter after %d attempts: %s",
                d.event_type,
                d.envelope_id,
                d.endpoint_id,
                d.space_id,
                failed,
                error,
            )
        else:
            metrics.WEBHOOK_DELIVERIES.labels(result="failed").inc()
            logger.info(
                "webhook %s %s to endpoint %s (space %s): attempt %d failed (%s); %s",
                d.event_type,
                d.envelope_id,
                d.endpoint_id,
                d.space_id,
                failed,
                error,
                {"retry": f"retry in {retry_in} ms", "lost": "lease lost"}.get(
                    str(outcome), "outcome not recorded"
                ),
            )

    async def _with_store_retries(self, call: Callable[[], Awaitable[T]]) -> T | None:
        for attempt in range(STORE_RETRIES):
            try:
                return await call()
            except errors.StoreUnavailable:
                await asyncio.sleep(0.2 * 2**attempt)
        logger.warning(
            "webhook worker %s: could not record an outcome; the lease will lapse and the "
            "event be delivered again",
            self.worker_id,
        )
        return None
