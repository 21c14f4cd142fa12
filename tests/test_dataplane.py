"""The native data plane (spaces.media._dataplane) at its own layer: byte for byte against the
Python reference (pylibsrtp, the SRTP library aiortc uses, and the Python header rewrite), and
fuzzed input that must never crash it or disturb another peer's stream."""

from __future__ import annotations

import os
import socket
import struct
import time

import pylibsrtp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spaces.media import _dataplane as dp
from spaces.media.forwarding import extension_block

PROFILE = dp.PROFILE_AES128_CM_SHA1_80


def reference(key: bytes, outbound: bool) -> pylibsrtp.Session:
    """pylibsrtp configured exactly as aiortc's RTCDtlsTransport configures it."""
    policy = pylibsrtp.Policy(
        key=key,
        ssrc_type=(
            pylibsrtp.Policy.SSRC_ANY_OUTBOUND if outbound else pylibsrtp.Policy.SSRC_ANY_INBOUND
        ),
        srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    )
    policy.allow_repeat_tx = True
    policy.window_size = 1024
    return pylibsrtp.Session(policy)


def rtp(
    seq: int,
    ssrc: int = 0x1234ABCD,
    payload: bytes = b"\x10payload" * 20,
    ext: bytes = b"",
    csrcs: int = 0,
    padding: int = 0,
    marker: int = 0,
) -> bytes:
    first = 0x80 | (0x10 if ext else 0) | (0x20 if padding else 0) | csrcs
    header = struct.pack("!BBHII", first, (marker << 7) | 96, seq, seq * 3000 & 0xFFFFFFFF, ssrc)
    header += b"".join(struct.pack("!I", 1000 + i) for i in range(csrcs))
    pad = (b"\x00" * (padding - 1) + bytes([padding])) if padding else b""
    return header + ext + payload + pad


def outcome(fn: object, packet: bytes) -> bytes | str:
    try:
        return fn(packet)  # type: ignore[operator,no-any-return]
    except pylibsrtp.Error:
        return "error"


# --- SRTP byte for byte -------------------------------------------------------------------


def test_protect_matches_pylibsrtp_over_a_wrap_repeats_and_reordering() -> None:
    key = os.urandom(30)
    ours = dp.Peer(PROFILE, os.urandom(30), key)
    theirs = reference(key, outbound=True)
    sequence = [*range(65500, 65536), *range(0, 40), 5, 5, 39, 3, 65530, 41, 20000, 40000, 3]
    for seq in sequence:
        packet = rtp(seq)
        assert outcome(ours.protect, packet) == outcome(theirs.protect, packet), seq


def test_protect_matches_with_csrcs_extensions_and_padding() -> None:
    key = os.urandom(30)
    ours = dp.Peer(PROFILE, os.urandom(30), key)
    theirs = reference(key, outbound=True)
    ext = extension_block([(3, b"\x01\x02\x03"), (1, b"\x85")])
    for seq, packet in enumerate(
        [rtp(1, ext=ext), rtp(2, csrcs=3), rtp(3, padding=4), rtp(4, ext=ext, csrcs=1, padding=1)]
    ):
        assert ours.protect(packet) == theirs.protect(packet), seq


def test_unprotect_reads_pylibsrtp_and_rejects_what_it_rejects() -> None:
    key = os.urandom(30)
    sender = reference(key, outbound=True)
    ours = dp.Peer(PROFILE, key, os.urandom(30))
    theirs = reference(key, outbound=False)
    sent = [sender.protect(rtp(seq, ssrc=ssrc)) for seq in range(100) for ssrc in (1, 2)]
    replayed = sent[10:14]
    old = sender.protect(rtp(0, ssrc=3))
    for packet in [*sent[50:], *sent[:50], *replayed, old]:
        assert outcome(ours.unprotect, packet) == outcome(theirs.unprotect, packet)
    tampered = bytearray(sender.protect(rtp(200)))
    tampered[20] ^= 1
    assert outcome(ours.unprotect, bytes(tampered)) == "error"


