"""Checking at once whether a media node a client lost is dead, instead of waiting for its
heartbeat to go stale.

A client whose session broke without a Closing message names the node in its next Join
(``JoinRequest.unreachable_node_id``). Presence then re-reads the registry and, unless the
node's record already settles it (gone, DRAINING, or a heartbeat older than one interval plus
slack), asks the node itself: a gRPC health check of ``spaces.v1.MediaService`` with a short
deadline. A node that refuses the connection or does not answer in time is excluded from
placement on this replica until it would have gone stale anyway, so the space moves now.
A node that answers SERVING stays: the client's own network was the problem.

Checks are shared: the many clients of one space report the same node within a second, and
they wait for one probe (whose result is kept for ``CHECK_TTL_S``).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spaces import metrics
from spaces.config import RegistryConfig
from spaces.routing.registry import NodeDirectory
from spaces.v1 import media_pb2, node_pb2

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 0.5
"""A healthy node answers a health check in milliseconds; a dead one refuses it at once, or
(a machine gone) never answers."""
CHECK_TTL_S = 1.0
HEARTBEAT_SLACK_MS = 1_000
MEDIA_SERVICE = media_pb2.DESCRIPTOR.services_by_name["MediaService"].full_name


class LivenessChecker:
    def __init__(
        self,
        directory: NodeDirectory,
        config: RegistryConfig,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._directory = directory
        self._config = config
        self._credentials = credentials
        self._checks: dict[str, tuple[float, asyncio.Future[bool]]] = {}

    async def check(self, node_id: str) -> bool:
        """True if the node is alive. A dead node is excluded from placement; an id the
        registry does not know (any more) is not alive, and nothing is done about it."""
        now = time.monotonic()
        cached = self._checks.get(node_id)
        if cached is not None and now - cached[0] < CHECK_TTL_S:
            return await asyncio.shield(cached[1])
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._checks[node_id] = (now, future)
        for stale in [k for k, (at, _) in self._checks.items() if now - at >= CHECK_TTL_S]:
            del self._checks[stale]
        try:
            alive, why = await self._judge(node_id)
        except BaseException as exc:
            future.set_exception(exc)
            self._checks.pop(node_id, None)
            raise
        future.set_result(alive)
        metrics.LIVENESS_CHECKS.labels(
            result="alive" if alive else ("dead" if why else "unknown")
        ).inc()
        if not alive and why:  # an id the registry does not know needs no exclusion
            self._directory.exclude(node_id, self._config.stale_ms)
            logger.warning(
                "media node %s reported unreachable and is %s: placing elsewhere", node_id, why
            )
        return alive

    async def _judge(self, node_id: str) -> tuple[bool, str]:
        node, now_ms = await self._directory.fresh(node_id)
        if node is None:
            return False, ""
        if node.state != node_pb2.NODE_STATE_SERVING:
            return False, node_pb2.NodeState.Name(node.state).lower()
        age_ms = now_ms - node.updated_at_ms
        if age_ms > self._config.heartbeat_ms + HEARTBEAT_SLACK_MS:
            return False, f"silent for {age_ms} ms"
        return await self._probe(node.address)

    async def _probe(self, address: str) -> tuple[bool, str]:
        if self._credentials is not None:
            channel = grpc.aio.secure_channel(address, self._credentials)
        else:
            channel = grpc.aio.insecure_channel(address)
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=MEDIA_SERVICE), timeout=PROBE_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return False, f"not answering ({exc.code().name.lower()})"
            return True, ""  # it answered, if strangely: not proof that it is dead
        finally:
            await channel.close()
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return False, "no longer serving"
        return True, ""
