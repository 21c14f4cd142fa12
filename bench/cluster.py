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
import socket
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
from spaces.sdk.tokens import Role, sign_token
from spaces.v1 import signing_key_pb2, signing_key_pb2_grpc, space_pb2, space_pb2_grpc

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def find_redis_server() -> str:
    path = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(path):
        raise RuntimeError("redis-server is not installed: run `make redis` (Debian's package)")
    return path


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
    log_level: str = "WARNING"

    # --- redis ---------------------------------------------------------------------------

    def start_redis(self) -> Proc:
        port = free_port()
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True)
        proc = self._spawn(
            "redis",
            [
                find_redis_server(),
                "--port",
                str(port),
                "--bind",
                LOOPBACK,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(data),
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
            ],
            env=None,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"redis-server exited:\n{proc.tail()}")
            try:
                with socket.create_connection((LOOPBACK, port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                time.sleep(0.02)
        else:
            raise RuntimeError("redis-server did not start")
        self.redis_url = f"redis://{LOOPBACK}:{port}/0"
        proc.address = f"{LOOPBACK}:{port}"
        return proc

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

    async def wait_serving(self, proc: Proc, service: str = "", timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
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
        return sign_token(self.id, self.private_key, space_id, role=role, participant_id=participant_id)


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
        await self._channel.close()


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
