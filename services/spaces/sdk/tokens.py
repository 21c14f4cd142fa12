"""Server-side token signing, for the customer's backend.

The claims are exactly the Mux Spaces ones: ``sub`` (space id), ``aud="rt"``, ``kid``, ``exp``,
and optionally ``role`` and ``participant_id``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import time
from typing import Literal

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

Role = Literal["publisher", "subscriber"]
DEFAULT_TTL_SECONDS = 3600


def load_private_key(private_key: str | bytes) -> bytes:
    """Accept the base64 PEM that CreateSigningKey returns, or a plain PEM."""
    raw = private_key.encode() if isinstance(private_key, str) else private_key
    raw = raw.strip()
    if raw.startswith(b"-----BEGIN"):
        return raw
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(
            "private_key must be a PEM or the base64 PEM from CreateSigningKey"
        ) from exc
    if not decoded.startswith(b"-----BEGIN"):
        raise ValueError("private_key must be a PEM or the base64 PEM from CreateSigningKey")
    return decoded


@functools.lru_cache(maxsize=64)
def _signing_key(private_key: str | bytes) -> RSAPrivateKey:
    """Parsing and checking an RSA key costs ~50 ms; a backend signs many tokens per key."""
    key = load_pem_private_key(load_private_key(private_key), password=None)
    if not isinstance(key, RSAPrivateKey):
        raise ValueError("private_key must be an RSA key")
    return key


def sign_token(
    key_id: str,
    private_key: str | bytes,
    space_id: str,
    role: Role = "publisher",
    participant_id: str | None = None,
    ttl: int = DEFAULT_TTL_SECONDS,
    now: float | None = None,
) -> str:
    """A join token for ``space_id``, valid for ``ttl`` seconds.

    Without ``participant_id`` the server generates one per connection and the token may be
    used many times; with it, a second live connection with that id is refused.
    """
    if role not in ("publisher", "subscriber"):
        raise ValueError('role must be "publisher" or "subscriber"')
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    claims: dict[str, object] = {
        "sub": space_id,
        "aud": "rt",
        "kid": key_id,
        "exp": int((time.time() if now is None else now) + ttl),
        "role": role,
    }
    if participant_id is not None:
        claims["participant_id"] = participant_id
    return jwt.encode(claims, _signing_key(private_key), algorithm="RS256", headers={"kid": key_id})
