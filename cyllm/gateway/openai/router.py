"""The OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from cyllm import errors
from cyllm.gateway.auth import authenticate
from cyllm.gateway.choices import answers, merged, started, usage
from cyllm.gateway.client import coordinator
from cyllm.gateway.context import context
from cyllm.gateway.errors import GENERATION_ERRORS, Responses, responses, stream_error
from cyllm.gateway.generation import Done, Failed, Generation
from cyllm.gateway.openai.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    FunctionCall,
    Model,
    ModelList,
    ToolCall,
    chat_logprobs,
    chunk,
    completion_logprobs,
    vllm_prompt_logprobs,
)
from cyllm.gateway.ratelimit import limit_control
from cyllm.gateway.sse import frame, sse_response
from cyllm.gateway.tools import CallStream, Toolbox, one_per_index
from cyllm.gateway.usage import TokenUsage

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(authenticate)])

ERRORS = GENERATION_ERRORS
STREAM_OR_JSON: Responses = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "JSON, or Server-Sent Events when stream is true",
    }
}
CHAT, TEXT = "chat.completion.chunk", "text_completion"


@router.post("/chat/completions", response_model=ChatCompletion, responses={**ERRORS, **STREAM_OR_JSON})
async def chat_completions(
    body: ChatCompletionRequest, request: Request
) -> ChatCompletion | StreamingResponse:
    rid = f"chatcmpl-{context(request).request_id}"
    req = body.to_request()
    tools = req.tools
    gens = await started(request, req, whole=not body.stream)
    created = int(time.time())
    if body.stream:
        whole = tools is not None and tools.choice != "none"
        frames = [
            _choice_frames(
                g, CHAT, rid, created, body.model, tools if whole else None, logprobs=req.logprobs is not None
            )
            for g in gens
        ]
        return sse_response(_stream(frames, gens, CHAT, rid, created, body.model, body.include_usage))
    texts = await answers(gens)
    choices = []
    for i, (g, text) in enumerate(zip(gens, texts)):
        message, finish = _answer(text, g.outcome.finish_reason, tools)
        choices.append(
            ChatChoice(
                index=i,
                message=message,
                finish_reason=finish,
                logprobs=chat_logprobs(g.logprobs) if req.logprobs is not None else None,
            )
        )
    return ChatCompletion(
        id=rid,
        created=created,
        model=body.model,
        choices=choices,
        usage=TokenUsage.of(usage(gens)),
        prompt_logprobs=vllm_prompt_logprobs(gens[0].prompt_logprobs)
        if req.prompt_logprobs is not None
        else None,
    )


@router.post("/completions", response_model=Completion, responses={**ERRORS, **STREAM_OR_JSON})
async def completions(body: CompletionRequest, request: Request) -> Completion | StreamingResponse:
    """``echo`` (with ``logprobs``, and ``max_tokens: 0``): the prompt's text and its
    tokens' logprobs come first, as lm-evaluation-harness scores a continuation."""
    rid = f"cmpl-{context(request).request_id}"
    req = body.to_request()
    gens = await started(request, req, whole=not body.stream)
    created = int(time.time())
    if body.stream:
        frames = [
            _choice_frames(g, TEXT, rid, created, body.model, logprobs=req.logprobs is not None, echo=body)
            for g in gens
        ]
        return sse_response(_stream(frames, gens, TEXT, rid, created, body.model, body.include_usage))
    texts = await answers(gens)
    echo_logprobs = body.echo and body.logprobs is not None
    return Completion(
        id=rid,
        created=created,
        model=body.model,
        usage=TokenUsage.of(usage(gens)),
        choices=[
            CompletionChoice(
                index=i,
                text=body.echoed(g.prompt_logprobs) + text,
                finish_reason=g.outcome.finish_reason,
                logprobs=completion_logprobs(g.logprobs, prompt=g.prompt_logprobs if echo_logprobs else ())
                if req.logprobs is not None
                else None,
                prompt_logprobs=vllm_prompt_logprobs(g.prompt_logprobs)
                if body.prompt_logprobs is not None
                else None,
            )
            for i, (g, text) in enumerate(zip(gens, texts))
        ],
    )


def _answer(text: str, finish: str, tools: Toolbox | None) -> tuple[AssistantMessage, str]:
    """The assistant's message: its tool calls (finish ``tool_calls``) when its finished
    output is one, else its text."""
    content, calls, finish = tools.answer(text, finish) if tools is not None else (text, [], finish)
    return AssistantMessage(
        content=content,
        tool_calls=[
            ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls
        ]
        or None,
    ), finish


