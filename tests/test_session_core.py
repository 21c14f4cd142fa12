"""The media session core driven in memory: events in, events out, no gRPC, no WebSocket, no
sockets at all. The host is the embedded memory store (a product feature), with a minimal host
standing in for the media node."""

from __future__ import annotations

import ast
import asyncio
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from spaces.config import LimitsConfig, ServerConfig
from spaces.media.aiortc_adapter import Codec
from spaces.media.forwarding import DownTrack, SenderState, TrackForwarder
from spaces.media.room import PublishedTrack, Room
from spaces.media.session import Session, Subscription
from spaces.session import events as ev
from spaces.store.base import Reservation
from spaces.store.memory import MemoryStore
from tests.test_forwarding import RecordingSink


@dataclass
class Host:
    """What a session needs of its node (spaces.media.session.SessionHost)."""

    store: MemoryStore
    config: ServerConfig = field(
        default_factory=lambda: ServerConfig(limits=LimitsConfig(custom_events_per_second=3))
    )
    node_id: str = "n1"
    closed: list[str] = field(default_factory=list)

    def apply_ice_policy(self, pc: Any) -> None:
        pass

    async def release(self, space_id: str, connection_id: str, reason: str) -> None:
        await self.store.leave(space_id, connection_id, reason, node_id=self.node_id)

    def session_closed(self, session: Session) -> None:
        self.closed.append(session.participant_id)


@dataclass
class World:
    host: Host
    room: Room[Session]
    space_id: str
    emptied: list[str] = field(default_factory=list)

    async def enter(
        self, participant_id: str, role: str = "publisher", **options: Any
    ) -> tuple[Session, ev.Joined]:
        store = self.host.store
        conn = "c" + secrets.token_hex(6)
        placement = (await store.join_context(self.space_id, "none")).placement
        await store.join(
            Reservation(
                space_id=self.space_id,
                connection_id=conn,
                participant_id=participant_id,
                generated_participant_id=False,
                role=role,
                display_name=participant_id.title(),
                ticket_hash="t" + conn,
                resume_hash="r" + conn,
                node_id="n1",
                expected_node_id=placement,
                pending_ms=10_000,
                placement_ms=10_000,
                default_max_participants=10,
            )
        )
        claim = await store.claim(self.space_id, conn, "t" + conn, "n1", 10_000, 10_000, "sess")
        session = Session(self.host, self.room, claim, ev.SessionOptions(**options))
        session.start()
        joined = session.joined_event()
        self.room.add(session)
        return session, joined


@pytest.fixture
async def world() -> Any:
    store = MemoryStore()
    await store.start()
    space_id = "s" + secrets.token_hex(6)
    await store.create_space(space_id, "", 0)
    w = World(Host(store), Room[Session](space_id, lambda room: None), space_id)
    w.room._on_empty = lambda room: w.emptied.append(room.space_id)
    yield w
    for session in list(w.room.sessions.values()):
        await session.close(ev.CLOSE_LEFT)
    await store.close()


async def drain(session: Session) -> list[ev.ServerEvent]:
    """Everything the session has emitted so far (lets pending tasks run first)."""
    await asyncio.sleep(0.05)
    out: list[ev.ServerEvent] = []
    while not session._outbox.empty():
        event = session._outbox.get_nowait()
        if event is not None:
            out.append(event)
    return out


def of(kind: type, events: list[ev.ServerEvent]) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


async def test_a_second_participant_sees_the_first_in_joined_and_the_first_is_told(
    world: World,
) -> None:
    alice, joined_alice = await world.enter("alice")
    bob, joined_bob = await world.enter("bob", role="subscriber")
    assert joined_alice.participants == ()
    assert [p.participant_id for p in joined_bob.participants] == ["alice"]
    assert joined_bob.role == "subscriber"
    told = of(ev.ParticipantJoined, await drain(alice))
    assert [e.participant.participant_id for e in told] == ["bob"]
    assert told[0].participant.connection_id == bob.connection_id


async def test_custom_events_reach_everyone_in_order_and_are_rate_limited(world: World) -> None:
    alice, _ = await world.enter("alice")
    bob, _ = await world.enter("bob")
    await drain(alice)
    for i in range(5):  # 3 per second allowed
        await alice.handle(ev.SendCustomEvent(100 + i, f"p{i}", event_id=f"e{i}"))
    mine = await drain(alice)
    theirs = of(ev.CustomEventDelivered, await drain(bob))
    delivered = of(ev.CustomEventDelivered, mine)
    assert [e.request_id for e in delivered] == [100, 101, 102]
    assert [e.request_id for e in theirs] == [0, 0, 0]
    assert [e.seq for e in theirs] == [1, 2, 3]
    assert [e.event_id for e in theirs] == ["e0", "e1", "e2"]
    failed = of(ev.RequestFailed, mine)
    assert [(f.request_id, f.code) for f in failed] == [
        (103, "RESOURCE_EXHAUSTED"),
        (104, "RESOURCE_EXHAUSTED"),
    ]
    assert not any(f.fatal for f in failed)