def test_rtcp_both_ways_matches_pylibsrtp() -> None:
    key = os.urandom(30)
    ours = dp.Peer(PROFILE, key, key)
    sender = reference(key, outbound=True)
    receiver = reference(key, outbound=False)
    report = struct.pack("!BBHI", 0x80, 201, 1, 0xDEADBEEF)  # an empty receiver report
    for _ in range(5):
        protected = ours.protect_rtcp(report)
        assert protected == sender.protect_rtcp(report)
        assert receiver.unprotect_rtcp(protected) == report
    assert ours.unprotect_rtcp(sender.protect_rtcp(report)) == report


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=60))
def test_protect_matches_on_any_sequence(sequence: list[int]) -> None:
    key = os.urandom(30)
    ours = dp.Peer(PROFILE, key, key)
    theirs = reference(key, outbound=True)
    for seq in sequence:
        packet = rtp(seq)
        assert outcome(ours.protect, packet) == outcome(theirs.protect, packet)


# --- the send path: rewrite + protect + sendto ---------------------------------------------


def test_send_rtp_sends_the_python_rewrite_protected() -> None:
    """The native send writes exactly the packet RtpSink's Python path writes (header packed
    in Python, then pylibsrtp), to the route it was given."""
    key = os.urandom(30)
    ours = dp.Peer(PROFILE, os.urandom(30), key)
    theirs = reference(key, outbound=True)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(2)
    try:
        ours.set_route(sender.fileno(), receiver.getsockname())
        before = dp.counters()["rtp_out"]
        tail = extension_block([(3, b"\x00\x10\x20")]) + b"\x10" + os.urandom(900)
        for seq in (7, 8, 9):
            first, second, ts, ssrc = 0x90, 0x80 | 100, 123456 + seq, 0xCAFE
            assert ours.send_rtp(first, second, seq, ts, ssrc, tail) is None
            expected = theirs.protect(struct.pack("!BBHII", first, second, seq, ts, ssrc) + tail)
            assert receiver.recv(2048) == expected
        assert dp.counters()["rtp_out"] == before + 3
        assert ours.rtp_out == 3
        assert ours.addr == receiver.getsockname()
    finally:
        receiver.close()
        sender.close()


def test_send_rtp_without_a_route_or_too_large_fails_cleanly() -> None:
    peer = dp.Peer(PROFILE, os.urandom(30), os.urandom(30))
    with pytest.raises(OSError):
        peer.send_rtp(0x80, 96, 1, 1, 1, b"x" * 100)
    with pytest.raises(dp.Error):
        peer.send_rtp(0x80, 96, 1, 1, 1, b"x" * 1600)
    with pytest.raises(ValueError):
        peer.set_route(0, ("not an address", 1))
    with pytest.raises(ValueError):
        dp.Peer(PROFILE, b"short", os.urandom(30))


# --- fuzzing: never crash, never disturb another peer ---------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=1600))
def test_garbage_never_crashes_and_leaves_the_stream_intact(garbage: bytes) -> None:
    key = os.urandom(30)
    sender = reference(key, outbound=True)
    ours = dp.Peer(PROFILE, key, os.urandom(30))
    other = dp.Peer(PROFILE, key, os.urandom(30))
    first = sender.protect(rtp(1))
    assert ours.unprotect(first) == rtp(1)
    for fn in (ours.unprotect, ours.unprotect_rtcp, ours.protect, ours.protect_rtcp):
        try:
            fn(garbage)
        except pylibsrtp.Error:
            pass
    # Truncations of a real packet: refused, never accepted as something else.
    second = sender.protect(rtp(2))
    for cut in range(0, len(second), 97):
        with pytest.raises(pylibsrtp.Error):
            ours.unprotect(second[:cut])
    assert ours.unprotect(second) == rtp(2)
    assert other.unprotect(first) == rtp(1)
    assert other.unprotect(second) == rtp(2)


# --- in the node: the native path carries the packets ---------------------------------------


def forwarded_packets() -> float:
    from spaces import metrics

    return sum(
        sample.value
        for family in metrics.FORWARDED_PACKETS.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    )


