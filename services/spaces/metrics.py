"""Prometheus metrics. Each process serves them on SPACES_METRICS_ADDR (/metrics)."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

JOINS = Counter("spaces_joins_total", "Join calls by result", ["result"])
JOIN_LATENCY = Histogram(
    "spaces_join_latency_seconds",
    "Join latency, from request to admission",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
LIVENESS_CHECKS = Counter(
    "spaces_node_liveness_checks_total",
    "Media nodes checked at once because a client reported them unreachable, by result",
    ["result"],
)
PLACEMENTS = Counter("spaces_placements_total", "Spaces placed on a media node", ["reason"])
LEASE_RENEWALS = Counter("spaces_lease_renewals_total", "Connection leases renewed by nodes")
LEASE_EXPIRIES = Counter("spaces_lease_expiries_total", "Connections reaped after their lease")
SPACES_CREATED = Counter("spaces_spaces_created_total", "Spaces created")
SPACES_DELETED = Counter("spaces_spaces_deleted_total", "Spaces deleted")
SESSIONS = Gauge("spaces_media_sessions", "Live media sessions on this node")
ROOMS = Gauge("spaces_media_spaces", "Spaces hosted on this node")
PARTICIPANTS = Gauge("spaces_participants", "Participants in sessions on this node")
NODE_LOAD = Gauge("spaces_node_load", "This media node's reported load (0..1)")
MALLOC_TRIMS = Counter(
    "spaces_malloc_trims_total", "Times this media node gave freed heap memory back to the OS"
)
MALLOC_TRIM_SECONDS = Counter(
    "spaces_malloc_trim_seconds_total",
    "Time spent collecting garbage and giving freed heap memory back (gc.collect, malloc_trim)",
)
FORWARDED_PACKETS = Counter(
    "spaces_forwarded_packets_total", "RTP packets forwarded to subscribers", ["kind"]
)
FORWARDED_BYTES = Counter(
    "spaces_forwarded_bytes_total", "RTP payload bytes forwarded to subscribers", ["kind"]
)
DROPPED_PACKETS = Counter(
    "spaces_dropped_packets_total", "RTP packets not forwarded to a subscriber", ["reason"]
)
UDP_MUX_DROPPED = Counter(
    "spaces_udp_mux_dropped_datagrams_total",
    "Datagrams on the single media UDP port that reached no peer connection, by reason",
    ["reason"],
)
UDP_MUX_ENDPOINTS = Gauge(
    "spaces_udp_mux_endpoints", "ICE endpoints (peer connections) behind the single UDP port"
)
UDP_MUX_ADDRESSES = Gauge(
    "spaces_udp_mux_addresses", "Remote addresses routed to a peer connection on the UDP port"
)
KEYFRAME_REQUESTS = Counter(
    "spaces_keyframe_requests_total", "Keyframe requests sent upstream to publishers"
)
LAYER_SWITCHES = Counter(
    "spaces_simulcast_layer_switches_total",
    "Simulcast layer switches decided for subscribers: up, down, off (audio only or no video "
    "wanted), on (video again)",
    ["direction"],
)
SWITCH_KEYFRAME_REQUESTS = Counter(
    "spaces_simulcast_switch_keyframe_requests_total",
    "Keyframe requests (PLI on the target layer's SSRC) asked for by simulcast layer switches",
)
LAYER_SUBSCRIBERS = Gauge(
    "spaces_simulcast_layer_subscribers",
    "Subscriptions forwarded each simulcast layer on this node (layer 0: the lowest)",
    ["layer"],
)
PAUSED_LAYERS = Gauge(
    "spaces_simulcast_paused_layers",
    "Simulcast layers no subscriber wants (dynacast): our web client is told to stop sending "
    "them; of other publishers they are only not forwarded",
)
DYNACAST_UPDATES = Counter(
    "spaces_simulcast_dynacast_updates_total",
    "Changes to the layers a simulcast publisher is asked to send: pause (fewer), resume (more)",
    ["change"],
)
AUDIO_ONLY_SUBSCRIBERS = Gauge(
    "spaces_simulcast_audio_only_subscribers",
    "Subscribers whose estimated bandwidth cannot carry the lowest layers: audio only",
)
ESTIMATED_BANDWIDTH = Histogram(
    "spaces_subscriber_estimated_bandwidth_bps",
    "Subscribers' estimated bandwidth (bits per second), observed at every estimate tick",
    buckets=(
        100_000,
        200_000,
        300_000,
        500_000,
        750_000,
        1_000_000,
        1_500_000,
        2_000_000,
        3_000_000,
        5_000_000,
    ),
)
DECODERS_CREATED = Counter(
    "spaces_media_decoders_created_total",
    "aiortc decoders instantiated in this process (a forwarding node must create none)",
)
ENCODERS_CREATED = Counter(
    "spaces_media_encoders_created_total",
    "aiortc encoders instantiated in this process (a forwarding node must create none)",
)
WEBHOOK_QUEUES = Gauge(
    "spaces_webhook_queues",
    "Webhook queues (endpoint and space) with undelivered events: waiting, retrying or posting",
)
WEBHOOK_OLDEST_DUE = Gauge(
    "spaces_webhook_oldest_due_seconds",
    "How long the longest-waiting webhook delivery that is due has waited",
)
WEBHOOK_DEAD_LETTERS = Gauge(
    "spaces_webhook_dead_letters", "Webhook deliveries that failed every attempt (kept)"
)
STORE_EPOCH = Gauge(
    "spaces_store_epoch",
    "The state store's epoch (Redis time in microseconds when it first saw Spaces data, as a "
    "media node last read it): it changes when Redis lost its data",
)
STORE_EPOCH_CHANGES = Counter(
    "spaces_store_epoch_changes_total",
    "Spaces whose sessions this media node re-asserted after finding the store's epoch changed",
)
MEDIA_NODES = Gauge(
    "spaces_media_nodes",
    "Media nodes in the registry as presence sees them, by state (serving, draining, stale)",
    ["state"],
)
ASYNCIO_TASKS = Gauge(
    "spaces_asyncio_tasks", "asyncio tasks alive in this process (flat unless something leaks)"
)
SIGNAL_JOINS = Counter(
    "spaces_signal_joins_total", "Browser joins through the signaling service by result", ["result"]
)
SIGNAL_JOIN_LATENCY = Histogram(
    "spaces_signal_join_latency_seconds",
    "Browser join latency, from the WebSocket upgrade to the joined message",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
SIGNAL_CONNECTIONS = Gauge(
    "spaces_signal_connections", "Browser WebSocket sessions this signaling process holds"
)
WEBHOOK_DELIVERIES = Counter(
    "spaces_webhook_deliveries_total", "Webhook delivery attempts by result", ["result"]
)


def count_tasks_of(loop: asyncio.AbstractEventLoop) -> None:
    """Report the tasks of ``loop`` (read at scrape time, from the metrics thread)."""
    ASYNCIO_TASKS.set_function(lambda: len(asyncio.all_tasks(loop)))


def start_metrics_server(addr: str) -> int:
    """Serve /metrics on host:port; returns the bound port (0 picks a free one)."""
    host, _, port = addr.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")
    bound = int(server.server_address[1])
    logger.info("metrics on http://%s:%d/metrics", host or "0.0.0.0", bound)
    return bound


BROADCASTS_ACTIVE = Gauge(
    "spaces_broadcasts_active", "Broadcasts this broadcaster worker streams (holds a lease on)"
)
BROADCAST_CLAIMS = Counter("spaces_broadcast_claims_total", "Broadcasts this worker claimed")
BROADCAST_HANDOVERS = Counter(
    "spaces_broadcast_handovers_total", "Broadcasts this worker released while draining"
)
BROADCAST_FRAMES = Counter(
    "spaces_broadcast_frames_total",
    "Video frames composed for broadcasts, and frames dropped: slots that repeat the previous "
    "frame because the composer was late or the encoder behind (the output stays at 30 fps), "
    "or frames lost to a full encoder queue (a gap)",
    ["result"],
)
BROADCAST_ERRORS = Counter(
    "spaces_broadcast_errors_total",
    "Broadcast failures by kind: encoder, rtmp (refused or dropped), rtmp_stall, "
    "composer_exit, watchdog",
    ["kind"],
)
BROADCAST_CPU = Gauge(
    "spaces_broadcast_cpu_cores",
    "CPU of each broadcast's composer process, in cores",
    ["broadcast_id"],
)
