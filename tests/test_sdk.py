"""The Python SDK's session handling against a scripted server: a real gRPC server on port 0
that plays presence and media node, and a real aiortc offer, so that the order of events on the
wire is exactly the one under test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from aiortc import RTCPeerConnection

from spaces.media.aiortc_adapter import IcePolicy, apply_ice_policy
from spaces.sdk import client as sdk
from spaces.v1 import media_pb2, media_pb2_grpc, presence_pb2, presence_pb2_grpc
from tests.support.system import eventually


class ScriptedNode(presence_pb2_grpc.PresenceServiceServicer, media_pb2_grpc.MediaServiceServicer):
    """Join always succeeds; every session gets Joined, then an offer to subscribe to one video
    track, then at once the given Closing, and the stream ends: the node goes away while the
    client is still answering the offer."""

    def __init__(self, closing: media_pb2.Closing) -> None:
        self.closing = closing
        self.address = ""
        self.joins = 0
        self.sessions = 0
        self._pcs: list[RTCPeerConnection] = []

    async def Join(
        self, request: presence_pb2.JoinRequest, context: grpc.aio.ServicerContext
    ) -> presence_pb2.JoinResponse:
        self.joins += 1
        return presence_pb2.JoinResponse(
            space_id="space",
            participant_id="bob",
            connection_id=f"conn-{self.joins}",
            media_address=self.address,
            node_id="scripted",
            ticket="ticket",
        )

    async def Session(
        self,
        request_iterator: AsyncIterator[media_pb2.ClientMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[media_pb2.ServerMessage]:
        self.sessions += 1
        await anext(request_iterator)  # hello
        alice = media_pb2.RemoteParticipant(
            participant_id="alice",
            connection_id="conn-alice",
            tracks=[
                media_pb2.Track(
                    id="track-1",
                    kind=media_pb2.TRACK_KIND_VIDEO,
                    source=media_pb2.TRACK_SOURCE_CAMERA,
                )
            ],
        )
        yield media_pb2.ServerMessage(
            joined=media_pb2.Joined(
                space_id="space",
                participant_id="bob",
                connection_id=f"conn-{self.joins}",
                node_id="scripted",
                participants=[alice],
            )
        )
        pc = RTCPeerConnection()
        self._pcs.append(pc)
        transceiver = pc.addTransceiver("video", direction="sendonly")
        apply_ice_policy(pc, IcePolicy(bind_addresses=("127.0.0.1",)))
        await pc.setLocalDescription(await pc.createOffer())
        yield media_pb2.ServerMessage(
            subscriber_offer=media_pb2.SubscriberOffer(
                offer=media_pb2.SessionDescription(type="offer", sdp=pc.localDescription.sdp),
                tracks=[
                    media_pb2.SubscribedTrack(
                        mid=transceiver.mid or "0",
                        participant_id="alice",
                        track_id="track-1",
                        kind=media_pb2.TRACK_KIND_VIDEO,
                    )
                ],
                version=1,
            )
        )
        yield media_pb2.ServerMessage(closing=self.closing)

    async def close(self) -> None:
        for pc in self._pcs:
            await pc.close()


@pytest.fixture
async def scripted(request: pytest.FixtureRequest) -> AsyncIterator[ScriptedNode]:
    node = ScriptedNode(request.param)
    server = grpc.aio.server()
    presence_pb2_grpc.add_PresenceServiceServicer_to_server(node, server)
    media_pb2_grpc.add_MediaServiceServicer_to_server(node, server)
    port = server.add_insecure_port("127.0.0.1:0")
    node.address = f"127.0.0.1:{port}"
    await server.start()
    yield node
    await server.stop(None)
    await node.close()


KICKED = media_pb2.Closing(reason=media_pb2.CLOSE_REASON_REMOVED, message="removed by admin")
MIGRATE = media_pb2.Closing(reason=media_pb2.CLOSE_REASON_MIGRATE, message="drain", rejoin=True)


@pytest.mark.parametrize("scripted", [KICKED], indirect=True)
async def test_a_final_closing_during_an_offer_ends_the_session_without_rejoining(
    scripted: ScriptedNode,
) -> None:
    space = sdk.Space("token", scripted.address, ice_addresses=["127.0.0.1"], decode=False)
    events = space.events()
    await space.join()
    await eventually(lambda: space.state == "closed", timeout=5)
    seen = []
    while (event := events.get_nowait()) is not None:
        seen.append(event)
    assert [e.reason for e in seen if isinstance(e, sdk.Disconnected)] == ["removed"]
    assert not any(isinstance(e, sdk.Reconnecting) for e in seen)
    await asyncio.sleep(0.3)
    assert scripted.joins == 1 and scripted.sessions == 1
    # leave() after the session ended on its own still releases the connections.
    channels = [space._presence_channel, space._media_channel]
    await space.leave()
    assert [c.get_state() for c in channels if c is not None] == [
        grpc.ChannelConnectivity.SHUTDOWN
    ] * 2


@pytest.mark.parametrize("scripted", [MIGRATE], indirect=True)
async def test_a_migrate_closing_during_an_offer_rejoins_and_says_why(
    scripted: ScriptedNode,
) -> None:
    space = sdk.Space(
        "token",
        scripted.address,
        ice_addresses=["127.0.0.1"],
        decode=False,
        reconnect_attempts=1,
        reconnect_backoff=[0.05],
    )
    events = space.events()
    await space.join()
    await eventually(lambda: scripted.joins >= 2, timeout=5)
    await space.leave()
    seen = []
    while (event := events.get_nowait()) is not None:
        seen.append(event)
    reconnecting = [e.reason for e in seen if isinstance(e, sdk.Reconnecting)]
    assert reconnecting[:1] == ["migrate"], seen