@pytest.mark.parametrize("plane", ["native", "python"])
async def test_the_node_sends_its_media_through_the_native_plane_when_on(plane: str) -> None:
    """A real node, a publisher and a subscriber over loopback: with the native plane on, every
    packet the node forwards leaves through the C send path (its counter), and the subscriber
    decodes the publisher's pattern; with SPACES_MEDIA_DATAPLANE=python, none does."""
    from dataclasses import replace

    from spaces.sdk import client as sdk
    from spaces.sdk.media import TestPatternTrack, ToneTrack, read_pattern, same_color
    from tests.support.system import Admin, Tenant, eventually, make_config, start_server

    config = make_config()
    config = replace(config, node=replace(config.node, dataplane=plane))
    server = await start_server(config)
    admin = Admin(server.address)
    try:
        tenant = Tenant(await admin.create_key())
        space_id = await admin.create_space()
        before = dp.counters()["rtp_out"]
        received_before = dp.counters()["rtp_in"]
        rtx_before = dp.counters()["rtx_sent"]
        forwarded_before = forwarded_packets()
        pub = sdk.Space(tenant.token(space_id, "p"), server.address)
        await pub.join()
        await pub.local.publish(TestPatternTrack((250, 5, 5)), "camera")
        await pub.local.publish(ToneTrack(300), "microphone")
        viewer = sdk.Space(tenant.token(space_id, "v"), server.address)
        await viewer.join()
        track = await eventually(lambda: viewer.remote_track("p", "camera"), timeout=10)
        await eventually(lambda: track.frames_received > 20, timeout=15)
        assert same_color(read_pattern(track.last_frame)[0], (250, 5, 5))
        await viewer.leave()
        await pub.leave()
        # The tracks are gone: their native counts are in the metrics (synced at close).
        node = server.media_node
        assert node is not None
        await eventually(lambda: not node.rooms, timeout=10)
        counts = dp.counters()
        sent_natively = counts["rtp_out"] - before
        received_natively = counts["rtp_in"] - received_before
        retransmitted = counts["rtx_sent"] - rtx_before
        forwarded = forwarded_packets() - forwarded_before
        if plane == "native":
            # Received from the publisher's socket and sent to the subscriber's in C: every
            # packet the node counts as forwarded was protected and handed to the kernel there.
            assert received_natively > 50
            assert sent_natively > 50
            assert forwarded == sent_natively - retransmitted
        else:
            assert sent_natively == 0
            assert received_natively == 0
            assert forwarded > 50
    finally:
        await admin.close()
        await server.stop()


# --- receive, fan out, send: a socket, a publisher, subscribers -------------------------------

KEY = b"\x10\x00\x9d\x01\x2a" + bytes(range(200))  # VP8: S bit, partition 0, P bit 0
DELTA = b"\x10\x01" + bytes(range(200))  # P bit 1: not a keyframe


class Wire:
    """A node socket read by the native plane, a publisher and subscribers over loopback."""

    def __init__(self, subscribers: int, video: bool = True) -> None:
        self.fallen: list[tuple[bytes, tuple[str, int]]] = []
        self.node = udp()
        self.native = dp.Socket(self.node.fileno(), lambda d, a: self.fallen.append((d, a)))
        self.publisher = udp()
        self.pub_key = os.urandom(30)
        self.pub_srtp = reference(self.pub_key, outbound=True)
        self.pub_peer = dp.Peer(PROFILE, self.pub_key, os.urandom(30))
        self.native.add_peer(self.publisher.getsockname(), self.pub_peer)
        self.keyframes = 0
        self.levels: list[int] = []
        self.nacks: list[list[int]] = []
        self.behind = 0
        self.source = dp.Source(
            dp.CODEC_VP8 if video else dp.CODEC_OTHER,
            90000 if video else 48000,
            video,
            1,
            self._keyframe,
            self.levels.append,
            self.nacks.append,
            self._behind,
        )
        self.pub_peer.add_source(0xAAAA, self.source)
        self.subs = [udp() for _ in range(subscribers)]
        self.sub_keys = [os.urandom(30) for _ in range(subscribers)]
        self.sub_peers = [dp.Peer(PROFILE, os.urandom(30), key) for key in self.sub_keys]
        self.downs = []
        for i, (sock, peer) in enumerate(zip(self.subs, self.sub_peers, strict=True)):
            peer.set_route(self.node.fileno(), sock.getsockname())
            self.native.add_peer(sock.getsockname(), peer)
            down = dp.Down(peer, 0x5000 + i, 100 + i, 0, 3)
            self.source.add(down)
            self.downs.append(down)

    def _keyframe(self) -> None:
        self.keyframes += 1

    def _behind(self) -> None:
        self.behind += 1

    def publish(self, *packets: bytes) -> None:
        for packet in packets:
            self.publisher.sendto(self.pub_srtp.protect(packet), self.node.getsockname())
        self.native.read()

    def received(self, index: int) -> list[bytes]:
        out = []
        sock = self.subs[index]
        sock.setblocking(False)
        while True:
            try:
                out.append(sock.recv(2048))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.native.close()
        for sock in [self.node, self.publisher, *self.subs]:
            sock.close()


def udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def python_rewrite(
    packet: bytes, ssrc: int, payload_type: int, level_id: int, seq: int, ts: int
) -> bytes:
    """What forwarding.py's Python plane sends for ``packet`` (before SRTP)."""
    from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
    from aiortc.rtp import HeaderExtensionsMap, RtpPacket

    from spaces.media.aiortc_adapter import AUDIO_LEVEL_URI
    from spaces.media.forwarding import TrackForwarder

    extensions = HeaderExtensionsMap()
    extensions.configure(
        RTCRtpParameters(
            headerExtensions=[RTCRtpHeaderExtensionParameters(id=1, uri=AUDIO_LEVEL_URI)]
        )
    )
    parsed = RtpPacket.parse(packet, extensions)
    tail, first, second = TrackForwarder.tail(parsed, (payload_type, 0, level_id), 0)
    return struct.pack("!BBHII", first, second, seq, ts, ssrc) + tail


def test_fan_out_is_the_python_rewrite_protected_per_subscriber_from_a_keyframe() -> None:
    wire = Wire(subscribers=2)
    try:
        delta = rtp(10, ssrc=0xAAAA, payload=DELTA)
        wire.publish(delta)  # before any keyframe: nobody gets it
        assert wire.received(0) == [] and wire.received(1) == []
        level = extension_block([(1, b"\x85")])
        packets = [
            rtp(11, ssrc=0xAAAA, payload=KEY, ext=level, marker=1),
            rtp(12, ssrc=0xAAAA, payload=DELTA, csrcs=2),
            rtp(13, ssrc=0xAAAA, payload=DELTA, padding=3),
        ]
        wire.publish(*packets)
        assert wire.keyframes == 1
        for i in range(2):
            srtp = reference(wire.sub_keys[i], outbound=True)
            expected = [
                srtp.protect(
                    python_rewrite(p, 0x5000 + i, 100 + i, 3, seq, seq * 3000 & 0xFFFFFFFF)
                )
                for p, seq in zip(packets, (11, 12, 13), strict=True)
            ]
            assert wire.received(i) == expected
        assert wire.source.forwarded == 6
        assert wire.downs[0].packet_count == 3
        assert wire.downs[0].last_rtp_timestamp == 13 * 3000
        assert wire.fallen == []
    finally:
        wire.close()


