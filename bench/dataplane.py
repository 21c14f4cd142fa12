"""The data plane alone, in one process over loopback: what one incoming packet costs to
receive (read, demultiplex, SRTP unprotect, header parse, forwarding decision) and what each
subscriber's copy costs (header rewrite, extensions, SRTP protect, send), for the native
plane (``spaces.media._dataplane``: recvmmsg, sendmmsg) against the Python plane's per-packet
code in the same run (pylibsrtp, aiortc's ``RtpPacket.parse``, the forwarder's rewrite,
``socket.sendto``: what the node runs with ``SPACES_MEDIA_DATAPLANE=python``, without
asyncio's and aiortc's own bookkeeping around it, so a lower bound of that plane's cost).

A publisher socket sends pre-protected 1,200-byte video packets to the node's socket in bursts
of 32; subscribers are UDP sockets nobody reads (the kernel's delivery to them is still paid
by the sender, as on a real node). CPU is this process's (``time.process_time``), with the
cost of the publisher's own sends measured alone and subtracted.

The full node under real peers is ``python -m bench fanout`` and ``python -m bench meetings``.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

import pylibsrtp
from aiortc.rtp import RtpPacket

from bench.common import fmt, say, table
from spaces.media import _dataplane
from spaces.media.forwarding import TrackForwarder, extension_block

NAME = "dataplane"
SUMMARY = "per-packet cost of the native data plane vs the Python plane's code, one process"

BURST = 32
PAYLOAD = b"\x10\x01" + bytes(1180)  # a VP8 delta frame's packet, 1,200 bytes with the header
KEY_PAYLOAD = b"\x10\x00\x9d\x01\x2a" + bytes(1177)
PROFILE = _dataplane.PROFILE_AES128_CM_SHA1_80


def _session(key: bytes, outbound: bool) -> pylibsrtp.Session:
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


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
    sock.setblocking(False)
    return sock


def _stream(key: bytes, count: int) -> list[bytes]:
    sender = _session(key, outbound=True)
    ext = extension_block([(3, b"\x00\x00\x00")])
    out = []
    for seq in range(count):
        payload = KEY_PAYLOAD if seq == 0 else PAYLOAD
        header = struct.pack("!BBHII", 0x90, 96, seq & 0xFFFF, seq * 3000, 0xAAAA)
        out.append(sender.protect(header + ext + payload))
    return out


def _publish(publisher: socket.socket, node: tuple[str, int], burst: list[bytes]) -> None:
    for datagram in burst:
        publisher.sendto(datagram, node)


def _send_cost(packets: list[bytes]) -> float:
    """CPU seconds the publisher's own sends take (subtracted from both planes)."""
    publisher, sink = _udp(), _udp()
    addr = sink.getsockname()
    start = time.process_time()
    for i in range(0, len(packets), BURST):
        _publish(publisher, addr, packets[i : i + BURST])
        _drain(sink)
    spent = time.process_time() - start
    # draining a socket costs about what the plane's read costs beyond the plane's own work:
    # count it as the publisher's (both planes read the same way through the kernel)
    publisher.close()
    sink.close()
    return spent


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(2048)
        except BlockingIOError:
            return


def native_run(subscribers: int, packets: list[bytes], key: bytes) -> float:
    node, publisher = _udp(), _udp()
    fallen: list[Any] = []
    native = _dataplane.Socket(node.fileno(), lambda d, a: fallen.append(a))
    peer = _dataplane.Peer(PROFILE, key, os.urandom(30))
    native.add_peer(publisher.getsockname(), peer)
    source = _dataplane.Source(_dataplane.CODEC_VP8, 90000, True, 0)
    peer.add_source(0xAAAA, source)
    subs = [_udp() for _ in range(subscribers)]
    for i, sub in enumerate(subs):
        out = _dataplane.Peer(PROFILE, os.urandom(30), os.urandom(30))
        out.set_route(node.fileno(), sub.getsockname())
        source.add(_dataplane.Down(out, 0x100 + i, 100, 3, 0))
    addr = node.getsockname()
    start = time.process_time()
    for i in range(0, len(packets), BURST):
        _publish(publisher, addr, packets[i : i + BURST])
        native.read()
    spent = time.process_time() - start
    assert source.packets_in == len(packets), (source.packets_in, len(packets), fallen[:3])
    assert source.forwarded == len(packets) * subscribers
    native.close()
    for sock in [node, publisher, *subs]:
        sock.close()
    return spent


