"""The signaling service: browsers join over a WebSocket that speaks Mux's web protocol.

One aiohttp server serves:

* ``/v1``: the WebSocket endpoint of Mux's web SDK (``window.MUX_SPACES_BACKEND_URL`` set to
  ``ws://host:port``), and of our own browser client. Each connection is a ``Bridge``.
* ``/sdk/spaces.js`` and ``/sdk/spaces.d.ts``: our browser client, an ES module with no build.
* ``/``: the meeting page (``web/index.html``), and its script.
* ``/healthz`` (liveness) and ``/readyz`` (readiness; not ready once stopping).
* ``/dev/token``: mints a token for the meeting page, only in the embedded single-process mode
  and only for requests from loopback; never with Redis.

It is stateless (a dropped browser reconnects through any replica) and scales horizontally:
``spaces serve --services signal`` with ``SPACES_PRESENCE_ADDR``. In ``make run`` it runs inside
the one process and reaches presence and the media node over loopback gRPC.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import ssl
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from spaces.config import ServerConfig, is_loopback_host
from spaces.signal.bridge import Bridge, Channels
from spaces.v1 import signing_key_pb2, signing_key_pb2_grpc, space_pb2, space_pb2_grpc

logger = logging.getLogger(__name__)

TRANSPORT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""aiohttp refuses (closes with 1009) anything larger; MuxWire refuses what is larger than its
own limit with an error message first."""

_STATIC = {
    "/sdk/spaces.js": ("spaces.js", "text/javascript"),
    "/sdk/spaces.d.ts": ("spaces.d.ts", "application/typescript"),
    "/": ("index.html", "text/html"),
    "/meeting.js": ("meeting.js", "text/javascript"),
    "/meeting.css": ("meeting.css", "text/css"),
}


def web_asset(name: str) -> bytes:
    """A file of the browser client (``web/``), installed with the package as ``spaces.web``."""
    return resources.files("spaces.web").joinpath(name).read_bytes()


