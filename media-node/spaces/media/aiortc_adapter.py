"""Every use of aiortc's and aioice's private API, in one module. aiortc is pinned to 1.16.*.

aiortc decodes everything it receives and encodes for every sender. A forwarding SFU needs
four hooks into it (REFERENCE.md §3):

* **receive**: the receiver's jitter buffer is replaced by a tap that hands each RTP packet
  (already decrypted, RTX-unwrapped, with NACK/RR/REMB bookkeeping done by aiortc) to the
  forwarder, and the decoder thread is stopped, so nothing is decoded or buffered;
* **send**: ``RtpSink`` writes rewritten RTP straight to the sender's SRTP session and the
  nominated ICE pair, and keeps the sender's counters current so its RTCP sender reports stay
  true; the sender's own encode loop idles on a track that never yields;
* **feedback**: a subscriber's PLI/FIR (``_send_keyframe``) and NACK (``_retransmit``) reach
  the forwarder instead of an encoder that does not exist;
(With the native data plane, ``spaces.media.dataplane``, the native module's wrapper, hooks
aiortc's SRTP sessions, sockets, receivers' statistics and senders' reports too.)
* **ICE**: candidate gathering binds configured addresses, a UDP port range, and can announce
  an advertised IP (NAT 1:1); aioice alone binds ephemeral ports on every non-loopback address.
  In single-port mode no socket is bound per peer connection: each ICE endpoint registers with
  the node's ``UdpMux`` (``udp_mux.py``) and follows its peer to a new address (NAT rebinding).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiortc
import aiortc.rtcrtpreceiver
import aiortc.rtcrtpsender
from aioice import ice as aioice_ice
from aioice import stun as aioice_stun
from aioice.candidate import Candidate, candidate_foundation, candidate_priority
from aioice.utils import random_string
from aiortc import (
    MediaStreamTrack,
    RTCPeerConnection,
    RTCRtpCodecCapability,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCRtpTransceiver,
)
from aiortc.clock import current_ntp_time
from aiortc.codecs import is_rtx
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpSrPacket,
    RtpPacket,
    pack_remb_fci,
    unpack_remb_fci,
)

from spaces.media.udp_mux import MuxLink, UdpMux
from spaces.tasks import spawn

logger = logging.getLogger(__name__)

SUPPORTED_AIORTC = "1.16."
if not aiortc.__version__.startswith(SUPPORTED_AIORTC):  # pragma: no cover
    raise ImportError(
        f"spaces.media needs aiortc {SUPPORTED_AIORTC}* (found {aiortc.__version__}): "
        "its private hooks are version-specific"
    )

AUDIO_LEVEL_URI = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
RID_URI = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"
RRID_URI = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"
MID_URI = "urn:ietf:params:rtp-hdrext:sdes:mid"
ABS_SEND_TIME_URI = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
UDP_BUFFER_BYTES = 1 << 20

__all__ = [
    "ABS_SEND_TIME_URI",
    "AUDIO_LEVEL_URI",
    "SEND_FAILED",
    "Codec",
    "IcePolicy",
    "OfferedMedia",
    "PlaceholderTrack",
    "RtpPacket",
    "RtpSink",
    "SimulcastOffer",
    "TurnServer",
    "accept_simulcast",
    "add_remote_candidate",
    "answer_dtx",
    "answer_with_simulcast",
    "apply_ice_policy",
    "check_answer",
    "hook_sender",
    "hook_sender_feedback",
    "install_codec_counters",
    "label_sender",
    "negotiated_codec",
    "offered_simulcast",
    "on_peer_moved",
    "parse_sdp",
    "pin_encoder_bitrate",
    "prefer_codec",
    "request_keyframe",
    "restrict_codecs",
    "route_by_mid",
    "send_remb",
    "tap_receiver",
    "tap_simulcast_receiver",
    "turn_server_from_url",
    "without_empty_bundle",
]


# --- codecs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Codec:
    mime_type: str
    """e.g. "video/VP8", "audio/opus"."""
    clock_rate: int
    payload_type: int
    parameters: dict[str, Any]

    @property
    def name(self) -> str:
        return self.mime_type.split("/", 1)[1].upper()


def _codec(params: RTCRtpCodecParameters) -> Codec:
    return Codec(params.mimeType, params.clockRate, params.payloadType, dict(params.parameters))


def negotiated_codec(transceiver: RTCRtpTransceiver) -> Codec | None:
    """The codec a transceiver sends or receives with: the first negotiated one."""
    for params in transceiver._codecs:
        if not is_rtx(params):
            return _codec(params)
    return None


def restrict_codecs(
    transceiver: RTCRtpTransceiver, allowed: Callable[[Codec], bool]
) -> Codec | None:
    """Keep only the offerer's first allowed codec (and its RTX) in the answer, so a publisher
    can send exactly one codec per track. Call between setRemoteDescription and createAnswer."""
    chosen = next((c for c in transceiver._codecs if not is_rtx(c) and allowed(_codec(c))), None)
    if chosen is None:
        return None
    transceiver._codecs = [chosen] + [
        c
        for c in transceiver._codecs
        if is_rtx(c) and c.parameters.get("apt") == chosen.payloadType
    ]
    return _codec(chosen)


def answer_dtx(transceiver: RTCRtpTransceiver, offered: tuple[Codec, ...]) -> bool:
    """Answer ``usedtx=1`` on the chosen Opus codec when the offer asks for it, so that a
    publisher that wants DTX sends it (a browser's sender follows the answer's fmtp; aiortc
    answers its own Opus parameters, which have none, and a browser would send 50 packets a
    second of silence). The node forwards the sparse packets as they come. Call after
    ``restrict_codecs``; returns whether DTX was answered."""
    chosen = next((c for c in transceiver._codecs if not is_rtx(c)), None)
    if chosen is None or chosen.mimeType.lower() != "audio/opus":
        return False
    asked = any(
        c.payload_type == chosen.payloadType and str(c.parameters.get("usedtx", "0")) == "1"
        for c in offered
    )
    if asked:
        chosen.parameters["usedtx"] = 1
    return asked


def prefer_codec(transceiver: RTCRtpTransceiver, codec: Codec) -> None:
    """Offer only ``codec`` (no RTX) on a sending transceiver. Public API, kept here with the
    other codec plumbing."""
    kind = codec.mime_type.split("/", 1)[0]
    capabilities = RTCRtpSender.getCapabilities(kind).codecs
    matches = [c for c in capabilities if c.mimeType.lower() == codec.mime_type.lower()]
    if codec.name == "H264":
        wanted = str(codec.parameters.get("profile-level-id", "")).lower()
        exact = [c for c in matches if str(c.parameters.get("profile-level-id", "")) == wanted]
        matches = exact or matches
    if not matches:
        raise ValueError(f"codec {codec.mime_type} is not supported by aiortc")
    chosen: RTCRtpCodecCapability = matches[0]
    transceiver.setCodecPreferences([chosen])


@dataclass(frozen=True)
class OfferedMedia:
    """One m-section of a remote description, as far as admission checks need it."""

    mid: str
    kind: str
    direction: str
    codecs: tuple[Codec, ...]


def parse_sdp(sdp: str) -> list[OfferedMedia]:
    """Parse a session description without touching any peer connection. Raises ValueError
    for anything aiortc could not apply."""
    from aiortc import sdp as aiortc_sdp

    try:
        description = aiortc_sdp.SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc raises assorted errors on malformed input
        raise ValueError(str(exc) or type(exc).__name__) from exc
    media: list[OfferedMedia] = []
    for m in description.media:
        if m.kind not in ("audio", "video"):
            continue
        if not m.rtp.muxId:
            raise ValueError("m-section without a=mid")
        if not m.ice.usernameFragment or not m.dtls or not m.dtls.fingerprints:
            raise ValueError("m-section without ICE credentials or DTLS fingerprint")
        media.append(
            OfferedMedia(
                mid=m.rtp.muxId,
                kind=m.kind,
                direction=m.direction or "sendrecv",
                codecs=tuple(_codec(c) for c in m.rtp.codecs if not is_rtx(c)),
            )
        )
    if not media:
        raise ValueError("no audio or video m-section")
    return media


def check_answer(answer: str, offer: str) -> None:
    """An answer must be a session description with exactly the offer's m-sections, in its
    order (RFC 3264), each with ICE credentials and a DTLS fingerprint when it carries media.
    Raises ValueError otherwise; aiortc alone accepts text that is not SDP at all."""
    from aiortc import sdp as aiortc_sdp

    if not answer.lstrip().startswith("v=0"):
        raise ValueError("not a session description")
    try:
        offered = aiortc_sdp.SessionDescription.parse(offer)
        answered = aiortc_sdp.SessionDescription.parse(answer)
    except Exception as exc:
        raise ValueError(str(exc) or type(exc).__name__) from exc
    if [m.kind for m in answered.media] != [m.kind for m in offered.media]:
        raise ValueError("the answer's m-sections do not match the offer's")
    for m in answered.media:
        if m.port != 0 and (not m.ice.usernameFragment or not m.dtls or not m.dtls.fingerprints):
            raise ValueError("m-section without ICE credentials or DTLS fingerprint")


def without_empty_bundle(sdp: str) -> str:
    """Drop the bare ``a=group:BUNDLE`` line aiortc writes into an offer with no m-sections:
    Chrome refuses such an offer (a BUNDLE group naming a mid of no m-section), and accepts
    the same offer without the line."""
    lines = sdp.split("\r\n")
    kept = [line for line in lines if line.strip() != "a=group:BUNDLE"]
    return sdp if len(kept) == len(lines) else "\r\n".join(kept)


def label_sender(transceiver: RTCRtpTransceiver, track_id: str) -> None:
    """Make the m-section's ``a=msid`` name ``track_id`` as both stream and track, so that a
    browser sees one MediaStream per remote track with the track's id (Mux's web SDK maps
    remote tracks by ``streams[0].id``). Call before createOffer; a reused m-section gets its
    new track's id."""
    transceiver.sender._stream_id = track_id
    transceiver.sender._track_id = track_id


