"""Every shard's event stream, read as one stream.

Each shard (and the global tag) appends its events to its own Redis Stream, in the same Lua step
as the change they report (spaces.store.keys). Readers that want every event (WatchEvents over
all spaces) merge the streams by id. Ids are unique across streams, but a merge must not run
ahead of a stream that is about to write a smaller id, or a reader that resumes after the last id
it saw would skip that event. So a read takes each primary's ``TIME`` in the same pipeline as its
``XRANGE``s and returns only events older than the earliest of those clocks (the *watermark*): any
entry written later gets an id at or above its primary's clock, so nothing can appear below the
watermark afterwards. Resuming after any returned id is then exact. The cost is that an event is
returned only once every primary's clock has passed it: at once on one server, the clock skew
between primaries on a cluster, and not while a primary is unreachable (events wait; none is
lost).

Waiting for new events uses a per-process *doorbell*: blocking ``XREAD``s (one command over every
stream on a standalone Redis; one per stream on a cluster, where a command may not span slots)
that only say "something was appended". Readers then read as above.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis

from spaces import errors
from spaces.store import keys
from spaces.store.router import Router

logger = logging.getLogger(__name__)

T = TypeVar("T")
Entry = tuple[str, dict[str, str]]
Call = Callable[..., Awaitable[Any]]

MAX_SEQ = 2**64 - 1
DOORBELL_BLOCK_MS = 1_000
UNSETTLED_RETRY_S = 0.002
"""How soon to look again for an event newer than the watermark (readable once every
primary's clock has passed it)."""
LATEST_PATIENCE_S = 0.1
SETTLE_PATIENCE_S = 0.1


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def format_id(position: tuple[int, int]) -> str:
    return f"{position[0]}-{position[1]}"


def _time_us(reply: Any) -> int:
    """A TIME reply in µs, the unit of event ids (spaces.store.keys)."""
    seconds, micros = reply
    return int(seconds) * 1_000_000 + int(micros)


class EventFeed:
    def __init__(self, router: Router, call: Call) -> None:
        self._router = router
        self._call = call
        self._doorbell = Doorbell(router, call)

    @property
    def doorbell(self) -> Doorbell:
        return self._doorbell

    async def close(self) -> None:
        await self._doorbell.close()

    async def latest_id(self) -> str:
        """A position such that every event appended from now on comes after it, and (in all
        but pathological cases) every event appended before it does not."""
        deadline = time.monotonic() + LATEST_PATIENCE_S
        while True:
            watermark, last = await self._call(self._ends)
            if last is None:
                return "0-0"
            if last[0] < watermark:
                return format_id(last)
            if time.monotonic() > deadline:
                # A primary's clock is behind another's writes (clock skew): start at the
                # watermark; the events of the last few milliseconds may be returned too.
                return format_id((watermark - 1, MAX_SEQ))
            await asyncio.sleep(UNSETTLED_RETRY_S)

    async def _ends(self) -> tuple[int, tuple[int, int] | None]:
        """(watermark µs, the largest id in any stream)."""

        async def on(client: aioredis.Redis, indexes: list[int]) -> tuple[int, list[Any]]:
            async with client.pipeline(transaction=False) as pipe:
                pipe.time()
                for index in indexes:
                    pipe.xrevrange(keys.events_key(index), count=1)
                reply = await pipe.execute()
            return _time_us(reply[0]), reply[1:]

        parts = await asyncio.gather(
            *(on(c, idx) for c, idx in self._router.by_client(range(keys.STREAMS)))
        )
        watermark = min(clock for clock, _ in parts)
        last = [parse_id(entries[0][0]) for _, tails in parts for entries in tails if entries]
        return watermark, max(last) if last else None

    async def read(self, after_id: str, count: int, block_ms: int) -> list[Entry]:
        """Up to ``count`` entries after ``after_id`` in id order, waiting up to ``block_ms`` for
        one to arrive. Everything appended before the call is included (up to ``count``), even
        with ``block_ms`` 0: the read waits until every primary's clock has passed the call
        (about a millisecond on one server; at most SETTLE_PATIENCE_S)."""
        after = parse_id(after_id)
        started = time.monotonic()
        deadline = started + block_ms / 1000
        settle_deadline = started + max(block_ms / 1000, SETTLE_PATIENCE_S)
        needed: int | None = None
        """Every entry up to this Redis time (µs) is settled once the watermark passes it."""
        while True:
            rung = self._doorbell.generation
            entries, unsettled, watermark, clock = await self._call(
                lambda: self._settled(after, count)
            )
            if needed is None:
                needed = clock
            now = time.monotonic()
            if unsettled and watermark <= needed and len(entries) < count and now < settle_deadline:
                await asyncio.sleep(UNSETTLED_RETRY_S)
            elif entries or now >= deadline:
                return entries
            elif unsettled:
                await asyncio.sleep(UNSETTLED_RETRY_S)
            else:
                await self._doorbell.wait(rung, deadline - now)

    async def _settled(
        self, after: tuple[int, int], count: int
    ) -> tuple[list[Entry], bool, int, int]:
        """The entries after ``after`` that no later write can precede; whether newer ones exist
        (readable once every primary's clock has passed them); the watermark and the latest
        primary clock (µs)."""
        start = "(" + format_id(after)

        async def on(client: aioredis.Redis, indexes: list[int]) -> tuple[int, list[Any]]:
            async with client.pipeline(transaction=False) as pipe:
                pipe.time()
                for index in indexes:
                    pipe.xrange(keys.events_key(index), min=start, count=count)
                reply = await pipe.execute()
            return _time_us(reply[0]), reply[1:]

        parts = await asyncio.gather(
            *(on(c, idx) for c, idx in self._router.by_client(range(keys.STREAMS)))
        )
        watermark = min(clock for clock, _ in parts)
        bound = (watermark, 0)
        """Entries strictly below this are final."""
        found: list[tuple[tuple[int, int], Entry]] = []
        for _, streams in parts:
            for entries in streams:
                if len(entries) >= count:
                    # This stream may hold more after its last entry returned here.
                    last = parse_id(entries[-1][0])
                    bound = min(bound, (last[0], last[1] + 1))
                found += [(parse_id(entry_id), (entry_id, fields)) for entry_id, fields in entries]
        found.sort(key=lambda item: item[0])
        ready = [entry for position, entry in found if position < bound]
        unsettled = any(position[0] >= watermark for position, _ in found)
        return ready[:count], unsettled, watermark, max(clock for clock, _ in parts)


class Doorbell:
    """Rings when any event stream grows. ``generation`` counts the rings; a reader notes it
    before reading and waits for it to change, so a ring between the two is never missed."""

    def __init__(self, router: Router, call: Call) -> None:
        self._router = router
        self._call = call
        self.generation = 0
        self._rang = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listening = asyncio.Event()
        self._waiting_for = 0
        """Listeners that have not yet read where their streams end."""

    async def wait(self, seen: int, timeout_s: float) -> None:
        if not self._tasks:
            self._start()
        if not self._listening.is_set():
            # The streams may have grown before the doorbell listened: once it does, the
            # caller reads again.
            try:
                await asyncio.wait_for(self._listening.wait(), timeout_s)
            except TimeoutError:
                pass
            return
        if self.generation == seen:
            rang = self._rang
            try:
                await asyncio.wait_for(rang.wait(), timeout_s)
            except TimeoutError:
                pass

    def _ring(self) -> None:
        self.generation += 1
        self._rang.set()
        self._rang = asyncio.Event()

    def _start(self) -> None:
        if self._router.cluster:
            # A command may not span slots on a cluster: one blocking read per stream.
            groups = [[index] for index in range(keys.STREAMS)]
        else:
            groups = [list(range(keys.STREAMS))]
        self._waiting_for = len(groups)
        self._tasks = [
            asyncio.create_task(self._listen(group), name=f"event-doorbell-{group[0]}")
            for group in groups
        ]

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _listen(self, indexes: list[int]) -> None:
        streams = [keys.events_key(i) for i in indexes]
        positions: dict[str, str] | None = None
        announced = False
        backoff = 0.1
        while True:
            try:
                if positions is None:
                    positions = await self._call(lambda: self._tails(indexes, streams))
                    if announced:
                        self._ring()  # back after an outage: readers look again
                    else:
                        announced = True
                        self._waiting_for -= 1
                        if self._waiting_for == 0:
                            self._listening.set()
                # One entry is enough to know a stream grew; then jump to where they end now,
                # so a busy stream costs one wake-up per round trip, not one per entry.
                reply = await self._call(
                    lambda current=dict(positions): self._router.client(indexes[0]).xread(
                        current, count=1, block=DOORBELL_BLOCK_MS
                    ),
                    timeout_s=DOORBELL_BLOCK_MS / 1000 + 10,
                    limited=False,
                )
                backoff = 0.1
                if any(entries for _, entries in reply or []):
                    positions = await self._call(lambda: self._tails(indexes, streams))
                    self._ring()
            except errors.StoreUnavailable:
                positions = None  # the stream may have been lost with its primary
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception:
                logger.exception("event doorbell failed")
                positions = None
                await asyncio.sleep(1.0)

    async def _tails(self, indexes: list[int], streams: list[str]) -> dict[str, str]:
        async with self._router.client(indexes[0]).pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xrevrange(stream, count=1)
            tails = await pipe.execute()
        return {
            stream: (entries[0][0] if entries else "0-0")
            for stream, entries in zip(streams, tails, strict=True)
        }
