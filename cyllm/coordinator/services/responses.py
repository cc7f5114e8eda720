"""``Responses``: the Responses API's stored responses (``store``, and the conversation
``previous_response_id`` continues).  Each is its owner's: the coordinator sets the
owner from the call's tenant, and another tenant's id reads as a missing one.  They are
kept ``coordinator.responses_ttl_s`` (OpenAI keeps 30 days), at most
``responses_max_per_tenant`` per tenant (its oldest go first), in the job store: memory,
SQLite (expired rows removed on each write) or Redis (a TTL per key)."""

from __future__ import annotations

import re

from cyllm import errors
from cyllm.coordinator.jobs import JobStore
from cyllm.protocol import pb, rpc
from cyllm.protocol.tenant import Tenant

ID = re.compile(r"^resp_[A-Za-z0-9_-]{1,128}$")
MAX_BYTES = 16 << 20  # one stored response with its conversation


class ResponsesService(rpc.ResponsesServicer):
    def __init__(self, store: JobStore, ttl_s: float, per_tenant: int = 10_000) -> None:
        self.store, self.ttl_s, self.per_tenant = store, ttl_s, per_tenant

    async def PutResponse(self, request: pb.StoredResponse, context) -> pb.StoredResponse:
        if not ID.match(request.id):
            raise errors.InvalidRequest("a stored response's id is resp_ and letters or digits", param="id")
        if request.ByteSize() > MAX_BYTES:
            raise errors.InvalidRequest(f"a stored response is at most {MAX_BYTES} bytes", param="store")
        tenant = Tenant.of(context)
        found = await self.store.get_response(request.id)
        if found is not None and not tenant.owns(found.owner):
            raise errors.Forbidden("that response id is taken", param="id")
        stored = pb.StoredResponse()
        stored.CopyFrom(request)
        stored.owner = found.owner if found is not None else tenant.subject
        await self.store.put_response(stored, self.ttl_s, self.per_tenant)
        return stored

    async def GetResponse(self, request: pb.StoredResponseRequest, context) -> pb.StoredResponse:
        return await self._owned(request.id, Tenant.of(context))

    async def DeleteResponse(
        self, request: pb.StoredResponseRequest, context
    ) -> pb.DeleteStoredResponseReply:
        await self._owned(request.id, Tenant.of(context))
        return pb.DeleteStoredResponseReply(deleted=await self.store.delete_response(request.id))

    async def _owned(self, response_id: str, tenant: Tenant) -> pb.StoredResponse:
        found = await self.store.get_response(response_id) if ID.match(response_id) else None
        if found is None or not tenant.owns(found.owner):
            raise errors.NotFound(f"response {response_id[:140]!r} does not exist", param="response_id")
        return found
