"""Our browser client (``web/spaces.js``, served at ``/sdk/spaces.js``) in real headless
Chromium against a real single-process server: media between pages and with a Python SDK
participant, every event the protocol carries, uniqueness, reconnect, kick and delete.

One browser and one server for the module (each test has its own space); every page is its own
browser context with a synthetic camera of its own colour (tests/support/harness.js), and
``tests/support/webapp.js`` records what the page's client saw."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from spaces.server import SpacesServer
from tests.support.browser import NotInTestNetwork, Page, chromium
from tests.support.system import Admin, Tenant, eventually, start_server, web_config

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent
WEBAPP = ROOT / "tests" / "support" / "webapp.js"
RED = (220, 40, 40)
GREEN = (40, 200, 40)
BLUE = (40, 40, 220)
COLOR_TOLERANCE = 60


def close_to(color: list[int] | None, expected: tuple[int, int, int]) -> bool:
    return color is not None and all(
        abs(a - b) <= COLOR_TOLERANCE for a, b in zip(color, expected, strict=True)
    )


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Any]:
    async with chromium() as b:
        yield b


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> AsyncIterator[SpacesServer]:
    s = await start_server(web_config())
    yield s
    await s.stop()


class World:
    """One test's space, its token signer, and the pages it opened (closed at the end)."""

    def __init__(self, server: SpacesServer, browser: Any, admin: Admin, tenant: Tenant) -> None:
        self.server = server
        self.browser = browser
        self.admin = admin
        self.tenant = tenant
        self.space_id = ""
        self.pages: list[Page] = []

    @property
    def origin(self) -> str:
        return str(self.server.signal.url)

    async def page(self, name: str, color: tuple[int, int, int] = (128, 128, 128)) -> Page:
        page = await Page.open(self.browser, self.origin, name, color)
        await page.page.add_script_tag(path=str(WEBAPP))
        self.pages.append(page)
        return page

    async def joined(
        self,
        name: str,
        color: tuple[int, int, int] = (128, 128, 128),
        *,
        role: str = "publisher",
        publish: bool = True,
        **options: Any,
    ) -> Page:
        """A page whose client joined as participant ``name`` (and published camera and
        microphone unless told otherwise)."""
        page = await self.page(name, color)
        token = self.tenant.token(self.space_id, name, role=role)
        result = await page.js("([t, o]) => app.join(t, o)", [token, options])
        assert result.get("participantId") == name, (result, page.log())
        if publish:
            published = await page.js("() => app.publish({audio: true, video: true})")
            assert isinstance(published, list), (published, page.log())
        return page


@pytest_asyncio.fixture(loop_scope="module")
async def world(server: SpacesServer, browser: Any) -> AsyncIterator[World]:
    admin = Admin(server.address)
    w = World(server, browser, admin, Tenant(await admin.create_key()))
    w.space_id = await admin.create_space()
    yield w
    for page in w.pages:
        await page.close()
    await admin.close()


async def frames(page: Page) -> dict[str, int]:
    result: dict[str, int] = await page.js("() => app.frames()")
    return result


async def video(page: Page) -> dict[str, Any]:
    result: dict[str, Any] = await page.js("() => app.video()")
    return result


def assert_every_frame_is(entry: dict[str, Any], expected: tuple[int, int, int], what: str) -> None:
    """Every presented frame that could be sampled is ``expected``'s colour (only the first
    callback or two may come before the element holds a frame)."""
    colors = entry["colors"]
    assert len(colors) >= entry["frames"] - 2 > 0, (what, entry["frames"], len(colors))
    wrong = [c for c in colors if not close_to(c, expected)]
    assert not wrong, (what, expected, wrong[:5], len(colors))


async def until_frames(page: Page, key: str, count: int, timeout: float = 20.0) -> None:
    async def check() -> bool:
        return (await frames(page)).get(key, 0) >= count

    try:
        await eventually(check, timeout=timeout, interval=0.2)
    except AssertionError:
        raise AssertionError(f"{page.name}: {key} {await frames(page)}\n{page.log()}") from None


# --- media ----------------------------------------------------------------------------------


async def test_three_pages_each_decode_the_other_two_with_the_right_colours(world: World) -> None:
    colors = {"red": RED, "green": GREEN, "blue": BLUE}
    pages = {name: await world.joined(name, color) for name, color in colors.items()}
    for viewer, page in pages.items():
        for sender in colors:
            if sender != viewer:
                await until_frames(page, f"{sender}/camera", 30)
    for viewer, page in pages.items():
        seen = await video(page)
        assert sorted(seen) == sorted(f"{s}/camera" for s in colors if s != viewer)
        for sender, expected in colors.items():
            if sender == viewer:
                continue
            entry = seen[f"{sender}/camera"]
            assert entry["frames"] >= 30
            assert_every_frame_is(entry, expected, f"{viewer} sees {sender}")
    # ICE gathered loopback only, in every page's publishing and subscribing connections.
    for page in pages.values():
        assert await page.local_candidate_addresses() == {"127.0.0.1"}, page.log()


