"""Requests that do not decode: raw bytes over a real channel to every method of every service a
full server runs. Each gets INVALID_ARGUMENT with a short message, nothing is logged above
DEBUG (no traceback per request, so nobody can flood the log), and the server keeps serving."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2  # noqa: F401 - registers grpc.health.v1 in the pool
from grpc_reflection.v1alpha import reflection_pb2  # noqa: F401 - registers reflection

from spaces.server import SpacesServer
from spaces.v1 import (
    broadcast_pb2,
    media_pb2,
    presence_pb2,
    signing_key_pb2,
    space_pb2,
    webhook_pb2,
)
from tests.support.system import ADMIN_KEY, Admin, Tenant, eventually, make_config, start_server

MD = (("authorization", f"Bearer {ADMIN_KEY}"),)

BAD_PAYLOADS = {
    # GetSpaceRequest.id (field 1, a string) holding the bytes ff fe 80: invalid UTF-8. Every
    # request whose field 1 is a string fails the same way.
    "invalid utf-8": b"\x0a\x03\xff\xfe\x80",
    # A length-delimited field 2 that claims 16 bytes and carries 2.
    "truncated": b"\x12\x10ab",
    # An unterminated varint where a tag should be.
    "garbage": b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
}
"""Each payload must be refused by the message it is sent as; the test checks that protobuf
itself rejects it before expecting the server to."""


def services() -> list[str]:
    names = [
        f.DESCRIPTOR.services_by_name[s].full_name
        for f in (space_pb2, broadcast_pb2, signing_key_pb2, presence_pb2, media_pb2, webhook_pb2)
        for s in f.DESCRIPTOR.services_by_name
    ]
    return [*names, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]


def methods() -> list[tuple[str, object]]:
    pool = descriptor_pool.Default()
    return [
        (f"/{service}/{m.name}", m)
        for service in services()
        for m in pool.FindServiceByName(service).methods
    ]


def rejects(method: object, payload: bytes) -> bool:
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(method.input_type)  # type: ignore[attr-defined]
    try:
        cls.FromString(payload)
    except Exception:
        return True
    return False


@pytest.fixture
async def full_server() -> AsyncIterator[SpacesServer]:
    srv = await start_server(
        make_config(services=("control", "auth", "presence", "media", "webhooks"))
    )
    yield srv
    await srv.stop()


async def call_raw(
    channel: grpc.aio.Channel, path: str, method: object, payload: bytes
) -> grpc.aio.AioRpcError:
    client_streaming = method.client_streaming  # type: ignore[attr-defined]
    server_streaming = method.server_streaming  # type: ignore[attr-defined]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if client_streaming:
            call = channel.stream_stream(path)(metadata=MD, timeout=10)
            await call.write(payload)
            async for _ in call:
                pass
            await call.code()
            raise AssertionError(f"{path}: stream ended {await call.code()}")
        if server_streaming:
            async for _ in channel.unary_stream(path)(payload, metadata=MD, timeout=10):
                pass
            raise AssertionError(f"{path}: stream ended without an error")
        await channel.unary_unary(path)(payload, metadata=MD, timeout=10)
    return info.value


async def test_undecodable_requests_are_invalid_argument_on_every_service(
    full_server: SpacesServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    tried = 0
    async with grpc.aio.insecure_channel(full_server.address) as channel:
        for path, method in methods():
            for kind, payload in BAD_PAYLOADS.items():
                if not rejects(method, payload):
                    continue  # protobuf accepts these bytes as this message (e.g. no strings)
                error = await call_raw(channel, path, method, payload)
                tried += 1
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, kind, error)
                details = error.details() or ""
                type_name = method.input_type.full_name  # type: ignore[attr-defined]
                assert details == f"malformed request: not a valid {type_name}", (path, details)
    # Every method was tried with at least the garbage payload.
    assert tried >= len(methods())
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, [f"{r.name}: {r.getMessage()}" for r in noisy][:5]
    assert not any(r.exc_info for r in caplog.records)
    # The server keeps serving.
    admin = Admin(full_server.address)
    space_id = await admin.create_space()
    assert (await admin.get_space(space_id)).id == space_id
    await admin.close()


async def test_get_space_with_invalid_utf8_id_is_invalid_argument(
    full_server: SpacesServer,
) -> None:
    async with grpc.aio.insecure_channel(full_server.address) as channel:
        get_space = channel.unary_unary("/spaces.v1.SpaceService/GetSpace")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await get_space(b"\x0a\x03\xff\xfe\x80", metadata=MD)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "malformed request: not a valid spaces.v1.GetSpaceRequest"


async def test_an_undecodable_message_mid_session_ends_it_and_frees_the_participant(
    full_server: SpacesServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    admin = Admin(full_server.address)
    tenant = Tenant(await admin.create_key())
    space_id = await admin.create_space()
    joined = await admin.presence.Join(
        presence_pb2.JoinRequest(token=tenant.token(space_id, "alice"))
    )
    async with grpc.aio.insecure_channel(joined.media_address) as channel:
        call = channel.stream_stream(
            "/spaces.v1.MediaService/Session",
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=media_pb2.ServerMessage.FromString,
        )()
        await call.write(media_pb2.ClientMessage(hello=media_pb2.Hello(ticket=joined.ticket)))
        first = await call.read()
        assert first.WhichOneof("message") == "joined"
        await call.write(BAD_PAYLOADS["garbage"])
        with pytest.raises(grpc.aio.AioRpcError):
            while (message := await call.read()) is not grpc.aio.EOF:
                assert message.WhichOneof("message") != "error", message
        assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert await call.details() == "malformed request: not a valid spaces.v1.ClientMessage"
    # Nothing left behind: the session closes as the stream ends (it runs in its own task, so
    # give it the moment it takes) and alice's participant_id is free again.
    node = full_server.media_node
    assert node is not None
    await eventually(lambda: not node.sessions, timeout=5)
    assert await admin.participants(space_id) == []
    again = await admin.presence.Join(
        presence_pb2.JoinRequest(token=tenant.token(space_id, "alice"))
    )
    assert again.participant_id == "alice"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await admin.close()
