"""The native data plane (spaces.media._dataplane) at its own layer: byte for byte against the
Python reference (pylibsrtp, the SRTP library aiortc uses, and the Python header rewrite), and
fuzzed input that must never crash it or disturb another peer's stream."""

from __future__ import annotations

import os
import socket
import struct

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
        sent_natively = dp.counters()["rtp_out"] - before
        forwarded = forwarded_packets() - forwarded_before
        if plane == "native":
            # Every forwarded packet but those offered before the subscriber's DTLS was up.
            assert sent_natively > 50
            assert sent_natively >= 0.9 * forwarded
        else:
            assert sent_natively == 0
            assert forwarded > 50
        await viewer.leave()
        await pub.leave()
    finally:
        await admin.close()
        await server.stop()
