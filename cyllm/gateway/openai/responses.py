"""OpenAI's Responses API: ``POST /v1/responses`` (text or items in; a message or
function calls out; streamed as Responses events), ``GET`` and ``DELETE
/v1/responses/{id}`` and ``GET /v1/responses/{id}/input_items`` for stored ones.

A response is stored unless ``store: false`` (OpenAI's default is to store): its object
and its conversation (the input items, the earlier ones ``previous_response_id`` brought
in included, then its output) are kept by the coordinator for its owner
(``coordinator/services/responses.py``), so an agent can continue with
``previous_response_id`` and send only the new items.  ``instructions`` are not carried
over, as OpenAI does.  A stored response is written once it is complete; one that
failed is not stored.

Function tools work as on chat completions (``tools.py``): under ``required`` or a named
function the output is decoded under the calls' schema and streamed as it is generated
(``response.function_call_arguments.delta``); under ``auto`` whether the output is a
call is known at its end, so its item comes whole.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from cyllm import errors
from cyllm.gateway.auth import authenticate
from cyllm.gateway.client import coordinator
from cyllm.gateway.errors import GENERATION_ERRORS, responses, stream_error
from cyllm.gateway.generation import Done, Failed, Generation, Outcome
from cyllm.gateway.openai.responses_schemas import ResponseRequest, TextFormat, normal_items, stored_items
from cyllm.gateway.ratelimit import limit_control
from cyllm.gateway.sse import frame, sse_response
from cyllm.gateway.tools import Call, CallStream
from cyllm.protocol import pb

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(authenticate)])


@router.post("/responses", responses=GENERATION_ERRORS)
async def create_response(body: ResponseRequest, request: Request) -> Any:
    body.refuse_unsupported()
    history: list[dict[str, Any]] = []
    if body.previous_response_id:
        stored = await coordinator(request).get_response(body.previous_response_id)
        history = stored_items(stored.input_json) + normal_items(
            json.loads(stored.response_json).get("output", [])
        )
    req = body.to_request(history)
    gen = await Generation(request, req, whole=not body.stream).start()
    shape = _Shape(body, secrets.token_hex(12), int(time.time()), history + body.items())
    if body.stream:
        return sse_response(_events(gen, shape, request))
    text = await gen.text()
    final = shape.response(text, gen.outcome)
    await shape.keep(request, final)
    return final


@router.get(
    "/responses/{response_id}",
    dependencies=[Depends(limit_control)],
    responses=responses(400, 401, 404, 429, 500, 503),
)
async def get_response(response_id: str, request: Request) -> Any:
    return json.loads((await coordinator(request).get_response(response_id)).response_json)


@router.delete(
    "/responses/{response_id}",
    dependencies=[Depends(limit_control)],
    responses=responses(400, 401, 404, 429, 500, 503),
)
async def delete_response(response_id: str, request: Request) -> Any:
    await coordinator(request).delete_response(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


@router.get(
    "/responses/{response_id}/input_items",
    dependencies=[Depends(limit_control)],
    responses=responses(400, 401, 404, 429, 500, 503),
)
async def list_input_items(
    response_id: str,
    request: Request,
    order: Literal["asc", "desc"] = "desc",
    limit: int = Query(20, ge=1, le=100),
) -> Any:
    """The response's input items (its conversation before its output), newest first
    unless ``order=asc``, as OpenAI lists them."""
    items = stored_items((await coordinator(request).get_response(response_id)).input_json)
    data = [
        {"id": f"item_{response_id.removeprefix('resp_')}_{i}", **_as_listed(item)}
        for i, item in enumerate(items)
    ]
    data = (data[::-1] if order == "desc" else data)[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(items) > limit,
    }


def _as_listed(item: dict[str, Any]) -> dict[str, Any]:
    """An input item as OpenAI lists it: a message's text as a content part."""
    if item["type"] != "message":
        return {**item, "status": "completed"}
    part = "output_text" if item["role"] == "assistant" else "input_text"
    return {**item, "status": "completed", "content": [{"type": part, "text": item["content"]}]}


