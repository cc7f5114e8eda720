"""A generation as the gateway asks for it, whatever surface it came in by.

Every surface (OpenAI's chat, completions and Responses routes, the native API over
HTTP and the WebSocket) turns its own schema into one :class:`GenerationRequest`;
what a request is made of is checked here, once (text that is no UTF-8, a
conversation without text, a response format with a forced tool call), and
:meth:`GenerationRequest.to_proto` is the one place that writes the wire message the
coordinator gets — as vLLM's ``to_sampling_params()`` is for its engine.  A new
surface writes only its schema and a ``to_request()``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from cyllm import errors
from cyllm.gateway.json_schema import Constraint
from cyllm.gateway.tools import Toolbox
from cyllm.protocol import pb

MAX_CHOICES = 16  # n: each choice is a generation of its own
# How many items a list in a request may hold: validated before its items, so a body of
# 200,000 bad elements is one short error, not 200,000 of them.
MAX_ITEMS = 4096
INT64 = 2**64


def check_text(texts: Iterable[str], param: str) -> None:
    """JSON may carry a lone surrogate (``"\\ud800"``); it is no UTF-8 and no token.
    (Protobuf would refuse it with a bare exception.)"""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise errors.InvalidRequest(
                f"{param} holds an unpaired surrogate (\\u{ord(text[exc.start]):x}), which is not valid text",
                param=param,
            ) from None


def token_biases(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's ``logit_bias`` (token ids as strings -> -100..100) as ids -> biases."""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10) or int(key) > 2**31 - 1:
            raise errors.InvalidRequest(f"logit_bias key {key[:40]!r} is not a token id", param="logit_bias")
        if not -100 <= value <= 100:
            raise errors.InvalidRequest(
                f"logit_bias for token {key} is {value}; it must be between -100 and 100", param="logit_bias"
            )
        out[int(key)] = value
    return out


@dataclass(frozen=True)
class ToolCall:
    """A call an assistant made, as a later turn of the conversation carries it."""

    id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant | tool ("developer" arrives as system)
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""

    def __post_init__(self) -> None:
        check_text(
            [self.role, self.content, self.tool_call_id]
            + [t for c in self.tool_calls for t in (c.id, c.name, c.arguments)],
            "messages",
        )
        if self.tool_calls and self.role != "assistant":
            raise errors.InvalidRequest("tool_calls belong to assistant messages", param="messages")
        if (self.role == "tool") != bool(self.tool_call_id):
            raise errors.InvalidRequest(
                "a tool message needs tool_call_id, and only a tool message has one", param="messages"
            )

    def text_chars(self) -> int:
        return (
            len(self.content)
            + len(self.tool_call_id)
            + sum(len(c.id) + len(c.name) + len(c.arguments) for c in self.tool_calls)
        )


@dataclass(frozen=True)
class Sampling:
    """How to sample, and the output rules (their defaults leave the logits alone)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        check_text(self.stop, "stop")


@dataclass
class GenerationRequest:
    """One generation a caller asked for: ``messages`` (through the model's chat template)
    or a raw ``prompt``; ``n`` choices of it; ``logprobs``: that many alternatives per
    token (None: no logprobs); ``tools``: the functions and the caller's choice."""

    model: str
    messages: list[Message] | None = None
    prompt: str | None = None
    prompt_ids: list[int] | None = None  # a prompt given as token ids (the harnesses send them)
    prompt_logprobs: int | None = None  # score the prompt too, with this many alternatives
    sampling: Sampling = field(default_factory=Sampling)
    constraint: Constraint | None = None
    tools: Toolbox | None = None
    logprobs: int | None = None
    n: int = 1
    priority: int = 0
    messages_param: str = "messages"  # what the surface calls the conversation

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.messages, self.prompt, self.prompt_ids)) != 1:
            raise errors.InvalidRequest("give exactly one of a prompt or messages")
        if self.prompt_logprobs is not None and self.n > 1:
            raise errors.InvalidRequest(
                "n must be 1 when the prompt is scored (echo with logprobs, prompt_logprobs)", param="n"
            )
        if self.sampling.max_tokens == 0 and self.prompt_logprobs is None:
            raise errors.InvalidRequest(
                "max_tokens 0 scores a prompt: it needs echo with logprobs, or prompt_logprobs",
                param="max_tokens",
            )
        check_text([self.prompt or ""], "prompt")
        if self.messages is not None and not any(m.content.strip() or m.tool_calls for m in self.messages):
            raise errors.InvalidRequest(f"{self.messages_param} holds no text", param=self.messages_param)
        if self.tools is not None and self.tools.forced:
            if self.constraint is not None:
                raise errors.InvalidRequest(
                    "a response format cannot be combined with a tool choice that forces a call",
                    param="tool_choice",
                )
            self.constraint = self.tools.constraint()

    def prompt_chars(self) -> int:
        """The length of everything that becomes the prompt: the conversation with its
        tool calls and results, the tools' definitions, the schema an output is held to
        (a caller's token budget counts all of it)."""
        chars = len(self.prompt or "") + sum(m.text_chars() for m in self.messages or ())
        chars += 4 * len(self.prompt_ids or ())  # a token is about four characters
        if self.tools is not None:
            chars += len(self.tools.declared_json)
        if self.constraint is not None:
            chars += len(self.constraint.json_schema)
        return chars

    def to_proto(self, request_id: str, choice: int = 0) -> pb.GenerateRequest:
        """The wire message of choice ``choice``: with a seed, choice ``i`` samples with
        ``seed + i`` (reproducible, and the choices differ)."""
        s = self.sampling
        sampling = pb.SamplingParams(
            stop=s.stop,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            logit_bias=s.logit_bias,
            min_tokens=s.min_tokens,
            ignore_eos=s.ignore_eos,
        )
        if s.max_tokens is not None:
            sampling.max_tokens = s.max_tokens
        if s.temperature is not None:
            sampling.temperature = s.temperature
        if s.top_p is not None:
            sampling.top_p = s.top_p
        if s.seed is not None:
            sampling.seed = (s.seed + choice + INT64 // 2) % INT64 - INT64 // 2  # an int64
        if s.repetition_penalty is not None:
            sampling.repetition_penalty = s.repetition_penalty
        if self.logprobs is not None:
            sampling.top_logprobs = self.logprobs
        if self.prompt_logprobs is not None:
            sampling.prompt_logprobs = self.prompt_logprobs
        if self.constraint is not None:
            sampling.constraint.CopyFrom(
                pb.Constraint(kind=self.constraint.kind, json_schema=self.constraint.json_schema)
            )
        out = pb.GenerateRequest(
            request_id=request_id,
            model=self.model,
            sampling=sampling,
            priority=self.priority,
            tools=self.tools.declared_json if self.tools else "",
        )
        if self.prompt_ids is not None:
            out.prompt_token_ids.ids[:] = self.prompt_ids
        elif self.messages is None:
            out.prompt = self.prompt or ""
        else:
            out.messages.CopyFrom(
                pb.ChatMessages(
                    messages=[
                        pb.ChatMessage(
                            role=m.role,
                            content=m.content,
                            tool_call_id=m.tool_call_id,
                            tool_calls=[
                                pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in m.tool_calls
                            ],
                        )
                        for m in self.messages
                    ]
                )
            )
        return out
