"""Fan-out of encoded RTP: one publisher track to many subscribers, never decoding.

Per incoming packet the forwarder does the shared work once (keyframe detection, the header
extension block, the abs-send-time stamp) and each subscriber's ``DownTrack`` only rewrites
sequence number, timestamp, SSRC and payload type before its ``RtpSink`` protects and sends.

A DownTrack follows one source (a publisher track, or one simulcast layer of it). Told to follow
another (``follow``), it keeps forwarding the current one until the target's next keyframe and
switches there, asking the publisher for that keyframe; sequence numbers, timestamps and VP8
picture ids (``vp8_descriptor``) continue across the switch. Which source to follow is decided
elsewhere (``spaces.media.layers``).

A DownTrack starts at a keyframe. If its socket backs up past a bound (a slow subscriber) it
drops media until the next keyframe and asks for one: it never holds packets, so it never stalls
the others. Keyframe requests from subscribers are merged and rate-limited per publisher.

With the native data plane (``SPACES_MEDIA_DATAPLANE=native``) the same objects stay the
control plane, and the per-packet work moves to C: a forwarder owns a ``_dataplane.Source`` and
each sender a ``_dataplane.Down``; packets go from the socket to the subscribers without
entering Python (media-node/native/INTERFACE.md). Python hears only of keyframes, audio
levels, losses and slow subscribers, and answers feedback (PLI merging, NACKs) as before.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable

from spaces import metrics
from spaces.media import _dataplane
from spaces.media.aiortc_adapter import RtpPacket, RtpSink, ntp_now

logger = logging.getLogger(__name__)

HISTORY = 1024
"""Packets kept per publisher track for answering subscribers' NACKs (about 9 s of 1 Mbps)."""
RTX_MAX_AGE_S = 1.0
"""Retransmissions older than this are useless to a real-time receiver."""

_EXT_PROFILE = 0xBEDE


# --- keyframe detection ---------------------------------------------------------------------


def vp8_keyframe_start(payload: bytes) -> bool:
    """True for the first packet of a VP8 keyframe (RFC 7741 payload descriptor + header)."""
    if not payload:
        return False
    first = payload[0]
    if not first & 0x10 or first & 0x0F:  # S bit unset, or not partition 0
        return False
    pos = 1
    if first & 0x80:  # X: extension bits follow
        if len(payload) < 2:
            return False
        ext = payload[1]
        pos = 2
        if ext & 0x80:  # I: picture id
            if len(payload) <= pos:
                return False
            pos += 2 if payload[pos] & 0x80 else 1
        if ext & 0x40:  # L: TL0PICIDX
            pos += 1
        if ext & 0x30:  # T or K
            pos += 1
    return len(payload) > pos and not payload[pos] & 0x01  # P bit 0 = key frame


def h264_keyframe_start(payload: bytes) -> bool:
    """True for a packet starting an IDR or carrying SPS (RFC 6184: single NAL, STAP-A, FU-A)."""
    if not payload:
        return False
    nal_type = payload[0] & 0x1F
    if nal_type in (5, 7):
        return True
    if nal_type == 24:  # STAP-A: 16-bit size, then NAL
        pos = 1
        while pos + 2 < len(payload):
            size = (payload[pos] << 8) | payload[pos + 1]
            if size == 0 or pos + 2 >= len(payload):
                break
            if payload[pos + 2] & 0x1F in (5, 7):
                return True
            pos += 2 + size
        return False
    if nal_type == 28 and len(payload) > 1:  # FU-A: start bit and original type
        return bool(payload[1] & 0x80) and payload[1] & 0x1F in (5, 7)
    return False


VP8Descriptor = tuple[int, int, bool, int, int]
"""(picture id offset, picture id, 15-bit picture id, TL0PICIDX offset or -1, TL0PICIDX)."""


