"""Types of the native data plane (media-node/native/dataplane.c; see INTERFACE.md there)."""

from collections.abc import Callable

import pylibsrtp

PROFILE_AES128_CM_SHA1_80: int
BATCH: int
HISTORY: int
CODEC_OTHER: int
CODEC_VP8: int
CODEC_H264: int

class Error(pylibsrtp.Error): ...

class Peer:
    """One DTLS-SRTP association: the transport's only SRTP context in each direction, and
    where its packets go (a socket and address, or a Python sender)."""

    rtp_out: int
    bytes_out: int
    rtp_in: int
    rtcp_in: int
    @property
    def addr(self) -> tuple[str, int] | None: ...
    def __init__(self, profile: int = ..., rx_key: bytes = ..., tx_key: bytes = ...) -> None: ...
    def set_keys(self, profile: int, rx_key: bytes, tx_key: bytes) -> None: ...
    def set_handlers(
        self, on_rtp: Callable[[bytes, int], None], on_rtcp: Callable[[bytes], None]
    ) -> None: ...
    def protect(self, rtp: bytes) -> bytes: ...
    def protect_rtcp(self, rtcp: bytes) -> bytes: ...
    def unprotect(self, srtp: bytes) -> bytes: ...
    def unprotect_rtcp(self, srtcp: bytes) -> bytes: ...
    def set_route(self, fd: int, addr: tuple[str, int]) -> None: ...
    def set_sender(self, send: Callable[[bytes], None] | None) -> None: ...
    def add_source(self, ssrc: int, source: Source) -> None: ...
    def remove_source(self, ssrc: int) -> None: ...
    def close(self) -> None: ...
    def send_rtp(
        self, first: int, second: int, seq: int, timestamp: int, ssrc: int, tail: bytes
    ) -> bytes | None:
        """Header + ``tail``, protected, sent to the route: None, or the protected datagram
        when the socket would block (the caller queues it)."""

class Source:
    """A publisher's track: statistics, loss detection, keyframes, history, fan-out."""

    packets_in: int
    forwarded: int
    forwarded_bytes: int
    keyframes: int
    behind: int
    paused: bool
    @property
    def downs(self) -> int: ...
    def __init__(
        self,
        codec: int,
        clock_rate: int,
        video: bool = ...,
        level_id: int = ...,
        on_keyframe: Callable[[], None] | None = ...,
        on_level: Callable[[int], None] | None = ...,
        on_nack: Callable[[list[int]], None] | None = ...,
        on_behind: Callable[[], None] | None = ...,
        rewrite_vp8: bool = ...,
    ) -> None: ...
    last_at_ns: int
    """Monotonic ns of the newest packet with a payload (0: none yet)."""
    def add(self, down: Down) -> None: ...
    def switch(self, down: Down) -> None:
        """The down keeps its source until this one's next keyframe, then forwards this one
        (VP8 picture ids continuous when ``rewrite_vp8``)."""
    def cancel(self, down: Down) -> None: ...
    def remove(self, down: Down) -> None: ...
    def restart(self) -> None: ...
    def close(self) -> None: ...
    def inject(
        self, seq: int, timestamp: int, marker: int, payload: bytes, level: int, count: bool
    ) -> None: ...
    def count(self, seq: int, timestamp: int) -> None: ...
    def stats(self) -> tuple[int, int, int, int, int] | None: ...

class Down:
    """One outgoing stream of a subscriber: follows one source at a time, with continuity."""

    packet_count: int
    octet_count: int
    last_ntp: int
    last_rtp_timestamp: int
    dropped: int
    rtx_sent: int
    ssrc: int
    waiting_keyframe: bool
    @property
    def source(self) -> Source | None: ...
    @property
    def pending(self) -> Source | None:
        """The source it switches to at that source's next keyframe."""
    @property
    def connected(self) -> bool: ...
    def __init__(
        self,
        peer: Peer,
        ssrc: int,
        payload_type: int,
        abs_send_time_id: int,
        audio_level_id: int,
    ) -> None: ...
    def retransmit(self, out_seq: int) -> bool: ...

class Socket:
    """One UDP socket read with recvmmsg; peers keyed by remote address."""

    fd: int
    datagrams_in: int
    rtp_in: int
    rtcp_in: int
    fallback_in: int
    unprotect_failed: int
    @property
    def peers(self) -> int: ...
    def __init__(self, fd: int, fallback: Callable[[bytes, tuple[str, int]], None]) -> None: ...
    def read(self) -> int: ...
    def add_peer(self, addr: tuple[str, int], peer: Peer) -> None: ...
    def remove_peer(self, peer: Peer) -> None: ...
    def update_peer_addr(self, peer: Peer, addr: tuple[str, int]) -> None: ...
    def close(self) -> None: ...

def counters() -> dict[str, int]: ...
def ntp_now() -> int: ...
