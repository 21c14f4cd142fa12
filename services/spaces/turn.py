"""TURN credentials in coturn's "TURN REST API" form (``use-auth-secret``).

The TURN server and Spaces share one secret. A credential is minted without asking the TURN
server: the username is ``"<expiry unix seconds>:<user>"`` and the password is
``base64(HMAC-SHA1(secret, username))``. coturn recomputes the HMAC and refuses the
credential once the expiry has passed, so nothing is stored and nothing needs revoking.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from spaces.config import TurnConfig


@dataclass(frozen=True)
class TurnCredential:
    username: str
    credential: str
    expires_at: int
    """Unix seconds."""


def mint(secret: str, user: str, expires_at: int) -> TurnCredential:
    username = f"{int(expires_at)}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return TurnCredential(username, base64.b64encode(digest).decode(), int(expires_at))


def expiry(config: TurnConfig, now: float, token_expires_at: int = 0) -> int:
    """When a credential handed out now should lapse: at the token's expiry or after the
    configured TTL, whichever is later. A relayed call must outlive a short-lived join token
    (coturn refuses the allocation's refreshes once the credential has expired), and a
    credential never grants less time than the token that obtained it."""
    return max(int(now) + config.ttl_s, int(token_expires_at))
