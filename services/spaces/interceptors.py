"""Maps the error catalogue onto gRPC statuses, in one place, for every RPC kind.

It also owns request decoding: grpc's own handling of a request that does not parse (invalid
UTF-8 in a string field, a truncated message, garbage) is UNKNOWN with a Python class name in
the message and an ERROR traceback in the log for every such request. Here the deserializer
never raises; the method sees a marker instead and the call ends with INVALID_ARGUMENT and a
short message, logged at DEBUG only, so nobody can flood the log with bad bytes."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from spaces import errors
from spaces.streams import close_stream

logger = logging.getLogger(__name__)


class Undecodable:
    """Stands in for a request message that did not parse."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    @property
    def message(self) -> str:
        return f"malformed request: not a valid {self.type_name}"


def safe_deserializer(
    deserializer: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    """``deserializer`` that returns an ``Undecodable`` instead of raising."""
    if deserializer is None or getattr(deserializer, "_spaces_safe", False):
        return deserializer
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    type_name = getattr(descriptor, "full_name", "") or "request message"

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:
            logger.debug("undecodable %s (%d bytes): %s", type_name, len(raw), exc)
            return Undecodable(type_name)

    deserialize._spaces_safe = True  # type: ignore[attr-defined]
    return deserialize


async def _refuse_undecodable(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


async def _checked(context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """The call's request stream, ending the call with INVALID_ARGUMENT at the first bad
    message. Read with ``context.read()``, never through the request iterator grpc passes in:
    that one is a generator in a reference cycle with the call (spaces.streams)."""
    while (request := await context.read()) is not grpc.aio.EOF:
        await _refuse_undecodable(request, context)
        yield request


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, errors.SpacesError):
        if exc.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
            logger.warning("%s: %s", method, exc.message)
        await context.abort(exc.code, exc.message)
    logger.exception("%s failed", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


def _wrap_unary(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    method: str,
    client_streaming: bool,
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if client_streaming:
                request = _checked(context)
            else:
                await _refuse_undecodable(request, context)
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)
        finally:
            if client_streaming:
                await close_stream(request)  # a handler that stopped reading early

    return wrapper


def _wrap_stream(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Any],
    method: str,
    client_streaming: bool,
) -> Callable[[Any, grpc.aio.ServicerContext], Any]:
    if not inspect.isasyncgenfunction(behavior):
        # A handler that writes with context.write (e.g. grpc.health's Watch).
        return _wrap_unary(behavior, method, client_streaming)

    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            if client_streaming:
                request = _checked(context)
            else:
                await _refuse_undecodable(request, context)
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)
        finally:
            if client_streaming:
                await close_stream(request)  # a handler that stopped reading early

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
        client_streaming = bool(handler.request_streaming)
        return replace_behavior(
            handler,
            lambda behavior, streaming: (_wrap_stream if streaming else _wrap_unary)(
                behavior, method, client_streaming
            ),
            request_deserializer=safe_deserializer(handler.request_deserializer),
        )


def replace_behavior(
    handler: grpc.RpcMethodHandler,
    make: Callable[[Any, bool], Any],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """The same method (kind, serializers) with its behaviour replaced by
    ``make(behavior, response_streaming)`` (and, if given, its request deserializer)."""
    kwargs = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(make(handler.unary_unary, False), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(make(handler.stream_unary, False), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(make(handler.unary_stream, True), **kwargs)
    return grpc.stream_stream_rpc_method_handler(make(handler.stream_stream, True), **kwargs)
