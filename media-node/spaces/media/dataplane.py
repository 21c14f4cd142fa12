"""The native data plane (``spaces.media._dataplane``, media-node/native/) wired into aiortc.

The Python wrapper of the native module, and with ``aiortc_adapter`` the only module touching
aiortc's and aioice's internals (STYLE.md). Per peer connection (``prepare``):

* **keys**: each DTLS transport gets a ``_dataplane.Peer``; when the handshake is done the
  peer takes the DTLS-SRTP keys and replaces both of aiortc's SRTP sessions, so that RTP and
  aiortc's own RTCP share one context per direction;
* **socket**: the nominated pair's UDP socket is read by a ``_dataplane.Socket``
  (``recvmmsg``) instead of asyncio; STUN, DTLS and unknown senders go back to aioice's
  protocol intact (ICE consent, DTLS), SRTCP to aiortc's RTCP handling after unprotect, and
  SRTP of a routed SSRC straight to the native fan-out;
* **receivers** (``binding``): a publisher's SSRC is routed to its forwarder's native source;
  aiortc's receiver keeps sending receiver reports, from the native statistics, and the native
  loss detector's NACKs;
* **senders** (``down``): a subscriber's sender gets a ``_dataplane.Down``, and its sender
  reports read the Down's counts.

A pair that is not a plain UDP socket (TURN-relayed) keeps Python's send and receive, with the
native SRTP contexts and fan-out.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Any

from aiortc import RTCPeerConnection, RTCRtpSender, RTCRtpTransceiver
from aiortc.clock import current_ms
from aiortc.rtcdtlstransport import SRTP_AES128_CM_SHA1_80, RTCDtlsTransport
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcrtpreceiver import StreamStatistics

from spaces.media import _dataplane
from spaces.media.aiortc_adapter import AUDIO_LEVEL_URI, RtpSink
from spaces.media.forwarding import NativeBinding
from spaces.tasks import spawn

logger = logging.getLogger(__name__)

__all__ = ["NativePlane", "counters"]


def counters() -> dict[str, int]:
    """The native plane's process-wide packet counters."""
    return _dataplane.counters()


class _NativeStreamStatistics(StreamStatistics):
    """aiortc's per-SSRC receive statistics, read from the native source that counts the
    packets (aiortc's receiver builds its receiver reports from this object)."""

    def __init__(self, source: _dataplane.Source, clockrate: int) -> None:
        self._source = source
        self._clockrate = clockrate
        self._expected_prior = 0
        self._received_prior = 0

    def add(self, packet: Any) -> None:
        # A packet aiortc received itself (a TURN-relayed pair): counted natively too.
        self._source.count(packet.sequence_number, packet.timestamp)

    def _stat(self, index: int) -> int:
        stats = self._source.stats()
        return 0 if stats is None else int(stats[index])

    @property
    def base_seq(self) -> int:
        return self._stat(0)

    @property
    def max_seq(self) -> int:
        return self._stat(1)

    @property
    def cycles(self) -> int:
        return self._stat(2)

    @property
    def packets_received(self) -> int:
        return self._stat(3)

    @property
    def _jitter_q4(self) -> int:
        return self._stat(4)


class _NativeSender(RTCRtpSender):
    """An RTCRtpSender whose sender-report counts include its native Down's: the class of a
    forwarding sender once it has one (aiortc reads these four attributes for each SR). What
    the Python plane sends on it (a simulcast track on a reused m-section) adds to the same
    counts, and the newest RTP/NTP timestamp pair of the two is reported."""

    _spaces_down: _dataplane.Down
    _spaces_counts: list[int]
    """Python-sent packets, octets, and its last (ntp, rtp timestamp)."""

    @property
    def _RTCRtpSender__packet_count(self) -> int:
        return self._spaces_counts[0] + int(self._spaces_down.packet_count)

    @_RTCRtpSender__packet_count.setter
    def _RTCRtpSender__packet_count(self, value: int) -> None:
        self._spaces_counts[0] = value - int(self._spaces_down.packet_count)

    @property
    def _RTCRtpSender__octet_count(self) -> int:
        return self._spaces_counts[1] + int(self._spaces_down.octet_count)

    @_RTCRtpSender__octet_count.setter
    def _RTCRtpSender__octet_count(self, value: int) -> None:
        self._spaces_counts[1] = value - int(self._spaces_down.octet_count)

    @property
    def _RTCRtpSender__ntp_timestamp(self) -> int:
        return max(self._spaces_counts[2], int(self._spaces_down.last_ntp))

    @_RTCRtpSender__ntp_timestamp.setter
    def _RTCRtpSender__ntp_timestamp(self, value: int) -> None:
        self._spaces_counts[2] = value

    @property
    def _RTCRtpSender__rtp_timestamp(self) -> int:
        down = self._spaces_down
        if self._spaces_counts[2] > int(down.last_ntp):
            return self._spaces_counts[3]
        return int(down.last_rtp_timestamp)

    @_RTCRtpSender__rtp_timestamp.setter
    def _RTCRtpSender__rtp_timestamp(self, value: int) -> None:
        self._spaces_counts[3] = value


