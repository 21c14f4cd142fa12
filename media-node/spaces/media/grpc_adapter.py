"""The gRPC wire of the media node: ``spaces.v1.MediaService.Session`` onto the session core.

The first ClientMessage must be Hello with the ticket from PresenceService.Join. After it, each
ClientMessage is decoded into a session event (``spaces.session.grpc_wire``) and handed to the
core; each event the core emits is encoded into a ServerMessage. Nothing else happens here: the
state machine is ``spaces.media.session``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from spaces import errors, logs
from spaces.media.node import MediaNode
from spaces.media.session import Session as MediaSession
from spaces.session import events as ev
from spaces.session import grpc_wire
from spaces.streams import close_stream
from spaces.v1 import media_pb2, media_pb2_grpc

logger = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0


class MediaServicer(media_pb2_grpc.MediaServiceServicer):
    def __init__(self, node: MediaNode) -> None:
        self._node = node

    async def Session(
        self,
        request_iterator: AsyncIterator[media_pb2.ClientMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[media_pb2.ServerMessage]:
        try:
            first = await asyncio.wait_for(anext(request_iterator), HELLO_TIMEOUT_S)
        except (TimeoutError, StopAsyncIteration) as exc:
            raise errors.InvalidTicket("send hello with the ticket from Join first") from exc
        if first.WhichOneof("message") != "hello":
            raise errors.InvalidTicket("send hello with the ticket from Join first")
        session = await self._node.admit(first.hello.ticket, grpc_wire.session_options(first.hello))
        logs.bind(space_id=session.space_id, connection_id=session.connection_id)
        joined = self._node.enter(session)
        reader: asyncio.Task[None] | None = None
        try:
            yield grpc_wire.server_message(joined)
            reader = asyncio.create_task(
                self._read(session, request_iterator), name="session-reader"
            )
            while True:
                event = await session.outgoing()
                if event is None:
                    break
                yield grpc_wire.server_message(event)
        finally:
            if reader is not None:
                reader.cancel()
            # A stream that ends without LeaveSession frees the participant_id at once; the
            # client may still resume it with its secret.
            await session.close(ev.CLOSE_LEFT, "session stream ended", "disconnected")

    async def _read(
        self, session: MediaSession, request_iterator: AsyncIterator[media_pb2.ClientMessage]
    ) -> None:
        try:
            async for message in request_iterator:
                await session.handle(grpc_wire.client_event(message))
                if session.closed:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.debug("session %s: stream read ended: %s", session.connection_id, exc)
        finally:
            # Left at a message (the session ended): close the stream now, not at the event
            # loop's finalizer (the interceptor's own close skips a stream this task is reading:
            # spaces.streams).
            await close_stream(request_iterator)
        if not session.closed:
            await session.close(ev.CLOSE_LEFT, "session stream ended", "disconnected")
