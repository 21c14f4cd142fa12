"""A private coturn (Debian's `turnserver`) on loopback, with the standard time-limited REST
credentials (`use-auth-secret`), for the TURN tests. `make test` installs coturn if missing."""

from __future__ import annotations

import os
import random
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

REALM = "spaces.test"


def turnserver_binary() -> str:
    path = shutil.which("turnserver") or "/usr/bin/turnserver"
    if not os.path.exists(path):
        raise RuntimeError("turnserver not found: install Debian's coturn package (make coturn)")
    return path


def udp_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stun_binding_answered(port: int, timeout: float = 0.2) -> bool:
    """Send a STUN Binding request; True if a Binding success response comes back."""
    transaction = secrets.token_bytes(12)
    request = struct.pack("!HHI", 0x0001, 0, 0x2112A442) + transaction
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(request, ("127.0.0.1", port))
            reply, _ = s.recvfrom(2048)
        except OSError:
            return False
    return len(reply) >= 20 and reply[:2] == b"\x01\x01" and reply[8:20] == transaction


class TurnServer:
    """coturn listening on 127.0.0.1 (UDP and TCP), relaying on 127.0.0.1 from a private port
    range, accepting credentials minted with ``secret``."""

    def __init__(self, secret: str | None = None) -> None:
        self.secret = secret or secrets.token_urlsafe(24)
        self.dir = Path(tempfile.mkdtemp(prefix="spaces-turn-"))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=udp"

    @property
    def log_path(self) -> Path:
        return self.dir / "turnserver.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 10.0) -> TurnServer:
        for _ in range(5):
            self.port = random.randrange(20000, 30000)
            relay_min = random.randrange(31000, 39000)
            if not udp_port_free(self.port):
                continue
            log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
            self.proc = subprocess.Popen(
                [
                    turnserver_binary(),
                    "-n",  # no configuration file: everything is on this command line
                    "--listening-ip=127.0.0.1",
                    "--relay-ip=127.0.0.1",
                    f"--listening-port={self.port}",
                    f"--min-port={relay_min}",
                    f"--max-port={relay_min + 200}",
                    "--use-auth-secret",
                    f"--static-auth-secret={self.secret}",
                    f"--realm={REALM}",
                    "--fingerprint",
                    "--no-tls",
                    "--no-dtls",
                    "--no-cli",
                    "--no-multicast-peers",
                    # Tests relay between peers on 127.0.0.1, which coturn refuses by default.
                    "--allow-loopback-peers",
                    "--no-software-attribute",
                    f"--pidfile={self.dir / 'turnserver.pid'}",
                    f"--db={self.dir / 'turndb'}",
                    "--log-file=stdout",
                    "--simple-log",
                    "--verbose",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if stun_binding_answered(self.port):
                    return self
                time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"turnserver did not start:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
