"""Simulcast without a browser: the SDP fix-ups, binding layer SSRCs by rid, switching a
subscriber between layers at a keyframe with continuous sequence numbers, timestamps and VP8
picture ids (on real encoder output), the layer policy, which layers a publisher need send
(dynacast), the config and the wire messages."""

from __future__ import annotations

import itertools
import json
import math
import struct
from typing import Any

import pytest
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.rtp import RtpPacket

from spaces.config import ServerConfig, parse_encodings
from spaces.media.aiortc_adapter import (
    SimulcastOffer,
    answer_with_simulcast,
    offered_simulcast,
)
from spaces.media.bwe import BACKOFF_S, CUT_HISTORY, Estimator
from spaces.media.dynacast import PAUSE_AFTER_S, LayerDemand, wanted_top
from spaces.media.forwarding import (
    DownTrack,
    SenderState,
    SimulcastDemux,
    TrackForwarder,
    vp8_descriptor,
    vp8_keyframe_start,
)
from spaces.media.layers import (
    UP_HEADROOM,
    Allocator,
    LayerInfo,
    VideoRequest,
    Wanted,
    max_layer,
    next_need,
    request_need,
)
from spaces.session import events as ev
from spaces.session import grpc_wire
from spaces.session.mux_wire import JoinInfo, MuxWire, ProtocolError
from tests.test_forwarding import RecordingSink, encoded

CHROME_OFFER = "\r\n".join(
    [
        "v=0",
        "o=- 1 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "a=mid:0",
        "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
        "a=sendonly",
        "a=rtpmap:111 opus/48000/2",
        "m=video 9 UDP/TLS/RTP/SAVPF 96 97",
        "a=mid:1",
        "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
        "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
        "a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id",
        "a=sendonly",
        "a=rtpmap:96 VP8/90000",
        "a=rtpmap:97 rtx/90000",
        "a=fmtp:97 apt=96",
        "a=rid:q send",
        "a=rid:h send",
        "a=rid:f send",
        "a=simulcast:send q;h;~f",
        "",
    ]
)


# --- SDP ------------------------------------------------------------------------------------


def test_an_offers_simulcast_is_read_per_mid_with_its_rid_extensions() -> None:
    assert offered_simulcast(CHROME_OFFER) == {"1": SimulcastOffer(("q", "h", "f"), 10, 11)}
    single = CHROME_OFFER.replace("a=simulcast:send q;h;~f\r\n", "")
    assert offered_simulcast(single) == {}


def test_the_answer_accepts_each_rid_and_starts_the_estimate_at_the_layers_total() -> None:
    answer = "\r\n".join(
        [
            "v=0",
            "m=audio 9 UDP/TLS/RTP/SAVPF 111",
            "a=mid:0",
            "a=rtpmap:111 opus/48000/2",
            "m=video 9 UDP/TLS/RTP/SAVPF 96 97",
            "a=mid:1",
            "a=rtpmap:96 VP8/90000",
            "a=rtpmap:97 rtx/90000",
            "a=fmtp:97 apt=96",
            "",
        ]
    )
    fixed = answer_with_simulcast(answer, offered_simulcast(CHROME_OFFER), {"1": 2_150_000})
    lines = fixed.split("\r\n")
    video = lines[lines.index("m=video 9 UDP/TLS/RTP/SAVPF 96 97") :]
    assert video[-5:] == [
        "a=rid:q recv",
        "a=rid:h recv",
        "a=rid:f recv",
        "a=simulcast:recv q;h;f",
        "",
    ]
    assert "a=fmtp:96 x-google-start-bitrate=2150" in video
    assert "a=fmtp:97 apt=96" in video, "RTX keeps its parameters only"
    audio = lines[: lines.index("m=video 9 UDP/TLS/RTP/SAVPF 96 97")]
    assert not any("rid" in line or "x-google" in line for line in audio)


# --- receiving and switching ----------------------------------------------------------------


