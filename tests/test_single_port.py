"""Single-port mode (SPACES_MEDIA_UDP_PORT): every peer connection of a media node shares one
UDP socket, demultiplexed by remote address and, for a new address, by the STUN USERNAME's
local ufrag. Real aiortc peers over loopback, a real server, real sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aioice.ice
import pytest
from aioice import stun
from aiortc import RTCPeerConnection
from prometheus_client import REGISTRY

from spaces.config import NodeConfig, ServerConfig
from spaces.media import udp_mux
from spaces.media.aiortc_adapter import IcePolicy, apply_ice_policy
from spaces.media.udp_mux import MuxLink, UdpMux, stun_binding_ufrag
from spaces.sdk import client as sdk
from spaces.sdk.media import TestPatternTrack, read_pattern, same_color
from spaces.server import SpacesServer
from tests.support.system import Admin, Tenant, eventually, make_config, start_server

RED = (220, 40, 40)
BLUE = (40, 60, 220)
LOOPBACK = IcePolicy(bind_addresses=("127.0.0.1",))


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_candidates(pc: RTCPeerConnection) -> list[tuple[str, int]]:
    found = []
    for line in pc.localDescription.sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            found.append((parts[4], int(parts[5])))
    return found


def ice_connection(pc: RTCPeerConnection) -> Any:
    return next(iter(pc._RTCPeerConnection__iceTransports))._connection  # type: ignore[attr-defined]


def nominated(pc: RTCPeerConnection) -> Any:
    return ice_connection(pc)._nominated.get(1)


def node_pcs(server: SpacesServer) -> list[RTCPeerConnection]:
    node = server.media_node
    assert node is not None
    return [
        pc
        for session in node.sessions.values()
        for pc in (session._publisher_pc, session._subscriber_pc)
        if pc is not None
    ]


def dropped(reason: str) -> float:
    value = REGISTRY.get_sample_value("spaces_udp_mux_dropped_datagrams_total", {"reason": reason})
    return value or 0.0


def single_port_config(port: int, **node: Any) -> ServerConfig:
    config = make_config()
    return replace(config, node=replace(config.node, udp_port=port, **node))


@pytest.fixture
async def server() -> AsyncIterator[SpacesServer]:
    srv = await start_server(single_port_config(free_udp_port()))
    yield srv
    await srv.stop()


def the_mux(server: SpacesServer) -> UdpMux:
    node = server.media_node
    assert node is not None
    [mux] = node.udp_muxes
    return mux


async def call(server: SpacesServer, *, decode: bool = True) -> tuple[sdk.Space, sdk.Space]:
    """alice publishes red, bob blue; each sees the other's color (or, without decoding,
    receives the other's RTP packets)."""
    admin = Admin(server.address)
    tenant = Tenant(await admin.create_key())
    space_id = await admin.create_space()
    await admin.close()
    alice = sdk.Space(tenant.token(space_id, "alice"), server.address, decode=decode)
    bob = sdk.Space(tenant.token(space_id, "bob"), server.address, decode=decode)
    await alice.join()
    await bob.join()
    await alice.local.publish(TestPatternTrack(RED), "camera")
    await bob.local.publish(TestPatternTrack(BLUE), "camera")
    for viewer, other, color in ((bob, "alice", RED), (alice, "bob", BLUE)):
        track = await eventually(lambda v=viewer, o=other: v.remote_track(o, "camera"), timeout=20)
        if decode:
            await eventually(lambda t=track: t.frames_received > 5, timeout=20)
            assert same_color(read_pattern(track.last_frame)[0], color)
        else:
            await eventually(lambda t=track: t.packets_received > 20, timeout=20)
    return alice, bob


async def frames_keep_coming(track: sdk.RemoteTrack, color: tuple[int, int, int]) -> None:
    before = track.frames_received
    await eventually(lambda: track.frames_received > before + 10, timeout=10)
    assert same_color(read_pattern(track.last_frame)[0], color)


async def packets_keep_coming(track: sdk.RemoteTrack) -> None:
    before = track.packets_received
    await eventually(lambda: track.packets_received > before + 30, timeout=10)


# --- the demultiplexer's STUN reading ------------------------------------------------------


