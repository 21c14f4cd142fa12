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
    await bridge.drop()
    # The SDK reconnects with reconnect_id and is admitted as itself, not as a duplicate.
    await eventually(lambda: len(server.signal.bridges_of(alice_id)) == 1, timeout=10)
    opened = [m for m in await alice.js("harness.wire") if m["dir"] == "open"]
    assert len(opened) == 2 and f"reconnect_id={alice_id}" in opened[1]["url"]
    assert sorted(p.participant_id for p in await admin.participants(space_id)) == sorted(
        [alice_id, "bob"]
    )
    # Media flows again, both ways, within 5 s of the drop.
    before_bob = await frames_from(bob, f"{alice_id}:camera")
    before_alice = await frames_from(alice, "bob:camera")
    await eventually(
        lambda: _grew(bob, f"{alice_id}:camera", before_bob, 10), timeout=5, interval=0.1
    )
    await eventually(lambda: _grew(alice, "bob:camera", before_alice, 10), timeout=5)
    await alice.close()
    await bob.close()


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
