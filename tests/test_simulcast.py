"""Simulcast in real headless Chromium against a real single-process server: a page publishes
three VP8 layers (our client, with the encodings from ``joined.simulcast``), the node receives
each at the RTP level and forwards each subscriber exactly one, at the layer its request and its
link allow, switching at keyframes without breaking the decoder. The unmodified Mux SDK
(installed from npm at test time) publishes the same layers from the same ``joined``.

The publisher paints shifting noise around its colour (tests/support/harness.js, ``busy``), so
each layer is sent at about its configured bitrate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from spaces import metrics
from spaces.config import SimulcastConfig, parse_encodings
from spaces.media.room import PublishedTrack
from spaces.server import SpacesServer
from tests.support.browser import Page, chromium
from tests.support.system import Admin, Tenant, eventually, start_server, web_config
from tests.test_browser_mux import JOIN as MUX_JOIN

PUBLISHING = """    const tracks = await MuxSpaces.getUserMedia({ audio: true, video: true });
    await me.publishTracks(tracks);
"""
assert PUBLISHING in MUX_JOIN

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
WEBAPP = ROOT / "tests" / "support" / "webapp.js"
LAYERS = "q/4/150,h/2/500,f/1/1500"
CAMERA = {"width": 960, "height": 540, "fps": 15, "busy": True}
WIDTHS = (240, 480, 960)
"""Each layer's frame width: the camera's divided by the layer's scale."""
MAX_FREEZES = 3
"""Freezes a subscriber may count (Chromium's freezeCount) across a layer switch."""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Any]:
    async with chromium() as b:
        yield b


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> AsyncIterator[SpacesServer]:
    config = web_config()
    config = replace(config, simulcast=SimulcastConfig(camera=parse_encodings(LAYERS)))
    s = await start_server(config)
    yield s
    await s.stop()


class World:
    def __init__(self, server: SpacesServer, browser: Any, admin: Admin, tenant: Tenant) -> None:
        self.server = server
        self.browser = browser
        self.admin = admin
        self.tenant = tenant
        self.space_id = ""
        self.pages: list[Page] = []

    async def joined(self, name: str, *, publish: bool = False) -> Page:
        page = await Page.open(self.browser, str(self.server.signal.url), name, (200, 40, 40))
        await page.page.add_script_tag(path=str(WEBAPP))
        await page.js("c => harness.setCamera(c)", CAMERA)
        self.pages.append(page)
        token = self.tenant.token(self.space_id, name)
        result = await page.js("([t, o]) => app.join(t, o)", [token, {}])
        assert result.get("participantId") == name, (result, page.log())
        if publish:
            published = await page.js("() => app.publish({audio: true, video: true})")
            assert isinstance(published, list), (published, page.log())
        return page

    async def mux_joined(self, name: str, *, publish: bool) -> Page:
        """A page running the unmodified Mux SDK (test_browser_mux's JOIN), publishing its
        camera and microphone or only subscribing."""
        signal = self.server.signal
        page = await Page.open(self.browser, str(signal.url), name, (40, 40, 200))
        await page.js("c => harness.setCamera(c)", CAMERA)
        await page.load_mux_sdk(f"ws://127.0.0.1:{signal.port}")
        self.pages.append(page)
        script = MUX_JOIN if publish else MUX_JOIN.replace(PUBLISHING, "")
        outcome = await page.js(script, [self.tenant.token(self.space_id, name), name])
        assert outcome == {"id": name}, (outcome, page.log())
        return page

    def cut_history(self) -> dict[str, list[str]]:
        """Each session's bandwidth estimate cuts, and why (spaces.media.bwe.Cut), by
        participant: for the messages of assertions about the layers subscribers get."""
        room = self.server.media_node.rooms.get(self.space_id)
        if room is None:
            return {}
        return {
            s.participant_id: [str(cut) for cut in s._bwe.history] for s in room.sessions.values()
        }

    def room_track(self, participant_id: str, source: str = "camera") -> PublishedTrack | None:
        room = self.server.media_node.rooms.get(self.space_id)
        if room is None:
            return None
        for track in room.tracks.values():
            if track.owner.participant_id == participant_id and track.source == source:
                return track
        return None