async def add_remote_candidate(
    pc: RTCPeerConnection, candidate: str, sdp_mid: str, sdp_mline_index: int
) -> bool:
    """Add a trickled remote candidate (the attribute value, "candidate:..."); an empty one
    ends the remote candidates. Only UDP candidates are used (aioice has no ICE-TCP): others
    are skipped. Returns whether a candidate was added. Raises ValueError when it does not
    parse."""
    from aiortc.sdp import candidate_from_sdp

    text = candidate.strip()
    if not text:
        await pc.addIceCandidate(None)
        return False
    text = text.removeprefix("a=").removeprefix("candidate:")
    try:
        parsed = candidate_from_sdp(text)
    except (AssertionError, ValueError, IndexError) as exc:
        raise ValueError("candidate does not parse") from exc
    if parsed.protocol.lower() != "udp":
        return False
    parsed.sdpMid = sdp_mid or None
    parsed.sdpMLineIndex = sdp_mline_index if not sdp_mid else None
    await pc.addIceCandidate(parsed)
    return True


# --- simulcast (RFC 8853 rids) -------------------------------------------------------------


@dataclass(frozen=True)
class SimulcastOffer:
    """What one m-section of an offer says about simulcast: its rids in ``a=simulcast`` order
    (paused ones, written ``~rid``, included) and the ids of the rid header extensions."""

    rids: tuple[str, ...]
    rid_ext: int
    rrid_ext: int