def vp8_descriptor(payload: bytes) -> VP8Descriptor | None:
    """Where a VP8 payload descriptor (RFC 7741) keeps its picture id and TL0PICIDX, and their
    values; None when it has neither."""
    size = len(payload)
    if size < 3 or not payload[0] & 0x80:
        return None
    ext = payload[1]
    pos = 2
    pic_pos, pic, long = -1, 0, False
    if ext & 0x80:
        pic_pos = pos
        if payload[pos] & 0x80:
            if size < pos + 2:
                return None
            long = True
            pic = ((payload[pos] & 0x7F) << 8) | payload[pos + 1]
            pos += 2
        else:
            pic = payload[pos] & 0x7F
            pos += 1
    tl0_pos, tl0 = -1, 0
    if ext & 0x40:
        if size <= pos:
            return None
        tl0_pos, tl0 = pos, payload[pos]
    if pic_pos < 0 and tl0_pos < 0:
        return None
    return pic_pos, pic, long, tl0_pos, tl0


def keyframe_detector(codec_name: str) -> Callable[[bytes], bool] | None:
    if codec_name == "VP8":
        return vp8_keyframe_start
    if codec_name == "H264":
        return h264_keyframe_start
    return None


def extension_block(elements: list[tuple[int, bytes]]) -> bytes:
    """RFC 8285 one-byte header extensions, padded to 32 bits."""
    body = b"".join(bytes([(ext_id << 4) | (len(value) - 1)]) + value for ext_id, value in elements)
    body += b"\x00" * (-len(body) % 4)
    return struct.pack("!HH", _EXT_PROFILE, len(body) // 4) + body


# --- keyframe requests ----------------------------------------------------------------------


class KeyframeRequester:
    """Merges subscribers' keyframe requests into PLIs to one publisher: at most one every
    ``min_interval``, none while a requested keyframe is still on its way.

    A PLI that brings no keyframe within ``3 * min_interval`` is sent again, for as long as
    ``waiting()`` says a subscriber still waits for one: a PLI can bring none (a browser ignores
    one that comes within 300 ms of the last it acted on, a datagram is lost, the publisher's
    SSRC is not known yet), and a subscriber that waits for a keyframe is sent nothing, so its
    browser never asks itself: without the retry it would wait forever."""

    def __init__(
        self,
        send_pli: Callable[[], None],
        min_interval_s: float,
        waiting: Callable[[], bool] = lambda: True,
    ) -> None:
        self._send_pli = send_pli
        self._min_interval = min_interval_s
        self._waiting = waiting
        self._last_sent = -1e9
        self._awaiting = False
        self._scheduled: asyncio.TimerHandle | None = None
        self._retry: asyncio.TimerHandle | None = None
        self.sent = 0

    def request(self) -> None:
        now = time.monotonic()
        elapsed = now - self._last_sent
        if self._awaiting and elapsed < self._min_interval * 3:
            return  # the keyframe already asked for will serve this subscriber too
        if elapsed >= self._min_interval:
            self._fire()
        elif self._scheduled is None:
            delay = self._min_interval - elapsed
            self._scheduled = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._scheduled = None
        self._last_sent = time.monotonic()
        self._awaiting = True
        self.sent += 1
        if self._retry is not None:
            self._retry.cancel()
        self._retry = asyncio.get_running_loop().call_later(self._min_interval * 3, self._check)
        metrics.KEYFRAME_REQUESTS.inc()
        self._send_pli()

    def _check(self) -> None:
        """No keyframe since the last PLI: ask again if someone still waits for one."""
        self._retry = None
        if self._awaiting and self._scheduled is None and self._waiting():
            self._fire()

    def keyframe_seen(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._awaiting = False

    def request_again(self) -> None:
        """Ask even if a keyframe is on its way: the last request may have been lost."""
        self._awaiting = False
        self.request()

    def close(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None


# --- per subscriber -------------------------------------------------------------------------


class SenderState:
    """Continuity of one outgoing RTP stream across the tracks it carries over time. With the
    native plane, ``native`` is that stream's ``_dataplane.Down``, which keeps the continuity
    itself (it follows one source after another, each from a keyframe)."""

    __slots__ = (
        "last_out_at",
        "last_out_pic",
        "last_out_seq",
        "last_out_tl0",
        "last_out_ts",
        "native",
        "started",
    )

    def __init__(self, native: _dataplane.Down | None = None) -> None:
        self.native = native
        self.started = False
        self.last_out_seq = 0
        self.last_out_ts = 0
        self.last_out_at = 0.0
        self.last_out_pic = -1
        """The last VP8 picture id sent (-1: none yet)."""
        self.last_out_tl0 = -1


class DownTrack:
    """One publisher track as one subscriber receives it."""

    __slots__ = (
        "_forwarder",
        "_pending",
        "_pic_offset",
        "_seq_offset",
        "_start_seq",
        "_tl0_offset",
        "_ts_offset",
        "attached",
        "dropped",
        "is_video",
        "limit",
        "native",
        "sink",
        "state",
        "subscriber_id",
        "waiting_keyframe",
    )

    def __init__(
        self,
        forwarder: TrackForwarder,
        sink: RtpSink,
        state: SenderState,
        subscriber_id: str,
        buffer_limit: int,
    ) -> None:
        self._forwarder = forwarder
        self.sink = sink
        self.state = state
        self.subscriber_id = subscriber_id
        self.limit = buffer_limit
        self.is_video = forwarder.is_video
        self.waiting_keyframe = forwarder.is_video
        self._seq_offset = 0
        self._ts_offset = 0
        self._start_seq = -1
        self._pic_offset = 0
        self._tl0_offset = 0
        self._pending: TrackForwarder | None = None
        """The source this DownTrack switches to at its next keyframe."""
        self.attached = False
        """In its forwarder's fan-out (``TrackForwarder.add``)."""
        self.dropped = 0
        self.native = state.native if forwarder.native is not None else None

    @property
    def source(self) -> TrackForwarder:
        """The source forwarded now (or last, while detached)."""
        return self._forwarder

    @property
    def target(self) -> TrackForwarder | None:
        """The source that will be forwarded: the pending switch's, else the current one (None
        while detached with no switch pending)."""
        if self._pending is not None:
            return self._pending
        return self._forwarder if self.attached else None

    def follow(self, target: TrackForwarder | None) -> None:
        """Forward ``target`` from its next keyframe on, asking its publisher for one; until
        then the current source goes on. ``None``: forward nothing from now on."""
        pending = self._pending
        if pending is not None and pending is not target:
            pending.cancel_switch(self)
            self._pending = None
        if target is None:
            if self.attached:
                self._forwarder.remove(self)
                self.waiting_keyframe = self.is_video
            return
        if target is self._forwarder and self.attached:
            return
        if target is not pending:
            self._pending = target
            target.expect_switch(self)
        target.request_keyframe()

    def switch_now(self, target: TrackForwarder) -> None:
        """Called by ``target`` at its keyframe: leave the current source, join ``target``
        waiting for that keyframe, as a new source on this sender."""
        self._pending = None
        if self.attached and self._forwarder is not target:
            self._forwarder.remove(self)
        self._forwarder = target
        self._start_seq = -1
        self.waiting_keyframe = self.is_video
        if not self.attached:
            target.add(self)

    def detach(self) -> None:
        """Out of every fan-out and pending switch (the subscription ends)."""
        self.follow(None)

    # The hot path: called once per packet per subscriber.
    def forward(
        self,
        packet: RtpPacket,
        tail: bytes,
        first: int,
        second: int,
        keyframe: bool,
        payload_len: int,
        ntp: int,
        now: float,
    ) -> None:
        if self.waiting_keyframe:
            if not keyframe or not self.sink.connected:
                self.dropped += 1
                return
            self._rebase(packet, now)
        seq = (packet.sequence_number + self._seq_offset) & 0xFFFF
        ts = (packet.timestamp + self._ts_offset) & 0xFFFFFFFF
        vp8 = self._forwarder.vp8
        if vp8 is not None:
            tail = self._rewrite_vp8(tail, len(tail) - payload_len, vp8)
        backlog = self.sink.send(first, second, seq, ts, tail, payload_len, ntp)
        if backlog < 0:
            self.dropped += 1
            return
        state = self.state
        state.last_out_seq = seq
        state.last_out_ts = ts
        state.last_out_at = now
        if backlog > self.limit:
            self._fall_behind()

    def _rebase(self, packet: RtpPacket, now: float) -> None:
        """Start (or restart) at this keyframe. Sequence numbers continue without a gap, so
        the subscriber does not NACK what was skipped. Timestamps keep their offset when this
        DownTrack resumes its own source (time did pass); a sender switching to another
        source continues from its last timestamp plus the wall-clock time since."""
        state = self.state
        if not state.started:
            self._seq_offset = 0
            self._ts_offset = 0
            state.started = True
        else:
            next_seq = (state.last_out_seq + 1) & 0xFFFF
            self._seq_offset = (next_seq - packet.sequence_number) & 0xFFFF
            if self._start_seq < 0:  # a new source on this sender
                elapsed = max(now - state.last_out_at, 0.001)
                gap = int(elapsed * self._forwarder.clock_rate)
                next_ts = (state.last_out_ts + gap) & 0xFFFFFFFF
                self._ts_offset = (next_ts - packet.timestamp) & 0xFFFFFFFF
                vp8 = self._forwarder.vp8
                if vp8 is not None:
                    # The picture id goes on from the last one sent (and TL0PICIDX too), so
                    # the decoder sees the next picture, not a jump from another stream.
                    _, pic, long, _, tl0 = vp8
                    mask = 0x7FFF if long else 0x7F
                    if state.last_out_pic >= 0:
                        self._pic_offset = (state.last_out_pic + 1 - pic) & mask
                    if state.last_out_tl0 >= 0:
                        self._tl0_offset = (state.last_out_tl0 + 1 - tl0) & 0xFF
        self._start_seq = packet.sequence_number
        self.waiting_keyframe = False

    def _rewrite_vp8(self, tail: bytes, head: int, vp8: VP8Descriptor) -> bytes:
        """``tail`` with this DownTrack's picture id and TL0PICIDX (offsets set at a switch);
        records them as the last sent."""
        pic_pos, pic, long, tl0_pos, tl0 = vp8
        state = self.state
        pic_out = (pic + self._pic_offset) & (0x7FFF if long else 0x7F)
        tl0_out = (tl0 + self._tl0_offset) & 0xFF
        if pic_pos >= 0:
            state.last_out_pic = pic_out
        if tl0_pos >= 0:
            state.last_out_tl0 = tl0_out
        if not self._pic_offset and not self._tl0_offset:
            return tail
        patched = bytearray(tail)
        if pic_pos >= 0:
            if long:
                patched[head + pic_pos] = 0x80 | (pic_out >> 8)
                patched[head + pic_pos + 1] = pic_out & 0xFF
            else:
                patched[head + pic_pos] = pic_out
        if tl0_pos >= 0:
            patched[head + tl0_pos] = tl0_out
        return bytes(patched)

    def _fall_behind(self) -> None:
        self.dropped += 1
        metrics.DROPPED_PACKETS.labels(reason="slow_subscriber").inc()
        if self.is_video:
            self.waiting_keyframe = True
            self._forwarder.request_keyframe()

    def retransmit(self, out_seq: int) -> bool:
        """Answer a NACK from the publisher's history, if the packet is still worth sending;
        returns whether it was resent."""
        native = self.native
        if native is not None:
            return native.source is self._forwarder.native and native.retransmit(out_seq)
        if self.waiting_keyframe or not self.attached:
            return False
        in_seq = (out_seq - self._seq_offset) & 0xFFFF
        if self._start_seq >= 0 and ((in_seq - self._start_seq) & 0xFFFF) >= 0x8000:
            return False  # from before this subscriber's starting keyframe
        entry = self._forwarder.history[in_seq % HISTORY]
        if entry is None:
            return False
        packet, received_at = entry
        if packet.sequence_number != in_seq or time.monotonic() - received_at > RTX_MAX_AGE_S:
            return False
        sink = self.sink
        ntp = ntp_now()
        tail, first, second = TrackForwarder.tail(packet, sink.key, ntp)
        ts = (packet.timestamp + self._ts_offset) & 0xFFFFFFFF
        if self._forwarder.vp8 is not None and (self._pic_offset or self._tl0_offset):
            vp8 = vp8_descriptor(packet.payload)
            if vp8 is not None:
                pic, tl0 = self.state.last_out_pic, self.state.last_out_tl0
                tail = self._rewrite_vp8(tail, len(tail) - len(packet.payload), vp8)
                self.state.last_out_pic, self.state.last_out_tl0 = pic, tl0
        sink.send(first, second, out_seq, ts, tail, len(packet.payload), ntp)
        return True

    def request_keyframe(self) -> None:
        if self.is_video:
            (self._pending or self._forwarder).request_keyframe()


# --- per publisher track --------------------------------------------------------------------


class NativeBinding:
    """How a forwarder's native source meets its publisher's connection (made by
    ``spaces.media.dataplane``): ``bind`` routes the publisher's SSRC to the source inside the
    receiving peer; ``on_nack`` sends the native loss detector's NACKs."""

    __slots__ = ("audio_level_id", "bind", "on_nack", "unbind")

    def __init__(
        self,
        bind: Callable[[int, _dataplane.Source], None],
        unbind: Callable[[int], None],
        on_nack: Callable[[list[int]], None],
        audio_level_id: int,
    ) -> None:
        self.bind = bind
        self.unbind = unbind
        self.on_nack = on_nack
        self.audio_level_id = audio_level_id


class TrackForwarder:
    """Receives one publisher track's packets (from the receiver tap) and fans them out."""

    def __init__(
        self,
        track_id: str,
        kind: str,
        codec_name: str,
        clock_rate: int,
        send_pli: Callable[[], None],
        keyframe_interval_s: float,
        on_audio_level: Callable[[int], None] | None = None,
        rid: str = "",
        native: NativeBinding | None = None,
    ) -> None:
        self.track_id = track_id
        self.rid = rid
        """The simulcast layer this forwarder carries ("" for a track without simulcast)."""
        self.kind = kind
        self.is_video = kind == "video"
        self.codec_name = codec_name
        self.clock_rate = clock_rate
        self._is_keyframe = keyframe_detector(codec_name)
        self._keyframes = KeyframeRequester(send_pli, keyframe_interval_s, self._someone_waits)
        self._on_audio_level = on_audio_level
        self.downtracks: tuple[DownTrack, ...] = ()
        self.switching: tuple[DownTrack, ...] = ()
        """DownTracks that switch to this source at its next keyframe."""
        self.rewrites_vp8 = bool(rid) and codec_name == "VP8"
        """A simulcast layer's picture ids are rewritten per subscriber (continuity across
        layer switches)."""
        self.vp8: VP8Descriptor | None = None
        """The current packet's VP8 descriptor, when picture ids are rewritten."""
        self.history: list[tuple[RtpPacket, float] | None] = [None] * HISTORY
        self.paused = False
        self._last_packet_at = 0.0
        self.ssrc = 0
        """The publisher's SSRC, learned from its packets (keyframe requests name it)."""
        self._metric_packets = metrics.FORWARDED_PACKETS.labels(kind=kind)
        self._metric_bytes = metrics.FORWARDED_BYTES.labels(kind=kind)
        self._binding = native
        self._bound = False
        self._synced = (0, 0, 0)
        self.native: _dataplane.Source | None = None
        """The native plane's copy of this track, when the node runs it."""
        if native is not None:
            codec = {"VP8": _dataplane.CODEC_VP8, "H264": _dataplane.CODEC_H264}
            self.native = _dataplane.Source(
                codec.get(codec_name, _dataplane.CODEC_OTHER),
                clock_rate,
                self.is_video,
                native.audio_level_id,
                self._native_keyframe,
                on_audio_level,
                native.on_nack,
                self._native_behind,
                self.rewrites_vp8,
            )

    @property
    def last_packet_at(self) -> float:
        """When the publisher last sent on this source (monotonic): a simulcast layer the
        publisher stopped sending is not one to follow."""
        if self.native is not None:
            return max(self.native.last_at_ns / 1e9, self._last_packet_at)
        return self._last_packet_at

    @last_packet_at.setter
    def last_packet_at(self, at: float) -> None:
        self._last_packet_at = at

    def add(self, downtrack: DownTrack) -> None:
        self.downtracks = (*self.downtracks, downtrack)
        downtrack.attached = True
        if self.native is not None and downtrack.native is not None:
            self.native.add(downtrack.native)

    def remove(self, downtrack: DownTrack) -> None:
        self.downtracks = tuple(d for d in self.downtracks if d is not downtrack)
        downtrack.attached = False
        if self.native is not None and downtrack.native is not None:
            self.native.remove(downtrack.native)

    def expect_switch(self, downtrack: DownTrack) -> None:
        self.switching = (*self.switching, downtrack)
        if self.native is not None and downtrack.native is not None:
            # The native source moves the Down at its keyframe; _native_keyframe follows.
            self.native.switch(downtrack.native)

    def cancel_switch(self, downtrack: DownTrack) -> None:
        self.switching = tuple(d for d in self.switching if d is not downtrack)
        if self.native is not None and downtrack.native is not None:
            self.native.cancel(downtrack.native)

    def _native_keyframe(self) -> None:
        """A keyframe went through the native source, which moved the Downs switching to it
        (before forwarding it): their DownTracks follow."""
        self._keyframes.keyframe_seen()
        if not self.switching:
            return
        native = self.native
        moved = tuple(
            d for d in self.switching if d.native is not None and d.native.source is native
        )
        if moved:
            self.switching = tuple(d for d in self.switching if d not in moved)
            for downtrack in moved:
                downtrack.switch_now(self)

    def _someone_waits(self) -> bool:
        """Whether a subscriber waits for this source's next keyframe (to start, to resume or
        to switch to it)."""
        if self.paused:
            return False  # muted: no frames to wait for; unmuting asks again
        if self.switching:
            return True
        for downtrack in self.downtracks:
            native = downtrack.native
            if native.waiting_keyframe if native is not None else downtrack.waiting_keyframe:
                return True
        return False

    def _native_behind(self) -> None:
        """A subscriber's socket was full: it waits for a keyframe (dropped in C)."""
        self.request_keyframe()

    def sync_metrics(self) -> None:
        """Bring the native plane's counts into the metrics (called periodically)."""
        native = self.native
        if native is None:
            return
        packets, octets, behind = native.forwarded, native.forwarded_bytes, native.behind
        last_packets, last_octets, last_behind = self._synced
        self._synced = (packets, octets, behind)
        if packets > last_packets:
            self._metric_packets.inc(packets - last_packets)
            self._metric_bytes.inc(octets - last_octets)
        if behind > last_behind:
            metrics.DROPPED_PACKETS.labels(reason="slow_subscriber").inc(behind - last_behind)

    def request_keyframe(self) -> None:
        if self.is_video:
            self._keyframes.request()

    def restart_at_keyframe(self) -> None:
        """The publisher's packets were lost for a while (its address changed): every
        subscriber resumes at the next keyframe, with no gap in its sequence numbers to wait
        for, and one is asked for even if a request is pending (it may have gone to the old
        address)."""
        if self.is_video:
            for downtrack in self.downtracks:
                downtrack.waiting_keyframe = True
            if self.native is not None:
                self.native.restart()
            self._keyframes.request_again()

    def set_paused(self, paused: bool) -> None:
        """A muted track is not forwarded; on unmute, video restarts at a keyframe."""
        if self.paused and not paused and self.is_video:
            for downtrack in self.downtracks:
                downtrack.waiting_keyframe = True
            if self.native is not None:
                self.native.restart()
            self._keyframes.request()
        self.paused = paused
        if self.native is not None:
            self.native.paused = paused

    def close(self) -> None:
        self._keyframes.close()
        for downtrack in (*self.downtracks, *self.switching):
            downtrack.attached = False
        self.downtracks = ()
        self.switching = ()
        if self.native is not None:
            self.sync_metrics()
            self.native.close()
            if self._binding is not None and self._bound:
                self._binding.unbind(self.ssrc)

    @property
    def keyframe_requests_sent(self) -> int:
        return self._keyframes.sent

    def on_packet(self, packet: RtpPacket) -> None:
        native = self.native
        if native is not None:
            # The native plane forwards this track. Python sees its first packet (which tells
            # the SSRC to route natively from then on) and the publisher's retransmissions
            # (RTX, which aiortc unwraps): both go into the native fan-out.
            unbound = not self._bound
            if unbound and self._binding is not None:
                self.ssrc = packet.ssrc
                self._binding.bind(packet.ssrc, native)
                self._bound = True
            level = packet.extensions.audio_level
            native.inject(
                packet.sequence_number,
                packet.timestamp,
                packet.marker,
                packet.payload,
                -1 if level is None else (0x80 if level[0] else 0) | (level[1] & 0x7F),
                unbound,
            )
            return
        self.ssrc = packet.ssrc
        keyframe = False
        if self._is_keyframe is not None and self._is_keyframe(packet.payload):
            keyframe = True
            self._keyframes.keyframe_seen()
        level = packet.extensions.audio_level
        if level is not None and self._on_audio_level is not None:
            self._on_audio_level(level[1])
        if self.paused or not packet.payload:
            return
        now = time.monotonic()
        self._last_packet_at = now
        self.history[packet.sequence_number % HISTORY] = (packet, now)
        if self.rewrites_vp8:
            self.vp8 = vp8_descriptor(packet.payload)
        if keyframe and self.switching:
            switching, self.switching = self.switching, ()
            for downtrack in switching:
                downtrack.switch_now(self)
        downtracks = self.downtracks
        if not downtracks:
            return
        ntp = ntp_now()
        payload_len = len(packet.payload)
        # The shared part of every outgoing packet: extension block and payload. Subscribers
        # negotiated by this node share extension ids, so this is built once per packet.
        key = None
        tail = b""
        first = second = 0
        for downtrack in downtracks:
            sink_key = downtrack.sink.key
            if sink_key != key:
                key = sink_key
                tail, first, second = self.tail(packet, key, ntp)
            downtrack.forward(packet, tail, first, second, keyframe, payload_len, ntp, now)
        self._metric_packets.inc(len(downtracks))
        self._metric_bytes.inc(len(downtracks) * payload_len)

    @staticmethod
    def tail(packet: RtpPacket, key: tuple[int, int, int], ntp: int) -> tuple[bytes, int, int]:
        """(extension block + payload, first header byte, second header byte) for a sink
        negotiated with ``key`` = (payload type, abs-send-time id, audio-level id)."""
        payload_type, abs_id, level_id = key
        elements: list[tuple[int, bytes]] = []
        if abs_id:
            elements.append((abs_id, ((ntp >> 14) & 0x00FFFFFF).to_bytes(3, "big")))
        level = packet.extensions.audio_level
        if level_id and level is not None:
            elements.append((level_id, bytes([(0x80 if level[0] else 0) | (level[1] & 0x7F)])))
        head = extension_block(elements) if elements else b""
        first = 0x90 if head else 0x80
        second = (packet.marker << 7) | payload_type
        return head + packet.payload, first, second


# --- simulcast ------------------------------------------------------------------------------


class SimulcastDemux:
    """The receive side of a simulcast track: every layer arrives on one receiver, each on an
    SSRC that no SDP announces. An SSRC is bound to its layer by the rid extension of its first
    packets; its packets then go to that layer's forwarder."""

    __slots__ = ("_by_rid", "_by_ssrc", "layers", "unbound")

    def __init__(self, layers: tuple[TrackForwarder, ...]) -> None:
        self.layers = layers
        """Lowest first."""
        self._by_rid = {layer.rid: layer for layer in layers}
        self._by_ssrc: dict[int, TrackForwarder] = {}
        self.unbound = 0
        """Packets dropped before their SSRC was bound to a layer."""

    def on_packet(self, packet: RtpPacket) -> None:
        layer = self._by_ssrc.get(packet.ssrc)
        if layer is None:
            rid = packet.extensions.rtp_stream_id
            layer = self._by_rid.get(rid) if rid is not None else None
            if layer is None:
                self.unbound += 1
                return
            self._by_ssrc[packet.ssrc] = layer
        layer.on_packet(packet)