@pytest_asyncio.fixture(loop_scope="module")
async def world(server: SpacesServer, browser: Any) -> AsyncIterator[World]:
    admin = Admin(server.address)
    w = World(server, browser, admin, Tenant(await admin.create_key()))
    w.space_id = await admin.create_space()
    yield w
    for page in w.pages:
        await page.close()
    await admin.close()


async def inbound(page: Page) -> dict[str, Any]:
    """The page's one inbound video stream's stats (it subscribes to one video track)."""
    stats = await page.js("() => harness.rtpStats()")
    videos = [s for s in stats["inbound"] if s["framesDecoded"] or s["bytesReceived"]]
    assert len(videos) <= 1, stats
    return videos[0] if videos else {}


async def until_width(
    page: Page, width: int, timeout: float, world: World | None = None
) -> dict[str, Any]:
    """Until ``page`` decodes ``width`` wide (``world``: its estimate cuts go in the message)."""

    async def check() -> dict[str, Any] | None:
        s = await inbound(page)
        return s if s.get("frameWidth") == width else None

    try:
        result: dict[str, Any] = await eventually(check, timeout=timeout, interval=0.25)
    except AssertionError:
        cuts = "" if world is None else f", estimate cuts {world.cut_history()}"
        raise AssertionError(
            f"{page.name}: never {width} wide: {await inbound(page)}{cuts}"
        ) from None
    return result


def live_layers(track: PublishedTrack) -> list[str]:
    now = time.monotonic()
    return [f.rid for f in track.layers if f.ssrc and now - f.last_packet_at < 1.0]


def followed(track: PublishedTrack) -> dict[str, list[str]]:
    """subscriber participant id -> the layers (rids) whose fan-out includes it."""
    out: dict[str, list[str]] = {}
    for layer in track.layers:
        for downtrack in layer.downtracks:
            out.setdefault(downtrack.subscriber_id, []).append(layer.rid)
    return out


async def set_quality(page: Page, publisher: str, request: dict[str, Any]) -> None:
    await page.js(
        """([pid, request]) => {
          const p = [...app.space.remoteParticipants.values()].find((p) => p.id === pid);
          app.space.setVideoQuality(p.getVideoTracks()[0], request);
        }""",
        [publisher, request],
    )


async def test_three_layers_in_and_each_subscriber_gets_exactly_one(world: World) -> None:
    publisher = await world.joined("pub", publish=True)
    viewers = [await world.joined(f"viewer{i}") for i in range(2)]
    track = await eventually(lambda: world.room_track("pub"), timeout=10)
    assert [f.rid for f in track.layers] == ["q", "h", "f"]
    # The node learnt every layer's SSRC from the rid extension, and gets packets on each.
    await eventually(lambda: live_layers(track) == ["q", "h", "f"], timeout=20)
    assert len({f.ssrc for f in track.layers}) == 3
    # The publisher's own stats: three encodings, each sending.
    sent = await publisher.js("() => harness.rtpStats()")
    assert sorted(s["rid"] for s in sent["outbound"]) == ["f", "h", "q"], sent
    # Each unshaped subscriber settles on the top layer, and is in exactly one fan-out.
    for viewer in viewers:
        await until_width(viewer, WIDTHS[-1], timeout=25, world=world)
    assert followed(track) == {"viewer0": ["f"], "viewer1": ["f"]}, (
        followed(track),
        world.cut_history(),
    )
    for viewer in viewers:
        await eventually(lambda v=viewer: _decoded_more(v, 30), timeout=15, interval=0.25)
        stats = await inbound(viewer)
        assert stats["frameWidth"] == WIDTHS[-1], (
            stats,
            followed(track),
            (await publisher.js("() => harness.rtpStats()"))["outbound"],
            world.cut_history(),
        )


