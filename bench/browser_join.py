"""Browser join to first remote frame, with our browser client (``/sdk/spaces.js``).

One ``spaces serve`` process (the embedded single-process mode, signaling service included) and
headless Chromium (the test suite's launcher: Debian's /usr/bin/chromium, fake devices,
loopback ICE). A publisher page joins first and sends Chromium's fake camera. Then, one at a
time, a fresh page joins the space as a subscriber and is timed, in the page, from
``new Space(token).join()`` to the first frame of the publisher's video that the page presents
(``requestVideoFrameCallback``'s presentation time); the page then leaves. Phases are reported
too: ``joined`` (the WebSocket, Join through presence, the node's session and its first
subscriber offer), and ``subscribed`` (the track's ``ontrack``).

Baseline, in the same run and the same browser: two peer connections inside one page, connected
directly (no server at all), from ``createOffer`` to the first presented frame. That is what
WebRTC itself costs on this machine (ICE, DTLS, a keyframe, a decode); the ratio says how much
the whole Spaces path costs on top."""

from __future__ import annotations

import asyncio
from typing import Any

from bench.cluster import Admin, Cluster
from bench.common import CpuWindow, fmt, say, summarize, table, wait_quiet
from spaces.cluster import free_port
from tests.support.browser import chromium

NAME = "browser-join"
SUMMARY = "browser join to first remote video frame (our web client), p50/p95, vs direct WebRTC"

FULL_JOINS = 40
FULL_DIRECT = 20
QUICK_JOINS = 3
QUICK_DIRECT = 2
FRAME_TIMEOUT_MS = 10_000
PAUSE_S = 0.3
"""Between joins: the previous page's session ends before the next one starts."""
TARGET_P95_MS = 500.0

PUBLISH = """async (token) => {
    const { Space, getUserMedia } = await import("/sdk/spaces.js");
    const space = new Space(token, { displayName: "publisher" });
    const local = await space.join();
    await local.publishTracks(await getUserMedia({ audio: false, video: true }));
    window.publisher = space;
    return local.id;
}"""

JOIN = """async ([token, timeoutMs]) => {
    const { Space, SpaceEvent, TrackKind } = await import("/sdk/spaces.js");
    const marks = {};
    const started = performance.now();
    const space = new Space(token);
    const frame = new Promise((resolve, reject) => {
        const late = () => reject(new Error("no remote frame within " + timeoutMs + " ms"));
        setTimeout(late, timeoutMs);
        space.on(SpaceEvent.ParticipantTrackSubscribed, (participant, track) => {
            if (track.kind !== TrackKind.Video || marks.subscribed) return;
            marks.subscribed = performance.now();
            const video = document.createElement("video");
            video.muted = true;
            video.playsInline = true;
            video.srcObject = new MediaStream([track.track]);
            document.body.append(video);
            video.requestVideoFrameCallback((now, meta) => resolve(meta.presentationTime || now));
            video.play().catch(() => {});
        });
    });
    try {
        await space.join();
        marks.joined = performance.now();
        marks.frame = await frame;
    } finally {
        space.leave();
    }
    return {
        joined_ms: marks.joined - started,
        subscribed_ms: marks.subscribed - started,
        first_frame_ms: marks.frame - started,
    };
}"""

DIRECT = """async (timeoutMs) => {
    const stream = await navigator.mediaDevices.getUserMedia({ video: true });
    await new Promise((resolve) => setTimeout(resolve, 1000)); // a camera already running
    const sender = new RTCPeerConnection();
    const receiver = new RTCPeerConnection();
    sender.onicecandidate = (e) => e.candidate && receiver.addIceCandidate(e.candidate);
    receiver.onicecandidate = (e) => e.candidate && sender.addIceCandidate(e.candidate);
    const started = performance.now();
    const frame = new Promise((resolve, reject) => {
        const late = () => reject(new Error("no direct frame within " + timeoutMs + " ms"));
        setTimeout(late, timeoutMs);
        receiver.ontrack = (event) => {
            const video = document.createElement("video");
            video.muted = true;
            video.srcObject = new MediaStream([event.track]);
            document.body.append(video);
            video.requestVideoFrameCallback((now, meta) => resolve(meta.presentationTime || now));
            video.play().catch(() => {});
        };
    });
    sender.addTransceiver(stream.getVideoTracks()[0], { direction: "sendonly" });
    await sender.setLocalDescription(await sender.createOffer());
    await receiver.setRemoteDescription(sender.localDescription);
    await receiver.setLocalDescription(await receiver.createAnswer());
    await sender.setRemoteDescription(receiver.localDescription);
    try {
        return { first_frame_ms: (await frame) - started };
    } finally {
        sender.close();
        receiver.close();
        stream.getTracks().forEach((t) => t.stop());
    }
}"""


