"""Opaque page tokens over the stores' creation-sequence cursors."""

from __future__ import annotations

import base64

from spaces import errors

DEFAULT_LIMIT = 25
MAX_LIMIT = 100


def page_limit(limit: int) -> int:
    if limit == 0:
        return DEFAULT_LIMIT
    if limit > MAX_LIMIT:
        raise errors.InvalidLimit(f"limit must be at most {MAX_LIMIT}")
    return limit


def encode_cursor(seq: int | None) -> str:
    if seq is None:
        return ""
    return base64.urlsafe_b64encode(f"v1:{seq}".encode()).decode().rstrip("=")


def decode_cursor(token: str) -> int:
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, _, seq = raw.partition(":")
        if version != "v1":
            raise ValueError(version)
        value = int(seq)
        if value < 0:
            raise ValueError(seq)
        return value
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.InvalidPageToken() from exc