async def test_a_subscriber_cannot_publish_or_send_events(world: World) -> None:
    viewer, _ = await world.enter("viewer", role="subscriber")
    await viewer.handle(ev.SendCustomEvent(1, "hi"))
    await viewer.handle(ev.Publish(2, "v=0\r\n", ()))
    failed = of(ev.RequestFailed, await drain(viewer))
    assert [(f.request_id, f.code) for f in failed] == [
        (1, "PERMISSION_DENIED"),
        (2, "PERMISSION_DENIED"),
    ]
    assert not viewer.closed


async def test_garbage_sdp_is_a_request_error_and_the_session_continues(world: World) -> None:
    alice, _ = await world.enter("alice")
    await alice.handle(ev.Publish(1, "not sdp", (ev.TrackDeclaration("0", "camera"),)))
    await alice.handle(ev.Publish(2, "v=0\r\n", (), sdp_type="answer"))
    failed = of(ev.RequestFailed, await drain(alice))
    assert [(f.request_id, f.code) for f in failed] == [
        (1, "INVALID_ARGUMENT"),
        (2, "INVALID_ARGUMENT"),
    ]
    assert "sdp" in failed[0].message
    await alice.handle(ev.SendCustomEvent(3, "still here"))
    assert of(ev.Ack, await drain(alice)) == [ev.Ack(3)]


async def test_display_names_are_announced_to_everyone_and_rate_limited(world: World) -> None:
    alice, _ = await world.enter("alice")
    bob, _ = await world.enter("bob")
    await drain(alice)
    await alice.handle(ev.SetDisplayName(1, "Alice A."))
    await alice.handle(ev.SetDisplayName(2, "Again"))
    mine = await drain(alice)
    assert of(ev.DisplayNameChanged, mine) == [
        ev.DisplayNameChanged("alice", alice.connection_id, "Alice A.", request_id=1)
    ]
    assert [f.code for f in of(ev.RequestFailed, mine)] == ["RESOURCE_EXHAUSTED"]
    assert of(ev.DisplayNameChanged, await drain(bob)) == [
        ev.DisplayNameChanged("alice", alice.connection_id, "Alice A.")
    ]
    stored = await world.host.store.get_participant(world.space_id, "alice")
    assert stored.display_name == "Alice A."


async def test_manual_subscriptions_answer_which_entries_name_someone(world: World) -> None:
    alice, _ = await world.enter("alice")
    bob, joined = await world.enter("bob", subscription_mode=ev.SUBSCRIPTION_MANUAL)
    assert joined.subscription_mode == ev.SUBSCRIPTION_MANUAL
    entries = (
        ev.SubscriptionEntry(connection_id=alice.connection_id),
        ev.SubscriptionEntry(participant_id="nobody"),
        ev.SubscriptionEntry(connection_id=bob.connection_id),  # oneself
    )
    await bob.handle(ev.SetSubscription(7, mode=ev.SUBSCRIPTION_MANUAL, entries=entries))
    (update,) = of(ev.SubscriptionUpdated, await drain(bob))
    assert update.successes == entries[:1]
    assert update.failures == entries[1:]
    assert bob.manual is not None and bob.manual.names("alice")


async def test_unknown_and_foreign_tracks_cannot_be_muted(world: World) -> None:
    alice, _ = await world.enter("alice")
    await alice.handle(ev.SetMuted(1, "TRnope", True))
    await alice.handle(ev.Unknown(2))
    failed = of(ev.RequestFailed, await drain(alice))
    assert [(f.request_id, f.code) for f in failed] == [(1, "NOT_FOUND"), (2, "INVALID_ARGUMENT")]


async def test_a_subscriber_offer_at_join_has_no_bare_bundle_line(world: World) -> None:
    alice, _ = await world.enter("alice", offer_subscriber_at_join=True)
    (offer,) = of(ev.SubscriberOffered, await drain(alice))
    assert offer.version == 1 and offer.tracks == ()
    assert offer.sdp.startswith("v=0") and "a=group:BUNDLE" not in offer.sdp
    # An answer that does not match the offer ends the session, retryably.
    await alice.handle(ev.AnswerSubscriber(1, "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
                                              "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\n"))  # fmt: skip
    closing = of(ev.Closing, await drain(alice))
    assert closing and closing[0].reason == ev.CLOSE_ERROR and closing[0].rejoin