def python_run(subscribers: int, packets: list[bytes], key: bytes) -> float:
    node, publisher = _udp(), _udp()
    rx = _session(key, outbound=False)
    subs = [_udp() for _ in range(subscribers)]
    txs = [(_session(os.urandom(30), outbound=True), sub.getsockname()) for sub in subs]
    header = struct.Struct("!BBHII")
    addr = node.getsockname()
    received = 0
    start = time.process_time()
    for i in range(0, len(packets), BURST):
        _publish(publisher, addr, packets[i : i + BURST])
        while True:
            try:
                data = node.recv(2048)
            except BlockingIOError:
                break
            if 127 < data[0] < 192:
                packet = RtpPacket.parse(rx.unprotect(data))
                received += 1
                tail, first, second = TrackForwarder.tail(packet, (100, 3, 0), 0)
                for n, (tx, sub_addr) in enumerate(txs):
                    datagram = tx.protect(
                        header.pack(first, second, packet.sequence_number, packet.timestamp, n)
                        + tail
                    )
                    node.sendto(datagram, sub_addr)
    spent = time.process_time() - start
    assert received == len(packets)
    for sock in [node, publisher, *subs]:
        sock.close()
    return spent


async def run(quick: bool) -> dict[str, Any]:
    count = 2_000 if quick else 20_000
    steps = (0, 1, 10) if quick else (0, 1, 5, 10, 20, 50)
    key = os.urandom(30)
    packets = _stream(key, count)
    send = _send_cost(packets)
    rows = []
    for n in steps:
        say(f"dataplane: {n} subscribers, {count} packets")
        native = max(native_run(n, packets, key) - send, 1e-9)
        python = max(python_run(n, packets, key) - send, 1e-9)
        rows.append(
            {
                "subscribers": n,
                "packets_in": count,
                "native_us_per_packet_in": native / count * 1e6,
                "python_us_per_packet_in": python / count * 1e6,
                "native_forwarded_per_core_s": (count * n) / native if n else 0.0,
                "python_forwarded_per_core_s": (count * n) / python if n else 0.0,
                "ratio": python / native,
            }
        )
    base = rows[0]
    per_sub_native = per_sub_python = 0.0
    with_subs = [r for r in rows if r["subscribers"]]
    if with_subs:
        top = with_subs[-1]
        most = top["subscribers"]
        per_sub_native = (top["native_us_per_packet_in"] - base["native_us_per_packet_in"]) / most
        per_sub_python = (top["python_us_per_packet_in"] - base["python_us_per_packet_in"]) / most
    return {
        "rows": rows,
        "summary": {
            "publisher_send_us_per_packet": send / count * 1e6,
            "receive_us_native": base["native_us_per_packet_in"],
            "receive_us_python": base["python_us_per_packet_in"],
            "per_subscriber_us_native": per_sub_native,
            "per_subscriber_us_python": per_sub_python,
        },
        "targets": [
            {
                "target": "receive path per incoming packet <= 10 us (native)",
                "value": base["native_us_per_packet_in"],
                "met": base["native_us_per_packet_in"] <= 10,
            },
            {
                "target": "forwarded packets/s per core >= 100k (native, most subscribers)",
                "value": with_subs[-1]["native_forwarded_per_core_s"] if with_subs else 0.0,
                "met": bool(with_subs) and with_subs[-1]["native_forwarded_per_core_s"] >= 100e3,
            },
        ],
    }


def render(result: dict[str, Any]) -> str:
    rows = [
        [
            str(r["subscribers"]),
            f"{r['native_us_per_packet_in']:.2f}",
            f"{r['python_us_per_packet_in']:.2f}",
            fmt(r["native_forwarded_per_core_s"]) if r["subscribers"] else "-",
            fmt(r["python_forwarded_per_core_s"]) if r["subscribers"] else "-",
            f"{r['ratio']:.1f}x",
        ]
        for r in result["rows"]
    ]
    out = table(
        [
            "subscribers",
            "native us per packet in",
            "python us per packet in",
            "native forwarded/s per core",
            "python forwarded/s per core",
            "python / native",
        ],
        rows,
    )
    summary = result["summary"]
    out += (
        f"\n\nreceive path per incoming packet: native {summary['receive_us_native']:.2f} us, "
        f"python {summary['receive_us_python']:.2f} us; per subscriber copy: native "
        f"{summary['per_subscriber_us_native']:.2f} us, python "
        f"{summary['per_subscriber_us_python']:.2f} us (publisher's own send, subtracted: "
        f"{summary['publisher_send_us_per_packet']:.2f} us a packet)"
    )
    return out
