"""Configuration as frozen dataclasses.

The environment is read in exactly one place, ``ServerConfig.from_env``, called by the CLI entry
point. Everything else receives config objects, so tests build them directly.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

ALL_SERVICES = frozenset(
    {"control", "auth", "presence", "media", "webhooks", "signal", "broadcaster"}
)
"""Services `spaces serve` can run. `media` is the embedded media node; `signal` the WebSocket
signaling service for browsers; `broadcaster` a broadcaster worker (BroadcastService itself is
part of `control`)."""

DEFAULT_GRPC_ADDR = "127.0.0.1:50051"
DEFAULT_METRICS_ADDR = "127.0.0.1:9464"
DEFAULT_SIGNAL_ADDR = "127.0.0.1:8080"


@dataclass(frozen=True)
class LeaseConfig:
    """How long reservations live. All participants' lapse bounds derive from these."""

    pending_ms: int = 20_000
    """A Join's reservation (and its ticket) lapses unless a media node claims it in time."""
    session_ms: int = 10_000
    """A connected participant's lease: "one lease period". Renewed by its media node."""
    renew_interval_ms: int = 3_000
    """How often a media node renews its sessions' leases and its spaces' placement."""
    placement_ms: int = 15_000
    """The space -> node mapping lapses unless the hosting node renews it."""
    reap_interval_ms: int = 1_000
    """How often presence reaps lapsed leases (so no ghost outlives one lease period)."""
    gone_ttl_ms: int = 120_000
    """How long a removed connection's reason is kept for its node to read."""

    def __post_init__(self) -> None:
        if self.renew_interval_ms * 2 > self.session_ms:
            raise ValueError("lease renew interval must be at most half the session lease")
        if self.pending_ms <= 0 or self.placement_ms <= self.renew_interval_ms:
            raise ValueError("pending and placement leases must outlive a renew interval")


@dataclass(frozen=True)
class RegistryConfig:
    """Media node registry timing (LiveKit's: stats every 2 s, stale after 5 s)."""

    heartbeat_ms: int = 2_000
    stale_ms: int = 5_000
    record_ttl_ms: int = 60_000
    """A dead node's record disappears after this long."""
    cache_ms: int = 500
    """Presence re-reads the registry at most this often."""

    def __post_init__(self) -> None:
        if self.stale_ms <= self.heartbeat_ms:
            raise ValueError("a node must be stale only after missing a heartbeat")


@dataclass(frozen=True)
class LimitsConfig:
    """Per-space and per-participant limits, handed to clients at join."""

    max_participants: int = 100
    """Default participant limit of a space (a space may override it)."""
    custom_events_per_second: int = 10
    custom_event_max_bytes: int = 4096
    tracks_per_source: int = 1
    display_name_interval_seconds: int = 1
    display_name_max_chars: int = 64
    max_subscriptions: int = 16
    """Default automatic-subscription size (1..20)."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_subscriptions <= 20:
            raise ValueError("max_subscriptions must be between 1 and 20")
        if self.max_participants < 1:
            raise ValueError("max_participants must be at least 1")


@dataclass(frozen=True)
class IceServerConfig:
    urls: tuple[str, ...]
    username: str = ""
    credential: str = ""


TURN_SCHEMES = ("turn:", "turns:", "stun:")
MEDIA_TURN_MODES = ("off", "on", "relay")


@dataclass(frozen=True)
class TurnConfig:
    """A TURN server (coturn with ``use-auth-secret``) for which presence mints a time-limited
    credential per Join, handed to the client in ``JoinResponse.ice_servers``."""

    urls: tuple[str, ...] = ()
    """e.g. ``turn:turn.example.com:3478?transport=udp`` and
    ``turns:turn.example.com:5349?transport=tcp``."""
    secret: str = ""
    """coturn's ``static-auth-secret``."""
    ttl_s: int = 43_200
    """A credential lasts this long from the Join, or until the token expires if later."""
    media: str = "off"
    """Whether media nodes use the TURN server too: "off" (they have a reachable address),
    "on" (relay candidates besides their own) or "relay" (relay only)."""

    def __post_init__(self) -> None:
        if bool(self.urls) != bool(self.secret):
            raise ValueError("set SPACES_TURN_URLS and SPACES_TURN_SECRET together")
        for url in self.urls:
            if not url.startswith(TURN_SCHEMES):
                raise ValueError(f"TURN url {url!r} must start with turn:, turns: or stun:")
        if self.urls and not any(u.startswith(("turn:", "turns:")) for u in self.urls):
            raise ValueError("SPACES_TURN_URLS needs at least one turn: or turns: url")
        if self.ttl_s <= 0:
            raise ValueError("SPACES_TURN_TTL_SECONDS must be positive")
        if self.media not in MEDIA_TURN_MODES:
            raise ValueError("SPACES_MEDIA_TURN must be off, on or relay")
        if self.media != "off" and not self.urls:
            raise ValueError("SPACES_MEDIA_TURN needs SPACES_TURN_URLS and SPACES_TURN_SECRET")

    @property
    def enabled(self) -> bool:
        return bool(self.urls)