def binding_request(username: str | None, password: str | None = None) -> bytes:
    message = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    if username is not None:
        message.attributes["USERNAME"] = username
    message.attributes["PRIORITY"] = 1
    if password is not None:
        message.add_message_integrity(password.encode())
    message.add_fingerprint()
    return bytes(message)


def test_the_local_ufrag_is_read_from_a_binding_request_and_nothing_else() -> None:
    assert stun_binding_ufrag(binding_request("abcd:wxyz", "pw")) == "abcd"
    assert stun_binding_ufrag(binding_request(None)) == ""
    response = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE)
    response.attributes["USERNAME"] = "abcd:wxyz"
    assert stun_binding_ufrag(bytes(response)) is None
    request = binding_request("abcd:wxyz", "pw")
    assert stun_binding_ufrag(request[:-4]) is None  # length field no longer matches
    assert stun_binding_ufrag(request[:19]) is None
    # An attribute that claims more bytes than the datagram has.
    broken = bytearray(request)
    struct.pack_into("!H", broken, 22, 0xFFF0)
    assert stun_binding_ufrag(bytes(broken)) is None
    assert stun_binding_ufrag(b"\x80" + request[1:]) is None  # RTP's first byte
    assert stun_binding_ufrag(os.urandom(200)[:0]) is None


# --- two aiortc peer connections, one of them behind the mux ----------------------------------


async def connect(pc1: RTCPeerConnection, pc2: RTCPeerConnection) -> None:
    await pc1.setLocalDescription(await pc1.createOffer())
    await pc2.setRemoteDescription(pc1.localDescription)
    apply_ice_policy(pc2, LOOPBACK)
    await pc2.setLocalDescription(await pc2.createAnswer())
    await pc1.setRemoteDescription(pc2.localDescription)
    await eventually(
        lambda: pc1.connectionState == "connected" and pc2.connectionState == "connected",
        timeout=15,
    )


async def test_an_endpoint_whose_ufrag_is_taken_gets_another_before_its_offer() -> None:
    mux = await UdpMux.bind("127.0.0.1", 0)
    try:
        pc1, pc2 = RTCPeerConnection(), RTCPeerConnection()
        channel = pc1.createDataChannel("x")
        apply_ice_policy(pc1, IcePolicy(muxes=(mux,)))
        # Someone already has the ufrag this connection was made with.
        taken = ice_connection(pc1).local_username

        class Squatter:
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                raise AssertionError("the squatter got a datagram")

            def connection_lost(self, exc: Exception | None) -> None:
                pass

            def accepts(self, data: bytes, addr: tuple[str, int]) -> bool:
                return False

        squatter = mux.register(taken, Squatter())
        received: list[str] = []
        pc2.on("datachannel", lambda ch: ch.on("message", received.append))
        await connect(pc1, pc2)
        ufrag = ice_connection(pc1).local_username
        assert ufrag != taken and len(ufrag) == 16
        assert f"a=ice-ufrag:{ufrag}" in pc1.localDescription.sdp
        assert local_candidates(pc1) == [mux.sockname]
        await eventually(lambda: channel.readyState == "open")
        channel.send("through the mux")
        await eventually(lambda: received == ["through the mux"])
        assert mux.endpoints == 2
        await pc1.close()
        await pc2.close()
        squatter.close()
        await eventually(lambda: mux.endpoints == 0 and mux.addresses == 0)
    finally:
        mux.close()


# --- a media node in single-port mode -------------------------------------------------------


async def test_two_peers_behind_one_port_exchange_media(server: SpacesServer) -> None:
    mux = the_mux(server)
    alice, bob = await call(server)
    try:
        pcs = node_pcs(server)
        assert len(pcs) == 4  # a publisher and a subscriber connection each
        for pc in pcs:
            assert local_candidates(pc) == [("127.0.0.1", server.config.node.udp_port)]
            # Nothing but the shared socket carries this connection.
            assert isinstance(nominated(pc).protocol.transport, MuxLink)
            assert nominated(pc).protocol.transport.mux is mux
        assert mux.endpoints == 4
        # Four client sockets, each routed to its own connection.
        remotes = {nominated(pc).remote_addr for pc in pcs}
        assert len(remotes) == 4 and mux.addresses >= 4
    finally:
        await alice.leave()
        await bob.leave()