async def test_leave_acks_closes_frees_the_id_and_empties_the_room(world: World) -> None:
    alice, _ = await world.enter("alice")
    bob, _ = await world.enter("bob")
    await drain(alice)
    await bob.handle(ev.Leave(9))
    out = await drain(bob)
    assert out[:2] == [ev.Ack(9), ev.Closing(ev.CLOSE_LEFT, "left")]
    assert not ev.Closing(ev.CLOSE_LEFT).rejoin
    left = of(ev.ParticipantLeft, await drain(alice))
    assert [(e.participant_id, e.reason) for e in left] == [("bob", ev.CLOSE_LEFT)]
    assert [p.participant_id for p in await world.host.store.list_participants(world.space_id)] == [
        "alice"
    ]
    await alice.close(ev.CLOSE_REMOVED, "removed", "removed")
    assert world.emptied == [world.space_id]
    assert world.host.closed == ["bob", "alice"]
    # Closed: nothing more is handled or sent.
    await alice.handle(ev.SendCustomEvent(1, "late"))
    assert of(ev.Ack, await drain(alice)) == []


async def offer_sdp(kind: str = "video") -> tuple[Any, str]:
    """A real offer with one sending m-section (aiortc gathers on loopback only)."""
    from aiortc import RTCPeerConnection

    from spaces.media.aiortc_adapter import IcePolicy, apply_ice_policy
    from spaces.sdk.media import TestPatternTrack, ToneTrack

    pc = RTCPeerConnection()
    pc.addTransceiver(TestPatternTrack((1, 2, 3)) if kind == "video" else ToneTrack(), "sendonly")
    apply_ice_policy(pc, IcePolicy(bind_addresses=("127.0.0.1",)))
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def test_client_chosen_track_ids_are_unique_in_the_space_and_follow_a_reconnect(
    world: World,
) -> None:
    alice, _ = await world.enter("alice")
    mallory, _ = await world.enter("mallory")
    pc, sdp = await offer_sdp()
    mid = "0"
    try:
        await alice.handle(
            ev.Publish(1, sdp, (ev.TrackDeclaration(mid, "camera", track_id="cam-1"),))
        )
        (answer,) = of(ev.PublishAnswered, await drain(alice))
        assert [t.id for _, t in answer.tracks] == ["cam-1"]
        assert set(world.room.tracks) == {"cam-1"}
        # Another participant cannot take the id, and a malformed id is refused.
        await mallory.handle(
            ev.Publish(2, sdp, (ev.TrackDeclaration(mid, "camera", track_id="cam-1"),))
        )
        await mallory.handle(
            ev.Publish(3, sdp, (ev.TrackDeclaration(mid, "camera", track_id="no spaces"),))
        )
        failed = of(ev.RequestFailed, await drain(mallory))
        assert [(f.request_id, f.code) for f in failed] == [
            (2, "ALREADY_EXISTS"),
            (3, "INVALID_ARGUMENT"),
        ]
        assert world.room.tracks["cam-1"].owner is alice
        # Alice's reconnect (a new connection, the same participant) republishes the same id
        # while the old connection is still here: the track moves to the new connection.
        await world.host.store.leave(world.space_id, alice.connection_id, "disconnected")
        again, _ = await world.enter("alice")
        await again.handle(
            ev.Publish(4, sdp, (ev.TrackDeclaration(mid, "camera", track_id="cam-1"),))
        )
        assert of(ev.PublishAnswered, await drain(again))
        assert world.room.tracks["cam-1"].owner is again
    finally:
        await pc.close()


# --- simulcast layers: a client's request (the policy itself: tests/test_simulcast_core.py) ----


def _subscribed(
    world: World, viewer: Session, owner: Session, current: int
) -> tuple[PublishedTrack, list[str]]:
    """A three-layer track of ``owner`` (every layer being sent) that ``viewer`` receives at
    layer ``current``, wired as ``Session._subscriber_answer`` wires one (the sink records:
    no peer connection). Returns the track and the keyframe requests (by rid) sent since."""
    plis: list[str] = []
    layers = tuple(
        TrackForwarder("cam", "video", "VP8", 90000, lambda r=rid: plis.append(r), 0.0, rid=rid)
        for rid in ("q", "h", "f")
    )
    now = time.monotonic()
    for layer in layers:
        layer.last_packet_at = now
    track = PublishedTrack(
        id="cam",
        owner=owner,
        mid="1",
        kind="video",
        source="camera",
        codec=Codec("video/VP8", 90000, 96, {}),
        forwarder=layers[-1],
        width=960,
        height=540,
        layers=layers,
        layer_bitrates=(150_000, 500_000, 1_500_000),
        layer_scales=(4.0, 2.0, 1.0),
    )
    world.room.tracks[track.id] = track
    downtrack = DownTrack(layers[current], RecordingSink(), SenderState(), "viewer", 1 << 20)
    layers[current].add(downtrack)
    viewer._subs[track.id] = Subscription(track, SimpleNamespace(kind="video"), downtrack)
    plis.clear()
    return track, plis


