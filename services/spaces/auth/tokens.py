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
from dataclasses import dataclass
from typing import Any

import jwt
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


@dataclass(frozen=True)
class TokenClaims:
    space_id: str
    key_id: str
    expires_at: int
    role: str
    participant_id: str | None
    """None: the server generates one, and the token may be used many times."""


def _b64_json(segment: str) -> dict[str, Any]:
    padded = segment + "=" * (-len(segment) % 4)
    try:
        value = json.loads(base64.urlsafe_b64decode(padded))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
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
    return UnverifiedToken(raw=token, key_id=key_id, space_id=space_id)


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


def verify(
    token: UnverifiedToken, record: SigningKeyRecord | None, cache: PublicKeyCache
) -> TokenClaims:
    """Check the signature and claims of a peeked token against its signing key record."""
    if record is None:
        raise errors.TokenUnknownKey()
    try:
        payload = jwt.decode(
            token.raw,
            key=cache.get(record.public_key_pem),
            algorithms=list(ALLOWED_ALGORITHMS),
            audience=AUDIENCE,
            leeway=EXP_LEEWAY_SECONDS,
            options={"require": ["exp", "aud", "sub"], "verify_signature": True},
        )
    except jwt.ExpiredSignatureError as exc:
        raise errors.TokenExpired() from exc
    except jwt.MissingRequiredClaimError as exc:
        raise errors.TokenMissingClaim(f'token is missing the "{exc.claim}" claim') from exc
    except jwt.InvalidAudienceError as exc:
        raise errors.TokenWrongAudience() from exc
    except jwt.InvalidAlgorithmError as exc:
        raise errors.TokenAlgorithmNotAllowed() from exc
    except jwt.InvalidSignatureError as exc:
        raise errors.TokenBadSignature() from exc
    except jwt.ImmatureSignatureError as exc:
        raise errors.TokenInvalidClaim("token is not valid yet (nbf or iat in the future)") from exc
    except jwt.DecodeError as exc:
        raise errors.MalformedToken() from exc
    except jwt.InvalidTokenError as exc:
        raise errors.InvalidToken(f"invalid token: {str(exc).lower()}") from exc

    role = payload.get("role", "publisher")
    if role not in ROLES:
        raise errors.TokenInvalidClaim('token "role" must be "publisher" or "subscriber"')
    participant_id = payload.get("participant_id")
    if participant_id is not None:
        if not isinstance(participant_id, str):
            raise errors.TokenInvalidClaim('token "participant_id" must be a string')
        ids.validate_participant_id(participant_id)
    exp = payload["exp"]
    if not isinstance(exp, int | float):
        raise errors.TokenInvalidClaim('token "exp" must be a number')
    return TokenClaims(
        space_id=payload["sub"],
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
