"""OpenAI's Batch API: ``/v1/batches`` over an uploaded file of requests
(``purpose=batch``).  The coordinator keeps each batch for its owner
(``coordinator/services/batches.py``); the gateways run them at the lowest priority
(``gateway/batch_runner.py``).  The output and error files are read with
``GET /v1/files/{id}/content``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from cyllm import errors
from cyllm.coordinator.batch_input import MAX_META_BYTES
from cyllm.gateway.auth import Identity, authenticate
from cyllm.gateway.client import coordinator
from cyllm.gateway.context import context
from cyllm.gateway.errors import responses
from cyllm.gateway.ratelimit import limit_control
from cyllm.protocol import pb

router = APIRouter(
    prefix="/v1", tags=["openai batches"], dependencies=[Depends(authenticate), Depends(limit_control)]
)

Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=128)
    endpoint: Endpoint
    completion_window: str = Field("24h", max_length=8, description="hours, as '24h' (1h to 168h)")
    metadata: dict[str, str] | None = Field(None, max_length=16, description="up to 16 pairs")

    def checked_metadata(self) -> str:
        for key, value in (self.metadata or {}).items():
            if len(key) > 64 or len(value) > 512:
                raise errors.InvalidRequest(
                    "metadata keys are at most 64 characters and values 512", param="metadata"
                )
        encoded = json.dumps(self.metadata, ensure_ascii=False) if self.metadata else ""
        if len(encoded.encode()) > MAX_META_BYTES:
            raise errors.InvalidRequest(
                f"metadata is at most {MAX_META_BYTES} bytes as JSON", param="metadata"
            )
        return encoded


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    usage: BatchUsage
    metadata: dict[str, str] | None = None

    @classmethod
    def of(cls, b: pb.Batch) -> BatchObject:
        times: dict[str, Any] = {
            name: getattr(b, name) or None
            for name in (
                "in_progress_at",
                "expires_at",
                "finalizing_at",
                "completed_at",
                "failed_at",
                "expired_at",
                "cancelling_at",
                "cancelled_at",
            )
        }
        return cls(
            id=b.id,
            endpoint=b.endpoint,
            errors=BatchErrors(data=json.loads(b.errors_json)) if b.errors_json else None,
            input_file_id=b.input_file_id,
            completion_window=b.completion_window,
            status=b.status,
            output_file_id=b.output_file_id or None,
            error_file_id=b.error_file_id or None,
            created_at=b.created_at,
            request_counts=RequestCounts(total=b.total, completed=b.completed, failed=b.failed),
            usage=BatchUsage(
                input_tokens=b.input_tokens,
                output_tokens=b.output_tokens,
                total_tokens=b.input_tokens + b.output_tokens,
            ),
            metadata=json.loads(b.metadata_json) if b.metadata_json else None,
            **times,
        )


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


def caller_json(identity: Identity) -> str:
    """Whom a batch's lines run as: its creator, with the scopes and models it had."""
    return json.dumps(
        {
            "subject": identity.subject,
            "kind": identity.kind,
            "scopes": sorted(identity.scopes),
            "models": sorted(identity.models) if identity.models is not None else None,
        }
    )


@router.post("/batches", response_model=BatchObject, responses=responses(400, 401, 404, 429, 500, 503))
async def create_batch(body: BatchCreate, request: Request) -> BatchObject:
    """Run every request of an uploaded ``batch`` file, at the lowest priority, within
    ``completion_window``.  The file is checked through first: a wrong line is a 400
    that names it."""
    made = await coordinator(request).batch(
        "CreateBatch",
        pb.CreateBatchRequest(
            input_file_id=body.input_file_id,
            endpoint=body.endpoint,
            completion_window=body.completion_window,
            metadata_json=body.checked_metadata(),
            caller_json=caller_json(context(request).caller),
        ),
    )
    return BatchObject.of(made)


@router.get("/batches", response_model=BatchList, responses=responses(400, 401, 429, 500, 503))
async def list_batches(
    request: Request, after: str = Query("", max_length=128), limit: int = Query(20, ge=1, le=100)
) -> BatchList:
    """The caller's batches, newest first."""
    reply = await coordinator(request).batch("ListBatches", pb.ListBatchesRequest(limit=limit, after=after))
    data = [BatchObject.of(b) for b in reply.batches]
    return BatchList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=reply.has_more,
    )


@router.get("/batches/{batch_id}", response_model=BatchObject, responses=responses(401, 404, 429, 500, 503))
async def get_batch(batch_id: str, request: Request) -> BatchObject:
    return BatchObject.of(await coordinator(request).batch("GetBatch", pb.BatchRequest(id=batch_id)))


@router.post(
    "/batches/{batch_id}/cancel", response_model=BatchObject, responses=responses(401, 404, 429, 500, 503)
)
async def cancel_batch(batch_id: str, request: Request) -> BatchObject:
    """``cancelling`` until its running lines stop, then ``cancelled``, with the output
    of the lines that finished."""
    return BatchObject.of(await coordinator(request).batch("CancelBatch", pb.BatchRequest(id=batch_id)))
