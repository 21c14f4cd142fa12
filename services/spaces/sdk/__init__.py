"""The Python SDK.

Server side: ``sign_token`` (also the ``spaces token`` command) and ``verify_webhook``.
Client side: ``Space(token, address).join()`` returns the local participant; publish aiortc
tracks, receive remote ones, iterate ``space.events()``; reconnects on its own.
"""

from spaces.sdk.client import (
    AudioOnlyChanged,
    BroadcastStateChanged,
    LocalParticipant,
    LocalTrack,
    RemoteParticipant,
    RemoteTrack,
    Space,
    SpaceEvent,
    SpacesClientError,
)
from spaces.sdk.tokens import sign_token
from spaces.sdk.webhooks import WebhookVerificationError, verify_webhook

__all__ = [
    "AudioOnlyChanged",
    "BroadcastStateChanged",
    "LocalParticipant",
    "LocalTrack",
    "RemoteParticipant",
    "RemoteTrack",
    "Space",
    "SpaceEvent",
    "SpacesClientError",
    "WebhookVerificationError",
    "sign_token",
    "verify_webhook",
]