def layer_stream(
    rid: str, ssrc: int, seq0: int, ts0: int, pic_base: int, frames: int, keyframes: set[int]
) -> list[list[RtpPacket]]:
    """One layer's packets, per frame, as a browser would send them: its own SSRC, sequence,
    timestamp and picture id spaces, the rid extension on every packet."""
    out: list[list[RtpPacket]] = []
    seq = seq0
    encoder = Vp8Encoder()
    encoder.picture_id = pic_base
    for index, frame in enumerate(encoded(encoder, frames, keyframes)):
        group = []
        for i, payload in enumerate(frame):
            packet = RtpPacket(
                payload_type=96,
                sequence_number=seq & 0xFFFF,
                timestamp=(ts0 + index * 3000) & 0xFFFFFFFF,
                ssrc=ssrc,
                payload=payload,
            )
            packet.marker = int(i == len(frame) - 1)
            packet.extensions.rtp_stream_id = rid
            group.append(packet)
            seq += 1
        out.append(group)
    return out


def parsed(data: bytes) -> tuple[int, int, bytes]:
    _, _, seq, ts, _ = struct.unpack("!BBHII", data[:12])
    return seq, ts, data[12:]


def test_vp8_picture_ids_are_found_in_real_encoder_output() -> None:
    encoder = Vp8Encoder()
    encoder.picture_id = 300
    frames = encoded(encoder, 3, keyframes={0})
    descriptors = [vp8_descriptor(frame[0]) for frame in frames]
    assert [d[1] for d in descriptors if d] == [300, 301, 302]
    assert all(d is not None and d[0] == 2 and d[2] for d in descriptors), descriptors


async def test_a_subscriber_switches_layers_at_the_targets_keyframe_and_the_stream_continues() -> (
    None
):
    plis: list[str] = []
    low = TrackForwarder("t", "video", "VP8", 90000, lambda: plis.append("q"), 0.0, rid="q")
    high = TrackForwarder("t", "video", "VP8", 90000, lambda: plis.append("f"), 0.0, rid="f")
    demux = SimulcastDemux((low, high))
    sink = RecordingSink()
    downtrack = DownTrack(low, sink, SenderState(), "viewer", 1 << 20)
    low.add(downtrack)
    q = layer_stream("q", 0x1111, 1000, 50_000, 7000, 10, keyframes={0})
    f = layer_stream("f", 0x2222, 40_000, 9_000_000, 100, 10, keyframes={0, 6})
    sent_per_frame: list[int] = []
    for index in range(10):
        if index == 3:
            downtrack.follow(high)
            assert plis == ["f"], "the switch asks the target layer for a keyframe"
        before = len(sink.sent)
        for packet in q[index] + f[index]:  # both layers arrive interleaved per frame
            demux.on_packet(packet)
        sent_per_frame.append(len(sink.sent) - before)
    # Until f's keyframe (frame 6, which arrives after q's frame 6) the subscriber keeps
    # getting q; from it on, only f.
    assert sent_per_frame[:6] == [len(q[i]) for i in range(6)]
    assert sent_per_frame[6] == len(q[6]) + len(f[6])
    assert sent_per_frame[7:] == [len(f[i]) for i in range(7, 10)]
    assert high.downtracks == (downtrack,) and low.downtracks == ()
    out = [parsed(d) for d in sink.sent]
    # Sequence numbers have no gap, timestamps never go back.
    seqs = [seq for seq, _, _ in out]
    assert seqs == [(seqs[0] + i) & 0xFFFF for i in range(len(seqs))]
    stamps = [ts for _, ts, _ in out]
    assert all(b >= a for a, b in itertools.pairwise(stamps))
    # The first f packet sent is its keyframe, and its picture id follows q's last one.
    switch = sum(sent_per_frame[:6]) + len(q[6])
    assert vp8_keyframe_start(out[switch][2])
    pictures = []
    for _, _, payload in out:
        descriptor = vp8_descriptor(payload)
        assert descriptor is not None
        if not pictures or pictures[-1] != descriptor[1]:
            pictures.append(descriptor[1])
    assert pictures == [7000 + i for i in range(11)], pictures
    # The payload after the descriptor is f's, byte for byte.
    assert out[switch][2][4:] == f[6][0].payload[4:]


