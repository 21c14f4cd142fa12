"""A real HTTP webhook endpoint on loopback (aiohttp.web) that records what it receives and
answers as a test tells it to: accept, fail, or hang without answering."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.system import eventually, free_port


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int | None = None
    """What the receiver answered; None while it hangs (or if it never answered)."""

    @property
    def event(self) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(self.body)
        return event

    @property
    def signature(self) -> str:
        return self.headers.get("mux-signature", "")


@dataclass
class WebhookReceiver:
    port: int = field(default_factory=free_port)
    mode: str = "ok"
    """"ok" answers 200, "fail" answers ``fail_status``, "hang" never answers, "flaky" fails
    a ``flaky_rate`` share of requests at random."""
    fail_status: int = 500
    flaky_rate: float = 0.3
    received: list[Received] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _never: asyncio.Event = field(default_factory=asyncio.Event)
    _rng: random.Random = field(default_factory=lambda: random.Random(7))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def start(self) -> WebhookReceiver:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        self._never.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        record = Received(dict(request.headers), await request.read())
        self.received.append(record)
        mode = self.mode
        if mode == "hang":
            await self._never.wait()  # until stop(): the sender times out or dies first
            return web.Response(status=503)
        failed = mode == "fail" or (mode == "flaky" and self._rng.random() < self.flaky_rate)
        record.status = self.fail_status if failed else 200
        return web.Response(status=record.status, text="nope" if failed else "ok")

    @property
    def accepted(self) -> list[Received]:
        """Requests answered 2xx: the deliveries the sender saw succeed."""
        return [r for r in self.received if r.status == 200]

    def accepted_types(self) -> list[str]:
        return [r.event["type"] for r in self.accepted]

    async def wait_accepted(self, count: int, within: float = 10.0) -> list[Received]:
        await eventually(lambda: len(self.accepted) >= count, timeout=within, interval=0.02)
        return self.accepted

    async def wait_received(self, count: int, within: float = 10.0) -> list[Received]:
        await eventually(lambda: len(self.received) >= count, timeout=within, interval=0.02)
        return self.received
