"""Single-port mode with a real Chromium peer: a browser (our web client) and a Python SDK
participant exchange media through a media node whose every peer connection shares one UDP
port."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import pytest_asyncio

from spaces.media.udp_mux import MuxLink
from spaces.server import SpacesServer
from tests.support.browser import chromium
from tests.support.system import Admin, Tenant, eventually, start_server, web_config
from tests.test_web_client import (
    BLUE,
    COLOR_TOLERANCE,
    RED,
    World,
    assert_every_frame_is,
    until_frames,
    video,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Any]:
    async with chromium() as b:
        yield b


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> AsyncIterator[SpacesServer]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = web_config()
    srv = await start_server(replace(config, node=replace(config.node, udp_port=port)))
    yield srv
    await srv.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def world(server: SpacesServer, browser: Any) -> AsyncIterator[World]:
    admin = Admin(server.address)
    w = World(server, browser, admin, Tenant(await admin.create_key()))
    w.space_id = await admin.create_space()
    yield w
    for page in w.pages:
        await page.close()
    await admin.close()


async def test_a_browser_and_a_python_peer_exchange_media_through_one_udp_port(
    world: World,
) -> None:
    from spaces.sdk import Space
    from spaces.sdk.media import TestPatternTrack, read_pattern, same_color

    node = world.server.media_node
    assert node is not None
    [mux] = node.udp_muxes
    page = await world.joined("browser", RED)
    python = Space(world.tenant.token(world.space_id, "python"), world.server.address)
    await python.join()
    try:
        await python.local.publish(TestPatternTrack(BLUE), "camera")
        await until_frames(page, "python/camera", 30)
        assert_every_frame_is((await video(page))["python/camera"], BLUE, "browser sees python")
        camera = await eventually(lambda: python.remote_track("browser", "camera"), timeout=10)
        await eventually(lambda: camera.frames_received >= 30, timeout=20)
        color, _ = read_pattern(camera.last_frame)
        assert same_color(color, RED, tolerance=COLOR_TOLERANCE), color
        # Chromium's connections (and the Python peer's) all end on the node's one port.
        browser_session = next(s for s in node.sessions.values() if s.participant_id == "browser")
        pcs = [pc for pc in (browser_session._publisher_pc, browser_session._subscriber_pc) if pc]
        assert len(pcs) == 2
        for pc in pcs:
            transport = next(iter(pc._RTCPeerConnection__iceTransports))  # type: ignore[attr-defined]
            pair = transport._connection._nominated.get(1)
            assert (
                isinstance(pair.protocol.transport, MuxLink) and pair.protocol.transport.mux is mux
            )
            assert pair.local_candidate.port == mux.sockname[1]
            candidates = {
                line.split()[5]
                for line in pc.localDescription.sdp.splitlines()
                if line.startswith("a=candidate:")
            }
            assert candidates == {str(mux.sockname[1])}
        assert mux.endpoints == 4
        # Chromium's own checks came in without any route being made for garbage.
        assert sum(mux.dropped.values()) == 0, dict(mux.dropped)
    finally:
        await python.leave()
    await page.close()
    world.pages.remove(page)
    await eventually(lambda: (mux.endpoints, mux.addresses) == (0, 0), timeout=15)