async def test_a_subscriber_can_stop_following_and_resume_at_the_next_keyframe() -> None:
    layer = TrackForwarder("t", "video", "VP8", 90000, lambda: None, 0.0, rid="q")
    sink = RecordingSink()
    downtrack = DownTrack(layer, sink, SenderState(), "viewer", 1 << 20)
    layer.add(downtrack)
    stream = layer_stream("q", 0x1111, 1, 0, 0, 9, keyframes={0, 6})
    for group in stream[:2]:
        for packet in group:
            layer.on_packet(packet)
    downtrack.follow(None)  # audio only
    for group in stream[2:4]:
        for packet in group:
            layer.on_packet(packet)
    sent = len(sink.sent)
    assert sent == len(stream[0]) + len(stream[1])
    downtrack.follow(layer)
    for group in stream[4:]:
        for packet in group:
            layer.on_packet(packet)
    resumed = [parsed(d) for d in sink.sent[sent:]]
    assert vp8_keyframe_start(resumed[0][2]), "video resumes at a keyframe"
    assert len(resumed) == sum(len(g) for g in stream[6:])
    seqs = [parsed(d)[0] for d in sink.sent]
    assert seqs == [(seqs[0] + i) & 0xFFFF for i in range(len(seqs))]


def test_packets_of_an_unbound_ssrc_without_a_rid_are_dropped() -> None:
    layer = TrackForwarder("t", "video", "VP8", 90000, lambda: None, 0.0, rid="q")
    demux = SimulcastDemux((layer,))
    packet = layer_stream("q", 0x1111, 1, 0, 0, 1, keyframes={0})[0][0]
    packet.extensions.rtp_stream_id = None
    demux.on_packet(packet)
    assert demux.unbound == 1 and layer.ssrc == 0
    packet.extensions.rtp_stream_id = "q"
    demux.on_packet(packet)
    packet.extensions.rtp_stream_id = None  # later packets carry no rid: bound by SSRC
    demux.on_packet(packet)
    assert layer.ssrc == 0x1111 and demux.unbound == 1


# --- policy ---------------------------------------------------------------------------------

THREE = (
    LayerInfo(150_000, 320, 180),
    LayerInfo(500_000, 640, 360),
    LayerInfo(1_500_000, 1280, 720),
)


def test_a_request_caps_the_layer_by_quality_or_rendered_size() -> None:
    assert max_layer(THREE, VideoRequest()) == 2
    assert max_layer(THREE, VideoRequest("low")) == 0
    assert max_layer(THREE, VideoRequest("medium")) == 1
    assert max_layer(THREE, VideoRequest("off")) == -1
    assert max_layer(THREE, VideoRequest(width=300, height=170)) == 0
    assert max_layer(THREE, VideoRequest(width=641, height=100)) == 2
    assert max_layer(THREE[:2], VideoRequest("medium")) == 0
    with pytest.raises(ValueError):
        VideoRequest("best")


def test_the_allocation_fits_the_budget_cuts_at_once_and_raises_only_after_a_hold() -> None:
    allocator = Allocator()
    one = [Wanted("a", THREE, VideoRequest(), current=2)]
    assert allocator.allocate(one, None, 0.0).targets == {"a": 2}
    # 400 kbps: only the lowest layer fits, at once.
    cut = allocator.allocate(one, 400_000, 1.0)
    assert cut.targets == {"a": 0} and not cut.audio_only
    # Room for the middle layer again: not before UP_HOLD_S of it.
    one = [Wanted("a", THREE, VideoRequest(), current=0)]
    assert allocator.allocate(one, 800_000, 2.0).targets == {"a": 0}
    assert allocator.allocate(one, 800_000, 3.0).targets == {"a": 0}
    assert allocator.allocate(one, 800_000, 4.1).targets == {"a": 1}
    # Below the lowest layer: the lowest layer still for a moment (one low estimate is noise),
    # then audio only, and video back only with headroom.
    assert allocator.allocate(one, 100_000, 5.0).targets == {"a": 0}
    assert allocator.allocate(one, 100_000, 5.5).targets == {"a": 0}
    assert allocator.allocate(one, 100_000, 6.0).audio_only
    assert allocator.allocate(one, 160_000, 6.5).audio_only, "no flapping at the edge"
    back = allocator.allocate(one, 300_000, 7.0)
    assert not back.audio_only and back.targets == {"a": 0}


def test_layers_the_publisher_does_not_send_are_skipped() -> None:
    allocator = Allocator()
    paused_top = (THREE[0], THREE[1], LayerInfo(1_500_000, 1280, 720, live=False))
    wanted = [Wanted("a", paused_top, VideoRequest(), current=-1)]
    assert allocator.allocate(wanted, None, 0.0).targets == {"a": 1}


