"""How a request is checked and sized before anything runs, the same way on every
engine, with messages that name the fix."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cyllm import errors
from cyllm.worker.engines.types import GenerationRequest, SamplingParams
from cyllm.worker.settings import ModelSpec


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves temperature or top_p unset gets: the model spec's
    value, else the model's own default (its generation config, where the engine reads
    one), else 1.0 as in OpenAI's API.  Resolved once, when the engine loads."""

    temperature: float = 1.0
    top_p: float = 1.0

    @classmethod
    def of(cls, spec: ModelSpec, model: Mapping[str, Any] | None = None) -> SamplingDefaults:
        own = model or {}

        def pick(name: str) -> float:
            for value in (getattr(spec, name), own.get(name)):
                if value is not None:
                    return float(value)
            return 1.0

        return cls(pick("temperature"), pick("top_p"))

    def apply(self, p: SamplingParams) -> SamplingParams:
        """``p`` with what it left unset filled in, then checked."""
        resolved = replace(
            p,
            temperature=self.temperature if p.temperature is None else p.temperature,
            top_p=self.top_p if p.top_p is None else p.top_p,
        )
        check_sampling(resolved)
        return resolved


@dataclass(frozen=True)
class Plan:
    """A request as an engine runs it: sampling resolved, prompt tokenised, length fixed.

    For a resumed request ``prompt_ids`` is the prompt followed by the tokens already
    generated (``resumed``), and ``max_new`` what is left of the request's length."""

    request: GenerationRequest
    sampling: SamplingParams
    prompt_ids: list[int]
    max_new: int
    prompt_tokens: int = -1  # the request's own prompt (-1: all of prompt_ids)
    resumed: tuple[int, ...] = ()
    grammar: Any = None  # the constraint compiled for this engine (``Engine.compile_constraint``)

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0:
            object.__setattr__(self, "prompt_tokens", len(self.prompt_ids))

    @property
    def prompt(self) -> list[int]:
        """The request's prompt, without the resumed tokens."""
        return self.prompt_ids[: self.prompt_tokens]

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def adapter(self) -> str | None:
        return self.request.adapter


def check_sampling(p: SamplingParams) -> None:
    assert p.temperature is not None and p.top_p is not None  # resolved by SamplingDefaults.apply
    if not 0 <= p.temperature <= 2:
        raise errors.InvalidRequest("temperature must be between 0 and 2", param="temperature")
    if not 0 < p.top_p <= 1:
        raise errors.InvalidRequest("top_p must be in (0, 1]", param="top_p")


def plan_max_tokens(prompt_tokens: int, requested: int | None, context: int, default: int) -> int:
    """How many tokens to generate, or a ContextLengthExceeded naming the numbers."""
    if prompt_tokens >= context:
        raise errors.ContextLengthExceeded(
            f"the prompt has {prompt_tokens} tokens, but this model's maximum context "
            f"length is {context} tokens",
            param="messages",
        )
    if requested is None:
        return min(default, context - prompt_tokens)
    if requested < 0:
        raise errors.InvalidRequest("max_tokens must not be negative", param="max_tokens")
    if prompt_tokens + requested > context:
        raise errors.ContextLengthExceeded(
            f"this model's maximum context length is {context} tokens, but you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} "
            "for the completion); reduce the prompt or max_tokens",
            param="max_tokens",
        )
    return requested


SEED_RANGE = 2**63


def continuation_seed(seed: int | None, resumed: int) -> int | None:
    """The seed a generation resumed after ``resumed`` tokens samples with: the
    request's seed plus that count (mod 2**63).  The random state of one engine cannot
    be carried to another, so a seeded request resumed at the same token gives the same
    text every time, though not the text of an undisturbed run; unseeded stays unseeded."""
    return None if seed is None else (seed + resumed) % SEED_RANGE


def check_resumed(ids: tuple[int, ...], max_new: int, vocab: int | None) -> None:
    if len(ids) > max_new:
        raise errors.InvalidRequest(
            f"resume carries {len(ids)} tokens, more than the {max_new} this request may generate",
            param="resume",
        )
    bad = next((t for t in ids if t < 0 or (vocab is not None and t >= vocab)), None)
    if bad is not None:
        raise errors.InvalidRequest(f"resume token id {bad} is outside the vocabulary", param="resume")


def checked_ids(
    tokenize: Callable[[str], list[int]],
    texts: Sequence[str],
    context_length: int,
    width: int,
    dimensions: int,
) -> list[list[int]]:
    """Each text's token ids, once every input and ``dimensions`` have been checked."""
    if dimensions > width:
        raise errors.InvalidRequest(
            f"dimensions is {dimensions}; this model's embeddings have {width}", param="dimensions"
        )
    ids = [tokenize(t) for t in texts]
    for i, row in enumerate(ids):
        if not row:
            raise errors.InvalidRequest(f"input {i} is empty", param="input")
        if len(row) > context_length:
            raise errors.ContextLengthExceeded(
                f"input {i} has {len(row)} tokens; this model reads at most {context_length}", param="input"
            )
    return ids