def offered_simulcast(sdp: str) -> dict[str, SimulcastOffer]:
    """mid -> the simulcast an offer's m-section sends, for every m-section that sends more
    than one rid. Read from the text: aiortc's parser drops ``a=rid`` and ``a=simulcast``."""
    found: dict[str, SimulcastOffer] = {}
    mid = ""
    rids: list[str] = []
    exts: dict[str, int] = {}

    def close_section() -> None:
        if mid and len(rids) > 1 and exts.get(RID_URI):
            found[mid] = SimulcastOffer(tuple(rids), exts[RID_URI], exts.get(RRID_URI, 0))

    for raw in sdp.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            close_section()
            mid, rids, exts = "", [], {}
        elif line.startswith("a=mid:"):
            mid = line[6:].strip()
        elif line.startswith("a=extmap:"):
            head, _, rest = line[9:].partition(" ")
            uri = rest.split(" ", 1)[0]
            try:
                exts[uri] = int(head.split("/", 1)[0])
            except ValueError:
                continue
        elif line.startswith("a=simulcast:"):
            direction, _, spec = line[12:].strip().partition(" ")
            if direction == "send":
                # "q;h;f" (";" separates streams, "," alternatives: take each stream's first)
                rids = [alt.split(",")[0].lstrip("~") for alt in spec.split(";") if alt]
    close_section()
    return found


def accept_simulcast(transceiver: RTCRtpTransceiver, offer: SimulcastOffer) -> None:
    """Negotiate the rid header extensions (aiortc knows them, but does not offer them), so that
    the answer carries them and the receive path parses each packet's rid. Call between
    setRemoteDescription and createAnswer."""
    from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters

    have = {ext.uri for ext in transceiver._headerExtensions}
    for uri, ext_id in ((RID_URI, offer.rid_ext), (RRID_URI, offer.rrid_ext)):
        if ext_id and uri not in have:
            transceiver._headerExtensions.append(
                RTCRtpHeaderExtensionParameters(id=ext_id, uri=uri)
            )


def answer_with_simulcast(
    sdp: str, offers: dict[str, SimulcastOffer], start_bitrates: dict[str, int] | None = None
) -> str:
    """Add ``a=rid:<rid> recv`` and ``a=simulcast:recv ...`` to the answer's m-sections that
    were offered simulcast: without them a browser sends one layer only. ``start_bitrates``
    (mid -> bits per second) become ``x-google-start-bitrate`` on those m-sections' video
    codecs: with REMB as its only feedback a browser's estimate starts at 300 kbps and climbs
    about 8% a second, so its top layer would otherwise take half a minute to appear."""
    if not offers:
        return sdp
    start_bitrates = start_bitrates or {}
    sections: list[list[str]] = [[]]
    for line in sdp.split("\r\n"):
        if line.startswith("m="):
            sections.append([])
        sections[-1].append(line)
    out: list[str] = []
    for section in sections:
        mid = next((x[6:].strip() for x in section if x.startswith("a=mid:")), "")
        offer = offers.get(mid)
        if offer is None:
            out.extend(section)
            continue
        start = start_bitrates.get(mid, 0) // 1000
        media_pts = [
            x[9:].split(" ", 1)[0]
            for x in section
            if x.startswith("a=rtpmap:") and " rtx/" not in x.lower() and "/90000" in x
        ]
        with_fmtp = {x[7:].split(" ", 1)[0] for x in section if x.startswith("a=fmtp:")}
        end = len(section)
        while end and section[end - 1] == "":
            end -= 1
        for line in section[:end]:
            if start and line.startswith("a=fmtp:") and line[7:].split(" ", 1)[0] in media_pts:
                out.append(f"{line};x-google-start-bitrate={start}")
            else:
                out.append(line)
            if start and line.startswith("a=rtpmap:"):
                pt = line[9:].split(" ", 1)[0]
                if pt in media_pts and pt not in with_fmtp:
                    out.append(f"a=fmtp:{pt} x-google-start-bitrate={start}")
        out.extend(f"a=rid:{rid} recv" for rid in offer.rids)
        out.append("a=simulcast:recv " + ";".join(offer.rids))
        out.extend(section[end:])
    return "\r\n".join(out)


