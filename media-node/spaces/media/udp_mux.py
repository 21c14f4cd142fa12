"""One UDP socket shared by every peer connection of a media node (single-port mode).

A ``UdpMux`` owns one socket per advertised address. Every ICE endpoint of the node (one per
peer connection) registers with it under its local username fragment and gets a ``MuxLink``,
a datagram transport that sends through the shared socket. Incoming datagrams are routed as
LiveKit's UDPMux routes them:

* by the remote address, once an address is known to belong to an endpoint;
* for a new address, by the STUN USERNAME of a Binding request (``<local ufrag>:<remote
  ufrag>``, RFC 8445 section 7.2.2): once the endpoint that ufrag names finds the request
  signed with its password, the address is bound to it. This is also how a peer whose NAT
  moved it to another address (rebinding) is found again: its next connectivity or consent
  check names its ufrag;
* an address an endpoint sends to (a connectivity check to a candidate of its peer) is routed
  to it too, so that the answer finds it;
* anything else (not STUN, a ufrag nobody has, a malformed header) is dropped and counted,
  without reaching any endpoint.

When the socket is readable the mux reads what is queued on it (up to ``READ_BATCH``), not the
one datagram per event-loop iteration that asyncio reads.

This module knows nothing of aioice: endpoints are anything with ``datagram_received`` and
``connection_lost`` (``aiortc_adapter`` registers aioice protocols). ``datagram_received`` on
the mux is a plain entry point, usable as the fallback of a native plane that reads the socket
itself (``fileno``), and hands back what it does not own.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

logger = logging.getLogger(__name__)

__all__ = [
    "DROP_EMPTY",
    "DROP_MALFORMED_STUN",
    "DROP_UNAUTHENTICATED",
    "DROP_UNKNOWN_ADDRESS",
    "DROP_UNKNOWN_UFRAG",
    "MAX_ADDRESSES_PER_ENDPOINT",
    "MuxEndpoint",
    "MuxLink",
    "UdpMux",
    "stun_binding_ufrag",
]

DROP_UNKNOWN_ADDRESS = "unknown_address"
"""Not a STUN Binding request, from an address no endpoint uses."""
DROP_UNKNOWN_UFRAG = "unknown_ufrag"
"""A STUN Binding request whose USERNAME names no endpoint on this socket."""
DROP_EMPTY = "empty"
"""A datagram without a byte."""
DROP_UNAUTHENTICATED = "unauthenticated"
"""A STUN Binding request naming an endpoint's ufrag from a new address, without a valid
MESSAGE-INTEGRITY for that endpoint."""
DROP_MALFORMED_STUN = "malformed_stun"
"""Looks like STUN (first byte, magic cookie) from a new address, but does not parse."""

MAX_ADDRESSES_PER_ENDPOINT = 16
"""Remote addresses one endpoint keeps (host, reflexive and relayed candidates of its peer, and
addresses it was rebound from); beyond that the least recently heard one is forgotten, so
someone who learnt a ufrag cannot grow the table without bound."""

READ_BATCH = 64
"""Datagrams read from the shared socket per readiness event. asyncio's datagram transport reads
one per event-loop iteration, which a socket per peer connection can live with, but one socket
carrying every connection cannot: on a busy node its queue grew by seconds (consent checks
timed out behind media). Bounded, so that a flooded socket cannot starve the loop."""

SOCKET_BUFFER_BYTES = 4 << 20
"""Asked for both directions: one socket now carries what hundreds did. The kernel caps it at
net.core.{r,w}mem_max."""

_STUN_HEADER = struct.Struct("!HHI12s")
_ATTRIBUTE = struct.Struct("!HH")
_MAGIC_COOKIE = 0x2112A442
_BINDING_REQUEST = 0x0001
_USERNAME = 0x0006


def stun_binding_ufrag(data: bytes) -> str | None:
    """The local username fragment a STUN Binding request is addressed to (the part of its
    USERNAME before the colon), "" when it is a Binding request without a USERNAME or with one
    that does not decode, or None when ``data`` is not a well-formed STUN Binding request."""
    if len(data) < 20 or data[0] > 3:
        return None
    message_type, length, cookie, _ = _STUN_HEADER.unpack_from(data)
    if cookie != _MAGIC_COOKIE or message_type != _BINDING_REQUEST or length != len(data) - 20:
        return None
    offset = 20
    end = len(data)
    while offset + 4 <= end:
        attr_type, attr_length = _ATTRIBUTE.unpack_from(data, offset)
        value_start = offset + 4
        if value_start + attr_length > end:
            return None
        if attr_type == _USERNAME:
            raw = data[value_start : value_start + attr_length]
            try:
                return raw.decode("utf-8").partition(":")[0]
            except UnicodeDecodeError:
                return ""
        offset = value_start + attr_length + (-attr_length % 4)
    return "" if offset == end else None


def looks_like_stun(data: bytes) -> bool:
    """First byte 0-3 (RFC 7983) and the magic cookie."""
    return len(data) >= 8 and data[0] <= 3 and data[4:8] == b"\x21\x12\xa4\x42"


class MuxEndpoint(Protocol):
    """What registers with a mux: an ICE endpoint of one peer connection."""

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def accepts(self, data: bytes, addr: tuple[str, int]) -> bool:
        """Whether a STUN Binding request naming this endpoint's ufrag, from an address that
        another endpoint uses, authenticates (MESSAGE-INTEGRITY with this endpoint's password):
        only then does the address move to this endpoint."""
        ...


class _Route:
    __slots__ = ("last_seen", "link")

    def __init__(self, link: MuxLink) -> None:
        self.link = link
        self.last_seen = time.monotonic()


class MuxLink(asyncio.DatagramTransport):
    """One endpoint's view of the shared socket: a datagram transport whose ``sendto`` goes
    out of the mux's socket and whose ``close`` unregisters the endpoint (and tells it, as a
    transport tells its protocol)."""

    def __init__(self, mux: UdpMux, ufrag: str, endpoint: MuxEndpoint) -> None:
        super().__init__()
        self.mux = mux
        self.ufrag = ufrag
        self.endpoint = endpoint
        self.addresses: dict[tuple[str, int], _Route] = {}
        """The remote addresses routed to this endpoint."""
        self._closing = False

    @property
    def raw_socket(self) -> socket.socket | None:
        """The shared socket, for a sender that writes to it directly (``RtpSink``)."""
        return None if self._closing else self.mux.raw_socket

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self._closing:
            return
        if addr not in self.addresses:
            # A connectivity check to a candidate of the peer: its response will come back
            # from there, before the peer's own check may have opened the route.
            self.mux.expect(self, addr)
        self.mux.sendto(data, addr)

    def last_heard(self, addr: tuple[str, int]) -> float | None:
        """When a datagram last came from ``addr`` (``time.monotonic()``), if it is routed to
        this endpoint."""
        route = self.addresses.get(addr)
        return None if route is None else route.last_seen

    def get_write_buffer_size(self) -> int:
        """The shared socket's queue: a backlog there holds every endpoint's datagrams."""
        return self.mux.write_buffer_size()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self.mux.sockname
        if name == "socket":
            return self.mux.raw_socket
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.mux.unregister(self)
        asyncio.get_running_loop().call_soon(self.endpoint.connection_lost, None)

    def abort(self) -> None:
        self.close()


class _SocketReader(asyncio.DatagramProtocol):
    """The shared socket's asyncio protocol: each datagram asyncio reads goes to the mux, and
    so do the ones queued behind it, up to ``READ_BATCH``. (The mux's own
    ``datagram_received`` only dispatches: as a native plane's fallback it must not read.)"""

    def __init__(self, mux: UdpMux) -> None:
        self.mux = mux

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.mux.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.mux.connection_lost(exc)

    def error_received(self, exc: Exception) -> None:
        self.mux.error_received(exc)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        mux = self.mux
        mux.datagram_received(data, addr)
        sock = mux.raw_socket
        for _ in range(READ_BATCH - 1):
            if sock is None or mux.raw_socket is None:
                return
            try:
                data, addr = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                mux.error_received(exc)
                return
            mux.datagram_received(data, addr)


class UdpMux(asyncio.DatagramProtocol):
    """One bound UDP socket and the endpoints behind it."""

    def __init__(self, on_drop: Callable[[str], None] | None = None) -> None:
        self._on_drop = on_drop
        self._transport: asyncio.DatagramTransport | None = None
        self._by_ufrag: dict[str, MuxLink] = {}
        self._by_address: dict[tuple[str, int], _Route] = {}
        self.dropped: Counter[str] = Counter()
        """Datagrams dropped, by reason (also reported through ``on_drop``)."""
        self.rebound = 0
        """Addresses taken over by another endpoint (a peer's new NAT mapping on an address
        that someone else had)."""
        self.raw_socket: socket.socket | None = None
        self.sockname: tuple[str, int] = ("", 0)

    @classmethod
    async def bind(
        cls, host: str, port: int, *, on_drop: Callable[[str], None] | None = None
    ) -> UdpMux:
        """Bind ``host:port`` (0 for an ephemeral port). Raises OSError if it is taken."""
        loop = asyncio.get_running_loop()
        mux = cls(on_drop)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # The socket is made here, not by asyncio, to keep the real one (asyncio hands out a
        # restricted wrapper): senders and a native plane write to it directly.
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
                except OSError:
                    pass
            sock.bind((host, port))
            sock.setblocking(False)
            await loop.create_datagram_endpoint(lambda: _SocketReader(mux), sock=sock)
        except BaseException:
            sock.close()
            raise
        mux.raw_socket = sock
        host, port = sock.getsockname()[:2]
        mux.sockname = (host, port)
        logger.info("udp mux: listening on %s:%d", host, port)
        return mux

    # --- asyncio -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's datagram transport is not a DatagramTransport subclass: no isinstance.
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.raw_socket = None
        for link in list(self._by_ufrag.values()):
            link.close()

    def error_received(self, exc: Exception) -> None:
        # ICMP errors about one peer's address must not disturb the others.
        logger.debug("udp mux %s:%d: %s", *self.sockname, exc)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """Route one datagram (also the entry point for a native plane's fallback)."""
        # An IPv6 socket reports four-tuples; routes are keyed by (host, port).
        remote: tuple[str, int] = addr if len(addr) == 2 else (addr[0], addr[1])
        if not data:
            self._drop(DROP_EMPTY)
            return
        route = self._by_address.get(remote)
        if route is not None and data[0] > 3:
            route.last_seen = time.monotonic()
            route.link.endpoint.datagram_received(data, remote)
            return
        self._stun_or_drop(data, remote, route)

    def _stun_or_drop(self, data: bytes, addr: tuple[str, int], route: _Route | None) -> None:
        ufrag = stun_binding_ufrag(data)
        if route is not None:
            # STUN from a known address: it stays with its endpoint unless the request names
            # another endpoint's ufrag and authenticates there (the address was reused).
            link = self._by_ufrag.get(ufrag) if ufrag else None
            if link is not None and link is not route.link and link.endpoint.accepts(data, addr):
                self._forget(addr)
                self._remember(link, addr)
                self.rebound += 1
                link.endpoint.datagram_received(data, addr)
                return
            route.last_seen = time.monotonic()
            route.link.endpoint.datagram_received(data, addr)
            return
        if ufrag is None:
            self._drop(DROP_MALFORMED_STUN if looks_like_stun(data) else DROP_UNKNOWN_ADDRESS)
            return
        link = self._by_ufrag.get(ufrag)
        if link is None:
            self._drop(DROP_UNKNOWN_UFRAG)
            return
        # Only a request signed with the endpoint's password opens a route: someone who saw
        # a ufrag on the wire cannot make an endpoint listen to them.
        if not link.endpoint.accepts(data, addr):
            self._drop(DROP_UNAUTHENTICATED)
            return
        self._remember(link, addr)
        link.endpoint.datagram_received(data, addr)

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        if self._on_drop is not None:
            self._on_drop(reason)

    def _remember(self, link: MuxLink, addr: tuple[str, int]) -> None:
        if len(link.addresses) >= MAX_ADDRESSES_PER_ENDPOINT:
            stalest = min(link.addresses.items(), key=lambda item: item[1].last_seen)[0]
            self._forget(stalest)
        route = _Route(link)
        link.addresses[addr] = route
        self._by_address[addr] = route

    def expect(self, link: MuxLink, addr: tuple[str, int]) -> None:
        """Route ``addr`` to ``link``, which sends to it, unless another endpoint has it."""
        if addr not in self._by_address:
            self._remember(link, addr)

    def _forget(self, addr: tuple[str, int]) -> None:
        route = self._by_address.pop(addr, None)
        if route is not None:
            route.link.addresses.pop(addr, None)

    # --- endpoints ---------------------------------------------------------------------

    def has_ufrag(self, ufrag: str) -> bool:
        return ufrag in self._by_ufrag

    def register(self, ufrag: str, endpoint: MuxEndpoint) -> MuxLink:
        """Route datagrams naming ``ufrag`` (and then their addresses) to ``endpoint``. Raises
        ValueError if another endpoint has that ufrag: the caller picks another."""
        if self._transport is None:
            raise ConnectionError("udp mux is closed")
        if not ufrag or ufrag in self._by_ufrag:
            raise ValueError(f"ufrag {ufrag!r} is taken")
        link = MuxLink(self, ufrag, endpoint)
        self._by_ufrag[ufrag] = link
        return link

    def unregister(self, link: MuxLink) -> None:
        if self._by_ufrag.get(link.ufrag) is link:
            del self._by_ufrag[link.ufrag]
        for addr in list(link.addresses):
            self._forget(addr)

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._transport is not None:
            self._transport.sendto(data, addr)

    def write_buffer_size(self) -> int:
        transport: Any = self._transport
        return transport.get_write_buffer_size() if transport is not None else 0

    # --- introspection -----------------------------------------------------------------

    @property
    def endpoints(self) -> int:
        """Registered endpoints (ufrags)."""
        return len(self._by_ufrag)

    @property
    def addresses(self) -> int:
        """Remote addresses routed to an endpoint."""
        return len(self._by_address)

    def fileno(self) -> int:
        """The socket's descriptor, for a native plane that reads it itself."""
        if self.raw_socket is None:
            raise ConnectionError("udp mux is closed")
        return self.raw_socket.fileno()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