def test_a_down_switching_sources_continues_its_sequence_and_timestamps() -> None:
    wire = Wire(subscribers=1)
    other = dp.Source(dp.CODEC_VP8, 90000, True)
    wire.pub_peer.add_source(0xBBBB, other)
    try:
        wire.publish(rtp(100, ssrc=0xAAAA, payload=KEY), rtp(101, ssrc=0xAAAA, payload=DELTA))
        down = wire.downs[0]
        other.add(down)  # follows the other source from its next keyframe
        assert down.source is other and wire.source.downs == 0
        wire.publish(rtp(5000, ssrc=0xBBBB, payload=DELTA))  # not a keyframe: skipped
        wire.publish(rtp(5001, ssrc=0xBBBB, payload=KEY), rtp(5002, ssrc=0xBBBB, payload=DELTA))
        got = [srtp_header(wire.sub_keys[0], p) for p in wire.received(0)]
        seqs = [seq for seq, _ in got]
        assert seqs == [100, 101, 102, 103]
        ts = [t for _, t in got]
        assert ts[1] == 101 * 3000
        assert 0 < (ts[2] - ts[1]) % (1 << 32) < 90000  # wall-clock continuation, not a jump
        assert ts[3] - ts[2] == 3000
    finally:
        wire.close()


def vp8(picture: int, tl0: int, key: bool, long: bool = True) -> bytes:
    """A VP8 payload whose descriptor carries a picture id (15- or 7-bit) and TL0PICIDX."""
    pic = bytes([0x80 | picture >> 8, picture & 0xFF]) if long else bytes([picture & 0x7F])
    header = b"\x00\x9d\x01\x2a" if key else b"\x01"
    return bytes([0x90, 0xC0]) + pic + bytes([tl0]) + header + bytes(range(120))


def plain(key: bytes, datagram: bytes) -> bytes:
    return _receivers.setdefault(key, reference(key, outbound=False)).unprotect(datagram)


def test_a_down_switches_simulcast_layers_at_the_keyframe_with_picture_ids_continuous() -> None:
    """Source.switch: the down keeps its layer until the target's keyframe, then forwards the
    target from it; sequence numbers, picture ids and TL0PICIDX go on from the last sent, and
    the rest of each packet is the publisher's (forwarding.py DownTrack._rewrite_vp8)."""
    from spaces.media.forwarding import vp8_descriptor

    wire = Wire(subscribers=1)
    low = dp.Source(dp.CODEC_VP8, 90000, True, rewrite_vp8=True)
    high = dp.Source(dp.CODEC_VP8, 90000, True, rewrite_vp8=True)
    wire.pub_peer.add_source(0xA1, low)
    wire.pub_peer.add_source(0xA2, high)
    key = wire.sub_keys[0]
    down = wire.downs[0]
    try:
        low.add(down)
        wire.publish(
            rtp(100, ssrc=0xA1, payload=vp8(1000, 10, key=True)),
            rtp(101, ssrc=0xA1, payload=vp8(1001, 10, key=False)),
        )
        high.switch(down)
        assert down.pending is high and down.source is low
        wire.publish(
            rtp(102, ssrc=0xA1, payload=vp8(1002, 10, key=False)),  # the old layer goes on
            rtp(5000, ssrc=0xA2, payload=vp8(7000, 200, key=False)),  # not yet the new one
        )
        assert down.source is low
        wire.publish(
            rtp(5001, ssrc=0xA2, payload=vp8(7001, 200, key=True)),
            rtp(5002, ssrc=0xA2, payload=vp8(7002, 200, key=False)),
            rtp(103, ssrc=0xA1, payload=vp8(1003, 11, key=False)),  # left behind
        )
        assert down.source is high and down.pending is None and low.downs == 0
        raw = wire.received(0)
        got = [plain(key, d) for d in raw]
        seqs = [struct.unpack("!H", p[2:4])[0] for p in got]
        assert seqs == [100, 101, 102, 103, 104]
        pictures = []
        for packet, sent in zip(
            got,
            [
                vp8(1000, 10, True),
                vp8(1001, 10, False),
                vp8(1002, 10, False),
                vp8(7001, 200, True),
                vp8(7002, 200, False),
            ],
            strict=True,
        ):
            assert packet[0] == 0x80  # no extension block: the payload follows the header
            payload = packet[12:]
            descriptor = vp8_descriptor(payload)
            assert descriptor is not None
            pictures.append((descriptor[1], descriptor[4]))
            assert payload[:2] == sent[:2] and payload[5:] == sent[5:]  # only pic and TL0 differ
        assert pictures == [(1000, 10), (1001, 10), (1002, 10), (1003, 11), (1004, 11)]
        # A retransmission is the same packet again; continuity is untouched by it.
        first = wire.received(0)
        assert first == []
        assert down.retransmit(104) is True
        assert wire.received(0) == [raw[-1]]  # the same packet and SRTP index, byte for byte
        wire.publish(rtp(5003, ssrc=0xA2, payload=vp8(7003, 201, key=False)))
        last = plain(key, wire.received(0)[0])
        assert vp8_descriptor(last[12:])[1:5:3] == (1005, 12)  # type: ignore[index]
    finally:
        wire.close()


