"""The unmodified Mux web SDK (``@mux/spaces-web`` 1.2.0, installed from npm at test time and
never vendored) joins a self-hosted Spaces with only ``window.MUX_SPACES_BACKEND_URL`` set, in
real headless Chromium over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from spaces.sdk import client as sdk
from spaces.sdk.media import TestPatternTrack, read_pattern, same_color
from spaces.server import SpacesServer
from spaces.v1 import presence_pb2
from tests.support.browser import Page, chromium
from tests.support.system import Admin, Tenant, eventually, start_server, web_config

RED, BLUE = (220, 30, 30), (30, 30, 220)

JOIN = """async ([token, name]) => {
  const space = new MuxSpaces.Space(token, { displayName: name });
  window.space = space;
  window.outcome = null;
  space.on("ParticipantTrackSubscribed", (participant, track) => {
    if (track.kind === 2) {
      const video = track.attach(document.createElement("video"));
      harness.watch(participant.id + ":" + track.source, video);
    }
  });
  space.on("ParticipantTrackUnsubscribed", (participant, track) => {
    if (track.kind === 2) harness.unwatch(participant.id + ":" + track.source);
  });
  for (const name of ["LocalParticipantReconnecting", "LocalParticipantReconnected",
                      "LocalParticipantReconnectFailed", "ParticipantLeft", "ParticipantJoined"]) {
    space.on(name, (p) => harness.record(name, p && p.id));
  }
  try {
    const me = await space.join();
    const tracks = await MuxSpaces.getUserMedia({ audio: true, video: true });
    await me.publishTracks(tracks);
    window.outcome = { id: me.id };
  } catch (e) {
    window.outcome = { error: e.name, message: String(e.message) };
  }
  return window.outcome;
}"""


@pytest.fixture
async def web() -> AsyncIterator[tuple[SpacesServer, Admin, Tenant, str]]:
    server = await start_server(web_config())
    admin = Admin(server.address)
    tenant = Tenant(await admin.create_key())
    space_id = await admin.create_space()
    yield server, admin, tenant, space_id
    await admin.close()
    await server.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with chromium() as b:
        yield b


async def mux_page(browser: Any, server: SpacesServer, name: str, color: tuple[int, ...]) -> Page:
    page = await Page.open(browser, f"http://127.0.0.1:{server.signal.port}", name, color)
    await page.load_mux_sdk(f"ws://127.0.0.1:{server.signal.port}")
    return page


async def frames_from(page: Page, key: str) -> int:
    stats = await page.js("harness.stats()")
    return int(stats.get(key, {}).get("frames", 0))


async def color_of(page: Page, key: str) -> list[int] | None:
    stats = await page.js("harness.stats()")
    return stats.get(key, {}).get("color")


def close(color: list[int] | None, expected: tuple[int, ...], tolerance: int = 40) -> bool:
    return color is not None and all(
        abs(a - b) <= tolerance for a, b in zip(color, expected, strict=True)
    )


async def test_two_unmodified_mux_pages_see_each_others_video(web: tuple, browser: Any) -> None:
    server, _, tenant, space_id = web
    alice = await mux_page(browser, server, "alice", RED)
    bob = await mux_page(browser, server, "bob", BLUE)
    results = await asyncio.gather(
        alice.js(JOIN, [tenant.token(space_id, "alice"), "Alice"]),
        bob.js(JOIN, [tenant.token(space_id, "bob"), "Bob"]),
    )
    assert results == [{"id": "alice"}, {"id": "bob"}], alice.log() + bob.log()
    await eventually(lambda: frames_from(alice, "bob:camera"), timeout=15)
    await eventually(
        lambda: _all_at_least([(alice, "bob:camera"), (bob, "alice:camera")], 30), timeout=20
    )
    # Each receiver attributes the frames to the right sender.
    assert close(await color_of(alice, "bob:camera"), BLUE), await alice.js("harness.stats()")
    assert close(await color_of(bob, "alice:camera"), RED), await bob.js("harness.stats()")
    # Each learnt the other's display name, from joined or from participant_connected.
    for page, other in ((alice, "Bob"), (bob, "Alice")):
        joined = (await page.js("harness.messages('in', 'joined')"))[0]["joined"]
        connected = await page.js("harness.messages('in', 'participant_connected')")
        names = [p["display_name"] for p in joined["participants"]]
        names += [m["participant_connected"]["display_name"] for m in connected]
        assert names == [other]
    # ICE gathered loopback only, in both pages' connections.
    for page in (alice, bob):
        assert await page.local_candidate_addresses() == {"127.0.0.1"}, page.log()
    await alice.close()
    await bob.close()


async def _all_at_least(pairs: list[tuple[Page, str]], n: int) -> bool:
    return all([await frames_from(page, key) >= n for page, key in pairs])


async def test_a_mux_page_and_a_python_participant_exchange_media(web: tuple, browser: Any) -> None:
    server, _, tenant, space_id = web
    python = sdk.Space(tenant.token(space_id, "py"), server.address)
    await python.join()
    await python.local.publish(TestPatternTrack((5, 250, 5)), "camera")
    page = await mux_page(browser, server, "web", RED)
    assert await page.js(JOIN, [tenant.token(space_id, "web"), "Web"]) == {"id": "web"}
    await eventually(lambda: _all_at_least([(page, "py:camera")], 30), timeout=20)
    assert close(await color_of(page, "py:camera"), (5, 250, 5)), await page.js("harness.stats()")
    track = await eventually(lambda: python.remote_track("web", "camera"), timeout=15)
    await eventually(lambda: track.frames_received >= 30, timeout=20)
    assert same_color(read_pattern(track.last_frame)[0], RED, tolerance=40)
    await page.close()
    await python.leave()


async def test_a_dropped_mux_page_reconnects_as_itself_and_gets_media_again(
    web: tuple, browser: Any
) -> None:
    server, admin, tenant, space_id = web
    alice = await mux_page(browser, server, "alice", RED)
    bob = await mux_page(browser, server, "bob", BLUE)
    await asyncio.gather(
        alice.js(JOIN, [tenant.token(space_id), "Alice"]),  # a generated participant_id
        bob.js(JOIN, [tenant.token(space_id, "bob"), "Bob"]),
    )
    alice_id = (await alice.js("window.outcome"))["id"]
    await eventually(lambda: _all_at_least([(bob, f"{alice_id}:camera")], 10), timeout=20)
    (bridge,) = server.signal.bridges_of(alice_id)
    dropped_at = {page.name: await page.js("performance.now()") for page in (alice, bob)}
    await bridge.drop()
    # The SDK reconnects with reconnect_id and is admitted as itself, not as a duplicate.
    # (The dropped bridge is listed until its handler ends: one bridge is not yet the new one.)
    await eventually(
        lambda: [b is not bridge for b in server.signal.bridges_of(alice_id)] == [True],
        timeout=10,
    )
    opened = [m for m in await alice.js("harness.wire") if m["dir"] == "open"]
    assert len(opened) == 2 and f"reconnect_id={alice_id}" in opened[1]["url"]
    await eventually(
        lambda: _participants_are(admin, space_id, sorted([alice_id, "bob"])), timeout=10
    )
    # Media flows again, both ways: the 10th frame presented after the drop came within 5 s
    # of it, by each page's own clock.
    for page, key in ((bob, f"{alice_id}:camera"), (alice, "bob:camera")):
        since = dropped_at[page.name]
        tenth = await eventually(
            lambda p=page, k=key, t=since: p.js(
                "([k, t]) => harness.nthFrameAfter(k, t, 10)", [k, t]
            ),
            timeout=15,
        )
        assert tenth - since < 5000, (
            f"{page.name}: media back {tenth - since:.0f} ms after the drop"
        )
    await alice.close()
    await bob.close()


async def _participants_are(admin: Admin, space_id: str, expected: list[str]) -> bool:
    return sorted(p.participant_id for p in await admin.participants(space_id)) == expected


async def _grew(page: Page, key: str, before: int, by: int) -> bool:
    return await frames_from(page, key) >= before + by


async def test_a_duplicate_participant_id_is_refused_and_the_first_keeps_its_media(
    web: tuple, browser: Any
) -> None:
    server, _, tenant, space_id = web
    alice = await mux_page(browser, server, "alice", RED)
    bob = await mux_page(browser, server, "bob", BLUE)
    await asyncio.gather(
        alice.js(JOIN, [tenant.token(space_id, "alice"), "Alice"]),
        bob.js(JOIN, [tenant.token(space_id, "bob"), "Bob"]),
    )
    await eventually(lambda: _all_at_least([(bob, "alice:camera")], 10), timeout=20)
    twin = await mux_page(browser, server, "twin", BLUE)
    outcome = await twin.js(JOIN, [tenant.token(space_id, "alice"), "Twin"])
    assert outcome["error"] == "JWTError", outcome
    errors = await twin.js("harness.messages('in', 'error')")
    assert errors[0]["error"]["type"] == 3
    before = await frames_from(bob, "alice:camera")
    await eventually(lambda: _grew(bob, "alice:camera", before, 15), timeout=10)
    assert close(await color_of(bob, "alice:camera"), RED)
    for page in (alice, bob, twin):
        await page.close()


async def test_a_bad_token_rejects_join_instead_of_hanging(web: tuple, browser: Any) -> None:
    server, _, tenant, space_id = web
    page = await mux_page(browser, server, "x", RED)
    # Well-formed (the SDK decodes tokens itself) but for a signing key that does not exist.
    other = Tenant(tenant.key.__class__(id="unknown-key", private_key=tenant.key.private_key))
    outcome = await asyncio.wait_for(page.js(JOIN, [other.token(space_id, "x"), "X"]), 10)
    assert outcome["error"] == "JWTError", outcome
    errors = await page.js("harness.messages('in', 'error')")
    assert errors[0]["error"]["type"] == 6
    await page.close()


async def test_a_kicked_mux_page_is_closed_with_4000_and_does_not_return(
    web: tuple, browser: Any
) -> None:
    server, admin, tenant, space_id = web
    page = await mux_page(browser, server, "alice", RED)
    assert await page.js(JOIN, [tenant.token(space_id, "alice"), "Alice"]) == {"id": "alice"}
    await admin.presence.RemoveParticipant(
        presence_pb2.RemoveParticipantRequest(space_id=space_id, participant_id="alice"),
        metadata=admin.md,
    )

    async def closed() -> list[int]:
        return [m["code"] for m in await page.js("harness.wire") if m["dir"] == "close"]

    assert await eventually(closed, timeout=10) == [4000]
    await asyncio.sleep(1.5)  # the SDK's first reconnect would be immediate
    opened = [m for m in await page.js("harness.wire") if m["dir"] == "open"]
    assert len(opened) == 1
    assert server.signal.bridges_of("alice") == []
    await page.close()


EVENTS = """() => {
  const seen = [];
  for (const name of ["ParticipantTrackUnpublished", "ParticipantTrackUnsubscribed",
                      "ParticipantTrackMuted", "ParticipantTrackUnmuted",
                      "ActiveSpeakersChanged", "ParticipantTrackSubscribed"]) {
    space.on(name, (...args) => {
      const [first, second] = args;
      seen.push({
        name,
        participant: first && first.id,
        speakers: Array.isArray(first)
          ? first.map((s) => s.participant && s.participant.id)
          : undefined,
        source: second && second.source,
      });
    });
  }
  window.seenEvents = seen;
}"""


async def seen(page: Page, name: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = await page.js("window.seenEvents || []")
    return [e for e in events if e["name"] == name]


async def test_unpublish_mute_and_active_speakers_reach_a_mux_page(
    web: tuple, browser: Any
) -> None:
    server, _, tenant, space_id = web
    alice = await mux_page(browser, server, "alice", RED)
    bob = await mux_page(browser, server, "bob", BLUE)
    await bob.js(JOIN, [tenant.token(space_id, "bob"), "Bob"])
    await bob.js(EVENTS)
    await alice.js(JOIN, [tenant.token(space_id, "alice"), "Alice"])
    await eventually(lambda: _all_at_least([(bob, "alice:camera")], 10), timeout=20)
    # Chromium's fake microphone beeps: alice becomes an active speaker, read from the RTP
    # audio-level extension without decoding.
    await eventually(
        lambda: _any(seen(bob, "ActiveSpeakersChanged"), lambda e: "alice" in e["speakers"]),
        timeout=15,
    )
    await alice.js("space.localParticipant.getVideoTracks()[0].mute()")
    await eventually(lambda: seen(bob, "ParticipantTrackMuted"), timeout=10)
    await alice.js("space.localParticipant.getVideoTracks()[0].unMute()")
    await eventually(lambda: seen(bob, "ParticipantTrackUnmuted"), timeout=10)
    before = await frames_from(bob, "alice:camera")
    await eventually(lambda: _grew(bob, "alice:camera", before, 10), timeout=10)
    await alice.js(
        "space.localParticipant.unpublishTracks(space.localParticipant.getVideoTracks())"
    )
    unpublished = await eventually(lambda: seen(bob, "ParticipantTrackUnpublished"), timeout=10)
    assert unpublished[0]["participant"] == "alice" and unpublished[0]["source"] == "camera"
    await alice.close()
    await bob.close()


async def _any(events: Any, predicate: Any) -> bool:
    return any(predicate(e) for e in await events)


async def test_manual_subscription_receives_only_who_it_subscribes(
    web: tuple, browser: Any
) -> None:
    server, _, tenant, space_id = web
    alice = await mux_page(browser, server, "alice", RED)
    carol = await mux_page(browser, server, "carol", (30, 200, 30))
    bob = await mux_page(browser, server, "bob", BLUE)
    await alice.js(JOIN, [tenant.token(space_id, "alice"), "Alice"])
    await carol.js(JOIN, [tenant.token(space_id, "carol"), "Carol"])
    manual = JOIN.replace(
        "{ displayName: name }", '{ displayName: name, subscriptionMode: "MANUAL" }'
    )
    await bob.js(manual, [tenant.token(space_id, "bob"), "Bob"])
    await asyncio.sleep(2)
    assert await bob.js("harness.stats()") == {}  # nothing until it subscribes
    await bob.js(
        """async () => {
          const alice = [...space.participants.values()].find((p) => p.id === "alice");
          await alice.subscribe();
        }"""
    )
    await eventually(lambda: _all_at_least([(bob, "alice:camera")], 30), timeout=20)
    assert close(await color_of(bob, "alice:camera"), RED)
    assert "carol:camera" not in await bob.js("harness.stats()")
    await bob.js(EVENTS)
    await bob.js(
        """async () => {
          const alice = [...space.participants.values()].find((p) => p.id === "alice");
          await alice.unsubscribe();
        }"""
    )
    await eventually(lambda: seen(bob, "ParticipantTrackUnsubscribed"), timeout=10)
    for page in (alice, carol, bob):
        await page.close()


async def test_automatic_subscription_keeps_the_requested_number_of_participants(
    web: tuple, browser: Any
) -> None:
    server, _, tenant, space_id = web
    alice = await mux_page(browser, server, "alice", RED)
    carol = await mux_page(browser, server, "carol", (30, 200, 30))
    bob = await mux_page(browser, server, "bob", BLUE)
    await alice.js(JOIN, [tenant.token(space_id, "alice"), "Alice"])
    await carol.js(JOIN, [tenant.token(space_id, "carol"), "Carol"])
    limited = JOIN.replace(
        "{ displayName: name }", "{ displayName: name, automaticParticipantLimit: 1 }"
    )
    await bob.js(limited, [tenant.token(space_id, "bob"), "Bob"])
    opened = [m for m in await bob.js("harness.wire") if m["dir"] == "open"]
    assert "managed_subscriptions=1" in opened[0]["url"]
    await eventually(lambda: _has_frames(bob, 1), timeout=20)
    for _ in range(10):  # however speakers change, never more than one participant at a time
        await asyncio.sleep(0.3)
        stats = await bob.js("harness.stats()")
        assert len([k for k in stats if k.endswith(":camera")]) == 1, stats
    for page in (alice, carol, bob):
        await page.close()


async def _has_frames(page: Page, n: int) -> bool:
    stats = await page.js("harness.stats()")
    return len([k for k, v in stats.items() if v["frames"] > 10]) >= n
