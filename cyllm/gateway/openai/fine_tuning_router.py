"""OpenAI's files and fine-tuning routes: ``/v1/files`` and ``/v1/fine_tuning/jobs``.

Lists are newest first, paged with ``after`` (an id) and ``limit``, as OpenAI's.
A job's ``fine_tuned_model`` is set when it succeeds and is at once a model of
``/v1/models`` and ``/v1/chat/completions``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Depends, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

from cyllm import errors
from cyllm.gateway.auth import authenticate
from cyllm.gateway.client import coordinator
from cyllm.gateway.context import context
from cyllm.gateway.errors import responses
from cyllm.gateway.native.training_router import check_custom_allowed
from cyllm.gateway.openai.fine_tuning_schemas import (
    FileDeleted,
    FileList,
    FileObject,
    FineTuningJob,
    FineTuningJobList,
    FineTuningJobRequest,
    JobCheckpoint,
    JobCheckpointList,
    JobEvent,
    JobEventList,
)
from cyllm.gateway.ratelimit import check_training_budget, limit_control
from cyllm.protocol import pb

router = APIRouter(
    prefix="/v1", tags=["openai fine-tuning"], dependencies=[Depends(authenticate), Depends(limit_control)]
)
_CHUNK = 1 << 20


@router.post("/files", response_model=FileObject, responses=responses(400, 401, 413, 429, 500, 503))
async def upload(request: Request, file: UploadFile, purpose: str = Form(...)) -> FileObject:
    """Upload a dataset (``purpose=fine-tune``) or a batch's requests (``purpose=batch``);
    it is parsed now and refused with the line or record that is wrong.  Limit:
    ``gateway.max_upload_bytes``."""

    async def chunks() -> AsyncIterator[pb.FileChunk]:
        first = True
        while data := await file.read(_CHUNK):
            yield (
                pb.FileChunk(filename=file.filename or "", purpose=purpose, data=data)
                if first
                else pb.FileChunk(data=data)
            )
            first = False
        if first:
            yield pb.FileChunk(filename=file.filename or "", purpose=purpose)

    return FileObject.of(await coordinator(request).upload_file(chunks()))


@router.get("/files", response_model=FileList, responses=responses(401, 429, 500, 503))
async def list_files(request: Request, purpose: str = "") -> FileList:
    files = await coordinator(request).list_files(purpose)
    return FileList(data=[FileObject.of(f) for f in reversed(files)])


@router.get("/files/{file_id}", response_model=FileObject, responses=responses(401, 404, 429, 500, 503))
async def get_file(file_id: str, request: Request) -> FileObject:
    return FileObject.of(await coordinator(request).get_file(file_id))


@router.get(
    "/files/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, **responses(401, 404, 429, 500, 503)},
)
async def file_content(file_id: str, request: Request) -> StreamingResponse:
    """The file's bytes: an upload, or a batch's output or error file."""
    client = coordinator(request)
    info = await client.get_file(file_id)  # a 404 before any byte is sent

    async def body() -> AsyncIterator[bytes]:
        async with aclosing(client.read_file(file_id)) as chunks:
            async for chunk in chunks:
                yield chunk.data

    return StreamingResponse(
        body(), media_type="application/octet-stream", headers={"content-length": str(info.bytes)}
    )


@router.delete("/files/{file_id}", response_model=FileDeleted, responses=responses(401, 404, 429, 500, 503))
async def delete_file(file_id: str, request: Request) -> FileDeleted:
    await coordinator(request).delete_file(file_id)
    return FileDeleted(id=file_id, deleted=True)


@router.post(
    "/fine_tuning/jobs", response_model=FineTuningJob, responses=responses(400, 401, 403, 404, 429, 500, 503)
)
async def create_job(body: FineTuningJobRequest, request: Request) -> FineTuningJob:
    if body.integrations:
        raise errors.InvalidRequest("integrations are not supported", param="integrations")
    spec = body.spec()
    check_custom_allowed(request, spec.get("method", "lora"))
    budget_s = await check_training_budget(request)
    # the model that will be trained: ``training`` may name it too, and must agree
    context(request).caller.check_model(str(spec["base_model"]))
    job = await coordinator(request).create_training_job(
        json.dumps(spec), body.training_file, body.validation_file or "", budget_s
    )
    return FineTuningJob.of(job)


@router.get(
    "/fine_tuning/jobs", response_model=FineTuningJobList, responses=responses(400, 401, 429, 500, 503)
)
async def list_jobs(
    request: Request, after: str = "", limit: int = Query(20, ge=1, le=100)
) -> FineTuningJobList:
    reply = await coordinator(request).list_training_jobs(limit, after)
    return FineTuningJobList(data=[FineTuningJob.of(j) for j in reply.jobs], has_more=reply.has_more)


@router.get(
    "/fine_tuning/jobs/{job_id}", response_model=FineTuningJob, responses=responses(401, 404, 429, 500, 503)
)
async def get_job(job_id: str, request: Request) -> FineTuningJob:
    return FineTuningJob.of(await _job(request, job_id))


@router.post(
    "/fine_tuning/jobs/{job_id}/cancel",
    response_model=FineTuningJob,
    responses=responses(400, 401, 404, 429, 500, 503),
)
async def cancel_job(job_id: str, request: Request) -> FineTuningJob:
    return FineTuningJob.of(await coordinator(request).cancel_training_job(job_id))


@router.get(
    "/fine_tuning/jobs/{job_id}/events",
    response_model=JobEventList,
    responses=responses(400, 401, 404, 429, 500, 503),
)
async def job_events(
    job_id: str, request: Request, after: str = "", limit: int = Query(20, ge=1, le=1000)
) -> JobEventList:
    """Newest first; ``after`` an event id: the events before it."""
    found = await coordinator(request).list_training_events(job_id)
    events = [JobEvent.of(job_id, e) for e in reversed(found)]
    events = _after(events, after)
    return JobEventList(data=events[:limit], has_more=len(events) > limit)


@router.get(
    "/fine_tuning/jobs/{job_id}/checkpoints",
    response_model=JobCheckpointList,
    responses=responses(400, 401, 404, 429, 500, 503),
)
async def job_checkpoints(
    job_id: str, request: Request, after: str = "", limit: int = Query(10, ge=1, le=100)
) -> JobCheckpointList:
    job = await _job(request, job_id)
    data = [
        JobCheckpoint(
            id=f"ftckpt-{job_id.removeprefix('ftjob-')}-{c.step}",
            created_at=c.created_at,
            fine_tuned_model_checkpoint=c.model,
            fine_tuning_job_id=job_id,
            metrics={"step": float(c.step), "train_loss": c.loss},
            step_number=c.step,
        )
        for c in reversed(job.checkpoints)
        if c.model  # as OpenAI: the kept checkpoints of a job that succeeded, each a model
    ]
    data = _after(data, after)
    page = data[:limit]
    return JobCheckpointList(
        data=page,
        has_more=len(data) > limit,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )


async def _job(request: Request, job_id: str) -> pb.TrainingJob:
    return await coordinator(request).get_training_job(job_id)


def _after(items: list, after: str) -> list:
    """The items after the one whose id is ``after`` (OpenAI's cursor); all without one."""
    if not after:
        return items
    ids = [item.id for item in items]
    return items[ids.index(after) + 1 :] if after in ids else []
