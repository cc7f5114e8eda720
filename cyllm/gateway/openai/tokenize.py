"""vLLM's ``POST /tokenize`` and ``POST /detokenize``, as ``vllm serve`` offers them (tools
count tokens before they send, or check a template): a prompt (or messages, through the
model's chat template with its generation prompt, and tools) to the model's token ids,
and ids back to text.  The model's own tokenizer on a worker serving it; aliases and the
key's allow-list apply as for a generation."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from cyllm import errors
from cyllm.gateway.auth import authenticate
from cyllm.gateway.client import coordinator
from cyllm.gateway.context import context
from cyllm.gateway.errors import responses
from cyllm.gateway.openai.schemas import MAX_PROMPT_IDS, ChatMessage, TokenId, Tool
from cyllm.gateway.ratelimit import limit_control
from cyllm.gateway.request import MAX_ITEMS, GenerationRequest
from cyllm.gateway.tools import toolbox
from cyllm.protocol import pb

router = APIRouter(tags=["vllm"], dependencies=[Depends(authenticate), Depends(limit_control)])


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM's other options (add_special_tokens, ...)

    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(max_length=MAX_ITEMS)] | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model: str = Field(min_length=1)
    tokens: list[TokenId] = Field(max_length=MAX_PROMPT_IDS)


@router.post("/tokenize", responses=responses(400, 401, 404, 429, 500, 503))
async def tokenize(body: TokenizeRequest, request: Request) -> Any:
    if (body.prompt is None) == (body.messages is None):
        raise errors.InvalidRequest("give exactly one of prompt and messages", param="prompt")
    context(request).caller.check_model(body.model)
    tools = toolbox([t.model_dump(exclude_none=True) for t in body.tools or ()], None, True)
    wire = GenerationRequest(
        body.model,
        prompt=body.prompt,
        messages=[m.to_message() for m in body.messages] if body.messages is not None else None,
        tools=tools,
    ).to_proto("tokenize")
    out = pb.TokenizeRequest(model=body.model, tools=wire.tools)
    if body.messages is not None:
        out.messages.CopyFrom(wire.messages)
    else:
        out.prompt = wire.prompt
    reply = await coordinator(request).tokenize(out, context(request).request_id)
    return {
        "count": len(reply.tokens),
        "max_model_len": reply.max_model_len,
        "tokens": list(reply.tokens),
        "token_strs": list(reply.token_strs) if body.return_token_strs else None,
    }


@router.post("/detokenize", responses=responses(400, 401, 404, 429, 500, 503))
async def detokenize(body: DetokenizeRequest, request: Request) -> Any:
    context(request).caller.check_model(body.model)
    wire = pb.TokenizeRequest(model=body.model, tokens=pb.TokenIds(ids=body.tokens))
    reply = await coordinator(request).tokenize(wire, context(request).request_id)
    return {"prompt": reply.prompt}
