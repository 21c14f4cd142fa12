"""SigningKeyService: thin handlers over key generation and the store."""

from __future__ import annotations

import grpc

from spaces import errors, ids, paging
from spaces.auth.keys import generate_signing_key
from spaces.store.base import SigningKeyRecord, Store
from spaces.v1 import signing_key_pb2, signing_key_pb2_grpc


def _message(record: SigningKeyRecord) -> signing_key_pb2.SigningKey:
    return signing_key_pb2.SigningKey(id=record.id, created_at=record.created_at)


class SigningKeyServicer(signing_key_pb2_grpc.SigningKeyServiceServicer):
    def __init__(self, store: Store) -> None:
        self._store = store

    async def CreateSigningKey(
        self, request: signing_key_pb2.CreateSigningKeyRequest, context: grpc.aio.ServicerContext
    ) -> signing_key_pb2.SigningKey:
        generated = generate_signing_key()
        record = await self._store.create_signing_key(
            ids.new_signing_key_id(), generated.public_key_pem
        )
        reply = _message(record)
        reply.private_key = generated.private_key_b64
        return reply

    async def GetSigningKey(
        self, request: signing_key_pb2.GetSigningKeyRequest, context: grpc.aio.ServicerContext
    ) -> signing_key_pb2.SigningKey:
        record = await self._store.get_signing_key(ids.validate_id(request.id, "signing key"))
        if record is None:
            raise errors.SigningKeyNotFound()
        return _message(record)

    async def ListSigningKeys(
        self, request: signing_key_pb2.ListSigningKeysRequest, context: grpc.aio.ServicerContext
    ) -> signing_key_pb2.ListSigningKeysResponse:
        records, cursor = await self._store.list_signing_keys(
            paging.page_limit(request.limit), paging.decode_cursor(request.page_token)
        )
        return signing_key_pb2.ListSigningKeysResponse(
            signing_keys=[_message(r) for r in records],
            next_page_token=paging.encode_cursor(cursor),
        )

    async def DeleteSigningKey(
        self, request: signing_key_pb2.DeleteSigningKeyRequest, context: grpc.aio.ServicerContext
    ) -> signing_key_pb2.DeleteSigningKeyResponse:
        if not await self._store.delete_signing_key(ids.validate_id(request.id, "signing key")):
            raise errors.SigningKeyNotFound()
        return signing_key_pb2.DeleteSigningKeyResponse()
