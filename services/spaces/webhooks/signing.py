"""The ``mux-signature`` header, byte-compatible with Mux's webhooks.

``t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``: receivers written for Mux
(its SDKs' verifyHeader, or spaces.sdk.verify_webhook) accept it unchanged.
"""

from __future__ import annotations

import hashlib
import hmac

HEADER = "mux-signature"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``"<timestamp>.<body>"`` keyed with the endpoint's secret."""
    message = str(int(timestamp)).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The header value for one delivery attempt. The timestamp is the attempt's, not the
    event's, so that a retry hours later still passes the receiver's age check."""
    return f"t={int(timestamp)},v1={signature(secret, timestamp, body)}"