def test_the_wanted_layer_is_the_highest_any_request_allows_whatever_is_live() -> None:
    assert wanted_top(THREE, []) == -1, "no subscriber wants nothing"
    assert wanted_top(THREE, [VideoRequest("off")]) == -1
    assert wanted_top(THREE, [VideoRequest("low"), VideoRequest("off")]) == 0
    assert wanted_top(THREE, [VideoRequest("low"), VideoRequest(width=600, height=300)]) == 1
    assert wanted_top(THREE, [VideoRequest("low"), VideoRequest()]) == 2
    # A paused layer is still wanted by a request that allows it (else it never resumes).
    paused = (THREE[0], LayerInfo(500_000, 640, 360, live=False), THREE[2])
    assert wanted_top(paused, [VideoRequest("medium")]) == 1


def test_unwanted_layers_pause_after_the_delay_and_resume_at_once() -> None:
    demand = LayerDemand(("q", "h", "f"), now=100.0)
    assert demand.sending == 3 and demand.paused == 0
    # The only subscriber asks for the lowest layer: h and f go once unneeded long enough
    # (counted from the publication too).
    assert demand.update(0, 101.0) is None
    assert demand.update(0, 100.0 + PAUSE_AFTER_S - 0.1) is None
    assert demand.update(0, 100.0 + PAUSE_AFTER_S + 0.1) == ("q",)
    assert demand.paused == 2
    assert demand.update(0, 110.0) is None, "told once"
    # Demand for the top layer resumes every layer up to it at once.
    assert demand.update(2, 110.5) == ("q", "h", "f")
    # Down and back up within the delay: the publisher is not told at all.
    assert demand.update(1, 111.0) is None
    assert demand.update(2, 111.0 + PAUSE_AFTER_S - 0.5) is None
    assert demand.sending == 3
    # Each layer pauses on its own clock: f last wanted at t=120, h at t=121.
    assert demand.update(2, 120.0) is None
    assert demand.update(1, 121.0) is None
    assert demand.update(0, 121.5) is None
    assert demand.update(0, 120.0 + PAUSE_AFTER_S + 0.1) == ("q", "h")
    assert demand.update(0, 121.0 + PAUSE_AFTER_S + 0.1) == ("q",)
    # No subscriber at all (or none wanting video): every layer pauses, as LiveKit's OFF.
    assert demand.update(0, 129.5) is None
    assert demand.update(-1, 130.0) is None
    assert demand.update(-1, 130.0 + PAUSE_AFTER_S + 0.1) == ()
    assert demand.paused == 3
    assert demand.update(5, 140.0) == ("q", "h", "f"), "a wanted index past the top is the top"
    with pytest.raises(ValueError):
        LayerDemand((), now=0.0)


def test_a_layer_no_subscriber_follows_forwards_nothing() -> None:
    """What the unmodified Mux SDK, which cannot be told to pause, costs subscribers of a layer
    nobody wants: nothing (its packets are kept for NACKs, and no downtrack gets them)."""
    low = TrackForwarder("t", "video", "VP8", 90000, lambda: None, 0.0, rid="q")
    high = TrackForwarder("t", "video", "VP8", 90000, lambda: None, 0.0, rid="f")
    demux = SimulcastDemux((low, high))
    sink = RecordingSink()
    low.add(DownTrack(low, sink, SenderState(), "viewer", 1 << 20))
    q = layer_stream("q", 0x1111, 1, 0, 0, 4, keyframes={0})
    f = layer_stream("f", 0x2222, 1, 0, 0, 4, keyframes={0})
    for index in range(4):
        for packet in q[index] + f[index]:
            demux.on_packet(packet)
    assert len(sink.sent) == sum(len(g) for g in q)
    assert {parsed(d)[2] for d in sink.sent} == {p.payload for g in q for p in g}
    assert high.downtracks == () and high.switching == ()


def test_screen_shares_are_raised_before_cameras() -> None:
    allocator = Allocator()
    wanted = [
        Wanted("camera", THREE, VideoRequest(), current=1),
        Wanted("screen", THREE, VideoRequest(), current=1, priority=1),
    ]
    # 2.4 Mbps fits one top layer and one middle one (with headroom), not two tops.
    targets = allocator.allocate(wanted, 2_400_000, 0.0).targets
    assert targets == {"camera": 1, "screen": 1}
    targets = allocator.allocate(wanted, 2_400_000, 5.0).targets
    assert targets == {"camera": 1, "screen": 2}


