"""The forwarding logic on real encoder output: keyframe detection, starting at a keyframe,
sequence continuity, drop-to-keyframe under backlog, and keyframe request merging."""

from __future__ import annotations

import asyncio
import fractions
import itertools
import struct

import av
import numpy as np
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.rtp import RtpPacket

from spaces.media.forwarding import (
    DownTrack,
    KeyframeRequester,
    SenderState,
    TrackForwarder,
    h264_keyframe_start,
    vp8_keyframe_start,
)


def frames(count: int) -> list[av.VideoFrame]:
    out = []
    for n in range(count):
        image = np.full((240, 320, 3), (n * 7) % 255, dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = n * 3000
        frame.time_base = fractions.Fraction(1, 90000)
        out.append(frame)
    return out


def encoded(
    encoder: Vp8Encoder | H264Encoder, count: int, keyframes: set[int]
) -> list[list[bytes]]:
    return [
        encoder.encode(f, force_keyframe=i in keyframes)[0] for i, f in enumerate(frames(count))
    ]


def test_vp8_keyframes_are_detected_on_real_encoder_output() -> None:
    payloads = encoded(Vp8Encoder(), 6, keyframes={0, 4})
    starts = [vp8_keyframe_start(p[0]) for p in payloads]
    assert starts == [True, False, False, False, True, False]
    # Only the first packet of a keyframe starts it.
    assert not any(vp8_keyframe_start(p) for frame in payloads for p in frame[1:])


def test_h264_keyframes_are_detected_on_real_encoder_output() -> None:
    payloads = encoded(H264Encoder(), 6, keyframes={0, 4})
    starts = [any(h264_keyframe_start(p) for p in frame) for frame in payloads]
    assert starts == [True, False, False, False, True, False]


class RecordingSink:
    """Stands in for RtpSink (which needs a live DTLS transport): records the packets it is given
    and reports a configurable socket backlog."""

    def __init__(self) -> None:
        self.ssrc = 0x1234
        self.payload_type = 101
        self.abs_send_time_id = 0
        self.audio_level_id = 0
        self.key = (101, 0, 0)
        self.connected = True
        self.backlog = 0
        self.sent: list[bytes] = []

    def send(
        self,
        first: int,
        second: int,
        seq: int,
        timestamp: int,
        tail: bytes,
        payload_len: int,
        ntp: int,
    ) -> int:
        self.sent.append(struct.pack("!BBHII", first, second, seq, timestamp, self.ssrc) + tail)
        return self.backlog


def packets(count_frames: int, keyframes: set[int], start_seq: int = 100) -> list[RtpPacket]:
    out = []
    seq = start_seq
    for index, frame in enumerate(encoded(Vp8Encoder(), count_frames, keyframes)):
        for i, payload in enumerate(frame):
            packet = RtpPacket(
                payload_type=96,
                sequence_number=seq & 0xFFFF,
                timestamp=index * 3000,
                ssrc=0xABCD,
                payload=payload,
            )
            packet.marker = int(i == len(frame) - 1)
            out.append(packet)
            seq += 1
    return out


def header(data: bytes) -> tuple[int, int, int, int]:
    _, second, seq, ts, ssrc = struct.unpack("!BBHII", data[:12])
    return second & 0x7F, seq, ts, ssrc


async def test_a_subscriber_starts_at_a_keyframe_with_its_own_ssrc_and_payload_type() -> None:
    requests: list[int] = []
    forwarder = TrackForwarder("t", "video", "VP8", 90000, lambda: requests.append(1), 0.05)
    sink = RecordingSink()
    forwarder.add(DownTrack(forwarder, sink, SenderState(), "viewer", 1 << 20))
    stream = packets(8, keyframes={0, 5})
    # Join mid-stream: the first keyframe it may use is frame 5.
    first_key_index = next(i for i, p in enumerate(stream) if p.timestamp == 5 * 3000)
    for packet in stream[3:]:
        forwarder.on_packet(packet)
    assert sink.sent, "nothing forwarded after the keyframe"
    pt, first_seq, first_ts, ssrc = header(sink.sent[0])
    assert (pt, ssrc) == (101, 0x1234)
    assert first_ts == 5 * 3000
    assert vp8_keyframe_start(sink.sent[0][12:])
    assert len(sink.sent) == len(stream) - first_key_index
    seqs = [header(d)[1] for d in sink.sent]
    assert seqs == [(first_seq + i) & 0xFFFF for i in range(len(seqs))]
    # The payload is forwarded byte for byte: no decode, no re-encode.
    assert sink.sent[0][12:] == stream[first_key_index].payload


async def test_a_backed_up_subscriber_drops_to_the_next_keyframe_and_asks_for_one() -> None:
    requests: list[int] = []
    forwarder = TrackForwarder("t", "video", "VP8", 90000, lambda: requests.append(1), 0.01)
    slow, fast = RecordingSink(), RecordingSink()
    forwarder.add(DownTrack(forwarder, slow, SenderState(), "slow", 64 * 1024))
    forwarder.add(DownTrack(forwarder, fast, SenderState(), "fast", 64 * 1024))
    stream = packets(12, keyframes={0, 8})
    backlog_from = next(i for i, p in enumerate(stream) if p.timestamp == 3 * 3000)
    recover_at = next(i for i, p in enumerate(stream) if p.timestamp == 6 * 3000)
    for i, packet in enumerate(stream):
        slow.backlog = 200_000 if backlog_from <= i < recover_at else 0
        forwarder.on_packet(packet)
    # The fast one got everything; the slow one never blocked it.
    assert len(fast.sent) == len(stream)
    # The slow one skipped from its backlog to the next keyframe (frame 8), with no gap in
    # its sequence numbers, and a keyframe was requested on its behalf.
    slow_frames = sorted({header(d)[2] for d in slow.sent})
    # The packet that revealed the backlog was queued; everything after it until frame 8 was
    # dropped.
    assert slow_frames == [0, 3000, 6000, 9000, *(i * 3000 for i in range(8, 12))]
    assert [header(d)[2] for d in slow.sent].count(9000) == 1
    seqs = [header(d)[1] for d in slow.sent]
    assert seqs == [(seqs[0] + i) & 0xFFFF for i in range(len(seqs))]
    assert requests, "no keyframe requested for the slow subscriber"


async def test_keyframe_requests_are_merged_and_rate_limited() -> None:
    sent: list[float] = []
    loop = asyncio.get_running_loop()
    requester = KeyframeRequester(lambda: sent.append(loop.time()), min_interval_s=0.2)
    for _ in range(10):
        requester.request()  # ten subscribers at once: one PLI
    assert len(sent) == 1
    await asyncio.sleep(0.05)
    requester.request()  # the keyframe asked for is still on its way: merged
    assert len(sent) == 1
    requester.keyframe_seen()
    requester.request()  # a new need, inside the interval: deferred, not dropped
    assert len(sent) == 1
    await asyncio.sleep(0.25)
    assert len(sent) == 2
    assert sent[1] - sent[0] >= 0.19
    requester.close()


async def test_a_keyframe_request_that_brings_none_is_repeated_while_a_subscriber_waits() -> None:
    # A PLI can bring no keyframe (a browser ignores one within 300 ms of the last it acted on;
    # a datagram is lost), and a subscriber waiting for a keyframe is sent nothing, so its
    # browser never asks itself: the node asks again until the keyframe comes.
    loop = asyncio.get_running_loop()
    requests: list[float] = []
    forwarder = TrackForwarder(
        "t", "video", "VP8", 90000, lambda: requests.append(loop.time()), 0.02
    )
    sink = RecordingSink()
    late = DownTrack(forwarder, sink, SenderState(), "late", 1 << 20)
    forwarder.add(late)
    stream = packets(8, keyframes={0, 6})
    key = next(i for i, p in enumerate(stream) if p.timestamp == 6 * 3000)
    late.request_keyframe()  # this one brings nothing
    assert len(requests) == 1
    for packet in stream[2:key]:  # delta frames only: it keeps waiting
        forwarder.on_packet(packet)
    await asyncio.sleep(0.1)
    assert not sink.sent
    assert len(requests) >= 2, "the request that brought no keyframe was not repeated"
    assert all(b - a >= 0.06 - 1e-3 for a, b in itertools.pairwise(requests)), requests
    for packet in stream[key:]:
        forwarder.on_packet(packet)
    assert sink.sent and vp8_keyframe_start(sink.sent[0][12:])
    asked = len(requests)
    await asyncio.sleep(0.15)
    assert len(requests) == asked, "asked again after the keyframe came"
    forwarder.close()


async def test_no_keyframe_request_is_repeated_once_nobody_waits() -> None:
    requests: list[int] = []
    forwarder = TrackForwarder("t", "video", "VP8", 90000, lambda: requests.append(1), 0.02)
    downtrack = DownTrack(forwarder, RecordingSink(), SenderState(), "viewer", 1 << 20)
    forwarder.add(downtrack)
    downtrack.request_keyframe()
    downtrack.detach()  # the subscription ends before any keyframe
    await asyncio.sleep(0.15)
    assert requests == [1]
    forwarder.close()