class _PerSsrcNack:
    """aiortc's NACK generator tracks one sequence space per receiver; a simulcast receiver
    gets one per layer (SSRC), or every layer's packets would look like the others' losses."""

    __slots__ = ("_generators", "_make", "missing")

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._generators: dict[int, Any] = {}
        self.missing: set[int] = set()

    def add(self, packet: RtpPacket) -> bool:
        generator = self._generators.get(packet.ssrc)
        if generator is None:
            generator = self._generators[packet.ssrc] = self._make()
        missed: bool = generator.add(packet)
        self.missing = generator.missing
        return missed


def tap_simulcast_receiver(
    receiver: RTCRtpReceiver, on_packet: Callable[[RtpPacket], None]
) -> None:
    """``tap_receiver`` for a receiver of several simulcast layers (one SSRC per rid, and an
    RTX SSRC per layer, none of them in the SDP). Media SSRCs are told apart by the caller from
    the rid extension; here each layer gets its own NACK sequence space, and an RTX SSRC is
    bound to its layer by the repaired-rid extension of its first packets (aiortc drops RTX
    from an SSRC it was not told about)."""
    from aiortc.rtcrtpreceiver import NackGenerator

    tap_receiver(receiver, on_packet, estimate_bandwidth=False)
    if isinstance(receiver._RTCRtpReceiver__nack_generator, _PerSsrcNack):
        return
    receiver._RTCRtpReceiver__nack_generator = _PerSsrcNack(NackGenerator)
    rtx_ssrc: dict[int, int] = receiver._RTCRtpReceiver__rtx_ssrc
    ssrc_of_rid: dict[str, int] = {}
    original = receiver._handle_rtp_packet

    async def handle_rtp_packet(packet: RtpPacket, arrival_time_ms: int) -> None:
        ext = packet.extensions
        if ext.rtp_stream_id is not None:
            ssrc_of_rid[ext.rtp_stream_id] = packet.ssrc
        elif ext.repaired_rtp_stream_id is not None and packet.ssrc not in rtx_ssrc:
            media_ssrc = ssrc_of_rid.get(ext.repaired_rtp_stream_id)
            if media_ssrc is not None:
                rtx_ssrc[packet.ssrc] = media_ssrc
        await original(packet, arrival_time_ms)

    receiver._handle_rtp_packet = handle_rtp_packet


def route_by_mid(transceiver: RTCRtpTransceiver) -> None:
    """Route an RTP packet of an unknown SSRC by its MID header extension when its payload
    type does not name one receiver (two simulcast video tracks in one bundle, whose SSRCs no
    SDP announces). aiortc 1.16 routes by SSRC and payload type only."""
    _route_by_mid(transceiver.receiver.transport)


def _route_by_mid(transport: Any) -> None:
    router = transport._rtp_router
    if getattr(router, "_spaces_mid_routing", False):
        return
    original = router.route_rtp

    def route_rtp(packet: RtpPacket) -> Any:
        receiver = original(packet)
        if receiver is None:
            mid = packet.extensions.mid
            receiver = router.mid_table.get(mid) if mid is not None else None
            if receiver is not None:
                router.ssrc_table[packet.ssrc] = receiver
        return receiver

    router.route_rtp = route_rtp
    router._spaces_mid_routing = True


# --- receive side --------------------------------------------------------------------------


class _Tap:
    """Stands in for RTCRtpReceiver's jitter buffer: passes each packet on, assembles nothing."""

    __slots__ = ("on_packet",)

    def __init__(self, on_packet: Callable[[RtpPacket], None]) -> None:
        self.on_packet = on_packet

    def add(self, packet: RtpPacket) -> tuple[bool, None]:
        self.on_packet(packet)
        return False, None


def tap_receiver(
    receiver: RTCRtpReceiver,
    on_packet: Callable[[RtpPacket], None],
    estimate_bandwidth: bool = False,
) -> None:
    """Route every RTP packet the receiver accepts to ``on_packet`` and never decode.

    aiortc still runs its NACK generator and receiver reports (they come before the jitter
    buffer in ``_handle_rtp_packet``). Its delay-based bandwidth estimator (and the REMB it
    sends) runs only with ``estimate_bandwidth``. Calling it again rebinds the callback (a
    transceiver reused for a new track)."""
    existing = receiver._RTCRtpReceiver__jitter_buffer
    if isinstance(existing, _Tap):
        existing.on_packet = on_packet
        return
    receiver._RTCRtpReceiver__jitter_buffer = _Tap(on_packet)
    if not estimate_bandwidth:
        # On a media node the delay-based estimator reads the node's own scheduling delay as
        # congestion, and asks publishers to slow down (measured: 374 kbps requested of a
        # 1 Mbps publisher at 80 subscribers). The node announces a configured cap instead
        # (send_remb) and publishers' congestion control handles the real network.
        receiver._RTCRtpReceiver__remote_bitrate_estimator = None
    original_receive = receiver.receive

    async def receive(parameters: Any) -> None:
        await original_receive(parameters)
        # The decoder thread is started by receive(); with the tap it would only idle.
        receiver._RTCRtpReceiver__stop_decoder()

    receiver.receive = receive


def request_keyframe(receiver: RTCRtpReceiver, media_ssrc: int) -> None:
    """Send a PLI to the publisher of ``media_ssrc``."""
    spawn(receiver._send_rtcp_pli(media_ssrc))


