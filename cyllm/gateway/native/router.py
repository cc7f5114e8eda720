"""The native routes under ``/api/v1``: inference (whole, SSE), models, health."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, cast

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from cyllm import errors
from cyllm.gateway.auth import authenticate, require_admin
from cyllm.gateway.client import coordinator
from cyllm.gateway.context import context
from cyllm.gateway.errors import GENERATION_ERRORS, responses, stream_error
from cyllm.gateway.generation import Failed
from cyllm.gateway.native.inference import Inference
from cyllm.gateway.native.schemas import (
    CoordinatorHealth,
    HealthResponse,
    InferenceRequest,
    InferenceResponse,
    LoadModelRequest,
    LoadModelResponse,
    ModelEntry,
    ModelsResponse,
    ModelState,
    UnloadModelResponse,
    WorkerHealth,
)
from cyllm.gateway.ratelimit import limit_control
from cyllm.gateway.sse import frame, sse_response
from cyllm.protocol import pb

ERRORS = GENERATION_ERRORS

router = APIRouter(prefix="/api/v1", tags=["native"], dependencies=[Depends(authenticate)])
# Health needs no credentials (load balancers and probes call it).
health_router = APIRouter(prefix="/api/v1", tags=["health"])


@router.post("/inference", response_model=InferenceResponse, response_model_by_alias=True, responses=ERRORS)
async def inference(body: InferenceRequest, request: Request) -> InferenceResponse:
    run = await Inference(body, context(request).request_id).start(request, whole=True)
    return await run.answer()


@router.post(
    "/inference/stream",
    responses={
        **ERRORS,
        200: {
            "content": {"text/event-stream": {}},
            "description": "events: `token` {text, index (n > 1), logprobs (if asked)}, then `done` "
            "{finishReason, usage, cached, toolCalls, choices (n > 1)} or `error`",
        },
    },
)
async def inference_stream(body: InferenceRequest, request: Request) -> StreamingResponse:
    run = await Inference(body, context(request).request_id).start(request, whole=False)
    return sse_response(_stream(run))


async def _stream(run: Inference) -> AsyncIterator[str]:
    async for event in run.events():
        if isinstance(event, Failed):
            yield frame(stream_error(event.error), event="error")
        else:
            yield frame(event[1], event=event[0])


@router.get(
    "/models", response_model=ModelsResponse, response_model_by_alias=True, responses=responses(401, 500, 503)
)
async def models(request: Request) -> ModelsResponse:
    found = await coordinator(request).list_models()
    caller = context(request).caller
    return ModelsResponse(models=[_entry(m) for m in found if caller.may_use(m.id)])


def _entry(m: pb.ModelInfo) -> ModelEntry:
    return ModelEntry(
        id=m.id,
        context_length=m.context_length,
        engine=m.engine,
        created=m.created,
        state=cast(ModelState, m.state or "loaded"),  # checked by the model, as any field
        base=m.base or None,
        device=m.device or None,
        memory_bytes=m.memory_bytes or None,
        kind=m.kind or None,
        job_id=m.job_id or None,
        evaluation=dict(m.evaluation) or None,
        aliases=list(m.aliases) or None,
        owner=m.owner or None,
        published_to=list(m.published_to) or None,
        path=m.path or None,
    )


@router.post(
    "/models/{model_id:path}/load",
    response_model=LoadModelResponse,
    response_model_by_alias=True,
    dependencies=[Depends(require_admin), Depends(limit_control)],
    responses=responses(400, 401, 403, 404, 409, 429, 500, 503),
)
async def load_model(
    model_id: str, request: Request, body: LoadModelRequest | None = None
) -> LoadModelResponse:
    """Load a model from a worker's catalog (or register a LoRA adapter as
    ``<base>:<adapter>``), unloading idle models least recently used first if memory is
    short; 409 when it cannot fit or its engine cannot run there.  Admin scope."""
    body = body or LoadModelRequest()
    reply = await coordinator(request).load_model(model_id, body.adapter_path or "", body.worker_id or "")
    return LoadModelResponse(
        model=model_id,
        worker_id=reply.worker_id,
        evicted=list(reply.evicted),
        models=[_entry(m) for m in reply.worker.models],
    )


@router.post(
    "/models/{model_id:path}/unload",
    response_model=UnloadModelResponse,
    response_model_by_alias=True,
    dependencies=[Depends(require_admin), Depends(limit_control)],
    responses=responses(401, 403, 404, 429, 500, 503),
)
async def unload_model(model_id: str, request: Request) -> UnloadModelResponse:
    """Unload a model (or adapter) from every worker serving it; running requests finish
    first (bounded by the worker's drain timeout).  Admin scope."""
    reply = await coordinator(request).unload_model(model_id)
    return UnloadModelResponse(model=model_id, worker_ids=list(reply.worker_ids))


@health_router.get("/health/live")
async def live() -> dict[str, str]:
    """Liveness: the gateway process answers (readiness is ``/api/v1/health``)."""
    return {"status": "alive"}


@health_router.get(
    "/health",
    response_model=HealthResponse,
    response_model_by_alias=True,
    responses={503: {"model": HealthResponse, "description": "no healthy worker"}},
)
async def health(request: Request) -> JSONResponse:
    """Readiness: 200 while some worker is healthy.  Public; the details of each worker
    (address, models, counters) only for an admin's credentials."""
    try:
        caller = await request.app.state.auth.identify(request.headers.get("authorization"))
        detail = caller.admin
    except errors.CyllmError:
        detail = False
    coordinators: list[CoordinatorHealth] = []
    workers: dict[str, WorkerHealth] = {}
    for address, state in await request.app.state.client.cluster_status():
        if state is None:
            coordinators.append(CoordinatorHealth(address=address, reachable=False))
            continue
        coordinators.append(
            CoordinatorHealth(
                address=address,
                reachable=True,
                id=state.coordinator_id,
                backend=state.backend,
                queue_depth=state.queue_depth,
                queue_capacity=state.queue_capacity,
                cache_hits=state.cache_hits,
                cache_misses=state.cache_misses,
            )
        )
        for w in state.workers:
            details = (
                dict(
                    address=w.worker.address,
                    models=[m.id for m in w.worker.models],
                    device=w.worker.device,
                    running=w.running,
                    tokens_generated=w.tokens_generated,
                    training_job=w.worker.training_job or None,
                    training_shares_device=w.worker.training_shares_device if w.worker.training_job else None,
                )
                if detail
                else {}
            )
            workers.setdefault(
                w.worker.worker_id,
                WorkerHealth(
                    id=w.worker.worker_id,
                    healthy=w.healthy,
                    unhealthy_reason=w.unhealthy_reason,
                    outstanding=w.outstanding,
                    capacity=w.worker.capacity,
                    **details,
                ),
            )
    healthy = any(w.healthy for w in workers.values())
    all_up = healthy and all(c.reachable for c in coordinators) and all(w.healthy for w in workers.values())
    status: Literal["ok", "degraded", "down"] = "ok" if all_up else ("degraded" if healthy else "down")
    body = HealthResponse(status=status, coordinators=coordinators, workers=list(workers.values()))
    return JSONResponse(
        body.model_dump(by_alias=True, exclude_none=True), status_code=200 if healthy else 503
    )
