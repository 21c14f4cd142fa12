"""A cheap Redis client for load generators: raw RESP over asyncio protocols, replies parsed by
hiredis, no per-command task, future or pool lock. It sends exactly the commands the store
would (``RedisStore.space_command`` builds them), so Redis does the same work per command, while
the generator spends a few microseconds per command instead of redis-py's ~100.

Each connection has at most ``depth`` commands in flight. With ``depth=1`` (the default) Redis
sees what it sees in production: many connections, one command at a time on each, a read and a
write per command. Commands beyond what the connections take wait in one queue, in order."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

import hiredis

Reply = Any
Callback = Callable[[Reply], None]


def pack(command: tuple[Any, ...]) -> bytes:
    """One command in RESP, ready to write (or to keep and write again)."""
    return bytes(hiredis.pack_command(command))


class _Connection(asyncio.Protocol):
    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.reader = hiredis.Reader(encoding="utf-8")
        self.waiting: collections.deque[Callback] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.idle_slots = 0
        """How many times this connection is in the client's idle list."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            reply = self.reader.gets()
            if reply is False:
                break
            waiting.popleft()(reply)
        self.client._refill(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.client._lost(self, exc)

    def send(self, payload: bytes, callback: Callback) -> None:
        assert self.transport is not None
        self.waiting.append(callback)
        self.transport.write(payload)


class RawClient:
    """``connections`` sockets to one Redis; :meth:`send` writes a packed command and calls
    ``callback`` with its reply (an error reply is a ``hiredis.ReplyError`` value, not raised)."""

    def __init__(self, host: str, port: int, connections: int, depth: int = 1) -> None:
        self.host, self.port = host, port
        self.size, self.depth = connections, depth
        self._idle: list[_Connection] = []
        self._all: list[_Connection] = []
        self._queue: collections.deque[tuple[bytes, Callback]] = collections.deque()
        self.sent = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.size):
            _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
            self._all.append(conn)
            self._idle.extend([conn] * self.depth)
            conn.idle_slots = self.depth

    @property
    def queued(self) -> int:
        return len(self._queue)

    def send(self, payload: bytes, callback: Callback) -> None:
        self.sent += 1
        if self._idle:
            conn = self._idle.pop()
            conn.idle_slots -= 1
            conn.send(payload, callback)
        else:
            self._queue.append((payload, callback))

    def _refill(self, conn: _Connection) -> None:
        free = self.depth - len(conn.waiting) - conn.idle_slots
        queue = self._queue
        while free > 0 and queue:
            payload, callback = queue.popleft()
            conn.send(payload, callback)
            free -= 1
        if free > 0:
            self._idle.extend([conn] * free)
            conn.idle_slots += free

    def _lost(self, conn: _Connection, exc: Exception | None) -> None:
        error = hiredis.ReplyError(f"connection lost: {exc}")
        while conn.waiting:
            conn.waiting.popleft()(error)
        self._idle = [c for c in self._idle if c is not conn]
        conn.idle_slots = 0

    async def close(self) -> None:
        for conn in self._all:
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.gather(*(c.lost for c in self._all))
        self._all.clear()
        self._idle.clear()
