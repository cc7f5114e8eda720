"""The engine boundary's types: what a worker asks an engine, and what comes back.

An engine turns a :class:`GenerationRequest` into an async stream of events::

    Started(prompt_tokens)  TextDelta(text, token_ids)*  Finished(reason, prompt_tokens, completion_tokens)

A request may continue a generation that began elsewhere (:class:`Resume`): the engine
then generates from the prompt plus the tokens already produced, and its stream is the
rest of the text, as an undisturbed run would have sent it.

Inside an engine, its library's stream is read as :class:`Step`\\ s (see ``base.Engine``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Constraint:
    """What the output must be (OpenAI's ``response_format``): ``json_object`` (any JSON
    object) or ``json_schema`` (``schema``: a JSON Schema as JSON text).  Objects get no
    properties beyond those their schema names unless it allows them
    (``additionalProperties``), whatever the request's ``strict`` says: a small model
    left free to add properties rarely stops."""

    kind: str  # "json_object" | "json_schema"
    schema: str = ""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: the engine's default, bounded by the context
    temperature: float | None = None  # 0: greedy; None: the model's default
    top_p: float | None = None  # None: the model's default
    stop: tuple[str, ...] = ()
    seed: int | None = None
    constraint: Constraint | None = None  # None: free text
    # Output rules; their defaults leave the logits alone (``sampling.OutputRules``).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # set: each token's logprob and this many alternatives
    prompt_logprobs: int | None = None  # set: each prompt token's too (echo, vLLM's prompt_logprobs)

    def rules(self) -> tuple[str, ...]:
        """The output rules this request sets (names as in the API)."""
        return tuple(name for name, off in _RULES_OFF.items() if getattr(self, name) != off)


_RULES_OFF = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "logit_bias": (),
    "min_tokens": 0,
    "ignore_eos": False,
}


@dataclass(frozen=True)
class Resume:
    """What the client already has of a generation that was cut off: the tokens
    generated (exact ids, never re-tokenised text) and the text sent for them."""

    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str | None = None  # raw text, used as is
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content); chat template applied
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # a LoRA adapter registered on this engine; None: the base model
    resume: Resume | None = None
    tools: str = ""  # the function tools (OpenAI's list, JSON text), for the chat template
    prompt_token_ids: tuple[int, ...] | None = None  # a prompt given as token ids, used as is


@dataclass(frozen=True)
class Started:
    prompt_tokens: int
    # where asked (sampling.prompt_logprobs): every prompt token, the first without a
    # logprob of its own (nothing comes before it: its logprob is 0 here)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log probability (under the distribution it was sampled from,
    before temperature), and the ``top`` alternatives as (id, logprob, text)."""

    token_id: int
    logprob: float
    token: str
    top: tuple[tuple[int, float, str], ...] = ()
    rank: int = 0  # where known: 1 the likeliest (0: unknown)


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_ids: tuple[int, ...] = ()  # generated since the last delta (text may lag them)
    logprobs: tuple[TokenLogprob, ...] = ()  # where asked: its content tokens'

    @staticmethod
    def joined(run: list[TextDelta]) -> TextDelta:
        """One delta for consecutive ones (a reader that lags gets them together)."""
        return TextDelta(
            "".join(d.text for d in run),
            tuple(i for d in run for i in d.token_ids),
            tuple(lp for d in run for lp in d.logprobs),
        )


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int


Event = Started | TextDelta | Finished


@dataclass(frozen=True, slots=True)
class Step:
    """One read of a library's stream: new text (may be empty while the library holds
    text back), the ids of the tokens it accounts for, and on the last step the
    library's own finish reason (``None`` until then)."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass
class EngineHealth:
    """What a heartbeat reports: liveness *and* progress (the token counter)."""

    healthy: bool
    running: int
    waiting: int
    tokens_generated: int
    detail: str = ""


@dataclass(frozen=True)
class ModelCard:
    model_id: str
    context_length: int
    engine: str
    max_batch_size: int
    device: str
    created: int