async def test_garbage_on_the_port_is_dropped_and_counted_while_media_flows(
    server: SpacesServer,
) -> None:
    mux = the_mux(server)
    alice, bob = await call(server)
    try:
        endpoints, addresses = mux.endpoints, mux.addresses
        before = {reason: dropped(reason) for reason in ("unknown_address", "unknown_ufrag")}
        before.update({r: dropped(r) for r in ("malformed_stun", "unauthenticated", "empty")})
        known_ufrag = ice_connection(node_pcs(server)[0]).local_username
        rtp_like = b"\x80\x60" + os.urandom(10) + os.urandom(1000)
        stun_header_only = struct.pack("!HHI12s", 1, 40, 0x2112A442, os.urandom(12))
        garbage = {
            "unknown_address": [rtp_like, b"\x17\xfe\xfd" + os.urandom(60)]
            + [bytes([4 + i % 250]) + os.urandom(i) for i in range(100)],
            "unknown_ufrag": [binding_request("nobody:here", "pw") for _ in range(20)],
            "malformed_stun": [stun_header_only] * 20,
            # A ufrag seen on the wire, without the endpoint's password.
            "unauthenticated": [binding_request(f"{known_ufrag}:xxxx", "wrong") for _ in range(20)]
            + [binding_request(f"{known_ufrag}:xxxx") for _ in range(5)],
            "empty": [b""] * 3,
        }
        attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        attacker.bind(("127.0.0.1", 0))
        attacker.settimeout(0.5)
        try:
            for datagrams in garbage.values():
                for datagram in datagrams:
                    attacker.sendto(datagram, mux.sockname)
                    await asyncio.sleep(0)
            total = sum(len(datagrams) for datagrams in garbage.values())
            await eventually(lambda: sum(dropped(r) - before[r] for r in garbage) >= total)
            for reason, datagrams in garbage.items():
                assert dropped(reason) == before[reason] + len(datagrams), reason
            # Nobody answered the attacker, and it got no route.
            with pytest.raises(TimeoutError):
                attacker.recvfrom(2048)
        finally:
            attacker.close()
        assert (mux.endpoints, mux.addresses) == (endpoints, addresses)
        # Everybody's media goes on.
        await frames_keep_coming(bob.remote_track("alice", "camera"), RED)
        await frames_keep_coming(alice.remote_track("bob", "camera"), BLUE)
        assert len(server.media_node.sessions) == 2  # type: ignore[union-attr]
    finally:
        await alice.leave()
        await bob.leave()


async def rebind(pc: RTCPeerConnection) -> tuple[tuple[str, int], tuple[str, int]]:
    """Move a client connection to a new local port, as a NAT rebinding does: from now on its
    datagrams come from another address, and what is sent to the old one is lost."""
    protocol = nominated(pc).protocol
    old = protocol.transport
    old_addr = old.get_extra_info("sockname")
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: protocol, local_addr=("127.0.0.1", 0))
    old.set_protocol(asyncio.DatagramProtocol())  # the old socket goes, the endpoint stays
    old.close()
    return old_addr, protocol.transport.get_extra_info("sockname")


