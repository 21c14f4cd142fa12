"""Identifier and secret generation, and validation of ids that arrive from clients."""

from __future__ import annotations

import hashlib
import re
import secrets

from spaces import errors

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_PARTICIPANT_ID_CHARS = 255


def _random_id(length: int) -> str:
    # 62 symbols from the OS's CSPRNG; rejecting bytes >= 248 keeps every symbol equally likely.
    out: list[str] = []
    while len(out) < length:
        out.extend(_ALPHABET[b % 62] for b in secrets.token_bytes(length * 2) if b < 248)
    return "".join(out[:length])


def new_space_id() -> str:
    return _random_id(32)


def new_signing_key_id() -> str:
    return _random_id(32)


def new_connection_id() -> str:
    return "c" + _random_id(23)


def new_participant_id() -> str:
    return "p" + _random_id(23)


def new_session_id() -> str:
    return _random_id(32)


def new_node_suffix() -> str:
    return _random_id(6)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def is_valid_id(value: str) -> bool:
    return bool(_ID_RE.match(value))


def validate_id(value: str, what: str) -> str:
    """Ids we generate are [A-Za-z0-9_-]{1,64}; anything else cannot exist."""
    if not value:
        raise errors.InvalidId(f"missing {what} id")
    if not _ID_RE.match(value):
        raise errors.InvalidId(f"malformed {what} id")
    return value


def validate_participant_id(value: str) -> str:
    """Customer-chosen participant ids: 1..255 printable characters."""
    if not value or len(value) > MAX_PARTICIPANT_ID_CHARS or not value.isprintable():
        raise errors.TokenInvalidClaim("token participant_id must be 1 to 255 printable characters")
    return value


def new_webhook_endpoint_id() -> str:
    return _random_id(32)


def new_broadcast_id() -> str:
    return "b" + _random_id(23)
