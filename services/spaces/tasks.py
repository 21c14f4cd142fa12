"""Fire-and-forget tasks that are not garbage-collected mid-flight (asyncio keeps only weak
references to tasks)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

logger = logging.getLogger(__name__)
_running: set[asyncio.Future[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Future[Any]:
    task = asyncio.ensure_future(coro)
    if name and isinstance(task, asyncio.Task):
        task.set_name(name)
    _running.add(task)
    task.add_done_callback(_done)
    return task


def _done(task: asyncio.Future[Any]) -> None:
    _running.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.warning("background task failed: %r", task.exception())


async def cancel_and_wait(task: asyncio.Task[Any] | None, timeout: float = 3.0) -> None:
    """Cancel a background loop and wait for it, but never forever: a library that swallows
    one cancellation must not hang shutdown."""
    if task is None or task.done():
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        logger.warning("task %s ignored cancellation", task.get_name())


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """``event.wait()`` with a timeout; True if the event was set. Loops that are stopped by
    cancelling them use this rather than ``asyncio.wait_for``: on Python 3.11, wait_for
    swallows a cancellation that arrives just as the awaited thing completes (CPython
    gh-86296), and the loop then never stops (seen: a webhook worker's stop() hanging)."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True
