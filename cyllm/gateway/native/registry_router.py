"""The models a tenant made, and its aliases, under ``/api/v1`` (the coordinator's
registry: ``coordinator/registry.py``, ``coordinator/lifecycle.py``).

- ``GET /api/v1/models/{id}``: one model: where it is served, its base, the job that
  made it, its evaluation, your aliases on it; for its owner, whom it is published to
  and where its artefact lives.
- ``DELETE /api/v1/models/{id}`` (also ``DELETE /v1/models/{id}``, OpenAI's): delete a
  model you made.
- ``POST /api/v1/models/{id}/publish`` (admins): to named tenants, or everyone.
- ``GET /api/v1/models/{id}/export``: its artefact (an adapter, or a model folder) as a
  tar archive.
- ``/api/v1/aliases``: list; ``PUT /{name}`` point at a model; ``GET /{name}`` where it
  points and its history; ``POST /{name}/rollback``; ``DELETE /{name}``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from cyllm import errors
from cyllm.gateway.auth import authenticate
from cyllm.gateway.client import coordinator
from cyllm.gateway.context import context
from cyllm.gateway.errors import responses
from cyllm.gateway.native.router import _entry
from cyllm.gateway.native.schemas import (
    AliasEntry,
    AliasesResponse,
    AliasMove,
    AliasSet,
    ModelDeleted,
    ModelEntry,
    PublishRequest,
)
from cyllm.gateway.ratelimit import limit_control
from cyllm.protocol import pb

router = APIRouter(prefix="/api/v1", tags=["models"], dependencies=[Depends(authenticate)])
CONTROL = [Depends(limit_control)]


@router.get(
    "/models/{model_id:path}/export",
    dependencies=CONTROL,
    response_class=StreamingResponse,
    responses={
        **responses(400, 401, 403, 404, 429, 503),
        200: {"content": {"application/x-tar": {}}, "description": "the artefact folder, as a tar archive"},
    },
)
async def export(model_id: str, request: Request) -> StreamingResponse:
    """Download a model you made: its adapter or model folder, as a tar archive."""
    chunks = coordinator(request).export_model(model_id)
    first = await anext(chunks)  # a refusal is a real status, not a broken download

    async def body() -> AsyncIterator[bytes]:
        yield first.data
        async for chunk in chunks:
            yield chunk.data

    name = first.filename or "model.tar"
    return StreamingResponse(
        body(),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.post(
    "/models/{model_id:path}/publish",
    response_model=ModelEntry,
    response_model_by_alias=True,
    dependencies=CONTROL,
    responses=responses(400, 401, 403, 404, 429, 503),
)
async def publish(model_id: str, body: PublishRequest, request: Request) -> ModelEntry:
    """Share a model made here with named tenants (``tenants``: their subjects, such as
    ``key:<key id>`` or ``jwt:<sub>``), or with everyone; ``withdraw`` undoes it.
    Admin scope."""
    reply = await coordinator(request).publish_model(
        pb.PublishModelRequest(
            model=model_id, tenants=body.tenants, everyone=body.everyone, withdraw=body.withdraw
        )
    )
    return _entry(reply)


@router.get(
    "/models/{model_id:path}",
    response_model=ModelEntry,
    response_model_by_alias=True,
    response_model_exclude_none=True,
    responses=responses(401, 404, 429, 503),
)
async def describe(model_id: str, request: Request) -> ModelEntry:
    for m in await coordinator(request).list_models():
        if m.id == model_id and context(request).caller.may_use(m.id):
            return _entry(m)
    raise errors.ModelNotFound(f"model {model_id!r} does not exist", param="model")


@router.delete(
    "/models/{model_id:path}",
    response_model=ModelDeleted,
    response_model_by_alias=True,
    dependencies=CONTROL,
    responses=responses(400, 401, 403, 404, 429, 503),
)
async def delete(model_id: str, request: Request) -> ModelDeleted:
    """Delete a model you made: no longer served (running requests finish), its artefact
    removed, its aliases gone."""
    await coordinator(request).delete_model(model_id)
    return ModelDeleted(id=model_id, deleted=True)


@router.get(
    "/aliases",
    response_model=AliasesResponse,
    response_model_by_alias=True,
    responses=responses(401, 429, 503),
)
async def aliases(request: Request) -> AliasesResponse:
    return AliasesResponse(aliases=[_alias(a) for a in await coordinator(request).list_aliases()])


@router.put(
    "/aliases/{name}",
    response_model=AliasEntry,
    response_model_by_alias=True,
    dependencies=CONTROL,
    responses=responses(400, 401, 403, 404, 429, 503),
)
async def set_alias(name: str, body: AliasSet, request: Request) -> AliasEntry:
    """Point your alias at a model you may use (made, moved: one atomic change, recorded).
    With ``expect``, only if it points there now (400 when it moved meanwhile)."""
    reply = await coordinator(request).alias(
        "SetAlias",
        pb.AliasRequest(name=name, model=body.model, expect=body.expect or "", reason=body.reason or ""),
    )
    return _alias(reply)


@router.get(
    "/aliases/{name}",
    response_model=AliasEntry,
    response_model_by_alias=True,
    responses=responses(401, 404, 429, 503),
)
async def get_alias(name: str, request: Request) -> AliasEntry:
    """Where your alias points, and each of its moves."""
    return _alias(await coordinator(request).alias("GetAlias", pb.AliasRequest(name=name)))


@router.post(
    "/aliases/{name}/rollback",
    response_model=AliasEntry,
    response_model_by_alias=True,
    dependencies=CONTROL,
    responses=responses(400, 401, 404, 429, 503),
)
async def rollback(name: str, request: Request) -> AliasEntry:
    """Back to where the alias pointed before its last move."""
    return _alias(await coordinator(request).alias("SetAlias", pb.AliasRequest(name=name, rollback=True)))


@router.delete(
    "/aliases/{name}",
    response_model=AliasEntry,
    response_model_by_alias=True,
    dependencies=CONTROL,
    responses=responses(401, 404, 429, 503),
)
async def delete_alias(name: str, request: Request) -> AliasEntry:
    return _alias(await coordinator(request).alias("DeleteAlias", pb.AliasRequest(name=name)))


def _alias(a: pb.Alias) -> AliasEntry:
    return AliasEntry(
        name=a.name,
        model=a.model,
        moves=[
            AliasMove(from_model=m.from_model, to_model=m.to_model, by=m.by, at=m.at, reason=m.reason)
            for m in a.moves
        ]
        or None,
    )
