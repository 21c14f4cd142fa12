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
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.rtcconfiguration import RTCBundlePolicy
from aiortc.rtp import is_rtcp, unpack_remb_fci

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


def vp8_picture_id(payload: bytes) -> int:
    """The picture id of a VP8 payload descriptor (RFC 7741), or -1. The publisher numbers its
    frames with it and the node forwards payloads untouched, so a gap is a lost frame even where
    the node re-numbered the RTP sequence."""
    if len(payload) < 3 or not payload[0] & 0x80 or not payload[1] & 0x80:
        return -1
    first = payload[2]
    if first & 0x80:
        return ((first & 0x7F) << 8) | payload[3] if len(payload) > 3 else -1
    return first & 0x7F


class Unwrapper:
    """Extends a wrapping counter (RTP sequence numbers, picture ids) and counts the distinct
    values inside a measurement window."""

    __slots__ = ("_cycles", "_last", "_modulus", "highest", "seen", "start")

    def __init__(self, modulus: int) -> None:
        self._modulus = modulus
        self._last = -1
        self._cycles = 0
        self.highest = -1
        self.start = -1
        self.seen: set[int] | None = None

    def add(self, value: int) -> None:
        half = self._modulus // 2
        last = self._last
        if last >= 0 and value < last and last - value > half:
            self._cycles += self._modulus
        extended = self._cycles + value
        if last >= 0 and value > last and value - last > half:
            extended -= self._modulus  # a late one from before the last wrap
        else:
            self._last = value
        self.highest = max(self.highest, extended)
        if self.seen is not None:
            self.seen.add(extended)

    def start_window(self) -> None:
        self.start = self.highest
        self.seen = set()

    def end_window(self) -> tuple[int, int]:
        """(expected, received) distinct values after the window's start."""
        seen, self.seen = self.seen or set(), None
        if self.start < 0 or self.highest <= self.start:
            return 0, 0
        return self.highest - self.start, sum(1 for v in seen if v > self.start)


@dataclass
class Window:
    """One track at one subscriber over a measurement window."""

    packets_expected: int = 0
    packets_received: int = 0
    frames_expected: int = 0
    """Video: by picture id. Audio: every packet is a frame."""
    frames_received: int = 0
    frames_completed: int = 0
    """Distinct frames whose last (marker) packet arrived: comparable with what the publisher
    sent even through MediaRelay, which re-encodes and re-numbers everything."""

    def add(self, other: Window) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def ratio_lost(expected: int, received: int) -> float:
    return 1 - received / expected if expected else 0.0


def window_loss(w: Window) -> float:
    """The worse of packet loss (by sequence number) and frame loss (by picture id)."""
    return max(
        ratio_lost(w.packets_expected, w.packets_received),
        ratio_lost(w.frames_expected, w.frames_received),
    )


class PacketStats:
    """What one subscriber measures about one incoming track: packets by sequence number and
    frames by VP8 picture id inside a measurement window, the first complete keyframe after
    joining, and, when asked, a receive timestamp per payload for latency matching."""

    __slots__ = (
        "first_key_done_ns",
        "first_key_ts",
        "first_packet_ns",
        "pictures",
        "received",
        "record_times",
        "recv_times",
        "sequence",
        "started_ns",
        "video",
        "window_frames",
        "windowing",
    )

    def __init__(self, started_ns: int, record_times: bool = False, video: bool = True) -> None:
        self.started_ns = started_ns
        self.video = video
        self.received = 0
        self.sequence = Unwrapper(1 << 16)
        self.pictures = Unwrapper(1 << 15)
        self.first_packet_ns = 0
        self.first_key_ts = -1
        self.first_key_done_ns = 0
        self.windowing = False
        self.window_frames: set[int] = set()
        self.record_times = record_times
        self.recv_times: dict[int, int] = {}

    def on_packet(self, packet: RtpPacket) -> None:
        t = now_ns()
        if not self.received:
            self.first_packet_ns = t
        self.received += 1
        self.sequence.add(packet.sequence_number)
        payload = packet.payload
        if self.video:
            picture = vp8_picture_id(payload)
            if picture >= 0:
                self.pictures.add(picture)
            if not self.first_key_done_ns:
                if self.first_key_ts < 0 and vp8_keyframe_start(payload):
                    self.first_key_ts = packet.timestamp
                if packet.marker and packet.timestamp == self.first_key_ts:
                    self.first_key_done_ns = t
        if self.windowing and packet.marker:
            self.window_frames.add(packet.timestamp)
        if self.record_times:
            self.recv_times[payload_key(payload)] = t

    def start_window(self) -> None:
        self.sequence.start_window()
        self.pictures.start_window()
        self.window_frames = set()
        self.windowing = True

    def end_window(self) -> Window:
        self.windowing = False
        packets_expected, packets_received = self.sequence.end_window()
        frames_expected, frames_received = self.pictures.end_window()
        if not self.video:
            frames_expected, frames_received = packets_expected, packets_received
        return Window(
            packets_expected,
            packets_received,
            frames_expected,
            frames_received,
            len(self.window_frames),
        )

    def has_first_frame(self) -> bool:
        return bool(self.first_key_done_ns)

    def first_frame_ms(self) -> float | None:
        if not self.first_key_done_ns:
            return None
        return (self.first_key_done_ns - self.started_ns) / 1e6


