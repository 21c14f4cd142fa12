"""A raw WebSocket client of the signaling service (Mux's web protocol), for tests that need
the protocol itself rather than a browser."""

from __future__ import annotations

import json
from typing import Any, Protocol

import aiohttp


class HasSignal(Protocol):
    """Anything with ``.signal.port``: an in-process SpacesServer, or a ``Replica``."""

    @property
    def signal(self) -> Any: ...


class Replica:
    """A signaling service in another process, known by its HTTP port."""

    class _Signal:
        def __init__(self, port: int) -> None:
            self.port = port

    def __init__(self, port: int) -> None:
        self.signal = Replica._Signal(port)


class Socket:
    """A raw WebSocket to ``/v1``, recording everything it receives."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session = session
        self.ws = ws
        self.received: list[dict[str, Any]] = []
        self.close_code: int | None = None

    @classmethod
    async def open(cls, server: HasSignal, **query: str) -> Socket:
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(
            f"ws://127.0.0.1:{server.signal.port}/v1", params=query, max_msg_size=0
        )
        return cls(session, ws)

    async def next(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """The next JSON message; None once the socket is closed (close_code set)."""
        message = await self.ws.receive(timeout=timeout)
        if message.type == aiohttp.WSMsgType.TEXT:
            data: dict[str, Any] = json.loads(message.data)
            self.received.append(data)
            return data
        # A close frame's code is the message's data (ws.close_code may not be set yet).
        self.close_code = (
            int(message.data) if message.type == aiohttp.WSMsgType.CLOSE else self.ws.close_code
        )
        return None

    async def until(self, key: str, timeout: float = 10.0) -> dict[str, Any]:
        while True:
            message = await self.next(timeout)
            if message is None:
                raise AssertionError(f"closed ({self.close_code}) before {key}: {self.received}")
            if key in message:
                return message

    async def closed(self, timeout: float = 10.0) -> int | None:
        while await self.next(timeout) is not None:
            pass
        return self.close_code

    async def send(self, message: Any) -> None:
        await self.ws.send_str(message if isinstance(message, str) else json.dumps(message))

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


async def joined(server: HasSignal, token: str, **query: str) -> Socket:
    socket = await Socket.open(server, token=token, **query)
    await socket.until("joined")
    return socket


async def refused(server: HasSignal, **query: str) -> tuple[dict[str, Any], int | None]:
    """Connect, expect one error before any joined, then the close; returns both."""
    socket = await Socket.open(server, **query)
    try:
        first = await socket.next()
        assert first is not None and "error" in first, socket.received
        return first["error"], await socket.closed()
    finally:
        await socket.close()
