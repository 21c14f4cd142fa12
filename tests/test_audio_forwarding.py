"""Audio at the forwarding layer, on both data planes (SPACES_MEDIA_DATAPLANE=native and
python): Opus DTX's sparse packets and the audio-level extension go to a subscriber intact,
with only the header rewritten to the subscriber's payload type, SSRC and extension id.

The native plane runs on real loopback sockets with SRTP (tests/test_dataplane.py's ``Wire``);
the Python plane is ``TrackForwarder`` with a recording sink, as tests/test_forwarding.py."""

from __future__ import annotations

import itertools
import struct
import time
from typing import Any

import pytest
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.rtp import HeaderExtensionsMap, RtpPacket

from spaces.media.aiortc_adapter import AUDIO_LEVEL_URI
from spaces.media.forwarding import DownTrack, SenderState, TrackForwarder, extension_block
from tests.test_dataplane import Wire, reference
from tests.test_forwarding import RecordingSink

PUBLISHER_SSRC = 0xAAAA
PUBLISHER_PT = 111
PUBLISHER_LEVEL_ID = 1
SUBSCRIBER_PT = 100
"""What both planes' subscribers here negotiated (Wire's first Down; the recording sink's key)."""
SUBSCRIBER_LEVEL_ID = 3
FRAME = 960
"""20 ms of Opus at 48 kHz."""
DTX_GAP = 20 * FRAME
"""Opus DTX in silence: one packet every 400 ms."""


def opus(seq: int, ts: int, level: int, vad: bool, size: int = 60) -> bytes:
    """A publisher's Opus packet with the audio level (RFC 6464) under id 1."""
    ext = extension_block([(PUBLISHER_LEVEL_ID, bytes([(0x80 if vad else 0) | level]))])
    header = struct.pack("!BBHII", 0x90, PUBLISHER_PT, seq, ts, PUBLISHER_SSRC)
    return header + ext + bytes([0xFC]) + bytes((seq + i) & 0xFF for i in range(size - 1))


def talk_then_silence() -> list[tuple[bytes, float]]:
    """(packet, seconds to wait before sending it): 10 packets of speech, 4 of DTX silence
    (timestamps jumping 400 ms, sequence numbers not), then speech again 400 ms after the last
    silence packet. Sequence numbers wrap on the way."""
    out: list[tuple[bytes, float]] = []
    seq, ts = 65530, 0x12345678
    for i in range(20):
        speech = not 10 <= i < 14
        gap = 0 if i == 0 else FRAME if speech and i != 14 else DTX_GAP
        ts = (ts + gap) & 0xFFFFFFFF
        packet = opus(seq & 0xFFFF, ts, 30 if speech else 127, vad=speech, size=60 if speech else 3)
        out.append((packet, gap / 48000))
        seq += 1
    return out


def parse(plain: bytes) -> dict[str, Any]:
    first, second, seq, ts, ssrc = struct.unpack("!BBHII", plain[:12])
    pos = 12
    extensions: dict[int, bytes] = {}
    if first & 0x10:
        profile, words = struct.unpack("!HH", plain[pos : pos + 4])
        assert profile == 0xBEDE
        body = plain[pos + 4 : pos + 4 + words * 4]
        i = 0
        while i < len(body):
            if body[i] == 0:
                i += 1
                continue
            ext_id, length = body[i] >> 4, (body[i] & 0x0F) + 1
            extensions[ext_id] = body[i + 1 : i + 1 + length]
            i += 1 + length
        pos += 4 + words * 4
    return {
        "pt": second & 0x7F,
        "marker": second >> 7,
        "seq": seq,
        "ts": ts,
        "ssrc": ssrc,
        "extensions": extensions,
        "payload": plain[pos:],
    }


def payload_of(packet: bytes) -> bytes:
    return parse(packet)["payload"]  # type: ignore[no-any-return]


class Result:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.levels: list[int] = []
        self.nacks: list[list[int]] = []
        self.stats: tuple[int, int, int, int, int] | None = None
        """(base seq, max seq, cycles, packets received, jitter in 1/16 ticks): what the node's
        receiver reports to the publisher are built from."""


