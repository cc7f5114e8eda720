"""The native training routes: start, status, a progress stream, cancel and list.

A job that runs a ``custom`` script needs the admin scope (it runs code on a worker)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse

from cyllm import errors
from cyllm.gateway.auth import authenticate
from cyllm.gateway.client import coordinator
from cyllm.gateway.context import context
from cyllm.gateway.errors import responses, stream_error
from cyllm.gateway.native.training_schemas import (
    TrainingJobsResponse,
    TrainingJobView,
    TrainingStartRequest,
    event_dict,
)
from cyllm.gateway.ratelimit import check_training_budget, limit_control
from cyllm.gateway.sse import frame, sse_response

router = APIRouter(
    prefix="/api/v1/training", tags=["training"], dependencies=[Depends(authenticate), Depends(limit_control)]
)


def check_custom_allowed(request: Request, method: str) -> None:
    if method == "custom" and not context(request).caller.admin:
        raise errors.Forbidden("a custom training script runs code on a worker: admin scope needed")


@router.post(
    "/start",
    response_model=TrainingJobView,
    response_model_by_alias=True,
    responses=responses(400, 401, 403, 404, 429, 500, 503),
)
async def start(body: TrainingStartRequest, request: Request) -> TrainingJobView:
    """Queue a fine-tuning job; it runs on the first idle worker that has the base model."""
    check_custom_allowed(request, body.method)
    budget_s = await check_training_budget(request)
    context(request).caller.check_model(body.base_model)
    job = await coordinator(request).create_training_job(
        body.spec_json(), body.file_id or "", body.validation_file_id or "", budget_s
    )
    return TrainingJobView.of(job)


@router.get(
    "/status/{job_id}",
    response_model=TrainingJobView,
    response_model_by_alias=True,
    responses=responses(401, 404, 429, 500, 503),
)
async def status(job_id: str, request: Request) -> TrainingJobView:
    return TrainingJobView.of(await coordinator(request).get_training_job(job_id))


@router.get(
    "/jobs",
    response_model=TrainingJobsResponse,
    response_model_by_alias=True,
    responses=responses(400, 401, 429, 500, 503),
)
async def jobs(
    request: Request, limit: int = Query(20, ge=1, le=100), after: str = ""
) -> TrainingJobsResponse:
    """Newest first; ``after`` a job id to page on."""
    reply = await coordinator(request).list_training_jobs(limit, after)
    return TrainingJobsResponse(jobs=[TrainingJobView.of(j) for j in reply.jobs], has_more=reply.has_more)


@router.post(
    "/cancel/{job_id}",
    response_model=TrainingJobView,
    response_model_by_alias=True,
    responses=responses(400, 401, 404, 429, 500, 503),
)
async def cancel(job_id: str, request: Request) -> TrainingJobView:
    """Stop a queued or running job (its process group on the worker is killed)."""
    return TrainingJobView.of(await coordinator(request).cancel_training_job(job_id))


@router.get(
    "/plot/{job_id}",
    response_class=Response,
    responses={
        **responses(401, 404, 429, 500, 503),
        200: {"content": {"image/png": {}}, "description": "train (and eval) loss by step"},
    },
)
async def plot(job_id: str, request: Request) -> Response:
    """The job's loss curve so far, drawn from its stored events (the same picture the
    trainer writes into the job folder as loss.png at the end)."""
    from cyllm.training.plot import loss_png

    client = coordinator(request)
    job = await client.get_training_job(job_id)
    train, evaluation = {}, {}
    for e in await client.list_training_events(job_id):
        if e.type == "metrics" and e.progress.step:
            train[e.progress.step] = e.progress.loss
        elif e.type == "eval":
            evaluation[e.progress.step] = e.progress.eval_loss
    spec = json.loads(job.spec_json)
    png = await asyncio.to_thread(
        loss_png,
        sorted(train.items()),
        sorted(evaluation.items()),
        f"{job.id}: {spec.get('method')} on {spec.get('base_model')}",
    )
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get(
    "/stream/{job_id}",
    responses={
        **responses(400, 401, 404, 429, 500, 503),
        200: {
            "content": {"text/event-stream": {}},
            "description": "events named by type: `state`, `metrics` (step, loss, learningRate, "
            "tokensPerSecond, etaS), `checkpoint`, `message`, `result`; the stream ends "
            "after the job's final `state` event",
        },
    },
)
async def stream(job_id: str, request: Request, after: int = Query(0, ge=0)) -> StreamingResponse:
    """The job's events from ``after`` (a sequence number) on, live, until it ends."""
    client = coordinator(request)
    await client.get_training_job(job_id)  # 404 before 200
    return sse_response(_events(client, job_id, after))


async def _events(client, job_id: str, after: int) -> AsyncIterator[str]:
    try:
        async for event in client.watch_training(job_id, after):
            yield frame(event_dict(event), event=event.type)
    except errors.CyllmError as exc:
        yield frame(stream_error(exc), event="error")