def send_remb(receiver: RTCRtpReceiver, media_ssrc: int, bitrate: int) -> None:
    """Tell the publisher of ``media_ssrc`` the most it may send (RTCP REMB)."""
    rtcp_ssrc = receiver._RTCRtpReceiver__rtcp_ssrc
    if rtcp_ssrc is None or not media_ssrc:
        return
    packet = RtcpPsfbPacket(
        fmt=RTCP_PSFB_APP, ssrc=rtcp_ssrc, media_ssrc=0, fci=pack_remb_fci(bitrate, [media_ssrc])
    )
    spawn(receiver._send_rtcp(packet))


# --- send side ------------------------------------------------------------------------------


class PlaceholderTrack(MediaStreamTrack):
    """What a forwarding sender is created with: it never yields, so aiortc's encode loop waits
    forever instead of polling or encoding."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._never: asyncio.Future[Any] = asyncio.get_event_loop().create_future()

    async def recv(self) -> Any:
        return await self._never

    def stop(self) -> None:
        if not self._never.done():
            self._never.cancel()
        super().stop()


def hook_sender(
    sender: RTCRtpSender,
    on_keyframe_request: Callable[[], None],
    on_nack: Callable[[int], None],
) -> None:
    """A subscriber's PLI/FIR and NACKs reach the forwarder instead of a (missing) encoder."""
    sender._send_keyframe = on_keyframe_request

    async def retransmit(sequence_number: int) -> None:
        on_nack(sequence_number)

    sender._retransmit = retransmit


def hook_sender_feedback(
    sender: RTCRtpSender,
    on_loss: Callable[[float], None],
    on_remb: Callable[[int], None],
) -> None:
    """Also hand a subscriber's receiver reports (fraction lost, 0..1) and REMB (bits per
    second) about this sender to the bandwidth estimate; aiortc keeps its own statistics.
    Calling it again (a reused transceiver) rebinds the callbacks."""
    existing = getattr(sender, "_spaces_feedback", None)
    if existing is not None:
        existing[:] = [on_loss, on_remb]
        return
    callbacks: list[Any] = [on_loss, on_remb]
    sender._spaces_feedback = callbacks
    original = sender._handle_rtcp_packet
    ssrc = sender._ssrc

    async def handle_rtcp(packet: Any) -> None:
        if isinstance(packet, RtcpRrPacket | RtcpSrPacket):
            for report in packet.reports:
                if report.ssrc == ssrc:
                    callbacks[0](report.fraction_lost / 256)
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            try:
                bitrate, ssrcs = unpack_remb_fci(packet.fci)
            except ValueError:
                bitrate, ssrcs = 0, []
            if ssrc in ssrcs:
                callbacks[1](bitrate)
        await original(packet)

    sender._handle_rtcp_packet = handle_rtcp


_HEADER = struct.Struct("!BBHII")
SEND_FAILED = -1
"""``RtpSink.send`` result when nothing could be sent (transport not up, socket error)."""


class RtpSink:
    """Sends finished RTP packets for one sender: write the 12-byte header, SRTP-protect, send
    on the nominated ICE pair's socket, and count them in the sender's RTCP sender-report
    statistics. Synchronous: no task, no queue. The hot path of the media node: keep it lean.

    ``send`` returns the bytes the socket could not take yet (queued by asyncio; 0 normally), or
    ``SEND_FAILED``. A growing backlog is how a slow subscriber shows itself."""

    __slots__ = (
        "_addr",
        "_dtls",
        "_pair",
        "_sock",
        "_udp",
        "abs_send_time_id",
        "audio_level_id",
        "key",
        "payload_type",
        "sender",
        "ssrc",
    )

    def __init__(self, transceiver: RTCRtpTransceiver) -> None:
        self.sender = transceiver.sender
        # Bundling is settled by the time a sink is made (after negotiation): the sender's
        # DTLS transport no longer changes.
        self._dtls = transceiver.sender.transport
        self.ssrc: int = transceiver.sender._ssrc
        codec = negotiated_codec(transceiver)
        self.payload_type = codec.payload_type if codec else 0
        ids = {ext.uri: ext.id for ext in transceiver._headerExtensions}
        self.audio_level_id: int = ids.get(AUDIO_LEVEL_URI, 0)
        self.abs_send_time_id: int = ids.get(ABS_SEND_TIME_URI, 0)
        self.key = (self.payload_type, self.abs_send_time_id, self.audio_level_id)
        """Sinks with equal keys can share the rewritten part of a packet."""
        self._pair: Any = None
        self._addr: tuple[str, int] = ("", 0)
        self._udp: Any = None
        self._sock: Any = None

    def counters(self) -> tuple[int, int]:
        """(packets, payload bytes) sent so far (what the sender reports in its SRs)."""
        sender = self.sender
        return sender._RTCRtpSender__packet_count, sender._RTCRtpSender__octet_count

    @property
    def connected(self) -> bool:
        dtls = self._dtls
        return dtls._state is DtlsState.CONNECTED and bool(dtls.transport._connection._nominated)

    def _route(self, pair: Any) -> None:
        self._pair = pair
        self._addr = pair.remote_addr
        self._udp = getattr(pair.protocol, "transport", None)
        # The raw socket (asyncio only hands out a restricted wrapper): sendto on it directly.
        # A single-port link hands out the shared socket itself.
        if isinstance(self._udp, MuxLink):
            self._sock = self._udp.raw_socket
        else:
            self._sock = getattr(self._udp, "_sock", None)

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
        dtls = self._dtls
        if dtls._state is not DtlsState.CONNECTED:
            return SEND_FAILED
        pair = dtls.transport._connection._nominated.get(1)
        if pair is not self._pair:
            if pair is None:
                return SEND_FAILED
            self._route(pair)
        protected = dtls._tx_srtp.protect(
            _HEADER.pack(first, second, seq, timestamp, self.ssrc) + tail
        )
        udp = self._udp
        backlog = 0
        if udp is None:  # no transport of its own: let aioice route it
            spawn(pair.protocol.send_data(protected, self._addr))
        elif self._sock is None and not hasattr(udp, "get_write_buffer_size"):
            udp.sendto(protected, self._addr)  # a TURN-relayed local candidate (TurnTransport)
        else:
            backlog = udp.get_write_buffer_size()
            if backlog or self._sock is None:
                udp.sendto(protected, self._addr)  # keep order behind what is queued
            else:
                # The socket directly: asyncio's sendto costs a microsecond more per packet,
                # and only matters when the socket cannot take the datagram.
                try:
                    self._sock.sendto(protected, self._addr)
                except (BlockingIOError, InterruptedError):
                    udp.sendto(protected, self._addr)
                    backlog = udp.get_write_buffer_size()
                except OSError:
                    return SEND_FAILED
        sender = self.sender
        sender._RTCRtpSender__ntp_timestamp = ntp
        sender._RTCRtpSender__rtp_timestamp = timestamp
        sender._RTCRtpSender__octet_count += payload_len
        sender._RTCRtpSender__packet_count += 1
        return backlog


