"""The media side of the load generators: lean receivers that count and timestamp packets,
publishers (live-encoding or pre-encoded), and raw aiortc peers for the baselines that do not
go through Spaces (the MediaRelay server, the direct publisher-to-subscriber path).

Receivers never decode: each RTP packet reaches a ``PacketStats`` through the receiver tap
that the SDK uses with ``decode=False`` (spaces.media.aiortc_adapter.tap_receiver)."""

from __future__ import annotations

import asyncio
import fractions
import hashlib
import json
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import av
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.rtcconfiguration import RTCBundlePolicy
from aiortc.rtp import is_rtcp

from spaces.media.aiortc_adapter import (
    IcePolicy,
    RtpPacket,
    apply_ice_policy,
    pin_encoder_bitrate,
    tap_receiver,
)
from spaces.media.forwarding import vp8_keyframe_start
from spaces.sdk.media import TestPatternTrack

LOOPBACK_ICE = IcePolicy(bind_addresses=("127.0.0.1",))
VIDEO_BITRATE = 1_000_000
now_ns = time.monotonic_ns
"""CLOCK_MONOTONIC is one clock for every process on a Linux machine: send and receive stamps
taken in different processes are comparable."""


def payload_key(payload: bytes) -> int:
    """Identifies one RTP payload on both sides of the SFU (which rewrites the header only)."""
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "big")


def rtp_payload(data: bytes) -> bytes:
    """The payload of a serialized (unencrypted) RTP packet."""
    first = data[0]
    pos = 12 + 4 * (first & 0x0F)
    if first & 0x10:
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        pos += 4 + 4 * length
    end = len(data)
    if first & 0x20:
        end -= data[-1]
    return data[pos:end]


# --- receiving ------------------------------------------------------------------------------


class PacketStats:
    """What one subscriber measures about one incoming track: packets (unique, by extended
    sequence number) inside a measurement window, the first complete keyframe after joining,
    and, when asked, a receive timestamp per payload for latency matching."""

    __slots__ = (
        "_cycles",
        "_last_seq",
        "first_key_done_ns",
        "first_key_ts",
        "first_packet_ns",
        "highest",
        "received",
        "recv_times",
        "record_times",
        "started_ns",
        "window_start_highest",
        "window_seen",
        "windowing",
    )

    def __init__(self, started_ns: int, record_times: bool = False) -> None:
        self.started_ns = started_ns
        self.received = 0
        self.highest = -1
        self._last_seq = -1
        self._cycles = 0
        self.first_packet_ns = 0
        self.first_key_ts = -1
        self.first_key_done_ns = 0
        self.windowing = False
        self.window_start_highest = -1
        self.window_seen: set[int] = set()
        self.record_times = record_times
        self.recv_times: dict[int, int] = {}

    def on_packet(self, packet: RtpPacket) -> None:
        t = now_ns()
        self.received += 1
        seq = packet.sequence_number
        if self._last_seq < 0:
            self.first_packet_ns = t
        elif seq < self._last_seq and self._last_seq - seq > 0x8000:
            self._cycles += 0x10000
        ext = self._cycles + seq
        if self._last_seq >= 0 and seq > self._last_seq and seq - self._last_seq > 0x8000:
            ext -= 0x10000  # a late packet from before the last wrap
        else:
            self._last_seq = seq
        if ext > self.highest:
            self.highest = ext
        if self.windowing:
            self.window_seen.add(ext)
        if not self.first_key_done_ns:
            if self.first_key_ts < 0 and vp8_keyframe_start(packet.payload):
                self.first_key_ts = packet.timestamp
            if packet.marker and packet.timestamp == self.first_key_ts:
                self.first_key_done_ns = t
        if self.record_times:
            self.recv_times[payload_key(packet.payload)] = t

    def start_window(self) -> None:
        self.window_seen = set()
        self.window_start_highest = self.highest
        self.windowing = True

    def end_window(self) -> tuple[int, int]:
        """(expected, received) packets in the window, by sequence number."""
        self.windowing = False
        if self.window_start_highest < 0:
            return 0, 0
        expected = self.highest - self.window_start_highest
        got = sum(1 for s in self.window_seen if s > self.window_start_highest)
        return max(expected, 0), got

    def first_frame_ms(self) -> float | None:
        if not self.first_key_done_ns:
            return None
        return (self.first_key_done_ns - self.started_ns) / 1e6


