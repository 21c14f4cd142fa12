"""Real servers for tests: in-process SpacesServer instances on port 0, `spaces` subprocesses,
and thin admin clients."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from spaces.cluster import ServiceProcess
from spaces.config import LeaseConfig, NodeConfig, RegistryConfig, ServerConfig, SignalConfig
from spaces.sdk.tokens import sign_token
from spaces.server import SpacesServer
from spaces.v1 import (
    presence_pb2,
    presence_pb2_grpc,
    signing_key_pb2,
    signing_key_pb2_grpc,
    space_pb2,
    space_pb2_grpc,
)

ADMIN_KEY = "test-admin-key"
VENV_BIN = Path(sys.executable).parent
SPACES = str(VENV_BIN / "spaces")

FAST_LEASES = LeaseConfig(
    pending_ms=3_000,
    session_ms=2_000,
    renew_interval_ms=500,
    placement_ms=3_000,
    reap_interval_ms=200,
)
FAST_REGISTRY = RegistryConfig(heartbeat_ms=300, stale_ms=1_000, cache_ms=100)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_config(
    *,
    redis_url: str = "",
    services: Sequence[str] = ("control", "auth", "presence", "media"),
    node_id: str = "node-a",
    fast: bool = True,
    **overrides: Any,
) -> ServerConfig:
    config = ServerConfig(
        grpc_addr="127.0.0.1:0",
        redis_url=redis_url,
        admin_key=ADMIN_KEY,
        services=frozenset(services),
        metrics_addr="",
        node=NodeConfig(
            node_id=node_id,
            ice_bind_addresses=("127.0.0.1",),
            drain_grace_s=2.0,
        ),
        shutdown_grace_s=1.0,
    )
    if fast:
        config = replace(config, leases=FAST_LEASES, registry=FAST_REGISTRY)
    return replace(config, **overrides)


def web_config(**overrides: Any) -> ServerConfig:
    """A single-process server with the signaling service on a free loopback port, for browser
    and web-protocol tests (``server.signal.port``; ``server.signal.url``)."""
    config = make_config(services=("control", "auth", "presence", "media", "signal"))
    config = replace(
        config,
        signal=SignalConfig(addr="127.0.0.1:0", ping_interval_s=5.0),
        node=replace(config.node, subscriber_answer_timeout_s=5.0),
    )
    return replace(config, **overrides)


@dataclass
class Admin:
    """Admin-key gRPC clients for one server address."""

    address: str
    channel: grpc.aio.Channel = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.address)
        self.spaces = space_pb2_grpc.SpaceServiceStub(self.channel)
        self.keys = signing_key_pb2_grpc.SigningKeyServiceStub(self.channel)
        self.presence = presence_pb2_grpc.PresenceServiceStub(self.channel)

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {ADMIN_KEY}"),)

    async def create_key(self) -> signing_key_pb2.SigningKey:
        return await self.keys.CreateSigningKey(
            signing_key_pb2.CreateSigningKeyRequest(), metadata=self.md
        )

    async def create_space(self, passthrough: str = "", max_participants: int = 0) -> str:
        space = await self.spaces.CreateSpace(
            space_pb2.CreateSpaceRequest(
                passthrough=passthrough, max_participants=max_participants
            ),
            metadata=self.md,
        )
        return space.id

    async def get_space(self, space_id: str) -> space_pb2.Space:
        return await self.spaces.GetSpace(space_pb2.GetSpaceRequest(id=space_id), metadata=self.md)

    async def participants(self, space_id: str) -> list[Any]:
        reply = await self.presence.ListParticipants(
            presence_pb2.ListParticipantsRequest(space_id=space_id), metadata=self.md
        )
        return list(reply.participants)

    async def close(self) -> None:
        await self.channel.close()


@dataclass
class Tenant:
    """A signing key and a way to sign tokens with it."""

    key: signing_key_pb2.SigningKey

    def token(
        self,
        space_id: str,
        participant_id: str | None = None,
        role: str = "publisher",
        ttl: int = 600,
    ) -> str:
        return sign_token(
            self.key.id,
            self.key.private_key,
            space_id,
            role=role,  # type: ignore[arg-type]
            participant_id=participant_id,
            ttl=ttl,
        )


async def start_server(config: ServerConfig) -> SpacesServer:
    server = SpacesServer(config)
    await server.start()
    return server


class Process(ServiceProcess):
    """A `spaces` subprocess with its own environment, for kill and restart tests (the same
    process handling `spaces cluster` uses)."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log: Path) -> None:
        super().__init__(
            name=args[0], args=list(args), env={**os.environ, **env}, port=0, log_path=log
        )

    def start(self) -> Process:  # type: ignore[override]
        super().start()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


async def wait_serving(address: str, timeout: float = 20.0, service: str = "") -> None:
    """Wait until gRPC health reports SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{address} did not become ready")


async def eventually(check: Any, timeout: float = 10.0, interval: float = 0.1) -> Any:
    """Poll ``check`` (sync or async, returning a truthy value) until it passes."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        last = result
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")