DATAPLANES = ("native", "python")


@dataclass(frozen=True)
class NodeConfig:
    """One media node."""

    node_id: str = ""
    """Unique per node; defaults to the host name plus a random suffix."""
    advertise_address: str = ""
    """gRPC address clients dial for MediaService.Session (host:port)."""
    max_sessions: int = 500
    ice_bind_addresses: tuple[str, ...] = ()
    """Local addresses ICE binds; empty means every non-loopback address (aioice's default)."""
    ice_advertise_ip: str = ""
    """Public IP announced instead of the bound address (NAT 1:1), e.g. the Kubernetes node IP."""
    udp_port_min: int = 0
    udp_port_max: int = 0
    """Inclusive UDP port range for ICE; 0/0 means ephemeral ports."""
    udp_port: int = 0
    """Single-port mode when set: every peer connection shares this one UDP port (one socket
    per ICE bind address), demultiplexed by remote address and STUN username."""
    udp_advertise_port: int = 0
    """Single-port mode: the port announced in ICE candidates, when a Service or NAT maps
    another port to ``udp_port``; 0 announces ``udp_port``."""
    drain_grace_s: float = 30.0
    """On SIGTERM, sessions may continue this long before being told to move."""
    keyframe_interval_ms: int = 300
    """Keyframe requests to one publisher are merged and sent at most this often."""
    subscriber_buffer_bytes: int = 256 * 1024
    """Above this much unsent data a subscriber drops media until the next keyframe."""
    max_publish_bitrate: int = 2_500_000
    """Announced to video publishers every second (REMB): the most each track may send."""
    subscriber_answer_timeout_s: float = 20.0
    """A client that leaves a subscriber offer unanswered this long loses its session."""
    malloc_trim_interval_s: float = 10.0
    """After sessions end, the closed sessions' garbage is collected and freed heap memory goes
    back to the OS (``gc.collect``, glibc ``malloc_trim``) this often; 0 never
    (spaces.media.allocator)."""
    dataplane: str = "native"
    """Per-packet work: "native" (the C extension spaces.media._dataplane) or "python"."""

    def __post_init__(self) -> None:
        if (self.udp_port_min == 0) != (self.udp_port_max == 0):
            raise ValueError("set both ends of the UDP port range")
        if self.udp_port_min and not (0 < self.udp_port_min <= self.udp_port_max <= 65535):
            raise ValueError("invalid UDP port range")
        if self.udp_port and self.udp_port_min:
            raise ValueError("set SPACES_MEDIA_UDP_PORT or SPACES_UDP_PORT_RANGE, not both")
        if not 0 <= self.udp_port <= 65535 or not 0 <= self.udp_advertise_port <= 65535:
            raise ValueError("invalid media UDP port")
        if self.udp_advertise_port and not self.udp_port:
            raise ValueError("SPACES_MEDIA_UDP_ADVERTISE_PORT needs SPACES_MEDIA_UDP_PORT")
        if self.drain_grace_s < 0:
            raise ValueError("drain grace must not be negative")
        if self.malloc_trim_interval_s < 0:
            raise ValueError("the malloc trim interval must not be negative")
        if self.dataplane not in DATAPLANES:
            raise ValueError("SPACES_MEDIA_DATAPLANE must be native or python")