def new_pc() -> RTCPeerConnection:
    return RTCPeerConnection(
        RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
    )


async def wait_connected(pc: RTCPeerConnection, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while pc.connectionState != "connected":
        if pc.connectionState in ("failed", "closed") or time.monotonic() > deadline:
            raise RuntimeError(f"peer connection {pc.connectionState}")
        await asyncio.sleep(0.01)


def prefer_vp8(transceiver: Any) -> None:
    caps = [
        c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == "video/VP8"
    ]
    transceiver.setCodecPreferences(caps)


async def raw_subscriber(
    exchange: Callable[[str], Any], stats: PacketStats
) -> RTCPeerConnection:
    """A receive-only aiortc peer that offers one video m-section; ``exchange(offer_sdp)``
    returns the answer sdp (from the MediaRelay server or the direct publisher)."""
    pc = new_pc()
    transceiver = pc.addTransceiver("video", direction="recvonly")
    prefer_vp8(transceiver)
    tap_receiver(transceiver.receiver, stats.on_packet)
    apply_ice_policy(pc, LOOPBACK_ICE)
    await pc.setLocalDescription(await pc.createOffer())
    answer = await exchange(pc.localDescription.sdp)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return pc


async def raw_publisher_answer(offer_sdp: str, track: MediaStreamTrack) -> RTCPeerConnection:
    """The direct baseline: the publisher answers a subscriber's offer and sends it ``track``
    at the same fixed bitrate as through Spaces."""
    pc = new_pc()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
    for transceiver in pc.getTransceivers():
        if transceiver.kind == "video":
            transceiver.direction = "sendonly"
            transceiver.sender.replaceTrack(track)
            pin_encoder_bitrate(transceiver.sender, VIDEO_BITRATE)
    apply_ice_policy(pc, LOOPBACK_ICE)
    await pc.setLocalDescription(await pc.createAnswer())
    return pc


async def raw_publisher_offer(track: MediaStreamTrack) -> RTCPeerConnection:
    """A publisher for the MediaRelay server: one sendonly VP8 track at a fixed bitrate."""
    pc = new_pc()
    transceiver = pc.addTransceiver(track, direction="sendonly")
    prefer_vp8(transceiver)
    pin_encoder_bitrate(transceiver.sender, VIDEO_BITRATE)
    apply_ice_policy(pc, LOOPBACK_ICE)
    await pc.setLocalDescription(await pc.createOffer())
    return pc


def http_exchange(url: str) -> Callable[[str], Any]:
    """POST an offer to the MediaRelay server, return its answer (in a thread: urllib)."""

    async def exchange(offer: str) -> str:
        def post() -> str:
            body = json.dumps({"sdp": offer, "type": "offer"}).encode()
            request = urllib.request.Request(
                url, data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=30) as reply:
                return str(json.loads(reply.read())["sdp"])

        return await asyncio.to_thread(post)

    return exchange


# --- sending --------------------------------------------------------------------------------


class SendRecorder:
    """Stamps each RTP packet a publisher sends, at the last point before SRTP protection and
    ``sendto`` (the DTLS transport's ``_send_rtp``, shared by the peer connection's senders)."""

    def __init__(self) -> None:
        self.times: dict[int, int] = {}
        self.enabled = False

    def install(self, pc: RTCPeerConnection) -> None:
        transports = {id(t.sender.transport): t.sender.transport for t in pc.getTransceivers()}
        for dtls in transports.values():
            original = dtls._send_rtp

            async def send_rtp(data: bytes, original: Any = original) -> None:
                if self.enabled and not is_rtcp(data):
                    self.times[payload_key(rtp_payload(data))] = now_ns()
                await original(data)

            dtls._send_rtp = send_rtp


def live_video() -> TestPatternTrack:
    """640x480 at 30 fps, encoded live by aiortc's VP8 encoder (pinned to 1 Mbps by the
    caller): the fixed-bitrate publisher of REFERENCE.md §3."""
    return TestPatternTrack((200, 60, 60))


# --- pre-encoded media (cheap publishers for many-participant runs) -------------------------


def encode_vp8_loop(seconds: float, fps: int = 30, bitrate: int = VIDEO_BITRATE) -> list[bytes]:
    """Encode ``seconds`` of the test pattern once, with the settings aiortc's own VP8 encoder
    uses for a fixed bitrate (CBR): the first frame is the only keyframe."""
    source = TestPatternTrack((60, 160, 200), fps=fps)
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height = source.width, source.height
    codec.bit_rate = bitrate
    codec.pix_fmt = "yuv420p"
    codec.time_base = fractions.Fraction(1, 90_000)
    codec.gop_size = 100_000
    codec.qmin, codec.qmax = 2, 56
    codec.options = {
        "bufsize": str(bitrate),
        "cpu-used": "-6",
        "deadline": "realtime",
        "lag-in-frames": "0",
        "minrate": str(bitrate),
        "maxrate": str(bitrate),
        "noise-sensitivity": "4",
        "overshoot-pct": "15",
        "partitions": "0",
        "static-thresh": "1",
        "undershoot-pct": "100",
    }
    frames: list[bytes] = []
    loop = asyncio.new_event_loop()
    source._pace.wait = _no_wait  # type: ignore[method-assign]
    try:
        for _ in range(int(seconds * fps)):
            frame = loop.run_until_complete(source.recv()).reformat(format="yuv420p")
            frames.append(b"".join(bytes(p) for p in codec.encode(frame)))
        frames[-1] += b"".join(bytes(p) for p in codec.encode(None))
    finally:
        loop.close()
    return frames


async def _no_wait() -> None:
    return None


def encode_opus_loop(seconds: float) -> list[bytes]:
    """20 ms Opus packets of a 440 Hz tone (aiortc's settings: 48 kHz stereo, voip)."""
    import math

    import numpy as np

    codec = av.CodecContext.create("libopus", "w")
    codec.bit_rate = 32_000
    codec.format = "s16"
    codec.layout = "stereo"
    codec.sample_rate = 48_000
    codec.time_base = fractions.Fraction(1, 48_000)
    codec.options = {"application": "voip"}
    samples = 960
    packets: list[bytes] = []
    for n in range(int(seconds / 0.02)):
        t = (np.arange(samples) + n * samples) / 48_000
        wave = (0.3 * np.sin(2 * math.pi * 440 * t) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(
            np.repeat(wave, 2).reshape(1, -1), format="s16", layout="stereo"
        )
        frame.sample_rate = 48_000
        frame.pts = n * samples
        frame.time_base = fractions.Fraction(1, 48_000)
        packets.extend(bytes(p) for p in codec.encode(frame))
    return packets


class PacketLoopTrack(MediaStreamTrack):
    """Yields pre-encoded ``av.Packet``s in a loop at a fixed pace: aiortc then only packetizes
    (REFERENCE.md §3), so a participant costs its load generator almost nothing. For video,
    ``restart()`` (wired to the sender's keyframe requests) jumps back to the loop's keyframe,
    as a browser answers a PLI."""

    def __init__(self, kind: str, payloads: list[bytes], interval: float, clock: int) -> None:
        super().__init__()
        self.kind = kind
        self._payloads = payloads
        self._interval = interval
        self._step = round(clock * interval)
        self._time_base = fractions.Fraction(1, clock)
        self._index = 0
        self._count = 0
        self._next = 0.0

    def restart(self) -> None:
        self._index = 0

    async def recv(self) -> av.Packet:
        now = time.monotonic()
        if self._next == 0.0 or now - self._next > 0.1:
            self._next = now
        delay = self._next - now
        if delay > 0:
            await asyncio.sleep(delay)
        self._next += self._interval
        packet = av.Packet(self._payloads[self._index])
        self._index = (self._index + 1) % len(self._payloads)
        packet.pts = self._count * self._step
        packet.time_base = self._time_base
        self._count += 1
        return packet


def wire_keyframe_requests(sender: RTCRtpSender, track: PacketLoopTrack) -> None:
    """aiortc drops PLI/FIR for packet input (REFERENCE.md §3); restart the loop instead."""
    sender._send_keyframe = track.restart  # type: ignore[method-assign]


def wire_audio_level(sender: RTCRtpSender, dbov: int = -30) -> None:
    """Packet input carries no audio level; browsers send one, and the node reads it for active
    speakers, so add a constant level to every outgoing audio packet."""
    original = sender._next_encoded_frame

    async def next_frame(codec: Any) -> Any:
        frame = await original(codec)
        if frame is not None:
            frame.audio_level = dbov
        return frame

    sender._next_encoded_frame = next_frame  # type: ignore[method-assign]