# --- config and wires -----------------------------------------------------------------------


def test_encodings_parse_and_the_default_is_three_camera_layers() -> None:
    layers = parse_encodings("q/4/150,h/2/500,f/1/1500")
    assert [(e.rid, e.scale_resolution_down_by, e.max_bitrate) for e in layers] == [
        ("q", 4.0, 150_000),
        ("h", 2.0, 500_000),
        ("f", 1.0, 1_500_000),
    ]
    assert layers[0].mux() == {"rid": "q", "max_bitrate": 150_000, "scale_resolution_down_by": 4.0}
    assert parse_encodings("off") == ()
    for bad in ("q/4", "q/0.5/100", "q/4/500,h/2/100", "q/4/1,q/2/2"):
        with pytest.raises(ValueError):
            parse_encodings(bad)
    config = ServerConfig.from_env({})
    assert [e.rid for e in config.simulcast.camera] == ["q", "h", "f"]
    off = ServerConfig.from_env({"SPACES_SIMULCAST_CAMERA": "off"})
    assert off.simulcast.camera == ()


def test_set_video_quality_crosses_the_web_and_grpc_wires() -> None:
    wire = MuxWire(JoinInfo(spaces_client=True))
    [event] = wire.receive(
        json.dumps({"set_video_quality": {"tid": "T1", "quality": "low"}, "request_id": "r1"})
    )
    assert isinstance(event, ev.SetVideoQuality)
    assert (event.track_id, event.quality, event.width, event.height) == ("T1", "low", 0, 0)
    again = grpc_wire.client_event(grpc_wire.client_message(event))
    assert again == event
    sized = ev.SetVideoQuality(3, "T1", "", 640, 360)
    assert grpc_wire.client_event(grpc_wire.client_message(sized)) == sized
    for bad in ({"tid": "T1", "quality": "best"}, {"quality": "low"}, {"tid": "T", "width": -1}):
        with pytest.raises(ProtocolError):
            wire.receive(json.dumps({"set_video_quality": bad}))


@pytest.mark.parametrize("ours", [True, False])
def test_audio_only_and_layers_wanted_reach_only_our_client(ours: bool) -> None:
    wire = MuxWire(JoinInfo(spaces_client=ours))
    events: list[Any] = [ev.AudioOnly(True, 120_000), ev.LayersWanted("T1", ("q", "h"))]
    for event in events:
        decoded = grpc_wire.server_event(grpc_wire.server_message(event))
        assert decoded == event
    out = [m for event in events for m in wire.send(event)]
    if ours:
        assert out == [
            {"audio_only": {"active": True, "estimated_bitrate": 120_000}},
            {"layers_wanted": {"tid": "T1", "rids": ["q", "h"]}},
        ]
    else:
        assert out == [], "Mux's SDK does not know these messages"


# --- a client's request (the session's part: tests/test_session_core.py) -------------------


def test_an_estimate_probe_raises_it_at_once_unless_backing_off() -> None:
    estimator = Estimator(0.0, start_bps=800_000)
    assert estimator.probe(600_000, 1.0), "already carried"
    assert estimator.estimate == 800_000
    assert estimator.probe(1_800_000, 1.0)
    assert estimator.estimate == 1_800_000
    estimator._cut(500_000, 2.0)
    assert not estimator.probe(1_800_000, 2.5)
    assert not estimator.probe(1_800_000, 2.0 + BACKOFF_S - 0.1)
    assert estimator.estimate == 500_000
    assert estimator.probe(1_800_000, 2.0 + BACKOFF_S)


def test_a_requested_raise_skips_the_hold_and_request_need_prices_it() -> None:
    wanted = [
        Wanted("a", THREE, VideoRequest(), current=0),
        Wanted("b", THREE, VideoRequest("medium"), current=1),
    ]
    # "a" to its top layer, "b" keeping its middle one, with the raise's headroom.
    assert request_need(wanted, "a") == math.ceil((1_500_000 + 500_000) * UP_HEADROOM)
    assert request_need(wanted, "a", audio_tracks=2) == request_need(wanted, "a") + 2 * 40_000
    assert request_need(wanted, "b") is None, "its request allows no more than it gets"
    budget = request_need(wanted, "a")
    assert Allocator().allocate(wanted, budget, 0.0).targets == {"a": 0, "b": 1}
    targets = Allocator().allocate(wanted, budget, 0.0, requested={"a"}).targets
    assert targets == {"a": 2, "b": 1}


