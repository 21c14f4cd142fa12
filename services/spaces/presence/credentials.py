"""Tickets and resume secrets: random secrets that also name their space and connection.

``<space_id>.<connection_id>.<random>``. The store keeps only a SHA-256 of each, so a leaked
Redis dump cannot be replayed; the ids in the clear let the holder's request find its record.
"""

from __future__ import annotations

from dataclasses import dataclass

from spaces import ids


@dataclass(frozen=True)
class Credential:
    space_id: str
    connection_id: str
    secret: str

    @property
    def hash(self) -> str:
        return ids.sha256_hex(self.secret)


def issue(space_id: str, connection_id: str) -> Credential:
    return Credential(space_id, connection_id, f"{space_id}.{connection_id}.{ids.new_secret()}")


def parse(secret: str) -> Credential | None:
    """None when the string cannot be one of ours."""
    if len(secret) > 256:
        return None
    parts = secret.split(".")
    if len(parts) != 3 or not all(ids.is_valid_id(p) for p in parts):
        return None
    return Credential(parts[0], parts[1], secret)
