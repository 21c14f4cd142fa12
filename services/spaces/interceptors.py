"""Maps the error catalogue onto gRPC statuses, in one place, for every RPC kind."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from spaces import errors

logger = logging.getLogger(__name__)


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, errors.SpacesError):
        if exc.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
            logger.warning("%s: %s", method, exc.message)
        await context.abort(exc.code, exc.message)
    logger.exception("%s failed", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


def _wrap_unary(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], method: str
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)

    return wrapper


def _wrap_stream(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Any], method: str
) -> Callable[[Any, grpc.aio.ServicerContext], Any]:
    if not inspect.isasyncgenfunction(behavior):
        # A handler that writes with context.write (e.g. grpc.health's Watch).
        return _wrap_unary(behavior, method)

    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)

    return wrapper


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Catalogued errors become their status and message; anything else becomes INTERNAL with
    a generic message (and a logged traceback), and the server keeps serving."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        return replace_behavior(
            handler,
            lambda behavior, streaming: (_wrap_stream if streaming else _wrap_unary)(
                behavior, method
            ),
        )


def replace_behavior(
    handler: grpc.RpcMethodHandler, make: Callable[[Any, bool], Any]
) -> grpc.RpcMethodHandler:
    """The same method (kind, serializers) with its behaviour replaced by
    ``make(behavior, response_streaming)``."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(make(handler.unary_unary, False), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(make(handler.stream_unary, False), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(make(handler.unary_stream, True), **kwargs)
    return grpc.stream_stream_rpc_method_handler(make(handler.stream_stream, True), **kwargs)