def test_a_cancelled_switch_stays_and_seven_bit_picture_ids_wrap() -> None:
    wire = Wire(subscribers=1)
    low = dp.Source(dp.CODEC_VP8, 90000, True, rewrite_vp8=True)
    high = dp.Source(dp.CODEC_VP8, 90000, True, rewrite_vp8=True)
    wire.pub_peer.add_source(0xA1, low)
    wire.pub_peer.add_source(0xA2, high)
    key = wire.sub_keys[0]
    down = wire.downs[0]
    from spaces.media.forwarding import vp8_descriptor

    try:
        low.add(down)
        wire.publish(rtp(1, ssrc=0xA1, payload=vp8(126, 3, key=True, long=False)))
        high.switch(down)
        high.cancel(down)
        assert down.pending is None
        wire.publish(rtp(50, ssrc=0xA2, payload=vp8(5, 9, key=True, long=False)))
        assert down.source is low  # the cancelled switch did not happen
        high.switch(down)
        wire.publish(
            rtp(51, ssrc=0xA2, payload=vp8(6, 9, key=True, long=False)),
            rtp(52, ssrc=0xA2, payload=vp8(7, 9, key=False, long=False)),
        )
        got = [plain(key, d) for d in wire.received(0)]
        pictures = [vp8_descriptor(p[12:])[1] for p in got]  # type: ignore[index]
        assert pictures == [126, 127, 0]  # 7-bit: wraps at 128
        # Closing the target while a switch is pending leaves the down where it was.
        assert down.source is high
        high.switch(down)  # already its source: nothing pending
        assert down.pending is None
        low.switch(down)
        assert down.pending is low
        low.close()
        assert down.pending is None and down.source is high
    finally:
        wire.close()


def srtp_header(key: bytes, datagram: bytes) -> tuple[int, int]:
    """Sequence number and timestamp of a datagram a subscriber got (checked by decrypting)."""
    receiver = _receivers.setdefault(key, reference(key, outbound=False))
    plain = receiver.unprotect(datagram)
    _, _, seq, ts, _ = struct.unpack("!BBHII", plain[:12])
    return seq, ts


_receivers: dict[bytes, pylibsrtp.Session] = {}


def test_nack_answers_from_the_history_and_losses_are_reported() -> None:
    wire = Wire(subscribers=1)
    try:
        wire.publish(rtp(1, ssrc=0xAAAA, payload=KEY), rtp(2, ssrc=0xAAAA, payload=DELTA))
        wire.publish(rtp(5, ssrc=0xAAAA, payload=DELTA))  # 3 and 4 lost on the way in
        assert wire.nacks == [[3, 4]]
        first = wire.received(0)
        assert len(first) == 3
        assert wire.downs[0].retransmit(2) is True
        again = wire.received(0)
        assert again == [first[1]]  # the same packet, the same SRTP index: byte for byte
        assert wire.downs[0].retransmit(3) is False  # never received
        assert wire.downs[0].retransmit(40000) is False
        stats = wire.source.stats()
        assert stats is not None and stats[:4] == (1, 5, 0, 3)
    finally:
        wire.close()


