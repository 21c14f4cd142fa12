"""SpaceService: validate, call the store, tell media nodes when a forced delete removes people."""

from __future__ import annotations

import logging

import grpc

from spaces import errors, ids, metrics, paging
from spaces.store.base import Store
from spaces.v1 import node_pb2, space_pb2, space_pb2_grpc

logger = logging.getLogger(__name__)

MAX_PASSTHROUGH_CHARS = 255
MAX_PARTICIPANTS_CEILING = 10_000


def _check_passthrough(value: str) -> str:
    if len(value) > MAX_PASSTHROUGH_CHARS:
        raise errors.PassthroughTooLong()
    return value


def _check_max_participants(value: int) -> int:
    if value > MAX_PARTICIPANTS_CEILING:
        raise errors.InvalidArgument(f"max_participants must be at most {MAX_PARTICIPANTS_CEILING}")
    return value


class SpaceServicer(space_pb2_grpc.SpaceServiceServicer):
    def __init__(self, store: Store) -> None:
        self._store = store

    async def CreateSpace(
        self, request: space_pb2.CreateSpaceRequest, context: grpc.aio.ServicerContext
    ) -> space_pb2.Space:
        space = await self._store.create_space(
            ids.new_space_id(),
            _check_passthrough(request.passthrough),
            _check_max_participants(request.max_participants),
        )
        metrics.SPACES_CREATED.inc()
        return space

    async def GetSpace(
        self, request: space_pb2.GetSpaceRequest, context: grpc.aio.ServicerContext
    ) -> space_pb2.Space:
        return await self._store.get_space(ids.validate_id(request.id, "space"))

    async def ListSpaces(
        self, request: space_pb2.ListSpacesRequest, context: grpc.aio.ServicerContext
    ) -> space_pb2.ListSpacesResponse:
        spaces, cursor = await self._store.list_spaces(
            paging.page_limit(request.limit), paging.decode_cursor(request.page_token)
        )
        return space_pb2.ListSpacesResponse(
            spaces=spaces, next_page_token=paging.encode_cursor(cursor)
        )

    async def UpdateSpace(
        self, request: space_pb2.UpdateSpaceRequest, context: grpc.aio.ServicerContext
    ) -> space_pb2.Space:
        space_id = ids.validate_id(request.id, "space")
        passthrough = (
            _check_passthrough(request.passthrough) if request.HasField("passthrough") else None
        )
        max_participants = (
            _check_max_participants(request.max_participants)
            if request.HasField("max_participants")
            else None
        )
        return await self._store.update_space(space_id, passthrough, max_participants)

    async def DeleteSpace(
        self, request: space_pb2.DeleteSpaceRequest, context: grpc.aio.ServicerContext
    ) -> space_pb2.DeleteSpaceResponse:
        space_id = ids.validate_id(request.id, "space")
        deletion = await self._store.delete_space(space_id, request.force)
        metrics.SPACES_DELETED.inc()
        # Sessions also learn it from their next lease renewal; the command makes it immediate.
        nodes = {node for _, node in deletion.removed if node}
        if deletion.node_id:
            nodes.add(deletion.node_id)
        command = node_pb2.NodeCommand(
            close_space=node_pb2.CloseSpace(space_id=space_id, reason="space_deleted")
        )
        for node_id in sorted(nodes):
            try:
                await self._store.publish_node_command(node_id, command)
            except errors.StoreUnavailable:
                logger.warning("space %s: could not notify node %s of deletion", space_id, node_id)
        return space_pb2.DeleteSpaceResponse(disconnected=len(deletion.removed))