@dataclass(frozen=True)
class WebhookConfig:
    """Webhook delivery policy, and one endpoint from config for the simplest deployments."""

    url: str = ""
    """An endpoint from config (id "config"); WebhookService manages any others."""
    secret: str = ""
    """The config endpoint's signing secret; required with ``url``."""
    event_types: tuple[str, ...] = ()
    """Mux event names the config endpoint receives; empty for all."""
    max_attempts: int = 28
    """Attempts per event and endpoint before it becomes a dead letter."""
    initial_backoff_ms: int = 1_000
    """Delay before the second attempt; it doubles per attempt, with jitter."""
    max_backoff_ms: int = 3_600_000
    timeout_ms: int = 5_000
    """One attempt's deadline (Mux's was 5 s); a slower endpoint counts as failed."""
    lease_ms: int = 10_000
    """How long a silent replica keeps an endpoint's queue of a space before another takes it
    over (renewed every third of it while delivering): the crash-recovery delay."""
    claim_idle_ms: int = 10_000
    """How long events a replica read but did not fan out stay with it before another takes
    them over. Deliveries wait for them, to keep each space's order."""
    poll_interval_ms: int = 500
    """How often a replica looks for queues that became due (retries, other replicas' events)."""
    concurrency: int = 64
    """Deliveries in flight per replica."""
    endpoint_concurrency: int = 8
    """Deliveries in flight per replica to one endpoint, so a slow one cannot take them all."""
    dead_letter_limit: int = 10_000
    """Dead letters kept; the oldest are dropped beyond it."""

    def __post_init__(self) -> None:
        if self.url and not self.secret:
            raise ValueError("SPACES_WEBHOOK_SECRET is required with SPACES_WEBHOOK_URL")
        if self.max_attempts < 1:
            raise ValueError("webhook max attempts must be at least 1")
        if not 0 < self.initial_backoff_ms <= self.max_backoff_ms:
            raise ValueError("webhook backoff must be positive and at most the maximum backoff")
        if self.timeout_ms <= 0 or self.lease_ms < 30 or self.claim_idle_ms <= 0:
            raise ValueError("webhook timeout, lease and claim idle time must be positive")
        if self.poll_interval_ms <= 0 or self.concurrency < 1 or self.endpoint_concurrency < 1:
            raise ValueError("webhook poll interval and concurrency must be positive")
        if self.dead_letter_limit < 1:
            raise ValueError("webhook dead letter limit must be at least 1")


@dataclass(frozen=True)
class SignalConfig:
    """The WebSocket signaling service for browsers (Mux's web protocol)."""

    addr: str = DEFAULT_SIGNAL_ADDR
    """host:port of the HTTP/WebSocket listener (``/v1``, ``/sdk/spaces.js``, the meeting page)."""
    presence_addr: str = ""
    """gRPC address of PresenceService; empty: this process's own (it must run presence)."""
    grpc_ca_file: str = ""
    """CA bundle for TLS to presence and media nodes; empty: plaintext (or this process's own
    certificate when it serves TLS itself)."""
    ping_interval_s: float = 20.0
    """WebSocket pings to every browser (keeps proxies from closing idle connections, and
    finds dead ones); 0 disables them."""
    join_timeout_s: float = 10.0
    dev_tokens: bool = True
    """The meeting page's token helper. Only ever active in the embedded mode on a loopback
    listener."""

    def __post_init__(self) -> None:
        if self.ping_interval_s < 0 or self.join_timeout_s <= 0:
            raise ValueError("signal ping interval and join timeout must be positive")