async def measure(browser: Any, url: str, script: str, arg: Any) -> dict[str, float]:
    """One fresh page (its own context: its own devices), one measured run in it."""
    context = await browser.new_context()
    try:
        page = await context.new_page()
        await page.goto(url)
        # The module is loaded before the clock starts: the figure is join(), not a download.
        await page.evaluate("() => import('/sdk/spaces.js').then(() => true)")
        result: dict[str, float] = await page.evaluate(script, arg)
        return result
    finally:
        await context.close()


async def run(quick: bool) -> dict[str, Any]:
    joins, direct_runs = (QUICK_JOINS, QUICK_DIRECT) if quick else (FULL_JOINS, FULL_DIRECT)
    cluster = Cluster()
    signal_port = free_port()
    samples: list[dict[str, float]] = []
    direct: list[float] = []
    failures: list[str] = []
    try:
        server = cluster.start_spaces(
            "server", "serve", SPACES_SIGNAL_ADDR=f"127.0.0.1:{signal_port}"
        )
        await cluster.wait_serving(server)
        admin = Admin(server.address, cluster.admin_key)
        key = await admin.signing_key()
        space_id = await admin.space()
        await admin.close()
        origin = f"http://127.0.0.1:{signal_port}/healthz"
        async with chromium() as browser:
            publisher_context = await browser.new_context()
            publisher = await publisher_context.new_page()
            await publisher.goto(origin)
            await publisher.evaluate(PUBLISH, key.token(space_id, participant_id="publisher"))
            await asyncio.sleep(1.0)  # the publisher is sending before anyone is timed
            pids = {"server": server.pid}
            quiet = await wait_quiet(pids, quick)
            say(f"browser-join: {joins} joins to a space with a sending publisher")
            cpu = CpuWindow(pids).start()
            for n in range(joins):
                token = key.token(space_id, role="subscriber", participant_id=f"viewer-{n}")
                try:
                    samples.append(await measure(browser, origin, JOIN, [token, FRAME_TIMEOUT_MS]))
                except Exception as exc:
                    failures.append(str(exc).splitlines()[0][:200])
                await asyncio.sleep(PAUSE_S)
            cpu.stop()
            say(f"browser-join: {direct_runs} direct peer connections (baseline)")
            for _ in range(direct_runs):
                try:
                    result = await measure(browser, origin, DIRECT, FRAME_TIMEOUT_MS)
                    direct.append(result["first_frame_ms"])
                except Exception as exc:
                    failures.append("direct: " + str(exc).splitlines()[0][:200])
            await publisher_context.close()
    finally:
        cluster.close()
    first = summarize([s["first_frame_ms"] for s in samples])
    base = summarize(direct)
    ratio = first["p50"] / base["p50"] if direct and samples else float("nan")
    server_cpu_ms = cpu.result["server"] * cpu.wall / max(len(samples), 1) * 1000
    return {
        "config": {
            "joins": joins,
            "direct_runs": direct_runs,
            "publisher": "Chromium's fake camera through our client, joined before the window",
            "measured": "new Space(token).join() to requestVideoFrameCallback presentationTime "
            "of the first remote video frame, in the page (performance.now clock)",
            "baseline": "two RTCPeerConnections in one page, no server: createOffer to the "
            "first presented frame",
            "pause_between_joins_s": PAUSE_S,
        },
        "joins": samples,
        "direct": direct,
        "failures": failures,
        "summary": {
            "first_frame_ms": first,
            "joined_ms": summarize([s["joined_ms"] for s in samples]),
            "subscribed_ms": summarize([s["subscribed_ms"] for s in samples]),
            "direct_first_frame_ms": base,
            "spaces_vs_direct_p50_ratio": ratio,
            "server_cpu_ms_per_join": server_cpu_ms,
            "failed": len(failures),
            "foreign_cores_before": quiet,
            "foreign_cores": cpu.foreign_cores(),
        },
        "targets": [
            {
                "target": f"browser join to first remote frame p95 <={TARGET_P95_MS:.0f} ms",
                "value": first["p95"],
                "met": bool(samples) and not failures and first["p95"] <= TARGET_P95_MS,
            }
        ],
    }


def render(result: dict[str, Any]) -> str:
    s = result["summary"]
    rows = []
    for label, key in (
        ("joined (socket, Join, session, first offer)", "joined_ms"),
        ("remote video track subscribed (ontrack)", "subscribed_ms"),
        ("first remote frame presented", "first_frame_ms"),
        ("baseline: direct peer connection, first frame", "direct_first_frame_ms"),
    ):
        v = s[key]
        rows.append([label, v["n"], fmt(v["p50"]), fmt(v["p95"]), fmt(v["max"])])
    out = table(["from new Space().join() to", "n", "p50 ms", "p95 ms", "max ms"], rows)
    out += (
        f"\n\nSpaces path vs direct WebRTC (p50): {fmt(s['spaces_vs_direct_p50_ratio'], 2)}x;"
        f" server CPU per join: {fmt(s['server_cpu_ms_per_join'])} ms;"
        f" failed: {s['failed']}; other work on the machine: {fmt(s['foreign_cores'], 2)} cores"
    )
    if result["failures"]:
        out += "\nfailures: " + "; ".join(result["failures"][:5])
    return out