async def test_a_browser_and_a_python_sdk_participant_exchange_media(world: World) -> None:
    from spaces.sdk import Space
    from spaces.sdk.media import TestPatternTrack, ToneTrack, read_pattern, same_color

    page = await world.joined("browser", RED)
    python = Space(world.tenant.token(world.space_id, "python"), world.server.address)
    await python.join()
    try:
        await python.local.publish(TestPatternTrack(BLUE), "camera")
        await python.local.publish(ToneTrack(440), "microphone")
        # The browser decodes the Python participant's video, in its colour.
        await until_frames(page, "python/camera", 30)
        assert_every_frame_is((await video(page))["python/camera"], BLUE, "browser sees python")
        # The Python participant decodes the browser's camera and microphone.
        camera = await eventually(lambda: python.remote_track("browser", "camera"), timeout=10)
        microphone = await eventually(lambda: python.remote_track("browser", "microphone"))
        await eventually(lambda: camera.frames_received >= 30, timeout=20)
        await eventually(lambda: microphone.frames_received >= 30, timeout=20)
        color, _ = read_pattern(camera.last_frame)
        assert same_color(color, RED, tolerance=COLOR_TOLERANCE), color
    finally:
        await python.leave()


# --- events ---------------------------------------------------------------------------------


async def seen(page: Page, event: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = await page.js("name => app.seen(name)", event)
    return result


async def until_seen(page: Page, event: str, match: Any = None, timeout: float = 10.0) -> Any:
    async def check() -> Any:
        found = [e for e in await seen(page, event) if match is None or match(e)]
        return found or None

    try:
        return await eventually(check, timeout=timeout, interval=0.1)
    except AssertionError:
        raise AssertionError(f"{page.name} never saw {event}: {await seen(page, event)}") from None


async def test_mute_and_unmute_reach_the_other_pages(world: World) -> None:
    alice = await world.joined("alice", RED)
    bob = await world.joined("bob", GREEN)
    carol = await world.joined("carol", BLUE)
    for page in (bob, carol):
        await until_frames(page, "alice/camera", 5)
    camera = await alice.js("() => app.tracks.camera.tid")
    microphone = await alice.js("() => app.tracks.microphone.tid")

    def about(tid: str, muted: bool) -> Any:
        return lambda e: (
            e["participant"] == "alice"
            and e["track"]["tid"] == tid
            and e["track"]["muted"] is muted
        )

    await alice.js("() => { app.tracks.camera.mute(); app.tracks.microphone.mute(); }")
    for page in (bob, carol):
        await until_seen(page, "ParticipantTrackMuted", about(camera, True))
        await until_seen(page, "ParticipantTrackMuted", about(microphone, True))
        muted = await page.js(
            "() => [...app.space.remoteParticipants.values()].find(p => p.id === 'alice')"
            ".getTracks().map(t => [t.source, t.muted])"
        )
        assert sorted(muted) == [["camera", True], ["microphone", True]]
    await alice.js("() => app.tracks.camera.unMute()")
    for page in (bob, carol):
        await until_seen(page, "ParticipantTrackUnmuted", about(camera, False))
    # Only the camera was unmuted; the page that muted is never told about itself.
    assert not [
        e for e in await seen(bob, "ParticipantTrackUnmuted") if e["track"]["tid"] == microphone
    ]
    assert not await seen(alice, "ParticipantTrackMuted")
    # A participant who joins now sees the state as it is.
    dave = await world.joined("dave", publish=False)
    tracks = await dave.js(
        "() => [...app.space.remoteParticipants.values()].find(p => p.id === 'alice')"
        ".getTracks().map(t => [t.source, t.muted])"
    )
    assert sorted(tracks) == [["camera", False], ["microphone", True]]


async def test_custom_events_arrive_in_order_with_sequence_numbers_and_the_rate_limit_errs(
    world: World,
) -> None:
    alice = await world.joined("alice", RED, publish=False)
    bob = await world.joined("bob", GREEN, publish=False)
    sent = await alice.js(
        """async () => {
            const out = [];
            for (let i = 0; i < 5; i++) out.push(await app.local.publishCustomEvent(`hello ${i}`));
            return out;
        }"""
    )
    numbers = [e["sequenceNumber"] for e in sent]
    assert [e["payload"] for e in sent] == [f"hello {i}" for i in range(5)]
    assert numbers == list(range(numbers[0], numbers[0] + 5))
    received = await until_seen(
        bob, "ParticipantCustomEventPublished", lambda e: e["custom"]["payload"] == "hello 4"
    )
    got = [e for e in await seen(bob, "ParticipantCustomEventPublished")]
    assert [
        (e["participant"], e["custom"]["payload"], e["custom"]["sequenceNumber"]) for e in got
    ] == [("alice", f"hello {i}", numbers[i]) for i in range(5)], received
    # A burst beyond the per-second limit: the server refuses the excess with its request
    # error (CustomEventRateLimited, 6), and what it accepted still arrives in order.
    results = await alice.js(
        """() => Promise.all(Array.from({length: 25}, (_, i) =>
            app.call(() => app.local.publishCustomEvent(`burst ${i}`))))"""
    )
    accepted = [r["ok"] for r in results if "ok" in r]
    refused = [r["error"] for r in results if "error" in r]
    assert refused and accepted, results
    assert {(e["name"], e["code"]) for e in refused} == {("PublishCustomEventError", 6)}, refused
    assert all("rate" in e["message"] for e in refused), refused
    last = accepted[-1]["payload"]
    await until_seen(
        bob, "ParticipantCustomEventPublished", lambda e: e["custom"]["payload"] == last
    )
    burst = [e["custom"] for e in await seen(bob, "ParticipantCustomEventPublished")][5:]
    assert [e["payload"] for e in burst] == [e["payload"] for e in accepted]
    assert [e["sequenceNumber"] for e in burst] == [e["sequenceNumber"] for e in accepted]
    assert [e["sequenceNumber"] for e in burst] == sorted(e["sequenceNumber"] for e in burst)


async def test_a_display_name_change_arrives(world: World) -> None:
    alice = await world.joined("alice", RED, publish=False, displayName="Alice")
    bob = await world.joined("bob", GREEN, publish=False)
    # The name given at join is what the others see.
    joined = await until_seen(bob, "ParticipantJoined", lambda e: e["participant"] == "alice")
    assert joined[0]["displayName"] == "Alice"
    result = await alice.js(
        "() => app.call(async () => (await app.local.setDisplayName('Alice Smith')).displayName)"
    )
    assert result == {"ok": "Alice Smith"}
    changed = await until_seen(
        bob, "ParticipantDisplayNameChanged", lambda e: e["participant"] == "alice"
    )
    assert changed[0]["displayName"] == "Alice Smith"
    # The page that changed it hears it too, as Mux's SDK does.
    mine = await until_seen(alice, "ParticipantDisplayNameChanged")
    assert mine[0]["participant"] == "alice" and mine[0]["displayName"] == "Alice Smith"
    # Changed again at once: the server's rate limit is a SetDisplayNameError (type 8).
    again = await alice.js("() => app.call(() => app.local.setDisplayName('Too Soon'))")
    assert again["error"]["name"] == "SetDisplayNameError" and again["error"]["code"] == 8, again


async def test_screen_share_is_a_second_video_track_with_source_screenshare(world: World) -> None:
    alice = await world.joined("alice", RED)
    bob = await world.joined("bob", GREEN, publish=False)
    await until_frames(bob, "alice/camera", 5)
    shared = await alice.js("() => app.publish({screen: true})")
    assert [(t["kind"], t["source"]) for t in shared] == [(2, "screenshare")], shared
    published = await until_seen(
        bob, "ParticipantTrackPublished", lambda e: e["track"]["source"] == "screenshare"
    )
    assert published[0]["participant"] == "alice" and published[0]["track"]["kind"] == 2
    await until_frames(bob, "alice/screenshare", 30)
    await until_frames(bob, "alice/camera", 60)
    # Two video tracks from one participant: the camera's colour and the fake screen differ.
    seen_video = await video(bob)
    assert_every_frame_is(seen_video["alice/camera"], RED, "camera")
    screen = seen_video["alice/screenshare"]["colors"]
    assert screen and not any(close_to(c, RED) for c in screen)
    sources = await bob.js(
        "() => [...app.space.remoteParticipants.values()][0].getVideoTracks().map(t => t.source)"
    )
    assert sorted(sources) == ["camera", "screenshare"]
    # Unpublished: the others see it go.
    await alice.js("() => app.local.unpublishTracks([app.tracks.screenshare], {stop: true})")
    gone = await until_seen(bob, "ParticipantTrackUnpublished")
    assert gone[0]["track"]["source"] == "screenshare"


async def test_a_subscriber_token_cannot_publish_and_still_receives(world: World) -> None:
    alice = await world.joined("alice", RED)
    viewer = await world.joined("viewer", GREEN, role="subscriber", publish=False)
    assert await viewer.js("() => app.local.role") == 2
    refused = await viewer.js("() => app.publish({audio: true, video: true})")
    assert refused["error"]["name"] == "PublishTrackError", refused
    assert "subscriber" in refused["error"]["message"], refused
    event = await viewer.js("() => app.call(() => app.local.publishCustomEvent('hi'))")
    assert event["error"]["name"] == "PublishCustomEventError", event
    # The server refused: nobody sees a track (or an event) from the subscriber ...
    await until_frames(viewer, "alice/camera", 30)
    assert not [
        e for e in await seen(alice, "ParticipantTrackPublished") if e["participant"] == "viewer"
    ]
    assert not await seen(alice, "ParticipantCustomEventPublished")
    # ... and the refusal was the server's: the wire carried the offer and its error.
    wire = await viewer.js("() => harness.messages('out').map(m => Object.keys(m)[0])")
    assert "offer" in wire, wire
    errors = await viewer.js("() => harness.messages('in', 'error').map(m => m.error)")
    assert any(e.get("request_error") for e in errors), errors


async def test_manual_subscription_receives_only_what_it_subscribes_to(world: World) -> None:
    await world.joined("alice", RED)
    auto = await world.joined("auto", GREEN, publish=False)
    manual = await world.joined("manual", BLUE, publish=False, subscriptionMode="MANUAL")
    await until_frames(auto, "alice/camera", 10)
    # Automatic mode got alice's media; manual mode got only the announcement.
    assert await seen(manual, "ParticipantTrackPublished")
    assert not await seen(manual, "ParticipantTrackSubscribed")
    assert await frames(manual) == {}
    wrong_mode = await auto.js(
        "() => app.call(() => [...app.space.remoteParticipants.values()][0].subscribe())"
    )
    assert wrong_mode["error"]["name"] == "SubscriptionError", wrong_mode
    subscribe = """() => app.call(() => [...app.space.remoteParticipants.values()]
        .find(p => p.id === 'alice').subscribe())"""
    assert await manual.js(subscribe) == {"ok": None}
    subscribed = await seen(manual, "ParticipantTrackSubscribed")
    assert sorted(e["track"]["source"] for e in subscribed) == ["camera", "microphone"]
    await until_frames(manual, "alice/camera", 30)
    assert_every_frame_is((await video(manual))["alice/camera"], RED, "manual sees alice")
    unsubscribe = subscribe.replace(".subscribe()", ".unsubscribe()")
    assert await manual.js(unsubscribe) == {"ok": None}
    gone = await until_seen(manual, "ParticipantTrackUnsubscribed", timeout=10)
    assert {e["track"]["source"] for e in gone} <= {"camera", "microphone"}
    await until_seen(
        manual, "ParticipantTrackUnsubscribed", lambda e: e["track"]["source"] == "camera"
    )
    assert (
        await manual.js(
            "() => app.local && [...app.space.remoteParticipants.values()][0]"
            ".getTracks().some(t => t.hasMedia())"
        )
        is False
    )


async def test_active_speakers_reach_every_page(world: World) -> None:
    # Bob first: the node announces speakers when they change (a page that joins while the
    # set stays the same hears of it at the next change).
    bob = await world.joined("bob", GREEN, publish=False)
    alice = await world.joined("alice", RED)
    # Chromium's fake microphone beeps: the node hears it in the audio-level extension.
    speakers = await until_seen(bob, "ActiveSpeakersChanged", lambda e: "alice" in e["speakers"])
    assert speakers[0]["speakers"] == ["alice"]
    mine = await until_seen(alice, "ActiveSpeakersChanged", lambda e: "alice" in e["speakers"])
    assert mine


# --- uniqueness, reconnect, kick and delete -------------------------------------------------


async def exchanging(world: World, a: str, b: str) -> tuple[Page, Page]:
    """Two publishing pages (red and green) that each decoded 10 frames of the other."""
    first = await world.joined(a, RED)
    second = await world.joined(b, GREEN)
    await until_frames(first, f"{b}/camera", 10)
    await until_frames(second, f"{a}/camera", 10)
    return first, second


async def socket_log(page: Page) -> list[dict[str, Any]]:
    """Every socket the page opened ("open", with its URL) and closed ("close", with its code)."""
    result: list[dict[str, Any]] = await page.js(
        "() => harness.wire.filter(m => m.dir !== 'in' && m.dir !== 'out')"
    )
    return result


async def test_a_duplicate_participant_id_gets_error_3_and_the_first_page_keeps_its_media(
    world: World,
) -> None:
    first, other = await exchanging(world, "dup", "other")
    second = await world.page("dup-again", BLUE)
    token = world.tenant.token(world.space_id, "dup")
    result = await second.js("t => app.join(t)", token)
    assert result["error"]["name"] == "JWTError", result
    assert result["error"]["code"] == 3 and result["error"]["fatal"] is True, result
    assert result["error"]["message"], result
    # The first page was never disturbed: no reconnect, and media keeps flowing both ways.
    before_first = (await frames(first))["other/camera"]
    before_other = (await frames(other))["dup/camera"]
    await until_frames(first, "other/camera", before_first + 30)
    await until_frames(other, "dup/camera", before_other + 30)
    assert not await seen(first, "LocalParticipantReconnecting")
    assert [e["dir"] for e in await socket_log(first)] == ["open"]
    participants = await world.admin.participants(world.space_id)
    assert sorted(p.participant_id for p in participants) == ["dup", "other"]


async def test_a_dropped_socket_reconnects_keeps_its_id_and_receives_media_within_5s(
    world: World,
) -> None:
    alice, bob = await exchanging(world, "alice", "bob")
    tids = await alice.js("() => app.local.getTracks().map(t => t.tid).sort()")
    (bridge,) = world.server.signal.bridges_of("alice")
    old_connection = bridge.connection_id
    await bridge.drop()
    await until_seen(alice, "LocalParticipantReconnected", timeout=10)
    assert await alice.js("() => [app.local.id, app.space.state]") == ["alice", "joined"]
    assert await alice.js("() => app.local.connectionId") != old_connection
    # The reconnect asked the server for its own participant back, at once.
    sockets = await socket_log(alice)
    assert [s["dir"] for s in sockets] == ["open", "close", "open"], sockets
    assert sockets[1]["code"] == 4001
    assert "reconnect_id=alice" in sockets[2]["url"] and "reconnect_attempt=1" in sockets[2]["url"]
    # Media again, within 5 s of the drop, in both directions; the same tracks (same tids).
    reconnecting = (await seen(alice, "LocalParticipantReconnecting"))[0]["at"]

    async def first_frame_after_drop() -> float:
        entry = (await alice.js("() => app.video()"))["bob/camera"]
        return float(entry["firstFrameAt"]) if entry["firstFrameAt"] > reconnecting else 0.0

    first_frame = await eventually(first_frame_after_drop, timeout=10)
    assert first_frame - reconnecting <= 5000, first_frame - reconnecting
    assert await alice.js("() => app.local.getTracks().map(t => t.tid).sort()") == tids
    republished = await until_seen(
        bob,
        "ParticipantJoined",
        lambda e: e["participant"] == "alice" and e["connection"] != old_connection,
    )
    assert republished
    before = (await frames(bob))["alice/camera"]
    await until_frames(bob, "alice/camera", before + 10, timeout=5)
    remote_tids = await bob.js(
        "() => [...app.space.remoteParticipants.values()].find(p => p.id === 'alice')"
        ".getTracks().map(t => t.tid).sort()"
    )
    assert remote_tids == tids
    assert_every_frame_is((await video(alice))["bob/camera"], GREEN, "alice sees bob again")
    participants = await world.admin.participants(world.space_id)
    assert sorted(p.participant_id for p in participants) == ["alice", "bob"]


async def test_a_reconnect_refused_for_good_is_not_retried(world: World) -> None:
    """A refusal with fatal && !retry (here: the token's signing key was deleted meanwhile)
    ends the reconnect at once: LocalParticipantReconnectFailed, and no second attempt."""
    from spaces.v1 import signing_key_pb2

    alice = await world.joined("alice", RED, publish=False)
    await world.admin.keys.DeleteSigningKey(
        signing_key_pb2.DeleteSigningKeyRequest(id=world.tenant.key.id), metadata=world.admin.md
    )
    (bridge,) = world.server.signal.bridges_of("alice")
    await bridge.drop()
    failed = await until_seen(alice, "LocalParticipantReconnectFailed")
    assert failed[0]["error"]["name"] == "DisconnectedError", failed
    assert await alice.js("() => app.space.state") == "closed"
    # Attempts come 5 s apart: none followed the refusal.
    await asyncio.sleep(6.0)
    sockets = [(s["dir"], s.get("code")) for s in await socket_log(alice)]
    assert sockets == [("open", None), ("close", 4001), ("open", None), ("close", 4000)], sockets
    refusal = (await alice.js("() => harness.messages('in', 'error')"))[-1]["error"]
    assert refusal["type"] == 6 and refusal["fatal"] is True and refusal["retry"] is False


async def test_a_kick_closes_the_page_with_4000_and_it_does_not_come_back(world: World) -> None:
    from spaces.v1 import presence_pb2

    alice = await world.joined("alice", RED)
    bob = await world.joined("bob", GREEN)
    await until_frames(bob, "alice/camera", 5)
    await world.admin.presence.RemoveParticipant(
        presence_pb2.RemoveParticipantRequest(space_id=world.space_id, participant_id="alice"),
        metadata=world.admin.md,
    )
    ended = await until_seen(alice, "LocalParticipantDisconnected")
    assert ended[0]["error"]["name"] == "DisconnectedError" and ended[0]["error"]["code"] == 4000
    assert await alice.js("() => app.space.state") == "closed"
    await until_seen(bob, "ParticipantLeft", lambda e: e["participant"] == "alice")
    # It stays out: no reconnect, no second socket, and the server has only bob.
    await asyncio.sleep(2.0)
    sockets = await socket_log(alice)
    assert [(s["dir"], s.get("code")) for s in sockets] == [("open", None), ("close", 4000)]
    assert not await seen(alice, "LocalParticipantReconnecting")
    assert [p.participant_id for p in await world.admin.participants(world.space_id)] == ["bob"]


async def test_a_forced_delete_closes_every_page_with_4000_and_none_comes_back(
    world: World,
) -> None:
    from spaces.v1 import space_pb2

    pages = [await world.joined("alice", RED), await world.joined("bob", GREEN, publish=False)]
    await until_frames(pages[1], "alice/camera", 5)
    await world.admin.spaces.DeleteSpace(
        space_pb2.DeleteSpaceRequest(id=world.space_id, force=True), metadata=world.admin.md
    )
    for page in pages:
        ended = await until_seen(page, "LocalParticipantDisconnected")
        assert ended[0]["error"]["code"] == 4000, ended
        assert "deleted" in ended[0]["error"]["message"], ended
    await asyncio.sleep(2.0)
    for page in pages:
        sockets = await socket_log(page)
        assert [(s["dir"], s.get("code")) for s in sockets] == [("open", None), ("close", 4000)]
        assert await page.js("() => app.space.state") == "closed"


# --- the meeting page -----------------------------------------------------------------------


async def meeting_page(world: World, name: str, color: tuple[int, int, int], path: str) -> Page:
    page = await Page.open(world.browser, world.origin, name, color, path=path)
    world.pages.append(page)
    await page.page.fill("#name", name)
    await page.page.click("#join-dev")
    await page.page.wait_for_selector(".tile.local", timeout=15_000)
    # In the meeting, the lobby is gone and the controls are there.
    assert await page.page.is_hidden("#lobby")
    assert await page.page.is_visible("#controls")
    return page


async def remote_tile_frames(
    page: Page, name: str, count: int, kind: str = "camera"
) -> dict[str, Any]:
    """Watch the video of the remote tile of ``kind`` captioned ``name`` (as the page shows
    it) until it presented ``count`` frames; returns the harness's stats for it."""
    selector = f'.tile[data-kind="{kind}"]:not(.local) video'
    await page.page.wait_for_function(
        """([selector, name]) => [...document.querySelectorAll(selector)].some(v =>
            v.closest('.tile').querySelector('.name').textContent === name && v.srcObject)""",
        arg=[selector, name],
        timeout=15_000,
    )
    await page.js(
        """([selector, name]) => {
            const video = [...document.querySelectorAll(selector)].find(v =>
                v.closest('.tile').querySelector('.name').textContent === name);
            harness.watch(name, video);
        }""",
        [selector, name],
    )

    async def enough() -> Any:
        stats = (await page.js("() => harness.stats()"))[name]
        return stats if stats["frames"] >= count else None

    try:
        result: dict[str, Any] = await eventually(enough, timeout=20, interval=0.2)
    except AssertionError:
        raise AssertionError(
            f"{page.name}: {await page.js('() => harness.stats()')}\n{page.log()}"
        ) from None
    return result


async def test_the_meeting_page_joins_two_tabs_through_the_dev_token_button(world: World) -> None:
    first = await meeting_page(world, "Ann", RED, "/")
    # The page put its space in its address: "open this URL in two browser tabs".
    url = first.page.url
    assert "?space=" in url, url
    space_id = url.split("?space=", 1)[1]
    assert await first.js("() => document.querySelector('#invite-link').href") == url
    second = await meeting_page(world, "Ben", GREEN, "/?space=" + space_id)
    assert second.page.url == url
    for page, other, color in ((first, "Ben", GREEN), (second, "Ann", RED)):
        stats = await remote_tile_frames(page, other, 30)
        assert close_to(stats["color"], color), (page.name, stats)
        names = await page.js(
            "() => [...document.querySelectorAll('.tile .name')].map(n => n.textContent).sort()"
        )
        assert names == sorted([f"{page.name} (you)", other]), names
    participants = await world.admin.participants(space_id)
    assert sorted(p.display_name for p in participants) == ["Ann", "Ben"]
    # The fake microphone beeps: Ann's tile lights up as the active speaker in Ben's tab.
    ann_speaks = """() => [...document.querySelectorAll('.tile.speaking .name')]
        .some(n => n.textContent === 'Ann')"""
    await second.page.wait_for_function(ann_speaks, timeout=15_000)
    # Mute state reaches the other tab's tile.
    await first.page.click("#microphone")
    await second.page.wait_for_function(
        """() => [...document.querySelectorAll('.tile')].some(t =>
            t.querySelector('.name').textContent === 'Ann' &&
            t.querySelector('.state').textContent.includes('mic off'))""",
        timeout=10_000,
    )
    assert await first.js("() => document.querySelector('#microphone').textContent") == "Mic off"
    # A third tab joins the same space with a pasted token instead.
    third = await Page.open(world.browser, world.origin, "Cat", BLUE, path="/")
    world.pages.append(third)
    await third.page.fill("#name", "Cat")
    await third.page.fill("#token", world.tenant.token(space_id, "cat"))
    await third.page.click("#join-token")
    await third.page.wait_for_selector(".tile.local", timeout=15_000)
    stats = await remote_tile_frames(third, "Ann", 10)
    assert close_to(stats["color"], RED), stats
    # The camera button mutes Ann's camera: her tile in Ben's tab says so, and unmutes it.
    ann_state = """want => [...document.querySelectorAll('.tile[data-kind="camera"]')].some(t =>
        t.querySelector('.name').textContent === 'Ann' &&
        t.querySelector('.state').textContent.includes('camera off') === want &&
        t.classList.contains('camera-off') === want)"""
    await first.page.click("#camera")
    await second.page.wait_for_function(ann_state, arg=True, timeout=10_000)
    assert await first.js("() => document.querySelector('#camera').textContent") == "Camera off"
    await first.page.click("#camera")
    await second.page.wait_for_function(ann_state, arg=False, timeout=10_000)
    assert await first.js("() => document.querySelector('#camera').textContent") == "Camera on"
    # The screen-share button: a second tile of Ann's in Ben's tab, showing Chromium's fake
    # screen (not her camera's colour); stopping it removes the tile.
    await first.page.click("#screen")
    screen = await remote_tile_frames(second, "Ann's screen", 10, kind="screenshare")
    assert screen["color"] is not None and not close_to(screen["color"], RED), screen
    assert await first.js("() => document.querySelector('#screen').textContent") == "Stop sharing"
    await first.page.click("#screen")
    await second.page.wait_for_function(
        """() => !document.querySelector('.tile[data-kind="screenshare"]')""", timeout=10_000
    )


async def test_chromium_refuses_to_start_outside_the_tests_network_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ICE gathers 127.0.0.1 only because the browser tests run where loopback is the only
    interface: the launcher refuses anywhere else (without the variable tests/in-netns sets,
    or on a network with another interface)."""
    import socket

    monkeypatch.delenv("SPACES_IN_NETNS", raising=False)
    with pytest.raises(NotInTestNetwork, match="tests/in-netns"):
        async with chromium():
            pass
    monkeypatch.setenv("SPACES_IN_NETNS", "1")
    monkeypatch.setattr(socket, "if_nameindex", lambda: [(1, "lo"), (2, "eth0")])
    with pytest.raises(NotInTestNetwork, match="eth0"):
        async with chromium():
            pass


# --- the files ------------------------------------------------------------------------------


async def test_the_client_its_types_and_the_meeting_page_are_served(server: SpacesServer) -> None:
    origin = str(server.signal.url).rstrip("/")
    expected = {
        "/sdk/spaces.js": ("text/javascript", "spaces.js"),
        "/sdk/spaces.d.ts": ("application/typescript", "spaces.d.ts"),
        "/": ("text/html", "index.html"),
        "/meeting.js": ("text/javascript", "meeting.js"),
        "/meeting.css": ("text/css", "meeting.css"),
    }
    async with aiohttp.ClientSession() as http:
        for path, (content_type, name) in expected.items():
            async with http.get(origin + path) as reply:
                assert reply.status == 200, path
                assert reply.content_type == content_type, (path, reply.content_type)
                assert await reply.read() == (ROOT / "web" / name).read_bytes(), path


async def test_every_export_of_the_client_is_declared_in_its_types() -> None:
    js = (ROOT / "web" / "spaces.js").read_text()
    dts = (ROOT / "web" / "spaces.d.ts").read_text()
    exported = set(re.findall(r"^export (?:async )?(?:const|class|function) (\w+)", js, re.M))
    declared = set(re.findall(r"^export declare (?:const|class|function) (\w+)", dts, re.M))
    for text, names in ((js, exported), (dts, declared)):
        names.update(re.findall(r"^export \{ \w+ as (\w+) \};", text, re.M))
    assert len(exported) > 30
    assert exported == declared, exported ^ declared
    # Mux's names, so that moving an app is a change of import.
    for name in (
        "Space", "SpaceEvent", "ParticipantEvent", "LocalParticipant", "RemoteParticipant",
        "LocalTrack", "RemoteTrack", "TrackSource", "TrackKind", "SubscriptionMode",
        "getUserMedia", "getDisplayMedia", "getLocalTracksFromMediaStream", "JWTError",
        "ConnectionError", "DisconnectedError", "PublishCustomEventError", "SetDisplayNameError",
    ):  # fmt: skip
        assert name in exported, name


async def test_an_app_on_another_origin_imports_the_client_and_joins(world: World) -> None:
    """The README's migration: an app served from its own origin imports the client from the
    Spaces server (a cross-origin module import needs CORS), which connects back to it."""
    publisher = await world.joined("alice", RED)
    port = world.server.signal.port
    app = await Page.open(world.browser, f"http://localhost:{port}", "app", GREEN)
    world.pages.append(app)
    result = await app.js(
        """async ([module, token]) => {
            const { Space, SpaceEvent } = await import(module);
            const space = new Space(token);
            const subscribed = new Promise(resolve => space.on(
                SpaceEvent.ParticipantTrackSubscribed, (p, t) => resolve(p.id + "/" + t.source)));
            const me = await space.join();
            return [location.origin, me.id, await subscribed];
        }""",
        [f"http://127.0.0.1:{port}/sdk/spaces.js", world.tenant.token(world.space_id, "app")],
    )
    assert result[0] == f"http://localhost:{port}"
    assert result[1] == "app" and result[2] in ("alice/camera", "alice/microphone"), result
    await until_seen(publisher, "ParticipantJoined", lambda e: e["participant"] == "app")


async def test_the_readme_browser_example_works(world: World) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## From a browser", 1)[1]
    match = re.search(r"```html\n(.*?)```", section, re.S)
    assert match, "README.md lost its browser example"
    origin = world.origin.rstrip("/")
    token = world.tenant.token(world.space_id, "readme")
    html = match.group(1).replace("http://127.0.0.1:8080", origin)
    html = html.replace('<script type="module">', f'<script type="module">const token = "{token}";')
    other = await world.joined("other", GREEN)
    page = await Page.open(world.browser, world.origin, "readme", RED)
    world.pages.append(page)
    await page.page.set_content(html)
    # The example attaches what it receives, and publishes camera and microphone.
    await page.page.wait_for_function("() => document.querySelector('video')", timeout=15_000)
    await page.js("() => harness.watch('other', document.querySelector('video'))")
    await eventually(
        lambda: page.js("() => harness.stats().other.frames >= 10"), timeout=15, interval=0.2
    )
    assert close_to((await page.js("() => harness.stats().other"))["color"], GREEN)
    await until_frames(other, "readme/camera", 10)
    assert_every_frame_is((await video(other))["readme/camera"], RED, "other sees the example")


# --- audio: Opus DTX ------------------------------------------------------------------------

ASK_FOR_DTX = """() => {
  // A microphone that is silent but for a 300 ms tone every 1.5 s (Chromium's fake one is
  // never silent enough for DTX).
  const ctx = new AudioContext();
  window.dtxAudio = ctx; // its state goes into the assertion messages
  const tone = ctx.createOscillator();
  const gain = ctx.createGain();
  gain.gain.value = 0;
  const out = ctx.createMediaStreamDestination();
  tone.connect(gain);
  gain.connect(out);
  tone.start();
  setInterval(() => {
    gain.gain.setValueAtTime(0.5, ctx.currentTime);
    gain.gain.setValueAtTime(0, ctx.currentTime + 0.3);
  }, 1500);
  navigator.mediaDevices.getUserMedia = async () => new MediaStream(out.stream.getAudioTracks());
  // What an app does to have Chromium send Opus DTX: usedtx=1 on Opus in its offer. The node
  // answers it, and Chromium's sender follows the answer's fmtp.
  const createOffer = RTCPeerConnection.prototype.createOffer;
  RTCPeerConnection.prototype.createOffer = async function (...args) {
    const offer = await createOffer.apply(this, args);
    const opus = /a=rtpmap:(\\d+) opus\\/48000/i.exec(offer.sdp);
    if (!opus) return offer;
    const fmtp = new RegExp(`(a=fmtp:${opus[1]} [^\\r\\n]*)`);
    const sdp = offer.sdp.replace(fmtp, "$1;usedtx=1");
    window.offers.push(sdp);
    return { type: offer.type, sdp };
  };
  window.offers = [];
  window.answers = [];
  const setRemote = RTCPeerConnection.prototype.setRemoteDescription;
  RTCPeerConnection.prototype.setRemoteDescription = function (description, ...rest) {
    if (description && description.type === "answer") window.answers.push(description.sdp);
    return setRemote.call(this, description, ...rest);
  };
}"""

PLAY_AUDIO = """() => {
  // Play every received audio track, so that the decoder runs (inbound-rtp counts samples
  // only for audio that is played out).
  const RecordingPeerConnection = window.RTCPeerConnection;
  window.RTCPeerConnection = class extends RecordingPeerConnection {
    constructor(...args) {
      super(...args);
      this.addEventListener("track", (e) => {
        if (e.track.kind !== "audio") return;
        const element = new Audio();
        element.srcObject = new MediaStream([e.track]);
        element.play();
      });
    }
  };
}"""


async def audio_stats(page: Page) -> dict[str, Any]:
    stats: dict[str, Any] = await page.js("() => harness.audioStats()")
    return stats


async def test_a_publisher_asking_for_dtx_sends_it_and_the_subscriber_hears_it_with_levels(
    world: World,
) -> None:
    """Opus DTX end to end: the node answers usedtx=1 to a publisher that offers it, so
    Chromium sends silence as a packet every 400 ms instead of 50 a second; the node forwards
    the sparse stream (timestamps jumping) and the subscriber decodes it, with the
    microphone's tones in its audio energy, no loss, low jitter and little concealment."""
    bob = await world.page("bob", GREEN)
    await bob.js(PLAY_AUDIO)
    token = world.tenant.token(world.space_id, "bob", role="publisher")
    result = await bob.js("([t, o]) => app.join(t, o)", [token, {}])
    assert result.get("participantId") == "bob", (result, bob.log())
    alice = await world.page("alice", RED)
    await alice.js(ASK_FOR_DTX)
    token = world.tenant.token(world.space_id, "alice", role="publisher")
    result = await alice.js("([t, o]) => app.join(t, o)", [token, {}])
    assert result.get("participantId") == "alice", (result, alice.log())
    published = await alice.js("() => app.publish({audio: true, video: false})")
    assert isinstance(published, list), (published, alice.log())
    answers: list[str] = await alice.js("() => window.answers")
    assert any(re.search(r"a=fmtp:\d+ [^\r\n]*usedtx=1", sdp) for sdp in answers), answers
    # Chromium offers RED (RFC 2198) too; the node answers plain Opus (docs/architecture.md,
    # "Audio"), so Chromium sends plain Opus.
    offers: list[str] = await alice.js("() => window.offers")
    assert any(re.search(r"a=rtpmap:\d+ red/48000/2", sdp) for sdp in offers), offers
    assert not any(re.search(r"a=rtpmap:\d+ red/", sdp, re.I) for sdp in answers), answers

    async def receiving() -> dict[str, Any] | None:
        inbound = (await audio_stats(bob))["inbound"]
        return next((s for s in inbound if s["packetsReceived"] > 0), None)

    await eventually(receiving, timeout=15.0)
    before_pub = (await audio_stats(alice))["outbound"][0]
    before = await receiving()
    assert before is not None
    await asyncio.sleep(5.0)
    after_pub = (await audio_stats(alice))["outbound"][0]
    after = await receiving()
    assert after is not None
    sent = after_pub["packetsSent"] - before_pub["packetsSent"]
    received = after["packetsReceived"] - before["packetsReceived"]
    samples = after["totalSamplesReceived"] - before["totalSamplesReceived"]
    concealed = after["concealedSamples"] - before["concealedSamples"]
    assert after["mimeType"].lower() == "audio/opus"
    assert after_pub["mimeType"].lower() == "audio/opus"
    assert after["jitter"] < 0.05, after  # measured: 6 ms
    # Without DTX Chromium sends 50 packets a second (250 here); with it, about 100 (the tones
    # at 50 a second, the silence at a few).
    audio = await alice.js("() => [dtxAudio.state, dtxAudio.currentTime]")
    assert 0 < sent < 50 * 5 * 0.6, (sent, before_pub, after_pub, audio)
    assert received >= sent * 0.9, (sent, received)
    assert after["packetsLost"] == 0, after
    assert after["totalAudioEnergy"] > before["totalAudioEnergy"], after  # the beeps
    assert samples > 48000 * 4, samples  # the decoder played the whole time
    assert concealed < samples * 0.05, (concealed, samples)  # measured: under 2 %
    assert after["audioLevel"] is not None, after
    # The node read the tones' audio-level extension through the DTX stream: Alice speaks.
    await until_seen(bob, "ActiveSpeakersChanged", lambda e: "alice" in e["speakers"])