@dataclass(frozen=True)
class Encoding:
    """One simulcast layer a browser publishes (an RTCRtpEncodingParameters)."""

    rid: str
    scale_resolution_down_by: float
    """The layer's size is the track's divided by this (>= 1)."""
    max_bitrate: int
    """bits per second."""
    max_framerate: float = 0.0
    """0: the track's frame rate."""

    def __post_init__(self) -> None:
        if not self.rid or len(self.rid) > 16 or not self.rid.isalnum():
            raise ValueError("a simulcast rid must be 1-16 letters or digits")
        if self.scale_resolution_down_by < 1 or self.max_bitrate <= 0 or self.max_framerate < 0:
            raise ValueError("a simulcast layer needs a scale >= 1 and a positive bitrate")

    def mux(self) -> dict[str, int | float | str]:
        """As Mux's ``joined.simulcast`` carried it (its SDK maps these to sendEncodings)."""
        entry: dict[str, int | float | str] = {
            "rid": self.rid,
            "max_bitrate": self.max_bitrate,
            "scale_resolution_down_by": self.scale_resolution_down_by,
        }
        if self.max_framerate:
            entry["max_framerate"] = self.max_framerate
        return entry


CAMERA_LAYERS = "q/4/150,h/2/500,f/1/1500"
"""``SPACES_SIMULCAST_CAMERA``'s default: 180p at 150 kbps, 360p at 500 kbps, 720p at 1.5 Mbps
(of a 1280x720 camera)."""
SCREENSHARE_LAYERS = "h/2/500/5,f/1/2000"
"""``SPACES_SIMULCAST_SCREENSHARE``'s default: half size at 500 kbps and 5 fps, full at 2 Mbps."""


def parse_encodings(raw: str) -> tuple[Encoding, ...]:
    """ "q/4/150,h/2/500,f/1/1500" (rid/scale/kbps[/fps], lowest layer first) -> encodings;
    "" or "off" -> () (one encoding, no simulcast)."""
    if raw.strip().lower() in ("", "off", "none"):
        return ()
    layers = []
    for item in raw.split(","):
        parts = [p.strip() for p in item.split("/")]
        if len(parts) not in (3, 4):
            raise ValueError("simulcast layers look like q/4/150,h/2/500,f/1/1500")
        fps = float(parts[3]) if len(parts) == 4 else 0.0
        layers.append(Encoding(parts[0], float(parts[1]), int(float(parts[2]) * 1000), fps))
    if len({layer.rid for layer in layers}) != len(layers):
        raise ValueError("simulcast rids must differ")
    if [layer.max_bitrate for layer in layers] != sorted(layer.max_bitrate for layer in layers):
        raise ValueError("simulcast layers go from the lowest bitrate to the highest")
    return tuple(layers)


@dataclass(frozen=True)
class SimulcastConfig:
    """The layers browsers publish, lowest first (handed out in ``joined.simulcast``; the
    media node knows each layer's bitrate by its rid). Empty: one encoding."""

    camera: tuple[Encoding, ...] = ()
    screenshare: tuple[Encoding, ...] = ()

    def layers(self, source: str) -> tuple[Encoding, ...]:
        return self.screenshare if source == "screenshare" else self.camera