async def test_a_requested_low_maximum_gives_that_layer_and_switches_keep_decoding(
    world: World,
) -> None:
    await world.joined("pub", publish=True)
    viewer = await world.joined("viewer")
    other = await world.joined("other")
    track = await eventually(lambda: world.room_track("pub"), timeout=10)
    await until_width(viewer, WIDTHS[-1], timeout=25, world=world)
    await until_width(other, WIDTHS[-1], timeout=25, world=world)
    before = await inbound(viewer)
    switches = {d: _sample(metrics.LAYER_SWITCHES, direction=d) for d in ("up", "down")}
    keyframes = _sample(metrics.SWITCH_KEYFRAME_REQUESTS)
    estimates = _histogram(metrics.ESTIMATED_BANDWIDTH)
    assert _sample(metrics.LAYER_SUBSCRIBERS, layer="2") == 2, world.cut_history()
    # Down to the lowest layer by quality, then to the middle one by rendered size, then back up.
    await set_quality(viewer, "pub", {"quality": "low"})
    low = await until_width(viewer, WIDTHS[0], timeout=10, world=world)
    assert followed(track)["viewer"] == ["q"], (followed(track), world.cut_history())
    # The metrics count it: one subscription on each of the lowest and the top layer.
    assert _sample(metrics.LAYER_SUBSCRIBERS, layer="0") == 1, (
        followed(track),
        world.cut_history(),
    )
    assert _sample(metrics.LAYER_SUBSCRIBERS, layer="2") == 1, (
        followed(track),
        world.cut_history(),
    )
    assert _sample(metrics.AUDIO_ONLY_SUBSCRIBERS) == 0, world.cut_history()
    assert followed(track)["other"] == ["f"], (
        "another subscriber keeps its own layer",
        followed(track),
        world.cut_history(),
    )
    await set_quality(viewer, "pub", {"width": 400, "height": 220})
    mid = await until_width(viewer, WIDTHS[1], timeout=10, world=world)
    assert followed(track)["viewer"] == ["h"], (followed(track), world.cut_history())
    await set_quality(viewer, "pub", {"quality": ""})
    await until_width(viewer, WIDTHS[-1], timeout=10, world=world)
    # Frames kept coming through every switch: decoded frames rise, freezes stay rare.
    decoded = (await inbound(viewer))["framesDecoded"]
    await eventually(lambda: _decoded_more(viewer, decoded + 15), timeout=10, interval=0.25)
    after = await inbound(viewer)
    assert before["framesDecoded"] < low["framesDecoded"] < mid["framesDecoded"]
    assert after["freezeCount"] - before["freezeCount"] <= MAX_FREEZES, (before, after)
    frozen = after["totalFreezesDuration"] - before["totalFreezesDuration"]
    assert frozen < MAX_FREEZES * 1.0, (before, after)
    # The switches were asked for by PLI on the target layer: the keyframe requester of each
    # layer the viewer went to sent at least one.
    assert all(layer.keyframe_requests_sent >= 1 for layer in track.layers)
    # Metrics: the three switches (one down to "q", one up to "h", one up to "f"), each of them
    # asking its target layer for a keyframe; the estimates of both subscribers observed on
    # every tick (0.5 s), on the unshaped link above 1.5 Mbps.
    assert _sample(metrics.LAYER_SWITCHES, direction="down") == switches["down"] + 1
    assert _sample(metrics.LAYER_SWITCHES, direction="up") == switches["up"] + 2
    assert _sample(metrics.SWITCH_KEYFRAME_REQUESTS) == keyframes + 3
    now = _histogram(metrics.ESTIMATED_BANDWIDTH)
    assert now["+Inf"] - estimates["+Inf"] >= 10, (estimates, now)
    above = now["+Inf"] - now["1500000.0"] - (estimates["+Inf"] - estimates["1500000.0"])
    assert above >= 10, (estimates, now)