async def test_a_peer_whose_address_changes_keeps_media_and_consent(
    server: SpacesServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Consent every second, so that it would expire within 6 s of the move if it were not
    # followed (aioice gives up after CONSENT_FAILURES unanswered checks).
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 1)
    # RTP is counted, not decoded: how fast a decoder recovers from the packets lost in the
    # move is the client's business; that the node's media reaches the new address is ours.
    alice, bob = await call(server, decode=False)
    try:
        node = server.media_node
        assert node is not None
        session = {s.participant_id: s for s in node.sessions.values()}
        from_alice = bob.remote_track("alice", "camera")
        from_bob = alice.remote_track("bob", "camera")
        assert from_alice is not None and from_bob is not None
        # The node is the controlling ICE agent of bob's subscriber connection (it offers)
        # and the controlled one of alice's publisher connection (she offers): both follow.
        moves = [
            (bob._subscriber_pc, session["bob"]._subscriber_pc, from_alice),
            (alice._publisher_pc, session["alice"]._publisher_pc, from_alice),
            (alice._subscriber_pc, session["alice"]._subscriber_pc, from_bob),
        ]
        # Let the consent loops start with the short interval.
        await asyncio.sleep(6)
        for client_pc, node_pc, track in moves:
            old, new = await rebind(client_pc)
            assert nominated(node_pc).remote_addr == old
            await eventually(lambda p=node_pc, n=new: nominated(p).remote_addr == n, timeout=8)
            await packets_keep_coming(track)
        # Well past the point where consent to the old addresses would have expired.
        # (Each unanswered check: its interval, at most 1.2 times the nominal, then one RTO.)
        await asyncio.sleep(aioice.ice.CONSENT_FAILURES * (1.2 + stun.RETRY_RTO) + 2)
        for client_pc, node_pc, _ in moves:
            assert node_pc.connectionState == "connected"
            assert nominated(client_pc).remote_addr == the_mux(server).sockname
        assert {s.participant_id for s in node.sessions.values()} == {"alice", "bob"}
        await packets_keep_coming(from_alice)
        await packets_keep_coming(from_bob)
    finally:
        await alice.leave()
        await bob.leave()


async def test_mux_entries_are_removed_when_peers_close(server: SpacesServer) -> None:
    mux = the_mux(server)
    for _ in range(3):
        alice, bob = await call(server)
        assert mux.endpoints == 4
        await alice.leave()
        await bob.leave()
        await eventually(lambda: server.media_node.sessions == {}, timeout=10)  # type: ignore[union-attr]
        await eventually(lambda: (mux.endpoints, mux.addresses) == (0, 0), timeout=10)
    assert REGISTRY.get_sample_value("spaces_udp_mux_endpoints") == 0


async def test_candidates_announce_the_advertised_address_and_port() -> None:
    port = free_udp_port()
    srv = await start_server(
        single_port_config(port, ice_advertise_ip="127.0.0.9", udp_advertise_port=30478)
    )
    try:
        admin = Admin(srv.address)
        tenant = Tenant(await admin.create_key())
        space_id = await admin.create_space()
        await admin.close()
        alice = sdk.Space(tenant.token(space_id, "alice"), srv.address)
        await alice.join()
        # The client cannot reach 127.0.0.9:30478 (nothing maps it here): look at the offer.
        task = asyncio.ensure_future(alice.local.publish(TestPatternTrack(RED), "camera"))
        await eventually(lambda: node_pcs(srv) and node_pcs(srv)[0].localDescription, timeout=10)
        assert local_candidates(node_pcs(srv)[0]) == [("127.0.0.9", 30478)]
        assert the_mux(srv).sockname == ("127.0.0.1", port)
        task.cancel()
        await alice.leave()
    finally:
        await srv.stop()


def test_single_port_settings_are_read_and_checked() -> None:
    config = ServerConfig.from_env(
        {"SPACES_MEDIA_UDP_PORT": "3478", "SPACES_MEDIA_UDP_ADVERTISE_PORT": "30478"}
    )
    assert (config.node.udp_port, config.node.udp_advertise_port) == (3478, 30478)
    assert ServerConfig.from_env({}).node.udp_port == 0
    with pytest.raises(ValueError, match="not both"):
        ServerConfig.from_env(
            {"SPACES_MEDIA_UDP_PORT": "3478", "SPACES_UDP_PORT_RANGE": "50000-60000"}
        )
    with pytest.raises(ValueError, match="UDP port number"):
        ServerConfig.from_env({"SPACES_MEDIA_UDP_PORT": "70000"})
    with pytest.raises(ValueError, match="UDP port number"):
        ServerConfig.from_env({"SPACES_MEDIA_UDP_PORT": "three"})
    with pytest.raises(ValueError, match="needs SPACES_MEDIA_UDP_PORT"):
        NodeConfig(udp_advertise_port=30478)


async def test_a_taken_port_stops_the_node_from_starting_with_a_clear_error() -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    try:
        srv = SpacesServer(single_port_config(port))
        with pytest.raises(OSError, match=f"media UDP port {port}"):
            await srv.start()
        await srv.stop()
    finally:
        holder.close()


