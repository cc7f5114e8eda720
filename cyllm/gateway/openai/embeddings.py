"""OpenAI's ``POST /v1/embeddings``: one vector per input text, from a worker serving the
model: an embedding model (``task: embed``, an encoder pooled as its folder says), or
any generative model on the transformers, vLLM and llama.cpp engines (the mean of its
last hidden states), always L2-normalised.  ``encoding_format`` ``float`` or ``base64``
(little-endian float32, as OpenAI's client decodes it); ``dimensions`` keeps the first
that many values, normalised again; inputs given as token ids are refused (send text)."""

from __future__ import annotations

import base64
import struct
from typing import Annotated, Any, Literal, TypeGuard

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from cyllm import errors
from cyllm.gateway.auth import authenticate
from cyllm.gateway.client import coordinator
from cyllm.gateway.context import BATCH_CALLER, context
from cyllm.gateway.errors import responses
from cyllm.gateway.generation import BATCH_PRIORITY
from cyllm.gateway.request import check_text
from cyllm.gateway.usage import Usage

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(authenticate)])

MAX_INPUTS = 2048


class EmbeddingRequest(BaseModel):
    model: str = Field(min_length=1)
    input: (
        str
        | Annotated[list[str], Field(max_length=MAX_INPUTS)]
        | Annotated[list[int], Field(max_length=MAX_INPUTS)]
        | Annotated[list[list[int]], Field(max_length=MAX_INPUTS)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=65536)
    user: str | None = None

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else self.input
        if not texts:
            raise errors.InvalidRequest("input must not be empty", param="input")
        if not _all_text(texts):
            raise errors.InvalidRequest("input as token ids is not supported; send text", param="input")
        if len(texts) > MAX_INPUTS:
            raise errors.InvalidRequest(f"input has {len(texts)} texts; at most {MAX_INPUTS}", param="input")
        for i, text in enumerate(texts):
            if not text:
                raise errors.InvalidRequest(f"input {i} is empty", param="input")
        check_text(texts, "input")
        return texts


def _all_text(items: list[Any]) -> TypeGuard[list[str]]:
    return all(isinstance(t, str) for t in items)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


@router.post(
    "/embeddings", response_model=EmbeddingList, responses=responses(400, 401, 403, 404, 413, 429, 500, 503)
)
async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingList:
    ctx = context(request)
    ctx.caller.check_model(body.model)
    texts = body.texts()
    limiter = request.app.state.limiter
    admission = await limiter.admit(ctx.caller, limiter.reservation(sum(map(len, texts)), None))
    tokens = 0
    try:
        priority = BATCH_PRIORITY if BATCH_CALLER in request.scope else 0
        reply = await coordinator(request).embed(
            body.model, texts, body.dimensions or 0, ctx.request_id, priority
        )
        tokens = reply.prompt_tokens
    finally:
        await limiter.finish(admission, tokens)
    ctx.usage = Usage(body.model, tokens)
    return EmbeddingList(
        model=body.model,
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        data=[
            EmbeddingData(index=i, embedding=_encoded(list(e.values), body.encoding_format))
            for i, e in enumerate(reply.data)
        ],
    )


def _encoded(values: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return values
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
