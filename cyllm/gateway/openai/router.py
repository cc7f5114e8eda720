"""The OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from cyllm import errors
from cyllm.gateway.auth import authenticate, coordinator
from cyllm.gateway.context import context
from cyllm.gateway.errors import GENERATION_ERRORS, responses, stream_error
from cyllm.gateway.generation import Done, Failed, Generation, build_request
from cyllm.gateway.openai.protocol import (
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
    Usage,
    chunk,
)
from cyllm.gateway.tools import Toolbox
from cyllm.gateway.sse import frame, sse_response

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(authenticate)])

ERRORS = GENERATION_ERRORS
STREAM_OR_JSON = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                        "description": "JSON, or Server-Sent Events when stream is true"}}
CHAT, TEXT = "chat.completion.chunk", "text_completion"


@router.post("/chat/completions", response_model=ChatCompletion, responses={**ERRORS, **STREAM_OR_JSON})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletion | StreamingResponse:
    rid = f"chatcmpl-{context(request).request_id}"
    tools, constraint = body.toolbox(), body.constraint()
    if tools is not None and tools.forced:
        if constraint is not None:
            raise errors.InvalidRequest("response_format cannot be combined with a tool_choice "
                                        "that forces a call", param="tool_choice")
        constraint = tools.constraint()
    req = build_request(
        rid, body.model, messages=body.conversation(), max_tokens=body.token_limit,
        temperature=body.temperature, top_p=body.top_p, stop=body.stop, seed=body.seed,
        constraint=constraint, **body.rules(),
        tools=json.dumps([t.model_dump(exclude_none=True) for t in body.tools or ()]) if tools else "",
    )
    gen = await Generation(request, req, whole=not body.stream).start()
    created = int(time.time())
    if body.stream and tools is not None and tools.choice != "none":
        return sse_response(_stream_calls(gen, tools, rid, created, body.model, body.include_usage))
    if body.stream:
        return sse_response(_stream(gen, CHAT, rid, created, body.model, body.include_usage))
    text = await gen.text()
    message, finish = _answer(text, gen.outcome.finish_reason, tools)
    return ChatCompletion(
        id=rid, created=created, model=body.model, usage=Usage.of(gen.outcome),
        choices=[ChatChoice(message=message, finish_reason=finish)],
    )


def _answer(text: str, finish: str, tools: Toolbox | None) -> tuple[AssistantMessage, str]:
    """The assistant's message: its tool calls (finish ``tool_calls``) when its finished
    output is one, else its text."""
    calls = tools.parse(text) if tools is not None and finish == "stop" else []
    if not calls:
        return AssistantMessage(content=text), finish
    return AssistantMessage(content=None, tool_calls=[
        ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls
    ]), "tool_calls"


async def _stream_calls(gen: Generation, tools: Toolbox, rid: str, created: int, model: str,
                        include_usage: bool) -> AsyncIterator[str]:
    """With tools, whether the answer is a call is known at its end: the stream carries
    it whole, as one content delta or one tool-call delta per call (OpenAI's shape)."""
    yield frame(chunk(CHAT, rid, created, model, delta={"role": "assistant", "content": ""}))
    pieces: list[str] = []
    async for event in gen.events():
        if isinstance(event, Failed):
            yield frame(stream_error(event.error))
        elif isinstance(event, Done):
            message, finish = _answer("".join(pieces), event.outcome.finish_reason, tools)
            if message.tool_calls:
                calls = [{"index": i, **c.model_dump()} for i, c in enumerate(message.tool_calls)]
                yield frame(chunk(CHAT, rid, created, model, delta={"tool_calls": calls}))
            elif message.content:
                yield frame(chunk(CHAT, rid, created, model, delta={"content": message.content}))
            yield frame(chunk(CHAT, rid, created, model, finish_reason=finish))
            if include_usage:
                yield frame(chunk(CHAT, rid, created, model, usage=Usage.of(event.outcome),
                                  choices=False))
            yield frame("[DONE]")
        else:
            pieces.append(event.text)


@router.post("/completions", response_model=Completion, responses={**ERRORS, **STREAM_OR_JSON})
async def completions(body: CompletionRequest, request: Request) -> Completion | StreamingResponse:
    rid = f"cmpl-{context(request).request_id}"
    req = build_request(
        rid, body.model, prompt=body.text(), max_tokens=body.max_tokens,
        temperature=body.temperature, top_p=body.top_p, stop=body.stop, seed=body.seed,
        constraint=body.constraint(), **body.rules(),
    )
    gen = await Generation(request, req, whole=not body.stream).start()
    created = int(time.time())
    if body.stream:
        return sse_response(_stream(gen, TEXT, rid, created, body.model, body.include_usage))
    text = await gen.text()
    return Completion(
        id=rid, created=created, model=body.model, usage=Usage.of(gen.outcome),
        choices=[CompletionChoice(text=text, finish_reason=gen.outcome.finish_reason)],
    )


async def _stream(gen: Generation, kind: str, rid: str, created: int, model: str,
                  include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunks: (chat: a role delta first) a chunk per piece, then the finish
    reason, the usage chunk if asked, ``[DONE]``; or an error object, and no ``[DONE]``."""
    if kind == CHAT:
        yield frame(chunk(kind, rid, created, model, delta={"role": "assistant", "content": ""}))
    async for event in gen.events():
        if isinstance(event, Failed):
            yield frame(stream_error(event.error))
        elif isinstance(event, Done):
            yield frame(chunk(kind, rid, created, model, finish_reason=event.outcome.finish_reason))
            if include_usage:
                yield frame(chunk(kind, rid, created, model, usage=Usage.of(event.outcome),
                                  choices=False))
            yield frame("[DONE]")
        elif kind == CHAT:
            yield frame(chunk(kind, rid, created, model, delta={"content": event.text}))
        else:
            yield frame(chunk(kind, rid, created, model, text=event.text))


@router.get("/models", response_model=ModelList, responses=responses(401, 500, 503))
async def list_models(request: Request) -> ModelList:
    models = await coordinator(request).list_models()
    caller = context(request).caller
    # Only what can answer now; /api/v1/models also lists models that can be loaded.
    return ModelList(data=[Model(id=m.id, created=m.created) for m in models
                           if m.state != "available" and caller.may_use(m.id)])


@router.get("/models/{model_id:path}", response_model=Model, responses=responses(401, 404, 500, 503))
async def get_model(model_id: str, request: Request) -> Model:
    for m in await coordinator(request).list_models():
        if m.id == model_id and m.state != "available" and context(request).caller.may_use(m.id):
            return Model(id=m.id, created=m.created)
    raise errors.ModelNotFound(f"model {model_id!r} does not exist", param="model")
