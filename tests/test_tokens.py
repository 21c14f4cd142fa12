"""The token library: what verifies, and every way a token is refused (with a catalogued error)."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from spaces import errors
from spaces.auth import tokens
from spaces.auth.keys import generate_signing_key
from spaces.sdk.tokens import load_private_key, sign_token
from spaces.store.base import SigningKeyRecord
from spaces.store.memory import MemoryStore

SPACE = "SpaceIdForTokenTests0000000000001"


@pytest.fixture
async def keyed_store() -> tuple[MemoryStore, str, str, bytes]:
    store = MemoryStore()
    generated = generate_signing_key()
    await store.create_signing_key("key1", generated.public_key_pem)
    return store, "key1", generated.private_key_b64, generated.public_key_pem


def b64url(data: dict[str, object] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def test_signed_token_verifies_with_exact_claims(keyed_store: tuple) -> None:
    store, kid, private, _ = keyed_store
    token = sign_token(kid, private, SPACE, role="subscriber", participant_id="alice", ttl=60)
    claims = await tokens.TokenVerifier(store).verify(token)
    assert claims.space_id == SPACE
    assert claims.key_id == kid
    assert claims.role == "subscriber"
    assert claims.participant_id == "alice"
    payload = jwt.decode(token, options={"verify_signature": False})
    assert set(payload) == {"sub", "aud", "kid", "exp", "role", "participant_id"}
    assert payload["aud"] == "rt"


async def test_role_defaults_to_publisher_and_participant_id_is_optional(
    keyed_store: tuple,
) -> None:
    store, kid, private, _ = keyed_store
    pem = load_private_key(private)
    token = jwt.encode(
        {"sub": SPACE, "aud": "rt", "exp": int(time.time()) + 60, "kid": kid}, pem, "RS256"
    )
    claims = await tokens.TokenVerifier(store).verify(token)
    assert claims.role == "publisher"
    assert claims.participant_id is None


async def test_plain_pyjwt_token_from_the_seed_example_verifies(keyed_store: tuple) -> None:
    """Mux's own samples: kid in the payload, not the header, signed by plain PyJWT."""
    store, kid, private, _ = keyed_store
    payload = {
        "sub": SPACE,
        "aud": "rt",
        "kid": kid,
        "exp": int(time.time()) + 600,
        "role": "publisher",
        "participant_id": "MY_CUSTOM_ID",
    }
    token = jwt.encode(payload, base64.b64decode(private), algorithm="RS256")
    assert "kid" not in jwt.get_unverified_header(token)
    claims = await tokens.TokenVerifier(store).verify(token)
    assert claims.participant_id == "MY_CUSTOM_ID"


async def rejects(store: MemoryStore, token: str, error: type[errors.SpacesError]) -> str:
    with pytest.raises(error) as info:
        await tokens.TokenVerifier(store).verify(token)
    assert isinstance(info.value, errors.Unauthenticated)
    message = info.value.message
    # Short, lower-case sentences (acronyms such as RS256 and JWT keep their case).
    assert message[0].islower()
    assert len(message) < 100
    return message


async def test_alg_none_is_refused(keyed_store: tuple) -> None:
    store, kid, _, _ = keyed_store
    token = (
        b64url({"alg": "none", "typ": "JWT", "kid": kid})
        + "."
        + b64url({"sub": SPACE, "aud": "rt", "exp": int(time.time()) + 60})
        + "."
    )
    await rejects(store, token, errors.TokenAlgorithmNotAllowed)


async def test_hs256_signed_with_the_public_key_is_refused(keyed_store: tuple) -> None:
    store, kid, _, public_pem = keyed_store
    header = b64url({"alg": "HS256", "typ": "JWT", "kid": kid})
    body = b64url({"sub": SPACE, "aud": "rt", "exp": int(time.time()) + 60})
    import hashlib
    import hmac

    signature = hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    token = f"{header}.{body}.{b64url(signature)}"
    await rejects(store, token, errors.TokenAlgorithmNotAllowed)


@pytest.mark.parametrize("aud", ["other", None])
async def test_wrong_or_missing_audience_is_refused(keyed_store: tuple, aud: str | None) -> None:
    store, kid, private, _ = keyed_store
    payload: dict[str, object] = {"sub": SPACE, "kid": kid, "exp": int(time.time()) + 60}
    if aud:
        payload["aud"] = aud
    token = jwt.encode(payload, load_private_key(private), "RS256")
    error = errors.TokenWrongAudience if aud else errors.TokenMissingClaim
    message = await rejects(store, token, error)
    assert "aud" in message


async def test_expired_token_is_refused_beyond_the_leeway(keyed_store: tuple) -> None:
    store, kid, private, _ = keyed_store
    expired = sign_token(kid, private, SPACE, now=time.time() - 3600, ttl=60)
    await rejects(store, expired, errors.TokenExpired)
    # Within the named leeway, clock skew is tolerated.
    skewed = sign_token(
        kid, private, SPACE, now=time.time() - 60 - tokens.EXP_LEEWAY_SECONDS + 3, ttl=60
    )
    assert (await tokens.TokenVerifier(store).verify(skewed)).space_id == SPACE