def ntp_now() -> int:
    return current_ntp_time()


# --- process-wide instrumentation ---------------------------------------------------------

_counters_installed = False


def install_codec_counters(on_decoder: Callable[[], None], on_encoder: Callable[[], None]) -> None:
    """Count every decoder and encoder aiortc creates in this process (a forwarding media node
    must create none; tests and metrics check it)."""
    global _counters_installed
    if _counters_installed:
        return
    _counters_installed = True
    real_decoder = aiortc.rtcrtpreceiver.get_decoder
    real_encoder = aiortc.rtcrtpsender.get_encoder

    def counting_decoder(codec: Any) -> Any:
        on_decoder()
        return real_decoder(codec)

    def counting_encoder(codec: Any) -> Any:
        on_encoder()
        return real_encoder(codec)

    aiortc.rtcrtpreceiver.get_decoder = counting_decoder
    aiortc.rtcrtpsender.get_encoder = counting_encoder


def pin_encoder_bitrate(sender: RTCRtpSender, bitrate: int) -> None:
    """Make an aiortc publisher send at a fixed bitrate, like a browser with a steady link:
    REMB is ignored, because aiortc re-creates its encoder (and emits a surprise keyframe) when
    REMB moves the bitrate by more than 10%. Used by tests and benchmarks, which must not
    mistake those keyframes for working PLI forwarding."""
    original_rtcp = sender._handle_rtcp_packet

    async def handle_rtcp(packet: Any) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            return
        await original_rtcp(packet)

    sender._handle_rtcp_packet = handle_rtcp
    original_next = sender._next_encoded_frame

    async def next_encoded_frame(codec: Any) -> Any:
        encoder = sender._RTCRtpSender__encoder
        if encoder is not None and getattr(encoder, "target_bitrate", bitrate) != bitrate:
            encoder.target_bitrate = bitrate
        return await original_next(codec)

    sender._next_encoded_frame = next_encoded_frame


# --- ICE ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnServer:
    """A TURN server for one side's own gathering (the media node's; clients get theirs from
    the RTCConfiguration). ``credentials`` is called per peer connection, so a long-lived
    process always presents an unexpired one."""

    host: str
    port: int
    credentials: Callable[[], tuple[str, str]]
    transport: str = "udp"
    ssl: bool = False


def turn_server_from_url(url: str, credentials: Callable[[], tuple[str, str]]) -> TurnServer:
    """``turn:host:port?transport=udp`` (or ``turns:``) as aiortc parses it."""
    from aiortc.rtcicetransport import parse_stun_turn_uri

    parsed = parse_stun_turn_uri(url)
    if parsed["scheme"] not in ("turn", "turns"):
        raise ValueError(f"not a TURN url: {url}")
    return TurnServer(
        host=parsed["host"],
        port=int(parsed["port"]),
        credentials=credentials,
        transport=parsed["transport"],
        ssl=parsed["scheme"] == "turns",
    )


@dataclass(frozen=True)
class IcePolicy:
    bind_addresses: tuple[str, ...] = ()
    """Addresses to gather on; empty means aioice's default (every non-loopback address)."""
    advertise_ip: str = ""
    """Announced instead of the bound address (NAT 1:1)."""
    port_min: int = 0
    port_max: int = 0
    turn: TurnServer | None = None
    """Also gather a relay candidate from this TURN server."""
    relay_only: bool = False
    """Gather only relay candidates (RTCIceTransportPolicy "relay")."""
    muxes: tuple[UdpMux, ...] = ()
    """Single-port mode: the node's shared sockets, one per address; every peer connection
    gathers one host candidate on each, and binds no socket of its own."""
    advertise_port: int = 0
    """Announced instead of the mux's bound port (a Service or NAT that maps another port)."""

    @property
    def is_default(self) -> bool:
        return not (
            self.bind_addresses
            or self.advertise_ip
            or self.port_min
            or self.turn
            or self.relay_only
            or self.muxes
        )


