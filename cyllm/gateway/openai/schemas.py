"""OpenAI-compatible request and response schemas (the ``/v1`` surface)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cyllm import errors
from cyllm.gateway import request as gen
from cyllm.gateway.request import MAX_CHOICES, MAX_ITEMS, GenerationRequest, token_biases
from cyllm.gateway.schemas import ResponseFormat
from cyllm.gateway.tools import Toolbox, toolbox
from cyllm.gateway.usage import TokenUsage
from cyllm.protocol import pb

INT32_MAX = 2**31 - 1  # the gRPC contract's int32: larger counts are refused here, not there


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=65536)


class ToolCall(BaseModel):
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_ITEMS)] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)
    tool_call_id: str | None = Field(None, max_length=128)

    def to_message(self) -> gen.Message:
        return gen.Message(
            "system" if self.role == "developer" else self.role,
            self.text(),
            tuple(gen.ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ()),
            self.tool_call_id or "",
        )

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionCallName(BaseModel):
    name: str = Field(min_length=1, max_length=64)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    # Unknown fields are accepted and ignored, as OpenAI's own SDKs add new ones often;
    # known features this server does not implement are refused in ``unsupported``.
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    user: str | None = None
    response_format: ResponseFormat | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    # vLLM's extra parameters (the openai client sends them with extra_body)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: int = Field(0, ge=0, le=INT32_MAX)
    ignore_eos: bool = False
    prompt_logprobs: int | None = Field(
        None, ge=0, le=20, description="vLLM's: each prompt token's logprob and this many alternatives"
    )

    @model_validator(mode="after")
    def _supported(self) -> _Sampling:
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop takes at most 4 sequences")
        if "tools" in (self.model_extra or {}):
            raise ValueError("tools are supported on /v1/chat/completions only")
        if self.prompt_logprobs is not None and self.stream:
            # as vLLM: they come in the whole answer only
            raise ValueError("prompt_logprobs are not available when stream is true")
        value = (self.model_extra or {}).get("functions")
        if value not in (None, False, [], {}):
            raise ValueError("functions is not supported by this server (use tools)")
        return self

    def sampling(self, max_tokens: int | None) -> gen.Sampling:
        return gen.Sampling(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=token_biases(self.logit_bias),
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class FunctionSpec(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=4096)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionCallName


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_ITEMS)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @property
    def top(self) -> int | None:
        """How many alternatives per token (None: no logprobs)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise errors.InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def toolbox(self) -> Toolbox | None:
        tools = [t.model_dump(exclude_none=True) for t in self.tools or ()]
        choice = (
            self.tool_choice.model_dump() if isinstance(self.tool_choice, BaseModel) else self.tool_choice
        )
        return toolbox(tools, choice, self.parallel_tool_calls)

    def to_request(self) -> GenerationRequest:
        return GenerationRequest(
            self.model,
            messages=[m.to_message() for m in self.messages],
            sampling=self.sampling(self.max_completion_tokens or self.max_tokens),
            constraint=self.response_format.constraint() if self.response_format else None,
            tools=self.toolbox(),
            logprobs=self.top,
            n=self.n,
            prompt_logprobs=self.prompt_logprobs,
        )


TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
MAX_PROMPT_IDS = 1 << 17  # the longest context a model has; the worker checks its own


