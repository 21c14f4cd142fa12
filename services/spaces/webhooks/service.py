"""The webhooks component: WebhookService (endpoints and dead letters) and this replica's share
of delivery (fan-out and delivery workers), started and stopped by SpacesServer."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from urllib.parse import urlsplit

import grpc

from spaces import errors, ids, metrics
from spaces.config import ServerConfig, WebhookConfig
from spaces.store.base import DeadLetterRecord, Store, WebhookEndpointRecord
from spaces.tasks import cancel_and_wait
from spaces.v1 import webhook_pb2, webhook_pb2_grpc
from spaces.webhooks.delivery import Deliverer
from spaces.webhooks.envelope import KNOWN_EVENT_NAMES
from spaces.webhooks.fanout import FanOut

logger = logging.getLogger(__name__)

CONFIG_ENDPOINT_ID = "config"
"""The id of the endpoint from SPACES_WEBHOOK_URL; every replica writes the same record."""
MAX_SECRET_CHARS = 256
DEFAULT_DEAD_LETTERS = 100
MAX_DEAD_LETTERS = 1_000
BACKLOG_METRICS_S = 5.0
"""How often a webhooks replica publishes the delivery backlog gauges."""


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.InvalidWebhookUrl()
    return url


def check_event_types(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    unknown = sorted(set(names) - KNOWN_EVENT_NAMES)
    if unknown:
        raise errors.UnknownWebhookEventType(
            f"unknown event type {unknown[0]!r}: use Mux names such as video.space.idle"
        )
    return tuple(dict.fromkeys(names))


def endpoint_message(
    record: WebhookEndpointRecord, *, with_secret: bool = False
) -> webhook_pb2.WebhookEndpoint:
    return webhook_pb2.WebhookEndpoint(
        id=record.id,
        url=record.url,
        secret=record.secret if with_secret else "",
        event_types=list(record.event_types),
        created_at=record.created_at,
        from_config=record.from_config,
    )


def dead_letter_message(record: DeadLetterRecord) -> webhook_pb2.DeadLetter:
    return webhook_pb2.DeadLetter(
        id=record.id,
        endpoint_id=record.endpoint_id,
        event_id=record.envelope_id,
        event_type=record.event_type,
        attempts=record.attempts,
        last_error=record.last_error,
        failed_at_ms=record.failed_at_ms,
    )


class WebhookServicer(webhook_pb2_grpc.WebhookServiceServicer):
    def __init__(self, store: Store, deliverer: Deliverer) -> None:
        self._store = store
        self._deliverer = deliverer

    async def CreateWebhookEndpoint(
        self,
        request: webhook_pb2.CreateWebhookEndpointRequest,
        context: grpc.aio.ServicerContext,
    ) -> webhook_pb2.WebhookEndpoint:
        if len(request.secret) > MAX_SECRET_CHARS:
            raise errors.WebhookSecretTooLong()
        record = WebhookEndpointRecord(
            id=ids.new_webhook_endpoint_id(),
            url=check_url(request.url),
            secret=request.secret or ids.new_secret(),
            event_types=check_event_types(list(request.event_types)),
            created_at=await self._store.now_ms() // 1000,
        )
        await self._store.webhook_put_endpoint(record)
        logger.info("webhook endpoint %s created for %s", record.id, record.url)
        return endpoint_message(record, with_secret=True)

    async def ListWebhookEndpoints(
        self,
        request: webhook_pb2.ListWebhookEndpointsRequest,
        context: grpc.aio.ServicerContext,
    ) -> webhook_pb2.ListWebhookEndpointsResponse:
        records = await self._store.webhook_endpoints()
        return webhook_pb2.ListWebhookEndpointsResponse(
            endpoints=[endpoint_message(r) for r in records]
        )

    async def DeleteWebhookEndpoint(
        self,
        request: webhook_pb2.DeleteWebhookEndpointRequest,
        context: grpc.aio.ServicerContext,
    ) -> webhook_pb2.DeleteWebhookEndpointResponse:
        endpoint_id = ids.validate_id(request.id, "webhook endpoint")
        if endpoint_id == CONFIG_ENDPOINT_ID:
            if any(e.from_config for e in await self._store.webhook_endpoints()):
                raise errors.ConfigWebhookEndpoint()
            raise errors.WebhookEndpointNotFound()
        if not await self._store.webhook_delete_endpoint(endpoint_id):
            raise errors.WebhookEndpointNotFound()
        logger.info("webhook endpoint %s deleted", endpoint_id)
        return webhook_pb2.DeleteWebhookEndpointResponse()

    async def ListDeadLetters(
        self, request: webhook_pb2.ListDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> webhook_pb2.ListDeadLettersResponse:
        limit = request.limit or DEFAULT_DEAD_LETTERS
        if limit > MAX_DEAD_LETTERS:
            raise errors.InvalidLimit(f"limit must be at most {MAX_DEAD_LETTERS}")
        records = await self._store.webhook_dead_letters(limit)
        return webhook_pb2.ListDeadLettersResponse(
            dead_letters=[dead_letter_message(r) for r in records]
        )

    async def ReplayDeadLetters(
        self, request: webhook_pb2.ReplayDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> webhook_pb2.ReplayDeadLettersResponse:
        replayed = await self._store.webhook_replay(list(request.ids))
        if replayed:
            logger.info("%d dead letters queued for delivery again", replayed)
            self._deliverer.wake()
        return webhook_pb2.ReplayDeadLettersResponse(replayed=replayed)


def worker_id() -> str:
    """Names this replica in the consumer group and in its lease tokens."""
    return f"{socket.gethostname()}-{os.getpid()}-{ids.new_node_suffix()}"


class WebhookComponent:
    def __init__(self, config: ServerConfig, store: Store) -> None:
        self._config = config.webhooks
        self._store = store
        # Refuse a bad configured endpoint before the server binds, not after.
        try:
            if self._config.url:
                check_url(self._config.url)
                check_event_types(self._config.event_types)
        except errors.SpacesError as exc:
            raise ValueError(f"SPACES_WEBHOOK_URL / SPACES_WEBHOOK_EVENTS: {exc.message}") from exc
        name = worker_id()
        self.deliverer = Deliverer(store, self._config, name)
        self.fan_out = FanOut(store, self._config, name, self.deliverer.wake)
        self.servicer = WebhookServicer(store, self.deliverer)
        self._gauges: asyncio.Task[None] | None = None

    def register(self, server: grpc.aio.Server) -> None:
        webhook_pb2_grpc.add_WebhookServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        await self._sync_config_endpoint(self._config)
        # Delivery first: the fan-out wakes it as soon as it has enqueued something.
        await self.deliverer.start()
        await self.fan_out.start()
        self._gauges = asyncio.create_task(self._backlog_forever(), name="webhook-backlog")

    async def stop(self) -> None:
        await cancel_and_wait(self._gauges)
        await self.fan_out.stop()
        await self.deliverer.stop()

    async def _backlog_forever(self) -> None:
        """Publish how far delivery is behind (every replica reports the same figures)."""
        while True:
            await self.update_backlog()
            await asyncio.sleep(BACKLOG_METRICS_S)

    async def update_backlog(self) -> None:
        try:
            backlog = await self._store.webhook_backlog()
        except errors.StoreUnavailable:
            return
        except Exception:
            logger.exception("webhook backlog metrics failed")
            return
        metrics.WEBHOOK_QUEUES.set(backlog.queues)
        metrics.WEBHOOK_DEAD_LETTERS.set(backlog.dead_letters)
        waited = backlog.now_ms - backlog.oldest_due_ms if backlog.oldest_due_ms else 0
        metrics.WEBHOOK_OLDEST_DUE.set(max(0, waited) / 1000)

    async def _sync_config_endpoint(self, config: WebhookConfig) -> None:
        """The configuration is the source of truth for the "config" endpoint: every replica
        writes the same record, and removing SPACES_WEBHOOK_URL removes the endpoint."""
        if not config.url:
            if await self._store.webhook_delete_endpoint(CONFIG_ENDPOINT_ID):
                logger.info("webhook endpoint from config removed (SPACES_WEBHOOK_URL unset)")
            return
        event_types = check_event_types(config.event_types)
        url = check_url(config.url)
        current = {e.id: e for e in await self._store.webhook_endpoints()}.get(CONFIG_ENDPOINT_ID)
        record = WebhookEndpointRecord(
            id=CONFIG_ENDPOINT_ID,
            url=url,
            secret=config.secret,
            event_types=event_types,
            created_at=current.created_at if current else await self._store.now_ms() // 1000,
            from_config=True,
        )
        if record != current:
            await self._store.webhook_put_endpoint(record)
            logger.info("webhook endpoint from config: %s", url)