class NativePlane:
    """One per media node: the native sockets, and the peers of its peer connections."""

    def __init__(self) -> None:
        self._sockets: dict[int, tuple[Any, _dataplane.Socket]] = {}
        """fd -> (the asyncio transport it belongs to, the native socket reading it)."""
        self._transports: weakref.WeakSet[RTCDtlsTransport] = weakref.WeakSet()

    # --- peer connections -------------------------------------------------------------

    def prepare(self, pc: RTCPeerConnection) -> None:
        """Give each DTLS transport of ``pc`` that has not started a native peer. Call after
        the transceivers exist and before the connection starts (with the ICE policy)."""
        for dtls in _dtls_transports(pc):
            if getattr(dtls, "_spaces_peer", None) is not None or dtls._state is not DtlsState.NEW:
                continue
            peer = _dataplane.Peer()
            dtls._spaces_peer = peer
            # The profile the native code runs on OpenSSL; every browser offers it.
            dtls._srtp_profiles = [SRTP_AES128_CM_SHA1_80]
            dtls._setup_srtp = self._setup_hook(dtls, dtls._setup_srtp)
            dtls.stop = self._stop_hook(dtls, dtls.stop)
            self._transports.add(dtls)

    def _setup_hook(self, dtls: RTCDtlsTransport, original: Callable[[], None]) -> Any:
        def setup() -> None:
            original()
            if dtls._rx_srtp is None or dtls._state is DtlsState.FAILED:
                return
            profile = SRTP_AES128_CM_SHA1_80
            view = dtls._ssl.export_keying_material(
                b"EXTRACTOR-dtls_srtp", 2 * (profile.key_length + profile.salt_length)
            )
            local, remote = (1, 0) if dtls._role == "server" else (0, 1)
            peer: _dataplane.Peer = dtls._spaces_peer
            peer.set_keys(
                profile.libsrtp_profile,
                profile.get_key_and_salt(view, remote),
                profile.get_key_and_salt(view, local),
            )
            dtls._rx_srtp = peer
            dtls._tx_srtp = peer
            peer.set_handlers(self._on_rtp(dtls), self._on_rtcp(dtls))
            self._route(dtls)

        return setup

    def _stop_hook(self, dtls: RTCDtlsTransport, original: Callable[[], Any]) -> Any:
        async def stop() -> None:
            self._forget(dtls)
            await original()

        return stop

    @staticmethod
    def _on_rtp(dtls: RTCDtlsTransport) -> Callable[[bytes, int], None]:
        def on_rtp(data: bytes, _arrival_ms: int) -> None:
            # RTP of an SSRC no native source claims (yet): aiortc's own receive path.
            spawn(dtls._handle_rtp_data(data, arrival_time_ms=current_ms()))

        return on_rtp

    @staticmethod
    def _on_rtcp(dtls: RTCDtlsTransport) -> Callable[[bytes], None]:
        def on_rtcp(data: bytes) -> None:
            spawn(dtls._handle_rtcp_data(data))

        return on_rtcp

    def _route(self, dtls: RTCDtlsTransport) -> None:
        """Point the peer at the nominated pair: its socket read natively, sent to natively."""
        peer: _dataplane.Peer = dtls._spaces_peer
        pair = dtls.transport._connection._nominated.get(1)
        if pair is None:
            return
        protocol = pair.protocol
        transport = getattr(protocol, "transport", None)
        sock = getattr(transport, "_sock", None)
        mux = getattr(transport, "mux", None)
        if mux is not None and getattr(mux, "raw_socket", None) is not None:
            # Single-port mode: the node's shared socket, read natively, its fallback the
            # mux's demultiplexer (udp_mux.UdpMux.datagram_received).
            fd = mux.fileno()
            self._attach(dtls, peer, self._socket(fd, mux._transport, mux), fd, pair.remote_addr)
            return
        if sock is None or not hasattr(transport, "get_write_buffer_size"):
            # TURN-relayed (or aioice-routed): native SRTP and fan-out, Python's send.
            send = protocol.send_data
            addr = pair.remote_addr

            def send_relayed(data: bytes) -> None:
                spawn(send(data, addr))

            peer.set_sender(send_relayed)
            dtls._spaces_route = (None, addr)
            return
        fd = sock.fileno()
        self._attach(dtls, peer, self._socket(fd, transport, protocol), fd, pair.remote_addr)

    @staticmethod
    def _attach(
        dtls: RTCDtlsTransport,
        peer: _dataplane.Peer,
        native: _dataplane.Socket,
        fd: int,
        addr: tuple[str, int],
    ) -> None:
        """The peer on ``native`` at ``addr`` (moved there if it was elsewhere)."""
        previous = getattr(dtls, "_spaces_route", None)
        peer.set_route(fd, addr)
        if previous is not None and previous[0] is native:
            native.update_peer_addr(peer, addr)
        else:
            if previous is not None and previous[0] is not None:
                previous[0].remove_peer(peer)
            native.add_peer(addr, peer)
        dtls._spaces_route = (native, addr)

    def _socket(self, fd: int, transport: Any, protocol: Any) -> _dataplane.Socket:
        known = self._sockets.get(fd)
        if known is not None and known[0] is transport:
            return known[1]
        native = _dataplane.Socket(fd, protocol.datagram_received)
        # asyncio's transport stops reading (it keeps sending: aioice's STUN, DTLS); the
        # native socket reads instead. Closing the transport removes this reader.
        transport.pause_reading()
        asyncio.get_running_loop()._add_reader(fd, native.read)
        self._sockets[fd] = (transport, native)
        original_lost = protocol.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            native.close()
            if self._sockets.get(fd, (None,))[0] is transport:
                del self._sockets[fd]
            original_lost(exc)

        protocol.connection_lost = connection_lost
        return native

    def _forget(self, dtls: RTCDtlsTransport) -> None:
        peer: _dataplane.Peer | None = getattr(dtls, "_spaces_peer", None)
        route = getattr(dtls, "_spaces_route", None)
        if peer is None:
            return
        if route is not None and route[0] is not None:
            route[0].remove_peer(peer)
        peer.close()
        dtls._spaces_route = None

    def refresh(self) -> None:
        """Follow nominated-pair changes (called periodically by the node)."""
        for dtls in list(self._transports):
            route = getattr(dtls, "_spaces_route", None)
            if route is None or dtls._state is not DtlsState.CONNECTED:
                continue
            pair = dtls.transport._connection._nominated.get(1)
            if pair is not None and pair.remote_addr != route[1]:
                self._route(dtls)

    @property
    def sockets(self) -> list[_dataplane.Socket]:
        return [native for _, native in self._sockets.values()]

    # --- receivers and senders --------------------------------------------------------

    def binding(self, transceiver: RTCRtpTransceiver) -> NativeBinding:
        """How a publisher track's native source is fed from ``transceiver``'s receiver."""
        receiver = transceiver.receiver
        dtls = receiver.transport
        ids = {ext.uri: ext.id for ext in transceiver._headerExtensions}
        state: dict[str, int] = {"ssrc": 0}

        def bind(ssrc: int, source: _dataplane.Source) -> None:
            state["ssrc"] = ssrc
            peer: _dataplane.Peer = dtls._spaces_peer
            peer.add_source(ssrc, source)
            # The native source detects losses and keeps the receive statistics now.
            receiver._RTCRtpReceiver__nack_generator = None
            streams = receiver._RTCRtpReceiver__remote_streams
            old = streams.get(ssrc)
            clockrate = old._clockrate if old is not None else 90000
            streams[ssrc] = _NativeStreamStatistics(source, clockrate)

        def unbind(ssrc: int) -> None:
            peer: _dataplane.Peer | None = getattr(dtls, "_spaces_peer", None)
            if peer is not None and ssrc:
                peer.remove_source(ssrc)

        def on_nack(missing: list[int]) -> None:
            if state["ssrc"] and dtls._state is DtlsState.CONNECTED:
                spawn(receiver._send_rtcp_nack(state["ssrc"], missing))

        return NativeBinding(bind, unbind, on_nack, ids.get(AUDIO_LEVEL_URI, 0))

    def down(self, transceiver: RTCRtpTransceiver, sink: RtpSink) -> _dataplane.Down:
        """The native stream of one forwarding sender; its sender reports count it."""
        sender = transceiver.sender
        peer: _dataplane.Peer = sender.transport._spaces_peer
        down = _dataplane.Down(
            peer, sink.ssrc, sink.payload_type, sink.abs_send_time_id, sink.audio_level_id
        )
        counts = [
            sender._RTCRtpSender__packet_count,
            sender._RTCRtpSender__octet_count,
            sender._RTCRtpSender__ntp_timestamp,
            sender._RTCRtpSender__rtp_timestamp,
        ]
        sender._spaces_down = down
        sender._spaces_counts = counts
        sender.__class__ = _NativeSender
        return down


def _dtls_transports(pc: RTCPeerConnection) -> list[RTCDtlsTransport]:
    found: list[RTCDtlsTransport] = []
    for transceiver in pc.getTransceivers():
        for transport in (transceiver.sender.transport, transceiver.receiver.transport):
            if transport is not None and transport not in found:
                found.append(transport)
    return found
