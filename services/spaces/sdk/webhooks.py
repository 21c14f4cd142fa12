"""Webhook verification for the customer's backend, compatible with Mux's.

Spaces signs each delivery with ``mux-signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
"<t>.<raw body>")>``, as Mux did, so a handler written for Mux keeps working; this is the same
check for Python backends::

    event = verify_webhook(request.body, request.headers["mux-signature"], secret)
    if event["type"] == "video.space.idle": ...

Verify the raw body bytes as received: a re-serialized JSON body will not match.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from spaces.webhooks.signing import signature

DEFAULT_TOLERANCE_SECONDS = 300
"""Mux's receivers rejected signatures older than 5 minutes, which bounds replays."""


class WebhookVerificationError(ValueError):
    """The request is not a genuine, recent webhook from this endpoint's sender."""


def verify_webhook(
    body: bytes | str,
    header: str | None,
    secret: str,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
    *,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a ``mux-signature`` header against the raw body; return the decoded event.

    Raises WebhookVerificationError when the header is missing or malformed, its timestamp is
    more than ``tolerance`` seconds away from now (0 disables the check), or no ``v1``
    signature matches. Several ``v1`` values are accepted, for secret rotation.
    """
    raw = body.encode() if isinstance(body, str) else bytes(body)
    if not header:
        raise WebhookVerificationError("missing mux-signature header")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError as exc:
                raise WebhookVerificationError("malformed mux-signature timestamp") from exc
        elif key == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        raise WebhookVerificationError("malformed mux-signature header: expected t=...,v1=...")
    current = time.time() if now is None else now
    if tolerance > 0 and abs(current - timestamp) > tolerance:
        raise WebhookVerificationError("mux-signature timestamp is outside the tolerance")
    expected = signature(secret, timestamp, raw)
    if not any(hmac.compare_digest(expected, s) for s in signatures):
        raise WebhookVerificationError("mux-signature does not match the body")
    try:
        event: dict[str, Any] = json.loads(raw)
    except ValueError as exc:
        raise WebhookVerificationError("webhook body is not JSON") from exc
    return event
