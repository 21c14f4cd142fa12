"""The admin credential: ``authorization: Bearer <SPACES_ADMIN_KEY>`` on every management call."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from spaces import errors
from spaces.interceptors import replace_behavior

ADMIN_SERVICES = frozenset(
    {
        "spaces.v1.SpaceService",
        "spaces.v1.SigningKeyService",
        "spaces.v1.WebhookService",
        "spaces.v1.BroadcastService",
    }
)
ADMIN_METHODS = frozenset(
    {
        "/spaces.v1.PresenceService/ListParticipants",
        "/spaces.v1.PresenceService/GetParticipant",
        "/spaces.v1.PresenceService/RemoveParticipant",
        "/spaces.v1.PresenceService/WatchEvents",
    }
)


def needs_admin(method: str) -> bool:
    service = method.lstrip("/").split("/", 1)[0]
    return service in ADMIN_SERVICES or method in ADMIN_METHODS


def check_admin_key(metadata: Any, admin_key: str) -> None:
    """Raise unless the metadata carries the admin key. Constant-time comparison."""
    header = ""
    for key, value in metadata or ():
        if key == "authorization":
            header = value if isinstance(value, str) else value.decode()
            break
    if not header:
        raise errors.MissingAdminKey()
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise errors.MissingAdminKey(
            "malformed authorization: send 'authorization: Bearer <admin key>'"
        )
    if not hmac.compare_digest(presented.strip().encode(), admin_key.encode()):
        raise errors.WrongAdminKey()


def _aborting(code: grpc.StatusCode, message: str) -> Callable[..., Awaitable[Any]]:
    async def abort(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    return abort


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses admin methods without the admin key. Health, reflection, Join, Leave and media
    sessions are not admin methods and pass untouched."""

    def __init__(self, admin_key: str) -> None:
        if not admin_key:
            raise ValueError("an admin key is required")
        self._admin_key = admin_key

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not needs_admin(handler_call_details.method):
            return handler
        try:
            check_admin_key(handler_call_details.invocation_metadata, self._admin_key)
        except errors.SpacesError as exc:
            return _abort_handler(handler, exc.code, exc.message)
        return handler


def _abort_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    abort = _aborting(code, message)
    return replace_behavior(handler, lambda _behavior, _streaming: abort)