async def outbound(page: Page) -> dict[str, dict[str, Any]]:
    """The page's outbound video stats per rid, with the time they were read (ms)."""
    stats = await page.js("() => harness.rtpStats()")
    return {s["rid"]: {**s, "at": stats["at"]} for s in stats["outbound"]}


async def sent_rates(page: Page, seconds: float = 2.0) -> dict[str, float]:
    """What the page sends of each layer (bits per second) over ``seconds``."""
    before = await outbound(page)
    await asyncio.sleep(seconds)
    after = await outbound(page)
    return {
        rid: (after[rid]["bytesSent"] - before[rid]["bytesSent"])
        * 8000
        / (after[rid]["at"] - before[rid]["at"])
        for rid in after
        if rid in before
    }


async def test_layers_no_subscriber_wants_stop_being_sent_and_resume_on_demand(
    world: World,
) -> None:
    publisher = await world.joined("pub", publish=True)
    viewer = await world.joined("viewer")
    track = await eventually(lambda: world.room_track("pub"), timeout=10)
    assert track.dynacast is not None
    await until_width(viewer, WIDTHS[-1], timeout=25)
    full = await sent_rates(publisher)
    assert all(full[rid] > 0 for rid in ("q", "h", "f")), full
    pauses = _sample(metrics.DYNACAST_UPDATES, change="pause")
    resumes = _sample(metrics.DYNACAST_UPDATES, change="resume")
    # The only subscriber wants the lowest layer: the node asks the publisher for q alone
    # (after the pause delay), and the browser stops encoding h and f.
    await set_quality(viewer, "pub", {"quality": "low"})
    await until_width(viewer, WIDTHS[0], timeout=10)

    async def paused() -> dict[str, dict[str, Any]] | None:
        out = await outbound(publisher)
        return out if not out["f"]["active"] and not out["h"]["active"] else None

    stopped = await eventually(paused, timeout=15, interval=0.25)
    assert stopped["q"]["active"], stopped
    assert track.dynacast.sending == 1
    assert _sample(metrics.PAUSED_LAYERS) == 2
    assert _sample(metrics.DYNACAST_UPDATES, change="pause") == pauses + 1
    # Paused for real: f and h send nothing more, q goes on.
    await asyncio.sleep(0.5)  # packets already queued in the pacer when the encoding stopped
    low = await sent_rates(publisher)
    assert low["f"] == 0 and low["h"] == 0, low
    assert low["q"] > 0, low
    assert followed(track) == {"viewer": ["q"]}, "nothing of a paused layer is forwarded"
    print(
        f"dynacast: publisher sends {sum(full.values()) / 1000:.0f} kbps with every layer "
        f"({', '.join(f'{r} {v / 1000:.0f}' for r, v in full.items())}), "
        f"{sum(low.values()) / 1000:.0f} kbps with q alone"
    )
    # Demand for the top layer again: the publisher sends it within 5 s (no pause delay).
    flat = (await outbound(publisher))["f"]["bytesSent"]
    await set_quality(viewer, "pub", {"quality": "high"})

    async def resumed() -> bool:
        out = await outbound(publisher)
        return bool(out["f"]["active"] and out["f"]["bytesSent"] > flat)

    await eventually(resumed, timeout=5, interval=0.1)
    assert _sample(metrics.DYNACAST_UPDATES, change="resume") == resumes + 1
    assert track.dynacast.sending == 3
    assert _sample(metrics.PAUSED_LAYERS) == 0
    # ...and the viewer climbs back to it.
    await until_width(viewer, WIDTHS[-1], timeout=25)


