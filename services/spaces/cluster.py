"""`spaces cluster` (`make cluster`): a whole distributed deployment as local processes.

A private Redis, two API processes (each serving control, auth, presence and webhooks, so one
address answers every admin call and every Join) and two media nodes, each a separate `spaces`
process with its own port. With ``--split`` each API service runs as its own pair of processes
instead, as the Kubernetes manifests deploy them. It prints the addresses and the admin key, and
runs until interrupted. The fault tests drive the same class: kill a node, restart Redis, drain
a node.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    path = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(path):
        raise RuntimeError("redis-server not found: install Debian's redis-server package")
    return path


class RedisProcess:
    """A private redis-server on a loopback port. ``restart()`` comes back empty (no
    persistence), which is the worst case the services must survive."""

    def __init__(
        self, port: int = 0, directory: Path | None = None, *, appendonly: bool = False
    ) -> None:
        self.port = port or free_port()
        self.dir = directory or Path(tempfile.mkdtemp(prefix="spaces-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.appendonly = appendonly
        """Persist to an append-only file, so that a graceful restart keeps the data (as
        production runs it); without it a restart comes back empty."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisProcess:
        for _ in range(5):
            self.proc = subprocess.Popen(
                [
                    redis_server_binary(),
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "yes" if self.appendonly else "no",
                    "--dir",
                    str(self.dir),
                    "--protected-mode",
                    "no",
                    "--loglevel",
                    "warning",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._ready(timeout):
                return self
            self.stop()
            self.port = free_port()  # lost a race for the port
        raise RuntimeError("redis-server did not start")

    def _ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return True
            except OSError:
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, graceful: bool = False) -> None:
        """Stop (SIGKILL, or SIGTERM and wait when ``graceful``: Redis then writes its
        append-only file out) and start again on the same port."""
        if graceful and self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class ServiceProcess:
    name: str
    args: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    http_port: int = 0
    """The HTTP port of a signaling service (0 for the others)."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spaces.cli", *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


API_SERVICES = ("control", "auth", "presence", "webhooks")


@dataclass
class LocalCluster:
    """Redis + API replicas + media nodes, as separate processes on this machine."""

    replicas: int = 2
    nodes: int = 2
    split: bool = False
    """One pair of processes per API service (as on Kubernetes) instead of API processes that
    each serve all of them."""
    redis_appendonly: bool = False
    """Redis with an append-only file (a graceful restart keeps the data)."""
    broadcasters: int = 0
    signals: int = 0
    """Signaling services for browsers (`spaces serve --services signal`), reaching presence
    through the first API (or presence) process."""
    base_port: int = 0
    """0 picks free ports; otherwise ports are consecutive from here."""
    admin_key: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra SPACES_* settings for every process (e.g. shorter leases in tests)."""
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="spaces-cluster-")))
    redis: RedisProcess | None = None
    services: list[ServiceProcess] = field(default_factory=list)
    _next_port: int = 0

    def _port(self) -> int:
        if not self.base_port:
            return free_port()
        port = self.base_port + self._next_port
        self._next_port += 1
        return port

    def _env(self, port: int, **extra: str) -> dict[str, str]:
        assert self.redis is not None
        return {
            **os.environ,
            "SPACES_REDIS_URL": self.redis.url,
            "SPACES_ADMIN_KEY": self.admin_key,
            "SPACES_GRPC_ADDR": f"127.0.0.1:{port}",
            "SPACES_ICE_BIND": "127.0.0.1",
            "SPACES_METRICS_ADDR": f"127.0.0.1:{self._port()}",
            **self.env,
            **extra,
        }

    def start(self) -> LocalCluster:
        redis_port = self._port()
        (self.workdir / "redis").mkdir(exist_ok=True)
        self.redis = RedisProcess(
            redis_port, self.workdir / "redis", appendonly=self.redis_appendonly
        ).start()
        if self.split:
            for service in API_SERVICES:
                for i in range(self.replicas):
                    self.add(f"{service}-{i}", ["serve", "--services", service])
        else:
            for i in range(self.replicas):
                self.add(f"api-{i}", ["serve", "--services", ",".join(API_SERVICES)])
        for i in range(self.nodes):
            self.add_node(f"media-{i}")
        for i in range(self.broadcasters):
            self.add_broadcaster(f"broadcaster-{i}")
        for i in range(self.signals):
            self.add_signal(f"signal-{i}")
        return self

    def add_signal(self, name: str) -> ServiceProcess:
        presence = self.api_addresses("presence")[0]
        http = self._port()
        process = self.add(
            name,
            ["serve", "--services", "signal"],
            SPACES_PRESENCE_ADDR=presence,
            SPACES_SIGNAL_ADDR=f"127.0.0.1:{http}",
        )
        process.http_port = http
        return process

    def signal_urls(self) -> list[str]:
        return [
            f"http://127.0.0.1:{s.http_port}/" for s in self.services if s.alive() and s.http_port
        ]

    def add_broadcaster(self, name: str, **extra_env: str) -> ServiceProcess:
        return self.add(name, ["broadcaster"], SPACES_BROADCASTER_ID=name, **extra_env)

    def add(self, name: str, args: list[str], **extra_env: str) -> ServiceProcess:
        port = self._port()
        process = ServiceProcess(
            name, args, self._env(port, **extra_env), port, self.workdir / f"{name}.log"
        )
        process.start()
        self.services.append(process)
        return process

    def add_node(self, name: str) -> ServiceProcess:
        return self.add(name, ["media-node"], SPACES_NODE_ID=name)

    def by_name(self, name: str) -> ServiceProcess:
        return next(s for s in self.services if s.name == name)

    def addresses(self, prefix: str) -> list[str]:
        return [s.address for s in self.services if s.name.startswith(prefix) and s.alive()]

    def api_addresses(self, service: str = "") -> list[str]:
        """Live processes that serve ``service`` (any API service when empty)."""

        def serves(name: str) -> bool:
            role = name.rsplit("-", 1)[0]
            return role == "api" or (role == service if service else role in API_SERVICES)

        return [s.address for s in self.services if s.alive() and serves(s.name)]

    def wait_ready(self, timeout: float = 60.0) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        for service in self.services:
            with grpc.insecure_channel(service.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while True:
                    if not service.alive():
                        raise RuntimeError(f"{service.name} exited: see {service.log_path}")
                    try:
                        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.RpcError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{service.name} did not become ready")
                    time.sleep(0.1)

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        if self.redis is not None:
            self.redis.close()

    def describe(self) -> str:
        assert self.redis is not None
        lines = []
        if not self.split:
            lines.append(
                f"API address  {self.api_addresses()[0]}   "
                "(control, auth, presence and webhooks: use it for everything)"
            )
        for url in self.signal_urls():
            lines.append(f"browsers     {url}   (WebSocket {url.replace('http', 'ws', 1)}v1)")
        lines += [f"redis        {self.redis.url}", f"admin key    {self.admin_key}"]
        for service in self.services:
            lines.append(f"{service.name:<12} {service.address}   (log {service.log_path})")
        return "\n".join(lines)


def run_cluster(args: argparse.Namespace) -> int:
    cluster = LocalCluster(
        replicas=args.replicas,
        nodes=args.nodes,
        broadcasters=args.broadcasters,
        signals=args.signals,
        base_port=args.base_port,
        split=args.split,
    )
    stopping = False

    def interrupt(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        cluster.start()
        cluster.wait_ready()
        print(cluster.describe(), flush=True)
        print(
            "\nadmin calls and joins go to "
            + (
                "the API address (or any api-N replica). "
                if not cluster.split
                else "the process serving that service (control-N, auth-N, presence-N, "
                "webhooks-N). "
            )
            + "Ctrl-C stops everything.",
            flush=True,
        )
        while not stopping:
            for service in cluster.services:
                if not service.alive():
                    print(f"{service.name} exited (see {service.log_path})", flush=True)
                    stopping = True
            time.sleep(0.5)
    finally:
        cluster.stop()
    return 0