def test_stun_dtls_and_strangers_fall_back_intact_and_garbage_disturbs_nobody() -> None:
    wire = Wire(subscribers=2)
    stranger = udp()
    try:
        stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
        dtls = b"\x16\xfe\xfd" + os.urandom(40)
        wire.publisher.sendto(stun, wire.node.getsockname())
        wire.publisher.sendto(dtls, wire.node.getsockname())
        stranger.sendto(
            wire.pub_srtp.protect(rtp(1, ssrc=0xAAAA, payload=KEY)), wire.node.getsockname()
        )
        wire.native.read()
        assert [d for d, _ in wire.fallen] == [stun, dtls, wire.fallen[2][0]]
        assert wire.fallen[0][1] == wire.publisher.getsockname()
        assert wire.fallen[2][1] == stranger.getsockname()
        failed = wire.native.unprotect_failed
        for garbage in (b"\x80", b"\x80" * 11, b"\x90" + os.urandom(30), b"\xbf" * 1500):
            wire.publisher.sendto(garbage, wire.node.getsockname())
        wire.native.read()
        assert wire.native.unprotect_failed == failed + 4
        wire.publish(rtp(2, ssrc=0xAAAA, payload=KEY), rtp(3, ssrc=0xAAAA, payload=DELTA))
        for i in range(2):
            assert [srtp_header(wire.sub_keys[i], d)[0] for d in wire.received(i)] == [2, 3]
    finally:
        stranger.close()
        wire.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=0, max_size=1400), min_size=1, max_size=8))
def test_fuzzed_plaintext_never_crashes_and_never_corrupts_the_other_stream(
    garbage: list[bytes],
) -> None:
    """Authentic (correctly protected) but malformed RTP from a publisher: parsed, forwarded or
    dropped, never a crash; the well-formed stream that follows arrives intact."""
    wire = Wire(subscribers=2)
    try:
        wire.publish(rtp(1, ssrc=0xAAAA, payload=KEY))
        for n, data in enumerate(garbage):
            body = b"\x80\x60" + struct.pack("!H", 100 + n) + bytes(4) + b"\x00\x00\xaa\xaa" + data
            body = bytes([0x80 | (data[0] & 0x3F) if data else 0x80]) + body[1:]
            try:
                wire.publisher.sendto(wire.pub_srtp.protect(body), wire.node.getsockname())
            except pylibsrtp.Error:
                pass
            wire.native.read()
        for i in range(2):
            wire.received(i)
        good = [rtp(s, ssrc=0xAAAA, payload=DELTA) for s in (2, 3)]
        wire.publish(*good)
        for i in range(2):
            got = wire.received(i)
            assert len(got) == 2
            plain = [
                _receivers.setdefault(
                    wire.sub_keys[i], reference(wire.sub_keys[i], False)
                ).unprotect(d)
                for d in got
            ]
            assert [p[-len(DELTA) :] for p in plain] == [DELTA, DELTA]
    finally:
        _receivers.clear()
        wire.close()


# --- a subscriber that backs up ---------------------------------------------------------------


