"""A finished call is freed when its handler ends, not at the next full garbage collection.

grpc.aio's request iterator is an async generator in a reference cycle with the call
(spaces.streams): every call whose handler iterated it, to the end or not, lived with its C
memory until a full collection, and the churn soak's media node kept megabytes of finished
sessions that way. Here the cyclic collector is off while calls run, so whatever only a
collection would free is still there to count."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from spaces.interceptors import ErrorInterceptor
from spaces.server import SpacesServer
from spaces.v1 import media_pb2, presence_pb2
from tests.support.system import Admin, Tenant, eventually, make_config, start_server

CALLS = 5


def live_calls() -> int:
    """grpc.aio's per-call request streams that are still alive (a cdef class: by name)."""
    return sum(type(o).__name__ == "_MessageReceiver" for o in gc.get_objects())


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


async def first_only_stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request
        return  # stops reading at a message, as a session does on LeaveSession


async def first_only_unary(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> bytes:
    async for request in requests:
        return request
    return b""


@pytest.mark.parametrize("kind", ["stream_stream", "stream_unary"])
async def test_a_finished_client_streaming_call_leaves_nothing_for_the_collector(
    kind: str, no_cyclic_gc: None
) -> None:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    handlers = {
        "First": (
            grpc.stream_stream_rpc_method_handler(first_only_stream)
            if kind == "stream_stream"
            else grpc.stream_unary_rpc_method_handler(first_only_unary)
        )
    }
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Streams", handlers)]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        before = live_calls()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for i in range(CALLS):
                if kind == "stream_stream":
                    call = channel.stream_stream("/test.Streams/First")()
                    await call.write(b"hello %d" % i)
                    assert await call.read() == b"hello %d" % i
                    assert await call.read() is grpc.aio.EOF
                else:
                    unary = channel.stream_unary("/test.Streams/First")()
                    await unary.write(b"hello %d" % i)
                    assert await unary == b"hello %d" % i
                assert (
                    await (call if kind == "stream_stream" else unary).code() == grpc.StatusCode.OK
                )
        await asyncio.sleep(0.2)  # the server's last callbacks for the calls
        assert live_calls() - before == 0
    finally:
        await server.stop(None)


@pytest.fixture
async def media_server() -> AsyncIterator[SpacesServer]:
    srv = await start_server(make_config(services=("control", "auth", "presence", "media")))
    yield srv
    await srv.stop()


async def test_sessions_that_leave_leave_no_call_behind_on_the_media_node(
    media_server: SpacesServer, no_cyclic_gc: None
) -> None:
    """The media node's Session: a client that sends LeaveSession (the session ends while the
    node is reading the stream) frees the call at once."""
    admin = Admin(media_server.address)
    tenant = Tenant(await admin.create_key())
    space_id = await admin.create_space()
    node = media_server.media_node
    assert node is not None
    before = live_calls()
    for i in range(CALLS):
        joined = await admin.presence.Join(
            presence_pb2.JoinRequest(token=tenant.token(space_id, f"p{i}"))
        )
        async with grpc.aio.insecure_channel(joined.media_address) as channel:
            call = channel.stream_stream(
                "/spaces.v1.MediaService/Session",
                request_serializer=media_pb2.ClientMessage.SerializeToString,
                response_deserializer=media_pb2.ServerMessage.FromString,
            )()
            await call.write(media_pb2.ClientMessage(hello=media_pb2.Hello(ticket=joined.ticket)))
            assert (await call.read()).WhichOneof("message") == "joined"
            await call.write(media_pb2.ClientMessage(leave=media_pb2.LeaveSession()))
            while await call.read() is not grpc.aio.EOF:
                pass
            assert await call.code() == grpc.StatusCode.OK
    await eventually(lambda: not node.sessions, timeout=5)
    await asyncio.sleep(0.2)
    assert live_calls() - before == 0
    await admin.close()
