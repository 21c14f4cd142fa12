"""A real Redis Cluster on loopback: ``redis-server --cluster-enabled yes`` per node, then
``redis-cli --cluster create``. For the cluster contract run (three primaries) and the failover
tests (three primaries with a replica each)."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from spaces.cluster import redis_server_binary


def redis_cli_binary() -> str:
    path = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    if not Path(path).exists():
        raise RuntimeError("redis-cli not found: install Debian's redis-tools package")
    return path


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = random.randint(20_000, 45_000)
        if _free(port) and _free(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


@dataclass
class ClusterNode:
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class RedisClusterProcess:
    masters: int = 3
    replicas: int = 0
    """Replicas per primary."""
    node_timeout_ms: int = 5_000
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="spaces-rcluster-")))
    nodes: list[ClusterNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(n.address for n in self.nodes[: self.masters])

    def start(self) -> RedisClusterProcess:
        count = self.masters * (1 + self.replicas)
        self.nodes = [ClusterNode(cluster_port()) for _ in range(count)]
        for node in self.nodes:
            self._launch(node)
        for node in self.nodes:
            self._wait_ping(node)
        subprocess.run(
            [
                redis_cli_binary(),
                "--cluster",
                "create",
                *(n.address for n in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_healthy()
        for primary in self.primaries() if self.replicas else []:
            self.wait_replicated(primary)
        return self

    def _launch(self, node: ClusterNode) -> None:
        node.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(node.port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self.dir / f"nodes-{node.port}.conf"),
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
                "--logfile",
                str(self.dir / f"{node.port}.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _wait_ping(self, node: ClusterNode, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.cli(node, "PING").strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis cluster node {node.address} did not start")

    def cli(self, node: ClusterNode, *args: str) -> str:
        result = subprocess.run(
            [redis_cli_binary(), "-p", str(node.port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return result.stdout

    def command(self, node: ClusterNode, *args: str) -> Any:
        client = redis.Redis(port=node.port, socket_timeout=5, decode_responses=True)
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def alive(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def primaries(self) -> list[ClusterNode]:
        """The nodes that serve slots, as the first live node that answers sees it."""
        for node in self.alive():
            try:
                slots = self.command(node, "CLUSTER", "SLOTS")
            except redis.RedisError:
                continue
            ports = {int(entry[2][1]) for entry in slots}
            return [n for n in self.nodes if n.port in ports]
        return []

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every live node reports cluster_state:ok and all 16384 slots served."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [self.cli(n, "CLUSTER", "INFO") for n in self.alive()]
            if states and all(
                "cluster_state:ok" in s and "cluster_slots_ok:16384" in s for s in states
            ):
                return
            time.sleep(0.1)
        raise RuntimeError("redis cluster did not become healthy")

    def wait_replicated(self, primary: ClusterNode, timeout: float = 30.0) -> None:
        """Until every replica of ``primary`` has applied each write ``primary`` had taken when
        this was called, so that killing ``primary`` then loses nothing.

        Not ``WAIT``: from a connection that wrote nothing it waits for no offset at all, and a
        replica counts as soon as ``primary`` has streamed it the RDB of its first sync, before
        the replica has loaded it or received the writes queued meanwhile. A kill in that
        window promotes a replica that lacks them (an empty one, if it was the first sync)."""
        info = self.command(primary, "INFO", "replication")
        target = int(info["master_repl_offset"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.command(primary, "INFO", "replication")
            listed = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            replicas = [n for n in self.nodes if n.port in {int(v["port"]) for v in listed}]
            if len(replicas) == int(info.get("connected_slaves", 0)) > 0:
                states = [self.command(n, "INFO", "replication") for n in replicas]
                if all(
                    s.get("master_link_status") == "up"
                    and not int(s.get("master_sync_in_progress", 0))
                    and int(s.get("slave_repl_offset", -1)) >= target
                    for s in states
                ):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"the replicas of {primary.address} did not catch up")

    def kill(self, node: ClusterNode) -> None:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()

    def wait_failover(self, dead: ClusterNode, timeout: float = 60.0) -> None:
        """Until a replica of ``dead`` serves its slots and the cluster is healthy again."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            primaries = self.primaries()
            alive = self.alive()
            if (
                len(primaries) == self.masters
                and dead not in primaries
                and all(n in alive for n in primaries)
            ):
                try:
                    self.wait_healthy(timeout=2.0)
                    return
                except RuntimeError:
                    pass
            time.sleep(0.1)
        raise RuntimeError("no replica took over from the killed primary")

    def flush(self) -> None:
        for node in self.primaries():
            self.command(node, "FLUSHALL")

    def close(self) -> None:
        for node in self.nodes:
            self.kill(node)
        shutil.rmtree(self.dir, ignore_errors=True)
