"""Loops stopped by cancellation must stop, even when woken at that very moment."""

from __future__ import annotations

import asyncio

import pytest

from spaces.config import WebhookConfig
from spaces.store.memory import MemoryStore
from spaces.tasks import wait_event
from spaces.webhooks.delivery import Deliverer


async def test_wait_event_never_swallows_a_cancellation_that_comes_with_the_event() -> None:
    event = asyncio.Event()
    waiter = asyncio.ensure_future(wait_event(event, 10))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    event.set()
    waiter.cancel()  # asyncio.wait_for on Python 3.11 would return True here (gh-86296)
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert await wait_event(event, 10) is True
    assert await wait_event(asyncio.Event(), 0.01) is False


async def test_a_webhook_worker_woken_as_it_stops_still_stops() -> None:
    store = MemoryStore()
    for _ in range(20):
        deliverer = Deliverer(store, WebhookConfig(poll_interval_ms=60_000), "worker")
        await deliverer.start()
        await asyncio.sleep(0.01)  # its take loop is waiting for work
        deliverer.wake()
        await asyncio.wait_for(deliverer.stop(), 5)
    await store.close()
