"""TURN with a real coturn on loopback (use-auth-secret): presence mints a time-limited
credential per Join; clients forced to relay only (iceTransportPolicy "relay") get media
through coturn; coturn refuses a wrong or expired credential; media nodes can relay too."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import pytest
from aioice import stun
from aioice import turn as aioice_turn

from spaces import turn
from spaces.config import TurnConfig
from spaces.media.udp_mux import MuxLink
from spaces.sdk import client as sdk
from spaces.sdk.media import TestPatternTrack, read_pattern, same_color
from spaces.server import SpacesServer
from spaces.v1 import presence_pb2
from tests.support.system import (
    Admin,
    Tenant,
    eventually,
    make_config,
    start_server,
    web_config,
)
from tests.support.turn_server import TurnServer
from tests.support.websocket import joined

COLOR = (30, 160, 220)
TOKEN_TTL_S = 600


@pytest.fixture(scope="module")
def coturn() -> Iterator[TurnServer]:
    server = TurnServer().start()
    yield server
    server.close()


async def turn_world(coturn: TurnServer, media: str = "off") -> SpacesServer:
    return await start_server(
        replace(
            make_config(), turn=TurnConfig(urls=(coturn.url,), secret=coturn.secret, media=media)
        )
    )


@pytest.fixture
async def relay_server(coturn: TurnServer) -> AsyncIterator[SpacesServer]:
    srv = await turn_world(coturn)
    yield srv
    await srv.stop()


class _Client(asyncio.DatagramProtocol):
    def connection_made(self, transport: Any) -> None:
        pass

    def datagram_received(self, data: bytes, addr: Any) -> None:
        pass


async def allocate(coturn: TurnServer, username: str, password: str) -> None:
    """A TURN Allocate with these credentials, as a browser or aiortc makes it."""
    transport, _ = await aioice_turn.create_turn_endpoint(
        _Client,
        server_addr=("127.0.0.1", coturn.port),
        username=username,
        password=password,
        transport="udp",
    )
    transport.close()


def nominated(pc: Any) -> Any:
    """The nominated ICE pair of a peer connection (first transport)."""
    transport = next(iter(pc._RTCPeerConnection__iceTransports))
    return transport._connection._nominated.get(1)


async def test_join_hands_out_a_turn_credential_for_the_connection(
    relay_server: SpacesServer, coturn: TurnServer
) -> None:
    admin = Admin(relay_server.address)
    tenant = Tenant(await admin.create_key())
    space_id = await admin.create_space()
    before = int(time.time())
    reply = await admin.presence.Join(
        presence_pb2.JoinRequest(token=tenant.token(space_id, "alice", ttl=TOKEN_TTL_S))
    )
    await admin.close()
    [server] = [s for s in reply.ice_servers if s.username]
    assert list(server.urls) == [coturn.url]
    expires, _, user = server.username.partition(":")
    assert user == reply.connection_id
    # The configured TTL (12 h by default), since the token expires sooner.
    assert before + TurnConfig.ttl_s <= int(expires) <= int(time.time()) + TurnConfig.ttl_s
    # coturn's formula: base64(HMAC-SHA1(secret, username)).
    digest = hmac.new(coturn.secret.encode(), server.username.encode(), hashlib.sha1).digest()
    assert server.credential == base64.b64encode(digest).decode()
    # And coturn takes it.
    await allocate(coturn, server.username, server.credential)


async def test_a_browser_gets_its_own_turn_credential_in_joined_ice_servers(
    coturn: TurnServer,
) -> None:
    """The signaling endpoint hands a browser the credential its Join minted, as the Mux SDK
    reads it (``joined.ice_servers``), and coturn takes it."""
    server = await start_server(
        web_config(turn=TurnConfig(urls=(coturn.url,), secret=coturn.secret))
    )
    admin = Admin(server.address)
    try:
        tenant = Tenant(await admin.create_key())
        space_id = await admin.create_space()
        sockets = []
        for _ in range(2):
            socket = await joined(server, tenant.token(space_id, f"p{len(sockets)}"))
            sockets.append(socket)
        credentials = []
        for socket in sockets:
            [entry] = [s for s in socket.received[0]["joined"]["ice_servers"] if s["username"]]
            assert entry["urls"] == [coturn.url]
            assert entry["credential_type"] == "password"
            expires, _, user = entry["username"].partition(":")
            assert user and int(expires) > time.time()
            digest = hmac.new(
                coturn.secret.encode(), entry["username"].encode(), hashlib.sha1
            ).digest()
            assert entry["credential"] == base64.b64encode(digest).decode()
            await allocate(coturn, entry["username"], entry["credential"])
            credentials.append(entry["username"])
        assert len(set(credentials)) == 2  # one of its own for each connection
        for socket in sockets:
            await socket.close()
    finally:
        await admin.close()
        await server.stop()


def test_a_credential_lasts_until_the_token_expires_when_that_is_later() -> None:
    config = TurnConfig(urls=("turn:t:3478",), secret="s", ttl_s=60)
    now = 1_000_000.0
    assert turn.expiry(config, now, token_expires_at=0) == 1_000_060
    assert turn.expiry(config, now, token_expires_at=1_500_000) == 1_500_000


async def test_coturn_refuses_a_wrong_or_expired_credential(coturn: TurnServer) -> None:
    good = turn.mint(coturn.secret, "alice", int(time.time()) + 600)
    await allocate(coturn, good.username, good.credential)  # the control: this one works
    wrong = turn.mint("not-the-secret", "alice", int(time.time()) + 600)
    expired = turn.mint(coturn.secret, "alice", int(time.time()) - 60)
    tampered = turn.mint(coturn.secret, "alice", int(time.time()) + 600)
    for username, password in (
        (wrong.username, wrong.credential),
        (expired.username, expired.credential),
        # The expiry is signed: moving it on invalidates the credential.
        (f"{int(time.time()) + 99999}:alice", tampered.credential),
    ):
        with pytest.raises(stun.TransactionFailed) as info:
            await allocate(coturn, username, password)
        assert info.value.response.attributes["ERROR-CODE"][0] == 401, username


async def relayed_call(server: SpacesServer) -> tuple[sdk.Space, sdk.Space]:
    admin = Admin(server.address)
    tenant = Tenant(await admin.create_key())
    space_id = await admin.create_space()
    await admin.close()
    publisher = sdk.Space(
        tenant.token(space_id, "alice", ttl=TOKEN_TTL_S),
        server.address,
        ice_transport_policy="relay",
    )
    viewer = sdk.Space(
        tenant.token(space_id, "bob", ttl=TOKEN_TTL_S),
        server.address,
        ice_transport_policy="relay",
    )
    await publisher.join()
    await publisher.local.publish(TestPatternTrack(COLOR), "camera")
    await viewer.join()
    track = await eventually(lambda: viewer.remote_track("alice", "camera"), timeout=20)
    await eventually(lambda: track.frames_received > 10, timeout=20)
    assert same_color(read_pattern(track.last_frame)[0], COLOR)
    return publisher, viewer


async def test_relay_only_clients_get_media_through_coturn(
    relay_server: SpacesServer, coturn: TurnServer
) -> None:
    publisher, viewer = await relayed_call(relay_server)
    try:
        # Both clients' media goes through relayed candidates (nothing else was gathered).
        for pc in (publisher._publisher_pc, viewer._subscriber_pc):
            pair = nominated(pc)
            assert pair is not None and pair.local_candidate.type == "relay"
            assert pair.local_candidate.port != 0
        # The node's side of each pair is its own host candidate: it needs no TURN.
        node = relay_server.media_node
        assert node is not None
        for session in node.sessions.values():
            for pc in (session._publisher_pc, session._subscriber_pc):
                if pc is not None and nominated(pc) is not None:
                    assert nominated(pc).local_candidate.type == "host"
        # coturn allocated for both connections, with the credentials Join minted for them.
        for space in (publisher, viewer):
            await eventually(
                lambda s=space: f":{s.connection_id}>" in coturn.log(), timeout=5, interval=0.2
            )
        # A channel binding (or a permission) for the node's address: the relay carried data.
        await eventually(
            lambda: re.search(r"(CHANNEL_BIND|CREATE_PERMISSION) processed, success", coturn.log()),
            timeout=5,
            interval=0.2,
        )
    finally:
        await viewer.leave()
        await publisher.leave()


async def test_a_media_node_in_relay_mode_relays_through_coturn_too(
    coturn: TurnServer,
) -> None:
    server = await turn_world(coturn, media="relay")
    try:
        publisher, viewer = await relayed_call(server)
        try:
            node = server.media_node
            assert node is not None
            pairs = [
                nominated(pc)
                for session in node.sessions.values()
                for pc in (session._publisher_pc, session._subscriber_pc)
                if pc is not None and nominated(pc) is not None
            ]
            assert pairs and all(p.local_candidate.type == "relay" for p in pairs)
        finally:
            await viewer.leave()
            await publisher.leave()
    finally:
        await server.stop()


def test_turn_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="together"):
        TurnConfig(urls=("turn:t:3478",))
    with pytest.raises(ValueError, match="must start with"):
        TurnConfig(urls=("http://t",), secret="s")
    with pytest.raises(ValueError, match="needs SPACES_TURN_URLS"):
        TurnConfig(media="relay")
    from spaces.config import ServerConfig

    config = ServerConfig.from_env(
        {
            "SPACES_TURN_URLS": "turn:turn.example.com:3478?transport=udp, "
            "turns:turn.example.com:5349?transport=tcp",
            "SPACES_TURN_SECRET": "s3cret",
            "SPACES_TURN_TTL_SECONDS": "3600",
            "SPACES_MEDIA_TURN": "on",
        }
    )
    assert config.turn == TurnConfig(
        urls=(
            "turn:turn.example.com:3478?transport=udp",
            "turns:turn.example.com:5349?transport=tcp",
        ),
        secret="s3cret",
        ttl_s=3600,
        media="on",
    )


def single_port(config: Any) -> Any:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return replace(config, node=replace(config.node, udp_port=port))


def node_pairs(server: SpacesServer) -> list[Any]:
    node = server.media_node
    assert node is not None
    return [
        nominated(pc)
        for session in node.sessions.values()
        for pc in (session._publisher_pc, session._subscriber_pc)
        if pc is not None and nominated(pc) is not None
    ]


async def test_relay_only_clients_reach_a_single_port_node_through_coturn(
    coturn: TurnServer,
) -> None:
    config = replace(make_config(), turn=TurnConfig(urls=(coturn.url,), secret=coturn.secret))
    server = await start_server(single_port(config))
    try:
        publisher, viewer = await relayed_call(server)
        try:
            node = server.media_node
            assert node is not None
            [mux] = node.udp_muxes
            for pc in (publisher._publisher_pc, viewer._subscriber_pc):
                assert nominated(pc).local_candidate.type == "relay"
            # The node's side is the shared port, reached from coturn's relay addresses.
            pairs = node_pairs(server)
            assert pairs
            for pair in pairs:
                assert isinstance(pair.protocol.transport, MuxLink)
                assert pair.local_candidate.port == mux.sockname[1]
                assert pair.remote_candidate.type in ("relay", "prflx")
            assert mux.addresses >= len(pairs)
        finally:
            await viewer.leave()
            await publisher.leave()
    finally:
        await server.stop()


async def test_a_single_port_node_in_turn_mode_gathers_its_port_and_a_relay(
    coturn: TurnServer,
) -> None:
    config = replace(
        make_config(), turn=TurnConfig(urls=(coturn.url,), secret=coturn.secret, media="on")
    )
    server = await start_server(single_port(config))
    try:
        publisher, viewer = await relayed_call(server)
        try:
            node = server.media_node
            assert node is not None
            [mux] = node.udp_muxes
            for session in node.sessions.values():
                pc = session._publisher_pc or session._subscriber_pc
                assert pc is not None
                kinds = {
                    (line.split()[7], int(line.split()[5]))
                    for line in pc.localDescription.sdp.splitlines()
                    if line.startswith("a=candidate:")
                }
                assert ("host", mux.sockname[1]) in kinds
                assert any(kind == "relay" for kind, _ in kinds)
            assert all(p.local_candidate.type in ("host", "relay") for p in node_pairs(server))
        finally:
            await viewer.leave()
            await publisher.leave()
    finally:
        await server.stop()