async def test_token_without_exp_is_refused(keyed_store: tuple) -> None:
    store, kid, private, _ = keyed_store
    token = jwt.encode({"sub": SPACE, "aud": "rt", "kid": kid}, load_private_key(private), "RS256")
    message = await rejects(store, token, errors.TokenMissingClaim)
    assert "exp" in message


async def test_unknown_kid_is_refused(keyed_store: tuple) -> None:
    store, _, private, _ = keyed_store
    await rejects(store, sign_token("nosuchkey", private, SPACE), errors.TokenUnknownKey)


async def test_revoked_kid_is_refused(keyed_store: tuple) -> None:
    store, kid, private, _ = keyed_store
    token = sign_token(kid, private, SPACE)
    assert (await tokens.TokenVerifier(store).verify(token)).key_id == kid
    await store.delete_signing_key(kid)
    await rejects(store, token, errors.TokenUnknownKey)


async def test_another_keys_signature_is_refused(keyed_store: tuple) -> None:
    store, kid, _, _ = keyed_store
    other = generate_signing_key()
    await rejects(store, sign_token(kid, other.private_key_b64, SPACE), errors.TokenBadSignature)


async def test_missing_kid_is_refused(keyed_store: tuple) -> None:
    store, _, private, _ = keyed_store
    token = jwt.encode(
        {"sub": SPACE, "aud": "rt", "exp": int(time.time()) + 60},
        load_private_key(private),
        "RS256",
    )
    await rejects(store, token, errors.TokenMissingKeyId)


@pytest.mark.parametrize(
    "garbage",
    ["", "not-a-jwt", "a.b.c", "....", "eyJhbGciOiJSUzI1NiJ9.e30", "\x00\x01\x02", "é.é.é"],
)
async def test_garbage_is_refused(keyed_store: tuple, garbage: str) -> None:
    store, _, _, _ = keyed_store
    await rejects(store, garbage, errors.InvalidToken)


async def test_a_one_megabyte_string_is_refused_without_parsing(keyed_store: tuple) -> None:
    store, _, _, _ = keyed_store
    started = time.perf_counter()
    await rejects(store, "a" * (1 << 20), errors.TokenTooLarge)
    assert time.perf_counter() - started < 1.0


async def test_invalid_role_and_participant_id_claims_are_refused(keyed_store: tuple) -> None:
    store, kid, private, _ = keyed_store
    pem = load_private_key(private)
    base = {"sub": SPACE, "aud": "rt", "kid": kid, "exp": int(time.time()) + 60}
    await rejects(
        store, jwt.encode({**base, "role": "admin"}, pem, "RS256"), errors.TokenInvalidClaim
    )
    await rejects(
        store, jwt.encode({**base, "participant_id": ""}, pem, "RS256"), errors.TokenInvalidClaim
    )
    await rejects(
        store,
        jwt.encode({**base, "participant_id": "x" * 300}, pem, "RS256"),
        errors.TokenInvalidClaim,
    )


def test_generated_key_is_rsa_2048_and_base64_pem_like_mux() -> None:
    generated = generate_signing_key()
    pem = base64.b64decode(generated.private_key_b64)
    assert pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    key = serialization.load_pem_private_key(pem, password=None)
    assert key.key_size == 2048  # type: ignore[union-attr]
    assert b"PRIVATE" not in generated.public_key_pem
    record = SigningKeyRecord(id="k", created_at=0, public_key_pem=generated.public_key_pem)
    assert record.public_key_pem.startswith(b"-----BEGIN PUBLIC KEY-----")


async def test_a_tampered_payload_fails_the_signature(keyed_store: tuple) -> None:
    store, kid, private, _ = keyed_store
    token = sign_token(kid, private, SPACE, participant_id="alice")
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["participant_id"] = "admin"
    forged = f"{header}.{b64url(claims)}.{signature}"
    await rejects(store, forged, errors.TokenBadSignature)
    # A signature bit flipped.
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[10] ^= 1
    await rejects(store, f"{header}.{payload}.{b64url(bytes(raw))}", errors.TokenBadSignature)


async def test_not_yet_valid_tokens_are_refused_and_audience_lists_are_accepted(
    keyed_store: tuple,
) -> None:
    store, kid, private, _ = keyed_store
    pem = load_private_key(private)
    now = int(time.time())
    base = {"sub": SPACE, "kid": kid, "exp": now + 600}
    await rejects(
        store,
        jwt.encode({**base, "aud": "rt", "nbf": now + 300}, pem, "RS256"),
        errors.TokenInvalidClaim,
    )
    await rejects(
        store, jwt.encode({**base, "aud": ["video"]}, pem, "RS256"), errors.TokenWrongAudience
    )
    listed = jwt.encode({**base, "aud": ["rt", "other"]}, pem, "RS256")
    assert (await tokens.TokenVerifier(store).verify(listed)).space_id == SPACE
    await rejects(
        store,
        jwt.encode({**base, "aud": "rt", "exp": "soon"}, pem, "RS256"),
        errors.TokenInvalidClaim,
    )