async def test_a_publisher_alone_pauses_every_layer_and_the_first_subscriber_resumes_them(
    world: World,
) -> None:
    publisher = await world.joined("pub", publish=True)
    track = await eventually(lambda: world.room_track("pub"), timeout=10)
    assert track.dynacast is not None

    async def all_paused() -> bool:
        out = await outbound(publisher)
        return len(out) == 3 and not any(s["active"] for s in out.values())

    # Nobody subscribes: nothing is wanted (as LiveKit's OFF), so no encoding stays active.
    await eventually(all_paused, timeout=15, interval=0.25)
    assert track.dynacast.sending == 0
    assert _sample(metrics.PAUSED_LAYERS) == 3
    flat = {rid: s["bytesSent"] for rid, s in (await outbound(publisher)).items()}
    # The first subscriber wants everything: every layer resumes, and it gets video.
    viewer = await world.joined("viewer")

    async def all_sending() -> bool:
        out = await outbound(publisher)
        return all(out[rid]["active"] and out[rid]["bytesSent"] > flat[rid] for rid in flat)

    await eventually(all_sending, timeout=10, interval=0.2)
    assert track.dynacast.sending == 3
    await until_width(viewer, WIDTHS[-1], timeout=25)


async def _decoded_more(page: Page, count: int) -> bool:
    return (await inbound(page)).get("framesDecoded", 0) >= count


async def test_the_python_sdk_asks_for_a_layer_and_bad_requests_are_refused(world: World) -> None:
    from spaces.sdk import Space, SpacesClientError

    await world.joined("pub", publish=True)
    python = Space(world.tenant.token(world.space_id, "python"), world.server.address)
    await python.join()
    try:
        camera = await eventually(lambda: python.remote_track("pub", "camera"), timeout=10)
        await eventually(lambda: camera.last_frame is not None, timeout=20)
        await eventually(lambda: camera.last_frame.width == WIDTHS[-1], timeout=20)
        await python.set_video_quality(camera, "low")
        await eventually(lambda: camera.last_frame.width == WIDTHS[0], timeout=10)
        await python.set_video_quality(camera, width=480, height=270)
        await eventually(lambda: camera.last_frame.width == WIDTHS[1], timeout=10)
        with pytest.raises(SpacesClientError) as missing:
            await python.set_video_quality("no-such-track", "low")
        assert missing.value.code == "NOT_FOUND"
        with pytest.raises(ValueError):
            await python.set_video_quality(camera, "best")
        # The session goes on after the refusals.
        await python.set_video_quality(camera, "")
        await eventually(lambda: camera.last_frame.width == WIDTHS[-1], timeout=10)
    finally:
        await python.leave()


def _sample(metric: Any, **labels: str) -> float:
    name = metric._name
    suffix = "_total" if metric._type == "counter" else ""
    value = REGISTRY.get_sample_value(name + suffix, labels)
    return value or 0.0


def _histogram(metric: Any) -> dict[str, float]:
    """Cumulative bucket counts by upper bound ("1500000.0", "+Inf", ...)."""
    out: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bound = sample.labels["le"]
                out[bound if bound == "+Inf" else str(float(bound))] = sample.value
    return out


