"""Schemas of the native API (``/api/v1``); JSON fields are camelCase."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from cyllm.gateway import request as gen
from cyllm.gateway import schemas
from cyllm.gateway.request import MAX_CHOICES, MAX_ITEMS, GenerationRequest, token_biases
from cyllm.gateway.tools import Call, Toolbox, toolbox
from cyllm.gateway.usage import TokenUsage
from cyllm.protocol import pb


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ToolCall(_Camel):
    id: str = Field(min_length=1, max_length=128)
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=65536, description="JSON text")

    @classmethod
    def of(cls, call: Call) -> ToolCall:
        return cls(id=call.id, name=call.name, arguments=call.arguments)


class Message(_Camel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] | None = Field(None, max_length=128, description="an assistant's calls")
    tool_call_id: str | None = Field(None, max_length=128, description="a tool's answer: to which call")

    def to_message(self) -> gen.Message:
        return gen.Message(
            self.role,
            self.content,
            tuple(gen.ToolCall(c.id, c.name, c.arguments) for c in self.tool_calls or ()),
            self.tool_call_id or "",
        )


class Tool(_Camel):
    """A function the model may call (OpenAI's ``tools[].function``, without the wrapper)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=4096)
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema of the arguments")


class ToolChoice(_Camel):
    name: str = Field(min_length=1, max_length=64, description="the function that must be called")


class JsonSchema(_Camel, schemas.JsonSchemaFormat):
    pass


class ResponseFormat(_Camel, schemas.ResponseFormat):
    """As OpenAI's ``response_format``: ``{"type": "jsonSchema", "jsonSchema": {"schema": ...}}``,
    ``{"type": "jsonObject"}`` or ``{"type": "text"}`` (the snake_case type names work too)."""

    type: Literal[  # type: ignore[assignment]  # the camelCase names too: kind() maps them back
        "text", "jsonObject", "jsonSchema", "json_object", "json_schema"
    ]
    json_schema: JsonSchema | None = None

    def kind(self) -> str:
        return {"jsonObject": "json_object", "jsonSchema": "json_schema"}.get(self.type, self.type)


class InferenceRequest(_Camel):
    """``prompt`` is sent as one user message through the model's chat template, unless
    ``raw`` is true (then it is completed as plain text); ``messages`` gives the whole
    conversation instead."""

    model_id: str = Field(min_length=1)
    prompt: str | None = Field(None, min_length=1)
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_ITEMS)
    raw: bool = False
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: list[str] | None = Field(None, max_length=4)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    priority: int = Field(0, ge=-100, le=100, description="higher is served first")
    response_format: ResponseFormat | None = Field(
        None, description="JSON output under a grammar, as OpenAI's response_format"
    )
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024, description="token id -> -100..100")
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="answers to the same prompt (choices)")
    logprobs: bool = Field(False, description="each generated token's log probability")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="and this many alternatives (needs logprobs)"
    )
    tools: list[Tool] | None = Field(None, max_length=128, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = Field(
        None, description="'auto' (the default with tools), 'none', 'required', or {name}"
    )
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> InferenceRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.raw and self.messages is not None:
            raise ValueError("raw applies to prompt only")
        if self.raw and self.tools:
            raise ValueError("tools need a chat (messages or a prompt without raw)")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("topLogprobs needs logprobs: true")
        return self

    @property
    def top(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def toolbox(self) -> Toolbox | None:
        tools = [{"type": "function", "function": t.model_dump(exclude_none=True)} for t in self.tools or ()]
        choice = (
            {"function": {"name": self.tool_choice.name}}
            if isinstance(self.tool_choice, ToolChoice)
            else self.tool_choice
        )
        return toolbox(tools, choice, self.parallel_tool_calls)

    def to_request(self) -> GenerationRequest:
        """``prompt`` is one user message, or with ``raw`` the prompt itself."""
        messages = (
            [m.to_message() for m in self.messages]
            if self.messages is not None
            else None
            if self.raw
            else [gen.Message("user", self.prompt or "")]
        )
        return GenerationRequest(
            self.model_id,
            messages=messages,
            prompt=self.prompt if self.raw else None,
            sampling=gen.Sampling(
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                stop=tuple(self.stop or ()),
                seed=self.seed,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty,
                logit_bias=token_biases(self.logit_bias),
                min_tokens=self.min_tokens,
                ignore_eos=self.ignore_eos,
            ),
            constraint=self.response_format.constraint() if self.response_format else None,
            tools=self.toolbox(),
            logprobs=self.top,
            n=self.n,
            priority=self.priority,
        )


class TopLogprob(_Camel):
    token: str
    logprob: float


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)

    @classmethod
    def all_of(cls, logprobs: Sequence[pb.TokenLogprob]) -> list[TokenLogprob]:
        return [
            cls(
                token=lp.token,
                logprob=lp.logprob,
                top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob) for t in lp.top],
            )
            for lp in logprobs
        ]