def test_next_need_prices_the_cheapest_one_layer_raise() -> None:
    wanted = [
        Wanted("a", THREE, VideoRequest(), current=0),
        Wanted("b", THREE, VideoRequest(), current=1),
        Wanted("c", THREE, VideoRequest("low"), current=0),
    ]
    # "a" from q to h is cheaper than "b" from h to f; "c" may not go higher at all.
    a_up = math.ceil((500_000 + 500_000 + 150_000) * UP_HEADROOM) + 40_000
    assert next_need(wanted, audio_tracks=1) == a_up
    at_top = [Wanted("a", THREE, VideoRequest(), current=2)]
    assert next_need(at_top) is None
    # A layer the publisher does not send is stepped over.
    gap = (THREE[0], LayerInfo(500_000, live=False), THREE[2])
    assert next_need([Wanted("a", gap, VideoRequest(), current=0)]) == math.ceil(
        1_500_000 * UP_HEADROOM
    )


def test_the_estimate_grows_to_the_next_layers_need_past_the_cap_unless_backing_off() -> None:
    """A quiet scene sends far below its layer's nominal rate: CAP_FACTOR times that can stay
    below what the next layer needs, and the estimate would never get there."""
    sent = 100_000 // 8 // 2  # bytes in a 0.5 s tick: 100 kbps
    capped = Estimator(0.0, start_bps=300_000)
    probing = Estimator(0.0, start_bps=300_000)
    need = 700_000
    for tick in range(1, 30):
        now = tick * 0.5
        capped.tick(now, sent, 10, 150_000, False)
        probing.tick(now, sent, 10, 150_000, False, next_need=need)
    assert capped.estimate < need, "without the need the cap (4x what is sent) holds it"
    assert probing.estimate == need, "with it the estimate reaches the next layer, no further"
    probing._cut(200_000, 20.0)
    for tick in range(1, 10):
        probing.tick(20.0 + tick * 0.5, sent, 10, 150_000, False, next_need=need)
    assert probing.estimate < need, "not while backing off after congestion"


def test_each_cut_is_recorded_with_its_reason_and_inputs_in_a_bounded_history() -> None:
    estimator = Estimator(0.0, start_bps=2_000_000)
    sent = 1_000_000 // 8 // 2  # bytes in a 0.5 s tick: 1 Mbps before overhead
    estimator.on_remb(900_000)
    estimator.tick(0.5, sent, 100, 150_000, False)
    assert not estimator.history, "a REMB below what is sent, but not falling, cuts nothing"
    grown = estimator.estimate
    estimator.on_remb(500_000)  # falling by more than REMB_DROP, below REMB_OVERUSE of sent
    estimator.tick(1.0, sent, 100, 150_000, False)
    (remb,) = estimator.history
    assert (remb.reason, remb.remb, remb.previous_remb) == ("remb", 500_000, 900_000)
    assert (remb.before, remb.after, remb.at) == (grown, 500_000, 1.0)
    assert remb.sent_bps == estimator.sent_bps and remb.nacks == 0
    assert str(remb).startswith(f"remb cut {grown} -> 500000 bps at 1.00")
    # Past the hold, a fifth of the packets NACKed: a NACK-loss cut to what arrived.
    estimator.estimate = 2_000_000
    for sequence_number in range(20):
        estimator.on_nack(sequence_number)
    estimator.tick(3.0, sent, 100, 150_000, False)
    nack = estimator.history[-1]
    assert (nack.reason, nack.nacks, nack.nack_loss, nack.report_loss) == ("nack", 20, 0.2, 0.0)
    assert nack.after == int(nack.sent_then_bps * 0.8 * 0.9)
    for tick in range(40):
        estimator.estimate = 2_000_000
        estimator.on_report(0.5)
        estimator.tick(5.0 + 2 * tick, sent, 100, 150_000, False)
    assert len(estimator.history) == CUT_HISTORY and estimator.cuts == 42
    assert estimator.history[-1].reason == "loss"
