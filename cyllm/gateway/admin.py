"""Admin routes: API keys and their budgets.  They need an identity with the admin scope."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from cyllm import errors
from cyllm.gateway.auth import require_admin
from cyllm.gateway.budgets import Budget
from cyllm.gateway.errors import responses
from cyllm.gateway.ratelimit import limit_control

router = APIRouter(
    prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin), Depends(limit_control)]
)


class KeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    admin: bool = False
    models: list[str] | None = Field(None, description="allowed models; null: all")
    expires_in_s: float | None = Field(None, gt=0)
    budget: Budget | None = Field(None, description="tokens per day/month, training device-seconds")


class KeyInfo(BaseModel):
    key_id: str
    name: str
    created: float
    expires_at: float | None
    models: list[str] | None
    admin: bool
    revoked: bool
    budget: Budget | None = None


class KeyCreated(KeyInfo):
    key: str = Field(description="the key in clear: shown this once, never again")


class KeyList(BaseModel):
    keys: list[KeyInfo]


@router.post(
    "/keys", response_model=KeyCreated, status_code=201, responses=responses(400, 401, 403, 413, 429)
)
async def create_key(body: KeyCreate, request: Request) -> KeyCreated:
    key, secret = await request.app.state.keys.create(
        body.name,
        admin=body.admin,
        models=body.models,
        expires_in_s=body.expires_in_s,
        budget=body.budget.model_dump(exclude_none=True) if body.budget else None,
    )
    return KeyCreated(key=secret, **key.public())


@router.get("/keys", response_model=KeyList, responses=responses(401, 403, 429))
async def list_keys(request: Request) -> KeyList:
    return KeyList(keys=[KeyInfo(**k.public()) for k in await request.app.state.keys.all()])


@router.delete("/keys/{key_id}", response_model=KeyInfo, responses=responses(400, 401, 403, 429))
async def revoke_key(key_id: str, request: Request) -> KeyInfo:
    store = request.app.state.keys
    if not await store.revoke(key_id):
        raise errors.InvalidRequest(f"no API key {key_id!r}", param="key_id")
    key = next(k for k in await store.all() if k.key_id == key_id)
    return KeyInfo(**key.public())


@router.put(
    "/keys/{key_id}/budget", response_model=KeyInfo, responses=responses(400, 401, 403, 404, 413, 429)
)
async def set_key_budget(key_id: str, body: Budget, request: Request) -> KeyInfo:
    """Set a key's budget: it applies from the key's next request, on every gateway."""
    return await _set_budget(request, key_id, body.model_dump(exclude_none=True))


@router.delete("/keys/{key_id}/budget", response_model=KeyInfo, responses=responses(400, 401, 403, 404, 429))
async def clear_key_budget(key_id: str, request: Request) -> KeyInfo:
    """Take a key's budget away (``gateway.budgets`` applies again, if it names the key)."""
    return await _set_budget(request, key_id, None)


async def _set_budget(request: Request, key_id: str, budget: dict | None) -> KeyInfo:
    key = await request.app.state.keys.set_budget(key_id, budget)
    if key is None:
        raise errors.NotFound(f"no API key {key_id[:40]!r}", param="key_id")
    return KeyInfo(**key.public())
