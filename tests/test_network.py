"""ICE policy (bound addresses, UDP port range, advertised IP), ICE servers handed to clients,
and process start/stop behaviour an operator sees."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from aiortc import RTCPeerConnection
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spaces.config import IceServerConfig, NodeConfig
from spaces.media.aiortc_adapter import IcePolicy, apply_ice_policy
from spaces.sdk import client as sdk
from spaces.sdk.media import TestPatternTrack
from spaces.server import SpacesServer
from spaces.v1 import presence_pb2
from tests.support.system import (
    ADMIN_KEY,
    Admin,
    Process,
    Tenant,
    eventually,
    free_port,
    make_config,
    start_server,
    wait_serving,
)


def local_candidates(pc: RTCPeerConnection) -> list[tuple[str, int]]:
    sdp = pc.localDescription.sdp
    found = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            found.append((parts[4], int(parts[5])))
    return found


async def test_ice_binds_the_port_range_and_announces_the_advertised_ip() -> None:
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="sendonly")
    apply_ice_policy(
        pc,
        IcePolicy(
            bind_addresses=("127.0.0.1",), advertise_ip="127.0.0.9", port_min=47100, port_max=47109
        ),
    )
    await pc.setLocalDescription(await pc.createOffer())
    candidates = local_candidates(pc)
    assert candidates, "no candidate gathered"
    for host, port in candidates:
        assert host == "127.0.0.9"
        assert 47100 <= port <= 47109
    await pc.close()


async def test_media_flows_through_a_node_confined_to_a_udp_port_range() -> None:
    config = make_config()
    config = replace(
        config,
        node=replace(config.node, udp_port_min=47200, udp_port_max=47239),
        ice_servers=(IceServerConfig(urls=("stun:stun.example.invalid:3478",)),),
    )
    server = await start_server(config)
    admin = Admin(server.address)
    try:
        tenant = Tenant(await admin.create_key())
        space_id = await admin.create_space()
        reply = await admin.presence.Join(presence_pb2.JoinRequest(token=tenant.token(space_id)))
        # ICE servers from config are handed to clients at join.
        assert [list(s.urls) for s in reply.ice_servers] == [["stun:stun.example.invalid:3478"]]
        publisher = sdk.Space(tenant.token(space_id, "p"), server.address)
        viewer = sdk.Space(tenant.token(space_id, "v"), server.address)
        # The SDK is on loopback: keep the (unreachable) STUN server out of its gathering.
        publisher.join_response = None
        await publisher.join()
        await viewer.join()
        await publisher.local.publish(TestPatternTrack((10, 10, 10)), "camera")
        track = await eventually(lambda: viewer.remote_track("p", "camera"))
        await eventually(lambda: track.frames_received > 5, timeout=20)
        session = next(iter(server.media_node.sessions.values()))
        pcs = [pc for pc in (session._publisher_pc, session._subscriber_pc) if pc is not None]
        ports = [port for pc in pcs for _, port in local_candidates(pc)]
        assert ports and all(47200 <= port <= 47239 for port in ports)
        await publisher.leave()
        await viewer.leave()
    finally:
        await admin.close()
        await server.stop()


async def test_embedded_mode_generates_and_logs_an_admin_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="spaces.server")
    server = SpacesServer(replace(make_config(), admin_key=""))
    await server.start()
    try:
        assert server.admin_key
        assert any(
            "admin key" in r.getMessage() and server.admin_key in r.getMessage()
            for r in caplog.records
        )
    finally:
        await server.stop()


async def test_sigterm_turns_readiness_off_first_then_exits(tmp_path: Path) -> None:
    port = free_port()
    process = Process(
        ["serve", "--services", "control,auth,presence"],
        {
            "SPACES_GRPC_ADDR": f"127.0.0.1:{port}",
            "SPACES_ADMIN_KEY": ADMIN_KEY,
            "SPACES_METRICS_ADDR": "",
            "SPACES_SHUTDOWN_GRACE_SECONDS": "2",
        },
        tmp_path / "serve.log",
    ).start()
    address = f"127.0.0.1:{port}"
    try:
        await wait_serving(address)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            process.signal(15)
            second = await asyncio.wait_for(watch.read(), 5)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await asyncio.to_thread(process.wait, 15) == 0
    finally:
        process.stop()
    assert "spaces stopped" in process.log()


def test_node_config_validates_its_port_range() -> None:
    with pytest.raises(ValueError):
        NodeConfig(udp_port_min=50000, udp_port_max=0)
    with pytest.raises(ValueError):
        NodeConfig(udp_port_min=60000, udp_port_max=50000)
    assert NodeConfig(udp_port_min=50000, udp_port_max=60000).udp_port_max == 60000