@dataclass(frozen=True)
class BroadcastConfig:
    """Broadcasts (BroadcastService) and the broadcaster workers that stream them."""

    per_space: int = 1
    """Broadcasts a space may have (Mux allowed one)."""
    background_max_bytes: int = 4 * 1024 * 1024
    background_fetch_timeout_ms: int = 5_000
    worker_id: str = ""
    """Unique per worker; defaults to the host name plus a random suffix."""
    max_broadcasts: int = 2
    """Broadcasts one worker streams at once (each is a composer process)."""
    lease_ms: int = 5_000
    """A worker that stops renewing loses its broadcasts after this long ("one lease period")."""
    renew_interval_ms: int = 1_000
    poll_interval_ms: int = 1_000
    """How often an idle worker looks for broadcasts to claim."""
    video_encoder: str = "libx264"
    """Any H.264 encoder of the FFmpeg that PyAV loads (h264_nvenc, h264_qsv, h264_vaapi, ...)."""
    video_options: tuple[tuple[str, str], ...] = (("preset", "veryfast"),)
    """Encoder options (FFmpeg's -x264opts style names for libx264: preset, tune, profile...)."""
    video_kbps: int = 0
    """Video bitrate; 0 picks one by resolution (1080p 4500, 720p 2500)."""
    audio_kbps: int = 128
    rtmp_timeout_ms: int = 5_000
    """Connecting, and any one write: a server that accepts nothing for this long has stalled."""
    watchdog_ms: int = 15_000
    """A composer that reports no progress for this long is killed and started again."""
    retry_initial_ms: int = 1_000
    retry_max_ms: int = 30_000
    """Backoff between attempts against a failing RTMP server (doubling, with jitter)."""

    def __post_init__(self) -> None:
        if self.per_space < 1 or self.max_broadcasts < 1:
            raise ValueError("broadcasts per space and per worker must be at least 1")
        if self.renew_interval_ms * 2 > self.lease_ms:
            raise ValueError("broadcast lease renew interval must be at most half the lease")
        if self.rtmp_timeout_ms <= 0 or self.watchdog_ms <= self.rtmp_timeout_ms:
            raise ValueError("the composer watchdog must outlast the rtmp timeout")
        if not 0 < self.retry_initial_ms <= self.retry_max_ms:
            raise ValueError("broadcast retry backoff must be positive and at most its maximum")


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str = ""
    key_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True)
