"""Schemas of the native API (``/api/v1``); JSON fields are camelCase."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from cyllm.gateway.generation import Outcome, TokenUsage, build_request, token_biases
from cyllm.gateway.schemas import constraint_of
from cyllm.protocol import pb


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Message(_Camel):
    role: Literal["system", "user", "assistant"]
    content: str


class JsonSchema(_Camel):
    name: str = Field("output", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Camel):
    """As OpenAI's ``response_format``: ``{"type": "jsonSchema", "jsonSchema": {"schema": ...}}``,
    ``{"type": "jsonObject"}`` or ``{"type": "text"}`` (the snake_case type names work too)."""

    type: Literal["text", "jsonObject", "jsonSchema", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _complete(self) -> ResponseFormat:
        if (self.type in ("jsonSchema", "json_schema")) != (self.json_schema is not None):
            raise ValueError("responseFormat.jsonSchema goes with type 'jsonSchema', and only there")
        return self

    def constraint(self) -> pb.Constraint | None:
        kind = {"jsonObject": "json_object", "jsonSchema": "json_schema"}.get(self.type, self.type)
        return constraint_of(kind, self.json_schema.schema_ if self.json_schema else None)


class InferenceRequest(_Camel):
    """``prompt`` is sent as one user message through the model's chat template, unless
    ``raw`` is true (then it is completed as plain text); ``messages`` gives the whole
    conversation instead."""

    model_id: str = Field(min_length=1)
    prompt: str | None = Field(None, min_length=1)
    messages: list[Message] | None = Field(None, min_length=1)
    raw: bool = False
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: list[str] | None = Field(None, max_length=4)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    priority: int = Field(0, ge=-100, le=100, description="higher is served first")
    response_format: ResponseFormat | None = Field(
        None, description="JSON output under a grammar, as OpenAI's response_format")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024,
                                                description="token id -> -100..100")
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> InferenceRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.raw and self.messages is not None:
            raise ValueError("raw applies to prompt only")
        return self

    def conversation(self) -> list[tuple[str, str]] | None:
        if self.messages is not None:
            return [(m.role, m.content) for m in self.messages]
        return None if self.raw else [("user", self.prompt or "")]

    def generate_request(self, request_id: str) -> pb.GenerateRequest:
        return build_request(
            request_id, self.model_id, prompt=self.prompt, messages=self.conversation(),
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
            stop=self.stop, seed=self.seed, priority=self.priority,
            constraint=self.response_format.constraint() if self.response_format else None,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=token_biases(self.logit_bias),
            min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
        )


class Usage(_Camel, TokenUsage):
    pass


class InferenceDone(_Camel):
    """The last event of a native stream (SSE ``done``, WebSocket ``{"type": "done"}``)."""

    id: str
    finish_reason: str
    cached: bool
    usage: Usage

    @classmethod
    def of(cls, rid: str, o: Outcome) -> InferenceDone:
        return cls(id=rid, finish_reason=o.finish_reason, cached=o.cached, usage=Usage.of(o))


class InferenceResponse(_Camel):
    id: str
    model_id: str
    text: str
    finish_reason: str
    cached: bool
    usage: Usage


class ModelEntry(_Camel):
    id: str
    context_length: int
    engine: str
    created: int
    state: Literal["loaded", "available"] = "loaded"
    base: str | None = Field(None, description="for a LoRA adapter model: its base model")
    device: str | None = None
    memory_bytes: int | None = Field(None, description="the worker's estimate: weights + KV cache")


class LoadModelRequest(_Camel):
    """Optional body of ``POST /api/v1/models/{id}/load``."""

    adapter_path: str | None = Field(
        None, min_length=1, description="for '<base>:<adapter>': the PEFT folder, on the worker")
    worker_id: str | None = Field(None, min_length=1, description="load on this worker")


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
