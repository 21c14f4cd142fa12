"""Races between a session's end and whatever else is in flight for it: a reconnect being set
up, a subscriber offer awaiting its answer, a resume while the old connection lingers, a drain
while a session is being admitted. Real server, real aiortc clients over loopback; each test
forces its interleaving at one point, so it fails the same way every time the code regresses."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from spaces.media import session as media_session
from spaces.sdk import client as sdk
from spaces.sdk.media import TestPatternTrack
from spaces.server import SpacesServer
from spaces.session import events as ev
from spaces.tasks import spawn
from spaces.v1 import media_pb2, media_pb2_grpc, participant_pb2, presence_pb2
from tests.support.system import Tenant, eventually

MOVE = ev.CLOSE_MIGRATE


def node_of(server: SpacesServer) -> Any:
    assert server.media_node is not None
    return server.media_node


def events_of(stream: sdk.EventStream) -> list[sdk.SpaceEvent]:
    out = []
    while (event := stream.get_nowait()) is not None:
        out.append(event)
    return out


async def publisher(
    server: SpacesServer, tenant: Tenant, space_id: str, pid: str
) -> tuple[sdk.Space, sdk.EventStream]:
    space = sdk.Space(
        tenant.token(space_id, pid), server.address, reconnect_backoff=(0.1,) * 5, decode=False
    )
    events = space.events()
    await space.join()
    await space.local.publish(TestPatternTrack((10, 200, 10), fps=15), "camera")
    return space, events


async def flowing(viewer: sdk.Space, pid: str) -> None:
    track = await eventually(lambda: viewer.remote_track(pid, "camera"), timeout=10)
    seen = track.packets_received
    await eventually(lambda: track.packets_received > seen + 10, timeout=10)


async def test_a_session_that_ends_while_a_reconnect_sets_it_up_is_joined_again(
    world: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _, tenant, space_id = world
    node = node_of(server)
    viewer = sdk.Space(tenant.token(space_id, "viewer"), server.address, decode=False)
    await viewer.join()
    mover, events = await publisher(server, tenant, space_id, "mover")
    await flowing(viewer, "mover")
    joined_event = media_session.Session.joined_event

    def joined_then_moved_again(self: media_session.Session) -> ev.Joined:
        # Once: the new session is told to move on right after it is admitted, while the SDK
        # is still publishing its tracks again on it.
        monkeypatch.setattr(media_session.Session, "joined_event", joined_event)
        asyncio.get_running_loop().call_soon(lambda: spawn(self.close(MOVE, "moved again")))
        return joined_event(self)

    monkeypatch.setattr(media_session.Session, "joined_event", joined_then_moved_again)
    await node.sessions[mover.connection_id].close(MOVE, "moved")
    await eventually(lambda: mover.state == "joined" and mover.reconnects >= 1, timeout=10)
    await flowing(viewer, "mover")
    assert [s.participant_id for s in node.sessions.values()].count("mover") == 1
    assert any(isinstance(e, sdk.Reconnected) for e in events_of(events))
    await mover.leave()
    await viewer.leave()


async def test_removed_while_a_reconnect_publishes_again_stays_removed(
    world: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _, tenant, space_id = world
    node = node_of(server)
    mover, events = await publisher(server, tenant, space_id, "mover")
    publish = media_session.Session._publish

    async def removed_instead(self: media_session.Session, event: Any) -> None:
        # Once: an admin's RemoveParticipant lands while the reconnect's offer is answered.
        monkeypatch.setattr(media_session.Session, "_publish", publish)
        await self.close(ev.CLOSE_REMOVED, "removed", "removed")

    monkeypatch.setattr(media_session.Session, "_publish", removed_instead)
    await node.sessions[mover.connection_id].close(MOVE, "moved")
    await eventually(lambda: mover.state == "closed", timeout=10)
    await asyncio.sleep(1.0)  # ten reconnect backoffs: it must not join again on its own
    assert mover.state == "closed"
    seen = events_of(events)
    assert [e.reason for e in seen if isinstance(e, sdk.Disconnected)] == ["removed"]
    last_disconnect = max(i for i, e in enumerate(seen) if isinstance(e, sdk.Disconnected))
    assert not any(isinstance(e, sdk.Reconnected) for e in seen[last_disconnect:])
    assert "mover" not in [s.participant_id for s in node.sessions.values()]
    await mover.leave()


class CountingEvent(asyncio.Event):
    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    async def wait(self) -> bool:  # type: ignore[override]
        self.waits += 1
        return await super().wait()


async def test_changes_while_an_offer_awaits_its_answer_do_not_spin_the_negotiator(
    world: tuple,
) -> None:
    server, _, tenant, space_id = world
    node = node_of(server)
    slow = sdk.Space(tenant.token(space_id, "slow"), server.address, decode=False)
    await slow.join()
    answer_offer = slow._on_subscriber_offer

    async def answer_late(offer: media_pb2.SubscriberOffer) -> None:
        await asyncio.sleep(1.5)  # a slow client, a long round trip
        await answer_offer(offer)

    slow._on_subscriber_offer = answer_late  # type: ignore[method-assign]
    alice, _ = await publisher(server, tenant, space_id, "alice")
    session = node.sessions[slow.connection_id]
    await eventually(lambda: session._awaiting_version is not None, timeout=5)
    # Something changes meanwhile (a reconcile, a track dropped): the negotiator is woken.
    previous, counting = session._wake, CountingEvent()
    session._wake = counting
    counting.set()
    previous.set()
    await asyncio.sleep(0.5)
    assert counting.waits <= 2, f"the negotiator looped {counting.waits} times in 0.5 s"
    # The answer still arrives and media flows.
    await flowing(slow, "alice")
    await alice.leave()
    await slow.leave()


async def test_a_resumed_participant_never_sees_its_own_earlier_connection(
    world: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, admin, tenant, space_id = world
    node = node_of(server)
    token = tenant.token(space_id, "alice")
    alice = sdk.Space(token, server.address, decode=False)
    alice_events = alice.events()
    await alice.join()

    async def kick_lost(command: Any) -> None:
        """The node never hears the presence service's kick for the old connection."""

    monkeypatch.setattr(node, "apply_command", kick_lost)
    reply = await admin.presence.Join(
        presence_pb2.JoinRequest(token=token, resume_secret=alice._resume_secret)
    )
    assert reply.resumed
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = media_pb2_grpc.MediaServiceStub(channel).Session()
        await call.write(media_pb2.ClientMessage(hello=media_pb2.Hello(ticket=reply.ticket)))
        first = await call.read()
        assert first.WhichOneof("message") == "joined"
        assert [p.participant_id for p in first.joined.participants] == []
        # The earlier connection is closed by the node itself, as replaced.
        await eventually(lambda: alice.state == "closed", timeout=5)
        assert [e.reason for e in events_of(alice_events) if isinstance(e, sdk.Disconnected)] == [
            "replaced"
        ]
        room = node.rooms[space_id]
        assert [s.connection_id for s in room.sessions.values()] == [reply.connection_id]
        call.cancel()
    await alice.leave()


