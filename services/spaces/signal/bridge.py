"""One browser connection: the WebSocket, its Join through presence, and its session stream to
the space's media node.

The bridge holds no state of its own beyond the connection: presence admits the participant
(the same atomic uniqueness, limits and errors as the Python SDK's Join), the media node runs the
session core, and ``MuxWire`` translates between the browser's JSON and the session's events,
which travel to the node as ``MediaService.Session`` messages. Media flows directly between the
browser and the media node.

A reconnect (``reconnect_id``) joins with ``reconnect_participant_id``, so the participant's own
connection, admitted with the same token, is taken over rather than refused as a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import WSMsgType, web

from spaces import metrics
from spaces.session import events as ev
from spaces.session import grpc_wire
from spaces.session.mux_wire import (
    CLOSE_NO_RECONNECT,
    CLOSE_RECONNECT,
    INVALID_JWT,
    UNKNOWN,
    JoinInfo,
    MuxWire,
    ProtocolError,
    close_code,
    error_message,
    join_error,
)
from spaces.v1 import media_pb2, media_pb2_grpc, presence_pb2, presence_pb2_grpc

logger = logging.getLogger(__name__)

MAX_TOKEN_CHARS = 16 * 1024
MAX_DISPLAY_NAME_CHARS = 64
DEFAULT_MANAGED_SUBSCRIPTIONS = 16


@dataclass(frozen=True)
class ConnectParams:
    """The query parameters of ``/v1`` (MUX_WEB_PROTOCOL.md, Transport)."""

    token: str
    managed_subscriptions: int
    display_name: str
    reconnect_id: str
    reconnect_attempt: int
    sdk_version: str

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> ConnectParams:
        token = query.get("token", "").strip()
        if not token:
            raise ProtocolError("missing token: connect with ?token=<JWT>", INVALID_JWT, fatal=True)
        if len(token) > MAX_TOKEN_CHARS:
            raise ProtocolError("token is too large", INVALID_JWT, fatal=True)
        raw = query.get("managed_subscriptions", str(DEFAULT_MANAGED_SUBSCRIPTIONS))
        try:
            managed = int(raw)
        except ValueError:
            managed = -1
        if not 0 <= managed <= 20:
            raise ProtocolError("managed_subscriptions must be between 0 and 20", fatal=True)
        name = query.get("display_name", "")
        if len(name) > MAX_DISPLAY_NAME_CHARS:
            raise ProtocolError("display_name is longer than 64 characters", fatal=True)
        try:
            attempt = int(query.get("reconnect_attempt", "0") or 0)
        except ValueError:
            attempt = 0
        return cls(
            token=token,
            managed_subscriptions=managed,
            display_name=name,
            reconnect_id=query.get("reconnect_id", "")[:255],
            reconnect_attempt=attempt,
            sdk_version=query.get("sdk_version", "")[:64],
        )


class Channels:
    """gRPC channels to presence and to media nodes, shared by every bridge of a process."""

    def __init__(
        self, presence_address: str, credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        self._presence_address = presence_address
        self._credentials = credentials
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            options = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000)]
            channel = (
                grpc.aio.secure_channel(address, self._credentials, options=options)
                if self._credentials is not None
                else grpc.aio.insecure_channel(address, options=options)
            )
            self._channels[address] = channel
        return channel

    def presence(self) -> presence_pb2_grpc.PresenceServiceStub:
        return presence_pb2_grpc.PresenceServiceStub(self._channel(self._presence_address))

    def media(self, address: str) -> media_pb2_grpc.MediaServiceStub:
        return media_pb2_grpc.MediaServiceStub(self._channel(address))

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


async def _send(ws: web.WebSocketResponse, message: Mapping[str, Any]) -> None:
    if not ws.closed:
        await ws.send_json(message)


class Bridge:
    """Serves one WebSocket until either side ends."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        channels: Channels,
        *,
        join_timeout_s: float,
        camera_encodings: tuple[Mapping[str, Any], ...] = (),
        screenshare_encodings: tuple[Mapping[str, Any], ...] = (),
    ) -> None:
        self._ws = ws
        self._channels = channels
        self._join_timeout_s = join_timeout_s
        self._camera_encodings = camera_encodings
        self._screenshare_encodings = screenshare_encodings
        self.participant_id = ""
        self.connection_id = ""
        self.space_id = ""
        self._closer: asyncio.Future[Any] | None = None

    async def drop(self, code: int = CLOSE_RECONNECT, reason: str = "dropped") -> None:
        """Close the browser's socket (a retryable code: it reconnects), as a lost connection
        or a stopping replica would."""
        await self._close(code, reason)

    async def _close(self, code: int, reason: str = "") -> None:
        """Close the socket with ``code``, once. The close handshake runs in a task of its own:
        the other pump noticing the close and ending (which cancels its sibling) must not cut
        the handshake short, or the browser sees 1006 instead of the code (and a kicked client
        would reconnect)."""
        if self._closer is None:
            self._closer = asyncio.ensure_future(
                self._ws.close(code=code, message=reason.encode()[:120])
            )
        await asyncio.shield(self._closer)

    async def _fail(self, message: Mapping[str, Any], code: int = CLOSE_NO_RECONNECT) -> None:
        """Send the error first, then close: Mux's SDK hangs forever on a close before
        ``joined`` that carries no error."""
        await _send(self._ws, message)
        await self._close(code)

    async def run(self, query: Mapping[str, str]) -> None:
        started = time.perf_counter()
        try:
            params = ConnectParams.parse(query)
        except ProtocolError as exc:
            metrics.SIGNAL_JOINS.labels(result="invalid_argument").inc()
            await self._fail(exc.payload())
            return
        try:
            join = await self._channels.presence().Join(
                presence_pb2.JoinRequest(
                    token=params.token,
                    display_name=params.display_name,
                    reconnect_participant_id=params.reconnect_id,
                ),
                timeout=self._join_timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            metrics.SIGNAL_JOINS.labels(result=code.lower()).inc()
            await self._fail(join_error(code, exc.details() or code.lower()))
            return
        self.participant_id, self.connection_id = join.participant_id, join.connection_id
        self.space_id = join.space_id
        wire = MuxWire(
            JoinInfo(
                ice_servers=tuple(
                    ev.IceServer(tuple(s.urls), s.username, s.credential) for s in join.ice_servers
                ),
                custom_events_per_second=join.limits.custom_events_per_second,
                tracks_per_source=join.limits.tracks_per_source,
                display_name_interval_seconds=join.limits.display_name_interval_seconds,
                camera_encodings=self._camera_encodings,
                screenshare_encodings=self._screenshare_encodings,
                spaces_client=params.sdk_version.startswith("spaces-js"),
            ),
            sfu_id=join.node_id or "sfu",
        )
        options = ev.SessionOptions(
            subscription_mode=(
                ev.SUBSCRIPTION_MANUAL
                if params.managed_subscriptions == 0
                else ev.SUBSCRIPTION_AUTO
            ),
            max_subscriptions=params.managed_subscriptions,
            offer_subscriber_at_join=True,
            client=f"web {params.sdk_version}".strip(),
        )
        call = self._channels.media(join.media_address).Session()
        try:
            await call.write(grpc_wire.hello_message(join.ticket, options))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            metrics.SIGNAL_JOINS.labels(result="unavailable").inc()
            logger.warning(
                "%s: media node %s unreachable: %s", join.connection_id, join.node_id, exc
            )
            await self._fail(
                error_message(UNKNOWN, "media node unreachable: retry", fatal=True, retry=True),
                CLOSE_RECONNECT,
            )
            call.cancel()
            return
        logger.info(
            "web participant %s joins space %s on %s%s",
            join.participant_id,
            join.space_id,
            join.node_id,
            f" (reconnect {params.reconnect_attempt})" if params.reconnect_id else "",
        )

        def on_joined() -> None:
            metrics.SIGNAL_JOINS.labels(result="ok").inc()
            metrics.SIGNAL_JOIN_LATENCY.observe(time.perf_counter() - started)

        metrics.SIGNAL_CONNECTIONS.inc()
        try:
            await self._pump(call, wire, on_joined)
        finally:
            metrics.SIGNAL_CONNECTIONS.dec()
            call.cancel()

    async def _pump(
        self,
        call: Any,
        wire: MuxWire,
        on_joined: Callable[[], None],
    ) -> None:
        ws = self._ws
        to_browser = asyncio.create_task(self._from_node(call, wire, on_joined), name="from-node")
        to_node = asyncio.create_task(self._from_browser(call, wire), name="from-browser")
        done, pending = await asyncio.wait(
            {to_browser, to_node}, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                logger.warning("%s: bridge ended: %r", self.connection_id, task.exception())
        if self._closer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._closer), 5.0)
        elif not ws.closed:
            await self._close(CLOSE_RECONNECT)

    async def _from_node(self, call: Any, wire: MuxWire, on_joined: Callable[[], None]) -> None:
        ws = self._ws
        try:
            async for message in call:
                event = grpc_wire.server_event(message)
                if event is None:
                    continue
                was_joined = wire.joined
                for out in wire.send(event):
                    await _send(ws, out)
                if wire.joined and not was_joined:
                    on_joined()
                if isinstance(event, ev.Closing):
                    await self._close(close_code(event), event.message)
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            logger.info("%s: session stream failed: %s", self.connection_id, exc.code().name)
            if not wire.joined:
                await _send(
                    ws,
                    error_message(
                        UNKNOWN, exc.details() or "media session failed", fatal=True, retry=True
                    ),
                )
            await self._close(CLOSE_RECONNECT, "media node unreachable")
            return
        # The node ended the stream without Closing (it stopped): the client should come back.
        await self._close(CLOSE_RECONNECT, "media session ended")

    async def _from_browser(self, call: Any, wire: MuxWire) -> None:
        ws = self._ws
        write: Callable[[media_pb2.ClientMessage], Awaitable[None]] = call.write
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                text: str | bytes = message.data
            elif message.type == WSMsgType.BINARY:
                text = message.data
            else:
                break  # closed or failed: the session ends with the stream
            try:
                client_events = wire.receive(text)
            except ProtocolError as exc:
                await _send(ws, exc.payload())
                if exc.fatal:
                    await self._close(CLOSE_RECONNECT if exc.retry else CLOSE_NO_RECONNECT)
                    return
                continue
            for event in client_events:
                await write(grpc_wire.client_message(event))
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.done_writing()
