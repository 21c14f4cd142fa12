"""A client that lost its media node names it in its next Join (unreachable_node_id), and
presence checks that node at once instead of waiting for its heartbeat to go stale. Real
servers on Redis: an API process, and media nodes as separate SpacesServers whose gRPC server
can be shut while their registry record still looks fresh (what a SIGKILL leaves behind). The
multi-process version, with a real SIGKILL and media timed, is in tests/test_faults.py."""

from __future__ import annotations

import grpc
import pytest

from spaces import metrics
from spaces.server import SpacesServer
from spaces.v1 import presence_pb2
from tests.support.system import Admin, Tenant, make_config, start_server

SLOW_REGISTRY = {"heartbeat_ms": 2_000, "stale_ms": 60_000, "cache_ms": 500}
"""Staleness far away: only the liveness check can move the space within the test."""


def checks(result: str) -> float:
    return float(metrics.LIVENESS_CHECKS.labels(result=result)._value.get())


async def join(admin: Admin, token: str, unreachable: str = "") -> presence_pb2.JoinResponse:
    return await admin.presence.Join(
        presence_pb2.JoinRequest(token=token, unreachable_node_id=unreachable)
    )


@pytest.fixture
async def two_nodes(redis_url: str):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from spaces.config import RegistryConfig

    registry = RegistryConfig(**SLOW_REGISTRY)
    api = await start_server(
        replace(
            make_config(redis_url=redis_url, services=("control", "auth", "presence")),
            registry=registry,
        )
    )
    nodes: list[SpacesServer] = []
    for name in ("node-a", "node-b"):
        nodes.append(
            await start_server(
                replace(
                    make_config(redis_url=redis_url, services=("media",), node_id=name),
                    registry=registry,
                )
            )
        )
    admin = Admin(api.address)
    try:
        yield admin, nodes
    finally:
        await admin.close()
        for node in nodes:
            await node.stop()
        await api.stop()


async def die_silently(node: SpacesServer) -> None:
    """Stop answering (like a killed process), but leave the registry record as it was."""
    assert node.media_node is not None and node._server is not None
    await node.media_node._heartbeat.stop()
    await node._server.stop(None)


async def test_a_join_naming_a_dead_node_moves_the_space_at_once(two_nodes) -> None:  # type: ignore[no-untyped-def]
    admin, nodes = two_nodes
    tenant = Tenant(await admin.create_key())
    space_id = await admin.create_space()
    first = await join(admin, tenant.token(space_id))
    dead = next(n for n in nodes if n.config.node.node_id == first.node_id)
    survivor = next(n for n in nodes if n is not dead)
    await die_silently(dead)

    # Without a report, presence still places the space on the dead node (fresh heartbeat).
    assert (await join(admin, tenant.token(space_id))).node_id == first.node_id
    dead_checks = checks("dead")
    moved = await join(admin, tenant.token(space_id), unreachable=first.node_id)
    assert moved.node_id == survivor.config.node.node_id
    assert checks("dead") == dead_checks + 1
    # And the space stays moved for everyone, reporting or not.
    again = await join(admin, tenant.token(space_id))
    assert again.node_id == survivor.config.node.node_id


async def test_a_join_naming_a_live_node_keeps_the_space_there(two_nodes) -> None:  # type: ignore[no-untyped-def]
    admin, _nodes = two_nodes
    tenant = Tenant(await admin.create_key())
    space_id = await admin.create_space()
    first = await join(admin, tenant.token(space_id))
    alive_checks = checks("alive")
    again = await join(admin, tenant.token(space_id), unreachable=first.node_id)
    assert again.node_id == first.node_id
    assert checks("alive") == alive_checks + 1


async def test_a_join_naming_an_unknown_or_oversized_node_id(two_nodes) -> None:  # type: ignore[no-untyped-def]
    admin, _nodes = two_nodes
    tenant = Tenant(await admin.create_key())
    space_id = await admin.create_space()
    first = await join(admin, tenant.token(space_id))
    unknown = checks("unknown")
    again = await join(admin, tenant.token(space_id), unreachable="no-such-node")
    assert again.node_id == first.node_id
    assert checks("unknown") == unknown + 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await join(admin, tenant.token(space_id), unreachable="x" * 300)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
