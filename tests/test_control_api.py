"""SpaceService and SigningKeyService over real gRPC: admin auth, validation, errors, paging."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from spaces.sdk.client import Space
from spaces.server import SpacesServer
from spaces.v1 import presence_pb2, signing_key_pb2, space_pb2
from tests.support.system import Admin, Tenant


@pytest.fixture
async def admin(server: SpacesServer) -> AsyncIterator[Admin]:
    client = Admin(server.address)
    yield client
    await client.close()


async def status_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


def assert_message(details: str) -> None:
    assert details and details[0].islower() and len(details) < 120


async def test_admin_calls_without_key_are_unauthenticated(admin: Admin) -> None:
    calls = [
        admin.spaces.CreateSpace(space_pb2.CreateSpaceRequest()),
        admin.spaces.ListSpaces(space_pb2.ListSpacesRequest()),
        admin.keys.CreateSigningKey(signing_key_pb2.CreateSigningKeyRequest()),
        admin.keys.ListSigningKeys(signing_key_pb2.ListSigningKeysRequest()),
        admin.presence.ListParticipants(presence_pb2.ListParticipantsRequest(space_id="x")),
    ]
    for call in calls:
        code, details = await status_of(call)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: bearer" in details.lower()
        assert_message(details)


async def test_admin_calls_with_a_wrong_key_are_unauthenticated(admin: Admin) -> None:
    for metadata in ((("authorization", "Bearer nope"),), (("authorization", "Basic abc"),)):
        code, details = await status_of(
            admin.spaces.CreateSpace(space_pb2.CreateSpaceRequest(), metadata=metadata)
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert_message(details)
    assert await admin.create_space()  # and the server keeps serving


async def test_health_and_reflection_need_no_key(server: SpacesServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "liveness", "spaces.v1.SpaceService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name async for r in responses for s in r.list_services_response.service}
    assert {
        "spaces.v1.SpaceService",
        "spaces.v1.SigningKeyService",
        "spaces.v1.PresenceService",
        "spaces.v1.MediaService",
        "grpc.health.v1.Health",
    } <= names


async def test_create_and_get_space(admin: Admin) -> None:
    created = await admin.spaces.CreateSpace(
        space_pb2.CreateSpaceRequest(passthrough="p" * 255, max_participants=3), metadata=admin.md
    )
    assert created.status == space_pb2.SPACE_STATUS_IDLE
    got = await admin.get_space(created.id)
    assert got.passthrough == "p" * 255
    assert got.max_participants == 3
    assert got.created_at == created.created_at


async def test_oversized_passthrough_is_invalid_argument(admin: Admin) -> None:
    code, details = await status_of(
        admin.spaces.CreateSpace(
            space_pb2.CreateSpaceRequest(passthrough="p" * 256), metadata=admin.md
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "255" in details
    assert_message(details)
    space_id = await admin.create_space()
    code, _ = await status_of(
        admin.spaces.UpdateSpace(
            space_pb2.UpdateSpaceRequest(id=space_id, passthrough="x" * 1000), metadata=admin.md
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert (await admin.get_space(space_id)).passthrough == ""


async def test_unknown_and_malformed_ids(admin: Admin) -> None:
    code, details = await status_of(
        admin.spaces.GetSpace(space_pb2.GetSpaceRequest(id="doesNotExist"), metadata=admin.md)
    )
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "space not found")
    code, _ = await status_of(
        admin.spaces.GetSpace(space_pb2.GetSpaceRequest(id="bad id!"), metadata=admin.md)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = await status_of(
        admin.spaces.DeleteSpace(space_pb2.DeleteSpaceRequest(id="doesNotExist"), metadata=admin.md)
    )
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = await status_of(
        admin.keys.GetSigningKey(
            signing_key_pb2.GetSigningKeyRequest(id="nokey"), metadata=admin.md
        )
    )
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "signing key not found")
    code, _ = await status_of(
        admin.keys.DeleteSigningKey(
            signing_key_pb2.DeleteSigningKeyRequest(id="nokey"), metadata=admin.md
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND


async def test_list_spaces_pages_in_creation_order(admin: Admin) -> None:
    ids = [await admin.create_space(passthrough=str(i)) for i in range(7)]
    seen: list[str] = []
    token = ""
    while True:
        page = await admin.spaces.ListSpaces(
            space_pb2.ListSpacesRequest(limit=3, page_token=token), metadata=admin.md
        )
        seen += [s.id for s in page.spaces]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids
    code, _ = await status_of(
        admin.spaces.ListSpaces(space_pb2.ListSpacesRequest(page_token="zz!"), metadata=admin.md)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = await status_of(
        admin.spaces.ListSpaces(space_pb2.ListSpacesRequest(limit=1000), metadata=admin.md)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_signing_keys_return_the_private_key_only_once(admin: Admin) -> None:
    created = await admin.create_key()
    pem = base64.b64decode(created.private_key)
    assert pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    got = await admin.keys.GetSigningKey(
        signing_key_pb2.GetSigningKeyRequest(id=created.id), metadata=admin.md
    )
    assert got.id == created.id and got.private_key == ""
    listed = await admin.keys.ListSigningKeys(
        signing_key_pb2.ListSigningKeysRequest(), metadata=admin.md
    )
    assert [k.id for k in listed.signing_keys] == [created.id]
    assert all(k.private_key == "" for k in listed.signing_keys)


async def test_deleted_signing_key_stops_tokens_at_once(admin: Admin) -> None:
    tenant = Tenant(await admin.create_key())
    space_id = await admin.create_space()
    token = tenant.token(space_id, "alice")
    joined = await admin.presence.Join(presence_pb2.JoinRequest(token=token))
    assert joined.participant_id == "alice"
    await admin.keys.DeleteSigningKey(
        signing_key_pb2.DeleteSigningKeyRequest(id=tenant.key.id), metadata=admin.md
    )
    code, details = await status_of(
        admin.presence.Join(presence_pb2.JoinRequest(token=tenant.token(space_id, "bob")))
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in details


async def test_deleting_an_active_space_needs_force(server: SpacesServer, admin: Admin) -> None:
    tenant = Tenant(await admin.create_key())
    space_id = await admin.create_space()
    space = Space(tenant.token(space_id, "alice"), server.address)
    await space.join()
    assert (await admin.get_space(space_id)).status == space_pb2.SPACE_STATUS_ACTIVE
    code, details = await status_of(
        admin.spaces.DeleteSpace(space_pb2.DeleteSpaceRequest(id=space_id), metadata=admin.md)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "force" in details
    assert_message(details)
    reply = await admin.spaces.DeleteSpace(
        space_pb2.DeleteSpaceRequest(id=space_id, force=True), metadata=admin.md
    )
    assert reply.disconnected == 1
    code, _ = await status_of(
        admin.spaces.GetSpace(space_pb2.GetSpaceRequest(id=space_id), metadata=admin.md)
    )
    assert code == grpc.StatusCode.NOT_FOUND
    await space.leave()