class Recorder:
    """An endpoint that takes every request (the mux-level tests need no ICE)."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.lost = False

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append((data, addr))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def accepts(self, data: bytes, addr: tuple[str, int]) -> bool:
        return True


async def test_one_endpoint_keeps_at_most_a_bounded_number_of_addresses() -> None:
    mux = await UdpMux.bind("127.0.0.1", 0)
    senders = []
    try:
        recorder = Recorder()
        link = mux.register("abcd", recorder)
        for _ in range(udp_mux.MAX_ADDRESSES_PER_ENDPOINT + 8):
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sender.bind(("127.0.0.1", 0))
            senders.append(sender)
            sender.sendto(binding_request("abcd:efgh", "pw"), mux.sockname)
        await eventually(lambda: len(recorder.received) == len(senders))
        assert mux.addresses == udp_mux.MAX_ADDRESSES_PER_ENDPOINT
        # The most recent addresses are the ones kept.
        newest = senders[-1].getsockname()
        assert link.last_heard(newest) is not None
        assert link.last_heard(senders[0].getsockname()) is None
        link.close()
        await eventually(lambda: recorder.lost)
        assert (mux.endpoints, mux.addresses) == (0, 0)
    finally:
        for sender in senders:
            sender.close()
        mux.close()


async def test_the_mux_dispatch_is_a_plain_entry_point_for_a_native_plane() -> None:
    """A native plane reads the socket itself (``fileno``) and hands back what it does not own
    as ``datagram_received(data, addr)``: the same routing, without asyncio's reader."""
    mux = await UdpMux.bind("127.0.0.1", 0)
    try:
        assert mux.fileno() == mux.raw_socket.fileno()  # type: ignore[union-attr]
        recorder = Recorder()
        link = mux.register("abcd", recorder)
        peer = ("192.0.2.7", 40000)
        mux.datagram_received(b"\x80\x60" + bytes(30), peer)
        assert mux.dropped["unknown_address"] == 1 and recorder.received == []
        request = binding_request("abcd:efgh", "pw")
        mux.datagram_received(request, peer)
        mux.datagram_received(b"\x80\x60" + bytes(30), peer)
        # An IPv6 socket's four-tuple is routed by host and port.
        mux.datagram_received(b"\x90\x60" + bytes(30), (*peer, 0, 0))
        assert [addr for _, addr in recorder.received] == [peer] * 3
        assert link.last_heard(peer) is not None
    finally:
        mux.close()


async def test_a_burst_queued_on_the_shared_socket_is_read_in_one_go() -> None:
    """asyncio reads a datagram socket one datagram per event-loop iteration: behind one socket
    for every peer connection, that let a busy node's queue grow until consent checks timed out
    behind media. The mux reads what is queued (up to READ_BATCH) when the socket is ready."""
    mux = await UdpMux.bind("127.0.0.1", 0)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        recorder = Recorder()
        mux.register("abcd", recorder)
        sender.bind(("127.0.0.1", 0))
        sender.sendto(binding_request("abcd:efgh", "pw"), mux.sockname)
        await eventually(lambda: len(recorder.received) == 1)
        burst = udp_mux.READ_BATCH + 10
        for i in range(burst):
            sender.sendto(b"\x80\x60" + i.to_bytes(2, "big") + bytes(28), mux.sockname)
        # Loopback queues each datagram on the mux's socket before sendto returns. The first
        # yield lets the loop poll the socket and run its reader after this task; the second
        # comes back after it.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(recorder.received) == 1 + udp_mux.READ_BATCH
        await eventually(lambda: len(recorder.received) == 1 + burst)
        sequence = [int.from_bytes(data[2:4], "big") for data, _ in recorder.received[1:]]
        assert sequence == list(range(burst))
        # Garbage is read in batches too, and each datagram counted.
        before = mux.dropped[udp_mux.DROP_UNKNOWN_ADDRESS]
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            stranger.bind(("127.0.0.1", 0))
            for _ in range(20):
                stranger.sendto(b"\x80" + bytes(20), mux.sockname)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert mux.dropped[udp_mux.DROP_UNKNOWN_ADDRESS] == before + 20
        finally:
            stranger.close()
    finally:
        sender.close()
        mux.close()