REBIND_SILENCE_S = 1.0
"""A single-port endpoint moves its nominated pair to a new address of its peer (NAT rebinding)
when an authenticated check arrives from there and nothing came from the nominated address for
this long; a peer still heard at its address is not moved by a check on another path."""


class _MuxedStunProtocol(aioice_ice.StunProtocol):
    """An aioice endpoint behind a ``UdpMux``: its transport is the mux's ``MuxLink``."""

    link: MuxLink

    def accepts(self, data: bytes, addr: tuple[str, int]) -> bool:
        """A Binding request for this endpoint that authenticates with its password."""
        connection = self.receiver
        try:
            message = aioice_stun.parse_message(data)
        except ValueError:
            return False
        attributes = message.attributes
        return bool(
            message.message_class == aioice_stun.Class.REQUEST
            and message.message_method == aioice_stun.Method.BINDING
            and "USERNAME" in attributes
            and "MESSAGE-INTEGRITY" in attributes
            and connection._valid_username(attributes["USERNAME"])
            and message.check_message_integrity(connection.local_password.encode("utf8"))
        )

    def datagram_received(self, data: bytes | str, addr: tuple[Any, ...]) -> None:
        assert isinstance(data, bytes)
        if data and data[0] > 3:
            # RFC 7983: only 0-3 starts STUN. DTLS, RTP and RTCP skip aioice's STUN parse.
            self.receiver.data_received(data, self.local_candidate.component)
            return
        self._follow_peer(data, (addr[0], addr[1]))
        super().datagram_received(data, addr)

    def _follow_peer(self, data: bytes, addr: tuple[str, int]) -> None:
        connection = self.receiver
        component = self.local_candidate.component
        pair = connection._nominated.get(component)
        if pair is None or pair.protocol is not self or pair.remote_addr == addr:
            return
        heard = self.link.last_heard(pair.remote_addr)
        if heard is not None and time.monotonic() - heard < REBIND_SILENCE_S:
            return
        if not self.accepts(data, addr):
            return
        remote = next(
            (
                c
                for c in connection._remote_candidates
                if c._network_host == addr[0] and c.port == addr[1]
            ),
            None,
        )
        if remote is None:
            message = aioice_stun.parse_message(data)
            remote = Candidate(
                foundation=random_string(10),
                component=component,
                transport="udp",
                priority=message.attributes.get("PRIORITY", pair.remote_candidate.priority),
                host=addr[0],
                port=addr[1],
                type="prflx",
            )
            connection._remote_candidates.append(remote)
        moved = connection._find_pair(self, remote)
        if moved is None:
            moved = aioice_ice.CandidatePair(self, remote)
            connection._check_list.append(moved)
        moved.state = aioice_ice.CandidatePair.State.SUCCEEDED
        moved.nominated = True
        connection._nominated[component] = moved
        logger.info(
            "ice %s: peer moved from %s:%d to %s:%d (NAT rebinding): following it",
            connection.local_username,
            *pair.remote_addr,
            *addr,
        )
        on_moved = getattr(connection, "_spaces_on_peer_moved", None)
        if on_moved is not None:
            on_moved()


def _unique_ufrag(connection: Any, muxes: Sequence[UdpMux]) -> str:
    """Demultiplexing by ufrag needs each endpoint's to be unique on the node. A 4-character
    ufrag (aioice's and the browsers' length) collides now and then among hundreds: then this
    endpoint gets a longer one, before its description is written."""
    while any(mux.has_ufrag(connection.local_username) for mux in muxes):
        connection._local_username = random_string(16)
    return str(connection.local_username)


def _muxed_host_candidates(
    connection: Any, component: int, addresses: Sequence[str], policy: IcePolicy
) -> list[Candidate]:
    candidates = []
    for mux in policy.muxes:
        protocol = _MuxedStunProtocol(connection)
        try:
            link = mux.register(_unique_ufrag(connection, policy.muxes), protocol)
        except ConnectionError as exc:
            logger.warning("ice: udp mux unavailable: %s", exc)
            continue
        protocol.link = link
        protocol.connection_made(link)
        bound_host, bound_port = mux.sockname
        host = policy.advertise_ip or bound_host
        if host in ("0.0.0.0", "::"):
            # A wildcard socket: announce the first address aioice would have gathered on.
            host = next((a for a in addresses if ":" not in a), "") or next(iter(addresses), "")
            if not host:
                link.close()
                continue
        protocol.local_candidate = Candidate(
            foundation=candidate_foundation("host", "udp", host),
            component=component,
            transport="udp",
            priority=candidate_priority(component, "host"),
            host=host,
            port=policy.advertise_port or bound_port,
            type="host",
        )
        candidates.append(protocol.local_candidate)
        connection._protocols.append(protocol)
    return candidates