class Usage(_Camel, TokenUsage):
    """OpenAI's usage object in camelCase."""


class Choice(_Camel):
    """One of ``n`` answers (the response's own fields are the first's)."""

    index: int
    text: str | None = Field(description="null when the answer is tool calls")
    finish_reason: str = Field(description="stop | length | tool_calls | abort")
    tool_calls: list[ToolCall] | None = None
    logprobs: list[TokenLogprob] | None = None


class ChoiceEnd(_Camel):
    index: int
    finish_reason: str
    tool_calls: list[ToolCall] | None = None


class InferenceDone(_Camel):
    """The last event of a native stream (SSE ``done``, WebSocket ``{"type": "done"}``):
    the first choice's end, with every choice's in ``choices`` when ``n`` > 1."""

    id: str
    finish_reason: str
    cached: bool
    usage: Usage
    tool_calls: list[ToolCall] | None = None
    choices: list[ChoiceEnd] | None = None


class InferenceResponse(_Camel):
    id: str
    model_id: str
    text: str | None = Field(description="null when the answer is tool calls")
    finish_reason: str
    cached: bool
    usage: Usage
    tool_calls: list[ToolCall] | None = None
    logprobs: list[TokenLogprob] | None = None
    choices: list[Choice] | None = Field(None, description="every answer, when n > 1")


ModelState = Literal["loaded", "available"]


class ModelEntry(_Camel):
    id: str
    context_length: int
    engine: str
    created: int
    state: ModelState = "loaded"
    base: str | None = Field(None, description="for a model made here (or an adapter): its base model")
    device: str | None = None
    memory_bytes: int | None = Field(None, description="the worker's estimate: weights + KV cache")
    kind: str | None = Field(None, description="a model made here: adapter | peft | model")
    job_id: str | None = Field(None, description="the training job that made it")
    evaluation: dict[str, float] | None = Field(None, description="its scores on its job's validation data")
    aliases: list[str] | None = Field(None, description="your aliases that point at it")
    owner: str | None = Field(None, description="for its owner and admins")
    published_to: list[str] | None = Field(None, description="tenants it is published to ('*': all)")
    path: str | None = Field(None, description="where its artefact lives, for its owner and admins")


class PublishRequest(_Camel):
    tenants: list[str] = Field(default_factory=list, max_length=256, description="publish to these tenants")
    everyone: bool = Field(False, description="publish to every tenant")
    withdraw: bool = Field(False, description="published to nobody but its owner again")


class ModelDeleted(_Camel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


class AliasMove(_Camel):
    from_model: str = Field(description="'' when the alias was new")
    to_model: str
    by: str
    at: float
    reason: str


class AliasSet(_Camel):
    model: str = Field(min_length=1, max_length=512, description="the model it points at from now on")
    expect: str | None = Field(None, description="move only if it points at this model now")
    reason: str | None = Field(None, max_length=500)


class AliasEntry(_Camel):
    name: str
    model: str
    moves: list[AliasMove] | None = Field(None, description="oldest first")


class AliasesResponse(_Camel):
    aliases: list[AliasEntry]


class LoadModelRequest(_Camel):
    """Optional body of ``POST /api/v1/models/{id}/load``."""

    adapter_path: str | None = Field(
        default=None, min_length=1, description="for '<base>:<adapter>': the PEFT folder, on the worker"
    )
    worker_id: str | None = Field(default=None, min_length=1, description="load on this worker")


class LoadModelResponse(_Camel):
    model: str
    worker_id: str
    evicted: list[str] = Field(description="unloaded to make room, least recently used first")
    models: list[ModelEntry] = Field(description="what that worker serves now")


class UnloadModelResponse(_Camel):
    model: str
    worker_ids: list[str]


class ModelsResponse(_Camel):
    models: list[ModelEntry]


class WorkerHealth(_Camel):
    """Without admin credentials only id, health and load are shown: the route is
    public, and which models run where is not."""

    id: str
    healthy: bool
    unhealthy_reason: str = ""
    outstanding: int
    capacity: int
    address: str | None = None
    models: list[str] | None = None
    device: str | None = None
    running: int | None = Field(None, description="generations in flight, as it last reported")
    tokens_generated: int | None = Field(None, description="tokens it has generated since it started")
    training_job: str | None = Field(None, description="the fine-tuning job it is running, if any")
    training_shares_device: bool | None = Field(
        None, description="while it trains: whether it still serves (false: its requests go elsewhere)"
    )


class CoordinatorHealth(_Camel):
    address: str
    reachable: bool
    id: str = ""
    backend: str = ""
    queue_depth: int = 0
    queue_capacity: int = 0
    cache_hits: int = 0
    cache_misses: int = 0


class HealthResponse(_Camel):
    status: Literal["ok", "degraded", "down"]
    coordinators: list[CoordinatorHealth]
    workers: list[WorkerHealth]