class CompletionRequest(_Sampling):
    # text, or token ids (as lm-evaluation-harness sends them); one prompt per request
    prompt: (
        str
        | Annotated[list[str], Field(max_length=MAX_ITEMS)]
        | Annotated[list[TokenId], Field(max_length=MAX_PROMPT_IDS)]
        | Annotated[
            list[Annotated[list[TokenId], Field(max_length=MAX_PROMPT_IDS)]], Field(max_length=MAX_ITEMS)
        ]
    )
    # OpenAI's default for completions; 0 (with echo and logprobs): score the prompt only
    max_tokens: int | None = Field(16, ge=0, le=INT32_MAX)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None

    def text(self) -> str | list[int]:
        prompt: Any = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise errors.InvalidRequest("only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise errors.InvalidRequest("prompt must not be empty", param="prompt")
        if self.suffix:
            raise errors.InvalidRequest("suffix is not supported", param="suffix")
        return prompt

    def echoed(self, scored: Sequence[pb.TokenLogprob]) -> str:
        """The prompt's text as ``echo`` sends it (token ids: their tokens' text)."""
        if not self.echo:
            return ""
        prompt = self.text()
        return prompt if isinstance(prompt, str) else "".join(lp.token for lp in scored)

    def to_request(self) -> GenerationRequest:
        """``echo``: the prompt is scored too (its tokens' text and, with ``logprobs``,
        their logprobs come first in the answer)."""
        prompt = self.text()
        scored = self.prompt_logprobs
        if self.echo and (self.logprobs is not None or not isinstance(prompt, str)):
            scored = max(scored or 0, self.logprobs or 0)  # (token ids: their text comes scored)
        return GenerationRequest(
            self.model,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_ids=prompt if isinstance(prompt, list) else None,
            sampling=self.sampling(self.max_tokens),
            constraint=self.response_format.constraint() if self.response_format else None,
            logprobs=self.logprobs,
            n=self.n,
            prompt_logprobs=scored,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=lambda v: v is None)


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: TokenUsage
    prompt_logprobs: list[dict[str, Any] | None] | None = Field(None, exclude_if=lambda v: v is None)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str
    logprobs: dict[str, Any] | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = Field(None, exclude_if=lambda v: v is None)


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: TokenUsage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cyllm"
    max_model_len: int | None = Field(None, description="the model's context length (vLLM's)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


def chunk(
    kind: str,
    rid: str,
    created: int,
    model: str,
    *,
    delta: dict[str, Any] | None = None,
    text: str | None = None,
    finish_reason: str | None = None,
    usage: TokenUsage | None = None,
    choices: bool = True,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed ``chat.completion.chunk`` or ``text_completion`` object."""
    body: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model}
    if choices:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish_reason, "logprobs": logprobs}
        if kind == "chat.completion.chunk":
            choice["delta"] = delta or {}
        else:
            choice["text"] = text or ""
        body["choices"] = [choice]
    else:
        body["choices"] = []
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body


def chat_logprobs(logprobs: Sequence[pb.TokenLogprob]) -> dict[str, Any]:
    """Chat's ``logprobs`` object: a content entry per token, with its alternatives."""

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t.token, t.logprob) for t in lp.top]}
            for lp in logprobs
        ],
        "refusal": None,
    }


def vllm_prompt_logprobs(scored: Sequence[pb.TokenLogprob]) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs``: None for the first token, then per token a map of token
    id to ``{logprob, rank, decoded_token}`` holding the token and its alternatives (rank
    1 is the likeliest)."""
    out: list[dict[str, Any] | None] = [None] if scored else []
    for lp in scored[1:]:
        entry = {
            str(t.token_id): {"logprob": t.logprob, "rank": r, "decoded_token": t.token}
            for r, t in enumerate(lp.top, 1)
        }
        entry[str(lp.token_id)] = {"logprob": lp.logprob, "rank": lp.rank or None, "decoded_token": lp.token}
        out.append(entry)
    return out


def completion_logprobs(
    logprobs: Sequence[pb.TokenLogprob], offset: int = 0, prompt: Sequence[pb.TokenLogprob] = ()
) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object: parallel lists, ``text_offset``
    counting characters from ``offset``; with ``prompt`` (echo) the prompt's tokens first,
    the very first with no logprob (as OpenAI's and vLLM's ``null``)."""
    offsets = []
    every = [*prompt, *logprobs]
    for lp in every:
        offsets.append(offset)
        offset += len(lp.token)
    first = 1 if prompt else 0
    return {
        "tokens": [lp.token for lp in every],
        "token_logprobs": [None] * first + [lp.logprob for lp in every[first:]],
        "top_logprobs": [None] * first + [{t.token: t.logprob for t in lp.top} for lp in every[first:]],
        "text_offset": offsets,
    }
