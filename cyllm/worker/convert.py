"""Between the gRPC messages and the engine's own types (the worker's edge)."""

from __future__ import annotations

import json

from cyllm import errors
from cyllm.protocol import pb
from cyllm.worker.engines.prompt import TOOL_CALL
from cyllm.worker.engines.types import (
    Constraint,
    Event,
    Finished,
    GenerationRequest,
    ModelCard,
    Resume,
    SamplingParams,
    Started,
    TextDelta,
    TokenLogprob,
)


def request_from_proto(msg: pb.GenerateRequest) -> GenerationRequest:
    s = msg.sampling
    sampling = SamplingParams(
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        stop=tuple(s.stop),
        seed=s.seed if s.HasField("seed") else None,
        constraint=_constraint(s.constraint) if s.HasField("constraint") else None,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        logit_bias=tuple(sorted(s.logit_bias.items())),
        min_tokens=s.min_tokens,
        ignore_eos=s.ignore_eos,
        logprobs=s.top_logprobs if s.HasField("top_logprobs") else None,
        prompt_logprobs=s.prompt_logprobs if s.HasField("prompt_logprobs") else None,
    )
    resume = (
        Resume(tuple(msg.resume.token_ids), msg.resume.text)
        if msg.HasField("resume") and msg.resume.token_ids
        else None
    )
    if msg.WhichOneof("input") == "messages":
        messages = tuple((m.role, _content(m)) for m in msg.messages.messages)
        return GenerationRequest(
            msg.request_id, messages=messages, sampling=sampling, resume=resume, tools=msg.tools
        )
    if msg.WhichOneof("input") == "prompt_token_ids":
        ids = tuple(msg.prompt_token_ids.ids)
        return GenerationRequest(msg.request_id, sampling=sampling, resume=resume, prompt_token_ids=ids)
    return GenerationRequest(msg.request_id, prompt=msg.prompt, sampling=sampling, resume=resume)


def _content(m: pb.ChatMessage) -> str:
    """A message's text, an assistant's tool calls written after it as a tool-trained
    model writes them (``prompt.TOOL_CALL``)."""
    calls = [
        TOOL_CALL.format(json.dumps({"name": c.name, "arguments": _arguments(c.arguments)}))
        for c in m.tool_calls
    ]
    return "\n".join([m.content] * bool(m.content) + calls)


def _arguments(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _constraint(c: pb.Constraint) -> Constraint:
    if c.kind not in ("json_object", "json_schema") or (c.kind == "json_schema") != bool(c.json_schema):
        raise errors.InvalidRequest(f"unknown response format {c.kind!r}", param="response_format")
    return Constraint(c.kind, c.json_schema)


def _logprobs(found: tuple[TokenLogprob, ...]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            token=lp.token,
            top=[pb.TopLogprob(token_id=i, logprob=v, token=t) for i, v, t in lp.top],
            rank=lp.rank,
        )
        for lp in found
    ]


def event_to_proto(event: Event) -> pb.GenerateResponse:
    if isinstance(event, TextDelta):
        return pb.GenerateResponse(
            delta=pb.Delta(text=event.text, token_ids=event.token_ids, logprobs=_logprobs(event.logprobs))
        )
    if isinstance(event, Started):
        return pb.GenerateResponse(
            started=pb.Started(
                prompt_tokens=event.prompt_tokens, prompt_logprobs=_logprobs(event.prompt_logprobs)
            )
        )
    assert isinstance(event, Finished)
    return pb.GenerateResponse(
        finished=pb.Finished(
            finish_reason=event.finish_reason,
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
        )
    )


def card_to_proto(
    card: ModelCard, *, model_id: str | None = None, base: str = "", memory_bytes: int = 0
) -> pb.ModelInfo:
    """A loaded model (or, with ``model_id`` and ``base``, an adapter on it)."""
    return pb.ModelInfo(
        id=model_id or card.model_id,
        context_length=card.context_length,
        engine=card.engine,
        created=card.created,
        state="loaded",
        base=base,
        device=card.device,
        memory_bytes=memory_bytes,
    )