async def _equal(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def until_settled(
    world: World, track: PublishedTrack, page: Page, rid: str, width: int, timeout: float
) -> None:
    """Until ``page`` (a participant named as its page) follows layer ``rid`` of ``track`` and
    decodes it ``width`` wide, chosen with a bandwidth estimate (a new subscription's first
    layer is chosen before the subscriber has any)."""

    async def check() -> bool:
        room = world.server.media_node.rooms[world.space_id]
        session = next(s for s in room.sessions.values() if s.participant_id == page.name)
        if session.estimate is None or followed(track).get(page.name) != [rid]:
            return False
        return bool((await inbound(page)).get("frameWidth") == width)

    try:
        await eventually(check, timeout=timeout, interval=0.25)
    except AssertionError:
        raise AssertionError(
            f"{page.name}: never on {rid} ({width} wide): {followed(track)}, "
            f"{await inbound(page)}, estimate cuts {world.cut_history()}"
        ) from None


def received(layer: Any) -> int:
    """Packets the node has received on one layer (the native plane counts them)."""
    assert layer.native is not None, "the node runs the native data plane"
    return int(layer.native.packets_in)


async def test_the_unmodified_mux_sdk_publishes_the_joined_layers_and_subscribers_get_them(
    world: World,
) -> None:
    publisher = await world.mux_joined("pub", publish=True)
    # publishTracks() resolves before the SDK negotiates: the track is there once it offered.
    track = await eventually(lambda: world.room_track("pub"), timeout=10)
    assert [f.rid for f in track.layers] == ["q", "h", "f"]
    # The SDK got the camera encodings in joined, made them its sender's encodings, and
    # offered them as simulcast.
    (joined,) = await publisher.js("harness.messages('in', 'joined')")
    encodings = joined["joined"]["simulcast"]["camera_encodings"]
    assert [e["rid"] for e in encodings] == ["q", "h", "f"], encodings
    (sending,) = await publisher.js("harness.sendEncodings()")
    assert [(e["rid"], e["scaleResolutionDownBy"], e["maxBitrate"]) for e in sending] == [
        (e["rid"], e["scale_resolution_down_by"], e["max_bitrate"]) for e in encodings
    ], (sending, encodings)
    (offer,) = await publisher.js("harness.messages('out', 'offer')")
    assert "a=simulcast:send q;h;f" in offer["offer"], offer
    # The node received each as a layer: an SSRC of its own, and packets on every layer.
    await eventually(lambda: live_layers(track) == ["q", "h", "f"], timeout=20)
    assert len({f.ssrc for f in track.layers}) == 3
    # The publisher's stats, once connected: an outbound-rtp per encoding of joined, sending.
    rates = await sent_rates(publisher)
    assert sorted(rates) == ["f", "h", "q"] and all(v > 0 for v in rates.values()), (
        rates,
        await outbound(publisher),
    )
    before = [received(layer) for layer in track.layers]
    await asyncio.sleep(1.0)
    after = [received(layer) for layer in track.layers]
    assert all(b > a for a, b in zip(before, after, strict=True)), (before, after)
    # A second Mux page and one of our own client each settle on the top layer (their
    # bandwidth estimates climb to it: Mux's SDK has no way to ask for a layer).
    mux_viewer = await world.mux_joined("muxviewer", publish=False)
    viewer = await world.joined("viewer")
    await until_settled(world, track, mux_viewer, "f", WIDTHS[-1], timeout=25)
    await until_settled(world, track, viewer, "f", WIDTHS[-1], timeout=25)
    # Ours asks for the lowest layer: it gets q (the Mux page keeps f), then f again.
    await set_quality(viewer, "pub", {"quality": "low"})
    low = await until_width(viewer, WIDTHS[0], timeout=10, world=world)
    assert followed(track) == {"muxviewer": ["f"], "viewer": ["q"]}, (
        followed(track),
        world.cut_history(),
    )
    await set_quality(viewer, "pub", {"quality": ""})
    high = await until_width(viewer, WIDTHS[-1], timeout=15, world=world)
    assert followed(track) == {"muxviewer": ["f"], "viewer": ["f"]}, (
        followed(track),
        world.cut_history(),
    )
    assert high["framesDecoded"] > low["framesDecoded"]
    await eventually(
        lambda: _decoded_more(viewer, high["framesDecoded"] + 15), timeout=10, interval=0.25
    )
    stats = await inbound(mux_viewer)
    assert stats["frameWidth"] == WIDTHS[-1], (stats, world.cut_history())
    # Mux's SDK cannot be told to pause a layer (it was alone at first, wanting none): it is
    # never sent our layers_wanted.
    assert await publisher.js("harness.messages('in', 'layers_wanted')") == []
