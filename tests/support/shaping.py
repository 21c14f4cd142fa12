"""Shape one UDP destination port on loopback with tc (inside the tests' private network
namespace, where ``make test`` runs pytest): a subscriber's link, for congestion tests.

An HTB root sends everything to a class at loopback speed, except packets to the shaped port,
which a u32 filter sends to a class limited to the given rate, with a short packet queue as a
real bottleneck has. (This machine's kernel has no netem or prio qdisc; HTB, pfifo and u32 are
what it has.)"""

from __future__ import annotations

import os
import subprocess

UNSHAPED = "20gbit"


def _tc(*args: str) -> None:
    subprocess.run(["tc", *args], check=True, capture_output=True, timeout=10)


class LinkShaper:
    def __init__(self, device: str = "lo") -> None:
        if os.environ.get("SPACES_IN_NETNS") != "1":
            raise RuntimeError("link shaping needs the tests' network namespace (tests/in-netns)")
        self.device = device
        self.port = 0
        _tc("qdisc", "add", "dev", device, "root", "handle", "1:", "htb", "default", "10")
        _tc(
            "class",
            "add",
            "dev",
            device,
            "parent",
            "1:",
            "classid",
            "1:10",
            "htb",
            "rate",
            UNSHAPED,
            "burst",
            "1mb",
            "cburst",
            "1mb",
        )

    def limit(self, port: int, rate_kbit: int, queue_packets: int = 30) -> None:
        """Limit what is sent to ``port`` to ``rate_kbit`` (again: change the rate)."""
        rate = f"{rate_kbit}kbit"
        if self.port:
            _tc(
                "class",
                "change",
                "dev",
                self.device,
                "parent",
                "1:",
                "classid",
                "1:20",
                "htb",
                "rate",
                rate,
                "ceil",
                rate,
            )
            return
        _tc(
            "class",
            "add",
            "dev",
            self.device,
            "parent",
            "1:",
            "classid",
            "1:20",
            "htb",
            "rate",
            rate,
            "ceil",
            rate,
        )
        _tc(
            "qdisc",
            "add",
            "dev",
            self.device,
            "parent",
            "1:20",
            "handle",
            "20:",
            "pfifo",
            "limit",
            str(queue_packets),
        )
        _tc(
            "filter",
            "add",
            "dev",
            self.device,
            "parent",
            "1:",
            "protocol",
            "ip",
            "prio",
            "1",
            "u32",
            "match",
            "ip",
            "protocol",
            "17",
            "0xff",
            "match",
            "ip",
            "dport",
            str(port),
            "0xffff",
            "flowid",
            "1:20",
        )
        self.port = port

    def lift(self) -> None:
        """Unshaped again."""
        if self.port:
            _tc(
                "class",
                "change",
                "dev",
                self.device,
                "parent",
                "1:",
                "classid",
                "1:20",
                "htb",
                "rate",
                UNSHAPED,
                "ceil",
                UNSHAPED,
                "burst",
                "1mb",
                "cburst",
                "1mb",
            )

    def close(self) -> None:
        subprocess.run(
            ["tc", "qdisc", "del", "dev", self.device, "root"],
            check=False,
            capture_output=True,
            timeout=10,
        )