async def _choice_frames(
    gen: Generation,
    kind: str,
    rid: str,
    created: int,
    model: str,
    tools: Toolbox | None = None,
    *,
    logprobs: bool = False,
    echo: CompletionRequest | None = None,
) -> AsyncGenerator[dict[str, Any] | Failed, None]:
    """One choice's chunks (a role delta first for chat), its finish chunk last; or a
    Failed.  A forced tool choice streams its calls as they are generated
    (``CallStream``); with ``auto`` whether the answer is a call is known at its end, so
    it comes whole: one content delta, or one tool-call delta per call."""
    i = gen.choice
    if kind == CHAT:
        yield chunk(kind, rid, created, model, delta={"role": "assistant", "content": ""}, index=i)
    calls = CallStream() if tools is not None and tools.forced else None
    pieces: list[str] = []
    offset = 0  # completions' text_offset
    if echo is not None and echo.echo:  # the prompt first, scored where asked
        head = echo.echoed(gen.prompt_logprobs)
        scored = completion_logprobs([], 0, gen.prompt_logprobs) if logprobs else None
        yield chunk(kind, rid, created, model, text=head, index=i, logprobs=scored)
        offset = len(head)
    async for event in gen.events():
        if isinstance(event, Failed):
            yield event
        elif isinstance(event, Done):
            finish = event.outcome.finish_reason
            if tools is not None:
                message, finish = _answer("".join(pieces), finish, tools)
                if calls is None and message.tool_calls:  # auto: known only now, sent whole
                    deltas = [{"index": n, **c.model_dump()} for n, c in enumerate(message.tool_calls)]
                    yield chunk(kind, rid, created, model, delta={"tool_calls": deltas}, index=i)
                elif calls is None and message.content:
                    yield chunk(kind, rid, created, model, delta={"content": message.content}, index=i)
            yield chunk(kind, rid, created, model, finish_reason=finish, index=i)
        elif tools is not None:
            pieces.append(event.text)
            if calls is not None:
                for deltas in one_per_index(calls.feed(event.text)):
                    yield chunk(kind, rid, created, model, delta={"tool_calls": deltas}, index=i)
        elif kind == CHAT:
            yield chunk(
                kind,
                rid,
                created,
                model,
                delta={"content": event.text},
                index=i,
                logprobs=chat_logprobs(event.logprobs) if logprobs else None,
            )
        else:
            yield chunk(
                kind,
                rid,
                created,
                model,
                text=event.text,
                index=i,
                logprobs=completion_logprobs(event.logprobs, offset) if logprobs else None,
            )
            offset += len(event.text)


async def _stream(
    choices: list[AsyncGenerator[dict[str, Any] | Failed, None]],
    gens: list[Generation],
    kind: str,
    rid: str,
    created: int,
    model: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The choices' chunks as they come, then the usage chunk if asked and ``[DONE]``; or
    an error object (and no ``[DONE]``), the other choices cancelled."""
    async with merged(choices) as items:
        async for item in items:
            if isinstance(item, Failed):
                yield frame(stream_error(item.error))
                return
            yield frame(item)
    if include_usage:
        yield frame(chunk(kind, rid, created, model, usage=TokenUsage.of(usage(gens)), choices=False))
    yield frame("[DONE]")


@router.get("/models", response_model=ModelList, responses=responses(401, 500, 503))
async def list_models(request: Request) -> ModelList:
    models = await coordinator(request).list_models()
    caller = context(request).caller
    return ModelList(
        data=[
            Model(id=m.id, created=m.created, max_model_len=m.context_length or None)
            for m in models  # loaded, or loaded on demand when asked for
            if caller.may_use(m.id)
        ]
    )


@router.get("/models/{model_id:path}", response_model=Model, responses=responses(401, 404, 500, 503))
async def get_model(model_id: str, request: Request) -> Model:
    for m in await coordinator(request).list_models():
        if m.id == model_id and context(request).caller.may_use(m.id):
            return Model(id=m.id, created=m.created, max_model_len=m.context_length or None)
    raise errors.ModelNotFound(f"model {model_id!r} does not exist", param="model")


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


@router.delete(
    "/models/{model_id:path}",
    response_model=ModelDeleted,
    dependencies=[Depends(limit_control)],
    responses=responses(400, 401, 403, 404, 429, 500, 503),
)
async def delete_model(model_id: str, request: Request) -> ModelDeleted:
    """Delete a fine-tuned model you own (OpenAI's ``client.models.delete``)."""
    await coordinator(request).delete_model(model_id)
    return ModelDeleted(id=model_id, deleted=True)
