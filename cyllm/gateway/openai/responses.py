"""OpenAI's Responses API (``POST /v1/responses``), the subset that maps onto a chat:
text (or a list of messages) in, text out, with ``instructions`` (a system message),
``max_output_tokens``, sampling, structured output (``text.format``), and streaming as
Responses events.  Nothing is stored: ``store`` is accepted and ignored, and what needs a
stored response (``previous_response_id``, ``background``) or is not built here (tools,
reasoning, ``include``, ``truncation: auto``, ``conversation``) is refused with a 400
naming it."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from cyllm import errors
from cyllm.gateway.auth import authenticate
from cyllm.gateway.context import context
from cyllm.gateway.errors import GENERATION_ERRORS, stream_error
from cyllm.gateway.generation import Done, Failed, Generation, Outcome
from cyllm.gateway.json_schema import Constraint, constraint_of
from cyllm.gateway.openai.schemas import INT32_MAX
from cyllm.gateway.request import MAX_ITEMS, GenerationRequest, Message, Sampling
from cyllm.gateway.sse import frame, sse_response

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(authenticate)])

# Set (to anything but their off value) → 400 naming the field.
UNSUPPORTED: dict[str, object] = {
    "previous_response_id": None,
    "background": False,
    "tools": [],
    "tool_choice": None,
    "reasoning": None,
    "include": [],
    "conversation": None,
    "prompt": None,
    "max_tool_calls": None,
}


class InputText(BaseModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(BaseModel):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[InputText], Field(max_length=MAX_ITEMS)]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class TextFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = Field(default=None, max_length=64)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextOptions(BaseModel):
    format: TextFormat = Field(default_factory=TextFormat)


class ResponseRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # new SDK fields: refused below when known

    model: str = Field(min_length=1)
    input: str | Annotated[list[InputMessage], Field(min_length=1, max_length=MAX_ITEMS)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    text: TextOptions | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = None
    truncation: Literal["disabled"] | None = None

    def refuse_unsupported(self) -> None:
        for name, off in UNSUPPORTED.items():
            if (self.model_extra or {}).get(name, off) not in (off, None):
                raise errors.InvalidRequest(
                    f"{name} is not supported on /v1/responses by this server", param=name
                )

    def to_request(self) -> GenerationRequest:
        turns = (
            [Message("user", self.input)]
            if isinstance(self.input, str)
            else [Message("system" if m.role == "developer" else m.role, m.text()) for m in self.input]
        )
        if self.instructions:
            turns.insert(0, Message("system", self.instructions))
        return GenerationRequest(
            self.model,
            messages=turns,
            messages_param="input",
            constraint=self.constraint(),
            sampling=Sampling(
                max_tokens=self.max_output_tokens, temperature=self.temperature, top_p=self.top_p
            ),
        )

    def constraint(self) -> Constraint | None:
        fmt = self.text.format if self.text else TextFormat()
        if fmt.type == "json_schema" and fmt.schema_ is None:
            raise errors.InvalidRequest("text.format.schema is required for json_schema", param="text.format")
        return constraint_of(fmt.type, fmt.schema_)


@router.post("/responses", responses=GENERATION_ERRORS)
async def create_response(body: ResponseRequest, request: Request) -> Any:
    body.refuse_unsupported()
    rid = context(request).request_id
    gen = await Generation(request, body.to_request(), whole=not body.stream).start()
    shape = _Shape(body, f"resp_{rid}", f"msg_{rid}", int(time.time()))
    if body.stream:
        return sse_response(_events(gen, shape))
    text = await gen.text()
    return shape.response(text, gen.outcome)


class _Shape:
    """The Response object and its stream's events, for one request."""

    def __init__(self, body: ResponseRequest, rid: str, item: str, created: int) -> None:
        self.body, self.rid, self.item, self.created = body, rid, item, created
        self.seq = 0

    def message(self, text: str, status: str) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {
            "type": "message",
            "id": self.item,
            "status": status,
            "role": "assistant",
            "content": content if status != "in_progress" else [],
        }

    def response(
        self, text: str | None, outcome: Outcome | None, status: str | None = None
    ) -> dict[str, Any]:
        b = self.body
        incomplete = outcome is not None and outcome.finish_reason == "length"
        status = status or ("incomplete" if incomplete else "completed")
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
            "parallel_tool_calls": False,
            "tool_choice": "none",
            "tools": [],
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "text": {
                "format": (b.text.format if b.text else TextFormat()).model_dump(
                    by_alias=True, exclude_none=True
                )
            },
            "store": False,
            "truncation": "disabled",
            "user": b.user,
            "output": []
            if text is None
            else [self.message(text, "incomplete" if incomplete else "completed")],
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

    def event(self, kind: str, **fields: Any) -> str:
        self.seq += 1
        return frame({"type": kind, "sequence_number": self.seq, **fields}, event=kind)


async def _events(gen: Generation, shape: _Shape) -> AsyncIterator[str]:
    """Responses' stream: created, in_progress, the message and its text part added, a
    delta per piece, then the text, part, item and response done; an error event on a
    failure."""
    where = {"item_id": shape.item, "output_index": 0, "content_index": 0}
    yield shape.event("response.created", response=shape.response(None, None, "in_progress"))
    yield shape.event("response.in_progress", response=shape.response(None, None, "in_progress"))
    yield shape.event("response.output_item.added", output_index=0, item=shape.message("", "in_progress"))
    yield shape.event(
        "response.content_part.added", **where, part={"type": "output_text", "text": "", "annotations": []}
    )
    pieces: list[str] = []
    async for event in gen.events():
        if isinstance(event, Failed):
            error = json.loads(stream_error(event.error))["error"]
            yield shape.event(
                "error", code=error.get("code"), message=error["message"], param=error.get("param")
            )
            return
        if isinstance(event, Done):
            text, final = "".join(pieces), shape.response("".join(pieces), event.outcome)
            item = final["output"][0]
            yield shape.event("response.output_text.done", **where, text=text, logprobs=[])
            yield shape.event("response.content_part.done", **where, part=item["content"][0])
            yield shape.event("response.output_item.done", output_index=0, item=item)
            kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
            yield shape.event(kind, response=final)
            return
        pieces.append(event.text)
        yield shape.event("response.output_text.delta", **where, delta=event.text, logprobs=[])