class SignalComponent:
    def __init__(self, config: ServerConfig, presence_address: str) -> None:
        self._config = config
        signal = config.signal
        credentials = None
        ca_file = signal.grpc_ca_file or (config.tls.cert_file if config.tls.enabled else "")
        if ca_file:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes())
        self.channels = Channels(presence_address, credentials)
        self._presence_address = presence_address
        self._runner: web.AppRunner | None = None
        self._bridges: set[asyncio.Task[Any]] = set()
        self.bridges: dict[int, Bridge] = {}
        """Every live browser connection (by id of the bridge)."""
        self._ready = False
        self.port = 0
        self._dev: dict[str, str] = {}
        self._dev_lock = asyncio.Lock()

    @property
    def dev_tokens(self) -> bool:
        """The meeting page's token helper: the single-process embedded mode (no Redis, presence
        in this process) on a loopback listener only."""
        signal = self._config.signal
        host = signal.addr.rpartition(":")[0].strip("[]")
        return (
            signal.dev_tokens
            and self._config.embedded
            and "presence" in self._config.services
            and is_loopback_host(host)
        )

    @property
    def url(self) -> str:
        host = self._config.signal.addr.rpartition(":")[0] or "127.0.0.1"
        if host in ("0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        scheme = "https" if self._config.tls.enabled else "http"
        return f"{scheme}://{host}:{self.port}/"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/v1", self._websocket)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_post("/dev/token", self._dev_token)
        for path in _STATIC:
            app.router.add_get(path, self._static)
        return app

    async def start(self) -> None:
        signal = self._config.signal
        self._runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        host, _, port = signal.addr.rpartition(":")
        context = None
        if self._config.tls.enabled:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self._config.tls.cert_file, self._config.tls.key_file)
        site = web.TCPSite(
            self._runner,
            host.strip("[]") or None,
            int(port),
            ssl_context=context,
            shutdown_timeout=1,
        )
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(f"signaling service cannot listen on {signal.addr}: {exc}") from exc
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else int(port)
        self._ready = True
        logger.info(
            "signaling service on %s (WebSocket %sv1, presence at %s)",
            self.url,
            self.url.replace("http", "ws", 1),
            self._presence_address,
        )
        if self.dev_tokens:
            logger.info("meeting page: %s  (open it in two browser tabs)", self.url)

    async def stop(self) -> None:
        """Not ready first; then every browser is closed with a retryable code, so it
        reconnects through another replica."""
        self._ready = False
        for task in list(self._bridges):
            task.cancel()
        if self._bridges:
            await asyncio.gather(*self._bridges, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.channels.close()

    # --- handlers ----------------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        signal = self._config.signal
        ws = web.WebSocketResponse(
            heartbeat=signal.ping_interval_s or None,
            max_msg_size=TRANSPORT_MAX_MESSAGE_BYTES,
            compress=True,
        )
        # The upgrade is always accepted, even for a bad token: Mux's SDK needs an error
        # message, and hangs forever on an HTTP error.
        await ws.prepare(request)
        bridge = Bridge(
            ws,
            self.channels,
            join_timeout_s=signal.join_timeout_s,
            camera_encodings=tuple(e.mux() for e in self._config.simulcast.camera),
            screenshare_encodings=tuple(e.mux() for e in self._config.simulcast.screenshare),
        )
        task = asyncio.current_task()
        if task is not None:
            self._bridges.add(task)
        self.bridges[id(bridge)] = bridge
        try:
            await bridge.run(request.query)
        except asyncio.CancelledError:
            if not ws.closed:
                await ws.close(code=4001, message=b"server stopping")
            raise
        finally:
            self.bridges.pop(id(bridge), None)
            if task is not None:
                self._bridges.discard(task)
        return ws

    def bridges_of(self, participant_id: str) -> list[Bridge]:
        return [b for b in self.bridges.values() if b.participant_id == participant_id]

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if not self._ready:
            return web.Response(status=503, text="stopping\n")
        return web.Response(text="ready\n")

    async def _static(self, request: web.Request) -> web.Response:
        name, content_type = _STATIC[request.path]
        try:
            body = web_asset(name)
        except FileNotFoundError:
            raise web.HTTPNotFound() from None
        headers = {"Cache-Control": "no-cache"}
        if request.path.startswith("/sdk/"):
            # Apps on their own origin import the client from here: a cross-origin module
            # import is a CORS request.
            headers["Access-Control-Allow-Origin"] = "*"
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=headers)

    async def _dev_token(self, request: web.Request) -> web.Response:
        """``{"space_id"?, "participant_id"?, "role"?}`` -> ``{"token", "space_id"}``: a token
        for the meeting page, signed with a signing key this process made for itself."""
        remote = request.remote or ""
        try:
            from_loopback = ipaddress.ip_address(remote).is_loopback
        except ValueError:
            from_loopback = False
        if not self.dev_tokens or not from_loopback:
            raise web.HTTPForbidden(text="dev tokens exist only in the embedded mode on loopback")
        try:
            body = await request.json() if request.can_read_body else {}
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPBadRequest(text="expected a JSON object") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="expected a JSON object")
        space_id = str(body.get("space_id") or "")
        participant_id = str(body.get("participant_id") or "") or None
        role = body.get("role") or "publisher"
        if role not in ("publisher", "subscriber") or len(space_id) > 64:
            raise web.HTTPBadRequest(text="role must be publisher or subscriber")
        try:
            key_id, private_key, default_space = await self._dev_key_and_space()
        except grpc.aio.AioRpcError as exc:
            raise web.HTTPServiceUnavailable(text=exc.details() or "unavailable") from None
        from spaces.sdk.tokens import sign_token

        try:
            token = sign_token(
                key_id,
                private_key,
                space_id or default_space,
                role="subscriber" if role == "subscriber" else "publisher",
                participant_id=participant_id,
                ttl=3600,
            )
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        return web.Response(
            text=json.dumps({"token": token, "space_id": space_id or default_space}),
            content_type="application/json",
        )

    async def _dev_key_and_space(self) -> tuple[str, str, str]:
        async with self._dev_lock:
            if not self._dev:
                md = (("authorization", f"Bearer {self._config.admin_key}"),)
                async with grpc.aio.insecure_channel(self._presence_address) as channel:
                    key = await signing_key_pb2_grpc.SigningKeyServiceStub(
                        channel
                    ).CreateSigningKey(signing_key_pb2.CreateSigningKeyRequest(), metadata=md)
                    space = await space_pb2_grpc.SpaceServiceStub(channel).CreateSpace(
                        space_pb2.CreateSpaceRequest(passthrough="meeting page"), metadata=md
                    )
                self._dev = {"key": key.id, "private": key.private_key, "space": space.id}
                logger.info("meeting page: dev space %s", space.id)
            return self._dev["key"], self._dev["private"], self._dev["space"]
