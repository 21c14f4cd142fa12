"""The system under test, as real processes on loopback: a private redis-server, `spaces`
processes (presence, control+auth, media node, or everything embedded), and an admin client
that creates signing keys and spaces and signs join tokens.

Every process binds 127.0.0.1 and runs with SPACES_ICE_BIND=127.0.0.1, so media stays on
loopback (REFERENCE.md §3, "Loopback")."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import ROOT, say
from spaces.cluster import RedisProcess, free_port
from spaces.sdk.tokens import Role, sign_token
from spaces.v1 import signing_key_pb2, signing_key_pb2_grpc, space_pb2, space_pb2_grpc

LOOPBACK = "127.0.0.1"


# --- processes ------------------------------------------------------------------------------


@dataclass
class Proc:
    """A child process whose output goes to a log file in the run's directory."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    address: str = ""
    metrics_port: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Cluster:
    """Owns every process of one benchmark run; ``close()`` stops them all."""

    admin_key: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="spaces-bench-")))
    procs: list[Proc] = field(default_factory=list)
    redis_url: str = ""
    _redis: RedisProcess | None = None
    log_level: str = "INFO"

    # --- redis ---------------------------------------------------------------------------

    def start_redis(self) -> int:
        """A private redis-server (the launcher `spaces cluster` uses); returns its pid."""
        directory = self.workdir / "redis"
        directory.mkdir(exist_ok=True)
        redis = RedisProcess(directory=directory).start()
        self._redis = redis
        self.redis_url = redis.url
        assert redis.proc is not None
        return int(redis.proc.pid)

    # --- spaces processes ------------------------------------------------------------------

    def spaces_env(self, grpc_port: int, metrics_port: int, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "SPACES_GRPC_ADDR": f"{LOOPBACK}:{grpc_port}",
                "SPACES_ADMIN_KEY": self.admin_key,
                "SPACES_METRICS_ADDR": f"{LOOPBACK}:{metrics_port}",
                "SPACES_ICE_BIND": LOOPBACK,
                "SPACES_LOG_LEVEL": self.log_level,
                "SPACES_MAX_PARTICIPANTS": "1000",
            }
        )
        if self.redis_url:
            env["SPACES_REDIS_URL"] = self.redis_url
        env.update(extra)
        return env

    def start_spaces(self, name: str, *args: str, **extra_env: str) -> Proc:
        """``spaces serve ...`` or ``spaces media-node``; returns once its gRPC health says
        SERVING."""
        grpc_port, metrics_port = free_port(), free_port()
        env = self.spaces_env(grpc_port, metrics_port, **extra_env)
        proc = self._spawn(name, [sys.executable, "-m", "spaces.cli", *args], env=env)
        proc.address = f"{LOOPBACK}:{grpc_port}"
        proc.metrics_port = metrics_port
        return proc

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None) -> Proc:
        log = self.workdir / f"{name}.log"
        handle = log.open("wb")
        popen = subprocess.Popen(
            argv,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
        )
        handle.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    async def wait_serving(self, proc: Proc, service: str = "", limit_s: float = 90.0) -> None:
        deadline = time.monotonic() + limit_s
        async with grpc.aio.insecure_channel(proc.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
                try:
                    reply = await stub.Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{proc.name} did not become ready:\n{proc.tail()}")

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        if self._redis is not None:
            self._redis.stop()
            self._redis = None
        if os.environ.get("SPACES_BENCH_KEEP_LOGS"):
            say(f"logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


# --- the admin API --------------------------------------------------------------------------


@dataclass
class SigningKey:
    id: str
    private_key: str

    def token(
        self, space_id: str, role: Role = "publisher", participant_id: str | None = None
    ) -> str:
        return sign_token(
            self.id, self.private_key, space_id, role=role, participant_id=participant_id
        )


class Admin:
    """SigningKeyService and SpaceService with the admin key."""

    def __init__(self, address: str, admin_key: str) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._metadata = (("authorization", f"Bearer {admin_key}"),)
        self._keys = signing_key_pb2_grpc.SigningKeyServiceStub(self._channel)
        self._spaces = space_pb2_grpc.SpaceServiceStub(self._channel)

    async def signing_key(self) -> SigningKey:
        reply = await self._keys.CreateSigningKey(
            signing_key_pb2.CreateSigningKeyRequest(), metadata=self._metadata, timeout=30
        )
        return SigningKey(reply.id, reply.private_key)

    async def space(self, max_participants: int = 0) -> str:
        reply = await self._spaces.CreateSpace(
            space_pb2.CreateSpaceRequest(max_participants=max_participants),
            metadata=self._metadata,
            timeout=30,
        )
        return str(reply.id)

    async def close(self) -> None:
        await self._channel.close(None)


# --- metrics --------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """A process's Prometheus text as {"name{labels}": value} (no # lines)."""
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            values[key] = float(value)
        except ValueError:
            continue
    return values


def metric(values: dict[str, float], name: str) -> float:
    """Sum of every series of ``name`` (all label sets)."""
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))
