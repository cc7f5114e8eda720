"""The OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from cyllm import errors
from cyllm.gateway.auth import authenticate
from cyllm.gateway.errors import GENERATION_ERRORS, responses, stream_error
from cyllm.gateway.generation import Generation, build_request
from cyllm.gateway.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Model,
    ModelList,
    Usage,
    chunk,
)
from cyllm.gateway.sse import frame, sse_response

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(authenticate)])

ERRORS = GENERATION_ERRORS
STREAM_OR_JSON = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                        "description": "JSON, or Server-Sent Events when stream is true"}}


def _usage(gen: Generation) -> Usage:
    o = gen.outcome
    return Usage(prompt_tokens=o.prompt_tokens, completion_tokens=o.completion_tokens,
                 total_tokens=o.prompt_tokens + o.completion_tokens)


@router.post("/chat/completions", response_model=ChatCompletion, responses={**ERRORS, **STREAM_OR_JSON})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletion | StreamingResponse:
    rid = f"chatcmpl-{request.state.request_id}"
    req = build_request(
        rid, body.model, messages=body.conversation(), max_tokens=body.token_limit,
        temperature=body.temperature, top_p=body.top_p, stop=body.stop, seed=body.seed,
    )
    gen = await Generation(request, req).start()
    created = int(time.time())
    if body.stream:
        return sse_response(_chat_stream(gen, rid, created, body))
    text = await gen.text()
    return ChatCompletion(
        id=rid, created=created, model=body.model, usage=_usage(gen),
        choices=[ChatChoice(message=AssistantMessage(content=text),
                            finish_reason=gen.outcome.finish_reason)],
    )


async def _chat_stream(gen: Generation, rid: str, created: int, body: ChatCompletionRequest) -> AsyncIterator[str]:
    kind = "chat.completion.chunk"
    yield frame(chunk(kind, rid, created, body.model, delta={"role": "assistant", "content": ""}))
    try:
        async for text in gen.deltas():
            yield frame(chunk(kind, rid, created, body.model, delta={"content": text}))
    except errors.CyllmError as exc:
        yield frame(stream_error(exc))
        return
    yield frame(chunk(kind, rid, created, body.model, finish_reason=gen.outcome.finish_reason))
    if body.include_usage:
        yield frame(chunk(kind, rid, created, body.model, usage=_usage(gen), choices=False))
    yield frame("[DONE]")


@router.post("/completions", response_model=Completion, responses={**ERRORS, **STREAM_OR_JSON})
async def completions(body: CompletionRequest, request: Request) -> Completion | StreamingResponse:
    rid = f"cmpl-{request.state.request_id}"
    req = build_request(
        rid, body.model, prompt=body.text(), max_tokens=body.max_tokens,
        temperature=body.temperature, top_p=body.top_p, stop=body.stop, seed=body.seed,
    )
    gen = await Generation(request, req).start()
    created = int(time.time())
    if body.stream:
        return sse_response(_completion_stream(gen, rid, created, body))
    text = await gen.text()
    return Completion(
        id=rid, created=created, model=body.model, usage=_usage(gen),
        choices=[CompletionChoice(text=text, finish_reason=gen.outcome.finish_reason)],
    )


async def _completion_stream(gen: Generation, rid: str, created: int, body: CompletionRequest) -> AsyncIterator[str]:
    kind = "text_completion"
    try:
        async for text in gen.deltas():
            yield frame(chunk(kind, rid, created, body.model, text=text))
    except errors.CyllmError as exc:
        yield frame(stream_error(exc))
        return
    yield frame(chunk(kind, rid, created, body.model, finish_reason=gen.outcome.finish_reason))
    if body.include_usage:
        yield frame(chunk(kind, rid, created, body.model, usage=_usage(gen), choices=False))
    yield frame("[DONE]")


@router.get("/models", response_model=ModelList, responses=responses(401, 500, 503))
async def list_models(request: Request) -> ModelList:
    models = await request.app.state.client.list_models()
    allowed = request.state.identity.models
    # Only what can answer now; /api/v1/models also lists models that can be loaded.
    return ModelList(data=[Model(id=m.id, created=m.created) for m in models
                           if m.state != "available" and (allowed is None or m.id in allowed)])


@router.get("/models/{model_id:path}", response_model=Model, responses=responses(401, 404, 500, 503))
async def get_model(model_id: str, request: Request) -> Model:
    for m in await request.app.state.client.list_models():
        if m.id == model_id and m.state != "available":
            return Model(id=m.id, created=m.created)
    raise errors.ModelNotFound(f"model {model_id!r} does not exist", param="model")