def through_native(stream: list[tuple[bytes, float]]) -> Result:
    result = Result()
    wire = Wire(subscribers=1, video=False)
    try:
        for packet, wait in stream:
            time.sleep(wait)
            wire.publish(packet)
        receiver = reference(wire.sub_keys[0], outbound=False)
        result.sent = [parse(receiver.unprotect(d)) for d in wire.received(0)]
        result.levels = list(wire.levels)
        result.nacks = list(wire.nacks)
        result.stats = wire.source.stats()
    finally:
        wire.close()
    return result


def through_python(stream: list[tuple[bytes, float]]) -> Result:
    result = Result()
    forwarder = TrackForwarder(
        "a", "audio", "opus", 48000, lambda: None, 1.0, on_audio_level=result.levels.append
    )
    sink = RecordingSink()
    sink.payload_type, sink.audio_level_id = SUBSCRIBER_PT, SUBSCRIBER_LEVEL_ID
    sink.key = (SUBSCRIBER_PT, 0, SUBSCRIBER_LEVEL_ID)
    forwarder.add(DownTrack(forwarder, sink, SenderState(), "listener", 1 << 20))
    extensions = HeaderExtensionsMap()
    extensions.configure(
        RTCRtpParameters(
            headerExtensions=[
                RTCRtpHeaderExtensionParameters(id=PUBLISHER_LEVEL_ID, uri=AUDIO_LEVEL_URI)
            ]
        )
    )
    # aiortc's receive statistics: the Python plane's receiver reports read them.
    statistics = StreamStatistics(48000)
    for packet, wait in stream:
        time.sleep(wait)
        parsed = RtpPacket.parse(packet, extensions)
        statistics.add(parsed)
        forwarder.on_packet(parsed)
    result.sent = [parse(d) for d in sink.sent]
    result.stats = (
        statistics.base_seq,
        statistics.max_seq,
        statistics.cycles,
        statistics.packets_received,
        statistics._jitter_q4,
    )
    return result


@pytest.mark.parametrize("plane", ["native", "python"])
def test_dtx_silence_and_audio_levels_are_forwarded_intact_and_not_taken_for_loss(
    plane: str,
) -> None:
    stream = talk_then_silence()
    result = (through_native if plane == "native" else through_python)(stream)
    sent = result.sent
    assert len(sent) == len(stream)
    assert {p["pt"] for p in sent} == {SUBSCRIBER_PT}
    # Sequence numbers run on without a gap across the silence: the subscriber sees no loss.
    assert [p["seq"] for p in sent] == [(sent[0]["seq"] + i) & 0xFFFF for i in range(len(sent))]
    # Timestamps keep the publisher's jumps (400 ms per DTX packet), so the decoder knows how
    # much silence to play.
    in_ts = [struct.unpack("!I", p[4:8])[0] for p, _ in stream]
    deltas_in = [(b - a) & 0xFFFFFFFF for a, b in itertools.pairwise(in_ts)]
    deltas_out = [(b["ts"] - a["ts"]) & 0xFFFFFFFF for a, b in itertools.pairwise(sent)]
    assert deltas_out == deltas_in
    assert deltas_out.count(DTX_GAP) == 5
    # The payload byte for byte, and the level (with its voice bit) under the subscriber's id.
    for out, (packet, _) in zip(sent, stream, strict=True):
        assert out["payload"] == payload_of(packet)
        level = parse(packet)["extensions"][PUBLISHER_LEVEL_ID]
        assert out["extensions"][SUBSCRIBER_LEVEL_ID] == level
        assert set(out["extensions"]) == {SUBSCRIBER_LEVEL_ID}
    assert result.levels == [
        parse(p)["extensions"][PUBLISHER_LEVEL_ID][0] & 0x7F for p, _ in stream
    ]
    # The publisher is not asked for anything and its reports show no loss, and no jitter
    # from the silence: a 400 ms timestamp jump that arrives 400 ms later is on time.
    assert result.nacks == []
    assert result.stats is not None
    base, highest, cycles, received, jitter_q4 = result.stats
    assert received == len(stream)
    assert cycles + highest - base + 1 == len(stream)
    assert jitter_q4 >> 4 < 48000 * 0.010, jitter_q4 >> 4  # under 10 ms (measured: ~1 ms)