async def _bind_udp(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], Any],
    address: str,
    policy: IcePolicy,
) -> tuple[Any, Any]:
    if not policy.port_min:
        return await loop.create_datagram_endpoint(factory, local_addr=(address, 0))
    ports = list(range(policy.port_min, policy.port_max + 1))
    start = random.randrange(len(ports))
    last_error: OSError | None = None
    for port in ports[start:] + ports[:start]:
        try:
            return await loop.create_datagram_endpoint(factory, local_addr=(address, port))
        except OSError as exc:
            last_error = exc
    raise OSError(f"no free UDP port in {policy.port_min}-{policy.port_max}") from last_error


async def _server_candidates(
    connection: Any, component: int, host_protocols: list[Any], timeout: float
) -> list[Candidate]:
    """Server-reflexive (STUN) and relayed (TURN) candidates, as aioice gathers them, for a
    connection whose host candidates this module gathered."""
    tasks = []
    relay_only = connection._transport_policy == aioice_ice.TransportPolicy.RELAY
    if connection.stun_server and not relay_only:
        for protocol in host_protocols:
            if ":" not in protocol.local_candidate.host:  # IPv4 only, as aioice does
                tasks.append(
                    asyncio.ensure_future(
                        aioice_ice.server_reflexive_candidate(protocol, connection.stun_server)
                    )
                )
    if connection.turn_server:
        tasks.append(
            asyncio.ensure_future(
                aioice_ice.relayed_candidate(
                    component=component,
                    hide_related_address=relay_only,
                    protocol_factory=lambda: aioice_ice.StunProtocol(connection),
                    turn_server=connection.turn_server,
                    turn_username=connection.turn_username,
                    turn_password=connection.turn_password,
                    turn_ssl=connection.turn_ssl,
                    turn_transport=connection.turn_transport,
                )
            )
        )
    if not tasks:
        return []
    candidates = []
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    for task in done:
        if task.exception() is not None:
            logger.warning("ice: stun/turn candidate failed: %s", task.exception())
            continue
        candidate, relay_protocol = task.result()
        candidates.append(candidate)
        if relay_protocol is not None:
            connection._protocols.append(relay_protocol)
    return candidates


def _gatherer(connection: Any, policy: IcePolicy) -> Callable[..., Any]:
    async def get_component_candidates(
        component: int,
        addresses: Sequence[str],
        timeout: int = 5,
    ) -> list[Candidate]:
        loop = asyncio.get_running_loop()
        candidates: list[Candidate] = []
        host_protocols: list[Any] = []
        relay_only = connection._transport_policy == aioice_ice.TransportPolicy.RELAY
        if policy.muxes:
            # Single-port mode: no srflx gathering through the shared socket (a STUN server's
            # responses name no endpoint); the advertised address is what NAT 1:1 needs.
            if not relay_only:
                candidates = _muxed_host_candidates(connection, component, addresses, policy)
            return candidates + await _server_candidates(connection, component, [], timeout)
        for address in () if relay_only else (policy.bind_addresses or addresses):
            try:
                transport, protocol = await _bind_udp(
                    loop, lambda: aioice_ice.StunProtocol(connection), address, policy
                )
            except OSError as exc:
                logger.warning("ice: cannot bind %s: %s", address, exc)
                continue
            sock = transport.get_extra_info("socket")
            if sock is not None:
                for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER_BYTES)
                    except OSError:
                        pass
            bound = transport.get_extra_info("sockname")
            host = policy.advertise_ip or bound[0]
            protocol.local_candidate = Candidate(
                foundation=candidate_foundation("host", "udp", host),
                component=component,
                transport="udp",
                priority=candidate_priority(component, "host"),
                host=host,
                port=bound[1],
                type="host",
            )
            candidates.append(protocol.local_candidate)
            connection._protocols.append(protocol)
            host_protocols.append(protocol)
        return candidates + await _server_candidates(connection, component, host_protocols, timeout)

    return get_component_candidates


def on_peer_moved(pc: RTCPeerConnection, callback: Callable[[], None]) -> None:
    """Call ``callback`` when an ICE endpoint of ``pc`` follows its peer to a new address (NAT
    rebinding, single-port mode): what the peer sent meanwhile, and what was sent to its old
    address (keyframe requests too), is lost. Call with apply_ice_policy."""
    for transport in pc._RTCPeerConnection__iceTransports:
        transport.iceGatherer._connection._spaces_on_peer_moved = callback


def apply_ice_policy(pc: RTCPeerConnection, policy: IcePolicy) -> None:
    """Apply ``policy`` to every ICE transport of ``pc`` that has not gathered yet. Call after
    transceivers exist and before setLocalDescription (which gathers)."""
    if policy.is_default:
        return
    for transport in pc._RTCPeerConnection__iceTransports:
        connection = transport.iceGatherer._connection
        if not getattr(connection, "_spaces_policy", False):
            if policy.turn is not None:
                username, password = policy.turn.credentials()
                connection.turn_server = (policy.turn.host, policy.turn.port)
                connection.turn_username, connection.turn_password = username, password
                connection.turn_transport, connection.turn_ssl = (
                    policy.turn.transport,
                    policy.turn.ssl,
                )
            if policy.relay_only:
                connection._transport_policy = aioice_ice.TransportPolicy.RELAY
            connection.get_component_candidates = _gatherer(connection, policy)
            connection._spaces_policy = True
