"""BroadcastService: validate, call the store, nudge the space's media node."""

from __future__ import annotations

import logging

import grpc

from spaces import errors, ids
from spaces.broadcast import validation
from spaces.config import BroadcastConfig
from spaces.control.servicer import _check_passthrough
from spaces.store.base import BroadcastSpec, Store
from spaces.v1 import broadcast_pb2, broadcast_pb2_grpc, node_pb2

logger = logging.getLogger(__name__)


class BroadcastServicer(broadcast_pb2_grpc.BroadcastServiceServicer):
    def __init__(self, store: Store, config: BroadcastConfig) -> None:
        self._store = store
        self._config = config

    async def CreateBroadcast(
        self, request: broadcast_pb2.CreateBroadcastRequest, context: grpc.aio.ServicerContext
    ) -> broadcast_pb2.Broadcast:
        space_id = ids.validate_id(request.space_id, "space")
        passthrough = _check_passthrough(request.passthrough)
        layout = validation.layout_name(request.layout)
        resolution = validation.resolution_name(request.resolution)
        target = validation.parse_rtmp(request.rtmp_url, request.stream_key)
        await self._store.get_space(space_id)  # NOT_FOUND before fetching any background
        background = await validation.load_background(
            request.background if request.HasField("background") else None,
            self._config.background_max_bytes,
            self._config.background_fetch_timeout_ms / 1000,
        )
        return await self._store.create_broadcast(
            BroadcastSpec(
                space_id=space_id,
                broadcast_id=ids.new_broadcast_id(),
                layout=layout,
                resolution=resolution,
                rtmp_url=target.url,
                stream_key=target.stream_key,
                background_source=background.source,
                background=background.image,
                background_sha256=background.sha256,
                passthrough=passthrough,
            ),
            self._config.per_space,
        )

    async def GetBroadcast(
        self, request: broadcast_pb2.GetBroadcastRequest, context: grpc.aio.ServicerContext
    ) -> broadcast_pb2.Broadcast:
        return await self._store.get_broadcast(*_ids(request))

    async def ListBroadcasts(
        self, request: broadcast_pb2.ListBroadcastsRequest, context: grpc.aio.ServicerContext
    ) -> broadcast_pb2.ListBroadcastsResponse:
        space_id = ids.validate_id(request.space_id, "space")
        return broadcast_pb2.ListBroadcastsResponse(
            broadcasts=await self._store.list_broadcasts(space_id)
        )

    async def DeleteBroadcast(
        self, request: broadcast_pb2.DeleteBroadcastRequest, context: grpc.aio.ServicerContext
    ) -> broadcast_pb2.DeleteBroadcastResponse:
        await self._store.delete_broadcast(*_ids(request))
        return broadcast_pb2.DeleteBroadcastResponse()

    async def StartBroadcast(
        self, request: broadcast_pb2.StartBroadcastRequest, context: grpc.aio.ServicerContext
    ) -> broadcast_pb2.Broadcast:
        space_id, broadcast_id = _ids(request)
        broadcast, node_id = await self._store.start_broadcast(space_id, broadcast_id)
        await self._notify(node_id, space_id)
        return broadcast

    async def StopBroadcast(
        self, request: broadcast_pb2.StopBroadcastRequest, context: grpc.aio.ServicerContext
    ) -> broadcast_pb2.Broadcast:
        space_id, broadcast_id = _ids(request)
        broadcast, node_id = await self._store.stop_broadcast(space_id, broadcast_id)
        await self._notify(node_id, space_id)
        return broadcast

    async def _notify(self, node_id: str, space_id: str) -> None:
        """The space's sessions learn it at once (media nodes also re-read it every few
        seconds, so a lost message only delays it)."""
        if not node_id:
            return
        command = node_pb2.NodeCommand(
            broadcasts_changed=node_pb2.BroadcastsChanged(space_id=space_id)
        )
        try:
            await self._store.publish_node_command(node_id, command)
        except errors.StoreUnavailable:
            logger.warning(
                "space %s: could not tell node %s about its broadcasts", space_id, node_id
            )


def _ids(
    request: broadcast_pb2.GetBroadcastRequest
    | broadcast_pb2.DeleteBroadcastRequest
    | broadcast_pb2.StartBroadcastRequest
    | broadcast_pb2.StopBroadcastRequest,
) -> tuple[str, str]:
    return (
        ids.validate_id(request.space_id, "space"),
        ids.validate_id(request.broadcast_id, "broadcast"),
    )