def test_a_backed_up_subscriber_waits_for_a_keyframe_and_the_others_get_everything() -> None:
    """The slow-subscriber bound of the native plane: a subscriber whose socket is full (its
    own socket, as each peer connection has in port-range mode, with a tiny SO_SNDBUF and its
    link shaped to 8 kbit/s by tc, so that the kernel answers EAGAIN) is not queued for in
    user space: it drops to the next keyframe and asks for one, while the other subscriber,
    sent to in the same batches, receives every packet in order."""
    from tests.support.shaping import LinkShaper

    wire = Wire(subscribers=2)
    slow_out = udp()
    slow_out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the kernel's minimum
    slow_out.setblocking(False)
    slow_addr = wire.subs[1].getsockname()
    wire.sub_peers[1].set_route(slow_out.fileno(), slow_addr)
    shaper = LinkShaper()
    big = bytes(range(256)) * 4
    try:
        shaper.limit(slow_addr[1], 8, queue_packets=1000)
        blocked_before = dp.counters()["send_would_block"]
        wire.publish(rtp(1, ssrc=0xAAAA, payload=KEY + big, marker=1))
        received = wire.received(0)
        for base in range(2, 202, 20):
            wire.publish(
                *(rtp(s, ssrc=0xAAAA, payload=DELTA + big) for s in range(base, base + 20))
            )
            received += wire.received(0)
        fast = [srtp_header(wire.sub_keys[0], p)[0] for p in received]
        assert fast == list(range(1, 202))  # everything, in order, decrypted
        slow = wire.downs[1]
        assert dp.counters()["send_would_block"] > blocked_before
        assert slow.waiting_keyframe and slow.dropped > 0
        assert wire.downs[0].dropped == 0 and not wire.downs[0].waiting_keyframe
        assert wire.source.behind >= 1 and wire.behind >= 1  # a keyframe was asked for
        sent_before = slow.packet_count
        assert sent_before < 201
        # While it waits, deltas are not sent to it at all (no queue builds up anywhere).
        wire.publish(*(rtp(s, ssrc=0xAAAA, payload=DELTA) for s in range(202, 212)))
        assert slow.packet_count == sent_before
        # The link recovers; the next keyframe restarts it, its sequence numbers going on
        # without a gap (nothing for it to NACK), and the fast subscriber never noticed.
        shaper.lift()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                slow_out.sendto(b"", ("127.0.0.1", 9))  # goes out: the queue has drained
                break
            except BlockingIOError:
                time.sleep(0.05)
        time.sleep(0.2)
        wire.publish(
            rtp(212, ssrc=0xAAAA, payload=KEY, marker=1),
            *(rtp(s, ssrc=0xAAAA, payload=DELTA) for s in range(213, 223)),
        )
        assert not slow.waiting_keyframe
        assert slow.packet_count == sent_before + 11
        got = [srtp_header(wire.sub_keys[1], p)[0] for p in wire.received(1) if p]
        assert got == list(range(1, 1 + sent_before + 11))
        fast = [srtp_header(wire.sub_keys[0], p)[0] for p in wire.received(0)]
        assert fast == list(range(202, 223))
    finally:
        shaper.close()
        slow_out.close()
        wire.close()


class _Owner:
    """A Python object that owns native objects which call back into it: the shape every
    forwarder, DTLS transport and socket protocol has in the node."""

    def callback(self, *args: object) -> None:
        del args


def test_native_objects_in_a_cycle_through_their_callbacks_are_collected_without_close() -> None:
    """Each native type takes part in the cyclic GC: an owner whose native object holds its
    bound method (and whose peer holds a source holding a down holding the peer) is freed by
    the collector even when nobody called close(), as on an error path."""
    import gc
    import weakref

    def build() -> weakref.ref[_Owner]:
        owner = _Owner()
        source = dp.Source(
            dp.CODEC_VP8,
            90000,
            True,
            0,
            owner.callback,
            owner.callback,
            owner.callback,
            owner.callback,
        )
        peer = dp.Peer()
        peer.set_handlers(owner.callback, owner.callback)
        peer.set_sender(owner.callback)
        peer.add_source(1234, source)
        down = dp.Down(peer, 5678, 96, 0, 0)
        source.add(down)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        native = dp.Socket(sock.fileno(), owner.callback)
        native.add_peer(("127.0.0.1", 9), peer)
        owner.__dict__.update(source=source, peer=peer, down=down, native=native, sock=sock)
        sock.close()
        return weakref.ref(owner)

    gc.collect()
    owners = [build() for _ in range(20)]
    gc.collect()
    alive = [ref for ref in owners if ref() is not None]
    assert not alive, f"{len(alive)} of {len(owners)} owners kept alive by their native objects"


def test_jitter_stays_small_across_a_timestamp_wrap() -> None:
    """Packets paced as their timestamps say, the timestamps wrapping past 2^32: the jitter the
    receiver reports stays near zero (RFC 3550 A.8 takes the difference modulo 2^32)."""
    source = dp.Source(dp.CODEC_OTHER, 48000, False)
    ts = (1 << 32) - 5 * 960
    for seq in range(12):
        source.count(seq, ts & 0xFFFFFFFF)
        ts += 960
        time.sleep(0.02)
    stats = source.stats()
    assert stats is not None
    jitter_ticks = stats[4] >> 4
    assert jitter_ticks < 48 * 10, f"jitter {jitter_ticks} ticks ({jitter_ticks / 48:.1f} ms)"