class ServerConfig:
    """Everything one `spaces serve` or `spaces media-node` process needs."""

    grpc_addr: str = DEFAULT_GRPC_ADDR
    redis_url: str = ""
    """Empty: the embedded in-memory store (single process)."""
    admin_key: str = ""
    services: frozenset[str] = ALL_SERVICES
    metrics_addr: str = DEFAULT_METRICS_ADDR
    """host:port of the Prometheus endpoint; empty disables it."""
    health_addr: str = ""
    """A second, plaintext gRPC listener serving only grpc.health.v1.Health, for Kubernetes
    probes and `spaces drain` when the main port uses TLS; empty: health on the main port."""
    log_format: str = "text"
    log_level: str = "INFO"
    tls: TlsConfig = field(default_factory=TlsConfig)
    leases: LeaseConfig = field(default_factory=LeaseConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    ice_servers: tuple[IceServerConfig, ...] = ()
    turn: TurnConfig = field(default_factory=TurnConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    webhooks: WebhookConfig = field(default_factory=WebhookConfig)
    signal: SignalConfig = field(default_factory=SignalConfig)
    broadcast: BroadcastConfig = field(default_factory=BroadcastConfig)
    simulcast: SimulcastConfig = field(default_factory=SimulcastConfig)
    event_stream_maxlen: int = 100_000
    """Events retained for WatchEvents resumption and webhook delivery."""
    shutdown_grace_s: float = 5.0

    def __post_init__(self) -> None:
        unknown = self.services - ALL_SERVICES
        if unknown:
            raise ValueError(f"unknown services: {', '.join(sorted(unknown))}")
        if not self.services:
            raise ValueError("no services selected")
        if self.log_format not in ("text", "json"):
            raise ValueError("log format must be text or json")
        if "media" in self.services and not self.redis_url and "presence" not in self.services:
            raise ValueError("a media node without Redis must run with presence in one process")
        if (
            "signal" in self.services
            and "presence" not in self.services
            and not self.signal.presence_addr
        ):
            raise ValueError(
                "the signal service needs SPACES_PRESENCE_ADDR, or presence in one process"
            )
        if "broadcaster" in self.services and not self.redis_url and "media" not in self.services:
            raise ValueError(
                "a broadcaster without Redis must run with a media node in one process"
            )

    @property
    def embedded(self) -> bool:
        return not self.redis_url

    def with_generated_admin_key(self) -> ServerConfig:
        return replace(self, admin_key=secrets.token_urlsafe(24))

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, services: str | None = None
    ) -> ServerConfig:
        """Build the config from SPACES_* variables (see README, "Configuration")."""
        env = os.environ if env is None else env

        def get(name: str, default: str = "") -> str:
            return env.get(name, default).strip()

        def seconds_ms(name: str, default_ms: int) -> int:
            raw = get(name)
            return int(float(raw) * 1000) if raw else default_ms

        grpc_addr = get("SPACES_GRPC_ADDR", DEFAULT_GRPC_ADDR)
        selected = services or get("SPACES_SERVICES") or ",".join(sorted(ALL_SERVICES))
        service_set = frozenset(s.strip() for s in selected.split(",") if s.strip())
        redis_url = get("SPACES_REDIS_URL")

        leases = LeaseConfig(
            pending_ms=seconds_ms("SPACES_PENDING_LEASE_SECONDS", LeaseConfig.pending_ms),
            session_ms=seconds_ms("SPACES_LEASE_SECONDS", LeaseConfig.session_ms),
            renew_interval_ms=seconds_ms(
                "SPACES_LEASE_RENEW_SECONDS", LeaseConfig.renew_interval_ms
            ),
            placement_ms=seconds_ms("SPACES_PLACEMENT_LEASE_SECONDS", LeaseConfig.placement_ms),
        )
        registry = RegistryConfig(
            heartbeat_ms=seconds_ms("SPACES_HEARTBEAT_SECONDS", RegistryConfig.heartbeat_ms),
            stale_ms=seconds_ms("SPACES_NODE_STALE_SECONDS", RegistryConfig.stale_ms),
        )
        limits = LimitsConfig(
            max_participants=int(get("SPACES_MAX_PARTICIPANTS", "100")),
            custom_events_per_second=int(get("SPACES_CUSTOM_EVENTS_PER_SECOND", "10")),
            tracks_per_source=int(get("SPACES_TRACKS_PER_SOURCE", "1")),
            display_name_interval_seconds=int(get("SPACES_DISPLAY_NAME_INTERVAL_SECONDS", "1")),
            max_subscriptions=int(get("SPACES_MAX_SUBSCRIPTIONS", "16")),
        )
        port_min, port_max = parse_port_range(get("SPACES_UDP_PORT_RANGE"))
        bind = tuple(a.strip() for a in get("SPACES_ICE_BIND").split(",") if a.strip())
        if not bind and is_loopback_host(host_of(grpc_addr)):
            # A loopback-only server keeps media on loopback too.
            bind = ("127.0.0.1",)
        node = NodeConfig(
            node_id=get("SPACES_NODE_ID") or default_node_id(),
            advertise_address=get("SPACES_PUBLIC_ADDR") or default_advertise(grpc_addr),
            max_sessions=int(get("SPACES_MAX_SESSIONS", "500")),
            ice_bind_addresses=bind,
            ice_advertise_ip=get("SPACES_ICE_ADVERTISE_IP"),
            udp_port_min=port_min,
            udp_port_max=port_max,
            udp_port=parse_port("SPACES_MEDIA_UDP_PORT", get("SPACES_MEDIA_UDP_PORT")),
            udp_advertise_port=parse_port(
                "SPACES_MEDIA_UDP_ADVERTISE_PORT", get("SPACES_MEDIA_UDP_ADVERTISE_PORT")
            ),
            drain_grace_s=float(get("SPACES_DRAIN_GRACE_SECONDS", "30")),
            dataplane=get("SPACES_MEDIA_DATAPLANE", "native").lower(),
            max_publish_bitrate=int(
                get("SPACES_MAX_PUBLISH_BITRATE", str(NodeConfig.max_publish_bitrate))
            ),
            malloc_trim_interval_s=float(
                get("SPACES_MALLOC_TRIM_SECONDS", str(NodeConfig.malloc_trim_interval_s))
            ),
        )
        turn = TurnConfig(
            urls=tuple(u.strip() for u in get("SPACES_TURN_URLS").split(",") if u.strip()),
            secret=get("SPACES_TURN_SECRET"),
            ttl_s=int(get("SPACES_TURN_TTL_SECONDS", str(TurnConfig.ttl_s))),
            media=get("SPACES_MEDIA_TURN", "off").lower(),
        )
        webhook_lease_ms = seconds_ms("SPACES_WEBHOOK_LEASE_SECONDS", WebhookConfig.lease_ms)
        webhooks = WebhookConfig(
            url=get("SPACES_WEBHOOK_URL"),
            secret=get("SPACES_WEBHOOK_SECRET"),
            event_types=tuple(
                t.strip() for t in get("SPACES_WEBHOOK_EVENTS").split(",") if t.strip()
            ),
            max_attempts=int(get("SPACES_WEBHOOK_MAX_ATTEMPTS", str(WebhookConfig.max_attempts))),
            initial_backoff_ms=seconds_ms(
                "SPACES_WEBHOOK_BACKOFF_SECONDS", WebhookConfig.initial_backoff_ms
            ),
            max_backoff_ms=seconds_ms(
                "SPACES_WEBHOOK_MAX_BACKOFF_SECONDS", WebhookConfig.max_backoff_ms
            ),
            timeout_ms=seconds_ms("SPACES_WEBHOOK_TIMEOUT_SECONDS", WebhookConfig.timeout_ms),
            lease_ms=webhook_lease_ms,
            claim_idle_ms=webhook_lease_ms,
        )
        signal = SignalConfig(
            addr=get("SPACES_SIGNAL_ADDR", DEFAULT_SIGNAL_ADDR),
            presence_addr=get("SPACES_PRESENCE_ADDR"),
            grpc_ca_file=get("SPACES_GRPC_CA_FILE"),
            ping_interval_s=float(get("SPACES_SIGNAL_PING_SECONDS", "20")),
            dev_tokens=get("SPACES_DEV_TOKENS", "1") not in ("0", "false", "no"),
        )
        broadcast = BroadcastConfig(
            per_space=int(get("SPACES_BROADCASTS_PER_SPACE", str(BroadcastConfig.per_space))),
            worker_id=get("SPACES_BROADCASTER_ID") or default_node_id(),
            max_broadcasts=int(
                get("SPACES_BROADCASTER_MAX_BROADCASTS", str(BroadcastConfig.max_broadcasts))
            ),
            lease_ms=seconds_ms("SPACES_BROADCAST_LEASE_SECONDS", BroadcastConfig.lease_ms),
            renew_interval_ms=seconds_ms(
                "SPACES_BROADCAST_RENEW_SECONDS", BroadcastConfig.renew_interval_ms
            ),
            video_encoder=get("SPACES_BROADCAST_VIDEO_ENCODER", BroadcastConfig.video_encoder),
            video_options=parse_options(get("SPACES_BROADCAST_VIDEO_OPTIONS", "preset=veryfast")),
            video_kbps=int(get("SPACES_BROADCAST_VIDEO_KBPS", "0")),
            audio_kbps=int(get("SPACES_BROADCAST_AUDIO_KBPS", str(BroadcastConfig.audio_kbps))),
            rtmp_timeout_ms=seconds_ms(
                "SPACES_BROADCAST_RTMP_TIMEOUT_SECONDS", BroadcastConfig.rtmp_timeout_ms
            ),
            watchdog_ms=seconds_ms(
                "SPACES_BROADCAST_WATCHDOG_SECONDS", BroadcastConfig.watchdog_ms
            ),
            retry_max_ms=seconds_ms(
                "SPACES_BROADCAST_RETRY_MAX_SECONDS", BroadcastConfig.retry_max_ms
            ),
        )
        simulcast = SimulcastConfig(
            camera=parse_encodings(get("SPACES_SIMULCAST_CAMERA", CAMERA_LAYERS)),
            screenshare=parse_encodings(get("SPACES_SIMULCAST_SCREENSHARE", SCREENSHARE_LAYERS)),
        )
        return cls(
            broadcast=broadcast,
            simulcast=simulcast,
            grpc_addr=grpc_addr,
            redis_url=redis_url,
            admin_key=get("SPACES_ADMIN_KEY"),
            services=service_set,
            metrics_addr=get("SPACES_METRICS_ADDR", DEFAULT_METRICS_ADDR),
            health_addr=get("SPACES_HEALTH_ADDR"),
            log_format=get("SPACES_LOG_FORMAT", "text").lower(),
            log_level=get("SPACES_LOG_LEVEL", "INFO").upper(),
            tls=TlsConfig(
                cert_file=get("SPACES_TLS_CERT_FILE"), key_file=get("SPACES_TLS_KEY_FILE")
            ),
            leases=leases,
            registry=registry,
            limits=limits,
            ice_servers=parse_ice_servers(get("SPACES_ICE_SERVERS")),
            turn=turn,
            node=node,
            webhooks=webhooks,
            signal=signal,
            shutdown_grace_s=float(get("SPACES_SHUTDOWN_GRACE_SECONDS", "5")),
        )


def parse_options(raw: str) -> tuple[tuple[str, str], ...]:
    """ "preset=veryfast,tune=zerolatency" -> (("preset", "veryfast"), ("tune", "zerolatency"))."""
    out = []
    for item in raw.split(","):
        if item.strip():
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise ValueError("encoder options must look like preset=veryfast,tune=film")
            out.append((name.strip(), value.strip()))
    return tuple(out)


def parse_port_range(raw: str) -> tuple[int, int]:
    """ "50000-60000" -> (50000, 60000); "" -> (0, 0)."""
    if not raw:
        return 0, 0
    low, sep, high = raw.partition("-")
    if not sep:
        raise ValueError("SPACES_UDP_PORT_RANGE must look like 50000-60000")
    return int(low), int(high)


def parse_port(name: str, raw: str) -> int:
    """ "3478" -> 3478; "" -> 0."""
    if not raw.strip():
        return 0
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a UDP port number") from None
    if not 0 < port <= 65535:
        raise ValueError(f"{name} must be a UDP port number")
    return port


def parse_ice_servers(raw: str) -> tuple[IceServerConfig, ...]:
    """Either JSON ``[{"urls": [...], "username": ..., "credential": ...}]`` or comma-separated
    URLs (``stun:stun.example.com:3478,turn:...``)."""
    if not raw:
        return ()
    if raw.startswith("["):
        items = json.loads(raw)
        return tuple(
            IceServerConfig(
                urls=tuple([item["urls"]] if isinstance(item["urls"], str) else item["urls"]),
                username=item.get("username", ""),
                credential=item.get("credential", ""),
            )
            for item in items
        )
    return (IceServerConfig(urls=tuple(u.strip() for u in raw.split(",") if u.strip())),)


def host_of(addr: str) -> str:
    host, _, _ = addr.rpartition(":")
    return host.strip("[]")


def port_of(addr: str) -> int:
    return int(addr.rpartition(":")[2])


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_advertise(grpc_addr: str) -> str:
    host = host_of(grpc_addr)
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.gethostname()
    return f"{host}:{port_of(grpc_addr)}"


def default_node_id() -> str:
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"