class _Shape:
    """The Response object and its stream's events, for one request."""

    def __init__(self, body: ResponseRequest, token: str, created: int, items: list[dict[str, Any]]) -> None:
        self.body, self.created, self.items = body, created, items
        self.rid, self.msg = f"resp_{token}", f"msg_{token}"
        self.tools = body.toolbox()
        self.seq = 0

    def message(self, text: str, status: str) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {
            "type": "message",
            "id": self.msg,
            "status": status,
            "role": "assistant",
            "content": content if status != "in_progress" else [],
        }

    @staticmethod
    def call(call: Call, status: str = "completed", arguments: str | None = None) -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": f"fc_{call.id.removeprefix('call_')}",
            "call_id": call.id,
            "name": call.name,
            "arguments": call.arguments if arguments is None else arguments,
            "status": status,
        }

    def output(self, text: str, finish: str) -> list[dict[str, Any]]:
        """The output items of a finished generation: its calls, or its message."""
        content, calls, _ = self.tools.answer(text, finish) if self.tools else (text, [], finish)
        if calls or content is None:  # (a forced choice cut before any call: no items)
            return [self.call(c) for c in calls]
        return [self.message(content, "incomplete" if finish == "length" else "completed")]

    def response(
        self,
        text: str | None,
        outcome: Outcome | None,
        status: str | None = None,
        output: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        b = self.body
        incomplete = outcome is not None and outcome.finish_reason == "length"
        status = status or ("incomplete" if incomplete else "completed")
        if output is None:
            output = [] if text is None or outcome is None else self.output(text, outcome.finish_reason)
        out = {
            "id": self.rid,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": b.model,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "temperature": b.temperature,
            "top_p": b.top_p,
            "metadata": b.metadata or {},
            "parallel_tool_calls": b.parallel_tool_calls is not False,
            "tool_choice": _choice(b),
            "tools": b.tools or [],
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "previous_response_id": b.previous_response_id,
            "text": {
                "format": (b.text.format if b.text else TextFormat()).model_dump(
                    by_alias=True, exclude_none=True
                )
            },
            "store": b.store,
            "truncation": "disabled",
            "user": b.user,
            "output": output,
            "usage": None,
        }
        if outcome is not None:
            out["usage"] = {
                "input_tokens": outcome.prompt_tokens,
                "output_tokens": outcome.completion_tokens,
                "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            }
        return out

    async def keep(self, request: Request, final: dict[str, Any]) -> None:
        """Store the finished response for its owner (unless ``store: false``)."""
        if not self.body.store:
            return
        await coordinator(request).put_response(
            pb.StoredResponse(
                id=self.rid,
                created_at=self.created,
                response_json=json.dumps(final),
                input_json=json.dumps(self.items),
            )
        )

    def event(self, kind: str, **fields: Any) -> str:
        self.seq += 1
        return frame({"type": kind, "sequence_number": self.seq, **fields}, event=kind)


def _choice(body: ResponseRequest) -> Any:
    if body.tool_choice is None:
        return "auto" if body.tools else "none"
    return body.tool_choice if isinstance(body.tool_choice, str) else body.tool_choice.model_dump()


async def _events(gen: Generation, shape: _Shape, request: Request) -> AsyncIterator[str]:
    """Responses' stream: created, in_progress, then the output items — a message's text
    delta by delta, or a forced call's arguments as they are generated, or (``auto``
    tools) the whole item at the end — then completed (or incomplete); an error event on
    a failure.  The finished response is stored before ``response.completed``."""
    yield shape.event("response.created", response=shape.response(None, None, "in_progress"))
    yield shape.event("response.in_progress", response=shape.response(None, None, "in_progress"))
    tools = shape.tools
    texts = tools is None or tools.choice == "none"  # text deltas as they come
    calls = CallStream() if tools is not None and tools.forced else None
    streamed: list[dict[str, Any]] = []  # the forced calls' items, as opened
    args: list[list[str]] = []  # and their arguments' pieces
    if texts:
        for opening in _message_opened(shape):
            yield opening
    pieces: list[str] = []
    async for event in gen.events():
        if isinstance(event, Failed):
            error = json.loads(stream_error(event.error))["error"]
            yield shape.event(
                "error", code=error.get("code"), message=error["message"], param=error.get("param")
            )
            return
        if isinstance(event, Done):
            text = "".join(pieces)
            final = shape.response(text, event.outcome)
            if calls is not None:  # the calls as streamed (a cut one: incomplete, no raw JSON)
                cut = event.outcome.finish_reason == "length"
                items = [
                    {**item, "arguments": "".join(args[n]), "status": "incomplete" if cut else "completed"}
                    for n, item in enumerate(streamed)
                ]
                final["output"] = items
                for closing in _calls_closed(shape, items):
                    yield closing
            elif texts:
                for closing in _message_closed(shape, final["output"][0], text):
                    yield closing
            else:
                for n, item in enumerate(final["output"]):  # auto: known only now, sent whole
                    yield shape.event("response.output_item.added", output_index=n, item=item)
                    if item["type"] == "message":
                        where = {"item_id": item["id"], "output_index": n, "content_index": 0}
                        empty = {"type": "output_text", "text": "", "annotations": []}
                        yield shape.event("response.content_part.added", **where, part=empty)
                        yield shape.event("response.output_text.delta", **where, delta=text, logprobs=[])
                        yield shape.event("response.output_text.done", **where, text=text, logprobs=[])
                        yield shape.event("response.content_part.done", **where, part=item["content"][0])
                    yield shape.event("response.output_item.done", output_index=n, item=item)
            try:
                await shape.keep(request, final)
            except errors.CyllmError as exc:  # answered, but not kept: say so, not a cut stream
                yield shape.event(
                    "error",
                    code=exc.code,
                    message=f"the response could not be stored: {exc.message}",
                    param="store",
                )
                return
            kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
            yield shape.event(kind, response=final)
            return
        pieces.append(event.text)
        if texts:
            where = {"item_id": shape.msg, "output_index": 0, "content_index": 0}
            yield shape.event("response.output_text.delta", **where, delta=event.text, logprobs=[])
        elif calls is not None:
            for delta in calls.feed(event.text):
                if "id" in delta:  # a new call: its item opens
                    call = Call(delta["id"], delta["function"]["name"], "")
                    streamed.append(shape.call(call, "in_progress"))
                    args.append([])
                    yield shape.event(
                        "response.output_item.added", output_index=len(streamed) - 1, item=streamed[-1]
                    )
                piece = delta["function"]["arguments"]
                args[-1].append(piece)
                if piece:
                    yield shape.event(
                        "response.function_call_arguments.delta",
                        item_id=streamed[-1]["id"],
                        output_index=len(streamed) - 1,
                        delta=piece,
                    )


def _message_opened(shape: _Shape) -> list[str]:
    where = {"item_id": shape.msg, "output_index": 0, "content_index": 0}
    return [
        shape.event("response.output_item.added", output_index=0, item=shape.message("", "in_progress")),
        shape.event(
            "response.content_part.added",
            **where,
            part={"type": "output_text", "text": "", "annotations": []},
        ),
    ]


def _message_closed(shape: _Shape, item: dict[str, Any], text: str) -> list[str]:
    where = {"item_id": shape.msg, "output_index": 0, "content_index": 0}
    return [
        shape.event("response.output_text.done", **where, text=text, logprobs=[]),
        shape.event("response.content_part.done", **where, part=item["content"][0]),
        shape.event("response.output_item.done", output_index=0, item=item),
    ]


def _calls_closed(shape: _Shape, items: list[dict[str, Any]]) -> list[str]:
    out = []
    for n, item in enumerate(items):
        out.append(
            shape.event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=n,
                name=item["name"],
                arguments=item["arguments"],
            )
        )
        out.append(shape.event("response.output_item.done", output_index=n, item=item))
    return out