async def test_a_drain_that_starts_while_a_session_is_admitted_sends_it_elsewhere(
    world: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, admin, tenant, space_id = world
    node = node_of(server)
    claim, gate = node.store.claim, asyncio.Event()
    claiming = asyncio.Event()

    async def slow_claim(*args: Any, **kwargs: Any) -> Any:
        claiming.set()
        await gate.wait()
        return await claim(*args, **kwargs)

    monkeypatch.setattr(node.store, "claim", slow_claim)
    reply = await admin.presence.Join(
        presence_pb2.JoinRequest(token=tenant.token(space_id, "late"))
    )
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = media_pb2_grpc.MediaServiceStub(channel).Session()
        await call.write(media_pb2.ClientMessage(hello=media_pb2.Hello(ticket=reply.ticket)))
        await claiming.wait()
        await node.drain(grace_s=0)  # no session yet: done at once
        gate.set()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in (info.value.details() or "")
    assert node.sessions == {} and node.rooms == {}
    people = await admin.participants(space_id)
    assert not [p for p in people if p.state == participant_pb2.PARTICIPANT_STATE_CONNECTED]


async def test_a_track_published_while_a_reconnect_tears_down_is_published_after_it(
    world: tuple,
) -> None:
    server, _, tenant, space_id = world
    node = node_of(server)
    viewer = sdk.Space(tenant.token(space_id, "viewer"), server.address, decode=False)
    await viewer.join()
    mover = sdk.Space(tenant.token(space_id, "mover"), server.address, reconnect_backoff=(0.1,) * 5)
    await mover.join()
    new_pc = mover._new_pc
    hooked: list[bool] = []

    def moved_while_offering() -> Any:
        pc = new_pc()
        if hooked:
            return pc
        hooked.append(True)
        set_local = pc.setLocalDescription

        async def move_first(description: Any) -> None:
            # The node moves the session just as the first publish offer is being made; the
            # reconnect tears down this very peer connection.
            await node.sessions[mover.connection_id].close(MOVE, "moved")
            await eventually(lambda: mover._publisher_pc is None, timeout=5)
            await set_local(description)

        pc.setLocalDescription = move_first
        return pc

    mover._new_pc = moved_while_offering  # type: ignore[method-assign]
    local = await mover.local.publish(TestPatternTrack((200, 200, 10), fps=15), "camera")
    assert local in mover.local.tracks
    await eventually(lambda: mover.state == "joined" and mover.reconnects == 1, timeout=10)
    await flowing(viewer, "mover")
    await mover.leave()
    await viewer.leave()


async def test_an_answer_sent_as_the_session_is_torn_down_leaves_no_receiver_behind(
    world: tuple,
) -> None:
    """A reconnect's teardown can complete while a subscriber answer is being written; the
    offer's tracks must not be wired to the connection just closed (a stale drain on a mid
    would keep the next connection's track on that mid from ever being read)."""
    server, _, tenant, space_id = world
    alice, _ = await publisher(server, tenant, space_id, "alice")
    viewer = sdk.Space(tenant.token(space_id, "viewer"), server.address, decode=False)
    write = viewer._write
    torn_down: list[bool] = []
    teardowns: list[asyncio.Future[None]] = []

    async def write_then_torn_down(message: media_pb2.ClientMessage) -> None:
        await write(message)
        if message.WhichOneof("message") == "subscriber_answer" and not torn_down:
            torn_down.append(True)
            # The reconnect task tears down; this handler resumes before its cancellation.
            teardowns.append(asyncio.ensure_future(viewer._teardown()))
            await asyncio.sleep(0)

    viewer._write = write_then_torn_down  # type: ignore[method-assign]
    await viewer.join()
    await eventually(lambda: torn_down, timeout=10)
    await asyncio.gather(*teardowns)
    await asyncio.sleep(0.2)
    assert viewer._drains == {} and viewer._mid_owner == {}
    await viewer.leave()
    await alice.leave()