def new_pc() -> RTCPeerConnection:
    return RTCPeerConnection(
        RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
    )


async def wait_connected(pc: RTCPeerConnection, limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while pc.connectionState != "connected":
        if pc.connectionState in ("failed", "closed") or time.monotonic() > deadline:
            raise RuntimeError(f"peer connection {pc.connectionState}")
        await asyncio.sleep(0.01)


def prefer_vp8(transceiver: Any) -> None:
    caps = [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == "video/VP8"]
    transceiver.setCodecPreferences(caps)


async def raw_subscriber(exchange: Callable[[str], Any], stats: PacketStats) -> RTCPeerConnection:
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


class RtcpCounter:
    """Counts RTCP feedback by kind (remb, nack, pli, rr, ...): what a subscriber sends to the
    node, or what the node sends back to a publisher."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.remb_min_bps = 0
        """The lowest bitrate a REMB asked for since the last ``take()`` (0: none)."""
        self._wrapped: set[int] = set()

    def _count(self, packet: Any) -> None:
        kind = type(packet).__name__.removeprefix("Rtcp").removesuffix("Packet").lower()
        fmt = getattr(packet, "fmt", None)
        if kind == "psfb":
            kind = {1: "pli", 4: "fir", 15: "remb"}.get(fmt or 0, kind)
            if kind == "remb":
                try:
                    bitrate, _ = unpack_remb_fci(packet.fci)
                except ValueError:
                    bitrate = 0
                if bitrate and (not self.remb_min_bps or bitrate < self.remb_min_bps):
                    self.remb_min_bps = bitrate
        elif kind == "rtpfb":
            kind = "nack" if fmt == 1 else kind
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def outgoing(self, receiver: Any) -> None:
        """Count what ``receiver`` sends (its feedback to the sender)."""
        if id(receiver) in self._wrapped:
            return
        self._wrapped.add(id(receiver))
        original = receiver._send_rtcp

        async def send_rtcp(packet: Any) -> None:
            self._count(packet)
            await original(packet)

        receiver._send_rtcp = send_rtcp

    def incoming(self, sender: Any) -> None:
        """Count what ``sender`` receives (feedback about what it sends)."""
        original = sender._handle_rtcp_packet

        async def handle(packet: Any) -> None:
            self._count(packet)
            await original(packet)

        sender._handle_rtcp_packet = handle

    def take(self) -> dict[str, int]:
        """Counts by kind since the last call, and ``remb_min_bps``."""
        counts, self.counts = self.counts, {}
        counts["remb_min_bps"], self.remb_min_bps = self.remb_min_bps, 0
        return counts


# --- sending --------------------------------------------------------------------------------


class SendRecorder:
    """Stamps each RTP packet a publisher sends, at the last point before SRTP protection and
    ``sendto`` (the DTLS transport's ``_send_rtp``, shared by the peer connection's senders)."""

    def __init__(self) -> None:
        self.times: dict[int, int] = {}
        self.enabled = False
        self.packets = 0
        """Media packets sent once (retransmissions are counted apart)."""
        self.frames = 0
        """Of those, packets with the marker bit: the last packet of each video frame, every
        audio packet."""
        self.retransmissions = 0
        self._media_ssrcs: set[int] = set()

    def install(self, pc: RTCPeerConnection) -> None:
        """Call once per peer connection, after its senders exist."""
        transceivers = pc.getTransceivers()
        # RTX retransmissions go out on another SSRC than the media they repeat.
        self._media_ssrcs.update(t.sender._ssrc for t in transceivers)
        transports: dict[int, Any] = {
            id(t.sender.transport): t.sender.transport for t in transceivers
        }
        for dtls in transports.values():
            original = dtls._send_rtp

            async def send_rtp(data: bytes, original: Any = original) -> None:
                if not is_rtcp(data):
                    if int.from_bytes(data[8:12], "big") in self._media_ssrcs:
                        self.packets += 1
                        if data[1] & 0x80:
                            self.frames += 1
                        if self.enabled:
                            self.times[payload_key(rtp_payload(data))] = now_ns()
                    else:
                        self.retransmissions += 1
                await original(data)

            dtls._send_rtp = send_rtp


class BusyPatternTrack(TestPatternTrack):
    """The SDK's test pattern with a band of changing noise across the middle. The plain
    pattern is so easy to compress that VP8 undershoots a 1 Mbps target (about 0.5-0.75 Mbps,
    varying with how much CPU the encoder gets); with the band the encoder spends its whole
    budget: about 1 Mbps and 112 packets/s, like a camera. The top half (the sender's colour)
    and the frame counter stay readable by ``read_pattern``."""

    NOISE_ROWS = 32
    NOISE_TILES = 8

    def __init__(self, color: tuple[int, int, int], fps: int = 30) -> None:
        super().__init__(color, fps=fps)
        rng = np.random.default_rng(7)
        shape = (self.NOISE_ROWS, self.width, 3)
        self._noise = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(self.NOISE_TILES)]
        self._band = slice(self.height // 2, self.height // 2 + self.NOISE_ROWS)

    async def recv(self) -> av.VideoFrame:
        self._base[self._band] = self._noise[self.frames_sent % self.NOISE_TILES]
        return await super().recv()


PUBLISHER_COLOR = (200, 60, 60)


def live_video() -> BusyPatternTrack:
    """640x480 at 30 fps, encoded live by aiortc's VP8 encoder (pinned to 1 Mbps by the
    caller): the fixed-bitrate publisher of REFERENCE.md §3."""
    return BusyPatternTrack(PUBLISHER_COLOR)


# --- pre-encoded media (cheap publishers for many-participant runs) -------------------------


async def encode_vp8_loop(
    seconds: float,
    fps: int = 30,
    bitrate: int = VIDEO_BITRATE,
    color: tuple[int, int, int] = (60, 160, 200),
) -> list[bytes]:
    """Encode ``seconds`` of the test pattern once, with the settings aiortc's own VP8 encoder
    uses for a fixed bitrate (CBR): the first frame is the only keyframe."""
    source = BusyPatternTrack(color, fps=fps)
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
    pace: Any = source._pace
    pace.wait = _no_wait
    for _ in range(int(seconds * fps)):
        frame = (await source.recv()).reformat(format="yuv420p")
        frames.append(b"".join(bytes(p) for p in codec.encode(frame)))
    return frames


async def _no_wait() -> None:
    return None


def encode_opus_loop(seconds: float) -> list[bytes]:
    """20 ms Opus packets of a 440 Hz tone (aiortc's settings: 48 kHz stereo, voip)."""
    import math

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

    @property
    def count(self) -> int:
        """Frames (packets of pre-encoded media) yielded so far."""
        return self._count

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


def wire_keyframe_requests(sender: Any, track: PacketLoopTrack) -> None:
    """aiortc drops PLI/FIR for packet input (REFERENCE.md §3); restart the loop instead."""
    sender._send_keyframe = track.restart


def wire_audio_level(sender: Any, dbov: int = -30) -> None:
    """Packet input carries no audio level; browsers send one, and the node reads it for active
    speakers, so add a constant level to every outgoing audio packet."""
    original = sender._next_encoded_frame

    async def next_frame(codec: Any) -> Any:
        frame = await original(codec)
        if frame is not None:
            frame.audio_level = dbov
        return frame

    sender._next_encoded_frame = next_frame
