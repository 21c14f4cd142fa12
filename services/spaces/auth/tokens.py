"""JWT verification for joins: the library presence and media nodes call.

The contract (DESIGN.md, "The JWT"): RS256 only; ``aud`` must be ``"rt"``; ``exp`` is required,
with ``EXP_LEEWAY_SECONDS`` of clock skew; ``kid`` is read from the header or, as in Mux's own
samples, the payload; the key must exist and not be revoked; ``role`` defaults to publisher.
Every failure raises a catalogued ``InvalidToken`` subclass (gRPC UNAUTHENTICATED).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from spaces import errors, ids
from spaces.lru import Lru
from spaces.store.base import SigningKeyRecord, Store

ALLOWED_ALGORITHMS = ("RS256",)
AUDIENCE = "rt"
EXP_LEEWAY_SECONDS = 10
"""Clock skew tolerated between the customer's server and ours."""
MAX_TOKEN_BYTES = 8 * 1024
ROLES = ("publisher", "subscriber")


@dataclass(frozen=True)
class UnverifiedToken:
    """What can be read before the signature is checked: enough to fetch the key."""

    raw: str
    key_id: str
    space_id: str
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes


@dataclass(frozen=True)
class TokenClaims:
    space_id: str
    key_id: str
    expires_at: int
    role: str
    participant_id: str | None
    """None: the server generates one, and the token may be used many times."""


def _b64(segment: str) -> bytes:
    if "=" in segment:
        raise errors.MalformedToken()
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise errors.MalformedToken() from exc


def _b64_json(segment: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64(segment))
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.MalformedToken() from exc
    if not isinstance(value, dict):
        raise errors.MalformedToken()
    return value


def peek(token: str) -> UnverifiedToken:
    """Parse the header and payload without trusting them, refusing what can never verify."""
    if not token:
        raise errors.MalformedToken("missing token")
    if len(token) > MAX_TOKEN_BYTES:
        raise errors.TokenTooLarge()
    parts = token.split(".")
    if len(parts) != 3:
        raise errors.MalformedToken()
    header = _b64_json(parts[0])
    payload = _b64_json(parts[1])
    if header.get("alg") not in ALLOWED_ALGORITHMS:
        raise errors.TokenAlgorithmNotAllowed()
    key_id = header.get("kid") or payload.get("kid")
    if not key_id or not isinstance(key_id, str):
        raise errors.TokenMissingKeyId()
    if not ids.is_valid_id(key_id):
        raise errors.TokenUnknownKey()
    space_id = payload.get("sub")
    if not isinstance(space_id, str) or not space_id:
        raise errors.TokenMissingClaim('token is missing the "sub" claim (the space id)')
    if not ids.is_valid_id(space_id):
        raise errors.TokenInvalidClaim('token "sub" is not a space id')
    return UnverifiedToken(
        raw=token,
        key_id=key_id,
        space_id=space_id,
        payload=payload,
        signing_input=f"{parts[0]}.{parts[1]}".encode("ascii", "replace"),
        signature=_b64(parts[2]),
    )


class PublicKeyCache:
    """Parsed public keys by PEM, so a join costs a signature check, not a PEM parse. Keyed by
    content: revocation is decided by the store lookup, never by this cache."""

    def __init__(self, size: int = 1024) -> None:
        self._keys: Lru[bytes, RSAPublicKey] = Lru(size)

    def get(self, pem: bytes) -> RSAPublicKey:
        key = self._keys.get(pem)
        if key is None:
            loaded = load_pem_public_key(pem)
            if not isinstance(loaded, RSAPublicKey):
                raise errors.TokenUnknownKey()
            key = loaded
            self._keys.put(pem, key)
        return key


def _number(payload: dict[str, Any], claim: str) -> float | None:
    value = payload.get(claim)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise errors.TokenInvalidClaim(f'token "{claim}" must be a number')
    return float(value)


def verify(
    token: UnverifiedToken,
    record: SigningKeyRecord | None,
    cache: PublicKeyCache,
    now: float | None = None,
) -> TokenClaims:
    """Check the RS256 signature and the claims of a peeked token against its signing key.
    (Done here rather than through PyJWT: the token is already parsed, and a join's budget
    is small.)"""
    if record is None:
        raise errors.TokenUnknownKey()
    try:
        cache.get(record.public_key_pem).verify(
            token.signature, token.signing_input, padding.PKCS1v15(), hashes.SHA256()
        )
    except InvalidSignature as exc:
        raise errors.TokenBadSignature() from exc
    payload = token.payload
    now = time.time() if now is None else now
    exp = _number(payload, "exp")
    if exp is None:
        raise errors.TokenMissingClaim('token is missing the "exp" claim')
    if exp + EXP_LEEWAY_SECONDS < now:
        raise errors.TokenExpired()
    for claim in ("nbf", "iat"):
        moment = _number(payload, claim)
        if moment is not None and moment - EXP_LEEWAY_SECONDS > now:
            raise errors.TokenInvalidClaim("token is not valid yet (nbf or iat in the future)")
    audience = payload.get("aud")
    if audience is None:
        raise errors.TokenMissingClaim('token is missing the "aud" claim')
    if audience != AUDIENCE and not (isinstance(audience, list) and AUDIENCE in audience):
        raise errors.TokenWrongAudience()
    role = payload.get("role", "publisher")
    if role not in ROLES:
        raise errors.TokenInvalidClaim('token "role" must be "publisher" or "subscriber"')
    participant_id = payload.get("participant_id")
    if participant_id is not None:
        if not isinstance(participant_id, str):
            raise errors.TokenInvalidClaim('token "participant_id" must be a string')
        ids.validate_participant_id(participant_id)
    return TokenClaims(
        space_id=token.space_id,
        key_id=token.key_id,
        expires_at=int(exp),
        role=role,
        participant_id=participant_id,
    )


class TokenVerifier:
    """Verifies join tokens with keys read from the store on every call, so a deleted key stops
    working at once."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.cache = PublicKeyCache()

    async def verify(self, token: str) -> TokenClaims:
        peeked = peek(token)
        record = await self._store.get_signing_key(peeked.key_id)
        return verify(peeked, record, self.cache)