async def test_a_request_for_a_higher_layer_switches_at_once_not_when_the_estimate_grows(
    world: World,
) -> None:
    pub, _ = await world.enter("pub")
    viewer, _ = await world.enter("viewer")
    track, plis = _subscribed(world, viewer, pub, current=1)
    # The estimate carries the middle layer the viewer gets, not the top one (what it reads
    # after a while on a lower layer: it grows 25% a second, to 4 times what is sent).
    viewer._bwe.estimate = viewer.estimate = 800_000
    viewer.allocate()
    downtrack = viewer._subs[track.id].downtrack
    assert downtrack is not None and downtrack.target is track.layers[1]
    await viewer.handle(ev.SetVideoQuality(request_id=7, track_id=track.id, quality=""))
    # The top layer is followed now, and asked for the keyframe the switch happens at.
    assert downtrack.target is track.layers[2]
    assert plis == ["f"]
    assert viewer.estimate is not None and viewer.estimate >= 1_500_000
    # Down is as prompt, and needs no probe.
    await viewer.handle(ev.SetVideoQuality(request_id=8, track_id=track.id, quality="low"))
    assert downtrack.target is track.layers[0]
    assert viewer.estimate >= 1_500_000


async def test_before_the_first_estimate_a_new_subscription_keeps_its_start_layer(
    world: World,
) -> None:
    """Until the first tick estimates anything, the allocation uses the estimator's start
    value, as the first layer was chosen with: an unknown estimate is not "no limit" (that
    switched every new subscriber to the top layer for one tick and back, asking the
    publisher for two more keyframes on a link nothing was known of yet)."""
    pub, _ = await world.enter("pub")
    viewer, _ = await world.enter("viewer")
    track, plis = _subscribed(world, viewer, pub, current=0)
    assert viewer.estimate is None, "no tick yet"
    viewer.allocate()
    downtrack = viewer._subs[track.id].downtrack
    assert downtrack is not None and downtrack.target is track.layers[0]
    assert plis == []


async def test_a_request_does_not_override_the_backoff_after_congestion(
    world: World,
) -> None:
    pub, _ = await world.enter("pub")
    viewer, _ = await world.enter("viewer")
    track, plis = _subscribed(world, viewer, pub, current=1)
    viewer._bwe.estimate = viewer.estimate = 800_000
    viewer._bwe._cut(700_000, time.monotonic())  # congestion just now: a backoff runs
    viewer.estimate = viewer._bwe.estimate
    await viewer.handle(ev.SetVideoQuality(request_id=7, track_id=track.id, quality=""))
    downtrack = viewer._subs[track.id].downtrack
    assert downtrack is not None and downtrack.target is track.layers[1]
    assert plis == [] and viewer.estimate == 700_000


# --- the import circle stays broken ---------------------------------------------------------

SOURCE_ROOTS = [Path(__file__).resolve().parents[1] / d for d in ("services", "media-node")]


def _source(module: str) -> Path | None:
    """The file of project module ``module`` (found on disk, never imported), or None."""
    rel = Path(*module.split("."))
    for root in SOURCE_ROOTS:
        for path in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
            if path.is_file():
                return path
    return None


def _imports(module: str) -> set[str]:
    """Every module ``module``'s source names in an import, anywhere in the file (functions
    and ``TYPE_CHECKING`` blocks included): ``from a.b import c`` counts as a.b and a.b.c."""
    path = _source(module)
    assert path is not None, module
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _reachable(module: str) -> set[str]:
    """``module`` and every project module its imports reach, following them on disk."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(m for m in _imports(current) if m.startswith("spaces") and _source(m))
    return seen


def _is(module: str, target: str) -> bool:
    return module == target or module.startswith(target + ".")


def test_room_and_session_import_neither_the_node_nor_the_generated_protobuf() -> None:
    """The media node's session core: room.py below session.py below node.py, never back up
    (not even through another module), and neither of the two speaks the gRPC wire."""
    for module, above in (
        ("spaces.media.room", ("spaces.media.session", "spaces.media.node")),
        ("spaces.media.session", ("spaces.media.node",)),
    ):
        direct = _imports(module)
        assert not [m for m in direct if _is(m, "spaces.v1")], (module, sorted(direct))
        reached = _reachable(module)
        for target in above:
            assert not [m for m in reached if _is(m, target)], (module, target, sorted(reached))
    # room.py is free of protobuf even through what it imports.
    reached = _reachable("spaces.media.room")
    assert not [m for m in reached if _is(m, "spaces.v1")], sorted(reached)
