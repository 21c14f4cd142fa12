"""Assembles one gRPC server process from config: the selected services, health, reflection,
metrics, and their background tasks. ``spaces serve`` and the tests both use ``SpacesServer``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from spaces import metrics
from spaces.auth.admin import AdminAuthInterceptor
from spaces.auth.servicer import SigningKeyServicer
from spaces.config import ServerConfig
from spaces.control.servicer import SpaceServicer
from spaces.interceptors import ErrorInterceptor
from spaces.store import open_store
from spaces.store.base import Store
from spaces.tasks import spawn
from spaces.v1 import (
    broadcast_pb2,
    broadcast_pb2_grpc,
    media_pb2,
    media_pb2_grpc,
    presence_pb2,
    signing_key_pb2,
    signing_key_pb2_grpc,
    space_pb2,
    space_pb2_grpc,
    webhook_pb2,
)

logger = logging.getLogger(__name__)

LIVENESS_SERVICE = "liveness"
"""Health service name that is SERVING for as long as the process runs (the liveness probe).
The empty name "" is readiness: it goes NOT_SERVING as soon as shutdown begins."""

SERVICE_NAMES = {
    "control": space_pb2.DESCRIPTOR.services_by_name["SpaceService"].full_name,
    "auth": signing_key_pb2.DESCRIPTOR.services_by_name["SigningKeyService"].full_name,
    "presence": presence_pb2.DESCRIPTOR.services_by_name["PresenceService"].full_name,
    "media": media_pb2.DESCRIPTOR.services_by_name["MediaService"].full_name,
    "webhooks": webhook_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
    "broadcasts": broadcast_pb2.DESCRIPTOR.services_by_name["BroadcastService"].full_name,
}
ADMIN_SERVICES = {"control", "auth", "presence", "webhooks"}
HTTP_SERVICES = {"signal"}
"""Services served over HTTP rather than gRPC (they get no gRPC service name)."""


class SpacesServer:
    """One process: any subset of control, auth, presence, webhooks and an embedded media node."""

    def __init__(self, config: ServerConfig, *, store: Store | None = None) -> None:
        self.config = config
        self.store: Store = store or open_store(
            config.redis_url,
            event_maxlen=config.event_stream_maxlen,
            gone_ttl_ms=config.leases.gone_ttl_ms,
        )
        self._owns_store = store is None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._components: list[Any] = []
        self.port = 0
        self.metrics_port = 0
        self.health_port = 0
        self._health_server: grpc.aio.Server | None = None
        self.presence: Any = None
        self.media_node: Any = None
        self.webhooks: Any = None
        self.signal: Any = None
        self.broadcaster: Any = None
        self._stopping = False
        self._hurried = False

    @property
    def address(self) -> str:
        host = self.config.grpc_addr.rpartition(":")[0] or "127.0.0.1"
        if host in ("0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def admin_key(self) -> str:
        return self.config.admin_key

    async def start(self) -> None:
        config = self.config
        needs_admin = bool(config.services & ADMIN_SERVICES)
        if needs_admin and not config.admin_key:
            if not config.embedded:
                raise ValueError("SPACES_ADMIN_KEY is required when SPACES_REDIS_URL is set")
            self.config = config = config.with_generated_admin_key()
            logger.warning(
                "no SPACES_ADMIN_KEY set: generated admin key for this run: %s", config.admin_key
            )
        await self.store.start()

        interceptors: list[grpc.aio.ServerInterceptor] = []
        if needs_admin:
            interceptors.append(AdminAuthInterceptor(config.admin_key))
        interceptors.append(ErrorInterceptor())
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        self._server = server

        names: list[str] = []
        if "control" in config.services:
            space_pb2_grpc.add_SpaceServiceServicer_to_server(SpaceServicer(self.store), server)
            names.append(SERVICE_NAMES["control"])
            from spaces.broadcast.servicer import BroadcastServicer

            broadcast_pb2_grpc.add_BroadcastServiceServicer_to_server(
                BroadcastServicer(self.store, config.broadcast), server
            )
            names.append(SERVICE_NAMES["broadcasts"])
        if "auth" in config.services:
            signing_key_pb2_grpc.add_SigningKeyServiceServicer_to_server(
                SigningKeyServicer(self.store), server
            )
            names.append(SERVICE_NAMES["auth"])
        await self._add_presence(server, names)
        await self._add_media(server, names)
        await self._add_webhooks(server, names)
        self._add_broadcaster()

        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names += [
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, server)

        self.port = self._bind(server)
        await server.start()
        if config.health_addr:
            self._health_server = grpc.aio.server(interceptors=[ErrorInterceptor()])
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(config.health_addr)
            if self.health_port == 0:
                raise OSError(f"cannot listen on {config.health_addr}")
            await self._health_server.start()
        for name in [*names, "", LIVENESS_SERVICE]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._add_signal()
        for component in self._components:
            await component.start()
        if config.metrics_addr:
            metrics.count_tasks_of(asyncio.get_running_loop())
            try:
                self.metrics_port = metrics.start_metrics_server(config.metrics_addr)
            except OSError as exc:
                logger.warning("metrics endpoint %s not started: %s", config.metrics_addr, exc)
        logger.info(
            "spaces serving %s on %s (%s store%s)",
            ",".join(sorted(config.services)),
            self.address,
            "redis" if config.redis_url else "embedded memory",
            ", tls" if config.tls.enabled else "",
        )

    def _bind(self, server: grpc.aio.Server) -> int:
        addr = self.config.grpc_addr
        if self.config.tls.enabled:
            credentials = grpc.ssl_server_credentials(
                [
                    (
                        Path(self.config.tls.key_file).read_bytes(),
                        Path(self.config.tls.cert_file).read_bytes(),
                    )
                ]
            )
            port = server.add_secure_port(addr, credentials)
        else:
            port = server.add_insecure_port(addr)
        if port == 0:
            raise OSError(f"cannot listen on {addr}")
        return port

    async def _add_presence(self, server: grpc.aio.Server, names: list[str]) -> None:
        if "presence" not in self.config.services:
            return
        from spaces.presence.service import PresenceComponent

        self.presence = PresenceComponent(self.config, self.store)
        self.presence.register(server)
        self._components.append(self.presence)
        names.append(SERVICE_NAMES["presence"])

    async def _add_media(self, server: grpc.aio.Server, names: list[str]) -> None:
        if "media" not in self.config.services:
            return
        from spaces.media.grpc_adapter import MediaServicer
        from spaces.media.node import MediaNode

        self.media_node = MediaNode(
            self.config, self.store, health=self._health, public_address=self._media_address
        )
        media_pb2_grpc.add_MediaServiceServicer_to_server(MediaServicer(self.media_node), server)
        self._components.append(self.media_node)
        names.append(SERVICE_NAMES["media"])

    def _media_address(self) -> str:
        advertised = self.config.node.advertise_address
        host = advertised.rpartition(":")[0] if advertised else ""
        return f"{host or '127.0.0.1'}:{self.port}"

    async def _add_webhooks(self, server: grpc.aio.Server, names: list[str]) -> None:
        if "webhooks" not in self.config.services:
            return
        try:
            from spaces.webhooks.service import WebhookComponent
        except ImportError:
            return
        self.webhooks = WebhookComponent(self.config, self.store)
        self.webhooks.register(server)
        self._components.append(self.webhooks)
        names.append(SERVICE_NAMES["webhooks"])

    def _add_signal(self) -> None:
        if "signal" not in self.config.services:
            return
        from spaces.signal.service import SignalComponent

        # In one process, presence is this server (bound by now: see start()).
        presence = self.config.signal.presence_addr or self.address
        self.signal = SignalComponent(self.config, presence)
        self._components.append(self.signal)

    def _add_broadcaster(self) -> None:
        if "broadcaster" not in self.config.services:
            return
        from spaces.broadcast.worker import BroadcasterPool

        self.broadcaster = BroadcasterPool(
            self.config, self.store, health=self._health, local_address=lambda: self.address
        )
        self._components.append(self.broadcaster)

    def hurry(self) -> None:
        """Stop now (a second Ctrl-C): cut the media node's drain and the RPC grace short."""
        if self._hurried:
            return
        self._hurried = True
        logger.warning("stopping now: sessions and calls in flight are ended")
        if self.media_node is not None:
            self.media_node.hurry()
        if self._stopping and self._server is not None:
            spawn(self._server.stop(None))

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: readiness NOT_SERVING first, then drain the media node, stop
        background work, stop the gRPC server, close the store. Safe to call twice."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.config.shutdown_grace_s if grace is None else grace
        if self.media_node is not None and self.media_node.sessions:
            logger.info(
                "stopping: %s (interrupt again to stop at once)",
                "ending sessions"
                if self.config.embedded
                else f"draining sessions for up to {self.config.node.drain_grace_s:g}s",
            )
        if self.config.services != {"media"}:
            # API processes: readiness first, so load balancers stop sending new calls. A media
            # node alone keeps "" SERVING until it has drained (MediaNode.stop).
            await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in SERVICE_NAMES.values():
            if name != SERVICE_NAMES["media"]:
                await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        for component in reversed(self._components):
            try:
                await component.stop()
            except Exception:
                logger.exception("error stopping %s", type(component).__name__)
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(None if self._hurried else grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self._owns_store:
            await self.store.close()
        logger.info("spaces stopped")


async def serve(
    config: ServerConfig,
    stop_event: asyncio.Event,
    drain_event: asyncio.Event | None = None,
    hurry_event: asyncio.Event | None = None,
) -> None:
    """Run until ``stop_event`` is set (SIGTERM/SIGINT in the CLI). ``drain_event`` (SIGUSR1,
    sent by `spaces drain`) starts draining the embedded media node without stopping.
    ``hurry_event`` (a second SIGINT/SIGTERM) cuts the shutdown's grace periods short."""
    server = SpacesServer(config)
    await server.start()
    drainer: asyncio.Task[None] | None = None

    async def hurry_on_signal() -> None:
        assert hurry_event is not None
        await hurry_event.wait()
        server.hurry()

    hurrier = asyncio.create_task(hurry_on_signal()) if hurry_event is not None else None

    async def drain_on_signal() -> None:
        assert drain_event is not None
        await drain_event.wait()
        if server.media_node is not None:
            await server.media_node.drain()

    if drain_event is not None:
        drainer = asyncio.create_task(drain_on_signal(), name="drain-signal")
    try:
        await stop_event.wait()
    finally:
        if drainer is not None:
            drainer.cancel()
        await server.stop()
        if hurrier is not None:
            hurrier.cancel()
